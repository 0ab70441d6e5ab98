//! Streamed spoken answers (`omni_engine::conversation`) against the non-streaming path and the
//! reference: greedy streamed codes equal the non-streamed codes and the goldens of
//! `tests/golden/make_talker_fixtures.py`; the streamed waveform (Code2Wav's layer state carried
//! between chunks) is `chunked_decode(300, 25)` — the reference `forward` at these lengths — to float
//! rounding (> 90 dB SNR); the first audio chunk exists before the Thinker ends (proved causally:
//! the Thinker is held after its k-th token until a chunk arrives); cancellation; two turns with KV
//! reuse equal a fresh run on the whole message list.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use omni_engine::chat::ChatMessage;
use omni_engine::code2wav::{CodecFrames, StreamingOptions};
use omni_engine::conversation::{
    AnswerEvent, AnswerStream, AudioChunk, CancelToken, Conversation, ConversationOptions, TurnSummary, UserTurn,
};
use omni_engine::generation::{generate_from_embeds, FinishReason, Sampler, SamplingParams, StopRule, ThinkerOutput};
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::speech::{SpeechModels, SpokenAnswer};
use serde_json::Value;

use common::{fixture, TINY_MODELS};

fn load(name: &str) -> (Arc<OmniModel>, Arc<SpeechModels>) {
    let model = OmniModel::load(&fixture(name), &mut NoProgress).unwrap();
    let speech = SpeechModels::load(&model).unwrap();
    (Arc::new(model), Arc::new(speech))
}

fn json(name: &str, file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden").join(file)).unwrap()).unwrap()
}

fn clip(path: &str) -> Vec<f32> {
    omni_engine::audio::load_audio_16k_mono(&fixture("../..").join(path)).unwrap().samples
}

/// The system text and user turn of golden.json's prompt `name`.
fn prompt(golden: &Value, name: &str) -> (Option<String>, UserTurn) {
    let find = |kind: &str| golden[kind]["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned();
    if let Some(c) = find("thinker_text") {
        let msgs = c["messages"].as_array().unwrap();
        let text = |m: &Value| m["content"][0]["text"].as_str().unwrap().to_string();
        let system = (msgs.len() == 2).then(|| text(&msgs[0]));
        return (system, UserTurn::text(&text(msgs.last().unwrap())));
    }
    let c = find("thinker_audio").unwrap();
    let audio = c["clips"].as_array().unwrap().iter().map(|p| clip(p.as_str().unwrap())).collect();
    (None, UserTurn { audio, text: Some(c["question"].as_str().unwrap().to_string()) })
}

/// Every event of an answer, the chunks' audio concatenated.
struct Streamed {
    summary: TurnSummary,
    audio: Vec<f32>,
    chunks: Vec<AudioChunk>,
}

fn collect(stream: AnswerStream<'_>) -> Streamed {
    let (mut audio, mut chunks) = (Vec::new(), Vec::new());
    let summary = stream
        .wait(|ev| {
            if let AnswerEvent::AudioChunk(c) = ev {
                assert_eq!(c.first_sample, audio.len(), "chunks must be gapless");
                audio.extend_from_slice(&c.samples);
                chunks.push(c.clone());
            }
        })
        .unwrap();
    assert_eq!(summary.audio_samples, audio.len());
    Streamed { summary, audio, chunks }
}

/// The non-streaming path: `prepare` on the message list, `generate_from_embeds`, `speak`.
fn fresh_run(
    model: &OmniModel,
    speech: &SpeechModels,
    messages: &[ChatMessage],
    clips: &[Vec<f32>],
    opts: &ConversationOptions,
) -> (ThinkerOutput, SpokenAnswer) {
    let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let prompt = model.prepare(messages, &refs).unwrap();
    let eos = opts.stop_ids.clone().unwrap_or_else(|| model.eos_ids().unwrap());
    let stop = StopRule { eos_ids: eos.clone(), max_new_tokens: opts.max_new_tokens };
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
    let speaker = opts.speaker.clone().unwrap_or_else(|| speech.default_speaker().unwrap());
    let spoken = speech.speak(model, &prompt, &out, &eos, &speaker, &opts.talker, |_| Ok(true)).unwrap();
    (out, spoken)
}

/// `10 log10(Σ ref² / Σ (ours − ref)²)`.
fn snr_db(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "waveform lengths differ");
    let signal: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = ours.iter().zip(reference).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
    10.0 * (signal / noise.max(1e-30)).log10()
}

