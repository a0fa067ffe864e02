//! Decode attention: split-K flash-decoding. `shaders/attention_split.comp` computes per-chunk
//! partials (O, m, l) with an online softmax, lanes of a subgroup sharing each K/V row (16-byte
//! loads, shuffle reductions). With a few chunks the last workgroup of each group of chunks (a
//! device-scope counter) merges them by log-sum-exp in the same dispatch; with more,
//! `shaders/attention_merge.comp` does after a barrier, in parallel; [`record_unmerged`] leaves
//! the merge to the consumer (the engine's o_proj merges as it reads). [`AttentionParams::launch`]
//! picks the specialization constants from the head dim, the GQA ratio, the chunk length and the
//! device's subgroup size; the kernels need subgroup operations (shuffle, arithmetic).
//! Options: sliding window, logit softcap, attention sinks, and a fused mode that appends the
//! step's new K/V (the last `n_queries` positions of each sequence) in the same dispatch.
//! Paged caches ([`super::Paging`]) go through a block table per sequence: every row's address
//! takes a table lookup (the `PAGED` specialization constant, so contiguous pipelines are the
//! code they were); chunks may start and end anywhere in a page.
//!
//! Contract (the same as `vkdecode_reference::decode_attention`): Q f32 `[B][n_queries][H][D]`;
//! K/V caches of `dtype` in any non-overlapping strided layout; `seq_lens[b]` valid positions per
//! sequence; query t of sequence b sits at `seq_lens[b] - n_queries + t` and attends causally;
//! kv head = h / (H / Hkv); f32 accumulation; output f32 like Q. Fully masked rows give 0 and
//! positions past the query are never read.

use std::sync::Arc;

use crate::gpu::{Buffer, Context, DeviceInfo, Pipeline, PipelineDesc, Recorder};
use crate::shaders;

use super::{
    CacheLayout, Dtype, KernelError, MAX_HEAD_DIM, Paging, ParamError, check_block_tables, check_buffer, check_dtype,
    check_head_dim, check_layout, check_page_writes, grid_2d, invalid, seq_capacity, words,
};

const PUSH_WORDS: usize = 19;
/// Floats of the split pass's slot-combine buffer (the shader's `O_CAP`): slots · 8 · lanes · runs
/// per lane (the head dim the layout covers) ≤ this.
const O_CAP: usize = 4096;
/// Entries of its per-slot (m, l) and weight buffers (the shader's `ML_CAP`): slots · heads ≤ this.
const ML_CAP: usize = 512;
/// How many query heads a split workgroup serves (its block of a GQA group; the group's other
/// blocks re-read the same K/V, mostly from L2) and how many positions each row slot takes per
/// step (their loads are in flight together, fetched a step ahead). Measured on the H100 (132
/// SMs, f16, one call back to back; every layout here holds one 256-invocation workgroup per SM,
/// so bytes in flight per invocation decide, not registers: h32:kv8:d128 at kv 16384 with 3
/// positions a step, 123 registers, two workgroups per SM and chunks for two waves took 58.8 µs
/// against 41.1):
/// - head dims ≤ 128: two heads a block. h32:kv8:d128 (GQA 4) at kv 16384: 51.5 µs with the
///   whole group in one block (203 registers), 46.8 with two heads (152), 59.9 with one;
///   h64:kv8:d64 (GQA 8) at 7680: 31.0 (eight heads), 27.3 (four), 24.4 (two);
/// - head dims above 128: up to eight heads (a 512-byte row is costly to re-read).
///   h32:kv2:d256 (GQA 16) at 20000: 79.1 µs with eight heads a block (255 registers), 84.2 with
///   four, 84.7 with two;
/// - positions per step: 6 in chunks of at least [`LONG_CHUNK`] positions (h32:kv8:d128 at
///   16384: 46.8 → 41.1 µs with 4 → 6, 40.4 with 8; h16:kv8:d128: 37.8 → 34.0), else 4: a
///   shorter chunk wastes more of its last step (Qwen3-8B's in-step attention at ctx 4096,
///   chunks of 512: 871 µs/token with 4, 905 with 6). At d256, 4 (6: 84.3 µs). The `_qk`
///   variants take 2 in chunks under [`QK_SHORT_CHUNK`]: 4 took Qwen3-0.6B's attention at ctx
///   512 from 437 to 758 µs/token (the kernels of f27bce7: 4 measured the same as 2, 1172 µs/token).
const HEADS_PER_BLOCK: usize = 2;
const HEADS_PER_BLOCK_LARGE_DIMS: usize = 8;
const POSITIONS_PER_STEP: usize = 4;
const POSITIONS_PER_STEP_LONG: usize = 6;
const POSITIONS_PER_STEP_QK_SHORT: usize = 2;
/// Chunks of at least this many positions take [`POSITIONS_PER_STEP_LONG`].
const LONG_CHUNK: usize = 1024;
/// Chunks below this many positions take [`POSITIONS_PER_STEP_QK_SHORT`] in the `_qk` variants.
const QK_SHORT_CHUNK: usize = 512;
/// Query-head × dim values one invocation holds in registers for q (and again for the
/// accumulators): heads per block × 8 × runs per lane ≤ this (the shader's arrays).
const MAX_LANE_VALUES: usize = 64;
/// Most query heads one split workgroup serves.
const MAX_HEADS_PER_WORKGROUP: usize = HEADS_PER_BLOCK_LARGE_DIMS;
/// Invocations per split workgroup (fewer when the slot-combine buffer would not hold them).
/// H100: 256 beat 128 and 512 (kv 4096..20000, head dims 128 and 256).
const SPLIT_WG: usize = 256;
/// Positions per split-K chunk: a multiple of the shader's 64-wide tile.
pub const CHUNK_TILE: usize = 64;
/// Smallest and largest automatic chunk: below 256 positions a workgroup's fixed costs (query
/// load, slot combine, partial write, a longer merge) outweigh the parallelism it adds. (H100,
/// Qwen3 decode step at ctx 512: chunks of 64 took 8B's attention from 634 to 862 µs/token and
/// 0.6B's from 500 to 517, though one call back to back went from 14.0 to 10.9 µs, with a merge
/// dispatch after the split pass.) Since up to [`MERGE_IN_SPLIT_MAX_CHUNKS`] chunks merge in the
/// split pass, chunks start at 128 positions: at ctx 512 that took Qwen3-0.6B's attention from
/// 434 to 379 µs/token and 8B's from 576 to 505 (64: 392 and 499; 128 with 4 positions a step
/// instead of 2: 396 and 508); h32:kv8:d128 at kv 512, one call: 10.9 → 9.3 µs.
pub const MIN_AUTO_CHUNK: usize = 128;
pub const MAX_AUTO_CHUNK: usize = 4096;
/// Most chunks the split pass merges itself. H100, one call: at kv 512 (2
/// chunks) merging in the split pass took 14.2 → 12.6 µs (no second dispatch and barrier); at kv
/// 16384 (32 chunks) the serial merge of one workgroup took 55 → 81 µs against the parallel merge
/// dispatch; Qwen3-0.6B at ctx 512 (3 chunks): 1550 → 1500 µs/token, and 1468 with every partial
/// of an element loaded up front (the shader's `MERGE_MAX` = this). Staging the chunk weights
/// through shared memory instead cost two more barriers and was slower (500 against 475 µs/token
/// of attention). The shader unrolls that many loads per element (a specialization constant:
/// the chunk count rounded up to a power of two, at least 4), so short contexts keep a small
/// merge: a fixed bound of 16 took Qwen3-0.6B at ctx 4096 from 1783 to 1720 µs/token but at 512
/// from 1462 to 1510. Every variant merges in the split pass (it was the `_qk` variants only):
/// h32:kv8:d128 f16, one call, at kv 4096 19.1 → 17.3 µs, 8192 26.2 → 24.0, 16384 41.0 → 38.7.
const MERGE_IN_SPLIT_MAX_CHUNKS: usize = 16;
const MERGE_IN_SPLIT_MIN_UNROLL: usize = 4;
const MERGE_PUSH_WORDS: usize = 5;
/// New rows a fused split workgroup packs into shared memory before its loop (the shader's
/// `NEW_ROWS`), so cache and new rows share one loop; a range with more (multi-query) reads them
/// in a separate pass. H100, h32:kv8:d128 f16, fused append+attend against attention alone:
/// +6.6 µs at kv 4096 with that separate pass for the single new row (a block of code run once
/// per call, cold in the instruction cache: skipping it left +0.6 µs), +2.7 µs with this; in
/// the Qwen3 decode step (the `_qk` variants) attention at ctx 16384 went 2451 → 2151 µs/token
/// (8B) and 1403 → 1172 (0.6B). Taking a new row's words by a branch inside the loads instead
/// of a select made it slower than the separate pass (+16 µs at kv 4096). Reading the new rows
/// for the packing with 16-byte loads rather than 4-byte ones: +2.1 → +1.5 µs at kv 4096 (a
/// build that skipped those reads altogether measured +1.0).
const NEW_ROWS_IN_SHARED: usize = 2;
/// Compute units assumed where the device does not tell (see [`AttentionParams::split`]).
pub const DEFAULT_COMPUTE_UNITS: usize = 128;
/// Query tokens per sequence (speculative verification uses up to 8).
pub const MAX_QUERIES: usize = 8;
/// Query heads per kv head.
pub const MAX_GQA_RATIO: usize = 32;

