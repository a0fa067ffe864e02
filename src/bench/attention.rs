//! Decode-attention benchmark: the time per call of [`kernels::attention::record`] (split pass
//! and merge, everything one call records) at a decode shape, in one of three modes
//! ([`Mode`]): attention alone, KV append then attention (two kernels and a barrier), or the fused
//! append+attend path.
//!
//! Bytes per call are K+V read once, 2 · Hkv · D · dtype size · kv per sequence, summed over the
//! batch, the same in every mode (ANCHORS.md's definition), so modes compare by time alone. Q,
//! the output, the split-K partials and new K/V are small and not counted.
//!
//! Every call of a timing reads K/V from one of `copies` identical copies, in rotation, so that
//! the copies together span at least twice [`ASSUMED_LLC_BYTES`] and no call finds its K/V in the
//! last-level cache left by an earlier one (H100: 50 MiB L2; AMD parts with a larger Infinity
//! Cache need `llc_bytes` raised). Q, `seq_lens`, the output and the partials are shared by all
//! calls, as they would be in a decode step. Every sequence of a batch has length `kv` and the
//! cache capacity is exactly `kv` (no padding).

use std::sync::Arc;

use crate::gpu::{Buffer, Context, Location, PipelineStatistic};
use crate::kernels::attention::{self, AttentionBuffers, AttentionParams};
use crate::kernels::kv_append::{self, AppendBuffers, AppendParams};
use crate::kernels::{CacheLayout, Dtype, Paging};

use super::anchors::{GgmlAnchor, ggml_anchor};
use super::timing::{Between, Timing, TimingConfig, time_calls};
use super::upload::{device_buffer, device_copies, finite_bytes};
use super::{MIB, Result, gb_per_s};

/// The last-level cache size assumed when deciding how many K/V copies to rotate over.
pub const ASSUMED_LLC_BYTES: u64 = 64 * MIB;
/// Most K/V copies a rotation uses (tiny shapes stop here, below the working-set target).
pub const MAX_COPIES: usize = 256;
/// Cache lengths of the Qwen3 shapes in the default set.
pub const QWEN3_KV: [usize; 4] = [512, 2048, 8192, 32768];

/// One decode-attention problem to time.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeShape {
    /// Where the shape comes from: `ggml-anchor`, `qwen3-0.6b`, `qwen3-8b` (comma-separated when
    /// several sets share it), or `custom`.
    pub source: String,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Cache length per sequence.
    pub kv: usize,
    /// Cache capacity per sequence (positions allocated, at least `kv`; the split-K chunks are
    /// sized for it).
    pub capacity: usize,
    pub dtype: Dtype,
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence (the new tokens of the fused and append modes).
    pub n_queries: usize,
}

impl DecodeShape {
    /// A batch-1, one-query shape.
    pub fn decode(source: &str, n_q_heads: usize, n_kv_heads: usize, head_dim: usize, kv: usize, dtype: Dtype) -> Self {
        DecodeShape {
            source: source.to_string(),
            n_q_heads,
            n_kv_heads,
            head_dim,
            kv,
            capacity: kv,
            dtype,
            batch: 1,
            n_queries: 1,
        }
    }

    /// Bytes of K+V read once: 2 · Hkv · D · dtype size · kv · batch.
    pub fn kv_bytes(&self) -> u64 {
        (2 * self.dtype.cache_bytes(self.n_kv_heads * self.head_dim * self.kv * self.batch)) as u64
    }

    /// The shape in `--shape` syntax, e.g. `h32:kv8:d128:len4096:f16` (`:batch{B}` and `:q{N}`
    /// only when not 1, `:cap{C}` only when not the length).
    pub fn spec(&self) -> String {
        let mut s =
            format!("h{}:kv{}:d{}:len{}:{}", self.n_q_heads, self.n_kv_heads, self.head_dim, self.kv, self.dtype);
        if self.batch != 1 {
            s.push_str(&format!(":batch{}", self.batch));
        }
        if self.n_queries != 1 {
            s.push_str(&format!(":q{}", self.n_queries));
        }
        if self.capacity != self.kv {
            s.push_str(&format!(":cap{}", self.capacity));
        }
        s
    }

