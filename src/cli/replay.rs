//! `vkdecode replay FILE...`: runs single case files (a corpus file, a fuzzer finding, a file
//! written by hand) and prints everything about each verdict; `--dump DIR` writes the inputs and
//! outputs as `.npy` for a look with NumPy ([`super::dump`]).
//!
//! Every file is loaded and checked before anything runs, so a malformed file fails fast (exit 2)
//! with a message naming the file and the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use vkdecode::cases::corpus::load_case;
use vkdecode::cases::run::{run_append_with, run_attention_with};
use vkdecode::cases::{Case, Outcome, RunError};
use vkdecode::gpu::Context;
use vkdecode::implementation::{Judged, judge_case};
use vkdecode::kernels::Mutant;

use super::report::{self, CaseResult};
use super::table::num;
use super::{Finish, Global, dump, emit, note, parse_mutant};

#[derive(Args)]
pub struct ReplayArgs {
    /// Case files (JSON, as in corpus/attention/ and corpus/kv_append/)
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Print one JSON object (device, per-case results, totals) instead of the report
    #[arg(long)]
    json: bool,
    /// Run a deliberately broken kernel, e.g. `attention.gqa_modulo` (cases of the other kernel
    /// run clean)
    #[arg(long, value_name = "NAME", value_parser = parse_mutant)]
    mutant: Option<Mutant>,
    /// Write each case's inputs and outputs as .npy files and a case.json into DIR/<file stem>/
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
    /// Replay on the kernel a SPIR-V manifest describes instead of vkdecode's own (docs/BYOK.md)
    #[arg(long, value_name = "FILE", conflicts_with = "mutant")]
    manifest: Option<PathBuf>,
    /// With --manifest: run only this variant
    #[arg(long, value_name = "NAME", requires = "manifest")]
    variant: Option<String>,
    #[command(flatten)]
    external: super::check::ExternalArgs,
}

/// One replayed file.
struct Replayed {
    file: PathBuf,
    result: CaseResult,
    tolerance: Option<&'static str>,
    dumped: Option<PathBuf>,
}

/// The dump directory of each file: `DIR/<file stem>`; two files with one stem are an error.
fn dump_dirs(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    let mut out = Vec::new();
    for file in files {
        let stem = file
            .file_stem()
            .ok_or_else(|| anyhow::anyhow!("{}: has no file name to name its dump directory after", file.display()))?;
        let target = dir.join(stem);
        if let Some(other) = seen.insert(target.clone(), file) {
            anyhow::bail!(
                "{} and {} would both dump into {}; replay them separately",
                other.display(),
                file.display(),
                target.display()
            );
        }
        out.push(target);
    }
    Ok(out)
}

/// Fails the outcome on validation messages raised while the case ran, exactly as `run_case`.
fn with_validation<T>(ctx: &Context, ran: Result<(Outcome, T), RunError>) -> Result<(Outcome, T), RunError> {
    let (mut outcome, run) = ran?;
    let messages = ctx.take_validation_messages();
    if !messages.is_empty() {
        outcome.passed = false;
        outcome.detail = Some(format!("{} validation message(s):\n{}", messages.len(), messages.join("\n")));
    }
    Ok((outcome, run))
}

