//! Qwen3 checkpoints: `config.json` ([`config`]) and safetensors weights ([`weights`]) of any
//! dense HF Qwen3 model, validated up front so that nothing later can trip over a missing or
//! misshapen tensor.
//!
//! [`Checkpoint::open`] reads the config, memory-maps the safetensors file(s) (single or sharded),
//! and checks every tensor the architecture needs (name, shape, element type) before it returns.
//! The engine reads tensors in their stored type ([`TensorRef`]); the CPU reference gets an f32
//! copy ([`Checkpoint::reference_weights`]). Every failure is a [`ModelError`] that names the file,
//! the key or tensor, and what was expected.

pub mod config;
pub mod tokenizer;
pub mod weights;

use std::path::PathBuf;

pub use config::{Qwen3Config, WeightDtype};
pub use weights::{Checkpoint, TensorRef};

/// Anything that can be wrong with a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: key `{key}` is missing; expected {expected}")]
    MissingKey { path: PathBuf, key: String, expected: String },
    #[error("{path}: key `{key}` is {found}; expected {expected}")]
    BadValue { path: PathBuf, key: String, found: String, expected: String },
    #[error(
        "{dir} holds neither model.safetensors nor model.safetensors.index.json \
         (is it a Hugging Face checkpoint directory?)"
    )]
    NoWeights { dir: PathBuf },
    #[error("{path} is not a valid safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{index} maps tensor `{name}` to {file}, which does not hold it")]
    IndexMismatch { index: PathBuf, name: String, file: PathBuf },
    #[error("tensor `{name}` appears in both {first} and {second}")]
    DuplicateTensor { name: String, first: PathBuf, second: PathBuf },
    #[error("tensor `{name}` is missing; expected shape {expected:?}")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` in {file} has shape {found:?}; expected {expected:?}")]
    TensorShape { name: String, file: PathBuf, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` in {file} has element type {found}; expected F32, F16 or BF16")]
    TensorDtype { name: String, file: PathBuf, found: String },
    #[error("tensor `{name}` in {file} is not part of a dense Qwen3 model with this config")]
    UnexpectedTensor { name: String, file: PathBuf },
}
