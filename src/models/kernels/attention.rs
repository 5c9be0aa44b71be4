//! Causal self-attention over one sequence's f32 KV cache, for any mix of new rows (a prompt chunk or one
//! decoded token), with grouped-query heads. Plain loops over contiguous rows, built for AVX2+FMA at run
//! time where the CPU has it.
use std::ops::Range;

/// `q`: the new rows, `n x (n_head * head_dim)`; `k`, `v`: the cache including the new rows,
/// `len x (n_kv * head_dim)`; `start`: the position of the first new row; `window`: a row at position
/// `p` sees positions `p - window + 1 ..= p` (`usize::MAX`: all). Only `heads` are computed (so one
/// row's heads can be spread over threads): `out` is `n x (heads.len() * head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn causal(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512f && head_dim.is_multiple_of(16) {
        // SAFETY: the CPU has AVX-512 F, AVX2 and FMA (detected at run time).
        return unsafe { causal_avx512(q, k, v, start, n_head, n_kv, head_dim, window, heads, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx2_fma && head_dim.is_multiple_of(8) {
        // SAFETY: the CPU has AVX2 and FMA (detected at run time).
        return unsafe { causal_avx2(q, k, v, start, n_head, n_kv, head_dim, window, heads, out) };
    }
    causal_generic(
        q,
        k,
        v,
        start,
        n_head,
        n_kv,
        head_dim,
        window,
        heads,
        out,
        scores_generic,
        max_generic,
        weighted_sum_generic,
        exp_generic,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn causal_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    assert!(hd.is_multiple_of(8), "head size {hd}: the AVX2 path takes whole vectors");
    // SAFETY: this function is compiled for AVX2 and FMA, which `causal_x86` and `weighted_sum_avx2` need.
    unsafe {
        causal_x86(q, k, v, start, n_head, n_kv, hd, window, heads, out, |o, v, kvw, off, first, probs, inv| {
            weighted_sum_avx2(o, v, kvw, off, first, probs, inv)
        })
    }
}

/// [`causal_avx2`]'s bits, with the weighted sum of values in 512-bit registers (half the FMAs of the
/// 256-bit one, the same FMAs per output value) and the query heads of one kv head taken two at a
/// time: see [`causal_pairs_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn causal_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    assert!(hd.is_multiple_of(16), "head size {hd}: the AVX-512 path takes whole vectors");
    // SAFETY: this function is compiled for AVX-512 F, AVX2 and FMA, which `causal_pairs_avx512` needs.
    unsafe { causal_pairs_avx512(q, k, v, start, n_head, n_kv, hd, window, heads, out) }
}

/// One query head of one row: its query, the keys it sees, and where its output goes.
struct Unit {
    q: Range<usize>,
    keys: Range<usize>,
    out: Range<usize>,
}

/// Attention with each kv head's (row, query head) units taken two at a time, row by row and head by
/// head within a row (the three heads of a SmolLM2 group pair as h0+h1, h2+next row's h0, ...). A
/// pair's two queries are scored against each loaded key chunk and its two weighted sums share each
/// loaded value row, so the keys and values that a prompt chunk's rows reread from L2 (64 KB a kv head
/// at 256 positions: more than L1) are read half as often. Every (query, key) score, every output
/// value's FMA chain and every softmax sum takes the same operations in the same order as one unit
/// alone: the same bits as [`causal_generic`], whatever the pairing.
///
/// # Safety
/// Needs AVX-512 F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn causal_pairs_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
) {
    let q_width = n_head * hd;
    let kv_width = n_kv * hd;
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = q.len() / q_width;
    let o_width = heads.len() * hd;
    assert_eq!(out.len(), n * o_width, "{n} rows of heads {heads:?}");
    assert!(hd.is_multiple_of(16) && n_kv * group == n_head);
    let (mut sa, mut sb) = (Vec::with_capacity(start + n), Vec::with_capacity(start + n));
    if heads.is_empty() {
        return;
    }
    for kvh in heads.start / group..=(heads.end - 1) / group {
        let hs = heads.start.max(kvh * group)..heads.end.min((kvh + 1) * group);
        let m = hs.len();
        let unit = |u: usize| {
            let (j, head) = (u / m, hs.start + u % m);
            let visible = start + j + 1;
            let oh = head - heads.start;
            Unit {
                q: j * q_width + head * hd..j * q_width + (head + 1) * hd,
                keys: visible.saturating_sub(window)..visible,
                out: j * o_width + oh * hd..j * o_width + (oh + 1) * hd,
            }
        };
        let off = kvh * hd;
        let units = n * m;
        let mut u = 0;
        while u < units {
            let a = unit(u);
            let b = (u + 1 < units).then(|| unit(u + 1));
            // Keys both see: a pair needs at least one block of eight of them to gain anything.
            let shared = b.as_ref().map(|b| a.keys.start.max(b.keys.start)..a.keys.end.min(b.keys.end));
            match (b, shared) {
                (Some(b), Some(shared)) if shared.start + 8 <= shared.end => {
                    let (qa, qb) = (&q[a.q.clone()], &q[b.q.clone()]);
                    let whole = shared.start + (shared.len() / 8) * 8;
                    sa.clear();
                    sb.clear();
                    // SAFETY: compiled for AVX-512 F, AVX2 and FMA, which these need. Each unit's
                    // scores are pushed in key order: the keys before the shared blocks, the shared
                    // blocks, then the rest.
                    unsafe {
                        scores_avx2(qa, k, kv_width, off, a.keys.start..shared.start, scale, &mut sa);
                        scores_avx2(qb, k, kv_width, off, b.keys.start..shared.start, scale, &mut sb);
                        scores_pair_avx512(qa, qb, k, kv_width, off, shared.start..whole, scale, &mut sa, &mut sb);
                        scores_avx2(qa, k, kv_width, off, whole..a.keys.end, scale, &mut sa);
                        scores_avx2(qb, k, kv_width, off, whole..b.keys.end, scale, &mut sb);
                        let (ma, mb) = (max_avx2(&sa), max_avx2(&sb));
                        super::expf::x86::exp_shifted(&mut sa, ma);
                        super::expf::x86::exp_shifted(&mut sb, mb);
                    }
                    let (ia, ib) = inverse_sums(&sa, &sb);
                    let (oa, ob) = two_mut(out, a.out, b.out);
                    // SAFETY: as above.
                    unsafe {
                        weighted_sum_pair_avx512(
                            oa,
                            ob,
                            v,
                            kv_width,
                            off,
                            (a.keys.start, &sa, ia),
                            (b.keys.start, &sb, ib),
                        )
                    };
                    u += 2;
                }
                _ => {
                    sa.clear();
                    let qa = &q[a.q.clone()];
                    // SAFETY: as above.
                    unsafe {
                        scores_avx2(qa, k, kv_width, off, a.keys.clone(), scale, &mut sa);
                        let max = max_avx2(&sa);
                        super::expf::x86::exp_shifted(&mut sa, max);
                    }
                    let inv = inverse_sum(&sa);
                    // SAFETY: as above.
                    unsafe { weighted_sum_avx512(&mut out[a.out], v, kv_width, off, a.keys.start, &sa, inv) };
                    u += 1;
                }
            }
        }
    }
}

