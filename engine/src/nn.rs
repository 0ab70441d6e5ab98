//! Building blocks shared by the stages: linear layers behind one seam, RMSNorm, activations.
//!
//! Every matrix multiply of a weight goes through [`Linear`], so a quantized or GPU implementation
//! can replace the dense f32 one without touching the models. A `Linear` holds either a dense f32
//! matrix or quantized blocks (candle's `QMatMul` over a GGUF file map: Q8_0, K-quants); the models
//! never see the difference. [`Embedding`] is the same seam for lookup tables.

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor, D};

use crate::quant::Q8Matrix;
use crate::weights::{WeightMatrix, Weights};

/// `y = x W^T (+ b)` for `x` of shape `[.., in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// The matrix of a [`Linear`]: `[out, in]`, as stored in the checkpoint.
#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    Quantized {
        matmul: QMatMul,
        out_dim: usize,
        /// f32 copy, made only if someone asks for [`Linear::weight`].
        dense: Arc<OnceLock<Tensor>>,
        qtensor: Arc<QTensor>,
        /// The engine's own kernel over the same blocks, where it applies (Q8_0 on AVX2).
        q8: Option<Q8Matrix>,
    },
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Dense(weight), bias }
    }

    /// A linear layer over a dense or quantized matrix `[out, in]`.
    pub fn from_matrix(weight: WeightMatrix, bias: Option<Tensor>) -> Result<Self> {
        let weight = match weight {
            WeightMatrix::Dense(t) => LinearWeight::Dense(t),
            WeightMatrix::Quantized(q) => {
                let out_dim = q.shape().dims()[0];
                LinearWeight::Quantized {
                    matmul: QMatMul::from_arc(q.clone())?,
                    out_dim,
                    dense: Arc::new(OnceLock::new()),
                    q8: Q8Matrix::view(&q),
                    qtensor: q,
                }
            }
        };
        Ok(Self { weight, bias })
    }

    /// Loads `{prefix}.weight` `[out, in]` (and `{prefix}.bias` `[out]` when `bias`); quantized when
    /// the weight source stores the matrix quantized.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.matrix(&[out_dim, in_dim], "weight")?;
        let bias = if bias { Some(w.get(&[out_dim], "bias")?) } else { None };
        Self::from_matrix(weight, bias)
    }

    pub fn out_dim(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[0],
            LinearWeight::Quantized { out_dim, .. } => *out_dim,
        }
    }

    /// The Q8_0 kernel view of the matrix, when the engine's kernels run it.
    pub fn q8_matrix(&self) -> Option<&Q8Matrix> {
        match &self.weight {
            LinearWeight::Quantized { q8, .. } => q8.as_ref(),
            LinearWeight::Dense(_) => None,
        }
    }

    /// Whether the matrix is held as quantized blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized { .. })
    }

    /// The matrix as f32 `[out, in]` (dequantized once, on first use, for a quantized layer).
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            LinearWeight::Dense(w) => w,
            LinearWeight::Quantized { dense, qtensor, .. } => dense.get_or_init(|| {
                qtensor.dequantize(&candle_core::Device::Cpu).expect("dequantizing a mapped GGUF tensor")
            }),
        }
    }

    /// Every layer of `layers` applied to the same `x`, as [`forward`](Self::forward) would one by
    /// one (same bits), in one product sweep when all are Q8_0 on the engine's kernels: `x` is
    /// quantized (and on AMX packed) once and the pool forks once, not three times for q/k/v.
    /// (`forward` of one Q8_0 layer is this with one layer.)
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let matrices: Option<Vec<&Q8Matrix>> = layers.iter().map(|l| l.q8_matrix()).collect();
        let cols = matrices.as_ref().and_then(|m| m.first()).map(|m| m.cols);
        let same_cols = matrices.as_ref().is_some_and(|m| m.iter().all(|w| Some(w.cols) == cols));
        let (Some(matrices), Some(cols), true, true) = (matrices, cols, same_cols, x.device().is_cpu()) else {
            return layers.iter().map(|l| l.forward(x)).collect();
        };
        let m = x.elem_count() / cols;
        let _span = crate::profile::span(match (layers.len(), m) {
            (1, 1) => "linear q8, 1 row",
            (1, 2..=15) => "linear q8, 2-15 rows",
            (1, _) => "linear q8, 16+ rows",
            (_, 1) => "linear q8 shared input, 1 row",
            (_, 2..=15) => "linear q8 shared input, 2-15 rows",
            _ => "linear q8 shared input, 16+ rows",
        });
        let rows = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let outs = Q8Matrix::matmul_many(&matrices, &rows, m);
        layers
            .iter()
            .zip(outs)
            .map(|(layer, mut y)| {
                let mut shape = x.dims().to_vec();
                *shape.last_mut().expect("a matmul input has dimensions") = layer.out_dim();
                match &layer.bias {
                    Some(b) if !add_host_bias(&mut y, b)? => {
                        Ok(Tensor::from_vec(y, shape, x.device())?.broadcast_add(b)?)
                    }
                    _ => Ok(Tensor::from_vec(y, shape, x.device())?),
                }
            })
            .collect()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, x.dims()) {
            (LinearWeight::Quantized { q8: Some(_), .. }, _) if x.device().is_cpu() => {
                // The one-layer case of the shared-input sweep (bias included).
                return Self::forward_shared(&[self], x)?.pop().ok_or_else(|| anyhow::anyhow!("one product"));
            }
            (LinearWeight::Quantized { matmul, .. }, _) => {
                let _span = crate::profile::span("linear candle QMatMul");
                matmul.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
            }
            (LinearWeight::Dense(w), _) if let Some(y) = small_host_product(x, w)? => y,
            (LinearWeight::Dense(w), [b, t, _]) => {
                let _span = crate::profile::span("linear dense");
                let x2 = x.reshape((b * t, ()))?;
                x2.matmul(&w.t()?)?.reshape((*b, *t, ()))?
            }
            (LinearWeight::Dense(w), _) => x.broadcast_matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => {
                let _span = crate::profile::span("linear bias");
                y.broadcast_add(b)?
            }
            None => y,
        })
    }
}

