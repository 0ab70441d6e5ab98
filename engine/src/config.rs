//! `config.json` of a Qwen3-Omni checkpoint, deserialized as it is.
//!
//! Mirrors `transformers/models/qwen3_omni_moe/configuration_qwen3_omni_moe.py`. The real checkpoint
//! nests `thinker_config {text_config, audio_config, vision_config}`, `talker_config {text_config,
//! code_predictor_config}` and `code2wav_config`; the Thinking and Captioner variants carry no talker.
//! Two spellings of the rotary settings occur in the wild: the hub's `rope_scaling` + `rope_theta`
//! (transformers 4.57) and transformers 5's `rope_parameters`; both are read.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// The whole checkpoint configuration (`Qwen3OmniMoeConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct OmniConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub thinker_config: ThinkerConfig,
    #[serde(default)]
    pub talker_config: Option<TalkerConfig>,
    #[serde(default)]
    pub code2wav_config: Option<Code2WavConfig>,
    #[serde(default)]
    pub enable_audio_output: Option<bool>,
    #[serde(default)]
    pub im_start_token_id: Option<u32>,
    #[serde(default)]
    pub im_end_token_id: Option<u32>,
    #[serde(default)]
    pub tts_pad_token_id: Option<u32>,
    #[serde(default)]
    pub tts_bos_token_id: Option<u32>,
    #[serde(default)]
    pub tts_eos_token_id: Option<u32>,
    #[serde(default)]
    pub system_token_id: Option<u32>,
    #[serde(default)]
    pub user_token_id: Option<u32>,
    #[serde(default)]
    pub assistant_token_id: Option<u32>,
}

impl OmniConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether this checkpoint can speak (Instruct); Thinking and Captioner cannot.
    pub fn has_talker(&self) -> bool {
        self.enable_audio_output.unwrap_or(self.talker_config.is_some()) && self.talker_config.is_some()
    }

    fn validate(&self) -> Result<()> {
        let t = &self.thinker_config.text_config;
        t.rope().context("thinker_config.text_config")?;
        if t.num_attention_heads == 0 || t.num_key_value_heads == 0 {
            bail!("thinker_config.text_config: attention head counts must be positive");
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            bail!(
                "thinker_config.text_config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads,
                t.num_key_value_heads
            );
        }
        let rope = t.rope()?;
        let half = t.head_dim() / 2;
        let sections: usize = rope.mrope_section.iter().sum();
        if !rope.mrope_section.is_empty() && sections != half {
            bail!(
                "thinker_config.text_config: mrope_section {:?} sums to {sections}, expected head_dim/2 = {half}",
                rope.mrope_section
            );
        }
        if t.num_experts > 0 && t.num_experts_per_tok > t.num_experts {
            bail!(
                "thinker_config.text_config: num_experts_per_tok {} exceeds num_experts {}",
                t.num_experts_per_tok,
                t.num_experts
            );
        }
        if let Some(talker) = &self.talker_config {
            talker.text_config.rope().context("talker_config.text_config")?;
        }
        Ok(())
    }
}

/// Rotary settings, whichever spelling the file used.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSettings {
    pub theta: f64,
    /// Frequencies per stream (temporal, height, width); empty for plain 1-D RoPE.
    pub mrope_section: Vec<usize>,
    pub interleaved: bool,
}

/// The raw rotary fields of a sub-config; resolved by [`RopeFields::resolve`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
}

