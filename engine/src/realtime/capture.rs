//! The capture thread: input ring → 16 kHz mono → echo canceller (render reference from the output
//! tap) → VAD / push-to-talk → turns, barge-in and level events for the controller.
//!
//! It owns the webrtc-vad `Vad` (not `Send`: built here, never moved). Barge-in is decided here, on
//! the frame that confirms the user's speech: the output flush flag is raised at once (the output
//! callback drops its queue on its next buffer) and the controller is told, which cancels the model.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use ringbuf::traits::{Consumer, Observer};
use ringbuf::HeapCons;

use super::aec::{EchoCanceller, EchoMode, EchoStats, AEC_FRAME};
use super::encode::{EncodeCommand, EncodedSegment};
use super::resample::StreamResampler;
use super::vad::{frame_dbfs, Segmenter, VadEvent, VadSettings};
use super::{now_ns, LoopShared, CAPTURE_RATE, POLL};

/// Turn taking mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnMode {
    PushToTalk,
    HandsFree,
}

/// Commands for the capture thread.
pub enum CaptureCommand {
    PttStart,
    PttStop,
    /// A re-opened input device: its ring and rate.
    NewInput {
        cons: HeapCons<f32>,
        rate: u32,
    },
    /// A re-opened output device: its reference ring and rate.
    NewReference {
        cons: HeapCons<f32>,
        rate: u32,
    },
}

/// What the capture thread reports.
#[derive(Debug)]
pub enum CaptureEvent {
    Level {
        dbfs: f32,
        voiced: bool,
    },
    SpeechStart {
        at_ms: f64,
    },
    SpeechRejected {
        at_ms: f64,
        voiced_ms: f64,
    },
    /// The user spoke over the answer; playback was flushed and turns up to `cancel_upto` cancelled.
    BargeIn {
        at_ms: f64,
        cancel_upto: u64,
        detected_ns: u64,
    },
    /// A user turn (16 kHz mono). `speech_end_ns`: when the frame holding the end of speech was
    /// processed (or PTT stop); `declared_ns`: when the turn was cut.
    Turn {
        id: u64,
        samples: Vec<f32>,
        speech_end_ms: f64,
        speech_end_ns: u64,
        declared_ns: u64,
        /// The streaming encoder's result for exactly these samples, when it was fed.
        encoded: Option<Receiver<Result<EncodedSegment, String>>>,
    },
    /// The last window (about 1 s) with the assistant audible: the canceller's statistics, our ERLE
    /// measurement and the microphone level before cancellation.
    Echo {
        stats: EchoStats,
        measured_erle_db: Option<f64>,
        mic_dbfs: Option<f64>,
    },
    /// The input source has ended and everything was processed.
    InputEnded,
    Error(String),
}

pub struct CaptureConfig {
    pub mode: TurnMode,
    pub vad: VadSettings,
    pub echo: EchoMode,
    /// Render → capture delay we know of (device buffers), for AEC3.
    pub echo_delay_ms: i32,
    /// Push-to-talk is down from the first sample (a WAV file that is one turn).
    pub ptt_from_start: bool,
    /// The streaming encoder thread ([`super::encode`]): fed the open segment's samples during speech.
    pub encoder: Option<Sender<EncodeCommand>>,
}

/// The segment being fed to the streaming encoder: its id and how many of its samples were sent.
struct Feed {
    segment: u64,
    fed: usize,
}

/// Starts the capture thread.
pub fn spawn_capture(
    cfg: CaptureConfig,
    input: HeapCons<f32>,
    input_rate: u32,
    reference: HeapCons<f32>,
    reference_rate: u32,
    shared: Arc<LoopShared>,
    commands: Receiver<CaptureCommand>,
    events: Sender<CaptureEvent>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("omni-capture".into())
        .spawn(move || {
            let mut worker = match Capture::new(
                cfg,
                input,
                input_rate,
                reference,
                reference_rate,
                shared,
                events.clone(),
            ) {
                Ok(w) => w,
                Err(e) => {
                    let _ = events.send(CaptureEvent::Error(format!("{e:#}")));
                    return;
                }
            };
            if let Err(e) = worker.run(&commands) {
                let _ = events.send(CaptureEvent::Error(format!("capture thread: {e:#}")));
            }
        })
        .context("cannot start the capture thread")
}

