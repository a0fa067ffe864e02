//! Kernels: one module per kernel family, each the only place that knows its shader's bindings,
//! push-constant layout and specialization constants.
//!
//! Each kernel has typed parameters with a host-side `validate` that checks every bound the shader
//! relies on (divisibility, ranges, capacity, 32-bit index range, device limits and features), so
//! bad input is an error naming the parameter, never an out-of-bounds access. Shaders guard their
//! bounds too, as a second line.
//!
//! Paged caches ([`Paging`]): the layout describes the page pool and a u32 block table per sequence
//! lists its pages. The kernels check the table's size on the host; its contents are the caller's
//! to check ([`attention::AttentionParams::validate_block_table_writes`],
//! [`kv_append::AppendParams::validate_block_table_writes`]), and the shaders treat an entry past
//! the table or a page outside the pool as a row of zeros, never read or written.

pub mod attention;
pub mod kv_append;
pub mod layers;
#[cfg(test)]
mod paged_tests;
#[cfg(test)]
mod q8_0_tests;
#[cfg(test)]
mod test_support;

pub use vkdecode_reference::{CacheLayout, Dtype};

use std::collections::HashMap;

use crate::gpu::{DeviceInfo, GpuError};

/// A parameter a kernel cannot take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("parameter `{name}`: {problem}")]
pub struct ParamError {
    pub name: &'static str,
    pub problem: String,
}

/// Why a kernel could not be recorded or run.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub(crate) fn invalid(name: &'static str, problem: impl Into<String>) -> ParamError {
    ParamError { name, problem: problem.into() }
}

/// Paged KV: the cache `layout` describes the page pool, one page per "sequence" of the layout
/// (layout.n_seqs = pages in the pool, layout.capacity = page_size, layout.stride_seq = the page stride),
/// and a block table of `pages_per_seq` u32 page ids per sequence maps position p of sequence b to
/// page table[b][p / page_size], slot p % page_size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub pages_per_seq: usize,
}

/// Page sizes the kernels take: multiples of 8 in this range (`vkdecode_reference::PagedLayout`'s).
pub const MIN_PAGE_SIZE: usize = 8;
pub const MAX_PAGE_SIZE: usize = 256;

/// Positions one sequence can hold: the layout's capacity, or with paging its pages' positions.
pub(crate) fn seq_capacity(layout: &CacheLayout, paging: Option<Paging>) -> usize {
    paging.map_or(layout.capacity, |p| p.pages_per_seq * layout.capacity)
}

/// Head dims the kernels take: multiples of 8 up to 256 (covers 64..256 in steps of 16, 80/96/112,
/// and the odd ones such as 40 and 72).
pub const MAX_HEAD_DIM: usize = 256;

pub(crate) fn check_head_dim(head_dim: usize) -> Result<(), ParamError> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(invalid("head_dim", format!("{head_dim} is not a multiple of 8 in 8..={MAX_HEAD_DIM}")));
    }
    Ok(())
}

/// Checks a cache layout against the problem and the device: matching shape, no two elements
/// sharing memory, element indices within 32 bits and the buffer within the device's range. With
/// paging the layout is the page pool (its own page count) and the block tables must fit too.
pub(crate) fn check_layout(
    layout: &CacheLayout,
    n_seqs: usize,
    paging: Option<Paging>,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: Dtype,
    device: &DeviceInfo,
) -> Result<(), ParamError> {
    if let Some(paging) = paging {
        check_paging(layout, n_seqs, paging, device)?;
    }
    let seqs_match = paging.is_some() || layout.n_seqs == n_seqs;
    if !seqs_match || layout.n_kv_heads != n_kv_heads || layout.head_dim != head_dim {
        return Err(invalid(
            "layout",
            format!(
                "shape (seqs {}, kv heads {}, head_dim {}) does not match the problem ({n_seqs}, {n_kv_heads}, {head_dim})",
                layout.n_seqs, layout.n_kv_heads, layout.head_dim
            ),
        ));
    }
    if layout.capacity == 0 {
        return Err(invalid("layout.capacity", "must be at least 1"));
    }
    if layout.overlaps() {
        return Err(invalid(
            "layout",
            format!(
                "strides (seq {}, head {}, pos {}, dim 1) make distinct elements overlap",
                layout.stride_seq, layout.stride_head, layout.stride_pos
            ),
        ));
    }
    let elements = layout.min_elements();
    if elements > u32::MAX as usize {
        return Err(invalid("layout", format!("{elements} elements exceed 32-bit indexing")));
    }
    if dtype == Dtype::Q8_0 {
        check_q8_0_geometry(layout)?;
    }
    let bytes = dtype.cache_bytes(elements) as u64;
    if bytes > device.max_storage_buffer_range {
        return Err(invalid(
            "layout",
            format!(
                "a {bytes}-byte cache exceeds the device's maxStorageBufferRange of {}",
                device.max_storage_buffer_range
            ),
        ));
    }
    Ok(())
}

