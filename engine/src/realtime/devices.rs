//! Audio devices through cpal: listing, choosing by name, opening fixed-size streams whose callbacks
//! only move samples through lock-free rings.
//!
//! Host: PulseAudio (cpal's native backend) when a server is reachable, else ALSA; `OMNI_AUDIO_HOST`
//! (`pulseaudio`, `alsa`) overrides. Each stream uses the device's own rate and channel count (any
//! format cpal converts to f32); the rings carry **mono f32 at the device rate**: the input callback
//! averages channels, the output callback copies the mono answer to every channel. Resampling to
//! and from the model's rates happens on the worker threads ([`super::resample`]).
//!
//! Callbacks ([`InputTap`], [`OutputTap`]): no allocation, no lock, no blocking — ring pushes/pops,
//! atomic counters, one `Instant::now` for the first-sample timestamp.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{BufferSize, FromSample, Sample, SampleFormat, SizedSample, StreamConfig, SupportedBufferSize};
use crossbeam_channel::Sender;
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use super::{now_ns, LoopShared};

/// The producer half that feeds the capture thread, used by an input callback.
pub struct InputTap {
    pub prod: HeapProd<f32>,
    pub shared: Arc<LoopShared>,
}

impl InputTap {
    /// One mono sample from the device.
    #[inline]
    pub fn push(&mut self, x: f32) {
        if self.prod.try_push(x).is_err() {
            self.shared.input_overruns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Interleaved samples of `channels` channels, averaged to mono.
    #[inline]
    pub fn push_interleaved<T: Sample>(&mut self, data: &[T], channels: usize)
    where
        f32: FromSample<T>,
    {
        let scale = 1.0 / channels as f32;
        for frame in data.chunks_exact(channels) {
            let mut sum = 0.0f32;
            for &s in frame {
                sum += f32::from_sample(s);
            }
            self.push(sum * scale);
        }
        self.shared
            .frames_captured
            .fetch_add((data.len() / channels) as u64, Ordering::Relaxed);
    }
}

/// The consumer half drained by an output callback, and the reference tap for the echo canceller.
pub struct OutputTap {
    pub cons: HeapCons<f32>,
    /// What was handed to the device, mono, for the echo canceller's render input.
    pub reference: HeapProd<f32>,
    pub shared: Arc<LoopShared>,
}

impl OutputTap {
    /// Next mono sample for the device (silence when nothing is queued).
    #[inline]
    pub fn next_sample(&mut self) -> (f32, bool) {
        match self.cons.try_pop() {
            Some(x) => (x, true),
            None => (0.0, false),
        }
    }

    /// Fills `frames` mono samples via `write(i, x)`; handles flush, counters, timestamps and the
    /// reference tap.
    #[inline]
    pub fn fill(&mut self, frames: usize, mut write: impl FnMut(usize, f32)) {
        let shared = self.shared.clone();
        if shared.flush_output.swap(false, Ordering::AcqRel) {
            // Barge-in: drop everything queued, within this buffer.
            let dropped = self.cons.clear();
            shared.flushed_samples.store(dropped as u64, Ordering::Relaxed);
            shared.flushed_ns.store(now_ns(), Ordering::Release);
        }
        let mut real = 0usize;
        let mut first_real = true;
        for i in 0..frames {
            let (x, is_real) = self.next_sample();
            if is_real {
                real += 1;
                if first_real {
                    first_real = false;
                    if shared.arm_first_out.swap(false, Ordering::AcqRel) {
                        shared.first_out_ns.store(now_ns(), Ordering::Release);
                    }
                }
            }
            write(i, x);
            let _ = self.reference.try_push(x);
        }
        if real < frames && shared.playing.load(Ordering::Relaxed) && !shared.tail_queued.load(Ordering::Relaxed) {
            shared
                .output_underruns
                .fetch_add((frames - real) as u64, Ordering::Relaxed);
        }
        shared.frames_played.fetch_add(real as u64, Ordering::Relaxed);
        shared.output_idle.store(self.cons.is_empty(), Ordering::Release);
    }
}

/// A ring of mono f32 of `seconds` at `rate`.
pub fn ring(rate: u32, seconds: f32) -> (HeapProd<f32>, HeapCons<f32>) {
    HeapRb::<f32>::new(((rate as f32 * seconds) as usize).max(1024)).split()
}

/// The host to use: PulseAudio when reachable (or asked for), else cpal's default.
pub fn host() -> Result<cpal::Host> {
    let want = std::env::var("OMNI_AUDIO_HOST").ok();
    let hosts = cpal::available_hosts();
    let pick = |name: &str| hosts.iter().copied().find(|h| h.name().eq_ignore_ascii_case(name));
    match want.as_deref() {
        Some(name) => {
            let id = pick(name).with_context(|| {
                let names: Vec<&str> = hosts.iter().map(|h| h.name()).collect();
                format!(
                    "OMNI_AUDIO_HOST={name}: no such audio host here (available: {})",
                    names.join(", ")
                )
            })?;
            cpal::host_from_id(id).with_context(|| format!("cannot open the {name} audio host"))
        }
        None => {
            if let Some(id) = pick("PulseAudio") {
                if let Ok(h) = cpal::host_from_id(id) {
                    return Ok(h);
                }
            }
            Ok(cpal::default_host())
        }
    }
}

/// A device as listed to the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// `host:name`, stable across runs (what `--input-device` matches first).
    pub id: String,
    pub description: String,
    pub input: bool,
    pub output: bool,
    pub default_rate: Option<u32>,
    pub default_channels: Option<u16>,
}

fn describe(d: &cpal::Device) -> (String, String) {
    let id = d.id().map(|i| i.to_string()).unwrap_or_else(|_| "?".into());
    let desc = d.description().map(|x| x.to_string()).unwrap_or_default();
    (id, desc)
}

/// Every device of the host.
pub fn list_devices(host: &cpal::Host) -> Result<Vec<DeviceInfo>> {
    let mut out = Vec::new();
    for d in host.devices().context("cannot list audio devices")? {
        let (id, description) = describe(&d);
        let inp = d.default_input_config().ok();
        let outp = d.default_output_config().ok();
        let cfg = inp.as_ref().or(outp.as_ref());
        out.push(DeviceInfo {
            id,
            description,
            input: inp.is_some(),
            output: outp.is_some(),
            default_rate: cfg.map(|c| c.sample_rate()),
            default_channels: cfg.map(|c| c.channels()),
        });
    }
    Ok(out)
}

/// The device called `name` (its id with or without the `host:` prefix, or its description;
/// exact matches first, then a unique substring), or the default one.
pub fn find_device(host: &cpal::Host, name: Option<&str>, input: bool) -> Result<cpal::Device> {
    let kind = if input { "input" } else { "output" };
    let Some(name) = name else {
        let d = if input {
            host.default_input_device()
        } else {
            host.default_output_device()
        };
        return d.with_context(|| format!("no default {kind} device on the {} host", host.id().name()));
    };
    let devices: Vec<cpal::Device> = host
        .devices()
        .context("cannot list audio devices")?
        .filter(|d| {
            if input {
                d.default_input_config().is_ok()
            } else {
                d.default_output_config().is_ok()
            }
        })
        .collect();
    let lower = name.to_lowercase();
    let named: Vec<(String, String)> = devices.iter().map(describe).collect();
    let bare = |id: &str| {
        id.split_once(':')
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| id.to_string())
    };
    if let Some(i) = named.iter().position(|(id, desc)| {
        id.to_lowercase() == lower || bare(id).to_lowercase() == lower || desc.to_lowercase() == lower
    }) {
        return Ok(devices[i].clone());
    }
    let partial: Vec<usize> = (0..named.len())
        .filter(|&i| named[i].0.to_lowercase().contains(&lower) || named[i].1.to_lowercase().contains(&lower))
        .collect();
    if partial.len() == 1 {
        return Ok(devices[partial[0]].clone());
    }
    let all: Vec<String> = named.iter().map(|(id, d)| format!("{id} ({d})")).collect();
    if partial.is_empty() {
        bail!("no {kind} device matches {name:?}; {kind} devices: {}", all.join(", "))
    }
    bail!(
        "{name:?} matches several {kind} devices; {kind} devices: {}",
        all.join(", ")
    )
}

