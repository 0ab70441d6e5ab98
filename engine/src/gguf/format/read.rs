//! Reading GGUF files: [`GgufFile`] memory-maps a file, parses its header and borrows tensor
//! bytes from the map.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use super::{ArrayType, GgmlType, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// One tensor of a file: `dims` in ggml order (innermost first), `offset` absolute in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    pub offset: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.dtype.bytes_for(self.elements())
    }

    /// The shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, Value>,
    /// Metadata keys in file order.
    key_order: Vec<String>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self
            .pos
            .checked_add(n)
            .is_none_or(|end| end > self.data.len())
        {
            bail!(
                "{}: truncated GGUF header (needed {n} bytes at offset {})",
                self.path.display(),
                self.pos
            );
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).with_context(|| {
            format!(
                "{}: a GGUF string at offset {} is not UTF-8",
                self.path.display(),
                self.pos
            )
        })
    }
    fn scalar(&mut self, t: ArrayType) -> Result<Value> {
        Ok(match t {
            ArrayType::U8 => Value::U8(self.u8()?),
            ArrayType::I8 => Value::I8(self.u8()? as i8),
            ArrayType::U16 => Value::U16(self.u16()?),
            ArrayType::I16 => Value::I16(self.u16()? as i16),
            ArrayType::U32 => Value::U32(self.u32()?),
            ArrayType::I32 => Value::I32(self.u32()? as i32),
            ArrayType::F32 => Value::F32(f32::from_bits(self.u32()?)),
            ArrayType::Bool => Value::Bool(self.u8()? != 0),
            ArrayType::String => Value::String(self.string()?),
            ArrayType::U64 => Value::U64(self.u64()?),
            ArrayType::I64 => Value::I64(self.u64()? as i64),
            ArrayType::F64 => Value::F64(f64::from_bits(self.u64()?)),
        })
    }
    fn value(&mut self, code: u32) -> Result<Value> {
        if code == 9 {
            let et = ArrayType::from_code(self.u32()?)?;
            let n = self.u64()? as usize;
            if n > self.data.len() {
                bail!(
                    "{}: GGUF array length {n} is larger than the file",
                    self.path.display()
                );
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(self.scalar(et)?);
            }
            return Ok(Value::Array(et, items));
        }
        self.scalar(ArrayType::from_code(code)?)
    }
}

impl GgufFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map; a concurrent writer would corrupt tensors, as in every mmap loader.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self> {
        let mut c = Cursor {
            data: &map[..],
            pos: 0,
            path,
        };
        if c.take(4).ok() != Some(&GGUF_MAGIC[..]) {
            bail!("{} is not a GGUF file (bad magic)", path.display());
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!(
                "{}: GGUF version {version} is not supported (expected 3)",
                path.display()
            );
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        let mut key_order = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let code = c.u32()?;
            let value = c
                .value(code)
                .with_context(|| format!("{}: metadata key `{key}`", path.display()))?;
            key_order.push(key.clone());
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().context("general.alignment must be an integer")? as usize,
            None => DEFAULT_ALIGNMENT,
        };
        if alignment == 0 || !alignment.is_power_of_two() {
            bail!(
                "{}: general.alignment {alignment} is not a power of two",
                path.display()
            );
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                bail!(
                    "{}: tensor `{name}` has {n_dims} dimensions (at most 4)",
                    path.display()
                );
            }
            let dims = (0..n_dims)
                .map(|_| c.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let dtype = GgmlType::from_u32(c.u32()?)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
            let offset = c.u64()? as usize;
            infos.push((name, dims, dtype, offset));
        }
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = BTreeMap::new();
        for (name, dims, dtype, rel) in infos {
            let info = TensorInfo {
                name: name.clone(),
                dims,
                dtype,
                offset: data_offset + rel,
            };
            if info
                .dims
                .first()
                .is_some_and(|d| d % dtype.block_size() != 0)
            {
                bail!(
                    "{}: tensor `{name}` rows of {} values are not a multiple of the {} block size {}",
                    path.display(),
                    info.dims[0],
                    dtype.name(),
                    dtype.block_size()
                );
            }
            let end = info.offset + info.size_in_bytes();
            if end > map.len() {
                bail!("{}: tensor `{name}` ends at byte {end}, past the end of the file ({} bytes); the file is truncated", path.display(), map.len());
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                bail!("{}: tensor `{name}` appears twice", path.display());
            }
            tensors.push(info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            alignment,
            data_offset,
            metadata,
            key_order,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    pub fn file_size(&self) -> usize {
        self.map.len()
    }

    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn key_order(&self) -> &[String] {
        &self.key_order
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// A required integer key, with an error naming the file and key.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key).with_context(|| {
            format!(
                "{}: metadata key `{key}` is missing or not an integer",
                self.path.display()
            )
        })
    }

    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.get_f64(key).with_context(|| {
            format!(
                "{}: metadata key `{key}` is missing or not a number",
                self.path.display()
            )
        })
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.size_in_bytes()]
    }

    /// Lets the kernel drop the pages of `map[offset..offset + len]` from this process's resident
    /// set (after the values were copied out), so a dense copy does not count twice.
    pub fn release_range(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            // SAFETY: the map is private and read-only; dropped pages are re-read from the file if
            // touched again, so borrowers of the same range still see the same bytes.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}
