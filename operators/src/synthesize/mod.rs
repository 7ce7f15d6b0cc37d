//! **synthesize** and **annotate**: LLM generation over a unit's documents.
//!
//! - `synthesize`: documents routed `rephrase` become SafeWeb rephrasings (one of several style
//!   templates, chosen per document by a seeded hash of its id), documents routed `refuse`
//!   become RefuseWeb dialogues (speaker labels replaced by seeded names or roles), and each
//!   dialogue that passes the gates becomes Moral Education articles; `rollouts` per kind asks
//!   for several generations per input, each with its own seed. Output: `synthetic`.
//! - `annotate`: the 0..5 rubric asked of the LLM, parsed tolerantly; the ensemble score is
//!   max(classifier, LLM) as in the paper, so text inside a document can never lower a score
//!   below the classifier's. Output: `llm_scores`, one row per document in input order.
//!
//! Guarantees: choices (which documents, which template, which speaker names, sampling seeds)
//! depend only on (seed, document id), never on document text, so a document cannot steer them;
//! every finished generation is appended to the request cache before anything else happens, so
//! a rerun or a resumed run never pays twice; every task ends as a kept row, a row dropped by a
//! named gate, or a failed request (counted as `failed`; the next run retries exactly those).

pub mod gates;
pub mod rubric;
pub mod template;

use crate::schema;
use crate::{OpResult, UnitCounts};
use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray, UInt8Array, UInt32Array};
use gates::GateSettings;
use safepipe_model::llm::cache::RequestCache;
use safepipe_model::llm::{ChatRequest, Decoder, FinishReason, GenerateError, Generation, Generator, SamplingParams};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
pub use template::Template;

/// Sampling settings of one kind of output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KindParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Generations per input (each with its own seed and cache entry; at least 1).
    pub rollouts: u32,
    /// How tokens are chosen (in-process backend only for beam and safe-beam); left out of the
    /// settings' JSON when sampling, so earlier fingerprints and cache keys stay as they were.
    #[serde(skip_serializing_if = "Decoder::is_sample")]
    pub decoder: Decoder,
}

impl Default for KindParams {
    fn default() -> Self {
        KindParams {
            max_tokens: 512,
            temperature: 0.7,
            top_p: 0.9,
            rollouts: 1,
            decoder: Decoder::Sample,
        }
    }
}

/// The most generations per input `rollouts` may ask for.
pub const MAX_ROLLOUTS: u32 = 16;

/// Everything that decides the `synthetic` rows (part of the stage fingerprint).
#[derive(Debug, Clone, Serialize)]
pub struct SynthesisSettings {
    pub seed: u64,
    /// Share of the routed documents synthesized (chosen by a seeded hash of the id).
    pub sample: f64,
    /// Characters of a document put into a prompt.
    pub max_input_chars: usize,
    pub rephrase: Vec<Template>,
    pub rephrase_params: KindParams,
    pub refuse: Template,
    pub refuse_params: KindParams,
    pub moral: Template,
    pub moral_params: KindParams,
    /// Names and roles that replace "User" and "Assistant" in dialogues.
    pub speakers: Vec<String>,
    pub gates: GateSettings,
}

/// Everything that decides the `llm_scores` rows.
#[derive(Debug, Clone, Serialize)]
pub struct AnnotateSettings {
    pub seed: u64,
    pub sample: f64,
    pub max_input_chars: usize,
    pub template: Template,
    pub params: KindParams,
}

/// A uniform number in [0, 1) from (seed, purpose, id): the only source of choices.
pub fn seeded_unit(seed: u64, purpose: &str, id: &str) -> f64 {
    let digest = Sha256::digest(format!("{seed}\u{0}{purpose}\u{0}{id}"));
    let v = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    (v >> 11) as f64 / (1u64 << 53) as f64
}

fn seeded_u64(seed: u64, purpose: &str, id: &str) -> u64 {
    let digest = Sha256::digest(format!("{seed}\u{0}{purpose}\u{0}{id}"));
    u64::from_le_bytes(digest[8..16].try_into().expect("8 bytes"))
}

