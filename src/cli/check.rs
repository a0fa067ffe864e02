//! `vkdecode check`: the conformance suite from the command line. Runs every corpus case and every
//! built-in grid point (the same cases, judged the same way, as `cargo test --test conformance`),
//! with a progress bar, then a table, the failures in detail and `N passed, M failed`.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::sync::Arc;
use vkdecode::cases::Case;
use vkdecode::cases::corpus::{default_corpus_dir, load_corpus};
use vkdecode::cases::grid::grid;

use vkdecode::cases::RunError;
use vkdecode::implementation::{Builtin, Expectations, HarnessMutant, Implementation, Judged, judge_case};
use vkdecode::kernels::Mutant;
use vkdecode::manifest::Manifest;

use super::report::{self, CaseResult, Verdict};
use super::table::{Align, Table, num};
use super::{Finish, Global, emit, note, parse_mutant};

#[derive(Args)]
pub struct CheckArgs {
    /// Corpus directory holding attention/*.json and kv_append/*.json [default: ./corpus, else
    /// the corpus beside the crate's sources]
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
    /// Skip the corpus: run the built-in grid only
    #[arg(long, conflicts_with = "corpus")]
    no_corpus: bool,
    /// Skip the built-in grid: run the corpus only
    #[arg(long)]
    no_grid: bool,
    /// Run only the cases whose name contains SUBSTR (e.g. `gqa`, `grid/kv_append/f16`)
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// Run a deliberately broken kernel, e.g. `attention.gqa_modulo` (only that kernel's cases
    /// run; failures are then what the suite should show)
    #[arg(long, value_name = "NAME", value_parser = parse_mutant)]
    mutant: Option<Mutant>,
    /// Judge the kernel a SPIR-V manifest describes instead of vkdecode's own (docs/BYOK.md);
    /// cases outside its capabilities are counted as unsupported
    #[arg(long, value_name = "FILE", conflicts_with = "mutant")]
    manifest: Option<PathBuf>,
    /// With --manifest: run only this variant (others' cases are unsupported) [default: the
    /// first variant that admits each case]
    #[arg(long, value_name = "NAME", requires = "manifest")]
    variant: Option<String>,
    #[command(flatten)]
    external: ExternalArgs,
    /// Verdicts known in advance: a TOML `[fail]` table of `"case name" = "reason"`; those cases
    /// must fail
    #[arg(long, value_name = "FILE")]
    expect: Option<PathBuf>,
    /// Feed the kernel deliberately wrong inputs (length_off_by_one, swap_kv_heads, drop_sinks)
    /// while the reference keeps the right ones: the check must fail
    #[arg(long, value_name = "NAME", value_parser = parse_harness_mutant)]
    harness_mutant: Option<HarnessMutant>,
    /// Print one JSON object (device, per-case results, totals) instead of the table
    #[arg(long)]
    json: bool,
}

fn parse_harness_mutant(name: &str) -> Result<HarnessMutant, String> {
    HarnessMutant::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
        let known: Vec<_> = HarnessMutant::ALL.iter().map(|m| m.name()).collect();
        format!("unknown harness mutant `{name}`; known: {}", known.join(", "))
    })
}

/// A runtime behind a worker process as the implementation under test (docs/BYOK.md).
#[derive(Args)]
pub struct ExternalArgs {
    /// Judge a runtime behind a worker process (`sh -c CMD`, JSON lines; docs/BYOK.md) instead
    /// of vkdecode's own kernels; needs --caps
    #[arg(long, value_name = "CMD", requires = "caps", conflicts_with_all = ["manifest", "mutant"])]
    external: Option<String>,
    /// With --external: the runtime's capabilities, precision profile and slot contract
    #[arg(long, value_name = "FILE", requires = "external")]
    caps: Option<PathBuf>,
    /// With --external: most time the worker may take for one case
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
}

