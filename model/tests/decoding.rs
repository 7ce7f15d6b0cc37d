//! The inference engine on checkpoints the trainer writes: its logits equal the trainer's CPU
//! forward, KV-cache decoding equals recomputation, a batched look-ahead equals one-by-one
//! forwards, and Safe Beam Search on a micro model trained here (the tag always follows two
//! "risky" tokens) drops exactly the riskier half of the candidates each step.

use safepipe_model::llama::{Batch, CpuModel, LlamaConfig, Params};
use safepipe_model::llm::checkpoint::Precision;
use safepipe_model::llm::engine::KvCache;
use safepipe_model::llm::search::{BeamSearch, Decoder, Outcome, TraceEntry};
use safepipe_model::llm::{LlamaEngine, SamplingParams};
use safepipe_model::train::{OptimConfig, Trainer};
use std::path::Path;
use std::sync::atomic::AtomicU64;

const TAG: u32 = 60;
const RISKY: [u32; 2] = [21, 22];

/// A word-level tokenizer.json for the micro vocabulary: `<|endoftext|>` (0), `w1`..`w59`, and
/// the tag (60) as a special token.
fn tokenizer_json() -> serde_json::Value {
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for i in 1..60 {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("<potentially unsafe content>".into(), 60.into());
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<|endoftext|>"), special(60, "<potentially unsafe content>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"}
    })
}

/// Writes a checkpoint as `safepipe train` does (weights, config.json) plus the tokenizer.
fn save(dir: &Path, config: &LlamaConfig, params: Params<f32>) {
    let trainer = Trainer::new(config.clone(), params, OptimConfig::default()).unwrap();
    trainer.save(dir, 0, 0, serde_json::Value::Null).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
}

/// Seeded weights with matrices ten times the usual init (logits of order one) and uneven norms.
fn weights(config: &LlamaConfig, seed: u64) -> Params<f32> {
    let mut p = Params::<f32>::init(config, seed);
    for (name, t, _) in p.tensors_mut() {
        let norm = name.ends_with("norm.weight");
        for (i, x) in t.iter_mut().enumerate() {
            *x = if norm {
                1.0 + ((i * 7 % 11) as f32 - 5.0) / 20.0
            } else {
                *x * 10.0
            };
        }
    }
    p
}

/// A shape whose widths are multiples of 32 (Q8_0 blocks).
fn blocky() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..LlamaConfig::preset("micro").unwrap()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn sequence(len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 37 + 5) % 59 + 1) as u32).collect()
}

#[test]
fn checkpoint_logits_equal_the_trainers_forward() {
    let dir = tempfile::tempdir().unwrap();
    for (name, config) in [("micro", LlamaConfig::preset("micro").unwrap()), ("blocky", blocky())] {
        let path = dir.path().join(name);
        let params = weights(&config, 3);
        save(&path, &config, params.clone());
        let engine = LlamaEngine::load(&path).unwrap();
        assert_eq!(engine.tag_id(), Some(TAG));
        let tokens = sequence(13);
        let out = engine.forward(&[(&engine.new_cache(), &tokens[..12])], true);
        let batch = Batch {
            rows: 1,
            seq_len: 12,
            tokens: tokens.clone(),
            segments: None,
            loss_mask: None,
        };
        let reference = CpuModel::new(config.clone()).unwrap().logits(&params, &batch);
        let spread = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 1.0, "{name}: logits of order one ({spread})");
        let diff = max_diff(&out[0].logits, &reference);
        assert!(diff < 1e-4, "{name}: engine vs trainer {diff}");
    }
}

