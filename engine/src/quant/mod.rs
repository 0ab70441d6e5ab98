//! CPU kernels for quantized weights, behind the [`crate::nn::Linear`] seam.
//!
//! - [`q8_0`]: the Q8_0 × Q8_0 micro-kernel (register-blocked tiles, sums bit-identical to ggml's
//!   and candle's `vec_dot`) and activation quantization as llama.cpp does it at run time (so a
//!   product equals llama.cpp's CPU product on the same GGUF; candle's rounds a few activation
//!   values per thousand the other way).
//! - [`Q8Matrix`]: a Q8_0 matrix viewed in place (file map or memory, no copy) with a parallel
//!   matmul over tiles of weight rows.
//! - [`moe`]: a whole MoE expert step (gate, up, SiLU, down, weighted sum) in three parallel
//!   sweeps, where candle's `QMatMul` would take three thread-pool round trips per expert.
//!
//! Every Q8_0 product goes through these kernels, small decode ones too: sending small products to
//! candle's spinning barrier pool while rayon's workers run the rest made the lent Xeon's Talker step
//! 4× slower (two pools fighting over the same cores).
//!
//! Used only where [`q8_0::kernels_available`] (x86-64 with AVX2/FMA/F16C) and the matrix is Q8_0;
//! everything else keeps candle's `QMatMul`. `OMNI_CANDLE_MATMUL=1` switches the kernels off (for
//! side-by-side timing: `omni bench thinker` prints which path ran).

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod moe;
pub mod q8_0;

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use q8_0::{BlockQ8, QuantizedRows, QK};

/// Whether products of several activation rows run on Intel AMX tiles ([`amx`]).
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        enabled() && amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Keeps freed memory in the process. glibc gives every allocation over 128 KB its own mapping
/// (raising that bar only as blocks are freed) and trims heap tops back to the OS, so a forward's
/// activation buffers keep coming back as fresh zero pages: a page fault per 4 KB on first touch,
/// which in a VM cost more than the GELU or im2col work writing them. This serves allocations up
/// to 32 MB from the heap and never trims it: the resident size stays at the peak of the work done
/// (the model's weights are file maps either way). Call once at startup (the CLI does); no effect
/// off glibc; `OMNI_KEEP_FREED_MEMORY=0` skips it (for side-by-side timing).
pub fn keep_freed_memory() {
    if std::env::var("OMNI_KEEP_FREED_MEMORY").as_deref() == Ok("0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the worker threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Candle's element-wise operations on large tensors (a residual add of a prefill's rows, a
/// broadcast multiply) run on candle's own worker pool, whose 15 threads then spin 25 000 `pause`
/// iterations each — over a millisecond on recent Intel cores, where `pause` waits ~140 cycles —
/// before they sleep. Two adds per decoder layer kept them spinning through a whole prefill, on the
/// cores the engine's rayon workers needed: a profile of the latency bench on the lent Xeon found
/// 18 % of all CPU time in that spin loop. This lets them spin only `SPIN` iterations (a few
/// microseconds). Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` unless the environment already does: call
/// at startup, before any thread starts (the CLI does).
pub fn limit_candle_pool_spinning() {
    const SPIN: &str = "64";
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Edition 2021: set_var is safe; the caller is still single-threaded.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN);
    }
}

/// Whether the engine's own kernels run (CPU support and not switched off by `OMNI_CANDLE_MATMUL`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("OMNI_CANDLE_MATMUL").map(|v| v != "0" && !v.is_empty()).unwrap_or(false);
        !off && q8_0::kernels_available()
    })
}

/// Multiply-adds per work item at least: below this a rayon hand-off costs more than the work.
/// `OMNI_MIN_ITEM_MACS` overrides it (for tuning on a new machine).
fn min_item_macs() -> usize {
    static V: OnceLock<usize> = OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("OMNI_MIN_ITEM_MACS").ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(1 << 16)
    })
}

