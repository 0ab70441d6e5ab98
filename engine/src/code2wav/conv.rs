//! The convolutional parts of Code2Wav: causal (transposed) convolutions, SnakeBeta, the ConvNeXt
//! upsampling block and the decoder blocks.
//!
//! Reference classes in transformers' `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py`:
//! `Qwen3OmniMoeCausalConvNet`, `Qwen3OmniMoeCausalTransConvNet`, `Qwen3OmniMoeConvNeXtBlock`,
//! `Qwen3OmniMoeSnakeBeta`, `Qwen3OmniMoeCode2WavDecoderResidualUnit` and
//! `Qwen3OmniMoeCode2WavDecoderBlock`. Every tensor here is `[batch, channels, time]`.
//!
//! Convolution arithmetic (all of it pure and unit-tested below):
//! - a causal conv of effective kernel `k = (kernel - 1)·dilation + 1` and stride `s` pads `k - s`
//!   zeros on the left and [`extra_padding`] on the right, so its output has `ceil(len / s)` samples
//!   (`len` for the stride-1 convs of the model);
//! - a causal transposed conv of kernel `k` and stride `s` produces `(len - 1)·s + k` samples and
//!   trims `k - s` from *both* ends ([`trans_conv_len`]); with `k = 2s` (decoder blocks) that leaves
//!   `(len - 1)·s`, one input step shorter than `len·s`.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::nn::Linear;
use crate::weights::Weights;

/// Right padding of `Qwen3OmniMoeCausalConvNet._get_extra_padding_for_conv1d`: what completes the
/// last stride window, `ceil(n_frames)·s + (k - padding) - s - len` with `padding = k - s`.
pub fn extra_padding(len: usize, kernel_eff: usize, stride: usize) -> usize {
    // n_frames = (len - k + padding) / s + 1 = len / s   (padding = k - s)
    // ideal    = (ceil(n_frames) - 1)·s + (k - padding) = ceil(len / s)·s
    debug_assert!(stride >= 1 && kernel_eff >= stride);
    len.div_ceil(stride) * stride - len
}

/// Output length of a causal conv: the padded length `len + (k - s) + extra` through a valid conv.
pub fn causal_conv_len(len: usize, kernel_eff: usize, stride: usize) -> usize {
    let padded = len + (kernel_eff - stride) + extra_padding(len, kernel_eff, stride);
    (padded - kernel_eff) / stride + 1
}

/// Output length of `Qwen3OmniMoeCausalTransConvNet`: `(len - 1)·s + k`, minus `k - s` on each side.
/// `None` when nothing is left (`len` too short).
pub fn trans_conv_len(len: usize, kernel: usize, stride: usize) -> Option<usize> {
    let full = len.checked_sub(1)? * stride + kernel;
    let trim = 2 * (kernel - stride);
    full.checked_sub(trim).filter(|&n| n > 0)
}

/// Floats of one unfolded input block (16 MB): bounds the im2col buffer of long inputs.
const UNFOLD_FLOATS: usize = 1 << 22;

/// `Qwen3OmniMoeCausalConvNet`: `nn.Conv1d` behind left (causal) zero padding.
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// `[out, in / groups, kernel]`, as stored.
    weight: Tensor,
    /// The same weight as one matrix `[out, kernel·in]` (tap-major columns; dense stride-1 convs only).
    unfolded: Option<Tensor>,
    /// `[1, out, 1]`.
    bias: Tensor,
    kernel: usize,
    dilation: usize,
    stride: usize,
    groups: usize,
    in_channels: usize,
    out_channels: usize,
}

impl CausalConv1d {
    /// Loads `{w}.conv.weight` `[out, in/groups, kernel]` and `{w}.conv.bias` `[out]`.
    pub fn new(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        dilation: usize,
        stride: usize,
        groups: usize,
    ) -> Result<Self> {
        ensure!(
            kernel >= 1 && dilation >= 1 && stride >= 1 && groups >= 1,
            "{}: invalid conv geometry",
            w.prefix()
        );
        ensure!(
            in_channels % groups == 0 && out_channels % groups == 0,
            "{}: channels {in_channels}→{out_channels} not divisible by groups {groups}",
            w.prefix()
        );
        let w = w.pp("conv");
        let weight = w.get(&[out_channels, in_channels / groups, kernel], "weight")?;
        let bias = w
            .get(&[out_channels], "bias")?
            .reshape((1, out_channels, 1))?;
        let kernel_eff = (kernel - 1) * dilation + 1;
        ensure!(
            kernel_eff >= stride,
            "{}: stride {stride} exceeds the kernel span {kernel_eff}",
            w.prefix()
        );
        Self::from_tensors(weight, bias, dilation, stride, groups)
    }

