//! The docs say what the code does today: every command and flag the docs show exists in the
//! real binary, every table they name is a table of a run, every config key they document is
//! one the config reader knows, and the engine's module map lists every module.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// README.md, CONTRIBUTING.md, deploy/README.md and docs/*.md (ADRs and BENCHMARKS record the
/// past and are left out).
fn doc_files() -> Vec<std::path::PathBuf> {
    let mut files = vec![
        repo().join("README.md"),
        repo().join("CONTRIBUTING.md"),
        repo().join("deploy/README.md"),
    ];
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".md") && name != "BENCHMARKS.md" {
            files.push(path);
        }
    }
    files
}

fn help(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "safepipe {args:?} --help: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The subcommands a `--help` lists.
fn subcommands(args: &[&str]) -> BTreeSet<String> {
    help(args)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Every `safepipe WORD ...` the docs show (in code spans or code blocks), as the words up to
/// the first argument, and the flags on the same span or line.
fn documented_invocations() -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut found = Vec::new();
    for file in doc_files() {
        let body = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let mut in_block = false;
        for line in body.lines() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
                continue;
            }
            // Code: a code block's lines, or the code spans of a prose line.
            let code: Vec<&str> = if in_block {
                vec![line]
            } else {
                line.split('`').skip(1).step_by(2).collect()
            };
            for piece in code {
                let mut rest = piece;
                while let Some(at) = rest.find("safepipe ") {
                    let before = rest[..at].chars().last();
                    let after = &rest[at + "safepipe ".len()..];
                    rest = after;
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '/' || c == '_') {
                        continue;
                    }
                    let span: &str = after.split(['`', '|', '#', ';']).next().unwrap_or_default();
                    let words: Vec<String> = span
                        .split_whitespace()
                        .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                        .map(str::to_string)
                        .collect();
                    if words.is_empty() {
                        continue;
                    }
                    let flags = span
                        .split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == '=')
                        .filter(|w| w.starts_with("--") && w.len() > 2)
                        .map(|w| w.trim_end_matches(['.', ',', ')']).to_string())
                        .collect();
                    found.push((name.clone(), words, flags));
                }
            }
        }
    }
    found
}

#[test]
fn every_documented_command_and_flag_exists() {
    let top = subcommands(&[]);
    let invocations = documented_invocations();
    assert!(
        invocations.len() > 20,
        "too few commands found in the docs: {invocations:?}"
    );
    for (file, words, flags) in invocations {
        assert!(
            top.contains(&words[0]),
            "{file}: `safepipe {}` is not a command (commands: {top:?})",
            words.join(" ")
        );
        // The deepest subcommand the words name.
        let mut path: Vec<&str> = vec![words[0].as_str()];
        for w in &words[1..] {
            if subcommands(&path).contains(w) {
                path.push(w);
            } else {
                break;
            }
        }
        let text = help(&path);
        for flag in flags {
            assert!(
                text.contains(&format!("{flag} "))
                    || text.contains(&format!("{flag}\n"))
                    || text.contains(&format!("{flag}=")),
                "{file}: `safepipe {}` documents {flag}, which `safepipe {} --help` does not list",
                words.join(" "),
                path.join(" ")
            );
        }
    }
}

/// A config with every optional section, so every table can exist.
fn full_config(ws: &Workspace) -> std::path::PathBuf {
    ws.config(
        "full.toml",
        &format!(
            "run_dir = \"run\"\n{}\
             [score]\nmodel = {:?}\n\n\
             [llm]\nbackend = \"in-process\"\nmodel = {:?}\n\n[annotate]\n\n[synthesize]\n\n\
             [tokenize]\ntokenizer = {:?}\n\n[pack]\n",
            small_sample_inputs(),
            demo_classifier().display().to_string(),
            gguf(),
            gguf()
        ),
    )
}

