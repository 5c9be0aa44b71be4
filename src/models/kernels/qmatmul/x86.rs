//! AVX2 / AVX-512 VNNI building blocks shared by the x86 kernels over repacked weights (see
//! `interleaved` in the parent module), and the activation quantizer. Each is `inline(always)` and only
//! ever inlined into a function compiled for (and selected on) the features it uses.
//!
//! In the repacked layout, weight vector `v` of a block holds values `4v..4v + 4` of every column of a
//! group, so one instruction against four broadcast activation bytes gives eight columns' partial
//! integer sums; a kernel adds a block's eight of them in integers and converts once per block.
use std::arch::x86_64::*;

/// Calls `$run::<[G,] R>(wg, q, rows, tile)` with the run of one to four rows as an array, so each run
/// length gets its own code with its accumulators in registers. The second form passes any leading
/// arguments: `by_rows!(run::<G>(a, b, q), rows, tile)` calls `run::<G, R>(a, b, q, rows, tile)`.
macro_rules! by_rows {
    ($run:ident $(::<$g:ty>)?, $wg:expr, $q:expr, $rows:expr, $tile:expr) => {
        by_rows!($run $(::<$g>)? ($wg, $q), $rows, $tile)
    };
    ($run:ident $(::<$g:ty>)? ($($arg:expr),*), $rows:expr, $tile:expr) => {
        match *$rows {
            [a] => $run::<$($g,)? 1>($($arg,)* &[a], $tile),
            [a, b] => $run::<$($g,)? 2>($($arg,)* &[a, b], $tile),
            [a, b, c] => $run::<$($g,)? 3>($($arg,)* &[a, b, c], $tile),
            [a, b, c, d] => $run::<$($g,)? 4>($($arg,)* &[a, b, c, d], $tile),
            _ => unreachable!("runs are one to four rows"),
        }
    };
}
pub(crate) use by_rows;

/// [`by_rows`] for kernels whose runs are up to eight rows.
macro_rules! by_rows8 {
    ($run:ident $(::<$g:ty>)? ($($arg:expr),*), $rows:expr, $tile:expr) => {
        match *$rows {
            [a] => $run::<$($g,)? 1>($($arg,)* &[a], $tile),
            [a, b] => $run::<$($g,)? 2>($($arg,)* &[a, b], $tile),
            [a, b, c] => $run::<$($g,)? 3>($($arg,)* &[a, b, c], $tile),
            [a, b, c, d] => $run::<$($g,)? 4>($($arg,)* &[a, b, c, d], $tile),
            [a, b, c, d, e] => $run::<$($g,)? 5>($($arg,)* &[a, b, c, d, e], $tile),
            [a, b, c, d, e, f] => $run::<$($g,)? 6>($($arg,)* &[a, b, c, d, e, f], $tile),
            [a, b, c, d, e, f, g] => $run::<$($g,)? 7>($($arg,)* &[a, b, c, d, e, f, g], $tile),
            [a, b, c, d, e, f, g, h] => $run::<$($g,)? 8>($($arg,)* &[a, b, c, d, e, f, g, h], $tile),
            _ => unreachable!("runs are one to eight rows"),
        }
    };
}
pub(crate) use by_rows8;

/// How far ahead of the block being multiplied the kernels ask for weights, in bytes. A task walks its
/// groups' blocks in memory order, so this is a fixed distance along one stream. Without it the
/// instructions that consume each block's first load held a third of the Q4_1 kernel's samples at
/// eight rows on an AVX-512 Xeon (waiting on memory, not on arithmetic).
const PREFETCH_AHEAD: usize = 4096;

/// Prefetches the cache lines of the `T` that lies [`PREFETCH_AHEAD`] bytes past `w` (the weight blocks
/// of a matrix are one array, so that is a later block of the same task, or the next task's first).
/// A prefetch past the end of the array is harmless: it never faults.
#[inline(always)]
pub fn prefetch_ahead<T>(w: &T) {
    let p = (w as *const T as *const i8).wrapping_add(PREFETCH_AHEAD);
    for line in (0..std::mem::size_of::<T>()).step_by(64) {
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing architecturally and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line)) };
    }
}

/// The four activation bytes that pair with weight vector `v` (block values `4v..4v + 4`), in every
/// 32-bit lane.
#[inline(always)]
pub unsafe fn quad(x: &[i8; 32], v: usize) -> __m256i {
    assert!(v < 8);
    // SAFETY: reads 4 of the array's 32 bytes (checked above); see the module comment.
    unsafe { _mm256_set1_epi32((x.as_ptr().add(4 * v) as *const i32).read_unaligned()) }
}

