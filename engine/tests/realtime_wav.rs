//! `omni talk` with WAV files for the microphone and the speaker, through the same rings and threads
//! as devices: a push-to-talk turn gives exactly the greedy tokens, codes and audio of `omni run
//! --audio`'s path on the same speech; hands-free mode cuts two turns; silence and noise start none.

mod realtime_support;

use std::process::Command;

use omni_engine::chat::{ChatMessage, ContentItem};
use omni_engine::generation::{generate_from_embeds, Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::speech::SpeechModels;
use omni_engine::talker::TalkerParams;
use realtime_support::*;

const MAX_TOKENS: usize = 12;
const MAX_FRAMES: usize = 10;

/// The answer `omni run --audio FILE` computes (its `answer` function: prepare → greedy Thinker →
/// greedy speech), for a user message that holds only the audio.
fn offline_answer(model_dir: &std::path::Path, wav: &std::path::Path) -> (Vec<u32>, Vec<Vec<u32>>, Vec<f32>) {
    let model = OmniModel::load(model_dir, &mut NoProgress).unwrap();
    let clip = omni_engine::audio::load_audio_16k_mono(wav).unwrap().samples;
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: vec![ContentItem::Audio { audio: "clip-0".into() }],
    }];
    let prompt = model.prepare(&messages, &[&clip]).unwrap();
    let stop = StopRule {
        eos_ids: model.eos_ids().unwrap(),
        max_new_tokens: MAX_TOKENS,
    };
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let out = generate_from_embeds(
        &model.thinker,
        &prompt.ids,
        &prompt.embeds,
        &prompt.positions,
        &mut sampler,
        &stop,
        |_| Ok(true),
    )
    .unwrap();
    let speech = SpeechModels::load(&model).unwrap();
    let spoken = speech
        .speak(
            &model,
            &prompt,
            &out,
            &stop.eos_ids,
            "ethan",
            &TalkerParams::greedy(MAX_FRAMES),
            |_| Ok(true),
        )
        .unwrap();
    (out.token_ids, spoken.codes, spoken.audio)
}