/// q8_0 caches hold whole 32-element blocks: head_dim and every stride (so any pad) multiples of
/// 32, so element e is byte (e / 32)·34 + 2 + e % 32 of its block (the page stride is a stride too).
fn check_q8_0_geometry(layout: &CacheLayout) -> Result<(), ParamError> {
    let axes: [(&'static str, usize); 4] = [
        ("head_dim", layout.head_dim),
        ("layout.stride_pos", layout.stride_pos),
        ("layout.stride_head", layout.stride_head),
        ("layout.stride_seq", layout.stride_seq),
    ];
    match axes.into_iter().find(|&(_, v)| !v.is_multiple_of(Q8_0_BLOCK)) {
        Some((name, v)) => {
            Err(invalid(name, format!("{v} is not a multiple of {Q8_0_BLOCK}: q8_0 caches hold whole blocks")))
        }
        None => Ok(()),
    }
}

/// Elements per q8_0 block.
pub const Q8_0_BLOCK: usize = vkdecode_reference::q8_0::QK8_0;

/// The bounds a paged layout adds: a page size the shaders split positions by, at least one page
/// in the pool and per sequence, positions within `i32` (the shaders' signed query position) and
/// block tables within 32-bit indexing and the device's buffer range.
fn check_paging(layout: &CacheLayout, n_seqs: usize, paging: Paging, device: &DeviceInfo) -> Result<(), ParamError> {
    let page_size = layout.capacity;
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) || !page_size.is_multiple_of(8) {
        return Err(invalid(
            "layout.capacity",
            format!("page_size {page_size} is not a multiple of 8 in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"),
        ));
    }
    if layout.n_seqs == 0 {
        return Err(invalid("layout.n_seqs", "a page pool needs at least 1 page"));
    }
    let pages = paging.pages_per_seq;
    if pages == 0 || pages.checked_mul(page_size).is_none_or(|c| c > i32::MAX as usize) {
        return Err(invalid(
            "pages_per_seq",
            format!("{pages} pages of {page_size} positions is not in 1..={} positions", i32::MAX),
        ));
    }
    let entries = n_seqs.saturating_mul(pages);
    if entries > u32::MAX as usize || (entries as u64).saturating_mul(4) > device.max_storage_buffer_range {
        return Err(invalid(
            "block_tables",
            format!("{n_seqs} tables of {pages} entries exceed 32-bit indexing or the device's buffer range"),
        ));
    }
    Ok(())
}

/// Checks block tables (host copy, u32 `[n_seqs][pages_per_seq]`): the length, every page id in
/// the pool of `n_pages`, and no page twice in one table (two positions in one slot).
pub(crate) fn check_block_tables(
    tables: &[u32],
    n_seqs: usize,
    paging: Option<Paging>,
    n_pages: usize,
) -> Result<(), ParamError> {
    let Some(Paging { pages_per_seq }) = paging else {
        if tables.is_empty() {
            return Ok(());
        }
        return Err(invalid("block_tables", format!("{} entries given to a call that is not paged", tables.len())));
    };
    if tables.len() != n_seqs * pages_per_seq {
        return Err(invalid(
            "block_tables",
            format!("{} entries, expected {n_seqs} sequences × {pages_per_seq} pages", tables.len()),
        ));
    }
    // Where each page was last seen, by sequence, so a repeat within one table is found in one pass.
    let mut seen: Vec<Option<(usize, usize)>> = vec![None; n_pages];
    for (b, table) in tables.chunks_exact(pages_per_seq.max(1)).enumerate() {
        for (i, &page) in table.iter().enumerate() {
            let Some(last) = seen.get_mut(page as usize) else {
                return Err(invalid(
                    "block_tables",
                    format!("sequence {b}, entry {i}: page {page} is outside the pool of {n_pages} pages"),
                ));
            };
            if let Some((b0, i0)) = *last
                && b0 == b
            {
                return Err(invalid(
                    "block_tables",
                    format!(
                        "sequence {b}, entry {i}: page {page} repeats entry {i0}; a page may appear once per table"
                    ),
                ));
            }
            *last = Some((b, i));
        }
    }
    Ok(())
}

