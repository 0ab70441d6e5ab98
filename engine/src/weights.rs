//! Checkpoint weights: a Hugging Face directory of safetensors (single file or sharded with
//! `model.safetensors.index.json`), memory-mapped, read by checkpoint path.
//!
//! Every tensor is looked up by its exact name in the checkpoint (`thinker.model.layers.0.self_attn.q_proj.weight`),
//! its shape is checked, and it is converted to f32 for the CPU path. The store remembers what was
//! read so a loader can fail on tensors it left unused inside its own component, and report the rest.
//!
//! The same store serves GGUF files ([`WeightStore::from_gguf`]): names stay checkpoint names, mapped
//! to the files' tensors by `gguf::names`, and [`WeightStore::matrix`] hands quantized matrices out
//! as `QTensor`s over the file map (everything else is dequantized to f32).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::quantized::QTensor;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::bench::random_weights::{RandomQuant, RandomSource};
use crate::gguf::source::GgufSource;

/// Problems with a checkpoint's tensors, each naming the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("tensor `{name}` is missing from the checkpoint {dir}")]
    Missing { name: String, dir: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} (from config.json)")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}; supported are BF16, F16 and F32")]
    DType { name: String, dtype: String },
    #[error("{count} tensor(s) under `{prefix}` were not used by the loader (first: {first}); the checkpoint does not match config.json")]
    Unused { prefix: String, count: usize, first: String },
}

/// Where the tensors come from.
enum Backend {
    Safetensors(MmapedSafetensors),
    Gguf(GgufSource),
    /// Random values at config.json's shapes, made in memory ([`WeightStore::random`], for benches).
    Random(RandomSource),
}

/// A weight matrix as a loader receives it: dense f32, or quantized blocks (from a GGUF file).
#[derive(Debug, Clone)]
pub enum WeightMatrix {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

struct Inner {
    dir: PathBuf,
    files: Vec<PathBuf>,
    backend: Backend,
    names: BTreeSet<String>,
    used: Mutex<HashSet<String>>,
    device: Device,
}

/// The tensors of a checkpoint directory. Cheap to clone.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Inner>,
}

