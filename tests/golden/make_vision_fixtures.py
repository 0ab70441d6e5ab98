#!/usr/bin/env python3
"""Vision goldens: synthetic images, the image processor's pixels, the vision tower (with deepstack),
and image / audio+image prompts through the Thinker.

Run from the repository root with the reference environment, after make_fixtures.py:

    /opt/refenv/bin/python tests/golden/make_vision_fixtures.py

Writes only new files:
  tests/fixtures/images/*.png                 deterministic synthetic images (written once, kept)
  tests/fixtures/images/pixels.safetensors    the processor's pixel_values (same processor config in
                                              both checkpoints; asserted), f32, for one image that
                                              needs no resize and one that does
  tests/fixtures/tiny-{a,b}/golden/vision.safetensors + vision.json

What the reference is
---------------------
`Qwen3OmniMoeProcessor(text=..., images=[PIL.Image], audio=[...])` with the checkpoint's processor
config (transformers 5: `Qwen2VLImageProcessor`, the torchvision backend: uint8 tensor, smart_resize,
bicubic + antialias resize (torch's native uint8 kernel on CPU), fused rescale/normalize in float32, patchify with the temporal repeat), then
`thinker.get_image_features` (vision tower: pooler_output = merger output, deepstack_features),
`thinker.get_rope_index` and `thinker(**inputs)` / `thinker.generate(do_sample=False)`.

The checkpoint weights are not touched here (they belong to make_fixtures.py); the random vision tower
keeps the image: its patch embedding dominates the learned position table (the relative change of the
tower output between two images is recorded in vision.json as `image_sensitivity`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import FIXTURES, ROOT, audio_prompt_waves, load_reference, write_json  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

IMAGES = FIXTURES / "images"

# name -> (width, height, seed). All but `resize_*` are multiples of patch_size * merge_size = 32,
# so the processor does not resample them and the engine's pixels must be exact.
IMAGE_SPECS = {
    "square_64.png": (64, 64, 1),
    "wide_96x64.png": (96, 64, 2),
    "resize_50x70.png": (50, 70, 3),
}

# (case, images, audio clips (make_fixtures AUDIO_CASES style), question, max_new_tokens)
PROMPT_CASES = [
    ("image", ["wide_96x64.png"], [], "What is this?", 32),
    ("two_images", ["square_64.png", "wide_96x64.png"], [], "Compare the two pictures.", 32),
    ("audio_image", ["square_64.png"], [("tone_0p6s.wav", 0.6)], "Describe the sound and the picture.", 32),
]

LOGITS_TAIL = 4
# Pixels kept in the shared file (the square image is covered by the tower and prompt goldens).
PIXEL_GOLDENS = {"wide_96x64.png": torch.float32, "resize_50x70.png": torch.float32}


def synth_image(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a few discs and noise: every patch differs, uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(2 * np.pi * (x / width * (1 + seed) + 0.3 * seed))
    g = 128 + 100 * np.cos(2 * np.pi * (y / height * (2 + seed % 2)))
    b = 255 * (x + y) / (width + height)
    img = np.stack([r, g, b], axis=-1)
    for _ in range(3):
        cx, cy, rad = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 20)
        color = rng.uniform(0, 255, 3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
        img[mask] = color
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_images() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, (w, h, seed) in IMAGE_SPECS.items():
        path = IMAGES / name
        if not path.exists():
            Image.fromarray(synth_image(w, h, seed), "RGB").save(path, format="PNG", optimize=False)


def load_image(name: str) -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB")


def own_pixels(img: Image.Image, cfg) -> np.ndarray:
    """The no-resize path re-derived in numpy (what the engine implements): a cross-check."""
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)  # [c, h, w]
    mean = np.float32(0.5 * (1.0 / cfg.rescale_factor))
    std = np.float32(0.5 * (1.0 / cfg.rescale_factor))
    a = (a - mean) / std
    c, h, w = a.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = a.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # bh bw mh mw c p p
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)
    return x.reshape(gh * gw, c * t * p * p)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def vision_golden(out: Path, model, processor, pixels: dict) -> dict:
    thinker = model.thinker
    ip = processor.image_processor
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"images": {}, "cases": []}

    # 1. Pixels of every image on its own.
    for name in IMAGE_SPECS:
        img = load_image(name)
        enc = ip(images=[img], return_tensors="pt")
        pv, grid = enc["pixel_values"], enc["image_grid_thw"]
        if name in pixels:
            assert torch.equal(pixels[name][0], pv), f"{out.name}: pixels of {name} differ between checkpoints"
        pixels[name] = (pv, grid)
        entry = {"size_wh": list(img.size), "grid_thw": grid[0].tolist(), "resized": bool(
            grid[0, 1] * ip.patch_size != img.size[1] or grid[0, 2] * ip.patch_size != img.size[0])}
        if not entry["resized"]:
            diff = float(np.abs(own_pixels(img, ip) - pv.numpy()).max())
            assert diff == 0.0, f"{name}: numpy re-derivation differs by {diff}"
        meta["images"][name] = entry

    # 2. The tower on two images in one call (cu_seqlens per image), and the sensitivity check.
    pair = ["square_64.png", "wide_96x64.png"]
    enc = ip(images=[load_image(n) for n in pair], return_tensors="pt")
    with torch.no_grad():
        feats = thinker.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
        tensors["tower.grid_thw"] = enc["image_grid_thw"].to(torch.int64).contiguous()
        tensors["tower.merged"] = torch.cat(feats.pooler_output, 0).float().contiguous()
        for i, level in enumerate(feats.deepstack_features):
            tensors[f"tower.deepstack.{i}"] = torch.cat(level, 0).float().contiguous()
        # Same grid, other content: the square image's pixels mirrored left-right.
        one = ip(images=[load_image("square_64.png")], return_tensors="pt")
        mirrored = ip(images=[load_image("square_64.png").transpose(Image.FLIP_LEFT_RIGHT)], return_tensors="pt")
        a = thinker.get_image_features(one["pixel_values"], one["image_grid_thw"], return_dict=True).pooler_output[0]
        b = thinker.get_image_features(mirrored["pixel_values"], mirrored["image_grid_thw"],
                                       return_dict=True).pooler_output[0]
        meta["image_sensitivity"] = float((a - b).norm() / a.norm())
    meta["tower"] = {"images": pair, "grid_thw": enc["image_grid_thw"].tolist(),
                     "deepstack_levels": len(feats.deepstack_features)}

    # 3. Prompts.
    for case, images, clips, question, max_new in PROMPT_CASES:
        imgs = [load_image(n) for n in images]
        waves = audio_prompt_waves(clips) if clips else None
        content = ([{"type": "audio", "audio": n} for n, _ in clips] + [{"type": "image", "image": n} for n in images]
                   + [{"type": "text", "text": question}])
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"text": text, "images": imgs, "return_tensors": "pt"}
        if waves is not None:
            kwargs["audio"] = waves
        enc = processor(**kwargs)
        keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
        if waves is not None:
            keys += ["input_features", "feature_attention_mask"]
        inputs = {k: enc[k] for k in keys}
        with torch.no_grad():
            positions, deltas = thinker.get_rope_index(
                inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"],
                audio_seqlens=inputs["feature_attention_mask"].sum(-1) if waves is not None else None)
            logits = thinker(**inputs).logits[0]
            gen = thinker.generate(**inputs, do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                                   pad_token_id=eos[-1], output_scores=True, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        new = gen.sequences[0, prompt_len:].tolist()
        while new and new[-1] in eos:
            new.pop()
        margins = [float(torch.topk(sc[0].float(), 2).values.diff().abs()) for sc in gen.scores]
        tail = min(LOGITS_TAIL, prompt_len)
        tensors[f"{case}.prompt_ids"] = inputs["input_ids"][0].to(torch.int64).contiguous()
        tensors[f"{case}.position_ids"] = positions[:, 0, :].to(torch.int64).contiguous()
        tensors[f"{case}.prompt_logits_tail"] = logits[-tail:].float().contiguous()
        tensors[f"{case}.greedy_ids"] = torch.tensor(new, dtype=torch.int64)
        meta["cases"].append({
            "name": case, "images": [f"tests/fixtures/images/{n}" for n in images],
            "clips": [f"tests/fixtures/audio-prompts/{n}" for n, _ in clips], "question": question,
            "rendered": text, "prompt_ids": inputs["input_ids"][0].tolist(),
            "image_grid_thw": inputs["image_grid_thw"].tolist(), "rope_delta": int(deltas.flatten()[0]),
            "greedy_ids": new, "max_new_tokens": max_new, "min_top1_top2_margin": min(margins),
            "greedy_text": processor.tokenizer.decode(new)})
    save_file(dict(sorted(tensors.items())), str(out / "golden" / "vision.safetensors"))
    return meta


def main() -> None:
    write_images()
    pixels: dict = {}
    for name in ("tiny-a", "tiny-b"):
        out = FIXTURES / name
        model, processor = load_reference(out)
        meta = vision_golden(out, model, processor, pixels)
        meta = {"generator": "tests/golden/make_vision_fixtures.py", "transformers": transformers.__version__,
                "torch": torch.__version__, "image_processor": type(processor.image_processor).__name__, **meta}
        write_json(out / "golden" / "vision.json", meta)
        print(name, json.dumps({c["name"]: round(c["min_top1_top2_margin"], 4) for c in meta["cases"]}),
              "sensitivity", round(meta["image_sensitivity"], 3))
    shared = {}
    for name, (pv, grid) in pixels.items():
        if name in PIXEL_GOLDENS:
            shared[f"pixels.{name}"] = pv.to(PIXEL_GOLDENS[name]).contiguous()
        shared[f"grid.{name}"] = grid.to(torch.int64).contiguous()
    save_file(dict(sorted(shared.items())), str(IMAGES / "pixels.safetensors"))
    for p in sorted(IMAGES.iterdir()):
        print(md5(p), p.stat().st_size, p.name)


if __name__ == "__main__":
    main()
