//! The controller: opens the audio ends, starts the capture, playback and model threads, routes
//! their messages, keeps per-turn records and timings, re-opens lost devices, and publishes
//! [`TalkEvent`]s. [`TalkLoop::start`] runs it on its own thread; [`TalkHandle`] drives push-to-talk
//! and stops it; the event receiver is the UI's subscription.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use serde::Serialize;

use super::aec::EchoMode;
use super::answer::{spawn_model_thread, AnswerRequest, Backend, ModelEvent, StreamingEncodeSetup};
use super::encode::{EncodeCommand, EncodeReport};
use super::capture::{spawn_capture, CaptureCommand, CaptureConfig, CaptureEvent, TurnMode};
use super::devices::{self, InputTap, OpenStream, OutputTap};
use super::events::{DevicePlacement, LoopState, TalkEvent, TurnTimings};
use super::playback::{spawn_playback, PlaybackCommand, PlaybackEvent};
use super::vad::VadSettings;
use super::virtual_io::{load_input_wav, spawn_wav_sink, spawn_wav_source};
use super::{ms_between, now_ns, Counters, LoopShared, ANSWER_RATE, CAPTURE_RATE};
use crate::conversation::{CancelToken, ConversationOptions};
use crate::pipeline::OmniModel;

/// Where the user's voice comes from.
#[derive(Debug, Clone)]
pub enum InputChoice {
    /// A cpal input device (`None`: the default one).
    Device(Option<String>),
    Wav(PathBuf),
}

/// Where the answer goes.
#[derive(Debug, Clone)]
pub enum OutputChoice {
    Device(Option<String>),
    Wav(PathBuf),
}

/// Everything the loop needs.
pub struct TalkConfig {
    pub model_dir: PathBuf,
    pub input: InputChoice,
    pub output: OutputChoice,
    pub mode: TurnMode,
    pub vad: VadSettings,
    pub echo: EchoMode,
    /// With WAV ends: no real-time pacing.
    pub fast: bool,
    pub backend: Backend,
    /// Device buffer length (fixed size).
    pub buffer_ms: u32,
    /// Stop after this many answered turns.
    pub max_turns: Option<usize>,
    /// Stop after this much wall time (seconds).
    pub max_seconds: Option<f64>,
    /// History kept (tokens in the KV cache) before the conversation starts afresh.
    pub max_context_tokens: usize,
    /// Test aid (`--dump-turns`): each turn's samples, streamed mel, stems and encoder output.
    pub dump_turns: Option<PathBuf>,
    /// Builds the answer options once the model is loaded.
    pub options: Box<dyn FnOnce(&OmniModel) -> Result<ConversationOptions> + Send>,
}

/// Per-turn result, as `omni talk --json`'s summary prints it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnReport {
    pub turn: u64,
    pub speech_end_ms: f64,
    pub first_audio_ms: Option<f64>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub codes: Vec<Vec<u32>>,
    pub cancelled: bool,
    pub user_seconds: f64,
    pub timings: TurnTimings,
    /// How the turn's audio was encoded (streaming during speech, or offline); `None` for the
    /// `offline` back end, which always encodes after the turn.
    pub encode: Option<EncodeReport>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TalkSummary {
    pub turns: Vec<TurnReport>,
    pub counters: Counters,
    pub barge_ins: usize,
    pub rejected_onsets: usize,
    /// ERLE we measured in each ~1 s window with the assistant audible (dB); windows where the user
    /// talked over the answer are low by nature.
    pub echo_windows_erle_db: Vec<f64>,
    /// The canceller's own last ERLE estimate (dB).
    pub aec_erle_db: Option<f64>,
    pub device_losses: usize,
}

/// Commands a front end sends to a running loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    PttStart,
    PttStop,
    Stop,
}

/// A running loop.
pub struct TalkHandle {
    control: Sender<Control>,
    thread: Option<JoinHandle<Result<TalkSummary>>>,
}

