//! f32 matrix products for the encoder: `x @ W^T + b` (then GELU, or plus a residual) on weights
//! packed once at load into panels of [`NR`] output columns, spread over the compute team.
//!
//! Every output element is one fused multiply-add chain over `k` in order, from zero, then the bias
//! (and the residual) added, then the activation. No tile size, thread count or batch changes that
//! order, so a sentence's vectors are bit-identical alone or in any batch; AVX-512 and AVX2 give the
//! same bits too, and so does the portable path on arm64 (`f32::mul_add` is one instruction there).
//! The portable path on x86-64 (a CPU without AVX2 and FMA) multiplies and adds apart instead: a fused
//! multiply-add without the instruction is a libm call per element, a hundred times slower.
//!
//! The tiling is the textbook one (BLIS, OpenBLAS): a micro-kernel keeps an `MR x 16` block of outputs
//! in registers while it streams one packed weight panel (`k x 16`, contiguous) and `MR` activation
//! rows; a task owns a chunk of rows (which stays in L2) times a run of panels.
use std::ops::Range;

use super::cpu;
use super::ops;
use super::team::Team;

/// Output columns per packed panel: two AVX2 registers, one AVX-512 register.
pub const NR: usize = 16;
/// Most rows any micro-kernel keeps in registers (AVX-512: 12 zmm accumulators).
const MR_MAX: usize = 12;
/// A task's rows of activations are sized to stay in L2 while its panels stream past them.
const ROW_CHUNK_BYTES: usize = 192 * 1024;
/// Depth of one pass over a panel: 192 x 16 weights (12 KiB) stay in L1 beside the rows' activations
/// while every row block of the task goes through them. Sums carry over from one pass to the next
/// through the tile, exactly (an f32 stored and reloaded is the same f32), so the FMA chain per
/// element is unchanged.
const KC: usize = 192;

/// What happens to `x @ W^T` before it is stored.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `+ b`.
    Bias,
    /// `gelu(. + b)`, exact (erf) GELU.
    BiasGelu,
    /// `. + b + residual`, with `residual` shaped like the output.
    BiasResidual(&'a [f32]),
}

/// One layer of a [`Dense::stacked`] product: its `[n, k]` weight, `n`, and its bias.
pub type Part<'a> = (&'a [f32], usize, Option<&'a [f32]>);

