//! Hands-free turn taking: webrtc-vad decisions on 10/20/30 ms frames at 16 kHz, made robust with
//! an energy floor, an onset run, a minimum amount of speech and a hangover.
//!
//! webrtc-vad's `Vad` wraps a C pointer and is not `Send`: a [`Segmenter`] is built on the thread
//! that uses it (the capture thread) and never leaves it.
//!
//! Rules (why each exists):
//! - a frame counts as voiced only if the VAD says so **and** it is louder than `energy_floor_dbfs`:
//!   the VAD alone fires on steady noise at high gain; silence and noise alone never start a turn;
//! - a segment opens after `onset_ms` of voiced frames in a row (a click is one frame);
//! - it closes after `hangover_ms` without voice (a pause between words is shorter);
//! - it becomes a turn only if it holds `min_speech_ms` of voiced frames (a breath or a cough is
//!   shorter), otherwise it is reported as rejected;
//! - `preroll_ms` of audio before the onset is kept, since the VAD fires a little after speech starts.

use anyhow::{bail, Result};
use std::collections::VecDeque;
use webrtc_vad::{SampleRate, Vad, VadMode};

use super::CAPTURE_RATE;

/// Thresholds of the hands-free mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadSettings {
    /// 10, 20 or 30.
    pub frame_ms: usize,
    /// 0 (quality) … 3 (very aggressive): webrtc-vad's mode.
    pub aggressiveness: u8,
    pub energy_floor_dbfs: f32,
    pub onset_ms: usize,
    pub min_speech_ms: usize,
    pub hangover_ms: usize,
    pub preroll_ms: usize,
    /// Voiced time within an open segment after which the user is taken to barge in.
    pub barge_in_ms: usize,
}

impl Default for VadSettings {
    fn default() -> Self {
        Self {
            frame_ms: 30,
            aggressiveness: 3,
            energy_floor_dbfs: -45.0,
            onset_ms: 90,
            min_speech_ms: 250,
            hangover_ms: 600,
            preroll_ms: 300,
            barge_in_ms: 240,
        }
    }
}

impl VadSettings {
    pub fn validate(&self) -> Result<()> {
        if ![10, 20, 30].contains(&self.frame_ms) {
            bail!("VAD frame must be 10, 20 or 30 ms (got {})", self.frame_ms);
        }
        if self.aggressiveness > 3 {
            bail!("VAD aggressiveness must be 0..=3 (got {})", self.aggressiveness);
        }
        if self.onset_ms == 0 || self.hangover_ms == 0 {
            bail!("VAD onset and hangover must be positive");
        }
        Ok(())
    }

    pub fn frame_samples(&self) -> usize {
        CAPTURE_RATE as usize * self.frame_ms / 1000
    }
}

/// What one frame changed.
#[derive(Debug, Clone, PartialEq)]
pub enum VadEvent {
    /// A segment opened; `start_sample` counts 16 kHz samples since the stream began (preroll included).
    Onset { start_sample: u64 },
    /// The open segment has `barge_in_ms` of voice: real speech, not a click.
    Confirmed,
    /// The segment closed with enough speech: a user turn. `samples` is the audio from the preroll to
    /// the last voiced frame (plus a little tail); `end_sample` is where the last voiced frame ended.
    Turn {
        start_sample: u64,
        end_sample: u64,
        samples: Vec<f32>,
    },
    /// The segment closed with too little speech.
    Rejected { start_sample: u64, voiced_ms: usize },
}

/// Samples a turn keeps after its last voiced frame (100 ms).
pub const TURN_TAIL: usize = CAPTURE_RATE as usize / 10;

/// The VAD with the rules above, fed 16 kHz mono frames.
pub struct Segmenter {
    vad: Vad,
    pub settings: VadSettings,
    frame_i16: Vec<i16>,
    /// Last frames before an onset, for the preroll.
    history: VecDeque<f32>,
    segment: Option<OpenSegment>,
    voiced_run: usize,
    /// Samples seen so far.
    position: u64,
    pub last_dbfs: f32,
    pub last_voiced: bool,
}

struct OpenSegment {
    start_sample: u64,
    samples: Vec<f32>,
    voiced_ms: usize,
    silent_ms: usize,
    confirmed: bool,
    /// Length of `samples` at the end of the last voiced frame.
    voiced_end: usize,
    voiced_end_sample: u64,
}

