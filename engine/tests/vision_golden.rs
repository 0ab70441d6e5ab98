//! Images in the prompt against transformers 5.24 (goldens: tests/golden/make_vision_fixtures.py):
//! the image processor's pixels, the vision tower with its deepstack features, placeholder expansion,
//! M-RoPE positions, prompt logits and greedy tokens, for image and audio+image prompts.

mod common;

use std::path::PathBuf;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use omni_engine::audio::load_audio_16k_mono;
use omni_engine::chat::user_turn;
use omni_engine::generation::{Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{MultimodalPrompt, NoProgress, OmniModel};
use omni_engine::vision::{load_image, preprocess, ImagePixels};
use serde::Deserialize;

use common::{fixture, max_relative_error, TINY_MODELS};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    tower: Tower,
    image_sensitivity: f64,
}

#[derive(Deserialize)]
struct Tower {
    images: Vec<String>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    images: Vec<String>,
    clips: Vec<String>,
    question: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    max_new_tokens: usize,
}

fn repo(path: &str) -> PathBuf {
    fixture("../..").join(path)
}

fn load(name: &str) -> (OmniModel, Golden, MmapedSafetensors) {
    let dir = fixture(name);
    let model = OmniModel::load(&dir, &mut NoProgress).unwrap();
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden/vision.json")).unwrap()).unwrap();
    let tensors = unsafe { MmapedSafetensors::new(dir.join("golden/vision.safetensors")) }.unwrap();
    (model, golden, tensors)
}

