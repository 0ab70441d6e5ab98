//! The weight-name mapping between the Hugging Face checkpoint and our GGUF files: ONE table per
//! file kind ([`THINKER`], [`MMPROJ`], [`TALKER`]), read in both directions (the converter maps
//! HF → GGUF, the loader maps GGUF → HF so the models keep asking for checkpoint names).
//!
//! Patterns use `{N}` and `{M}` for block indices (copied between the two names) and `{E}` for an
//! index that is stacked into one GGUF tensor along its outermost axis (the last ggml axis):
//! per-expert weights, and the code predictor's per-codebook heads and embeddings.

use std::sync::LazyLock;

use anyhow::{bail, Result};

/// The three files `omni quantize` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// llama.cpp's `qwen3vlmoe` text model.
    Thinker,
    /// llama.cpp's combined vision + audio `clip` file.
    Mmproj,
    /// Our own: Talker, code predictor, projections, Code2Wav.
    Talker,
}

impl FileKind {
    pub const ALL: [FileKind; 3] = [FileKind::Thinker, FileKind::Mmproj, FileKind::Talker];

    pub fn rules(self) -> &'static [Rule] {
        match self {
            Self::Thinker => &THINKER,
            Self::Mmproj => MMPROJ,
            Self::Talker => &TALKER,
        }
    }

    /// The file name prefix: `thinker-q8_0.gguf`, `mmproj-q8_0.gguf`, `talker-q8_0.gguf`.
    pub fn stem(self) -> &'static str {
        match self {
            Self::Thinker => "thinker",
            Self::Mmproj => "mmproj",
            Self::Talker => "talker",
        }
    }
}

/// The parts of the model that take their own `--<component>-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Thinker,
    Vision,
    Audio,
    Talker,
    Code2Wav,
}

impl Component {
    pub const ALL: [Component; 5] = [
        Component::Thinker,
        Component::Vision,
        Component::Audio,
        Component::Talker,
        Component::Code2Wav,
    ];

    /// The component of a checkpoint tensor, by its prefix.
    pub fn of(hf_name: &str) -> Option<Self> {
        if hf_name.starts_with("thinker.visual.") {
            Some(Self::Vision)
        } else if hf_name.starts_with("thinker.audio_tower.") {
            Some(Self::Audio)
        } else if hf_name.starts_with("thinker.") {
            Some(Self::Thinker)
        } else if hf_name.starts_with("talker.") {
            Some(Self::Talker)
        } else if hf_name.starts_with("code2wav.") {
            Some(Self::Code2Wav)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Thinker => "thinker",
            Self::Vision => "vision",
            Self::Audio => "audio",
            Self::Talker => "talker",
            Self::Code2Wav => "code2wav",
        }
    }

    pub fn file(self) -> FileKind {
        match self {
            Self::Thinker => FileKind::Thinker,
            Self::Vision | Self::Audio => FileKind::Mmproj,
            Self::Talker | Self::Code2Wav => FileKind::Talker,
        }
    }
}

/// How a checkpoint tensor's values sit in the GGUF tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The same values; ggml dims are the PyTorch shape reversed.
    Plain,
    /// `{E}` tensors of equal shape stacked along a new outermost axis (ggml: last).
    Stacked,
    /// Temporal slice `t` of a Conv3d kernel `[O, I, T, H, W]`, stored as `[O, I, H, W]`
    /// (llama.cpp splits the vision patch embedding into `weight` and `weight.1`).
    TemporalSlice(usize),
    /// A conv bias `[C]` stored as ggml `{1, 1, C}` (llama.cpp's audio conv2d biases).
    Bias3d,
}

/// One line of a table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub hf: &'static str,
    pub gguf: &'static str,
    pub layout: Layout,
}

const fn r(hf: &'static str, gguf: &'static str) -> Rule {
    Rule {
        hf,
        gguf,
        layout: Layout::Plain,
    }
}
const fn stacked(hf: &'static str, gguf: &'static str) -> Rule {
    Rule {
        hf,
        gguf,
        layout: Layout::Stacked,
    }
}

