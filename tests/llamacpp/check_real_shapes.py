#!/usr/bin/env python3
"""Checks the tensor names and shapes of a checkpoint written by `omni random-checkpoint` against the
reference model built from the same config.json by transformers (on the meta device: no memory).

    /opt/refenv/bin/python tests/llamacpp/check_real_shapes.py DIR
"""
import json
import sys

import torch
from safetensors import safe_open
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

d = sys.argv[1]
cfg = Qwen3OmniMoeConfig.from_pretrained(d)
with torch.device("meta"):
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
ref = {k: list(v.shape) for k, v in model.state_dict().items()}
# transformers 5 keeps stacked experts (`experts.gate_up_proj`); the checkpoint format is per expert.
index = json.load(open(f"{d}/model.safetensors.index.json"))["weight_map"]
ours = {}
for f in sorted(set(index.values())):
    with safe_open(f"{d}/{f}", "pt") as s:
        for k in s.keys():
            ours[k] = list(s.get_slice(k).get_shape())


def expand(ref):
    out = {}
    for k, shape in ref.items():
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            e, two_i, h = shape[0], shape[1], shape[2]
            for x in range(e):
                out[f"{p}{x}.gate_proj.weight"] = [two_i // 2, h]
                out[f"{p}{x}.up_proj.weight"] = [two_i // 2, h]
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            for x in range(shape[0]):
                out[f"{p}{x}.down_proj.weight"] = [shape[1], shape[2]]
        else:
            out[k] = shape
    return out


# transformers 5 nests the towers under `thinker.model`; checkpoints keep the released names.
RENAMES = [("thinker.model.audio_tower.", "thinker.audio_tower."), ("thinker.model.visual.", "thinker.visual."),
           ("thinker.model.language_model.", "thinker.model."), ("talker.model.language_model.", "talker.model.")]


def rename(k):
    for a, b in RENAMES:
        if k.startswith(a):
            return b + k[len(a):]
    return k


ref = {rename(k): v for k, v in expand(ref).items()}
only_ref = sorted(set(ref) - set(ours))
only_ours = sorted(set(ours) - set(ref))
bad = [(k, ours[k], ref[k]) for k in ours if k in ref and ours[k] != ref[k]]
print(f"reference tensors {len(ref)}, ours {len(ours)}")
print("only in the reference:", only_ref[:10], len(only_ref))
print("only in ours:", only_ours[:10], len(only_ours))
print("shape differences:", bad[:10], len(bad))
sys.exit(0 if not (only_ref or only_ours or bad) else 1)
