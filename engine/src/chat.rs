//! Chat messages and the checkpoint's own chat template, rendered with minijinja the way
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, `tojson` with Python's separators,
//! Python string methods, `raise_exception`).
//!
//! Where the template lives differs between checkpoints: transformers 5 writes `chat_template.jinja`,
//! the released Qwen3-Omni checkpoints carry `chat_template.json`, older ones put `chat_template` into
//! `tokenizer_config.json`. All three are read, in that order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One item of a message's content, as the processor's chat template expects it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentItem {
    Text { text: String },
    Audio { audio: String },
    Image { image: String },
    Video { video: String },
}

/// A chat message: a role and its content items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentItem>,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        Self { role: role.to_string(), content: vec![ContentItem::Text { text: text.to_string() }] }
    }
}

/// The user turn of the CLI contract: each audio, each image, each video, then the text.
pub fn user_turn(audios: &[String], images: &[String], videos: &[String], text: Option<&str>) -> ChatMessage {
    let mut content = Vec::new();
    content.extend(audios.iter().map(|a| ContentItem::Audio { audio: a.clone() }));
    content.extend(images.iter().map(|i| ContentItem::Image { image: i.clone() }));
    content.extend(videos.iter().map(|v| ContentItem::Video { video: v.clone() }));
    if let Some(t) = text {
        content.push(ContentItem::Text { text: t.to_string() });
    }
    ChatMessage { role: "user".to_string(), content }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
}

impl ChatTemplate {
    /// Finds and compiles the template of a checkpoint directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let (source, text) = find_template(dir)?;
        Self::from_source(&text, source)
    }

    pub fn from_source(text: &str, source: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_python);
        env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat".to_string(), text.to_string())
            .with_context(|| format!("cannot compile the chat template of {}", source.display()))?;
        Ok(Self { env, source })
    }

    /// Renders `messages` as `processor.apply_chat_template(messages, add_generation_prompt=..)` does.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat")?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
        };
        tmpl.render(ctx).with_context(|| format!("chat template of {} failed", self.source.display()))
    }
}

fn find_template(dir: &Path) -> Result<(PathBuf, String)> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok((jinja, text));
    }
    for (file, key) in [("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))?;
        match json.get(key) {
            Some(serde_json::Value::String(t)) => return Ok((path, t.clone())),
            Some(serde_json::Value::Array(list)) => {
                // A list of named templates: take "default".
                for entry in list {
                    if entry.get("name").and_then(|n| n.as_str()) == Some("default") {
                        if let Some(t) = entry.get("template").and_then(|t| t.as_str()) {
                            return Ok((path, t.to_string()));
                        }
                    }
                }
                bail!("{} lists chat templates but none named \"default\"", path.display());
            }
            _ => continue,
        }
    }
    bail!(
        "no chat template in {} (looked for chat_template.jinja, chat_template.json and `chat_template` in tokenizer_config.json)",
        dir.display()
    )
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False)` with Python's default
/// separators (", " and ": ") and no HTML escaping.
fn tojson_python(value: Value) -> Result<Value, JinjaError> {
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        J::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_uses_python_separators() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, "é<"], "b": null}));
        let s = tojson_python(v).unwrap().to_string();
        assert_eq!(s, r#"{"a": [1, "é<"], "b": null}"#);
    }

    #[test]
    fn user_turn_orders_media_before_text() {
        let m = user_turn(&["a.wav".into()], &["b.png".into()], &[], Some("hi"));
        let kinds: Vec<&str> = m
            .content
            .iter()
            .map(|c| match c {
                ContentItem::Audio { .. } => "audio",
                ContentItem::Image { .. } => "image",
                ContentItem::Video { .. } => "video",
                ContentItem::Text { .. } => "text",
            })
            .collect();
        assert_eq!(kinds, vec!["audio", "image", "text"]);
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        let t = ChatTemplate::from_source(
            "{%- for m in messages %}\n    {{- m.role + ':' }}\n    {% if true %}x{% endif %}\n{%- endfor %}",
            PathBuf::from("inline"),
        )
        .unwrap();
        let out = t.render(&[ChatMessage::text("user", "hi")], false).unwrap();
        assert_eq!(out, "user:\nx"); // what jinja2 with trim_blocks + lstrip_blocks renders
    }
}
