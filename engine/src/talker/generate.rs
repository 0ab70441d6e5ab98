//! The frame loop: Talker prefill, then one codec frame a step.
//!
//! Reference: `Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation` and the
//! `talker_kwargs` of `Qwen3OmniMoeForConditionalGeneration.generate`. Per step:
//!
//! 1. codebook 0 from the last `codec_head` logits: repetition penalty over the codebook-0 ids drawn so
//!    far (the Talker's `generate` gets no input ids, so only generated ids count), codec ids
//!    `[vocab - 1024, vocab)` except codec eos suppressed, then temperature / top-k / top-p when sampling;
//!    eos ends the speech;
//! 2. codebooks 1..16 from the code predictor on `[final-norm hidden, codec_embedding(code0)]`;
//! 3. the next Talker input is the sum of the 16 codes' embeddings plus trailing text row `step`
//!    (or `tts_pad` once the text is used up).
//!
//! Like the reference, the id drawn when `max_frames` ids have been drawn gets no residual codes and
//! is not returned: a limit of `M` yields at most `M - 1` frames.

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::generation::{FinishReason, Sampler, SamplingParams};

use super::input::TalkerInput;
use super::model::LayerCache;
use super::Talker;

/// Sampling of the Talker and its code predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct TalkerParams {
    /// Codebook 0 (temperature 0 = greedy; the repetition penalty applies either way, as in transformers).
    pub talker: SamplingParams,
    /// Codebooks 1..16 (no repetition penalty).
    pub code_predictor: SamplingParams,
    /// `talker_max_new_tokens`.
    pub max_frames: usize,
}

impl TalkerParams {
    /// The reference defaults: talker top-k 50, top-p 1.0, temperature 0.9, repetition penalty 1.05,
    /// 4096 ids; code predictor top-k 50, top-p 0.8, temperature 1.
    pub fn reference(seed: u64) -> Self {
        Self {
            talker: SamplingParams {
                temperature: 0.9,
                top_k: Some(50),
                top_p: None,
                repetition_penalty: 1.05,
                seed,
            },
            code_predictor: SamplingParams {
                temperature: 1.0,
                top_k: Some(50),
                top_p: Some(0.8),
                repetition_penalty: 1.0,
                seed: seed.wrapping_add(1),
            },
            max_frames: 4096,
        }
    }

    /// `talker_do_sample=False`: argmax everywhere (repetition penalty 1.05 still on codebook 0).
    pub fn greedy(max_frames: usize) -> Self {
        Self {
            talker: SamplingParams {
                repetition_penalty: 1.05,
                ..SamplingParams::greedy()
            },
            code_predictor: SamplingParams::greedy(),
            max_frames,
        }
    }
}

/// The frames of one utterance.
#[derive(Debug, Clone)]
pub struct TalkerOutput {
    /// `[frames][num_code_groups]` codec ids.
    pub frames: Vec<Vec<u32>>,
    pub finish: FinishReason,
}

