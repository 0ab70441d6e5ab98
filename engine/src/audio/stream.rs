//! Streaming audio encode for the live voice loop: log-mel frames computed as the audio arrives, and
//! the AuT encoder's conv stem run on each 100-frame chunk as soon as it is complete, so at the end of
//! speech only the tail frames, the last chunk's stem, the windowed attention and the output layers remain.
//!
//! Both produce exactly what the offline path produces for the same single clip
//! ([`LogMelExtractor::extract_one`] then [`AudioEncoder::forward`]): the frames go through the same
//! per-frame function ([`LogMelExtractor`]'s `log_mel_frame`) and the stems through
//! [`AudioEncoder::stem`] / [`AudioEncoder::encode_stems`], which the offline encoder also calls.
//!
//! Why a frame is final before the end is known (reference: `WhisperFeatureExtractor`, `center=True`):
//! frame `t` covers samples `t·hop - n_fft/2 .. t·hop + n_fft/2` of the waveform, reflected at both
//! ends. The reflection at the start only needs the first `n_fft/2 + 1` samples; the one at the end
//! depends on the total length `n`. So frame `t` is final once `t·hop + n_fft/2 <= received` (then
//! none of its samples reaches the end, whatever `n` turns out to be; and with `n_fft/2 >= hop` the
//! frame exists, as `n / hop > t`). The frames after that are computed by [`StreamingMel::finish`].
//!
//! The clamp `max(x, max - 8)` uses the maximum over the whole utterance. The stream keeps the raw
//! `log10` frames (`f64`, as the offline extractor does) and clamps on demand with whatever maximum the
//! caller gives; the encoder stems a chunk with the running maximum and, when the maximum grows (during
//! speech or at the end), compares the chunk's clamped values at the old and new maximum and re-runs the
//! stem only if some value changed (a chunk whose every value is above `new_max - 8` is unchanged).

use std::ops::Range;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::mel::{clamp_and_scale, reflect_centered, FrameBuffers};
use super::{LogMelExtractor, MelBatch, MelConfig, MelError};
use crate::audio_encoder::{chunk_lengths, output_tokens, AudioEncoder, AudioTokens, ClipFeatures};

/// Incremental log-mel features of one utterance (a batch of one: no batch padding).
///
/// Feed 16 kHz mono samples with [`push`](Self::push) in slices of any size; frames become final as
/// described in the module docs; [`finish`](Self::finish) adds the frames that depend on the end and
/// returns the features, equal to `extract_one` on the concatenated samples.
pub struct StreamingMel {
    extractor: LogMelExtractor,
    bufs: FrameBuffers,
    /// The samples still needed (for later frames and the end reflection); `samples[0]` is sample `base`.
    samples: Vec<f32>,
    base: usize,
    received: usize,
    /// Raw `log10` mel values, frame-major `[frames, n_mels]`.
    raw: Vec<f64>,
    frames: usize,
    max: f64,
    finished: bool,
}

