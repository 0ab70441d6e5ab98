//! Whisper-style log-mel features, numerically equal to transformers' `WhisperFeatureExtractor` as
//! `Qwen3OmniMoeProcessor._process_audio` calls it:
//!
//! ```python
//! feature_extractor(audio_list, sampling_rate=16000, padding=True, truncation=False,
//!                   return_attention_mask=True, return_tensors="np")
//! ```
//!
//! Reference: `transformers/models/whisper/feature_extraction_whisper.py` (`__call__`,
//! `_torch_extract_fbank_features`, `_np_extract_fbank_features`) and `transformers/audio_utils.py`
//! (`mel_filter_bank`, `window_function`, `spectrogram`). Per batch the reference:
//!
//! 1. pads every clip on the right with `padding_value` to the longest clip (`padding=True` = "longest";
//!    `truncation=False`, so nothing is cut; a single clip is not padded at all);
//! 2. per padded clip: STFT with `center=True` (reflect padding of `n_fft / 2` on both sides), periodic Hann
//!    window of `n_fft`, hop `hop_length`, power spectrum `|X|²`, dropping the last frame — so a padded clip
//!    of `L` samples gives `L / hop_length` frames;
//! 3. Slaney-style mel filter bank (Slaney mel scale, area normalisation, 0–8000 Hz, `feature_size` bins),
//!    `log10(max(mel, 1e-10))`;
//! 4. `max(x, max(x) - 8)` where the max is over the whole padded item (all mel bins × all frames of that
//!    clip, padding frames included), then `(x + 4) / 4`;
//! 5. attention mask = sample mask `[::hop_length]`, trimmed by one column when `L % hop_length != 0`; so clip
//!    `i` of `l_i` samples has `min(ceil(l_i / hop), L / hop)` valid frames, the rest are padding.
//!
//! Note that the features of a short clip in a batch differ (near its end) from the same clip extracted
//! alone: the reference computes them on the zero-padded waveform. [`LogMelExtractor::extract`] mirrors this.
//!
//! transformers uses the torch path (`float32` `torch.stft`) whenever torch is installed and the `float64`
//! numpy path otherwise; the two differ by up to ~5e-5. This implementation computes in `f64` (like the numpy
//! path) and stays within 1e-4 of both (tested against goldens from the torch path).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};
use serde::Deserialize;

/// Errors from the feature extractor and its configuration.
#[derive(Debug, thiserror::Error)]
pub enum MelError {
    #[error("log-mel features: no audio clips given")]
    NoClips,
    #[error("log-mel features: audio clip {index} is empty")]
    EmptyClip { index: usize },
    #[error("log-mel features: audio clip {index} has a non-finite sample at position {sample}")]
    NonFinite { index: usize, sample: usize },
    #[error(
        "log-mel features: audio too short: the longest clip has {samples} samples, at least {min} are needed \
         ({min_ms:.1} ms at {rate} Hz)"
    )]
    TooShort {
        samples: usize,
        min: usize,
        min_ms: f64,
        rate: u32,
    },
    #[error("invalid feature-extractor config: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the feature-extractor config in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no feature-extractor config in {dir}: expected processor_config.json with a \"feature_extractor\" \
         object, or preprocessor_config.json"
    )]
    MissingConfig { dir: PathBuf },
}

fn d_feature_size() -> usize {
    80
}
fn d_sampling_rate() -> u32 {
    16_000
}
fn d_hop_length() -> usize {
    160
}
fn d_n_fft() -> usize {
    400
}
fn d_padding_side() -> String {
    "right".to_string()
}

