//! Multi-turn spoken conversations with streamed answers: the API the CLI's `--stream` and the live
//! voice loop drive.
//!
//! A [`Conversation`] keeps the model loaded (behind `Arc`s), the chat history, the Thinker's KV cache
//! and token history, and the Talker's user rows of earlier turns. [`Conversation::answer`] appends
//! only the new tokens of a user turn (and the closing of the previous answer, as the chat template
//! renders history), then streams the answer as typed [`AnswerEvent`]s:
//!
//! * the Thinker runs on a worker thread and sends [`AnswerEvent::TextDelta`] per token;
//! * the Talker starts as soon as the Thinker's first token exists, on a second thread, consuming the
//!   Thinker's tokens as they arrive (it waits, never guesses, when it gets ahead); Code2Wav decodes
//!   small chunks, each layer's state carried from the last, and sends [`AnswerEvent::AudioChunk`]s
//!   (see [`crate::stream`]);
//! * [`AnswerEvent::Done`] ends every answer, with a [`TurnSummary`] (ids, text, codes, timings).
//!
//! Greedy streaming gives exactly the codes of the non-streaming path ([`crate::speech::SpeechModels::speak`]
//! and the reference's `generate(return_audio=True)`); a later turn gives the tokens and codes of a fresh
//! run on the whole message list (the test `engine/tests/speech_streaming.rs` proves both).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use omni_engine::conversation::*;
//! # use omni_engine::pipeline::{NoProgress, OmniModel};
//! # use omni_engine::speech::SpeechModels;
//! # fn main() -> anyhow::Result<()> {
//! let model = Arc::new(OmniModel::load("ckpt".as_ref(), &mut NoProgress)?);
//! let speech = Arc::new(SpeechModels::load(&model)?);
//! let mut conv = Conversation::new(model.clone(), Some(speech), ConversationOptions::new(&model))?;
//! let cancel = CancelToken::new(); // cancel.cancel() from any thread = barge-in
//! for event in conv.answer(UserTurn::text("Hello!"), cancel.clone())? {
//!     match event {
//!         AnswerEvent::TextDelta { text, .. } => print!("{text}"),
//!         AnswerEvent::AudioChunk(chunk) => { /* push chunk.samples (24 kHz) to the output ring */ }
//!         AnswerEvent::Done(summary) => println!("\nfirst audio after {:?} ms", summary.timings.first_audio_ms),
//!         AnswerEvent::Error(e) => eprintln!("error: {e}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Limits: user turns carry text and audio (no images/video yet); each turn's clips are encoded
//! alone (a fresh run encodes every clip of the list in one padded batch, which can change the last
//! mel frames of the shorter clips slightly); while an answer runs, a copy of the KV cache at the end
//! of its prompt is kept (up to twice the prompt's cache memory), see `conversation/turn.rs`.
//!
//! History after a cancelled answer (barge-in): the user turn stays, and the assistant turn keeps the
//! text the Talker had turned into audio chunks already sent (without speech: the tokens generated so
//! far); an app that knows how much was really played calls [`Conversation::truncate_last_answer`] with
//! [`AudioChunk::text_tokens`] of the last chunk heard.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use crossbeam_channel::Receiver;

use crate::chat::{ChatMessage, ContentItem};
use crate::code2wav::{ChunkContext, StreamingOptions};
use crate::generation::{FinishReason, SamplingParams};
use crate::pipeline::OmniModel;
use crate::speech::SpeechModels;
pub use crate::stream::{AudioChunk, CancelToken};
use crate::talker::TalkerParams;

mod turn;

/// Called on the Thinker thread after each generated token with the number of tokens so far (eos not
/// counted). Tests use it to hold the Thinker back; an app may use it for tracing.
pub type TokenHook = Arc<dyn Fn(usize) + Send + Sync>;

/// How a [`Conversation`] answers.
#[derive(Clone)]
pub struct ConversationOptions {
    /// A system message before the first user turn.
    pub system: Option<String>,
    /// Voice name (`talker_config.speaker_id`); `None`: the checkpoint's default (ethan).
    pub speaker: Option<String>,
    /// The Thinker's sampling (a fresh sampler with this seed every turn, as a fresh run has).
    pub sampling: SamplingParams,
    /// The Talker's and code predictor's sampling and `max_frames`.
    pub talker: TalkerParams,
    /// Most tokens per answer.
    pub max_new_tokens: usize,
    /// Thinker stop ids; `None`: the checkpoint's (generation_config.json, else `<|im_end|>`).
    pub stop_ids: Option<Vec<u32>>,
    /// Code2Wav chunking: frames per chunk (80 ms each) and where a chunk's left context comes from.
    pub chunking: StreamingOptions,
    /// Test hook, see [`TokenHook`].
    pub after_token: Option<TokenHook>,
}

