//! The vision encoder (`thinker.visual.*`): image pixels → Thinker tokens, plus the deepstack features
//! that are added to the Thinker's first decoder layers.
//!
//! Reference: `Qwen3OmniMoeVisionEncoder` and the classes above it in transformers'
//! `models/qwen3_omni_moe/modeling_qwen3_omni_moe.py` (the Qwen3-VL design):
//! 1. `patch_embed`: a Conv3d whose kernel equals its stride, i.e. one matmul over each flattened
//!    `[3, temporal, patch, patch]` patch;
//! 2. learned `pos_embed` (`side × side` table) bilinearly resampled to the grid (align_corners) and added;
//! 3. `depth` pre-norm blocks (LayerNorm eps 1e-6, attention with a fused qkv bias and the axial 2-D
//!    rotary, MLP with `hidden_act`), attention limited to each frame (`cu_seqlens`);
//! 4. after block `deepstack_visual_indexes[i]`, `merger_list[i]` (post-shuffle LayerNorm over the
//!    `merge²` concatenated patches, Linear, exact GELU, Linear) makes deepstack level `i`;
//! 5. `merger` (LayerNorm per patch, then the same MLP) makes the Thinker tokens.
//!
//! Every matrix goes through [`crate::nn::Linear`].

pub mod preprocess;
pub mod rope;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};

use crate::config::VisionEncoderConfig;
use crate::nn::{gelu, LayerNorm, Linear};
use crate::weights::Weights;
pub use preprocess::{load_image, preprocess, ImagePixels, ImageProcessorConfig, RgbImage};
use rope::{interpolation_taps, patch_coordinates, VisionRope};

/// The rotary base of the vision tower (`rope_parameters.rope_theta`, absent from the released
/// config.json, so the reference's default applies).
pub const VISION_ROPE_THETA: f64 = 10000.0;

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    GeluTanh,
    GeluErf,
    Silu,
    QuickGelu,
}

impl Activation {
    fn parse(name: Option<&str>) -> Result<Self> {
        Ok(match name.unwrap_or("gelu_pytorch_tanh") {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            other => bail!("vision_config.hidden_act {other:?} is not supported"),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluTanh => x.gelu()?,
            Self::GeluErf => x.gelu_erf()?,
            Self::Silu => candle_nn::ops::silu(x)?,
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    num_heads: usize,
}

impl Block {
    fn new(cfg: &VisionEncoderConfig, w: &Weights, act: Activation) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), d, 1e-6)?,
            qkv: Linear::load(&w.pp("attn.qkv"), d, 3 * d, true)?,
            proj: Linear::load(&w.pp("attn.proj"), d, d, true)?,
            norm2: LayerNorm::load(&w.pp("norm2"), d, 1e-6)?,
            fc1: Linear::load(&w.pp("mlp.linear_fc1"), d, i, true)?,
            fc2: Linear::load(&w.pp("mlp.linear_fc2"), i, d, true)?,
            act,
            num_heads: cfg.num_heads,
        })
    }

    /// `x [n, d]`; `cos`, `sin` `[n, head_dim]`; attention within each segment of `segments`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / self.num_heads;
        // 1. qkv [n, 3, heads, hd] → q, k, v [heads, n, hd], rotary on q and k.
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?.reshape((n, 3, self.num_heads, hd))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i, 1)?.squeeze(1)?) };
        let rotate = |t: &Tensor| -> Result<Tensor> {
            // t [n, heads, hd] with cos/sin [n, 1, hd].
            let half = hd / 2;
            let rotated =
                Tensor::cat(&[&t.narrow(D::Minus1, half, half)?.neg()?, &t.narrow(D::Minus1, 0, half)?], D::Minus1)?;
            Ok((t.broadcast_mul(&cos.unsqueeze(1)?)? + rotated.broadcast_mul(&sin.unsqueeze(1)?)?)?)
        };
        let q = rotate(&part(0)?)?.transpose(0, 1)?.contiguous()?;
        let k = rotate(&part(1)?)?.transpose(0, 1)?.contiguous()?;
        let v = part(2)?.transpose(0, 1)?.contiguous()?;
        // 2. Attention per segment (one image frame each).
        let scale = (hd as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for &len in segments {
            let (qs, ks, vs) = (q.narrow(1, start, len)?, k.narrow(1, start, len)?, v.narrow(1, start, len)?);
            let probs = candle_nn::ops::softmax_last_dim(&(qs.matmul(&ks.t()?)? * scale)?)?;
            outs.push(probs.matmul(&vs)?);
            start += len;
        }
        let attn = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, d))?;
        let x = (x + self.proj.forward(&attn)?)?;
        // 3. MLP.
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        Ok((x + h)?)
    }
}

