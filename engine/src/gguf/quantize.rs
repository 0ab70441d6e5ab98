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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use serde_json::Value as Json;

use super::format::{file_type_code, GgmlType, GgufWriter, TensorSpec, Value};
use super::model::{
    KEY_CONFIG, KEY_GENERATION, KEY_PREPROCESSOR, MMPROJ_ARCH, TALKER_ARCH, THINKER_ARCH,
};
use super::names::{hf_to_gguf, Component, FileKind, Layout, Rule};
use super::quant;
use crate::config::OmniConfig;
use crate::weights::checkpoint_files;

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
// The checkpoint, read tensor by tensor.

#[derive(Debug, Clone)]
struct StEntry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// The safetensors files of a checkpoint, indexed from their headers.
pub struct Checkpoint {
    files: Vec<File>,
    paths: Vec<PathBuf>,
    entries: BTreeMap<String, StEntry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = checkpoint_files(dir)?;
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let mut f =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            use std::io::Read;
            let mut len = [0u8; 8];
            f.read_exact(&mut len)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            let n = u64::from_le_bytes(len) as usize;
            if n > 100 << 20 {
                bail!(
                    "{}: safetensors header of {n} bytes is implausible",
                    path.display()
                );
            }
            let mut header = vec![0u8; n];
            f.read_exact(&mut header)?;
            let json: Json = serde_json::from_slice(&header)
                .with_context(|| format!("{}: invalid safetensors header", path.display()))?;
            let obj = json
                .as_object()
                .context("safetensors header is not an object")?;
            for (name, v) in obj {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = v
                    .get("dtype")
                    .and_then(Json::as_str)
                    .context("safetensors: dtype")?
                    .to_string();
                let shape: Vec<usize> = v
                    .get("shape")
                    .and_then(Json::as_array)
                    .context("safetensors: shape")?
                    .iter()
                    .map(|d| {
                        d.as_u64()
                            .map(|d| d as usize)
                            .context("safetensors: shape entries")
                    })
                    .collect::<Result<_>>()?;
                let offs = v
                    .get("data_offsets")
                    .and_then(Json::as_array)
                    .context("safetensors: data_offsets")?;
                let (a, b) = (offs[0].as_u64().unwrap_or(0), offs[1].as_u64().unwrap_or(0));
                let entry = StEntry {
                    file: fi,
                    dtype,
                    shape,
                    start: 8 + n as u64 + a,
                    len: (b - a) as usize,
                };
                entries.insert(name.clone(), entry);
            }
            files.push(f);
        }
        Ok(Self {
            files,
            paths,
            entries,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Tensor `name` as f32 values (BF16, F16 and F32 checkpoints).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let n: usize = self.shape(name).map(|s| s.iter().product()).unwrap_or(0);
        let mut out = Vec::with_capacity(n);
        self.read_f32_chunks(name, usize::MAX, &mut |c| {
            out.extend_from_slice(c);
            Ok(())
        })?;
        Ok(out)
    }

    /// Tensor `name` as f32 values, handed to `f` in chunks of whole rows (innermost axis) of at most
    /// `max_values` values (at least one row), so a big tensor never sits in memory whole.
    pub fn read_f32_chunks(
        &self,
        name: &str,
        max_values: usize,
        f: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("tensor `{name}` is not in the checkpoint"))?;
        let elem = match e.dtype.as_str() {
            "BF16" | "F16" => 2,
            "F32" => 4,
            other => bail!("tensor `{name}` has dtype {other}; supported are BF16, F16 and F32"),
        };
        let n: usize = e.shape.iter().product();
        if n * elem != e.len {
            bail!("tensor `{name}`: {} bytes for shape {:?}", e.len, e.shape);
        }
        let row = e.shape.last().copied().unwrap_or(1).max(1);
        let chunk = (max_values / row).max(1) * row;
        let mut buf = Vec::new();
        let mut vals = Vec::new();
        let mut done = 0usize;
        while done < n {
            let take = chunk.min(n - done);
            buf.resize(take * elem, 0);
            read_at(
                &self.files[e.file],
                &mut buf,
                e.start + (done * elem) as u64,
            )
            .with_context(|| {
                format!("cannot read `{name}` from {}", self.paths[e.file].display())
            })?;
            vals.clear();
            match e.dtype.as_str() {
                "BF16" => vals.extend(
                    buf.chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                "F16" => vals.extend(
                    buf.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => vals.extend(
                    buf.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
            }
            f(&vals)?;
            done += take;
        }
        Ok(())
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

// ---------------------------------------------------------------------------------------------
// Planning.

/// Where the values of one GGUF tensor come from.
#[derive(Debug, Clone)]
enum Part {
    /// A checkpoint tensor (or one temporal slice of it).
    Tensor { hf: String, slice: Option<usize> },
    /// The audio encoder's sinusoid position table (llama.cpp wants it in the file).
    AudioPositions { channels: usize, length: usize },
}

#[derive(Debug, Clone)]
struct Planned {
    spec: TensorSpec,
    parts: Vec<Part>,
    component: Component,
}

/// Natural order: `blk.2` before `blk.10`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap() as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n * 10 + d as u64;
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, u64::MAX));
    out
}

/// The storage type of one GGUF tensor; `shape` is the PyTorch shape of one stored matrix (one
/// expert of a stacked tensor, one slice of a split kernel).
pub fn choose_type(gguf: &str, shape: &[usize], wanted: GgmlType) -> GgmlType {
    if wanted == GgmlType::F32 {
        return GgmlType::F32;
    }
    let n_dims = shape.len();
    let row = shape.last().copied().unwrap_or(0);
    let always_f32 = n_dims <= 1
        || gguf.ends_with("_norm.weight")
        || gguf.contains("ffn_gate_inp")
        || gguf.contains("position_embd")
        || !(gguf.ends_with(".weight") || gguf.ends_with(".weight.1"));
    if always_f32 {
        return GgmlType::F32;
    }
    // llama.cpp keeps the audio convs in F16 and the patch embedding unquantized.
    if gguf.starts_with("a.conv") || gguf.starts_with("v.patch_embd") {
        return if wanted.is_quantized() {
            GgmlType::F16
        } else {
            wanted
        };
    }
    if wanted.is_quantized() {
        if n_dims == 2 && quant::fits(wanted, row) {
            wanted
        } else {
            GgmlType::F16
        }
    } else {
        wanted
    }
}

struct Plan {
    kind: FileKind,
    tensors: Vec<Planned>,
}

fn plan(ck: &Checkpoint, kind: FileKind, opts: &QuantizeOptions, cfg: &Json) -> Result<Plan> {
    struct Group {
        rule: Rule,
        items: Vec<(Option<usize>, String)>,
        component: Component,
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for name in ck.names() {
        for p in hf_to_gguf(kind, name) {
            let component = Component::of(name)
                .with_context(|| format!("tensor `{name}` belongs to no component"))?;
            let g = groups.entry(p.gguf.clone()).or_insert_with(|| Group {
                rule: p.rule,
                items: Vec::new(),
                component,
            });
            g.items.push((p.index, name.to_string()));
        }
    }
    let mut tensors = Vec::new();
    for (gguf, mut g) in groups {
        let wanted = opts.type_of(g.component);
        let (dims, parts, unit): (Vec<usize>, Vec<Part>, Vec<usize>) = match g.rule.layout {
            Layout::Plain => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                (
                    shape.iter().rev().copied().collect(),
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: None,
                    }],
                    shape,
                )
            }
            Layout::Bias3d => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                let n: usize = shape.iter().product();
                (
                    vec![1, 1, n],
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: None,
                    }],
                    vec![n],
                )
            }
            Layout::TemporalSlice(t) => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                if shape.len() != 5 || t >= shape[2] {
                    bail!(
                        "`{}` has shape {shape:?}; expected a Conv3d kernel with a temporal axis",
                        g.items[0].1
                    );
                }
                let slice = vec![shape[0], shape[1], shape[3], shape[4]];
                (
                    slice.iter().rev().copied().collect(),
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: Some(t),
                    }],
                    slice,
                )
            }
            Layout::Stacked => {
                g.items.sort_by_key(|(i, _)| i.unwrap_or(usize::MAX));
                for (want, (i, name)) in g.items.iter().enumerate() {
                    if *i != Some(want) {
                        bail!("`{gguf}`: the checkpoint's slots are not 0..{} (found `{name}` at {want})", g.items.len());
                    }
                }
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                for (_, name) in &g.items {
                    if ck.shape(name) != Some(&shape[..]) {
                        bail!(
                            "`{name}` has shape {:?}, unlike `{}` {shape:?}; cannot stack them",
                            ck.shape(name),
                            g.items[0].1
                        );
                    }
                }
                let mut dims: Vec<usize> = shape.iter().rev().copied().collect();
                dims.push(g.items.len());
                let parts = g
                    .items
                    .iter()
                    .map(|(_, n)| Part::Tensor {
                        hf: n.clone(),
                        slice: None,
                    })
                    .collect();
                (dims, parts, shape)
            }
        };
        let dtype = choose_type(&gguf, &unit, wanted);
        tensors.push(Planned {
            spec: TensorSpec {
                name: gguf,
                dims,
                dtype,
            },
            parts,
            component: g.component,
        });
    }
    if kind == FileKind::Mmproj {
        if let Some(audio) = cfg.pointer("/thinker_config/audio_config") {
            if tensors.iter().any(|t| t.component == Component::Audio) {
                let channels = audio
                    .get("d_model")
                    .and_then(Json::as_u64)
                    .context("audio_config.d_model")? as usize;
                let length = 1500;
                tensors.push(Planned {
                    spec: TensorSpec {
                        name: "a.position_embd.weight".into(),
                        dims: vec![channels, length],
                        dtype: GgmlType::F32,
                    },
                    parts: vec![Part::AudioPositions { channels, length }],
                    component: Component::Audio,
                });
            }
        }
    }
    tensors.sort_by_key(|t| natural_key(&t.spec.name));
    Ok(Plan { kind, tensors })
}