impl std::fmt::Debug for StreamingMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingMel")
            .field("received", &self.received)
            .field("frames", &self.frames)
            .field("max", &self.max)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl StreamingMel {
    pub fn new(cfg: &MelConfig) -> Result<Self, MelError> {
        let extractor = LogMelExtractor::new(cfg)?;
        let bufs = extractor.frame_buffers();
        Ok(Self {
            extractor,
            bufs,
            samples: Vec::new(),
            base: 0,
            received: 0,
            raw: Vec::new(),
            frames: 0,
            max: f64::NEG_INFINITY,
            finished: false,
        })
    }

    pub fn config(&self) -> &MelConfig {
        self.extractor.config()
    }

    pub fn n_mels(&self) -> usize {
        self.extractor.config().feature_size
    }

    /// Samples pushed so far.
    pub fn samples_received(&self) -> usize {
        self.received
    }

    /// Frames computed so far (final: later samples do not change their raw values).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Maximum raw `log10` mel value over the frames so far (`-inf` before the first frame).
    pub fn running_max(&self) -> f64 {
        self.max
    }

    /// Whether [`finish`](Self::finish) has run.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Adds samples; returns the frames that became final (possibly none).
    pub fn push(&mut self, samples: &[f32]) -> Result<Range<usize>, MelError> {
        if self.finished {
            return Err(MelError::Config(
                "streaming log-mel: push after finish".into(),
            ));
        }
        if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
            return Err(MelError::NonFinite {
                index: 0,
                sample: self.received + i,
            });
        }
        self.samples.extend_from_slice(samples);
        self.received += samples.len();
        let cfg = self.extractor.config();
        let (hop, half) = (cfg.hop_length, cfg.n_fft / 2);
        let first = self.frames;
        // Frame t is final when none of its samples reaches the end (t·hop + n_fft/2 <= received), it
        // exists whatever the length turns out to be ((t + 1)·hop <= received), and the start reflection
        // (sample n_fft/2) has arrived.
        let ready = if self.received > half {
            ((self.received - half) / hop + 1).min(self.received / hop)
        } else {
            0
        };
        for t in first..ready.max(first) {
            self.compute_frame(t, None);
        }
        self.trim();
        Ok(first..self.frames)
    }

    /// The features of `frames` (all computed), clamped with `max` (pass [`running_max`](Self::running_max)
    /// for the best guess so far, or the final maximum), `[n_mels, frames.len()]` row-major like
    /// [`MelBatch::clip`].
    pub fn features(&self, frames: Range<usize>, max: f64) -> Result<Vec<f32>, MelError> {
        let n_mels = self.n_mels();
        if frames.end > self.frames || frames.start > frames.end {
            return Err(MelError::Config(format!(
                "streaming log-mel: frames {frames:?} asked, {} computed so far",
                self.frames
            )));
        }
        let floor = max - 8.0;
        let len = frames.len();
        let mut out = vec![0f32; n_mels * len];
        for (i, t) in frames.enumerate() {
            for m in 0..n_mels {
                out[m * len + i] = clamp_and_scale(self.raw[t * n_mels + m], floor);
            }
        }
        Ok(out)
    }

    /// Ends the utterance: computes the frames whose reflection reaches the end and returns all features
    /// clamped with the final maximum, as [`LogMelExtractor::extract_one`] would on the whole utterance.
    pub fn finish(&mut self) -> Result<MelBatch, MelError> {
        if self.finished {
            return Err(MelError::Config(
                "streaming log-mel: finish called twice".into(),
            ));
        }
        if self.received == 0 {
            return Err(MelError::EmptyClip { index: 0 });
        }
        let cfg = self.extractor.config();
        let min = cfg.min_samples();
        if self.received < min {
            return Err(MelError::TooShort {
                samples: self.received,
                min,
                min_ms: min as f64 * 1000.0 / cfg.sampling_rate as f64,
                rate: cfg.sampling_rate,
            });
        }
        let total = cfg.n_frames(self.received);
        for t in self.frames..total {
            self.compute_frame(t, Some(self.received));
        }
        self.finished = true;
        self.samples = Vec::new();
        Ok(MelBatch {
            n_mels: self.n_mels(),
            n_frames: total,
            features: self.features(0..total, self.max)?,
            valid_frames: vec![total],
            clip_samples: vec![self.received],
        })
    }

    /// Computes frame `t` (the next one); `end` is the utterance length once known.
    fn compute_frame(&mut self, t: usize, end: Option<usize>) {
        debug_assert_eq!(t, self.frames);
        let cfg = self.extractor.config();
        let (start, half) = (t * cfg.hop_length, cfg.n_fft / 2);
        let n_mels = cfg.feature_size;
        // Before the end is known no index reaches it, so `usize::MAX` reflects only at the start.
        let len = end.unwrap_or(usize::MAX / 2);
        let (samples, base) = (&self.samples, self.base);
        self.raw.resize((t + 1) * n_mels, 0.0);
        let row = &mut self.raw[t * n_mels..(t + 1) * n_mels];
        let mut max = self.max;
        self.extractor.log_mel_frame(
            |k| samples[reflect_centered(start + k, half, len) - base] as f64,
            &mut self.bufs,
            |m, v| {
                row[m] = v;
                max = max.max(v);
            },
        );
        self.max = max;
        self.frames = t + 1;
    }

    /// Drops samples no later frame can read: the next frame starts at `frames·hop - n_fft/2`, and the
    /// end reflection reads back at most `n_fft/2` samples from the end, which is after that.
    fn trim(&mut self) {
        let cfg = self.extractor.config();
        // Keep the first `half + 1` samples until frame 0 exists (start reflection).
        if self.frames == 0 {
            return;
        }
        let keep_from = (self.frames * cfg.hop_length).saturating_sub(cfg.n_fft / 2);
        if keep_from > self.base + 4 * cfg.n_fft {
            self.samples.drain(..keep_from - self.base);
            self.base = keep_from;
        }
    }
}

