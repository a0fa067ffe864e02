//! Runs a case on a device and judges it against the reference.
//!
//! Every output buffer is poisoned before the dispatch (so an element the kernel forgot to write
//! fails), every element is compared, and the verdict uses the tolerances of
//! [`super::tolerance`] only. Validation-layer messages raised while a case ran fail it too.

use std::sync::Arc;

use vkdecode_reference::dtype::{decode, load};
use vkdecode_reference::q8_0::{Q8_0_BLOCK_BYTES, QK8_0};
use vkdecode_reference::{AttentionOptions, AttentionShape, decode_attention_with};

use super::data::{AppendInputs, AttentionInputs, append_inputs, attention_inputs_for, block_table_words};
use super::model::{AppendCase, AttentionCase, Case};
use super::tolerance::{ATTENTION_MAX_NMSE, Precision, absolute_floor_for, attention_element_bound_for};
use crate::gpu::{Buffer, Context, GpuError, Location, Recorder};
use crate::implementation::{AppendGpu, Builtin, HarnessMutant, Implementation, Judged, judge_case};
use crate::kernels::attention::{self, AttentionBuffers, AttentionParams};
use crate::kernels::kv_append::{self, AppendBuffers, AppendParams};
use crate::kernels::{KernelError, Mutant, ParamError, words};

/// Bits written into every output element before a dispatch: a NaN no kernel produces.
const OUTPUT_POISON: u32 = 0x7fa5_a5a5;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The implementation under test was asked to run a kernel it does not have.
    #[error("implementation `{implementation}` has no {kernel} kernel")]
    NotImplemented { implementation: String, kernel: &'static str },
    /// The implementation found at run time that it cannot take the case (no manifest variant
    /// admits it): an unsupported outcome, not a failure.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A manifest's expression failed on this case (overflow, division by zero, a value out of
    /// range): a fault of the manifest, not a verdict on the kernel.
    #[error("manifest `{manifest}`: {message}")]
    Manifest { manifest: String, message: String },
    /// The implementation under test failed in its own way (a manifest's pass, a foreign runtime).
    #[error("implementation `{implementation}`: {message}")]
    Implementation { implementation: String, message: String },
}

impl RunError {
    /// Whether the device was lost (the caller should make a new context).
    pub fn is_device_lost(&self) -> bool {
        match self {
            RunError::Gpu(e) | RunError::Kernel(KernelError::Gpu(e)) => e.is_device_lost(),
            _ => false,
        }
    }
}

/// The verdict on one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub passed: bool,
    /// Elements (attention) or bytes (append) compared.
    pub checked: usize,
    pub mismatches: usize,
    pub max_abs_err: f64,
    /// Largest |error| / bound over all elements (attention; ≤ 1 passes).
    pub worst_ratio: f64,
    pub nmse: f64,
    /// The tolerance applied, in words.
    pub tolerance: &'static str,
    /// The first mismatch, or why the run failed.
    pub detail: Option<String>,
}

impl Outcome {
    /// A failure with nothing compared: the implementation gave no usable result.
    pub fn error(detail: String) -> Outcome {
        Outcome {
            passed: false,
            checked: 0,
            mismatches: 0,
            max_abs_err: f64::NAN,
            worst_ratio: f64::INFINITY,
            nmse: f64::NAN,
            tolerance: "a result to compare",
            detail: Some(detail),
        }
    }
}

/// One attention run: the inputs, the GPU output and the reference output.
pub struct AttentionRun {
    pub inputs: AttentionInputs,
    pub gpu: Vec<f32>,
    pub reference: Vec<f64>,
    /// Fused cases: both caches as the kernel left them.
    pub caches_after: Option<(Vec<u8>, Vec<u8>)>,
}

/// What the device produced for one attention call.
#[derive(Clone, Debug)]
pub struct AttentionGpu {
    pub out: Vec<f32>,
    /// Fused calls: the K and V caches after the kernel appended the new tokens.
    pub caches_after: Option<(Vec<u8>, Vec<u8>)>,
    /// The in-split merge's chunk counters after the call: every call must leave them zero.
    pub counters_after: Vec<u8>,
}

impl AttentionGpu {
    /// An output alone: what an implementation under test without fused mode returns.
    pub fn output(out: Vec<f32>) -> AttentionGpu {
        AttentionGpu { out, caches_after: None, counters_after: Vec::new() }
    }
}

