//! The AuT audio encoder (`thinker.audio_tower.*`): log-mel frames → audio tokens at 12.5 Hz in the
//! Thinker's hidden size.
//!
//! Reference: `Qwen3OmniMoeAudioEncoder` and the helpers above it in transformers'
//! `modeling_qwen3_omni_moe.py` (`chunk_and_pad_features`, `get_valid_indices`, `get_audio_cu_seqlens`,
//! `_get_feat_extract_output_lengths`). Every clip is cut into chunks of `2·n_window` mel frames; all
//! chunks of one call are zero-padded to the longest chunk and pass the stride-2 Conv2d stem (three
//! convs with GELU), `conv_out` and sinusoidal positions that restart in every chunk; the valid
//! frames of every chunk are kept, and the encoder layers attend within windows of
//! `n_window_infer` frames (block-diagonal attention), then `ln_post`, `proj1`, GELU, `proj2`.
//!
//! The padding of chunks to the longest one matters for exactness: the stem's later convs see the
//! GELU of the bias in padded columns, so a short chunk is not computed on its own.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::AudioEncoderConfig;
use crate::nn::{gelu, LayerNorm, Linear};
use crate::weights::Weights;

/// Floor division as Python's `//` (the reference's arithmetic relies on it for negatives).
fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

/// Audio tokens the encoder makes from `mel_frames` frames (`_get_feat_extract_output_lengths`).
pub fn output_tokens(mel_frames: usize, n_window: usize) -> usize {
    let chunk = (2 * n_window) as i64;
    let len = mel_frames as i64;
    let leave = len % chunk;
    let feat = floor_div(leave - 1, 2) + 1;
    let rest = floor_div(floor_div(feat - 1, 2) + 1 - 1, 2) + 1;
    // The reference counts 13 tokens per full chunk, literally (the stem's arithmetic for 100 frames).
    (rest + floor_div(len, chunk) * 13) as usize
}

/// Tokens after the stem for one chunk of `len` frames (`len <= 2·n_window`).
pub fn chunk_tokens(len: usize) -> usize {
    let f = (len + 1) / 2; // ceil(len / 2): stride 2, padding 1, kernel 3
    let f = (f + 1) / 2;
    (f + 1) / 2
}

/// Chunk lengths of one clip (`chunk_and_pad_features`).
pub fn chunk_lengths(mel_frames: usize, n_window: usize) -> Vec<usize> {
    let chunk = 2 * n_window;
    let n = mel_frames.div_ceil(chunk);
    (0..n).map(|i| if i + 1 < n || mel_frames % chunk == 0 { chunk } else { mel_frames % chunk }).collect()
}

/// Attention windows (in tokens) of one clip (`get_audio_cu_seqlens`), given the longest chunk of the call.
pub fn attention_windows(clip_tokens: usize, max_chunk_tokens: usize, n_window: usize, n_window_infer: usize) -> Vec<usize> {
    let window = max_chunk_tokens * (n_window_infer / (2 * n_window));
    let mut out = vec![window; clip_tokens / window];
    if clip_tokens % window != 0 {
        out.push(clip_tokens % window);
    }
    out
}

/// The sinusoid table of `SinusoidsPositionEmbedding`: `[length, channels]`, sin then cos.
pub fn sinusoid_table(length: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    // Same arithmetic as the reference: log(10000) / (half - 1) in float64, exp in float32.
    let increment = (10000f64).ln() / (half as f64 - 1.0);
    let inv: Vec<f32> = (0..half).map(|i| (-(increment as f32) * i as f32).exp()).collect();
    let mut table = vec![0f32; length * channels];
    for p in 0..length {
        for i in 0..half {
            let x = p as f32 * inv[i];
            table[p * channels + i] = x.sin();
            table[p * channels + half + i] = x.cos();
        }
    }
    table
}

struct Conv2d {
    weight: Tensor,
    /// The weight as `[cout, cin·9]` (rows in `(cin, ky, kx)` order) for the im2col product.
    matrix: Tensor,
    bias: Tensor,
}

impl Conv2d {
    fn load(w: &Weights, cin: usize, cout: usize) -> Result<Self> {
        let weight = w.get(&[cout, cin, 3, 3], "weight")?;
        let matrix = weight.reshape((cout, cin * 9))?.to_dtype(DType::F32)?.contiguous()?;
        Ok(Self { weight, matrix, bias: w.get(&[cout], "bias")? })
    }