/// gguf-py's `model_weight_count_rounded_notation`.
fn rounded_notation(count: u64) -> String {
    let c = count as f64;
    let (scaled, suffix) = if c > 1e12 {
        (c * 1e-12, "T")
    } else if c > 1e9 {
        (c * 1e-9, "B")
    } else if c > 1e6 {
        (c * 1e-6, "M")
    } else {
        (c * 1e-3, "K")
    };
    let r = scaled.round_ties_even() as u64;
    let digits = if r == 0 { 0 } else { r.to_string().len() };
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `general.size_label` as llama.cpp's converter computes it (`8x225K`: experts × parameters of
/// the shared part plus one expert; plain counts without experts).
fn size_label(plan: &Plan) -> String {
    let (mut shared, mut expert, mut sum, mut n) = (0u64, 0u64, 0u64, 0u64);
    for t in &plan.tensors {
        let size: u64 = t.spec.dims.iter().map(|&d| d as u64).product();
        if t.spec.name.contains("_exps.") && t.spec.dims.len() >= 3 {
            let e = *t.spec.dims.last().unwrap() as u64;
            expert += size / e;
            sum += e;
            n += 1;
        } else {
            shared += size;
        }
    }
    if n > 0 {
        format!("{}x{}", sum / n, rounded_notation(shared + expert))
    } else {
        rounded_notation(shared)
    }
}

/// The checkpoint tensors no table claims.
fn unclaimed(ck: &Checkpoint) -> Vec<String> {
    ck.names()
        .filter(|n| FileKind::ALL.iter().all(|k| hf_to_gguf(*k, n).is_empty()))
        .map(str::to_string)
        .collect()
}

/// The sinusoid table of the AuT encoder as llama.cpp's converter generates it: `[length, channels]`.
pub fn audio_positions(channels: usize, length: usize) -> Vec<f32> {
    let half = channels / 2;
    let inc = (10000f64).ln() / (half as f64 - 1.0);
    let inv: Vec<f32> = (0..half)
        .map(|i| (-(inc as f32) * i as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(length * channels);
    for t in 0..length {
        let row: Vec<f32> = inv.iter().map(|f| t as f32 * f).collect();
        out.extend(row.iter().map(|x| x.sin()));
        out.extend(row.iter().map(|x| x.cos()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Metadata.

fn read_json(path: &Path) -> Result<Option<(String, Json)>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json = serde_json::from_str(&text)
        .with_context(|| format!("invalid JSON in {}", path.display()))?;
    Ok(Some((text, json)))
}

fn u(v: Option<&Json>) -> Option<u32> {
    v.and_then(Json::as_u64).map(|x| x as u32)
}

fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "Qwen3-Omni".into())
}

fn general(arch: &str, kind: &str, name: &str, t: GgmlType) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String(kind.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(file_type_code(t))),
        ("general.quantization_version".into(), Value::U32(2)),
    ]
}

fn thinker_metadata(
    dir: &Path,
    cfg_text: &str,
    cfg: &Json,
    opts: &QuantizeOptions,
) -> Result<Vec<(String, Value)>> {
    let parsed = OmniConfig::from_json_str(cfg_text)?;
    let t = &parsed.thinker_config.text_config;
    let rope = t.rope()?;
    let a = THINKER_ARCH;
    let mut m = general(
        a,
        "model",
        &model_name(dir),
        opts.type_of(Component::Thinker),
    );
    let mut sections: Vec<i32> = rope.mrope_section.iter().map(|&s| s as i32).collect();
    sections.resize(4, 0);
    let kv = |k: &str, v: Value| (format!("{a}.{k}"), v);
    m.extend([
        kv("block_count", Value::U32(t.num_hidden_layers as u32)),
        kv(
            "context_length",
            Value::U32(t.max_position_embeddings.unwrap_or(65536) as u32),
        ),
        kv("embedding_length", Value::U32(t.hidden_size as u32)),
        kv(
            "feed_forward_length",
            Value::U32(t.intermediate_size as u32),
        ),
        kv(
            "attention.head_count",
            Value::U32(t.num_attention_heads as u32),
        ),
        kv(
            "attention.head_count_kv",
            Value::U32(t.num_key_value_heads as u32),
        ),
        kv("rope.dimension_sections", Value::i32s(&sections)),
        kv("rope.freq_base", Value::F32(rope.theta as f32)),
        kv(
            "attention.layer_norm_rms_epsilon",
            Value::F32(t.rms_norm_eps as f32),
        ),
        kv("expert_count", Value::U32(t.num_experts as u32)),
        kv(
            "expert_used_count",
            Value::U32(t.num_experts_per_tok as u32),
        ),
        kv("attention.key_length", Value::U32(t.head_dim() as u32)),
        kv("attention.value_length", Value::U32(t.head_dim() as u32)),
        kv(
            "expert_feed_forward_length",
            Value::U32(t.moe_intermediate_size as u32),
        ),
        kv(
            "expert_shared_feed_forward_length",
            Value::U32(t.shared_expert_intermediate_size as u32),
        ),
        kv("expert_weights_norm", Value::Bool(t.norm_topk_prob)),
        kv("n_deepstack_layers", Value::U32(0)),
    ]);
    let generation = read_json(&dir.join("generation_config.json"))?;
    if let Some((_, g)) = &generation {
        if let Some(k) = g.get("top_k").and_then(Json::as_i64) {
            m.push(("general.sampling.top_k".into(), Value::I32(k as i32)));
        }
        if let Some(p) = g.get("top_p").and_then(Json::as_f64) {
            m.push(("general.sampling.top_p".into(), Value::F32(p as f32)));
        }
        if let Some(p) = g.get("temperature").and_then(Json::as_f64) {
            m.push(("general.sampling.temp".into(), Value::F32(p as f32)));
        }
        if let Some(p) = g.get("repetition_penalty").and_then(Json::as_f64) {
            m.push((
                "general.sampling.penalty_repeat".into(),
                Value::F32(p as f32),
            ));
        }
    }
    m.extend(super::tokenizer::tokenizer_metadata(dir, t.vocab_size)?);
    m.push((KEY_CONFIG.into(), Value::String(cfg_text.to_string())));
    if let Some((text, _)) = generation {
        m.push((KEY_GENERATION.into(), Value::String(text)));
    }
    let _ = cfg;
    Ok(m)
}

/// The processor config: `preprocessor_config.json`, else `processor_config.json`.
fn processor_config(dir: &Path) -> Result<Option<(String, Json)>> {
    match read_json(&dir.join("preprocessor_config.json"))? {
        Some(x) => Ok(Some(x)),
        None => read_json(&dir.join("processor_config.json")),
    }
}

fn mmproj_metadata(
    dir: &Path,
    cfg: &Json,
    opts: &QuantizeOptions,
    plan: &Plan,
) -> Result<Vec<(String, Value)>> {
    let t = opts.type_of(Component::Vision);
    let mut m = general(MMPROJ_ARCH, "mmproj", &model_name(dir), t);
    let text = cfg
        .pointer("/thinker_config/text_config")
        .context("config.json: thinker_config.text_config")?;
    let proc = processor_config(dir)?;
    let image = proc
        .as_ref()
        .map(|(_, j)| j.get("image_processor").unwrap_or(j).clone());
    let has_vision = plan
        .tensors
        .iter()
        .any(|p| p.component == Component::Vision);
    let has_audio = plan.tensors.iter().any(|p| p.component == Component::Audio);
    m.push(("clip.has_vision_encoder".into(), Value::Bool(has_vision)));
    if has_vision {
        let v = cfg
            .pointer("/thinker_config/vision_config")
            .context("config.json: thinker_config.vision_config")?;
        let depth = u(v.get("depth")).context("vision_config.depth")?;
        let patch = u(v.get("patch_size")).unwrap_or(16);
        let image_size = u(v.get("image_size")).unwrap_or_else(|| {
            let n = v
                .get("num_position_embeddings")
                .and_then(Json::as_f64)
                .unwrap_or(2304.0);
            (n.sqrt() as u32) * patch
        });
        let floats = |key: &str| -> Vec<f32> {
            image
                .as_ref()
                .and_then(|j| j.get(key))
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_f64)
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_else(|| vec![0.5, 0.5, 0.5])
        };
        let ds: Vec<u32> = v
            .get("deepstack_visual_indexes")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_u64)
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        let mut is_ds = vec![false; depth as usize];
        for &i in &ds {
            if let Some(slot) = is_ds.get_mut(i as usize) {
                *slot = true;
            }
        }
        m.extend([
            (
                "clip.vision.projection_dim".into(),
                Value::U32(u(v.get("out_hidden_size")).context("vision_config.out_hidden_size")?),
            ),
            ("clip.vision.image_size".into(), Value::U32(image_size)),
            ("clip.vision.patch_size".into(), Value::U32(patch)),
            (
                "clip.vision.embedding_length".into(),
                Value::U32(u(v.get("hidden_size")).context("vision_config.hidden_size")?),
            ),
            (
                "clip.vision.feed_forward_length".into(),
                Value::U32(
                    u(v.get("intermediate_size")).context("vision_config.intermediate_size")?,
                ),
            ),
            ("clip.vision.block_count".into(), Value::U32(depth)),
            (
                "clip.vision.attention.head_count".into(),
                Value::U32(u(v.get("num_heads")).context("vision_config.num_heads")?),
            ),
            (
                "clip.vision.image_mean".into(),
                Value::f32s(&floats("image_mean")),
            ),
            (
                "clip.vision.image_std".into(),
                Value::f32s(&floats("image_std")),
            ),
        ]);
        m.push((
            "clip.vision.spatial_merge_size".into(),
            Value::U32(u(v.get("spatial_merge_size")).unwrap_or(2)),
        ));
        let eps = text
            .get("rms_norm_eps")
            .and_then(Json::as_f64)
            .unwrap_or(1e-6);
        m.push((
            "clip.vision.attention.layer_norm_epsilon".into(),
            Value::F32(eps as f32),
        ));
        m.push((
            "clip.vision.is_deepstack_layers".into(),
            Value::bools(&is_ds),
        ));
        m.push((
            "clip.vision.projector_type".into(),
            Value::String("qwen3vl_merger".into()),
        ));
        m.push((
            "omni.vision.deepstack_visual_indexes".into(),
            Value::u32s(&ds),
        ));
    }
    m.push(("clip.has_audio_encoder".into(), Value::Bool(has_audio)));
    if has_audio {
        let a = cfg
            .pointer("/thinker_config/audio_config")
            .context("config.json: thinker_config.audio_config")?;
        m.extend([
            (
                "clip.audio.projection_dim".into(),
                Value::U32(u(a.get("output_dim")).context("audio_config.output_dim")?),
            ),
            (
                "clip.audio.embedding_length".into(),
                Value::U32(u(a.get("d_model")).context("audio_config.d_model")?),
            ),
            (
                "clip.audio.feed_forward_length".into(),
                Value::U32(u(a.get("encoder_ffn_dim")).context("audio_config.encoder_ffn_dim")?),
            ),
            (
                "clip.audio.block_count".into(),
                Value::U32(u(a.get("encoder_layers")).context("audio_config.encoder_layers")?),
            ),
            (
                "clip.audio.attention.head_count".into(),
                Value::U32(
                    u(a.get("encoder_attention_heads"))
                        .context("audio_config.encoder_attention_heads")?,
                ),
            ),
            (
                "clip.audio.num_mel_bins".into(),
                Value::U32(u(a.get("num_mel_bins")).unwrap_or(128)),
            ),
            (
                "clip.audio.attention.layer_norm_epsilon".into(),
                Value::F32(
                    a.get("layer_norm_eps")
                        .and_then(Json::as_f64)
                        .unwrap_or(1e-5) as f32,
                ),
            ),
            (
                "clip.audio.projector_type".into(),
                Value::String("qwen3a".into()),
            ),
        ]);
    }
    m.push(("clip.use_gelu".into(), Value::Bool(true)));
    if let Some((text, _)) = proc {
        m.push((KEY_PREPROCESSOR.into(), Value::String(text)));
    }
    Ok(m)
}