/// The messages of a fresh run for the conversation's last turn: everything but its answer.
fn messages_before_last_answer(conv: &Conversation) -> Vec<ChatMessage> {
    let m = conv.messages();
    assert_eq!(m.last().unwrap().role, "assistant");
    m[..m.len() - 1].to_vec()
}

#[test]
fn streamed_codes_equal_non_streamed_codes_and_the_reference() {
    for name in TINY_MODELS {
        let (model, speech) = load(name);
        let golden = json(name, "golden.json");
        let talker = json(name, "talker.json");
        for case in talker["cases"].as_array().unwrap() {
            let case_name = format!("{name}/{}", case["name"].as_str().unwrap());
            let (system, turn) = prompt(&golden, case["prompt"].as_str().unwrap());
            let mut opts = ConversationOptions::greedy(
                case["thinker_max_new_tokens"].as_u64().unwrap() as usize,
                case["talker_max_new_tokens"].as_u64().unwrap() as usize,
            );
            opts.system = system;
            opts.speaker = Some(case["speaker"].as_str().unwrap().to_string());
            opts.stop_ids = Some(serde_json::from_value(case["thinker_eos"].clone()).unwrap());
            opts.chunking = StreamingOptions::carried(4);
            let mut conv = Conversation::new(model.clone(), Some(speech.clone()), opts.clone()).unwrap();
            let clips = turn.audio.clone();
            let streamed = collect(conv.answer(turn, CancelToken::new()).unwrap());
            let s = &streamed.summary;
            // 1. The Thinker's ids and the codes against the reference.
            let sequences: Vec<u32> = serde_json::from_value(case["sequences"].clone()).unwrap();
            let p = case["prompt_ids"].as_array().unwrap().len();
            assert_eq!(s.prompt_tokens, p, "{case_name}: prompt length");
            let generated: Vec<u32> =
                sequences[p..].iter().copied().filter(|id| !opts.stop_ids.as_ref().unwrap().contains(id)).collect();
            assert_eq!(s.token_ids, generated, "{case_name}: Thinker ids");
            let golden_codes: Vec<Vec<u32>> = serde_json::from_value(case["codes"].clone()).unwrap();
            assert_eq!(s.codes, golden_codes, "{case_name}: streamed codes differ from the reference");
            // 2. The non-streaming path: same ids and codes; waveform SNR.
            let (out, spoken) = fresh_run(&model, &speech, &messages_before_last_answer(&conv), &clips, &opts);
            assert_eq!(out.token_ids, s.token_ids, "{case_name}: non-streamed Thinker ids");
            assert_eq!(spoken.codes, s.codes, "{case_name}: streamed and non-streamed codes differ");
            let snr = snr_db(&streamed.audio, &spoken.audio);
            println!(
                "{case_name}: {} tokens, {} frames, {} chunks, {} samples; streamed vs chunked_decode SNR {snr:.1} dB; \
                 prefill {:.0} ms, first token {:.0?} ms, first audio {:.0?} ms, total {:.0} ms",
                s.token_ids.len(),
                s.codes.len(),
                streamed.chunks.len(),
                streamed.audio.len(),
                s.timings.prefill_ms,
                s.timings.first_token_ms,
                s.timings.first_audio_ms,
                s.timings.total_ms
            );
            assert!(snr > 90.0, "{case_name}: SNR {snr:.1} dB");
        }
    }
}

/// Options for the long answers of the ordering and cancellation tests: no Thinker eos, so the answer
/// has exactly `tokens` ids; chunks of 4 frames.
fn long_answer(tokens: usize) -> ConversationOptions {
    let mut opts = ConversationOptions::greedy(tokens, 64);
    opts.stop_ids = Some(Vec::new());
    opts.chunking = StreamingOptions::carried(4);
    opts
}

