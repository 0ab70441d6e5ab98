//! `omni bench thinker`: prefill and decode tokens/s of the Thinker (48 MoE layers, 128 experts
//! top-8, hidden 2048) at the real shapes on random Q8_0 weights.
//!
//! On a machine without ~35 GB for the whole Q8_0 Thinker, `--layers N` loads only N decoder layers
//! (embedding and `lm_head` stay full size). The time inside the decoder layers is measured apart
//! from the rest (embedding lookup, `lm_head`, argmax), and the full model is extrapolated as
//! `layer time × 48 / N + non-layer time`: layers are identical in shape and cost, except that
//! attention grows with the context, which every layer sees alike.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::machine::{
    generated, ms_since, random_store, real_config_json, MachineFacts, Table, REAL_THINKER_LAYERS,
};
use super::random_weights::GeneratedArena;
use crate::config::OmniConfig;
use crate::generation::PREFILL_CHUNK;
use crate::thinker::rope::text_positions;
use crate::thinker::{argmax, KvCache, ThinkerText};

#[derive(Debug, Clone)]
pub struct ThinkerBenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Decoder layers to load (48 = the whole Thinker).
    pub layers: usize,
    pub seed: u64,
}

/// Layer and non-layer milliseconds of some Thinker work, and the full-model extrapolation.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SplitMs {
    /// Inside the decoder layers (and the final norm).
    pub layers_ms: f64,
    /// Embedding lookup, `lm_head`, argmax.
    pub other_ms: f64,
    /// `layers_ms × 48 / layers + other_ms` (= measured when all 48 layers are loaded).
    pub full_model_ms: f64,
}

impl SplitMs {
    pub fn new(layers_ms: f64, other_ms: f64, layers: usize) -> Self {
        Self {
            layers_ms,
            other_ms,
            full_model_ms: layers_ms * REAL_THINKER_LAYERS as f64 / layers as f64 + other_ms,
        }
    }