/// The feature-extractor fields of a checkpoint's `preprocessor_config.json`. Missing fields take
/// `WhisperFeatureExtractor.__init__`'s defaults (like transformers does); unknown fields are ignored.
/// `chunk_length` / `n_samples` / `nb_max_frames` only matter for `padding="max_length"` / truncation,
/// which the Qwen3-Omni processor does not use, so they are not read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MelConfig {
    /// Number of mel bins (128 for Qwen3-Omni).
    #[serde(default = "d_feature_size")]
    pub feature_size: usize,
    #[serde(default = "d_sampling_rate")]
    pub sampling_rate: u32,
    #[serde(default = "d_hop_length")]
    pub hop_length: usize,
    #[serde(default = "d_n_fft")]
    pub n_fft: usize,
    /// Value the shorter clips of a batch are padded with.
    #[serde(default)]
    pub padding_value: f64,
    /// Gaussian dither amplitude; only 0.0 is supported (the reference draws random noise otherwise).
    #[serde(default)]
    pub dither: f64,
    #[serde(default)]
    pub return_attention_mask: bool,
    /// Side the batch padding goes to; only "right" is supported (the Qwen3-Omni value).
    #[serde(default = "d_padding_side")]
    pub padding_side: String,
}

impl MelConfig {
    /// The Qwen3-Omni checkpoint values (`Qwen/Qwen3-Omni-30B-A3B-*` `preprocessor_config.json`).
    pub fn qwen3_omni() -> Self {
        Self {
            feature_size: 128,
            sampling_rate: 16_000,
            hop_length: 160,
            n_fft: 400,
            padding_value: 0.0,
            dither: 0.0,
            return_attention_mask: true,
            padding_side: "right".to_string(),
        }
    }