/// A chunk's stem, with the maximum its mel was clamped with.
struct ChunkStem {
    tokens: Tensor,
    clamp_max: f64,
}

/// What the streaming encoder did, for the latency budget.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StreamingStats {
    /// Full chunks stemmed while audio was still arriving.
    pub stems_during_speech: usize,
    /// Stems re-run during speech because the running maximum grew and changed the chunk's mel.
    pub restems_during_speech: usize,
    /// Stems re-run at the end because the final maximum changed the chunk's mel.
    pub restems_at_finish: usize,
    /// Chunks (full or the last partial one) first stemmed at the end.
    pub stems_at_finish: usize,
    /// Mel frames computed at the end (they depend on the end reflection).
    pub frames_at_finish: usize,
}

/// Everything [`StreamingAudioEncoder::finish_with_stems`] produced.
#[derive(Debug, Clone)]
pub struct StreamedEncode {
    pub tokens: AudioTokens,
    pub mel: MelBatch,
    pub stats: StreamingStats,
    /// The stem of each chunk (`2·n_window` frames, the last one possibly shorter), in order.
    pub stems: Vec<Tensor>,
    /// The chunk length the stems were padded to (as the offline call pads: its longest chunk).
    pub padded_frames: usize,
}

/// The AuT encoder fed as audio arrives: feeds a [`StreamingMel`] and stems each full chunk of
/// `2·n_window` frames as soon as its frames are final. [`finish`](Self::finish) returns what
/// `AudioEncoder::forward` gives on `extract_one`'s features of the whole utterance.
///
/// ```ignore
/// let mut enc = StreamingAudioEncoder::new(&front.encoder, front.mel.config())?;
/// while let Some(block) = mic.next() { enc.push(&block)?; }   // any block size, 16 kHz mono f32
/// let (tokens, mel) = enc.finish()?;                         // end of speech
/// ```
pub struct StreamingAudioEncoder<'a> {
    encoder: &'a AudioEncoder,
    mel: StreamingMel,
    stems: Vec<ChunkStem>,
    stats: StreamingStats,
}

impl<'a> StreamingAudioEncoder<'a> {
    pub fn new(encoder: &'a AudioEncoder, mel: &MelConfig) -> Result<Self> {
        let bins = encoder.config().num_mel_bins;
        if mel.feature_size != bins {
            bail!("streaming audio encoder: the feature extractor has {} mel bins, the encoder {bins}", mel.feature_size);
        }
        Ok(Self {
            encoder,
            mel: StreamingMel::new(mel)?,
            stems: Vec::new(),
            stats: StreamingStats::default(),
        })
    }

    fn chunk_frames(&self) -> usize {
        2 * self.encoder.config().n_window
    }

    pub fn mel(&self) -> &StreamingMel {
        &self.mel
    }

    pub fn stats(&self) -> &StreamingStats {
        &self.stats
    }

    /// Adds samples; stems every chunk they complete, and re-stems earlier chunks whose mel a grown
    /// running maximum changed (so the end has little left to redo). Returns the chunks stemmed so far.
    pub fn push(&mut self, samples: &[f32]) -> Result<usize> {
        self.mel.push(samples).context("streaming audio encoder")?;
        let max = self.mel.running_max();
        self.refresh_stems(max, false)?;
        let chunk = self.chunk_frames();
        let full = self.mel.frames() / chunk;
        let new: Vec<usize> = (self.stems.len()..full).collect();
        let tokens = self.stem_chunks(&new, max, chunk)?;
        self.stats.stems_during_speech += tokens.len();
        self.stems
            .extend(tokens.into_iter().map(|tokens| ChunkStem {
                tokens,
                clamp_max: max,
            }));
        Ok(self.stems.len())
    }

    /// Ends the utterance: the tail frames, the remaining stems (re-stemming chunks the final maximum
    /// changed), then the windowed attention and output layers. Returns the tokens and the features.
    pub fn finish(self) -> Result<(AudioTokens, MelBatch, StreamingStats)> {
        let out = self.finish_with_stems()?;
        Ok((out.tokens, out.mel, out.stats))
    }

