//! Quantization quality (`omni eval`): GGUF files against the f32 safetensors checkpoint they came
//! from, stage by stage.
//!
//! - Thinker: teacher-forced on each prompt followed by the reference's own greedy continuation;
//!   logits NMSE (`Σ(q−r)² / Σr²` over every position and vocabulary entry) and greedy top-1
//!   agreement (the share of continuation positions whose argmax is the same), plus whether free
//!   greedy decoding gives the identical tokens.
//! - Audio encoder, vision encoder (merged embeddings and deepstack features) and Code2Wav (when both
//!   sides have them): output NMSE on a fixed synthetic clip / picture / fixed random codes.
//! - Every component: weight NMSE, the error the file's types put into the weights themselves.
//!
//! Prompts: the `thinker_text` cases of `golden/golden.json` when the checkpoint has one (the test
//! fixtures), else a few chat prompts rendered with the checkpoint's template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::model::GgufModelFiles;
use super::names::Component;
use crate::chat::user_turn;
use crate::generation::{generate_text, Sampler, SamplingParams, StopRule};
use crate::pipeline::{NoProgress, OmniModel};
use crate::thinker::rope::text_positions;
use crate::thinker::{argmax, ThinkerText};
use crate::weights::WeightStore;

#[derive(Debug, Clone, Serialize)]
pub struct StageNmse {
    pub stage: String,
    pub nmse: f64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseAgreement {
    pub name: String,
    pub prompt_tokens: usize,
    /// Continuation positions (predicting the reference's greedy tokens) and how many agree.
    pub positions: usize,
    pub agreeing: usize,
    /// Prompt positions (prefill, each predicting the next prompt token) that agree.
    pub prompt_agreeing: usize,
    pub logits_nmse: f64,
    /// Free greedy decoding of the quantized model gives exactly the reference's tokens.
    pub greedy_identical: bool,
    /// Positions whose argmax differs: (position, reference top-1/top-2 margin).
    pub disagreements: Vec<(usize, f32)>,
}

/// Top-1 minus top-2 of a logits row.
pub fn margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinkerAgreement {
    pub positions: usize,
    pub agreeing: usize,
    /// Agreement over the greedy-continuation positions.
    pub top1_agreement: f64,
    /// Agreement over every position (prompt and continuation).
    pub top1_agreement_all_positions: f64,
    pub logits_nmse: f64,
    pub greedy_identical_cases: usize,
    pub cases: Vec<CaseAgreement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightNmse {
    pub component: String,
    pub tensors: usize,
    pub nmse: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub reference: PathBuf,
    pub files: Vec<PathBuf>,
    pub stages: Vec<StageNmse>,
    pub thinker: ThinkerAgreement,
    pub weights: Vec<WeightNmse>,
}

/// Accumulates `Σ(q−r)²` and `Σr²`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nmse {
    pub err: f64,
    pub norm: f64,
}

impl Nmse {
    pub fn add(&mut self, quantized: &[f32], reference: &[f32]) {
        for (q, r) in quantized.iter().zip(reference) {
            self.err += ((q - r) as f64).powi(2);
            self.norm += (*r as f64).powi(2);
        }
    }

    pub fn value(&self) -> f64 {
        self.err / self.norm.max(f64::MIN_POSITIVE)
    }
}

/// One prompt: a name and its token ids.
pub struct EvalPrompt {
    pub name: String,
    pub ids: Vec<u32>,
    pub max_new_tokens: usize,
}

fn prompts(model: &OmniModel, dir: &Path, max_new_tokens: usize) -> Result<Vec<EvalPrompt>> {
    let golden = dir.join("golden/golden.json");
    if golden.exists() {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&golden)?)?;
        if let Some(cases) = json
            .pointer("/thinker_text/cases")
            .and_then(|c| c.as_array())
        {
            return cases
                .iter()
                .map(|c| {
                    let ids = c
                        .get("prompt_ids")
                        .and_then(|v| v.as_array())
                        .context("golden case without prompt_ids")?
                        .iter()
                        .map(|v| v.as_u64().map(|x| x as u32).context("prompt id"))
                        .collect::<Result<Vec<_>>>()?;
                    let n = c
                        .get("max_new_tokens")
                        .and_then(|v| v.as_u64())
                        .map(|v| v as usize)
                        .unwrap_or(max_new_tokens);
                    Ok(EvalPrompt {
                        name: c
                            .get("name")
                            .and_then(|v| v.as_str())
                            .unwrap_or("case")
                            .into(),
                        ids,
                        max_new_tokens: n,
                    })
                })
                .collect();
        }
    }
    let texts = [
        "Hello! How are you today?",
        "Tell me a joke about computers.",
        "What is the capital of France? Answer in one word.",
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (_, ids) = model.render_prompt(&[user_turn(&[], &[], &[], Some(t))])?;
            Ok(EvalPrompt {
                name: format!("prompt{i}"),
                ids,
                max_new_tokens,
            })
        })
        .collect()
}

