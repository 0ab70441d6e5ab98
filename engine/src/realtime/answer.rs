//! The model thread: answers user turns, streaming text to the controller and audio to the
//! playback thread, and stops when the turn's cancel token is set (barge-in).
//!
//! Two back ends produce the same [`AnswerEvent`]s:
//! - [`Backend::Conversation`]: [`crate::conversation::Conversation`] — KV cache reused across turns,
//!   Talker and Code2Wav streaming while the Thinker runs (the default);
//! - [`Backend::Offline`]: the `omni run` path (re-prefill of the whole history each turn, speech after
//!   the text), kept as a reference and a fallback.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};

use crate::chat::{ChatMessage, ContentItem};
use crate::conversation::{
    AnswerEvent, AudioChunk, CancelToken, Conversation, ConversationOptions, EncodedUserTurn, TurnSummary, UserTurn,
};
use crate::audio_encoder::AudioTokens;
use crate::generation::{generate_from_embeds, FinishReason, Sampler, StopRule};
use crate::pipeline::{LoadProgress, OmniModel};
use crate::speech::SpeechModels;

use super::encode::{sample_hash, spawn_encoder_thread, EncodeCommand, EncodeReport, EncodedSegment, HASH_START};
use super::playback::PlaybackCommand;

/// Which implementation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Conversation,
    Offline,
}

/// A user turn to answer.
pub struct AnswerRequest {
    pub turn: u64,
    pub samples: Vec<f32>,
    pub cancel: CancelToken,
    /// Tokens of history kept before the conversation is reset.
    pub max_context_tokens: usize,
    /// The streaming encoder's reply for `samples` (see [`super::encode`]); `None`: encode offline.
    pub encoded: Option<Receiver<Result<EncodedSegment, String>>>,
}

/// The streaming encode of the live loop, run beside the model thread (see [`super::encode`]).
pub struct StreamingEncodeSetup {
    /// Commands from the capture thread.
    pub commands: Receiver<EncodeCommand>,
    /// Test aid: write each turn's samples, streamed mel, stems and encoder output to
    /// `DIR/turn-N.safetensors`.
    pub dump_dir: Option<PathBuf>,
}

/// What the model thread reports to the controller.
pub enum ModelEvent {
    /// Loading the model: `done` of `total` steps of `what` (Thinker layers), at most every 100 ms.
    Loading {
        what: String,
        done: usize,
        total: usize,
    },
    Loaded {
        load_ms: f64,
        speaks: bool,
    },
    TextDelta {
        turn: u64,
        text: String,
    },
    /// An audio chunk went to the playback thread.
    Audio {
        turn: u64,
        samples: usize,
    },
    Done {
        turn: u64,
        summary: Box<TurnSummary>,
    },
    /// How the turn's audio was encoded; `finish_ms`: the streaming encoder's `finish` (what remained
    /// at the end of speech), `None` when the turn was encoded offline.
    Encoded {
        turn: u64,
        finish_ms: Option<f64>,
        report: Box<EncodeReport>,
    },
    Failed {
        turn: Option<u64>,
        message: String,
    },
}

/// Load progress as [`ModelEvent::Loading`], throttled so a fast load sends a handful.
struct EventProgress {
    events: Sender<ModelEvent>,
    what: String,
    total: usize,
    last: Option<Instant>,
}

impl EventProgress {
    fn send(&mut self, done: usize, force: bool) {
        if !force && self.last.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        self.last = Some(Instant::now());
        let _ = self.events.send(ModelEvent::Loading { what: self.what.clone(), done, total: self.total });
    }
}

impl LoadProgress for EventProgress {
    fn start(&mut self, what: &str, total: usize) {
        self.what = what.to_string();
        self.total = total;
        self.send(0, true);
    }
    fn advance(&mut self, done: usize) {
        self.send(done, false);
    }
    fn finish(&mut self) {
        let total = self.total;
        self.send(total, true);
    }
}

