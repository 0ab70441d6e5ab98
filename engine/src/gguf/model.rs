//! A model made of GGUF files: finding them, and reading from them what a checkpoint directory
//! holds beside its weights (config, generation defaults, tokenizer, chat template).
//!
//! Our own files embed the checkpoint's `config.json`, `generation_config.json` and processor
//! config verbatim (`omni.config`, `omni.generation_config`, `omni.preprocessor_config`), so a
//! quantized model behaves exactly as its checkpoint. Files from llama.cpp's converter (or
//! ggml-org's published ones) carry only llama.cpp's keys; the Thinker's configuration is then
//! rebuilt from `qwen3vlmoe.*` and the tensor list.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::format::GgufFile;
use super::names::FileKind;
use super::source::{GgufSource, SourceFile};
use crate::chat::ChatTemplate;
use crate::config::{GenerationDefaults, OmniConfig};
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightStore;

/// `general.architecture` of each kind.
pub const THINKER_ARCH: &str = "qwen3vlmoe";
pub const MMPROJ_ARCH: &str = "clip";
pub const TALKER_ARCH: &str = "omni-talker";

/// Keys holding the checkpoint's own JSON files.
pub const KEY_CONFIG: &str = "omni.config";
pub const KEY_GENERATION: &str = "omni.generation_config";
pub const KEY_PREPROCESSOR: &str = "omni.preprocessor_config";

/// The GGUF files of one model.
#[derive(Debug, Clone, Default)]
pub struct GgufModelFiles {
    pub thinker: Option<PathBuf>,
    pub mmproj: Option<PathBuf>,
    pub talker: Option<PathBuf>,
}

/// The kind of a GGUF file, from its header.
pub fn file_kind(f: &GgufFile) -> Option<FileKind> {
    match f.architecture()? {
        THINKER_ARCH => Some(FileKind::Thinker),
        MMPROJ_ARCH => Some(FileKind::Mmproj),
        TALKER_ARCH => Some(FileKind::Talker),
        _ => None,
    }
}

