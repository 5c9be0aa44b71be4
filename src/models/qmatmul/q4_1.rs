//! Q4_1 weights: candle's dot product for this type is scalar (it was 85% of a decode step), so this one
//! is ours. Numerics follow ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`: activations are quantized to Q8_1 per
//! 32-value block (as candle does), the integer sums are exact, each of the 8 lanes accumulates
//! `(d_w * d_x) * lane_sum` in f32 across blocks, `m_w * s_x` is summed apart, and the lanes are added
//! once at the end. Each unpacked weight block serves up to four activation rows.
//!
//! Paths, chosen at run time: AVX-512 VNNI (one `vpdpbusd` per block instead of `vpmaddubsw` +
//! `vpmaddwd`, same integers, same order), AVX2+FMA, and a portable one the compiler vectorizes (NEON
//! on arm64).
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;

use super::q8_0::round_half_away;
use super::{Kernel, Out};
use crate::models::cpu;

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

/// One block of activations quantized to Q8_1: values, scale, and scale times their sum.
#[derive(Clone, Copy)]
pub struct Q8_1Block {
    qs: [i8; 32],
    d: f32,
    s: f32,
}

/// Activations quantized to Q8_1, one row after another.
pub type Q8_1Rows = Vec<Q8_1Block>;

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
}

impl Kernel for Q4_1Matrix {
    type Act = Q8_1Rows;

    fn out_features(&self) -> usize {
        self.n
    }

    fn in_features(&self) -> usize {
        self.k_blocks * QK
    }

    fn quantize(&self, x: &[f32], _rows: usize) -> Q8_1Rows {
        quantize_q8_1(x)
    }

    fn columns(&self, q: &Q8_1Rows, rows: usize, cols: Range<usize>, out: &Out) {
        let dot = select_dot();
        let kb = self.k_blocks;
        super::four_row_tiles(rows, cols, out, |c, group, four| {
            let w = c * kb..(c + 1) * kb;
            dot(&self.qs[w.clone()], &self.d[w.clone()], &self.m[w], q, group, four)
        });
    }
}

/// candle's `BlockQ8_1::from_float`, value for value.
fn quantize_q8_1(x: &[f32]) -> Q8_1Rows {
    let simd = cpu::features().avx2_fma;
    super::par_map_units(x, QK, |x, out| {
        out.reserve(x.len() / QK);
        for xs in x.chunks_exact(QK) {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA; the chunk holds 32 values.
                let (qs, sum, amax) = unsafe { super::x86::quantize_block(xs) };
                let dh = f16::from_f32(amax / 127.0);
                out.push(Q8_1Block { qs, d: dh.to_f32(), s: (f16::from_f32(sum as f32) * dh).to_f32() });
                continue;
            }
            let _ = simd;
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let dh = f16::from_f32(d);
            let mut qs = [0i8; 32];
            let mut sum = 0i32;
            for j in 0..16 {
                qs[j] = round_half_away(xs[j] * id) as i8;
                qs[j + 16] = round_half_away(xs[j + 16] * id) as i8;
                sum += qs[j] as i32 + qs[j + 16] as i32;
            }
            out.push(Q8_1Block { qs, d: dh.to_f32(), s: (f16::from_f32(sum as f32) * dh).to_f32() });
        }
    })
}

/// Dots of one weight column (its `k_blocks` blocks) with up to four activation rows into `out`.
type DotFn = fn(&[[u8; 16]], &[f32], &[f32], &Q8_1Rows, &[usize], &mut [f32; 4]);

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        let f = cpu::features();
        if f.avx512_vnni {
            return x86::dot_vnni_entry;
        }
        if f.avx2_fma {
            return x86::dot_avx2_entry;
        }
    }
    dot_portable
}

