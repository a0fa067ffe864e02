//! `vkdecode gate`: reruns the throughput set, compares it with a baseline of the same device and
//! driver, prints a markdown table (it fits a CI step summary) and a one-line verdict. Exit 0: no
//! regression; 1: a figure regressed beyond the tolerance and the noise; 2: no verdict (missing
//! or malformed baseline, a baseline of another device or set, a figure the run no longer
//! measures). The measuring and the rule are in [`vkdecode::bench::gate`]; this module parses,
//! prints and writes.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use vkdecode::bench::gate::{
    DeviceIdentity, GateOptions, GateSet, Outcome, RunResults, Status, Tolerance, Verdict, best_of, check_comparable,
    collect, compare, load_results, noisy_figures, outcome, steadier_of, write_atomic,
};
use vkdecode::bench::plot;

use super::table::num;
use super::{Finish, Global, emit, note};

pub const GATE_HELP: &str = "\
The set (GPU): copy bandwidth; decode attention (f16 K/V, batch 1) at h32:kv8:d128 len 512, 4096,
16384 and h16:kv8:d128 len 4096; whole decode steps (bf16 weights, f16 KV, 4 warm-up + 24 timed)
of qwen3-0.6b at contexts 512, 4096, 16384 and qwen3-8b at 512, 16384. On a CPU device (lavapipe)
and with --quick: the quick set (short attention shapes, a tiny Qwen3, few calls). A baseline of
one set is never compared with a run of the other.

Rule: a figure regresses when its median is worse than the baseline's by more than the tolerance
AND the p10-p90 ranges do not overlap (times: now p10 > baseline p90). When one does, the set is
measured a second time and each figure is kept from its better run, so a figure fails only when it
is worse in both (a GPU can run one measurement slow throughout; --single-run turns this off). A
baseline is measured twice too and keeps each figure from its steadier run (the better far end of
the p10-p90 band), with a warning for a figure whose band is wider than the tolerance.
Improvements are reported; a figure only in this run is reported as new and passes; one only in
the baseline means the set changed: no verdict (exit 2) until the baseline is recorded again.

Exit status: 0 no regression (or baseline written), 1 a figure regressed, 2 no verdict: the
baseline is missing or malformed, or is for another device, driver or set.

Examples:
  vkdecode gate --baseline corpus/baselines/nvidia-h100-80gb-hbm3-580.159.04.json --update-baseline
  vkdecode gate --baseline corpus/baselines/nvidia-h100-80gb-hbm3-580.159.04.json --plot gate.svg \\
      >> \"$GITHUB_STEP_SUMMARY\"";

