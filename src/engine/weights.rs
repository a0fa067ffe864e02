//! A Qwen3 model's weights on the GPU, in their stored element type: uploaded from a checkpoint
//! (through a staging buffer into device-local memory) or generated on the GPU at real shapes.

use std::sync::Arc;

use crate::gpu::{Buffer, Context, Location, Recorder};
use crate::kernels::Dtype;
use crate::kernels::layers::{self, Matrix, Vector};
use crate::model::{Checkpoint, Qwen3Config, WeightDtype};

use super::EngineError;

/// Bytes of the staging buffer that carries checkpoint tensors to the GPU.
const STAGING_BYTES: u64 = 64 << 20;

/// One tensor on the GPU.
pub struct GpuTensor {
    pub buffer: Buffer,
    pub dtype: Dtype,
    /// `[rows, cols]` for matrices, `[len]` for vectors.
    pub shape: Vec<usize>,
}

impl GpuTensor {
    pub fn matrix(&self) -> Matrix<'_> {
        let (rows, cols) = match self.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => (0, 0),
        };
        Matrix { buffer: &self.buffer, dtype: self.dtype, rows, cols }
    }

    pub fn vector(&self) -> Vector<'_> {
        Vector { buffer: &self.buffer, dtype: self.dtype, len: self.shape.iter().product() }
    }

    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// The tensors of one decoder layer, in HF's names.
pub struct LayerWeights {
    pub input_layernorm: GpuTensor,
    pub q_proj: GpuTensor,
    pub k_proj: GpuTensor,
    pub v_proj: GpuTensor,
    pub o_proj: GpuTensor,
    pub q_norm: GpuTensor,
    pub k_norm: GpuTensor,
    pub post_attention_layernorm: GpuTensor,
    pub gate_proj: GpuTensor,
    pub up_proj: GpuTensor,
    pub down_proj: GpuTensor,
}

