//! The Talker and its code predictor against transformers (fixtures from
//! `tests/golden/make_talker_fixtures.py`): logits on the reference's own talker input, the talker
//! input assembled from a Thinker run, and greedy codec frames of `model.generate(..., return_audio=True,
//! thinker_do_sample=False, talker_do_sample=False)` for two prompts and two speakers.

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use omni_engine::config::OmniConfig;
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::talker::input::{SpecialIds, ThinkerStates};
use omni_engine::talker::{Talker, TalkerInput, TalkerParams};
use omni_engine::weights::WeightStore;
use serde::Deserialize;

use common::{fixture, max_relative_error, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    #[serde(default)]
    audio: bool,
    prompt_ids: Vec<u32>,
    speaker_id: u32,
    thinker_max_new_tokens: usize,
    talker_max_new_tokens: usize,
    thinker_eos: Vec<u32>,
    sequences: Vec<u32>,
    codes: Vec<Vec<u32>>,
}

fn load_golden(dir: &Path) -> (Golden, HashMap<String, Tensor>) {
    let json = std::fs::read_to_string(dir.join("golden/talker.json")).expect("talker.json");
    let golden: Golden = serde_json::from_str(&json).expect("talker.json parses");
    let tensors =
        candle_core::safetensors::load(dir.join("golden/talker.safetensors"), &Device::Cpu)
            .expect("talker.safetensors");
    (golden, tensors)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn load_talker(dir: &Path) -> (OmniConfig, Talker) {
    let cfg = OmniConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let talker = Talker::new(
        cfg.talker_config.as_ref().unwrap(),
        &store.root().pp("talker"),
    )
    .unwrap();
    store.ensure_all_used("talker.").unwrap();
    (cfg, talker)
}

/// The Thinker states of a golden Talker case (the shared helper in `common`).
fn thinker_states(m: &OmniModel, case: &Case, dir: &Path) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let audio_features =
        if case.audio { Some(common::golden_audio_features(dir, &case.prompt, None)?) } else { None };
    common::talker_thinker_states(
        m,
        &common::TalkerCaseRun {
            prompt_ids: &case.prompt_ids,
            thinker_eos: &case.thinker_eos,
            thinker_max_new_tokens: case.thinker_max_new_tokens,
            sequences: &case.sequences,
            audio_features,
        },
    )
}

