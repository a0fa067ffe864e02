//! Decode attention: the f64 oracle every attention kernel is checked against.
//!
//! # Contract
//!
//! Inputs: `q` is `[B][n_queries][H][D]` contiguous f32. `k` and `v` are cache *values* (already
//! decoded from the cache dtype to f32); element (seq, kv_head, pos, d) of each lives at
//! `layout.offset(seq, kv_head, pos, d)`. `seq_lens[b]` is the number of valid cache positions of
//! sequence b (`0..=capacity`). The output is `[B][n_queries][H][D]` in f64.
//!
//! For sequence b, query token t (0-based) and query head h:
//! - The query sits at position `p = seq_lens[b] - n_queries + t` (signed): the queries are the
//!   last `n_queries` tokens of the sequence.
//! - It attends to cache positions `0..=p` of sequence b (causal mask). If `p < 0` the row is
//!   fully masked and its output is exactly `+0.0` (never NaN).
//! - Query head h reads kv head `h / (H / Hkv)` (GQA: consecutive query heads share a kv head;
//!   grouped, not modulo).
//! - `s_j = scale · Σ_d q[d]·k[j][d]`, computed in f64 from the f32 values.
//! - `w_j = exp(s_j − max_i s_i) / Σ_i exp(s_i − max_i s_i)` over `i, j ∈ 0..=p`: two passes
//!   (max, then exp-sum), all in f64.
//! - `out[d] = Σ_j w_j · v[j][d]`, in f64.
//! - Options ([`AttentionOptions`], none by default): a sliding window w limits the positions to
//!   `max(0, p + 1 − w) ..= p`; a softcap c maps each scaled logit s to `c·tanh(s/c)`; a sink
//!   logit per query head joins the denominator (`+ exp(sink − max)`) without a value.
//!
//! # Invariants
//!
//! - Elements at positions `> p` (hence every position `>= seq_lens[b]`) and the padding between
//!   rows are never read, not even to be multiplied by zero: callers may leave NaN/Inf there.
//! - Visible values are not sanitised: a non-finite visible input propagates as IEEE 754 says.
//! - The result does not depend on the layout's strides, only on the logical values.
//! - Panics only on violated preconditions (mismatched lengths or layout, `H % Hkv != 0`,
//!   `seq_len > capacity`); the main crate validates before calling.

use ndarray::{Array4, s};

use crate::layout::CacheLayout;

/// Shape of a decode-attention problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// B: number of sequences.
    pub n_seqs: usize,
    /// Query tokens per sequence (1..8 in practice): the last `n_queries` positions of each.
    pub n_queries: usize,
    /// H: query heads.
    pub n_q_heads: usize,
    /// Hkv: key/value heads; divides H.
    pub n_kv_heads: usize,
    /// D: elements per head.
    pub head_dim: usize,
}

/// Options of decode attention beyond the causal mask; `Default` is none of them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttentionOptions<'a> {
    /// Sliding window: a query at position p sees positions `max(0, p + 1 − w) ..= p` only.
    pub window: Option<usize>,
    /// Logit softcap c > 0: each scaled logit s becomes `c · tanh(s / c)` (Gemma 2 style).
    pub softcap: Option<f64>,
    /// Attention sinks: one logit per query head that joins the softmax denominator but
    /// contributes no value (gpt-oss style). A row with no visible position stays 0.
    pub sinks: Option<&'a [f32]>,
}

/// Causal decode attention in f64; see the module documentation for the exact contract.
///
/// `q` is `[B][n_queries][H][D]` contiguous; `k` and `v` are cache values indexed by
/// `layout.offset(seq, kv_head, pos, d)`; returns `[B][n_queries][H][D]`.
pub fn decode_attention(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &CacheLayout,
    seq_lens: &[usize],
    scale: f64,
) -> Array4<f64> {
    decode_attention_with(shape, q, k, v, layout, seq_lens, scale, &AttentionOptions::default())
}

