//! The typed event stream a UI (or `omni talk --json`) subscribes to.
//!
//! Every event is one serde value tagged `"event"`; `--json` prints one per line. The stream is a
//! `crossbeam-channel` receiver: the loop never blocks on a slow subscriber (unbounded channel; a
//! UI that stops reading only costs memory, never audio).

use serde::Serialize;

use super::Counters;

/// What the assistant is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopState {
    /// Waiting for the user (hands-free) or for push-to-talk.
    Idle,
    /// The user is speaking (a turn is being recorded).
    Listening,
    /// The model is working on an answer, nothing audible yet.
    Thinking,
    /// Answer audio is playing.
    Speaking,
}

/// Where a device or stage runs, for the UI's placement panel.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlacement {
    pub input: String,
    pub output: String,
    pub input_rate: u32,
    pub output_rate: u32,
    pub input_channels: u16,
    pub output_channels: u16,
    /// Frames per device buffer (fixed), `None` for the WAV stand-ins' defaults.
    pub input_buffer_frames: Option<u32>,
    pub output_buffer_frames: Option<u32>,
    /// `aec3` (sonora), `gate` or `off`.
    pub echo: String,
    /// `ptt` or `vad`.
    pub mode: String,
    /// Compute device of the model stages.
    pub model_device: String,
}

/// Per-turn timings in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnTimings {
    /// Input-stream time (ms of captured audio since the start) where the user's speech ended.
    pub speech_end_ms: f64,
    /// Wall time from the end of speech (last voiced frame processed, or PTT stop) to the end of the
    /// turn being declared (the VAD hangover; 0 for PTT).
    pub endpoint_ms: f64,
    /// Wall time from the end of speech to the first answer sample leaving the output buffer.
    pub first_audio_ms: Option<f64>,
    /// Wall time from the end of speech to the first text delta.
    pub first_text_ms: Option<f64>,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub speech_ms: f64,
    /// Wall time of the streaming audio encoder's `finish` for this turn: the encoder work left after
    /// the end of speech (the mel frames and chunk stems ran while the user spoke). `None`: the turn
    /// was encoded offline (the `offline` back end, or a fallback, see the turn's `encode` report).
    pub audio_finish_ms: Option<f64>,
}

/// One event of the loop.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TalkEvent {
    /// The model is loading: `done` of `total` steps of `what` (Thinker layers), at most every 100 ms.
    Loading {
        what: String,
        done: usize,
        total: usize,
    },
    /// Devices opened (or re-opened) and where the model runs.
    Ready {
        placement: DevicePlacement,
    },
    State {
        state: LoopState,
    },
    /// VAD level of the last 10 ms frame (dBFS after echo cancellation) and the VAD decision, at most
    /// every 50 ms.
    Level {
        dbfs: f32,
        voiced: bool,
    },
    SpeechStart {
        turn: usize,
        at_ms: f64,
    },
    SpeechEnd {
        turn: usize,
        at_ms: f64,
        seconds: f64,
    },
    /// A speech onset that did not last `min_speech_ms`: not a turn.
    SpeechRejected {
        at_ms: f64,
        voiced_ms: f64,
    },
    /// The user spoke over the answer: playback flushed, generation cancelled.
    BargeIn {
        turn: usize,
        at_ms: f64,
    },
    /// The output callback dropped the queued answer audio `ms_after_barge_in` after the barge-in
    /// was detected (at most one device buffer later).
    PlaybackFlushed {
        turn: usize,
        ms_after_barge_in: f64,
        dropped_samples: u64,
    },
    TextDelta {
        turn: usize,
        text: String,
    },
    /// The first answer sample of `turn` left the output buffer.
    FirstAudio {
        turn: usize,
        ms_after_speech_end: f64,
    },
    TurnDone {
        turn: usize,
        text: String,
        cancelled: bool,
        timings: TurnTimings,
    },
    /// Echo handling over the last ~1 s window in which the assistant was audible: AEC3's own
    /// ERLE/ERL/delay estimates, our measured ERLE (`10 log10(Σmic²/Σout²)`, the true ERLE when the
    /// user is silent) and the microphone level before cancellation (dBFS).
    Echo {
        erle_db: Option<f64>,
        erl_db: Option<f64>,
        delay_ms: Option<i32>,
        measured_erle_db: Option<f64>,
        mic_dbfs: Option<f64>,
    },
    Counters {
        counters: Counters,
    },
    /// A device disappeared or failed; the loop re-opens it when it can.
    DeviceLost {
        which: String,
        message: String,
    },
    DeviceReopened {
        which: String,
    },
    Error {
        message: String,
    },
}
