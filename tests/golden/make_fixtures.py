#!/usr/bin/env python3
"""Reference oracle for omni: tiny random Qwen3-Omni checkpoints and the outputs of `transformers`.

Writes, for each tiny config in CONFIGS, a checkpoint directory with the real layout
(config.json in the real nesting, generation_config.json, sharded bf16 safetensors with per-expert
names, tokenizer.json + tokenizer_config.json, chat template and processor configs) and the
reference outputs of every stage implemented so far under `<dir>/golden/`.

Run from the repository root (needs tests/golden/requirements.txt):

    python tests/golden/make_fixtures.py            # writes tests/fixtures/tiny-a, tiny-b, ...

Fixed seeds everywhere: running it again rewrites the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import transformers
from transformers import (
    Qwen2TokenizerFast,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeProcessor,
    WhisperFeatureExtractor,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
HERE = Path(__file__).resolve().parent

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# The Qwen special tokens in the real vocabulary's order (the real ids are 151643 + index).
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
# Tokens that Qwen marks as not special (they appear in normal text output).
NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"}
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

CORPUS = """\
Qwen3-Omni is a natively end-to-end multilingual omni-modal foundation model. It processes text,
images, audio, and video, and delivers real-time streaming responses in both text and natural speech.
The Thinker reads everything the user says or shows; the Talker turns its answer into speech codes,
and a causal vocoder turns those codes into a waveform at twenty-four kilohertz, one frame at a time.
Hello! How are you today? I am fine, thank you. What is the weather like in Paris, London and Tokyo?
Please describe the picture, transcribe the audio, and answer briefly: 1, 2, 3, 42, 2026, 3.14159.
You are a helpful assistant. The user asked a question; the assistant answered it clearly and kindly.
Voici une phrase en français. Hier ist ein deutscher Satz. 这是一个中文句子。これは日本語の文です。
Code: fn main() { println!("hello, world"); } def f(x): return x * 2  # comment
system user assistant tool function arguments name content role image audio video text
"""


AUDIO_STEM_SCALE = 10.0


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def build_tokenizer(base_vocab: int) -> Tokenizer:
    """A small byte-level BPE with the qwen2 pre-tokenizer and the Qwen special tokens after it."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    chat_roles = "\n".join(["system", "user", "assistant"] * 8)
    tok.train_from_iterator([CORPUS] * 4 + [chat_roles], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in QWEN_SPECIALS])
    return tok


def tokenizer_config(tok: Tokenizer, chat_template: str | None) -> dict:
    decoder = {}
    for t in QWEN_SPECIALS:
        decoder[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t not in NON_SPECIAL,
        }
    cfg = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in QWEN_SPECIALS if t not in NON_SPECIAL and t != "<|endoftext|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 65536, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>", "audio_token": "<|audio_pad|>",
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


# ---------------------------------------------------------------------------------------------
# Configs: the real nesting, tiny sizes (hidden sizes multiples of 32 so Q8_0 applies later)
# ---------------------------------------------------------------------------------------------

