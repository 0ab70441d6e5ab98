//! Real-shape random checkpoints, written straight to disk tensor by tensor (`omni random-checkpoint`).
//!
//! The tensor list (names and shapes) is derived from a `config.json` exactly as the reference
//! model lays it out (checked against the tiny fixtures, which transformers itself wrote); values are
//! random bf16 (norm weights 1). Safetensors needs every shape in its header up front, so each shard's
//! header is written first and the tensors are then generated and streamed one by one: memory stays
//! at one tensor. Layer counts can be cut (`thinker_layers`) so a real-shape checkpoint fits a small
//! disk; the per-layer arithmetic then extrapolates to the full model.
//!
//! Beside the weights it writes the (edited) `config.json`, a `generation_config.json`, a byte-level
//! tokenizer whose special tokens sit at the real ids, and the chat template of the fixtures, so the
//! directory loads, quantizes and runs like a real checkpoint.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::bf16;
use serde::Serialize;
use serde_json::{json, Value as Json};

use super::names::Component;
use super::quantize::QuantizeProgress;

/// The real Qwen3-Omni-30B-A3B-Instruct `config.json`.
pub const REAL_CONFIG: &str =
    include_str!("../../../tests/fixtures/configs/qwen3-omni-30b-a3b-instruct.json");
/// The chat template of the test fixtures (Qwen3-Omni's style).
const CHAT_TEMPLATE: &str = include_str!("../../../tests/golden/chat_template.jinja");

#[derive(Debug, Clone, Default)]
pub struct RandomCheckpointOptions {
    /// A config.json to take shapes from; the real model's when `None`.
    pub config: Option<PathBuf>,
    pub thinker_layers: Option<usize>,
    pub talker_layers: Option<usize>,
    /// Components to write (`thinker`, `vision`, `audio`, `talker`, `code2wav`); all when empty.
    pub only: Vec<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RandomCheckpointSummary {
    pub dir: PathBuf,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    /// Parameters per component.
    pub components: BTreeMap<String, u64>,
}

fn us(v: &Json, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Json::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("config: `{key}` is missing"))
}

fn us_or(v: &Json, key: &str, default: usize) -> usize {
    v.get(key)
        .and_then(Json::as_u64)
        .map(|x| x as usize)
        .unwrap_or(default)
}

type Shapes = Vec<(String, Vec<usize>)>;

fn push(t: &mut Shapes, name: String, shape: &[usize]) {
    t.push((name, shape.to_vec()));
}

/// A decoder layer (`Qwen3OmniMoe*DecoderLayer`): attention with q/k norm, sparse MoE (with an
/// optional shared expert) or a dense MLP.
fn decoder_layer(t: &mut Shapes, p: &str, c: &Json, sparse: bool) -> Result<()> {
    let h = us(c, "hidden_size")?;
    let heads = us(c, "num_attention_heads")?;
    let kv = us_or(c, "num_key_value_heads", heads);
    let hd = us_or(c, "head_dim", h / heads);
    let bias = c
        .get("attention_bias")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    push(t, format!("{p}.input_layernorm.weight"), &[h]);
    push(t, format!("{p}.post_attention_layernorm.weight"), &[h]);
    for (proj, out, inp) in [
        ("q_proj", heads * hd, h),
        ("k_proj", kv * hd, h),
        ("v_proj", kv * hd, h),
        ("o_proj", h, heads * hd),
    ] {
        push(t, format!("{p}.self_attn.{proj}.weight"), &[out, inp]);
        if bias {
            push(t, format!("{p}.self_attn.{proj}.bias"), &[out]);
        }
    }
    push(t, format!("{p}.self_attn.q_norm.weight"), &[hd]);
    push(t, format!("{p}.self_attn.k_norm.weight"), &[hd]);
    if sparse {
        let e = us(c, "num_experts")?;
        let i = us(c, "moe_intermediate_size")?;
        push(t, format!("{p}.mlp.gate.weight"), &[e, h]);
        for x in 0..e {
            push(t, format!("{p}.mlp.experts.{x}.gate_proj.weight"), &[i, h]);
            push(t, format!("{p}.mlp.experts.{x}.up_proj.weight"), &[i, h]);
            push(t, format!("{p}.mlp.experts.{x}.down_proj.weight"), &[h, i]);
        }
        let s = us_or(c, "shared_expert_intermediate_size", 0);
        if s > 0 {
            push(
                t,
                format!("{p}.mlp.shared_expert.gate_proj.weight"),
                &[s, h],
            );
            push(t, format!("{p}.mlp.shared_expert.up_proj.weight"), &[s, h]);
            push(
                t,
                format!("{p}.mlp.shared_expert.down_proj.weight"),
                &[h, s],
            );
            push(t, format!("{p}.mlp.shared_expert_gate.weight"), &[1, h]);
        }
    } else {
        let i = us(c, "intermediate_size")?;
        push(t, format!("{p}.mlp.gate_proj.weight"), &[i, h]);
        push(t, format!("{p}.mlp.up_proj.weight"), &[i, h]);
        push(t, format!("{p}.mlp.down_proj.weight"), &[h, i]);
    }
    Ok(())
}