#[test]
fn first_audio_chunk_arrives_before_the_thinker_finishes() {
    const K: usize = 6;
    const TOKENS: usize = 40;
    for name in TINY_MODELS {
        let (model, speech) = load(name);
        // The Thinker is held after its K-th token until the test has seen an audio chunk (or 120 s).
        let (seen_tx, seen_rx) = crossbeam_channel::bounded::<()>(1);
        let timed_out = Arc::new(AtomicBool::new(false));
        let mut opts = long_answer(TOKENS);
        let flag = timed_out.clone();
        opts.after_token = Some(Arc::new(move |n| {
            if n == K && seen_rx.recv_timeout(Duration::from_secs(120)).is_err() {
                flag.store(true, Ordering::SeqCst);
            }
        }));
        let mut conv = Conversation::new(model.clone(), Some(speech.clone()), opts).unwrap();
        let (mut deltas, mut deltas_at_first_audio, mut thinker_done_before_audio) = (0, None, false);
        let mut audio = Vec::new();
        let summary = conv
            .answer(UserTurn::text("Hello! How are you today?"), CancelToken::new())
            .unwrap()
            .wait(|ev| match ev {
                AnswerEvent::TextDelta { .. } => deltas += 1,
                AnswerEvent::AudioChunk(c) => {
                    audio.extend_from_slice(&c.samples);
                    if deltas_at_first_audio.is_none() {
                        deltas_at_first_audio = Some(deltas);
                        let _ = seen_tx.try_send(());
                    }
                }
                AnswerEvent::ThinkerDone { .. } if deltas_at_first_audio.is_none() => thinker_done_before_audio = true,
                _ => {}
            })
            .unwrap();
        println!(
            "{name}: first audio chunk after {deltas_at_first_audio:?} of {} tokens (Thinker held at {K}); {} frames",
            summary.token_ids.len(),
            summary.codes.len()
        );
        // Longer than the reference's 25-frame left context: carried state still gives the whole decode.
        let full = speech.code2wav.chunked_decode(&CodecFrames::new(summary.codes.clone()), 300, 25).unwrap();
        let snr = snr_db(&audio, &full);
        println!(
            "{name}: {} frames in chunks of 4 (layer state carried) vs chunked_decode(300, 25): SNR {snr:.1} dB",
            summary.codes.len()
        );
        assert!(snr > 90.0, "{name}: SNR {snr:.1} dB");
        assert!(
            !timed_out.load(Ordering::SeqCst),
            "{name}: no audio chunk while the Thinker was held after {K} tokens"
        );
        assert!(!thinker_done_before_audio, "{name}: the Thinker finished before the first audio chunk");
        // The Thinker runs only a couple of tokens ahead of the Talker until the first chunk is out
        // (`FirstAudioPace`), so the chunk comes before it even reaches the hold.
        assert!(
            deltas_at_first_audio.is_some_and(|d| d <= K),
            "{name}: the first chunk must come before the Thinker passes its hold ({deltas_at_first_audio:?})"
        );
        assert_eq!(summary.token_ids.len(), TOKENS);
        assert_eq!(summary.finish, FinishReason::Length);
    }
}

