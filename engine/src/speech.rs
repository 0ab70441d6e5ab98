//! Spoken answers, non-streaming: Thinker states → Talker codes → Code2Wav waveform, as the
//! reference's `Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True)` does it.
//!
//! After the Thinker has answered, its layer-0 embeddings and `accept_hidden_layer` states of the
//! prompt and the answer (all positions but the last id, as the reference forwards them) condition
//! the Talker; its frames go through `chunked_decode(chunk 300, left context 25)`.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::code2wav::{Code2Wav, CodecFrames};
use crate::generation::{FinishReason, ThinkerOutput, PREFILL_CHUNK};
use crate::pipeline::{OmniModel, PreparedPrompt};
use crate::talker::generate::TalkerParams;
use crate::talker::input::{AcceptedState, SpecialIds, TalkerInput, ThinkerStates};
use crate::talker::Talker;
use crate::thinker::rope::text_positions;

/// Talker and Code2Wav of a checkpoint that can speak.
pub struct SpeechModels {
    pub talker: Talker,
    pub code2wav: Code2Wav,
    pub ids: SpecialIds,
}

/// A spoken answer.
#[derive(Debug, Clone)]
pub struct SpokenAnswer {
    /// Frames of `num_code_groups` codec ids.
    pub codes: Vec<Vec<u32>>,
    /// Mono samples in [-1, 1].
    pub audio: Vec<f32>,
    pub sample_rate: u32,
    pub finish: FinishReason,
}

impl SpeechModels {
    /// Loads `talker.*` and `code2wav.*`; a checkpoint without them (Thinking, Captioner) is an error.
    pub fn load(model: &OmniModel) -> Result<Self> {
        let cfg = &model.config;
        let (Some(tcfg), Some(ccfg)) = (&cfg.talker_config, &cfg.code2wav_config) else {
            bail!(
                "{} cannot speak: it has no talker (a Thinking or Captioner checkpoint); drop the speech options",
                model.dir.display()
            );
        };
        if !cfg.has_talker() {
            bail!("{} cannot speak: config.json sets enable_audio_output to false", model.dir.display());
        }
        let root = model.weights.root();
        let talker = Talker::new(tcfg, &root.pp("talker")).context("cannot load the Talker")?;
        model.weights.ensure_all_used("talker.")?;
        let code2wav = Code2Wav::new(ccfg, &root.pp("code2wav")).context("cannot load Code2Wav")?;
        model.weights.ensure_all_used("code2wav.")?;
        Ok(Self { talker, code2wav, ids: SpecialIds::from_config(cfg)? })
    }

    /// The codec id of voice `name`; unknown names list the valid ones.
    pub fn speaker_id(&self, name: &str) -> Result<u32> {
        let speakers = self.talker.config().speaker_id.clone().unwrap_or_default();
        match speakers.get(&name.to_lowercase()) {
            Some(&id) => Ok(id),
            None => {
                let valid: Vec<&str> = speakers.keys().map(String::as_str).collect();
                bail!("unknown speaker {name:?}; valid speakers: {}", valid.join(", "))
            }
        }
    }

    /// The default voice: `ethan` when the checkpoint has it, else the first one.
    pub fn default_speaker(&self) -> Option<String> {
        let speakers = self.talker.config().speaker_id.clone().unwrap_or_default();
        if speakers.contains_key("ethan") {
            return Some("ethan".to_string());
        }
        speakers.keys().next().cloned()
    }

