//! `--model` resolution: a local checkpoint directory, or a Hugging Face hub id (`Qwen/Qwen3-Omni-30B-A3B-Instruct`)
//! downloaded into the hub cache with `hf-hub` when the network allows.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files a checkpoint may carry besides its weights; the first two are required.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 7] = [
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "model.safetensors.index.json",
];

/// Whether `s` has the shape of a hub id (`owner/name`) rather than a path.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && *p != ".."
        })
}

/// A directory to load from: `model` itself when it exists, else a hub download.
pub fn resolve_model(model: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let text = model.to_string_lossy();
    if !looks_like_hub_id(&text) {
        bail!("model directory {} does not exist", model.display());
    }
    download(&text).with_context(|| {
        format!("{text} is not a local directory, and downloading it from the Hugging Face hub failed")
    })
}

fn download(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build()?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in REQUIRED {
        let p = repo.get(f).with_context(|| format!("cannot fetch {f}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        let _ = repo.get(f);
    }
    let dir = dir.context("hub cache path has no parent")?;
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        for shard in crate::weights::checkpoint_files(&dir)? {
            let name = shard.file_name().and_then(|n| n.to_str()).context("bad shard name")?.to_string();
            repo.get(&name).with_context(|| format!("cannot fetch {name}"))?;
        }
    } else {
        repo.get("model.safetensors").context("cannot fetch model.safetensors")?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("Qwen/Qwen3-Omni-30B-A3B-Instruct"));
        assert!(!looks_like_hub_id("/models/qwen"));
        assert!(!looks_like_hub_id("models/a/b"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("qwen"));
    }
}
