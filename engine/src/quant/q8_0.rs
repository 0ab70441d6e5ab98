//! Q8_0 weights times Q8_0-quantized activations on x86-64 (AVX2 + FMA), register-blocked.
//!
//! The block format is ggml's `block_q8_0`: an f16 scale `d` and 32 signed bytes, value = `d · q`.
//! A matmul quantizes each activation row to Q8_0 (ggml's `quantize_row_q8_0`: `d = amax / 127`,
//! `q = round(x / d)`), then each output is `Σ_blocks d_w · d_x · Σ_i w_i x_i`.
//!
//! candle's CPU path computes every output with its own `vec_dot` call (one weight row, one
//! activation row, a runtime feature check per call), so each activation block is reloaded for
//! every weight row and nothing stays in registers. Here a micro-kernel computes a tile of
//! [`TILE_COLS`] weight rows × [`TILE_ROWS`] activation rows per pass over the blocks, sharing every
//! load. Per output the arithmetic is exactly candle's (`_mm256_sign_epi8` / `maddubs` / `madd`,
//! one FMA per block into an 8-lane accumulator, the same horizontal sum), so results are
//! bit-identical to `QMatMul` and every golden number of the engine stays as it was.

use half::f16;

/// Values per block.
pub const QK: usize = 32;
/// Weight rows per micro-kernel tile.
pub const TILE_COLS: usize = 4;
/// Activation rows per micro-kernel tile.
pub const TILE_ROWS: usize = 2;

/// ggml's `block_q8_0` (34 bytes, alignment 2), as stored in GGUF files and in candle's `BlockQ8_0`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8 {
    pub d: f16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8>() == 34);

/// Whether this CPU runs the kernels (else callers keep candle's `QMatMul`).
pub fn kernels_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which instruction set the tiles use (all give the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelVariant {
    Avx2,
    Avx512,
    Vnni,
}

/// The best variant this CPU runs, or the one `OMNI_Q8_KERNEL=avx2|avx512|vnni` asks for (for
/// side-by-side timing; a variant the CPU lacks falls back to the best one it has).
pub fn kernel_variant() -> KernelVariant {
    static V: std::sync::OnceLock<KernelVariant> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let best = if avx2::has_vnni() {
                KernelVariant::Vnni
            } else if avx2::has_avx512() {
                KernelVariant::Avx512
            } else {
                KernelVariant::Avx2
            };
            match std::env::var("OMNI_Q8_KERNEL").as_deref() {
                Ok("avx2") => KernelVariant::Avx2,
                Ok("avx512") if avx2::has_avx512() => KernelVariant::Avx512,
                _ => best,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            KernelVariant::Avx2
        }
    })
}

/// Activation rows quantized to Q8_0, `blocks_per_row` blocks each.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    pub blocks: Vec<BlockQ8>,
    pub rows: usize,
    pub blocks_per_row: usize,
}

impl QuantizedRows {
    /// Quantizes `x [rows, k]` (`k` a multiple of [`QK`]) with [`quantize_block`] (llama.cpp's run-time rounding).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % QK, 0);
        let blocks_per_row = k / QK;
        let mut blocks = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; rows * blocks_per_row];
        for (chunk, block) in x.chunks_exact(QK).zip(blocks.iter_mut()) {
            quantize_block(chunk, block);
        }
        Self { blocks, rows, blocks_per_row }
    }

    pub fn row(&self, r: usize) -> &[BlockQ8] {
        &self.blocks[r * self.blocks_per_row..(r + 1) * self.blocks_per_row]
    }

    /// The first block of every row, as the kernels take their rows.
    pub fn row_ptrs(&self) -> Vec<*const BlockQ8> {
        (0..self.rows).map(|r| self.row(r).as_ptr()).collect()
    }
}

/// One activation block as llama.cpp quantizes activations at run time on x86 (its AVX/AVX2
/// `quantize_row_q8_0`, also in AVX-512 builds): scale `127 / amax` (not `1 / (amax / 127)`) and
/// rounding half to even (`_mm256_round_ps`), where ggml's scalar reference — and candle — round
/// half away from zero with `1 / d`. The two differ by one step in a few values per thousand; this
/// one makes our products the peer's on the same GGUF.
pub fn quantize_block(x: &[f32], out: &mut BlockQ8) {
    // Adding and taking away 1.5·2^23 rounds |v| < 2^22 to the nearest integer, halves to even, in
    // the default rounding mode: what `roundps` does, without a libm call per value.
    const ROUND: f32 = 12_582_912.0;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    out.d = f16::from_f32(amax / 127.0);
    for (q, &v) in out.qs.iter_mut().zip(x) {
        *q = ((v * id + ROUND) - ROUND) as i8;
    }
}

