//! Beam search and Safe Beam Search (the paper's Algorithm 2) as a state machine over any model
//! that extends a state (a KV cache, or a token list in tests) by one token and returns the next
//! token's logits. The engine drives many searches at once: every step it gathers the
//! candidates each search [`proposes`](BeamSearch::propose), runs them through the model in one
//! batched forward pass, and hands each search its results ([`BeamSearch::advance`]).
//!
//! - **Beam search** (k beams): each step takes the k best of all beams' next tokens by
//!   cumulative log-probability; only those k are run through the model.
//! - **Safe Beam Search** (k beams, N candidates): each step takes the top N next tokens of
//!   every beam (the tag token is never one of them: it is never emitted), runs all k x N
//!   candidates through the model in one pass to read the look-ahead probability of the tag
//!   after each, discards the half of them with the highest tag probability (ties: the lower
//!   log-probability goes first), and keeps the k best of the rest by cumulative log-probability.
//!   With N >= 2k and equal tag probabilities it is beam search. The look-ahead pass also gives the kept beams' next-token distributions and KV entries, so a
//!   step costs one forward pass of k x N rows and no more.
//!
//! Both end a beam at a stop token (kept among the finished, the stop token not part of its
//! text) and stop when no running beam can beat the best finished one (log-probabilities only
//! fall) or at `max_tokens`; the result is the sequence with the highest cumulative
//! log-probability (no length normalisation, as in Algorithm 2).

use serde::{Deserialize, Serialize};

/// How the next tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "name")]
pub enum Decoder {
    /// One sequence: greedy at temperature 0, else temperature + top-p sampling.
    #[default]
    Sample,
    /// Beam search with `beams` beams.
    Beam { beams: usize },
    /// Safe Beam Search: `beams` beams, `candidates` next tokens per beam looked past.
    SafeBeam { beams: usize, candidates: usize },
}

impl Decoder {
    pub fn is_sample(&self) -> bool {
        *self == Decoder::Sample
    }

    /// A short name: `sample`, `beam`, `safe-beam`.
    pub fn name(&self) -> &'static str {
        match self {
            Decoder::Sample => "sample",
            Decoder::Beam { .. } => "beam",
            Decoder::SafeBeam { .. } => "safe-beam",
        }
    }

    /// Checks the widths: at least one beam, at least two candidates (half are discarded), each
    /// at most 64.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Decoder::Sample => Ok(()),
            Decoder::Beam { beams } if (1..=64).contains(&beams) => Ok(()),
            Decoder::SafeBeam { beams, candidates } if (1..=64).contains(&beams) && (2..=64).contains(&candidates) => {
                Ok(())
            }
            other => Err(format!(
                "{other:?}: beams must be 1..=64 and safe-beam candidates 2..=64"
            )),
        }
    }
}

/// What turns a logit into a log-probability: `(max, log_total)` with the probability of token
/// t being `exp(logits[t] - max - log_total)` (the exponentials summed in f64).
pub fn log_partition(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let total: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (max, total.ln() as f32)
}

/// Natural log-probabilities of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let (max, log_total) = log_partition(logits);
    logits.iter().map(|&v| v - max - log_total).collect()
}

/// One next token of one beam.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Index of the beam it extends (in the search's running beams).
    pub beam: usize,
    pub token: u32,
    /// Cumulative log-probability of the beam with this token.
    pub logp: f64,
}

/// What one Safe Beam Search step saw (kept when tracing): every candidate with its tag
/// probability, whether it survived the discard, and whether it was chosen as a beam.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEntry {
    pub candidate: Candidate,
    /// The tokens of the beam it extends, this token included.
    pub tokens: Vec<u32>,
    pub p_tag: f64,
    pub kept: bool,
    pub chosen: bool,
}

/// How a search ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub logp: f64,
    /// A stop token ended it (else `max_tokens` did).
    pub stopped: bool,
}

struct Beam<S> {
    state: S,
    tokens: Vec<u32>,
    logp: f64,
    /// Log-probabilities of the next token.
    next: Vec<f32>,
}

