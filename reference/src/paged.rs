//! Paged KV cache, as serving engines keep it: a pool of fixed-size pages (one pool for K, one
//! for V) and a block table per sequence that lists the pages holding its positions, in order.
//!
//! # Contract
//!
//! Position `pos` of sequence b lives in page `block_tables[b][pos / page_size]`, slot
//! `pos % page_size`; element (page, head, slot, d) is pool element `page·stride_page +
//! head·stride_head + slot·stride_pos + d` (the dim stride is 1). A page is `[Hkv][page_size][D +
//! pad]` ([`PagedLayout::head_major`]) or `[page_size][Hkv][D + pad]`
//! ([`PagedLayout::token_major`]). A sequence's capacity is its table length times `page_size`.
//!
//! Pages may be listed in any order and shared between sequences (a common prefix is stored
//! once). Paged attention is the existing oracle on the gathered contiguous cache
//! ([`PagedLayout::gather`], then [`decode_attention_with`]): paging moves elements, never values.
//!
//! # Invariants
//!
//! - [`PagedLayout::validate`] rejects what makes the mapping ill-defined: a page id out of the
//!   pool, a page listed twice in one table (two positions of one sequence in one slot), strides
//!   that map two (page, head, slot, d) to one element, a page size outside 8..=256 or not a
//!   multiple of 8.
//! - [`kv_append_paged`] changes only the addressed elements, through the tables; every other
//!   byte of the pool, shared pages included, is left untouched.
//! - Panics only on violated preconditions, as [`kv_append`] does: an invalid layout, mismatched
//!   lengths, a write past a sequence's capacity, a short pool, two sequences writing one slot.