/// One append run: the inputs and both caches after the GPU and the reference appends.
pub struct AppendRun {
    pub inputs: AppendInputs,
    pub gpu_k: Vec<u8>,
    pub gpu_v: Vec<u8>,
    pub ref_k: Vec<u8>,
    pub ref_v: Vec<u8>,
}

/// Runs any case on vkdecode's own kernels; `mutant` applies only if it belongs to the case's
/// kernel. The same path as any implementation under test ([`crate::implementation::judge_case`]).
pub fn run_case(ctx: &Arc<Context>, case: &Case, mutant: Option<Mutant>) -> Result<Outcome, RunError> {
    match judge_case(ctx, &Builtin::with_mutant(mutant), case, None)? {
        Judged::Ran(outcome) => Ok(outcome),
        // The built-in capabilities admit every valid case, and `params()` rejected the rest.
        Judged::Unsupported(reason) => Err(crate::kernels::invalid("case", reason).into()),
    }
}

fn poison_bytes(bytes: u64) -> Vec<u8> {
    OUTPUT_POISON.to_le_bytes().into_iter().cycle().take(bytes as usize).collect()
}

pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs an attention case on vkdecode's kernels and the reference, and compares.
pub fn run_attention(
    ctx: &Arc<Context>,
    case: &AttentionCase,
    mutant: Option<attention::AttentionMutant>,
) -> Result<(Outcome, AttentionRun), RunError> {
    run_attention_with(ctx, &Builtin::with_mutant(mutant.map(Mutant::Attention)), case, None)
}

/// Runs an attention case on an implementation and the reference, and compares with the
/// implementation's precision profile; the caches are filled by its slot contract. `harness`
/// hands the implementation deliberately wrong inputs (the reference keeps the right ones).
pub fn run_attention_with(
    ctx: &Arc<Context>,
    imp: &dyn Implementation,
    case: &AttentionCase,
    harness: Option<HarnessMutant>,
) -> Result<(Outcome, AttentionRun), RunError> {
    let caps = imp.capabilities();
    let inputs = attention_inputs_for(case, caps.unread_slots)?;
    let gpu = match harness {
        Some(m) => imp.attention(ctx, &m.apply(&inputs))?,
        None => imp.attention(ctx, &inputs)?,
    };
    check_output_len(imp.name(), &inputs, gpu.out.len())?;
    let (outcome, reference) = judge_attention_output(&caps.precision, &inputs, &gpu.out, &gpu);
    let run = AttentionRun { inputs, gpu: gpu.out, reference, caches_after: gpu.caches_after };
    Ok((outcome, run))
}

/// An implementation's output must have Q's shape.
pub(crate) fn check_output_len(name: &str, inputs: &AttentionInputs, len: usize) -> Result<(), RunError> {
    if len == inputs.q.len() {
        return Ok(());
    }
    Err(RunError::Implementation {
        implementation: name.to_string(),
        message: format!("returned {len} output elements, {} expected ([B][T][H][D])", inputs.q.len()),
    })
}

/// Judges what an implementation returned for attention `inputs` (`out` flattened like Q,
/// the fused caches and merge counters from `gpu`) with `precision`; returns the reference too.
pub fn judge_attention_output<T: Copy + Into<f64>>(
    precision: &Precision,
    inputs: &AttentionInputs,
    out: &[T],
    gpu: &AttentionGpu,
) -> (Outcome, Vec<f64>) {
    let reference = attention_reference(inputs);
    let mut outcome = check_attention_with(precision, inputs, out, &reference);
    if let Some(fused) = &inputs.fused {
        match &gpu.caches_after {
            Some((k_after, v_after)) => check_fused_caches(
                &mut outcome,
                inputs.params.dtype,
                [("K", k_after, &fused.k_after), ("V", v_after, &fused.v_after)],
            ),
            None => {
                outcome.passed = false;
                outcome.detail.get_or_insert_with(|| "fused call returned no caches to check".into());
            }
        }
    }
    if let Some(i) = gpu.counters_after.iter().position(|&b| b != 0) {
        outcome.passed = false;
        outcome.detail.get_or_insert_with(|| {
            format!("split-K merge: chunk counter {} was left nonzero (each call must reset it)", i / 4)
        });
    }
    (outcome, reference)
}

/// Runs materialized attention inputs on the device and returns the output, flattened like Q
/// (for inputs no case describes, such as the derived problems of metamorphic properties).
pub fn run_attention_inputs(
    ctx: &Arc<Context>,
    inputs: &AttentionInputs,
    mutant: Option<attention::AttentionMutant>,
) -> Result<Vec<f32>, RunError> {
    Ok(run_attention_gpu(ctx, inputs, mutant)?.out)
}

