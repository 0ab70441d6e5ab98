//! Decoding audio files to 16 kHz mono `f32`, the input the Whisper-style feature extractor expects.
//!
//! Reference behaviour: users of the transformers `Qwen3OmniMoeProcessor` load audio with
//! `librosa.load(path, sr=16000)` (transformers' own `load_audio(..., backend="soundfile")` is the same
//! thing): decode to `f32`, average the channels (`librosa.to_mono`), resample with soxr `soxr_hq`, and fix
//! the length to `ceil(n * 16000 / sr)` samples. This module does the same steps with
//! [symphonia](https://docs.rs/symphonia) (decoding) and [rubato](https://docs.rs/rubato) (resampling).
//! soxr cannot be matched bit for bit, so the resampler is judged against the analytic signal instead
//! (see [`resample_to_16k`]).
//!
//! Containers / codecs: WAV (PCM 8/16/24/32-bit integer, 32/64-bit float, A-law, µ-law), FLAC, MP3,
//! Ogg/Vorbis, MP4/M4A (AAC-LC), and whatever else symphonia's `all` feature enables (AIFF/CAF/MKV/ALAC/ADPCM).
//! MP3 and Vorbis encoder delay/padding are trimmed (symphonia "gapless" mode), so their durations match
//! the source. symphonia 0.5 ignores MP4 edit lists, so for MP4/M4A/MOV files this module reads the audio
//! track's `elst` itself and applies a single-segment edit (that is how encoders mark the AAC priming
//! samples, typically 1024 or 2112, and the padding of the last frame).
//!
//! Every failure is an [`AudioError`] naming the file and the problem; nothing here panics on bad input.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rubato::{
    calculate_cutoff, Resampler, SincFixedIn, SincInterpolationParameters, SincInterpolationType,
    WindowFunction,
};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{self, CodecType, DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// The sample rate every decoded clip is converted to (Whisper / Qwen3-Omni audio encoder input rate).
pub const TARGET_SAMPLE_RATE: u32 = 16_000;
/// Lowest source sample rate accepted (anything below is almost certainly a broken header).
pub const MIN_SAMPLE_RATE: u32 = 1_000;
/// Highest source sample rate accepted (the highest rate common hardware/formats use is 768 kHz).
pub const MAX_SAMPLE_RATE: u32 = 768_000;
/// Peak absolute amplitude below which a clip counts as silent (see [`DecodedAudio::is_silent`]).
pub const SILENCE_PEAK: f32 = 1e-6;

/// Errors from decoding or resampling audio. File-related variants always carry the path.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("audio file {path}: file not found")]
    NotFound { path: PathBuf },
    #[error("audio file {path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audio file {path}: the file is empty (0 bytes)")]
    EmptyFile { path: PathBuf },
    #[error("audio file {path}: unsupported or corrupt container ({reason})")]
    UnsupportedFormat { path: PathBuf, reason: String },
    #[error("audio file {path}: no audio track found")]
    NoAudioTrack { path: PathBuf },
    #[error("audio file {path}: unsupported codec {codec} ({reason})")]
    UnsupportedCodec {
        path: PathBuf,
        codec: String,
        reason: String,
    },
    #[error("audio file {path}: corrupt audio data ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("audio file {path}: truncated or corrupt: the header promises {expected} sample frames but only {decoded} could be decoded")]
    Truncated {
        path: PathBuf,
        expected: u64,
        decoded: u64,
    },
    #[error("audio file {path}: contains no audio samples (zero-length audio)")]
    ZeroLength { path: PathBuf },
    #[error("audio file {path}: unsupported sample rate {rate} Hz (accepted: {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz)")]
    BadSampleRate { path: PathBuf, rate: u32 },
    #[error("audio file {path}: unknown sample rate or channel count in the stream")]
    MissingStreamInfo { path: PathBuf },
    #[error("audio file {path}: stream format changes mid-stream ({reason})")]
    FormatChange { path: PathBuf, reason: String },
    #[error("audio file {path}: sample {index} is not a finite number")]
    NonFiniteSample { path: PathBuf, index: usize },
    #[error("audio file {path}: resampling from {rate} Hz failed: {reason}")]
    ResampleFile {
        path: PathBuf,
        rate: u32,
        reason: String,
    },
    /// Raw-buffer variants (no file involved), from [`resample_to_16k`].
    #[error(
        "unsupported sample rate {rate} Hz (accepted: {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz)"
    )]
    InvalidSampleRate { rate: u32 },
    #[error("resampling from {rate} Hz failed: {reason}")]
    Resample { rate: u32, reason: String },
}

