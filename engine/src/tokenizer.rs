//! The checkpoint's own `tokenizer.json` (byte-level BPE with the qwen2 pre-tokenizer).

use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// Encodes and decodes with the checkpoint's tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            anyhow::bail!("{} is missing: the tokenizer is required", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Token ids of already-rendered text; special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// The id of a token written exactly (special or not).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn require_id(&self, token: &str) -> Result<u32> {
        self.token_id(token).with_context(|| format!("the tokenizer has no token {token}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of generated ids into text deltas, holding back incomplete UTF-8.
pub struct TextStreamer {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for TextStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStreamer {
    pub fn new() -> Self {
        Self { ids: Vec::new(), emitted: 0 }
    }

    /// Adds a token and returns the newly printable text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let delta = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(delta))
    }

    /// Whatever is left at the end (including a trailing replacement character).
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.ids, true)?;
        if text.len() > self.emitted && text.is_char_boundary(self.emitted) {
            let delta = text[self.emitted..].to_string();
            self.emitted = text.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }
}
