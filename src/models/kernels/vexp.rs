//! The decoder's SwiGLU, `silu(gate) * up`, eight lanes at a time on AVX2+FMA, with a scalar twin that
//! takes the same IEEE operations per lane, so every path (and every leftover element) gives the same
//! bits.
//!
//! The exponential is the one llama.cpp's CPU backend uses in its SwiGLU (`ggml_v_expf`, adapted there
//! from Arm's optimized-routines `expf`: a rounding shift, a two-part ln 2 reduction and a degree-5
//! polynomial; at most 1.45 + 0.5 ulp). Before this, libm's `expf` ran one element at a time: 5% of a
//! 16-row decode step with the rest of the activation. The attention softmax keeps libm's `expf`: this
//! exponential there moved SmolLM2's fidelity run away from llama.cpp's (same-top 97.20% -> 96.80%,
//! below the f16-KV bound of 96.87%; llama.cpp's own reference run takes scalar `expf` in attention). Beyond the polynomial's range the special path gives exactly 0 below about
//! -103.97 and +inf above 88.38, as libm does, and never a subnormal on the way (FTZ/DAZ on the compute
//! threads is the second line of defence, see `cpu::flush_denormals`).

const SHIFT: f32 = 12_582_912.0; // 0x1.8p23: adding it rounds to an integer in the low mantissa bits.
const LOG2E: u32 = 0x3fb8_aa3b; // 0x1.715476p+0
const LN2_HI: u32 = 0x3f31_7200; // 0x1.62e4p-1
const LN2_LO: u32 = 0x35bf_be8e; // 0x1.7f7d1cp-20
const C5: u32 = 0x3c07_2010; // 0x1.0e4020p-7
const C4: u32 = 0x3d2b_9f17; // 0x1.573e2ep-5
const C3: u32 = 0x3e2a_af33; // 0x1.555e66p-3
const C2: u32 = 0x3eff_fedb; // 0x1.fffdb6p-2
const C1: u32 = 0x3f7f_fff6; // 0x1.ffffecp-1

#[inline(always)]
fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// e^x, the same bits as one lane of [`x86::exp8`]. `mul_add` is one fused operation: on CPUs with FMA
/// an instruction (this is inlined into callers compiled for it), elsewhere libm's exact `fmaf`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let z = x.mul_add(c(LOG2E), SHIFT);
    let n = z - SHIFT;
    // fnmadd(a, b, c) = c - a * b, rounded once: (-a).mul_add(b, c) is the same operation.
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = c(C5).mul_add(b, c(C4)).mul_add(u, c(C3).mul_add(b, c(C2))).mul_add(u, c(C1) * b);
    if n.abs() <= 126.0 || n.is_nan() {
        return j.mul_add(k, k);
    }
    // |n| > 126: 2^n is outside the normal range, so scale in two steps (s1 * (s2 + s2 * j)).
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 { s1 * s1 } else { s2.mul_add(j, s2) * s1 }
}

/// `x / (1 + e^-x)`, as llama.cpp's `ggml_v_silu`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(0.0 - x))
}

/// `out[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA (detected at run time).
        return unsafe { x86::swiglu(gate, up, out) };
    }
    swiglu_generic(gate, up, out, 0)
}

