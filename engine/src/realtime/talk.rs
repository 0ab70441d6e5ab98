//! `omni talk`: the live voice loop without a UI — devices or WAV files, push-to-talk or hands-free,
//! events on stdout (`--json`: one JSON object per line, the last one the summary).
//!
//! Push-to-talk from a terminal (device input): type `start` / `stop` (or just Enter to toggle) and
//! `quit` on stdin. With `--input-wav --ptt` the whole file is one user turn.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::aec::EchoMode;
use super::answer::Backend;
use super::capture::TurnMode;
use super::events::TalkEvent;
use super::turns::{Control, InputChoice, OutputChoice, TalkConfig, TalkLoop};
use super::vad::VadSettings;
use crate::conversation::ConversationOptions;
use crate::generation::SamplingParams;
use crate::talker::TalkerParams;

#[derive(Args, Debug, Clone)]
pub struct TalkArgs {
    /// Checkpoint directory.
    #[arg(long, required_unless_present = "list_devices")]
    pub model: Option<PathBuf>,
    /// Microphone: a device id (`pulseaudio:mic`), its name, or a unique part of either. Default: the
    /// host's default input.
    #[arg(long, value_name = "NAME", conflicts_with = "input_wav")]
    pub input_device: Option<String>,
    /// Read the user's voice from this audio file (fed at real-time pace unless --fast).
    #[arg(long, value_name = "FILE")]
    pub input_wav: Option<PathBuf>,
    /// Speakers (as --input-device). Default: the host's default output.
    #[arg(long, value_name = "NAME", conflicts_with = "output_wav")]
    pub output_device: Option<String>,
    /// Write what the speakers would play to this WAV (24 kHz mono 16-bit).
    #[arg(long, value_name = "WAV")]
    pub output_wav: Option<PathBuf>,
    /// Push-to-talk (stdin `start`/`stop`; with --input-wav the whole file is one turn).
    #[arg(long, conflicts_with = "vad")]
    pub ptt: bool,
    /// Hands-free: the VAD starts and ends turns (default).
    #[arg(long)]
    pub vad: bool,
    /// A system message before the first user turn.
    #[arg(long)]
    pub system: Option<String>,
    /// Voice of the answers (default ethan).
    #[arg(long)]
    pub speaker: Option<String>,
    /// Thinker temperature; 0 is greedy. Default: the checkpoint's generation_config.json.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Talker temperature; 0 makes the speech chain greedy. Default: the reference's 0.9.
    #[arg(long, allow_negative_numbers = true)]
    pub talker_temperature: Option<f64>,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 4096)]
    pub max_speech_frames: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With --input-wav and --output-wav: no real-time pacing (turn by turn, deterministic).
    #[arg(long)]
    pub fast: bool,
    /// One JSON event per line on stdout; the last line is the summary.
    #[arg(long)]
    pub json: bool,
    /// Echo handling: aec3 (sonora's WebRTC AEC3), gate, off. Default: aec3 with a device on both
    /// ends, off otherwise.
    #[arg(long)]
    pub echo: Option<String>,
    /// VAD aggressiveness 0..=3.
    #[arg(long, default_value_t = 3)]
    pub vad_aggressiveness: u8,
    /// VAD frame: 10, 20 or 30 ms.
    #[arg(long, default_value_t = 30)]
    pub vad_frame_ms: usize,
    /// Voiced time a segment needs to become a turn.
    #[arg(long, default_value_t = 250)]
    pub min_speech_ms: usize,
    /// Silence that ends a turn.
    #[arg(long, default_value_t = 600)]
    pub hangover_ms: usize,
    /// Frames below this level never count as speech.
    #[arg(long, default_value_t = -45.0, allow_negative_numbers = true)]
    pub energy_floor_dbfs: f32,
    /// Device buffer length in ms (a fixed size within the device's range).
    #[arg(long, default_value_t = 20)]
    pub buffer_ms: u32,
    /// Stop once this many turns have been answered.
    #[arg(long)]
    pub max_turns: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// History kept in the model's context (tokens); past it the conversation starts afresh.
    #[arg(long, default_value_t = 8192)]
    pub max_context_tokens: usize,
    /// Answer back end: conversation (streaming, KV reuse) or offline (the `omni run` path).
    #[arg(long, default_value = "conversation", hide = true)]
    pub engine: String,
    /// Test aid: write each turn's samples, streamed mel, chunk stems and encoder output to
    /// DIR/turn-N.safetensors (conversation back end).
    #[arg(long, value_name = "DIR", hide = true)]
    pub dump_turns: Option<PathBuf>,
    /// List audio devices and exit.
    #[arg(long)]
    pub list_devices: bool,
}

