//! Audio in the prompt against transformers: the processor's mel features for a batch of clips, the
//! AuT encoder output, placeholder expansion, M-RoPE positions, prompt logits and greedy tokens.

mod common;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::Device;
use omni_engine::audio::load_audio_16k_mono;
use omni_engine::chat::ChatMessage;
use omni_engine::generation::{generate_from_embeds, Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{NoProgress, OmniModel};
use serde::Deserialize;

use common::{fixture, max_relative_error, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    thinker_audio: Cases,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<ChatMessage>,
    clips: Vec<String>,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    max_new_tokens: usize,
}

fn load(name: &str) -> (OmniModel, Golden, MmapedSafetensors) {
    let dir = fixture(name);
    let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden/golden.json")).unwrap()).unwrap();
    let tensors = unsafe { MmapedSafetensors::new(dir.join("golden/thinker_audio.safetensors")) }.unwrap();
    (model, golden, tensors)
}

fn clips(case: &Case) -> Vec<Vec<f32>> {
    let root = fixture("../..");
    case.clips.iter().map(|c| load_audio_16k_mono(&root.join(c)).unwrap().samples).collect()
}

fn golden_vec(t: &MmapedSafetensors, key: &str) -> Vec<f32> {
    t.load(key, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn mel_batch_equals_the_processor() {
    for name in TINY_MODELS {
        let (model, golden, t) = load(name);
        let front = model.audio.as_ref().expect("tiny fixtures have an audio tower");
        for case in &golden.thinker_audio.cases {
            let clips = clips(case);
            let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
            let mel = front.mel.extract(&refs).unwrap();
            // Same batch layout as the processor (values: tests/audio_features.rs against mel_golden).
            let shape = t.load(&format!("{}.input_features_shape", case.name), &Device::Cpu).unwrap();
            let shape: Vec<usize> = shape.to_vec1::<i64>().unwrap().iter().map(|&d| d as usize).collect();
            assert_eq!(shape, vec![clips.len(), 128, mel.n_frames], "{name}/{}", case.name);
            assert!(mel.features.iter().all(|x| x.is_finite()));
            let mask = t.load(&format!("{}.feature_attention_mask", case.name), &Device::Cpu).unwrap();
            let valid: Vec<i64> = mask.sum(1).unwrap().to_vec1::<i64>().unwrap();
            let ours: Vec<i64> = mel.valid_frames.iter().map(|&v| v as i64).collect();
            assert_eq!(ours, valid, "{name}/{}: valid frames", case.name);
        }
    }
}

#[test]
fn encoder_output_matches_the_reference() {
    for name in TINY_MODELS {
        let (model, golden, t) = load(name);
        for case in &golden.thinker_audio.cases {
            let clips = clips(case);
            let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
            let prompt = model.prepare(&case.messages, &refs).unwrap();
            let audio = prompt.audio.as_ref().unwrap();
            let got = audio.embeddings.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = golden_vec(&t, &format!("{}.audio_features", case.name));
            let err = max_relative_error(&got, &want);
            eprintln!("{name}/{}: encoder max relative error {err:.2e} ({} tokens)", case.name, audio.embeddings.dim(0).unwrap());
            assert!(err < 1e-3, "{name}/{}: encoder max relative error {err:.2e}", case.name);
            // Placeholder expansion and positions.
            assert_eq!(prompt.ids, case.prompt_ids, "{name}/{}: prompt ids", case.name);
            let pos = t.load(&format!("{}.position_ids", case.name), &Device::Cpu).unwrap().to_vec2::<i64>().unwrap();
            for s in 0..3 {
                assert_eq!(prompt.positions[s], pos[s], "{name}/{}: position stream {s}", case.name);
            }
            // Prompt logits (last rows).
            let mut cache = model.thinker.new_cache();
            let step = model.thinker.forward(&prompt.embeds, &prompt.positions, &mut cache, &[]).unwrap();
            let logits = model.thinker.logits(&step.hidden).unwrap().squeeze(0).unwrap();
            let want = t.load(&format!("{}.prompt_logits_tail", case.name), &Device::Cpu).unwrap();
            let tail = want.dim(0).unwrap();
            let got = logits.narrow(0, logits.dim(0).unwrap() - tail, tail).unwrap();
            let err = max_relative_error(
                &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            eprintln!("{name}/{}: prompt logits max relative error {err:.2e}", case.name);
            assert!(err < 1e-3, "{name}/{}: prompt logits max relative error {err:.2e}", case.name);
        }
    }
}

#[test]
fn greedy_generation_with_audio_is_token_identical() {
    for name in TINY_MODELS {
        let (model, golden, _) = load(name);
        for case in &golden.thinker_audio.cases {
            let clips = clips(case);
            let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
            let prompt = model.prepare(&case.messages, &refs).unwrap();
            let stop = StopRule { eos_ids: model.eos_ids().unwrap(), max_new_tokens: case.max_new_tokens };
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let out = generate_from_embeds(
                &model.thinker,
                &prompt.ids,
                &prompt.embeds,
                &prompt.positions,
                &mut sampler,
                &stop,
                |_| Ok(true),
            )
            .unwrap();
            assert!(case.greedy_ids.len() >= 32);
            assert_eq!(out.token_ids, case.greedy_ids, "{name}/{}: greedy tokens differ", case.name);
        }
    }
}

#[test]
fn audio_changes_the_encoder_output_and_logits() {
    // Guard against a test that cannot fail: two different clips give different encodings.
    let (model, golden, _) = load("tiny-a");
    let case = &golden.thinker_audio.cases[0];
    let speech = clips(case);
    let tone = load_audio_16k_mono(&fixture("audio-prompts/tone_0p6s.wav")).unwrap().samples;
    let a = model.prepare(&case.messages, &[&speech[0]]).unwrap();
    let b = model.prepare(&case.messages, &[&tone]).unwrap();
    assert_ne!(a.ids.len(), b.ids.len(), "different durations give different token counts");
    let ea = a.audio.unwrap().embeddings.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eb = b.audio.unwrap().embeddings.narrow(0, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_relative_error(&ea[..eb.len()], &eb) > 1e-2);
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[test]
fn ten_minutes_of_audio_without_quadratic_memory() {
    // 10 minutes → 60000 mel frames → 7800 audio tokens. Scores of a one-shot prefill alone would
    // take heads × 7800² floats (~1 GB on tiny-a); the chunked path stays far below.
    let (model, _, _) = load("tiny-a");
    let n = 600 * 16000;
    let clip: Vec<f32> = (0..n).map(|i| 0.2 * ((i as f32) * 0.031).sin() * (((i / 4000) % 5) as f32 / 4.0)).collect();
    let messages = vec![omni_engine::chat::user_turn(&["long.wav".into()], &[], &[], Some("Summarise."))];
    let prompt = model.prepare(&messages, &[&clip]).unwrap();
    let audio = prompt.audio.as_ref().unwrap();
    assert_eq!(audio.per_clip, vec![omni_engine::audio_encoder::output_tokens(60000, 50)]);
    assert_eq!(audio.per_clip[0], 7800);
    let stop = StopRule { eos_ids: model.eos_ids().unwrap(), max_new_tokens: 2 };
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let out = generate_from_embeds(&model.thinker, &prompt.ids, &prompt.embeds, &prompt.positions, &mut sampler, &stop, |_| Ok(true))
        .unwrap();
    assert!(!out.token_ids.is_empty() || out.finish == omni_engine::generation::FinishReason::Eos);
    let peak = peak_rss_mb();
    eprintln!("10-minute audio prompt: {} tokens, peak RSS {peak:.0} MB", prompt.ids.len());
    assert!(peak < 1024.0, "peak RSS {peak:.0} MB for a 10-minute prompt");
}
