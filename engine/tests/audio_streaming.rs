//! Streaming audio encode (issue #6 part 3): log-mel frames computed as samples arrive and the AuT conv
//! stem run per completed chunk give exactly the offline features and encoder output, for several clips
//! and random push sizes; the streamed encoder output matches the transformers golden and a turn built
//! from it gives the reference's greedy tokens.
//!
//! `cargo test -p omni-engine --test audio_streaming -- --nocapture` prints the errors and the re-stem
//! counts per clip.

mod common;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::Device;
use omni_engine::audio::stream::prepare_with_audio_tokens;
use omni_engine::audio::{
    load_audio_16k_mono, LogMelExtractor, MelConfig, StreamingAudioEncoder, StreamingMel,
};
use omni_engine::audio_encoder::ClipFeatures;
use omni_engine::chat::ChatMessage;
use omni_engine::generation::{generate_from_embeds, Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{NoProgress, OmniModel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{fixture, max_relative_error, TINY_MODELS};

fn wav(path: &str) -> Vec<f32> {
    load_audio_16k_mono(&fixture(path)).unwrap().samples
}

/// The clips: name and samples. Lengths cover a multiple of the hop and of 100 frames, neither, fewer
/// than 100 frames, the shortest accepted clip, and maxima reached mid-way and only at the end.
fn clips() -> Vec<(&'static str, Vec<f32>)> {
    let speech = wav("audio/speech_16k_s16.wav"); // 29240 samples: 182 frames, not a hop multiple
    let chirp = wav("audio-prompts/chirp_4p3s.wav");
    let tone = wav("audio-prompts/tone_0p6s.wav");
    // 10 s = 160000 samples = 1000 frames = 10 full chunks.
    let mut ten: Vec<f32> = [&speech, &chirp, &speech, &tone]
        .iter()
        .flat_map(|c| c.iter().copied())
        .collect();
    while ten.len() < 160_000 {
        ten.extend(speech.iter().map(|x| 0.5 * x));
    }
    ten.truncate(160_000);
    // Quiet speech then a loud tone mid-way (the running max grows after chunks were stemmed).
    let mut loud_middle: Vec<f32> = speech.iter().chain(&speech).map(|x| 0.05 * x).collect();
    loud_middle.extend(tone.iter().map(|x| 2.0 * x));
    loud_middle.extend(speech.iter().map(|x| 0.05 * x));
    // Quiet speech and a loud click in the last 100 samples, with a length (n % 160 == 39) where the last
    // frame computed during speech ends 159 samples before the end: only the frame computed by `finish`
    // sees the click, so the maximum changes at the end and stems must be redone there.
    let mut loud_end: Vec<f32> = speech.iter().chain(&speech).map(|x| 0.05 * x).collect();
    loud_end.truncate(loud_end.len() / 160 * 160 - 121);
    assert_eq!(loud_end.len() % 160, 39);
    let n = loud_end.len();
    for (i, x) in loud_end[n - 100..].iter_mut().enumerate() {
        *x = 0.9 * (i as f32 * 0.7).sin();
    }
    let tone_hop_multiple: Vec<f32> = chirp[..160 * 237].to_vec(); // 237 frames, hop multiple
    vec![
        ("speech", speech.clone()),
        ("ten_seconds", ten),
        ("hop_multiple_237_frames", tone_hop_multiple),
        ("exactly_200_frames", chirp[..32_000].to_vec()),
        ("200_frames_plus_1_sample", chirp[..32_001].to_vec()),
        ("under_one_chunk", speech[..5_000].to_vec()),
        ("shortest_201_samples", speech[3_000..3_201].to_vec()),
        ("loud_middle", loud_middle),
        ("loud_end", loud_end),
    ]
}

/// Push schedules: 10 ms, 37 ms, everything at once, and random sizes.
fn schedules(len: usize, seed: u64) -> Vec<(String, Vec<usize>)> {
    let fixed = |step: usize| -> Vec<usize> {
        let mut v = vec![step; len / step];
        if len % step != 0 {
            v.push(len % step);
        }
        v
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = rng.random_range(0..=2_500usize).min(left); // 0-sized pushes included
        random.push(n);
        left -= n;
    }
    vec![
        ("10ms".into(), fixed(160)),
        ("37ms".into(), fixed(592)),
        ("all".into(), vec![len]),
        (format!("random(seed {seed})"), random),
    ]
}

fn pieces<'a>(samples: &'a [f32], sizes: &'a [usize]) -> impl Iterator<Item = &'a [f32]> + 'a {
    let mut at = 0;
    sizes.iter().map(move |&n| {
        let p = &samples[at..at + n];
        at += n;
        p
    })
}

#[test]
fn streamed_mel_equals_offline_and_frames_are_final_early() {
    let cfg = MelConfig::qwen3_omni();
    let offline_ex = LogMelExtractor::new(&cfg).unwrap();
    let (hop, half) = (cfg.hop_length, cfg.n_fft / 2);
    for (seed, (name, clip)) in clips().into_iter().enumerate() {
        let offline = offline_ex.extract_one(&clip).unwrap();
        let n_frames = offline.n_frames;
        for (sched, sizes) in schedules(clip.len(), seed as u64) {
            let mut stream = StreamingMel::new(&cfg).unwrap();
            let mut new_frames = Vec::new();
            let mut received = 0;
            for p in pieces(&clip, &sizes) {
                let r = stream.push(p).unwrap();
                received += p.len();
                assert_eq!(r.end, stream.frames());
                // Frames are produced as soon as their window (and the start reflection) has arrived.
                let want = if received > half {
                    ((received - half) / hop + 1).min(received / hop)
                } else {
                    0
                };
                assert_eq!(
                    stream.frames(),
                    want,
                    "{name}/{sched}: frames after {received} samples"
                );
                new_frames.push(r);
            }
            let before_finish = stream.frames();
            // Raw frames are final: clamped with the final max, the early frames are the offline ones.
            let streamed = stream.finish().unwrap();
            let final_max = stream.running_max();
            for r in new_frames.into_iter().filter(|r| !r.is_empty()) {
                let got = stream.features(r.clone(), final_max).unwrap();
                for m in 0..cfg.feature_size {
                    let want = &offline.clip(0)[m * n_frames + r.start..m * n_frames + r.end];
                    assert_eq!(
                        &got[m * r.len()..(m + 1) * r.len()],
                        want,
                        "{name}/{sched}: frames {r:?}, bin {m}"
                    );
                }
            }
            assert_eq!(streamed.n_frames, n_frames, "{name}/{sched}");
            assert_eq!(
                streamed.valid_frames, offline.valid_frames,
                "{name}/{sched}"
            );
            assert_eq!(
                streamed.features, offline.features,
                "{name}/{sched}: streamed mel != offline mel"
            );
            assert!(
                n_frames - before_finish <= half.div_ceil(hop),
                "{name}/{sched}: {} frames left to the end",
                n_frames - before_finish
            );
        }
        eprintln!("{name}: {} samples, {n_frames} frames: streamed mel bit-identical under 4 push schedules", clip.len());
    }
}

#[test]
fn streaming_mel_errors() {
    let cfg = MelConfig::qwen3_omni();
    let mut s = StreamingMel::new(&cfg).unwrap();
    assert!(matches!(
        s.finish(),
        Err(omni_engine::audio::MelError::EmptyClip { .. })
    ));
    let mut s = StreamingMel::new(&cfg).unwrap();
    s.push(&[0.1; 150]).unwrap();
    assert!(matches!(
        s.finish(),
        Err(omni_engine::audio::MelError::TooShort { samples: 150, .. })
    ));
    let mut s = StreamingMel::new(&cfg).unwrap();
    s.push(&[0.1; 300]).unwrap();
    let e = s.push(&[0.0, f32::NAN]).unwrap_err();
    assert!(
        matches!(
            e,
            omni_engine::audio::MelError::NonFinite { sample: 301, .. }
        ),
        "{e}"
    );
    assert!(s.features(0..10, 0.0).is_err());
    s.finish().unwrap();
    assert!(s.push(&[0.0]).is_err());
    assert!(s.finish().is_err());
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn streamed_encoder_equals_offline_encoder() {
    for model_name in TINY_MODELS {
        let model = OmniModel::load(&fixture(model_name), &mut NoProgress).unwrap();
        let front = model.audio.as_ref().unwrap();
        let cfg = front.mel.config().clone();
        for (seed, (name, clip)) in clips().into_iter().enumerate() {
            let mel = front.mel.extract_one(&clip).unwrap();
            let valid = mel.clip_valid(0);
            let offline = front
                .encoder
                .forward(&[ClipFeatures {
                    mel: &valid,
                    frames: mel.valid_frames[0],
                }])
                .unwrap();
            let want = flat(&offline.embeddings);
            let mut worst = 0f32;
            for (sched, sizes) in schedules(clip.len(), 100 + seed as u64) {
                let mut enc = StreamingAudioEncoder::new(&front.encoder, &cfg).unwrap();
                for p in pieces(&clip, &sizes) {
                    enc.push(p).unwrap();
                }
                let (tokens, streamed_mel, stats) = enc.finish().unwrap();
                assert_eq!(
                    streamed_mel.features, mel.features,
                    "{model_name}/{name}/{sched}"
                );
                assert_eq!(
                    tokens.per_clip, offline.per_clip,
                    "{model_name}/{name}/{sched}"
                );
                let err = max_relative_error(&flat(&tokens.embeddings), &want);
                worst = worst.max(err);
                assert!(err <= 1e-5, "{model_name}/{name}/{sched}: streamed vs offline encoder max relative error {err:.2e}");
                if sched == "10ms" {
                    eprintln!(
                        "{model_name}/{name}: {} frames, 10 ms pushes: {stats:?}",
                        mel.n_frames
                    );
                    if name == "loud_middle" {
                        assert!(
                            stats.restems_during_speech > 0,
                            "the loud middle must force a re-stem: {stats:?}"
                        );
                    }
                    if name == "loud_end" {
                        assert!(
                            stats.restems_at_finish > 0,
                            "the loud end must force a re-stem at finish: {stats:?}"
                        );
                    }
                }
            }
            eprintln!(
                "{model_name}/{name}: streamed vs offline encoder max relative error {worst:.2e}"
            );
        }
    }
}

#[test]
fn stems_alone_equal_stems_batched() {
    // The offline call stems all chunks of a clip in one batch; the streaming one a chunk at a time.
    for model_name in TINY_MODELS {
        let model = OmniModel::load(&fixture(model_name), &mut NoProgress).unwrap();
        let front = model.audio.as_ref().unwrap();
        let mel = front.mel.extract_one(&clips()[1].1).unwrap(); // 1000 frames
        let bins = mel.n_mels;
        let chunks: Vec<Vec<f32>> = (0..10)
            .map(|c| {
                (0..bins)
                    .flat_map(|m| &mel.clip(0)[m * 1000 + c * 100..m * 1000 + c * 100 + 100])
                    .copied()
                    .collect()
            })
            .collect();
        let views: Vec<ClipFeatures<'_>> = chunks
            .iter()
            .map(|m| ClipFeatures {
                mel: m,
                frames: 100,
            })
            .collect();
        let batched = front.encoder.stem(&views, 100).unwrap();
        for (c, view) in views.iter().enumerate() {
            let alone = front.encoder.stem(std::slice::from_ref(view), 100).unwrap();
            let err = max_relative_error(&flat(&alone[0]), &flat(&batched[c]));
            assert!(
                err <= 1e-6,
                "{model_name}: chunk {c} alone vs batched {err:.2e}"
            );
        }
        // A short last chunk padded to 100 differs from the same chunk unpadded (why finish pads it).
        let short: Vec<f32> = (0..bins)
            .flat_map(|m| &chunks[0][m * 100..m * 100 + 30])
            .copied()
            .collect();
        let view = [ClipFeatures {
            mel: &short,
            frames: 30,
        }];
        let padded = flat(&front.encoder.stem(&view, 100).unwrap()[0]);
        let unpadded = flat(&front.encoder.stem(&view, 30).unwrap()[0]);
        assert!(
            max_relative_error(&unpadded, &padded) > 1e-6,
            "{model_name}: padding should matter for the last chunk"
        );
    }
}

#[derive(serde::Deserialize)]
struct Golden {
    thinker_audio: Cases,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    messages: Vec<ChatMessage>,
    clips: Vec<String>,
    greedy_ids: Vec<u32>,
    max_new_tokens: usize,
}

#[test]
fn streamed_turn_matches_the_reference_encoder_and_greedy_tokens() {
    for model_name in TINY_MODELS {
        let dir = fixture(model_name);
        let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let front = model.audio.as_ref().unwrap();
        let golden: Golden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden/golden.json")).unwrap())
                .unwrap();
        let tensors =
            unsafe { MmapedSafetensors::new(dir.join("golden/thinker_audio.safetensors")) }
                .unwrap();
        let case = golden
            .thinker_audio
            .cases
            .iter()
            .find(|c| c.clips.len() == 1)
            .expect("a one-clip audio case");
        let clip = load_audio_16k_mono(&fixture("../..").join(&case.clips[0]))
            .unwrap()
            .samples;
        // Live-style: 10 ms blocks.
        let mut enc = StreamingAudioEncoder::new(&front.encoder, front.mel.config()).unwrap();
        for block in clip.chunks(160) {
            enc.push(block).unwrap();
        }
        let (tokens, _, stats) = enc.finish().unwrap();
        let want = flat(
            &tensors
                .load(&format!("{}.audio_features", case.name), &Device::Cpu)
                .unwrap(),
        );
        let err = max_relative_error(&flat(&tokens.embeddings), &want);
        eprintln!("{model_name}/{}: streamed encoder vs transformers max relative error {err:.2e} ({stats:?})", case.name);
        assert!(
            err < 1e-3,
            "{model_name}/{}: streamed encoder vs golden {err:.2e}",
            case.name
        );
        // The turn: same prompt as `omni run --audio` (OmniModel::prepare), same greedy tokens as the reference.
        let streamed = prepare_with_audio_tokens(&model, &case.messages, tokens).unwrap();
        let offline = model.prepare(&case.messages, &[&clip]).unwrap();
        assert_eq!(streamed.ids, offline.ids);
        assert_eq!(streamed.positions, offline.positions);
        let stop = StopRule {
            eos_ids: model.eos_ids().unwrap(),
            max_new_tokens: case.max_new_tokens,
        };
        let run = |p: &omni_engine::pipeline::PreparedPrompt| {
            let mut sampler = Sampler::new(SamplingParams::greedy());
            generate_from_embeds(
                &model.thinker,
                &p.ids,
                &p.embeds,
                &p.positions,
                &mut sampler,
                &stop,
                |_| Ok(true),
            )
            .unwrap()
            .token_ids
        };
        let streamed_ids = run(&streamed);
        assert_eq!(
            streamed_ids, case.greedy_ids,
            "{model_name}/{}: streamed turn greedy tokens != reference",
            case.name
        );
        assert_eq!(
            streamed_ids,
            run(&offline),
            "{model_name}/{}: streamed turn != omni run --audio",
            case.name
        );
    }
}