fn pixels_golden() -> MmapedSafetensors {
    unsafe { MmapedSafetensors::new(fixture("images/pixels.safetensors")) }.unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn image_pixels(model: &OmniModel, file: &str) -> ImagePixels {
    let front = model.vision.as_ref().expect("tiny fixtures have a vision tower");
    preprocess(&load_image(&fixture("images").join(file)).unwrap(), &front.processor).unwrap()
}

fn prepare(model: &OmniModel, case: &Case) -> MultimodalPrompt {
    let clips: Vec<Vec<f32>> = case.clips.iter().map(|c| load_audio_16k_mono(&repo(c)).unwrap().samples).collect();
    let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let paths: Vec<PathBuf> = case.images.iter().map(|i| repo(i)).collect();
    let images = model.load_images(&paths).unwrap();
    let names = |v: &[String]| v.iter().map(|s| s.rsplit('/').next().unwrap().to_string()).collect::<Vec<_>>();
    let messages = vec![user_turn(&names(&case.clips), &names(&case.images), &[], Some(&case.question))];
    model.prepare_multimodal(&messages, &refs, &images).unwrap()
}

#[test]
fn pixels_equal_the_image_processor() {
    let golden = pixels_golden();
    for name in TINY_MODELS {
        let (model, ..) = load(name);
        for file in ["square_64.png", "wide_96x64.png", "resize_50x70.png"] {
            let px = image_pixels(&model, file);
            let grid = golden.load(&format!("grid.{file}"), &Device::Cpu).unwrap().to_vec2::<i64>().unwrap();
            let want_grid: Vec<usize> = grid[0].iter().map(|&g| g as usize).collect();
            assert_eq!(px.grid_thw.to_vec(), want_grid, "{name}/{file}: grid");
            let Ok(want) = golden.load(&format!("pixels.{file}"), &Device::Cpu) else { continue };
            let err = max_abs(&px.pixel_values, &flat(&want));
            eprintln!("{name}/{file}: pixel_values max abs error {err:.2e}");
            // Also for the resized image: torchvision's uint8 bicubic + antialias kernel is integer math.
            assert!(err < 1e-5, "{name}/{file}: pixels max abs error {err:.2e}");
        }
    }
}

#[test]
fn vision_tower_and_deepstack_match_the_reference() {
    for name in TINY_MODELS {
        let (model, golden, t) = load(name);
        let front = model.vision.as_ref().unwrap();
        let images: Vec<ImagePixels> = golden.tower.images.iter().map(|f| image_pixels(&model, f)).collect();
        let out = front.encoder.forward(&images).unwrap();
        let want_grid = t.load("tower.grid_thw", &Device::Cpu).unwrap().to_vec2::<i64>().unwrap();
        for (img, g) in images.iter().zip(&want_grid) {
            assert_eq!(img.grid_thw.iter().map(|&x| x as i64).collect::<Vec<_>>(), *g);
        }
        let err = max_relative_error(&flat(&out.embeddings), &flat(&t.load("tower.merged", &Device::Cpu).unwrap()));
        eprintln!("{name}: vision tower (merger) max relative error {err:.2e}");
        assert!(err < 1e-3, "{name}: vision tower max relative error {err:.2e}");
        let levels = model.config.thinker_config.vision_config.as_ref().unwrap().deepstack_visual_indexes.len();
        assert_eq!(out.deepstack.len(), levels);
        for (i, level) in out.deepstack.iter().enumerate() {
            let want = t.load(&format!("tower.deepstack.{i}"), &Device::Cpu).unwrap();
            let err = max_relative_error(&flat(level), &flat(&want));
            eprintln!("{name}: deepstack level {i} max relative error {err:.2e}");
            assert!(err < 1e-3, "{name}: deepstack level {i} max relative error {err:.2e}");
        }
        assert_eq!(out.per_image, vec![4, 6]);
    }
}

#[test]
fn a_different_image_changes_the_tower_output() {
    // Guard against fixtures that cannot fail: the mirrored image (same grid) encodes differently.
    for name in TINY_MODELS {
        let (model, golden, _) = load(name);
        let front = model.vision.as_ref().unwrap();
        let img = load_image(&fixture("images/square_64.png")).unwrap();
        let a = front.encoder.forward(&[preprocess(&img, &front.processor).unwrap()]).unwrap();
        let b = front.encoder.forward(&[preprocess(&img.mirrored(), &front.processor).unwrap()]).unwrap();
        let (a, b) = (flat(&a.embeddings), flat(&b.embeddings));
        let change = (a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>()
            / a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
        .sqrt();
        eprintln!(
            "{name}: mirrored image changes the tower output by {change:.3} (reference {:.3})",
            golden.image_sensitivity
        );
        assert!(change > 0.1, "{name}: the tower barely sees the image ({change:.3})");
        assert!(
            (change - golden.image_sensitivity).abs() < 1e-3,
            "{name}: sensitivity {change} vs {}",
            golden.image_sensitivity
        );
    }
}

#[test]
fn image_prompts_ids_positions_and_logits_match() {
    for name in TINY_MODELS {
        let (model, golden, t) = load(name);
        for case in &golden.cases {
            let prompt = prepare(&model, case);
            let p = &prompt.prompt;
            assert_eq!(p.ids, case.prompt_ids, "{name}/{}: prompt ids", case.name);
            let pos = t.load(&format!("{}.position_ids", case.name), &Device::Cpu).unwrap().to_vec2::<i64>().unwrap();
            for s in 0..3 {
                assert_eq!(p.positions[s], pos[s], "{name}/{}: position stream {s}", case.name);
            }
            let mut cache = model.thinker.new_cache();
            let step = model
                .thinker
                .forward_with_deepstack(&p.embeds, &p.positions, &mut cache, &[], prompt.deepstack.as_ref())
                .unwrap();
            let logits = model.thinker.logits(&step.hidden).unwrap().squeeze(0).unwrap();
            let want = t.load(&format!("{}.prompt_logits_tail", case.name), &Device::Cpu).unwrap();
            let tail = want.dim(0).unwrap();
            let got = logits.narrow(0, logits.dim(0).unwrap() - tail, tail).unwrap();
            let err = max_relative_error(&flat(&got), &flat(&want));
            eprintln!("{name}/{}: prompt logits max relative error {err:.2e}", case.name);
            assert!(err < 1e-3, "{name}/{}: prompt logits max relative error {err:.2e}", case.name);
            // Without deepstack the logits are measurably different: the injection is exercised.
            let mut cache = model.thinker.new_cache();
            let plain = model.thinker.forward(&p.embeds, &p.positions, &mut cache, &[]).unwrap();
            let plain = model.thinker.logits(&plain.hidden).unwrap().squeeze(0).unwrap();
            let plain = plain.narrow(0, plain.dim(0).unwrap() - tail, tail).unwrap();
            assert!(
                max_relative_error(&flat(&plain), &flat(&want)) > 1e-3,
                "{name}/{}: deepstack has no effect",
                case.name
            );
        }
    }
}

#[test]
fn greedy_generation_with_images_is_token_identical() {
    for name in TINY_MODELS {
        let (model, golden, _) = load(name);
        for case in &golden.cases {
            let prompt = prepare(&model, case);
            let stop = StopRule { eos_ids: model.eos_ids().unwrap(), max_new_tokens: case.max_new_tokens };
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let out = model.generate(&prompt, &mut sampler, &stop, |_| Ok(true)).unwrap();
            assert!(!case.greedy_ids.is_empty());
            assert_eq!(out.token_ids, case.greedy_ids, "{name}/{}: greedy tokens differ", case.name);
        }
    }
}

#[test]
fn bad_image_files_are_clear_errors() {
    let (model, ..) = load("tiny-a");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not_an_image.png");
    std::fs::write(&bad, b"this is not a PNG").unwrap();
    let err = format!("{:#}", model.load_images(std::slice::from_ref(&bad)).unwrap_err());
    assert!(err.contains("not_an_image.png"), "{err}");
    let missing = dir.path().join("missing.jpg");
    let err = format!("{:#}", model.load_images(std::slice::from_ref(&missing)).unwrap_err());
    assert!(err.contains("missing.jpg"), "{err}");
    // An image item without pixels is refused, not silently left as a placeholder.
    let messages = vec![user_turn(&[], &["x.png".into()], &[], Some("What is this?"))];
    assert!(model.prepare(&messages, &[]).is_err());
}

#[test]
fn omni_run_with_an_image_gives_the_reference_tokens() {
    for name in TINY_MODELS {
        let golden: Golden =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden/vision.json")).unwrap()).unwrap();
        let case = golden.cases.iter().find(|c| c.name == "image").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_omni"))
            .args(["run", "--model"])
            .arg(fixture(name))
            .arg("--image")
            .arg(repo(&case.images[0]))
            .args(["--prompt", &case.question, "--temperature", "0", "--json"])
            .args(["--max-new-tokens", &case.max_new_tokens.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        assert_eq!(json["prompt_token_ids"], serde_json::json!(case.prompt_ids), "{name}");
        assert_eq!(json["token_ids"], serde_json::json!(case.greedy_ids), "{name}");
    }
    // A bad image file: non-zero exit, one error line naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff garbage").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_omni"))
        .args(["run", "--model"])
        .arg(fixture("tiny-a"))
        .arg("--image")
        .arg(&bad)
        .args(["--prompt", "What is this?"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.jpg"), "{stderr}");
}

#[test]
fn image_prompts_from_f32_gguf_files_give_the_reference_tokens() {
    // The vision tower read through the mmproj file's table (patch_embed split in two temporal slices
    // as llama.cpp stores it, our deepstack mergers under omni.deepstack.*): same tower, same tokens.
    use omni_engine::gguf::quantize::{quantize, NoQuantizeProgress, QuantizeOptions};
    use omni_engine::gguf::GgmlType;
    for name in TINY_MODELS {
        let dir = tempfile::tempdir().unwrap();
        quantize(&QuantizeOptions::new(&fixture(name), dir.path(), GgmlType::F32), &mut NoQuantizeProgress).unwrap();
        let model = OmniModel::load(dir.path(), &mut NoProgress).unwrap();
        let (_, golden, t) = load(name);
        let front = model.vision.as_ref().expect("the mmproj file carries the vision tower");
        let images: Vec<ImagePixels> = golden.tower.images.iter().map(|f| image_pixels(&model, f)).collect();
        let out = front.encoder.forward(&images).unwrap();
        let err = max_relative_error(&flat(&out.embeddings), &flat(&t.load("tower.merged", &Device::Cpu).unwrap()));
        eprintln!("{name} (f32 GGUF): vision tower max relative error {err:.2e}");
        assert!(err < 1e-3, "{name} (f32 GGUF): vision tower max relative error {err:.2e}");
        assert_eq!(out.deepstack.len(), t.tensors().iter().filter(|(k, _)| k.starts_with("tower.deepstack.")).count());
        for case in &golden.cases {
            let prompt = prepare(&model, case);
            assert_eq!(prompt.prompt.ids, case.prompt_ids, "{name}/{} (f32 GGUF): prompt ids", case.name);
            let stop = StopRule { eos_ids: model.eos_ids().unwrap(), max_new_tokens: case.max_new_tokens };
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let gen = model.generate(&prompt, &mut sampler, &stop, |_| Ok(true)).unwrap();
            assert_eq!(gen.token_ids, case.greedy_ids, "{name}/{} (f32 GGUF): greedy tokens differ", case.name);
        }
    }
}