#[test]
fn cancelled_answer_keeps_the_heard_text_and_the_next_turn_matches_a_fresh_run() {
    const K: usize = 8;
    let (model, speech) = load("tiny-a");
    // Held after K tokens until the test has cancelled (on the first audio chunk).
    let (cancelled_tx, cancelled_rx) = crossbeam_channel::bounded::<()>(1);
    let mut opts = long_answer(40);
    opts.after_token = Some(Arc::new(move |n| {
        if n == K {
            let _ = cancelled_rx.recv_timeout(Duration::from_secs(120));
        }
    }));
    let mut conv = Conversation::new(model.clone(), Some(speech.clone()), opts.clone()).unwrap();
    let cancel = CancelToken::new();
    let mut chunks: Vec<AudioChunk> = Vec::new();
    let first = conv
        .answer(UserTurn::text("Hello! How are you today?"), cancel.clone())
        .unwrap()
        .wait(|ev| {
            if let AnswerEvent::AudioChunk(c) = ev {
                if chunks.is_empty() {
                    cancel.cancel();
                    let _ = cancelled_tx.try_send(());
                }
                chunks.push(c.clone());
            }
        })
        .unwrap();
    assert_eq!(first.finish, FinishReason::Cancelled);
    // Cancelled on the first chunk: the Thinker (paced a couple of tokens ahead of the Talker, held at
    // K at the latest) stops at its next token.
    assert!((1..=K).contains(&first.token_ids.len()), "the Thinker stops at its next token: {} tokens", first.token_ids.len());
    assert_eq!(first.speech_finish, Some(FinishReason::Cancelled));
    let heard = chunks.last().unwrap().text_tokens;
    assert!((1..=first.token_ids.len()).contains(&heard), "heard {heard}");
    let kept = model.tokenizer.decode(&first.token_ids[..heard], true).unwrap();
    let last = conv.messages().last().unwrap().clone();
    assert_eq!(last, ChatMessage::text("assistant", &kept), "history keeps the text already spoken");
    println!(
        "cancelled after {} tokens, {} frames, {} chunk(s); history keeps {heard} token(s): {kept:?}",
        first.token_ids.len(),
        first.codes.len(),
        chunks.len()
    );
    // The next turn equals a fresh run on the message list (user, cut answer, user); the hook no
    // longer holds (its channel is closed).
    drop(cancelled_tx);
    let second = collect(conv.answer(UserTurn::text("Go on."), CancelToken::new()).unwrap()).summary;
    let (out, spoken) = fresh_run(&model, &speech, &messages_before_last_answer(&conv), &[], &opts);
    assert_eq!(out.token_ids, second.token_ids, "turn after a barge-in: Thinker ids");
    assert_eq!(spoken.codes, second.codes, "turn after a barge-in: codes");
    println!(
        "after the barge-in: {} of {} prompt tokens reused, {} tokens, {} frames",
        second.reused_tokens,
        second.prompt_tokens,
        second.token_ids.len(),
        second.codes.len()
    );
}

#[test]
fn two_turns_with_kv_reuse_equal_a_fresh_run_on_the_message_list() {
    for name in TINY_MODELS {
        let (model, speech) = load(name);
        let golden = json(name, "golden.json");
        let (system, turn1) = prompt(&golden, "system");
        let mut opts = ConversationOptions::greedy(8, 12);
        opts.system = system;
        opts.chunking = StreamingOptions::carried(4);
        let mut conv = Conversation::new(model.clone(), Some(speech.clone()), opts.clone()).unwrap();
        let first = collect(conv.answer(turn1, CancelToken::new()).unwrap()).summary;
        // Turn 2 with audio: its Talker rows go through hidden_projection of states from this turn's prefill.
        let (_, turn2) = prompt(&golden, "speech");
        let clips = turn2.audio.clone();
        let second = collect(conv.answer(turn2, CancelToken::new()).unwrap()).summary;
        let (out, spoken) = fresh_run(&model, &speech, &messages_before_last_answer(&conv), &clips, &opts);
        let forwarded = first.prompt_tokens + first.token_ids.len() - usize::from(first.finish == FinishReason::Length);
        println!(
            "{name}: turn 1 {} prompt + {} tokens ({:?}); turn 2 reused {} of {} prompt tokens ({}), {} tokens, {} frames",
            first.prompt_tokens,
            first.token_ids.len(),
            first.finish,
            second.reused_tokens,
            second.prompt_tokens,
            if second.reused_tokens == forwarded { "the whole first answer" } else { "up to the first prompt: the answer re-tokenises differently" },
            second.token_ids.len(),
            second.codes.len()
        );
        assert!(second.reused_tokens >= first.prompt_tokens, "{name}: the first prompt must come from the KV cache");
        assert_eq!(second.prompt_tokens, out.prompt_ids.len(), "{name}: prompt length");
        assert_eq!(out.token_ids, second.token_ids, "{name}: turn 2 Thinker ids differ from a fresh run");
        assert_eq!(spoken.codes, second.codes, "{name}: turn 2 codes differ from a fresh run");
    }
}