def make_config(spec: dict, ids: dict) -> dict:
    t = spec["thinker"]
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "decoder_sparse_step": 1,
        "head_dim": t["head_dim"], "hidden_act": "silu", "hidden_size": t["hidden"],
        "initializer_range": 0.02, "intermediate_size": t["intermediate"], "max_position_embeddings": 65536,
        "mlp_only_layers": t["mlp_only_layers"], "model_type": "qwen3_omni_moe_text",
        "moe_intermediate_size": t["moe_intermediate"], "norm_topk_prob": t["norm_topk_prob"],
        "num_attention_heads": t["heads"], "num_experts": t["experts"], "num_experts_per_tok": t["top_k"],
        "num_hidden_layers": t["layers"], "num_key_value_heads": t["kv_heads"], "rms_norm_eps": 1e-06,
        "rope_scaling": {"interleaved": True, "mrope_interleaved": True, "mrope_section": t["mrope_section"],
                         "rope_type": "default", "type": "default"},
        "rope_theta": t["rope_theta"], "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 0,
        "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_qk_norm": True,
        "use_sliding_window": False, "vocab_size": t["vocab"],
    }
    a = spec["audio"]
    audio = {
        "activation_dropout": 0, "activation_function": "gelu", "attention_dropout": 0, "conv_chunksize": 500,
        "d_model": a["d_model"], "downsample_hidden_size": a["downsample"], "dropout": 0,
        "encoder_attention_heads": a["heads"], "encoder_ffn_dim": a["ffn"], "encoder_layers": a["layers"],
        "initializer_range": 0.02, "max_source_positions": 1500, "model_type": "qwen3_omni_moe_audio_encoder",
        "n_window": a["n_window"], "n_window_infer": a["n_window_infer"], "num_mel_bins": 128,
        "output_dim": t["hidden"], "scale_embedding": False,
    }
    v = spec["vision"]
    vision = {
        "apply_vit_abs_pos_embed": True, "deepstack_visual_indexes": v["deepstack"], "depth": v["depth"],
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": v["hidden"], "image_size": 768, "in_channels": 3,
        "in_chans": 3, "initializer_range": 0.02, "intermediate_size": v["intermediate"],
        "model_type": "qwen3_omni_moe_vision_encoder", "num_heads": v["heads"],
        "num_position_embeddings": v["pos_embeddings"], "out_hidden_size": t["hidden"], "patch_size": 16,
        "spatial_merge_size": 2, "spatial_patch_size": 16, "temporal_patch_size": 2, "tokens_per_second": 2,
    }
    k = spec["talker"]
    talker_text = {
        "attention_bias": False, "attention_dropout": 0, "decoder_sparse_step": 1, "head_dim": k["head_dim"],
        "hidden_act": "silu", "hidden_size": k["hidden"], "initializer_range": 0.02,
        "intermediate_size": k["intermediate"], "max_position_embeddings": 65536, "mlp_only_layers": [],
        "model_type": "qwen3_omni_moe_talker_text", "moe_intermediate_size": k["moe_intermediate"],
        "norm_topk_prob": k["norm_topk_prob"], "num_attention_heads": k["heads"], "num_experts": k["experts"],
        "num_experts_per_tok": k["top_k"], "num_hidden_layers": k["layers"], "num_key_value_heads": k["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"interleaved": True, "mrope_section": k["mrope_section"], "rope_type": "default",
                         "type": "default"},
        "rope_theta": 1000000, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": k["shared_intermediate"], "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": k["vocab"],
    }
    p = spec["code_predictor"]
    code_predictor = {
        "attention_bias": False, "attention_dropout": 0, "head_dim": p["head_dim"], "hidden_act": "silu",
        "hidden_size": k["hidden"], "initializer_range": 0.02, "intermediate_size": p["intermediate"],
        "layer_types": ["full_attention"] * p["layers"], "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "qwen3_omni_moe_talker_code_predictor",
        "num_attention_heads": p["heads"], "num_code_groups": 16, "num_hidden_layers": p["layers"],
        "num_key_value_heads": p["kv_heads"], "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "sliding_window": None, "use_cache": True, "use_sliding_window": False, "vocab_size": p["vocab"],
    }
    c = spec["code2wav"]
    code2wav = {
        "attention_bias": False, "attention_dropout": 0.0, "codebook_dim": 512, "codebook_size": p["vocab"],
        "decoder_dim": c["decoder_dim"], "hidden_act": "silu", "hidden_size": c["hidden"],
        "initializer_range": 0.02, "intermediate_size": c["intermediate"], "layer_scale_initial_scale": 0.01,
        "max_position_embeddings": 8000, "num_attention_heads": c["heads"], "num_hidden_layers": c["layers"],
        "num_key_value_heads": c["heads"], "num_quantizers": 16, "num_semantic_quantizers": 1,
        "rms_norm_eps": 1e-05, "rope_theta": 10000, "semantic_codebook_size": 4096, "sliding_window": 72,
        "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2], "vector_quantization_hidden_dimension": 512,
    }
    codec = k["codec_ids"]
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "assistant_token_id": ids["assistant"],
        "code2wav_config": code2wav,
        "enable_audio_output": True,
        "im_end_token_id": ids["<|im_end|>"],
        "im_start_token_id": ids["<|im_start|>"],
        "model_type": "qwen3_omni_moe",
        "system_token_id": ids["system"],
        "talker_config": {
            "accept_hidden_layer": k["accept_hidden_layer"],
            "audio_end_token_id": ids["<|audio_end|>"], "audio_start_token_id": ids["<|audio_start|>"],
            "audio_token_id": ids["<|audio_pad|>"], "code_predictor_config": code_predictor,
            "codec_bos_id": codec["bos"], "codec_eos_token_id": codec["eos"], "codec_nothink_id": codec["nothink"],
            "codec_pad_id": codec["pad"], "codec_think_bos_id": codec["think_bos"],
            "codec_think_eos_id": codec["think_eos"], "image_token_id": ids["<|image_pad|>"],
            "model_type": "qwen3_omni_moe_talker", "num_code_groups": 16, "output_router_logits": False,
            "position_id_per_seconds": 13, "seconds_per_chunk": 2, "spatial_merge_size": 2,
            "speaker_id": k["speakers"], "text_config": talker_text, "thinker_hidden_size": t["hidden"],
            "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
        },
        "thinker_config": {
            "audio_config": audio,
            "audio_end_token_id": ids["<|audio_end|>"], "audio_start_token_id": ids["<|audio_start|>"],
            "audio_token_id": ids["<|audio_pad|>"], "image_token_id": ids["<|image_pad|>"],
            "initializer_range": 0.02, "model_type": "qwen3_omni_moe_thinker", "position_id_per_seconds": 13,
            "seconds_per_chunk": 2, "text_config": text, "user_token_id": ids["user"],
            "video_token_id": ids["<|video_pad|>"], "vision_config": vision,
            "vision_end_token_id": ids["<|vision_end|>"], "vision_start_token_id": ids["<|vision_start|>"],
        },
        "transformers_version": "4.57.0.dev0",
        "tts_bos_token_id": ids["<tts_text_bos>"],
        "tts_eos_token_id": ids["<tts_text_eod>"],
        "tts_pad_token_id": ids["<tts_pad>"],
        "user_token_id": ids["user"],
    }


