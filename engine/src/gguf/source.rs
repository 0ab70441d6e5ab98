//! GGUF files as a weight source addressed by checkpoint (Hugging Face) names.
//!
//! The loaders of every stage ask for `thinker.model.layers.3.self_attn.q_proj.weight`; this index
//! maps that name through the file's table ([`super::names`]) to `blk.3.attn_q.weight` (or to expert
//! `e` of a stacked tensor, or to the two temporal slices of the vision patch embedding) and hands
//! back either a dense f32 tensor or, for quantized matrices, a `QTensor` over the file map.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::format::{GgmlType, GgufFile, TensorInfo};
use super::names::{fill, gguf_rule, Captures, FileKind, Layout, MMPROJ_GENERATED};
use super::quant;
use super::storage::mapped_qtensor;

/// Where a checkpoint tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    layout: Layout,
    /// GGUF tensor indices (two for a temporal split, else one).
    parts: Vec<usize>,
    /// Slot in a stacked tensor.
    index: Option<usize>,
    shape: Vec<usize>,
}

/// One opened GGUF file and its kind.
pub struct SourceFile {
    pub kind: FileKind,
    pub file: GgufFile,
}

/// The tensors of one or more GGUF files under checkpoint names.
pub struct GgufSource {
    files: Vec<SourceFile>,
    entries: BTreeMap<String, Entry>,
    /// GGUF tensors that no table line claims (ignored), as `file: name`.
    unmapped: Vec<String>,
}