fn options_builder(
    args: &TalkArgs,
) -> impl FnOnce(&crate::pipeline::OmniModel) -> Result<ConversationOptions> + Send + 'static {
    let a = args.clone();
    move |model| {
        let mut opts = ConversationOptions::new(model);
        let mut sampling = model.default_sampling();
        if let Some(t) = a.temperature {
            sampling.temperature = t;
            if t == 0.0 {
                sampling = SamplingParams::greedy();
            }
        }
        sampling.seed = a.seed;
        sampling.validate()?;
        opts.sampling = sampling;
        opts.talker = match a.talker_temperature {
            Some(t) if t == 0.0 => TalkerParams::greedy(a.max_speech_frames),
            t => {
                let mut p = TalkerParams::reference(a.seed);
                if let Some(t) = t {
                    p.talker.temperature = t;
                }
                p.max_frames = a.max_speech_frames;
                p
            }
        };
        opts.max_new_tokens = a.max_new_tokens;
        opts.system = a.system.clone();
        opts.speaker = a.speaker.clone();
        Ok(opts)
    }
}

/// Checks the arguments and builds the loop's configuration.
pub fn config_from_args(args: &TalkArgs) -> Result<TalkConfig> {
    let Some(model) = &args.model else {
        bail!("--model is required")
    };
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if args.max_speech_frames == 0 {
        bail!("--max-speech-frames must be at least 1");
    }
    if !(5..=500).contains(&args.buffer_ms) {
        bail!("--buffer-ms must be in 5..=500");
    }
    let input = match &args.input_wav {
        Some(p) => InputChoice::Wav(p.clone()),
        None => InputChoice::Device(args.input_device.clone()),
    };
    let output = match &args.output_wav {
        Some(p) => OutputChoice::Wav(p.clone()),
        None => OutputChoice::Device(args.output_device.clone()),
    };
    let both_devices = matches!(input, InputChoice::Device(_)) && matches!(output, OutputChoice::Device(_));
    let echo = match &args.echo {
        Some(e) => EchoMode::parse(e)?,
        None if both_devices => EchoMode::Aec3,
        None => EchoMode::Off,
    };
    let vad = VadSettings {
        frame_ms: args.vad_frame_ms,
        aggressiveness: args.vad_aggressiveness,
        energy_floor_dbfs: args.energy_floor_dbfs,
        min_speech_ms: args.min_speech_ms,
        hangover_ms: args.hangover_ms,
        ..VadSettings::default()
    };
    vad.validate()?;
    let backend = match args.engine.as_str() {
        "conversation" => Backend::Conversation,
        "offline" => Backend::Offline,
        other => bail!("--engine: unknown back end {other:?} (conversation, offline)"),
    };
    if args.fast && (args.input_wav.is_none() || args.output_wav.is_none()) {
        bail!("--fast needs --input-wav and --output-wav (devices run in real time)");
    }
    Ok(TalkConfig {
        model_dir: crate::hub::resolve_model(model)?,
        input,
        output,
        mode: if args.ptt {
            TurnMode::PushToTalk
        } else {
            TurnMode::HandsFree
        },
        vad,
        echo,
        fast: args.fast,
        backend,
        buffer_ms: args.buffer_ms,
        max_turns: args.max_turns,
        max_seconds: args.max_seconds,
        max_context_tokens: args.max_context_tokens,
        dump_turns: args.dump_turns.clone(),
        options: Box::new(options_builder(args)),
    })
}

