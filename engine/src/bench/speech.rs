//! `omni bench speech`: the speech chain at the real shapes on random Q8_0 weights.
//!
//! Talker (20 MoE layers, hidden 1024) + code predictor (5 dense layers) + streaming Code2Wav, driven
//! frame by frame as a spoken answer runs: [`TalkerStream::new`] (the prefill), then per frame
//! [`TalkerStream::next_frame`] (codebook 0 sampling + the code predictor's 15 steps) and
//! [`TalkerStream::feed`] (one Talker decode step), each frame pushed into
//! [`crate::code2wav::StreamingCode2Wav`] with the chunking the conversation API streams with (8 frames, 25 of left context). The Talker prefill
//! and text rows are random vectors of the Talker's width (their values do not change the cost).
//! With random weights the Talker can draw codec eos early; the stream is then restarted (the
//! prefill is not counted in the per-frame numbers) and the restart is reported.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::machine::{generated, ms_since, random_store, real_config_json, MachineFacts, Table};
use super::random_weights::GeneratedArena;
use crate::code2wav::streaming::StreamingOptions;
use crate::code2wav::Code2Wav;
use crate::config::OmniConfig;
use crate::talker::{FrameStep, Talker, TalkerParams, TalkerStream};

#[derive(Debug, Clone)]
pub struct SpeechBenchOptions {
    /// Codec frames to make (80 ms of audio each).
    pub frames: usize,
    /// Rows of the Talker prefill (user turn + 9 assistant rows).
    pub prefill_rows: usize,
    pub chunk_frames: usize,
    /// Code2Wav frames re-decoded before each chunk; `None`: layer state carried (the product's).
    pub left_context: Option<usize>,
    pub seed: u64,
}