    /// [`finish`](Self::finish), also returning the stem of every chunk (the live loop's tests compare
    /// them with the offline stems of the same segment).
    pub fn finish_with_stems(mut self) -> Result<StreamedEncode> {
        let before = self.mel.frames();
        let mel = self.mel.finish().context("streaming audio encoder")?;
        self.stats.frames_at_finish = mel.n_frames - before;
        let max = self.mel.running_max();
        self.refresh_stems(max, true)?;
        let lens = chunk_lengths(mel.n_frames, self.encoder.config().n_window);
        // The offline call pads every chunk to its longest one: 2·n_window, or the only chunk's length.
        let padded = lens.iter().copied().max().unwrap_or(0);
        let rest: Vec<usize> = (self.stems.len()..lens.len()).collect();
        let tokens = self.stem_chunks(&rest, max, padded)?;
        self.stats.stems_at_finish += tokens.len();
        self.stems
            .extend(tokens.into_iter().map(|tokens| ChunkStem {
                tokens,
                clamp_max: max,
            }));
        let stems: Vec<Tensor> = self.stems.iter().map(|s| s.tokens.clone()).collect();
        let per_clip = [output_tokens(mel.n_frames, self.encoder.config().n_window)];
        let tokens = self.encoder.encode_stems(&stems, &per_clip, padded)?;
        Ok(StreamedEncode {
            tokens,
            mel,
            stats: self.stats,
            stems,
            padded_frames: padded,
        })
    }

    /// Re-stems the stored chunks whose clamped mel differs at `max` from the one they were stemmed with.
    fn refresh_stems(&mut self, max: f64, at_finish: bool) -> Result<()> {
        let chunk = self.chunk_frames();
        let mut stale = Vec::new();
        for (c, stem) in self.stems.iter_mut().enumerate() {
            if stem.clamp_max == max {
                continue;
            }
            let frames = c * chunk..(c + 1) * chunk;
            if self.mel.features(frames.clone(), stem.clamp_max)?
                == self.mel.features(frames, max)?
            {
                stem.clamp_max = max; // every value is above both floors: the stem is still exact
            } else {
                stale.push(c);
            }
        }
        let fresh = self.stem_chunks(&stale, max, chunk)?;
        for (&c, tokens) in stale.iter().zip(fresh) {
            self.stems[c] = ChunkStem {
                tokens,
                clamp_max: max,
            };
        }
        if at_finish {
            self.stats.restems_at_finish += stale.len();
        } else {
            self.stats.restems_during_speech += stale.len();
        }
        Ok(())
    }

    /// Stems chunks (by index) clamped with `max`, padded to `padded` frames, in one batch.
    fn stem_chunks(&self, chunks: &[usize], max: f64, padded: usize) -> Result<Vec<Tensor>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let chunk = self.chunk_frames();
        let total = self.mel.frames();
        let mels: Vec<(Vec<f32>, usize)> = chunks
            .iter()
            .map(|&c| {
                let frames = c * chunk..((c + 1) * chunk).min(total);
                let len = frames.len();
                Ok((self.mel.features(frames, max)?, len))
            })
            .collect::<Result<_>>()?;
        let views: Vec<ClipFeatures<'_>> = mels
            .iter()
            .map(|(mel, frames)| ClipFeatures {
                mel,
                frames: *frames,
            })
            .collect();
        self.encoder.stem(&views, padded)
    }
}

/// The Thinker input for `messages` whose single audio item was encoded by a [`StreamingAudioEncoder`]:
/// the same steps as [`OmniModel::prepare`] after its encoder call (placeholder expansion, audio tokens
/// scattered into the pads, sequential positions), so a live turn gets the same prompt as `omni run --audio`.
pub fn prepare_with_audio_tokens(
    model: &crate::pipeline::OmniModel,
    messages: &[crate::chat::ChatMessage],
    audio: AudioTokens,
) -> Result<crate::pipeline::PreparedPrompt> {
    let front = model.audio.as_ref().with_context(|| {
        format!(
            "{} has no audio encoder (thinker.audio_tower)",
            model.dir.display()
        )
    })?;
    let (_, ids) = model.render_prompt(messages)?;
    let ids = crate::audio_encoder::expand_audio_pads(&ids, front.audio_pad, &audio.per_clip)?;
    let embeds = crate::audio_encoder::scatter_audio(
        &model.thinker.embed(&ids)?,
        &ids,
        front.audio_pad,
        &audio,
    )?;
    let positions = crate::thinker::rope::text_positions(0, ids.len());
    Ok(crate::pipeline::PreparedPrompt {
        ids,
        embeds,
        positions,
        audio: Some(audio),
    })
}

