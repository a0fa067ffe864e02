//! The layer kernels of the Qwen3 decode engine: embedding row, RMSNorm, matvec (with fused
//! RMSNorm and SwiGLU), q/k-norm + RoPE, GPU argmax with the decode-state update, and random weight fill.
//!
//! Weights are read in their stored type (the shader variant), activations are f32. Every
//! function checks its shapes against the buffers it is given before recording, so a wrong size
//! is a [`ParamError`] naming the operand, never an out-of-bounds access on the GPU.

use std::sync::Arc;

use crate::gpu::{Buffer, Context, Location, PipelineDesc, Recorder, Shader};
use crate::shaders;

use super::attention::Partials;
use super::{Dtype, KernelError, ParamError, grid_2d, invalid, words};

/// Invocations per workgroup of the norm, embed and fill shaders.
const WG: u64 = 256;
/// The most invocations of a matvec workgroup.
const MATVEC_WG: u64 = 128;
/// The largest `rows_per_wg` the matvec shader takes.
const MATVEC_MAX_ROWS: u64 = 8;
/// Most weight loads a matvec invocation issues together (matvec.comp MAX_LOADS).
const MATVEC_BATCH_LOADS: u64 = 16;
/// Weight loads per invocation where a row is at most one load of each (its chunks fit the
/// workgroup): rows are added, batched, until each invocation issues this many together. H100,
/// Qwen3-0.6B step at ctx 512 (q/k/v 8 rows, gate/up 4 rows of each matrix, against one row per
/// workgroup unbatched): 1302 → 1254 µs/token; 16 loads (gate/up 8 rows) 1282.
const MATVEC_SHORT_ROW_LOADS: u64 = 8;
/// Matrices of at least this many rows (the vocabulary: the LM head) take [`MATVEC_MAX_ROWS`]
/// rows per workgroup: fewer, longer workgroups. H100, the LM head inside the decode step:
/// Qwen3-8B 468 → 434 µs/token (97% of the copy bandwidth), 0.6B 134 → 125 (16 loads an
/// invocation: 439 and 125; 8: 459 and 125). They also take the batched path (every load of a
/// batch issued before the products): 8B 434 → 411 µs/token, 0.6B 126 → 112.
const MATVEC_LARGE_ROWS: usize = 32768;
/// Logits per argmax workgroup (argmax.comp BLOCK).
pub const ARGMAX_BLOCK: usize = 1024;
/// Words of the decode state buffer: `[seq_len, token, prompt_len, sampled]`.
pub const STATE_WORDS: usize = 4;

/// A deliberate bug of the engine's layer kernels (mutants of the token-match suite). The wrong
/// GQA map and the q/k-norm + RoPE mutants live in the attention kernel
/// ([`super::attention::AttentionMutant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerMutant {
    /// RMSNorm multiplies by 1 instead of its weight.
    NormWeightIgnored = 4,
    /// A matvec merging attention's partials ([`X::Merged`]) sums the chunks without rescaling
    /// each by exp(m_c − M).
    MergeNoRescale = 6,
}

/// A weight matrix `[rows][cols]` in its stored type.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub buffer: &'a Buffer,
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
}

/// A weight vector `[len]` in its stored type.
#[derive(Clone, Copy)]
pub struct Vector<'a> {
    pub buffer: &'a Buffer,
    pub dtype: Dtype,
    pub len: usize,
}

fn check_size(name: &'static str, buffer: &Buffer, elements: usize, element_bytes: usize) -> Result<(), ParamError> {
    let need = elements as u64 * element_bytes as u64;
    if buffer.size() < need {
        return Err(invalid(name, format!("buffer `{}` holds {} bytes; {need} needed", buffer.name(), buffer.size())));
    }
    if elements > u32::MAX as usize {
        return Err(invalid(name, format!("{elements} elements exceed 32-bit indexing")));
    }
    Ok(())
}

fn variant(
    dtype: Dtype,
    f32: &'static Shader,
    f16: &'static Shader,
    bf16: &'static Shader,
) -> Result<&'static Shader, ParamError> {
    match dtype {
        Dtype::F32 => Ok(f32),
        Dtype::F16 => Ok(f16),
        Dtype::Bf16 => Ok(bf16),
        Dtype::Q8_0 => Err(invalid("dtype", "q8_0 weights are not supported by the layer kernels")),
    }
}

/// Bytes per element of a weight type: the float types only (q8_0 is a KV-cache type here).
fn element_bytes(name: &'static str, dtype: Dtype) -> Result<usize, ParamError> {
    if !dtype.is_float() {
        return Err(invalid(name, format!("{dtype} weights are not supported by the layer kernels")));
    }
    Ok(dtype.size())
}

fn spec_mutant(mutant: Option<LayerMutant>) -> [(u32, u32); 1] {
    [(0, mutant.map_or(0, |m| m as u32))]
}

/// 16-byte chunks of a weight row of `cols` elements (at least one).
fn row_chunks(cols: usize, dtype: Dtype) -> u64 {
    (cols * dtype.size()).div_ceil(16).max(1) as u64
}

/// matvec.comp's PATH: the code a pipeline runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MatvecPath {
    Row = 2,
    Scalar = 3,
    Batched = 4,
}

