//! `omni talk` with WAV files for the microphone and the speaker, through the same rings and threads
//! as devices: a push-to-talk turn gives exactly the greedy tokens, codes and audio of `omni run
//! --audio`'s path on the same speech; hands-free mode cuts two turns; silence and noise start none.
//!
//! With the conversation back end the turn's audio is encoded while it is spoken (streaming mel + AuT
//! stem, `realtime/encode.rs`): the tests check, from the turn dumps (`--dump-turns`), that the
//! streamed mel features and chunk stems are bit-identical to the offline ones of the turn's samples,
//! that the encoder was fed during speech, and that the answer equals the raw-samples path.

mod realtime_support;

use std::process::Command;

use omni_engine::chat::{ChatMessage, ContentItem};
use omni_engine::generation::{generate_from_embeds, Sampler, SamplingParams, StopRule};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::speech::SpeechModels;
use omni_engine::talker::TalkerParams;
use realtime_support::*;

use candle_core::{Device, Tensor};
use omni_engine::audio_encoder::{chunk_lengths, ClipFeatures};
use omni_engine::conversation::{CancelToken, Conversation, ConversationOptions, UserTurn};

const MAX_TOKENS: usize = 12;
const MAX_FRAMES: usize = 10;

/// The answer `omni run --audio FILE` computes (its `answer` function: prepare → greedy Thinker →
/// greedy speech), for a user message that holds only the audio.
fn offline_answer(model_dir: &std::path::Path, wav: &std::path::Path) -> (Vec<u32>, Vec<Vec<u32>>, Vec<f32>) {
    let clip = omni_engine::audio::load_audio_16k_mono(wav).unwrap().samples;
    offline_answer_of(model_dir, &clip)
}

/// [`offline_answer`] of 16 kHz samples.
fn offline_answer_of(model_dir: &std::path::Path, clip: &[f32]) -> (Vec<u32>, Vec<Vec<u32>>, Vec<f32>) {
    let model = OmniModel::load(model_dir, &mut NoProgress).unwrap();
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: vec![ContentItem::Audio { audio: "clip-0".into() }],
    }];
    let prompt = model.prepare(&messages, &[clip]).unwrap();
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

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Checks a `--dump-turns` file against the offline encoder on the turn's own samples: the streamed
/// mel features and every chunk stem bit-identical, the encoder output within 1e-5 (relative).
/// Returns the turn's samples.
fn check_turn_dump(model: &OmniModel, path: &std::path::Path, what: &str) -> Vec<f32> {
    let dump = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let samples = flat(&dump["samples"]);
    let front = model.audio.as_ref().unwrap();
    // 1. Mel: the offline extractor on the whole segment.
    let mel = front.mel.extract_one(&samples).unwrap();
    let streamed_mel = &dump["mel"];
    assert_eq!(streamed_mel.dims(), &[mel.n_mels, mel.n_frames], "{what}: mel shape");
    assert_eq!(flat(streamed_mel), mel.features, "{what}: streamed mel != offline mel");
    // 2. Stems: the offline call's chunks (2·n_window frames, padded to the longest), one batch as
    //    `AudioEncoder::forward` stems them, and each chunk alone.
    let n_window = front.encoder.config().n_window;
    let lens = chunk_lengths(mel.n_frames, n_window);
    let padded = *lens.iter().max().unwrap();
    let chunk_mels: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(c, &len)| {
            let start = c * 2 * n_window;
            (0..mel.n_mels)
                .flat_map(|m| &mel.features[m * mel.n_frames + start..m * mel.n_frames + start + len])
                .copied()
                .collect()
        })
        .collect();
    let views: Vec<ClipFeatures<'_>> = chunk_mels
        .iter()
        .zip(&lens)
        .map(|(m, &frames)| ClipFeatures { mel: m, frames })
        .collect();
    let batched = front.encoder.stem(&views, padded).unwrap();
    assert!(lens.len() >= 2, "{what}: the segment should span two chunks ({} frames)", mel.n_frames);
    for (c, view) in views.iter().enumerate() {
        let streamed = flat(&dump[&format!("stem.{c}")]);
        let alone = flat(&front.encoder.stem(std::slice::from_ref(view), padded).unwrap()[0]);
        assert_eq!(streamed, alone, "{what}: chunk {c}: streamed stem != offline stem of the chunk");
        let diff = streamed
            .iter()
            .zip(flat(&batched[c]))
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{what}: chunk {c} ({} frames): stem bit-identical; vs the batched offline stem max |diff| {diff:e}", view.frames);
        assert_eq!(diff, 0.0, "{what}: chunk {c}: streamed stem vs the offline (batched) stem");
    }
    assert!(!dump.contains_key(&format!("stem.{}", lens.len())), "{what}: extra stems");
    // 3. The encoder output: the offline `forward` on the offline mel.
    let offline = front
        .encoder
        .forward(&[ClipFeatures { mel: &mel.clip_valid(0), frames: mel.valid_frames[0] }])
        .unwrap();
    let want = flat(&offline.embeddings);
    let got = flat(&dump["embeddings"]);
    assert_eq!(got.len(), want.len(), "{what}: audio tokens");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    eprintln!("{what}: {} samples, {} frames, {} chunks; encoder output vs offline max relative error {err:.2e}", samples.len(), mel.n_frames, lens.len());
    assert!(err <= 1e-5, "{what}: streamed encoder output vs offline {err:e}");
    samples
}