macro_rules! decoder_layer_rules {
    ($hf:literal, $gg:literal) => {
        [
            r(
                concat!($hf, ".input_layernorm.weight"),
                concat!($gg, ".attn_norm.weight"),
            ),
            r(
                concat!($hf, ".self_attn.q_proj.weight"),
                concat!($gg, ".attn_q.weight"),
            ),
            r(
                concat!($hf, ".self_attn.q_proj.bias"),
                concat!($gg, ".attn_q.bias"),
            ),
            r(
                concat!($hf, ".self_attn.k_proj.weight"),
                concat!($gg, ".attn_k.weight"),
            ),
            r(
                concat!($hf, ".self_attn.k_proj.bias"),
                concat!($gg, ".attn_k.bias"),
            ),
            r(
                concat!($hf, ".self_attn.v_proj.weight"),
                concat!($gg, ".attn_v.weight"),
            ),
            r(
                concat!($hf, ".self_attn.v_proj.bias"),
                concat!($gg, ".attn_v.bias"),
            ),
            r(
                concat!($hf, ".self_attn.o_proj.weight"),
                concat!($gg, ".attn_output.weight"),
            ),
            r(
                concat!($hf, ".self_attn.o_proj.bias"),
                concat!($gg, ".attn_output.bias"),
            ),
            r(
                concat!($hf, ".self_attn.q_norm.weight"),
                concat!($gg, ".attn_q_norm.weight"),
            ),
            r(
                concat!($hf, ".self_attn.k_norm.weight"),
                concat!($gg, ".attn_k_norm.weight"),
            ),
            r(
                concat!($hf, ".post_attention_layernorm.weight"),
                concat!($gg, ".ffn_norm.weight"),
            ),
            r(
                concat!($hf, ".mlp.gate.weight"),
                concat!($gg, ".ffn_gate_inp.weight"),
            ),
            stacked(
                concat!($hf, ".mlp.experts.{E}.gate_proj.weight"),
                concat!($gg, ".ffn_gate_exps.weight"),
            ),
            stacked(
                concat!($hf, ".mlp.experts.{E}.up_proj.weight"),
                concat!($gg, ".ffn_up_exps.weight"),
            ),
            stacked(
                concat!($hf, ".mlp.experts.{E}.down_proj.weight"),
                concat!($gg, ".ffn_down_exps.weight"),
            ),
            r(
                concat!($hf, ".mlp.shared_expert.gate_proj.weight"),
                concat!($gg, ".ffn_gate_shexp.weight"),
            ),
            r(
                concat!($hf, ".mlp.shared_expert.up_proj.weight"),
                concat!($gg, ".ffn_up_shexp.weight"),
            ),
            r(
                concat!($hf, ".mlp.shared_expert.down_proj.weight"),
                concat!($gg, ".ffn_down_shexp.weight"),
            ),
            r(
                concat!($hf, ".mlp.shared_expert_gate.weight"),
                concat!($gg, ".ffn_gate_inp_shexp.weight"),
            ),
            r(
                concat!($hf, ".mlp.gate_proj.weight"),
                concat!($gg, ".ffn_gate.weight"),
            ),
            r(
                concat!($hf, ".mlp.up_proj.weight"),
                concat!($gg, ".ffn_up.weight"),
            ),
            r(
                concat!($hf, ".mlp.down_proj.weight"),
                concat!($gg, ".ffn_down.weight"),
            ),
        ]
    };
}

const THINKER_LAYER: [Rule; 23] = decoder_layer_rules!("thinker.model.layers.{N}", "blk.{N}");
const TALKER_LAYER: [Rule; 23] = decoder_layer_rules!("talker.model.layers.{N}", "talker.blk.{N}");
const MTP_LAYER: [Rule; 23] =
    decoder_layer_rules!("talker.code_predictor.model.layers.{N}", "mtp.blk.{N}");

const THINKER_TOP: [Rule; 3] = [
    r("thinker.model.embed_tokens.weight", "token_embd.weight"),
    r("thinker.model.norm.weight", "output_norm.weight"),
    r("thinker.lm_head.weight", "output.weight"),
];

/// `thinker-*.gguf`: llama.cpp's `qwen3vlmoe` names.
pub static THINKER: LazyLock<Vec<Rule>> =
    LazyLock::new(|| [&THINKER_TOP[..], &THINKER_LAYER[..]].concat());

