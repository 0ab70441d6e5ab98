//! `omni quantize`: a safetensors checkpoint → `thinker-<type>.gguf` (llama.cpp's `qwen3vlmoe`),
//! `mmproj-<type>.gguf` (llama.cpp's combined clip file) and `talker-<type>.gguf` (our own layout).
//!
//! Streaming: the checkpoint's safetensors headers give every shape, so each file's header (with
//! every tensor's type and offset) is written first; then tensors are read one at a time with
//! positioned reads (no mmap, so resident memory stays at one tensor), converted and appended.
//! Experts are read one by one into their stacked tensor. Files are written under temporary names
//! and renamed only when all of them are complete; an interrupt (Ctrl-C) removes the temporaries.
//!
//! Types: Q8_0 for 2-D weight matrices whose rows are a multiple of 32; F32 for 1-D tensors (norms,
//! biases, SnakeBeta, layer scales), router gates and position tables; F16 where Q8_0 cannot apply
//! (conv kernels, odd rows), and for llama.cpp's audio convs. `--type` sets the default, and a type per
//! component (`thinker`, `vision`, `audio`, `talker`, `code2wav`) overrides it.
//!
//! Submodules: `checkpoint` (the safetensors reader), `plan` (tensors, sources and types of each
//! file), `metadata` (the key/values of each file); this file holds the options, the progress and
//! the streaming writer.

mod checkpoint;
mod metadata;
mod plan;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::format::{GgmlType, GgufWriter, TensorSpec, Value};
use super::names::{Component, FileKind};
use super::quant;
use crate::config::OmniConfig;
use metadata::{mmproj_metadata, talker_metadata, thinker_metadata};
use plan::{plan, size_label, unclaimed, Part, Plan};

pub use checkpoint::Checkpoint;
pub use plan::{audio_positions, choose_type};

/// Set by the interrupt handler; the quantizer stops at the next tensor and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C (SIGINT) and SIGTERM stop a running quantization cleanly (a second one exits at once).
pub fn install_interrupt_handler() {
    #[cfg(unix)]
    {
        extern "C" fn on_signal(_: libc::c_int) {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                // SAFETY: `_exit` is async-signal-safe.
                unsafe { libc::_exit(130) };
            }
        }
        // SAFETY: installing a handler that only touches an atomic (or exits) is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    /// The type of quantizable matrices unless a component says otherwise.
    pub default_type: GgmlType,
    pub component_types: BTreeMap<Component, GgmlType>,
    /// The files to write (all that the checkpoint has, when empty).
    pub files: Vec<FileKind>,
}

impl QuantizeOptions {
    pub fn new(model_dir: &Path, out_dir: &Path, default_type: GgmlType) -> Self {
        Self {
            model_dir: model_dir.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            default_type,
            component_types: BTreeMap::new(),
            files: Vec::new(),
        }
    }

    pub fn type_of(&self, c: Component) -> GgmlType {
        self.component_types
            .get(&c)
            .copied()
            .unwrap_or(self.default_type)
    }
}

/// Parses `q8_0`, `f16`, `bf16`, `f32`.
pub fn parse_type(s: &str) -> Result<GgmlType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "q8_0" => GgmlType::Q8_0,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::BF16,
        "f32" => GgmlType::F32,
        other => bail!("unknown type {other:?}: expected q8_0, f16, bf16 or f32"),
    })
}

/// Progress of a quantization, in bytes written.
pub trait QuantizeProgress {
    fn start(&mut self, file: &str, total_bytes: u64);
    fn advance(&mut self, written_bytes: u64);
    fn finish(&mut self);
}

pub struct NoQuantizeProgress;

impl QuantizeProgress for NoQuantizeProgress {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// One file that was written.
#[derive(Debug, Clone)]
pub struct WrittenFile {
    pub kind: FileKind,
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// Tensor count per ggml type.
    pub types: BTreeMap<&'static str, usize>,
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// Removes temporary files unless disarmed.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; no output file was written");
    }
    Ok(())
}

