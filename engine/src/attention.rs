//! GQA self-attention with per-head q/k RMSNorm, rotary positions and a KV cache: the Thinker's,
//! the Talker's and the code predictor's (one block, three configs).
//!
//! Reference: `Qwen3OmniMoeThinkerTextAttention` (transformers' `modeling_qwen3_omni_moe.py`; the
//! Talker's decoder uses it as is, `Qwen3OmniMoeTalkerCodePredictorAttention` is the same maths):
//! `q_norm(q_proj(x))`, `k_norm(k_proj(x))`, M-RoPE, `softmax(q kᵀ / √d + causal mask) v`, `o_proj`.
//!
//! On the CPU the core (rotary, cache append, scores, softmax, weighted sum) runs on plain floats
//! over a token-major cache that grows in place: candle's version copied the whole cache at every
//! step (`cat`), expanded the mask per call and ran its element-wise ops on one thread, which cost
//! more than the decode step's matrix products. Other devices keep the tensor path.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::TextConfig;
use crate::nn::{Linear, RmsNorm};
use crate::thinker::rope::apply_rotary;
use crate::weights::Weights;

/// Keys and values of every layer for the tokens seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

#[derive(Debug, Clone, Default)]
enum LayerKv {
    #[default]
    Empty,
    /// Token-major `[s, kv_heads, head_dim]` each.
    Host { k: Vec<f32>, v: Vec<f32> },
    /// `[b, kv_heads, s, head_dim]` each.
    Device(Tensor, Tensor),
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerKv::Empty; num_layers], len: 0 }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that every layer now holds `len` positions (after a forward pass appended to all).
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Forgets every position from `len` on. Positions are only ever appended, never rewritten, so
    /// this is the cache as it was when it held `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        let old = self.len;
        for layer in &mut self.layers {
            match layer {
                LayerKv::Empty => {}
                LayerKv::Host { k, v } => {
                    let (kw, vw) = (k.len() / old, v.len() / old);
                    k.truncate(len * kw);
                    v.truncate(len * vw);
                }
                LayerKv::Device(k, v) => {
                    *layer = LayerKv::Device(k.narrow(2, 0, len)?, v.narrow(2, 0, len)?);
                }
            }
        }
        self.len = len;
        Ok(())
    }

    fn append_device(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match std::mem::take(&mut self.layers[layer]) {
            LayerKv::Empty => (k, v),
            LayerKv::Device(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            LayerKv::Host { .. } => {
                anyhow::bail!("KV cache layer {layer} is on the host, the model on a device")
            }
        };
        self.layers[layer] = LayerKv::Device(kv.0.clone(), kv.1.clone());
        Ok(kv)
    }

    /// Appends token-major rows and returns the layer's whole host cache.
    fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(&[f32], &[f32])> {
        if matches!(self.layers[layer], LayerKv::Empty) {
            self.layers[layer] = LayerKv::Host { k: Vec::new(), v: Vec::new() };
        }
        match &mut self.layers[layer] {
            LayerKv::Host { k: ck, v: cv } => {
                ck.extend_from_slice(k);
                cv.extend_from_slice(v);
                Ok((ck, cv))
            }
            _ => anyhow::bail!("KV cache layer {layer} is on a device, the model on the host"),
        }
    }
}

