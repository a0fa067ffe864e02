//! Conformance: one named trial per corpus file (`attention/...`, `kv_append/...`) and per point
//! of the built-in grid (`grid/...`), each run on the device against the reference.
//! Filter like any test (`cargo test --test conformance -- gqa16`), list with `--list`.
//! A case marked `expect: "fail"` must fail; an unexpected pass is a failure.

use libtest_mimic::{Arguments, Failed, Trial};
use vkdecode::cases::corpus::{default_corpus_dir, load_corpus};
use vkdecode::cases::grid::grid;
use vkdecode::cases::{Case, Expect, run_case};
use vkdecode::gpu::Context;

fn trial(name: String, case: Case) -> Trial {
    let kind = case.kernel();
    Trial::test(name, move || {
        let ctx = Context::shared().map_err(|e| Failed::from(format!("no Vulkan device: {e}")))?;
        let outcome = run_case(&ctx, &case, None).map_err(|e| Failed::from(e.to_string()))?;
        match (case.expect(), outcome.passed) {
            (Expect::Pass, true) | (Expect::Fail, false) => Ok(()),
            (Expect::Pass, false) => Err(format!(
                "{} mismatching of {} checked ({}); max |error| {:e}, NMSE {:e}\n{}",
                outcome.mismatches,
                outcome.checked,
                outcome.tolerance,
                outcome.max_abs_err,
                outcome.nmse,
                outcome.detail.unwrap_or_default()
            )
            .into()),
            (Expect::Fail, true) => Err("the case is marked `expect: fail` but passed".into()),
        }
    })
    .with_kind(kind)
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    match load_corpus(&default_corpus_dir()) {
        Ok(entries) => trials.extend(entries.into_iter().map(|e| trial(e.name, e.case))),
        Err(e) => {
            let message = e.to_string();
            trials.push(Trial::test("corpus/load", move || Err(message.into())));
        }
    }
    trials.extend(grid().into_iter().map(|g| trial(g.name, g.case)));
    libtest_mimic::run(&args, trials).exit();
}
