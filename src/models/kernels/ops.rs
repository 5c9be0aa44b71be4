//! Element-wise CPU ops that candle runs through scalar libm calls (exact GELU's `erf`, softmax's `exp`),
//! rewritten branch-free so the compiler vectorizes them, with the AVX2+FMA build chosen at run time.
//! Accuracy: |error| below 2e-7 for `erf` and below 2 ulp-ish (1e-7 relative) for `exp`, far inside what
//! sentence-transformers parity (cosine >= 0.9999) needs. Other devices and dtypes use candle's own ops.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Below this, [`exp`] answers exactly 0. e^-86 is 4.5e-38, still a normal float, and so is every
/// intermediate value on the way to it: nothing here ever makes a subnormal, which would cost a
/// ~100-cycle microcode assist per operation on Intel cores (FTZ/DAZ on the compute threads is the
/// second line of defence, see `cpu::flush_denormals`).
const EXP_ZERO_BELOW: f32 = -86.0;

/// e^x for f32, Cody-Waite range reduction and a degree-6 polynomial; no branches, so it vectorizes.
/// Exactly 0 below [`EXP_ZERO_BELOW`].
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(EXP_ZERO_BELOW, 88.7);
    // Round to nearest by the 1.5 * 2^23 trick (vectorizes where f32::round does not).
    let n = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = f32::from_bits(((n as i32 + 127) << 23) as u32) * p;
    if x < EXP_ZERO_BELOW { 0.0 } else { e }
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7). Beyond |x| = 4 erf is +-1 in f32
/// (1 - 1.5e-8 rounds to 1), and the tail is never computed there: e^-(x*x) times the polynomial
/// would be subnormal near |x| = 9.3.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let ac = a.min(4.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * ac);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-ac * ac);
    let y = if a >= 4.0 { 1.0 } else { y };
    y.copysign(x)
}

/// `a * b + c`, with one rounding when `FUSED`. Kernels pass `true` from code compiled for FMA (the
/// AVX2 and AVX-512 paths) and [`PORTABLE_FUSED`] from portable code.
#[inline(always)]
pub(crate) fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED { a.mul_add(b, c) } else { a * b + c }
}

/// Whether portable code fuses its multiply-adds: on arm64 it is one instruction; on x86-64 the
/// portable path runs on CPUs without FMA, where a fused multiply-add is a libm call, a hundred times
/// slower, so it multiplies and adds apart (and its last bits differ from the SIMD paths').
pub(crate) const PORTABLE_FUSED: bool = !cfg!(target_arch = "x86_64");

/// Exact (erf) GELU on a slice, in place; inlined into callers compiled for wider SIMD.
#[inline(always)]
pub(crate) fn gelu_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Softmax of `x - max` for `d = x - max <= 0`: exactly 0 below -75, so that after the division by
/// the row's sum (at most 65536 terms of at most 1) no probability is subnormal either.
#[inline(always)]
pub(crate) fn softmax_exp(d: f32) -> f32 {
    if d < -75.0 { 0.0 } else { exp(d) }
}

#[inline(always)]
fn gelu_slice(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn softmax_rows(xs: &[f32], out: &mut [f32], dim: usize) {
    for (row, o) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (o, &x) in o.iter_mut().zip(row) {
            *o = softmax_exp(x - max);
            sum += *o;
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    // SAFETY (both): only called when `cpu::features().avx2_fma` is true.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu(xs: &[f32], out: &mut [f32]) {
        super::gelu_slice(xs, out)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(xs: &[f32], out: &mut [f32], dim: usize) {
        super::softmax_rows(xs, out, dim)
    }
}

fn has_avx2() -> bool {
    super::cpu::features().avx2_fma
}

/// Below this many elements one thread is faster than waking the others.
const PARALLEL_MIN: usize = 1 << 16;

/// Runs `f` over matching chunks of `xs` and `out` (whole rows of `row` elements) on rayon's pool,
/// which candle's matrix products use too, so `--threads` bounds both.
fn par_chunks(xs: &[f32], out: &mut [f32], row: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    use rayon::prelude::*;
    if xs.len() < PARALLEL_MIN {
        return f(xs, out);
    }
    let threads = rayon::current_num_threads().max(1);
    let rows_per_chunk = (xs.len() / row).div_ceil(threads * 4).max(1);
    let chunk = rows_per_chunk * row;
    xs.par_chunks(chunk).zip(out.par_chunks_mut(chunk)).for_each(|(x, o)| f(x, o));
}

fn gelu_any(xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::gelu(xs, out) };
    }
    gelu_slice(xs, out)
}