/// Whether document `id` is in the sampled share.
pub fn sampled(seed: u64, purpose: &str, id: &str, share: f64) -> bool {
    share >= 1.0 || seeded_unit(seed, purpose, id) < share
}

impl SynthesisSettings {
    /// The rephrasing template of document `id`.
    pub fn style_for(&self, id: &str) -> &Template {
        let i = (seeded_unit(self.seed, "style", id) * self.rephrase.len() as f64) as usize;
        &self.rephrase[i.min(self.rephrase.len() - 1)]
    }

    /// The two speakers of document `id`'s dialogue (user, assistant), distinct.
    pub fn speakers_for(&self, id: &str) -> (String, String) {
        let n = self.speakers.len();
        let a = (seeded_u64(self.seed, "user-speaker", id) % n as u64) as usize;
        let mut b = (seeded_u64(self.seed, "assistant-speaker", id) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        (self.speakers[a].clone(), self.speakers[b].clone())
    }
}

/// The sampling parameters of rollout `rollout` of `kind` for document `id` (rollout 0 keeps the
/// seed it had before rollouts existed, so earlier cached generations still match).
fn params(k: &KindParams, seed: u64, kind: &str, id: &str, rollout: u32) -> SamplingParams {
    let purpose = match rollout {
        0 => kind.to_string(),
        r => format!("{kind}#{r}"),
    };
    SamplingParams {
        max_tokens: k.max_tokens,
        temperature: k.temperature,
        top_p: k.top_p,
        stop: Vec::new(),
        seed: seeded_u64(seed, &purpose, id),
        decoder: k.decoder,
    }
}

/// One generation to make.
struct Task {
    parent_id: String,
    source: String,
    /// Which generation of this (document, kind) it is: 0, 1, ... (part of the row's id).
    rollout: u32,
    template: Template,
    request: ChatRequest,
    key: String,
}

/// Runs tasks through the cache and the backend; results in task order. `progress(done)` is
/// called as tasks finish.
fn run_tasks(
    generator: &dyn Generator,
    cache: &RequestCache,
    tasks: &[Task],
    progress: &(dyn Fn(u64) + Sync),
) -> OpResult<Vec<Result<Generation, GenerateError>>> {
    let mut results: Vec<Option<Result<Generation, GenerateError>>> = vec![None; tasks.len()];
    let mut pending = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        match cache.get(&task.key) {
            Some(g) => results[i] = Some(Ok(g.clone())),
            None => pending.push(i),
        }
    }
    progress((tasks.len() - pending.len()) as u64);
    let requests: Vec<ChatRequest> = pending.iter().map(|&i| tasks[i].request.clone()).collect();
    let finished = Mutex::new(Vec::with_capacity(pending.len()));
    let cache_error = Mutex::new(None);
    generator.generate(&requests, &|j, result| {
        let i = pending[j];
        let label = format!("{} {}", tasks[i].parent_id, tasks[i].template.identity());
        if let Ok(g) = &result
            && let Err(e) = cache.put(&tasks[i].key, &label, g)
        {
            cache_error.lock().expect("cache error").get_or_insert(e.to_string());
        }
        finished.lock().expect("results").push((i, result));
        progress(1);
    });
    if let Some(e) = cache_error.into_inner().expect("cache error") {
        return Err(crate::OpError::Config(format!("writing the request cache: {e}")));
    }
    cache
        .sync()
        .map_err(|e| crate::OpError::Config(format!("syncing the request cache: {e}")))?;
    for (i, r) in finished.into_inner().expect("results") {
        results[i] = Some(r);
    }
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(GenerateError::Rejected(
                    "the backend did not report this request".into(),
                ))
            })
        })
        .collect())
}

/// A task's origin: the parent document's id and source.
struct Parent<'a> {
    id: &'a str,
    source: &'a str,
    rollout: u32,
}

