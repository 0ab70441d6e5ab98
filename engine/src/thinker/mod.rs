//! The Thinker's text decoder: embeddings, 48 (here: `num_hidden_layers`) MoE decoder layers with
//! GQA attention, q/k RMSNorm and interleaved M-RoPE, the final norm and `lm_head`.
//!
//! Reference: `Qwen3OmniMoeThinkerTextModel` and `Qwen3OmniMoeThinkerForConditionalGeneration` in
//! transformers' `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py`. Checkpoint paths:
//! `thinker.model.embed_tokens`, `thinker.model.layers.N.*`, `thinker.model.norm`, `thinker.lm_head`.
//! The forward pass takes input embeddings (so audio/image features can be scattered in by the
//! caller) and three position streams; a [`KvCache`] makes prefill-then-decode incremental.

pub mod moe;
pub mod rope;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::attention::{causal_mask, Attention, AttentionDims, RopeRows};
use crate::config::TextConfig;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::weights::Weights;
use moe::{DenseMlp, FeedForward, SparseMoe};
pub use crate::attention::KvCache;
use rope::MultimodalRope;

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, w: &Weights, layer: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = if cfg.is_sparse_layer(layer) {
            FeedForward::Sparse(SparseMoe::new(
                &w.pp("mlp"),
                h,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
            )?)
        } else {
            FeedForward::Dense(DenseMlp::new(&w.pp("mlp"), h, cfg.intermediate_size)?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
            self_attn: Attention::new(AttentionDims::of_text_config(cfg), &w.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            mlp,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeRows,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let span = crate::profile::span("thinker attention block");
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, mask, cache, layer)?;
        let x = (x + attn)?;
        drop(span);
        let _span = crate::profile::span("thinker feed-forward block");
        let ff = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + ff)?)
    }
}

/// What one forward pass returns.
#[derive(Debug)]
pub struct ThinkerStep {
    /// Final-norm hidden states `[1, t, hidden]`.
    pub hidden: Tensor,
    /// Hidden states after the decoder layers asked for (`[1, t, hidden]` each), in the order asked.
    pub captured: Vec<Tensor>,
}

/// The Thinker's language model.
#[derive(Debug, Clone)]
pub struct ThinkerText {
    cfg: TextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: MultimodalRope,
    device: Device,
}

impl ThinkerText {
    /// Loads from the `thinker` prefix of an Omni checkpoint.
    pub fn new(cfg: &TextConfig, thinker: &Weights) -> Result<Self> {
        Self::new_with_progress(cfg, thinker, &mut |_| {})
    }

