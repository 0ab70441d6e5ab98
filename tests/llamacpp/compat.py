#!/usr/bin/env python3
"""llama.cpp compatibility of our GGUF files, both directions, checked with llama.cpp itself.

    tests/llamacpp/build.sh                              # once: llama.cpp + omni-llama-check
    cargo build -p omni-engine                           # the omni binary
    /opt/refenv/bin/python tests/llamacpp/compat.py [--omni target/debug/omni] [--out DIR]

A. ours -> llama.cpp: `omni quantize` writes tiny-a's thinker/mmproj at f32 and q8_0; llama.cpp
   loads them, its tokenizer gives the golden prompt ids for the rendered prompts, and its greedy
   tokens for each golden prompt equal ours (`omni run --thinker FILE`; the golden tokens at f32);
   mtmd loads the mmproj (vision + audio, with its warm-up encode) although it also holds our
   deepstack mergers.
B. llama.cpp -> ours: llama.cpp's converter writes tiny-a's thinker (f32, q8_0); `omni run` loads it
   and its greedy tokens equal llama.cpp's on the same file (and the golden tokens at f32).
C. The Q8_0 tensor data of our thinker file is byte-identical to the converter's for the same
   checkpoint, tensor by tensor; names, shapes and types match too.
F. Q8_0 position by position (teacher-forced along the f32 reference's greedy tokens): llama.cpp's
   top-1 and ours agree except where the reference's top two logits are within 1.0 (free-running
   greedy tokens at q8_0 are reported in A/B but not required: they follow the first near-tie).
D. For contrast: the converter's own mmproj (deepstack as v.deepstack.*) -- does mtmd load it?
E. tiny-b (norm_topk_prob=false, a dense mlp_only layer) -- llama.cpp's qwen3vlmoe graph cannot
   express either; reported, not required.
Not part of CI. Prints one line per check and a JSON summary; exits 1 when a required check fails.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EOS = {686, 688}


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return r


def check_json(tool, args):
    r = run([tool] + args)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 and not lines:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    out = json.loads(lines[-1])
    out["stderr_tail"] = r.stderr[-600:]
    return out


def until_eos(ids):
    out = []
    for t in ids:
        if t in EOS:
            break
        out.append(t)
    return out


def same_greedy(llama, other, stop_id):
    """llama.cpp's greedy tokens against another run's: (equal, detail). llama.cpp also stops at tokens
    its vocab marks end-of-generation that are not the checkpoint's eos ids (Qwen's <|fim_pad|>,
    <|repo_name|>, <|file_sep|>); a run that stops there, the other going on with that very token, is
    equal up to the stop and says so."""
    if llama == other:
        return True, ""
    n = len(llama)
    if stop_id >= 0 and stop_id not in EOS and other[:n] == llama and len(other) > n and other[n] == stop_id:
        return True, f"equal for {n} tokens, where llama.cpp stops at its end-of-generation token {stop_id} (not an eos id of the checkpoint) and the other goes on"
    first = next((i for i, (x, y) in enumerate(zip(llama, other)) if x != y), min(len(llama), len(other)))
    return False, f"first difference at token {first}: llama {llama[first:first+5]} vs {other[first:first+5]}"


def omni_run(omni, thinker, case, n):
    msgs = case["messages"]
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        extra = []
    elif len(msgs) == 2 and msgs[0]["role"] == "system":
        extra = ["--system", msgs[0]["content"][0]["text"]]
    else:
        return None
    text = msgs[-1]["content"][0]["text"]
    r = run([omni, "run", "--thinker", thinker, "--prompt", text, "--temperature", "0", "--max-new-tokens", str(n), "--json"] + extra)
    if r.returncode != 0:
        return {"error": r.stderr[-1000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--omni", default=os.path.join(ROOT, "target/debug/omni"))
    ap.add_argument("--llama-dir", default=os.path.join(ROOT, "target/llamacpp"))
    ap.add_argument("--out", default=os.path.join(ROOT, "target/llamacpp/compat"))
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args()
    tool = os.path.join(a.llama_dir, "omni-llama-check")
    llama_src = os.path.join(a.llama_dir, "llama.cpp")
    sys.path.insert(0, os.path.join(llama_src, "gguf-py"))
    from gguf import GGUFReader  # the converter's own reader

    os.makedirs(a.out, exist_ok=True)
    results, failed = [], []

    def report(name, ok, detail="", required=True):
        results.append({"check": name, "ok": ok, "required": required, "detail": detail})
        print(("PASS " if ok else ("FAIL " if required else "NOTE ")) + name + (f"  -- {detail}" if detail else ""))
        if required and not ok:
            failed.append(name)

    model = os.path.join(ROOT, "tests/fixtures/tiny-a")
    golden = json.load(open(os.path.join(model, "golden/golden.json")))["thinker_text"]["cases"]

    # A. ours -> llama.cpp
    for ty in ["f32", "q8_0"]:
        out = os.path.join(a.out, f"omni-tiny-a-{ty}")
        r = run([a.omni, "quantize", "--model", model, "--out", out, "--type", ty, "--only", "thinker,mmproj"])
        report(f"A omni quantize tiny-a {ty}", r.returncode == 0, r.stderr.strip().replace("\n", "; "))
        thinker = os.path.join(out, f"thinker-{ty}.gguf")
        mmproj = os.path.join(out, f"mmproj-{ty}.gguf")
        for case in golden:
            n = case["max_new_tokens"]
            ids = ",".join(map(str, case["prompt_ids"]))
            ll = check_json(tool, ["--model", thinker, "--text", case["rendered"], "--prompt-ids", ids, "--n", str(n)])
            if "error" in ll:
                report(f"A llama.cpp loads our {ty} thinker ({case['name']})", False, ll["error"])
                continue
            report(f"A llama.cpp tokenizer on our {ty} file = golden prompt ids ({case['name']})", ll["text_ids"] == case["prompt_ids"],
                   "" if ll["text_ids"] == case["prompt_ids"] else f"llama {ll['text_ids']} vs {case['prompt_ids']}")
            ours = omni_run(a.omni, thinker, case, n)
            if ours is None:
                ref, what = until_eos(case["greedy_ids"]), "golden (f32 reference)"
                required = ty == "f32"
            elif "error" in ours:
                report(f"A omni run on our {ty} file ({case['name']})", False, ours["error"])
                continue
            else:
                if ours["prompt_token_ids"] != case["prompt_ids"]:
                    report(f"A omni prompt ids ({case['name']})", False)
                # Free-running greedy decoding at Q8_0 follows the first near-tie either way (F below
                # compares the two implementations position by position instead).
                ref, what, required = until_eos(ours["token_ids"]), "omni on the same file", ty == "f32"
            same, detail = same_greedy(until_eos(ll["greedy_ids"]), ref, ll.get("stop_id", -1))
            report(f"A llama.cpp greedy tokens on our {ty} thinker = {what} ({case['name']}, {len(ref)} tokens)", same,
                   detail, required)
        mm = check_json(tool, ["--model", thinker, "--mmproj", mmproj])
        ok = mm.get("mmproj_loaded") and mm.get("vision") and mm.get("audio")
        report(f"A llama.cpp (mtmd) loads our {ty} mmproj with vision+audio (deepstack kept as omni.deepstack.*)", bool(ok),
               json.dumps({k: mm.get(k) for k in ["mmproj_loaded", "vision", "audio", "audio_sample_rate"]}))

    # B. llama.cpp -> ours
    for ty in ["f32", "q8_0"]:
        f = os.path.join(a.out, f"llamacpp-tiny-a-{ty}.gguf")
        r = run([a.python, os.path.join(ROOT, "tests/llamacpp/convert_hf.py"), llama_src, model, "--outtype", ty, "--outfile", f])
        report(f"B llama.cpp converter writes tiny-a {ty}", r.returncode == 0, "" if r.returncode == 0 else r.stderr[-800:])
        for case in golden:
            ours = omni_run(a.omni, f, case, case["max_new_tokens"])
            if ours is None:
                continue
            if "error" in ours:
                report(f"B omni runs llama.cpp's {ty} file ({case['name']})", False, ours["error"])
                continue
            ll = check_json(tool, ["--model", f, "--prompt-ids", ",".join(map(str, ours["prompt_token_ids"])), "--n", str(case["max_new_tokens"])])
            got, ref = until_eos(ours["token_ids"]), until_eos(ll.get("greedy_ids", []))
            same, detail = same_greedy(ref, got, ll.get("stop_id", -1))
            report(f"B omni greedy tokens on llama.cpp's {ty} file = llama.cpp's ({case['name']}, {len(ref)} tokens)", same,
                   detail.replace("vs", "vs omni"), ty == "f32")
            if ty == "f32":
                g = until_eos(case["greedy_ids"])
                report(f"B omni on llama.cpp's f32 file = golden ({case['name']})", got == g and ours["prompt_token_ids"] == case["prompt_ids"])

    # C. byte-identical Q8_0 data, same names/shapes/types
    ours = GGUFReader(os.path.join(a.out, "omni-tiny-a-q8_0", "thinker-q8_0.gguf"))
    theirs = GGUFReader(os.path.join(a.out, "llamacpp-tiny-a-q8_0.gguf"))
    ot = {t.name: t for t in ours.tensors}
    tt = {t.name: t for t in theirs.tensors}
    report("C same tensor names as llama.cpp's converter", set(ot) == set(tt), f"only ours {sorted(set(ot)-set(tt))}, only theirs {sorted(set(tt)-set(ot))}")
    same_meta = all(ot[n].tensor_type == tt[n].tensor_type and list(ot[n].shape) == list(tt[n].shape) for n in ot if n in tt)
    report("C same ggml types and shapes", same_meta, "; ".join(f"{n}: {ot[n].tensor_type.name}{list(ot[n].shape)} vs {tt[n].tensor_type.name}{list(tt[n].shape)}"
                                                           for n in ot if n in tt and (ot[n].tensor_type != tt[n].tensor_type or list(ot[n].shape) != list(tt[n].shape))))
    q8 = [n for n in ot if n in tt and ot[n].tensor_type.name == "Q8_0"]
    diff = [n for n in q8 if bytes(ot[n].data.tobytes()) != bytes(tt[n].data.tobytes())]
    report(f"C Q8_0 data byte-identical to llama.cpp's converter ({len(q8)} tensors)", not diff and len(q8) > 0, f"differ: {diff[:5]}")
    keys_theirs = {k for k in theirs.fields if not k.startswith("GGUF.")}
    keys_ours = {k for k in ours.fields if not k.startswith("GGUF.")}
    report("C every metadata key of the converter is in our file", keys_theirs <= keys_ours, f"missing {sorted(keys_theirs - keys_ours)}")
    for k in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
              "qwen3vlmoe.rope.dimension_sections", "qwen3vlmoe.attention.layer_norm_rms_epsilon"]:
        if k in theirs.fields:
            same = ours.fields[k].contents() == theirs.fields[k].contents() if k in ours.fields else False
            report(f"C metadata {k} equals the converter's", same)

    # F. Q8_0 position by position: teacher-forced along the f32 reference's greedy continuation,
    #    llama.cpp's top-1 (on our file and on the converter's) and ours (`omni eval`) against the
    #    reference's; where llama.cpp and omni differ, the reference's top-2 margin must be a near-tie
    #    (< 1.0: the Q8_0 logit noise is ~0.3 RMS on logits of RMS ~16-50 here).
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration
    ref_model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    q8_ours = os.path.join(a.out, "omni-tiny-a-q8_0", "thinker-q8_0.gguf")
    q8_theirs = os.path.join(a.out, "llamacpp-tiny-a-q8_0.gguf")
    ev = run([a.omni, "eval", "--model", model, "--thinker", q8_ours])
    ev_cases = {c["name"]: c for c in json.loads(ev.stdout.strip().splitlines()[-1])["thinker"]["cases"]} if ev.returncode == 0 else {}
    report("F omni eval on our q8_0 thinker", ev.returncode == 0, ev.stderr[-300:] if ev.returncode else "")
    totals = {"llama.cpp, our q8_0 file": [0, 0], "llama.cpp, converter's q8_0 file": [0, 0], "omni, our q8_0 file": [0, 0]}
    for case in golden:
        cont = case["greedy_ids"]
        with torch.no_grad():
            logits = ref_model.thinker(input_ids=torch.tensor([case["prompt_ids"] + cont])).logits[0]
        p0 = len(case["prompt_ids"]) - 1
        top2 = torch.topk(logits[p0:p0 + len(cont)], 2).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        forced = {}
        for label, f in [("llama.cpp, our q8_0 file", q8_ours), ("llama.cpp, converter's q8_0 file", q8_theirs)]:
            ll = check_json(tool, ["--model", f, "--prompt-ids", ",".join(map(str, case["prompt_ids"])), "--force-ids", ",".join(map(str, cont))])
            forced[label] = {k for k, (x, y) in enumerate(zip(ll.get("forced_argmax", []), cont)) if x != y}
        ec = ev_cases.get(case["name"])
        if ec is None:
            continue
        forced["omni, our q8_0 file"] = {p - ec["prompt_tokens"] + 1 for p, _ in ec["disagreements"]} & set(range(len(cont)))
        for label, wrong in forced.items():
            totals[label][0] += len(cont) - len(wrong)
            totals[label][1] += len(cont)
        split = forced["llama.cpp, our q8_0 file"] ^ forced["omni, our q8_0 file"]
        worst = max((margins[k] for k in split), default=0.0)
        report(f"F llama.cpp and omni pick the same top-1 on our q8_0 file except at near-ties ({case['name']})", worst < 1.0,
               f"differ at {sorted(split)} (reference margins {[round(margins[k], 3) for k in sorted(split)]}); "
               f"wrong vs reference: llama {sorted(forced['llama.cpp, our q8_0 file'])}, omni {sorted(forced['omni, our q8_0 file'])}")
    for label, (ok, n) in totals.items():
        report(f"F top-1 agreement with the f32 reference, {label}: {ok}/{n} = {100 * ok / max(n, 1):.2f} %", True, required=False)

    # D. the converter's own mmproj
    conv_mm = os.path.join(a.out, "llamacpp-mmproj-tiny-a-f32.gguf")
    r = run([a.python, os.path.join(ROOT, "tests/llamacpp/convert_hf.py"), llama_src, model, "--outtype", "f32", "--mmproj", "--outfile", conv_mm])
    if r.returncode == 0:
        mm = check_json(tool, ["--model", os.path.join(a.out, "omni-tiny-a-f32", "thinker-f32.gguf"), "--mmproj", conv_mm])
        msg = [l for l in mm.get("stderr_tail", "").splitlines() if "mismatch" in l or "error" in l.lower()]
        report("D llama.cpp's own converter mmproj (v.deepstack.*) loads in mtmd", bool(mm.get("mmproj_loaded")), "; ".join(msg)[:300], required=False)

    # E. tiny-b
    outb = os.path.join(a.out, "omni-tiny-b-f32")
    run([a.omni, "quantize", "--model", os.path.join(ROOT, "tests/fixtures/tiny-b"), "--out", outb, "--type", "f32", "--only", "thinker"])
    gb = json.load(open(os.path.join(ROOT, "tests/fixtures/tiny-b/golden/golden.json")))["thinker_text"]["cases"][0]
    ll = check_json(tool, ["--model", os.path.join(outb, "thinker-f32.gguf"), "--prompt-ids", ",".join(map(str, gb["prompt_ids"])), "--n", "40"])
    if "error" in ll or not ll.get("model_loaded"):
        report("E llama.cpp runs tiny-b (norm_topk_prob=false, mlp_only_layers=[2])", False,
               (ll.get("error") or ll.get("stderr_tail", ""))[-300:].replace("\n", " "), required=False)
    else:
        same = until_eos(ll["greedy_ids"]) == until_eos(gb["greedy_ids"])
        report("E llama.cpp greedy on tiny-b = golden", same, "", required=False)

    json.dump({"results": results, "failed": failed}, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed or noted; {len(failed)} required failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
