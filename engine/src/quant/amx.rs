//! Intel AMX (AMX-BF16) for products of Q8_0 weights with many activation rows: prefill, the audio
//! encoder, the Talker's prefill.
//!
//! Q8_0 activations would need a scaled float update of every 16 × 16 tile of int32 block sums
//! after each 32-value block (weights and activations each carry a scale per block), and that
//! update, not the tile unit, bounded the `tdpbssd` version of this kernel (~100 GMAC/s a core).
//! Here each weight tile (16 rows) is dequantized once per work item to bf16 — `d · q`, rounded to
//! nearest even — and multiplied by the **f32 activations rounded to bf16** with `tdpbf16ps`, whose
//! f32 accumulators stay in the tile registers across all blocks: no per-block work beside the tile
//! instructions. Up to four groups of 16 activation rows share each loaded weight tile.
//!
//! Numerics: this is the product of the dequantized weights with unquantized activations (the f32
//! reference a Q8_0 file stands for), up to bf16 rounding of both factors (relative 2⁻⁹ each, a few
//! percent of the Q8_0 weight error's variance); the VNNI tiles quantize the activations to Q8_0 as
//! llama.cpp does, whose error is ~6× larger. So the two paths agree to the activation quantization
//! error, not to rounding.
//!
//! Used when the CPU has AMX-TILE and AMX-BF16, AVX-512 BW, and Linux grants the tile data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); `OMNI_Q8_KERNEL=vnni` (or `avx512`, `avx2`) turns it off for
//! side-by-side timing. Products of fewer than [`MIN_ROWS`] activation rows keep the VNNI tiles
//! (a decode step's one row would use a sixteenth of each tile).

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::q8_0::{BlockQ8, QK};

/// Activation rows at least for the AMX path.
pub const MIN_ROWS: usize = 4;
/// Weight rows and activation rows per tile.
pub const TILE: usize = 16;
/// `u32` words (bf16 pairs) of one tile: 16 rows × 32 values.
const TILE_WORDS: usize = TILE * QK / 2;
/// Activation groups sharing one loaded weight tile (accumulators tmm2–tmm5).
const GROUPS_PER_PASS: usize = 4;

/// Whether the AMX path runs (CPU, OS permission, not switched off).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if matches!(std::env::var("OMNI_Q8_KERNEL").as_deref(), Ok("vnni" | "avx512" | "avx2")) {
            return false;
        }
        if !std::arch::is_x86_feature_detected!("avx512f") || !std::arch::is_x86_feature_detected!("avx512bw") {
            return false;
        }
        // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = __cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_permission()
    })
}

/// Linux hands out the (8 KB) tile register state only on request, once per process.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// `ldtilecfg`'s 64-byte operand.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Every tile 16 rows × 64 bytes: tmm0 the weight tile (16 weight rows × 32 bf16), tmm1 and tmm6
/// activation tiles (16 rows of bf16 pairs: row `kk` holds values `2kk, 2kk+1` of each of 16
/// activation rows), tmm2–tmm5 the f32 sums of four groups.
fn tile_config() -> TileConfig {
    let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        (c.rows[t], c.colsb[t]) = (TILE as u8, 64);
    }
    c
}

/// f32 → bf16 bits, rounded to nearest even (no NaNs here: weights and activations are finite):
/// the scalar statement of what [`to_bf16_pairs`] does 32 at a time.
#[cfg(test)]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// Activation rows in the tiles' bf16 pair layout: per (group of 16 rows, block of 32 values), 16
/// words per tile row `kk` = (value `2kk`, value `2kk + 1`) of each row. Rows past the end are zero.
pub struct PackedRows {
    tiles: Vec<u32>,
    rows: usize,
    blocks: usize,
}

