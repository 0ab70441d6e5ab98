//! Streaming encode of the user's speech while it is spoken (issue #6): the capture thread sends the
//! samples of the open segment (pre-roll included) as they become certain to stay in the turn, and
//! the **encoder thread** feeds them to a [`StreamingAudioEncoder`], so log-mel frames and the AuT conv
//! stem of every completed 100-frame chunk are done before the user stops. At the end of speech only
//! [`StreamingAudioEncoder::finish`] remains (tail frames, last stem, windowed attention, output layers).
//!
//! Why a thread of its own, holding an `Arc<OmniModel>`: the encoder borrows the model's
//! `AudioEncoder` (`StreamingAudioEncoder<'a>`). The thread owns a clone of the `Arc` for its whole
//! life and every encoder it builds borrows from that local clone, so the borrow is sound without
//! `unsafe` or a self-referential struct; the model is immutable (`Sync`) and already shared the same
//! way with the Thinker and Talker threads. Running it on the model thread instead would stall the
//! encode of a barge-in turn behind the answer being cancelled; here the new turn's encoder runs while
//! the old answer winds down. The capture thread only moves sample blocks over a channel.
//!
//! Exactness: the capture thread sends only samples the turn will contain (a VAD segment may lose its
//! tail after the last voiced frame, so it sends up to `voiced end + tail` only, see
//! [`super::vad::Segmenter::committed_samples`]) and the remainder when the turn is cut. The worker
//! keeps a hash of everything it was fed; the model thread compares it with the hash of the turn's
//! samples and falls back to the offline encoder on any mismatch (never a silently different prompt).

use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender};

use super::now_ns;
use crate::audio::stream::StreamedEncode;
use crate::audio::{StreamingAudioEncoder, StreamingStats};
use crate::audio_encoder::AudioTokens;
use crate::pipeline::OmniModel;

/// Commands from the capture thread, in stream order.
pub enum EncodeCommand {
    /// A segment opened (its encoder state starts empty).
    Begin { segment: u64 },
    /// The next samples of the segment (16 kHz mono, after echo cancellation).
    Samples { segment: u64, samples: Vec<f32> },
    /// The segment was rejected (too short, noise): its state is dropped.
    Discard { segment: u64 },
    /// The segment became a turn (all its samples were sent): finish and reply.
    Finish {
        segment: u64,
        /// [`now_ns`] when the turn was cut (the end of speech as the loop sees it).
        end_ns: u64,
        reply: Sender<Result<EncodedSegment, String>>,
    },
}

/// A finished streaming encode of one turn.
pub struct EncodedSegment {
    pub tokens: AudioTokens,
    pub stats: StreamingStats,
    /// Samples fed, and the FNV-1a hash of their bits (see [`sample_hash`]).
    pub samples: usize,
    pub hash: u64,
    /// Wall time of `finish` (what remained after the end of speech).
    pub finish_ms: f64,
    /// From the Finish command being sent to the reply (queue wait + finish).
    pub end_to_tokens_ms: f64,
    /// Blocks fed, and the samples the stream had received when its first chunk was stemmed (`None`:
    /// no chunk completed before the end). Less than `samples` means stems ran before the end.
    pub blocks: usize,
    pub samples_at_first_stem: Option<usize>,
    /// Chunks whose stem was done (wall clock) before the Finish command was sent.
    pub stems_before_end: usize,
    /// The streamed mel features `[n_mels, frames]` and chunk stems (for `--dump-turns`).
    pub mel: Vec<f32>,
    pub n_mels: usize,
    pub stems: Vec<Tensor>,
}

