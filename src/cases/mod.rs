//! Test cases: the JSON case model, deterministic data generation, tolerances, running a case on
//! a device against the reference, the corpus on disk, and the proptest strategies shared by
//! `cargo test` and the fuzzer.

pub mod campaign;
pub mod corpus;
pub mod data;
pub mod grid;
pub mod model;
pub mod npy;
pub mod rng;
pub mod run;
pub mod strategy;
pub mod tolerance;

pub use model::{AppendCase, AttentionCase, Case, Expect, LayoutKind, Poison};
pub use run::{Outcome, RunError, run_case};
