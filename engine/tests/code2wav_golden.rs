//! Code2Wav against transformers: `forward` and `chunked_decode` waveforms of the tiny checkpoints
//! (fixtures from `tests/golden/make_code2wav_fixtures.py`), the streaming decoder against the
//! non-streaming one, and bad codes.
//!
//! The goldens are the reference waveforms *before* the final `clamp(-1, 1)` (the reference output
//! is their clamp, bit for bit), subsampled by `stride` for long cases. The tiny checkpoints' last
//! conv is scaled up, which leaves tiny-a's waveform almost entirely below -1 (clamped output
//! constant) and both with a large DC offset, so besides the plain SNR of the clamped output we check
//! the SNR of the raw waveform with the reference's mean removed ("AC SNR"), which sees every error.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use omni_engine::code2wav::{Code2Wav, CodecFrames, CodecFramesError, StreamingOptions};
use omni_engine::config::OmniConfig;
use omni_engine::weights::WeightStore;
use serde::Deserialize;

use common::{fixture, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    samples_per_frame: usize,
    outputs: Vec<Output>,
}

#[derive(Deserialize)]
struct Output {
    key: String,
    codes: String,
    frames: usize,
    kind: String,
    chunk_size: Option<usize>,
    left_context: Option<usize>,
    stride: usize,
    num_samples: usize,
}

fn load_model(dir: &Path) -> Code2Wav {
    let cfg = OmniConfig::from_file(&dir.join("config.json")).unwrap();
    let c2w_cfg = cfg
        .code2wav_config
        .expect("tiny checkpoints have a code2wav_config");
    let store = WeightStore::open(dir).unwrap();
    let model = Code2Wav::new(&c2w_cfg, &store.root().pp("code2wav")).unwrap();
    store.ensure_all_used("code2wav.").unwrap();
    model
}

struct Fixture {
    model: Code2Wav,
    golden: Golden,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let dir = fixture(name);
        let golden: Golden = serde_json::from_str(
            &std::fs::read_to_string(dir.join("golden/code2wav.json")).unwrap(),
        )
        .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("golden/code2wav.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            model: load_model(&dir),
            golden,
            tensors,
        }
    }

    fn codes(&self, key: &str) -> CodecFrames {
        let rows: Vec<Vec<u32>> = self.tensors[key]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| u32::try_from(x).unwrap()).collect())
            .collect();
        CodecFrames::from_codebook_major(&rows).unwrap()
    }

    fn raw(&self, key: &str) -> Vec<f32> {
        self.tensors[key].to_vec1::<f32>().unwrap()
    }
}

/// `10·log10(Σref² / Σ(ours - ref)²)`; infinite when equal.
fn snr_db(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let signal: f64 = reference.iter().map(|&r| (r as f64).powi(2)).sum();
    let noise: f64 = ours
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    10.0 * (signal / noise).log10()
}

/// [`snr_db`] after removing the reference's mean from both signals.
fn ac_snr_db(ours: &[f32], reference: &[f32]) -> f64 {
    let mean = reference.iter().map(|&r| r as f64).sum::<f64>() / reference.len() as f64;
    let centre = |v: &[f32]| {
        v.iter()
            .map(|&x| (x as f64 - mean) as f32)
            .collect::<Vec<_>>()
    };
    snr_db(&centre(ours), &centre(reference))
}

fn every(v: &[f32], stride: usize) -> Vec<f32> {
    v.iter().step_by(stride).copied().collect()
}

fn clamp(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.clamp(-1.0, 1.0)).collect()
}