    /// Parses `h{H}:kv{Hkv}:d{D}:len{L}[:dtype][:batch{B}][:q{N}][:cap{C}]` (fields in any order;
    /// `b{B}` for `batch{B}`; the dtype is `f32`, `f16`, `bf16` or `q8_0`, else `default_dtype`; the
    /// capacity is at least the length, and the length by default).
    pub fn parse(spec: &str, default_dtype: Dtype) -> Result<DecodeShape, String> {
        let mut fields: [Option<usize>; 7] = [None; 7]; // h, kv, d, len, batch, q, cap
        const NAMES: [&str; 7] = ["h", "kv", "d", "len", "batch", "q", "cap"];
        let mut dtype = None;
        for token in spec.split(':').map(str::trim) {
            if let Some(d) = Dtype::ALL.into_iter().chain([Dtype::Q8_0]).find(|d| d.name() == token) {
                if dtype.replace(d).is_some() {
                    return Err(format!("shape `{spec}`: the dtype is given twice"));
                }
                continue;
            }
            // Longest prefixes first: `batch` before `b`, `kv` before `h`/`d`.
            let (field, digits) =
                [("batch", 4), ("len", 3), ("cap", 6), ("kv", 1), ("b", 4), ("h", 0), ("d", 2), ("q", 5)]
                    .into_iter()
                    .find_map(|(prefix, field)| token.strip_prefix(prefix).map(|rest| (field, rest)))
                    .ok_or_else(|| {
                        format!(
                            "shape `{spec}`: cannot read `{token}`; expected h{{H}}:kv{{Hkv}}:d{{D}}:len{{L}} \
                         with optional :f32|:f16|:bf16, :batch{{B}}, :q{{N}}, :cap{{C}}"
                        )
                    })?;
            let value: usize = digits.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                format!("shape `{spec}`: `{token}` needs a positive integer after `{}`", NAMES[field])
            })?;
            if fields[field].replace(value).is_some() {
                return Err(format!("shape `{spec}`: `{}` is given twice", NAMES[field]));
            }
        }
        let need = |i: usize| fields[i].ok_or_else(|| format!("shape `{spec}`: `{}{{N}}` is missing", NAMES[i]));
        let kv = need(3)?;
        let capacity = fields[6].unwrap_or(kv);
        if capacity < kv {
            return Err(format!("shape `{spec}`: the capacity (cap{capacity}) is below the length (len{kv})"));
        }
        Ok(DecodeShape {
            source: "custom".to_string(),
            n_q_heads: need(0)?,
            n_kv_heads: need(1)?,
            head_dim: need(2)?,
            kv,
            capacity,
            dtype: dtype.unwrap_or(default_dtype),
            batch: fields[4].unwrap_or(1),
            n_queries: fields[5].unwrap_or(1),
        })
    }

    /// ggml's figure for this shape (ANCHORS.md), for f16, batch-1, one-query shapes in its table.
    pub fn ggml_anchor(&self) -> Option<&'static GgmlAnchor> {
        if self.dtype != Dtype::F16 || self.batch != 1 || self.n_queries != 1 || self.capacity != self.kv {
            return None;
        }
        ggml_anchor(self.n_q_heads, self.n_kv_heads, self.head_dim, self.kv)
    }

    fn same_problem(&self, other: &DecodeShape) -> bool {
        DecodeShape { source: String::new(), ..self.clone() } == DecodeShape { source: String::new(), ..other.clone() }
    }
}

