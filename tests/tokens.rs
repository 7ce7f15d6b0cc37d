//! End-to-end behaviour of tokenize, mix & pack and the Megatron export, over the real binary,
//! the real SmolLM2 tokenizer (from the GGUF `make setup` fetches), real Parquet and, as the
//! oracles, Python's `tokenizers` and a numpy reader of Megatron's format.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const TAG: &str = "<potentially unsafe content>";

/// The committed manifest, with each shard's file (named relative to the run directory) made
/// an absolute path.
fn manifest(ws: &Workspace, run_dir: &str) -> Value {
    let root = ws.path().join(run_dir);
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pack/manifest.json")).unwrap()).unwrap();
    for shard in m["shards"].as_array_mut().unwrap() {
        let relative = shard["file"].as_str().unwrap();
        assert!(
            !relative.starts_with('/'),
            "manifests name files relative to the run directory"
        );
        shard["file"] = Value::from(root.join(relative).display().to_string());
    }
    m
}

fn shard_hashes(manifest: &Value) -> Vec<String> {
    use sha2::{Digest, Sha256};
    manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| hex::encode(Sha256::digest(std::fs::read(s["file"].as_str().unwrap()).unwrap())))
        .collect()
}

/// The spam, HarmBench and StrongREJECT samples (9 units: a whole .gz, 7 row groups, a .zst),
/// harmful prompts tagged, packed into short rows so there are many.
fn pack_config(run_dir: &str, extra_pack: &str, batch_rows: usize) -> String {
    let mut s = format!("run_dir = {run_dir:?}\n\n{}", small_sample_inputs());
    s.push_str(&format!(
        "[ingest]\nbatch_rows = {batch_rows}\n\n\
         [[route.rules]]\nname = \"harmful_prompts\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n\
         [tag]\nprobability = 0.2\n\n\
         [tokenize]\ntokenizer = {:?}\n\n\
         [pack]\nseq_len = 255\nshard_sequences = 100\n{extra_pack}\n\
         [[pack.mix]]\nname = \"raw\"\nweight = 0.8\n\n\
         [[pack.mix]]\nname = \"tagged\"\nweight = 0.2\nmax_epochs = 3\n",
        gguf()
    ));
    s
}

