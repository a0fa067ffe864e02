//! `vkdecode-fuzz`: differential fuzzing campaigns of the vkdecode kernels against the CPU
//! reference. Thin glue over `vkdecode::cases::campaign` (strategies, oracle, shrinking and
//! corpus writing live there): the command line, the progress bar, Ctrl-C, the report and the
//! JSON summary. `--mutants` measures how fast campaigns catch each deliberately broken kernel.
//!
//! Exit status: 0 no failure, 1 failures found (or a mutant survived), 2 usage or device error,
//! 130 interrupted (Ctrl-C, SIGTERM) before the budget ran out with no failure found.

mod mutants;
mod report;

use std::io::{IsTerminal as _, Write as _};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vkdecode::cases::campaign::{
    Campaign, CampaignOptions, Kernels, Shard, ShrinkBudget, Step, UnderTest, case_sequence,
};
use vkdecode::cases::corpus::default_corpus_dir;
use vkdecode::cases::rng::Rng;
use vkdecode::external::{CapsFile, External};
use vkdecode::gpu::ContextOptions;
use vkdecode::kernels::Mutant;
use vkdecode::manifest::Manifest;

const AFTER_HELP: &str = "\
Budget: --duration and --cases each end the campaign (whichever comes first); with neither it
runs until Ctrl-C. Ctrl-C (or SIGTERM) finishes the cases running, then prints the summary; a
second Ctrl-C quits at once.

Reproducibility: case i of shard K/N is global case K + i*N, a pure function of the seed and that
index. Give every shard the same --seed. Without --seed a random one is drawn and printed.

Parallelism: --jobs worker threads run cases; verdicts are counted in case order, so any --jobs
runs the same cases and finds the same failures for a --cases budget (and --fail-fast stops at the
same one). Failures are shrunk on the main thread while the workers go on.

Environment:
  VKDECODE_SHARD=K/N        the shard when --shard is absent (a GitHub Actions matrix)
  JOB_COMPLETION_INDEX=K    the shard index when --shard and VKDECODE_SHARD are absent (set by a
  VKDECODE_SHARDS=N         Kubernetes Indexed Job), with the shard count from VKDECODE_SHARDS
  VKDECODE_DEVICE=SEL       device (index or name substring; --device overrides it)
  VKDECODE_VALIDATION=1     Khronos validation layer on (same as --validation)

Failures are shrunk and written to the corpus as <DIR>/<kernel>/fuzz-<hash>.json, each with a
one-line reproducer (`vkdecode replay FILE`). See docs/FUZZING.md.

Exit status: 0 no failure, 1 failures found (--mutants: a mutant survived), 2 usage error or
device error, 130 interrupted with no failure found.";

