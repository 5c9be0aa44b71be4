//! Q4_1 weights: candle's dot product for this type is scalar (it was 85% of a decode step), so this one
//! is ours. Activations are quantized to Q8_1 per 32-value block (as candle does); the weights are
//! repacked at load into groups of eight columns (llama.cpp's "8x8" idea), so one `vpdpbusd` against
//! four broadcast activation bytes advances eight columns at once.
//!
//! Numerics are ggml's portable `ggml_vec_dot_q4_1_q8_1`, bit for bit, on every path: each block's
//! 32 products are summed exactly as one integer, `sumf += (d_w * d_x) * sumi` and `summ += m_w * s_x`
//! in f32 block after block, and `sumf + summ` at the end. The SIMD paths get there eight columns at a
//! time: AVX2 sums the block's `vpmaddubsw` pairs in i16 (16 products of at most 15 x 127 each, so
//! below 32767) and widens once per block; AVX-512 VNNI accumulates `vpdpbusd` in i32. One conversion
//! and two products per block and row instead of ggml's AVX2 eight-lane order (eight conversions and
//! eight FMAs), which is ~1.6x fewer instructions and lets one unpacked weight block serve four rows
//! (eight in AVX-512).
//! The float order differs from llama.cpp's AVX2 build, within the fidelity contract (`tests/fidelity.rs`
//! measures it on every path), and a row's result never depends on the rows beside it.
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, bail};
use half::f16;

use super::q8_0::round_half_away;
use super::{GROUP, Kernel, Out, f16_round, interleaved};
use crate::models::kernels::cpu;

const QK: usize = 32;

/// Activation rows per run of a tile: one unpacked weight block serves four rows (the AVX2 path keeps
/// three accumulators per row, twelve of its sixteen registers).
const RUN: usize = 4;

/// Rows per run of the AVX-512 VNNI kernel: eight. Its 32 registers hold eight rows' integer, scale and
/// minimum accumulators (24) beside the unpacked weights, so a 16-column block is loaded and unpacked
/// (load, insert, two masks, a shift) once for eight rows instead of twice. An eight-stream decode step,
/// where the products are the bound, then spends ~15% fewer instructions in this kernel; a row's
/// arithmetic is unchanged, so are its bits.
const RUN_VNNI: usize = 8;

/// One block (32 values) of eight columns: their nibbles interleaved (`super::interleaved`; within a
/// column, low nibbles are values 0..16, high nibbles 16..32), and their scales and minimums as the
/// file's f16 bits. The SIMD paths convert those with one `vcvtph2ps` per eight (exact); kept as f32
/// they made a group 192 bytes instead of 160, 20% more to stream per token in a one-row decode step.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Group8 {
    qs: [u8; 128],
    d: [u16; GROUP],
    m: [u16; GROUP],
}

impl Group8 {
    fn d(&self, c: usize) -> f32 {
        f16::from_bits(self.d[c]).to_f32()
    }
    fn m(&self, c: usize) -> f32 {
        f16::from_bits(self.m[c]).to_f32()
    }
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
        let zero = Group8 { qs: [0; 128], d: [0; GROUP], m: [0; GROUP] };
        let mut groups = vec![zero; n.div_ceil(GROUP) * k_blocks];
        // Block layout (ggml's block_q4_1): d f16, m f16, qs[16].
        for (i, block) in data.chunks_exact(20).enumerate() {
            let (col, b) = (i / k_blocks, i % k_blocks);
            let (g, c) = (col / GROUP, col % GROUP);
            let dst = &mut groups[g * k_blocks + b];
            dst.d[c] = u16::from_le_bytes([block[0], block[1]]);
            dst.m[c] = u16::from_le_bytes([block[2], block[3]]);
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
        let kb = self.k_blocks;
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx512_vnni {
            let (groups, blocks) = (self.n.div_ceil(GROUP), |g: usize| &self.groups[g * kb..(g + 1) * kb]);
            // A matrix's last group, when alone, stands in for its missing neighbour too: those 8 columns
            // are past `n` and never written out.
            super::column_tiles(rows, cols, out, |g, run, tile| {
                x86::dot_pair_vnni(blocks(g), blocks((g + 1).min(groups - 1)), q, run, tile)
            });
            return;
        }
        let dot = select_dot();
        super::eight_column_tiles(rows, cols, out, |g, run, tile| {
            dot(&self.groups[g * kb..(g + 1) * kb], q, run, tile)
        });
    }
}

