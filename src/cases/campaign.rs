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
//! - **Parallel.** `jobs` worker threads draw, run and judge cases (most of a case's time is host
//!   work: values, the reference, the comparison); the owner of the [`Campaign`] takes the
//!   verdicts back in index order, counts them, and shrinks and records failures itself. How the
//!   threads share the device, and why any number of jobs gives the same results: `workers.rs`.
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
mod workers;

pub use mix::{
    ADVERSARIAL_LENGTHS, CAMPAIGN_MAX_WORK, FuzzCase, Kernels, LONG_CACHE_MAX, LONG_CAPACITIES, SHARED_LIMITS,
    adversarial_append, adversarial_attention, append_mix, append_template, attention_mix, attention_template,
    fuzz_case, long_attention,
};
pub use shard::{JOB_INDEX_ENV, SHARD_COUNT_ENV, SHARD_ENV, Shard, case_seed, draw, runner_config};
pub use stats::{Count, KernelCounts, Stats, Tally, Timings, buckets, kv_bucket};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
use proptest::test_runner::Config;

use super::corpus::{CorpusError, write_case};
use super::data::attention_inputs;
use super::model::{AttentionCase, Case};
use super::run::{
    Outcome, RunError, attention_reference, check_attention, run_append, run_attention, run_attention_inputs,
};
use crate::gpu::{Context, ContextOptions, DeviceInfo, GpuError};
use crate::implementation::Implementation;
use crate::kernels::{KernelError, Mutant};
use workers::{Ran, Report, Shared};

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
    /// Worker threads that run cases (0 counts as 1).
    pub jobs: usize,
    /// Run at most this many cases (indices `0..max_cases` of the shard); `None`: no limit.
    pub max_cases: Option<u64>,
    /// The owner stops at the first failure: workers take no case past a failing one.
    pub fail_fast: bool,
    /// The implementation under test; `None`: vkdecode's own kernels (with `mutant`). Cases are
    /// drawn inside its capabilities ([`crate::implementation::Capabilities::fit_attention`]).
    pub implementation: Option<UnderTest>,
}

/// An implementation under test, shared by the workers.
#[derive(Clone)]
pub struct UnderTest(pub Arc<dyn Implementation>);

impl std::fmt::Debug for UnderTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UnderTest({})", self.0.name())
    }
}

/// The campaign's strategy: the mix of its kernels, mapped into the implementation's
/// capabilities (a map, so shrinking stays inside them), the other kernels' cases dropped.
pub fn campaign_strategy(options: &CampaignOptions) -> BoxedStrategy<FuzzCase> {
    strategy_for(options.kernels, options.implementation.as_ref())
}

/// [`campaign_strategy`] from its two inputs.
fn strategy_for(kernels: Kernels, implementation: Option<&UnderTest>) -> BoxedStrategy<FuzzCase> {
    let Some(UnderTest(imp)) = implementation else { return fuzz_case(kernels) };
    let caps = imp.capabilities().clone();
    let kernels = Kernels {
        attention: kernels.attention && caps.kernels.contains(&crate::implementation::KernelKind::Attention),
        kv_append: kernels.kv_append && caps.kernels.contains(&crate::implementation::KernelKind::KvAppend),
    };
    fuzz_case(kernels)
        .prop_map(move |fc| FuzzCase {
            origin: fc.origin,
            case: match fc.case {
                Case::Attention(c) => Case::Attention(caps.fit_attention(c)),
                Case::KvAppend(c) => Case::KvAppend(caps.fit_append(c)),
            },
        })
        .boxed()
}

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("cannot open a Vulkan device: {0}")]
    Open(#[source] GpuError),
    #[error("cannot reopen the Vulkan device after a device error: {0}")]
    Reopen(#[source] GpuError),
    #[error("case {index} (seed {seed}): the strategy drew no case: {reason}")]
    Draw { seed: u64, index: u64, reason: String },
    #[error("cannot start a worker thread: {0}")]
    Spawn(String),
    #[error("a worker thread panicked{}; its message is above", index.map(|i| format!(" on case {i}")).unwrap_or_default())]
    Worker { index: Option<u64> },
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
            // Nothing was compared: the implementation failed before giving a result.
            Verdict::Mismatch(o) if o.checked == 0 => o.detail.clone().unwrap_or_else(|| "no detail".into()),
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
        // The implementation's own failure (a worker that crashed, hung or answered malformed
        // output) fails the case, is shrunk like a mismatch, and leaves the device alone.
        e @ RunError::Implementation { .. } => Verdict::Mismatch(Box::new(Outcome::error(e.to_string()))),
        other => Verdict::DeviceError { lost, message: other.to_string() },
    }
}

