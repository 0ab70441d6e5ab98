//! The GGUF commands: `omni quantize`, `omni eval` and the hidden `omni random-checkpoint`, with
//! their arguments and the byte-count progress bar they share.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::ProgressBar;

use omni_engine::gguf::model::GgufModelFiles;
use omni_engine::gguf::quantize::QuantizeProgress;

#[derive(Args)]
pub(super) struct QuantizeArgs {
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
        self.0 = Some(super::progress_bar(total, "{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed} (eta {eta})", file));
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

pub(super) fn quantize(args: &QuantizeArgs) -> Result<()> {
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

/// `--thinker/--mmproj/--talker`: GGUF files named one by one, over those found in a directory.
#[derive(Args)]
pub(super) struct GgufFileArgs {
    /// A Thinker GGUF file (ours or llama.cpp's qwen3vlmoe), instead of the one in the directory.
    #[arg(long, value_name = "FILE")]
    pub thinker: Option<PathBuf>,
    /// A vision + audio GGUF file (mmproj), instead of the one in the directory.
    #[arg(long, value_name = "FILE")]
    pub mmproj: Option<PathBuf>,
    /// A Talker + Code2Wav GGUF file, instead of the one in the directory.
    #[arg(long, value_name = "FILE")]
    pub talker: Option<PathBuf>,
}

impl GgufFileArgs {
    pub fn any(&self) -> bool {
        self.thinker.is_some() || self.mmproj.is_some() || self.talker.is_some()
    }

    /// The files of `dir` (if any) with the named ones in their place.
    pub fn resolve(&self, dir: Option<&std::path::Path>) -> Result<GgufModelFiles> {
        GgufModelFiles::with_overrides(dir, self.thinker.as_deref(), self.mmproj.as_deref(), self.talker.as_deref())
    }
}

#[derive(Args)]
pub(super) struct EvalArgs {
    /// The safetensors checkpoint the GGUF files were made from (the f32 reference).
    #[arg(long)]
    model: PathBuf,
    /// Directory of GGUF files.
    #[arg(long)]
    gguf: Option<PathBuf>,
    #[command(flatten)]
    files: GgufFileArgs,
    /// Tokens of greedy continuation per prompt (golden cases use their own).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

pub(super) fn eval(args: &EvalArgs) -> Result<()> {
    let files = args.files.resolve(args.gguf.as_deref())?;
    let report = omni_engine::gguf::eval::evaluate(&args.model, &files, args.max_new_tokens)?;
    for s in &report.stages {
        eprintln!("{:<16} NMSE {:.3e}  ({})", s.stage, s.nmse, s.what);
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
pub(super) struct RandomCheckpointArgs {
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

pub(super) fn random_checkpoint(args: &RandomCheckpointArgs) -> Result<()> {
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
