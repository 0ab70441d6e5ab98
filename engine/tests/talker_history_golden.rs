//! The Talker on a multi-turn prompt and on a second audio prompt, against transformers (fixtures
//! from `tests/golden/make_talker_history_fixtures.py`, issue #4): greedy codec frames of
//! `model.generate(..., return_audio=True, thinker_do_sample=False, talker_do_sample=False)` for
//! golden.json's "multiturn" text prompt, its "two_clips" audio prompt and "speech_chirp" (the
//! "speech" prompt's question with another clip), and the reference's own evidence that the input
//! audio alone changes the speech (speech_chirp_ethan's codes differ from talker.json's speech_ethan).
//! Reproduces the Thinker states exactly as `talker_golden.rs` does.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::talker::input::{SpecialIds, ThinkerStates};
use omni_engine::talker::{Talker, TalkerInput, TalkerParams};
use serde::Deserialize;

use common::{fixture, TINY_MODELS};

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

fn load_cases(dir: &Path, file: &str) -> Result<Golden> {
    let path = dir.join("golden").join(file);
    let json =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&json).with_context(|| format!("parsing {}", path.display()))
}

fn case<'a>(golden: &'a Golden, name: &str) -> &'a Case {
    golden
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The Thinker states of a golden Talker case (the shared helper in `common`).
fn thinker_states(m: &OmniModel, case: &Case, dir: &Path) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let audio_features =
        if case.audio { Some(common::golden_audio_features(dir, &case.prompt, Some("talker_history.safetensors"))?) } else { None };
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
fn multiturn_and_second_audio_greedy_codes_match_reference() {
    for model in TINY_MODELS {
        let dir = fixture(model);
        let golden = load_cases(&dir, "talker_history.json").unwrap();
        let tensors = candle_core::safetensors::load(
            dir.join("golden/talker_history.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let m = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let talker = Talker::new(
            m.config.talker_config.as_ref().unwrap(),
            &m.weights.root().pp("talker"),
        )
        .unwrap();
        let ids = SpecialIds::from_config(&m.config).unwrap();
        let tts_embeds = m
            .thinker
            .embed(&[ids.tts_bos, ids.tts_eos, ids.tts_pad])
            .unwrap()
            .squeeze(0)
            .unwrap();
        let names: Vec<&str> = golden.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["multiturn_ethan", "speech2_ethan", "speech_chirp_ethan"],
            "{model}: talker_history.json cases"
        );
        for case in &golden.cases {
            // The safetensors copy of the codes agrees with the json one.
            let codes_t = tensors[&format!("{}.codes", case.name)]
                .to_dtype(candle_core::DType::U32)
                .unwrap();
            assert_eq!(
                codes_t.to_vec2::<u32>().unwrap(),
                case.codes,
                "{model}/{}: json vs safetensors",
                case.name
            );
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
            let params = TalkerParams::greedy(case.talker_max_new_tokens);
            let out = talker.generate(&input, &params, |_| Ok(true)).unwrap();
            println!(
                "{model}/{}: {} frames ({:?}), codebook 0 {:?}",
                case.name,
                out.frames.len(),
                out.finish,
                out.frames.iter().map(|f| f[0]).collect::<Vec<_>>()
            );
            assert_eq!(
                out.frames, case.codes,
                "{model}/{}: greedy codec frames differ from the reference",
                case.name
            );
        }
    }
}

#[test]
fn reference_codes_depend_on_input_audio() {
    for model in TINY_MODELS {
        let dir = fixture(model);
        let history = load_cases(&dir, "talker_history.json").unwrap();
        let base = load_cases(&dir, "talker.json").unwrap();
        // speech_chirp_ethan: speech_ethan's question and speaker with another clip, so only the
        // input audio differs.
        let (a, b) = (case(&base, "speech_ethan"), case(&history, "speech_chirp_ethan"));
        assert!(
            a.audio && b.audio,
            "{model}: both cases must be audio prompts"
        );
        assert_eq!(a.speaker_id, b.speaker_id, "{model}: same speaker");
        assert_ne!(
            a.codes, b.codes,
            "{model}: the input audio does not change the codes"
        );
        // The multi-turn prompt's codes also differ from the single-turn text prompts'.
        let mt = &case(&history, "multiturn_ethan").codes;
        assert_ne!(
            mt,
            &case(&base, "hello_ethan").codes,
            "{model}: history does not change the codes"
        );
        assert_ne!(
            mt,
            &case(&base, "system_ethan").codes,
            "{model}: history does not change the codes"
        );
    }
}