/// Rotary tables of one forward pass: tensors for the device path, plain rows for the CPU one.
pub struct RopeRows {
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[t, head_dim]` each, filled only on the CPU.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
}

impl RopeRows {
    pub fn new(cos: Tensor, sin: Tensor) -> Result<Self> {
        let host = cos.device().is_cpu();
        let rows =
            |t: &Tensor| -> Result<Vec<f32>> { Ok(if host { t.flatten_all()?.to_vec1::<f32>()? } else { Vec::new() }) };
        Ok(Self { cos_host: rows(&cos)?, sin_host: rows(&sin)?, cos, sin })
    }
}

/// Shapes of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub bias: bool,
}

impl AttentionDims {
    /// The attention of a decoder that `cfg` (a Thinker or Talker `text_config`) describes.
    pub fn of_text_config(cfg: &TextConfig) -> Self {
        Self {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps,
            bias: cfg.attention_bias,
        }
    }
}

/// GQA self-attention with per-head q/k RMSNorm.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Multiply-adds of the core at least before it is spread over the worker pool.
const PARALLEL_CORE_MACS: usize = 1 << 16;

impl Attention {
    pub fn new(d: AttentionDims, w: &Weights) -> Result<Self> {
        let (h, hd, nh, nkv, bias) = (d.hidden, d.head_dim, d.heads, d.kv_heads, d.bias);
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), h, nh * hd, bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), h, nkv * hd, bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), h, nkv * hd, bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), nh * hd, h, bias)?,
            q_norm: RmsNorm::load(&w.pp("q_norm"), hd, d.eps)?,
            k_norm: RmsNorm::load(&w.pp("k_norm"), hd, d.eps)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x [1, t, hidden]` at the positions of `rope`, after the cached ones; causal over all of them.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeRows,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        // 1. Projections, per-head norm: [b, t, heads, hd].
        let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("three projections"))?;
        let out = if x.device().is_cpu() && b == 1 && self.q_norm.on_host() && self.k_norm.on_host() {
            self.core_host(&q, &k, &v, rope, cache, layer, x.device())?
        } else {
            let q = self.q_norm.forward(&q.reshape((b, t, self.num_heads, hd))?)?;
            let k = self.k_norm.forward(&k.reshape((b, t, self.num_kv_heads, hd))?)?;
            let v = v.reshape((b, t, self.num_kv_heads, hd))?;
            self.core_device(q, k, v, rope, mask, cache, layer)?
        };
        self.o_proj.forward(&out)
    }

    /// Steps 2-4 on plain floats from the projections `[1, t, heads·hd]` (q/k not yet normed):
    /// `[1, t, heads·hd]`.
    #[allow(clippy::too_many_arguments)]
    fn core_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &RopeRows,
        cache: &mut KvCache,
        layer: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let _span = crate::profile::span("attention core");
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let t = q.dim(1)?;
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        // 2. Per head row: the q/k RMSNorm, then rotary (NeoX pairs: x[i] with x[i + hd/2]), in one
        //    pass over the rows with the arithmetic of `RmsNorm::forward` and `rotate`; then into the cache.
        norm_and_rotate(&mut q, nh, hd, &self.q_norm, rope);
        norm_and_rotate(&mut k, nkv, hd, &self.k_norm, rope);
        let (keys, values) = cache.append_host(layer, &k, &v)?;
        let s = keys.len() / (nkv * hd);
        let past = s - t;
        // 3. Per (query row, head): softmax(q·k / √d) over keys 0..=past+i, times the values.
        let scale = 1.0 / (hd as f32).sqrt();
        let groups = nh / nkv;
        let mut out = vec![0f32; t * nh * hd];
        let one = |(idx, o): (usize, &mut [f32])| {
            let (i, head) = (idx / nh, idx % nh);
            let qrow = &q[(i * nh + head) * hd..][..hd];
            let kv = KvRows { keys, values, stride: nkv * hd, offset: (head / groups) * hd, hd };
            attend(qrow, &kv, 0..past + i + 1, scale, o);
        };
        if t * nh * s * hd >= PARALLEL_CORE_MACS {
            out.par_chunks_mut(hd).enumerate().for_each(one);
        } else {
            out.chunks_mut(hd).enumerate().for_each(one);
        }
        // 4. [1, t, heads·hd], head order.
        Ok(Tensor::from_vec(out, (1, t, nh * hd), device)?)
    }

    /// Steps 2-4 with tensor ops (devices other than the CPU).
    #[allow(clippy::too_many_arguments)]
    fn core_device(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: &RopeRows,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _, hd) = q.dims4()?;
        // [b, t, heads, hd] → [b, heads, t, hd].
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // 2. Rotary on the new positions, then append to the cache: k, v [b, kv_heads, s, hd].
        let q = apply_rotary(&q, &rope.cos, &rope.sin)?;
        let k = apply_rotary(&k, &rope.cos, &rope.sin)?;
        let (k, v) = cache.append_device(layer, k, v)?;
        let s = k.dim(2)?;
        // 3. Grouped heads: [b, kv, groups·t, hd] against [b, kv, s, hd].
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, groups * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            // mask [t, s] repeated for each group: [groups·t, s].
            let mask = mask.unsqueeze(0)?.expand((groups, t, s))?.reshape((groups * t, s))?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [b, kv, groups·t, hd]
                                     // 4. Back to [b, t, heads·hd] in head order (head = kv·groups + g).
        Ok(out.reshape((b, self.num_heads, t, hd))?.transpose(1, 2)?.reshape((b, t, self.num_heads * hd))?)
    }
}

/// Keys and values of one KV head inside token-major rows: row `j` at `j·stride + offset`.
struct KvRows<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    offset: usize,
    hd: usize,
}

/// `out += softmax(q·k_j · scale over j in rows) · v_j` (`out` starts at zero).
fn attend(q: &[f32], kv: &KvRows<'_>, rows: std::ops::Range<usize>, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX.
        return unsafe { attend_avx(q, kv, rows, scale, out) };
    }
    attend_body(q, kv, rows, scale, out)
}