impl PackedRows {
    /// Packs in parallel over (group, block) tiles.
    ///
    /// # Safety
    /// Every pointer addresses `blocks · 32` readable floats; [`available`] is true.
    pub unsafe fn pack(x_rows: &[*const f32], blocks: usize) -> Self {
        use rayon::prelude::*;
        let groups = x_rows.len().div_ceil(TILE);
        let mut tiles = vec![0u32; groups * blocks * TILE_WORDS];
        let (rows, count) = (crate::quant::SendPtr(x_rows.as_ptr() as *mut *const f32), x_rows.len());
        let fill = |(idx, tile): (usize, &mut [u32])| {
            let (g, b) = (idx / blocks, idx % blocks);
            let rows = rows;
            for n in 0..TILE.min(count - g * TILE) {
                // SAFETY: row g·16 + n exists and holds block b's 32 values.
                unsafe {
                    let values = (*rows.0.add(g * TILE + n)).add(b * QK);
                    pack_block(values, n, tile);
                }
            }
        };
        if x_rows.len() * blocks >= 256 {
            tiles.par_chunks_mut(TILE_WORDS).with_min_len(8).enumerate().for_each(fill);
        } else {
            tiles.chunks_mut(TILE_WORDS).enumerate().for_each(fill);
        }
        Self { tiles, rows: x_rows.len(), blocks }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(TILE)
    }
}

/// Activation row `n` of a tile: its 32 values (`values`) as 16 bf16 pairs at words `kk · 16 + n`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_block(values: *const f32, n: usize, tile: &mut [u32]) {
    debug_assert!(n < TILE && tile.len() == TILE_WORDS);
    unsafe {
        let lo = _mm512_loadu_ps(values);
        let hi = _mm512_loadu_ps(values.add(16));
        let pairs = to_bf16_pairs(lo, hi);
        let index = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((TILE * 4) as i32),
        );
        _mm512_i32scatter_epi32::<1>(tile.as_mut_ptr().add(n) as *mut _, index, pairs);
    }
}

/// 32 floats (`lo` values 0–15, `hi` 16–31) → 32 bf16 in order (word `i` = values `2i`, `2i + 1`),
/// rounded to nearest even as [`bf16_bits`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn to_bf16_pairs(lo: __m512, hi: __m512) -> __m512i {
    if has_bf16_convert() {
        let packed: __m512i;
        // SAFETY: the CPU has AVX512_BF16.
        unsafe {
            asm!("vcvtne2ps2bf16 {d}, {hi}, {lo}", d = out(zmm_reg) packed, hi = in(zmm_reg) hi, lo = in(zmm_reg) lo, options(pure, nomem, nostack));
        }
        return packed;
    }
    let round = _mm512_set1_epi32(0x7FFF);
    let one = _mm512_set1_epi32(1);
    let half = |v: __m512| -> __m256i {
        let bits = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), one);
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_add_epi32(bits, _mm512_add_epi32(round, odd))))
    };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half(lo)), half(hi))
}

thread_local! {
    /// One weight tile dequantized to bf16 (all its blocks), reused across calls on each worker.
    static WEIGHT_TILE: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `out[r * out_stride + c] = Σ x[r] · w[c]` for the `16 · weight_tiles` weight rows starting at
/// `w_first`, each `stride_blocks` blocks after the previous, and the activation rows of groups
/// `groups` of `packed` (`r` counts from the first group's first row).
///
/// # Safety
/// [`available`] is true; the weight rows address `packed.blocks` blocks each; `out` is writable at
/// every `(r, c)` of the result.
pub unsafe fn gemm_packed(
    w_first: *const BlockQ8,
    stride_blocks: usize,
    weight_tiles: usize,
    packed: &PackedRows,
    groups: std::ops::Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    WEIGHT_TILE.with(|cell| {
        let wt = &mut *cell.borrow_mut();
        wt.resize(packed.blocks * TILE_WORDS, 0);
        unsafe { tiles_product(w_first, stride_blocks, weight_tiles, packed, groups, wt, out, out_stride) }
    });
}

/// Whether the CPU converts f32 to bf16 in one instruction (AVX512_BF16: CPUID.(7,1):EAX bit 5).
fn has_bf16_convert() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| __cpuid_count(7, 1).eax & (1 << 5) != 0)
}

