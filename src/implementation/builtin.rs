//! vkdecode's own kernels as an implementation under test, through the same seam as any other.
//! Its capabilities are the kernels' contract (every valid case), strict f32 precision and the
//! poison slot contract; a [`Mutant`] selects a deliberately broken variant.

use std::sync::Arc;

use super::{AppendGpu, Capabilities, Implementation};
use crate::cases::data::{AppendInputs, AttentionInputs, block_table_words};
use crate::cases::run::{AttentionGpu, RunError, f32_bytes, run_attention_gpu};
use crate::gpu::{Buffer, Context, Location, Recorder};
use crate::kernels::kv_append::{self, AppendBuffers};
use crate::kernels::{Mutant, words};

/// vkdecode's kernels, or one of their mutants.
pub struct Builtin {
    name: String,
    mutant: Option<Mutant>,
    capabilities: Capabilities,
}

impl Builtin {
    pub fn new() -> Builtin {
        Builtin::with_mutant(None)
    }

    /// The kernels with `mutant` applied where it belongs (an attention mutant leaves the append
    /// kernel clean and the reverse).
    pub fn with_mutant(mutant: Option<Mutant>) -> Builtin {
        let name = mutant.map_or_else(|| "vkdecode".to_string(), |m| format!("vkdecode+{}", m.name()));
        Builtin { name, mutant, capabilities: Capabilities::builtin() }
    }
}

impl Default for Builtin {
    fn default() -> Self {
        Builtin::new()
    }
}

impl Implementation for Builtin {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn attention(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
        run_attention_gpu(ctx, inputs, self.mutant.and_then(Mutant::attention))
    }

    fn append(&self, ctx: &Arc<Context>, inputs: &AppendInputs) -> Result<AppendGpu, RunError> {
        let p = inputs.params;
        p.validate(ctx)?;
        p.validate_starts(&inputs.starts)?;
        let new_k = Buffer::with_bytes(ctx, "kv_append.new_k", &f32_bytes(&inputs.new_k), Location::Upload)?;
        let new_v = Buffer::with_bytes(ctx, "kv_append.new_v", &f32_bytes(&inputs.new_v), Location::Upload)?;
        let start = Buffer::with_bytes(ctx, "kv_append.start", &words(&inputs.starts), Location::Upload)?;
        let k_cache = Buffer::with_bytes(ctx, "kv_append.k_cache", &inputs.k_before, Location::Readback)?;
        let v_cache = Buffer::with_bytes(ctx, "kv_append.v_cache", &inputs.v_before, Location::Readback)?;
        let block_tables = match &inputs.paged {
            Some(paged) => {
                let tables = block_table_words(paged);
                p.validate_block_table_writes(&tables, &inputs.starts)?;
                Some(Buffer::with_bytes(ctx, "kv_append.block_tables", &words(&tables), Location::Upload)?)
            }
            None => None,
        };
        let mut rec = Recorder::new(ctx)?;
        let block_tables = block_tables.as_ref();
        let bufs = AppendBuffers {
            new_k: &new_k,
            new_v: &new_v,
            start: &start,
            k_cache: &k_cache,
            v_cache: &v_cache,
            block_tables,
        };
        kv_append::record(&mut rec, ctx, &p, bufs, self.mutant.and_then(Mutant::append))?;
        rec.submit()?;
        Ok(AppendGpu { k_cache: k_cache.read()?, v_cache: v_cache.read()? })
    }
}