/// The campaign's verdict on an implementation's judged case.
fn verdict_of(judged: Result<crate::implementation::Judged, RunError>) -> Verdict {
    match judged {
        Err(e) => classify(e),
        Ok(crate::implementation::Judged::Unsupported(reason)) => Verdict::Skip(format!("unsupported: {reason}")),
        Ok(crate::implementation::Judged::Ran(o)) if o.passed => Verdict::Pass,
        Ok(crate::implementation::Judged::Ran(o)) => Verdict::Mismatch(Box::new(o)),
    }
}

/// Runs a batch of cases on an implementation under test through its batch methods
/// ([`crate::implementation::judge_batch`]); one verdict per case, in order.
pub(super) fn run_batch_guarded(
    ctx: &Arc<Context>,
    cases: &[FuzzCase],
    imp: &dyn Implementation,
    timings: &mut Timings,
    exclusive: &Mutex<()>,
) -> Vec<Verdict> {
    let guard = ctx.validation_enabled().then(|| exclusive.lock().unwrap_or_else(PoisonError::into_inner));
    let start = Instant::now();
    let list: Vec<Case> = cases.iter().map(|fc| fc.case.clone()).collect();
    let judged = crate::implementation::judge_batch(ctx, imp, &list);
    drop(guard);
    timings.device += start.elapsed();
    judged.into_iter().map(verdict_of).collect()
}

/// Runs one case (with its forced split) on the device and judges it, adding each stage's time
/// to `timings`. Validation-layer messages raised meanwhile fail it, as in `run_case`.
pub fn run_fuzz_case(ctx: &Arc<Context>, fc: &FuzzCase, mutant: Option<Mutant>, timings: &mut Timings) -> Verdict {
    run_guarded(ctx, fc, mutant, None, timings, &Mutex::new(()))
}

/// [`run_fuzz_case`] with `exclusive` held, while the validation layer is on, from the case's
/// first device call to the collection of its messages, so that the messages of cases run on
/// other threads stay out of this one's verdict.
pub(super) fn run_guarded(
    ctx: &Arc<Context>,
    fc: &FuzzCase,
    mutant: Option<Mutant>,
    implementation: Option<&UnderTest>,
    timings: &mut Timings,
    exclusive: &Mutex<()>,
) -> Verdict {
    let exclusive = || ctx.validation_enabled().then(|| exclusive.lock().unwrap_or_else(PoisonError::into_inner));
    if let Some(UnderTest(imp)) = implementation {
        // A foreign implementation: the one judging path every implementation takes.
        let guard = exclusive();
        let start = Instant::now();
        let judged = crate::implementation::judge_case(ctx, &**imp, &fc.case, None);
        drop(guard);
        timings.device += start.elapsed();
        return verdict_of(judged);
    }
    let (verdict, messages) = match &fc.case {
        Case::Attention(case) if case.fused => {
            // The fused cache check lives inside `run_attention` only: run it whole.
            let guard = exclusive();
            let start = Instant::now();
            let ran = run_attention(ctx, case, mutant.and_then(Mutant::attention));
            let messages = ctx.take_validation_messages();
            drop(guard);
            timings.fused += start.elapsed();
            let verdict = match ran {
                Err(e) => classify(e),
                Ok((outcome, _)) if outcome.passed => Verdict::Pass,
                Ok((outcome, _)) => Verdict::Mismatch(Box::new(outcome)),
            };
            (verdict, messages)
        }
        Case::Attention(case) => {
            let start = Instant::now();
            let inputs = attention_inputs(case);
            timings.materialize += start.elapsed();
            let inputs = match inputs {
                Ok(inputs) => inputs,
                Err(e) => return Verdict::Skip(e.to_string()),
            };
            let guard = exclusive();
            let start = Instant::now();
            let gpu = run_attention_inputs(ctx, &inputs, mutant.and_then(Mutant::attention));
            let messages = ctx.take_validation_messages();
            drop(guard);
            timings.device += start.elapsed();
            let verdict = match gpu {
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
            };
            (verdict, messages)
        }
        Case::KvAppend(case) => {
            let guard = exclusive();
            let start = Instant::now();
            let ran = run_append(ctx, case, mutant.and_then(Mutant::append));
            let messages = ctx.take_validation_messages();
            drop(guard);
            timings.append += start.elapsed();
            let verdict = match ran {
                Err(e) => classify(e),
                Ok((outcome, _)) if outcome.passed => Verdict::Pass,
                Ok((outcome, _)) => Verdict::Mismatch(Box::new(outcome)),
            };
            (verdict, messages)
        }
    };
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
}

