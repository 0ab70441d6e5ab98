//! The Thinker against transformers: rendered prompts, prompt logits and greedy tokens of every
//! golden case of every tiny checkpoint (fixtures from `tests/golden/make_fixtures.py`).

mod common;

use candle_core::safetensors::MmapedSafetensors;
use omni_engine::chat::ChatMessage;
use omni_engine::generation::{generate_text, Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::thinker::rope::text_positions;
use serde::Deserialize;

use common::{fixture, max_relative_error, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    thinker_text: ThinkerText,
}

#[derive(Deserialize)]
struct ThinkerText {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<ChatMessage>,
    rendered: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    max_new_tokens: usize,
    min_top1_top2_margin: f64,
}

fn golden(model: &str) -> Golden {
    let path = fixture(model).join("golden/golden.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn prompts_render_and_tokenize_like_the_processor() {
    for name in TINY_MODELS {
        let model = OmniModel::load(&fixture(name), &mut NoProgress).unwrap();
        for case in golden(name).thinker_text.cases {
            let (text, ids) = model.render_prompt(&case.messages).unwrap();
            assert_eq!(text, case.rendered, "{name}/{}: rendered chat differs", case.name);
            assert_eq!(ids, case.prompt_ids, "{name}/{}: prompt token ids differ", case.name);
        }
    }
}

#[test]
fn prompt_logits_match_the_reference() {
    for name in TINY_MODELS {
        let dir = fixture(name);
        let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let reference = unsafe { MmapedSafetensors::new(dir.join("golden/thinker_text.safetensors")) }.unwrap();
        for case in golden(name).thinker_text.cases {
            let want = reference.load(&format!("{}.prompt_logits", case.name), &candle_core::Device::Cpu).unwrap();
            let mut cache = model.thinker.new_cache();
            let embeds = model.thinker.embed(&case.prompt_ids).unwrap();
            let step = model
                .thinker
                .forward(&embeds, &text_positions(0, case.prompt_ids.len()), &mut cache, &[])
                .unwrap();
            let got = model.thinker.logits(&step.hidden).unwrap().squeeze(0).unwrap();
            assert_eq!(got.dims(), want.dims(), "{name}/{}", case.name);
            let err = max_relative_error(
                &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            eprintln!("{name}/{}: prompt logits max relative error {err:.2e}", case.name);
            assert!(err < 1e-3, "{name}/{}: prompt logits max relative error {err:.2e} >= 1e-3", case.name);
        }
    }
}

#[test]
fn greedy_generation_is_token_identical() {
    for name in TINY_MODELS {
        let model = OmniModel::load(&fixture(name), &mut NoProgress).unwrap();
        for case in golden(name).thinker_text.cases {
            assert!(case.greedy_ids.len() >= 32, "{name}/{}: golden too short", case.name);
            let stop = StopRule { eos_ids: model.eos_ids().unwrap(), max_new_tokens: case.max_new_tokens };
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let out = generate_text(&model.thinker, &case.prompt_ids, &mut sampler, &stop, |_| Ok(true)).unwrap();
            assert_eq!(
                out.token_ids, case.greedy_ids,
                "{name}/{}: greedy tokens differ (reference's smallest top-1/top-2 margin {:.3})",
                case.name, case.min_top1_top2_margin
            );
        }
    }
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    // Decoding token by token through the cache must give the logits of one full pass.
    let model = OmniModel::load(&fixture("tiny-b"), &mut NoProgress).unwrap();
    let case = &golden("tiny-b").thinker_text.cases[0];
    let ids: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy_ids[..8]).copied().collect();
    let full = {
        let mut cache = model.thinker.new_cache();
        let step = model.thinker.forward(&model.thinker.embed(&ids).unwrap(), &text_positions(0, ids.len()), &mut cache, &[]).unwrap();
        model.thinker.last_logits(&step.hidden).unwrap()
    };
    let mut cache = model.thinker.new_cache();
    let n = case.prompt_ids.len();
    model.thinker.forward(&model.thinker.embed(&ids[..n]).unwrap(), &text_positions(0, n), &mut cache, &[]).unwrap();
    let mut last = Vec::new();
    for (i, &id) in ids[n..].iter().enumerate() {
        let step = model.thinker.forward(&model.thinker.embed(&[id]).unwrap(), &text_positions((n + i) as i64, 1), &mut cache, &[]).unwrap();
        last = model.thinker.last_logits(&step.hidden).unwrap();
    }
    let err = max_relative_error(&last, &full);
    assert!(err < 1e-4, "cached decode differs from a full pass: {err:.2e}");
}
