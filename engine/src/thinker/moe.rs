//! Feed-forward blocks of the Thinker decoder: the sparse MoE block and the dense SwiGLU MLP.
//!
//! Reference: `Qwen3OmniMoeThinkerTextSparseMoeBlock`, `Qwen3OmniMoeThinkerTextTopKRouter`,
//! `Qwen3OmniMoeThinkerTextExperts` and `Qwen3OmniMoeThinkerTextMLP`. The router takes a softmax over
//! all experts in f32, keeps the top k, and renormalises them when `norm_topk_prob`. Experts are
//! stacked in 3-D tensors (`gate_up [E, 2I, H]`, `down [E, H, I]`) as transformers and llama.cpp keep
//! them; the checkpoint stores them one expert at a time. From a quantized GGUF file the experts stay
//! in llama.cpp's stacked `ffn_{gate,up,down}_exps` tensors and each expert is a quantized matrix
//! viewing its slot of the file map.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::nn::{silu, silu_mul, Linear};
use crate::quant::moe::Q8Experts;
use crate::weights::{WeightMatrix, Weights};

/// The routing decision for one token: expert indices and their weights, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Softmax over `logits`, top-`k` (ties keep the lower index first), optional renormalisation.
pub fn route_token(logits: &[f32], k: usize, renormalise: bool) -> Route {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let probs: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // The order is total (ties by index), so selecting the k best and sorting only them gives the
    // same prefix as sorting everything.
    let best_first = |&a: &usize, &b: &usize| probs[b].total_cmp(&probs[a]).then(a.cmp(&b));
    if k < order.len() {
        order.select_nth_unstable_by(k, best_first);
        order.truncate(k);
    }
    order.sort_by(best_first);
    let mut weights: Vec<f32> = order.iter().map(|&e| probs[e]).collect();
    if renormalise {
        let total: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
    }
    Route { experts: order, weights }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct DenseMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DenseMlp {
    pub fn new(w: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Linear::load(&w.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Linear::load(&w.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = Linear::forward_shared(&[&self.gate_proj, &self.up_proj], x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("two projections"))?;
        let h = silu_mul(&gate, &up)?;
        self.down_proj.forward(&h)
    }
}

/// Stacked experts: dense `gate_up [E, 2I, H]`, `down [E, H, I]`; or, when the weight source holds
/// them quantized, one `gate`, `up`, `down` matrix per expert (views of the stacked GGUF tensors).
#[derive(Debug, Clone)]
pub struct StackedExperts {
    bank: ExpertBank,
    intermediate: usize,
    /// All experts Q8_0 and the engine's kernels available: the whole step in three sweeps.
    q8: Option<Arc<Q8Experts>>,
}

#[derive(Debug, Clone)]
enum ExpertBank {
    Dense { gate_up: Tensor, down: Tensor },
    Quantized(Vec<[Linear; 3]>),
}

impl StackedExperts {
    /// Reads `{w}.{e}.gate_proj.weight`, `up_proj`, `down_proj` for every expert and stacks them.
    pub fn load(w: &Weights, num_experts: usize, hidden: usize, intermediate: usize) -> Result<Self> {
        let first = w.pp(0).matrix(&[intermediate, hidden], "gate_proj.weight")?;
        if let WeightMatrix::Quantized(_) = first {
            let mut experts = Vec::with_capacity(num_experts);
            let mut first = Some(first);
            for e in 0..num_experts {
                let ew = w.pp(e);
                let gate = match first.take() {
                    Some(m) => Linear::from_matrix(m, None)?,
                    None => Linear::load(&ew.pp("gate_proj"), hidden, intermediate, false)?,
                };
                let up = Linear::load(&ew.pp("up_proj"), hidden, intermediate, false)?;
                let down = Linear::load(&ew.pp("down_proj"), intermediate, hidden, false)?;
                experts.push([gate, up, down]);
            }
            let q8 = q8_experts(&experts, hidden, intermediate).map(Arc::new);
            return Ok(Self { bank: ExpertBank::Quantized(experts), intermediate, q8 });
        }
        let WeightMatrix::Dense(first) = first else { unreachable!() };
        let mut first = Some(first);
        let mut gate_up = Vec::with_capacity(num_experts);
        let mut down = Vec::with_capacity(num_experts);
        for e in 0..num_experts {
            let ew = w.pp(e);
            let gate = match first.take() {
                Some(t) => t,
                None => ew.get(&[intermediate, hidden], "gate_proj.weight")?,
            };
            let up = ew.get(&[intermediate, hidden], "up_proj.weight")?;
            gate_up.push(Tensor::cat(&[&gate, &up], 0)?);
            down.push(ew.get(&[hidden, intermediate], "down_proj.weight")?);
        }
        let bank = ExpertBank::Dense { gate_up: Tensor::stack(&gate_up, 0)?, down: Tensor::stack(&down, 0)? };
        Ok(Self { bank, intermediate, q8: None })
    }

    /// Runs expert `e` on rows `x [n, H]`.
    pub fn expert_forward(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        match &self.bank {
            ExpertBank::Dense { gate_up, down } => {
                let gu = x.matmul(&gate_up.get(e)?.t()?)?;
                let gate = gu.narrow(1, 0, self.intermediate)?;
                let up = gu.narrow(1, self.intermediate, self.intermediate)?;
                let h = (silu(&gate)? * up)?;
                Ok(h.matmul(&down.get(e)?.t()?)?)
            }
            ExpertBank::Quantized(experts) => {
                let [gate, up, down] = &experts[e];
                let h = (silu(&gate.forward(x)?)? * up.forward(x)?)?;
                down.forward(&h)
            }
        }
    }
}

/// The Q8_0 kernel views of every expert, if every matrix has one.
fn q8_experts(experts: &[[Linear; 3]], hidden: usize, intermediate: usize) -> Option<Q8Experts> {
    let mut q = Q8Experts { gate: Vec::new(), up: Vec::new(), down: Vec::new(), hidden, intermediate };
    for [gate, up, down] in experts {
        q.gate.push(gate.q8_matrix()?.clone());
        q.up.push(up.q8_matrix()?.clone());
        q.down.push(down.q8_matrix()?.clone());
    }
    Some(q)
}

/// Router + experts.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    gate: Linear,
    experts: StackedExperts,
    top_k: usize,
    norm_topk_prob: bool,
    num_experts: usize,
}

impl SparseMoe {
    pub fn new(
        w: &Weights,
        hidden: usize,
        moe_intermediate: usize,
        num_experts: usize,
        top_k: usize,
        norm_topk_prob: bool,
    ) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(&w.pp("gate"), hidden, num_experts, false)?,
            experts: StackedExperts::load(&w.pp("experts"), num_experts, hidden, moe_intermediate)?,
            top_k,
            norm_topk_prob,
            num_experts,
        })
    }

    /// Routing for every row of `x [n, H]`.
    pub fn routes(&self, x: &Tensor) -> Result<Vec<Route>> {
        let _span = crate::profile::span("moe router");
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let route = |row: &Vec<f32>| route_token(row, self.top_k, self.norm_topk_prob);
        if logits.len() >= 16 {
            use rayon::prelude::*;
            return Ok(logits.par_iter().map(route).collect());
        }
        Ok(logits.iter().map(route).collect())
    }

    /// `x [b, t, H]` → `[b, t, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let rows = x.reshape((b * t, h))?;
        let routes = self.routes(&rows)?;
        if let (Some(q8), true) = (&self.experts.q8, x.device().is_cpu()) {
            let xs = rows.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Tensor::from_vec(q8.forward(&xs, &routes), (b, t, h), x.device())?);
        }
        let _span = crate::profile::span("moe experts, candle path");
        // Tokens (and their weights) per expert, experts in ascending order as the reference sums them.
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.num_experts];
        for (token, route) in routes.iter().enumerate() {
            for (&e, &wgt) in route.experts.iter().zip(&route.weights) {
                per_expert[e].0.push(token as u32);
                per_expert[e].1.push(wgt);
            }
        }
        let device = x.device();
        let mut out = Tensor::zeros((b * t, h), DType::F32, device)?;
        for (e, (tokens, weights)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, device)?;
            let xs = rows.index_select(&idx, 0)?;
            let ys = self.experts.expert_forward(e, &xs)?;
            let ys = ys.broadcast_mul(&Tensor::from_vec(weights, (n, 1), device)?)?;
            out = out.index_add(&idx, &ys, 0)?;
        }
        Ok(out.reshape((b, t, h))?)
    }
}

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(DenseMlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward(x),
            Self::Sparse(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_takes_top_k_of_the_softmax() {
        let r = route_token(&[0.0, 2.0, 1.0, -1.0], 2, false);
        assert_eq!(r.experts, vec![1, 2]);
        let z: f32 = [0.0f32, 2.0, 1.0, -1.0].iter().map(|x| x.exp()).sum();
        assert!((r.weights[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((r.weights[1] - 1f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn renormalised_weights_sum_to_one() {
        let r = route_token(&[0.3, -0.2, 0.9, 0.1, 0.0], 3, true);
        assert_eq!(r.experts, vec![2, 0, 3]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ties_prefer_the_lower_expert() {
        let r = route_token(&[1.0, 1.0, 1.0], 2, true);
        assert_eq!(r.experts, vec![0, 1]);
    }
}
