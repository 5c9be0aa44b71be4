//! Quantized weights times f32 activations on the CPU, weight-stationary: the output columns are split
//! into chunks claimed by the compute team, and each weight column is applied to every activation row
//! of the batch while it sits in L1, so a batch of 8 decode rows reads the model once, not 8 times
//! (candle's `QMatMul` walks the rows outside and streams every weight once per row).
//!
//! Numerics are ggml's: activations are quantized per block to the type each weight type dots with
//! (Q8_1 for Q4_1; Q8_0 for Q4_0/Q5_x/Q8_0; Q8_K for the K-quants), the block dot products are integer,
//! and blocks accumulate in f32. Q4_1 (candle's dot is scalar), Q8_0, Q5_0 (scalar in candle too) and
//! Q4_0 have their own kernels here (AVX2, or AVX-512 VNNI with two groups of eight columns per 512-bit
//! register, chosen at run time, on weights repacked eight columns to a group), and so do Q4_K, Q5_K and
//! Q6_K (see `kquant`); every other type, and these off x86, uses candle's per-block `vec_dot` (AVX2 at
//! run time on x86-64, NEON on arm64) inside our tiling and threads. This is the CPU's only matrix-product path for GGUF weights; on CUDA the
//! model keeps candle's `QMatMul` (see `llama::Linear`).
mod kquant;
mod q4_1;
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8K,
};
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{Result, bail};
use half::{bf16, f16};

use kquant::KMatrix;
pub use q4_1::Q4_1Matrix;
use q8_0::Q8Matrix;

use super::team::{Disjoint, Team};

/// Where a kernel writes its results: `rows x n`, row-major in one buffer, or with each row at a
/// pointer of its own (rows of several buffers: each sequence's logits). Each task owns a disjoint
/// range of columns, so concurrent writes never touch the same element.
pub(crate) struct Out {
    ptr: *mut f32,
    /// Row `r`'s first value, when the rows are not one buffer (else empty).
    bases: Vec<*mut f32>,
    rows: usize,
    n: usize,
}

// SAFETY: tasks write disjoint (row, column) elements; the buffer outlives the parallel region.
unsafe impl Sync for Out {}

impl Out {
    /// Tasks' view of `buf`, `rows x n` row-major; `buf` must outlive every task writing through it.
    pub(crate) fn new(buf: &mut [f32], rows: usize, n: usize) -> Self {
        assert_eq!(buf.len(), rows * n);
        Self { ptr: buf.as_mut_ptr(), bases: Vec::new(), rows, n }
    }

    /// The same over `buf`'s allocation, `rows x n` values of it, which may not be written yet (only
    /// raw pointers touch them until the caller sets the length once the tasks are done).
    fn unwritten(buf: &mut Vec<f32>, rows: usize, n: usize) -> Self {
        assert!(buf.capacity() >= rows * n);
        Self { ptr: buf.as_mut_ptr(), bases: Vec::new(), rows, n }
    }

    /// [`Out::unwritten`] over several buffers in turn, `bufs[i]` holding the next `parts[i]` rows.
    fn unwritten_parts(bufs: &mut [Vec<f32>], parts: &[usize], n: usize) -> Self {
        assert_eq!(bufs.len(), parts.len());
        let mut bases = Vec::with_capacity(parts.iter().sum());
        for (buf, &rows) in bufs.iter_mut().zip(parts) {
            assert!(buf.capacity() >= rows * n);
            // SAFETY: row `j < rows` starts at `j * n`, inside the buffer's allocation (checked above).
            bases.extend((0..rows).map(|j| unsafe { buf.as_mut_ptr().add(j * n) }));
        }
        Self { ptr: std::ptr::null_mut(), rows: bases.len(), bases, n }
    }

    /// Row `r`'s first value (`r < rows`).
    #[inline(always)]
    unsafe fn row(&self, r: usize) -> *mut f32 {
        // SAFETY: `r < rows` (the callers check), so inside the one buffer or a row of `bases`.
        if self.bases.is_empty() { unsafe { self.ptr.add(r * self.n) } } else { self.bases[r] }
    }

    /// # Safety
    /// Column `c` must belong to the calling task (be in the `cols` it was handed): no other task may
    /// write it during the region.
    #[inline(always)]
    pub(crate) unsafe fn set(&self, r: usize, c: usize, v: f32) {
        assert!(r < self.rows && c < self.n);
        // SAFETY: in bounds (checked above) and owned by the calling task (the caller's promise).
        unsafe { *self.row(r).add(c) = v }
    }

