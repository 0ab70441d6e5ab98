//! Planning: which GGUF tensors a file gets, where each one's values come from, and the storage
//! type of each ([`choose_type`]); also the file's size label and the audio position table.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::{Checkpoint, QuantizeOptions};
use crate::gguf::format::{GgmlType, TensorSpec};
use crate::gguf::names::{hf_to_gguf, Component, FileKind, Layout, Rule};
use crate::gguf::quant;

/// Where the values of one GGUF tensor come from.
#[derive(Debug, Clone)]
pub(super) enum Part {
    /// A checkpoint tensor (or one temporal slice of it).
    Tensor { hf: String, slice: Option<usize> },
    /// The audio encoder's sinusoid position table (llama.cpp wants it in the file).
    AudioPositions { channels: usize, length: usize },
}

#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub(super) spec: TensorSpec,
    pub(super) parts: Vec<Part>,
    pub(super) component: Component,
}

/// Natural order: `blk.2` before `blk.10`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap() as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n * 10 + d as u64;
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, u64::MAX));
    out
}

/// The storage type of one GGUF tensor; `shape` is the PyTorch shape of one stored matrix (one
/// expert of a stacked tensor, one slice of a split kernel).
pub fn choose_type(gguf: &str, shape: &[usize], wanted: GgmlType) -> GgmlType {
    if wanted == GgmlType::F32 {
        return GgmlType::F32;
    }
    let n_dims = shape.len();
    let row = shape.last().copied().unwrap_or(0);
    let always_f32 = n_dims <= 1
        || gguf.ends_with("_norm.weight")
        || gguf.contains("ffn_gate_inp")
        || gguf.contains("position_embd")
        || !(gguf.ends_with(".weight") || gguf.ends_with(".weight.1"));
    if always_f32 {
        return GgmlType::F32;
    }
    // llama.cpp keeps the audio convs in F16 and the patch embedding unquantized.
    if gguf.starts_with("a.conv") || gguf.starts_with("v.patch_embd") {
        return if wanted.is_quantized() {
            GgmlType::F16
        } else {
            wanted
        };
    }
    if wanted.is_quantized() {
        if n_dims == 2 && quant::fits(wanted, row) {
            wanted
        } else {
            GgmlType::F16
        }
    } else {
        wanted
    }
}

pub(super) struct Plan {
    pub(super) kind: FileKind,
    pub(super) tensors: Vec<Planned>,
}