/// One beam or safe-beam search in progress.
pub struct BeamSearch<S> {
    beams: usize,
    candidates: usize,
    /// Safe Beam Search's tag token (also never emitted).
    tag: Option<u32>,
    stop: Vec<u32>,
    max_tokens: usize,
    running: Vec<Beam<S>>,
    finished: Vec<Outcome>,
    proposed: Vec<Candidate>,
    steps: usize,
    /// Every safe-beam step, when tracing.
    pub trace: Option<Vec<Vec<TraceEntry>>>,
}

impl<S> BeamSearch<S> {
    /// A search from `state` (the prompt), whose next-token logits are `logits`. `tag` is
    /// needed for [`Decoder::SafeBeam`].
    pub fn new(
        decoder: Decoder,
        tag: Option<u32>,
        stop: Vec<u32>,
        max_tokens: usize,
        state: S,
        logits: &[f32],
    ) -> Result<BeamSearch<S>, String> {
        decoder.validate()?;
        let (beams, candidates, tag) = match decoder {
            Decoder::Beam { beams } => (beams, beams, None),
            Decoder::SafeBeam { beams, candidates } => (
                beams,
                candidates,
                Some(tag.ok_or("safe-beam needs a model whose vocabulary has the tag token")?),
            ),
            Decoder::Sample => return Err("sampling is not a beam search".into()),
        };
        Ok(BeamSearch {
            beams,
            candidates,
            tag,
            stop,
            max_tokens,
            running: vec![Beam {
                state,
                tokens: Vec::new(),
                logp: 0.0,
                next: log_softmax(logits),
            }],
            finished: Vec::new(),
            proposed: Vec::new(),
            steps: 0,
            trace: None,
        })
    }

    /// The state of running beam `beam` (what a proposed candidate extends).
    pub fn state(&self, beam: usize) -> &S {
        &self.running[beam].state
    }

    /// The candidates to run through the model this step, or the outcome when the search is over.
    pub fn propose(&mut self) -> Result<&[Candidate], Outcome> {
        let best_running = self.running.iter().map(|b| b.logp).fold(f64::NEG_INFINITY, f64::max);
        let best_finished = self.finished.iter().map(|o| o.logp).fold(f64::NEG_INFINITY, f64::max);
        if self.running.is_empty() || self.steps >= self.max_tokens || best_finished >= best_running {
            return Err(self.outcome());
        }
        let mut all = Vec::new();
        for (b, beam) in self.running.iter().enumerate() {
            for (token, lp) in top_n(&beam.next, self.candidates, self.tag) {
                all.push(Candidate {
                    beam: b,
                    token,
                    logp: beam.logp + f64::from(lp),
                });
            }
        }
        all.sort_by(by_logp);
        self.proposed.clear();
        if all.is_empty() {
            // No usable next token (every log-probability NaN): the search ends here.
            self.running.clear();
            return Err(self.outcome());
        }
        if self.tag.is_some() {
            self.proposed = all;
        } else {
            for c in all.into_iter().take(self.beams) {
                if self.stop.contains(&c.token) {
                    self.finish(c);
                } else {
                    self.proposed.push(c);
                }
            }
            if self.proposed.is_empty() {
                self.running.clear();
                return Err(self.outcome());
            }
        }
        Ok(&self.proposed)
    }