fn task(
    generator: &dyn Generator,
    template: &Template,
    placeholder: &str,
    parent: Parent<'_>,
    input: &str,
    max_chars: usize,
    params: SamplingParams,
) -> Task {
    let parent_id = parent.id;
    let request = template.request(placeholder, input, max_chars, params);
    let key = RequestCache::key(&serde_json::json!([
        generator.model_id(),
        template.identity(),
        request.messages,
        request.prefill,
        request.params,
        parent_id,
        parent.rollout
    ]));
    Task {
        parent_id: parent_id.to_string(),
        source: parent.source.to_string(),
        rollout: parent.rollout,
        template: template.clone(),
        request,
        key,
    }
}

/// One `synthetic` row.
struct Row {
    parent_id: String,
    rollout: u32,
    source: String,
    kind: String,
    style: String,
    template: String,
    text: Option<String>,
    finish_reason: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    gates: Vec<&'static str>,
    /// The first of `gates` that drops the row, if any.
    dropped_by: Option<&'static str>,
    error: Option<String>,
}

impl Row {
    /// The row's id: `<document id>#<kind>`, and `#<n>` after it for rollout n >= 1.
    fn id(&self) -> String {
        match self.rollout {
            0 => format!("{}#{}", self.parent_id, self.kind),
            n => format!("{}#{}#{n}", self.parent_id, self.kind),
        }
    }

    /// Goes to training: generated, and no dropping gate failed.
    fn keep(&self) -> bool {
        self.error.is_none() && self.dropped_by.is_none()
    }
}