    /// From `weight [out, in/groups, kernel]` and `bias [1, out, 1]`.
    fn from_tensors(weight: Tensor, bias: Tensor, dilation: usize, stride: usize, groups: usize) -> Result<Self> {
        let (out_channels, in_per_group, kernel) = weight.dims3()?;
        let in_channels = in_per_group * groups;
        let unfolded = if groups == 1 && stride == 1 {
            Some(weight.permute((0, 2, 1))?.reshape((out_channels, kernel * in_channels))?.contiguous()?)
        } else {
            None
        };
        Ok(Self { weight, unfolded, bias, kernel, dilation, stride, groups, in_channels, out_channels })
    }

    /// `(kernel - 1)·dilation + 1`, the span the reference calls `kernel_size`.
    pub fn kernel_eff(&self) -> usize {
        (self.kernel - 1) * self.dilation + 1
    }

    /// Left padding, `kernel_eff - stride`.
    pub fn left_padding(&self) -> usize {
        self.kernel_eff() - self.stride
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let len = x.dim(D::Minus1)?;
        // 1. Causal padding: [b, in, len] → [b, in, left + len + extra].
        let extra = extra_padding(len, self.kernel_eff(), self.stride);
        let xp = x.pad_with_zeros(D::Minus1, self.left_padding(), extra)?;
        self.forward_padded(&xp, causal_conv_len(len, self.kernel_eff(), self.stride))
    }

    /// Zeros standing for the causal padding before a stream's first column: the `tail` that
    /// [`step`](Self::step) starts from, `[1, in, kernel_eff - 1]`.
    pub fn initial_tail(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::zeros((1, self.in_channels, self.kernel_eff() - 1), self.weight.dtype(), device)?)
    }

    /// Streaming (stride 1): the outputs for the new columns `x` `[1, in, n]`, with `tail` the last
    /// `kernel_eff - 1` input columns before them (from [`initial_tail`](Self::initial_tail), then
    /// from the previous step), which this advances. The outputs equal [`forward`](Self::forward)'s
    /// at those columns of the whole stream.
    pub fn step(&self, tail: &mut Tensor, x: &Tensor) -> Result<Tensor> {
        ensure!(self.stride == 1, "streaming causal conv needs stride 1, not {}", self.stride);
        let (n, keep) = (x.dim(D::Minus1)?, self.kernel_eff() - 1);
        if keep == 0 {
            return self.forward_padded(x, n);
        }
        let xp = Tensor::cat(&[&*tail, x], D::Minus1)?;
        let y = self.forward_padded(&xp, n)?;
        *tail = xp.narrow(D::Minus1, n, keep)?;
        Ok(y)
    }

    /// The convolution of an already padded input: `[b, in, ·]` → `[b, out, out_len]`.
    fn forward_padded(&self, xp: &Tensor, out_len: usize) -> Result<Tensor> {
        let _span = crate::profile::span("code2wav causal conv");
        let (b, c, _) = xp.dims3()?;
        ensure!(
            c == self.in_channels,
            "causal conv expects {} channels, got {c}",
            self.in_channels
        );
        // 2. The convolution: [b, out, out_len].
        let y = if self.groups == self.in_channels
            && self.in_channels == self.out_channels
            && self.stride == 1
        {
            // Depthwise (the ConvNeXt dwconv): one multiply-add per tap over all channels.
            let mut acc: Option<Tensor> = None;
            for j in 0..self.kernel {
                let wj = self.weight.narrow(2, j, 1)?.reshape((1, c, 1))?;
                let term = xp
                    .narrow(2, j * self.dilation, out_len)?
                    .broadcast_mul(&wj)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
            acc.expect("kernel >= 1")
        } else if let Some(unfolded) = &self.unfolded {
            // Dense, stride 1: one product W [out, k·in] · X [k·in, cols] per block of output columns,
            // X stacking the k shifted views of the input (im2col, bounded to UNFOLD_FLOATS).
            let rows = self.kernel * c;
            let block = (UNFOLD_FLOATS / rows).max(64).min(out_len);
            let mut per_batch = Vec::with_capacity(b);
            for bi in 0..b {
                let xb = xp.get(bi)?;
                let mut parts = Vec::with_capacity(out_len.div_ceil(block));
                let mut at = 0;
                while at < out_len {
                    let n = block.min(out_len - at);
                    let views: Vec<Tensor> = (0..self.kernel)
                        .map(|j| xb.narrow(1, at + j * self.dilation, n))
                        .collect::<candle_core::Result<_>>()?;
                    parts.push(unfolded.matmul(&Tensor::cat(&views, 0)?)?);
                    at += n;
                }
                per_batch.push(if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 1)? });
            }
            Tensor::stack(&per_batch, 0)?
        } else {
            xp.contiguous()?
                .conv1d(&self.weight, 0, self.stride, self.dilation, self.groups)?
        };
        // 3. Bias.
        Ok(y.broadcast_add(&self.bias)?)
    }
}

