//! e^x for f32 as glibc computes it, eight lanes at a time: the decoder's softmax and SiLU call `expf`
//! per element, and glibc's (its FMA build, `__expf_fma`, which it picks on every CPU with FMA) was 3-5%
//! of a decode step and of a prefill. Bit for bit the same values, so the fidelity rows and every
//! logit stay as they were: llama.cpp's CPU attention calls the same libm `expf` per score.
//!
//! The algorithm is glibc's `sysdeps/ieee754/flt-32/e_expf.c` (Szabolcs Nagy's): in double precision,
//! `x * 32 / ln 2 = k + r`, `2^(k/32)` from a 32-entry table with the exponent added in integer, and a
//! cubic in `r`. GCC fuses `z = x * InvLn2N` into both its uses when it builds `__expf_fma`, so the
//! reduction here is two FMAs (a sweep of one float in three over the whole finite range found no
//! other form that matches). Inputs past glibc's limits take its answers: +inf above ln(2^128), 0 below
//! ln(2^-150), NaN for NaN. Results that are subnormal floats round as `(float) y` does under the
//! thread's MXCSR, as glibc's do (the compute threads flush them to zero, both ways).
//!
//! x86-64 with AVX2+FMA; everywhere else libm's `expf` (here for SiLU, in `attention` for softmax).

/// glibc's `__exp2f_data.tab`: `bits(2^(i/32)) - (i << 47)`, so adding `k << 47` to entry `k % 32`
/// gives `2^(k/32)`.
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// `32 / ln 2` (glibc's `invln2_scaled`, 0x1.71547652b82fep+0 * 32).
const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
/// 1.5 * 2^52: adding it rounds to an integer, ties to even, and leaves that integer in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// glibc's `poly_scaled`: 0x1.c6af84b912394p-5 / 32^3, 0x1.ebfce50fac4f3p-3 / 32^2, 0x1.62e42ff0c52d6p-1 / 32.
const C: [f64; 3] =
    [f64::from_bits(0x3ebc6af84b912394), f64::from_bits(0x3f2ebfce50fac4f3), f64::from_bits(0x3f962e42ff0c52d6)];
/// Above this (0x1.62e42ep6f, ln 2^128) the result is +inf; below `UNDER` (-0x1.9fe368p6f, ln 2^-150), 0.
const OVER: f32 = f32::from_bits(0x42b17217);
const UNDER: f32 = f32::from_bits(0xc2cff1b4);