/// The device buffers of one attention call, uploaded from materialized inputs. Output and
/// split-K partials are poisoned, so anything left unwritten shows.
struct AttentionUploads {
    q: Buffer,
    seq_lens: Buffer,
    k: Buffer,
    v: Buffer,
    out: Buffer,
    partial_o: Buffer,
    partial_ml: Buffer,
    counters: Buffer,
    sinks: Option<Buffer>,
    /// The step's new K/V (fused inputs), when the inputs have them.
    new_kv: Option<(Buffer, Buffer)>,
    /// A paged cache's block tables.
    block_tables: Option<Buffer>,
}

impl AttentionUploads {
    /// `readable_caches`: put the caches in host-readable memory, for calls that write them.
    fn new(
        ctx: &Arc<Context>,
        inputs: &AttentionInputs,
        p: &AttentionParams,
        readable_caches: bool,
    ) -> Result<Self, RunError> {
        let cache_location = if readable_caches { Location::Readback } else { Location::Upload };
        let upload = |name: &str, bytes: &[u8], location| Buffer::with_bytes(ctx, name, bytes, location);
        let poisoned = |name: &str, bytes: u64, location| Buffer::with_bytes(ctx, name, &poison_bytes(bytes), location);
        Ok(AttentionUploads {
            q: upload("attention.q", &f32_bytes(&inputs.q), Location::Upload)?,
            seq_lens: upload("attention.seq_lens", &words(&inputs.seq_lens), Location::Upload)?,
            k: upload("attention.k_cache", &inputs.k_bytes, cache_location)?,
            v: upload("attention.v_cache", &inputs.v_bytes, cache_location)?,
            out: poisoned("attention.out", 4 * p.q_elements() as u64, Location::Readback)?,
            partial_o: poisoned("attention.partial_o", p.partial_o_bytes(ctx.info()), Location::Upload)?,
            partial_ml: poisoned("attention.partial_ml", p.partial_ml_bytes(ctx.info()), Location::Upload)?,
            counters: attention::zeroed_counters(ctx, p)?,
            sinks: inputs
                .sinks
                .as_ref()
                .map(|s| upload("attention.sinks", &f32_bytes(s), Location::Upload))
                .transpose()?,
            new_kv: match &inputs.fused {
                Some(f) => Some((
                    upload("attention.new_k", &f32_bytes(&f.new_k), Location::Upload)?,
                    upload("attention.new_v", &f32_bytes(&f.new_v), Location::Upload)?,
                )),
                None => None,
            },
            block_tables: inputs
                .paged
                .as_ref()
                .map(|paged| upload("attention.block_tables", &words(&block_table_words(paged)), Location::Upload))
                .transpose()?,
        })
    }

    /// The kernel's view; `fused` binds the new K/V inputs.
    fn buffers(&self, fused: bool) -> AttentionBuffers<'_> {
        let new_kv = self.new_kv.as_ref().filter(|_| fused);
        AttentionBuffers {
            q: &self.q,
            seq_lens: &self.seq_lens,
            k_cache: &self.k,
            v_cache: &self.v,
            out: &self.out,
            partial_o: &self.partial_o,
            partial_ml: &self.partial_ml,
            counters: &self.counters,
            sinks: self.sinks.as_ref(),
            new_k: new_kv.map(|(k, _)| k),
            new_v: new_kv.map(|(_, v)| v),
            qk_norm_rope: None,
            block_tables: self.block_tables.as_ref(),
        }
    }

    /// What a submitted call left: the output, the merge counters and (`caches`) both caches.
    fn result(&self, caches: bool) -> Result<AttentionGpu, RunError> {
        let out =
            self.out.read()?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4-byte chunk"))).collect();
        let caches_after = if caches { Some((self.k.read()?, self.v.read()?)) } else { None };
        Ok(AttentionGpu { out, caches_after, counters_after: self.counters.read()? })
    }
}

