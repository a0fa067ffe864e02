//! The case model: a complete, reproducible description of one kernel test as JSON.
//!
//! A case names shapes, dtype, layout, positions and how to generate its data (a seed and value
//! distributions), never the data itself, so files stay small and any tool can regenerate the
//! inputs (`vkdecode replay --dump`). Unknown fields are rejected so a typo is an error, not a
//! silently different case. `expect: "fail"` marks a case that must fail (a known bug kept as
//! data); an unexpected pass is then a failure.

use serde::{Deserialize, Serialize};

use crate::kernels::attention::{AttentionParams, MAX_GQA_RATIO, MAX_QUERIES};
use crate::kernels::kv_append::AppendParams;
use crate::kernels::{CacheLayout, Dtype, Paging, ParamError, invalid};
use vkdecode_reference::PagedLayout;

use super::rng::Rng;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kernel", rename_all = "snake_case")]
pub enum Case {
    Attention(AttentionCase),
    KvAppend(AppendCase),
}

impl Case {
    pub fn kernel(&self) -> &'static str {
        match self {
            Case::Attention(_) => "attention",
            Case::KvAppend(_) => "kv_append",
        }
    }

    pub fn expect(&self) -> Expect {
        match self {
            Case::Attention(c) => c.expect,
            Case::KvAppend(c) => c.expect,
        }
    }

    /// The cache element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Case::Attention(c) => c.dtype,
            Case::KvAppend(c) => c.dtype,
        }
    }

    pub fn description(&self) -> &str {
        match self {
            Case::Attention(c) => &c.description,
            Case::KvAppend(c) => &c.description,
        }
    }
}

/// What running a case must give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    #[default]
    Pass,
    Fail,
}

/// Cache layout family; `pad` extra elements follow each row of `head_dim`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// [seq][kv_head][pos][dim]
    #[default]
    HeadMajor,
    /// [seq][pos][kv_head][dim]
    TokenMajor,
}

impl LayoutKind {
    pub fn name(self) -> &'static str {
        match self {
            LayoutKind::HeadMajor => "head_major",
            LayoutKind::TokenMajor => "token_major",
        }
    }
}

/// A paged KV cache, as serving engines keep one: the case's positions live in a pool of pages
/// of `page_size` positions (each page laid out as the case's `layout` and `pad` say), found
/// through one block table per sequence. Unused pages and the tail of each sequence's last page
/// hold poison like any unused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paged {
    /// Positions per page: a multiple of 8 in 8..=256.
    pub page_size: usize,
    /// How page ids are handed out along the tables.
    #[serde(default)]
    pub order: PageOrder,
    /// The first `shared_pages` pages of every sequence are the same pages (a common prefix
    /// stored once); nothing may be written into them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_pages: usize,
    /// Pages in the pool that no table lists.
    #[serde(default = "one")]
    pub spare_pages: usize,
}

/// The order of page ids along the block tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageOrder {
    /// A seeded permutation of the pool (as an allocator's free list leaves it).
    #[default]
    Shuffled,
    /// Page ids increase along each table.
    Ascending,
    /// Page ids decrease along each table.
    Reverse,
}