/// A decoded clip, already converted to 16 kHz mono.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Mono samples at [`TARGET_SAMPLE_RATE`], nominally in [-1, 1].
    pub samples: Vec<f32>,
    /// Sample rate of the file.
    pub source_sample_rate: u32,
    /// Channel count of the file (the samples are their arithmetic mean).
    pub source_channels: usize,
    /// Duration of the decoded audio: decoded source frames / source sample rate.
    pub duration_secs: f64,
}

impl DecodedAudio {
    /// Largest absolute sample value.
    pub fn peak(&self) -> f32 {
        self.samples.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
    }

    /// True when the clip is digital silence (peak below [`SILENCE_PEAK`]). Decoding does not reject silent
    /// audio; callers that need speech (the CLI) should refuse it with a clear message.
    pub fn is_silent(&self) -> bool {
        self.peak() < SILENCE_PEAK
    }
}

/// Codecs whose decoded length must equal the length in the header (used to detect truncated files).
fn is_exact_length_codec(codec: CodecType) -> bool {
    use codecs::*;
    const EXACT: &[CodecType] = &[
        CODEC_TYPE_PCM_S32LE,
        CODEC_TYPE_PCM_S32LE_PLANAR,
        CODEC_TYPE_PCM_S32BE,
        CODEC_TYPE_PCM_S32BE_PLANAR,
        CODEC_TYPE_PCM_S24LE,
        CODEC_TYPE_PCM_S24LE_PLANAR,
        CODEC_TYPE_PCM_S24BE,
        CODEC_TYPE_PCM_S24BE_PLANAR,
        CODEC_TYPE_PCM_S16LE,
        CODEC_TYPE_PCM_S16LE_PLANAR,
        CODEC_TYPE_PCM_S16BE,
        CODEC_TYPE_PCM_S16BE_PLANAR,
        CODEC_TYPE_PCM_S8,
        CODEC_TYPE_PCM_S8_PLANAR,
        CODEC_TYPE_PCM_U32LE,
        CODEC_TYPE_PCM_U32LE_PLANAR,
        CODEC_TYPE_PCM_U32BE,
        CODEC_TYPE_PCM_U32BE_PLANAR,
        CODEC_TYPE_PCM_U24LE,
        CODEC_TYPE_PCM_U24LE_PLANAR,
        CODEC_TYPE_PCM_U24BE,
        CODEC_TYPE_PCM_U24BE_PLANAR,
        CODEC_TYPE_PCM_U16LE,
        CODEC_TYPE_PCM_U16LE_PLANAR,
        CODEC_TYPE_PCM_U16BE,
        CODEC_TYPE_PCM_U16BE_PLANAR,
        CODEC_TYPE_PCM_U8,
        CODEC_TYPE_PCM_U8_PLANAR,
        CODEC_TYPE_PCM_F32LE,
        CODEC_TYPE_PCM_F32LE_PLANAR,
        CODEC_TYPE_PCM_F32BE,
        CODEC_TYPE_PCM_F32BE_PLANAR,
        CODEC_TYPE_PCM_F64LE,
        CODEC_TYPE_PCM_F64LE_PLANAR,
        CODEC_TYPE_PCM_F64BE,
        CODEC_TYPE_PCM_F64BE_PLANAR,
        CODEC_TYPE_PCM_ALAW,
        CODEC_TYPE_PCM_MULAW,
        CODEC_TYPE_FLAC,
        CODEC_TYPE_ALAC,
        CODEC_TYPE_WAVPACK,
    ];
    EXACT.contains(&codec)
}

fn codec_name(codec: CodecType) -> String {
    symphonia::default::get_codecs()
        .get_codec(codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| format!("{codec}"))
}