/// What one step of a campaign did.
pub enum Step {
    Passed,
    Skipped(String),
    Failed(Box<Failure>),
    /// The shard's sequence is used up (past u64 indices; never in practice), or every case up
    /// to [`CampaignOptions::max_cases`] (or to the failure fail-fast stops at) was taken, or the
    /// workers were halted ([`Campaign::halt`]) and their last cases taken.
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

/// A campaign on one device: runs this shard's cases on worker threads, takes their verdicts
/// back in index order, and records failures.
pub struct Campaign {
    shared: Arc<Shared>,
    info: DeviceInfo,
    /// On the owner's thread, to redraw a failing case's value tree for shrinking.
    strategy: BoxedStrategy<FuzzCase>,
    config: Config,
    workers: Vec<JoinHandle<()>>,
    /// `None` before the workers start and after [`Campaign::finish`].
    results: Option<Receiver<Report>>,
    started: bool,
    /// Reports that came in ahead of the next index.
    pending: BTreeMap<u64, Report>,
    /// The next index to hand out (= cases taken back).
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
    /// The workers start with the first [`Campaign::next_step`].
    pub fn with_context(options: CampaignOptions, ctx: Arc<Context>) -> Campaign {
        Campaign {
            strategy: campaign_strategy(&options),
            config: runner_config(),
            info: ctx.info().clone(),
            shared: Arc::new(Shared::new(options, ctx)),
            workers: Vec::new(),
            results: None,
            started: false,
            pending: BTreeMap::new(),
            next: 0,
            stats: Stats::default(),
            findings: Vec::new(),
        }
    }

    pub fn options(&self) -> &CampaignOptions {
        &self.shared.options
    }

    /// The device the campaign opened (a reopened one is the same device).
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// The device now open (reopened after a device error).
    pub fn context(&self) -> Arc<Context> {
        self.shared.device().1
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Cases taken back (and counted) so far: the shard's indices `0..cases_run()`.
    pub fn cases_run(&self) -> u64 {
        self.next
    }

    fn draw(&self, index: u64) -> Result<Box<dyn ValueTree<Value = FuzzCase>>, CampaignError> {
        let seed = self.options().seed;
        draw(&self.strategy, &self.config, seed, index).map_err(|reason| CampaignError::Draw { seed, index, reason })
    }

    fn start(&mut self) -> Result<(), CampaignError> {
        if self.started {
            return Ok(());
        }
        self.started = true;
        let (tx, rx) = std::sync::mpsc::channel();
        for k in 0..self.options().jobs.max(1) {
            let (shared, tx) = (Arc::clone(&self.shared), tx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("fuzz-worker-{k}"))
                .spawn(move || workers::work(&shared, tx))
                .map_err(|e| CampaignError::Spawn(e.to_string()));
            match worker {
                Ok(handle) => self.workers.push(handle),
                Err(e) => {
                    self.finish();
                    return Err(e);
                }
            }
        }
        self.results = Some(rx);
        Ok(())
    }

    /// The shard's next case, in index order, once a worker has run it; `Ok(None)` if it is not
    /// done within `timeout`. The first call starts the workers. A device error has reopened the
    /// device by the time its case is returned; if that failed, the error comes after the cases
    /// before it.
    pub fn next_step(&mut self, timeout: Duration) -> Result<Option<Step>, CampaignError> {
        self.start()?;
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(report) = self.pending.remove(&self.next) {
                return self.take(report).map(Some);
            }
            if self.next >= self.shared.limit() {
                return Ok(Some(Step::Exhausted));
            }
            let Some(results) = &self.results else {
                return Ok(Some(Step::Exhausted));
            };
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            match results.recv_timeout(left) {
                Ok(report) => {
                    self.pending.insert(report.index(), report);
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                // Every worker has ended without this index: they were halted.
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return match self.shared.take_fatal() {
                        Some(e) => Err(e),
                        None => Ok(Some(Step::Exhausted)),
                    };
                }
            }
        }
    }

    /// [`Campaign::next_step`] without a timeout.
    pub fn step(&mut self) -> Result<Step, CampaignError> {
        loop {
            if let Some(step) = self.next_step(Duration::from_secs(60))? {
                return Ok(step);
            }
        }
    }

    /// Counts the report of index `self.next`.
    fn take(&mut self, report: Report) -> Result<Step, CampaignError> {
        self.next += 1;
        let Ran { index, global_index, case, verdict, timings } = match report {
            Report::Exhausted { .. } => return Ok(Step::Exhausted),
            Report::DrawFailed { global_index, reason, .. } => {
                return Err(CampaignError::Draw { seed: self.options().seed, index: global_index, reason });
            }
            Report::Ran(ran) => *ran,
        };
        self.stats.time_s += timings;
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
        Ok(match verdict {
            Verdict::Pass => Step::Passed,
            Verdict::Skip(reason) => Step::Skipped(reason),
            Verdict::Mismatch(_) | Verdict::DeviceError { .. } => {
                Step::Failed(Box::new(Failure { index, global_index, case, verdict }))
            }
        })
    }

