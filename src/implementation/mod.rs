//! The seam every implementation under test goes through: vkdecode's own kernels ([`Builtin`]),
//! a manifest-described SPIR-V kernel, or a downstream crate's kernel behind [`Implementation`].
//!
//! An implementation declares [`Capabilities`] (what it supports, where it rounds, what its
//! unused cache slots may hold) and runs materialized inputs, returning its outputs. The harness
//! owns everything else: drawing or loading the case, checking it against the capabilities (a case
//! outside them is [`Judged::Unsupported`], counted, never a failure), materializing the inputs
//! with the declared slot contract, computing the f64 reference, judging with the declared
//! precision profile, and collecting validation-layer messages. A [`HarnessMutant`] feeds the
//! implementation a deliberately wrong input (a length off by one, kv heads swapped, sinks
//! dropped) while the reference keeps the right one: it proves the judge has power over a
//! kernel's layout without touching its code.

pub mod builtin;
pub mod capabilities;
pub mod suite;

use std::sync::Arc;

pub use builtin::Builtin;
// What an implementation works with, in one place.
pub use crate::cases::data::{AppendInputs, AttentionInputs};
pub use crate::cases::model::LayoutKind;
pub use crate::cases::run::{AttentionGpu, Outcome, RunError};
pub use crate::cases::tolerance::Precision;
pub use crate::kernels::{CacheLayout, Dtype};
pub use capabilities::{AttentionOption, Capabilities, HeadDims, KernelKind, SlotContract, Unsupported};
pub use suite::{Expectations, Suite};

use crate::cases::model::Case;
use crate::gpu::Context;

/// The caches an append left behind.
pub struct AppendGpu {
    pub k_cache: Vec<u8>,
    pub v_cache: Vec<u8>,
}

/// A kernel under test. `ctx` is vkdecode's device context: an implementation may record into it
/// (buffers, pipelines, [`crate::gpu::Recorder`]) or run on its own runtime and ignore it.
pub trait Implementation: Send + Sync {
    /// A short name for reports (`vkdecode`, `ggml-flash-attn-f32-f16`, ...).
    fn name(&self) -> &str;

    fn capabilities(&self) -> &Capabilities;

    /// Runs one decode-attention call: Q f32 `[B][T][H][D]`, the caches as raw bytes in the
    /// inputs' layout, `seq_lens`, optional sinks and fused new K/V. Returns the f32 output
    /// flattened like Q (and, for fused calls, both caches after the call).
    fn attention(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
        let _ = (ctx, inputs);
        Err(RunError::NotImplemented { implementation: self.name().to_string(), kernel: "attention" })
    }

    /// Runs one KV append: writes `new_k`/`new_v` at `starts[b] + t` into copies of the caches.
    fn append(&self, ctx: &Arc<Context>, inputs: &AppendInputs) -> Result<AppendGpu, RunError> {
        let _ = (ctx, inputs);
        Err(RunError::NotImplemented { implementation: self.name().to_string(), kernel: "kv_append" })
    }

    /// What `vkdecode replay FILE` needs after the file to run a case on this implementation
    /// (` --manifest m.toml`), for the fuzzer's reproducer lines; empty for vkdecode's own.
    fn replay_args(&self) -> String {
        String::new()
    }

    /// Cases it prefers per call of the batch methods (a worker process amortizes a round trip
    /// over a batch); campaigns hand it batches of this size. 1: one case at a time.
    fn batch_size(&self) -> usize {
        1
    }

    /// Runs several attention calls, one result each, in order.
    fn attention_batch(&self, ctx: &Arc<Context>, inputs: &[&AttentionInputs]) -> Vec<Result<AttentionGpu, RunError>> {
        inputs.iter().map(|i| self.attention(ctx, i)).collect()
    }

    /// Runs several appends, one result each, in order.
    fn append_batch(&self, ctx: &Arc<Context>, inputs: &[&AppendInputs]) -> Vec<Result<AppendGpu, RunError>> {
        inputs.iter().map(|i| self.append(ctx, i)).collect()
    }
}

