//! Streaming speech: the Talker and Code2Wav run while the Thinker's tokens arrive.
//!
//! The reference (`Qwen3OmniMoeForConditionalGeneration.generate`, see `talker/input.rs`) builds the
//! Talker input after the Thinker has finished; every row of it is nevertheless known as soon as one
//! Thinker token has been produced, so the same rows can be fed while the Thinker runs:
//!
//! 1. the user rows (`_get_talker_user_parts`) come from the prompt: `text_projection` of layer-0
//!    embeddings, `hidden_projection` of the `accept_hidden_layer` states at audio/image/video tokens
//!    (captured during the one real prefill, [`user_rows`]);
//! 2. the assistant rows need the prompt's `<|im_start|>assistant\n` and the first generated token
//!    (assistant row 3, with `codec_bos`): the Talker prefill can run right after the first token;
//! 3. the text row of Talker step `j` is generated token `j + 1` (its `text_projection`); the last
//!    forwarded position is followed by `tts_eos`, then `tts_pad`. Whether a token is the last one (eos,
//!    or the `max_new_tokens`-th, which the reference never forwards) is known when it is drawn, so the
//!    Thinker flags it ([`TextFeed::Token::last`]) and the Talker never has to guess: when it needs row
//!    `j` before token `j + 1` exists, it waits ([`AssistantText::trailing_row`] returns `None`).
//!
//! [`run_speech`] is the frame loop over a channel of [`TextFeed`]s; with all tokens queued up front it
//! is the non-streaming path ([`crate::speech::SpeechModels::speak`]), so both give identical codes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::code2wav::StreamingOptions;
use crate::generation::FinishReason;
use crate::speech::SpeechModels;
use crate::talker::generate::{FrameStep, TalkerParams, TalkerStream};
use crate::talker::input::{AcceptedState, SpecialIds};
use crate::talker::Talker;
use crate::thinker::{ThinkerStep, ThinkerText};

/// Cancels a running answer from any thread (barge-in). The Thinker checks it before every token and
/// the Talker before every frame; while one waits for the other it polls every 10 ms.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Audio of some codec frames, in order and gapless: concatenating every chunk of an answer gives its
/// waveform.
#[derive(Debug, Clone)]
pub struct AudioChunk {
    /// Mono samples in [-1, 1].
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// Index of the first codec frame decoded into this chunk.
    pub first_frame: usize,
    /// Frames decoded into this chunk.
    pub frames: usize,
    /// Index of the chunk's first sample in the answer's waveform.
    pub first_sample: usize,
    /// Answer tokens whose text the Talker had consumed when it made the chunk's last frame: what
    /// `Conversation::truncate_last_answer` keeps once this chunk has been heard.
    pub text_tokens: usize,
}

/// What the Thinker sends the Talker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFeed {
    /// A drawn id (eos included). `last`: nothing follows (eos, or the `max_new_tokens`-th id).
    Token { id: u32, last: bool, eos: bool },
    /// The Thinker was cancelled or failed: stop speaking.
    Stop,
}

/// Which Thinker state is `hidden_states[accept_hidden_layer]`, and the layer to capture for it.
pub fn accepted_state(talker: &Talker, thinker: &ThinkerText) -> Result<(AcceptedState, Vec<usize>)> {
    let which = AcceptedState::new(talker.config().accept_hidden_layer, thinker.config().num_hidden_layers)?;
    let capture = match which {
        AcceptedState::LayerOutput(l) => vec![l],
        _ => vec![],
    };
    Ok((which, capture))
}

/// The accepted state of a forward pass over `embeds [1, t, h]` (asked with [`accepted_state`]'s
/// capture list): `[1, t, h]`.
pub fn accepted_rows(which: AcceptedState, embeds: &Tensor, step: &ThinkerStep) -> Tensor {
    match which {
        AcceptedState::Embeddings => embeds.clone(),
        AcceptedState::LayerOutput(_) => step.captured[0].clone(),
        AcceptedState::FinalNorm => step.hidden.clone(),
    }
}

/// Whether position `i` of `ids` (a prompt, `ids.len()` its length) belongs to a user turn: its latest
/// `<|im_start|>` (position 0 if none) is followed by the user role, as the reference's `cummax` rule.
pub fn user_positions(ids: &[u32], sp: &SpecialIds, from: usize) -> Vec<usize> {
    let p = ids.len();
    let mut last_start = 0usize;
    let mut out = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        if id == sp.im_start {
            last_start = i;
        }
        if i >= from && ids[(last_start + 1).min(p - 1)] == sp.user {
            out.push(i);
        }
    }
    out
}

