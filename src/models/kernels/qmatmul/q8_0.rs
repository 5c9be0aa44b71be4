//! Q8_0, Q5_0 and Q4_0 weights against Q8_0 activations. The weights are repacked at load into groups of
//! eight columns (llama.cpp's "8x8" idea), so one `vpdpbusd` against four broadcast activation bytes
//! advances eight columns, and the f16 block scales are converted once at load. SmolLM2's output head
//! is Q8_0: 49152 columns, a fifth of every decode step.
//!
//! Numerics: Q8_0, Q4_0 and Q5_0 are ggml's portable `ggml_vec_dot_q8_0_q8_0` / `_q4_0_` / `_q5_0_`, bit
//! for bit, on both SIMD paths: each block's 32 products summed exactly as one integer, `sumf += sumi *
//! (d_w * d_x)` in f32 block after block. The SIMD paths sum a block's eight four-product lanes in i32 and
//! convert once per block (ggml's AVX2 build converts and multiplies-adds every lane and adds the lanes at
//! the end: eight times the float work, and a different float order, which the fidelity contract of
//! `tests/fidelity.rs` allows), so with one accumulator per row a run is four rows. Q5_0 kept ggml's lane
//! order until the lanes cost its kernel twice Q4_1's time; its blocks summed as integers moved Gemma 3's
//! mean KLD from 0.004378 to 0.004475, inside the bound of 0.004482, where llama.cpp's own f32 run batched
//! and one token at a time are 0.004115 apart.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the VNNI path feeds it the weights plus an offset
//! (128 for Q8_0; Q4_0's nibbles are their values plus 8) and starts each lane at `-offset * (its four
//! activations' sum)`, which the quantizer computes per block for the matrix's type; AVX2 uses ggml's
//! sign trick for Q8_0 and the same offset for Q4_0. Same integers either way.
//!
//! x86-64 only (AVX-512 VNNI or AVX2+FMA, chosen at run time); elsewhere, and on x86 CPUs without AVX2,
//! these types go through candle's per-block `vec_dot` (NEON on arm64).
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};

use super::{GROUP, Kernel, Out, interleaved};
use crate::models::kernels::cpu;

const QK: usize = 32;

/// Activation rows per run of the AVX2 kernel's tile: one unpacked weight vector serves four rows (two
/// registers per row: its block's integer sums and its f32 accumulator).
const RUN: usize = 4;

/// Rows per run of the AVX-512 VNNI kernel on packed weights: eight (two registers a row of their 32),
/// so a weight vector is unpacked once for eight rows, not twice: an eight-stream decode step is bound
/// by these instructions, not by the weights' bytes (kernel bench, 8 rows: Q8_0 31.9 -> 25.2 us). The
/// kernel on [`x86::Unpacked`] weights takes wider tiles instead ([`WIDE`], [`WIDE_RUN`]). A row's
/// arithmetic is the same either way, so are its bits.
const RUN_VNNI: usize = 8;

/// Columns per tile of the kernel on [`x86::Unpacked`] weights: two pairs of groups.
const WIDE: usize = 4 * GROUP;

/// Rows per run over a [`WIDE`] tile: 12 integer sums and 12 accumulators in registers, two weight
/// vectors per step. Kernel bench, Q5_0 1536x512 x 64 rows: 135 us with four, 130 with six.
const WIDE_RUN: usize = 6;

/// One block of activations quantized to Q8_0 (the f16 scale kept as the f32 it converts to), and the
/// offset correction of each lane: `-offset * (qs[4v] + .. + qs[4v + 3])` for the weight type's
/// [`Q8Weights::OFFSET`], and of the whole block (their sum), which the VNNI kernel starts a block's
/// integer sum at so that its eight `vpdpbusd` form one chain with no adds between them.
#[derive(Clone, Copy)]
pub struct Q8_0Block {
    qs: [i8; 32],
    d: f32,
    corr: [i32; 8],
    corr_all: i32,
}

/// Activations quantized to Q8_0, one row after another, as candle's `BlockQ8_0::from_float` does.
pub type Q8_0Rows = Vec<Q8_0Block>;

/// `f32::round` (half away from zero) without the libm call baseline x86-64 makes for it; exact for
/// the |v| <= 127.5 this is used on.
#[inline(always)]
pub(crate) fn round_half_away(v: f32) -> f32 {
    let t = v as i32 as f32;
    let diff = v - t;
    if diff.abs() >= 0.5 { t + 1f32.copysign(v) } else { t }
}

/// `offset` is the weight type's [`Q8Weights::OFFSET`], for the lane corrections.
pub fn quantize_q8_0(x: &[f32], offset: i32) -> Q8_0Rows {
    let simd = cpu::features().avx2_fma;
    super::par_map_units(x, QK, 1, |x, out| {
        out.reserve(x.len() / QK);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { quantize_q8_0_avx2(x, offset, out) };
        }
        let _ = simd;
        for xs in x.chunks_exact(QK) {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = round_half_away(v * id) as i8;
            }
            out.push(block(qs, d, offset));
        }
    })
}