#[cfg(doc)]
use crate::{attention::decode_attention_with, kv_append::kv_append};
use crate::{dtype::Dtype, layout::CacheLayout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Geometry of a paged K or V pool plus the block table of every sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedLayout {
    /// B: number of sequences, one block table each.
    pub n_seqs: usize,
    /// Hkv: key/value heads per page.
    pub n_kv_heads: usize,
    /// D: elements per head.
    pub head_dim: usize,
    /// Positions per page: a multiple of 8 in 8..=256.
    pub page_size: usize,
    /// Pages in the pool; page ids run `0..n_pages`.
    pub n_pages: usize,
    /// Elements from one page to the next.
    pub stride_page: usize,
    /// Elements from one head to the next within a page.
    pub stride_head: usize,
    /// Elements from one slot (position) to the next within a page.
    pub stride_pos: usize,
    /// `block_tables[b][i]`: the page holding positions `i·page_size..(i+1)·page_size` of
    /// sequence b.
    pub block_tables: Vec<Vec<u32>>,
}

impl PagedLayout {
    /// Pages of `[Hkv][page_size][D + pad]`; one sequence per block table.
    pub fn head_major(
        n_kv_heads: usize,
        head_dim: usize,
        pad: usize,
        page_size: usize,
        n_pages: usize,
        block_tables: Vec<Vec<u32>>,
    ) -> Self {
        let stride_pos = head_dim + pad;
        let stride_head = page_size * stride_pos;
        PagedLayout {
            n_seqs: block_tables.len(),
            n_kv_heads,
            head_dim,
            page_size,
            n_pages,
            stride_page: n_kv_heads * stride_head,
            stride_head,
            stride_pos,
            block_tables,
        }
    }

    /// Pages of `[page_size][Hkv][D + pad]`; one sequence per block table.
    pub fn token_major(
        n_kv_heads: usize,
        head_dim: usize,
        pad: usize,
        page_size: usize,
        n_pages: usize,
        block_tables: Vec<Vec<u32>>,
    ) -> Self {
        let stride_head = head_dim + pad;
        let stride_pos = n_kv_heads * stride_head;
        PagedLayout {
            n_seqs: block_tables.len(),
            n_kv_heads,
            head_dim,
            page_size,
            n_pages,
            stride_page: page_size * stride_pos,
            stride_head,
            stride_pos,
            block_tables,
        }
    }

    /// Checks that the tables and strides define the mapping: a supported page size, one table
    /// per sequence, page ids in the pool and none twice in a table, distinct (page, head, slot,
    /// d) on distinct elements. The error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        // The page sizes the kernels are specified for: whole 8-position tiles, at most 256.
        if !(8..=256).contains(&self.page_size) || !self.page_size.is_multiple_of(8) {
            return Err(format!("page_size {} is not a multiple of 8 in 8..=256", self.page_size));
        }
        if self.block_tables.len() != self.n_seqs {
            return Err(format!(
                "block_tables has {} tables, expected n_seqs = {}",
                self.block_tables.len(),
                self.n_seqs
            ));
        }
        for (b, table) in self.block_tables.iter().enumerate() {
            self.validate_table(b, table)?;
        }
        if self.pool().overlaps() {
            let (p, h, s) = (self.stride_page, self.stride_head, self.stride_pos);
            return Err(format!(
                "strides (stride_page, stride_head, stride_pos) = ({p}, {h}, {s}) map two (page, head, slot, d) \
                 to the same element (n_pages {}, n_kv_heads {}, page_size {}, head_dim {})",
                self.n_pages, self.n_kv_heads, self.page_size, self.head_dim
            ));
        }
        Ok(())
    }

    /// Every page id in the pool, and none twice (sharing is between sequences, not within one).
    fn validate_table(&self, b: usize, table: &[u32]) -> Result<(), String> {
        let mut first_seen = HashMap::new();
        for (i, &page) in table.iter().enumerate() {
            if page as usize >= self.n_pages {
                return Err(format!("block_tables[{b}][{i}] = {page} is not below n_pages {}", self.n_pages));
            }
            if let Some(j) = first_seen.insert(page, i) {
                return Err(format!(
                    "block_tables[{b}][{i}] = {page} repeats block_tables[{b}][{j}]: two positions of sequence {b} \
                     would share a slot"
                ));
            }
        }
        Ok(())
    }

    /// Positions sequence `seq` can hold: its table length times `page_size`.
    pub fn capacity(&self, seq: usize) -> usize {
        self.block_tables[seq].len() * self.page_size
    }

    /// Pool element index of (seq, head, pos, d), through the block table (`pos < capacity(seq)`).
    #[inline]
    pub fn offset(&self, seq: usize, head: usize, pos: usize, d: usize) -> usize {
        let page = self.block_tables[seq][pos / self.page_size] as usize;
        self.pool().offset(page, head, pos % self.page_size, d)
    }

    /// Number of elements a pool must hold: the last element of the last page, plus one (0 if
    /// empty), as [`CacheLayout::min_elements`] counts.
    pub fn min_elements(&self) -> usize {
        self.pool().min_elements()
    }

    /// The contiguous head-major cache `[B][Hkv][capacity][D]` holding each sequence's values, as
    /// [`decode_attention_with`] takes it, with its layout. Positions at or past a sequence's own
    /// capacity hold NaN (attention must never read them); `capacity` may also cut tables short.
    ///
    /// `pool` holds values (already decoded from the cache dtype), indexed by [`Self::offset`].
    pub fn gather(&self, pool: &[f32], capacity: usize) -> (Vec<f32>, CacheLayout) {
        self.assert_valid();
        assert!(
            pool.len() >= self.min_elements(),
            "pool holds {} elements, layout needs {}",
            pool.len(),
            self.min_elements()
        );
        let layout = CacheLayout::head_major(self.n_seqs, self.n_kv_heads, capacity, self.head_dim, 0);
        let mut cache = vec![f32::NAN; layout.min_elements()];
        for b in 0..self.n_seqs {
            for h in 0..self.n_kv_heads {
                for pos in 0..capacity.min(self.capacity(b)) {
                    for d in 0..self.head_dim {
                        cache[layout.offset(b, h, pos, d)] = pool[self.offset(b, h, pos, d)];
                    }
                }
            }
        }
        (cache, layout)
    }

    /// The pool seen as a cache of `n_pages` "sequences" of `page_size` positions, so the
    /// contiguous layout's offset, size and overlap rules apply to pages unchanged (the form the
    /// kernels take a pool in).
    pub fn pool(&self) -> CacheLayout {
        CacheLayout {
            n_seqs: self.n_pages,
            n_kv_heads: self.n_kv_heads,
            capacity: self.page_size,
            head_dim: self.head_dim,
            stride_seq: self.stride_page,
            stride_head: self.stride_head,
            stride_pos: self.stride_pos,
        }
    }

    fn assert_valid(&self) {
        if let Err(e) = self.validate() {
            panic!("invalid paged layout: {e}");
        }
    }
}