    /// Parse a feature-extractor JSON object: either flat (`preprocessor_config.json`) or a processor config
    /// with a nested `"feature_extractor"` (or `"audio_processor"`) object (transformers 5
    /// `processor_config.json`).
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let inner = v
            .get("feature_extractor")
            .or_else(|| v.get("audio_processor"))
            .unwrap_or(&v);
        MelConfig::deserialize(inner)
    }

    /// Read the config from a model directory with transformers' priority: a nested `"feature_extractor"`
    /// (or `"audio_processor"`) object in `processor_config.json` if present, else `preprocessor_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, MelError> {
        let read = |path: &Path| -> Result<serde_json::Value, MelError> {
            let text = std::fs::read_to_string(path).map_err(|source| MelError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| MelError::Json {
                path: path.to_path_buf(),
                source,
            })
        };
        let parse = |path: &Path, v: &serde_json::Value| -> Result<Self, MelError> {
            let cfg = MelConfig::deserialize(v).map_err(|source| MelError::Json {
                path: path.to_path_buf(),
                source,
            })?;
            cfg.validate()?;
            Ok(cfg)
        };
        let proc_path = dir.join("processor_config.json");
        if proc_path.is_file() {
            let v = read(&proc_path)?;
            if let Some(inner) = v
                .get("feature_extractor")
                .or_else(|| v.get("audio_processor"))
            {
                return parse(&proc_path, inner);
            }
        }
        let pre_path = dir.join("preprocessor_config.json");
        if pre_path.is_file() {
            let v = read(&pre_path)?;
            return parse(&pre_path, &v);
        }
        Err(MelError::MissingConfig {
            dir: dir.to_path_buf(),
        })
    }

    /// Reject values this implementation cannot reproduce exactly.
    pub fn validate(&self) -> Result<(), MelError> {
        let bad = |m: String| Err(MelError::Config(m));
        if self.feature_size == 0 {
            return bad("feature_size must be > 0".into());
        }
        if self.sampling_rate == 0 {
            return bad("sampling_rate must be > 0".into());
        }
        if self.hop_length == 0 {
            return bad("hop_length must be > 0".into());
        }
        if self.n_fft < 4 || self.n_fft % 2 != 0 {
            return bad(format!("n_fft must be even and >= 4, got {}", self.n_fft));
        }
        if self.dither != 0.0 {
            return bad(format!(
                "dither = {} is not supported (the reference adds random Gaussian noise); use 0.0",
                self.dither
            ));
        }
        if !self.padding_value.is_finite() {
            return bad("padding_value must be finite".into());
        }
        if self.padding_side != "right" {
            return bad(format!(
                "padding_side = {:?} is not supported (only \"right\")",
                self.padding_side
            ));
        }
        Ok(())
    }

    /// Number of feature frames for a (padded) waveform of `samples` samples: the STFT gives
    /// `1 + samples / hop` frames and the last one is dropped.
    pub fn n_frames(&self, samples: usize) -> usize {
        samples / self.hop_length
    }

    /// Attention-mask valid frames for a clip of `clip_samples` samples in a batch padded to
    /// `padded_samples`: `min(ceil(clip / hop), padded / hop)`.
    pub fn valid_frames(&self, clip_samples: usize, padded_samples: usize) -> usize {
        clip_samples
            .div_ceil(self.hop_length)
            .min(self.n_frames(padded_samples))
    }

    /// Fewest samples the longest clip of a batch must have: torch's reflect padding needs more than
    /// `n_fft / 2` samples.
    pub fn min_samples(&self) -> usize {
        (self.n_fft / 2 + 1).max(self.hop_length)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Mel scale / filter bank (transformers.audio_utils, mel_scale="slaney", norm="slaney"), all in f64.
// ------------------------------------------------------------------------------------------------------------

/// `hertz_to_mel(freq, mel_scale="slaney")`.
pub fn hertz_to_mel_slaney(freq: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if freq >= MIN_LOG_HERTZ {
        MIN_LOG_MEL + (freq / MIN_LOG_HERTZ).ln() * logstep
    } else {
        3.0 * freq / 200.0
    }
}

/// `mel_to_hertz(mels, mel_scale="slaney")`.
pub fn mel_to_hertz_slaney(mels: f64) -> f64 {
    const MIN_LOG_HERTZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mels >= MIN_LOG_MEL {
        MIN_LOG_HERTZ * (logstep * (mels - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mels / 3.0
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included, `i * step + start`, last value exactly `stop`).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            v[num - 1] = stop;
            v
        }
    }
}

/// `mel_filter_bank(num_frequency_bins, num_mel_filters, min_frequency, max_frequency, sampling_rate,
/// norm="slaney", mel_scale="slaney")`, returned as `[num_frequency_bins][num_mel_filters]` (same layout
/// as the numpy array).
pub fn mel_filter_bank(
    num_frequency_bins: usize,
    num_mel_filters: usize,
    min_frequency: f64,
    max_frequency: f64,
    sampling_rate: u32,
) -> Vec<Vec<f64>> {
    let mel_min = hertz_to_mel_slaney(min_frequency);
    let mel_max = hertz_to_mel_slaney(max_frequency);
    let mel_freqs = linspace(mel_min, mel_max, num_mel_filters + 2);
    let filter_freqs: Vec<f64> = mel_freqs.iter().map(|&m| mel_to_hertz_slaney(m)).collect();
    // np.linspace(0, sampling_rate // 2, num_frequency_bins): integer division as in the reference.
    let fft_freqs = linspace(0.0, (sampling_rate / 2) as f64, num_frequency_bins);
    let filter_diff: Vec<f64> = filter_freqs.windows(2).map(|w| w[1] - w[0]).collect();
    let mut bank = vec![vec![0.0f64; num_mel_filters]; num_frequency_bins];
    for (i, row) in bank.iter_mut().enumerate() {
        for (j, w) in row.iter_mut().enumerate() {
            // slopes = filter_freqs - fft_freqs[i]
            let down = -(filter_freqs[j] - fft_freqs[i]) / filter_diff[j];
            let up = (filter_freqs[j + 2] - fft_freqs[i]) / filter_diff[j + 1];
            let v = down.min(up).max(0.0);
            let enorm = 2.0 / (filter_freqs[j + 2] - filter_freqs[j]);
            *w = v * enorm;
        }
    }
    bank
}

/// `window_function(n, "hann", periodic=True)` = `np.hanning(n + 1)[:-1]`.
pub fn hann_periodic(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos())
        .collect()
}

