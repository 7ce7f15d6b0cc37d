//! The sections on what the data became: the flow through the stages and routes, scores and
//! agreement, synthetic data, tagging, the mixture and the shards.

use super::charts::{self, Bars, Series};
use super::html::{self, Cell, Section, clip, escape};
use super::{Row, num, rows, text};
use crate::config::Config;
use crate::error::Result;
use crate::pack;
use crate::stages::StageGraph;
use datafusion::prelude::SessionContext;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Documents and tokens through the stages, the routes, the kinds that reach training, the pack.
pub(super) async fn flow(
    ctx: &SessionContext,
    graph: &StageGraph,
    manifest: Option<&pack::Manifest>,
    with_tokens: bool,
) -> Result<Section> {
    let per_stage = rows(
        ctx,
        "SELECT stage, count(*) AS units, sum(rows_in) AS rows_in, sum(rows_out) AS rows_out, \
         sum(rows_dropped) AS dropped, sum(rows_quarantined) AS quarantined FROM stats GROUP BY stage",
    )
    .await?;
    let by_stage: BTreeMap<String, &Row> = per_stage.iter().map(|r| (text(r, "stage"), r)).collect();
    let names: Vec<String> = graph
        .names()
        .into_iter()
        .filter(|n| by_stage.contains_key(*n))
        .map(String::from)
        .collect();
    let mut table = Vec::new();
    let (mut out, mut dropped, mut quarantined) = (Vec::new(), Vec::new(), Vec::new());
    for name in &names {
        let r = by_stage[name];
        table.push(vec![
            Cell::text(name),
            Cell::count(format!("stage.{name}.units"), num(r, "units")),
            Cell::count(format!("stage.{name}.rows_in"), num(r, "rows_in")),
            Cell::count(format!("stage.{name}.rows_out"), num(r, "rows_out")),
            Cell::count(format!("stage.{name}.dropped"), num(r, "dropped")),
            Cell::count(format!("stage.{name}.quarantined"), num(r, "quarantined")),
        ]);
        out.push(num(r, "rows_out"));
        dropped.push(num(r, "dropped"));
        quarantined.push(num(r, "quarantined"));
    }
    let mut body = String::from(
        "<p class=\"note\">Rows into each per-unit stage and where they went (committed units; <code>stats</code>).</p>",
    );
    body.push_str(&html::table(
        &["stage", "units", "rows in", "out", "dropped", "quarantined"],
        &table,
    ));
    let stage_series = vec![
        Series {
            name: "out".into(),
            values: out,
        },
        Series {
            name: "dropped".into(),
            values: dropped,
        },
        Series {
            name: "quarantined".into(),
            values: quarantined,
        },
    ];
    let routes = rows(
        ctx,
        "SELECT route, count(*) AS documents, sum(CAST(also_tag AS INT)) AS tagged FROM routes GROUP BY route ORDER BY route",
    )
    .await?;
    let kinds =
        match with_tokens {
            true => rows(
                ctx,
                "SELECT kind, count(*) AS documents, sum(n_tokens) AS tokens FROM tokens GROUP BY kind ORDER BY kind",
            )
            .await?,
            false => Vec::new(),
        };
    body.push_str("<div class=\"charts\">");
    body.push_str(&charts::bars(
        "stages",
        "rows per stage",
        &names,
        &stage_series,
        Bars::Stacked,
    ));
    let route_names: Vec<String> = routes.iter().map(|r| text(r, "route")).collect();
    body.push_str(&charts::bars(
        "routes",
        "documents per route",
        &route_names,
        &[Series {
            name: "documents".into(),
            values: routes.iter().map(|r| num(r, "documents")).collect(),
        }],
        Bars::Grouped,
    ));
    if !kinds.is_empty() {
        body.push_str(&charts::bars(
            "kinds",
            "tokens to training per kind",
            &kinds.iter().map(|r| text(r, "kind")).collect::<Vec<_>>(),
            &[Series {
                name: "tokens".into(),
                values: kinds.iter().map(|r| num(r, "tokens")).collect(),
            }],
            Bars::Grouped,
        ));
    }
    body.push_str("</div>");
    let route_rows: Vec<Vec<Cell>> = routes
        .iter()
        .map(|r| {
            let route = text(r, "route");
            vec![
                Cell::text(&route),
                Cell::count(format!("routes.{route}"), num(r, "documents")),
                Cell::count(format!("routes.{route}.also_tag"), num(r, "tagged")),
            ]
        })
        .collect();
    body.push_str(&html::table(&["route", "documents", "also tagged"], &route_rows));
    if !kinds.is_empty() {
        let kind_rows: Vec<Vec<Cell>> = kinds
            .iter()
            .map(|r| {
                let kind = text(r, "kind");
                vec![
                    Cell::text(&kind),
                    Cell::count(format!("tokens.{kind}.documents"), num(r, "documents")),
                    Cell::count(format!("tokens.{kind}.tokens"), num(r, "tokens")),
                ]
            })
            .collect();
        body.push_str(&html::table(&["kind", "documents", "tokens"], &kind_rows));
    }
    if let Some(m) = manifest {
        body.push_str(&html::table(
            &[
                "pack: documents in",
                "packed",
                "not selected",
                "not in mixture",
                "sequences",
                "tokens",
            ],
            &[vec![
                Cell::count("pack.documents_in", m.documents_in as f64),
                Cell::count("pack.documents_packed", m.documents_packed as f64),
                Cell::count("pack.not_selected", m.documents_not_selected as f64),
                Cell::count("pack.not_in_mixture", m.documents_not_in_mixture as f64),
                Cell::count("pack.sequences", m.sequences as f64),
                Cell::count("pack.tokens", m.tokens as f64),
            ]],
        ));
    }
    Ok(Section {
        id: "flow",
        title: "Flow",
        body,
    })
}

