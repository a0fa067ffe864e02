//! The worker threads of a campaign: `jobs` threads take case indices from a shared counter,
//! draw, run and judge their cases, and send the verdicts to the thread that owns the
//! [`Campaign`](super::Campaign), which takes them back in index order.
//!
//! # Design
//! - **Index order.** The owner puts results back in index order before counting them
//!   ([`next_step`](super::Campaign::next_step)), so counts, findings and where fail-fast stops
//!   are those of a one-thread run: with any number of jobs, a case budget runs the same cases
//!   and finds the same failures. Results past the point where the owner stops (Ctrl-C, a duration, the first
//!   failure with fail-fast) are dropped uncounted.
//! - **Limit.** No worker takes an index at or past `limit` (the case budget). With fail-fast a
//!   failing case lowers it to just past itself, so workers stop taking new cases at once while
//!   the cases before it, which may fail first, finish.
//! - **Device errors.** A lost device fails every case in flight on it. The device has an epoch:
//!   the first error of an epoch reopens it (the next epoch), later errors of that epoch reuse
//!   the new one. Every case that saw an error is still a failure (a loss cannot be pinned on one
//!   of the cases in flight, and none may be lost). If reopening fails the workers halt and the
//!   owner gets that error once it has taken back the cases before it.
//! - **Validation.** The layer's message log is one per device, so messages cannot be told apart
//!   between threads: with the layer on, each case's device work and the collection of its
//!   messages run under [`Shared::exclusive`]. It is taken before any recorder (the recorders'
//!   own lock, `Context::validation_serial`, comes second), and no thread waits for it while
//!   holding a recorder, so the two locks cannot deadlock. Value generation, the reference and
//!   the comparison of plain attention cases stay parallel.
//! - **Panics.** A worker that panics (a bug in the host code) halts the others and ends the
//!   campaign with [`CampaignError::Worker`] instead of leaving the owner waiting for its case.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::mix::FuzzCase;
use super::shard::{draw, runner_config};
use super::stats::Timings;
use super::{CampaignError, CampaignOptions, UnderTest, Verdict, campaign_strategy, run_batch_guarded, run_guarded};
use crate::gpu::Context;

/// A case a worker ran.
pub(super) struct Ran {
    pub(super) index: u64,
    pub(super) global_index: u64,
    pub(super) case: FuzzCase,
    pub(super) verdict: Verdict,
    pub(super) timings: Timings,
}

/// What a worker sends back for one index.
pub(super) enum Report {
    Ran(Box<Ran>),
    /// The strategy drew no case (a bug in the strategies; ends the campaign).
    DrawFailed {
        index: u64,
        global_index: u64,
        reason: String,
    },
    /// The index is past the end of the shard's sequence.
    Exhausted {
        index: u64,
    },
}

impl Report {
    pub(super) fn index(&self) -> u64 {
        match self {
            Report::Ran(ran) => ran.index,
            Report::DrawFailed { index, .. } | Report::Exhausted { index } => *index,
        }
    }
}

/// The open device and how many times it has been reopened.
struct Device {
    epoch: u64,
    ctx: Arc<Context>,
}

/// State shared by the owner and the workers.
pub(super) struct Shared {
    pub(super) options: CampaignOptions,
    device: Mutex<Device>,
    /// Held around a case's device work and the collection of its validation messages while the
    /// validation layer is on (see the module note).
    pub(super) exclusive: Mutex<()>,
    /// The next index to take.
    next: AtomicU64,
    /// Indices at or past this are not taken.
    limit: AtomicU64,
    halt: AtomicBool,
    /// Why the workers halted on their own (the device could not be reopened, a worker panicked).
    fatal: Mutex<Option<CampaignError>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn new(options: CampaignOptions, ctx: Arc<Context>) -> Shared {
        let limit = options.max_cases.unwrap_or(u64::MAX);
        Shared {
            options,
            device: Mutex::new(Device { epoch: 0, ctx }),
            exclusive: Mutex::new(()),
            next: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            halt: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }

    /// The open device and its epoch (pass the epoch to [`Shared::reopen`] after a device error).
    pub(super) fn device(&self) -> (u64, Arc<Context>) {
        let device = lock(&self.device);
        (device.epoch, Arc::clone(&device.ctx))
    }

    /// Reopens the device after a device error on epoch `epoch`, unless another case's error
    /// has reopened it already.
    pub(super) fn reopen(&self, epoch: u64) -> Result<(), CampaignError> {
        let mut device = lock(&self.device);
        if device.epoch == epoch {
            let ctx = Context::new(&self.options.context).map_err(CampaignError::Reopen)?;
            *device = Device { epoch: epoch + 1, ctx: Arc::new(ctx) };
        }
        Ok(())
    }

    pub(super) fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Stops the workers after the cases they are running.
    pub(super) fn halt(&self) {
        self.halt.store(true, Ordering::SeqCst);
    }

    /// Halts the workers for `error` (the first such error is kept).
    fn fail(&self, error: CampaignError) {
        lock(&self.fatal).get_or_insert(error);
        self.halt();
    }

    pub(super) fn take_fatal(&self) -> Option<CampaignError> {
        lock(&self.fatal).take()
    }
}

/// Halts the campaign if the worker unwinds (a panic), naming the case it was on.
struct PanicGuard<'a> {
    shared: &'a Shared,
    index: Option<u64>,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.fail(CampaignError::Worker { index: self.index });
        }
    }
}

