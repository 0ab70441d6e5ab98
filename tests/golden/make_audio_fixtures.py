#!/usr/bin/env python3
"""Regenerate the audio fixtures under tests/fixtures/audio/ (inputs + Whisper log-mel goldens).

Run from the repository root with the reference environment:

    /opt/refenv/bin/python tests/golden/make_audio_fixtures.py

Needs: numpy, soundfile, soxr, torch, transformers (5.x) in that environment, and the command-line tools
`espeak-ng` (speech), `ffmpeg` (FLAC / MP3 / Ogg Vorbis / M4A-AAC encodes); `apt-get install -y espeak-ng ffmpeg`.

Everything is deterministic: synthetic signals use fixed seeds, WAV files are written byte by byte by this
script (no timestamps / PEAK chunks), ffmpeg runs with `-bitexact` (no version strings, fixed Ogg serial numbers),
and safetensors are written with sorted keys. Running the script twice gives identical bytes (checked with md5sum).
Byte identity across *different* tool versions (espeak-ng, ffmpeg/libmp3lame/libvorbis, soxr, torch) is not
promised; the versions used are recorded in cases.json.

What the reference is
---------------------
`Qwen3OmniMoeProcessor._process_audio` calls its `WhisperFeatureExtractor` as

    feature_extractor(audio_list, sampling_rate=16000, padding=True, truncation=False,
                      return_attention_mask=True, return_tensors="np")

with the checkpoint's preprocessor config (feature_size=128, hop_length=160, n_fft=400, chunk_length=300,
padding_value=0.0, dither=0.0). The goldens are exactly that call. Because torch is installed, transformers uses
`_torch_extract_fbank_features` (float32 torch.stft); the float64 numpy path (`_np_extract_fbank_features`) is
also run and its max difference to the torch path is recorded per case in cases.json (about 1e-6).

Audio that is not 16 kHz mono is what users load with `librosa.load(path, sr=16000)` (transformers'
`load_audio(..., backend="soundfile")` is documented to be identical): soundfile decode to float32, mean over
channels, soxr 'soxr_hq' resampling, length fixed to ceil(n * 16000 / sr). That 16 kHz waveform is stored in
mel_golden.safetensors as `wave16k/<name>` so the Rust test can compare its mel on the very same samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import transformers
from safetensors.numpy import save_file
from transformers import WhisperFeatureExtractor
import transformers.models.whisper.feature_extraction_whisper as fe_mod

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "audio"
SR = 16000
HOP = 160

FE_KWARGS = dict(
    feature_size=128,
    sampling_rate=16000,
    hop_length=160,
    n_fft=400,
    chunk_length=300,
    padding_value=0.0,
    return_attention_mask=True,
    dither=0.0,
)
CALL_KWARGS = dict(sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True, return_tensors="np")


# ----------------------------------------------------------------------------------------------------------------
# WAV writing (byte-exact, no metadata chunks)
# ----------------------------------------------------------------------------------------------------------------
def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """float in [-1, 1] -> stored integer/float codes for `fmt`."""
    x = np.asarray(x, dtype=np.float64)
    if fmt == "u8":
        return (np.clip(np.round(x * 128.0), -128, 127) + 128).astype(np.uint8)
    if fmt == "s16":
        return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
    if fmt == "s24":
        return np.clip(np.round(x * 8388608.0), -8388608, 8388607).astype(np.int32)
    if fmt == "s32":
        return np.clip(np.round(x * 2147483648.0), -2147483648, 2147483647).astype(np.int64).astype(np.int32)
    if fmt == "f32":
        return x.astype(np.float32)
    raise ValueError(fmt)


def decoded_value(codes: np.ndarray, fmt: str) -> np.ndarray:
    """What a reader returns as float32 for the stored codes (soundfile / symphonia convention)."""
    if fmt == "u8":
        return ((codes.astype(np.float64) - 128.0) / 128.0).astype(np.float32)
    if fmt == "s16":
        return (codes.astype(np.float64) / 32768.0).astype(np.float32)
    if fmt == "s24":
        return (codes.astype(np.float64) / 8388608.0).astype(np.float32)
    if fmt == "s32":
        return (codes.astype(np.float64) / 2147483648.0).astype(np.float32)
    if fmt == "f32":
        return codes.astype(np.float32)
    raise ValueError(fmt)


def write_wav(path: Path, codes: np.ndarray, sr: int, fmt: str) -> None:
    """codes: [n] or [n, channels] from `quantize`. Plain RIFF/WAVE, fmt + (fact) + data chunks only."""
    if codes.ndim == 1:
        codes = codes[:, None]
    n, ch = codes.shape
    bits = {"u8": 8, "s16": 16, "s24": 24, "s32": 32, "f32": 32}[fmt]
    tag = 3 if fmt == "f32" else 1
    block = ch * bits // 8
    if fmt == "u8":
        data = codes.astype(np.uint8).tobytes()
    elif fmt == "s16":
        data = codes.astype("<i2").tobytes()
    elif fmt == "s24":
        v = codes.astype("<i4").reshape(-1)
        b = v.view(np.uint8).reshape(-1, 4)[:, :3]
        data = b.tobytes()
    elif fmt == "s32":
        data = codes.astype("<i4").tobytes()
    else:
        data = codes.astype("<f4").tobytes()
    if tag == 1:
        fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, tag, ch, sr, sr * block, block, bits)
        extra = b""
    else:
        fmt_chunk = struct.pack("<4sIHHIIHHH", b"fmt ", 18, tag, ch, sr, sr * block, block, bits, 0)
        extra = struct.pack("<4sII", b"fact", 4, n)
    data_chunk = struct.pack("<4sI", b"data", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    body = b"WAVE" + fmt_chunk + extra + data_chunk
    path.write_bytes(struct.pack("<4sI", b"RIFF", len(body)) + body)


# ----------------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------------
def tone_mix(sr: int, n: int, seed: int, gap: tuple[float, float] | None = None) -> np.ndarray:
    """Deterministic test signal: two partials, a linear chirp, a little noise, optional exact-zero gap."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64) / sr
    dur = n / sr
    f0, f1 = 300.0, 3000.0
    chirp_phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / dur * t * t)
    x = (
        0.30 * np.sin(2 * np.pi * 440.0 * t)
        + 0.20 * np.sin(2 * np.pi * 1250.7 * t + 0.5)
        + 0.12 * np.sin(chirp_phase)
        + 0.02 * rng.standard_normal(n)
    )
    # slow amplitude envelope so frames differ in level (exercises the max - 8 floor)
    x *= 0.55 + 0.45 * np.sin(2 * np.pi * 1.7 * t + 0.2)
    if gap is not None:
        a, b = int(gap[0] * sr), int(gap[1] * sr)
        x[a:b] = 0.0
    return x


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except Exception as e:  # pragma: no cover
        return f"unknown ({e})"


