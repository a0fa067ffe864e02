//! The campaign's promises, checked through the library and the `vkdecode-fuzz` binary: the case
//! sequence is a function of the seed and shard alone, shards are disjoint and together the whole
//! sequence, the environment picks the shard, the mix reaches every trigger of ANCHORS.md, a
//! planted bug ends in a shrunk corpus file that replays (failing with the bug, passing without),
//! a failure found again is a duplicate, Ctrl-C ends a campaign with its summary, and the number
//! of worker threads changes neither the cases run nor their verdicts.
//!
//! Budget: a few seconds on two cores with lavapipe (the device runs use kv_append or a mutant
//! caught within a few cases). The binary inherits `VKDECODE_DEVICE` and `VKDECODE_VALIDATION`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vkdecode::cases::campaign::{
    Campaign, CampaignOptions, FuzzCase, Kernels, LONG_CACHE_MAX, Shard, ShrinkBudget, Step, case_sequence, draw,
    fuzz_case, runner_config,
};
use vkdecode::cases::corpus::load_case;
use vkdecode::cases::model::Dist;
use vkdecode::cases::strategy::attention_work;
use vkdecode::cases::{AttentionCase, Case, Poison, run_case};
use vkdecode::gpu::{Context, ContextOptions};
use vkdecode::kernels::{Dtype, Mutant};

fn fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vkdecode-fuzz"));
    cmd.args(args).env_remove("VKDECODE_SHARD").env_remove("JOB_COMPLETION_INDEX").env_remove("VKDECODE_SHARDS");
    cmd
}

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run vkdecode-fuzz: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("vkdecode-fuzz-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    files
}