fn is_sparse(c: &Json, layer: usize) -> bool {
    let only: Vec<u64> = c
        .get("mlp_only_layers")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_u64).collect())
        .unwrap_or_default();
    let step = us_or(c, "decoder_sparse_step", 1);
    !only.contains(&(layer as u64))
        && us_or(c, "num_experts", 0) > 0
        && step > 0
        && (layer + 1) % step == 0
}

/// Names and shapes of every checkpoint tensor of `component` for `cfg`, in checkpoint layout.
pub fn component_tensors(cfg: &Json, component: Component) -> Result<Shapes> {
    let mut t = Shapes::new();
    match component {
        Component::Thinker => {
            let c = cfg
                .pointer("/thinker_config/text_config")
                .context("config: thinker_config.text_config")?;
            let (v, h) = (us(c, "vocab_size")?, us(c, "hidden_size")?);
            push(&mut t, "thinker.model.embed_tokens.weight".into(), &[v, h]);
            for l in 0..us(c, "num_hidden_layers")? {
                decoder_layer(
                    &mut t,
                    &format!("thinker.model.layers.{l}"),
                    c,
                    is_sparse(c, l),
                )?;
            }
            push(&mut t, "thinker.model.norm.weight".into(), &[h]);
            push(&mut t, "thinker.lm_head.weight".into(), &[v, h]);
        }
        Component::Vision => {
            let Some(c) = cfg.pointer("/thinker_config/vision_config") else {
                return Ok(t);
            };
            let h = us(c, "hidden_size")?;
            let inter = us(c, "intermediate_size")?;
            let merge = us_or(c, "spatial_merge_size", 2);
            let merged = h * merge * merge;
            let out = us(c, "out_hidden_size")?;
            let (ch, tp, ps) = (
                us_or(c, "in_channels", 3),
                us_or(c, "temporal_patch_size", 2),
                us(c, "patch_size")?,
            );
            let p = "thinker.visual";
            push(
                &mut t,
                format!("{p}.patch_embed.proj.weight"),
                &[h, ch, tp, ps, ps],
            );
            push(&mut t, format!("{p}.patch_embed.proj.bias"), &[h]);
            push(
                &mut t,
                format!("{p}.pos_embed.weight"),
                &[us(c, "num_position_embeddings")?, h],
            );
            for b in 0..us(c, "depth")? {
                let bp = format!("{p}.blocks.{b}");
                for (n, s) in [("norm1", h), ("norm2", h)] {
                    push(&mut t, format!("{bp}.{n}.weight"), &[s]);
                    push(&mut t, format!("{bp}.{n}.bias"), &[s]);
                }
                for (n, o, i) in [
                    ("attn.qkv", 3 * h, h),
                    ("attn.proj", h, h),
                    ("mlp.linear_fc1", inter, h),
                    ("mlp.linear_fc2", h, inter),
                ] {
                    push(&mut t, format!("{bp}.{n}.weight"), &[o, i]);
                    push(&mut t, format!("{bp}.{n}.bias"), &[o]);
                }
            }
            let merger = |t: &mut Shapes, mp: &str, norm: usize| {
                push(t, format!("{mp}.ln_q.weight"), &[norm]);
                push(t, format!("{mp}.ln_q.bias"), &[norm]);
                push(t, format!("{mp}.mlp.0.weight"), &[merged, merged]);
                push(t, format!("{mp}.mlp.0.bias"), &[merged]);
                push(t, format!("{mp}.mlp.2.weight"), &[out, merged]);
                push(t, format!("{mp}.mlp.2.bias"), &[out]);
            };
            merger(&mut t, &format!("{p}.merger"), h);
            let ds = c
                .get("deepstack_visual_indexes")
                .and_then(Json::as_array)
                .map(Vec::len)
                .unwrap_or(0);
            for k in 0..ds {
                merger(&mut t, &format!("{p}.merger_list.{k}"), merged);
            }
        }
        Component::Audio => {
            let Some(c) = cfg.pointer("/thinker_config/audio_config") else {
                return Ok(t);
            };
            let (d, ds, ffn) = (
                us(c, "d_model")?,
                us(c, "downsample_hidden_size")?,
                us(c, "encoder_ffn_dim")?,
            );
            let freq = (((us_or(c, "num_mel_bins", 128) + 1) / 2 + 1) / 2 + 1) / 2;
            let p = "thinker.audio_tower";
            push(&mut t, format!("{p}.conv2d1.weight"), &[ds, 1, 3, 3]);
            push(&mut t, format!("{p}.conv2d1.bias"), &[ds]);
            for k in [2, 3] {
                push(&mut t, format!("{p}.conv2d{k}.weight"), &[ds, ds, 3, 3]);
                push(&mut t, format!("{p}.conv2d{k}.bias"), &[ds]);
            }
            push(&mut t, format!("{p}.conv_out.weight"), &[d, ds * freq]);
            for l in 0..us(c, "encoder_layers")? {
                let lp = format!("{p}.layers.{l}");
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    push(&mut t, format!("{lp}.self_attn.{proj}.weight"), &[d, d]);
                    push(&mut t, format!("{lp}.self_attn.{proj}.bias"), &[d]);
                }
                for n in ["self_attn_layer_norm", "final_layer_norm"] {
                    push(&mut t, format!("{lp}.{n}.weight"), &[d]);
                    push(&mut t, format!("{lp}.{n}.bias"), &[d]);
                }
                push(&mut t, format!("{lp}.fc1.weight"), &[ffn, d]);
                push(&mut t, format!("{lp}.fc1.bias"), &[ffn]);
                push(&mut t, format!("{lp}.fc2.weight"), &[d, ffn]);
                push(&mut t, format!("{lp}.fc2.bias"), &[d]);
            }
            push(&mut t, format!("{p}.ln_post.weight"), &[d]);
            push(&mut t, format!("{p}.ln_post.bias"), &[d]);
            push(&mut t, format!("{p}.proj1.weight"), &[d, d]);
            push(&mut t, format!("{p}.proj1.bias"), &[d]);
            let out = us(c, "output_dim")?;
            push(&mut t, format!("{p}.proj2.weight"), &[out, d]);
            push(&mut t, format!("{p}.proj2.bias"), &[out]);
        }
        Component::Talker => {
            let Some(tc) = cfg.get("talker_config") else {
                return Ok(t);
            };
            let c = tc
                .get("text_config")
                .context("config: talker_config.text_config")?;
            let (v, h, inter) = (
                us(c, "vocab_size")?,
                us(c, "hidden_size")?,
                us(c, "intermediate_size")?,
            );
            let th = us(tc, "thinker_hidden_size")?;
            push(
                &mut t,
                "talker.model.codec_embedding.weight".into(),
                &[v, h],
            );
            for l in 0..us(c, "num_hidden_layers")? {
                decoder_layer(
                    &mut t,
                    &format!("talker.model.layers.{l}"),
                    c,
                    is_sparse(c, l),
                )?;
            }
            push(&mut t, "talker.model.norm.weight".into(), &[h]);
            push(&mut t, "talker.codec_head.weight".into(), &[v, h]);
            for proj in ["text_projection", "hidden_projection"] {
                push(
                    &mut t,
                    format!("talker.{proj}.linear_fc1.weight"),
                    &[inter, th],
                );
                push(&mut t, format!("talker.{proj}.linear_fc1.bias"), &[inter]);
                push(
                    &mut t,
                    format!("talker.{proj}.linear_fc2.weight"),
                    &[h, inter],
                );
                push(&mut t, format!("talker.{proj}.linear_fc2.bias"), &[h]);
            }
            let cp = tc
                .get("code_predictor_config")
                .context("config: talker_config.code_predictor_config")?;
            let (cv, ch) = (us(cp, "vocab_size")?, us(cp, "hidden_size")?);
            let groups = us_or(cp, "num_code_groups", us_or(tc, "num_code_groups", 16));
            for g in 0..groups - 1 {
                push(
                    &mut t,
                    format!("talker.code_predictor.model.codec_embedding.{g}.weight"),
                    &[cv, ch],
                );
                push(
                    &mut t,
                    format!("talker.code_predictor.lm_head.{g}.weight"),
                    &[cv, ch],
                );
            }
            for l in 0..us(cp, "num_hidden_layers")? {
                decoder_layer(
                    &mut t,
                    &format!("talker.code_predictor.model.layers.{l}"),
                    cp,
                    false,
                )?;
            }
            push(
                &mut t,
                "talker.code_predictor.model.norm.weight".into(),
                &[ch],
            );
        }
        Component::Code2Wav => {
            let Some(c) = cfg.get("code2wav_config") else {
                return Ok(t);
            };
            let (h, inter) = (us(c, "hidden_size")?, us(c, "intermediate_size")?);
            let heads = us(c, "num_attention_heads")?;
            let kv = us_or(c, "num_key_value_heads", heads);
            let hd = us_or(c, "head_dim", h / heads);
            let p = "code2wav";
            push(
                &mut t,
                format!("{p}.code_embedding.weight"),
                &[us(c, "codebook_size")? * us(c, "num_quantizers")?, h],
            );
            for l in 0..us(c, "num_hidden_layers")? {
                let lp = format!("{p}.pre_transformer.layers.{l}");
                push(&mut t, format!("{lp}.input_layernorm.weight"), &[h]);
                push(
                    &mut t,
                    format!("{lp}.post_attention_layernorm.weight"),
                    &[h],
                );
                for (proj, o, i) in [
                    ("q_proj", heads * hd, h),
                    ("k_proj", kv * hd, h),
                    ("v_proj", kv * hd, h),
                    ("o_proj", h, heads * hd),
                ] {
                    push(&mut t, format!("{lp}.self_attn.{proj}.weight"), &[o, i]);
                }
                push(&mut t, format!("{lp}.self_attn_layer_scale.scale"), &[h]);
                push(&mut t, format!("{lp}.mlp.gate_proj.weight"), &[inter, h]);
                push(&mut t, format!("{lp}.mlp.up_proj.weight"), &[inter, h]);
                push(&mut t, format!("{lp}.mlp.down_proj.weight"), &[h, inter]);
                push(&mut t, format!("{lp}.mlp_layer_scale.scale"), &[h]);
            }
            push(&mut t, format!("{p}.pre_transformer.norm.weight"), &[h]);
            let ratios: Vec<usize> = c
                .get("upsampling_ratios")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            for (i, r) in ratios.iter().enumerate() {
                let up = format!("{p}.upsample.{i}");
                push(&mut t, format!("{up}.0.conv.weight"), &[h, h, *r]);
                push(&mut t, format!("{up}.0.conv.bias"), &[h]);
                push(&mut t, format!("{up}.1.dwconv.conv.weight"), &[h, 1, 7]);
                push(&mut t, format!("{up}.1.dwconv.conv.bias"), &[h]);
                push(&mut t, format!("{up}.1.norm.weight"), &[h]);
                push(&mut t, format!("{up}.1.norm.bias"), &[h]);
                push(&mut t, format!("{up}.1.pwconv1.weight"), &[4 * h, h]);
                push(&mut t, format!("{up}.1.pwconv1.bias"), &[4 * h]);
                push(&mut t, format!("{up}.1.pwconv2.weight"), &[h, 4 * h]);
                push(&mut t, format!("{up}.1.pwconv2.bias"), &[h]);
                push(&mut t, format!("{up}.1.gamma"), &[h]);
            }
            let dd = us(c, "decoder_dim")?;
            let rates: Vec<usize> = c
                .get("upsample_rates")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Json::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            push(&mut t, format!("{p}.decoder.0.conv.weight"), &[dd, h, 7]);
            push(&mut t, format!("{p}.decoder.0.conv.bias"), &[dd]);
            let mut dim = dd;
            for (i, rate) in rates.iter().enumerate() {
                let (inp, out) = (dim, dim / 2);
                let bp = format!("{p}.decoder.{}.block", i + 1);
                push(&mut t, format!("{bp}.0.alpha"), &[inp]);
                push(&mut t, format!("{bp}.0.beta"), &[inp]);
                push(&mut t, format!("{bp}.1.conv.weight"), &[inp, out, 2 * rate]);
                push(&mut t, format!("{bp}.1.conv.bias"), &[out]);
                for u in 2..5 {
                    push(&mut t, format!("{bp}.{u}.act1.alpha"), &[out]);
                    push(&mut t, format!("{bp}.{u}.act1.beta"), &[out]);
                    push(
                        &mut t,
                        format!("{bp}.{u}.conv1.conv.weight"),
                        &[out, out, 7],
                    );
                    push(&mut t, format!("{bp}.{u}.conv1.conv.bias"), &[out]);
                    push(&mut t, format!("{bp}.{u}.act2.alpha"), &[out]);
                    push(&mut t, format!("{bp}.{u}.act2.beta"), &[out]);
                    push(
                        &mut t,
                        format!("{bp}.{u}.conv2.conv.weight"),
                        &[out, out, 1],
                    );
                    push(&mut t, format!("{bp}.{u}.conv2.conv.bias"), &[out]);
                }
                dim = out;
            }
            let n = rates.len();
            push(&mut t, format!("{p}.decoder.{}.alpha", n + 1), &[dim]);
            push(&mut t, format!("{p}.decoder.{}.beta", n + 1), &[dim]);
            push(
                &mut t,
                format!("{p}.decoder.{}.conv.weight", n + 2),
                &[1, dim, 7],
            );
            push(&mut t, format!("{p}.decoder.{}.conv.bias", n + 2), &[1]);
        }
    }
    Ok(t)
}

