//! A loaded checkpoint and what the CLI and app do with it: render a chat, run the Thinker.
//!
//! The front ends stay thin: everything they need from a model directory is here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::{GenerationDefaults, OmniConfig};
use crate::generation::SamplingParams;
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
    pub load_ms: f64,
}

impl OmniModel {
    pub fn load(dir: &Path, progress: &mut dyn LoadProgress) -> Result<Self> {
        let start = Instant::now();
        let config = OmniConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let generation = GenerationDefaults::from_model_dir(dir)?;
        let weights = WeightStore::open(dir)?;
        let text_cfg = &config.thinker_config.text_config;
        progress.start("loading Thinker", text_cfg.num_hidden_layers);
        let thinker = ThinkerText::new_with_progress(text_cfg, &weights.root().pp("thinker"), &mut |l| {
            progress.advance(l + 1)
        })
        .with_context(|| format!("cannot load the Thinker from {}", dir.display()))?;
        progress.finish();
        weights.ensure_all_used("thinker.model.")?;
        weights.ensure_all_used("thinker.lm_head.")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            template,
            thinker,
            generation,
            weights,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The rendered prompt text and its token ids, generation prompt included.
    pub fn render_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok((text, ids))
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
