//! Every table's columns, defined once. docs/schema.md describes the same tables for users; a
//! test in `tests/` checks the committed Parquet files against these schemas.

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use std::sync::{Arc, LazyLock};

/// The FineWeb metadata fields carried in `documents.metadata`, with their Arrow types.
/// `extra` holds any other input field as a JSON object (null when there were none).
pub const METADATA_FIELDS: [(&str, DataType); 8] = [
    ("dump", DataType::Utf8),
    ("url", DataType::Utf8),
    ("date", DataType::Utf8),
    ("file_path", DataType::Utf8),
    ("language", DataType::Utf8),
    ("language_score", DataType::Float64),
    ("token_count", DataType::Int64),
    ("extra", DataType::Utf8),
];

pub fn metadata_fields() -> Fields {
    METADATA_FIELDS
        .iter()
        .map(|(name, ty)| Field::new(*name, ty.clone(), true))
        .collect()
}

/// `documents`: one row per usable input record.
pub static DOCUMENTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("metadata", DataType::Struct(metadata_fields()), false),
    ]))
});

/// `synthetic`: one row per generation task of the synthesize stage (SafeWeb rephrasings,
/// RefuseWeb dialogues, Moral Education articles), kept or not (`keep`, `gates`), and failed
/// requests (`text` null, `finish_reason` = `error`, `error` says why).
pub static SYNTHETIC: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("parent_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("style", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, false),
        Field::new("template", DataType::Utf8, false),
        Field::new("finish_reason", DataType::Utf8, false),
        Field::new("prompt_tokens", DataType::UInt32, false),
        Field::new("completion_tokens", DataType::UInt32, false),
        Field::new("gates", DataType::Utf8, false),
        Field::new("keep", DataType::Boolean, false),
        Field::new("error", DataType::Utf8, true),
    ]))
});

/// `llm_scores`: the annotate stage's rubric score per document, in document order, and the
/// ensemble max(classifier, LLM).
pub static LLM_SCORES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("classifier_score", DataType::UInt8, true),
        Field::new("llm_score", DataType::UInt8, true),
        Field::new("ensemble", DataType::UInt8, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("answer", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, false),
        Field::new("template", DataType::Utf8, false),
    ]))
});

/// `quarantine`: one row per record (or per unreadable file / row group) that could not be used.
pub static QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("unit", DataType::UInt32, false),
        // Byte offset of the line in the (decompressed) file for JSON Lines, row index in the
        // file for Parquet; null when the problem is the whole file.
        Field::new("offset", DataType::UInt64, true),
        // How many input records this row stands for (1 for one record).
        Field::new("records", DataType::UInt64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, true),
        // The first bytes of the record, lossily decoded, to see what was wrong.
        Field::new("raw", DataType::Utf8, true),
    ]))
});

/// The element field of `scores.probs`.
pub fn probability_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

/// `scores`: the safety classifier's verdict, one row per document in `documents` order.
pub static SCORES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        // 0..5: the score of the worst chunk's most probable label.
        Field::new("score", DataType::UInt8, false),
        // The worst chunk's label probabilities (sum 1).
        Field::new("probs", DataType::List(probability_field()), false),
        // The worst chunk's expected score, sum(p_i * score_i).
        Field::new("expected", DataType::Float32, false),
        // Chunks of the model's length the document was split into (0: no tokens at all).
        Field::new("chunks", DataType::UInt32, false),
        // The document's tokens under the classifier's tokenizer (special tokens not counted).
        Field::new("tokens", DataType::UInt64, false),
        // `name@precision` of the classifier.
        Field::new("model", DataType::Utf8, false),
    ]))
});

/// `routes`: one row per document, the route the first matching rule chose.
pub static ROUTES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("route", DataType::Utf8, false),
        // The rule that matched; null when no rule matched and the default route applied.
        Field::new("rule", DataType::Utf8, true),
        // Also keep the raw text with harmfulness tags (the rule's `also_tag`; true for `tag`).
        Field::new("also_tag", DataType::Boolean, false),
    ]))
});

/// `tagged`: documents routed `tag` (or with `also_tag`), with the harmfulness tag inserted between words.
pub static TAGGED: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        // The text with tags; removing every tag string gives back `documents.text` exactly.
        Field::new("text", DataType::Utf8, false),
        // Whitespace-delimited words of the original text.
        Field::new("words", DataType::UInt32, false),
        Field::new("tags_inserted", DataType::UInt32, false),
        // Byte offsets in `text` where each inserted tag starts: tokenize turns exactly these
        // into the tag id (a tag string that was in the document already stays text).
        Field::new("tag_offsets", DataType::new_list(DataType::UInt32, true), false),
    ]))
});

/// The element field of `tokens.input_ids`.
pub fn token_id_field(ty: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", ty, false))
}

/// `tokens`: one row per document that goes to training, its token ids with EOS appended.
pub static TOKENS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        // What the text is: `raw` (a document kept as is), `tagged` (with harmfulness tags);
        // synthetic kinds (`safeweb`, `refuseweb`, `moral`) come with the synthesis stages.
        Field::new("kind", DataType::Utf8, false),
        Field::new("n_tokens", DataType::UInt32, false),
        // How many of the ids are the tag token.
        Field::new("tag_tokens", DataType::UInt32, false),
        Field::new("input_ids", DataType::List(token_id_field(DataType::UInt32)), false),
    ]))
});

/// `shards`: one row per packed training sequence of exactly `seq_len + 1` tokens.
pub fn shards_schema(id_type: DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(token_id_field(id_type)), false),
        // Start offset of every document segment in the sequence (the first is always 0).
        Field::new(
            "doc_offsets",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        ),
        // The mixture source of each segment, aligned with `doc_offsets`.
        Field::new(
            "sources",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
            false,
        ),
        // Whether the first segment continues a document begun in the previous sequence.
        Field::new("continues", DataType::Boolean, false),
    ]))
}
