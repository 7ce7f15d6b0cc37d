//! Adapter of the route operator: the unit's committed `documents` (+ `scores` and `llm_scores`
//! when the score and annotate stages are in the graph) -> `routes`.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream, unit_session};
use crate::config::Config;
use crate::config::valid_name;
use crate::error::{Error, Result};
use arrow::array::AsArray;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::route::{Route, RouteRule, RouteRules};
use safepipe_operators::route::{ScoreTable, UNJUDGED_RULE, account};
use safepipe_operators::{UnitCounts, schema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

pub struct RouteStage {
    config: Arc<Config>,
}

impl RouteStage {
    pub fn new(config: Arc<Config>) -> Self {
        RouteStage { config }
    }
}

impl Stage for RouteStage {
    fn name(&self) -> &'static str {
        "route"
    }

    fn reads(&self) -> &'static [Upstream] {
        &[
            Upstream::Required("ingest"),
            Upstream::Optional("score"),
            Upstream::Optional("annotate"),
        ]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "routes",
            schema: schema::ROUTES.clone(),
        }]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(&self.config.route).expect("serialisable"))
    }
}

impl UnitStage for RouteStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let rules = self.config.route.clone();
        futures::stream::once(async move {
            // The score tables of the stages this run has, joined to the documents.
            let sides: Vec<ScoreTable> = ScoreTable::ALL.into_iter().filter(|t| input.has(t.stage())).collect();
            let mut wanted = vec![("ingest", "documents", schema::DOCUMENTS.clone())];
            wanted.extend(sides.iter().map(|t| (t.stage(), t.table(), t.schema())));
            let ctx = unit_session(&input, &wanted).await?;
            for (table, stage) in sides.iter().map(|t| (t.table(), t.stage())) {
                // Every document must have its score: a missing one would fall to the default
                // route, i.e. be kept unjudged.
                let count = |table: &str| {
                    let ctx = ctx.clone();
                    let query = format!("SELECT count(*) FROM {table}");
                    async move {
                        let batches = ctx.sql(&query).await?.collect().await?;
                        Ok::<i64, Error>(
                            batches
                                .first()
                                .map(|b| b.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0))
                                .unwrap_or(0),
                        )
                    }
                };
                let (documents, scores) = (count("documents").await?, count(table).await?);
                if documents != scores {
                    return Err(Error::Execution(format!(
                        "unit {}: {documents} documents but {scores} rows in {table}; rerun with --force {stage}",
                        input.unit.id
                    )));
                }
            }
            let stream = rules.execute(&ctx, &sides).await?;
            let batches = stream.map(|batch| {
                let batch = batch?;
                let mut counts = UnitCounts::default();
                account(&batch, &mut counts)?;
                Ok::<_, Error>(StageBatch {
                    tables: vec![("routes", batch)],
                    counts,
                })
            });
            Ok::<_, Error>(batches.boxed())
        })
        .try_flatten()
        .boxed()
    }
}

// ---- `[route]`: the config section of this stage.

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Route of documents no rule matches.
    pub default: Route,
    /// Ordered rules; the first whose `when` is true decides.
    pub rules: Vec<RouteRule>,
    /// The route of documents the annotate stage could not rate when no classifier scored them
    /// either (required with `[annotate]` and no `[score]`; with a classifier, its score is the
    /// ensemble of such documents).
    pub unjudged: Option<Route>,
}

impl RouteConfig {
    /// Checks rule names and routes and plans every predicate against empty tables (`documents`
    /// and the score tables `sides` the configured stages give), so a typo fails at load.
    pub async fn rules(self, sides: &[ScoreTable]) -> std::result::Result<RouteRules, String> {
        let mut names = BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if !valid_name(&rule.name) || rule.name.contains(['-', '.']) {
                return Err(format!(
                    "route.rules[{i}].name = {:?}: use letters, digits and '_'",
                    rule.name
                ));
            }
            if !names.insert(rule.name.clone()) {
                return Err(format!("route.rules[{i}].name = {:?} is used twice", rule.name));
            }
            if rule.also_tag && matches!(rule.route, Route::Keep | Route::Drop) {
                return Err(format!(
                    "route.rules[{i}] (name = {:?}): also_tag is for `rephrase` and `refuse` routes (use route = \"tag\" to keep the text tagged)",
                    rule.name
                ));
            }
        }
        if names.contains(UNJUDGED_RULE) {
            return Err(format!(
                "route.rules: the name {UNJUDGED_RULE:?} is reserved for route.unjudged"
            ));
        }
        let annotated = sides.contains(&ScoreTable::LlmScores);
        let scored = sides.contains(&ScoreTable::Scores);
        match (self.unjudged, annotated, scored) {
            (Some(_), false, _) => {
                return Err(
                    "route.unjudged routes documents the [annotate] stage could not rate; there is no [annotate] section"
                        .into(),
                );
            }
            (None, true, false) => {
                return Err(
                    "[annotate] without [score]: a document the LLM could not rate (a failed request, an unparseable \
                     answer, not sampled) has no score, and would fall through to the default route; set \
                     route.unjudged to the route such documents take (e.g. \"drop\" or \"tag\"), or add [score]"
                        .into(),
                );
            }
            _ => {}
        }
        let rules = RouteRules {
            rules: self.rules,
            default: self.default,
            unjudged: self.unjudged,
        };
        rules.validate(sides).await?;
        Ok(rules)
    }
}