/// All-position logits `[t][vocab]` of `ids` in one pass.
pub fn all_logits(thinker: &ThinkerText, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = thinker.new_cache();
    let step = thinker.forward(
        &thinker.embed(ids)?,
        &text_positions(0, ids.len()),
        &mut cache,
        &[],
    )?;
    Ok(thinker.logits(&step.hidden)?.squeeze(0)?.to_vec2::<f32>()?)
}

/// Thinker agreement of `quantized` with `reference` on `prompts`.
pub fn thinker_agreement(
    reference: &OmniModel,
    quantized: &OmniModel,
    prompts: &[EvalPrompt],
) -> Result<ThinkerAgreement> {
    let eos = reference.eos_ids()?;
    let mut cases = Vec::new();
    let mut total = Nmse::default();
    for p in prompts {
        let stop = StopRule {
            eos_ids: eos.clone(),
            max_new_tokens: p.max_new_tokens,
        };
        let greedy = |m: &OmniModel| -> Result<Vec<u32>> {
            let mut sampler = Sampler::new(SamplingParams::greedy());
            Ok(generate_text(&m.thinker, &p.ids, &mut sampler, &stop, |_| Ok(true))?.token_ids)
        };
        let ref_tokens = greedy(reference)?;
        let q_tokens = greedy(quantized)?;
        let seq: Vec<u32> = p.ids.iter().chain(&ref_tokens).copied().collect();
        let r = all_logits(&reference.thinker, &seq)?;
        let q = all_logits(&quantized.thinker, &seq)?;
        let mut nmse = Nmse::default();
        for (qr, rr) in q.iter().zip(&r) {
            nmse.add(qr, rr);
        }
        total.err += nmse.err;
        total.norm += nmse.norm;
        // Positions predicting the continuation: prompt_len-1 .. seq_len-1 (the last predicts the
        // token after the continuation, eos or the next one).
        let first = p.ids.len() - 1;
        let positions = (first..seq.len()).count();
        let disagreements: Vec<(usize, f32)> = (first..seq.len())
            .filter(|&i| argmax(&q[i]) != argmax(&r[i]))
            .map(|i| (i, margin(&r[i])))
            .collect();
        let agreeing = positions - disagreements.len();
        let prompt_agreeing = (0..first)
            .filter(|&i| argmax(&q[i]) == argmax(&r[i]))
            .count();
        cases.push(CaseAgreement {
            name: p.name.clone(),
            prompt_tokens: p.ids.len(),
            positions,
            agreeing,
            prompt_agreeing,
            logits_nmse: nmse.value(),
            greedy_identical: q_tokens == ref_tokens,
            disagreements,
        });
    }
    let positions = cases.iter().map(|c| c.positions).sum();
    let agreeing = cases.iter().map(|c| c.agreeing).sum();
    let all: usize = cases
        .iter()
        .map(|c| c.positions + c.prompt_tokens - 1)
        .sum();
    let all_agree: usize = cases.iter().map(|c| c.agreeing + c.prompt_agreeing).sum();
    Ok(ThinkerAgreement {
        top1_agreement_all_positions: all_agree as f64 / (all as f64).max(1.0),
        positions,
        agreeing,
        top1_agreement: agreeing as f64 / (positions as f64).max(1.0),
        logits_nmse: total.value(),
        greedy_identical_cases: cases.iter().filter(|c| c.greedy_identical).count(),
        cases,
    })
}

