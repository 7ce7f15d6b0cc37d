//! JSON Lines reading: a byte range of a plain file or a whole gzip/zstd file, one record per line.

use super::sink::{Metadata, Reason, Sink, check_text};
use super::{Codec, ExtraColumns, IngestBatch, IngestInput, IngestOptions};
use crate::{OpError, OpResult};
use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange};
use serde_json::Value;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::io::StreamReader;

pub(super) enum Framing {
    Range { start: u64, end: u64 },
    Compressed(Codec),
}

const READ_BUFFER: usize = 1 << 20;

/// Marks an i/o error that came from the object store (retryable), as opposed to bad data.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct StorageFailure(object_store::Error);

/// Splits a read error into "storage failed" (returned) and "the bytes are bad" (quarantined).
fn storage_error(e: io::Error) -> Result<OpError, io::Error> {
    if e.get_ref().is_some_and(|inner| inner.is::<StorageFailure>()) {
        let inner = e.into_inner().expect("checked above");
        let failure = inner.downcast::<StorageFailure>().expect("checked above");
        Ok(OpError::Storage(failure.0))
    } else {
        Err(e)
    }
}

type Lines = Pin<Box<dyn AsyncBufRead + Send>>;

async fn open(input: &IngestInput, framing: &Framing) -> OpResult<Lines> {
    let range = match framing {
        Framing::Range { start, end } if start == end => return Ok(Box::pin(tokio::io::empty())),
        Framing::Range { start, end } => Some(GetRange::Bounded(*start..*end)),
        Framing::Compressed(_) => None,
    };
    let options = GetOptions {
        range,
        ..Default::default()
    };
    let body = input.store.get_opts(&input.path, options).await?;
    let bytes = body.into_stream().map_err(|e| io::Error::other(StorageFailure(e)));
    let raw = BufReader::with_capacity(READ_BUFFER, StreamReader::new(bytes));
    let decoded: Pin<Box<dyn AsyncRead + Send>> = match framing {
        Framing::Range { .. } => return Ok(Box::pin(raw)),
        Framing::Compressed(Codec::Gzip) => {
            let mut decoder = GzipDecoder::new(raw);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Framing::Compressed(Codec::Zstd) => {
            let mut decoder = ZstdDecoder::new(raw);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
    };
    Ok(Box::pin(BufReader::with_capacity(READ_BUFFER, decoded)))
}

enum LineRead {
    Eof,
    /// A line of `len` bytes (newline included) was read whole.
    Line {
        len: usize,
    },
    /// A line of `len` bytes was longer than the cap; only its start was kept.
    TooLong {
        len: usize,
    },
}

struct Reader {
    lines: Option<Lines>,
    input: IngestInput,
    framing: Framing,
    opts: Arc<IngestOptions>,
    sink: Sink,
    /// Offset of the next line's first byte in the (decompressed) file.
    offset: u64,
    done: bool,
    line: Vec<u8>,
}

pub(super) fn read(
    input: IngestInput,
    opts: Arc<IngestOptions>,
    framing: Framing,
) -> BoxStream<'static, OpResult<IngestBatch>> {
    let offset = match framing {
        Framing::Range { start, .. } => start,
        Framing::Compressed(_) => 0,
    };
    let sink = Sink::new(&input, &opts);
    let reader = Reader {
        lines: None,
        input,
        framing,
        opts,
        sink,
        offset,
        done: false,
        line: Vec::new(),
    };
    futures::stream::try_unfold(reader, Reader::next_batch).boxed()
}

impl Reader {
    async fn next_batch(mut self) -> OpResult<Option<(IngestBatch, Reader)>> {
        if self.done {
            return Ok(None);
        }
        if self.lines.is_none() {
            self.lines = Some(open(&self.input, &self.framing).await?);
        }
        while !self.sink.is_full() {
            match self.next_line().await {
                Ok(LineRead::Eof) => {
                    self.done = true;
                    break;
                }
                Ok(LineRead::Line { len }) => {
                    let line = std::mem::take(&mut self.line);
                    self.record(self.offset, &line);
                    self.line = line;
                    self.offset += len as u64;
                }
                Ok(LineRead::TooLong { len }) => {
                    let detail = format!(
                        "line is {len} bytes, over the {} bytes read per record (2 x ingest.max_text_bytes + 1 MiB)",
                        self.opts.max_record_bytes()
                    );
                    self.sink
                        .quarantine(self.offset, Reason::RecordTooLong, &detail, None, Some(&self.line));
                    self.offset += len as u64;
                }
                Err(e) => {
                    let e = match storage_error(e) {
                        Ok(storage) => return Err(storage),
                        Err(e) => e,
                    };
                    let detail = format!(
                        "the stream could not be decoded after byte {} ({e}); the rest of the file is unreadable",
                        self.offset
                    );
                    self.sink
                        .quarantine_rest(self.offset, 1, Reason::CorruptStream, &detail);
                    self.done = true;
                    break;
                }
            }
            // Parsing is CPU work: let other tasks on this thread run between records.
            tokio::task::consume_budget().await;
        }
        let batch = self.sink.flush();
        if self.done && batch.counts.rows_in == 0 {
            return Ok(None);
        }
        Ok(Some((batch, self)))
    }

    /// Reads one line into `self.line`, keeping at most `max_record_bytes` of it.
    async fn next_line(&mut self) -> io::Result<LineRead> {
        let cap = self.opts.max_record_bytes();
        // cannot fail: `next_batch` opens the stream before it reads a line.
        let mut lines = self.lines.as_mut().expect("opened before reading").as_mut();
        self.line.clear();
        let mut len = 0usize;
        let mut too_long = false;
        loop {
            let buf = lines.fill_buf().await?;
            if buf.is_empty() {
                return Ok(match (len, too_long) {
                    (0, _) => LineRead::Eof,
                    (_, true) => LineRead::TooLong { len },
                    _ => LineRead::Line { len },
                });
            }
            let (take, found) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long {
                // cannot underflow: the line is filled to `cap` at most, then `too_long` is set.
                let room = cap - self.line.len();
                if take > room {
                    self.line.extend_from_slice(&buf[..room]);
                    too_long = true;
                } else {
                    self.line.extend_from_slice(&buf[..take]);
                }
            }
            len += take;
            lines.as_mut().consume(take);
            if found {
                return Ok(if too_long {
                    LineRead::TooLong { len }
                } else {
                    LineRead::Line { len }
                });
            }
        }
    }

    /// Turns one line into a document or a quarantine row.
    fn record(&mut self, offset: u64, line: &[u8]) {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        // A UTF-8 byte-order mark (Windows tools write one before the first record; `cat` of
        // such files puts one mid-file) is not part of the record.
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        if body.iter().all(u8::is_ascii_whitespace) {
            return; // a blank line is no record
        }
        let sink = &mut self.sink;
        let quarantine = |sink: &mut Sink, reason, detail: &str, id: Option<&str>| {
            sink.quarantine(offset, reason, detail, id, Some(body))
        };
        let text = match std::str::from_utf8(body) {
            Ok(text) => text,
            Err(e) => {
                let detail = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to());
                // Best effort: name the record by its id if the rest of the line is readable.
                let id = serde_json::from_str::<Value>(&String::from_utf8_lossy(body))
                    .ok()
                    .and_then(|v| v.get(&self.opts.id_column).and_then(Value::as_str).map(str::to_string));
                return quarantine(sink, Reason::InvalidUtf8, &detail, id.as_deref());
            }
        };
        let mut fields = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => fields,
            Ok(other) => {
                let detail = format!("a JSON {} where an object was expected", json_kind(&other));
                return quarantine(sink, Reason::NotAnObject, &detail, None);
            }
            Err(e) => return quarantine(sink, Reason::InvalidJson, &e.to_string(), None),
        };
        let opts = &self.opts;
        let id = match fields.remove(&opts.id_column) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                let detail = format!(
                    "field '{}' is a JSON {}; ids must be strings or numbers",
                    opts.id_column,
                    json_kind(&other)
                );
                return quarantine(sink, Reason::InvalidId, &detail, None);
            }
        };
        let text = match fields.remove(&opts.text_column) {
            None | Some(Value::Null) => {
                let detail = format!(
                    "no '{}' field (or it is null); if the text is in another field, set inputs.columns.text",
                    opts.text_column
                );
                return quarantine(sink, Reason::MissingText, &detail, id.as_deref());
            }
            Some(Value::String(s)) => s,
            Some(other) => {
                let detail = format!(
                    "field '{}' is a JSON {}, not a string",
                    opts.text_column,
                    json_kind(&other)
                );
                return quarantine(sink, Reason::TextNotString, &detail, id.as_deref());
            }
        };
        if let Err((reason, detail)) = check_text(&text, opts.max_text_bytes) {
            return quarantine(sink, reason, &detail, id.as_deref());
        }
        let mut meta = Metadata::default();
        let columns = &opts.metadata_columns;
        for (slot, column) in meta.strings.iter_mut().zip(columns) {
            *slot = match fields.remove(column) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s),
                Some(other) => Some(other.to_string()),
            };
        }
        // cannot fail: `metadata_columns` always holds the 7 mapped names (stages/ingest.rs).
        if let Some(Value::Number(n)) = fields.get(&columns[5]) {
            meta.language_score = n.as_f64();
            fields.remove(&columns[5]);
        }
        if let Some(count) = fields.get(&columns[6]).and_then(Value::as_i64) {
            meta.token_count = Some(count);
            fields.remove(&columns[6]);
        }
        if !fields.is_empty() && opts.extra_columns == ExtraColumns::Keep {
            meta.extra = Some(Value::Object(fields).to_string());
        }
        sink.accept(id, &text, meta);
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
