//! Q4_K, Q5_K and Q6_K weights (the mix of the Q4_K_M files most users download) against Q8_K
//! activations. The weights are decoded at load into one layout for all three and repacked into groups
//! of eight columns, as the Q4_0/Q8_0 kernels do, so one instruction advances eight columns and a run of
//! rows shares every unpacked weight vector:
//! - the low four bits of every value as nibbles, each 32-value chunk laid out as a Q4_0 group block
//!   (`super::x86::nibbles` unpacks it);
//! - Q5_K's fifth bit, Q6_K's fifth and sixth, as bit planes beside them (see [`Format::HI`]);
//! - per 16-value sub-block and column, the integer scale (Q4_K/Q5_K's 6-bit scale of each 32 values is
//!   written twice); per 32 values, Q4_K/Q5_K's 6-bit minimum; per super-block, the f16 scales as f32.
//!
//! Numerics are ggml's AVX2 `ggml_vec_dot_q{4,5,6}_K_q8_K`, bit for bit: ggml keeps eight i32 lanes per
//! column, lane `v` summing values `4v..4v + 4` of every 32-value chunk times their sub-block scale, and
//! in the repacked layout weight vector `v` of a chunk holds exactly those values of eight columns, so
//! accumulator `v` of a row is ggml's lane `v` of eight columns. Each super-block adds `d_x * d_w * lane`
//! per lane in f32; minimums and Q6_K's offset of 32 go through the activations' 16-value sums where
//! ggml takes them. (A first version summed each super-block into one exact integer: more precise, but
//! farther from llama.cpp: Gemma 3's mean KL divergence against it rose 2%, past llama.cpp's own f16-KV
//! bound.) A column's result never depends on the rows beside it.
//! x86-64 only: AVX2 and FMA, eight columns per instruction, or on AVX-512 VNNI CPUs two groups (16
//! columns) per 512-bit register, chosen at run time, with each tile's weights unpacked once for all its
//! runs of rows above 16 rows (a prefill); elsewhere these types go through candle's per-block `vec_dot`.
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;

use super::{GROUP, Kernel, Out, interleaved};
use crate::models::kernels::cpu;

const QK_K: usize = 256;

/// One weight format's block, decoded to unsigned integer values and integer scales: a value is
/// `d * sc[i / 16] * (q[i] - OFFSET) - dmin * m[i / 32]`.
pub struct Decoded {
    q: [u8; QK_K],
    sc: [i8; 16],
    m: [u8; 8],
    d: f32,
    dmin: f32,
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of 32-value sub-block `j` of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A K-quant format: its GGUF block and how many high bits its values have beyond the nibble.
pub trait Format: Send + Sync + 'static {
    const DTYPE: GgmlDType;
    const BYTES: usize;
    /// Bits above the low four: 0 (Q4_K), 1 (Q5_K), 2 (Q6_K). Each 32-value chunk keeps `HI` planes of
    /// 32 bytes; in plane `p`, byte `c * 4 + j` holds, for weight vector `v` (values `4v..4v + 4`),
    /// bits `HI * (v - 4p)..` = the high bits of value `4v + j` of column `c`, where `p = v * HI / 8`.
    const HI: usize;
    /// Subtracted from every value (Q6_K's 32); the others have minimums instead.
    const OFFSET: i32;
    fn decode(b: &[u8]) -> Decoded;
}

pub struct Q4K;
pub struct Q5K;
pub struct Q6K;

impl Format for Q4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BYTES: usize = 144;
    const HI: usize = 0;
    const OFFSET: i32 = 0;
    /// ggml's block_q4_K: d f16, dmin f16, scales[12], qs[128]; each 64 values take the low nibbles of
    /// 32 bytes, then their high nibbles.
    fn decode(b: &[u8]) -> Decoded {
        let qs = &b[16..144];
        let mut q = [0u8; QK_K];
        for j in 0..4 {
            for l in 0..32 {
                q[64 * j + l] = qs[32 * j + l] & 0xF;
                q[64 * j + 32 + l] = qs[32 * j + l] >> 4;
            }
        }
        k4_scales(b, q)
    }
}