/// Differential fuzzing of the vkdecode kernels against the CPU reference.
#[derive(Parser, Debug)]
#[command(name = "vkdecode-fuzz", version, after_help = AFTER_HELP)]
struct Cli {
    /// Run this long: a number with a unit s, m or h, or several (90s, 30m, 8h, 1h30m); a bare
    /// number is seconds
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Run this many cases (of this shard)
    #[arg(long, value_name = "N")]
    cases: Option<u64>,
    /// Campaign seed: the same seed and shard run the same cases [default: random, printed]
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Run shard K of N (0-based): the cases whose global index is K modulo N [default: from
    /// VKDECODE_SHARD or JOB_COMPLETION_INDEX + VKDECODE_SHARDS, else 0/1]
    #[arg(long, value_name = "K/N", value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Worker threads that draw, run and check cases [default: the number of CPUs]
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<NonZeroUsize>,
    /// Kernels to fuzz, comma-separated: attention, kv_append (or all)
    #[arg(long, value_name = "LIST", default_value = "attention,kv_append", value_parser = Kernels::parse)]
    kernels: Kernels,
    /// Device: an index from `vkdecode devices` or a name substring (overrides VKDECODE_DEVICE)
    #[arg(long, value_name = "SEL")]
    device: Option<String>,
    /// Enable the Khronos validation layer with synchronization validation (same as
    /// VKDECODE_VALIDATION=1); any message fails the case
    #[arg(long)]
    validation: bool,
    /// Where failures are written, as <DIR>/<kernel>/fuzz-<hash>.json [default: corpus/]
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
    /// Stop at the first failure (after shrinking and writing it)
    #[arg(long)]
    fail_fast: bool,
    /// Also write the summary as JSON to FILE (atomically: a temporary file, then a rename)
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run against a deliberately broken kernel, e.g. attention.gqa_modulo (cases of the other
    /// kernel run clean)
    #[arg(long, value_name = "NAME", value_parser = Mutant::parse, conflicts_with = "mutants")]
    mutant: Option<Mutant>,
    /// Mutation score: a short campaign against every mutant; reports the cases and time to the
    /// first detection of each, and fails if any survives. Writes no corpus files
    #[arg(long, conflicts_with_all = ["corpus", "fail_fast", "duration", "cases"])]
    mutants: bool,
    /// --mutants: most cases per mutant
    #[arg(long, value_name = "N", default_value_t = 400)]
    mutant_cases: u64,
    /// --mutants: most time per mutant
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    mutant_time: Duration,
    /// Most time to shrink one failure (the smallest failing case found by then is written)
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    shrink_time: Duration,
    /// Most shrink steps (device runs) for one failure
    #[arg(long, value_name = "N", default_value_t = 1000)]
    shrink_steps: u32,
    /// Fuzz the kernel a SPIR-V manifest describes (docs/BYOK.md) instead of vkdecode's own; cases
    /// are drawn inside its declared capabilities
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mutant", "mutants"])]
    manifest: Option<PathBuf>,
    /// With --manifest: run only this variant [default: the first that admits each case]
    #[arg(long, value_name = "NAME", requires = "manifest")]
    variant: Option<String>,
    /// Fuzz a runtime behind a worker process (docs/BYOK.md, "The worker protocol"): `sh -c CMD`
    /// runs once per job, kept warm, fed batches of case folders; needs --caps
    #[arg(long, value_name = "CMD", requires = "caps", conflicts_with_all = ["mutant", "mutants", "manifest"])]
    external: Option<String>,
    /// With --external: the runtime's capabilities, precision profile and slot contract (a
    /// manifest's top: name, [capabilities], [precision], [slots])
    #[arg(long, value_name = "FILE", requires = "external")]
    caps: Option<PathBuf>,
    /// With --external: cases per worker request (shrinking sends one at a time)
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// With --external: most time a worker may take for one batch; past it the worker is killed
    /// and restarted, and the batch's cases fail
    #[arg(long, value_name = "DUR", default_value = "120s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the shard's first cases (--cases, default 20) as JSON lines instead of running them
    #[arg(long, conflicts_with_all = ["mutants", "duration"])]
    print_cases: bool,
}

/// Parses `90`, `90s`, `1.5m`, `8h`, `1h30m`: numbers with units s, m, h; a bare number is
/// seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; write e.g. 90s, 30m or 8h".into());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().map_err(|_| format!("`{text}`: `{number}` is not a number"))?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "" if tail.is_empty() && rest.len() == text.len() => 1.0,
            "" => return Err(format!("`{text}`: `{number}` needs a unit (s, m or h)")),
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("`{text}`: unknown unit `{other}` (use s, m or h)")),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("`{text}`: {e}"))
}

/// Options from the environment, overridden by the command line.
fn context_options(cli: &Cli) -> ContextOptions {
    let mut options = ContextOptions::from_env();
    if let Some(device) = &cli.device {
        options.device = Some(device.clone());
    }
    options.validation |= cli.validation;
    options
}

/// How often the main thread looks at the clock and the stop flag while it waits for a case.
const TICK: Duration = Duration::from_millis(100);

/// --jobs, else one per CPU.
fn jobs(cli: &Cli) -> usize {
    cli.jobs.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get)
}

/// A seed from the clock and the process id (printed, so the campaign can be repeated).
fn random_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32)).next_u64() >> 1
}

/// The stop flag: set by the first Ctrl-C (or SIGTERM/SIGHUP); a second one exits at once.
fn install_stop() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        let _ = writeln!(std::io::stderr(), "\nvkdecode-fuzz: stopping after the running cases (again to quit now)");
    });
    if let Err(e) = installed {
        note(&format!("warning: no Ctrl-C handler ({e}); an interrupt will end the campaign without a summary"));
    }
    stop
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn progress(len: Option<u64>, template: &str) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Writes a report to stdout; a closed pipe is not an error.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Writes `text` to `path` atomically: a temporary file beside it, then a rename.
fn write_atomic(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "summary.json".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("writing {}: {e}", path.display());
    }
    Ok(())
}

/// Why a campaign ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Cases,
    Duration,
    FailFast,
    Interrupted,
    DeviceError,
    Exhausted,
}