fn talk_args<'a>(model: &'a str, input: &'a str, output: &'a str, engine: &'a str, mode: &'a str) -> Vec<String> {
    let mut v: Vec<String> = [
        "--model",
        model,
        "--input-wav",
        input,
        "--output-wav",
        output,
        mode,
        "--fast",
        "--temperature",
        "0",
        "--talker-temperature",
        "0",
        "--engine",
        engine,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend([
        "--max-new-tokens".into(),
        MAX_TOKENS.to_string(),
        "--max-speech-frames".into(),
        MAX_FRAMES.to_string(),
    ]);
    v
}

fn run_talk(args: &[String]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let out = Command::new(omni())
        .arg("talk")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "omni talk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = parse_lines(&out.stdout);
    let summary = lines.pop().expect("a summary line");
    assert!(
        summary.get("turns").is_some(),
        "the last line is the summary: {summary}"
    );
    (summary, lines)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn codes(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn ptt_turn_equals_offline(engine: &str) {
    for name in ["tiny-a", "tiny-b"] {
        let model = repo(&format!("tests/fixtures/{name}"));
        let wav = repo("tests/fixtures/audio/speech_16k_s16.wav");
        let dir = tempfile::tempdir().unwrap();
        let out_wav = dir.path().join("answer.wav");
        let args = talk_args(
            model.to_str().unwrap(),
            wav.to_str().unwrap(),
            out_wav.to_str().unwrap(),
            engine,
            "--ptt",
        );
        let (summary, events) = run_talk(&args);
        let (want_ids, want_codes, want_audio) = offline_answer(&model, &wav);
        let turns = summary["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 1, "{name}: the whole file is one turn: {summary}");
        let t = &turns[0];
        assert_eq!(ids(&t["token_ids"]), want_ids, "{name} ({engine}): tokens");
        assert_eq!(codes(&t["codes"]), want_codes, "{name} ({engine}): codes");
        assert!(!want_codes.is_empty(), "{name}: the tiny model speaks");
        // The whole clip, to the sample: 29240 samples = 1827.5 ms.
        assert_eq!(
            t["speech_end_ms"].as_f64().unwrap(),
            29240.0 / 16.0,
            "{name}: speech end"
        );
        assert!(t["first_audio_ms"].as_f64().unwrap() > 0.0, "{name}: first audio timed");
        // What left the output buffer is the answer's waveform, 16-bit.
        let (played, rate) = read_wav_i16(&out_wav);
        assert_eq!(rate, 24_000);
        let want: Vec<i16> = want_audio
            .iter()
            .map(|x| (x.clamp(-1.0, 1.0) * 32767.0).round() as i16)
            .collect();
        if engine == "offline" {
            assert_eq!(played, want, "{name}: played samples");
        } else {
            // Streaming Code2Wav differs from the one-shot decode only through its truncated left context.
            assert_eq!(played.len(), want.len(), "{name}: played length");
        }
        let counters = &summary["counters"];
        assert_eq!(counters["input_overruns"], 0, "{name}: no overruns");
        assert_eq!(count(&events, "turn_done"), 1);
        assert_eq!(count(&events, "barge_in"), 0);
    }
}

#[test]
fn ptt_wav_turn_gives_the_offline_tokens_codes_and_audio() {
    ptt_turn_equals_offline("offline");
}

#[test]
fn ptt_wav_turn_gives_the_offline_tokens_and_codes_with_the_conversation_api() {
    ptt_turn_equals_offline("conversation");
}

#[test]
fn vad_wav_cuts_two_turns_and_answers_both() {
    let speech = speech();
    let mut audio = vec![0i16; 8000];
    audio.extend(&speech);
    audio.extend(vec![0i16; 32000]);
    audio.extend(&speech);
    audio.extend(vec![0i16; 16000]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("two.wav");
    write_wav_i16(&input, &audio, 16_000);
    let out_wav = dir.path().join("answer.wav");
    let model = repo("tests/fixtures/tiny-a");
    let args = talk_args(
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        out_wav.to_str().unwrap(),
        "offline",
        "--vad",
    );
    let (summary, events) = run_talk(&args);
    let turns = summary["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "two utterances, two turns: {summary}");
    // Speech ends where the clip's voice ends (its last 30 ms frame above -45 dBFS; the file has
    // trailing silence), to the VAD's 30 ms resolution.
    let voiced_end_ms = speech
        .chunks(480)
        .enumerate()
        .filter(|(_, f)| {
            let e: f64 = f.iter().map(|&x| (x as f64 / 32768.0).powi(2)).sum::<f64>() / f.len() as f64;
            10.0 * e.max(1e-12).log10() > -45.0
        })
        .map(|(i, _)| (i + 1) as f64 * 30.0)
        .last()
        .unwrap();
    let clip_ms = speech.len() as f64 / 16.0;
    let ends: Vec<f64> = turns.iter().map(|t| t["speech_end_ms"].as_f64().unwrap()).collect();
    for (end, want) in ends
        .iter()
        .zip([500.0 + voiced_end_ms, 500.0 + clip_ms + 2000.0 + voiced_end_ms])
    {
        assert!(
            (end - want).abs() <= 60.0,
            "speech end {end} ms, the voice ends at {want} ms"
        );
    }
    for t in turns {
        assert!(!t["token_ids"].as_array().unwrap().is_empty());
        assert!(!t["codes"].as_array().unwrap().is_empty());
        assert!(t["first_audio_ms"].as_f64().is_some());
    }
    assert_eq!(count(&events, "speech_end"), 2);
    assert_eq!(summary["counters"]["input_overruns"], 0);
}

#[test]
fn silence_and_noise_start_no_turn() {
    // 2 s of digital silence, 3 s of white noise at about -30 dBFS, 2 s of a steady 200 Hz hum.
    let mut audio = vec![0i16; 32000];
    let mut state = 0x2545F491u32;
    for _ in 0..48000 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        audio.push(((state as i32 >> 16) as f32 * 0.06) as i16);
    }
    for i in 0..32000 {
        audio.push(((2.0 * std::f32::consts::PI * 200.0 * i as f32 / 16000.0).sin() * 3000.0) as i16);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("noise.wav");
    write_wav_i16(&input, &audio, 16_000);
    let out_wav = dir.path().join("answer.wav");
    let model = repo("tests/fixtures/tiny-a");
    let args = talk_args(
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        out_wav.to_str().unwrap(),
        "offline",
        "--vad",
    );
    let (summary, events) = run_talk(&args);
    assert_eq!(
        summary["turns"].as_array().unwrap().len(),
        0,
        "no turn on silence or noise: {summary}"
    );
    assert_eq!(count(&events, "speech_end"), 0);
}
