//! Causal self-attention over one sequence's f32 KV cache, for any mix of new rows (a prompt chunk or one
//! decoded token), with grouped-query heads. Plain loops over contiguous rows, built for AVX2+FMA at run
//! time where the CPU has it.

/// `q`: the new rows, `n x (n_head * head_dim)`; `k`, `v`: the cache including the new rows,
/// `len x (n_kv * head_dim)`; `start`: the position of the first new row; `window`: a row at position
/// `p` sees positions `p - window + 1 ..= p` (`usize::MAX`: all). Writes `n x (n_head * head_dim)`.
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
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA (detected at run time).
        return unsafe { causal_avx2(q, k, v, start, n_head, n_kv, head_dim, window, out) };
    }
    causal_generic(q, k, v, start, n_head, n_kv, head_dim, window, out)
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
    out: &mut [f32],
) {
    causal_generic(q, k, v, start, n_head, n_kv, hd, window, out)
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
    let mut s = acc.iter().sum::<f32>();
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
    out: &mut [f32],
) {
    let q_width = n_head * hd;
    let kv_width = n_kv * hd;
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = q.len() / q_width;
    let mut scores = Vec::with_capacity(start + n);
    for j in 0..n {
        let visible = start + j + 1;
        let first = visible.saturating_sub(window);
        for head in 0..n_head {
            let kvh = head / group;
            let qh = &q[j * q_width + head * hd..j * q_width + (head + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for t in first..visible {
                let s = dot(qh, &k[t * kv_width + kvh * hd..t * kv_width + (kvh + 1) * hd]) * scale;
                max = max.max(s);
                scores.push(s);
            }
            // ggml sums the exponentials in double precision.
            let mut sum = 0f64;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s as f64;
            }
            let inv = (1.0 / sum) as f32;
            let o = &mut out[j * q_width + head * hd..j * q_width + (head + 1) * hd];
            o.fill(0.0);
            for (t, &p) in (first..visible).zip(scores.iter()) {
                let p = p * inv;
                let vt = &v[t * kv_width + kvh * hd..t * kv_width + (kvh + 1) * hd];
                for (oi, vi) in o.iter_mut().zip(vt) {
                    *oi = p.mul_add(*vi, *oi);
                }
            }
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
        causal(&[0.0, 0.0], &k[..2], &v[..2], 0, 1, 1, 2, all, &mut out);
        assert_eq!(out, [10.0, 20.0]);
        // Equal scores at position 1: the mean of both values.
        causal(&[0.0, 0.0], &k, &v, 1, 1, 1, 2, all, &mut out);
        assert_eq!(out, [20.0, 30.0]);
        // Two new rows at once equal the two computed one by one (row 0 must not see row 1).
        let mut both = [0.0; 4];
        causal(&[0.0, 0.0, 0.0, 0.0], &k, &v, 0, 1, 1, 2, all, &mut both);
        assert_eq!(both, [10.0, 20.0, 20.0, 30.0]);
        // A window of one: each row sees only itself.
        causal(&[0.0, 0.0, 0.0, 0.0], &k, &v, 0, 1, 1, 2, 1, &mut both);
        assert_eq!(both, [10.0, 20.0, 30.0, 40.0]);
    }
}