/// `omni talk`.
pub fn run(args: &TalkArgs) -> Result<()> {
    if args.list_devices {
        let host = super::devices::host()?;
        let list = super::devices::list_devices(&host)?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string(&json!({"host": host.id().name(), "devices": list}))?
            );
        } else {
            println!("host: {}", host.id().name());
            for d in list {
                let dir = match (d.input, d.output) {
                    (true, true) => "in/out",
                    (true, false) => "in",
                    (false, true) => "out",
                    _ => "-",
                };
                println!(
                    "  {:<40} {:<7} {} Hz x{}  {}",
                    d.id,
                    dir,
                    d.default_rate.unwrap_or(0),
                    d.default_channels.unwrap_or(0),
                    d.description
                );
            }
        }
        return Ok(());
    }
    let cfg = config_from_args(args)?;
    let ptt_from_stdin = cfg.mode == TurnMode::PushToTalk && matches!(cfg.input, InputChoice::Device(_));
    let (handle, events) = TalkLoop::start(cfg)?;
    let control = handle.controller();
    // Terminal control: push-to-talk and quit. EOF ends nothing (CI runs without stdin).
    std::thread::Builder::new().name("omni-stdin".into()).spawn(move || {
        let mut down = false;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let c = match line.trim() {
                "start" | "s" => Some(Control::PttStart),
                "stop" | "t" => Some(Control::PttStop),
                "" if ptt_from_stdin => Some(if down { Control::PttStop } else { Control::PttStart }),
                "quit" | "q" => Some(Control::Stop),
                _ => None,
            };
            if let Some(c) = c {
                down = match c {
                    Control::PttStart => true,
                    Control::PttStop => false,
                    Control::Stop => down,
                };
                if control.send(c).is_err() {
                    break;
                }
            }
        }
    })?;
    let stdout = std::io::stdout();
    for ev in events.iter() {
        if args.json {
            let mut lock = stdout.lock();
            writeln!(lock, "{}", serde_json::to_string(&ev)?)?;
            lock.flush()?;
        } else {
            print_human(&ev)?;
        }
    }
    let summary = handle.join()?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        for t in &summary.turns {
            eprintln!(
                "turn {}: speech ended at {:.0} ms, first audio {} ms after; {} tokens, {} frames{}",
                t.turn,
                t.speech_end_ms,
                t.first_audio_ms.map_or("-".to_string(), |m| format!("{m:.0}")),
                t.token_ids.len(),
                t.codes.len(),
                if t.cancelled { " (cancelled)" } else { "" }
            );
        }
        eprintln!("counters: {:?}", summary.counters);
    }
    Ok(())
}

fn print_human(ev: &TalkEvent) -> Result<()> {
    match ev {
        TalkEvent::TextDelta { text, .. } => {
            print!("{text}");
            std::io::stdout().flush()?;
        }
        TalkEvent::TurnDone { .. } => println!(),
        TalkEvent::Loading { what, done, total } => {
            eprint!("\r{what}: {done}/{total}");
            if done >= total {
                eprintln!();
            }
        }
        TalkEvent::Level { .. } | TalkEvent::Counters { .. } | TalkEvent::Echo { .. } => {}
        TalkEvent::Ready { placement } => eprintln!(
            "input {} ({} Hz), output {} ({} Hz), echo {}, {}",
            placement.input,
            placement.input_rate,
            placement.output,
            placement.output_rate,
            placement.echo,
            placement.mode
        ),
        other => eprintln!("{}", serde_json::to_string(other)?),
    }
    Ok(())
}
