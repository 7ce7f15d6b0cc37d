//! `safepipe eval` over the real binary: held-out prompts never reach the run, a trained
//! checkpoint is continued by every decoder and judged by the demo classifier, the `eval` table
//! and the summary agree, and a run that ingested evaluation prompts is refused.

mod common;

use common::*;
use serde_json::Value;

/// Ham mails, HarmBench and StrongREJECT with holdouts (and `extra_input`); when `train`,
/// tokenized, packed and a tiny model trained on them.
fn config(ws: &Workspace, name: &str, extra_input: &str, train: bool) -> std::path::PathBuf {
    let mut s = format!("run_dir = \"run-{name}\"\n\n");
    for (input, file, fraction) in [
        ("ham", "spamassassin-ham.jsonl", 0.01),
        ("harmbench", "harmbench.parquet", 0.2),
        ("strongreject", "strongreject.jsonl.zst", 0.2),
    ] {
        s.push_str(&format!(
            "[[inputs]]\nname = \"{input}\"\npaths = [{:?}]\nholdout = {{ fraction = {fraction}, seed = 3 }}\n\n",
            sample(file).display().to_string()
        ));
    }
    s.push_str(extra_input);
    if train {
        s.push_str(&format!(
            "[[route.rules]]\nname = \"harmful\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n\
             [tokenize]\ntokenizer = {:?}\n\n[pack]\nseq_len = 63\n\n\
             [train]\nmodel = \"tiny\"\ncheckpoint_dir = \"ckpt-{name}\"\nsteps = 3\nmicro_batch = 2\nlr = 0.01\nseed = 1\n\n",
            gguf()
        ));
    }
    s.push_str(&format!(
        "[eval]\nharmful = [\"harmbench\", \"strongreject\"]\nbenign = [\"ham\"]\nmax_prompts = 4\nmax_tokens = 6\n\
         decoders = [\"greedy\", \"beam\", \"safe-beam\"]\nbeams = 2\ncandidates = 4\nclassifier = {:?}\nbootstrap = 200\n",
        demo_classifier().display().to_string()
    ));
    ws.config(&format!("{name}.toml"), &s)
}

