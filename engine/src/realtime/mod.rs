//! The live voice loop: microphone → 16 kHz → echo cancellation → VAD → turns → the model →
//! 24 kHz answer audio → speakers, with barge-in, and a typed event stream for a UI.
//!
//! Threads (issue #6):
//! - the **device callbacks** (cpal, or the WAV feeder/sink threads that stand in for them) only copy
//!   samples through lock-free SPSC rings ([`ringbuf`]) and bump atomic counters ([`LoopShared`]);
//!   they never allocate, lock or block;
//! - the **capture thread** ([`capture`]) pops the input ring, resamples to 16 kHz mono, cancels the
//!   echo with the played signal as reference ([`aec`]), runs the VAD ([`vad`], on its own thread
//!   because webrtc-vad's `Vad` is not `Send`) and cuts turns;
//! - the **playback thread** ([`playback`]) resamples answer chunks from 24 kHz to the device rate and
//!   fills the output ring;
//! - the **encoder thread** ([`encode`]) runs the streaming audio encoder on the open segment's samples
//!   while the user speaks (fed by the capture thread over a channel), so a turn's audio is encoded
//!   but for `finish` when it is cut;
//! - the **model thread** ([`answer`]) answers a turn, streaming text deltas and audio chunks, and stops
//!   when its cancel token is set;
//! - the **controller** ([`turns`]) ties them together with `crossbeam-channel` messages and publishes
//!   [`events::TalkEvent`]s.
//!
//! `omni talk` ([`talk`]) is the headless runner over all of it.

pub mod aec;
pub mod answer;
pub mod capture;
pub mod devices;
pub mod encode;
pub mod events;
pub mod playback;
pub mod resample;
pub mod talk;
pub mod turns;
pub mod vad;
pub mod virtual_io;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The rate the model hears (AuT input).
pub const CAPTURE_RATE: u32 = 16_000;
/// The rate Code2Wav speaks.
pub const ANSWER_RATE: u32 = 24_000;

/// Monotonic nanoseconds since the first call in this process: a timestamp a callback can store
/// in an atomic (`Instant::now` is a vDSO call: no allocation, no lock).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(base).as_nanos() as u64
}

/// Milliseconds between two [`now_ns`] stamps.
pub fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (to_ns as f64 - from_ns as f64) / 1e6
}

/// State shared by the callbacks and the worker threads: atomics only.
#[derive(Debug, Default)]
pub struct LoopShared {
    /// Input samples dropped because the input ring was full (the capture thread fell behind).
    pub input_overruns: AtomicU64,
    /// Output frames filled with silence while an answer was playing (the playback thread fell behind).
    pub output_underruns: AtomicU64,
    /// Device-side xruns reported by the audio backend.
    pub device_xruns: AtomicU64,
    /// Set by the backend's error callback when a device disappeared or the stream died.
    pub device_lost: AtomicBool,
    /// Set by the capture thread or the controller: the output callback discards everything queued.
    pub flush_output: AtomicBool,
    /// When the output callback last performed a flush, and how many queued samples it dropped.
    pub flushed_ns: AtomicU64,
    pub flushed_samples: AtomicU64,
    /// Set while answer audio is queued or playing (the playback thread sets, the output side clears
    /// through [`LoopShared::output_idle`]).
    pub playing: AtomicBool,
    /// Armed by the playback thread before a new answer's first sample; the output callback stores
    /// the time it hands that sample to the device in `first_out_ns` and disarms it.
    pub arm_first_out: AtomicBool,
    pub first_out_ns: AtomicU64,
    /// Samples (frames) the output side has handed to the device, answer audio only.
    pub frames_played: AtomicU64,
    /// Frames the input side has received.
    pub frames_captured: AtomicU64,
    /// True when the output ring was found empty by the last callback.
    pub output_idle: AtomicBool,
    /// Asks every thread to finish.
    pub shutdown: AtomicBool,
    /// A user turn is being answered (set by the capture thread when it ends a turn, cleared by the
    /// controller when the answer has played or was cancelled). The `--fast` WAV feeder waits on it.
    pub busy: AtomicBool,
    /// 16 kHz samples the capture thread has processed.
    pub capture_processed: AtomicU64,
    /// The input source has nothing more (end of the WAV file).
    pub input_ended: AtomicBool,
    /// The playback thread has queued the answer's last sample: an empty ring now is its end, not an
    /// underrun.
    pub tail_queued: AtomicBool,
    /// Answers of turns up to this id are cancelled (barge-in): playback drops their audio.
    pub cancelled_turn: AtomicU64,
}

impl LoopShared {
    pub fn new() -> Arc<Self> {
        let s = Self::default();
        s.output_idle.store(true, Ordering::Relaxed);
        Arc::new(s)
    }

    pub fn counters(&self) -> Counters {
        Counters {
            input_overruns: self.input_overruns.load(Ordering::Relaxed),
            output_underruns: self.output_underruns.load(Ordering::Relaxed),
            device_xruns: self.device_xruns.load(Ordering::Relaxed),
            frames_captured: self.frames_captured.load(Ordering::Relaxed),
            frames_played: self.frames_played.load(Ordering::Relaxed),
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// A snapshot of the counters, for events and the summary.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    pub input_overruns: u64,
    pub output_underruns: u64,
    pub device_xruns: u64,
    pub frames_captured: u64,
    pub frames_played: u64,
}

/// Sleep used by worker threads polling a ring: short against a 10 ms audio frame.
pub(crate) const POLL: Duration = Duration::from_millis(2);
