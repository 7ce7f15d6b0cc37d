//! The engine's generation loop: continuous batching of requests, each decoded by its own
//! [`Decoder`] (sampling, beam search, Safe Beam Search).
//!
//! Each step gathers, from every running request, the rows it needs: one token per sampling
//! sequence, the candidates of every beam search ([`BeamSearch::propose`]), then prompt chunks
//! within `step_tokens`. One [`LlamaEngine::forward`] runs them all; each request takes its
//! results back. A finished request makes room for the next one (at most `max_batch` requests
//! run at once). A request's result never depends on which others shared its steps.

use super::engine::{KvCache, KvDelta, LlamaEngine, StepOutput};
use super::sampling::Sampler;
use super::search::{BeamSearch, Candidate, Decoder, Outcome};
use super::{FinishReason, GenerateError, Generation, SamplingParams};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a request is.
enum Phase {
    /// Its prompt is being fed (`fed` tokens are in the cache).
    Prefill { cache: KvCache, fed: usize },
    /// One sampled sequence.
    Sample {
        cache: KvCache,
        generated: Vec<u32>,
        sampler: Sampler,
    },
    /// A beam or safe-beam search; `proposed` are this step's candidates.
    Beams {
        search: BeamSearch<KvCache>,
        proposed: Vec<Candidate>,
    },
}

struct Active {
    index: usize,
    phase: Phase,
}

/// What one row group of a step belongs to.
enum Role {
    /// A prompt chunk ending at prompt position `end`.
    Prefill {
        end: usize,
    },
    Sample,
    /// `count` beam candidates.
    Beams {
        count: usize,
    },
}