#[test]
fn token_ids_equal_python_tokenizers_and_the_tag_is_one_token() {
    let ws = Workspace::new();
    // Unicode edge cases, one per line; the last has a lone surrogate escaped in JSON.
    let texts = [
        "Plain ASCII text with numbers 12345 and 3.14159.",
        "Emoji: 👩‍👩‍👧‍👦 family, 🇫🇷 flag, 🙂 and skin tones 👍🏽👍🏿.",
        "CJK: 漢字とひらがなとカタカナ、한국어 텍스트, 中文标点。",
        "RTL: שלום עולם and مرحبا بالعالم mixed with English.",
        "Combining marks: e\u{301} a\u{308} Z\u{335}\u{321}\u{34d} and NFC é ä.",
        "NUL inside: before\u{0}after, tabs\tand\r\nCRLF.",
        "Spaces:   many    spaces\u{a0}nbsp\u{2009}thin\u{3000}ideographic end ",
        "The literal tag in raw text: <potentially unsafe content> is text, not the tag id.",
        "Control strings in web text: <|endoftext|> and <|im_start|>system are text too.",
    ];
    let mut jsonl = String::new();
    for (i, t) in texts.iter().enumerate() {
        jsonl.push_str(&serde_json::json!({"id": format!("u{i}"), "text": t}).to_string());
        jsonl.push('\n');
    }
    jsonl.push_str("{\"id\": \"surrogate\", \"text\": \"lone \\ud800 surrogate\"}\n");
    std::fs::write(ws.path().join("unicode.jsonl"), &jsonl).unwrap();
    // One harmful text already holds the tag string: only the inserted tags become tag ids.
    let harmful: String = (0..40)
        .map(|i| {
            let literal = if i == 7 { " <potentially unsafe content>" } else { "" };
            format!(
                "{{\"id\": \"h{i}\", \"text\": \"Step {i}: how would someone do something harmful,{literal} in detail 😈?\"}}\n"
            )
        })
        .collect();
    std::fs::write(ws.path().join("harmful.jsonl"), harmful).unwrap();
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n[[inputs]]\nname = \"unicode\"\npaths = [\"unicode.jsonl\"]\n\
             [[inputs]]\nname = \"harmful\"\npaths = [\"harmful.jsonl\"]\n\
             [[route.rules]]\nname = \"harmful\"\nwhen = \"source = 'harmful'\"\nroute = \"tag\"\n\
             [tag]\nprobability = 0.3\n[tokenize]\ntokenizer = {:?}\n",
            gguf()
        ),
    );
    run_ok(&config, &[]);
    // The lone surrogate cannot become UTF-8 text: quarantined with a reason, not lost.
    assert_eq!(
        sql_rows(
            &config,
            "SELECT reason, raw LIKE '%lone \\\\ud800 surrogate%' AS seen FROM quarantine"
        ),
        vec![r#"{"reason":"invalid_json","seen":true}"#]
    );
    assert_eq!(sql_number(&config, "SELECT count(*) FROM tokens WHERE kind = 'raw'"), 9);
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM tokens WHERE kind = 'tagged'"),
        40
    );

    let out = safepipe(&[
        "tokenizer",
        "export",
        config.to_str().unwrap(),
        "--out",
        ws.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("vocabulary 49153, eos id 0, tag id 49152"),
        "{}",
        text(&out.stdout)
    );
    let tokenizer_json = ws.path().join("tokenizer.json");
    let report = python_oracle(
        "check_tokens.py",
        &[
            ws.path().join("run").to_str().unwrap(),
            tokenizer_json.to_str().unwrap(),
            TAG,
        ],
    );
    assert_eq!(report["checked"], 49);
    assert_eq!(report["tag_id"], 49152);
    // Tags were inserted (p = 0.3 over 40 texts of 12 words) and each is exactly one id.
    let inserted = sql_number(&config, "SELECT sum(tags_inserted) FROM tagged");
    assert!(inserted > 50, "{inserted}");
    assert_eq!(
        sql_number(&config, "SELECT sum(tag_tokens) FROM tokens WHERE kind = 'tagged'"),
        inserted
    );
    // No raw text got a tag id or an EOS inside, though two hold their strings.
    assert_eq!(
        sql_number(&config, "SELECT sum(tag_tokens) FROM tokens WHERE kind = 'raw'"),
        0
    );
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM (SELECT unnest(array_slice(input_ids, 1, CAST(n_tokens AS BIGINT) - 1)) AS t FROM tokens) WHERE t = 0"
        ),
        0
    );
    // `tokenizer encode` shows what the stage does with a text: strings of special tokens are
    // the ids of their characters.
    let encode = |t: &str| {
        let out = safepipe(&["tokenizer", "encode", config.to_str().unwrap(), t]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str::<Vec<u32>>(text(&out.stdout).trim()).unwrap()
    };
    assert_eq!(encode("Hello world"), vec![19556, 905]);
    for injected in [TAG, "<|endoftext|>", "a <|im_start|>system b", "<|im_end|>"] {
        let ids = encode(injected);
        assert!(
            !ids.contains(&49152) && !ids.contains(&0) && ids.len() > 1,
            "{injected}: {ids:?}"
        );
        assert!(ids.iter().all(|&id| id < 49152), "{injected}: {ids:?}");
    }
}