/// One worker: takes indices until the limit, a halt or the end of the sequence. An
/// implementation under test with a batch size above 1 gets its cases that many at a time
/// (consecutive indices), each judged and sent back on its own.
pub(super) fn work(shared: &Shared, results: Sender<Report>) {
    let mut guard = PanicGuard { shared, index: None };
    // Built here: proptest's boxed strategies cannot cross threads.
    let strategy = campaign_strategy(&shared.options);
    let config = runner_config();
    let options = &shared.options;
    let under_test = options.implementation.as_ref().map(|UnderTest(imp)| &**imp);
    let batch = under_test.map_or(1, |imp| imp.batch_size().max(1)) as u64;
    while !shared.halt.load(Ordering::SeqCst) {
        let first = shared.next.fetch_add(batch, Ordering::SeqCst);
        let mut drawn: Vec<(u64, u64, FuzzCase, Timings)> = Vec::new();
        let mut last = false;
        for index in first..first + batch {
            if index >= shared.limit() {
                last = true;
                break;
            }
            guard.index = Some(index);
            let Some(global_index) = options.shard.global_index(index) else {
                let _ = results.send(Report::Exhausted { index });
                last = true;
                break;
            };
            let start = Instant::now();
            match draw(&strategy, &config, options.seed, global_index) {
                Ok(tree) => {
                    let timings = Timings { generate: start.elapsed(), ..Timings::default() };
                    drawn.push((index, global_index, tree.current(), timings));
                }
                Err(reason) => {
                    let _ = results.send(Report::DrawFailed { index, global_index, reason });
                    last = true;
                    break;
                }
            }
        }
        let (epoch, ctx) = shared.device();
        let verdicts = match under_test {
            Some(imp) if batch > 1 && !drawn.is_empty() => {
                let cases: Vec<FuzzCase> = drawn.iter().map(|d| d.2.clone()).collect();
                let mut shared_timings = Timings::default();
                let verdicts = run_batch_guarded(&ctx, &cases, imp, &mut shared_timings, &shared.exclusive);
                // The batch's device time, shared evenly among its cases.
                let each = shared_timings.device / drawn.len() as u32;
                drawn.iter_mut().for_each(|d| d.3.device += each);
                verdicts
            }
            _ => drawn
                .iter_mut()
                .map(|(_, _, case, timings)| {
                    run_guarded(&ctx, case, options.mutant, options.implementation.as_ref(), timings, &shared.exclusive)
                })
                .collect(),
        };
        drop(ctx);
        let mut reopened = false;
        for ((index, global_index, case, timings), verdict) in drawn.into_iter().zip(verdicts) {
            let failed = matches!(verdict, Verdict::Mismatch(_) | Verdict::DeviceError { .. });
            if failed && options.fail_fast {
                shared.limit.fetch_min(index + 1, Ordering::SeqCst);
            }
            if matches!(verdict, Verdict::DeviceError { .. }) && !reopened {
                reopened = true;
                if let Err(e) = shared.reopen(epoch) {
                    shared.fail(e);
                }
            }
            if results.send(Report::Ran(Box::new(Ran { index, global_index, case, verdict, timings }))).is_err() {
                // The campaign was dropped.
                return;
            }
        }
        if last {
            break;
        }
    }
}
