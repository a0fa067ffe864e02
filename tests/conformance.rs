//! Conformance of vkdecode's own kernels, through the same seam and suite any implementation
//! under test gets (`vkdecode::implementation::Suite`): one named trial per corpus file
//! (`corpus/attention/...`, `corpus/kv_append/...`) and per point of the built-in grid
//! (`grid/...`), each run on the device against the reference, plus the harness mutants, which
//! must each be caught. Filter like any test (`cargo test --test conformance -- gqa16`), list with
//! `--list`. A case marked `expect: "fail"` must fail; an unexpected pass is a failure.
//! (The property trials of the suite are left to `tests/properties.rs`, which has more.)

use std::sync::Arc;

use libtest_mimic::Arguments;
use vkdecode::cases::corpus::default_corpus_dir;
use vkdecode::implementation::{Builtin, Suite};

fn main() {
    let args = Arguments::from_args();
    let suite = Suite::new(Arc::new(Builtin::new())).corpus(default_corpus_dir()).property_cases(0);
    libtest_mimic::run(&args, suite.trials()).exit();
}