    /// As [`Self::new`], calling `on_layer(l)` after each decoder layer is loaded.
    pub fn new_with_progress(cfg: &TextConfig, thinker: &Weights, on_layer: &mut dyn FnMut(usize)) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let model = thinker.pp("model");
        let embed_tokens = Embedding::load(&model.pp("embed_tokens"), v, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::new(cfg, &model.pp("layers").pp(l), l)?);
            on_layer(l);
        }
        let norm = RmsNorm::load(&model.pp("norm"), h, cfg.rms_norm_eps)?;
        let lm_head = if thinker.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            Linear::load(&thinker.pp("lm_head"), h, v, false)?
        } else {
            embed_tokens.as_linear()?
        };
        let rope_cfg = cfg.rope()?;
        let rope = MultimodalRope::new(cfg.head_dim(), rope_cfg.theta, &rope_cfg.mrope_section)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: thinker.store().device().clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings `[1, t, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is outside the Thinker vocabulary of {vocab}");
        }
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        Ok(self.embed_tokens.forward(&idx)?.unsqueeze(0)?)
    }

    /// Runs the decoder on `embeds [1, t, hidden]` at `positions` (three streams of length t),
    /// appending to `cache`. `capture` names decoder layers whose outputs are returned too.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut KvCache,
        capture: &[usize],
    ) -> Result<ThinkerStep> {
        self.forward_with_deepstack(embeds, positions, cache, capture, None)
    }

    /// As [`Self::forward`], adding the vision tower's deepstack features to the visual positions of
    /// this chunk after decoder layers `0..levels` (the reference's `_deepstack_process`). Captured
    /// layer outputs are taken before the addition, as the reference's output hooks see them.
    pub fn forward_with_deepstack(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut KvCache,
        capture: &[usize],
        deepstack: Option<&Deepstack>,
    ) -> Result<ThinkerStep> {
        let _span = crate::profile::span(if embeds.dim(1)? > 1 { "thinker forward, prefill" } else { "thinker forward, 1 token" });
        crate::quant::in_pool(|| self.forward_in_pool(embeds, positions, cache, capture, deepstack))
    }

    fn forward_in_pool(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut KvCache,
        capture: &[usize],
        deepstack: Option<&Deepstack>,
    ) -> Result<ThinkerStep> {
        let t = embeds.dim(1)?;
        let _stage = crate::profile::stage(if t > 1 { "thinker prefill" } else { "thinker decode" });
        let past = cache.len();
        // 1. Rotary tables for the new positions and the causal mask over [past + t].
        let (cos, sin) = self.rope.cos_sin(positions, &self.device)?;
        let rope = RopeRows::new(cos, sin)?;
        // The CPU core applies causality itself.
        let mask = if t > 1 && !self.device.is_cpu() { Some(causal_mask(t, past, &self.device)?) } else { None };
        let injection = match deepstack {
            Some(d) => d.rows_for_chunk(past, t, &self.device)?,
            None => None,
        };
        // 2. Decoder layers.
        let mut x = embeds.clone();
        let mut captured = vec![None; capture.len()];
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope, mask.as_ref(), cache, l)?;
            for (slot, &want) in captured.iter_mut().zip(capture) {
                if want == l {
                    *slot = Some(x.clone());
                }
            }
            if let (Some(d), Some(rows)) = (deepstack, &injection) {
                if let Some(level) = d.levels.get(l) {
                    x = d.add_level(&x, level, rows)?;
                }
            }
        }
        cache.set_len(past + t);
        let captured = captured
            .into_iter()
            .zip(capture)
            .map(|(c, l)| c.ok_or_else(|| anyhow::anyhow!("layer {l} does not exist")))
            .collect::<Result<Vec<_>>>()?;
        // 3. Final norm.
        Ok(ThinkerStep { hidden: self.norm.forward(&x)?, captured })
    }

    /// `lm_head` on hidden states `[1, t, hidden]` → logits `[1, t, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits of the last position as a vector.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        Ok(self.logits(&last)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Deepstack features of a prompt: after decoder layer `l < levels.len()`, row `k` of `levels[l]` is
/// added to the hidden state at prompt position `positions[k]` (the visual tokens, in order).
#[derive(Debug, Clone)]
pub struct Deepstack {
    /// Absolute prompt positions of the visual tokens, ascending.
    pub positions: Vec<usize>,
    /// `[positions.len(), hidden]` per level.
    pub levels: Vec<Tensor>,
}

impl Deepstack {
    pub fn new(positions: Vec<usize>, levels: Vec<Tensor>) -> Result<Self> {
        for (i, level) in levels.iter().enumerate() {
            if level.dim(0)? != positions.len() {
                bail!("deepstack level {i} has {} rows for {} visual positions", level.dim(0)?, positions.len());
            }
        }
        if positions.windows(2).any(|w| w[0] >= w[1]) {
            bail!("deepstack positions must be strictly ascending");
        }
        Ok(Self { positions, levels })
    }

    /// For a chunk of `t` tokens starting at `past`: per chunk row, 0 (no visual token) or 1 + its row
    /// in the levels; `None` when the chunk has no visual token.
    fn rows_for_chunk(&self, past: usize, t: usize, device: &Device) -> Result<Option<Tensor>> {
        let mut source = vec![0u32; t];
        let mut any = false;
        for (k, &p) in self.positions.iter().enumerate() {
            if p >= past && p < past + t {
                source[p - past] = k as u32 + 1;
                any = true;
            }
        }
        Ok(if any { Some(Tensor::from_vec(source, t, device)?) } else { None })
    }

    /// `x [1, t, h]` plus the level's rows at the visual positions (zero elsewhere).
    fn add_level(&self, x: &Tensor, level: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let h = level.dim(1)?;
        let table = Tensor::cat(&[&Tensor::zeros((1, h), level.dtype(), level.device())?, level], 0)?;
        let add = table.index_select(rows, 0)?.unsqueeze(0)?;
        Ok(x.broadcast_add(&add.to_dtype(x.dtype())?)?)
    }
}

/// Convenience: the last dimension's argmax of a vector.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
