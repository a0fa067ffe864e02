//! The suite must have power over this kernel: with its planted bug (the causal bound off by one)
//! some supported grid case must fail.

use vkdecode::cases::grid::grid;
use vkdecode::gpu::Context;
use vkdecode::implementation::{Judged, judge_case};
use vkdecode_example_naive::NaiveKernel;

#[test]
fn planted_causal_off_by_one_is_caught() {
    let ctx = Context::shared().expect("a Vulkan device");
    let buggy = NaiveKernel::new(true);
    let mut ran = 0;
    for g in grid() {
        let judged = judge_case(&ctx, &buggy, &g.case, None).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let Judged::Ran(outcome) = judged else { continue }; // unsupported: f16/bf16, options
        ran += 1;
        if !outcome.passed {
            println!("caught by {} (supported case {ran}): {}", g.name, outcome.detail.unwrap_or_default());
            return;
        }
    }
    panic!("the planted bug passed all {ran} supported grid cases");
}