/// Rows of a query as JSON objects.
fn sql_json(config: &std::path::Path, query: &str) -> Vec<Value> {
    let out = safepipe(&["sql", config.to_str().unwrap(), query, "--format", "jsonl"]);
    assert!(out.status.success(), "sql {query:?} failed:\n{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_judges_every_decoder_on_held_out_prompts_only() {
    let ws = Workspace::new();
    let config = config(&ws, "clean", "", true);
    run_ok(&config, &[]);
    // Ingest left the evaluation part out and said so.
    let held = sql_number(
        &config,
        "SELECT sum(rows_dropped) AS n FROM stats WHERE stage = 'ingest' AND dropped_by_rule LIKE '%held_out%'",
    );
    let harmbench = sql_number(
        &config,
        "SELECT count(*) AS n FROM documents WHERE source = 'harmbench'",
    );
    assert!(
        held > 0 && harmbench < 400 && harmbench > 250,
        "{held} held out, {harmbench} harmbench kept"
    );
    let train = safepipe(&["train", config.to_str().unwrap()]);
    assert!(train.status.success(), "{}", text(&train.stderr));

    let summary_md = ws.path().join("summary.md");
    let out = safepipe(&[
        "eval",
        config.to_str().unwrap(),
        "--checkpoint",
        ws.path().join("ckpt-clean").to_str().unwrap(),
        "--out",
        summary_md.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("4 harmful and 4 benign held-out prompts"), "{stderr}");
    for decoder in ["greedy", "beam", "safe-beam"] {
        assert!(stdout.contains(&format!("| {decoder} |")), "{stdout}");
    }
    assert_eq!(std::fs::read_to_string(&summary_md).unwrap().trim(), stdout.trim());

    // The table: 3 decoders x 8 prompts, every continuation judged by the classifier; the held-
    // out ids are not in `documents`.
    let rows = sql_json(
        &config,
        "SELECT decoder, kind, count(*) AS n, count(classifier_score) AS judged FROM eval GROUP BY 1, 2 ORDER BY 1, 2",
    );
    assert_eq!(rows.len(), 6, "{rows:?}");
    for r in &rows {
        assert_eq!((r["n"].as_i64(), r["judged"].as_i64()), (Some(4), Some(4)), "{r}");
    }
    assert_eq!(
        sql_number(
            &config,
            // A held-out request is the start of its harmful prefix: neither its id nor its text
            // is in `documents`.
            "SELECT count(*) AS n FROM eval e JOIN documents d ON e.id = d.id \
             OR (e.kind = 'harmful' AND starts_with(e.prefix, d.text || chr(10) || chr(10)))"
        ),
        0
    );
    // The tag never shows in a safe-beam continuation; every harmful prefix ends with the
    // compliant opening.
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) AS n FROM eval WHERE decoder = 'safe-beam' AND continuation LIKE '%potentially unsafe content%'"
        ),
        0
    );
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) AS n FROM eval WHERE kind = 'harmful' AND prefix NOT LIKE '%Sure, here is a detailed answer.'"
        ),
        0
    );

    // summary.json holds the same rates the table gives.
    let run = ws.path().join("run-clean/eval");
    let folder = std::fs::read_dir(&run).unwrap().next().unwrap().unwrap().path();
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(folder.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["harmful_prompts"], 4);
    let greedy = summary["decoders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["decoder"] == "greedy")
        .unwrap();
    let unsafe_pct = sql_number(
        &config,
        "SELECT CAST(round(100 * avg(CASE WHEN unsafe THEN 1.0 ELSE 0.0 END)) AS BIGINT) AS n FROM eval WHERE decoder = 'greedy' AND kind = 'harmful'",
    );
    let rate = greedy["harmful_unsafe_classifier"]["rate"].as_f64().unwrap();
    assert_eq!((rate * 100.0).round() as i64, unsafe_pct, "{summary}");
    let (low, high) = (
        greedy["harmful_unsafe_classifier"]["low"].as_f64().unwrap(),
        greedy["harmful_unsafe_classifier"]["high"].as_f64().unwrap(),
    );
    assert!(low <= rate && rate <= high, "{summary}");
    // The report's Evaluation section shows the same figures.
    let page = ws.path().join("report.html");
    let out = safepipe(&["report", config.to_str().unwrap(), "--out", page.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    let name = summary["name"].as_str().unwrap();
    let key = format!("data-metric=\"eval.{name}.greedy.harmful_unsafe\" data-value=\"");
    let shown: f64 = html
        .split(&key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in the report"))
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((shown - rate).abs() < 1e-9, "report {shown} vs summary {rate}");
    let auroc = summary["tag_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc), "{summary}");
    assert!(summary["safe_perplexity"].as_f64().unwrap() > 1.0, "{summary}");
}

#[test]
fn eval_refuses_a_run_that_ingested_evaluation_prompts() {
    let ws = Workspace::new();
    // The same HarmBench file again under another name, without a holdout: its held-out prompts
    // reach `documents`.
    let copy = format!(
        "[[inputs]]\nname = \"harmbench-copy\"\npaths = [{:?}]\n\n",
        sample("harmbench.parquet").display().to_string()
    );
    let config = config(&ws, "leaky", &copy, false);
    run_ok(&config, &[]);
    let out = safepipe(&["eval", config.to_str().unwrap(), "--checkpoint", "nowhere"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("contaminated") && stderr.contains("harmbench-copy"),
        "{stderr}"
    );

    // An evaluated input without a holdout is a configuration error naming it.
    let s = std::fs::read_to_string(&config)
        .unwrap()
        .replace("benign = [\"ham\"]", "benign = [\"harmbench-copy\"]");
    std::fs::write(&config, s).unwrap();
    let out = safepipe(&["eval", config.to_str().unwrap(), "--checkpoint", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"harmbench-copy\", which has no holdout"),
        "{}",
        text(&out.stderr)
    );
}