/// What a streaming [`CausalTransConv1d::step`] carries: the untrimmed output samples still
/// waiting for the next input step's share (no bias yet) and what is left to trim at the start.
#[derive(Debug, Clone, Default)]
pub struct TransConvState {
    pending: Option<Tensor>,
    /// `None`: nothing emitted yet (`kernel - stride` to trim).
    to_trim: Option<usize>,
}

/// `Qwen3OmniMoeCausalTransConvNet`: `nn.ConvTranspose1d` with `kernel - stride` samples trimmed
/// from both ends.
#[derive(Debug, Clone)]
pub struct CausalTransConv1d {
    /// `[in, out, kernel]`, as stored.
    weight: Tensor,
    /// The same as one matrix `[out·kernel, in]` (rows `o·kernel + k`), for the CPU path.
    columns: Tensor,
    out_channels: usize,
    /// `[1, out, 1]`.
    bias: Tensor,
    kernel: usize,
    stride: usize,
}

impl CausalTransConv1d {
    /// Loads `{w}.conv.weight` `[in, out, kernel]` and `{w}.conv.bias` `[out]`.
    pub fn new(
        w: &Weights,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        ensure!(
            stride >= 1 && kernel >= stride,
            "{}: transposed conv needs kernel >= stride >= 1",
            w.prefix()
        );
        let w = w.pp("conv");
        let weight = w
            .get(&[in_channels, out_channels, kernel], "weight")?
            .contiguous()?;
        let bias = w
            .get(&[out_channels], "bias")?
            .reshape((1, out_channels, 1))?;
        Self::from_tensors(weight, bias, stride)
    }

    /// From `weight [in, out, kernel]` and `bias [1, out, 1]`.
    fn from_tensors(weight: Tensor, bias: Tensor, stride: usize) -> Result<Self> {
        let (in_channels, out_channels, kernel) = weight.dims3()?;
        let columns = weight.permute((1, 2, 0))?.reshape((out_channels * kernel, in_channels))?.contiguous()?;
        Ok(Self { weight, columns, out_channels, bias, kernel, stride })
    }

    /// Streaming: the output samples that the new input steps `x` `[1, in, n]` complete (`None`
    /// when none yet), equal to [`forward`](Self::forward)'s samples there for the whole stream.
    /// Sample `m` of the untrimmed output takes input steps `t` with `t·s <= m < t·s + k`, so after
    /// the new steps everything before `(steps so far)·s` is final; the `k - s` samples after it
    /// wait in `state` for the next step's share, and the first `k - s` of the stream are trimmed.
    pub fn step(&self, state: &mut TransConvState, x: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)?;
        if n == 0 {
            return Ok(None);
        }
        let (k, s) = (self.kernel, self.stride);
        let _span = crate::profile::span("code2wav transposed conv");
        // 1. The new steps' contributions: [1, out, (n - 1)·s + k].
        let mut full = self.untrimmed(x, n)?;
        // 2. Plus the previous steps' share of the first `k - s` samples, added after the new share
        //    as `forward` adds them (with the model's `k <= 2s` one term each: the same bits).
        if let Some(pending) = state.pending.take() {
            let head = (full.narrow(D::Minus1, 0, k - s)? + pending)?;
            full = Tensor::cat(&[&head, &full.narrow(D::Minus1, k - s, (n - 1) * s + s)?], D::Minus1)?;
        }
        if k > s {
            state.pending = Some(full.narrow(D::Minus1, n * s, k - s)?);
        }
        // 3. The final samples with their bias, less what the stream's start trims.
        let trim = state.to_trim.unwrap_or(k - s).min(n * s);
        state.to_trim = Some(state.to_trim.unwrap_or(k - s) - trim);
        if trim == n * s {
            return Ok(None);
        }
        let done = full.narrow(D::Minus1, trim, n * s - trim)?.broadcast_add(&self.bias)?;
        Ok(Some(done))
    }

    /// `[b, in, len]` → `[b, out, (len - 1)·s + k]`, before bias and trimming.
    fn untrimmed(&self, x: &Tensor, len: usize) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            self.overlap_add(x, len)
        } else {
            Ok(x.contiguous()?.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1)?)
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let len = x.dim(D::Minus1)?;
        let Some(out_len) = trans_conv_len(len, self.kernel, self.stride) else {
            bail!(
                "transposed conv (kernel {}, stride {}) needs more than {len} input steps",
                self.kernel,
                self.stride
            );
        };
        let _span = crate::profile::span("code2wav transposed conv");
        // 1. [b, in, len] → [b, out, (len - 1)·s + k].
        let y = self.untrimmed(x, len)?.broadcast_add(&self.bias)?;
        // 2. Trim `k - s` on both sides: [b, out, out_len].
        Ok(y.narrow(D::Minus1, self.kernel - self.stride, out_len)?)
    }
}