/// The verdict on one case for one implementation.
#[derive(Clone, Debug)]
pub enum Judged {
    /// Outside the implementation's capabilities: why.
    Unsupported(String),
    Ran(Outcome),
}

impl Judged {
    /// Whether the verdict is what the case expects (`expect: pass` passes, `expect: fail`
    /// fails); unsupported cases are neither.
    pub fn ran(&self) -> Option<&Outcome> {
        match self {
            Judged::Ran(o) => Some(o),
            Judged::Unsupported(_) => None,
        }
    }
}

/// Deliberately wrong inputs handed to an implementation while the reference sees the right ones.
/// Each must be caught for any kernel the harness drives: they test the judge, not the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HarnessMutant {
    /// Every nonzero sequence length is passed one short.
    LengthOffByOne,
    /// The K cache's kv heads 0 and 1 swap places (cases with one kv head are left alone).
    SwapKvHeads,
    /// Sinks are not passed (cases without sinks are left alone).
    DropSinks,
}

impl HarnessMutant {
    pub const ALL: [HarnessMutant; 3] =
        [HarnessMutant::LengthOffByOne, HarnessMutant::SwapKvHeads, HarnessMutant::DropSinks];

    pub fn name(self) -> &'static str {
        match self {
            HarnessMutant::LengthOffByOne => "length_off_by_one",
            HarnessMutant::SwapKvHeads => "swap_kv_heads",
            HarnessMutant::DropSinks => "drop_sinks",
        }
    }

    /// Whether the mutant changes this case's inputs at all.
    pub fn applies(self, case: &Case) -> bool {
        match (self, case) {
            (HarnessMutant::LengthOffByOne, Case::Attention(c)) => c.seq_lens.iter().any(|&l| l > 0),
            (HarnessMutant::SwapKvHeads, Case::Attention(c)) => c.n_kv_heads > 1,
            (HarnessMutant::DropSinks, Case::Attention(c)) => c.sinks.is_some(),
            (_, Case::KvAppend(_)) => false,
        }
    }

    /// The inputs the implementation sees.
    pub fn apply(self, inputs: &AttentionInputs) -> AttentionInputs {
        let mut wrong = inputs.clone();
        match self {
            HarnessMutant::LengthOffByOne => {
                wrong.seq_lens.iter_mut().for_each(|l| *l = l.saturating_sub(1));
            }
            HarnessMutant::SwapKvHeads => {
                let p = &inputs.params;
                if p.n_kv_heads > 1 {
                    // Byte offsets (cache_bytes maps a row-aligned element offset to its byte).
                    let bytes = |e: usize| p.dtype.cache_bytes(e);
                    // Every "sequence" of the layout: for a paged cache, every page of the pool.
                    for b in 0..p.layout.n_seqs {
                        for pos in 0..p.layout.capacity {
                            let (a, c) = (bytes(p.layout.offset(b, 0, pos, 0)), bytes(p.layout.offset(b, 1, pos, 0)));
                            let row = bytes(p.head_dim);
                            let tmp = wrong.k_bytes[a..a + row].to_vec();
                            wrong.k_bytes.copy_within(c..c + row, a);
                            wrong.k_bytes[c..c + row].copy_from_slice(&tmp);
                        }
                    }
                }
            }
            HarnessMutant::DropSinks => {
                wrong.sinks = None;
                wrong.params.sinks = false;
            }
        }
        wrong
    }
}

/// The inputs of one admitted case (boxed: the two differ much in size).
enum Prepared {
    Attention(Box<AttentionInputs>),
    Append(Box<AppendInputs>),
}

