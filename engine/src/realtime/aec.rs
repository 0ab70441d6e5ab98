//! Echo cancellation: the assistant must not hear itself on a speakerphone.
//!
//! Choice: **sonora** (a pure-Rust port of WebRTC's audio processing module) with its **AEC3** echo
//! canceller. Why: it is the canceller browsers and meeting apps ship (adaptive linear filter with
//! its own delay estimator, plus residual-echo suppression), it builds with cargo alone (no C++
//! toolchain, no system library, unlike `webrtc-audio-processing`'s bindings), it runs 10 ms frames at
//! 16 kHz natively, and it reports ERL/ERLE/delay statistics we surface as events. The speexdsp
//! alternative (`aec-rs`) is a plain NLMS filter without AEC3's delay estimation or suppressor.
//!
//! The render reference is the signal the output callback actually handed to the device (tapped in
//! the callback, see [`super::devices`]), so its timing matches what the speaker plays up to the
//! device latency, which AEC3's delay estimator absorbs (we also tell it the buffering we know of).
//!
//! [`EchoMode::Gate`] is the fallback when the canceller is off: while the assistant speaks, a frame
//! counts only if it is `gate_margin_db` louder than the played reference (so barge-in needs a loud
//! voice), and it is muted otherwise.

use anyhow::{bail, Result};
use sonora::config::EchoCanceller as Aec3Config;
use sonora::{AudioProcessing, Config, StreamConfig};

use super::vad::frame_dbfs;
use super::CAPTURE_RATE;

/// Samples per AEC frame: 10 ms at 16 kHz.
pub const AEC_FRAME: usize = CAPTURE_RATE as usize / 100;

/// How the echo of the assistant's own voice is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoMode {
    /// sonora's AEC3.
    Aec3,
    /// Level gate against the played reference.
    Gate,
    /// Nothing (headphones, or a file source without an acoustic path).
    Off,
}

impl EchoMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "aec3" | "aec" | "on" => Self::Aec3,
            "gate" => Self::Gate,
            "off" | "none" => Self::Off,
            other => bail!("--echo: unknown mode {other:?} (aec3, gate, off)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Aec3 => "aec3",
            Self::Gate => "gate",
            Self::Off => "off",
        }
    }
}

/// Running ERLE measured by us over frames where the reference is playing:
/// `10 log10(Σ mic² / Σ out²)`. It equals the true ERLE when the user is silent meanwhile (the
/// speakerphone test); the canceller's own estimate comes from [`EchoCanceller::stats`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ErleMeter {
    pub mic_energy: f64,
    pub out_energy: f64,
    pub frames: u64,
}

impl ErleMeter {
    pub fn add(&mut self, mic: &[f32], out: &[f32]) {
        self.mic_energy += mic.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
        self.out_energy += out.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
        self.frames += 1;
    }
    pub fn erle_db(&self) -> Option<f64> {
        (self.frames > 0 && self.mic_energy > 1e-9)
            .then(|| 10.0 * (self.mic_energy / self.out_energy.max(1e-12)).log10())
    }

    /// Mean level of the microphone (before cancellation) over the window, dBFS.
    pub fn mic_dbfs(&self) -> Option<f64> {
        (self.frames > 0).then(|| {
            10.0 * (self.mic_energy / (self.frames as f64 * AEC_FRAME as f64))
                .max(1e-12)
                .log10()
        })
    }
}

/// Statistics of the canceller (dB, ms).
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoStats {
    pub erle_db: Option<f64>,
    pub erl_db: Option<f64>,
    pub delay_ms: Option<i32>,
}

/// Echo handling on 10 ms 16 kHz mono frames: [`render`](Self::render) each played frame,
/// [`capture`](Self::capture) each microphone frame.
pub struct EchoCanceller {
    mode: EchoMode,
    apm: Option<AudioProcessing>,
    delay_ms: i32,
    gate_margin_db: f32,
    /// Level of the recent reference (dBFS), for the gate.
    render_dbfs: f32,
    pub meter: ErleMeter,
}

impl EchoCanceller {
    /// `delay_ms`: the render→capture delay we know of (device buffers); AEC3 refines it.
    pub fn new(mode: EchoMode, delay_ms: i32) -> Self {
        let apm = (mode == EchoMode::Aec3).then(|| {
            let stream = StreamConfig::new(CAPTURE_RATE, 1);
            let config = Config {
                echo_canceller: Some(Aec3Config::default()),
                ..Default::default()
            };
            AudioProcessing::builder()
                .config(config)
                .capture_config(stream)
                .render_config(stream)
                .build()
        });
        Self {
            mode,
            apm,
            delay_ms: delay_ms.clamp(0, 500),
            gate_margin_db: 10.0,
            render_dbfs: -120.0,
            meter: ErleMeter::default(),
        }
    }

    pub fn mode(&self) -> EchoMode {
        self.mode
    }

    /// One played frame ([`AEC_FRAME`] samples).
    pub fn render(&mut self, frame: &[f32]) -> Result<()> {
        debug_assert_eq!(frame.len(), AEC_FRAME);
        let level = frame_dbfs(frame);
        // A slow release so the gate covers the room's decay after each syllable.
        self.render_dbfs = if level > self.render_dbfs {
            level
        } else {
            self.render_dbfs - 1.5
        };
        if let Some(apm) = &mut self.apm {
            let mut out = [0.0f32; AEC_FRAME];
            apm.process_render_f32(&[frame], &mut [&mut out[..]])
                .map_err(|e| anyhow::anyhow!("echo canceller (render): {e:?}"))?;
        }
        Ok(())
    }

    /// One microphone frame ([`AEC_FRAME`] samples) → `out`. `playing`: the assistant is audible now
    /// (for the gate and the meter).
    pub fn capture(&mut self, frame: &[f32], out: &mut [f32], playing: bool) -> Result<()> {
        debug_assert_eq!(frame.len(), AEC_FRAME);
        match self.mode {
            EchoMode::Off => out.copy_from_slice(frame),
            EchoMode::Gate => {
                let loud_enough = frame_dbfs(frame) > self.render_dbfs + self.gate_margin_db;
                if playing && !loud_enough {
                    out.fill(0.0);
                } else {
                    out.copy_from_slice(frame);
                }
            }
            EchoMode::Aec3 => {
                let apm = self.apm.as_mut().expect("AEC3 mode has a canceller");
                // AEC3 wants the delay set before every capture frame.
                let _ = apm.set_stream_delay_ms(self.delay_ms);
                apm.process_capture_f32(&[frame], &mut [out])
                    .map_err(|e| anyhow::anyhow!("echo canceller (capture): {e:?}"))?;
            }
        }
        if playing {
            self.meter.add(frame, out);
        }
        Ok(())
    }

    pub fn stats(&self) -> EchoStats {
        match &self.apm {
            Some(apm) => {
                let s = apm.statistics();
                EchoStats {
                    erle_db: s.echo_return_loss_enhancement,
                    erl_db: s.echo_return_loss,
                    delay_ms: s.delay_ms,
                }
            }
            None => EchoStats::default(),
        }
    }
}
