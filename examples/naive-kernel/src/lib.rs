//! A naive Vulkan decode-attention kernel of its own, tested with vkdecode's conformance suite
//! through the public API only: [`NaiveKernel`] implements
//! [`vkdecode::implementation::Implementation`], and `tests/suite.rs` hands it to
//! [`vkdecode::implementation::Suite`] (corpus, grid, property draws, harness mutants).
//!
//! The kernel (`shaders/examples/naive_attention.comp` (at the repository root)) runs one workgroup per (sequence, query token,
//! query head) with a two-pass softmax over f32 caches. `NaiveKernel::new(true)` compiles it with
//! a planted bug (the causal bound off by one), which `tests/planted_bug.rs` shows the suite
//! catches.

use std::borrow::Cow;
use std::sync::Arc;

use vkdecode::cases::LayoutKind;
use vkdecode::cases::data::AttentionInputs;
use vkdecode::cases::run::{AttentionGpu, RunError};
use vkdecode::cases::tolerance::Precision;
use vkdecode::gpu::{Buffer, Context, Location, PipelineDesc, Recorder, Shader};
use vkdecode::implementation::{Capabilities, HeadDims, Implementation, KernelKind, SlotContract};
use vkdecode::kernels::Dtype;

/// The kernel's SPIR-V, compiled by build.rs.
static SHADER: Shader = Shader {
    name: Cow::Borrowed("naive_attention"),
    spirv: Cow::Borrowed(include_bytes!(concat!(env!("OUT_DIR"), "/naive_attention.spv"))),
};

/// The shader's private accumulator holds this many dims (`MAX_HEAD_DIM` there).
const MAX_HEAD_DIM: usize = 256;
/// Bindings: q, k_cache, v_cache, seq_lens, out.
const BINDINGS: u32 = 5;

/// The naive kernel, optionally with its planted bug.
pub struct NaiveKernel {
    planted_bug: bool,
    caps: Capabilities,
}

impl NaiveKernel {
    /// `planted_bug`: attend one position past each query (the suite must catch it).
    pub fn new(planted_bug: bool) -> NaiveKernel {
        let caps = Capabilities {
            kernels: vec![KernelKind::Attention],
            dtypes: vec![Dtype::F32],
            head_dims: HeadDims { multiple_of: 8, min: 8, max: MAX_HEAD_DIM },
            max_gqa_ratio: 32,
            max_queries: 8,
            layouts: vec![LayoutKind::HeadMajor, LayoutKind::TokenMajor],
            options: Vec::new(), // no window, softcap, sinks, fused append or split_chunk
            precision: Precision::F32,
            unread_slots: SlotContract::Poison, // positions past the causal bound are never read
            ..Capabilities::default()
        };
        NaiveKernel { planted_bug, caps }
    }

    fn error(&self, message: impl Into<String>) -> RunError {
        RunError::Implementation { implementation: self.name().to_string(), message: message.into() }
    }