/// `omni bench audio-encoder --streaming`: what is left at the end of speech when the stems ran during it.
#[derive(Debug, serde::Serialize)]
pub struct StreamingEncoderBench {
    pub audio_seconds: f64,
    pub threads: usize,
    /// Offline: mel + full encode after the end of speech.
    pub offline_mel_ms: f64,
    pub offline_encoder_ms: f64,
    pub offline_total_ms: f64,
    /// Streaming, during speech: all `push` calls of 10 ms blocks together, and the slowest one.
    pub streaming_push_total_ms: f64,
    pub streaming_push_max_ms: f64,
    /// Streaming, after the end of speech: `finish` (tail frames, last stems, attention, output layers).
    pub streaming_finish_ms: f64,
    pub stats: StreamingStats,
    /// Streamed vs offline encoder output, `max|a-b| / max|b|`.
    pub max_relative_error: f32,
    pub tokens: usize,
}

/// Times offline vs streaming encode on the random real-shape audio tower of `omni bench audio-encoder`.
pub fn bench_streaming_audio_encoder(
    cache: &std::path::Path,
    seconds: f64,
) -> Result<StreamingEncoderBench> {
    use crate::bench::{audio_tower_tensors, real_config, write_random_safetensors};
    use std::time::Instant;
    let cfg = real_config()?;
    let acfg = cfg
        .thinker_config
        .audio_config
        .context("real config has an audio encoder")?;
    let dir = cache.join("real-audio-tower");
    eprintln!(
        "bench: random real-shape audio tower in {} (written once)",
        dir.display()
    );
    write_random_safetensors(&dir, &audio_tower_tensors(&acfg), 7)?;
    let store = crate::weights::WeightStore::open(&dir)?;
    let encoder = AudioEncoder::new(&acfg, &store.root().pp("thinker.audio_tower"))?;
    let mel_cfg = MelConfig::qwen3_omni();
    let extractor = LogMelExtractor::new(&mel_cfg)?;
    // Same synthetic signal as `bench_audio_encoder`.
    let n = (seconds * 16000.0) as usize;
    let samples: Vec<f32> = (0..n)
        .map(|i| 0.3 * (i as f32 * 0.05).sin() * ((i / 800) % 3) as f32)
        .collect();
    // Warm-up (thread pool, allocator) on one second, so neither side pays it.
    let warm = extractor.extract_one(&samples[..16000.min(n)])?;
    encoder.forward(&[ClipFeatures {
        mel: &warm.clip_valid(0),
        frames: warm.valid_frames[0],
    }])?;
    // 1. Streaming: 10 ms blocks as a microphone delivers them, then the end of speech.
    let mut stream = StreamingAudioEncoder::new(&encoder, &mel_cfg)?;
    let (mut push_total, mut push_max) = (0f64, 0f64);
    for block in samples.chunks(160) {
        let t = Instant::now();
        stream.push(block)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        push_total += ms;
        push_max = push_max.max(ms);
    }
    let t = Instant::now();
    let (streamed, _, stats) = stream.finish()?;
    let finish_ms = t.elapsed().as_secs_f64() * 1e3;
    // 2. Offline: everything after the end of speech.
    let t = Instant::now();
    let batch = extractor.extract_one(&samples)?;
    let mel_ms = t.elapsed().as_secs_f64() * 1e3;
    let valid = batch.clip_valid(0);
    let t = Instant::now();
    let offline = encoder.forward(&[ClipFeatures {
        mel: &valid,
        frames: batch.valid_frames[0],
    }])?;
    let encoder_ms = t.elapsed().as_secs_f64() * 1e3;
    let a = streamed.embeddings.flatten_all()?.to_vec1::<f32>()?;
    let b = offline.embeddings.flatten_all()?.to_vec1::<f32>()?;
    let scale = b
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    Ok(StreamingEncoderBench {
        audio_seconds: seconds,
        threads: candle_core::utils::get_num_threads(),
        offline_mel_ms: mel_ms,
        offline_encoder_ms: encoder_ms,
        offline_total_ms: mel_ms + encoder_ms,
        streaming_push_total_ms: push_total,
        streaming_push_max_ms: push_max,
        streaming_finish_ms: finish_ms,
        stats,
        max_relative_error: if a.len() == b.len() {
            diff / scale
        } else {
            f32::INFINITY
        },
        tokens: offline.per_clip[0],
    })
}
