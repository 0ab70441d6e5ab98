//! Random weights in memory at any config's shapes: the backend of [`WeightStore::random`].
//!
//! Speed does not depend on the weights' values, so the benches load every stage (Thinker, audio
//! tower, Talker, code predictor, Code2Wav) through their ordinary loaders from this source instead
//! of a 30+ GB file. The tensor list (names and shapes) is the checkpoint layout derived from
//! config.json by [`crate::gguf::random::component_tensors`]; the storage follows `omni quantize`'s
//! Q8_0 policy ([`crate::gguf::quantize::choose_type`]): 2-D matrices whose rows are a multiple of 32
//! are Q8_0 blocks, except MoE router gates, which stay f32 like every 1-D tensor and conv kernel.
//!
//! The Q8_0 blocks of one component are generated together, the first time a loader asks for one of
//! its matrices, into one anonymous memory map filled by all threads (a cheap counter-based PRNG, so
//! the values do not depend on the thread count); every matrix is a `QTensor` viewing its range of
//! that map, exactly like a GGUF file map: nothing is copied. Values: int8 uniform over the full range
//! with scales near 0.02 / 74 (weights of std ≈ 0.02, so activations stay finite); norm weights 1.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::f16;
use memmap2::{Mmap, MmapMut};
use serde_json::Value as Json;

use crate::gguf::format::GgmlType;
use crate::gguf::names::Component;
use crate::gguf::random::component_tensors;
use crate::gguf::storage::mapped_qtensor;

/// Storage of the random matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RandomQuant {
    /// Q8_0 blocks as `omni quantize --type q8_0` writes them.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Everything dense f32 (4× the memory of Q8_0: only for small components).
    #[serde(rename = "f32")]
    F32,
}

impl std::str::FromStr for RandomQuant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "f32" => Ok(Self::F32),
            other => bail!("unknown random weight type `{other}` (use q8_0 or f32)"),
        }
    }
}

const Q8_BLOCK_BYTES: usize = 34;
const Q8_BLOCK_VALUES: usize = 32;
/// Std of the random weights.
const WEIGHT_STD: f32 = 0.02;
/// Blocks per PRNG stream: each stream's seed is derived from (seed, stream index).
const BLOCKS_PER_STREAM: usize = 4096;

/// How long one component's blocks took to make.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GeneratedArena {
    pub component: String,
    pub bytes: u64,
    pub matrices: usize,
    pub seconds: f64,
    pub threads: usize,
}

/// One component's Q8_0 matrices in one anonymous map.
struct Arena {
    map: Arc<Mmap>,
    /// Byte offset of each matrix in `map`.
    offsets: HashMap<String, usize>,
}

/// The random backend: names and shapes from config.json, values made on demand.
pub struct RandomSource {
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
    quant: RandomQuant,
    threads: usize,
    arenas: Mutex<HashMap<Component, Arc<Arena>>>,
    generated: Mutex<Vec<GeneratedArena>>,
}