impl Paged {
    /// The pool and block tables of `n_seqs` sequences of `capacity` positions. Errors name the
    /// `paged` field at fault.
    #[allow(clippy::too_many_arguments)]
    pub fn layout(
        &self,
        kind: LayoutKind,
        n_seqs: usize,
        n_kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        pad: usize,
        seed: u64,
    ) -> Result<PagedLayout, ParamError> {
        let ps = self.page_size;
        if !(8..=256).contains(&ps) || !ps.is_multiple_of(8) {
            return Err(invalid("paged.page_size", format!("{ps} is not a multiple of 8 in 8..=256")));
        }
        let per_seq = capacity.div_ceil(ps);
        if self.shared_pages > per_seq {
            return Err(invalid(
                "paged.shared_pages",
                format!("{} exceeds the {per_seq} pages a sequence of capacity {capacity} has", self.shared_pages),
            ));
        }
        let own = per_seq - self.shared_pages;
        let n_pages = n_seqs
            .checked_mul(own)
            .and_then(|n| n.checked_add(self.shared_pages))
            .and_then(|n| n.checked_add(self.spare_pages))
            .filter(|&n| n <= MAX_CASE_ELEMENTS)
            .ok_or_else(|| invalid("paged.spare_pages", "the pool has too many pages"))?;
        if n_pages == 0 {
            return Err(invalid("paged.spare_pages", "the pool needs at least one page"));
        }
        // The pool's size is checked as a cache of n_pages sequences of one page each.
        layout(kind, n_pages, n_kv_heads, ps, head_dim, pad)?;
        let mut ids: Vec<u32> = (0..n_pages as u32).collect();
        match self.order {
            PageOrder::Ascending => {}
            PageOrder::Reverse => ids.reverse(),
            PageOrder::Shuffled => {
                let mut rng = Rng::stream(seed, "pages");
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
        }
        let tables = (0..n_seqs)
            .map(|b| {
                let shared = ids[..self.shared_pages].iter();
                let start = self.shared_pages + b * own;
                shared.chain(&ids[start..start + own]).copied().collect()
            })
            .collect();
        let paged = match kind {
            LayoutKind::HeadMajor => PagedLayout::head_major(n_kv_heads, head_dim, pad, ps, n_pages, tables),
            LayoutKind::TokenMajor => PagedLayout::token_major(n_kv_heads, head_dim, pad, ps, n_pages, tables),
        };
        paged.validate().map_err(|e| invalid("paged", e))?;
        Ok(paged)
    }

    /// Fewer shared pages where needed: at most a sequence's pages (capacity `capacity`), and none
    /// at or past `first_write`, the lowest position a sequence writes.
    pub fn clamp_shared(&mut self, capacity: usize, first_write: Option<usize>) {
        let limit = first_write.map_or(usize::MAX, |w| w / self.page_size);
        self.shared_pages = self.shared_pages.min(capacity.div_ceil(self.page_size)).min(limit);
    }

    /// First position past the shared pages: writes must start here.
    pub fn first_writable(&self) -> usize {
        self.shared_pages * self.page_size
    }
}

/// Head dim and row pad rounded up to whole q8_0 blocks (32 values), head dim at most 256.
fn q8_0_geometry(head_dim: usize, pad: usize) -> (usize, usize) {
    (head_dim.next_multiple_of(32).min(crate::kernels::MAX_HEAD_DIM), pad.next_multiple_of(32))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A distribution of f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    Normal {
        #[serde(default)]
        mean: f32,
        std: f32,
    },
    Uniform {
        lo: f32,
        hi: f32,
    },
}

impl Default for Dist {
    fn default() -> Self {
        Dist::Normal { mean: 0.0, std: 1.0 }
    }
}

/// What fills every cache element the kernel must not read (positions at or past a sequence's
/// length, row padding), so that a read of one shows in the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Poison {
    #[default]
    Nan,
    Inf,
    /// Random bit patterns (NaNs, Infs, huge and tiny values).
    Garbage,
    /// Zeros: no poison (for cases that want a clean cache).
    Zero,
    /// Large finite values (|x| in 32..96, random sign): what implementations with the `finite`
    /// slot contract get instead of NaN, Inf or garbage. A kernel that reads an unused slot
    /// unmasked still fails: such a key's logit dominates its row.
    Large,
}

impl Poison {
    /// The poison an implementation with `slots` gets in place of this one.
    pub fn under(self, slots: crate::implementation::SlotContract) -> Poison {
        match (slots, self) {
            (crate::implementation::SlotContract::Finite, Poison::Nan | Poison::Inf | Poison::Garbage) => Poison::Large,
            _ => self,
        }
    }
}