impl LayerWeights {
    fn all(&self) -> [&GpuTensor; 11] {
        [
            &self.input_layernorm,
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.q_norm,
            &self.k_norm,
            &self.post_attention_layernorm,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// Every weight of a dense Qwen3 model.
pub struct GpuWeights {
    pub embed_tokens: GpuTensor,
    pub layers: Vec<LayerWeights>,
    pub norm: GpuTensor,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<GpuTensor>,
}

pub(crate) fn kernel_dtype(d: WeightDtype) -> Dtype {
    match d {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::F16 => Dtype::F16,
        WeightDtype::Bf16 => Dtype::Bf16,
    }
}

/// The layer tensor names, in [`LayerWeights`] field order, and whether each is a norm weight.
const LAYER_TENSORS: [(&str, bool); 11] = [
    ("input_layernorm.weight", true),
    ("self_attn.q_proj.weight", false),
    ("self_attn.k_proj.weight", false),
    ("self_attn.v_proj.weight", false),
    ("self_attn.o_proj.weight", false),
    ("self_attn.q_norm.weight", true),
    ("self_attn.k_norm.weight", true),
    ("post_attention_layernorm.weight", true),
    ("mlp.gate_proj.weight", false),
    ("mlp.up_proj.weight", false),
    ("mlp.down_proj.weight", false),
];

/// Builds the weights from tensors made by `make(name, shape, is_norm)`, in checkpoint order.
fn assemble(
    config: &Qwen3Config,
    mut make: impl FnMut(&str, Vec<usize>, bool) -> Result<GpuTensor, EngineError>,
) -> Result<GpuWeights, EngineError> {
    let shapes: std::collections::HashMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
    let mut tensor = |name: String, is_norm: bool| {
        let shape = shapes.get(&name).cloned().ok_or_else(|| EngineError::Input(format!("no shape for `{name}`")))?;
        make(&name, shape, is_norm)
    };
    let embed_tokens = tensor("model.embed_tokens.weight".into(), false)?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut t: Vec<GpuTensor> = LAYER_TENSORS
            .iter()
            .map(|&(name, is_norm)| tensor(format!("model.layers.{l}.{name}"), is_norm))
            .collect::<Result<_, _>>()?;
        let mut next = || t.remove(0);
        layers.push(LayerWeights {
            input_layernorm: next(),
            q_proj: next(),
            k_proj: next(),
            v_proj: next(),
            o_proj: next(),
            q_norm: next(),
            k_norm: next(),
            post_attention_layernorm: next(),
            gate_proj: next(),
            up_proj: next(),
            down_proj: next(),
        });
    }
    let norm = tensor("model.norm.weight".into(), true)?;
    let lm_head = if config.tie_word_embeddings { None } else { Some(tensor("lm_head.weight".into(), false)?) };
    Ok(GpuWeights { embed_tokens, layers, norm, lm_head })
}

impl GpuWeights {
    /// Uploads every tensor of `checkpoint` (already validated by [`Checkpoint::open`]) into
    /// device-local memory. `progress(done, total)` is called in bytes.
    pub fn upload(
        ctx: &Arc<Context>,
        checkpoint: &Checkpoint,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<GpuWeights, EngineError> {
        let config = checkpoint.config();
        let total: u64 =
            checkpoint.tensor_names().filter_map(|n| checkpoint.tensor(n)).map(|t| t.bytes.len() as u64).sum();
        let mut staging = Buffer::new(ctx, "weights.staging", STAGING_BYTES, Location::Upload)?;
        let mut done = 0u64;
        assemble(config, |name, shape, _| {
            let t = checkpoint.tensor(name).ok_or_else(|| EngineError::Input(format!("tensor `{name}` is missing")))?;
            let buffer = Buffer::new(ctx, name, t.bytes.len() as u64, Location::Device)?;
            for (i, chunk) in t.bytes.chunks(STAGING_BYTES as usize).enumerate() {
                staging.write(0, chunk)?;
                let mut rec = Recorder::new(ctx)?;
                rec.copy_region(&staging, 0, &buffer, i as u64 * STAGING_BYTES, chunk.len() as u64)?;
                rec.submit()?;
                done += chunk.len() as u64;
                progress(done, total);
            }
            Ok(GpuTensor { buffer, dtype: kernel_dtype(t.dtype), shape })
        })
    }

    /// Random weights of `config`'s shapes in `dtype`, generated on the GPU: linear layers
    /// uniform with variance 1/fan_in, embeddings uniform in ±0.5, norm weights 1.
    pub fn random(
        ctx: &Arc<Context>,
        config: &Qwen3Config,
        dtype: Dtype,
        seed: u32,
    ) -> Result<GpuWeights, EngineError> {
        let mut index = 0u32;
        assemble(config, |name, shape, is_norm| {
            let elements: usize = shape.iter().product();
            let buffer = Buffer::new(ctx, name, (elements * dtype.size()) as u64, Location::Device)?;
            let (scale, offset) = match (is_norm, &shape[..]) {
                (true, _) => (0.0, 1.0),
                (false, &[_, cols]) if !name.contains("embed_tokens") => ((3.0 / cols as f32).sqrt(), 0.0),
                _ => (0.5, 0.0),
            };
            index += 1;
            let mut rec = Recorder::new(ctx)?;
            layers::fill(
                &mut rec,
                ctx,
                &buffer,
                dtype,
                elements,
                seed.wrapping_mul(7919).wrapping_add(index),
                scale,
                offset,
            )?;
            rec.submit()?;
            Ok(GpuTensor { buffer, dtype, shape })
        })
    }

    /// The head's weight (the embeddings when tied).
    pub fn lm_head(&self) -> &GpuTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes of weights one decode step reads: every tensor once, except that only one row of
    /// the embeddings is read unless they also serve as the head.
    pub fn bytes_per_token(&self) -> u64 {
        let layers: u64 = self.layers.iter().flat_map(|l| l.all()).map(GpuTensor::bytes).sum();
        let embed_row = self.embed_tokens.bytes() / self.embed_tokens.shape[0].max(1) as u64;
        layers + self.norm.bytes() + self.lm_head().bytes() + if self.lm_head.is_some() { embed_row } else { 0 }
    }

    /// Whether any tensor is f16 or bf16.
    pub fn any_16bit(&self) -> bool {
        std::iter::once(&self.embed_tokens)
            .chain(self.layers.iter().flat_map(|l| l.all()))
            .chain([&self.norm])
            .chain(self.lm_head.as_ref())
            .any(|t| t.dtype != Dtype::F32)
    }
}