impl GgufModelFiles {
    /// The GGUF files of `dir`, classified by their headers; `None` when `dir` holds a safetensors
    /// checkpoint or no GGUF file at all. Two files of one kind are an error (name them explicitly).
    pub fn discover(dir: &Path) -> Result<Option<Self>> {
        if !dir.is_dir()
            || dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists()
        {
            return Ok(None);
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        if paths.is_empty() {
            return Ok(None);
        }
        paths.sort();
        let mut out = Self::default();
        for p in paths {
            let f = GgufFile::open(&p)?;
            let slot = match file_kind(&f) {
                Some(FileKind::Thinker) => &mut out.thinker,
                Some(FileKind::Mmproj) => &mut out.mmproj,
                Some(FileKind::Talker) => &mut out.talker,
                None => {
                    tracing::warn!(
                        "{}: architecture {:?} is not part of Qwen3-Omni; ignored",
                        p.display(),
                        f.architecture()
                    );
                    continue;
                }
            };
            if let Some(prev) = slot {
                bail!(
                    "{} holds two {} GGUF files ({} and {}); choose one with --thinker/--mmproj/--talker",
                    dir.display(),
                    f.architecture().unwrap_or("?"),
                    prev.display(),
                    p.display()
                );
            }
            *slot = Some(p);
        }
        if out.thinker.is_none() {
            bail!(
                "{} has GGUF files but no Thinker (general.architecture = {THINKER_ARCH})",
                dir.display()
            );
        }
        Ok(Some(out))
    }

    /// Explicit paths, completed from `dir` (when given) for the kinds not named.
    pub fn with_overrides(
        dir: Option<&Path>,
        thinker: Option<&Path>,
        mmproj: Option<&Path>,
        talker: Option<&Path>,
    ) -> Result<Self> {
        let mut out = match dir {
            Some(d) => Self::discover(d)?.unwrap_or_default(),
            None => Self::default(),
        };
        for (slot, p, want) in [
            (&mut out.thinker, thinker, FileKind::Thinker),
            (&mut out.mmproj, mmproj, FileKind::Mmproj),
            (&mut out.talker, talker, FileKind::Talker),
        ] {
            if let Some(p) = p {
                let f = GgufFile::open(p)?;
                if file_kind(&f) != Some(want) {
                    bail!(
                        "{} is a {:?} GGUF file, not a {} file",
                        p.display(),
                        f.architecture().unwrap_or("?"),
                        want.stem()
                    );
                }
                *slot = Some(p.to_path_buf());
            }
        }
        if out.thinker.is_none() {
            bail!("no Thinker GGUF file: pass --thinker FILE or a --model directory holding thinker-*.gguf");
        }
        Ok(out)
    }

    /// The directory the model is named by in messages.
    pub fn dir(&self) -> PathBuf {
        self.thinker
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// Everything the pipeline needs from the files, besides the stage weights themselves.
pub struct GgufModelParts {
    pub config: OmniConfig,
    pub generation: Option<GenerationDefaults>,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub weights: WeightStore,
    /// The processor config JSON, when a file carries it.
    pub preprocessor_config: Option<String>,
    /// Things the user should know (a missing file, missing deepstack tensors).
    pub notes: Vec<String>,
}

/// Opens the files and reads config, tokenizer and template.
pub fn open(files: &GgufModelFiles) -> Result<GgufModelParts> {
    let thinker_path = files.thinker.as_deref().context("no Thinker GGUF file")?;
    let mut opened = vec![SourceFile {
        kind: FileKind::Thinker,
        file: GgufFile::open(thinker_path)?,
    }];
    if let Some(p) = &files.mmproj {
        opened.push(SourceFile {
            kind: FileKind::Mmproj,
            file: GgufFile::open(p)?,
        });
    }
    if let Some(p) = &files.talker {
        opened.push(SourceFile {
            kind: FileKind::Talker,
            file: GgufFile::open(p)?,
        });
    }
    let source = GgufSource::new(opened)?;
    let thinker = source.file(FileKind::Thinker).expect("opened above");
    let mut notes = Vec::new();

    let config = match thinker.get_str(KEY_CONFIG) {
        Some(text) => OmniConfig::from_json_str(text)
            .with_context(|| format!("{}: invalid `{KEY_CONFIG}`", thinker.path().display()))?,
        None => {
            notes.push(format!(
                "{} was not written by omni: Thinker configuration rebuilt from its {THINKER_ARCH} keys",
                thinker.path().display()
            ));
            config_from_llama_keys(thinker)?
        }
    };
    let generation = match thinker.get_str(KEY_GENERATION) {
        Some(text) => Some(serde_json::from_str(text).with_context(|| {
            format!("{}: invalid `{KEY_GENERATION}`", thinker.path().display())
        })?),
        None => thinker
            .get_u64("tokenizer.ggml.eos_token_id")
            .map(|eos| GenerationDefaults {
                eos_token_id: Some(json!(eos)),
                do_sample: None,
                temperature: None,
                top_k: None,
                top_p: None,
                repetition_penalty: None,
            }),
    };
    let tokenizer = super::tokenizer::text_tokenizer(thinker)?;
    let template_text = thinker
        .get_str("tokenizer.chat_template")
        .with_context(|| format!("{}: no tokenizer.chat_template", thinker.path().display()))?;
    let template = ChatTemplate::from_source(template_text, thinker.path().to_path_buf())?;
    let preprocessor_config = source
        .file(FileKind::Mmproj)
        .and_then(|f| f.get_str(KEY_PREPROCESSOR))
        .or_else(|| thinker.get_str(KEY_PREPROCESSOR))
        .map(str::to_string);

    if let Some(mm) = source.file(FileKind::Mmproj) {
        let wants_deepstack = config
            .thinker_config
            .vision_config
            .as_ref()
            .is_some_and(|v| !v.deepstack_visual_indexes.is_empty());
        let has_vision = source.contains("thinker.visual.merger.mlp.0.weight");
        let has_deepstack = source
            .names()
            .any(|n| n.starts_with("thinker.visual.merger_list."));
        if has_vision && wants_deepstack && !has_deepstack {
            notes.push(format!(
                "{} has no deepstack mergers (omni.deepstack.*): images will be read without the deepstack features, an approximation of the reference (as llama.cpp does)",
                mm.path().display()
            ));
        }
    }
    for u in source.unmapped() {
        tracing::info!("GGUF tensor not used by omni: {u}");
    }
    let weights = WeightStore::from_gguf(&files.dir(), source);
    Ok(GgufModelParts {
        config,
        generation,
        tokenizer,
        template,
        weights,
        preprocessor_config,
        notes,
    })
}

/// `config.json` for a Thinker file that carries only llama.cpp's keys.
pub fn config_from_llama_keys(f: &GgufFile) -> Result<OmniConfig> {
    let a = THINKER_ARCH;
    let key = |k: &str| format!("{a}.{k}");
    let n_layers = f.require_u64(&key("block_count"))? as usize;
    let hidden = f.require_u64(&key("embedding_length"))? as usize;
    let heads = f.require_u64(&key("attention.head_count"))? as usize;
    let kv_heads = f
        .get_u64(&key("attention.head_count_kv"))
        .unwrap_or(heads as u64) as usize;
    let head_dim = f
        .get_u64(&key("attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(hidden / heads);
    let vocab = f
        .tensor("token_embd.weight")
        .map(|t| t.dims[1])
        .with_context(|| format!("{}: no token_embd.weight", f.path().display()))?;
    let sections: Vec<u64> = f
        .get(&key("rope.dimension_sections"))
        .and_then(|v| v.as_array())
        .map(|items| items.iter().filter_map(|v| v.as_u64()).collect())
        .with_context(|| {
            format!(
                "{}: `{}` is required",
                f.path().display(),
                key("rope.dimension_sections")
            )
        })?;
    let mlp_only: Vec<usize> = (0..n_layers)
        .filter(|l| f.tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_none())
        .collect();
    let text = json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": f.get_u64(&key("feed_forward_length")).unwrap_or(0),
        "moe_intermediate_size": f.get_u64(&key("expert_feed_forward_length")).unwrap_or(0),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": f.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
        "num_experts": f.get_u64(&key("expert_count")).unwrap_or(0),
        "num_experts_per_tok": f.get_u64(&key("expert_used_count")).unwrap_or(0),
        // llama.cpp's qwen3vlmoe graph always renormalises the top-k weights.
        "norm_topk_prob": f.get(&key("expert_weights_norm")).and_then(|v| v.as_bool()).unwrap_or(true),
        "decoder_sparse_step": 1,
        "mlp_only_layers": mlp_only,
        "max_position_embeddings": f.get_u64(&key("context_length")),
        "attention_bias": f.tensor("blk.0.attn_q.bias").is_some(),
        "tie_word_embeddings": f.tensor("output.weight").is_none(),
        "rope_theta": f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
        "rope_scaling": {"rope_type": "default", "interleaved": true, "mrope_section": &sections[..sections.len().min(3)]},
    });
    let mut cfg = json!({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": text}});
    if let Some(eos) = f.get_u64("tokenizer.ggml.eos_token_id") {
        cfg["im_end_token_id"] = json!(eos);
    }
    OmniConfig::from_json_str(&cfg.to_string()).with_context(|| {
        format!(
            "{}: cannot rebuild the Thinker configuration",
            f.path().display()
        )
    })
}
