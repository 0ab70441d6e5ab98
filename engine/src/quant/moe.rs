//! One MoE expert step over Q8_0 experts: every routed expert's `down(silu(gate x) · up x)`,
//! weighted and summed per token, in three parallel sweeps over all experts at once.
//!
//! Same numbers as the candle path of [`crate::thinker::moe::SparseMoe`]: the kernel's per-output
//! sums equal candle's `vec_dot`, SiLU as candle's `v / (1 + exp(-v))`, each token's sum built from
//! zero in ascending expert order; only the activation quantization rounds as llama.cpp's run time
//! does (`q8_0::quantize_block`), which moves a value by one step a few times per thousand (never in
//! the test below's data, which stays bit for bit).

use rayon::prelude::*;

use super::q8_0::{BlockQ8, QuantizedRows};
use super::{run_jobs, MatJob, Q8Matrix, SendPtr};
use crate::thinker::moe::Route;

/// Elements below which an element-wise step stays on the calling thread (a decode step's few rows).
const SMALL_ELEMENTWISE: usize = 1 << 15;

/// The experts of one layer, each `gate [I, H]`, `up [I, H]`, `down [H, I]`.
#[derive(Debug, Clone)]
pub struct Q8Experts {
    pub gate: Vec<Q8Matrix>,
    pub up: Vec<Q8Matrix>,
    pub down: Vec<Q8Matrix>,
    pub hidden: usize,
    pub intermediate: usize,
}

