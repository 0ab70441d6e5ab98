//! Spoken answers, non-streaming: Thinker states → Talker codes → Code2Wav waveform, as the
//! reference's `Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True)` does it.
//!
//! After the Thinker has answered, its layer-0 embeddings (and, at the prompt's audio/image/video
//! tokens, its `accept_hidden_layer` states) condition the Talker, exactly as in the streaming path
//! (`crate::stream`, which this reuses); its frames go through `chunked_decode(chunk 300, left
//! context 25)`.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::code2wav::{Code2Wav, CodecFrames};
use crate::generation::{FinishReason, ThinkerOutput, PREFILL_CHUNK};
use crate::pipeline::{MultimodalPrompt, OmniModel, PreparedPrompt};
use crate::stream::{
    accepted_rows, accepted_state, assistant_start, run_speech, user_positions, user_rows, CancelToken, SpeechSetup,
    TextFeed,
};
use crate::talker::generate::TalkerParams;
use crate::talker::input::{SpecialIds, TalkerRope, ASSISTANT_PREFILL_ROWS};
use crate::talker::Talker;

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

    /// Speaks the Thinker's answer `out` to `prompt`, through the streaming frame loop of
    /// [`crate::stream::run_speech`] with every id queued up front (so streamed and non-streamed speech
    /// are the same code), then `chunked_decode(300, 25)` as the reference.
    #[allow(clippy::too_many_arguments)]
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
        self.speak_with(model, prompt, None, out, eos_ids, speaker, params, on_frame)
    }

    /// As [`Self::speak`] for a prompt that may hold images (`out` from [`OmniModel::generate`] on it):
    /// the Thinker states the Talker takes are computed with the deepstack features added during the
    /// Thinker pass (the states themselves are taken before each addition, as the reference's hooks see
    /// them), and the Talker prefill gets its own image M-RoPE positions ([`TalkerRope`]).
    #[allow(clippy::too_many_arguments)]
    pub fn speak_multimodal(
        &self,
        model: &OmniModel,
        prompt: &MultimodalPrompt,
        out: &ThinkerOutput,
        eos_ids: &[u32],
        speaker: &str,
        params: &TalkerParams,
        on_frame: impl FnMut(&[u32]) -> Result<bool>,
    ) -> Result<SpokenAnswer> {
        let p = &prompt.prompt;
        if prompt.vision.is_none() {
            return self.speak(model, p, out, eos_ids, speaker, params, on_frame);
        }
        let user = user_positions(&p.ids, &self.ids, 0);
        let rope = TalkerRope::from_thinker_positions(&p.positions, &user, ASSISTANT_PREFILL_ROWS)?;
        let models =
            Self { talker: self.talker.with_prefill_rope(rope), code2wav: self.code2wav.clone(), ids: self.ids.clone() };
        models.speak_with(model, p, prompt.deepstack.as_ref(), out, eos_ids, speaker, params, on_frame)
    }

    #[allow(clippy::too_many_arguments)]
    fn speak_with(
        &self,
        model: &OmniModel,
        prompt: &PreparedPrompt,
        deepstack: Option<&crate::thinker::Deepstack>,
        out: &ThinkerOutput,
        eos_ids: &[u32],
        speaker: &str,
        params: &TalkerParams,
        on_frame: impl FnMut(&[u32]) -> Result<bool>,
    ) -> Result<SpokenAnswer> {
        let speaker_id = self.speaker_id(speaker)?;
        // 1. User rows: embeddings, and the accepted Thinker states only when a user turn holds
        //    audio/image/video tokens (then the prompt alone is forwarded once more).
        let embeds = prompt.embeds.squeeze(0)?;
        let needs_states =
            user_positions(&prompt.ids, &self.ids, 0).iter().any(|&i| self.ids.multimodal.contains(&prompt.ids[i]));
        let hidden = if needs_states { Some(self.prompt_states(model, prompt, deepstack)?) } else { None };
        let rows: Vec<Tensor> = user_rows(&self.talker, &self.ids, &prompt.ids, 0, &embeds, hidden.as_ref())?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let head = &prompt.ids[assistant_start(&prompt.ids, &self.ids)?..];
        // 2. The sequence as the reference's generate returns it (eos kept when the Thinker stopped on it),
        //    queued: the frame loop never waits.
        let mut sequence: Vec<(u32, bool)> = out.token_ids.iter().map(|&id| (id, eos_ids.contains(&id))).collect();
        if let Some(eos) = out.stop_id {
            sequence.push((eos, true));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        for (k, &(id, eos)) in sequence.iter().enumerate() {
            tx.send(TextFeed::Token { id, last: k + 1 == sequence.len(), eos })?;
        }
        drop(tx);
        // 3. Talker frames, then the waveform.
        let setup = SpeechSetup {
            models: self,
            thinker: &model.thinker,
            speaker_id,
            params,
            user_rows: &rows,
            head,
            chunking: None,
        };
        let talker_out = run_speech(&setup, &rx, &CancelToken::new(), on_frame, |_| Ok(()))?;
        let Some(finish) = talker_out.finish else {
            bail!("the Talker needs at least one generated token with its Thinker states");
        };
        let audio = if talker_out.codes.is_empty() {
            Vec::new()
        } else {
            self.code2wav.chunked_decode(&CodecFrames::new(talker_out.codes.clone()), 300, 25)?
        };
        Ok(SpokenAnswer { codes: talker_out.codes, audio, sample_rate: self.code2wav.sample_rate(), finish })
    }

    /// `accept_hidden_layer` states `[p, hidden]` of the prompt (multimodal tokens in place),
    /// prefilled in chunks.
    fn prompt_states(
        &self,
        model: &OmniModel,
        prompt: &PreparedPrompt,
        deepstack: Option<&crate::thinker::Deepstack>,
    ) -> Result<Tensor> {
        let thinker = &model.thinker;
        let (which, capture) = accepted_state(&self.talker, thinker)?;
        let p = prompt.ids.len();
        let mut cache = thinker.new_cache();
        let mut parts = Vec::new();
        let mut start = 0;
        while start < p {
            let len = PREFILL_CHUNK.min(p - start);
            let pos = [
                prompt.positions[0][start..start + len].to_vec(),
                prompt.positions[1][start..start + len].to_vec(),
                prompt.positions[2][start..start + len].to_vec(),
            ];
            let chunk = prompt.embeds.narrow(1, start, len)?;
            let step = thinker.forward_with_deepstack(&chunk, &pos, &mut cache, &capture, deepstack)?;
            parts.push(accepted_rows(which, &chunk, &step));
            start += len;
        }
        Ok(Tensor::cat(&parts, 1)?.squeeze(0)?)
    }
}

