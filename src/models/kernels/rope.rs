//! Rotary position embedding of rows of heads, in place, with each row's cos/sin precomputed: the
//! scalar rotation and an AVX2 one with the same bits (two products and one add or subtract per value,
//! never fused, as the scalar code does them).
//!
//! On the engine thread a decode step's rows are too few for a team region, so the rotation ran there
//! alone while the team waited: at eight streams it was ~3% of the engine thread's time, scalar.

/// Per row, the cos and sin of each of its `half` pair angles, in the two layouts the modes read
/// without shuffles.
pub struct Rotation {
    half: usize,
    neox: bool,
    /// llama's mode (adjacent pairs): per row `[c0, c0, c1, c1, ..]` and `[-s0, s0, -s1, s1, ..]`, so
    /// that `x * cos + swap_pairs(x) * sin` is `(x0 c - x1 s, x1 c + x0 s)` per pair.
    /// NeoX's mode (value `i` with `i + half`): per row `[c0, c1, ..]` and `[s0, s1, ..]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotation {
    /// `table`: per row, `half` (cos, sin) pairs.
    pub fn new(table: &[(f32, f32)], half: usize, neox: bool) -> Self {
        let (cos, sin) = if neox {
            table.iter().copied().unzip()
        } else {
            (table.iter().flat_map(|&(c, _)| [c, c]).collect(), table.iter().flat_map(|&(_, s)| [-s, s]).collect())
        };
        Self { half, neox, cos, sin }
    }

    /// Rotates the first `2 * half` values of every head of `rows` (rows `first..` of the table), each
    /// row `heads * head_dim` values.
    pub fn apply(&self, rows: &mut [f32], first: usize, heads: usize, head_dim: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu::features().avx2_fma {
            // SAFETY: the CPU has AVX2 (detected at run time).
            return unsafe { self.apply_avx2(rows, first, heads, head_dim) };
        }
        self.apply_scalar(rows, first, heads, head_dim, 0)
    }

    /// The rotation of pairs `from..half` of every head, one pair at a time.
    fn apply_scalar(&self, rows: &mut [f32], first: usize, heads: usize, head_dim: usize, from: usize) {
        let (half, width) = (self.half, heads * head_dim);
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            let per_row = if self.neox { half } else { 2 * half };
            let (cos, sin) = (&self.cos[(first + r) * per_row..], &self.sin[(first + r) * per_row..]);
            for head in row.chunks_exact_mut(head_dim) {
                for i in from..half {
                    if self.neox {
                        let (c, s) = (cos[i], sin[i]);
                        let (x0, x1) = (head[i], head[i + half]);
                        head[i] = x0 * c - x1 * s;
                        head[i + half] = x0 * s + x1 * c;
                    } else {
                        // sin[2i] is -s: `x0 * c + x1 * -s` is `x0 * c - x1 * s` exactly.
                        let (c, s) = (cos[2 * i], sin[2 * i + 1]);
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = x0 * c - x1 * s;
                        head[2 * i + 1] = x0 * s + x1 * c;
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(&self, rows: &mut [f32], first: usize, heads: usize, head_dim: usize) {
        use std::arch::x86_64::*;
        let (half, width) = (self.half, heads * head_dim);
        assert!(2 * half <= head_dim && rows.len().is_multiple_of(width));
        let n = rows.len() / width;
        let per_row = if self.neox { half } else { 2 * half };
        assert!((first + n) * per_row <= self.cos.len().min(self.sin.len()));
        // Whole vectors of eight: eight pairs (NeoX) or four (llama's mode); the rest one pair at a time.
        let vectors = if self.neox { half / 8 } else { half / 4 };
        let done = if self.neox { 8 * vectors } else { 4 * vectors };
        for r in 0..n {
            let (cos, sin) = (self.cos[(first + r) * per_row..].as_ptr(), self.sin[(first + r) * per_row..].as_ptr());
            for h in 0..heads {
                let head = rows[r * width + h * head_dim..][..head_dim].as_mut_ptr();
                // SAFETY: vector `j` reads and writes values `8j..8j + 8` (and `half + 8j..` in NeoX
                // mode), below `2 * half <= head_dim`, and reads as many of the row's cos and sin
                // (checked above).
                unsafe {
                    for j in 0..vectors {
                        let (c, s) = (_mm256_loadu_ps(cos.add(8 * j)), _mm256_loadu_ps(sin.add(8 * j)));
                        if self.neox {
                            let (a, b) = (head.add(8 * j), head.add(half + 8 * j));
                            let (x0, x1) = (_mm256_loadu_ps(a), _mm256_loadu_ps(b));
                            _mm256_storeu_ps(a, _mm256_sub_ps(_mm256_mul_ps(x0, c), _mm256_mul_ps(x1, s)));
                            _mm256_storeu_ps(b, _mm256_add_ps(_mm256_mul_ps(x0, s), _mm256_mul_ps(x1, c)));
                        } else {
                            let p = head.add(8 * j);
                            let x = _mm256_loadu_ps(p);
                            let swapped = _mm256_permute_ps::<0b1011_0001>(x);
                            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_mul_ps(x, c), _mm256_mul_ps(swapped, s)));
                        }
                    }
                }
            }
        }
        if done < half {
            self.apply_scalar(rows, first, heads, head_dim, done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation as llama.rs computed it before this module: the reference.
    fn reference(x: &mut [f32], table: &[(f32, f32)], half: usize, heads: usize, head_dim: usize, neox: bool) {
        for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let cs = &table[r * half..(r + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(cos, sin)) in cs.iter().enumerate() {
                    let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos - x1 * sin;
                    head[b] = x0 * sin + x1 * cos;
                }
            }
        }
    }

    /// Both modes, whole and partial rotations (rope dims below the head size, and pair counts that
    /// leave a scalar tail), rows taken from the middle of the table: the same bits as the reference,
    /// on whichever path this CPU takes and on the scalar one.
    #[test]
    fn every_path_is_the_reference_bit_for_bit() {
        let val = |i: usize, m: usize| ((i * m % 1009) as f32 / 1009.0 - 0.5) * 7.0;
        for neox in [false, true] {
            for (head_dim, half) in [(64, 32), (256, 128), (64, 16), (48, 20), (16, 3)] {
                let (heads, rows, first) = (3, 5, 2);
                let table: Vec<(f32, f32)> = (0..(first + rows) * half)
                    .map(|i| {
                        let t = i as f32 * 0.37;
                        (t.cos(), t.sin())
                    })
                    .collect();
                let x: Vec<f32> = (0..rows * heads * head_dim).map(|i| val(i, 7919)).collect();
                let mut want = x.clone();
                reference(&mut want, &table[first * half..], half, heads, head_dim, neox);
                let rot = Rotation::new(&table, half, neox);
                let (mut fast, mut scalar) = (x.clone(), x);
                rot.apply(&mut fast, first, heads, head_dim);
                rot.apply_scalar(&mut scalar, first, heads, head_dim, 0);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&want), "neox {neox} head {head_dim} half {half}");
                assert_eq!(bits(&scalar), bits(&want), "scalar: neox {neox} head {head_dim} half {half}");
            }
        }
    }
}