/// How a matvec dispatch is laid out (matvec.comp's specialization constants and grid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MatvecShape {
    /// Invocations per workgroup: they cover a row's 16-byte chunks (a power of two in 32..=128,
    /// at least a subgroup).
    wg: u64,
    /// Rows per workgroup (of each matrix, with SwiGLU).
    rows: u64,
    /// The batched path: every load of a batch issued before its products.
    batched: bool,
}

/// The layout of a product of `rows` rows in all (every matrix of the call) of `cols` columns,
/// `mats` matrices per row block (2 with SwiGLU):
/// - the LM head ([`MATVEC_LARGE_ROWS`] and over): [`MATVEC_MAX_ROWS`] rows, batched;
/// - rows that fit the workgroup (a row is one load of each invocation: Qwen3-0.6B's q/k/v and
///   gate/up): rows batched up to [`MATVEC_SHORT_ROW_LOADS`] loads an invocation;
/// - longer rows: one row per workgroup, four of its loads issued at a time. H100, Qwen3-0.6B
///   step at ctx 512: o_proj with one row against two, 1272 → 1236 µs/token; Qwen3-8B's
///   o_proj and down_proj with one row against four (for x reuse) unchanged;
/// - x merged from attention's partials ([`X::Merged`]): [`MATVEC_MERGED_ROWS`] rows, batched.
fn matvec_shape(cols: usize, dtype: Dtype, subgroup_size: u32, rows: usize, mats: u64, merged: bool) -> MatvecShape {
    let chunks = row_chunks(cols, dtype);
    let subgroup = u64::from(subgroup_size);
    let wg = chunks.next_power_of_two().clamp(subgroup.max(32), MATVEC_WG.max(subgroup));
    if merged {
        MatvecShape { wg, rows: MATVEC_MERGED_ROWS, batched: true }
    } else if rows >= MATVEC_LARGE_ROWS {
        MatvecShape { wg, rows: MATVEC_MAX_ROWS, batched: true }
    } else if chunks <= wg {
        MatvecShape { wg, rows: (MATVEC_SHORT_ROW_LOADS / mats).clamp(1, MATVEC_MAX_ROWS), batched: true }
    } else {
        MatvecShape { wg, rows: 1, batched: false }
    }
}

/// (chunk columns per batch, batches) of an invocation of the vector path: each invocation
/// covers `ceil(chunks / wg)` chunk columns of each of its `loads_per_column` rows, and issues the
/// loads of a whole batch together, at most [`MATVEC_BATCH_LOADS`] (matvec.comp MAX_LOADS).
fn load_batches(cols: usize, dtype: Dtype, wg: u64, loads_per_column: u64) -> (u64, u64) {
    let columns = row_chunks(cols, dtype).div_ceil(wg);
    let most = (MATVEC_BATCH_LOADS / loads_per_column).max(1);
    let batches = columns.div_ceil(most);
    (columns.div_ceil(batches), batches)
}

/// Most split-K chunks a matvec merges its x from ([`X::Merged`]; matvec.comp unrolls them).
pub const MATVEC_MAX_MERGE_CHUNKS: usize = 16;
/// Rows per workgroup of a matvec whose x is merged from attention's partials: every workgroup
/// merges all of x (chunks × the partials' bytes), so rows share that work. H100, Qwen3-0.6B's
/// o_proj in the step at ctx 512 (5 chunks), µs/token: one row per workgroup 1238, two 1215, four
/// 1222, eight 1252 (attention merging its own: 1233).
pub const MATVEC_MERGED_ROWS: u64 = 2;

/// Bytes of split-K partials the workgroups of a matvec over `rows` rows read in all when its x
/// is merged from partials of `partial_rows` rows × `chunks` × `head_dim` ([`X::Merged`]): each
/// workgroup reads every chunk's outputs and (m, l) pairs.
pub fn merged_x_reads(rows: usize, partial_rows: usize, chunks: usize, head_dim: usize) -> u64 {
    let per_workgroup = (partial_rows * chunks * (head_dim * 4 + 8)) as u64;
    (rows as u64).div_ceil(MATVEC_MERGED_ROWS) * per_workgroup
}

/// The vector a matvec multiplies.
#[derive(Clone, Copy)]
pub enum X<'a> {
    /// f32 `[cols]`.
    Vector(&'a Buffer),
    /// Decode attention's output, merged from its split-K partials as it is read (`rows ×
    /// head_dim` = cols): the engine's o_proj, so attention needs no merge of its own.
    Merged(Partials<'a>),
}

/// One matvec dispatch: `y_i = W_i·x` for up to three matrices sharing x (same columns and
/// element type), with the fusions of matvec.comp.
pub struct MatvecCall<'a> {
    pub x: X<'a>,
    /// Each matrix with its f32 output `[rows]`.
    pub outputs: Vec<(Matrix<'a>, &'a Buffer)>,
    /// RMS-normalise x first with this weight (`[cols]`, same type as the matrices) and eps.
    pub norm: Option<(Vector<'a>, f32)>,
    /// `y += W·x` (the residual stream).
    pub accumulate: bool,
    /// Exactly two matrices, gate and up: the first output gets `silu(gate·x)·(up·x)`.
    pub swiglu: bool,
    pub mutant: Option<LayerMutant>,
}

/// Records a [`MatvecCall`].
pub fn matvec<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    call: &MatvecCall<'a>,
    label: &str,
) -> Result<(), KernelError> {
    record_matvec(rec, ctx, call, label, false)
}

