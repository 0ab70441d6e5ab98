//! The tokenizer in GGUF metadata, as llama.cpp's converter writes it (`tokenizer.ggml.model=gpt2`,
//! `pre=qwen2`, tokens padded to the vocabulary with `[PADi]`, token types, merges, special ids,
//! `tokenizer.chat_template`), and back: a `tokenizer.json` rebuilt from that metadata, so a GGUF
//! file from any converter runs with the exact byte-level BPE of the checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use super::format::{GgufFile, Value};
use crate::tokenizer::TextTokenizer;

/// llama.cpp's token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

/// The qwen2 pre-tokenizer split (the regex of Qwen's `tokenizer.json` and llama.cpp's `qwen2`).
pub const QWEN2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

/// llama.cpp's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The checkpoint's chat template, looked up as the converter does: `chat_template.jinja`,
/// `chat_template` of `tokenizer_config.json`, `chat_template.json`.
pub fn checkpoint_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    let alt = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja)?)
    } else if dir.join("chat_template.json").exists() {
        read_json(&dir.join("chat_template.json"))?
            .get("chat_template")
            .and_then(Json::as_str)
            .map(str::to_string)
    } else {
        None
    };
    let tc = dir.join("tokenizer_config.json");
    if tc.exists() {
        if let Some(t) = read_json(&tc)?.get("chat_template").and_then(Json::as_str) {
            return Ok(Some(t.to_string()));
        }
    }
    Ok(alt)
}

/// `tokenizer.*` metadata for the checkpoint in `dir` (its `tokenizer.json`), `vocab_size` rows.
pub fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let model = tj.get("model").context("tokenizer.json has no `model`")?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        bail!(
            "{}: only byte-level BPE tokenizers can be written to GGUF",
            tj_path.display()
        );
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_UNUSED; vocab_size];
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .context("tokenizer.json: model.vocab")?;
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .context("tokenizer.json: vocab ids must be integers")? as usize;
        if id >= vocab_size {
            bail!(
                "{}: token id {id} is outside the model's vocabulary of {vocab_size}",
                tj_path.display()
            );
        }
        tokens[id] = Some(tok.clone());
        types[id] = TOKEN_NORMAL;
    }
    let mut added: Vec<(usize, String)> = Vec::new();
    for a in tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let id = a
            .get("id")
            .and_then(Json::as_u64)
            .context("tokenizer.json: added token id")? as usize;
        let content = a
            .get("content")
            .and_then(Json::as_str)
            .context("tokenizer.json: added token content")?;
        if id >= vocab_size {
            bail!(
                "{}: added token {content:?} has id {id}, outside the vocabulary of {vocab_size}",
                tj_path.display()
            );
        }
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        tokens[id] = Some(content.to_string());
        types[id] = if special || looks_special(content) {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        added.push((id, content.to_string()));
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .map(|m| {
            m.iter()
                .map(|x| match x {
                    Json::String(s) => Ok(s.clone()),
                    Json::Array(p) if p.len() == 2 => Ok(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or_default(),
                        p[1].as_str().unwrap_or_default()
                    )),
                    _ => bail!("tokenizer.json: a merge is neither \"a b\" nor [a, b]"),
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    let id_of = |content: &str| {
        added
            .iter()
            .find(|(_, c)| c == content)
            .map(|(i, _)| *i as u32)
    };
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(&tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(&types)),
        ("tokenizer.ggml.merges".to_string(), Value::strings(&merges)),
    ];
    // Qwen3-Omni: BOS and EOS are both <|im_end|> (what llama.cpp's converter writes for this model).
    if let Some(im_end) = id_of("<|im_end|>") {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(im_end)));
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(im_end)));
    }
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        json!({})
    };
    let pad = match tc.get("pad_token") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    };
    if let Some(pad_id) = pad.as_deref().and_then(id_of) {
        meta.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad_id)));
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(
            tc.get("add_bos_token")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        ),
    ));
    if let Some(t) = checkpoint_chat_template(dir)? {
        meta.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(meta)
}

fn string_list<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let items = f
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("{}: `{key}` is missing", f.path().display()))?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .with_context(|| format!("{}: `{key}` must hold strings", f.path().display()))
        })
        .collect()
}

/// A `tokenizer.json` equivalent to a GGUF file's `tokenizer.ggml.*` metadata (gpt2 BPE).
pub fn tokenizer_json(f: &GgufFile) -> Result<String> {
    let model = f.get_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model is {model:?}; only byte-level BPE (gpt2) is supported",
            f.path().display()
        );
    }
    let pre = f.get_str("tokenizer.ggml.pre").unwrap_or("default");
    if !matches!(pre, "qwen2" | "qwen35" | "default") {
        tracing::warn!(
            "{}: pre-tokenizer {pre:?} read as qwen2",
            f.path().display()
        );
    }
    let tokens = string_list(f, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(items) => items
            .iter()
            .map(|v| v.as_i64().unwrap_or(TOKEN_NORMAL as i64))
            .collect(),
        None => vec![TOKEN_NORMAL as i64; tokens.len()],
    };
    let merges = string_list(f, "tokenizer.ggml.merges")?;
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        match ty as i32 {
            TOKEN_CONTROL | TOKEN_USER_DEFINED => added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty as i32 == TOKEN_CONTROL,
            })),
            TOKEN_UNUSED if tok.starts_with("[PAD") => continue,
            _ => {}
        }
        vocab.insert(tok.to_string(), json!(id));
    }
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    Ok(serde_json::to_string(&tj)?)
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The text tokenizer of a GGUF file, rebuilt from its metadata.
pub fn text_tokenizer(f: &GgufFile) -> Result<TextTokenizer> {
    let json = tokenizer_json(f)?;
    // `TextTokenizer` loads from a model directory; hand it a private one holding the rebuilt file.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Scratch(
        std::env::temp_dir().join(format!("omni-gguf-tokenizer-{}-{n}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0)?;
    std::fs::write(dir.0.join("tokenizer.json"), json)?;
    TextTokenizer::from_model_dir(&dir.0).with_context(|| {
        format!(
            "cannot build the tokenizer from the metadata of {}",
            f.path().display()
        )
    })
}