#[test]
fn q8_0_checkpoints_stay_close_to_f32_and_odd_widths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = blocky();
    save(dir.path(), &config, weights(&config, 5));
    let f32_engine = LlamaEngine::load(dir.path()).unwrap();
    let q8 = LlamaEngine::load_with(dir.path(), Precision::Q8_0).unwrap();
    assert!(q8.identity().ends_with("+q8_0") && !f32_engine.identity().ends_with("+q8_0"));
    let tokens = sequence(16);
    let a = &f32_engine.forward(&[(&f32_engine.new_cache(), &tokens)], true)[0].logits;
    let b = &q8.forward(&[(&q8.new_cache(), &tokens)], true)[0].logits;
    let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_diff(a, b) < 0.05 * spread, "{} vs spread {spread}", max_diff(a, b));

    let micro = LlamaConfig::preset("micro").unwrap();
    let odd = dir.path().join("micro");
    save(&odd, &micro, weights(&micro, 5));
    let err = LlamaEngine::load_with(&odd, Precision::Q8_0).err().unwrap();
    assert!(err.contains("multiple of 32"), "{err}");
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    let config = blocky();
    save(dir.path(), &config, weights(&config, 9));
    for precision in [Precision::F32, Precision::Q8_0] {
        let engine = LlamaEngine::load_with(dir.path(), precision).unwrap();
        let tokens = sequence(20);
        let full = &engine.forward(&[(&engine.new_cache(), &tokens)], true)[0].logits;
        let vocab = config.vocab_size;
        // A prompt in two chunks, then one token at a time.
        let mut cache = engine.new_cache();
        let mut at = 0;
        for chunk in [5, 4, 1, 1, 1, 3, 1, 1, 1, 1, 1] {
            let out = engine.forward(&[(&cache, &tokens[at..at + chunk])], false);
            cache.append(&out[0].delta);
            at += chunk;
            let expected = &full[(at - 1) * vocab..at * vocab];
            assert!(max_diff(&out[0].logits, expected) < 1e-5, "{precision:?} at {at}");
        }
        assert_eq!((at, cache.len()), (20, 20));
    }
}

#[test]
fn a_batched_look_ahead_equals_one_forward_per_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let config = blocky();
    save(dir.path(), &config, weights(&config, 11));
    for precision in [Precision::F32, Precision::Q8_0] {
        let engine = LlamaEngine::load_with(dir.path(), precision).unwrap();
        let prefix = |len: usize| -> KvCache {
            let mut cache = engine.new_cache();
            let out = engine.forward(&[(&cache, &sequence(len)[..])], false);
            cache.append(&out[0].delta);
            cache
        };
        let (a, b) = (prefix(7), prefix(3));
        // Eight candidates on one cache, two on another, and a prompt chunk on a fresh one.
        let fresh = engine.new_cache();
        let candidates: Vec<[u32; 1]> = (0..10).map(|i| [i * 5 + 2]).collect();
        let chunk = sequence(6);
        let mut work: Vec<(&KvCache, &[u32])> = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            work.push((if i < 8 { &a } else { &b }, &c[..]));
        }
        work.push((&fresh, &chunk));
        let together = engine.forward(&work, false);
        for (item, out) in work.iter().zip(&together) {
            let alone = engine.forward(&[*item], false);
            assert_eq!(out.logits, alone[0].logits, "{precision:?}: batching changed a result");
        }
        // A look-ahead leaves its cache as it was: the same item again gives the same logits.
        assert_eq!(a.len(), 7);
        assert_eq!(engine.forward(&[work[0]], false)[0].logits, together[0].logits);
    }
}

/// Sequences over safe words 1..4 and risky words 21, 22: after a safe word or the tag the next
/// word is 21 (p 0.4), 22 (0.2) or one of 1..4 (0.1 each); after a risky word always the tag.
fn risky_corpus(rows: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut tokens = Vec::with_capacity(rows * len);
    for _ in 0..rows {
        let mut prev = 1u32;
        for t in 0..len {
            let token = if t == 0 {
                1 + (next() * 4.0) as u32
            } else if RISKY.contains(&prev) {
                TAG
            } else {
                match next() {
                    u if u < 0.4 => 21,
                    u if u < 0.6 => 22,
                    u => 1 + ((u - 0.6) / 0.1) as u32,
                }
            };
            tokens.push(token);
            prev = token;
        }
    }
    tokens
}