/// Appends `shape`, or merges its source into an equal shape already listed.
fn push_unique(shapes: &mut Vec<DecodeShape>, shape: DecodeShape) {
    match shapes.iter_mut().find(|s| s.same_problem(&shape)) {
        Some(s) => s.source = format!("{},{}", s.source, shape.source),
        None => shapes.push(shape),
    }
}

/// Qwen3-0.6B (16 q / 8 kv heads) and Qwen3-8B (32 q / 8 kv), head dim 128.
const QWEN3: [(&str, usize, usize, usize); 2] = [("qwen3-0.6b", 16, 8, 128), ("qwen3-8b", 32, 8, 128)];

/// The default set: every ANCHORS.md throughput row, then the Qwen3-0.6B and Qwen3-8B attention
/// shapes at [`QWEN3_KV`] (a shape in both sets is listed once, with both sources).
pub fn default_shapes(dtype: Dtype) -> Vec<DecodeShape> {
    let mut shapes = Vec::new();
    for a in super::anchors::GGML_FLASH_ATTN {
        push_unique(
            &mut shapes,
            DecodeShape::decode("ggml-anchor", a.n_q_heads(), a.n_kv_heads, a.head_dim, a.kv, dtype),
        );
    }
    for (name, h, hkv, d) in QWEN3 {
        for kv in QWEN3_KV {
            push_unique(&mut shapes, DecodeShape::decode(name, h, hkv, d, kv, dtype));
        }
    }
    shapes
}

/// The quick set (CPU drivers such as lavapipe, smoke runs): both Qwen3 models at kv 512 and
/// Qwen3-8B at 2048 — short enough for a CPU driver to finish in well under a minute.
pub fn quick_shapes(dtype: Dtype) -> Vec<DecodeShape> {
    let mut shapes = Vec::new();
    for (name, h, hkv, d) in QWEN3 {
        push_unique(&mut shapes, DecodeShape::decode(name, h, hkv, d, 512, dtype));
    }
    push_unique(&mut shapes, DecodeShape::decode("qwen3-8b", 32, 8, 128, 2048, dtype));
    shapes
}

/// What one call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decode attention over the cache (the new tokens already in it).
    Attention,
    /// KV append of the `n_queries` new tokens, a barrier, then attention: the unfused path.
    AppendThenAttend,
    /// The fused path: attention that appends the new tokens in the same pass.
    Fused,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Attention => "attention",
            Mode::AppendThenAttend => "append+attend",
            Mode::Fused => "fused",
        }
    }
}

/// Cache layout of the benchmark (no padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// `[seq][kv head][pos][dim]`, as ggml's test-backend-ops lays out K/V.
    HeadMajor,
    /// `[seq][pos][kv head][dim]`, as a llama.cpp-style KV cache stores tokens.
    TokenMajor,
}

/// Settings shared by every shape of a run.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct AttentionBenchConfig {
    pub timing: TimingConfig,
    pub layout: LayoutKind,
    /// Positions per split-K chunk; `None`: the kernel's automatic choice.
    pub split_chunk: Option<usize>,
    /// A paged cache with pages of this many positions (block tables in a shuffled order, as an
    /// allocator's free list leaves them); `None`: contiguous.
    pub page_size: Option<usize>,
    /// Assumed last-level cache size; K/V rotate over copies spanning at least twice this.
    pub llc_bytes: u64,
}

/// One timed (shape, mode).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionMeasurement {
    pub shape: DecodeShape,
    pub mode: Mode,
    pub layout: LayoutKind,
    /// Pages of this many positions, or a contiguous cache.
    pub page_size: Option<usize>,
    /// Positions per split-K chunk and number of chunks (1: no merge pass).
    pub split_chunk: usize,
    pub split_chunks: usize,
    /// Bytes counted per call (K+V read once).
    pub kv_bytes: u64,
    /// K/V copies rotated over, and the bytes they span together.
    pub copies: usize,
    pub working_set_bytes: u64,
    pub timing: Timing,
    /// What the driver reports about the split pass's pipeline (registers per invocation and the
    /// like); empty where the device does not offer VK_KHR_pipeline_executable_properties.
    pub split_statistics: Vec<PipelineStatistic>,
}