    /// Writes `vals` to row `r`, columns `c..c + vals.len()`.
    ///
    /// # Safety
    /// Those columns must belong to the calling task (be in the `cols` it was handed): no other task may
    /// write them during the region.
    #[inline(always)]
    pub(crate) unsafe fn set_span(&self, r: usize, c: usize, vals: &[f32]) {
        assert!(r < self.rows && c + vals.len() <= self.n);
        // SAFETY: in bounds (checked above) and owned by the calling task (the caller's promise).
        unsafe {
            let dst = self.row(r).add(c);
            if vals.len() == GROUP {
                // A whole group, the common case: a fixed-size copy the compiler keeps in registers. The
                // general copy was a call to libc's memmove per 32 bytes, ~2% of a 16-row decode step.
                (dst as *mut [f32; GROUP]).write_unaligned(*(vals.as_ptr() as *const [f32; GROUP]));
            } else if vals.len() == 2 * GROUP {
                (dst as *mut [f32; 2 * GROUP]).write_unaligned(*(vals.as_ptr() as *const [f32; 2 * GROUP]));
            } else if vals.len() == 4 * GROUP {
                (dst as *mut [f32; 4 * GROUP]).write_unaligned(*(vals.as_ptr() as *const [f32; 4 * GROUP]));
            } else {
                std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, vals.len())
            }
        }
    }
}

/// One weight format's half of the product.
pub(crate) trait Kernel: Sync {
    /// The activations, quantized the way this weight type's dot product wants them.
    type Act: Sync;
    fn out_features(&self) -> usize;
    fn in_features(&self) -> usize;
    /// Depends only on the kernel's type and `x` (its input width), never on one matrix's weights:
    /// matrices of one type over the same input share the result (`matmul_many`).
    fn quantize(&self, x: &[f32], rows: usize) -> Self::Act;
    /// Writes `out[r][c]` for every row `r` and every column `c` in `cols`.
    fn columns(&self, act: &Self::Act, rows: usize, cols: Range<usize>, out: &Out);
}

/// Rows per pass over a column chunk: their quantized activations stay in L2 while the chunk's weights
/// stay in L1.
const ROW_BLOCK: usize = 64;

/// Above this many rows (a prefill, a prompt chunk), the AVX-512 kernels unpack each tile's weights once
/// for all its runs of rows, and the Q8_0 family's tiles are 32 columns wide ([`column_chunk`]'s unit).
/// At 16 rows and below (decode steps) they unpack per run: earlier thresholds gained nothing served.
const UNPACK_ABOVE: usize = 16;

/// Output columns per weight group in the repacked layouts: one 256-bit register holds a value for each.
pub(crate) const GROUP: usize = 8;

/// Where byte `j` of column `c`'s block lands in a group's interleaved block: 32-byte chunks, each holding
/// four consecutive bytes of every column of the group, so one load and one `vpdpbusd` against four
/// broadcast activation bytes serve all eight columns.
#[inline(always)]
pub(crate) fn interleaved(c: usize, j: usize) -> usize {
    (j / 4) * 32 + c * 4 + j % 4
}

/// The tiling of our own kernels: rows in blocks of [`ROW_BLOCK`], and within a block, for each
/// [`GROUP`] of columns in `cols`, runs of up to `N` rows (the kernel's choice). `dot(g, rows, tile)` fills `tile[i]`
/// with row `rows[i]`'s results for columns `g * GROUP..`; this writes out the ones below `cols.end`
/// (a matrix's last group is padded).
pub(crate) fn eight_column_tiles<const N: usize>(
    rows: usize,
    cols: Range<usize>,
    out: &Out,
    dot: impl FnMut(usize, &[usize], &mut [[f32; GROUP]; N]),
) {
    column_tiles::<N, GROUP>(rows, cols, out, dot)
}

