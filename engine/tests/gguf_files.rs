//! The three GGUF files of `omni quantize`: every checkpoint tensor has exactly one place and comes
//! back unchanged from an f32 file; types follow the rules; the mmproj file carries llama.cpp's clip
//! keys; the random real-shape checkpoint tool lays tensors out as the reference does.

mod common;

use std::collections::BTreeMap;

use omni_engine::gguf::names::{hf_to_gguf, Component};
use omni_engine::gguf::quantize::{
    choose_type, quantize, Checkpoint, NoQuantizeProgress, QuantizeOptions,
};
use omni_engine::gguf::random::{component_tensors, REAL_CONFIG};
use omni_engine::gguf::source::{GgufSource, SourceFile};
use omni_engine::gguf::{FileKind, GgmlType, GgufFile};
use omni_engine::weights::{WeightMatrix, WeightStore};

use common::{fixture, TINY_MODELS};

fn write(model: &str, ty: GgmlType) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    quantize(
        &QuantizeOptions::new(&fixture(model), out.path(), ty),
        &mut NoQuantizeProgress,
    )
    .unwrap();
    out
}

fn open_all(dir: &std::path::Path, ty: &str) -> WeightStore {
    let files = FileKind::ALL
        .iter()
        .map(|&kind| SourceFile {
            kind,
            file: GgufFile::open(&dir.join(format!("{}-{ty}.gguf", kind.stem()))).unwrap(),
        })
        .collect();
    WeightStore::from_gguf(dir, GgufSource::new(files).unwrap())
}

#[test]
fn every_checkpoint_tensor_round_trips_through_f32_files() {
    for name in TINY_MODELS {
        let dir = write(name, GgmlType::F32);
        let reference = WeightStore::open(&fixture(name)).unwrap();
        let gguf = open_all(dir.path(), "f32");
        let ours: Vec<&str> = gguf.names().collect();
        let theirs: Vec<&str> = reference.names().collect();
        assert_eq!(
            ours, theirs,
            "{name}: the GGUF files must hold exactly the checkpoint's tensors"
        );
        let ck = Checkpoint::open(&fixture(name)).unwrap();
        for n in theirs {
            let shape = ck.shape(n).unwrap().to_vec();
            let a = reference
                .tensor(n, &shape)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = gguf
                .tensor(n, &shape)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(a == b, "{name}: `{n}` changed through the f32 GGUF files");
        }
        assert!(
            gguf.gguf().unwrap().unmapped().is_empty(),
            "{name}: {:?}",
            gguf.gguf().unwrap().unmapped()
        );
    }
}

#[test]
fn q8_0_files_use_the_documented_types() {
    let dir = write("tiny-a", GgmlType::Q8_0);
    let types = |file: &str| -> BTreeMap<String, (GgmlType, Vec<usize>)> {
        let f = GgufFile::open(&dir.path().join(file)).unwrap();
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), (t.dtype, t.dims.clone())))
            .collect()
    };
    let th = types("thinker-q8_0.gguf");
    assert_eq!(th["token_embd.weight"], (GgmlType::Q8_0, vec![64, 1024]));
    assert_eq!(th["output.weight"].0, GgmlType::Q8_0);
    assert_eq!(
        th["blk.0.ffn_gate_exps.weight"],
        (GgmlType::Q8_0, vec![64, 32, 8])
    );
    assert_eq!(
        th["blk.0.ffn_down_exps.weight"],
        (GgmlType::Q8_0, vec![32, 64, 8])
    );
    assert_eq!(
        th["blk.0.ffn_gate_inp.weight"],
        (GgmlType::F32, vec![64, 8])
    );
    assert_eq!(th["blk.0.attn_q_norm.weight"].0, GgmlType::F32);
    let mm = types("mmproj-q8_0.gguf");
    assert_eq!(
        mm["v.patch_embd.weight"],
        (GgmlType::F16, vec![16, 16, 3, 64])
    );
    assert_eq!(
        mm["v.patch_embd.weight.1"],
        (GgmlType::F16, vec![16, 16, 3, 64])
    );
    assert_eq!(mm["v.position_embd.weight"].0, GgmlType::F32);
    assert_eq!(mm["a.conv2d.1.weight"], (GgmlType::F16, vec![3, 3, 1, 32]));
    assert_eq!(mm["a.conv2d.1.bias"], (GgmlType::F32, vec![1, 1, 32]));
    assert_eq!(mm["a.conv_out.weight"].0, GgmlType::F16);
    assert_eq!(
        mm["a.position_embd.weight"],
        (GgmlType::F32, vec![64, 1500])
    );
    assert_eq!(mm["mm.0.weight"].0, GgmlType::Q8_0);
    assert_eq!(mm["v.blk.0.attn_qkv.bias"].0, GgmlType::F32);
    assert_eq!(mm["omni.deepstack.2.fc2.weight"].0, GgmlType::Q8_0);
    assert!(
        !mm.keys().any(|k| k.starts_with("v.deepstack.")),
        "llama.cpp would count these as deepstack layers"
    );
    let tk = types("talker-q8_0.gguf");
    assert_eq!(
        tk["mtp.lm_head.weight"],
        (GgmlType::Q8_0, vec![64, 128, 15])
    );
    assert_eq!(
        tk["mtp.codec_embd.weight"],
        (GgmlType::Q8_0, vec![64, 128, 15])
    );
    assert_eq!(
        tk["talker.blk.0.ffn_gate_inp_shexp.weight"].0,
        GgmlType::F32
    );
    assert_eq!(tk["c2w.dec.1.res.2.conv1.weight"].0, GgmlType::F16);
    assert_eq!(tk["c2w.dec.1.blk_snake.alpha"].0, GgmlType::F32);
    assert_eq!(tk["c2w.blk.0.attn_q.weight"].0, GgmlType::Q8_0);

    // The per-component override.
    let out = tempfile::tempdir().unwrap();
    let mut opts = QuantizeOptions::new(&fixture("tiny-a"), out.path(), GgmlType::Q8_0);
    opts.component_types
        .insert(Component::Code2Wav, GgmlType::F16);
    opts.files = vec![FileKind::Talker];
    quantize(&opts, &mut NoQuantizeProgress).unwrap();
    let f = GgufFile::open(&out.path().join("talker-q8_0.gguf")).unwrap();
    assert_eq!(
        f.tensor("c2w.blk.0.attn_q.weight").unwrap().dtype,
        GgmlType::F16
    );
    assert_eq!(
        f.tensor("talker.blk.0.attn_q.weight").unwrap().dtype,
        GgmlType::Q8_0
    );
    assert_eq!(
        f.tensor("c2w.blk.0.attn_norm.weight").unwrap().dtype,
        GgmlType::F32
    );
}