#[inline(always)]
fn swiglu_generic(gate: &[f32], up: &[f32], out: &mut [f32], from: usize) {
    for i in from..out.len() {
        out[i] = silu(gate[i]) * up[i];
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Eight lanes of [`super::exp`].
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: inlined only into functions compiled for AVX2 and FMA.
        unsafe {
            let set = |b: u32| _mm256_set1_ps(f32::from_bits(b));
            let r = _mm256_set1_ps(SHIFT);
            let z = _mm256_fmadd_ps(x, set(LOG2E), r);
            let n = _mm256_sub_ps(z, r);
            let b = _mm256_fnmadd_ps(n, set(LN2_LO), _mm256_fnmadd_ps(n, set(LN2_HI), x));
            let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
            let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(1f32.to_bits() as i32)));
            let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
            let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
            let u = _mm256_mul_ps(b, b);
            let j = _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_fmadd_ps(set(C5), b, set(C4)), u, _mm256_fmadd_ps(set(C3), b, set(C2))),
                u,
                _mm256_mul_ps(set(C1), b),
            );
            let normal = _mm256_fmadd_ps(j, k, k);
            if _mm256_movemask_ps(big) == 0 {
                return normal;
            }
            let g = _mm256_and_si256(
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
                _mm256_set1_epi32(0x8200_0000u32 as i32),
            );
            let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
            let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
            let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
            let scaled = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
            let mid = _mm256_blendv_ps(normal, scaled, big);
            _mm256_blendv_ps(mid, _mm256_mul_ps(s1, s1), huge)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len() / 8 * 8;
        // SAFETY: every access is below `n <= len` of all three slices (checked by the caller).
        unsafe {
            for i in (0..n).step_by(8) {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
            }
        }
        swiglu_generic(gate, up, out, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs over the whole range that matters: the polynomial's, both special ranges, the limits,
    /// signed zeros, infinities and NaN.
    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 0.0137).collect();
        xs.extend((-400..=400).map(|i| i as f32 * 0.5));
        xs.extend([0.0, -0.0, 88.3, 88.4, 88.8, -87.3, -103.9, -104.0, -150.0, 1e-30, -1e-30, f32::MAX, f32::MIN]);
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE]);
        xs
    }

    #[test]
    fn exp_is_close_to_libm_and_exact_at_the_edges() {
        for x in inputs() {
            let (got, want) = (exp(x), x.exp());
            if want.is_nan() {
                assert!(got.is_nan(), "exp({x}) = {got}");
            } else if want == 0.0 || want.is_infinite() {
                assert_eq!(got, want, "exp({x})");
            } else if want >= f32::MIN_POSITIVE {
                let rel = ((got as f64 - want as f64) / want as f64).abs();
                assert!(rel < 3e-7, "exp({x}) = {got}, libm {want}, relative error {rel:e}");
            } else {
                // Subnormal results: within two of the smallest steps.
                assert!((got - want).abs() <= 2.0 * f32::from_bits(1), "exp({x}) = {got}, libm {want}");
            }
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
    }

    /// The AVX2 lanes are the scalar function's bits, for exp and for SwiGLU with leftovers.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_is_the_scalar_code_bit_for_bit() {
        if !crate::models::kernels::cpu::features().avx2_fma {
            return;
        }
        let xs = inputs();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut lanes = vec![0f32; xs.len() / 8 * 8];
        for (i, chunk) in xs.chunks_exact(8).enumerate() {
            // SAFETY: the CPU has AVX2 and FMA (checked above); 8 floats in, 8 out.
            unsafe {
                use std::arch::x86_64::*;
                #[target_feature(enable = "avx2,fma")]
                unsafe fn one(x: &[f32], out: &mut [f32]) {
                    // SAFETY: eight floats each (the caller's chunks).
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(x.as_ptr()))) }
                }
                one(chunk, &mut lanes[i * 8..i * 8 + 8]);
            }
        }
        let want: Vec<f32> = xs[..lanes.len()].iter().map(|&x| exp(x)).collect();
        assert_eq!(bits(&lanes), bits(&want));

        let up: Vec<f32> = (0..xs.len()).map(|i| (i as f32 * 0.01).cos()).collect();
        let finite: Vec<f32> = xs.iter().map(|&x| if x.is_finite() { x } else { 1.0 }).collect();
        let (mut a, mut b) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        // SAFETY: as above.
        unsafe { x86::swiglu(&finite, &up, &mut a) };
        swiglu_generic(&finite, &up, &mut b, 0);
        assert_eq!(bits(&a), bits(&b));
    }
}
