//! KV-cache append: the oracle for the append kernel, exact to the bit.
//!
//! # Contract
//!
//! `new` is `[B][n_new][Hkv][D]` contiguous f32. Token t of sequence b, head h, element d is
//! stored at position `start[b] + t` of that sequence, i.e. at element index
//! `layout.offset(b, h, start[b] + t, d)` of `cache` (little-endian, `dtype.size()` bytes per
//! element), with bit pattern `dtype::encode(dtype, x)`: round to nearest even (subnormals
//! included, overflow to ±Inf), NaN → the canonical quiet NaN with the input's sign.
//!
//! # Invariants
//!
//! - Only the `B·n_new·Hkv·D` addressed elements change; every other byte of `cache` (other
//!   positions, padding, bytes past the layout) is left untouched.
//! - Each written element reads back (`dtype::decode`) as `dtype::round(dtype, x)`.
//! - Panics only on violated preconditions: `start.len() != B`, `new.len() != B·n_new·Hkv·D`,
//!   `start[b] + n_new > capacity`, a cache shorter than `layout.min_elements()·dtype.size()`
//!   bytes, or an overlapping layout (two targets sharing an element would make the result
//!   depend on write order).
//!
//! # q8_0
//!
//! With [`Dtype::Q8_0`] each written (seq, head, pos) row of `D` values becomes `D / 32` blocks
//! ([`q8_0::quantize_block`]); element index e lives in block e / 32, at byte (e / 32)·34. `D` and
//! every stride must be multiples of 32, and every row must be one ggml defines (finite, a scale
//! within f16 and a reciprocal within f32): anything else is a violated precondition (panics).

use crate::dtype::{self, Dtype};
use crate::layout::CacheLayout;
use crate::q8_0::{self, Q8_0_BLOCK_BYTES, QK8_0};

/// Writes `n_new` new tokens of every sequence into a cache, converting f32 → `dtype` (round to
/// nearest even, NaN → canonical quiet NaN, via [`dtype::encode`]).
///
/// `new` is `[B][n_new][Hkv][D]` contiguous; token t of sequence b goes to position
/// `start[b] + t`. See the module documentation for the full contract.
pub fn kv_append(dtype: Dtype, cache: &mut [u8], layout: &CacheLayout, new: &[f32], n_new: usize, start: &[usize]) {
    let (n_seqs, n_kv_heads, head_dim) = (layout.n_seqs, layout.n_kv_heads, layout.head_dim);
    assert_eq!(start.len(), n_seqs, "start must have one entry per sequence");
    assert_eq!(new.len(), n_seqs * n_new * n_kv_heads * head_dim, "new must be [B][n_new][Hkv][D] contiguous");
    for (b, &s) in start.iter().enumerate() {
        // checked_add: a wrapped sum would pass the bound and write to the wrong place.
        assert!(
            s.checked_add(n_new).is_some_and(|end| end <= layout.capacity),
            "start[{b}] + n_new = {s} + {n_new} exceeds the cache capacity {}",
            layout.capacity
        );
    }
    assert_q8_0_geometry(dtype, layout);
    let needed = dtype.cache_bytes(layout.min_elements());
    assert!(cache.len() >= needed, "cache holds {} bytes, layout needs {needed}", cache.len());
    assert!(!layout.overlaps(), "cache layout maps distinct elements to the same place: {layout:?}");

    write_tokens(dtype, cache, new, n_new, start, (n_kv_heads, head_dim), |b, h, pos, d| layout.offset(b, h, pos, d));
}