impl AttentionMeasurement {
    /// Effective bandwidth at the median time.
    pub fn gbps(&self) -> f64 {
        gb_per_s(self.kv_bytes, self.timing.per_call.median_ns)
    }
}

/// How many copies of a `set_bytes` K+V set span at least `2 · llc_bytes` (at most
/// [`MAX_COPIES`]; 1 when one set already does).
pub fn rotation_copies(set_bytes: u64, llc_bytes: u64) -> usize {
    let target = 2 * llc_bytes;
    if set_bytes == 0 || set_bytes >= target {
        return 1;
    }
    (target.div_ceil(set_bytes) as usize).clamp(1, MAX_COPIES)
}

/// The kernel parameters for `shape` under `config` (fused mode for [`Mode::Fused`]).
pub fn params(shape: &DecodeShape, mode: Mode, config: &AttentionBenchConfig) -> AttentionParams {
    let (b, hkv, capacity, d) = (shape.batch, shape.n_kv_heads, shape.capacity, shape.head_dim);
    // A paged pool is a cache of pages: one "sequence" of page_size positions per page.
    let (seqs, positions, paging) = match config.page_size {
        Some(ps) => {
            let pages_per_seq = capacity.div_ceil(ps.max(1));
            (b * pages_per_seq, ps, Some(Paging { pages_per_seq }))
        }
        None => (b, capacity, None),
    };
    let layout = match config.layout {
        LayoutKind::HeadMajor => CacheLayout::head_major(seqs, hkv, positions, d, 0),
        LayoutKind::TokenMajor => CacheLayout::token_major(seqs, hkv, positions, d, 0),
    };
    AttentionParams {
        n_seqs: b,
        n_queries: shape.n_queries,
        n_q_heads: shape.n_q_heads,
        n_kv_heads: hkv,
        head_dim: d,
        dtype: shape.dtype,
        layout,
        scale: 1.0 / (d as f32).sqrt(),
        split_chunk: config.split_chunk,
        window: None,
        softcap: None,
        sinks: false,
        fused: mode == Mode::Fused,
        qk_norm_rope: None,
        paging,
    }
}

/// The block tables of a paged benchmark: every page of the pool once, in a fixed shuffled order.
pub fn block_tables(p: &AttentionParams) -> Vec<u32> {
    let n = p.layout.n_seqs;
    let mut ids: Vec<u32> = (0..n as u32).collect();
    let mut rng = crate::cases::rng::Rng::stream(1, "bench-pages");
    for i in (1..n).rev() {
        ids.swap(i, rng.below(i as u64 + 1) as usize);
    }
    ids
}

/// Everything a call of `shape` in `mode` is made of: kernel parameters and host copies of the
/// small inputs, checked against the kernels' contracts and the device.
struct Plan {
    attention: AttentionParams,
    append: AppendParams,
    seq_lens: Vec<u32>,
    starts: Vec<u32>,
    /// Paged runs: u32 `[B][pages_per_seq]`.
    block_tables: Option<Vec<u32>>,
}

fn plan(ctx: &Context, shape: &DecodeShape, mode: Mode, config: &AttentionBenchConfig) -> Result<Plan> {
    let attention = params(shape, mode, config);
    attention.validate(ctx)?;
    let seq_lens = vec![shape.kv as u32; shape.batch];
    attention.validate_seq_lens(&seq_lens)?;
    let append = AppendParams {
        n_seqs: shape.batch,
        n_new: shape.n_queries,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        dtype: shape.dtype,
        layout: attention.layout,
        paging: attention.paging,
    };
    let starts = vec![(shape.kv - shape.n_queries.min(shape.kv)) as u32; shape.batch];
    if mode == Mode::AppendThenAttend {
        append.validate(ctx)?;
        append.validate_starts(&starts)?;
    }
    let block_tables = attention.paging.map(|_| block_tables(&attention));
    if let Some(tables) = &block_tables {
        attention.validate_block_tables(tables)?;
        if mode == Mode::AppendThenAttend {
            append.validate_block_table_writes(tables, &starts)?;
        } else {
            attention.validate_block_table_writes(tables, &seq_lens)?;
        }
    }
    Ok(Plan { attention, append, seq_lens, starts, block_tables })
}

