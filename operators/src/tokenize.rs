//! **tokenize**: the texts that go to training -> `tokens` (ids + EOS per document).
//!
//! What goes to training from one unit: documents routed `keep` (kind `raw`), the `tagged`
//! texts (kind `tagged`) and the kept `synthetic` rows (kinds `safeweb`, `refuseweb`, `moral`);
//! documents routed `rephrase`/`refuse` reach training only through those, `drop` never does. Encoding runs on rayon's pool, a record batch at a time,
//! through [`TextTokenizer`] (Hugging Face `tokenizers`), so ids equal those of Python's
//! `tokenizers` on the same `tokenizer.json`.

use crate::OpResult;
use crate::schema;
use arrow::array::{Array, AsArray, ListArray, RecordBatch, StringArray, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::compute::cast;
use arrow::datatypes::DataType;
use safepipe_model::TextTokenizer;
use std::sync::Arc;

/// The query over one unit's tables that lists what to tokenize, in a fixed order (kept
/// documents in input order, then tagged texts in input order, then kept synthetic rows in
/// their table's order when `with_synthetic`): `(id, source, kind, text, tag_offsets)`, the
/// offsets of the inserted tags for tagged texts and null for the others.
pub fn select_for_training(with_synthetic: bool) -> String {
    let synthetic = if with_synthetic {
        " UNION ALL SELECT id, source, kind, text, arrow_cast(NULL, 'List(UInt32)') AS tag_offsets, 2 AS part, n FROM \
           (SELECT id, source, kind, text, keep, row_number() OVER () AS n FROM synthetic) s WHERE keep AND text IS NOT NULL"
    } else {
        ""
    };
    format!(
        "WITH d AS (SELECT id, text, source, row_number() OVER () AS n FROM documents), \
         r AS (SELECT id, route, row_number() OVER () AS n FROM routes), \
         t AS (SELECT id, text, source, tag_offsets, row_number() OVER () AS n FROM tagged) \
         SELECT id, source, kind, text, tag_offsets FROM ( \
           SELECT d.id, d.source, 'raw' AS kind, d.text, arrow_cast(NULL, 'List(UInt32)') AS tag_offsets, 0 AS part, d.n \
             FROM d JOIN r ON d.n = r.n AND d.id = r.id WHERE r.route = 'keep' \
           UNION ALL SELECT id, source, 'tagged' AS kind, text, tag_offsets, 1 AS part, n FROM t{synthetic}) \
         ORDER BY part, n"
    )
}

/// Texts encoded per call: enough to keep every core busy, small enough that the per-token
/// overhead of `tokenizers`' encodings stays at a few MB.
const ENCODE_CHUNK: usize = 512;

/// Tokenizes `(id, source, kind, text, tag_offsets)` rows into a `tokens` batch: texts as
/// text, the tag id exactly at each row's `tag_offsets`, EOS at the end.
pub fn tokenize_batch(tokenizer: &TextTokenizer, batch: &RecordBatch) -> OpResult<RecordBatch> {
    let column = |i: usize| cast(batch.column(i), &DataType::Utf8);
    let (id, source, kind, text) = (column(0)?, column(1)?, column(2)?, column(3)?);
    let text = text.as_string::<i32>();
    let offsets = batch.column(4).as_list_opt::<i32>().ok_or_else(|| {
        crate::OpError::Config(format!(
            "tag_offsets is {}, not a list of uint32",
            batch.column(4).data_type()
        ))
    })?;
    // Each row's offsets as a slice of the list's one values buffer (no copy per row).
    let all_offsets = offsets.values().as_primitive::<arrow::datatypes::UInt32Type>().values();
    let bounds = offsets.value_offsets();
    let rows: Vec<(&str, Option<&[u32]>)> = (0..text.len())
        .map(|i| {
            let tags = offsets
                .is_valid(i)
                .then(|| &all_offsets[bounds[i] as usize..bounds[i + 1] as usize]);
            (text.value(i), tags)
        })
        .collect();
    // `tokenizers` builds a full Encoding per text (a string, offsets and masks per token, ~80
    // bytes a token): encode a slice at a time and keep only the ids, so memory stays bounded.
    let mut encoded = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ENCODE_CHUNK) {
        if chunk.iter().all(|(_, tags)| tags.is_none()) {
            let texts: Vec<&str> = chunk.iter().map(|(t, _)| *t).collect();
            encoded.extend(tokenizer.encode_documents(&texts)?);
        } else {
            let tagged: Vec<(&str, &[u32])> = chunk.iter().map(|(t, tags)| (*t, tags.unwrap_or_default())).collect();
            encoded.extend(tokenizer.encode_tagged(&tagged)?);
        }
    }
    let tag_id = tokenizer.tag_id();
    let n_tokens = UInt32Array::from_iter_values(encoded.iter().map(|ids| ids.len() as u32));
    let tag_tokens = UInt32Array::from_iter_values(
        encoded
            .iter()
            .map(|ids| ids.iter().filter(|&&t| Some(t) == tag_id).count() as u32),
    );
    let offsets = OffsetBuffer::from_lengths(encoded.iter().map(Vec::len));
    let values = UInt32Array::from(encoded.into_iter().flatten().collect::<Vec<u32>>());
    let input_ids = ListArray::new(
        schema::token_id_field(DataType::UInt32),
        offsets,
        Arc::new(values),
        None,
    );
    let strings = |a: &Arc<dyn Array>| Arc::new(StringArray::from(a.to_data())) as Arc<dyn Array>;
    Ok(RecordBatch::try_new(
        schema::TOKENS.clone(),
        vec![
            strings(&id),
            strings(&source),
            strings(&kind),
            Arc::new(n_tokens),
            Arc::new(tag_tokens),
            Arc::new(input_ids),
        ],
    )?)
}