#[test]
fn q8_0_matrices_load_as_mapped_quantized_weights() {
    let dir = write("tiny-b", GgmlType::Q8_0);
    let store = open_all(dir.path(), "q8_0");
    match store
        .matrix(
            "thinker.model.layers.0.mlp.experts.3.up_proj.weight",
            &[64, 96],
        )
        .unwrap()
    {
        WeightMatrix::Quantized(q) => assert_eq!(q.shape().dims(), &[64, 96]),
        WeightMatrix::Dense(_) => panic!("a Q8_0 expert should stay quantized"),
    }
    // Norms and F16 convs come back dense; a wrong shape is an error naming both names.
    assert!(matches!(
        store.matrix("thinker.model.norm.weight", &[96]).unwrap(),
        WeightMatrix::Dense(_)
    ));
    let err = store
        .matrix("thinker.model.layers.0.self_attn.q_proj.weight", &[1, 2])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("q_proj"),
        "{msg}"
    );
}

#[test]
fn mmproj_carries_llama_cpp_clip_keys() {
    let dir = write("tiny-a", GgmlType::Q8_0);
    let f = GgufFile::open(&dir.path().join("mmproj-q8_0.gguf")).unwrap();
    assert_eq!(f.get_str("general.architecture"), Some("clip"));
    assert_eq!(
        f.get_str("clip.vision.projector_type"),
        Some("qwen3vl_merger")
    );
    assert_eq!(f.get_str("clip.audio.projector_type"), Some("qwen3a"));
    assert!(
        f.get("clip.projector_type").is_none(),
        "llama.cpp reads clip.projector_type first"
    );
    for key in [
        "clip.vision.embedding_length",
        "clip.vision.attention.head_count",
        "clip.vision.feed_forward_length",
        "clip.vision.block_count",
        "clip.vision.projection_dim",
        "clip.vision.attention.layer_norm_epsilon",
        "clip.vision.image_size",
        "clip.vision.patch_size",
        "clip.audio.embedding_length",
        "clip.audio.attention.head_count",
        "clip.audio.feed_forward_length",
        "clip.audio.block_count",
        "clip.audio.projection_dim",
        "clip.audio.attention.layer_norm_epsilon",
        "clip.audio.num_mel_bins",
    ] {
        assert!(f.get(key).is_some(), "{key} is required by llama.cpp");
    }
    let t = GgufFile::open(&dir.path().join("thinker-q8_0.gguf")).unwrap();
    assert_eq!(t.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(t.get_str("tokenizer.ggml.pre"), Some("qwen2"));
    assert_eq!(
        t.get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len()),
        Some(1024)
    );
    assert_eq!(t.get_u64("tokenizer.ggml.eos_token_id"), Some(688));
    let sections: Vec<i64> = t
        .get("qwen3vlmoe.rope.dimension_sections")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(sections, vec![6, 5, 5, 0]);
}