/// One visible position whose key is made to dominate: K = gain × the group's first query head.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peak {
    pub position: usize,
    pub gain: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionData {
    pub seed: u64,
    #[serde(default)]
    pub q: Dist,
    #[serde(default)]
    pub k: Dist,
    #[serde(default)]
    pub v: Dist,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<Peak>,
    #[serde(default)]
    pub poison: Poison,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionCase {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub dtype: Dtype,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    #[serde(default = "one")]
    pub n_queries: usize,
    /// Valid cache positions of each sequence (the batch size is its length).
    pub seq_lens: Vec<usize>,
    pub capacity: usize,
    #[serde(default)]
    pub layout: LayoutKind,
    #[serde(default)]
    pub pad: usize,
    /// A paged cache instead of a contiguous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paged: Option<Paged>,
    /// Softmax scale; default 1/sqrt(head_dim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Sliding window in positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Logit softcap c: scaled logits s become c·tanh(s/c).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
    /// Attention sinks: one logit per query head, drawn from this distribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Dist>,
    /// Fused append + attend: the last `n_queries` positions of each sequence are the step's new
    /// tokens, given as f32 inputs; their cache slots hold poison until the kernel writes them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fused: bool,
    /// Positions per split-K chunk (a multiple of 64); default: the kernel's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_chunk: Option<usize>,
    pub data: AttentionData,
    #[serde(default)]
    pub expect: Expect,
}

/// How new K/V values of an append are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendValues {
    /// Standard normal values.
    Normal,
    /// A mix built to break conversions: exact rounding ties, f16 subnormals, f32 denormals,
    /// values past the f16 range, NaN with payloads, ±Inf, ±0 and raw bit patterns.
    #[default]
    Hostile,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendData {
    pub seed: u64,
    #[serde(default)]
    pub values: AppendValues,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendCase {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub dtype: Dtype,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    #[serde(default = "one")]
    pub n_new: usize,
    /// First written position of each sequence (the batch size is its length).
    pub starts: Vec<usize>,
    pub capacity: usize,
    #[serde(default)]
    pub layout: LayoutKind,
    #[serde(default)]
    pub pad: usize,
    /// A paged cache instead of a contiguous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paged: Option<Paged>,
    pub data: AppendData,
    #[serde(default)]
    pub expect: Expect,
}

fn one() -> usize {
    1
}

/// Largest number of elements a case may describe (keeps every product in range and the host
/// memory of one case bounded).
const MAX_CASE_ELEMENTS: usize = 1 << 31;

/// The layout a case describes, with overflow checked (a case file can hold any numbers).
fn layout(
    kind: LayoutKind,
    n_seqs: usize,
    n_kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    pad: usize,
) -> Result<CacheLayout, ParamError> {
    let total = [n_seqs, n_kv_heads, capacity, head_dim.saturating_add(pad)]
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .filter(|&n| n <= MAX_CASE_ELEMENTS);
    if total.is_none() {
        return Err(invalid(
            "capacity",
            format!("the cache (seqs × kv heads × capacity × (head_dim + pad)) exceeds {MAX_CASE_ELEMENTS} elements"),
        ));
    }
    Ok(match kind {
        LayoutKind::HeadMajor => CacheLayout::head_major(n_seqs, n_kv_heads, capacity, head_dim, pad),
        LayoutKind::TokenMajor => CacheLayout::token_major(n_seqs, n_kv_heads, capacity, head_dim, pad),
    })
}

impl AttentionCase {
    /// The kernel parameters, after the checks that need no device.
    pub fn params(&self) -> Result<AttentionParams, ParamError> {
        if self.seq_lens.is_empty() {
            return Err(invalid("seq_lens", "needs at least one sequence"));
        }
        if self.n_queries == 0 || self.n_queries > MAX_QUERIES {
            return Err(invalid("n_queries", format!("{} is not in 1..={MAX_QUERIES}", self.n_queries)));
        }
        if self.n_kv_heads == 0 || self.n_q_heads == 0 || !self.n_q_heads.is_multiple_of(self.n_kv_heads) {
            return Err(invalid(
                "n_q_heads",
                format!("{} must be a positive multiple of n_kv_heads ({})", self.n_q_heads, self.n_kv_heads),
            ));
        }
        if self.n_q_heads / self.n_kv_heads > MAX_GQA_RATIO {
            return Err(invalid("n_q_heads", format!("GQA ratio exceeds {MAX_GQA_RATIO}")));
        }
        crate::kernels::check_head_dim(self.head_dim)?;
        if let Some((b, &len)) = self.seq_lens.iter().enumerate().find(|&(_, &l)| l > self.capacity) {
            return Err(invalid("seq_lens", format!("sequence {b}: length {len} exceeds capacity {}", self.capacity)));
        }
        if let Some(peak) = self.data.peak
            && peak.position >= self.capacity
        {
            return Err(invalid(
                "data.peak.position",
                format!("{} is not below capacity {}", peak.position, self.capacity),
            ));
        }
        let n_seqs = self.seq_lens.len();
        if n_seqs * self.n_queries * self.n_q_heads * self.head_dim > MAX_CASE_ELEMENTS {
            return Err(invalid("seq_lens", "Q is too large"));
        }
        let (layout, paging) = match self.paged_layout()? {
            Some(paged) => (paged.pool(), Some(Paging { pages_per_seq: paged.block_tables[0].len() })),
            None => (layout(self.layout, n_seqs, self.n_kv_heads, self.capacity, self.head_dim, self.pad)?, None),
        };
        if let (Some(paged), true) = (self.paged, self.fused)
            && let Some((b, &len)) = self
                .seq_lens
                .iter()
                .enumerate()
                .find(|&(_, &l)| l.saturating_sub(self.n_queries) < paged.first_writable())
        {
            return Err(invalid(
                "paged.shared_pages",
                format!(
                    "sequence {b} would write its new tokens (from position {}) into the shared pages (positions below {})",
                    len.saturating_sub(self.n_queries),
                    paged.first_writable()
                ),
            ));
        }
        let scale = self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt());
        if !scale.is_finite() {
            return Err(invalid("scale", "must be finite"));
        }
        if self.window == Some(0) {
            return Err(invalid("window", "must be at least 1"));
        }
        if let Some(c) = self.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("softcap", format!("{c} is not a positive finite number")));
        }
        if let Some(chunk) = self.split_chunk
            && (chunk == 0 || !chunk.is_multiple_of(crate::kernels::attention::CHUNK_TILE))
        {
            return Err(invalid("split_chunk", format!("{chunk} is not a positive multiple of 64")));
        }
        if self.fused
            && let Some((b, &len)) = self.seq_lens.iter().enumerate().find(|&(_, &l)| l < self.n_queries)
        {
            return Err(invalid(
                "seq_lens",
                format!("sequence {b}: length {len} cannot hold the {} new tokens of a fused case", self.n_queries),
            ));
        }
        Ok(AttentionParams {
            n_seqs,
            n_queries: self.n_queries,
            n_q_heads: self.n_q_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            layout,
            scale,
            split_chunk: self.split_chunk,
            window: self.window,
            softcap: self.softcap,
            sinks: self.sinks.is_some(),
            fused: self.fused,
            qk_norm_rope: None,
            paging,
        })
    }

    /// What a q8_0 cache needs of a drawn case (a no-op for other dtypes): head_dim and pad
    /// multiples of 32, no fused step, and values ggml can quantize (normal std at least 1e-30:
    /// a block's amax must stay above 127·2^-128).
    pub fn fit_q8_0(&mut self) {
        if self.dtype != Dtype::Q8_0 {
            return;
        }
        (self.head_dim, self.pad) = q8_0_geometry(self.head_dim, self.pad);
        self.fused = false;
        for dist in [&mut self.data.q, &mut self.data.k, &mut self.data.v] {
            if let Dist::Normal { std, .. } = dist {
                *std = std.max(1e-30);
            }
        }
    }

    /// The pool and block tables of a paged case (`None` for a contiguous cache).
    pub fn paged_layout(&self) -> Result<Option<PagedLayout>, ParamError> {
        let n_seqs = self.seq_lens.len();
        let (kind, hkv, cap, d, pad, seed) =
            (self.layout, self.n_kv_heads, self.capacity, self.head_dim, self.pad, self.data.seed);
        self.paged.map(|p| p.layout(kind, n_seqs, hkv, cap, d, pad, seed)).transpose()
    }
}