/// Checks that `shape` can run in `mode` on this device, without allocating anything (so a run
/// can reject a bad shape before it spends time on the others).
pub fn check(ctx: &Context, shape: &DecodeShape, mode: Mode, config: &AttentionBenchConfig) -> Result<()> {
    plan(ctx, shape, mode, config).map(|_| ())
}

/// Times `shape` in `mode`: uploads the data, rotates K/V copies, returns the per-call stats.
pub fn measure(
    ctx: &Arc<Context>,
    shape: &DecodeShape,
    mode: Mode,
    config: &AttentionBenchConfig,
    on_submit: &mut dyn FnMut(),
) -> Result<AttentionMeasurement> {
    measure_slowed(ctx, shape, mode, config, 0, on_submit)
}

/// [`measure`] with a deliberate slowdown, to prove that the throughput gate (`vkdecode gate
/// --slow-down-attention K`) catches a slower kernel: every call records the attention call
/// (split pass, and merge when split) `extra_passes` more times, each after a barrier and reading
/// the next K/V copy of the rotation (so the extra passes are memory traffic, not cache hits,
/// when there are several copies). Bytes counted stay those of one call, so the figures come out
/// about (1 + `extra_passes`)× slower. `extra_passes` 0 is [`measure`].
pub fn measure_slowed(
    ctx: &Arc<Context>,
    shape: &DecodeShape,
    mode: Mode,
    config: &AttentionBenchConfig,
    extra_passes: u32,
    on_submit: &mut dyn FnMut(),
) -> Result<AttentionMeasurement> {
    let Plan { attention: p, append, seq_lens, starts, block_tables } = plan(ctx, shape, mode, config)?;

    let cache_elements = p.layout.min_elements();
    let cache_bytes = shape.dtype.cache_bytes(cache_elements) as u64;
    let copies = rotation_copies(2 * cache_bytes, config.llc_bytes);
    let names: Vec<String> =
        (0..copies).flat_map(|c| [format!("bench.attention.k.{c}"), format!("bench.attention.v.{c}")]).collect();
    let caches = device_copies(ctx, &names, &finite_bytes(shape.dtype, cache_elements, 1))?;

    let q_elements = p.q_elements();
    let q = device_buffer(ctx, "bench.attention.q", &finite_bytes(Dtype::F32, q_elements, 2))?;
    let lens = device_buffer(ctx, "bench.attention.seq_lens", &crate::kernels::words(&seq_lens))?;
    let start = device_buffer(ctx, "bench.attention.start", &crate::kernels::words(&starts))?;
    let new_k = device_buffer(ctx, "bench.attention.new_k", &finite_bytes(Dtype::F32, p.new_kv_elements(), 3))?;
    let new_v = device_buffer(ctx, "bench.attention.new_v", &finite_bytes(Dtype::F32, p.new_kv_elements(), 4))?;
    let out = Buffer::new(ctx, "bench.attention.out", 4 * q_elements as u64, Location::Device)?;
    let partial_o = Buffer::new(ctx, "bench.attention.partial_o", p.partial_o_bytes(ctx.info()), Location::Device)?;
    let partial_ml = Buffer::new(ctx, "bench.attention.partial_ml", p.partial_ml_bytes(ctx.info()), Location::Device)?;
    let counters = attention::zeroed_counters(ctx, &p)?;
    let tables = match &block_tables {
        Some(t) => Some(device_buffer(ctx, "bench.attention.block_tables", &crate::kernels::words(t))?),
        None => None,
    };
    let tables = tables.as_ref();

    let what = format!("attention {} ({})", shape.spec(), mode.name());
    let timing = time_calls(
        ctx,
        &what,
        config.timing,
        Between::Barrier,
        |rec, call| {
            let c = (call % copies as u64) as usize;
            let (k_cache, v_cache) = (&caches[2 * c], &caches[2 * c + 1]);
            if mode == Mode::AppendThenAttend {
                let bufs = AppendBuffers {
                    new_k: &new_k,
                    new_v: &new_v,
                    start: &start,
                    k_cache,
                    v_cache,
                    block_tables: tables,
                };
                kv_append::record(rec, ctx, &append, bufs, None)?;
                rec.barrier();
            }
            let fused = mode == Mode::Fused;
            let bufs = |k_cache, v_cache| AttentionBuffers {
                q: &q,
                seq_lens: &lens,
                k_cache,
                v_cache,
                out: &out,
                partial_o: &partial_o,
                partial_ml: &partial_ml,
                counters: &counters,
                sinks: None,
                new_k: fused.then_some(&new_k),
                new_v: fused.then_some(&new_v),
                qk_norm_rope: None,
                block_tables: tables,
            };
            attention::record(rec, ctx, &p, bufs(k_cache, v_cache), None)?;
            for pass in 1..=u64::from(extra_passes) {
                let c = ((call + pass) % copies as u64) as usize;
                rec.barrier();
                attention::record(rec, ctx, &p, bufs(&caches[2 * c], &caches[2 * c + 1]), None)?;
            }
            Ok(())
        },
        on_submit,
    )?;
    let (split_chunk, split_chunks) = p.split(ctx.info());
    Ok(AttentionMeasurement {
        shape: shape.clone(),
        mode,
        layout: config.layout,
        page_size: config.page_size,
        split_chunk,
        split_chunks,
        kv_bytes: shape.kv_bytes(),
        copies,
        working_set_bytes: copies as u64 * 2 * cache_bytes,
        timing,
        split_statistics: ctx.pipeline_statistics(&*attention::split_pipeline(ctx, &p, None)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_in_any_order_and_print_back() {
        let s = DecodeShape::parse("h32:kv8:d128:len4096", Dtype::F16).unwrap();
        assert_eq!(s, DecodeShape::decode("custom", 32, 8, 128, 4096, Dtype::F16));
        assert_eq!(s.spec(), "h32:kv8:d128:len4096:f16");
        let t = DecodeShape::parse("len100:bf16:d64:q2:kv2:h4:b3", Dtype::F16).unwrap();
        assert_eq!((t.n_q_heads, t.n_kv_heads, t.head_dim, t.kv, t.batch, t.n_queries), (4, 2, 64, 100, 3, 2));
        assert_eq!(t.dtype, Dtype::Bf16);
        assert_eq!(t.spec(), "h4:kv2:d64:len100:bf16:batch3:q2");
        assert_eq!(DecodeShape::parse(&t.spec(), Dtype::F32).unwrap(), t);
        let c = DecodeShape::parse("h8:kv8:d128:len1000:cap4096", Dtype::F16).unwrap();
        assert_eq!((c.kv, c.capacity, c.spec()), (1000, 4096, "h8:kv8:d128:len1000:f16:cap4096".to_string()));
        assert!(DecodeShape::parse("h8:kv8:d128:len1000:cap999", Dtype::F16).unwrap_err().contains("cap999"));
    }

    #[test]
    fn bad_shapes_say_what_is_wrong() {
        let err = |s: &str| DecodeShape::parse(s, Dtype::F16).unwrap_err();
        assert!(err("h32:kv8:d128").contains("`len{N}` is missing"), "{}", err("h32:kv8:d128"));
        assert!(err("h32:kv8:d128:len0").contains("positive integer"));
        assert!(err("h32:kv8:d128:len9:x3").contains("cannot read `x3`"));
        assert!(err("h32:h8:d128:len9").contains("given twice"));
        assert!(err("h32:kv8:d128:len9:f16:f32").contains("dtype is given twice"));
    }

    #[test]
    fn bytes_are_k_and_v_read_once() {
        // ANCHORS.md: 2·n_kv_heads·head_dim·2 B·kv.
        let s = DecodeShape::decode("x", 32, 8, 128, 4096, Dtype::F16);
        assert_eq!(s.kv_bytes(), 2 * 8 * 128 * 2 * 4096);
        assert_eq!(DecodeShape { batch: 3, ..s.clone() }.kv_bytes(), 3 * s.kv_bytes());
    }

    #[test]
    fn the_default_set_has_every_anchor_once_and_both_qwen3_models() {
        let shapes = default_shapes(Dtype::F16);
        let anchored = shapes.iter().filter(|s| s.ggml_anchor().is_some()).count();
        assert_eq!(anchored, super::super::anchors::GGML_FLASH_ATTN.len());
        // Qwen3-8B at kv 8192 is also an anchor row: listed once with both sources.
        let shared: Vec<_> = shapes.iter().filter(|s| s.source.contains(',')).collect();
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].source, "ggml-anchor,qwen3-8b");
        assert_eq!(shapes.len(), 8 + 2 * QWEN3_KV.len() - 1);
    }

    /// Runs on the device `VKDECODE_DEVICE` selects (lavapipe in CI), with its own context so the
    /// validation messages it checks (under `VKDECODE_VALIDATION=1`) are its own.
    #[test]
    fn every_mode_times_on_the_device_with_the_expected_commands_per_call() {
        let ctx = Arc::new(Context::new(&crate::gpu::ContextOptions::from_env()).expect("a Vulkan device"));
        // 128 KiB of K+V (2 heads × 256 positions × 64 × 2 B, twice) and a 96 KiB "cache":
        // two copies in rotation; chunks of 64 give 4 split chunks, merged in the split pass.
        let shape = DecodeShape::parse("h4:kv2:d64:len256:f16:q2", Dtype::F16).unwrap();
        let config = AttentionBenchConfig {
            timing: TimingConfig { iters: 3, repeats: 2, warmup: 1 },
            layout: LayoutKind::TokenMajor,
            split_chunk: Some(64),
            page_size: None,
            llc_bytes: 96 << 10,
        };
        for (mode, dispatches, barriers) in
            [(Mode::Attention, 1, 0), (Mode::AppendThenAttend, 2, 1), (Mode::Fused, 1, 0)]
        {
            let mut submits = 0;
            let m = measure(&ctx, &shape, mode, &config, &mut || submits += 1).unwrap();
            assert_eq!(submits, 3, "{mode:?}: one warm-up and two timed submits");
            assert_eq!((m.copies, m.split_chunks), (2, 4), "{mode:?}");
            let c = m.timing.per_call_counters;
            assert_eq!((c.dispatches, c.barriers, c.copies), (dispatches, barriers, 0), "{mode:?}");
            let t = m.timing.per_call;
            assert!(t.samples == 2 && t.min_ns > 0.0 && t.min_ns <= t.median_ns && t.median_ns <= t.max_ns, "{t:?}");
        }
        assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
    }

    #[test]
    fn small_sets_rotate_until_they_span_twice_the_cache() {
        let llc = ASSUMED_LLC_BYTES;
        assert_eq!(rotation_copies(2 * llc, llc), 1);
        assert_eq!(rotation_copies(llc, llc), 2);
        assert_eq!(rotation_copies(3 * MIB, llc), 43); // 43 · 3 MiB ≥ 128 MiB
        assert_eq!(rotation_copies(1024, llc), MAX_COPIES);
    }
}