/// Deliberately broken variants, selected by specialization constant 0; the suite must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionMutant {
    /// Attends to one position past the query (reads the next, possibly unwritten, slot).
    CausalOffByOne = 1,
    /// Maps query head h to kv head h % Hkv instead of h / ratio.
    GqaModulo = 2,
    /// Exponentiates raw scores without subtracting the running max.
    NoMaxSubtract = 3,
    /// Rounds the output accumulators to f16 after every tile.
    F16Accumulate = 4,
    /// Decodes V elements as the wrong type (f16 as bf16, bf16 as f16, f32 cut to 16 bits).
    VMisread = 5,
    /// Merges split-K chunks without rescaling each by exp(m_c − M).
    MergeNoRescale = 6,
    /// Fused mode: reads the new tokens from the cache slots being written in the same dispatch.
    FusedReadsCache = 7,
    /// Each split-K chunk runs one position into the next (the boundary counted twice).
    ChunkOverlap = 8,
    /// With `qk_norm_rope`: rotates neighbouring dims (2i, 2i+1) instead of (i, i + D/2). Not in
    /// [`AttentionMutant::ALL`]: the engine's mutant, caught by tests/qwen3_tokens.rs.
    InterleavedRope = 9,
    /// With `qk_norm_rope`: RoPE without the RMSNorm (the engine's mutant, like `InterleavedRope`).
    SkipQkNorm = 10,
    /// Paged: reads a row from the next page of its table (`table[b][pos / page_size + 1]`, where
    /// that entry exists). Contiguous calls are unaffected.
    PageIndexOffByOne = 11,
    /// Paged: splits positions into page and slot by a hard-coded 16 (vLLM's default block size)
    /// instead of the page size. Contiguous calls are unaffected.
    PageSizeWrongConstant = 12,
    /// q8_0: dequantizes each block with the scale of the next block in the buffer (where there is
    /// one). Other dtypes are unaffected.
    Q8NeighbourScale = 13,
}

impl AttentionMutant {
    pub const ALL: [AttentionMutant; 11] = [
        AttentionMutant::CausalOffByOne,
        AttentionMutant::GqaModulo,
        AttentionMutant::NoMaxSubtract,
        AttentionMutant::F16Accumulate,
        AttentionMutant::VMisread,
        AttentionMutant::MergeNoRescale,
        AttentionMutant::FusedReadsCache,
        AttentionMutant::ChunkOverlap,
        AttentionMutant::PageIndexOffByOne,
        AttentionMutant::PageSizeWrongConstant,
        AttentionMutant::Q8NeighbourScale,
    ];
    pub fn name(self) -> &'static str {
        match self {
            AttentionMutant::CausalOffByOne => "causal_off_by_one",
            AttentionMutant::GqaModulo => "gqa_modulo",
            AttentionMutant::NoMaxSubtract => "no_max_subtract",
            AttentionMutant::F16Accumulate => "f16_accumulate",
            AttentionMutant::VMisread => "v_misread",
            AttentionMutant::MergeNoRescale => "merge_no_rescale",
            AttentionMutant::FusedReadsCache => "fused_reads_cache",
            AttentionMutant::ChunkOverlap => "chunk_overlap",
            AttentionMutant::InterleavedRope => "interleaved_rope",
            AttentionMutant::SkipQkNorm => "skip_qk_norm",
            AttentionMutant::PageIndexOffByOne => "page_index_off_by_one",
            AttentionMutant::PageSizeWrongConstant => "page_size_wrong_constant",
            AttentionMutant::Q8NeighbourScale => "q8_scale_of_next_block",
        }
    }
}

/// Shape and options of one decode-attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub n_seqs: usize,
    pub n_queries: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: Dtype,
    pub layout: CacheLayout,
    pub scale: f32,
    /// Most positions per split-K chunk (a multiple of 64); `None` picks one from the capacity.
    /// The chunk count follows from it; each call shares its visible positions evenly among the
    /// chunks (whole tiles of 64), so a cache filled below its capacity uses every chunk.
    pub split_chunk: Option<usize>,
    /// Sliding window in positions (at least 1); `None`: the whole causal prefix.
    pub window: Option<usize>,
    /// Logit softcap c > 0: scaled logits s become c·tanh(s/c).
    pub softcap: Option<f32>,
    /// One sink logit per query head (the `sinks` buffer, f32 `[n_q_heads]`).
    pub sinks: bool,
    /// Append the step's new K/V (`new_k`/`new_v`, f32 `[B][n_queries][Hkv][D]`) at positions
    /// `seq_lens[b] − n_queries + t` in the same dispatch; every `seq_lens[b]` ≥ `n_queries`.
    pub fused: bool,
    /// Fused mode with one query: q and the new K arrive raw, and the dispatch first applies
    /// Qwen3's per-head RMSNorm (this epsilon, f32 weights) and rotate_half RoPE at the query's
    /// position (the [`QkNormRope`] buffers) to them, as `shaders/qk_norm_rope.comp` would.
    pub qk_norm_rope: Option<f32>,
    /// A paged cache: `layout` is the page pool and the `block_tables` buffer maps positions to
    /// pages; a sequence holds `pages_per_seq · layout.capacity` positions.
    pub paging: Option<Paging>,
}

/// The inputs of [`AttentionParams::qk_norm_rope`]: f32 `[head_dim]` norm weights for q and k,
/// and f32 (cos, sin) pairs `[capacity][head_dim / 2]` by position (capacity: a sequence's, with
/// paging its pages' positions).
#[derive(Clone, Copy)]
pub struct QkNormRope<'a> {
    pub q_norm: &'a Buffer,
    pub k_norm: &'a Buffer,
    pub rope: &'a Buffer,
}

