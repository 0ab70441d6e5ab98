//! `omni bench latency --conversation`: the first answer audio of a spoken turn through the product's
//! streaming API ([`crate::conversation::Conversation`]: Thinker and Talker on their own threads,
//! Code2Wav chunks as events), on random Q8_0 weights at the real shapes.
//!
//! The model is assembled in memory: the random store's Thinker, audio tower, Talker and Code2Wav,
//! the fixtures' chat template (compiled in) and a byte-level tokenizer whose special tokens sit at the
//! real ids (written to a private temporary directory, as `TextTokenizer` reads a file). The system
//! prompt is `system_tokens` ASCII letters (one token each with a byte-level vocabulary).
//!
//! `Conversation::answer` encodes the turn's audio offline; the product's live loop encodes it while
//! the user speaks. So the end-of-speech figure is `first_audio_ms − audio_encode_ms + streaming
//! encoder finish` (the last measured by [`super::latency`] on the same store), reported beside the raw
//! timings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use super::machine::{
    generated, ms_since, random_store, real_config_json, MachineFacts, Table, REAL_THINKER_LAYERS,
};
use super::random_weights::GeneratedArena;
use crate::audio::stream::StreamingAudioEncoder;
use crate::audio::{LogMelExtractor, MelConfig};
use crate::audio_encoder::AudioEncoder;
use crate::chat::ChatTemplate;
use crate::code2wav::Code2Wav;
use crate::config::OmniConfig;
use crate::conversation::{AnswerEvent, Conversation, ConversationOptions, EncodedUserTurn};
use crate::pipeline::{AudioFrontEnd, OmniModel};
use crate::speech::SpeechModels;
use crate::stream::CancelToken;
use crate::talker::input::SpecialIds;
use crate::talker::Talker;
use crate::thinker::ThinkerText;
use crate::tokenizer::TextTokenizer;

const CHAT_TEMPLATE: &str = include_str!("../../../tests/golden/chat_template.jinja");

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConversationLatency {
    pub bench: &'static str,
    pub machine: MachineFacts,
    pub weights: Vec<GeneratedArena>,
    pub layers_loaded: usize,
    pub load_s: f64,
    pub speech_seconds: f64,
    pub chunk_frames: usize,
    pub first_chunk_frames: usize,
    /// Code2Wav frames re-decoded before each chunk; `None`: layer state carried (the product's).
    pub left_context: Option<usize>,
    /// Tokens `Conversation::prime` prefilled before the end of speech, and the whole prompt's.
    pub primed_tokens: usize,
    pub prompt_tokens: usize,
    /// From `Conversation::answer_encoded` (the turn's timings).
    pub audio_encode_ms: f64,
    pub prefill_ms: f64,
    pub first_token_ms: Option<f64>,
    pub first_audio_ms: Option<f64>,
    /// Streaming encoder `finish` on the same utterance (what is left at end of speech).
    pub streaming_encoder_finish_ms: f64,
    /// `first_audio_ms − audio_encode_ms + streaming_encoder_finish_ms`.
    pub end_of_speech_to_first_audio_ms: Option<f64>,
    /// With `--answer-seconds`: how the answer's audio kept up with playback.
    pub playback: Option<Playback>,
    pub notes: Vec<String>,
}

/// A player that starts with the first chunk, plays at the output rate and pauses whenever it runs
/// dry, fed the answer's chunks as they arrived.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Playback {
    /// Audio the answer produced (the bench stops it after `--answer-seconds`).
    pub audio_s: f64,
    /// First chunk → the last counted chunk, wall clock.
    pub produced_in_s: f64,
    /// Times the player ran dry, and for how long in all: also the delay before playback that
    /// would have played the whole answer without a gap.
    pub stalls: usize,
    pub stalled_ms: f64,
}