/// An open stream and what it runs at.
pub struct OpenStream {
    pub stream: cpal::Stream,
    pub name: String,
    pub rate: u32,
    pub channels: u16,
    pub buffer_frames: u32,
}

/// Frames per buffer: `buffer_ms` at `rate`, clamped to what the device allows.
fn fixed_buffer(range: &SupportedBufferSize, rate: u32, buffer_ms: u32) -> u32 {
    let want = (rate * buffer_ms / 1000).max(64);
    match range {
        SupportedBufferSize::Range { min, max } => want.clamp(*min, *max),
        SupportedBufferSize::Unknown => want,
    }
}

/// Drops a stream being replaced on a thread of its own. Why: a PulseAudio stream whose device was
/// removed (its sink module unloaded) leaves cpal's stream thread blocked for good, and cpal's
/// `Drop` joins that thread, so dropping it here would hang the controller (seen under
/// tests/audio/pulse.sh). A healthy stream is dropped at once on that thread; a dead one keeps it.
pub fn retire_stream(stream: Option<OpenStream>) {
    let Some(stream) = stream else { return };
    let spawned = std::thread::Builder::new()
        .name("omni-retire-stream".into())
        .spawn(move || drop(stream));
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to close the old stream: {e}");
    }
}

/// Error callback: counts xruns, raises `device_lost` (and says why) for fatal errors.
fn error_handler(
    shared: Arc<LoopShared>,
    which: &'static str,
    errors: Sender<(String, String)>,
) -> impl FnMut(cpal::Error) + Send + 'static {
    move |e: cpal::Error| match e.kind() {
        cpal::ErrorKind::Xrun => {
            shared.device_xruns.fetch_add(1, Ordering::Relaxed);
        }
        cpal::ErrorKind::DeviceChanged | cpal::ErrorKind::RealtimeDenied => {}
        _ => {
            shared.device_lost.store(true, Ordering::Release);
            let _ = errors.try_send((which.to_string(), e.to_string()));
        }
    }
}

