//! Adapters of the synthesis operators and their config sections (`[synthesize]`, `[annotate]`):
//! `annotate` (documents + scores -> `llm_scores`) and
//! `synthesize` (documents routed rephrase / refuse -> `synthetic`), over the shared `[llm]`
//! backend and the request cache (one cache scope per stage and unit).
//!
//! Both run the backend on a blocking thread, show a progress bar (tokens/s, requests in flight,
//! retries, failures, cache hits) and report failed requests as `dropped["failed"]`; a unit with
//! failed requests is redone by the next run (see [`Stage::incomplete`]), which costs only the
//! failed requests.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream, unit_session};
use crate::config::Lazy;
use crate::engine::records::CompletionRecord;
use crate::error::{Error, Result};
use crate::llm::{SharedGenerator, progress_message};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use futures::stream::{BoxStream, StreamExt};
use safepipe_model::llm::cache::RequestCache;
use safepipe_model::llm::{GenerationStats, Generator};
use safepipe_operators::synthesize::gates::GateSettings;
use safepipe_operators::synthesize::template::REPHRASE_STYLES;
use safepipe_operators::synthesize::{
    AnnotateSettings, KindParams, MAX_ROLLOUTS, Routed, SynthesisSettings, Template, annotate, synthesize,
};
use safepipe_operators::{UnitCounts, schema};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tracing::info;

fn failed(record: &CompletionRecord) -> bool {
    record.counts.dropped.get("failed").is_some_and(|&n| n > 0)
}

/// String columns of the query result, concatenated.
fn strings(batches: &[RecordBatch], column: usize) -> Result<Vec<Option<String>>> {
    let mut out = Vec::new();
    for b in batches {
        let c = cast(b.column(column), &DataType::Utf8)?;
        let c = c.as_string::<i32>();
        out.extend((0..c.len()).map(|i| c.is_valid(i).then(|| c.value(i).to_string())));
    }
    Ok(out)
}

/// A `uint8` column of the query result (nulls kept), concatenated.
fn scores(batches: &[RecordBatch], column: usize) -> Result<Vec<Option<u8>>> {
    let mut out = Vec::new();
    for b in batches {
        let c = cast(b.column(column), &DataType::UInt8)?;
        out.extend(c.as_primitive::<arrow::datatypes::UInt8Type>().iter());
    }
    Ok(out)
}

/// Runs `work` with a progress bar, logs the unit's generation figures and adds them to its
/// counts (`figures`: `generated_tokens`, `cache_hits`, `retries`; the token and retry figures
/// are the shared backend's, so with several units at once they include the others').
fn with_progress(
    llm: &SharedGenerator,
    stage: &str,
    unit: u32,
    work: impl FnOnce(&dyn Generator, &RequestCache, &(dyn Fn(u64, u64) + Sync)) -> Result<(RecordBatch, UnitCounts)>,
) -> Result<(RecordBatch, UnitCounts)> {
    let generator = llm.get()?;
    let scope = format!("{stage}-unit-{unit:06}");
    let cache = RequestCache::open(&llm.cache_dir, &scope)
        .map_err(|e| Error::Config(format!("request cache {}: {e}", llm.cache_dir.display())))?;
    let bar = crate::progress::step_bar(0, &format!("{stage} unit {unit}"));
    let started = Instant::now();
    let stats = generator.stats();
    let tokens_before = GenerationStats::get(&stats.completion_tokens);
    let retries_before = GenerationStats::get(&stats.retries);
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(progress_message(stats, started, cache.hits()));
    };
    let out = work(generator.as_ref(), &cache, &progress);
    bar.finish_and_clear();
    let tokens = GenerationStats::get(&stats.completion_tokens) - tokens_before;
    let retries = GenerationStats::get(&stats.retries) - retries_before;
    info!(
        stage,
        unit,
        generated_tokens = tokens,
        tokens_per_second = (tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)) as u64,
        cache_hits = cache.hits(),
        torn_cache_lines = cache.skipped_lines,
        retries,
        "generation done"
    );
    let (batch, mut counts) = out?;
    for (name, n) in [
        ("generated_tokens", tokens),
        ("cache_hits", cache.hits()),
        ("retries", retries),
    ] {
        counts.figures.insert(name.to_string(), n);
    }
    Ok((batch, counts))
}