/// The implementation under test: a manifest's kernel, a worker process, or vkdecode's own
/// (with its mutant).
pub fn implementation(
    manifest: Option<&std::path::Path>,
    variant: Option<&str>,
    external: &ExternalArgs,
    mutant: Option<Mutant>,
    info: &vkdecode::gpu::DeviceInfo,
) -> anyhow::Result<Arc<dyn Implementation>> {
    if let (Some(command), Some(caps)) = (&external.external, &external.caps) {
        let caps = vkdecode::external::CapsFile::load(caps).map_err(anyhow::Error::msg)?;
        let scratch = std::env::temp_dir().join(format!("vkdecode-external-{}", std::process::id()));
        let timeout = std::time::Duration::from_secs(external.timeout);
        return Ok(vkdecode::external::External::new(caps, command, 1, timeout, &scratch)
            .map_err(anyhow::Error::msg)?
            .arc());
    }
    Ok(match manifest {
        None => Arc::new(Builtin::with_mutant(mutant)),
        Some(path) => {
            let m = Arc::new(Manifest::load(path)?);
            m.check_device(info)?;
            Arc::new(m.kernel(variant)?)
        }
    })
}

/// The cases to run, in report order: the corpus (sorted by name), then the grid.
fn select_cases(args: &CheckArgs) -> anyhow::Result<Vec<(String, Case)>> {
    let mut cases = Vec::new();
    if !args.no_corpus {
        let dir = args.corpus.clone().unwrap_or_else(default_corpus_dir);
        cases.extend(load_corpus(&dir)?.into_iter().map(|e| (e.name, e.case)));
    }
    if !args.no_grid {
        cases.extend(grid().into_iter().map(|g| (g.name, g.case)));
    }
    if let Some(m) = args.mutant {
        cases.retain(|(_, c)| report::applicable(c, Some(m)).is_some());
    }
    if let Some(filter) = &args.filter {
        cases.retain(|(name, _)| name.contains(filter.as_str()));
    }
    if cases.is_empty() {
        let why = match (&args.filter, args.no_corpus, args.no_grid) {
            (Some(f), _, _) => format!(
                "no case name contains `{f}` (`--filter` matches a substring of names such as `grid/attention/f16/...`)"
            ),
            (None, _, true) => "the corpus is empty and --no-grid leaves nothing to run".to_string(),
            (None, _, false) => "no case to run".to_string(),
        };
        anyhow::bail!(why);
    }
    Ok(cases)
}

pub(super) fn progress_bar(len: usize, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        return bar;
    }
    bar.set_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {elapsed} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

