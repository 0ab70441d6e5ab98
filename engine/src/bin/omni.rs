//! `omni`: the headless command line over the engine.
//!
//! `omni run` answers one prompt; `omni demo` runs the bundled tiny model. Progress and logs go to
//! stderr; stdout carries only the answer (streamed text, or one JSON object with `--json`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use omni_engine::chat::{user_turn, ChatMessage};
use omni_engine::generation::{generate_text, Sampler, StopRule};
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
    /// Run the whole pipeline on the bundled tiny model (random weights: the output is gibberish).
    Demo {
        /// Prompt for the demo.
        #[arg(long, default_value = "Hello! How are you today?")]
        prompt: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (config.json, tokenizer.json, *.safetensors), or a hub id such as
    /// Qwen/Qwen3-Omni-30B-A3B-Instruct (downloaded when the network allows).
    #[arg(long)]
    model: PathBuf,
    /// The user's text.
    #[arg(long)]
    prompt: String,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OMNI_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Demo { prompt } => demo(&prompt),
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
    let dir = omni_engine::hub::resolve_model(&args.model)?;
    let model = OmniModel::load(&dir, &mut BarProgress(None))?;
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
    messages.push(user_turn(&[], &[], &[], Some(&args.prompt)));
    answer(&model, &messages, sampling, args.max_new_tokens, args.json)
}

fn answer(
    model: &OmniModel,
    messages: &[ChatMessage],
    sampling: omni_engine::generation::SamplingParams,
    max_new_tokens: usize,
    as_json: bool,
) -> Result<()> {
    let (_, prompt_ids) = model.render_prompt(messages)?;
    let stop = StopRule { eos_ids: model.eos_ids()?, max_new_tokens };
    let mut sampler = Sampler::new(sampling);
    let mut streamer = TextStreamer::new();
    let stdout = std::io::stdout();
    let out = generate_text(&model.thinker, &prompt_ids, &mut sampler, &stop, |id| {
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
    let timings = json!({
        "load_ms": model.load_ms,
        "prefill_ms": out.prefill_ms,
        "decode_ms": out.decode_ms,
        "prefill_tokens_per_s": prompt_ids.len() as f64 / (out.prefill_ms / 1e3).max(1e-9),
        "decode_tokens_per_s": n.saturating_sub(1) as f64 / (out.decode_ms / 1e3).max(1e-9),
    });
    if as_json {
        let obj = json!({
            "prompt_token_ids": out.prompt_ids,
            "token_ids": out.token_ids,
            "text": text,
            "finish_reason": out.finish,
            "timings": timings,
        });
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

fn demo(prompt: &str) -> Result<()> {
    let dir = demo_model_dir()?;
    eprintln!("omni demo: the tiny bundled model in {} has RANDOM weights,", dir.display());
    eprintln!("so its answer is gibberish; it shows the pipeline working end to end.");
    eprintln!("Stages today: chat template -> tokenizer -> Thinker (MoE, M-RoPE, KV cache) -> text.");
    let model = OmniModel::load(&dir, &mut BarProgress(None))?;
    eprintln!("prompt: {prompt}");
    let messages = vec![user_turn(&[], &[], &[], Some(prompt))];
    answer(&model, &messages, omni_engine::generation::SamplingParams::greedy(), 32, false)
}
