//! Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a per-request seed,
//! so a request gives the same text on every run and in any batch.

use super::SamplingParams;
use crate::rng::Normal;

pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: Normal,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Sampler {
        Sampler {
            temperature: params.temperature,
            top_p: params.top_p,
            rng: Normal::new(params.seed),
        }
    }

    /// Picks a token from `logits` (ties go to the lowest id).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, ((v - max) / self.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        // Highest probability first; equal ones by id, so the order is fully determined.
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0f32;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.top_p {
                break;
            }
        }
        let uniform = (self.rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 * mass;
        let mut acc = 0f32;
        for p in &probs[..kept] {
            acc += p.1;
            if uniform < acc {
                return p.0;
            }
        }
        probs[kept - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_top_p_limits_the_choice() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        assert_eq!(Sampler::new(&params(0.0, 1.0, 0)).sample(&logits), 1);
        // top_p small enough keeps only the most likely token.
        let mut s = Sampler::new(&params(1.0, 0.1, 7));
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // Full nucleus at a high temperature reaches the other tokens, reproducibly per seed.
        let draws = |seed| {
            let mut s = Sampler::new(&params(5.0, 1.0, seed));
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let a = draws(3);
        assert_eq!(a, draws(3));
        assert_ne!(a, draws(4));
        for t in 0..4 {
            assert!(a.contains(&t), "token {t} never drawn");
        }
    }
}
