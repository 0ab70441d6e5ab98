//! WAV files standing in for the microphone and the speaker (`--input-wav`, `--output-wav`): threads
//! that call the same [`InputTap`]/[`OutputTap`] a cpal callback calls, at real-time pace (10 ms
//! periods against a clock, so pacing does not drift), or as fast as the loop can take it (`--fast`).
//!
//! The microphone file is decoded as `omni run --audio` decodes it (any format, resampled to 16 kHz
//! mono with the same resampler), so a push-to-talk turn made of the whole file reaches the model
//! with exactly the samples `omni run` would give it. With `--fast` the feeder moves in lock step with
//! the capture thread and pauses while a turn is being answered, so runs are deterministic.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringbuf::traits::Observer;

use super::devices::{InputTap, OutputTap};
use super::{LoopShared, CAPTURE_RATE, POLL};

/// Samples per pacing period (10 ms).
fn period(rate: u32) -> usize {
    rate as usize / 100
}

/// Decodes `path` like `omni run --audio` (16 kHz mono); silence is an error.
pub fn load_input_wav(path: &Path) -> Result<Vec<f32>> {
    let decoded = crate::audio::load_audio_16k_mono(path)?;
    if decoded.is_silent() {
        bail!(
            "{}: the audio is silent (peak below -120 dBFS); nothing to hear",
            path.display()
        );
    }
    Ok(decoded.samples)
}

/// Feeds `samples` (16 kHz mono) into `tap`; marks `input_ended` after the last one.
pub fn spawn_wav_source(samples: Vec<f32>, mut tap: InputTap, fast: bool) -> Result<JoinHandle<()>> {
    let shared = tap.shared.clone();
    std::thread::Builder::new()
        .name("omni-wav-source".into())
        .spawn(move || {
            let step = period(CAPTURE_RATE);
            let start = Instant::now();
            let mut pushed = 0u64;
            for (i, chunk) in samples.chunks(step).enumerate() {
                if shared.is_shutdown() {
                    return;
                }
                if fast {
                    // Lock step: the capture thread has processed everything, and no turn is pending.
                    while !shared.is_shutdown()
                        && (shared.capture_processed.load(Ordering::Acquire) < pushed
                            || shared.busy.load(Ordering::Acquire))
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    // Never overrun in fast mode: wait for room.
                    while !shared.is_shutdown() && tap.prod.vacant_len() < chunk.len() {
                        std::thread::sleep(POLL);
                    }
                } else {
                    let due = start + Duration::from_millis(10 * i as u64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                for &x in chunk {
                    tap.push(x);
                }
                tap.shared
                    .frames_captured
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                pushed += chunk.len() as u64;
            }
            shared.input_ended.store(true, Ordering::Release);
        })
        .context("cannot start the WAV source thread")
}

/// Drains `tap` into a 16-bit WAV at `rate` (written to a temp name, renamed when the thread ends).
/// Real-time: silence fills the gaps, so the file is the speaker's timeline. `--fast`: only answer
/// samples are written.
pub fn spawn_wav_sink(path: PathBuf, rate: u32, mut tap: OutputTap, fast: bool) -> Result<JoinHandle<Result<()>>> {
    let shared = tap.shared.clone();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_owned();
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(&tmp, spec).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::thread::Builder::new()
        .name("omni-wav-sink".into())
        .spawn(move || {
            let step = period(rate);
            let mut buf = vec![0.0f32; step];
            let start = Instant::now();
            let mut i = 0u64;
            while !shared.is_shutdown() {
                let frames = if fast {
                    let n = tap.cons.occupied_len().min(step);
                    if n == 0 {
                        shared.output_idle.store(true, Ordering::Release);
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    n
                } else {
                    let due = start + Duration::from_millis(10 * i);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    i += 1;
                    step
                };
                tap.fill(frames, |k, x| buf[k] = x);
                for &x in &buf[..frames] {
                    writer.write_sample((x.clamp(-1.0, 1.0) * 32767.0).round() as i16)?;
                }
            }
            writer
                .finalize()
                .with_context(|| format!("cannot finish {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
            Ok(())
        })
        .context("cannot start the WAV sink thread")
}

/// Keeps `shared` alive in type signatures that want it.
pub type Shared = Arc<LoopShared>;
