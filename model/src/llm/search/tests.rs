//! The searches over unit-level models whose every probability is known: a table of logits
//! from a hash of the tokens so far, with the tag's probability set per continuation.

use super::*;

const VOCAB: usize = 10;
const TAG: u32 = 9;
const STOP: u32 = 0;

/// Deterministic pseudo-random logits for the continuation of `tokens`; the tag's logit is
/// `tag(tokens)` (`-inf`: the tag is never likely).
fn model(tokens: &[u32], tag: &dyn Fn(&[u32]) -> f32) -> Vec<f32> {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(0x1000_0000_01b3).rotate_left(17);
    }
    let mut logits: Vec<f32> = (0..VOCAB as u64)
        .map(|i| {
            let x = (h ^ i.wrapping_mul(0xff51_afd7_ed55_8ccd)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    // Stopping is rare, so searches run for several steps.
    logits[STOP as usize] -= 2.5;
    logits[TAG as usize] = tag(tokens);
    logits
}

/// Runs one search to its end, one candidate at a time.
fn search(decoder: Decoder, prompt: &[u32], tag: &dyn Fn(&[u32]) -> f32) -> (Outcome, Vec<Vec<TraceEntry>>) {
    let mut s = BeamSearch::new(decoder, Some(TAG), vec![STOP], 12, prompt.to_vec(), &model(prompt, tag)).unwrap();
    s.trace = Some(Vec::new());
    loop {
        let candidates = match s.propose() {
            Ok(c) => c.to_vec(),
            Err(outcome) => return (outcome, s.trace.take().unwrap()),
        };
        let looked = candidates
            .iter()
            .map(|c| {
                let mut t = s.state(c.beam).clone();
                t.push(c.token);
                (model(&t, tag), t)
            })
            .collect();
        s.advance(looked, &mut |_, t| t);
    }
}

/// Algorithm 2 written out directly: full sorts over explicit candidate lists, the tag
/// probability of each candidate computed on its own.
fn reference(beams: usize, n: usize, prompt: &[u32], tag: &dyn Fn(&[u32]) -> f32) -> (Vec<u32>, f64) {
    let mut running: Vec<(Vec<u32>, f64)> = vec![(prompt.to_vec(), 0.0)];
    let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
    for _ in 0..12 {
        let best_running = running.iter().map(|b| b.1).fold(f64::NEG_INFINITY, f64::max);
        if running.is_empty() || finished.iter().any(|f| f.1 >= best_running) {
            break;
        }
        let mut candidates = Vec::new();
        for (tokens, logp) in &running {
            let lp = log_softmax(&model(tokens, tag));
            let mut ids: Vec<u32> = (0..VOCAB as u32).filter(|&t| t != TAG).collect();
            ids.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
            for &t in ids.iter().take(n) {
                let mut next = tokens.clone();
                next.push(t);
                let p_tag = f64::from(log_softmax(&model(&next, tag))[TAG as usize]).exp();
                candidates.push((next, logp + f64::from(lp[t as usize]), p_tag));
            }
        }
        candidates.sort_by(|a, b| a.2.total_cmp(&b.2).then(b.1.total_cmp(&a.1)));
        candidates.truncate(candidates.len().div_ceil(2));
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        running.clear();
        for (tokens, logp, _) in candidates.into_iter().take(beams) {
            if *tokens.last().unwrap() == STOP {
                finished.push((tokens[..tokens.len() - 1].to_vec(), logp));
            } else {
                running.push((tokens, logp));
            }
        }
    }
    let best = finished
        .into_iter()
        .chain(running)
        .reduce(|best, o| if o.1 > best.1 { o } else { best })
        .unwrap();
    (best.0[prompt.len()..].to_vec(), best.1)
}

fn never(_: &[u32]) -> f32 {
    f32::NEG_INFINITY
}

/// The tag follows odd tokens: its logit after a continuation is known from the last token.
fn after_odd(tokens: &[u32]) -> f32 {
    match tokens.last() {
        Some(t) if t % 2 == 1 => 3.0 + *t as f32 / 4.0,
        Some(t) => -3.0 - *t as f32 / 4.0,
        None => -3.0,
    }
}

#[test]
fn safe_beam_equals_beam_search_when_the_tag_is_never_likely() {
    for prompt in [[1u32, 2], [3, 4], [5, 6], [7, 8], [2, 2]] {
        for beams in [1, 2, 3] {
            let (plain, _) = search(Decoder::Beam { beams }, &prompt, &never);
            // With N >= 2k the kept half always holds the k best (even on the first step, from
            // one beam), so equal tag probabilities leave plain beam search.
            let (safe, trace) = search(
                Decoder::SafeBeam {
                    beams,
                    candidates: 2 * beams,
                },
                &prompt,
                &never,
            );
            assert_eq!(plain, safe, "prompt {prompt:?}, {beams} beams");
            assert!(!trace.is_empty());
        }
    }
}

#[test]
fn safe_beam_drops_exactly_the_riskier_half_each_step() {
    for prompt in [[1u32, 2], [3, 4], [5, 6], [7, 8], [2, 2]] {
        for (beams, n) in [(1, 2), (2, 4), (3, 3), (4, 8)] {
            let (outcome, trace) = search(Decoder::SafeBeam { beams, candidates: n }, &prompt, &after_odd);
            for step in &trace {
                let kept: Vec<&TraceEntry> = step.iter().filter(|e| e.kept).collect();
                assert_eq!(kept.len(), step.len().div_ceil(2));
                let highest_kept = kept.iter().map(|e| e.p_tag).fold(0.0, f64::max);
                for e in step.iter().filter(|e| !e.kept) {
                    assert!(
                        e.p_tag >= highest_kept,
                        "a discarded candidate was safer than a kept one: {e:?}"
                    );
                }
                // The tag follows odd tokens: whenever the even tokens fill half the
                // candidates, every odd one is dropped.
                let even = step.iter().filter(|e| e.candidate.token % 2 == 0).count();
                if even >= kept.len() {
                    assert!(kept.iter().all(|e| e.candidate.token % 2 == 0), "{step:?}");
                }
                assert!(
                    step.iter().all(|e| e.candidate.token != TAG),
                    "the tag is never a candidate"
                );
                assert!(step.iter().filter(|e| e.chosen).all(|e| e.kept));
            }
            let (tokens, logp) = reference(beams, n, &prompt, &after_odd);
            assert_eq!((&outcome.tokens, outcome.logp), (&tokens, logp), "prompt {prompt:?}");
        }
    }
}

#[test]
fn one_beam_is_greedy_decoding() {
    let prompt = [4u32, 1];
    let (outcome, _) = search(Decoder::Beam { beams: 1 }, &prompt, &never);
    let mut tokens = prompt.to_vec();
    for _ in 0..12 {
        let lp = log_softmax(&model(&tokens, &never));
        let best = (0..VOCAB)
            .max_by(|&a, &b| lp[a].total_cmp(&lp[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        if best == STOP {
            break;
        }
        tokens.push(best);
    }
    assert_eq!(outcome.tokens, tokens[prompt.len()..]);
}

#[test]
fn widths_are_checked_and_safe_beam_needs_a_tag() {
    assert!(
        Decoder::SafeBeam {
            beams: 2,
            candidates: 1
        }
        .validate()
        .is_err()
    );
    assert!(Decoder::Beam { beams: 0 }.validate().is_err());
    let err = BeamSearch::new(
        Decoder::SafeBeam {
            beams: 2,
            candidates: 4,
        },
        None,
        vec![],
        4,
        (),
        &[0.0; 3],
    );
    assert!(err.err().unwrap().contains("tag token"));
}

#[test]
fn top_n_orders_by_probability_then_id_and_skips_the_banned_token() {
    let lp = [0.5, 0.9, 0.9, 0.1, f32::NAN, 0.95];
    assert_eq!(top_n(&lp, 3, Some(5)), vec![(1, 0.9), (2, 0.9), (0, 0.5)]);
    assert_eq!(top_n(&lp, 2, None), vec![(5, 0.95), (1, 0.9)]);
}

#[test]
fn a_model_without_usable_logits_ends_the_search_without_candidates() {
    for decoder in [
        Decoder::Beam { beams: 2 },
        Decoder::SafeBeam {
            beams: 2,
            candidates: 4,
        },
    ] {
        let mut s = BeamSearch::new(decoder, Some(TAG), vec![STOP], 5, (), &[f32::NAN; VOCAB]).unwrap();
        let outcome = s.propose().expect_err("no candidate to run");
        assert!(outcome.tokens.is_empty(), "{decoder:?}: {outcome:?}");
    }
}