impl LlamaEngine {
    /// Generates a completion for each prompt (token ids), each with its own sampling settings
    /// and decoder, with continuous batching: up to `max_batch` requests decode together, a
    /// finished one makes room for the next prompt. `done(i, result)` is called as each
    /// finishes, in completion order; `tokens` counts generated tokens as they are chosen (for
    /// live tokens/s; a beam search's when it ends).
    pub fn generate_ids(
        &self,
        prompts: &[(Vec<u32>, SamplingParams)],
        max_batch: usize,
        tokens: &AtomicU64,
        done: &mut dyn FnMut(usize, Result<Generation, GenerateError>),
    ) {
        let mut queue = (0..prompts.len()).rev().collect::<Vec<usize>>();
        let mut active: Vec<Active> = Vec::new();
        let max_batch = max_batch.max(1);
        loop {
            while active.len() < max_batch {
                let Some(index) = queue.pop() else { break };
                let (prompt, params) = &prompts[index];
                match self.admit(prompt, params) {
                    Ok(()) => active.push(Active {
                        index,
                        phase: Phase::Prefill {
                            cache: self.new_cache(),
                            fed: 0,
                        },
                    }),
                    Err(e) => done(index, Err(e)),
                }
            }
            if active.is_empty() {
                return;
            }
            // Beam searches say what they need (or that they are over).
            let mut finished: Vec<usize> = Vec::new();
            for (i, a) in active.iter_mut().enumerate() {
                if let Phase::Beams { search, proposed } = &mut a.phase {
                    match search.propose() {
                        Ok(c) => *proposed = c.to_vec(),
                        Err(outcome) => {
                            tokens.fetch_add(outcome.tokens.len() as u64, Ordering::Relaxed);
                            done(a.index, self.finish_beams(outcome, &prompts[a.index]));
                            finished.push(i);
                        }
                    }
                }
            }
            remove(&mut active, finished);
            if active.is_empty() {
                continue;
            }
            let outputs;
            let roles: Vec<(usize, Role)>;
            {
                // This step's rows: decoding rows first, then prompt chunks within the budget.
                let mut work: Vec<(&KvCache, Vec<u32>)> = Vec::new();
                let mut plan: Vec<(usize, Role)> = Vec::new();
                for (i, a) in active.iter().enumerate() {
                    match &a.phase {
                        Phase::Sample { cache, generated, .. } => {
                            // cannot fail: a sampling sequence starts with its first token.
                            work.push((cache, vec![*generated.last().expect("a sampled token")]));
                            plan.push((i, Role::Sample));
                        }
                        Phase::Beams { search, proposed } => {
                            for c in proposed {
                                work.push((search.state(c.beam), vec![c.token]));
                            }
                            plan.push((i, Role::Beams { count: proposed.len() }));
                        }
                        Phase::Prefill { .. } => {}
                    }
                }
                let mut budget = self.step_tokens.saturating_sub(work.len()).max(1);
                for (i, a) in active.iter().enumerate() {
                    if let Phase::Prefill { cache, fed } = &a.phase
                        && budget > 0
                    {
                        let prompt = &prompts[a.index].0;
                        let take = (prompt.len() - fed).min(budget);
                        budget -= take;
                        work.push((cache, prompt[*fed..fed + take].to_vec()));
                        plan.push((i, Role::Prefill { end: fed + take }));
                    }
                }
                let items: Vec<(&KvCache, &[u32])> = work.iter().map(|(c, t)| (*c, &t[..])).collect();
                outputs = self.forward(&items, false);
                roles = plan;
            }
            let mut outputs = outputs.into_iter();
            let mut finished: Vec<usize> = Vec::new();
            for (i, role) in roles {
                let a = &mut active[i];
                let (prompt, params) = &prompts[a.index];
                let result = match role {
                    Role::Prefill { end } => {
                        // cannot fail: one output per work item.
                        let out = outputs.next().expect("an output per item");
                        self.prefilled(a, end, out, prompt, params, tokens)
                    }
                    Role::Sample => {
                        let StepOutput { logits, delta } = outputs.next().expect("an output per item");
                        let Phase::Sample {
                            cache,
                            generated,
                            sampler,
                        } = &mut a.phase
                        else {
                            unreachable!("planned as sampling")
                        };
                        cache.append(&delta);
                        self.sample_next(cache, generated, sampler, &logits, prompt, params, tokens)
                    }
                    Role::Beams { count } => {
                        let looked: Vec<(Vec<f32>, KvDelta)> =
                            outputs.by_ref().take(count).map(|o| (o.logits, o.delta)).collect();
                        let Phase::Beams { search, .. } = &mut a.phase else {
                            unreachable!("planned as beams")
                        };
                        search.advance(looked, &mut |parent: &KvCache, delta: KvDelta| {
                            let mut cache = parent.clone();
                            cache.append(&delta);
                            cache
                        });
                        None
                    }
                };
                if let Some(result) = result {
                    done(a.index, result);
                    finished.push(i);
                }
            }
            remove(&mut active, finished);
        }
    }

