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
use crate::thinker::{Deepstack, ThinkerText};
use crate::vision::{
    expand_image_pads, mrope_positions, scatter_rows, ImagePixels, ImageProcessorConfig, VisionEncoder, VisionTokens,
};
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
    /// The image front end, when the checkpoint has a vision tower.
    pub vision: Option<VisionFrontEnd>,
    pub load_ms: f64,
}

/// Image processor and vision encoder.
pub struct VisionFrontEnd {
    pub processor: ImageProcessorConfig,
    pub encoder: VisionEncoder,
    /// `<|image_pad|>`.
    pub image_pad: u32,
}

/// A prompt with images: the Thinker input plus what only image prompts have. Generate from it with
/// [`OmniModel::generate`] so the deepstack features are not lost.
pub struct MultimodalPrompt {
    pub prompt: PreparedPrompt,
    /// The vision tower's output for the prompt's images, if any.
    pub vision: Option<VisionTokens>,
    /// The deepstack features at the image positions, if any.
    pub deepstack: Option<Deepstack>,
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
        let vision = match &config.thinker_config.vision_config {
            Some(vcfg) if weights.contains("thinker.visual.merger.mlp.0.weight") => {
                let encoder = VisionEncoder::new(vcfg, &weights.root().pp("thinker.visual"))
                    .with_context(|| format!("cannot load the vision encoder from {}", dir.display()))?;
                weights.ensure_all_used("thinker.visual.")?;
                let processor = match &mel_json {
                    None => ImageProcessorConfig::from_model_dir(dir)?,
                    Some(None) => ImageProcessorConfig::qwen3_omni(),
                    Some(Some(text)) => {
                        let v: serde_json::Value =
                            serde_json::from_str(text).context("the processor config in the GGUF file is not JSON")?;
                        ImageProcessorConfig::from_json(v.get("image_processor").unwrap_or(&v))
                            .context("the image processor config in the GGUF file")?
                    }
                };
                if processor.patch_size != vcfg.patch_size
                    || processor.merge_size != vcfg.spatial_merge_size
                    || processor.temporal_patch_size != vcfg.temporal_patch_size
                {
                    anyhow::bail!(
                        "{}: the image processor's patch/merge/temporal sizes ({}, {}, {}) differ from vision_config's ({}, {}, {})",
                        dir.display(),
                        processor.patch_size,
                        processor.merge_size,
                        processor.temporal_patch_size,
                        vcfg.patch_size,
                        vcfg.spatial_merge_size,
                        vcfg.temporal_patch_size
                    );
                }
                let image_pad = match config.thinker_config.image_token_id {
                    Some(id) => id,
                    None => tokenizer.require_id("<|image_pad|>")?,
                };
                Some(VisionFrontEnd { processor, encoder, image_pad })
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
            vision,
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
        Ok(self.prepare_multimodal(messages, audio_clips, &[])?.prompt)
    }

    /// Decodes and preprocesses image files (PNG, JPEG) as the processor does; errors name the file.
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Vec<ImagePixels>> {
        let front = self.vision_front()?;
        paths
            .iter()
            .map(|p| {
                let img = crate::vision::load_image(p)?;
                crate::vision::preprocess(&img, &front.processor)
                    .with_context(|| format!("cannot preprocess image {}", p.display()))
            })
            .collect()
    }

    fn vision_front(&self) -> Result<&VisionFrontEnd> {
        self.vision.as_ref().with_context(|| {
            format!("{} has no vision encoder (thinker.visual): image input is not possible", self.dir.display())
        })
    }

    /// As [`Self::prepare`] with images too (`images` in the order their items appear): the image pads
    /// expanded to each image's token count, the tower's tokens scattered in, the M-RoPE positions of
    /// `get_rope_index` for image grids, and the deepstack features for the Thinker's first layers.
    pub fn prepare_multimodal(
        &self,
        messages: &[ChatMessage],
        audio_clips: &[&[f32]],
        images: &[ImagePixels],
    ) -> Result<MultimodalPrompt> {
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
        // Images: the tower runs on all images of the prompt at once (attention stays per image).
        let (ids, vision) = match &self.vision {
            None if images.is_empty() => (ids, None),
            None => return Err(self.vision_front().err().unwrap_or_else(|| anyhow::anyhow!("no vision encoder"))),
            Some(front) if images.is_empty() => {
                expand_image_pads(&ids, front.image_pad, &[])?;
                (ids, None)
            }
            Some(front) => {
                let tokens = front.encoder.forward(images)?;
                (expand_image_pads(&ids, front.image_pad, &tokens.per_image)?, Some(tokens))
            }
        };
        let mut embeds = self.thinker.embed(&ids)?;
        if let (Some(tokens), Some(front)) = (&audio, &self.audio) {
            embeds = scatter_audio(&embeds, &ids, front.audio_pad, tokens)?;
        }
        let (positions, deepstack) = match (&vision, &self.vision) {
            (Some(tokens), Some(front)) => {
                embeds = scatter_rows(&embeds, &ids, front.image_pad, &tokens.embeddings)?;
                let merge = front.encoder.config().spatial_merge_size;
                let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
                let per_second = self.config.thinker_config.position_id_per_seconds.unwrap_or(25.0);
                let positions = mrope_positions(&ids, front.image_pad, &grids, merge, per_second)?;
                let visual: Vec<usize> =
                    ids.iter().enumerate().filter(|(_, &i)| i == front.image_pad).map(|(p, _)| p).collect();
                let deepstack = match tokens.deepstack.is_empty() {
                    true => None,
                    false => Some(Deepstack::new(visual, tokens.deepstack.clone())?),
                };
                (positions, deepstack)
            }
            _ => (crate::thinker::rope::text_positions(0, ids.len()), None),
        };
        Ok(MultimodalPrompt { prompt: PreparedPrompt { ids, embeds, positions, audio }, vision, deepstack })
    }

    /// Generates the answer to a prepared prompt (deepstack features included when it has images).
    pub fn generate(
        &self,
        prompt: &MultimodalPrompt,
        sampler: &mut crate::generation::Sampler,
        stop: &crate::generation::StopRule,
        on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<crate::generation::ThinkerOutput> {
        let p = &prompt.prompt;
        crate::generation::generate_with_deepstack(
            &self.thinker,
            &p.ids,
            &p.embeds,
            &p.positions,
            prompt.deepstack.as_ref(),
            sampler,
            stop,
            on_token,
        )
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
