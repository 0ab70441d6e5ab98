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
use omni_engine::audio_encoder::{scatter_audio, AudioTokens};
use omni_engine::generation::{
    generate_from_embeds, FinishReason, Sampler, SamplingParams, StopRule,
};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::talker::input::{AcceptedState, SpecialIds, ThinkerStates};
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

/// The Thinker run the Talker conditions on, as the reference's `generate` sees it (copied from
/// talker_golden.rs). Audio cases take the reference encoder's output (golden.json's thinker_audio
/// case) scattered into the audio pads, all clips in prompt order.
fn thinker_states(m: &OmniModel, case: &Case, dir: &Path) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let stop = StopRule {
        eos_ids: case.thinker_eos.clone(),
        max_new_tokens: case.thinker_max_new_tokens,
    };
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut prompt_embeds = m.thinker.embed(&case.prompt_ids)?;
    if case.audio {
        // golden.json's audio prompts keep their encoder output in thinker_audio.safetensors; the
        // prompts made by make_talker_history_fixtures.py keep it beside their codes.
        let key = format!("{}.audio_features", case.prompt);
        let mut t = candle_core::safetensors::load(
            dir.join("golden/thinker_audio.safetensors"),
            &Device::Cpu,
        )?;
        if !t.contains_key(&key) {
            t = candle_core::safetensors::load(
                dir.join("golden/talker_history.safetensors"),
                &Device::Cpu,
            )?;
        }
        let feats = t[&key].clone();
        let tokens = AudioTokens {
            per_clip: vec![feats.dim(0)?],
            embeddings: feats,
        };
        let pad = m.config.thinker_config.audio_token_id.unwrap();
        prompt_embeds = scatter_audio(&prompt_embeds, &case.prompt_ids, pad, &tokens)?;
    }
    let positions = omni_engine::thinker::rope::text_positions(0, case.prompt_ids.len());
    let out = generate_from_embeds(
        &m.thinker,
        &case.prompt_ids,
        &prompt_embeds,
        &positions,
        &mut sampler,
        &stop,
        |_| Ok(true),
    )?;
    let mut seq = case.prompt_ids.clone();
    seq.extend(&out.token_ids);
    if out.finish == FinishReason::Eos {
        // generate_text drops the eos id; the reference sequence keeps it.
        let rest = &case.sequences[seq.len()..];
        seq.extend(rest.iter().take(1));
    }
    // All positions but the last generated id were forwarded by the reference.
    let n = seq.len() - 1;
    let accept = m.config.talker_config.as_ref().unwrap().accept_hidden_layer;
    let layers = m.thinker.config().num_hidden_layers;
    let p = case.prompt_ids.len();
    let embeds = Tensor::cat(&[prompt_embeds, m.thinker.embed(&seq[p..n])?], 1)?;
    let positions = omni_engine::thinker::rope::text_positions(0, n);
    let mut cache = m.thinker.new_cache();
    let which = AcceptedState::new(accept, layers)?;
    let capture: Vec<usize> = match which {
        AcceptedState::LayerOutput(l) => vec![l],
        _ => vec![],
    };
    let step = m
        .thinker
        .forward(&embeds, &positions, &mut cache, &capture)?;
    let hidden = match which {
        AcceptedState::Embeddings => embeds.clone(),
        AcceptedState::LayerOutput(_) => step.captured[0].clone(),
        AcceptedState::FinalNorm => step.hidden,
    };
    Ok((embeds.squeeze(0)?, hidden.squeeze(0)?, seq))
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
