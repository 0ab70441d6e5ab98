//! The `omni` binary's contract: `omni run ... --json` prints one JSON object with the reference's ids;
//! bad input exits non-zero with a one-line error.

mod common;

use std::process::Command;

use common::{fixture, TINY_MODELS};

fn omni() -> Command {
    Command::new(env!("CARGO_BIN_EXE_omni"))
}

#[test]
fn run_json_gives_the_reference_ids() {
    for name in TINY_MODELS {
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden/golden.json")).unwrap()).unwrap();
        // Case "system": a system message and a user text, as --system / --prompt build them.
        let case = golden["thinker_text"]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "system")
            .unwrap();
        let system = case["messages"][0]["content"][0]["text"].as_str().unwrap();
        let prompt = case["messages"][1]["content"][0]["text"].as_str().unwrap();
        let out = omni()
            .args(["run", "--model"])
            .arg(fixture(name))
            .args(["--system", system, "--prompt", prompt, "--temperature", "0", "--json"])
            .args(["--max-new-tokens", &case["max_new_tokens"].to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.trim().lines().count(), 1, "stdout must be exactly one JSON object: {stdout}");
        let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(json["prompt_token_ids"], case["prompt_ids"], "{name}");
        assert_eq!(json["token_ids"], case["greedy_ids"], "{name}");
        assert!(json["text"].is_string());
    }
}

#[test]
fn bad_input_is_a_one_line_error() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--model", "/nonexistent/model", "--prompt", "hi"], "/nonexistent/model"),
        (vec!["run", "--model", "MODEL", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (vec!["run", "--model", "MODEL", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (vec!["run", "--model", "MODEL", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ];
    let model = fixture("tiny-a");
    for (args, needle) in cases {
        let args: Vec<String> =
            args.iter().map(|a| if *a == "MODEL" { model.display().to_string() } else { a.to_string() }).collect();
        let out = omni().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got {stderr}");
        assert!(lines[0].starts_with("error:") && lines[0].contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout on error");
    }
}

#[test]
fn run_with_audio_gives_the_reference_ids() {
    for name in TINY_MODELS {
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden/golden.json")).unwrap()).unwrap();
        for case in golden["thinker_audio"]["cases"].as_array().unwrap() {
            let mut cmd = omni();
            cmd.args(["run", "--model"]).arg(fixture(name));
            for clip in case["clips"].as_array().unwrap() {
                cmd.arg("--audio").arg(fixture("../..").join(clip.as_str().unwrap()));
            }
            let out = cmd
                .args(["--prompt", case["question"].as_str().unwrap(), "--temperature", "0", "--json"])
                .args(["--max-new-tokens", &case["max_new_tokens"].to_string()])
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["prompt_token_ids"], case["prompt_ids"], "{name}/{}", case["name"]);
            assert_eq!(json["token_ids"], case["greedy_ids"], "{name}/{}", case["name"]);
        }
    }
}

#[test]
fn bad_audio_is_a_one_line_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(&silent, spec).unwrap();
    for _ in 0..16000 {
        w.write_sample(0i16).unwrap();
    }
    w.finalize().unwrap();
    let text = dir.path().join("notes.wav");
    std::fs::write(&text, "this is not audio").unwrap();
    let missing = dir.path().join("missing.mp3");
    for path in [&silent, &text, &missing] {
        let out = omni()
            .args(["run", "--model"])
            .arg(fixture("tiny-a"))
            .arg("--audio")
            .arg(path)
            .args(["--prompt", "hi", "--temperature", "0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{} should fail", path.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(path.file_name().unwrap().to_str().unwrap()), "{stderr}");
    }
}

#[test]
fn speech_out_gives_the_reference_codes_and_a_valid_wav() {
    let dir = tempfile::tempdir().unwrap();
    for name in TINY_MODELS {
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden/golden.json")).unwrap()).unwrap();
        let talker: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden/talker.json")).unwrap()).unwrap();
        for case in talker["cases"].as_array().unwrap() {
            if case["thinker_eos"] != json_eos(name) {
                continue; // a case with a custom Thinker eos the CLI does not expose
            }
            let prompt_name = case["prompt"].as_str().unwrap();
            let mut cmd = omni();
            cmd.args(["run", "--model"]).arg(fixture(name));
            if let Some(c) = find_case(&golden["thinker_text"]["cases"], prompt_name) {
                let msgs = c["messages"].as_array().unwrap();
                if msgs.len() > 2 {
                    continue; // multi-turn history is not a CLI prompt
                }
                if msgs.len() == 2 {
                    cmd.args(["--system", msgs[0]["content"][0]["text"].as_str().unwrap()]);
                }
                cmd.args(["--prompt", msgs.last().unwrap()["content"][0]["text"].as_str().unwrap()]);
            } else {
                let c = find_case(&golden["thinker_audio"]["cases"], prompt_name).unwrap();
                for clip in c["clips"].as_array().unwrap() {
                    cmd.arg("--audio").arg(fixture("../..").join(clip.as_str().unwrap()));
                }
                cmd.args(["--prompt", c["question"].as_str().unwrap()]);
            }
            let wav = dir.path().join(format!("{name}-{}.wav", case["name"].as_str().unwrap()));
            let out = cmd
                .args(["--temperature", "0", "--talker-temperature", "0", "--json"])
                .args(["--max-new-tokens", &case["thinker_max_new_tokens"].to_string()])
                .args(["--max-speech-frames", &case["talker_max_new_tokens"].to_string()])
                .args(["--speaker", case["speaker"].as_str().unwrap(), "--speech-out"])
                .arg(&wav)
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["codes"], case["codes"], "{name}/{}: codes differ from the reference", case["name"]);
            assert_eq!(json["sample_rate"], 24000);
            let reader = hound::WavReader::open(&wav).unwrap();
            let spec = reader.spec();
            assert_eq!((spec.channels, spec.sample_rate, spec.bits_per_sample), (1, 24000, 16));
            assert!(reader.len() > 0);
        }
    }
}

fn json_eos(name: &str) -> serde_json::Value {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("generation_config.json")).unwrap()).unwrap();
    g["eos_token_id"].clone()
}

fn find_case<'a>(cases: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    cases.as_array().unwrap().iter().find(|c| c["name"] == name)
}

#[test]
fn speech_errors_are_clear() {
    let model = fixture("tiny-a");
    let out = omni()
        .args(["run", "--model"])
        .arg(&model)
        .args(["--prompt", "hi", "--speech-out", "/tmp/omni-x.wav", "--speaker", "nobody"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("nobody") && stderr.contains("ethan"), "{stderr}");
    // A checkpoint that cannot speak (Thinking/Captioner style).
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    cfg["enable_audio_output"] = serde_json::json!(false);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let out = omni()
        .args(["run", "--model"])
        .arg(dir.path())
        .args(["--prompt", "hi", "--speech-out", "/tmp/omni-y.wav"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot speak"), "{stderr}");
}