/// Classifier score histograms per source, and classifier vs LLM rubric agreement.
pub(super) async fn scores(ctx: &SessionContext, with_llm: bool) -> Result<Section> {
    let hist = rows(
        ctx,
        "SELECT d.source AS source, s.score AS score, count(*) AS documents, avg(s.expected) AS expected \
         FROM scores s JOIN documents d ON s.id = d.id GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await?;
    let means = rows(
        ctx,
        "SELECT d.source AS source, count(*) AS documents, avg(s.expected) AS expected \
         FROM scores s JOIN documents d ON s.id = d.id GROUP BY 1 ORDER BY 1",
    )
    .await?;
    let sources: Vec<String> = means.iter().map(|r| text(r, "source")).collect();
    let buckets: Vec<String> = (0..=5).map(|s| s.to_string()).collect();
    let series: Vec<Series> = sources
        .iter()
        .map(|source| Series {
            name: source.clone(),
            values: (0..=5)
                .map(|score| {
                    hist.iter()
                        .find(|r| text(r, "source") == *source && num(r, "score") as i64 == score)
                        .map_or(0.0, |r| num(r, "documents"))
                })
                .collect(),
        })
        .collect();
    let mut body = String::from(
        "<p class=\"note\">Documents per classifier score (0 safe .. 5 harmful) and source; <code>expected</code> is the \
         probability-weighted mean score.</p><div class=\"charts\">",
    );
    body.push_str(&charts::bars(
        "scores",
        "documents per score and source",
        &buckets,
        &series,
        Bars::Grouped,
    ));
    body.push_str("</div>");
    let table: Vec<Vec<Cell>> = means
        .iter()
        .map(|r| {
            let source = text(r, "source");
            let mut row = vec![Cell::text(&source)];
            for score in 0..=5 {
                let n = hist
                    .iter()
                    .find(|h| text(h, "source") == source && num(h, "score") as i64 == score)
                    .map_or(0.0, |h| num(h, "documents"));
                row.push(Cell::count(format!("scores.{source}.{score}"), n));
            }
            row.push(Cell::number(format!("scores.{source}.expected"), num(r, "expected"), 3));
            row
        })
        .collect();
    body.push_str(&html::table(
        &["source", "0", "1", "2", "3", "4", "5", "expected"],
        &table,
    ));
    if with_llm {
        body.push_str(&agreement(ctx).await?);
    }
    Ok(Section {
        id: "scores",
        title: "Scores",
        body,
    })
}

/// The classifier vs rubric confusion matrix over the documents the LLM rated.
pub(super) async fn agreement(ctx: &SessionContext) -> Result<String> {
    let status = rows(
        ctx,
        "SELECT status, count(*) AS documents FROM llm_scores GROUP BY status ORDER BY status",
    )
    .await?;
    let pairs = rows(
        ctx,
        "SELECT classifier_score, llm_score, count(*) AS documents FROM llm_scores \
         WHERE classifier_score IS NOT NULL AND llm_score IS NOT NULL GROUP BY 1, 2",
    )
    .await?;
    let mut s = String::from("<h3>Classifier vs LLM rubric</h3>");
    s.push_str(&html::table(
        &["annotate status", "documents"],
        &status
            .iter()
            .map(|r| {
                let st = text(r, "status");
                vec![
                    Cell::text(&st),
                    Cell::count(format!("annotate.{st}"), num(r, "documents")),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    let rated: f64 = pairs.iter().map(|r| num(r, "documents")).sum();
    let same: f64 = pairs
        .iter()
        .filter(|r| num(r, "classifier_score") == num(r, "llm_score"))
        .map(|r| num(r, "documents"))
        .sum();
    let near: f64 = pairs
        .iter()
        .filter(|r| (num(r, "classifier_score") - num(r, "llm_score")).abs() <= 1.0)
        .map(|r| num(r, "documents"))
        .sum();
    let share = |n: f64| if rated > 0.0 { n / rated } else { 0.0 };
    s.push_str(&html::table(
        &["rated by both", "same score", "within 1"],
        &[vec![
            Cell::count("agreement.rated", rated),
            Cell::number("agreement.exact", share(same), 3),
            Cell::number("agreement.within_one", share(near), 3),
        ]],
    ));
    let mut matrix = Vec::new();
    for c in 0..=5 {
        let mut row = vec![Cell::text(format!("classifier {c}"))];
        for l in 0..=5 {
            let n = pairs
                .iter()
                .find(|r| num(r, "classifier_score") as i64 == c && num(r, "llm_score") as i64 == l)
                .map_or(0.0, |r| num(r, "documents"));
            row.push(Cell::count(format!("agreement.{c}.{l}"), n));
        }
        matrix.push(row);
    }
    s.push_str(&html::table(
        &["", "LLM 0", "LLM 1", "LLM 2", "LLM 3", "LLM 4", "LLM 5"],
        &matrix,
    ));
    Ok(s)
}

/// Synthetic rows per kind and style, quality-gate drops, a few kept examples.
pub(super) async fn synthetic(ctx: &SessionContext) -> Result<Section> {
    let per = rows(
        ctx,
        "SELECT kind, style, count(*) AS rows, sum(CAST(keep AS INT)) AS kept, \
         avg(length(text)) AS chars, sum(completion_tokens) AS tokens FROM synthetic GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await?;
    let gates = rows(
        ctx,
        "SELECT kind, gates, count(*) AS rows FROM synthetic WHERE NOT keep GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await?;
    let shown = rows(
        ctx,
        "SELECT kind, style, text FROM (SELECT kind, style, text, row_number() OVER (PARTITION BY kind ORDER BY id) AS n \
         FROM synthetic WHERE keep AND text IS NOT NULL) WHERE n <= 2 ORDER BY kind, style",
    )
    .await?;
    let mut body = String::from("<div class=\"charts\">");
    let labels: Vec<String> = per
        .iter()
        .map(|r| format!("{}/{}", text(r, "kind"), text(r, "style")))
        .collect();
    body.push_str(&charts::bars(
        "synthetic",
        "synthetic rows per kind/style",
        &labels,
        &[
            Series {
                name: "kept".into(),
                values: per.iter().map(|r| num(r, "kept")).collect(),
            },
            Series {
                name: "dropped by a gate".into(),
                values: per.iter().map(|r| num(r, "rows") - num(r, "kept")).collect(),
            },
        ],
        Bars::Stacked,
    ));
    body.push_str("</div>");
    body.push_str(&html::table(
        &["kind", "style", "rows", "kept", "mean characters", "generated tokens"],
        &per.iter()
            .map(|r| {
                let key = format!("synthetic.{}.{}", text(r, "kind"), text(r, "style"));
                vec![
                    Cell::text(text(r, "kind")),
                    Cell::text(text(r, "style")),
                    Cell::count(format!("{key}.rows"), num(r, "rows")),
                    Cell::count(format!("{key}.kept"), num(r, "kept")),
                    Cell::number(format!("{key}.chars"), num(r, "chars"), 0),
                    Cell::count(format!("{key}.tokens"), num(r, "tokens")),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    if !gates.is_empty() {
        body.push_str(&html::table(
            &["kind", "failed gates", "rows"],
            &gates
                .iter()
                .map(|r| {
                    vec![
                        Cell::text(text(r, "kind")),
                        Cell::text(text(r, "gates")),
                        Cell::count(
                            format!("synthetic_dropped.{}.{}", text(r, "kind"), text(r, "gates")),
                            num(r, "rows"),
                        ),
                    ]
                })
                .collect::<Vec<_>>(),
        ));
    }
    body.push_str(&html::examples(
        &shown
            .iter()
            .map(|r| {
                (
                    format!("{} / {}", text(r, "kind"), text(r, "style")),
                    clip(&text(r, "text")),
                )
            })
            .collect::<Vec<_>>(),
    ));
    Ok(Section {
        id: "synthetic",
        title: "Synthetic data",
        body,
    })
}

/// Tags inserted against the configured rate, per source; tag tokens that reached training.
pub(super) async fn tagging(ctx: &SessionContext, config: &Config, with_tokens: bool) -> Result<Section> {
    let per = rows(
        ctx,
        "SELECT source, count(*) AS documents, sum(tags_inserted) AS tags, \
         sum(CASE WHEN words > 0 THEN words - 1 ELSE 0 END) AS slots FROM tagged GROUP BY source ORDER BY source",
    )
    .await?;
    let p = config.tagger.probability;
    let mut body = format!(
        "<p class=\"note\">Algorithm 1: a tag <code>{}</code> before each word after the first with probability \
         <span data-metric=\"tag.configured\" data-value=\"{p}\">{p}</span>.</p>",
        escape(&config.tagger.tag)
    );
    body.push_str(&html::table(
        &["source", "documents", "tags", "rate"],
        &per.iter()
            .map(|r| {
                let source = text(r, "source");
                let rate = if num(r, "slots") > 0.0 {
                    num(r, "tags") / num(r, "slots")
                } else {
                    0.0
                };
                vec![
                    Cell::text(&source),
                    Cell::count(format!("tag.{source}.documents"), num(r, "documents")),
                    Cell::count(format!("tag.{source}.tags"), num(r, "tags")),
                    Cell::number(format!("tag.{source}.rate"), rate, 4),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    if with_tokens {
        let t = rows(ctx, "SELECT sum(tag_tokens) AS tag_tokens FROM tokens").await?;
        let n = t.first().map_or(0.0, |r| num(r, "tag_tokens"));
        let _ = write!(
            body,
            "<p>Tag tokens in <code>tokens</code>: <span data-metric=\"tokens.tag_tokens\" data-value=\"{n}\">{}</span></p>",
            n as i64
        );
    }
    Ok(Section {
        id: "tagging",
        title: "Tagging",
        body,
    })
}

/// The token mixture requested vs achieved, and the shards.
pub(super) fn mixture(m: &pack::Manifest) -> Section {
    let names: Vec<String> = m.sources.iter().map(|s| s.name.clone()).collect();
    let requested: Vec<f64> = m
        .sources
        .iter()
        .map(|s| s.requested_fraction.unwrap_or(f64::NAN))
        .collect();
    let mut body = String::from("<div class=\"charts\">");
    let mut series = vec![Series {
        name: "achieved".into(),
        values: m.sources.iter().map(|s| s.achieved_fraction).collect(),
    }];
    if requested.iter().all(|r| r.is_finite()) {
        series.insert(
            0,
            Series {
                name: "requested".into(),
                values: requested,
            },
        );
    }
    body.push_str(&charts::bars(
        "mixture",
        "share of packed tokens",
        &names,
        &series,
        Bars::Grouped,
    ));
    body.push_str("</div>");
    body.push_str(&html::table(
        &[
            "source",
            "kinds",
            "documents",
            "available tokens",
            "requested",
            "epochs",
            "selected tokens",
            "achieved",
        ],
        &m.sources
            .iter()
            .map(|s| {
                let key = format!("mix.{}", s.name);
                vec![
                    Cell::text(&s.name),
                    Cell::text(s.kinds.join(", ")),
                    Cell::count(format!("{key}.documents"), s.documents as f64),
                    Cell::count(format!("{key}.available_tokens"), s.available_tokens as f64),
                    match s.requested_fraction {
                        Some(f) => Cell::number(format!("{key}.requested"), f, 4),
                        None => Cell::text("(epochs)"),
                    },
                    Cell::number(format!("{key}.epochs"), s.epochs, 3),
                    Cell::count(format!("{key}.selected_tokens"), s.selected_tokens as f64),
                    Cell::number(format!("{key}.achieved"), s.achieved_fraction, 4),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    let bytes: Vec<u64> = m.shards.iter().map(|s| s.bytes).collect();
    let total: u64 = bytes.iter().sum();
    body.push_str(&html::table(
        &[
            "shard files",
            "total bytes",
            "smallest",
            "largest",
            "sequences",
            "seq_len",
            "id type",
        ],
        &[vec![
            Cell::count("shards.files", m.shards.len() as f64),
            Cell::count("shards.bytes", total as f64),
            Cell::count("shards.smallest", bytes.iter().copied().min().unwrap_or(0) as f64),
            Cell::count("shards.largest", bytes.iter().copied().max().unwrap_or(0) as f64),
            Cell::count("shards.sequences", m.sequences as f64),
            Cell::count("shards.seq_len", m.seq_len as f64),
            Cell::text(&m.id_type),
        ]],
    ));
    Section {
        id: "mixture",
        title: "Mixture and shards",
        body,
    }
}