    /// 3×3, stride 2, padding 1.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.device().is_cpu() && x.dtype() == DType::F32 {
            self.im2col_product(x)?
        } else {
            x.conv2d(&self.weight, 1, 2, 1, 1)?
        };
        let _span = crate::profile::span("audio stem conv, bias");
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }

    /// The convolution as one matrix product over patches gathered on the worker pool: candle's
    /// CPU conv2d took ~80 ms of the stem at the end of speech for ~2 GMAC.
    fn im2col_product(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (b, cin, h, w) = x.dims4()?;
        let (ho, wo) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
        let cout = self.matrix.dim(0)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let k = cin * 9;
        // 1. Patches [b·ho·wo, cin·9], zero outside the padded input.
        let gather = crate::profile::span("audio stem conv, im2col gather");
        let mut cols = vec![0f32; b * ho * wo * k];
        cols.par_chunks_mut(k).enumerate().for_each(|(p, row)| {
            let (bi, oy, ox) = (p / (ho * wo), (p / wo) % ho, p % wo);
            for c in 0..cin {
                let plane = &xs[(bi * cin + c) * h * w..][..h * w];
                for ky in 0..3 {
                    let iy = (2 * oy + ky) as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = (2 * ox + kx) as isize - 1;
                        if ix >= 0 && ix < w as isize {
                            row[c * 9 + ky * 3 + kx] = plane[iy as usize * w + ix as usize];
                        }
                    }
                }
            }
        });
        drop(gather);
        // 2. [cout, cin·9] · [cin·9, b·ho·wo] → [cout, b, ho, wo]: channels first as it comes out,
        //    so a single chunk (the streaming case) needs no transposing copy.
        let cols = Tensor::from_vec(cols, (b * ho * wo, k), x.device())?;
        let product = crate::profile::span("audio stem conv, f32 product");
        let y = self.matrix.matmul(&cols.t()?)?;
        drop(product);
        let y = y.reshape((cout, b, ho, wo))?;
        if b == 1 {
            return Ok(y.reshape((1, cout, ho, wo))?);
        }
        let _span = crate::profile::span("audio stem conv, to batch first");
        Ok(y.transpose(0, 1)?.contiguous()?)
    }
}

struct EncoderLayer {
    self_attn_layer_norm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    final_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
}

impl EncoderLayer {
    fn new(cfg: &AudioEncoderConfig, w: &Weights) -> Result<Self> {
        let d = cfg.d_model;
        let a = w.pp("self_attn");
        Ok(Self {
            self_attn_layer_norm: LayerNorm::load(&w.pp("self_attn_layer_norm"), d, 1e-5)?,
            q_proj: Linear::load(&a.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&a.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&a.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&a.pp("out_proj"), d, d, true)?,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), d, 1e-5)?,
            fc1: Linear::load(&w.pp("fc1"), d, cfg.encoder_ffn_dim, true)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.encoder_ffn_dim, d, true)?,
            num_heads: cfg.encoder_attention_heads,
        })
    }

    /// `x [n, d]`, windows summing to n.
    fn forward(&self, x: &Tensor, windows: &[usize]) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / self.num_heads;
        // 1. Pre-norm attention, each window on its own.
        let h = self.self_attn_layer_norm.forward(x)?;
        let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], &h)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("three projections"))?;
        let span = crate::profile::span("audio encoder attention core");
        let attn = if x.device().is_cpu() {
            // Token-major [n, heads, hd] on plain floats, windows on the worker pool.
            let rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
            let out = crate::attention::windowed_attention(&rows(&q)?, &rows(&k)?, &rows(&v)?, self.num_heads, hd, windows);
            Tensor::from_vec(out, (n, d), x.device())?
        } else {
            let heads_first = |t: Tensor| t.reshape((n, self.num_heads, hd))?.transpose(0, 1)?.contiguous();
            let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
            let scale = 1.0 / (hd as f64).sqrt();
            let mut outs = Vec::with_capacity(windows.len());
            let mut start = 0;
            for &len in windows {
                let (qw, kw, vw) = (q.narrow(1, start, len)?, k.narrow(1, start, len)?, v.narrow(1, start, len)?);
                let scores = (qw.matmul(&kw.t()?)? * scale)?; // [heads, len, len]
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                outs.push(probs.matmul(&vw)?); // [heads, len, hd]
                start += len;
            }
            Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, d))?
        };
        drop(span);
        let x = (x + self.out_proj.forward(&attn)?)?;
        // 2. Pre-norm MLP.
        let h = self.fc2.forward(&gelu(&self.fc1.forward(&self.final_layer_norm.forward(&x)?)?)?)?;
        Ok((x + h)?)
    }
}

