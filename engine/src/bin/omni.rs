//! `omni`: the headless command line over the engine.
//!
//! `omni run` answers one prompt; `omni demo` runs the bundled tiny model. Progress and logs go to
//! stderr; stdout carries only the answer (streamed text, or one JSON object with `--json`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use omni_engine::chat::{user_turn, ChatMessage};
use omni_engine::generation::{Sampler, StopRule};
use omni_engine::gguf::model::GgufModelFiles;
use omni_engine::gguf::quantize::QuantizeProgress;
use omni_engine::pipeline::{LoadProgress, OmniModel};
use omni_engine::tokenizer::TextStreamer;

#[derive(Parser)]
#[command(name = "omni", version, about = "Qwen3-Omni on your own machine: hear, think, answer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt with a checkpoint.
    Run(RunArgs),
    /// Write GGUF files (thinker-, mmproj-, talker-<type>.gguf) from a safetensors checkpoint.
    Quantize(QuantizeArgs),
    /// Quality of GGUF files against their checkpoint: NMSE per stage, Thinker greedy top-1 agreement.
    Eval(EvalArgs),
    /// Write a random checkpoint with the real model's shapes, tensor by tensor (for size checks
    /// and benchmarks).
    #[command(hide = true)]
    RandomCheckpoint(RandomCheckpointArgs),
    /// Time a stage at the real model's shapes on random weights (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
        /// Where random real-shape weights are written once and reused.
        #[arg(long, default_value = "target/omni-bench", global = true)]
        cache: PathBuf,
    },
    /// Talk with the model live: microphone (or a WAV) in, speakers (or a WAV) out, push-to-talk or
    /// hands-free, barge-in, echo cancellation. `omni talk --list-devices` lists the audio devices.
    Talk(Box<omni_engine::realtime::talk::TalkArgs>),
    /// Run the whole pipeline on the bundled tiny model (random weights: the output is gibberish).
    Demo {
        /// Prompt for the demo.
        #[arg(long, default_value = "Hello! How are you today?")]
        prompt: String,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Mel features + AuT encoder (32 layers, d_model 1280) on synthetic audio.
    AudioEncoder {
        /// Seconds of audio to encode.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Streaming encode: stems during speech (10 ms pushes), time left at the end vs offline.
        #[arg(long)]
        streaming: bool,
    },
    /// Talker frames/s, code predictor ms/frame, streaming Code2Wav, real-time factor, time to the
    /// first audio chunk (real shapes, random Q8_0 weights made in memory: no files needed).
    Speech {
        /// Codec frames to make (80 ms of audio each).
        #[arg(long, default_value_t = 100)]
        frames: usize,
        /// Rows of the Talker prefill (the user turn + 9 assistant rows).
        #[arg(long, default_value_t = 80)]
        prefill_rows: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Thinker prefill and decode tokens/s (real shapes, random Q8_0 weights made in memory).
    Thinker {
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 32)]
        gen: usize,
        /// Thinker decoder layers to load (48 = all, ~35 GB at Q8_0); fewer are extrapolated.
        #[arg(long, default_value_t = 48)]
        layers: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// The Q8_0 product kernels alone: GMAC/s at the shapes of the latency path, all threads and one.
    Matmul {
        /// Timed calls per shape (median).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// End of user speech → first answer audio, stage by stage (real shapes, random Q8_0 weights).
    Latency {
        /// Seconds of user speech.
        #[arg(long, default_value_t = 5.0)]
        speech_seconds: f64,
        /// Tokens of the system prompt.
        #[arg(long, default_value_t = 40)]
        system_tokens: usize,
        /// Thinker decoder layers to load (48 = all, ~35 GB at Q8_0); fewer are extrapolated.
        #[arg(long, default_value_t = 48)]
        layers: usize,
        /// Run the turn through the streaming conversation API (Thinker and Talker threads) instead
        /// of the stage-by-stage composition.
        #[arg(long)]
        conversation: bool,
        /// Prefill the system prompt and the user turn's opening after the end of speech too, as if
        /// nothing were primed while the user spoke (the product primes them: `Conversation::prime`).
        #[arg(long)]
        no_prime: bool,
        #[command(flatten)]
        common: BenchCommon,
    },
}

/// Options every in-memory bench takes.
#[derive(Args, Clone)]
struct BenchCommon {
    /// Threads for candle (sets RAYON_NUM_THREADS and CANDLE_NUM_THREADS); default: physical cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Seed of the random weights and sampling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Frames per streaming Code2Wav chunk (default: the product's).
    #[arg(long)]
    chunk_frames: Option<usize>,
    /// Frames of the first Code2Wav chunk in `bench latency` (default: the product's, 1).
    #[arg(long)]
    first_chunk_frames: Option<usize>,
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (config.json, tokenizer.json, *.safetensors, or GGUF files from
    /// `omni quantize`), or a hub id such as Qwen/Qwen3-Omni-30B-A3B-Instruct (downloaded when the
    /// network allows).
    #[arg(long, required_unless_present = "thinker")]
    model: Option<PathBuf>,
    /// A Thinker GGUF file (ours or llama.cpp's qwen3vlmoe), instead of the one in --model.
    #[arg(long, value_name = "FILE")]
    thinker: Option<PathBuf>,
    /// A vision + audio GGUF file (mmproj), instead of the one in --model.
    #[arg(long, value_name = "FILE")]
    mmproj: Option<PathBuf>,
    /// A Talker + Code2Wav GGUF file, instead of the one in --model.
    #[arg(long, value_name = "FILE")]
    talker: Option<PathBuf>,
    /// The user's text.
    #[arg(long)]
    prompt: String,
    /// An audio file for the user turn (wav, flac, mp3, ogg, m4a; repeatable, in order).
    #[arg(long = "audio", value_name = "FILE")]
    audio: Vec<PathBuf>,
    /// An image file for the user turn (PNG or JPEG; repeatable, in order, after the audio).
    #[arg(long = "image", value_name = "FILE")]
    image: Vec<PathBuf>,
    /// Speak the answer into this WAV file (24 kHz mono 16-bit; written to a temp file, then renamed).
    #[arg(long, value_name = "WAV")]
    speech_out: Option<PathBuf>,
    /// Voice of the spoken answer (from the checkpoint's talker_config.speaker_id; default ethan).
    #[arg(long)]
    speaker: Option<String>,
    /// Talker sampling temperature; 0 makes the whole speech chain greedy. Default: the reference's 0.9.
    #[arg(long, allow_negative_numbers = true)]
    talker_temperature: Option<f64>,
    /// Most codec frames (the Talker's max new tokens; 12.5 frames per second of speech).
    #[arg(long, default_value_t = 4096)]
    max_speech_frames: usize,
    /// A system message before the user turn.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy (plain argmax, no repetition penalty unless
    /// --repetition-penalty is given). Default: the checkpoint's generation_config.json.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Stream the answer through the conversation API: the Talker starts on the Thinker's first
    /// token and --speech-out grows chunk by chunk (temp file, renamed at the end); --json adds
    /// timings.first_audio_ms.
    #[arg(long)]
    stream: bool,
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
struct BarProgress(Option<ProgressBar>);

impl LoadProgress for BarProgress {
    fn start(&mut self, what: &str, total: usize) {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        self.0 = Some(bar);
    }
    fn advance(&mut self, done: usize) {
        if let Some(b) = &self.0 {
            b.set_position(done as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

fn main() -> ExitCode {
    omni_engine::quant::keep_freed_memory();
    omni_engine::quant::limit_candle_pool_spinning();
    // (Denormals are flushed by the first forward on the pool: starting the pool here would fix its
    // size before `--threads` of the benches is read.)
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OMNI_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Quantize(args) => quantize(&args),
        Command::Eval(args) => eval(&args),
        Command::RandomCheckpoint(args) => random_checkpoint(&args),
        Command::Demo { prompt } => demo(&prompt),
        Command::Talk(args) => omni_engine::realtime::talk::run(&args),
        Command::Bench { what, cache } => bench(&what, &cache),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let model = load_model(args)?;
    report_unused(&model);
    let mut sampling = model.default_sampling();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
        if t == 0.0 {
            // Greedy is the reference's `thinker.generate(do_sample=False)`: plain argmax, no penalty
            // unless one is asked for explicitly.
            sampling = omni_engine::generation::SamplingParams::greedy();
        }
    }
    if args.top_k.is_some() {
        sampling.top_k = args.top_k;
    }
    if args.top_p.is_some() {
        sampling.top_p = args.top_p;
    }
    if let Some(r) = args.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.seed = args.seed;
    sampling.validate()?;

    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::text("system", system));
    }
    let clips = load_audio_files(&args.audio)?;
    let names: Vec<String> = args.audio.iter().map(|p| p.display().to_string()).collect();
    let images = if args.image.is_empty() { Vec::new() } else { model.load_images(&args.image)? };
    let image_names: Vec<String> = args.image.iter().map(|p| p.display().to_string()).collect();
    messages.push(user_turn(&names, &image_names, &[], Some(&args.prompt)));
    let speech = speech_request(&model, args)?;
    if args.stream {
        if !images.is_empty() {
            bail!("--stream with --image is not supported yet");
        }
        return answer_streaming(model, args, clips, sampling, speech);
    }
    answer(&model, &messages, &clips, &images, sampling, args.max_new_tokens, args.json, speech.as_ref())
}

/// `--stream`: one turn of a [`omni_engine::conversation::Conversation`]; text deltas to stdout as
/// they come, audio chunks appended to the WAV as they come. The JSON object is the one of
/// [`answer`] plus `timings.first_audio_ms`.
fn answer_streaming(
    model: OmniModel,
    args: &RunArgs,
    clips: Vec<Vec<f32>>,
    sampling: omni_engine::generation::SamplingParams,
    speech: Option<SpeechRequest>,
) -> Result<()> {
    use omni_engine::conversation::{AnswerEvent, CancelToken, Conversation, ConversationOptions, UserTurn};
    let model = std::sync::Arc::new(model);
    let mut opts = ConversationOptions::new(&model);
    opts.system = args.system.clone();
    opts.sampling = sampling;
    opts.max_new_tokens = args.max_new_tokens;
    let sample_rate = speech.as_ref().map(|req| req.models.code2wav.sample_rate());
    let (models, mut wav) = match speech {
        Some(req) => {
            opts.speaker = Some(req.speaker.clone());
            opts.talker = req.params.clone();
            let wav = omni_engine::speech::WavStream::create(&req.out, req.models.code2wav.sample_rate())?;
            (Some(std::sync::Arc::new(req.models)), Some((wav, req.out)))
        }
        None => (None, None),
    };
    let mut conv = Conversation::new(model.clone(), models, opts)?;
    let turn = UserTurn { audio: clips, text: Some(args.prompt.clone()) };
    let stdout = std::io::stdout();
    let mut write_error = None;
    let summary = conv.answer(turn, CancelToken::new())?.wait(|ev| match ev {
        AnswerEvent::TextDelta { text, .. } if !args.json => {
            let mut lock = stdout.lock();
            let _ = lock.write_all(text.as_bytes()).and_then(|_| lock.flush());
        }
        AnswerEvent::AudioChunk(chunk) => {
            if let Some((w, _)) = wav.as_mut() {
                if let Err(e) = w.append(&chunk.samples) {
                    write_error.get_or_insert(e);
                }
            }
        }
        _ => {}
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    let t = &summary.timings;
    if let Some((w, path)) = wav.take() {
        let samples = w.samples();
        w.finish()?;
        eprintln!(
            "speech: {} frames, {:.2} s of audio, first audio after {:.0} ms, done in {:.0} ms -> {}",
            summary.codes.len(),
            samples as f64 / f64::from(sample_rate.unwrap_or(24000)),
            t.first_audio_ms.unwrap_or(f64::NAN),
            t.total_ms,
            path.display()
        );
    }
    let n = summary.token_ids.len();
    let prompt_ids = conv.cached_ids()[..summary.prompt_tokens].to_vec();
    // The Thinker's time after the prefill (the Talker runs alongside).
    let decode_ms = t.thinker_ms - t.audio_encode_ms - t.prefill_ms;
    let timings = json!({
        "load_ms": model.load_ms,
        "prefill_ms": t.prefill_ms,
        "decode_ms": decode_ms,
        "prefill_tokens_per_s": prompt_ids.len() as f64 / (t.prefill_ms / 1e3).max(1e-9),
        "decode_tokens_per_s": n.saturating_sub(1) as f64 / (decode_ms / 1e3).max(1e-9),
        "first_audio_ms": t.first_audio_ms,
    });
    if args.json {
        let mut obj = json!({
            "prompt_token_ids": prompt_ids,
            "token_ids": summary.token_ids,
            "text": summary.text,
            "finish_reason": summary.finish,
            "timings": timings,
        });
        if let Some(rate) = sample_rate {
            obj["codes"] = json!(summary.codes);
            obj["sample_rate"] = json!(rate);
        }
        println!("{}", serde_json::to_string(&obj)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated ({:?}); prefill {:.1} ms, decode {:.1} tok/s]",
            prompt_ids.len(),
            n,
            summary.finish,
            t.prefill_ms,
            timings["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// What `--speech-out` asks for, checked before anything is generated.
struct SpeechRequest {
    models: omni_engine::speech::SpeechModels,
    out: PathBuf,
    speaker: String,
    params: omni_engine::talker::TalkerParams,
}

fn speech_request(model: &OmniModel, args: &RunArgs) -> Result<Option<SpeechRequest>> {
    let Some(out) = &args.speech_out else {
        if args.speaker.is_some() || args.talker_temperature.is_some() {
            bail!("--speaker and --talker-temperature need --speech-out FILE");
        }
        return Ok(None);
    };
    if args.max_speech_frames == 0 {
        bail!("--max-speech-frames must be at least 1");
    }
    let models = omni_engine::speech::SpeechModels::load(model)?;
    let speaker = match &args.speaker {
        Some(s) => s.clone(),
        None => models.default_speaker().context("the checkpoint lists no speakers")?,
    };
    models.speaker_id(&speaker)?;
    let params = match args.talker_temperature {
        Some(t) if t == 0.0 => omni_engine::talker::TalkerParams::greedy(args.max_speech_frames),
        t => {
            let mut p = omni_engine::talker::TalkerParams::reference(args.seed);
            if let Some(t) = t {
                p.talker.temperature = t;
            }
            p.max_frames = args.max_speech_frames;
            p.talker.validate().context("--talker-temperature")?;
            p
        }
    };
    Ok(Some(SpeechRequest { models, out: out.clone(), speaker, params }))
}

/// Decodes every `--audio` file to 16 kHz mono, refusing silence.
fn load_audio_files(paths: &[PathBuf]) -> Result<Vec<Vec<f32>>> {
    let mut clips = Vec::with_capacity(paths.len());
    for path in paths {
        let decoded = omni_engine::audio::load_audio_16k_mono(path)?;
        if decoded.is_silent() {
            bail!("{}: the audio is silent (peak below -120 dBFS); nothing to hear", path.display());
        }
        eprintln!(
            "audio {}: {:.2} s ({} Hz, {} channel(s))",
            path.display(),
            decoded.duration_secs,
            decoded.source_sample_rate,
            decoded.source_channels
        );
        clips.push(decoded.samples);
    }
    Ok(clips)
}

#[allow(clippy::too_many_arguments)]
fn answer(
    model: &OmniModel,
    messages: &[ChatMessage],
    clips: &[Vec<f32>],
    images: &[omni_engine::vision::ImagePixels],
    sampling: omni_engine::generation::SamplingParams,
    max_new_tokens: usize,
    as_json: bool,
    speech: Option<&SpeechRequest>,
) -> Result<()> {
    let clip_refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    if !clip_refs.is_empty() {
        let seconds: f64 = clip_refs.iter().map(|c| c.len() as f64 / 16000.0).sum();
        eprintln!("encoding {seconds:.1} s of audio ...");
    }
    let encode_start = std::time::Instant::now();
    let multimodal = model.prepare_multimodal(messages, &clip_refs, images)?;
    let prompt = &multimodal.prompt;
    if let Some(vision) = &multimodal.vision {
        eprintln!("images encoded: {} tokens", vision.per_image.iter().sum::<usize>());
    }
    if let Some(audio) = &prompt.audio {
        eprintln!(
            "audio encoded: {} tokens in {:.0} ms",
            audio.per_clip.iter().sum::<usize>(),
            encode_start.elapsed().as_secs_f64() * 1e3
        );
    }
    let prompt_ids = prompt.ids.clone();
    let stop = StopRule { eos_ids: model.eos_ids()?, max_new_tokens };
    let mut sampler = Sampler::new(sampling);
    let mut streamer = TextStreamer::new();
    let stdout = std::io::stdout();
    let out = model.generate(&multimodal, &mut sampler, &stop, |id| {
        if !as_json {
            if let Some(delta) = streamer.push(&model.tokenizer, id)? {
                let mut lock = stdout.lock();
                lock.write_all(delta.as_bytes())?;
                lock.flush()?;
            }
        }
        Ok(true)
    })?;
    let text = model.tokenizer.decode(&out.token_ids, true)?;
    let n = out.token_ids.len();
    let spoken = match speech {
        Some(req) => {
            if !as_json {
                eprintln!("speaking ({}) ...", req.speaker);
            }
            let start = std::time::Instant::now();
            let answer =
                req.models.speak_multimodal(model, &multimodal, &out, &stop.eos_ids, &req.speaker, &req.params, |_| {
                    Ok(true)
                })?;
            omni_engine::speech::write_wav(&req.out, &answer.audio, answer.sample_rate)?;
            eprintln!(
                "speech: {} frames, {:.2} s of audio in {:.0} ms -> {}",
                answer.codes.len(),
                answer.audio.len() as f64 / answer.sample_rate as f64,
                start.elapsed().as_secs_f64() * 1e3,
                req.out.display()
            );
            Some(answer)
        }
        None => None,
    };
    let timings = json!({
        "load_ms": model.load_ms,
        "prefill_ms": out.prefill_ms,
        "decode_ms": out.decode_ms,
        "prefill_tokens_per_s": prompt_ids.len() as f64 / (out.prefill_ms / 1e3).max(1e-9),
        "decode_tokens_per_s": n.saturating_sub(1) as f64 / (out.decode_ms / 1e3).max(1e-9),
    });
    if as_json {
        let mut obj = json!({
            "prompt_token_ids": out.prompt_ids,
            "token_ids": out.token_ids,
            "text": text,
            "finish_reason": out.finish,
            "timings": timings,
        });
        if let Some(sp) = &spoken {
            obj["codes"] = json!(sp.codes);
            obj["sample_rate"] = json!(sp.sample_rate);
        }
        println!("{}", serde_json::to_string(&obj)?);
    } else {
        if let Some(rest) = streamer.finish(&model.tokenizer)? {
            print!("{rest}");
        }
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated ({:?}); prefill {:.1} ms, decode {:.1} tok/s]",
            prompt_ids.len(),
            n,
            out.finish,
            out.prefill_ms,
            timings["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

fn bench(what: &BenchWhat, cache: &Path) -> Result<()> {
    match what {
        BenchWhat::AudioEncoder { seconds, streaming } => {
            if !(*seconds > 0.0 && *seconds <= 3600.0) {
                bail!("--seconds must be in (0, 3600]");
            }
            if *streaming {
                let r = omni_engine::audio::stream::bench_streaming_audio_encoder(cache, *seconds)?;
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let r = omni_engine::bench::bench_audio_encoder(cache, *seconds)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchWhat::Speech { frames, prefill_rows, common } => {
            use omni_engine::bench::speech::{bench_speech, SpeechBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let mut o = SpeechBenchOptions { frames: *frames, prefill_rows: *prefill_rows, seed: common.seed, ..Default::default() };
            o.chunk_frames = common.chunk_frames.unwrap_or(o.chunk_frames);
            let r = bench_speech(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Thinker { prompt_tokens, gen, layers, common } => {
            use omni_engine::bench::thinker::{bench_thinker, ThinkerBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let o = ThinkerBenchOptions { prompt_tokens: *prompt_tokens, gen_tokens: *gen, layers: *layers, seed: common.seed };
            let r = bench_thinker(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Matmul { iters, common } => {
            use omni_engine::bench::matmul::{bench_matmul, default_shapes};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let r = bench_matmul(&default_shapes(), *iters)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Latency { speech_seconds, system_tokens, layers, conversation: true, no_prime, common } => {
            omni_engine::bench::machine::set_threads(common.threads)?;
            let r = omni_engine::bench::conversation::bench_conversation_latency(
                *speech_seconds,
                *system_tokens,
                *layers,
                common.chunk_frames.unwrap_or(8),
                common.seed,
                !*no_prime,
            )?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Latency { speech_seconds, system_tokens, layers, conversation: false, no_prime, common } => {
            use omni_engine::bench::latency::{bench_latency, LatencyBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let mut o = LatencyBenchOptions {
                speech_seconds: *speech_seconds,
                system_tokens: *system_tokens,
                layers: *layers,
                seed: common.seed,
                prime: !*no_prime,
                ..Default::default()
            };
            o.chunk_frames = common.chunk_frames.unwrap_or(o.chunk_frames);
            o.first_chunk_frames = common.first_chunk_frames.unwrap_or(o.first_chunk_frames);
            let r = bench_latency(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
    }
    Ok(())
}

/// A bench result: the table on stdout, or JSON on stdout and the table on stderr.
fn print_bench(json: bool, table: &str, result: &impl serde::Serialize) -> Result<()> {
    if json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(result)?);
    } else {
        print!("{table}");
    }
    if omni_engine::profile::enabled() {
        eprint!("\nwhere the time went (OMNI_PROFILE; nested spans overlap):\n{}", omni_engine::profile::table(&omni_engine::profile::take()));
    }
    Ok(())
}

fn report_unused(model: &OmniModel) {
    let groups = model.weights.unused_summary();
    if !groups.is_empty() {
        let parts: Vec<String> = groups.iter().map(|(k, n)| format!("{k} ({n})")).collect();
        tracing::info!("tensors not used by this request: {}", parts.join(", "));
    }
}

/// The bundled tiny model: `assets/demo-model` beside the executable's workspace or the current dir.
fn demo_model_dir() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("assets/demo-model"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo-model"),
    ];
    for c in &candidates {
        if c.join("config.json").exists() {
            return Ok(c.clone());
        }
    }
    bail!("the bundled demo model was not found (looked in assets/demo-model); run from the repository root")
}

fn demo(prompt: &str) -> Result<()> {
    let dir = demo_model_dir()?;
    eprintln!("omni demo: the tiny bundled model in {} has RANDOM weights,", dir.display());
    eprintln!("so its answer is gibberish; it shows the pipeline working end to end.");
    eprintln!("Stages: chat template -> tokenizer -> [audio: decode, log-mel, AuT encoder] -> Thinker (MoE, M-RoPE, KV cache) -> text.");
    let model = OmniModel::load(&dir, &mut BarProgress(None))?;
    eprintln!("\n1) text prompt: {prompt}");
    let messages = vec![user_turn(&[], &[], &[], Some(prompt))];
    answer(&model, &messages, &[], &[], omni_engine::generation::SamplingParams::greedy(), 32, false, None)?;
    // Beside the model link (lexically: `assets/demo-model` is a symlink into tests/fixtures).
    let sound = dir.parent().unwrap_or(Path::new(".")).join("sounds/speech.wav");
    if sound.exists() {
        eprintln!("\n2) audio prompt: {} + \"What does the speaker say?\"", sound.display());
        let clips = load_audio_files(std::slice::from_ref(&sound))?;
        let messages = vec![user_turn(&[sound.display().to_string()], &[], &[], Some("What does the speaker say?"))];
        answer(&model, &messages, &clips, &[], omni_engine::generation::SamplingParams::greedy(), 32, false, None)?;
    }
    Ok(())
}

/// `--model` (safetensors or GGUF directory, hub id) and/or explicit GGUF files.
fn load_model(args: &RunArgs) -> Result<OmniModel> {
    let dir = args.model.as_deref().map(omni_engine::hub::resolve_model).transpose()?;
    if args.thinker.is_some() || args.mmproj.is_some() || args.talker.is_some() {
        let files = GgufModelFiles::with_overrides(
            dir.as_deref(),
            args.thinker.as_deref(),
            args.mmproj.as_deref(),
            args.talker.as_deref(),
        )?;
        return OmniModel::load_gguf(&files, &mut BarProgress(None));
    }
    let dir = dir.expect("clap requires --model without --thinker");
    OmniModel::load(&dir, &mut BarProgress(None))
}

#[derive(Args)]
struct QuantizeArgs {
    /// Safetensors checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Type of the weight matrices: q8_0, f16, bf16 or f32 (norms, biases, gates stay f32).
    #[arg(long = "type", default_value = "q8_0")]
    ty: String,
    /// Type for the Thinker's matrices (default: --type).
    #[arg(long)]
    thinker_type: Option<String>,
    /// Type for the vision encoder (default: --type).
    #[arg(long)]
    vision_type: Option<String>,
    /// Type for the audio encoder (default: --type).
    #[arg(long)]
    audio_type: Option<String>,
    /// Type for the Talker and code predictor (default: --type).
    #[arg(long)]
    talker_type: Option<String>,
    /// Type for Code2Wav (default: --type).
    #[arg(long)]
    code2wav_type: Option<String>,
    /// Only these files, comma-separated: thinker, mmproj, talker.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// A byte-count progress bar on stderr.
struct BytesProgress(Option<ProgressBar>);

impl QuantizeProgress for BytesProgress {
    fn start(&mut self, file: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(file.to_string());
        self.0 = Some(bar);
    }
    fn advance(&mut self, written: u64) {
        if let Some(b) = &self.0 {
            b.set_position(written);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

fn quantize(args: &QuantizeArgs) -> Result<()> {
    use omni_engine::gguf::quantize::{install_interrupt_handler, parse_type, QuantizeOptions};
    use omni_engine::gguf::{Component, FileKind};
    let mut opts = QuantizeOptions::new(&args.model, &args.out, parse_type(&args.ty)?);
    for (c, t) in [
        (Component::Thinker, &args.thinker_type),
        (Component::Vision, &args.vision_type),
        (Component::Audio, &args.audio_type),
        (Component::Talker, &args.talker_type),
        (Component::Code2Wav, &args.code2wav_type),
    ] {
        if let Some(t) = t {
            opts.component_types.insert(c, parse_type(t)?);
        }
    }
    for f in &args.only {
        opts.files.push(match f.as_str() {
            "thinker" => FileKind::Thinker,
            "mmproj" => FileKind::Mmproj,
            "talker" => FileKind::Talker,
            other => bail!("--only: unknown file {other:?} (thinker, mmproj, talker)"),
        });
    }
    install_interrupt_handler();
    let written = omni_engine::gguf::quantize::quantize(&opts, &mut BytesProgress(None))?;
    for w in &written {
        let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        eprintln!(
            "{}: {:.1} MB, {} tensors ({})",
            w.path.display(),
            w.bytes as f64 / 1e6,
            w.tensors,
            types.join(", ")
        );
    }
    Ok(())
}

#[derive(Args)]
struct EvalArgs {
    /// The safetensors checkpoint the GGUF files were made from (the f32 reference).
    #[arg(long)]
    model: PathBuf,
    /// Directory of GGUF files.
    #[arg(long)]
    gguf: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    thinker: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    mmproj: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    talker: Option<PathBuf>,
    /// Tokens of greedy continuation per prompt (golden cases use their own).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

fn eval(args: &EvalArgs) -> Result<()> {
    let files = GgufModelFiles::with_overrides(
        args.gguf.as_deref(),
        args.thinker.as_deref(),
        args.mmproj.as_deref(),
        args.talker.as_deref(),
    )?;
    let report = omni_engine::gguf::eval::evaluate(&args.model, &files, args.max_new_tokens)?;
    for s in &report.stages {
        eprintln!("{:<14} NMSE {:.3e}  ({})", s.stage, s.nmse, s.what);
    }
    let t = &report.thinker;
    eprintln!(
        "thinker top-1 agreement {:.2}% ({}/{} positions), greedy identical in {}/{} prompts",
        100.0 * t.top1_agreement,
        t.agreeing,
        t.positions,
        t.greedy_identical_cases,
        t.cases.len()
    );
    for w in &report.weights {
        eprintln!("weights {:<9} NMSE {:.3e} over {} tensors", w.component, w.nmse, w.tensors);
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(Args)]
struct RandomCheckpointArgs {
    /// Output directory (config.json, tokenizer files, sharded bf16 safetensors).
    #[arg(long)]
    out: PathBuf,
    /// config.json to take the shapes from (default: the real Qwen3-Omni-30B-A3B-Instruct).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep only this many Thinker decoder layers (the real model has 48).
    #[arg(long)]
    thinker_layers: Option<usize>,
    /// Keep only this many Talker decoder layers.
    #[arg(long)]
    talker_layers: Option<usize>,
    /// Only these components, comma-separated (thinker, vision, audio, talker, code2wav).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn random_checkpoint(args: &RandomCheckpointArgs) -> Result<()> {
    use omni_engine::gguf::random::{write_random_checkpoint, RandomCheckpointOptions};
    let opts = RandomCheckpointOptions {
        config: args.config.clone(),
        thinker_layers: args.thinker_layers,
        talker_layers: args.talker_layers,
        only: args.only.clone(),
        seed: args.seed,
    };
    let summary = write_random_checkpoint(&args.out, &opts, &mut BytesProgress(None))?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
