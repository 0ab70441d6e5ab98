//! Code2Wav: the causal vocoder turning 16-codebook codec frames into a 24 kHz waveform.
//!
//! Reference: `Qwen3OmniMoeCode2Wav` (`forward` and `chunked_decode`) in transformers'
//! `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py`; checkpoint paths `code2wav.*`. The pipeline:
//!
//! 1. each frame's `num_quantizers` ids, offset by `q·codebook_size`, index `code_embedding`; the
//!    embeddings are averaged over the quantizers: `[t, hidden]`;
//! 2. the [pre-transformer](transformer) (sliding-window causal attention, rotary, layer scale);
//! 3. `upsample.*`: per ratio of `upsampling_ratios`, a causal transposed conv (kernel = stride =
//!    ratio) and a ConvNeXt block: `[hidden, t·Πratios]`;
//! 4. `decoder.*`: a causal conv to `decoder_dim`, one [`DecoderBlock`](conv::DecoderBlock) per rate of
//!    `upsample_rates` (halving the channels, `len → (len - 1)·rate`), SnakeBeta, a causal conv to
//!    one channel, and `clamp(-1, 1)`.
//!
//! Every layer is causal and the decoder blocks' transposed convs trim their overhang on both sides,
//! so `n` frames yield `n·samples_per_frame - lag` samples ([`waveform_len`]; `lag` = 555 for rates
//! 8, 5, 4, 3): the last `lag` samples of a frame need the next frame. Output sample `s` depends on
//! frames at or before `(s + lag) / samples_per_frame` only and never changes when frames are
//! appended, which is what makes [streaming](streaming) with left context alone exact up to the
//! receptive field (sliding-window attention, conv kernels) cut off by the context.
//!
//! [`Code2Wav::chunked_decode`] reproduces the reference's `chunked_decode` exactly, including its
//! quirk: it concatenates chunk outputs after dropping `context·samples_per_frame` samples, so
//! `lag` samples are lost at every chunk boundary (the stream jumps ahead there). The streaming
//! decoder ([`StreamingCode2Wav`]) keeps those samples and matches [`Code2Wav::decode`]'s length.

pub mod carried;
pub mod conv;
pub mod streaming;
pub mod transformer;

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};

use crate::config::Code2WavConfig;
use crate::weights::Weights;
use conv::{
    trans_conv_len, CausalConv1d, CausalTransConv1d, ConvNeXtBlock, DecoderBlock, SnakeBeta,
};
use transformer::PreTransformer;

pub use carried::CarriedState;
pub use streaming::{ChunkContext, StreamingCode2Wav, StreamingOptions};

/// Codec frames per second of Qwen3-Omni's codec (80 ms frames).
pub const CODEC_FRAME_RATE_HZ: f64 = 12.5;

/// Why a sequence of codec frames cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecFramesError {
    #[error("no codec frames to decode")]
    Empty,
    #[error("codec frame {frame} has {found} codebook ids, expected {expected} (num_quantizers)")]
    Width {
        frame: usize,
        found: usize,
        expected: usize,
    },
    #[error("codec frame {frame}, codebook {codebook}: id {id} is out of range (codebook_size {codebook_size})")]
    IdOutOfRange {
        frame: usize,
        codebook: usize,
        id: u32,
        codebook_size: usize,
    },
}

/// Codec tokens: one row of `num_quantizers` (16) codebook ids per 80 ms frame, frame-major.
///
/// The reference passes `codes` as `[batch, num_quantizers, frames]`; this is one batch entry,
/// transposed so that frames can be appended as the Talker produces them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodecFrames {
    pub frames: Vec<Vec<u32>>,
}

impl CodecFrames {
    pub fn new(frames: Vec<Vec<u32>>) -> Self {
        Self { frames }
    }