/// [`eight_column_tiles`] over tiles of `W` columns (a multiple of [`GROUP`]): `dot(g, rows, tile)`
/// fills columns `g * GROUP..g * GROUP + W`, that is groups `g..g + W / GROUP`, of which those past the
/// matrix's last group are never written out. Task chunks are whole multiples of 16 columns
/// ([`column_chunk`]), so a 16-column tile never straddles two tasks.
pub(crate) fn column_tiles<const N: usize, const W: usize>(
    rows: usize,
    cols: Range<usize>,
    out: &Out,
    mut dot: impl FnMut(usize, &[usize], &mut [[f32; W]; N]),
) {
    assert!(W.is_multiple_of(GROUP) && cols.start.is_multiple_of(W), "column chunks start on a tile");
    let mut tile = [[0f32; W]; N];
    for rb in (0..rows).step_by(ROW_BLOCK) {
        let re = (rb + ROW_BLOCK).min(rows);
        for c0 in cols.clone().step_by(W) {
            let width = (cols.end - c0).min(W);
            for r0 in (rb..re).step_by(N) {
                let run: [usize; N] = std::array::from_fn(|i| r0 + i);
                let run = &run[..(re - r0).min(N)];
                dot(c0 / GROUP, run, &mut tile);
                for (i, &r) in run.iter().enumerate() {
                    // SAFETY: `c0..c0 + width` is within `cols`, the calling task's own columns.
                    unsafe { out.set_span(r, c0, &tile[i][..width]) };
                }
            }
        }
    }
}

/// Columns per task: several tasks per thread, so a slow thread doesn't hold the region and the wait at
/// its end (for the last task claimed) is short. Sixteen a thread from four rows up: a 16-row step
/// runs ~300 regions, and at eight the threads waited ~4% of it. Eight below that, where a task's work
/// is small beside claiming it (one-row decode measured ~10% faster with eight than sixteen). At least
/// 16 columns (a 64-byte line of one output row, so no two tasks write the same cache line in a decode
/// step; a multiple of [`GROUP`], so no weight group straddles two tasks). How columns are split never
/// changes a bit of the result.
///
/// Above [`UNPACK_ABOVE`] rows, multiples of 32: the Q8_0-family kernels there take 32-column tiles, and a chunk of
/// an odd number of 16s leaves one half-width tile per chunk (a third of the tiles in a 1536-column
/// matrix's 48-column chunks).
fn column_chunk(n: usize, rows: usize, threads: usize) -> usize {
    let per_thread = if rows >= 4 { 16 } else { 8 };
    let unit = if rows > UNPACK_ABOVE { 32 } else { 16 };
    n.div_ceil(threads * per_thread).next_multiple_of(unit).clamp(unit, 512)
}

pub(crate) fn matmul<K: Kernel>(kernel: &K, x: &[f32], rows: usize) -> Vec<f32> {
    matmul_many(&[kernel], x, rows).pop().expect("one matrix, one result")
}

/// `f16::from_f32(x).to_f32()`: `x` rounded to the nearest half-precision value, ties to even, inline.
/// The activation quantizers round two scales per 32-value block this way; through `half` each was a
/// call with a CPU-feature check (and the Q8_1 sum's product a software f16 multiply): 5% of a
/// 16-row decode step.
#[inline(always)]
pub(crate) fn f16_round(x: f32) -> f32 {
    let a = x.abs();
    let r = if a.is_nan() {
        return x;
    } else if a >= 65520.0 {
        // Halfway between f16's largest value (65504) and the next power of two: ties to even go up.
        f32::INFINITY
    } else if a < 6.103_515_6e-5 {
        // f16's subnormals are multiples of 2^-24, the spacing of f32 values in [0.5, 1): adding 0.5
        // rounds to one of them (ties to even), and subtracting it again is exact.
        (a + 0.5) - 0.5
    } else {
        // Keep 10 of the 23 mantissa bits, rounding to nearest even; a carry moves into the exponent.
        let b = a.to_bits();
        f32::from_bits((b + 0xFFF + ((b >> 13) & 1)) & !0x1FFF)
    };
    r.copysign(x)
}

/// [`matmul`] for several matrices of one type over the same `x`: one quantization (a kernel's
/// activation blocks depend only on its type and `x`), one region whose tasks are column chunks of every
/// matrix.
fn matmul_many<K: Kernel>(kernels: &[&K], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    let k = kernels[0].in_features();
    assert!(kernels.iter().all(|m| m.in_features() == k), "matrices of different input widths");
    assert_eq!(x.len(), rows * k, "activations are {} values, expected {rows} x {k}", x.len());
    let act = kernels[0].quantize(x, rows);
    let mut outs: Vec<Vec<f32>> = kernels.iter().map(|m| output_buffer(rows * m.out_features())).collect();
    let views: Vec<Out> =
        outs.iter_mut().zip(kernels).map(|(o, m)| Out::unwritten(o, rows, m.out_features())).collect();
    run_columns(kernels, &act, rows, &views);
    drop(views);
    for (o, m) in outs.iter_mut().zip(kernels) {
        // SAFETY: the tasks' column chunks cover `0..n` and each `columns` call wrote every row of its
        // chunk (the `Kernel` contract, which the NaN-poisoned debug builds test); the region is over.
        unsafe { o.set_len(rows * m.out_features()) }
    }
    outs
}

