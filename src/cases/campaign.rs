//! Differential fuzzing campaigns: long runs of generated cases against the CPU reference, each
//! failure shrunk to a minimal case and written to the corpus. The `vkdecode-fuzz` binary
//! (`fuzz/`) is thin glue around [`Campaign`]; tests drive the same code with a budget.
//!
//! # Design
//! - **One oracle.** A case runs through the functions `cargo test` and `vkdecode replay` use
//!   ([`crate::cases::data::attention_inputs`], [`crate::cases::run::run_attention_inputs`],
//!   [`crate::cases::run::attention_reference`], [`crate::cases::run::check_attention`],
//!   [`crate::cases::run::run_append`], [`crate::cases::run::run_attention`]) with the same
//!   tolerances; plain attention cases go through the stages one by one only to time them.
//! - **Reproducible.** Case `i` of shard `K/N` is global case `K + i·N`, a pure function of the
//!   seed and that index ([`draw`]); see [`shard`](self::Shard) for the sequence's guarantees.
//! - **Verdicts.** A mismatch (or a validation-layer message) fails the case. So does a device or
//!   driver error (device lost, any Vulkan error): the case is recorded as it was drawn (not
//!   shrunk: a lost device makes every step slow and the loss may not be deterministic) and the
//!   device is reopened. A parameter the device refuses (a `ParamError`: a limit) is a skip.
//! - **Shrinking** is proptest's simplify/complicate walk over the failing case's value tree,
//!   bounded by [`ShrinkBudget`] and by the stop flag, keeping the last case that still
//!   mismatched. A forced split-K chunk is then dropped if the case fails without it.
//! - **Corpus.** A failure is written as `<corpus>/<kernel>/fuzz-<16 hex>.json`, named by a hash
//!   of its JSON without the description (so the same shrunk case found twice, by two shards or
//!   two campaigns, is one file): an existing name is a duplicate and is counted, never
//!   overwritten ([`crate::cases::corpus::write_case`] is atomic and refuses to overwrite).

mod mix;
mod shard;
mod stats;

pub use mix::{
    ADVERSARIAL_LENGTHS, CAMPAIGN_MAX_WORK, FuzzCase, Kernels, LONG_CACHE_MAX, LONG_CAPACITIES, SHARED_LIMITS,
    adversarial_append, adversarial_attention, append_mix, append_template, attention_mix, attention_template,
    fuzz_case, long_attention,
};
pub use shard::{JOB_INDEX_ENV, SHARD_COUNT_ENV, SHARD_ENV, Shard, case_seed, draw, runner_config};
pub use stats::{Count, KernelCounts, Stats, Tally, Timings, buckets, kv_bucket};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proptest::strategy::{BoxedStrategy, ValueTree};
use proptest::test_runner::Config;

use super::corpus::{CorpusError, write_case};
use super::data::attention_inputs;
use super::model::{AttentionCase, Case};
use super::run::{
    Outcome, RunError, attention_reference, check_attention, run_append, run_attention, run_attention_inputs,
};
use crate::gpu::{Context, ContextOptions, DeviceInfo, GpuError};
use crate::kernels::{KernelError, Mutant};

/// Bounds on shrinking one failure (each step is a device run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkBudget {
    pub max_steps: u32,
    pub max_time: Duration,
}

impl Default for ShrinkBudget {
    /// 1000 steps or 60 s, whichever comes first (a few seconds for typical cases on lavapipe).
    fn default() -> Self {
        ShrinkBudget { max_steps: 1000, max_time: Duration::from_secs(60) }
    }
}