    /// From the reference layout `[num_quantizers][frames]` (codebook-major).
    pub fn from_codebook_major(rows: &[Vec<u32>]) -> Result<Self> {
        let n = rows.first().map_or(0, Vec::len);
        if let Some((q, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != n) {
            bail!("codebook {q} has {} frames, codebook 0 has {n}", row.len());
        }
        Ok(Self {
            frames: (0..n)
                .map(|t| rows.iter().map(|r| r[t]).collect())
                .collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn push(&mut self, frame: Vec<u32>) {
        self.frames.push(frame);
    }

    /// Checks one frame (index `index` in its sequence) against the codec's shape.
    pub fn validate_frame(
        index: usize,
        frame: &[u32],
        num_quantizers: usize,
        codebook_size: usize,
    ) -> Result<(), CodecFramesError> {
        if frame.len() != num_quantizers {
            return Err(CodecFramesError::Width {
                frame: index,
                found: frame.len(),
                expected: num_quantizers,
            });
        }
        if let Some((q, &id)) = frame
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= codebook_size)
        {
            return Err(CodecFramesError::IdOutOfRange {
                frame: index,
                codebook: q,
                id,
                codebook_size,
            });
        }
        Ok(())
    }

    /// Non-empty, `num_quantizers` ids per frame, every id `< codebook_size`.
    pub fn validate(
        &self,
        num_quantizers: usize,
        codebook_size: usize,
    ) -> Result<(), CodecFramesError> {
        if self.frames.is_empty() {
            return Err(CodecFramesError::Empty);
        }
        for (t, frame) in self.frames.iter().enumerate() {
            Self::validate_frame(t, frame, num_quantizers, codebook_size)?;
        }
        Ok(())
    }
}

/// Waveform samples for `frames` codec frames: `frames·Π upsampling_ratios` hidden steps, then
/// `len → (len - 1)·rate` per decoder block. `None` when a block would be left with nothing.
pub fn waveform_len(
    frames: usize,
    upsampling_ratios: &[usize],
    upsample_rates: &[usize],
) -> Option<usize> {
    let mut len = frames;
    for &f in upsampling_ratios {
        len = trans_conv_len(len, f, f)?;
    }
    for &r in upsample_rates {
        len = trans_conv_len(len, 2 * r, r)?;
    }
    Some(len)
}

/// One call of the reference's `chunked_decode` loop: decode frames `start - context .. end` and
/// keep the output after `context·samples_per_frame` samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkStep {
    pub start: usize,
    pub end: usize,
    pub context: usize,
}

/// The calls `chunked_decode(codes, chunk_size, left_context_size)` makes for `frames` frames: chunks
/// of `chunk_size` with `left_context` frames before each (fewer at the start: `context = start`
/// unless `start > left_context`).
pub fn chunk_plan(frames: usize, chunk_size: usize, left_context: usize) -> Result<Vec<ChunkStep>> {
    ensure!(chunk_size > 0, "chunk_size must be positive");
    let mut steps = Vec::new();
    let mut start = 0;
    while start < frames {
        let end = (start + chunk_size).min(frames);
        let context = if start > left_context {
            left_context
        } else {
            start
        };
        steps.push(ChunkStep {
            start,
            end,
            context,
        });
        start = end;
    }
    Ok(steps)
}

/// The Code2Wav vocoder (`code2wav.*`).
#[derive(Debug, Clone)]
pub struct Code2Wav {
    code_embedding: Tensor,
    pre_transformer: PreTransformer,
    upsample: Vec<(CausalTransConv1d, ConvNeXtBlock)>,
    decoder_in: CausalConv1d,
    decoder_blocks: Vec<DecoderBlock>,
    decoder_snake: SnakeBeta,
    decoder_out: CausalConv1d,
    codebook_size: usize,
    num_quantizers: usize,
    hidden_size: usize,
    upsampling_ratios: Vec<usize>,
    upsample_rates: Vec<usize>,
}

impl Code2Wav {
    /// `w` is the `code2wav` prefix of the checkpoint.
    pub fn new(cfg: &Code2WavConfig, w: &Weights) -> Result<Self> {
        let (h, q, cb) = (cfg.hidden_size, cfg.num_quantizers, cfg.codebook_size);
        ensure!(
            q > 0 && cb > 0,
            "code2wav_config: num_quantizers and codebook_size must be positive"
        );
        ensure!(
            cfg.upsampling_ratios
                .iter()
                .chain(&cfg.upsample_rates)
                .all(|&r| r > 0),
            "code2wav_config: upsampling factors must be positive"
        );
        let blocks = cfg.upsample_rates.len();
        ensure!(
            blocks < usize::BITS as usize
                && cfg.decoder_dim % (1 << blocks) == 0
                && cfg.decoder_dim >> blocks > 0,
            "code2wav_config: decoder_dim {} cannot be halved {blocks} times",
            cfg.decoder_dim
        );
        // 1. Codes → mean embedding; 2. pre-transformer.
        let code_embedding = w.pp("code_embedding").get(&[cb * q, h], "weight")?;
        let pre_transformer = PreTransformer::new(cfg, &w.pp("pre_transformer"))?;
        // 3. Upsampling: (transposed conv, ConvNeXt) per ratio.
        let upsample = cfg
            .upsampling_ratios
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let wi = w.pp("upsample").pp(i);
                Ok((
                    CausalTransConv1d::new(&wi.pp(0), h, h, f, f)?,
                    ConvNeXtBlock::new(&wi.pp(1), h)?,
                ))
            })
            .collect::<Result<_>>()?;
        // 4. Decoder: conv in, blocks, Snake, conv out.
        let wd = w.pp("decoder");
        let decoder_in = CausalConv1d::new(&wd.pp(0), h, cfg.decoder_dim, 7, 1, 1, 1)?;
        let decoder_blocks = cfg
            .upsample_rates
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                DecoderBlock::new(
                    &wd.pp(i + 1),
                    cfg.decoder_dim >> i,
                    cfg.decoder_dim >> (i + 1),
                    r,
                )
            })
            .collect::<Result<_>>()?;
        let out_dim = cfg.decoder_dim >> blocks;
        let decoder_snake = SnakeBeta::new(&wd.pp(blocks + 1), out_dim)?;
        let decoder_out = CausalConv1d::new(&wd.pp(blocks + 2), out_dim, 1, 7, 1, 1, 1)?;
        Ok(Self {
            code_embedding,
            pre_transformer,
            upsample,
            decoder_in,
            decoder_blocks,
            decoder_snake,
            decoder_out,
            codebook_size: cb,
            num_quantizers: q,
            hidden_size: h,
            upsampling_ratios: cfg.upsampling_ratios.clone(),
            upsample_rates: cfg.upsample_rates.clone(),
        })
    }

    /// Waveform samples per codec frame: the product of all upsampling factors (1920).
    pub fn samples_per_frame(&self) -> usize {
        self.upsampling_ratios
            .iter()
            .chain(&self.upsample_rates)
            .product()
    }

    /// Output sample rate: `samples_per_frame · 12.5` (24000 Hz for 1920).
    pub fn sample_rate(&self) -> u32 {
        (self.samples_per_frame() as f64 * CODEC_FRAME_RATE_HZ).round() as u32
    }

    pub fn num_quantizers(&self) -> usize {
        self.num_quantizers
    }

    pub fn codebook_size(&self) -> usize {
        self.codebook_size
    }

    /// Samples [`decode`](Self::decode) returns for `frames` frames (`None`: too short to decode).
    pub fn output_len(&self, frames: usize) -> Option<usize> {
        waveform_len(frames, &self.upsampling_ratios, &self.upsample_rates)
    }

    /// The samples by which `n` frames fall short of `n·samples_per_frame`: the tail that needs the
    /// next frame (555 for rates 8, 5, 4, 3). Same for every `n >= 1`.
    pub fn lag_samples(&self) -> usize {
        self.samples_per_frame() - self.output_len(1).unwrap_or(0)
    }

    /// The reference `forward`: the whole sequence at once, clamped to `[-1, 1]`.
    pub fn decode(&self, codes: &CodecFrames) -> Result<Vec<f32>> {
        self.check(codes)?;
        self.waveform(&codes.frames, true)
    }

    /// [`decode`](Self::decode) without the final `clamp(-1, 1)` (diagnostics and golden tests).
    pub fn decode_unclamped(&self, codes: &CodecFrames) -> Result<Vec<f32>> {
        self.check(codes)?;
        self.waveform(&codes.frames, false)
    }

    /// The reference `chunked_decode(codes, chunk_size, left_context_size)` (defaults 300 and 25):
    /// chunks of `chunk_size` frames, each decoded with up to `left_context` frames before it, whose
    /// samples are dropped. Loses [`lag_samples`](Self::lag_samples) at each chunk boundary, as the
    /// reference does; use [`StreamingCode2Wav`] for a gapless chunked decode.
    pub fn chunked_decode(
        &self,
        codes: &CodecFrames,
        chunk_size: usize,
        left_context: usize,
    ) -> Result<Vec<f32>> {
        self.check(codes)?;
        self.chunked(codes, chunk_size, left_context, true)
    }

    /// [`chunked_decode`](Self::chunked_decode) without the final clamp of each chunk.
    pub fn chunked_decode_unclamped(
        &self,
        codes: &CodecFrames,
        chunk_size: usize,
        left_context: usize,
    ) -> Result<Vec<f32>> {
        self.check(codes)?;
        self.chunked(codes, chunk_size, left_context, false)
    }

    /// A streaming decoder over this model: push frames, get audio as soon as a chunk is complete.
    pub fn streaming(&self, opts: StreamingOptions) -> Result<StreamingCode2Wav<'_>> {
        StreamingCode2Wav::new(self, opts)
    }

    fn check(&self, codes: &CodecFrames) -> Result<()> {
        codes.validate(self.num_quantizers, self.codebook_size)?;
        if self.output_len(codes.len()).is_none() {
            bail!(
                "{} codec frame(s) are too few for this Code2Wav's upsampling",
                codes.len()
            );
        }
        Ok(())
    }

    fn chunked(
        &self,
        codes: &CodecFrames,
        chunk_size: usize,
        left_context: usize,
        clamp: bool,
    ) -> Result<Vec<f32>> {
        let spf = self.samples_per_frame();
        let mut wav = Vec::new();
        for step in chunk_plan(codes.len(), chunk_size, left_context)? {
            let chunk = self.waveform(&codes.frames[step.start - step.context..step.end], clamp)?;
            wav.extend_from_slice(chunk.get(step.context * spf..).unwrap_or(&[]));
        }
        Ok(wav)
    }

    /// Frames (already validated) → waveform samples.
    pub(crate) fn waveform(&self, frames: &[Vec<u32>], clamp: bool) -> Result<Vec<f32>> {
        let _span = crate::profile::span("code2wav waveform");
        crate::quant::in_pool(|| self.waveform_in_pool(frames, clamp))
    }

    fn waveform_in_pool(&self, frames: &[Vec<u32>], clamp: bool) -> Result<Vec<f32>> {
        let _stage = crate::profile::stage("code2wav");
        let device = self.code_embedding.device();
        let hidden = self.embed(frames, device)?;
        // 2. Pre-transformer: [1, t, h].
        let span = crate::profile::span("code2wav pre-transformer");
        let hidden = self.pre_transformer.forward(&hidden)?;
        drop(span);
        // 3. Upsampling: [1, h, t] → [1, h, t·Πratios].
        let span = crate::profile::span("code2wav upsampling");
        let mut x = hidden.transpose(1, 2)?.contiguous()?;
        for (trans, convnext) in &self.upsample {
            x = convnext.forward(&trans.forward(&x)?)?;
        }
        drop(span);
        // 4. Decoder: [1, decoder_dim, ·] → blocks → [1, 1, samples].
        let _span = crate::profile::span("code2wav decoder convs");
        x = self.decoder_in.forward(&x)?;
        for block in &self.decoder_blocks {
            x = block.forward(&x)?;
        }
        x = self.decoder_out.forward(&self.decoder_snake.forward(&x)?)?;
        if clamp {
            x = x.clamp(-1f32, 1f32)?;
        }
        Ok(x.flatten_all()?.to_vec1::<f32>()?)
    }

    /// 1. `code_embedding(codes + q·codebook_size).mean(quantizers)`: `[1, t, hidden]`.
    fn embed(&self, frames: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let (t, q) = (frames.len(), self.num_quantizers);
        let ids: Vec<u32> = frames
            .iter()
            .flat_map(|f| {
                f.iter()
                    .enumerate()
                    .map(|(qi, &id)| id + (qi * self.codebook_size) as u32)
            })
            .collect();
        let ids = Tensor::from_vec(ids, t * q, device)?;
        let emb = self
            .code_embedding
            .index_select(&ids, 0)?
            .reshape((t, q, self.hidden_size))?;
        Ok(emb.mean(1)?.unsqueeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waveform_length_arithmetic() {
        let (ratios, rates) = ([2, 2], [8, 5, 4, 3]);
        // 1 frame: 4 hidden steps → 24 → 115 → 456 → 1365 samples.
        assert_eq!(waveform_len(1, &ratios, &rates), Some(1365));
        for n in 1..50 {
            assert_eq!(
                waveform_len(n, &ratios, &rates),
                Some(1920 * n - 555),
                "{n} frames"
            );
        }
        assert_eq!(waveform_len(0, &ratios, &rates), None);
        assert_eq!(waveform_len(1, &[], &[8]), None);
        assert_eq!(waveform_len(3, &[], &[8]), Some(16));
    }

    #[test]
    fn chunk_plan_follows_the_reference_loop() {
        let plan = chunk_plan(330, 300, 25).unwrap();
        assert_eq!(
            plan,
            vec![
                ChunkStep {
                    start: 0,
                    end: 300,
                    context: 0
                },
                ChunkStep {
                    start: 300,
                    end: 330,
                    context: 25
                }
            ]
        );
        // Early chunks get `start` frames of context until start > left_context (strictly).
        let plan = chunk_plan(50, 16, 20).unwrap();
        let contexts: Vec<usize> = plan.iter().map(|s| s.context).collect();
        assert_eq!(contexts, vec![0, 16, 20, 20]);
        let plan = chunk_plan(50, 16, 16).unwrap();
        assert_eq!(
            plan.iter().map(|s| s.context).collect::<Vec<_>>(),
            vec![0, 16, 16, 16]
        );
        assert_eq!(plan.last().unwrap().end, 50);
        assert!(chunk_plan(7, 300, 25).unwrap().len() == 1);
        assert!(chunk_plan(7, 0, 25).is_err());
    }

    #[test]
    fn codec_frames_validation() {
        let ok = CodecFrames::new(vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(ok.validate(3, 6), Ok(()));
        assert_eq!(
            CodecFrames::default().validate(3, 6),
            Err(CodecFramesError::Empty)
        );
        assert_eq!(
            ok.validate(4, 6),
            Err(CodecFramesError::Width {
                frame: 0,
                found: 3,
                expected: 4
            })
        );
        assert_eq!(
            ok.validate(3, 5),
            Err(CodecFramesError::IdOutOfRange {
                frame: 1,
                codebook: 2,
                id: 5,
                codebook_size: 5
            })
        );
        let cm = CodecFrames::from_codebook_major(&[vec![0, 3], vec![1, 4], vec![2, 5]]).unwrap();
        assert_eq!(cm, ok);
        assert!(CodecFrames::from_codebook_major(&[vec![0, 3], vec![1]]).is_err());
    }
}