/// The buffers of one call: `seq_lens` is u32 `[B]`, `out` has Q's shape, and the two partial
/// buffers hold the split-K intermediates (sizes from [`AttentionParams::partial_o_bytes`] and
/// [`AttentionParams::partial_ml_bytes`]; unused, but bound, with one chunk). `counters` holds
/// the chunk counters of the in-split merge (see [`AttentionParams::merges_in_split`]): zeros,
/// sized by [`AttentionParams::counters_bytes`], from [`zeroed_counters`]; each call leaves them
/// zero, and calls sharing them must be separated by a barrier.
pub struct AttentionBuffers<'a> {
    pub q: &'a Buffer,
    pub seq_lens: &'a Buffer,
    pub k_cache: &'a Buffer,
    pub v_cache: &'a Buffer,
    pub out: &'a Buffer,
    pub partial_o: &'a Buffer,
    pub partial_ml: &'a Buffer,
    pub counters: &'a Buffer,
    /// With [`AttentionParams::sinks`].
    pub sinks: Option<&'a Buffer>,
    /// With [`AttentionParams::fused`].
    pub new_k: Option<&'a Buffer>,
    pub new_v: Option<&'a Buffer>,
    /// With [`AttentionParams::qk_norm_rope`].
    pub qk_norm_rope: Option<QkNormRope<'a>>,
    /// With [`AttentionParams::paging`]: u32 `[n_seqs][pages_per_seq]` page ids.
    pub block_tables: Option<&'a Buffer>,
}

/// The split pass's layout (specialization constants 1..=7 and the grid's x extent), see
/// `shaders/attention_split.comp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLaunch {
    /// Invocations sharing one K/V row: a power of two ≤ the device's subgroup size.
    pub lanes: usize,
    /// Runs of 8 dims each lane holds: head_dim ≤ 8 · lanes · runs_per_lane.
    pub runs_per_lane: usize,
    /// Query heads per workgroup, and blocks of them per kv head (the last may hold fewer).
    pub heads: usize,
    pub head_blocks: usize,
    /// Positions each row slot loads per step.
    pub positions_per_step: usize,
    /// Every row starts 16-byte aligned, so rows are read with 16-byte loads.
    pub vector_loads: bool,
    pub workgroup_size: usize,
    /// Chunks the in-split merge unrolls (see [`AttentionParams::merges_in_split`]).
    pub merge_unroll: usize,
}

impl AttentionParams {
    /// The decode engine's call: one sequence, one query, a token-major cache of `capacity`
    /// positions, scale 1/√head_dim, fused append with Qwen3's q/k-norm + RoPE (epsilon `eps`),
    /// no window, softcap or sinks, automatic chunks.
    pub fn qwen3_decode(
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: Dtype,
        capacity: usize,
        eps: f32,
    ) -> AttentionParams {
        AttentionParams {
            n_seqs: 1,
            n_queries: 1,
            n_q_heads,
            n_kv_heads,
            head_dim,
            dtype,
            layout: CacheLayout::token_major(1, n_kv_heads, capacity, head_dim, 0),
            scale: (head_dim as f32).powf(-0.5),
            split_chunk: None,
            window: None,
            softcap: None,
            sinks: false,
            fused: true,
            qk_norm_rope: Some(eps),
            paging: None,
        }
    }

    /// Positions one sequence holds: the layout's capacity, or with paging its pages' positions.
    pub fn seq_capacity(&self) -> usize {
        seq_capacity(&self.layout, self.paging)
    }

    /// Number of f32 values in Q (and in the output).
    pub fn q_elements(&self) -> usize {
        self.n_seqs * self.n_queries * self.n_q_heads * self.head_dim
    }

    /// Number of f32 values in each of new K and new V (fused mode).
    pub fn new_kv_elements(&self) -> usize {
        self.n_seqs * self.n_queries * self.n_kv_heads * self.head_dim
    }

    /// How the split pass is laid out on `device` (its specialization constants and grid).
    pub fn launch(&self, device: &DeviceInfo) -> SplitLaunch {
        let (lanes, runs_per_lane) = self.lanes(device);
        let ratio = self.gqa_ratio();
        let (chunk, chunks) = self.split(device);
        let positions_per_step = match (self.head_dim > 128, chunk >= LONG_CHUNK, &self.qk_norm_rope) {
            (true, _, _) => POSITIONS_PER_STEP,
            (false, true, _) => POSITIONS_PER_STEP_LONG,
            (false, false, Some(_)) if chunk < QK_SHORT_CHUNK => POSITIONS_PER_STEP_QK_SHORT,
            (false, false, _) => POSITIONS_PER_STEP,
        };
        let blocks = self.head_blocks(device);
        let heads = ratio.div_ceil(blocks);
        // The shader's slot-combine buffers bound slots · head_dim and slots · heads. A power of
        // two, so few workgroup sizes occur: each launch shape is a pipeline, and on CPU devices
        // (lavapipe) compiling one costs seconds (the property tests drew 168 with any slot count,
        // 121 with powers of two). GPUs with 32-wide subgroups are never limited at head dims ≤ 256.
        let wg = SPLIT_WG.min(device.max_workgroup_invocations as usize);
        let slots = (wg / lanes).min(O_CAP / (8 * lanes * runs_per_lane)).min(ML_CAP / heads).max(1);
        let slots = 1 << slots.ilog2();
        let l = &self.layout;
        // q8_0 blocks are 2-byte aligned: their rows take the scalar (16-bit) loads.
        let vec = self.dtype.is_float() && {
            let elements_per_16b = 16 / self.dtype.size();
            [l.stride_seq, l.stride_head, l.stride_pos].iter().all(|s| s.is_multiple_of(elements_per_16b))
        };
        SplitLaunch {
            lanes,
            runs_per_lane,
            heads,
            head_blocks: blocks,
            positions_per_step,
            vector_loads: vec,
            workgroup_size: lanes * slots,
            merge_unroll: if self.merges_in_split(device) {
                chunks.next_power_of_two().max(MERGE_IN_SPLIT_MIN_UNROLL)
            } else {
                MERGE_IN_SPLIT_MIN_UNROLL
            },
        }
    }

    fn gqa_ratio(&self) -> usize {
        (self.n_q_heads / self.n_kv_heads.max(1)).max(1)
    }

    /// (invocations per K/V row, 16-byte runs each holds): a power of two ≤ the subgroup, so a
    /// row never straddles subgroups (Vulkan makes subgroups a power of two; guard anyway).
    fn lanes(&self, device: &DeviceInfo) -> (usize, usize) {
        let subgroup = device.subgroup_size.clamp(1, 32) as usize;
        let subgroup = 1 << subgroup.ilog2();
        let runs = self.head_dim.div_ceil(8).max(1); // 16-byte runs of an f16 row
        let lanes = runs.next_power_of_two().min(subgroup);
        (lanes, runs.div_ceil(lanes))
    }

    /// Blocks of query heads a GQA group is cut into (see [`HEADS_PER_BLOCK`]).
    fn head_blocks(&self, device: &DeviceInfo) -> usize {
        let (_, runs_per_lane) = self.lanes(device);
        let cap = if self.head_dim > 128 { HEADS_PER_BLOCK_LARGE_DIMS } else { HEADS_PER_BLOCK };
        let head_cap = cap.min(MAX_LANE_VALUES / (8 * runs_per_lane)).max(1);
        self.gqa_ratio().div_ceil(head_cap)
    }