/// [`matmul`] with the result's rows in buffers of their own: the first `parts[0]` rows in the first,
/// and so on (each sequence's logits, written where the engine takes them instead of copied there
/// from one buffer: 8 MB a step for Gemma 3's 262k-token vocabulary at eight streams).
fn matmul_parts<K: Kernel>(kernel: &K, x: &[f32], parts: &[usize]) -> Vec<Vec<f32>> {
    let (k, n, rows) = (kernel.in_features(), kernel.out_features(), parts.iter().sum::<usize>());
    assert_eq!(x.len(), rows * k, "activations are {} values, expected {rows} x {k}", x.len());
    let act = kernel.quantize(x, rows);
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|&p| output_buffer(p * n)).collect();
    let view = Out::unwritten_parts(&mut outs, parts, n);
    run_columns(&[kernel], &act, rows, std::slice::from_ref(&view));
    drop(view);
    for (o, &p) in outs.iter_mut().zip(parts) {
        // SAFETY: as in `matmul_many`: every row of every part was written, and the region is over.
        unsafe { o.set_len(p * n) }
    }
    outs
}

/// The parallel region of a product: every kernel's columns in chunks, as tasks on the team, each
/// writing its chunk of every row into the kernel's view.
fn run_columns<K: Kernel>(kernels: &[&K], act: &K::Act, rows: usize, views: &[Out]) {
    let team = Team::global();
    let chunk = column_chunk(kernels.iter().map(|m| m.out_features()).sum(), rows, team.threads());
    let tasks: Vec<(usize, Range<usize>)> = kernels
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            let n = m.out_features();
            (0..n).step_by(chunk).map(move |c0| (i, c0..(c0 + chunk).min(n)))
        })
        .collect();
    team.run(tasks.len(), &|t| {
        let (i, ref cols) = tasks[t];
        kernels[i].columns(act, rows, cols.clone(), &views[i])
    });
}

/// A product's output buffer, with room for `len` values, before the tasks write every one of them.
/// Debug and test builds poison it with NaN, so a kernel that misses an element fails every comparison
/// downstream (the kernel tests run there). Release builds leave it unwritten: filling a 16-row decode
/// step's outputs (10 MB over the layers, 3 MB of logits) on the engine thread, with NaN or with
/// calloc's zeros, while the team waited was ~4% of the step.
fn output_buffer(len: usize) -> Vec<f32> {
    if cfg!(debug_assertions) { vec![f32::NAN; len] } else { Vec::with_capacity(len) }
}

/// Maps `x`, cut into whole `unit`s of values, through `f` (which appends `per_unit` items per unit of
/// its chunk), with the chunks spread over the team from 8K values (a batch of 8 rows of 1536) up:
/// activation quantization is linear in the input and stays off the critical path of a 256-token
/// prefill only when it is parallel too.
pub(crate) fn par_map_units<B: Send>(
    x: &[f32],
    unit: usize,
    per_unit: usize,
    f: impl Fn(&[f32], &mut Vec<B>) + Sync,
) -> Vec<B> {
    let units = x.len() / unit;
    let team = Team::global();
    let mut out = Vec::with_capacity(units * per_unit);
    if x.len() < 1 << 13 || team.threads() == 1 {
        f(&x[..units * unit], &mut out);
        return out;
    }
    let per = units.div_ceil(team.threads() * 4);
    let tasks = units.div_ceil(per);
    let slots = Disjoint::new(&mut out.spare_capacity_mut()[..units * per_unit]);
    team.run(tasks, &|t| {
        let (u0, u1) = (t * per, ((t + 1) * per).min(units));
        // Built in a local, then moved into the task's own part of the result while it is still in
        // cache: the parts used to be appended one after another on the engine thread while the team
        // waited (with the result's growth, ~2% of a 256-token prefill). The local is not the result's
        // part itself because `f` appends to a `Vec`.
        let mut mine = Vec::with_capacity((u1 - u0) * per_unit);
        f(&x[u0 * unit..u1 * unit], &mut mine);
        assert_eq!(
            mine.len(),
            (u1 - u0) * per_unit,
            "{} units made {} items, not {per_unit} each",
            u1 - u0,
            mine.len()
        );
        // SAFETY: task `t` alone gets units u0..u1's items.
        let part = unsafe { slots.range(u0 * per_unit..u1 * per_unit) };
        for (slot, item) in part.iter_mut().zip(mine) {
            slot.write(item);
        }
    });
    // SAFETY: the tasks cover units 0..units and each wrote its `per_unit` items a unit (asserted);
    // the region is over. A task that panicked left the length at zero.
    unsafe { out.set_len(units * per_unit) };
    out
}