/// A linear layer's weights, packed for [`Dense::forward`].
pub struct Dense {
    n: usize,
    k: usize,
    /// `n.div_ceil(NR)` panels of `k x NR` values (panel `p`, row `kk`, lane `j` is `W[p * NR + j][kk]`);
    /// the last panel's missing columns are zero.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    /// From PyTorch's `nn.Linear` layout: `w` is `[n, k]` (row `c` makes output column `c`).
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        Self::stacked(&[(w, n, bias)], k)
    }

    /// Several layers reading the same input, side by side in one product (the fused Q, K, V
    /// projections): output columns are the parts' columns in order.
    pub fn stacked(parts: &[Part<'_>], k: usize) -> Self {
        let n: usize = parts.iter().map(|p| p.1).sum();
        let mut rows: Vec<&[f32]> = Vec::with_capacity(n);
        let mut bias = Vec::with_capacity(n);
        for &(w, pn, b) in parts {
            assert_eq!(w.len(), pn * k, "weight of {} values for {pn} x {k}", w.len());
            rows.extend(w.chunks_exact(k));
            match b {
                Some(b) => {
                    assert_eq!(b.len(), pn, "bias of {} values for {pn} columns", b.len());
                    bias.extend_from_slice(b);
                }
                None => bias.extend(std::iter::repeat_n(0.0, pn)),
            }
        }
        let np = n.div_ceil(NR);
        let mut panels = vec![0f32; np * k * NR];
        for (c, row) in rows.iter().enumerate() {
            let (p, j) = (c / NR, c % NR);
            for (kk, &v) in row.iter().enumerate() {
                panels[(p * k + kk) * NR + j] = v;
            }
        }
        Self { n, k, panels, bias }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `x` is `[rows, k]` row-major; returns `[rows, n]`.
    pub fn forward(&self, x: &[f32], rows: usize, epilogue: Epilogue<'_>) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), rows * k, "activations are {} values, expected {rows} x {k}", x.len());
        if let Epilogue::BiasResidual(r) = epilogue {
            assert_eq!(r.len(), rows * n, "residual of {} values, expected {rows} x {n}", r.len());
        }
        // Poisoned: an element no task wrote stays NaN and fails every comparison downstream.
        let mut out = vec![f32::NAN; rows * n];
        if rows == 0 {
            return out;
        }
        let path = Path::current();
        let mr = path.mr();
        let panels = n.div_ceil(NR);
        let team = Team::global();
        let row_chunk = ((ROW_CHUNK_BYTES / (4 * k).max(1)) / mr).max(1) * mr;
        let row_chunks = rows.div_ceil(row_chunk);
        // Enough tasks that a slow thread does not hold the region, few enough to amortise a panel.
        let col_chunks = (team.threads() * 4).div_ceil(row_chunks).clamp(1, panels);
        let per_task = panels.div_ceil(col_chunks);
        let col_chunks = panels.div_ceil(per_task);
        let job = Job { w: self, x, rows, out: super::qmatmul::Out::new(&mut out, rows, n), epilogue, mr };
        team.run(row_chunks * col_chunks, &|t| {
            let (rc, cc) = (t / col_chunks, t % col_chunks);
            let rows = rc * row_chunk..((rc + 1) * row_chunk).min(rows);
            let panels = cc * per_task..((cc + 1) * per_task).min(panels);
            path.task(&job, rows, panels);
        });
        out
    }
}

/// A small right-hand matrix `B` (`k x n`) packed into panels for [`local`]: panel `p`, row `kk`, lane
/// `j` is `B[kk][p * NR + j]`; missing columns are zero.
pub(crate) struct Packed {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

pub(crate) fn pack(k: usize, n: usize, b: impl Fn(usize, usize) -> f32) -> Packed {
    let mut data = vec![0f32; n.div_ceil(NR) * k * NR];
    for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
        for (kk, lanes) in panel.chunks_exact_mut(NR).enumerate() {
            for (j, v) in lanes.iter_mut().enumerate().take(n.saturating_sub(p * NR)) {
                *v = b(kk, p * NR + j);
            }
        }
    }
    Packed { data, k, n }
}

/// `rows` rows of a left-hand matrix, `lda` apart.
pub(crate) struct Rows<'a> {
    pub a: &'a [f32],
    pub lda: usize,
    pub rows: usize,
}

/// `out[r * ldo + c] = sum over kk of a[r * lda + kk] * B[kk][c]` for every row `r` and `c < n`, on the
/// calling thread (for products too small to share, such as one attention head's). The same
/// micro-kernels and the same FMA chain per element as [`Dense::forward`], without bias or epilogue.
pub(crate) fn local(lhs: Rows<'_>, b: &Packed, out: &mut [f32], ldo: usize) {
    let Rows { a, lda, rows } = lhs;
    assert!(a.len() >= a_extent(rows, b.k, lda, 1), "a holds {} values", a.len());
    assert!(rows == 0 || out.len() >= (rows - 1) * ldo + b.n, "out holds {} values", out.len());
    let job = Local { a, lda, rows, b: &b.data, k: b.k, n: b.n };
    match Path::current() {
        Path::Portable => local_body::<Portable>(&job, Path::Portable.mr(), out, ldo),
        // SAFETY: `current` picks these only when the CPU has the features they are compiled for.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => unsafe { x86::local_avx2(&job, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => unsafe { x86::local_avx512(&job, out, ldo) },
    }
}

struct Local<'a> {
    a: &'a [f32],
    lda: usize,
    rows: usize,
    b: &'a [f32],
    k: usize,
    n: usize,
}