/// candle's `BlockQ8_1::from_float`, value for value.
fn quantize_q8_1(x: &[f32]) -> Q8_1Rows {
    let simd = cpu::features().avx2_fma;
    super::par_map_units(x, QK, 1, |x, out| {
        out.reserve(x.len() / QK);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { quantize_q8_1_avx2(x, out) };
        }
        let _ = simd;
        for xs in x.chunks_exact(QK) {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            let mut sum = 0i32;
            for j in 0..16 {
                qs[j] = round_half_away(xs[j] * id) as i8;
                qs[j + 16] = round_half_away(xs[j + 16] * id) as i8;
                sum += qs[j] as i32 + qs[j + 16] as i32;
            }
            // As `half` computes `f16(sum) * f16(d)`: in f32, rounded to f16 again.
            let dh = f16_round(d);
            out.push(Q8_1Block { qs, d: dh, s: f16_round(f16_round(sum as f32) * dh) });
        }
    })
}

/// [`quantize_q8_1`]'s blocks in a function compiled for AVX2, so that `quantize_block` inlines into
/// the loop (called from portable code it was a call per block, returning its 40 bytes through memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_1_avx2(x: &[f32], out: &mut Vec<Q8_1Block>) {
    for xs in x.chunks_exact(QK) {
        // SAFETY: compiled for AVX2 and FMA; the chunk holds 32 values.
        let (qs, sum, amax) = unsafe { super::x86::quantize_block(xs) };
        let d = f16_round(amax / 127.0);
        out.push(Q8_1Block { qs, d, s: f16_round(f16_round(sum as f32) * d) });
    }
}

/// Dots of one weight group (its `k_blocks` blocks) with a run of activation rows: `tile[i][c]` for
/// row `rows[i]` and the group's column `c`.
type DotFn = fn(&[Group8], &Q8_1Rows, &[usize], &mut [[f32; GROUP]; RUN]);

