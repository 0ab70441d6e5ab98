#!/usr/bin/env python3
"""Runs llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist built by build.sh).

    python tests/llamacpp/convert_hf.py LLAMA_CPP_DIR MODEL_DIR [convert_hf_to_gguf.py args...]

Two answers the converter needs for our tiny test checkpoints, given without editing its source:
- its BPE pre-tokenizer check hashes the tokenizer's output on a fixed text and refuses unknown
  hashes; the tiny fixtures' tokenizer is Qwen2's pre-tokenizer with a small vocabulary, so an
  unknown hash is answered with "qwen2" (known hashes keep their answer);
- with --mmproj, this version hands `model.visual.*` names to its Qwen3-VL code, which expects
  `visual.*` (an upstream bug for Qwen3-Omni): the name is given as `visual.*`.
"""
import runpy
import sys

llama = sys.argv.pop(1)
sys.path.insert(0, llama + "/gguf-py")
sys.path.insert(0, llama)

import conversion.base as base  # noqa: E402
import conversion.qwen3vl as q3  # noqa: E402

_pre = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        return "qwen2"


base.TextModel.get_vocab_base_pre = get_vocab_base_pre

_modify = q3.Qwen3OmniMmprojModel.modify_tensors


def modify_tensors(self, data, name, bid):
    return _modify(self, data, name.replace("thinker.visual.", "visual.", 1), bid)


q3.Qwen3OmniMmprojModel.modify_tensors = modify_tensors

sys.argv[0] = llama + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