impl std::fmt::Debug for ConversationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversationOptions")
            .field("system", &self.system)
            .field("speaker", &self.speaker)
            .field("sampling", &self.sampling)
            .field("talker", &self.talker)
            .field("max_new_tokens", &self.max_new_tokens)
            .field("stop_ids", &self.stop_ids)
            .field("chunking", &self.chunking)
            .field("after_token", &self.after_token.is_some())
            .finish()
    }
}

/// How answers are streamed: the first sound after the first Talker frame (57 ms of audio; each
/// further frame waits for a Thinker token, a Talker step and the code predictor: ~0.17 s each on
/// the lent 16-core CPU, and an 8-frame first chunk cost ~1 s more), then 8-frame chunks, every
/// Code2Wav layer's state carried between chunks (each frame decoded once; the audio is the
/// reference `forward`'s).
pub const ANSWER_CHUNKING: StreamingOptions = StreamingOptions {
    chunk_frames: 8,
    first_chunk_frames: 1,
    context: ChunkContext::Carried,
};

impl ConversationOptions {
    /// The checkpoint's sampling (generation_config.json), the reference Talker sampling (seed 0),
    /// 512 tokens, a first audio chunk of 1 frame (57 ms of audio) then chunks of 8 frames (0.64 s),
    /// Code2Wav's layer state carried between chunks ([`ANSWER_CHUNKING`]).
    pub fn new(model: &OmniModel) -> Self {
        Self {
            system: None,
            speaker: None,
            sampling: model.default_sampling(),
            talker: TalkerParams::reference(0),
            max_new_tokens: 512,
            stop_ids: None,
            chunking: ANSWER_CHUNKING,
            after_token: None,
        }
    }

    /// Greedy everywhere (Thinker argmax; Talker argmax with its 1.05 repetition penalty).
    pub fn greedy(max_new_tokens: usize, max_frames: usize) -> Self {
        Self {
            system: None,
            speaker: None,
            sampling: SamplingParams::greedy(),
            talker: TalkerParams::greedy(max_frames),
            max_new_tokens,
            stop_ids: None,
            chunking: ANSWER_CHUNKING,
            after_token: None,
        }
    }
}

/// One user turn: audio clips (16 kHz mono, in this order), then the text.
#[derive(Debug, Clone, Default)]
pub struct UserTurn {
    pub audio: Vec<Vec<f32>>,
    pub text: Option<String>,
}

impl UserTurn {
    pub fn text(text: &str) -> Self {
        Self { audio: Vec::new(), text: Some(text.to_string()) }
    }

    /// A spoken turn (16 kHz mono samples).
    pub fn audio(samples: Vec<f32>) -> Self {
        Self { audio: vec![samples], text: None }
    }
}

/// A user turn whose clips were already encoded, e.g. by a [`crate::audio::StreamingAudioEncoder`]
/// while the user was speaking (the live loop): the conversation skips the audio encoder for it.
/// `audio.per_clip` gives the clips (in order, before the text); the tokens and codes of the answer
/// are those of the [`UserTurn`] holding the same samples, as the encoder output is the same.
#[derive(Debug, Clone)]
pub struct EncodedUserTurn {
    pub audio: crate::audio_encoder::AudioTokens,
    pub text: Option<String>,
}

impl EncodedUserTurn {
    /// A spoken turn encoded ahead of time (one clip).
    pub fn audio(tokens: crate::audio_encoder::AudioTokens) -> Self {
        Self { audio: tokens, text: None }
    }
}

/// What [`Conversation`] answers: raw clips or clips already encoded.
#[derive(Debug, Clone)]
pub(crate) enum TurnInput {
    Samples(UserTurn),
    Encoded(EncodedUserTurn),
}

impl TurnInput {
    pub(crate) fn clips(&self) -> usize {
        match self {
            Self::Samples(t) => t.audio.len(),
            Self::Encoded(t) => t.audio.per_clip.len(),
        }
    }

    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Self::Samples(t) => t.text.as_deref(),
            Self::Encoded(t) => t.text.as_deref(),
        }
    }
}

/// Wall-clock milliseconds of one answer, from the [`Conversation::answer`] call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TurnTimings {
    /// Audio encoder time for this turn's clips (0 for an [`EncodedUserTurn`]: encoded before the call).
    pub audio_encode_ms: f64,
    /// Prefill of the new tokens only (the history's KV cache is reused).
    pub prefill_ms: f64,
    pub first_token_ms: Option<f64>,
    pub first_audio_ms: Option<f64>,
    /// The Thinker's last token.
    pub thinker_ms: f64,
    pub total_ms: f64,
}

