//! **route**: `documents` -> `routes`, one route per document chosen by SQL predicates.
//!
//! The rules are an ordered list of `(name, when, route, also_tag)`; a document takes the route of
//! the first rule whose `when` (a SQL boolean expression over the `documents` columns, plus the
//! `scores` columns `score`, `probs`, `expected`, `chunks` when the score stage runs, and the
//! `llm_scores` columns `llm_score`, `ensemble` when the annotate stage runs) is true,
//! else the default route. `also_tag` keeps the raw text with harmfulness tags as well (the
//! paper's "refuse, and keep the raw text tagged"). The whole decision is one DataFusion query, so it streams, and a routing change
//! never touches the documents themselves (routes are a side table keyed by `id`).
//!
//! Guarantees: one `routes` row per input document, in input order (scores are joined by
//! position and id); `rule` names the rule that matched (null for the default). Rows routed to `drop` stay in `routes` for inspection and are
//! counted as dropped by their rule's name. A `when` that is null (e.g. over a null column) does
//! not match. Cost: a scan of the unit's documents; no model, no network.

use crate::{OpError, OpResult, UnitCounts, schema};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where a document goes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Keep the raw text as it is.
    #[default]
    Keep,
    /// Rephrase into SafeWeb-style educational text.
    Rephrase,
    /// Turn into a refusal dialogue (and a moral-education article).
    Refuse,
    /// Keep the raw text with harmfulness tags inserted.
    Tag,
    /// Remove from the corpus (counted as dropped by the rule's name).
    Drop,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Keep => "keep",
            Route::Rephrase => "rephrase",
            Route::Refuse => "refuse",
            Route::Tag => "tag",
            Route::Drop => "drop",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Shown in `routes.rule` and in drop counts; letters, digits and `_`.
    pub name: String,
    /// A SQL boolean expression over the `documents` columns (and the `scores` columns when the
    /// score stage runs), e.g. `length(text) < 200`, `score >= 4`.
    pub when: String,
    pub route: Route,
    /// Also keep the raw text with harmfulness tags (for `rephrase` / `refuse` routes).
    #[serde(default)]
    pub also_tag: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RouteRules {
    pub rules: Vec<RouteRule>,
    pub default: Route,
    /// Where documents go that the annotate stage could not rate and no classifier scored
    /// (`ensemble` is null: the request failed, the answer did not parse, or the document was
    /// not sampled): checked before the rules, counted under the rule name [`UNJUDGED_RULE`].
    /// Only applies when `llm_scores` is joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unjudged: Option<Route>,
}

/// The rule name of documents routed by [`RouteRules::unjudged`].
pub const UNJUDGED_RULE: &str = "unjudged";

/// A per-document score table that route predicates may use when its stage is in the run:
/// joined to `documents` by position and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreTable {
    /// `scores` of the score stage: `score`, `probs`, `expected`, `chunks`.
    Scores,
    /// `llm_scores` of the annotate stage: `llm_score`, `ensemble`.
    LlmScores,
}

impl ScoreTable {
    pub const ALL: [ScoreTable; 2] = [ScoreTable::Scores, ScoreTable::LlmScores];

    pub fn table(self) -> &'static str {
        match self {
            ScoreTable::Scores => "scores",
            ScoreTable::LlmScores => "llm_scores",
        }
    }

    /// The stage that writes it.
    pub fn stage(self) -> &'static str {
        match self {
            ScoreTable::Scores => "score",
            ScoreTable::LlmScores => "annotate",
        }
    }

    pub fn schema(self) -> arrow::datatypes::SchemaRef {
        match self {
            ScoreTable::Scores => schema::SCORES.clone(),
            ScoreTable::LlmScores => schema::LLM_SCORES.clone(),
        }
    }

    /// The columns predicates may use.
    pub fn columns(self) -> &'static str {
        match self {
            ScoreTable::Scores => SCORE_COLUMNS,
            ScoreTable::LlmScores => LLM_SCORE_COLUMNS,
        }
    }
}

/// The columns of `scores` that route predicates can use.
pub const SCORE_COLUMNS: &str = "score, probs, expected, chunks";

/// The columns of `llm_scores` that route predicates can use.
pub const LLM_SCORE_COLUMNS: &str = "llm_score, ensemble";