/// Runs `cases` on `imp` through its batch methods (one call per kernel family) and judges each,
/// in order, exactly as [`judge_case`] would one by one. Validation-layer messages raised while
/// the batch ran fail every case that ran in it (they cannot be told apart).
pub fn judge_batch(ctx: &Arc<Context>, imp: &dyn Implementation, cases: &[Case]) -> Vec<Result<Judged, RunError>> {
    use crate::cases::data::{append_inputs, attention_inputs_for};
    let caps = imp.capabilities();
    let prepared: Vec<Result<Result<Prepared, String>, RunError>> = cases
        .iter()
        .map(|case| {
            if let Err(Unsupported(reason)) = caps.admits(case) {
                return Ok(Err(reason));
            }
            Ok(Ok(match case {
                Case::Attention(c) => Prepared::Attention(Box::new(attention_inputs_for(c, caps.unread_slots)?)),
                Case::KvAppend(c) => Prepared::Append(Box::new(append_inputs(c)?)),
            }))
        })
        .collect();
    let attention: Vec<&AttentionInputs> = prepared
        .iter()
        .filter_map(|p| match p {
            Ok(Ok(Prepared::Attention(i))) => Some(&**i),
            _ => None,
        })
        .collect();
    let append: Vec<&AppendInputs> = prepared
        .iter()
        .filter_map(|p| match p {
            Ok(Ok(Prepared::Append(i))) => Some(&**i),
            _ => None,
        })
        .collect();
    let mut attention_out =
        if attention.is_empty() { Vec::new() } else { imp.attention_batch(ctx, &attention) }.into_iter();
    let mut append_out = if append.is_empty() { Vec::new() } else { imp.append_batch(ctx, &append) }.into_iter();
    let messages = ctx.take_validation_messages();
    let missing = || RunError::Implementation {
        implementation: imp.name().to_string(),
        message: "a batch call returned fewer results than inputs".into(),
    };
    prepared
        .into_iter()
        .map(|p| {
            let mut outcome = match p? {
                Err(reason) => return Ok(Judged::Unsupported(reason)),
                Ok(Prepared::Attention(inputs)) => {
                    let gpu = match attention_out.next().ok_or_else(missing)? {
                        Err(RunError::Unsupported(reason)) => return Ok(Judged::Unsupported(reason)),
                        other => other?,
                    };
                    crate::cases::run::check_output_len(imp.name(), &inputs, gpu.out.len())?;
                    crate::cases::run::judge_attention_output(&caps.precision, &inputs, &gpu.out, &gpu).0
                }
                Ok(Prepared::Append(inputs)) => {
                    let gpu = match append_out.next().ok_or_else(missing)? {
                        Err(RunError::Unsupported(reason)) => return Ok(Judged::Unsupported(reason)),
                        other => other?,
                    };
                    crate::cases::run::check_caches_len(imp.name(), &inputs, &gpu)?;
                    crate::cases::run::judge_append_output(&inputs, &gpu.k_cache, &gpu.v_cache).0
                }
            };
            if !messages.is_empty() {
                outcome.passed = false;
                outcome.detail = Some(format!("{} validation message(s):\n{}", messages.len(), messages.join("\n")));
            }
            Ok(Judged::Ran(outcome))
        })
        .collect()
}

/// Runs one case on `imp` and judges it (see the module notes); `harness` feeds it wrong inputs.
pub fn judge_case(
    ctx: &Arc<Context>,
    imp: &dyn Implementation,
    case: &Case,
    harness: Option<HarnessMutant>,
) -> Result<Judged, RunError> {
    let caps = imp.capabilities();
    if let Err(Unsupported(reason)) = caps.admits(case) {
        return Ok(Judged::Unsupported(reason));
    }
    let ran = match case {
        Case::Attention(c) => crate::cases::run::run_attention_with(ctx, imp, c, harness).map(|r| r.0),
        Case::KvAppend(c) => crate::cases::run::run_append_with(ctx, imp, c).map(|r| r.0),
    };
    let mut outcome = match ran {
        Err(RunError::Unsupported(reason)) => {
            ctx.take_validation_messages();
            return Ok(Judged::Unsupported(reason));
        }
        other => other?,
    };
    let messages = ctx.take_validation_messages();
    if !messages.is_empty() {
        outcome.passed = false;
        outcome.detail = Some(format!("{} validation message(s):\n{}", messages.len(), messages.join("\n")));
    }
    Ok(Judged::Ran(outcome))
}
