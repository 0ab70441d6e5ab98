//! The checkpoint, read tensor by tensor: the safetensors files indexed from their headers, read
//! with positioned reads (no mmap), so resident memory stays at one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use serde_json::Value as Json;

use crate::weights::checkpoint_files;

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
