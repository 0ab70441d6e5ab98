//! Audio input: decoding files to 16 kHz mono, and the Whisper-style log-mel features.
//!
//! - [`decode`]: any supported file (WAV/FLAC/MP3/Ogg Vorbis/M4A-AAC, ...) → 16 kHz mono `f32`
//!   ([`load_audio_16k_mono`]), plus [`resample_to_16k`] for raw buffers.
//! - [`mel`]: transformers `WhisperFeatureExtractor` log-mel features as `Qwen3OmniMoeProcessor` computes
//!   them ([`LogMelExtractor`], configured by [`MelConfig`]).

pub mod decode;
pub mod mel;
pub mod stream;

pub use decode::{
    load_audio_16k_mono, resample_to_16k, AudioError, DecodedAudio, MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE, TARGET_SAMPLE_RATE,
};
pub use mel::{LogMelExtractor, MelBatch, MelConfig, MelError};
pub use stream::{StreamingAudioEncoder, StreamingMel, StreamingStats};
