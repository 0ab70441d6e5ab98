//! Helpers shared by the golden tests: fixture paths and error metrics.

#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/<name>` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The tiny checkpoints written by `tests/golden/make_fixtures.py`.
pub const TINY_MODELS: [&str; 2] = ["tiny-a", "tiny-b"];

/// `max|a - b| / max|b|`: the largest error relative to the reference's scale.
pub fn max_relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let scale = reference
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Normalised mean squared error `Σ(a-b)² / Σb²`.
pub fn nmse(ours: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    num / den.max(f64::MIN_POSITIVE)
}

/// What a golden Talker case says about its Thinker run (talker*.json of the fixtures).
pub struct TalkerCaseRun<'a> {
    pub prompt_ids: &'a [u32],
    pub thinker_eos: &'a [u32],
    pub thinker_max_new_tokens: usize,
    /// The reference's full sequence (prompt, generated ids, eos when it stopped on it).
    pub sequences: &'a [u32],
    /// The reference encoder's output `[n, hidden]` for an audio prompt (one clip).
    pub audio_features: Option<candle_core::Tensor>,
}

/// The Thinker run the Talker conditions on, as the reference's `generate` sees it: (layer-0
/// embeddings, `accept_hidden_layer` states, the sequence with its eos), every position but the last
/// generated id forwarded once.
pub fn talker_thinker_states(
    m: &omni_engine::pipeline::OmniModel,
    case: &TalkerCaseRun<'_>,
) -> anyhow::Result<(candle_core::Tensor, candle_core::Tensor, Vec<u32>)> {
    use candle_core::Tensor;
    use omni_engine::audio_encoder::{scatter_audio, AudioTokens};
    use omni_engine::generation::{generate_from_embeds, FinishReason, Sampler, SamplingParams, StopRule};
    use omni_engine::talker::input::AcceptedState;
    use omni_engine::thinker::rope::text_positions;

    let stop = StopRule { eos_ids: case.thinker_eos.to_vec(), max_new_tokens: case.thinker_max_new_tokens };
    let mut prompt_embeds = m.thinker.embed(case.prompt_ids)?;
    if let Some(feats) = &case.audio_features {
        let tokens = AudioTokens { per_clip: vec![feats.dim(0)?], embeddings: feats.clone() };
        let pad = m.config.thinker_config.audio_token_id.expect("audio_token_id");
        prompt_embeds = scatter_audio(&prompt_embeds, case.prompt_ids, pad, &tokens)?;
    }
    let positions = text_positions(0, case.prompt_ids.len());
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let out = generate_from_embeds(
        &m.thinker,
        case.prompt_ids,
        &prompt_embeds,
        &positions,
        &mut sampler,
        &stop,
        |_| Ok(true),
    )?;
    let mut seq = case.prompt_ids.to_vec();
    seq.extend(&out.token_ids);
    if out.finish == FinishReason::Eos {
        // generate_from_embeds drops the eos id; the reference sequence keeps it.
        let rest = &case.sequences[seq.len()..];
        seq.extend(rest.iter().take(1));
    }
    let n = seq.len() - 1;
    let p = case.prompt_ids.len();
    let embeds = Tensor::cat(&[prompt_embeds, m.thinker.embed(&seq[p..n])?], 1)?;
    let accept = m.config.talker_config.as_ref().expect("talker_config").accept_hidden_layer;
    let which = AcceptedState::new(accept, m.thinker.config().num_hidden_layers)?;
    let capture: Vec<usize> = match which {
        AcceptedState::LayerOutput(l) => vec![l],
        _ => vec![],
    };
    let mut cache = m.thinker.new_cache();
    let step = m.thinker.forward(&embeds, &text_positions(0, n), &mut cache, &capture)?;
    let hidden = match which {
        AcceptedState::Embeddings => embeds.clone(),
        AcceptedState::LayerOutput(_) => step.captured[0].clone(),
        AcceptedState::FinalNorm => step.hidden,
    };
    Ok((embeds.squeeze(0)?, hidden.squeeze(0)?, seq))
}

/// The reference encoder output of golden audio prompt `prompt`: from `thinker_audio.safetensors`
/// (golden.json's audio cases), else from `extra` (a script's own prompts).
pub fn golden_audio_features(
    dir: &std::path::Path,
    prompt: &str,
    extra: Option<&str>,
) -> anyhow::Result<candle_core::Tensor> {
    let key = format!("{prompt}.audio_features");
    for file in std::iter::once("thinker_audio.safetensors").chain(extra) {
        let t = candle_core::safetensors::load(dir.join("golden").join(file), &candle_core::Device::Cpu)?;
        if let Some(f) = t.get(&key) {
            return Ok(f.clone());
        }
    }
    anyhow::bail!("no {key} in the goldens of {}", dir.display())
}