    /// Speaks the Thinker's answer `out` to `prompt`.
    pub fn speak(
        &self,
        model: &OmniModel,
        prompt: &PreparedPrompt,
        out: &ThinkerOutput,
        eos_ids: &[u32],
        speaker: &str,
        params: &TalkerParams,
        on_frame: impl FnMut(&[u32]) -> Result<bool>,
    ) -> Result<SpokenAnswer> {
        let speaker_id = self.speaker_id(speaker)?;
        // 1. The sequence as the reference's generate returns it (eos kept when the Thinker stopped on it).
        let mut sequence = prompt.ids.clone();
        sequence.extend(&out.token_ids);
        if let Some(eos) = out.stop_id {
            sequence.push(eos);
        }
        // 2. Thinker states of every position but the last id.
        let (embeds, hidden) = self.thinker_states(model, prompt, &sequence)?;
        let thinker = &model.thinker;
        let tts_embeds = thinker.embed(&[self.ids.tts_bos, self.ids.tts_eos, self.ids.tts_pad])?.squeeze(0)?;
        let states = ThinkerStates {
            sequence: &sequence,
            prompt_len: prompt.ids.len(),
            embeds: &embeds,
            hidden: &hidden,
            tts_embeds: &tts_embeds,
            eos_ids,
        };
        // 3. Talker frames, then the waveform.
        let input = TalkerInput::build(&self.talker, &self.ids, &states, speaker_id)?;
        let talker_out = self.talker.generate(&input, params, on_frame)?;
        let audio = if talker_out.frames.is_empty() {
            Vec::new()
        } else {
            self.code2wav.chunked_decode(&CodecFrames::new(talker_out.frames.clone()), 300, 25)?
        };
        Ok(SpokenAnswer {
            codes: talker_out.frames,
            audio,
            sample_rate: self.code2wav.sample_rate(),
            finish: talker_out.finish,
        })
    }

    /// Layer-0 embeddings and `accept_hidden_layer` states `[n, hidden]` of `sequence[..n]`,
    /// n = len − 1, with the prompt's multimodal tokens in place; prefilled in chunks.
    fn thinker_states(&self, model: &OmniModel, prompt: &PreparedPrompt, sequence: &[u32]) -> Result<(Tensor, Tensor)> {
        let thinker = &model.thinker;
        let p = prompt.ids.len();
        let n = sequence.len() - 1;
        let embeds = if n > p {
            Tensor::cat(&[&prompt.embeds, &thinker.embed(&sequence[p..n])?], 1)?
        } else {
            prompt.embeds.narrow(1, 0, n)?
        };
        let mut positions = prompt.positions.clone();
        let next = positions.iter().flat_map(|s| s.iter().copied()).max().map_or(0, |m| m + 1);
        let extra = text_positions(next, n.saturating_sub(p));
        for s in 0..3 {
            positions[s].truncate(n.min(p));
            positions[s].extend(&extra[s]);
        }
        let accept = self.talker.config().accept_hidden_layer;
        let which = AcceptedState::new(accept, thinker.config().num_hidden_layers)?;
        let capture: Vec<usize> = match which {
            AcceptedState::LayerOutput(l) => vec![l],
            _ => vec![],
        };
        let mut cache = thinker.new_cache();
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = PREFILL_CHUNK.min(n - start);
            let pos = [
                positions[0][start..start + len].to_vec(),
                positions[1][start..start + len].to_vec(),
                positions[2][start..start + len].to_vec(),
            ];
            let chunk = embeds.narrow(1, start, len)?;
            let step = thinker.forward(&chunk, &pos, &mut cache, &capture)?;
            parts.push(match which {
                AcceptedState::Embeddings => chunk,
                AcceptedState::LayerOutput(_) => step.captured[0].clone(),
                AcceptedState::FinalNorm => step.hidden,
            });
            start += len;
        }
        let hidden = Tensor::cat(&parts, 1)?;
        Ok((embeds.squeeze(0)?, hidden.squeeze(0)?))
    }
}

/// Writes 16-bit mono PCM WAV to a temp file beside `path`, then renames it into place.
pub fn write_wav(path: &std::path::Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let spec = hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    {
        let mut w = hound::WavWriter::create(&tmp, spec).with_context(|| format!("cannot write {}", tmp.display()))?;
        for &s in samples {
            w.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)?;
        }
        w.finalize().with_context(|| format!("cannot finish {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