/// Loads `model_dir` on the model thread and answers requests until the channel closes.
pub fn spawn_model_thread(
    model_dir: PathBuf,
    backend: Backend,
    options: impl FnOnce(&OmniModel) -> Result<ConversationOptions> + Send + 'static,
    requests: Receiver<AnswerRequest>,
    events: Sender<ModelEvent>,
    playback: Sender<PlaybackCommand>,
    streaming: Option<StreamingEncodeSetup>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("omni-model".into())
        .spawn(move || {
            let fail = |e: anyhow::Error| {
                let _ = events.send(ModelEvent::Failed {
                    turn: None,
                    message: format!("{e:#}"),
                });
            };
            let start = Instant::now();
            let mut progress = EventProgress { events: events.clone(), what: String::new(), total: 0, last: None };
            let model = match OmniModel::load(&model_dir, &mut progress) {
                Ok(m) => Arc::new(m),
                Err(e) => return fail(e),
            };
            let speech = if model.config.has_talker() && model.config.talker_config.is_some() {
                match SpeechModels::load(&model) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) => return fail(e),
                }
            } else {
                None
            };
            let opts = match options(&model) {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            let (encoder_thread, dump_dir) = match streaming {
                Some(setup) => match spawn_encoder_thread(model.clone(), setup.commands) {
                    Ok(t) => (Some(t), setup.dump_dir),
                    Err(e) => return fail(e),
                },
                None => (None, None),
            };
            let mut answerer = match Answerer::new(backend, model, speech.clone(), opts) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let _ = events.send(ModelEvent::Loaded {
                load_ms: start.elapsed().as_secs_f64() * 1e3,
                speaks: speech.is_some(),
            });
            answerer.prime();
            for mut req in requests.iter() {
                let turn = req.turn;
                let mut sent_end = false;
                let mut encoded_tokens = None;
                if let Some(reply) = req.encoded.take() {
                    let (encoded, report) = receive_encoded(&reply, &req.samples);
                    if let (Some(dir), Some(seg)) = (&dump_dir, &encoded) {
                        if let Err(e) = dump_turn(dir, turn, &req.samples, seg) {
                            tracing::warn!("--dump-turns: {e:#}");
                        }
                    }
                    let _ = events.send(ModelEvent::Encoded {
                        turn,
                        finish_ms: encoded.as_ref().map(|s| s.finish_ms),
                        report: Box::new(report),
                    });
                    encoded_tokens = encoded.map(|s| s.tokens);
                }
                let result = answerer.answer(req, encoded_tokens, &mut |ev| match ev {
                    AnswerEvent::TextDelta { text, .. } => {
                        if !text.is_empty() {
                            let _ = events.send(ModelEvent::TextDelta { turn, text });
                        }
                    }
                    AnswerEvent::AudioChunk(chunk) => {
                        let n = chunk.samples.len();
                        let _ = playback.send(PlaybackCommand::Audio {
                            turn,
                            samples: chunk.samples,
                        });
                        let _ = events.send(ModelEvent::Audio { turn, samples: n });
                    }
                    AnswerEvent::Done(summary) => {
                        let _ = playback.send(PlaybackCommand::End { turn });
                        sent_end = true;
                        let _ = events.send(ModelEvent::Done {
                            turn,
                            summary: Box::new(summary),
                        });
                    }
                    AnswerEvent::Error(message) => {
                        let _ = events.send(ModelEvent::Failed {
                            turn: Some(turn),
                            message,
                        });
                    }
                    _ => {}
                });
                if let Err(e) = result {
                    let _ = events.send(ModelEvent::Failed {
                        turn: Some(turn),
                        message: format!("{e:#}"),
                    });
                }
                if !sent_end {
                    let _ = playback.send(PlaybackCommand::End { turn });
                }
                answerer.prime();
            }
            drop(answerer);
            // The encoder thread ends when the capture thread drops its sender.
            if let Some(t) = encoder_thread {
                let _ = t.join();
            }
        })
        .context("cannot start the model thread")
}

enum Answerer {
    Conversation(Box<Conversation>),
    Offline(Box<Offline>),
}

impl Answerer {
    fn new(
        backend: Backend,
        model: Arc<OmniModel>,
        speech: Option<Arc<SpeechModels>>,
        opts: ConversationOptions,
    ) -> Result<Self> {
        Ok(match backend {
            Backend::Conversation => Self::Conversation(Box::new(Conversation::new(model, speech, opts)?)),
            Backend::Offline => Self::Offline(Box::new(Offline::new(model, speech, opts)?)),
        })
    }

