//! ggml's decode flash-attention figures from ANCHORS.md ("Throughput anchor measured here"):
//! NVIDIA H100 80GB HBM3, driver 580.159.04, Vulkan 1.4.312, ggml-org/ggml d99724f2,
//! `test-backend-ops perf -o FLASH_ATTN_EXT`, one query row, batch 1, f16 K/V, mask on.
//!
//! They are figures of that device only: on any other device the column is context, not a target.
//! Keep this table in step with ANCHORS.md; the best figure per shape is the one to beat.

/// One row of the anchor table.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct GgmlAnchor {
    pub head_dim: usize,
    pub n_kv_heads: usize,
    /// Query heads per kv head.
    pub gqa: usize,
    pub kv: usize,
    /// µs/call with ggml's coopmat2 path (the default build).
    pub coopmat2_us: f64,
    /// µs/call with coopmat2 disabled (its KHR_coopmat path), where measured.
    pub coopmat1_us: Option<f64>,
}

impl GgmlAnchor {
    /// The best ggml figure for the shape.
    pub fn best_us(&self) -> f64 {
        self.coopmat1_us.map_or(self.coopmat2_us, |c1| c1.min(self.coopmat2_us))
    }

    pub fn n_q_heads(&self) -> usize {
        self.n_kv_heads * self.gqa
    }
}

/// The device the anchors were measured on.
pub const ANCHOR_DEVICE: &str = "NVIDIA H100 80GB HBM3";

const fn row(head_dim: usize, n_kv_heads: usize, gqa: usize, kv: usize, coopmat2_us: f64) -> GgmlAnchor {
    GgmlAnchor { head_dim, n_kv_heads, gqa, kv, coopmat2_us, coopmat1_us: None }
}

/// Every row of the ANCHORS.md throughput table, in its order.
pub const GGML_FLASH_ATTN: [GgmlAnchor; 8] = [
    GgmlAnchor { coopmat1_us: Some(17.70), ..row(128, 8, 4, 4096, 17.10) },
    GgmlAnchor { coopmat1_us: Some(26.78), ..row(128, 8, 4, 8192, 29.41) },
    GgmlAnchor { coopmat1_us: Some(49.04), ..row(128, 8, 4, 16384, 54.48) },
    row(128, 8, 1, 4096, 13.92),
    row(128, 8, 1, 16384, 37.43),
    row(64, 8, 4, 16384, 43.59),
    row(64, 8, 8, 7680, 21.48),
    GgmlAnchor { coopmat1_us: Some(70.22), ..row(256, 2, 16, 20000, 54.94) },
];

/// The anchor for a decode shape (one query, batch 1, f16), if the table has one.
pub fn ggml_anchor(n_q_heads: usize, n_kv_heads: usize, head_dim: usize, kv: usize) -> Option<&'static GgmlAnchor> {
    GGML_FLASH_ATTN
        .iter()
        .find(|a| a.n_kv_heads == n_kv_heads && a.n_q_heads() == n_q_heads && a.head_dim == head_dim && a.kv == kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_figure_is_the_smaller_of_both_paths() {
        let a = ggml_anchor(32, 8, 128, 8192).unwrap();
        assert_eq!(a.best_us(), 26.78);
        assert_eq!(ggml_anchor(8, 8, 128, 4096).unwrap().best_us(), 13.92);
        assert!(ggml_anchor(32, 8, 128, 2048).is_none());
    }

    #[test]
    fn effective_bandwidth_matches_the_table() {
        // ANCHORS.md: 128/8/GQA4 kv 4096 at 17.10 µs is 981 GB/s (bytes = 2·Hkv·D·2 B·kv).
        let a = &GGML_FLASH_ATTN[0];
        let bytes = (2 * a.n_kv_heads * a.head_dim * 2 * a.kv) as f64;
        assert_eq!((bytes / (a.coopmat2_us * 1e3)).round(), 981.0);
    }
}