#[test]
fn random_checkpoint_layout_matches_the_fixtures() {
    // The shapes the random-checkpoint tool derives from config.json equal the ones transformers
    // wrote for the tiny fixtures, component by component.
    for name in TINY_MODELS {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let ck = Checkpoint::open(&fixture(name)).unwrap();
        let mut ours: Vec<(String, Vec<usize>)> = Component::ALL
            .iter()
            .flat_map(|&c| component_tensors(&cfg, c).unwrap())
            .collect();
        ours.sort();
        let mut theirs: Vec<(String, Vec<usize>)> = ck
            .names()
            .map(|n| (n.to_string(), ck.shape(n).unwrap().to_vec()))
            .collect();
        theirs.sort();
        assert_eq!(ours.len(), theirs.len(), "{name}: tensor count");
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a, b, "{name}");
        }
    }
}

#[test]
fn real_shape_q8_0_thinker_size_arithmetic() {
    // The real model's Thinker at Q8_0: every matrix 34 bytes per 32 values, norms and router f32.
    let cfg: serde_json::Value = serde_json::from_str(REAL_CONFIG).unwrap();
    let tensors = component_tensors(&cfg, Component::Thinker).unwrap();
    let mut per_gguf: BTreeMap<String, (Vec<usize>, usize)> = BTreeMap::new();
    for (n, shape) in &tensors {
        let p = &hf_to_gguf(FileKind::Thinker, n)[0];
        let e = per_gguf.entry(p.gguf.clone()).or_insert((shape.clone(), 0));
        e.1 += 1;
    }
    let mut bytes = 0u64;
    for (g, (shape, count)) in &per_gguf {
        let t = choose_type(g, shape, GgmlType::Q8_0);
        let n: usize = shape.iter().product::<usize>() * count;
        bytes += t.bytes_for(n) as u64;
    }
    let params: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    eprintln!(
        "real Thinker: {params} parameters, {bytes} bytes of Q8_0 tensor data ({:.2} GB)",
        bytes as f64 / 1e9
    );
    // token_embd, output_norm, output; per layer attn_{norm,q,k,v,output,q_norm,k_norm}, ffn_norm,
    // ffn_gate_inp, ffn_{gate,up,down}_exps.
    assert_eq!(per_gguf.len(), 3 + 48 * 12);
    // 30.5B parameters; Q8_0 ≈ 34/32 bytes each → 32.5 GB (docs/gguf.md; the 4-layer real-shape
    // file written by `omni random-checkpoint` + `omni quantize` has exactly these per-layer sizes).
    assert_eq!(params, 30_532_646_912);
    assert_eq!(bytes, 32_478_519_296);
    let layer: u64 = per_gguf
        .iter()
        .filter(|(g, _)| g.starts_with("blk.0."))
        .map(|(g, (shape, count))| {
            choose_type(g, shape, GgmlType::Q8_0).bytes_for(shape.iter().product::<usize>() * count)
                as u64
        })
        .sum();
    assert_eq!(layer, 662_848_512);
}