/// `Conversation::prime` before each turn (as the live loop does while nobody speaks) prefills the
/// system prompt and each next user turn's opening, and changes nothing of the answers.
#[test]
fn primed_turns_equal_unprimed_ones() {
    for name in TINY_MODELS {
        let (model, speech) = load(name);
        let golden = json(name, "golden.json");
        let (system, turn1) = prompt(&golden, "system");
        let (_, turn2) = prompt(&golden, "speech");
        let mut opts = ConversationOptions::greedy(8, 12);
        opts.system = system;
        opts.chunking = StreamingOptions::carried(4);
        let mut plain = Conversation::new(model.clone(), Some(speech.clone()), opts.clone()).unwrap();
        let mut primed = Conversation::new(model.clone(), Some(speech.clone()), opts).unwrap();
        let mut primed_counts = Vec::new();
        for turn in [turn1, turn2] {
            let want = collect(plain.answer(turn.clone(), CancelToken::new()).unwrap()).summary;
            let before = primed.cached_tokens();
            let n = primed.prime().unwrap();
            assert_eq!(primed.cached_tokens(), before + n, "{name}: prime reports what it prefilled");
            assert_eq!(primed.prime().unwrap(), 0, "{name}: a second prime has nothing left to do");
            primed_counts.push(n);
            let got = collect(primed.answer(turn, CancelToken::new()).unwrap()).summary;
            assert_eq!(got.token_ids, want.token_ids, "{name}: primed Thinker ids differ");
            assert_eq!(got.codes, want.codes, "{name}: primed codes differ");
            assert_eq!(got.prompt_tokens, want.prompt_tokens, "{name}: prompt length");
            assert_eq!(got.reused_tokens, before + n, "{name}: the primed tokens come from the cache");
        }
        println!("{name}: primed {primed_counts:?} tokens before the two turns");
        // The system prompt and `<|im_start|>user\n` before turn 1; the last answer's end and the
        // next opening before turn 2.
        assert!(primed_counts[0] > 3 && primed_counts[1] >= 3, "{name}: primed {primed_counts:?}");
    }
}

#[test]
fn cli_stream_gives_the_non_streamed_answer_and_wav() {
    let dir = tempfile::tempdir().unwrap();
    let run = |stream: bool, wav: &std::path::Path| -> Value {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omni"));
        cmd.args(["run", "--model"]).arg(fixture("tiny-a"));
        cmd.args(["--prompt", "Hello! How are you today?", "--temperature", "0", "--talker-temperature", "0"]);
        cmd.args(["--max-new-tokens", "24", "--max-speech-frames", "40", "--json", "--speech-out"]).arg(wav);
        if stream {
            cmd.arg("--stream");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (plain_wav, streamed_wav) = (dir.path().join("plain.wav"), dir.path().join("streamed.wav"));
    let plain = run(false, &plain_wav);
    let streamed = run(true, &streamed_wav);
    for key in ["prompt_token_ids", "token_ids", "text", "finish_reason", "codes", "sample_rate"] {
        assert_eq!(plain[key], streamed[key], "--stream changes {key}");
    }
    assert!(streamed["timings"]["first_audio_ms"].as_f64().is_some());
    let samples = |p: &std::path::Path| -> Vec<f32> {
        hound::WavReader::open(p).unwrap().samples::<i16>().map(|s| s.unwrap() as f32 / 32767.0).collect()
    };
    let snr = snr_db(&samples(&streamed_wav), &samples(&plain_wav));
    println!(
        "CLI: {} frames; streamed WAV vs plain WAV SNR {snr:.1} dB; first audio {} ms",
        streamed["codes"].as_array().unwrap().len(),
        streamed["timings"]["first_audio_ms"]
    );
    // 16-bit samples of the same waveform (to float rounding): a step apart at most here and there.
    assert!(snr > 90.0, "SNR {snr:.1} dB");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "temp files left behind: {left:?}");
}