    /// Prefills the next turn's known start while the user has not spoken (see
    /// [`Conversation::prime`]). Not fatal: on a failure the next turn rebuilds the cache itself.
    fn prime(&mut self) {
        if let Self::Conversation(conv) = self {
            if let Err(e) = conv.prime() {
                tracing::warn!("prefilling the next turn's start: {e:#}");
            }
        }
    }

    /// `encoded`: the turn's audio already encoded by the streaming encoder (the conversation then
    /// skips its encoder; the offline back end, the reference path, always encodes the samples).
    fn answer(
        &mut self,
        req: AnswerRequest,
        encoded: Option<AudioTokens>,
        on: &mut dyn FnMut(AnswerEvent),
    ) -> Result<()> {
        match self {
            Self::Conversation(conv) => {
                // A bounded context: past the limit the chat starts afresh (memory stays flat in a
                // long session; the KV cache is the only thing that grows with the history).
                if conv.cached_tokens() > req.max_context_tokens {
                    conv.reset();
                }
                let stream = match encoded {
                    Some(tokens) => conv.answer_encoded(EncodedUserTurn::audio(tokens), req.cancel)?,
                    None => conv.answer(UserTurn::audio(req.samples), req.cancel)?,
                };
                for ev in stream {
                    on(ev);
                }
                Ok(())
            }
            Self::Offline(o) => o.answer(req, on),
        }
    }
}

/// Waits for the streaming encoder's result and checks it was fed exactly `samples` (count and hash);
/// on any failure the turn is encoded offline and the report says why.
fn receive_encoded(
    reply: &Receiver<Result<EncodedSegment, String>>,
    samples: &[f32],
) -> (Option<EncodedSegment>, EncodeReport) {
    let offline = |reason: String| {
        tracing::warn!("streaming encode not used for this turn: {reason}");
        (
            None,
            EncodeReport {
                path: "offline".into(),
                fallback_reason: Some(reason),
                ..Default::default()
            },
        )
    };
    let seg = match reply.recv() {
        Ok(Ok(seg)) => seg,
        Ok(Err(e)) => return offline(e),
        Err(_) => return offline("the streaming encoder thread has stopped".into()),
    };
    if seg.samples != samples.len() || seg.hash != sample_hash(HASH_START, samples) {
        return offline(format!(
            "the streaming encoder was fed {} samples, the turn holds {} (or they differ)",
            seg.samples,
            samples.len()
        ));
    }
    let report = EncodeReport {
        path: "streaming".into(),
        fallback_reason: None,
        stats: Some(seg.stats.clone()),
        samples: seg.samples,
        blocks: seg.blocks,
        samples_at_first_stem: seg.samples_at_first_stem,
        stems_before_end: seg.stems_before_end,
    };
    (Some(seg), report)
}

/// `--dump-turns`: `DIR/turn-N.safetensors` with `samples` `[n]`, `mel` `[n_mels, frames]` (streamed),
/// `stem.C` (chunk C's stem) and `embeddings` (the encoder output); written to a temp name, renamed.
fn dump_turn(dir: &std::path::Path, turn: u64, samples: &[f32], seg: &EncodedSegment) -> Result<()> {
    use candle_core::{Device, Tensor};
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("samples".to_string(), Tensor::from_slice(samples, samples.len(), &Device::Cpu)?);
    let frames = seg.mel.len() / seg.n_mels.max(1);
    tensors.insert("mel".to_string(), Tensor::from_slice(&seg.mel, (seg.n_mels, frames), &Device::Cpu)?);
    for (c, stem) in seg.stems.iter().enumerate() {
        tensors.insert(format!("stem.{c}"), stem.clone());
    }
    tensors.insert("embeddings".to_string(), seg.tokens.embeddings.clone());
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("turn-{turn}.safetensors"));
    let tmp = dir.join(format!(".turn-{turn}.safetensors.partial"));
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The `omni run` path over a growing message list.
struct Offline {
    model: Arc<OmniModel>,
    speech: Option<Arc<SpeechModels>>,
    speaker: Option<String>,
    opts: ConversationOptions,
    messages: Vec<ChatMessage>,
    clips: Vec<Vec<f32>>,
}

/// Audio chunk length sent to playback by the offline path (its audio exists all at once).
const OFFLINE_CHUNK: usize = 24_000 / 25;