/// Decode `path` (any supported container), mix to mono and resample to 16 kHz.
pub fn load_audio_16k_mono(path: &Path) -> Result<DecodedAudio, AudioError> {
    let (interleaved, rate, channels) = decode_interleaved(path)?;
    let frames = interleaved.len() / channels;
    let mono = to_mono(&interleaved, channels);
    if let Some(index) = mono.iter().position(|x| !x.is_finite()) {
        return Err(AudioError::NonFiniteSample {
            path: path.to_path_buf(),
            index,
        });
    }
    let samples = match resample_to_16k(&mono, rate) {
        Ok(s) => s,
        Err(AudioError::InvalidSampleRate { rate }) => {
            return Err(AudioError::BadSampleRate {
                path: path.to_path_buf(),
                rate,
            })
        }
        Err(e) => {
            return Err(AudioError::ResampleFile {
                path: path.to_path_buf(),
                rate,
                reason: e.to_string(),
            })
        }
    };
    Ok(DecodedAudio {
        samples,
        source_sample_rate: rate,
        source_channels: channels,
        duration_secs: frames as f64 / rate as f64,
    })
}

/// Arithmetic mean over channels (`librosa.to_mono`), summed in channel order in `f32` like numpy's
/// `mean(axis=0)` on a float32 `[channels, n]` array.
pub fn to_mono(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    let inv = channels as f32;
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().fold(0.0f32, |acc, &x| acc + x) / inv)
        .collect()
}