/// [`matvec`], with the batched path (matvec.comp BATCHED) for every matrix when
/// `force_batched` (the tests: each path must give the same products).
fn record_matvec<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    call: &MatvecCall<'a>,
    label: &str,
    force_batched: bool,
) -> Result<(), KernelError> {
    let Some(&(first, _)) = call.outputs.first() else {
        return Err(invalid("outputs", "a matvec needs at least one matrix").into());
    };
    if call.outputs.len() > 3 || (call.swiglu && call.outputs.len() != 2) {
        return Err(
            invalid("outputs", format!("{} matrices (1..=3, exactly 2 with swiglu)", call.outputs.len())).into()
        );
    }
    let (cols, dtype) = (first.cols, first.dtype);
    for (i, &(w, y)) in call.outputs.iter().enumerate() {
        if w.rows == 0 || w.cols != cols || w.dtype != dtype {
            return Err(invalid(
                "outputs",
                format!(
                    "matrix {i} is {}×{} {}; every matrix needs {cols} columns of {dtype} and at least one row",
                    w.rows, w.cols, w.dtype
                ),
            )
            .into());
        }
        check_size("w", w.buffer, w.rows * w.cols, element_bytes("w", dtype)?)?;
        check_size("y", y, w.rows, 4)?;
    }
    if call.swiglu && call.outputs[0].0.rows != call.outputs[1].0.rows {
        return Err(invalid("outputs", "gate and up must have the same rows").into());
    }
    let vec = (cols * dtype.size()).is_multiple_of(16);
    // (x's binding, the partials' (m, l) binding, chunks merged, elements of a partials row)
    let (x, x_ml, merge_chunks, head_dim) = match call.x {
        X::Vector(x) => {
            check_size("x", x, cols, 4)?;
            (x, x, 0, 0)
        }
        X::Merged(p) => {
            let per_chunk = 16 / dtype.size();
            if p.rows * p.head_dim != cols || p.head_dim == 0 || !p.head_dim.is_multiple_of(per_chunk) || !vec {
                return Err(invalid(
                    "x",
                    format!(
                        "partials of {} rows × {} dims for {cols} columns of {dtype}: rows × head_dim must be the \
                         columns, head_dim a multiple of {per_chunk}",
                        p.rows, p.head_dim
                    ),
                )
                .into());
            }
            if !(1..=MATVEC_MAX_MERGE_CHUNKS).contains(&p.chunks) {
                return Err(invalid("x", format!("{} chunks; 1..={MATVEC_MAX_MERGE_CHUNKS} merge", p.chunks)).into());
            }
            check_size("x", p.o, p.rows * p.chunks * p.head_dim, 4)?;
            check_size("x", p.ml, p.rows * p.chunks * 2, 4)?;
            (p.o, p.ml, p.chunks, p.head_dim)
        }
    };
    if let Some((nw, eps)) = call.norm {
        if nw.len != cols || nw.dtype != dtype {
            return Err(invalid("norm", format!("{} values of {}; {cols} of {dtype} needed", nw.len, nw.dtype)).into());
        }
        check_size("norm", nw.buffer, cols, dtype.size())?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(invalid("eps", format!("{eps} is not a finite non-negative number")).into());
        }
    }
    let rows: usize = call.outputs.iter().map(|(w, _)| w.rows).sum();
    let mats = if call.swiglu { 2 } else { 1 };
    let MatvecShape { wg, rows: rows_per_wg, batched } =
        matvec_shape(cols, dtype, ctx.info().subgroup_size, rows, mats, merge_chunks > 0);
    let shader = variant(dtype, &shaders::MATVEC_F32, &shaders::MATVEC_F16, &shaders::MATVEC_BF16)?;
    let batched = (force_batched || batched) && vec;
    // The one path this pipeline runs (matvec.comp PATH), so its code holds nothing else.
    let path = if batched {
        MatvecPath::Batched
    } else if vec && rows_per_wg == 1 {
        MatvecPath::Row
    } else {
        MatvecPath::Scalar
    };
    let mut spec = vec![
        spec_mutant(call.mutant)[0],
        (1, wg as u32),
        (7, path as u32),
        (8, call.outputs.len() as u32),
        (9, merge_chunks as u32),
    ];
    if batched {
        let (per_batch, batches) = load_batches(cols, dtype, wg, rows_per_wg * mats);
        spec.extend([(2, rows_per_wg as u32), (3, mats as u32), (4, per_batch as u32), (5, batches as u32), (6, 1)]);
    }
    let pipeline = ctx.pipeline(&PipelineDesc { shader, bindings: 9, push_constant_bytes: 32, spec: &spec })?;
    let flags = u32::from(call.accumulate)
        | (u32::from(vec) << 1)
        | (u32::from(call.norm.is_some()) << 2)
        | (u32::from(call.swiglu) << 3);
    let rows = |i: usize| call.outputs.get(i).map_or(0, |(w, _)| w.rows);
    let eps = call.norm.map_or(0.0, |(_, e)| e);
    let push = words(&[
        rows(0) as u32,
        rows(1) as u32,
        rows(2) as u32,
        cols as u32,
        rows_per_wg as u32,
        flags,
        eps.to_bits(),
        head_dim as u32,
    ]);
    // Unused bindings get a buffer the shader never reads in that mode.
    let w = |i: usize| call.outputs.get(i).map_or(first.buffer, |(m, _)| m.buffer);
    let y = |i: usize| call.outputs.get(i).map_or(call.outputs[0].1, |(_, y)| *y);
    let nw = call.norm.map_or(x, |(v, _)| v.buffer);
    let buffers = [w(0), w(1), w(2), x, y(0), y(1), y(2), nw, x_ml];
    let blocks: u64 = if call.swiglu {
        (rows(0) as u64).div_ceil(rows_per_wg)
    } else {
        (0..3).map(|i| (rows(i) as u64).div_ceil(rows_per_wg)).sum()
    };
    let (gx, gy) = grid_2d(blocks, u64::from(ctx.info().max_workgroup_count[0]));
    rec.dispatch(&pipeline, &buffers, &push, [gx as u32, gy as u32, 1], label)?;
    Ok(())
}