/// Weight vector `v` of a group's 4-bit block, as u8 values 0..16: the low nibbles of 32-byte chunk `v`
/// (column values `4v..4v + 4`) for `v < 4`, else the high nibbles of chunk `v - 4` (values
/// `16 + 4(v - 4)..`, that is `4v..4v + 4` again).
#[inline(always)]
pub unsafe fn nibbles(qs: &[u8; 128], v: usize) -> __m256i {
    assert!(v < 8);
    // SAFETY: reads one 32-byte chunk of the 128 (checked above); see the module comment.
    unsafe {
        let p = _mm256_loadu_si256(qs.as_ptr().add(32 * (v % 4)) as *const __m256i);
        let p = if v < 4 { p } else { _mm256_srli_epi16(p, 4) };
        _mm256_and_si256(p, _mm256_set1_epi8(0x0F))
    }
}

/// Chunk `v` (32 bytes) of two groups' blocks in one 512-bit register, `a`'s in the low half: the
/// 16-column kernels' weight vector for two adjacent groups (AVX-512).
#[inline(always)]
pub unsafe fn chunk_pair(a: &[u8], b: &[u8], v: usize) -> __m512i {
    assert!(32 * (v + 1) <= a.len().min(b.len()));
    // SAFETY: reads chunk `v` of both slices (checked above); see the module comment.
    unsafe {
        let load = |p: &[u8]| _mm256_loadu_si256(p.as_ptr().add(32 * v) as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(a)), load(b))
    }
}

/// [`nibbles`] of two groups' blocks, `a`'s in the low half (AVX-512 BW).
#[inline(always)]
pub unsafe fn nibbles_pair(a: &[u8; 128], b: &[u8; 128], v: usize) -> __m512i {
    assert!(v < 8);
    // SAFETY: see the module comment.
    unsafe {
        let p = chunk_pair(a, b, v % 4);
        let p = if v < 4 { p } else { _mm512_srli_epi16::<4>(p) };
        _mm512_and_si512(p, _mm512_set1_epi8(0x0F))
    }
}

/// Eight f32 of each of two groups in one register, `a`'s in the low half.
#[inline(always)]
pub unsafe fn f32_pair(a: &[f32; 8], b: &[f32; 8]) -> __m512 {
    // SAFETY: reads both 8-value arrays; see the module comment.
    unsafe {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(a.as_ptr()))),
            _mm256_castps_pd(_mm256_loadu_ps(b.as_ptr())),
        ))
    }
}

/// Eight f16 (as their bits) converted to f32 (exact; F16C).
#[inline(always)]
pub unsafe fn half8(h: &[u16; 8]) -> __m256 {
    // SAFETY: reads the 16-byte array; see the module comment.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i)) }
}

/// Eight f16 of each of two groups converted to f32 in one register, `a`'s in the low half (exact).
#[inline(always)]
pub unsafe fn half_pair(a: &[u16; 8], b: &[u16; 8]) -> __m512 {
    // SAFETY: reads both 16-byte arrays; see the module comment.
    unsafe {
        let h = |h: &[u16; 8]| _mm_loadu_si128(h.as_ptr() as *const __m128i);
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(h(a)), h(b)))
    }
}

/// The four activation bytes that pair with weight vector `v`, in every 32-bit lane of a 512-bit
/// register.
#[inline(always)]
pub unsafe fn quad512(x: &[i8; 32], v: usize) -> __m512i {
    assert!(v < 8);
    // SAFETY: reads 4 of the array's 32 bytes (checked above); see the module comment.
    unsafe { _mm512_set1_epi32((x.as_ptr().add(4 * v) as *const i32).read_unaligned()) }
}

/// Weight vector `v` of a group's 8-bit block: chunk `v`, column values `4v..4v + 4`.
#[inline(always)]
pub unsafe fn bytes(qs: &[u8; 256], v: usize) -> __m256i {
    assert!(v < 8);
    // SAFETY: reads one 32-byte chunk of the 256 (checked above); see the module comment.
    unsafe { _mm256_loadu_si256(qs.as_ptr().add(32 * v) as *const __m256i) }
}

/// u8 x i8, four adjacent products summed per i32 lane: `vpmaddubsw` (pairs to i16; callers keep the
/// pair sums within i16) then `vpmaddwd` by ones.
#[inline(always)]
pub unsafe fn lane_sums_avx2(w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: see the module comment.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
}

/// ggml's `hsum_float_8` on eight accumulators at once (lane `c` of the result is column `c`'s sum):
/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, the order in which it adds the lanes. The
/// K-quant kernels keep ggml's AVX2 lane order (Gemma's fidelity margin is thin, see `kquant`).
#[inline(always)]
pub unsafe fn hsum_lanes(a: &[__m256; 8]) -> __m256 {
    // SAFETY: see the module comment.
    unsafe {
        let even = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
        let odd = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
        _mm256_add_ps(even, odd)
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