/// A block of quantized values with its scale rounded to f16 and its offset corrections.
#[inline(always)]
fn block(qs: [i8; 32], d: f32, offset: i32) -> Q8_0Block {
    let corr: [i32; 8] = std::array::from_fn(|v| -offset * qs[4 * v..4 * v + 4].iter().map(|&q| q as i32).sum::<i32>());
    Q8_0Block { qs, d: super::f16_round(d), corr, corr_all: corr.iter().sum() }
}

/// [`quantize_q8_0`]'s blocks in a function compiled for AVX2, so that `quantize_block` and the
/// corrections inline and vectorize (from portable code they were a call per block and scalar sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_0_avx2(x: &[f32], offset: i32, out: &mut Vec<Q8_0Block>) {
    for xs in x.chunks_exact(QK) {
        // SAFETY: compiled for AVX2 and FMA; the chunk holds 32 values.
        let (qs, _, amax) = unsafe { super::x86::quantize_block(xs) };
        out.push(block(qs, amax / 127.0, offset));
    }
}

/// The weight blocks of one format: 32 signed values each, and a scale. `Self` names the format (its
/// GGUF block's values); the matrix holds [`Group8`]s of `Self::Packed`.
pub trait Q8Weights: Send + Sync + 'static {
    const DTYPE: GgmlDType;
    /// Bytes per block in the GGUF data (f16 scale first, then the values' bytes).
    const BYTES: usize;
    /// What makes the values unsigned bytes: 128 for Q8_0's i8; Q4_0's nibbles are their values plus 8.
    const OFFSET: i32;
    /// One block of eight columns, their value bytes interleaved (`super::interleaved`).
    type Packed: Copy + Send + Sync;
    const ZERO: Self::Packed;
    /// Writes column `c`'s block (its GGUF bytes after the f16 scale) into the group's block.
    fn pack(p: &mut Self::Packed, c: usize, bytes: &[u8]);
    /// Value `j` of the group's column `c`.
    #[cfg_attr(not(test), allow(dead_code))]
    fn value(p: &Self::Packed, c: usize, j: usize) -> i8;
}

impl Q8Weights for [i8; 32] {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BYTES: usize = 34;
    const OFFSET: i32 = 128;
    type Packed = [u8; 256];
    const ZERO: [u8; 256] = [0; 256];
    fn value(p: &[u8; 256], c: usize, j: usize) -> i8 {
        p[interleaved(c, j)] as i8
    }
    fn pack(p: &mut [u8; 256], c: usize, bytes: &[u8]) {
        for (j, &byte) in bytes.iter().enumerate() {
            p[interleaved(c, j)] = byte;
        }
    }
}

impl Q8Weights for [u8; 16] {
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BYTES: usize = 18;
    const OFFSET: i32 = 8;
    type Packed = [u8; 128];
    const ZERO: [u8; 128] = [0; 128];
    fn value(p: &[u8; 128], c: usize, j: usize) -> i8 {
        let byte = p[interleaved(c, j % 16)];
        (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i8 - 8
    }
    fn pack(p: &mut [u8; 128], c: usize, bytes: &[u8]) {
        for (j, &byte) in bytes.iter().enumerate() {
            p[interleaved(c, j)] = byte;
        }
    }
}

/// Q5_0's group block: the low four bits as Q4_0's, and the fifth bit of every value in one register's
/// worth of bytes: bit `v` of byte `c * 4 + j` is the fifth bit of column `c`'s value `4v + j`, so weight
/// vector `v` needs one shift and one mask.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q5Packed {
    nib: [u8; 128],
    hi: [u8; 32],
}

/// Q5_0: `[u32; 5]` stands for the format (qh and the 16 nibble bytes, after the f16 scale).
impl Q8Weights for [u32; 5] {
    const DTYPE: GgmlDType = GgmlDType::Q5_0;
    const BYTES: usize = 22;
    const OFFSET: i32 = 16;
    type Packed = Q5Packed;
    const ZERO: Q5Packed = Q5Packed { nib: [0; 128], hi: [0; 32] };
    fn value(p: &Q5Packed, c: usize, j: usize) -> i8 {
        let byte = p.nib[interleaved(c, j % 16)];
        let lo = if j < 16 { byte & 0x0F } else { byte >> 4 };
        let hi = (p.hi[c * 4 + j % 4] >> (j / 4)) & 1;
        (lo | hi << 4) as i8 - 16
    }
    /// ggml's block_q5_0 after `d`: qh (u32, bit `j` is value `j`'s fifth bit), then qs as Q4_0's.
    fn pack(p: &mut Q5Packed, c: usize, bytes: &[u8]) {
        let qh = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        for (j, &byte) in bytes[4..20].iter().enumerate() {
            p.nib[interleaved(c, j)] = byte;
        }
        for j in 0..32 {
            p.hi[c * 4 + j % 4] |= (((qh >> j) & 1) as u8) << (j / 4);
        }
    }
}

