#!/usr/bin/env python3
"""Reference outputs of the Talker and its code predictor for the committed tiny checkpoints.

For each of tests/fixtures/tiny-a and tiny-b, loads the checkpoint with transformers (float32) and runs
`Qwen3OmniMoeForConditionalGeneration.generate(input_ids, return_audio=True, thinker_do_sample=False,
talker_do_sample=False, speaker=..., thinker_max_new_tokens=N, talker_max_new_tokens=M)` on text-only
prompts (the prompt ids of golden.json's thinker_text cases), with wrappers around `talker.forward` and
`talker.code_predictor.forward` that record what the reference feeds them. code2wav is replaced by a stub
(only the codes matter here). Writes

    <dir>/golden/talker.safetensors   per case: thinker sequences, talker prefill inputs_embeds and logits,
                                      trailing_text_hidden, tts_pad_embed, the first code-predictor call's
                                      inputs and its 15 logits, the codes [frames, 16]
    <dir>/golden/talker.json          case list (prompt, speaker, limits, codes)

Run from the repository root: /opt/refenv/bin/python tests/golden/make_talker_fixtures.py
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import Qwen3OmniMoeForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ("tiny-a", "tiny-b")
THINKER_NEW = 8
TALKER_NEW = 12
# (case, thinker_text case whose prompt ids are used, speaker); "full" tensors only for the first.
# "system_eos_aiden" stops the Thinker early: its eos is the third token it generates greedily.
CASES = [("hello_ethan", "hello", "ethan"), ("hello_chelsie", "hello", "chelsie"), ("system_ethan", "system", "ethan"),
         ("system_eos_aiden", "system", "aiden"), ("speech_ethan", "speech", "ethan")]
# Cases whose prompt is golden.json's thinker_audio case: audio tokens go through hidden_projection.
AUDIO = {"speech"}


class Recorder:
    def __init__(self, model):
        self.talker_calls, self.cp_calls = [], []
        talker, cp = model.talker, model.talker.code_predictor
        t_fwd, c_fwd = talker.forward, cp.forward

        @functools.wraps(t_fwd)
        def talker_forward(*args, **kw):
            out = t_fwd(*args, **kw)
            self.talker_calls.append({"inputs_embeds": kw["inputs_embeds"].detach().clone(),
                                      "logits": out.logits.detach().clone(),
                                      "trailing": kw.get("trailing_text_hidden"),
                                      "tts_pad": kw.get("tts_pad_embed"),
                                      "residual_codes": kw.get("residual_codes")})
            return out

        @functools.wraps(c_fwd)
        def cp_forward(*args, **kw):
            out = c_fwd(*args, **kw)
            self.cp_calls.append({"inputs_embeds": None if kw.get("inputs_embeds") is None
                                  else kw["inputs_embeds"].detach().clone(),
                                  "input_ids": kw.get("input_ids"),
                                  "logits": out.logits.detach().clone()})
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
        audio_t = load_file(out / "golden" / "thinker_audio.safetensors")
        gen_eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
        greedy = {c["name"]: c["greedy_ids"] for c in golden["thinker_text"]["cases"]}
        tensors, cases = {}, []
        for case, prompt, speaker in CASES:
            eos = [greedy[prompt][2]] if "_eos_" in case else gen_eos
            rec = Recorder(model)
            ids = torch.tensor([prompts[prompt]], dtype=torch.long)
            extra = {}
            if prompt in AUDIO:
                # The processor's features for the case's clips (thinker_audio.safetensors keeps only
                # their shape; see make_fixtures.py).
                import soundfile as sf
                from transformers import Qwen3OmniMoeProcessor
                acase = next(c for c in golden["thinker_audio"]["cases"] if c["name"] == prompt)
                waves = [sf.read(str(FIXTURES.parent.parent / c), dtype="float32")[0] for c in acase["clips"]]
                enc = Qwen3OmniMoeProcessor.from_pretrained(out)(text=acase["rendered"], audio=waves,
                                                                 return_tensors="pt")
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
            # 15f .. 15f+14 (prefill on [past_hidden, codec_embedding(code0)], then one id a step).
            cp = rec.cp_calls
            assert len(cp) % 15 == 0
            frames = len(cp) // 15
            codes = [c["residual_codes"][0].tolist() for c in rec.talker_calls if c["residual_codes"] is not None]
            assert len(codes) == frames and all(len(c) == 16 for c in codes)
            for f in range(frames):
                assert codes[f][1:] == [int(cp[15 * f + g]["logits"][0, -1].argmax()) for g in range(15)]
            cases.append({"name": case, "prompt": prompt, "audio": prompt in AUDIO, "prompt_ids": prompts[prompt], "speaker": speaker,
                          "speaker_id": model.config.talker_config.speaker_id[speaker],
                          "thinker_max_new_tokens": THINKER_NEW, "talker_max_new_tokens": TALKER_NEW,
                          "thinker_eos": eos, "sequences": seq[0].tolist(), "codes": codes,
                          "talker_calls": len(rec.talker_calls)})
            tensors[f"{case}.codes"] = torch.tensor(codes, dtype=torch.int64).reshape(-1, 16)
            tensors[f"{case}.sequences"] = seq[0].to(torch.int64).contiguous()
            if prompt in AUDIO:
                tensors[f"{case}.prefill_embeds"] = rec.talker_calls[0]["inputs_embeds"][0].contiguous()
                print("talker rope_deltas", model.talker.rope_deltas)
            if case == CASES[0][0]:
                t0 = rec.talker_calls[0]
                tensors[f"{case}.prefill_embeds"] = t0["inputs_embeds"][0].contiguous()
                tensors[f"{case}.prefill_logits"] = t0["logits"][0].contiguous()
                tensors[f"{case}.trailing"] = t0["trailing"][0].contiguous()
                tensors[f"{case}.tts_pad"] = t0["tts_pad"].reshape(-1).contiguous()
                tensors[f"{case}.step1_embeds"] = rec.talker_calls[1]["inputs_embeds"].reshape(-1).contiguous()
                tensors[f"{case}.cp_prefill_embeds"] = cp[0]["inputs_embeds"][0].contiguous()
                tensors[f"{case}.cp_logits"] = torch.stack([cp[g]["logits"][0, -1] for g in range(15)]).contiguous()
            print(name, case, "frames", frames, "talker calls", len(rec.talker_calls), "codes0",
                  [c[0] for c in codes])
        save_file(tensors, out / "golden" / "talker.safetensors")
        (out / "golden" / "talker.json").write_text(json.dumps(
            {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
