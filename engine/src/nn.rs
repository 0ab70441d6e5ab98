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
                let rows = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let mut shape = dims.to_vec();
                *shape.last_mut().expect("a matmul input has dimensions") = *out_dim;
                Tensor::from_vec(q8.matmul(&rows, m), shape, x.device())?
            }
            (LinearWeight::Quantized { matmul, .. }, _) => {
                matmul.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
            }
            (LinearWeight::Dense(w), [b, t, _]) => {
                let x2 = x.reshape((b * t, ()))?;
                x2.matmul(&w.t()?)?.reshape((*b, *t, ()))?
            }
            (LinearWeight::Dense(w), _) => x.broadcast_matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
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
    eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get(&[dim], "weight")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
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
        Ok(candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.weight, &self.bias, self.eps as f32)?)
    }
}

/// Exact (erf) GELU, `torch.nn.functional.gelu` without approximation.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}