/// Two disjoint ranges of one slice, mutably (`a` and `b` in either order).
fn two_mut(x: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    if a.start < b.start {
        assert!(a.end <= b.start);
        let (lo, hi) = x.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start);
        let (lo, hi) = x.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b])
    }
}

/// `1 / sum` of a unit's exponentials, summed in double precision in key order (as ggml sums them).
#[inline(always)]
fn inverse_sum(exps: &[f32]) -> f32 {
    (1.0 / exps.iter().fold(0f64, |sum, &s| sum + s as f64)) as f32
}

/// [`inverse_sum`] of two units at once: each is one chain of dependent double adds (four cycles
/// each), so running the two chains side by side takes about the time of one. Each chain keeps its
/// order: the same bits.
#[inline(always)]
fn inverse_sums(a: &[f32], b: &[f32]) -> (f32, f32) {
    let both = a.len().min(b.len());
    let (mut x, mut y) = (0f64, 0f64);
    for (&s, &t) in a[..both].iter().zip(&b[..both]) {
        x += s as f64;
        y += t as f64;
    }
    x = a[both..].iter().fold(x, |sum, &s| sum + s as f64);
    y = b[both..].iter().fold(y, |sum, &s| sum + s as f64);
    ((1.0 / x) as f32, (1.0 / y) as f32)
}