    /// Checks everything the shader relies on; returns the push constants and the grid.
    fn launch(&self, ctx: &Context, inputs: &AttentionInputs) -> Result<(Vec<u8>, [u32; 3]), RunError> {
        let p = &inputs.params;
        let layout = &p.layout;
        if p.dtype != Dtype::F32 {
            return Err(RunError::Unsupported(format!("dtype {} (the naive kernel reads f32 caches)", p.dtype)));
        }
        if p.window.is_some() || p.softcap.is_some() || p.sinks || p.fused || p.qk_norm_rope.is_some() {
            return Err(RunError::Unsupported("options (the naive kernel has none)".into()));
        }
        if p.head_dim == 0 || p.head_dim > MAX_HEAD_DIM {
            return Err(self.error(format!("head_dim {} is not in 1..={MAX_HEAD_DIM}", p.head_dim)));
        }
        if p.n_kv_heads == 0 || !p.n_q_heads.is_multiple_of(p.n_kv_heads) {
            return Err(self.error(format!("{} query heads over {} kv heads", p.n_q_heads, p.n_kv_heads)));
        }
        if (layout.n_seqs, layout.n_kv_heads, layout.head_dim) != (p.n_seqs, p.n_kv_heads, p.head_dim) {
            return Err(self.error("the cache layout does not match the problem's shape"));
        }
        if inputs.seq_lens.len() != p.n_seqs || inputs.seq_lens.iter().any(|&l| l as usize > layout.capacity) {
            return Err(self.error(format!(
                "seq_lens {:?}: need one per sequence, each at most the capacity {}",
                inputs.seq_lens, layout.capacity
            )));
        }
        let q_elements = p.n_seqs * p.n_queries * p.n_q_heads * p.head_dim;
        if inputs.q.len() != q_elements {
            return Err(self.error(format!("q holds {} elements, {q_elements} expected", inputs.q.len())));
        }
        let cache_bytes = layout.min_elements() * 4;
        if inputs.k_bytes.len() < cache_bytes || inputs.v_bytes.len() < cache_bytes {
            return Err(self.error(format!("a cache holds fewer than the layout's {cache_bytes} bytes")));
        }
        // The shader indexes with 32-bit unsigned arithmetic.
        let u32_of = |what: &str, x: usize| u32::try_from(x).map_err(|_| self.error(format!("{what} {x} exceeds u32")));
        u32_of("q elements", q_elements)?;
        u32_of("cache elements", layout.min_elements())?;
        let words = [
            u32_of("n_seqs", p.n_seqs)?,
            u32_of("n_queries", p.n_queries)?,
            u32_of("n_q_heads", p.n_q_heads)?,
            u32_of("n_kv_heads", p.n_kv_heads)?,
            u32_of("head_dim", p.head_dim)?,
            u32_of("capacity", layout.capacity)?,
            u32_of("stride_seq", layout.stride_seq)?,
            u32_of("stride_head", layout.stride_head)?,
            u32_of("stride_pos", layout.stride_pos)?,
            p.scale.to_bits(),
        ];
        // One workgroup per (query head, query token, sequence).
        let groups = [words[2], words[1], words[0]];
        let max = ctx.info().max_workgroup_count;
        if (0..3).any(|i| groups[i] > max[i]) {
            return Err(
                self.error(format!("{groups:?} workgroups exceed the device's maxComputeWorkGroupCount {max:?}"))
            );
        }
        Ok((words.iter().flat_map(|w| w.to_le_bytes()).collect(), groups))
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Implementation for NaiveKernel {
    fn name(&self) -> &str {
        if self.planted_bug { "naive+planted_bug" } else { "naive" }
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn attention(&self, ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<AttentionGpu, RunError> {
        let (push, groups) = self.launch(ctx, inputs)?;
        let seq_lens: Vec<u8> = inputs.seq_lens.iter().flat_map(|l| l.to_le_bytes()).collect();
        let q = Buffer::with_bytes(ctx, "naive.q", &f32_bytes(&inputs.q), Location::Upload)?;
        let k = Buffer::with_bytes(ctx, "naive.k_cache", &inputs.k_bytes, Location::Upload)?;
        let v = Buffer::with_bytes(ctx, "naive.v_cache", &inputs.v_bytes, Location::Upload)?;
        let lens = Buffer::with_bytes(ctx, "naive.seq_lens", &seq_lens, Location::Upload)?;
        // NaN-filled, so an element the kernel forgets to write shows.
        let out =
            Buffer::with_bytes(ctx, "naive.out", &f32_bytes(&vec![f32::NAN; inputs.q.len()]), Location::Readback)?;

        let pipeline = ctx.pipeline(&PipelineDesc {
            shader: &SHADER,
            bindings: BINDINGS,
            push_constant_bytes: push.len() as u32,
            spec: &[(0, u32::from(self.planted_bug))],
        })?;
        let mut rec = Recorder::new(ctx)?;
        rec.dispatch(&pipeline, &[&q, &k, &v, &lens, &out], &push, groups, "naive_attention")?;
        rec.submit()?;

        let out = out.read()?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(AttentionGpu::output(out))
    }
}
