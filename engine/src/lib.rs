//! omni engine: Qwen3-Omni inference on the CPU (candle), stage by stage.
//!
//! Stages meet only through typed values; see each module's docs for the reference code it follows.

pub mod attention;
pub mod audio;
pub mod audio_encoder;
pub mod bench;
pub mod chat;
pub mod code2wav;
pub mod config;
pub mod conversation;
pub mod generation;
pub mod gguf;
pub mod hub;
pub mod nn;
pub mod pipeline;
pub mod profile;
pub mod quant;
pub mod realtime;
pub mod speech;
pub mod stream;
pub mod talker;
pub mod thinker;
pub mod tokenizer;
pub mod vision;
pub mod weights;
