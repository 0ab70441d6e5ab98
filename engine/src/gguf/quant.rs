//! Encoding f32 values as ggml types (Q8_0 exactly as ggml's reference quantizer does it, F16,
//! BF16, F32) and decoding any supported type back to f32.
//!
//! Q8_0: blocks of 32 values along a row, each `{f16 d; i8 qs[32]}` (34 bytes) with
//! `d = max|x| / 127`, `qs = round(x / d)` (round half away from zero), value = `d·q`; this is
//! `quantize_row_q8_0_ref` of ggml and `gguf-py`'s `quants.Q8_0`, so our files are byte-identical
//! to theirs for the same input.

use anyhow::{bail, Result};
use candle_core::quantized::k_quants;
use half::{bf16, f16};

use super::format::GgmlType;

pub const QK8_0: usize = 32;

/// Appends the Q8_0 encoding of `xs` (a multiple of 32 values) to `out`.
pub fn quantize_q8_0(xs: &[f32], out: &mut Vec<u8>) {
    debug_assert!(xs.len() % QK8_0 == 0);
    out.reserve(xs.len() / QK8_0 * 34);
    for block in xs.chunks_exact(QK8_0) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for &x in block {
            // `roundf`: half away from zero, as Rust's `f32::round`.
            out.push((x * id).round() as i8 as u8);
        }
    }
}

/// Encodes `xs` (one tensor's values, row-major, rows along the innermost axis) as `dtype`.
pub fn encode(xs: &[f32], dtype: GgmlType, out: &mut Vec<u8>) -> Result<()> {
    match dtype {
        GgmlType::F32 => {
            out.reserve(xs.len() * 4);
            for &x in xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            out.reserve(xs.len() * 2);
            for &x in xs {
                out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            out.reserve(xs.len() * 2);
            for &x in xs {
                out.extend_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            if xs.len() % QK8_0 != 0 {
                bail!("Q8_0 needs a multiple of 32 values, got {}", xs.len());
            }
            quantize_q8_0(xs, out)
        }
        other => bail!(
            "writing {} is not supported (write q8_0, f16, bf16 or f32)",
            other.name()
        ),
    }
    Ok(())
}

fn cast_blocks<T>(bytes: &[u8]) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 || (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        bail!(
            "misaligned or truncated tensor data ({} bytes)",
            bytes.len()
        );
    }
    // SAFETY: the block types are plain `repr(C)` data (f16/u8/i8 fields), any bit pattern is valid.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

fn to_float<T: k_quants::GgmlType>(bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let blocks = cast_blocks::<T>(bytes)?;
    let mut ys = vec![0f32; n];
    T::to_float(blocks, &mut ys);
    Ok(ys)
}

/// Decodes `n` values of type `dtype` to f32.
pub fn decode(bytes: &[u8], dtype: GgmlType, n: usize) -> Result<Vec<f32>> {
    if bytes.len() != dtype.bytes_for(n) {
        bail!(
            "{} bytes do not hold {n} {} values",
            bytes.len(),
            dtype.name()
        );
    }
    use k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
        BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1,
    };
    Ok(match dtype {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::Q4_0 => to_float::<BlockQ4_0>(bytes, n)?,
        GgmlType::Q4_1 => to_float::<BlockQ4_1>(bytes, n)?,
        GgmlType::Q5_0 => to_float::<BlockQ5_0>(bytes, n)?,
        GgmlType::Q5_1 => to_float::<BlockQ5_1>(bytes, n)?,
        GgmlType::Q8_0 => to_float::<BlockQ8_0>(bytes, n)?,
        GgmlType::Q8_1 => to_float::<BlockQ8_1>(bytes, n)?,
        GgmlType::Q2K => to_float::<BlockQ2K>(bytes, n)?,
        GgmlType::Q3K => to_float::<BlockQ3K>(bytes, n)?,
        GgmlType::Q4K => to_float::<BlockQ4K>(bytes, n)?,
        GgmlType::Q5K => to_float::<BlockQ5K>(bytes, n)?,
        GgmlType::Q6K => to_float::<BlockQ6K>(bytes, n)?,
        GgmlType::Q8K => to_float::<BlockQ8K>(bytes, n)?,
    })
}

/// Whether a row of `row_len` values can be stored as `dtype`.
pub fn fits(dtype: GgmlType, row_len: usize) -> bool {
    row_len % dtype.block_size() == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::GgmlType as _;

    #[test]
    fn q8_0_matches_candle_and_round_trips() {
        let xs: Vec<f32> = (0..64)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0 - 0.5)
            .collect();
        let mut ours = Vec::new();
        quantize_q8_0(&xs, &mut ours);
        assert_eq!(ours.len(), 68);
        let mut theirs = vec![k_quants::BlockQ8_0::zeros(); 2];
        k_quants::BlockQ8_0::from_float(&xs, &mut theirs);
        let theirs_bytes = unsafe { std::slice::from_raw_parts(theirs.as_ptr() as *const u8, 68) };
        assert_eq!(ours, theirs_bytes);
        let back = decode(&ours, GgmlType::Q8_0, 64).unwrap();
        for (a, b) in xs.iter().zip(&back) {
            assert!((a - b).abs() <= 3.6 / 127.0, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let mut out = Vec::new();
        quantize_q8_0(&[0.0; 32], &mut out);
        assert!(out.iter().all(|&b| b == 0));
    }
}
