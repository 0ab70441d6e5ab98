//! `omni bench`: speed at the real model's shapes on random weights (speed does not depend on the
//! values). `audio-encoder` writes its weights to a cache directory once; `speech`, `thinker` and
//! `latency` load every stage through its ordinary loader from random Q8_0 weights made in memory
//! ([`WeightStore::random`], see [`random_weights`]), so they need no files at all.
//!
//! * [`speech`]: Talker frames/s, code predictor ms per frame, streaming Code2Wav ms per second of
//!   audio, real-time factor, time to the first audio chunk.
//! * [`thinker`]: prefill and decode tokens/s (optionally on fewer layers, extrapolated).
//! * [`latency`]: end of user speech → first answer audio, stage by stage.
//! * [`matmul`]: the Q8_0 product kernels alone, GMAC/s at the hot paths' shapes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::audio::{LogMelExtractor, MelConfig};
use crate::audio_encoder::{AudioEncoder, ClipFeatures};
use crate::config::{AudioEncoderConfig, OmniConfig};
use crate::weights::WeightStore;

pub mod conversation;
pub mod latency;
pub mod machine;
pub mod matmul;
pub mod random_weights;
pub mod speech;
pub mod thinker;

/// The real Qwen3-Omni-30B-A3B-Instruct config, compiled in.
pub const REAL_CONFIG: &str =
    include_str!("../../../tests/fixtures/configs/qwen3-omni-30b-a3b-instruct.json");

pub fn real_config() -> Result<OmniConfig> {
    OmniConfig::from_json_str(REAL_CONFIG).context("the bundled real config")
}

/// Tensor names and shapes of `thinker.audio_tower` for `cfg` (the checkpoint layout).
pub fn audio_tower_tensors(cfg: &AudioEncoderConfig) -> Vec<(String, Vec<usize>)> {
    let (d, ds, ffn) = (cfg.d_model, cfg.downsample_hidden_size, cfg.encoder_ffn_dim);
    let freq = (((cfg.num_mel_bins + 1) / 2 + 1) / 2 + 1) / 2;
    let p = "thinker.audio_tower";
    let mut t: Vec<(String, Vec<usize>)> = vec![
        (format!("{p}.conv2d1.weight"), vec![ds, 1, 3, 3]),
        (format!("{p}.conv2d1.bias"), vec![ds]),
        (format!("{p}.conv2d2.weight"), vec![ds, ds, 3, 3]),
        (format!("{p}.conv2d2.bias"), vec![ds]),
        (format!("{p}.conv2d3.weight"), vec![ds, ds, 3, 3]),
        (format!("{p}.conv2d3.bias"), vec![ds]),
        (format!("{p}.conv_out.weight"), vec![d, ds * freq]),
        (format!("{p}.ln_post.weight"), vec![d]),
        (format!("{p}.ln_post.bias"), vec![d]),
        (format!("{p}.proj1.weight"), vec![d, d]),
        (format!("{p}.proj1.bias"), vec![d]),
        (format!("{p}.proj2.weight"), vec![cfg.output_dim, d]),
        (format!("{p}.proj2.bias"), vec![cfg.output_dim]),
    ];
    for l in 0..cfg.encoder_layers {
        let lp = format!("{p}.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((format!("{lp}.self_attn.{proj}.weight"), vec![d, d]));
            t.push((format!("{lp}.self_attn.{proj}.bias"), vec![d]));
        }
        for norm in ["self_attn_layer_norm", "final_layer_norm"] {
            t.push((format!("{lp}.{norm}.weight"), vec![d]));
            t.push((format!("{lp}.{norm}.bias"), vec![d]));
        }
        t.push((format!("{lp}.fc1.weight"), vec![ffn, d]));
        t.push((format!("{lp}.fc1.bias"), vec![ffn]));
        t.push((format!("{lp}.fc2.weight"), vec![d, ffn]));
        t.push((format!("{lp}.fc2.bias"), vec![d]));
    }
    t
}

/// Writes random bf16 tensors as `dir/model.safetensors` (temp file, then rename), unless present.
pub fn write_random_safetensors(
    dir: &Path,
    tensors: &[(String, Vec<usize>)],
    seed: u64,
) -> Result<()> {
    let path = dir.join("model.safetensors");
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.contains("norm") || name.contains("ln_");
            (0..n)
                .flat_map(|_| {
                    let v: f32 = if is_norm && name.ends_with("weight") {
                        1.0
                    } else {
                        (rng.random::<f32>() - 0.5) * 0.04
                    };
                    bf16::from_f32(v).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&buffers)
        .map(|((name, shape), buf)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), buf)?,
            ))
        })
        .collect::<Result<_>>()?;
    let tmp = dir.join("model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Result of the audio encoder bench.
#[derive(Debug, serde::Serialize)]
pub struct AudioEncoderBench {
    pub audio_seconds: f64,
    pub threads: usize,
    pub mel_ms: f64,
    pub encoder_ms: f64,
    pub encoder_ms_per_audio_minute: f64,
    pub tokens: usize,
}

/// Times mel + AuT encoder at the real shapes on `seconds` of synthetic audio.
pub fn bench_audio_encoder(cache: &Path, seconds: f64) -> Result<AudioEncoderBench> {
    let cfg = real_config()?;
    let acfg = cfg
        .thinker_config
        .audio_config
        .context("real config has an audio encoder")?;
    let dir: PathBuf = cache.join("real-audio-tower");
    eprintln!(
        "bench: random real-shape audio tower in {} (written once)",
        dir.display()
    );
    write_random_safetensors(&dir, &audio_tower_tensors(&acfg), 7)?;
    let store = WeightStore::open(&dir)?;
    let encoder = AudioEncoder::new(&acfg, &store.root().pp("thinker.audio_tower"))?;
    let mel = LogMelExtractor::new(&MelConfig::qwen3_omni())?;
    let n = (seconds * 16000.0) as usize;
    let samples: Vec<f32> = (0..n)
        .map(|i| 0.3 * (i as f32 * 0.05).sin() * ((i / 800) % 3) as f32)
        .collect();
    let start = Instant::now();
    let batch = mel.extract(&[&samples])?;
    let mel_ms = start.elapsed().as_secs_f64() * 1e3;
    let valid = batch.clip_valid(0);
    let start = Instant::now();
    let tokens = encoder.forward(&[ClipFeatures {
        mel: &valid,
        frames: batch.valid_frames[0],
    }])?;
    let encoder_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(AudioEncoderBench {
        audio_seconds: seconds,
        threads: candle_core::utils::get_num_threads(),
        mel_ms,
        encoder_ms,
        encoder_ms_per_audio_minute: (mel_ms + encoder_ms) * 60.0 / seconds,
        tokens: tokens.per_clip[0],
    })
}
