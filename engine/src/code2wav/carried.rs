//! Code2Wav decoding frames as they come while every layer keeps its state between calls.
//!
//! Every layer of Code2Wav is causal (see the [module docs](super)), so the waveform of frames
//! `0..n` can be computed a chunk at a time if each layer keeps what its next outputs still need:
//! the pre-transformer the keys/values of the last `sliding_window - 1` frames
//! ([`KvWindow`]), each stride-1 causal conv its last `kernel_eff - 1` input columns, each
//! transposed conv the partial sums of the samples the next input step still adds to
//! ([`TransConvState`]). Each frame is then decoded once, and the audio equals
//! [`Code2Wav::decode`] of all frames so far — the reference `forward`, which is also what the
//! reference's `chunked_decode(codes, 300, 25)` returns for answers up to 300 frames (24 s) — where
//! re-decoding a window of left context (the reference's streaming recipe, [`super::streaming`])
//! costs `(context + chunk) / chunk` times the work and cuts the receptive field.

use anyhow::Result;
use candle_core::Tensor;

use super::conv::{DecoderBlockState, TransConvState};
use super::transformer::KvWindow;
use super::Code2Wav;

/// Everything a [`Code2Wav`] carries from one chunk of frames to the next.
#[derive(Debug, Clone)]
pub struct CarriedState {
    pre_transformer: KvWindow,
    /// Per upsampling stage: the transposed conv (kernel = stride: nothing pending) and the
    /// ConvNeXt block's depthwise conv tail.
    upsample: Vec<(TransConvState, Tensor)>,
    decoder_in: Tensor,
    blocks: Vec<DecoderBlockState>,
    decoder_out: Tensor,
}

impl Code2Wav {
    /// The state before a stream's first frame (the causal convs' zero padding).
    pub fn carried_state(&self) -> Result<CarriedState> {
        let device = self.code_embedding.device();
        Ok(CarriedState {
            pre_transformer: KvWindow::default(),
            upsample: self
                .upsample
                .iter()
                .map(|(_, convnext)| Ok((TransConvState::default(), convnext.initial_tail(device)?)))
                .collect::<Result<_>>()?,
            decoder_in: self.decoder_in.initial_tail(device)?,
            blocks: self
                .decoder_blocks
                .iter()
                .map(|b| b.initial_state(device))
                .collect::<Result<_>>()?,
            decoder_out: self.decoder_out.initial_tail(device)?,
        })
    }

    /// The samples that `frames` (validated) complete after the frames of earlier calls with the
    /// same `state`: over a whole stream, exactly [`decode`](Self::decode)'s samples (up to float
    /// rounding in the products), the last `lag_samples` of the newest frame left for the next call.
    pub(crate) fn waveform_carried(
        &self,
        state: &mut CarriedState,
        frames: &[Vec<u32>],
        clamp: bool,
    ) -> Result<Vec<f32>> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let _span = crate::profile::span("code2wav waveform");
        crate::quant::in_pool(|| {
            let _stage = crate::profile::stage("code2wav");
            // 1. Mean code embeddings, 2. pre-transformer over the new frames: [1, t, h].
            let hidden = self.embed(frames, self.code_embedding.device())?;
            let hidden = self
                .pre_transformer
                .forward_carried(&hidden, &mut state.pre_transformer)?;
            // 3. Upsampling: [1, h, t·Πratios] (kernel = stride: every step final at once).
            let mut x = hidden.transpose(1, 2)?.contiguous()?;
            for ((trans, convnext), (trans_state, tail)) in self.upsample.iter().zip(&mut state.upsample) {
                let Some(up) = trans.step(trans_state, &x)? else {
                    return Ok(Vec::new());
                };
                x = convnext.step(tail, &up)?;
            }
            // 4. Decoder: conv in, blocks (each may hold back its newest samples), Snake, conv out.
            x = self.decoder_in.step(&mut state.decoder_in, &x)?;
            for (block, block_state) in self.decoder_blocks.iter().zip(&mut state.blocks) {
                match block.step(block_state, &x)? {
                    Some(h) => x = h,
                    None => return Ok(Vec::new()),
                }
            }
            x = self
                .decoder_out
                .step(&mut state.decoder_out, &self.decoder_snake.forward(&x)?)?;
            if clamp {
                x = x.clamp(-1f32, 1f32)?;
            }
            Ok(x.flatten_all()?.to_vec1::<f32>()?)
        })
    }
}
