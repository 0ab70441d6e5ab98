//! Q8_0 Talker quality on the fixtures: greedy top-1 agreement of the Talker (codebook 0) and of the
//! code predictor (codebooks 1..16) with the f32 checkpoint, teacher-forced along the reference's own
//! greedy codes (`tests/fixtures/tiny-*/golden/talker.json`, from `model.generate(...,
//! talker_do_sample=False)`), plus the logits NMSE. Both talkers condition on the same f32 Thinker
//! states, so the numbers measure the Talker file alone.

mod common;

use std::path::Path;

use anyhow::Result;
use candle_core::Tensor;
use omni_engine::gguf::model::GgufModelFiles;
use omni_engine::gguf::quantize::{quantize, NoQuantizeProgress, QuantizeOptions};
use omni_engine::gguf::GgmlType;
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::talker::input::{SpecialIds, ThinkerStates};
use omni_engine::talker::{Talker, TalkerInput};
use serde::Deserialize;

use common::{fixture, nmse, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    #[serde(default)]
    audio: bool,
    prompt_ids: Vec<u32>,
    speaker_id: u32,
    thinker_max_new_tokens: usize,
    thinker_eos: Vec<u32>,
    sequences: Vec<u32>,
    codes: Vec<Vec<u32>>,
}

/// Logits of every teacher-forced step: (codebook-0 logits per frame after the special-id
/// suppression, code-predictor logits per frame and residual group).
fn teacher_forced(
    talker: &Talker,
    input: &TalkerInput,
    codes: &[Vec<u32>],
) -> Result<(Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>)> {
    let mut cache = talker.new_cache();
    let (mut hidden, mut logits) = talker.forward(&input.prefill, &mut cache)?;
    let mut talker_logits = Vec::new();
    let mut cp_logits = Vec::new();
    for (i, frame) in codes.iter().enumerate() {
        let t = hidden.dim(1)?;
        let past = hidden.narrow(1, t - 1, 1)?;
        let mut last = logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        talker.suppress_special(&mut last);
        talker_logits.push(last);
        // Code predictor on [past_hidden, embed(code0)], the reference's residual codes fed back.
        let e0 = talker.model.embed_codes(&frame[..1])?.unsqueeze(0)?;
        let cp_in = Tensor::cat(&[&past, &e0], 1)?;
        cp_logits.push(
            talker
                .code_predictor
                .logits_teacher_forced(&cp_in, &frame[1..])?,
        );
        // Next input: the 16 codebook embeddings plus the next text row (then tts_pad).
        let mut next = e0;
        for (g, &c) in frame[1..].iter().enumerate() {
            next = (next + talker.code_predictor.embed(g, c)?)?;
        }
        let row = if i < input.trailing.dim(0)? {
            input.trailing.narrow(0, i, 1)?.unsqueeze(0)?
        } else {
            input.tts_pad.clone()
        };
        let (h, l) = talker.forward(&(next + row)?, &mut cache)?;
        hidden = h;
        logits = l;
    }
    Ok((talker_logits, cp_logits))
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[derive(Default)]
struct Agreement {
    talker: (usize, usize),
    cp: (usize, usize),
    talker_nmse: (Vec<f32>, Vec<f32>),
    cp_nmse: (Vec<f32>, Vec<f32>),
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
fn q8_0_talker_agrees_with_f32_on_the_golden_codes() {
    let mut total = Agreement::default();
    for model in TINY_MODELS {
        let dir = fixture(model);
        let golden: Golden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden/talker.json")).unwrap())
                .unwrap();
        let out = tempfile::tempdir().unwrap();
        quantize(
            &QuantizeOptions::new(&dir, out.path(), GgmlType::Q8_0),
            &mut NoQuantizeProgress,
        )
        .unwrap();
        let reference = OmniModel::load(&dir, &mut NoProgress).unwrap();
        let files = GgufModelFiles::discover(out.path())
            .unwrap()
            .expect("GGUF files written");
        let quantized = OmniModel::load_gguf(&files, &mut NoProgress)
            .unwrap()
            .weights;
        let cfg = reference.config.talker_config.as_ref().unwrap();
        let r = Talker::new(cfg, &reference.weights.root().pp("talker")).unwrap();
        let q = Talker::new(cfg, &quantized.root().pp("talker")).unwrap();
        let ids = SpecialIds::from_config(&reference.config).unwrap();
        let tts_embeds = reference
            .thinker
            .embed(&[ids.tts_bos, ids.tts_eos, ids.tts_pad])
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut a = Agreement::default();
        for case in &golden.cases {
            let (embeds, hidden, seq) = thinker_states(&reference, case, &dir).unwrap();
            let states = ThinkerStates {
                sequence: &seq,
                prompt_len: case.prompt_ids.len(),
                embeds: &embeds,
                hidden: &hidden,
                tts_embeds: &tts_embeds,
                eos_ids: &case.thinker_eos,
            };
            let (rt, rc) = teacher_forced(
                &r,
                &TalkerInput::build(&r, &ids, &states, case.speaker_id).unwrap(),
                &case.codes,
            )
            .unwrap();
            let (qt, qc) = teacher_forced(
                &q,
                &TalkerInput::build(&q, &ids, &states, case.speaker_id).unwrap(),
                &case.codes,
            )
            .unwrap();
            for (x, y) in qt.iter().zip(&rt) {
                a.talker.0 += usize::from(argmax(x) == argmax(y));
                a.talker.1 += 1;
                // Suppressed ids are -inf on both sides: leave them out of the NMSE.
                for (u, v) in x.iter().zip(y).filter(|(_, v)| v.is_finite()) {
                    a.talker_nmse.0.push(*u);
                    a.talker_nmse.1.push(*v);
                }
            }
            for (x, y) in qc.iter().flatten().zip(rc.iter().flatten()) {
                a.cp.0 += usize::from(argmax(x) == argmax(y));
                a.cp.1 += 1;
                a.cp_nmse.0.extend(x);
                a.cp_nmse.1.extend(y);
            }
        }
        let (tn, cn) = (
            nmse(&a.talker_nmse.0, &a.talker_nmse.1),
            nmse(&a.cp_nmse.0, &a.cp_nmse.1),
        );
        eprintln!(
            "{model}: Q8_0 talker top-1 agreement {}/{} ({:.1}%), logits NMSE {tn:.2e}; code predictor {}/{} ({:.1}%), NMSE {cn:.2e}",
            a.talker.0, a.talker.1, 100.0 * a.talker.0 as f64 / a.talker.1 as f64,
            a.cp.0, a.cp.1, 100.0 * a.cp.0 as f64 / a.cp.1 as f64
        );
        assert!(
            tn < 1e-2 && cn < 1e-2,
            "{model}: Q8_0 talker NMSE {tn:.2e} / code predictor {cn:.2e}"
        );
        total.talker.0 += a.talker.0;
        total.talker.1 += a.talker.1;
        total.cp.0 += a.cp.0;
        total.cp.1 += a.cp.1;
    }
    let t = total.talker.0 as f64 / total.talker.1 as f64;
    let c = total.cp.0 as f64 / total.cp.1 as f64;
    eprintln!(
        "both fixtures: talker {:.2}%, code predictor {:.2}%",
        100.0 * t,
        100.0 * c
    );
    // Chaotic tiny random models: the flips sit at near-tied reference logits (docs/gguf.md,
    // "Quality"). Guard against regressions well above chance.
    assert!(
        t >= 0.95 && c >= 0.95,
        "Q8_0 talker agreement {t:.4}, code predictor {c:.4} (< 95%)"
    );
}
