//! `omni bench`: the stages to time (arguments) and the dispatch to `omni_engine::bench`.

use std::path::Path;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub(super) enum BenchWhat {
    /// Mel features + AuT encoder (32 layers, d_model 1280) on synthetic audio.
    AudioEncoder {
        /// Seconds of audio to encode.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Streaming encode: stems during speech (10 ms pushes), time left at the end vs offline.
        #[arg(long)]
        streaming: bool,
    },
    /// Talker frames/s, code predictor ms/frame, streaming Code2Wav, real-time factor, time to the
    /// first audio chunk (real shapes, random Q8_0 weights made in memory: no files needed).
    Speech {
        /// Codec frames to make (80 ms of audio each).
        #[arg(long, default_value_t = 100)]
        frames: usize,
        /// Rows of the Talker prefill (the user turn + 9 assistant rows).
        #[arg(long, default_value_t = 80)]
        prefill_rows: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Thinker prefill and decode tokens/s (real shapes, random Q8_0 weights made in memory).
    Thinker {
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 32)]
        gen: usize,
        /// Thinker decoder layers to load (48 = all, ~35 GB at Q8_0); fewer are extrapolated.
        #[arg(long, default_value_t = 48)]
        layers: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// The Q8_0 product kernels alone: GMAC/s at the shapes of the latency path, all threads and one.
    Matmul {
        /// Timed calls per shape (median).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// End of user speech → first answer audio, stage by stage (real shapes, random Q8_0 weights).
    Latency {
        /// Seconds of user speech.
        #[arg(long, default_value_t = 5.0)]
        speech_seconds: f64,
        /// Tokens of the system prompt.
        #[arg(long, default_value_t = 40)]
        system_tokens: usize,
        /// Thinker decoder layers to load (48 = all, ~35 GB at Q8_0); fewer are extrapolated.
        #[arg(long, default_value_t = 48)]
        layers: usize,
        /// Run the turn through the streaming conversation API (Thinker and Talker threads) instead
        /// of the stage-by-stage composition.
        #[arg(long)]
        conversation: bool,
        /// Prefill the system prompt and the user turn's opening after the end of speech too, as if
        /// nothing were primed while the user spoke (the product primes them: `Conversation::prime`).
        #[arg(long)]
        no_prime: bool,
        /// With --conversation: let the answer speak this many seconds (0: stop at the first chunk)
        /// and report how a player fed its chunks would have stalled.
        #[arg(long, default_value_t = 0.0)]
        answer_seconds: f64,
        #[command(flatten)]
        common: BenchCommon,
    },
}

/// Options every in-memory bench takes.
#[derive(Args, Clone)]
pub(super) struct BenchCommon {
    /// Threads for candle (sets RAYON_NUM_THREADS and CANDLE_NUM_THREADS); default: physical cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Seed of the random weights and sampling.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Frames per streaming Code2Wav chunk (default: the product's).
    #[arg(long)]
    chunk_frames: Option<usize>,
    /// Frames of the first Code2Wav chunk in `bench latency` (default: the product's, 1).
    #[arg(long)]
    first_chunk_frames: Option<usize>,
    /// Code2Wav frames re-decoded before each chunk, as the reference's `chunked_decode` (25)
    /// (default: the product's, every layer's state carried between chunks).
    #[arg(long)]
    left_context: Option<usize>,
}

pub(super) fn bench(what: &BenchWhat, cache: &Path) -> Result<()> {
    match what {
        BenchWhat::AudioEncoder { seconds, streaming } => {
            if !(*seconds > 0.0 && *seconds <= 3600.0) {
                bail!("--seconds must be in (0, 3600]");
            }
            if *streaming {
                let r = omni_engine::audio::stream::bench_streaming_audio_encoder(cache, *seconds)?;
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            let r = omni_engine::bench::bench_audio_encoder(cache, *seconds)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchWhat::Speech { frames, prefill_rows, common } => {
            use omni_engine::bench::speech::{bench_speech, SpeechBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let mut o = SpeechBenchOptions { frames: *frames, prefill_rows: *prefill_rows, seed: common.seed, ..Default::default() };
            o.chunk_frames = common.chunk_frames.unwrap_or(o.chunk_frames);
            o.left_context = common.left_context.or(o.left_context);
            let r = bench_speech(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Thinker { prompt_tokens, gen, layers, common } => {
            use omni_engine::bench::thinker::{bench_thinker, ThinkerBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let o = ThinkerBenchOptions { prompt_tokens: *prompt_tokens, gen_tokens: *gen, layers: *layers, seed: common.seed };
            let r = bench_thinker(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Matmul { iters, common } => {
            use omni_engine::bench::matmul::{bench_matmul, default_shapes};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let r = bench_matmul(&default_shapes(), *iters)?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Latency { speech_seconds, system_tokens, layers, conversation: true, no_prime, answer_seconds, common } => {
            omni_engine::bench::machine::set_threads(common.threads)?;
            let r = omni_engine::bench::conversation::bench_conversation_latency(
                *speech_seconds,
                *system_tokens,
                *layers,
                common.chunk_frames.unwrap_or(8),
                common.seed,
                !*no_prime,
                *answer_seconds,
                common.left_context,
            )?;
            print_bench(common.json, &r.table(), &r)?;
        }
        BenchWhat::Latency { speech_seconds, system_tokens, layers, conversation: false, no_prime, answer_seconds, common } => {
            if *answer_seconds != 0.0 {
                bail!("--answer-seconds needs --conversation");
            }
            use omni_engine::bench::latency::{bench_latency, LatencyBenchOptions};
            omni_engine::bench::machine::set_threads(common.threads)?;
            let mut o = LatencyBenchOptions {
                speech_seconds: *speech_seconds,
                system_tokens: *system_tokens,
                layers: *layers,
                seed: common.seed,
                prime: !*no_prime,
                ..Default::default()
            };
            o.chunk_frames = common.chunk_frames.unwrap_or(o.chunk_frames);
            o.first_chunk_frames = common.first_chunk_frames.unwrap_or(o.first_chunk_frames);
            o.left_context = common.left_context.or(o.left_context);
            let r = bench_latency(&o)?;
            print_bench(common.json, &r.table(), &r)?;
        }
    }
    Ok(())
}

/// A bench result: the table on stdout, or JSON on stdout and the table on stderr.
fn print_bench(json: bool, table: &str, result: &impl serde::Serialize) -> Result<()> {
    if json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(result)?);
    } else {
        print!("{table}");
    }
    if omni_engine::profile::enabled() {
        eprint!("\nwhere the time went (OMNI_PROFILE; nested spans overlap):\n{}", omni_engine::profile::table(&omni_engine::profile::take()));
    }
    Ok(())
}
