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

/// One query head of one row: its query, the keys it sees, and where its output goes.
#[cfg(target_arch = "x86_64")]
struct Unit {
    q: Range<usize>,
    keys: Range<usize>,
    out: Range<usize>,
}

/// The keys every unit of `units` sees.
#[cfg(target_arch = "x86_64")]
fn shared_keys(units: &[Unit]) -> Range<usize> {
    let lo = units.iter().map(|u| u.keys.start).max().unwrap_or(0);
    let hi = units.iter().map(|u| u.keys.end).min().unwrap_or(0);
    lo..hi.max(lo)
}

/// [`causal_avx2`]'s bits, with the weighted sum of values in 512-bit registers (half the FMAs of the
/// 256-bit one, the same FMAs per output value) and each kv head's (row, query head) units taken four
/// at a time, else two, row by row
/// and head by head within a row (a SmolLM2 group of three heads groups as h0 h1 h2 + the next row's
/// h0, ...). A group's queries are scored against each loaded key chunk and its weighted sums share
/// each loaded value row, so the keys and values that a prompt chunk's rows reread from L2 (64 KB a kv
/// head at 256 positions of SmolLM2, 256 KB of Gemma 3: more than L1) are read a fourth as often. Every
/// (query, key) score, every output value's FMA chain and every softmax sum takes the same operations
/// in the same order as one unit alone: the same bits as [`causal_generic`], whatever the grouping.
///
/// # Safety
/// Needs AVX-512 F, AVX2 and FMA.
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
    let q_width = n_head * hd;
    let kv_width = n_kv * hd;
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = q.len() / q_width;
    let o_width = heads.len() * hd;
    assert_eq!(out.len(), n * o_width, "{n} rows of heads {heads:?}");
    assert!(hd.is_multiple_of(16), "head size {hd}: the AVX-512 path takes whole vectors");
    assert_eq!(n_kv * group, n_head, "{n_head} query heads over {n_kv} kv heads");
    if heads.is_empty() {
        return;
    }
    let mut scores: [Vec<f32>; 4] = std::array::from_fn(|_| Vec::with_capacity(start + n));
    let at = Attend { q, k, v, kv_width, scale };
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
            // A group needs at least one block of eight keys that all its units see to gain anything.
            // Built on the stack: this runs once per group of a prompt's attention.
            fn group_of<const G: usize>(u: usize, units: usize, unit: impl Fn(usize) -> Unit) -> Option<[Unit; G]> {
                (u + G <= units)
                    .then(|| std::array::from_fn(|i| unit(u + i)))
                    .filter(|us: &[Unit; G]| shared_keys(us).len() >= 8)
            }
            let four = group_of::<4>(u, units, unit);
            let two = if four.is_none() { group_of::<2>(u, units, unit) } else { None };
            // SAFETY: compiled for AVX-512 F, AVX2 and FMA, which `Attend`'s functions need.
            u += unsafe {
                match (four, two) {
                    (Some(us), _) => at.group::<4, 2>(off, us, &mut scores, out),
                    (_, Some(us)) => at.group::<2, 1>(off, us, &mut scores, out),
                    _ => at.one(off, unit(u), &mut scores[0], out),
                }
            };
        }
    }
}

/// What every unit of one [`causal_avx512`] call reads.
#[cfg(target_arch = "x86_64")]
struct Attend<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    kv_width: usize,
    scale: f32,
}

#[cfg(target_arch = "x86_64")]
impl Attend<'_> {
    /// One unit alone, as [`causal_avx2`] computes it; returns 1 (units done).
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn one(&self, off: usize, a: Unit, s: &mut Vec<f32>, out: &mut [f32]) -> usize {
        s.clear();
        // SAFETY: compiled for AVX-512 F, AVX2 and FMA, which these need.
        unsafe {
            scores_avx2(&self.q[a.q], self.k, self.kv_width, off, a.keys.clone(), self.scale, s);
            let max = max_avx2(s);
            super::expf::x86::exp_shifted(s, max);
            let inv = inverse_sum(s);
            weighted_sum_avx512(&mut out[a.out], self.v, self.kv_width, off, a.keys.start, s, inv);
        }
        1
    }

    /// `U` units (`P = U / 2` pairs) that share at least eight keys, together; returns `U`. Each unit's
    /// scores are pushed in key order: its keys before the shared blocks (scored alone), the shared
    /// blocks of eight (together), then the rest (alone).
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn group<const U: usize, const P: usize>(
        &self,
        off: usize,
        us: [Unit; U],
        scores: &mut [Vec<f32>; 4],
        out: &mut [f32],
    ) -> usize {
        assert!(U == 2 * P && U <= scores.len());
        let shared = shared_keys(&us);
        let whole = shared.start + (shared.len() / 8) * 8;
        let qs: [&[f32]; U] = std::array::from_fn(|i| &self.q[us[i].q.clone()]);
        let (k, kvw, scale) = (self.k, self.kv_width, self.scale);
        // SAFETY: compiled for AVX-512 F, AVX2 and FMA, which these need.
        unsafe {
            for (s, (a, q)) in scores.iter_mut().zip(us.iter().zip(qs)) {
                s.clear();
                scores_avx2(q, k, kvw, off, a.keys.start..shared.start, scale, s);
            }
            scores_group_avx512::<U, P>(qs, k, kvw, off, shared.start..whole, scale, &mut scores[..U]);
            for (s, (a, q)) in scores.iter_mut().zip(us.iter().zip(qs)) {
                scores_avx2(q, k, kvw, off, whole..a.keys.end, scale, s);
                let max = max_avx2(s);
                super::expf::x86::exp_shifted(s, max);
            }
        }
        let inv = inverse_sums::<U>(std::array::from_fn(|i| &scores[i][..]));
        let parts: [(Range<usize>, usize, &[f32], f32); U] =
            std::array::from_fn(|i| (us[i].out.clone(), us[i].keys.start, &scores[i][..], inv[i]));
        // SAFETY: as above.
        unsafe { weighted_sum_group_avx512::<U>(out, self.v, kvw, off, parts) };
        U
    }
}