/// A micro model trained on [`risky_corpus`], saved as a checkpoint.
fn trained_micro(dir: &Path) -> LlamaEngine {
    let config = LlamaConfig::preset("micro").unwrap();
    let optim = OptimConfig {
        lr: 2e-2,
        min_lr: 2e-3,
        warmup_steps: 10,
        total_steps: 300,
        weight_decay: 0.0,
        ..OptimConfig::default()
    };
    let mut trainer = Trainer::new(config.clone(), Params::init(&config, 1), optim).unwrap();
    let (rows, seq_len) = (8, 24);
    for step in 0..300 {
        let batch = Batch {
            rows,
            seq_len,
            tokens: risky_corpus(rows, seq_len + 1, step),
            segments: None,
            loss_mask: None,
        };
        trainer
            .train_step(&[batch], &safepipe_model::collective::Single)
            .unwrap();
    }
    save(dir, &config, trainer.params);
    LlamaEngine::load(dir).unwrap()
}

/// P(tag | tokens) under the engine.
fn p_tag(engine: &LlamaEngine, tokens: &[u32]) -> f64 {
    let logits = &engine.forward(&[(&engine.new_cache(), tokens)], false)[0].logits;
    f64::from(safepipe_model::llm::search::log_softmax(logits)[TAG as usize]).exp()
}

/// Drives one search with the engine, one batched forward per step, keeping the trace.
fn drive(engine: &LlamaEngine, decoder: Decoder, prompt: &[u32], max_tokens: usize) -> (Outcome, Vec<Vec<TraceEntry>>) {
    let first = engine.forward(&[(&engine.new_cache(), prompt)], false).remove(0);
    let mut cache = engine.new_cache();
    cache.append(&first.delta);
    let mut search = BeamSearch::new(
        decoder,
        engine.tag_id(),
        engine.stop_ids().to_vec(),
        max_tokens,
        cache,
        &first.logits,
    )
    .unwrap();
    search.trace = Some(Vec::new());
    loop {
        let candidates = match search.propose() {
            Ok(c) => c.to_vec(),
            Err(outcome) => return (outcome, search.trace.take().unwrap()),
        };
        let tokens: Vec<[u32; 1]> = candidates.iter().map(|c| [c.token]).collect();
        let work: Vec<(&KvCache, &[u32])> = candidates
            .iter()
            .zip(&tokens)
            .map(|(c, t)| (search.state(c.beam), &t[..]))
            .collect();
        let looked = engine
            .forward(&work, false)
            .into_iter()
            .map(|o| (o.logits, o.delta))
            .collect();
        search.advance(looked, &mut |parent: &KvCache, delta| {
            let mut c = parent.clone();
            c.append(&delta);
            c
        });
    }
}