    pub fn measured_ms(&self) -> f64 {
        self.layers_ms + self.other_ms
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ThinkerBench {
    pub bench: &'static str,
    pub machine: MachineFacts,
    pub weights: Vec<GeneratedArena>,
    pub layers_loaded: usize,
    pub extrapolated: bool,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prefill: SplitMs,
    /// Per decoded token (mean over `gen_tokens`).
    pub decode_per_token: SplitMs,
    /// Full 48-layer model (extrapolated when `extrapolated`).
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// As measured on the loaded layers.
    pub measured_prefill_tokens_per_s: f64,
    pub measured_decode_tokens_per_s: f64,
    /// Memory read bandwidth of this machine (GB/s, 4 GB buffer, all threads).
    pub memory_read_gbs: f64,
    /// Bytes of weights one decode step reads at the full 48 layers (Q8_0: attention, router,
    /// the 8 routed experts, lm_head), and the decode time that takes at `memory_read_gbs`.
    pub decode_weight_bytes: f64,
    pub decode_floor_ms: f64,
    pub notes: Vec<String>,
}

/// Weight bytes one decode step of the full 48-layer Thinker reads: Q8_0 (34 bytes per 32 values)
/// attention projections, routed experts and lm_head, f32 router.
fn decode_weight_bytes(cfg: &OmniConfig) -> f64 {
    let t = &cfg.thinker_config.text_config;
    let (h, hd) = (t.hidden_size as f64, t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads) as f64);
    let attention = h * hd * (2.0 * t.num_attention_heads as f64 + 2.0 * t.num_key_value_heads as f64);
    let experts = t.num_experts_per_tok as f64 * 3.0 * h * t.moe_intermediate_size as f64;
    let q8 = 34.0 / 32.0;
    let per_layer = (attention + experts) * q8 + h * t.num_experts as f64 * 4.0;
    per_layer * REAL_THINKER_LAYERS as f64 + t.vocab_size as f64 * h * q8
}

/// The Thinker at the real shapes with `layers` decoder layers, on random Q8_0 weights.
pub fn load_thinker(
    layers: usize,
    seed: u64,
) -> Result<(ThinkerText, crate::weights::WeightStore, OmniConfig, f64)> {
    let json = real_config_json(Some(layers))?;
    let cfg = OmniConfig::from_json_str(&json.to_string()).context("the bundled real config")?;
    let store = random_store(&json, seed)?;
    let t = Instant::now();
    let thinker = ThinkerText::new(&cfg.thinker_config.text_config, &store.root().pp("thinker"))
        .context("loading the random Thinker")?;
    Ok((thinker, store, cfg, t.elapsed().as_secs_f64()))
}

/// Runs `embeds [1, t, H]` through the layers in chunks of [`PREFILL_CHUNK`] (as `generation::prefill`
/// does), capturing `capture`; returns (final hidden of the last chunk, captured states cat over t,
/// layer ms).
pub fn timed_prefill(
    thinker: &ThinkerText,
    embeds: &Tensor,
    start_pos: i64,
    cache: &mut KvCache,
    capture: &[usize],
) -> Result<(Tensor, Vec<Tensor>, f64)> {
    let t = embeds.dim(1)?;
    let positions = text_positions(start_pos, t);
    let mut start = 0;
    let mut hidden = None;
    let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); capture.len()];
    let clock = Instant::now();
    while start < t {
        let n = PREFILL_CHUNK.min(t - start);
        let pos = [
            positions[0][start..start + n].to_vec(),
            positions[1][start..start + n].to_vec(),
            positions[2][start..start + n].to_vec(),
        ];
        let step = thinker.forward(&embeds.narrow(1, start, n)?, &pos, cache, capture)?;
        for (p, c) in parts.iter_mut().zip(step.captured) {
            p.push(c);
        }
        hidden = Some(step.hidden);
        start += n;
    }
    let layers_ms = ms_since(clock);
    let captured = parts
        .iter()
        .map(|p| Tensor::cat(p, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((hidden.context("empty prompt")?, captured, layers_ms))
}

/// One greedy decode step after `cache`: returns (next id, layer ms, other ms).
pub fn timed_decode_step(
    thinker: &ThinkerText,
    id: u32,
    cache: &mut KvCache,
) -> Result<(u32, f64, f64)> {
    let t = Instant::now();
    let embeds = thinker.embed(&[id])?;
    let mut other = ms_since(t);
    let pos = text_positions(cache.len() as i64, 1);
    let t = Instant::now();
    let step = thinker.forward(&embeds, &pos, cache, &[])?;
    let layers = ms_since(t);
    let t = Instant::now();
    let next = argmax(&thinker.last_logits(&step.hidden)?) as u32;
    other += ms_since(t);
    Ok((next, layers, other))
}

/// Prompt ids of ordinary text tokens (their values do not change the cost).
pub fn text_ids(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (1000 + (i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 100_000)) as u32)
        .collect()
}