#[test]
fn k_quant_matrices_are_read_from_the_map() {
    // A Thinker-named Q4_K and Q6_K matrix (as in ggml-org's Q4_K_M files) and a Q5_0 one, written
    // with candle's quantizers; loaded through the same seam, they multiply like their f32 decoding.
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use omni_engine::gguf::{GgufWriter, TensorSpec, Value};
    use omni_engine::nn::Linear;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.gguf");
    let (out, inp) = (64usize, 512usize);
    let cases = [
        ("blk.0.attn_q.weight", GgmlDType::Q4K, GgmlType::Q4K),
        ("blk.0.attn_k.weight", GgmlDType::Q6K, GgmlType::Q6K),
        ("blk.0.attn_v.weight", GgmlDType::Q5_0, GgmlType::Q5_0),
    ];
    let mut blobs = Vec::new();
    for (i, (_, dt, _)) in cases.iter().enumerate() {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)
            .unwrap()
            .affine(1.0, i as f64 * 0.1)
            .unwrap();
        let q = QTensor::quantize(&w, *dt).unwrap();
        blobs.push((
            q.data().unwrap().to_vec(),
            q.dequantize(&Device::Cpu).unwrap(),
        ));
    }
    let specs = cases
        .iter()
        .map(|(n, _, t)| TensorSpec {
            name: n.to_string(),
            dims: vec![inp, out],
            dtype: *t,
        })
        .collect();
    let meta = vec![(
        "general.architecture".to_string(),
        Value::String("qwen3vlmoe".into()),
    )];
    let mut w = GgufWriter::create(&path, &meta, specs).unwrap();
    for (bytes, _) in &blobs {
        w.write(bytes).unwrap();
    }
    w.finish().unwrap();
    let store = WeightStore::from_gguf(
        dir.path(),
        GgufSource::open(FileKind::Thinker, &path).unwrap(),
    );
    let x = Tensor::randn(0f32, 1.0, (1, 3, inp), &Device::Cpu).unwrap();
    for ((gguf, _, _), (_, dense)) in cases.iter().zip(&blobs) {
        let hf = match *gguf {
            "blk.0.attn_q.weight" => "thinker.model.layers.0.self_attn.q_proj",
            "blk.0.attn_k.weight" => "thinker.model.layers.0.self_attn.k_proj",
            _ => "thinker.model.layers.0.self_attn.v_proj",
        };
        let lin = Linear::load(&store.root().pp(hf), inp, out, false).unwrap();
        assert!(lin.is_quantized(), "{gguf}");
        let got = lin
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = Linear::new(dense.clone(), None)
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n = common::nmse(&got, &want);
        assert!(
            n < 1e-3,
            "{gguf}: quantized matmul vs its own f32 decoding NMSE {n:.2e}"
        );
        // The f32 view of the same weights equals candle's decoding.
        let back = store.tensor(&format!("{hf}.weight"), &[out, inp]).unwrap();
        assert!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == dense.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn speech_from_f32_gguf_files_is_identical() {
    // Talker + Code2Wav read through the talker file's table: same codec codes, same waveform.
    let dir = write("tiny-a", GgmlType::F32);
    let run = |model: &std::path::Path, wav: &std::path::Path| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_omni"))
            .args(["run", "--model"])
            .arg(model)
            .args([
                "--prompt",
                "Hello there",
                "--temperature",
                "0",
                "--talker-temperature",
                "0",
            ])
            .args([
                "--max-new-tokens",
                "12",
                "--max-speech-frames",
                "40",
                "--json",
                "--speech-out",
            ])
            .arg(wav)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (wa, wb) = (tmp.path().join("a.wav"), tmp.path().join("b.wav"));
    let a = run(&fixture("tiny-a"), &wa);
    let b = run(dir.path(), &wb);
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert!(
        a["codes"].as_array().is_some_and(|c| !c.is_empty()),
        "no codes: {a}"
    );
    assert_eq!(
        a["codes"], b["codes"],
        "codec codes from the f32 GGUF files differ"
    );
    assert!(
        std::fs::read(&wa).unwrap() == std::fs::read(&wb).unwrap(),
        "waveforms differ"
    );
}

#[test]
fn an_mmproj_without_deepstack_loads_with_a_note() {
    // A llama.cpp-style mmproj (no deepstack mergers): the model still loads, and says what is missing.
    use omni_engine::gguf::model::{open, GgufModelFiles};
    use omni_engine::gguf::{GgufWriter, TensorSpec, Value};
    let dir = write("tiny-a", GgmlType::Q8_0);
    let src = GgufFile::open(&dir.path().join("mmproj-q8_0.gguf")).unwrap();
    let stripped = dir.path().join("stripped").join("mmproj.gguf");
    std::fs::create_dir_all(stripped.parent().unwrap()).unwrap();
    let keep: Vec<_> = src
        .tensors()
        .iter()
        .filter(|t| !t.name.starts_with("omni.deepstack."))
        .cloned()
        .collect();
    let meta: Vec<(String, Value)> = src
        .key_order()
        .iter()
        .map(|k| (k.clone(), src.get(k).unwrap().clone()))
        .collect();
    let specs = keep
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            dtype: t.dtype,
        })
        .collect();
    let mut w = GgufWriter::create(&stripped, &meta, specs).unwrap();
    for t in &keep {
        w.write(src.bytes(t)).unwrap();
    }
    w.finish().unwrap();
    let files = GgufModelFiles::with_overrides(
        None,
        Some(&dir.path().join("thinker-q8_0.gguf")),
        Some(&stripped),
        None,
    )
    .unwrap();
    let parts = open(&files).unwrap();
    assert!(
        parts.notes.iter().any(|n| n.contains("deepstack")),
        "{:?}",
        parts.notes
    );
    assert!(!parts
        .weights
        .contains("thinker.visual.merger_list.0.ln_q.weight"));
    assert!(parts.weights.contains("thinker.visual.merger.ln_q.weight"));
    omni_engine::pipeline::OmniModel::load_gguf(&files, &mut omni_engine::pipeline::NoProgress)
        .unwrap();
}