/// Writes 16-bit mono PCM WAV to a temp file beside `path`, then renames it into place.
pub fn write_wav(path: &std::path::Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let spec =
        hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
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

/// A 16-bit mono WAV written as audio arrives: samples go to a temp file beside `path`, renamed into
/// place by [`Self::finish`]; dropped unfinished, the temp file is removed (nothing half-written is
/// left under the final name).
pub struct WavStream {
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    samples: usize,
}

impl WavStream {
    pub fn create(path: &std::path::Path, sample_rate: u32) -> Result<Self> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
        let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
        let spec =
            hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let writer = hound::WavWriter::create(&tmp, spec).with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(Self { writer: Some(writer), tmp, path: path.to_path_buf(), samples: 0 })
    }

    /// Appends samples in [-1, 1] (clamped) and flushes them to the temp file.
    pub fn append(&mut self, samples: &[f32]) -> Result<()> {
        let w = self.writer.as_mut().context("the WAV stream is finished")?;
        for &s in samples {
            w.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
                .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        }
        w.flush().with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.samples += samples.len();
        Ok(())
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Finalises the header and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        let w = self.writer.take().context("the WAV stream is finished")?;
        w.finalize().with_context(|| format!("cannot finish {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot move {} to {}", self.tmp.display(), self.path.display()))?;
        Ok(())
    }
}

impl Drop for WavStream {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.finalize();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
