//! Where the vision tower's patches are: learned position embeddings resampled to the grid, and the
//! 2-D rotary tables.
//!
//! Reference: transformers' `vision_utils.py` (`get_vision_interpolation_indices_and_weights` with
//! `mode="bilinear"`, `align_corners=True`, the tower's `fast_pos_embed_interpolate`;
//! `get_vision_position_ids`) and `Qwen3OmniMoeVisionRotaryEmbedding` in `modeling_qwen3_omni_moe.py`.
//! Patches come in spatial-merge-block order: patch `k` of a frame is block `k / m²` (row-major over
//! `(h/m, w/m)`), and inside the block row `(k / m) % m`, column `k % m`.

/// `(row, col)` of every patch of one `(t, h, w)` grid, in the tower's order (frames repeat).
pub fn patch_coordinates(grid_thw: [usize; 3], merge: usize) -> Vec<(usize, usize)> {
    let [t, h, w] = grid_thw;
    let blocks_w = w / merge;
    let mut out = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for k in 0..h * w {
            let in_col = k % merge;
            let in_row = (k / merge) % merge;
            let block_col = (k / (merge * merge)) % blocks_w;
            let block_row = k / (merge * merge * blocks_w);
            out.push((block_row * merge + in_row, block_col * merge + in_col));
        }
    }
    out
}

/// The two taps (source indices, weights) of bilinear `align_corners=True` interpolation for target
/// `index` on an axis of `size` samples from a table side of `side` (float32 arithmetic as the reference).
fn axis_taps(index: usize, size: usize, side: usize) -> [(usize, f32); 2] {
    let denom = (size as f32 - 1.0).max(1.0);
    let src = index as f32 * (side as f32 - 1.0) / denom;
    let floor = src.floor();
    let mut out = [(0usize, 0f32); 2];
    for (o, slot) in out.iter_mut().enumerate() {
        let raw = floor as i64 + o as i64;
        let tap = raw.clamp(0, side as i64 - 1) as usize;
        let distance = (src - floor - o as f32).abs();
        *slot = (tap, (1.0 - distance).max(0.0));
    }
    out
}

/// Four `(table row, weight)` pairs per patch that resample the `side × side` learned table to the grid.
pub fn interpolation_taps(grid_thw: [usize; 3], merge: usize, side: usize) -> Vec<[(usize, f32); 4]> {
    let [_, h, w] = grid_thw;
    patch_coordinates(grid_thw, merge)
        .into_iter()
        .map(|(row, col)| {
            let hs = axis_taps(row, h, side);
            let ws = axis_taps(col, w, side);
            let mut taps = [(0usize, 0f32); 4];
            for (i, &(hi, hw)) in hs.iter().enumerate() {
                for (j, &(wi, ww)) in ws.iter().enumerate() {
                    taps[i * 2 + j] = (hi * side + wi, hw * ww);
                }
            }
            taps
        })
        .collect()
}

/// Axial 2-D rotary: the first quarter of the frequencies turns with the row, the second with the column,
/// and the half is duplicated (`rotate_half` pairing).
#[derive(Debug, Clone)]
pub struct VisionRope {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl VisionRope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        // `1 / theta^(arange(0, dim/2, 2) / (dim/2))` in float32.
        let spatial = head_dim / 2;
        let base = theta as f32;
        let inv_freq = (0..spatial).step_by(2).map(|i| 1.0f32 / base.powf(i as f32 / spatial as f32)).collect();
        Self { inv_freq, head_dim }
    }

    /// `cos`, `sin` rows `[n, head_dim]` (flattened) for patch coordinates.
    pub fn tables(&self, coords: &[(usize, usize)]) -> (Vec<f32>, Vec<f32>) {
        let q = self.inv_freq.len();
        let d = self.head_dim;
        let mut cos = vec![0f32; coords.len() * d];
        let mut sin = vec![0f32; coords.len() * d];
        for (n, &(row, col)) in coords.iter().enumerate() {
            for (axis, pos) in [(0, row), (1, col)] {
                for (i, &f) in self.inv_freq.iter().enumerate() {
                    let angle = pos as f32 * f;
                    let (s, c) = angle.sin_cos();
                    for half in 0..2 {
                        let k = n * d + half * d / 2 + axis * q + i;
                        cos[k] = c;
                        sin[k] = s;
                    }
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_order_of_a_4x4_grid() {
        let c = patch_coordinates([1, 4, 4], 2);
        assert_eq!(&c[..6], &[(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]);
        assert_eq!(c[15], (3, 3));
    }

    #[test]
    fn interpolation_hits_the_corners_exactly() {
        // align_corners: the grid's corners are the table's corners.
        let taps = interpolation_taps([1, 4, 6], 2, 8);
        let first = taps[0];
        assert_eq!(first[0], (0, 1.0));
        let coords = patch_coordinates([1, 4, 6], 2);
        let last = coords.iter().position(|&c| c == (3, 5)).unwrap();
        let total: f32 = taps[last].iter().filter(|t| t.0 == 63).map(|t| t.1).sum();
        assert!((total - 1.0).abs() < 1e-6);
        for t in &taps {
            assert!((t.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