/// What a campaign runs.
#[derive(Clone, Debug)]
pub struct CampaignOptions {
    pub seed: u64,
    pub shard: Shard,
    pub kernels: Kernels,
    /// Run against a deliberately broken kernel (cases of the other kernel run clean).
    pub mutant: Option<Mutant>,
    /// Where failures go (`<dir>/<kernel>/fuzz-*.json`); `None`: nowhere.
    pub corpus: Option<PathBuf>,
    pub shrink: ShrinkBudget,
    /// The device (and validation layer), also used to reopen it after a device error.
    pub context: ContextOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("cannot open a Vulkan device: {0}")]
    Open(#[source] GpuError),
    #[error("cannot reopen the Vulkan device after a device error: {0}")]
    Reopen(#[source] GpuError),
    #[error("case {index} (seed {seed}): the strategy drew no case: {reason}")]
    Draw { seed: u64, index: u64, reason: String },
}

/// The verdict on one case.
#[derive(Clone, Debug)]
pub enum Verdict {
    Pass,
    /// The output disagreed with the reference beyond the tolerance, or the validation layer
    /// reported a message.
    Mismatch(Box<Outcome>),
    /// The device or the driver failed: a failing case too.
    DeviceError {
        lost: bool,
        message: String,
    },
    /// The device cannot take the case (a parameter beyond its limits): not a failure.
    Skip(String),
}

impl Verdict {
    /// The first line of what went wrong: the first mismatch, or the error.
    pub fn first_line(&self) -> String {
        match self {
            Verdict::Mismatch(o) => {
                o.detail.as_deref().and_then(|d| d.lines().next()).unwrap_or("no detail").to_string()
            }
            other => other.summary(),
        }
    }

    /// One line: what failed and the first mismatch.
    pub fn summary(&self) -> String {
        match self {
            Verdict::Pass => "passed".into(),
            Verdict::Skip(reason) => format!("skipped: {reason}"),
            Verdict::DeviceError { lost: true, message } => format!("device lost: {message}"),
            Verdict::DeviceError { lost: false, message } => format!("device error: {message}"),
            Verdict::Mismatch(o) => {
                let first = o.detail.as_deref().and_then(|d| d.lines().next()).unwrap_or("no detail");
                format!(
                    "{} of {} mismatching (max |error| {:.3e}, worst error/bound {:.3e}, NMSE {:.3e}): {first}",
                    o.mismatches, o.checked, o.max_abs_err, o.worst_ratio, o.nmse
                )
            }
        }
    }
}

fn classify(error: RunError) -> Verdict {
    let lost = error.is_device_lost();
    match error {
        RunError::Param(e) | RunError::Kernel(KernelError::Param(e)) => Verdict::Skip(e.to_string()),
        other => Verdict::DeviceError { lost, message: other.to_string() },
    }
}

/// Runs one case (with its forced split) on the device and judges it, adding each stage's time
/// to `timings`. Validation-layer messages raised meanwhile fail it, as in `run_case`.
pub fn run_fuzz_case(ctx: &Arc<Context>, fc: &FuzzCase, mutant: Option<Mutant>, timings: &mut Timings) -> Verdict {
    let verdict = match &fc.case {
        Case::Attention(case) if case.fused => {
            // The fused cache check lives inside `run_attention` only: run it whole.
            let start = Instant::now();
            let ran = run_attention(ctx, case, mutant.and_then(Mutant::attention));
            timings.fused += start.elapsed();
            match ran {
                Err(e) => classify(e),
                Ok((outcome, _)) if outcome.passed => Verdict::Pass,
                Ok((outcome, _)) => Verdict::Mismatch(Box::new(outcome)),
            }
        }
        Case::Attention(case) => {
            let start = Instant::now();
            let inputs = attention_inputs(case);
            timings.materialize += start.elapsed();
            let inputs = match inputs {
                Ok(inputs) => inputs,
                Err(e) => return Verdict::Skip(e.to_string()),
            };
            let start = Instant::now();
            let gpu = run_attention_inputs(ctx, &inputs, mutant.and_then(Mutant::attention));
            timings.device += start.elapsed();
            match gpu {
                Err(e) => classify(e),
                Ok(gpu) => {
                    let start = Instant::now();
                    let reference = attention_reference(&inputs);
                    timings.reference += start.elapsed();
                    let start = Instant::now();
                    let outcome = check_attention(&inputs, &gpu, &reference);
                    timings.compare += start.elapsed();
                    if outcome.passed { Verdict::Pass } else { Verdict::Mismatch(Box::new(outcome)) }
                }
            }
        }
        Case::KvAppend(case) => {
            let start = Instant::now();
            let ran = run_append(ctx, case, mutant.and_then(Mutant::append));
            timings.append += start.elapsed();
            match ran {
                Err(e) => classify(e),
                Ok((outcome, _)) if outcome.passed => Verdict::Pass,
                Ok((outcome, _)) => Verdict::Mismatch(Box::new(outcome)),
            }
        }
    };
    let messages = ctx.take_validation_messages();
    if messages.is_empty() || matches!(verdict, Verdict::DeviceError { .. }) {
        return verdict;
    }
    let detail = format!("{} validation message(s):\n{}", messages.len(), messages.join("\n"));
    let mut outcome = match verdict {
        Verdict::Mismatch(outcome) => *outcome,
        _ => Outcome {
            passed: false,
            checked: 0,
            mismatches: 0,
            max_abs_err: 0.0,
            worst_ratio: 0.0,
            nmse: 0.0,
            tolerance: "no validation-layer message",
            detail: None,
        },
    };
    outcome.passed = false;
    outcome.detail = Some(detail);
    Verdict::Mismatch(Box::new(outcome))
}

/// A failing case, before it is shrunk and written ([`Campaign::record`]).
pub struct Failure {
    /// Index within the shard, and in the global sequence.
    pub index: u64,
    pub global_index: u64,
    pub case: FuzzCase,
    pub verdict: Verdict,
    tree: Box<dyn ValueTree<Value = FuzzCase>>,
}

/// What one step of a campaign did.
pub enum Step {
    Passed,
    Skipped(String),
    Failed(Box<Failure>),
    /// The shard's sequence is used up (past u64 indices; never in practice).
    Exhausted,
}

/// How shrinking went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShrinkReport {
    /// Candidates run.
    pub steps: u32,
    /// Candidates that still failed (each became the new smallest case).
    pub accepted: u32,
    pub seconds: f64,
    /// `done` (nothing simpler fails), `step budget`, `time budget` or `interrupted`.
    pub ended_by: &'static str,
}