/// One block (32 values) of eight columns and their scales.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Group8<P> {
    qs: P,
    /// The file's f16 scale bits: the SIMD paths convert eight with one `vcvtph2ps` (exact). Kept as
    /// f32 they made a Q8_0 group 288 bytes instead of 272, 6% more to stream through a memory-bound
    /// output head (Gemma 3's is 262,144 x 640 Q8_0, 178 MB a token, over half of a decode step).
    d: [u16; GROUP],
}

#[cfg(test)]
impl<P> Group8<P> {
    fn d(&self, c: usize) -> f32 {
        half::f16::from_bits(self.d[c]).to_f32()
    }
}

/// A `[n, k]` matrix of Q8_0 (`W = [i8; 32]`), Q5_0 (`W = [u32; 5]`) or Q4_0 (`W = [u8; 16]`) blocks,
/// repacked.
pub struct Q8Matrix<W: Q8Weights> {
    n: usize,
    kb: usize,
    /// `n.div_ceil(8) * kb` blocks, group after group; the last group is padded with zero columns (d = 0)
    /// whose results are never written.
    groups: Vec<Group8<W::Packed>>,
}

impl<W: Q8Weights> Q8Matrix<W> {
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        // The kernels below are AVX2 code: building one is the promise that they can run here.
        if !supported() {
            bail!("omnibus's {:?} kernel needs x86-64 with AVX2 and FMA", W::DTYPE);
        }
        if t.dtype() != W::DTYPE {
            bail!("expected {:?} weights, got {:?}", W::DTYPE, t.dtype());
        }
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            bail!("{:?} rows of {k} values are not whole blocks", W::DTYPE);
        }
        let kb = k / QK;
        let data = t.data()?;
        if data.len() != n * kb * W::BYTES {
            bail!("{:?} data of {} bytes for a {n}x{k} matrix", W::DTYPE, data.len());
        }
        let mut groups = vec![Group8 { qs: W::ZERO, d: [0; GROUP] }; n.div_ceil(GROUP) * kb];
        for (i, block) in data.chunks_exact(W::BYTES).enumerate() {
            let (col, b) = (i / kb, i % kb);
            let (g, c) = (col / GROUP, col % GROUP);
            let dst = &mut groups[g * kb + b];
            dst.d[c] = u16::from_le_bytes([block[0], block[1]]);
            W::pack(&mut dst.qs, c, &block[2..]);
        }
        Ok(Self { n, kb, groups })
    }
}

/// Dots of one weight group with a run of activation rows: `tile[i][c]` for row `rows[i]` and the
/// group's column `c`.
type DotFn<P> = fn(&[Group8<P>], &Q8_0Rows, &[usize], &mut [[f32; GROUP]; RUN]);

/// Whether this CPU runs our kernels for these types (else the caller uses candle's).
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64") && cpu::features().avx2_fma
}

impl<W: Q8Weights + x86::Unpack> Kernel for Q8Matrix<W> {
    type Act = Q8_0Rows;

    fn out_features(&self) -> usize {
        self.n
    }

    fn in_features(&self) -> usize {
        self.kb * QK
    }

    fn quantize(&self, x: &[f32], _rows: usize) -> Q8_0Rows {
        quantize_q8_0(x, W::OFFSET)
    }

    fn columns(&self, q: &Q8_0Rows, rows: usize, cols: Range<usize>, out: &Out) {
        let kb = self.kb;
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx512_vnni {
            let (groups, blocks) = (self.n.div_ceil(GROUP), |g: usize| &self.groups[g * kb..(g + 1) * kb]);
            // A matrix's last group, when alone, stands in for its missing neighbour too: those 8 columns
            // are past `n` and never written out.
            // Up to two runs of eight straight from the packed blocks (a 16-row step served ~3% faster so
            // than as four runs of four on unpacked weights); from three runs up, unpacked once per tile.
            if rows <= super::UNPACK_ABOVE {
                super::column_tiles(rows, cols, out, |g, run, tile| {
                    x86::pair_vnni::<W>(blocks(g), blocks((g + 1).min(groups - 1)), q, run, tile)
                });
            } else {
                // Several runs of rows over each tile: unpack its weights once for all of them. Tiles of
                // 32 columns (two 512-bit weight vectors a step), so that each activation broadcast
                // feeds two `vpdpbusd`, not one: with 16 columns the kernel issued more loads than
                // products. A chunk's last 16 columns, when it has an odd number, are a tile alone.
                let mut unpacked = x86::Unpacked::default();
                let group = |g: usize| blocks(g.min(groups - 1));
                for rb in (0..rows).step_by(super::ROW_BLOCK) {
                    let re = (rb + super::ROW_BLOCK).min(rows);
                    for c0 in cols.clone().step_by(WIDE) {
                        let width = (cols.end - c0).min(WIDE);
                        let g = c0 / GROUP;
                        let pairs = if width > 2 * GROUP { 2 } else { 1 };
                        let tiles = [group(g), group(g + 1), group(g + 2), group(g + 3)];
                        // SAFETY: this CPU has AVX-512 VNNI (checked above); `c0..c0 + width` is within
                        // `cols`, this task's own columns.
                        unsafe { unpacked.wide_vnni::<W>((g, pairs), tiles, q, rb..re, (c0, width), out) };
                    }
                }
            }
            return;
        }
        let dot: DotFn<W::Packed> = x86::select::<W>();
        super::eight_column_tiles(rows, cols, out, |g, run, tile| {
            dot(&self.groups[g * kb..(g + 1) * kb], q, run, tile)
        });
    }
}