impl TalkHandle {
    pub fn send(&self, c: Control) {
        let _ = self.control.send(c);
    }
    pub fn controller(&self) -> Sender<Control> {
        self.control.clone()
    }
    /// Waits for the loop to end.
    pub fn join(mut self) -> Result<TalkSummary> {
        let t = self.thread.take().expect("joined once");
        t.join().map_err(|_| anyhow::anyhow!("the talk loop panicked"))?
    }
}

/// The live loop.
pub struct TalkLoop;

impl TalkLoop {
    /// Starts the loop; returns the handle and the event stream.
    pub fn start(cfg: TalkConfig) -> Result<(TalkHandle, Receiver<TalkEvent>)> {
        let (ev_tx, ev_rx) = unbounded();
        let (ctl_tx, ctl_rx) = unbounded();
        let thread = std::thread::Builder::new()
            .name("omni-talk".into())
            .spawn(move || {
                let r = Controller::run(cfg, ctl_rx, ev_tx.clone());
                if let Err(e) = &r {
                    let _ = ev_tx.send(TalkEvent::Error {
                        message: format!("{e:#}"),
                    });
                }
                r
            })
            .context("cannot start the talk loop")?;
        Ok((
            TalkHandle {
                control: ctl_tx,
                thread: Some(thread),
            },
            ev_rx,
        ))
    }
}

#[derive(Default)]
struct TurnRecord {
    report: TurnReport,
    speech_end_ns: u64,
    model_done: bool,
    playback_done: bool,
    audio_started: bool,
    first_audio_seen: bool,
}

/// Open audio ends (cpal streams or WAV threads).
struct Ends {
    input_stream: Option<OpenStream>,
    output_stream: Option<OpenStream>,
    sink: Option<JoinHandle<Result<()>>>,
    source: Option<JoinHandle<()>>,
    input_device: Option<cpal::Device>,
    output_device: Option<cpal::Device>,
}

struct Controller;

