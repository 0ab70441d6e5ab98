//! Spoken answers to prompts with images against transformers 5.24 (goldens:
//! `tests/golden/make_talker_image_fixtures.py`): the Talker's own image M-RoPE positions, its prefill
//! logits on the reference's input, the Talker input built from our Thinker run (deepstack applied), and
//! greedy codec frames of `generate(..., return_audio=True, thinker_do_sample=False,
//! talker_do_sample=False)` for an image prompt and an audio+image prompt (two speakers), through the
//! library and through `omni run --image ... --speech-out`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use omni_engine::audio::load_audio_16k_mono;
use omni_engine::chat::user_turn;
use omni_engine::generation::{Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{MultimodalPrompt, NoProgress, OmniModel};
use omni_engine::speech::SpeechModels;
use omni_engine::stream::{accepted_rows, accepted_state, user_positions};
use omni_engine::talker::input::{ThinkerStates, ASSISTANT_PREFILL_ROWS};
use omni_engine::talker::{TalkerInput, TalkerParams, TalkerRope};
use serde::Deserialize;

use common::{fixture, max_relative_error, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    image: String,
    #[serde(default)]
    json_only: bool,
    #[serde(default)]
    clips: Vec<String>,
    #[serde(default)]
    question: String,
    #[serde(default)]
    prompt_ids: Vec<u32>,
    speaker: String,
    #[serde(default)]
    thinker_max_new_tokens: usize,
    #[serde(default)]
    talker_max_new_tokens: usize,
    #[serde(default)]
    thinker_eos: Vec<u32>,
    #[serde(default)]
    sequences: Vec<u32>,
    codes: Vec<Vec<u32>>,
    #[serde(default)]
    talker_rope_delta: i64,
}

fn repo(path: &str) -> PathBuf {
    fixture("../..").join(path)
}

fn load_golden(dir: &Path) -> (Golden, HashMap<String, Tensor>) {
    let json =
        std::fs::read_to_string(dir.join("golden/talker_image.json")).expect("talker_image.json");
    let golden: Golden = serde_json::from_str(&json).expect("talker_image.json parses");
    let tensors =
        candle_core::safetensors::load(dir.join("golden/talker_image.safetensors"), &Device::Cpu)
            .expect("talker_image.safetensors");
    (golden, tensors)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn positions_of(t: &Tensor) -> [Vec<i64>; 3] {
    let rows = t.to_vec2::<i64>().unwrap();
    [rows[0].clone(), rows[1].clone(), rows[2].clone()]
}

/// The case's prompt as `omni run` builds it (audio before the image, then the question).
fn prepare(model: &OmniModel, case: &Case, image: &Path) -> MultimodalPrompt {
    let clips: Vec<Vec<f32>> = case
        .clips
        .iter()
        .map(|c| load_audio_16k_mono(&repo(c)).unwrap().samples)
        .collect();
    let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let images = model.load_images(&[image.to_path_buf()]).unwrap();
    let names: Vec<String> = case
        .clips
        .iter()
        .map(|c| c.rsplit('/').next().unwrap().to_string())
        .collect();
    let image_name = image.file_name().unwrap().to_string_lossy().to_string();
    let messages = vec![user_turn(&names, &[image_name], &[], Some(&case.question))];
    model.prepare_multimodal(&messages, &refs, &images).unwrap()
}

/// Reference prefill logits on the reference's Talker input at the reference's positions; the same
/// input at plain text positions is printed as the size of what the image positions change.
#[test]
fn talker_prefill_logits_match_on_the_reference_input() {
    for name in TINY_MODELS {
        let dir = fixture(name);
        let (golden, g) = load_golden(&dir);
        let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let speech = SpeechModels::load(&model).unwrap();
        let case = &golden.cases[0];
        let key = |k: &str| {
            g.get(&format!("{}.{k}", case.name))
                .unwrap_or_else(|| panic!("{k}"))
                .clone()
        };
        let embeds = key("prefill_embeds").unsqueeze(0).unwrap();
        let positions = positions_of(&key("position_ids"));
        let t = positions[0].len();
        assert_eq!(embeds.dim(1).unwrap(), t);
        let rope = TalkerRope {
            prefill: positions,
            delta: case.talker_rope_delta,
        };
        let reference = flat(&key("prefill_logits_tail"));
        let tail = reference.len() / speech.talker.config().text_config.vocab_size;
        let logits_at = |talker: &omni_engine::talker::Talker| {
            let mut cache = talker.new_cache();
            let (_, logits) = talker.forward(&embeds, &mut cache).unwrap();
            flat(&logits.narrow(1, t - tail, tail).unwrap())
        };
        let err = max_relative_error(
            &logits_at(&speech.talker.with_prefill_rope(rope)),
            &reference,
        );
        let plain = max_relative_error(&logits_at(&speech.talker), &reference);
        println!("{name}/{}: talker prefill logits max rel err {err:.2e} (plain text positions: {plain:.2e})", case.name);
        assert!(err < 1e-3, "{name}: talker prefill logits error {err}");
        assert!(
            plain > 1e-2,
            "{name}: the image positions should matter ({plain})"
        );
    }
}

/// Our Thinker run (deepstack applied) gives the reference's sequence, Talker positions and Talker
/// input; `speak_multimodal` gives the reference's greedy frames, also for the mirrored image.
#[test]
fn talker_input_positions_and_greedy_codes_match_with_images() {
    for name in TINY_MODELS {
        let dir = fixture(name);
        let (golden, g) = load_golden(&dir);
        let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let speech = SpeechModels::load(&model).unwrap();
        let main_cases: Vec<&Case> = golden.cases.iter().filter(|c| !c.json_only).collect();
        assert_eq!(main_cases.len(), 2);
        for case in &main_cases {
            let prompt = prepare(&model, case, &repo(&case.image));
            let p = &prompt.prompt;
            assert_eq!(p.ids, case.prompt_ids, "{name}/{}: prompt ids", case.name);
            // 1. Thinker, greedy: the reference's sequence.
            let stop = StopRule {
                eos_ids: case.thinker_eos.clone(),
                max_new_tokens: case.thinker_max_new_tokens,
            };
            let out = model
                .generate(
                    &prompt,
                    &mut Sampler::new(SamplingParams::greedy()),
                    &stop,
                    |_| Ok(true),
                )
                .unwrap();
            let mut seq = p.ids.clone();
            seq.extend(&out.token_ids);
            seq.extend(out.stop_id);
            assert_eq!(
                seq, case.sequences,
                "{name}/{}: Thinker greedy ids differ",
                case.name
            );
            // 2. The Talker's own M-RoPE positions.
            let key = |k: &str| {
                g.get(&format!("{}.{k}", case.name))
                    .unwrap_or_else(|| panic!("{k}"))
                    .clone()
            };
            let user = user_positions(&p.ids, &speech.ids, 0);
            let rope =
                TalkerRope::from_thinker_positions(&p.positions, &user, ASSISTANT_PREFILL_ROWS)
                    .unwrap();
            assert_eq!(
                rope.prefill,
                positions_of(&key("position_ids")),
                "{name}/{}: talker positions",
                case.name
            );
            assert_eq!(
                rope.delta, case.talker_rope_delta,
                "{name}/{}: talker rope delta",
                case.name
            );
            // 3. The Talker input from our Thinker states: the prompt forwarded with deepstack, the
            //    accepted layer captured (generated rows only need their embeddings: the accepted states
            //    are read at the prompt's multimodal positions only).
            let thinker = &model.thinker;
            let (which, capture) = accepted_state(&speech.talker, thinker).unwrap();
            let mut cache = thinker.new_cache();
            let step = thinker
                .forward_with_deepstack(
                    &p.embeds,
                    &p.positions,
                    &mut cache,
                    &capture,
                    prompt.deepstack.as_ref(),
                )
                .unwrap();
            let n = seq.len() - 1; // the reference forwards all but the last id
            let generated = thinker.embed(&seq[p.ids.len()..n]).unwrap();
            let embeds = Tensor::cat(&[&p.embeds, &generated], 1)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let prompt_hidden = accepted_rows(which, &p.embeds, &step).squeeze(0).unwrap();
            let hidden = Tensor::cat(
                &[
                    &prompt_hidden,
                    &generated.squeeze(0).unwrap().zeros_like().unwrap(),
                ],
                0,
            )
            .unwrap();
            let tts_embeds = thinker
                .embed(&[speech.ids.tts_bos, speech.ids.tts_eos, speech.ids.tts_pad])
                .unwrap();
            let tts_embeds = tts_embeds.squeeze(0).unwrap();
            let st = ThinkerStates {
                sequence: &seq,
                prompt_len: p.ids.len(),
                embeds: &embeds,
                hidden: &hidden,
                tts_embeds: &tts_embeds,
                eos_ids: &case.thinker_eos,
            };
            let speaker_id = speech.speaker_id(&case.speaker).unwrap();
            let input = TalkerInput::build(&speech.talker, &speech.ids, &st, speaker_id).unwrap();
            let pre = key("prefill_embeds");
            assert_eq!(
                input.prefill.dims()[1..],
                pre.dims()[..],
                "{name}/{}: talker prefill shape",
                case.name
            );
            let err = max_relative_error(&flat(&input.prefill), &flat(&pre));
            println!("{name}/{}: talker input max rel err {err:.2e}", case.name);
            assert!(err < 1e-4, "{name}/{}: talker input error {err}", case.name);
            // Control: the accepted states without the deepstack additions give another input.
            let mut cache = thinker.new_cache();
            let no_ds = thinker
                .forward(&p.embeds, &p.positions, &mut cache, &capture)
                .unwrap();
            let no_ds_hidden = accepted_rows(which, &p.embeds, &no_ds).squeeze(0).unwrap();
            let no_ds_hidden = Tensor::cat(
                &[
                    &no_ds_hidden,
                    &generated.squeeze(0).unwrap().zeros_like().unwrap(),
                ],
                0,
            )
            .unwrap();
            let input_no_ds = TalkerInput::build(
                &speech.talker,
                &speech.ids,
                &ThinkerStates {
                    hidden: &no_ds_hidden,
                    ..st.clone()
                },
                speaker_id,
            )
            .unwrap();
            let err_no_ds = max_relative_error(&flat(&input_no_ds.prefill), &flat(&pre));
            println!(
                "{name}/{}: talker input without deepstack: max rel err {err_no_ds:.2e}",
                case.name
            );
            assert!(
                err_no_ds > 1e-3,
                "{name}/{}: deepstack should change the Talker input",
                case.name
            );
            if let Some(tr) = g.get(&format!("{}.trailing", case.name)) {
                assert_eq!(input.trailing.dims(), tr.dims());
                let err = max_relative_error(&flat(&input.trailing), &flat(tr));
                println!("{name}/{}: trailing text max rel err {err:.2e}", case.name);
                assert!(err < 1e-4);
                let err = max_relative_error(&flat(&input.tts_pad), &flat(&key("tts_pad")));
                assert!(err < 1e-4);
            }
            // 4. Greedy frames through the speech path.
            let params = TalkerParams::greedy(case.talker_max_new_tokens);
            let spoken = speech
                .speak_multimodal(
                    &model,
                    &prompt,
                    &out,
                    &case.thinker_eos,
                    &case.speaker,
                    &params,
                    |_| Ok(true),
                )
                .unwrap();
            println!(
                "{name}/{}: {} frames ({:?}), codebook 0 {:?}",
                case.name,
                spoken.codes.len(),
                spoken.finish,
                spoken.codes.iter().map(|f| f[0]).collect::<Vec<_>>()
            );
            assert_eq!(
                spoken.codes, case.codes,
                "{name}/{}: greedy codec frames differ",
                case.name
            );
            // The same frames from the library's all-text-known loop with the image positions.
            let talker = speech.talker.with_prefill_rope(rope);
            let frames = talker
                .generate(&input, &params, |_| Ok(true))
                .unwrap()
                .frames;
            assert_eq!(
                frames, case.codes,
                "{name}/{}: Talker::generate frames differ",
                case.name
            );
        }
        // 5. The mirrored image (same prompt ids): the reference's (different) frames too.
        let mirrored = golden.cases.iter().find(|c| c.json_only).unwrap();
        let base = main_cases[0];
        assert_ne!(
            mirrored.codes, base.codes,
            "{name}: the image does not condition the reference's speech"
        );
        let tmp = tempfile::tempdir().unwrap();
        let flipped = tmp.path().join("mirrored.png");
        let img = image::open(repo(&mirrored.image)).unwrap().fliph();
        img.save(&flipped).unwrap();
        let prompt = prepare(&model, base, &flipped);
        assert_eq!(prompt.prompt.ids, base.prompt_ids);
        let stop = StopRule {
            eos_ids: base.thinker_eos.clone(),
            max_new_tokens: base.thinker_max_new_tokens,
        };
        let out = model
            .generate(
                &prompt,
                &mut Sampler::new(SamplingParams::greedy()),
                &stop,
                |_| Ok(true),
            )
            .unwrap();
        let params = TalkerParams::greedy(base.talker_max_new_tokens);
        let spoken = speech
            .speak_multimodal(
                &model,
                &prompt,
                &out,
                &base.thinker_eos,
                &mirrored.speaker,
                &params,
                |_| Ok(true),
            )
            .unwrap();
        assert_eq!(
            spoken.codes, mirrored.codes,
            "{name}: mirrored-image frames differ from the reference"
        );
    }
}

/// `omni run --image ... --speech-out` gives the reference's frames (tiny-a, both cases).
#[test]
fn omni_run_speaks_image_prompts_with_the_reference_codes() {
    let dir = fixture("tiny-a");
    let (golden, _) = load_golden(&dir);
    let tmp = tempfile::tempdir().unwrap();
    for case in golden.cases.iter().filter(|c| !c.json_only) {
        let wav = tmp.path().join(format!("{}.wav", case.name));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omni"));
        cmd.args(["run", "--model"]).arg(&dir);
        for clip in &case.clips {
            cmd.arg("--audio").arg(repo(clip));
        }
        cmd.arg("--image").arg(repo(&case.image));
        cmd.args([
            "--prompt",
            &case.question,
            "--temperature",
            "0",
            "--talker-temperature",
            "0",
            "--json",
        ]);
        cmd.args([
            "--speaker",
            &case.speaker,
            "--max-new-tokens",
            &case.thinker_max_new_tokens.to_string(),
        ]);
        cmd.args([
            "--max-speech-frames",
            &case.talker_max_new_tokens.to_string(),
            "--speech-out",
        ])
        .arg(&wav);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        assert_eq!(
            json["prompt_token_ids"],
            serde_json::json!(case.prompt_ids),
            "{}",
            case.name
        );
        assert_eq!(
            json["codes"],
            serde_json::json!(case.codes),
            "{}: codes",
            case.name
        );
        let reader = hound::WavReader::open(&wav).unwrap();
        assert!(reader.len() > 0, "{}: empty wav", case.name);
    }
}