/// `mmproj-*.gguf`: llama.cpp's clip names (`v.*`, `a.*`, `mm.*`) plus our deepstack mergers,
/// which llama.cpp's layout cannot carry, under `omni.deepstack.*` (a prefix llama.cpp never asks for).
pub static MMPROJ: &[Rule] = &[
    Rule {
        hf: "thinker.visual.patch_embed.proj.weight",
        gguf: "v.patch_embd.weight",
        layout: Layout::TemporalSlice(0),
    },
    Rule {
        hf: "thinker.visual.patch_embed.proj.weight",
        gguf: "v.patch_embd.weight.1",
        layout: Layout::TemporalSlice(1),
    },
    r("thinker.visual.patch_embed.proj.bias", "v.patch_embd.bias"),
    r("thinker.visual.pos_embed.weight", "v.position_embd.weight"),
    r(
        "thinker.visual.blocks.{N}.norm1.weight",
        "v.blk.{N}.ln1.weight",
    ),
    r("thinker.visual.blocks.{N}.norm1.bias", "v.blk.{N}.ln1.bias"),
    r(
        "thinker.visual.blocks.{N}.norm2.weight",
        "v.blk.{N}.ln2.weight",
    ),
    r("thinker.visual.blocks.{N}.norm2.bias", "v.blk.{N}.ln2.bias"),
    r(
        "thinker.visual.blocks.{N}.attn.qkv.weight",
        "v.blk.{N}.attn_qkv.weight",
    ),
    r(
        "thinker.visual.blocks.{N}.attn.qkv.bias",
        "v.blk.{N}.attn_qkv.bias",
    ),
    r(
        "thinker.visual.blocks.{N}.attn.proj.weight",
        "v.blk.{N}.attn_out.weight",
    ),
    r(
        "thinker.visual.blocks.{N}.attn.proj.bias",
        "v.blk.{N}.attn_out.bias",
    ),
    r(
        "thinker.visual.blocks.{N}.mlp.linear_fc1.weight",
        "v.blk.{N}.ffn_up.weight",
    ),
    r(
        "thinker.visual.blocks.{N}.mlp.linear_fc1.bias",
        "v.blk.{N}.ffn_up.bias",
    ),
    r(
        "thinker.visual.blocks.{N}.mlp.linear_fc2.weight",
        "v.blk.{N}.ffn_down.weight",
    ),
    r(
        "thinker.visual.blocks.{N}.mlp.linear_fc2.bias",
        "v.blk.{N}.ffn_down.bias",
    ),
    r("thinker.visual.merger.ln_q.weight", "v.post_ln.weight"),
    r("thinker.visual.merger.ln_q.bias", "v.post_ln.bias"),
    r("thinker.visual.merger.mlp.0.weight", "mm.0.weight"),
    r("thinker.visual.merger.mlp.0.bias", "mm.0.bias"),
    r("thinker.visual.merger.mlp.2.weight", "mm.2.weight"),
    r("thinker.visual.merger.mlp.2.bias", "mm.2.bias"),
    r(
        "thinker.visual.merger_list.{N}.ln_q.weight",
        "omni.deepstack.{N}.norm.weight",
    ),
    r(
        "thinker.visual.merger_list.{N}.ln_q.bias",
        "omni.deepstack.{N}.norm.bias",
    ),
    r(
        "thinker.visual.merger_list.{N}.mlp.0.weight",
        "omni.deepstack.{N}.fc1.weight",
    ),
    r(
        "thinker.visual.merger_list.{N}.mlp.0.bias",
        "omni.deepstack.{N}.fc1.bias",
    ),
    r(
        "thinker.visual.merger_list.{N}.mlp.2.weight",
        "omni.deepstack.{N}.fc2.weight",
    ),
    r(
        "thinker.visual.merger_list.{N}.mlp.2.bias",
        "omni.deepstack.{N}.fc2.bias",
    ),
    r(
        "thinker.audio_tower.conv2d{N}.weight",
        "a.conv2d.{N}.weight",
    ),
    Rule {
        hf: "thinker.audio_tower.conv2d{N}.bias",
        gguf: "a.conv2d.{N}.bias",
        layout: Layout::Bias3d,
    },
    r("thinker.audio_tower.conv_out.weight", "a.conv_out.weight"),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.q_proj.weight",
        "a.blk.{N}.attn_q.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.q_proj.bias",
        "a.blk.{N}.attn_q.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.k_proj.weight",
        "a.blk.{N}.attn_k.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.k_proj.bias",
        "a.blk.{N}.attn_k.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.v_proj.weight",
        "a.blk.{N}.attn_v.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.v_proj.bias",
        "a.blk.{N}.attn_v.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.out_proj.weight",
        "a.blk.{N}.attn_out.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn.out_proj.bias",
        "a.blk.{N}.attn_out.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn_layer_norm.weight",
        "a.blk.{N}.ln1.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.self_attn_layer_norm.bias",
        "a.blk.{N}.ln1.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.final_layer_norm.weight",
        "a.blk.{N}.ln2.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.final_layer_norm.bias",
        "a.blk.{N}.ln2.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.fc1.weight",
        "a.blk.{N}.ffn_up.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.fc1.bias",
        "a.blk.{N}.ffn_up.bias",
    ),
    r(
        "thinker.audio_tower.layers.{N}.fc2.weight",
        "a.blk.{N}.ffn_down.weight",
    ),
    r(
        "thinker.audio_tower.layers.{N}.fc2.bias",
        "a.blk.{N}.ffn_down.bias",
    ),
    r("thinker.audio_tower.ln_post.weight", "a.post_ln.weight"),
    r("thinker.audio_tower.ln_post.bias", "a.post_ln.bias"),
    r("thinker.audio_tower.proj1.weight", "mm.a.mlp.1.weight"),
    r("thinker.audio_tower.proj1.bias", "mm.a.mlp.1.bias"),
    r("thinker.audio_tower.proj2.weight", "mm.a.mlp.2.weight"),
    r("thinker.audio_tower.proj2.bias", "mm.a.mlp.2.bias"),
];

