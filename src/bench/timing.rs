//! Timing many back-to-back calls of an op with GPU timestamps.
//!
//! One timed submit is one command buffer: timestamp, N calls (optionally separated by barriers),
//! timestamp. The per-call time of that submit is the interval ÷ N, so fixed costs that are not
//! per call (the command buffer's start, the final barrier to the host, the fence wait) stay out,
//! and the start-up cost of one dispatch is amortised the way a decode step amortises it. R timed
//! submits give R samples; [`Stats`] reports their median and spread.
//!
//! Both timestamps are written at BOTTOM_OF_PIPE (the only stage [`Recorder::timestamp`] offers):
//! the first one may land a little after the first call started, which can only shorten the
//! interval by less than one call's start-up; with N calls per submit the error is ≤ 1/N of it.
//!
//! The closure gets a call index that keeps counting across warm-up and timed submits, so a
//! benchmark that rotates over copies of its inputs never restarts the rotation (a restart would
//! re-read the copies the previous submit left in cache).

use crate::gpu::{Context, Counters, Recorder};

use super::{BenchError, Result};

/// How many calls, submits and warm-up submits a timing takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TimingConfig {
    /// Back-to-back calls recorded between the two timestamps of one submit.
    pub iters: u32,
    /// Timed submits (samples).
    pub repeats: u32,
    /// Untimed submits of `iters` calls each before the timed ones (pipeline creation, clocks,
    /// first-touch page faults).
    pub warmup: u32,
}

/// What separates two consecutive calls in one command buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Between {
    /// A global memory barrier: consecutive calls write the same outputs (write-after-write, and
    /// write-after-read on intermediates), which is a real dependency.
    Barrier,
    /// Nothing: the calls are independent (no buffer written by one is touched by the next).
    Nothing,
}

/// Order statistics of per-call times in nanoseconds over the timed submits. Percentiles
/// interpolate linearly between samples (with few samples p10/p90 sit near min/max).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Stats {
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub p10_ns: f64,
    pub p90_ns: f64,
    pub samples: usize,
}

impl Stats {
    /// Statistics of `samples` (NaN everywhere when empty).
    pub fn from_samples(samples: &[f64]) -> Stats {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let quantile = |q: f64| -> f64 {
            match sorted.len() {
                0 => f64::NAN,
                n => {
                    let pos = q * (n - 1) as f64;
                    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
                    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
                }
            }
        };
        Stats {
            median_ns: quantile(0.5),
            min_ns: sorted.first().copied().unwrap_or(f64::NAN),
            max_ns: sorted.last().copied().unwrap_or(f64::NAN),
            p10_ns: quantile(0.1),
            p90_ns: quantile(0.9),
            samples: sorted.len(),
        }
    }

    pub fn median_us(&self) -> f64 {
        self.median_ns / 1e3
    }
}

/// The result of [`time_calls`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    /// Per-call time over the timed submits.
    pub per_call: Stats,
    /// What one call records (its dispatches, barriers and copies; the barrier between calls is
    /// not counted here).
    pub per_call_counters: Counters,
    pub config: TimingConfig,
    pub between: Between,
}

/// Times `record`: `config.warmup` untimed submits, then `config.repeats` timed submits of
/// `config.iters` calls each. `record(rec, i)` records call `i` (counting across all submits);
/// `on_submit` runs after every submit (progress).
pub fn time_calls<'a, F>(
    ctx: &'a Context,
    what: &str,
    config: TimingConfig,
    between: Between,
    mut record: F,
    on_submit: &mut dyn FnMut(),
) -> Result<Timing>
where
    F: FnMut(&mut Recorder<'a>, u64) -> Result<()>,
{
    if config.iters == 0 || config.repeats == 0 {
        return Err(BenchError::Config(format!(
            "{what}: iterations ({}) and repeats ({}) must be at least 1",
            config.iters, config.repeats
        )));
    }
    let mut call = 0u64;
    let mut per_call_counters = None;
    let mut samples = Vec::with_capacity(config.repeats as usize);
    for submit in 0..config.warmup + config.repeats {
        let timed = submit >= config.warmup;
        let mut rec = Recorder::new(ctx)?;
        if timed {
            rec.timestamp()?;
        }
        for i in 0..config.iters {
            if i > 0 {
                match between {
                    Between::Barrier => rec.barrier(),
                    Between::Nothing => {}
                }
            }
            let before = rec.counters();
            record(&mut rec, call)?;
            call += 1;
            if per_call_counters.is_none() {
                let after = rec.counters();
                per_call_counters = Some(Counters {
                    dispatches: after.dispatches - before.dispatches,
                    barriers: after.barriers - before.barriers,
                    copies: after.copies - before.copies,
                });
            }
        }
        if timed {
            rec.timestamp()?;
        }
        let done = rec.submit()?;
        on_submit();
        if timed {
            let [start, end] = done.timestamps_ns[..] else {
                return Err(BenchError::Timestamps {
                    what: what.to_string(),
                    expected: 2,
                    got: done.timestamps_ns.len(),
                });
            };
            samples.push((end - start) / f64::from(config.iters));
        }
    }
    Ok(Timing {
        per_call: Stats::from_samples(&samples),
        per_call_counters: per_call_counters.unwrap_or_default(),
        config,
        between,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_interpolate_between_samples() {
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!((s.min_ns, s.median_ns, s.max_ns, s.samples), (1.0, 3.0, 5.0, 5));
        assert!((s.p10_ns - 1.4).abs() < 1e-12 && (s.p90_ns - 4.6).abs() < 1e-12, "{s:?}");
        let even = Stats::from_samples(&[1.0, 2.0]);
        assert_eq!(even.median_ns, 1.5);
    }

    #[test]
    fn stats_of_nothing_are_nan() {
        let s = Stats::from_samples(&[]);
        assert!(s.median_ns.is_nan() && s.min_ns.is_nan() && s.samples == 0);
    }
}