/// Runs one unit of a generation stage: `query` over the unit's `wanted` tables, then `work`
/// (rows, backend, the unit's cache scope, a progress callback -> the `table` batch + counts) off
/// the async threads, with a progress bar.
fn generation_unit(
    input: UnitInput,
    wanted: Vec<(&'static str, &'static str, SchemaRef)>,
    query: &'static str,
    llm: Lazy<Arc<SharedGenerator>>,
    (stage, table): (&'static str, &'static str),
    work: impl FnOnce(
        &[RecordBatch],
        &dyn Generator,
        &RequestCache,
        &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(RecordBatch, UnitCounts)>
    + Send
    + 'static,
) -> BoxStream<'static, Result<StageBatch>> {
    futures::stream::once(async move {
        let llm = llm.get()?.clone();
        let ctx = unit_session(&input, &wanted).await?;
        let batches = ctx.sql(query).await?.collect().await?;
        let unit = input.unit.id;
        let (batch, counts) = tokio::task::spawn_blocking(move || {
            with_progress(&llm, stage, unit, |g, cache, progress| {
                work(&batches, g, cache, progress)
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("{stage} task: {e}")))??;
        Ok::<_, Error>(StageBatch {
            tables: vec![(table, batch)],
            counts,
        })
    })
    .boxed()
}

pub struct SynthesizeStage {
    llm: Lazy<Arc<SharedGenerator>>,
    settings: SynthesisSettings,
}

impl SynthesizeStage {
    pub fn new(llm: Lazy<Arc<SharedGenerator>>, settings: SynthesisSettings) -> Self {
        SynthesizeStage { llm, settings }
    }
}

/// The routed documents of a unit, in input order.
const SELECT_ROUTED: &str = "WITH d AS (SELECT id, source, text, row_number() OVER () AS n FROM documents), \
     r AS (SELECT id, route, row_number() OVER () AS n FROM routes) \
     SELECT d.id, d.source, d.text, r.route FROM d JOIN r ON d.n = r.n AND d.id = r.id \
     WHERE r.route IN ('rephrase', 'refuse') ORDER BY d.n";

impl Stage for SynthesizeStage {
    fn name(&self) -> &'static str {
        "synthesize"
    }

    fn reads(&self) -> &'static [Upstream] {
        &[Upstream::Required("ingest"), Upstream::Required("route")]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "synthetic",
            schema: schema::SYNTHETIC.clone(),
        }]
    }

    /// The model's identity (not timeouts or retries), the templates and every setting.
    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "model": self.llm.get()?.identity, "settings": self.settings }))
    }

    fn incomplete(&self, record: &CompletionRecord) -> bool {
        failed(record)
    }
}

impl UnitStage for SynthesizeStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let settings = self.settings.clone();
        let wanted = vec![
            ("ingest", "documents", schema::DOCUMENTS.clone()),
            ("route", "routes", schema::ROUTES.clone()),
        ];
        let output = ("synthesize", "synthetic");
        generation_unit(
            input,
            wanted,
            SELECT_ROUTED,
            self.llm.clone(),
            output,
            move |batches, g, cache, progress| {
                let (ids, sources) = (strings(batches, 0)?, strings(batches, 1)?);
                let (texts, routes) = (strings(batches, 2)?, strings(batches, 3)?);
                let documents: Vec<Routed> = ids
                    .into_iter()
                    .zip(sources)
                    .zip(texts)
                    .zip(routes)
                    .map(|(((id, source), text), route)| Routed {
                        id: id.unwrap_or_default(),
                        source: source.unwrap_or_default(),
                        text: text.unwrap_or_default(),
                        route: route.unwrap_or_default(),
                    })
                    .collect();
                let out = synthesize(g, cache, &settings, &documents, progress)?;
                Ok((out.batch, out.counts))
            },
        )
    }
}

