//! Interleaved multimodal RoPE (M-RoPE) of the Thinker and Talker.
//!
//! Reference: `Qwen3OmniMoeThinkerTextRotaryEmbedding` (`recomposition_frequencies`) in
//! transformers' `modeling_qwen3_omni_moe.py`. Each token has three positions (temporal, height,
//! width). Frequency index `i` of the `head_dim/2` rotary frequencies takes its angle from the
//! temporal stream, except indices `1, 4, 7, … < 3·section[1]` (height) and `2, 5, 8, … < 3·section[2]`
//! (width). The angles are then duplicated (`cat(freqs, freqs)`) and applied with `rotate_half`,
//! i.e. NeoX pairing (`x[i]` with `x[i + head_dim/2]`). For text all three streams are equal, which
//! is ordinary RoPE.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

/// Which position stream (0 = temporal, 1 = height, 2 = width) drives frequency index `i`.
pub fn stream_of_frequency(i: usize, mrope_section: &[usize]) -> usize {
    if mrope_section.len() >= 3 {
        if i % 3 == 1 && i < 3 * mrope_section[1] {
            return 1;
        }
        if i % 3 == 2 && i < 3 * mrope_section[2] {
            return 2;
        }
    }
    0
}

/// Precomputed inverse frequencies for one head size.
#[derive(Debug, Clone)]
pub struct MultimodalRope {
    inv_freq: Vec<f32>,
    streams: Vec<usize>,
    head_dim: usize,
}

impl MultimodalRope {
    pub fn new(head_dim: usize, theta: f64, mrope_section: &[usize]) -> Result<Self> {
        if head_dim % 2 != 0 {
            bail!("rotary head_dim {head_dim} must be even");
        }
        let half = head_dim / 2;
        // Same arithmetic as the reference: base ** (arange(0, dim, 2).float() / dim) in float32.
        let base = theta as f32;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        let streams = (0..half).map(|i| stream_of_frequency(i, mrope_section)).collect();
        Ok(Self { inv_freq, streams, head_dim })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `cos`, `sin` of shape `[seq, head_dim]` for positions `[3][seq]` (temporal, height, width).
    pub fn cos_sin(&self, positions: &[Vec<i64>; 3], device: &Device) -> Result<(Tensor, Tensor)> {
        let seq = positions[0].len();
        if positions[1].len() != seq || positions[2].len() != seq {
            bail!("M-RoPE position streams differ in length");
        }
        let half = self.head_dim / 2;
        let mut cos = vec![0f32; seq * self.head_dim];
        let mut sin = vec![0f32; seq * self.head_dim];
        for t in 0..seq {
            let row = t * self.head_dim;
            for i in 0..half {
                let pos = positions[self.streams[i]][t] as f32;
                let angle = pos * self.inv_freq[i];
                let (s, c) = angle.sin_cos();
                cos[row + i] = c;
                cos[row + half + i] = c;
                sin[row + i] = s;
                sin[row + half + i] = s;
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, self.head_dim), device)?,
            Tensor::from_vec(sin, (seq, self.head_dim), device)?,
        ))
    }
}

/// Applies the rotation to `x` of shape `[batch, heads, seq, head_dim]` with `cos`/`sin` `[seq, head_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Text-only positions: the three streams equal `start..start+len`.
pub fn text_positions(start: i64, len: usize) -> [Vec<i64>; 3] {
    let p: Vec<i64> = (start..start + len as i64).collect();
    [p.clone(), p.clone(), p]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_sections_interleave_like_the_reference() {
        // mrope_section [24, 20, 20] over 64 frequencies: H takes 1,4,..,58; W takes 2,5,..,59.
        let s = [24, 20, 20];
        let streams: Vec<usize> = (0..64).map(|i| stream_of_frequency(i, &s)).collect();
        assert_eq!(&streams[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(streams[58], 1);
        assert_eq!(streams[59], 2);
        assert_eq!(streams[60], 0);
        assert_eq!(streams[61], 0);
        assert_eq!(streams[62], 0);
        assert_eq!(streams.iter().filter(|&&x| x == 1).count(), 20);
        assert_eq!(streams.iter().filter(|&&x| x == 2).count(), 20);
        assert_eq!(streams.iter().filter(|&&x| x == 0).count(), 24);
    }

    #[test]
    fn text_positions_reduce_to_plain_rope() {
        let rope = MultimodalRope::new(8, 10000.0, &[2, 1, 1]).unwrap();
        let (cos, sin) = rope.cos_sin(&text_positions(3, 2), &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let sin = sin.to_vec2::<f32>().unwrap();
        for (t, pos) in [3f32, 4.0].iter().enumerate() {
            for i in 0..4 {
                let angle = pos * (1.0f32 / 10000f32.powf((2 * i) as f32 / 8.0));
                assert!((cos[t][i] - angle.cos()).abs() < 1e-6);
                assert!((sin[t][i + 4] - angle.sin()).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn distinct_streams_pick_their_own_angles() {
        let rope = MultimodalRope::new(12, 100.0, &[2, 2, 2]).unwrap();
        let pos = [vec![5i64], vec![7], vec![11]];
        let (cos, _) = rope.cos_sin(&pos, &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let inv = |i: usize| 1.0f32 / 100f32.powf((2 * i) as f32 / 12.0);
        assert!((cos[0][0] - (5.0 * inv(0)).cos()).abs() < 1e-6);
        assert!((cos[0][1] - (7.0 * inv(1)).cos()).abs() < 1e-6);
        assert!((cos[0][2] - (11.0 * inv(2)).cos()).abs() < 1e-6);
        assert!((cos[0][3] - (5.0 * inv(3)).cos()).abs() < 1e-6);
        assert!((cos[0][4] - (7.0 * inv(4)).cos()).abs() < 1e-6);
        assert!((cos[0][5] - (11.0 * inv(5)).cos()).abs() < 1e-6);
    }

    #[test]
    fn rotation_preserves_norm() {
        let rope = MultimodalRope::new(4, 10000.0, &[]).unwrap();
        let (cos, sin) = rope.cos_sin(&text_positions(0, 3), &Device::Cpu).unwrap();
        let x = Tensor::from_vec((0..12).map(|v| v as f32 * 0.3 - 1.0).collect::<Vec<_>>(), (1, 1, 3, 4), &Device::Cpu)
            .unwrap();
        let y = apply_rotary(&x, &cos, &sin).unwrap();
        let nx = x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let ny = y.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((nx - ny).abs() < 1e-4);
    }
}