CONFIGS = {
    # Keeps the real windows (n_window 50, n_window_infer 800) and the real processor/template layout
    # (preprocessor_config.json + chat_template.json).
    "tiny-a": {
        "seed": 1234, "base_vocab": 900, "layout": "hub", "shard_mb": 2,
        "thinker": {"hidden": 64, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 96,
                    "moe_intermediate": 32, "experts": 8, "top_k": 2, "norm_topk_prob": True,
                    "mlp_only_layers": [], "mrope_section": [6, 5, 5], "rope_theta": 1000000, "vocab_pad": 1024,
                    "lm_head_scale": 100.0},
        "audio": {"d_model": 64, "layers": 2, "heads": 4, "ffn": 128, "downsample": 32, "n_window": 50,
                  "n_window_infer": 800},
        "vision": {"hidden": 64, "depth": 4, "heads": 4, "intermediate": 128, "deepstack": [1, 2, 3],
                   "pos_embeddings": 64},
        "talker": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 128,
                   "moe_intermediate": 32, "shared_intermediate": 64, "experts": 8, "top_k": 2,
                   "norm_topk_prob": False, "mrope_section": [6, 5, 5], "vocab": 1152, "accept_hidden_layer": 2,
                   "codec_ids": {"pad": 1100, "bos": 1101, "eos": 1102, "nothink": 1107, "think_bos": 1108,
                                 "think_eos": 1109},
                   "speakers": {"chelsie": 1121, "ethan": 1122, "aiden": 1123}},
        "code_predictor": {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 128,
                           "vocab": 128},
        "code2wav": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "decoder_dim": 64,
                     "out_scale": 200.0},
    },
    # Different dims, layer counts, token ids, a dense layer, no top-k renormalisation, the
    # transformers-5 processor/template layout (processor_config.json + chat_template.jinja).
    "tiny-b": {
        "seed": 98765, "base_vocab": 700, "layout": "v5", "shard_mb": 1,
        "thinker": {"hidden": 96, "layers": 4, "heads": 4, "kv_heads": 1, "head_dim": 48, "intermediate": 160,
                    "moe_intermediate": 64, "experts": 6, "top_k": 3, "norm_topk_prob": False,
                    "mlp_only_layers": [2], "mrope_section": [10, 7, 7], "rope_theta": 5000000, "vocab_pad": 800,
                    "lm_head_scale": 100.0},
        "audio": {"d_model": 96, "layers": 3, "heads": 3, "ffn": 192, "downsample": 32, "n_window": 50,
                  "n_window_infer": 400},
        "vision": {"hidden": 96, "depth": 3, "heads": 3, "intermediate": 192, "deepstack": [0, 2],
                   "pos_embeddings": 100},
        "talker": {"hidden": 96, "layers": 3, "heads": 3, "kv_heads": 1, "head_dim": 32, "intermediate": 192,
                   "moe_intermediate": 32, "shared_intermediate": 96, "experts": 6, "top_k": 3,
                   "norm_topk_prob": False, "mrope_section": [6, 5, 5], "vocab": 1216, "accept_hidden_layer": 3,
                   "codec_ids": {"pad": 1160, "bos": 1161, "eos": 1162, "nothink": 1167, "think_bos": 1168,
                                 "think_eos": 1169},
                   "speakers": {"chelsie": 1181, "ethan": 1182, "aiden": 1183}},
        "code_predictor": {"layers": 3, "heads": 3, "kv_heads": 1, "head_dim": 32, "intermediate": 192,
                           "vocab": 192},
        "code2wav": {"hidden": 96, "layers": 2, "heads": 3, "intermediate": 192, "decoder_dim": 96,
                     "out_scale": 200.0},
    },
}