fn write_file(
    ck: &Checkpoint,
    plan: &Plan,
    meta: &[(String, Value)],
    path: &Path,
    progress: &mut dyn QuantizeProgress,
) -> Result<u64> {
    let specs: Vec<TensorSpec> = plan.tensors.iter().map(|t| t.spec.clone()).collect();
    let total: u64 = specs.iter().map(|s| s.size_in_bytes() as u64).sum();
    let mut w = GgufWriter::create(path, meta, specs)?;
    progress.start(
        path.file_name().and_then(|n| n.to_str()).unwrap_or("gguf"),
        total,
    );
    let mut done = 0u64;
    let mut buf = Vec::new();
    for t in &plan.tensors {
        for part in &t.parts {
            check_interrupt()?;
            if let Part::Tensor { hf, slice: None } = part {
                // Whole rows, ~4M values at a time.
                ck.read_f32_chunks(hf, 1 << 22, &mut |values| {
                    buf.clear();
                    quant::encode(values, t.spec.dtype, &mut buf)
                        .with_context(|| format!("tensor `{}`", t.spec.name))?;
                    w.write(&buf)?;
                    done += buf.len() as u64;
                    progress.advance(done);
                    Ok(())
                })?;
                continue;
            }
            let values = match part {
                Part::Tensor { hf: _, slice: None } => unreachable!(),
                Part::Tensor { hf, slice: Some(s) } => {
                    let shape = ck.shape(hf).unwrap();
                    let all = ck.read_f32(hf)?;
                    let (o, i, tt, h, wd) = (shape[0], shape[1], shape[2], shape[3], shape[4]);
                    let mut out = Vec::with_capacity(o * i * h * wd);
                    for oi in 0..o * i {
                        let base = (oi * tt + s) * h * wd;
                        out.extend_from_slice(&all[base..base + h * wd]);
                    }
                    out
                }
                Part::AudioPositions { channels, length } => audio_positions(*channels, *length),
            };
            buf.clear();
            quant::encode(&values, t.spec.dtype, &mut buf)
                .with_context(|| format!("tensor `{}`", t.spec.name))?;
            w.write(&buf)?;
            done += buf.len() as u64;
            progress.advance(done);
        }
    }
    let n = w.finish()?;
    progress.finish();
    Ok(n)
}

/// Writes the GGUF files of the checkpoint in `opts.model_dir` to `opts.out_dir`.
pub fn quantize(
    opts: &QuantizeOptions,
    progress: &mut dyn QuantizeProgress,
) -> Result<Vec<WrittenFile>> {
    let dir = &opts.model_dir;
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    OmniConfig::from_json_str(&cfg_text)
        .with_context(|| format!("invalid model config {}", cfg_path.display()))?;
    let cfg: Json = serde_json::from_str(&cfg_text)?;
    let ck = Checkpoint::open(dir)?;
    let stray = unclaimed(&ck);
    if let Some(first) = stray.first() {
        bail!(
            "{} checkpoint tensor(s) have no place in the GGUF layout (first: `{first}`); see docs/gguf.md",
            stray.len()
        );
    }
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    let kinds: Vec<FileKind> = if opts.files.is_empty() {
        FileKind::ALL.to_vec()
    } else {
        opts.files.clone()
    };
    let type_name = opts.default_type.name();
    let mut temps = TempFiles(Vec::new());
    let mut written = Vec::new();
    for kind in kinds {
        let plan = plan(&ck, kind, opts, &cfg)?;
        if plan.tensors.is_empty() {
            if !opts.files.is_empty() {
                bail!("the checkpoint has no tensors for the {} file", kind.stem());
            }
            continue;
        }
        let meta = match kind {
            FileKind::Thinker => thinker_metadata(dir, &cfg_text, &cfg, opts)?,
            FileKind::Mmproj => mmproj_metadata(dir, &cfg, opts, &plan)?,
            FileKind::Talker => talker_metadata(dir, &cfg_text, &cfg, opts)?,
        };
        let mut meta = meta;
        meta.insert(
            3,
            (
                "general.size_label".into(),
                Value::String(size_label(&plan)),
            ),
        );
        let final_path = opts
            .out_dir
            .join(format!("{}-{type_name}.gguf", kind.stem()));
        let temp = opts
            .out_dir
            .join(format!(".{}-{type_name}.gguf.partial", kind.stem()));
        temps.0.push(temp.clone());
        let bytes = write_file(&ck, &plan, &meta, &temp, progress)?;
        let mut types: BTreeMap<&'static str, usize> = BTreeMap::new();
        for t in &plan.tensors {
            *types.entry(t.spec.dtype.name()).or_default() += 1;
        }
        let _ = bytes;
        let size = std::fs::metadata(&temp)?.len();
        written.push((
            temp,
            WrittenFile {
                kind: plan.kind,
                path: final_path,
                bytes: size,
                tensors: plan.tensors.len(),
                types,
            },
        ));
    }
    check_interrupt()?;
    for (temp, w) in &written {
        std::fs::rename(temp, &w.path)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), w.path.display()))?;
    }
    temps.0.clear();
    Ok(written.into_iter().map(|(_, w)| w).collect())
}

/// Per-tensor summary of a plan (name, ggml dims, type), for docs and size checks.
pub fn planned_tensors(
    model_dir: &Path,
    opts: &QuantizeOptions,
) -> Result<HashMap<FileKind, Vec<TensorSpec>>> {
    let cfg_text = std::fs::read_to_string(model_dir.join("config.json"))?;
    let cfg: Json = serde_json::from_str(&cfg_text)?;
    let ck = Checkpoint::open(model_dir)?;
    let mut out = HashMap::new();
    for kind in FileKind::ALL {
        let p = plan(&ck, kind, opts, &cfg)?;
        out.insert(kind, p.tensors.into_iter().map(|t| t.spec).collect());
    }
    Ok(out)
}