/// A small fast generator (xorshift64*), uniform in (-a, a).
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self, a: f32) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545F4914F6CDD1D);
        ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
}

fn fill_tensor(name: &str, n: usize, rng: &mut Rng, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(n * 2);
    let ones = (name.contains("norm") || name.contains("ln_")) && name.ends_with(".weight");
    for _ in 0..n {
        let v = if ones { 1.0 } else { rng.next_f32(0.05) };
        out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
}

/// A byte-level tokenizer whose special tokens take the ids of the real vocabulary.
fn tokenizer_json(cfg: &Json) -> Json {
    // GPT-2's bytes_to_unicode.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut vocab = serde_json::Map::new();
    for (i, c) in cs.iter().enumerate() {
        vocab.insert(char::from_u32(*c).unwrap().to_string(), json!(i));
    }
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ];
    let first = cfg
        .get("im_start_token_id")
        .and_then(Json::as_u64)
        .map(|x| x - 1)
        .unwrap_or(151643);
    let mut added: Vec<Json> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": first + i as u64, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let audio: [(&str, &str); 3] = [
        ("audio_start_token_id", "<|audio_start|>"),
        ("audio_end_token_id", "<|audio_end|>"),
        ("audio_token_id", "<|audio_pad|>"),
    ];
    for (key, content) in audio {
        if let Some(id) = cfg
            .pointer(&format!("/thinker_config/{key}"))
            .and_then(Json::as_u64)
        {
            added.push(json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
    }
    // The role words at their real ids (the Talker finds the assistant turn by them).
    for (key, content) in [
        ("system_token_id", "system"),
        ("user_token_id", "user"),
        ("assistant_token_id", "assistant"),
    ] {
        if let Some(id) = cfg.get(key).and_then(Json::as_u64) {
            added.push(json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
        }
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": super::tokenizer::QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// Writes the checkpoint into `dir` and returns what it holds.
pub fn write_random_checkpoint(
    dir: &Path,
    opts: &RandomCheckpointOptions,
    progress: &mut dyn QuantizeProgress,
) -> Result<RandomCheckpointSummary> {
    let text = match &opts.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => REAL_CONFIG.to_string(),
    };
    let mut cfg: Json = serde_json::from_str(&text)?;
    if let Some(n) = opts.thinker_layers {
        cfg["thinker_config"]["text_config"]["num_hidden_layers"] = json!(n);
    }
    if let Some(n) = opts.talker_layers {
        cfg["talker_config"]["text_config"]["num_hidden_layers"] = json!(n);
        let accept = cfg["talker_config"]["accept_hidden_layer"]
            .as_u64()
            .unwrap_or(0);
        let thinker_layers = cfg["thinker_config"]["text_config"]["num_hidden_layers"]
            .as_u64()
            .unwrap_or(0);
        cfg["talker_config"]["accept_hidden_layer"] = json!(accept.min(thinker_layers));
    }
    let components: Vec<Component> = if opts.only.is_empty() {
        Component::ALL.to_vec()
    } else {
        opts.only
            .iter()
            .map(|s| {
                Component::ALL
                    .iter()
                    .copied()
                    .find(|c| c.name() == s)
                    .with_context(|| format!("unknown component {s:?}"))
            })
            .collect::<Result<_>>()?
    };
    let mut tensors = Shapes::new();
    let mut per_component = BTreeMap::new();
    for c in &components {
        let t = component_tensors(&cfg, *c)?;
        per_component.insert(
            c.name().to_string(),
            t.iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum(),
        );
        tensors.extend(t);
    }
    if tensors.is_empty() {
        bail!("nothing to write");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Shards of at most ~4 GB, in order.
    const SHARD: usize = 4 << 30;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (i, (_, s)) in tensors.iter().enumerate() {
        let bytes = s.iter().product::<usize>() * 2;
        if size > 0 && size + bytes > SHARD {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes;
    }
    let total_bytes: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
        .sum();
    progress.start("random checkpoint", total_bytes);
    let mut rng = Rng(0x9E3779B97F4A7C15 ^ opts.seed.wrapping_mul(0x100000001B3) | 1);
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    let mut buf = Vec::new();
    let n_shards = shards.len();
    for (si, shard) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards);
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for &i in shard {
            let (name, shape) = &tensors[i];
            let len = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            weight_map.insert(name.clone(), json!(file_name));
            offset += len;
        }
        let mut h = serde_json::to_vec(&Json::Object(header))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = dir.join(&file_name);
        let tmp = dir.join(format!(".{file_name}.partial"));
        let mut w = BufWriter::with_capacity(
            1 << 22,
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for &i in shard {
            if super::quantize::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                drop(w);
                let _ = std::fs::remove_file(&tmp);
                bail!("interrupted");
            }
            let (name, shape) = &tensors[i];
            fill_tensor(name, shape.iter().product(), &mut rng, &mut buf);
            w.write_all(&buf)?;
            done += buf.len() as u64;
            progress.advance(done);
        }
        w.flush()?;
        drop(w);
        std::fs::rename(&tmp, &path)?;
    }
    progress.finish();
    let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let im_end = cfg
        .get("im_end_token_id")
        .and_then(Json::as_u64)
        .unwrap_or(151645);
    let gen = json!({"bos_token_id": im_end - 2, "eos_token_id": [im_end, im_end - 2], "pad_token_id": im_end - 2,
                     "do_sample": true, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05});
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?,
    )?;
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer_json(&cfg))?,
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(
            &json!({"add_bos_token": false, "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
        )?,
    )?;
    std::fs::write(dir.join("chat_template.jinja"), CHAT_TEMPLATE)?;
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(
            &json!({"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
            "padding_value": 0.0, "dither": 0.0, "return_attention_mask": true, "padding_side": "right",
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
        )?,
    )?;
    Ok(RandomCheckpointSummary {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        parameters: per_component.values().sum(),
        bytes: total_bytes,
        components: per_component,
    })
}