/// Scalar reference of one output (the same sums in the same order as the SIMD kernel's lanes,
/// used on tails and in tests).
pub fn dot_scalar(w: &[BlockQ8], x: &[BlockQ8]) -> f32 {
    // Lane l of the 8-lane accumulator holds bytes 4l..4l+4 of every block.
    let mut lanes = [0f32; 8];
    for (wb, xb) in w.iter().zip(x) {
        let d = wb.d.to_f32() * xb.d.to_f32();
        for (l, lane) in lanes.iter_mut().enumerate() {
            let s: i32 = (0..4).map(|i| wb.qs[4 * l + i] as i32 * xb.qs[4 * l + i] as i32).sum();
            *lane = (s as f32).mul_add(d, *lane);
        }
    }
    // candle's hsum_float_8: (hi + lo) → pairs (0+2, 1+3) → 0 + 1.
    let s: [f32; 4] = std::array::from_fn(|i| lanes[i + 4] + lanes[i]);
    let t0 = s[0] + s[2];
    let t1 = s[1] + s[3];
    t0 + t1
}

/// `out[r][c] = dot(w_rows[c], x_rows[r])` for every pair; `out` is row-major with `out_stride`.
///
/// # Safety
/// Every pointer must address `blocks` readable blocks; `out` must be valid for
/// `x_rows.len()` rows of `w_rows.len()` floats at `out_stride` spacing; [`kernels_available`].
pub unsafe fn gemm_rows(
    w_rows: &[*const BlockQ8],
    x_rows: &[*const BlockQ8],
    blocks: usize,
    out: *mut f32,
    out_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match kernel_variant() {
            KernelVariant::Vnni => avx2::gemm_rows_vnni(w_rows, x_rows, blocks, out, out_stride),
            KernelVariant::Avx512 => avx2::gemm_rows_avx512(w_rows, x_rows, blocks, out, out_stride),
            KernelVariant::Avx2 => avx2::gemm_rows_avx2(w_rows, x_rows, blocks, out, out_stride),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        for (r, &x) in x_rows.iter().enumerate() {
            let x = std::slice::from_raw_parts(x, blocks);
            for (c, &w) in w_rows.iter().enumerate() {
                *out.add(r * out_stride + c) = dot_scalar(std::slice::from_raw_parts(w, blocks), x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8, TILE_COLS, TILE_ROWS};

    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn scale(d: half::f16) -> f32 {
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d.to_bits() as i32))) }
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// The integer dot products of 32-byte blocks, 8 i32 lanes (bytes 4l..4l+4 in lane l), in one
    /// instruction set. `prepare_*` run once per block per tile, `dot` once per (weight, activation)
    /// pair, so whatever a variant can hoist goes into the `prepare_*` steps.
    trait BlockDot {
        type Weight: Copy;
        unsafe fn prepare_weight(wq: __m256i) -> Self::Weight;
        unsafe fn prepare_activation(xq: __m256i) -> __m256i;
        unsafe fn dot(w: Self::Weight, x: __m256i) -> __m256i;
    }

    /// AVX2, candle's sequence: |w| (unsigned) × x with w's sign, pairs to i16, then to i32.
    struct SignMaddubs;
    impl BlockDot for SignMaddubs {
        type Weight = (__m256i, __m256i);
        #[inline(always)]
        unsafe fn prepare_weight(wq: __m256i) -> Self::Weight {
            (wq, _mm256_sign_epi8(wq, wq))
        }
        #[inline(always)]
        unsafe fn prepare_activation(xq: __m256i) -> __m256i {
            xq
        }
        #[inline(always)]
        unsafe fn dot((wq, wa): Self::Weight, xq: __m256i) -> __m256i {
            let sy = _mm256_sign_epi8(xq, wq);
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(wa, sy))
        }
    }

    /// AVX-512 VNNI: `dpbusd` takes unsigned × signed bytes, so the activations go in offset by
    /// +128 and the accumulator starts at −128 · Σw (per 4-byte group), leaving the exact `Σ w·x` of
    /// the sequence above, lane for lane.
    struct Vnni;
    impl BlockDot for Vnni {
        type Weight = (__m256i, __m256i);
        #[inline(always)]
        unsafe fn prepare_weight(wq: __m256i) -> Self::Weight {
            let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), wq);
            (wq, _mm256_sub_epi32(_mm256_setzero_si256(), sum))
        }
        #[inline(always)]
        unsafe fn prepare_activation(xq: __m256i) -> __m256i {
            _mm256_xor_si256(xq, _mm256_set1_epi8(-128))
        }
        #[inline(always)]
        unsafe fn dot((wq, correction): Self::Weight, xu: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(correction, xu, wq)
        }
    }

    /// A `C × R` tile: C weight rows against R activation rows, one pass over the blocks; per block
    /// and pair one FMA of the scaled integer dot into an 8-lane accumulator, as candle's `vec_dot`.
    #[inline(always)]
    unsafe fn tile<D: BlockDot, const C: usize, const R: usize>(
        w: &[*const BlockQ8],
        x: &[*const BlockQ8],
        blocks: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..blocks {
                let mut wp = [D::prepare_weight(_mm256_setzero_si256()); C];
                let mut wd = [0f32; C];
                for c in 0..C {
                    let blk = &*w[c].add(b);
                    wp[c] = D::prepare_weight(_mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i));
                    wd[c] = scale(blk.d);
                }
                for r in 0..R {
                    let blk = &*x[r].add(b);
                    let xq = D::prepare_activation(_mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i));
                    let xd = scale(blk.d);
                    for c in 0..C {
                        let dot = D::dot(wp[c], xq);
                        let d = _mm256_set1_ps(wd[c] * xd);
                        acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    *out.add(r * out_stride + c) = hsum(acc[r][c]);
                }
            }
        }
    }

    macro_rules! dispatch {
        ($f:ident, $c:expr, $r:expr, $w:expr, $x:expr, $blocks:expr, $out:expr, $stride:expr; $($cc:literal),*; $($rr:literal),*) => {
            dispatch!(@c $f, $c, $r, $w, $x, $blocks, $out, $stride; [$($cc),*]; [$($rr),*])
        };
        (@c $f:ident, $c:expr, $r:expr, $w:expr, $x:expr, $blocks:expr, $out:expr, $stride:expr; [$($cc:literal),*]; $rs:tt) => {
            match $c {
                $($cc => dispatch!(@r $f, $cc, $r, $w, $x, $blocks, $out, $stride; $rs),)*
                _ => unreachable!(),
            }
        };
        (@r $f:ident, $cc:literal, $r:expr, $w:expr, $x:expr, $blocks:expr, $out:expr, $stride:expr; [$($rr:literal),*]) => {
            match $r {
                $($rr => tile::<$f, $cc, $rr>($w, $x, $blocks, $out, $stride),)*
                _ => unreachable!(),
            }
        };
    }

    /// The tile loop over all (weight rows, activation rows), `RMAX` activation rows per tile.
    #[inline(always)]
    unsafe fn gemm_rows_impl<const RMAX: usize, const VNNI: bool>(
        w_rows: &[*const BlockQ8],
        x_rows: &[*const BlockQ8],
        blocks: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe {
            let mut r0 = 0;
            while r0 < x_rows.len() {
                let r = (x_rows.len() - r0).min(RMAX);
                let mut c0 = 0;
                while c0 < w_rows.len() {
                    let c = (w_rows.len() - c0).min(TILE_COLS);
                    let w = &w_rows[c0..c0 + c];
                    let x = &x_rows[r0..r0 + r];
                    let o = out.add(r0 * out_stride + c0);
                    if VNNI {
                        dispatch!(Vnni, c, r, w, x, blocks, o, out_stride; 1, 2, 3, 4; 1, 2, 3);
                    } else {
                        dispatch!(SignMaddubs, c, r, w, x, blocks, o, out_stride; 1, 2, 3, 4; 1, 2, 3);
                    }
                    c0 += c;
                }
                r0 += r;
            }
        }
    }

    /// 16 vector registers: 4 × 2 tiles (8 accumulators + 8 weight registers).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_rows_avx2(
        w_rows: &[*const BlockQ8],
        x_rows: &[*const BlockQ8],
        blocks: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe { gemm_rows_impl::<TILE_ROWS, false>(w_rows, x_rows, blocks, out, out_stride) }
    }

    /// The same instructions with AVX-512VL's 32 vector registers: 4 × 3 tiles fit without spills.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
    pub unsafe fn gemm_rows_avx512(
        w_rows: &[*const BlockQ8],
        x_rows: &[*const BlockQ8],
        blocks: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe { gemm_rows_impl::<3, false>(w_rows, x_rows, blocks, out, out_stride) }
    }

    /// AVX-512 VNNI (`vpdpbusd` on 256-bit vectors): one instruction per 32 multiply-adds where the
    /// sign/maddubs/madd sequence takes four.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn gemm_rows_vnni(
        w_rows: &[*const BlockQ8],
        x_rows: &[*const BlockQ8],
        blocks: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe { gemm_rows_impl::<3, true>(w_rows, x_rows, blocks, out, out_stride) }
    }

    pub fn has_vnni() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni"))
    }

    pub fn has_avx512() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in (-2, 2) for kernel tests.
    pub(crate) fn rand_rows(rows: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..rows * k)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn quantization_is_llama_cpp_runtime_rounding() {
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        // amax 127 → scale 1: halves round to even (llama.cpp's `_mm256_round_ps`), where ggml's
        // scalar reference and candle round them away from zero.
        let mut x = vec![0f32; QK];
        x[..5].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5]);
        let ours = QuantizedRows::quantize(&x, 1, QK);
        assert_eq!(&ours.blocks[0].qs[..5], &[127, 2, -4, 0, 0]);
        assert_eq!(ours.blocks[0].d, f16::from_f32(1.0));
        // Same layout (`repr(C)`, 34 bytes): read candle's blocks as ours.
        let as_ours = |b: &[BlockQ8_0]| unsafe { std::slice::from_raw_parts(b.as_ptr() as *const BlockQ8, b.len()) }.to_vec();
        let mut reference = vec![BlockQ8_0::zeros(); 1];
        BlockQ8_0::from_float(&x, &mut reference);
        assert_eq!(&as_ours(&reference)[0].qs[..5], &[127, 3, -4, 1, -1]);
        // Elsewhere the same scale bits and each value within one step of the reference.
        let x = rand_rows(3, 96, 7);
        let ours = QuantizedRows::quantize(&x, 3, 96);
        let mut reference = vec![BlockQ8_0::zeros(); 9];
        BlockQ8_0::from_float(&x, &mut reference);
        for (o, r) in ours.blocks.iter().zip(&as_ours(&reference)) {
            assert_eq!(o.d.to_bits(), r.d.to_bits());
            assert!(o.qs.iter().zip(&r.qs).all(|(a, b)| (*a as i16 - *b as i16).abs() <= 1));
        }
    }

    #[test]
    fn tiles_equal_candle_vec_dot_bit_for_bit() {
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        if !kernels_available() {
            return;
        }
        let (n, m, k) = (11, 5, 160);
        let w = QuantizedRows::quantize(&rand_rows(n, k, 1), n, k);
        let x = QuantizedRows::quantize(&rand_rows(m, k, 2), m, k);
        let (w_rows, x_rows) = (w.row_ptrs(), x.row_ptrs());
        let mut out = vec![0f32; m * n];
        unsafe { gemm_rows(&w_rows, &x_rows, k / QK, out.as_mut_ptr(), n) };
        // The AVX2-only variant (4 × 2 tiles) gives the same bits as the dispatched one.
        #[cfg(target_arch = "x86_64")]
        {
            let mut plain = vec![0f32; m * n];
            unsafe { avx2::gemm_rows_avx2(&w_rows, &x_rows, k / QK, plain.as_mut_ptr(), n) };
            assert_eq!(plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        // Same layout (`repr(C)`, 34 bytes): view our blocks as candle's.
        let as_candle = |q: &QuantizedRows, r: usize| -> Vec<BlockQ8_0> {
            let row = q.row(r);
            unsafe { std::slice::from_raw_parts(row.as_ptr() as *const BlockQ8_0, row.len()) }.to_vec()
        };
        for r in 0..m {
            for c in 0..n {
                let (wc, xr) = (as_candle(&w, c), as_candle(&x, r));
                let want = BlockQ8_0::vec_dot(k, &wc, &xr);
                assert_eq!(out[r * n + c].to_bits(), want.to_bits(), "({r},{c})");
                assert_eq!(dot_scalar(w.row(c), x.row(r)).to_bits(), want.to_bits(), "scalar ({r},{c})");
            }
        }
    }
}