/// Adds `bias [out]` (f32, on the CPU) to every row of `y [rows, out]`; false when it does not apply.
fn add_host_bias(y: &mut [f32], bias: &Tensor) -> Result<bool> {
    if bias.dtype() != DType::F32 || !bias.device().is_cpu() {
        return Ok(false);
    }
    let (storage, layout) = bias.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(false);
    };
    let b = &cpu.as_slice::<f32>()?[start..end];
    if b.is_empty() || !y.len().is_multiple_of(b.len()) {
        return Ok(false);
    }
    let add = |row: &mut [f32]| row.iter_mut().zip(b).for_each(|(v, &c)| *v += c);
    if y.len() >= PARALLEL_NORM_ELEMENTS {
        use rayon::prelude::*;
        y.par_chunks_mut(b.len()).for_each(add);
    } else {
        y.chunks_mut(b.len()).for_each(add);
    }
    Ok(true)
}

/// Weights of at most this many values go through [`small_host_product`] (a router is 128 × 2048).
const SMALL_WEIGHT_VALUES: usize = 1 << 20;
/// Multiply-adds above which [`small_host_product`] spreads its rows over the worker pool.
const PARALLEL_PRODUCT_MACS: usize = 1 << 18;

/// `x [.., in] · w [out, in]ᵀ` for a small f32 weight on the CPU (the MoE routers, the shared-expert
/// gates), as plain dot products read straight from the weight's storage: candle's matmul cost
/// about a millisecond per router call, a thread-pool round trip for microseconds of work. `None`
/// when it does not apply.
fn small_host_product(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (out, k) = match w.dims() {
        &[out, k] => (out, k),
        _ => return Ok(None),
    };
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let m = x.elem_count() / k.max(1);
    if out * k > SMALL_WEIGHT_VALUES || m > 1024 {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let weights = &cpu.as_slice::<f32>()?[start..end];
    let _span = crate::profile::span("linear dense, small weight");
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; m * out];
    let row = |(xr, yr): (&[f32], &mut [f32])| crate::attention::dot_rows(xr, weights, yr);
    if m > 1 && m * out * k >= PARALLEL_PRODUCT_MACS {
        use rayon::prelude::*;
        xs.par_chunks_exact(k).zip(y.par_chunks_exact_mut(out)).for_each(row);
    } else {
        xs.chunks_exact(k).zip(y.chunks_exact_mut(out)).for_each(row);
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("a matmul input has dimensions") = out;
    Ok(Some(Tensor::from_vec(y, shape, x.device())?))
}

/// A lookup table `[rows, dim]`, dense or quantized (rows are decoded on lookup).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: WeightMatrix,
    dim: usize,
}