pub struct AnnotateStage {
    llm: Lazy<Arc<SharedGenerator>>,
    settings: AnnotateSettings,
}

impl AnnotateStage {
    pub fn new(llm: Lazy<Arc<SharedGenerator>>, settings: AnnotateSettings) -> Self {
        AnnotateStage { llm, settings }
    }
}

impl Stage for AnnotateStage {
    fn name(&self) -> &'static str {
        "annotate"
    }

    /// With the score stage in the graph, the classifier's score goes into the prompt's record.
    fn reads(&self) -> &'static [Upstream] {
        &[Upstream::Required("ingest"), Upstream::Optional("score")]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "llm_scores",
            schema: schema::LLM_SCORES.clone(),
        }]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "model": self.llm.get()?.identity, "settings": self.settings }))
    }

    fn incomplete(&self, record: &CompletionRecord) -> bool {
        failed(record)
    }
}

impl UnitStage for AnnotateStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let settings = self.settings.clone();
        let mut wanted = vec![("ingest", "documents", schema::DOCUMENTS.clone())];
        let query = if input.has("score") {
            wanted.push(("score", "scores", schema::SCORES.clone()));
            "WITH d AS (SELECT id, text, row_number() OVER () AS n FROM documents), \
             s AS (SELECT id, score, row_number() OVER () AS n FROM scores) \
             SELECT d.id, d.text, s.score FROM d LEFT JOIN s ON d.n = s.n AND d.id = s.id ORDER BY d.n"
        } else {
            "SELECT id, text, NULL AS score FROM documents"
        };
        let output = ("annotate", "llm_scores");
        generation_unit(
            input,
            wanted,
            query,
            self.llm.clone(),
            output,
            move |batches, g, cache, progress| {
                let (ids, texts) = (strings(batches, 0)?, strings(batches, 1)?);
                let documents: Vec<(String, String, Option<u8>)> = ids
                    .into_iter()
                    .zip(texts)
                    .zip(scores(batches, 2)?)
                    .map(|((id, text), score)| (id.unwrap_or_default(), text.unwrap_or_default(), score))
                    .collect();
                let out = annotate(g, cache, &settings, &documents, progress)?;
                Ok((out.batch, out.counts))
            },
        )
    }
}

/// `[synthesize]` as written in the config (docs/config.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SynthesizeConfig {
    #[serde(default)]
    pub seed: u64,
    /// Share of the routed documents synthesized (seeded by id): 1.0 = all.
    #[serde(default = "one")]
    pub sample: f64,
    #[serde(default = "default_input_chars")]
    pub max_input_chars: usize,
    /// Rephrasing style templates (TOML files); empty = the seven built-in styles.
    #[serde(default)]
    pub rephrase_templates: Vec<String>,
    #[serde(default)]
    pub refuse_template: Option<String>,
    #[serde(default)]
    pub moral_template: Option<String>,
    /// Names and roles that replace "User" / "Assistant" in dialogues (at least two).
    #[serde(default = "default_speakers")]
    pub speakers: Vec<String>,
    #[serde(default)]
    pub rephrase: KindParams,
    #[serde(default)]
    pub refuse: KindParams,
    #[serde(default)]
    pub moral: KindParams,
    #[serde(default)]
    pub gates: GateSettings,
}

/// `[annotate]` as written in the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotateConfig {
    #[serde(default)]
    pub seed: u64,
    /// Share of documents rated by the LLM (seeded by id); the rest keep the classifier score.
    #[serde(default = "one")]
    pub sample: f64,
    #[serde(default = "default_input_chars")]
    pub max_input_chars: usize,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default = "default_annotate_tokens")]
    pub max_tokens: usize,
}