/// One mel filter stored sparsely: weights for frequency bins `start .. start + weights.len()`.
#[derive(Debug, Clone)]
struct SparseFilter {
    start: usize,
    weights: Vec<f64>,
}

/// Log-mel features for a batch of clips, laid out like the reference's `input_features`.
#[derive(Debug, Clone, PartialEq)]
pub struct MelBatch {
    /// Mel bins per frame (`feature_size`).
    pub n_mels: usize,
    /// Frames per clip (all clips are padded to the longest one): `longest_samples / hop_length`.
    pub n_frames: usize,
    /// `[batch, n_mels, n_frames]` row-major.
    pub features: Vec<f32>,
    /// Attention-mask valid frame count per clip (`feature_attention_mask.sum(-1)`).
    pub valid_frames: Vec<usize>,
    /// Input length of each clip in samples.
    pub clip_samples: Vec<usize>,
}

impl MelBatch {
    pub fn batch_size(&self) -> usize {
        self.valid_frames.len()
    }

    /// Features of clip `i`, `[n_mels, n_frames]` row-major (padding frames included).
    pub fn clip(&self, i: usize) -> &[f32] {
        let n = self.n_mels * self.n_frames;
        &self.features[i * n..(i + 1) * n]
    }

    /// Features of clip `i` restricted to its valid frames, `[n_mels, valid_frames[i]]` row-major (what the
    /// Qwen3-Omni audio encoder consumes: `input_features[i][:, mask[i]]`).
    pub fn clip_valid(&self, i: usize) -> Vec<f32> {
        let v = self.valid_frames[i];
        self.clip(i)
            .chunks_exact(self.n_frames)
            .flat_map(|row| row[..v].iter().copied())
            .collect()
    }

    /// Attention mask `[batch, n_frames]` with 1 for valid frames, row-major.
    pub fn attention_mask(&self) -> Vec<u32> {
        let mut m = vec![0u32; self.batch_size() * self.n_frames];
        for (i, &v) in self.valid_frames.iter().enumerate() {
            m[i * self.n_frames..i * self.n_frames + v].fill(1);
        }
        m
    }

    /// `input_features` as a candle tensor `[batch, n_mels, n_frames]` (f32).
    pub fn features_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_slice(
            &self.features,
            (self.batch_size(), self.n_mels, self.n_frames),
            device,
        )
    }

    /// `feature_attention_mask` as a candle tensor `[batch, n_frames]` (u32 0/1).
    pub fn attention_mask_tensor(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(
            self.attention_mask(),
            (self.batch_size(), self.n_frames),
            device,
        )
    }
}

/// Whisper log-mel extractor (see the module docs for the exact semantics).
pub struct LogMelExtractor {
    cfg: MelConfig,
    filters: Vec<SparseFilter>,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for LogMelExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMelExtractor")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl LogMelExtractor {
    pub fn new(cfg: &MelConfig) -> Result<Self, MelError> {
        cfg.validate()?;
        let n_bins = cfg.n_fft / 2 + 1;
        // WhisperFeatureExtractor: min_frequency=0.0, max_frequency=8000.0 regardless of sampling_rate.
        let bank = mel_filter_bank(n_bins, cfg.feature_size, 0.0, 8000.0, cfg.sampling_rate);
        let filters = (0..cfg.feature_size)
            .map(|j| {
                let nz: Vec<usize> = (0..n_bins).filter(|&i| bank[i][j] != 0.0).collect();
                match (nz.first(), nz.last()) {
                    (Some(&a), Some(&b)) => SparseFilter {
                        start: a,
                        weights: (a..=b).map(|i| bank[i][j]).collect(),
                    },
                    _ => SparseFilter {
                        start: 0,
                        weights: vec![],
                    },
                }
            })
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(cfg.n_fft);
        Ok(Self {
            cfg: cfg.clone(),
            filters,
            window: hann_periodic(cfg.n_fft),
            fft,
        })
    }

    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// Features of one clip alone (a batch of one: no padding).
    pub fn extract_one(&self, clip: &[f32]) -> Result<MelBatch, MelError> {
        self.extract(&[clip])
    }