/// The Talker's user rows (`_get_talker_user_parts`) of the prompt positions `from..` of `ids`, one
/// `[1, talker_hidden]` each: `hidden_projection(hidden)` at multimodal tokens, `text_projection(embed)`
/// elsewhere. `embeds` / `hidden` hold rows `from..ids.len()` (`[m, thinker_hidden]`); `hidden` is
/// needed only when those user positions include multimodal tokens. Rows are projected one by one, as
/// `TalkerInput::build` does, so a row does not depend on how the prompt was split into turns.
pub fn user_rows(
    talker: &Talker,
    sp: &SpecialIds,
    ids: &[u32],
    from: usize,
    embeds: &Tensor,
    hidden: Option<&Tensor>,
) -> Result<Vec<(usize, Tensor)>> {
    let mut rows = Vec::new();
    for i in user_positions(ids, sp, from) {
        let r = i - from;
        let row = if sp.multimodal.contains(&ids[i]) {
            let h = hidden.context("user rows: the accepted Thinker states of the multimodal tokens are missing")?;
            talker.hidden_projection.forward(&h.narrow(0, r, 1)?)?
        } else {
            talker.text_projection.forward(&embeds.narrow(0, r, 1)?)?
        };
        rows.push((i, row));
    }
    Ok(rows)
}

/// The prompt's last `<|im_start|>assistant` position.
pub fn assistant_start(ids: &[u32], sp: &SpecialIds) -> Result<usize> {
    (0..ids.len().saturating_sub(1))
        .rev()
        .find(|&i| ids[i] == sp.im_start && ids[i + 1] == sp.assistant)
        .context("the prompt has no `<|im_start|>assistant` turn")
}

/// Readiness of the Talker prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillState {
    Ready,
    Wait,
    /// The answer ended before the Talker had its first text row: nothing to speak.
    Never,
}

/// The assistant's text as the Talker sees it: the prompt from its last `<|im_start|>assistant`,
/// then the generated ids as they arrive.
pub struct AssistantText<'a> {
    talker: &'a Talker,
    thinker: &'a ThinkerText,
    /// `ids[a..p]` then the generated ids (eos included).
    seq: Vec<u32>,
    head_len: usize,
    /// Index in `seq` of the first eos.
    eos_at: Option<usize>,
    complete: bool,
    /// `text_projection` of tts_bos, tts_eos, tts_pad: `[1, H]` each.
    tts: [Tensor; 3],
}

impl<'a> AssistantText<'a> {
    pub fn new(talker: &'a Talker, thinker: &'a ThinkerText, sp: &SpecialIds, head: &[u32]) -> Result<Self> {
        // Batched as in TalkerInput::build.
        let tts = talker.text_projection.forward(&thinker.embed(&[sp.tts_bos, sp.tts_eos, sp.tts_pad])?.squeeze(0)?)?;
        Ok(Self {
            talker,
            thinker,
            seq: head.to_vec(),
            head_len: head.len(),
            eos_at: None,
            complete: false,
            tts: [tts.narrow(0, 0, 1)?, tts.narrow(0, 1, 1)?, tts.narrow(0, 2, 1)?],
        })
    }