/// The name under which drops by the default route are counted.
pub const DEFAULT_RULE: &str = "default";

impl RouteRules {
    /// The query that routes every row of the table `documents` (joined with the `sides`).
    pub fn query(&self, sides: &[ScoreTable]) -> String {
        // Documents and score tables are matched by position and id; the ORDER BY is at the top
        // level (DataFusion drops one inside a derived table), so routes keep document order.
        // The route adapter checks that every document has its score rows.
        let (source, order) = if !sides.is_empty() {
            let mut columns = String::from("d.*");
            let mut joins = String::new();
            for side in sides {
                let (table, cols) = (side.table(), side.columns());
                columns.push_str(&format!(", {cols}"));
                joins.push_str(&format!(
                    " LEFT JOIN (SELECT id AS {table}_id__, {cols}, row_number() OVER () AS {table}_n__ FROM {table}) {table}__ \
                     ON d.doc_n__ = {table}__.{table}_n__ AND d.id = {table}__.{table}_id__"
                ));
            }
            (
                format!(
                    "(SELECT {columns} FROM (SELECT *, row_number() OVER () AS doc_n__ FROM documents) d{joins}) documents"
                ),
                " ORDER BY doc_n__",
            )
        } else {
            ("documents".to_string(), "")
        };
        // Unjudged documents first: a null ensemble must not fall through to the default.
        let unjudged = match (self.unjudged, sides.contains(&ScoreTable::LlmScores)) {
            (Some(route), true) => Some(RouteRule {
                name: UNJUDGED_RULE.into(),
                when: "ensemble IS NULL".into(),
                route,
                also_tag: false,
            }),
            _ => None,
        };
        let rules: Vec<&RouteRule> = unjudged.iter().chain(&self.rules).collect();
        if rules.is_empty() {
            return format!(
                "SELECT id, '{}' AS route, CAST(NULL AS VARCHAR) AS rule, {} AS also_tag FROM {source}{order}",
                self.default.as_str(),
                self.default == Route::Tag
            );
        }
        let mut route = String::from("CASE");
        let mut rule = String::from("CASE");
        let mut also_tag = String::from("CASE");
        for r in rules {
            route.push_str(&format!(" WHEN ({}) THEN '{}'", r.when, r.route.as_str()));
            rule.push_str(&format!(" WHEN ({}) THEN '{}'", r.when, r.name.replace('\'', "''")));
            let tagged = r.also_tag || r.route == Route::Tag;
            also_tag.push_str(&format!(" WHEN ({}) THEN {tagged}", r.when));
        }
        route.push_str(&format!(" ELSE '{}' END", self.default.as_str()));
        rule.push_str(" END");
        also_tag.push_str(&format!(" ELSE {} END", self.default == Route::Tag));
        format!("SELECT id, {route} AS route, {rule} AS rule, {also_tag} AS also_tag FROM {source}{order}")
    }

    /// Plans the query against empty tables (`documents` and the `sides` the run will have):
    /// catches unknown columns, type errors and SQL syntax before any work starts. The error
    /// names the rule.
    pub async fn validate(&self, sides: &[ScoreTable]) -> Result<(), String> {
        let mut over: Vec<&str> = vec!["documents"];
        over.extend(sides.iter().map(|s| s.table()));
        let mut over = over.join(", ");
        let absent: Vec<String> = ScoreTable::ALL
            .into_iter()
            .filter(|t| !sides.contains(t))
            .map(|t| format!("no [{}] section: {} are unavailable", t.stage(), t.columns()))
            .collect();
        if !absent.is_empty() {
            over.push_str(&format!(" ({})", absent.join("; ")));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let single = RouteRules {
                rules: vec![rule.clone()],
                ..self.clone()
            };
            single.plan_on_empty(sides).await.map_err(|e| {
                format!(
                    "route.rules[{i}] (name = {:?}): `when = {:?}` is not a valid predicate over {over}: {e}",
                    rule.name, rule.when,
                )
            })?;
        }
        self.plan_on_empty(sides).await.map_err(|e| format!("route: {e}"))
    }