/// `Qwen3OmniMoeVisionPatchMerger`: `merge²` neighbouring patches → one token.
struct PatchMerger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// The deepstack mergers normalize after concatenating the patches; the main one before.
    postshuffle_norm: bool,
    merged_dim: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionEncoderConfig, w: &Weights, postshuffle_norm: bool) -> Result<Self> {
        let merged_dim = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let norm_dim = if postshuffle_norm { merged_dim } else { cfg.hidden_size };
        Ok(Self {
            ln_q: LayerNorm::load(&w.pp("ln_q"), norm_dim, 1e-6)?,
            fc1: Linear::load(&w.pp("mlp.0"), merged_dim, merged_dim, true)?,
            fc2: Linear::load(&w.pp("mlp.2"), merged_dim, cfg.out_hidden_size, true)?,
            postshuffle_norm,
            merged_dim,
        })
    }

    /// `x [n, hidden]` → `[n / merge², out_hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = if self.postshuffle_norm {
            self.ln_q.forward(&x.reshape(((), self.merged_dim))?)?
        } else {
            self.ln_q.forward(x)?.reshape(((), self.merged_dim))?
        };
        self.fc2.forward(&gelu(&self.fc1.forward(&h)?)?)
    }
}

/// What the tower makes for the images of one prompt.
#[derive(Debug, Clone)]
pub struct VisionTokens {
    /// `[tokens, out_hidden]`: the Thinker embeddings of every image, in order.
    pub embeddings: Tensor,
    /// One `[tokens, out_hidden]` tensor per deepstack level, added after Thinker layers 0, 1, ….
    pub deepstack: Vec<Tensor>,
    /// Tokens per image.
    pub per_image: Vec<usize>,
}

/// The vision encoder.
pub struct VisionEncoder {
    cfg: VisionEncoderConfig,
    patch_embed: Linear,
    pos_embed: Vec<f32>,
    side: usize,
    rope: VisionRope,
    blocks: Vec<Block>,
    merger: PatchMerger,
    deepstack_mergers: Vec<PatchMerger>,
    device: Device,
}

