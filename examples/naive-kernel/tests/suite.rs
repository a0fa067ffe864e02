//! vkdecode's conformance suite for the naive kernel: one trial per corpus file and grid point,
//! property draws inside its capabilities, and the harness mutants. f16/bf16 cases and cases
//! with options are outside its capabilities: ignored trials of kind `unsupported`.
//!
//! `cargo test -p vkdecode-example-naive --test suite -- --list` lists the trials;
//! `VKDECODE_VALIDATION=1` turns on the Khronos validation layer (any message fails the case).

use std::sync::Arc;

use vkdecode::implementation::Suite;
use vkdecode_example_naive::NaiveKernel;

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let suite = Suite::new(Arc::new(NaiveKernel::new(false)))
        .corpus(concat!(env!("CARGO_MANIFEST_DIR"), "/../../corpus"))
        .property_cases(8);
    // `harness_mutants/drop_sinks` is listed as unsupported: no supported case has sinks.
    libtest_mimic::run(&args, suite.trials()).exit();
}
