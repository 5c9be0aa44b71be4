//! Q4_1 weights: candle's dot product for this type is scalar (it was 85% of a decode step), so this one
//! is ours. Activations are quantized to Q8_1 per 32-value block (as candle does); the weights are
//! repacked at load into groups of eight columns (llama.cpp's "8x8" idea), so one `vpdpbusd` against
//! four broadcast activation bytes advances eight columns at once.
//!
//! Numerics are ggml's AVX2 `ggml_vec_dot_q4_1_q8_1`, bit for bit (see `super::x86`): exact integer
//! sums of four products per lane, each of the 8 lanes accumulating `(d_w * d_x) * lane_sum` in f32
//! across blocks, `m_w * s_x` summed apart, the lanes added once at the end in ggml's order. Greedy
//! tokens hinge on that: even a reassociation of these sums flips some of llama.cpp's.
//!
//! Paths, chosen at run time: AVX-512 VNNI, AVX2+FMA (`vpmaddubsw` + `vpmaddwd`, same integers, same
//! floats), and a portable one on the same layout in ggml's generic order.
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;

use super::q8_0::round_half_away;
use super::{GROUP, Kernel, Out, RUN, interleaved};
use crate::models::kernels::cpu;

const QK: usize = 32;

/// One block (32 values) of eight columns: their nibbles interleaved (`super::interleaved`; within a
/// column, low nibbles are values 0..16, high nibbles 16..32), and their scales and minimums.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Group8 {
    qs: [u8; 128],
    d: [f32; GROUP],
    m: [f32; GROUP],
}

