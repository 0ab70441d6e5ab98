//! GGUF files: llama.cpp-compatible Thinker and mmproj files, our own talker file, Q8_0.
//!
//! - [`format`]: the container (header, metadata, tensor infos, alignment), our own reader/writer.
//! - [`quant`]: Q8_0 as ggml quantizes it, F16/BF16/F32, decoding of every readable type.
//! - [`names`]: the HF ↔ GGUF name tables, one per file kind.
//! - [`source`] / [`storage`]: GGUF files as a weight source by checkpoint name, quantized matrices
//!   as candle `QTensor`s over the file map.
//! - [`quantize`]: `omni quantize` (checkpoint → `thinker-*.gguf`, `mmproj-*.gguf`, `talker-*.gguf`).
//! - [`model`]: finding the files of a model and reading config, tokenizer and template from them.
//! - [`eval`]: quantization quality (per-stage NMSE, greedy top-1 agreement).
//!
//! The layout of every file, key and tensor is documented in `docs/gguf.md`.

pub mod eval;
pub mod format;
pub mod model;
pub mod names;
pub mod quant;
pub mod quantize;
pub mod random;
pub mod source;
pub mod storage;
pub mod tokenizer;

pub use format::{GgmlType, GgufFile, GgufWriter, TensorInfo, TensorSpec, Value};
pub use names::{Component, FileKind};
