//! `vkdecode export`: cases as folders of `.npy` inputs for a runtime in another language, and
//! `vkdecode judge`: the verdict on what it wrote (docs/BYOK.md, "Kernels behind another
//! language").

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::json;
use vkdecode::cases::Case;
use vkdecode::cases::campaign::{Kernels, Shard, UnderTest, campaign_cases};
use vkdecode::cases::corpus::{default_corpus_dir, load_corpus, write_case};
use vkdecode::cases::grid::grid;
use vkdecode::external::judge::{CaseVerdict, case_dirs, judge_dir};
use vkdecode::external::{CapsFile, Declared, export::export};
use vkdecode::implementation::Capabilities;

use super::check::render;
use super::report::{self, CaseResult, dtype_of};
use super::{Finish, emit, note};

#[derive(Args)]
pub struct ExportArgs {
    /// Folder to write (created; must be empty or absent): one folder per case and index.json
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// The implementation's capabilities, precision profile and slot contract (a manifest's top:
    /// name, [capabilities], [precision], [slots]); cases outside them are left out
    /// [default: everything, strict f32, unread slots never read]
    #[arg(long, value_name = "FILE")]
    caps: Option<PathBuf>,
    /// Export the corpus (from DIR, else ./corpus or the one beside the sources)
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    corpus: Option<PathBuf>,
    /// Export the built-in grid
    #[arg(long)]
    grid: bool,
    /// Export N cases drawn by the fuzzer's generators inside the capabilities
    #[arg(long, value_name = "N")]
    draw: Option<u64>,
    /// Seed of --draw
    #[arg(long, default_value_t = 1, requires = "draw")]
    seed: u64,
    /// Only cases whose name contains SUBSTR
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
}

/// The caps file, or the defaults (everything vkdecode's kernels admit, judged strictly).
fn load_caps(path: Option<&Path>) -> anyhow::Result<CapsFile> {
    match path {
        Some(p) => CapsFile::load(p).map_err(anyhow::Error::msg),
        None => Ok(CapsFile {
            path: PathBuf::new(),
            name: "any".into(),
            description: String::new(),
            capabilities: Capabilities::default(),
        }),
    }
}

fn select(args: &ExportArgs, caps: &CapsFile) -> anyhow::Result<Vec<(String, Case)>> {
    let all = args.corpus.is_none() && !args.grid && args.draw.is_none();
    let mut cases = Vec::new();
    if all || args.corpus.is_some() {
        let dir = match args.corpus.as_deref() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => default_corpus_dir(),
        };
        cases.extend(load_corpus(&dir)?.into_iter().map(|e| (format!("corpus/{}", e.name), e.case)));
    }
    if all || args.grid {
        cases.extend(grid().into_iter().map(|g| (g.name, g.case)));
    }
    if let Some(n) = args.draw {
        let under_test = UnderTest(Declared::arc(caps.clone()));
        let drawn = campaign_cases(args.seed, Shard::WHOLE, Kernels::ALL, Some(&under_test), n)?;
        cases.extend(drawn.into_iter().map(|(i, fc)| (format!("draw/{}/{i}", args.seed), fc.case)));
    }
    if let Some(f) = &args.filter {
        cases.retain(|(name, _)| name.contains(f.as_str()));
    }
    if cases.is_empty() {
        anyhow::bail!("no case to export");
    }
    Ok(cases)
}

pub fn run_export(args: &ExportArgs) -> anyhow::Result<Finish> {
    let caps = load_caps(args.caps.as_deref())?;
    let cases = select(args, &caps)?;
    let bar = super::check::progress_bar(cases.len(), false);
    let done = export(&args.dir, &cases, &caps.capabilities, |name| {
        bar.set_message(name.to_string());
        bar.inc(1);
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    emit(&format!(
        "exported {} case(s) to {} for `{}` ({} outside its capabilities, not exported)\n",
        done.written.len(),
        args.dir.display(),
        caps.name,
        done.unsupported.len()
    ))?;
    Ok(Finish::AllAsExpected)
}

#[derive(Args)]
pub struct JudgeArgs {
    /// Export folders (with index.json) or single case folders (with case.json)
    #[arg(value_name = "DIR", required = true)]
    dirs: Vec<PathBuf>,
    /// Write each failing case's vkdecode case as DIR/<kernel>/<name>.json (never overwrites)
    #[arg(long, value_name = "DIR")]
    save_failures: Option<PathBuf>,
    /// Print one JSON object (per-case results, totals) instead of the table
    #[arg(long)]
    json: bool,
}

fn result_of(judged: &vkdecode::external::judge::JudgedCase, ms: f64) -> CaseResult {
    let mut r = CaseResult {
        name: judged.meta.name.clone(),
        kernel: judged.case.kernel(),
        dtype: dtype_of(&judged.case),
        expected: judged.case.expect(),
        mutant: None,
        outcome: None,
        error: None,
        unsupported: None,
        ms,
    };
    match &judged.verdict {
        CaseVerdict::Judged(o) => r.outcome = Some(o.clone()),
        CaseVerdict::Skipped(reason) => r.unsupported = Some(format!("skipped by the runner: {reason}")),
        CaseVerdict::Error(message) => r.error = Some(message.clone()),
    }
    r
}

pub fn run_judge(args: &JudgeArgs) -> anyhow::Result<Finish> {
    let mut dirs = Vec::new();
    for d in &args.dirs {
        dirs.extend(case_dirs(d).map_err(anyhow::Error::msg)?);
    }
    let bar = super::check::progress_bar(dirs.len(), args.json);
    let mut results = Vec::with_capacity(dirs.len());
    let mut saved = Vec::new();
    for dir in &dirs {
        bar.set_message(dir.display().to_string());
        let start = Instant::now();
        let judged = judge_dir(dir).map_err(anyhow::Error::msg)?;
        let result = result_of(&judged, start.elapsed().as_secs_f64() * 1e3);
        if let (Some(out), report::Verdict::Fail | report::Verdict::Error) = (&args.save_failures, result.verdict()) {
            let name = vkdecode::external::export::folder_name(&judged.meta.name);
            saved.push(write_case(out, &name, &judged.case)?);
        }
        results.push(result);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        let report = json!({
            "results": results.iter().map(CaseResult::to_json).collect::<Vec<_>>(),
            "totals": report::totals_json(&results),
            "saved": saved,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
        note(&report::summary_line(&results));
    } else {
        emit(&render(&results))?;
        for path in &saved {
            note(&format!("wrote {}", path.display()));
        }
    }
    let (_, failed) = report::totals(&results);
    Ok(if failed == 0 { Finish::AllAsExpected } else { Finish::SomeFailed })
}
