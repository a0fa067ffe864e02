//! KV-cache append (`shaders/kv_append.comp`): writes `n_new` tokens of K and V per sequence into
//! f32/f16/bf16 caches at positions `start[b] + t`, rounding to nearest even, or into q8_0 caches
//! as ggml's `quantize_row_q8_0_ref` (one invocation per block, bit-exact). Bit-exact against
//! `vkdecode_reference::kv_append`; no byte outside the written slots changes. With paging
//! ([`super::Paging`]) the positions go through the block tables into a page pool, bit-exact against
//! `vkdecode_reference::kv_append_paged`; a table entry naming a page outside the pool is skipped.

use crate::gpu::{Buffer, Context, PipelineDesc, Recorder};
use crate::shaders;

use super::{
    CacheLayout, Dtype, KernelError, Paging, ParamError, check_block_tables, check_buffer, check_dtype, check_head_dim,
    check_layout, check_page_writes, grid_2d, invalid, seq_capacity, words,
};

const WORKGROUP: usize = 64;
const PUSH_WORDS: usize = 13;

/// Deliberately broken variants, selected by specialization constant 0; the suite must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendMutant {
    /// Writes each token one slot too far.
    SlotOffByOne = 1,
    /// Truncates instead of rounding to nearest even (16-bit caches only).
    Truncate = 2,
    /// Paged: writes each token into the next page of its table (`table[b][pos / page_size + 1]`,
    /// where that entry exists). Contiguous calls are unaffected.
    PageOffByOne = 3,
    /// q8_0: rounds `x·(1/d)` ties to even instead of away from zero. Other dtypes are unaffected.
    Q8RoundHalfEven = 4,
}

impl AppendMutant {
    pub const ALL: [AppendMutant; 4] =
        [AppendMutant::SlotOffByOne, AppendMutant::Truncate, AppendMutant::PageOffByOne, AppendMutant::Q8RoundHalfEven];
    pub fn name(self) -> &'static str {
        match self {
            AppendMutant::SlotOffByOne => "slot_off_by_one",
            AppendMutant::Truncate => "truncate",
            AppendMutant::PageOffByOne => "page_off_by_one",
            AppendMutant::Q8RoundHalfEven => "q8_round_half_even",
        }
    }
}

/// Shape of one append.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AppendParams {
    pub n_seqs: usize,
    pub n_new: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: Dtype,
    pub layout: CacheLayout,
    /// A paged cache: `layout` is the page pool and the `block_tables` buffer maps positions to
    /// pages; a sequence holds `pages_per_seq · layout.capacity` positions.
    pub paging: Option<Paging>,
}

/// The buffers of one append: new K/V as f32 `[B][n_new][Hkv][D]`, start positions as u32 `[B]`,
/// and with [`AppendParams::paging`] the block tables, u32 `[n_seqs][pages_per_seq]`.
pub struct AppendBuffers<'a> {
    pub new_k: &'a Buffer,
    pub new_v: &'a Buffer,
    pub start: &'a Buffer,
    pub k_cache: &'a Buffer,
    pub v_cache: &'a Buffer,
    pub block_tables: Option<&'a Buffer>,
}

impl AppendParams {
    /// Number of f32 values in each of new K and new V.
    pub fn new_elements(&self) -> usize {
        self.n_seqs * self.n_new * self.n_kv_heads * self.head_dim
    }

    /// Positions one sequence holds: the layout's capacity, or with paging its pages' positions.
    pub fn seq_capacity(&self) -> usize {
        seq_capacity(&self.layout, self.paging)
    }

    /// Invocations of the dispatch: one per element, or with q8_0 one per block.
    fn invocations(&self) -> usize {
        if self.dtype == Dtype::Q8_0 { self.new_elements() / super::Q8_0_BLOCK } else { self.new_elements() }
    }

    /// Checks the shape against the kernel's contract and the device.
    pub fn validate(&self, ctx: &Context) -> Result<(), ParamError> {
        let device = ctx.info();
        if self.n_seqs == 0 {
            return Err(invalid("n_seqs", "must be at least 1"));
        }
        let capacity = self.seq_capacity();
        if self.n_new == 0 || self.n_new > capacity {
            return Err(invalid("n_new", format!("{} is not in 1..=capacity ({capacity})", self.n_new)));
        }
        if self.n_kv_heads == 0 {
            return Err(invalid("n_kv_heads", "must be at least 1"));
        }
        check_head_dim(self.head_dim)?;
        check_dtype(self.dtype, device)?;
        check_layout(&self.layout, self.n_seqs, self.paging, self.n_kv_heads, self.head_dim, self.dtype, device)?;
        let total = self.new_elements();
        if total > u32::MAX as usize {
            return Err(invalid("n_new", format!("{total} new elements exceed 32-bit indexing")));
        }
        let groups = self.invocations().div_ceil(WORKGROUP);
        let [max_x, max_y, _] = device.max_workgroup_count;
        if groups > max_x as usize * max_y as usize {
            return Err(invalid("n_new", format!("{groups} workgroups exceed the device's grid")));
        }
        Ok(())
    }