/// Runs materialized attention inputs on the device. Output and split-K partials are poisoned
/// first, so anything left unwritten shows; fused calls also return both caches.
pub fn run_attention_gpu(
    ctx: &Arc<Context>,
    inputs: &AttentionInputs,
    mutant: Option<attention::AttentionMutant>,
) -> Result<AttentionGpu, RunError> {
    let p = inputs.params;
    p.validate(ctx)?;
    p.validate_seq_lens(&inputs.seq_lens)?;
    if let Some(paged) = &inputs.paged {
        p.validate_block_table_writes(&block_table_words(paged), &inputs.seq_lens)?;
    }
    let dev = AttentionUploads::new(ctx, inputs, &p, p.fused)?;
    let mut rec = Recorder::new(ctx)?;
    attention::record(&mut rec, ctx, &p, dev.buffers(p.fused), mutant)?;
    rec.submit()?;
    dev.result(p.fused)
}

/// The unfused way to do a fused case's work: the append kernel writes the new tokens, a
/// barrier, then attention reads them from the cache, all in one command buffer. The fused
/// kernel must agree with this (both match the reference; both leave the same caches).
pub fn run_append_then_attend(ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
    let p = AttentionParams { fused: false, ..inputs.params };
    p.validate(ctx)?;
    p.validate_seq_lens(&inputs.seq_lens)?;
    let append = AppendParams {
        n_seqs: p.n_seqs,
        n_new: p.n_queries,
        n_kv_heads: p.n_kv_heads,
        head_dim: p.head_dim,
        dtype: p.dtype,
        layout: p.layout,
        paging: p.paging,
    };
    let starts: Vec<u32> = inputs.seq_lens.iter().map(|&l| l - p.n_queries as u32).collect();
    append.validate(ctx)?;
    append.validate_starts(&starts)?;
    if let Some(paged) = &inputs.paged {
        let tables = block_table_words(paged);
        p.validate_block_tables(&tables)?;
        append.validate_block_table_writes(&tables, &starts)?;
    }
    let dev = AttentionUploads::new(ctx, inputs, &p, true)?;
    let start = Buffer::with_bytes(ctx, "kv_append.start", &words(&starts), Location::Upload)?;
    let Some((new_k, new_v)) = dev.new_kv.as_ref() else {
        return Err(crate::kernels::invalid("fused", "append-then-attend needs a fused case").into());
    };
    let mut rec = Recorder::new(ctx)?;
    let block_tables = dev.block_tables.as_ref();
    let bufs = AppendBuffers { new_k, new_v, start: &start, k_cache: &dev.k, v_cache: &dev.v, block_tables };
    kv_append::record(&mut rec, ctx, &append, bufs, None)?;
    rec.barrier(); // the attention below reads what the append wrote
    attention::record(&mut rec, ctx, &p, dev.buffers(false), None)?;
    rec.submit()?;
    dev.result(true)
}

/// Fused calls: both caches must equal the expected bytes exactly (the new slots written, every
/// other byte untouched).
fn check_fused_caches(outcome: &mut Outcome, dtype: crate::kernels::Dtype, caches: [(&str, &Vec<u8>, &Vec<u8>); 2]) {
    for (which, got, want) in caches {
        outcome.checked += got.len() / dtype.size();
        let bad: Vec<usize> =
            (0..got.len() / dtype.size()).filter(|&i| load(dtype, got, i) != load(dtype, want, i)).collect();
        if let Some(&i) = bad.first() {
            outcome.passed = false;
            outcome.mismatches += bad.len();
            outcome.detail.get_or_insert_with(|| {
                format!(
                    "fused append: {} {which} cache element(s) differ; first at element {i}: bits {:#06x}, expected {:#06x}",
                    bad.len(),
                    load(dtype, got, i),
                    load(dtype, want, i)
                )
            });
        }
    }
}

/// The reference output for materialized inputs, flattened like Q.
pub fn attention_reference(inputs: &AttentionInputs) -> Vec<f64> {
    let p = &inputs.params;
    let shape = AttentionShape {
        n_seqs: p.n_seqs,
        n_queries: p.n_queries,
        n_q_heads: p.n_q_heads,
        n_kv_heads: p.n_kv_heads,
        head_dim: p.head_dim,
    };
    let lens: Vec<usize> = inputs.seq_lens.iter().map(|&l| l as usize).collect();
    let options =
        AttentionOptions { window: p.window, softcap: p.softcap.map(f64::from), sinks: inputs.sinks.as_deref() };
    let out = decode_attention_with(
        &shape,
        &inputs.q,
        &inputs.k,
        &inputs.v,
        &inputs.view,
        &lens,
        f64::from(p.scale),
        &options,
    );
    out.iter().copied().collect()
}

/// Compares a GPU attention output with the reference, element by element, in strict f32.
pub fn check_attention(inputs: &AttentionInputs, gpu: &[f32], reference: &[f64]) -> Outcome {
    check_attention_with(&Precision::F32, inputs, gpu, reference)
}