def librosa_like_load(path: Path) -> np.ndarray:
    """transformers.audio_utils._load_audio_soundfile == librosa.load(path, sr=16000)."""
    with sf.SoundFile(str(path)) as f:
        src = f.samplerate
        w = f.read(dtype="float32", always_2d=True).T
    w = w.mean(axis=0) if w.shape[0] > 1 else w[0]
    if src != SR:
        n = math.ceil(w.shape[-1] * SR / src)
        w = soxr.resample(w, src, SR, quality="soxr_hq")
        w = np.pad(w, (0, max(0, n - len(w))))[:n]
    return np.ascontiguousarray(w, dtype=np.float32)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "_tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict] = {}
    waves16k: dict[str, np.ndarray] = {}  # reference 16 kHz float32 waveforms by source name

    def add_wav(name: str, x: np.ndarray, sr: int, fmt: str) -> np.ndarray:
        codes = quantize(x, fmt)
        write_wav(OUT / name, codes, sr, fmt)
        ch = 1 if codes.ndim == 1 else codes.shape[1]
        n = codes.shape[0]
        files[name] = dict(container="wav", codec=f"pcm_{fmt}", sample_rate=sr, channels=ch, frames=n,
                           duration_secs=n / sr, lossless=True)
        vals = decoded_value(codes, fmt)
        # cross-check the byte writer against libsndfile
        back = sf.read(str(OUT / name), dtype="float32", always_2d=True)[0]
        assert np.array_equal(back, vals.reshape(n, ch)), name
        return vals

    # --- 16 kHz mono synthetic clips --------------------------------------------------------------------------
    short = add_wav("tone_0p5s_16k_s16.wav", tone_mix(SR, 8000, seed=1, gap=(0.20, 0.28)), SR, "s16")
    one = add_wav("tone_1s_16k_f32.wav", tone_mix(SR, 16000, seed=2), SR, "f32")

    # --- PCM sample-format variants (0.1 s, same content) -------------------------------------------------------
    base = tone_mix(SR, 1600, seed=3) * 1.4
    base[100] = 1.0  # full-scale codes (clipped to the max code) and the most negative value
    base[101] = -1.0
    for fmt in ("u8", "s16", "s24", "s32", "f32"):
        add_wav(f"pcm_{fmt}_16k.wav", base, SR, fmt)

    # --- speech (espeak-ng, 22.05 kHz native) ----------------------------------------------------------------
    sp22_path = tmp / "speech_22k_raw.wav"
    run(["espeak-ng", "-v", "en-us", "-s", "175", "-w", str(sp22_path), "What is the weather like today?"])
    sp22, sp22_sr = sf.read(str(sp22_path), dtype="float64")
    assert sp22_sr == 22050, sp22_sr
    # 16 kHz mono 16-bit speech clip (resampled with soxr in float64, then quantized)
    sp16 = soxr.resample(sp22, 22050, SR, quality="soxr_hq")
    speech = add_wav("speech_16k_s16.wav", sp16, SR, "s16")
    # a 22.05 kHz excerpt, used as a resampled source (first 0.8 s)
    add_wav("speech_22k_s16.wav", sp22[: int(0.8 * 22050)], 22050, "s16")

    # lossy / compressed encodes of the 16 kHz speech clip
    src = str(OUT / "speech_16k_s16.wav")
    enc = {
        "speech_16k.flac": ["-c:a", "flac", "-compression_level", "8"],
        "speech_16k.mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
        "speech_16k.ogg": ["-c:a", "libvorbis", "-q:a", "2"],
        "speech_16k.m4a": ["-c:a", "aac", "-b:a", "64k"],
    }
    for name, args in enc.items():
        dst = OUT / name
        if dst.exists():
            dst.unlink()
        run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", src, "-map_metadata", "-1", *args,
             "-fflags", "+bitexact", "-flags:a", "+bitexact", str(dst)])
        files[name] = dict(container=name.rsplit(".", 1)[1], codec=args[1], sample_rate=SR, channels=1,
                           frames=len(speech), duration_secs=len(speech) / SR, lossless=name.endswith(".flac"),
                           same_as="speech_16k_s16.wav")

    # --- other sample rates / stereo (0.4-0.8 s) --------------------------------------------------------------------
    add_wav("tone_8k_s16.wav", tone_mix(8000, 4000, seed=4) * 0.9, 8000, "s16")
    t44 = np.arange(22050) / 44100.0
    add_wav("sine440_44k_s16.wav", 0.5 * np.sin(2 * np.pi * 440.0 * t44), 44100, "s16")
    left = tone_mix(48000, 19200, seed=5)
    right = 0.6 * np.sin(2 * np.pi * 660.0 * np.arange(19200) / 48000.0 + 1.0)
    add_wav("tone_48k_stereo_s16.wav", np.stack([left, right], axis=1), 48000, "s16")
    files["sine440_44k_s16.wav"]["analytic"] = dict(amplitude=0.5, freq_hz=440.0, phase=0.0)

    # a typical "music file" MP3: MPEG-1 layer III, 44.1 kHz joint stereo (source WAV not kept)
    st44 = tmp / "stereo_44k.wav"
    n44 = 44100
    write_wav(st44, quantize(np.stack([tone_mix(44100, n44, seed=6),
                                       0.5 * np.sin(2 * np.pi * 523.25 * np.arange(n44) / 44100.0)], axis=1), "s16"),
              44100, "s16")
    run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", str(st44), "-map_metadata", "-1", "-c:a", "libmp3lame",
         "-b:a", "64k", "-fflags", "+bitexact", "-flags:a", "+bitexact", str(OUT / "tone_44k_stereo.mp3")])
    files["tone_44k_stereo.mp3"] = dict(container="mp3", codec="libmp3lame", sample_rate=44100, channels=2,
                                        frames=n44, duration_secs=1.0, lossless=False)

    for name in ("tone_8k_s16.wav", "speech_22k_s16.wav", "sine440_44k_s16.wav", "tone_48k_stereo_s16.wav"):
        waves16k[name] = librosa_like_load(OUT / name)

    # --- mel cases ----------------------------------------------------------------------------------------------
    # A clip is a list of segments [source, start, len]; source is a 16 kHz mono WAV in this folder
    # (read as float32 exactly like soundfile does) or "wave16k/<file>" (a tensor in mel_golden.safetensors).
    def clip_from(segments: list[list]) -> np.ndarray:
        parts = []
        for source, start, length in segments:
            if source.startswith("wave16k/"):
                w = waves16k[source.split("/", 1)[1]]
            else:
                w, sr = sf.read(str(OUT / source), dtype="float32")
                assert sr == SR and w.ndim == 1
            assert start + length <= len(w), (source, start, length, len(w))
            parts.append(w[start : start + length])
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    n_sp = len(speech)
    long_rest = 116800 - 3 * n_sp - 16000 - 8000
    assert 0 < long_rest <= 16000, long_rest
    cases = {
        "short_0p5s": [[["tone_0p5s_16k_s16.wav", 0, 8000]]],
        "one_chunk_1s": [[["tone_1s_16k_f32.wav", 0, 16000]]],
        "long_7p3s": [[
            ["speech_16k_s16.wav", 0, n_sp],
            ["tone_1s_16k_f32.wav", 0, 16000],
            ["speech_16k_s16.wav", 0, n_sp],
            ["tone_0p5s_16k_s16.wav", 0, 8000],
            ["speech_16k_s16.wav", 0, n_sp],
            ["tone_1s_16k_f32.wav", 0, long_rest],
        ]],
        "speech": [[["speech_16k_s16.wav", 0, n_sp]]],
        "batch_two": [
            [["speech_16k_s16.wav", 0, 19752]],
            [["tone_0p5s_16k_s16.wav", 0, 7777]],
        ],
        "batch_three_mixed": [
            [["tone_0p5s_16k_s16.wav", 0, 8000]],
            [["tone_1s_16k_f32.wav", 0, 16000]],
            [["speech_16k_s16.wav", 4000, 3001]],
        ],
        "src_8k": [[["wave16k/tone_8k_s16.wav", 0, len(waves16k["tone_8k_s16.wav"])]]],
        "src_22k_speech": [[["wave16k/speech_22k_s16.wav", 0, len(waves16k["speech_22k_s16.wav"])]]],
        "src_44k_sine": [[["wave16k/sine440_44k_s16.wav", 0, len(waves16k["sine440_44k_s16.wav"])]]],
        "src_48k_stereo": [[["wave16k/tone_48k_stereo_s16.wav", 0, len(waves16k["tone_48k_stereo_s16.wav"])]]],
    }

    fe = WhisperFeatureExtractor(**FE_KWARGS)
    assert fe_mod.is_torch_available(), "reference must run the default (torch) path"
    tensors: dict[str, np.ndarray] = {}
    case_meta = {}
    for name, clips in cases.items():
        audio = [clip_from(c) for c in clips]
        out = fe(audio, **CALL_KWARGS)
        feats = np.ascontiguousarray(out["input_features"], dtype=np.float32)
        mask = np.ascontiguousarray(out["attention_mask"], dtype=np.int32)
        # the float64 numpy path, for information
        orig = fe_mod.is_torch_available
        fe_mod.is_torch_available = lambda: False
        try:
            feats_np = fe(audio, **CALL_KWARGS)["input_features"]
        finally:
            fe_mod.is_torch_available = orig
        lens = [len(a) for a in audio]
        L = max(lens)
        assert feats.shape == (len(audio), 128, L // HOP), feats.shape
        assert mask.shape == (len(audio), L // HOP)
        tensors[f"mel/{name}"] = feats
        tensors[f"mask/{name}"] = mask
        case_meta[name] = dict(
            clips=clips,
            clip_samples=lens,
            n_frames=int(feats.shape[2]),
            valid_frames=[int(v) for v in mask.sum(-1)],
            torch_vs_numpy_path_max_abs=float(np.abs(feats - feats_np).max()),
        )
    for k, w in waves16k.items():
        tensors[f"wave16k/{k}"] = w

    save_file(dict(sorted(tensors.items())), str(OUT / "mel_golden.safetensors"))

    meta = dict(
        generator="tests/golden/make_audio_fixtures.py",
        reference="transformers WhisperFeatureExtractor as called by Qwen3OmniMoeProcessor._process_audio",
        feature_extractor=FE_KWARGS,
        call=CALL_KWARGS,
        extract_path="_torch_extract_fbank_features (float32 torch.stft)",
        resampling="soundfile float32 decode, channel mean, soxr.resample(quality='soxr_hq'), "
                   "length ceil(n*16000/sr) (== librosa.load(sr=16000))",
        versions=dict(
            python=sys.version.split()[0],
            transformers=transformers.__version__,
            torch=torch.__version__,
            numpy=np.__version__,
            soxr=soxr.__version__,
            soundfile=sf.__version__,
            libsndfile=sf.__libsndfile_version__,
            espeak_ng=tool_version(["espeak-ng", "--version"]),
            ffmpeg=tool_version(["ffmpeg", "-version"]),
        ),
        files=files,
        wave16k={k: dict(samples=len(v)) for k, v in waves16k.items()},
        cases=case_meta,
    )
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    shutil.rmtree(tmp)

    total = 0
    for p in sorted(OUT.iterdir()):
        total += p.stat().st_size
        print(f"{md5(p)}  {p.stat().st_size:8d}  {p.name}")
    print(f"total {total} bytes")
    for name, m in case_meta.items():
        print(f"{name:20s} frames={m['n_frames']:4d} valid={m['valid_frames']} "
              f"torch_vs_np={m['torch_vs_numpy_path_max_abs']:.2e}")


if __name__ == "__main__":
    main()