/// Dequantizes 16 weight rows (`stride` blocks apart) to bf16, block-major: block `b` is 16 rows of
/// 32 values (64 bytes each) at `wt[b · 256..]`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dequantize_tile(first: *const BlockQ8, stride_blocks: usize, blocks: usize, wt: &mut [u32]) {
    let block_bytes = std::mem::size_of::<BlockQ8>();
    // Byte offsets of the 16 rows' blocks from the first row's: the 16 f16 scales of one block
    // column come in one gather (a scalar f16 conversion per block cost more than the tile work).
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((stride_blocks * block_bytes) as i32),
    );
    let mut scales = [0f32; TILE];
    for b in 0..blocks {
        let column = unsafe { (first as *const u8).add(b * block_bytes) };
        let raw = unsafe { _mm512_i32gather_epi32::<1>(offsets, column as *const i32) };
        unsafe { _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw))) };
        for (r, &scale) in scales.iter().enumerate() {
            let blk = unsafe { &*first.add(r * stride_blocks + b) };
            let d = _mm512_set1_ps(scale);
            let q = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
            let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d);
            let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q))), d);
            let dst = unsafe { wt.as_mut_ptr().add(b * TILE_WORDS + r * QK / 2) };
            unsafe { _mm512_storeu_si512(dst as *mut _, to_bf16_pairs(lo, hi)) };
        }
    }
}

/// `tdpbf16ps $c, tmm0, $x` after loading activation tile `$x` from `$ptr`.
macro_rules! group_product {
    ($x:tt, $c:tt, $ptr:expr) => {
        asm!(
            concat!("tileloadd ", $x, ", [{x} + {xs}*1]"),
            concat!("tdpbf16ps ", $c, ", tmm0, ", $x),
            x = in(reg) $ptr,
            xs = in(reg) 64usize,
            options(nostack, readonly),
        )
    };
}

macro_rules! store_sums {
    ($c:tt, $ptr:expr) => {
        asm!(
            concat!("tilestored [{s} + {ss}*1], ", $c),
            s = in(reg) $ptr,
            ss = in(reg) 64usize,
            options(nostack),
        )
    };
}

#[repr(C, align(64))]
struct Sums([[f32; TILE * TILE]; GROUPS_PER_PASS]);