impl Controller {
    fn run(cfg: TalkConfig, control: Receiver<Control>, events: Sender<TalkEvent>) -> Result<TalkSummary> {
        let shared = LoopShared::new();
        let started = Instant::now();
        let (dev_err_tx, dev_err_rx) = unbounded::<(String, String)>();
        let wav_in = matches!(cfg.input, InputChoice::Wav(_));
        let wav_out = matches!(cfg.output, OutputChoice::Wav(_));
        if cfg.fast && !(wav_in && wav_out) {
            bail!("--fast needs --input-wav and --output-wav (devices run in real time)");
        }

        // 1. The model first (it takes longest; a bad checkpoint fails before devices open).
        let (req_tx, req_rx) = unbounded::<AnswerRequest>();
        let (model_tx, model_rx) = unbounded::<ModelEvent>();
        let (play_tx, play_rx) = unbounded::<PlaybackCommand>();
        // The conversation back end encodes each turn while it is spoken (see `encode`); the capture
        // thread holds the only sender, so the encoder thread ends with it.
        let (encode_tx, streaming) = if cfg.backend == Backend::Conversation {
            let (tx, rx) = unbounded::<EncodeCommand>();
            let setup = StreamingEncodeSetup {
                commands: rx,
                dump_dir: cfg.dump_turns.clone(),
            };
            (Some(tx), Some(setup))
        } else {
            (None, None)
        };
        let model_thread = spawn_model_thread(
            cfg.model_dir.clone(),
            cfg.backend,
            cfg.options,
            req_rx,
            model_tx,
            play_tx.clone(),
            streaming,
        )?;
        let speaks = loop {
            match model_rx.recv() {
                Ok(ModelEvent::Loading { what, done, total }) => {
                    let _ = events.send(TalkEvent::Loading { what, done, total });
                }
                Ok(ModelEvent::Loaded { speaks, .. }) => break speaks,
                Ok(ModelEvent::Failed { message, .. }) => bail!("{message}"),
                _ => bail!("the model thread ended while loading"),
            }
        };

        // 2. Audio ends. Rings carry mono f32 at the device rate.
        let host = if wav_in && wav_out {
            None
        } else {
            Some(devices::host()?)
        };
        let mut ends = Ends {
            input_stream: None,
            output_stream: None,
            sink: None,
            source: None,
            input_device: None,
            output_device: None,
        };
        let (in_prod, in_cons) = devices::ring(48_000, 2.0);
        let in_tap = InputTap {
            prod: in_prod,
            shared: shared.clone(),
        };
        // The WAV feeder starts below, once every thread listens.
        let mut source_pending: Option<(Vec<f32>, InputTap)> = None;
        let (input_name, input_rate, input_channels, input_buffer) = match &cfg.input {
            InputChoice::Wav(path) => {
                source_pending = Some((load_input_wav(path)?, in_tap));
                (path.display().to_string(), CAPTURE_RATE, 1u16, None::<u32>)
            }
            InputChoice::Device(name) => {
                let host = host.as_ref().expect("host for devices");
                let dev = devices::find_device(host, name.as_deref(), true)?;
                let s = devices::open_input(&dev, cfg.buffer_ms, in_tap, dev_err_tx.clone())?;
                let r = (s.name.clone(), s.rate, s.channels, Some(s.buffer_frames));
                ends.input_stream = Some(s);
                ends.input_device = Some(dev);
                r
            }
        };
        let (out_prod, out_cons) = devices::ring(48_000, 1.0);
        let (ref_prod, ref_cons) = devices::ring(48_000, 2.0);
        let out_tap = OutputTap {
            cons: out_cons,
            reference: ref_prod,
            shared: shared.clone(),
        };
        let (output_name, output_rate, output_channels, output_buffer) = match &cfg.output {
            OutputChoice::Wav(path) => {
                ends.sink = Some(spawn_wav_sink(path.clone(), ANSWER_RATE, out_tap, cfg.fast)?);
                (path.display().to_string(), ANSWER_RATE, 1u16, None)
            }
            OutputChoice::Device(name) => {
                let host = host.as_ref().expect("host for devices");
                let dev = devices::find_device(host, name.as_deref(), false)?;
                let s = devices::open_output(&dev, cfg.buffer_ms, out_tap, dev_err_tx.clone())?;
                let r = (s.name.clone(), s.rate, s.channels, Some(s.buffer_frames));
                ends.output_stream = Some(s);
                ends.output_device = Some(dev);
                r
            }
        };

        // 3. Worker threads.
        let (cap_cmd_tx, cap_cmd_rx) = unbounded::<CaptureCommand>();
        let (cap_ev_tx, cap_ev_rx) = unbounded::<CaptureEvent>();
        let (play_ev_tx, play_ev_rx) = unbounded::<PlaybackEvent>();
        // What we know of the render→capture delay: both device buffers and the ring kept ahead.
        let echo_delay_ms = (input_buffer.unwrap_or(0) as f64 * 1000.0 / input_rate as f64
            + output_buffer.unwrap_or(0) as f64 * 1000.0 / output_rate as f64) as i32;
        // A WAV in push-to-talk mode is one turn: the key is down from its first sample.
        let ptt_from_start = wav_in && cfg.mode == TurnMode::PushToTalk;
        let capture_cfg = CaptureConfig {
            mode: cfg.mode,
            vad: cfg.vad,
            echo: cfg.echo,
            echo_delay_ms,
            ptt_from_start,
            encoder: encode_tx,
        };
        let capture = spawn_capture(
            capture_cfg,
            in_cons,
            input_rate,
            ref_cons,
            output_rate,
            shared.clone(),
            cap_cmd_rx,
            cap_ev_tx,
        )?;
        let playback = spawn_playback(out_prod, output_rate, shared.clone(), play_rx, play_ev_tx)?;
        let placement = DevicePlacement {
            input: input_name,
            output: output_name,
            input_rate,
            output_rate,
            input_channels,
            output_channels,
            input_buffer_frames: input_buffer,
            output_buffer_frames: output_buffer,
            echo: cfg.echo.name().into(),
            mode: match cfg.mode {
                TurnMode::PushToTalk => "ptt".into(),
                TurnMode::HandsFree => "vad".into(),
            },
            model_device: "cpu".into(),
        };
        let _ = events.send(TalkEvent::Ready { placement });
        if !speaks {
            let _ = events.send(TalkEvent::Error {
                message: "this checkpoint has no talker: answers are text only".into(),
            });
        }
        if ptt_from_start {
            let _ = events.send(TalkEvent::SpeechStart { turn: 1, at_ms: 0.0 });
        }
        if let Some((samples, tap)) = source_pending.take() {
            ends.source = Some(spawn_wav_source(samples, tap, cfg.fast)?);
        }
        let _ = events.send(TalkEvent::State { state: LoopState::Idle });

        // 4. Route messages until done.
        let mut st = RunState {
            shared: shared.clone(),
            events: events.clone(),
            records: BTreeMap::new(),
            cancels: BTreeMap::new(),
            summary: TalkSummary::default(),
            input_ended: false,
            awaiting_first: None,
            state: None,
            fatal: None,
            awaiting_flush: None,
            max_context_tokens: cfg.max_context_tokens,
        };
        let mut reopen_at: Option<Instant> = None;
        let tick = Duration::from_millis(5);
        let mut last_counters = Instant::now();
        let mut stop = false;
        while !stop {
            select! {
                recv(control) -> c => match c {
                    Ok(Control::PttStart) => { let _ = cap_cmd_tx.send(CaptureCommand::PttStart); }
                    Ok(Control::PttStop) => { let _ = cap_cmd_tx.send(CaptureCommand::PttStop); }
                    Ok(Control::Stop) => stop = true,
                    Err(_) => {}
                },
                recv(cap_ev_rx) -> ev => if let Ok(ev) = ev { st.capture_event(ev, &req_tx)?; },
                recv(model_rx) -> ev => if let Ok(ev) = ev { st.model_event(ev); },
                recv(play_ev_rx) -> ev => if let Ok(ev) = ev { st.playback_event(ev); },
                recv(dev_err_rx) -> e => if let Ok((which, message)) = e {
                    st.summary.device_losses += 1;
                    let _ = events.send(TalkEvent::DeviceLost { which, message });
                    reopen_at = Some(Instant::now() + Duration::from_millis(500));
                },
                default(tick) => {}
            }
            st.poll_first_audio();
            st.poll_flush();
            if let Some(at) = reopen_at {
                if Instant::now() >= at {
                    match reopen(
                        &cfg.input,
                        &cfg.output,
                        &mut ends,
                        host.as_ref(),
                        cfg.buffer_ms,
                        &shared,
                        &dev_err_tx,
                        &cap_cmd_tx,
                        &play_tx,
                    ) {
                        Ok(which) => {
                            reopen_at = None;
                            for w in which {
                                let _ = events.send(TalkEvent::DeviceReopened { which: w });
                            }
                        }
                        Err(e) => {
                            tracing::debug!("re-open failed: {e:#}");
                            reopen_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
            if last_counters.elapsed() >= Duration::from_secs(1) {
                last_counters = Instant::now();
                let _ = events.send(TalkEvent::Counters {
                    counters: shared.counters(),
                });
            }
            if st.fatal.is_some() {
                break;
            }
            let all_done = st.records.values().all(|r| r.model_done && r.playback_done);
            if all_done && st.input_ended {
                stop = true;
            }
            if let Some(n) = cfg.max_turns {
                if all_done && st.records.values().filter(|r| r.model_done && r.playback_done).count() >= n {
                    stop = true;
                }
            }
            if let Some(s) = cfg.max_seconds {
                if started.elapsed().as_secs_f64() >= s {
                    stop = true;
                }
            }
        }

        // 5. Shut down: cancel answers, stop threads, close devices, finish the WAV.
        for c in st.cancels.values() {
            c.cancel();
        }
        drop(req_tx);
        shared.shutdown.store(true, Ordering::Release);
        let _ = capture.join();
        let _ = playback.join();
        drop(ends.input_stream.take());
        drop(ends.output_stream.take());
        if let Some(s) = ends.source.take() {
            let _ = s.join();
        }
        if let Some(s) = ends.sink.take() {
            s.join().map_err(|_| anyhow::anyhow!("the WAV sink panicked"))??;
        }
        drop(play_tx);
        let _ = model_thread.join();
        if let Some(e) = st.fatal.take() {
            bail!("{e}");
        }
        let mut summary = std::mem::take(&mut st.summary);
        summary.counters = shared.counters();
        summary.turns = st.records.into_values().map(|r| r.report).collect();
        let _ = events.send(TalkEvent::Counters {
            counters: summary.counters,
        });
        Ok(summary)
    }
}

/// Re-opens whichever device was lost; returns which.
#[allow(clippy::too_many_arguments)]
fn reopen(
    input: &InputChoice,
    output: &OutputChoice,
    ends: &mut Ends,
    host: Option<&cpal::Host>,
    buffer_ms: u32,
    shared: &Arc<LoopShared>,
    errors: &Sender<(String, String)>,
    capture: &Sender<CaptureCommand>,
    playback: &Sender<PlaybackCommand>,
) -> Result<Vec<String>> {
    let host = host.context("no audio host")?;
    let mut which = Vec::new();
    if let InputChoice::Device(name) = input {
        devices::retire_stream(ends.input_stream.take());
        let dev = devices::find_device(host, name.as_deref(), true)?;
        let (prod, cons) = devices::ring(48_000, 2.0);
        let s = devices::open_input(
            &dev,
            buffer_ms,
            InputTap {
                prod,
                shared: shared.clone(),
            },
            errors.clone(),
        )?;
        let _ = capture.send(CaptureCommand::NewInput { cons, rate: s.rate });
        ends.input_stream = Some(s);
        ends.input_device = Some(dev);
        which.push("input".to_string());
    }
    if let OutputChoice::Device(name) = output {
        devices::retire_stream(ends.output_stream.take());
        let dev = devices::find_device(host, name.as_deref(), false)?;
        let (out_prod, out_cons) = devices::ring(48_000, 1.0);
        let (ref_prod, ref_cons) = devices::ring(48_000, 2.0);
        let s = devices::open_output(
            &dev,
            buffer_ms,
            OutputTap {
                cons: out_cons,
                reference: ref_prod,
                shared: shared.clone(),
            },
            errors.clone(),
        )?;
        let _ = capture.send(CaptureCommand::NewReference {
            cons: ref_cons,
            rate: s.rate,
        });
        let _ = playback.send(PlaybackCommand::NewOutput {
            prod: out_prod,
            rate: s.rate,
        });
        ends.output_stream = Some(s);
        ends.output_device = Some(dev);
        which.push("output".to_string());
    }
    shared.device_lost.store(false, Ordering::Release);
    Ok(which)
}

struct RunState {
    shared: Arc<LoopShared>,
    events: Sender<TalkEvent>,
    records: BTreeMap<u64, TurnRecord>,
    cancels: BTreeMap<u64, CancelToken>,
    summary: TalkSummary,
    input_ended: bool,
    /// The turn whose first audio sample we wait for, and the stamp before it was armed.
    awaiting_first: Option<(u64, u64)>,
    state: Option<LoopState>,
    fatal: Option<String>,
    /// A barge-in whose flush we wait for: turn, detection stamp.
    awaiting_flush: Option<(u64, u64)>,
    max_context_tokens: usize,
}

impl RunState {
    fn set_state(&mut self, s: LoopState) {
        if self.state != Some(s) {
            self.state = Some(s);
            let _ = self.events.send(TalkEvent::State { state: s });
        }
    }

    fn capture_event(&mut self, ev: CaptureEvent, requests: &Sender<AnswerRequest>) -> Result<()> {
        match ev {
            CaptureEvent::Level { dbfs, voiced } => {
                let _ = self.events.send(TalkEvent::Level { dbfs, voiced });
            }
            CaptureEvent::SpeechStart { at_ms } => {
                let next = self.records.keys().last().copied().unwrap_or(0) + 1;
                let _ = self.events.send(TalkEvent::SpeechStart {
                    turn: next as usize,
                    at_ms,
                });
                self.set_state(LoopState::Listening);
            }
            CaptureEvent::SpeechRejected { at_ms, voiced_ms } => {
                self.summary.rejected_onsets += 1;
                let _ = self.events.send(TalkEvent::SpeechRejected { at_ms, voiced_ms });
                self.refresh_state();
            }
            CaptureEvent::BargeIn {
                at_ms,
                cancel_upto,
                detected_ns,
            } => {
                self.summary.barge_ins += 1;
                self.awaiting_flush = Some((cancel_upto, detected_ns));
                for (&t, c) in &self.cancels {
                    if t <= cancel_upto {
                        c.cancel();
                    }
                }
                for (&t, r) in self.records.iter_mut() {
                    if t <= cancel_upto && !(r.model_done && r.playback_done) {
                        r.report.cancelled = true;
                    }
                }
                let _ = self.events.send(TalkEvent::BargeIn {
                    turn: cancel_upto as usize,
                    at_ms,
                });
            }
            CaptureEvent::Turn {
                id,
                samples,
                speech_end_ms,
                speech_end_ns,
                declared_ns,
                encoded,
            } => {
                let seconds = samples.len() as f64 / CAPTURE_RATE as f64;
                let _ = self.events.send(TalkEvent::SpeechEnd {
                    turn: id as usize,
                    at_ms: speech_end_ms,
                    seconds,
                });
                let cancel = CancelToken::new();
                self.cancels.insert(id, cancel.clone());
                let mut rec = TurnRecord {
                    speech_end_ns,
                    ..Default::default()
                };
                rec.report.turn = id;
                rec.report.speech_end_ms = speech_end_ms;
                rec.report.user_seconds = seconds;
                rec.report.timings.speech_end_ms = speech_end_ms;
                rec.report.timings.endpoint_ms = ms_between(speech_end_ns, declared_ns);
                self.records.insert(id, rec);
                requests
                    .send(AnswerRequest {
                        turn: id,
                        samples,
                        cancel,
                        max_context_tokens: self.max_context_tokens,
                        encoded,
                    })
                    .context("the model thread has stopped")?;
                self.set_state(LoopState::Thinking);
            }
            CaptureEvent::Echo {
                stats,
                measured_erle_db,
                mic_dbfs,
            } => {
                if let Some(e) = measured_erle_db {
                    self.summary.echo_windows_erle_db.push(e);
                }
                if stats.erle_db.is_some() {
                    self.summary.aec_erle_db = stats.erle_db;
                }
                let _ = self.events.send(TalkEvent::Echo {
                    erle_db: stats.erle_db,
                    erl_db: stats.erl_db,
                    delay_ms: stats.delay_ms,
                    measured_erle_db,
                    mic_dbfs,
                });
            }
            CaptureEvent::InputEnded => self.input_ended = true,
            CaptureEvent::Error(e) => self.fatal = Some(e),
        }
        Ok(())
    }

    fn model_event(&mut self, ev: ModelEvent) {
        match ev {
            ModelEvent::Loading { .. } | ModelEvent::Loaded { .. } | ModelEvent::Audio { .. } => {}
            ModelEvent::Encoded {
                turn,
                finish_ms,
                report,
            } => {
                if let Some(r) = self.records.get_mut(&turn) {
                    r.report.timings.audio_finish_ms = finish_ms;
                    r.report.encode = Some(*report);
                }
            }
            ModelEvent::TextDelta { turn, text } => {
                if let Some(r) = self.records.get_mut(&turn) {
                    if r.report.timings.first_text_ms.is_none() {
                        r.report.timings.first_text_ms = Some(ms_between(r.speech_end_ns, now_ns()));
                    }
                }
                let _ = self.events.send(TalkEvent::TextDelta {
                    turn: turn as usize,
                    text,
                });
            }
            ModelEvent::Done { turn, summary } => {
                if let Some(r) = self.records.get_mut(&turn) {
                    r.model_done = true;
                    r.report.token_ids = summary.token_ids;
                    r.report.text = summary.text;
                    r.report.codes = summary.codes;
                    r.report.timings.prefill_ms = summary.timings.prefill_ms;
                    r.report.timings.decode_ms = summary.timings.thinker_ms - summary.timings.prefill_ms;
                    r.report.timings.speech_ms = summary.timings.total_ms;
                    if summary.finish == crate::generation::FinishReason::Cancelled {
                        r.report.cancelled = true;
                    }
                }
                self.finish_if_done(turn);
            }
            ModelEvent::Failed { turn, message } => {
                let _ = self.events.send(TalkEvent::Error {
                    message: message.clone(),
                });
                match turn.and_then(|t| self.records.get_mut(&t)) {
                    Some(r) => {
                        r.model_done = true;
                        r.report.cancelled = true;
                    }
                    None => self.fatal = Some(message),
                }
            }
        }
    }

    fn playback_event(&mut self, ev: PlaybackEvent) {
        match ev {
            PlaybackEvent::Started { turn } => {
                if let Some(r) = self.records.get_mut(&turn) {
                    r.audio_started = true;
                }
                self.awaiting_first = Some((turn, 0));
                self.set_state(LoopState::Speaking);
            }
            PlaybackEvent::Finished { turn, cancelled } => {
                if let Some(r) = self.records.get_mut(&turn) {
                    r.playback_done = true;
                    r.report.cancelled |= cancelled;
                }
                self.finish_if_done(turn);
            }
            PlaybackEvent::Error(e) => self.fatal = Some(e),
        }
    }

    /// The output callback's flush after a barge-in.
    fn poll_flush(&mut self) {
        let Some((turn, detected)) = self.awaiting_flush else {
            return;
        };
        if self.shared.flush_output.load(Ordering::Acquire) {
            return;
        }
        self.awaiting_flush = None;
        let at = self.shared.flushed_ns.load(Ordering::Acquire);
        if at >= detected {
            let _ = self.events.send(TalkEvent::PlaybackFlushed {
                turn: turn as usize,
                ms_after_barge_in: ms_between(detected, at),
                dropped_samples: self.shared.flushed_samples.load(Ordering::Relaxed),
            });
        }
    }

    /// The callback's first-sample stamp for the answer now starting.
    fn poll_first_audio(&mut self) {
        let Some((turn, _)) = self.awaiting_first else { return };
        if self.shared.arm_first_out.load(Ordering::Acquire) {
            return;
        }
        let stamp = self.shared.first_out_ns.load(Ordering::Acquire);
        self.awaiting_first = None;
        if let Some(r) = self.records.get_mut(&turn) {
            if !r.first_audio_seen && stamp >= r.speech_end_ns && !r.report.cancelled {
                r.first_audio_seen = true;
                let ms = ms_between(r.speech_end_ns, stamp);
                r.report.first_audio_ms = Some(ms);
                r.report.timings.first_audio_ms = Some(ms);
                let _ = self.events.send(TalkEvent::FirstAudio {
                    turn: turn as usize,
                    ms_after_speech_end: ms,
                });
            }
        }
    }

    fn finish_if_done(&mut self, turn: u64) {
        let Some(r) = self.records.get(&turn) else { return };
        if !(r.model_done && r.playback_done) {
            return;
        }
        self.poll_first_audio();
        let r = &self.records[&turn];
        let _ = self.events.send(TalkEvent::TurnDone {
            turn: turn as usize,
            text: r.report.text.clone(),
            cancelled: r.report.cancelled,
            timings: r.report.timings.clone(),
        });
        self.cancels.remove(&turn);
        if self.records.values().all(|r| r.model_done && r.playback_done) {
            self.shared.busy.store(false, Ordering::Release);
        }
        self.refresh_state();
    }

    fn refresh_state(&mut self) {
        let s = if self.shared.playing.load(Ordering::Acquire) {
            LoopState::Speaking
        } else if self.records.values().any(|r| !r.model_done) {
            LoopState::Thinking
        } else {
            LoopState::Idle
        };
        self.set_state(s);
    }
}
