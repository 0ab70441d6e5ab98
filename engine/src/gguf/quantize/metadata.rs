//! Metadata: the key/values of each file (`general.*`, llama.cpp's architecture keys, our own
//! `omni.*` keys, and the checkpoint's JSON configs), read from the checkpoint directory.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value as Json;

use super::plan::Plan;
use super::QuantizeOptions;
use crate::config::OmniConfig;
use crate::gguf::format::{file_type_code, GgmlType, Value};
use crate::gguf::model::{
    KEY_CONFIG, KEY_GENERATION, KEY_PREPROCESSOR, MMPROJ_ARCH, TALKER_ARCH, THINKER_ARCH,
};
use crate::gguf::names::Component;

fn read_json(path: &Path) -> Result<Option<(String, Json)>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let json = serde_json::from_str(&text)
        .with_context(|| format!("invalid JSON in {}", path.display()))?;
    Ok(Some((text, json)))
}

fn u(v: Option<&Json>) -> Option<u32> {
    v.and_then(Json::as_u64).map(|x| x as u32)
}

fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "Qwen3-Omni".into())
}

fn general(arch: &str, kind: &str, name: &str, t: GgmlType) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String(kind.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(file_type_code(t))),
        ("general.quantization_version".into(), Value::U32(2)),
    ]
}

pub(super) fn thinker_metadata(
    dir: &Path,
    cfg_text: &str,
    cfg: &Json,
    opts: &QuantizeOptions,
) -> Result<Vec<(String, Value)>> {
    let parsed = OmniConfig::from_json_str(cfg_text)?;
    let t = &parsed.thinker_config.text_config;
    let rope = t.rope()?;
    let a = THINKER_ARCH;
    let mut m = general(
        a,
        "model",
        &model_name(dir),
        opts.type_of(Component::Thinker),
    );
    let mut sections: Vec<i32> = rope.mrope_section.iter().map(|&s| s as i32).collect();
    sections.resize(4, 0);
    let kv = |k: &str, v: Value| (format!("{a}.{k}"), v);
    m.extend([
        kv("block_count", Value::U32(t.num_hidden_layers as u32)),
        kv(
            "context_length",
            Value::U32(t.max_position_embeddings.unwrap_or(65536) as u32),
        ),
        kv("embedding_length", Value::U32(t.hidden_size as u32)),
        kv(
            "feed_forward_length",
            Value::U32(t.intermediate_size as u32),
        ),
        kv(
            "attention.head_count",
            Value::U32(t.num_attention_heads as u32),
        ),
        kv(
            "attention.head_count_kv",
            Value::U32(t.num_key_value_heads as u32),
        ),
        kv("rope.dimension_sections", Value::i32s(&sections)),
        kv("rope.freq_base", Value::F32(rope.theta as f32)),
        kv(
            "attention.layer_norm_rms_epsilon",
            Value::F32(t.rms_norm_eps as f32),
        ),
        kv("expert_count", Value::U32(t.num_experts as u32)),
        kv(
            "expert_used_count",
            Value::U32(t.num_experts_per_tok as u32),
        ),
        kv("attention.key_length", Value::U32(t.head_dim() as u32)),
        kv("attention.value_length", Value::U32(t.head_dim() as u32)),
        kv(
            "expert_feed_forward_length",
            Value::U32(t.moe_intermediate_size as u32),
        ),
        kv(
            "expert_shared_feed_forward_length",
            Value::U32(t.shared_expert_intermediate_size as u32),
        ),
        kv("expert_weights_norm", Value::Bool(t.norm_topk_prob)),
        kv("n_deepstack_layers", Value::U32(0)),
    ]);
    let generation = read_json(&dir.join("generation_config.json"))?;
    if let Some((_, g)) = &generation {
        if let Some(k) = g.get("top_k").and_then(Json::as_i64) {
            m.push(("general.sampling.top_k".into(), Value::I32(k as i32)));
        }
        if let Some(p) = g.get("top_p").and_then(Json::as_f64) {
            m.push(("general.sampling.top_p".into(), Value::F32(p as f32)));
        }
        if let Some(p) = g.get("temperature").and_then(Json::as_f64) {
            m.push(("general.sampling.temp".into(), Value::F32(p as f32)));
        }
        if let Some(p) = g.get("repetition_penalty").and_then(Json::as_f64) {
            m.push((
                "general.sampling.penalty_repeat".into(),
                Value::F32(p as f32),
            ));
        }
    }
    m.extend(crate::gguf::tokenizer::tokenizer_metadata(dir, t.vocab_size)?);
    m.push((KEY_CONFIG.into(), Value::String(cfg_text.to_string())));
    if let Some((text, _)) = generation {
        m.push((KEY_GENERATION.into(), Value::String(text)));
    }
    let _ = cfg;
    Ok(m)
}

