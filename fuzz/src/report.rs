//! The campaign report: a readable table on stdout and the JSON summary (same facts).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vkdecode::cases::campaign::{Campaign, Count, Finding};

use super::Cli;

/// Lines that report one finding as it is recorded (and again in the final report).
pub fn finding_lines(f: &Finding) -> String {
    let mut out = String::new();
    if let Some(s) = &f.shrink {
        let _ = writeln!(
            out,
            "  shrunk in {} steps ({} accepted, {:.1} s, ended by {}): {}",
            s.steps, s.accepted, s.seconds, s.ended_by, f.detail
        );
    }
    match (&f.file, f.duplicate, &f.write_error) {
        (Some(path), false, _) => {
            let _ = writeln!(out, "  wrote {}", path.display());
        }
        (Some(path), true, _) => {
            let _ = writeln!(out, "  duplicate of {} (not written again)", path.display());
        }
        (None, _, Some(e)) => {
            let _ = writeln!(out, "  NOT WRITTEN: {e}");
        }
        (None, _, None) => {}
    }
    if let Some(r) = &f.reproducer {
        let _ = writeln!(out, "  reproduce: {r}");
    }
    out
}

/// Orders bucket values numerically where they start with a number (`8` < `16` < `128`).
fn natural_key(value: &str) -> (u64, String) {
    let digits: String = value.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    let starts_with_number = value.starts_with(|c: char| c.is_ascii_digit() || c == '>');
    let number = if starts_with_number { digits.parse().unwrap_or(u64::MAX) } else { u64::MAX };
    (number, value.to_string())
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Everything the final report needs.
pub struct Summary<'a> {
    pub cli: &'a Cli,
    pub campaign: &'a Campaign,
    pub ended: &'static str,
    pub elapsed: Duration,
    pub corpus: &'a Path,
}

impl Summary<'_> {
    fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { self.campaign.stats().cases as f64 / secs } else { 0.0 }
    }

    /// The readable report.
    pub fn table(&self) -> String {
        let c = self.campaign;
        let s = c.stats();
        let o = c.options();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nvkdecode-fuzz: {} cases in {} ({:.1} cases/s, {} jobs) on {}; seed {}, shard {}{}; ended by {}",
            s.cases,
            seconds(self.elapsed),
            self.rate(),
            o.jobs,
            c.device().name,
            o.seed,
            o.shard,
            o.mutant.map(|m| format!(", mutant {}", m.name())).unwrap_or_default(),
            self.ended
        );
        let _ = writeln!(
            out,
            "{} passed, {} failed ({} device errors), {} skipped; {} written, {} duplicates\n",
            s.passed, s.failed, s.device_errors, s.skipped, s.written, s.duplicates
        );
        let _ = writeln!(
            out,
            "{:<10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10}",
            "kernel", "cases", "passed", "failed", "dev.err", "skipped", "written", "duplicates"
        );
        for (kernel, k) in &s.per_kernel {
            let _ = writeln!(
                out,
                "{:<10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10}",
                kernel, k.cases, k.passed, k.failed, k.device_errors, k.skipped, k.written, k.duplicates
            );
        }
        let timings = s.time_s;
        let total = timings.total().as_secs_f64().max(1e-9);
        let _ = writeln!(
            out,
            "\ntime per stage (summed over cases and threads; {} in {} wall):",
            seconds(timings.total()),
            seconds(self.elapsed)
        );
        for (stage, d) in timings.stages() {
            let what = match stage {
                "generate" => "draw the case",
                "materialize" => "inputs: values, poison, dtype rounding",
                "reference" => "f64 CPU reference",
                "device" => "upload + dispatch + readback",
                "compare" => "compare with the reference",
                "append" => "kv_append runs, whole",
                "fused" => "fused attention runs, whole",
                "shrink" => "shrinking failures",
                _ => "writing corpus files",
            };
            let _ = writeln!(out, "  {stage:<12} {:>9} {:>5.1} %  {what}", seconds(d), 100.0 * d.as_secs_f64() / total);
        }
        let _ = writeln!(out, "\ncoverage (cases per bucket, [failures]):");
        for (dimension, values) in &s.buckets {
            let _ = writeln!(out, "  {dimension}");
            let mut values: Vec<(&String, &Count)> = values.iter().collect();
            values.sort_by_key(|(v, _)| natural_key(v));
            let mut line = String::from("   ");
            for (value, count) in values {
                let failed = if count.failed > 0 { format!(" [{}]", count.failed) } else { String::new() };
                let item = format!(" {value}: {}{failed};", count.cases);
                if line.len() + item.len() > 118 {
                    let _ = writeln!(out, "{line}");
                    line = String::from("   ");
                }
                line.push_str(&item);
            }
            let _ = writeln!(out, "{}", line.trim_end_matches(';'));
        }
        if !s.skip_reasons.is_empty() {
            let _ = writeln!(out, "\nskipped (the device refused a parameter):");
            for (reason, n) in &s.skip_reasons {
                let _ = writeln!(out, "  {n:>6}  {reason}");
            }
        }
        if !c.findings().is_empty() {
            let _ = writeln!(out, "\nfindings ({}; corpus {}):", c.findings().len(), self.corpus.display());
            for f in c.findings() {
                let _ =
                    writeln!(out, "- {} case {} ({}, {}): {}", f.kernel, f.index, f.origin, f.kind, f.original_detail);
                out.push_str(&finding_lines(f));
            }
        }
        out
    }

    /// The JSON summary.
    pub fn json(&self) -> String {
        let c = self.campaign;
        let o = c.options();
        let stats = c.stats();
        let stages: BTreeMap<&str, f64> = stats.time_s.stages().iter().map(|(n, d)| (*n, d.as_secs_f64())).collect();
        let summary = json!({
            "tool": "vkdecode-fuzz",
            "version": env!("CARGO_PKG_VERSION"),
            "command": std::env::args().collect::<Vec<_>>(),
            "seed": o.seed,
            "shard": o.shard.to_string(),
            "jobs": o.jobs,
            "kernels": o.kernels.names(),
            "mutant": o.mutant.map(|m| m.name()),
            "device": c.device(),
            "validation": c.context().validation_enabled(),
            "corpus": self.corpus,
            "budget": {
                "duration_s": self.cli.duration.map(|d| d.as_secs_f64()),
                "cases": self.cli.cases,
            },
            "ended_by": self.ended,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "cases_per_s": self.rate(),
            "cases": stats.cases,
            "passed": stats.passed,
            "failed": stats.failed,
            "device_errors": stats.device_errors,
            "skipped": stats.skipped,
            "written": stats.written,
            "duplicates": stats.duplicates,
            "per_kernel": stats.per_kernel,
            "buckets": stats.buckets,
            "skip_reasons": stats.skip_reasons,
            "time_split_s": stages,
            "findings": c.findings(),
        });
        let mut text = serde_json::to_string_pretty(&summary).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_values_sort_numerically() {
        let mut v = vec!["128", "16", "8", ">=32768", "1024-32767", "2-63", "auto", "0"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["0", "2-63", "8", "16", "128", "1024-32767", ">=32768", "auto"]);
    }
}