    /// Workers take no new case: [`Campaign::next_step`] hands back the cases they are running,
    /// then [`Step::Exhausted`].
    pub fn halt(&self) {
        self.shared.halt();
    }

    /// Stops the workers once their current cases are done and waits for them. Cases they ran
    /// past the last one taken back are dropped uncounted. Dropping the campaign does the same.
    pub fn finish(&mut self) {
        self.shared.halt();
        // Workers notice a closed channel too.
        self.results = None;
        for worker in self.workers.drain(..) {
            // A panic was turned into a fatal error by the worker's guard.
            let _ = worker.join();
        }
        self.pending.clear();
    }

    /// Runs one case on the owner's thread (shrinking), reopening the device after a device error.
    fn run_here(&self, fc: &FuzzCase, timings: &mut Timings) -> Result<Verdict, CampaignError> {
        let (epoch, ctx) = self.shared.device();
        let options = self.options();
        let verdict =
            run_guarded(&ctx, fc, options.mutant, options.implementation.as_ref(), timings, &self.shared.exclusive);
        drop(ctx);
        if matches!(verdict, Verdict::DeviceError { .. }) {
            self.shared.reopen(epoch)?;
        }
        Ok(verdict)
    }

    /// Shrinks a failure (mismatches only), writes it to the corpus (when there is one) and
    /// returns the finding. `stop` cuts shrinking short; the smallest failing case so far is
    /// written then.
    pub fn record(&mut self, failure: Box<Failure>, stop: &AtomicBool) -> Result<&Finding, CampaignError> {
        let Failure { index, global_index, case, verdict } = *failure;
        let original_detail = verdict.summary();
        let kind = if matches!(verdict, Verdict::DeviceError { .. }) { "device error" } else { "mismatch" };
        let (mut shrunk, mut final_verdict, shrink) = match verdict {
            Verdict::Mismatch(_) => {
                let start = Instant::now();
                // The case is a pure function of its index: its tree is drawn again here.
                let mut tree = self.draw(global_index)?;
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
            let verdict = self.run_here(&plain, &mut scratch)?;
            if let Verdict::Mismatch(_) = verdict {
                (shrunk, final_verdict) = (plain, verdict);
            }
            self.stats.time_s.shrink += start.elapsed();
        }
        let detail = final_verdict.summary();
        let mut written = shrunk.case.clone();
        let mutant = self.options().mutant.map(|m| format!(" with --mutant {}", m.name())).unwrap_or_default();
        let against = self.options().implementation.as_ref().map(|UnderTest(imp)| format!(" against {}", imp.name()));
        let against = against.unwrap_or_default();
        let description = format!(
            "vkdecode-fuzz finding ({}): {}. Found by `vkdecode-fuzz --seed {} --shard {}`{mutant}{against} at case {index}.",
            shrunk.origin,
            clip(&final_verdict.first_line(), 200),
            self.options().seed,
            self.options().shard,
        );
        set_description(&mut written, description);
        let name = finding_name(&written);
        let kernel = written.kernel();
        let (mut file, mut duplicate, mut write_error) = (None, false, None);
        if let Some(dir) = self.options().corpus.clone() {
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
            let mutant = self.options().mutant.map(|m| format!(" --mutant {}", m.name())).unwrap_or_default();
            let under_test =
                self.options().implementation.as_ref().map(|UnderTest(imp)| imp.replay_args()).unwrap_or_default();
            format!("vkdecode replay {}{mutant}{under_test}", shell_word(&path.display().to_string()))
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
        let budget = self.options().shrink;
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
            // A device error is not the failure being shrunk: the device is reopened and the
            // candidate counts as passing.
            let verdict = self.run_here(&candidate, &mut scratch)?;
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

impl Drop for Campaign {
    fn drop(&mut self) {
        self.finish();
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
pub fn shell_word(text: &str) -> String {
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
    campaign_cases(seed, shard, kernels, None, n)
}

/// The first `n` cases of a campaign (drawn inside `implementation`'s capabilities when given),
/// with their global indices: what `vkdecode export --draw` writes.
pub fn campaign_cases(
    seed: u64,
    shard: Shard,
    kernels: Kernels,
    implementation: Option<&UnderTest>,
    n: u64,
) -> Result<Vec<(u64, FuzzCase)>, CampaignError> {
    let strategy = strategy_for(kernels, implementation);
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