/// A `[n, k]` Q4_1 matrix repacked for the kernel.
pub struct Q4_1Matrix {
    n: usize,
    k_blocks: usize,
    /// `n.div_ceil(8) * k_blocks` blocks, group after group; the last group is padded with zero
    /// columns (d = m = 0) whose results are never written.
    groups: Vec<Group8>,
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
        let zero = Group8 { qs: [0; 128], d: [0.0; GROUP], m: [0.0; GROUP] };
        let mut groups = vec![zero; n.div_ceil(GROUP) * k_blocks];
        // Block layout (ggml's block_q4_1): d f16, m f16, qs[16].
        for (i, block) in data.chunks_exact(20).enumerate() {
            let (col, b) = (i / k_blocks, i % k_blocks);
            let (g, c) = (col / GROUP, col % GROUP);
            let dst = &mut groups[g * k_blocks + b];
            dst.d[c] = f16::from_le_bytes([block[0], block[1]]).to_f32();
            dst.m[c] = f16::from_le_bytes([block[2], block[3]]).to_f32();
            for (j, &byte) in block[4..20].iter().enumerate() {
                dst.qs[interleaved(c, j)] = byte;
            }
        }
        Ok(Self { n, k_blocks, groups })
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
        super::eight_column_tiles(rows, cols, out, |g, run, tile| {
            dot(&self.groups[g * kb..(g + 1) * kb], q, run, tile)
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

/// Dots of one weight group (its `k_blocks` blocks) with a run of activation rows: `tile[i][c]` for
/// row `rows[i]` and the group's column `c`.
type DotFn = fn(&[Group8], &Q8_1Rows, &[usize], &mut [[f32; GROUP]; RUN]);

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

/// ggml's generic `ggml_vec_dot_q4_1_q8_1` per column (the minimum term summed apart).
fn dot_portable(wg: &[Group8], q: &Q8_1Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
    let kb = wg.len();
    for (i, &r) in rows.iter().enumerate() {
        for (c, out) in tile[i].iter_mut().enumerate() {
            let (mut sumf, mut summ) = (0f32, 0f32);
            for (b, w) in wg.iter().enumerate() {
                let a = &q[r * kb + b];
                let sumi: i32 = (0..16)
                    .map(|j| {
                        let byte = w.qs[interleaved(c, j)];
                        (byte & 0x0F) as i32 * a.qs[j] as i32 + (byte >> 4) as i32 * a.qs[j + 16] as i32
                    })
                    .sum();
                sumf += (w.d[c] * a.d) * sumi as f32;
                summ += w.m[c] * a.s;
            }
            *out = sumf + summ;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{by_rows, hsum_lanes, lane_sums_avx2, lane_sums_vnni, nibbles, quad};
    use super::{GROUP, Group8, Q8_1Rows, RUN};

    pub fn dot_avx2_entry(wg: &[Group8], q: &Q8_1Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run(wg: &[Group8], q: &Q8_1Rows, r: usize, out: &mut [f32; GROUP]) {
            let mut tile = [[0f32; GROUP]; 1];
            // SAFETY: compiled for AVX2+FMA.
            unsafe { body(wg, q, &[r], &mut tile, |w, x| lane_sums_avx2(w, x)) };
            *out = tile[0];
        }
        // One row at a time: sixteen registers hold one row's nine accumulators, not two rows'.
        for (i, &r) in rows.iter().enumerate() {
            // SAFETY: only selected when the CPU has AVX2 and FMA (models::cpu).
            unsafe { run(wg, q, r, &mut tile[i]) }
        }
    }

    pub fn dot_vnni_entry(wg: &[Group8], q: &Q8_1Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        unsafe fn run<const R: usize>(wg: &[Group8], q: &Q8_1Rows, rows: &[usize; R], tile: &mut [[f32; GROUP]; RUN]) {
            // SAFETY: compiled for AVX-512 VNNI and VL.
            unsafe { body(wg, q, rows, tile, |w, x| lane_sums_vnni(_mm256_setzero_si256(), w, x)) }
        }
        // SAFETY: only selected when the CPU has AVX-512 VNNI and VL besides AVX2 and FMA (models::cpu).
        unsafe { by_rows!(run, wg, q, rows, tile) }
    }

    #[inline(always)]
    unsafe fn body<const R: usize, const T: usize>(
        wg: &[Group8],
        q: &Q8_1Rows,
        rows: &[usize; R],
        tile: &mut [[f32; GROUP]; T],
        sums: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        // SAFETY: inlined only into the `target_feature` functions above; the loads read whole arrays.
        unsafe {
            let kb = wg.len();
            let mut acc = [[_mm256_setzero_ps(); 8]; R];
            let mut summs = [_mm256_setzero_ps(); R];
            for (b, w) in wg.iter().enumerate() {
                let (d, m) = (_mm256_loadu_ps(w.d.as_ptr()), _mm256_loadu_ps(w.m.as_ptr()));
                let mut dd = [_mm256_setzero_ps(); R];
                for i in 0..R {
                    let a = &q[rows[i] * kb + b];
                    dd[i] = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                    summs[i] = _mm256_add_ps(summs[i], _mm256_mul_ps(m, _mm256_set1_ps(a.s)));
                }
                for v in 0..8 {
                    let wv = nibbles(&w.qs, v);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let lanes = _mm256_cvtepi32_ps(sums(wv, quad(&q[rows[i] * kb + b].qs, v)));
                        acc[v] = _mm256_fmadd_ps(dd[i], lanes, acc[v]);
                    }
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(tile[i].as_mut_ptr(), _mm256_add_ps(hsum_lanes(&acc[i]), summs[i]));
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

    /// ggml's AVX2 dot of column `c` with row `r`, in scalar code: lane `l` accumulates the exact sum of
    /// values `4l..4l + 4` times `d_w * d_x` with one fma per block, `m_w * s_x` is summed apart, and the
    /// lanes are added as `hsum_float_8` adds them.
    #[cfg(target_arch = "x86_64")]
    fn ggml_avx2_order(wg: &[Group8], q: &Q8_1Rows, r: usize, c: usize) -> f32 {
        let kb = wg.len();
        let (mut l, mut summs) = ([0f32; 8], 0f32);
        for (b, w) in wg.iter().enumerate() {
            let a = &q[r * kb + b];
            for (v, lane) in l.iter_mut().enumerate() {
                let value = |j: usize| {
                    let byte = w.qs[interleaved(c, j % 16)];
                    (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32
                };
                let sum: i32 = (4 * v..4 * v + 4).map(|j| value(j) * a.qs[j] as i32).sum();
                *lane = (w.d[c] * a.d).mul_add(sum as f32, *lane);
            }
            summs += w.m[c] * a.s;
        }
        ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])) + summs
    }

    /// Every SIMD path this CPU can run reproduces ggml's AVX2 floats bit for bit (what keeps greedy
    /// tokens equal to llama.cpp's) and agrees with the portable path, on a matrix with a padded group
    /// and runs of two rows and of one.
    #[test]
    fn paths_agree() {
        let dev = Device::Cpu;
        let (n, k, rows) = (13, 320, 7);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_1(&xs);
        let kb = k / QK;
        let mut paths: Vec<(&str, DotFn)> = vec![];
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
        for g in 0..n.div_ceil(GROUP) {
            let wg = &m.groups[g * kb..(g + 1) * kb];
            for run in [&[0, 1][..], &[2, 3], &[6]] {
                let mut base = [[0f32; GROUP]; RUN];
                dot_portable(wg, &q, run, &mut base);
                for (name, dot) in &paths {
                    let mut got = [[0f32; GROUP]; RUN];
                    dot(wg, &q, run, &mut got);
                    for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                        let (g_, b_) = (got[i][c], base[i][c]);
                        assert!((g_ - b_).abs() <= 1e-4 * b_.abs().max(1.0), "{name} group {g} row {} col {c}", run[i]);
                        #[cfg(target_arch = "x86_64")]
                        assert_eq!(
                            g_.to_bits(),
                            ggml_avx2_order(wg, &q, run[i], c).to_bits(),
                            "{name} group {g} row {} col {c}",
                            run[i]
                        );
                    }
                }
            }
        }
    }
}