/// Compares an attention output with the reference, element by element, with the element bound
/// of `precision`.
pub fn check_attention_with<T: Copy + Into<f64>>(
    precision: &Precision,
    inputs: &AttentionInputs,
    gpu: &[T],
    reference: &[f64],
) -> Outcome {
    let p = &inputs.params;
    let d = p.head_dim;
    let group = p.n_q_heads / p.n_kv_heads;
    let scale = f64::from(p.scale).abs();
    let (mut mismatches, mut max_abs_err, mut worst_ratio) = (0usize, 0f64, 0f64);
    let (mut err2, mut ref2) = (0f64, 0f64);
    let mut detail = None;
    for b in 0..p.n_seqs {
        let len = inputs.seq_lens[b] as i64;
        for t in 0..p.n_queries {
            let end = (len - p.n_queries as i64 + t as i64 + 1).max(0) as usize;
            let first = p.window.map_or(0, |w| end.saturating_sub(w));
            let n = end - first;
            for h in 0..p.n_q_heads {
                let kvh = h / group;
                let row = ((b * p.n_queries + t) * p.n_q_heads + h) * d;
                let q = &inputs.q[row..row + d];
                let (mut max_qk, mut max_v) = (0f64, 0f64);
                for j in first..end {
                    let base = inputs.view.offset(b, kvh, j, 0);
                    let qk: f64 = (0..d).map(|i| (f64::from(q[i]) * f64::from(inputs.k[base + i])).abs()).sum();
                    max_qk = max_qk.max(scale * qk);
                    max_v = (0..d).map(|i| f64::from(inputs.v[base + i]).abs()).fold(max_v, f64::max);
                }
                let terms = if n > 0 && inputs.sinks.is_some() { n + 1 } else { n };
                let bound = attention_element_bound_for(precision, terms, d, max_qk, max_v, p.softcap.map(f64::from));
                for i in 0..d {
                    let (got, want) = (gpu[row + i].into(), reference[row + i]);
                    let err = (got - want).abs();
                    // The NMSE counts the error beyond what denormal flushing and the profile's
                    // underflow may lose.
                    let excess = (err - absolute_floor_for(precision, terms, d)).max(0.0);
                    err2 += if err.is_finite() { excess * excess } else { f64::INFINITY };
                    ref2 += want * want;
                    let ok = err <= bound; // false for NaN
                    if err.is_finite() {
                        max_abs_err = max_abs_err.max(err);
                    } else {
                        max_abs_err = f64::INFINITY;
                    }
                    worst_ratio = worst_ratio.max(if bound > 0.0 {
                        err / bound
                    } else if err == 0.0 {
                        0.0
                    } else {
                        f64::INFINITY
                    });
                    if !ok {
                        mismatches += 1;
                        if detail.is_none() {
                            detail = Some(format!(
                                "out[seq {b}][query {t}][head {h}][dim {i}] = {got:e}, reference {want:e}, |error| {err:e} > bound {bound:e} ({n} visible positions)"
                            ));
                        }
                    }
                }
            }
        }
    }
    let nmse = if ref2 > 0.0 {
        err2 / ref2
    } else if err2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    if nmse > ATTENTION_MAX_NMSE && detail.is_none() {
        detail = Some(format!("NMSE {nmse:e} exceeds {ATTENTION_MAX_NMSE:e}"));
    }
    let passed = mismatches == 0 && nmse <= ATTENTION_MAX_NMSE; // false for a NaN NMSE
    Outcome {
        passed,
        checked: gpu.len(),
        mismatches,
        max_abs_err,
        worst_ratio,
        nmse,
        tolerance: precision.describe(),
        detail,
    }
}

/// Runs an append case on vkdecode's kernel and the reference, and compares every byte of both
/// caches.
pub fn run_append(
    ctx: &Arc<Context>,
    case: &AppendCase,
    mutant: Option<kv_append::AppendMutant>,
) -> Result<(Outcome, AppendRun), RunError> {
    run_append_with(ctx, &Builtin::with_mutant(mutant.map(Mutant::Append)), case)
}