/// [`scores_avx2`] for two queries against the same eight keys at a time: query `a`'s eight lanes in
/// the low half of each 512-bit accumulator and `b`'s in the high half, each key chunk loaded once
/// into both halves. The 8x8 transposes run in both halves at once (the 128-bit-lane shuffles do not
/// cross halves); each lane of each (query, key) accumulator takes the FMAs of [`dot`] in its order,
/// and the fold adds lane 0, then lane 1, ... as `dot` does. `keys.len() % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_pair_avx512(
    qa: &[f32],
    qb: &[f32],
    k: &[f32],
    kv_width: usize,
    off: usize,
    keys: Range<usize>,
    scale: f32,
    sa: &mut Vec<f32>,
    sb: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let hd = qa.len();
    assert!(hd.is_multiple_of(8) && qb.len() == hd && keys.len().is_multiple_of(8));
    assert!(keys.end * kv_width <= k.len() && off + hd <= kv_width);
    // SAFETY: every load reads 8 floats of `qa` or `qb` (c + 8 <= hd) or of key row `t + j < keys.end`
    // at `off + c`, within `k` (checked above).
    unsafe {
        for t in keys.step_by(8) {
            let mut acc = [_mm512_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let low = _mm512_castps256_ps512(_mm256_loadu_ps(qa.as_ptr().add(c)));
                let qv = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(low),
                    _mm256_castps_pd(_mm256_loadu_ps(qb.as_ptr().add(c))),
                ));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let key = k.as_ptr().add((t + j) * kv_width + off + c);
                    let kv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(key.cast())));
                    *acc = _mm512_fmadd_ps(qv, kv, *acc);
                }
            }
            let [r0, r1, r2, r3, r4, r5, r6, r7] = acc;
            let (t0, t1) = (_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
            let (t2, t3) = (_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
            let (t4, t5) = (_mm512_unpacklo_ps(r4, r5), _mm512_unpackhi_ps(r4, r5));
            let (t6, t7) = (_mm512_unpacklo_ps(r6, r7), _mm512_unpackhi_ps(r6, r7));
            let (s0, s1) = (_mm512_shuffle_ps::<0x44>(t0, t2), _mm512_shuffle_ps::<0xEE>(t0, t2));
            let (s2, s3) = (_mm512_shuffle_ps::<0x44>(t1, t3), _mm512_shuffle_ps::<0xEE>(t1, t3));
            let (s4, s5) = (_mm512_shuffle_ps::<0x44>(t4, t6), _mm512_shuffle_ps::<0xEE>(t4, t6));
            let (s6, s7) = (_mm512_shuffle_ps::<0x44>(t5, t7), _mm512_shuffle_ps::<0xEE>(t5, t7));
            // 128-bit lanes of `lane[i]`: a's keys t..t+4, b's keys t..t+4, a's t+4..t+8, b's
            // t+4..t+8, each value accumulator lane i of its (query, key).
            const LOWS: i32 = 0b10_00_10_00;
            const HIGHS: i32 = 0b11_01_11_01;
            let lane = [
                _mm512_shuffle_f32x4::<LOWS>(s0, s4),
                _mm512_shuffle_f32x4::<LOWS>(s1, s5),
                _mm512_shuffle_f32x4::<LOWS>(s2, s6),
                _mm512_shuffle_f32x4::<LOWS>(s3, s7),
                _mm512_shuffle_f32x4::<HIGHS>(s0, s4),
                _mm512_shuffle_f32x4::<HIGHS>(s1, s5),
                _mm512_shuffle_f32x4::<HIGHS>(s2, s6),
                _mm512_shuffle_f32x4::<HIGHS>(s3, s7),
            ];
            let sum = lane[1..].iter().fold(lane[0], |s, &l| _mm512_add_ps(s, l));
            let scaled = _mm512_mul_ps(sum, _mm512_set1_ps(scale));
            // a's eight keys, then b's.
            let ordered = _mm512_shuffle_f32x4::<0b11_01_10_00>(scaled, scaled);
            let mut sixteen = [0f32; 16];
            _mm512_storeu_ps(sixteen.as_mut_ptr(), ordered);
            sa.extend_from_slice(&sixteen[..8]);
            sb.extend_from_slice(&sixteen[8..]);
        }
    }
}