/// `1 / sum` of a unit's exponentials, summed in double precision in key order (as ggml sums them).
#[inline(always)]
fn inverse_sum(exps: &[f32]) -> f32 {
    (1.0 / exps.iter().fold(0f64, |sum, &s| sum + s as f64)) as f32
}

/// [`inverse_sum`] of `U` units at once: each is one chain of dependent double adds (four cycles
/// each), so running the chains side by side takes about the time of one. Each chain keeps its order:
/// the same bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn inverse_sums<const U: usize>(exps: [&[f32]; U]) -> [f32; U] {
    let both = exps.iter().map(|e| e.len()).min().unwrap_or(0);
    let mut sums = [0f64; U];
    for i in 0..both {
        for (sum, e) in sums.iter_mut().zip(&exps) {
            *sum += e[i] as f64;
        }
    }
    std::array::from_fn(|u| (1.0 / exps[u][both..].iter().fold(sums[u], |sum, &s| sum + s as f64)) as f32)
}

/// [`scores_avx2`] for `U = 2P` queries against the same eight keys at a time: per pair of queries,
/// the first's eight lanes in the low half of a 512-bit accumulator and the second's in the high half,
/// each key chunk loaded once into both halves and used by every pair. The 8x8 transposes run in both
/// halves at once (the 128-bit-lane shuffles do not cross halves); each lane of each (query, key)
/// accumulator takes the FMAs of [`dot`] in its order, and the fold adds lane 0, then lane 1, ... as
/// `dot` does. `keys.len() % 8 == 0`; `out[u]` gets query `u`'s scores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_group_avx512<const U: usize, const P: usize>(
    qs: [&[f32]; U],
    k: &[f32],
    kv_width: usize,
    off: usize,
    keys: Range<usize>,
    scale: f32,
    out: &mut [Vec<f32>],
) {
    use std::arch::x86_64::*;
    let hd = qs[0].len();
    assert!(U == 2 * P && out.len() == U && qs.iter().all(|q| q.len() == hd));
    assert!(hd.is_multiple_of(8) && keys.len().is_multiple_of(8));
    assert!(keys.end * kv_width <= k.len() && off + hd <= kv_width);
    // SAFETY: every load reads 8 floats of a query (c + 8 <= hd) or of key row `t + j < keys.end` at
    // `off + c`, within `k` (checked above).
    unsafe {
        for t in keys.step_by(8) {
            let mut acc = [[_mm512_setzero_ps(); 8]; P];
            for c in (0..hd).step_by(8) {
                let qv: [__m512; P] = std::array::from_fn(|p| {
                    let low = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(qs[2 * p].as_ptr().add(c))));
                    let high = _mm256_castps_pd(_mm256_loadu_ps(qs[2 * p + 1].as_ptr().add(c)));
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(low, high))
                });
                for j in 0..8 {
                    let key = k.as_ptr().add((t + j) * kv_width + off + c);
                    let kv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(key.cast())));
                    for (acc, &qv) in acc.iter_mut().zip(&qv) {
                        acc[j] = _mm512_fmadd_ps(qv, kv, acc[j]);
                    }
                }
            }
            for (p, &[r0, r1, r2, r3, r4, r5, r6, r7]) in acc.iter().enumerate() {
                let (t0, t1) = (_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
                let (t2, t3) = (_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
                let (t4, t5) = (_mm512_unpacklo_ps(r4, r5), _mm512_unpackhi_ps(r4, r5));
                let (t6, t7) = (_mm512_unpacklo_ps(r6, r7), _mm512_unpackhi_ps(r6, r7));
                let (s0, s1) = (_mm512_shuffle_ps::<0x44>(t0, t2), _mm512_shuffle_ps::<0xEE>(t0, t2));
                let (s2, s3) = (_mm512_shuffle_ps::<0x44>(t1, t3), _mm512_shuffle_ps::<0xEE>(t1, t3));
                let (s4, s5) = (_mm512_shuffle_ps::<0x44>(t4, t6), _mm512_shuffle_ps::<0xEE>(t4, t6));
                let (s6, s7) = (_mm512_shuffle_ps::<0x44>(t5, t7), _mm512_shuffle_ps::<0xEE>(t5, t7));
                // 128-bit lanes of `lane[i]`: the first query's keys t..t+4, the second's, the first's
                // t+4..t+8, the second's, each value accumulator lane i of its (query, key).
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
                // The first query's eight keys, then the second's.
                let ordered = _mm512_shuffle_f32x4::<0b11_01_10_00>(scaled, scaled);
                let mut sixteen = [0f32; 16];
                _mm512_storeu_ps(sixteen.as_mut_ptr(), ordered);
                out[2 * p].extend_from_slice(&sixteen[..8]);
                out[2 * p + 1].extend_from_slice(&sixteen[8..]);
            }
        }
    }
}

