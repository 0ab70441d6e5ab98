//! Streaming Code2Wav: audio for codec frames as they arrive, in chunks.
//!
//! Two ways to give a chunk the past it depends on ([`ChunkContext`]):
//! - **carried** (the default, what answers are spoken with): every layer keeps its state between
//!   chunks ([`super::carried`]); each frame is decoded once and the audio equals
//!   [`Code2Wav::decode`] of all frames, whatever the chunking;
//! - **re-decoded**, like the reference's `Qwen3OmniMoeCode2Wav.chunked_decode`: each chunk of new
//!   frames is decoded together with up to `left_context` frames before it, and the audio of the
//!   context is dropped. Unlike it, the cut is placed where the previous chunk's audio ended (`lag`
//!   samples before the context's end, see [`Code2Wav::lag_samples`]) rather than at the context's
//!   end, so no samples go missing: after [`finish`](StreamingCode2Wav::finish) the stream has
//!   exactly the length of [`Code2Wav::decode`], and differs from it only where the truncated left
//!   context reaches (the sliding-window attention and the conv receptive fields).

use anyhow::{ensure, Context, Result};

use super::carried::CarriedState;
use super::{Code2Wav, CodecFrames};

/// Where a chunk's left context comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkContext {
    /// Each layer's state carried from the previous chunk: exact, each frame decoded once.
    Carried,
    /// This many already-decoded frames decoded again before each chunk (the reference's
    /// `chunked_decode` uses 25, 2 s), their audio dropped. At least one frame (the `lag` samples
    /// come from it).
    Redecoded(usize),
}

/// Chunking of a [`StreamingCode2Wav`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingOptions {
    /// New frames per decode (80 ms each) after the first chunk. Default 12 (0.96 s).
    pub chunk_frames: usize,
    /// Frames of the first chunk: the time to the first sound is this many Talker frames (and as
    /// many Thinker tokens), so a voice assistant wants it small; later chunks can be longer,
    /// which costs less per-call overhead. Default 12.
    pub first_chunk_frames: usize,
    pub context: ChunkContext,
}

impl Default for StreamingOptions {
    fn default() -> Self {
        Self::carried(12)
    }
}

impl StreamingOptions {
    /// Every chunk `chunk_frames` long, the first too, each re-decoding `left_context` frames.
    pub fn uniform(chunk_frames: usize, left_context: usize) -> Self {
        Self {
            chunk_frames,
            first_chunk_frames: chunk_frames,
            context: ChunkContext::Redecoded(left_context),
        }
    }

    /// Every chunk `chunk_frames` long, the first too, with the layers' state carried.
    pub fn carried(chunk_frames: usize) -> Self {
        Self {
            chunk_frames,
            first_chunk_frames: chunk_frames,
            context: ChunkContext::Carried,
        }
    }

    /// The re-decoded frames per chunk (`None`: carried state).
    pub fn left_context(&self) -> Option<usize> {
        match self.context {
            ChunkContext::Carried => None,
            ChunkContext::Redecoded(n) => Some(n),
        }
    }
}

/// Incremental decoder: [`push`](Self::push) frames, collect the audio it returns, then
/// [`finish`](Self::finish) for the rest.
#[derive(Debug)]
pub struct StreamingCode2Wav<'a> {
    model: &'a Code2Wav,
    opts: StreamingOptions,
    clamp: bool,
    /// Re-decoded context: the last `left_context` decoded frames followed by the pending (not yet
    /// decoded) ones. Carried state: the pending ones.
    window: Vec<Vec<u32>>,
    /// Absolute index of `window[0]`.
    window_start: usize,
    /// Every layer's state after the decoded frames (carried context only).
    carried: Option<CarriedState>,
    /// Frames received.
    received: usize,
    /// Frames whose audio has been emitted (up to the `lag` tail).
    decoded: usize,
    /// Samples emitted.
    emitted: usize,
}

