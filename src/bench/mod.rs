//! Benchmarks: GPU-timestamped kernel timings reported against the device's measured copy
//! bandwidth (the roofline of memory-bound decode kernels).
//!
//! Method (DESIGN.md, "Performance method"):
//! - [`timing`] records N back-to-back calls of an op between two GPU timestamps in one command
//!   buffer, submits R such command buffers after W untimed warm-up submits, and reports order
//!   statistics of the per-call time (submit time ÷ N). Host overheads (recording, submit, fence
//!   wait) are outside the timestamps; pipeline creation happens in the warm-up.
//! - Calls of one op rewrite the same outputs, so consecutive calls are separated by a barrier
//!   (write-after-write; sync validation demands it); the figures include it and say so.
//! - Timed data lives in device-local buffers, uploaded once through a staging buffer
//!   ([`upload`]). When the K/V of one call would fit in the last-level cache, calls rotate over
//!   enough copies that the working set is at least twice an assumed cache size
//!   ([`attention::ASSUMED_LLC_BYTES`], 64 MiB), so every call reads from memory.
//! - [`bandwidth`] measures the copy bandwidth with a plain uvec4 copy kernel (and
//!   `vkCmdCopyBuffer`) in the same run; kernels are reported as a fraction of it.
//!
//! The module is the library half of `vkdecode bench`; the CLI only parses options and prints.
//! Everything here is reusable by the throughput gate (baselines, `vkdecode gate`): a benchmark is
//! "a closure that records one call", timed by [`timing::time_calls`].

pub mod anchors;
pub mod attention;
pub mod bandwidth;
pub mod decode;
pub mod foreign;
pub mod gate;
pub mod plot;
pub mod timing;
pub mod upload;

use crate::gpu::GpuError;
use crate::kernels::{KernelError, ParamError};

pub use timing::{Between, Stats, Timing, TimingConfig, time_calls};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Param(#[from] ParamError),
    /// A timing came back without the two timestamps it recorded (a driver bug).
    #[error("{what}: expected {expected} timestamps, the driver returned {got}")]
    Timestamps { what: String, expected: usize, got: usize },
    /// A benchmark configuration that cannot run (zero iterations, a buffer too large).
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Bytes in a mebibyte.
pub const MIB: u64 = 1 << 20;

/// Bytes per nanosecond is GB/s (10⁹ bytes per second).
pub fn gb_per_s(bytes: u64, ns: f64) -> f64 {
    if ns > 0.0 { bytes as f64 / ns } else { f64::NAN }
}