/// ggml's generic `ggml_vec_dot_q4_1_q8_1`.
fn dot_portable(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
    let kb = wq.len();
    for (i, &r) in rows.iter().enumerate() {
        let mut sumf = 0f32;
        for b in 0..kb {
            let (w, x) = (&wq[b], &q[r * kb + b].qs);
            let sumi: i32 =
                (0..16).map(|j| (w[j] & 0x0F) as i32 * x[j] as i32 + (w[j] >> 4) as i32 * x[j + 16] as i32).sum();
            sumf += (wd[b] * q[r * kb + b].d) * sumi as f32 + wm[b] * q[r * kb + b].s;
        }
        out[i] = sumf;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{hsum_float_8, lane_sums_avx2, lane_sums_vnni};
    use super::Q8_1Rows;

    pub fn dot_avx2_entry(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
        // SAFETY: only selected when the CPU has AVX2 and FMA (models::cpu).
        unsafe { dot_avx2(wq, wd, wm, q, rows, out) }
    }

    pub fn dot_vnni_entry(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
        // SAFETY: only selected when the CPU has AVX-512 VNNI and VL besides AVX2 and FMA (models::cpu).
        unsafe { dot_vnni(wq, wd, wm, q, rows, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
        // SAFETY: the caller's CPU has the features this function is compiled for.
        unsafe { dot_body(wq, wd, wm, q, rows, out, |w, x| lane_sums_avx2(w, x)) }
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn dot_vnni(wq: &[[u8; 16]], wd: &[f32], wm: &[f32], q: &Q8_1Rows, rows: &[usize], out: &mut [f32; 4]) {
        // SAFETY: the caller's CPU has the features this function is compiled for.
        unsafe { dot_body(wq, wd, wm, q, rows, out, |w, x| lane_sums_vnni(w, x)) }
    }

    #[inline(always)]
    unsafe fn dot_body(
        wq: &[[u8; 16]],
        wd: &[f32],
        wm: &[f32],
        q: &Q8_1Rows,
        rows: &[usize],
        out: &mut [f32; 4],
        sums: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        // SAFETY: inlined only into the `target_feature` functions above; the loads read exactly the
        // 16 and 32 bytes of the arrays they point at.
        unsafe {
            let kb = wq.len();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut summs = [0f32; 4];
            let low = _mm_set1_epi8(0x0F);
            for b in 0..kb {
                {
                    let packed = _mm_loadu_si128(wq[b].as_ptr() as *const __m128i);
                    let wv =
                        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
                    for (i, &r) in rows.iter().enumerate() {
                        let a = r * kb + b;
                        let xv = _mm256_loadu_si256(q[a].qs.as_ptr() as *const __m256i);
                        let lanes = _mm256_cvtepi32_ps(sums(wv, xv));
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * q[a].d), lanes, acc[i]);
                        summs[i] += wm[b] * q[a].s;
                    }
                }
            }
            for i in 0..rows.len() {
                out[i] = hsum_float_8(acc[i]) + summs[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The SIMD quantizer is bit-identical to the scalar one, ties and zeros included.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_quantization_is_exact() {
        if !cpu::features().avx2_fma {
            return;
        }
        let mut xs: Vec<f32> = (0..32 * 64).map(|i| ((i as f32) * 0.731).sin() * (1 + i % 7) as f32).collect();
        xs[..32].fill(0.0); // an all-zero block
        for (i, v) in xs[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5; // exact halves after scaling
        }
        for xs in xs.chunks_exact(32) {
            // SAFETY: checked for AVX2 above.
            let (qs, sum, amax) = unsafe { super::super::x86::quantize_block(xs) };
            let want_amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let id = if want_amax != 0.0 { 1.0 / (want_amax / 127.0) } else { 0.0 };
            let want: Vec<i8> = xs.iter().map(|&v| (v * id).round() as i8).collect();
            assert_eq!((qs.to_vec(), amax), (want.clone(), want_amax));
            assert_eq!(sum, want.iter().map(|&q| q as i32).sum::<i32>());
        }
    }

    /// Every path this CPU can run gives the same integers and, in ggml's order, the same floats up to
    /// the portable path's different lane grouping.
    #[test]
    fn paths_agree() {
        let dev = Device::Cpu;
        let (n, k, rows) = (9, 320, 4);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_1(&xs);
        let kb = k / QK;
        let mut paths: Vec<(&str, DotFn)> = vec![("portable", dot_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            let f = cpu::features();
            if f.avx2_fma {
                paths.push(("avx2", x86::dot_avx2_entry));
            }
            if f.avx512_vnni {
                paths.push(("vnni", x86::dot_vnni_entry));
            }
        }
        for c in 0..n {
            let w = c * kb..(c + 1) * kb;
            let mut base = [0f32; 4];
            dot_portable(&m.qs[w.clone()], &m.d[w.clone()], &m.m[w.clone()], &q, &[0, 1, 2, 3], &mut base);
            let mut avx2 = None;
            for (name, dot) in &paths {
                let mut got = [0f32; 4];
                dot(&m.qs[w.clone()], &m.d[w.clone()], &m.m[w.clone()], &q, &[0, 1, 2, 3], &mut got);
                for i in 0..4 {
                    assert!((got[i] - base[i]).abs() <= 1e-4 * base[i].abs().max(1.0), "{name} col {c} row {i}");
                }
                // The SIMD paths share one accumulation order, so they agree bit for bit.
                if *name != "portable" {
                    assert_eq!(*avx2.get_or_insert(got), got, "{name} col {c}");
                }
            }
        }
    }
}
