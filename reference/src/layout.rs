//! Strided KV-cache layout shared by the reference and the kernels.
//!
//! A cache holds `n_seqs` sequences of `n_kv_heads` heads of `capacity` positions of `head_dim`
//! elements. Element (seq, head, pos, d) lives at `seq·stride_seq + head·stride_head +
//! pos·stride_pos + d` (in elements; the dim stride is always 1). Head-major ([head][pos][dim]) and
//! token-major ([pos][head][dim]) are two choices of strides; padding is any larger stride.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayout {
    pub n_seqs: usize,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
    pub stride_seq: usize,
    pub stride_head: usize,
    pub stride_pos: usize,
}

impl CacheLayout {
    /// [seq][head][pos][dim], each position row padded by `pad` elements.
    pub fn head_major(n_seqs: usize, n_kv_heads: usize, capacity: usize, head_dim: usize, pad: usize) -> Self {
        let stride_pos = head_dim + pad;
        let stride_head = capacity * stride_pos;
        CacheLayout {
            n_seqs,
            n_kv_heads,
            capacity,
            head_dim,
            stride_seq: n_kv_heads * stride_head,
            stride_head,
            stride_pos,
        }
    }

    /// [seq][pos][head][dim], each head row padded by `pad` elements.
    pub fn token_major(n_seqs: usize, n_kv_heads: usize, capacity: usize, head_dim: usize, pad: usize) -> Self {
        let stride_head = head_dim + pad;
        let stride_pos = n_kv_heads * stride_head;
        CacheLayout {
            n_seqs,
            n_kv_heads,
            capacity,
            head_dim,
            stride_seq: capacity * stride_pos,
            stride_head,
            stride_pos,
        }
    }

    /// Element index of (seq, head, pos, d).
    #[inline]
    pub fn offset(&self, seq: usize, head: usize, pos: usize, d: usize) -> usize {
        seq * self.stride_seq + head * self.stride_head + pos * self.stride_pos + d
    }

    /// Number of elements a buffer must hold (the largest offset plus one; 0 if empty).
    pub fn min_elements(&self) -> usize {
        if self.n_seqs == 0 || self.n_kv_heads == 0 || self.capacity == 0 || self.head_dim == 0 {
            return 0;
        }
        self.offset(self.n_seqs - 1, self.n_kv_heads - 1, self.capacity - 1, self.head_dim - 1) + 1
    }

    /// Whether two distinct (seq, head, pos, d) can map to the same element.
    pub fn overlaps(&self) -> bool {
        // Sort the non-degenerate axes by stride; each stride must exceed the extent of the
        // axes below it, i.e. the layout is an injective mixed-radix numbering.
        let mut axes: Vec<(usize, usize)> = [
            (self.stride_seq, self.n_seqs),
            (self.stride_head, self.n_kv_heads),
            (self.stride_pos, self.capacity),
            (1, self.head_dim),
        ]
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .collect();
        axes.sort_unstable();
        let mut extent = 0usize; // max offset reachable by the axes seen so far
        for (stride, n) in axes {
            if stride <= extent {
                return true;
            }
            extent += stride * (n - 1);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_layouts_do_not_overlap() {
        assert!(!CacheLayout::head_major(3, 4, 17, 64, 0).overlaps());
        assert!(!CacheLayout::token_major(3, 4, 17, 64, 8).overlaps());
        let mut bad = CacheLayout::head_major(1, 2, 4, 64, 0);
        bad.stride_pos = 32;
        assert!(bad.overlaps());
    }

    #[test]
    fn min_elements_is_last_offset_plus_one() {
        let l = CacheLayout::token_major(2, 3, 5, 16, 4);
        assert_eq!(l.min_elements(), l.offset(1, 2, 4, 15) + 1);
        assert_eq!(l.min_elements(), 2 * 5 * 3 * 20 - 4);
    }
}