fn summary(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_same_seed_and_shard_print_the_same_cases() {
    let cases = |seed: &str, shard: &str| {
        let out = run(&mut fuzz(&["--print-cases", "--cases", "20", "--seed", seed, "--shard", shard]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let first = cases("42", "1/3");
    assert_eq!(first.lines().count(), 20);
    assert_eq!(first, cases("42", "1/3"), "two runs of one seed and shard printed different cases");
    assert_ne!(first, cases("43", "1/3"), "another seed printed the same cases");
    assert_ne!(first, cases("42", "2/3"), "another shard printed the same cases");
}

#[test]
fn a_case_does_not_depend_on_the_cases_before_it() {
    let sequence = case_sequence(5, Shard::WHOLE, Kernels::ALL, 30).unwrap_or_else(|e| panic!("{e}"));
    let strategy = fuzz_case(Kernels::ALL);
    let config = runner_config();
    // Drawn alone and backwards: the same cases.
    for (global_index, case) in sequence.iter().rev() {
        let alone = draw(&strategy, &config, 5, *global_index).unwrap_or_else(|e| panic!("{e}")).current();
        assert_eq!(&alone, case, "case {global_index} differs when drawn alone");
    }
}

#[test]
fn shards_are_disjoint_and_together_the_whole_sequence() {
    let whole = case_sequence(9, Shard::WHOLE, Kernels::ALL, 30).unwrap_or_else(|e| panic!("{e}"));
    let mut sharded: Vec<(u64, FuzzCase)> = Vec::new();
    let mut seen = BTreeSet::new();
    for k in 0..3 {
        let shard = Shard::new(k, 3).unwrap_or_else(|e| panic!("{e}"));
        for (g, case) in case_sequence(9, shard, Kernels::ALL, 10).unwrap_or_else(|e| panic!("{e}")) {
            assert_eq!(g % 3, k, "shard {shard} ran global case {g}");
            assert!(seen.insert(g), "global case {g} is in two shards");
            sharded.push((g, case));
        }
    }
    sharded.sort_by_key(|(g, _)| *g);
    assert_eq!(sharded, whole);
}

#[test]
fn the_environment_picks_the_shard_like_the_flag() {
    let print = |cmd: &mut Command| {
        let out = run(cmd);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let flag = print(&mut fuzz(&["--print-cases", "--cases", "5", "--seed", "1", "--shard", "2/4"]));
    assert_eq!(flag.0, Some(0), "{}", flag.2);
    let matrix = print(fuzz(&["--print-cases", "--cases", "5", "--seed", "1"]).env("VKDECODE_SHARD", "2/4"));
    assert_eq!(matrix.1, flag.1, "VKDECODE_SHARD=2/4 ran other cases than --shard 2/4");
    let job = print(
        fuzz(&["--print-cases", "--cases", "5", "--seed", "1"])
            .env("JOB_COMPLETION_INDEX", "2")
            .env("VKDECODE_SHARDS", "4"),
    );
    assert_eq!(job.1, flag.1, "JOB_COMPLETION_INDEX=2 VKDECODE_SHARDS=4 ran other cases than --shard 2/4");
    let unsized_job = print(fuzz(&["--print-cases", "--seed", "1"]).env("JOB_COMPLETION_INDEX", "2"));
    assert_eq!(unsized_job.0, Some(2));
    assert!(unsized_job.2.contains("VKDECODE_SHARDS"), "{}", unsized_job.2);
}

#[test]
fn the_mix_reaches_every_trigger() {
    let cases = case_sequence(1, Shard::WHOLE, Kernels::ALL, 4000).unwrap_or_else(|e| panic!("{e}"));
    let attention: Vec<&AttentionCase> = cases
        .iter()
        .filter_map(|(_, fc)| match &fc.case {
            Case::Attention(c) => Some(c),
            Case::KvAppend(_) => None,
        })
        .collect();
    let any = |f: &dyn Fn(&AttentionCase) -> bool| attention.iter().any(|c| f(c));
    let mut missing = Vec::new();
    let mut need = |what: String, found: bool| {
        if !found {
            missing.push(what);
        }
    };
    for d in (8..=256).step_by(8) {
        need(format!("head_dim {d}"), any(&|c| c.head_dim == d));
    }
    for r in [1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 31, 32] {
        need(format!("GQA ratio {r}"), any(&|c| c.n_q_heads / c.n_kv_heads == r));
    }
    for len in [1, 63, 64, 65, 127, 128, 129, 97, 131, 257] {
        need(format!("length {len}"), any(&|c| c.seq_lens.contains(&len)));
    }
    for dtype in Dtype::ALL.into_iter().chain([Dtype::Q8_0]) {
        need(format!("{dtype}"), any(&|c| c.dtype == dtype));
    }
    for poison in [Poison::Nan, Poison::Inf, Poison::Garbage] {
        need(format!("{poison:?} poison"), any(&|c| c.data.poison == poison));
    }
    need("a position past 32768".into(), any(&|c| c.seq_lens.iter().any(|&l| l > 32768)));
    need("a capacity near the long-cache maximum".into(), any(&|c| c.capacity > LONG_CACHE_MAX - 8000));
    need("a row that sees one position".into(), any(&|c| c.seq_lens.iter().any(|l| (1..=c.n_queries).contains(l))));
    need("a fully masked row".into(), any(&|c| c.seq_lens.iter().any(|&l| l < c.n_queries)));
    need("split_chunk 64".into(), any(&|c| c.split_chunk == Some(64)));
    need("a fused case".into(), any(&|c| c.fused));
    need("a window".into(), any(&|c| c.window.is_some()));
    need("a softcap".into(), any(&|c| c.softcap.is_some()));
    need("sinks".into(), any(&|c| c.sinks.is_some()));
    need("a zero scale".into(), any(&|c| c.scale == Some(0.0)));
    need("a dominant position of gain 64".into(), any(&|c| c.data.peak.is_some_and(|p| p.gain == 64.0)));
    let std = |d: Dist| match d {
        Dist::Normal { std, .. } => std,
        Dist::Uniform { .. } => 1.0,
    };
    need("keys of std 1024".into(), any(&|c| std(c.data.k) >= 1024.0));
    need("denormal values".into(), any(&|c| std(c.data.v) < 1e-38));
    need("uniform values".into(), any(&|c| matches!(c.data.v, Dist::Uniform { .. })));
    need("a pad of 64".into(), any(&|c| c.pad == 64));
    let long = attention.iter().filter(|c| c.capacity >= 2000).count();
    need(format!("long caches rare (1 in 25..100 attention cases, got {long})"), (40..160).contains(&long));
    let appends = cases.iter().filter(|(_, fc)| matches!(fc.case, Case::KvAppend(_))).count();
    need(format!("a quarter appends (got {appends} of 4000)"), (800..1200).contains(&appends));
    need(
        "an append across the 32K edge".into(),
        cases.iter().any(|(_, fc)| match &fc.case {
            Case::KvAppend(c) => c.starts.iter().any(|&s| s < 32768 && s + c.n_new > 32768),
            Case::Attention(_) => false,
        }),
    );
    assert!(missing.is_empty(), "the campaign mix never produced: {}", missing.join("; "));
}

#[test]
fn a_planted_bug_ends_in_a_shrunk_corpus_case_that_replays() {
    let dir = TempDir::new("planted");
    let corpus = dir.arg("corpus");
    let args = [
        "--mutant",
        "attention.gqa_modulo",
        "--kernels",
        "attention",
        "--cases",
        "200",
        "--seed",
        "7",
        "--fail-fast",
        "--corpus",
        &corpus,
        // Far beyond the few seconds shrinking takes: the test needs shrinking to end by itself
        // (not by the clock) so that the second campaign reaches the same case, even on a
        // loaded CI machine.
        "--shrink-time",
        "600s",
    ];
    let json = dir.arg("summary.json");
    let out = run(fuzz(&args).args(["--json", &json]));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a found failure exits 1\n{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("ended by done"), "shrinking was cut short:\n{stdout}");
    let files = json_files(&dir.path().join("corpus/attention"));
    assert_eq!(files.len(), 1, "one corpus file: {files:?}");
    let file = &files[0];
    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    assert!(name.starts_with("fuzz-") && name.len() == 21, "{name}");
    let reproducer = format!("vkdecode replay {} --mutant attention.gqa_modulo", file.display());
    assert!(stdout.contains(&reproducer), "no reproducer line `{reproducer}` in:\n{stdout}");

    let case = load_case(file).unwrap_or_else(|e| panic!("{e}"));
    let Case::Attention(c) = &case else { panic!("not an attention case: {case:?}") };
    // The bug needs two kv heads with two query heads each; shrinking gets close to that.
    assert!(c.n_kv_heads >= 2 && c.n_q_heads / c.n_kv_heads >= 2, "{c:?}");
    assert!(attention_work(c) <= 4096, "not shrunk: work {} in {c:?}", attention_work(c));

    let ctx = std::sync::Arc::new(Context::new(&ContextOptions::from_env()).unwrap_or_else(|e| panic!("{e}")));
    let mutant = Mutant::parse("attention.gqa_modulo").unwrap_or_else(|e| panic!("{e}"));
    let broken = run_case(&ctx, &case, Some(mutant)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!broken.passed, "the written case passes with the mutant");
    let clean = run_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(clean.passed, "the written case fails without the mutant: {:?}", clean.detail);

    let s = summary(Path::new(&json));
    assert_eq!((s["failed"].as_u64(), s["written"].as_u64()), (Some(1), Some(1)), "{s}");
    assert_eq!(s["ended_by"], "fail-fast");
    assert_eq!(s["findings"][0]["reproducer"], reproducer.as_str());

    // The same campaign again finds the same shrunk case: a duplicate, not a second file.
    let again = run(&mut fuzz(&args));
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stdout).contains("duplicate of"), "{}", text(&again.stdout));
    assert_eq!(json_files(&dir.path().join("corpus/attention")).len(), 1);
}

#[test]
fn a_clean_campaign_exits_0_with_a_summary_of_what_it_covered() {
    let dir = TempDir::new("clean");
    let json = dir.arg("summary.json");
    let corpus = dir.arg("corpus");
    let out = run(&mut fuzz(&[
        "--kernels",
        "kv_append",
        "--cases",
        "40",
        "--seed",
        "3",
        "--corpus",
        &corpus,
        "--json",
        &json,
    ]));
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let s = summary(Path::new(&json));
    assert_eq!((s["cases"].as_u64(), s["failed"].as_u64()), (Some(40), Some(0)), "{s}");
    assert_eq!(s["ended_by"], "case budget");
    // The three float types and q8_0.
    assert!(s["buckets"]["kv_append.dtype"].as_object().is_some_and(|b| b.len() == 4), "{}", s["buckets"]);
    assert!(s["time_split_s"]["append"].as_f64().is_some_and(|t| t > 0.0), "{}", s["time_split_s"]);
    assert!(text(&out.stdout).contains("time per stage"));
    assert!(!dir.path().join("corpus").exists(), "a clean campaign wrote into the corpus");
}

#[test]
fn an_interrupt_ends_the_campaign_with_its_summary() {
    let dir = TempDir::new("interrupt");
    let json = dir.arg("summary.json");
    let corpus = dir.arg("corpus");
    let mut child = fuzz(&["--kernels", "kv_append", "--seed", "4", "--corpus", &corpus, "--json", &json])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // The header goes to stderr once the Ctrl-C handler is in place and the device is open.
    let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.starts_with("vkdecode-fuzz: seed") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    let start = Instant::now();
    let started = rx.recv_timeout(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "cannot send SIGINT");
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = reader.join().unwrap_or_default();
    assert!(started.is_ok(), "no header within 60 s:\n{stderr}");
    assert!(start.elapsed() < Duration::from_secs(90), "the campaign did not stop");
    assert_eq!(out.status.code(), Some(130), "{}\n{stderr}", text(&out.stdout));
    assert!(text(&out.stdout).contains("ended by interrupted"), "{}", text(&out.stdout));
    let s = summary(Path::new(&json));
    assert_eq!(s["ended_by"], "interrupted");
    assert!(s["cases"].as_u64().is_some_and(|n| n > 0), "{s}");
}

/// What a campaign with `jobs` threads saw, case by case in the order it took them back:
/// (index, global index, verdict), and its counts and coverage.
fn verdicts_with(jobs: usize, cases: u64) -> (Vec<(u64, u64, String)>, serde_json::Value) {
    let mutant = Mutant::parse("kv_append.truncate").unwrap_or_else(|e| panic!("{e}"));
    let options = CampaignOptions {
        seed: 11,
        shard: Shard::new(1, 2).unwrap_or_else(|e| panic!("{e}")),
        kernels: Kernels::ALL,
        // Appends into 16-bit caches fail with it, the rest pass: both verdicts occur.
        mutant: Some(mutant),
        corpus: None,
        shrink: ShrinkBudget::default(),
        context: ContextOptions::from_env(),
        jobs,
        max_cases: Some(cases),
        fail_fast: false,
        implementation: None,
    };
    let mut campaign = Campaign::new(options).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    loop {
        let step = campaign.step().unwrap_or_else(|e| panic!("jobs {jobs}: {e}"));
        let index = campaign.cases_run().saturating_sub(1);
        let (global, verdict) = match step {
            Step::Passed => (2 * index + 1, "passed".to_string()),
            Step::Skipped(reason) => (2 * index + 1, format!("skipped: {reason}")),
            Step::Failed(f) => {
                assert_eq!(f.index, index, "jobs {jobs}: case {} handed back as case {index}", f.index);
                (f.global_index, f.verdict.summary())
            }
            Step::Exhausted => break,
        };
        seen.push((index, global, verdict));
    }
    let stats = campaign.stats();
    let counts = serde_json::json!({
        "cases": stats.cases, "failed": stats.failed, "per_kernel": stats.per_kernel, "buckets": stats.buckets,
    });
    (seen, counts)
}

#[test]
fn any_number_of_jobs_runs_the_same_cases_with_the_same_verdicts() {
    let (one, one_counts) = verdicts_with(1, 24);
    let (two, two_counts) = verdicts_with(2, 24);
    assert_eq!(one.iter().map(|(i, _, _)| *i).collect::<Vec<_>>(), (0..24).collect::<Vec<_>>());
    assert!(one.iter().any(|(_, _, v)| v == "passed"), "no case passed: {one:?}");
    assert!(one.iter().any(|(_, _, v)| v != "passed"), "no case failed: {one:?}");
    assert_eq!(one, two, "jobs 1 and jobs 2 differ");
    assert_eq!(one_counts, two_counts);
}

/// A Python with NumPy (as tests/external.rs finds it).
fn python() -> String {
    let candidates = std::env::var("VKDECODE_PYTHON").into_iter().chain(["/usr/bin/python3".into(), "python3".into()]);
    for py in candidates {
        if Command::new(&py).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success()) {
            return py;
        }
    }
    panic!("no Python 3 with NumPy found: install python3-numpy (Debian) or set VKDECODE_PYTHON");
}

#[test]
fn a_runner_behind_a_worker_process_with_a_planted_bug_is_caught_and_shrunk() {
    let dir = TempDir::new("external");
    let corpus = dir.arg("corpus");
    let runners = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/external");
    let command = format!("{} {} --worker", python(), runners.join("planted_bug.py").display());
    let caps = runners.join("planted_bug.toml").display().to_string();
    let args = [
        "--external",
        &command,
        "--caps",
        &caps,
        "--batch",
        "4",
        "--jobs",
        "2",
        "--cases",
        "200",
        "--seed",
        "3",
        "--fail-fast",
        "--corpus",
        &corpus,
        "--shrink-time",
        "600s",
    ];
    let out = run(&mut fuzz(&args));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "the planted bug is found\n{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("ended by done"), "shrinking was cut short:\n{stdout}");
    assert!(stdout.contains("--external"), "the reproducer names the worker:\n{stdout}");
    let files = json_files(&dir.path().join("corpus/attention"));
    assert_eq!(files.len(), 1, "one corpus file: {files:?}");
    let case = load_case(&files[0]).unwrap_or_else(|e| panic!("{e}"));
    let Case::Attention(c) = &case else { panic!("not an attention case: {case:?}") };
    assert!(attention_work(c) <= 4096, "not shrunk: work {} in {c:?}", attention_work(c));
    // The bug shows only where a row's next position lies inside the capacity.
    assert!(c.seq_lens.iter().any(|&l| l < c.capacity || c.n_queries > 1), "{c:?}");

    // Verdicts are taken in case order: the same seed finds the same shrunk case again.
    let again = run(&mut fuzz(&args));
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stdout).contains("duplicate of"), "{}", text(&again.stdout));
}
