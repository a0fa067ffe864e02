//! Timing a manifest's kernel at the same shapes, with the same method, as vkdecode's own
//! (`bench attention --manifest FILE`): finite data (the `finite` slot contract's poison in
//! unused slots), device-local buffers, K/V rotated over copies spanning twice the assumed
//! last-level cache, warm-up, GPU timestamps around back-to-back calls with a barrier between
//! them, medians over submits.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::attention::{AttentionBenchConfig, DecodeShape, rotation_copies};
use super::timing::{Between, Timing, time_calls};
use super::upload::{device_buffer, device_copies};
use super::{BenchError, Result, gb_per_s};
use crate::cases::data::attention_inputs_for;
use crate::cases::model::{AttentionCase, Poison};
use crate::gpu::{Buffer, Context, Location};
use crate::implementation::{Implementation, SlotContract};
use crate::manifest::{ManifestKernel, Role};

/// One timed shape of a manifest's kernel.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ForeignMeasurement {
    pub implementation: String,
    pub shape: DecodeShape,
    /// Bytes counted per call (K+V read once).
    pub kv_bytes: u64,
    pub copies: usize,
    pub timing: Timing,
}

impl ForeignMeasurement {
    pub fn gbps(&self) -> f64 {
        gb_per_s(self.kv_bytes, self.timing.per_call.median_ns)
    }
}

/// The case a benchmark shape stands for: every sequence at its full length, one layout.
pub fn bench_case(shape: &DecodeShape, config: &AttentionBenchConfig) -> AttentionCase {
    let heads = (shape.n_q_heads, shape.n_kv_heads, shape.head_dim);
    let mut case = crate::cases::grid::base(shape.dtype, heads, vec![shape.kv; shape.batch], shape.capacity);
    case.description = format!("bench shape {}", shape.spec());
    case.n_queries = shape.n_queries;
    case.layout = match config.layout {
        super::attention::LayoutKind::HeadMajor => crate::cases::LayoutKind::HeadMajor,
        super::attention::LayoutKind::TokenMajor => crate::cases::LayoutKind::TokenMajor,
    };
    case.data.seed = 1;
    case.data.poison = Poison::Large;
    case
}

/// Times `kernel` at `shape`; `Ok(None)` when the shape is outside its capabilities or no variant
/// admits it (the reason goes to `unsupported`).
pub fn measure_manifest(
    ctx: &Arc<Context>,
    kernel: &ManifestKernel,
    shape: &DecodeShape,
    config: &AttentionBenchConfig,
    on_submit: &mut dyn FnMut(),
) -> Result<std::result::Result<ForeignMeasurement, String>> {
    let case = bench_case(shape, config);
    if let Err(reason) = kernel.capabilities().admits(&crate::cases::Case::Attention(case.clone())) {
        return Ok(Err(reason.0));
    }
    let fail = |e: crate::cases::RunError| BenchError::Config(format!("{} at {}: {e}", kernel.name(), shape.spec()));
    let inputs = attention_inputs_for(&case, SlotContract::Finite).map_err(|e| fail(e.into()))?;
    let call = match kernel.prepare(ctx, &inputs) {
        Ok(call) => call,
        Err(crate::cases::RunError::Unsupported(reason)) => return Ok(Err(reason)),
        Err(e) => return Err(fail(e)),
    };
    let cache_bytes = inputs.k_bytes.len() as u64;
    let copies = rotation_copies(2 * cache_bytes, config.llc_bytes);
    let mut fixed: BTreeMap<String, Buffer> = BTreeMap::new();
    let mut rotating: BTreeMap<String, Vec<Buffer>> = BTreeMap::new();
    for (name, role, bytes) in &call.contents {
        let label = format!("bench.{}.{name}", kernel.name());
        match role {
            Role::KCache | Role::VCache => {
                let names: Vec<String> = (0..copies).map(|c| format!("{label}.{c}")).collect();
                rotating.insert(name.clone(), device_copies(ctx, &names, bytes)?);
            }
            Role::Out | Role::Scratch => {
                fixed.insert(name.clone(), Buffer::new(ctx, &label, bytes.len() as u64, Location::Device)?);
            }
            _ => {
                fixed.insert(name.clone(), device_buffer(ctx, &label, bytes)?);
            }
        }
    }
    let what = format!("{} {}", kernel.name(), shape.spec());
    let timing = time_calls(
        ctx,
        &what,
        config.timing,
        Between::Barrier,
        |rec, i| {
            let c = (i % copies as u64) as usize;
            let buffer = |name: &str| -> &Buffer {
                match rotating.get(name) {
                    Some(copies) => &copies[c],
                    None => &fixed[name],
                }
            };
            kernel.record(rec, &call, &buffer).map_err(|e| BenchError::Config(format!("{what}: {e}")))
        },
        on_submit,
    )?;
    Ok(Ok(ForeignMeasurement {
        implementation: kernel.name().to_string(),
        shape: shape.clone(),
        kv_bytes: shape.kv_bytes(),
        copies,
        timing,
    }))
}
