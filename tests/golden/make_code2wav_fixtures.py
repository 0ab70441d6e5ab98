#!/usr/bin/env python3
"""Reference waveforms of Code2Wav (`Qwen3OmniMoeCode2Wav`) for the committed tiny checkpoints.

For each of tests/fixtures/tiny-a and tiny-b, loads the checkpoint with transformers (float32),
draws deterministic random codec frames of several lengths and writes

    <dir>/golden/code2wav.safetensors   codes (int64, [num_quantizers, frames]) and raw waveforms (float32)
    <dir>/golden/code2wav.json          one entry per stored waveform: which codes, which call, stride

Waveforms are the reference `forward` (`model.code2wav(codes)`) and `chunked_decode(codes, chunk_size,
left_context_size)`, stored before their final `clamp(-1, 1)` (captured with a forward hook on the last
conv; their clamp is asserted equal to the reference outputs bit for bit). 1920 samples per frame make long waveforms large, so long outputs are stored
subsampled (`wave[::stride]`); `num_samples` is the full length. (`forward` yields
frames * samples_per_frame - 555 samples for the rates 8,5,4,3 and `chunked_decode` loses those 555
samples once per chunk, so its length differs from `forward`'s once it really chunks.) For inputs of at most `chunk_size`
frames `chunked_decode` is a single call of `forward` on the same codes (asserted bit-for-bit here), so
those cases store one waveform that both Rust paths are compared against.

Run from the repository root, after tests/golden/make_fixtures.py (which wipes <dir>/golden/):

    /opt/refenv/bin/python tests/golden/make_code2wav_fixtures.py

Fixed seeds and one CPU thread: running it again rewrites the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import transformers
from transformers import Qwen3OmniMoeForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ("tiny-a", "tiny-b")

# (case, frames, [(kind, chunk_size, left_context, stride)]); kind "forward" or "chunked". Strides of
# long outputs are primes, so the kept samples visit every phase of the 1920-sample frame.
CASES = [
    ("f1", 1, [("forward", None, None, 1)]),
    ("f7", 7, [("forward", None, None, 1)]),
    ("f50", 50, [("forward", None, None, 1), ("chunked", 16, 5, 13)]),
    ("f330", 330, [("forward", None, None, 31), ("chunked", 300, 25, 23)]),
]


def codes_for(model_index: int, frames: int, num_quantizers: int, codebook_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * (model_index + 1) + frames)
    return torch.randint(0, codebook_size, (1, num_quantizers, frames), generator=g, dtype=torch.int64)


class RawCapture:
    """Records the output of the last decoder conv: the waveform before `clamp(-1, 1)`.

    The tiny checkpoints' scaled last conv pushes much of the waveform past +-1 (tiny-a: nearly all of
    it), where the clamped output is constant and cannot show errors; the raw waveform can.
    """

    def __init__(self, c2w):
        self.outputs = []
        self.handle = c2w.decoder[-1].register_forward_hook(lambda _m, _i, out: self.outputs.append(out.detach()))

    def take(self):
        outs, self.outputs = self.outputs, []
        return outs


def chunk_contexts(frames: int, chunk_size: int, left_context: int) -> list[int]:
    """The left context of each call `chunked_decode` makes (same loop as the reference)."""
    contexts, start = [], 0
    while start < frames:
        end = min(start + chunk_size, frames)
        contexts.append(left_context if start - left_context > 0 else start)
        start = end
    return contexts


def golden(name: str, model_index: int) -> dict:
    out = FIXTURES / name
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    c2w = model.code2wav
    cfg = c2w.config
    spf = int(c2w.total_upsample)
    capture = RawCapture(c2w)
    tensors, entries = {}, []
    with torch.no_grad():
        for case, frames, outputs in CASES:
            codes = codes_for(model_index, frames, cfg.num_quantizers, cfg.codebook_size)
            tensors[f"{case}.codes"] = codes[0].contiguous()
            full = c2w(codes)[0, 0]
            (raw_full,) = capture.take()
            raw_full = raw_full[0, 0]
            assert torch.equal(raw_full.clamp(min=-1, max=1), full)
            # Each decoder block's transposed conv trims its kernel overhang on both sides, so the
            # waveform is shorter than frames * samples_per_frame (by 555 samples for rates 8,5,4,3).
            assert 0 < full.shape[0] < frames * spf, (full.shape, frames, spf)
            if frames <= 300:
                # Single-chunk chunked_decode (default chunk_size=300) is forward itself.
                assert torch.equal(c2w.chunked_decode(codes)[0, 0], full)
                capture.take()
            for kind, chunk, context, stride in outputs:
                if kind == "forward":
                    raw = raw_full
                else:
                    wave = c2w.chunked_decode(codes, chunk_size=chunk, left_context_size=context)[0, 0]
                    pieces = capture.take()
                    contexts = chunk_contexts(frames, chunk, context)
                    assert len(pieces) == len(contexts) > 1
                    raw = torch.cat([p[0, 0, c * spf:] for p, c in zip(pieces, contexts)])
                    assert torch.equal(raw.clamp(min=-1, max=1), wave)
                key = f"{case}.{kind}_raw"
                tensors[key] = raw[::stride].contiguous().float()
                clamped = raw.clamp(min=-1, max=1)
                entries.append({
                    "key": key, "codes": f"{case}.codes", "frames": frames, "kind": kind,
                    "chunk_size": chunk, "left_context": context, "stride": stride,
                    "num_samples": int(raw.shape[0]),
                    "raw_mean": float(raw.mean()), "raw_std": float(raw.std()),
                    "clamped_rms": float(clamped.pow(2).mean().sqrt()),
                    "saturated_fraction": float((raw.abs() >= 1).float().mean()),
                })
    capture.handle.remove()
    save_file(tensors, out / "golden" / "code2wav.safetensors")
    meta = {
        "transformers": transformers.__version__, "torch": torch.__version__,
        "attn_implementation": cfg._attn_implementation, "samples_per_frame": spf,
        "note": "`<case>.<kind>_raw` is the waveform before the final clamp(-1, 1), subsampled by `stride`; "
                "the reference output is its clamp, bit for bit",
        "outputs": entries,
    }
    (out / "golden" / "code2wav.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    torch.set_num_threads(1)
    only = set(sys.argv[1:])
    for i, name in enumerate(MODELS):
        if only and name not in only:
            continue
        meta = golden(name, i)
        stats = {e["key"]: [round(e["raw_mean"], 4), round(e["raw_std"], 4), round(e["saturated_fraction"], 4)]
                 for e in meta["outputs"]}
        print(name, "[raw mean, raw std, saturated fraction]", json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
