//! What an implementation under test declares it supports, and the two questions asked of it:
//! does it admit a case ([`Capabilities::admits`]; if not, the case is *unsupported*, a counted
//! outcome, never a failure), and what is the nearest case it does admit ([`Capabilities::fit`],
//! which generators apply as a `prop_map` so they draw inside the capabilities and shrinking
//! still works).
//!
//! The same struct is the `[capabilities]` table of a manifest and of `--caps` files, so every
//! field has a serde default that admits what vkdecode's own kernels admit, except `paged` and
//! the `q8_0` dtype: block tables and q8_0 blocks have no place in the manifest and case-folder
//! formats yet.

use serde::{Deserialize, Serialize};

use crate::cases::model::{AppendCase, AttentionCase, Case, LayoutKind, Paged};
use crate::cases::tolerance::Precision;
use crate::kernels::attention::{MAX_GQA_RATIO, MAX_QUERIES};
use crate::kernels::{Dtype, MAX_HEAD_DIM};

/// A kernel family a case exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    Attention,
    KvAppend,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Attention => "attention",
            KernelKind::KvAppend => "kv_append",
        }
    }

    pub fn of(case: &Case) -> KernelKind {
        match case {
            Case::Attention(_) => KernelKind::Attention,
            Case::KvAppend(_) => KernelKind::KvAppend,
        }
    }
}

/// Optional attention features a kernel may support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionOption {
    /// Sliding window (`window`).
    Window,
    /// Logit softcap (`softcap`).
    Softcap,
    /// Attention sinks (`sinks`).
    Sinks,
    /// Fused append + attend (`fused`).
    Fused,
    /// A caller-chosen split-K chunk (`split_chunk`); without it the field is ignored by `fit`.
    SplitChunk,
}

impl AttentionOption {
    pub const ALL: [AttentionOption; 5] = [
        AttentionOption::Window,
        AttentionOption::Softcap,
        AttentionOption::Sinks,
        AttentionOption::Fused,
        AttentionOption::SplitChunk,
    ];
}

/// What an implementation does with cache slots it must not use (positions at or past a
/// sequence's length, row padding): whether the harness may fill them with anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotContract {
    /// Never read: NaN, Inf and random bits there must not change the output (vkdecode's rule).
    #[default]
    Poison,
    /// Read, then masked (kernels that load whole tiles and mask after q·k): unused slots hold
    /// finite values only, but large ones, so a kernel that ignores the mask still fails.
    Finite,
}

/// Head dims an implementation takes: multiples of `multiple_of` in `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadDims {
    pub multiple_of: usize,
    pub min: usize,
    pub max: usize,
}

impl HeadDims {
    pub fn admits(&self, d: usize) -> bool {
        d >= self.min && d <= self.max && self.multiple_of > 0 && d.is_multiple_of(self.multiple_of)
    }

    /// The admitted head dim nearest `d` (rounding up, or down at the top).
    pub fn fit(&self, d: usize) -> usize {
        let m = self.multiple_of.max(1);
        let lo = self.min.div_ceil(m) * m;
        let hi = self.max / m * m;
        (d.max(lo).div_ceil(m) * m).min(hi)
    }
}

impl Default for HeadDims {
    fn default() -> Self {
        HeadDims { multiple_of: 8, min: 8, max: MAX_HEAD_DIM }
    }
}

fn all_kernels() -> Vec<KernelKind> {
    vec![KernelKind::Attention, KernelKind::KvAppend]
}
fn all_dtypes() -> Vec<Dtype> {
    Dtype::ALL.to_vec()
}
fn all_layouts() -> Vec<LayoutKind> {
    vec![LayoutKind::HeadMajor, LayoutKind::TokenMajor]
}
fn all_options() -> Vec<AttentionOption> {
    AttentionOption::ALL.to_vec()
}
fn max_gqa_ratio() -> usize {
    MAX_GQA_RATIO
}
fn max_queries() -> usize {
    MAX_QUERIES
}
fn unbounded() -> usize {
    usize::MAX
}
fn one() -> usize {
    1
}