struct Capture {
    cfg: CaptureConfig,
    input: HeapCons<f32>,
    input_rs: StreamResampler,
    reference: HeapCons<f32>,
    reference_rs: StreamResampler,
    shared: Arc<LoopShared>,
    events: Sender<CaptureEvent>,
    segmenter: Segmenter,
    aec: EchoCanceller,
    /// Scratch buffers, reused.
    raw: Vec<f32>,
    mic16: Vec<f32>,
    ref16: Vec<f32>,
    clean: Vec<f32>,
    /// Push-to-talk recording, when the key is down.
    ptt: Option<Vec<f32>>,
    turns: u64,
    /// 16 kHz samples through the AEC so far.
    position: u64,
    last_level_at: u64,
    last_echo_at: u64,
    speech_end_ns: u64,
    feed: Option<Feed>,
    segments: u64,
}

impl Capture {
    fn new(
        cfg: CaptureConfig,
        input: HeapCons<f32>,
        input_rate: u32,
        reference: HeapCons<f32>,
        reference_rate: u32,
        shared: Arc<LoopShared>,
        events: Sender<CaptureEvent>,
    ) -> Result<Self> {
        let segmenter = Segmenter::new(cfg.vad)?;
        let aec = EchoCanceller::new(cfg.echo, cfg.echo_delay_ms);
        let mut capture = Self {
            input,
            input_rs: StreamResampler::new(input_rate, CAPTURE_RATE)?,
            reference,
            reference_rs: StreamResampler::new(reference_rate, CAPTURE_RATE)?,
            shared,
            events,
            segmenter,
            aec,
            raw: vec![0.0; 4096],
            mic16: Vec::with_capacity(8192),
            ref16: Vec::with_capacity(8192),
            clean: Vec::with_capacity(8192),
            ptt: cfg
                .ptt_from_start
                .then(|| Vec::with_capacity(CAPTURE_RATE as usize * 10)),
            turns: 0,
            position: 0,
            last_level_at: 0,
            last_echo_at: 0,
            speech_end_ns: 0,
            feed: None,
            segments: 0,
            cfg,
        };
        if capture.ptt.is_some() {
            capture.begin_segment(); // push-to-talk down from the first sample
        }
        Ok(capture)
    }

    /// A segment opened (VAD onset or push-to-talk down): a fresh streaming encoder state.
    fn begin_segment(&mut self) {
        let Some(enc) = &self.cfg.encoder else { return };
        self.segments += 1;
        let segment = self.segments;
        let _ = enc.send(EncodeCommand::Begin { segment });
        self.feed = Some(Feed { segment, fed: 0 });
    }

    /// Sends the open segment's samples that are certain to stay in its turn and were not sent yet.
    /// Called between input batches, never inside the end-of-input padding (see `end_of_input`).
    fn feed_open_segment(&mut self) {
        let (Some(enc), Some(feed)) = (&self.cfg.encoder, &mut self.feed) else { return };
        let committed: &[f32] = match self.cfg.mode {
            TurnMode::PushToTalk => self.ptt.as_deref().unwrap_or(&[]),
            TurnMode::HandsFree => self.segmenter.committed_samples().unwrap_or(&[]),
        };
        if committed.len() > feed.fed {
            let _ = enc.send(EncodeCommand::Samples {
                segment: feed.segment,
                samples: committed[feed.fed..].to_vec(),
            });
            feed.fed = committed.len();
        }
    }

    /// The open segment will not be a turn: its encoder state goes.
    fn discard_segment(&mut self) {
        if let (Some(enc), Some(feed)) = (&self.cfg.encoder, self.feed.take()) {
            let _ = enc.send(EncodeCommand::Discard { segment: feed.segment });
        }
    }

    /// The turn's samples are final: the rest goes to the encoder, then `finish`; returns its reply.
    fn finish_segment(&mut self, samples: &[f32], end_ns: u64) -> Option<Receiver<Result<EncodedSegment, String>>> {
        let enc = self.cfg.encoder.as_ref()?;
        let feed = self.feed.take()?;
        if feed.fed > samples.len() {
            // Cannot happen with the committed-prefix rule; the model thread would fall back anyway.
            let _ = enc.send(EncodeCommand::Discard { segment: feed.segment });
            return None;
        }
        if samples.len() > feed.fed {
            let _ = enc.send(EncodeCommand::Samples {
                segment: feed.segment,
                samples: samples[feed.fed..].to_vec(),
            });
        }
        let (reply, result) = crossbeam_channel::bounded(1);
        enc.send(EncodeCommand::Finish { segment: feed.segment, end_ns, reply }).ok()?;
        Some(result)
    }