/// The processor config: `preprocessor_config.json`, else `processor_config.json`.
fn processor_config(dir: &Path) -> Result<Option<(String, Json)>> {
    match read_json(&dir.join("preprocessor_config.json"))? {
        Some(x) => Ok(Some(x)),
        None => read_json(&dir.join("processor_config.json")),
    }
}

pub(super) fn mmproj_metadata(
    dir: &Path,
    cfg: &Json,
    opts: &QuantizeOptions,
    plan: &Plan,
) -> Result<Vec<(String, Value)>> {
    let t = opts.type_of(Component::Vision);
    let mut m = general(MMPROJ_ARCH, "mmproj", &model_name(dir), t);
    let text = cfg
        .pointer("/thinker_config/text_config")
        .context("config.json: thinker_config.text_config")?;
    let proc = processor_config(dir)?;
    let image = proc
        .as_ref()
        .map(|(_, j)| j.get("image_processor").unwrap_or(j).clone());
    let has_vision = plan
        .tensors
        .iter()
        .any(|p| p.component == Component::Vision);
    let has_audio = plan.tensors.iter().any(|p| p.component == Component::Audio);
    m.push(("clip.has_vision_encoder".into(), Value::Bool(has_vision)));
    if has_vision {
        let v = cfg
            .pointer("/thinker_config/vision_config")
            .context("config.json: thinker_config.vision_config")?;
        let depth = u(v.get("depth")).context("vision_config.depth")?;
        let patch = u(v.get("patch_size")).unwrap_or(16);
        let image_size = u(v.get("image_size")).unwrap_or_else(|| {
            let n = v
                .get("num_position_embeddings")
                .and_then(Json::as_f64)
                .unwrap_or(2304.0);
            (n.sqrt() as u32) * patch
        });
        let floats = |key: &str| -> Vec<f32> {
            image
                .as_ref()
                .and_then(|j| j.get(key))
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_f64)
                        .map(|x| x as f32)
                        .collect()
                })
                .unwrap_or_else(|| vec![0.5, 0.5, 0.5])
        };
        let ds: Vec<u32> = v
            .get("deepstack_visual_indexes")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_u64)
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        let mut is_ds = vec![false; depth as usize];
        for &i in &ds {
            if let Some(slot) = is_ds.get_mut(i as usize) {
                *slot = true;
            }
        }
        m.extend([
            (
                "clip.vision.projection_dim".into(),
                Value::U32(u(v.get("out_hidden_size")).context("vision_config.out_hidden_size")?),
            ),
            ("clip.vision.image_size".into(), Value::U32(image_size)),
            ("clip.vision.patch_size".into(), Value::U32(patch)),
            (
                "clip.vision.embedding_length".into(),
                Value::U32(u(v.get("hidden_size")).context("vision_config.hidden_size")?),
            ),
            (
                "clip.vision.feed_forward_length".into(),
                Value::U32(
                    u(v.get("intermediate_size")).context("vision_config.intermediate_size")?,
                ),
            ),
            ("clip.vision.block_count".into(), Value::U32(depth)),
            (
                "clip.vision.attention.head_count".into(),
                Value::U32(u(v.get("num_heads")).context("vision_config.num_heads")?),
            ),
            (
                "clip.vision.image_mean".into(),
                Value::f32s(&floats("image_mean")),
            ),
            (
                "clip.vision.image_std".into(),
                Value::f32s(&floats("image_std")),
            ),
        ]);
        m.push((
            "clip.vision.spatial_merge_size".into(),
            Value::U32(u(v.get("spatial_merge_size")).unwrap_or(2)),
        ));
        let eps = text
            .get("rms_norm_eps")
            .and_then(Json::as_f64)
            .unwrap_or(1e-6);
        m.push((
            "clip.vision.attention.layer_norm_epsilon".into(),
            Value::F32(eps as f32),
        ));
        m.push((
            "clip.vision.is_deepstack_layers".into(),
            Value::bools(&is_ds),
        ));
        m.push((
            "clip.vision.projector_type".into(),
            Value::String("qwen3vl_merger".into()),
        ));
        m.push((
            "omni.vision.deepstack_visual_indexes".into(),
            Value::u32s(&ds),
        ));
    }
    m.push(("clip.has_audio_encoder".into(), Value::Bool(has_audio)));
    if has_audio {
        let a = cfg
            .pointer("/thinker_config/audio_config")
            .context("config.json: thinker_config.audio_config")?;
        m.extend([
            (
                "clip.audio.projection_dim".into(),
                Value::U32(u(a.get("output_dim")).context("audio_config.output_dim")?),
            ),
            (
                "clip.audio.embedding_length".into(),
                Value::U32(u(a.get("d_model")).context("audio_config.d_model")?),
            ),
            (
                "clip.audio.feed_forward_length".into(),
                Value::U32(u(a.get("encoder_ffn_dim")).context("audio_config.encoder_ffn_dim")?),
            ),
            (
                "clip.audio.block_count".into(),
                Value::U32(u(a.get("encoder_layers")).context("audio_config.encoder_layers")?),
            ),
            (
                "clip.audio.attention.head_count".into(),
                Value::U32(
                    u(a.get("encoder_attention_heads"))
                        .context("audio_config.encoder_attention_heads")?,
                ),
            ),
            (
                "clip.audio.num_mel_bins".into(),
                Value::U32(u(a.get("num_mel_bins")).unwrap_or(128)),
            ),
            (
                "clip.audio.attention.layer_norm_epsilon".into(),
                Value::F32(
                    a.get("layer_norm_eps")
                        .and_then(Json::as_f64)
                        .unwrap_or(1e-5) as f32,
                ),
            ),
            (
                "clip.audio.projector_type".into(),
                Value::String("qwen3a".into()),
            ),
        ]);
    }
    m.push(("clip.use_gelu".into(), Value::Bool(true)));
    if let Some((text, _)) = proc {
        m.push((KEY_PREPROCESSOR.into(), Value::String(text)));
    }
    Ok(m)
}