/// What an implementation supports. Defaults admit everything vkdecode's own kernels do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Kernel families it implements.
    #[serde(default = "all_kernels")]
    pub kernels: Vec<KernelKind>,
    /// Cache element types.
    #[serde(default = "all_dtypes")]
    pub dtypes: Vec<Dtype>,
    #[serde(default)]
    pub head_dims: HeadDims,
    /// Query heads per kv head.
    #[serde(default = "max_gqa_ratio")]
    pub max_gqa_ratio: usize,
    /// Query tokens per sequence.
    #[serde(default = "max_queries")]
    pub max_queries: usize,
    /// Sequences per call.
    #[serde(default = "unbounded")]
    pub max_seqs: usize,
    /// Cache positions per sequence.
    #[serde(default = "unbounded")]
    pub max_capacity: usize,
    #[serde(default = "all_layouts")]
    pub layouts: Vec<LayoutKind>,
    /// Every cache stride (position, head, sequence; in elements) is a multiple of this.
    #[serde(default = "one")]
    pub stride_align: usize,
    #[serde(default = "all_options")]
    pub options: Vec<AttentionOption>,
    /// Where the kernel rounds; the attention element bound is derived from it.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub unread_slots: SlotContract,
    /// Paged KV caches (pools of pages through block tables).
    #[serde(default)]
    pub paged: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            kernels: all_kernels(),
            dtypes: all_dtypes(),
            head_dims: HeadDims::default(),
            max_gqa_ratio: MAX_GQA_RATIO,
            max_queries: MAX_QUERIES,
            max_seqs: usize::MAX,
            max_capacity: usize::MAX,
            layouts: all_layouts(),
            stride_align: 1,
            options: all_options(),
            precision: Precision::default(),
            unread_slots: SlotContract::default(),
            paged: false,
        }
    }
}

/// Why a case is outside an implementation's capabilities.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported: {0}")]
pub struct Unsupported(pub String);

fn unsupported(reason: impl Into<String>) -> Result<(), Unsupported> {
    Err(Unsupported(reason.into()))
}

/// The first element of `options` if `x` is not among them, chosen by `x`'s position in `all` so
/// neighbouring draws map to different supported values.
fn map_into<T: Copy + PartialEq>(x: T, options: &[T], all: &[T]) -> T {
    if options.is_empty() || options.contains(&x) {
        return x;
    }
    let i = all.iter().position(|&a| a == x).unwrap_or(0);
    options[i % options.len()]
}

impl Capabilities {
    /// What vkdecode's own kernels support: everything the defaults admit, paged caches and
    /// q8_0 caches.
    pub fn builtin() -> Capabilities {
        let mut dtypes = all_dtypes();
        dtypes.push(Dtype::Q8_0);
        Capabilities { paged: true, dtypes, ..Capabilities::default() }
    }

    pub fn has(&self, option: AttentionOption) -> bool {
        self.options.contains(&option)
    }