impl Ended {
    fn name(self) -> &'static str {
        match self {
            Ended::Cases => "case budget",
            Ended::Duration => "duration",
            Ended::FailFast => "fail-fast",
            Ended::Interrupted => "interrupted",
            Ended::DeviceError => "device error",
            Ended::Exhausted => "sequence exhausted",
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let shard = match cli.shard.map(Ok).unwrap_or_else(|| Shard::from_env().map(|s| s.unwrap_or(Shard::WHOLE))) {
        Ok(shard) => shard,
        Err(e) => {
            note(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    let seed = cli.seed.unwrap_or_else(random_seed);
    if cli.print_cases {
        return print_cases(seed, shard, &cli);
    }
    let stop = install_stop();
    if cli.mutants {
        return mutants::run(&cli, seed, &stop);
    }
    campaign(&cli, seed, shard, &stop)
}

fn print_cases(seed: u64, shard: Shard, cli: &Cli) -> ExitCode {
    match case_sequence(seed, shard, cli.kernels, cli.cases.unwrap_or(20)) {
        Ok(cases) => {
            let mut text = String::new();
            for (global_index, fc) in cases {
                let line = serde_json::json!({ "global_index": global_index, "origin": fc.origin, "case": fc.case });
                text.push_str(&line.to_string());
                text.push('\n');
            }
            emit(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            note(&format!("error: {e}"));
            ExitCode::from(2)
        }
    }
}

fn campaign(cli: &Cli, seed: u64, shard: Shard, stop: &AtomicBool) -> ExitCode {
    // External workers' batch folders; each is removed once judged, the folder at the end.
    let scratch = std::env::temp_dir().join(format!("vkdecode-fuzz-{}", std::process::id()));
    let code = campaign_with(cli, seed, shard, stop, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    code
}

/// The kernels the campaign draws: those asked for that the implementation under test has.
fn kernels_run(campaign: &Campaign) -> Vec<&'static str> {
    let options = campaign.options();
    let mut names = options.kernels.names();
    if let Some(UnderTest(imp)) = &options.implementation {
        let has = &imp.capabilities().kernels;
        names.retain(|n| has.iter().any(|k| k.name() == *n));
    }
    names
}

fn campaign_with(cli: &Cli, seed: u64, shard: Shard, stop: &AtomicBool, scratch: &std::path::Path) -> ExitCode {
    let corpus = cli.corpus.clone().unwrap_or_else(default_corpus_dir);
    let manifest = match cli.manifest.as_deref().map(Manifest::load).transpose() {
        Ok(m) => m.map(Arc::new),
        Err(e) => {
            note(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    let implementation = match (&manifest, &cli.external) {
        (None, Some(command)) => {
            let caps = cli.caps.as_deref().map(CapsFile::load).expect("clap requires --caps with --external");
            let external = caps.and_then(|caps| External::new(caps, command, cli.batch as usize, cli.timeout, scratch));
            match external {
                Ok(e) => Some(UnderTest(e.arc())),
                Err(e) => {
                    note(&format!("error: {e}"));
                    return ExitCode::from(2);
                }
            }
        }
        (None, None) => None,
        (Some(m), _) => match m.kernel(cli.variant.as_deref()) {
            Ok(k) => Some(UnderTest(Arc::new(k))),
            Err(e) => {
                note(&format!("error: {e}"));
                return ExitCode::from(2);
            }
        },
    };
    let options = CampaignOptions {
        seed,
        shard,
        kernels: cli.kernels,
        mutant: cli.mutant,
        corpus: Some(corpus.clone()),
        shrink: ShrinkBudget { max_steps: cli.shrink_steps, max_time: cli.shrink_time },
        context: context_options(cli),
        jobs: jobs(cli),
        max_cases: cli.cases,
        fail_fast: cli.fail_fast,
        implementation,
    };
    let mut campaign = match Campaign::new(options) {
        Ok(c) => c,
        Err(e) => {
            note(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    if let Some(Err(e)) = manifest.as_ref().map(|m| m.check_device(campaign.device())) {
        note(&format!("error: {e}"));
        return ExitCode::from(2);
    }
    let budget = match (cli.duration, cli.cases) {
        (None, None) => "until interrupted".to_string(),
        (d, n) => [d.map(|d| format!("{:.0} s", d.as_secs_f64())), n.map(|n| format!("{n} cases"))]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" or "),
    };
    note(&format!(
        "vkdecode-fuzz: seed {seed}, shard {shard}, kernels {}, {budget}, {} jobs, device {}{}{}; failures go to {}",
        kernels_run(&campaign).join(","),
        campaign.options().jobs,
        campaign.device().name,
        if campaign.context().validation_enabled() { ", validation on" } else { "" },
        cli.mutant.map(|m| format!(", mutant {}", m.name())).unwrap_or_default(),
        corpus.display(),
    ));
    let template = if cli.cases.is_some() {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} cases, {per_sec}, {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {pos} cases, {per_sec}, {msg}"
    };
    let bar = progress(cli.cases, template);
    let start = Instant::now();
    let mut device_error = None;
    // Set by Ctrl-C or the duration: the workers take no new case, and the loop counts (and
    // records) the cases they were running, as a one-thread run finishes its current case.
    let mut ending = None;
    let ended = loop {
        if ending.is_none() {
            if stop.load(Ordering::Relaxed) {
                ending = Some(Ended::Interrupted);
            } else if cli.duration.is_some_and(|d| start.elapsed() >= d) {
                ending = Some(Ended::Duration);
            }
            if ending.is_some() {
                bar.set_message("finishing the running cases…");
                campaign.halt();
            }
        }
        if cli.cases.is_some_and(|n| campaign.cases_run() >= n) {
            break ending.unwrap_or(Ended::Cases);
        }
        let step = match campaign.next_step(TICK) {
            Ok(Some(step)) => step,
            Ok(None) => continue,
            Err(e) => {
                device_error = Some(e.to_string());
                break Ended::DeviceError;
            }
        };
        bar.inc(1);
        let failure = match step {
            Step::Passed | Step::Skipped(_) => None,
            Step::Failed(failure) => Some(failure),
            Step::Exhausted => break ending.unwrap_or(Ended::Exhausted),
        };
        if let Some(failure) = failure {
            let headline = format!(
                "FAIL {} case {} (global {}, {}): {}",
                failure.case.case.kernel(),
                failure.index,
                failure.global_index,
                failure.case.origin,
                failure.verdict.summary()
            );
            bar.suspend(|| emit(&format!("{headline}\n")));
            bar.set_message("shrinking a failure…");
            match campaign.record(failure, stop) {
                Ok(finding) => {
                    let text = report::finding_lines(finding);
                    bar.suspend(|| emit(&text));
                }
                Err(e) => {
                    device_error = Some(e.to_string());
                    break Ended::DeviceError;
                }
            }
            if cli.fail_fast {
                break Ended::FailFast;
            }
        }
        if ending.is_none() {
            let s = campaign.stats();
            bar.set_message(format!("{} failed, {} skipped", s.failed, s.skipped));
        }
    };
    // After fail-fast or an error: waits for the cases still running and drops their results.
    campaign.finish();
    bar.finish_and_clear();
    let elapsed = start.elapsed();
    if let Some(e) = &device_error {
        note(&format!("error: {e}"));
    }
    let summary = report::Summary { cli, campaign: &campaign, ended: ended.name(), elapsed, corpus: &corpus };
    emit(&summary.table());
    if let Some(path) = &cli.json
        && let Err(e) = write_atomic(path, &summary.json())
    {
        note(&format!("error: {e}"));
        return ExitCode::from(2);
    }
    if device_error.is_some() {
        ExitCode::from(2)
    } else if campaign.stats().failed > 0 {
        ExitCode::from(1)
    } else if ended == Ended::Interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_s_m_h_and_bare_seconds() {
        let secs = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(secs("90"), Ok(90.0));
        assert_eq!(secs("90s"), Ok(90.0));
        assert_eq!(secs("30m"), Ok(1800.0));
        assert_eq!(secs("8h"), Ok(28800.0));
        assert_eq!(secs("1.5m"), Ok(90.0));
        assert_eq!(secs("1h30m"), Ok(5400.0));
        assert_eq!(secs(" 2m "), Ok(120.0));
    }

    #[test]
    fn malformed_durations_are_rejected() {
        for bad in ["", "h", "5d", "1x", "ten", "5 s", "1h30"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn mutants_mode_refuses_a_corpus_and_a_single_mutant() {
        assert!(Cli::try_parse_from(["vkdecode-fuzz", "--mutants", "--corpus", "x"]).is_err());
        assert!(Cli::try_parse_from(["vkdecode-fuzz", "--mutants", "--mutant", "attention.gqa_modulo"]).is_err());
    }

    #[test]
    fn jobs_are_a_positive_count() {
        assert!(Cli::try_parse_from(["vkdecode-fuzz", "--jobs", "0"]).is_err());
        let cli = Cli::try_parse_from(["vkdecode-fuzz", "-j", "3"]).ok();
        assert_eq!(cli.map(|c| jobs(&c)), Some(3));
        let cli = Cli::try_parse_from(["vkdecode-fuzz"]).ok();
        assert!(cli.is_some_and(|c| jobs(&c) >= 1));
    }

    #[test]
    fn unknown_mutants_and_kernels_are_usage_errors() {
        let err = Cli::try_parse_from(["vkdecode-fuzz", "--mutant", "attention.nope"]).err().map(|e| e.exit_code());
        assert_eq!(err, Some(2));
        assert!(Cli::try_parse_from(["vkdecode-fuzz", "--kernels", "attention,softmax"]).is_err());
    }
}