/// ggml's generic dot (integer block sums, one f32 multiply and add per block) per column, the order
/// every path keeps: the reference in tests.
#[cfg(test)]
fn dot_portable<W: Q8Weights>(wg: &[Group8<W::Packed>], q: &Q8_0Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
    let kb = wg.len();
    for (i, &r) in rows.iter().enumerate() {
        for (c, out) in tile[i].iter_mut().enumerate() {
            let mut sumf = 0f32;
            for (b, w) in wg.iter().enumerate() {
                let a = &q[r * kb + b];
                let sumi: i32 = (0..32).map(|j| W::value(&w.qs, c, j) as i32 * a.qs[j] as i32).sum();
                sumf += sumi as f32 * (w.d(c) * a.d);
            }
            *out = sumf;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::Out;
    use super::super::x86::{
        by_rows, by_rows8, bytes, chunk_pair, half_pair, half8, lane_sums_avx2, nibbles, nibbles_pair, prefetch_ahead,
        quad, quad512,
    };
    use super::{DotFn, GROUP, Group8, Q8_0Block, Q8_0Rows, Q8Weights, RUN, RUN_VNNI, WIDE, WIDE_RUN};
    use std::ops::Range;

    /// Weight vector `v` of a packed block (column values `4v..4v + 4`) in registers, per path.
    pub trait Unpack: Q8Weights {
        /// As u8: the values plus [`Q8Weights::OFFSET`].
        unsafe fn unsigned(p: &Self::Packed, v: usize) -> __m256i;
        /// Per column, the exact integer dot of the four values with `x`'s (AVX2).
        unsafe fn lane_sums_avx2(p: &Self::Packed, v: usize, x: &Q8_0Block) -> __m256i;
        /// [`Unpack::unsigned`] of two groups' blocks, `a`'s in the low half (AVX-512 BW).
        #[inline(always)]
        unsafe fn unsigned_pair(a: &Self::Packed, b: &Self::Packed, v: usize) -> __m512i {
            // SAFETY: inlined only into AVX-512 functions.
            unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(Self::unsigned(a, v)), Self::unsigned(b, v)) }
        }
    }

    impl Unpack for [i8; 32] {
        #[inline(always)]
        unsafe fn unsigned(p: &[u8; 256], v: usize) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe { _mm256_xor_si256(bytes(p, v), _mm256_set1_epi8(-128)) }
        }
        #[inline(always)]
        unsafe fn unsigned_pair(a: &[u8; 256], b: &[u8; 256], v: usize) -> __m512i {
            // SAFETY: inlined only into AVX-512 functions.
            unsafe { _mm512_xor_si512(chunk_pair(a, b, v), _mm512_set1_epi8(-128)) }
        }
        #[inline(always)]
        unsafe fn lane_sums_avx2(p: &[u8; 256], v: usize, x: &Q8_0Block) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe {
                // ggml's mul_sum_i8_pairs_float: |w| times x with w's sign, as u8 x i8.
                let w = bytes(p, v);
                lane_sums_avx2(_mm256_sign_epi8(w, w), _mm256_sign_epi8(quad(&x.qs, v), w))
            }
        }
    }

    impl Unpack for [u32; 5] {
        #[inline(always)]
        unsafe fn unsigned(p: &super::Q5Packed, v: usize) -> __m256i {
            // SAFETY: inlined only into AVX2 functions; the load reads the 32-byte array.
            unsafe {
                // Bit `v` of each byte to bit 4; shifting 16-bit lanes is safe, as the mask keeps only
                // bits from the same byte.
                let h = _mm256_loadu_si256(p.hi.as_ptr() as *const __m256i);
                let h = if v <= 4 {
                    _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - v as i32))
                } else {
                    _mm256_srl_epi16(h, _mm_cvtsi32_si128(v as i32 - 4))
                };
                _mm256_or_si256(nibbles(&p.nib, v), _mm256_and_si256(h, _mm256_set1_epi8(0x10)))
            }
        }
        #[inline(always)]
        unsafe fn unsigned_pair(a: &super::Q5Packed, b: &super::Q5Packed, v: usize) -> __m512i {
            // SAFETY: inlined only into AVX-512 functions.
            unsafe {
                let lo = nibbles_pair(&a.nib, &b.nib, v);
                let h = chunk_pair(&a.hi, &b.hi, 0);
                let h = if v <= 4 {
                    _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - v as i32))
                } else {
                    _mm512_srl_epi16(h, _mm_cvtsi32_si128(v as i32 - 4))
                };
                _mm512_or_si512(lo, _mm512_and_si512(h, _mm512_set1_epi8(0x10)))
            }
        }
        #[inline(always)]
        unsafe fn lane_sums_avx2(p: &super::Q5Packed, v: usize, x: &Q8_0Block) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe {
                _mm256_add_epi32(lane_sums_avx2(Self::unsigned(p, v), quad(&x.qs, v)), _mm256_set1_epi32(x.corr[v]))
            }
        }
    }

    impl Unpack for [u8; 16] {
        #[inline(always)]
        unsafe fn unsigned(p: &[u8; 128], v: usize) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe { nibbles(p, v) }
        }
        #[inline(always)]
        unsafe fn unsigned_pair(a: &[u8; 128], b: &[u8; 128], v: usize) -> __m512i {
            // SAFETY: inlined only into AVX-512 functions.
            unsafe { nibbles_pair(a, b, v) }
        }
        #[inline(always)]
        unsafe fn lane_sums_avx2(p: &[u8; 128], v: usize, x: &Q8_0Block) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe { _mm256_add_epi32(lane_sums_avx2(nibbles(p, v), quad(&x.qs, v)), _mm256_set1_epi32(x.corr[v])) }
        }
    }

    /// The 8-column kernel: AVX-512 VNNI CPUs take the 16-column ones instead (`columns`).
    pub fn select<W: Unpack>() -> DotFn<W::Packed> {
        avx2::<W>
    }

    pub fn avx2<W: Unpack>(wg: &[Group8<W::Packed>], q: &Q8_0Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run<W: Unpack, const R: usize>(
            wg: &[Group8<W::Packed>],
            q: &Q8_0Rows,
            rows: &[usize; R],
            tile: &mut [[f32; GROUP]; RUN],
        ) {
            // SAFETY: compiled for AVX2+FMA.
            unsafe { body(wg, q, rows, tile, |p, v, x| W::lane_sums_avx2(p, v, x)) }
        }
        // SAFETY: `select` (the only way here but tests, which check first) and `supported()` (the only
        // way to build this kernel) both require AVX2 and FMA.
        unsafe { by_rows!(run::<W>, wg, q, rows, tile) }
    }

    /// Two adjacent groups (16 columns) at once in 512-bit registers: group `a`'s columns in the low
    /// half of every vector, `b`'s in the high half. Per column it is the 8-column kernel's arithmetic,
    /// operation for operation ([`body`]'s one integer per block), so the same bits, with one `vpdpbusd`
    /// doing 64 products instead of 32 (a Sapphire Rapids core issues 512-bit ones as fast as 256-bit ones).
    pub fn pair_vnni<W: Unpack>(
        a: &[Group8<W::Packed>],
        b: &[Group8<W::Packed>],
        q: &Q8_0Rows,
        rows: &[usize],
        tile: &mut [[f32; 2 * GROUP]; RUN_VNNI],
    ) {
        // SAFETY: only called when the CPU has AVX-512 F, BW, VNNI and VL besides AVX2 and FMA
        // (models::cpu's `avx512_vnni`).
        unsafe { by_rows8!(sums::<W>(a, b, q), rows, tile) }
    }

    /// One or two pairs of groups' weights unpacked (offset bytes, and the scales as f32) for every run
    /// of rows that goes over them: a prefill (above [`super::super::UNPACK_ABOVE`] rows) runs several
    /// runs of rows per tile, and on AVX-512 the unpacking (shifts, masks, inserts) competes with `vpdpbusd` for the same
    /// two ports, once per run. Loaded back from L1 it costs no ALU port.
    #[derive(Default)]
    pub struct Unpacked {
        /// The tile these hold (its first group and how many pairs), or none yet.
        key: Option<(usize, usize)>,
        /// Per pair, block `k`'s eight weight vectors at `8k..8k + 8`.
        w: [Vec<__m512i>; 2],
        /// Per pair, block `k`'s sixteen scales.
        d: [Vec<__m512>; 2],
    }

    impl Unpacked {
        /// Writes rows `rows` of columns `cols.0..cols.0 + cols.1` (at most `16 * pairs` of them) into
        /// `out`: the products with the first `pairs` pairs of `groups` (`groups[2t]` and `groups[2t + 1]`
        /// are pair `t`), where `key` is `(the tile's first group, pairs)`, in runs of [`WIDE_RUN`] rows, unpacking them only when `key` differs from the tile unpacked
        /// last. Per column it is [`pair_vnni`]'s arithmetic, operation for operation: the same integers,
        /// the same float operations in the same order, so the same bits.
        ///
        /// # Safety
        /// The CPU must have AVX-512 F, BW, VNNI and VL besides AVX2, FMA and F16C (models::cpu's
        /// `avx512_vnni`), and the columns must be the calling task's own (see [`Out::set_span`]).
        /// Compiled for those features, so that no legacy SSE code runs between the kernels, and each
        /// run's rows are `r0..r0 + R`, passed as `r0`: a row array built on the stack and read back
        /// whole (a store forward that fails) held a sixth of this path's samples.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
        pub unsafe fn wide_vnni<W: Unpack>(
            &mut self,
            key: (usize, usize),
            groups: [&[Group8<W::Packed>]; 4],
            q: &Q8_0Rows,
            rows: Range<usize>,
            (c0, width): (usize, usize),
            out: &Out,
        ) {
            let pairs = key.1;
            assert!((pairs == 1 || pairs == 2) && width <= 2 * GROUP * pairs);
            // SAFETY: compiled for the features the kernels use (the caller's promise that they run);
            // the columns are the caller's.
            unsafe {
                if self.key != Some(key) {
                    for t in 0..pairs {
                        self.fill::<W>(t, groups[2 * t], groups[2 * t + 1]);
                    }
                    self.key = Some(key);
                }
                let (w, d) = (&self.w, &self.d);
                let mut tile = [[0f32; WIDE]; WIDE_RUN];
                for r0 in rows.clone().step_by(WIDE_RUN) {
                    let n = (rows.end - r0).min(WIDE_RUN);
                    match (pairs, n) {
                        (1, 6) => sums_unpacked::<1, 6>(w, d, q, r0, &mut tile),
                        (1, 5) => sums_unpacked::<1, 5>(w, d, q, r0, &mut tile),
                        (1, 4) => sums_unpacked::<1, 4>(w, d, q, r0, &mut tile),
                        (1, 3) => sums_unpacked::<1, 3>(w, d, q, r0, &mut tile),
                        (1, 2) => sums_unpacked::<1, 2>(w, d, q, r0, &mut tile),
                        (1, _) => sums_unpacked::<1, 1>(w, d, q, r0, &mut tile),
                        (_, 6) => sums_unpacked::<2, 6>(w, d, q, r0, &mut tile),
                        (_, 5) => sums_unpacked::<2, 5>(w, d, q, r0, &mut tile),
                        (_, 4) => sums_unpacked::<2, 4>(w, d, q, r0, &mut tile),
                        (_, 3) => sums_unpacked::<2, 3>(w, d, q, r0, &mut tile),
                        (_, 2) => sums_unpacked::<2, 2>(w, d, q, r0, &mut tile),
                        (_, _) => sums_unpacked::<2, 1>(w, d, q, r0, &mut tile),
                    }
                    for (i, row) in tile.iter().enumerate().take(n) {
                        out.set_span(r0 + i, c0, &row[..width]);
                    }
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn fill<W: Unpack>(&mut self, t: usize, a: &[Group8<W::Packed>], b: &[Group8<W::Packed>]) {
            assert_eq!(a.len(), b.len());
            let kb = a.len();
            let (w, d) = (&mut self.w[t], &mut self.d[t]);
            w.resize(8 * kb, _mm512_setzero_si512());
            d.resize(kb, _mm512_setzero_ps());
            // SAFETY: compiled for AVX-512 F and BW; the unpacking reads whole arrays.
            unsafe {
                for (k, (wa, wb)) in a.iter().zip(b).enumerate() {
                    prefetch_ahead(wa);
                    prefetch_ahead(wb);
                    for v in 0..8 {
                        w[8 * k + v] = W::unsigned_pair(&wa.qs, &wb.qs, v);
                    }
                    d[k] = half_pair(&wa.d, &wb.d);
                }
            }
        }
    }

    /// [`sums`] on `T` pairs of weights [`Unpacked`] already: per block, eight steps (each one activation
    /// broadcast per row against `T` weight vectors), then its scales.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    #[inline(never)]
    unsafe fn sums_unpacked<const T: usize, const R: usize>(
        w: &[Vec<__m512i>; 2],
        d: &[Vec<__m512>; 2],
        q: &Q8_0Rows,
        r0: usize,
        tile: &mut [[f32; WIDE]; WIDE_RUN],
    ) {
        let kb = d[0].len();
        assert!(R <= WIDE_RUN && (r0 + R) * kb <= q.len());
        for t in 0..T {
            assert!(w[t].len() == 8 * kb && d[t].len() == kb);
        }
        // SAFETY: compiled for AVX-512 F, BW, VNNI and VL; the indexing is within the lengths checked
        // above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            for k in 0..kb {
                let x = |i: usize| q.get_unchecked((r0 + i) * kb + k);
                let mut isum = [[_mm512_setzero_si512(); T]; R];
                for (i, isum) in isum.iter_mut().enumerate() {
                    *isum = [_mm512_set1_epi32(x(i).corr_all); T];
                }
                for v in 0..8 {
                    let mut wv = [_mm512_setzero_si512(); T];
                    for (t, wv) in wv.iter_mut().enumerate() {
                        *wv = *w[t].get_unchecked(8 * k + v);
                    }
                    for (i, isum) in isum.iter_mut().enumerate() {
                        let quad = quad512(&x(i).qs, v);
                        for t in 0..T {
                            isum[t] = _mm512_dpbusd_epi32(isum[t], wv[t], quad);
                        }
                    }
                }
                for i in 0..R {
                    let xd = _mm512_set1_ps(x(i).d);
                    for t in 0..T {
                        let dd = _mm512_mul_ps(*d[t].get_unchecked(k), xd);
                        acc[i][t] = _mm512_add_ps(acc[i][t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i][t]), dd));
                    }
                }
            }
            for i in 0..R {
                for t in 0..T {
                    _mm512_storeu_ps(tile[i][2 * GROUP * t..].as_mut_ptr(), acc[i][t]);
                }
            }
        }
    }

    /// [`pair_vnni`] summing each block's 32 products as one integer.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
    unsafe fn sums<W: Unpack, const R: usize>(
        a: &[Group8<W::Packed>],
        b: &[Group8<W::Packed>],
        q: &Q8_0Rows,
        rows: &[usize; R],
        tile: &mut [[f32; 2 * GROUP]; RUN_VNNI],
    ) {
        assert!(a.len() == b.len());
        let kb = a.len();
        // SAFETY: compiled for AVX-512 F, BW, VNNI and VL; the loads read whole arrays.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            for (k, (wa, wb)) in a.iter().zip(b).enumerate() {
                prefetch_ahead(wa);
                prefetch_ahead(wb);
                let x = |i: usize| &q[rows[i] * kb + k];
                let mut isum: [__m512i; R] = std::array::from_fn(|i| _mm512_set1_epi32(x(i).corr_all));
                for v in 0..8 {
                    let w = W::unsigned_pair(&wa.qs, &wb.qs, v);
                    for (i, isum) in isum.iter_mut().enumerate() {
                        let quad = quad512(&x(i).qs, v);
                        *isum = _mm512_dpbusd_epi32(*isum, w, quad);
                    }
                }
                let d = half_pair(&wa.d, &wb.d);
                for i in 0..R {
                    let dd = _mm512_mul_ps(d, _mm512_set1_ps(x(i).d));
                    acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i]), dd));
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(tile[i].as_mut_ptr(), acc[i]);
            }
        }
    }

    /// `lane_sums(weights, v, x)`: per column, lane `v`'s exact integer sum against activation block `x`.
    /// Loops over `v` outside the rows, so a weight vector is unpacked once for the run (the compiler
    /// hoists the rows' shared part of `lane_sums`); the lanes are summed in i32, so a block costs a row
    /// one conversion, one multiply and one add.
    #[inline(always)]
    unsafe fn body<P, const R: usize, const T: usize>(
        wg: &[Group8<P>],
        q: &Q8_0Rows,
        rows: &[usize; R],
        tile: &mut [[f32; GROUP]; T],
        lane_sums: impl Fn(&P, usize, &Q8_0Block) -> __m256i,
    ) {
        let kb = wg.len();
        // SAFETY: inlined only into the `target_feature` functions above; loads read whole arrays.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, w) in wg.iter().enumerate() {
                prefetch_ahead(w);
                let mut isum = [_mm256_setzero_si256(); R];
                for v in 0..8 {
                    for (i, isum) in isum.iter_mut().enumerate() {
                        *isum = _mm256_add_epi32(*isum, lane_sums(&w.qs, v, &q[rows[i] * kb + b]));
                    }
                }
                let d = half8(&w.d);
                for i in 0..R {
                    let dd = _mm256_mul_ps(d, _mm256_set1_ps(q[rows[i] * kb + b].d));
                    acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_cvtepi32_ps(isum[i]), dd));
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(tile[i].as_mut_ptr(), acc[i]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub trait Unpack {}
    impl Unpack for [i8; 32] {}
    impl Unpack for [u8; 16] {}
    impl Unpack for [u32; 5] {}
    pub fn select<W: super::Q8Weights>() -> super::DotFn<W::Packed> {
        unreachable!("supported() is false off x86-64")
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Both SIMD paths give ggml's generic dot bit for bit, on a matrix with a padded group and runs of
    /// one to eight rows (of which the four-row kernels take the first four).
    fn check<W: x86::Unpack>(dtype: GgmlDType) {
        if !supported() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k, rows) = (13, 320, 10);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q8Matrix::<W>::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_0(&xs, W::OFFSET);
        let kb = k / QK;
        let paths: Vec<(&str, DotFn<W::Packed>)> = vec![("avx2", x86::avx2::<W>)];
        for g in 0..n.div_ceil(GROUP) {
            let wg = &m.groups[g * kb..(g + 1) * kb];
            let runs =
                [&[0, 1, 2, 3, 4, 5, 6, 7][..], &[9, 1, 2, 3, 4, 5, 6], &[0, 1, 2, 3], &[4, 5, 6], &[2, 3], &[6]];
            for run in runs {
                let mut generic = [[0f32; GROUP]; RUN_VNNI];
                for (i, r) in run.chunks(RUN).enumerate() {
                    let mut part = [[0f32; GROUP]; RUN];
                    dot_portable::<W>(wg, &q, r, &mut part);
                    generic[i * RUN..][..r.len()].copy_from_slice(&part[..r.len()]);
                }
                if cpu::detect().avx512_vnni {
                    // The 16-column kernel (whatever the cap: it is what this CPU runs), with this group in
                    // either half (its neighbour, or itself when it is the last, in the other).
                    let other = &m.groups[((g + 1) % n.div_ceil(GROUP)) * kb..][..kb];
                    for (half, (a, b)) in [(0, (wg, other)), (1, (other, wg))] {
                        // Straight from the packed blocks, and unpacked once (the second call reuses
                        // what the first unpacked).
                        let mut got = [[[0f32; 2 * GROUP]; RUN_VNNI]; 1];
                        x86::pair_vnni::<W>(a, b, &q, run, &mut got[0]);
                        // The unpacked kernel over contiguous rows, in runs of up to four: one pair
                        // (a, b), or two (a, b, then b, a), the second time from what the first
                        // unpacked, against the pair kernel's results for the same rows.
                        let (r0, len) = (run[0], run.len().min(rows - run[0]));
                        for pairs in [1, 2] {
                            let mut unpacked = x86::Unpacked::default();
                            for _ in 0..2 {
                                let mut buf = vec![f32::NAN; rows * WIDE];
                                let out = Out::new(&mut buf, rows, WIDE);
                                let width = 2 * GROUP * pairs;
                                // SAFETY: the CPU has AVX-512 VNNI (checked above); nothing else writes.
                                unsafe {
                                    unpacked.wide_vnni::<W>(
                                        (half, pairs),
                                        [a, b, b, a],
                                        &q,
                                        r0..r0 + len,
                                        (0, width),
                                        &out,
                                    )
                                };
                                for r in r0..r0 + len {
                                    let mut want = [[0f32; 2 * GROUP]; RUN_VNNI];
                                    x86::pair_vnni::<W>(a, b, &q, &[r], &mut want);
                                    for c in 0..width {
                                        // Column c is column c % 16 of pair (a, b), or of (b, a) in the
                                        // second pair.
                                        let c16 = if c < 2 * GROUP { c } else { (c + GROUP) % (2 * GROUP) };
                                        assert_eq!(
                                            buf[r * WIDE + c].to_bits(),
                                            want[0][c16].to_bits(),
                                            "{dtype:?} wide ({pairs} pairs) half {half} group {g} row {r} col {c}"
                                        );
                                    }
                                }
                            }
                        }
                        for (way, got) in got.iter().enumerate() {
                            for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                                let want = generic[i][c];
                                let got = got[i][half * GROUP + c];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{dtype:?} pair half {half} way {way} group {g} col {c}"
                                );
                            }
                        }
                    }
                }
                for (name, dot) in &paths {
                    let run = &run[..RUN.min(run.len())];
                    let mut got = [[0f32; GROUP]; RUN];
                    dot(wg, &q, run, &mut got);
                    for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                        let want = generic[i][c];
                        assert_eq!(
                            got[i][c].to_bits(),
                            want.to_bits(),
                            "{dtype:?} {name} group {g} row {} col {c}",
                            run[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn paths_agree() {
        check::<[i8; 32]>(GgmlDType::Q8_0);
        check::<[u8; 16]>(GgmlDType::Q4_0);
        check::<[u32; 5]>(GgmlDType::Q5_0);
    }

    #[test]
    fn rounding_matches_f32_round() {
        for i in -2_600_000..2_600_000 {
            let v = i as f32 * 0.000_05;
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
        for v in [0.5f32, -0.5, 1.5, -1.5, 126.5, -127.5, 0.499_999_97, -0.499_999_97] {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }
}
