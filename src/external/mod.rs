//! Kernels behind another language or process (docs/BYOK.md, "Kernels behind another language").
//!
//! - [`export`]: cases as folders of `.npy` inputs and a `case.json` any runtime can read;
//! - [`judge`]: the verdict on the results a runner wrote there, on the CPU alone;
//! - [`External`]: a worker process as an [`crate::implementation::Implementation`], so the
//!   fuzzer's generators, shrinker and corpus reach it through JSON lines.
//!
//! The capabilities, precision profile and slot contract come from a caps file ([`CapsFile`]).

pub mod caps;
pub mod export;
pub mod format;
pub mod judge;
pub mod worker;

pub use caps::{CapsFile, Declared};
pub use worker::External;