/// Writes `new` (`[B][n_new][Hkv][D]` contiguous, its length checked by the caller) at position
/// `start[b] + t` of every sequence, element (b, h, pos, d) at `offset(b, h, pos, d)`: the loop
/// of [`kv_append`] and of [`crate::paged::kv_append_paged`].
pub(crate) fn write_tokens(
    dtype: Dtype,
    buf: &mut [u8],
    new: &[f32],
    n_new: usize,
    start: &[usize],
    (n_kv_heads, head_dim): (usize, usize),
    offset: impl Fn(usize, usize, usize, usize) -> usize,
) {
    if dtype == Dtype::Q8_0 {
        // Rows of head_dim values, in `new`'s order; each 32 of them one block.
        let mut rows = new.chunks_exact(head_dim.max(1));
        for (b, &s) in start.iter().enumerate() {
            for t in 0..n_new {
                for h in 0..n_kv_heads {
                    let row = rows.next().expect("length checked by the caller");
                    for (j, x) in row.chunks_exact(QK8_0).enumerate() {
                        let x: &[f32; QK8_0] = x.try_into().expect("chunks_exact yields whole blocks");
                        let block = q8_0::quantize_block(x).unwrap_or_else(|e| {
                            panic!("q8_0 row (seq {b}, token {t}, head {h}) block {j} is undefined in ggml: {e}")
                        });
                        let at = offset(b, h, s + t, j * QK8_0) / QK8_0 * Q8_0_BLOCK_BYTES;
                        buf[at..at + Q8_0_BLOCK_BYTES].copy_from_slice(&block);
                    }
                }
            }
        }
        return;
    }
    // `new` is walked in its own contiguous order, so its index is just the running count.
    let mut values = new.iter();
    for (b, &s) in start.iter().enumerate() {
        for t in 0..n_new {
            for h in 0..n_kv_heads {
                for d in 0..head_dim {
                    let x = *values.next().expect("length checked by the caller");
                    dtype::store(dtype, buf, offset(b, h, s + t, d), dtype::encode(dtype, x));
                }
            }
        }
    }
}