/// The turn's encode report says the streaming encoder was used and fed during speech: its first
/// chunk was stemmed before the segment's last sample had arrived, and `finish` was timed.
fn assert_streamed(t: &serde_json::Value, what: &str) {
    let e = &t["encode"];
    assert_eq!(e["path"], "streaming", "{what}: {t}");
    let samples = e["samples"].as_u64().unwrap();
    let first = e["samples_at_first_stem"].as_u64().unwrap_or(u64::MAX);
    assert!(first < samples, "{what}: first chunk stemmed after {first} of {samples} samples: {e}");
    assert!(e["stats"]["stems_during_speech"].as_u64().unwrap() >= 1, "{what}: {e}");
    assert!(e["blocks"].as_u64().unwrap() > 1, "{what}: fed in one block: {e}");
    let finish = t["timings"]["audio_finish_ms"].as_f64().expect("audio_finish_ms");
    assert!(finish > 0.0, "{what}: {finish}");
    eprintln!("{what}: encode {e}, finish {finish:.2} ms");
}

fn ptt_turn_equals_offline(engine: &str) {
    for name in ["tiny-a", "tiny-b"] {
        let model = repo(&format!("tests/fixtures/{name}"));
        let wav = repo("tests/fixtures/audio/speech_16k_s16.wav");
        let dir = tempfile::tempdir().unwrap();
        let out_wav = dir.path().join("answer.wav");
        let dumps = dir.path().join("turns");
        let mut args = talk_args(
            model.to_str().unwrap(),
            wav.to_str().unwrap(),
            out_wav.to_str().unwrap(),
            engine,
            "--ptt",
        );
        args.extend(["--dump-turns".to_string(), dumps.to_str().unwrap().to_string()]);
        let (summary, events) = run_talk(&args);
        let (want_ids, want_codes, want_audio) = offline_answer(&model, &wav);
        let turns = summary["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 1, "{name}: the whole file is one turn: {summary}");
        let t = &turns[0];
        assert_eq!(ids(&t["token_ids"]), want_ids, "{name} ({engine}): tokens");
        assert_eq!(codes(&t["codes"]), want_codes, "{name} ({engine}): codes");
        assert!(!want_codes.is_empty(), "{name}: the tiny model speaks");
        if engine == "conversation" {
            // The answer above came through the streaming encoder, fed while the file played.
            assert_streamed(t, name);
            let m = OmniModel::load(&model, &mut NoProgress).unwrap();
            let samples = check_turn_dump(&m, &dumps.join("turn-1.safetensors"), name);
            let clip = omni_engine::audio::load_audio_16k_mono(&wav).unwrap().samples;
            assert!(samples == clip, "{name}: the turn holds exactly the file's samples");
        } else {
            assert!(t["encode"].is_null(), "{name}: the offline back end encodes after the turn");
        }
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

/// Hands-free with the conversation back end: each VAD turn (pre-roll included) was encoded while it
/// was spoken, its streamed mel and stems equal the offline ones of the turn's samples, the first turn
/// answers as `omni run --audio` on that segment, and the second as the conversation fed raw samples.
#[test]
fn vad_wav_turns_are_encoded_while_spoken_and_answer_as_the_raw_path() {
    let speech = speech();
    let mut audio = vec![0i16; 8000];
    audio.extend(&speech);
    audio.extend(vec![0i16; 32000]);
    audio.extend(speech.iter().map(|&x| x / 2)); // quieter: another clamp maximum
    audio.extend(vec![0i16; 16000]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("two.wav");
    write_wav_i16(&input, &audio, 16_000);
    let out_wav = dir.path().join("answer.wav");
    let dumps = dir.path().join("turns");
    let model_dir = repo("tests/fixtures/tiny-b");
    let mut args = talk_args(
        model_dir.to_str().unwrap(),
        input.to_str().unwrap(),
        out_wav.to_str().unwrap(),
        "conversation",
        "--vad",
    );
    args.extend(["--dump-turns".to_string(), dumps.to_str().unwrap().to_string()]);
    let (summary, events) = run_talk(&args);
    let turns = summary["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "two utterances, two turns: {summary}");
    assert_eq!(count(&events, "barge_in"), 0);
    let model = OmniModel::load(&model_dir, &mut NoProgress).unwrap();
    let mut segments = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        let what = format!("vad turn {}", i + 1);
        assert_streamed(t, &what);
        let samples = check_turn_dump(&model, &dumps.join(format!("turn-{}.safetensors", i + 1)), &what);
        assert_eq!(t["encode"]["samples"].as_u64().unwrap() as usize, samples.len(), "{what}");
        assert_eq!(t["user_seconds"].as_f64().unwrap(), samples.len() as f64 / 16000.0, "{what}");
        segments.push(samples);
    }
    // The segments are the two utterances with their pre-roll (300 ms before the onset).
    assert!(segments.iter().all(|s| s.len() > speech.len() / 2), "segment lengths");
    // Turn 1: `omni run --audio` on the same segment.
    let (want_ids, want_codes, _) = offline_answer_of(&model_dir, &segments[0]);
    assert_eq!(ids(&turns[0]["token_ids"]), want_ids, "turn 1 tokens");
    assert_eq!(codes(&turns[0]["codes"]), want_codes, "turn 1 codes");
    // Both turns: the conversation fed the raw samples (its offline encoder), as the loop was before.
    let model = std::sync::Arc::new(model);
    let speech_models = std::sync::Arc::new(SpeechModels::load(&model).unwrap());
    let mut conv = Conversation::new(
        model.clone(),
        Some(speech_models),
        ConversationOptions::greedy(MAX_TOKENS, MAX_FRAMES),
    )
    .unwrap();
    for (i, (t, samples)) in turns.iter().zip(&segments).enumerate() {
        let raw = conv
            .answer(UserTurn::audio(samples.clone()), CancelToken::new())
            .unwrap()
            .wait(|_| {})
            .unwrap();
        assert_eq!(ids(&t["token_ids"]), raw.token_ids, "turn {}: tokens vs the raw-samples path", i + 1);
        assert_eq!(codes(&t["codes"]), raw.codes, "turn {}: codes vs the raw-samples path", i + 1);
        assert!(!raw.codes.is_empty());
    }
}

/// A rejected onset (a 180 ms burst: less voice than `min_speech_ms`) drops its encoder state: the
/// next utterance's turn is encoded from its own first sample, bit-identical to the offline encode.
#[test]
fn a_rejected_onset_drops_its_encoder_state() {
    let speech = speech();
    let mut audio = vec![0i16; 8000];
    audio.extend(&speech[8000..8000 + 2880]); // 180 ms from the middle of the clip: voiced
    audio.extend(vec![0i16; 24000]);
    audio.extend(&speech);
    audio.extend(vec![0i16; 16000]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("burst_then_speech.wav");
    write_wav_i16(&input, &audio, 16_000);
    let dumps = dir.path().join("turns");
    let model_dir = repo("tests/fixtures/tiny-a");
    let mut args = talk_args(
        model_dir.to_str().unwrap(),
        input.to_str().unwrap(),
        dir.path().join("answer.wav").to_str().unwrap(),
        "conversation",
        "--vad",
    );
    args.extend(["--dump-turns".to_string(), dumps.to_str().unwrap().to_string()]);
    let (summary, events) = run_talk(&args);
    assert_eq!(summary["rejected_onsets"], 1, "the burst opens a segment that is rejected: {summary}");
    assert_eq!(count(&events, "speech_rejected"), 1);
    let turns = summary["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1, "{summary}");
    assert_streamed(&turns[0], "turn after a rejected onset");
    let model = OmniModel::load(&model_dir, &mut NoProgress).unwrap();
    let samples = check_turn_dump(&model, &dumps.join("turn-1.safetensors"), "turn after a rejected onset");
    // The turn starts after the burst (its pre-roll is at most 300 ms of the silence before the speech).
    assert!(samples.len() <= speech.len() + 4800, "{} samples", samples.len());
    let (want_ids, want_codes, _) = offline_answer_of(&model_dir, &samples);
    assert_eq!(ids(&turns[0]["token_ids"]), want_ids, "tokens");
    assert_eq!(codes(&turns[0]["codes"]), want_codes, "codes");
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