    /// Checks start positions (host copy of the `start` buffer) against the capacity (with
    /// paging, a sequence's pages).
    pub fn validate_starts(&self, start: &[u32]) -> Result<(), ParamError> {
        if start.len() != self.n_seqs {
            return Err(invalid("start", format!("{} entries for {} sequences", start.len(), self.n_seqs)));
        }
        let capacity = self.seq_capacity();
        if let Some((b, &s)) = start.iter().enumerate().find(|&(_, &s)| s as usize + self.n_new > capacity) {
            return Err(invalid(
                "start",
                format!("sequence {b}: start {s} + {} new tokens exceeds capacity {capacity}", self.n_new),
            ));
        }
        Ok(())
    }

    /// Checks block tables (host copy of the `block_tables` buffer, u32 `[n_seqs][pages_per_seq]`):
    /// the length, every page id within the pool (`layout.n_seqs` pages), and no page twice in
    /// one table (two positions in one slot). Unpaged calls take an empty slice.
    pub fn validate_block_tables(&self, tables: &[u32]) -> Result<(), ParamError> {
        check_block_tables(tables, self.n_seqs, self.paging, self.layout.n_seqs)
    }

    /// [`Self::validate_block_tables`], and that no page a sequence writes (positions
    /// `start[b]..start[b] + n_new`) is listed by another sequence: the write would change what
    /// that sequence reads (and could land in a slot it writes too).
    pub fn validate_block_table_writes(&self, tables: &[u32], start: &[u32]) -> Result<(), ParamError> {
        self.validate_block_tables(tables)?;
        let Some(paging) = self.paging else { return Ok(()) };
        let writes = start.iter().map(|&s| s as usize..s as usize + self.n_new);
        check_page_writes(tables, paging, self.layout.capacity, writes)
    }
}

/// Records the append. The caller validates start positions it owns with
/// [`AppendParams::validate_starts`]; the shader drops any write past capacity regardless.
pub fn record<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    params: &AppendParams,
    bufs: AppendBuffers<'a>,
    mutant: Option<AppendMutant>,
) -> Result<(), KernelError> {
    params.validate(ctx)?;
    let new_bytes = (params.new_elements() * 4) as u64;
    let cache_bytes = params.dtype.cache_bytes(params.layout.min_elements()) as u64;
    check_buffer("new_k", bufs.new_k.size(), new_bytes)?;
    check_buffer("new_v", bufs.new_v.size(), new_bytes)?;
    check_buffer("start", bufs.start.size(), 4 * params.n_seqs as u64)?;
    check_buffer("k_cache", bufs.k_cache.size(), cache_bytes)?;
    check_buffer("v_cache", bufs.v_cache.size(), cache_bytes)?;
    // Unpaged calls bind `start` in the tables' place; the shader never reads it then.
    let block_tables = match (params.paging, bufs.block_tables) {
        (Some(paging), Some(b)) => {
            check_buffer("block_tables", b.size(), 4 * (params.n_seqs * paging.pages_per_seq) as u64)?;
            b
        }
        (Some(_), None) => {
            return Err(invalid("block_tables", "`paging` is set but no block_tables buffer was given").into());
        }
        (None, _) => bufs.start,
    };

    let shader = match params.dtype {
        Dtype::F32 => &shaders::KV_APPEND_F32,
        Dtype::F16 => &shaders::KV_APPEND_F16,
        Dtype::Bf16 => &shaders::KV_APPEND_BF16,
        Dtype::Q8_0 => &shaders::KV_APPEND_Q8_0,
    };
    let spec = [(0, mutant.map_or(0, |m| m as u32)), (1, u32::from(params.paging.is_some()))];
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader, bindings: 6, push_constant_bytes: 4 * PUSH_WORDS as u32, spec: &spec })?;
    // q8_0: one invocation per block of 32 values.
    let invocations = params.invocations();
    let groups = invocations.div_ceil(WORKGROUP) as u32;
    let max_x = ctx.info().max_workgroup_count[0];
    let (gx, gy) = grid_2d(u64::from(groups), u64::from(max_x));
    let (gx, gy) = (gx as u32, gy as u32);
    let l = &params.layout;
    // Paged: stride_seq is the page stride, capacity a sequence's, and the pool's pages follow.
    let (page_size, pages_per_seq, n_pages) =
        params.paging.map_or((0, 0, 0), |p| (l.capacity as u32, p.pages_per_seq as u32, l.n_seqs as u32));
    let push = words(&[
        params.n_seqs as u32,
        params.n_new as u32,
        params.n_kv_heads as u32,
        params.head_dim as u32,
        l.stride_seq as u32,
        l.stride_head as u32,
        l.stride_pos as u32,
        params.seq_capacity() as u32,
        invocations as u32,
        gx,
        page_size,
        pages_per_seq,
        n_pages,
    ]);
    let buffers = [bufs.new_k, bufs.new_v, bufs.start, bufs.k_cache, bufs.v_cache, block_tables];
    rec.dispatch(&pipeline, &buffers, &push, [gx, gy, 1], "kv_append")?;
    Ok(())
}