/// Level of a frame in dBFS (full scale = 1.0).
pub fn frame_dbfs(frame: &[f32]) -> f32 {
    let energy: f64 = frame.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / frame.len().max(1) as f64;
    (10.0 * (energy.max(1e-12)).log10()) as f32
}

impl Segmenter {
    pub fn new(settings: VadSettings) -> Result<Self> {
        settings.validate()?;
        let mode = match settings.aggressiveness {
            0 => VadMode::Quality,
            1 => VadMode::LowBitrate,
            2 => VadMode::Aggressive,
            _ => VadMode::VeryAggressive,
        };
        Ok(Self {
            vad: Vad::new_with_rate_and_mode(SampleRate::Rate16kHz, mode),
            frame_i16: vec![0; settings.frame_samples()],
            history: VecDeque::with_capacity(CAPTURE_RATE as usize * settings.preroll_ms / 1000 + 1),
            settings,
            segment: None,
            voiced_run: 0,
            position: 0,
            last_dbfs: -120.0,
            last_voiced: false,
        })
    }

    pub fn frame_samples(&self) -> usize {
        self.settings.frame_samples()
    }

    /// True while a segment is open.
    pub fn in_speech(&self) -> bool {
        self.segment.is_some()
    }

    /// The open segment's samples that its turn will surely contain (pre-roll included), or `None`
    /// when no segment is open. A turn keeps its samples up to the last voiced frame plus a tail of
    /// [`TURN_TAIL`] samples; the last voiced frame only moves forward, so everything up to the current
    /// one plus the tail (or up to now, if shorter) stays. The streaming encoder is fed only these.
    pub fn committed_samples(&self) -> Option<&[f32]> {
        self.segment.as_ref().map(|seg| {
            let end = (seg.voiced_end + TURN_TAIL).min(seg.samples.len());
            &seg.samples[..end]
        })
    }

    /// Samples fed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Feeds one frame of exactly [`frame_samples`](Self::frame_samples) samples.
    pub fn push_frame(&mut self, frame: &[f32]) -> Result<Option<VadEvent>> {
        let s = &self.settings;
        anyhow::ensure!(
            frame.len() == s.frame_samples(),
            "VAD frame of {} samples, expected {}",
            frame.len(),
            s.frame_samples()
        );
        for (d, &x) in self.frame_i16.iter_mut().zip(frame) {
            *d = (x.clamp(-1.0, 1.0) * 32767.0) as i16;
        }
        let dbfs = frame_dbfs(frame);
        let vad_says = self
            .vad
            .is_voice_segment(&self.frame_i16)
            .map_err(|_| anyhow::anyhow!("webrtc-vad rejected a frame of {} samples", frame.len()))?;
        let voiced = vad_says && dbfs > s.energy_floor_dbfs;
        self.last_dbfs = dbfs;
        self.last_voiced = voiced;
        let frame_ms = s.frame_ms;
        let frame_start = self.position;
        self.position += frame.len() as u64;
        self.voiced_run = if voiced { self.voiced_run + frame_ms } else { 0 };

        let mut event = None;
        match &mut self.segment {
            None => {
                if self.voiced_run >= s.onset_ms {
                    // Open: preroll (which already holds the onset run's frames) + this frame.
                    let mut samples: Vec<f32> = self.history.iter().copied().collect();
                    samples.extend_from_slice(frame);
                    let start_sample = self.position - samples.len() as u64;
                    let voiced_end = samples.len();
                    self.segment = Some(OpenSegment {
                        start_sample,
                        samples,
                        voiced_ms: self.voiced_run,
                        silent_ms: 0,
                        confirmed: false,
                        voiced_end,
                        voiced_end_sample: self.position,
                    });
                    self.history.clear();
                    event = Some(VadEvent::Onset { start_sample });
                } else {
                    let cap = CAPTURE_RATE as usize * s.preroll_ms / 1000;
                    self.history.extend(frame.iter().copied());
                    while self.history.len() > cap {
                        self.history.pop_front();
                    }
                }
            }
            Some(seg) => {
                seg.samples.extend_from_slice(frame);
                if voiced {
                    seg.voiced_ms += frame_ms;
                    seg.silent_ms = 0;
                    seg.voiced_end = seg.samples.len();
                    seg.voiced_end_sample = frame_start + frame.len() as u64;
                } else {
                    seg.silent_ms += frame_ms;
                }
                if !seg.confirmed && seg.voiced_ms >= s.barge_in_ms {
                    seg.confirmed = true;
                    event = Some(VadEvent::Confirmed);
                }
                if seg.silent_ms >= s.hangover_ms {
                    let seg = self.segment.take().expect("open segment");
                    event = Some(self.close(seg));
                }
            }
        }
        Ok(event)
    }