impl CausalTransConv1d {
    /// The transposed conv as one product and an overlap-add: `Z = W [out·k, in] · x [in, len]`, then
    /// `y[o, t·s + k] += Z[o·k + k, t]` (candle's CPU `conv_transpose1d` loops on one thread).
    fn overlap_add(&self, x: &Tensor, len: usize) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (out, k, s) = (self.out_channels, self.kernel, self.stride);
        let full = (len - 1) * s + k;
        let mut y = vec![0f32; b * out * full];
        for bi in 0..b {
            let z = self.columns.matmul(&x.get(bi)?.contiguous()?)?.flatten_all()?.to_vec1::<f32>()?;
            let yb = &mut y[bi * out * full..(bi + 1) * out * full];
            for o in 0..out {
                let yo = &mut yb[o * full..(o + 1) * full];
                for kk in 0..k {
                    let zrow = &z[(o * k + kk) * len..(o * k + kk + 1) * len];
                    for (t, &v) in zrow.iter().enumerate() {
                        yo[t * s + kk] += v;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(y, (b, out, full), x.device())?)
    }
}

/// `Qwen3OmniMoeSnakeBeta`: `x + 1/(exp(β) + 1e-9) · sin²(x · exp(α))`, per channel.
#[derive(Debug, Clone)]
pub struct SnakeBeta {
    /// `exp(alpha)`, `[1, c, 1]`.
    alpha: Tensor,
    /// `1 / (exp(beta) + 1e-9)`, `[1, c, 1]`.
    inv_beta: Tensor,
    /// Both as floats per channel, for the CPU path.
    alpha_f32: Vec<f32>,
    inv_beta_f32: Vec<f32>,
}

impl SnakeBeta {
    /// Loads `{w}.alpha` and `{w}.beta` `[channels]` (stored in log scale).
    pub fn new(w: &Weights, channels: usize) -> Result<Self> {
        let alpha = w
            .get(&[channels], "alpha")?
            .exp()?
            .reshape((1, channels, 1))?;
        let beta = w
            .get(&[channels], "beta")?
            .exp()?
            .reshape((1, channels, 1))?;
        let inv_beta = (beta + 1e-9)?.recip()?;
        let alpha_f32 = alpha.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let inv_beta_f32 = inv_beta.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self { alpha, inv_beta, alpha_f32, inv_beta_f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _span = crate::profile::span("code2wav snake");
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            let s = x.broadcast_mul(&self.alpha)?.sin()?.sqr()?;
            return Ok((x + s.broadcast_mul(&self.inv_beta)?)?);
        }
        // The same per-element steps as the tensor path, one pass, channels over the worker pool; sin²
        // from a polynomial the compiler vectorises (libm's scalar `sin` was ~10 % of Code2Wav).
        use rayon::prelude::*;
        let (_, c, t) = x.dims3()?;
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        data.par_chunks_mut(t).enumerate().for_each(|(row, xs)| {
            let (a, ib) = (self.alpha_f32[row % c], self.inv_beta_f32[row % c]);
            if xs.iter().all(|v| (v * a).abs() <= SIN_SQUARED_MAX_ARG) {
                for v in xs.iter_mut() {
                    *v += sin_squared(*v * a) * ib;
                }
            } else {
                for v in xs.iter_mut() {
                    let s = (*v * a).sin();
                    *v += (s * s) * ib;
                }
            }
        });
        Ok(Tensor::from_vec(data, x.dims(), x.device())?)
    }
}

/// Largest `|x|` for which [`sin_squared`]'s three-part reduction by π/2 stays exact enough (Cephes'
/// bound for `sinf`); beyond it the scalar `sin` is used.
const SIN_SQUARED_MAX_ARG: f32 = 8192.0;

/// `sin²(x)` for `|x| ≤ SIN_SQUARED_MAX_ARG`, within ~1e-7 of the exact value (Cephes `sinf`/`cosf`
/// polynomials on [−π/4, π/4] after a Cody–Waite reduction by π/2; the square drops the quadrant's
/// sign, so only its parity picks sine or cosine). Branch-free, so loops over it vectorise.
#[inline(always)]
fn sin_squared(x: f32) -> f32 {
    const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
    const P1: f32 = 1.570_312_5;
    const P2: f32 = 4.837_512_969_970_703e-4;
    const P3: f32 = 7.549_789_954_891_882e-8;
    // Round to nearest (even) without a libm call: adding 1.5·2²³ leaves the integer part.
    const SHIFTER: f32 = 12_582_912.0;
    let k = (x * TWO_OVER_PI + SHIFTER) - SHIFTER;
    let r = ((x - k * P1) - k * P2) - k * P3;
    let r2 = r * r;
    let sin = r + r * r2 * (-1.666_665_461_1e-1 + r2 * (8.332_160_873_6e-3 + r2 * -1.951_529_589_1e-4));
    let cos = 1.0 - 0.5 * r2 + r2 * r2 * (4.166_664_568_298_827e-2 + r2 * (-1.388_731_625_493_765e-3 + r2 * 2.443_315_711_809_948e-5));
    let odd = (k as i32) & 1 == 1;
    let v = if odd { cos } else { sin };
    v * v
}

/// `nn.LayerNorm` over the last dimension (biased variance), with weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            bias: w.get(&[dim], "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// `Qwen3OmniMoeConvNeXtBlock`: depthwise causal conv (kernel 7), LayerNorm, pointwise MLP with
/// exact GELU, per-channel `gamma`, residual.
#[derive(Debug, Clone)]
pub struct ConvNeXtBlock {
    dwconv: CausalConv1d,
    norm: LayerNorm,
    pwconv1: Linear,
    pwconv2: Linear,
    /// `[1, 1, dim]`.
    gamma: Tensor,
}

impl ConvNeXtBlock {
    pub fn new(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            dwconv: CausalConv1d::new(&w.pp("dwconv"), dim, dim, 7, 1, 1, dim)?,
            norm: LayerNorm::new(&w.pp("norm"), dim, 1e-6)?,
            pwconv1: Linear::load(&w.pp("pwconv1"), dim, 4 * dim, true)?,
            pwconv2: Linear::load(&w.pp("pwconv2"), 4 * dim, dim, true)?,
            gamma: w.get(&[dim], "gamma")?.reshape((1, 1, dim))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. Depthwise causal conv: [b, c, t].
        let h = self.dwconv.forward(x)?;
        self.after_dwconv(x, h)
    }

    /// Streaming over new columns `x`: the depthwise conv carries `tail` (see [`CausalConv1d::step`]),
    /// the rest is per column.
    pub fn step(&self, tail: &mut Tensor, x: &Tensor) -> Result<Tensor> {
        let h = self.dwconv.step(tail, x)?;
        self.after_dwconv(x, h)
    }

    pub fn initial_tail(&self, device: &Device) -> Result<Tensor> {
        self.dwconv.initial_tail(device)
    }

    fn after_dwconv(&self, x: &Tensor, h: Tensor) -> Result<Tensor> {
        // 2. Channels last, LayerNorm, MLP: [b, t, c] → [b, t, 4c] → [b, t, c].
        let h = h.transpose(1, 2)?.contiguous()?;
        let h = self.norm.forward(&h)?;
        let h = self.pwconv1.forward(&h)?.gelu_erf()?;
        let h = self.pwconv2.forward(&h)?;
        // 3. Layer scale, back to [b, c, t], residual.
        let h = h.broadcast_mul(&self.gamma)?.transpose(1, 2)?;
        Ok((x + h)?)
    }
}

/// `Qwen3OmniMoeCode2WavDecoderResidualUnit`: Snake → dilated causal conv (7) → Snake → conv (1), residual.
#[derive(Debug, Clone)]
pub struct ResidualUnit {
    act1: SnakeBeta,
    conv1: CausalConv1d,
    act2: SnakeBeta,
    conv2: CausalConv1d,
}

impl ResidualUnit {
    pub fn new(w: &Weights, dim: usize, dilation: usize) -> Result<Self> {
        Ok(Self {
            act1: SnakeBeta::new(&w.pp("act1"), dim)?,
            conv1: CausalConv1d::new(&w.pp("conv1"), dim, dim, 7, dilation, 1, 1)?,
            act2: SnakeBeta::new(&w.pp("act2"), dim)?,
            conv2: CausalConv1d::new(&w.pp("conv2"), dim, dim, 1, 1, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.act1.forward(x)?)?;
        let h = self.conv2.forward(&self.act2.forward(&h)?)?;
        Ok((h + x)?)
    }

    /// Streaming: only the dilated conv looks back (`tail`); the kernel-1 conv does not.
    fn step(&self, tail: &mut Tensor, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.step(tail, &self.act1.forward(x)?)?;
        let h = self.conv2.forward(&self.act2.forward(&h)?)?;
        Ok((h + x)?)
    }
}

/// What a streaming [`DecoderBlock::step`] carries between calls.
#[derive(Debug, Clone)]
pub struct DecoderBlockState {
    upsample: TransConvState,
    /// One conv tail per residual unit.
    units: Vec<Tensor>,
}

/// `Qwen3OmniMoeCode2WavDecoderBlock`: Snake, transposed conv (kernel `2r`, stride `r`) halving the
/// channels, then residual units with dilations 1, 3, 9 (`block.0` … `block.4`).
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    snake: SnakeBeta,
    upsample: CausalTransConv1d,
    units: Vec<ResidualUnit>,
}

impl DecoderBlock {
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, rate: usize) -> Result<Self> {
        let w = w.pp("block");
        let units = [1, 3, 9]
            .iter()
            .enumerate()
            .map(|(i, &d)| ResidualUnit::new(&w.pp(i + 2), out_dim, d))
            .collect::<Result<_>>()?;
        Ok(Self {
            snake: SnakeBeta::new(&w.pp(0), in_dim)?,
            upsample: CausalTransConv1d::new(&w.pp(1), in_dim, out_dim, 2 * rate, rate)?,
            units,
        })
    }

    /// `[b, in_dim, t]` → `[b, out_dim, (t - 1)·rate]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.upsample.forward(&self.snake.forward(x)?)?;
        for unit in &self.units {
            h = unit.forward(&h)?;
        }
        Ok(h)
    }

    pub fn initial_state(&self, device: &Device) -> Result<DecoderBlockState> {
        Ok(DecoderBlockState {
            upsample: TransConvState::default(),
            units: self
                .units
                .iter()
                .map(|u| u.conv1.initial_tail(device))
                .collect::<Result<_>>()?,
        })
    }

    /// Streaming: the samples that the new columns `x` complete (see [`CausalTransConv1d::step`]).
    pub fn step(&self, state: &mut DecoderBlockState, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(mut h) = self.upsample.step(&mut state.upsample, &self.snake.forward(x)?)? else {
            return Ok(None);
        };
        for (unit, tail) in self.units.iter().zip(&mut state.units) {
            h = unit.step(tail, &h)?;
        }
        Ok(Some(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sin_squared_is_within_2e_7_of_f64() {
        let mut worst = 0f64;
        let mut x = -SIN_SQUARED_MAX_ARG;
        while x <= SIN_SQUARED_MAX_ARG {
            for dx in [0.0f32, 1e-3, 0.123_456, 0.785_398_2, 1.570_796_4] {
                let v = x + dx;
                if v.abs() > SIN_SQUARED_MAX_ARG {
                    continue;
                }
                let exact = (v as f64).sin().powi(2);
                worst = worst.max((sin_squared(v) as f64 - exact).abs());
            }
            x += 0.618_034;
        }
        for v in [0.0f32, 1e-30, -1e-30, 1e-6, 3.0, -3.0, std::f32::consts::PI, 1e4 / 3.0] {
            worst = worst.max((sin_squared(v) as f64 - (v as f64).sin().powi(2)).abs());
        }
        eprintln!("worst |sin_squared - sin²| = {worst:.2e}");
        assert!(worst < 2e-7, "worst |sin_squared - sin²| = {worst:.2e}");
    }

    #[test]
    fn causal_padding_matches_the_reference_formula() {
        // The reference's float arithmetic, transcribed.
        fn reference(len: usize, k: usize, s: usize) -> usize {
            let padding = (k - s) as f64;
            let n_frames = (len as f64 - k as f64 + padding) / s as f64 + 1.0;
            let ideal = (n_frames.ceil() - 1.0) * s as f64 + (k as f64 - padding);
            (ideal - len as f64) as usize
        }
        for len in 1..40 {
            for (k, s) in [(7, 1), (1, 1), (19, 1), (55, 1), (4, 2), (7, 3), (5, 5)] {
                assert_eq!(
                    extra_padding(len, k, s),
                    reference(len, k, s),
                    "len {len} k {k} s {s}"
                );
                assert_eq!(
                    causal_conv_len(len, k, s),
                    len.div_ceil(s),
                    "len {len} k {k} s {s}"
                );
            }
            // Stride 1 (every conv of the model): no right padding, length kept.
            assert_eq!(extra_padding(len, 7, 1), 0);
        }
    }

    #[test]
    fn transposed_conv_trims_both_sides() {
        // Upsampling blocks: kernel = stride = f, nothing trimmed.
        assert_eq!(trans_conv_len(10, 2, 2), Some(20));
        // Decoder blocks: kernel 2r, stride r → (len - 1)·r.
        assert_eq!(trans_conv_len(4, 16, 8), Some(24));
        assert_eq!(trans_conv_len(24, 10, 5), Some(115));
        assert_eq!(trans_conv_len(1, 16, 8), None);
        assert_eq!(trans_conv_len(0, 2, 2), None);
    }

    /// Naive direct convolution for checking the fast paths.
    #[allow(clippy::needless_range_loop)]
    fn naive_conv(
        x: &[Vec<f32>],
        w: &[Vec<Vec<f32>>],
        bias: &[f32],
        dil: usize,
        groups: usize,
    ) -> Vec<Vec<f32>> {
        let (c_in, len) = (x.len(), x[0].len());
        let (c_out, k) = (w.len(), w[0][0].len());
        let span = (k - 1) * dil + 1;
        let (in_per, out_per) = (c_in / groups, c_out / groups);
        (0..c_out)
            .map(|o| {
                let g = o / out_per;
                (0..len)
                    .map(|t| {
                        let mut acc = bias[o];
                        for ci in 0..in_per {
                            for j in 0..k {
                                // Input index with the causal left padding of span - 1.
                                let idx = t as isize + (j * dil) as isize - (span - 1) as isize;
                                if idx >= 0 {
                                    acc += w[o][ci][j] * x[g * in_per + ci][idx as usize];
                                }
                            }
                        }
                        acc
                    })
                    .collect()
            })
            .collect()
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    fn conv_from(
        weight: Vec<f32>,
        c_in: usize,
        c_out: usize,
        k: usize,
        dil: usize,
        groups: usize,
    ) -> CausalConv1d {
        let dev = Device::Cpu;
        let wt = Tensor::from_vec(weight, (c_out, c_in / groups, k), &dev).unwrap();
        let bias = Tensor::from_vec(pseudo(c_out, 9), (1, c_out, 1), &dev).unwrap();
        CausalConv1d::from_tensors(wt, bias, dil, 1, groups).unwrap()
    }

    #[test]
    fn causal_conv_paths_match_a_direct_convolution() {
        let dev = Device::Cpu;
        for (c_in, c_out, k, dil, groups) in [
            (3, 5, 7, 3, 1),
            (4, 4, 7, 1, 4),
            (4, 2, 1, 1, 1),
            (4, 6, 3, 2, 2),
        ] {
            let len = 23;
            let xs = pseudo(c_in * len, 1);
            let ws = pseudo(c_out * (c_in / groups) * k, 2);
            let conv = conv_from(ws.clone(), c_in, c_out, k, dil, groups);
            let x = Tensor::from_vec(xs.clone(), (1, c_in, len), &dev).unwrap();
            let got = conv
                .forward(&x)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let xv: Vec<Vec<f32>> = xs.chunks(len).map(|c| c.to_vec()).collect();
            let wv: Vec<Vec<Vec<f32>>> = ws
                .chunks((c_in / groups) * k)
                .map(|o| o.chunks(k).map(|c| c.to_vec()).collect())
                .collect();
            let want = naive_conv(&xv, &wv, &pseudo(c_out, 9), dil, groups);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{c_in}->{c_out} k{k} d{dil} g{groups}: {g} vs {w}"
                );
            }
        }
    }

    /// Equal shapes, values equal to the products' rounding (their blocking depends on the width).
    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: channels");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len(), "{what}: length");
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: {a} vs {b}");
            }
        }
    }

