//! The two oracles compose as the GPU pipeline does: append f32 K/V into a typed cache, decode
//! the cache bytes back to values, attend. The result must equal attention over the rounded
//! values, whatever the cache layout.

use vkdecode_reference::dtype::{decode, load, round};
use vkdecode_reference::{AttentionShape, CacheLayout, Dtype, decode_attention, kv_append};

#[test]
fn attention_over_appended_cache_equals_attention_over_rounded_values() {
    let shape = AttentionShape { n_seqs: 2, n_queries: 2, n_q_heads: 4, n_kv_heads: 2, head_dim: 3 };
    let (capacity, n_new, seq_lens) = (5, 3, [3usize, 5]);
    // Deterministic, non-representable-in-f16/bf16 values.
    let value = |i: usize| ((i as f32 * 0.618_034).fract() - 0.5) * 3.000_1;
    let n = shape.n_seqs * n_new * shape.n_kv_heads * shape.head_dim;
    let k_new: Vec<f32> = (0..n).map(value).collect();
    let v_new: Vec<f32> = (0..n).map(|i| value(i + n)).collect();
    let q: Vec<f32> = (0..2 * 2 * 4 * 3).map(|i| value(i + 2 * n)).collect();
    let start: Vec<usize> = seq_lens.iter().map(|&l| l - n_new).collect();

    for dtype in Dtype::ALL {
        let mut want = None;
        for layout in [CacheLayout::head_major(2, 2, capacity, 3, 0), CacheLayout::token_major(2, 2, capacity, 3, 2)] {
            let values = |new: &[f32]| -> Vec<f32> {
                // Positions before `start` stay zero bytes, which decode to 0.0 in every dtype.
                let mut cache = vec![0u8; layout.min_elements() * dtype.size()];
                kv_append(dtype, &mut cache, &layout, new, n_new, &start);
                (0..layout.min_elements()).map(|i| decode(dtype, load(dtype, &cache, i))).collect()
            };
            let got = decode_attention(&shape, &q, &values(&k_new), &values(&v_new), &layout, &seq_lens, 0.5);
            assert!(got.iter().all(|x| x.is_finite()), "{dtype}");

            // Same problem built directly from rounded values in a dense head-major cache.
            let dense = CacheLayout::head_major(2, 2, capacity, 3, 0);
            let direct = |new: &[f32]| -> Vec<f32> {
                let mut buf = vec![0.0f32; dense.min_elements()];
                let mut i = 0;
                for (b, &s) in start.iter().enumerate() {
                    for t in 0..n_new {
                        for h in 0..2 {
                            for d in 0..3 {
                                buf[dense.offset(b, h, s + t, d)] = round(dtype, new[i]);
                                i += 1;
                            }
                        }
                    }
                }
                buf
            };
            let reference = decode_attention(&shape, &q, &direct(&k_new), &direct(&v_new), &dense, &seq_lens, 0.5);
            assert_eq!(got, reference, "{dtype} {layout:?}");
            if let Some(w) = &want {
                assert_eq!(&got, w, "{dtype}: layouts disagree");
            }
            want = Some(got);
        }
    }
}