#[test]
fn talker_and_code_predictor_logits_match_reference() {
    for model in TINY_MODELS {
        let dir = fixture(model);
        let (golden, g) = load_golden(&dir);
        let (_, talker) = load_talker(&dir);
        let case = &golden.cases[0];
        let key = |k: &str| {
            g.get(&format!("{}.{k}", case.name))
                .unwrap_or_else(|| panic!("{k}"))
                .clone()
        };
        // 1. Talker prefill logits on the reference's inputs_embeds.
        let embeds = key("prefill_embeds").unsqueeze(0).unwrap();
        let mut cache = talker.new_cache();
        let (hidden, logits) = talker.forward(&embeds, &mut cache).unwrap();
        let err = max_relative_error(&flat(&logits), &flat(&key("prefill_logits")));
        println!("{model}: talker prefill logits max rel err {err:.2e}");
        assert!(err < 1e-3, "{model}: talker logits error {err}");
        // 2. Code predictor on the first frame, the reference's codes fed back.
        let cp_in = key("cp_prefill_embeds").unsqueeze(0).unwrap();
        let t = hidden.dim(1).unwrap();
        let ours_past = flat(&hidden.narrow(1, t - 1, 1).unwrap());
        let ref_past = flat(&cp_in.narrow(1, 0, 1).unwrap());
        let err_past = max_relative_error(&ours_past, &ref_past);
        println!("{model}: past_hidden max rel err {err_past:.2e}");
        assert!(err_past < 1e-3);
        let codes = &case.codes[0];
        let cp_logits = talker
            .code_predictor
            .logits_teacher_forced(&cp_in, &codes[1..])
            .unwrap();
        let ours: Vec<f32> = cp_logits.concat();
        let err = max_relative_error(&ours, &flat(&key("cp_logits")));
        println!("{model}: code predictor logits (15 groups) max rel err {err:.2e}");
        assert!(err < 1e-3, "{model}: code predictor logits error {err}");
        // 3. The second Talker input: the 16 codes' embeddings plus trailing text row 0.
        let e0 = talker
            .model
            .embed_codes(&codes[..1])
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut next = e0;
        for (gi, &c) in codes[1..].iter().enumerate() {
            next = (next + talker.code_predictor.embed(gi, c).unwrap()).unwrap();
        }
        let next = (next
            + key("trailing")
                .narrow(0, 0, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap())
        .unwrap();
        let err = max_relative_error(&flat(&next), &flat(&key("step1_embeds")));
        println!("{model}: step-1 talker input max rel err {err:.2e}");
        assert!(err < 1e-4, "{model}: step-1 input error {err}");
    }
}

#[test]
fn talker_input_and_greedy_codes_match_reference() {
    for model in TINY_MODELS {
        let dir = fixture(model);
        let (golden, g) = load_golden(&dir);
        let m = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let talker = Talker::new(
            m.config.talker_config.as_ref().unwrap(),
            &m.weights.root().pp("talker"),
        )
        .unwrap();
        m.weights.ensure_all_used("talker.").unwrap();
        let ids = SpecialIds::from_config(&m.config).unwrap();
        let tts_embeds = m
            .thinker
            .embed(&[ids.tts_bos, ids.tts_eos, ids.tts_pad])
            .unwrap()
            .squeeze(0)
            .unwrap();
        for (ci, case) in golden.cases.iter().enumerate() {
            let (embeds, hidden, seq) = thinker_states(&m, case, &dir).unwrap();
            assert_eq!(
                seq, case.sequences,
                "{model}/{}: Thinker greedy ids differ",
                case.name
            );
            let st = ThinkerStates {
                sequence: &seq,
                prompt_len: case.prompt_ids.len(),
                embeds: &embeds,
                hidden: &hidden,
                tts_embeds: &tts_embeds,
                eos_ids: &case.thinker_eos,
            };
            let input = TalkerInput::build(&talker, &ids, &st, case.speaker_id).unwrap();
            if let Some(pre) = g
                .get(&format!("{}.prefill_embeds", case.name))
                .filter(|_| ci != 0)
            {
                let err = max_relative_error(&flat(&input.prefill), &flat(pre));
                println!(
                    "{model}/{}: talker input (audio: {}) max rel err {err:.2e}",
                    case.name, case.audio
                );
                assert_eq!(input.prefill.dims()[1..], pre.dims()[..]);
                assert!(
                    err < 1e-4,
                    "{model}/{}: talker input error {err}",
                    case.name
                );
            }
            if ci == 0 {
                let key = |k: &str| g.get(&format!("{}.{k}", case.name)).unwrap().clone();
                let pre = key("prefill_embeds");
                assert_eq!(
                    input.prefill.dims()[1..],
                    pre.dims()[..],
                    "{model}: talker prefill shape"
                );
                let err = max_relative_error(&flat(&input.prefill), &flat(&pre));
                println!("{model}/{}: talker input max rel err {err:.2e}", case.name);
                assert!(err < 1e-4, "{model}: talker input error {err}");
                let tr = key("trailing");
                assert_eq!(input.trailing.dims(), tr.dims(), "{model}: trailing shape");
                let err = max_relative_error(&flat(&input.trailing), &flat(&tr));
                println!("{model}/{}: trailing text max rel err {err:.2e}", case.name);
                assert!(err < 1e-4);
                let err = max_relative_error(&flat(&input.tts_pad), &flat(&key("tts_pad")));
                assert!(err < 1e-4);
            }
            let params = TalkerParams::greedy(case.talker_max_new_tokens);
            let mut streamed = Vec::new();
            let out = talker
                .generate(&input, &params, |f| {
                    streamed.push(f.to_vec());
                    Ok(true)
                })
                .unwrap();
            println!(
                "{model}/{}: {} frames ({:?}), codebook 0 {:?}",
                case.name,
                out.frames.len(),
                out.finish,
                out.frames.iter().map(|f| f[0]).collect::<Vec<_>>()
            );
            assert_eq!(streamed, out.frames);
            assert_eq!(
                out.frames, case.codes,
                "{model}/{}: greedy codec frames differ from the reference",
                case.name
            );
        }
    }
}

#[test]
fn reference_codes_depend_on_text_and_speaker() {
    for model in TINY_MODELS {
        let (golden, _) = load_golden(&fixture(model));
        let by = |n: &str| &golden.cases.iter().find(|c| c.name == n).unwrap().codes;
        assert_ne!(
            by("hello_ethan"),
            by("hello_chelsie"),
            "{model}: the speaker does not change the codes"
        );
        assert_ne!(
            by("hello_ethan"),
            by("system_ethan"),
            "{model}: the text does not change the codes"
        );
    }
}

#[test]
fn sampled_generation_is_seeded_and_valid() {
    let dir = fixture("tiny-a");
    let (golden, g) = load_golden(&dir);
    let (cfg, talker) = load_talker(&dir);
    let case = &golden.cases[0];
    let key = |k: &str| g.get(&format!("{}.{k}", case.name)).unwrap().clone();
    let input = TalkerInput {
        prefill: key("prefill_embeds").unsqueeze(0).unwrap(),
        trailing: key("trailing"),
        tts_pad: key("tts_pad").reshape((1, 1, ())).unwrap(),
    };
    let mut params = TalkerParams::reference(7);
    params.max_frames = 6;
    let a = talker.generate(&input, &params, |_| Ok(true)).unwrap();
    let b = talker.generate(&input, &params, |_| Ok(true)).unwrap();
    assert_eq!(a.frames, b.frames);
    let tc = cfg.talker_config.unwrap();
    let cp_vocab = tc.code_predictor_config.vocab_size as u32;
    let limit = tc.text_config.vocab_size as u32 - 1024;
    for f in &a.frames {
        assert_eq!(f.len(), tc.num_code_groups);
        assert!(f[0] < limit, "suppressed codec id {} drawn", f[0]);
        assert!(f[1..].iter().all(|&c| c < cp_vocab));
    }
    // Cancelling after the first frame stops there.
    let c = talker.generate(&input, &params, |_| Ok(false)).unwrap();
    assert!(c.frames.len() <= 1);
}