pub fn run(global: &Global, args: &CheckArgs) -> anyhow::Result<Finish> {
    let cases = select_cases(args)?;
    let expectations = match &args.expect {
        Some(path) => Expectations::load(path).map_err(anyhow::Error::msg)?,
        None => Expectations::default(),
    };
    let ctx = global.open_context()?;
    let imp =
        implementation(args.manifest.as_deref(), args.variant.as_deref(), &args.external, args.mutant, ctx.info())?;
    if let Some(m) = args.mutant
        && !args.json
    {
        note(&format!(
            "note: mutant {}: running only {} cases; the suite should make some of them fail",
            m.name(),
            if m.attention().is_some() { "attention" } else { "kv_append" }
        ));
    }
    let bar = progress_bar(cases.len(), args.json);
    let mut results = Vec::with_capacity(cases.len());
    for (name, case) in cases {
        bar.set_message(name.clone());
        let ran = report::judge(name.clone(), &case, args.mutant, || {
            let judged = match args.harness_mutant {
                Some(h) if !h.applies(&case) => {
                    return Err(RunError::Unsupported(format!("{} does not apply", h.name())));
                }
                h => judge_case(&ctx, &*imp, &case, h)?,
            };
            match judged {
                Judged::Ran(outcome) => Ok((outcome, ())),
                Judged::Unsupported(reason) => Err(RunError::Unsupported(reason)),
            }
        });
        match ran {
            Ok((mut result, _)) => {
                let known = [name.clone(), format!("corpus/{name}")];
                if known.iter().any(|n| expectations.fail.contains_key(n)) {
                    result.expected = vkdecode::cases::Expect::Fail;
                }
                if !result.verdict().as_expected() && result.verdict() != Verdict::Unsupported {
                    bar.println(format!("{}: {}", result.verdict().label(), result.name));
                }
                results.push(result);
            }
            Err(e) => {
                bar.finish_and_clear();
                let (passed, failed) = report::totals(&results);
                anyhow::bail!(
                    "case {name}: device error: {e}\n({} case(s) had run: {passed} as expected, {failed} not)",
                    results.len()
                );
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let info = ctx.info();
    if args.json {
        let report = json!({
            "device": info,
            "validation": ctx.validation_enabled(),
            "mutant": args.mutant.map(Mutant::name),
            "implementation": imp.name(),
            "harness_mutant": args.harness_mutant.map(HarnessMutant::name),
            "results": results.iter().map(CaseResult::to_json).collect::<Vec<_>>(),
            "totals": report::totals_json(&results),
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
        // stdout holds JSON only; the summary line goes to stderr.
        note(&report::summary_line(&results));
    } else {
        let mut text = report::device_line(info, ctx.validation_enabled(), args.mutant);
        text.push_str(&format!("; implementation {}", imp.name()));
        if let Some(h) = args.harness_mutant {
            text.push_str(&format!("; harness mutant {}", h.name()));
        }
        text.push_str("\n\n");
        text.push_str(&render(&results));
        emit(&text)?;
    }
    let (_, failed) = report::totals(&results);
    Ok(if failed == 0 { Finish::AllAsExpected } else { Finish::SomeFailed })
}

/// The table, the failures in detail, and the summary line.
pub(super) fn render(results: &[CaseResult]) -> String {
    let mut table = Table::new(&[
        ("name", Align::Left),
        ("kernel", Align::Left),
        ("dtype", Align::Left),
        ("verdict", Align::Left),
        ("max |err|", Align::Right),
        ("NMSE", Align::Right),
        ("err/bound", Align::Right),
        ("ms", Align::Right),
    ]);
    for r in results {
        let (err, nmse, ratio) = match &r.outcome {
            // Appends are bit-exact: no NMSE is computed.
            Some(o) if r.kernel == "kv_append" => (num(o.max_abs_err), "-".to_string(), num(o.worst_ratio)),
            Some(o) => (num(o.max_abs_err), num(o.nmse), num(o.worst_ratio)),
            None => ("-".to_string(), "-".to_string(), "-".to_string()),
        };
        table.row(vec![
            r.name.clone(),
            r.kernel.to_string(),
            r.dtype.to_string(),
            r.verdict().label().to_string(),
            err,
            nmse,
            ratio,
            format!("{:.1}", r.ms),
        ]);
    }
    let mut out = table.render();
    let failures: Vec<_> = results.iter().filter_map(|r| r.failure_details().map(|d| (r, d))).collect();
    if !failures.is_empty() {
        out.push_str("\nfailures:\n");
        for (r, details) in failures {
            out.push_str(&format!("\n{} [{}]\n", r.name, r.verdict().label()));
            for line in details.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    let unsupported: Vec<_> = results.iter().filter_map(|r| r.unsupported.as_ref().map(|why| (&r.name, why))).collect();
    if !unsupported.is_empty() {
        out.push_str("\nunsupported (outside the implementation's capabilities; not failures):\n");
        for (name, why) in unsupported {
            out.push_str(&format!("    {name}: {why}\n"));
        }
    }
    let expected_fails = results.iter().filter(|r| r.verdict() == Verdict::ExpectedFail).count();
    if expected_fails > 0 {
        out.push_str(&format!("\n({expected_fails} case(s) failed as their `expect: fail` says; counted as passed)\n"));
    }
    out.push('\n');
    out.push_str(&report::summary_line(results));
    out.push('\n');
    out
}