pub fn bench_thinker(opts: &ThinkerBenchOptions) -> Result<ThinkerBench> {
    if opts.prompt_tokens < 1 || opts.prompt_tokens > 32768 {
        bail!(
            "--prompt-tokens must be in 1..=32768, got {}",
            opts.prompt_tokens
        );
    }
    if opts.gen_tokens < 1 || opts.gen_tokens > 4096 {
        bail!("--gen must be in 1..=4096, got {}", opts.gen_tokens);
    }
    let (thinker, store, _cfg, load_s) = load_thinker(opts.layers, opts.seed)?;
    // Warm the pools on a throwaway one-token pass.
    {
        let mut cache = thinker.new_cache();
        timed_decode_step(&thinker, 1000, &mut cache)?;
    }
    let _ = crate::profile::take(); // OMNI_PROFILE: count the measured run only
    crate::profile::perf_control("enable");
    // 1. Prefill: embedding, layers in chunks, lm_head of the last position, argmax.
    let ids = text_ids(opts.prompt_tokens, opts.seed);
    let mut cache = thinker.new_cache();
    let t = Instant::now();
    let embeds = thinker.embed(&ids)?;
    let mut other = ms_since(t);
    let (hidden, _, layers) = timed_prefill(&thinker, &embeds, 0, &mut cache, &[])?;
    let t = Instant::now();
    let mut next = argmax(&thinker.last_logits(&hidden)?) as u32;
    other += ms_since(t);
    let prefill = SplitMs::new(layers, other, opts.layers);
    // 2. Decode `gen_tokens` greedily.
    let (mut dl, mut dother) = (0.0, 0.0);
    for _ in 0..opts.gen_tokens {
        let (id, l, o) = timed_decode_step(&thinker, next, &mut cache)?;
        next = id;
        dl += l;
        dother += o;
    }
    crate::profile::perf_control("disable");
    let g = opts.gen_tokens as f64;
    let decode = SplitMs::new(dl / g, dother / g, opts.layers);
    let extrapolated = opts.layers != REAL_THINKER_LAYERS;
    let mut notes = vec![
        "random Q8_0 weights at the real shapes (speed does not depend on the values)".to_string(),
    ];
    if extrapolated {
        notes.push(format!(
            "EXTRAPOLATED: only {} of 48 decoder layers loaded; full model = measured layer time × 48/{} + non-layer time (embedding, lm_head, argmax)",
            opts.layers, opts.layers
        ));
    }
    let p = opts.prompt_tokens as f64;
    let memory_read_gbs = super::machine::read_bandwidth_gbs(4 << 30);
    let decode_weight_bytes = decode_weight_bytes(&_cfg);
    Ok(ThinkerBench {
        bench: "thinker",
        machine: MachineFacts::collect(),
        weights: generated(&store),
        layers_loaded: opts.layers,
        extrapolated,
        load_s,
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        prefill,
        decode_per_token: decode,
        prefill_tokens_per_s: p / prefill.full_model_ms * 1e3,
        decode_tokens_per_s: 1e3 / decode.full_model_ms,
        measured_prefill_tokens_per_s: p / prefill.measured_ms() * 1e3,
        measured_decode_tokens_per_s: 1e3 / decode.measured_ms(),
        memory_read_gbs,
        decode_weight_bytes,
        decode_floor_ms: decode_weight_bytes / (memory_read_gbs * 1e9) * 1e3,
        notes,
    })
}

impl ThinkerBench {
    pub fn table(&self) -> String {
        let tag = if self.extrapolated {
            " (extrapolated)"
        } else {
            ""
        };
        let mut t = Table::new(format!(
            "omni bench thinker: 48-layer MoE Thinker, real shapes, random Q8_0, {} of 48 layers loaded\n{}",
            self.layers_loaded,
            self.machine.describe()
        ));
        t.row(
            "load (incl. random weights)",
            format!("{:.1} s", self.load_s),
            "",
        );
        t.row(
            "prefill",
            format!("{:.1} ms", self.prefill.full_model_ms),
            format!(
                "{} tokens; layers {:.1} ms on {} layers + other {:.1} ms{tag}",
                self.prompt_tokens,
                self.prefill.layers_ms,
                self.layers_loaded,
                self.prefill.other_ms
            ),
        );
        t.row(
            "prefill tokens/s",
            format!("{:.1}", self.prefill_tokens_per_s),
            format!("48 layers{tag}"),
        );
        t.row(
            "decode",
            format!("{:.1} ms/token", self.decode_per_token.full_model_ms),
            format!(
                "{} tokens; layers {:.2} ms on {} layers + other {:.2} ms{tag}",
                self.gen_tokens,
                self.decode_per_token.layers_ms,
                self.layers_loaded,
                self.decode_per_token.other_ms
            ),
        );
        t.row(
            "decode tokens/s",
            format!("{:.2}", self.decode_tokens_per_s),
            format!("48 layers{tag}"),
        );
        t.row(
            "memory read bandwidth",
            format!("{:.1} GB/s", self.memory_read_gbs),
            format!(
                "decode reads {:.2} GB of weights per token: floor {:.1} ms/token",
                self.decode_weight_bytes / 1e9,
                self.decode_floor_ms
            ),
        );
        if self.extrapolated {
            t.row(
                "measured tokens/s",
                format!(
                    "{:.1} / {:.2}",
                    self.measured_prefill_tokens_per_s, self.measured_decode_tokens_per_s
                ),
                format!(
                    "prefill / decode on the {} loaded layers",
                    self.layers_loaded
                ),
            );
        }
        super::machine::with_footer(t.render(), &self.weights, &self.notes)
    }
}
