//! Audio input: decoding files to 16 kHz mono, and the Whisper-style log-mel features.