/// A recorded failure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Finding {
    pub index: u64,
    pub global_index: u64,
    pub kernel: &'static str,
    pub origin: String,
    /// `mismatch` or `device error`.
    pub kind: &'static str,
    /// The verdict on the case as written (after shrinking).
    pub detail: String,
    /// The verdict on the case as drawn.
    pub original_detail: String,
    pub shrink: Option<ShrinkReport>,
    pub file: Option<PathBuf>,
    /// The file existed already (the same case was found before): not written again.
    pub duplicate: bool,
    pub write_error: Option<String>,
    /// `vkdecode replay FILE [--mutant NAME]`.
    pub reproducer: Option<String>,
    pub case: Case,
}

/// A campaign on one device: draws this shard's cases in order, runs them, and records failures.
pub struct Campaign {
    options: CampaignOptions,
    strategy: BoxedStrategy<FuzzCase>,
    config: Config,
    ctx: Arc<Context>,
    next: u64,
    stats: Stats,
    findings: Vec<Finding>,
}

impl Campaign {
    /// Opens the device of `options.context` and starts at the shard's first case.
    pub fn new(options: CampaignOptions) -> Result<Campaign, CampaignError> {
        let ctx = Context::new(&options.context).map_err(CampaignError::Open)?;
        Ok(Campaign::with_context(options, Arc::new(ctx)))
    }

    /// A campaign on an open device (it is reopened from `options.context` after a device error).
    pub fn with_context(options: CampaignOptions, ctx: Arc<Context>) -> Campaign {
        Campaign {
            strategy: fuzz_case(options.kernels),
            config: runner_config(),
            options,
            ctx,
            next: 0,
            stats: Stats::default(),
            findings: Vec::new(),
        }
    }

    pub fn options(&self) -> &CampaignOptions {
        &self.options
    }

