//! The GGUF container (version 3), read and written by our own code.
//!
//! Layout (little endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/values, the tensor infos (name, `u32` n_dims, `u64` dims innermost first, `u32`
//! ggml type, `u64` offset relative to the data section), padding to the alignment
//! (`general.alignment`, default 32), then the tensor data, each tensor starting at an aligned offset.
//!
//! [`GgufFile`] memory-maps a file and parses its header; tensor bytes are borrowed from the map.
//! [`GgufWriter`] writes a header for tensors whose sizes are known up front, then streams the
//! tensor data in order, chunk by chunk, so a converter never holds more than one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;

/// ggml tensor types (the numbering of `ggml.h`). Only those with a fixed block layout that this
/// engine can read are listed; others are rejected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Result<Self> {
        Ok(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            16..=23 | 29 => {
                bail!("ggml type {v} (an IQ quantization) is not supported; use Q8_0 or a K-quant")
            }
            other => bail!("unknown ggml type {other}"),
        })
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes of a tensor of `elements` values (a whole number of rows).
    pub fn bytes_for(self, elements: usize) -> usize {
        elements / self.block_size() * self.type_size()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q8_1 => "q8_1",
            Self::Q2K => "q2_k",
            Self::Q3K => "q3_k",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Q8K => "q8_k",
            Self::BF16 => "bf16",
        }
    }

    /// The same type in candle's enumeration.
    pub fn to_candle(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as D;
        match self {
            Self::F32 => D::F32,
            Self::F16 => D::F16,
            Self::Q4_0 => D::Q4_0,
            Self::Q4_1 => D::Q4_1,
            Self::Q5_0 => D::Q5_0,
            Self::Q5_1 => D::Q5_1,
            Self::Q8_0 => D::Q8_0,
            Self::Q8_1 => D::Q8_1,
            Self::Q2K => D::Q2K,
            Self::Q3K => D::Q3K,
            Self::Q4K => D::Q4K,
            Self::Q5K => D::Q5K,
            Self::Q6K => D::Q6K,
            Self::Q8K => D::Q8K,
            Self::BF16 => D::BF16,
        }
    }
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a file whose big matrices are `t`.
pub fn file_type_code(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4K => 15,
        GgmlType::Q6K => 18,
        _ => 7,
    }
}

/// A metadata value. Arrays hold values of one type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ArrayType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The element type of an array value (GGUF stores it even for empty arrays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    U64,
    I64,
    F64,
}

impl ArrayType {
    fn code(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    fn from_code(c: u32) -> Result<Self> {
        Ok(match c {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            9 => bail!("nested GGUF arrays are not supported"),
            other => bail!("unknown GGUF value type {other}"),
        })
    }
}

impl Value {
    fn code(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(..) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    pub fn strings<S: AsRef<str>>(items: &[S]) -> Self {
        Self::Array(
            ArrayType::String,
            items
                .iter()
                .map(|s| Self::String(s.as_ref().to_string()))
                .collect(),
        )
    }

    pub fn i32s(items: &[i32]) -> Self {
        Self::Array(
            ArrayType::I32,
            items.iter().map(|&v| Self::I32(v)).collect(),
        )
    }

    pub fn u32s(items: &[u32]) -> Self {
        Self::Array(
            ArrayType::U32,
            items.iter().map(|&v| Self::U32(v)).collect(),
        )
    }

    pub fn f32s(items: &[f32]) -> Self {
        Self::Array(
            ArrayType::F32,
            items.iter().map(|&v| Self::F32(v)).collect(),
        )
    }

    pub fn bools(items: &[bool]) -> Self {
        Self::Array(
            ArrayType::Bool,
            items.iter().map(|&v| Self::Bool(v)).collect(),
        )
    }

    /// Any integer value as `u64` (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let dir = std::env::temp_dir().join(format!("omni-gguf-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("test".into()),
            ),
            ("a.list".to_string(), Value::i32s(&[1, -2, 3])),
            ("a.strings".to_string(), Value::strings(&["x", "yz"])),
            ("a.f".to_string(), Value::F32(0.5)),
        ];
        let specs = vec![
            TensorSpec {
                name: "w".into(),
                dims: vec![32, 2],
                dtype: GgmlType::Q8_0,
            },
            TensorSpec {
                name: "b".into(),
                dims: vec![3],
                dtype: GgmlType::F32,
            },
        ];
        let mut w = GgufWriter::create(&path, &meta, specs).unwrap();
        w.write(&[1u8; 34]).unwrap();
        w.write(&[2u8; 34]).unwrap();
        w.write(&[0u8; 12]).unwrap();
        w.finish().unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture"), Some("test"));
        assert_eq!(f.get("a.list"), Some(&Value::i32s(&[1, -2, 3])));
        assert_eq!(f.get("a.strings"), Some(&Value::strings(&["x", "yz"])));
        let t = f.tensor("w").unwrap();
        assert_eq!(t.offset % 32, 0);
        assert_eq!(&f.bytes(t)[..34], &[1u8; 34]);
        assert_eq!(&f.bytes(t)[34..], &[2u8; 34]);
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset % 32, 0);
        assert_eq!(f.bytes(b), &[0u8; 12]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