    /// Features for a batch of 16 kHz mono clips, exactly as the reference processes them in one call:
    /// clips are zero-padded (`padding_value`) to the longest one, each padded clip gets
    /// `longest / hop_length` frames, and `valid_frames[i]` marks the frames of clip `i`.
    pub fn extract(&self, clips: &[&[f32]]) -> Result<MelBatch, MelError> {
        if clips.is_empty() {
            return Err(MelError::NoClips);
        }
        for (index, c) in clips.iter().enumerate() {
            if c.is_empty() {
                return Err(MelError::EmptyClip { index });
            }
            if let Some(sample) = c.iter().position(|x| !x.is_finite()) {
                return Err(MelError::NonFinite { index, sample });
            }
        }
        let cfg = &self.cfg;
        let longest = clips.iter().map(|c| c.len()).max().unwrap_or(0);
        let min = cfg.min_samples();
        if longest < min {
            return Err(MelError::TooShort {
                samples: longest,
                min,
                min_ms: min as f64 * 1000.0 / cfg.sampling_rate as f64,
                rate: cfg.sampling_rate,
            });
        }
        let n_frames = cfg.n_frames(longest);
        let n_mels = cfg.feature_size;
        let mut features = vec![0.0f32; clips.len() * n_mels * n_frames];
        let mut log_spec = vec![0.0f64; n_mels * n_frames];
        for (b, clip) in clips.iter().enumerate() {
            self.log_mel_padded(clip, longest, n_frames, &mut log_spec);
            let max = log_spec.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let floor = max - 8.0;
            let dst = &mut features[b * n_mels * n_frames..(b + 1) * n_mels * n_frames];
            for (d, &x) in dst.iter_mut().zip(log_spec.iter()) {
                *d = clamp_and_scale(x, floor);
            }
        }
        Ok(MelBatch {
            n_mels,
            n_frames,
            features,
            valid_frames: clips
                .iter()
                .map(|c| cfg.valid_frames(c.len(), longest))
                .collect(),
            clip_samples: clips.iter().map(|c| c.len()).collect(),
        })
    }

    /// log10 mel spectrogram `[n_mels, n_frames]` of `clip` right-padded to `padded_len` samples.
    fn log_mel_padded(&self, clip: &[f32], padded_len: usize, n_frames: usize, out: &mut [f64]) {
        let cfg = &self.cfg;
        let half = cfg.n_fft / 2;
        let pad_value = cfg.padding_value;
        // Padded waveform sample at index i in [0, padded_len).
        let sample = |i: usize| -> f64 {
            if i < clip.len() {
                clip[i] as f64
            } else {
                pad_value
            }
        };
        let mut bufs = self.frame_buffers();
        for t in 0..n_frames {
            let start = t * cfg.hop_length;
            self.log_mel_frame(
                |k| sample(reflect_centered(start + k, half, padded_len)),
                &mut bufs,
                |m, v| out[m * n_frames + t] = v,
            );
        }
    }

    /// Scratch buffers for [`Self::log_mel_frame`].
    pub(crate) fn frame_buffers(&self) -> FrameBuffers {
        FrameBuffers {
            frame: self.fft.make_input_vec(),
            spectrum: self.fft.make_output_vec(),
            scratch: self.fft.make_scratch_vec(),
            power: vec![0.0f64; self.cfg.n_fft / 2 + 1],
        }
    }

