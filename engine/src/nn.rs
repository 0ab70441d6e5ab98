//! Building blocks shared by the stages: linear layers behind one seam, RMSNorm, activations.
//!
//! Every matrix multiply of a weight goes through [`Linear`], so a quantized or GPU implementation
//! can replace the dense f32 one without touching the models.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::weights::Weights;

/// `y = x W^T (+ b)` for `x` of shape `[.., in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as stored in the checkpoint.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `{prefix}.weight` `[out, in]` (and `{prefix}.bias` `[out]` when `bias`).
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias { Some(w.get(&[out_dim], "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.dims() {
            [b, t, _] => {
                let x2 = x.reshape((b * t, ()))?;
                x2.matmul(&self.weight.t()?)?.reshape((*b, *t, ()))?
            }
            _ => x.broadcast_matmul(&self.weight.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
