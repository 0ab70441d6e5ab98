//! The Talker's MoE decoder and the attention/cache pieces its code predictor shares.
//!
//! Reference: `Qwen3OmniMoeTalkerModel`, `Qwen3OmniMoeTalkerDecoderLayer` (attention =
//! `Qwen3OmniMoeThinkerTextAttention`: GQA with per-head q/k RMSNorm and M-RoPE) and
//! `Qwen3OmniMoeTalkerTextSparseMoeBlock` (routed experts plus a shared expert gated by
//! `sigmoid(shared_expert_gate(x))`). Every decoder layer of the Talker uses the sparse block (the
//! reference overwrites `self.mlp` unconditionally). Checkpoint paths: `talker.model.*`.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::config::TextConfig;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::thinker::moe::{DenseMlp, SparseMoe};
use crate::thinker::rope::{apply_rotary, MultimodalRope};
use crate::weights::Weights;

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl LayerCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// Shapes of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub bias: bool,
}

/// GQA self-attention with per-head q/k RMSNorm (`Qwen3OmniMoeThinkerTextAttention`,
/// `Qwen3OmniMoeTalkerCodePredictorAttention`).
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    d: AttentionDims,
}

impl Attention {
    pub fn new(d: AttentionDims, w: &Weights) -> Result<Self> {
        let (h, hd) = (d.hidden, d.head_dim);
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), h, d.heads * hd, d.bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), h, d.kv_heads * hd, d.bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), h, d.kv_heads * hd, d.bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), d.heads * hd, h, d.bias)?,
            q_norm: RmsNorm::load(&w.pp("q_norm"), hd, d.eps)?,
            k_norm: RmsNorm::load(&w.pp("k_norm"), hd, d.eps)?,
            d,
        })
    }

    /// `x [1, t, hidden]` at rotary tables `cos`, `sin` `[t, head_dim]` → `[1, t, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.d.heads, self.d.kv_heads, self.d.head_dim);
        // 1. Projections and per-head norm: [b, t, heads, hd] → [b, heads, t, hd].
        let q = self
            .q_norm
            .forward(&self.q_proj.forward(x)?.reshape((b, t, nh, hd))?)?;
        let k = self
            .k_norm
            .forward(&self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?)?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // 2. Rotary, then append to the cache: k, v [b, kv, s, hd].
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = cache.append(layer, k, v)?;
        let s = k.dim(2)?;
        // 3. Grouped heads: [b, kv, groups·t, hd] against [b, kv, s, hd].
        let groups = nh / nkv;
        let q = q.reshape((b, nkv, groups * t, hd))?;
        let mut scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(mask) = mask {
            let mask = mask
                .unsqueeze(0)?
                .expand((groups, t, s))?
                .reshape((groups * t, s))?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?;
        // 4. Back to [b, t, heads·hd].
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

/// `[t, past + t]` additive causal mask.
pub fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (t, s), device)?)
}

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
        let routed = self.routed.forward(x)?;
        // 2. Shared expert scaled by sigmoid(gate(x)) [b, t, 1].
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
        let dims = AttentionDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
            bias: cfg.attention_bias,
        };
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
        crate::quant::in_pool(|| self.forward_in_pool(embeds, positions, cache))
    }

    fn forward_in_pool(
        &self,
        embeds: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let past = cache.len();
        // 1. Rotary tables and causal mask over [past + t].
        let (cos, sin) = self.rope.cos_sin(positions, &self.device)?;
        let mask = if t > 1 {
            Some(causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        // 2. Pre-norm decoder layers.
        let mut x = embeds.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let a = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                &cos,
                &sin,
                mask.as_ref(),
                cache,
                l,
            )?;
            x = (x + a)?;
            let f = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + f)?;
        }
        cache.len = past + t;
        // 3. Final norm.
        self.norm.forward(&x)
    }
}