impl Default for SpeechBenchOptions {
    fn default() -> Self {
        // The chunking `ConversationOptions::new` streams answers with.
        // (its later chunks: this bench streams every chunk at that size, first one included)
        let s = crate::conversation::ANSWER_CHUNKING;
        Self {
            frames: 100,
            prefill_rows: 80,
            chunk_frames: s.chunk_frames,
            left_context: s.left_context(),
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeechBench {
    pub bench: &'static str,
    pub machine: MachineFacts,
    pub weights: Vec<GeneratedArena>,
    pub load_s: f64,
    pub frames: usize,
    pub audio_seconds: f64,
    pub prefill_rows: usize,
    pub chunk_frames: usize,
    /// `None`: Code2Wav's layer state carried between chunks.
    pub left_context: Option<usize>,
    pub talker_prefill_ms: f64,
    /// One Talker decode step (`feed`).
    pub talker_ms_per_frame: f64,
    /// Codebook-0 sampling + the code predictor's 15 steps (`next_frame`).
    pub code_predictor_ms_per_frame: f64,
    /// Talker + code predictor.
    pub frames_per_s: f64,
    pub code2wav_ms_total: f64,
    pub code2wav_ms_per_audio_second: f64,
    pub code2wav_first_chunk_ms: f64,
    /// (Talker + code predictor + Code2Wav) time / audio time.
    pub real_time_factor: f64,
    /// Talker prefill → first audio chunk out of Code2Wav (wall clock).
    pub first_chunk_ms: f64,
    pub first_chunk_audio_ms: f64,
    pub restarts_after_eos: usize,
    pub notes: Vec<String>,
}

/// A random tensor `[1, t, h]` with std ≈ 0.5 (the scale of projected Thinker states).
pub(crate) fn random_rows(t: usize, h: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 0.5, (1, t, h), device)?.to_dtype(DType::F32)?)
}

pub fn bench_speech(opts: &SpeechBenchOptions) -> Result<SpeechBench> {
    if opts.frames < 1 || opts.frames > 4000 {
        bail!("--frames must be in 1..=4000, got {}", opts.frames);
    }
    if opts.prefill_rows < 1 || opts.prefill_rows > 8192 {
        bail!(
            "--prefill-rows must be in 1..=8192, got {}",
            opts.prefill_rows
        );
    }
    let json = real_config_json(None)?;
    let cfg = OmniConfig::from_json_str(&json.to_string()).context("the bundled real config")?;
    let tcfg = cfg
        .talker_config
        .clone()
        .context("real config has a talker")?;
    let ccfg = cfg
        .code2wav_config
        .clone()
        .context("real config has code2wav")?;
    let store = random_store(&json, opts.seed)?;
    // 1. Load (this makes the random Q8_0 blocks of each component).
    let t = Instant::now();
    let talker =
        Talker::new(&tcfg, &store.root().pp("talker")).context("loading the random Talker")?;
    let code2wav = Code2Wav::new(&ccfg, &store.root().pp("code2wav"))
        .context("loading the random Code2Wav")?;
    let load_s = t.elapsed().as_secs_f64();
    let device = Device::Cpu;
    let h = tcfg.text_config.hidden_size;
    let prefill = random_rows(opts.prefill_rows, h, &device)?;
    let text_row = random_rows(1, h, &device)?;
    let sopts = match opts.left_context {
        Some(n) => StreamingOptions::uniform(opts.chunk_frames, n),
        None => StreamingOptions::carried(opts.chunk_frames),
    };
    let mut c2w = code2wav.streaming(sopts)?;
    let spf = code2wav.samples_per_frame();
    let rate = code2wav.sample_rate() as f64;
    // Warm the thread pools on a throwaway 1-row prefill so the first timing is not a pool start.
    drop(TalkerStream::new(
        &talker,
        &random_rows(1, h, &device)?,
        &TalkerParams::reference(0),
    )?);

    // 2. Prefill, then frames.
    let params = |k: usize| {
        let mut p = TalkerParams::reference(opts.seed.wrapping_add(k as u64 * 7919));
        p.max_frames = opts.frames + 2;
        p
    };
    crate::profile::perf_control("enable");
    let start = Instant::now();
    let mut stream = TalkerStream::new(&talker, &prefill, &params(0))?;
    let talker_prefill_ms = ms_since(start);
    let (mut cp_ms, mut talker_ms, mut c2w_ms) = (0.0, 0.0, 0.0);
    let (mut first_chunk_ms, mut first_chunk_audio_ms, mut code2wav_first_chunk_ms) =
        (None, 0.0, 0.0);
    let mut restarts = 0;
    let mut made = 0;
    while made < opts.frames {
        let t = Instant::now();
        let step = stream.next_frame()?;
        let frame = match step {
            FrameStep::Frame(f) => f,
            FrameStep::Finished(_) => {
                restarts += 1;
                if restarts > 20 {
                    bail!("the random Talker kept ending its speech; gave up after 20 restarts");
                }
                stream = TalkerStream::new(&talker, &prefill, &params(restarts))?;
                continue;
            }
        };
        cp_ms += ms_since(t);
        made += 1;
        let t = Instant::now();
        let audio = c2w.push(frame)?;
        let dt = ms_since(t);
        c2w_ms += dt;
        if !audio.is_empty() && first_chunk_ms.is_none() {
            first_chunk_ms = Some(ms_since(start));
            first_chunk_audio_ms = audio.len() as f64 / rate * 1e3;
            code2wav_first_chunk_ms = dt;
        }
        if made < opts.frames {
            let t = Instant::now();
            stream.feed(&text_row)?;
            talker_ms += ms_since(t);
        }
    }
    let t = Instant::now();
    let tail = c2w.finish()?;
    c2w_ms += ms_since(t);
    crate::profile::perf_control("disable");
    let _ = tail;
    let audio_seconds = (opts.frames * spf) as f64 / rate;
    let feeds = (opts.frames - 1).max(1) as f64;
    let talker_per = talker_ms / feeds;
    let cp_per = cp_ms / opts.frames as f64;
    let mut notes = vec![
        "random Q8_0 weights at the real shapes (speed does not depend on the values)".to_string(),
        "per-frame work runs sequentially on one thread pool (Talker step, code predictor, Code2Wav chunk)".to_string(),
    ];
    if first_chunk_ms.is_none() {
        notes.push(format!(
            "fewer frames ({}) than one Code2Wav chunk ({}): no chunk before finish",
            opts.frames, opts.chunk_frames
        ));
    }
    Ok(SpeechBench {
        bench: "speech",
        machine: MachineFacts::collect(),
        weights: generated(&store),
        load_s,
        frames: opts.frames,
        audio_seconds,
        prefill_rows: opts.prefill_rows,
        chunk_frames: opts.chunk_frames,
        left_context: opts.left_context,
        talker_prefill_ms,
        talker_ms_per_frame: talker_per,
        code_predictor_ms_per_frame: cp_per,
        frames_per_s: 1e3 / (talker_per + cp_per),
        code2wav_ms_total: c2w_ms,
        code2wav_ms_per_audio_second: c2w_ms / audio_seconds,
        code2wav_first_chunk_ms,
        real_time_factor: (talker_ms + cp_ms + c2w_ms) / 1e3 / audio_seconds,
        first_chunk_ms: first_chunk_ms.unwrap_or(f64::NAN),
        first_chunk_audio_ms,
        restarts_after_eos: restarts,
        notes,
    })
}

impl SpeechBench {
    pub fn table(&self) -> String {
        let mut t = Table::new(format!(
            "omni bench speech: Talker + code predictor + streaming Code2Wav, real shapes, random Q8_0\n{}",
            self.machine.describe()
        ));
        t.row(
            "frames made",
            format!("{}", self.frames),
            format!("{:.2} s of audio", self.audio_seconds),
        );
        t.row(
            "load (incl. random weights)",
            format!("{:.1} s", self.load_s),
            "",
        );
        t.row(
            "talker prefill",
            format!("{:.1} ms", self.talker_prefill_ms),
            format!("{} rows", self.prefill_rows),
        );
        t.row(
            "talker step",
            format!("{:.1} ms/frame", self.talker_ms_per_frame),
            "one MoE decode step",
        );
        t.row(
            "code predictor",
            format!("{:.1} ms/frame", self.code_predictor_ms_per_frame),
            "15 steps + sampling",
        );
        t.row(
            "talker frames/s",
            format!("{:.2}", self.frames_per_s),
            "talker + code predictor; real time needs 12.5",
        );
        t.row(
            "code2wav",
            format!("{:.1} ms/s audio", self.code2wav_ms_per_audio_second),
            match self.left_context {
                Some(n) => format!("chunks of {} frames, {n} frames re-decoded before each", self.chunk_frames),
                None => format!("chunks of {} frames, layer state carried", self.chunk_frames),
            },
        );
        t.row(
            "code2wav first chunk",
            format!("{:.1} ms", self.code2wav_first_chunk_ms),
            "",
        );
        t.row(
            "real-time factor",
            format!("{:.3}", self.real_time_factor),
            "< 1 is faster than real time",
        );
        t.row(
            "first audio chunk",
            format!("{:.1} ms", self.first_chunk_ms),
            format!(
                "from talker prefill start; chunk = {:.0} ms of audio",
                self.first_chunk_audio_ms
            ),
        );
        if self.restarts_after_eos > 0 {
            t.row(
                "restarts after eos",
                format!("{}", self.restarts_after_eos),
                "random weights drew codec eos",
            );
        }
        super::machine::with_footer(t.render(), &self.weights, &self.notes)
    }
}
