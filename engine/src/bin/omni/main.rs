//! `omni`: the headless command line over the engine.
//!
//! `omni run` answers one prompt; `omni demo` runs the bundled tiny model. Progress and logs go to
//! stderr; stdout carries only the answer (streamed text, or one JSON object with `--json`).
//!
//! Submodules: `run` (`omni run`, `omni demo`), `bench` (`omni bench`), `gguf` (`omni quantize`,
//! `omni eval`, `omni random-checkpoint`), each with its arguments; this file holds the command
//! line and `main`.

mod bench;
mod gguf;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use bench::{bench, BenchWhat};
use gguf::{eval, quantize, random_checkpoint, EvalArgs, QuantizeArgs, RandomCheckpointArgs};
use run::{demo, run, RunArgs};

/// A progress bar on stderr showing `message` and `template` (indicatif's syntax; the plain bar if it
/// does not parse).
fn progress_bar(total: u64, template: &str, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_message(message.to_string());
    bar
}

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
