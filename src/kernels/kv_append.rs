//! KV-cache append (`shaders/kv_append.comp`): writes `n_new` tokens of K and V per sequence into
//! f32/f16/bf16 caches at positions `start[b] + t`, rounding to nearest even. Bit-exact against
//! `vkdecode_reference::kv_append`; no byte outside the written slots changes.

use crate::gpu::{Buffer, Context, PipelineDesc, Recorder};
use crate::shaders;

use super::{
    CacheLayout, Dtype, KernelError, ParamError, check_buffer, check_dtype, check_head_dim, check_layout, grid_2d,
    invalid, words,
};

const WORKGROUP: usize = 64;
const PUSH_WORDS: usize = 10;

/// Deliberately broken variants, selected by specialization constant 0; the suite must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppendMutant {
    /// Writes each token one slot too far.
    SlotOffByOne = 1,
    /// Truncates instead of rounding to nearest even (16-bit caches only).
    Truncate = 2,
}

impl AppendMutant {
    pub const ALL: [AppendMutant; 2] = [AppendMutant::SlotOffByOne, AppendMutant::Truncate];
    pub fn name(self) -> &'static str {
        match self {
            AppendMutant::SlotOffByOne => "slot_off_by_one",
            AppendMutant::Truncate => "truncate",
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
}

/// The buffers of one append: new K/V as f32 `[B][n_new][Hkv][D]`, start positions as u32 `[B]`.
pub struct AppendBuffers<'a> {
    pub new_k: &'a Buffer,
    pub new_v: &'a Buffer,
    pub start: &'a Buffer,
    pub k_cache: &'a Buffer,
    pub v_cache: &'a Buffer,
}

impl AppendParams {
    /// Number of f32 values in each of new K and new V.
    pub fn new_elements(&self) -> usize {
        self.n_seqs * self.n_new * self.n_kv_heads * self.head_dim
    }

    /// Checks the shape against the kernel's contract and the device.
    pub fn validate(&self, ctx: &Context) -> Result<(), ParamError> {
        let device = ctx.info();
        if self.n_seqs == 0 {
            return Err(invalid("n_seqs", "must be at least 1"));
        }
        if self.n_new == 0 || self.n_new > self.layout.capacity {
            return Err(invalid("n_new", format!("{} is not in 1..=capacity ({})", self.n_new, self.layout.capacity)));
        }
        if self.n_kv_heads == 0 {
            return Err(invalid("n_kv_heads", "must be at least 1"));
        }
        check_head_dim(self.head_dim)?;
        check_dtype(self.dtype, device)?;
        check_layout(&self.layout, self.n_seqs, self.n_kv_heads, self.head_dim, self.dtype, device)?;
        let total = self.new_elements();
        if total > u32::MAX as usize {
            return Err(invalid("n_new", format!("{total} new elements exceed 32-bit indexing")));
        }
        let groups = total.div_ceil(WORKGROUP);
        let [max_x, max_y, _] = device.max_workgroup_count;
        if groups > max_x as usize * max_y as usize {
            return Err(invalid("n_new", format!("{groups} workgroups exceed the device's grid")));
        }
        Ok(())
    }

    /// Checks start positions (host copy of the `start` buffer) against the capacity.
    pub fn validate_starts(&self, start: &[u32]) -> Result<(), ParamError> {
        if start.len() != self.n_seqs {
            return Err(invalid("start", format!("{} entries for {} sequences", start.len(), self.n_seqs)));
        }
        if let Some((b, &s)) = start.iter().enumerate().find(|&(_, &s)| s as usize + self.n_new > self.layout.capacity)
        {
            return Err(invalid(
                "start",
                format!(
                    "sequence {b}: start {s} + {} new tokens exceeds capacity {}",
                    self.n_new, self.layout.capacity
                ),
            ));
        }
        Ok(())
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
    let cache_bytes = (params.layout.min_elements() * params.dtype.size()) as u64;
    check_buffer("new_k", bufs.new_k.size(), new_bytes)?;
    check_buffer("new_v", bufs.new_v.size(), new_bytes)?;
    check_buffer("start", bufs.start.size(), 4 * params.n_seqs as u64)?;
    check_buffer("k_cache", bufs.k_cache.size(), cache_bytes)?;
    check_buffer("v_cache", bufs.v_cache.size(), cache_bytes)?;

    let shader = match params.dtype {
        Dtype::F32 => &shaders::KV_APPEND_F32,
        Dtype::F16 => &shaders::KV_APPEND_F16,
        Dtype::Bf16 => &shaders::KV_APPEND_BF16,
    };
    let spec = [(0, mutant.map_or(0, |m| m as u32))];
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader, bindings: 5, push_constant_bytes: 4 * PUSH_WORDS as u32, spec: &spec })?;
    let groups = params.new_elements().div_ceil(WORKGROUP) as u32;
    let max_x = ctx.info().max_workgroup_count[0];
    let (gx, gy) = grid_2d(u64::from(groups), u64::from(max_x));
    let (gx, gy) = (gx as u32, gy as u32);
    let l = &params.layout;
    let push = words(&[
        params.n_seqs as u32,
        params.n_new as u32,
        params.n_kv_heads as u32,
        params.head_dim as u32,
        l.stride_seq as u32,
        l.stride_head as u32,
        l.stride_pos as u32,
        l.capacity as u32,
        params.new_elements() as u32,
        gx,
    ]);
    let buffers = [bufs.new_k, bufs.new_v, bufs.start, bufs.k_cache, bufs.v_cache];
    rec.dispatch(&pipeline, &buffers, &push, [gx, gy, 1], "kv_append")?;
    Ok(())
}
