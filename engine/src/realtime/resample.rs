//! Streaming mono resampling between a device rate and the model's rates (16 kHz in, 24 kHz out).
//!
//! rubato's [`FftFixedIn`] (synchronous, fixed ratio): samples are collected into its fixed input
//! chunk (about 10 ms) and each full chunk is converted; buffers are allocated once. Equal rates are a
//! plain copy, so a 16 kHz source reaches the model bit for bit (the `omni run --audio` equality).

use anyhow::{Context, Result};
use rubato::{FftFixedIn, Resampler};

/// A mono stream resampler.
pub struct StreamResampler {
    inner: Option<Inner>,
    pub from_rate: u32,
    pub to_rate: u32,
}

struct Inner {
    rs: FftFixedIn<f32>,
    pending: Vec<f32>,
    out: Vec<Vec<f32>>,
}

impl StreamResampler {
    pub fn new(from_rate: u32, to_rate: u32) -> Result<Self> {
        anyhow::ensure!(
            from_rate > 0 && to_rate > 0,
            "sample rates must be positive ({from_rate} -> {to_rate})"
        );
        let inner = if from_rate == to_rate {
            None
        } else {
            let chunk = (from_rate as usize / 100).max(1);
            let rs = FftFixedIn::<f32>::new(from_rate as usize, to_rate as usize, chunk, 1, 1)
                .with_context(|| format!("cannot build a {from_rate} -> {to_rate} Hz resampler"))?;
            let out = vec![vec![0.0f32; rs.output_frames_max()]];
            let pending = Vec::with_capacity(rs.input_frames_max());
            Some(Inner { rs, pending, out })
        };
        Ok(Self {
            inner,
            from_rate,
            to_rate,
        })
    }

    /// Converts `input`, appending whatever is ready to `output`.
    pub fn process(&mut self, mut input: &[f32], output: &mut Vec<f32>) -> Result<()> {
        let Some(inner) = &mut self.inner else {
            output.extend_from_slice(input);
            return Ok(());
        };
        while !input.is_empty() {
            let need = inner.rs.input_frames_next() - inner.pending.len();
            let take = need.min(input.len());
            inner.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if inner.pending.len() == inner.rs.input_frames_next() {
                let (_, produced) = inner
                    .rs
                    .process_into_buffer(&[&inner.pending[..]], &mut inner.out, None)
                    .context("resampling failed")?;
                output.extend_from_slice(&inner.out[0][..produced]);
                inner.pending.clear();
            }
        }
        Ok(())
    }

    /// Drops buffered input and the filter state (after a flush: the next answer starts clean).
    pub fn reset(&mut self) {
        if let Some(inner) = &mut self.inner {
            inner.rs.reset();
            inner.pending.clear();
        }
    }

    /// Output samples of delay the resampler adds.
    pub fn delay_frames(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.rs.output_delay())
    }

    /// Pushes zeros until everything buffered (pending input and the filter delay) is out, then
    /// resets: the end of an answer. The tail may carry a few ms of trailing silence.
    pub fn flush(&mut self, output: &mut Vec<f32>) -> Result<()> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let chunk = inner.rs.input_frames_next();
        let delay_in = inner.rs.output_delay() * self.from_rate as usize / self.to_rate as usize + 1;
        let n = (chunk - inner.pending.len()) + delay_in.div_ceil(chunk) * chunk;
        let zeros = vec![0.0f32; n];
        self.process(&zeros, output)?;
        self.reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn streaming_in_odd_pieces_keeps_the_tone() {
        let mut rs = StreamResampler::new(44_100, 16_000).unwrap();
        let input = sine(44_100, 440.0, 44_100);
        let mut out = Vec::new();
        for piece in input.chunks(333) {
            rs.process(piece, &mut out).unwrap();
        }
        // About one second out, minus what is still buffered.
        assert!((out.len() as i64 - 16_000).abs() < 600, "{}", out.len());
        // Phase-free check (the filter delay is fractional): remove the best-fit 440 Hz sinusoid
        // and compare what is left with it.
        let seg = &out[1000..out.len() - 200];
        let w = 2.0 * std::f64::consts::PI * 440.0 / 16_000.0;
        let (mut a, mut b) = (0.0f64, 0.0f64);
        for (k, &x) in seg.iter().enumerate() {
            a += x as f64 * (w * k as f64).sin();
            b += x as f64 * (w * k as f64).cos();
        }
        let n = seg.len() as f64;
        let (a, b) = (2.0 * a / n, 2.0 * b / n);
        let (mut err, mut sig) = (0.0f64, 0.0f64);
        for (k, &x) in seg.iter().enumerate() {
            let fit = a * (w * k as f64).sin() + b * (w * k as f64).cos();
            err += (x as f64 - fit).powi(2);
            sig += fit * fit;
        }
        let snr = 10.0 * (sig / err).log10();
        assert!(((a * a + b * b).sqrt() - 0.5).abs() < 0.01, "amplitude {}", (a * a + b * b).sqrt());
        assert!(snr > 60.0, "SNR {snr:.1} dB");
    }

    #[test]
    fn equal_rates_copy_bit_for_bit() {
        let mut rs = StreamResampler::new(16_000, 16_000).unwrap();
        let input = sine(16_000, 300.0, 1234);
        let mut out = Vec::new();
        rs.process(&input, &mut out).unwrap();
        assert_eq!(out, input);
    }
}