    /// Closes an open segment now (end of the input): a turn if it holds enough speech.
    pub fn finish(&mut self) -> Option<VadEvent> {
        let seg = self.segment.take()?;
        Some(self.close(seg))
    }

    fn close(&mut self, mut seg: OpenSegment) -> VadEvent {
        self.voiced_run = 0;
        if seg.voiced_ms < self.settings.min_speech_ms {
            return VadEvent::Rejected {
                start_sample: seg.start_sample,
                voiced_ms: seg.voiced_ms,
            };
        }
        // Keep 100 ms after the last voiced frame: word endings fall below the VAD before they end.
        let tail = TURN_TAIL.min(seg.samples.len() - seg.voiced_end);
        seg.samples.truncate(seg.voiced_end + tail);
        VadEvent::Turn {
            start_sample: seg.start_sample,
            end_sample: seg.voiced_end_sample,
            samples: seg.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seg: &mut Segmenter, audio: &[f32]) -> Vec<VadEvent> {
        let n = seg.frame_samples();
        audio
            .chunks_exact(n)
            .filter_map(|f| seg.push_frame(f).unwrap())
            .collect()
    }

    #[test]
    fn silence_and_white_noise_never_open_a_turn() {
        let mut seg = Segmenter::new(VadSettings::default()).unwrap();
        let mut events = run(&mut seg, &vec![0.0; 16_000 * 3]);
        // Low-level noise (-50 dBFS): under the energy floor.
        let mut state = 12345u32;
        let noise: Vec<f32> = (0..16_000 * 3)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.01
            })
            .collect();
        events.extend(run(&mut seg, &noise));
        events.extend(seg.finish());
        assert!(events.iter().all(|e| !matches!(e, VadEvent::Turn { .. })), "{events:?}");
    }

    /// What the streaming encoder is fed during a segment is always a prefix of the turn it becomes,
    /// whatever the VAD trims at the end (the live loop's exactness rests on this).
    #[test]
    fn committed_samples_are_a_prefix_of_the_turn() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/audio/speech_16k_s16.wav");
        let speech: Vec<f32> = hound::WavReader::open(path)
            .unwrap()
            .samples::<i16>()
            .map(|x| x.unwrap() as f32 / 32768.0)
            .collect();
        let mut audio = vec![0.0f32; 8000];
        audio.extend(&speech);
        audio.extend(vec![0.0f32; 24000]);
        audio.extend(speech.iter().map(|x| x * 0.5));
        audio.extend(vec![0.0f32; 20000]);
        let mut seg = Segmenter::new(VadSettings::default()).unwrap();
        let mut snapshots: Vec<Vec<f32>> = Vec::new();
        let mut turns = 0;
        for f in audio.chunks_exact(seg.frame_samples()) {
            let ev = seg.push_frame(f).unwrap();
            if let Some(VadEvent::Turn { samples, .. }) = &ev {
                turns += 1;
                assert!(!snapshots.is_empty());
                for s in &snapshots {
                    assert!(s.len() <= samples.len() && samples[..s.len()] == s[..], "not a prefix");
                }
                // Everything but at most the last frame's worth of samples was committed before the end.
                assert!(samples.len() - snapshots.last().unwrap().len() <= TURN_TAIL + seg.frame_samples());
                snapshots.clear();
            }
            if let Some(c) = seg.committed_samples() {
                snapshots.push(c.to_vec());
            }
        }
        assert_eq!(turns, 2);
    }

    #[test]
    fn a_click_is_not_a_turn() {
        let mut seg = Segmenter::new(VadSettings::default()).unwrap();
        let mut audio = vec![0.0f32; 16_000];
        for (i, x) in audio[8000..8000 + 160].iter_mut().enumerate() {
            *x = if i % 2 == 0 { 0.9 } else { -0.9 };
        }
        let mut events = run(&mut seg, &audio);
        events.extend(seg.finish());
        assert!(events.iter().all(|e| !matches!(e, VadEvent::Turn { .. })), "{events:?}");
    }
}
