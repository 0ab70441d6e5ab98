//! The Code2Wav pre-transformer: a small causal decoder with sliding-window attention, 1-D rotary
//! positions and layer scale, run over the mean code embeddings of each frame.
//!
//! Reference classes in transformers' `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py`:
//! `Qwen3OmniMoeCode2WavTransformerModel`, `Qwen3OmniMoeCode2WavTransformerLayer`,
//! `Qwen3OmniMoeCode2WavAttention`, `Qwen3OmniMoeCode2WavMlp`, `Qwen3OmniMoeCode2WavRMSNorm`,
//! `Qwen3OmniMoeCode2WavLayerScale`, with `Qwen3OmniMoeRotaryEmbedding` (default rope, NeoX
//! `rotate_half` pairing) and `create_sliding_window_causal_mask` (query `i` sees keys
//! `i - window < j <= i`). No q/k norm (the reference's are `nn.Identity`). The whole-sequence
//! [`PreTransformer::forward`] is the reference; [`PreTransformer::forward_carried`] runs new frames
//! against the keys/values of the last `window - 1` frames kept from earlier calls ([`KvWindow`]),
//! which is the same attention (nothing older is visible). Checkpoint paths:
//! `code2wav.pre_transformer.*`.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

use crate::config::Code2WavConfig;
use crate::nn::{silu, Linear, RmsNorm};
use crate::thinker::rope::{apply_rotary, text_positions, MultimodalRope};
use crate::weights::Weights;

/// Additive mask `[t, t]`: 0 where key `j` is visible to query `i` (`i - window < j <= i`), else -inf.
pub fn sliding_window_mask(t: usize, window: usize, device: &Device) -> Result<Tensor> {
    sliding_window_mask_after(t, 0, window, device)
}

/// Additive mask `[t, past + t]` for `t` queries following `past` earlier keys: query `i` sits at
/// key index `past + i` and sees keys `j` with `past + i - window < j <= past + i`.
pub fn sliding_window_mask_after(t: usize, past: usize, window: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            let at = past + i;
            (0..past + t).map(move |j| {
                if j <= at && j + window > at {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (t, past + t), device)?)
}

/// Keys (after rotary) and values of the last frames of one layer, `[b, kv_heads, frames, head_dim]`,
/// carried from one [`PreTransformer::forward_carried`] call to the next.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    fn frames(&self) -> Result<usize> {
        Ok(match &self.k {
            Some(k) => k.dim(2)?,
            None => 0,
        })
    }
}

/// What [`PreTransformer::forward_carried`] keeps between calls: the next frame's position and every
/// layer's keys/values of the last `sliding_window - 1` frames.
#[derive(Debug, Clone, Default)]
pub struct KvWindow {
    position: usize,
    layers: Vec<LayerKv>,
}

/// `Qwen3OmniMoeCode2WavAttention`: multi-head (optionally grouped) causal attention with rotary.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Code2WavConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let (nh, nkv) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        );
        let hd = h / nh;
        // `attention_bias` (default false) is not parsed by `Code2WavConfig`: follow the checkpoint.
        let bias = w.pp("q_proj").contains("bias");
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), h, nh * hd, bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), h, nkv * hd, bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), h, nkv * hd, bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), nh * hd, h, bias)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `past` holds the keys/values before `x`'s frames (empty for a whole sequence) and gets
    /// `x`'s appended; `mask` is `[t, past + t]`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: &mut LayerKv,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        // 1. Projections: [b, t, heads·hd] → [b, heads, t, hd].
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, self.num_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, self.num_kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, self.num_kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        // 2. Rotary positions 0..t.
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        // 3. Earlier frames' keys/values first: [b, kv, past + t, hd].
        let (k, v) = match (past.k.take(), past.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        let keys = k.dim(2)?;
        past.k = Some(k.clone());
        past.v = Some(v.clone());
        // 4. Grouped heads: [b, kv, groups·t, hd] against [b, kv, keys, hd], sliding-window causal mask.
        let groups = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, groups * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let mask = mask
            .unsqueeze(0)?
            .expand((groups, t, keys))?
            .reshape((groups * t, keys))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = probs.matmul(&v)?; // [b, kv, groups·t, hd]
        // 5. Back to [b, t, heads·hd], output projection.
        let out = out
            .reshape((b, self.num_heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * hd))?;
        self.o_proj.forward(&out)
    }
}

/// `Qwen3OmniMoeCode2WavMlp`: `down(silu(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Code2WavConfig, w: &Weights) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), h, i, false)?,
            up_proj: Linear::load(&w.pp("up_proj"), h, i, false)?,
            down_proj: Linear::load(&w.pp("down_proj"), i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
    }
}

/// `Qwen3OmniMoeCode2WavTransformerLayer`: pre-norm attention and MLP, each residual branch
/// multiplied by its `LayerScale` vector.
#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    self_attn_layer_scale: Tensor,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    mlp_layer_scale: Tensor,
}