/// [`weighted_sum_avx512`] for two units over the same values: each value row's vectors are loaded
/// once for both where both units see the key. Each unit's output values take their FMAs in key order
/// from zero, as alone. A unit is (its first key, its probabilities, `1 / their sum`); the two key
/// ranges must overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn weighted_sum_pair_avx512(
    oa: &mut [f32],
    ob: &mut [f32],
    v: &[f32],
    kv_width: usize,
    off: usize,
    a: (usize, &[f32], f32),
    b: (usize, &[f32], f32),
) {
    use std::arch::x86_64::*;
    /// One unit's FMAs for key row `row`.
    #[inline(always)]
    unsafe fn one<const L: usize>(acc: &mut [__m512; L], row: *const f32, p: f32) {
        // SAFETY: the caller checked that the row's `L` vectors lie inside the values; inlined only
        // into the AVX-512 function below.
        unsafe {
            let p = _mm512_set1_ps(p);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * i)), *acc);
            }
        }
    }
    /// `L` vectors of both outputs from column `c0` (`o*`, `v` point there).
    #[inline(always)]
    unsafe fn part<const L: usize>(
        oa: *mut f32,
        ob: *mut f32,
        v: *const f32,
        kv_width: usize,
        (fa, pa, ia): (usize, &[f32], f32),
        (fb, pb, ib): (usize, &[f32], f32),
    ) {
        let (ea, eb) = (fa + pa.len(), fb + pb.len());
        let (lo, hi) = (fa.max(fb), ea.min(eb));
        // SAFETY: the caller checked that every key row's `L` vectors from `v` lie inside the values,
        // and `o*`'s inside the outputs; inlined only into the AVX-512 function below.
        unsafe {
            let (mut acc_a, mut acc_b) = ([_mm512_setzero_ps(); L], [_mm512_setzero_ps(); L]);
            for t in fa..lo {
                one(&mut acc_a, v.add(t * kv_width), pa[t - fa] * ia);
            }
            for t in fb..lo {
                one(&mut acc_b, v.add(t * kv_width), pb[t - fb] * ib);
            }
            for t in lo..hi {
                let (p, q) = (_mm512_set1_ps(pa[t - fa] * ia), _mm512_set1_ps(pb[t - fb] * ib));
                let row = v.add(t * kv_width);
                for i in 0..L {
                    let x = _mm512_loadu_ps(row.add(16 * i));
                    acc_a[i] = _mm512_fmadd_ps(p, x, acc_a[i]);
                    acc_b[i] = _mm512_fmadd_ps(q, x, acc_b[i]);
                }
            }
            for t in hi..ea {
                one(&mut acc_a, v.add(t * kv_width), pa[t - fa] * ia);
            }
            for t in hi..eb {
                one(&mut acc_b, v.add(t * kv_width), pb[t - fb] * ib);
            }
            for i in 0..L {
                _mm512_storeu_ps(oa.add(16 * i), acc_a[i]);
                _mm512_storeu_ps(ob.add(16 * i), acc_b[i]);
            }
        }
    }
    let hd = oa.len();
    let end = (a.0 + a.1.len()).max(b.0 + b.1.len());
    assert!(hd.is_multiple_of(16) && ob.len() == hd && end * kv_width <= v.len() && off + hd <= kv_width);
    assert!(a.0.max(b.0) <= (a.0 + a.1.len()).min(b.0 + b.1.len()), "the two key ranges overlap");
    for c0 in (0..hd).step_by(128) {
        let (pa, pb, pv) = (oa[c0..].as_mut_ptr(), ob[c0..].as_mut_ptr(), v[off + c0..].as_ptr());
        // SAFETY: vector `i` of part `c0` of key row `t < end` reads 16 floats at
        // `off + c0 + 16i + 16 <= off + hd`, inside `v` (checked above); the stores stay inside `o*`.
        unsafe {
            match (hd - c0).min(128) / 16 {
                1 => part::<1>(pa, pb, pv, kv_width, a, b),
                2 => part::<2>(pa, pb, pv, kv_width, a, b),
                3 => part::<3>(pa, pb, pv, kv_width, a, b),
                4 => part::<4>(pa, pb, pv, kv_width, a, b),
                5 => part::<5>(pa, pb, pv, kv_width, a, b),
                6 => part::<6>(pa, pb, pv, kv_width, a, b),
                7 => part::<7>(pa, pb, pv, kv_width, a, b),
                _ => part::<8>(pa, pb, pv, kv_width, a, b),
            }
        }
    }
}