/// The same computation one value at a time, for the tests (the callers' portable code calls libm).
#[cfg(test)]
fn scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x + x;
    }
    if x > OVER {
        return f32::INFINITY;
    }
    if x < UNDER {
        return 0.0;
    }
    let xd = x as f64;
    let k = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = k.to_bits();
    let kd = k - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(TAB[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = C[0].mul_add(r, C[1]);
    let y = C[2].mul_add(r, 1.0);
    let y = z.mul_add(r * r, y);
    (y * s) as f32
}

/// `out[i] = g[i] / (1 + e^-g[i]) * u[i]`: SiLU's gate, eight at a time where the CPU has AVX2+FMA, the
/// same bits either way on glibc.
pub(crate) fn silu_gate(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::silu_gate(g, u, out) };
    }
    out.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (&g, &u))| *o = g / (1.0 + (-g).exp()) * u)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{C, INV_LN2_N, OVER, SHIFT, TAB, UNDER};

    /// Four lanes in double precision, [`super::scalar`]'s steps.
    #[inline(always)]
    unsafe fn exp4(xd: __m256d) -> __m128 {
        // SAFETY: inlined only into AVX2+FMA functions; the gather's indices are masked to 0..32.
        unsafe {
            let k = _mm256_fmadd_pd(_mm256_set1_pd(INV_LN2_N), xd, _mm256_set1_pd(SHIFT));
            let ki = _mm256_castpd_si256(k);
            let kd = _mm256_sub_pd(k, _mm256_set1_pd(SHIFT));
            let r = _mm256_fmsub_pd(_mm256_set1_pd(INV_LN2_N), xd, kd);
            let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
            let t = _mm256_i64gather_epi64::<8>(TAB.as_ptr() as *const i64, idx);
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let z = _mm256_fmadd_pd(_mm256_set1_pd(C[0]), r, _mm256_set1_pd(C[1]));
            let y = _mm256_fmadd_pd(_mm256_set1_pd(C[2]), r, _mm256_set1_pd(1.0));
            let y = _mm256_fmadd_pd(z, _mm256_mul_pd(r, r), y);
            _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
        }
    }

    /// e^x in each lane, glibc's bits.
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: inlined only into AVX2+FMA functions.
        unsafe {
            let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
            let y = _mm256_set_m128(hi, lo);
            let y = _mm256_blendv_ps(
                y,
                _mm256_set1_ps(f32::INFINITY),
                _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(OVER)),
            );
            let y = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(UNDER)), y);
            _mm256_blendv_ps(y, _mm256_add_ps(x, x), _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
        }
    }

    /// `xs[i] = e^(xs[i] - sub)`, the subtraction in f32 as a scalar loop does it.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(xs: &mut [f32], sub: f32) {
        let mut chunks = xs.chunks_exact_mut(8);
        // SAFETY: compiled for AVX2+FMA; each load and store covers one 8-value chunk.
        unsafe {
            for c in &mut chunks {
                let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(sub));
                _mm256_storeu_ps(c.as_mut_ptr(), exp8(v));
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut tail = [0f32; 8];
            tail[..rest.len()].copy_from_slice(rest);
            // SAFETY: as above, on a full 8-value array.
            unsafe {
                let v = _mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), _mm256_set1_ps(sub));
                _mm256_storeu_ps(tail.as_mut_ptr(), exp8(v));
            }
            rest.copy_from_slice(&tail[..rest.len()]);
        }
    }

    /// `out[i] = g[i] / (1 + e^-g[i]) * u[i]`, SiLU's gate with the scalar expression's operations.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_gate(g: &[f32], u: &[f32], out: &mut [f32]) {
        assert!(g.len() == out.len() && u.len() == out.len());
        let n = out.len() / 8 * 8;
        // SAFETY: compiled for AVX2+FMA; every load and store covers 8 values below `n`.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            for i in (0..n).step_by(8) {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp8(_mm256_xor_ps(gv, sign));
                let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))));
            }
        }
        for i in n..out.len() {
            out[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn vector(xs: &[f32]) -> Vec<f32> {
        let mut out = xs.to_vec();
        // SAFETY: the caller checked for AVX2 and FMA.
        unsafe { x86::exp_shifted(&mut out, 0.0) };
        out
    }

    /// Strided over every bit pattern (both signs, NaN and infinities included) plus the limits and
    /// their neighbours: the vector lanes give the scalar steps' bits, and those are glibc's `expf`
    /// where this test runs on glibc with FMA (glibc picks `__expf_fma` there), else within an ulp.
    #[test]
    fn eight_lanes_are_glibc_s_expf() {
        if !crate::models::kernels::cpu::detect().avx2_fma {
            return;
        }
        let mut xs: Vec<f32> = (0..=u32::MAX / 65_521).map(|i| f32::from_bits(i * 65_521)).collect();
        for edge in [OVER, UNDER, 88.0, -88.0, -87.33, -103.28, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY] {
            for d in -3i32..=3 {
                xs.push(f32::from_bits(edge.to_bits().wrapping_add_signed(d)));
            }
        }
        // Dense where softmax and SiLU live.
        xs.extend((0..2_000_000).map(|i| -110.0 + i as f32 * 1e-4));
        xs.push(f32::NAN);
        let got = vector(&xs);
        let glibc = cfg!(target_env = "gnu");
        for (&x, &y) in xs.iter().zip(&got) {
            let want = scalar(x);
            assert!(y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()), "{x:e}: {y:e} vs {want:e}");
            let libm = x.exp();
            if glibc {
                assert!(
                    y.to_bits() == libm.to_bits() || (y.is_nan() && libm.is_nan()),
                    "{x:e}: {y:e} vs libm {libm:e}"
                );
            } else {
                assert!(y.is_nan() == libm.is_nan() && (y == libm || (y - libm).abs() <= libm.abs() * 1.2e-7));
            }
        }
    }

    #[test]
    fn silu_gate_is_the_scalar_expression() {
        if !crate::models::kernels::cpu::detect().avx2_fma {
            return;
        }
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.213).chain([f32::NAN, 200.0, -200.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let mut out = vec![0f32; g.len()];
        // SAFETY: checked for AVX2 and FMA above.
        unsafe { x86::silu_gate(&g, &u, &mut out) };
        for i in 0..g.len() {
            let want = g[i] / (1.0 + scalar(-g[i])) * u[i];
            assert!(
                out[i].to_bits() == want.to_bits() || (out[i].is_nan() && want.is_nan()),
                "{}: {} vs {want}",
                g[i],
                out[i]
            );
        }
    }
}
