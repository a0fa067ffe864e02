//! Paged attention is the contiguous oracle on the gathered cache: appending through block
//! tables, decoding the pool and gathering it must give the attention of a contiguous cache that
//! received the same tokens, whatever the page order, page layout or prefix sharing.

use vkdecode_reference::dtype::{decode, load};
use vkdecode_reference::{
    AttentionOptions, AttentionShape, CacheLayout, Dtype, PagedLayout, decode_attention_with, kv_append,
    kv_append_paged,
};

const SHAPE: AttentionShape = AttentionShape { n_seqs: 3, n_queries: 2, n_q_heads: 4, n_kv_heads: 2, head_dim: 3 };
const PAGE: usize = 8;

/// Deterministic values that are not representable in f16/bf16.
fn value(i: usize) -> f32 {
    ((i as f32 * 0.618_034).fract() - 0.5) * 3.000_1
}

fn tokens(n_new: usize, offset: usize) -> Vec<f32> {
    (0..SHAPE.n_seqs * n_new * SHAPE.n_kv_heads * SHAPE.head_dim).map(|i| value(i + offset)).collect()
}

fn decoded(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    (0..bytes.len() / dtype.size()).map(|i| decode(dtype, load(dtype, bytes, i))).collect()
}

/// One K or V cache kept both ways: a paged pool and a contiguous head-major cache.
struct Both {
    dtype: Dtype,
    paged: PagedLayout,
    pool: Vec<u8>,
    contiguous: CacheLayout,
    cache: Vec<u8>,
}

impl Both {
    /// Zeroed caches: positions never written decode to 0.0 in both.
    fn new(dtype: Dtype, paged: PagedLayout) -> Self {
        let capacity = (0..paged.n_seqs).map(|b| paged.capacity(b)).max().unwrap();
        let contiguous = CacheLayout::head_major(paged.n_seqs, paged.n_kv_heads, capacity, paged.head_dim, 0);
        let pool = vec![0u8; paged.min_elements() * dtype.size()];
        let cache = vec![0u8; contiguous.min_elements() * dtype.size()];
        Both { dtype, paged, pool, contiguous, cache }
    }

    fn append(&mut self, new: &[f32], n_new: usize, start: &[usize]) {
        kv_append_paged(self.dtype, &mut self.pool, &self.paged, new, n_new, start);
        kv_append(self.dtype, &mut self.cache, &self.contiguous, new, n_new, start);
    }

    /// The gathered pool, which must use the same contiguous layout.
    fn gathered(&self) -> Vec<f32> {
        let (values, layout) = self.paged.gather(&decoded(self.dtype, &self.pool), self.contiguous.capacity);
        assert_eq!(layout, self.contiguous);
        values
    }
}

/// Attention over the gathered pools equals attention over the contiguous caches, bit for bit.
fn assert_same_attention(k: &Both, v: &Both, seq_lens: &[usize], options: &AttentionOptions<'_>) {
    let q: Vec<f32> =
        (0..SHAPE.n_seqs * SHAPE.n_queries * SHAPE.n_q_heads * SHAPE.head_dim).map(|i| value(i + 7)).collect();
    let layout = &k.contiguous;
    let paged = decode_attention_with(&SHAPE, &q, &k.gathered(), &v.gathered(), layout, seq_lens, 0.5, options);
    let contiguous = decode_attention_with(
        &SHAPE,
        &q,
        &decoded(k.dtype, &k.cache),
        &decoded(v.dtype, &v.cache),
        layout,
        seq_lens,
        0.5,
        options,
    );
    // Gathered positions past a table's end are NaN: finite output shows none was read.
    assert!(paged.iter().all(|x| x.is_finite()), "{}", k.dtype);
    assert_eq!(paged, contiguous, "{} {:?}", k.dtype, k.paged);
}

#[test]
fn attention_over_shuffled_pages_equals_attention_over_a_contiguous_cache() {
    // Ragged tables over a shuffled pool with a spare page; 3 new tokens that cross pages.
    let tables = vec![vec![4, 0], vec![6], vec![1, 5, 2]];
    let (n_new, start) = (3, [9, 5, 21]);
    let seq_lens: Vec<usize> = start.iter().map(|s| s + n_new).collect();
    for dtype in Dtype::ALL {
        for paged in [
            PagedLayout::head_major(2, 3, 0, PAGE, 7, tables.clone()),
            PagedLayout::token_major(2, 3, 2, PAGE, 7, tables.clone()),
        ] {
            let (mut k, mut v) = (Both::new(dtype, paged.clone()), Both::new(dtype, paged));
            k.append(&tokens(n_new, 0), n_new, &start);
            v.append(&tokens(n_new, 1000), n_new, &start);
            assert_same_attention(&k, &v, &seq_lens, &AttentionOptions::default());
            let windowed = AttentionOptions { window: Some(4), ..Default::default() };
            assert_same_attention(&k, &v, &seq_lens, &windowed);
        }
    }
}

#[test]
fn a_prefix_page_written_once_and_shared_attends_like_a_copied_prefix() {
    // Page 3 holds the 8-token prefix of every sequence; it is written once, through a
    // one-sequence table, while the contiguous cache gets a copy per sequence.
    let tables = vec![vec![3, 0], vec![3, 2], vec![3, 1]];
    for dtype in Dtype::ALL {
        let paged = PagedLayout::token_major(2, 3, 0, PAGE, 4, tables.clone());
        let (mut k, mut v) = (Both::new(dtype, paged.clone()), Both::new(dtype, paged.clone()));
        let prefix_writer = PagedLayout { n_seqs: 1, block_tables: vec![vec![3]], ..paged };
        for (cache, offset) in [(&mut k, 0), (&mut v, 500)] {
            let prefix = &tokens(PAGE, offset)[..PAGE * 2 * 3];
            kv_append_paged(dtype, &mut cache.pool, &prefix_writer, prefix, PAGE, &[0]);
            let copies = prefix.repeat(3);
            kv_append(dtype, &mut cache.cache, &cache.contiguous, &copies, PAGE, &[0, 0, 0]);
            cache.append(&tokens(4, offset + 2000), 4, &[PAGE; 3]);
        }
        assert_same_attention(&k, &v, &[12, 10, 8], &AttentionOptions::default());
    }
}
