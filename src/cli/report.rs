//! What `check` and `replay` share: judging a case exactly as `tests/conformance.rs` does (the
//! case's `expect` against `outcome.passed`; an unexpected result is a failure), telling a case
//! that cannot run on this device (a failure of that case) from a device or driver error (which
//! ends the run with exit code 2), and the per-case JSON.

use std::time::Instant;

use serde_json::{Value, json};
use vkdecode::cases::{Case, Expect, Outcome, RunError};
use vkdecode::gpu::GpuError;
use vkdecode::kernels::{Dtype, KernelError, Mutant};

/// The verdict on one case, as the conformance suite would give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed, as expected.
    Ok,
    /// Failed, but was expected to pass.
    Fail,
    /// Failed, as expected (`expect: "fail"`).
    ExpectedFail,
    /// Passed, but was marked `expect: "fail"`.
    UnexpectedPass,
    /// Could not run on this device (a parameter or limit the device does not meet).
    Error,
    /// Outside the implementation's declared capabilities: listed and counted, not a failure.
    Unsupported,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::ExpectedFail => "expected-fail",
            Verdict::UnexpectedPass => "UNEXPECTED PASS",
            Verdict::Error => "ERROR",
            Verdict::Unsupported => "unsupported",
        }
    }

    pub fn as_expected(self) -> bool {
        matches!(self, Verdict::Ok | Verdict::ExpectedFail)
    }
}

/// The result of one case.
#[derive(Clone)]
pub struct CaseResult {
    pub name: String,
    pub kernel: &'static str,
    pub dtype: Dtype,
    pub expected: Expect,
    /// The mutant the kernel ran with, if it applied to this case's kernel.
    pub mutant: Option<Mutant>,
    pub outcome: Option<Outcome>,
    /// Why the case could not run (then `outcome` is `None`).
    pub error: Option<String>,
    /// Why the implementation does not support the case (then `outcome` is `None`).
    pub unsupported: Option<String>,
    pub ms: f64,
}

impl CaseResult {
    pub fn verdict(&self) -> Verdict {
        match (&self.outcome, self.expected) {
            (None, _) if self.unsupported.is_some() => Verdict::Unsupported,
            (None, _) => Verdict::Error,
            (Some(o), Expect::Pass) if o.passed => Verdict::Ok,
            (Some(_), Expect::Pass) => Verdict::Fail,
            (Some(o), Expect::Fail) if o.passed => Verdict::UnexpectedPass,
            (Some(_), Expect::Fail) => Verdict::ExpectedFail,
        }
    }

    /// What went wrong, in a few lines; `None` when the case gave what it expects.
    pub fn failure_details(&self) -> Option<String> {
        match (self.verdict(), &self.outcome) {
            (Verdict::Error, _) => Some(format!("could not run: {}", self.error.as_deref().unwrap_or("unknown error"))),
            (Verdict::UnexpectedPass, _) => {
                Some("the case is marked `expect: fail` but passed (fixed bug? then drop `expect`)".to_string())
            }
            (Verdict::Fail, Some(o)) => {
                let mut text = if self.kernel == "kv_append" {
                    format!("{} ({})", mismatch_text(self.kernel, o), o.tolerance)
                } else {
                    format!(
                        "{} ({}); max |error| {:e}, NMSE {:e}, worst error/bound {:e}",
                        mismatch_text(self.kernel, o),
                        o.tolerance,
                        o.max_abs_err,
                        o.nmse,
                        o.worst_ratio
                    )
                };
                if let Some(detail) = &o.detail {
                    text.push('\n');
                    text.push_str(detail);
                }
                Some(text)
            }
            _ => None,
        }
    }

    /// The per-case JSON object: identity, expectation, verdict and every outcome field.
    pub fn to_json(&self) -> Value {
        let verdict = self.verdict();
        json!({
            "name": self.name,
            "kernel": self.kernel,
            "dtype": self.dtype,
            "expected": self.expected,
            "passed": self.outcome.as_ref().map(|o| o.passed),
            "verdict": verdict.label(),
            "as_expected": verdict.as_expected(),
            "mutant": self.mutant.map(Mutant::name),
            "ms": self.ms,
            "outcome": self.outcome,
            "error": self.error,
            "unsupported": self.unsupported,
        })
    }
}

/// How many elements were off, in the units the kernel's check counts (the append check compares
/// caches byte for byte and counts differing elements).
pub fn mismatch_text(kernel: &str, o: &Outcome) -> String {
    if kernel == "kv_append" {
        format!("{} cache element(s) differ, {} bytes compared", o.mismatches, o.checked)
    } else {
        format!("{} of {} output elements outside the bound", o.mismatches, o.checked)
    }
}