fn talker_metadata(
    dir: &Path,
    cfg_text: &str,
    cfg: &Json,
    opts: &QuantizeOptions,
) -> Result<Vec<(String, Value)>> {
    let mut m = general(
        TALKER_ARCH,
        "model",
        &model_name(dir),
        opts.type_of(Component::Talker),
    );
    m.push(("omni.format_version".into(), Value::U32(1)));
    if let Some(t) = cfg.get("talker_config") {
        let tc = t.get("text_config").cloned().unwrap_or_default();
        let cp = t.get("code_predictor_config").cloned().unwrap_or_default();
        let p = "omni.talker.";
        let mut push_u = |k: &str, v: Option<u32>| {
            if let Some(v) = v {
                m.push((format!("{p}{k}"), Value::U32(v)));
            }
        };
        push_u("block_count", u(tc.get("num_hidden_layers")));
        push_u("embedding_length", u(tc.get("hidden_size")));
        push_u("expert_count", u(tc.get("num_experts")));
        push_u("expert_used_count", u(tc.get("num_experts_per_tok")));
        push_u("vocab_size", u(tc.get("vocab_size")));
        push_u("accept_hidden_layer", u(t.get("accept_hidden_layer")));
        push_u("num_code_groups", u(t.get("num_code_groups")));
        push_u("thinker_hidden_size", u(t.get("thinker_hidden_size")));
        push_u("code_predictor.block_count", u(cp.get("num_hidden_layers")));
        push_u("code_predictor.embedding_length", u(cp.get("hidden_size")));
        push_u("code_predictor.vocab_size", u(cp.get("vocab_size")));
        for id in [
            "codec_pad_id",
            "codec_bos_id",
            "codec_eos_token_id",
            "codec_nothink_id",
            "codec_think_bos_id",
            "codec_think_eos_id",
        ] {
            push_u(id, u(t.get(id)));
        }
        if let Some(speakers) = t.get("speaker_id").and_then(Json::as_object) {
            let names: Vec<&str> = speakers.keys().map(String::as_str).collect();
            let ids: Vec<u32> = speakers
                .values()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect();
            m.push(("omni.talker.speaker_names".into(), Value::strings(&names)));
            m.push(("omni.talker.speaker_ids".into(), Value::u32s(&ids)));
        }
    }
    if let Some(c) = cfg.get("code2wav_config") {
        let p = "omni.code2wav.";
        for k in [
            "num_hidden_layers",
            "hidden_size",
            "num_quantizers",
            "codebook_size",
            "decoder_dim",
            "sliding_window",
        ] {
            if let Some(v) = u(c.get(k)) {
                m.push((format!("{p}{k}"), Value::U32(v)));
            }
        }
        for k in ["upsample_rates", "upsampling_ratios"] {
            if let Some(a) = c.get(k).and_then(Json::as_array) {
                let v: Vec<u32> = a
                    .iter()
                    .filter_map(Json::as_u64)
                    .map(|x| x as u32)
                    .collect();
                m.push((format!("{p}{k}"), Value::u32s(&v)));
            }
        }
    }
    for c in [Component::Talker, Component::Code2Wav] {
        m.push((
            format!("omni.{}.type", c.name()),
            Value::String(opts.type_of(c).name().into()),
        ));
    }
    m.push((KEY_CONFIG.into(), Value::String(cfg_text.to_string())));
    Ok(m)
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