#[test]
fn every_documented_table_exists() {
    let ws = Workspace::new();
    let config = full_config(&ws);
    let tables: BTreeSet<String> = sql_rows(&config, "SHOW TABLES")
        .iter()
        .map(|row| {
            serde_json::from_str::<serde_json::Value>(row).unwrap()["table_name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let schema = std::fs::read_to_string(repo().join("docs/schema.md")).unwrap();
    let mut documented: Vec<String> = schema
        .lines()
        .filter_map(|l| l.strip_prefix("## `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let listed = readme
        .lines()
        .find(|l| l.contains("Tables: "))
        .expect("the README lists the tables");
    documented.extend(
        listed
            .split("Tables: ")
            .nth(1)
            .unwrap()
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string),
    );
    assert!(documented.len() >= 20, "{documented:?}");
    for table in documented {
        assert!(
            tables.contains(&table),
            "the docs name table {table:?}; a run has {tables:?}"
        );
    }
}

/// (section, key) for every key documented in a table row of `file` under a `## [section]` or
/// `[[section]]` heading (docs/config.md; docs/training.md for `[train]`).
fn documented_keys(file: &Path, only: Option<&str>) -> Vec<(String, String)> {
    let body = std::fs::read_to_string(file).unwrap();
    let mut section: Option<String> = None;
    let mut keys = Vec::new();
    for line in body.lines() {
        let heading = line.starts_with("## ") || line.starts_with("Each `[[") || line.starts_with("`[[");
        if heading {
            section = if line.contains("Top level") {
                Some(String::new())
            } else {
                line.split('`')
                    .nth(1)
                    .filter(|s| s.starts_with('['))
                    .map(|s| s.trim_matches(['[', ']']).to_string())
            };
            if let Some(fixed) = only {
                section = section.map(|_| fixed.to_string());
            }
            continue;
        }
        let Some(section) = &section else { continue };
        let Some(cell) = line.strip_prefix("| `") else { continue };
        let first = cell.split(" |").next().unwrap_or_default();
        let mut prefix = String::new();
        for key in first.split('`').step_by(2).map(|k| k.trim_matches([',', ' '])) {
            if key.is_empty() || key == "key" {
                continue;
            }
            // `columns.dump`, `.url`, ...: later keys share the first one's prefix.
            let key = if let Some(rest) = key.strip_prefix('.') {
                format!("{prefix}{rest}")
            } else {
                if let Some(dot) = key.rfind('.') {
                    prefix = key[..=dot].to_string();
                }
                key.to_string()
            };
            keys.push((section.clone(), key));
        }
    }
    keys
}

#[test]
fn every_documented_config_key_is_known() {
    let ws = Workspace::new();
    let mut keys = documented_keys(&repo().join("docs/config.md"), None);
    keys.extend(documented_keys(&repo().join("docs/training.md"), Some("train")));
    assert!(keys.len() > 60, "{keys:?}");
    let inputs = "[[inputs]]\nname = \"a\"\npaths = [\"x.jsonl\"]\n";
    for (i, (section, key)) in keys.iter().enumerate() {
        // The key with a value of the wrong type: a known key fails on its type (or passes),
        // an unknown one fails as unknown.
        let body = match section.as_str() {
            "" if key == "run_dir" => format!("run_dir = []\n{inputs}"),
            "" => format!("run_dir = \"run\"\n{key} = []\n{inputs}"),
            "inputs" => format!("run_dir = \"run\"\n[[inputs]]\n{key} = []\n"),
            s if s.ends_with("rules") || s.ends_with("mix") => {
                format!("run_dir = \"run\"\n{inputs}[[{s}]]\n{key} = []\n")
            }
            s => format!("run_dir = \"run\"\n{inputs}[{s}]\n{key} = []\n"),
        };
        let config = ws.config(&format!("key-{i}.toml"), &body);
        let out = safepipe(&["plan", config.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("unknown field"),
            "docs/config.md documents [{section}] {key}, which the config reader does not know:\n{stderr}"
        );
    }
    // The check can fail: an undocumented, unknown key is refused as unknown.
    let config = ws.config(
        "unknown.toml",
        &format!("run_dir = \"run\"\n{inputs}[pack]\nnot_a_key = []\n"),
    );
    assert!(text(&safepipe(&["plan", config.to_str().unwrap()]).stderr).contains("unknown field"));
}

#[test]
fn the_module_maps_list_every_module() {
    for (lib, dir) in [
        ("pipeline/src/lib.rs", "pipeline/src"),
        ("pipeline/src/pack/mod.rs", "pipeline/src/pack"),
        ("model/src/cuda/mod.rs", "model/src/cuda"),
        ("model/src/cuda/check/mod.rs", "model/src/cuda/check"),
    ] {
        let map = std::fs::read_to_string(repo().join(lib)).unwrap();
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                // The engine's files are in the crate's map; pack/ has its own.
                if path.is_dir() && name == "engine" {
                    stack.push(path.clone());
                }
                if ["lib.rs", "main.rs", "mod.rs"].contains(&name.as_str()) || !name.ends_with(".rs") && !path.is_dir()
                {
                    continue;
                }
                let shown = if path.is_dir() {
                    format!("{name}/")
                } else {
                    name.clone()
                };
                assert!(map.contains(&shown), "{lib} does not list {shown} ({})", path.display());
            }
        }
    }
}

/// Every config shipped under `configs/` (the demo, the ablation arms) loads: keys known, paths
/// resolved, `[eval]` naming inputs with holdouts, a stage graph that closes.
#[test]
fn every_shipped_config_loads() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut stack = vec![repo().join("configs")];
    let mut loaded = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                runtime
                    .block_on(safepipe::config::Config::load(&path))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                loaded += 1;
            }
        }
    }
    assert!(loaded >= 4, "{loaded} configs");
}