def _message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _user(text: str) -> dict:
    return _message("user", text)


def _system(text: str) -> dict:
    return _message("system", text)


def _assistant(text: str) -> dict:
    return _message("assistant", text)


# Chat cases for the Thinker. Each is (name, messages, max_new_tokens).
TEXT_CASES = [
    ("hello", [{"role": "user", "content": [{"type": "text", "text": "Hello! How are you today?"}]}], 40),
    ("system", [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather like in Paris? 42 ☀️"}]},
    ], 40),
    ("multiturn", [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the picture."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the audio? Voici une phrase."}]},
    ], 36),
    # Issue #5's Q8_0 agreement is counted over these prompts: nine more widen the sample (3 prompts
    # resolved it only to 0.84 pp per token). Fixed before measuring; if one stops before 32 tokens on
    # either fixture it is replaced by the next of REPLACEMENT_TEXT_CASES, never for its agreement.
    ("code", [_user("Write a Python function that reverses a string.")], 40),
    ("math", [_user("What is 17 times 23? Show your steps.")], 40),
    ("translate", [_system("You are a translator."),
                   _user("Translate to German: The train leaves at 7:45 tomorrow morning.")], 40),
    ("recipe", [_user("Give me a quick recipe for pancakes.")], 40),
    ("chinese", [_user("你好，请介绍一下你自己。")], 40),
    ("tips", [_user("List three tips for better sleep.")], 40),
    ("voice_system", [_system("You are Qwen-Omni, a voice assistant. Keep answers short, friendly and "
                              "spoken-style; never use markdown."),
                      _user("Can you remind me what a leap year is?")], 40),
    ("followup", [_user("My name is Ada."), _assistant("Nice to meet you, Ada!"), _user("What is my name?")], 40),
    ("units", [_user("Convert 98.6 °F to Celsius, please.")], 40),
]
REPLACEMENT_TEXT_CASES = [
    ("story", [_user("Tell me a very short story about a robot.")], 40),
    ("spell", [_user("How do you spell 'necessary'?")], 40),
    ("joke", [_user("Tell me a joke about cats.")], 40),
]


