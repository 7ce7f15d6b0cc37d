//! Text as the tools that write corpora store it: `Utf8`, `LargeUtf8` and `Utf8View` strings,
//! `Binary`, `LargeBinary` and `BinaryView` bytes (Spark and older writers), and dictionaries of
//! any of these (pandas categoricals), read row by row without copying the strings.
//!
//! Bytes columns are read as UTF-8; a value that is not valid UTF-8 is reported per row, so the
//! caller quarantines that row (`invalid_utf8`) and keeps the others.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::error::ArrowError;

/// Whether a column of this type can be read as text.
pub fn is_text_type(ty: &DataType) -> bool {
    match ty {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => true,
        DataType::Dictionary(_, values) => is_text_type(values),
        _ => false,
    }
}

/// One batch's text column, ready for row access.
pub struct TextColumn {
    /// The column with any dictionary unpacked into its value type.
    array: ArrayRef,
}

/// A row's value: absent (null), text, or bytes that are not UTF-8.
pub enum TextValue<'a> {
    Null,
    Text(&'a str),
    NotUtf8(&'a [u8], std::str::Utf8Error),
}

impl TextColumn {
    /// `array` must be of a type [`is_text_type`] accepts. A dictionary is unpacked once per
    /// batch (its values repeated per row), so later access is a plain slice per row.
    pub fn new(array: &ArrayRef) -> Result<TextColumn, ArrowError> {
        let array = match array.data_type() {
            DataType::Dictionary(_, values) => cast(array, values)?,
            _ => array.clone(),
        };
        // A dictionary of dictionaries unpacks to a dictionary, which `get` cannot read.
        if !is_text_type(array.data_type()) || matches!(array.data_type(), DataType::Dictionary(..)) {
            return Err(ArrowError::InvalidArgumentError(format!(
                "a {} column cannot be read as text",
                array.data_type()
            )));
        }
        Ok(TextColumn { array })
    }

    pub fn get(&self, row: usize) -> TextValue<'_> {
        let a = &self.array;
        if a.is_null(row) {
            return TextValue::Null;
        }
        let bytes = match a.data_type() {
            DataType::Utf8 => return TextValue::Text(a.as_string::<i32>().value(row)),
            DataType::LargeUtf8 => return TextValue::Text(a.as_string::<i64>().value(row)),
            DataType::Utf8View => return TextValue::Text(a.as_string_view().value(row)),
            DataType::Binary => a.as_binary::<i32>().value(row),
            DataType::LargeBinary => a.as_binary::<i64>().value(row),
            // `new` admits no other type.
            _ => a.as_binary_view().value(row),
        };
        match std::str::from_utf8(bytes) {
            Ok(text) => TextValue::Text(text),
            Err(e) => TextValue::NotUtf8(bytes, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, DictionaryArray, LargeStringArray, StringViewArray};
    use arrow::datatypes::Int32Type;
    use std::sync::Arc;

    fn texts(column: &TextColumn, rows: usize) -> Vec<String> {
        (0..rows)
            .map(|r| match column.get(r) {
                TextValue::Null => "<null>".to_string(),
                TextValue::Text(t) => t.to_string(),
                TextValue::NotUtf8(b, _) => format!("<{} bad bytes>", b.len()),
            })
            .collect()
    }

    #[test]
    fn every_encoding_reads_the_same_rows() {
        let want = vec!["a".to_string(), "<null>".into(), "cé".into()];
        let plain: Vec<Option<&str>> = vec![Some("a"), None, Some("cé")];
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(LargeStringArray::from(plain.clone())),
            Arc::new(StringViewArray::from(plain.clone())),
            Arc::new(BinaryArray::from(
                plain.iter().map(|s| s.map(str::as_bytes)).collect::<Vec<_>>(),
            )),
            Arc::new(plain.iter().copied().collect::<DictionaryArray<Int32Type>>()),
        ];
        for array in arrays {
            let ty = array.data_type().clone();
            assert!(is_text_type(&ty), "{ty}");
            assert_eq!(texts(&TextColumn::new(&array).unwrap(), 3), want, "{ty}");
        }
        let bad: ArrayRef = Arc::new(BinaryArray::from(vec![&b"ok"[..], &b"\xff\xfe"[..]]));
        assert_eq!(texts(&TextColumn::new(&bad).unwrap(), 2), ["ok", "<2 bad bytes>"]);
        assert!(!is_text_type(&DataType::Int64));
    }
}
