//! The Talker's MoE decoder and the attention/cache pieces its code predictor shares.
//!
//! Reference: `Qwen3OmniMoeTalkerModel`, `Qwen3OmniMoeTalkerDecoderLayer` (attention =
//! `Qwen3OmniMoeThinkerTextAttention`: GQA with per-head q/k RMSNorm and M-RoPE) and
//! `Qwen3OmniMoeTalkerTextSparseMoeBlock` (routed experts plus a shared expert gated by
//! `sigmoid(shared_expert_gate(x))`). Every decoder layer of the Talker uses the sparse block (the
//! reference overwrites `self.mlp` unconditionally). Checkpoint paths: `talker.model.*`.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub use crate::attention::{causal_mask, Attention, AttentionDims, KvCache as LayerCache};
use crate::attention::RopeRows;
use crate::config::TextConfig;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::thinker::moe::{DenseMlp, SparseMoe};
use crate::thinker::rope::MultimodalRope;
use crate::weights::Weights;

/// `Qwen3OmniMoeTalkerTextSparseMoeBlock`: routed experts + sigmoid-gated shared expert.
#[derive(Debug, Clone)]
pub struct TalkerSparseMoe {
    routed: SparseMoe,
    shared_expert: DenseMlp,
    shared_expert_gate: Linear,
}

impl TalkerSparseMoe {
    pub fn new(cfg: &TextConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.shared_expert_intermediate_size == 0 {
            bail!("talker_config.text_config.shared_expert_intermediate_size must be positive");
        }
        Ok(Self {
            routed: SparseMoe::new(
                w,
                h,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
            )?,
            shared_expert: DenseMlp::new(
                &w.pp("shared_expert"),
                h,
                cfg.shared_expert_intermediate_size,
            )?,
            shared_expert_gate: Linear::load(&w.pp("shared_expert_gate"), h, 1, false)?,
        })
    }

    /// `x [b, t, H]` → `[b, t, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. Routed experts (softmax, top-k, optional renormalisation).
        let span = crate::profile::span("talker routed experts");
        let routed = self.routed.forward(x)?;
        drop(span);
        // 2. Shared expert scaled by sigmoid(gate(x)) [b, t, 1].
        let _span = crate::profile::span("talker shared expert");
        let gate = candle_nn::ops::sigmoid(&self.shared_expert_gate.forward(x)?)?;
        let shared = self.shared_expert.forward(x)?.broadcast_mul(&gate)?;
        Ok((routed + shared)?)
    }
}

#[derive(Debug, Clone)]
struct TalkerLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: TalkerSparseMoe,
}

/// The Talker decoder (`Qwen3OmniMoeTalkerModel`): codec embedding, MoE layers, final norm.
#[derive(Debug, Clone)]
pub struct TalkerModel {
    codec_embedding: Embedding,
    layers: Vec<TalkerLayer>,
    norm: RmsNorm,
    rope: MultimodalRope,
    vocab: usize,
    hidden: usize,
    device: Device,
}

impl TalkerModel {
    /// Loads `talker.model.*` (`w` = the `talker.model` prefix).
    pub fn new(cfg: &TextConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let dims = AttentionDims::of_text_config(cfg);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lw = w.pp("layers").pp(l);
            layers.push(TalkerLayer {
                input_layernorm: RmsNorm::load(&lw.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                self_attn: Attention::new(dims, &lw.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::load(
                    &lw.pp("post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp: TalkerSparseMoe::new(cfg, &lw.pp("mlp"))?,
            });
        }
        let rope_cfg = cfg.rope()?;
        Ok(Self {
            codec_embedding: Embedding::load(&w.pp("codec_embedding"), cfg.vocab_size, h)?,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), h, cfg.rms_norm_eps)?,
            rope: MultimodalRope::new(cfg.head_dim(), rope_cfg.theta, &rope_cfg.mrope_section)?,
            vocab: cfg.vocab_size,
            hidden: h,
            device: w.store().device().clone(),
        })
    }

    pub fn new_cache(&self) -> LayerCache {
        LayerCache::new(self.layers.len())
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Codec embeddings of `ids` → `[ids.len(), hidden]`.
    pub fn embed_codes(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            bail!(
                "codec id {bad} is outside the Talker vocabulary of {}",
                self.vocab
            );
        }
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        self.codec_embedding.forward(&idx)
    }

    /// Runs `embeds [1, t, hidden]` at three-stream `positions`, appending to `cache`; returns the
    /// final-norm hidden states `[1, t, hidden]`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let _span = crate::profile::span(if embeds.dim(1)? > 1 { "talker forward, prefill" } else { "talker forward, 1 step" });
        crate::quant::in_pool(|| self.forward_in_pool(embeds, positions, cache))
    }

    fn forward_in_pool(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let _stage = crate::profile::stage(if t > 1 { "talker prefill" } else { "talker step" });
        let past = cache.len();
        // 1. Rotary tables and causal mask over [past + t].
        let (cos, sin) = self.rope.cos_sin(positions, &self.device)?;
        let rope = RopeRows::new(cos, sin)?;
        let mask = if t > 1 && !self.device.is_cpu() {
            Some(causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        // 2. Pre-norm decoder layers.
        let mut x = embeds.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let span = crate::profile::span("talker attention block");
            let a = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                &rope,
                mask.as_ref(),
                cache,
                l,
            )?;
            x = (x + a)?;
            drop(span);
            let f = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + f)?;
        }
        cache.set_len(past + t);
        // 3. Final norm.
        self.norm.forward(&x)
    }
}