impl RandomSource {
    /// Every checkpoint tensor of `config` (a full `config.json` value).
    pub fn new(config: &Json, seed: u64, quant: RandomQuant) -> Result<Self> {
        let mut shapes = BTreeMap::new();
        for c in Component::ALL {
            for (name, shape) in component_tensors(config, c)
                .with_context(|| format!("random weights: tensor list of {}", c.name()))?
            {
                shapes.insert(name, shape);
            }
        }
        if shapes.is_empty() {
            bail!("random weights: config.json describes no tensors");
        }
        Ok(Self {
            shapes,
            seed,
            quant,
            threads: candle_core::utils::get_num_threads().max(1),
            arenas: Mutex::new(HashMap::new()),
            generated: Mutex::new(Vec::new()),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub fn quant(&self) -> RandomQuant {
        self.quant
    }

    /// What was generated so far (one entry per component whose matrices were asked for).
    pub fn generated(&self) -> Vec<GeneratedArena> {
        self.generated.lock().expect("random weights lock").clone()
    }

    /// Whether `name` is stored as Q8_0 blocks (mirrors `choose_type` for `--type q8_0`).
    fn is_q8(&self, name: &str, shape: &[usize]) -> bool {
        self.quant == RandomQuant::Q8_0
            && shape.len() == 2
            && shape[1] % Q8_BLOCK_VALUES == 0
            && name.ends_with(".weight")
            && !name.ends_with("mlp.gate.weight")
            && !name.ends_with("shared_expert_gate.weight")
            && !name.contains("pos_embed")
    }

    /// `name` as a dense f32 tensor of its checkpoint shape (made now, deterministic per name).
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let shape = self
            .shape(name)
            .with_context(|| format!("random weights have no tensor `{name}`"))?;
        let n: usize = shape.iter().product();
        let is_norm = (name.contains("norm") || name.contains(".ln_")) && name.ends_with(".weight");
        let constant = if is_norm {
            Some(1.0)
        } else if name.ends_with("layer_scale.scale") || name.ends_with(".gamma") {
            Some(0.01)
        } else if name.ends_with(".alpha") || name.ends_with(".beta") {
            // SnakeBeta keeps log-scale parameters: 0 → exp(0) = 1.
            Some(0.0)
        } else {
            None
        };
        let data: Vec<f32> = match constant {
            Some(c) => vec![c; n],
            None => {
                // Uniform with std WEIGHT_STD: half-width sqrt(3) * std.
                let half = WEIGHT_STD * 3f32.sqrt();
                let mut rng = SplitMix::new(self.seed ^ fnv1a(name));
                (0..n)
                    .map(|_| (rng.next_f32() * 2.0 - 1.0) * half)
                    .collect()
            }
        };
        Ok(Tensor::from_vec(data, shape.to_vec(), device)?)
    }

    /// `name` as Q8_0 blocks over its component's arena, or `None` when it is kept dense.
    pub fn qmatrix(&self, name: &str) -> Result<Option<QTensor>> {
        let shape = self
            .shape(name)
            .with_context(|| format!("random weights have no tensor `{name}`"))?;
        if !self.is_q8(name, shape) {
            return Ok(None);
        }
        let component = Component::of(name)
            .with_context(|| format!("tensor `{name}` belongs to no component"))?;
        let arena = self.arena(component)?;
        let offset = *arena.offsets.get(name).with_context(|| {
            format!(
                "random weights: `{name}` is not in the {} arena",
                component.name()
            )
        })?;
        let q = mapped_qtensor(arena.map.clone(), offset, GgmlType::Q8_0, shape)
            .with_context(|| format!("random Q8_0 tensor `{name}`"))?;
        Ok(Some(q))
    }

    fn arena(&self, component: Component) -> Result<Arc<Arena>> {
        // Held across generation on purpose: loaders run on one thread, and a second component
        // waits rather than competing for the cores.
        let mut arenas = self.arenas.lock().expect("random weights lock");
        if let Some(a) = arenas.get(&component) {
            return Ok(a.clone());
        }
        let start = Instant::now();
        let mut offsets = HashMap::new();
        let mut blocks = 0usize;
        for (name, shape) in &self.shapes {
            if Component::of(name) == Some(component) && self.is_q8(name, shape) {
                offsets.insert(name.clone(), blocks * Q8_BLOCK_BYTES);
                blocks += shape.iter().product::<usize>() / Q8_BLOCK_VALUES;
            }
        }
        let bytes = (blocks * Q8_BLOCK_BYTES).max(Q8_BLOCK_BYTES);
        let mut map = MmapMut::map_anon(bytes).with_context(|| {
            format!(
                "cannot allocate {:.2} GB for random {} weights",
                bytes as f64 / 1e9,
                component.name()
            )
        })?;
        // Huge pages where the kernel allows them: 512× fewer page faults while filling.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        fill_q8_blocks(&mut map, self.seed ^ fnv1a(component.name()), self.threads);
        let map = map
            .make_read_only()
            .context("random weights: sealing the map")?;
        let arena = Arc::new(Arena {
            map: Arc::new(map),
            offsets,
        });
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!(
            "random weights: {} Q8_0 {:.2} GB made in {:.1} s on {} threads",
            component.name(),
            bytes as f64 / 1e9,
            seconds,
            self.threads
        );
        self.generated
            .lock()
            .expect("random weights lock")
            .push(GeneratedArena {
                component: component.name().to_string(),
                bytes: bytes as u64,
                matrices: arena.offsets.len(),
                seconds,
                threads: self.threads,
            });
        arenas.insert(component, arena.clone());
        Ok(arena)
    }
}

/// Fills `buf` (whole Q8_0 blocks) with random blocks on `threads` threads.
fn fill_q8_blocks(buf: &mut [u8], seed: u64, threads: usize) {
    let n_blocks = buf.len() / Q8_BLOCK_BYTES;
    let streams = n_blocks.div_ceil(BLOCKS_PER_STREAM);
    let per_thread = streams.div_ceil(threads.max(1)).max(1);
    // int8 uniform over [-128, 127] has std ≈ 73.9: scale so that d * q has std WEIGHT_STD.
    let scale = WEIGHT_STD / 73.9;
    std::thread::scope(|s| {
        for (t, part) in buf
            .chunks_mut(per_thread * BLOCKS_PER_STREAM * Q8_BLOCK_BYTES)
            .enumerate()
        {
            s.spawn(move || {
                for (k, stream) in part
                    .chunks_mut(BLOCKS_PER_STREAM * Q8_BLOCK_BYTES)
                    .enumerate()
                {
                    let index = (t * per_thread + k) as u64;
                    let mut rng = SplitMix::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for block in stream.chunks_exact_mut(Q8_BLOCK_BYTES) {
                        let r = rng.next_u64();
                        // Scales vary by ±25% around `scale`.
                        let jitter = 0.75 + 0.5 * ((r >> 40) as f32 / (1u64 << 24) as f32);
                        block[..2].copy_from_slice(&f16::from_f32(scale * jitter).to_le_bytes());
                        for q in block[2..].chunks_exact_mut(8) {
                            q.copy_from_slice(&rng.next_u64().to_le_bytes());
                        }
                    }
                }
            });
        }
    });
}

/// SplitMix64: a fast, statistically fine generator for filler values.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_blocks_have_small_scales_and_do_not_depend_on_threads() {
        let mut a = vec![0u8; Q8_BLOCK_BYTES * 10_000];
        let mut b = a.clone();
        fill_q8_blocks(&mut a, 5, 1);
        fill_q8_blocks(&mut b, 5, 3);
        assert_eq!(a, b);
        for block in a.chunks_exact(Q8_BLOCK_BYTES).take(100) {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            assert!(d > 0.0 && d < 0.02 / 73.9 * 1.3, "scale {d}");
        }
    }
}