impl Format for Q5K {
    const DTYPE: GgmlDType = GgmlDType::Q5K;
    const BYTES: usize = 176;
    const HI: usize = 1;
    const OFFSET: i32 = 0;
    /// ggml's block_q5_K: as Q4_K with qh[32] before qs; value `l` of 32-value sub-block `s` has its
    /// fifth bit at bit `s` of `qh[l]`.
    fn decode(b: &[u8]) -> Decoded {
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let mut q = [0u8; QK_K];
        for j in 0..4 {
            for l in 0..32 {
                q[64 * j + l] = (qs[32 * j + l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4);
                q[64 * j + 32 + l] = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
            }
        }
        k4_scales(b, q)
    }
}

fn k4_scales(b: &[u8], q: [u8; QK_K]) -> Decoded {
    let (mut sc, mut m) = ([0i8; 16], [0u8; 8]);
    for s in 0..8 {
        let (scale, min) = scale_min_k4(s, &b[4..16]);
        sc[2 * s] = scale as i8;
        sc[2 * s + 1] = scale as i8;
        m[s] = min;
    }
    Decoded { q, sc, m, d: half(b, 0), dmin: half(b, 2) }
}

impl Format for Q6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BYTES: usize = 210;
    const HI: usize = 2;
    const OFFSET: i32 = 32;
    /// ggml's block_q6_K: ql[128], qh[64], scales[16] (i8), d f16; each 128 values take 64 bytes of ql
    /// (low nibbles, then high) and 32 of qh (two bits for each of four values).
    fn decode(b: &[u8]) -> Decoded {
        let (ql, qh) = (&b[..128], &b[128..192]);
        let mut q = [0u8; QK_K];
        for n in 0..2 {
            let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
            for l in 0..32 {
                let y = &mut q[128 * n..];
                y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        let sc = std::array::from_fn(|i| b[192 + i] as i8);
        Decoded { q, sc, m: [0; 8], d: half(b, 208), dmin: 0.0 }
    }
}

/// One super-block of activations quantized to Q8_K as ggml's `quantize_row_q8_K_ref` does, with the
/// 16-value sums the kernels need, paired as `vpmaddwd` takes them: `pair16[t] = bs[2t] | bs[2t+1] << 16`
/// and `pair32[t]` the same of the 32-value sums.
#[derive(Clone, Copy)]
pub struct Q8KBlock {
    qs: [i8; QK_K],
    d: f32,
    bs: [i16; 16],
    pair16: [i32; 8],
    pair32: [i32; 4],
}

pub type Q8KRows = Vec<Q8KBlock>;

/// ggml's `nearest_int` (round half to even), as ggml computes it: adding 1.5 * 2^23 leaves no bits
/// below the units, so the addition itself rounds (to nearest, ties to even), and subtracting it again
/// is exact, for |v| < 2^22 (the quantizer's values are within +-127.5). `f32::round_ties_even` was a
/// call to libm's `rintf` per value on baseline x86-64 (no SSE4.1): 3% of a Q4_K_M prefill.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC) - MAGIC) as i32
}

fn pair(a: i16, b: i16) -> i32 {
    (a as u16 as u32 | (b as u16 as u32) << 16) as i32
}

pub fn quantize_q8_k(x: &[f32]) -> Q8KRows {
    let simd = cpu::features().avx2_fma;
    super::par_map_units(x, QK_K, 1, |x, out| {
        out.reserve(x.len() / QK_K);
        for xs in x.chunks_exact(QK_K) {
            let mut b = Q8KBlock { qs: [0; QK_K], d: 0.0, bs: [0; 16], pair16: [0; 8], pair32: [0; 4] };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA; the chunk holds QK_K values.
            let done = simd && unsafe { x86::quantize_values(xs, &mut b.qs, &mut b.d) };
            #[cfg(not(target_arch = "x86_64"))]
            let done = simd;
            if !done {
                quantize_values(xs, &mut b.qs, &mut b.d);
            }
            for (t, s) in b.bs.iter_mut().enumerate() {
                *s = b.qs[16 * t..16 * t + 16].iter().map(|&q| q as i16).sum();
            }
            b.pair16 = std::array::from_fn(|t| pair(b.bs[2 * t], b.bs[2 * t + 1]));
            let bs32: [i16; 8] = std::array::from_fn(|s| b.bs[2 * s] + b.bs[2 * s + 1]);
            b.pair32 = std::array::from_fn(|t| pair(bs32[2 * t], bs32[2 * t + 1]));
            out.push(b);
        }
    })
}

/// ggml's `quantize_row_q8_K_ref` for one super-block's values: the scale from the value of largest
/// magnitude (the first of equals, sign kept), each value rounded to nearest, ties to even.
fn quantize_values(xs: &[f32], qs: &mut [i8; QK_K], d: &mut f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xs {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax != 0.0 {
        let iscale = -127.0 / max;
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        *d = 1.0 / iscale;
    }
}

/// One super-block of eight columns.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Group8 {
    /// Per 32-value chunk, the low nibbles as a Q4_0 group block.
    nib: [[u8; 128]; 8],
    /// Per chunk, `HI` planes of high bits (see [`Format::HI`]); unused slots stay zero.
    hi: [[[u8; 32]; 2]; 8],
    /// Per 16-value sub-block, each column's scale.
    sc: [[i8; GROUP]; 16],
    /// Per 32-value sub-block, each column's minimum (Q4_K/Q5_K).
    m: [[u8; GROUP]; 8],
    d: [f32; GROUP],
    dmin: [f32; GROUP],
}

const ZERO: Group8 = Group8 {
    nib: [[0; 128]; 8],
    hi: [[[0; 32]; 2]; 8],
    sc: [[0; GROUP]; 16],
    m: [[0; GROUP]; 8],
    d: [0.0; GROUP],
    dmin: [0.0; GROUP],
};

/// A `[n, k]` matrix of one K-quant format, repacked.
pub struct KMatrix<F: Format> {
    n: usize,
    kb: usize,
    /// `n.div_ceil(8) * kb` super-blocks, group after group; the last group is padded with zero columns
    /// whose results are never written.
    groups: Vec<Group8>,
    _format: std::marker::PhantomData<F>,
}

/// Whether this CPU runs these kernels (else the caller uses candle's).
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64") && cpu::features().avx2_fma
}

impl<F: Format> KMatrix<F> {
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        if !supported() {
            bail!("omnibus's {:?} kernel needs x86-64 with AVX2 and FMA", F::DTYPE);
        }
        if t.dtype() != F::DTYPE {
            bail!("expected {:?} weights, got {:?}", F::DTYPE, t.dtype());
        }
        let (n, k) = t.shape().dims2()?;
        if k % QK_K != 0 {
            bail!("{:?} rows of {k} values are not whole blocks of {QK_K}", F::DTYPE);
        }
        let kb = k / QK_K;
        let data = t.data()?;
        if data.len() != n * kb * F::BYTES {
            bail!("{:?} data of {} bytes for a {n}x{k} matrix", F::DTYPE, data.len());
        }
        let mut groups = vec![ZERO; n.div_ceil(GROUP) * kb];
        for (i, block) in data.chunks_exact(F::BYTES).enumerate() {
            let (col, b) = (i / kb, i % kb);
            let (g, c) = (col / GROUP, col % GROUP);
            let dst = &mut groups[g * kb + b];
            let dec = F::decode(block);
            dst.d[c] = dec.d;
            dst.dmin[c] = dec.dmin;
            for t in 0..16 {
                dst.sc[t][c] = dec.sc[t];
            }
            for s in 0..8 {
                dst.m[s][c] = dec.m[s];
            }
            for (i, &q) in dec.q.iter().enumerate() {
                let (s, j) = (i / 32, i % 32);
                let byte = &mut dst.nib[s][interleaved(c, j % 16)];
                *byte |= if j < 16 { q & 0xF } else { (q & 0xF) << 4 };
                if F::HI > 0 {
                    let (v, jj) = (j / 4, j % 4);
                    let p = v * F::HI / 8;
                    let shift = F::HI * (v - p * 8 / F::HI);
                    dst.hi[s][p][c * 4 + jj] |= (q >> 4) << shift;
                }
            }
        }
        Ok(Self { n, kb, groups, _format: std::marker::PhantomData })
    }
}

/// Activation rows per run: walking a super-block lane by lane keeps one integer register per row live,
/// so four rows share each unpacked weight vector (their f32 lane accumulators spill to L1).
const RUN: usize = 4;

