//! Q4_1 weights times f32 activations on the CPU, column-stationary: each weight column is read once and
//! applied to every activation row of the batch while it sits in L1, and columns are split across the
//! compute threads. The integer block dot products use AVX2 where the CPU has it (checked at run time).
//!
//! Numerics equal candle's (and so ggml's) Q4_1 x Q8_1 path bit for bit: activations are quantized to
//! Q8_1 per 32-value block exactly as candle does, the integer sums are exact, and the float
//! accumulation `sum += (sumi * d_w * d_x) + m_w * s_x` keeps candle's order. candle's own kernel for
//! this type is scalar, which made it 85% of a decode step.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// A `[n, k]` Q4_1 matrix unpacked into arrays the kernel reads directly.
pub struct Q4_1Matrix {
    n: usize,
    k_blocks: usize,
    /// `n * k_blocks` blocks of 16 bytes: low nibbles are values 0..16, high nibbles 16..32.
    qs: Vec<[u8; 16]>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// Activations quantized to Q8_1, one row after another.
struct Q8_1Rows {
    qs: Vec<[i8; 32]>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q4_1Matrix {
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        if t.dtype() != GgmlDType::Q4_1 {
            bail!("expected Q4_1 weights, got {:?}", t.dtype());
        }
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            bail!("Q4_1 rows of {k} values are not whole blocks");
        }
        let k_blocks = k / QK;
        let data = t.data()?;
        if data.len() != n * k_blocks * 20 {
            bail!("Q4_1 data of {} bytes for a {n}x{k} matrix", data.len());
        }
        let mut qs = Vec::with_capacity(n * k_blocks);
        let mut d = Vec::with_capacity(n * k_blocks);
        let mut m = Vec::with_capacity(n * k_blocks);
        // Block layout (ggml's block_q4_1): d f16, m f16, qs[16].
        for block in data.chunks_exact(20) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            m.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
            qs.push(block[4..20].try_into().expect("16 bytes"));
        }
        Ok(Self { n, k_blocks, qs, d, m })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `x` is `[rows, k]` row-major; returns `[rows, n]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let k = self.k_blocks * QK;
        assert_eq!(x.len(), rows * k, "activation shape");
        let q = quantize_q8_1(x);
        let dot = select_dot();
        let n = self.n;
        // Columns per task: enough work to amortize scheduling, several tasks per thread for balance.
        let chunk = (n / (rayon::current_num_threads() * 8)).clamp(16, 256);
        let mut out = vec![0f32; rows * n];
        let parts: Vec<(usize, Vec<f32>)> = (0..n)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| {
                let c1 = (c0 + chunk).min(n);
                let mut part = vec![0f32; rows * (c1 - c0)];
                for c in c0..c1 {
                    let w = c * self.k_blocks..(c + 1) * self.k_blocks;
                    for r in 0..rows {
                        let a = r * self.k_blocks..(r + 1) * self.k_blocks;
                        part[r * (c1 - c0) + (c - c0)] = dot(
                            &self.qs[w.clone()],
                            &self.d[w.clone()],
                            &self.m[w.clone()],
                            &q.qs[a.clone()],
                            &q.d[a.clone()],
                            &q.s[a],
                        );
                    }
                }
                (c0, part)
            })
            .collect();
        for (c0, part) in parts {
            let width = part.len() / rows.max(1);
            for r in 0..rows {
                out[r * n + c0..r * n + c0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        out
    }
}

/// candle's `BlockQ8_1::from_float`, value for value.
fn quantize_q8_1(x: &[f32]) -> Q8_1Rows {
    let blocks = x.len() / QK;
    let mut out =
        Q8_1Rows { qs: Vec::with_capacity(blocks), d: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks) };
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = f16::from_f32(d);
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for j in 0..16 {
            qs[j] = (xs[j] * id).round() as i8;
            qs[j + 16] = (xs[j + 16] * id).round() as i8;
            sum += qs[j] as i32 + qs[j + 16] as i32;
        }
        out.qs.push(qs);
        out.d.push(dh.to_f32());
        out.s.push((f16::from_f32(sum as f32) * dh).to_f32());
    }
    out
}

type DotFn = fn(&[[u8; 16]], &[f32], &[f32], &[[i8; 32]], &[f32], &[f32]) -> f32;

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return dot_avx2_entry;
    }
    dot_scalar
}

#[inline(always)]
fn accumulate(sums: impl Iterator<Item = i32>, wd: &[f32], wm: &[f32], xd: &[f32], xs: &[f32]) -> f32 {
    let mut sumf = 0f32;
    for (i, sumi) in sums.enumerate() {
        sumf += sumi as f32 * wd[i] * xd[i] + wm[i] * xs[i];
    }
    sumf
}

fn dot_scalar(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], xq: &[[i8; 32]], xd: &[f32], xs: &[f32]) -> f32 {
    let sums = wq.iter().zip(xq).map(|(w, x)| {
        (0..16).map(|j| (w[j] & 0x0F) as i32 * x[j] as i32 + (w[j] >> 4) as i32 * x[j + 16] as i32).sum::<i32>()
    });
    accumulate(sums, wd, wm, xd, xs)
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], xq: &[[i8; 32]], xd: &[f32], xs: &[f32]) -> f32 {
    // SAFETY: only selected after is_x86_feature_detected!("avx2").
    unsafe { dot_avx2(wq, wd, wm, xq, xd, xs) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], xq: &[[i8; 32]], xd: &[f32], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let sums = wq.iter().zip(xq).map(|(w, x)| {
        // SAFETY: the loads read exactly the 16 and 32 bytes of the arrays they point at.
        unsafe {
            let packed = _mm_loadu_si128(w.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
            let wv = _mm256_set_m128i(hi, lo);
            let xv = _mm256_loadu_si256(x.as_ptr() as *const __m256i);
            // u8 x i8 pairs to i16 (at most 2 * 15 * 128: no saturation), then pairs of i16 to i32.
            let p16 = _mm256_maddubs_epi16(wv, xv);
            let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
            let s128 = _mm_add_epi32(_mm256_castsi256_si128(p32), _mm256_extracti128_si256(p32, 1));
            let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
            let s32 = _mm_add_epi32(s64, _mm_shuffle_epi32(s64, 0b01));
            _mm_cvtsi128_si32(s32)
        }
    });
    accumulate(sums, wd, wm, xd, xs)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// Equal to candle's QMatMul bit for bit, for shapes that are not multiples of the column chunk,
    /// with the output poisoned first so that unwritten elements fail.
    #[test]
    fn matches_candles_qmatmul_exactly() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(1, 33, 64), (3, 300, 576), (17, 1536, 128), (5, 7, 64)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let want = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
                .unwrap()
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = Q4_1Matrix::from_qtensor(&qt).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut got = vec![f32::NAN; rows * n];
            got.copy_from_slice(&m.forward(&xs, rows));
            assert_eq!(got, want, "rows {rows} n {n} k {k}");
            // The scalar path agrees with the SIMD one.
            let q = quantize_q8_1(&xs[..k]);
            let c = 3 % n;
            let kb = k / QK;
            let r = c * kb..(c + 1) * kb;
            let s = dot_scalar(&m.qs[r.clone()], &m.d[r.clone()], &m.m[r.clone()], &q.qs, &q.d, &q.s);
            assert_eq!(s, want[c]);
        }
    }
}
