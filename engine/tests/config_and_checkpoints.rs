//! config.json of the real model (all spellings and variants) and what happens with broken checkpoints.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use omni_engine::config::OmniConfig;
use omni_engine::pipeline::{NoProgress, OmniModel};

use common::fixture;

fn real_config(file: &str) -> OmniConfig {
    OmniConfig::from_file(&fixture("configs").join(file)).unwrap()
}

#[test]
fn real_instruct_config_parses_in_both_spellings() {
    for file in ["qwen3-omni-30b-a3b-instruct.json", "qwen3-omni-30b-a3b-instruct.v5.json"] {
        let cfg = real_config(file);
        let t = &cfg.thinker_config.text_config;
        assert_eq!(t.num_hidden_layers, 48, "{file}");
        assert_eq!(t.hidden_size, 2048);
        assert_eq!((t.num_attention_heads, t.num_key_value_heads, t.head_dim()), (32, 4, 128));
        assert_eq!((t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size), (128, 8, 768));
        assert_eq!(t.vocab_size, 152064);
        assert!(t.norm_topk_prob);
        let rope = t.rope().unwrap();
        assert_eq!(rope.theta, 1e6, "{file}");
        assert_eq!(rope.mrope_section, vec![24, 20, 20], "{file}");
        assert!(rope.interleaved, "{file}");
        let audio = cfg.thinker_config.audio_config.as_ref().unwrap();
        assert_eq!((audio.encoder_layers, audio.d_model, audio.n_window, audio.n_window_infer), (32, 1280, 50, 800));
        let vision = cfg.thinker_config.vision_config.as_ref().unwrap();
        assert_eq!(vision.deepstack_visual_indexes, vec![8, 16, 24]);
        assert!(cfg.has_talker());
        let talker = cfg.talker_config.as_ref().unwrap();
        assert_eq!(talker.text_config.num_hidden_layers, 20);
        assert_eq!(talker.text_config.hidden_size, 1024);
        assert_eq!((talker.text_config.num_experts, talker.text_config.num_experts_per_tok), (128, 6));
        assert_eq!(talker.text_config.shared_expert_intermediate_size, 768);
        assert_eq!(talker.accept_hidden_layer, 24);
        assert_eq!(talker.num_code_groups, 16);
        assert_eq!(talker.code_predictor_config.num_hidden_layers, 5);
        assert_eq!((talker.codec_pad_id, talker.codec_bos_id, talker.codec_eos_token_id), (2148, 2149, 2150));
        let speakers = talker.speaker_id.as_ref().unwrap();
        assert_eq!(speakers["ethan"], 2302);
        assert_eq!(speakers["chelsie"], 2301);
        assert_eq!(speakers["aiden"], 2303);
        let c2w = cfg.code2wav_config.as_ref().unwrap();
        assert_eq!((c2w.num_hidden_layers, c2w.hidden_size, c2w.num_quantizers, c2w.decoder_dim), (8, 1024, 16, 1536));
        assert_eq!(c2w.upsample_rates, vec![8, 5, 4, 3]);
        assert_eq!(c2w.upsampling_ratios, vec![2, 2]);
        assert_eq!(c2w.samples_per_frame(), 1920);
        assert_eq!((cfg.tts_pad_token_id, cfg.tts_bos_token_id, cfg.tts_eos_token_id), (Some(151671), Some(151672), Some(151673)));
        assert_eq!((cfg.im_start_token_id, cfg.im_end_token_id), (Some(151644), Some(151645)));
    }
}

#[test]
fn thinking_and_captioner_configs_have_no_talker() {
    for file in ["qwen3-omni-30b-a3b-thinking.json", "qwen3-omni-30b-a3b-captioner.json"] {
        let cfg = real_config(file);
        assert!(!cfg.has_talker(), "{file}");
        assert_eq!(cfg.thinker_config.text_config.num_hidden_layers, 48);
    }
}

#[test]
fn a_bad_config_is_an_error_naming_the_field() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("configs/qwen3-omni-30b-a3b-instruct.json")).unwrap())
            .unwrap();
    json["thinker_config"]["text_config"]["rope_scaling"]["mrope_section"] = serde_json::json!([24, 20, 21]);
    let err = OmniConfig::from_json_str(&json.to_string()).unwrap_err();
    assert!(format!("{err:#}").contains("mrope_section"), "{err:#}");
    json["thinker_config"]["text_config"].as_object_mut().unwrap().remove("hidden_size");
    let err = OmniConfig::from_json_str(&json.to_string()).unwrap_err();
    assert!(format!("{err:#}").contains("hidden_size"), "{err:#}");
}

/// Copies the tiny-a checkpoint to a temp dir with its tensors edited by `edit`, as one safetensors file.
fn broken_checkpoint(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = fixture("tiny-a");
    let dir = tempfile::Builder::new().prefix("omni-broken").tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path.is_file() && !name.starts_with("model") {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let files: Vec<_> = omni_engine::weights::checkpoint_files(&src).unwrap();
    let st = unsafe { MmapedSafetensors::multi(&files) }.unwrap();
    let mut tensors: HashMap<String, Tensor> =
        st.tensors().into_iter().map(|(n, _)| (n.clone(), st.load(&n, &Device::Cpu).unwrap())).collect();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match OmniModel::load(dir, &mut NoProgress) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let name = "thinker.model.layers.1.self_attn.k_norm.weight";
    let dir = broken_checkpoint(|t| {
        t.remove(name);
    });
    let err = load_error(dir.path());
    assert!(err.contains(name) && err.contains("missing"), "{err}");
}

#[test]
fn a_misshaped_tensor_is_named_with_both_shapes() {
    let name = "thinker.model.layers.0.mlp.experts.3.up_proj.weight";
    let dir = broken_checkpoint(|t| {
        let w = t[name].clone();
        t.insert(name.to_string(), w.t().unwrap().contiguous().unwrap());
    });
    let err = load_error(dir.path());
    assert!(err.contains(name) && err.contains("[64, 32]") && err.contains("[32, 64]"), "{err}");
}

#[test]
fn an_unexpected_thinker_tensor_is_reported() {
    let dir = broken_checkpoint(|t| {
        let extra = t["thinker.model.norm.weight"].clone();
        t.insert("thinker.model.layers.0.self_attn.extra_norm.weight".to_string(), extra);
    });
    let err = load_error(dir.path());
    assert!(err.contains("thinker.model.layers.0.self_attn.extra_norm.weight"), "{err}");
}

#[test]
fn a_missing_model_dir_and_missing_weights_are_clear_errors() {
    let err = load_error(Path::new("/nonexistent/omni-model"));
    assert!(err.contains("/nonexistent/omni-model"), "{err}");
    let dir = tempfile::Builder::new().prefix("omni-empty").tempdir().unwrap();
    std::fs::copy(fixture("tiny-a/config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(fixture("tiny-a/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::copy(fixture("tiny-a/chat_template.json"), dir.path().join("chat_template.json")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}