impl VisionEncoder {
    /// Loads from the `thinker.visual` prefix.
    pub fn new(cfg: &VisionEncoderConfig, w: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let channels = cfg.in_channels.unwrap_or(3);
        if cfg.num_heads == 0 || d % cfg.num_heads != 0 || (d / cfg.num_heads) % 4 != 0 {
            bail!(
                "vision_config: hidden_size {d} must split into num_heads {} heads of a multiple of 4",
                cfg.num_heads
            );
        }
        let side = (cfg.num_position_embeddings as f64).sqrt() as usize;
        if side * side != cfg.num_position_embeddings {
            bail!("vision_config.num_position_embeddings {} is not a square", cfg.num_position_embeddings);
        }
        if let Some(&bad) = cfg.deepstack_visual_indexes.iter().find(|&&i| i >= cfg.depth) {
            bail!("vision_config.deepstack_visual_indexes names block {bad}, but depth is {}", cfg.depth);
        }
        let act = Activation::parse(cfg.hidden_act.as_deref())?;
        // 1. The Conv3d kernel [d, c, t, p, p] is a [d, c·t·p·p] matrix over flattened patches.
        let (t, p) = (cfg.temporal_patch_size, cfg.patch_size);
        let pe = w.pp("patch_embed.proj");
        let kernel = pe.get(&[d, channels, t, p, p], "weight")?.reshape((d, channels * t * p * p))?;
        let patch_embed = Linear::new(kernel, Some(pe.get(&[d], "bias")?));
        let pos_embed = w
            .get(&[cfg.num_position_embeddings, d], "pos_embed.weight")?
            .flatten_all()?
            .to_vec1::<f32>()
            .context("vision pos_embed")?;
        let blocks = (0..cfg.depth).map(|l| Block::new(cfg, &w.pp("blocks").pp(l), act)).collect::<Result<Vec<_>>>()?;
        // A GGUF mmproj written for llama.cpp may lack the deepstack mergers (the loader warns); a
        // safetensors checkpoint must have them.
        let deepstack_mergers = if w.store().gguf().is_some() && !w.contains("merger_list.0.ln_q.weight") {
            Vec::new()
        } else {
            (0..cfg.deepstack_visual_indexes.len())
                .map(|i| PatchMerger::new(cfg, &w.pp("merger_list").pp(i), true))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            pos_embed,
            side,
            rope: VisionRope::new(d / cfg.num_heads, VISION_ROPE_THETA),
            blocks,
            merger: PatchMerger::new(cfg, &w.pp("merger"), false)?,
            deepstack_mergers,
            device: w.store().device().clone(),
        })
    }

    pub fn config(&self) -> &VisionEncoderConfig {
        &self.cfg
    }

    /// Encodes all images of one prompt together, as the reference's single `visual` call does.
    pub fn forward(&self, images: &[ImagePixels]) -> Result<VisionTokens> {
        let d = self.cfg.hidden_size;
        let m = self.cfg.spatial_merge_size;
        let dim = self.patch_embed.weight().dim(1)?;
        if images.is_empty() {
            bail!("no images to encode");
        }
        // 1. Patches of every image, their coordinates and per-frame attention segments.
        let mut pixels = Vec::new();
        let mut coords = Vec::new();
        let mut taps = Vec::new();
        let mut segments = Vec::new();
        let mut per_image = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let [t, h, w] = img.grid_thw;
            if h % m != 0 || w % m != 0 || t == 0 {
                bail!("image {}: grid {:?} is not a multiple of the merge size {m}", i + 1, img.grid_thw);
            }
            if img.pixel_values.len() != t * h * w * dim {
                bail!(
                    "image {}: {} pixel values for grid {:?} of {dim}-value patches",
                    i + 1,
                    img.pixel_values.len(),
                    img.grid_thw
                );
            }
            pixels.extend_from_slice(&img.pixel_values);
            coords.extend(patch_coordinates(img.grid_thw, m));
            taps.extend(interpolation_taps(img.grid_thw, m, self.side));
            segments.extend(std::iter::repeat_n(h * w, t));
            per_image.push(t * h * w / (m * m));
        }
        let n = coords.len();
        // 2. Patch embedding plus the resampled learned positions: [n, d].
        let x = self.patch_embed.forward(&Tensor::from_vec(pixels, (n, dim), &self.device)?)?;
        let mut pos = vec![0f32; n * d];
        for (row, patch_taps) in pos.chunks_mut(d).zip(&taps) {
            for &(idx, weight) in patch_taps {
                let src = &self.pos_embed[idx * d..(idx + 1) * d];
                row.iter_mut().zip(src).for_each(|(o, &s)| *o += s * weight);
            }
        }
        let mut x = (x + Tensor::from_vec(pos, (n, d), &self.device)?)?;
        // 3. Rotary tables [n, head_dim].
        let hd = d / self.cfg.num_heads;
        let (cos, sin) = self.rope.tables(&coords);
        let cos = Tensor::from_vec(cos, (n, hd), &self.device)?;
        let sin = Tensor::from_vec(sin, (n, hd), &self.device)?;
        // 4. Blocks, with the deepstack mergers after their blocks.
        let mut deepstack = vec![None; self.deepstack_mergers.len()];
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &cos, &sin, &segments)?;
            for (level, &at) in self.cfg.deepstack_visual_indexes.iter().enumerate().take(self.deepstack_mergers.len())
            {
                if at == l {
                    deepstack[level] = Some(self.deepstack_mergers[level].forward(&x)?);
                }
            }
        }
        let deepstack =
            deepstack.into_iter().map(|t| t.context("deepstack level not computed")).collect::<Result<Vec<_>>>()?;
        // 5. The main merger.
        let embeddings = self.merger.forward(&x)?;
        Ok(VisionTokens { embeddings, deepstack, per_image })
    }
}