    pub fn device(&self) -> &DeviceInfo {
        self.ctx.info()
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Cases drawn so far.
    pub fn cases_drawn(&self) -> u64 {
        self.next
    }

    fn reopen(&mut self) -> Result<(), CampaignError> {
        let ctx = Context::new(&self.options.context).map_err(CampaignError::Reopen)?;
        self.ctx = Arc::new(ctx);
        Ok(())
    }

    fn draw(&self, index: u64) -> Result<Box<dyn ValueTree<Value = FuzzCase>>, CampaignError> {
        draw(&self.strategy, &self.config, self.options.seed, index).map_err(|reason| CampaignError::Draw {
            seed: self.options.seed,
            index,
            reason,
        })
    }

    /// Runs the shard's next case. A device error reopens the device before returning the
    /// failure (an error only if that fails).
    pub fn step(&mut self) -> Result<Step, CampaignError> {
        let index = self.next;
        let Some(global_index) = self.options.shard.global_index(index) else {
            return Ok(Step::Exhausted);
        };
        let start = Instant::now();
        let tree = self.draw(global_index)?;
        let case = tree.current();
        self.stats.time_s.generate += start.elapsed();
        self.next += 1;
        let verdict = run_fuzz_case(&self.ctx, &case, self.options.mutant, &mut self.stats.time_s);
        let tally = match &verdict {
            Verdict::Pass => Tally::Passed,
            Verdict::Skip(_) => Tally::Skipped,
            Verdict::Mismatch(_) => Tally::Failed,
            Verdict::DeviceError { .. } => Tally::DeviceError,
        };
        let reason = match &verdict {
            Verdict::Skip(reason) => Some(skip_reason(reason)),
            _ => None,
        };
        self.stats.tally(&case, tally, reason.as_deref());
        match verdict {
            Verdict::Pass => Ok(Step::Passed),
            Verdict::Skip(reason) => Ok(Step::Skipped(reason)),
            Verdict::DeviceError { .. } => {
                self.reopen()?;
                Ok(Step::Failed(Box::new(Failure { index, global_index, case, verdict, tree })))
            }
            Verdict::Mismatch(_) => Ok(Step::Failed(Box::new(Failure { index, global_index, case, verdict, tree }))),
        }
    }

    /// Shrinks a failure (mismatches only), writes it to the corpus (when there is one) and
    /// returns the finding. `stop` cuts shrinking short; the smallest failing case so far is
    /// written then.
    pub fn record(&mut self, failure: Box<Failure>, stop: &AtomicBool) -> Result<&Finding, CampaignError> {
        let Failure { index, global_index, case, verdict, mut tree } = *failure;
        let original_detail = verdict.summary();
        let kind = if matches!(verdict, Verdict::DeviceError { .. }) { "device error" } else { "mismatch" };
        let (mut shrunk, mut final_verdict, shrink) = match verdict {
            Verdict::Mismatch(_) => {
                let start = Instant::now();
                let shrunk = self.shrink(tree.as_mut(), case.clone(), verdict, stop);
                self.stats.time_s.shrink += start.elapsed();
                let (case, verdict, report) = shrunk?;
                (case, verdict, Some(report))
            }
            other => (case.clone(), other, None),
        };
        // A split-K chunk the failure does not need is left out of the record.
        if let Case::Attention(c) = &shrunk.case
            && c.split_chunk.is_some()
            && kind == "mismatch"
            && !stop.load(Ordering::Relaxed)
        {
            let start = Instant::now();
            let plain = FuzzCase {
                case: Case::Attention(AttentionCase { split_chunk: None, ..c.clone() }),
                origin: shrunk.origin.clone(),
            };
            let mut scratch = Timings::default();
            let verdict = run_fuzz_case(&self.ctx, &plain, self.options.mutant, &mut scratch);
            if matches!(verdict, Verdict::DeviceError { .. }) {
                self.reopen()?;
            }
            if let Verdict::Mismatch(_) = verdict {
                (shrunk, final_verdict) = (plain, verdict);
            }
            self.stats.time_s.shrink += start.elapsed();
        }
        let detail = final_verdict.summary();
        let mut written = shrunk.case.clone();
        let mutant = self.options.mutant.map(|m| format!(" with --mutant {}", m.name())).unwrap_or_default();
        let description = format!(
            "vkdecode-fuzz finding ({}): {}. Found by `vkdecode-fuzz --seed {} --shard {}`{mutant} at case {index}.",
            shrunk.origin,
            clip(&final_verdict.first_line(), 200),
            self.options.seed,
            self.options.shard,
        );
        set_description(&mut written, description);
        let name = finding_name(&written);
        let kernel = written.kernel();
        let (mut file, mut duplicate, mut write_error) = (None, false, None);
        if let Some(dir) = self.options.corpus.clone() {
            let start = Instant::now();
            match write_unique(&dir, &name, &written) {
                Ok((path, dup)) => {
                    self.stats.written(kernel, dup);
                    (file, duplicate) = (Some(path), dup);
                }
                Err(e) => write_error = Some(e.to_string()),
            }
            self.stats.time_s.corpus += start.elapsed();
        }
        let reproducer = file.as_ref().map(|path| {
            let mutant = self.options.mutant.map(|m| format!(" --mutant {}", m.name())).unwrap_or_default();
            format!("vkdecode replay {}{mutant}", shell_word(&path.display().to_string()))
        });
        self.findings.push(Finding {
            index,
            global_index,
            kernel,
            origin: shrunk.origin.clone(),
            kind,
            detail,
            original_detail,
            shrink,
            file,
            duplicate,
            write_error,
            reproducer,
            case: written,
        });
        Ok(&self.findings[self.findings.len() - 1])
    }

    /// proptest's shrink walk: simplify while the case still mismatches, complicate when it
    /// passes, until the tree can do neither or a budget runs out.
    fn shrink(
        &mut self,
        tree: &mut dyn ValueTree<Value = FuzzCase>,
        mut best: FuzzCase,
        mut best_verdict: Verdict,
        stop: &AtomicBool,
    ) -> Result<(FuzzCase, Verdict, ShrinkReport), CampaignError> {
        let budget = self.options.shrink;
        let start = Instant::now();
        let (mut steps, mut accepted) = (0u32, 0u32);
        let mut ended_by = "done";
        let mut more = tree.simplify();
        let mut scratch = Timings::default();
        while more {
            if stop.load(Ordering::Relaxed) {
                ended_by = "interrupted";
                break;
            }
            if steps >= budget.max_steps {
                ended_by = "step budget";
                break;
            }
            if start.elapsed() >= budget.max_time {
                ended_by = "time budget";
                break;
            }
            steps += 1;
            let candidate = tree.current();
            let verdict = run_fuzz_case(&self.ctx, &candidate, self.options.mutant, &mut scratch);
            if matches!(verdict, Verdict::DeviceError { .. }) {
                // Not the failure being shrunk: reopen and treat the candidate as passing.
                self.reopen()?;
            }
            if let Verdict::Mismatch(_) = verdict {
                (best, best_verdict) = (candidate, verdict);
                accepted += 1;
                more = tree.simplify();
            } else {
                more = tree.complicate();
            }
        }
        let report = ShrinkReport { steps, accepted, seconds: start.elapsed().as_secs_f64(), ended_by };
        Ok((best, best_verdict, report))
    }
}

/// The first `max` characters of `text`'s first line.
fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// A skip reason without its numbers, so that reasons group (`parameter `layout`: ...`).
fn skip_reason(reason: &str) -> String {
    let mut words = String::new();
    for c in reason.chars() {
        if !c.is_ascii_digit() {
            words.push(c);
        } else if !words.ends_with('#') {
            words.push('#');
        }
    }
    clip(&words, 120)
}

/// Quotes a path for a shell when it needs it.
fn shell_word(text: &str) -> String {
    if text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn set_description(case: &mut Case, description: String) {
    match case {
        Case::Attention(c) => c.description = description,
        Case::KvAppend(c) => c.description = description,
    }
}

/// The corpus name of a finding: `fuzz-` and 16 hex digits of an FNV-1a hash of the case's JSON
/// without its description, so equal cases found by different campaigns get one name.
pub fn finding_name(case: &Case) -> String {
    let mut bare = case.clone();
    set_description(&mut bare, String::new());
    let text = serde_json::to_string(&bare).unwrap_or_default();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("fuzz-{hash:016x}")
}

/// Writes `case` as `<dir>/<kernel>/<name>.json` unless that file exists; returns its path and
/// whether it existed (a duplicate).
fn write_unique(dir: &Path, name: &str, case: &Case) -> Result<(PathBuf, bool), CorpusError> {
    let path = dir.join(case.kernel()).join(format!("{name}.json"));
    if path.exists() {
        return Ok((path, true));
    }
    match write_case(dir, name, case) {
        Ok(path) => Ok((path, false)),
        Err(CorpusError::Exists { path }) => Ok((path, true)),
        Err(e) => Err(e),
    }
}

/// The first `n` cases of a shard, without a device (what `vkdecode-fuzz --print-cases` shows).
pub fn case_sequence(seed: u64, shard: Shard, kernels: Kernels, n: u64) -> Result<Vec<(u64, FuzzCase)>, CampaignError> {
    let strategy = fuzz_case(kernels);
    let config = runner_config();
    (0..n)
        .map_while(|i| shard.global_index(i))
        .map(|g| {
            let tree =
                draw(&strategy, &config, seed, g).map_err(|reason| CampaignError::Draw { seed, index: g, reason })?;
            Ok((g, tree.current()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_names_ignore_the_description() {
        let mut a = Case::Attention(attention_template());
        let name = finding_name(&a);
        assert!(name.starts_with("fuzz-") && name.len() == 21, "{name}");
        set_description(&mut a, "found somewhere else".into());
        assert_eq!(finding_name(&a), name);
        if let Case::Attention(c) = &mut a {
            c.split_chunk = Some(64);
        }
        assert_ne!(finding_name(&a), name);
    }

    #[test]
    fn clipping_keeps_the_first_line() {
        assert_eq!(clip("abc\ndef", 10), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
    }

    #[test]
    fn skip_reasons_group_without_numbers() {
        assert_eq!(skip_reason("a 123-byte cache exceeds 99"), "a #-byte cache exceeds #");
    }

    #[test]
    fn paths_are_quoted_for_the_shell_when_needed() {
        assert_eq!(shell_word("corpus/attention/fuzz-1.json"), "corpus/attention/fuzz-1.json");
        assert_eq!(shell_word("/tmp/a b/x.json"), "'/tmp/a b/x.json'");
    }
}
