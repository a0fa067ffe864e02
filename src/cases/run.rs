//! Runs a case on a device and judges it against the reference.
//!
//! Every output buffer is poisoned before the dispatch (so an element the kernel forgot to write
//! fails), every element is compared, and the verdict uses the tolerances of
//! [`super::tolerance`] only. Validation-layer messages raised while a case ran fail it too.

use std::sync::Arc;

use vkdecode_reference::dtype::{decode, load};
use vkdecode_reference::{AttentionShape, decode_attention};

use super::data::{AppendInputs, AttentionInputs, append_inputs, attention_inputs};
use super::model::{AppendCase, AttentionCase, Case};
use super::tolerance::{ATTENTION_MAX_NMSE, attention_element_bound};
use crate::gpu::{Buffer, Context, GpuError, Location, Recorder};
use crate::kernels::attention::{self, AttentionBuffers};
use crate::kernels::kv_append::{self, AppendBuffers};
use crate::kernels::{KernelError, Mutant, ParamError};

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

/// One attention run: the inputs, the GPU output and the reference output.
pub struct AttentionRun {
    pub inputs: AttentionInputs,
    pub gpu: Vec<f32>,
    pub reference: Vec<f64>,
}

/// One append run: the inputs and both caches after the GPU and the reference appends.
pub struct AppendRun {
    pub inputs: AppendInputs,
    pub gpu_k: Vec<u8>,
    pub gpu_v: Vec<u8>,
    pub ref_k: Vec<u8>,
    pub ref_v: Vec<u8>,
}

/// Runs any case; `mutant` applies only if it belongs to the case's kernel.
pub fn run_case(ctx: &Arc<Context>, case: &Case, mutant: Option<Mutant>) -> Result<Outcome, RunError> {
    let mut outcome = match case {
        Case::Attention(c) => run_attention(ctx, c, mutant.and_then(Mutant::attention))?.0,
        Case::KvAppend(c) => run_append(ctx, c, mutant.and_then(Mutant::append))?.0,
    };
    let messages = ctx.take_validation_messages();
    if !messages.is_empty() {
        outcome.passed = false;
        outcome.detail = Some(format!("{} validation message(s):\n{}", messages.len(), messages.join("\n")));
    }
    Ok(outcome)
}