impl Playback {
    /// `chunks`: (arrival ms, samples) in arrival order.
    pub fn simulate(chunks: &[(f64, usize)], sample_rate: f64) -> Option<Self> {
        let (&(start, _), &(end, _)) = (chunks.first()?, chunks.last()?);
        let (mut queued_s, mut stalled_ms, mut stalls) = (0.0, 0.0f64, 0);
        for &(at, samples) in chunks {
            // The player reaches this chunk's first sample at start + queued + stalled.
            let late = at - start - queued_s * 1e3 - stalled_ms;
            if late > 0.0 {
                stalls += 1;
                stalled_ms += late;
            }
            queued_s += samples as f64 / sample_rate;
        }
        Some(Self { audio_s: queued_s, produced_in_s: (end - start) / 1e3, stalls, stalled_ms })
    }
}

/// A byte-level BPE tokenizer (no merges) with Qwen's special tokens and role words at their real ids.
fn tokenizer_json(cfg: &Json) -> Json {
    // GPT-2's bytes_to_unicode.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut vocab = serde_json::Map::new();
    for (i, c) in cs.iter().enumerate() {
        vocab.insert(char::from_u32(*c).unwrap_or('?').to_string(), json!(i));
    }
    let tok = |id: u64, content: &str, special: bool| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special});
    let mut added = Vec::new();
    let top = |k: &str| cfg.get(k).and_then(Json::as_u64);
    let thinker = |k: &str| {
        cfg.pointer(&format!("/thinker_config/{k}"))
            .and_then(Json::as_u64)
    };
    for (id, content, special) in [
        (top("im_start_token_id"), "<|im_start|>", true),
        (top("im_end_token_id"), "<|im_end|>", true),
        (thinker("audio_start_token_id"), "<|audio_start|>", true),
        (thinker("audio_end_token_id"), "<|audio_end|>", true),
        (thinker("audio_token_id"), "<|audio_pad|>", true),
        (top("system_token_id"), "system", false),
        (top("user_token_id"), "user", false),
        (top("assistant_token_id"), "assistant", false),
    ] {
        if let Some(id) = id {
            // In the model's vocabulary too: `tokenizers` renumbers added tokens that are not.
            vocab.insert(content.to_string(), json!(id));
            added.push(tok(id, content, special));
        }
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": crate::gguf::tokenizer::QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tokenizer(cfg: &Json) -> Result<TextTokenizer> {
    let dir = std::env::temp_dir().join(format!("omni-bench-tokenizer-{}", std::process::id()));
    let scratch = Scratch(dir.clone());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join("tokenizer.json.tmp");
    std::fs::write(&tmp, serde_json::to_string(&tokenizer_json(cfg))?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("tokenizer.json"))?;
    let tok = TextTokenizer::from_model_dir(&dir);
    drop(scratch);
    tok
}