    fn ms(&self, sample: u64) -> f64 {
        sample as f64 * 1000.0 / CAPTURE_RATE as f64
    }

    fn run(&mut self, commands: &Receiver<CaptureCommand>) -> Result<()> {
        let mut ended_reported = false;
        while !self.shared.is_shutdown() {
            let mut worked = false;
            // 1. Reference first: what was played up to now.
            loop {
                let n = self.reference.pop_slice(&mut self.raw);
                if n == 0 {
                    break;
                }
                let raw = std::mem::take(&mut self.raw);
                self.reference_rs.process(&raw[..n], &mut self.ref16)?;
                self.raw = raw;
            }
            // 2. Microphone.
            let n = self.input.pop_slice(&mut self.raw);
            if n > 0 {
                worked = true;
                let raw = std::mem::take(&mut self.raw);
                self.input_rs.process(&raw[..n], &mut self.mic16)?;
                self.raw = raw;
                self.process_available()?;
                self.feed_open_segment();
            }
            // 3. Commands (after the samples that came before them).
            while let Ok(cmd) = commands.try_recv() {
                worked = true;
                self.command(cmd)?;
            }
            if !worked {
                if self.shared.input_ended.load(Ordering::Acquire) && self.input.is_empty() && !ended_reported {
                    self.end_of_input()?;
                    ended_reported = true;
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    fn command(&mut self, cmd: CaptureCommand) -> Result<()> {
        match cmd {
            CaptureCommand::PttStart => {
                if self.ptt.is_none() {
                    self.ptt = Some(Vec::with_capacity(CAPTURE_RATE as usize * 10));
                    self.begin_segment();
                    let at_ms = self.ms(self.position);
                    if self.answer_active() {
                        self.barge_in(at_ms);
                    }
                    let _ = self.events.send(CaptureEvent::SpeechStart { at_ms });
                }
            }
            CaptureCommand::PttStop => {
                if let Some(samples) = self.ptt.take() {
                    let now = now_ns();
                    self.emit_turn(samples, self.position, now, now);
                }
            }
            CaptureCommand::NewInput { cons, rate } => {
                self.input = cons;
                self.input_rs = StreamResampler::new(rate, CAPTURE_RATE)?;
            }
            CaptureCommand::NewReference { cons, rate } => {
                self.reference = cons;
                self.reference_rs = StreamResampler::new(rate, CAPTURE_RATE)?;
                self.ref16.clear();
            }
        }
        Ok(())
    }

    fn end_of_input(&mut self) -> Result<()> {
        // The last partial 10 ms frame: padded through the canceller, kept at its true length.
        let rest = self.mic16.len();
        if rest > 0 {
            self.mic16.resize(AEC_FRAME, 0.0);
            let keep_ptt = self.ptt.as_ref().map(|r| r.len() + rest);
            self.process_available()?;
            if let (Some(rec), Some(n)) = (&mut self.ptt, keep_ptt) {
                rec.truncate(n);
            }
            self.position -= (AEC_FRAME - rest) as u64;
        }
        match self.cfg.mode {
            TurnMode::PushToTalk => {
                if let Some(samples) = self.ptt.take() {
                    let now = now_ns();
                    self.emit_turn(samples, self.position, now, now);
                }
            }
            TurnMode::HandsFree => {
                if let Some(ev) = self.segmenter.finish() {
                    self.vad_event(ev)?;
                }
            }
        }
        let _ = self.events.send(CaptureEvent::InputEnded);
        Ok(())
    }

    /// True while an answer is pending or audible: speech now is a barge-in.
    fn answer_active(&self) -> bool {
        self.shared.busy.load(Ordering::Acquire) || self.shared.playing.load(Ordering::Acquire)
    }

    fn barge_in(&mut self, at_ms: f64) {
        let detected_ns = now_ns();
        self.shared.flush_output.store(true, Ordering::Release);
        self.shared.cancelled_turn.store(self.turns, Ordering::Release);
        let _ = self.events.send(CaptureEvent::BargeIn {
            at_ms,
            cancel_upto: self.turns,
            detected_ns,
        });
    }

    /// Runs every whole 10 ms frame through the canceller, then the VAD / PTT recorder.
    fn process_available(&mut self) -> Result<()> {
        let mut done = 0;
        let mut out = [0.0f32; AEC_FRAME];
        while self.mic16.len() - done >= AEC_FRAME {
            // Render frames up to now (the reference ring runs in step with the output device).
            let mut r = 0;
            while self.ref16.len() - r >= AEC_FRAME {
                self.aec.render(&self.ref16[r..r + AEC_FRAME])?;
                r += AEC_FRAME;
            }
            self.ref16.drain(..r);
            let playing = self.shared.playing.load(Ordering::Acquire);
            self.aec
                .capture(&self.mic16[done..done + AEC_FRAME], &mut out, playing)?;
            done += AEC_FRAME;
            self.clean.extend_from_slice(&out);
            if let Some(rec) = &mut self.ptt {
                rec.extend_from_slice(&out);
            }
            self.position += AEC_FRAME as u64;
        }
        self.mic16.drain(..done);
        let frame = self.segmenter.frame_samples();
        let mut used = 0;
        while self.clean.len() - used >= frame {
            let f: Vec<f32> = self.clean[used..used + frame].to_vec();
            used += frame;
            let ev = self.segmenter.push_frame(&f)?;
            if self.segmenter.last_voiced {
                self.speech_end_ns = now_ns();
            }
            let pos = self.segmenter.position();
            if pos - self.last_level_at >= CAPTURE_RATE as u64 / 20 {
                self.last_level_at = pos;
                let _ = self.events.send(CaptureEvent::Level {
                    dbfs: frame_dbfs(&f),
                    voiced: self.segmenter.last_voiced,
                });
            }
            if let Some(ev) = ev {
                self.vad_event(ev)?;
            }
        }
        self.clean.drain(..used);
        if self.cfg.echo != EchoMode::Off && self.position - self.last_echo_at >= CAPTURE_RATE as u64 {
            self.last_echo_at = self.position;
            if self.aec.meter.frames > 0 {
                // One window per event: the meter restarts, so a window with the user talking over
                // the answer does not hide the echo-only ones.
                let meter = std::mem::take(&mut self.aec.meter);
                let _ = self.events.send(CaptureEvent::Echo {
                    stats: self.aec.stats(),
                    measured_erle_db: meter.erle_db(),
                    mic_dbfs: meter.mic_dbfs(),
                });
            }
        }
        // Published last, after any turn this frame ended (the --fast feeder reads busy after it).
        self.shared.capture_processed.store(self.position, Ordering::Release);
        Ok(())
    }

    fn vad_event(&mut self, ev: VadEvent) -> Result<()> {
        if self.cfg.mode == TurnMode::PushToTalk {
            // The VAD only drives levels in PTT mode: the key decides turns.
            return Ok(());
        }
        match ev {
            VadEvent::Onset { start_sample } => {
                self.begin_segment();
                let _ = self.events.send(CaptureEvent::SpeechStart {
                    at_ms: self.ms(start_sample),
                });
            }
            VadEvent::Confirmed => {
                if self.answer_active() {
                    self.barge_in(self.ms(self.segmenter.position()));
                }
            }
            VadEvent::Rejected {
                start_sample,
                voiced_ms,
            } => {
                self.discard_segment();
                let _ = self.events.send(CaptureEvent::SpeechRejected {
                    at_ms: self.ms(start_sample),
                    voiced_ms: voiced_ms as f64,
                });
            }
            VadEvent::Turn {
                end_sample, samples, ..
            } => {
                let declared = now_ns();
                let end_ns = self.speech_end_ns.min(declared);
                self.emit_turn(samples, end_sample, end_ns, declared);
            }
        }
        Ok(())
    }

    fn emit_turn(&mut self, samples: Vec<f32>, end_sample: u64, speech_end_ns: u64, declared_ns: u64) {
        if samples.is_empty() {
            self.discard_segment();
            return;
        }
        let encoded = self.finish_segment(&samples, declared_ns);
        self.turns += 1;
        self.shared.busy.store(true, Ordering::Release);
        let _ = self.events.send(CaptureEvent::Turn {
            id: self.turns,
            samples,
            speech_end_ms: self.ms(end_sample),
            speech_end_ns,
            declared_ns,
            encoded,
        });
    }
}
