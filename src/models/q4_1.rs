//! Q4_1 weights times f32 activations on the CPU, column-stationary: each weight column is read once and
//! applied to every activation row of the batch while it sits in L1, and columns are split across the
//! compute threads. The integer block dot products use AVX2 where the CPU has it (checked at run time).
//!
//! Numerics follow ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`: activations are quantized to Q8_1 per 32-value
//! block (as candle does), the integer sums are exact, each of the 8 lanes accumulates
//! `(d_w * d_x) * lane_sum` in f32 across blocks, `m_w * s_x` is summed apart, and the lanes are added once
//! at the end. Each unpacked weight block serves up to four activation rows. candle's own kernel for this
//! type is scalar, which made it 85% of a decode step.
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
        let kb = self.k_blocks;
        // Columns per task: enough work to amortize scheduling, several tasks per thread for balance.
        let chunk = (n / (rayon::current_num_threads() * 8)).clamp(16, 256);
        // Poisoned: an element the kernel failed to write stays NaN and fails every comparison.
        let mut out = vec![f32::NAN; rows * n];
        let parts: Vec<(usize, Vec<f32>)> = (0..n)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| {
                let c1 = (c0 + chunk).min(n);
                let width = c1 - c0;
                let mut part = vec![f32::NAN; rows * width];
                let mut four = [0f32; 4];
                for c in c0..c1 {
                    let w = c * kb..(c + 1) * kb;
                    let (wq, wd, wm) = (&self.qs[w.clone()], &self.d[w.clone()], &self.m[w]);
                    for r0 in (0..rows).step_by(4) {
                        let group = [r0, r0 + 1, r0 + 2, r0 + 3];
                        let group = &group[..(rows - r0).min(4)];
                        dot(wq, wd, wm, &q, group, &mut four);
                        for (i, &r) in group.iter().enumerate() {
                            part[r * width + (c - c0)] = four[i];
                        }
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

/// Dots of one weight column (its `k_blocks` blocks) with up to four activation rows into `out`.
type DotFn = fn(&[[u8; 16]], &[f32], &[f32], &Q8_1Rows, &[usize], &mut [f32; 4]);

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return dot_avx2_entry;
    }
    dot_scalar
}

/// ggml's generic `ggml_vec_dot_q4_1_q8_1`.
fn dot_scalar(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
    let kb = wq.len();
    for (i, &r) in rows.iter().enumerate() {
        let mut sumf = 0f32;
        for b in 0..kb {
            let (w, x) = (&wq[b], &q.qs[r * kb + b]);
            let sumi: i32 =
                (0..16).map(|j| (w[j] & 0x0F) as i32 * x[j] as i32 + (w[j] >> 4) as i32 * x[j + 16] as i32).sum();
            sumf += (wd[b] * q.d[r * kb + b]) * sumi as f32 + wm[b] * q.s[r * kb + b];
        }
        out[i] = sumf;
    }
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
    // SAFETY: only selected after is_x86_feature_detected!("avx2") and ("fma").
    unsafe { dot_avx2(wq, wd, wm, q, rows, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let kb = wq.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0F);
    for b in 0..kb {
        // SAFETY: the loads read exactly the 16 and 32 bytes of the arrays they point at.
        unsafe {
            let packed = _mm_loadu_si128(wq[b].as_ptr() as *const __m128i);
            let wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
            for (i, &r) in rows.iter().enumerate() {
                let a = r * kb + b;
                let xv = _mm256_loadu_si256(q.qs[a].as_ptr() as *const __m256i);
                // u8 x i8 pairs to i16 (at most 2 * 15 * 128: no saturation), pairs of i16 to i32, to f32.
                let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * q.d[a]), lanes, acc[i]);
                summs[i] += wm[b] * q.s[a];
            }
        }
    }
    for i in 0..rows.len() {
        // ggml's hsum_float_8.
        let x = acc[i];
        let mut res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        out[i] = _mm_cvtss_f32(res) + summs[i];
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// Within float tolerance of candle's QMatMul for shapes that are not multiples of the column chunk or
    /// of the four-row group; unwritten elements would stay NaN (the output is poisoned) and fail.
    #[test]
    fn matches_candles_qmatmul() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(1, 33, 64), (3, 300, 576), (17, 1536, 128), (5, 7, 64), (6, 40, 1536)] {
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
            let got = m.forward(&xs, rows);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * scale.max(1.0), "rows {rows} n {n} k {k} [{i}]: {g} vs {w}");
            }
            // The scalar path agrees with the SIMD one.
            let q = quantize_q8_1(&xs);
            let kb = k / QK;
            let mut four = [0f32; 4];
            dot_scalar(&m.qs[..kb], &m.d[..kb], &m.m[..kb], &q, &[0], &mut four);
            assert!((four[0] - got[0]).abs() <= 1e-5 * scale.max(1.0), "scalar {} vs {}", four[0], got[0]);
        }
    }
}