    async fn plan_on_empty(&self, sides: &[ScoreTable]) -> OpResult<()> {
        let ctx = SessionContext::new();
        let empty = MemTable::try_new(schema::DOCUMENTS.clone(), vec![vec![]])?;
        ctx.register_table("documents", Arc::new(empty))?;
        for side in sides {
            let empty = MemTable::try_new(side.schema(), vec![vec![]])?;
            ctx.register_table(side.table(), Arc::new(empty))?;
        }
        let df = ctx.sql(&self.query(sides)).await?;
        df.create_physical_plan().await?;
        Ok(())
    }

    /// Routes the `documents` table registered in `ctx`, joined with the `sides` registered
    /// there too. Lazy: the scan starts on first poll.
    pub async fn execute(&self, ctx: &SessionContext, sides: &[ScoreTable]) -> OpResult<SendableRecordBatchStream> {
        let df = ctx.sql(&self.query(sides)).await?;
        Ok(df.execute_stream().await?)
    }
}

/// Adds one `routes` batch to the unit's counts: every row is in; `drop` rows are dropped by
/// their rule (or [`DEFAULT_RULE`]); the rest are out.
pub fn account(batch: &RecordBatch, counts: &mut UnitCounts) -> OpResult<()> {
    if batch.num_columns() != 4 {
        return Err(OpError::Config(format!(
            "a routes batch has 4 columns, not {}",
            batch.num_columns()
        )));
    }
    let route = cast(batch.column(1), &DataType::Utf8)?;
    let rule = cast(batch.column(2), &DataType::Utf8)?;
    let (route, rule) = (route.as_string::<i32>(), rule.as_string::<i32>());
    counts.rows_in += batch.num_rows() as u64;
    for row in 0..batch.num_rows() {
        if route.value(row) == Route::Drop.as_str() {
            let name = if rule.is_valid(row) {
                rule.value(row)
            } else {
                DEFAULT_RULE
            };
            counts.drop(name, 1);
        } else {
            counts.rows_out += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::derived_id;
    use arrow::array::{StringArray, StructArray};

    fn documents(texts: &[&str]) -> RecordBatch {
        let n = texts.len();
        let metadata = StructArray::new_null(schema::metadata_fields(), n);
        RecordBatch::try_new(
            schema::DOCUMENTS.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(texts.iter().map(|t| derived_id(t)))),
                Arc::new(StringArray::from_iter_values(texts)),
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n("s", n))),
                Arc::new(StructArray::try_new(schema::metadata_fields(), metadata.columns().to_vec(), None).unwrap()),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn first_matching_rule_wins_and_drops_are_counted() {
        let rules = RouteRules {
            rules: vec![
                RouteRule {
                    name: "short".into(),
                    when: "length(text) < 5".into(),
                    route: Route::Drop,
                    also_tag: false,
                },
                RouteRule {
                    name: "shouty".into(),
                    when: "upper(text) = text".into(),
                    route: Route::Tag,
                    also_tag: false,
                },
            ],
            default: Route::Keep,
            unjudged: None,
        };
        rules.validate(&[]).await.unwrap();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(
            schema::DOCUMENTS.clone(),
            vec![vec![documents(&["hi", "HELLO THERE", "hello there", "OK"])]],
        )
        .unwrap();
        ctx.register_table("documents", Arc::new(table)).unwrap();
        let batches = datafusion::physical_plan::common::collect(rules.execute(&ctx, &[]).await.unwrap())
            .await
            .unwrap();
        let mut counts = UnitCounts::default();
        let mut routes = vec![];
        for b in &batches {
            account(b, &mut counts).unwrap();
            let r = cast(b.column(1), &DataType::Utf8).unwrap();
            routes.extend(r.as_string::<i32>().iter().map(|s| s.unwrap().to_string()));
        }
        assert_eq!(routes, ["drop", "tag", "keep", "drop"]);
        assert_eq!(counts.rows_in, 4);
        assert_eq!(counts.rows_out, 2);
        assert_eq!(counts.dropped["short"], 2);
        counts.check().unwrap();
    }

    #[tokio::test]
    async fn bad_predicate_names_the_rule() {
        let rules = RouteRules {
            rules: vec![RouteRule {
                name: "oops".into(),
                when: "no_such_column > 3".into(),
                route: Route::Drop,
                also_tag: false,
            }],
            default: Route::Keep,
            unjudged: None,
        };
        let err = rules.validate(&[]).await.unwrap_err();
        assert!(err.contains("route.rules[0]") && err.contains("oops"), "{err}");
    }
}
