//! A loaded checkpoint and what the CLI and app do with it: render a chat, run the Thinker.
//!
//! The front ends stay thin: everything they need from a model directory is here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::audio::{LogMelExtractor, MelConfig};
use crate::audio_encoder::{expand_audio_pads, scatter_audio, AudioEncoder, AudioTokens, ClipFeatures};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::{GenerationDefaults, OmniConfig};
use crate::generation::SamplingParams;
use crate::thinker::rope::text_positions;
use crate::thinker::ThinkerText;
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightStore;

/// Progress of a long load, for a progress bar.
pub trait LoadProgress {
    fn start(&mut self, what: &str, total: usize);
    fn advance(&mut self, done: usize);
    fn finish(&mut self);
}

/// Progress sink that shows nothing.
pub struct NoProgress;

impl LoadProgress for NoProgress {
    fn start(&mut self, _: &str, _: usize) {}
    fn advance(&mut self, _: usize) {}
    fn finish(&mut self) {}
}

/// A checkpoint directory with its Thinker loaded.
pub struct OmniModel {
    pub dir: PathBuf,
    pub config: OmniConfig,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub thinker: ThinkerText,
    pub generation: Option<GenerationDefaults>,
    pub weights: WeightStore,
    /// The audio front end, when the checkpoint has an audio tower.
    pub audio: Option<AudioFrontEnd>,
    pub load_ms: f64,
}

/// Mel extractor and AuT encoder.
pub struct AudioFrontEnd {
    pub mel: LogMelExtractor,
    pub encoder: AudioEncoder,
    /// `<|audio_pad|>`.
    pub audio_pad: u32,
}

/// A prompt ready for the Thinker: ids with expanded placeholders, input embeddings, positions.
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    /// `[1, t, hidden]`, multimodal tokens in place.
    pub embeds: candle_core::Tensor,
    /// Temporal, height, width positions of every token.
    pub positions: [Vec<i64>; 3],
    /// The encoder output for the prompt's audio clips, if any.
    pub audio: Option<AudioTokens>,
}

impl OmniModel {
    /// Loads a checkpoint directory: safetensors, or GGUF files (`thinker-*.gguf`, optional
    /// `mmproj-*.gguf`, `talker-*.gguf`) found by their headers.
    pub fn load(dir: &Path, progress: &mut dyn LoadProgress) -> Result<Self> {
        let gguf = crate::gguf::model::GgufModelFiles::discover(dir)?;
        Self::load_from(dir, gguf.as_ref(), progress)
    }

    /// Loads the given GGUF files (the Thinker's is required).
    pub fn load_gguf(files: &crate::gguf::model::GgufModelFiles, progress: &mut dyn LoadProgress) -> Result<Self> {
        Self::load_from(&files.dir(), Some(files), progress)
    }