/// The device's default configuration with a fixed buffer of about `buffer_ms` (cpal's default
/// buffer can be huge); returns it and the buffer's frames.
fn fixed_config(supported: &cpal::SupportedStreamConfig, buffer_ms: u32) -> (StreamConfig, u32) {
    let rate = supported.sample_rate();
    let buffer_frames = fixed_buffer(supported.buffer_size(), rate, buffer_ms);
    let config = StreamConfig {
        channels: supported.channels(),
        sample_rate: rate,
        buffer_size: BufferSize::Fixed(buffer_frames),
    };
    (config, buffer_frames)
}

/// Starts a built stream.
fn start(
    stream: cpal::Stream,
    name: String,
    kind: &str,
    config: &StreamConfig,
    buffer_frames: u32,
) -> Result<OpenStream> {
    stream
        .play()
        .with_context(|| format!("cannot start {kind} device {name}"))?;
    Ok(OpenStream {
        stream,
        name,
        rate: config.sample_rate,
        channels: config.channels,
        buffer_frames,
    })
}

/// Opens `device` for capture into `tap`.
pub fn open_input(
    device: &cpal::Device,
    buffer_ms: u32,
    tap: InputTap,
    errors: Sender<(String, String)>,
) -> Result<OpenStream> {
    let (name, _) = describe(device);
    let supported = device
        .default_input_config()
        .with_context(|| format!("{name}: no input configuration"))?;
    let (config, buffer_frames) = fixed_config(&supported, buffer_ms);
    let (rate, channels) = (config.sample_rate, config.channels);
    let err = error_handler(tap.shared.clone(), "input", errors);
    let stream = match supported.sample_format() {
        SampleFormat::F32 => build_input::<f32>(device, &config, tap, err),
        SampleFormat::I16 => build_input::<i16>(device, &config, tap, err),
        SampleFormat::I32 => build_input::<i32>(device, &config, tap, err),
        SampleFormat::U16 => build_input::<u16>(device, &config, tap, err),
        SampleFormat::U8 => build_input::<u8>(device, &config, tap, err),
        other => bail!("{name}: input sample format {other} is not supported"),
    }
    .with_context(|| format!("cannot open input device {name} ({rate} Hz, {channels} ch, {buffer_frames} frames)"))?;
    start(stream, name, "input", &config, buffer_frames)
}

fn build_input<T: SizedSample + Send + 'static>(
    device: &cpal::Device,
    config: &StreamConfig,
    mut tap: InputTap,
    err: impl FnMut(cpal::Error) + Send + 'static,
) -> Result<cpal::Stream>
where
    f32: FromSample<T>,
{
    let channels = config.channels as usize;
    Ok(device.build_input_stream::<T, _, _>(
        *config,
        move |data: &[T], _| tap.push_interleaved(data, channels),
        err,
        None,
    )?)
}

/// Opens `device` for playback from `tap`.
pub fn open_output(
    device: &cpal::Device,
    buffer_ms: u32,
    tap: OutputTap,
    errors: Sender<(String, String)>,
) -> Result<OpenStream> {
    let (name, _) = describe(device);
    let supported = device
        .default_output_config()
        .with_context(|| format!("{name}: no output configuration"))?;
    let (config, buffer_frames) = fixed_config(&supported, buffer_ms);
    let (rate, channels) = (config.sample_rate, config.channels);
    let err = error_handler(tap.shared.clone(), "output", errors);
    let stream = match supported.sample_format() {
        SampleFormat::F32 => build_output::<f32>(device, &config, tap, err),
        SampleFormat::I16 => build_output::<i16>(device, &config, tap, err),
        SampleFormat::I32 => build_output::<i32>(device, &config, tap, err),
        SampleFormat::U16 => build_output::<u16>(device, &config, tap, err),
        SampleFormat::U8 => build_output::<u8>(device, &config, tap, err),
        other => bail!("{name}: output sample format {other} is not supported"),
    }
    .with_context(|| format!("cannot open output device {name} ({rate} Hz, {channels} ch, {buffer_frames} frames)"))?;
    start(stream, name, "output", &config, buffer_frames)
}

fn build_output<T: SizedSample + FromSample<f32> + Send + 'static>(
    device: &cpal::Device,
    config: &StreamConfig,
    mut tap: OutputTap,
    err: impl FnMut(cpal::Error) + Send + 'static,
) -> Result<cpal::Stream> {
    let channels = config.channels as usize;
    Ok(device.build_output_stream::<T, _, _>(
        *config,
        move |data: &mut [T], _| {
            let frames = data.len() / channels;
            tap.fill(frames, |i, x| {
                let s = T::from_sample(x);
                for c in &mut data[i * channels..(i + 1) * channels] {
                    *c = s;
                }
            });
        },
        err,
        None,
    )?)
}