/// Mel features of one clip: `[num_mel_bins, frames]` row-major.
pub struct ClipFeatures<'a> {
    pub mel: &'a [f32],
    pub frames: usize,
}

/// The audio encoder's output: tokens of every clip, in order.
#[derive(Debug, Clone)]
pub struct AudioTokens {
    /// `[total_tokens, output_dim]`.
    pub embeddings: Tensor,
    /// Tokens per clip.
    pub per_clip: Vec<usize>,
}

/// The AuT encoder.
pub struct AudioEncoder {
    cfg: AudioEncoderConfig,
    conv2d1: Conv2d,
    conv2d2: Conv2d,
    conv2d3: Conv2d,
    conv_out: Linear,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    proj1: Linear,
    proj2: Linear,
    device: Device,
}

/// Chunks through the conv stem at a time: bounds memory on long inputs (results do not depend on it).
const STEM_BATCH: usize = 32;

impl AudioEncoder {
    /// Loads from the `thinker.audio_tower` prefix.
    pub fn new(cfg: &AudioEncoderConfig, w: &Weights) -> Result<Self> {
        let (d, ds) = (cfg.d_model, cfg.downsample_hidden_size);
        let freq_after = ((cfg.num_mel_bins + 1) / 2 + 1) / 2;
        let freq_after = (freq_after + 1) / 2;
        let max_pos = cfg.max_source_positions.unwrap_or(1500);
        let device = w.store().device().clone();
        let mut layers = Vec::with_capacity(cfg.encoder_layers);
        for l in 0..cfg.encoder_layers {
            layers.push(EncoderLayer::new(cfg, &w.pp("layers").pp(l))?);
        }
        if cfg.d_model % cfg.encoder_attention_heads != 0 {
            bail!("audio_config: d_model {} is not a multiple of encoder_attention_heads {}", d, cfg.encoder_attention_heads);
        }
        Ok(Self {
            cfg: cfg.clone(),
            conv2d1: Conv2d::load(&w.pp("conv2d1"), 1, ds)?,
            conv2d2: Conv2d::load(&w.pp("conv2d2"), ds, ds)?,
            conv2d3: Conv2d::load(&w.pp("conv2d3"), ds, ds)?,
            conv_out: Linear::load(&w.pp("conv_out"), ds * freq_after, d, false)?,
            positions: Tensor::from_vec(sinusoid_table(max_pos, d), (max_pos, d), &device)?,
            layers,
            ln_post: LayerNorm::load(&w.pp("ln_post"), d, 1e-5)?,
            proj1: Linear::load(&w.pp("proj1"), d, d, true)?,
            proj2: Linear::load(&w.pp("proj2"), d, cfg.output_dim, true)?,
            device,
        })
    }

    pub fn config(&self) -> &AudioEncoderConfig {
        &self.cfg
    }

    /// Tokens for a clip of `mel_frames` frames.
    pub fn output_tokens(&self, mel_frames: usize) -> usize {
        output_tokens(mel_frames, self.cfg.n_window)
    }

