#!/usr/bin/env python3
"""Reference spoken answers (Talker codes) for prompts with images, for the committed tiny checkpoints.

For each of tests/fixtures/tiny-a and tiny-b, runs
`Qwen3OmniMoeForConditionalGeneration.generate(**processor(text, images, audio), return_audio=True,
thinker_do_sample=False, talker_do_sample=False, speaker=..., thinker_max_new_tokens=N,
talker_max_new_tokens=M)` on

  * `image_ethan`          an image + text question (wide_96x64.png), speaker ethan;
  * `audio_image_chelsie`  the talker audio case's speech clip + an image (square_64.png) + text,
                           speaker chelsie;
  * `image_mirrored_ethan` (json only) case one with the image mirrored left-right (same grid, same
                           prompt ids): its codes must differ, or the image would not condition speech.

Wrappers record what the reference feeds `talker.forward` (inputs_embeds, logits) and
`talker.model.forward` (position_ids: the Talker's own M-RoPE positions from `get_rope_index` on
`talker_input_ids`). code2wav is a stub (only the codes matter). Writes

    <dir>/golden/talker_image.safetensors  per case: sequences, codes [frames, 16], talker prefill
                                           inputs_embeds, prefill position ids [3, t]; for the first
                                           case also the last prefill logits rows, trailing_text_hidden
                                           and tts_pad
    <dir>/golden/talker_image.json         case list (images, clips, rendered prompt, speaker, limits,
                                           grids, codes, rope delta)

Run from the repository root: /opt/refenv/bin/python tests/golden/make_talker_image_fixtures.py
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import FIXTURES, ROOT, load_reference  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

THINKER_NEW = 8
TALKER_NEW = 12
LOGITS_TAIL = 4
SPEECH = "tests/fixtures/audio/speech_16k_s16.wav"  # the talker audio case's clip (golden.json "speech")
# (case, image, audio clip or None, question, speaker, mirror the image)
CASES = [
    ("image_ethan", "wide_96x64.png", None, "Describe the picture.", "ethan", False),
    ("audio_image_chelsie", "square_64.png", SPEECH, "Describe the sound and the picture.", "chelsie", False),
    ("image_mirrored_ethan", "wide_96x64.png", None, "Describe the picture.", "ethan", True),
]


class Recorder:
    def __init__(self, model):
        self.talker_calls, self.positions = [], []
        talker = model.talker
        t_fwd, m_fwd = talker.forward, talker.model.forward

        @functools.wraps(t_fwd)
        def talker_forward(*args, **kw):
            out = t_fwd(*args, **kw)
            self.talker_calls.append({"inputs_embeds": kw["inputs_embeds"].detach().clone(),
                                      "logits": out.logits.detach().clone(),
                                      "trailing": kw.get("trailing_text_hidden"),
                                      "tts_pad": kw.get("tts_pad_embed"),
                                      "residual_codes": kw.get("residual_codes")})
            return out

        @functools.wraps(m_fwd)
        def model_forward(*args, **kw):
            pos = kw.get("position_ids")
            if pos is not None and pos.ndim == 3 and pos.shape[0] == 4:
                pos = pos[1:]  # [text, t, h, w]: the rotary uses the last three
            self.positions.append(None if pos is None else pos.detach().clone())
            return m_fwd(*args, **kw)

        talker.forward = talker_forward
        talker.model.forward = model_forward


def run_case(model, processor, out: Path, image: str, clip, question: str, speaker: str, mirror: bool):
    import soundfile as sf
    img = Image.open(FIXTURES / "images" / image).convert("RGB")
    if mirror:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    content = ([{"type": "audio", "audio": clip}] if clip else []) + [
        {"type": "image", "image": image}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    kwargs = {"text": text, "images": [img], "return_tensors": "pt"}
    if clip:
        wave, sr = sf.read(str(ROOT / clip), dtype="float32")
        assert sr == 16000 and wave.ndim == 1
        kwargs["audio"] = [wave]
    enc = processor(**kwargs)
    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    if clip:
        keys += ["input_features", "feature_attention_mask"]
    inputs = {k: enc[k] for k in keys}
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    rec = Recorder(model)
    model.talker.rope_deltas = None
    with torch.no_grad():
        seq, _ = model.generate(**inputs, return_audio=True, thinker_do_sample=False, talker_do_sample=False,
                                speaker=speaker, thinker_max_new_tokens=THINKER_NEW, thinker_eos_token_id=eos,
                                talker_max_new_tokens=TALKER_NEW)
    codes = [c["residual_codes"][0].tolist() for c in rec.talker_calls if c["residual_codes"] is not None]
    assert codes and all(len(c) == 16 for c in codes)
    assert rec.positions[0] is not None and rec.positions[0].shape[-1] == rec.talker_calls[0]["inputs_embeds"].shape[1]
    return text, inputs, eos, seq[0], codes, rec


def patch_talker_audio_config(model) -> None:
    """transformers 5.24.0 cannot speak an audio+image prompt as shipped: the Talker's `get_rope_index`
    (the thinker's, called on the Talker) reads `self.config.audio_config.n_window` for audio segments
    once an image grid is present, and `Qwen3OmniMoeTalkerConfig` has no `audio_config` (AttributeError).
    The only value that keeps the Talker's positions aligned with its ids is the Thinker's audio encoder
    config (the audio pad count came from it), so it is lent to the Talker config. Audio segments get
    plain consecutive positions either way; images get the 3-D grid positions."""
    cfg = model.talker.config
    if not hasattr(cfg, "audio_config"):
        object.__setattr__(cfg, "audio_config", model.config.thinker_config.audio_config)


def main() -> None:
    for name in ("tiny-a", "tiny-b"):
        out = FIXTURES / name
        model, processor = load_reference(out)
        patch_talker_audio_config(model)
        model.code2wav.chunked_decode = lambda codes, **kw: torch.zeros(1, 1, codes.shape[-1])
        tensors, cases, all_codes = {}, [], {}
        for case, image, clip, question, speaker, mirror in CASES:
            text, inputs, eos, seq, codes, rec = run_case(model, processor, out, image, clip, question, speaker,
                                                           mirror)
            all_codes[case] = codes
            t0 = rec.talker_calls[0]
            pos = rec.positions[0][:, 0, :].to(torch.int64)  # [3, t]
            rope_delta = int(pos.max()) + 1 - pos.shape[1]
            print(name, case, "frames", len(codes), "talker calls", len(rec.talker_calls), "prefill",
                  pos.shape[1], "rope delta", rope_delta, "step-1 position", rec.positions[1][:, 0, 0].tolist(),
                  "codes0", [c[0] for c in codes])
            if mirror:
                cases.append({"name": case, "json_only": True, "image": f"tests/fixtures/images/{image}",
                              "mirrored": True, "speaker": speaker, "codes": codes})
                continue
            # Decode steps continue at `cache length + rope delta` on all three streams.
            assert rec.positions[1][:, 0, 0].tolist() == [pos.shape[1] + rope_delta] * 3
            cases.append({
                "name": case, "image": f"tests/fixtures/images/{image}", "clips": [clip] if clip else [],
                "question": question, "rendered": text, "prompt_ids": inputs["input_ids"][0].tolist(),
                "image_grid_thw": inputs["image_grid_thw"].tolist(), "speaker": speaker,
                "speaker_id": model.config.talker_config.speaker_id[speaker],
                "thinker_max_new_tokens": THINKER_NEW, "talker_max_new_tokens": TALKER_NEW, "thinker_eos": eos,
                "sequences": seq.tolist(), "codes": codes, "talker_calls": len(rec.talker_calls),
                "prefill_len": pos.shape[1], "talker_rope_delta": rope_delta})
            tensors[f"{case}.sequences"] = seq.to(torch.int64).contiguous()
            tensors[f"{case}.codes"] = torch.tensor(codes, dtype=torch.int64).reshape(-1, 16)
            tensors[f"{case}.prefill_embeds"] = t0["inputs_embeds"][0].contiguous()
            tensors[f"{case}.position_ids"] = pos.contiguous()
            if case == CASES[0][0]:
                tensors[f"{case}.prefill_logits_tail"] = t0["logits"][0, -LOGITS_TAIL:].contiguous()
                tensors[f"{case}.trailing"] = t0["trailing"][0].contiguous()
                tensors[f"{case}.tts_pad"] = t0["tts_pad"].reshape(-1).contiguous()
        # The image must condition the speech: a mirrored image (same prompt ids) changes the codes.
        same = all_codes["image_ethan"] == all_codes["image_mirrored_ethan"]
        assert not same, f"{name}: mirroring the image does not change the reference codes"
        save_file(dict(sorted(tensors.items())), str(out / "golden" / "talker_image.safetensors"))
        (out / "golden" / "talker_image.json").write_text(json.dumps(
            {"generator": "tests/golden/make_talker_image_fixtures.py", "transformers": transformers.__version__,
             "torch": torch.__version__, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
