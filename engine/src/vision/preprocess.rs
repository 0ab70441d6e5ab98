//! Image files → the vision tower's `pixel_values` and `image_grid_thw`, as the processor makes them.
//!
//! Reference: transformers 5 `Qwen2VLImageProcessor` (`models/qwen2_vl/image_processing_qwen2_vl.py`,
//! the torchvision backend that `Qwen3OmniMoeProcessor` loads): RGB (alpha composited on white),
//! `smart_resize` to multiples of `patch_size · merge_size` within `[min_pixels, max_pixels]`, resize with
//! torchvision's native uint8 bicubic + antialias kernel (only when the size changes), fused
//! rescale + normalize in float32 (`(x - mean/rescale) / (std/rescale)`), then `patchify`: patches in
//! spatial-merge-block order, each flattened as `[channel, temporal, py, px]` with the still image
//! repeated `temporal_patch_size` times.
//!
//! The resize reimplements torch's uint8 antialias kernel (`_upsample_bicubic2d_aa` on CPU: PIL-style
//! separable filter with a = -0.5, int16 fixed-point weights, horizontal then vertical pass, each
//! rounded to uint8), so resized pixels are exact too (the vision golden test checks one image of each).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The image processor settings (`preprocessor_config.json` or `processor_config.json`'s `image_processor`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
}

impl ImageProcessorConfig {
    /// The released Qwen3-Omni processor.
    pub fn qwen3_omni() -> Self {
        Self {
            patch_size: 16,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 3136,
            max_pixels: 12845056,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
        }
    }

    /// Reads `processor_config.json` (`image_processor` object) or `preprocessor_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let proc_path = dir.join("processor_config.json");
        if proc_path.is_file() {
            let v = read_json(&proc_path)?;
            if let Some(inner) = v.get("image_processor") {
                return Self::from_json(inner).with_context(|| format!("image_processor in {}", proc_path.display()));
            }
        }
        let pre_path = dir.join("preprocessor_config.json");
        if pre_path.is_file() {
            let v = read_json(&pre_path)?;
            return Self::from_json(&v).with_context(|| format!("image processor settings in {}", pre_path.display()));
        }
        bail!("{} has no processor_config.json or preprocessor_config.json (image processor settings)", dir.display())
    }

    /// From a processor JSON object; missing fields take the Qwen3-Omni values. `min_pixels`/`max_pixels`
    /// win over `size.shortest_edge`/`size.longest_edge`, as the reference's constructor does.
    pub fn from_json(v: &Value) -> Result<Self> {
        let mut c = Self::qwen3_omni();
        let uint = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => {
                    x.as_u64().map(|n| Some(n as usize)).with_context(|| format!("`{key}` must be a positive integer"))
                }
            }
        };
        let boolean = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_bool().with_context(|| format!("`{key}` must be true or false")),
            }
        };
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().with_context(|| format!("`{key}` entries must be numbers"))? as f32;
                    }
                    Ok(out)
                }
                Some(_) => bail!("`{key}` must be a number or a list of 3 numbers"),
            }
        };
        if let Some(size) = v.get("size") {
            if let Some(s) = size.get("shortest_edge").and_then(Value::as_u64) {
                c.min_pixels = s as usize;
            }
            if let Some(l) = size.get("longest_edge").and_then(Value::as_u64) {
                c.max_pixels = l as usize;
            }
        }
        if let Some(x) = uint("min_pixels")? {
            c.min_pixels = x;
        }
        if let Some(x) = uint("max_pixels")? {
            c.max_pixels = x;
        }
        c.patch_size = uint("patch_size")?.unwrap_or(c.patch_size);
        c.merge_size = uint("merge_size")?.unwrap_or(c.merge_size);
        c.temporal_patch_size = uint("temporal_patch_size")?.unwrap_or(c.temporal_patch_size);
        c.image_mean = triple("image_mean", c.image_mean)?;
        c.image_std = triple("image_std", c.image_std)?;
        if let Some(r) = v.get("rescale_factor") {
            c.rescale_factor = r.as_f64().context("`rescale_factor` must be a number")?;
        }
        c.do_resize = boolean("do_resize", c.do_resize)?;
        c.do_rescale = boolean("do_rescale", c.do_rescale)?;
        c.do_normalize = boolean("do_normalize", c.do_normalize)?;
        if let Some(r) = v.get("resample").and_then(Value::as_u64) {
            if r != 3 {
                bail!("resample {r} is not supported (only 3 = bicubic, the Qwen processor's)");
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            bail!("patch_size, merge_size and temporal_patch_size must be positive");
        }
        if self.min_pixels > self.max_pixels {
            bail!("min_pixels {} exceeds max_pixels {}", self.min_pixels, self.max_pixels);
        }
        if self.image_std.iter().any(|&s| s == 0.0) {
            bail!("image_std must not be 0");
        }
        Ok(())
    }

    /// `patch_size · merge_size`: image sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per flattened patch: `3 · temporal · patch²`.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