/// Any block type candle knows, dotted with candle's own `vec_dot`, tiled and threaded here.
pub(crate) struct Blocks<T: GgmlType> {
    n: usize,
    kb: usize,
    w: Vec<T>,
}

impl<T: GgmlType> Blocks<T> {
    fn from_qtensor(t: &QTensor) -> Result<Self> {
        let (n, k) = t.shape().dims2()?;
        if k % T::BLCK_SIZE != 0 {
            bail!("{:?} rows of {k} values are not whole blocks of {}", T::DTYPE, T::BLCK_SIZE);
        }
        let kb = k / T::BLCK_SIZE;
        let data = t.data()?;
        let size = std::mem::size_of::<T>();
        if data.len() != n * kb * size {
            bail!("{:?} data of {} bytes for a {n}x{k} matrix", T::DTYPE, data.len());
        }
        let mut w: Vec<T> = Vec::with_capacity(n * kb);
        // SAFETY: ggml block types are plain `repr(C)` structs of integers and halves, valid for any bytes;
        // exactly `n * kb` of them are copied into the reserved capacity before the length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), w.as_mut_ptr() as *mut u8, data.len());
            w.set_len(n * kb);
        }
        Ok(Self { n, kb, w })
    }
}

impl<T: GgmlType> Kernel for Blocks<T> {
    type Act = Vec<T::VecDotType>;

    fn out_features(&self) -> usize {
        self.n
    }

    fn in_features(&self) -> usize {
        self.kb * T::BLCK_SIZE
    }

    fn quantize(&self, x: &[f32], rows: usize) -> Self::Act {
        let kb = self.kb * T::BLCK_SIZE / T::VecDotType::BLCK_SIZE;
        let k = self.in_features();
        debug_assert_eq!(x.len(), rows * k);
        par_map_units(x, k, kb, |xs, out| {
            for xs in xs.chunks_exact(k) {
                let start = out.len();
                out.resize(start + kb, T::VecDotType::zeros());
                if T::VecDotType::DIRECT_COPY {
                    T::VecDotType::direct_copy(xs, &mut out[start..]);
                } else {
                    T::VecDotType::from_float(xs, &mut out[start..]);
                }
            }
        })
    }

    fn columns(&self, act: &Self::Act, rows: usize, cols: Range<usize>, out: &Out) {
        let (k, kb) = (self.in_features(), self.kb);
        let akb = act.len() / rows.max(1);
        for c in cols {
            let wc = &self.w[c * kb..(c + 1) * kb];
            for r in 0..rows {
                // SAFETY: `c` is in this task's `cols`.
                unsafe { out.set(r, c, T::vec_dot(k, wc, &act[r * akb..(r + 1) * akb])) };
            }
        }
    }
}

/// Rows of a block matrix, dequantized one at a time (what [`QRows`] holds, whatever the type).
trait RowSource: Send + Sync {
    fn push_row(&self, r: usize, out: &mut Vec<f32>);
}

impl<T: GgmlType> RowSource for Blocks<T> {
    fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + self.kb * T::BLCK_SIZE, 0.0);
        T::to_float(&self.w[r * self.kb..(r + 1) * self.kb], &mut out[start..]);
    }
}

/// A GGUF matrix kept in its own blocks and dequantized a row at a time: a token embedding. Gemma 3's
/// is 262,144 x 640; dequantized whole it would take 671 MB, in Q8_0 178 MB.
pub struct QRows(Box<dyn RowSource>);

