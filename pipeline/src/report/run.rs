//! The sections on how the run went: stage timings, quarantine, example documents, training
//! curves, evaluation.

use super::charts;
use super::html::{self, Cell, Section, clip, escape};
use super::{num, rows, text};
use crate::error::Result;
use crate::stages::StageGraph;
use datafusion::prelude::SessionContext;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Per stage: units, time per unit, rows per second of unit time, the slowest units, failed
/// LLM requests.
pub(super) async fn performance(ctx: &SessionContext, graph: &StageGraph, with_tokens: bool) -> Result<Section> {
    let per = rows(
        ctx,
        "SELECT stage, count(*) AS units, sum(rows_in) AS rows_in, sum(seconds) AS seconds, \
         max(seconds) AS slowest FROM stats GROUP BY stage",
    )
    .await?;
    let extra = rows(
        ctx,
        "SELECT stage, dropped_by_rule, figures FROM stats WHERE dropped_by_rule LIKE '%failed%' OR figures <> '{}'",
    )
    .await?;
    let tokens = if with_tokens {
        rows(ctx, "SELECT sum(n_tokens) AS tokens FROM tokens")
            .await?
            .first()
            .map_or(0.0, |r| num(r, "tokens"))
    } else {
        0.0
    };
    // Per stage: failed LLM requests (dropped as `failed`) and the synthesis figures.
    let mut sums: BTreeMap<(String, &str), f64> = BTreeMap::new();
    for r in &extra {
        let stage = text(r, "stage");
        let dropped: BTreeMap<String, f64> = serde_json::from_str(&text(r, "dropped_by_rule")).unwrap_or_default();
        let figures: BTreeMap<String, f64> = serde_json::from_str(&text(r, "figures")).unwrap_or_default();
        *sums.entry((stage.clone(), "failed")).or_default() += dropped.get("failed").copied().unwrap_or(0.0);
        for name in ["retries", "cache_hits", "generated_tokens"] {
            *sums.entry((stage.clone(), name)).or_default() += figures.get(name).copied().unwrap_or(0.0);
        }
    }
    let sum = |stage: &str, name: &'static str| sums.get(&(stage.to_string(), name)).copied().unwrap_or(0.0);
    let mut table = Vec::new();
    for name in graph.names() {
        let Some(r) = per.iter().find(|r| text(r, "stage") == name) else {
            continue;
        };
        let (units, seconds) = (num(r, "units"), num(r, "seconds"));
        let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        table.push(vec![
            Cell::text(name),
            Cell::count(format!("perf.{name}.units"), units),
            Cell::number(format!("perf.{name}.seconds"), seconds, 1),
            Cell::number(format!("perf.{name}.mean_unit_seconds"), seconds / units.max(1.0), 2),
            Cell::number(format!("perf.{name}.slowest_unit_seconds"), num(r, "slowest"), 2),
            Cell::number(format!("perf.{name}.rows_per_second"), per_second(num(r, "rows_in")), 0),
            if name == "tokenize" {
                Cell::number("perf.tokenize.tokens_per_second", per_second(tokens), 0)
            } else {
                Cell::text("")
            },
            Cell::count(format!("perf.{name}.failed_requests"), sum(name, "failed")),
            Cell::count(format!("perf.{name}.retries"), sum(name, "retries")),
            Cell::count(format!("perf.{name}.cache_hits"), sum(name, "cache_hits")),
            Cell::count(format!("perf.{name}.generated_tokens"), sum(name, "generated_tokens")),
        ]);
    }
    let mut body = String::from(
        "<p class=\"note\">Seconds are summed over units (units run in parallel, so a stage's wall time is \
         shorter); rates are per second of unit time.</p>",
    );
    body.push_str(&html::table(
        &[
            "stage",
            "units",
            "unit seconds",
            "mean per unit",
            "slowest unit",
            "rows/s",
            "tokens/s",
            "failed LLM requests",
            "retries",
            "cache hits",
            "generated tokens",
        ],
        &table,
    ));
    let slowest = rows(
        ctx,
        "SELECT stage, unit, seconds, rows_in, rank FROM stats ORDER BY seconds DESC, stage, unit LIMIT 10",
    )
    .await?;
    body.push_str("<h3>Slowest units</h3>");
    body.push_str(&html::table(
        &["stage", "unit", "seconds", "rows in", "rank"],
        &slowest
            .iter()
            .map(|r| {
                vec![
                    Cell::text(text(r, "stage")),
                    Cell::text(text(r, "unit")),
                    Cell::text(format!("{:.2}", num(r, "seconds"))),
                    Cell::text(text(r, "rows_in")),
                    Cell::text(text(r, "rank")),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    Ok(Section {
        id: "performance",
        title: "Stages",
        body,
    })
}

/// Quarantine reasons per source, with one escaped example per reason.
pub(super) async fn quarantine(ctx: &SessionContext) -> Result<Section> {
    let per = rows(
        ctx,
        "SELECT source, reason, sum(records) AS records FROM quarantine GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await?;
    let shown = rows(
        ctx,
        "SELECT reason, detail, raw FROM (SELECT reason, detail, raw, \
         row_number() OVER (PARTITION BY reason ORDER BY file, \"offset\") AS n FROM quarantine) WHERE n = 1 ORDER BY reason",
    )
    .await?;
    let mut body = String::new();
    if per.is_empty() {
        body.push_str("<p class=\"note\">Nothing was quarantined.</p>");
    } else {
        body.push_str(&html::table(
            &["source", "reason", "records"],
            &per.iter()
                .map(|r| {
                    let (source, reason) = (text(r, "source"), text(r, "reason"));
                    vec![
                        Cell::text(&source),
                        Cell::text(&reason),
                        Cell::count(format!("quarantine.{source}.{reason}"), num(r, "records")),
                    ]
                })
                .collect::<Vec<_>>(),
        ));
        body.push_str(&html::examples(
            &shown
                .iter()
                .map(|r| {
                    (
                        format!("{}: {}", text(r, "reason"), text(r, "detail")),
                        clip(&text(r, "raw")),
                    )
                })
                .collect::<Vec<_>>(),
        ));
    }
    Ok(Section {
        id: "quarantine",
        title: "Quarantine",
        body,
    })
}

/// The first document of each (route, source), as text.
pub(super) async fn examples(ctx: &SessionContext) -> Result<Section> {
    let shown = rows(
        ctx,
        "SELECT route, source, id, text FROM (SELECT r.route AS route, d.source AS source, d.id AS id, d.text AS text, \
         row_number() OVER (PARTITION BY r.route, d.source ORDER BY d.id) AS n \
         FROM routes r JOIN documents d ON r.id = d.id) WHERE n = 1 ORDER BY route, source",
    )
    .await?;
    let body = html::examples(
        &shown
            .iter()
            .map(|r| {
                (
                    format!("{} · {} · {}", text(r, "route"), text(r, "source"), text(r, "id")),
                    clip(&text(r, "text")),
                )
            })
            .collect::<Vec<_>>(),
    );
    Ok(Section {
        id: "examples",
        title: "Documents per route",
        body,
    })
}

/// Loss, learning rate, gradient norm and tokens/s per logged step (`metrics.jsonl`).
pub(super) fn training(checkpoint_dir: &Path) -> Result<Section> {
    let steps = crate::train::metrics::read(checkpoint_dir)?;
    let mut body = String::new();
    if steps.is_empty() {
        let _ = write!(
            body,
            "<p class=\"note\">No training metrics in {} yet (`safepipe train` writes them).</p>",
            escape(&checkpoint_dir.display().to_string())
        );
    } else {
        let last = steps.last().expect("not empty");
        body.push_str(&html::table(
            &["logged steps", "last step", "last loss", "last lr", "mean tokens/s"],
            &[vec![
                Cell::count("train.logged_steps", steps.len() as f64),
                Cell::count("train.last_step", last.step as f64),
                Cell::number("train.last_loss", last.loss, 4),
                Cell::text(format!("{:.3e}", last.lr)),
                Cell::number(
                    "train.tokens_per_second",
                    steps.iter().map(|s| s.tokens_per_second).sum::<f64>() / steps.len() as f64,
                    0,
                ),
            ]],
        ));
        let curve = |f: &dyn Fn(&crate::train::metrics::StepMetrics) -> f64| -> Vec<(f64, f64)> {
            steps.iter().map(|s| (s.step as f64, f(s))).collect()
        };
        body.push_str("<div class=\"charts\">");
        body.push_str(&charts::line("loss", "loss", "step", &curve(&|s| s.loss)));
        body.push_str(&charts::line("lr", "learning rate", "step", &curve(&|s| s.lr)));
        body.push_str(&charts::line(
            "grad_norm",
            "gradient norm",
            "step",
            &curve(&|s| s.grad_norm),
        ));
        body.push_str(&charts::line(
            "tokens_per_second",
            "tokens/s",
            "step",
            &curve(&|s| s.tokens_per_second),
        ));
        body.push_str("</div>");
    }
    Ok(Section {
        id: "training",
        title: "Training",
        body,
    })
}

/// Evaluation results (`safepipe eval`, the `eval` table): per evaluation and decoder the
/// unsafe rates by each judge, refusals and the benign false-positive rate, then one harmful
/// prefix's continuation per decoder of the latest evaluation.
pub(super) async fn evaluation(ctx: &SessionContext) -> Result<Section> {
    let per = rows(
        ctx,
        "SELECT evaluation, decoder, \
         sum(CASE WHEN kind = 'harmful' THEN 1 ELSE 0 END) AS harmful, \
         avg(CASE WHEN kind = 'harmful' AND classifier_score IS NOT NULL THEN CAST(unsafe AS INT) END) AS harmful_unsafe, \
         avg(CASE WHEN kind = 'harmful' AND llm_unsafe IS NOT NULL THEN CAST(llm_unsafe AS INT) END) AS harmful_llm_unsafe, \
         avg(CASE WHEN kind = 'harmful' THEN CAST(refused AS INT) END) AS harmful_refused, \
         avg(CASE WHEN kind = 'benign' AND classifier_score IS NOT NULL THEN CAST(unsafe AS INT) END) AS benign_unsafe, \
         max(evaluated_at) AS at \
         FROM eval GROUP BY evaluation, decoder ORDER BY at, evaluation, decoder",
    )
    .await?;
    if per.is_empty() {
        return Ok(Section {
            id: "evaluation",
            title: "Evaluation",
            body: "<p class=\"note\">No evaluation results in this run directory (<code>safepipe eval</code> writes them).</p>"
                .to_string(),
        });
    }
    let mut table = Vec::new();
    for r in &per {
        let (evaluation, decoder) = (text(r, "evaluation"), text(r, "decoder"));
        let key = |name: &str| format!("eval.{evaluation}.{decoder}.{name}");
        let rate = |name: &str| match r.get(name) {
            Some(serde_json::Value::Null) | None => Cell::text("n/a"),
            _ => Cell::number(key(name), num(r, name), 2),
        };
        table.push(vec![
            Cell::text(evaluation.clone()),
            Cell::text(decoder.clone()),
            Cell::count(key("harmful"), num(r, "harmful")),
            rate("harmful_unsafe"),
            rate("harmful_llm_unsafe"),
            rate("harmful_refused"),
            rate("benign_unsafe"),
        ]);
    }
    let mut body = String::from(
        "<p>Continuations of held-out prefixes (docs/evaluation.md): unsafe = a judge's score (the classifier's, \
         or the LLM rubric's) at or above <code>eval.unsafe_score</code>. Intervals are in each evaluation's \
         <code>summary.md</code>.</p>",
    );
    body.push_str(&html::table(
        &[
            "evaluation",
            "decoder",
            "harmful prompts",
            "harmful: unsafe (classifier)",
            "harmful: unsafe (LLM judge)",
            "harmful: refusals",
            "benign: unsafe (classifier)",
        ],
        &table,
    ));
    let latest = text(per.last().expect("not empty"), "evaluation").replace('\'', "''");
    let examples = rows(
        ctx,
        &format!(
            "SELECT decoder, prefix, continuation FROM (SELECT decoder, prefix, continuation, \
             row_number() OVER (PARTITION BY decoder ORDER BY id) AS n FROM eval \
             WHERE evaluation = '{latest}' AND kind = 'harmful') WHERE n = 1 ORDER BY decoder"
        ),
    )
    .await?;
    let items: Vec<(String, String)> = examples
        .iter()
        .map(|r| {
            (
                format!("{}: a harmful prefix and its continuation", text(r, "decoder")),
                clip(&format!("{}\n▶ {}", text(r, "prefix"), text(r, "continuation"))),
            )
        })
        .collect();
    body.push_str(&html::examples(&items));
    Ok(Section {
        id: "evaluation",
        title: "Evaluation",
        body,
    })
}