impl Talker {
    /// Masks the codec ids the reference suppresses (`[vocab - 1024, vocab)` except codec eos).
    pub fn suppress_special(&self, logits: &mut [f32]) {
        let v = logits.len();
        let eos = self.config().codec_eos_token_id as usize;
        for (i, l) in logits.iter_mut().enumerate().skip(v.saturating_sub(1024)) {
            if i != eos {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Generates codec frames for `input`; `on_frame` sees each frame as it is made (return `false`
    /// to stop). A wrapper over [`TalkerStream`] with all the text known up front.
    pub fn generate(
        &self,
        input: &TalkerInput,
        params: &TalkerParams,
        mut on_frame: impl FnMut(&[u32]) -> Result<bool>,
    ) -> Result<TalkerOutput> {
        let mut stream = TalkerStream::new(self, &input.prefill, params)?;
        let trailing_rows = input.trailing.dim(0)?;
        let mut frames = Vec::new();
        loop {
            // 1. Codebook 0 and the residual codebooks of the next frame.
            let frame = match stream.next_frame()? {
                FrameStep::Frame(f) => f,
                FrameStep::Finished(finish) => return Ok(TalkerOutput { frames, finish }),
            };
            let keep_going = on_frame(&frame)?;
            frames.push(frame);
            if !keep_going {
                return Ok(TalkerOutput {
                    frames,
                    finish: FinishReason::Cancelled,
                });
            }
            // 2. Feed the frame back with this step's text row: [1, 1, H].
            let step = stream.steps_fed();
            let text = if step < trailing_rows {
                input.trailing.narrow(0, step, 1)?.unsqueeze(0)?
            } else {
                input.tts_pad.clone()
            };
            stream.feed(&text)?;
        }
    }
}

/// What [`TalkerStream::next_frame`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameStep {
    /// Codes of all `num_code_groups` codebooks.
    Frame(Vec<u32>),
    /// Codec eos, or the id limit reached (the frame of the last id is not made, as in the reference).
    Finished(FinishReason),
}

/// Step-wise Talker decoding, for text that arrives while speech is made: [`Self::next_frame`] makes a
/// frame from what was fed so far, [`Self::feed`] adds that frame back with one text row (the next
/// Thinker token's `text_projection`, `tts_eos`, or `tts_pad`). A caller streaming the Thinker calls
/// `feed` once the row for step [`Self::steps_fed`] is known.
pub struct TalkerStream<'a> {
    talker: &'a Talker,
    cache: LayerCache,
    /// Final-norm hidden of the last fed position `[1, 1, H]`.
    hidden: Tensor,
    /// Logits of the last fed position.
    logits: Vec<f32>,
    talker_sampler: Sampler,
    cp_sampler: Sampler,
    /// Codebook-0 ids drawn so far (the repetition penalty's history).
    drawn: Vec<u32>,
    /// The last frame's codec embedding sum `[1, 1, H]`, waiting for [`Self::feed`].
    pending: Option<Tensor>,
    steps: usize,
    max_frames: usize,
}

impl<'a> TalkerStream<'a> {
    /// Runs the prefill `[1, t, H]` (see [`TalkerInput`]).
    pub fn new(talker: &'a Talker, prefill: &Tensor, params: &TalkerParams) -> Result<Self> {
        if params.max_frames == 0 {
            bail!("talker max_frames must be at least 1");
        }
        let mut cache = talker.new_cache();
        let (hidden, logits) = talker.forward(prefill, &mut cache)?;
        let t = hidden.dim(1)?;
        Ok(Self {
            talker,
            cache,
            hidden: hidden.narrow(1, t - 1, 1)?,
            logits: logits
                .narrow(1, t - 1, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            talker_sampler: Sampler::new(params.talker.clone()),
            cp_sampler: Sampler::new(params.code_predictor.clone()),
            drawn: Vec::new(),
            pending: None,
            steps: 0,
            max_frames: params.max_frames,
        })
    }

    /// Frames fed back so far (= the index of the text row the next [`Self::feed`] takes).
    pub fn steps_fed(&self) -> usize {
        self.steps
    }

    /// Draws codebook 0 and runs the code predictor.
    pub fn next_frame(&mut self) -> Result<FrameStep> {
        if self.pending.is_some() {
            bail!("TalkerStream::next_frame called twice without feed");
        }
        let talker = self.talker;
        // 1. Codebook 0: suppression, repetition penalty, then greedy or sampled choice.
        let mut logits = self.logits.clone();
        talker.suppress_special(&mut logits);
        let code0 = self.talker_sampler.sample(&mut logits, &self.drawn);
        self.drawn.push(code0);
        if code0 == talker.config().codec_eos_token_id {
            return Ok(FrameStep::Finished(FinishReason::Eos));
        }
        if self.drawn.len() >= self.max_frames {
            return Ok(FrameStep::Finished(FinishReason::Length));
        }
        // 2. Codebooks 1..16 from [past_hidden, codec_embedding(code0)], each [1, 1, H].
        let e0 = talker.model.embed_codes(&[code0])?.unsqueeze(0)?;
        let (residual, residual_sum) =
            talker
                .code_predictor
                .generate(&self.hidden, &e0, &mut self.cp_sampler)?;
        self.pending = Some((e0 + residual_sum)?);
        let mut frame = Vec::with_capacity(1 + residual.len());
        frame.push(code0);
        frame.extend_from_slice(&residual);
        Ok(FrameStep::Frame(frame))
    }

    /// Feeds the last frame back with `text_row [1, 1, H]`.
    pub fn feed(&mut self, text_row: &Tensor) -> Result<()> {
        let codec = self
            .pending
            .take()
            .ok_or_else(|| anyhow::anyhow!("TalkerStream::feed called before next_frame"))?;
        let next = (codec + text_row)?;
        let (hidden, logits) = self.talker.forward(&next, &mut self.cache)?;
        self.hidden = hidden;
        self.logits = logits.flatten_all()?.to_vec1::<f32>()?;
        self.steps += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_defaults() {
        let p = TalkerParams::reference(1);
        assert_eq!(
            (p.talker.temperature, p.talker.top_k, p.talker.top_p),
            (0.9, Some(50), None)
        );
        assert_eq!(p.talker.repetition_penalty, 1.05);
        assert_eq!(
            (p.code_predictor.top_k, p.code_predictor.top_p),
            (Some(50), Some(0.8))
        );
        assert_eq!(p.max_frames, 4096);
        p.talker.validate().unwrap();
        p.code_predictor.validate().unwrap();
        let g = TalkerParams::greedy(10);
        assert!(g.talker.is_greedy() && g.code_predictor.is_greedy());
        assert_eq!(g.talker.repetition_penalty, 1.05);
    }
}