impl Q8Experts {
    /// `x [T, H]` and one route per token → `[T, H]`.
    pub fn forward(&self, x: &[f32], routes: &[Route]) -> Vec<f32> {
        let (h, inter) = (self.hidden, self.intermediate);
        let t = routes.len();
        debug_assert_eq!(x.len(), t * h);
        // 1. Tokens per expert (ascending token order), only experts that got any.
        let mut tokens: Vec<Vec<usize>> = vec![Vec::new(); self.gate.len()];
        for (tok, route) in routes.iter().enumerate() {
            for &e in &route.experts {
                tokens[e].push(tok);
            }
        }
        let active: Vec<usize> = (0..tokens.len()).filter(|&e| !tokens[e].is_empty()).collect();
        let mut offset = Vec::with_capacity(active.len());
        let mut total = 0;
        for &e in &active {
            offset.push(total);
            total += tokens[e].len();
        }

        // 2. gate and up for every (expert, token): [total, I] each, one sweep.
        let span = crate::profile::span("moe experts gate+up");
        let quantize = crate::profile::span("moe experts quantize input");
        let xq = QuantizedRows::quantize_par(x, t, h);
        drop(quantize);
        let x_rows: Vec<Vec<*const BlockQ8>> =
            active.iter().map(|&e| tokens[e].iter().map(|&tok| xq.row(tok).as_ptr()).collect()).collect();
        let x_f32: Vec<Vec<*const f32>> =
            active.iter().map(|&e| tokens[e].iter().map(|&tok| x[tok * h..].as_ptr()).collect()).collect();
        let mut gate = vec![0f32; total * inter];
        let mut up = vec![0f32; total * inter];
        let mut jobs = Vec::with_capacity(2 * active.len());
        for (a, &e) in active.iter().enumerate() {
            for (m, buf) in [(&self.gate[e], &mut gate), (&self.up[e], &mut up)] {
                jobs.push(MatJob {
                    matrix: m,
                    x_rows: &x_rows[a],
                    x_f32: &x_f32[a],
                    out: SendPtr(buf[offset[a] * inter..].as_mut_ptr()),
                    out_stride: inter,
                });
            }
        }
        run_jobs(&jobs);
        drop(jobs);
        drop(span);

        // 3. silu(gate) · up, quantized per row for `down`.
        let span = crate::profile::span("moe experts silu+quantize");
        let silu_mul = |(&g, &u): (&f32, &f32)| g / (1.0 + (-g).exp()) * u;
        let hidden_rows: Vec<f32> = if gate.len() >= SMALL_ELEMENTWISE {
            gate.par_iter().zip(&up).map(silu_mul).collect()
        } else {
            gate.iter().zip(&up).map(silu_mul).collect()
        };
        let hq = QuantizedRows::quantize_par(&hidden_rows, total, inter);
        let h_rows = hq.row_ptrs();
        let h_f32: Vec<*const f32> = hidden_rows.chunks_exact(inter).map(|r| r.as_ptr()).collect();

        drop(span);

        // 4. down for every (expert, token): [total, H], one sweep.
        let span = crate::profile::span("moe experts down");
        let mut down = vec![0f32; total * h];
        let jobs: Vec<MatJob> = active
            .iter()
            .enumerate()
            .map(|(a, &e)| MatJob {
                matrix: &self.down[e],
                x_rows: &h_rows[offset[a]..offset[a] + tokens[e].len()],
                x_f32: &h_f32[offset[a]..offset[a] + tokens[e].len()],
                out: SendPtr(down[offset[a] * h..].as_mut_ptr()),
                out_stride: h,
            })
            .collect();
        run_jobs(&jobs);
        drop(jobs);
        drop(span);

        // 5. Per token: Σ weight · expert output, from zero, experts ascending.
        let mut slot = vec![0usize; self.gate.len()]; // expert → index in `active`
        for (a, &e) in active.iter().enumerate() {
            slot[e] = a;
        }
        let _span = crate::profile::span("moe experts weighted sum");
        let mut out = vec![0f32; t * h];
        let weighted_sum = |(tok, out_row): (usize, &mut [f32])| {
            let route = &routes[tok];
            let mut order: Vec<(usize, f32)> =
                route.experts.iter().copied().zip(route.weights.iter().copied()).collect();
            order.sort_by_key(|&(e, _)| e);
            for (e, w) in order {
                let a = slot[e];
                let pos = tokens[e].binary_search(&tok).expect("token routed to expert");
                let row = &down[(offset[a] + pos) * h..(offset[a] + pos + 1) * h];
                for (o, &y) in out_row.iter_mut().zip(row) {
                    *o += y * w;
                }
            }
        };
        if out.len() >= SMALL_ELEMENTWISE {
            out.par_chunks_mut(h).enumerate().for_each(weighted_sum);
        } else {
            out.chunks_mut(h).enumerate().for_each(weighted_sum);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use super::*;
    use crate::quant::enabled;
    use crate::thinker::moe::route_token;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn q8(t: &Tensor) -> Arc<QTensor> {
        Arc::new(QTensor::quantize(t, GgmlDType::Q8_0).unwrap())
    }

    /// The fused step equals candle's `QMatMul` per expert, summed as `SparseMoe` sums, bit for bit
    /// (this data has no activation value where the two roundings part).
    #[test]
    fn fused_experts_equal_candle_bit_for_bit() {
        if !enabled() {
            return;
        }
        let (h, inter, n_exp, top_k, tokens) = (64, 96, 6, 2, 7);
        let mats: Vec<[Arc<QTensor>; 3]> = (0..n_exp as u64)
            .map(|e| {
                [q8(&random((inter, h), 10 + e)), q8(&random((inter, h), 20 + e)), q8(&random((h, inter), 30 + e))]
            })
            .collect();
        let experts = Q8Experts {
            gate: mats.iter().map(|m| Q8Matrix::view(&m[0]).unwrap()).collect(),
            up: mats.iter().map(|m| Q8Matrix::view(&m[1]).unwrap()).collect(),
            down: mats.iter().map(|m| Q8Matrix::view(&m[2]).unwrap()).collect(),
            hidden: h,
            intermediate: inter,
        };
        let x = random((tokens, h), 99);
        let router = random((tokens, n_exp), 7).to_vec2::<f32>().unwrap();
        let routes: Vec<Route> = router.iter().map(|r| route_token(r, top_k, true)).collect();
        let ours = experts.forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &routes);

        for (tok, route) in routes.iter().enumerate() {
            let xt = x.narrow(0, tok, 1).unwrap();
            let mut order: Vec<(usize, f32)> =
                route.experts.iter().copied().zip(route.weights.iter().copied()).collect();
            order.sort_by_key(|&(e, _)| e);
            let mut want = vec![0f32; h];
            for (e, w) in order {
                let mm = |i: usize, v: &Tensor| QMatMul::from_arc(mats[e][i].clone()).unwrap().forward(v).unwrap();
                let hid = (candle_nn::ops::silu(&mm(0, &xt)).unwrap() * mm(1, &xt)).unwrap();
                let y = mm(2, &hid).flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (o, v) in want.iter_mut().zip(y) {
                    *o += v * w;
                }
            }
            let got = &ours[tok * h..(tok + 1) * h];
            assert_same(got, &want, &format!("token {tok}"));
        }

        // And a plain Linear-style product equals QMatMul on a batch.
        let m = Q8Matrix::view(&mats[0][0]).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = QMatMul::from_arc(mats[0][0].clone()).unwrap().forward(&x).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_same(&m.matmul(&xs, tokens), &want, "plain product");
    }

    /// Bit for bit on the VNNI/AVX2 tiles; where AMX runs, to candle's activation quantization
    /// (the AMX tiles take the f32 activations: see `quant::amx`).
    fn assert_same(got: &[f32], want: &[f32], what: &str) {
        if !crate::quant::amx_available() {
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}"
            );
            return;
        }
        let err: f64 = got.iter().zip(want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
        let power: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
        assert!(err <= 1e-4 * power, "{what}: NMSE {} against candle", err / power);
    }
}
