//! Token selection and the prefill-then-decode loop of the Thinker.
//!
//! Logit processing follows transformers' order: repetition penalty over every id seen so far
//! (prompt included), then temperature, top-k, top-p; temperature 0 is greedy (argmax, the lowest
//! id on ties, as `torch.argmax`).

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::thinker::{argmax, rope::text_positions, Deepstack, KvCache, ThinkerText};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 = off.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            anyhow::bail!("--temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be at least 1");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            anyhow::bail!("--repetition-penalty must be > 0, got {}", self.repetition_penalty);
        }
        Ok(())
    }
}

/// Stateful sampler (owns the RNG).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Picks the next id from `logits`, given every id seen so far.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        apply_repetition_penalty(logits, seen, self.params.repetition_penalty as f32);
        if self.params.is_greedy() {
            return argmax(logits) as u32;
        }
        let t = self.params.temperature as f32;
        logits.iter_mut().for_each(|l| *l /= t);
        if let Some(k) = self.params.top_k {
            keep_top_k(logits, k);
        }
        if let Some(p) = self.params.top_p {
            keep_top_p(logits, p as f32);
        }
        let probs = softmax(logits);
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return i as u32;
            }
        }
        argmax(&probs) as u32
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: divide positive logits, multiply negative ones.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && done.insert(i) {
            let l = logits[i];
            logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
        }
    }
}

/// Masks everything below the k-th largest logit (ties with it are kept, as transformers does).
pub fn keep_top_k(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    logits.iter_mut().filter(|l| **l < threshold).for_each(|l| *l = f32::NEG_INFINITY);
}

/// Nucleus filtering as transformers' `TopPLogitsWarper`: drop the low tail whose cumulative
/// probability is at most `1 - p`, always keeping the most likely token.
pub fn keep_top_p(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b])); // ascending
    let mut cum = 0.0f32;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - p && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Eos,
    Length,
    Cancelled,
}

