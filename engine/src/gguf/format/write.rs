//! Writing GGUF files: [`GgufWriter`] writes the header for tensors whose sizes are known up
//! front, then streams their data in order.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{GgmlType, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION};

/// A tensor to be written: name, ggml dims (innermost first), type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
}

impl TensorSpec {
    pub fn size_in_bytes(&self) -> usize {
        self.dtype.bytes_for(self.dims.iter().product())
    }
}

/// Writes a GGUF file: [`GgufWriter::create`] writes the header for every tensor, then
/// [`GgufWriter::write`] streams the data of the tensors in order and [`GgufWriter::finish`] checks
/// that every byte was given.
pub struct GgufWriter {
    out: BufWriter<File>,
    path: PathBuf,
    specs: Vec<TensorSpec>,
    alignment: usize,
    current: usize,
    written_in_current: usize,
    total_written: u64,
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_scalar(w: &mut impl Write, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&[*x as u8])?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => write_str(w, s)?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Array(..) => bail!("nested GGUF arrays are not supported"),
    }
    Ok(())
}

impl GgufWriter {
    /// Creates `path` and writes the header: `metadata` in the given order, then `tensors`.
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
    ) -> Result<Self> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => v.as_u64().context("general.alignment must be an integer")? as usize,
            None => DEFAULT_ALIGNMENT,
        };
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                bail!("tensor `{}` is written twice", t.name);
            }
            if t.name.len() >= 64 {
                bail!("tensor name `{}` is longer than ggml's 63 bytes", t.name);
            }
            if t.dims
                .first()
                .is_some_and(|d| d % t.dtype.block_size() != 0)
            {
                bail!(
                    "tensor `{}`: rows of {} values cannot be stored as {}",
                    t.name,
                    t.dims[0],
                    t.dtype.name()
                );
            }
        }
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(GGUF_MAGIC)?;
        out.write_all(&GGUF_VERSION.to_le_bytes())?;
        out.write_all(&(tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_str(&mut out, key)?;
            out.write_all(&value.code().to_le_bytes())?;
            match value {
                Value::Array(et, items) => {
                    out.write_all(&et.code().to_le_bytes())?;
                    out.write_all(&(items.len() as u64).to_le_bytes())?;
                    for item in items {
                        if item.code() != et.code() {
                            bail!("metadata `{key}`: array items must all be of one type");
                        }
                        write_scalar(&mut out, item)?;
                    }
                }
                v => write_scalar(&mut out, v)?,
            }
        }
        let mut offset = 0usize;
        for t in &tensors {
            write_str(&mut out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for &d in &t.dims {
                out.write_all(&(d as u64).to_le_bytes())?;
            }
            out.write_all(&t.dtype.to_u32().to_le_bytes())?;
            out.write_all(&(offset as u64).to_le_bytes())?;
            offset = (offset + t.size_in_bytes()).div_ceil(alignment) * alignment;
        }
        out.flush()?;
        let pos = out.get_mut().stream_position()? as usize;
        let pad = pos.div_ceil(alignment) * alignment - pos;
        out.write_all(&vec![0u8; pad])?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            specs: tensors,
            alignment,
            current: 0,
            written_in_current: 0,
            total_written: 0,
        })
    }

    /// The tensor whose bytes come next, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.current)
    }

    /// Appends bytes of the current tensor; a tensor may be given in several chunks.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut bytes = bytes;
        while !bytes.is_empty() {
            let Some(spec) = self.specs.get(self.current) else {
                bail!(
                    "{}: more tensor data than the header announced",
                    self.path.display()
                );
            };
            let need = spec.size_in_bytes() - self.written_in_current;
            let n = need.min(bytes.len());
            self.out.write_all(&bytes[..n])?;
            self.written_in_current += n;
            self.total_written += n as u64;
            bytes = &bytes[n..];
            if self.written_in_current == spec.size_in_bytes() {
                let pad = spec.size_in_bytes().div_ceil(self.alignment) * self.alignment
                    - spec.size_in_bytes();
                self.out.write_all(&vec![0u8; pad])?;
                self.current += 1;
                self.written_in_current = 0;
                // Zero-sized tensors complete immediately.
                while self
                    .specs
                    .get(self.current)
                    .is_some_and(|s| s.size_in_bytes() == 0)
                {
                    self.current += 1;
                }
            }
        }
        Ok(())
    }

    /// Checks that every tensor was written in full and flushes the file to disk.
    pub fn finish(mut self) -> Result<u64> {
        if self.current != self.specs.len() {
            bail!(
                "{}: tensor `{}` was not written in full",
                self.path.display(),
                self.specs[self.current].name
            );
        }
        self.out.flush()?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot flush {}: {e}", self.path.display()))?;
        file.sync_all()?;
        Ok(self.total_written)
    }
}