/// Runs `f` on a worker of the rayon pool (at once if this thread is one). A product started from an
/// outside thread is injected cold: the caller sleeps on a latch and a parked worker must be woken,
/// tens of microseconds each time; from inside the pool it is a cheap fork. Model forwards wrap
/// their whole step in this so the dozens of products of one decode step pay that once.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    flush_denormals();
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Flush-to-zero and denormals-are-zero on this thread and, the first time, on every thread of the
/// worker pool: values below f32's normal range (1.2e-38: softmax tails, SiLU of large negative
/// inputs, products of small weights) become zero instead of taking a microcode assist of ~100+
/// cycles per operation on Intel cores. A sum or product that meets such a value next to normal ones
/// rounds to the same f32 either way, so outputs keep their bits in practice (the golden tests run
/// with it). `OMNI_FLUSH_DENORMALS=0` leaves the CPU's default (for side-by-side timing).
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: OnceLock<bool> = OnceLock::new();
        static POOL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        thread_local! {
            static SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if !*ON.get_or_init(|| std::env::var("OMNI_FLUSH_DENORMALS").as_deref() != Ok("0")) {
            return;
        }
        #[allow(deprecated)] // `_mm_setcsr` is the documented way to set MXCSR; no other API exists
        fn set_here() {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            const FTZ: u32 = 1 << 15;
            const DAZ: u32 = 1 << 6;
            // SAFETY: only the flush modes of this thread's SSE/AVX control register change.
            unsafe { _mm_setcsr(_mm_getcsr() | FTZ | DAZ) }
        }
        if !SET.with(|s| s.replace(true)) {
            set_here();
        }
        // Queued on every worker without waiting (a blocking broadcast from inside the pool could
        // wait on a worker that waits on this one).
        // A plain load first: every forward passes here, and only the first needs the swap.
        if !POOL.load(std::sync::atomic::Ordering::Relaxed) && !POOL.swap(true, std::sync::atomic::Ordering::Relaxed) {
            rayon::spawn_broadcast(|_| {
                if !SET.with(|s| s.replace(true)) {
                    set_here();
                }
            });
        }
    }
}

/// A raw pointer that may cross to the worker threads: every user writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// A Q8_0 matrix `[rows, cols]` viewed in place in its `QTensor`'s storage.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    /// Keeps the blocks alive (file map or heap).
    _tensor: Arc<QTensor>,
    base: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Q8Matrix {
    /// `Some` when `q` is a CPU-resident 2-D Q8_0 tensor the kernels can read in place.
    pub fn view(q: &Arc<QTensor>) -> Option<Self> {
        if !enabled() || q.dtype() != GgmlDType::Q8_0 {
            return None;
        }
        let &[rows, cols] = q.shape().dims() else {
            return None;
        };
        if cols % QK != 0 {
            return None;
        }
        let base = match q.data().ok()? {
            Cow::Borrowed(bytes) => {
                if bytes.len() != rows * cols / QK * std::mem::size_of::<BlockQ8>() {
                    return None;
                }
                bytes.as_ptr() as usize
            }
            Cow::Owned(_) => return None,
        };
        if base % std::mem::align_of::<BlockQ8>() != 0 {
            return None;
        }
        Some(Self { _tensor: q.clone(), base, rows, cols })
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols / QK
    }

    /// First block of weight row `r`.
    pub fn row_ptr(&self, r: usize) -> *const BlockQ8 {
        debug_assert!(r < self.rows);
        (self.base as *const BlockQ8).wrapping_add(r * self.blocks_per_row())
    }

    /// `x [m, cols]` times every matrix of `matrices` (all `cols` wide): one quantization of `x`,
    /// one parallel sweep (and on AMX one packing) for all of them, as a layer's q/k/v or gate/up.
    pub fn matmul_many(matrices: &[&Q8Matrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(first) = matrices.first() else { return Vec::new() };
        debug_assert!(matrices.iter().all(|w| w.cols == first.cols));
        // On AMX whole 16-row weight tiles take the f32 rows: no Q8_0 copy is needed when every
        // matrix is made of whole tiles (the pointers below are then never read).
        let amx_only = m >= AMX_MIN_ROWS && amx_available() && matrices.iter().all(|w| w.rows % AMX_TILE == 0);
        let xq = if amx_only { QuantizedRows::default() } else { QuantizedRows::quantize_par(x, m, first.cols) };
        let x_rows = if amx_only { vec![std::ptr::null(); m] } else { xq.row_ptrs() };
        let x_f32: Vec<*const f32> = x.chunks_exact(first.cols).map(|r| r.as_ptr()).collect();
        let mut outs: Vec<Vec<f32>> = matrices.iter().map(|w| vec![0f32; m * w.rows]).collect();
        let jobs: Vec<MatJob> = matrices
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, out)| MatJob { matrix: w, x_rows: &x_rows, x_f32: &x_f32, out: SendPtr(out.as_mut_ptr()), out_stride: w.rows })
            .collect();
        run_jobs(&jobs);
        drop(jobs);
        outs
    }

    /// `x [m, cols]` → `x Wᵀ [m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, m).pop().expect("one product")
    }
}