/// Tensors of the mmproj file that are not in the checkpoint: written for llama.cpp, ignored on load.
pub const MMPROJ_GENERATED: &[&str] = &["a.position_embd.weight"];

const TALKER_OWN: &[Rule] = &[
    r(
        "talker.model.codec_embedding.weight",
        "talker.token_embd.weight",
    ),
    r("talker.model.norm.weight", "talker.output_norm.weight"),
    r("talker.codec_head.weight", "talker.output.weight"),
    r(
        "talker.text_projection.linear_fc{N}.weight",
        "talker.txt_proj.fc{N}.weight",
    ),
    r(
        "talker.text_projection.linear_fc{N}.bias",
        "talker.txt_proj.fc{N}.bias",
    ),
    r(
        "talker.hidden_projection.linear_fc{N}.weight",
        "talker.hid_proj.fc{N}.weight",
    ),
    r(
        "talker.hidden_projection.linear_fc{N}.bias",
        "talker.hid_proj.fc{N}.bias",
    ),
    stacked(
        "talker.code_predictor.model.codec_embedding.{E}.weight",
        "mtp.codec_embd.weight",
    ),
    stacked(
        "talker.code_predictor.lm_head.{E}.weight",
        "mtp.lm_head.weight",
    ),
    r(
        "talker.code_predictor.model.norm.weight",
        "mtp.output_norm.weight",
    ),
    // Code2Wav: the code embedding, the sliding-window transformer, the ConvNeXt upsamplers and
    // the causal conv decoder with SnakeBeta activations.
    r("code2wav.code_embedding.weight", "c2w.code_embd.weight"),
    r(
        "code2wav.pre_transformer.norm.weight",
        "c2w.output_norm.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.input_layernorm.weight",
        "c2w.blk.{N}.attn_norm.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.q_proj.weight",
        "c2w.blk.{N}.attn_q.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.k_proj.weight",
        "c2w.blk.{N}.attn_k.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.v_proj.weight",
        "c2w.blk.{N}.attn_v.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.o_proj.weight",
        "c2w.blk.{N}.attn_output.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.q_norm.weight",
        "c2w.blk.{N}.attn_q_norm.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn.k_norm.weight",
        "c2w.blk.{N}.attn_k_norm.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.self_attn_layer_scale.scale",
        "c2w.blk.{N}.attn_scale",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.post_attention_layernorm.weight",
        "c2w.blk.{N}.ffn_norm.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.mlp.gate_proj.weight",
        "c2w.blk.{N}.ffn_gate.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.mlp.up_proj.weight",
        "c2w.blk.{N}.ffn_up.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.mlp.down_proj.weight",
        "c2w.blk.{N}.ffn_down.weight",
    ),
    r(
        "code2wav.pre_transformer.layers.{N}.mlp_layer_scale.scale",
        "c2w.blk.{N}.ffn_scale",
    ),
    r(
        "code2wav.upsample.{N}.0.conv.weight",
        "c2w.up.{N}.tconv.weight",
    ),
    r("code2wav.upsample.{N}.0.conv.bias", "c2w.up.{N}.tconv.bias"),
    r(
        "code2wav.upsample.{N}.1.dwconv.conv.weight",
        "c2w.up.{N}.dwconv.weight",
    ),
    r(
        "code2wav.upsample.{N}.1.dwconv.conv.bias",
        "c2w.up.{N}.dwconv.bias",
    ),
    r(
        "code2wav.upsample.{N}.1.norm.weight",
        "c2w.up.{N}.norm.weight",
    ),
    r("code2wav.upsample.{N}.1.norm.bias", "c2w.up.{N}.norm.bias"),
    r(
        "code2wav.upsample.{N}.1.pwconv1.weight",
        "c2w.up.{N}.pwconv1.weight",
    ),
    r(
        "code2wav.upsample.{N}.1.pwconv1.bias",
        "c2w.up.{N}.pwconv1.bias",
    ),
    r(
        "code2wav.upsample.{N}.1.pwconv2.weight",
        "c2w.up.{N}.pwconv2.weight",
    ),
    r(
        "code2wav.upsample.{N}.1.pwconv2.bias",
        "c2w.up.{N}.pwconv2.bias",
    ),
    r("code2wav.upsample.{N}.1.gamma", "c2w.up.{N}.gamma"),
    r(
        "code2wav.decoder.{N}.conv.weight",
        "c2w.dec.{N}.conv.weight",
    ),
    r("code2wav.decoder.{N}.conv.bias", "c2w.dec.{N}.conv.bias"),
    r("code2wav.decoder.{N}.alpha", "c2w.dec.{N}.snake.alpha"),
    r("code2wav.decoder.{N}.beta", "c2w.dec.{N}.snake.beta"),
    r(
        "code2wav.decoder.{N}.block.0.alpha",
        "c2w.dec.{N}.blk_snake.alpha",
    ),
    r(
        "code2wav.decoder.{N}.block.0.beta",
        "c2w.dec.{N}.blk_snake.beta",
    ),
    r(
        "code2wav.decoder.{N}.block.1.conv.weight",
        "c2w.dec.{N}.tconv.weight",
    ),
    r(
        "code2wav.decoder.{N}.block.1.conv.bias",
        "c2w.dec.{N}.tconv.bias",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.act1.alpha",
        "c2w.dec.{N}.res.{M}.act1.alpha",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.act1.beta",
        "c2w.dec.{N}.res.{M}.act1.beta",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.act2.alpha",
        "c2w.dec.{N}.res.{M}.act2.alpha",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.act2.beta",
        "c2w.dec.{N}.res.{M}.act2.beta",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.conv1.conv.weight",
        "c2w.dec.{N}.res.{M}.conv1.weight",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.conv1.conv.bias",
        "c2w.dec.{N}.res.{M}.conv1.bias",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.conv2.conv.weight",
        "c2w.dec.{N}.res.{M}.conv2.weight",
    ),
    r(
        "code2wav.decoder.{N}.block.{M}.conv2.conv.bias",
        "c2w.dec.{N}.res.{M}.conv2.bias",
    ),
];

