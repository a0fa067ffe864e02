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
                    let size = p.dtype.size();
                    for b in 0..p.n_seqs {
                        for pos in 0..p.layout.capacity {
                            let (a, c) = (p.layout.offset(b, 0, pos, 0) * size, p.layout.offset(b, 1, pos, 0) * size);
                            let row = p.head_dim * size;
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