/// [`weighted_sum_avx512`] for `U` units over the same values: each value row's vectors are loaded
/// once for all the units that see the key. Each unit's output values take their FMAs in key order
/// from zero, as alone. A unit is (its output's range in `out`, its first key, its probabilities,
/// `1 / their sum`); the outputs are disjoint and the key ranges share at least one key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn weighted_sum_group_avx512<const U: usize>(
    out: &mut [f32],
    v: &[f32],
    kv_width: usize,
    off: usize,
    units: [(Range<usize>, usize, &[f32], f32); U],
) {
    use std::arch::x86_64::*;
    /// One unit's FMAs for the value row at `row`.
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
    /// `L` vectors of every unit's output from column `c0` (`o[u]` and `v` point there).
    #[inline(always)]
    unsafe fn part<const U: usize, const L: usize>(
        o: [*mut f32; U],
        v: *const f32,
        kv_width: usize,
        units: &[(Range<usize>, usize, &[f32], f32); U],
    ) {
        let lo = units.iter().map(|u| u.1).max().unwrap_or(0);
        let hi = units.iter().map(|u| u.1 + u.2.len()).min().unwrap_or(0);
        // SAFETY: the caller checked that every key row's `L` vectors from `v` lie inside the values,
        // and `o[u]`'s inside the output; inlined only into the AVX-512 function below.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); L]; U];
            for (acc, &(_, first, probs, inv)) in acc.iter_mut().zip(units) {
                for t in first..lo {
                    one(acc, v.add(t * kv_width), probs[t - first] * inv);
                }
            }
            for t in lo..hi {
                let p: [__m512; U] = std::array::from_fn(|u| _mm512_set1_ps(units[u].2[t - units[u].1] * units[u].3));
                let row = v.add(t * kv_width);
                for i in 0..L {
                    let x = _mm512_loadu_ps(row.add(16 * i));
                    for (acc, &p) in acc.iter_mut().zip(&p) {
                        acc[i] = _mm512_fmadd_ps(p, x, acc[i]);
                    }
                }
            }
            for (acc, &(_, first, probs, inv)) in acc.iter_mut().zip(units) {
                for t in hi..first + probs.len() {
                    one(acc, v.add(t * kv_width), probs[t - first] * inv);
                }
            }
            for (acc, o) in acc.iter().zip(o) {
                for (i, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(16 * i), acc);
                }
            }
        }
    }
    let hd = units[0].0.len();
    let end = units.iter().map(|u| u.1 + u.2.len()).max().unwrap_or(0);
    assert!(hd.is_multiple_of(16) && end * kv_width <= v.len() && off + hd <= kv_width);
    let lo = units.iter().map(|u| u.1).max().unwrap_or(0);
    assert!(lo < units.iter().map(|u| u.1 + u.2.len()).min().unwrap_or(0), "the key ranges share a key");
    for (i, a) in units.iter().enumerate() {
        assert!(a.0.len() == hd && a.0.end <= out.len(), "unit {i}'s output lies inside `out`");
        for b in &units[..i] {
            assert!(a.0.end <= b.0.start || b.0.end <= a.0.start, "the outputs are disjoint");
        }
    }
    // At most 16 accumulators: eight vectors per part for two units, four for four.
    let most = (16 / U).min(8);
    let base = out.as_mut_ptr();
    for c0 in (0..hd).step_by(16 * most) {
        // SAFETY: each unit's output range lies inside `out` (checked above).
        let o: [*mut f32; U] = std::array::from_fn(|u| unsafe { base.add(units[u].0.start + c0) });
        let pv = v[off + c0..].as_ptr();
        // SAFETY: vector `i` of part `c0` of key row `t < end` reads 16 floats at
        // `off + c0 + 16i + 16 <= off + hd`, inside `v` (checked above); the stores stay inside each
        // unit's own output, and the outputs are disjoint (checked above).
        unsafe {
            match (hd - c0).min(16 * most) / 16 {
                1 => part::<U, 1>(o, pv, kv_width, &units),
                2 => part::<U, 2>(o, pv, kv_width, &units),
                3 => part::<U, 3>(o, pv, kv_width, &units),
                4 => part::<U, 4>(o, pv, kv_width, &units),
                5 => part::<U, 5>(o, pv, kv_width, &units),
                6 => part::<U, 6>(o, pv, kv_width, &units),
                7 => part::<U, 7>(o, pv, kv_width, &units),
                _ => part::<U, 8>(o, pv, kv_width, &units),
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
