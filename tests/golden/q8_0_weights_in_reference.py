#!/usr/bin/env python3
"""Q8_0 weight rounding alone, measured in the reference implementation itself (issue #5).

The Thinker's matrices that a Q8_0 GGUF stores as Q8_0 (2-D and stacked-expert weights whose rows
are multiples of 32; norms and the router stay f32, as in the files) are rounded to Q8_0 and back
(ggml's `quantize_row_q8_0_ref`: d = amax / 127, halves away from zero, d stored as f16), and
`transformers` runs the rounded Thinker in f32, teacher-forced along the f32 reference's greedy
continuations of golden.json's text prompts. Every other step is exact, so the top-1 agreement it
prints is what the file's weights allow any implementation, before activations are quantized.

    /opt/refenv/bin/python tests/golden/q8_0_weights_in_reference.py [tiny-a tiny-b]

Not part of CI (needs tests/golden/requirements.txt); the figures are in docs/gguf.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QK = 32


def q8_0_round_trip(w: torch.Tensor) -> torch.Tensor:
    blocks = w.float().reshape(-1, QK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    scaled = blocks * inverse
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # C's roundf
    return (q * d.half().float()).reshape(w.shape)


def stored_as_q8_0(name: str, p: torch.Tensor) -> bool:
    if p.dim() not in (2, 3) or p.shape[-1] % QK != 0:
        return False
    if "norm" in name or name.endswith("mlp.gate.weight"):  # RMS norms and the MoE router: F32
        return False
    return not name.startswith(("model.audio_tower", "model.visual"))  # the mmproj file's


def measure(fixture: str) -> tuple[int, int]:
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(FIXTURES / fixture, dtype=torch.float32).eval()
    thinker = model.thinker
    cases = json.loads((FIXTURES / fixture / "golden" / "golden.json").read_text())["thinker_text"]["cases"]
    sequences = [torch.tensor([c["prompt_ids"] + c["greedy_ids"]]) for c in cases]
    with torch.no_grad():
        reference = [thinker(input_ids=s).logits[0] for s in sequences]
        rounded = 0
        for name, p in thinker.named_parameters():
            if stored_as_q8_0(name, p):
                p.copy_(q8_0_round_trip(p))
                rounded += 1
        quantized = [thinker(input_ids=s).logits[0] for s in sequences]
    agreeing = positions = 0
    error = power = 0.0
    for case, ref, q in zip(cases, reference, quantized):
        # Logits at position t predict token t + 1: the continuation is predicted from the last prompt
        # position up to the one before the last greedy token.
        lo = len(case["prompt_ids"]) - 1
        hi = lo + len(case["greedy_ids"])
        same = int((ref[lo:hi].argmax(-1) == q[lo:hi].argmax(-1)).sum())
        agreeing += same
        positions += hi - lo
        error += float(((ref - q) ** 2).sum())
        power += float((ref ** 2).sum())
        print(f"  {case['name']}: {same}/{hi - lo}")
    print(f"{fixture}: {rounded} matrices rounded to Q8_0; top-1 agreement {agreeing}/{positions} = "
          f"{100 * agreeing / positions:.2f} %, logits NMSE {error / power:.2e}")
    return agreeing, positions


def main() -> None:
    total_agreeing = total = 0
    for fixture in sys.argv[1:] or ["tiny-a", "tiny-b"]:
        a, n = measure(fixture)
        total_agreeing += a
        total += n
    print(f"together: {total_agreeing}/{total} = {100 * total_agreeing / total:.2f} %")


if __name__ == "__main__":
    main()
