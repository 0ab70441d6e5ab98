//! `omni run` and `omni demo`: their arguments, loading the model, and answering one prompt (text on
//! stdout, speech into a WAV), offline or through the streaming conversation API.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde_json::json;

use omni_engine::chat::{user_turn, ChatMessage};
use omni_engine::generation::{Sampler, StopRule};
use omni_engine::pipeline::{LoadProgress, OmniModel};
use omni_engine::tokenizer::TextStreamer;

#[derive(Args)]
pub(super) struct RunArgs {
    /// Checkpoint directory (config.json, tokenizer.json, *.safetensors, or GGUF files from
    /// `omni quantize`), or a hub id such as Qwen/Qwen3-Omni-30B-A3B-Instruct (downloaded when the
    /// network allows).
    #[arg(long, required_unless_present = "thinker")]
    model: Option<PathBuf>,
    #[command(flatten)]
    files: super::gguf::GgufFileArgs,
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
        self.0 = Some(super::progress_bar(total as u64, "{msg} [{bar:30}] {pos}/{len} layers {elapsed}", what));
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

pub(super) fn run(args: &RunArgs) -> Result<()> {
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

pub(super) fn demo(prompt: &str) -> Result<()> {
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
    if args.files.any() {
        return OmniModel::load_gguf(&args.files.resolve(dir.as_deref())?, &mut BarProgress(None));
    }
    let dir = dir.expect("clap requires --model without --thinker");
    OmniModel::load(&dir, &mut BarProgress(None))
}