#[test]
fn forward_and_chunked_decode_match_the_reference() {
    for name in TINY_MODELS {
        let fx = Fixture::load(name);
        let model = &fx.model;
        assert_eq!(model.samples_per_frame(), fx.golden.samples_per_frame);
        assert_eq!(model.sample_rate(), 24000);
        let mut worst = f64::INFINITY;
        for out in &fx.golden.outputs {
            let codes = fx.codes(&out.codes);
            assert_eq!(codes.len(), out.frames);
            let want_raw = fx.raw(&out.key);
            let want = clamp(&want_raw);
            let (chunk, context) = (out.chunk_size.unwrap_or(0), out.left_context.unwrap_or(0));
            let raw = match out.kind.as_str() {
                "forward" => {
                    assert_eq!(
                        model.output_len(out.frames),
                        Some(out.num_samples),
                        "{name}/{}",
                        out.key
                    );
                    model.decode_unclamped(&codes).unwrap()
                }
                "chunked" => model
                    .chunked_decode_unclamped(&codes, chunk, context)
                    .unwrap(),
                other => panic!("unknown golden kind {other}"),
            };
            assert_eq!(
                raw.len(),
                out.num_samples,
                "{name}/{}: waveform length",
                out.key
            );
            // The clamped entry points are the same computation plus the clamp (checked on the
            // short cases; decoding costs ~2 ms per frame here).
            let wav = if out.frames <= 7 {
                let wav = match out.kind.as_str() {
                    "forward" => model.decode(&codes).unwrap(),
                    _ => model.chunked_decode(&codes, chunk, context).unwrap(),
                };
                assert_eq!(
                    wav,
                    clamp(&raw),
                    "{name}/{}: clamped output is not clamp(raw)",
                    out.key
                );
                if out.kind == "forward" {
                    // Up to 300 frames the reference's default chunked_decode is one forward call.
                    assert_eq!(
                        model.chunked_decode(&codes, 300, 25).unwrap(),
                        wav,
                        "{name}/{}",
                        out.key
                    );
                }
                wav
            } else {
                clamp(&raw)
            };
            let (raw, wav) = (every(&raw, out.stride), every(&wav, out.stride));
            let snr = snr_db(&wav, &want);
            let raw_snr = snr_db(&raw, &want_raw);
            let ac = ac_snr_db(&raw, &want_raw);
            eprintln!(
                "{name}/{}: SNR {snr:.1} dB (clamped), {raw_snr:.1} dB (raw), {ac:.1} dB (raw, AC)",
                out.key
            );
            assert!(snr > 40.0, "{name}/{}: SNR {snr:.1} dB <= 40", out.key);
            assert!(
                raw_snr > 40.0,
                "{name}/{}: raw SNR {raw_snr:.1} dB <= 40",
                out.key
            );
            assert!(ac > 40.0, "{name}/{}: AC SNR {ac:.1} dB <= 40", out.key);
            worst = worst.min(ac);
        }
        eprintln!("{name}: min AC SNR {worst:.1} dB");
    }
}

/// Streams `codes` frame by frame (unclamped), checking that audio comes exactly when a chunk
/// completes and that the stream ends with `decode`'s length.
fn stream_frame_by_frame(
    model: &Code2Wav,
    codes: &CodecFrames,
    opts: StreamingOptions,
) -> Vec<f32> {
    let spf = model.samples_per_frame();
    let mut stream = model.streaming(opts).unwrap().without_clamp();
    let mut raw = Vec::new();
    for (i, frame) in codes.frames.iter().enumerate() {
        let audio = stream.push(frame.clone()).unwrap();
        if (i + 1) % opts.chunk_frames == 0 {
            assert_eq!(raw.len() + audio.len(), (i + 1) * spf - model.lag_samples());
        } else {
            assert!(audio.is_empty());
        }
        raw.extend(audio);
    }
    assert_eq!(stream.pending_frames(), codes.len() % opts.chunk_frames);
    raw.extend(stream.finish().unwrap());
    assert_eq!(
        Some(raw.len()),
        model.output_len(codes.len()),
        "streamed length"
    );
    raw
}