/// Decode the first audio track of `path` to interleaved `f32` samples at the file's own rate.
/// Returns `(samples, sample_rate, channels)`.
pub fn decode_interleaved(path: &Path) -> Result<(Vec<f32>, u32, usize), AudioError> {
    let pb = || path.to_path_buf();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AudioError::NotFound { path: pb() })
        }
        Err(e) => {
            return Err(AudioError::Io {
                path: pb(),
                source: e,
            })
        }
    };
    if meta.is_dir() {
        return Err(AudioError::Io {
            path: pb(),
            source: std::io::Error::other("is a directory, not an audio file"),
        });
    }
    if meta.len() == 0 {
        return Err(AudioError::EmptyFile { path: pb() });
    }
    let file = File::open(path).map_err(|e| AudioError::Io {
        path: pb(),
        source: e,
    })?;
    let mss = MediaSourceStream::new(Box::new(file), MediaSourceStreamOptions::default());

    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(&ext.to_ascii_lowercase());
    }
    let format_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &format_opts, &MetadataOptions::default())
        .map_err(|e| AudioError::UnsupportedFormat {
            path: pb(),
            reason: match e {
                SymphoniaError::IoError(ref io)
                    if io.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    "unexpected end of file while reading the header".to_string()
                }
                SymphoniaError::Unsupported(_) => "not a recognised audio container".to_string(),
                other => other.to_string(),
            },
        })?;
    let mut format = probed.format;

    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::NoAudioTrack { path: pb() })?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let codec = params.codec;
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| AudioError::UnsupportedCodec {
            path: pb(),
            codec: codec_name(codec),
            reason: e.to_string(),
        })?;
    let exact = is_exact_length_codec(codec);

    let mut rate = params.sample_rate;
    let mut channels = params.channels.map(|c| c.count());
    if let Some(r) = rate {
        check_rate(path, r)?;
    }

    let mut out: Vec<f32> = Vec::new();
    let mut buf: Option<SampleBuffer<f32>> = None;
    let mut decode_errors = 0usize;
    let mut first_decode_error = String::new();

    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // symphonia signals the normal end of a stream this way too; a real truncation
                // is detected below by comparing with the frame count from the header.
                break;
            }
            Err(SymphoniaError::ResetRequired) => break, // chained stream: keep the first one
            Err(e) => {
                return Err(AudioError::Corrupt {
                    path: pb(),
                    reason: format!("demuxing failed: {e}"),
                })
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(SymphoniaError::DecodeError(msg)) => {
                if exact {
                    return Err(AudioError::Corrupt {
                        path: pb(),
                        reason: format!("decoding failed: {msg}"),
                    });
                }
                decode_errors += 1;
                if first_decode_error.is_empty() {
                    first_decode_error = msg.to_string();
                }
                continue;
            }
            Err(SymphoniaError::IoError(e)) => {
                if exact {
                    return Err(AudioError::Corrupt {
                        path: pb(),
                        reason: format!("decoding failed: {e}"),
                    });
                }
                decode_errors += 1;
                if first_decode_error.is_empty() {
                    first_decode_error = e.to_string();
                }
                continue;
            }
            Err(e) => {
                return Err(AudioError::Corrupt {
                    path: pb(),
                    reason: format!("decoding failed: {e}"),
                })
            }
        };
        let spec = *decoded.spec();
        let ch = spec.channels.count();
        if ch == 0 {
            return Err(AudioError::MissingStreamInfo { path: pb() });
        }
        match channels {
            None => channels = Some(ch),
            Some(c) if c != ch => {
                return Err(AudioError::FormatChange {
                    path: pb(),
                    reason: format!("channel count {c} -> {ch}"),
                })
            }
            _ => {}
        }
        match rate {
            None => {
                check_rate(path, spec.rate)?;
                rate = Some(spec.rate);
            }
            Some(r) if r != spec.rate => {
                return Err(AudioError::FormatChange {
                    path: pb(),
                    reason: format!("sample rate {r} Hz -> {} Hz", spec.rate),
                })
            }
            _ => {}
        }
        if decoded.frames() == 0 {
            continue;
        }
        let needed = decoded.frames() * ch;
        if buf.as_ref().is_none_or(|b| b.capacity() < needed) {
            let frames = decoded.capacity().max(decoded.frames()) as u64;
            buf = Some(SampleBuffer::<f32>::new(frames, spec));
        }
        if let Some(sb) = buf.as_mut() {
            sb.copy_interleaved_ref(decoded);
            out.extend_from_slice(sb.samples());
        }
    }

    let (Some(rate), Some(channels)) = (rate, channels) else {
        if decode_errors > 0 {
            return Err(AudioError::Corrupt {
                path: pb(),
                reason: format!("decoding failed: {first_decode_error}"),
            });
        }
        return Err(AudioError::MissingStreamInfo { path: pb() });
    };
    let frames = (out.len() / channels) as u64;
    // Streaming writers (e.g. ffmpeg writing WAV to a pipe) leave 0xFFFFFFFF in the 32-bit RIFF size
    // fields: a frame count that would need >= 4 GiB of data, in a smaller file, is a placeholder.
    let bytes_per_frame = channels as u64 * (params.bits_per_sample.unwrap_or(8) as u64 / 8).max(1);
    let placeholder =
        |n: u64| n.saturating_mul(bytes_per_frame) >= 0xFFFF_0000 && meta.len() < 0xFFFF_0000;
    if frames == 0 {
        if decode_errors > 0 {
            return Err(AudioError::Corrupt {
                path: pb(),
                reason: format!(
                    "no packet could be decoded ({decode_errors} errors, first: {first_decode_error})"
                ),
            });
        }
        if let Some(expected) = params
            .n_frames
            .filter(|&n| n > 0 && exact && !placeholder(n))
        {
            return Err(AudioError::Truncated {
                path: pb(),
                expected,
                decoded: 0,
            });
        }
        return Err(AudioError::ZeroLength { path: pb() });
    }
    if exact {
        if let Some(expected) = params.n_frames.filter(|&n| !placeholder(n)) {
            if frames < expected {
                return Err(AudioError::Truncated {
                    path: pb(),
                    expected,
                    decoded: frames,
                });
            }
        }
    }
    if let Some((skip, keep)) = mp4_edit_trim(path, rate) {
        // Apply the edit: drop the priming frames, keep the presentation duration.
        let skip = skip.min(frames);
        let keep = keep.unwrap_or(frames - skip).min(frames - skip);
        if keep > 0 && (skip > 0 || keep < frames) {
            let ch = channels as u64;
            out.truncate(((skip + keep) * ch) as usize);
            out.drain(..(skip * ch) as usize);
        }
    }
    if decode_errors > 0 {
        tracing::warn!(
            "{}: skipped {decode_errors} undecodable packet(s) (first error: {first_decode_error})",
            path.display()
        );
    }
    Ok((out, rate, channels))
}

/// Iterate the boxes of an in-memory ISO-BMFF byte range: yields `(fourcc, body)`.
fn mp4_boxes(mut buf: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 8 {
            return None;
        }
        let size32 = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
        let kind = [buf[4], buf[5], buf[6], buf[7]];
        let (size, hdr) = match size32 {
            0 => (buf.len() as u64, 8u64),
            1 if buf.len() >= 16 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[8..16]);
                (u64::from_be_bytes(b), 16u64)
            }
            1 => return None,
            n => (n, 8u64),
        };
        if size < hdr || size > buf.len() as u64 {
            return None;
        }
        let body = &buf[hdr as usize..size as usize];
        buf = &buf[size as usize..];
        Some((kind, body))
    })
}

fn mp4_child<'a>(buf: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    mp4_boxes(buf).find(|(k, _)| k == kind).map(|(_, b)| b)
}

