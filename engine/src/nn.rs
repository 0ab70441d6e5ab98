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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, x.dims()) {
            (LinearWeight::Quantized { q8: Some(q8), out_dim, .. }, dims) if x.device().is_cpu() => {
                let m = x.elem_count() / q8.cols;
                let _span = crate::profile::span(match m {
                    1 => "linear q8, 1 row",
                    2..=15 => "linear q8, 2-15 rows",
                    _ => "linear q8, 16+ rows",
                });
                let rows = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let mut shape = dims.to_vec();
                *shape.last_mut().expect("a matmul input has dimensions") = *out_dim;
                let mut y = q8.matmul(&rows, m);
                // The bias on the plain floats (candle's broadcast add runs on one thread).
                if let Some(b) = &self.bias {
                    if add_host_bias(&mut y, b)? {
                        return Ok(Tensor::from_vec(y, shape, x.device())?);
                    }
                }
                Tensor::from_vec(y, shape, x.device())?
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
    let row = |(xr, yr): (&[f32], &mut [f32])| {
        for (v, wr) in yr.iter_mut().zip(weights.chunks_exact(k)) {
            *v = crate::attention::dot(xr, wr);
        }
    };
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
        let weight_f32 = if weight.device().is_cpu() { weight.to_dtype(DType::F32)?.to_vec1::<f32>()? } else { Vec::new() };
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
        let (w, eps) = (&self.weight_f32[..], self.eps as f32);
        let norm_row = |row: &mut [f32]| {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for (v, &g) in row.iter_mut().zip(w) {
                *v = *v * inv * g;
            }
        };
        if data.len() >= PARALLEL_NORM_ELEMENTS {
            use rayon::prelude::*;
            data.par_chunks_mut(dim).for_each(norm_row);
        } else {
            data.chunks_mut(dim).for_each(norm_row);
        }
        Ok(Tensor::from_vec(data, dims, x.device())?)
    }
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::silu(x)?)
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
        Ok(candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.weight, &self.bias, self.eps as f32)?)
    }
}

/// Exact (erf) GELU, `torch.nn.functional.gelu` without approximation.
///
/// On the CPU with many elements, spread over the worker pool with candle's own per-element formula
/// (same bits as `gelu_erf`, which runs on one thread: a 32-layer encoder spent more time in it
/// than in its matrix products).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.elem_count() < PARALLEL_NORM_ELEMENTS {
        return Ok(x.gelu_erf()?);
    }
    let _span = crate::profile::span("gelu");
    use rayon::prelude::*;
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    data.par_chunks_mut(4096).for_each(|chunk| {
        for v in chunk {
            *v = (candle_core::cpu::erf::erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * *v;
        }
    });
    Ok(Tensor::from_vec(data, x.dims(), x.device())?)
}