#[test]
fn streaming_is_close_to_decode() {
    let settings = [(12, 25), (4, 25), (25, 25), (4, 8), (12, 4), (4, 1)];
    for name in TINY_MODELS {
        let fx = Fixture::load(name);
        let model = &fx.model;
        let spf = model.samples_per_frame();
        let all = fx.codes("f330.codes");

        // Clamping and push_frames agree with the unclamped frame-by-frame stream.
        let short = CodecFrames::new(all.frames[..14].to_vec());
        let opts = StreamingOptions::uniform(4, 2);
        let raw = stream_frame_by_frame(model, &short, opts);
        let mut stream = model.streaming(opts).unwrap();
        let mut wav = stream.push_frames(&short).unwrap();
        wav.extend(stream.finish().unwrap());
        assert_eq!(
            wav,
            clamp(&raw),
            "{name}: clamped push_frames stream differs"
        );

        let codes = CodecFrames::new(all.frames[..48].to_vec());
        let full_raw = model.decode_unclamped(&codes).unwrap();
        let full = clamp(&full_raw);
        for (chunk_frames, left_context) in settings {
            let opts = StreamingOptions::uniform(chunk_frames, left_context);
            let raw = if (chunk_frames, left_context) == (12, 25) {
                stream_frame_by_frame(model, &codes, opts)
            } else {
                let mut stream = model.streaming(opts).unwrap().without_clamp();
                let mut raw = stream.push_frames(&codes).unwrap();
                raw.extend(stream.finish().unwrap());
                raw
            };
            assert_eq!(raw.len(), full_raw.len(), "{name}: streamed length");
            let snr = snr_db(&clamp(&raw), &full);
            let ac = ac_snr_db(&raw, &full_raw);
            eprintln!(
                "{name}: streaming chunk {chunk_frames} context {left_context}: SNR {snr:.1} dB (clamped), \
                 {ac:.1} dB (raw, AC) vs decode"
            );
            if (chunk_frames, left_context) == (12, 25) {
                assert!(snr > 30.0, "{name}: re-decoded streaming SNR {snr:.1} dB <= 30");
                assert!(ac > 30.0, "{name}: re-decoded streaming AC SNR {ac:.1} dB <= 30");
            }
            // The first chunk has no context to lose: it is decode's prefix.
            let first = chunk_frames * spf - model.lag_samples();
            let head = snr_db(&raw[..first], &full_raw[..first]);
            assert!(head > 60.0, "{name}: first streamed chunk SNR {head:.1} dB");
        }

        // The product's chunking: a short first chunk (the first sound), then longer ones.
        let opts = omni_engine::conversation::ANSWER_CHUNKING;
        assert!(opts.first_chunk_frames < opts.chunk_frames);
        let mut stream = model.streaming(opts).unwrap().without_clamp();
        let (mut raw, mut first_at) = (Vec::new(), None);
        for (i, frame) in codes.frames.iter().enumerate() {
            let out = stream.push(frame.clone()).unwrap();
            if !out.is_empty() && first_at.is_none() {
                first_at = Some(i + 1);
            }
            raw.extend(out);
        }
        raw.extend(stream.finish().unwrap());
        assert_eq!(first_at, Some(opts.first_chunk_frames), "{name}: first audio after the first chunk's frames");
        assert_eq!(raw.len(), full_raw.len(), "{name}: streamed length");
        let ac = ac_snr_db(&raw, &full_raw);
        eprintln!("{name}: answer chunking {opts:?}: {ac:.1} dB (raw, AC) vs decode");
        // Carried layer state: the reference forward, to float rounding.
        assert!(ac > 90.0, "{name}: answer chunking AC SNR {ac:.1} dB <= 90");
        let first = opts.first_chunk_frames * spf - model.lag_samples();
        let head = snr_db(&raw[..first], &full_raw[..first]);
        assert!(head > 60.0, "{name}: first streamed chunk SNR {head:.1} dB");
    }
}

