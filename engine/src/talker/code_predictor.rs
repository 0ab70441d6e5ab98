//! The code predictor (MTP): a small dense decoder that fills codebooks 1..16 of each frame.
//!
//! Reference: `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` (its `forward` and the
//! `generate` call in `Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation`),
//! `Qwen3OmniMoeTalkerCodePredictorModel`, `…DecoderLayer`, `…Attention`, `Qwen3OmniMoeMLP`. Per frame
//! it starts from an empty cache: prefill on `[past_hidden, codec_embedding(code0)]` (positions 0, 1)
//! and `lm_head[0]` gives code 1; then step g feeds `codec_embedding[g-1](code g)` at position g + 1
//! and `lm_head[g]` gives code g + 1. Plain 1-D RoPE. Checkpoint paths: `talker.code_predictor.*`.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::config::CodePredictorConfig;
use crate::generation::Sampler;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::thinker::moe::DenseMlp;
use crate::thinker::rope::{text_positions, MultimodalRope};
use crate::weights::Weights;

use super::model::{causal_mask, Attention, AttentionDims, LayerCache};
use crate::attention::RopeRows;

#[derive(Debug, Clone)]
struct PredictorLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: DenseMlp,
}

/// `talker.code_predictor`.
#[derive(Debug, Clone)]
pub struct CodePredictor {
    layers: Vec<PredictorLayer>,
    norm: RmsNorm,
    /// `codec_embedding[g]` embeds code g + 1 (`[vocab, hidden]` each, `num_code_groups - 1` tables).
    codec_embedding: Vec<Embedding>,
    /// `lm_head[g]` predicts code g + 1.
    lm_head: Vec<Linear>,
    rope: MultimodalRope,
    vocab: usize,
    device: Device,
}

impl CodePredictor {
    /// Loads from the `talker.code_predictor` prefix; `talker_hidden` is the Talker's hidden size (the
    /// predictor reads the Talker's hidden state and codec embedding directly, so they must agree).
    pub fn new(
        cfg: &CodePredictorConfig,
        num_code_groups: usize,
        talker_hidden: usize,
        w: &Weights,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        if h != talker_hidden {
            bail!("code_predictor_config.hidden_size {h} differs from the Talker's hidden size {talker_hidden}");
        }
        if num_code_groups < 2 {
            bail!("num_code_groups must be at least 2, got {num_code_groups}");
        }
        let head_dim = cfg.head_dim.unwrap_or(h / cfg.num_attention_heads);
        let dims = AttentionDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim,
            eps: cfg.rms_norm_eps,
            bias: false,
        };
        let model = w.pp("model");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lw = model.pp("layers").pp(l);
            layers.push(PredictorLayer {
                input_layernorm: RmsNorm::load(&lw.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                self_attn: Attention::new(dims, &lw.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::load(
                    &lw.pp("post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                mlp: DenseMlp::new(&lw.pp("mlp"), h, cfg.intermediate_size)?,
            });
        }
        let groups = num_code_groups - 1;
        let codec_embedding = (0..groups)
            .map(|g| Embedding::load(&model.pp("codec_embedding").pp(g), cfg.vocab_size, h))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = (0..groups)
            .map(|g| Linear::load(&w.pp("lm_head").pp(g), h, cfg.vocab_size, false))
            .collect::<Result<Vec<_>>>()?;
        let rope = MultimodalRope::new(head_dim, cfg.rope_fields.resolve(10000.0)?.theta, &[])?;
        Ok(Self {
            layers,
            norm: RmsNorm::load(&model.pp("norm"), h, cfg.rms_norm_eps)?,
            codec_embedding,
            lm_head,
            rope,
            vocab: cfg.vocab_size,
            device: w.store().device().clone(),
        })
    }

    /// Residual codes per frame (`num_code_groups - 1`).
    pub fn num_residual_groups(&self) -> usize {
        self.lm_head.len()
    }

    /// `codec_embedding[group](id)` → `[1, 1, hidden]`.
    pub fn embed(&self, group: usize, id: u32) -> Result<Tensor> {
        if id as usize >= self.vocab {
            bail!(
                "residual code {id} is outside the code predictor vocabulary of {}",
                self.vocab
            );
        }
        let idx = Tensor::from_vec(vec![id], 1, &self.device)?;
        Ok(self.codec_embedding[group].forward(&idx)?.unsqueeze(0)?)
    }

    /// Decoder on `x [1, t, hidden]`, appending to `cache`; returns the final-norm hidden of the last
    /// position `[1, 1, hidden]`.
    fn forward(&self, x: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let t = x.dim(1)?;
        let past = cache.len();
        let (cos, sin) = self
            .rope
            .cos_sin(&text_positions(past as i64, t), &self.device)?;
        let rope = RopeRows::new(cos, sin)?;
        let mask = if t > 1 && !self.device.is_cpu() {
            Some(causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        let mut x = x.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let a = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                &rope,
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
        cache.set_len(past + t);
        self.norm.forward(&x.narrow(1, t - 1, 1)?)
    }

    /// The `num_code_groups - 1` logit vectors of one frame, feeding `codes` (codes 1..16 of the frame,
    /// as chosen) back in: step 0 on `prefill [1, 2, hidden]` (`[past_hidden, codec_embedding(code0)]`).
    pub fn logits_teacher_forced(&self, prefill: &Tensor, codes: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = LayerCache::new(self.layers.len());
        let mut x = prefill.clone();
        let mut out = Vec::with_capacity(self.lm_head.len());
        for g in 0..self.lm_head.len() {
            let h = self.forward(&x, &mut cache)?;
            out.push(
                self.lm_head[g]
                    .forward(&h)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            if g + 1 < self.lm_head.len() {
                x = self.embed(g, codes[g])?;
            }
        }
        Ok(out)
    }

    /// Chooses codes 1..16 of one frame from `past_hidden [1, 1, H]` (the Talker's final-norm hidden
    /// state that produced code 0) and `code0_embed [1, 1, H]`. Returns the codes and the sum of
    /// their embeddings `[1, 1, H]` (what the Talker adds to its next input).
    pub fn generate(
        &self,
        past_hidden: &Tensor,
        code0_embed: &Tensor,
        sampler: &mut Sampler,
    ) -> Result<(Vec<u32>, Tensor)> {
        let _span = crate::profile::span("code predictor frame");
        crate::quant::in_pool(|| self.generate_in_pool(past_hidden, code0_embed, sampler))
    }

    fn generate_in_pool(
        &self,
        past_hidden: &Tensor,
        code0_embed: &Tensor,
        sampler: &mut Sampler,
    ) -> Result<(Vec<u32>, Tensor)> {
        let _stage = crate::profile::stage("code predictor");
        let mut cache = LayerCache::new(self.layers.len());
        // 1. Prefill on [past_hidden, code0 embedding]: [1, 2, H].
        let mut x = Tensor::cat(&[past_hidden, code0_embed], 1)?;
        let mut codes = Vec::with_capacity(self.lm_head.len());
        let mut sum: Option<Tensor> = None;
        // 2. One code per step; its embedding is both the next input and part of the sum.
        for g in 0..self.lm_head.len() {
            let h = self.forward(&x, &mut cache)?;
            let mut logits = self.lm_head[g]
                .forward(&h)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let id = sampler.sample(&mut logits, &[]);
            codes.push(id);
            x = self.embed(g, id)?;
            sum = Some(match sum {
                None => x.clone(),
                Some(s) => (s + &x)?,
            });
        }
        let sum = sum.ok_or_else(|| anyhow::anyhow!("no residual code groups"))?;
        Ok((codes, sum))
    }
}