pub(super) fn talker_metadata(
    dir: &Path,
    cfg_text: &str,
    cfg: &Json,
    opts: &QuantizeOptions,
) -> Result<Vec<(String, Value)>> {
    let mut m = general(
        TALKER_ARCH,
        "model",
        &model_name(dir),
        opts.type_of(Component::Talker),
    );
    m.push(("omni.format_version".into(), Value::U32(1)));
    if let Some(t) = cfg.get("talker_config") {
        let tc = t.get("text_config").cloned().unwrap_or_default();
        let cp = t.get("code_predictor_config").cloned().unwrap_or_default();
        let p = "omni.talker.";
        let mut push_u = |k: &str, v: Option<u32>| {
            if let Some(v) = v {
                m.push((format!("{p}{k}"), Value::U32(v)));
            }
        };
        push_u("block_count", u(tc.get("num_hidden_layers")));
        push_u("embedding_length", u(tc.get("hidden_size")));
        push_u("expert_count", u(tc.get("num_experts")));
        push_u("expert_used_count", u(tc.get("num_experts_per_tok")));
        push_u("vocab_size", u(tc.get("vocab_size")));
        push_u("accept_hidden_layer", u(t.get("accept_hidden_layer")));
        push_u("num_code_groups", u(t.get("num_code_groups")));
        push_u("thinker_hidden_size", u(t.get("thinker_hidden_size")));
        push_u("code_predictor.block_count", u(cp.get("num_hidden_layers")));
        push_u("code_predictor.embedding_length", u(cp.get("hidden_size")));
        push_u("code_predictor.vocab_size", u(cp.get("vocab_size")));
        for id in [
            "codec_pad_id",
            "codec_bos_id",
            "codec_eos_token_id",
            "codec_nothink_id",
            "codec_think_bos_id",
            "codec_think_eos_id",
        ] {
            push_u(id, u(t.get(id)));
        }
        if let Some(speakers) = t.get("speaker_id").and_then(Json::as_object) {
            let names: Vec<&str> = speakers.keys().map(String::as_str).collect();
            let ids: Vec<u32> = speakers
                .values()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect();
            m.push(("omni.talker.speaker_names".into(), Value::strings(&names)));
            m.push(("omni.talker.speaker_ids".into(), Value::u32s(&ids)));
        }
    }
    if let Some(c) = cfg.get("code2wav_config") {
        let p = "omni.code2wav.";
        for k in [
            "num_hidden_layers",
            "hidden_size",
            "num_quantizers",
            "codebook_size",
            "decoder_dim",
            "sliding_window",
        ] {
            if let Some(v) = u(c.get(k)) {
                m.push((format!("{p}{k}"), Value::U32(v)));
            }
        }
        for k in ["upsample_rates", "upsampling_ratios"] {
            if let Some(a) = c.get(k).and_then(Json::as_array) {
                let v: Vec<u32> = a
                    .iter()
                    .filter_map(Json::as_u64)
                    .map(|x| x as u32)
                    .collect();
                m.push((format!("{p}{k}"), Value::u32s(&v)));
            }
        }
    }
    for c in [Component::Talker, Component::Code2Wav] {
        m.push((
            format!("omni.{}.type", c.name()),
            Value::String(opts.type_of(c).name().into()),
        ));
    }
    m.push((KEY_CONFIG.into(), Value::String(cfg_text.to_string())));
    Ok(m)
}