fn softmax_any(xs: &[f32], out: &mut [f32], dim: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::softmax(xs, out, dim) };
    }
    softmax_rows(xs, out, dim)
}

/// The f32 slice of a contiguous CPU tensor.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: only f32 is implemented") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: input must be contiguous") };
    Ok(&data[start..end])
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "omnibus-gelu-erf"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(storage, layout, self.name())?;
        let mut out = vec![0f32; xs.len()];
        par_chunks(xs, &mut out, 1, gelu_any);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "omnibus-softmax-last-dim"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(storage, layout, self.name())?;
        let dim = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; xs.len()];
        par_chunks(xs, &mut out, dim, |x, o| softmax_any(x, o, dim));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) { x.contiguous()?.apply_op1_no_bwd(&Gelu) } else { x.gelu_erf() }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) { x.contiguous()?.apply_op1_no_bwd(&Softmax) } else { candle_nn::ops::softmax_last_dim(x) }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 / 100.0;
            let e = exp(x);
            assert!(((e - x.exp()) / x.exp()).abs() < 3e-7, "exp({x}) = {e} vs {}", x.exp());
            // The series reference is exact to 1e-9 only below 3; beyond, erf is within 2.3e-5 of +-1.
            let (want, tol) = if x.abs() < 3.0 { (libm_erf(x as f64), 5e-7) } else { (x.signum() as f64, 2.3e-5) };
            assert!((erf(x) as f64 - want).abs() < tol, "erf({x}) = {} vs {want}", erf(x));
        }
        // Exactly zero far below, and never a subnormal on the way (the FTZ-free check).
        assert_eq!(exp(-1000.0), 0.0);
        for i in 0..200_000 {
            let x = -80.0 - i as f32 * 1e-4;
            let e = exp(x);
            assert!(e == 0.0 || e.is_normal(), "exp({x}) = {e:e}");
            let e = erf(-(x / 9.0));
            assert!(e.is_normal(), "erf({}) = {e:e}", -(x / 9.0));
        }
        let mut g = [-12.0f32, -9.35, -5.5, 0.0, 9.35];
        gelu_in_place(&mut g);
        assert!(g.iter().all(|v| *v == 0.0 || v.is_normal()), "{g:?}");
    }

    fn libm_erf(x: f64) -> f64 {
        // erf from its Taylor series: a reference to 1e-9 for |x| < 3.
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 10.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Rows of attention scores as the padded (device) path builds them, a batch of mixed lengths: real
    /// scores with wide gaps, then -1e9 for each padded key. Padding must get exactly zero weight and
    /// no probability may be subnormal (each would cost an Intel core a microcode assist).
    #[test]
    fn masked_softmax_has_exact_zeros_and_no_subnormals() {
        let longest = 60;
        let mut scores = Vec::new();
        for (i, real) in [3usize, 60, 7, 1, 33, 12].into_iter().enumerate() {
            for j in 0..longest {
                scores.push(if j < real { ((i * 7 + j * 13) % 23) as f32 * 4.5 - 50.0 } else { -1e9 });
            }
        }
        let t = Tensor::from_vec(scores.clone(), (6, longest), &Device::Cpu).unwrap();
        let p = softmax_last_dim(&t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(p.iter().filter(|v| v.is_subnormal()).count(), 0);
        for (v, s) in p.iter().zip(&scores) {
            if *s == -1e9 {
                assert_eq!(*v, 0.0);
            }
        }
        for row in p.chunks(longest) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn ops_match_candle() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (7, 33), &dev).unwrap()).contiguous().unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-6);
        assert!(diff(&softmax_last_dim(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap()) < 1e-6);
        // A transposed (non-contiguous) input works too.
        let t = x.t().unwrap();
        assert!(diff(&gelu_erf(&t).unwrap(), &t.gelu_erf().unwrap()) < 1e-6);
    }
}