/// [`decode_attention`] with options (sliding window, logit softcap, attention sinks).
#[allow(clippy::too_many_arguments, reason = "mirrors the kernel's inputs one to one")]
pub fn decode_attention_with(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &CacheLayout,
    seq_lens: &[usize],
    scale: f64,
    options: &AttentionOptions<'_>,
) -> Array4<f64> {
    let &AttentionShape { n_seqs, n_queries, n_q_heads, n_kv_heads, head_dim } = shape;
    assert!(
        n_kv_heads > 0 && n_q_heads % n_kv_heads == 0,
        "n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads ({n_kv_heads}), which must be > 0"
    );
    assert_eq!(
        (layout.n_seqs, layout.n_kv_heads, layout.head_dim),
        (n_seqs, n_kv_heads, head_dim),
        "layout (n_seqs, n_kv_heads, head_dim) must match the attention shape"
    );
    assert_eq!(q.len(), n_seqs * n_queries * n_q_heads * head_dim, "q must be [B][n_queries][H][D] contiguous");
    assert_eq!(seq_lens.len(), n_seqs, "seq_lens must have one entry per sequence");
    let needed = layout.min_elements();
    assert!(k.len() >= needed, "k holds {} elements, layout needs {needed}", k.len());
    assert!(v.len() >= needed, "v holds {} elements, layout needs {needed}", v.len());
    for (b, &len) in seq_lens.iter().enumerate() {
        assert!(len <= layout.capacity, "seq_lens[{b}] = {len} exceeds the cache capacity {}", layout.capacity);
    }
    assert!(options.window != Some(0), "a sliding window must be at least 1");
    assert!(options.softcap.is_none_or(|c| c > 0.0), "a softcap must be positive");
    if let Some(sinks) = options.sinks {
        assert_eq!(sinks.len(), n_q_heads, "sinks must hold one logit per query head");
    }

    let group = n_q_heads / n_kv_heads;
    let mut out = Array4::zeros((n_seqs, n_queries, n_q_heads, head_dim));
    // Reused across rows: holds the scores, then the unnormalised weights, of one row.
    let mut weights: Vec<f64> = Vec::new();
    for (b, &seq_len) in seq_lens.iter().enumerate() {
        for t in 0..n_queries {
            // p = seq_len - n_queries + t < 0 ⇔ seq_len + t < n_queries; tested unsigned so no
            // cast can wrap. A masked row keeps its zeros and reads nothing.
            if seq_len + t < n_queries {
                continue;
            }
            let end = seq_len + t + 1 - n_queries; // p + 1, and p < seq_len
            let first = options.window.map_or(0, |w| end.saturating_sub(w));
            for h in 0..n_q_heads {
                let kv_head = h / group;
                let q_row = &q[((b * n_queries + t) * n_q_heads + h) * head_dim..][..head_dim];

                weights.clear();
                weights.extend((first..end).map(|j| {
                    let dot: f64 = q_row
                        .iter()
                        .enumerate()
                        .map(|(d, &qd)| f64::from(qd) * f64::from(k[layout.offset(b, kv_head, j, d)]))
                        .sum();
                    let s = scale * dot;
                    options.softcap.map_or(s, |c| c * (s / c).tanh())
                }));
                let sink = options.sinks.map(|s| f64::from(s[h]));
                // Subtracting the max keeps every exponent <= 0, so huge logits cannot overflow
                // and the largest term is exactly 1, so the sum cannot underflow to 0.
                let max = weights.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                for w in &mut weights {
                    *w = (*w - max).exp();
                }
                let sum: f64 = weights.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - max).exp());

                let mut out_row = out.slice_mut(s![b, t, h, ..]);
                for (i, &w) in weights.iter().enumerate() {
                    let w = w / sum;
                    for (d, o) in out_row.iter_mut().enumerate() {
                        *o += w * f64::from(v[layout.offset(b, kv_head, first + i, d)]);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::abs_diff_eq;
    use ndarray::{Array2, Array3, ArrayView3};

    /// SplitMix64: a tiny deterministic PRNG so the tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `lo..=hi`.
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
        }

        /// Uniform f32 in [-a, a).
        fn f32(&mut self, a: f32) -> f32 {
            let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * a
        }
    }

    /// Values that poison any arithmetic they reach.
    const GARBAGE: [f32; 5] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::NAN];

    /// A decode problem whose K/V are kept both logically (`[B][Hkv][capacity][D]`) and as cache
    /// buffers in `layout`, so a test can re-lay or slice it.
    #[derive(Clone)]
    struct Problem {
        shape: AttentionShape,
        q: Vec<f32>,
        k_dense: Array4<f32>,
        v_dense: Array4<f32>,
        layout: CacheLayout,
        seq_lens: Vec<usize>,
        scale: f64,
    }

    impl Problem {
        fn random(rng: &mut Rng, shape: AttentionShape, capacity: usize, seq_lens: Vec<usize>) -> Self {
            let AttentionShape { n_seqs: b, n_queries: nq, n_q_heads: h, n_kv_heads: hkv, head_dim: d } = shape;
            let q = (0..b * nq * h * d).map(|_| rng.f32(2.0)).collect();
            let k_dense = Array4::from_shape_simple_fn((b, hkv, capacity, d), || rng.f32(1.0));
            let v_dense = Array4::from_shape_simple_fn((b, hkv, capacity, d), || rng.f32(1.0));
            Problem {
                shape,
                q,
                k_dense,
                v_dense,
                layout: CacheLayout::head_major(b, hkv, capacity, d, 0),
                seq_lens,
                scale: 1.0 / (d as f64).sqrt(),
            }
        }

        /// Writes the valid positions of `dense` into a `layout` buffer whose every other
        /// element (invalid positions, padding) is garbage.
        fn cache(&self, dense: &Array4<f32>) -> Vec<f32> {
            let mut buf: Vec<f32> = (0..self.layout.min_elements()).map(|i| GARBAGE[i % GARBAGE.len()]).collect();
            for ((b, h, j, d), &x) in dense.indexed_iter() {
                if j < self.seq_lens[b] {
                    buf[self.layout.offset(b, h, j, d)] = x;
                }
            }
            buf
        }

        fn run(&self) -> Array4<f64> {
            decode_attention(
                &self.shape,
                &self.q,
                &self.cache(&self.k_dense),
                &self.cache(&self.v_dense),
                &self.layout,
                &self.seq_lens,
                self.scale,
            )
        }
    }

    fn shape(n_seqs: usize, n_queries: usize, n_q_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionShape {
        AttentionShape { n_seqs, n_queries, n_q_heads, n_kv_heads, head_dim }
    }

    /// The independent formulation: causal self-attention over a whole prefill of length L, as
    /// matrices. K/V heads are repeated to MHA, the full L×L score matrix is materialised (masked
    /// entries included) and an explicit 0/−∞ mask matrix is added before a row softmax.
    /// `q` is `[L][H][D]`, `k` and `v` are `[L][Hkv][D]`; returns `[L][H][D]`.
    fn naive_causal_prefill(q: ArrayView3<f64>, k: ArrayView3<f64>, v: ArrayView3<f64>, scale: f64) -> Array3<f64> {
        let (l, h, d) = q.dim();
        let group = h / k.dim().1;
        let k_mha = Array3::from_shape_fn((l, h, d), |(j, hh, dd)| k[[j, hh / group, dd]]);
        let v_mha = Array3::from_shape_fn((l, h, d), |(j, hh, dd)| v[[j, hh / group, dd]]);
        let mask = Array2::from_shape_fn((l, l), |(i, j)| if j <= i { 0.0 } else { f64::NEG_INFINITY });
        let mut out = Array3::zeros((l, h, d));
        for hh in 0..h {
            let mut p = q.slice(s![.., hh, ..]).dot(&k_mha.slice(s![.., hh, ..]).t()) * scale + &mask;
            for mut row in p.rows_mut() {
                let m = row.fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                row.mapv_inplace(|x| (x - m).exp());
                let z = row.sum();
                row /= z;
            }
            out.slice_mut(s![.., hh, ..]).assign(&p.dot(&v_mha.slice(s![.., hh, ..])));
        }
        out
    }

    /// Checks every row of `got` (the decode of `prob`) against the naive prefill of each
    /// sequence: row t is prefill row p = L − n_queries + t, or exact zeros when p < 0.
    fn check_against_prefill(rng: &mut Rng, prob: &Problem, got: &Array4<f64>) {
        let AttentionShape { n_queries: nq, n_q_heads: h, head_dim: d, .. } = prob.shape;
        for (b, &l) in prob.seq_lens.iter().enumerate() {
            // Prefill queries: decode queries at their positions, arbitrary values elsewhere
            // (those rows are computed but not compared).
            let mut q_full = Array3::from_shape_simple_fn((l, h, d), || f64::from(rng.f32(2.0)));
            for t in (nq.saturating_sub(l))..nq {
                let p = l + t - nq;
                for hh in 0..h {
                    for dd in 0..d {
                        q_full[[p, hh, dd]] = f64::from(prob.q[((b * nq + t) * h + hh) * d + dd]);
                    }
                }
            }
            let kv = |dense: &Array4<f32>| dense.slice(s![b, .., ..l, ..]).permuted_axes([1, 0, 2]).mapv(f64::from);
            let want =
                naive_causal_prefill(q_full.view(), kv(&prob.k_dense).view(), kv(&prob.v_dense).view(), prob.scale);
            for t in 0..nq {
                for hh in 0..h {
                    for dd in 0..d {
                        let x = got[[b, t, hh, dd]];
                        if l + t < nq {
                            assert_eq!(x.to_bits(), 0, "masked row b={b} t={t} h={hh} d={dd}: {x}");
                        } else {
                            let y = want[[l + t - nq, hh, dd]];
                            assert!(
                                abs_diff_eq!(x, y, epsilon = 1e-12),
                                "b={b} t={t} h={hh} d={dd}: decode {x} vs prefill {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A single-sequence problem with the given q/k/v rows (`[n_queries][H][D]` and
    /// `[Hkv][seq_len][D]` flattened), head-major, no padding, capacity = seq_len.
    fn single(s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], seq_len: usize, scale: f64) -> Array4<f64> {
        let layout = CacheLayout::head_major(1, s.n_kv_heads, seq_len, s.head_dim, 0);
        decode_attention(&s, q, k, v, &layout, &[seq_len], scale)
    }

    #[test]
    fn hand_computed_two_positions() {
        // D = 2, scale 1, one sequence of two positions, two queries (at positions 0 and 1).
        // k0 = [0, 0], k1 = [ln 3, 0]; q1 = [1, 7] → scores 0 and ln 3 → weights 1/4 and 3/4.
        // v0 = [1, 2], v1 = [5, −2] → out1 = [1/4 + 15/4, 2/4 − 6/4] = [4, −1].
        // q0 sees only position 0 → out0 = v0 = [1, 2] exactly.
        let ln3 = 3f32.ln();
        let q = [9.0, -4.0, 1.0, 7.0];
        let k = [0.0, 0.0, ln3, 0.0];
        let v = [1.0, 2.0, 5.0, -2.0];
        let out = single(shape(1, 2, 1, 1, 2), &q, &k, &v, 2, 1.0);
        assert_eq!(out.slice(s![0, 0, 0, ..]).to_vec(), vec![1.0, 2.0]);
        // ln 3 rounded to f32 moves the weights by ~1e-8.
        approx::assert_abs_diff_eq!(out[[0, 1, 0, 0]], 4.0, epsilon = 1e-7);
        approx::assert_abs_diff_eq!(out[[0, 1, 0, 1]], -1.0, epsilon = 1e-7);
    }

    #[test]
    fn scale_multiplies_the_logits() {
        // Same as above with q1 = [2, 0] and scale 1/2: scores are again 0 and ln 3.
        let ln3 = 3f32.ln();
        let out = single(shape(1, 1, 1, 1, 2), &[2.0, 0.0], &[0.0, 0.0, ln3, 0.0], &[1.0, 2.0, 5.0, -2.0], 2, 0.5);
        approx::assert_abs_diff_eq!(out[[0, 0, 0, 0]], 4.0, epsilon = 1e-7);
        approx::assert_abs_diff_eq!(out[[0, 0, 0, 1]], -1.0, epsilon = 1e-7);
    }

    #[test]
    fn zero_scale_averages_the_visible_values() {
        // All scores 0 → uniform weights 1/3 over positions 0..=2.
        let k = [3.0, -8.0, 0.5, 100.0, -1.0, 2.0];
        let v = [1.0, 10.0, 2.0, 20.0, 6.0, 60.0];
        let out = single(shape(1, 1, 1, 1, 2), &[1.5, -0.25], &k, &v, 3, 0.0);
        approx::assert_relative_eq!(out[[0, 0, 0, 0]], 3.0, max_relative = 1e-15);
        approx::assert_relative_eq!(out[[0, 0, 0, 1]], 30.0, max_relative = 1e-15);
    }

    #[test]
    fn single_visible_position_returns_its_v_row_exactly() {
        let v = [0.1f32, -3.5, 1e-30, 7e30];
        let out = single(shape(1, 1, 2, 1, 4), &[5.0; 8], &[-2.0, 9.0, 0.3, 1.0], &v, 1, 0.7);
        for h in 0..2 {
            let row: Vec<f64> = out.slice(s![0, 0, h, ..]).to_vec();
            assert_eq!(row, v.map(f64::from).to_vec(), "head {h}");
        }
    }

    #[test]
    fn fully_masked_rows_are_exact_zeros() {
        // seq_len 2, 5 queries: t = 0, 1, 2 sit at p = −3, −2, −1; t = 3, 4 at p = 0, 1.
        // Sequence 1 is empty: all its rows are masked, and its cache is pure garbage.
        let mut rng = Rng(1);
        let prob = Problem::random(&mut rng, shape(2, 5, 2, 1, 3), 4, vec![2, 0]);
        let out = prob.run();
        for ((b, t, h, d), &x) in out.indexed_iter() {
            if b == 1 || t < 3 {
                assert_eq!(x.to_bits(), 0, "b={b} t={t} h={h} d={d}: {x}");
            } else {
                assert!(x.is_finite() && x != 0.0, "b={b} t={t} h={h} d={d}: {x}");
            }
        }
        assert_eq!(
            out.slice(s![0, 3, .., ..]),
            prob.v_dense.slice(s![0, .., 0, ..]).mapv(f64::from).broadcast((2, 3)).unwrap()
        );
    }

    #[test]
    fn garbage_beyond_the_visible_positions_never_reaches_the_output() {
        let mut rng = Rng(2);
        let prob = Problem::random(&mut rng, shape(3, 4, 4, 2, 5), 9, vec![9, 4, 6]);
        let dirty = prob.run(); // cache() fills every invalid position and padding with garbage
        assert!(dirty.iter().all(|x| x.is_finite()));
        let zero_filled = |dense: &Array4<f32>| {
            let mut buf = vec![0.0f32; prob.layout.min_elements()];
            for ((b, h, j, d), &x) in dense.indexed_iter() {
                if j < prob.seq_lens[b] {
                    buf[prob.layout.offset(b, h, j, d)] = x;
                }
            }
            buf
        };
        let clean = decode_attention(
            &prob.shape,
            &prob.q,
            &zero_filled(&prob.k_dense),
            &zero_filled(&prob.v_dense),
            &prob.layout,
            &prob.seq_lens,
            prob.scale,
        );
        assert_eq!(dirty, clean);
    }

    #[test]
    fn earlier_queries_ignore_later_valid_positions() {
        // Within seq_len, query t must not read positions > p either: its row equals a
        // single-query decode over a cache cut at p + 1 (whose later positions are garbage).
        let mut rng = Rng(3);
        let multi = Problem::random(&mut rng, shape(1, 6, 2, 2, 4), 8, vec![8]);
        let out = multi.run();
        for t in 0..6 {
            let mut one = multi.clone();
            one.shape.n_queries = 1;
            one.seq_lens = vec![8 - 6 + t + 1];
            one.q = multi.q[t * 8..(t + 1) * 8].to_vec();
            assert_eq!(out.slice(s![.., t..=t, .., ..]), one.run(), "query {t}");
        }
    }

    #[test]
    fn gqa_equals_mha_with_kv_heads_repeated() {
        let mut rng = Rng(4);
        let gqa = Problem::random(&mut rng, shape(2, 3, 6, 2, 4), 7, vec![7, 5]);
        let mut mha = gqa.clone();
        mha.shape.n_kv_heads = 6;
        mha.layout = CacheLayout::head_major(2, 6, 7, 4, 0);
        // q head h uses kv head h / 3: heads 0,1,2 → 0 and 3,4,5 → 1 (not h % 2).
        let repeat = |dense: &Array4<f32>| Array4::from_shape_fn((2, 6, 7, 4), |(b, h, j, d)| dense[[b, h / 3, j, d]]);
        mha.k_dense = repeat(&gqa.k_dense);
        mha.v_dense = repeat(&gqa.v_dense);
        let out = gqa.run();
        assert_eq!(out, mha.run());
        // Guard against a vacuous pass: heads of different groups really differ.
        assert_ne!(out.slice(s![0, 2, 1, ..]), out.slice(s![0, 2, 3, ..]));
    }

    #[test]
    fn head_major_and_token_major_layouts_with_padding_agree() {
        let mut rng = Rng(5);
        let mut prob = Problem::random(&mut rng, shape(3, 2, 4, 2, 5), 6, vec![6, 1, 3]);
        let want = prob.run();
        for layout in [
            CacheLayout::head_major(3, 2, 6, 5, 3),
            CacheLayout::token_major(3, 2, 6, 5, 0),
            CacheLayout::token_major(3, 2, 6, 5, 7),
        ] {
            prob.layout = layout;
            assert_eq!(prob.run(), want, "{layout:?}");
        }
    }

    #[test]
    fn decode_at_each_position_equals_that_row_of_the_causal_prefill() {
        let mut rng = Rng(6);
        let l = 10;
        let s = shape(1, 1, 4, 2, 8);
        let prob = Problem::random(&mut rng, s, l, vec![l]);
        let kv = |dense: &Array4<f32>| dense.slice(s![0, .., .., ..]).permuted_axes([1, 0, 2]).mapv(f64::from);
        let q_full = Array3::from_shape_simple_fn((l, 4, 8), || rng.f32(2.0));
        let want = naive_causal_prefill(
            q_full.mapv(f64::from).view(),
            kv(&prob.k_dense).view(),
            kv(&prob.v_dense).view(),
            prob.scale,
        );
        for p in 0..l {
            let mut one = prob.clone();
            one.seq_lens = vec![p + 1];
            one.q = q_full.slice(s![p, .., ..]).iter().copied().collect();
            let got = one.run();
            for ((_, _, h, d), &x) in got.indexed_iter() {
                let y = want[[p, h, d]];
                assert!(abs_diff_eq!(x, y, epsilon = 1e-12), "p={p} h={h} d={d}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn multi_query_rows_match_prefill_rows() {
        let mut rng = Rng(7);
        // n_queries == seq_len: the whole prefill; n_queries < seq_len: its last rows;
        // n_queries > seq_len: leading rows masked.
        for (nq, l) in [(8, 8), (3, 11), (5, 2)] {
            let prob = Problem::random(&mut rng, shape(1, nq, 3, 1, 6), 12, vec![l]);
            check_against_prefill(&mut rng, &prob, &prob.run());
        }
    }

    #[test]
    fn matches_naive_prefill_on_random_problems() {
        let mut rng = Rng(8);
        for _ in 0..300 {
            let hkv = rng.range(1, 3);
            let s = shape(rng.range(1, 4), rng.range(1, 8), hkv * rng.range(1, 4), hkv, rng.range(1, 9));
            let capacity = rng.range(1, 20);
            let seq_lens = (0..s.n_seqs).map(|_| rng.range(0, capacity)).collect();
            let mut prob = Problem::random(&mut rng, s, capacity, seq_lens);
            prob.scale *= f64::from(rng.f32(2.0));
            let pad = rng.range(0, 3);
            prob.layout = if rng.range(0, 1) == 0 {
                CacheLayout::head_major(s.n_seqs, hkv, capacity, s.head_dim, pad)
            } else {
                CacheLayout::token_major(s.n_seqs, hkv, capacity, s.head_dim, pad)
            };
            let got = prob.run();
            check_against_prefill(&mut rng, &prob, &got);
        }
    }

    #[test]
    fn huge_logits_stay_finite() {
        // D = 1, q = 100: scores −1e4 and −10050 (all very negative: without max subtraction
        // both exps underflow to 0 and the row is 0/0), then +1e4 (would overflow to ∞).
        // Shifted scores are 0 and −50 → weights 1/(1+e^−50) and e^−50/(1+e^−50).
        let v = [3.0, -5.0, 11.0];
        let low = single(shape(1, 1, 1, 1, 1), &[100.0], &[-100.0, -100.5], &v[..2], 2, 1.0);
        let w1 = (-50f64).exp() / (1.0 + (-50f64).exp());
        approx::assert_relative_eq!(low[[0, 0, 0, 0]], 3.0 * (1.0 - w1) - 5.0 * w1, max_relative = 1e-15);
        // Scores +1e4, −1e4, +9900: weights 1, 0, e^−100 (to within f64).
        let high = single(shape(1, 1, 1, 1, 1), &[100.0], &[100.0, -100.0, 99.0], &v, 3, 1.0);
        assert!(high[[0, 0, 0, 0]].is_finite());
        approx::assert_relative_eq!(high[[0, 0, 0, 0]], 3.0, max_relative = 1e-15);
    }

    #[test]
    fn ragged_batch_equals_independent_sequences() {
        let mut rng = Rng(9);
        let batch = Problem::random(&mut rng, shape(4, 3, 4, 2, 5), 12, vec![0, 1, 7, 12]);
        let out = batch.run();
        for b in 0..4 {
            let one = Problem {
                shape: AttentionShape { n_seqs: 1, ..batch.shape },
                q: batch.q[b * 60..(b + 1) * 60].to_vec(),
                k_dense: batch.k_dense.slice(s![b..=b, .., .., ..]).to_owned(),
                v_dense: batch.v_dense.slice(s![b..=b, .., .., ..]).to_owned(),
                layout: CacheLayout::head_major(1, 2, 12, 5, 0),
                seq_lens: vec![batch.seq_lens[b]],
                scale: batch.scale,
            };
            assert_eq!(out.slice(s![b..=b, .., .., ..]), one.run(), "sequence {b}");
        }
    }

    #[test]
    fn empty_problems_give_empty_outputs() {
        let layout = CacheLayout::head_major(0, 1, 4, 2, 0);
        let out = decode_attention(&shape(0, 1, 2, 1, 2), &[], &[], &[], &layout, &[], 1.0);
        assert_eq!(out.dim(), (0, 1, 2, 2));
    }

    #[test]
    #[should_panic(expected = "must be a multiple of n_kv_heads")]
    fn panics_when_kv_heads_do_not_divide_q_heads() {
        let layout = CacheLayout::head_major(1, 2, 1, 1, 0);
        decode_attention(&shape(1, 1, 3, 2, 1), &[0.0; 3], &[0.0; 2], &[0.0; 2], &layout, &[1], 1.0);
    }

    #[test]
    #[should_panic(expected = "exceeds the cache capacity")]
    fn panics_when_seq_len_exceeds_capacity() {
        let layout = CacheLayout::head_major(1, 1, 2, 1, 0);
        decode_attention(&shape(1, 1, 1, 1, 1), &[0.0], &[0.0; 2], &[0.0; 2], &layout, &[3], 1.0);
    }

    #[test]
    #[should_panic(expected = "q must be")]
    fn panics_on_wrong_q_length() {
        let layout = CacheLayout::head_major(1, 1, 2, 1, 0);
        decode_attention(&shape(1, 2, 1, 1, 1), &[0.0], &[0.0; 2], &[0.0; 2], &layout, &[2], 1.0);
    }

    #[test]
    #[should_panic(expected = "layout needs")]
    fn panics_on_short_cache() {
        let layout = CacheLayout::token_major(1, 1, 3, 2, 1);
        decode_attention(&shape(1, 1, 1, 1, 2), &[0.0; 2], &[0.0; 7], &[0.0; 6], &layout, &[1], 1.0);
    }

    #[test]
    #[should_panic(expected = "must match the attention shape")]
    fn panics_on_layout_shape_mismatch() {
        let layout = CacheLayout::head_major(1, 1, 2, 3, 0);
        decode_attention(&shape(1, 1, 1, 1, 2), &[0.0; 2], &[0.0; 6], &[0.0; 6], &layout, &[1], 1.0);
    }

    #[test]
    fn sliding_window_equals_attention_over_the_last_w_positions() {
        // One head, D = 2: with window 2 the row at p = 3 sees positions 2 and 3 only, which is
        // plain attention over a cache holding just those two rows.
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: 1, n_kv_heads: 1, head_dim: 2 };
        let layout = CacheLayout::head_major(1, 1, 4, 2, 0);
        let q = [0.5f32, -1.0];
        let k = [1.0f32, 2.0, -3.0, 0.5, 0.25, 1.0, 2.0, -1.0];
        let v = [9.0f32, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0];
        let options = AttentionOptions { window: Some(2), ..Default::default() };
        let windowed = decode_attention_with(&shape, &q, &k, &v, &layout, &[4], 1.0, &options);
        let tail = CacheLayout::head_major(1, 1, 2, 2, 0);
        let plain = decode_attention(&shape, &q, &k[4..], &v[4..], &tail, &[2], 1.0);
        assert!(windowed.iter().zip(plain.iter()).all(|(a, b)| abs_diff_eq!(a, b, epsilon = 1e-15)));
    }

    #[test]
    fn softcap_bounds_the_logits() {
        // Two positions with logits 0 and 100; softcap 1 maps them to 0 and tanh(100) ≈ 1, so
        // the weights are 1/(1+e) and e/(1+e).
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: 1, n_kv_heads: 1, head_dim: 1 };
        let layout = CacheLayout::head_major(1, 1, 2, 1, 0);
        let options = AttentionOptions { softcap: Some(1.0), ..Default::default() };
        let out = decode_attention_with(&shape, &[1.0], &[0.0, 100.0], &[0.0, 1.0], &layout, &[2], 1.0, &options);
        let e = 100f64.tanh().exp();
        assert!(abs_diff_eq!(out[[0, 0, 0, 0]], e / (1.0 + e), epsilon = 1e-12));
    }

    #[test]
    fn a_sink_joins_the_denominator_only() {
        // One position with logit 0 and V = 1, and a sink of logit ln 3: weight 1/(1+3).
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: 1, n_kv_heads: 1, head_dim: 1 };
        let layout = CacheLayout::head_major(1, 1, 1, 1, 0);
        let sinks = [3f32.ln()];
        let options = AttentionOptions { sinks: Some(&sinks), ..Default::default() };
        let out = decode_attention_with(&shape, &[0.0], &[5.0], &[1.0], &layout, &[1], 1.0, &options);
        assert!(abs_diff_eq!(out[[0, 0, 0, 0]], 0.25, epsilon = 1e-7));
        // A fully masked row stays 0 with a sink.
        let masked = decode_attention_with(&shape, &[0.0], &[5.0], &[1.0], &layout, &[0], 1.0, &options);
        assert_eq!(masked[[0, 0, 0, 0]], 0.0);
    }
}