    /// Encodes all clips of one prompt together, as the reference's single `audio_tower` call does.
    pub fn forward(&self, clips: &[ClipFeatures<'_>]) -> Result<AudioTokens> {
        let bins = self.cfg.num_mel_bins;
        let nw = self.cfg.n_window;
        if clips.is_empty() {
            bail!("no audio clips to encode");
        }
        // 1. Chunks of 2·n_window frames, padded to the longest chunk: [chunks, 1, bins, max_len].
        let mut chunks: Vec<(usize, usize, usize)> = Vec::new(); // (clip, start frame, len)
        for (c, clip) in clips.iter().enumerate() {
            if clip.frames == 0 {
                bail!("audio clip {} has no mel frames", c + 1);
            }
            if clip.mel.len() != bins * clip.frames {
                bail!("audio clip {}: {} values for {} frames of {} mel bins", c + 1, clip.mel.len(), clip.frames, bins);
            }
            let mut start = 0;
            for len in chunk_lengths(clip.frames, nw) {
                chunks.push((c, start, len));
                start += len;
            }
        }
        let max_len = chunks.iter().map(|c| c.2).max().unwrap_or(0);
        // 2. The stem, STEM_BATCH chunks at a time; keep each chunk's valid tokens: [n, d].
        let mut stems = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(STEM_BATCH) {
            let data: Vec<Vec<f32>> = batch
                .iter()
                .map(|&(c, start, len)| {
                    let clip = &clips[c];
                    (0..bins).flat_map(|m| &clip.mel[m * clip.frames + start..m * clip.frames + start + len]).copied().collect()
                })
                .collect();
            let views: Vec<ClipFeatures<'_>> =
                data.iter().zip(batch).map(|(mel, &(_, _, len))| ClipFeatures { mel, frames: len }).collect();
            stems.extend(self.stem(&views, max_len)?);
        }
        // 3.-4. Windowed attention layers and the output projection.
        let per_clip: Vec<usize> = clips.iter().map(|c| output_tokens(c.frames, nw)).collect();
        self.encode_stems(&stems, &per_clip, max_len)
    }

    /// The conv stem of a batch of chunks (each `[bins, len]`, `len <= 2·n_window`), zero-padded to
    /// `padded_frames` (the longest chunk of the whole encoder call: the padding changes a chunk's
    /// last columns, see the module docs), plus the per-chunk sinusoidal positions. Returns each
    /// chunk's valid tokens `[chunk_tokens(len), d_model]`. The stem is per chunk: batching chunks
    /// together or not gives the same values.
    pub fn stem(&self, chunks: &[ClipFeatures<'_>], padded_frames: usize) -> Result<Vec<Tensor>> {
        let bins = self.cfg.num_mel_bins;
        if padded_frames == 0 || padded_frames > 2 * self.cfg.n_window {
            bail!("audio encoder stem: padded chunk length {padded_frames} is not in 1..={}", 2 * self.cfg.n_window);
        }
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let _span = crate::profile::span("audio encoder stem");
        let _stage = crate::profile::stage("audio encoder stem");
        crate::quant::flush_denormals();
        // 1. [b, 1, bins, padded_frames], zero padded on the right.
        let mut data = vec![0f32; chunks.len() * bins * padded_frames];
        for (b, chunk) in chunks.iter().enumerate() {
            if chunk.frames == 0 || chunk.frames > padded_frames || chunk.mel.len() != bins * chunk.frames {
                bail!(
                    "audio encoder stem: chunk {b} has {} values for {} frames of {bins} mel bins (padded length {padded_frames})",
                    chunk.mel.len(),
                    chunk.frames
                );
            }
            for m in 0..bins {
                let dst = b * bins * padded_frames + m * padded_frames;
                data[dst..dst + chunk.frames].copy_from_slice(&chunk.mel[m * chunk.frames..(m + 1) * chunk.frames]);
            }
        }
        let x = Tensor::from_vec(data, (chunks.len(), 1, bins, padded_frames), &self.device)?;
        // 2. Three stride-2 convs with GELU: [b, ch, f, t].
        let span = crate::profile::span("audio encoder stem convs");
        let x = gelu(&self.conv2d1.forward(&x)?)?;
        let x = gelu(&self.conv2d2.forward(&x)?)?;
        let x = gelu(&self.conv2d3.forward(&x)?)?;
        drop(span);
        // 3. conv_out over (channel, frequency) per time step, plus positions restarting per chunk: [b, t, d].
        let (b, ch, f, t) = x.dims4()?;
        let x = x.permute((0, 3, 1, 2))?.reshape((b, t, ch * f))?;
        let x = self.conv_out.forward(&x)?.broadcast_add(&self.positions.narrow(0, 0, t)?.unsqueeze(0)?)?;
        chunks.iter().enumerate().map(|(i, c)| Ok(x.get(i)?.narrow(0, 0, chunk_tokens(c.frames))?)).collect()
    }

    /// The rest of the encoder after the stems of every chunk of every clip (in order): windowed
    /// attention layers, `ln_post`, `proj1`, GELU, `proj2`. `per_clip` is the token count of each clip,
    /// `max_chunk_frames` the longest chunk of the call (it sets the attention window).
    pub fn encode_stems(&self, stems: &[Tensor], per_clip: &[usize], max_chunk_frames: usize) -> Result<AudioTokens> {
        let _span = crate::profile::span("audio encoder layers");
        crate::quant::in_pool(|| self.encode_stems_in_pool(stems, per_clip, max_chunk_frames))
    }

    fn encode_stems_in_pool(&self, stems: &[Tensor], per_clip: &[usize], max_chunk_frames: usize) -> Result<AudioTokens> {
        let _stage = crate::profile::stage("audio encoder layers");
        let nw = self.cfg.n_window;
        if stems.is_empty() {
            bail!("no audio chunks to encode");
        }
        let mut x = Tensor::cat(stems, 0)?;
        // 1. Attention windows per clip.
        let max_tokens = chunk_tokens(max_chunk_frames);
        let windows: Vec<usize> = per_clip
            .iter()
            .flat_map(|&n| attention_windows(n, max_tokens, nw, self.cfg.n_window_infer))
            .collect();
        if windows.iter().sum::<usize>() != x.dim(0)? {
            bail!("audio encoder: token count mismatch ({} vs {})", windows.iter().sum::<usize>(), x.dim(0)?);
        }
        // 2. Encoder layers, then the output projection.
        for layer in &self.layers {
            x = layer.forward(&x, &windows)?;
        }
        let x = self.proj2.forward(&gelu(&self.proj1.forward(&self.ln_post.forward(&x)?)?)?)?;
        Ok(AudioTokens { embeddings: x.to_dtype(DType::F32)?, per_clip: per_clip.to_vec() })
    }
}

/// Replaces every `<|audio_pad|>` of a rendered prompt by as many pads as its clip has tokens
/// (the processor's `replace_audio_token`).
pub fn expand_audio_pads(ids: &[u32], audio_pad: u32, tokens_per_clip: &[usize]) -> Result<Vec<u32>> {
    let pads = ids.iter().filter(|&&i| i == audio_pad).count();
    if pads != tokens_per_clip.len() {
        bail!("the chat template produced {pads} audio placeholders for {} audio clips", tokens_per_clip.len());
    }
    let mut out = Vec::with_capacity(ids.len() + tokens_per_clip.iter().sum::<usize>());
    let mut clip = 0;
    for &id in ids {
        if id == audio_pad {
            out.extend(std::iter::repeat_n(audio_pad, tokens_per_clip[clip]));
            clip += 1;
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// Puts the audio tokens in place of the audio pads of `embeds [1, t, h]`.
pub fn scatter_audio(embeds: &Tensor, ids: &[u32], audio_pad: u32, audio: &AudioTokens) -> Result<Tensor> {
    let positions: Vec<u32> = ids.iter().enumerate().filter(|(_, &i)| i == audio_pad).map(|(p, _)| p as u32).collect();
    let n = audio.embeddings.dim(0)?;
    if positions.len() != n {
        bail!("the prompt has {} audio positions for {n} audio tokens", positions.len());
    }
    let rows = embeds.squeeze(0)?;
    let t = rows.dim(0)?;
    // Row p of the result comes from the prompt embeddings, or from audio token k at its k-th pad.
    let mut source: Vec<u32> = (0..t as u32).collect();
    for (k, &p) in positions.iter().enumerate() {
        source[p as usize] = (t + k) as u32;
    }
    let table = Tensor::cat(&[&rows, &audio.embeddings], 0)?;
    let out = table.index_select(&Tensor::from_vec(source, t, embeds.device())?, 0).context("scattering audio tokens")?;
    Ok(out.unsqueeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_follow_the_reference() {
        // _get_feat_extract_output_lengths with n_window 50.
        let cases = [(1, 1), (60, 8), (99, 13), (100, 13), (101, 14), (182, 24), (430, 56), (1000, 130)];
        for (frames, tokens) in cases {
            assert_eq!(output_tokens(frames, 50), tokens, "{frames} frames");
        }
    }

    #[test]
    fn chunks_and_windows() {
        assert_eq!(chunk_lengths(430, 50), vec![100, 100, 100, 100, 30]);
        assert_eq!(chunk_lengths(200, 50), vec![100, 100]);
        assert_eq!(chunk_lengths(7, 50), vec![7]);
        // 56 tokens, windows of 13·8 = 104 (n_window_infer 800) or 13·4 = 52 (400).
        assert_eq!(attention_windows(56, 13, 50, 800), vec![56]);
        assert_eq!(attention_windows(56, 13, 50, 400), vec![52, 4]);
        assert_eq!(attention_windows(104, 13, 50, 400), vec![52, 52]);
    }

    #[test]
    fn sinusoids_start_with_sin_zero_cos_one() {
        let t = sinusoid_table(3, 8);
        assert_eq!(&t[0..8], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert!((t[8] - 1f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn audio_pads_expand_per_clip() {
        let ids = [1, 9, 2, 9, 3];
        assert_eq!(expand_audio_pads(&ids, 9, &[2, 3]).unwrap(), vec![1, 9, 9, 2, 9, 9, 9, 3]);
        assert!(expand_audio_pads(&ids, 9, &[2]).is_err());
    }
}