    /// log10 mel values of one STFT frame: `padded(k)` is sample `k` (`0..n_fft`) of the frame in the
    /// centre-padded waveform; `out(m, value)` receives mel bin `m`. The offline extractor and the
    /// streaming one (`audio::stream`) both call this, so their frames are bit-identical.
    pub(crate) fn log_mel_frame(
        &self,
        padded: impl Fn(usize) -> f64,
        bufs: &mut FrameBuffers,
        mut out: impl FnMut(usize, f64),
    ) {
        for (k, (f, w)) in bufs.frame.iter_mut().zip(self.window.iter()).enumerate() {
            *f = padded(k) * w;
        }
        // Lengths are fixed by the plan, so this cannot fail.
        if self
            .fft
            .process_with_scratch(&mut bufs.frame, &mut bufs.spectrum, &mut bufs.scratch)
            .is_err()
        {
            unreachable!("realfft buffer lengths come from the plan");
        }
        for (p, c) in bufs.power.iter_mut().zip(bufs.spectrum.iter()) {
            *p = c.re * c.re + c.im * c.im;
        }
        for (m, filt) in self.filters.iter().enumerate() {
            let s: f64 = filt
                .weights
                .iter()
                .zip(&bufs.power[filt.start..filt.start + filt.weights.len()])
                .map(|(w, p)| w * p)
                .sum();
            out(m, s.max(1e-10).log10());
        }
    }
}

/// Scratch buffers of one STFT frame (FFT input/output/scratch and the power spectrum).
pub(crate) struct FrameBuffers {
    frame: Vec<f64>,
    spectrum: Vec<realfft::num_complex::Complex<f64>>,
    scratch: Vec<realfft::num_complex::Complex<f64>>,
    power: Vec<f64>,
}

/// Centre padding (reflect, edge not repeated) of `half` on both sides: padded index `j` maps to waveform
/// index `j - half`, reflected into `[0, len)`. Requires `len > half`.
pub(crate) fn reflect_centered(j: usize, half: usize, len: usize) -> usize {
    let n = len as isize;
    let mut k = j as isize - half as isize;
    if k < 0 {
        k = -k;
    }
    if k >= n {
        k = 2 * (n - 1) - k;
    }
    k as usize
}