pub fn bench_conversation_latency(
    speech_seconds: f64,
    system_tokens: usize,
    layers: usize,
    chunk_frames: usize,
    seed: u64,
    prime: bool,
    answer_seconds: f64,
    left_context: Option<usize>,
) -> Result<ConversationLatency> {
    if !(0.0..=120.0).contains(&answer_seconds) {
        bail!("--answer-seconds must be in [0, 120], got {answer_seconds}");
    }
    if !(speech_seconds > 0.0 && speech_seconds <= 300.0) {
        bail!("--speech-seconds must be in (0, 300], got {speech_seconds}");
    }
    let mut json = real_config_json(Some(layers))?;
    // With fewer layers than the Talker's accepted one (24), the Talker takes the last layer's state.
    if let Some(accept) = json.pointer_mut("/talker_config/accept_hidden_layer") {
        if accept.as_u64().is_some_and(|a| a as usize > layers) {
            *accept = Json::from(layers);
        }
    }
    let cfg = OmniConfig::from_json_str(&json.to_string()).context("the bundled real config")?;
    let (acfg, tcfg, ccfg) = super::machine::speech_stage_configs(&cfg)?;
    let store = random_store(&json, seed)?;
    let root = store.root();
    let t = Instant::now();
    let thinker = ThinkerText::new(&cfg.thinker_config.text_config, &root.pp("thinker"))
        .context("loading the random Thinker")?;
    let encoder = AudioEncoder::new(&acfg, &root.pp("thinker.audio_tower"))
        .context("loading the random audio tower")?;
    let talker = Talker::new(&tcfg, &root.pp("talker")).context("loading the random Talker")?;
    let code2wav =
        Code2Wav::new(&ccfg, &root.pp("code2wav")).context("loading the random Code2Wav")?;
    let audio_pad = cfg
        .thinker_config
        .audio_token_id
        .context("config: audio_token_id")?;
    let model = Arc::new(OmniModel {
        dir: PathBuf::from("<random weights>"),
        config: cfg.clone(),
        tokenizer: tokenizer(&json)?,
        template: ChatTemplate::from_source(CHAT_TEMPLATE, PathBuf::from("<bench chat template>"))?,
        thinker,
        generation: None,
        weights: store.clone(),
        audio: Some(AudioFrontEnd {
            mel: LogMelExtractor::new(&MelConfig::qwen3_omni())?,
            encoder,
            audio_pad,
        }),
        vision: None,
        load_ms: 0.0,
    });
    let speech = Arc::new(SpeechModels {
        talker,
        code2wav,
        ids: SpecialIds::from_config(&cfg)?,
    });
    let load_s = t.elapsed().as_secs_f64();

    // The utterance, and what a streaming encoder leaves at its end.
    let n = (speech_seconds * 16000.0) as usize;
    let samples: Vec<f32> = (0..n)
        .map(|i| 0.3 * (i as f32 * 0.05).sin() * ((i / 800) % 3) as f32)
        .collect();
    let front = model.audio.as_ref().context("audio front end")?;
    let mut enc = StreamingAudioEncoder::new(&front.encoder, &MelConfig::qwen3_omni())?;
    for block in samples.chunks(160) {
        enc.push(block)?;
    }
    let t = Instant::now();
    let (audio_tokens, _, _) = enc.finish()?;
    let streaming_encoder_finish_ms = ms_since(t);

    // The turn through the conversation API; stop at the first audio chunk.
    let mut opts = ConversationOptions::new(&model);
    opts.system = Some(
        "abcdefghijklmnopqrstuvwxyz".repeat(system_tokens / 26 + 1)[..system_tokens].to_string(),
    );
    opts.chunking.chunk_frames = chunk_frames;
    if let Some(n) = left_context {
        opts.chunking.context = crate::code2wav::ChunkContext::Redecoded(n);
    }
    opts.max_new_tokens = 64;
    let first_chunk_frames = opts.chunking.first_chunk_frames;
    let mut conv = Conversation::new(model.clone(), Some(speech), opts)?;
    // As the live loop does before anyone speaks (not timed: the user has not finished yet).
    let primed_tokens = if prime { conv.prime()? } else { 0 };
    let cancel = CancelToken::new();
    let mut first_audio_seen = None;
    let (mut chunks, mut answer_samples) = (Vec::new(), 0usize);
    let sample_rate = conv_sample_rate(&ccfg);
    let t = Instant::now();
    let stream = conv.answer_encoded(EncodedUserTurn::audio(audio_tokens), cancel.clone())?;
    drop(samples);
    let summary = stream.wait(|ev| {
        if let AnswerEvent::AudioChunk(chunk) = ev {
            first_audio_seen.get_or_insert(ms_since(t));
            chunks.push((ms_since(t), chunk.samples.len()));
            answer_samples += chunk.samples.len();
            // Stop at the first chunk, or once the answer has spoken `answer_seconds`.
            if answer_samples as f64 >= answer_seconds * sample_rate {
                cancel.cancel();
            }
        }
    })?;
    let playback = if answer_seconds > 0.0 { Playback::simulate(&chunks, sample_rate) } else { None };
    let tm = &summary.timings;
    let first_audio_ms = tm.first_audio_ms.or(first_audio_seen);
    let extrapolated = layers != REAL_THINKER_LAYERS;
    let mut notes = vec![
        "random Q8_0 weights at the real shapes; model assembled in memory, byte-level tokenizer with the real special ids".to_string(),
        "the product path: the streaming encoder's tokens through Conversation::answer_encoded; end of speech → first audio = streaming encoder finish + first_audio_ms of the call".to_string(),
    ];
    if extrapolated {
        notes.push(format!("only {layers} of 48 Thinker layers loaded: NOT extrapolated (threads overlap), a lower bound"));
    }
    Ok(ConversationLatency {
        bench: "latency-conversation",
        machine: MachineFacts::collect(),
        weights: generated(&store),
        layers_loaded: layers,
        load_s,
        speech_seconds,
        chunk_frames,
        first_chunk_frames,
        left_context,
        primed_tokens,
        prompt_tokens: summary.prompt_tokens,
        audio_encode_ms: tm.audio_encode_ms,
        prefill_ms: tm.prefill_ms,
        first_token_ms: tm.first_token_ms,
        first_audio_ms,
        streaming_encoder_finish_ms,
        end_of_speech_to_first_audio_ms: first_audio_ms.map(|f| f + streaming_encoder_finish_ms),
        playback,
        notes,
    })
}

