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

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
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
            .get(id as usize)?
            .as_str()
    }

    /// Reads the header and metadata of the GGUF file at `path`.
    pub fn read(path: &Path) -> Result<Metadata, GgufError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| GgufError::Io {
            path: name.clone(),
            source,
        })?;
        let mut reader = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            path: name,
            position: 0,
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
        let mut values = BTreeMap::new();
        for _ in 0..count {
            let key = reader.string()?;
            let kind = reader.u32()?;
            let value = reader.value(kind, 0)?;
            values.insert(key, value);
        }
        if tensor_count > MAX_LEN {
            return Err(reader.format(format!("{tensor_count} tensors is not plausible")));
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = reader.string()?;
            let n_dims = reader.u32()?;
            if n_dims > 8 {
                return Err(reader.format(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| reader.u64()).collect::<Result<Vec<u64>, _>>()?;
            let kind = reader.u32()?;
            let offset = reader.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let alignment = values
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_offset = reader.position.div_ceil(alignment) * alignment;
        Ok(Metadata {
            version,
            tensor_count,
            values,
            tensors,
            data_offset,
        })
    }
}

struct Reader<R> {
    inner: R,
    path: String,
    /// Bytes read so far.
    position: u64,
}

/// Longest string or array accepted: guards against reading garbage as a huge length.
const MAX_LEN: u64 = 1 << 32;

impl<R: Read> Reader<R> {
    fn format(&self, detail: String) -> GgufError {
        GgufError::Format {
            path: self.path.clone(),
            detail,
        }
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

    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        if n > MAX_LEN {
            return Err(self.format(format!("a length of {n} is not plausible")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let mut buf = vec![0u8; n];
        self.bytes(&mut buf)?;
        String::from_utf8(buf).map_err(|e| self.format(format!("a string is not UTF-8: {e}")))
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U64(u64::from(self.array::<1>()?[0])),
            1 => Value::I64(i64::from(i8::from_le_bytes(self.array()?))),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.array()?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.array()?))),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 if depth == 0 => {
                let element = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(element, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.format(format!("unknown value type {other}"))),
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
        assert!(err.contains("ends inside the metadata"), "{err}");
        std::fs::write(&path, b"PK\x03\x04 not a model").unwrap();
        let err = Metadata::read(&path).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