/// [`kv_append`] through block tables: writes `n_new` new tokens of every sequence into a paged
/// pool, converting f32 → `dtype` exactly as [`kv_append`] does ([`dtype::encode`]).
///
/// `new` is `[B][n_new][Hkv][D]` contiguous; token t of sequence b goes to position `start[b] + t`,
/// i.e. pool element `layout.offset(b, h, start[b] + t, d)`. Only those elements change; every
/// other byte stays, including the rest of pages shared with other sequences. Two sequences
/// writing one slot of a shared page is the caller's bug (the result would depend on order) and
/// panics, as do the preconditions of [`kv_append`].
pub fn kv_append_paged(
    dtype: Dtype,
    pool: &mut [u8],
    layout: &PagedLayout,
    new: &[f32],
    n_new: usize,
    start: &[usize],
) {
    layout.assert_valid();
    let (n_seqs, n_kv_heads, head_dim) = (layout.n_seqs, layout.n_kv_heads, layout.head_dim);
    assert_eq!(start.len(), n_seqs, "start must have one entry per sequence");
    assert_eq!(new.len(), n_seqs * n_new * n_kv_heads * head_dim, "new must be [B][n_new][Hkv][D] contiguous");
    for (b, &s) in start.iter().enumerate() {
        // checked_add: a wrapped sum would pass the bound and write to the wrong place.
        assert!(
            s.checked_add(n_new).is_some_and(|end| end <= layout.capacity(b)),
            "start[{b}] + n_new = {s} + {n_new} exceeds the capacity {} of sequence {b}",
            layout.capacity(b)
        );
    }
    crate::kv_append::assert_q8_0_geometry(dtype, &layout.pool());
    let needed = dtype.cache_bytes(layout.min_elements());
    assert!(pool.len() >= needed, "pool holds {} bytes, layout needs {needed}", pool.len());
    assert_no_slot_written_twice(layout, n_new, start);

    let dims = (n_kv_heads, head_dim);
    crate::kv_append::write_tokens(dtype, pool, new, n_new, start, dims, |b, h, pos, d| layout.offset(b, h, pos, d));
}