/// An 8-bit RGB image, rows top to bottom, `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            bail!("{} bytes for a {width}x{height} RGB image", data.len());
        }
        Ok(Self { width, height, data })
    }

    /// The image mirrored left-right.
    pub fn mirrored(&self) -> Self {
        let mut data = vec![0u8; self.data.len()];
        for y in 0..self.height {
            for x in 0..self.width {
                let (s, d) = ((y * self.width + x) * 3, (y * self.width + self.width - 1 - x) * 3);
                data[d..d + 3].copy_from_slice(&self.data[s..s + 3]);
            }
        }
        Self { width: self.width, height: self.height, data }
    }
}

/// Decodes a PNG or JPEG file to RGB; transparency is composited on white (transformers'
/// `convert_to_rgb`).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("cannot decode image {} (PNG or JPEG expected)", path.display()))
}

/// Decodes PNG or JPEG bytes.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("the image is empty ({w}x{h})");
    }
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(w * h * 3);
        for px in rgba.pixels() {
            let a = px[3] as u32;
            for c in 0..3 {
                // Over an opaque white background (PIL alpha_composite, rounded).
                out.push(((px[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8);
            }
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
    RgbImage::new(w, h, data)
}

/// The reference's `smart_resize`: sides rounded to multiples of `factor`, area within
/// `[min_pixels, max_pixels]`, aspect ratio kept as well as possible. Returns `(height, width)`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        bail!("absolute aspect ratio must be smaller than 200, got {}", h.max(w) / h.min(w));
    }
    // Python's round() rounds halves to even.
    let round = |x: f64| x.round_ties_even();
    let mut h_bar = round(h / f) * f;
    let mut w_bar = round(w / f) * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One image ready for the tower.
#[derive(Debug, Clone)]
pub struct ImagePixels {
    /// `[patches, 3 · temporal · patch²]` row-major, patches in spatial-merge-block order.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid_thw: [usize; 3],
}

impl ImagePixels {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Thinker tokens of this image: patches / merge².
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// The whole processor path for one image.
pub fn preprocess(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<ImagePixels> {
    // 1. Resize to multiples of the factor (nothing happens when the size already fits).
    let (h, w) = if cfg.do_resize {
        smart_resize(img.height, img.width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?
    } else {
        (img.height, img.width)
    };
    if h % cfg.factor() != 0 || w % cfg.factor() != 0 {
        bail!("image of {}x{} is not a multiple of {} and do_resize is off", img.width, img.height, cfg.factor());
    }
    let resized;
    let img = if (h, w) != (img.height, img.width) {
        resized = resize_bicubic_antialias(img, h, w);
        &resized
    } else {
        img
    };
    // 2. Rescale + normalize, fused as the reference does: (x - mean/r) / (std/r) in float32.
    let r = if cfg.do_rescale { cfg.rescale_factor } else { 1.0 };
    let (mean, std): (Vec<f32>, Vec<f32>) = if cfg.do_normalize {
        let inv = 1.0 / r;
        (
            cfg.image_mean.iter().map(|&m| (m as f64 * inv) as f32).collect(),
            cfg.image_std.iter().map(|&s| (s as f64 * inv) as f32).collect(),
        )
    } else {
        (vec![0.0; 3], vec![1.0; 3])
    };
    let plane = |c: usize, y: usize, x: usize| -> f32 {
        let v = img.data[(y * w + x) * 3 + c] as f32;
        if cfg.do_normalize {
            (v - mean[c]) / std[c]
        } else {
            (v as f64 * r) as f32
        }
    };
    // 3. Patchify: [bh, bw, mh, mw] patches of [c, t, py, px] values.
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let dim = cfg.patch_dim();
    let mut out = Vec::with_capacity(gh * gw * dim);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for c in 0..3 {
                        for _ in 0..t {
                            for py in 0..p {
                                for px in 0..p {
                                    out.push(plane(c, y0 + py, x0 + px));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ImagePixels { pixel_values: out, grid_thw: [1, gh, gw] })
}

/// torch's antialiased bicubic filter (PIL's, a = -0.5).
fn bicubic_aa(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Taps of one output sample: first input index and int16 weights, plus the shared precision.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

/// `_compute_indices_int16_weights_aa` of torch's uint8 kernel.
fn taps(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(output);
    let mut float_weights = Vec::with_capacity(output);
    let mut w_max = 0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let mut ws: Vec<f64> = (xmin..xmax).map(|j| bicubic_aa((j as f64 - center + 0.5) * invscale)).collect();
        let total: f64 = ws.iter().sum();
        if total != 0.0 {
            ws.iter_mut().for_each(|w| *w /= total);
        }
        w_max = ws.iter().copied().fold(w_max, f64::max);
        start.push(xmin);
        float_weights.push(ws);
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64;
        if next >= (1 << 15) {
            break;
        }
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let weights = float_weights
        .into_iter()
        .map(|ws| {
            ws.into_iter().map(|w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect()
        })
        .collect();
    Taps { start, weights, precision }
}

fn clip_u8(acc: i64, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// torchvision's uint8 bicubic + antialias resize: horizontal pass, then vertical, each rounded to u8.
pub fn resize_bicubic_antialias(img: &RgbImage, new_h: usize, new_w: usize) -> RgbImage {
    let (h, w) = (img.height, img.width);
    // 1. Horizontal: [h, w] → [h, new_w].
    let horizontal = if new_w != w {
        let t = taps(w, new_w);
        let half = if t.precision > 0 { 1i64 << (t.precision - 1) } else { 0 };
        let mut out = vec![0u8; h * new_w * 3];
        for y in 0..h {
            for x in 0..new_w {
                for c in 0..3 {
                    let mut acc = half;
                    for (k, &wt) in t.weights[x].iter().enumerate() {
                        acc += wt as i64 * img.data[(y * w + t.start[x] + k) * 3 + c] as i64;
                    }
                    out[(y * new_w + x) * 3 + c] = clip_u8(acc, t.precision);
                }
            }
        }
        out
    } else {
        img.data.clone()
    };
    // 2. Vertical: [h, new_w] → [new_h, new_w].
    let data = if new_h != h {
        let t = taps(h, new_h);
        let half = if t.precision > 0 { 1i64 << (t.precision - 1) } else { 0 };
        let mut out = vec![0u8; new_h * new_w * 3];
        for y in 0..new_h {
            for x in 0..new_w {
                for c in 0..3 {
                    let mut acc = half;
                    for (k, &wt) in t.weights[y].iter().enumerate() {
                        acc += wt as i64 * horizontal[((t.start[y] + k) * new_w + x) * 3 + c] as i64;
                    }
                    out[(y * new_w + x) * 3 + c] = clip_u8(acc, t.precision);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage { width: new_w, height: new_h, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_reference() {
        assert_eq!(smart_resize(64, 96, 32, 3136, 12845056).unwrap(), (64, 96));
        assert_eq!(smart_resize(70, 50, 32, 3136, 12845056).unwrap(), (64, 64));
        // Below min_pixels: scaled up.
        assert_eq!(smart_resize(20, 20, 32, 3136, 12845056).unwrap(), (64, 64));
        // round(2.5) = 2 in Python.
        assert_eq!(smart_resize(80, 64, 32, 3136, 12845056).unwrap(), (64, 64));
        assert!(smart_resize(1, 300, 32, 3136, 12845056).is_err());
    }

    #[test]
    fn patch_layout_follows_merge_blocks() {
        let cfg = ImageProcessorConfig {
            patch_size: 1,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 1,
            ..ImageProcessorConfig::qwen3_omni()
        };
        // 2x4 image, red channel = x + 4y, pixel k normalized to (k - 127.5) / 127.5.
        let data: Vec<u8> = (0..8u8).flat_map(|k| [k, 0, 0]).collect();
        let img = RgbImage::new(4, 2, data).unwrap();
        let px = preprocess(&img, &cfg).unwrap();
        assert_eq!(px.grid_thw, [1, 2, 4]);
        let red: Vec<f32> = px.pixel_values.chunks(6).map(|p| p[0] * 127.5 + 127.5).collect();
        assert_eq!(red, vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
        // The temporal copy repeats the same value.
        assert_eq!(px.pixel_values[0], px.pixel_values[1]);
    }
}