#[inline(always)]
fn local_body<M: Micro>(job: &Local<'_>, mr: usize, out: &mut [f32], ldo: usize) {
    let (k, n) = (job.k, job.n);
    let mut tile = [[0f32; NR]; MR_MAX];
    for p in 0..n.div_ceil(NR) {
        let panel = &job.b[p * k * NR..(p + 1) * k * NR];
        let (c0, width) = (p * NR, (n - p * NR).min(NR));
        for r0 in (0..job.rows).step_by(mr) {
            let count = (job.rows - r0).min(mr);
            for k0 in (0..k).step_by(KC) {
                let kc = (k - k0).min(KC);
                // SAFETY: `local` checked that rows r0..r0 + count of `a` hold k values each; the panel
                // slice is whole; count <= mr <= MR_MAX; the caller picked `M` for this CPU.
                unsafe {
                    M::micro(
                        &job.a[r0 * job.lda + k0..],
                        job.lda,
                        1,
                        count,
                        &panel[k0 * NR..(k0 + kc) * NR],
                        kc,
                        &mut tile,
                        k0 > 0,
                    )
                };
            }
            if k == 0 {
                tile.iter_mut().for_each(|t| *t = [0.0; NR]);
            }
            for (i, t) in tile.iter().enumerate().take(count) {
                let o = (r0 + i) * ldo + c0;
                out[o..o + width].copy_from_slice(&t[..width]);
            }
        }
    }
}

/// One product as its tasks see it.
struct Job<'a> {
    w: &'a Dense,
    x: &'a [f32],
    rows: usize,
    out: super::qmatmul::Out,
    epilogue: Epilogue<'a>,
    mr: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    fn current() -> Self {
        let f = cpu::features();
        #[cfg(target_arch = "x86_64")]
        {
            if f.avx512f {
                return Self::Avx512;
            }
            if f.avx2_fma {
                return Self::Avx2;
            }
        }
        let _ = f;
        Self::Portable
    }

    /// Rows per micro-kernel call: as many accumulators as the registers hold with room for the panel.
    fn mr(self) -> usize {
        match self {
            Self::Portable => 4,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 6,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => 12,
        }
    }

    fn task(self, job: &Job<'_>, rows: Range<usize>, panels: Range<usize>) {
        match self {
            Self::Portable => task::<Portable>(job, rows, panels),
            // SAFETY: `current` picks these only when the CPU has the features they are compiled for.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::task_avx2(job, rows, panels) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::task_avx512(job, rows, panels) },
        }
    }
}

/// A micro-kernel: `tile[i][j] = sum over kk of a[i * rs + kk * ks] * panel[kk * NR + j]` for `i < rows`,
/// one FMA chain per element in `kk` order, continuing the chain already in `tile` when `carry`. Rows
/// as they lie (`rs` = the row length, `ks` = 1) or packed (`rs` = 1, `ks` = the block's rows).
trait Micro {
    /// # Safety
    /// `a` holds every `a[i * rs + kk * ks]` read; `panel` holds `k * NR` values; `rows <= MR_MAX` and
    /// `tile` has that many rows; the CPU has the implementation's features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        a: &[f32],
        rs: usize,
        ks: usize,
        rows: usize,
        panel: &[f32],
        k: usize,
        tile: &mut [[f32; NR]],
        carry: bool,
    );
}

/// The length `a` needs for `rows` rows of depth `k` at strides `rs`, `ks`.
#[inline(always)]
fn a_extent(rows: usize, k: usize, rs: usize, ks: usize) -> usize {
    if rows == 0 || k == 0 { 0 } else { (rows - 1) * rs + (k - 1) * ks + 1 }
}

struct Portable;