/// One product `x_rows × matrixᵀ` writing `out[r * out_stride + c]`.
pub(crate) struct MatJob<'a> {
    pub matrix: &'a Q8Matrix,
    /// The activation rows quantized to Q8_0 (the VNNI/AVX tiles)…
    pub x_rows: &'a [*const BlockQ8],
    /// …and the same rows in f32 (`matrix.cols` each; the AMX tiles).
    pub x_f32: &'a [*const f32],
    pub out: SendPtr<f32>,
    pub out_stride: usize,
}
unsafe impl Sync for MatJob<'_> {}

#[cfg(target_arch = "x86_64")]
use amx::{MIN_ROWS as AMX_MIN_ROWS, TILE as AMX_TILE};
#[cfg(not(target_arch = "x86_64"))]
const AMX_MIN_ROWS: usize = usize::MAX;
#[cfg(not(target_arch = "x86_64"))]
const AMX_TILE: usize = 16;

/// Activation rows per work item: more rows share each weight tile, but the item must stay small
/// enough to balance.
const ROWS_PER_ITEM: usize = 64;
/// The same on AMX tiles, where an item's weight tiles and their gathered scales serve every group
/// of 16 activation rows it takes.
#[cfg(target_arch = "x86_64")]
const AMX_ROWS_PER_ITEM: usize = 128;

/// One work item: weight rows `c0..c1` of job `job` times its activation rows `r0..r1`.
#[derive(Clone, Copy)]
struct Item {
    job: usize,
    c0: usize,
    c1: usize,
    r0: usize,
    r1: usize,
}

/// Splits the jobs into about 4 items per thread over the whole sweep, in whole weight tiles of
/// `tile_cols` rows and activation runs of `rows_per_item`, but no item under `min_item_macs()`
/// (one-row decode products are small).
fn split_items(jobs: &[MatJob], tile_cols: usize, rows_per_item: impl Fn(&MatJob) -> usize) -> Vec<Item> {
    let threads = rayon::current_num_threads().max(1);
    let total_work: usize = jobs.iter().map(|j| j.matrix.rows * j.x_rows.len()).sum();
    let total_macs: usize = jobs.iter().map(|j| j.matrix.rows * j.matrix.cols * j.x_rows.len()).sum();
    let target_items = (threads * 4).min(total_macs / min_item_macs()).max(1);
    let mut items = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let m = job.x_rows.len();
        if m == 0 {
            continue;
        }
        let share = (job.matrix.rows * m) as f64 / total_work.max(1) as f64;
        let job_items = ((target_items as f64 * share).ceil() as usize).max(1);
        let per_item = rows_per_item(job);
        let row_groups = m.div_ceil(per_item);
        let col_items = job_items.div_ceil(row_groups).max(1);
        let chunk = job.matrix.rows.div_ceil(col_items).next_multiple_of(tile_cols).max(tile_cols);
        for g in 0..row_groups {
            let (r0, r1) = (g * per_item, ((g + 1) * per_item).min(m));
            let mut c0 = 0;
            while c0 < job.matrix.rows {
                let c1 = (c0 + chunk).min(job.matrix.rows);
                items.push(Item { job: j, c0, c1, r0, r1 });
                c0 = c1;
            }
        }
    }
    items
}

fn for_each_item(items: &[Item], run: impl Fn(&Item) + Sync + Send) {
    if items.len() == 1 {
        run(&items[0]);
    } else {
        items.par_iter().for_each(run);
    }
}

/// Runs every job's tiles on the rayon pool, all jobs in one parallel sweep.
pub(crate) fn run_jobs(jobs: &[MatJob]) {
    #[cfg(target_arch = "x86_64")]
    if amx_available() && jobs.iter().any(|j| j.x_rows.len() >= amx::MIN_ROWS) {
        run_jobs_amx(jobs);
        return;
    }
    let items = split_items(jobs, q8_0::TILE_COLS, |_| ROWS_PER_ITEM);
    for_each_item(&items, |&Item { job, c0, c1, r0, r1 }| {
        let job = &jobs[job];
        // SAFETY: rows c0..c1 and r0..r1 are in bounds; items write disjoint (row, col) ranges.
        unsafe { vnni_item(job, c0, c1, r0, r1) }
    });
}

