//! The value types of the GGUF container: ggml tensor types ([`GgmlType`]) and metadata values
//! ([`Value`], [`ArrayType`]), shared by the reader and the writer.

use anyhow::{bail, Result};

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
    pub(super) fn code(self) -> u32 {
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

    pub(super) fn from_code(c: u32) -> Result<Self> {
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
    pub(super) fn code(&self) -> u32 {
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