impl Micro for Portable {
    unsafe fn micro(
        a: &[f32],
        rs: usize,
        ks: usize,
        rows: usize,
        panel: &[f32],
        k: usize,
        tile: &mut [[f32; NR]],
        carry: bool,
    ) {
        for (i, t) in tile.iter_mut().enumerate().take(rows) {
            let mut acc = if carry { *t } else { [0f32; NR] };
            for kk in 0..k {
                let av = a[i * rs + kk * ks];
                let b = &panel[kk * NR..kk * NR + NR];
                for j in 0..NR {
                    acc[j] = ops::madd::<{ ops::PORTABLE_FUSED }>(av, b[j], acc[j]);
                }
            }
            *t = acc;
        }
    }
}

/// The body of every task, inlined into each path's `target_feature` function so that the epilogue
/// (GELU's polynomial) is compiled for the same features as the micro-kernel.
#[inline(always)]
fn task<M: Micro>(job: &Job<'_>, rows: Range<usize>, panels: Range<usize>) {
    let (k, n, mr) = (job.w.k, job.w.n, job.mr);
    assert!(rows.end <= job.rows);
    // The task's rows packed in blocks of `mr`, depth-major (block b, depth kk, row i at
    // (b * k + kk) * mr + i; rows past the end are zero): the micro-kernel then reads one contiguous
    // stream instead of `mr` strided ones, and the packed chunk stays in L2 while every panel passes.
    let blocks = rows.len().div_ceil(mr);
    let mut packed = vec![0f32; blocks * k * mr];
    for (b, block) in packed.chunks_exact_mut(k * mr).enumerate() {
        for i in 0..mr.min(rows.len() - b * mr) {
            let src = &job.x[(rows.start + b * mr + i) * k..][..k];
            for (kk, &v) in src.iter().enumerate() {
                block[kk * mr + i] = v;
            }
        }
    }
    // The running sums of every row of the task against the current panel, carried across depth passes.
    let mut sums = vec![[0f32; NR]; blocks * mr];
    let mut vals = [0f32; NR];
    for p in panels {
        let panel = &job.w.panels[p * k * NR..(p + 1) * k * NR];
        for k0 in (0..k).step_by(KC) {
            let kc = (k - k0).min(KC);
            for (b, tile) in sums.chunks_exact_mut(mr).enumerate() {
                // SAFETY: block b holds k x mr values; the panel slice is whole; mr <= MR_MAX rows of the
                // tile; the caller picked `M` for this CPU.
                unsafe {
                    M::micro(&packed[(b * k + k0) * mr..], 1, mr, mr, &panel[k0 * NR..(k0 + kc) * NR], kc, tile, k0 > 0)
                };
            }
        }
        let sums = &sums[..rows.len()];
        let c0 = p * NR;
        let width = (n - c0).min(NR);
        let bias = &job.w.bias[c0..c0 + width];
        for (i, t) in sums.iter().enumerate() {
            let r = rows.start + i;
            let v = &mut vals[..width];
            for ((o, &s), &b) in v.iter_mut().zip(t.iter()).zip(bias) {
                *o = s + b;
            }
            match job.epilogue {
                Epilogue::Bias => {}
                Epilogue::BiasGelu => ops::gelu_in_place(v),
                Epilogue::BiasResidual(res) => {
                    for (o, &x) in v.iter_mut().zip(&res[r * n + c0..r * n + c0 + width]) {
                        *o += x;
                    }
                }
            }
            // SAFETY: this task owns panel `p`'s columns for its rows.
            unsafe { job.out.set_span(r, c0, v) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Job, Local, MR_MAX, Micro, NR, a_extent, local_body, task};

    pub struct Avx2;
    pub struct Avx512;

    /// Calls `$f::<R>` with the row count as a constant, so every count keeps its accumulators in
    /// registers.
    macro_rules! by_count {
        ($f:ident, $rows:expr, $($arg:expr),*) => {
            match $rows {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                4 => $f::<4>($($arg),*),
                5 => $f::<5>($($arg),*),
                6 => $f::<6>($($arg),*),
                7 => $f::<7>($($arg),*),
                8 => $f::<8>($($arg),*),
                9 => $f::<9>($($arg),*),
                10 => $f::<10>($($arg),*),
                11 => $f::<11>($($arg),*),
                12 => $f::<12>($($arg),*),
                _ => unreachable!("at most {MR_MAX} rows"),
            }
        };
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro_avx2<const R: usize>(
        a: &[f32],
        rs: usize,
        ks: usize,
        panel: &[f32],
        k: usize,
        tile: &mut [[f32; NR]],
        carry: bool,
    ) {
        assert!(R <= 6 && tile.len() >= R && a.len() >= a_extent(R, k, rs, ks) && panel.len() >= k * NR);
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: every read is within the lengths checked above; loads and stores of the tile stay in
        // its first R rows.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            if carry {
                for i in 0..R {
                    lo[i] = _mm256_loadu_ps(tile[i].as_ptr());
                    hi[i] = _mm256_loadu_ps(tile[i].as_ptr().add(8));
                }
            }
            for kk in 0..k {
                let b0 = _mm256_loadu_ps(b.add(kk * NR));
                let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
                for i in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(i * rs + kk * ks));
                    lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(tile[i].as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(tile[i].as_mut_ptr().add(8), hi[i]);
            }
        }
    }

    impl Micro for Avx2 {
        #[inline(always)]
        unsafe fn micro(
            a: &[f32],
            rs: usize,
            ks: usize,
            rows: usize,
            panel: &[f32],
            k: usize,
            tile: &mut [[f32; NR]],
            carry: bool,
        ) {
            // SAFETY: the caller's promise (AVX2 and FMA; rows <= 6 on this path).
            unsafe { by_count!(micro_avx2, rows, a, rs, ks, panel, k, tile, carry) }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn micro_avx512<const R: usize>(
        a: &[f32],
        rs: usize,
        ks: usize,
        panel: &[f32],
        k: usize,
        tile: &mut [[f32; NR]],
        carry: bool,
    ) {
        assert!(R <= MR_MAX && tile.len() >= R && a.len() >= a_extent(R, k, rs, ks) && panel.len() >= k * NR);
        let (a, b) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: every read is within the lengths checked above; loads and stores of the tile stay in
        // its first R rows.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            if carry {
                for (a, t) in acc.iter_mut().zip(tile.iter()) {
                    *a = _mm512_loadu_ps(t.as_ptr());
                }
            }
            for kk in 0..k {
                let bv = _mm512_loadu_ps(b.add(kk * NR));
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i * rs + kk * ks)), bv, *acc);
                }
            }
            for (t, acc) in tile.iter_mut().zip(acc) {
                _mm512_storeu_ps(t.as_mut_ptr(), acc);
            }
        }
    }

    impl Micro for Avx512 {
        #[inline(always)]
        unsafe fn micro(
            a: &[f32],
            rs: usize,
            ks: usize,
            rows: usize,
            panel: &[f32],
            k: usize,
            tile: &mut [[f32; NR]],
            carry: bool,
        ) {
            // SAFETY: the caller's promise (AVX-512 F).
            unsafe { by_count!(micro_avx512, rows, a, rs, ks, panel, k, tile, carry) }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn local_avx2(job: &Local<'_>, out: &mut [f32], ldo: usize) {
        local_body::<Avx2>(job, 6, out, ldo)
    }

    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn local_avx512(job: &Local<'_>, out: &mut [f32], ldo: usize) {
        local_body::<Avx512>(job, MR_MAX, out, ldo)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn task_avx2(job: &Job<'_>, rows: Range<usize>, panels: Range<usize>) {
        task::<Avx2>(job, rows, panels)
    }

    /// # Safety
    /// The CPU has AVX-512 F (and so AVX2 and FMA).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn task_avx512(job: &Job<'_>, rows: Range<usize>, panels: Range<usize>) {
        task::<Avx512>(job, rows, panels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The element-by-element definition: one multiply-add chain per element (fused on every path but
    /// x86's portable one), then bias, then the epilogue.
    fn reference(w: &[f32], b: &[f32], x: &[f32], rows: usize, n: usize, k: usize, epi: Epilogue<'_>) -> Vec<f32> {
        let fused = Path::current() != Path::Portable || ops::PORTABLE_FUSED;
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut acc = 0f32;
                for kk in 0..k {
                    let (a, wv) = (x[r * k + kk], w[c * k + kk]);
                    acc = if fused { a.mul_add(wv, acc) } else { a * wv + acc };
                }
                let mut v = [acc + b[c]];
                match epi {
                    Epilogue::Bias => {}
                    Epilogue::BiasGelu => ops::gelu_in_place(&mut v),
                    Epilogue::BiasResidual(res) => v[0] += res[r * n + c],
                }
                out[r * n + c] = v[0];
            }
        }
        out
    }

    /// Bit-identical to the definition on every shape (odd sizes, partial panels, partial row blocks,
    /// several row chunks), for each epilogue, on whichever path `OMNIBUS_CPU_FEATURES` leaves (CI runs
    /// this once per path); and each row equals itself computed alone.
    #[test]
    fn every_shape_is_exact_and_rows_are_independent() {
        let mut seed = 7;
        for (rows, n, k) in [(1, 16, 8), (5, 33, 17), (13, 100, 64), (29, 1, 3), (300, 70, 384), (7, 1152, 384)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let res: Vec<f32> = (0..rows * n).map(|_| lcg(&mut seed)).collect();
            let d = Dense::new(&w, n, k, Some(&b));
            for epi in [Epilogue::Bias, Epilogue::BiasGelu, Epilogue::BiasResidual(&res)] {
                let got = d.forward(&x, rows, epi);
                let want = reference(&w, &b, &x, rows, n, k, epi);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{rows}x{n}x{k} [{i}]: {g} vs {w} ({:?})", Path::current());
                }
                let last = rows - 1;
                let res1;
                let epi1 = match epi {
                    Epilogue::BiasResidual(r) => {
                        res1 = r[last * n..].to_vec();
                        Epilogue::BiasResidual(&res1)
                    }
                    e => e,
                };
                let alone = d.forward(&x[last * k..], 1, epi1);
                assert_eq!(alone, got[last * n..], "{rows}x{n}x{k}: the last row alone");
            }
        }
    }

    /// The thread-local product gives the same bits as the shared one on the same numbers.
    #[test]
    fn local_products_equal_dense_ones() {
        let mut seed = 3;
        for (rows, n, k) in [(1, 1, 1), (7, 40, 32), (13, 32, 200), (40, 17, 33)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            let want = Dense::new(&w, n, k, None).forward(&x, rows, Epilogue::Bias);
            let b = pack(k, n, |kk, c| w[c * k + kk]);
            let ldo = n + 3;
            let mut got = vec![f32::NAN; rows * ldo];
            local(Rows { a: &x, lda: k, rows }, &b, &mut got, ldo);
            for r in 0..rows {
                assert_eq!(got[r * ldo..r * ldo + n], want[r * n..(r + 1) * n], "{rows}x{n}x{k} row {r}");
            }
        }
    }

    #[test]
    fn stacked_parts_are_side_by_side() {
        let (k, rows) = (5, 3);
        let a: Vec<f32> = (0..2 * k).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..3 * k).map(|i| -(i as f32)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32).collect();
        let fused = Dense::stacked(&[(&a, 2, Some(&[1.0, 2.0])), (&b, 3, None)], k).forward(&x, rows, Epilogue::Bias);
        let ya = Dense::new(&a, 2, k, Some(&[1.0, 2.0])).forward(&x, rows, Epilogue::Bias);
        let yb = Dense::new(&b, 3, k, None).forward(&x, rows, Epilogue::Bias);
        for r in 0..rows {
            assert_eq!(fused[r * 5..r * 5 + 2], ya[r * 2..r * 2 + 2]);
            assert_eq!(fused[r * 5 + 2..r * 5 + 5], yb[r * 3..r * 3 + 3]);
        }
    }
}