impl WeightStore {
    /// Opens `dir/model.safetensors` or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        for f in &files {
            if !f.exists() {
                bail!("checkpoint shard {} is listed in the index but does not exist", f.display());
            }
        }
        // SAFETY: the files are mapped read-only; a concurrent writer would corrupt tensors, as in
        // every mmap-based loader (transformers, llama.cpp).
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| anyhow::anyhow!("cannot read safetensors in {}: {e}", dir.display()))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                files,
                backend: Backend::Safetensors(st),
                names,
                used: Mutex::new(HashSet::new()),
                device: Device::Cpu,
            }),
        })
    }

    /// A store over GGUF files; `dir` names the model in messages.
    pub fn from_gguf(dir: &Path, source: GgufSource) -> Self {
        let files = source.files().iter().map(|f| f.file.path().to_path_buf()).collect();
        let names = source.names().map(str::to_string).collect();
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                files,
                backend: Backend::Gguf(source),
                names,
                used: Mutex::new(HashSet::new()),
                device: Device::Cpu,
            }),
        }
    }

    /// A store of random weights with the shapes of `config` (a whole config.json): every tensor
    /// the loaders ask for is made in memory, Q8_0 matrices (`quant`) per component on first use.
    /// For benchmarks: speed does not depend on the values.
    pub fn random(config: &serde_json::Value, seed: u64, quant: RandomQuant) -> Result<Self> {
        let source = RandomSource::new(config, seed, quant)?;
        let names = source.names().map(str::to_string).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                dir: PathBuf::from("<random weights>"),
                files: Vec::new(),
                backend: Backend::Random(source),
                names,
                used: Mutex::new(HashSet::new()),
                device: Device::Cpu,
            }),
        })
    }

    /// The GGUF files behind this store, if it reads GGUF.
    pub fn gguf(&self) -> Option<&GgufSource> {
        match &self.inner.backend {
            Backend::Gguf(g) => Some(g),
            Backend::Safetensors(_) | Backend::Random(_) => None,
        }
    }

    /// The random source behind this store, if it is one ([`Self::random`]).
    pub fn random_source(&self) -> Option<&RandomSource> {
        match &self.inner.backend {
            Backend::Random(r) => Some(r),
            _ => None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.names.contains(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.names.iter().map(String::as_str)
    }

    /// Loads tensor `name` as f32, checking its shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.inner.names.contains(name) {
            return Err(WeightError::Missing { name: name.to_string(), dir: self.inner.dir.display().to_string() }.into());
        }
        let st = match &self.inner.backend {
            Backend::Safetensors(st) => st,
            Backend::Gguf(g) => {
                self.check_gguf_shape(g, name, shape)?;
                let t = g.tensor(name, &self.inner.device)?;
                self.inner.used.lock().expect("weight usage lock").insert(name.to_string());
                return Ok(t);
            }
            Backend::Random(r) => {
                self.check_random_shape(r, name, shape)?;
                let t = r.tensor(name, &self.inner.device)?;
                self.inner.used.lock().expect("weight usage lock").insert(name.to_string());
                return Ok(t);
            }
        };
        let view = st.get(name).map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
        let found: Vec<usize> = view.shape().to_vec();
        if found != shape {
            return Err(WeightError::Shape { name: name.to_string(), found, expected: shape.to_vec() }.into());
        }
        let dtype = view.dtype();
        use safetensors::Dtype as D;
        if !matches!(dtype, D::BF16 | D::F16 | D::F32) {
            return Err(WeightError::DType { name: name.to_string(), dtype: format!("{dtype:?}") }.into());
        }
        let t = st.load(name, &self.inner.device).with_context(|| format!("tensor `{name}`"))?;
        let t = if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? };
        self.inner.used.lock().expect("weight usage lock").insert(name.to_string());
        Ok(t)
    }

    fn check_random_shape(&self, r: &RandomSource, name: &str, shape: &[usize]) -> Result<()> {
        let found = r.shape(name).unwrap_or_default();
        if found != shape {
            return Err(WeightError::Shape { name: name.to_string(), found: found.to_vec(), expected: shape.to_vec() }.into());
        }
        Ok(())
    }

    fn check_gguf_shape(&self, g: &GgufSource, name: &str, shape: &[usize]) -> Result<()> {
        let found = g.shape(name).unwrap_or_default();
        if found != shape {
            let name = format!("{name}` (GGUF `{}", g.gguf_names(name).join("`, `"));
            return Err(WeightError::Shape { name, found: found.to_vec(), expected: shape.to_vec() }.into());
        }
        Ok(())
    }

    /// Loads weight matrix `name` of shape `shape`: quantized when a GGUF file stores it in a
    /// block-quantized type (no copy: the blocks stay in the file map), else dense f32.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<WeightMatrix> {
        if let Backend::Gguf(g) = &self.inner.backend {
            if self.inner.names.contains(name) {
                self.check_gguf_shape(g, name, shape)?;
                if let Some(q) = g.qmatrix(name)? {
                    self.inner.used.lock().expect("weight usage lock").insert(name.to_string());
                    return Ok(WeightMatrix::Quantized(Arc::new(q)));
                }
            }
        }
        if let Backend::Random(r) = &self.inner.backend {
            if self.inner.names.contains(name) {
                self.check_random_shape(r, name, shape)?;
                if let Some(q) = r.qmatrix(name)? {
                    self.inner.used.lock().expect("weight usage lock").insert(name.to_string());
                    return Ok(WeightMatrix::Quantized(Arc::new(q)));
                }
            }
        }
        Ok(WeightMatrix::Dense(self.tensor(name, shape)?))
    }

    /// A view that prefixes names, like a candle `VarBuilder`.
    pub fn root(&self) -> Weights {
        Weights { store: self.clone(), prefix: String::new() }
    }

    /// Tensors under `prefix` that no loader has read.
    pub fn unused_under(&self, prefix: &str) -> Vec<String> {
        let used = self.inner.used.lock().expect("weight usage lock");
        self.inner.names.iter().filter(|n| n.starts_with(prefix) && !used.contains(*n)).cloned().collect()
    }

    /// Fails when a tensor under `prefix` was left unused: the checkpoint has more than config.json says.
    pub fn ensure_all_used(&self, prefix: &str) -> Result<()> {
        let unused = self.unused_under(prefix);
        if let Some(first) = unused.first() {
            return Err(WeightError::Unused { prefix: prefix.to_string(), count: unused.len(), first: first.clone() }.into());
        }
        Ok(())
    }

    /// Unused tensors grouped by component (the first two name segments), for a one-line report.
    pub fn unused_summary(&self) -> BTreeMap<String, usize> {
        let mut groups = BTreeMap::new();
        for name in self.unused_under("") {
            let key: Vec<&str> = name.splitn(3, '.').take(2).collect();
            *groups.entry(key.join(".")).or_insert(0) += 1;
        }
        groups
    }
}

/// A prefixed view of a [`WeightStore`]; paths equal checkpoint paths.
#[derive(Clone)]
pub struct Weights {
    store: WeightStore,
    prefix: String,
}

impl Weights {
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { part.to_string() } else { format!("{}.{}", self.prefix, part) };
        Self { store: self.store.clone(), prefix }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.store.tensor(&self.path(name), shape)
    }

    /// A weight matrix, quantized when the source stores it quantized (see [`WeightStore::matrix`]).
    pub fn matrix(&self, shape: &[usize], name: &str) -> Result<WeightMatrix> {
        self.store.matrix(&self.path(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn store(&self) -> &WeightStore {
        &self.store
    }
}

/// The safetensors files of a checkpoint directory, in index order.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            bail!("{} lists no shards", index.display());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "no weights in {}: expected model.safetensors, model.safetensors.index.json or GGUF files (thinker-*.gguf)",
        dir.display()
    )
}
