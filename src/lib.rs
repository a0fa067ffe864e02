//! vkdecode: fused Vulkan decode kernels (decode attention, KV-cache append) and the machinery
//! that proves them right: a CPU reference (crate `vkdecode-reference`), case model and corpus,
//! property-based strategies, tolerances and comparison.
//!
//! Layout: [`gpu`] is the Vulkan runtime (the only `unsafe` code), [`kernels`] the typed kernel
//! wrappers, [`cases`] everything about test cases (model, data, strategies, tolerances, running).

pub mod bench;
pub mod cases;
pub mod engine;
pub mod external;
pub mod gpu;
pub mod implementation;
pub mod kernels;
pub mod manifest;
pub mod model;
pub mod shaders;

pub use vkdecode_reference as reference;
