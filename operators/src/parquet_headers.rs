//! What a Parquet file's headers claim, checked before the parquet crate acts on them.
//!
//! - [`scan_pages`]: a page header states the page's compressed and uncompressed sizes; the
//!   decoder allocates the uncompressed size and inflates into it. A few kilobytes of zstd can
//!   claim (and honestly hold) a gigabyte page, so the reader walks the headers of each fetched
//!   column chunk and refuses the row group before anything is decoded. The dictionary pages'
//!   size also bounds what one row of a dictionary-encoded column decodes to (a 600 KB value
//!   repeated in every row takes a few bytes per row in the file).
//! - [`check_schema_depth`]: the footer's schema is a flat list of elements with child counts,
//!   which the parquet crate turns into a tree recursively; a footer nesting thousands of levels
//!   would overflow the stack and abort the process (every unit, not one file), so the depth is
//!   measured first, without recursion.
//!
//! Both are Thrift structs in the compact protocol. We read the few fields we need and skip every
//! other field by its wire type, so the reader needs no schema for the rest; skipping nests at
//! most [`MAX_DEPTH`] levels.

/// Deepest schema accepted (real corpora nest a handful of levels).
pub const MAX_SCHEMA_DEPTH: usize = 64;

/// Checks the schema in a Parquet footer (the Thrift `FileMetaData`, without the file's
/// trailing length and magic): at most [`MAX_SCHEMA_DEPTH`] levels of nesting.
pub fn check_schema_depth(footer: &[u8]) -> Result<(), String> {
    let mut cursor = Cursor { bytes: footer, at: 0 };
    let mut last = 0;
    while let Some((id, kind)) = cursor.field(last)? {
        if (id, kind) != (2, LIST) {
            cursor.skip(kind, 0)?;
            last = id;
            continue;
        }
        let (element, n) = cursor.list_header()?;
        if element != STRUCT {
            return Err(format!("the schema is a list of wire type {element}, not of structs"));
        }
        // Open groups: how many children each still expects.
        let mut open: Vec<i64> = Vec::new();
        for _ in 0..n {
            let children = cursor.schema_element_children()?;
            if let Some(parent) = open.last_mut() {
                *parent -= 1;
            }
            if children > 0 {
                open.push(children);
                if open.len() > MAX_SCHEMA_DEPTH {
                    return Err(format!("the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"));
                }
            }
            while open.last() == Some(&0) {
                open.pop();
            }
        }
        return Ok(());
    }
    Err("the footer holds no schema".into())
}

/// Sizes of the pages of one column chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSizes {
    pub pages: u64,
    /// The largest uncompressed page.
    pub largest: u64,
    /// All pages, uncompressed.
    pub total: u64,
    /// The dictionary pages, uncompressed: no value of a dictionary-encoded column decodes to
    /// more than this, however small its data pages are.
    pub dictionary: u64,
}

/// `PageType::DICTIONARY_PAGE` in the Parquet format.
const DICTIONARY_PAGE: i64 = 2;

/// Deepest nesting of structs, lists and maps skipped in a header.
const MAX_DEPTH: u32 = 16;