/// Carried layer state: every chunking gives the reference `forward` waveform of all frames (the
/// 330-frame case runs far past the pre-transformer's 72-frame window), audio arriving as soon as
/// each chunk is complete.
#[test]
fn carried_streaming_is_the_reference_forward() {
    for name in TINY_MODELS {
        let fx = Fixture::load(name);
        let model = &fx.model;
        let spf = model.samples_per_frame();
        for (case, first_chunk_frames, chunk_frames) in
            [("f50", 1, 1), ("f50", 1, 8), ("f50", 12, 12), ("f330", 1, 8), ("f330", 25, 25)]
        {
            let out = fx.golden.outputs.iter().find(|o| o.key == format!("{case}.forward_raw")).unwrap();
            let codes = fx.codes(&out.codes);
            let opts = StreamingOptions { first_chunk_frames, ..StreamingOptions::carried(chunk_frames) };
            let mut stream = model.streaming(opts).unwrap().without_clamp();
            let mut raw = Vec::new();
            for (i, frame) in codes.frames.iter().enumerate() {
                let audio = stream.push(frame.clone()).unwrap();
                let done = i + 1;
                let chunk_ends = done == first_chunk_frames
                    || (done > first_chunk_frames && (done - first_chunk_frames) % chunk_frames == 0);
                if chunk_ends {
                    assert_eq!(raw.len() + audio.len(), done * spf - model.lag_samples(), "{name}/{case}: audio after frame {done}");
                } else {
                    assert!(audio.is_empty(), "{name}/{case}: audio before a chunk is complete");
                }
                raw.extend(audio);
            }
            raw.extend(stream.finish().unwrap());
            assert_eq!(raw.len(), out.num_samples, "{name}/{case}: streamed length");
            let ours = model.decode_unclamped(&codes).unwrap();
            let vs_decode = ac_snr_db(&raw, &ours);
            let vs_reference = ac_snr_db(&every(&raw, out.stride), &fx.raw(&out.key));
            eprintln!(
                "{name}/{case} carried, chunks {first_chunk_frames}+{chunk_frames}: {vs_reference:.1} dB vs reference, \
                 {vs_decode:.1} dB vs decode (raw, AC)"
            );
            assert!(vs_reference > 40.0, "{name}/{case}: AC SNR {vs_reference:.1} dB vs reference");
            assert!(vs_decode > 90.0, "{name}/{case}: AC SNR {vs_decode:.1} dB vs decode");
        }
        // Clamped output is the clamp of the raw stream.
        let codes = fx.codes("f7.codes");
        let mut stream = model.streaming(StreamingOptions::carried(3)).unwrap();
        let mut wav = stream.push_frames(&codes).unwrap();
        wav.extend(stream.finish().unwrap());
        let mut stream = model.streaming(StreamingOptions::carried(3)).unwrap().without_clamp();
        let mut raw = stream.push_frames(&codes).unwrap();
        raw.extend(stream.finish().unwrap());
        assert_eq!(wav, clamp(&raw), "{name}: clamped carried stream");
    }
}

#[test]
fn bad_codes_are_errors() {
    let fx = Fixture::load("tiny-a");
    let model = &fx.model;
    let (q, cb) = (model.num_quantizers(), model.codebook_size());
    let good = fx.codes("f7.codes");
    let kind = |e: anyhow::Error| {
        e.downcast::<CodecFramesError>()
            .expect("a CodecFramesError")
    };

    let mut out_of_range = good.clone();
    out_of_range.frames[3][5] = cb as u32;
    let want = CodecFramesError::IdOutOfRange {
        frame: 3,
        codebook: 5,
        id: cb as u32,
        codebook_size: cb,
    };
    assert_eq!(kind(model.decode(&out_of_range).unwrap_err()), want);
    assert_eq!(
        kind(model.chunked_decode(&out_of_range, 300, 25).unwrap_err()),
        want
    );

    for width in [q - 1, q + 1] {
        let mut wrong = good.clone();
        wrong.frames[2].resize(width, 0);
        let want = CodecFramesError::Width {
            frame: 2,
            found: width,
            expected: q,
        };
        assert_eq!(kind(model.decode(&wrong).unwrap_err()), want);
        assert_eq!(kind(model.decode_unclamped(&wrong).unwrap_err()), want);
    }

    let empty = CodecFrames::default();
    assert_eq!(
        kind(model.decode(&empty).unwrap_err()),
        CodecFramesError::Empty
    );
    assert_eq!(
        kind(model.chunked_decode(&empty, 300, 25).unwrap_err()),
        CodecFramesError::Empty
    );
    assert!(model.chunked_decode(&good, 0, 25).is_err());

    let mut stream = model.streaming(StreamingOptions::default()).unwrap();
    assert!(stream.push(vec![0; q + 1]).is_err());
    assert!(stream.push(vec![u32::MAX; q]).is_err());
    assert_eq!(stream.frames_received(), 0);
    assert!(stream.finish().unwrap().is_empty());
    assert!(model
        .streaming(StreamingOptions::uniform(0, 25))
        .is_err());
    assert!(model
        .streaming(StreamingOptions::uniform(4, 0))
        .is_err());
}