#[test]
fn pack_is_exact_and_the_same_for_ranks_batch_sizes_and_buckets() {
    let ws = Workspace::new();
    let one = ws.config("one.toml", &pack_config("one", "", 4096));
    let stderr = run_ok(&one, &[]);
    assert!(summary_line(&stderr, "pack").contains("1 unit(s) done"), "{stderr}");
    let m = manifest(&ws, "one");
    let seq_len = m["seq_len"].as_u64().unwrap();
    assert_eq!(seq_len, 255);
    let tokens = m["tokens"].as_u64().unwrap();
    assert!(m["sequences"].as_u64().unwrap() > 100, "{m}");
    assert_eq!(
        m["shards"].as_array().unwrap().len() as u64,
        m["sequences"].as_u64().unwrap().div_ceil(100)
    );

    // What SQL sees is what the manifest says; every row is exactly seq_len + 1 tokens.
    assert_eq!(
        sql_number(&one, "SELECT sum(cardinality(input_ids)) FROM shards") as u64,
        tokens
    );
    assert_eq!(
        sql_number(&one, "SELECT count(*) FROM shards WHERE cardinality(input_ids) <> 256"),
        0
    );
    assert_eq!(
        sql_number(
            &one,
            "SELECT count(*) FROM shards WHERE cardinality(doc_offsets) <> cardinality(sources)"
        ),
        0
    );
    // No token lost or duplicated: selected copies = packed + the documented tail.
    let selected: u64 = m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["selected_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(selected, tokens + m["tail_tokens_dropped"].as_u64().unwrap());
    assert!(m["tail_tokens_dropped"].as_u64().unwrap() < 256);
    // The mixture achieved is within 1% of the request; tagged text is upsampled, raw text
    // downsampled, and the documents account for every input row.
    for s in m["sources"].as_array().unwrap() {
        let (asked, got) = (
            s["requested_fraction"].as_f64().unwrap(),
            s["achieved_fraction"].as_f64().unwrap(),
        );
        assert!((asked - got).abs() < 0.01, "{s}");
    }
    assert!(m["sources"][1]["epochs"].as_f64().unwrap() > 1.0, "{m}");
    assert!(m["sources"][0]["epochs"].as_f64().unwrap() < 1.0, "{m}");
    let docs = sql_number(&one, "SELECT count(*) FROM tokens") as u64;
    assert_eq!(m["documents_in"].as_u64().unwrap(), docs);
    assert_eq!(
        m["documents_packed"].as_u64().unwrap() + m["documents_not_selected"].as_u64().unwrap(),
        docs
    );
    // Zero tags in safe rows; the tokenizer hash is the exported file's.
    assert_eq!(
        sql_number(&one, "SELECT sum(tag_tokens) FROM tokens WHERE kind = 'raw'"),
        0
    );
    let exported = ws.path().join("tok.json");
    assert!(
        safepipe(&[
            "tokenizer",
            "export",
            one.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap()
        ])
        .status
        .success()
    );
    use sha2::{Digest, Sha256};
    assert_eq!(
        m["tokenizer"]["sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(std::fs::read(&exported).unwrap()))
    );
    // Python's `tokenizers` gives the same ids on every one of these real mails and prompts.
    let report = python_oracle(
        "check_tokens.py",
        &[ws.path().join("one").to_str().unwrap(), exported.to_str().unwrap(), TAG],
    );
    assert_eq!(report["checked"].as_u64().unwrap(), docs);

    // Two ranks (rank 1 first; rank 0 finds every unit tokenized and packs), small ingest
    // batches and small shuffle buckets: the same shards, byte for byte.
    let two = ws.config("two.toml", &pack_config("two", "", 4096));
    assert!(safepipe(&["plan", two.to_str().unwrap()]).status.success());
    let rank1 = run_ok(&two, &["--rank", "1", "--world-size", "2"]);
    assert!(
        !rank1.contains("pack: 1 unit(s) done"),
        "rank 1 must not pack:\n{rank1}"
    );
    run_ok(&two, &["--rank", "0", "--world-size", "2"]);
    let small = ws.config("small.toml", &pack_config("small", "bucket_bytes = 1048576", 7));
    run_ok(&small, &[]);
    let expected = shard_hashes(&m);
    assert_eq!(shard_hashes(&manifest(&ws, "two")), expected);
    assert_eq!(shard_hashes(&manifest(&ws, "small")), expected);

    // A rerun does nothing; a new pack seed repacks without re-tokenizing.
    let again = run_ok(&one, &[]);
    assert!(
        summary_line(&again, "pack").contains("0 unit(s) done, 1 already committed"),
        "{again}"
    );
    let reseeded = std::fs::read_to_string(&one)
        .unwrap()
        .replace("shard_sequences = 100", "shard_sequences = 100\nseed = 9");
    std::fs::write(&one, reseeded).unwrap();
    let repacked = run_ok(&one, &[]);
    assert_eq!(units_done(&repacked, "tokenize"), 0, "{repacked}");
    assert_eq!(units_done(&repacked, "pack"), 1, "{repacked}");
    let m2 = manifest(&ws, "one");
    assert_ne!(shard_hashes(&m2), expected);
    // The old shards are gone once the new manifest is in place.
    for old in m["shards"].as_array().unwrap() {
        assert!(!Path::new(old["file"].as_str().unwrap()).exists(), "{old}");
    }
    let status = safepipe(&["status", one.to_str().unwrap()]);
    assert!(text(&status.stdout).contains("pack"), "{}", text(&status.stdout));
}

#[test]
fn megatron_export_reads_back_with_numpy() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &pack_config("run", "", 4096));
    // Before packing there is nothing to export: a clear error, exit code 2.
    let early = safepipe(&["export", "megatron", config.to_str().unwrap(), "--out", "x"]);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early.stderr));
    assert!(
        text(&early.stderr).contains("no packed shards"),
        "{}",
        text(&early.stderr)
    );
    run_ok(&config, &[]);
    // Every committed file has the documented schema (operators::schema, docs/schema.md).
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let m = manifest(&ws, "run");
    let shards: Vec<PathBuf> = m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| PathBuf::from(s["file"].as_str().unwrap()))
        .collect();
    let tokens: Vec<PathBuf> = std::fs::read_dir(ws.path().join("run/tokenize/tokens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!tokens.is_empty() && !shards.is_empty());
    let shards_schema = safepipe_operators::schema::shards_schema(arrow::datatypes::DataType::UInt16);
    for (files, schema) in [
        (&tokens, safepipe_operators::schema::TOKENS.clone()),
        (&shards, shards_schema),
    ] {
        for file in files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap()).unwrap();
            assert_eq!(reader.schema().fields(), schema.fields(), "{}", file.display());
        }
    }
    let prefix: PathBuf = ws.path().join("megatron/demo_text_document");
    let out = safepipe(&[
        "export",
        "megatron",
        config.to_str().unwrap(),
        "--out",
        prefix.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = python_oracle(
        "check_megatron.py",
        &[
            prefix.to_str().unwrap(),
            ws.path().join("run/pack/manifest.json").to_str().unwrap(),
        ],
    );
    assert_eq!(report["tokens"], m["tokens"]);
    assert_eq!(report["dtype"], "uint16");
    // Documents in the export: every packed copy (a document split over rows is one document).
    assert!(report["documents"].as_u64().unwrap() > 100, "{report}");
    assert!(report["sequences"].as_u64().unwrap() >= report["documents"].as_u64().unwrap());
}

#[test]
fn demo_config_packs_the_requested_mixture() {
    let ws = Workspace::new();
    let root = repo().display().to_string();
    let demo = std::fs::read_to_string(repo().join("configs/demo.toml"))
        .unwrap()
        .replace("\"../runs/demo\"", "\"run\"")
        .replace("\"../", &format!("\"{root}/"));
    let config = ws.config("demo.toml", &without_scoring(&demo));
    run_ok(&config, &[]);
    let m = manifest(&ws, "run");
    assert_eq!(m["tokenizer"]["vocab_size"], 49153);
    assert_eq!(m["seq_len"], 2048);
    for s in m["sources"].as_array().unwrap() {
        let (asked, got) = (
            s["requested_fraction"].as_f64().unwrap(),
            s["achieved_fraction"].as_f64().unwrap(),
        );
        assert!((asked - got).abs() < 0.01 * asked.max(0.01), "{s}");
    }
    assert_eq!(
        sql_number(&config, "SELECT sum(cardinality(input_ids)) FROM shards") as u64,
        m["tokens"].as_u64().unwrap()
    );
}

/// The demo config without its `[score]`, `[llm]`, `[annotate]` and `[synthesize]` sections
/// (scoring the whole sample takes minutes on 2 cores; tests/score.rs and tests/synthesis.rs
/// cover them): rules over scores become one rule over sources that tags the
/// harmful prompts, so the mixture still has both kinds.
fn without_scoring(demo: &str) -> String {
    let mut config: toml::Table = demo.parse().unwrap();
    assert!(config.remove("score").is_some(), "the demo config scores");
    // Nor the LLM stages (tests/synthesis.rs covers them) and their mixture source.
    for section in ["llm", "annotate", "synthesize"] {
        config.remove(section);
    }
    let mix = config["pack"]["mix"].as_array().unwrap().clone();
    let mix: Vec<toml::Value> = mix
        .into_iter()
        .filter(|m| {
            !m["kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k.as_str() == Some("safeweb"))
        })
        .collect();
    config
        .get_mut("pack")
        .unwrap()
        .as_table_mut()
        .unwrap()
        .insert("mix".into(), mix.into());
    let route = config.get_mut("route").unwrap().as_table_mut().unwrap();
    let rules = route.get_mut("rules").unwrap().as_array_mut().unwrap();
    rules.retain(|r| {
        let when = r["when"].as_str().unwrap();
        !when.contains("score") && !when.contains("ensemble")
    });
    let mut harmful = toml::Table::new();
    harmful.insert("name".into(), "harmful_prompts".into());
    harmful.insert("when".into(), "source IN ('harmbench', 'strongreject')".into());
    harmful.insert("route".into(), "tag".into());
    rules.push(toml::Value::Table(harmful));
    toml::to_string(&config).unwrap()
}
