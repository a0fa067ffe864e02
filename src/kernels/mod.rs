//! Kernels: one module per kernel family, each the only place that knows its shader's bindings,
//! push-constant layout and specialization constants.
//!
//! Each kernel has typed parameters with a host-side `validate` that checks every bound the shader
//! relies on (divisibility, ranges, capacity, 32-bit index range, device limits and features), so
//! bad input is an error naming the parameter, never an out-of-bounds access. Shaders guard their
//! bounds too, as a second line.

pub mod attention;
pub mod kv_append;
pub mod layers;

pub use vkdecode_reference::{CacheLayout, Dtype};

use crate::gpu::{DeviceInfo, GpuError};

/// A parameter a kernel cannot take.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("parameter `{name}`: {problem}")]
pub struct ParamError {
    pub name: &'static str,
    pub problem: String,
}

/// Why a kernel could not be recorded or run.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub(crate) fn invalid(name: &'static str, problem: impl Into<String>) -> ParamError {
    ParamError { name, problem: problem.into() }
}

/// Head dims the kernels take: multiples of 8 up to 256 (covers 64..256 in steps of 16, 80/96/112,
/// and the odd ones such as 40 and 72).
pub const MAX_HEAD_DIM: usize = 256;

pub(crate) fn check_head_dim(head_dim: usize) -> Result<(), ParamError> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(invalid("head_dim", format!("{head_dim} is not a multiple of 8 in 8..={MAX_HEAD_DIM}")));
    }
    Ok(())
}

/// Checks a cache layout against the problem and the device: matching shape, no two elements
/// sharing memory, element indices within 32 bits and the buffer within the device's range.
pub(crate) fn check_layout(
    layout: &CacheLayout,
    n_seqs: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: Dtype,
    device: &DeviceInfo,
) -> Result<(), ParamError> {
    if layout.n_seqs != n_seqs || layout.n_kv_heads != n_kv_heads || layout.head_dim != head_dim {
        return Err(invalid(
            "layout",
            format!(
                "shape (seqs {}, kv heads {}, head_dim {}) does not match the problem ({n_seqs}, {n_kv_heads}, {head_dim})",
                layout.n_seqs, layout.n_kv_heads, layout.head_dim
            ),
        ));
    }
    if layout.capacity == 0 {
        return Err(invalid("layout.capacity", "must be at least 1"));
    }
    if layout.overlaps() {
        return Err(invalid(
            "layout",
            format!(
                "strides (seq {}, head {}, pos {}, dim 1) make distinct elements overlap",
                layout.stride_seq, layout.stride_head, layout.stride_pos
            ),
        ));
    }
    let elements = layout.min_elements();
    if elements > u32::MAX as usize {
        return Err(invalid("layout", format!("{elements} elements exceed 32-bit indexing")));
    }
    let bytes = (elements * dtype.size()) as u64;
    if bytes > device.max_storage_buffer_range {
        return Err(invalid(
            "layout",
            format!(
                "a {bytes}-byte cache exceeds the device's maxStorageBufferRange of {}",
                device.max_storage_buffer_range
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_dtype(dtype: Dtype, device: &DeviceInfo) -> Result<(), ParamError> {
    if dtype != Dtype::F32 && !device.storage_buffer_16bit {
        return Err(invalid(
            "dtype",
            format!("{dtype} caches need storageBuffer16BitAccess, which `{}` lacks", device.name),
        ));
    }
    Ok(())
}

pub(crate) fn check_buffer(name: &'static str, have: u64, need: u64) -> Result<(), ParamError> {
    if have < need {
        return Err(invalid(name, format!("buffer holds {have} bytes, {need} needed")));
    }
    Ok(())
}

/// Little-endian bytes of 32-bit words: push constants, index and length buffers.
pub(crate) fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A 1-D grid of `groups` workgroups folded into 2-D when it exceeds the device's x limit;
/// shaders rebuild the linear index from `gl_WorkGroupID.y * gx + gl_WorkGroupID.x`.
pub(crate) fn grid_2d(groups: u64, max_x: u64) -> (u64, u64) {
    if groups <= max_x { (groups, 1) } else { (max_x, groups.div_ceil(max_x)) }
}

/// A deliberately broken kernel variant, named `<kernel>.<mutant>` (e.g. `attention.gqa_modulo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutant {
    Attention(attention::AttentionMutant),
    Append(kv_append::AppendMutant),
}

impl Mutant {
    /// Every mutant of every kernel.
    pub fn all() -> Vec<Mutant> {
        let a = attention::AttentionMutant::ALL.into_iter().map(Mutant::Attention);
        a.chain(kv_append::AppendMutant::ALL.into_iter().map(Mutant::Append)).collect()
    }

    pub fn name(self) -> String {
        match self {
            Mutant::Attention(m) => format!("attention.{}", m.name()),
            Mutant::Append(m) => format!("kv_append.{}", m.name()),
        }
    }

    /// Parses `<kernel>.<mutant>`; the error lists the valid names.
    pub fn parse(name: &str) -> Result<Mutant, String> {
        Mutant::all().into_iter().find(|m| m.name() == name).ok_or_else(|| {
            format!(
                "unknown mutant `{name}`; known: {}",
                Mutant::all().iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn attention(self) -> Option<attention::AttentionMutant> {
        match self {
            Mutant::Attention(m) => Some(m),
            Mutant::Append(_) => None,
        }
    }

    pub fn append(self) -> Option<kv_append::AppendMutant> {
        match self {
            Mutant::Append(m) => Some(m),
            Mutant::Attention(_) => None,
        }
    }
}
