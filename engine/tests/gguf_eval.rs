//! `omni eval`'s report (issue #5's quality measurement), stage by stage, on both tiny fixtures: the
//! f32 GGUF files reproduce every stage exactly (NMSE 0); Q8_0 keeps every stage's output NMSE under
//! 1e-2 — Thinker logits, audio encoder, vision encoder and its deepstack features, Talker, code
//! predictor, Code2Wav waveform. (The Thinker's greedy agreement is asserted in gguf_thinker.rs.)

mod common;

use omni_engine::gguf::eval::evaluate;
use omni_engine::gguf::model::GgufModelFiles;
use omni_engine::gguf::quantize::{quantize, NoQuantizeProgress, QuantizeOptions};
use omni_engine::gguf::GgmlType;

use common::{fixture, TINY_MODELS};

const STAGES: [&str; 7] = [
    "thinker",
    "audio_encoder",
    "vision_encoder",
    "vision_deepstack",
    "talker",
    "code_predictor",
    "code2wav",
];

fn report(model: &str, ty: GgmlType) -> Vec<(String, f64)> {
    let out = tempfile::tempdir().unwrap();
    quantize(&QuantizeOptions::new(&fixture(model), out.path(), ty), &mut NoQuantizeProgress).unwrap();
    let files = GgufModelFiles::discover(out.path()).unwrap().expect("the GGUF files just written");
    let report = evaluate(&fixture(model), &files, 8).unwrap();
    let stages: Vec<(String, f64)> = report.stages.iter().map(|s| (s.stage.clone(), s.nmse)).collect();
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, STAGES, "{model} {ty:?}: stages reported");
    stages
}

#[test]
fn f32_files_reproduce_every_stage_exactly() {
    for model in TINY_MODELS {
        for (stage, nmse) in report(model, GgmlType::F32) {
            assert_eq!(nmse, 0.0, "{model}: f32 GGUF {stage} output differs from the checkpoint's");
        }
    }
}

#[test]
fn q8_0_keeps_every_stage_under_1e_2() {
    for model in TINY_MODELS {
        for (stage, nmse) in report(model, GgmlType::Q8_0) {
            eprintln!("{model}: Q8_0 {stage:<16} NMSE {nmse:.2e}");
            assert!(nmse < 1e-2, "{model}: Q8_0 {stage} output NMSE {nmse:.2e} >= 1e-2");
            assert!(nmse > 0.0, "{model}: Q8_0 {stage} output NMSE is 0: the stage did not run quantized");
        }
    }
}