/// Checks that no sequence writes into a page another sequence lists: that write would change what
/// the other reads (and in the fused kernel race with its reads). `writes[b]` is the range of
/// positions sequence b writes; the tables have passed [`check_block_tables`].
pub(crate) fn check_page_writes(
    tables: &[u32],
    paging: Paging,
    page_size: usize,
    writes: impl Iterator<Item = std::ops::Range<usize>>,
) -> Result<(), ParamError> {
    let pages_per_seq = paging.pages_per_seq;
    let table = |b: usize| &tables[b * pages_per_seq..][..pages_per_seq];
    let n_seqs = tables.len() / pages_per_seq.max(1);
    // Which sequences list each page: none, one (its index), or several.
    let mut listed: HashMap<u32, Option<usize>> = HashMap::new();
    for b in 0..n_seqs {
        for &page in table(b) {
            listed.entry(page).and_modify(|by| *by = None).or_insert(Some(b));
        }
    }
    for (b, range) in writes.enumerate().take(n_seqs) {
        if range.is_empty() {
            continue;
        }
        let last = ((range.end - 1) / page_size).min(pages_per_seq.saturating_sub(1));
        for i in range.start / page_size..=last {
            let page = table(b)[i];
            if listed.get(&page) == Some(&Some(b)) {
                continue;
            }
            let (other, j) = (0..n_seqs)
                .filter(|&o| o != b)
                .find_map(|o| table(o).iter().position(|&x| x == page).map(|j| (o, j)))
                .unwrap_or((b, i));
            return Err(invalid(
                "block_tables",
                format!(
                    "sequence {b}, entry {i}: page {page} is written (positions {}..{}), and sequence {other} also \
                     lists it (entry {j}); a page written in a call must belong to one sequence",
                    range.start.max(i * page_size),
                    range.end.min((i + 1) * page_size)
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_dtype(dtype: Dtype, device: &DeviceInfo) -> Result<(), ParamError> {
    if dtype != Dtype::F32 && !device.storage_buffer_16bit {
        return Err(invalid(
            "dtype",
            format!("{dtype} caches need storageBuffer16BitAccess, which `{}` lacks", device.name),
        ));
    }
    Ok(())
}

pub(crate) fn check_buffer(name: &'static str, have: u64, need: u64) -> Result<(), ParamError> {
    if have < need {
        return Err(invalid(name, format!("buffer holds {have} bytes, {need} needed")));
    }
    Ok(())
}

/// Little-endian bytes of 32-bit words: push constants, index and length buffers.
pub(crate) fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A 1-D grid of `groups` workgroups folded into 2-D when it exceeds the device's x limit;
/// shaders rebuild the linear index from `gl_WorkGroupID.y * gx + gl_WorkGroupID.x`.
pub(crate) fn grid_2d(groups: u64, max_x: u64) -> (u64, u64) {
    if groups <= max_x { (groups, 1) } else { (max_x, groups.div_ceil(max_x)) }
}

/// A deliberately broken kernel variant, named `<kernel>.<mutant>` (e.g. `attention.gqa_modulo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutant {
    Attention(attention::AttentionMutant),
    Append(kv_append::AppendMutant),
}

impl Mutant {
    /// Every mutant of every kernel.
    pub fn all() -> Vec<Mutant> {
        let a = attention::AttentionMutant::ALL.into_iter().map(Mutant::Attention);
        a.chain(kv_append::AppendMutant::ALL.into_iter().map(Mutant::Append)).collect()
    }

    pub fn name(self) -> String {
        match self {
            Mutant::Attention(m) => format!("attention.{}", m.name()),
            Mutant::Append(m) => format!("kv_append.{}", m.name()),
        }
    }

    /// Parses `<kernel>.<mutant>`; the error lists the valid names.
    pub fn parse(name: &str) -> Result<Mutant, String> {
        Mutant::all().into_iter().find(|m| m.name() == name).ok_or_else(|| {
            format!(
                "unknown mutant `{name}`; known: {}",
                Mutant::all().iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn attention(self) -> Option<attention::AttentionMutant> {
        match self {
            Mutant::Attention(m) => Some(m),
            Mutant::Append(_) => None,
        }
    }

    pub fn append(self) -> Option<kv_append::AppendMutant> {
        match self {
            Mutant::Append(m) => Some(m),
            Mutant::Attention(_) => None,
        }
    }
}