/// Code2Wav's output rate: samples per frame × 12.5 frames/s.
fn conv_sample_rate(c: &crate::config::Code2WavConfig) -> f64 {
    c.upsampling_ratios.iter().chain(&c.upsample_rates).product::<usize>() as f64 * crate::code2wav::CODEC_FRAME_RATE_HZ
}

#[cfg(test)]
mod tests {
    use super::Playback;

    #[test]
    fn playback_counts_the_gaps_a_player_would_hear() {
        // 1 s chunks arriving every 0.5 s: never dry.
        let p = Playback::simulate(&[(100.0, 10), (600.0, 10), (1100.0, 10)], 10.0).unwrap();
        assert_eq!((p.stalls, p.stalled_ms, p.audio_s, p.produced_in_s), (0, 0.0, 3.0, 1.0));
        // 0.5 s chunks every 1 s: dry for 0.5 s before each later chunk.
        let p = Playback::simulate(&[(0.0, 5), (1000.0, 5), (2000.0, 5)], 10.0).unwrap();
        assert_eq!((p.stalls, p.stalled_ms), (2, 1000.0));
        // A late chunk after a long one: the stall only counts what the queue did not cover.
        let p = Playback::simulate(&[(0.0, 20), (2500.0, 5)], 10.0).unwrap();
        assert_eq!((p.stalls, p.stalled_ms), (1, 500.0));
        assert_eq!(Playback::simulate(&[], 10.0), None);
    }
}

impl ConversationLatency {
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
        let mut t = Table::new(format!(
            "omni bench latency --conversation: spoken turn through Conversation::answer, real shapes, random Q8_0, {} of 48 Thinker layers\n{}",
            self.layers_loaded,
            self.machine.describe()
        ));
        t.row(
            "primed before the end of speech",
            format!("{} tokens", self.primed_tokens),
            "Conversation::prime: system prompt and the user turn's opening",
        );
        t.row(
            "prefill",
            format!("{:.1} ms", self.prefill_ms),
            format!("{} tokens, {:.1} s of speech", self.prompt_tokens - self.primed_tokens, self.speech_seconds),
        );
        t.row(
            "first token",
            opt(self.first_token_ms),
            "from the answer call",
        );
        t.row(
            "first audio chunk",
            opt(self.first_audio_ms),
            format!(
                "from the answer call; first chunk {} frames, then {}{}",
                self.first_chunk_frames,
                self.chunk_frames,
                self.left_context.map_or(String::new(), |n| format!(", {n} frames re-decoded before each"))
            ),
        );
        t.row(
            "streaming encoder finish",
            format!("{:.1} ms", self.streaming_encoder_finish_ms),
            "left at end of speech",
        );
        t.row(
            "END OF SPEECH → FIRST AUDIO",
            opt(self.end_of_speech_to_first_audio_ms),
            "target < 1000 ms",
        );
        if let Some(p) = &self.playback {
            t.row(
                "answer audio",
                format!("{:.2} s", p.audio_s),
                format!("made in {:.2} s from the first chunk (the Thinker still writing for 64 tokens)", p.produced_in_s),
            );
            t.row(
                "playback stalls",
                format!("{} / {:.0} ms", p.stalls, p.stalled_ms),
                "a player from the first chunk; the total is the start delay a gapless answer needs",
            );
        }
        t.row(
            "load (incl. random weights)",
            format!("{:.1} s", self.load_s),
            "",
        );
        super::machine::with_footer(t.render(), &self.weights, &self.notes)
    }
}