    /// (positions per chunk, number of chunks) of the split-K pass. The automatic choice fills
    /// one wave: a split workgroup per compute unit where the device tells their number, else
    /// per [`DEFAULT_COMPUTE_UNITS`] (the layouts' 150–255 registers per invocation allow one per
    /// H100 SM), counting every head block; chunks stay within [`MIN_AUTO_CHUNK`] and
    /// [`MAX_AUTO_CHUNK`] positions. H100 (132 SMs), µs per call against the former fixed
    /// target of 256 workgroups: h32:kv8:d128 at kv 8192 45.9 → 31.7, at 16384 54.9 → 51.6;
    /// h32:kv2:d256 at 20000 110.7 → 79.0; in the Qwen3-8B decode step at ctx 16384, attention
    /// 2636 → 2452 µs/token. A second, partly filled wave costs most of a wave: 160 workgroups
    /// instead of 128 took that step's attention to 2866. The positions a call sees are then
    /// shared evenly by the chunks (the shader), not cut at multiples of the chunk: H100,
    /// h32:kv8:d128 with 2000 of 16384 positions filled 34.4 → 12.3 µs, 8000 of 32768
    /// 63.2 → 23.4; full caches unchanged.
    pub fn split(&self, device: &DeviceInfo) -> (usize, usize) {
        let capacity = self.seq_capacity().max(1);
        let chunk = self.split_chunk.unwrap_or_else(|| {
            let units = device.compute_units.map_or(DEFAULT_COMPUTE_UNITS, |n| n as usize);
            let others = self.n_kv_heads * self.n_seqs * self.n_queries * self.head_blocks(device);
            let chunks = (units / others.max(1)).max(1);
            capacity.div_ceil(chunks).next_multiple_of(CHUNK_TILE).clamp(MIN_AUTO_CHUNK, MAX_AUTO_CHUNK)
        });
        (chunk, capacity.div_ceil(chunk))
    }

    /// Bytes of the partial-output buffer on `device`: `[rows][chunks][head_dim]` f32.
    pub fn partial_o_bytes(&self, device: &DeviceInfo) -> u64 {
        let (_, chunks) = self.split(device);
        (self.q_elements() * chunks * 4) as u64
    }

    /// Whether the split pass merges its chunks itself (the last workgroup of each group of
    /// chunks, counted on a device-scope counter) rather than a second merge dispatch after a
    /// barrier: with 2..=[`MERGE_IN_SPLIT_MAX_CHUNKS`] chunks.
    pub fn merges_in_split(&self, device: &DeviceInfo) -> bool {
        (2..=MERGE_IN_SPLIT_MAX_CHUNKS).contains(&self.split(device).1)
    }

    /// Bytes of the chunk-counter buffer (u32, one per group of split workgroups sharing output
    /// rows; at most one per query row). It must hold zeros before the first call, and every
    /// call leaves it so; calls sharing it must be separated by a barrier.
    pub fn counters_bytes(&self) -> u64 {
        (self.n_seqs * self.n_queries * self.n_q_heads * 4) as u64
    }

    /// Bytes of the partial (m, l) buffer on `device`: `[rows][chunks]` pairs of f32.
    pub fn partial_ml_bytes(&self, device: &DeviceInfo) -> u64 {
        let (_, chunks) = self.split(device);
        (self.n_seqs * self.n_queries * self.n_q_heads * chunks * 8) as u64
    }

    /// Checks the shape against the kernel's contract and the device.
    pub fn validate(&self, ctx: &Context) -> Result<(), ParamError> {
        let device = ctx.info();
        let [max_x, max_y, max_z] = device.max_workgroup_count.map(|m| m as usize);
        if self.n_seqs == 0 || self.n_seqs * self.n_queries > max_z {
            return Err(invalid(
                "n_seqs",
                format!("{} sequences × {} queries exceed {max_z}", self.n_seqs, self.n_queries),
            ));
        }
        if self.n_queries == 0 || self.n_queries > MAX_QUERIES {
            return Err(invalid("n_queries", format!("{} is not in 1..={MAX_QUERIES}", self.n_queries)));
        }
        if let Some(chunk) = self.split_chunk
            && (chunk == 0 || !chunk.is_multiple_of(CHUNK_TILE))
        {
            return Err(invalid("split_chunk", format!("{chunk} is not a positive multiple of {CHUNK_TILE}")));
        }
        if self.n_kv_heads == 0 {
            return Err(invalid("n_kv_heads", "must be at least 1"));
        }
        if self.n_q_heads == 0 || !self.n_q_heads.is_multiple_of(self.n_kv_heads) || self.n_q_heads > max_y {
            return Err(invalid(
                "n_q_heads",
                format!("{} must be a positive multiple of n_kv_heads ({})", self.n_q_heads, self.n_kv_heads),
            ));
        }
        let ratio = self.n_q_heads / self.n_kv_heads;
        if ratio > MAX_GQA_RATIO {
            return Err(invalid("n_q_heads", format!("GQA ratio {ratio} exceeds {MAX_GQA_RATIO}")));
        }
        check_head_dim(self.head_dim)?;
        check_dtype(self.dtype, device)?;
        if self.dtype == Dtype::Q8_0 && (self.fused || self.qk_norm_rope.is_some()) {
            return Err(invalid("fused", "fused with q8_0 is not supported yet"));
        }
        check_layout(&self.layout, self.n_seqs, self.paging, self.n_kv_heads, self.head_dim, self.dtype, device)?;
        if !self.scale.is_finite() {
            return Err(invalid("scale", format!("{} is not finite", self.scale)));
        }
        if self.window == Some(0) {
            return Err(invalid("window", "a sliding window must be at least 1 position"));
        }
        if let Some(c) = self.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("softcap", format!("{c} is not a positive finite number")));
        }
        let q = self.q_elements();
        if q > u32::MAX as usize || (q * 4) as u64 > device.max_storage_buffer_range {
            return Err(invalid("n_seqs", format!("Q of {q} elements exceeds the device's buffer range")));
        }
        if !device.subgroup_arithmetic {
            return Err(invalid("device", format!("`{}` lacks subgroup operations in compute shaders", device.name)));
        }
        if let Some(eps) = self.qk_norm_rope {
            if !self.fused || self.n_queries != 1 {
                return Err(invalid("qk_norm_rope", "needs the fused mode with one query per sequence"));
            }
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(invalid("qk_norm_rope", format!("epsilon {eps} is not a finite non-negative number")));
            }
            if (self.launch(device).heads + 1) * self.head_dim > O_CAP {
                return Err(invalid(
                    "head_dim",
                    format!("{} does not fit the q/k norm + RoPE prologue", self.head_dim),
                ));
            }
        }
        // The split pass's shared memory: the slot-combine buffers, (m, l, weight) per slot and
        // head, M per head, the new K row, and in fused mode the new rows packed as the cache
        // stores them (f32 at most).
        let new_rows = if self.fused { 2 * NEW_ROWS_IN_SHARED * MAX_HEAD_DIM } else { 0 };
        let shared = 4 * (O_CAP + 3 * ML_CAP + MAX_HEADS_PER_WORKGROUP + MAX_HEAD_DIM + new_rows);
        if (device.max_compute_shared_memory as usize) < shared {
            return Err(invalid(
                "device",
                format!(
                    "`{}` offers {} B of shared memory, {shared} B needed",
                    device.name, device.max_compute_shared_memory
                ),
            ));
        }
        let (_, chunks) = self.split(device);
        let blocks = self.launch(device).head_blocks;
        if chunks * blocks > max_x {
            return Err(invalid(
                "split_chunk",
                format!("{chunks} chunks × {blocks} head blocks exceed the device's {max_x} workgroups"),
            ));
        }
        if self.partial_o_bytes(device) / 4 > u64::from(u32::MAX)
            || self.partial_o_bytes(device) > device.max_storage_buffer_range
        {
            return Err(invalid(
                "split_chunk",
                "the split-K partials exceed the device's buffer range; use larger chunks",
            ));
        }
        Ok(())
    }

    /// Checks sequence lengths (host copy of the `seq_lens` buffer) against the capacity (with
    /// paging, a sequence's pages).
    pub fn validate_seq_lens(&self, seq_lens: &[u32]) -> Result<(), ParamError> {
        if seq_lens.len() != self.n_seqs {
            return Err(invalid("seq_lens", format!("{} entries for {} sequences", seq_lens.len(), self.n_seqs)));
        }
        let capacity = self.seq_capacity();
        if let Some((b, &len)) = seq_lens.iter().enumerate().find(|&(_, &l)| l as usize > capacity) {
            return Err(invalid("seq_lens", format!("sequence {b}: length {len} exceeds capacity {capacity}")));
        }
        if self.fused
            && let Some((b, &len)) = seq_lens.iter().enumerate().find(|&(_, &l)| (l as usize) < self.n_queries)
        {
            return Err(invalid(
                "seq_lens",
                format!("sequence {b}: length {len} cannot hold the {} new tokens of a fused append", self.n_queries),
            ));
        }
        Ok(())
    }

    /// Checks block tables (host copy of the `block_tables` buffer, u32 `[n_seqs][pages_per_seq]`):
    /// the length, every page id within the pool (`layout.n_seqs` pages), and no page twice in
    /// one table (the reference's `PagedLayout::validate` refuses that too). Unpaged calls take
    /// an empty slice.
    pub fn validate_block_tables(&self, tables: &[u32]) -> Result<(), ParamError> {
        check_block_tables(tables, self.n_seqs, self.paging, self.layout.n_seqs)
    }

    /// [`Self::validate_block_tables`], and in fused mode, where each sequence writes its last
    /// `n_queries` positions (from `seq_lens`), that no page it writes is listed by another
    /// sequence (whose workgroups could be reading it in the same dispatch).
    pub fn validate_block_table_writes(&self, tables: &[u32], seq_lens: &[u32]) -> Result<(), ParamError> {
        self.validate_block_tables(tables)?;
        let Some(paging) = self.paging.filter(|_| self.fused) else { return Ok(()) };
        let capacity = self.seq_capacity();
        let writes = seq_lens.iter().map(|&l| {
            let end = (l as usize).min(capacity);
            end.saturating_sub(self.n_queries)..end
        });
        check_page_writes(tables, paging, self.layout.capacity, writes)
    }
}