/// Panics unless a q8_0 layout holds whole blocks: head_dim and every stride multiples of 32.
pub(crate) fn assert_q8_0_geometry(dtype: Dtype, layout: &CacheLayout) {
    if dtype != Dtype::Q8_0 {
        return;
    }
    for (name, v) in [
        ("head_dim", layout.head_dim),
        ("stride_pos", layout.stride_pos),
        ("stride_head", layout.stride_head),
        ("stride_seq", layout.stride_seq),
    ] {
        assert!(v.is_multiple_of(QK8_0), "q8_0 cache: {name} = {v} is not a multiple of {QK8_0} (whole blocks)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{decode, encode, load, round};

    const CANARY: u8 = 0xa5;

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

        /// Any f32 bit pattern half the time (NaNs, Infs, subnormals included), else a value in
        /// [-8, 8) whose low mantissa bits exercise rounding.
        fn f32(&mut self) -> f32 {
            let r = self.next_u64();
            if r & 1 == 0 {
                f32::from_bits((r >> 32) as u32)
            } else {
                ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 8.0
            }
        }
    }

    /// Appends `new` into a canary-filled cache and checks every byte: written elements hold
    /// `encode(x)` (and read back as `round(x)`), all others still hold the canary.
    fn append_and_check(dtype: Dtype, layout: &CacheLayout, new: &[f32], n_new: usize, start: &[usize], slack: usize) {
        let size = dtype.size();
        let mut cache = vec![CANARY; layout.min_elements() * size + slack];
        kv_append(dtype, &mut cache, layout, new, n_new, start);

        let mut written = vec![false; cache.len()];
        let mut i = 0;
        for (b, &s) in start.iter().enumerate() {
            for t in 0..n_new {
                for h in 0..layout.n_kv_heads {
                    for d in 0..layout.head_dim {
                        let x = new[i];
                        i += 1;
                        let at = layout.offset(b, h, s + t, d);
                        let bits = load(dtype, &cache, at);
                        let ctx = format!("{dtype} b={b} t={t} h={h} d={d} x={x:e} ({:#010x})", x.to_bits());
                        assert_eq!(bits, encode(dtype, x), "{ctx}");
                        let (got, want) = (decode(dtype, bits), round(dtype, x));
                        assert!(got == want || (got.is_nan() && want.is_nan()), "{ctx}: {got} vs {want}");
                        written[at * size..(at + 1) * size].fill(true);
                    }
                }
            }
        }
        assert_eq!(i, new.len());
        for (j, (&byte, &w)) in cache.iter().zip(&written).enumerate() {
            if !w {
                assert_eq!(byte, CANARY, "{dtype}: unwritten byte {j} changed");
            }
        }
    }

    fn random_new(rng: &mut Rng, layout: &CacheLayout, n_new: usize) -> Vec<f32> {
        (0..layout.n_seqs * n_new * layout.n_kv_heads * layout.head_dim).map(|_| rng.f32()).collect()
    }

    #[test]
    fn written_elements_have_encoded_bits_and_rounded_values() {
        let mut rng = Rng(1);
        let layout = CacheLayout::head_major(2, 3, 8, 5, 0);
        for dtype in Dtype::ALL {
            for _ in 0..20 {
                let new = random_new(&mut rng, &layout, 3);
                append_and_check(dtype, &layout, &new, 3, &[2, 5], 0);
            }
        }
    }

    #[test]
    fn unwritten_bytes_keep_the_canary() {
        // Ragged starts; some positions of every sequence stay unwritten, and the buffer has
        // slack past the layout's last element.
        let mut rng = Rng(2);
        let layout = CacheLayout::head_major(3, 2, 6, 4, 0);
        for dtype in Dtype::ALL {
            let new = random_new(&mut rng, &layout, 2);
            append_and_check(dtype, &layout, &new, 2, &[0, 3, 1], 13);
        }
    }

    #[test]
    fn padded_and_token_major_layouts() {
        let mut rng = Rng(3);
        for layout in [
            CacheLayout::head_major(2, 3, 5, 4, 3),
            CacheLayout::token_major(2, 3, 5, 4, 0),
            CacheLayout::token_major(2, 3, 5, 4, 5),
        ] {
            for dtype in Dtype::ALL {
                let new = random_new(&mut rng, &layout, 2);
                append_and_check(dtype, &layout, &new, 2, &[1, 3], 0);
            }
        }
    }

    #[test]
    fn same_logical_contents_in_every_layout() {
        // The layout only moves elements: reading back by (seq, head, pos, d) gives the same bits.
        let mut rng = Rng(4);
        let layouts = [
            CacheLayout::head_major(2, 2, 4, 3, 0),
            CacheLayout::head_major(2, 2, 4, 3, 2),
            CacheLayout::token_major(2, 2, 4, 3, 1),
        ];
        let new = random_new(&mut rng, &layouts[0], 2);
        for dtype in Dtype::ALL {
            let logical: Vec<Vec<u32>> = layouts
                .iter()
                .map(|layout| {
                    let mut cache = vec![0u8; layout.min_elements() * dtype.size()];
                    kv_append(dtype, &mut cache, layout, &new, 2, &[2, 0]);
                    let mut bits = Vec::new();
                    for (b, s) in [(0, 2), (1, 0)] {
                        for t in 0..2 {
                            for h in 0..2 {
                                for d in 0..3 {
                                    bits.push(load(dtype, &cache, layout.offset(b, h, s + t, d)));
                                }
                            }
                        }
                    }
                    bits
                })
                .collect();
            assert_eq!(logical[0], logical[1], "{dtype}");
            assert_eq!(logical[0], logical[2], "{dtype}");
        }
    }

    #[test]
    fn nan_inf_and_subnormal_inputs() {
        let inputs = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN: becomes the canonical quiet NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
            65520.0,                     // rounds to +Inf in f16
            2f32.powi(-24),              // smallest f16 subnormal
            -5.0 * 2f32.powi(-26),       // 1.25 f16 subnormal ulps: rounds to −2^−24
            2f32.powi(-25),              // tie between 0 and 2^−24: to even (0)
            f32::from_bits(1),           // smallest f32 subnormal
            f32::from_bits(0x0040_8000), // f32 subnormal, bf16 tie: to even
            -0.0,
        ];
        let layout = CacheLayout::token_major(1, 3, 4, 4, 1);
        for dtype in Dtype::ALL {
            append_and_check(dtype, &layout, &inputs, 1, &[2], 0);
        }
        let stored = |dtype: Dtype| {
            let mut cache = vec![CANARY; layout.min_elements() * dtype.size()];
            kv_append(dtype, &mut cache, &layout, &inputs, 1, &[2]);
            (0..12).map(|i| load(dtype, &cache, layout.offset(0, i / 4, 2, i % 4))).collect::<Vec<u32>>()
        };
        assert_eq!(
            stored(Dtype::F16),
            [0x7e00, 0xfe00, 0x7e00, 0x7c00, 0xfc00, 0x7c00, 0x0001, 0x8001, 0x0000, 0x0000, 0x0000, 0x8000]
        );
        assert_eq!(
            stored(Dtype::Bf16),
            [0x7fc0, 0xffc0, 0x7fc0, 0x7f80, 0xff80, 0x4780, 0x3380, 0xb3a0, 0x3300, 0x0000, 0x0040, 0x8000]
        );
        // f32 keeps every bit, NaN payloads included.
        assert_eq!(stored(Dtype::F32), inputs.map(f32::to_bits));
    }

    #[test]
    fn writing_at_the_last_position_of_capacity() {
        let mut rng = Rng(5);
        let layout = CacheLayout::token_major(2, 2, 7, 3, 2);
        for dtype in Dtype::ALL {
            // One token at the very end, then a block ending exactly at capacity.
            let one = random_new(&mut rng, &layout, 1);
            append_and_check(dtype, &layout, &one, 1, &[6, 6], 0);
            let four = random_new(&mut rng, &layout, 4);
            append_and_check(dtype, &layout, &four, 4, &[3, 0], 0);
        }
    }

    #[test]
    fn zero_new_tokens_write_nothing() {
        let layout = CacheLayout::head_major(2, 1, 3, 2, 0);
        for dtype in Dtype::ALL {
            let mut cache = vec![CANARY; layout.min_elements() * dtype.size()];
            kv_append(dtype, &mut cache, &layout, &[], 0, &[3, 0]);
            assert!(cache.iter().all(|&b| b == CANARY));
        }
    }

    #[test]
    fn bytes_are_little_endian() {
        let layout = CacheLayout::head_major(1, 1, 2, 1, 0);
        let mut cache = vec![0u8; 8];
        kv_append(Dtype::F32, &mut cache, &layout, &[1.0], 1, &[1]);
        assert_eq!(cache, [0, 0, 0, 0, 0x00, 0x00, 0x80, 0x3f]);
        let mut cache = vec![0u8; 4];
        kv_append(Dtype::F16, &mut cache, &layout, &[1.0], 1, &[0]);
        assert_eq!(cache, [0x00, 0x3c, 0, 0]);
    }

    #[test]
    #[should_panic(expected = "exceeds the cache capacity")]
    fn panics_past_capacity() {
        let layout = CacheLayout::head_major(1, 1, 4, 1, 0);
        kv_append(Dtype::F16, &mut [0u8; 8], &layout, &[0.0; 2], 2, &[3]);
    }

    #[test]
    #[should_panic(expected = "exceeds the cache capacity")]
    fn panics_when_start_plus_n_new_overflows() {
        let layout = CacheLayout::head_major(1, 1, 4, 1, 0);
        kv_append(Dtype::F16, &mut [0u8; 8], &layout, &[0.0; 2], 2, &[usize::MAX]);
    }

    #[test]
    #[should_panic(expected = "new must be")]
    fn panics_on_wrong_new_length() {
        let layout = CacheLayout::head_major(1, 2, 4, 2, 0);
        kv_append(Dtype::F32, &mut [0u8; 64], &layout, &[0.0; 3], 1, &[0]);
    }

    #[test]
    #[should_panic(expected = "layout needs")]
    fn panics_on_short_cache() {
        let layout = CacheLayout::token_major(1, 2, 4, 2, 1);
        kv_append(Dtype::Bf16, &mut [0u8; 20], &layout, &[0.0; 4], 1, &[0]);
    }

    #[test]
    #[should_panic(expected = "same place")]
    fn panics_on_overlapping_layout() {
        let mut layout = CacheLayout::head_major(1, 1, 4, 4, 0);
        layout.stride_pos = 2;
        kv_append(Dtype::F32, &mut [0u8; 64], &layout, &[0.0; 4], 1, &[0]);
    }

    /// Appends into a canary-filled q8_0 cache and checks every byte: each written row is its
    /// blocks quantized by `q8_0::quantize_block`, every other byte still the canary.
    fn append_q8_0_and_check(layout: &CacheLayout, new: &[f32], n_new: usize, start: &[usize]) {
        let mut cache = vec![CANARY; Dtype::Q8_0.cache_bytes(layout.min_elements()) + 7];
        kv_append(Dtype::Q8_0, &mut cache, layout, new, n_new, start);
        let mut written = vec![false; cache.len()];
        let mut rows = new.chunks_exact(layout.head_dim);
        for (b, &s) in start.iter().enumerate() {
            for t in 0..n_new {
                for h in 0..layout.n_kv_heads {
                    let row = rows.next().unwrap();
                    for (j, x) in row.chunks_exact(QK8_0).enumerate() {
                        let at = layout.offset(b, h, s + t, j * QK8_0) / QK8_0 * Q8_0_BLOCK_BYTES;
                        let want = q8_0::quantize_block(x.try_into().unwrap()).unwrap();
                        assert_eq!(&cache[at..at + Q8_0_BLOCK_BYTES], &want, "b={b} t={t} h={h} block {j}");
                        written[at..at + Q8_0_BLOCK_BYTES].fill(true);
                    }
                }
            }
        }
        for (j, (&byte, &w)) in cache.iter().zip(&written).enumerate() {
            assert!(w || byte == CANARY, "q8_0: unwritten byte {j} changed");
        }
    }

    #[test]
    fn q8_0_rows_become_blocks_and_other_bytes_stay() {
        let mut rng = Rng(6);
        for layout in [
            CacheLayout::head_major(2, 3, 5, 64, 0),
            CacheLayout::token_major(2, 2, 4, 32, 32),
            CacheLayout::head_major(1, 2, 3, 96, 32),
        ] {
            let new: Vec<f32> = (0..layout.n_seqs * 2 * layout.n_kv_heads * layout.head_dim)
                .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 3.0)
                .collect();
            let start: Vec<usize> = (0..layout.n_seqs).map(|b| b % (layout.capacity - 1)).collect();
            append_q8_0_and_check(&layout, &new, 2, &start);
        }
    }

    #[test]
    fn q8_0_cache_dequantizes_in_element_order() {
        let layout = CacheLayout::token_major(1, 2, 2, 32, 0);
        let new: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let mut cache = vec![0u8; Dtype::Q8_0.cache_bytes(layout.min_elements())];
        kv_append(Dtype::Q8_0, &mut cache, &layout, &new, 1, &[1]);
        let values = q8_0::dequantize_cache(&cache, layout.min_elements());
        assert_eq!(values.len(), 128);
        for (i, &x) in new.iter().enumerate() {
            let (h, d) = (i / 32, i % 32);
            let block = q8_0::quantize_block(new[h * 32..][..32].try_into().unwrap()).unwrap();
            assert_eq!(values[layout.offset(0, h, 1, d)], q8_0::dequantize_block(&block)[d], "x = {x}");
        }
        assert!(values[..64].iter().all(|&v| v == 0.0));
    }

    #[test]
    #[should_panic(expected = "undefined in ggml")]
    fn q8_0_panics_on_a_non_finite_input() {
        let layout = CacheLayout::head_major(1, 1, 2, 32, 0);
        let mut new = [1.0f32; 32];
        new[5] = f32::NAN;
        kv_append(Dtype::Q8_0, &mut [0u8; 68], &layout, &new, 1, &[0]);
    }

    #[test]
    #[should_panic(expected = "stride_pos = 40 is not a multiple of 32")]
    fn q8_0_panics_on_a_partial_block_stride() {
        let layout = CacheLayout::head_major(1, 1, 2, 32, 8);
        kv_append(Dtype::Q8_0, &mut [0u8; 256], &layout, &[0.0; 32], 1, &[0]);
    }
}