    pub fn push(&mut self, id: u32, last: bool, eos: bool) {
        if self.complete {
            return;
        }
        if eos && self.eos_at.is_none() {
            self.eos_at = Some(self.seq.len());
        }
        self.seq.push(id);
        self.complete = last;
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// `text_projection` of the Thinker embedding of `seq[i]`: `[1, H]`.
    fn project(&self, i: usize) -> Result<Tensor> {
        self.talker.text_projection.forward(&self.thinker.embed(&self.seq[i..i + 1])?.squeeze(0)?)
    }

    /// The reference forwards every position but the last: assistant rows `seq[..forwarded]`.
    fn forwarded(&self) -> usize {
        self.seq.len() - 1
    }

    pub fn prefill_state(&self) -> PrefillState {
        if self.complete {
            if self.forwarded() >= 4 {
                PrefillState::Ready
            } else {
                PrefillState::Never
            }
        } else if self.seq.len() >= 4 {
            PrefillState::Ready
        } else {
            PrefillState::Wait
        }
    }

    /// The nine assistant rows after `user_rows`, as `_get_talker_assistant_parts`: `[1, t, H]`.
    pub fn prefill(&self, user_rows: &[Tensor], speaker_id: u32) -> Result<Tensor> {
        if self.prefill_state() != PrefillState::Ready {
            bail!("the Talker prefill needs the first generated token");
        }
        let cfg = self.talker.config();
        let codec = self.talker.model.embed_codes(&[
            cfg.codec_nothink_id,
            cfg.codec_think_bos_id,
            cfg.codec_think_eos_id,
            speaker_id,
            cfg.codec_pad_id,
            cfg.codec_bos_id,
        ])?; // [6, H]
        let [tts_bos, _, tts_pad] = &self.tts;
        let mut rows: Vec<Tensor> = user_rows.to_vec();
        for i in 0..3 {
            rows.push(self.project(i)?);
        }
        for k in 0..4 {
            rows.push((tts_pad + codec.narrow(0, k, 1)?)?);
        }
        rows.push((tts_bos + codec.narrow(0, 4, 1)?)?);
        rows.push((self.project(3)? + codec.narrow(0, 5, 1)?)?);
        Ok(Tensor::cat(&rows, 0)?.unsqueeze(0)?)
    }

    /// The text row of Talker step `j` (`[1, H]`), or `None` while it depends on tokens not drawn yet.
    pub fn trailing_row(&self, j: usize) -> Result<Option<Tensor>> {
        let [_, tts_eos, tts_pad] = &self.tts;
        if !self.complete {
            // No eos yet, and seq[4 + j] (if drawn) is not the last id: it is forwarded.
            // j < generated: the eos mask (row `first_eos`) cannot apply yet.
            let generated = self.seq.len() - self.head_len;
            return if 4 + j < self.seq.len() && j < generated { Ok(Some(self.project(4 + j)?)) } else { Ok(None) };
        }
        // The reference's trailing_text_hidden: seq[4..forwarded] then tts_eos (length l), then tts_eos at
        // generated index `first_eos` and tts_pad after it; tts_pad once it is used up.
        let l = self.forwarded().saturating_sub(3);
        let generated = self.seq.len() - self.head_len;
        let first_eos = self.eos_at.map_or(generated, |e| e - self.head_len);
        Ok(Some(if j >= l || j > first_eos {
            tts_pad.clone()
        } else if j == first_eos || j == l - 1 {
            tts_eos.clone()
        } else {
            self.project(4 + j)?
        }))
    }

    /// Generated tokens (eos excluded) whose text had entered the Talker when it made frame `f`
    /// (the prefill holds `seq[..4]`, step `j` adds `seq[4 + j]`).
    pub fn tokens_spoken_by_frame(&self, f: usize) -> usize {
        let generated = self.eos_at.unwrap_or(self.seq.len()) - self.head_len;
        (4 + f).saturating_sub(self.head_len).min(generated)
    }
}

/// What the Talker needs besides the text feed.
pub struct SpeechSetup<'a> {
    pub models: &'a SpeechModels,
    pub thinker: &'a ThinkerText,
    pub speaker_id: u32,
    pub params: &'a TalkerParams,
    /// User rows of the whole prompt (history included), `[1, H]` each, in order.
    pub user_rows: &'a [Tensor],
    /// The prompt from its last `<|im_start|>assistant` on.
    pub head: &'a [u32],
    /// Code2Wav chunking; `None`: no audio chunks (the caller decodes the codes itself).
    pub chunking: Option<StreamingOptions>,
}

/// The Talker's result.
#[derive(Debug, Clone)]
pub struct SpeechOutput {
    pub codes: Vec<Vec<u32>>,
    /// `None`: nothing was spoken (the answer ended before its first forwarded token).
    pub finish: Option<FinishReason>,
    /// Samples sent in audio chunks.
    pub samples: usize,
    /// [`AudioChunk::text_tokens`] of the last chunk sent (0 if none).
    pub spoken_tokens: usize,
}

/// Waits for the next feed item, polling `cancel`; a closed channel reads as [`TextFeed::Stop`].
fn next_feed(feed: &Receiver<TextFeed>, cancel: &CancelToken) -> TextFeed {
    loop {
        if cancel.is_cancelled() {
            return TextFeed::Stop;
        }
        match feed.recv_timeout(Duration::from_millis(10)) {
            Ok(item) => return item,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return TextFeed::Stop,
        }
    }
}

