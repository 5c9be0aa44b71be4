//! AVX2 building blocks shared by the x86 kernels, as ggml writes them. Each is `inline(always)` and
//! only ever inlined into a function compiled for (and selected on) the features it uses.
use std::arch::x86_64::*;

/// u8 x i8, four adjacent products summed per i32 lane: `vpmaddubsw` (pairs to i16; callers keep the
/// pair sums within i16) then `vpmaddwd` by ones.
#[inline(always)]
pub unsafe fn lane_sums_avx2(w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: see the module comment.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
}

/// The same sums in one AVX-512 VNNI instruction (`vpdpbusd`, exact in i32).
#[inline(always)]
pub unsafe fn lane_sums_vnni(w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: see the module comment.
    unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x) }
}

/// ggml's `hsum_float_8`: the order in which the eight lanes are added matters for exactness.
#[inline(always)]
pub unsafe fn hsum_float_8(x: __m256) -> f32 {
    // SAFETY: see the module comment.
    unsafe {
        let mut res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }
}

/// ggml's `bytes_from_nibbles_32`: low nibbles are values 0..16, high nibbles 16..32.
#[inline(always)]
pub unsafe fn nibbles(packed: &[u8; 16]) -> __m256i {
    // SAFETY: reads exactly the 16 bytes of `packed`; see the module comment.
    unsafe {
        let p = _mm_loadu_si128(packed.as_ptr() as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), low), _mm_and_si128(p, low))
    }
}

/// One 32-value block quantized to 8 bits the way candle's `from_float` does it (`d = amax / 127`,
/// values `round(x / d)` half away from zero): the values, their sum, and `amax`. Bit-identical to the
/// scalar code for finite inputs (activations holding NaN or infinity are garbage either way); a tenth
/// of its time.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `xs` must hold 32 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block(xs: &[f32]) -> ([i8; 32], i32, f32) {
    assert!(xs.len() >= 32);
    // SAFETY: the loads read the 32 values checked above; the store writes the 32-byte array.
    unsafe {
        let p = xs.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let sign = _mm256_set1_ps(-0.0);
        let abs = |x: __m256| _mm256_andnot_ps(sign, x);
        let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let q = v.map(|x| {
            let x = _mm256_mul_ps(x, id);
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let away = _mm256_cmp_ps(abs(_mm256_sub_ps(x, t)), half, _CMP_GE_OQ);
            let step = _mm256_and_ps(away, _mm256_or_ps(_mm256_and_ps(x, sign), one));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        // Packing works per 128-bit half; the permute puts the values back in order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut out = [0i8; 32];
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, ordered);
        (out, sum, amax)
    }
}