/// [`attend`] compiled for 256-bit vectors: the value sums (multiply, then add per element) and the
/// dot products keep their bits, only the vector width changes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn attend_avx(q: &[f32], kv: &KvRows<'_>, rows: std::ops::Range<usize>, scale: f32, out: &mut [f32]) {
    attend_body(q, kv, rows, scale, out)
}

#[inline(always)]
fn attend_body(q: &[f32], kv: &KvRows<'_>, rows: std::ops::Range<usize>, scale: f32, out: &mut [f32]) {
    let at = |j: usize| j * kv.stride + kv.offset;
    let mut scores: Vec<f32> = rows.clone().map(|j| dot(q, &kv.keys[at(j)..][..kv.hd]) * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    for (j, &p) in rows.zip(&scores) {
        let p = p / sum;
        for (acc, &val) in out.iter_mut().zip(&kv.values[at(j)..][..kv.hd]) {
            *acc += p * val;
        }
    }
}

/// Bidirectional attention inside consecutive windows (the AuT encoder's): `q`, `k`, `v` are
/// token-major `[n, heads, hd]`, `windows` sum to `n`; returns `[n, heads·hd]`.
pub(crate) fn windowed_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    hd: usize,
    windows: &[usize],
) -> Vec<f32> {
    let n: usize = windows.iter().sum();
    let mut window_of = Vec::with_capacity(n);
    let mut start = 0;
    for &len in windows {
        window_of.extend(std::iter::repeat_n(start..start + len, len));
        start += len;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n * heads * hd];
    let one = |(idx, o): (usize, &mut [f32])| {
        let (i, head) = (idx / heads, idx % heads);
        let kv = KvRows { keys: k, values: v, stride: heads * hd, offset: head * hd, hd };
        attend(&q[(i * heads + head) * hd..][..hd], &kv, window_of[i].clone(), scale, o);
    };
    if n * n * heads * hd >= PARALLEL_CORE_MACS {
        out.par_chunks_mut(hd).enumerate().for_each(one);
    } else {
        out.chunks_mut(hd).enumerate().for_each(one);
    }
    out
}

/// `Σ a·b` in f32 with eight partial sums.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX.
        return unsafe { dot_avx(a, b) };
    }
    dot_portable(a, b)
}

/// `out[c] = dot(x, weights[c·k..(c+1)·k])` for every row `c` of `weights`: the same bits as
/// [`dot`] per output, four rows per pass over `x` (four independent add chains instead of one).
pub(crate) fn dot_rows(x: &[f32], weights: &[f32], out: &mut [f32]) {
    let k = x.len();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        let whole = out.len() / 4 * 4;
        for (c0, o) in (0..whole).step_by(4).zip(out.chunks_exact_mut(4)) {
            // SAFETY: the CPU has AVX; rows c0..c0+4 are in `weights`.
            o.copy_from_slice(&unsafe { dot4_avx(x, &weights[c0 * k..(c0 + 4) * k]) });
        }
        for c in whole..out.len() {
            out[c] = dot(x, &weights[c * k..(c + 1) * k]);
        }
        return;
    }
    for (o, w) in out.iter_mut().zip(weights.chunks_exact(k.max(1))) {
        *o = dot_portable(x, w);
    }
}

/// [`dot_avx`] of `x` with four consecutive rows of `w4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot4_avx(x: &[f32], w4: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = x.len();
    let whole = k / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    let px = x.as_ptr();
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 8 <= k and every row has k values.
        unsafe {
            let xv = _mm256_loadu_ps(px.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(xv, _mm256_loadu_ps(w4.as_ptr().add(r * k + i))));
            }
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for (r, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
        let w = &w4[r * k..(r + 1) * k];
        // Same operand order as `dot(x, w)`: x·w per element.
        let tail: f32 = x[whole..].iter().zip(&w[whole..]).map(|(a, b)| a * b).sum();
        out[r] = lanes.iter().sum::<f32>() + tail;
    }
    out
}