/// Weight NMSE per component over every tensor both stores hold.
pub fn weight_nmse(reference: &WeightStore, quantized: &WeightStore) -> Result<Vec<WeightNmse>> {
    let mut acc: BTreeMap<Component, (usize, Nmse)> = BTreeMap::new();
    let names: Vec<String> = quantized.names().map(str::to_string).collect();
    for name in names {
        if !reference.contains(&name) {
            continue;
        }
        let Some(c) = Component::of(&name) else {
            continue;
        };
        let q = quantized
            .gguf()
            .and_then(|g| g.values(&name).ok())
            .context("GGUF store")?;
        let r = reference
            .tensor(&name, &q.1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let e = acc.entry(c).or_default();
        e.0 += 1;
        e.1.add(&q.0, &r);
    }
    Ok(acc
        .into_iter()
        .map(|(c, (n, m))| WeightNmse {
            component: c.name().into(),
            tensors: n,
            nmse: m.value(),
        })
        .collect())
}

fn audio_stage(reference: &OmniModel, quantized: &OmniModel) -> Result<Option<StageNmse>> {
    let (Some(ra), Some(qa)) = (&reference.audio, &quantized.audio) else {
        return Ok(None);
    };
    // Two seconds of a chirp with a little deterministic noise, 16 kHz.
    let clip: Vec<f32> = (0..32000)
        .map(|i| {
            let t = i as f32 / 16000.0;
            0.3 * (2.0 * std::f32::consts::PI * (220.0 + 200.0 * t) * t).sin()
                + 0.01 * ((i * 7919 % 101) as f32 / 50.0 - 1.0)
        })
        .collect();
    let run = |front: &crate::pipeline::AudioFrontEnd| -> Result<Vec<f32>> {
        let mel = front.mel.extract(&[&clip])?;
        let valid = mel.clip_valid(0);
        let feats = [crate::audio_encoder::ClipFeatures {
            mel: &valid,
            frames: mel.valid_frames[0],
        }];
        Ok(front
            .encoder
            .forward(&feats)?
            .embeddings
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let (r, q) = (run(ra)?, run(qa)?);
    let mut n = Nmse::default();
    n.add(&q, &r);
    Ok(Some(StageNmse {
        stage: "audio_encoder".into(),
        nmse: n.value(),
        what: "AuT output embeddings, 2 s synthetic chirp".into(),
    }))
}

/// The vision tower on one synthetic 96×64 picture (smooth gradients with a few edges, through the
/// reference's image processor): the merged embeddings and, where the quantized side has them, the
/// deepstack features.
fn vision_stages(reference: &OmniModel, quantized: &OmniModel) -> Result<Vec<StageNmse>> {
    let (Some(rv), Some(qv)) = (&reference.vision, &quantized.vision) else {
        return Ok(Vec::new());
    };
    let (w, h) = (96usize, 64usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let edge = if (x / 24 + y / 16) % 2 == 0 { 60 } else { 0 };
            rgb.push(((x * 255 / w + edge) % 256) as u8);
            rgb.push(((y * 255 / h + 2 * edge) % 256) as u8);
            rgb.push((((x + y) * 2 + edge) % 256) as u8);
        }
    }
    let pixels = crate::vision::preprocess(&crate::vision::RgbImage::new(w, h, rgb)?, &rv.processor)?;
    let images = std::slice::from_ref(&pixels);
    let (r, q) = (rv.encoder.forward(images)?, qv.encoder.forward(images)?);
    let flat = |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let mut embeddings = Nmse::default();
    embeddings.add(&flat(&q.embeddings)?, &flat(&r.embeddings)?);
    let mut stages = vec![StageNmse {
        stage: "vision_encoder".into(),
        nmse: embeddings.value(),
        what: format!("merged embeddings of one synthetic {w}×{h} picture ({} tokens)", r.per_image[0]),
    }];
    if !q.deepstack.is_empty() {
        let mut deepstack = Nmse::default();
        for (a, b) in q.deepstack.iter().zip(&r.deepstack) {
            deepstack.add(&flat(a)?, &flat(b)?);
        }
        stages.push(StageNmse {
            stage: "vision_deepstack".into(),
            nmse: deepstack.value(),
            what: format!("the {} deepstack features of the same picture", r.deepstack.len()),
        });
    }
    Ok(stages)
}

fn code2wav_stage(reference: &OmniModel, quantized: &OmniModel) -> Result<Option<StageNmse>> {
    let Some(cfg) = &reference.config.code2wav_config else {
        return Ok(None);
    };
    if !quantized.weights.contains("code2wav.code_embedding.weight")
        || !reference.weights.contains("code2wav.code_embedding.weight")
    {
        return Ok(None);
    }
    let r = crate::code2wav::Code2Wav::new(cfg, &reference.weights.root().pp("code2wav"))?;
    let q = crate::code2wav::Code2Wav::new(cfg, &quantized.weights.root().pp("code2wav"))?;
    let nq = r.num_quantizers();
    let cb = r.codebook_size() as u64;
    let mut state = 0x2545F4914F6CDD1Du64;
    let frames: Vec<Vec<u32>> = (0..12)
        .map(|_| {
            (0..nq)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % cb) as u32
                })
                .collect()
        })
        .collect();
    let codes = crate::code2wav::CodecFrames::new(frames);
    let (rw, qw) = (r.decode_unclamped(&codes)?, q.decode_unclamped(&codes)?);
    // Random weights leave a constant offset in the waveform that would dominate the norm and hide
    // the error in what is heard: compare the signals with their (reference) mean removed.
    let mean = rw.iter().map(|&x| x as f64).sum::<f64>() / rw.len().max(1) as f64;
    let centre = |w: &[f32]| w.iter().map(|&x| (x as f64 - mean) as f32).collect::<Vec<_>>();
    let mut n = Nmse::default();
    n.add(&centre(&qw), &centre(&rw));
    let nmse = n.value();
    Ok(Some(StageNmse {
        stage: "code2wav".into(),
        nmse,
        what: format!(
            "waveform of 12 random codec frames, mean removed (SNR {:.1} dB)",
            -10.0 * nmse.max(f64::MIN_POSITIVE).log10()
        ),
    }))
}