/// Dots of one weight group with a run of activation rows: `tile[i][c]` for row `rows[i]` and the
/// group's column `c`.
type DotFn = fn(&[Group8], &Q8KRows, &[usize], &mut [[f32; GROUP]; RUN]);

impl<F: Format> Kernel for KMatrix<F> {
    type Act = Q8KRows;

    fn out_features(&self) -> usize {
        self.n
    }

    fn in_features(&self) -> usize {
        self.kb * QK_K
    }

    fn quantize(&self, x: &[f32], _rows: usize) -> Q8KRows {
        quantize_q8_k(x)
    }

    fn columns(&self, q: &Q8KRows, rows: usize, cols: Range<usize>, out: &Out) {
        let kb = self.kb;
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx512_vnni {
            let (groups, blocks) = (self.n.div_ceil(GROUP), |g: usize| &self.groups[g * kb..(g + 1) * kb]);
            // A matrix's last group, when alone, stands in for its missing neighbour too: those 8 columns
            // are past `n` and never written out.
            if rows <= super::UNPACK_ABOVE {
                super::column_tiles(rows, cols, out, |g, run, tile| {
                    x86::pair_vnni::<F>(blocks(g), blocks((g + 1).min(groups - 1)), q, run, tile)
                });
            } else {
                // Several runs of rows over each tile: unpack its weights once for all of them.
                let mut unpacked = x86::Unpacked::default();
                for rb in (0..rows).step_by(super::ROW_BLOCK) {
                    let re = (rb + super::ROW_BLOCK).min(rows);
                    for c0 in cols.clone().step_by(2 * GROUP) {
                        let (g, width) = (c0 / GROUP, (cols.end - c0).min(2 * GROUP));
                        let (a, b) = (blocks(g), blocks((g + 1).min(groups - 1)));
                        // SAFETY: this CPU has AVX-512 VNNI (checked above); `c0..c0 + width` is within
                        // `cols`, this task's own columns.
                        unsafe { unpacked.tile_vnni::<F>(g, a, b, q, rb..re, (c0, width), out) };
                    }
                }
            }
            return;
        }
        let dot: DotFn = x86::select::<F>();
        super::eight_column_tiles(rows, cols, out, |g, run, tile| {
            dot(&self.groups[g * kb..(g + 1) * kb], q, run, tile)
        });
    }
}

/// Value `i` (0..256) of column `c` of a packed super-block, unsigned.
#[cfg(test)]
fn value<F: Format>(w: &Group8, c: usize, i: usize) -> i32 {
    let (s, j) = (i / 32, i % 32);
    let byte = w.nib[s][interleaved(c, j % 16)];
    let lo = if j < 16 { byte & 0xF } else { byte >> 4 };
    let mut hi = 0;
    if F::HI > 0 {
        let (v, jj) = (j / 4, j % 4);
        let p = v * F::HI / 8;
        let shift = F::HI * (v - p * 8 / F::HI);
        hi = (w.hi[s][p][c * 4 + jj] >> shift) & ((1 << F::HI) - 1);
    }
    (lo | hi << 4) as i32
}