pub(super) fn plan(
    ck: &Checkpoint,
    kind: FileKind,
    opts: &QuantizeOptions,
    cfg: &Json,
) -> Result<Plan> {
    struct Group {
        rule: Rule,
        items: Vec<(Option<usize>, String)>,
        component: Component,
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for name in ck.names() {
        for p in hf_to_gguf(kind, name) {
            let component = Component::of(name)
                .with_context(|| format!("tensor `{name}` belongs to no component"))?;
            let g = groups.entry(p.gguf.clone()).or_insert_with(|| Group {
                rule: p.rule,
                items: Vec::new(),
                component,
            });
            g.items.push((p.index, name.to_string()));
        }
    }
    let mut tensors = Vec::new();
    for (gguf, mut g) in groups {
        let wanted = opts.type_of(g.component);
        let (dims, parts, unit): (Vec<usize>, Vec<Part>, Vec<usize>) = match g.rule.layout {
            Layout::Plain => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                (
                    shape.iter().rev().copied().collect(),
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: None,
                    }],
                    shape,
                )
            }
            Layout::Bias3d => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                let n: usize = shape.iter().product();
                (
                    vec![1, 1, n],
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: None,
                    }],
                    vec![n],
                )
            }
            Layout::TemporalSlice(t) => {
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                if shape.len() != 5 || t >= shape[2] {
                    bail!(
                        "`{}` has shape {shape:?}; expected a Conv3d kernel with a temporal axis",
                        g.items[0].1
                    );
                }
                let slice = vec![shape[0], shape[1], shape[3], shape[4]];
                (
                    slice.iter().rev().copied().collect(),
                    vec![Part::Tensor {
                        hf: g.items[0].1.clone(),
                        slice: Some(t),
                    }],
                    slice,
                )
            }
            Layout::Stacked => {
                g.items.sort_by_key(|(i, _)| i.unwrap_or(usize::MAX));
                for (want, (i, name)) in g.items.iter().enumerate() {
                    if *i != Some(want) {
                        bail!("`{gguf}`: the checkpoint's slots are not 0..{} (found `{name}` at {want})", g.items.len());
                    }
                }
                let shape = ck.shape(&g.items[0].1).unwrap().to_vec();
                for (_, name) in &g.items {
                    if ck.shape(name) != Some(&shape[..]) {
                        bail!(
                            "`{name}` has shape {:?}, unlike `{}` {shape:?}; cannot stack them",
                            ck.shape(name),
                            g.items[0].1
                        );
                    }
                }
                let mut dims: Vec<usize> = shape.iter().rev().copied().collect();
                dims.push(g.items.len());
                let parts = g
                    .items
                    .iter()
                    .map(|(_, n)| Part::Tensor {
                        hf: n.clone(),
                        slice: None,
                    })
                    .collect();
                (dims, parts, shape)
            }
        };
        let dtype = choose_type(&gguf, &unit, wanted);
        tensors.push(Planned {
            spec: TensorSpec {
                name: gguf,
                dims,
                dtype,
            },
            parts,
            component: g.component,
        });
    }
    if kind == FileKind::Mmproj {
        if let Some(audio) = cfg.pointer("/thinker_config/audio_config") {
            if tensors.iter().any(|t| t.component == Component::Audio) {
                let channels = audio
                    .get("d_model")
                    .and_then(Json::as_u64)
                    .context("audio_config.d_model")? as usize;
                let length = 1500;
                tensors.push(Planned {
                    spec: TensorSpec {
                        name: "a.position_embd.weight".into(),
                        dims: vec![channels, length],
                        dtype: GgmlType::F32,
                    },
                    parts: vec![Part::AudioPositions { channels, length }],
                    component: Component::Audio,
                });
            }
        }
    }
    tensors.sort_by_key(|t| natural_key(&t.spec.name));
    Ok(Plan { kind, tensors })
}

/// gguf-py's `model_weight_count_rounded_notation`.
fn rounded_notation(count: u64) -> String {
    let c = count as f64;
    let (scaled, suffix) = if c > 1e12 {
        (c * 1e-12, "T")
    } else if c > 1e9 {
        (c * 1e-9, "B")
    } else if c > 1e6 {
        (c * 1e-6, "M")
    } else {
        (c * 1e-3, "K")
    };
    let r = scaled.round_ties_even() as u64;
    let digits = if r == 0 { 0 } else { r.to_string().len() };
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// `general.size_label` as llama.cpp's converter computes it (`8x225K`: experts × parameters of
/// the shared part plus one expert; plain counts without experts).
pub(super) fn size_label(plan: &Plan) -> String {
    let (mut shared, mut expert, mut sum, mut n) = (0u64, 0u64, 0u64, 0u64);
    for t in &plan.tensors {
        let size: u64 = t.spec.dims.iter().map(|&d| d as u64).product();
        if t.spec.name.contains("_exps.") && t.spec.dims.len() >= 3 {
            let e = *t.spec.dims.last().unwrap() as u64;
            expert += size / e;
            sum += e;
            n += 1;
        } else {
            shared += size;
        }
    }
    if n > 0 {
        format!("{}x{}", sum / n, rounded_notation(shared + expert))
    } else {
        rounded_notation(shared)
    }
}

/// The checkpoint tensors no table claims.
pub(super) fn unclaimed(ck: &Checkpoint) -> Vec<String> {
    ck.names()
        .filter(|n| FileKind::ALL.iter().all(|k| hf_to_gguf(*k, n).is_empty()))
        .map(str::to_string)
        .collect()
}

/// The sinusoid table of the AuT encoder as llama.cpp's converter generates it: `[length, channels]`.
pub fn audio_positions(channels: usize, length: usize) -> Vec<f32> {
    let half = channels / 2;
    let inc = (10000f64).ln() / (half as f64 - 1.0);
    let inv: Vec<f32> = (0..half)
        .map(|i| (-(inc as f32) * i as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(length * channels);
    for t in 0..length {
        let row: Vec<f32> = inv.iter().map(|f| t as f32 * f).collect();
        out.extend(row.iter().map(|x| x.sin()));
        out.extend(row.iter().map(|x| x.cos()));
    }
    out
}
