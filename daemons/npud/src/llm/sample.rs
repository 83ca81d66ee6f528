//! Choosing the next token from logits, and ending on stop strings.

use rand::{Rng, SeedableRng};

/// How a request samples; see `GenerateRequest` for each field.
#[derive(Debug, Clone)]
pub struct Params {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

pub struct Sampler {
    p: Params,
    rng: rand::rngs::StdRng,
    /// How often each token was generated (for presence and frequency).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens seen in the prompt or generated (for repetition).
    seen: std::collections::HashSet<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sampler({:?})", self.p)
    }
}

impl Sampler {
    pub fn new(p: Params, seed: u64, prompt: &[u32]) -> Sampler {
        Sampler {
            p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            counts: Default::default(),
            seen: prompt.iter().copied().collect(),
        }
    }

    pub fn greedy(&self) -> bool {
        self.p.temperature <= 0.0 || self.p.top_k == 1
    }

    /// Picks the next token from `logits` (one per vocabulary entry) and
    /// records it.
    pub fn next(&mut self, logits: &mut [f32]) -> u32 {
        self.penalize(logits);
        let id = if self.greedy() {
            argmax(logits)
        } else {
            self.sample(logits)
        };
        *self.counts.entry(id).or_default() += 1;
        self.seen.insert(id);
        id
    }

    fn penalize(&self, logits: &mut [f32]) {
        let r = self.p.repetition_penalty;
        if r != 1.0 && r > 0.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if self.p.presence_penalty != 0.0 || self.p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.p.presence_penalty + self.p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        // Highest first; ties by lower id, so a seed gives one answer.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.p.top_k > 0 {
            cand.truncate(self.p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.p.min_p > 0.0 {
            let floor = probs[0] * self.p.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            let n = probs
                .iter()
                .take_while(|&&p| {
                    let inside = acc < self.p.top_p;
                    acc += p;
                    inside
                })
                .count();
            keep = keep.min(n.max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut x = self.rng.random::<f32>() * total;
        for i in 0..keep {
            x -= probs[i];
            if x <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// The first highest logit's index.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value sixteen lanes at a time (a loop the compiler turns
    // into vector instructions), then where it first occurs. NaN is never
    // the largest.
    const LANES: usize = 16;
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = larger(*m, x);
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, larger);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Text on its way out, held back while it could be the start of a stop
/// string, so a stop string split across tokens is never sent.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    pending: String,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns what may be sent now and whether a stop string
    /// was reached (the text before it is what is returned).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that begins some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// What is still held back, at the end of the stream.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> Params {
        Params {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    #[test]
    fn a_stop_string_across_pieces_stops_and_is_never_sent() {
        let mut s = StopText::new(vec!["<END>".into()]);
        assert_eq!(s.push("Hello <E"), ("Hello ".to_string(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("D> more"), (String::new(), true));
        let mut s = StopText::new(vec!["ab".into()]);
        assert_eq!(s.push("xa"), ("x".to_string(), false));
        assert_eq!(s.push("c"), ("ac".to_string(), false));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn greedy_takes_the_first_of_the_largest_and_never_nan() {
        let mut l = vec![0.0f32; 49_155];
        assert_eq!(argmax(&l), 0);
        l[40_000] = 2.0;
        l[45_001] = 2.0;
        assert_eq!(argmax(&l), 40_000);
        // In the tail after the last whole lane of sixteen.
        l[49_154] = 3.0;
        assert_eq!(argmax(&l), 49_154);
        l[7] = f32::NAN;
        assert_eq!(argmax(&l), 49_154);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn a_seed_makes_sampling_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0), seed, &[]);
            (0..20)
                .map(|_| s.next(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn penalties_and_cutoffs_change_the_choice() {
        let mut g = Sampler::new(params(0.0), 0, &[]);
        assert_eq!(g.next(&mut [1.0, 3.0, 2.0]), 1);
        let mut p = params(0.0);
        p.frequency_penalty = 2.0;
        let mut s = Sampler::new(p, 0, &[]);
        assert_eq!(s.next(&mut [1.0, 3.0, 2.0]), 1);
        // Token 1 was generated once: 3.0 - 2.0 < 2.0.
        assert_eq!(s.next(&mut [1.0, 3.0, 2.0]), 2);
        let mut p = params(1.0);
        p.top_k = 1;
        assert!(Sampler::new(p, 0, &[]).greedy());
        let mut p = params(1.0);
        p.min_p = 0.9;
        let mut s = Sampler::new(p, 3, &[]);
        for _ in 0..20 {
            assert_eq!(s.next(&mut [0.0, 10.0, 0.0]), 1);
        }
    }
}
