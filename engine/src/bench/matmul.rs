//! `omni bench matmul`: the Q8_0 product kernels alone, at the shapes the model's hot paths give
//! them (prefill projections, the audio encoder, the Talker, one expert's rows, a decode step), in
//! GMAC/s on all threads and on one.
//!
//! The weights are random Q8_0 blocks; the activations random floats, quantized per call as the
//! model's `Linear` does. Each shape runs a few warm-up calls, then the median of `iters` calls.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::machine::{MachineFacts, Table};
use crate::quant::Q8Matrix;

/// One product shape: `x [rows, k] · Wᵀ`, `W [n, k]`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulShape {
    pub name: &'static str,
    pub rows: usize,
    pub k: usize,
    pub n: usize,
}

/// The shapes of the latency path (real model).
pub fn default_shapes() -> Vec<MatmulShape> {
    let s = |name, rows, k, n| MatmulShape { name, rows, k, n };
    vec![
        s("thinker attn_q, 72-token prefill", 72, 2048, 4096),
        s("thinker attn_output, 72-token prefill", 72, 4096, 2048),
        s("thinker attn_k, 72-token prefill", 72, 2048, 512),
        s("audio encoder fc1, 65 tokens", 65, 1280, 5120),
        s("audio encoder fc2, 65 tokens", 65, 5120, 1280),
        s("talker attn_q, 81-row prefill", 81, 1024, 2048),
        s("one expert's gate, 5 rows", 5, 2048, 768),
        s("thinker attn_q, decode", 1, 2048, 4096),
        s("code predictor mlp, decode", 1, 1024, 3072),
    ]
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulResult {
    pub shape: MatmulShape,
    /// `q8_0` (the engine's kernels) or `f32 candle` (dense, as the audio stem's convs run).
    pub kind: &'static str,
    pub all_threads_ms: f64,
    pub all_threads_gmacs: f64,
    pub one_thread_ms: f64,
    pub one_thread_gmacs: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulBench {
    pub bench: &'static str,
    pub machine: MachineFacts,
    pub iters: usize,
    pub results: Vec<MatmulResult>,
    /// Small pool operations timed back to back and after the pool sat idle, as between the
    /// operations of a forward pass.
    pub pool: Vec<PoolResult>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolResult {
    pub name: &'static str,
    pub back_to_back_ms: f64,
    /// The same with the calling thread asleep for `idle_ms` before each call.
    pub after_idle_ms: f64,
    pub idle_ms: f64,
}

impl MatmulBench {
    pub fn table(&self) -> String {
        let mut t = Table::new(format!(
            "omni bench matmul: Q8_0 × Q8_0 products (activation quantization included), median of {} calls\n{}",
            self.iters,
            self.machine.describe()
        ));
        for r in &self.results {
            let s = &r.shape;
            t.row(
                format!("{} ({}×{}→{}, {})", s.name, s.rows, s.k, s.n, r.kind),
                format!("{:.3} ms", r.all_threads_ms),
                format!(
                    "{:.0} GMAC/s on {} threads; one thread {:.3} ms, {:.1} GMAC/s",
                    r.all_threads_gmacs, self.machine.threads, r.one_thread_ms, r.one_thread_gmacs
                ),
            );
        }
        for p in &self.pool {
            t.row(
                p.name,
                format!("{:.3} ms", p.back_to_back_ms),
                format!("back to back; {:.3} ms after {:.1} ms idle", p.after_idle_ms, p.idle_ms),
            );
        }
        t.render()
    }
}

fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

fn median_ms(iters: usize, f: impl FnMut()) -> f64 {
    median_after_idle_ms(iters, std::time::Duration::ZERO, f)
}

/// Median time of `f` called right after the calling thread slept `idle` (the pool idle meanwhile;
/// zero: back to back), after three untimed calls.
fn median_after_idle_ms(iters: usize, idle: std::time::Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            if !idle.is_zero() {
                std::thread::sleep(idle);
            }
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn bench_matmul(shapes: &[MatmulShape], iters: usize) -> Result<MatmulBench> {
    ensure!(iters > 0, "--iters must be positive");
    ensure!(crate::quant::enabled(), "the engine's Q8_0 kernels do not run on this CPU");
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut results = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        ensure!(shape.k % 32 == 0 && shape.rows > 0 && shape.n > 0, "bad shape {shape:?}");
        let w = Tensor::from_vec(random_values(shape.n * shape.k, 2 * i as u64 + 1), (shape.n, shape.k), &Device::Cpu)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let matrix = Q8Matrix::view(&q).expect("a CPU Q8_0 matrix");
        let x = random_values(shape.rows * shape.k, 2 * i as u64 + 2);
        let macs = (shape.rows * shape.k * shape.n) as f64;
        let all = median_ms(iters, || {
            std::hint::black_box(crate::quant::in_pool(|| matrix.matmul(&x, shape.rows)));
        });
        let one = one_thread.install(|| {
            median_ms(iters.min(10), || {
                std::hint::black_box(matrix.matmul(&x, shape.rows));
            })
        });
        results.push(MatmulResult {
            shape: shape.clone(),
            kind: "q8_0",
            all_threads_ms: all,
            all_threads_gmacs: macs / all / 1e6,
            one_thread_ms: one,
            one_thread_gmacs: macs / one / 1e6,
        });
    }
    // The audio stem's second conv as it runs (f32 im2col patches times the transposed kernel
    // matrix through candle): the end of speech waits for one of these.
    let stem = MatmulShape { name: "audio stem conv2 (im2col), one 100-frame chunk", rows: 800, k: 4320, n: 480 };
    let w = Tensor::from_vec(random_values(stem.n * stem.k, 99), (stem.n, stem.k), &Device::Cpu)?;
    let x = Tensor::from_vec(random_values(stem.rows * stem.k, 98), (stem.rows, stem.k), &Device::Cpu)?;
    let macs = (stem.rows * stem.k * stem.n) as f64;
    let all = median_ms(iters.min(20), || {
        std::hint::black_box(crate::quant::in_pool(|| x.matmul(&w.t().expect("2-D")).expect("f32 matmul")));
    });
    let one = one_thread.install(|| {
        median_ms(3, || {
            std::hint::black_box(x.matmul(&w.t().expect("2-D")).expect("f32 matmul"));
        })
    });
    results.push(MatmulResult {
        shape: stem,
        kind: "f32 candle",
        all_threads_ms: all,
        all_threads_gmacs: macs / all / 1e6,
        one_thread_ms: one,
        one_thread_gmacs: macs / one / 1e6,
    });
    // 3. Small pool operations of a forward pass, back to back and after the pool sat idle for a
    //    millisecond (idle workers go to sleep; waking them is part of every operation's latency).
    let idle = std::time::Duration::from_millis(1);
    let mut pool = Vec::new();
    let threads = rayon::current_num_threads();
    let empty = || {
        crate::quant::in_pool(|| {
            use rayon::prelude::*;
            (0..threads).into_par_iter().for_each(|i| {
                std::hint::black_box(i);
            })
        })
    };
    pool.push(PoolResult {
        name: "empty parallel op over every thread",
        back_to_back_ms: median_ms(iters, empty),
        after_idle_ms: median_after_idle_ms(iters, idle, empty),
        idle_ms: 1.0,
    });
    let gate = Tensor::from_vec(random_values(81 * 768, 5), (81, 768), &Device::Cpu)?;
    let up = Tensor::from_vec(random_values(81 * 768, 6), (81, 768), &Device::Cpu)?;
    let silu = || {
        std::hint::black_box(crate::quant::in_pool(|| crate::nn::silu_mul(&gate, &up).expect("silu_mul")));
    };
    pool.push(PoolResult {
        name: "SiLU·up of an 81-row Talker shared expert (81×768)",
        back_to_back_ms: median_ms(iters, silu),
        after_idle_ms: median_after_idle_ms(iters, idle, silu),
        idle_ms: 1.0,
    });
    let shape = &shapes[shapes.len().min(6) - 1];
    let w = Tensor::from_vec(random_values(shape.n * shape.k, 7), (shape.n, shape.k), &Device::Cpu)?;
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
    let matrix = Q8Matrix::view(&q).expect("a CPU Q8_0 matrix");
    let x = random_values(shape.rows * shape.k, 8);
    let product = || {
        std::hint::black_box(crate::quant::in_pool(|| matrix.matmul(&x, shape.rows)));
    };
    pool.push(PoolResult {
        name: shape.name,
        back_to_back_ms: median_ms(iters, product),
        after_idle_ms: median_after_idle_ms(iters, idle, product),
        idle_ms: 1.0,
    });
    Ok(MatmulBench { bench: "matmul", machine: MachineFacts::collect(), iters, results, pool })
}
