//! The playback thread: answer audio (24 kHz chunks) → device rate → output ring.
//!
//! It keeps the answer's not-yet-queued samples in its own queue and tops the ring up as the device
//! drains it, so the ring (what a barge-in flushes within one buffer) stays short. Audio of
//! cancelled turns (`LoopShared::cancelled_turn`) is dropped as soon as the flag is seen.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ringbuf::traits::{Observer, Producer};
use ringbuf::HeapProd;

use super::resample::StreamResampler;
use super::{LoopShared, ANSWER_RATE, POLL};

/// Messages to the playback thread.
pub enum PlaybackCommand {
    /// Answer audio of `turn` at 24 kHz.
    Audio { turn: u64, samples: Vec<f32> },
    /// No more audio for `turn`.
    End { turn: u64 },
    /// A re-opened output device.
    NewOutput { prod: HeapProd<f32>, rate: u32 },
}

/// What the playback thread reports.
#[derive(Debug)]
pub enum PlaybackEvent {
    /// The first sample of `turn` was queued (its leaving the buffer is stamped by the callback).
    Started {
        turn: u64,
    },
    /// Everything of `turn` has been played (or dropped after a barge-in).
    Finished {
        turn: u64,
        cancelled: bool,
    },
    Error(String),
}

/// Most audio kept in the device ring ahead of the speaker: short, so a flush is quick and the
/// echo reference stays close to what is heard.
const RING_AHEAD_MS: u32 = 120;

pub fn spawn_playback(
    out: HeapProd<f32>,
    out_rate: u32,
    shared: Arc<LoopShared>,
    commands: Receiver<PlaybackCommand>,
    events: Sender<PlaybackEvent>,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("omni-playback".into())
        .spawn(move || {
            if let Err(e) = run(out, out_rate, &shared, &commands, &events) {
                let _ = events.send(PlaybackEvent::Error(format!("playback thread: {e:#}")));
            }
        })
        .context("cannot start the playback thread")
}

struct Current {
    turn: u64,
    ended: bool,
    started: bool,
}

fn run(
    mut out: HeapProd<f32>,
    mut out_rate: u32,
    shared: &LoopShared,
    commands: &Receiver<PlaybackCommand>,
    events: &Sender<PlaybackEvent>,
) -> Result<()> {
    let mut rs = StreamResampler::new(ANSWER_RATE, out_rate)?;
    let mut queue: VecDeque<f32> = VecDeque::new();
    let mut scratch = Vec::new();
    let mut current: Option<Current> = None;
    while !shared.is_shutdown() {
        // 1. Take commands (briefly waiting when there is nothing to play).
        let wait = if queue.is_empty() { POLL * 5 } else { POLL };
        match commands.recv_timeout(wait) {
            Ok(cmd) => match cmd {
                PlaybackCommand::Audio { turn, samples } => {
                    if turn <= shared.cancelled_turn.load(Ordering::Acquire) {
                        continue;
                    }
                    if current.as_ref().map(|c| c.turn) != Some(turn) {
                        current = Some(Current {
                            turn,
                            ended: false,
                            started: false,
                        });
                        rs.reset();
                    }
                    scratch.clear();
                    rs.process(&samples, &mut scratch)?;
                    queue.extend(scratch.iter().copied());
                }
                PlaybackCommand::End { turn } => {
                    if let Some(c) = current.as_mut().filter(|c| c.turn == turn) {
                        c.ended = true;
                        scratch.clear();
                        rs.flush(&mut scratch)?;
                        queue.extend(scratch.iter().copied());
                    } else if turn > shared.cancelled_turn.load(Ordering::Acquire) {
                        // An answer without audio: finished at once.
                        let _ = events.send(PlaybackEvent::Finished { turn, cancelled: false });
                    }
                }
                PlaybackCommand::NewOutput { prod, rate } => {
                    out = prod;
                    out_rate = rate;
                    rs = StreamResampler::new(ANSWER_RATE, out_rate)?;
                }
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // 2. Barge-in: drop the cancelled answer.
        if let Some(c) = &current {
            if c.turn <= shared.cancelled_turn.load(Ordering::Acquire) {
                queue.clear();
                rs.reset();
                shared.playing.store(false, Ordering::Release);
                shared.arm_first_out.store(false, Ordering::Release);
                let _ = events.send(PlaybackEvent::Finished {
                    turn: c.turn,
                    cancelled: true,
                });
                current = None;
                continue;
            }
        }
        // 3. Top the ring up to RING_AHEAD_MS.
        let Some(c) = current.as_mut() else { continue };
        if !queue.is_empty() {
            let ahead = (out_rate * RING_AHEAD_MS / 1000) as usize;
            let room = ahead.saturating_sub(out.occupied_len()).min(out.vacant_len());
            if room > 0 {
                if !c.started {
                    c.started = true;
                    shared.tail_queued.store(false, Ordering::Release);
                    shared.arm_first_out.store(true, Ordering::Release);
                    shared.playing.store(true, Ordering::Release);
                    shared.output_idle.store(false, Ordering::Release);
                    let _ = events.send(PlaybackEvent::Started { turn: c.turn });
                }
                let (a, b) = queue.as_slices();
                let n = room.min(queue.len());
                let from_a = n.min(a.len());
                let mut pushed = out.push_slice(&a[..from_a]);
                if from_a < n {
                    pushed += out.push_slice(&b[..n - from_a]);
                }
                queue.drain(..pushed);
            }
        }
        if c.ended && queue.is_empty() {
            shared.tail_queued.store(true, Ordering::Release);
        }
        // 4. The answer is over once its last sample has left the ring.
        if c.ended && queue.is_empty() && out.is_empty() && shared.output_idle.load(Ordering::Acquire) {
            shared.playing.store(false, Ordering::Release);
            let _ = events.send(PlaybackEvent::Finished {
                turn: c.turn,
                cancelled: false,
            });
            current = None;
        }
    }
    Ok(())
}
