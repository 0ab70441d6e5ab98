//! `omni bench latency`: end of the user's speech → first answer audio, on the real critical path,
//! at the real shapes on random Q8_0 weights.
//!
//! The stages run one after another on the same thread pool, through the same code the product
//! runs, and each is timed:
//!
//! 1. the audio encoder's work left at end of speech: the utterance is pushed into
//!    [`StreamingAudioEncoder`] in 10 ms blocks (mel frames and conv stems of full chunks run during
//!    speech, not counted), then `finish` is timed (tail frames, last stems, windowed attention and
//!    output layers);
//! 2. the Thinker prefill of a voice prompt: `<|im_start|>system …<|im_end|>` (a system prompt of
//!    `system_tokens` tokens), the user turn with the S seconds of audio tokens scattered in, and
//!    `<|im_start|>assistant\n`, in chunks as `generation::prefill` runs it, capturing
//!    `accept_hidden_layer` for the Talker;
//! 3. the first answer token (`lm_head` + argmax);
//! 4. the Talker input ([`TalkerInput::build`]) and the Talker prefill;
//! 5. frames until Code2Wav's first chunk: per frame the code predictor, then one Thinker decode step
//!    (the next token's text row) and one Talker step, as a streaming answer interleaves them;
//! 6. the first Code2Wav chunk.
//!
//! No streaming conversation API (`stream.rs`) existed when this was written: the stages are composed
//! here, sequentially. On a machine without room for the whole Thinker, `--layers N` loads N of its 48
//! layers and the Thinker stages are extrapolated (layer time × 48/N + non-layer time).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::machine::{
    generated, ms_since, random_store, real_config_json, MachineFacts, Table, REAL_THINKER_LAYERS,
};
use super::random_weights::GeneratedArena;
use super::thinker::{text_ids, timed_decode_step, timed_prefill, SplitMs};
use crate::audio::stream::StreamingAudioEncoder;
use crate::audio::MelConfig;
use crate::audio_encoder::{expand_audio_pads, scatter_audio, AudioEncoder};
use crate::code2wav::streaming::{ChunkContext, StreamingOptions};
use crate::code2wav::Code2Wav;
use crate::config::OmniConfig;
use crate::talker::input::{AcceptedState, SpecialIds, ThinkerStates};
use crate::talker::{FrameStep, Talker, TalkerInput, TalkerParams, TalkerStream};
use crate::thinker::{argmax, ThinkerText};

#[derive(Debug, Clone)]
pub struct LatencyBenchOptions {
    pub speech_seconds: f64,
    pub system_tokens: usize,
    pub layers: usize,
    pub chunk_frames: usize,
    pub first_chunk_frames: usize,
    /// Code2Wav frames re-decoded before each chunk; `None`: layer state carried (the product's).
    pub left_context: Option<usize>,
    pub seed: u64,
    /// Prefill the system prompt and the user turn's opening before the end of speech, as
    /// `Conversation::prime` does in the product (false: everything after the end of speech).
    pub prime: bool,
}