/// GELU with the tanh approximation as ggml's CPU backend computes it (`GGML_GELU_FP16`): the input
/// rounded to f16, looked up in a table of `gelu(x)` rounded to f16; 0 below -10 and `x` above 10.
pub fn gelu_tanh_ggml(x: f32) -> f32 {
    gelu_value(gelu_table(), x)
}

/// `out[i] = gelu_tanh_ggml(gate[i]) * up[i]`: the feed-forward gate of GELU models (Gemma). The AVX2
/// path rounds eight inputs to f16 with one `vcvtps2ph` (round to nearest even, as `half` does); one
/// value at a time, `half`'s conversion was a call with a CPU-feature test, ~4% of a Gemma 3 step at
/// eight streams. Same table, same bits.
pub fn gelu_tanh_gate(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    let table = gelu_table();
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and F16C (every AVX2 CPU with FMA here does; `models::cpu`).
        return unsafe { gelu_tanh_gate_avx2(table, gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = gelu_value(table, g) * u;
    }
}

fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const GELU_COEF_A: f32 = 0.044715;
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let v = half::f16::from_bits(bits).to_f32();
                let g = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + GELU_COEF_A * v * v)).tanh());
                half::f16::from_f32(g).to_f32()
            })
            .collect()
    })
}

#[inline(always)]
fn gelu_value(table: &[f32], x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    table[half::f16::from_f32(x).to_bits() as usize]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gelu_tanh_gate_avx2(table: &[f32], gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(table.len(), 1 << 16);
    let n = out.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n <= len` for all three slices (checked by the caller); a 16-bit index is
        // inside the 65,536-entry table (checked above).
        unsafe {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let mut bits = [0u16; 8];
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(bits.as_mut_ptr() as *mut __m128i, h);
            let mut xs = [0f32; 8];
            _mm256_storeu_ps(xs.as_mut_ptr(), x);
            for j in 0..8 {
                let x = xs[j];
                let g = if x <= -10.0 {
                    0.0
                } else if x >= 10.0 {
                    x
                } else {
                    *table.get_unchecked(bits[j] as usize)
                };
                *out.get_unchecked_mut(i + j) = g * *up.get_unchecked(i + j);
            }
        }
    }
    for j in n..out.len() {
        out[j] = gelu_value(table, gate[j]) * up[j];
    }
}

#[cfg(test)]
mod gelu_tests {
    #[test]
    fn gelu_tanh_is_gelu_to_f16_precision() {
        for i in -2000..2000 {
            let x = i as f32 * 0.006;
            let exact = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            let got = super::gelu_tanh_ggml(x) as f64;
            // tanh-approximation error (< 1e-3) plus f16 rounding of input and output.
            assert!((got - exact).abs() <= 2e-3 + 2e-3 * exact.abs(), "{x}: {got} vs {exact}");
        }
        assert_eq!(super::gelu_tanh_ggml(-11.0), 0.0);
        assert_eq!(super::gelu_tanh_ggml(12.5), 12.5);
    }

    /// The gate over slices (eight at a time where the CPU has AVX2) is the one-value function times
    /// `up`, bit for bit: every f16 rounding boundary region, ties, the +-10 edges, subnormals, infinities
    /// and a tail shorter than eight.
    #[test]
    fn the_gate_is_the_scalar_function_bit_for_bit() {
        let mut gate: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.0041).collect();
        gate.extend([-10.0, 10.0, -9.999_999, 9.999_999, -10.000_001, 10.000_001, 1e-8, -1e-8, 6e-5, 65519.0]);
        gate.extend([f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.000_488_3, 1.000_976_6, 2049.0, 2051.0]);
        // Values halfway between neighbouring f16s (ties go to even) and just either side.
        for k in 0..200u32 {
            let mid = f32::from_bits(0x3F80_0000 + (k << 13) + (1 << 12));
            gate.extend([mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1), -mid]);
        }
        gate.push(0.3);
        let up: Vec<f32> = (0..gate.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; gate.len()];
        super::gelu_tanh_gate(&gate, &up, &mut out);
        for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
            assert_eq!(o.to_bits(), (super::gelu_tanh_ggml(g) * u).to_bits(), "gate {g:e}");
        }
    }

    /// erf by its series (|x| < 6 here), enough for a test's reference.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }
}