impl Embedding {
    pub fn new(table: Tensor) -> Self {
        let dim = table.dims().last().copied().unwrap_or(0);
        Self { table: WeightMatrix::Dense(table), dim }
    }

    /// Loads `{prefix}.weight` `[rows, dim]`.
    pub fn load(w: &Weights, rows: usize, dim: usize) -> Result<Self> {
        Ok(Self { table: w.matrix(&[rows, dim], "weight")?, dim })
    }

    /// Rows `ids` → `[ids.len(), dim]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.table {
            WeightMatrix::Dense(t) => t.index_select(ids, 0)?,
            WeightMatrix::Quantized(q) => q.embedding(ids)?.reshape((ids.elem_count(), self.dim))?,
        })
    }

    /// The same table as a projection back to the rows (a tied output head).
    pub fn as_linear(&self) -> Result<Linear> {
        Linear::from_matrix(self.table.clone(), None)
    }
}

/// Root-mean-square norm computed in f32: `w * x / sqrt(mean(x^2) + eps)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The weight as plain floats for the CPU path (empty when the weight lives on another device).
    weight_f32: Arc<Vec<f32>>,
    eps: f64,
}

/// Rows × dim at least before a norm is spread over the worker pool.
const PARALLEL_NORM_ELEMENTS: usize = 1 << 15;

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&[dim], "weight")?;
        let weight_f32 =
            if weight.device().is_cpu() { weight.to_dtype(DType::F32)?.to_vec1::<f32>()? } else { Vec::new() };
        Ok(Self { weight, weight_f32: Arc::new(weight_f32), eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("rms norm");
        if !x.device().is_cpu() || self.weight_f32.is_empty() {
            let x = x.to_dtype(DType::F32)?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            return Ok(normed.broadcast_mul(&self.weight)?);
        }
        // One pass per row over plain floats: candle's six element-wise ops each allocate and each
        // run on one thread, which made the norms a fifth of a prefill.
        let dims = x.dims().to_vec();
        let dim = self.weight_f32.len();
        let mut data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if dims.last() != Some(&dim) {
            anyhow::bail!("rms norm of width {dim} applied to a tensor of shape {dims:?}");
        }
        let norm_row = |row: &mut [f32]| self.norm_row(row);
        if data.len() >= PARALLEL_NORM_ELEMENTS {
            use rayon::prelude::*;
            data.par_chunks_mut(dim).for_each(norm_row);
        } else {
            data.chunks_mut(dim).for_each(norm_row);
        }
        Ok(Tensor::from_vec(data, dims, x.device())?)
    }

    /// Whether [`Self::norm_row`] can run (the weight is on the host).
    pub fn on_host(&self) -> bool {
        !self.weight_f32.is_empty()
    }

    /// One row (of the norm's width) in place, as [`Self::forward`] computes it on the CPU.
    pub fn norm_row(&self, row: &mut [f32]) {
        let (w, eps) = (&self.weight_f32[..], self.eps as f32);
        let mean = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// Elements at least before a row-wise pass ([`RmsNorm`], the attention's q/k preparation) is spread
/// over the worker pool.
pub const PARALLEL_ROWS_ELEMENTS: usize = PARALLEL_NORM_ELEMENTS;

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
}

/// `silu(gate) · up`, on the worker pool for CPU f32 tensors (candle's two element-wise ops run on
/// one thread each): candle's own SiLU `g / (1 + e^(−g))`, then the product, so the same bits.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let host = gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if !host || gate.dims() != up.dims() || gate.elem_count() < PARALLEL_NORM_ELEMENTS {
        return Ok((silu(gate)? * up)?);
    }
    use rayon::prelude::*;
    let (g, u) = (gate.flatten_all()?.to_vec1::<f32>()?, up.flatten_all()?.to_vec1::<f32>()?);
    let h: Vec<f32> = g.par_iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    Ok(Tensor::from_vec(h, gate.dims(), gate.device())?)
}