/// Replaces every `<|image_pad|>` of a rendered prompt by as many pads as its image has tokens
/// (the processor's `replace_image_token`).
pub fn expand_image_pads(ids: &[u32], image_pad: u32, tokens_per_image: &[usize]) -> Result<Vec<u32>> {
    let pads = ids.iter().filter(|&&i| i == image_pad).count();
    if pads != tokens_per_image.len() {
        bail!("the chat template produced {pads} image placeholders for {} images", tokens_per_image.len());
    }
    let mut out = Vec::with_capacity(ids.len() + tokens_per_image.iter().sum::<usize>());
    let mut image = 0;
    for &id in ids {
        if id == image_pad {
            out.extend(std::iter::repeat_n(image_pad, tokens_per_image[image]));
            image += 1;
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// Puts `rows [n, hidden]` in place of the `n` tokens equal to `pad` in `embeds [1, t, hidden]`
/// (the reference's `masked_scatter`).
pub fn scatter_rows(embeds: &Tensor, ids: &[u32], pad: u32, rows: &Tensor) -> Result<Tensor> {
    let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &i)| i == pad).map(|(p, _)| p).collect();
    let n = rows.dim(0)?;
    if positions.len() != n {
        bail!("the prompt has {} placeholder positions for {n} encoder tokens", positions.len());
    }
    let table_rows = embeds.squeeze(0)?;
    let t = table_rows.dim(0)?;
    let mut source: Vec<u32> = (0..t as u32).collect();
    for (k, &p) in positions.iter().enumerate() {
        source[p] = (t + k) as u32;
    }
    let table = Tensor::cat(&[&table_rows, &rows.to_dtype(table_rows.dtype())?], 0)?;
    let out =
        table.index_select(&Tensor::from_vec(source, t, embeds.device())?, 0).context("scattering image tokens")?;
    Ok(out.unsqueeze(0)?)
}

/// The Thinker's M-RoPE positions for a prompt whose image pads are already expanded (the reference's
/// `get_rope_index` without video): text and audio tokens advance one position each, every stream
/// alike; the tokens of image `k` (a run of `image_pad`) take `(t · position_id_per_seconds, row, col)`
/// of its merged `(t, h/m, w/m)` grid, all offset by the next free position; after an image, positions
/// continue from the largest one used plus one.
pub fn mrope_positions(
    ids: &[u32],
    image_pad: u32,
    grids_thw: &[[usize; 3]],
    merge: usize,
    position_id_per_seconds: f64,
) -> Result<[Vec<i64>; 3]> {
    let mut streams: [Vec<i64>; 3] =
        [Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len())];
    let mut next = 0i64;
    let mut i = 0;
    let mut image = 0;
    while i < ids.len() {
        if ids[i] != image_pad {
            for s in streams.iter_mut() {
                s.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = *grids_thw
            .get(image)
            .with_context(|| format!("the prompt has more images than the {} given", grids_thw.len()))?;
        let (lh, lw) = (h / merge, w / merge);
        let len = t * lh * lw;
        if i + len > ids.len() || ids[i..i + len].iter().any(|&id| id != image_pad) {
            bail!("image {} needs {len} consecutive image tokens in the prompt", image + 1);
        }
        let start = next;
        let mut max = start;
        for ti in 0..t {
            // float32 arithmetic as the reference: arange(t) * 1 * position_id_per_seconds.
            let tpos = (ti as f32 * position_id_per_seconds as f32) as i64;
            for r in 0..lh {
                for c in 0..lw {
                    let p = [start + tpos, start + r as i64, start + c as i64];
                    for (s, v) in streams.iter_mut().zip(p) {
                        s.push(v);
                        max = max.max(v);
                    }
                }
            }
        }
        next = max + 1;
        i += len;
        image += 1;
    }
    if image != grids_thw.len() {
        bail!("the prompt has {image} images but {} were given", grids_thw.len());
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_text_image_text() {
        // 2 text tokens, a 2x3 merged image, 2 text tokens.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4];
        let p = mrope_positions(&ids, 9, &[[1, 4, 6]], 2, 13.0).unwrap();
        assert_eq!(p[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn image_pads_expand_per_image() {
        assert_eq!(expand_image_pads(&[1, 7, 2, 7], 7, &[2, 1]).unwrap(), vec![1, 7, 7, 2, 7]);
        assert!(expand_image_pads(&[1, 7], 7, &[2, 1]).is_err());
    }
}
