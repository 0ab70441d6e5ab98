//! The Talker: turns the Thinker's states into codec frames (16 codebook ids at 12.5 Hz).
//!
//! Reference: `Qwen3OmniMoeTalkerForConditionalGeneration` (forward, `prepare_inputs_for_generation`)
//! and `Qwen3OmniMoeForConditionalGeneration.generate` with `_get_talker_user_parts` /
//! `_get_talker_assistant_parts` in transformers' `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py`.
//!
//! * [`model::TalkerModel`]: the MoE decoder (`talker.model`), with `talker.codec_head` giving
//!   codebook 0 of each frame.
//! * [`code_predictor::CodePredictor`]: the dense MTP (`talker.code_predictor`) filling codebooks 1..16.
//! * [`ResizeMlp`]: `talker.text_projection` / `talker.hidden_projection` (`Qwen3OmniMoeTalkerResizeMLP`)
//!   mapping Thinker embeddings / hidden states into the Talker's width.
//! * [`input::TalkerInput`]: the prefill sequence and the per-step text conditioning.
//! * [`input::TalkerRope`]: the Talker's own M-RoPE positions when the prompt holds images (the
//!   reference's `get_rope_index` on `talker_input_ids`), set with [`Talker::with_prefill_rope`].
//! * [`generate`]: the frame loop (greedy or sampled with the reference defaults).

pub mod code_predictor;
pub mod generate;
pub mod input;
pub mod model;

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::config::TalkerConfig;
use crate::nn::{silu, Linear};
use crate::thinker::rope::text_positions;
use crate::weights::Weights;
use code_predictor::CodePredictor;
use model::{LayerCache, TalkerModel};

pub use generate::{FrameStep, TalkerOutput, TalkerParams, TalkerStream};
pub use input::{TalkerInput, TalkerRope};

/// `Qwen3OmniMoeTalkerResizeMLP`: `fc2(silu(fc1(x)))`, both with bias.
#[derive(Debug, Clone)]
pub struct ResizeMlp {
    linear_fc1: Linear,
    linear_fc2: Linear,
}

impl ResizeMlp {
    pub fn new(w: &Weights, input: usize, intermediate: usize, output: usize) -> Result<Self> {
        Ok(Self {
            linear_fc1: Linear::load(&w.pp("linear_fc1"), input, intermediate, true)?,
            linear_fc2: Linear::load(&w.pp("linear_fc2"), intermediate, output, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_fc2
            .forward(&silu(&self.linear_fc1.forward(x)?)?)
    }
}

/// The whole `talker.*` subtree of a checkpoint.
#[derive(Debug, Clone)]
pub struct Talker {
    cfg: TalkerConfig,
    pub model: TalkerModel,
    codec_head: Linear,
    pub text_projection: ResizeMlp,
    pub hidden_projection: ResizeMlp,
    pub code_predictor: CodePredictor,
    /// The prefill's own M-RoPE positions (prompts with images); `None`: plain text positions.
    prefill_rope: Option<std::sync::Arc<TalkerRope>>,
}

impl Talker {
    /// Loads from the `talker` prefix (`w = root.pp("talker")`), checking every shape.
    pub fn new(cfg: &TalkerConfig, w: &Weights) -> Result<Self> {
        let t = &cfg.text_config;
        let h = t.hidden_size;
        if cfg.hidden_act_is_unsupported() {
            bail!("talker_config.text_config.hidden_act must be silu");
        }
        let model = TalkerModel::new(t, &w.pp("model"))?;
        let codec_head = Linear::load(&w.pp("codec_head"), h, t.vocab_size, false)?;
        let text_projection = ResizeMlp::new(
            &w.pp("text_projection"),
            cfg.thinker_hidden_size,
            t.intermediate_size,
            h,
        )?;
        let hidden_projection = ResizeMlp::new(
            &w.pp("hidden_projection"),
            cfg.thinker_hidden_size,
            t.intermediate_size,
            h,
        )?;
        let code_predictor = CodePredictor::new(
            &cfg.code_predictor_config,
            cfg.num_code_groups,
            h,
            &w.pp("code_predictor"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            model,
            codec_head,
            text_projection,
            hidden_projection,
            code_predictor,
            prefill_rope: None,
        })
    }

    /// This Talker (weights shared) with the M-RoPE positions of one prefill: a cache starting empty
    /// takes `rope.prefill` for its first forward (which must have exactly that many rows), later steps
    /// are at `cache length + rope.delta`.
    pub fn with_prefill_rope(&self, rope: TalkerRope) -> Self {
        Self {
            prefill_rope: Some(std::sync::Arc::new(rope)),
            ..self.clone()
        }
    }

    pub fn config(&self) -> &TalkerConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> LayerCache {
        self.model.new_cache()
    }

    /// Decoder + `codec_head` on `embeds [1, t, H]` at positions `cache.len() ..` (text positions, or
    /// those of [`Self::with_prefill_rope`]); returns the final-norm hidden states `[1, t, H]` and
    /// logits `[1, t, vocab]`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut LayerCache) -> Result<(Tensor, Tensor)> {
        let (past, t) = (cache.len(), embeds.dim(1)?);
        let positions = match self.prefill_rope.as_deref() {
            // Text (and audio) talker input: the three streams are the plain positions (rope_deltas = 0).
            None => text_positions(past as i64, t),
            Some(r) if past == 0 => {
                if r.prefill[0].len() != t {
                    bail!(
                        "Talker prefill of {t} rows, but its M-RoPE positions cover {}",
                        r.prefill[0].len()
                    );
                }
                r.prefill.clone()
            }
            Some(r) if past < r.prefill[0].len() => {
                bail!("the Talker prefill with M-RoPE positions must run in one forward (cache holds {past})")
            }
            Some(r) => text_positions(past as i64 + r.delta, t),
        };
        let hidden = self.model.forward(embeds, &positions, cache)?;
        let logits = self.codec_head.forward(&hidden)?;
        Ok((hidden, logits))
    }
}

trait ActCheck {
    fn hidden_act_is_unsupported(&self) -> bool;
}

impl ActCheck for TalkerConfig {
    fn hidden_act_is_unsupported(&self) -> bool {
        matches!(&self.text_config.hidden_act, Some(a) if a != "silu")
    }
}
