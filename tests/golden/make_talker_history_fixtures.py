#!/usr/bin/env python3
"""Reference Talker codes for a multi-turn prompt and for a second audio prompt (issue #4).

Same procedure as make_talker_fixtures.py (whose goldens this does not touch): for each of
tests/fixtures/tiny-a and tiny-b, loads the checkpoint with transformers (float32) and runs
`Qwen3OmniMoeForConditionalGeneration.generate(input_ids, return_audio=True, thinker_do_sample=False,
talker_do_sample=False, speaker=..., thinker_max_new_tokens=8, talker_max_new_tokens=12)` with a wrapper
around `talker.forward` that records the residual codes it is fed; code2wav is a stub. Cases:

    multiturn_ethan   golden.json's thinker_text "multiturn" prompt (user / assistant / user history)
    speech2_ethan     golden.json's thinker_audio "two_clips" prompt (other clips than speech_ethan's
                      "speech" case, same speaker); processor features built as in make_talker_fixtures.py

Writes only <dir>/golden/talker_history.safetensors (per case: thinker sequences and codes [frames, 16])
and <dir>/golden/talker_history.json (case list with prompt ids, speaker, limits, eos, sequences, codes).

Run from the repository root: /opt/refenv/bin/python tests/golden/make_talker_history_fixtures.py
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import transformers
from transformers import Qwen3OmniMoeForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ("tiny-a", "tiny-b")
THINKER_NEW = 8
TALKER_NEW = 12
# (case, golden.json prompt case, speaker)
CASES = [("multiturn_ethan", "multiturn", "ethan"), ("speech2_ethan", "two_clips", "ethan"),
         ("speech_chirp_ethan", "speech_chirp", "ethan")]
# Only the input audio changes against talker.json's speech_ethan: the "speech" prompt's text with
# another clip. Its prompt ids and reference encoder output are recorded here.
OWN_AUDIO = {"speech_chirp": ("speech", ["tests/fixtures/audio-prompts/chirp_4p3s.wav"])}
# Cases whose prompt is golden.json's thinker_audio case: audio tokens go through the audio encoder.
AUDIO = {"two_clips", "speech_chirp"}


class Recorder:
    """Records the talker calls (their residual_codes give each frame's 16 codes) and counts the
    code-predictor calls (15 per frame)."""

    def __init__(self, model):
        self.talker_calls, self.cp_calls = [], []
        talker, cp = model.talker, model.talker.code_predictor
        t_fwd, c_fwd = talker.forward, cp.forward

        @functools.wraps(t_fwd)
        def talker_forward(*args, **kw):
            out = t_fwd(*args, **kw)
            self.talker_calls.append({"residual_codes": kw.get("residual_codes")})
            return out

        @functools.wraps(c_fwd)
        def cp_forward(*args, **kw):
            out = c_fwd(*args, **kw)
            self.cp_calls.append({"logits": out.logits.detach().clone()})
            return out

        talker.forward = talker_forward
        cp.forward = cp_forward


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for name in MODELS:
        out = FIXTURES / name
        model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        model.code2wav.chunked_decode = lambda codes, **kw: torch.zeros(1, 1, codes.shape[-1])
        golden = json.loads((out / "golden" / "golden.json").read_text())
        prompts = {c["name"]: c["prompt_ids"] for c in golden["thinker_text"]["cases"]}
        prompts.update({c["name"]: c["prompt_ids"] for c in golden["thinker_audio"]["cases"]})
        gen_eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        tensors, cases = {}, []
        for case, prompt, speaker in CASES:
            eos = gen_eos
            rec = Recorder(model)
            ids = torch.tensor([prompts[prompt]], dtype=torch.long) if prompt in prompts else None
            extra = {}
            if prompt in AUDIO:
                # The processor's features for the case's clips, exactly as make_talker_fixtures.py.
                import soundfile as sf
                from transformers import Qwen3OmniMoeProcessor
                base, clips = OWN_AUDIO.get(prompt, (prompt, None))
                acase = next(c for c in golden["thinker_audio"]["cases"] if c["name"] == base)
                clips = clips or acase["clips"]
                waves = [sf.read(str(FIXTURES.parent.parent / c), dtype="float32")[0] for c in clips]
                enc = Qwen3OmniMoeProcessor.from_pretrained(out)(text=acase["rendered"], audio=waves,
                                                                 return_tensors="pt")
                if prompt in OWN_AUDIO:
                    prompts[prompt] = enc["input_ids"][0].tolist()
                    ids = enc["input_ids"]
                    with torch.no_grad():
                        feats = model.thinker.get_audio_features(
                            enc["input_features"], enc["feature_attention_mask"]).last_hidden_state
                    tensors[f"{prompt}.audio_features"] = feats.float().contiguous()
                assert enc["input_ids"][0].tolist() == prompts[prompt]
                extra = {"input_features": enc["input_features"],
                         "feature_attention_mask": enc["feature_attention_mask"],
                         "attention_mask": torch.ones_like(ids)}
            model.talker.rope_deltas = None
            with torch.no_grad():
                seq, _ = model.generate(input_ids=ids, **extra, return_audio=True, thinker_do_sample=False,
                                        talker_do_sample=False, speaker=speaker,
                                        thinker_max_new_tokens=THINKER_NEW, thinker_eos_token_id=eos,
                                        talker_max_new_tokens=TALKER_NEW)
            # Frame f's codebook 0 comes from talker call f, its residuals from code-predictor calls
            # 15f .. 15f+14.
            cp = rec.cp_calls
            assert len(cp) % 15 == 0
            frames = len(cp) // 15
            codes = [c["residual_codes"][0].tolist() for c in rec.talker_calls if c["residual_codes"] is not None]
            assert len(codes) == frames and all(len(c) == 16 for c in codes)
            for f in range(frames):
                assert codes[f][1:] == [int(cp[15 * f + g]["logits"][0, -1].argmax()) for g in range(15)]
            cases.append({"name": case, "prompt": prompt, "audio": prompt in AUDIO, "prompt_ids": prompts[prompt],
                          "speaker": speaker, "speaker_id": model.config.talker_config.speaker_id[speaker],
                          "thinker_max_new_tokens": THINKER_NEW, "talker_max_new_tokens": TALKER_NEW,
                          "thinker_eos": eos, "sequences": seq[0].tolist(), "codes": codes,
                          "talker_calls": len(rec.talker_calls)})
            tensors[f"{case}.codes"] = torch.tensor(codes, dtype=torch.int64).reshape(-1, 16)
            tensors[f"{case}.sequences"] = seq[0].to(torch.int64).contiguous()
            print(name, case, "frames", frames, "talker calls", len(rec.talker_calls), "codes0",
                  [c[0] for c in codes])
        save_file(tensors, out / "golden" / "talker_history.safetensors")
        (out / "golden" / "talker_history.json").write_text(json.dumps(
            {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