/// RMSNorm of `rows` f32 vectors of `weight.len` values: `out = x·rsqrt(mean(x²)+eps)·weight`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    x: &'a Buffer,
    weight: Vector<'a>,
    out: &'a Buffer,
    eps: f32,
    mutant: Option<LayerMutant>,
    label: &str,
) -> Result<(), KernelError> {
    let n = weight.len;
    if n == 0 {
        return Err(invalid("weight", "an RMSNorm over 0 values").into());
    }
    check_size("weight", weight.buffer, n, element_bytes("weight", weight.dtype)?)?;
    check_size("x", x, n, 4)?;
    check_size("out", out, n, 4)?;
    let shader = variant(weight.dtype, &shaders::RMSNORM_F32, &shaders::RMSNORM_F16, &shaders::RMSNORM_BF16)?;
    let spec = spec_mutant(mutant);
    let pipeline = ctx.pipeline(&PipelineDesc { shader, bindings: 3, push_constant_bytes: 12, spec: &spec })?;
    let push = words(&[n as u32, 1, eps.to_bits()]);
    rec.dispatch(&pipeline, &[x, weight.buffer, out], &push, [1, 1, 1], label)?;
    Ok(())
}

/// `x = table[state[1]]` widened to f32; table is `[vocab][hidden]`.
pub fn embed<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    state: &'a Buffer,
    table: Matrix<'a>,
    x: &'a Buffer,
) -> Result<(), KernelError> {
    check_size("state", state, STATE_WORDS, 4)?;
    check_size("embed_tokens", table.buffer, table.rows * table.cols, element_bytes("embed_tokens", table.dtype)?)?;
    check_size("x", x, table.cols, 4)?;
    let shader = variant(table.dtype, &shaders::EMBED_F32, &shaders::EMBED_F16, &shaders::EMBED_BF16)?;
    let pipeline = ctx.pipeline(&PipelineDesc { shader, bindings: 3, push_constant_bytes: 8, spec: &[] })?;
    let push = words(&[table.cols as u32, table.rows as u32]);
    let groups = (table.cols as u64).div_ceil(WG) as u32;
    rec.dispatch(&pipeline, &[state, table.buffer, x], &push, [groups, 1, 1], "embed")?;
    Ok(())
}

/// `out = v` widened to f32 (f32 `[v.len]`), through the embed kernel: `v` as the single row of a
/// table, `zero_state` a state buffer whose input id (word 1) is 0.
pub fn widen<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    zero_state: &'a Buffer,
    v: Vector<'a>,
    out: &'a Buffer,
) -> Result<(), KernelError> {
    embed(rec, ctx, zero_state, Matrix { buffer: v.buffer, dtype: v.dtype, rows: 1, cols: v.len }, out)
}

/// Bytes of the argmax's partial buffer for `n` logits: a (value, index) pair per workgroup,
/// then the workgroup counter.
pub fn argmax_partial_bytes(n: usize) -> u64 {
    ((n.div_ceil(ARGMAX_BLOCK) + 1) * 8) as u64
}

/// The argmax's partial buffer for `n` logits, zeroed (its counter must be zero between calls;
/// each call leaves it so).
pub fn zeroed_argmax_partial(ctx: &Arc<Context>, n: usize) -> Result<Buffer, crate::gpu::GpuError> {
    Buffer::with_bytes(ctx, "argmax.partial", &vec![0; argmax_partial_bytes(n) as usize], Location::Upload)
}

/// Greedy sampling of `n` f32 logits and the state update for the next step, in one dispatch
/// (the last workgroup to finish reduces the others' bests). `partial` comes from
/// [`zeroed_argmax_partial`]. `ids` holds `capacity` u32 token ids: the prompt at its positions,
/// and the kernel writes each sampled id at the position it is fed at.
#[allow(clippy::too_many_arguments)]
pub fn argmax_advance<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    logits: &'a Buffer,
    n: usize,
    partial: &'a Buffer,
    state: &'a Buffer,
    ids: &'a Buffer,
    capacity: usize,
) -> Result<(), KernelError> {
    if n == 0 {
        return Err(invalid("logits", "argmax of no values").into());
    }
    check_size("logits", logits, n, 4)?;
    if partial.size() < argmax_partial_bytes(n) {
        return Err(invalid("partial", format!("{} bytes; {} needed", partial.size(), argmax_partial_bytes(n))).into());
    }
    check_size("state", state, STATE_WORDS, 4)?;
    check_size("ids", ids, capacity, 4)?;
    let pipeline =
        ctx.pipeline(&PipelineDesc { shader: &shaders::ARGMAX, bindings: 4, push_constant_bytes: 8, spec: &[] })?;
    let blocks = n.div_ceil(ARGMAX_BLOCK);
    if blocks as u64 > u64::from(ctx.info().max_workgroup_count[0]) {
        return Err(invalid("logits", format!("{n} logits need more workgroups than the device has")).into());
    }
    let buffers = [logits, partial, state, ids];
    let push = words(&[n as u32, capacity as u32]);
    rec.dispatch(&pipeline, &buffers, &push, [blocks as u32, 1, 1], "argmax")?;
    Ok(())
}