/// Walks the page headers of the column chunk `chunk` (its bytes from the first page, as stored).
pub fn scan_pages(chunk: &[u8]) -> Result<PageSizes, String> {
    let mut sizes = PageSizes::default();
    let mut at = 0usize;
    while at < chunk.len() {
        let mut header = Cursor { bytes: chunk, at };
        let (kind, uncompressed, compressed) = header.page_header()?;
        let (Ok(uncompressed), Ok(compressed)) = (u64::try_from(uncompressed), usize::try_from(compressed)) else {
            return Err(format!(
                "page {} at byte {at} has negative sizes ({uncompressed} uncompressed, {compressed} compressed)",
                sizes.pages
            ));
        };
        at = header
            .at
            .checked_add(compressed)
            .filter(|&end| end <= chunk.len())
            .ok_or_else(|| {
                format!(
                    "page {} at byte {at} runs past the end of its column chunk",
                    sizes.pages
                )
            })?;
        sizes.pages += 1;
        sizes.largest = sizes.largest.max(uncompressed);
        sizes.total = sizes.total.saturating_add(uncompressed);
        if kind == DICTIONARY_PAGE {
            sizes.dictionary = sizes.dictionary.saturating_add(uncompressed);
        }
    }
    Ok(sizes)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

// Compact-protocol wire types.
const STOP: u8 = 0;
const TRUE: u8 = 1;
const FALSE: u8 = 2;
const BYTE: u8 = 3;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const DOUBLE: u8 = 7;
const BINARY: u8 = 8;
const LIST: u8 = 9;
const SET: u8 = 10;
const MAP: u8 = 11;
const STRUCT: u8 = 12;

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or("a header runs past the end of its bytes")?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a header holds an overlong varint".into())
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn skip_bytes(&mut self, n: u64) -> Result<(), String> {
        self.at = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or("a header runs past the end of its bytes")?;
        Ok(())
    }

    /// Reads a field header: `(field id, wire type)`; `None` at the struct's end.
    fn field(&mut self, last: i16) -> Result<Option<(i16, u8)>, String> {
        let b = self.byte()?;
        let kind = b & 0x0f;
        if kind == STOP {
            return Ok(None);
        }
        let delta = i16::from(b >> 4);
        let id = if delta == 0 {
            i16::try_from(self.zigzag()?).map_err(|_| "a header field id is out of range")?
        } else {
            last.wrapping_add(delta)
        };
        Ok(Some((id, kind)))
    }

    /// `PageHeader`: its type and sizes (fields 1, 2 and 3), skipping the rest.
    fn page_header(&mut self) -> Result<(i64, i64, i64), String> {
        let (mut page_type, mut uncompressed, mut compressed) = (0, None, None);
        let mut last = 0;
        while let Some((id, kind)) = self.field(last)? {
            match (id, kind) {
                (1, I32) => page_type = self.zigzag()?,
                (2, I32) => uncompressed = Some(self.zigzag()?),
                (3, I32) => compressed = Some(self.zigzag()?),
                _ => self.skip(kind, 0)?,
            }
            last = id;
        }
        match (uncompressed, compressed) {
            (Some(u), Some(c)) => Ok((page_type, u, c)),
            _ => Err("a page header lacks its sizes".into()),
        }
    }

    fn skip(&mut self, kind: u8, depth: u32) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("a header nests deeper than {MAX_DEPTH} levels"));
        }
        match kind {
            TRUE | FALSE => Ok(()),
            BYTE => self.skip_bytes(1),
            I16 | I32 | I64 => self.varint().map(drop),
            DOUBLE => self.skip_bytes(8),
            BINARY => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            LIST | SET => {
                let (element, n) = self.list_header()?;
                self.skip_elements(element, n, depth)
            }
            MAP => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let types = self.byte()?;
                for _ in 0..n {
                    self.skip_element(types >> 4, depth)?;
                    self.skip_element(types & 0x0f, depth)?;
                }
                Ok(())
            }
            STRUCT => {
                let mut last = 0;
                while let Some((id, kind)) = self.field(last)? {
                    self.skip(kind, depth + 1)?;
                    last = id;
                }
                Ok(())
            }
            other => Err(format!("a header holds the unknown wire type {other}")),
        }
    }

    /// A list's element type and length.
    fn list_header(&mut self) -> Result<(u8, u64), String> {
        let b = self.byte()?;
        let n = if b >> 4 == 15 {
            self.varint()?
        } else {
            u64::from(b >> 4)
        };
        // Every element takes at least one byte: a longer list is a lie. (cannot underflow:
        // `at` only moves within the bytes.)
        if n > (self.bytes.len() - self.at) as u64 {
            return Err("a list claims more elements than there are bytes left".into());
        }
        Ok((b & 0x0f, n))
    }

    /// A `SchemaElement`: its `num_children` (field 5), 0 for a leaf.
    fn schema_element_children(&mut self) -> Result<i64, String> {
        let mut children = 0;
        let mut last = 0;
        while let Some((id, kind)) = self.field(last)? {
            match (id, kind) {
                (5, I32) => children = self.zigzag()?,
                _ => self.skip(kind, 1)?,
            }
            last = id;
        }
        Ok(children.max(0))
    }

    /// Booleans inside lists and maps take a byte each.
    fn skip_element(&mut self, kind: u8, depth: u32) -> Result<(), String> {
        match kind {
            TRUE | FALSE => self.skip_bytes(1),
            other => self.skip(other, depth + 1),
        }
    }

    fn skip_elements(&mut self, kind: u8, n: u64, depth: u32) -> Result<(), String> {
        for _ in 0..n {
            self.skip_element(kind, depth)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    /// A real file from the parquet crate's writer: the scan agrees with the footer's sizes.
    #[test]
    fn reads_the_page_sizes_the_writer_wrote() {
        let texts: Vec<String> = (0..5000)
            .map(|i| format!("document {i} {}", "x".repeat(i % 300)))
            .collect();
        let column: ArrayRef = Arc::new(StringArray::from(texts));
        let batch = RecordBatch::try_from_iter([("text", column)]).unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_dictionary_enabled(false)
            .set_write_batch_size(64)
            .set_data_page_size_limit(64 << 10)
            .build();
        let mut file = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(bytes::Bytes::from(file.clone())).unwrap();
        let chunk = parquet::file::reader::FileReader::metadata(&reader)
            .row_group(0)
            .column(0)
            .clone();
        let (start, len) = chunk.byte_range();
        let sizes = scan_pages(&file[start as usize..(start + len) as usize]).unwrap();
        assert!(sizes.pages > 3, "{sizes:?}");
        assert_eq!(sizes.dictionary, 0, "{sizes:?}");
        assert!(sizes.largest <= sizes.total);
        // The footer's uncompressed size counts the page headers too.
        assert!(
            sizes.total <= chunk.uncompressed_size() as u64,
            "{sizes:?} vs {}",
            chunk.uncompressed_size()
        );
        assert!(sizes.total * 10 > chunk.uncompressed_size() as u64 * 9, "{sizes:?}");

        // Truncated and garbage chunks are errors, never panics.
        for cut in [1, 7, 100, len as usize / 2] {
            let _ = scan_pages(&file[start as usize..start as usize + cut]);
        }
        assert!(scan_pages(&[0x15, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(scan_pages(&[0x1c; 64]).is_err());
    }

    /// A file whose schema nests `depth` groups around one leaf, written by the parquet crate.
    fn footer_of_depth(depth: usize) -> Vec<u8> {
        let mut message = "required int32 leaf;".to_string();
        for level in 0..depth {
            message = format!("optional group g{level} {{ {message} }}");
        }
        let schema =
            Arc::new(parquet::schema::parser::parse_message_type(&format!("message m {{ {message} }}")).unwrap());
        let mut file = Vec::new();
        let writer = parquet::file::writer::SerializedFileWriter::new(&mut file, schema, Default::default()).unwrap();
        writer.close().unwrap();
        let len = u32::from_le_bytes(file[file.len() - 8..file.len() - 4].try_into().unwrap()) as usize;
        file[file.len() - 8 - len..file.len() - 8].to_vec()
    }

    #[test]
    fn measures_schema_depth_without_recursion() {
        for depth in [0, 3, MAX_SCHEMA_DEPTH - 1] {
            check_schema_depth(&footer_of_depth(depth)).unwrap();
        }
        let err = check_schema_depth(&footer_of_depth(MAX_SCHEMA_DEPTH + 5)).unwrap_err();
        assert!(err.contains("nests deeper than 64"), "{err}");
        let footer = footer_of_depth(3);
        for cut in 0..footer.len() {
            let _ = check_schema_depth(&footer[..cut]);
        }
    }
}
