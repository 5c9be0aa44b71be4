//! Q8_0 and Q4_0 weights against Q8_0 activations: ggml's AVX2 `ggml_vec_dot_q8_0_q8_0` /
//! `ggml_vec_dot_q4_0_q8_0` (the i8 x i8 products through the sign trick, one f32 fma per block into
//! eight lanes, ggml's horizontal sum), with each weight block loaded once for up to four activation
//! rows and the f16 block scales converted once at load instead of once per dot product. SmolLM2's
//! output head is Q8_0: 49152 columns, a fifth of every decode step.
//!
//! x86-64 only (AVX-512 VNNI or AVX2+FMA, chosen at run time); elsewhere, and on x86 CPUs without AVX2,
//! these types go through candle's per-block `vec_dot` inside the same tiling (NEON on arm64).
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;

use super::{Kernel, Out};
use crate::models::cpu;

const QK: usize = 32;

/// One block of activations quantized to Q8_0 (the f16 scale kept as the f32 it converts to).
#[derive(Clone, Copy)]
pub struct Q8_0Block {
    qs: [i8; 32],
    d: f32,
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

pub fn quantize_q8_0(x: &[f32]) -> Q8_0Rows {
    let simd = cpu::features().avx2_fma;
    super::par_map_units(x, QK, |x, out| {
        out.reserve(x.len() / QK);
        for xs in x.chunks_exact(QK) {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA; the chunk holds 32 values.
                let (qs, _, amax) = unsafe { super::x86::quantize_block(xs) };
                out.push(Q8_0Block { qs, d: f16::from_f32(amax / 127.0).to_f32() });
                continue;
            }
            let _ = simd;
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = round_half_away(v * id) as i8;
            }
            out.push(Q8_0Block { qs, d: f16::from_f32(d).to_f32() });
        }
    })
}

/// The weight blocks of one format: 32 signed values each, and a scale.
pub trait Q8Weights: Send + Sync {
    const DTYPE: GgmlDType;
    /// Bytes per block in the GGUF data (f16 scale first).
    const BYTES: usize;
    fn parse(block: &[u8]) -> Self;
    #[cfg_attr(not(test), allow(dead_code))]
    fn values(&self) -> [i8; 32];
}

impl Q8Weights for [i8; 32] {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BYTES: usize = 34;
    fn parse(block: &[u8]) -> Self {
        std::array::from_fn(|i| block[2 + i] as i8)
    }
    fn values(&self) -> [i8; 32] {
        *self
    }
}

impl Q8Weights for [u8; 16] {
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BYTES: usize = 18;
    fn parse(block: &[u8]) -> Self {
        block[2..18].try_into().expect("16 bytes")
    }
    fn values(&self) -> [i8; 32] {
        std::array::from_fn(|i| if i < 16 { (self[i] & 0x0F) as i8 - 8 } else { (self[i - 16] >> 4) as i8 - 8 })
    }
}

/// A `[n, k]` matrix of Q8_0 (`W = [i8; 32]`) or Q4_0 (`W = [u8; 16]`) blocks.
pub struct Q8Matrix<W> {
    n: usize,
    kb: usize,
    qs: Vec<W>,
    d: Vec<f32>,
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
        let mut qs = Vec::with_capacity(n * kb);
        let mut d = Vec::with_capacity(n * kb);
        for block in data.chunks_exact(W::BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            qs.push(W::parse(block));
        }
        Ok(Self { n, kb, qs, d })
    }
}

/// Dots of one weight column with up to four activation rows.
type DotFn<W> = fn(&[W], &[f32], &Q8_0Rows, &[usize], &mut [f32; 4]);

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
        quantize_q8_0(x)
    }

    fn columns(&self, q: &Q8_0Rows, rows: usize, cols: Range<usize>, out: &Out) {
        let dot: DotFn<W> = x86::select();
        let kb = self.kb;
        super::four_row_tiles(rows, cols, out, |c, group, four| {
            let w = c * kb..(c + 1) * kb;
            dot(&self.qs[w.clone()], &self.d[w], q, group, four)
        });
    }
}