impl GgufSource {
    /// Indexes already opened files.
    pub fn new(files: Vec<SourceFile>) -> Result<Self> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut unmapped = Vec::new();
        for (fi, sf) in files.iter().enumerate() {
            for (ti, info) in sf.file.tensors().iter().enumerate() {
                let Some((rule, caps)) = gguf_rule(sf.kind, &info.name) else {
                    if !(sf.kind == FileKind::Mmproj
                        && MMPROJ_GENERATED.contains(&info.name.as_str()))
                    {
                        unmapped.push(format!("{}: {}", sf.file.path().display(), info.name));
                    }
                    continue;
                };
                let torch = info.torch_shape();
                match rule.layout {
                    Layout::Plain => {
                        let hf = fill(rule.hf, caps)?;
                        insert(
                            &mut entries,
                            hf,
                            Entry {
                                file: fi,
                                layout: rule.layout,
                                parts: vec![ti],
                                index: None,
                                shape: torch,
                            },
                        )?;
                    }
                    Layout::Bias3d => {
                        let hf = fill(rule.hf, caps)?;
                        let shape = vec![info.elements()];
                        insert(
                            &mut entries,
                            hf,
                            Entry {
                                file: fi,
                                layout: rule.layout,
                                parts: vec![ti],
                                index: None,
                                shape,
                            },
                        )?;
                    }
                    Layout::Stacked => {
                        if torch.len() < 2 {
                            bail!(
                                "{}: stacked tensor `{}` has {} dimension(s)",
                                sf.file.path().display(),
                                info.name,
                                torch.len()
                            );
                        }
                        for e in 0..torch[0] {
                            let hf = fill(rule.hf, Captures { e: Some(e), ..caps })?;
                            let entry = Entry {
                                file: fi,
                                layout: rule.layout,
                                parts: vec![ti],
                                index: Some(e),
                                shape: torch[1..].to_vec(),
                            };
                            insert(&mut entries, hf, entry)?;
                        }
                    }
                    Layout::TemporalSlice(t) => {
                        let hf = fill(rule.hf, caps)?;
                        let entry = entries.entry(hf).or_insert_with(|| Entry {
                            file: fi,
                            layout: rule.layout,
                            parts: Vec::new(),
                            index: None,
                            shape: Vec::new(),
                        });
                        if entry.parts.len() <= t {
                            entry.parts.resize(t + 1, usize::MAX);
                        }
                        entry.parts[t] = ti;
                        if torch.len() != 4 {
                            bail!(
                                "{}: `{}` should be a 4-D conv kernel slice",
                                sf.file.path().display(),
                                info.name
                            );
                        }
                        entry.shape =
                            vec![torch[0], torch[1], entry.parts.len(), torch[2], torch[3]];
                    }
                }
            }
        }
        for (name, e) in &entries {
            if e.parts.contains(&usize::MAX) {
                bail!(
                    "{}: `{name}` is missing one of its temporal slices",
                    files[e.file].file.path().display()
                );
            }
        }
        Ok(Self {
            files,
            entries,
            unmapped,
        })
    }

    /// Opens one file of a known kind.
    pub fn open(kind: FileKind, path: &Path) -> Result<Self> {
        Self::new(vec![SourceFile {
            kind,
            file: GgufFile::open(path)?,
        }])
    }

    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// The file of `kind`, if it was opened.
    pub fn file(&self, kind: FileKind) -> Option<&GgufFile> {
        self.files.iter().find(|f| f.kind == kind).map(|f| &f.file)
    }

    pub fn unmapped(&self) -> &[String] {
        &self.unmapped
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// PyTorch shape of checkpoint tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .with_context(|| format!("tensor `{name}` is not in the GGUF files"))
    }

    fn info(&self, e: &Entry, part: usize) -> &TensorInfo {
        &self.files[e.file].file.tensors()[e.parts[part]]
    }

    /// The storage type of checkpoint tensor `name`.
    pub fn ggml_type(&self, name: &str) -> Result<GgmlType> {
        let e = self.entry(name)?;
        Ok(self.info(e, 0).dtype)
    }

    /// The GGUF tensor(s) that hold `name`, for messages.
    pub fn gguf_names(&self, name: &str) -> Vec<String> {
        match self.entries.get(name) {
            Some(e) => (0..e.parts.len())
                .map(|p| self.info(e, p).name.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Byte range (absolute offset, length) of entry `e`'s values in part `p`.
    fn range(&self, e: &Entry, part: usize) -> (usize, usize) {
        let info = self.info(e, part);
        match e.index {
            Some(i) => {
                let n = info.dims[info.dims.len() - 1];
                let per = info.size_in_bytes() / n;
                (info.offset + i * per, per)
            }
            None => (info.offset, info.size_in_bytes()),
        }
    }

    /// Values of `name` as f32 in PyTorch layout, with its shape.
    pub fn values(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.entry(name)?;
        let file = &self.files[e.file].file;
        let mut data = Vec::with_capacity(e.shape.iter().product());
        let mut slices = Vec::with_capacity(e.parts.len());
        for p in 0..e.parts.len() {
            let info = self.info(e, p);
            let (offset, len) = self.range(e, p);
            let count = len / info.dtype.type_size() * info.dtype.block_size();
            let bytes = &file.map()[offset..offset + len];
            slices.push(
                quant::decode(bytes, info.dtype, count)
                    .with_context(|| format!("tensor `{}`", info.name))?,
            );
            file.release_range(offset, len);
        }
        if let Layout::TemporalSlice(_) = e.layout {
            // [O, I, H, W] per slice → [O, I, T, H, W].
            let (o, i, t, h, w) = (e.shape[0], e.shape[1], e.shape[2], e.shape[3], e.shape[4]);
            for oi in 0..o * i {
                for s in slices.iter().take(t) {
                    data.extend_from_slice(&s[oi * h * w..(oi + 1) * h * w]);
                }
            }
        } else {
            data = slices.pop().unwrap_or_default();
        }
        Ok((data, e.shape.clone()))
    }

    /// `name` as a dense f32 tensor.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (data, shape) = self.values(name)?;
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// `name` as a quantized matrix over the file map, when it is stored in a block-quantized type
    /// as one 2-D matrix (or one slot of a stacked tensor); `None` when it should be loaded dense.
    pub fn qmatrix(&self, name: &str) -> Result<Option<QTensor>> {
        let e = self.entry(name)?;
        let info = self.info(e, 0);
        if !info.dtype.is_quantized()
            || e.shape.len() != 2
            || !matches!(e.layout, Layout::Plain | Layout::Stacked)
        {
            return Ok(None);
        }
        let (offset, _) = self.range(e, 0);
        let q = mapped_qtensor(
            self.files[e.file].file.map().clone(),
            offset,
            info.dtype,
            &e.shape,
        )
        .with_context(|| {
            format!(
                "tensor `{}` of {}",
                info.name,
                self.files[e.file].file.path().display()
            )
        })?;
        Ok(Some(q))
    }
}

fn insert(entries: &mut BTreeMap<String, Entry>, hf: String, entry: Entry) -> Result<()> {
    if entries.insert(hf.clone(), entry).is_some() {
        bail!("two GGUF tensors map to the checkpoint tensor `{hf}`");
    }
    Ok(())
}