impl RopeFields {
    pub fn resolve(&self, default_theta: f64) -> Result<RopeSettings> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let obj = match params {
            Some(Value::Object(map)) => Some(map),
            Some(Value::Null) | None => None,
            Some(other) => bail!("rope settings must be an object, found {other}"),
        };
        if let Some(map) = obj {
            if let Some(kind) = map.get("rope_type").or_else(|| map.get("type")).and_then(Value::as_str) {
                if kind != "default" && kind != "mrope" {
                    bail!("unsupported rope_type {kind:?} (only the default rotary embedding is implemented)");
                }
            }
        }
        let theta = obj
            .and_then(|m| m.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(default_theta);
        let mrope_section = match obj.and_then(|m| m.get("mrope_section")) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize).context("mrope_section entries must be integers"))
                .collect::<Result<Vec<_>>>()?,
            Some(_) => bail!("mrope_section must be a list of integers"),
            None => Vec::new(),
        };
        let interleaved = obj
            .map(|m| {
                m.get("mrope_interleaved").or_else(|| m.get("interleaved")).and_then(Value::as_bool).unwrap_or(false)
            })
            .unwrap_or(false);
        Ok(RopeSettings { theta, mrope_section, interleaved })
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// `thinker_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct ThinkerConfig {
    pub text_config: TextConfig,
    #[serde(default)]
    pub audio_config: Option<AudioEncoderConfig>,
    #[serde(default)]
    pub vision_config: Option<VisionEncoderConfig>,
    #[serde(default)]
    pub audio_token_id: Option<u32>,
    #[serde(default)]
    pub image_token_id: Option<u32>,
    #[serde(default)]
    pub video_token_id: Option<u32>,
    #[serde(default)]
    pub audio_start_token_id: Option<u32>,
    #[serde(default)]
    pub audio_end_token_id: Option<u32>,
    #[serde(default)]
    pub vision_start_token_id: Option<u32>,
    #[serde(default)]
    pub vision_end_token_id: Option<u32>,
    #[serde(default)]
    pub position_id_per_seconds: Option<f64>,
    #[serde(default)]
    pub seconds_per_chunk: Option<f64>,
    #[serde(default)]
    pub user_token_id: Option<u32>,
}

/// `thinker_config.text_config` (`Qwen3OmniMoeTextConfig`): the MoE decoder.
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    #[serde(default)]
    pub intermediate_size: usize,
    #[serde(default)]
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, alias = "num_local_experts")]
    pub num_experts: usize,
    #[serde(default)]
    pub num_experts_per_tok: usize,
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    #[serde(default = "default_one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(flatten)]
    pub rope_fields: RopeFields,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope(&self) -> Result<RopeSettings> {
        self.rope_fields.resolve(10000.0)
    }

    /// Whether decoder layer `layer` uses the sparse MoE block (else the dense MLP), as the reference's
    /// `Qwen3OmniMoeThinkerTextDecoderLayer.__init__` decides.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (layer + 1) % self.decoder_sparse_step == 0
    }
}

/// `thinker_config.audio_config` (`Qwen3OmniMoeAudioEncoderConfig`, the AuT encoder).
#[derive(Debug, Clone, Deserialize)]
pub struct AudioEncoderConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub output_dim: usize,
    pub n_window: usize,
    pub n_window_infer: usize,
    pub downsample_hidden_size: usize,
    #[serde(default)]
    pub max_source_positions: Option<usize>,
    #[serde(default)]
    pub conv_chunksize: Option<usize>,
    #[serde(default)]
    pub activation_function: Option<String>,
}

/// `thinker_config.vision_config` (`Qwen3OmniMoeVisionEncoderConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionEncoderConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub out_hidden_size: usize,
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
    pub num_position_embeddings: usize,
    #[serde(default)]
    pub in_channels: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

/// `talker_config` (`Qwen3OmniMoeTalkerConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct TalkerConfig {
    pub text_config: TextConfig,
    pub code_predictor_config: CodePredictorConfig,
    pub accept_hidden_layer: usize,
    pub num_code_groups: usize,
    pub thinker_hidden_size: usize,
    pub codec_pad_id: u32,
    pub codec_bos_id: u32,
    pub codec_eos_token_id: u32,
    pub codec_nothink_id: u32,
    pub codec_think_bos_id: u32,
    pub codec_think_eos_id: u32,
    #[serde(default)]
    pub speaker_id: Option<BTreeMap<String, u32>>,
    #[serde(default)]
    pub spatial_merge_size: Option<usize>,
    #[serde(default)]
    pub position_id_per_seconds: Option<f64>,
    #[serde(default)]
    pub seconds_per_chunk: Option<f64>,
    #[serde(default)]
    pub audio_token_id: Option<u32>,
    #[serde(default)]
    pub image_token_id: Option<u32>,
    #[serde(default)]
    pub video_token_id: Option<u32>,
    #[serde(default)]
    pub audio_start_token_id: Option<u32>,
    #[serde(default)]
    pub vision_start_token_id: Option<u32>,
}