/// FNV-1a over the bits of `samples`, continued from `state` (start with [`HASH_START`]).
pub fn sample_hash(state: u64, samples: &[f32]) -> u64 {
    let mut h = state;
    for x in samples {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

pub const HASH_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Starts the encoder thread over `model`'s audio encoder; it ends when `commands` closes.
pub fn spawn_encoder_thread(
    model: std::sync::Arc<OmniModel>,
    commands: Receiver<EncodeCommand>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("omni-encoder".into())
        .spawn(move || run(&model, &commands))
        .context("cannot start the streaming encoder thread")
}

/// One open segment's state.
struct Open<'m> {
    segment: u64,
    encoder: StreamingAudioEncoder<'m>,
    hash: u64,
    blocks: usize,
    samples_at_first_stem: Option<usize>,
    /// (when, chunks stemmed so far) after each push that stemmed something.
    stem_times: Vec<(u64, usize)>,
    /// A push failed: the reply will carry this error (the turn then falls back to the offline encoder).
    failed: Option<String>,
}

fn run(model: &OmniModel, commands: &Receiver<EncodeCommand>) {
    let mut open: Option<Open<'_>> = None;
    for cmd in commands.iter() {
        match cmd {
            EncodeCommand::Begin { segment } => {
                open = None;
                let front = match model.audio.as_ref() {
                    Some(f) => f,
                    None => continue, // no audio encoder: Finish replies with an error
                };
                match StreamingAudioEncoder::new(&front.encoder, front.mel.config()) {
                    Ok(encoder) => {
                        open = Some(Open {
                            segment,
                            encoder,
                            hash: HASH_START,
                            blocks: 0,
                            samples_at_first_stem: None,
                            stem_times: Vec::new(),
                            failed: None,
                        })
                    }
                    Err(e) => tracing::warn!("streaming encoder: {e:#}"),
                }
            }
            EncodeCommand::Samples { segment, samples } => {
                let Some(o) = open
                    .as_mut()
                    .filter(|o| o.segment == segment && o.failed.is_none())
                else {
                    continue;
                };
                o.hash = sample_hash(o.hash, &samples);
                o.blocks += 1;
                let before = o.encoder.stats().stems_during_speech;
                match o.encoder.push(&samples) {
                    Ok(chunks) => {
                        if o.encoder.stats().stems_during_speech > before {
                            o.samples_at_first_stem
                                .get_or_insert(o.encoder.mel().samples_received());
                            o.stem_times.push((now_ns(), chunks));
                        }
                    }
                    Err(e) => o.failed = Some(format!("{e:#}")),
                }
            }
            EncodeCommand::Discard { segment } => {
                if open.as_ref().is_some_and(|o| o.segment == segment) {
                    open = None;
                }
            }
            EncodeCommand::Finish {
                segment,
                end_ns,
                reply,
            } => {
                let result = match open.take().filter(|o| o.segment == segment) {
                    Some(o) => finish(o, end_ns).map_err(|e| format!("{e:#}")),
                    None if model.audio.is_none() => Err(format!(
                        "{} has no audio encoder (thinker.audio_tower)",
                        model.dir.display()
                    )),
                    None => Err(format!(
                        "streaming encoder: segment {segment} was never opened"
                    )),
                };
                let _ = reply.send(result);
            }
        }
    }
}

fn finish(o: Open<'_>, end_ns: u64) -> Result<EncodedSegment> {
    if let Some(e) = o.failed {
        anyhow::bail!("streaming encoder: {e}");
    }
    let samples = o.encoder.mel().samples_received();
    let stems_before_end = o
        .stem_times
        .iter()
        .filter(|(t, _)| *t <= end_ns)
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    let start = Instant::now();
    let StreamedEncode {
        tokens,
        mel,
        stats,
        stems,
        ..
    } = o.encoder.finish_with_stems()?;
    let finish_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(EncodedSegment {
        tokens,
        stats,
        samples,
        hash: o.hash,
        finish_ms,
        end_to_tokens_ms: super::ms_between(end_ns, now_ns()),
        blocks: o.blocks,
        samples_at_first_stem: o.samples_at_first_stem,
        stems_before_end,
        n_mels: mel.n_mels,
        mel: mel.features,
        stems,
    })
}

/// What the loop reports of a turn's streaming encode (`omni talk --json`, per turn).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EncodeReport {
    /// `streaming`, or `offline` when the turn fell back to the offline encoder (and why).
    pub path: String,
    pub fallback_reason: Option<String>,
    pub stats: Option<StreamingStats>,
    pub samples: usize,
    pub blocks: usize,
    pub samples_at_first_stem: Option<usize>,
    pub stems_before_end: usize,
}