/// ggml's generic dot (integer block sums, one f32 multiply-add per block): the reference in tests.
#[cfg(test)]
fn dot_portable<W: Q8Weights>(wq: &[W], wd: &[f32], q: &Q8_0Rows, rows: &[usize], out: &mut [f32; 4]) {
    let kb = wq.len();
    for (i, &r) in rows.iter().enumerate() {
        let mut sumf = 0f32;
        for b in 0..kb {
            let w = wq[b].values();
            let x = &q[r * kb + b].qs;
            let sumi: i32 = (0..32).map(|j| w[j] as i32 * x[j] as i32).sum();
            sumf += sumi as f32 * (wd[b] * q[r * kb + b].d);
        }
        out[i] = sumf;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{hsum_float_8, lane_sums_avx2, lane_sums_vnni, nibbles};
    use super::{DotFn, Q8_0Rows};
    use crate::models::cpu;

    /// A weight block as 32 signed bytes in a register.
    pub trait Unpack: Sized + 'static {
        unsafe fn unpack(&self) -> __m256i;
    }

    impl Unpack for [i8; 32] {
        #[inline(always)]
        unsafe fn unpack(&self) -> __m256i {
            // SAFETY: reads exactly the 32 bytes of the array.
            unsafe { _mm256_loadu_si256(self.as_ptr() as *const __m256i) }
        }
    }

    impl Unpack for [u8; 16] {
        #[inline(always)]
        unsafe fn unpack(&self) -> __m256i {
            // SAFETY: inlined only into AVX2 functions.
            unsafe { _mm256_sub_epi8(nibbles(self), _mm256_set1_epi8(8)) }
        }
    }

    pub fn select<W: Unpack>() -> DotFn<W> {
        let f = cpu::features();
        if f.avx512_vnni { vnni::<W> } else { avx2::<W> }
    }

    fn avx2<W: Unpack>(wq: &[W], wd: &[f32], q: &Q8_0Rows, rows: &[usize], out: &mut [f32; 4]) {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<W: Unpack>(wq: &[W], wd: &[f32], q: &Q8_0Rows, rows: &[usize], out: &mut [f32; 4]) {
            // SAFETY: compiled for AVX2+FMA.
            unsafe { body(wq, wd, q, rows, out, |w, x| lane_sums_avx2(w, x)) }
        }
        // SAFETY: `select` (the only way here) and `supported()` (the only way to build this kernel) both
        // require AVX2 and FMA.
        unsafe { run(wq, wd, q, rows, out) }
    }

    fn vnni<W: Unpack>(wq: &[W], wd: &[f32], q: &Q8_0Rows, rows: &[usize], out: &mut [f32; 4]) {
        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        unsafe fn run<W: Unpack>(wq: &[W], wd: &[f32], q: &Q8_0Rows, rows: &[usize], out: &mut [f32; 4]) {
            // SAFETY: compiled for AVX-512 VNNI.
            unsafe { body(wq, wd, q, rows, out, |w, x| lane_sums_vnni(w, x)) }
        }
        // SAFETY: selected only when the CPU has AVX-512 VNNI and VL.
        unsafe { run(wq, wd, q, rows, out) }
    }

    #[inline(always)]
    unsafe fn body<W: Unpack>(
        wq: &[W],
        wd: &[f32],
        q: &Q8_0Rows,
        rows: &[usize],
        out: &mut [f32; 4],
        sums: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let kb = wq.len();
        // SAFETY: inlined only into the `target_feature` functions above; loads read whole arrays.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..kb {
                let wv = wq[b].unpack();
                // ggml's mul_sum_i8_pairs_float: |w| times x with w's sign, as u8 x i8.
                let aw = _mm256_sign_epi8(wv, wv);
                for (i, &r) in rows.iter().enumerate() {
                    let a = r * kb + b;
                    let xv = _mm256_loadu_si256(q[a].qs.as_ptr() as *const __m256i);
                    let lanes = _mm256_cvtepi32_ps(sums(aw, _mm256_sign_epi8(xv, wv)));
                    acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * q[a].d), lanes, acc[i]);
                }
            }
            for i in 0..rows.len() {
                out[i] = hsum_float_8(acc[i]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub trait Unpack {}
    impl Unpack for [i8; 32] {}
    impl Unpack for [u8; 16] {}
    pub fn select<W>() -> super::DotFn<W> {
        unreachable!("supported() is false off x86-64")
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn check<W: Q8Weights + x86::Unpack>(dtype: GgmlDType) {
        if !supported() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k) = (7, 320);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q8Matrix::<W>::from_qtensor(&QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (4, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_0(&xs);
        let kb = k / QK;
        for c in 0..n {
            let w = c * kb..(c + 1) * kb;
            let (mut want, mut got) = ([0f32; 4], [0f32; 4]);
            dot_portable(&m.qs[w.clone()], &m.d[w.clone()], &q, &[0, 1, 2, 3], &mut want);
            x86::select::<W>()(&m.qs[w.clone()], &m.d[w.clone()], &q, &[0, 1, 2, 3], &mut got);
            for i in 0..4 {
                assert!((got[i] - want[i]).abs() <= 1e-4 * want[i].abs().max(1.0), "{dtype:?} col {c} row {i}");
            }
        }
    }

    #[test]
    fn simd_agrees_with_ggmls_generic_dot() {
        check::<[i8; 32]>(GgmlDType::Q8_0);
        check::<[u8; 16]>(GgmlDType::Q4_0);
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