    /// Checks a request before it takes a place in the batch.
    fn admit(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::Rejected("the prompt is empty".into()));
        }
        if prompt.len() >= self.shape.context {
            return Err(GenerateError::Rejected(format!(
                "the prompt has {} tokens; the model's context is {}",
                prompt.len(),
                self.shape.context
            )));
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= self.shape.vocab) {
            return Err(GenerateError::Rejected(format!(
                "token id {id} is outside the model's vocabulary of {}",
                self.shape.vocab
            )));
        }
        params.decoder.validate().map_err(GenerateError::Rejected)?;
        if matches!(params.decoder, Decoder::SafeBeam { .. }) && self.tag_id().is_none() {
            return Err(GenerateError::Rejected(format!(
                "safe-beam needs a model whose vocabulary has the tag token {:?}; {} has none",
                crate::tokenizer::DEFAULT_TAG,
                self.identity()
            )));
        }
        Ok(())
    }

    /// Books a prompt chunk; when the prompt is all in, starts the request's decoder on the
    /// logits after its last token. Returns the result when the request is already over.
    fn prefilled(
        &self,
        a: &mut Active,
        end: usize,
        out: StepOutput,
        prompt: &[u32],
        params: &SamplingParams,
        tokens: &AtomicU64,
    ) -> Option<Result<Generation, GenerateError>> {
        let Phase::Prefill { cache, fed } = &mut a.phase else {
            unreachable!("planned as a prefill")
        };
        cache.append(&out.delta);
        *fed = end;
        if end < prompt.len() {
            return None;
        }
        let cache = std::mem::replace(cache, self.new_cache());
        if params.max_tokens == 0 {
            return Some(self.generation(&[], FinishReason::Length, prompt, params));
        }
        match params.decoder {
            Decoder::Sample => {
                let mut cache = cache;
                let mut generated = Vec::new();
                let mut sampler = Sampler::new(params);
                let result = self.sample_next(
                    &mut cache,
                    &mut generated,
                    &mut sampler,
                    &out.logits,
                    prompt,
                    params,
                    tokens,
                );
                a.phase = Phase::Sample {
                    cache,
                    generated,
                    sampler,
                };
                result
            }
            decoder => {
                // Room for the generated tokens within the context: the last one is fed at
                // position context - 1.
                let room = self.shape.context.saturating_sub(prompt.len());
                match BeamSearch::new(
                    decoder,
                    self.tag_id(),
                    self.stop_ids().to_vec(),
                    params.max_tokens.min(room),
                    cache,
                    &out.logits,
                ) {
                    Ok(search) => {
                        a.phase = Phase::Beams {
                            search,
                            proposed: Vec::new(),
                        };
                        None
                    }
                    Err(e) => Some(Err(GenerateError::Rejected(e))),
                }
            }
        }
    }

    /// Samples the next token of a sequence from `logits`; returns its result when it is over.
    #[allow(clippy::too_many_arguments)]
    fn sample_next(
        &self,
        cache: &mut KvCache,
        generated: &mut Vec<u32>,
        sampler: &mut Sampler,
        logits: &[f32],
        prompt: &[u32],
        params: &SamplingParams,
        tokens: &AtomicU64,
    ) -> Option<Result<Generation, GenerateError>> {
        let token = sampler.sample(logits);
        tokens.fetch_add(1, Ordering::Relaxed);
        let reason = if self.stop_ids().contains(&token) {
            FinishReason::Stop
        } else {
            generated.push(token);
            if generated.len() >= params.max_tokens || cache.len() + 1 >= self.shape.context {
                FinishReason::Length
            } else if !params.stop.is_empty() {
                let text = self.tokenizer().decode(generated).unwrap_or_default();
                if params.stop.iter().any(|s| text.contains(s.as_str())) {
                    FinishReason::Stop
                } else {
                    return None;
                }
            } else {
                return None;
            }
        };
        Some(self.generation(generated, reason, prompt, params))
    }

    fn finish_beams(
        &self,
        outcome: Outcome,
        request: &(Vec<u32>, SamplingParams),
    ) -> Result<Generation, GenerateError> {
        let reason = if outcome.stopped {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        self.generation(&outcome.tokens, reason, &request.0, &request.1)
    }

    /// The text of `generated`, cut at the first stop string.
    fn generation(
        &self,
        generated: &[u32],
        mut reason: FinishReason,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation, GenerateError> {
        let mut text = self
            .tokenizer()
            .decode(generated)
            .map_err(|e| GenerateError::Rejected(e.to_string()))?;
        if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            reason = FinishReason::Stop;
        }
        Ok(Generation {
            text,
            finish_reason: reason,
            prompt_tokens: prompt.len() as u32,
            completion_tokens: generated.len() as u32,
        })
    }
}

/// Removes the entries at `indices` (ascending) from `active`.
fn remove(active: &mut Vec<Active>, indices: Vec<usize>) {
    for i in indices.into_iter().rev() {
        active.remove(i);
    }
}