/// Weight rows `c0..c1` × activation rows `r0..r1` of `job` on the VNNI/AVX tiles.
///
/// # Safety
/// The ranges are in bounds and no other thread writes the same outputs.
unsafe fn vnni_item(job: &MatJob, c0: usize, c1: usize, r0: usize, r1: usize) {
    let w_rows: Vec<*const BlockQ8> = (c0..c1).map(|c| job.matrix.row_ptr(c)).collect();
    unsafe {
        q8_0::gemm_rows(
            &w_rows,
            &job.x_rows[r0..r1],
            job.matrix.blocks_per_row(),
            job.out.0.add(r0 * job.out_stride + c0),
            job.out_stride,
        )
    }
}

/// [`run_jobs`] with AMX: each job of at least [`amx::MIN_ROWS`] rows has its f32 activations
/// packed once (in parallel, before the sweep); its items run whole 16-row weight tiles on the tile
/// unit, a trailing partial tile on the VNNI tiles. Jobs of fewer rows run on the VNNI tiles
/// throughout.
#[cfg(target_arch = "x86_64")]
fn run_jobs_amx(jobs: &[MatJob]) {
    // Jobs over the same activation rows (a layer's q/k/v, an expert's gate and up) share one
    // packing: `pack_of[j]` indexes `packs`.
    let mut pack_of: Vec<Option<usize>> = Vec::with_capacity(jobs.len());
    let mut sources: Vec<usize> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        debug_assert_eq!(job.x_f32.len(), job.x_rows.len());
        if job.x_rows.len() < amx::MIN_ROWS {
            pack_of.push(None);
            continue;
        }
        let same = |&s: &usize| {
            let o = &jobs[s];
            std::ptr::eq(o.x_f32, job.x_f32) && o.matrix.blocks_per_row() == job.matrix.blocks_per_row()
        };
        match sources.iter().position(same) {
            Some(p) => pack_of.push(Some(p)),
            None => {
                pack_of.push(Some(sources.len()));
                sources.push(j);
            }
        }
    }
    let packs: Vec<amx::PackedRows> = {
        let _span = crate::profile::span("amx pack activations");
        sources
            .par_iter()
            // SAFETY: the job's f32 rows hold the matrix's columns each.
            .map(|&j| unsafe { amx::PackedRows::pack(jobs[j].x_f32, jobs[j].matrix.blocks_per_row()) })
            .collect()
    };
    let packed: Vec<Option<&amx::PackedRows>> = pack_of.iter().map(|p| p.map(|i| &packs[i])).collect();
    let items =
        split_items(
            jobs,
            amx::TILE,
            |j| {
                if j.x_rows.len() >= amx::MIN_ROWS {
                    AMX_ROWS_PER_ITEM
                } else {
                    ROWS_PER_ITEM
                }
            },
        );
    for_each_item(&items, |&Item { job: j, c0, c1, r0, r1 }| {
        let job = &jobs[j];
        let Some(packed) = packed[j] else {
            // SAFETY: as in `run_jobs`.
            unsafe { vnni_item(job, c0, c1, r0, r1) };
            return;
        };
        let whole = (c1 - c0) / amx::TILE * amx::TILE;
        // Items start on whole tiles and row runs on whole groups (split_items' multiples of 16).
        debug_assert!(c0 % amx::TILE == 0 && r0 % amx::TILE == 0);
        // SAFETY: rows c0..c0+whole of the matrix are evenly strided in place; the output ranges
        // of items are disjoint.
        unsafe {
            if whole > 0 {
                amx::gemm_packed(
                    job.matrix.row_ptr(c0),
                    job.matrix.blocks_per_row(),
                    whole / amx::TILE,
                    packed,
                    r0 / amx::TILE..r1.div_ceil(amx::TILE),
                    job.out.0.add(r0 * job.out_stride + c0),
                    job.out_stride,
                );
            }
            if c0 + whole < c1 {
                vnni_item(job, c0 + whole, c1, r0, r1);
            }
        }
    });
}

impl QuantizedRows {
    /// [`QuantizedRows::quantize`], rows spread over the pool when there are many.
    pub fn quantize_par(x: &[f32], rows: usize, k: usize) -> Self {
        if rows < 16 {
            return Self::quantize(x, rows, k);
        }
        let blocks_per_row = k / QK;
        let mut blocks = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; rows * blocks_per_row];
        blocks.par_chunks_mut(blocks_per_row).zip(x.par_chunks(k)).for_each(|(out, row)| {
            for (chunk, block) in row.chunks_exact(QK).zip(out.iter_mut()) {
                q8_0::quantize_block(chunk, block);
            }
        });
        Self { blocks, rows, blocks_per_row }
    }
}