/// [`dot`]'s arithmetic in plain Rust (the default target has only 128-bit vectors).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorizes, and stays close to a pairwise sum.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// [`dot_portable`] in one 256-bit register: the same eight partial sums (multiply, then add: no
/// FMA), summed in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 8 <= n.
        acc = unsafe { _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)))) };
        i += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let tail: f32 = a[whole..n].iter().zip(&b[whole..n]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
#[test]
fn dot_avx_has_the_portable_bits() {
    let a: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1000) as f32 / 313.0 - 1.6).collect();
    let b: Vec<f32> = (0..1037).map(|i| ((i * 104729) % 997) as f32 / 211.0 - 2.3).collect();
    for n in [0, 5, 8, 64, 1037] {
        assert_eq!(dot(&a[..n], &b[..n]).to_bits(), dot_portable(&a[..n], &b[..n]).to_bits(), "n = {n}");
    }
    // Seven rows of 148 values: one pass of four, three single ones.
    let (k, rows) = (148, 7);
    let mut out = vec![0f32; rows];
    dot_rows(&a[..k], &b[..rows * k], &mut out);
    for (c, o) in out.iter().enumerate() {
        assert_eq!(o.to_bits(), dot_portable(&a[..k], &b[c * k..(c + 1) * k]).to_bits(), "row {c}");
    }
}

/// `[t, past + t]` additive causal mask (the tensor path): query i sees keys `0 ..= past + i`.
pub fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let data: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(data, (t, s), device)?)
}

/// `x [t, heads, hd]` rotated in place by `cos`/`sin` `[t, hd]`: `x·cos + rotate_half(x)·sin`.
#[cfg(test)]
fn rotate(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    for (row, head) in x.chunks_exact_mut(hd).enumerate() {
        let at = (row / heads) * hd;
        rotate_head(head, &cos[at..at + hd], &sin[at..at + hd]);
    }
}

/// Rotary on one head row with its position's `cos`/`sin` rows.
fn rotate_head(head: &mut [f32], c: &[f32], s: &[f32]) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * c[i] + (-b) * s[i];
        head[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/// `x [t, heads, hd]`: each head row through `norm`, then rotated at its token's position; spread over
/// the pool for a prefill's rows.
fn norm_and_rotate(x: &mut [f32], heads: usize, hd: usize, norm: &RmsNorm, rope: &RopeRows) {
    let (cos, sin) = (&rope.cos_host, &rope.sin_host);
    let one = |(row, head): (usize, &mut [f32])| {
        norm.norm_row(head);
        let at = (row / heads) * hd;
        rotate_head(head, &cos[at..at + hd], &sin[at..at + hd]);
    };
    if x.len() >= crate::nn::PARALLEL_ROWS_ELEMENTS {
        x.par_chunks_mut(hd).enumerate().for_each(one);
    } else {
        x.chunks_exact_mut(hd).enumerate().for_each(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rotation_equals_the_tensor_rotation() {
        let (t, heads, hd) = (3, 2, 8);
        let x: Vec<f32> = (0..t * heads * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let cos: Vec<f32> = (0..t * hd).map(|i| (i as f32 * 0.11).cos()).collect();
        let sin: Vec<f32> = (0..t * hd).map(|i| (i as f32 * 0.11).sin()).collect();
        let mut host = x.clone();
        rotate(&mut host, heads, hd, &cos, &sin);
        let dev = Device::Cpu;
        // Tensor path: [1, heads, t, hd].
        let xt = Tensor::from_vec(x, (1, t, heads, hd), &dev).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let c = Tensor::from_vec(cos, (t, hd), &dev).unwrap();
        let s = Tensor::from_vec(sin, (t, hd), &dev).unwrap();
        let want = apply_rotary(&xt, &c, &s).unwrap().transpose(1, 2).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        let err = host.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-6, "rotation differs by {err}");
    }

    /// Truncating and appending again equals appending the same rows to the shorter cache.
    #[test]
    fn truncated_cache_equals_the_cache_at_that_length() {
        let row = |i: usize| -> Vec<f32> { (0..6).map(|j| (i * 10 + j) as f32).collect() };
        let fill = |cache: &mut KvCache, rows: std::ops::Range<usize>| {
            for i in rows {
                for layer in 0..2 {
                    let (k, v) = (row(i), row(i + 100));
                    cache.append_host(layer, &k, &v).unwrap();
                }
                cache.set_len(i + 1);
            }
        };
        let (mut long, mut short) = (KvCache::new(2), KvCache::new(2));
        fill(&mut long, 0..5);
        long.truncate(3).unwrap();
        assert_eq!(long.len(), 3);
        fill(&mut long, 3..4);
        fill(&mut short, 0..4);
        for layer in 0..2 {
            let (LayerKv::Host { k: a, v: b }, LayerKv::Host { k: c, v: d }) = (&long.layers[layer], &short.layers[layer]) else {
                panic!("host layers")
            };
            assert_eq!((a, b), (c, d), "layer {layer}");
        }
        long.truncate(9).unwrap();
        assert_eq!(long.len(), 4, "truncating past the end keeps everything");
    }
}