/// A decode-attention call's split-K partials, left for the consumer to merge
/// ([`record_unmerged`]): `o` holds `[row][chunk][head_dim]` f32 and `ml` the `[row][chunk]`
/// (m, l) f32 pairs, a row per (sequence, query, head). The output row is
/// Σ_c O_c·exp(m_c − M) / Σ_c l_c·exp(m_c − M), M = max m_c, over the chunks with l_c > 0, and 0
/// where none has.
#[derive(Clone, Copy)]
pub struct Partials<'a> {
    pub o: &'a Buffer,
    pub ml: &'a Buffer,
    pub rows: usize,
    pub chunks: usize,
    pub head_dim: usize,
}

/// Records one decode-attention call: the split pass, then (with several chunks) a barrier and
/// the merge. The shaders clamp lengths to the capacity regardless of `seq_lens`.
pub fn record<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    params: &AttentionParams,
    bufs: AttentionBuffers<'a>,
    mutant: Option<AttentionMutant>,
) -> Result<(), KernelError> {
    record_split(rec, ctx, params, bufs, mutant, true).map(|_| ())
}

/// [`record`] without the merge: with several chunks the call ends once the partials are
/// written, and returns them for the consumer to merge as it reads them (the engine's o_proj,
/// [`super::layers::X::Merged`]), which saves the merge's device-scope counter and second pass;
/// with one chunk it writes `out` and returns `None`. Not with sinks.
pub fn record_unmerged<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    params: &AttentionParams,
    bufs: AttentionBuffers<'a>,
    mutant: Option<AttentionMutant>,
) -> Result<Option<Partials<'a>>, KernelError> {
    if params.sinks {
        return Err(invalid("sinks", "an unmerged call leaves the merge to a consumer that takes no sinks").into());
    }
    record_split(rec, ctx, params, bufs, mutant, false)
}