    fn load_from(
        dir: &Path,
        gguf: Option<&crate::gguf::model::GgufModelFiles>,
        progress: &mut dyn LoadProgress,
    ) -> Result<Self> {
        let start = Instant::now();
        // The processor config: from the directory, or (GGUF) from the files (`None`: defaults).
        let (config, tokenizer, template, generation, weights, mel_json) = match gguf {
            Some(files) => {
                let parts = crate::gguf::model::open(files)?;
                for note in &parts.notes {
                    tracing::warn!("{note}");
                }
                let mel = Some(parts.preprocessor_config);
                (parts.config, parts.tokenizer, parts.template, parts.generation, parts.weights, mel)
            }
            None => (
                OmniConfig::from_file(&dir.join("config.json"))?,
                TextTokenizer::from_model_dir(dir)?,
                ChatTemplate::from_model_dir(dir)?,
                GenerationDefaults::from_model_dir(dir)?,
                WeightStore::open(dir)?,
                None,
            ),
        };
        let text_cfg = &config.thinker_config.text_config;
        progress.start("loading Thinker", text_cfg.num_hidden_layers);
        let thinker = ThinkerText::new_with_progress(text_cfg, &weights.root().pp("thinker"), &mut |l| {
            progress.advance(l + 1)
        })
        .with_context(|| format!("cannot load the Thinker from {}", dir.display()))?;
        progress.finish();
        weights.ensure_all_used("thinker.model.")?;
        weights.ensure_all_used("thinker.lm_head.")?;
        let audio = match &config.thinker_config.audio_config {
            Some(acfg) if weights.contains("thinker.audio_tower.conv2d1.weight") => {
                let encoder = AudioEncoder::new(acfg, &weights.root().pp("thinker.audio_tower"))
                    .with_context(|| format!("cannot load the audio encoder from {}", dir.display()))?;
                weights.ensure_all_used("thinker.audio_tower.")?;
                let mel_cfg = match &mel_json {
                    None => MelConfig::from_model_dir(dir)?,
                    Some(None) => MelConfig::qwen3_omni(),
                    Some(Some(text)) => {
                        let cfg = MelConfig::from_json_str(text).context("the processor config in the GGUF file")?;
                        cfg.validate()?;
                        cfg
                    }
                };
                let mel = LogMelExtractor::new(&mel_cfg)?;
                let audio_pad = match config.thinker_config.audio_token_id {
                    Some(id) => id,
                    None => tokenizer.require_id("<|audio_pad|>")?,
                };
                Some(AudioFrontEnd { mel, encoder, audio_pad })
            }
            _ => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            template,
            thinker,
            generation,
            weights,
            audio,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The rendered prompt text and its token ids, generation prompt included.
    pub fn render_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok((text, ids))
    }

    /// Renders `messages`, encodes `audio_clips` (16 kHz mono, in the order their items appear) and
    /// builds the Thinker's input: the processor's placeholder expansion, the encoder output scattered
    /// into the pads, and the M-RoPE positions of `get_rope_index` (audio and text advance one position
    /// per token, so they are sequential).
    pub fn prepare(&self, messages: &[ChatMessage], audio_clips: &[&[f32]]) -> Result<PreparedPrompt> {
        let (_, ids) = self.render_prompt(messages)?;
        let (ids, audio) = if audio_clips.is_empty() {
            (ids, None)
        } else {
            let front = self.audio.as_ref().with_context(|| {
                format!("{} has no audio encoder (thinker.audio_tower): audio input is not possible", self.dir.display())
            })?;
            let mel = front.mel.extract(audio_clips)?;
            let valid: Vec<Vec<f32>> = (0..mel.batch_size()).map(|i| mel.clip_valid(i)).collect();
            let clips: Vec<ClipFeatures<'_>> = valid
                .iter()
                .zip(&mel.valid_frames)
                .map(|(m, &frames)| ClipFeatures { mel: m, frames })
                .collect();
            let tokens = front.encoder.forward(&clips)?;
            (expand_audio_pads(&ids, front.audio_pad, &tokens.per_clip)?, Some(tokens))
        };
        let mut embeds = self.thinker.embed(&ids)?;
        if let (Some(tokens), Some(front)) = (&audio, &self.audio) {
            embeds = scatter_audio(&embeds, &ids, front.audio_pad, tokens)?;
        }
        let positions = text_positions(0, ids.len());
        Ok(PreparedPrompt { ids, embeds, positions, audio })
    }

    /// Stop ids: generation_config.json's `eos_token_id`, else `<|im_end|>`.
    pub fn eos_ids(&self) -> Result<Vec<u32>> {
        if let Some(g) = &self.generation {
            let ids = g.eos_ids()?;
            if !ids.is_empty() {
                return Ok(ids);
            }
        }
        match self.config.im_end_token_id {
            Some(id) => Ok(vec![id]),
            None => Ok(vec![self.tokenizer.require_id("<|im_end|>")?]),
        }
    }

    /// The checkpoint's default sampling (generation_config.json), greedy when it has none.
    pub fn default_sampling(&self) -> SamplingParams {
        let mut p = SamplingParams::greedy();
        if let Some(g) = &self.generation {
            if g.do_sample.unwrap_or(false) {
                p.temperature = g.temperature.unwrap_or(1.0);
                p.top_k = g.top_k.filter(|&k| k > 0);
                p.top_p = g.top_p.filter(|&x| x < 1.0);
            }
            p.repetition_penalty = g.repetition_penalty.unwrap_or(1.0);
        }
        p
    }
}
