//! GGUF files: llama.cpp-compatible Thinker and mmproj files, our own talker file, Q8_0.