impl Layer {
    fn new(cfg: &Code2WavConfig, w: &Weights, eps: f64) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, eps)?,
            self_attn: Attention::new(cfg, &w.pp("self_attn"))?,
            self_attn_layer_scale: w.pp("self_attn_layer_scale").get(&[h], "scale")?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, eps)?,
            mlp: Mlp::new(cfg, &w.pp("mlp"))?,
            mlp_layer_scale: w.pp("mlp_layer_scale").get(&[h], "scale")?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: &mut LayerKv,
    ) -> Result<Tensor> {
        // 1. x + scale_attn · attn(norm(x)).
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask, past)?;
        let x = (x + a.broadcast_mul(&self.self_attn_layer_scale)?)?;
        // 2. x + scale_mlp · mlp(norm(x)).
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((&x + m.broadcast_mul(&self.mlp_layer_scale)?)?)
    }
}

/// `Qwen3OmniMoeCode2WavTransformerModel` on `inputs_embeds` (`[b, t, hidden]`), positions `0..t`.
#[derive(Debug, Clone)]
pub struct PreTransformer {
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope: MultimodalRope,
    sliding_window: usize,
}

impl PreTransformer {
    /// `w` is `code2wav.pre_transformer`.
    pub fn new(cfg: &Code2WavConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_key_value_heads.unwrap_or(nh);
        ensure!(
            nh > 0 && nkv > 0 && h % nh == 0,
            "code2wav_config: hidden_size {h} is not a multiple of {nh} heads"
        );
        ensure!(
            nh % nkv == 0,
            "code2wav_config: {nh} attention heads are not a multiple of {nkv} key/value heads"
        );
        ensure!(
            cfg.sliding_window > 0,
            "code2wav_config: sliding_window must be positive"
        );
        let eps = cfg.rms_norm_eps.unwrap_or(1e-5);
        let theta = cfg.rope_fields.resolve(10000.0)?.theta;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &w.pp("layers").pp(i), eps))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            norm: RmsNorm::load(&w.pp("norm"), h, eps)?,
            rope: MultimodalRope::new(h / nh, theta, &[])?,
            sliding_window: cfg.sliding_window,
        })
    }

    /// `[b, t, hidden]` → `[b, t, hidden]`, positions `0..t`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_carried(x, &mut KvWindow::default())
    }

    /// The frames `x` (`[b, t, hidden]`) following those of earlier calls with the same `carried`
    /// state: positions continue from there and attention sees the earlier frames' keys/values.
    /// Outputs equal [`forward`](Self::forward)'s rows for the concatenated frames.
    pub fn forward_carried(&self, x: &Tensor, carried: &mut KvWindow) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        if carried.layers.is_empty() {
            carried.layers = vec![LayerKv::default(); self.layers.len()];
        }
        let past = carried.layers[0].frames()?;
        // 1. Rotary tables for the positions after the carried ones (plain 1-D rope) and the
        //    sliding-window causal mask over [past frames, new frames].
        let (cos, sin) = self
            .rope
            .cos_sin(&text_positions(carried.position as i64, t), x.device())?;
        let mask = sliding_window_mask_after(t, past, self.sliding_window, x.device())?;
        // 2. Layers, 3. final RMSNorm.
        let mut h = x.clone();
        for (layer, kv) in self.layers.iter().zip(&mut carried.layers) {
            h = layer.forward(&h, &cos, &sin, &mask, kv)?;
        }
        // 4. Keep what the next frames can see: the last `window - 1` frames.
        carried.position += t;
        let keep = (past + t).min(self.sliding_window - 1);
        for kv in &mut carried.layers {
            for tensor in [&mut kv.k, &mut kv.v] {
                if let Some(x) = tensor.take() {
                    let n = x.dim(2)?;
                    *tensor = (keep > 0).then(|| x.narrow(2, n - keep, keep)).transpose()?;
                }
            }
        }
        self.norm.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_mask_sees_window_keys_including_itself() {
        let m = sliding_window_mask(6, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in m.iter().enumerate() {
            let visible: Vec<usize> = (0..6).filter(|&j| row[j] == 0.0).collect();
            let want: Vec<usize> = (i.saturating_sub(2)..=i).collect();
            assert_eq!(visible, want, "query {i}");
        }
        // A window longer than the sequence is plain causal.
        let m = sliding_window_mask(4, 72, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(m[3].iter().all(|&v| v == 0.0) && m[0][1] == f32::NEG_INFINITY);
    }

    #[test]
    fn mask_after_earlier_keys_is_the_whole_masks_last_rows() {
        let (past, t, window) = (5, 3, 4);
        let whole = sliding_window_mask(past + t, window, &Device::Cpu).unwrap();
        let after = sliding_window_mask_after(t, past, window, &Device::Cpu).unwrap();
        assert_eq!(
            after.to_vec2::<f32>().unwrap(),
            whole.narrow(0, past, t).unwrap().to_vec2::<f32>().unwrap()
        );
    }
}