fn record_split<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    params: &AttentionParams,
    bufs: AttentionBuffers<'a>,
    mutant: Option<AttentionMutant>,
    merge: bool,
) -> Result<Option<Partials<'a>>, KernelError> {
    params.validate(ctx)?;
    let q_bytes = (params.q_elements() * 4) as u64;
    let cache_bytes = params.dtype.cache_bytes(params.layout.min_elements()) as u64;
    let (chunk, n_chunks) = params.split(ctx.info());
    let merge_in_split = params.merges_in_split(ctx.info());
    check_buffer("q", bufs.q.size(), q_bytes)?;
    check_buffer("out", bufs.out.size(), q_bytes)?;
    check_buffer("seq_lens", bufs.seq_lens.size(), 4 * params.n_seqs as u64)?;
    check_buffer("k_cache", bufs.k_cache.size(), cache_bytes)?;
    check_buffer("v_cache", bufs.v_cache.size(), cache_bytes)?;
    check_buffer("counters", bufs.counters.size(), params.counters_bytes())?;
    if n_chunks > 1 {
        check_buffer("partial_o", bufs.partial_o.size(), params.partial_o_bytes(ctx.info()))?;
        check_buffer("partial_ml", bufs.partial_ml.size(), params.partial_ml_bytes(ctx.info()))?;
    }
    // Absent optional inputs bind a buffer the shader never reads in that mode.
    let sinks = match (params.sinks, bufs.sinks) {
        (true, Some(b)) => {
            check_buffer("sinks", b.size(), 4 * params.n_q_heads as u64)?;
            b
        }
        (true, None) => return Err(invalid("sinks", "`sinks` is set but no sinks buffer was given").into()),
        (false, _) => bufs.q,
    };
    let qk = match (params.qk_norm_rope, bufs.qk_norm_rope) {
        (Some(_), Some(b)) => {
            let d = params.head_dim as u64;
            check_buffer("q_norm", b.q_norm.size(), 4 * d)?;
            check_buffer("k_norm", b.k_norm.size(), 4 * d)?;
            check_buffer("rope", b.rope.size(), 4 * d * params.seq_capacity() as u64)?;
            [b.q_norm, b.k_norm, b.rope]
        }
        (Some(_), None) => {
            return Err(invalid("qk_norm_rope", "`qk_norm_rope` is set but its buffers were not given").into());
        }
        (None, _) => [bufs.q, bufs.q, bufs.q],
    };
    let (new_k, new_v) = match (params.fused, bufs.new_k, bufs.new_v) {
        (true, Some(k), Some(v)) => {
            let bytes = 4 * params.new_kv_elements() as u64;
            check_buffer("new_k", k.size(), bytes)?;
            check_buffer("new_v", v.size(), bytes)?;
            (k, v)
        }
        (true, _, _) => return Err(invalid("fused", "fused mode needs the new_k and new_v buffers").into()),
        (false, _, _) => (bufs.q, bufs.q),
    };
    let block_tables = match (params.paging, bufs.block_tables) {
        (Some(paging), Some(b)) => {
            check_buffer("block_tables", b.size(), 4 * (params.n_seqs * paging.pages_per_seq) as u64)?;
            b
        }
        (Some(_), None) => {
            return Err(invalid("block_tables", "`paging` is set but no block_tables buffer was given").into());
        }
        (None, _) => bufs.seq_lens,
    };

    let pipeline = split_pipeline(ctx, params, mutant)?;
    let mutant_id = mutant.map_or(0, |m| m as u32);
    let launch = params.launch(ctx.info());
    let l = &params.layout;
    // Paged: stride_seq is the page stride, capacity a sequence's, and the pool's pages follow.
    let (page_size, pages_per_seq, n_pages) =
        params.paging.map_or((0, 0, 0), |p| (l.capacity as u32, p.pages_per_seq as u32, l.n_seqs as u32));
    let push = words(&[
        params.n_queries as u32,
        params.n_q_heads as u32,
        params.n_kv_heads as u32,
        params.head_dim as u32,
        l.stride_seq as u32,
        l.stride_head as u32,
        l.stride_pos as u32,
        params.seq_capacity() as u32,
        params.scale.to_bits(),
        params.n_seqs as u32,
        chunk as u32,
        n_chunks as u32,
        params.window.unwrap_or(0) as u32,
        params.softcap.unwrap_or(0.0).to_bits(),
        u32::from(params.sinks) | (u32::from(merge && merge_in_split) << 1),
        params.qk_norm_rope.unwrap_or(0.0).to_bits(),
        page_size,
        pages_per_seq,
        n_pages,
    ]);
    let buffers = [
        bufs.q,
        bufs.seq_lens,
        bufs.k_cache,
        bufs.v_cache,
        bufs.out,
        bufs.partial_o,
        bufs.partial_ml,
        sinks,
        new_k,
        new_v,
        qk[0],
        qk[1],
        qk[2],
        bufs.counters,
        block_tables,
    ];
    // Head blocks of one chunk are adjacent in x, so their shared K/V reads meet in L2.
    let groups =
        [(n_chunks * launch.head_blocks) as u32, params.n_kv_heads as u32, (params.n_seqs * params.n_queries) as u32];
    rec.dispatch(&pipeline, &buffers, &push, groups, "decode_attention.split")?;
    if n_chunks == 1 {
        return Ok(None);
    }
    if !merge {
        let rows = params.n_seqs * params.n_queries * params.n_q_heads;
        let (o, ml) = (bufs.partial_o, bufs.partial_ml);
        return Ok(Some(Partials { o, ml, rows, chunks: n_chunks, head_dim: params.head_dim }));
    }
    if merge_in_split {
        return Ok(None);
    }

    rec.barrier();
    let spec = [(0, mutant_id)];
    let merge = ctx.pipeline(&PipelineDesc {
        shader: &shaders::ATTENTION_MERGE,
        bindings: 4,
        push_constant_bytes: 4 * MERGE_PUSH_WORDS as u32,
        spec: &spec,
    })?;
    let rows = (params.n_seqs * params.n_queries * params.n_q_heads) as u32;
    let max_x = ctx.info().max_workgroup_count[0];
    let (gx, gy) = grid_2d(u64::from(rows), u64::from(max_x));
    let (gx, gy) = (gx as u32, gy as u32);
    let push =
        words(&[rows, params.head_dim as u32, n_chunks as u32, params.n_q_heads as u32, u32::from(params.sinks)]);
    let buffers = [bufs.partial_o, bufs.partial_ml, bufs.out, sinks];
    rec.dispatch(&merge, &buffers, &push, [gx, gy, 1], "decode_attention.merge")?;
    Ok(None)
}

/// Storage buffers the split pipeline binds (the chunk counters, then the block tables, last).
const SPLIT_BINDINGS: u32 = 15;

/// The split pass's pipeline for `params` on this device (its variant and launch shape): what
/// [`record`] dispatches, and what a benchmark asks for the driver's statistics.
pub fn split_pipeline(
    ctx: &Context,
    params: &AttentionParams,
    mutant: Option<AttentionMutant>,
) -> Result<Arc<Pipeline>, KernelError> {
    let shader = match (params.dtype, params.fused, params.qk_norm_rope.is_some()) {
        (Dtype::F32, false, _) => &shaders::ATTENTION_SPLIT_F32,
        (Dtype::F16, false, _) => &shaders::ATTENTION_SPLIT_F16,
        (Dtype::Bf16, false, _) => &shaders::ATTENTION_SPLIT_BF16,
        (Dtype::F32, true, false) => &shaders::ATTENTION_SPLIT_F32_FUSED,
        (Dtype::F16, true, false) => &shaders::ATTENTION_SPLIT_F16_FUSED,
        (Dtype::Bf16, true, false) => &shaders::ATTENTION_SPLIT_BF16_FUSED,
        (Dtype::F32, true, true) => &shaders::ATTENTION_SPLIT_F32_FUSED_QK,
        (Dtype::F16, true, true) => &shaders::ATTENTION_SPLIT_F16_FUSED_QK,
        (Dtype::Bf16, true, true) => &shaders::ATTENTION_SPLIT_BF16_FUSED_QK,
        (Dtype::Q8_0, false, _) => &shaders::ATTENTION_SPLIT_Q8_0,
        (Dtype::Q8_0, true, _) => return Err(invalid("fused", "fused with q8_0 is not supported yet").into()),
    };
    let mutant_id = mutant.map_or(0, |m| m as u32);
    let launch = params.launch(ctx.info());
    let spec = [
        (0, mutant_id),
        (1, launch.lanes as u32),
        (2, launch.runs_per_lane as u32),
        (3, launch.heads as u32),
        (4, launch.positions_per_step as u32),
        (5, u32::from(launch.vector_loads)),
        (6, launch.workgroup_size as u32),
        (7, launch.merge_unroll as u32),
        (8, u32::from(params.paging.is_some())),
    ];
    Ok(ctx.pipeline(&PipelineDesc {
        shader,
        bindings: SPLIT_BINDINGS,
        push_constant_bytes: 4 * PUSH_WORDS as u32,
        spec: &spec,
    })?)
}