impl Offline {
    fn new(model: Arc<OmniModel>, speech: Option<Arc<SpeechModels>>, opts: ConversationOptions) -> Result<Self> {
        let speaker = match &speech {
            Some(s) => {
                let name = match &opts.speaker {
                    Some(n) => n.clone(),
                    None => s.default_speaker().context("the checkpoint lists no speakers")?,
                };
                s.speaker_id(&name)?;
                Some(name)
            }
            None => None,
        };
        let mut messages = Vec::new();
        if let Some(system) = &opts.system {
            messages.push(ChatMessage::text("system", system));
        }
        Ok(Self {
            model,
            speech,
            speaker,
            opts,
            messages,
            clips: Vec::new(),
        })
    }

    fn answer(&mut self, req: AnswerRequest, on: &mut dyn FnMut(AnswerEvent)) -> Result<()> {
        let start = Instant::now();
        let model = &*self.model;
        self.clips.push(req.samples);
        let clip = ContentItem::Audio {
            audio: format!("clip-{}", self.clips.len() - 1),
        };
        self.messages.push(ChatMessage {
            role: "user".into(),
            content: vec![clip],
        });
        let clip_refs: Vec<&[f32]> = self.clips.iter().map(Vec::as_slice).collect();
        let prompt = model.prepare(&self.messages, &clip_refs)?;
        let stop = StopRule {
            eos_ids: model.eos_ids()?,
            max_new_tokens: self.opts.max_new_tokens,
        };
        let mut sampler = Sampler::new(self.opts.sampling.clone());
        let mut streamer = crate::tokenizer::TextStreamer::new();
        let cancel = req.cancel.clone();
        let mut first_token_ms = None;
        let out = generate_from_embeds(
            &model.thinker,
            &prompt.ids,
            &prompt.embeds,
            &prompt.positions,
            &mut sampler,
            &stop,
            |id| {
                first_token_ms.get_or_insert(start.elapsed().as_secs_f64() * 1e3);
                let text = streamer.push(&model.tokenizer, id)?.unwrap_or_default();
                on(AnswerEvent::TextDelta { text, token_id: id });
                Ok(!cancel.is_cancelled())
            },
        )?;
        let thinker_ms = start.elapsed().as_secs_f64() * 1e3;
        let text = model.tokenizer.decode(&out.token_ids, true)?;
        let mut codes = Vec::new();
        let mut audio_samples = 0;
        let mut first_audio_ms = None;
        let mut speech_finish = None;
        if let (Some(speech), Some(speaker), false) = (&self.speech, &self.speaker, req.cancel.is_cancelled()) {
            let c = req.cancel.clone();
            let spoken = speech.speak(model, &prompt, &out, &stop.eos_ids, speaker, &self.opts.talker, |_| {
                Ok(!c.is_cancelled())
            })?;
            first_audio_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            for (i, piece) in spoken.audio.chunks(OFFLINE_CHUNK).enumerate() {
                if req.cancel.is_cancelled() {
                    break;
                }
                on(AnswerEvent::AudioChunk(AudioChunk {
                    samples: piece.to_vec(),
                    sample_rate: spoken.sample_rate,
                    first_frame: 0,
                    frames: 0,
                    first_sample: i * OFFLINE_CHUNK,
                    text_tokens: out.token_ids.len(),
                }));
                audio_samples += piece.len();
            }
            codes = spoken.codes;
            speech_finish = Some(spoken.finish);
        }
        self.messages.push(ChatMessage::text("assistant", &text));
        let finish = if req.cancel.is_cancelled() {
            FinishReason::Cancelled
        } else {
            out.finish
        };
        on(AnswerEvent::Done(TurnSummary {
            token_ids: out.token_ids.clone(),
            text,
            finish,
            codes,
            speech_finish,
            audio_samples,
            prompt_tokens: prompt.ids.len(),
            reused_tokens: 0,
            timings: crate::conversation::TurnTimings {
                audio_encode_ms: 0.0,
                prefill_ms: out.prefill_ms,
                first_token_ms,
                first_audio_ms,
                thinker_ms,
                total_ms: start.elapsed().as_secs_f64() * 1e3,
            },
        }));
        Ok(())
    }
}
