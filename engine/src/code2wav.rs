//! Code2Wav: the causal vocoder turning 16-codebook codec frames into a 24 kHz waveform.
