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