impl<'a> StreamingCode2Wav<'a> {
    pub fn new(model: &'a Code2Wav, opts: StreamingOptions) -> Result<Self> {
        ensure!(
            opts.chunk_frames > 0 && opts.first_chunk_frames > 0,
            "streaming Code2Wav: chunk_frames and first_chunk_frames must be positive"
        );
        let (spf, lag) = (model.samples_per_frame(), model.lag_samples());
        let min_context = lag.div_ceil(spf).max(1);
        if let ChunkContext::Redecoded(left_context) = opts.context {
            ensure!(
                left_context >= min_context,
                "streaming Code2Wav: left_context must be at least {min_context} frame(s), got {left_context}"
            );
        }
        let carried = match opts.context {
            ChunkContext::Carried => Some(model.carried_state()?),
            ChunkContext::Redecoded(_) => None,
        };
        Ok(Self {
            model,
            opts,
            clamp: true,
            window: Vec::new(),
            window_start: 0,
            carried,
            received: 0,
            decoded: 0,
            emitted: 0,
        })
    }

    /// Emit the waveform before the final `clamp(-1, 1)` (diagnostics and tests).
    pub fn without_clamp(mut self) -> Self {
        self.clamp = false;
        self
    }

    pub fn options(&self) -> StreamingOptions {
        self.opts
    }

    pub fn frames_received(&self) -> usize {
        self.received
    }

    pub fn samples_emitted(&self) -> usize {
        self.emitted
    }

    /// Frames received but not yet decoded.
    pub fn pending_frames(&self) -> usize {
        self.received - self.decoded
    }

    /// Adds one frame; returns the audio of a completed chunk, or nothing yet.
    pub fn push(&mut self, frame: Vec<u32>) -> Result<Vec<f32>> {
        CodecFrames::validate_frame(
            self.received,
            &frame,
            self.model.num_quantizers(),
            self.model.codebook_size(),
        )?;
        self.window.push(frame);
        self.received += 1;
        let chunk = if self.decoded == 0 { self.opts.first_chunk_frames } else { self.opts.chunk_frames };
        if self.pending_frames() >= chunk {
            self.decode_pending()
        } else {
            Ok(Vec::new())
        }
    }

    /// Adds several frames; returns the audio of every chunk they complete.
    pub fn push_frames(&mut self, frames: &CodecFrames) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for frame in &frames.frames {
            out.extend(self.push(frame.clone())?);
        }
        Ok(out)
    }

    /// Decodes the frames still pending (fewer than a chunk) and ends the stream.
    pub fn finish(mut self) -> Result<Vec<f32>> {
        if self.pending_frames() > 0 {
            self.decode_pending()
        } else {
            Ok(Vec::new())
        }
    }

    /// Decodes the pending frames and returns the samples after those already emitted.
    fn decode_pending(&mut self) -> Result<Vec<f32>> {
        if let Some(state) = &mut self.carried {
            let out = self.model.waveform_carried(state, &self.window, self.clamp)?;
            self.emitted += out.len();
            self.decoded = self.received;
            self.window_start = self.received;
            self.window.clear();
            return Ok(out);
        }
        let left_context = self
            .opts
            .left_context()
            .context("streaming Code2Wav: carried context without its state")?;
        let spf = self.model.samples_per_frame();
        // 1. The window: up to `left_context` decoded frames, then the pending ones.
        let first = self.decoded.saturating_sub(left_context);
        debug_assert!(first >= self.window_start);
        let wave = self
            .model
            .waveform(&self.window[first - self.window_start..], self.clamp)?;
        // 2. Skip what was emitted: the window's audio starts at absolute sample first·spf.
        let skip = self.emitted - first * spf;
        ensure!(
            skip <= wave.len(),
            "streaming Code2Wav: window too short ({} < {skip} samples)",
            wave.len()
        );
        let out = wave[skip..].to_vec();
        self.emitted += out.len();
        self.decoded = self.received;
        // 3. Keep only the next chunk's left context.
        let keep_from = self.decoded.saturating_sub(left_context);
        self.window.drain(..keep_from - self.window_start);
        self.window_start = keep_from;
        Ok(out)
    }
}