    /// Streams `x` `[1, c, len]` through `step` in chunks of the given sizes, concatenating outputs.
    fn streamed(x: &Tensor, chunks: &[usize], mut step: impl FnMut(&Tensor) -> Option<Tensor>) -> Vec<Vec<f32>> {
        let mut at = 0;
        let mut parts = Vec::new();
        for &n in chunks {
            if let Some(y) = step(&x.narrow(2, at, n).unwrap()) {
                parts.push(y);
            }
            at += n;
        }
        assert_eq!(at, x.dim(2).unwrap());
        Tensor::cat(&parts, 2).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn streaming_steps_equal_the_whole_sequence() {
        let dev = Device::Cpu;
        let (c_in, c_out, len) = (4, 3, 23);
        let chunkings: [&[usize]; 4] = [&[23], &[1; 23], &[1, 2, 5, 15], &[7, 7, 7, 2]];
        let x = Tensor::from_vec(pseudo(c_in * len, 5), (1, c_in, len), &dev).unwrap();
        // Causal convs: dense dilated, depthwise, kernel 1.
        for (c_out, k, dil, groups) in [(c_out, 7, 3, 1), (c_in, 7, 1, c_in), (c_out, 1, 1, 1)] {
            let conv = conv_from(pseudo(c_out * (c_in / groups) * k, 6), c_in, c_out, k, dil, groups);
            let whole = conv.forward(&x).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for chunks in chunkings {
                let mut tail = conv.initial_tail(&dev).unwrap();
                let got = streamed(&x, chunks, |xs| Some(conv.step(&mut tail, xs).unwrap()));
                assert_close(&got, &whole, &format!("conv k{k} d{dil} g{groups}, chunks {chunks:?}"));
            }
        }
        // Transposed convs: decoder-block geometry (k = 2s, trimmed) and upsampling (k = s).
        for (k, s) in [(6, 3), (16, 8), (2, 2)] {
            let conv = CausalTransConv1d::from_tensors(
                Tensor::from_vec(pseudo(c_in * c_out * k, 7), (c_in, c_out, k), &dev).unwrap(),
                Tensor::from_vec(pseudo(c_out, 8), (1, c_out, 1), &dev).unwrap(),
                s,
            )
            .unwrap();
            let whole = conv.forward(&x).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for chunks in chunkings {
                let mut state = TransConvState::default();
                let got = streamed(&x, chunks, |xs| conv.step(&mut state, xs).unwrap());
                assert_close(&got, &whole, &format!("transposed conv k{k} s{s}, chunks {chunks:?}"));
            }
        }
    }

    #[test]
    fn transposed_conv_matches_a_direct_definition() {
        let dev = Device::Cpu;
        let (c_in, c_out, k, s, len) = (3, 2, 6, 3, 5);
        let ws = pseudo(c_in * c_out * k, 3);
        let xs = pseudo(c_in * len, 4);
        let conv = CausalTransConv1d::from_tensors(
            Tensor::from_vec(ws.clone(), (c_in, c_out, k), &dev).unwrap(),
            Tensor::zeros((1, c_out, 1), candle_core::DType::F32, &dev).unwrap(),
            s,
        )
        .unwrap();
        let got = conv
            .forward(&Tensor::from_vec(xs.clone(), (1, c_in, len), &dev).unwrap())
            .unwrap();
        let got = got.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got[0].len(), (len - 1) * s);
        for (o, row) in got.iter().enumerate() {
            for (m, v) in row.iter().enumerate() {
                // y[n] = Σ_i Σ_c x[c][i] · w[c][o][n - i·s], at n = m + (k - s).
                let n = m + k - s;
                let mut want = 0f32;
                for c in 0..c_in {
                    for i in 0..len {
                        if n >= i * s && n - i * s < k {
                            want += xs[c * len + i] * ws[(c * c_out + o) * k + n - i * s];
                        }
                    }
                }
                assert!((v - want).abs() < 1e-4, "out {o} t {m}: {v} vs {want}");
            }
        }
    }
}
