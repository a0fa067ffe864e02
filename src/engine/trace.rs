//! Per-dispatch GPU timings as Chrome trace events (`--trace FILE`, opens in Perfetto or
//! chrome://tracing): one complete event ("ph": "X") per timestamped stage of every step, on a
//! clock that runs the steps back to back (host gaps between submits are left out).

use std::io::Write as _;
use std::path::Path;

/// One stage of one step.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TraceEvent {
    pub name: String,
    /// Step (token) index.
    pub step: usize,
    /// Start on the GPU clock, microseconds.
    pub start_us: f64,
    pub dur_us: f64,
}

/// Appends the events of one submit whose timestamps are `timestamps_ns` (the first taken before
/// the first stage, one after each stage named in `labels` with its step within the submit);
/// `first_step` is the submit's first step. Returns the clock after the submit.
pub fn push_step(
    events: &mut Vec<TraceEvent>,
    labels: &[(usize, String)],
    timestamps_ns: &[f64],
    first_step: usize,
    clock_us: f64,
) -> f64 {
    for ((k, label), pair) in labels.iter().zip(timestamps_ns.windows(2)) {
        events.push(TraceEvent {
            name: label.clone(),
            step: first_step + k,
            start_us: clock_us + pair[0] / 1e3,
            dur_us: (pair[1] - pair[0]) / 1e3,
        });
    }
    clock_us + timestamps_ns.last().copied().unwrap_or(0.0) / 1e3
}

/// The Chrome trace JSON of `events`: one thread per step kind is not needed, so every event is
/// on thread 1 of process 1, with its step in `args`.
pub fn chrome_json(events: &[TraceEvent], device: &str) -> serde_json::Value {
    let trace: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "cat": "gpu",
                "ph": "X",
                "ts": e.start_us,
                "dur": e.dur_us,
                "pid": 1,
                "tid": 1,
                "args": { "step": e.step },
            })
        })
        .collect();
    serde_json::json!({
        "traceEvents": trace,
        "displayTimeUnit": "ns",
        "otherData": { "device": device, "clock": "GPU timestamps, steps back to back" },
    })
}

/// Writes `events` as Chrome trace JSON to `path` (atomically: a temporary file, then rename).
pub fn write(path: &Path, events: &[TraceEvent], device: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut f, &chrome_json(events, device))?;
        f.flush()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cover_each_stage_back_to_back() {
        let labels = vec![(0, "a".to_string()), (0, "b".to_string())];
        let mut events = Vec::new();
        let clock = push_step(&mut events, &labels, &[0.0, 1000.0, 3000.0], 0, 0.0);
        let clock = push_step(&mut events, &labels, &[0.0, 500.0, 1500.0], 1, clock);
        assert_eq!(clock, 4.5);
        assert_eq!(events[1], TraceEvent { name: "b".into(), step: 0, start_us: 1.0, dur_us: 2.0 });
        assert_eq!(events[2].start_us, 3.0);
        let json = chrome_json(&events, "dev");
        assert_eq!(json["traceEvents"].as_array().map(Vec::len), Some(4));
        assert_eq!(json["traceEvents"][3]["ph"], "X");
    }
}