/// Panics if two sequences' new tokens land in one (page, slot): with shared pages the tables
/// alone cannot rule it out, and the stored value would depend on write order.
fn assert_no_slot_written_twice(layout: &PagedLayout, n_new: usize, start: &[usize]) {
    let mut writer: HashMap<(u32, usize), (usize, usize)> = HashMap::new();
    for (b, &s) in start.iter().enumerate() {
        for pos in s..s + n_new {
            let page = layout.block_tables[b][pos / layout.page_size];
            let slot = pos % layout.page_size;
            if let Some((b0, pos0)) = writer.insert((page, slot), (b, pos)) {
                panic!(
                    "sequences {b0} (position {pos0}) and {b} (position {pos}) both write slot {slot} of shared page \
                     {page}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{self, decode, load};
    use crate::kv_append::kv_append;

    /// xorshift64: a tiny deterministic PRNG so the tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform f32 in [-4, 4).
        fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 4.0
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }

        /// A permutation of `0..n` (Fisher–Yates).
        fn permutation(&mut self, n: u32) -> Vec<u32> {
            let mut p: Vec<u32> = (0..n).collect();
            for i in (1..p.len()).rev() {
                p.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
            }
            p
        }
    }

    /// Identity tables: page i of sequence b is `b·pages_per_seq + i`.
    fn identity_tables(n_seqs: usize, pages_per_seq: usize) -> Vec<Vec<u32>> {
        (0..n_seqs).map(|b| (0..pages_per_seq).map(|i| (b * pages_per_seq + i) as u32).collect()).collect()
    }

    /// Distinct values, so a read from the wrong element shows.
    fn numbered_pool(layout: &PagedLayout) -> Vec<f32> {
        (0..layout.min_elements()).map(|i| i as f32).collect()
    }

    /// `gather` for raw dtype elements: the contiguous typed cache a plain `kv_append` would
    /// see, positions no table covers left as 0xff bytes.
    fn gather_bytes(dtype: Dtype, layout: &PagedLayout, pool: &[u8], capacity: usize) -> (Vec<u8>, CacheLayout) {
        let contiguous = CacheLayout::head_major(layout.n_seqs, layout.n_kv_heads, capacity, layout.head_dim, 0);
        let mut cache = vec![0xff; contiguous.min_elements() * dtype.size()];
        for b in 0..layout.n_seqs {
            for h in 0..layout.n_kv_heads {
                for pos in 0..capacity.min(layout.capacity(b)) {
                    for d in 0..layout.head_dim {
                        let bits = load(dtype, pool, layout.offset(b, h, pos, d));
                        dtype::store(dtype, &mut cache, contiguous.offset(b, h, pos, d), bits);
                    }
                }
            }
        }
        (cache, contiguous)
    }

    fn values(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
        (0..bytes.len() / dtype.size()).map(|i| decode(dtype, load(dtype, bytes, i))).collect()
    }

    #[test]
    fn token_major_identity_tables_are_the_contiguous_token_major_layout() {
        // A token-major page is a run of whole positions, so consecutive pages are the contiguous
        // [B][capacity][Hkv][D + pad] layout for any number of pages per sequence.
        let (b, hkv, d, pad, ps, pages) = (3, 2, 5, 3, 8, 3);
        let paged = PagedLayout::token_major(hkv, d, pad, ps, b * pages, identity_tables(b, pages));
        paged.validate().unwrap();
        let contiguous = CacheLayout::token_major(b, hkv, pages * ps, d, pad);
        assert_eq!(paged.min_elements(), contiguous.min_elements());
        assert_same_offsets(&paged, &contiguous);
    }

    #[test]
    fn head_major_identity_tables_with_one_page_per_sequence_are_the_contiguous_layout() {
        // A head-major page holds every head's slice of its positions, so only one page per
        // sequence lines up with the contiguous [B][Hkv][capacity][D + pad] layout; with more
        // the pool is [B][page][Hkv][page_size][D + pad], and gather still recovers the values.
        let (b, hkv, d, pad, ps) = (3, 2, 5, 2, 16);
        let paged = PagedLayout::head_major(hkv, d, pad, ps, b, identity_tables(b, 1));
        paged.validate().unwrap();
        let contiguous = CacheLayout::head_major(b, hkv, ps, d, pad);
        assert_eq!(paged.min_elements(), contiguous.min_elements());
        assert_same_offsets(&paged, &contiguous);
    }

    fn assert_same_offsets(paged: &PagedLayout, contiguous: &CacheLayout) {
        let capacity = contiguous.capacity;
        for b in 0..paged.n_seqs {
            assert_eq!(paged.capacity(b), capacity);
            for h in 0..paged.n_kv_heads {
                for pos in 0..capacity {
                    for d in 0..paged.head_dim {
                        assert_eq!(paged.offset(b, h, pos, d), contiguous.offset(b, h, pos, d), "{b} {h} {pos} {d}");
                    }
                }
            }
        }
        // So gathering the contiguous buffer as a pool reads every logical value in place.
        let pool = numbered_pool(paged);
        let (cache, layout) = paged.gather(&pool, capacity);
        for b in 0..paged.n_seqs {
            for h in 0..paged.n_kv_heads {
                for pos in 0..capacity {
                    for d in 0..paged.head_dim {
                        assert_eq!(cache[layout.offset(b, h, pos, d)], pool[contiguous.offset(b, h, pos, d)]);
                    }
                }
            }
        }
    }

    #[test]
    fn reversed_table_reads_pages_back_to_front() {
        for paged in [
            PagedLayout::head_major(2, 3, 1, 8, 4, vec![vec![3, 2, 1, 0]]),
            PagedLayout::token_major(2, 3, 0, 8, 4, vec![vec![3, 2, 1, 0]]),
        ] {
            paged.validate().unwrap();
            let pool = numbered_pool(&paged);
            let (cache, layout) = paged.gather(&pool, 32);
            for h in 0..2 {
                for pos in 0..32 {
                    for d in 0..3 {
                        let (page, slot) = (3 - pos / 8, pos % 8);
                        let want = page * paged.stride_page + h * paged.stride_head + slot * paged.stride_pos + d;
                        assert_eq!(paged.offset(0, h, pos, d), want);
                        assert_eq!(cache[layout.offset(0, h, pos, d)], want as f32);
                    }
                }
            }
        }
    }

    #[test]
    fn a_page_shared_by_every_sequence_reads_the_same_for_each() {
        // Page 2 holds the common prefix (positions 0..8) of all three sequences; each has a
        // private page after it, and sequence 1 a second one.
        let tables = vec![vec![2, 0], vec![2, 4, 1], vec![2, 3]];
        let paged = PagedLayout::token_major(2, 4, 1, 8, 5, tables);
        paged.validate().unwrap();
        let (cache, layout) = paged.gather(&numbered_pool(&paged), 24);
        let at = |b, h, pos, d| cache[layout.offset(b, h, pos, d)];
        for h in 0..2 {
            for d in 0..4 {
                for pos in 0..8 {
                    assert_eq!(at(0, h, pos, d), at(1, h, pos, d));
                    assert_eq!(at(0, h, pos, d), at(2, h, pos, d));
                }
                for pos in 8..16 {
                    assert_ne!(at(0, h, pos, d), at(1, h, pos, d));
                    assert_ne!(at(0, h, pos, d), at(2, h, pos, d));
                }
                // Past a table's end the gathered cache holds NaN.
                assert!(at(1, h, 20, d).is_finite());
                assert!((16..24).all(|pos| at(0, h, pos, d).is_nan() && at(2, h, pos, d).is_nan()));
            }
        }
    }

    #[test]
    fn gather_capacity_may_cut_tables_short() {
        let paged = PagedLayout::head_major(1, 2, 0, 8, 3, vec![vec![1, 2], vec![0]]);
        let pool = numbered_pool(&paged);
        let (cache, layout) = paged.gather(&pool, 5);
        assert_eq!(layout, CacheLayout::head_major(2, 1, 5, 2, 0));
        assert_eq!(cache[layout.offset(0, 0, 4, 1)], pool[paged.offset(0, 0, 4, 1)]);
        assert_eq!(cache[layout.offset(1, 0, 4, 1)], pool[paged.offset(1, 0, 4, 1)]);
    }

    /// Appends into a canary/random pool and checks both views: the pool's unwritten bytes are
    /// unchanged, and gathering it equals appending into the gathered (contiguous) cache.
    fn append_and_check(rng: &mut Rng, dtype: Dtype, paged: &PagedLayout, n_new: usize, start: &[usize]) {
        paged.validate().unwrap();
        let size = dtype.size();
        let before = rng.bytes(paged.min_elements() * size + 7); // slack past the pool
        let new: Vec<f32> = (0..paged.n_seqs * n_new * paged.n_kv_heads * paged.head_dim).map(|_| rng.f32()).collect();
        let mut pool = before.clone();
        kv_append_paged(dtype, &mut pool, paged, &new, n_new, start);

        let mut written = vec![false; pool.len()];
        for (b, &s) in start.iter().enumerate() {
            for pos in s..s + n_new {
                for h in 0..paged.n_kv_heads {
                    for d in 0..paged.head_dim {
                        let at = paged.offset(b, h, pos, d);
                        written[at * size..(at + 1) * size].fill(true);
                    }
                }
            }
        }
        for (j, ((&x, &y), &w)) in pool.iter().zip(&before).zip(&written).enumerate() {
            if !w {
                assert_eq!(x, y, "{dtype}: unwritten byte {j} changed");
            }
        }

        let capacity = (0..paged.n_seqs).map(|b| paged.capacity(b)).max().unwrap_or(0);
        let (mut contiguous, layout) = gather_bytes(dtype, paged, &before, capacity);
        kv_append(dtype, &mut contiguous, &layout, &new, n_new, start);
        let (got, _) = paged.gather(&values(dtype, &pool), capacity);
        let want = values(dtype, &contiguous);
        for b in 0..paged.n_seqs {
            for h in 0..paged.n_kv_heads {
                for pos in 0..paged.capacity(b) {
                    for d in 0..paged.head_dim {
                        let i = layout.offset(b, h, pos, d);
                        assert_eq!(got[i].to_bits(), want[i].to_bits(), "{dtype} b={b} h={h} pos={pos} d={d}");
                    }
                }
            }
        }
    }

    #[test]
    fn append_through_tables_equals_append_into_the_gathered_cache() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for dtype in Dtype::ALL {
            let pages = rng.permutation(9);
            let tables = vec![pages[..3].to_vec(), pages[3..4].to_vec(), pages[4..8].to_vec()];
            for paged in [
                PagedLayout::head_major(2, 3, 0, 8, 9, tables.clone()),
                PagedLayout::head_major(2, 3, 2, 8, 9, tables.clone()),
                PagedLayout::token_major(2, 3, 1, 8, 9, tables.clone()),
            ] {
                // Ragged starts; runs cross page boundaries and end exactly at a capacity.
                append_and_check(&mut rng, dtype, &paged, 5, &[6, 3, 27]);
                append_and_check(&mut rng, dtype, &paged, 0, &[24, 8, 0]);
            }
        }
    }

    #[test]
    fn append_leaves_a_shared_prefix_page_alone() {
        // Page 0 is the shared prefix of both sequences; they append into their own pages.
        let mut rng = Rng(99);
        for dtype in Dtype::ALL {
            let paged = PagedLayout::token_major(2, 4, 0, 16, 3, vec![vec![0, 2], vec![0, 1]]);
            append_and_check(&mut rng, dtype, &paged, 3, &[16, 20]);
        }
    }

    #[test]
    #[should_panic(expected = "both write slot 5 of shared page 0")]
    fn panics_when_two_sequences_write_one_slot_of_a_shared_page() {
        let paged = PagedLayout::head_major(1, 2, 0, 8, 3, vec![vec![0, 1], vec![0, 2]]);
        kv_append_paged(Dtype::F16, &mut [0u8; 96], &paged, &[0.0; 8], 2, &[4, 5]);
    }

    #[test]
    #[should_panic(expected = "exceeds the capacity 8 of sequence 1")]
    fn panics_past_a_sequence_capacity() {
        let paged = PagedLayout::head_major(1, 1, 0, 8, 3, vec![vec![0, 1], vec![2]]);
        kv_append_paged(Dtype::F32, &mut [0u8; 96], &paged, &[0.0; 4], 2, &[0, 7]);
    }

    #[test]
    #[should_panic(expected = "invalid paged layout: block_tables[0][0] = 3 is not below n_pages 3")]
    fn panics_on_an_invalid_layout() {
        let paged = PagedLayout::head_major(1, 1, 0, 8, 3, vec![vec![3]]);
        kv_append_paged(Dtype::F32, &mut [0u8; 96], &paged, &[0.0], 1, &[0]);
    }

    #[test]
    #[should_panic(expected = "pool holds 47 bytes, layout needs 48")]
    fn panics_on_a_short_pool() {
        let paged = PagedLayout::token_major(1, 1, 0, 8, 3, vec![vec![2]]);
        kv_append_paged(Dtype::F16, &mut [0u8; 47], &paged, &[0.0], 1, &[0]);
    }

    #[test]
    fn validate_names_the_offending_field() {
        let ok = PagedLayout::head_major(2, 4, 0, 16, 8, vec![vec![7, 0], vec![0, 3, 1]]);
        assert_eq!(ok.validate(), Ok(()));
        let err = |f: &dyn Fn(&mut PagedLayout)| {
            let mut l = ok.clone();
            f(&mut l);
            l.validate().unwrap_err()
        };
        for ps in [0, 4, 12, 264] {
            assert_eq!(err(&|l| l.page_size = ps), format!("page_size {ps} is not a multiple of 8 in 8..=256"));
        }
        assert_eq!(err(&|l| l.block_tables[1][2] = 9), "block_tables[1][2] = 9 is not below n_pages 8");
        assert_eq!(err(&|l| l.block_tables[1].push(8)), "block_tables[1][3] = 8 is not below n_pages 8");
        assert_eq!(err(&|l| l.n_seqs = 3), "block_tables has 2 tables, expected n_seqs = 3");
        assert!(err(&|l| l.block_tables[1][2] = 0).starts_with("block_tables[1][2] = 0 repeats block_tables[1][0]"));
        assert!(
            err(&|l| l.stride_pos = 2).starts_with("strides (stride_page, stride_head, stride_pos) = (128, 64, 2)")
        );
        assert!(err(&|l| l.stride_page = 64).contains("map two (page, head, slot, d) to the same element"));
        // Page sizes at the ends of the range, an empty table and an empty pool are fine.
        for ps in [8, 256] {
            assert_eq!(PagedLayout::head_major(2, 4, 0, ps, 8, ok.block_tables.clone()).validate(), Ok(()));
        }
        assert_eq!(PagedLayout::token_major(1, 1, 0, 8, 0, vec![vec![]]).validate(), Ok(()));
    }
}