/// What an answer produced.
#[derive(Debug, Clone)]
pub struct TurnSummary {
    /// Generated ids, eos excluded.
    pub token_ids: Vec<u32>,
    /// Their text (special tokens skipped), as stored in the history.
    pub text: String,
    pub finish: FinishReason,
    /// Codec frames (`[frames][num_code_groups]`); empty without speech.
    pub codes: Vec<Vec<u32>>,
    /// Why the Talker stopped; `None` without speech (or when the answer was too short to speak).
    pub speech_finish: Option<FinishReason>,
    /// Samples sent in audio chunks.
    pub audio_samples: usize,
    /// Tokens of the whole prompt this turn (history included; the ids: [`Conversation::cached_ids`])
    /// and how many of them came from the KV cache instead of a prefill.
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub timings: TurnTimings,
}

/// What [`AnswerStream`] yields, in this order: `Prefilled`, then `TextDelta`s and `AudioChunk`s
/// interleaved, `ThinkerDone` once, more `AudioChunk`s, and `Done` last (or `Error` last).
#[derive(Debug, Clone)]
pub enum AnswerEvent {
    /// The prompt is in the KV cache.
    Prefilled {
        prompt_tokens: usize,
        reused_tokens: usize,
        prefill_ms: f64,
    },
    /// One generated token and the text it completes (empty while a UTF-8 sequence is incomplete).
    TextDelta {
        text: String,
        token_id: u32,
    },
    AudioChunk(AudioChunk),
    /// The Thinker has stopped (the Talker may still be speaking).
    ThinkerDone {
        finish: FinishReason,
        tokens: usize,
        elapsed_ms: f64,
    },
    Done(TurnSummary),
    /// The answer failed; the conversation stays usable (its KV cache is rebuilt on the next turn).
    Error(String),
}

/// The state a turn's worker thread owns while it runs, and gives back.
pub(crate) use turn::History;

/// A chat with a loaded model: history, KV cache, streamed answers.
pub struct Conversation {
    model: Arc<OmniModel>,
    speech: Option<Arc<SpeechModels>>,
    opts: ConversationOptions,
    speaker_id: Option<u32>,
    /// `None` only while an answer runs or after a worker panic.
    history: Option<History>,
}

impl Conversation {
    /// Checks the options (sampling, speaker, chunking) and starts an empty history.
    pub fn new(model: Arc<OmniModel>, speech: Option<Arc<SpeechModels>>, opts: ConversationOptions) -> Result<Self> {
        opts.sampling.validate()?;
        if opts.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        let speaker_id = match &speech {
            Some(s) => {
                opts.talker.talker.validate().context("talker sampling")?;
                opts.talker.code_predictor.validate().context("code predictor sampling")?;
                if opts.talker.max_frames == 0 {
                    bail!("talker max_frames must be at least 1");
                }
                s.code2wav.streaming(opts.chunking)?;
                let name = match &opts.speaker {
                    Some(n) => n.clone(),
                    None => s.default_speaker().context("the checkpoint lists no speakers")?,
                };
                Some(s.speaker_id(&name)?)
            }
            None => None,
        };
        let history = History::new(&model, opts.system.as_deref());
        Ok(Self { model, speech, opts, speaker_id, history: Some(history) })
    }

    pub fn options(&self) -> &ConversationOptions {
        &self.opts
    }

    /// The chat so far as the template sees it (audio items are named `clip-N`).
    pub fn messages(&self) -> &[ChatMessage] {
        self.history.as_ref().map_or(&[], |h| h.messages())
    }