/// Whether an error ends the whole run (a device or driver failure) rather than only this case
/// (a parameter or device limit the case does not meet, or a missing feature).
pub fn is_fatal(error: &RunError) -> bool {
    let gpu = match error {
        RunError::Param(_)
        | RunError::Kernel(KernelError::Param(_))
        | RunError::NotImplemented { .. }
        | RunError::Unsupported(_)
        | RunError::Implementation { .. } => return false,
        // A manifest's expression failed: the run cannot go on meaningfully (exit 2).
        RunError::Manifest { .. } => return true,
        RunError::Gpu(e) | RunError::Kernel(KernelError::Gpu(e)) => e,
    };
    !matches!(gpu, GpuError::MissingFeature { .. } | GpuError::Limit { .. })
}

pub fn dtype_of(case: &Case) -> Dtype {
    case.dtype()
}

/// The mutant if it belongs to the case's kernel (otherwise the clean kernel runs).
pub fn applicable(case: &Case, mutant: Option<Mutant>) -> Option<Mutant> {
    mutant.filter(|m| match case {
        Case::Attention(_) => m.attention().is_some(),
        Case::KvAppend(_) => m.append().is_some(),
    })
}

/// Runs `run` (one case on the device) and records its result; `Err` only for fatal errors.
pub fn judge<T>(
    name: String,
    case: &Case,
    mutant: Option<Mutant>,
    run: impl FnOnce() -> Result<(Outcome, T), RunError>,
) -> Result<(CaseResult, Option<T>), RunError> {
    let start = Instant::now();
    let ran = run();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let mut result = CaseResult {
        name,
        kernel: case.kernel(),
        dtype: dtype_of(case),
        expected: case.expect(),
        mutant: applicable(case, mutant),
        outcome: None,
        error: None,
        unsupported: None,
        ms,
    };
    match ran {
        Ok((outcome, extra)) => {
            result.outcome = Some(outcome);
            Ok((result, Some(extra)))
        }
        Err(RunError::Unsupported(reason)) => {
            result.unsupported = Some(reason);
            Ok((result, None))
        }
        Err(e) if !is_fatal(&e) => {
            result.error = Some(e.to_string());
            Ok((result, None))
        }
        Err(e) => Err(e),
    }
}

/// Totals as the final report line gives them: cases as expected, cases not (unsupported cases
/// are neither).
pub fn totals(results: &[CaseResult]) -> (usize, usize) {
    let unsupported = unsupported(results);
    let passed = results.iter().filter(|r| r.verdict().as_expected()).count();
    (passed, results.len() - passed - unsupported)
}

fn unsupported(results: &[CaseResult]) -> usize {
    results.iter().filter(|r| r.verdict() == Verdict::Unsupported).count()
}

/// The last line of every human report; CI parses this exact wording (`, N skipped` counts the
/// cases outside the implementation's capabilities).
pub fn summary_line(results: &[CaseResult]) -> String {
    let (passed, failed) = totals(results);
    match unsupported(results) {
        0 => format!("{passed} passed, {failed} failed"),
        n => format!("{passed} passed, {failed} failed, {n} skipped"),
    }
}

pub fn totals_json(results: &[CaseResult]) -> Value {
    let (passed, failed) = totals(results);
    json!({ "passed": passed, "failed": failed, "unsupported": unsupported(results), "total": results.len() })
}

/// One line naming the device and the run's options.
pub fn device_line(info: &vkdecode::gpu::DeviceInfo, validation: bool, mutant: Option<Mutant>) -> String {
    let mut line = format!(
        "device {}: {} ({}), {} {}; validation {}",
        info.index,
        info.name,
        info.device_type,
        info.driver_name,
        info.driver_info,
        if validation { "on" } else { "off" }
    );
    if let Some(m) = mutant {
        line.push_str(&format!("; mutant {}", m.name()));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(expected: Expect, passed: Option<bool>) -> CaseResult {
        CaseResult {
            name: "x".into(),
            kernel: "attention",
            dtype: Dtype::F32,
            expected,
            mutant: None,
            outcome: passed.map(|passed| Outcome {
                passed,
                checked: 1,
                mismatches: usize::from(!passed),
                max_abs_err: 0.0,
                worst_ratio: 0.0,
                nmse: 0.0,
                tolerance: "t",
                detail: None,
            }),
            error: passed.is_none().then(|| "no".to_string()),
            unsupported: None,
            ms: 0.0,
        }
    }

    #[test]
    fn verdicts_follow_the_conformance_suite() {
        assert_eq!(result(Expect::Pass, Some(true)).verdict(), Verdict::Ok);
        assert_eq!(result(Expect::Pass, Some(false)).verdict(), Verdict::Fail);
        assert_eq!(result(Expect::Fail, Some(false)).verdict(), Verdict::ExpectedFail);
        assert_eq!(result(Expect::Fail, Some(true)).verdict(), Verdict::UnexpectedPass);
        assert_eq!(result(Expect::Fail, None).verdict(), Verdict::Error);
        let all = [
            result(Expect::Pass, Some(true)),
            result(Expect::Fail, Some(false)),
            result(Expect::Fail, Some(true)),
            result(Expect::Pass, None),
        ];
        assert_eq!(summary_line(&all), "2 passed, 2 failed");
    }
}
