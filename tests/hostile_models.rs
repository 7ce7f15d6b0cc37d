//! Crafted model files (issue 12, item 2): GGUF, safetensors and classifier manifests from the
//! internet are untrusted. Each malformed file must end in an error naming the field, never a
//! panic, a division by zero or an allocation larger than the file.
//!
//! Repro before the fix: a GGUF whose `llama.attention.head_count` is 0 panicked in
//! `LlamaEngine::load` ("attempt to divide by zero"); a string length of 2^32 - 1 in the header
//! allocated 4 GiB before reading; tensor sizes and offsets were multiplied unchecked.

// The one exception to the workspace's `unsafe_code = "deny"`: a global allocator that
// forwards to the system's and records sizes, to bound what crafted files make us allocate.
#![allow(unsafe_code)]

mod common;

use common::*;
use safepipe_model::gguf::Metadata;
use safepipe_model::llm::shape::EngineShape;
use safepipe_model::rng::SplitMix64;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, recording the largest single allocation the process asked for.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// The mutations are a function of the seed alone.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The header of the real SmolLM2 GGUF (magic, counts, the metadata with its 49k-token
/// vocabulary, the tensor directory) and where its tensor directory starts.
fn real_header() -> (Vec<u8>, usize, u64) {
    let path = std::path::PathBuf::from(gguf());
    let meta = Metadata::read(&path).expect("the real GGUF reads");
    let file_len = std::fs::metadata(&path).unwrap().len();
    let mut header = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(&path).unwrap(), meta.data_offset),
        &mut header,
    )
    .unwrap();
    // The directory starts with the first tensor's name: its u64 length, then its bytes.
    let first = &meta.tensors[0].name;
    let mut needle = (first.len() as u64).to_le_bytes().to_vec();
    needle.extend(first.as_bytes());
    let directory = header
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("the first tensor's name is in the header");
    (header, directory, file_len)
}

/// One to three seeded edits: bit flips, random bytes, and "interesting" 4- and 8-byte values
/// (0, 1, all ones, 2^31, 2^32, 2^63, the file size) at positions in the fixed header, the
/// tensor directory or anywhere; sometimes a truncation.
fn mutate(header: &[u8], directory: usize, file_len: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = header.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = match rng.below(10) {
            0..=2 => rng.below(256.min(out.len())),
            3..=7 if directory < out.len() => directory + rng.below(out.len() - directory),
            _ => rng.below(out.len()),
        };
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next() as u8,
            2 | 3 => {
                let values = [0, 1, u64::MAX, 1 << 31, 1 << 32, 1 << 63, file_len, rng.next()];
                let v = values[rng.below(values.len())].to_le_bytes();
                let end = (at + 8).min(out.len());
                out[at..end].copy_from_slice(&v[..end - at]);
            }
            4 => {
                let values = [0u32, 1, 5, 9, 13, 31, u32::MAX, 1 << 31];
                let v = values[rng.below(values.len())].to_le_bytes();
                let end = (at + 4).min(out.len());
                out[at..end].copy_from_slice(&v[..end - at]);
            }
            _ => out.truncate(at),
        }
        if out.is_empty() {
            break;
        }
    }
    out
}

#[test]
fn thousands_of_mutated_gguf_headers_are_errors_or_valid_never_panics_or_huge_allocations() {
    let (header, directory, file_len) = real_header();
    LARGEST.store(0, Ordering::Relaxed);
    let mutations = 2000;
    let (mut errors, mut valid) = (0, 0);
    let mut panicked = Vec::new();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for seed in 0..mutations {
        let mut rng = Rng(SplitMix64(seed));
        let mutant = mutate(&header, directory, file_len, &mut rng);
        // The mutant stands for the start of a file as long as the real one: the data region
        // is never read here, so checking against the real length needs no 100 MB write.
        let outcome = std::panic::catch_unwind(|| {
            let meta = Metadata::parse(std::io::Cursor::new(&mutant), file_len, "mutant").map_err(|e| e.to_string())?;
            EngineShape::from_metadata(&meta)?;
            safepipe_model::tokenizer::json_from_gguf(&meta)?;
            Ok::<(), String>(())
        });
        match outcome {
            Ok(Ok(())) => valid += 1,
            Ok(Err(e)) => {
                errors += 1;
                assert!(!e.is_empty());
                // The first words of the message, to show which checks the suite reaches.
                let kind: String = e
                    .trim_start_matches("mutant: not a GGUF file (")
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ");
                *kinds.entry(kind).or_default() += 1;
            }
            Err(_) => panicked.push(seed),
        }
    }
    eprintln!(
        "{mutations} mutations: {errors} errors, {valid} still valid; largest allocation {} bytes",
        LARGEST.load(Ordering::Relaxed)
    );
    let mut common: Vec<_> = kinds.into_iter().collect();
    common.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    for (kind, n) in common.iter().take(15) {
        eprintln!("  {n:5}  {kind}");
    }
    assert!(panicked.is_empty(), "seeds that panicked: {panicked:?}");
    assert!(
        errors > mutations as usize / 2,
        "most mutations must be caught: {errors} of {mutations}"
    );
    assert!(
        LARGEST.load(Ordering::Relaxed) as u64 <= file_len,
        "an allocation of {} bytes for a {file_len}-byte file",
        LARGEST.load(Ordering::Relaxed)
    );
}