/// The frame loop: Talker prefill once the first token is there, a frame per step, each step's text
/// row taken from `feed` (waiting for it when needed), frames through streaming Code2Wav.
/// `on_frame` sees each frame (return `false` to stop); `on_chunk` each audio chunk.
pub fn run_speech(
    setup: &SpeechSetup<'_>,
    feed: &Receiver<TextFeed>,
    cancel: &CancelToken,
    mut on_frame: impl FnMut(&[u32]) -> Result<bool>,
    mut on_chunk: impl FnMut(AudioChunk) -> Result<()>,
) -> Result<SpeechOutput> {
    let models = setup.models;
    let talker = &models.talker;
    let mut text = AssistantText::new(talker, setup.thinker, &models.ids, setup.head)?;
    let cancelled = |codes: Vec<Vec<u32>>, samples: usize, spoken_tokens: usize| -> Result<SpeechOutput> {
        Ok(SpeechOutput { codes, finish: Some(FinishReason::Cancelled), samples, spoken_tokens })
    };
    // 1. Wait for the first generated token.
    loop {
        match text.prefill_state() {
            PrefillState::Ready => break,
            PrefillState::Never => {
                return Ok(SpeechOutput { codes: Vec::new(), finish: None, samples: 0, spoken_tokens: 0 })
            }
            PrefillState::Wait => match next_feed(feed, cancel) {
                TextFeed::Token { id, last, eos } => text.push(id, last, eos),
                TextFeed::Stop => return cancelled(Vec::new(), 0, 0),
            },
        }
    }
    let prefill = text.prefill(setup.user_rows, setup.speaker_id)?;
    let mut stream = TalkerStream::new(talker, &prefill, setup.params)?;
    let mut decoder = setup.chunking.map(|o| models.code2wav.streaming(o)).transpose()?;
    let rate = models.code2wav.sample_rate();
    let (mut codes, mut samples, mut chunked_frames, mut spoken) = (Vec::new(), 0usize, 0usize, 0usize);
    let mut emit = |wave: Vec<f32>,
                    frames_now: usize,
                    text: &AssistantText<'_>,
                    samples: &mut usize,
                    chunked: &mut usize,
                    spoken: &mut usize| {
        if wave.is_empty() {
            return Ok(());
        }
        let chunk = AudioChunk {
            first_frame: *chunked,
            frames: frames_now - *chunked,
            first_sample: *samples,
            text_tokens: text.tokens_spoken_by_frame(frames_now - 1),
            sample_rate: rate,
            samples: wave,
        };
        *samples += chunk.samples.len();
        *chunked = frames_now;
        *spoken = chunk.text_tokens;
        on_chunk(chunk)
    };
    // 2. One frame a step.
    let finish = loop {
        if cancel.is_cancelled() {
            return cancelled(codes, samples, spoken);
        }
        let frame = match stream.next_frame()? {
            FrameStep::Frame(f) => f,
            FrameStep::Finished(finish) => break finish,
        };
        let keep_going = on_frame(&frame)?;
        codes.push(frame.clone());
        if !keep_going {
            return cancelled(codes, samples, spoken);
        }
        if let Some(d) = decoder.as_mut() {
            let wave = d.push(frame)?;
            emit(wave, codes.len(), &text, &mut samples, &mut chunked_frames, &mut spoken)?;
        }
        // 3. This step's text row, waiting for the Thinker when it is behind.
        let j = stream.steps_fed();
        let row = loop {
            if let Some(row) = text.trailing_row(j)? {
                break row;
            }
            match next_feed(feed, cancel) {
                TextFeed::Token { id, last, eos } => text.push(id, last, eos),
                TextFeed::Stop => return cancelled(codes, samples, spoken),
            }
        };
        stream.feed(&row.unsqueeze(0)?)?;
    };
    // 4. The last partial chunk.
    if let Some(d) = decoder {
        let wave = d.finish()?;
        emit(wave, codes.len(), &text, &mut samples, &mut chunked_frames, &mut spoken)?;
    }
    Ok(SpeechOutput { codes, finish: Some(finish), samples, spoken_tokens: spoken })
}