/// Replaces the `User:` / `Assistant:` labels at line starts.
fn relabel(dialogue: &str, user: &str, assistant: &str) -> String {
    dialogue
        .lines()
        .map(|line| {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("User:") {
                format!("{user}:{rest}")
            } else if let Some(rest) = t.strip_prefix("Assistant:") {
                format!("{assistant}:{rest}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A dialogue has both a user turn and an assistant turn.
fn is_dialogue(text: &str) -> bool {
    let starts = |label: &str| text.lines().any(|l| l.trim_start().starts_with(label));
    starts("User:") && starts("Assistant:")
}

/// What the synthesize stage makes of one unit.
pub struct SynthesisOutput {
    pub batch: RecordBatch,
    pub counts: UnitCounts,
}

/// One routed document.
pub struct Routed {
    pub id: String,
    pub source: String,
    pub text: String,
    pub route: String,
}

/// Synthesizes the unit's routed documents. Blocking (the backend runs here).
pub fn synthesize(
    generator: &dyn Generator,
    cache: &RequestCache,
    settings: &SynthesisSettings,
    documents: &[Routed],
    progress: &(dyn Fn(u64, u64) + Sync),
) -> OpResult<SynthesisOutput> {
    let mut counts = UnitCounts::default();
    let mut first = Vec::new();
    for Routed {
        id,
        source,
        text,
        route,
    } in documents
    {
        let (template, kind_params) = match route.as_str() {
            "rephrase" => (settings.style_for(id), &settings.rephrase_params),
            "refuse" => (&settings.refuse, &settings.refuse_params),
            _ => continue,
        };
        if !sampled(settings.seed, "synthesize", id, settings.sample) {
            counts.rows_in += 1;
            counts.drop("not_sampled", 1);
            continue;
        }
        for rollout in 0..kind_params.rollouts {
            counts.rows_in += 1;
            let p = params(kind_params, settings.seed, &template.kind, id, rollout);
            let parent = Parent { id, source, rollout };
            first.push(task(
                generator,
                template,
                "{document}",
                parent,
                text,
                settings.max_input_chars,
                p,
            ));
        }
    }
    let total = Mutex::new((0u64, first.len() as u64));
    let report = |done: u64| {
        let mut t = total.lock().expect("progress");
        t.0 += done;
        progress(t.0, t.1);
    };
    let results = run_tasks(generator, cache, &first, &report)?;
    let mut rows = Vec::new();
    let mut morals = Vec::new();
    for (task, result) in first.iter().zip(results) {
        let is_refusal = task.template.kind == "refuseweb";
        let mut row = finish_row(task, result, &settings.gates, |text| {
            if is_refusal {
                // Servers that do not continue a prefilled turn start the dialogue afresh.
                let prefill = &task.request.prefill;
                let full = if text.trim_start().starts_with(prefill.trim()) {
                    text.trim_start().to_string()
                } else {
                    format!("{prefill}{text}")
                };
                (full.clone(), is_dialogue(&full))
            } else {
                (text.to_string(), true)
            }
        });
        if is_refusal && row.keep() {
            let dialogue = row.text.clone().unwrap_or_default();
            // Every dialogue of the document gets its own articles: rollout numbers run on
            // across the document's dialogues, so each article's id is unique.
            let per_dialogue = settings.moral_params.rollouts;
            for r in 0..per_dialogue {
                let rollout = task.rollout * per_dialogue + r;
                let p = params(
                    &settings.moral_params,
                    settings.seed,
                    &settings.moral.kind,
                    &task.parent_id,
                    rollout,
                );
                morals.push(task_for_moral(generator, settings, task, &dialogue, p, rollout));
            }
            let (user, assistant) = settings.speakers_for(&task.parent_id);
            row.text = Some(relabel(&dialogue, &user, &assistant));
        }
        account_row(&row, &mut counts);
        rows.push(row);
    }
    if !morals.is_empty() {
        total.lock().expect("progress").1 += morals.len() as u64;
        counts.rows_in += morals.len() as u64;
        let results = run_tasks(generator, cache, &morals, &report)?;
        for (task, result) in morals.iter().zip(results) {
            let row = finish_row(task, result, &settings.gates, |t| (t.to_string(), true));
            account_row(&row, &mut counts);
            rows.push(row);
        }
    }
    Ok(SynthesisOutput {
        batch: synthetic_batch(&rows, generator.model_id())?,
        counts,
    })
}

fn task_for_moral(
    generator: &dyn Generator,
    s: &SynthesisSettings,
    refusal: &Task,
    dialogue: &str,
    p: SamplingParams,
    rollout: u32,
) -> Task {
    let parent = Parent {
        id: &refusal.parent_id,
        source: &refusal.source,
        rollout,
    };
    task(
        generator,
        &s.moral,
        "{dialogue}",
        parent,
        dialogue,
        s.max_input_chars.max(dialogue.chars().count()),
        p,
    )
}

fn finish_row(
    task: &Task,
    result: Result<Generation, GenerateError>,
    gates: &GateSettings,
    shape: impl Fn(&str) -> (String, bool),
) -> Row {
    let base = Row {
        parent_id: task.parent_id.clone(),
        rollout: task.rollout,
        source: task.source.clone(),
        kind: task.template.kind.clone(),
        style: task.template.style.clone(),
        template: task.template.identity(),
        text: None,
        finish_reason: "error".into(),
        prompt_tokens: 0,
        completion_tokens: 0,
        gates: Vec::new(),
        dropped_by: None,
        error: None,
    };
    match result {
        Ok(g) => {
            let (text, format_ok) = shape(&g.text);
            let failed = gates.check(&text, g.finish_reason == FinishReason::Length, format_ok);
            Row {
                dropped_by: gates.dropped_by(&failed),
                text: Some(text),
                finish_reason: g.finish_reason.as_str().into(),
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
                gates: failed,
                ..base
            }
        }
        Err(e) => Row {
            error: Some(e.to_string()),
            ..base
        },
    }
}

/// Failed requests count as `failed`; gate drops under the gate that dropped the row.
fn account_row(row: &Row, counts: &mut UnitCounts) {
    match (&row.error, row.dropped_by) {
        (Some(_), _) => counts.drop("failed", 1),
        (None, Some(gate)) => counts.drop(gate, 1),
        (None, None) => counts.rows_out += 1,
    }
}

fn synthetic_batch(rows: &[Row], model: &str) -> OpResult<RecordBatch> {
    let strings = |f: &dyn Fn(&Row) -> Option<String>| {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(r.id())),
        strings(&|r| Some(r.parent_id.clone())),
        strings(&|r| Some(r.source.clone())),
        strings(&|r| Some(r.kind.clone())),
        strings(&|r| Some(r.style.clone())),
        strings(&|r| r.text.clone()),
        strings(&|_| Some(model.to_string())),
        strings(&|r| Some(r.template.clone())),
        strings(&|r| Some(r.finish_reason.clone())),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.prompt_tokens))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.completion_tokens))),
        strings(&|r| Some(r.gates.join(","))),
        Arc::new(BooleanArray::from(rows.iter().map(Row::keep).collect::<Vec<_>>())),
        strings(&|r| r.error.clone()),
    ];
    Ok(RecordBatch::try_new(schema::SYNTHETIC.clone(), columns)?)
}

