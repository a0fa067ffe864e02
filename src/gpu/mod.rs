//! The Vulkan runtime: the only place in vkdecode with `unsafe` code.
//!
//! Layers: [`context`] opens an instance and device (selection by `VKDECODE_DEVICE`, validation by
//! `VKDECODE_VALIDATION`), [`buffer`] and [`pipeline`] own Vulkan objects, [`command`] records and
//! submits work. Above this module everything is safe Rust: kernels describe a dispatch with
//! typed parameters and never see a Vulkan handle.

pub mod buffer;
pub mod command;
pub mod context;
pub mod error;
pub mod pipeline;

pub use buffer::{Buffer, Location};
pub use command::{Completed, Counters, MAX_TIMESTAMPS, Program, Recorder};
pub use context::{Context, ContextOptions, DeviceInfo, list_devices};
pub use error::{GpuError, Result};
pub use pipeline::{Pipeline, PipelineDesc, PipelineStatistic, Shader, SubgroupControl, registers};