    /// Tokens in the Thinker's KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.history.as_ref().map_or(0, |h| h.cached_tokens())
    }

    /// The ids in the Thinker's KV cache: after an answer, its whole prompt (history included, audio
    /// placeholders expanded) followed by the answer's forwarded ids.
    pub fn cached_ids(&self) -> &[u32] {
        self.history.as_ref().map_or(&[], |h| h.cached_ids())
    }

    /// Forgets the history (keeps the model and options).
    pub fn reset(&mut self) {
        self.history = Some(History::new(&self.model, self.opts.system.as_deref()));
    }

    /// Answers `turn`: returns at once with the stream of events; the work runs on worker threads.
    /// Dropping the stream cancels the answer and waits for the workers (one token / frame).
    pub fn answer(&mut self, turn: UserTurn, cancel: CancelToken) -> Result<AnswerStream<'_>> {
        self.start_answer(TurnInput::Samples(turn), cancel)
    }

    /// Answers a turn whose audio is already encoded (see [`EncodedUserTurn`]); otherwise as [`Self::answer`].
    pub fn answer_encoded(&mut self, turn: EncodedUserTurn, cancel: CancelToken) -> Result<AnswerStream<'_>> {
        let rows = turn.audio.embeddings.dims().first().copied().unwrap_or(0);
        if turn.audio.per_clip.iter().sum::<usize>() != rows || turn.audio.per_clip.contains(&0) {
            bail!(
                "encoded user turn: {} audio token rows but clips of {:?} tokens",
                rows,
                turn.audio.per_clip
            );
        }
        self.start_answer(TurnInput::Encoded(turn), cancel)
    }

    fn start_answer(&mut self, turn: TurnInput, cancel: CancelToken) -> Result<AnswerStream<'_>> {
        if turn.clips() == 0 && turn.text().is_none() {
            bail!("a user turn needs text or audio");
        }
        let history = self.history.take().context("the conversation was lost by a failed answer; call reset")?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let job = turn::TurnJob {
            model: self.model.clone(),
            speech: self.speech.clone().zip(self.speaker_id),
            opts: self.opts.clone(),
            turn,
            cancel: cancel.clone(),
            events: tx,
        };
        let worker = std::thread::Builder::new()
            .name("omni-thinker".into())
            .spawn(move || turn::run(job, history))
            .context("cannot start the Thinker thread")?;
        Ok(AnswerStream { conv: self, events: rx, worker: Some(worker), cancel })
    }

    /// Prefills, before the user speaks, what the next user turn's prompt will start with: the system
    /// prompt at the start, the previous answer's end and the opening of the next user turn after
    /// each answer. At the end of the user's speech only their own tokens and the assistant's opening
    /// are then left to prefill. Blocks while it runs (a few tokens after an answer; the system
    /// prompt once); the next answer gives the same tokens as without it. Returns the tokens prefilled.
    pub fn prime(&mut self) -> Result<usize> {
        let model = self.model.clone();
        let speech = self.speech.clone();
        let history = self.history.as_mut().context("the conversation was lost by a failed answer; call reset")?;
        history.prime(&model, speech.as_deref(), &CancelToken::new())
    }

    /// Cuts the last assistant turn to its first `keep_tokens` tokens (what was heard before a
    /// barge-in); the next turn's prefill starts from the changed text.
    pub fn truncate_last_answer(&mut self, keep_tokens: usize) -> Result<()> {
        let model = self.model.clone();
        self.history
            .as_mut()
            .context("the conversation was lost by a failed answer; call reset")?
            .truncate_last_answer(&model, keep_tokens)
    }
}

/// The events of one answer; iterate it, or `select!` on [`Self::receiver`].
pub struct AnswerStream<'c> {
    conv: &'c mut Conversation,
    events: Receiver<AnswerEvent>,
    worker: Option<JoinHandle<History>>,
    cancel: CancelToken,
}

impl AnswerStream<'_> {
    /// The raw channel (ends when the answer is over); after it disconnects, drop the stream.
    pub fn receiver(&self) -> &Receiver<AnswerEvent> {
        &self.events
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Waits for the end of the answer, calling `on_event` for every event; returns the summary.
    pub fn wait(mut self, mut on_event: impl FnMut(&AnswerEvent)) -> Result<TurnSummary> {
        let mut summary = None;
        for ev in self.by_ref() {
            on_event(&ev);
            match ev {
                AnswerEvent::Done(s) => summary = Some(s),
                AnswerEvent::Error(e) => bail!("{e}"),
                _ => {}
            }
        }
        summary.context("the answer ended without a summary")
    }

    /// Joins the worker and gives its history back to the conversation.
    fn finish(&mut self) {
        if let Some(worker) = self.worker.take() {
            match worker.join() {
                Ok(history) => self.conv.history = Some(history),
                Err(_) => self.conv.history = None,
            }
        }
    }
}

impl Iterator for AnswerStream<'_> {
    type Item = AnswerEvent;

    fn next(&mut self) -> Option<AnswerEvent> {
        match self.events.recv() {
            Ok(ev) => Some(ev),
            Err(_) => {
                self.finish();
                None
            }
        }
    }
}

impl Drop for AnswerStream<'_> {
    fn drop(&mut self) {
        if self.worker.is_some() {
            self.cancel.cancel();
            self.finish();
        }
    }
}

/// A user message for the chat template: one `audio` item per clip, then the text.
pub(crate) fn user_message(turn: &TurnInput, first_clip: usize) -> ChatMessage {
    let mut content: Vec<ContentItem> =
        (0..turn.clips()).map(|i| ContentItem::Audio { audio: format!("clip-{}", first_clip + i) }).collect();
    if let Some(t) = turn.text() {
        content.push(ContentItem::Text { text: t.to_string() });
    }
    ChatMessage { role: "user".into(), content }
}