impl QRows {
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        fn boxed<T: GgmlType + 'static>(t: &QTensor) -> Result<Box<dyn RowSource>> {
            Ok(Box::new(Blocks::<T>::from_qtensor(t)?))
        }
        Ok(Self(match t.dtype() {
            GgmlDType::Q4_0 => boxed::<BlockQ4_0>(t)?,
            GgmlDType::Q4_1 => boxed::<candle_core::quantized::k_quants::BlockQ4_1>(t)?,
            GgmlDType::Q5_0 => boxed::<BlockQ5_0>(t)?,
            GgmlDType::Q5_1 => boxed::<BlockQ5_1>(t)?,
            GgmlDType::Q8_0 => boxed::<BlockQ8_0>(t)?,
            GgmlDType::Q2K => boxed::<BlockQ2K>(t)?,
            GgmlDType::Q3K => boxed::<BlockQ3K>(t)?,
            GgmlDType::Q4K => boxed::<BlockQ4K>(t)?,
            GgmlDType::Q5K => boxed::<BlockQ5K>(t)?,
            GgmlDType::Q6K => boxed::<BlockQ6K>(t)?,
            GgmlDType::F16 => boxed::<f16>(t)?,
            GgmlDType::BF16 => boxed::<bf16>(t)?,
            GgmlDType::F32 => boxed::<f32>(t)?,
            other => bail!("no row lookup for {other:?} weights"),
        }))
    }

    /// Appends row `r` (`k` values) to `out`; the caller checks `r`.
    pub fn push_row(&self, r: usize, out: &mut Vec<f32>) {
        self.0.push_row(r, out)
    }
}

/// A GGUF weight matrix `[n, k]` ready for `x @ w.T` on the CPU.
pub struct QMatrix(Inner);

enum Inner {
    Q4_1(Q4_1Matrix),
    Q4_0Own(Q8Matrix<[u8; 16]>),
    Q8_0Own(Q8Matrix<[i8; 32]>),
    Q5_0Own(Q8Matrix<[u32; 5]>),
    Q4KOwn(KMatrix<kquant::Q4K>),
    Q5KOwn(KMatrix<kquant::Q5K>),
    Q6KOwn(KMatrix<kquant::Q6K>),
    Q4_0(Blocks<BlockQ4_0>),
    Q5_0(Blocks<BlockQ5_0>),
    Q5_1(Blocks<BlockQ5_1>),
    Q8_0(Blocks<BlockQ8_0>),
    Q2K(Blocks<BlockQ2K>),
    Q3K(Blocks<BlockQ3K>),
    Q4K(Blocks<BlockQ4K>),
    Q5K(Blocks<BlockQ5K>),
    Q6K(Blocks<BlockQ6K>),
    Q8K(Blocks<BlockQ8K>),
    F16(Blocks<f16>),
    BF16(Blocks<bf16>),
    F32(Blocks<f32>),
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match &$self.0 {
            Inner::Q4_1($m) => $e,
            Inner::Q4_0Own($m) => $e,
            Inner::Q8_0Own($m) => $e,
            Inner::Q5_0Own($m) => $e,
            Inner::Q4KOwn($m) => $e,
            Inner::Q5KOwn($m) => $e,
            Inner::Q6KOwn($m) => $e,
            Inner::Q4_0($m) => $e,
            Inner::Q5_0($m) => $e,
            Inner::Q5_1($m) => $e,
            Inner::Q8_0($m) => $e,
            Inner::Q2K($m) => $e,
            Inner::Q3K($m) => $e,
            Inner::Q4K($m) => $e,
            Inner::Q5K($m) => $e,
            Inner::Q6K($m) => $e,
            Inner::Q8K($m) => $e,
            Inner::F16($m) => $e,
            Inner::BF16($m) => $e,
            Inner::F32($m) => $e,
        }
    };
}