    /// Takes the model's results for the proposed candidates, in order: each one's next-token
    /// logits and what [`adopt`] needs to make it a beam's state (`adopt(parent, extra)`; called
    /// only for the candidates that become beams).
    pub fn advance<D>(&mut self, looked: Vec<(Vec<f32>, D)>, adopt: &mut dyn FnMut(&S, D) -> S) {
        assert_eq!(looked.len(), self.proposed.len(), "one result per proposed candidate");
        let proposed = std::mem::take(&mut self.proposed);
        // Raw logits: only the candidates that become beams need a whole log-softmax.
        let mut results: Vec<Option<(Vec<f32>, D)>> = looked.into_iter().map(Some).collect();
        let chosen: Vec<usize> = match self.tag {
            None => (0..proposed.len()).collect(),
            Some(tag) => self.safe_choice(&proposed, &results, tag),
        };
        let mut next = Vec::with_capacity(chosen.len());
        for i in chosen {
            let c = proposed[i];
            if self.stop.contains(&c.token) {
                self.finish(c);
                continue;
            }
            // cannot fail: each index is chosen once.
            let (logits, extra) = results[i].take().expect("chosen once");
            let parent = &self.running[c.beam];
            let mut tokens = parent.tokens.clone();
            tokens.push(c.token);
            next.push(Beam {
                state: adopt(&parent.state, extra),
                tokens,
                logp: c.logp,
                next: log_softmax(&logits),
            });
        }
        self.running = next;
        self.steps += 1;
    }

    /// Algorithm 2's choice among all candidates: drop the half with the highest tag
    /// probability, then the best `beams` by log-probability. Returns indices into `proposed`.
    fn safe_choice<D>(&mut self, proposed: &[Candidate], results: &[Option<(Vec<f32>, D)>], tag: u32) -> Vec<usize> {
        let p_tag: Vec<f64> = results
            .iter()
            .map(|r| {
                r.as_ref().map_or(0.0, |(logits, _)| {
                    let (max, log_total) = log_partition(logits);
                    f64::from(logits[tag as usize] - max - log_total).exp()
                })
            })
            .collect();
        let mut order: Vec<usize> = (0..proposed.len()).collect();
        // `proposed` is sorted by log-probability, so a stable sort breaks tag ties by it.
        order.sort_by(|&a, &b| p_tag[a].total_cmp(&p_tag[b]));
        let kept = proposed.len().div_ceil(2);
        let mut survivors: Vec<usize> = order[..kept].to_vec();
        survivors.sort_unstable();
        let chosen: Vec<usize> = survivors.iter().copied().take(self.beams).collect();
        if let Some(trace) = &mut self.trace {
            let entry = |i: usize| {
                let c = proposed[i];
                let mut tokens = self.running[c.beam].tokens.clone();
                tokens.push(c.token);
                TraceEntry {
                    candidate: c,
                    tokens,
                    p_tag: p_tag[i],
                    kept: survivors.contains(&i),
                    chosen: chosen.contains(&i),
                }
            };
            trace.push((0..proposed.len()).map(entry).collect());
        }
        chosen
    }

    fn finish(&mut self, c: Candidate) {
        self.finished.push(Outcome {
            tokens: self.running[c.beam].tokens.clone(),
            logp: c.logp,
            stopped: true,
        });
    }

    /// The best finished or running sequence (a finished one on a tie).
    fn outcome(&self) -> Outcome {
        let running = self.running.iter().map(|b| Outcome {
            tokens: b.tokens.clone(),
            logp: b.logp,
            stopped: false,
        });
        self.finished
            .iter()
            .cloned()
            .chain(running)
            .reduce(|best, o| if o.logp > best.logp { o } else { best })
            .unwrap_or(Outcome {
                tokens: Vec::new(),
                logp: 0.0,
                stopped: true,
            })
    }
}

/// Candidates in search order: higher log-probability first, then lower beam, then lower token.
fn by_logp(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logp
        .total_cmp(&a.logp)
        .then(a.beam.cmp(&b.beam))
        .then(a.token.cmp(&b.token))
}

/// The `n` most probable tokens of `logprobs` (ties: lower id), never `banned`.
fn top_n(logprobs: &[f32], n: usize, banned: Option<u32>) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (id, &lp) in logprobs.iter().enumerate() {
        let id = id as u32;
        if Some(id) == banned || lp.is_nan() {
            continue;
        }
        if best.len() == n && best.last().is_some_and(|&(_, worst)| lp <= worst) {
            continue;
        }
        let at = best.partition_point(|&(_, v)| v >= lp);
        best.insert(at, (id, lp));
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests;