impl AppendCase {
    /// The kernel parameters, after the checks that need no device.
    pub fn params(&self) -> Result<AppendParams, ParamError> {
        if self.starts.is_empty() {
            return Err(invalid("starts", "needs at least one sequence"));
        }
        if self.n_new == 0 || self.n_new > self.capacity {
            return Err(invalid("n_new", format!("{} is not in 1..=capacity ({})", self.n_new, self.capacity)));
        }
        if self.n_kv_heads == 0 {
            return Err(invalid("n_kv_heads", "must be at least 1"));
        }
        crate::kernels::check_head_dim(self.head_dim)?;
        if let Some((b, &s)) =
            self.starts.iter().enumerate().find(|&(_, &s)| s.saturating_add(self.n_new) > self.capacity)
        {
            return Err(invalid(
                "starts",
                format!("sequence {b}: start {s} + n_new {} exceeds capacity {}", self.n_new, self.capacity),
            ));
        }
        let n_seqs = self.starts.len();
        let (layout, paging) = match self.paged_layout()? {
            Some(paged) => (paged.pool(), Some(Paging { pages_per_seq: paged.block_tables[0].len() })),
            None => (layout(self.layout, n_seqs, self.n_kv_heads, self.capacity, self.head_dim, self.pad)?, None),
        };
        if let Some(paged) = self.paged
            && let Some((b, &s)) = self.starts.iter().enumerate().find(|&(_, &s)| s < paged.first_writable())
        {
            return Err(invalid(
                "paged.shared_pages",
                format!(
                    "sequence {b} starts writing at position {s}, inside the shared pages (positions below {})",
                    paged.first_writable()
                ),
            ));
        }
        Ok(AppendParams {
            n_seqs,
            n_new: self.n_new,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            layout,
            paging,
        })
    }

    /// What a q8_0 cache needs of a drawn case (a no-op for other dtypes): head_dim and pad
    /// multiples of 32.
    pub fn fit_q8_0(&mut self) {
        if self.dtype == Dtype::Q8_0 {
            (self.head_dim, self.pad) = q8_0_geometry(self.head_dim, self.pad);
        }
    }

    /// The pool and block tables of a paged case (`None` for a contiguous cache).
    pub fn paged_layout(&self) -> Result<Option<PagedLayout>, ParamError> {
        let n_seqs = self.starts.len();
        let (kind, hkv, cap, d, pad, seed) =
            (self.layout, self.n_kv_heads, self.capacity, self.head_dim, self.pad, self.data.seed);
        self.paged.map(|p| p.layout(kind, n_seqs, hkv, cap, d, pad, seed)).transpose()
    }
}