/// `talker_config.code_predictor_config`: the dense 5-layer MTP that fills codebooks 1..16.
#[derive(Debug, Clone, Deserialize)]
pub struct CodePredictorConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub num_code_groups: Option<usize>,
    #[serde(flatten)]
    pub rope_fields: RopeFields,
}

/// `code2wav_config` (`Qwen3OmniMoeCode2WavConfig`): the causal vocoder.
#[derive(Debug, Clone, Deserialize)]
pub struct Code2WavConfig {
    pub codebook_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    pub num_quantizers: usize,
    pub sliding_window: usize,
    pub upsample_rates: Vec<usize>,
    pub upsampling_ratios: Vec<usize>,
    pub decoder_dim: usize,
    #[serde(default)]
    pub layer_scale_initial_scale: Option<f64>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(flatten)]
    pub rope_fields: RopeFields,
}

impl Code2WavConfig {
    /// Output samples per codec frame: the product of every upsampling factor (1920 for the real model).
    pub fn samples_per_frame(&self) -> usize {
        self.upsample_rates.iter().chain(&self.upsampling_ratios).product()
    }
}

/// `generation_config.json`: the stop ids and default sampling of the checkpoint.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
}

impl GenerationDefaults {
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg = serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        Ok(Some(cfg))
    }

    /// The eos ids, whether the file stores one integer or a list.
    pub fn eos_ids(&self) -> Result<Vec<u32>> {
        match &self.eos_token_id {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Number(n)) => Ok(vec![n.as_u64().context("eos_token_id must be a token id")? as u32]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).context("eos_token_id entries must be token ids"))
                .collect(),
            Some(other) => bail!("eos_token_id must be an id or a list of ids, found {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_from_hub_and_v5_spellings_agree() {
        let hub: RopeFields = serde_json::from_str(
            r#"{"rope_theta": 1000000, "rope_scaling": {"interleaved": true, "mrope_interleaved": true,
                "mrope_section": [24, 20, 20], "rope_type": "default", "type": "default"}}"#,
        )
        .unwrap();
        let v5: RopeFields = serde_json::from_str(
            r#"{"rope_parameters": {"mrope_interleaved": true, "mrope_section": [24, 20, 20],
                "rope_theta": 1000000, "rope_type": "default"}}"#,
        )
        .unwrap();
        let expected = RopeSettings { theta: 1e6, mrope_section: vec![24, 20, 20], interleaved: true };
        assert_eq!(hub.resolve(1e4).unwrap(), expected);
        assert_eq!(v5.resolve(1e4).unwrap(), expected);
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let yarn: RopeFields =
            serde_json::from_str(r#"{"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}"#).unwrap();
        let err = yarn.resolve(1e4).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn sparse_layer_rule_follows_the_reference() {
        let mut cfg: TextConfig = serde_json::from_str(
            r#"{"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 4, "num_attention_heads": 1,
                "num_key_value_heads": 1, "num_experts": 2, "num_experts_per_tok": 1,
                "decoder_sparse_step": 2, "mlp_only_layers": [3]}"#,
        )
        .unwrap();
        let sparse: Vec<bool> = (0..4).map(|l| cfg.is_sparse_layer(l)).collect();
        assert_eq!(sparse, vec![false, true, false, false]);
        cfg.num_experts = 0;
        assert!(!cfg.is_sparse_layer(1));
    }
}