    /// Checks everything the capabilities constrain; the error says which and why.
    pub fn admits(&self, case: &Case) -> Result<(), Unsupported> {
        let kind = KernelKind::of(case);
        if !self.kernels.contains(&kind) {
            return unsupported(format!("kernel {} (capability `kernels`)", kind.name()));
        }
        match case {
            Case::Attention(c) => self.admits_attention(c),
            Case::KvAppend(c) => self.admits_append(c),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admits_cache(
        &self,
        dtype: Dtype,
        head_dim: usize,
        n_seqs: usize,
        capacity: usize,
        layout: LayoutKind,
        pad: usize,
        paged: Option<&Paged>,
    ) -> Result<(), Unsupported> {
        if paged.is_some() && !self.paged {
            return unsupported("a paged cache (capability `paged`)");
        }
        if !self.dtypes.contains(&dtype) {
            return unsupported(format!("dtype {dtype} (capability `dtypes`)"));
        }
        if !self.head_dims.admits(head_dim) {
            let h = self.head_dims;
            return unsupported(format!(
                "head_dim {head_dim} (capability `head_dims`: multiples of {} in {}..={})",
                h.multiple_of, h.min, h.max
            ));
        }
        if n_seqs > self.max_seqs {
            return unsupported(format!("{n_seqs} sequences (capability `max_seqs` {})", self.max_seqs));
        }
        if capacity > self.max_capacity {
            return unsupported(format!("capacity {capacity} (capability `max_capacity` {})", self.max_capacity));
        }
        if !self.layouts.contains(&layout) {
            return unsupported(format!("layout {} (capability `layouts`)", layout.name()));
        }
        // Every stride of both layouts is a multiple of the padded row (head_dim + pad).
        let row = head_dim + pad;
        if self.stride_align > 1 && !row.is_multiple_of(self.stride_align) {
            return unsupported(format!(
                "cache row of {row} elements (head_dim {head_dim} + pad {pad}) is not a multiple of {} (capability `stride_align`)",
                self.stride_align
            ));
        }
        Ok(())
    }

    fn admits_attention(&self, c: &AttentionCase) -> Result<(), Unsupported> {
        self.admits_cache(c.dtype, c.head_dim, c.seq_lens.len(), c.capacity, c.layout, c.pad, c.paged.as_ref())?;
        let ratio = c.n_q_heads / c.n_kv_heads.max(1);
        if ratio > self.max_gqa_ratio {
            return unsupported(format!("GQA ratio {ratio} (capability `max_gqa_ratio` {})", self.max_gqa_ratio));
        }
        if c.n_queries > self.max_queries {
            return unsupported(format!("{} queries (capability `max_queries` {})", c.n_queries, self.max_queries));
        }
        let used = [
            (c.window.is_some(), AttentionOption::Window, "window"),
            (c.softcap.is_some(), AttentionOption::Softcap, "softcap"),
            (c.sinks.is_some(), AttentionOption::Sinks, "sinks"),
            (c.fused, AttentionOption::Fused, "fused"),
            (c.split_chunk.is_some(), AttentionOption::SplitChunk, "split_chunk"),
        ];
        if let Some((_, _, name)) = used.iter().find(|(on, option, _)| *on && !self.has(*option)) {
            return unsupported(format!("option {name} (capability `options`)"));
        }
        Ok(())
    }

    fn admits_append(&self, c: &AppendCase) -> Result<(), Unsupported> {
        self.admits_cache(c.dtype, c.head_dim, c.starts.len(), c.capacity, c.layout, c.pad, c.paged.as_ref())
    }

    /// The nearest attention case these capabilities admit: a deterministic map, so a strategy
    /// followed by `fit` draws only supported cases and still shrinks. Valid in, valid out.
    pub fn fit_attention(&self, mut c: AttentionCase) -> AttentionCase {
        c.dtype = map_into(c.dtype, &self.dtypes, &Dtype::ALL);
        c.layout = map_into(c.layout, &self.layouts, &all_layouts());
        let ratio = (c.n_q_heads / c.n_kv_heads.max(1)).clamp(1, self.max_gqa_ratio.max(1));
        c.n_q_heads = c.n_kv_heads * ratio;
        c.head_dim = self.head_dims.fit(c.head_dim);
        c.pad = self.fit_pad(c.head_dim, c.pad);
        c.n_queries = c.n_queries.clamp(1, self.max_queries.max(1));
        c.seq_lens.truncate(self.max_seqs.max(1));
        c.capacity = c.capacity.min(self.max_capacity.max(1));
        for len in &mut c.seq_lens {
            *len = (*len).min(c.capacity);
        }
        if let Some(peak) = &mut c.data.peak {
            peak.position = peak.position.min(c.capacity - 1);
        }
        if !self.has(AttentionOption::Window) {
            c.window = None;
        }
        if !self.has(AttentionOption::Softcap) {
            c.softcap = None;
        }
        if !self.has(AttentionOption::Sinks) {
            c.sinks = None;
        }
        if !self.has(AttentionOption::Fused) {
            c.fused = false;
        }
        if !self.has(AttentionOption::SplitChunk) {
            c.split_chunk = None;
        }
        if !self.paged {
            c.paged = None;
        }
        if let Some(paged) = &mut c.paged {
            paged.shared_pages = paged.shared_pages.min(c.capacity.div_ceil(paged.page_size));
        }
        // The poison the implementation will get, stated in the case (a recorded failure says it).
        c.data.poison = c.data.poison.under(self.unread_slots);
        if c.fused {
            // A fused step appends n_queries tokens, so every sequence holds at least that many.
            c.n_queries = c.n_queries.min(c.capacity);
            let nq = c.n_queries;
            c.seq_lens.iter_mut().for_each(|l| *l = (*l).max(nq));
        }
        c
    }

    /// The nearest append case these capabilities admit (see [`Capabilities::fit_attention`]).
    pub fn fit_append(&self, mut c: AppendCase) -> AppendCase {
        c.dtype = map_into(c.dtype, &self.dtypes, &Dtype::ALL);
        c.layout = map_into(c.layout, &self.layouts, &all_layouts());
        c.head_dim = self.head_dims.fit(c.head_dim);
        c.pad = self.fit_pad(c.head_dim, c.pad);
        c.starts.truncate(self.max_seqs.max(1));
        let capacity = c.capacity.min(self.max_capacity.max(1)).max(c.n_new.min(self.max_capacity.max(1)));
        c.n_new = c.n_new.min(capacity);
        c.capacity = capacity;
        for s in &mut c.starts {
            *s = (*s).min(capacity - c.n_new);
        }
        if !self.paged {
            c.paged = None;
        }
        c
    }

    /// `pad` rounded up so that head_dim + pad is a multiple of the stride alignment.
    fn fit_pad(&self, head_dim: usize, pad: usize) -> usize {
        let a = self.stride_align.max(1);
        (head_dim + pad).div_ceil(a) * a - head_dim
    }

    /// Checks the declaration itself (a manifest or caps file can say anything).
    pub fn validate(&self) -> Result<(), String> {
        let h = self.head_dims;
        if h.multiple_of == 0 || h.min == 0 || h.fit(h.min) < h.min || !h.admits(h.fit(h.min)) {
            return Err(format!("head_dims: no head dim is a multiple of {} in {}..={}", h.multiple_of, h.min, h.max));
        }
        for (name, empty) in [
            ("kernels", self.kernels.is_empty()),
            ("dtypes", self.dtypes.is_empty()),
            ("layouts", self.layouts.is_empty()),
        ] {
            if empty {
                return Err(format!("{name}: needs at least one entry"));
            }
        }
        for (name, value) in [
            ("max_gqa_ratio", self.max_gqa_ratio),
            ("max_queries", self.max_queries),
            ("max_seqs", self.max_seqs),
            ("max_capacity", self.max_capacity),
            ("stride_align", self.stride_align),
        ] {
            if value == 0 {
                return Err(format!("{name}: must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::strategy::{append_case, attention_case};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    fn narrow() -> Capabilities {
        Capabilities {
            dtypes: vec![Dtype::F16],
            head_dims: HeadDims { multiple_of: 16, min: 64, max: 128 },
            max_gqa_ratio: 4,
            max_queries: 2,
            max_seqs: 2,
            max_capacity: 100,
            layouts: vec![LayoutKind::TokenMajor],
            stride_align: 8,
            options: vec![AttentionOption::Sinks],
            ..Capabilities::default()
        }
    }

    #[test]
    fn fitted_draws_are_valid_and_admitted() {
        let caps = narrow();
        let mut runner = TestRunner::new(Config { cases: 300, ..Config::default() });
        runner
            .run(&attention_case(), |c| {
                let fitted = caps.fit_attention(c);
                prop_assert!(fitted.params().is_ok(), "{:?}", fitted.params());
                prop_assert_eq!(caps.admits(&Case::Attention(fitted)), Ok(()));
                Ok(())
            })
            .unwrap();
        runner
            .run(&append_case(), |c| {
                let fitted = caps.fit_append(c);
                prop_assert!(fitted.params().is_ok(), "{:?}", fitted.params());
                prop_assert_eq!(caps.admits(&Case::KvAppend(fitted)), Ok(()));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn builtin_admits_every_drawn_case_unchanged() {
        let caps = Capabilities::builtin();
        let mut runner = TestRunner::new(Config { cases: 200, ..Config::default() });
        runner
            .run(&attention_case(), |c| {
                prop_assert_eq!(caps.admits(&Case::Attention(c.clone())), Ok(()));
                prop_assert_eq!(caps.fit_attention(c.clone()), c);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn unsupported_names_the_capability() {
        let caps = narrow();
        let mut runner = TestRunner::deterministic();
        let case = attention_case().new_tree(&mut runner).unwrap().current();
        let mut c = caps.fit_attention(case);
        c.window = Some(3);
        let reason = caps.admits(&Case::Attention(c.clone())).unwrap_err().0;
        assert!(reason.contains("window") && reason.contains("options"), "{reason}");
        c.window = None;
        c.pad += 1;
        let reason = caps.admits(&Case::Attention(c)).unwrap_err().0;
        assert!(reason.contains("stride_align"), "{reason}");
    }

    #[test]
    fn head_dims_fit_rounds_into_range() {
        let h = HeadDims { multiple_of: 32, min: 64, max: 256 };
        assert_eq!(h.fit(8), 64);
        assert_eq!(h.fit(80), 96);
        assert_eq!(h.fit(256), 256);
        assert_eq!(h.fit(300), 256);
    }
}