fn poison_bytes(bytes: u64) -> Vec<u8> {
    OUTPUT_POISON.to_le_bytes().into_iter().cycle().take(bytes as usize).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u32_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs an attention case on the GPU and the reference, and compares.
pub fn run_attention(
    ctx: &Arc<Context>,
    case: &AttentionCase,
    mutant: Option<attention::AttentionMutant>,
) -> Result<(Outcome, AttentionRun), RunError> {
    let inputs = attention_inputs(case)?;
    let gpu = run_attention_inputs(ctx, &inputs, mutant)?;
    let reference = attention_reference(&inputs);
    let outcome = check_attention(&inputs, &gpu, &reference);
    Ok((outcome, AttentionRun { inputs, gpu, reference }))
}

/// Runs materialized attention inputs on the device (for inputs no case describes, such as the
/// derived problems of metamorphic properties) and returns the output, flattened like Q. Output
/// and split-K partials are poisoned first, so anything left unwritten shows.
pub fn run_attention_inputs(
    ctx: &Arc<Context>,
    inputs: &AttentionInputs,
    mutant: Option<attention::AttentionMutant>,
) -> Result<Vec<f32>, RunError> {
    let p = inputs.params;
    p.validate(ctx)?;
    p.validate_seq_lens(&inputs.seq_lens)?;
    let q = Buffer::with_bytes(ctx, "attention.q", &f32_bytes(&inputs.q), Location::Upload)?;
    let lens = Buffer::with_bytes(ctx, "attention.seq_lens", &u32_bytes(&inputs.seq_lens), Location::Upload)?;
    let k = Buffer::with_bytes(ctx, "attention.k_cache", &inputs.k_bytes, Location::Upload)?;
    let v = Buffer::with_bytes(ctx, "attention.v_cache", &inputs.v_bytes, Location::Upload)?;
    let out = Buffer::with_bytes(ctx, "attention.out", &poison_bytes(4 * p.q_elements() as u64), Location::Readback)?;
    let partial_o =
        Buffer::with_bytes(ctx, "attention.partial_o", &poison_bytes(p.partial_o_bytes()), Location::Upload)?;
    let partial_ml =
        Buffer::with_bytes(ctx, "attention.partial_ml", &poison_bytes(p.partial_ml_bytes()), Location::Upload)?;
    let mut rec = Recorder::new(ctx)?;
    let bufs = AttentionBuffers {
        q: &q,
        seq_lens: &lens,
        k_cache: &k,
        v_cache: &v,
        out: &out,
        partial_o: &partial_o,
        partial_ml: &partial_ml,
    };
    attention::record(&mut rec, ctx, &p, bufs, mutant)?;
    rec.submit()?;
    Ok(out.read()?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4-byte chunk"))).collect())
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
    let out = decode_attention(&shape, &inputs.q, &inputs.k, &inputs.v, &p.layout, &lens, f64::from(p.scale));
    out.iter().copied().collect()
}

/// Compares a GPU attention output with the reference, element by element.
pub fn check_attention(inputs: &AttentionInputs, gpu: &[f32], reference: &[f64]) -> Outcome {
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
            let n = (len - p.n_queries as i64 + t as i64 + 1).max(0) as usize;
            for h in 0..p.n_q_heads {
                let kvh = h / group;
                let row = ((b * p.n_queries + t) * p.n_q_heads + h) * d;
                let q = &inputs.q[row..row + d];
                let (mut max_qk, mut max_v) = (0f64, 0f64);
                for j in 0..n {
                    let base = p.layout.offset(b, kvh, j, 0);
                    let qk: f64 = (0..d).map(|i| (f64::from(q[i]) * f64::from(inputs.k[base + i])).abs()).sum();
                    max_qk = max_qk.max(scale * qk);
                    max_v = (0..d).map(|i| f64::from(inputs.v[base + i]).abs()).fold(max_v, f64::max);
                }
                let bound = attention_element_bound(n, d, max_qk, max_v);
                for i in 0..d {
                    let (got, want) = (f64::from(gpu[row + i]), reference[row + i]);
                    let err = (got - want).abs();
                    err2 += if err.is_finite() { err * err } else { f64::INFINITY };
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
        tolerance: "worst-case f32 bound per element, NMSE <= 5e-4",
        detail,
    }
}

/// Runs an append case on the GPU and the reference, and compares every byte of both caches.
pub fn run_append(
    ctx: &Arc<Context>,
    case: &AppendCase,
    mutant: Option<kv_append::AppendMutant>,
) -> Result<(Outcome, AppendRun), RunError> {
    let inputs = append_inputs(case)?;
    let p = inputs.params;
    p.validate(ctx)?;
    p.validate_starts(&inputs.starts)?;
    let new_k = Buffer::with_bytes(ctx, "kv_append.new_k", &f32_bytes(&inputs.new_k), Location::Upload)?;
    let new_v = Buffer::with_bytes(ctx, "kv_append.new_v", &f32_bytes(&inputs.new_v), Location::Upload)?;
    let start = Buffer::with_bytes(ctx, "kv_append.start", &u32_bytes(&inputs.starts), Location::Upload)?;
    let k_cache = Buffer::with_bytes(ctx, "kv_append.k_cache", &inputs.k_before, Location::Readback)?;
    let v_cache = Buffer::with_bytes(ctx, "kv_append.v_cache", &inputs.v_before, Location::Readback)?;
    let mut rec = Recorder::new(ctx)?;
    let bufs = AppendBuffers { new_k: &new_k, new_v: &new_v, start: &start, k_cache: &k_cache, v_cache: &v_cache };
    kv_append::record(&mut rec, ctx, &p, bufs, mutant)?;
    rec.submit()?;
    let (gpu_k, gpu_v) = (k_cache.read()?, v_cache.read()?);
    let starts: Vec<usize> = inputs.starts.iter().map(|&s| s as usize).collect();
    let (mut ref_k, mut ref_v) = (inputs.k_before.clone(), inputs.v_before.clone());
    vkdecode_reference::kv_append(p.dtype, &mut ref_k, &p.layout, &inputs.new_k, p.n_new, &starts);
    vkdecode_reference::kv_append(p.dtype, &mut ref_v, &p.layout, &inputs.new_v, p.n_new, &starts);
    let outcome = check_append(&inputs, [("K", &gpu_k, &ref_k), ("V", &gpu_v, &ref_v)]);
    Ok((outcome, AppendRun { inputs, gpu_k, gpu_v, ref_k, ref_v }))
}

/// Compares caches after an append element by element, bit for bit.
pub fn check_append(inputs: &AppendInputs, caches: [(&str, &Vec<u8>, &Vec<u8>); 2]) -> Outcome {
    let p = &inputs.params;
    let dtype = p.dtype;
    let mut mismatches = 0;
    let mut detail = None;
    let mut checked = 0;
    for (which, got, want) in caches {
        checked += got.len();
        for i in 0..got.len() / dtype.size() {
            let (g, w) = (load(dtype, got, i), load(dtype, want, i));
            if g != w {
                mismatches += 1;
                if detail.is_none() {
                    let l = &p.layout;
                    let written = (0..p.n_seqs).any(|b| {
                        (0..p.n_new).any(|t| {
                            let pos = inputs.starts[b] as usize + t;
                            (0..p.n_kv_heads).any(|h| {
                                let base = l.offset(b, h, pos, 0);
                                (base..base + p.head_dim).contains(&i)
                            })
                        })
                    });
                    let what = if written { "a written slot" } else { "an element outside the written slots" };
                    detail = Some(format!(
                        "{which} cache element {i} ({what}): bits {g:#06x} ({:e}), reference {w:#06x} ({:e})",
                        decode(dtype, g),
                        decode(dtype, w)
                    ));
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