/// The Thinker's answer to one prompt.
#[derive(Debug, Clone)]
pub struct ThinkerOutput {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, eos excluded.
    pub token_ids: Vec<u32>,
    /// The eos id that ended generation, if one did.
    pub stop_id: Option<u32>,
    pub finish: FinishReason,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Stopping rules of one generation.
#[derive(Debug, Clone)]
pub struct StopRule {
    pub eos_ids: Vec<u32>,
    pub max_new_tokens: usize,
}

/// Query rows per prefill step: attention scores then take `heads × PREFILL_CHUNK × context` floats
/// instead of `heads × context²`, so a 10-minute audio prompt does not need quadratic memory.
pub const PREFILL_CHUNK: usize = 512;

/// Runs the prompt through the model in chunks of [`PREFILL_CHUNK`] tokens; returns the last
/// chunk's final hidden states `[1, n, hidden]`.
pub fn prefill(model: &ThinkerText, embeds: &Tensor, positions: &[Vec<i64>; 3], cache: &mut KvCache) -> Result<Tensor> {
    prefill_with_deepstack(model, embeds, positions, None, cache)
}

/// As [`prefill`], adding an image prompt's deepstack features (see [`ThinkerText::forward_with_deepstack`]).
pub fn prefill_with_deepstack(
    model: &ThinkerText,
    embeds: &Tensor,
    positions: &[Vec<i64>; 3],
    deepstack: Option<&Deepstack>,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let t = embeds.dim(1)?;
    let mut start = 0;
    let mut hidden = None;
    while start < t {
        let n = PREFILL_CHUNK.min(t - start);
        let pos = [
            positions[0][start..start + n].to_vec(),
            positions[1][start..start + n].to_vec(),
            positions[2][start..start + n].to_vec(),
        ];
        hidden = Some(model.forward_with_deepstack(&embeds.narrow(1, start, n)?, &pos, cache, &[], deepstack)?.hidden);
        start += n;
    }
    hidden.ok_or_else(|| anyhow::anyhow!("empty prompt"))
}

/// Greedy or sampled text generation from token ids: prefill of the whole prompt, then one token a
/// step, `on_token` called with each new id (return `false` to cancel).
pub fn generate_text(
    model: &ThinkerText,
    prompt_ids: &[u32],
    sampler: &mut Sampler,
    stop: &StopRule,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<ThinkerOutput> {
    let embeds = model.embed(prompt_ids)?;
    generate_from_embeds(model, prompt_ids, &embeds, &text_positions(0, prompt_ids.len()), sampler, stop, on_token)
}

/// As [`generate_text`] for a prepared multimodal prompt: `embeds [1, t, h]` with the encoders' tokens
/// in place, and its three position streams. Decoding continues at `max(position) + 1`, as the
/// reference's `rope_deltas` make it.
pub fn generate_from_embeds(
    model: &ThinkerText,
    prompt_ids: &[u32],
    embeds: &Tensor,
    positions: &[Vec<i64>; 3],
    sampler: &mut Sampler,
    stop: &StopRule,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<ThinkerOutput> {
    generate_with_deepstack(model, prompt_ids, embeds, positions, None, sampler, stop, on_token)
}

/// As [`generate_from_embeds`] for a prompt with images: their deepstack features join the prefill.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_deepstack(
    model: &ThinkerText,
    prompt_ids: &[u32],
    embeds: &Tensor,
    positions: &[Vec<i64>; 3],
    deepstack: Option<&Deepstack>,
    sampler: &mut Sampler,
    stop: &StopRule,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<ThinkerOutput> {
    let mut cache: KvCache = model.new_cache();
    let start = Instant::now();
    // 1. Prefill.
    let hidden = prefill_with_deepstack(model, embeds, positions, deepstack, &mut cache)?;
    let mut logits = model.last_logits(&hidden)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    let decode_start = Instant::now();
    let mut next_pos = positions.iter().flat_map(|p| p.iter().copied()).max().map_or(0, |m| m + 1);
    let mut seen: Vec<u32> = prompt_ids.to_vec();
    let mut out = Vec::new();
    let mut finish = FinishReason::Length;
    let mut stop_id = None;
    // 2. Decode one token a step.
    while out.len() < stop.max_new_tokens {
        let id = sampler.sample(&mut logits, &seen);
        if stop.eos_ids.contains(&id) {
            finish = FinishReason::Eos;
            stop_id = Some(id);
            break;
        }
        out.push(id);
        seen.push(id);
        if !on_token(id)? {
            finish = FinishReason::Cancelled;
            break;
        }
        if out.len() == stop.max_new_tokens {
            break;
        }
        let step = model.forward(&model.embed(&[id])?, &text_positions(next_pos, 1), &mut cache, &[])?;
        next_pos += 1;
        logits = model.last_logits(&step.hidden)?;
    }
    Ok(ThinkerOutput {
        prompt_ids: prompt_ids.to_vec(),
        token_ids: out,
        stop_id,
        finish,
        prefill_ms,
        decode_ms: decode_start.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_matches_transformers() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_k_best() {
        let mut l = vec![0.1, 0.5, 0.3, 0.9];
        keep_top_k(&mut l, 2);
        assert_eq!(l[0], f32::NEG_INFINITY);
        assert_eq!(l[2], f32::NEG_INFINITY);
        assert_eq!(l[1], 0.5);
        assert_eq!(l[3], 0.9);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probs ≈ [0.64, 0.24, 0.09, 0.03]
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        keep_top_p(&mut l, 0.8);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut one = vec![5.0, 0.0];
        keep_top_p(&mut one, 0.01);
        assert!(one[0].is_finite());
    }

    #[test]
    fn greedy_prefers_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0], &[]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let params = SamplingParams { temperature: 0.8, top_k: Some(3), top_p: Some(0.9), repetition_penalty: 1.1, seed: 7 };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..20).map(|i| s.sample(&mut [0.1, 0.4, 0.35, 0.2, -1.0], &[i % 3])).collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params));
    }
}