/// Step 4 of the module docs for one value: `(max(x, floor) + 4) / 4` with `floor = max - 8`.
pub(crate) fn clamp_and_scale(log_mel: f64, floor: f64) -> f32 {
    ((log_mel.max(floor) + 4.0) / 4.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mel_scale_round_trips_and_matches_known_values() {
        assert_eq!(hertz_to_mel_slaney(0.0), 0.0);
        assert!((hertz_to_mel_slaney(1000.0) - 15.0).abs() < 1e-12);
        // librosa.hz_to_mel(8000) (slaney) = 45.245640471924965
        assert!((hertz_to_mel_slaney(8000.0) - 45.245_640_471_924_965).abs() < 1e-12);
        for f in [0.0, 123.4, 999.9, 1000.0, 4321.0, 8000.0] {
            assert!(
                (mel_to_hertz_slaney(hertz_to_mel_slaney(f)) - f).abs() < 1e-9,
                "{f}"
            );
        }
    }

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 8000.0, 201)[1], 40.0);
        assert_eq!(*linspace(0.0, 8000.0, 201).last().unwrap(), 8000.0);
        assert_eq!(linspace(1.0, 2.0, 1), vec![1.0]);
    }

    /// Values from transformers `mel_filter_bank(201, 128, 0, 8000, 16000, norm="slaney", mel_scale="slaney")`.
    #[test]
    fn filter_bank_matches_transformers() {
        let bank = mel_filter_bank(201, 128, 0.0, 8000.0, 16_000);
        assert_eq!(bank.len(), 201);
        assert_eq!(bank[0].len(), 128);
        let nz = |j: usize| -> Vec<usize> { (0..201).filter(|&i| bank[i][j] != 0.0).collect() };
        for &(j, first, last, sum, at, val) in REF_FILTERS {
            let z = nz(j);
            assert_eq!(
                (z[0], *z.last().unwrap()),
                (first, last),
                "filter {j} support"
            );
            let s: f64 = (0..201).map(|i| bank[i][j]).sum();
            assert!((s - sum).abs() < 1e-12, "filter {j} sum {s} vs {sum}");
            assert!(
                (bank[at][j] - val).abs() < 1e-12 * val,
                "filter {j} at {at}: {} vs {val}",
                bank[at][j]
            );
        }
        // Every filter is non-empty (no all-zero warning in the reference).
        for j in 0..128 {
            assert!(!nz(j).is_empty());
        }
    }

    // (filter index, first nonzero bin, last nonzero bin, sum of weights, a bin, its weight)
    const REF_FILTERS: &[(usize, usize, usize, f64, usize, f64)] = &[
        (0, 1, 1, 0.012373986332636965, 1, 0.012373986332636965),
        (1, 1, 1, 0.03039256487135522, 1, 0.03039256487135522),
        (2, 2, 2, 0.024747972665273926, 2, 0.024747972665273926),
        (10, 6, 7, 0.01237398633263701, 7, 0.001084801920474365),
        (37, 22, 22, 0.02713815910993217, 22, 0.02713815910993217),
        (50, 30, 31, 0.021764774452659612, 31, 0.010725830262017776),
        (64, 42, 43, 0.024841200325741553, 43, 0.01809151762107613),
        (
            100,
            100,
            104,
            0.02529001787857143,
            102,
            0.009409416247795852,
        ),
        (
            126,
            187,
            195,
            0.024841738008521724,
            191,
            0.004951984363095906,
        ),
        (
            127,
            191,
            199,
            0.02493604388376728,
            195,
            0.005041601675024642,
        ),
    ];

    #[test]
    fn hann_window_is_periodic() {
        let w = hann_periodic(400);
        assert_eq!(w[0], 0.0);
        assert!((w[200] - 1.0).abs() < 1e-15);
        assert!((w[100] - 0.5).abs() < 1e-15);
        assert!((w[1] - w[399]).abs() < 1e-15);
    }

    #[test]
    fn frame_count_and_mask_arithmetic() {
        let c = MelConfig::qwen3_omni();
        assert_eq!(c.n_frames(16_000), 100);
        assert_eq!(c.n_frames(16_159), 100);
        assert_eq!(c.n_frames(16_160), 101);
        assert_eq!(c.n_frames(8_000), 50);
        // longest 19752 samples -> 123 frames; a 7777-sample clip has ceil(7777/160) = 49 valid frames.
        assert_eq!(c.valid_frames(19_752, 19_752), 123);
        assert_eq!(c.valid_frames(7_777, 19_752), 49);
        // the trailing partial hop of the longest clip is not a frame
        assert_eq!(c.valid_frames(16_100, 16_100), 100);
        assert_eq!(c.valid_frames(16_000, 16_000), 100);
        assert_eq!(c.valid_frames(1, 16_000), 1);
        assert_eq!(c.min_samples(), 201);
    }

    #[test]
    fn batch_layout_and_errors() {
        let ex = LogMelExtractor::new(&MelConfig::qwen3_omni()).unwrap();
        let a: Vec<f32> = (0..3_300).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let b: Vec<f32> = a[..1_000].to_vec();
        let out = ex.extract(&[&a, &b]).unwrap();
        assert_eq!((out.batch_size(), out.n_mels, out.n_frames), (2, 128, 20));
        assert_eq!(out.valid_frames, vec![20, 7]);
        assert_eq!(out.features.len(), 2 * 128 * 20);
        assert_eq!(out.clip_valid(1).len(), 128 * 7);
        let m = out.attention_mask();
        assert_eq!(m[..20].iter().sum::<u32>(), 20);
        assert_eq!(m[20..].iter().sum::<u32>(), 7);
        // the first clip does not depend on its batch-mates
        let alone = ex.extract_one(&a).unwrap();
        assert_eq!(alone.clip(0), out.clip(0));
        // all features are within the clamp range
        let mx = out.clip(0).iter().copied().fold(f32::MIN, f32::max);
        let mn = out.clip(0).iter().copied().fold(f32::MAX, f32::min);
        assert!((mx - mn - 2.0).abs() < 1e-5 || mx - mn < 2.0, "{mx} {mn}");

        assert!(matches!(ex.extract(&[]), Err(MelError::NoClips)));
        assert!(matches!(
            ex.extract(&[&a, &[]]),
            Err(MelError::EmptyClip { index: 1 })
        ));
        assert!(matches!(
            ex.extract(&[&a[..200]]),
            Err(MelError::TooShort { samples: 200, .. })
        ));
        assert!(ex.extract(&[&a[..201]]).is_ok());
        let mut nan = a.clone();
        nan[7] = f32::NAN;
        assert!(matches!(
            ex.extract(&[&nan]),
            Err(MelError::NonFinite {
                index: 0,
                sample: 7
            })
        ));
    }

    #[test]
    fn silence_gives_constant_features() {
        let ex = LogMelExtractor::new(&MelConfig::qwen3_omni()).unwrap();
        let out = ex.extract_one(&[0.0f32; 1_600]).unwrap();
        // log10(1e-10) = -10 everywhere -> (-10 + 4) / 4 = -1.5
        assert!(out.features.iter().all(|&x| x == -1.5));
    }

    #[test]
    fn config_layouts_and_validation() {
        let flat = r#"{"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
            "padding_value": 0.0, "dither": 0.0, "return_attention_mask": true, "chunk_length": 300,
            "padding_side": "right", "image_mean": [0.5, 0.5, 0.5]}"#;
        let nested =
            format!(r#"{{"feature_extractor": {flat}, "image_processor": {{"patch_size": 16}}}}"#);
        assert_eq!(
            MelConfig::from_json_str(flat).unwrap(),
            MelConfig::qwen3_omni()
        );
        assert_eq!(
            MelConfig::from_json_str(&nested).unwrap(),
            MelConfig::qwen3_omni()
        );
        let defaults = MelConfig::from_json_str("{}").unwrap();
        assert_eq!(
            (defaults.feature_size, defaults.return_attention_mask),
            (80, false)
        );

        let mut c = MelConfig::qwen3_omni();
        c.dither = 1e-4;
        assert!(matches!(c.validate(), Err(MelError::Config(_))));
        let mut c = MelConfig::qwen3_omni();
        c.padding_side = "left".into();
        assert!(LogMelExtractor::new(&c).is_err());
        let mut c = MelConfig::qwen3_omni();
        c.n_fft = 401;
        assert!(c.validate().is_err());
    }

    #[test]
    fn config_from_model_dir_prefers_nested_processor_config() {
        let dir = std::env::temp_dir().join(format!("omni_mel_cfg_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            MelConfig::from_model_dir(&dir),
            Err(MelError::MissingConfig { .. })
        ));
        std::fs::write(
            dir.join("preprocessor_config.json"),
            r#"{"feature_size": 80}"#,
        )
        .unwrap();
        assert_eq!(MelConfig::from_model_dir(&dir).unwrap().feature_size, 80);
        // a processor_config.json without a nested object does not override
        std::fs::write(
            dir.join("processor_config.json"),
            r#"{"processor_class": "X"}"#,
        )
        .unwrap();
        assert_eq!(MelConfig::from_model_dir(&dir).unwrap().feature_size, 80);
        std::fs::write(
            dir.join("processor_config.json"),
            r#"{"feature_extractor": {"feature_size": 128}}"#,
        )
        .unwrap();
        assert_eq!(MelConfig::from_model_dir(&dir).unwrap().feature_size, 128);
        std::fs::write(dir.join("processor_config.json"), "{not json").unwrap();
        let e = MelConfig::from_model_dir(&dir).unwrap_err();
        assert!(e.to_string().contains("processor_config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