/// The AVX2 path's body: scores eight keys at a time, vector maxima and glibc's `expf` eight
/// lanes at a time, with the caller's weighted sum of values.
///
/// # Safety
/// Inlined only into functions compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn causal_x86(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
    weighted_sum: impl Fn(&mut [f32], &[f32], usize, usize, usize, &[f32], f32),
) {
    causal_generic(
        q,
        k,
        v,
        start,
        n_head,
        n_kv,
        hd,
        window,
        heads,
        out,
        // SAFETY: the caller is compiled for AVX2 and FMA, which these need.
        |qh, k, kvw, off, keys, scale, scores| unsafe { scores_avx2(qh, k, kvw, off, keys, scale, scores) },
        // SAFETY: as above.
        |scores| unsafe { max_avx2(scores) },
        weighted_sum,
        // SAFETY: as above.
        |scores, max| unsafe { super::expf::x86::exp_shifted(scores, max) },
    )
}

/// The largest score, eight lanes at a time: [`max_generic`]'s value, whose scalar chain of `maxss`
/// (four cycles each, and a NaN test) was ~2% of a prompt. `max_ps(s, m)` returns `m` when `s` is NaN,
/// as `f32::max` ignores NaN; the maximum of the rest does not depend on the order but for the sign
/// of a zero maximum, and `s - 0.0` equals `s - -0.0` for every `s` but -0.0, whose exponential is 1
/// either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(scores: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = scores.chunks_exact(8);
    let rest = chunks.remainder();
    // SAFETY: each load reads one whole chunk of eight.
    let lanes = unsafe {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in chunks {
            m = _mm256_max_ps(_mm256_loadu_ps(c.as_ptr()), m);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
    };
    lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &s| m.max(s))
}

/// [`weighted_sum_avx2`] in 512-bit registers, up to 128 values (eight vectors) at a time; the same
/// FMAs per output value in the same key order. Needs `o.len() % 16 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn weighted_sum_avx512(
    o: &mut [f32],
    v: &[f32],
    kv_width: usize,
    off: usize,
    first: usize,
    probs: &[f32],
    inv: f32,
) {
    use std::arch::x86_64::*;
    /// `L` vectors of the output from column `c0`: a constant count, so the loop over them unrolls.
    #[inline(always)]
    unsafe fn part<const L: usize>(o: *mut f32, v: *const f32, kv_width: usize, first: usize, probs: &[f32], inv: f32) {
        // SAFETY: the caller checked that every key row's `L` vectors from `v` lie inside the values, and
        // `o`'s inside the output; inlined only into the AVX-512 function below.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); L];
            for (t, &p) in (first..).zip(probs) {
                let p = _mm512_set1_ps(p * inv);
                let row = v.add(t * kv_width);
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * i)), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * i), *acc);
            }
        }
    }
    let hd = o.len();
    assert!(hd.is_multiple_of(16) && (first + probs.len()) * kv_width <= v.len() && off + hd <= kv_width);
    for c0 in (0..hd).step_by(128) {
        let (o, v) = (o[c0..].as_mut_ptr(), v[off + c0..].as_ptr());
        // SAFETY: vector `i` of part `c0` of key row `t < first + probs.len()` reads 16 floats at
        // `off + c0 + 16i + 16 <= off + hd`, inside `v` (checked above); the stores stay inside `o`.
        unsafe {
            match (hd - c0).min(128) / 16 {
                1 => part::<1>(o, v, kv_width, first, probs, inv),
                2 => part::<2>(o, v, kv_width, first, probs, inv),
                3 => part::<3>(o, v, kv_width, first, probs, inv),
                4 => part::<4>(o, v, kv_width, first, probs, inv),
                5 => part::<5>(o, v, kv_width, first, probs, inv),
                6 => part::<6>(o, v, kv_width, first, probs, inv),
                7 => part::<7>(o, v, kv_width, first, probs, inv),
                _ => part::<8>(o, v, kv_width, first, probs, inv),
            }
        }
    }
}