impl QMatrix {
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        Ok(Self(match t.dtype() {
            GgmlDType::Q4_1 => Inner::Q4_1(Q4_1Matrix::from_qtensor(t)?),
            GgmlDType::Q4_0 if q8_0::supported() => Inner::Q4_0Own(Q8Matrix::from_qtensor(t)?),
            GgmlDType::Q8_0 if q8_0::supported() => Inner::Q8_0Own(Q8Matrix::from_qtensor(t)?),
            GgmlDType::Q5_0 if q8_0::supported() => Inner::Q5_0Own(Q8Matrix::from_qtensor(t)?),
            GgmlDType::Q4K if kquant::supported() => Inner::Q4KOwn(KMatrix::from_qtensor(t)?),
            GgmlDType::Q5K if kquant::supported() => Inner::Q5KOwn(KMatrix::from_qtensor(t)?),
            GgmlDType::Q6K if kquant::supported() => Inner::Q6KOwn(KMatrix::from_qtensor(t)?),
            GgmlDType::Q4_0 => Inner::Q4_0(Blocks::from_qtensor(t)?),
            GgmlDType::Q5_0 => Inner::Q5_0(Blocks::from_qtensor(t)?),
            GgmlDType::Q5_1 => Inner::Q5_1(Blocks::from_qtensor(t)?),
            GgmlDType::Q8_0 => Inner::Q8_0(Blocks::from_qtensor(t)?),
            GgmlDType::Q2K => Inner::Q2K(Blocks::from_qtensor(t)?),
            GgmlDType::Q3K => Inner::Q3K(Blocks::from_qtensor(t)?),
            GgmlDType::Q4K => Inner::Q4K(Blocks::from_qtensor(t)?),
            GgmlDType::Q5K => Inner::Q5K(Blocks::from_qtensor(t)?),
            GgmlDType::Q6K => Inner::Q6K(Blocks::from_qtensor(t)?),
            GgmlDType::Q8K => Inner::Q8K(Blocks::from_qtensor(t)?),
            GgmlDType::F16 => Inner::F16(Blocks::from_qtensor(t)?),
            GgmlDType::BF16 => Inner::BF16(Blocks::from_qtensor(t)?),
            GgmlDType::F32 => Inner::F32(Blocks::from_qtensor(t)?),
            other => bail!("no CPU kernel for {other:?} weights"),
        }))
    }

    pub fn out_features(&self) -> usize {
        each!(self, m => m.out_features())
    }

    /// `x` is `[rows, k]` row-major; returns `[rows, n]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        each!(self, m => matmul(m, x, rows))
    }

    /// [`QMatrix::forward`] of `parts.iter().sum()` rows, returned as one buffer per part (the first
    /// `parts[0]` rows, then the next `parts[1]`, ...): the same bits, without copying the parts out.
    pub fn forward_parts(&self, x: &[f32], parts: &[usize]) -> Vec<Vec<f32>> {
        each!(self, m => matmul_parts(m, x, parts))
    }

    /// Each matrix's `forward` of the same `x` (Q, K and V; gate and up). Matrices of one weight type,
    /// the usual case, share one quantization of `x` and one parallel region: a decode step had
    /// quantized each layer's input five times and paid for five regions, two of them only 192 columns
    /// wide. Every result is the bits its own `forward` gives (the same activation blocks, the same
    /// kernel per column).
    pub fn forward_many(mats: &[&QMatrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
        macro_rules! same_type {
            ($($v:ident),*) => {
                match &mats.first().map(|m| &m.0) {
                    $(Some(Inner::$v(_)) => mats
                        .iter()
                        .map(|m| if let Inner::$v(k) = &m.0 { Some(k) } else { None })
                        .collect::<Option<Vec<_>>>()
                        .map(|ks| matmul_many(&ks, x, rows)),)*
                    None => Some(Vec::new()),
                }
            };
        }
        let shared = same_type!(
            Q4_1, Q4_0Own, Q8_0Own, Q5_0Own, Q4KOwn, Q5KOwn, Q6KOwn, Q4_0, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
            Q8K, F16, BF16, F32
        );
        shared.unwrap_or_else(|| mats.iter().map(|m| m.forward(x, rows)).collect())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    use super::*;

    #[test]
    fn f16_round_is_half_s_conversion() {
        let check = |x: f32| {
            let want = f16::from_f32(x).to_f32();
            let got = f16_round(x);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{x:e}: {got:e} vs {want:e}");
        };
        // A stride through every bit pattern, then the edges: f16's subnormal, normal and overflow limits
        // and the values either side of them.
        (0..=u32::MAX / 7919).for_each(|i| check(f32::from_bits(i * 7919)));
        for e in [5.960_464_5e-8, 6.103_515_6e-5, 65504.0, 65519.0, 65520.0, 65536.0, 1.0, 0.0] {
            for d in -3i32..=3 {
                let x = f32::from_bits((e as f32).to_bits().wrapping_add_signed(d));
                check(x);
                check(-x);
            }
        }
        // Exact ties in both ranges: 1 + 2^-11 (to even: 1), 1 + 3 * 2^-11 (to even: up), 2^-25 (to 0).
        for x in [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 2f32.powi(-25), 3.0 * 2f32.powi(-25)] {
            check(x);
        }
    }

    /// Every weight type GGUF files carry that has a kernel here.
    const TYPES: [GgmlDType; 12] = [
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ];

    /// Every weight type against candle's `QMatMul`, on shapes that are not multiples of the column chunk,
    /// of the four-row group, or of the thread count. The output is poisoned, so a skipped element fails.
    #[test]
    fn every_weight_type_matches_candles_qmatmul() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            // Our K-quant kernels answer to the exact product of their quantized operands instead
            // (`kquant::tests`): their Q8_K activations round ties to even as ggml does (candle's away
            // from zero), and candle's Q6_K AVX2 dot is itself off when a scale is -128.
            if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) && kquant::supported() {
                continue;
            }
            let block = dtype.block_size();
            // Even block counts: candle's own debug build asserts them for some types.
            for (rows, n, blocks) in [(1, 33, 2), (3, 300, 4), (17, 129, 2), (5, 7, 2), (6, 40, 6), (64, 50, 2)] {
                let k = blocks * block.max(32);
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
                let want = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap())
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let m = QMatrix::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap();
                let got = m.forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), rows);
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
                // candle multiplies F16 weights in f16 (rounding its output); every other type in f32.
                let tol = if dtype == GgmlDType::F16 { 2e-3 } else { 1e-5 };
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= tol * scale, "{dtype:?} rows {rows} n {n} k {k} [{i}]: {g} vs candle {w}");
                }
            }
        }
    }

    /// A row looked up in its blocks is the whole matrix's dequantization, row for row.
    /// A product returned in parts (each sequence's logits) is the whole product's rows, bit for bit,
    /// for every weight type and parts of one row and of several, with a padded last group.
    #[test]
    fn a_product_in_parts_is_the_whole_product() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            let (n, k) = (45, 2 * dtype.block_size().max(32));
            let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(), dtype).unwrap();
            let m = QMatrix::from_qtensor(&q).unwrap();
            let parts = [1, 3, 1, 5, 2];
            let rows: usize = parts.iter().sum();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let whole = m.forward(&x, rows);
            let got = m.forward_parts(&x, &parts);
            assert_eq!(got.len(), parts.len());
            let mut first = 0;
            for (part, &p) in got.iter().zip(&parts) {
                let want = &whole[first * n..(first + p) * n];
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(part), bits(want), "{dtype:?} rows {first}..{}", first + p);
                first += p;
            }
        }
    }

    #[test]
    fn rows_dequantize_as_the_whole_matrix_does() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            let (n, k) = (5, 2 * dtype.block_size().max(32));
            let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(), dtype).unwrap();
            let whole = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rows = QRows::from_qtensor(&q).unwrap();
            let mut got = Vec::new();
            for r in [3, 0, 4] {
                rows.push_row(r, &mut got);
            }
            let want: Vec<f32> = [3, 0, 4].iter().flat_map(|&r| whole[r * k..(r + 1) * k].to_vec()).collect();
            assert!(got == want, "{dtype:?}");
        }
    }

    /// llama.cpp's bar for MUL_MAT (`test-backend-ops`): the normalised mean squared error against an
    /// f64 product of the dequantized weights stays within 5e-4, on random weights and activations of
    /// many shapes (odd row and column counts, one and many blocks), on every SIMD path this CPU runs
    /// (scripts/test reruns it under OMNIBUS_CPU_FEATURES). Every element must be finite: a skipped one
    /// would keep the allocator's bytes or NaN.
    #[test]
    fn every_weight_type_is_within_llama_cpp_s_mul_mat_nmse() {
        let dev = Device::Cpu;
        for dtype in TYPES {
            let block = dtype.block_size().max(32);
            // At least 31 outputs each: NMSE is a statistic over the output, as test-backend-ops takes it
            // (one dot product alone can cancel to near zero, and its relative error mean nothing).
            for (rows, n, blocks) in [(1, 97, 2), (2, 31, 4), (7, 65, 2), (16, 33, 6), (33, 5, 2), (9, 255, 8)] {
                let k = blocks * block;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let x =
                    Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let deq = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = QMatrix::from_qtensor(&q).unwrap().forward(&x, rows);
                assert_eq!(got.len(), rows * n);
                let (mut err, mut norm) = (0f64, 0f64);
                for r in 0..rows {
                    for c in 0..n {
                        let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * deq[c * k + j] as f64).sum();
                        let g = got[r * n + c];
                        assert!(g.is_finite(), "{dtype:?} rows {rows} n {n} k {k} [{r},{c}]: {g}");
                        err += (g as f64 - want).powi(2);
                        norm += want * want;
                    }
                }
                let nmse = err / norm.max(f64::MIN_POSITIVE);
                assert!(nmse <= 5e-4, "{dtype:?} rows {rows} n {n} k {k}: NMSE {nmse:e}");
            }
        }
    }
}