#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_product(
    w_first: *const BlockQ8,
    stride_blocks: usize,
    weight_tiles: usize,
    packed: &PackedRows,
    groups: std::ops::Range<usize>,
    wt: &mut [u32],
    out: *mut f32,
    out_stride: usize,
) {
    let blocks = packed.blocks;
    let config = tile_config();
    let mut sums = Sums([[0.0; TILE * TILE]; GROUPS_PER_PASS]);
    let g0 = groups.start;
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        for t in 0..weight_tiles {
            // 1. The weight tile in bf16, once for all groups.
            dequantize_tile(w_first.add(t * TILE * stride_blocks), stride_blocks, blocks, wt);
            let mut pass = groups.start;
            while pass < groups.end {
                let n = (groups.end - pass).min(GROUPS_PER_PASS);
                let x = |g: usize, b: usize| packed.tiles.as_ptr().add(((pass + g) * blocks + b) * TILE_WORDS);
                // 2. Sums over all blocks in tmm2..tmm5, one per group: the weight tile loaded once
                //    per block for up to four groups.
                asm!("tilezero tmm2", "tilezero tmm3", "tilezero tmm4", "tilezero tmm5", options(nostack, nomem));
                for b in 0..blocks {
                    asm!(
                        "tileloadd tmm0, [{w} + {ws}*1]",
                        w = in(reg) wt.as_ptr().add(b * TILE_WORDS),
                        ws = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                    group_product!("tmm1", "tmm2", x(0, b));
                    if n > 1 {
                        group_product!("tmm6", "tmm3", x(1, b));
                    }
                    if n > 2 {
                        group_product!("tmm1", "tmm4", x(2, b));
                    }
                    if n > 3 {
                        group_product!("tmm6", "tmm5", x(3, b));
                    }
                }
                store_sums!("tmm2", sums.0[0].as_mut_ptr());
                if n > 1 {
                    store_sums!("tmm3", sums.0[1].as_mut_ptr());
                }
                if n > 2 {
                    store_sums!("tmm4", sums.0[2].as_mut_ptr());
                }
                if n > 3 {
                    store_sums!("tmm5", sums.0[3].as_mut_ptr());
                }
                // 3. Out, transposed: sums[g][weight row m][activation row j] → out row j, col m.
                for g in 0..n {
                    let first_row = (pass + g) * TILE;
                    for j in 0..TILE.min(packed.rows - first_row) {
                        let dst = out.add((first_row - g0 * TILE + j) * out_stride + t * TILE);
                        for m in 0..TILE {
                            *dst.add(m) = sums.0[g][m * TILE + j];
                        }
                    }
                }
                pass += n;
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_0::tests::rand_rows;
    use super::super::q8_0::QuantizedRows;
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80, "a tie rounds to the even bf16");
        assert_eq!(bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82, "a tie rounds to the even bf16");
        assert_eq!(bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bf16_bits(-2.5), 0xC020);
    }

    /// Against the exact product of the dequantized weights and the f32 activations, within bf16
    /// rounding of both factors; on CPUs with AMX.
    #[test]
    fn amx_tiles_equal_the_dequantized_product_to_bf16_rounding() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        // 77 activation rows: four whole groups and a partial fifth (two passes); two weight tiles.
        let (n, m, k) = (32, 77, 256);
        let w = QuantizedRows::quantize(&rand_rows(n, k, 3), n, k);
        let x = rand_rows(m, k, 4);
        let x_rows: Vec<*const f32> = (0..m).map(|r| x[r * k..].as_ptr()).collect();
        let packed = unsafe { PackedRows::pack(&x_rows, k / QK) };
        assert_eq!(packed.groups(), 5);
        // Row 17, block 2 sits in group 1 as row 1: word kk holds values 2kk, 2kk + 1.
        for kk in 0..QK / 2 {
            let word = packed.tiles[(k / QK + 2) * TILE_WORDS + kk * TILE + 1];
            let v = &x[17 * k + 2 * QK + 2 * kk..];
            assert_eq!(word, bf16_bits(v[0]) as u32 | (bf16_bits(v[1]) as u32) << 16, "word {kk}");
        }
        let mut out = vec![f32::NAN; m * n];
        unsafe { gemm_packed(w.row(0).as_ptr(), k / QK, 2, &packed, 0..5, out.as_mut_ptr(), n) };
        let mut part = vec![f32::NAN; (m - TILE) * n];
        unsafe { gemm_packed(w.row(0).as_ptr(), k / QK, 2, &packed, 1..5, part.as_mut_ptr(), n) };
        for r in 0..m {
            for c in 0..n {
                let (mut exact, mut magnitude) = (0f64, 0f64);
                for (b, blk) in w.row(c).iter().enumerate() {
                    for (i, &q) in blk.qs.iter().enumerate() {
                        let p = blk.d.to_f64() * q as f64 * x[r * k + b * QK + i] as f64;
                        exact += p;
                        magnitude += p.abs();
                    }
                }
                let got = out[r * n + c];
                assert!(((got as f64) - exact).abs() <= 5e-3 * magnitude + 1e-6, "({r},{c}): {got} vs {exact}");
                if r >= TILE {
                    assert_eq!(part[(r - TILE) * n + c].to_bits(), got.to_bits(), "({r},{c}) from group 1 on");
                }
            }
        }
    }
}