/// ggml's AVX2 dot (`ggml_vec_dot_q{4,5,6}_K_q8_K`) of column `c` with activation row `r`, in scalar
/// code: the reference the kernel must equal bit for bit. Lane `v` (ggml's eight i32 lanes) holds the
/// exact sum of values `4v..4v + 4` of every 32-value chunk times their scale; each super-block adds
/// `d_x * d_w * lane` to the lane's f32 accumulator; the lanes are added at the end as `hsum_float_8`
/// does. Q6_K's offset comes off lane `v` as `32 * (sc[2v] bs[2v] + sc[2v+1] bs[2v+1])`. Q4_K's minimums
/// keep four f32 lanes (pairs of 32-value sums); Q5_K's are an exact integer per super-block.
#[cfg(test)]
fn ggml_order<F: Format>(wg: &[Group8], q: &Q8KRows, r: usize, c: usize) -> f32 {
    let kb = wg.len();
    let (mut acc, mut acc_m, mut summs) = ([0f32; 8], [0f32; 4], 0f32);
    for (b, w) in wg.iter().enumerate() {
        let a = &q[r * kb + b];
        let d = a.d * w.d[c];
        let dmin = -a.d * w.dmin[c];
        for (v, lane) in acc.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for s in 0..8 {
                let x: i32 =
                    (0..4).map(|j| value::<F>(w, c, 32 * s + 4 * v + j) * a.qs[32 * s + 4 * v + j] as i32).sum();
                sumi += w.sc[2 * s + v / 4][c] as i32 * x;
            }
            if F::OFFSET != 0 {
                let sub =
                    w.sc[2 * v][c] as i32 * a.bs[2 * v] as i32 + w.sc[2 * v + 1][c] as i32 * a.bs[2 * v + 1] as i32;
                sumi -= sub << 5;
            }
            *lane = d.mul_add(sumi as f32, *lane);
        }
        let bs32 = |s: usize| a.bs[2 * s] as i32 + a.bs[2 * s + 1] as i32;
        let prod: [i32; 4] =
            std::array::from_fn(|t| w.m[2 * t][c] as i32 * bs32(2 * t) + w.m[2 * t + 1][c] as i32 * bs32(2 * t + 1));
        if F::HI == 1 {
            summs = dmin.mul_add(prod.iter().sum::<i32>() as f32, summs);
        } else if F::OFFSET == 0 {
            for t in 0..4 {
                acc_m[t] = dmin.mul_add(prod[t] as f32, acc_m[t]);
            }
        }
    }
    let hsum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    match (F::OFFSET, F::HI) {
        (0, 1) => hsum + summs,
        (0, _) => hsum + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3])),
        _ => hsum,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{
        by_rows, chunk_pair, f32_pair, hsum_lanes, nibbles, nibbles_pair, prefetch_ahead, quad, quad512,
    };
    use std::ops::Range;

    use super::super::Out;
    use super::{DotFn, Format, GROUP, Group8, Q8KRows, RUN};

    /// [`super::quantize_values`] in AVX2, the same bits: the magnitude's maximum over vectors (`max`
    /// with its second operand the running one passes over NaN as the scalar `>` does), then the
    /// first value of that magnitude, then `vcvtps2dq`, which rounds to nearest, ties to even, as
    /// `nearest_int` does. NaN products become 0 as the scalar cast makes them. Returns false, having
    /// written nothing, for a scale too large to keep the products finite (a block whose largest
    /// magnitude is below ~1e-28), which the scalar code then takes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_values(xs: &[f32], qs: &mut [i8; super::QK_K], d: &mut f32) -> bool {
        assert_eq!(xs.len(), super::QK_K);
        // SAFETY: compiled for AVX2; the loads read the QK_K values checked above, the stores write
        // `qs` in 32-byte steps.
        unsafe {
            let p = xs.as_ptr();
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_setzero_ps();
            for i in (0..super::QK_K).step_by(8) {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i))), m);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            if amax == 0.0 {
                return true;
            }
            let target = _mm256_set1_ps(amax);
            let mut max = amax;
            for i in (0..super::QK_K).step_by(8) {
                let eq = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i))), target, _CMP_EQ_OQ);
                let mask = _mm256_movemask_ps(eq);
                if mask != 0 {
                    max = xs[i + mask.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127.0 / max;
            if iscale.abs() >= 1e30 {
                return false;
            }
            let s = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            let round = |x: __m256| {
                let x = _mm256_mul_ps(x, s);
                let ordered = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q));
                _mm256_and_si256(_mm256_min_epi32(_mm256_cvtps_epi32(x), top), ordered)
            };
            for i in (0..super::QK_K).step_by(32) {
                let q = [0, 8, 16, 24].map(|j| round(_mm256_loadu_ps(p.add(i + j))));
                // Packing works per 128-bit half; the permute puts the values back in order.
                let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(qs.as_mut_ptr().add(i) as *mut __m256i, ordered);
            }
            *d = 1.0 / iscale;
            true
        }
    }

    /// The 8-column kernel: AVX-512 VNNI CPUs take the 16-column one instead (`columns`).
    pub fn select<F: Format>() -> DotFn {
        avx2::<F>
    }

    /// Weight vector `v` (values `4v..4v + 4` of every column) of chunk `s`, as unsigned bytes.
    #[inline(always)]
    unsafe fn unsigned<F: Format>(w: &Group8, s: usize, v: usize) -> __m256i {
        // SAFETY: inlined only into AVX2 functions; the loads read whole arrays.
        unsafe {
            let lo = nibbles(&w.nib[s], v);
            match F::HI {
                0 => lo,
                1 => {
                    // Bit `v` of each byte to bit 4. Shifting 16-bit lanes is safe: the mask keeps only
                    // bits that came from the same byte.
                    let h = _mm256_loadu_si256(w.hi[s][0].as_ptr() as *const __m256i);
                    let h = if v <= 4 {
                        _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - v as i32))
                    } else {
                        _mm256_srl_epi16(h, _mm_cvtsi32_si128(v as i32 - 4))
                    };
                    _mm256_or_si256(lo, _mm256_and_si256(h, _mm256_set1_epi8(0x10)))
                }
                _ => {
                    // Bits `2u, 2u + 1` (u = v % 4) of plane v / 4 to bits 4 and 5.
                    let h = _mm256_loadu_si256(w.hi[s][v / 4].as_ptr() as *const __m256i);
                    let u = (v % 4) as i32;
                    let h = if u <= 2 {
                        _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - 2 * u))
                    } else {
                        _mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * u - 4))
                    };
                    _mm256_or_si256(lo, _mm256_and_si256(h, _mm256_set1_epi8(0x30)))
                }
            }
        }
    }

    /// [`unsigned`] of two groups' super-blocks, `a`'s columns in the low half (AVX-512 BW).
    #[inline(always)]
    unsafe fn unsigned_pair<F: Format>(a: &Group8, b: &Group8, s: usize, v: usize) -> __m512i {
        // SAFETY: inlined only into AVX-512 functions; the loads read whole arrays.
        unsafe {
            let lo = nibbles_pair(&a.nib[s], &b.nib[s], v);
            match F::HI {
                0 => lo,
                1 => {
                    let h = chunk_pair(&a.hi[s][0], &b.hi[s][0], 0);
                    let h = if v <= 4 {
                        _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - v as i32))
                    } else {
                        _mm512_srl_epi16(h, _mm_cvtsi32_si128(v as i32 - 4))
                    };
                    _mm512_or_si512(lo, _mm512_and_si512(h, _mm512_set1_epi8(0x10)))
                }
                _ => {
                    let h = chunk_pair(&a.hi[s][v / 4], &b.hi[s][v / 4], 0);
                    let u = (v % 4) as i32;
                    let h = if u <= 2 {
                        _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - 2 * u))
                    } else {
                        _mm512_srl_epi16(h, _mm_cvtsi32_si128(2 * u - 4))
                    };
                    _mm512_or_si512(lo, _mm512_and_si512(h, _mm512_set1_epi8(0x30)))
                }
            }
        }
    }

    /// [`doubled`] for two groups: lanes 0..8 `(a_c, a_c)`, lanes 8..16 `(b_c, b_c)`.
    #[inline(always)]
    unsafe fn doubled_pair(a: &[i8; GROUP], b: &[i8; GROUP]) -> __m512i {
        // SAFETY: inlined only into AVX-512 functions; reads two 8-byte arrays.
        unsafe {
            let x = _mm_unpacklo_epi64(
                _mm_loadl_epi64(a.as_ptr() as *const __m128i),
                _mm_loadl_epi64(b.as_ptr() as *const __m128i),
            );
            _mm512_cvtepi8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(x, x), _mm_unpacklo_epi8(x, x)))
        }
    }

    /// [`paired`] for two groups: lanes 0..8 `(a1_c, a2_c)`, lanes 8..16 `(b1_c, b2_c)`.
    #[inline(always)]
    unsafe fn paired_pair(a: [&[u8; GROUP]; 2], b: [&[u8; GROUP]; 2], signed: bool) -> __m512i {
        // SAFETY: inlined only into AVX-512 functions; reads four 8-byte arrays.
        unsafe {
            let l = |x: &[u8; GROUP]| _mm_loadl_epi64(x.as_ptr() as *const __m128i);
            let x = _mm256_set_m128i(_mm_unpacklo_epi8(l(b[0]), l(b[1])), _mm_unpacklo_epi8(l(a[0]), l(a[1])));
            if signed { _mm512_cvtepi8_epi16(x) } else { _mm512_cvtepu8_epi16(x) }
        }
    }

    /// Two adjacent groups (16 columns) at once in 512-bit registers, `a`'s columns in the low half of
    /// every vector: [`body`]'s arithmetic with `vpdpwssd`, operation for operation per column (ggml's
    /// eight lanes and its float order), so the same bits, with each instruction doing twice the
    /// products (a Sapphire Rapids core issues 512-bit ones as fast as 256-bit ones).
    pub fn pair_vnni<F: Format>(
        a: &[Group8],
        b: &[Group8],
        q: &Q8KRows,
        rows: &[usize],
        tile: &mut [[f32; 2 * GROUP]; RUN],
    ) {
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn run<F: Format, const R: usize>(
            wa: &[Group8],
            wb: &[Group8],
            q: &Q8KRows,
            rows: &[usize; R],
            tile: &mut [[f32; 2 * GROUP]; RUN],
        ) {
            // SAFETY: compiled for the features `pair_body` uses.
            unsafe {
                pair_body::<F, R>(
                    wa,
                    wb,
                    q,
                    rows,
                    tile,
                    |_, wa, wb| std::array::from_fn(|t| doubled_pair(&wa.sc[t], &wb.sc[t])),
                    |_, wa, wb, s, v| unsigned_pair::<F>(wa, wb, s, v),
                )
            }
        }
        // SAFETY: only called when the CPU has AVX-512 F, BW, VNNI and VL besides AVX2 and FMA
        // (models::cpu's `avx512_vnni`).
        unsafe { by_rows!(run::<F>(a, b, q), rows, tile) }
    }

    /// A pair of groups' weight vectors and doubled scales, unpacked once for every run of rows that
    /// goes over them (a prefill runs sixteen per 64-row block): unpacking is a third to a half of the
    /// kernel's vector instructions at four rows, on the two ports `vpdpwssd` needs.
    #[derive(Default)]
    pub struct Unpacked {
        /// The tile these hold, or none yet.
        key: Option<usize>,
        /// Super-block `b`'s weight vector `(s, v)` at `64b + 8s + v`.
        w: Vec<__m512i>,
        /// Super-block `b`'s sixteen doubled scales at `16b..`.
        scales: Vec<__m512i>,
    }

    impl Unpacked {
        /// Writes rows `rows` of columns `cols.0..cols.0 + cols.1` (at most 16) into `out`: the products
        /// with the pair `(wa, wb)`, in runs of [`RUN`] rows, unpacking it only when `key` differs from
        /// the tile unpacked last. [`pair_vnni`]'s arithmetic, operation for operation, so the same bits.
        ///
        /// # Safety
        /// The CPU must have AVX-512 F, BW, VNNI and VL besides AVX2 and FMA (models::cpu's
        /// `avx512_vnni`), and the columns must be the calling task's own (see [`Out::set_span`]).
        /// Compiled for those features, so no legacy SSE code runs between runs, whose rows are built
        /// here (see `q8_0`'s `wide_vnni`).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        pub unsafe fn tile_vnni<F: Format>(
            &mut self,
            key: usize,
            wa: &[Group8],
            wb: &[Group8],
            q: &Q8KRows,
            rows: Range<usize>,
            (c0, width): (usize, usize),
            out: &Out,
        ) {
            assert!(wa.len() == wb.len() && width <= 2 * GROUP);
            // SAFETY: compiled for the features the kernels use (the caller's promise that they run);
            // the columns are the caller's.
            unsafe {
                if self.key != Some(key) {
                    self.fill::<F>(wa, wb);
                    self.key = Some(key);
                }
                let mut tile = [[0f32; 2 * GROUP]; RUN];
                for r0 in rows.clone().step_by(RUN) {
                    let n = (rows.end - r0).min(RUN);
                    match n {
                        4 => self.sums::<F, 4>(wa, wb, q, r0, &mut tile),
                        3 => self.sums::<F, 3>(wa, wb, q, r0, &mut tile),
                        2 => self.sums::<F, 2>(wa, wb, q, r0, &mut tile),
                        _ => self.sums::<F, 1>(wa, wb, q, r0, &mut tile),
                    }
                    for (i, row) in tile.iter().enumerate().take(n) {
                        out.set_span(r0 + i, c0, &row[..width]);
                    }
                }
            }
        }

        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn fill<F: Format>(&mut self, wa: &[Group8], wb: &[Group8]) {
            let kb = wa.len();
            self.w.resize(64 * kb, _mm512_setzero_si512());
            self.scales.resize(16 * kb, _mm512_setzero_si512());
            // SAFETY: compiled for AVX-512 F and BW; the unpacking reads whole arrays.
            unsafe {
                for (b, (wa, wb)) in wa.iter().zip(wb).enumerate() {
                    for s in 0..8 {
                        for v in 0..8 {
                            self.w[64 * b + 8 * s + v] = unsigned_pair::<F>(wa, wb, s, v);
                        }
                    }
                    for t in 0..16 {
                        self.scales[16 * b + t] = doubled_pair(&wa.sc[t], &wb.sc[t]);
                    }
                }
            }
        }

        /// One run of `R` rows from `r0` on the unpacked tile.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni,avx512vl")]
        #[inline(never)]
        unsafe fn sums<F: Format, const R: usize>(
            &self,
            wa: &[Group8],
            wb: &[Group8],
            q: &Q8KRows,
            r0: usize,
            tile: &mut [[f32; 2 * GROUP]; RUN],
        ) {
            let kb = wa.len();
            assert!(self.w.len() == 64 * kb && self.scales.len() == 16 * kb);
            let rows: [usize; R] = std::array::from_fn(|i| r0 + i);
            let (w, sc) = (&self.w, &self.scales);
            // SAFETY: compiled for the features `pair_body` uses; the indexes are below the lengths
            // checked above.
            unsafe {
                pair_body::<F, R>(
                    wa,
                    wb,
                    q,
                    &rows,
                    tile,
                    |b, _, _| *(sc.as_ptr().add(16 * b) as *const [__m512i; 16]),
                    |b, _, _, s, v| *w.get_unchecked(64 * b + 8 * s + v),
                )
            }
        }
    }

    /// [`pair_vnni`]'s body: `scales(b, wa, wb)` gives super-block `b`'s sixteen doubled scales and
    /// `weights(b, wa, wb, s, v)` its weight vector `v` of chunk `s`, as unsigned bytes (unpacked there
    /// or loaded from an [`Unpacked`] tile).
    #[inline(always)]
    unsafe fn pair_body<F: Format, const R: usize>(
        wa: &[Group8],
        wb: &[Group8],
        q: &Q8KRows,
        rows: &[usize; R],
        tile: &mut [[f32; 2 * GROUP]; RUN],
        scales: impl Fn(usize, &Group8, &Group8) -> [__m512i; 16],
        weights: impl Fn(usize, &Group8, &Group8, usize, usize) -> __m512i,
    ) {
        assert_eq!(wa.len(), wb.len());
        let kb = wa.len();
        // SAFETY: inlined only into functions compiled for AVX-512 F, BW, VNNI and VL; loads read whole
        // arrays.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 8]; R];
            let mut acc_m = [[_mm512_setzero_ps(); 4]; R];
            let mut summs = [_mm512_setzero_ps(); R];
            for (b, (wa, wb)) in wa.iter().zip(wb).enumerate() {
                prefetch_ahead(wa);
                prefetch_ahead(wb);
                let a: [_; R] = std::array::from_fn(|i| &q[rows[i] * kb + b]);
                let scales: [__m512i; 16] = scales(b, wa, wb);
                let d = f32_pair(&wa.d, &wb.d);
                let dd: [__m512; R] = std::array::from_fn(|i| _mm512_mul_ps(_mm512_set1_ps(a[i].d), d));
                for v in 0..8 {
                    let mut sumi = [_mm512_setzero_si512(); R];
                    for s in 0..8 {
                        let wv = weights(b, wa, wb, s, v);
                        let scale = scales[2 * s + v / 4];
                        for i in 0..R {
                            let x = quad512(&*(a[i].qs.as_ptr().add(32 * s) as *const [i8; 32]), v);
                            sumi[i] = _mm512_dpwssd_epi32(sumi[i], scale, _mm512_maddubs_epi16(wv, x));
                        }
                    }
                    if F::OFFSET != 0 {
                        let sc = paired_pair(
                            [bytes(&wa.sc[2 * v]), bytes(&wa.sc[2 * v + 1])],
                            [bytes(&wb.sc[2 * v]), bytes(&wb.sc[2 * v + 1])],
                            true,
                        );
                        for i in 0..R {
                            let sub = _mm512_madd_epi16(sc, _mm512_set1_epi32(a[i].pair16[v]));
                            sumi[i] = _mm512_sub_epi32(sumi[i], _mm512_slli_epi32::<5>(sub));
                        }
                    }
                    for i in 0..R {
                        acc[i][v] = _mm512_fmadd_ps(dd[i], _mm512_cvtepi32_ps(sumi[i]), acc[i][v]);
                    }
                }
                if F::OFFSET == 0 {
                    let dmin = f32_pair(&wa.dmin, &wb.dmin);
                    for i in 0..R {
                        let dm = _mm512_mul_ps(_mm512_set1_ps(-a[i].d), dmin);
                        let mut total = _mm512_setzero_si512();
                        for (t, lane) in acc_m[i].iter_mut().enumerate() {
                            let m =
                                paired_pair([&wa.m[2 * t], &wa.m[2 * t + 1]], [&wb.m[2 * t], &wb.m[2 * t + 1]], false);
                            let prod = _mm512_madd_epi16(m, _mm512_set1_epi32(a[i].pair32[t]));
                            if F::HI == 1 {
                                total = _mm512_add_epi32(total, prod);
                            } else {
                                *lane = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(prod), *lane);
                            }
                        }
                        if F::HI == 1 {
                            summs[i] = _mm512_fmadd_ps(dm, _mm512_cvtepi32_ps(total), summs[i]);
                        }
                    }
                }
            }
            for i in 0..R {
                let l = &acc[i];
                let even = _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6]));
                let odd = _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7]));
                let mut sum = _mm512_add_ps(even, odd);
                if F::OFFSET == 0 {
                    let m = &acc_m[i];
                    let extra = if F::HI == 1 {
                        summs[i]
                    } else {
                        _mm512_add_ps(_mm512_add_ps(m[0], m[2]), _mm512_add_ps(m[1], m[3]))
                    };
                    sum = _mm512_add_ps(sum, extra);
                }
                _mm512_storeu_ps(tile[i].as_mut_ptr(), sum);
            }
        }
    }

    /// Eight i8 (one per column) as i16 pairs `(x_c, x_c)`, one per 32-bit lane: what `vpmaddwd`
    /// multiplies a lane's two pair sums by.
    #[inline(always)]
    unsafe fn doubled(x: &[i8; GROUP]) -> __m256i {
        // SAFETY: inlined only into AVX2 functions; reads the 8-byte array.
        unsafe {
            let b = _mm_loadl_epi64(x.as_ptr() as *const __m128i);
            _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b, b))
        }
    }

    /// Two rows of eight bytes as i16 pairs `(a_c, b_c)` per lane (`signed` sign-extends, else zero).
    #[inline(always)]
    unsafe fn paired(a: &[u8; GROUP], b: &[u8; GROUP], signed: bool) -> __m256i {
        // SAFETY: inlined only into AVX2 functions; reads two 8-byte arrays.
        unsafe {
            let x = _mm_unpacklo_epi8(
                _mm_loadl_epi64(a.as_ptr() as *const __m128i),
                _mm_loadl_epi64(b.as_ptr() as *const __m128i),
            );
            if signed { _mm256_cvtepi8_epi16(x) } else { _mm256_cvtepu8_epi16(x) }
        }
    }

    fn bytes(x: &[i8; GROUP]) -> &[u8; GROUP] {
        // SAFETY: same size and alignment; every bit pattern is valid for both.
        unsafe { &*(x as *const [i8; GROUP] as *const [u8; GROUP]) }
    }

    /// ggml's order (see `ggml_order`), eight columns per instruction: accumulator `v` of a row holds
    /// lane `v` of all eight columns. A super-block is walked lane by lane, so one integer register per
    /// row is live; the accumulators of a run live in L1 where registers run out.
    pub fn avx2<F: Format>(wg: &[Group8], q: &Q8KRows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<F: Format, const R: usize>(
            wg: &[Group8],
            q: &Q8KRows,
            rows: &[usize; R],
            tile: &mut [[f32; GROUP]; RUN],
        ) {
            // SAFETY: compiled for AVX2 and FMA.
            unsafe {
                body::<F, R>(wg, q, rows, tile, |sumi, scale, p| _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p)))
            }
        }
        // SAFETY: the kernel is built only where `supported()` (AVX2 and FMA) holds.
        unsafe { by_rows!(run::<F>, wg, q, rows, tile) }
    }

    /// The AVX2 kernel's body: `scaled(sumi, scale, p)` adds the i16 pair sums `p` times
    /// their sub-block scales to the i32 lanes `sumi`.
    #[inline(always)]
    unsafe fn body<F: Format, const R: usize>(
        wg: &[Group8],
        q: &Q8KRows,
        rows: &[usize; R],
        tile: &mut [[f32; GROUP]; RUN],
        scaled: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let kb = wg.len();
        // SAFETY: inlined only into `avx2`'s function, compiled for AVX2+FMA; loads read whole arrays.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 8]; R];
            let mut acc_m = [[_mm256_setzero_ps(); 4]; R];
            let mut summs = [_mm256_setzero_ps(); R];
            for (b, w) in wg.iter().enumerate() {
                prefetch_ahead(w);
                let a: [_; R] = std::array::from_fn(|i| &q[rows[i] * kb + b]);
                let scales: [__m256i; 16] = std::array::from_fn(|t| doubled(&w.sc[t]));
                let d = _mm256_loadu_ps(w.d.as_ptr());
                let dd: [__m256; R] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_set1_ps(a[i].d), d));
                for v in 0..8 {
                    let mut sumi = [_mm256_setzero_si256(); R];
                    for s in 0..8 {
                        let wv = unsigned::<F>(w, s, v);
                        let scale = scales[2 * s + v / 4];
                        for i in 0..R {
                            let x = quad(&*(a[i].qs.as_ptr().add(32 * s) as *const [i8; 32]), v);
                            sumi[i] = scaled(sumi[i], scale, _mm256_maddubs_epi16(wv, x));
                        }
                    }
                    if F::OFFSET != 0 {
                        let sc = paired(bytes(&w.sc[2 * v]), bytes(&w.sc[2 * v + 1]), true);
                        for i in 0..R {
                            let sub = _mm256_madd_epi16(sc, _mm256_set1_epi32(a[i].pair16[v]));
                            sumi[i] = _mm256_sub_epi32(sumi[i], _mm256_slli_epi32(sub, 5));
                        }
                    }
                    for i in 0..R {
                        acc[i][v] = _mm256_fmadd_ps(dd[i], _mm256_cvtepi32_ps(sumi[i]), acc[i][v]);
                    }
                }
                if F::OFFSET == 0 {
                    let dmin = _mm256_loadu_ps(w.dmin.as_ptr());
                    for i in 0..R {
                        let dm = _mm256_mul_ps(_mm256_set1_ps(-a[i].d), dmin);
                        let mut total = _mm256_setzero_si256();
                        for (t, lane) in acc_m[i].iter_mut().enumerate() {
                            let m = paired(&w.m[2 * t], &w.m[2 * t + 1], false);
                            let prod = _mm256_madd_epi16(m, _mm256_set1_epi32(a[i].pair32[t]));
                            if F::HI == 1 {
                                total = _mm256_add_epi32(total, prod);
                            } else {
                                *lane = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(prod), *lane);
                            }
                        }
                        if F::HI == 1 {
                            summs[i] = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(total), summs[i]);
                        }
                    }
                }
            }
            for i in 0..R {
                let mut sum = hsum_lanes(&acc[i]);
                if F::OFFSET == 0 {
                    let m = &acc_m[i];
                    let extra = if F::HI == 1 {
                        summs[i]
                    } else {
                        _mm256_add_ps(_mm256_add_ps(m[0], m[2]), _mm256_add_ps(m[1], m[3]))
                    };
                    sum = _mm256_add_ps(sum, extra);
                }
                _mm256_storeu_ps(tile[i].as_mut_ptr(), sum);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub fn select<F: super::Format>() -> super::DotFn {
        unreachable!("supported() is false off x86-64")
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The AVX2 and 16-column VNNI kernels give the scalar reference's floats bit for bit (same integers, same
    /// order), on a matrix with a padded group and runs of two rows and of one; and the decoded values
    /// times the scales are candle's own dequantization.
    fn check<F: Format>() {
        if !supported() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k, rows) = (13, 512, 5);
        // Scaled up so Q8_K activations and the weights use their whole ranges, with some large outliers.
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&w, F::DTYPE).unwrap();
        let m = KMatrix::<F>::from_qtensor(&qt).unwrap();
        let deq = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kb = k / QK_K;
        for col in 0..n {
            let (g, c) = (col / GROUP, col % GROUP);
            for b in 0..kb {
                let w = &m.groups[g * kb + b];
                for i in 0..QK_K {
                    let want = deq[col * k + b * QK_K + i];
                    let got = w.d[c] * w.sc[i / 16][c] as f32 * (value::<F>(w, c, i) - F::OFFSET) as f32
                        - w.dmin[c] * w.m[i / 32][c] as f32;
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{:?} col {col} [{i}]: {got} vs {want}",
                        F::DTYPE
                    );
                }
            }
        }
        let xs = Tensor::randn(0f32, 3.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_k(&xs);
        for g in 0..n.div_ceil(GROUP) {
            let wg = &m.groups[g * kb..(g + 1) * kb];
            // Every x86 path this CPU has, whatever the cap: the VNNI one must give the same bits.
            let paths: Vec<(&str, DotFn)> = vec![("avx2", x86::avx2::<F>)];
            if cpu::detect().avx512_vnni {
                // The 16-column kernel, with this group in either half (its neighbour, or itself when it is
                // the last, in the other).
                let other = &m.groups[((g + 1) % n.div_ceil(GROUP)) * kb..][..kb];
                for (half, (a, b)) in [(0, (wg, other)), (1, (other, wg))] {
                    for run in [&[0, 1, 2, 3][..], &[1, 4, 0], &[2, 3], &[4]] {
                        let mut got = [[0f32; 2 * GROUP]; RUN];
                        x86::pair_vnni::<F>(a, b, &q, run, &mut got);
                        for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                            let want = ggml_order::<F>(wg, &q, run[i], c);
                            let got = got[i][half * GROUP + c];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{:?} pair half {half}: group {g} col {c}",
                                F::DTYPE
                            );
                        }
                    }
                    // The unpacked tile over rows 0..5 (runs of four and one), twice: the second time
                    // from what the first unpacked.
                    let mut unpacked = x86::Unpacked::default();
                    for _ in 0..2 {
                        let mut buf = vec![f32::NAN; rows * 2 * GROUP];
                        let out = Out::new(&mut buf, rows, 2 * GROUP);
                        // SAFETY: the CPU has AVX-512 VNNI (checked above); nothing else writes.
                        unsafe { unpacked.tile_vnni::<F>(half, a, b, &q, 0..rows, (0, 2 * GROUP), &out) };
                        for (r, c) in (0..rows).flat_map(|r| (0..GROUP).map(move |c| (r, c))) {
                            let want = ggml_order::<F>(wg, &q, r, c);
                            let got = buf[r * 2 * GROUP + half * GROUP + c];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{:?} unpacked half {half}: group {g} row {r} col {c}",
                                F::DTYPE
                            );
                        }
                    }
                }
            }
            for (path, dot) in paths {
                for run in [&[0, 1, 2, 3][..], &[1, 4, 0], &[2, 3], &[4]] {
                    let mut got = [[0f32; GROUP]; RUN];
                    dot(wg, &q, run, &mut got);
                    for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                        let want = ggml_order::<F>(wg, &q, run[i], c);
                        assert_eq!(
                            got[i][c].to_bits(),
                            want.to_bits(),
                            "{:?} {path}: group {g} row {} col {c}",
                            F::DTYPE,
                            run[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for i in -3_000_000..3_000_000 {
            let v = i as f32 * 0.000_05;
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        for v in [0.5f32, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -127.5, 127.49999, 0.499_999_97, -0.499_999_97] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
    }

    /// The AVX2 activation quantizer gives the scalar one's bytes and scale, on blocks built to hit its
    /// edges: ties of magnitude with either sign first, exact halves after scaling, zeros, NaN, infinity,
    /// and scales too large for it (which it must leave to the scalar code).
    #[test]
    fn avx2_quantizer_matches_the_scalar_one() {
        if !cpu::detect().avx2_fma {
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        for k in 0..2000 {
            let scale = [1e-3f32, 1.0, 37.5, 1e4][k % 4];
            let mut b: Vec<f32> =
                (0..QK_K).map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale).collect();
            match k % 5 {
                // The largest magnitude twice, the negative one first or second.
                1 | 2 => {
                    let (i, j) = ((next() % 128) as usize, 128 + (next() % 128) as usize);
                    let sgn = if k % 5 == 1 { -1.0 } else { 1.0 };
                    (b[i], b[j]) = (sgn * scale, -sgn * scale);
                }
                // Values on exact halves once scaled by 127 / 127.
                3 => b.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 255) as f32 - 127.0) * 0.5),
                _ => {}
            }
            blocks.push(b);
        }
        blocks.push(vec![0.0; QK_K]);
        blocks.push((0..QK_K).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect());
        let mut nan = blocks[7].clone();
        nan[5] = f32::NAN;
        nan[200] = f32::NAN;
        blocks.push(nan);
        let mut inf = blocks[8].clone();
        inf[9] = f32::NEG_INFINITY;
        blocks.push(inf);
        blocks.push((0..QK_K).map(|i| i as f32 * 1e-37).collect());
        blocks.push((0..QK_K).map(|i| (i as f32 - 100.0) * 1e-32).collect());
        for (k, b) in blocks.iter().enumerate() {
            let (mut want, mut got) = (([0i8; QK_K], 0f32), ([0i8; QK_K], 0f32));
            quantize_values(b, &mut want.0, &mut want.1);
            // SAFETY: checked for AVX2 above.
            if !unsafe { x86::quantize_values(b, &mut got.0, &mut got.1) } {
                assert_eq!(got, ([0i8; QK_K], 0f32), "block {k}: declined but wrote");
                assert!(k >= blocks.len() - 2, "block {k}: declined an ordinary scale");
                continue;
            }
            assert_eq!(got.0, want.0, "block {k}: values");
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "block {k}: scale");
        }
    }

    #[test]
    fn avx2_matches_the_reference_and_decoding_matches_candle() {
        check::<Q4K>();
        check::<Q5K>();
        check::<Q6K>();
    }

    /// The whole product (threads, tiles, padded groups) equals the exact sum of the dequantized weights
    /// times the quantized activations, to f32 rounding, for every format on odd shapes. (candle's own
    /// Q6_K AVX2 dot is off by up to ~1e-3 of the output's scale when a sub-block scale is -128, so it is
    /// not the oracle here.)
    #[test]
    fn products_equal_the_exact_sums_of_their_quantized_operands() {
        fn check<F: Format>() {
            if !supported() {
                return;
            }
            let dev = Device::Cpu;
            for (rows, n, kb) in [(1, 33, 1), (5, 129, 2), (17, 40, 3), (9, 8, 1)] {
                let k = kb * QK_K;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let qt = QTensor::quantize(&w, F::DTYPE).unwrap();
                let deq = qt.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let xs =
                    Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = super::super::matmul(&KMatrix::<F>::from_qtensor(&qt).unwrap(), &xs, rows);
                let q = quantize_q8_k(&xs);
                let want: Vec<f64> = (0..rows * n)
                    .map(|i| {
                        let (r, c) = (i / n, i % n);
                        (0..k)
                            .map(|j| {
                                let b = &q[r * kb + j / QK_K];
                                deq[c * k + j] as f64 * (b.qs[j % QK_K] as f64 * b.d as f64)
                            })
                            .sum()
                    })
                    .collect();
                let scale = want.iter().fold(1f64, |a, v| a.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * scale,
                        "{:?} rows {rows} n {n} [{i}]: {g} vs {w}",
                        F::DTYPE
                    );
                }
            }
        }
        check::<Q4K>();
        check::<Q5K>();
        check::<Q6K>();
    }
}
