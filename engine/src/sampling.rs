//! Choosing the next token from the logits, as OpenAI's API defines the knobs: logit bias and
//! presence / frequency penalties on the logits, then greedy at temperature 0, else a draw
//! from softmax(logits / temperature) restricted to the top_p nucleus. Each request draws from
//! its own generator, seeded by its `seed` when it has one, so the same seed and request give
//! the same tokens.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1].
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Text that ends the answer (not included in it).
    pub stop: Vec<String>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the chosen token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

/// The model's log-probability of a token and of its most likely alternatives, before any
/// penalty, bias or temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token, and its log-probabilities when asked for.
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, Option<TokenLogprob>) {
        let log_probs = self.params.logprobs.map(|_| log_softmax(logits));
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                logits[t as usize] -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        let token = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.counts.entry(token).or_default() += 1;
        let logprob = log_probs.map(|lp| {
            let n = self.params.logprobs.unwrap_or(0);
            TokenLogprob {
                logprob: lp[token as usize],
                top: top_k(&lp, n),
            }
        });
        (token, logprob)
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f32> = logits.iter().map(|&l| ((l - m) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        if self.params.top_p >= 1.0 {
            let mut u = self.rng.random::<f32>() * total;
            for (i, &p) in probs.iter().enumerate() {
                u -= p;
                if u < 0.0 {
                    return i as u32;
                }
            }
            return argmax(&probs);
        }
        // The smallest set of most likely tokens whose mass reaches top_p.
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let want = self.params.top_p * total;
        let mut mass = 0.0;
        let mut keep = 0;
        for &i in &order {
            mass += probs[i as usize];
            keep += 1;
            if mass >= want {
                break;
            }
        }
        let mut u = self.rng.random::<f32>() * mass;
        for &i in &order[..keep] {
            u -= probs[i as usize];
            if u < 0.0 {
                return i;
            }
        }
        order[keep - 1]
    }
}

/// The first index of the largest value.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = x.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32 + m;
    x.iter().map(|&v| v - lse).collect()
}

fn top_k(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    order.truncate(k);
    order.sort_unstable_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    order.into_iter().map(|t| (t, lp[t as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
            ..Default::default()
        }
    }

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n).map(|_| s.sample(&mut logits.to_vec()).0).collect()
    }

    #[test]
    fn greedy_at_temperature_zero_and_seeded_draws_repeat() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert!(
            draws(params(0.0, 1.0, 1), &logits, 5)
                .iter()
                .all(|&t| t == 1)
        );
        let a = draws(params(1.0, 1.0, 7), &logits, 50);
        assert_eq!(a, draws(params(1.0, 1.0, 7), &logits, 50));
        assert_ne!(a, draws(params(1.0, 1.0, 8), &logits, 50));
        // Unlikely tokens do come up at temperature 1.
        assert!(a.contains(&0) || a.contains(&3));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let d = draws(params(1.0, 0.8, 3), &logits, 400);
        assert!(d.iter().all(|&t| t < 2), "{d:?}");
        assert!(d.contains(&1));
    }

    #[test]
    fn penalties_and_bias_move_the_choice() {
        let logits = [1.0, 0.9];
        let mut p = params(0.0, 1.0, 0);
        p.frequency_penalty = 0.5;
        // The first pick is penalised, so the greedy choice alternates.
        assert_eq!(draws(p.clone(), &logits, 3), vec![0, 1, 0]);
        p.frequency_penalty = 0.0;
        p.logit_bias = vec![(1, 5.0)];
        assert_eq!(draws(p, &logits, 2), vec![1, 1]);
    }

    #[test]
    fn logprobs_are_the_models_before_temperature() {
        let mut p = params(2.0, 1.0, 0);
        p.logprobs = Some(2);
        let mut s = Sampler::new(p);
        let (t, lp) = s.sample(&mut [0.0, (3f32).ln(), -1e9]);
        let lp = lp.unwrap();
        assert!((lp.top[0].1 - 0.75f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 1);
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.logprob, if t == 1 { lp.top[0].1 } else { lp.top[1].1 });
    }
}