#[derive(Args)]
pub struct GateArgs {
    /// Baseline results of this device and driver (corpus/baselines/<device-slug>.json)
    #[arg(long, value_name = "FILE")]
    baseline: PathBuf,
    /// How much worse than the baseline median a figure may get (beyond the noise) before it
    /// fails: a percentage (5%) or a fraction (0.05)
    #[arg(long, value_name = "PCT", default_value = "5%", value_parser = parse_tolerance)]
    tolerance: Tolerance,
    /// Write this run as the baseline (atomically; creates the file and its directory), then exit 0
    #[arg(long)]
    update_baseline: bool,
    /// The quick set on any device (the default on CPU devices)
    #[arg(long)]
    quick: bool,
    /// Print one JSON object (results, baseline, verdicts) instead of the markdown report
    #[arg(long)]
    json: bool,
    /// Also draw achieved GB/s against context length per kernel, with the roofline, as SVG
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Measure the set once, even when a figure regresses or a baseline is written (by default
    /// those measure it again and keep each figure's better run)
    #[arg(long)]
    single_run: bool,
    /// Deliberate slowdown to prove the gate fails: every attention call records the attention
    /// pass K more times
    #[arg(long, value_name = "K", default_value_t = 0, hide = true, conflicts_with = "update_baseline")]
    slow_down_attention: u32,
}

fn parse_tolerance(s: &str) -> Result<Tolerance, String> {
    s.parse()
}

pub fn run(global: &Global, args: &GateArgs) -> anyhow::Result<Finish> {
    let path = &args.baseline;
    // The baseline first: a missing or malformed one costs no device time.
    let old = match load_results(path) {
        Ok(old) => old,
        Err(e) if args.update_baseline => {
            note(&format!("note: replacing the unreadable baseline: {e}"));
            None
        }
        Err(e) => return Err(e.into()),
    };
    if old.is_none() && !args.update_baseline {
        anyhow::bail!(
            "{}: no such baseline; record one on this device with `vkdecode gate --baseline {} --update-baseline`",
            path.display(),
            path.display()
        );
    }

    let ctx = global.open_context()?;
    let device = DeviceIdentity::of(ctx.info());
    let set = if args.quick || ctx.info().device_type == "cpu" { GateSet::Quick } else { GateSet::Full };
    let baseline = match old {
        Some(old) => match check_comparable(&old, &device, set) {
            Ok(()) => Some(old),
            Err(e) if args.update_baseline => {
                note(&format!("note: the old baseline is not comparable ({e}); replacing it"));
                None
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        },
        None => None,
    };
    if baseline.is_none() {
        note(&format!("note: suggested baseline name: corpus/baselines/{}.json", device.slug()));
    }
    note(&format!("running the {set} set on {}", device.describe()));
    let options = GateOptions { set, commit: project_commit(), slow_down_attention: args.slow_down_attention };
    let mut current = collect(&ctx, &options, &mut |line| note(line))?;
    let regressed = |current: &RunResults| {
        baseline.as_ref().is_some_and(|b| outcome(&compare(b, current, args.tolerance)) == Outcome::Regressed)
    };
    if !args.single_run && (args.update_baseline || regressed(&current)) {
        note(&if args.update_baseline {
            "measuring the set again (a baseline is written): each figure is kept from its steadier run".to_string()
        } else {
            "measuring the set again (a figure regressed): each figure is kept from its better run".to_string()
        });
        let again = collect(&ctx, &options, &mut |line| note(line))?;
        current = if args.update_baseline { steadier_of(&current, &again) } else { best_of(&current, &again) };
    }
    if args.update_baseline {
        for f in noisy_figures(&current, args.tolerance) {
            note(&format!(
                "warning: `{}` varies from {:.4} to {:.4} {} (p10–p90, median {:.4}), more than the {} \
                 tolerance: a regression inside that band will pass; warm the device and record again",
                f.name, f.p10, f.p90, f.unit, f.median, args.tolerance
            ));
        }
    }
    let messages = ctx.take_validation_messages();
    if !messages.is_empty() {
        anyhow::bail!("the validation layer reported {} message(s): {}", messages.len(), messages[0]);
    }

    let empty = RunResults { figures: Vec::new(), ..current.clone() };
    let verdicts = compare(baseline.as_ref().unwrap_or(&empty), &current, args.tolerance);
    let result = if args.update_baseline { None } else { Some(outcome(&verdicts)) };
    if args.update_baseline {
        write_atomic(path, current.to_json().as_bytes())?;
    }
    if let Some(svg_path) = &args.plot {
        write_atomic(svg_path, plot::svg_against(&current, baseline.as_ref()).as_bytes())?;
    }

    if args.json {
        let value = json!({
            "outcome": result.map_or(json!("baseline_updated"), |o| json!(o)),
            "tolerance": args.tolerance.fraction(),
            "baseline_file": path,
            "baseline": baseline.as_ref().map(|b| json!({
                "commit": b.commit, "created": b.created, "set": b.set, "device": b.device, "copy_gbps": b.copy_gbps,
            })),
            "results": current,
            "verdicts": verdicts,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
    } else {
        emit(&report(&current, baseline.as_ref(), &verdicts, args, path, result))?;
    }
    match result {
        None | Some(Outcome::Pass) => Ok(Finish::AllAsExpected),
        Some(Outcome::Regressed) => Ok(Finish::SomeFailed),
        Some(Outcome::Unusable) => {
            let gone: Vec<&str> = verdicts.iter().filter(|v| v.status.unusable()).map(|v| v.name.as_str()).collect();
            anyhow::bail!(
                "{}: the baseline holds figures this run measures differently or not at all ({}); record it again \
                 with --update-baseline",
                path.display(),
                gone.join(", ")
            )
        }
    }
}

/// The commit this binary was built from (build.rs; `-dirty` with uncommitted changes to tracked
/// files), else that of the checkout it runs in, else `$GITHUB_SHA`, else `unknown`.
fn project_commit() -> String {
    if let Some(commit) = option_env!("VKDECODE_GIT_COMMIT") {
        return commit.to_string();
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) if !head.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}-dirty") } else { head }
        }
        _ => std::env::var("GITHUB_SHA").unwrap_or_else(|_| "unknown".to_string()),
    }
}

/// The markdown report: a context line, the table, the one-line verdict.
fn report(
    current: &RunResults,
    baseline: Option<&RunResults>,
    verdicts: &[Verdict],
    args: &GateArgs,
    path: &Path,
    result: Option<Outcome>,
) -> String {
    let d = &current.device;
    let mut out = format!(
        "**vkdecode gate** on {} ({} {}, driver {}, Vulkan {}), {} set, tolerance {}; now: commit `{}`, copy {} GB/s",
        d.name,
        d.driver_name,
        d.driver_info,
        d.driver_version_text(),
        d.api_version,
        current.set,
        args.tolerance,
        short(&current.commit),
        num(current.copy_gbps)
    );
    match baseline {
        Some(b) => out.push_str(&format!(
            "; baseline `{}`: commit `{}` of {}, copy {} GB/s",
            path.display(),
            short(&b.commit),
            b.created,
            num(b.copy_gbps)
        )),
        None => out.push_str("; no baseline to compare with"),
    }
    if current.runs > 1 {
        out.push_str(&format!("; now: the better of {} runs per figure", current.runs));
    }
    if current.slow_down_attention > 0 {
        out.push_str(&format!(
            "; **attention deliberately slowed** ({} extra passes per call)",
            current.slow_down_attention
        ));
    }
    out.push_str("\n\n");
    out.push_str(&table(verdicts));
    out.push('\n');
    out.push_str(&verdict_line(verdicts, args.tolerance, path, result));
    out.push('\n');
    out
}

/// The first 12 hex digits of a commit id (keeping `-dirty`); anything else as it is.
fn short(commit: &str) -> String {
    let hex = commit.chars().take_while(char::is_ascii_hexdigit).count();
    if hex > 12 { format!("{}{}", &commit[..12], &commit[hex..]) } else { commit.to_string() }
}

/// `| figure | baseline | now | change | noise | verdict |`.
fn table(verdicts: &[Verdict]) -> String {
    let mut out = String::from("| figure | baseline | now | change | noise | verdict |\n|---|--:|--:|--:|--:|---|\n");
    let cell = |f: Option<&vkdecode::bench::gate::Figure>| f.map_or("—".to_string(), |f| num(f.median));
    for v in verdicts {
        let unit = v.current.as_ref().or(v.baseline.as_ref()).map_or("", |f| f.unit.as_str());
        let status = match v.status {
            Status::Regressed => format!("**{}**", v.status.label()),
            s => s.label().to_string(),
        };
        out.push_str(&format!(
            "| {} ({unit}) | {} | {} | {} | {} | {status} |\n",
            v.name.replace('|', "\\|"),
            cell(v.baseline.as_ref()),
            cell(v.current.as_ref()),
            v.change.map_or("—".to_string(), |c| format!("{:+.1}%", 100.0 * c)),
            v.noise.map_or("—".to_string(), |n| format!("±{:.1}%", 100.0 * n)),
        ));
    }
    out
}

fn verdict_line(verdicts: &[Verdict], tolerance: Tolerance, path: &Path, result: Option<Outcome>) -> String {
    let count = |s: Status| verdicts.iter().filter(|v| v.status == s).count();
    let tally = [Status::Unchanged, Status::Noise, Status::Improved, Status::New]
        .into_iter()
        .filter(|&s| count(s) > 0)
        .map(|s| format!("{} {}", count(s), s.label()))
        .collect::<Vec<_>>()
        .join(", ");
    match result {
        None => format!("**baseline written** to `{}` ({} figures).", path.display(), verdicts.len()),
        Some(Outcome::Pass) => format!(
            "**gate: pass**: {} figures, none worse than the baseline by more than {tolerance} beyond the noise ({tally}).",
            verdicts.len()
        ),
        Some(Outcome::Regressed) => {
            let worst: Vec<String> = verdicts
                .iter()
                .filter(|v| v.status == Status::Regressed)
                .map(|v| format!("{} ({:+.1}%)", v.name, 100.0 * v.change.unwrap_or(f64::NAN)))
                .collect();
            format!(
                "**gate: FAIL**: {} of {} figures regressed beyond {tolerance} and the noise: {}.",
                worst.len(),
                verdicts.len(),
                worst.join(", ")
            )
        }
        Some(Outcome::Unusable) => format!(
            "**gate: no verdict**: {} baseline figure(s) missing from this run or changed unit; record the baseline again.",
            verdicts.iter().filter(|v| v.status.unusable()).count()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vkdecode::bench::gate::{Better, Figure};

    fn figure(median: f64) -> Figure {
        Figure {
            name: "attention h32:kv8:d128:len512:f16".into(),
            unit: "µs/call".into(),
            better: Better::Lower,
            median,
            p10: median * 0.99,
            p90: median * 1.01,
            samples: 20,
            kernel: None,
            context: None,
            gbps: None,
        }
    }

    fn verdict(status: Status, change: f64) -> Verdict {
        Verdict {
            name: "attention h32:kv8:d128:len512:f16".into(),
            status,
            baseline: Some(figure(10.0)),
            current: Some(figure(10.0 * (1.0 + change))),
            change: Some(change),
            noise: Some(0.01),
        }
    }

    #[test]
    fn the_report_is_a_markdown_table_and_one_verdict_line() {
        let t = table(&[verdict(Status::Regressed, 0.38)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| figure | baseline | now | change | noise | verdict |");
        assert_eq!(
            lines[2],
            "| attention h32:kv8:d128:len512:f16 (µs/call) | 10.00 | 13.80 | +38.0% | ±1.0% | **REGRESSED** |"
        );
        let tol: Tolerance = "5%".parse().unwrap();
        let line =
            verdict_line(&[verdict(Status::Regressed, 0.38)], tol, Path::new("b.json"), Some(Outcome::Regressed));
        assert_eq!(
            line,
            "**gate: FAIL**: 1 of 1 figures regressed beyond 5% and the noise: attention h32:kv8:d128:len512:f16 (+38.0%)."
        );
        let line = verdict_line(&[verdict(Status::Noise, 0.06)], tol, Path::new("b.json"), Some(Outcome::Pass));
        assert!(line.starts_with("**gate: pass**") && line.contains("1 within noise"), "{line}");
    }

    #[test]
    fn commits_are_shortened_unless_dirty() {
        assert_eq!(short("0123456789abcdef0123"), "0123456789ab");
        assert_eq!(short("0123456789abcdef-dirty"), "0123456789ab-dirty");
        assert_eq!(short("unknown"), "unknown");
    }
}