/// [`weighted_sum_generic`] with the output held in registers, 64 values (eight vectors) at a time,
/// instead of loaded and stored again for every key: each output value takes the same FMAs in the same
/// key order, so the same bits. Needs `o.len() % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(
    o: &mut [f32],
    v: &[f32],
    kv_width: usize,
    off: usize,
    first: usize,
    probs: &[f32],
    inv: f32,
) {
    use std::arch::x86_64::*;
    let hd = o.len();
    assert!(hd.is_multiple_of(8) && (first + probs.len()) * kv_width <= v.len() && off + hd <= kv_width);
    for c0 in (0..hd).step_by(64) {
        let lanes = (hd - c0).min(64) / 8;
        // SAFETY: vector `i < lanes` of key row `t < first + probs.len()` reads 8 floats at
        // `off + c0 + 8i + 8 <= off + hd`, inside `v` (checked above); the stores stay inside `o`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &p) in (first..).zip(probs) {
                let p = _mm256_set1_ps(p * inv);
                let row = v.as_ptr().add(t * kv_width + off + c0);
                for (i, acc) in acc.iter_mut().enumerate().take(lanes) {
                    *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(row.add(8 * i)), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * i), *acc);
            }
        }
    }
}

/// Eight keys' scores at once, the same bits as [`dot`] gives each: lane `i` of key `t`'s accumulator
/// takes the same FMAs in the same order, and an 8x8 transpose lets one vector add per lane position
/// fold the eight lanes of eight keys in `dot`'s order (lane 0, then + lane 1, ...), instead of eight
/// horizontal sums. Needs `qh.len() % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(
    qh: &[f32],
    k: &[f32],
    kv_width: usize,
    off: usize,
    keys: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let hd = qh.len();
    assert!(hd.is_multiple_of(8) && keys.end * kv_width <= k.len() && off + hd <= kv_width);
    let mut t = keys.start;
    // SAFETY: every load reads 8 floats of `qh` (c + 8 <= hd) or of key row `t + j < keys.end` at
    // `off + c`, within `k` (checked above).
    unsafe {
        while t + 8 <= keys.end {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(qh.as_ptr().add(c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let kv = _mm256_loadu_ps(k.as_ptr().add((t + j) * kv_width + off + c));
                    *acc = _mm256_fmadd_ps(qv, kv, *acc);
                }
            }
            let [r0, r1, r2, r3, r4, r5, r6, r7] = acc;
            let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
            let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
            let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
            let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
            let (s0, s1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xEE>(t0, t2));
            let (s2, s3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xEE>(t1, t3));
            let (s4, s5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xEE>(t4, t6));
            let (s6, s7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xEE>(t5, t7));
            // Lane j of `lane[i]` is key t + j's accumulator lane i.
            let lane = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            let sum = lane[1..].iter().fold(lane[0], |s, &l| _mm256_add_ps(s, l));
            let mut eight = [0f32; 8];
            _mm256_storeu_ps(eight.as_mut_ptr(), _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
            scores.extend_from_slice(&eight);
            t += 8;
        }
    }
    scores_generic(qh, k, kv_width, off, t..keys.end, scale, scores);
}

/// Appends `dot(qh, key t) * scale` for every key `t` in `keys` (`off`: the head's offset in a key row).
#[inline(always)]
fn scores_generic(
    qh: &[f32],
    k: &[f32],
    kv_width: usize,
    off: usize,
    keys: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
) {
    let hd = qh.len();
    // A plain loop, not `extend(map)`: the iterator's fold is a function of its own, compiled without the
    // caller's AVX2+FMA, where `mul_add` became a call to libm's fmaf per element.
    for t in keys {
        scores.push(dot(qh, &k[t * kv_width + off..t * kv_width + off + hd]) * scale);
    }
}