fn select_dot() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        // AVX-512 VNNI CPUs take the 16-column kernel instead (`columns`).
        if cpu::features().avx2_fma {
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
                sumf += (w.d(c) * a.d) * sumi as f32;
                summ += w.m(c) * a.s;
            }
            *out = sumf + summ;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{by_rows, by_rows8, half_pair, half8, prefetch_ahead, quad};
    use super::{GROUP, Group8, Q8_1Rows, RUN, RUN_VNNI};

    pub fn dot_avx2_entry(wg: &[Group8], q: &Q8_1Rows, rows: &[usize], tile: &mut [[f32; GROUP]; RUN]) {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run<const R: usize>(wg: &[Group8], q: &Q8_1Rows, rows: &[usize; R], tile: &mut [[f32; GROUP]; RUN]) {
            // SAFETY: compiled for AVX2 and F16C. i16 pair sums: 16 products of at most 15 x 127 per lane.
            unsafe {
                body(
                    wg,
                    q,
                    rows,
                    tile,
                    |acc, w, x| _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)),
                    |acc| _mm256_madd_epi16(acc, _mm256_set1_epi16(1)),
                )
            }
        }
        // SAFETY: only selected when the CPU has AVX2, FMA and F16C (models::cpu).
        unsafe { by_rows!(run, wg, q, rows, tile) }
    }

    /// Two adjacent groups (16 columns) at once in 512-bit registers: group `a`'s columns in the low
    /// half of every vector, `b`'s in the high half. Per column it is the 8-column kernel's arithmetic,
    /// operation for operation, so the bits are the same; the difference is that one `vpdpbusd` does 64
    /// products instead of 32. A Sapphire Rapids core issues two 512-bit `vpdpbusd` a cycle, as many as
    /// 256-bit ones (measured: 0.16 vs 0.15 ns each), so at eight rows, where a step is bound by the
    /// products and not by streaming the weights, this halves the instructions per product.
    pub fn dot_pair_vnni(
        a: &[Group8],
        b: &[Group8],
        q: &Q8_1Rows,
        rows: &[usize],
        tile: &mut [[f32; 2 * GROUP]; RUN_VNNI],
    ) {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
        unsafe fn run<const R: usize>(
            a: &[Group8],
            b: &[Group8],
            q: &Q8_1Rows,
            rows: &[usize; R],
            tile: &mut [[f32; 2 * GROUP]; RUN_VNNI],
        ) {
            // SAFETY: compiled for AVX-512 F, BW, VNNI and VL (and F16C); the loads read whole arrays.
            unsafe {
                assert_eq!(a.len(), b.len());
                let kb = a.len();
                let low = _mm512_set1_epi8(0x0F);
                let mut sumf = [_mm512_setzero_ps(); R];
                let mut summ = [_mm512_setzero_ps(); R];
                for (k, (wa, wb)) in a.iter().zip(b).enumerate() {
                    prefetch_ahead(wa);
                    prefetch_ahead(wb);
                    let mut isum = [_mm512_setzero_si512(); R];
                    for c in 0..4 {
                        let chunk = |w: &Group8| _mm256_loadu_si256(w.qs.as_ptr().add(32 * c) as *const __m256i);
                        let p = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(chunk(wa)), chunk(wb));
                        let (lo, hi) = (_mm512_and_si512(p, low), _mm512_and_si512(_mm512_srli_epi16::<4>(p), low));
                        for i in 0..R {
                            let x = &q[rows[i] * kb + k].qs;
                            let quad =
                                |v: usize| _mm512_set1_epi32((x.as_ptr().add(4 * v) as *const i32).read_unaligned());
                            isum[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[i], lo, quad(c)), hi, quad(c + 4));
                        }
                    }
                    let (d, m) = (half_pair(&wa.d, &wb.d), half_pair(&wa.m, &wb.m));
                    for i in 0..R {
                        let x = &q[rows[i] * kb + k];
                        let sumi = _mm512_cvtepi32_ps(isum[i]);
                        sumf[i] = _mm512_add_ps(sumf[i], _mm512_mul_ps(_mm512_mul_ps(d, _mm512_set1_ps(x.d)), sumi));
                        summ[i] = _mm512_add_ps(summ[i], _mm512_mul_ps(m, _mm512_set1_ps(x.s)));
                    }
                }
                for i in 0..R {
                    _mm512_storeu_ps(tile[i].as_mut_ptr(), _mm512_add_ps(sumf[i], summ[i]));
                }
            }
        }
        // SAFETY: only called when the CPU has AVX-512 F, BW, VNNI and VL besides AVX2, FMA and F16C
        // (models::cpu's `avx512_vnni`).
        unsafe { by_rows8!(run(a, b, q), rows, tile) }
    }

    /// `step(acc, w, x)` adds the u8 x i8 products of `w` and `x` to a column's integer accumulator and
    /// `finish` turns that into the block's exact i32 sum per column. (Splitting the row's one chain of
    /// eight `vpdpbusd` a block into four was tried after prefetch: no faster, 528 vs 508 tok/s at 8
    /// streams.)
    #[inline(always)]
    unsafe fn body<const R: usize, const T: usize>(
        wg: &[Group8],
        q: &Q8_1Rows,
        rows: &[usize; R],
        tile: &mut [[f32; GROUP]; T],
        step: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
        finish: impl Fn(__m256i) -> __m256i,
    ) {
        // SAFETY: inlined only into the `target_feature` functions above; the loads read whole arrays.
        unsafe {
            let kb = wg.len();
            let low = _mm256_set1_epi8(0x0F);
            let mut sumf = [_mm256_setzero_ps(); R];
            let mut summ = [_mm256_setzero_ps(); R];
            for (b, w) in wg.iter().enumerate() {
                prefetch_ahead(w);
                let mut isum = [_mm256_setzero_si256(); R];
                // Chunk `c` holds values 4c..4c + 4 of every column in its low nibbles and 16 + 4c.. in
                // its high ones (`super::interleaved`), i.e. weight vectors `c` and `c + 4`.
                for c in 0..4 {
                    let p = _mm256_loadu_si256(w.qs.as_ptr().add(32 * c) as *const __m256i);
                    let (lo, hi) = (_mm256_and_si256(p, low), _mm256_and_si256(_mm256_srli_epi16(p, 4), low));
                    for i in 0..R {
                        let x = &q[rows[i] * kb + b].qs;
                        isum[i] = step(step(isum[i], lo, quad(x, c)), hi, quad(x, c + 4));
                    }
                }
                let (d, m) = (half8(&w.d), half8(&w.m));
                for i in 0..R {
                    let a = &q[rows[i] * kb + b];
                    let sumi = _mm256_cvtepi32_ps(finish(isum[i]));
                    sumf[i] = _mm256_add_ps(sumf[i], _mm256_mul_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.d)), sumi));
                    summ[i] = _mm256_add_ps(summ[i], _mm256_mul_ps(m, _mm256_set1_ps(a.s)));
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(tile[i].as_mut_ptr(), _mm256_add_ps(sumf[i], summ[i]));
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

    /// Every SIMD path this CPU can run gives the portable path's floats (ggml's generic order) bit for
    /// bit, on a matrix with a padded group and runs of one to four rows; and a row's result does not
    /// depend on the run it is in.
    #[test]
    fn paths_agree() {
        let dev = Device::Cpu;
        let (n, k, rows) = (13, 320, 7);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_1(&xs);
        let kb = k / QK;
        for g in 0..n.div_ceil(GROUP) {
            let wg = &m.groups[g * kb..(g + 1) * kb];
            // Row r's results alone, in scalar code, in ggml's generic order.
            let want = |r: usize, c: usize| {
                let (mut sumf, mut summ) = (0f32, 0f32);
                for (b, w) in wg.iter().enumerate() {
                    let a = &q[r * kb + b];
                    let sumi: i32 = (0..32)
                        .map(|j| {
                            let byte = w.qs[interleaved(c, j % 16)];
                            (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32 * a.qs[j] as i32
                        })
                        .sum();
                    sumf += (w.d(c) * a.d) * sumi as f32;
                    summ += w.m(c) * a.s;
                }
                sumf + summ
            };
            for (name, dot) in paths() {
                for run in [&[0, 1, 2, 3][..], &[4, 5, 6], &[2, 3], &[6]] {
                    let mut got = [[0f32; GROUP]; RUN];
                    dot(wg, &q, run, &mut got);
                    for (i, c) in (0..run.len()).flat_map(|i| (0..GROUP).map(move |c| (i, c))) {
                        let r = run[i];
                        assert_eq!(got[i][c].to_bits(), want(r, c).to_bits(), "{name} group {g} row {r} col {c}");
                    }
                }
            }
        }
    }

    /// The 16-column AVX-512 kernel gives each of its two groups the 8-column kernels' bits, on every
    /// run length, and for a lone last group passed as its own neighbour.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn pair_kernel_agrees() {
        if !cpu::detect().avx512_vnni {
            return;
        }
        let dev = Device::Cpu;
        let (n, k, rows) = (40, 288, 10);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let m = Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_q8_1(&xs);
        let kb = k / QK;
        let group = |g: usize| &m.groups[g * kb..(g + 1) * kb];
        for (ga, gb) in [(0, 1), (2, 3), (4, 4)] {
            let runs =
                [&[0, 1, 2, 3, 4, 5, 6, 7][..], &[2, 3, 4, 5, 6, 7, 8], &[9, 0, 1, 2, 3, 4], &[3, 4, 5], &[1, 5], &[2]];
            for run in runs {
                let mut got = [[0f32; 2 * GROUP]; RUN_VNNI];
                x86::dot_pair_vnni(group(ga), group(gb), &q, run, &mut got);
                for (half, g) in [(0, ga), (1, gb)] {
                    for i in 0..run.len() {
                        let mut want = [[0f32; GROUP]; RUN];
                        dot_portable(group(g), &q, &run[i..i + 1], &mut want);
                        let got: Vec<u32> = got[i][half * GROUP..][..GROUP].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = want[0].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "groups {ga}/{gb} half {half} row {}", run[i]);
                    }
                }
            }
        }
    }

    /// Every path this CPU can run.
    fn paths() -> Vec<(&'static str, DotFn)> {
        let mut paths: Vec<(&str, DotFn)> = vec![("portable", dot_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            let f = cpu::features();
            if f.avx2_fma {
                paths.push(("avx2", x86::dot_avx2_entry));
            }
        }
        paths
    }

    /// The extremes: every nibble 15 against activations of +-127 (the AVX2 path's i16 pair sums at
    /// their largest) give the exact integer, 15 x 127 x 32 per block.
    #[test]
    fn extreme_blocks_are_exact() {
        let group = Group8 { qs: [0xFF; 128], d: [f16::ONE.to_bits(); GROUP], m: [0; GROUP] };
        let wg = vec![group; 3];
        for sign in [1i8, -1] {
            let q: Q8_1Rows = vec![Q8_1Block { qs: [127 * sign; 32], d: 1.0, s: 0.0 }; 3];
            for (name, dot) in paths() {
                let mut got = [[0f32; GROUP]; RUN];
                dot(&wg, &q, &[0], &mut got);
                assert_eq!(got[0], [(sign as i32 * 15 * 127 * 32 * 3) as f32; GROUP], "{name}");
            }
        }
    }
}