fn be_u32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64)
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}

/// Timescale of an `mvhd` / `mdhd` body (version 0: 32-bit times, version 1: 64-bit times).
fn mp4_timescale(body: &[u8]) -> Option<u64> {
    match body.first()? {
        0 => be_u32(body, 12),
        1 => be_u32(body, 20),
        _ => None,
    }
}

/// For an MP4-family file, the edit of the first sound track as `(skip, keep)` frames at `rate`:
/// `skip` = the edit's media time (encoder priming), `keep` = its duration (`None` when the edit has no
/// duration). `None` when the file is not MP4, has no edit list, or has an edit list other than one
/// plain segment (e.g. several segments or an empty edit). Never fails: any parsing problem means "no trim".
fn mp4_edit_trim(path: &Path, rate: u32) -> Option<(u64, Option<u64>)> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 16];
    f.read_exact(&mut head[..8]).ok()?;
    if &head[4..8] != b"ftyp" {
        return None;
    }
    // Find the top-level moov box without reading mdat.
    let mut off = 0u64;
    let moov = loop {
        if off + 8 > len {
            return None;
        }
        f.seek(SeekFrom::Start(off)).ok()?;
        f.read_exact(&mut head[..8]).ok()?;
        let mut size = be_u32(&head, 0)?;
        let mut hdr = 8u64;
        if size == 1 {
            f.read_exact(&mut head[8..16]).ok()?;
            size = be_u64(&head, 8)?;
            hdr = 16;
        } else if size == 0 {
            size = len - off;
        }
        if size < hdr || off + size > len {
            return None;
        }
        if &head[4..8] == b"moov" {
            let body = size - hdr;
            if body > 64 << 20 {
                return None;
            }
            let mut buf = vec![0u8; body as usize];
            f.read_exact(&mut buf).ok()?;
            break buf;
        }
        off += size;
    };
    let movie_ts = mp4_timescale(mp4_child(&moov, b"mvhd")?)?;
    for (kind, trak) in mp4_boxes(&moov) {
        if &kind != b"trak" {
            continue;
        }
        let Some(mdia) = mp4_child(trak, b"mdia") else {
            continue;
        };
        let Some(hdlr) = mp4_child(mdia, b"hdlr") else {
            continue;
        };
        if hdlr.get(8..12) != Some(b"soun".as_slice()) {
            continue;
        }
        let media_ts = mp4_timescale(mp4_child(mdia, b"mdhd")?)?;
        let elst = mp4_child(mp4_child(trak, b"edts")?, b"elst")?;
        let version = *elst.first()?;
        let count = be_u32(elst, 4)? as usize;
        let entry = if version == 1 { 20 } else { 12 };
        if count != 1 || elst.len() < 8 + entry || movie_ts == 0 || media_ts == 0 {
            return None;
        }
        let (dur, media_time) = if version == 1 {
            (be_u64(elst, 8)?, be_u64(elst, 16)? as i64)
        } else {
            (be_u32(elst, 8)?, be_u32(elst, 12)? as u32 as i32 as i64)
        };
        if media_time < 0 {
            return None; // an empty edit (leading silence): not applied
        }
        let r = rate as u128;
        let skip = (media_time as u128 * r + media_ts as u128 / 2) / media_ts as u128;
        let keep =
            (dur > 0).then(|| ((dur as u128 * r + movie_ts as u128 / 2) / movie_ts as u128) as u64);
        return Some((skip as u64, keep));
    }
    None
}

