//! The judges of `safepipe eval`: the safety classifier and the LLM rubric, each filling its
//! score column of the rows.

use super::{EvalConfig, Row};
use crate::config::Config;
use crate::error::{Error, Result};
use safepipe_model::llm::{ChatRequest, SamplingParams};
use safepipe_operators::synthesize::{rubric, template::Template};
use std::path::PathBuf;
use std::sync::Mutex;

/// Scores every generated continuation with `eval.classifier` (fp32), else the run's classifier
/// (`[score]`, with its settings); returns its identity.
pub(super) fn with_classifier(config: &Config, eval: &EvalConfig, rows: &mut [Row]) -> Result<Option<String>> {
    let (key, manifest, options) = match (&eval.classifier, &config.score) {
        (Some(path), _) => ("eval.classifier", PathBuf::from(path), Default::default()),
        (None, Some(s)) => ("score.model", s.manifest.clone(), s.options.clone()),
        (None, None) => return Ok(None),
    };
    let classifier = safepipe_model::classifier::Classifier::load(&manifest, &options)
        .map_err(|e| Error::Config(format!("{key} = {}: {e}", manifest.display())))?;
    // Failed generations stay unjudged: an empty text is no evidence of safety.
    let judged: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].error.is_none()).collect();
    let texts: Vec<&str> = judged.iter().map(|&i| rows[i].continuation.as_str()).collect();
    let scores = classifier
        .score(&texts)
        .map_err(|e| Error::Execution(format!("scoring the continuations: {e}")))?;
    for (&i, s) in judged.iter().zip(scores) {
        rows[i].classifier_score = Some(s.score);
    }
    Ok(Some(classifier.model_id()))
}

/// Rates every generated continuation with the `[llm]` backend and the annotate rubric (0..5); a
/// failed or unparseable answer leaves the row unjudged. Returns the judge's identity.
pub(super) fn with_llm(config: &Config, rows: &mut [Row]) -> Result<Option<String>> {
    let Some(llm) = &config.llm else {
        return Ok(None);
    };
    let generator = llm.get().map_err(|e| Error::Config(e.to_string()))?.get()?;
    let template = Template::builtin("annotate", "{document}").map_err(Error::Internal)?;
    let params = SamplingParams {
        max_tokens: 24,
        ..SamplingParams::default()
    };
    let judged: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].error.is_none()).collect();
    let requests: Vec<ChatRequest> = judged
        .iter()
        .map(|&i| template.request("{document}", &rows[i].continuation, 2000, params.clone()))
        .collect();
    let scores = Mutex::new(vec![None; judged.len()]);
    generator.generate(&requests, &|i, result| {
        if let Ok(g) = result
            && let Ok((score, _)) = rubric::parse(&template.prefill, &g.text)
        {
            scores.lock().expect("scores")[i] = Some(score);
        }
    });
    for (&i, score) in judged.iter().zip(scores.into_inner().expect("scores")) {
        rows[i].llm_score = score;
    }
    Ok(Some(generator.model_id().to_string()))
}