/// `talker-*.gguf`: our own layout (names borrowed from llama.cpp forks where they fit).
pub static TALKER: LazyLock<Vec<Rule>> =
    LazyLock::new(|| [TALKER_OWN, &TALKER_LAYER[..], &MTP_LAYER[..]].concat());

/// Indices captured from a name by a pattern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captures {
    pub n: Option<usize>,
    pub m: Option<usize>,
    pub e: Option<usize>,
}

/// Matches `name` against `pattern`; placeholders match a decimal number.
pub fn match_pattern(pattern: &str, name: &str) -> Option<Captures> {
    if pattern.is_empty() {
        return None;
    }
    let mut caps = Captures::default();
    let (mut p, mut s) = (pattern, name);
    loop {
        match p.find('{') {
            None => return (p == s).then_some(caps),
            Some(i) => {
                if !s.starts_with(&p[..i]) {
                    return None;
                }
                s = &s[i..];
                let close = p[i..].find('}')? + i;
                let slot = &p[i + 1..close];
                let digits = s.bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 || (digits > 1 && s.starts_with('0')) {
                    return None;
                }
                let value: usize = s[..digits].parse().ok()?;
                match slot {
                    "N" => caps.n = Some(value),
                    "M" => caps.m = Some(value),
                    "E" => caps.e = Some(value),
                    _ => return None,
                }
                s = &s[digits..];
                p = &p[close + 1..];
            }
        }
    }
}

