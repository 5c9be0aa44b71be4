//! Choosing the next token from logits: greedy, or temperature with top-k, top-p and a repetition
//! penalty, from a seeded generator so that the same seed gives the same tokens.
use crate::validate::Sampling;

/// SplitMix64: tiny, fast, and with a fixed output for a fixed seed on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The first index of the largest value (ties go to the lower id, as llama.cpp's argmax does; NaNs are
/// never chosen unless every value is one, then 0).
///
/// Two passes the compiler vectorizes: the maximum over sixteen lanes, then the first index holding it.
/// The one-pass loop (compare with the best so far, remember its index) does not vectorize; over
/// SmolLM2's 49,152 logits it cost ~40 µs a sequence, on the engine thread while the compute team
/// waits: 1.6% of a 16-row decode step.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes.into_iter().chain(tail.iter().copied()).fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// log softmax(logits)[id], computed stably.
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    ((logits[id as usize] - max) as f64 - sum.ln()) as f32
}

/// The `k` most likely tokens and their log-probabilities (log-softmax of the raw logits), best first;
/// ties go to the lower id.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if best.len() == k && x <= logits[best[k - 1] as usize] {
            continue;
        }
        let at = best.partition_point(|&b| logits[b as usize] >= x);
        best.insert(at, i as u32);
        best.truncate(k);
    }
    best.into_iter().map(|i| (i, (logits[i as usize] as f64 - lse) as f32)).collect()
}

/// Picks the next token. `history` is the prompt and output so far (for the repetition penalty).
pub fn sample(logits: &mut [f32], history: &[u32], cfg: &Sampling, rng: &mut Rng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &t in history {
            if seen.insert(t)
                && let Some(l) = logits.get_mut(t as usize)
            {
                // CTRL's penalty, as llama.cpp and HF apply it.
                *l = if *l > 0.0 { *l / cfg.repetition_penalty } else { *l * cfg.repetition_penalty };
            }
        }
    }
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let mut candidates: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, l / cfg.temperature)).collect();
    // Highest first; ties by id so that the order (and thus the draw) is deterministic.
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 {
        candidates.truncate(cfg.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut draw = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if draw < *p {
            return candidates[i].0;
        }
        draw -= p;
    }
    candidates[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logprobs_are_the_best_in_order_and_agree_with_logprob() {
        let l = vec![0.5, 3.0, -1.0, 3.0, 2.0];
        let top = top_logprobs(&l, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 4]);
        for (id, lp) in &top {
            assert!((lp - logprob(&l, *id)).abs() < 1e-6);
        }
        let all: f64 = top_logprobs(&l, 5).iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((all - 1.0).abs() < 1e-6);
        assert!(top_logprobs(&l, 0).is_empty());
    }

    /// The vectorized argmax is the one-pass scan's choice: ties (across lanes and the tail) go low,
    /// infinities count, NaNs are skipped.
    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |l: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &x) in l.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > l[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut rng = Rng::new(3);
        for len in [1usize, 15, 16, 17, 33, 49_152] {
            for trial in 0..20 {
                // Few distinct values, so ties are common, some of them between a lane and the tail.
                let mut l: Vec<f32> = (0..len).map(|_| (rng.next_f64() * 8.0).floor() as f32 - 4.0).collect();
                match trial % 4 {
                    1 => l[rng.next_u64() as usize % len] = f32::NAN,
                    2 => l[rng.next_u64() as usize % len] = f32::INFINITY,
                    3 => l.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                    _ => {}
                }
                assert_eq!(argmax(&l), scan(&l), "len {len} trial {trial}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
    }

    #[test]
    fn greedy_takes_the_largest_and_ties_go_low() {
        let mut l = vec![0.1, 3.0, 3.0, -1.0];
        assert_eq!(sample(&mut l, &[], &Sampling::default(), &mut Rng::new(1)), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let cfg = Sampling { temperature: 1.0, seed: 7, ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20).map(|_| sample(&mut logits.clone(), &[], &cfg, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits: Vec<f32> = vec![0.5, 2.0, 1.0];
        let k1 = Sampling { temperature: 5.0, top_k: 1, ..Default::default() };
        let p = Sampling { temperature: 5.0, top_p: 1e-6, ..Default::default() };
        for seed in 0..20 {
            assert_eq!(sample(&mut logits.clone(), &[], &k1, &mut Rng::new(seed)), 1);
            assert_eq!(sample(&mut logits.clone(), &[], &p, &mut Rng::new(seed)), 1);
        }
    }

    #[test]
    fn the_repetition_penalty_demotes_seen_tokens() {
        let cfg = Sampling { repetition_penalty: 2.0, ..Default::default() };
        let mut l = vec![1.0, 1.5, 0.2];
        assert_eq!(sample(&mut l, &[1], &cfg, &mut Rng::new(0)), 0);
        assert_eq!(l[1], 0.75);
    }

    #[test]
    fn logprob_is_a_log_softmax() {
        let l = vec![0.0f32, 0.0];
        assert!((logprob(&l, 0) - 0.5f32.ln()).abs() < 1e-6);
    }
}