fn one() -> f64 {
    1.0
}
fn default_input_chars() -> usize {
    4000
}
fn default_annotate_tokens() -> usize {
    48
}
fn default_speakers() -> Vec<String> {
    [
        "Maya",
        "Tom",
        "Priya",
        "Mateo",
        "Aisha",
        "Chen",
        "Olivia",
        "Kwame",
        "Student",
        "Teacher",
        "Nurse",
        "Parent",
        "Librarian",
        "Coach",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn load_template(
    path: Option<&str>,
    builtin: &str,
    placeholder: &str,
    dir: &Path,
) -> std::result::Result<Template, String> {
    match path {
        None => Template::builtin(builtin, placeholder),
        Some(p) => {
            let path = dir.join(p);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("template {}: {e}", path.display()))?;
            Template::parse(&path.display().to_string(), &text, placeholder)
        }
    }
}

fn check_share(key: &str, v: f64) -> std::result::Result<(), String> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(format!("{key} = {v}: must be in (0, 1]"))
    }
}

impl SynthesizeConfig {
    /// Each kind's name and sampling settings.
    fn kinds(&self) -> [(&'static str, &KindParams); 3] {
        [
            ("rephrase", &self.rephrase),
            ("refuse", &self.refuse),
            ("moral", &self.moral),
        ]
    }

    /// An OpenAI-compatible server samples only: refuses a kind set to beam or safe-beam.
    pub fn require_sampling(&self) -> std::result::Result<(), String> {
        match self.kinds().into_iter().find(|(_, p)| !p.decoder.is_sample()) {
            Some((kind, p)) => Err(format!(
                "synthesize.{kind}.decoder = {:?} needs llm.backend = \"in-process\" (a server samples only)",
                p.decoder.name()
            )),
            None => Ok(()),
        }
    }

    pub fn settings(&self, dir: &Path) -> std::result::Result<SynthesisSettings, String> {
        check_share("synthesize.sample", self.sample)?;
        let rephrase = if self.rephrase_templates.is_empty() {
            REPHRASE_STYLES
                .iter()
                .map(|n| Template::builtin(n, "{document}"))
                .collect::<std::result::Result<Vec<_>, _>>()?
        } else {
            self.rephrase_templates
                .iter()
                .map(|p| load_template(Some(p), "", "{document}", dir))
                .collect::<std::result::Result<Vec<_>, _>>()?
        };
        if self.speakers.len() < 2 {
            return Err("synthesize.speakers needs at least two names or roles".into());
        }
        self.gates
            .validate()
            .map_err(|e| format!("synthesize.gates.drop: {e}"))?;
        for (kind, params) in self.kinds() {
            if !(1..=MAX_ROLLOUTS).contains(&params.rollouts) {
                return Err(format!(
                    "synthesize.{kind}.rollouts = {} is out of range; use 1 to {MAX_ROLLOUTS} generations per input",
                    params.rollouts
                ));
            }
            params
                .decoder
                .validate()
                .map_err(|e| format!("synthesize.{kind}.decoder: {e}"))?;
        }
        Ok(SynthesisSettings {
            seed: self.seed,
            sample: self.sample,
            max_input_chars: self.max_input_chars.max(1),
            rephrase,
            rephrase_params: self.rephrase.clone(),
            refuse: load_template(self.refuse_template.as_deref(), "refuse", "{document}", dir)?,
            refuse_params: self.refuse.clone(),
            moral: load_template(self.moral_template.as_deref(), "moral", "{dialogue}", dir)?,
            moral_params: self.moral.clone(),
            speakers: self.speakers.clone(),
            gates: self.gates.clone(),
        })
    }
}

impl AnnotateConfig {
    pub fn settings(&self, dir: &Path) -> std::result::Result<AnnotateSettings, String> {
        check_share("annotate.sample", self.sample)?;
        Ok(AnnotateSettings {
            seed: self.seed,
            sample: self.sample,
            max_input_chars: self.max_input_chars.max(1),
            template: load_template(self.template.as_deref(), "annotate", "{document}", dir)?,
            params: KindParams {
                max_tokens: self.max_tokens.max(1),
                temperature: 0.0,
                top_p: 1.0,
                rollouts: 1,
                decoder: Default::default(),
            },
        })
    }
}