/// Fills a pattern's placeholders.
pub fn fill(pattern: &str, caps: Captures) -> Result<String> {
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut rest = pattern;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let close = rest[i..].find('}').map(|c| c + i).unwrap_or(rest.len() - 1);
        let value = match &rest[i + 1..close] {
            "N" => caps.n,
            "M" => caps.m,
            "E" => caps.e,
            _ => None,
        };
        match value {
            Some(v) => out.push_str(&v.to_string()),
            None => bail!("pattern `{pattern}` needs a value for {}", &rest[i..=close]),
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A checkpoint tensor's place in a file: rule, GGUF name, stacked index.
#[derive(Debug, Clone)]
pub struct Placement {
    pub rule: Rule,
    pub gguf: String,
    pub index: Option<usize>,
}

/// Where checkpoint tensor `hf` goes in file `kind` (several places for a split tensor); empty when
/// the table has no line for it.
pub fn hf_to_gguf(kind: FileKind, hf: &str) -> Vec<Placement> {
    let mut out = Vec::new();
    for rule in kind.rules() {
        if let Some(caps) = match_pattern(rule.hf, hf) {
            if let Ok(gguf) = fill(rule.gguf, Captures { e: None, ..caps }) {
                out.push(Placement {
                    rule: *rule,
                    gguf,
                    index: caps.e,
                });
            }
        }
    }
    out
}

/// The rule and captures for GGUF tensor `gguf` of file `kind`, if the table knows it.
pub fn gguf_rule(kind: FileKind, gguf: &str) -> Option<(Rule, Captures)> {
    kind.rules()
        .iter()
        .find_map(|rule| match_pattern(rule.gguf, gguf).map(|c| (*rule, c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_round_trip() {
        let p = hf_to_gguf(
            FileKind::Thinker,
            "thinker.model.layers.12.mlp.experts.7.down_proj.weight",
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].gguf, "blk.12.ffn_down_exps.weight");
        assert_eq!(p[0].index, Some(7));
        let (rule, caps) = gguf_rule(FileKind::Thinker, "blk.12.ffn_down_exps.weight").unwrap();
        assert_eq!(
            fill(rule.hf, Captures { e: Some(7), ..caps }).unwrap(),
            "thinker.model.layers.12.mlp.experts.7.down_proj.weight"
        );
        let p = hf_to_gguf(FileKind::Mmproj, "thinker.audio_tower.conv2d3.bias");
        assert_eq!(p[0].gguf, "a.conv2d.3.bias");
        assert_eq!(p[0].rule.layout, Layout::Bias3d);
        assert_eq!(
            hf_to_gguf(FileKind::Mmproj, "thinker.visual.patch_embed.proj.weight").len(),
            2
        );
        let p = hf_to_gguf(
            FileKind::Talker,
            "code2wav.decoder.3.block.4.conv2.conv.weight",
        );
        assert_eq!(p[0].gguf, "c2w.dec.3.res.4.conv2.weight");
        assert!(hf_to_gguf(
            FileKind::Thinker,
            "thinker.model.layers.01.input_layernorm.weight"
        )
        .is_empty());
    }

    #[test]
    fn every_gguf_name_maps_back_to_one_rule() {
        // No two rules of a table may claim the same GGUF name (the reverse map must be unique).
        for kind in FileKind::ALL {
            let rules = kind.rules();
            for (i, a) in rules.iter().enumerate() {
                if a.gguf.is_empty() {
                    continue;
                }
                let name = fill(
                    a.gguf,
                    Captures {
                        n: Some(3),
                        m: Some(2),
                        e: Some(1),
                    },
                )
                .unwrap();
                for b in &rules[i + 1..] {
                    assert!(
                        match_pattern(b.gguf, &name).is_none(),
                        "{kind:?}: `{}` and `{}` both match {name}",
                        a.gguf,
                        b.gguf
                    );
                }
            }
        }
    }
}