pub fn run(global: &Global, args: &ReplayArgs) -> anyhow::Result<Finish> {
    let mut cases = Vec::with_capacity(args.files.len());
    for file in &args.files {
        cases.push(load_case(file)?);
    }
    let dump_dirs = match &args.dump {
        Some(dir) => Some(dump_dirs(dir, &args.files)?),
        None => None,
    };
    let ctx = global.open_context()?;
    let mutant = args.mutant;
    let imp = super::check::implementation(
        args.manifest.as_deref(),
        args.variant.as_deref(),
        &args.external,
        mutant,
        ctx.info(),
    )?;
    let mut replayed = Vec::with_capacity(cases.len());
    for (i, (file, case)) in args.files.iter().zip(&cases).enumerate() {
        let name = file.display().to_string();
        let fatal = |e: RunError| anyhow::anyhow!("{name}: device error: {e}");
        let dump_dir = dump_dirs.as_ref().map(|d| d[i].as_path());
        let (result, dumped) = match (case, dump_dir) {
            (_, None) => {
                let ran = report::judge(name.clone(), case, mutant, || match judge_case(&ctx, &*imp, case, None)? {
                    Judged::Ran(outcome) => Ok((outcome, ())),
                    Judged::Unsupported(reason) => Err(RunError::Unsupported(reason)),
                });
                (ran.map_err(fatal)?.0, None)
            }
            (Case::Attention(c), Some(dir)) => {
                let ran = report::judge(name.clone(), case, mutant, || {
                    imp.capabilities().admits(case).map_err(|u| RunError::Unsupported(u.0))?;
                    with_validation(&ctx, run_attention_with(&ctx, &*imp, c, None))
                });
                let (result, run) = ran.map_err(fatal)?;
                if let Some(run) = &run {
                    dump::attention(dir, file, c, run, &result)?;
                }
                (result, run.map(|_| dir.to_path_buf()))
            }
            (Case::KvAppend(c), Some(dir)) => {
                let ran = report::judge(name.clone(), case, mutant, || {
                    imp.capabilities().admits(case).map_err(|u| RunError::Unsupported(u.0))?;
                    with_validation(&ctx, run_append_with(&ctx, &*imp, c))
                });
                let (result, run) = ran.map_err(fatal)?;
                if let Some(run) = &run {
                    dump::append(dir, file, c, run, &result)?;
                }
                (result, run.map(|_| dir.to_path_buf()))
            }
        };
        let tolerance = result.outcome.as_ref().map(|o| o.tolerance);
        replayed.push(Replayed { file: file.clone(), result, tolerance, dumped });
    }

    let results: Vec<CaseResult> = replayed.iter().map(|r| r.result.clone()).collect();
    let info = ctx.info();
    if args.json {
        let per_case: Vec<_> = replayed
            .iter()
            .map(|r| {
                let mut v = r.result.to_json();
                v["file"] = json!(r.file.display().to_string());
                v["dump"] = json!(r.dumped.as_ref().map(|d| d.display().to_string()));
                v
            })
            .collect();
        let report = json!({
            "device": info,
            "validation": ctx.validation_enabled(),
            "mutant": mutant.map(Mutant::name),
            "results": per_case,
            "totals": report::totals_json(&results),
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
        note(&report::summary_line(&results));
    } else {
        let mut text = report::device_line(info, ctx.validation_enabled(), mutant);
        text.push('\n');
        for r in &replayed {
            text.push('\n');
            text.push_str(&render(r, mutant));
        }
        text.push('\n');
        text.push_str(&report::summary_line(&results));
        text.push('\n');
        emit(&text)?;
    }
    let (_, failed) = report::totals(&results);
    Ok(if failed == 0 { Finish::AllAsExpected } else { Finish::SomeFailed })
}

/// One file's block of the report.
fn render(r: &Replayed, mutant: Option<Mutant>) -> String {
    let res = &r.result;
    let mut rows: Vec<(&str, String)> = vec![
        ("kernel", format!("{} ({})", res.kernel, res.dtype)),
        ("expected", if res.expected == vkdecode::cases::Expect::Fail { "fail" } else { "pass" }.to_string()),
        ("verdict", res.verdict().label().to_string()),
    ];
    match (mutant, res.mutant) {
        (Some(m), None) => {
            rows.push(("mutant", format!("{} does not apply to {}; the clean kernel ran", m.name(), res.kernel)))
        }
        (_, Some(m)) => rows.push(("mutant", m.name())),
        (None, None) => {}
    }
    match &res.outcome {
        Some(o) => {
            rows.push(("max |err|", num(o.max_abs_err)));
            rows.push((
                "NMSE",
                if res.kernel == "kv_append" { "- (bit-exact check)".to_string() } else { num(o.nmse) },
            ));
            rows.push(("err/bound", num(o.worst_ratio)));
            rows.push(("mismatches", report::mismatch_text(res.kernel, o)));
            rows.push(("tolerance", r.tolerance.unwrap_or_default().to_string()));
            rows.push(("detail", o.detail.clone().unwrap_or_else(|| "-".to_string())));
        }
        None => match &res.unsupported {
            Some(why) => rows.push(("unsupported", why.clone())),
            None => rows.push(("error", res.error.clone().unwrap_or_default())),
        },
    }
    rows.push(("ms", format!("{:.1}", res.ms)));
    if let Some(d) = &r.dumped {
        rows.push(("dumped to", d.display().to_string()));
    }
    if res.verdict() == report::Verdict::UnexpectedPass {
        rows.push(("note", "marked `expect: fail` but passed: an unexpected pass counts as a failure".to_string()));
    }
    let mut out = format!("{}\n", r.file.display());
    for (key, value) in rows {
        let mut lines = value.lines();
        out.push_str(&format!("  {key:<11} {}\n", lines.next().unwrap_or("")));
        for line in lines {
            out.push_str(&format!("  {:<11} {line}\n", ""));
        }
    }
    out
}