/// Deterministic pseudo-random values in (-1, 1).
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Talker decoder + codec head, and the code predictor, on the same fixed inputs.
fn talker_stages(reference: &OmniModel, quantized: &OmniModel) -> Result<Vec<StageNmse>> {
    let Some(cfg) = &reference.config.talker_config else {
        return Ok(Vec::new());
    };
    if !quantized.weights.contains("talker.codec_head.weight")
        || !reference.weights.contains("talker.codec_head.weight")
    {
        return Ok(Vec::new());
    }
    let r = crate::talker::Talker::new(cfg, &reference.weights.root().pp("talker"))?;
    let q = crate::talker::Talker::new(cfg, &quantized.weights.root().pp("talker"))?;
    let h = cfg.text_config.hidden_size;
    let t = 12;
    let device = candle_core::Device::Cpu;
    let embeds = candle_core::Tensor::from_vec(pseudo_random(t * h, 7), (1, t, h), &device)?;
    let logits = |m: &crate::talker::Talker| -> Result<Vec<f32>> {
        let mut cache = m.new_cache();
        Ok(m.forward(&embeds, &mut cache)?
            .1
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let mut talker = Nmse::default();
    talker.add(&logits(&q)?, &logits(&r)?);
    let prefill = candle_core::Tensor::from_vec(pseudo_random(2 * h, 11), (1, 2, h), &device)?;
    let vocab = cfg.code_predictor_config.vocab_size as u64;
    let codes: Vec<u32> = pseudo_random(cfg.num_code_groups, 13)
        .iter()
        .map(|x| ((x.abs() * 1e6) as u64 % vocab) as u32)
        .collect();
    let mut cp = Nmse::default();
    let (rl, ql) = (
        r.code_predictor.logits_teacher_forced(&prefill, &codes)?,
        q.code_predictor.logits_teacher_forced(&prefill, &codes)?,
    );
    for (a, b) in ql.iter().zip(&rl) {
        cp.add(a, b);
    }
    Ok(vec![
        StageNmse {
            stage: "talker".into(),
            nmse: talker.value(),
            what: format!("codec logits of {t} fixed input embeddings"),
        },
        StageNmse {
            stage: "code_predictor".into(),
            nmse: cp.value(),
            what: "teacher-forced logits of one frame".into(),
        },
    ])
}

/// Compares the GGUF files with the checkpoint in `reference_dir`.
pub fn evaluate(
    reference_dir: &Path,
    files: &GgufModelFiles,
    max_new_tokens: usize,
) -> Result<EvalReport> {
    let reference = OmniModel::load(reference_dir, &mut NoProgress)
        .with_context(|| format!("cannot load the reference {}", reference_dir.display()))?;
    let quantized = OmniModel::load_gguf(files, &mut NoProgress)?;
    let prompts = prompts(&reference, reference_dir, max_new_tokens)?;
    let thinker = thinker_agreement(&reference, &quantized, &prompts)?;
    let mut stages = vec![StageNmse {
        stage: "thinker".into(),
        nmse: thinker.logits_nmse,
        what: format!(
            "logits at {} positions of {} prompts",
            thinker.cases.iter().map(|c| c.positions).sum::<usize>(),
            prompts.len()
        ),
    }];
    if let Some(s) = audio_stage(&reference, &quantized)? {
        stages.push(s);
    }
    stages.extend(vision_stages(&reference, &quantized)?);
    stages.extend(talker_stages(&reference, &quantized)?);
    if let Some(s) = code2wav_stage(&reference, &quantized)? {
        stages.push(s);
    }
    let weights = weight_nmse(&reference.weights, &quantized.weights)?;
    let listed = [&files.thinker, &files.mmproj, &files.talker]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    Ok(EvalReport {
        reference: reference_dir.to_path_buf(),
        files: listed,
        stages,
        thinker,
        weights,
    })
}