/// What the annotate stage makes of one unit.
pub struct AnnotateOutput {
    pub batch: RecordBatch,
    pub counts: UnitCounts,
}

/// Rates the unit's `(id, text, classifier score)` rows (in order; one output row each).
pub fn annotate(
    generator: &dyn Generator,
    cache: &RequestCache,
    settings: &AnnotateSettings,
    documents: &[(String, String, Option<u8>)],
    progress: &(dyn Fn(u64, u64) + Sync),
) -> OpResult<AnnotateOutput> {
    let mut tasks = Vec::new();
    let mut task_of = Vec::with_capacity(documents.len());
    for (id, text, _) in documents {
        if sampled(settings.seed, "annotate", id, settings.sample) {
            let p = params(&settings.params, settings.seed, "annotate", id, 0);
            task_of.push(Some(tasks.len()));
            let parent = Parent {
                id,
                source: "",
                rollout: 0,
            };
            tasks.push(task(
                generator,
                &settings.template,
                "{document}",
                parent,
                text,
                settings.max_input_chars,
                p,
            ));
        } else {
            task_of.push(None);
        }
    }
    let done = Mutex::new(0u64);
    let total = tasks.len() as u64;
    let report = |n: u64| {
        let mut d = done.lock().expect("progress");
        *d += n;
        progress(*d, total);
    };
    let results = run_tasks(generator, cache, &tasks, &report)?;
    let mut counts = UnitCounts::default();
    let (mut llm, mut ensemble, mut status, mut reason, mut answer) = (vec![], vec![], vec![], vec![], vec![]);
    for ((_, _, classifier), t) in documents.iter().zip(&task_of) {
        counts.rows_in += 1;
        let (score, st, why, raw) = match t.map(|i| &results[i]) {
            None => (None, "not_sampled", None, None),
            Some(Err(e)) => (None, "failed", Some(e.to_string()), None),
            Some(Ok(g)) => match rubric::parse(&settings.template.prefill, &g.text) {
                Ok((s, r)) => (Some(s), "ok", r, Some(g.text.clone())),
                Err(e) => (None, "unparseable", Some(e), Some(g.text.clone())),
            },
        };
        if st == "failed" {
            counts.drop("failed", 1);
        } else {
            counts.rows_out += 1;
        }
        llm.push(score);
        ensemble.push(match (classifier, score) {
            (Some(c), Some(l)) => Some((*c).max(l)),
            (c, l) => c.or(l),
        });
        status.push(st);
        reason.push(why);
        answer.push(raw);
    }
    let n = documents.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(documents.iter().map(|d| d.0.as_str()))),
        Arc::new(UInt8Array::from(documents.iter().map(|d| d.2).collect::<Vec<_>>())),
        Arc::new(UInt8Array::from(llm)),
        Arc::new(UInt8Array::from(ensemble)),
        Arc::new(StringArray::from(status)),
        Arc::new(StringArray::from(reason)),
        Arc::new(StringArray::from(answer)),
        Arc::new(StringArray::from(vec![generator.model_id(); n])),
        Arc::new(StringArray::from(vec![settings.template.identity(); n])),
    ];
    Ok(AnnotateOutput {
        batch: RecordBatch::try_new(schema::LLM_SCORES.clone(), columns)?,
        counts,
    })
}

#[cfg(test)]
mod tests;