/// LayerNorm with weight and bias (`torch.nn.LayerNorm`), computed in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get(&[dim], "weight")?, bias: w.get(&[dim], "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("layer norm");
        Ok(candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }
}

/// Exact (erf) GELU, `torch.nn.functional.gelu` without approximation, computed as PyTorch's CPU
/// kernel computes it: `x · 0.5 · (1 + erf(x / √2))` with erf from Abramowitz & Stegun 7.1.26
/// (absolute error < 1.5e-7, PyTorch's vectorized `erf`) and a Cephes-style `exp`.
///
/// candle's `gelu_erf` runs a scalar erf on one thread: the 32-layer audio encoder spent more time
/// in it than in its matrix products. Here every element takes the same branch-free formula (so a
/// chunk gives the same bits alone or in a batch), in 256-bit vectors with FMA where the CPU has
/// them (`mul_add` is exact either way: the same bits on every machine), spread over the pool when
/// there are many.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(x.gelu_erf()?);
    }
    let _span = crate::profile::span("gelu");
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    if data.len() >= PARALLEL_NORM_ELEMENTS {
        use rayon::prelude::*;
        data.par_chunks_mut(4096).for_each(gelu_in_place);
    } else {
        gelu_in_place(&mut data);
    }
    Ok(Tensor::from_vec(data, x.dims(), x.device())?)
}

fn gelu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { gelu_avx2(values) };
        return;
    }
    values.iter_mut().for_each(|v| *v = gelu_one(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = gelu_one(*v));
}

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf_as(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Abramowitz & Stegun 7.1.26, as PyTorch's `Vectorized<float>::erf`.
#[inline(always)]
fn erf_as(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let r = 1.061_405_4f32
        .mul_add(t, -1.453_152_1)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6);
    let e = (-(t * exp_cephes(-(x * x)))).mul_add(r, 1.0);
    e.copysign(x)
}

/// `exp(x)` for `x ≤ 0` (Cephes `expf`: n = round(x / ln 2), a degree-5 polynomial on the rest,
/// about 1 ulp); 0 below −87 (where the result would be subnormal).
#[inline(always)]
fn exp_cephes(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let z = r * r;
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(z, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let out = y * scale;
    if x <= -87.0 {
        0.0
    } else {
        out
    }
}

#[cfg(test)]
mod gelu_tests {
    use super::*;

    /// Against the exact erf GELU (candle's `gelu_erf`): within A&S's erf error.
    #[test]
    fn gelu_is_within_the_erf_approximation_of_the_exact_one() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.003).chain([-30.0, -9.5, 9.5, 30.0, 0.0]).collect();
        let t = Tensor::from_vec(xs.clone(), xs.len(), &candle_core::Device::Cpu).unwrap();
        let ours = gelu(&t).unwrap().to_vec1::<f32>().unwrap();
        let exact = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for ((x, a), b) in xs.iter().zip(&ours).zip(&exact) {
            assert!((a - b).abs() <= 2e-7 * x.abs().max(1.0) + 1e-7, "gelu({x}) = {a}, exact {b}");
        }
        // One value alone gives the bits it gives in a batch.
        let one = Tensor::from_vec(vec![xs[1234]], 1, &candle_core::Device::Cpu).unwrap();
        assert_eq!(gelu(&one).unwrap().to_vec1::<f32>().unwrap()[0].to_bits(), ours[1234].to_bits());
        for x in [-1.0f32, -20.0, -0.3, 0.0, -86.0] {
            assert!((exp_cephes(x) - x.exp()).abs() <= 2.5e-7 * x.exp(), "exp({x}): {} vs {}", exp_cephes(x), x.exp());
        }
    }
}

#[cfg(test)]
#[test]
fn silu_mul_has_the_bits_of_candle_silu_then_mul() {
    let n = PARALLEL_NORM_ELEMENTS + 7;
    let g: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 * 0.01 - 10.0).collect();
    let u: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 * 0.003 - 1.5).collect();
    let dev = candle_core::Device::Cpu;
    let (gt, ut) = (Tensor::from_vec(g, (1, n), &dev).unwrap(), Tensor::from_vec(u, (1, n), &dev).unwrap());
    let ours = silu_mul(&gt, &ut).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = (silu(&gt).unwrap() * &ut).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}