/// Fills `elements` values of `w` with `offset + scale·u`, u uniform in [-1, 1) from (seed, index).
#[allow(clippy::too_many_arguments)]
pub fn fill<'a>(
    rec: &mut Recorder<'a>,
    ctx: &Context,
    w: &'a Buffer,
    dtype: Dtype,
    elements: usize,
    seed: u32,
    scale: f32,
    offset: f32,
) -> Result<(), KernelError> {
    check_size("w", w, elements, element_bytes("w", dtype)?)?;
    if elements == 0 {
        return Ok(());
    }
    let shader = variant(dtype, &shaders::FILL_F32, &shaders::FILL_F16, &shaders::FILL_BF16)?;
    let pipeline = ctx.pipeline(&PipelineDesc { shader, bindings: 1, push_constant_bytes: 16, spec: &[] })?;
    let push = words(&[elements as u32, seed, scale.to_bits(), offset.to_bits()]);
    let (gx, gy) = grid_2d((elements as u64).div_ceil(WG), u64::from(ctx.info().max_workgroup_count[0]));
    rec.dispatch(&pipeline, &[w], &push, [gx as u32, gy as u32, 1], "fill")?;
    Ok(())
}

/// Whether the device can run these kernels: subgroup arithmetic, subgroups of at least 4 (the
/// shaders' shared reduction arrays), and 16-bit storage for f16/bf16 weights.
pub fn check_device(ctx: &Context, weights_16bit: bool) -> Result<(), ParamError> {
    let info = ctx.info();
    if !info.subgroup_arithmetic || info.subgroup_size < 4 {
        return Err(invalid(
            "device",
            format!(
                "{} lacks subgroup arithmetic with subgroups of 4 or more (size {})",
                info.name, info.subgroup_size
            ),
        ));
    }
    if weights_16bit && !info.storage_buffer_16bit {
        return Err(invalid("device", format!("{} lacks 16-bit storage buffers for f16/bf16 weights", info.name)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The matvec against an f64 computation on the same (already rounded) inputs, in every path
    //! of matvec.comp: one long row per workgroup (four chunks per iteration, plus the tail),
    //! several rows, three matrices in one dispatch, scalar loads for rows that are not 16-byte
    //! aligned, fused RMSNorm, SwiGLU, accumulation; and each case again through the batched
    //! path (the LM head's), which must give the same products in any shape.
    //!
    //! Bound: an f32 sum of n products, in any order, is within γ = (n + 4)·u of the exact sum of
    //! |terms| (n additions, the product and the norm-weight product); the fused norm's factor r
    //! (a sum of n squares, then inversesqrt: Vulkan allows 2 ulp) carries (n/2 + 4)·u relative;
    //! SwiGLU's exp and division add a few u relative, scaled by silu' ≤ 1.1 on the gate error.

    use super::*;
    use crate::cases::rng::Rng;
    use crate::cases::run::f32_bytes;
    use crate::reference::dtype::{decode, encode};

    const U: f64 = f32::EPSILON as f64 / 2.0;

    fn values(rng: &mut Rng, n: usize, lo: f64, hi: f64, dtype: Dtype) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = Vec::with_capacity(n * dtype.size());
        let mut exact = Vec::with_capacity(n);
        for _ in 0..n {
            let bits = encode(dtype, (lo + (hi - lo) * rng.unit()) as f32);
            bytes.extend_from_slice(&bits.to_le_bytes()[..dtype.size()]);
            exact.push(f64::from(decode(dtype, bits)));
        }
        (bytes, exact)
    }

    struct Case {
        rows: Vec<usize>,
        cols: usize,
        norm: bool,
        swiglu: bool,
        accumulate: bool,
    }

    fn check(dtype: Dtype, case: &Case, seed: u64, batched: bool) {
        let ctx = Context::shared().expect("a Vulkan device");
        let mut rng = Rng::new(seed);
        let cols = case.cols;
        let (x_bytes, x) = values(&mut rng, cols, -1.0, 1.0, Dtype::F32);
        let (nw_bytes, nw) = values(&mut rng, cols, 0.5, 1.5, dtype);
        let eps = 1e-6f32;
        let mats: Vec<(Vec<u8>, Vec<f64>)> =
            case.rows.iter().map(|&r| values(&mut rng, r * cols, -1.0, 1.0, dtype)).collect();
        let inits: Vec<(Vec<u8>, Vec<f64>)> =
            case.rows.iter().map(|&r| values(&mut rng, r, -1.0, 1.0, Dtype::F32)).collect();

        let up = |name: &str, b: &[u8]| Buffer::with_bytes(&ctx, name, b, Location::Upload).expect("buffer");
        let xb = up("x", &x_bytes);
        let nwb = up("nw", &nw_bytes);
        let wbs: Vec<Buffer> = mats.iter().map(|(b, _)| up("w", b)).collect();
        let ybs: Vec<Buffer> =
            inits.iter().map(|(b, _)| Buffer::with_bytes(&ctx, "y", b, Location::Readback).expect("buffer")).collect();
        {
            let mut rec = Recorder::new(&ctx).expect("recorder");
            let outputs = case
                .rows
                .iter()
                .enumerate()
                .map(|(i, &rows)| (Matrix { buffer: &wbs[i], dtype, rows, cols }, &ybs[i]))
                .collect();
            let call = MatvecCall {
                x: X::Vector(&xb),
                outputs,
                norm: case.norm.then_some((Vector { buffer: &nwb, dtype, len: cols }, eps)),
                accumulate: case.accumulate,
                swiglu: case.swiglu,
                mutant: None,
            };
            record_matvec(&mut rec, &ctx, &call, "test", batched).expect("record");
            rec.submit().expect("submit");
        }

        // f64 reference and bound per output row.
        let (r, r_rel) = if case.norm {
            let ss: f64 = x.iter().map(|v| v * v).sum();
            (1.0 / (ss / cols as f64 + f64::from(eps)).sqrt(), (cols as f64 / 2.0 + 4.0) * U)
        } else {
            (1.0, 0.0)
        };
        let xin: Vec<f64> = x.iter().zip(&nw).map(|(a, w)| if case.norm { a * w } else { *a }).collect();
        let gamma = (cols as f64 + 4.0) * U;
        let dot = |w: &[f64], row: usize| -> (f64, f64) {
            let terms = w[row * cols..][..cols].iter().zip(&xin).map(|(a, b)| a * b);
            let (s, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            (r * s, r * (gamma * abs) + (r * s).abs() * r_rel)
        };
        let outputs = if case.swiglu { 1 } else { case.rows.len() };
        for m in 0..outputs {
            let got: Vec<f32> = ybs[m]
                .read()
                .expect("read")
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            for (row, &g) in got.iter().enumerate().take(case.rows[m]) {
                let (mut want, mut bound) = dot(&mats[m].1, row);
                if case.swiglu {
                    let (u, ub) = dot(&mats[1].1, row);
                    let silu = want / (1.0 + (-want).exp());
                    bound = 1.1 * bound * u.abs() + silu.abs() * ub + (silu * u).abs() * 8.0 * U;
                    want = silu * u;
                }
                if case.accumulate {
                    want += inits[m].1[row];
                    bound += want.abs() * U;
                }
                let err = (f64::from(g) - want).abs();
                assert!(
                    err <= bound,
                    "{dtype} rows {:?} cols {cols} (norm {}, swiglu {}, acc {}, batched {batched}): matrix {m} row {row}: got {g}, want {want}, error {err:.3e} > bound {bound:.3e}",
                    case.rows,
                    case.norm,
                    case.swiglu,
                    case.accumulate
                );
            }
        }
        assert!(ctx.take_validation_messages().is_empty(), "validation messages");
    }

    /// Rows of y = W·x out of bound, x merged from split-K attention partials ([`X::Merged`]) of
    /// `heads` rows of `head_dim`: random O in [-1, 1], m in [-3, 0], l in [0.5, 2]; head 0's
    /// chunk 1 has no visible position (l = 0, m the shader's floor) and head 1 none at all (x
    /// = 0). Bound: each weight exp(m_c − M) is within ε_w = (4 + 3·|m_c − M|)·u (the subtraction,
    /// then Vulkan's 3 + 2·|x| ulp for exp); numerator and denominator sum `chunks` terms; with
    /// the reciprocal and its product, x_j is within γ_x = 2·ε_w + (2·chunks + 6)·u of
    /// A_j = Σ_c |O_c[j]|·w_c / L; the product adds γ·Σ|W·x| as above.
    fn merged_violations(
        dtype: Dtype,
        heads: usize,
        head_dim: usize,
        chunks: usize,
        rows: usize,
        mutant: Option<LayerMutant>,
    ) -> usize {
        const NEG_FLOOR: f32 = -3.0e38;
        let ctx = Context::shared().expect("a Vulkan device");
        let mut rng = Rng::new(7 + (heads * chunks * head_dim) as u64);
        let cols = heads * head_dim;
        let (w_bytes, w) = values(&mut rng, rows * cols, -1.0, 1.0, dtype);
        let mut o = vec![0f32; heads * chunks * head_dim];
        let mut ml = vec![(NEG_FLOOR, 0f32); heads * chunks];
        for h in 0..heads {
            for c in 0..chunks {
                if (h == 0 && c == 1) || h == 1 {
                    continue;
                }
                ml[h * chunks + c] = ((-3.0 * rng.unit()) as f32, (0.5 + 1.5 * rng.unit()) as f32);
                for v in &mut o[(h * chunks + c) * head_dim..][..head_dim] {
                    *v = (2.0 * rng.unit() - 1.0) as f32;
                }
            }
        }
        let ml_flat: Vec<f32> = ml.iter().flat_map(|&(m, l)| [m, l]).collect();
        let up = |name: &str, b: &[u8]| Buffer::with_bytes(&ctx, name, b, Location::Upload).expect("buffer");
        let (wb, ob, mlb) = (up("w", &w_bytes), up("o", &f32_bytes(&o)), up("ml", &f32_bytes(&ml_flat)));
        let y = Buffer::new(&ctx, "y", 4 * rows as u64, Location::Readback).expect("buffer");
        {
            let mut rec = Recorder::new(&ctx).expect("recorder");
            let partials = Partials { o: &ob, ml: &mlb, rows: heads, chunks, head_dim };
            let call = MatvecCall {
                x: X::Merged(partials),
                outputs: vec![(Matrix { buffer: &wb, dtype, rows, cols }, &y)],
                norm: None,
                accumulate: false,
                swiglu: false,
                mutant,
            };
            matvec(&mut rec, &ctx, &call, "test").expect("record");
            rec.submit().expect("submit");
        }
        // x and A per element, and γ_x per head.
        let (mut x, mut a, mut gamma_x) = (vec![0f64; cols], vec![0f64; cols], vec![0f64; heads]);
        for h in 0..heads {
            let valid: Vec<usize> = (0..chunks).filter(|&c| ml[h * chunks + c].1 > 0.0).collect();
            let big_m = valid.iter().map(|&c| f64::from(ml[h * chunks + c].0)).fold(f64::NEG_INFINITY, f64::max);
            let wts: Vec<f64> = valid.iter().map(|&c| (f64::from(ml[h * chunks + c].0) - big_m).exp()).collect();
            let l: f64 = valid.iter().zip(&wts).map(|(&c, wt)| f64::from(ml[h * chunks + c].1) * wt).sum();
            let spread = valid.iter().map(|&c| big_m - f64::from(ml[h * chunks + c].0)).fold(0.0, f64::max);
            gamma_x[h] = 2.0 * (4.0 + 3.0 * spread) * U + (2.0 * chunks as f64 + 6.0) * U;
            for d in 0..head_dim {
                let j = h * head_dim + d;
                for (&c, wt) in valid.iter().zip(&wts) {
                    let v = f64::from(o[(h * chunks + c) * head_dim + d]);
                    x[j] += v * wt / l;
                    a[j] += v.abs() * wt / l;
                }
            }
        }
        let gamma = (cols as f64 + 4.0) * U;
        let got = y.read().expect("read");
        let mut violations = 0;
        for (i, g) in got.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).enumerate() {
            let row = &w[i * cols..][..cols];
            let want: f64 = row.iter().zip(&x).map(|(wv, xv)| wv * xv).sum();
            let abs: f64 = row.iter().zip(&x).map(|(wv, xv)| (wv * xv).abs()).sum();
            let carried: f64 = row.iter().enumerate().map(|(j, wv)| wv.abs() * gamma_x[j / head_dim] * a[j]).sum();
            if (f64::from(g) - want).abs() > gamma * abs + carried {
                violations += 1;
            }
        }
        assert!(ctx.take_validation_messages().is_empty(), "validation messages");
        violations
    }

    #[test]
    fn matvec_merges_attention_partials_within_the_bound() {
        // (heads, head_dim, chunks, rows): Qwen3-0.6B's o_proj at ctx 512 (16 heads of 128, 5
        // chunks; an odd row count: the last workgroup's second row is past the end), short rows,
        // one chunk, the most chunks.
        for (heads, head_dim, chunks, rows) in [(16, 128, 5, 41), (4, 64, 3, 33), (2, 128, 1, 8), (3, 32, 16, 20)] {
            for dtype in Dtype::ALL {
                let bad = merged_violations(dtype, heads, head_dim, chunks, rows, None);
                assert_eq!(bad, 0, "{dtype} h{heads} d{head_dim} chunks {chunks}: {bad} of {rows} rows out of bound");
            }
        }
        // The mutant that skips the rescale is caught.
        assert!(merged_violations(Dtype::Bf16, 16, 128, 5, 41, Some(LayerMutant::MergeNoRescale)) > 0);
    }

    #[test]
    fn matvec_matches_f64_in_every_path() {
        let cases = [
            // One row per workgroup: four chunks per iteration and a tail (1537 chunks of bf16).
            Case { rows: vec![3], cols: 12296, norm: false, swiglu: false, accumulate: false },
            Case { rows: vec![2], cols: 12296, norm: true, swiglu: false, accumulate: true },
            // Three matrices in one dispatch, several rows each, fused norm.
            Case { rows: vec![17, 5, 3], cols: 1024, norm: true, swiglu: false, accumulate: false },
            // Rows that are not 16-byte aligned: scalar loads.
            Case { rows: vec![6, 2], cols: 1002, norm: true, swiglu: false, accumulate: false },
            // Gate/up + SwiGLU with the norm.
            Case { rows: vec![9, 9], cols: 4096, norm: true, swiglu: true, accumulate: false },
            // Long gate/up rows: batched, the loads come in several batches, the last one partly
            // past the row (bf16: 13 chunk columns an invocation in 2 batches of 7).
            Case { rows: vec![3, 3], cols: 12296, norm: true, swiglu: true, accumulate: false },
            // An LM head's row count (MATVEC_LARGE_ROWS and over): eight rows a workgroup, the
            // last block partial.
            Case { rows: vec![MATVEC_LARGE_ROWS + 5], cols: 64, norm: true, swiglu: false, accumulate: false },
        ];
        for (i, case) in cases.iter().enumerate() {
            for dtype in Dtype::ALL {
                for batched in [false, true] {
                    check(dtype, case, 100 + i as u64, batched);
                }
            }
        }
    }

    /// torch.argmax's order over the non-NaN values (NaN never wins; all NaN: 0).
    fn argmax_reference(v: &[f32]) -> u32 {
        let mut best: Option<(f32, usize)> = None;
        for (i, &x) in v.iter().enumerate() {
            if !x.is_nan() && best.is_none_or(|(b, _)| x > b) {
                best = Some((x, i));
            }
        }
        best.map_or(0, |(_, i)| i as u32)
    }

    #[test]
    fn argmax_picks_torch_order_and_advances_the_state() {
        let ctx = Context::shared().expect("a Vulkan device");
        let n = 3 * ARGMAX_BLOCK + 77; // the last workgroup's block partly filled
        let mut rng = Rng::new(7);
        let base: Vec<f32> = (0..n).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect();
        let with = |sets: &[(usize, f32)]| {
            let mut v = base.clone();
            for &(i, x) in sets {
                v[i] = x;
            }
            v
        };
        let cases: Vec<(&str, Vec<f32>)> = vec![
            ("max in the partial last block", with(&[(n - 5, 3.0)])),
            (
                "ties across blocks: the lowest index",
                with(&[(2 * ARGMAX_BLOCK + 1, 5.0), (ARGMAX_BLOCK + 9, 5.0), (n - 1, 5.0)]),
            ),
            ("NaN never wins", with(&[(3, f32::NAN), (2 * ARGMAX_BLOCK, 4.0), (2 * ARGMAX_BLOCK + 1, f32::NAN)])),
            ("-0 equals +0: the lowest index", {
                let mut v: Vec<f32> = base.iter().map(|x| -x.abs() - 0.5).collect();
                (v[900], v[40]) = (0.0, -0.0);
                v
            }),
            ("all NaN: 0", vec![f32::NAN; n]),
            ("all -inf: 0", vec![f32::NEG_INFINITY; n]),
        ];
        // Prompt of 5 ids in a capacity of 8; even cases are inside the prompt (the next id is the
        // prompt's), odd ones past it (the sampled id is fed and written to ids).
        let capacity = 8;
        let prompt: Vec<u32> = vec![10, 11, 12, 13, 14, 0, 0, 0];
        let u32_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let partial = zeroed_argmax_partial(&ctx, n).expect("partial");
        let mut buffers = Vec::new();
        for (i, (_, v)) in cases.iter().enumerate() {
            let next = if i % 2 == 0 { 2 } else { 6 };
            let logits = Buffer::with_bytes(&ctx, "logits", &f32_bytes(v), Location::Upload).expect("buffer");
            let state =
                Buffer::with_bytes(&ctx, "state", &u32_bytes(&[next, 99, 5, 99]), Location::Readback).expect("buffer");
            let ids = Buffer::with_bytes(&ctx, "ids", &u32_bytes(&prompt), Location::Readback).expect("buffer");
            buffers.push((next, logits, state, ids));
        }
        {
            // One partial buffer for every call: each must leave its counter at zero.
            let mut rec = Recorder::new(&ctx).expect("recorder");
            for (_, logits, state, ids) in &buffers {
                argmax_advance(&mut rec, &ctx, logits, n, &partial, state, ids, capacity).expect("record");
                rec.barrier();
            }
            rec.submit().expect("submit");
        }
        let words = |b: &Buffer| -> Vec<u32> {
            b.read().expect("read").chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect()
        };
        for ((name, v), (next, _, state, ids)) in cases.iter().zip(&buffers) {
            let want = argmax_reference(v);
            let (next, got_state, got_ids) = (*next, words(state), words(ids));
            let mut want_ids = prompt.clone();
            let token = if next < 5 { prompt[next as usize] } else { want };
            if next >= 5 {
                want_ids[next as usize] = want;
            }
            assert_eq!(got_state, vec![next + 1, token, 5, want], "{name}: state");
            assert_eq!(got_ids, want_ids, "{name}: ids");
        }
        assert!(ctx.take_validation_messages().is_empty(), "validation messages");
    }

    #[test]
    fn bad_shapes_are_refused_before_recording() {
        let ctx = Context::shared().expect("a Vulkan device");
        let small = Buffer::new(&ctx, "small", 16, crate::gpu::Location::Device).expect("buffer");
        let big = Buffer::new(&ctx, "big", 4096, crate::gpu::Location::Device).expect("buffer");
        let mut rec = Recorder::new(&ctx).expect("recorder");
        let w = Matrix { buffer: &big, dtype: Dtype::F32, rows: 4, cols: 64 };
        let call = |outputs, swiglu| MatvecCall {
            x: X::Vector(&small),
            outputs,
            norm: None,
            accumulate: false,
            swiglu,
            mutant: None,
        };
        let e = matvec(&mut rec, &ctx, &call(vec![(w, &big)], false), "t").unwrap_err().to_string();
        assert!(e.contains("`x`"), "{e}");
        let e = matvec(&mut rec, &ctx, &call(vec![(w, &big)], true), "t").unwrap_err().to_string();
        assert!(e.contains("exactly 2 with swiglu"), "{e}");
        let other = Matrix { cols: 32, ..w };
        let e = matvec(&mut rec, &ctx, &call(vec![(w, &big), (other, &big)], false), "t").unwrap_err().to_string();
        assert!(e.contains("matrix 1"), "{e}");
    }
}