/// A chunk-counter buffer for `params` holding zeros (host-visible; device-local where the device
/// offers such memory).
pub fn zeroed_counters(ctx: &Arc<Context>, params: &AttentionParams) -> Result<Buffer, crate::gpu::GpuError> {
    let bytes = params.counters_bytes() as usize;
    Buffer::with_bytes(ctx, "attention.counters", &vec![0; bytes], crate::gpu::Location::Upload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::rng::Rng;
    use crate::cases::run::f32_bytes;
    use crate::cases::tolerance::{U, attention_element_bound};
    use crate::gpu::Location;
    use crate::reference::qwen3::{qk_norm_rope, rope_inv_freq};
    use crate::reference::{AttentionOptions, AttentionShape, PagedLayout, decode_attention_with, dtype};

    use crate::kernels::test_support::upload;

    const EPS: f32 = 1e-6;
    const THETA: f64 = 1e6;

    /// The `_qk` variants against the reference: q and the new K raw, the CPU reference applying
    /// `qk_norm_rope` (f64, rounded once) before attending over what the GPU wrote to the cache.
    ///
    /// Tolerance, derived: the GPU's normalised, rotated value of a pair (x0, x1) (each already
    /// normalised) differs from the exact one by ≤ η·(|x0| + |x1|), η = (D/2 + 12)·u: Σx² over D
    /// terms (D + 1)·u, mean and epsilon 2u, halved by the square root, inversesqrt 2 ULP (4u),
    /// two products 2u, the rotation's two products and sum 2u, and the reference's own two
    /// roundings 2u. The new K row in the cache may add the cache type's rounding, r·|y| (r = 0,
    /// 2⁻¹¹, 2⁻⁸), plus the f16 subnormal step. In attention the q error moves a score by
    /// ≤ η·S_a, S_a = scale·maxⱼ Σ_d a_d·|k_jd| with a_d the pair sums: it joins the score term of
    /// [`attention_element_bound`] as extra `max_abs_qk` of (D/2 + 12)/(D + 2)·S_a.
    #[test]
    fn an_unmerged_call_refuses_sinks() {
        let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
        let params = AttentionParams { sinks: true, ..AttentionParams::qwen3_decode(4, 2, 64, Dtype::F16, 300, EPS) };
        let b = Buffer::new(&ctx, "b", 1 << 20, Location::Device).expect("buffer");
        let bufs = AttentionBuffers {
            q: &b,
            seq_lens: &b,
            k_cache: &b,
            v_cache: &b,
            out: &b,
            partial_o: &b,
            partial_ml: &b,
            counters: &b,
            sinks: Some(&b),
            new_k: Some(&b),
            new_v: Some(&b),
            qk_norm_rope: None,
            block_tables: None,
        };
        let mut rec = Recorder::new(&ctx).expect("recorder");
        let e = record_unmerged(&mut rec, &ctx, &params, bufs, None).err().expect("refused").to_string();
        assert!(e.contains("sinks"), "{e}");
    }

    #[test]
    fn the_qk_norm_rope_prologue_matches_the_reference() {
        let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
        // (H, Hkv, D, dtype, seq_len, capacity): GQA 1, 2, 5 (Qwen3-14B), 8; head dims 32..256;
        // the first position; narrow and wide split layouts; one chunk and several, merged in the
        // split pass (on lavapipe up to 11 chunks, 10 of them visible in the last case).
        let cases: [QkCase; 7] = [
            (8, 8, 64, Dtype::F32, 37, 40),
            (4, 2, 32, Dtype::Bf16, 5, 9),
            (16, 8, 128, Dtype::F16, 1, 4),
            (16, 2, 128, Dtype::F16, 300, 310),
            (40, 8, 128, Dtype::Bf16, 700, 700),
            (8, 2, 256, Dtype::F32, 130, 1100),
            (16, 8, 64, Dtype::F16, 1200, 1300),
        ];
        for (i, case) in cases.iter().enumerate() {
            check_qk_case(&ctx, i, case, None, None).unwrap_or_else(|e| panic!("{e}"));
        }
        // Its power: the engine's prologue mutants fail a narrow and a wide case; dropping the
        // rescale of the merge (in the split pass here) fails the cases with several visible
        // chunks (cases 3, 4 and 6).
        let must_fail: [(AttentionMutant, &[usize]); 3] = [
            (AttentionMutant::InterleavedRope, &[0, 4]),
            (AttentionMutant::SkipQkNorm, &[0, 4]),
            (AttentionMutant::MergeNoRescale, &[3, 4, 6]),
        ];
        for (m, which) in must_fail {
            for &i in which {
                assert!(check_qk_case(&ctx, i, &cases[i], None, Some(m)).is_err(), "{} survives case {i}", m.name());
            }
        }
        assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
    }

    /// The same prologue over a paged cache (token-major pages, the table reversed, a spare page):
    /// the new K/V row lands through the table and the output matches the reference over the
    /// gathered cache; chunk boundaries (multiples of 64) fall inside pages of 48.
    #[test]
    fn the_qk_norm_rope_prologue_matches_the_reference_through_block_tables() {
        let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
        let cases: [(QkCase, usize); 4] = [
            ((8, 8, 64, Dtype::F32, 37, 40), 8),
            ((4, 2, 32, Dtype::Bf16, 17, 32), 16),
            ((16, 2, 128, Dtype::F16, 300, 336), 48),
            ((16, 8, 64, Dtype::F16, 1200, 1280), 64),
        ];
        for (i, (case, page_size)) in cases.iter().enumerate() {
            check_qk_case(&ctx, i, case, Some(*page_size), None).unwrap_or_else(|e| panic!("{e}"));
        }
        let m = AttentionMutant::PageIndexOffByOne;
        assert!(check_qk_case(&ctx, 2, &cases[2].0, Some(cases[2].1), Some(m)).is_err(), "{} survives", m.name());
        assert_eq!(
            check_qk_case(&ctx, 2, &cases[2].0, None, Some(m)),
            Ok(()),
            "{} changes a contiguous call",
            m.name()
        );
        assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
    }

    /// (H, Hkv, D, K/V dtype, seq_len, capacity).
    type QkCase = (usize, usize, usize, Dtype, usize, usize);

    /// One case of [`the_qk_norm_rope_prologue_matches_the_reference`]: the first difference
    /// beyond the bound, if any. With `page_size` the cache is a pool of token-major pages of that
    /// many positions (`capacity` a multiple of it), listed in reverse, and one spare page.
    fn check_qk_case(
        ctx: &Arc<Context>,
        case: usize,
        &(hq, hkv, d, kv, len, capacity): &QkCase,
        page_size: Option<usize>,
        mutant: Option<AttentionMutant>,
    ) -> Result<(), String> {
        macro_rules! ensure {
            ($cond:expr, $($msg:tt)*) => {
                let holds: bool = $cond; // false for NaN comparisons too
                if !holds {
                    return Err(format!($($msg)*));
                }
            };
        }
        let what = format!("h{hq}:kv{hkv}:d{d}:{}:len{len}", kv.name());
        let mut rng = Rng::stream(case as u64, "qk_norm_rope");
        let mut normal =
            |n: usize, sd: f64, mean: f64| -> Vec<f32> { (0..n).map(|_| (mean + sd * rng.normal()) as f32).collect() };
        let (q, new_k, new_v) = (normal(hq * d, 2.0, 0.0), normal(hkv * d, 2.0, 0.5), normal(hkv * d, 1.0, 0.0));
        let (q_norm, k_norm) = (normal(d, 0.5, 1.0), normal(d, 0.5, 1.0));
        let mut params = AttentionParams::qwen3_decode(hq, hkv, d, kv, capacity, EPS);
        // Paged: pages n − 1 .. 1 in table order, page 0 spare.
        let paged = page_size.map(|ps| {
            let pages = capacity / ps;
            let table: Vec<u32> = (1..=pages as u32).rev().collect();
            PagedLayout::token_major(hkv, d, 0, ps, pages + 1, vec![table])
        });
        if let Some(paged) = &paged {
            let ps = paged.page_size;
            params.layout =
                CacheLayout { n_seqs: paged.n_pages, capacity: ps, stride_seq: paged.stride_page, ..params.layout };
            params.paging = Some(Paging { pages_per_seq: capacity / ps });
        }
        let layout = params.layout;
        // The position element i of the cache holds (none in a spare page).
        let position = |i: usize| match &paged {
            Some(paged) => {
                let (page, slot) = (i / paged.stride_page, (i % paged.stride_page) / paged.stride_pos);
                let entry = paged.block_tables[0].iter().position(|&p| p as usize == page);
                entry.map(|e| e * paged.page_size + slot)
            }
            None => Some((i / layout.stride_pos) % capacity),
        };
        let elements = layout.min_elements();
        let size = kv.size();
        let mut cache_init = |seed: f64| -> Vec<u8> {
            let mut bytes = vec![0u8; elements * size];
            let values = normal(elements, seed, 0.0);
            for (i, &x) in values.iter().enumerate() {
                // The slot being written and spare pages hold NaN: the kernel must not read them.
                let unread = position(i).is_none_or(|pos| pos == len - 1);
                let bits = if unread { dtype::encode(kv, f32::NAN) } else { dtype::encode(kv, x) };
                dtype::store(kv, &mut bytes, i, bits);
            }
            bytes
        };
        let (k_init, v_init) = (cache_init(1.0), cache_init(1.0));

        let up = |name: &str, bytes: &[u8]| upload(ctx, name, bytes, Location::Upload);
        let (qb, kb, vb) = (up("q", &f32_bytes(&q)), up("new_k", &f32_bytes(&new_k)), up("new_v", &f32_bytes(&new_v)));
        let (qn, kn) = (up("q_norm", &f32_bytes(&q_norm)), up("k_norm", &f32_bytes(&k_norm)));
        let rope = up("rope", &crate::engine::rope_table(THETA, d, capacity));
        let lens = up("seq_lens", &words(&[len as u32]));
        let k_cache = upload(ctx, "k_cache", &k_init, Location::Readback);
        let v_cache = upload(ctx, "v_cache", &v_init, Location::Readback);
        let out = upload(ctx, "out", &f32_bytes(&vec![f32::NAN; hq * d]), Location::Readback);
        let po = Buffer::new(ctx, "partial_o", params.partial_o_bytes(ctx.info()), Location::Device).expect("buffer");
        let pml =
            Buffer::new(ctx, "partial_ml", params.partial_ml_bytes(ctx.info()), Location::Device).expect("buffer");
        let counters = zeroed_counters(ctx, &params).expect("buffer");
        let tables = paged.as_ref().map(|paged| up("block_tables", &words(&paged.block_tables[0])));
        let mut rec = Recorder::new(ctx).expect("recorder");
        let bufs = AttentionBuffers {
            q: &qb,
            seq_lens: &lens,
            k_cache: &k_cache,
            v_cache: &v_cache,
            out: &out,
            partial_o: &po,
            partial_ml: &pml,
            counters: &counters,
            sinks: None,
            new_k: Some(&kb),
            new_v: Some(&vb),
            qk_norm_rope: Some(QkNormRope { q_norm: &qn, k_norm: &kn, rope: &rope }),
            block_tables: tables.as_ref(),
        };
        record(&mut rec, ctx, &params, bufs, mutant).expect(&what);
        rec.submit().expect("submit");

        // The reference's q and new K: normalised and rotated at position len − 1.
        let pos = len - 1;
        let inv_freq = rope_inv_freq(THETA, d);
        let prologue = |raw: &[f32], w: &[f32]| -> (Vec<f32>, Vec<f64>) {
            let mut rotated = raw.to_vec();
            let mut pair_sums = vec![0.0; raw.len()];
            for (h, head) in rotated.chunks_exact_mut(d).enumerate() {
                let x = &raw[h * d..][..d];
                let ms = x.iter().map(|&e| f64::from(e).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + f64::from(EPS)).sqrt();
                let normed: Vec<f64> = x.iter().zip(w).map(|(&e, &w)| f64::from(e) * r * f64::from(w)).collect();
                for i in 0..d {
                    pair_sums[h * d + i] = normed[i % (d / 2)].abs() + normed[i % (d / 2) + d / 2].abs();
                }
                qk_norm_rope(head, w, f64::from(EPS), pos, &inv_freq);
            }
            (rotated, pair_sums)
        };
        let (q_ref, q_pairs) = prologue(&q, &q_norm);
        let (k_ref, k_pairs) = prologue(&new_k, &k_norm);
        let eta = (d as f64 / 2.0 + 12.0) * U;
        let r = match kv {
            Dtype::F32 => 0.0,
            Dtype::F16 => 2f64.powi(-11),
            Dtype::Bf16 => 2f64.powi(-8),
            Dtype::Q8_0 => unreachable!("the _qk variants refuse q8_0"),
        };

        // The cache: the new K row within the bound, the new V row exact, the rest untouched.
        let (k_gpu, v_gpu) = (k_cache.read().expect("read"), v_cache.read().expect("read"));
        let at = |i: usize, bytes: &[u8]| dtype::decode(kv, dtype::load(kv, bytes, i));
        for i in 0..elements {
            let (p, rest) = (position(i), i % layout.stride_pos);
            let (h, dim) = (rest / d, rest % d);
            if p == Some(pos) && rest < hkv * d {
                let (got, want) = (f64::from(at(i, &k_gpu)), f64::from(k_ref[h * d + dim]));
                let slack = eta * k_pairs[h * d + dim];
                let bound = slack + r * (want.abs() + slack) + 2f64.powi(-25);
                ensure!((got - want).abs() <= bound, "{what}: new K[{h}][{dim}] = {got}, reference {want}");
                let v_want = dtype::encode(kv, new_v[h * d + dim]);
                ensure!(dtype::load(kv, &v_gpu, i) == v_want, "{what}: new V[{h}][{dim}]");
            } else {
                ensure!(dtype::load(kv, &k_gpu, i) == dtype::load(kv, &k_init, i), "{what}: K element {i} changed");
                ensure!(dtype::load(kv, &v_gpu, i) == dtype::load(kv, &v_init, i), "{what}: V element {i} changed");
            }
        }

        // The output against the reference over the cache the GPU wrote.
        let decoded = |bytes: &[u8]| -> Vec<f32> { (0..elements).map(|i| at(i, bytes)).collect() };
        let (k_all, v_all) = (decoded(&k_gpu), decoded(&v_gpu));
        // The reference reads the cache gathered through the table (a contiguous head-major one).
        let ((k_all, view), (v_all, _)) = match &paged {
            Some(paged) => (paged.gather(&k_all, capacity), paged.gather(&v_all, capacity)),
            None => ((k_all, layout), (v_all, layout)),
        };
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: hq, n_kv_heads: hkv, head_dim: d };
        let scale = f64::from(params.scale);
        let want =
            decode_attention_with(&shape, &q_ref, &k_all, &v_all, &view, &[len], scale, &AttentionOptions::default());
        let got: Vec<f32> =
            out.read().expect("read").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let ratio = hq / hkv;
        for h in 0..hq {
            let g = h / ratio;
            let row = |j: usize| (0..d).map(move |dim| view.offset(0, g, j, dim));
            let (mut s, mut s_a, mut v_max) = (0f64, 0f64, 0f64);
            for j in 0..len {
                let (mut dot, mut dot_a) = (0.0, 0.0);
                for (dim, i) in row(j).enumerate() {
                    dot += (f64::from(q_ref[h * d + dim]) * f64::from(k_all[i])).abs();
                    dot_a += q_pairs[h * d + dim] * f64::from(k_all[i]).abs();
                    v_max = v_max.max(f64::from(v_all[i]).abs());
                }
                (s, s_a) = (s.max(scale * dot), s_a.max(scale * dot_a));
            }
            let qk = s + (d as f64 / 2.0 + 12.0) / (d as f64 + 2.0) * s_a;
            let bound = attention_element_bound(len, d, qk, v_max, None);
            for dim in 0..d {
                let (o, e) = (f64::from(got[h * d + dim]), want[[0, 0, h, dim]]);
                ensure!((o - e).abs() <= bound, "{what}: out[{h}][{dim}] = {o}, reference {e}, bound {bound:e}");
            }
        }
        Ok(())
    }
}