#[test]
fn safe_beam_on_a_trained_micro_model_drops_the_riskier_half_and_never_emits_the_tag() {
    let dir = tempfile::tempdir().unwrap();
    let engine = trained_micro(dir.path());
    let prompt = [1u32, 2, 3];
    // The model learned where the tag goes.
    for &r in &RISKY {
        assert!(
            p_tag(&engine, &[1, 2, 3, r]) > 0.8,
            "after {r}: {}",
            p_tag(&engine, &[1, 2, 3, r])
        );
    }
    for s in 1..=4 {
        assert!(p_tag(&engine, &[1, 2, 3, s]) < 0.1, "after {s}");
    }

    let safe = Decoder::SafeBeam {
        beams: 2,
        candidates: 4,
    };
    let (outcome, trace) = drive(&engine, safe, &prompt, 6);
    assert_eq!(trace.len(), 6);
    for (i, step) in trace.iter().enumerate() {
        // The first step extends the prompt alone, then 2 beams x 4 candidates.
        assert_eq!(step.len(), if i == 0 { 4 } else { 8 });
        let kept: Vec<&TraceEntry> = step.iter().filter(|e| e.kept).collect();
        assert_eq!(kept.len(), step.len() / 2);
        let highest_kept = kept.iter().map(|e| e.p_tag).fold(0.0, f64::max);
        for e in step.iter().filter(|e| !e.kept) {
            assert!(e.p_tag >= highest_kept, "{e:?}");
        }
        // Each beam's top four are 21, 22 and two safe words: the risky half is dropped.
        for e in step {
            assert_eq!(e.kept, !RISKY.contains(&e.candidate.token), "{e:?}");
        }
    }
    assert!(
        outcome.tokens.iter().all(|t| !RISKY.contains(t) && *t != TAG),
        "{outcome:?}"
    );

    // Greedy and beam search follow the likelier risky words (and beam search writes the tag).
    let params = |decoder| SamplingParams {
        max_tokens: 6,
        decoder,
        ..SamplingParams::default()
    };
    let requests = vec![
        (prompt.to_vec(), params(Decoder::Sample)),
        (
            prompt.to_vec(),
            SamplingParams {
                max_tokens: 0,
                ..params(safe)
            },
        ),
        (prompt.to_vec(), params(Decoder::Beam { beams: 2 })),
        (prompt.to_vec(), params(safe)),
        (vec![4, 1], params(safe)),
    ];
    let mut results = vec![None; requests.len()];
    engine.generate_ids(&requests, 3, &AtomicU64::new(0), &mut |i, r| {
        results[i] = Some(r.unwrap())
    });
    let mut texts: Vec<String> = results.into_iter().map(|r| r.unwrap().text).collect();
    // max_tokens = 0 asks for nothing and gets nothing.
    assert_eq!(texts.remove(1), "");
    assert!(texts[0].starts_with("w21"), "{texts:?}");
    assert!(texts[1].contains("<potentially unsafe content>"), "{texts:?}");
    // The batched loop gives what the one-search driver gave.
    let words: Vec<String> = outcome.tokens.iter().map(|t| format!("w{t}")).collect();
    assert_eq!(texts[2], words.join(" "));
    assert!(!texts[3].contains("w21") && !texts[3].contains("w22") && !texts[3].contains("potentially"));
}

#[test]
fn bf16_checkpoints_load_and_broken_ones_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = blocky();
    // The weights rounded to bf16, saved once as F32 and once as BF16: the same logits.
    let mut params = weights(&config, 13);
    for (_, t, _) in params.tensors_mut() {
        for x in t.iter_mut() {
            *x = f32::from_bits(x.to_bits() & 0xffff_0000);
        }
    }
    let f32_dir = dir.path().join("f32");
    save(&f32_dir, &config, params.clone());
    let bf16_dir = dir.path().join("bf16");
    save(&bf16_dir, &config, params.clone());
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .tensors()
        .into_iter()
        .map(|(name, t, shape)| {
            (
                name,
                shape,
                t.iter()
                    .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        bf16_dir.join("model.safetensors"),
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
    let tokens = sequence(9);
    let logits = |dir: &Path| {
        let engine = LlamaEngine::load(dir).unwrap();
        engine.forward(&[(&engine.new_cache(), &tokens)], true).remove(0).logits
    };
    assert_eq!(logits(&f32_dir), logits(&bf16_dir));

    // A config that disagrees with the weights, a truncated file, a missing tokenizer.
    let config_json = std::fs::read_to_string(f32_dir.join("config.json")).unwrap();
    std::fs::write(
        f32_dir.join("config.json"),
        config_json.replace("\"hidden_size\": 32", "\"hidden_size\": 64"),
    )
    .unwrap();
    let err = LlamaEngine::load(&f32_dir).err().unwrap();
    assert!(err.contains("shape") && err.contains("config.json needs"), "{err}");
    std::fs::write(f32_dir.join("config.json"), config_json).unwrap();
    let weights_file = f32_dir.join("model.safetensors");
    let bytes = std::fs::read(&weights_file).unwrap();
    std::fs::write(&weights_file, &bytes[..bytes.len() / 2]).unwrap();
    assert!(LlamaEngine::load(&f32_dir).is_err());
    std::fs::write(&weights_file, &bytes).unwrap();
    std::fs::remove_file(f32_dir.join("tokenizer.json")).unwrap();
    let err = LlamaEngine::load(&f32_dir).err().unwrap();
    assert!(err.contains("tokenizer.json"), "{err}");
}