/// Runs an append case on an implementation and the reference, and compares every byte.
pub fn run_append_with(
    ctx: &Arc<Context>,
    imp: &dyn Implementation,
    case: &AppendCase,
) -> Result<(Outcome, AppendRun), RunError> {
    let inputs = append_inputs(case)?;
    let gpu = imp.append(ctx, &inputs)?;
    check_caches_len(imp.name(), &inputs, &gpu)?;
    let AppendGpu { k_cache: gpu_k, v_cache: gpu_v } = gpu;
    let (outcome, ref_k, ref_v) = judge_append_output(&inputs, &gpu_k, &gpu_v);
    Ok((outcome, AppendRun { inputs, gpu_k, gpu_v, ref_k, ref_v }))
}

/// The caches an implementation returns after an append must have the inputs' size.
pub(crate) fn check_caches_len(name: &str, inputs: &AppendInputs, gpu: &AppendGpu) -> Result<(), RunError> {
    for (which, got) in [("K", &gpu.k_cache), ("V", &gpu.v_cache)] {
        if got.len() != inputs.k_before.len() {
            return Err(RunError::Implementation {
                implementation: name.to_string(),
                message: format!("returned a {which} cache of {} bytes, {} expected", got.len(), inputs.k_before.len()),
            });
        }
    }
    Ok(())
}

/// Judges the caches an implementation left after an append against the reference's; returns
/// the reference caches too.
pub fn judge_append_output(inputs: &AppendInputs, gpu_k: &Vec<u8>, gpu_v: &Vec<u8>) -> (Outcome, Vec<u8>, Vec<u8>) {
    let p = &inputs.params;
    let starts: Vec<usize> = inputs.starts.iter().map(|&s| s as usize).collect();
    let (mut ref_k, mut ref_v) = (inputs.k_before.clone(), inputs.v_before.clone());
    for (cache, new) in [(&mut ref_k, &inputs.new_k), (&mut ref_v, &inputs.new_v)] {
        match &inputs.paged {
            Some(paged) => vkdecode_reference::kv_append_paged(p.dtype, cache, paged, new, p.n_new, &starts),
            None => vkdecode_reference::kv_append(p.dtype, cache, &p.layout, new, p.n_new, &starts),
        }
    }
    let outcome = check_append(inputs, [("K", gpu_k, &ref_k), ("V", gpu_v, &ref_v)]);
    (outcome, ref_k, ref_v)
}

/// Compares caches after an append element by element (q8_0: byte by byte), bit for bit.
pub fn check_append(inputs: &AppendInputs, caches: [(&str, &Vec<u8>, &Vec<u8>); 2]) -> Outcome {
    let p = &inputs.params;
    let dtype = p.dtype;
    let float = dtype.is_float();
    let unit = if float { dtype.size() } else { 1 };
    let mut mismatches = 0;
    let mut detail = None;
    let mut checked = 0;
    for (which, got, want) in caches {
        checked += got.len();
        for i in 0..got.len() / unit {
            let (g, w) = if float {
                (load(dtype, got, i), load(dtype, want, i))
            } else {
                (u32::from(got[i]), u32::from(want[i]))
            };
            if g != w {
                // The element of this unit (q8_0: the first of its block; rows are whole blocks).
                let e = if float { i } else { i / Q8_0_BLOCK_BYTES * QK8_0 };
                mismatches += 1;
                if detail.is_none() {
                    let written = (0..p.n_seqs).any(|b| {
                        (0..p.n_new).any(|t| {
                            let pos = inputs.starts[b] as usize + t;
                            (0..p.n_kv_heads).any(|h| {
                                let base = match &inputs.paged {
                                    Some(paged) => paged.offset(b, h, pos, 0),
                                    None => p.layout.offset(b, h, pos, 0),
                                };
                                (base..base + p.head_dim).contains(&e)
                            })
                        })
                    });
                    let what = if written { "a written slot" } else { "an element outside the written slots" };
                    detail = Some(if float {
                        format!(
                            "{which} cache element {i} ({what}): bits {g:#06x} ({:e}), reference {w:#06x} ({:e})",
                            decode(dtype, g),
                            decode(dtype, w)
                        )
                    } else {
                        format!(
                            "{which} cache byte {i} (q8_0 block {}, {what}): {g:#04x}, reference {w:#04x}",
                            i / Q8_0_BLOCK_BYTES
                        )
                    });
                }
            }
        }
    }
    Outcome {
        passed: mismatches == 0,
        checked,
        mismatches,
        max_abs_err: if mismatches == 0 { 0.0 } else { f64::NAN },
        worst_ratio: if mismatches == 0 { 0.0 } else { f64::INFINITY },
        nmse: 0.0,
        tolerance: "bit-exact, every byte of both caches",
        detail,
    }
}