fn check_rate(path: &Path, rate: u32) -> Result<(), AudioError> {
    if (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(AudioError::BadSampleRate {
            path: path.to_path_buf(),
            rate,
        })
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Sinc filter length used by [`resample_to_16k`] for a source rate: 256 taps at the output rate, i.e.
/// `256 * ceil(rate / 16000)` taps at the input rate when downsampling, so the anti-aliasing transition
/// band (measured at 16 kHz) does not widen with the decimation factor.
pub fn resampler_sinc_len(rate: u32) -> usize {
    256 * (rate.div_ceil(TARGET_SAMPLE_RATE).max(1) as usize)
}

/// Largest reduced output/input numerator for which the exact polyphase mode is used (sinc table size is
/// `sinc_len * p` values).
const MAX_EXACT_PHASES: u64 = 4096;

/// Resample a mono buffer from `rate` Hz to 16 kHz.
///
/// Output length is `ceil(n * 16000 / rate)` (librosa / transformers convention), and output sample `k`
/// is the band-limited input evaluated at time exactly `k / 16000` s (no delay, no fractional shift).
///
/// Resampler: rubato [`SincFixedIn`] in `f32`, windowed sinc with the BlackmanHarris² window,
/// relative cutoff `calculate_cutoff(256, BlackmanHarris2)` (≈ 0.92 of the lower Nyquist frequency: flat to
/// about 7.4 kHz when downsampling, stopband from 8 kHz), [`resampler_sinc_len`] taps. When
/// `16000 / gcd(rate, 16000) <= 4096` (every common rate: 8, 11.025, 12, 22.05, 24, 32, 44.1, 48, 88.2, 96,
/// 192 kHz, ...) the oversampling factor is set to exactly that number of phases with `Nearest`
/// interpolation, which makes rubato an exact rational polyphase resampler; other rates use 256×
/// oversampling with cubic interpolation between sinc phases. The input is zero-extended at both ends
/// (the first/last ~10 ms see silence beyond the clip, as with soxr).
///
/// Accuracy on two in-band sines vs the analytic 16 kHz signal, away from the edges (release build):
/// 100–140 dB SNR for the common rates, ~86–99 dB for odd ones (7919, 44101 Hz). Against soxr `soxr_hq`
/// (librosa) the waveforms agree to 46–60 dB SNR on the fixtures and the log-mel features to < 2e-4 in
/// the passband; they differ near the band edge where the two anti-aliasing filters roll off differently.
/// Speed (release, one core): ~1 s per 300 s of 44.1/48 kHz audio.
pub fn resample_to_16k(samples: &[f32], rate: u32) -> Result<Vec<f32>, AudioError> {
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        return Err(AudioError::InvalidSampleRate { rate });
    }
    if rate == TARGET_SAMPLE_RATE || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let err = |reason: String| AudioError::Resample { rate, reason };

    let g = gcd(rate as u64, TARGET_SAMPLE_RATE as u64);
    let q = rate as u64 / g; // input period
    let p = TARGET_SAMPLE_RATE as u64 / g; // output period
    let ratio = p as f64 / q as f64;
    let sinc_len = resampler_sinc_len(rate);
    let exact = p <= MAX_EXACT_PHASES;
    let oversampling = if exact { p as usize } else { 256 };

    // Alignment. rubato 0.16's SincFixedIn (checked empirically against analytic signals, see the tests)
    // produces output k at input time tau_k = (k + 1) * q / p - 1 + 1 / oversampling. We prepend `pad`
    // zeros and drop the first `skip` outputs so that output k lands exactly on input time k * q / p:
    // (skip + 1) * q / p - 1 + 1 / oversampling == pad (an integer).
    let (pad, skip) = if exact {
        // oversampling == p: ((skip + 1) * q + 1) / p - 1 == pad, so (skip + 1) * q + 1 ≡ 0 (mod p).
        let mut m1 = 1u64;
        while (m1 * q + 1) % p != 0 {
            m1 += 1;
            if m1 > p {
                return Err(err("no exact alignment found".into()));
            }
        }
        (((m1 * q + 1) / p - 1) as usize, (m1 - 1) as usize)
    } else {
        let mut best = (f64::MAX, 0usize, 0usize);
        for m1 in 1..=p {
            let t = m1 as f64 * q as f64 / p as f64 - 1.0 + 1.0 / oversampling as f64;
            let r = t.round();
            if r >= 0.0 && (t - r).abs() < best.0 {
                best = ((t - r).abs(), r as usize, (m1 - 1) as usize);
            }
        }
        (best.1, best.2)
    };

    let n_out = ((samples.len() as u64 * p).div_ceil(q)) as usize;
    let params = SincInterpolationParameters {
        sinc_len,
        f_cutoff: calculate_cutoff(256, WindowFunction::BlackmanHarris2),
        oversampling_factor: oversampling,
        interpolation: if exact {
            SincInterpolationType::Nearest
        } else {
            SincInterpolationType::Cubic
        },
        window: WindowFunction::BlackmanHarris2,
    };
    let chunk = (4 * sinc_len).max(4096);
    let mut rs =
        SincFixedIn::<f32>::new(ratio, 1.0, params, chunk, 1).map_err(|e| err(e.to_string()))?;

    let mut input: Vec<f32> = Vec::with_capacity(pad + samples.len());
    input.resize(pad, 0.0);
    input.extend_from_slice(samples);

    let want = skip + n_out;
    let mut out: Vec<f32> = Vec::with_capacity(want + chunk);
    let mut pos = 0usize;
    while pos + rs.input_frames_next() <= input.len() && out.len() < want {
        let k = rs.input_frames_next();
        let o = rs
            .process(&[&input[pos..pos + k]], None)
            .map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&o[0]);
        pos += k;
    }
    if pos < input.len() && out.len() < want {
        let o = rs
            .process_partial(Some(&[&input[pos..]]), None)
            .map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&o[0]);
    }
    let mut guard = 0;
    while out.len() < want {
        let o = rs
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&o[0]);
        guard += 1;
        if guard > 1_000_000 {
            return Err(err("resampler produced no output".into()));
        }
    }
    Ok(out[skip..want].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn snr_db(got: &[f32], want: impl Fn(usize) -> f64, range: std::ops::Range<usize>) -> f64 {
        let (mut e, mut p) = (0.0, 0.0);
        for k in range {
            let w = want(k);
            e += (got[k] as f64 - w).powi(2);
            p += w * w;
        }
        10.0 * (p / e).log10()
    }

    #[test]
    fn resample_lengths_follow_librosa() {
        for (rate, n) in [
            (44_100u32, 44_100usize),
            (44_100, 12_345),
            (8_000, 999),
            (48_000, 1),
            (22_050, 7),
        ] {
            let x = vec![0.0f32; n];
            let y = resample_to_16k(&x, rate).unwrap();
            assert_eq!(
                y.len(),
                (n as u64 * 16_000).div_ceil(rate as u64) as usize,
                "{rate} {n}"
            );
        }
        assert_eq!(
            resample_to_16k(&[0.5, -0.5], 16_000).unwrap(),
            vec![0.5, -0.5]
        );
        assert!(resample_to_16k(&[], 44_100).unwrap().is_empty());
    }

    #[test]
    fn resample_is_aligned_and_accurate_for_many_rates() {
        // Two partials well inside the passband; output k must equal the signal at t = k / 16000.
        let sig = |t: f64| {
            0.4 * (2.0 * PI * 440.0 * t).sin() + 0.3 * (2.0 * PI * 3_234.5 * t + 0.3).sin()
        };
        for rate in [
            8_000u32, 11_025, 22_050, 24_000, 32_000, 37_000, 44_100, 48_000, 96_000, 44_101, 7_919,
        ] {
            let n = rate as usize / 2;
            let x: Vec<f32> = (0..n).map(|m| sig(m as f64 / rate as f64) as f32).collect();
            let y = resample_to_16k(&x, rate).unwrap();
            let snr = snr_db(&y, |k| sig(k as f64 / 16_000.0), 1_000..y.len() - 1_000);
            // 100-140 dB for the exact polyphase rates, ~86-99 dB for the odd ones (cubic phase interpolation).
            assert!(snr > 80.0, "rate {rate}: SNR {snr:.1} dB");
        }
    }

    #[test]
    fn bad_rates_are_rejected() {
        assert!(matches!(
            resample_to_16k(&[0.0; 10], 999),
            Err(AudioError::InvalidSampleRate { rate: 999 })
        ));
        assert!(matches!(
            resample_to_16k(&[0.0; 10], 768_001),
            Err(AudioError::InvalidSampleRate { .. })
        ));
        assert!(resample_to_16k(&[0.0; 10], 0).is_err());
    }

    #[test]
    fn mono_is_channel_mean() {
        assert_eq!(
            to_mono(&[1.0, 0.0, 0.5, -0.5, 0.25, 0.75], 2),
            vec![0.5, 0.0, 0.5]
        );
        assert_eq!(
            to_mono(&[0.3, 0.6, 0.9], 3),
            vec![(0.3f32 + 0.6 + 0.9) / 3.0]
        );
        assert_eq!(to_mono(&[0.1, 0.2], 1), vec![0.1, 0.2]);
    }

    #[test]
    fn silence_detection() {
        let mut a = DecodedAudio {
            samples: vec![0.0; 100],
            source_sample_rate: 16_000,
            source_channels: 1,
            duration_secs: 0.00625,
        };
        assert!(a.is_silent());
        a.samples[50] = -1e-3;
        assert!(!a.is_silent());
        assert_eq!(a.peak(), 1e-3);
    }
}