impl Default for LatencyBenchOptions {
    fn default() -> Self {
        // The chunking `ConversationOptions::new` streams answers with.
        let s = crate::conversation::ANSWER_CHUNKING;
        Self {
            speech_seconds: 5.0,
            system_tokens: 40,
            layers: REAL_THINKER_LAYERS,
            chunk_frames: s.chunk_frames,
            first_chunk_frames: s.first_chunk_frames,
            left_context: s.left_context(),
            seed: 1,
            prime: true,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stage {
    pub name: String,
    /// As run here (on the loaded Thinker layers).
    pub measured_ms: f64,
    /// With all 48 Thinker layers (= measured unless extrapolated).
    pub full_model_ms: f64,
    pub note: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyBench {
    pub bench: &'static str,
    pub machine: MachineFacts,
    pub weights: Vec<GeneratedArena>,
    pub load_s: f64,
    pub speech_seconds: f64,
    pub audio_tokens: usize,
    pub prompt_tokens: usize,
    pub talker_prefill_rows: usize,
    pub frames_to_first_chunk: usize,
    pub first_chunk_audio_ms: f64,
    pub layers_loaded: usize,
    pub extrapolated: bool,
    pub stages: Vec<Stage>,
    /// End of speech → first answer audio chunk, as run here.
    pub measured_total_ms: f64,
    /// The same with the 48-layer Thinker (extrapolated when `extrapolated`).
    pub total_ms: f64,
    pub notes: Vec<String>,
}

struct Models {
    encoder: AudioEncoder,
    thinker: ThinkerText,
    talker: Talker,
    code2wav: Code2Wav,
}

pub fn bench_latency(opts: &LatencyBenchOptions) -> Result<LatencyBench> {
    if !(opts.speech_seconds > 0.0 && opts.speech_seconds <= 300.0) {
        bail!(
            "--speech-seconds must be in (0, 300], got {}",
            opts.speech_seconds
        );
    }
    if opts.system_tokens > 4096 {
        bail!(
            "--system-tokens must be at most 4096, got {}",
            opts.system_tokens
        );
    }
    let json = real_config_json(Some(opts.layers))?;
    let cfg = OmniConfig::from_json_str(&json.to_string()).context("the bundled real config")?;
    let (acfg, tcfg, ccfg) = super::machine::speech_stage_configs(&cfg)?;
    let store = random_store(&json, opts.seed)?;
    let root = store.root();
    let t = Instant::now();
    let m = Models {
        encoder: AudioEncoder::new(&acfg, &root.pp("thinker.audio_tower"))
            .context("loading the random audio tower")?,
        thinker: ThinkerText::new(&cfg.thinker_config.text_config, &root.pp("thinker"))
            .context("loading the random Thinker")?,
        talker: Talker::new(&tcfg, &root.pp("talker")).context("loading the random Talker")?,
        code2wav: Code2Wav::new(&ccfg, &root.pp("code2wav"))
            .context("loading the random Code2Wav")?,
    };
    let load_s = t.elapsed().as_secs_f64();
    let ids = SpecialIds::from_config(&cfg)?;
    let tc = &cfg.thinker_config;
    let audio_pad = tc
        .audio_token_id
        .context("config: thinker_config.audio_token_id")?;
    let audio_start = tc
        .audio_start_token_id
        .context("config: audio_start_token_id")?;
    let audio_end = tc
        .audio_end_token_id
        .context("config: audio_end_token_id")?;
    let im_end = cfg.im_end_token_id.context("config: im_end_token_id")?;
    let system = cfg.system_token_id.context("config: system_token_id")?;
    let newline = 198u32; // "\n" in Qwen's byte-level BPE.
    let speaker = tcfg
        .speaker_id
        .as_ref()
        .and_then(|s| s.get("ethan").copied())
        .unwrap_or(2302);

    // Warm the thread pools (a throwaway one-token Thinker pass).
    {
        let mut cache = m.thinker.new_cache();
        timed_decode_step(&m.thinker, 1000, &mut cache)?;
    }
    let _ = crate::profile::take(); // OMNI_PROFILE: count the measured run only
    crate::profile::perf_control("enable");
    let mut stages: Vec<Stage> = Vec::new();
    let layers = opts.layers;
    let plain = |name: &str, ms: f64, note: String| Stage {
        name: name.into(),
        measured_ms: ms,
        full_model_ms: ms,
        note,
    };
    let split = |name: &str, s: SplitMs, note: String| Stage {
        name: name.into(),
        measured_ms: s.measured_ms(),
        full_model_ms: s.full_model_ms,
        note,
    };

    // 1. The streaming audio encoder: pushed during speech (not counted), finished at its end.
    let n = (opts.speech_seconds * 16000.0) as usize;
    let samples: Vec<f32> = (0..n)
        .map(|i| 0.3 * (i as f32 * 0.05).sin() * ((i / 800) % 3) as f32)
        .collect();
    let mut enc = StreamingAudioEncoder::new(&m.encoder, &MelConfig::qwen3_omni())?;
    let (mut push_total, mut push_max) = (0.0f64, 0.0f64);
    for block in samples.chunks(160) {
        let t = Instant::now();
        enc.push(block)?;
        let dt = ms_since(t);
        push_total += dt;
        push_max = push_max.max(dt);
    }
    let wall = Instant::now();
    let t = Instant::now();
    let (audio, _, stats) = enc.finish()?;
    let audio_tokens = audio.per_clip[0];
    stages.push(plain(
        "audio encoder finish (streaming)",
        ms_since(t),
        format!(
            "{:.1} s of speech → {audio_tokens} tokens; during speech: {} stems, pushes {push_total:.0} ms in all, slowest {push_max:.1} ms; at end: {} stems, {} re-stems",
            opts.speech_seconds, stats.stems_during_speech, stats.stems_at_finish, stats.restems_at_finish
        ),
    ));

    // 2. The voice prompt and its prefill, capturing the Talker's accepted layer.
    let mut prompt = vec![ids.im_start, system, newline];
    prompt.extend(text_ids(opts.system_tokens, opts.seed));
    prompt.extend([
        im_end,
        newline,
        ids.im_start,
        ids.user,
        newline,
        audio_start,
        audio_pad,
        audio_end,
        im_end,
        newline,
    ]);
    prompt.extend([ids.im_start, ids.assistant, newline]);
    let prompt = expand_audio_pads(&prompt, audio_pad, &audio.per_clip)?;
    let p = prompt.len();
    let accept = AcceptedState::new(tcfg.accept_hidden_layer, layers);
    let (capture_layer, capture_note) = match accept {
        Ok(AcceptedState::LayerOutput(l)) => {
            (l, format!("captures layer {l} output for the Talker"))
        }
        _ => (
            layers - 1,
            format!(
                "only {layers} layers loaded: captures layer {} in place of 23",
                layers - 1
            ),
        ),
    };
    // What `Conversation::prime` prefills before the user speaks: up to `<|im_start|>user\n`.
    let primed = if opts.prime { opts.system_tokens + 8 } else { 0 };
    let mut cache = m.thinker.new_cache();
    let mut captured_parts = Vec::new();
    if primed > 0 {
        let head = m.thinker.embed(&prompt[..primed])?;
        let (_, c, _) = timed_prefill(&m.thinker, &head, 0, &mut cache, &[capture_layer])?;
        captured_parts.extend(c);
    }
    let t = Instant::now();
    let rest = &prompt[primed..];
    let embeds_rest = scatter_audio(&m.thinker.embed(rest)?, rest, audio_pad, &audio)?;
    let embed_ms = ms_since(t);
    let (hidden, c, layer_ms) =
        timed_prefill(&m.thinker, &embeds_rest, primed as i64, &mut cache, &[capture_layer])?;
    captured_parts.extend(c);
    let captured = vec![Tensor::cat(&captured_parts, 1)?];
    let embeds = scatter_audio(&m.thinker.embed(&prompt)?, &prompt, audio_pad, &audio)?;
    stages.push(split(
        "thinker prefill",
        SplitMs::new(layer_ms, embed_ms, layers),
        format!(
            "{} tokens after the end of speech ({audio_tokens} audio; {}); {capture_note}",
            p - primed,
            if primed > 0 {
                format!("the {primed} before them — {} system prompt, user opening — primed while nobody spoke", opts.system_tokens)
            } else {
                format!("{} system tokens included: --no-prime", opts.system_tokens)
            }
        ),
    ));

    // 3. First answer token.
    let t = Instant::now();
    let first = argmax(&m.thinker.last_logits(&hidden)?) as u32;
    stages.push(plain(
        "first token (lm_head + argmax)",
        ms_since(t),
        String::new(),
    ));

    // 4. Talker input and prefill.
    let t = Instant::now();
    let first_embed = m.thinker.embed(&[first])?;
    let all_embeds = Tensor::cat(&[&embeds, &first_embed], 1)?.squeeze(0)?;
    let h = all_embeds.dim(1)?;
    let zero = Tensor::zeros((1, 1, h), DType::F32, &Device::Cpu)?;
    let all_hidden = Tensor::cat(&[&captured[0], &zero], 1)?.squeeze(0)?;
    let tts_embeds = m
        .thinker
        .embed(&[ids.tts_bos, ids.tts_eos, ids.tts_pad])?
        .squeeze(0)?;
    let mut sequence = prompt.clone();
    sequence.push(first);
    let states = ThinkerStates {
        sequence: &sequence,
        prompt_len: p,
        embeds: &all_embeds,
        hidden: &all_hidden,
        tts_embeds: &tts_embeds,
        eos_ids: &[im_end],
    };
    let input = TalkerInput::build(&m.talker, &ids, &states, speaker)?;
    let rows = input.prefill.dim(1)?;
    stages.push(plain(
        "talker input (projections)",
        ms_since(t),
        format!("{rows} prefill rows"),
    ));
    let mut params = TalkerParams::reference(opts.seed);
    params.max_frames = opts.first_chunk_frames + 2;
    let t = Instant::now();
    let mut stream = TalkerStream::new(&m.talker, &input.prefill, &params)?;
    stages.push(plain("talker prefill", ms_since(t), format!("{rows} rows")));

    // 5./6. Frames until Code2Wav's first chunk; each frame also needs the Thinker's next token.
    let mut c2w = m.code2wav.streaming(StreamingOptions {
        chunk_frames: opts.chunk_frames,
        first_chunk_frames: opts.first_chunk_frames,
        context: opts.left_context.map_or(ChunkContext::Carried, ChunkContext::Redecoded),
    })?;
    let (mut cp_ms, mut talker_ms) = (0.0, 0.0);
    let c2w_ms;
    let (mut dec_layers, mut dec_other, mut decodes) = (0.0, 0.0, 0usize);
    let mut frames = 0;
    let mut next_id = first;
    let mut restarts = 0;
    let first_audio_ms;
    loop {
        let t = Instant::now();
        let frame = match stream.next_frame()? {
            FrameStep::Frame(f) => f,
            FrameStep::Finished(_) => {
                restarts += 1;
                if restarts > 5 {
                    bail!("the random Talker kept ending before the first chunk");
                }
                params.talker.seed = params.talker.seed.wrapping_add(7919);
                stream = TalkerStream::new(&m.talker, &input.prefill, &params)?;
                continue;
            }
        };
        cp_ms += ms_since(t);
        frames += 1;
        let t = Instant::now();
        let out = c2w.push(frame)?;
        if !out.is_empty() {
            c2w_ms = ms_since(t);
            first_audio_ms = out.len() as f64 / m.code2wav.sample_rate() as f64 * 1e3;
            break;
        }
        // The next text row: the Thinker's next token, projected.
        let (id, l, o) = timed_decode_step(&m.thinker, next_id, &mut cache)?;
        dec_layers += l;
        dec_other += o;
        decodes += 1;
        next_id = id;
        let t = Instant::now();
        let row = m.talker.text_projection.forward(&m.thinker.embed(&[id])?)?;
        stream.feed(&row)?;
        talker_ms += ms_since(t);
    }
    let measured_wall_ms = ms_since(wall);
    crate::profile::perf_control("disable");
    stages.push(plain(
        "code predictor",
        cp_ms,
        format!("{frames} frames × 15 steps"),
    ));
    stages.push(split(
        "thinker decode (text rows)",
        SplitMs::new(dec_layers, dec_other, layers),
        format!("{decodes} tokens, one per Talker step"),
    ));
    stages.push(plain(
        "talker steps",
        talker_ms,
        format!("{decodes} steps (text projection + MoE decode)"),
    ));
    stages.push(plain(
        "code2wav first chunk",
        c2w_ms,
        format!("{frames} frames → {first_audio_ms:.0} ms of audio"),
    ));

    let measured_total_ms: f64 = stages.iter().map(|s| s.measured_ms).sum();
    let total_ms: f64 = stages.iter().map(|s| s.full_model_ms).sum();
    let extrapolated = layers != REAL_THINKER_LAYERS;
    let mut notes = vec![
        "random Q8_0 weights at the real shapes (speed does not depend on the values)".to_string(),
        "stages composed sequentially here (`--conversation` runs the same turn through the streaming Conversation API); Thinker decode and Talker share one thread pool".to_string(),
        "audio encoder: audio::stream::StreamingAudioEncoder; only `finish` (after end of speech) is on the critical path".to_string(),
        format!("wall clock end of speech → first chunk, as run: {measured_wall_ms:.1} ms (stage sum {measured_total_ms:.1} ms)"),
    ];
    if extrapolated {
        notes.push(format!(
            "EXTRAPOLATED: only {layers} of 48 Thinker layers loaded; Thinker stages = measured layer time × 48/{layers} + non-layer time"
        ));
    }
    if restarts > 0 {
        notes.push(format!(
            "the random Talker drew codec eos {restarts} time(s); restarted (included in the time)"
        ));
    }
    Ok(LatencyBench {
        bench: "latency",
        machine: MachineFacts::collect(),
        weights: generated(&store),
        load_s,
        speech_seconds: opts.speech_seconds,
        audio_tokens,
        prompt_tokens: p,
        talker_prefill_rows: rows,
        frames_to_first_chunk: frames,
        first_chunk_audio_ms: first_audio_ms,
        layers_loaded: layers,
        extrapolated,
        stages,
        measured_total_ms,
        total_ms,
        notes,
    })
}

impl LatencyBench {
    pub fn table(&self) -> String {
        let mut t = Table::new(format!(
            "omni bench latency: end of speech → first answer audio, real shapes, random Q8_0, {} of 48 Thinker layers\n{}",
            self.layers_loaded,
            self.machine.describe()
        ));
        for s in &self.stages {
            let v = if self.extrapolated && (s.full_model_ms - s.measured_ms).abs() > 1e-9 {
                format!("{:.1} ms (measured {:.1})", s.full_model_ms, s.measured_ms)
            } else {
                format!("{:.1} ms", s.full_model_ms)
            };
            t.row(&s.name, v, &s.note);
        }
        let tag = if self.extrapolated {
            " (extrapolated to 48 layers)"
        } else {
            ""
        };
        t.row(
            "TOTAL end of speech → first audio",
            format!("{:.1} ms", self.total_ms),
            format!("target < 1000 ms{tag}"),
        );
        if self.extrapolated {
            t.row(
                "total as measured",
                format!("{:.1} ms", self.measured_total_ms),
                format!("{} Thinker layers", self.layers_loaded),
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