# Audio prompts: the real speech clip made by make_audio_fixtures.py (espeak-ng) and synthetic
# clips written here as 16-bit 16 kHz WAV, so the engine decodes exactly the samples the reference saw.
AUDIO_PROMPTS = FIXTURES / "audio-prompts"
SPEECH_CLIP = FIXTURES / "audio" / "speech_16k_s16.wav"
AUDIO_CASES = [
    ("speech", [("speech_16k_s16.wav", None)], "What does the speaker say?", 36),
    ("two_clips", [("tone_0p6s.wav", 0.6), ("chirp_4p3s.wav", 4.3)], "Compare the two sounds.", 34),
]


def synth_clip(name: str, seconds: float) -> np.ndarray:
    """Deterministic test sounds: a tone with harmonics, or a noisy chirp (16-bit exact)."""
    n = int(round(seconds * 16000))
    t = np.arange(n, dtype=np.float64) / 16000.0
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    if name.startswith("tone"):
        x = 0.4 * np.sin(2 * np.pi * 330 * t) + 0.15 * np.sin(2 * np.pi * 990 * t)
    else:
        f = 200 + 1800 * t / seconds
        x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / 16000.0) + 0.05 * rng.standard_normal(n)
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def audio_prompt_waves(clips) -> list:
    import soundfile as sf
    AUDIO_PROMPTS.mkdir(parents=True, exist_ok=True)
    waves = []
    for name, seconds in clips:
        if seconds is None:
            path = FIXTURES / "audio" / name
        else:
            path = AUDIO_PROMPTS / name
            if not path.exists():
                sf.write(str(path), synth_clip(name, seconds), 16000, subtype="PCM_16")
        data, sr = sf.read(str(path), dtype="float32")
        assert sr == 16000 and data.ndim == 1, f"{path}: expected 16 kHz mono"
        waves.append(data)
    return waves


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_weights(model: torch.nn.Module, seed: int, spec: dict) -> None:
    """Deterministic random weights per tensor name, so one component's change leaves the others alone.

    Norm weights get 1 + noise (not exactly 1) so a missed norm shows up; everything else N(0, 0.02),
    except the output heads, scaled so greedy choices have clear margins.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(name_seed(seed, name))
            leaf = name.rsplit(".", 1)[-1]
            if ("norm" in name or "ln_" in name or "layer_norm" in name) and leaf == "weight" and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.thinker.lm_head.weight.mul_(spec["thinker"]["lm_head_scale"])
        # Random Code2Wav is nearly silent (std ~1e-4, which 16-bit WAV rounds away): scale its last
        # conv so the reference waveform is audible and comparisons measure something.
        model.code2wav.decoder[-1].conv.weight.mul_(spec["code2wav"]["out_scale"])
        # Random std-0.02 convs leave the AuT stem's output far below the sinusoidal positions, so
        # the encoder would ignore the sound (0.03% change between two clips); x10 makes it ~50%.
        tower = model.thinker.model.audio_tower
        for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3, tower.conv_out):
            conv.weight.mul_(AUDIO_STEM_SCALE)
        for p in model.parameters():
            p.copy_(round_bf16(p))


# ---------------------------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_checkpoint(name: str, spec: dict) -> Path:
    out = FIXTURES / name
    # Rewrite the checkpoint files; golden/ also holds other scripts' outputs (code2wav, talker), so
    # only this script's own goldens are replaced there.
    if out.exists():
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
            elif f.name != "golden":
                shutil.rmtree(f)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])

    tok = build_tokenizer(spec["base_vocab"])
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    for word in ("system", "user", "assistant"):
        wid = tok.token_to_id(word)
        assert wid is not None, f"tokenizer lacks the word {word!r}"
        ids[word] = wid
    spec["thinker"]["vocab"] = max(spec["thinker"]["vocab_pad"], ((tok.get_vocab_size() + 127) // 128) * 128)
    config = make_config(spec, ids)

    template = (HERE / "chat_template.jinja").read_text()
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, None))

    feature_extractor = {
        "chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": 128, "hop_length": 160, "n_fft": 400, "n_samples": 4800000, "nb_max_frames": 30000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000,
    }
    image_processor = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": 12845056, "merge_size": 2, "min_pixels": 3136, "patch_size": 16, "resample": 3,
        "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2,
    }
    write_json(out / "preprocessor_config.json", {**feature_extractor, **image_processor,
                                                  "processor_class": "Qwen3OmniMoeProcessor"})
    write_json(out / "chat_template.json", {"chat_template": template})
    if spec["layout"] == "v5":
        # Let transformers 5 write its own layout (processor_config.json + chat_template.jinja, and its
        # re-serialised tokenizer files) from the hub-style files just written.
        processor = Qwen3OmniMoeProcessor.from_pretrained(out)
        for f in ("preprocessor_config.json", "chat_template.json"):
            (out / f).unlink()
        processor.save_pretrained(out)
        assert (out / "processor_config.json").exists() and (out / "chat_template.jinja").exists()
    write_json(out / "config.json", config)
    im_end, eot = ids["<|im_end|>"], ids["<|endoftext|>"]
    write_json(out / "generation_config.json", {
        "bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot,
        "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
        "transformers_version": "4.57.0.dev0"})

    # Instantiate from the config as written, randomise, save in bf16 with per-expert names.
    hf_config = transformers.AutoConfig.from_pretrained(out)
    model = Qwen3OmniMoeForConditionalGeneration(hf_config).eval()
    init_weights(model, spec["seed"], spec)
    tmp = out / "_save"
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size=f"{spec['shard_mb']}MB")
    for f in tmp.iterdir():
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
            shutil.move(str(f), out / f.name)
    shutil.rmtree(tmp)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2, f"{name}: expected a sharded checkpoint, got {len(shards)} file(s)"
    return out


def load_reference(out: Path):
    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{out.name}: checkpoint layout does not round-trip through transformers: {bad}"
    model.eval()
    processor = Qwen3OmniMoeProcessor.from_pretrained(out)
    return model, processor


# ---------------------------------------------------------------------------------------------
# Golden outputs
# ---------------------------------------------------------------------------------------------

def thinker_text_golden(out: Path, model, processor) -> dict:
    thinker = model.thinker
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    tensors, cases = {}, []
    for case, messages, max_new in TEXT_CASES:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=text, return_tensors="pt")
        input_ids = enc["input_ids"]
        tok_ids = processor.tokenizer(text)["input_ids"]
        assert input_ids[0].tolist() == tok_ids, "processor and tokenizer disagree on a text-only prompt"
        with torch.no_grad():
            logits = thinker(input_ids=input_ids, attention_mask=enc["attention_mask"]).logits[0]
            gen = thinker.generate(input_ids=input_ids, attention_mask=enc["attention_mask"], do_sample=False,
                                   max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[-1],
                                   output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[0, input_ids.shape[1]:].tolist()
        while new and new[-1] in eos:
            new.pop()
        assert len(new) >= 32, f"{out.name}/{case}: only {len(new)} tokens before eos; pick another prompt"
        margins = []
        for s in gen.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        tensors[f"{case}.prompt_logits"] = logits.float().contiguous()
        tensors[f"{case}.prompt_ids"] = input_ids[0].to(torch.int64).contiguous()
        tensors[f"{case}.greedy_ids"] = torch.tensor(new, dtype=torch.int64)
        cases.append({"name": case, "messages": messages, "rendered": text, "prompt_ids": input_ids[0].tolist(),
                      "greedy_ids": new, "max_new_tokens": max_new, "min_top1_top2_margin": min(margins),
                      "greedy_text": processor.tokenizer.decode(new)})
    save_file(tensors, out / "golden" / "thinker_text.safetensors")
    return {"cases": cases}


def thinker_audio_golden(out: Path, model, processor) -> dict:
    """Audio in the prompt: mel features, encoder output, positions, prompt logits, greedy tokens."""
    thinker = model.thinker
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    tensors, cases = {}, []
    for case, clips, question, max_new in AUDIO_CASES:
        waves = audio_prompt_waves(clips)
        content = [{"type": "audio", "audio": name} for name, _ in clips] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=text, audio=waves, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
        with torch.no_grad():
            audio_features = thinker.get_audio_features(
                inputs["input_features"], inputs["feature_attention_mask"]).last_hidden_state
            positions, _ = thinker.get_rope_index(
                inputs["input_ids"], None, None, inputs["attention_mask"],
                audio_seqlens=inputs["feature_attention_mask"].sum(-1))
            logits = thinker(**inputs).logits[0]
            gen = thinker.generate(**inputs, do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                                   pad_token_id=eos[-1], output_scores=True, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        new = gen.sequences[0, prompt_len:].tolist()
        while new and new[-1] in eos:
            new.pop()
        assert len(new) >= 32, f"{out.name}/{case}: only {len(new)} tokens before eos"
        margins = [float(torch.topk(sc[0].float(), 2).values.diff().abs()) for sc in gen.scores]
        tail = min(16, prompt_len)
        # The mel values themselves are proven by tests/fixtures/audio/mel_golden.safetensors; here the
        # batch layout (frames, mask) and everything downstream.
        tensors[f"{case}.input_features_shape"] = torch.tensor(list(inputs["input_features"].shape), dtype=torch.int64)
        tensors[f"{case}.feature_attention_mask"] = inputs["feature_attention_mask"].to(torch.int64).contiguous()
        tensors[f"{case}.audio_features"] = audio_features.float().contiguous()
        tensors[f"{case}.position_ids"] = positions[:, 0, :].to(torch.int64).contiguous()
        tensors[f"{case}.prompt_logits_tail"] = logits[-tail:].float().contiguous()
        tensors[f"{case}.prompt_ids"] = inputs["input_ids"][0].to(torch.int64).contiguous()
        tensors[f"{case}.greedy_ids"] = torch.tensor(new, dtype=torch.int64)
        cases.append({"name": case, "messages": messages, "question": question,
                      "clips": [str((FIXTURES / "audio" / n) if sec is None else (AUDIO_PROMPTS / n))
                                .replace(str(ROOT) + "/", "") for n, sec in clips],
                      "rendered": text, "prompt_ids": inputs["input_ids"][0].tolist(),
                      "audio_token_counts": [int(x) for x in enc["num_audio_tokens"]] if "num_audio_tokens" in enc else None,
                      "greedy_ids": new, "max_new_tokens": max_new, "min_top1_top2_margin": min(margins)})
    save_file(tensors, out / "golden" / "thinker_audio.safetensors")
    return {"cases": cases}


def main() -> None:
    only = set(sys.argv[1:])
    summary = {}
    for name, spec in CONFIGS.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        out = write_checkpoint(name, json.loads(json.dumps(spec)))
        (out / "golden").mkdir(exist_ok=True)
        model, processor = load_reference(out)
        golden = {"transformers": transformers.__version__, "torch": torch.__version__}
        golden["thinker_text"] = thinker_text_golden(out, model, processor)
        golden["thinker_audio"] = thinker_audio_golden(out, model, processor)
        write_json(out / "golden" / "golden.json", golden)
        summary[name] = {c["name"]: round(c["min_top1_top2_margin"], 4)
                         for part in ("thinker_text", "thinker_audio") for c in golden[part]["cases"]}
    print(json.dumps({"min_top1_top2_margin": summary}, indent=2))


if __name__ == "__main__":
    main()