/// Writes a copy of the real GGUF with `edit` applied to its header bytes.
fn crafted(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let mut bytes = std::fs::read(gguf()).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Overwrites the u32 value of the metadata key `key` (a u32-typed entry) in place.
fn set_u32(bytes: &mut [u8], key: &str, value: u32) {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend(key.as_bytes());
    needle.extend(4u32.to_le_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("key present")
        + needle.len();
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn crafted_gguf_files_fail_the_real_binary_with_an_error_naming_the_field() {
    let tmp = Workspace::new();
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (
            crafted(tmp.path(), "heads0.gguf", |b| {
                set_u32(b, "llama.attention.head_count", 0)
            }),
            "llama.attention.head_count = 0 is outside",
        ),
        (
            crafted(tmp.path(), "heads7.gguf", |b| {
                set_u32(b, "llama.attention.head_count", 7)
            }),
            "not a multiple of head_count 7",
        ),
        (
            crafted(tmp.path(), "ffn.gguf", |b| {
                set_u32(b, "llama.feed_forward_length", 1000)
            }),
            "this model needs [576, 1000]",
        ),
        (
            crafted(tmp.path(), "layers.gguf", |b| set_u32(b, "llama.block_count", 31)),
            "tensor blk.30.attn_norm.weight is missing",
        ),
        (
            crafted(tmp.path(), "short.gguf", |b| b.truncate(b.len() - 4096)),
            "lies past the end of the file",
        ),
        (
            crafted(tmp.path(), "tensors.gguf", |b| {
                b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())
            }),
            "the tensor count is 18446744073709551615, but only",
        ),
    ];
    for (path, expected) in cases {
        let out = safepipe(&["generate", "--model", &path.display().to_string(), "hello"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{}: {stderr}", path.display());
        assert!(!stderr.contains("panicked"), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(expected),
            "{}: expected {expected:?} in {stderr}",
            path.display()
        );
    }
}

/// A checkpoint from elsewhere: its config.json is bounded, and the weights file must be large
/// enough for what it claims before anything is allocated. Repro before the fix: a config.json
/// with `hidden_size = 1048576` made `Trainer::load` allocate terabytes (an abort, not an error).
#[test]
fn crafted_checkpoints_are_refused_before_allocation() {
    use safepipe_model::llama::{LlamaConfig, Params};
    use safepipe_model::train::{OptimConfig, Trainer};
    let ws = Workspace::new();
    let config = LlamaConfig::preset("micro").unwrap();
    let trainer = Trainer::new(config.clone(), Params::<f32>::init(&config, 1), OptimConfig::default()).unwrap();
    let dir = ws.path().join("ckpt");
    trainer.save(&dir, 0, 0, serde_json::Value::Null).unwrap();
    Trainer::load(&dir, OptimConfig::default()).expect("the real checkpoint loads");

    let original = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    for (key, value, expected) in [
        ("hidden_size", 1u64 << 20, "hidden_size = 1048576 is over"),
        ("num_attention_heads", 0, "must be a multiple of num_attention_heads 0"),
        ("vocab_size", 1 << 21, "too small for the"),
    ] {
        let saved = json[key].clone();
        json[key] = value.into();
        if key == "hidden_size" {
            json["head_dim"] = serde_json::Value::Null;
        }
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let err = Trainer::load(&dir, OptimConfig::default()).map(|_| ()).unwrap_err();
        assert!(err.contains(expected), "{key} = {value}: {err}");
        json[key] = saved;
    }
}
