//! Intel AMX (AMX-INT8) for Q8_0 × Q8_0 products of many activation rows: prefill, the audio
//! encoder, the Talker's prefill.
//!
//! One `tdpbssd` multiplies a tile of 16 weight rows × one 32-value block (loaded in place from the
//! Q8_0 matrix: the rows are a fixed stride apart) by the same block of 16 activation rows (packed
//! once per call into the 4-byte-interleaved layout the instruction wants): 16 × 16 exact int32 block
//! sums. Each sum is then scaled by its weight and activation block scales and added to an f32
//! accumulator — the same maths as the VNNI tiles, but each block sum is converted once where the
//! VNNI tile converts eight lane sums, so results agree with it to rounding, not bit for bit.
//!
//! Used when the CPU has AMX-TILE and AMX-INT8 and Linux grants the tile data state
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
const TILE: usize = 16;
/// Bytes of one packed activation tile (16 rows × 32 values).
const PACKED_TILE: usize = TILE * QK;

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
        // CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        let leaf7 = __cpuid_count(7, 0);
        if leaf7.edx & (1 << 24) == 0 || leaf7.edx & (1 << 25) == 0 {
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

/// tmm0: 16 weight rows × 32 bytes; tmm1: 8 rows × 64 bytes (16 activation rows, 4 values each per
/// row); tmm2: 16 × 16 int32 sums.
fn tile_config() -> TileConfig {
    let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    (c.rows[0], c.colsb[0]) = (TILE as u8, QK as u16);
    (c.rows[1], c.colsb[1]) = ((QK / 4) as u8, (TILE * 4) as u16);
    (c.rows[2], c.colsb[2]) = (TILE as u8, (TILE * 4) as u16);
    c
}

#[repr(C, align(64))]
struct SumTile([i32; TILE * TILE]);

thread_local! {
    /// Packed activation tiles and their scales, reused across calls on each worker.
    static PACKED: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Packs `x_rows` (each `blocks` Q8_0 blocks) into groups of 16 rows: per (group, block), 8 rows of
/// 16 × 4 bytes (row `kk` holds values `4kk..4kk+4` of each activation row) and the 16 row scales.
/// Rows past the end are zero.
unsafe fn pack(x_rows: &[*const BlockQ8], blocks: usize, tiles: &mut Vec<u8>, scales: &mut Vec<f32>) {
    let groups = x_rows.len().div_ceil(TILE);
    tiles.clear();
    tiles.resize(groups * blocks * PACKED_TILE, 0);
    scales.clear();
    scales.resize(groups * blocks * TILE, 0.0);
    for (r, &row) in x_rows.iter().enumerate() {
        let (g, n) = (r / TILE, r % TILE);
        for b in 0..blocks {
            let blk = unsafe { &*row.add(b) };
            let tile = &mut tiles[(g * blocks + b) * PACKED_TILE..][..PACKED_TILE];
            for kk in 0..QK / 4 {
                for i in 0..4 {
                    tile[kk * TILE * 4 + n * 4 + i] = blk.qs[4 * kk + i] as u8;
                }
            }
            scales[(g * blocks + b) * TILE + n] = blk.d.to_f32();
        }
    }
}

/// `out[r * out_stride + c] = Σ x_rows[r] · w_rows[c]` for the first `16·⌊w_rows.len() / 16⌋` weight
/// rows whose tiles are evenly strided; returns how many leading weight rows were done (the caller
/// finishes the rest).
///
/// # Safety
/// [`available`] is true; every pointer addresses `blocks` blocks; `out` is writable at every
/// `(r, c)` of the result.
pub unsafe fn gemm_rows(
    w_rows: &[*const BlockQ8],
    x_rows: &[*const BlockQ8],
    blocks: usize,
    out: *mut f32,
    out_stride: usize,
) -> usize {
    let stride = blocks * std::mem::size_of::<BlockQ8>();
    let evenly_strided =
        |c0: usize| (1..TILE).all(|i| w_rows[c0 + i] as usize == w_rows[c0] as usize + i * stride);
    let mut done = 0;
    while done + TILE <= w_rows.len() && evenly_strided(done) {
        done += TILE;
    }
    if done == 0 {
        return 0;
    }
    PACKED.with(|cell| {
        let (tiles, scales) = &mut *cell.borrow_mut();
        unsafe {
            pack(x_rows, blocks, tiles, scales);
            tiles_product(&w_rows[..done], x_rows.len(), tiles, scales, blocks, stride, out, out_stride);
        }
    });
    done
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_product(
    w_rows: &[*const BlockQ8],
    rows: usize,
    tiles: &[u8],
    scales: &[f32],
    blocks: usize,
    stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let config = tile_config();
    let mut sums = SumTile([0; TILE * TILE]);
    let mut weight_scales = [0f32; TILE];
    let mut acc_out = [[0f32; TILE]; TILE];
    let groups = rows.div_ceil(TILE);
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        // Byte offsets of the 16 weight rows' blocks from the first one's.
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride as i32),
        );
        for c0 in (0..w_rows.len()).step_by(TILE) {
            let base = w_rows[c0] as *const u8;
            for g in 0..groups {
                let mut acc = [_mm512_setzero_ps(); TILE];
                for b in 0..blocks {
                    let block = base.add(b * std::mem::size_of::<BlockQ8>());
                    // 1. The 16 × 16 block sums: weights (rows `stride` apart, `qs` after the 2-byte
                    //    scale) times the packed activations.
                    asm!(
                        "tilezero tmm2",
                        "tileloadd tmm0, [{w} + {ws}*1]",
                        "tileloadd tmm1, [{x} + {xs}*1]",
                        "tdpbssd tmm2, tmm0, tmm1",
                        "tilestored [{s} + {ss}*1], tmm2",
                        w = in(reg) block.add(2),
                        ws = in(reg) stride,
                        x = in(reg) tiles.as_ptr().add((g * blocks + b) * PACKED_TILE),
                        xs = in(reg) TILE * 4,
                        s = in(reg) sums.0.as_mut_ptr(),
                        ss = in(reg) TILE * 4,
                        options(nostack),
                    );
                    // 2. The weight rows' f16 scales (gathered: each row's block starts with it).
                    let raw = _mm512_i32gather_epi32::<1>(offsets, block as *const i32);
                    _mm512_storeu_ps(weight_scales.as_mut_ptr(), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw)));
                    // 3. acc[weight row][activation row] += sum · d_w · d_x.
                    let dx = _mm512_loadu_ps(scales.as_ptr().add((g * blocks + b) * TILE));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let s = _mm512_cvtepi32_ps(_mm512_load_si512(sums.0.as_ptr().add(r * TILE) as *const _));
                        *a = _mm512_fmadd_ps(s, _mm512_mul_ps(dx, _mm512_set1_ps(weight_scales[r])), *a);
                    }
                }
                // 4. Out, transposed: activation row n of this group, weight row c0 + r.
                for (r, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(acc_out[r].as_mut_ptr(), *a);
                }
                for n in 0..TILE.min(rows - g * TILE) {
                    let dst = out.add((g * TILE + n) * out_stride + c0);
                    for (r, row) in acc_out.iter().enumerate() {
                        *dst.add(r) = row[n];
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_0::tests::rand_rows;
    use super::super::q8_0::{dot_scalar, QuantizedRows};
    use super::*;

    /// Against the scalar Q8_0 dot product (same integer sums, other rounding): on CPUs with AMX.
    #[test]
    fn amx_tiles_equal_the_scalar_dot_to_rounding() {
        if !available() {
            eprintln!("no AMX here: skipped");
            return;
        }
        let (n, m, k) = (37, 21, 256);
        let w = QuantizedRows::quantize(&rand_rows(n, k, 3), n, k);
        let x = QuantizedRows::quantize(&rand_rows(m, k, 4), m, k);
        let (w_rows, x_rows) = (w.row_ptrs(), x.row_ptrs());
        let mut out = vec![f32::NAN; m * n];
        let done = unsafe { gemm_rows(&w_rows, &x_rows, k / QK, out.as_mut_ptr(), n) };
        assert_eq!(done, 32, "two whole tiles of 16 weight rows");
        for r in 0..m {
            for c in 0..done {
                let want = dot_scalar(w.row(c), x.row(r));
                let got = out[r * n + c];
                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "({r},{c}): {got} vs {want}");
            }
            assert!(out[r * n + done].is_nan(), "rows past the tiles are the caller's");
        }
    }
}
