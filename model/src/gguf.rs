//! A reader for GGUF files (the llama.cpp model format, versions 2 and 3).
//!
//! [`Metadata::read`] reads the header, the key/value metadata and the tensor directory, never the
//! tensor data, so reading the tokenizer of a 100 MB model touches a few megabytes; the data of a
//! tensor lies at `data_offset + TensorInfo::offset`. Layout (little-endian): magic `GGUF`,
//! `u32` version, `u64` tensor count, `u64` metadata count, then per entry a string key, a `u32`
//! value type and the value. Strings are a `u64` byte length and UTF-8 bytes; arrays are a `u32`
//! element type, a `u64` length and the elements.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a GGUF file ({detail})")]
    Format { path: String, detail: String },
}

/// The metadata of one GGUF file.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub version: u32,
    pub tensor_count: u64,
    pub values: BTreeMap<String, Value>,
    /// The tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data starts (aligned to `general.alignment`, 32 by default).
    pub data_offset: u64,
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml orders them.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...).
    pub kind: u32,
    /// Offset of the data from [`Metadata::data_offset`].
    pub offset: u64,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The vocabulary entry whose id the metadata key `key` holds (e.g.
    /// `tokenizer.ggml.eos_token_id` -> `"<|im_end|>"`).
    pub fn token(&self, key: &str) -> Option<&str> {
        let id = self.get(key)?.as_u64()?;
        self.get("tokenizer.ggml.tokens")?
            .as_array()?
            .get(usize::try_from(id).ok()?)?
            .as_str()
    }

    /// Reads the header and metadata of the GGUF file at `path`.
    pub fn read(path: &Path) -> Result<Metadata, GgufError> {
        let name = path.display().to_string();
        let io = |source| GgufError::Io {
            path: name.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        Metadata::parse(BufReader::with_capacity(1 << 20, file), file_len, &name)
    }

    /// Parses a GGUF header from `input`, the start of a file of `file_len` bytes (`name` goes
    /// into errors). Every count, length, shape and offset is checked against the bytes the file
    /// has left before anything is allocated for it, so no input makes the reader allocate more
    /// than a few times the file's size; a malformed file is a [`GgufError::Format`] naming the
    /// field, never a panic.
    pub fn parse(input: impl Read, file_len: u64, name: &str) -> Result<Metadata, GgufError> {
        let mut reader = Reader {
            inner: input,
            path: name.to_string(),
            position: 0,
            file_len,
        };
        let mut magic = [0u8; 4];
        reader.bytes(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(reader.format(format!("magic bytes {magic:?}, expected \"GGUF\"")));
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(reader.format(format!("version {version}; versions 2 and 3 are supported")));
        }
        let tensor_count = reader.u64()?;
        let count = reader.u64()?;
        // A key/value entry takes at least a key length (8), a value type (4) and one byte.
        reader.fits(count, 13, "the metadata count")?;
        let mut values = BTreeMap::new();
        for _ in 0..count {
            let key = reader.string("a metadata key")?;
            let kind = reader.u32()?;
            let value = reader.value(kind, 0, &key)?;
            if values.insert(key.clone(), value).is_some() {
                return Err(reader.format(format!("metadata key {key} appears twice")));
            }
        }
        // A directory entry takes at least a name length (8), a dimension count (4), one
        // dimension (8), a type (4) and an offset (8).
        reader.fits(tensor_count, 32, "the tensor count")?;
        // Grown as entries arrive past the first few thousand: a count is only a claim.
        let mut tensors = Vec::with_capacity(tensor_count.min(4096) as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..tensor_count {
            let name = reader.string("a tensor name")?;
            let n_dims = reader.u32()?;
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(reader.format(format!(
                    "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are valid)"
                )));
            }
            let dims = (0..n_dims).map(|_| reader.u64()).collect::<Result<Vec<u64>, _>>()?;
            let kind = reader.u32()?;
            let offset = reader.u64()?;
            let tensor = TensorInfo {
                name,
                dims,
                kind,
                offset,
            };
            tensor.check().map_err(|detail| reader.format(detail))?;
            if !names.insert(tensor.name.clone()) {
                return Err(reader.format(format!("tensor {} appears twice in the directory", tensor.name)));
            }
            tensors.push(tensor);
        }
        let alignment = match values.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(reader.format(format!("general.alignment = {v:?} is not a power of two up to 1 MiB"))),
            },
        };
        // cannot overflow: `position` counts bytes actually read and `alignment` is at most 1 MiB.
        let data_offset = reader.position.div_ceil(alignment) * alignment;
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(reader.format(format!(
                    "tensor {} starts at offset {}, not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            let end = t
                .byte_len()
                .unwrap_or(0)
                .checked_add(t.offset)
                .and_then(|e| e.checked_add(data_offset));
            if end.is_none_or(|end| end > file_len) {
                return Err(reader.format(format!(
                    "tensor {} ({} bytes at offset {}) lies past the end of the file ({file_len} bytes)",
                    t.name,
                    t.byte_len().map_or("?".into(), |b| b.to_string()),
                    t.offset
                )));
            }
        }
        Ok(Metadata {
            version,
            tensor_count,
            values,
            tensors,
            data_offset,
        })
    }
}

/// The longest string a header may hold (chat templates are kilobytes, tokens bytes).
const MAX_STRING: u64 = 16 << 20;

/// ggml's limit on a tensor's dimensions.
const MAX_DIMS: u32 = 4;

/// Most elements one tensor may have (2^48: far above any model, far below overflow).
const MAX_ELEMENTS: u64 = 1 << 48;

/// `(values per block, bytes per block)` of the ggml tensor types whose layout is fixed; other
/// (newer) types are read but their size is not known here.
fn block_layout(kind: u32) -> Option<(u64, u64)> {
    Some(match kind {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

impl TensorInfo {
    /// The number of values (the product of the dimensions, checked when the file was read).
    pub fn elements(&self) -> u64 {
        // cannot overflow for a parsed file: `check` bounded the product by MAX_ELEMENTS.
        self.dims.iter().product()
    }

    /// The bytes of the tensor's data, for the types whose layout is known.
    pub fn byte_len(&self) -> Option<u64> {
        let (per_block, bytes) = block_layout(self.kind)?;
        // cannot overflow: at most 2^48 values times at most 292 bytes per block.
        Some(self.elements() / per_block * bytes)
    }

    /// Dimensions at least 1, at most [`MAX_ELEMENTS`] values, whole blocks along the rows.
    fn check(&self) -> Result<(), String> {
        let name = &self.name;
        let mut elements: u64 = 1;
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 {
                return Err(format!("tensor {name} has dimension {i} of size 0"));
            }
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= MAX_ELEMENTS)
                .ok_or_else(|| format!("tensor {name} has dimensions {:?}: too many values", self.dims))?;
        }
        // cannot fail: `parse` refuses a tensor of 0 dimensions before calling `check`.
        if let Some((per_block, _)) = block_layout(self.kind)
            && !self.dims[0].is_multiple_of(per_block)
        {
            return Err(format!(
                "tensor {name} has rows of {} values, not a multiple of its type's block of {per_block}",
                self.dims[0]
            ));
        }
        Ok(())
    }
}

struct Reader<R> {
    inner: R,
    path: String,
    /// Bytes read so far.
    position: u64,
    /// The size of the whole file: no count may claim more bytes than are left.
    file_len: u64,
}

impl<R: Read> Reader<R> {
    fn format(&self, detail: String) -> GgufError {
        GgufError::Format {
            path: self.path.clone(),
            detail,
        }
    }

    /// Checks that `count` items of at least `each` bytes fit in what is left of the file.
    fn fits(&self, count: u64, each: u64, what: &str) -> Result<(), GgufError> {
        let left = self.file_len.saturating_sub(self.position);
        if count.checked_mul(each).is_none_or(|need| need > left) {
            return Err(self.format(format!(
                "{what} is {count}, but only {left} bytes of the file are left at byte {}",
                self.position
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.position += buf.len() as u64;
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                self.format("the file ends inside the metadata".into())
            } else {
                GgufError::Io {
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.bytes(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64()?;
        self.fits(n, 1, &format!("the length of {what}"))?;
        if n > MAX_STRING {
            return Err(self.format(format!(
                "the length of {what} is {n} bytes, more than the {MAX_STRING} allowed"
            )));
        }
        // cannot truncate: n <= MAX_STRING (16 MiB).
        let mut buf = vec![0u8; n as usize];
        self.bytes(&mut buf)?;
        String::from_utf8(buf).map_err(|e| self.format(format!("{what} is not UTF-8: {e}")))
    }

    fn value(&mut self, kind: u32, depth: u32, key: &str) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U64(u64::from(self.array::<1>()?[0])),
            1 => Value::I64(i64::from(i8::from_le_bytes(self.array()?))),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.array()?))),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string(&format!("the value of {key}"))?),
            9 if depth == 0 => {
                let element = self.u32()?;
                let n = self.u64()?;
                let each = match element {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    other => {
                        return Err(self.format(format!("the array {key} has elements of type {other}")));
                    }
                };
                self.fits(n, each, &format!("the length of the array {key}"))?;
                // The Vec grows as elements arrive: a `Value` is larger than most elements.
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(element, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.format(format!("{key} has the unknown value type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    #[test]
    fn reads_scalars_strings_and_arrays() {
        let mut file = b"GGUF".to_vec();
        file.extend(3u32.to_le_bytes());
        file.extend(0u64.to_le_bytes());
        file.extend(3u64.to_le_bytes());
        string(&mut file, "a.name");
        file.extend(8u32.to_le_bytes());
        string(&mut file, "tiny");
        string(&mut file, "a.count");
        file.extend(4u32.to_le_bytes());
        file.extend(49152u32.to_le_bytes());
        string(&mut file, "a.list");
        file.extend(9u32.to_le_bytes());
        file.extend(8u32.to_le_bytes());
        file.extend(2u64.to_le_bytes());
        string(&mut file, "x");
        string(&mut file, "Ġy");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &file).unwrap();
        let meta = Metadata::read(&path).unwrap();
        assert_eq!(meta.get("a.name").and_then(Value::as_str), Some("tiny"));
        assert_eq!(meta.get("a.count").and_then(Value::as_u64), Some(49152));
        let list = meta.get("a.list").and_then(Value::as_array).unwrap();
        assert_eq!(list[1].as_str(), Some("Ġy"));

        std::fs::write(&path, &file[..file.len() - 2]).unwrap();
        let err = Metadata::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("the length of the value of a.list is 3, but only 1 bytes"),
            "{err}"
        );
        std::fs::write(&path, b"PK\x03\x04 not a model").unwrap();
        let err = Metadata::read(&path).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