/// `o = sum over keys t of (probs[t - first] * inv) * v[t]` (the head's `off..off + o.len()` of each
/// value row), one FMA per key in key order, from zero.
#[inline(always)]
fn weighted_sum_generic(o: &mut [f32], v: &[f32], kv_width: usize, off: usize, first: usize, probs: &[f32], inv: f32) {
    let hd = o.len();
    o.fill(0.0);
    for (t, &p) in (first..).zip(probs) {
        let p = p * inv;
        let vt = &v[t * kv_width + off..t * kv_width + off + hd];
        for (oi, vi) in o.iter_mut().zip(vt) {
            *oi = p.mul_add(*vi, *oi);
        }
    }
}

/// The largest score, NaNs ignored (`f32::max`); negative infinity when there are none.
#[inline(always)]
fn max_generic(scores: &[f32]) -> f32 {
    scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s))
}

/// `scores[i] = e^(scores[i] - max)` with libm's `expf` (what `super::expf` gives eight at a time).
#[inline(always)]
fn exp_generic(scores: &mut [f32], max: f32) {
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators: vectorizes, and keeps the sum order fixed whatever the batch.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    // Lane 0, then + lane 1, and so on (what `scores_avx2` reproduces eight keys at a time).
    let mut s = acc[1..].iter().fold(acc[0], |s, &x| s + x);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn causal_generic(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: usize,
    heads: Range<usize>,
    out: &mut [f32],
    scores_of: impl Fn(&[f32], &[f32], usize, usize, std::ops::Range<usize>, f32, &mut Vec<f32>),
    max_of: impl Fn(&[f32]) -> f32,
    weighted_sum: impl Fn(&mut [f32], &[f32], usize, usize, usize, &[f32], f32),
    exp_shifted: impl Fn(&mut [f32], f32),
) {
    let q_width = n_head * hd;
    let kv_width = n_kv * hd;
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = q.len() / q_width;
    let o_width = heads.len() * hd;
    assert_eq!(out.len(), n * o_width, "{n} rows of heads {heads:?}");
    let mut scores = Vec::with_capacity(start + n);
    for j in 0..n {
        let visible = start + j + 1;
        let first = visible.saturating_sub(window);
        for (oh, head) in heads.clone().enumerate() {
            let kvh = head / group;
            let qh = &q[j * q_width + head * hd..j * q_width + (head + 1) * hd];
            scores.clear();
            scores_of(qh, k, kv_width, kvh * hd, first..visible, scale, &mut scores);
            let max = max_of(&scores);
            // ggml sums the exponentials in double precision. libm's expf (or `super::expf`, its
            // bits eight at a time): llama.cpp's vectorized one (tried) moved the fidelity run away
            // from llama.cpp's reference (same-top 97.20% -> 96.80%).
            exp_shifted(&mut scores, max);
            let inv = inverse_sum(&scores);
            let o = &mut out[j * o_width + oh * hd..j * o_width + (oh + 1) * hd];
            weighted_sum(o, v, kv_width, kvh * hd, first, &scores, inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_position_returns_its_value_and_rows_see_only_the_past() {
        // 1 head, head_dim 2. Positions 0 and 1 cached; the new row is position 1.
        let k = [1.0, 0.0, 0.0, 1.0];
        let v = [10.0, 20.0, 30.0, 40.0];
        let mut out = [0.0; 2];
        let all = usize::MAX;
        causal(&[0.0, 0.0], &k[..2], &v[..2], 0, 1, 1, 2, all, 0..1, &mut out);
        assert_eq!(out, [10.0, 20.0]);
        // Equal scores at position 1: the mean of both values.
        causal(&[0.0, 0.0], &k, &v, 1, 1, 1, 2, all, 0..1, &mut out);
        assert_eq!(out, [20.0, 30.0]);
        // Two new rows at once equal the two computed one by one (row 0 must not see row 1).
        let mut both = [0.0; 4];
        causal(&[0.0, 0.0, 0.0, 0.0], &k, &v, 0, 1, 1, 2, all, 0..1, &mut both);
        assert_eq!(both, [10.0, 20.0, 20.0, 30.0]);
        // A window of one: each row sees only itself.
        causal(&[0.0, 0.0, 0.0, 0.0], &k, &v, 0, 1, 1, 2, 1, 0..1, &mut both);
        assert_eq!(both, [10.0, 20.0, 30.0, 40.0]);
    }

    /// The AVX2 and AVX-512 paths (scores eight keys at a time, vector maxima, values' weighted sums in
    /// 256- or 512-bit registers, and on AVX-512 two units at a time) are the generic code's bits, for
    /// rows that see key counts of every remainder mod 8, with grouped heads (all of them, or parts of
    /// groups, so units pair within a row and across rows), windows (of one key: no pair shares a key;
    /// of eight or eleven: pairs across rows see different first keys), and head sizes of one, four
    /// and nine 512-bit vectors (the last in two parts).
    #[test]
    fn avx2_is_the_generic_code_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if crate::models::kernels::cpu::features().avx2_fma {
            for hd in [16, 64, 144] {
                let (n_head, n_kv, len) = (6, 2, 37);
                let val = |i: usize, m: usize| ((i * m % 1009) as f32 / 1009.0 - 0.5) * 3.0;
                let k: Vec<f32> = (0..len * n_kv * hd).map(|i| val(i, 7919)).collect();
                let v: Vec<f32> = (0..len * n_kv * hd).map(|i| val(i, 104_729)).collect();
                let cases = [(0, usize::MAX), (20, usize::MAX), (5, 11), (0, 1), (3, 8), (36, usize::MAX)];
                for ((start, window), all) in cases.into_iter().flat_map(|c| [(c, 0..n_head), (c, 1..5), (c, 2..3)]) {
                    let n = len - start;
                    let q: Vec<f32> = (0..n * n_head * hd).map(|i| val(i, 31337)).collect();
                    let mut want = vec![0f32; n * all.len() * hd];
                    causal_generic(
                        &q,
                        &k,
                        &v,
                        start,
                        n_head,
                        n_kv,
                        hd,
                        window,
                        all.clone(),
                        &mut want,
                        scores_generic,
                        max_generic,
                        weighted_sum_generic,
                        exp_generic,
                    );
                    let mut got = vec![0f32; n * all.len() * hd];
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { causal_avx2(&q, &k, &v, start, n_head, n_kv, hd, window, all.clone(), &mut got) };
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "head size {hd} start {start} window {window} heads {all:?}");
                    if crate::models::kernels::cpu::features().avx512f {
                        let mut got = vec![0f32; n * all.len() * hd];
                        // SAFETY: the CPU has AVX-512 F (checked above).
                        unsafe { causal_avx512(&q, &k, &v, start, n_head, n_kv, hd, window, all.clone(), &mut got) };
                        let at = format!("avx512: head size {hd} start {start} window {window} heads {all:?}");
                        assert_eq!(bits(&got), bits(&want), "{at}");
                    }
                }
            }
        }
    }

    /// One row's heads computed in parts (as a decode step spreads them over threads) are the whole
    /// row's bits, on whichever path this CPU takes.
    #[test]
    fn a_row_split_by_heads_is_the_whole_row() {
        let (n_head, n_kv, hd, len) = (9, 3, 64, 21);
        let val = |i: usize, m: usize| ((i * m % 1009) as f32 / 1009.0 - 0.5) * 3.0;
        let k: Vec<f32> = (0..len * n_kv * hd).map(|i| val(i, 7919)).collect();
        let v: Vec<f32> = (0..len * n_kv * hd).map(|i| val(i, 104_729)).collect();
        let q: Vec<f32> = (0..n_head * hd).map(|i| val(i, 31337)).collect();
        let mut whole = vec![0f32; n_head * hd];
        causal(&q, &k, &v, len - 1, n_head, n_kv, hd, usize::MAX, 0..n_head, &mut whole);
        let mut parts = vec![0f32; n_head * hd];
        for heads in [0..4, 4..5, 5..9] {
            let o = &mut parts[heads.start * hd..heads.end * hd];
            causal(&q, &k, &v, len - 1, n_head, n_kv, hd, usize::MAX, heads, o);
        }
        assert_eq!(
            whole.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            parts.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
    }
}
