//! Kernels behind another language (docs/BYOK.md): export → a NumPy runner → judge, for the
//! corpus and the grid, with the exact runner (strict f32 profile) and the float16 one (its
//! declared profile, and not the strict one); and every way a runner's output can be wrong gets
//! a verdict that says which, through `judge` and through a worker process, never a hang.
//!
//! Needs Python 3 with NumPy (Debian: python3-numpy): `VKDECODE_PYTHON`, else /usr/bin/python3,
//! else `python3`. The worker tests open a Vulkan device only because the seam hands one to
//! every implementation; the runners never touch it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vkdecode::cases::Case;
use vkdecode::cases::corpus::{default_corpus_dir, load_corpus};
use vkdecode::cases::grid::grid;
use vkdecode::external::judge::{CaseVerdict, case_dirs, judge_dir};
use vkdecode::external::{CapsFile, External, export::export};
use vkdecode::gpu::{Context, ContextOptions};
use vkdecode::implementation::{Judged, judge_batch, judge_case};

const RUNNERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/external");

/// A Python with NumPy, or a panic that says how to get one.
fn python() -> String {
    let candidates = std::env::var("VKDECODE_PYTHON").into_iter().chain(["/usr/bin/python3".into(), "python3".into()]);
    for py in candidates {
        let ok = Command::new(&py).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
        if ok {
            return py;
        }
    }
    panic!("no Python 3 with NumPy found: install python3-numpy (Debian) or set VKDECODE_PYTHON");
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("vkdecode-external-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn caps(file: &str) -> CapsFile {
    CapsFile::load(&Path::new(RUNNERS).join(file)).unwrap_or_else(|e| panic!("{e}"))
}

fn corpus_and_grid() -> Vec<(String, Case)> {
    let mut cases: Vec<(String, Case)> = load_corpus(&default_corpus_dir())
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|e| (format!("corpus/{}", e.name), e.case))
        .collect();
    cases.extend(grid().into_iter().map(|g| (g.name, g.case)));
    cases
}

/// Runs a runner script over an export folder (path mode).
fn run_runner(script: &str, dir: &Path) {
    let out = Command::new(python())
        .arg(Path::new(RUNNERS).join(script))
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` with its bytes: what `judge` must leave exactly as it was.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

/// (passed, failed, skipped, errors) of judging every case of an export, with the failures named.
fn judge_all(dir: &Path) -> (usize, Vec<String>, usize, Vec<String>) {
    let (mut passed, mut failed, mut skipped, mut errors) = (0, Vec::new(), 0, Vec::new());
    for case_dir in case_dirs(dir).unwrap_or_else(|e| panic!("{e}")) {
        let judged = judge_dir(&case_dir).unwrap_or_else(|e| panic!("{e}"));
        match judged.verdict {
            CaseVerdict::Judged(o) if o.passed => passed += 1,
            CaseVerdict::Judged(o) => failed.push(format!("{}: {}", judged.meta.name, o.detail.unwrap_or_default())),
            CaseVerdict::Skipped(_) => skipped += 1,
            CaseVerdict::Error(e) => errors.push(format!("{}: {e}", judged.meta.name)),
        }
    }
    (passed, failed, skipped, errors)
}

#[test]
fn the_exact_numpy_runner_passes_corpus_and_grid_strictly() {
    let tmp = TempDir::new("f64");
    let dir = tmp.0.join("export");
    let caps = caps("numpy_f64.toml");
    let cases = corpus_and_grid();
    let done = export(&dir, &cases, &caps.capabilities, |_| {}).unwrap_or_else(|e| panic!("{e}"));
    // Everything but paged and q8_0 caches, which case folders do not carry yet.
    let home = |why: &String| why.contains("capability `paged`") || why.contains("dtype q8_0");
    let kept = done.unsupported.iter().filter(|(_, why)| home(why)).count();
    assert_eq!(done.unsupported.len(), kept, "numpy-f64 declares everything else: {:?}", done.unsupported);
    assert!(kept > 0, "the corpus and grid hold paged and q8_0 cases");
    let cases: Vec<_> = cases.into_iter().filter(|(n, _)| !done.unsupported.iter().any(|(u, _)| u == n)).collect();
    assert_eq!(done.written.len(), cases.len());
    run_runner("numpy_f64.py", &dir);
    let before = snapshot(&dir);
    let (passed, failed, skipped, errors) = judge_all(&dir);
    assert!(failed.is_empty() && errors.is_empty(), "failures: {failed:#?}\nerrors: {errors:#?}");
    assert_eq!((passed, skipped), (cases.len(), 0));
    assert!(before == snapshot(&dir), "judge modified the export folder");
}

#[test]
fn the_float16_runner_passes_its_profile_and_not_the_strict_one() {
    let tmp = TempDir::new("f16");
    let declared = caps("numpy_f16.toml");
    let cases = corpus_and_grid();
    let dir = tmp.0.join("f16");
    let done = export(&dir, &cases, &declared.capabilities, |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert!(done.written.len() > 100, "{} exported", done.written.len());
    run_runner("numpy_f16.py", &dir);
    let (passed, failed, _, errors) = judge_all(&dir);
    assert!(failed.is_empty() && errors.is_empty(), "failures: {failed:#?}\nerrors: {errors:#?}");
    assert_eq!(passed, done.written.len());

    // The same cases judged by the strict f32 profile: its f16 rounding shows.
    let mut strict = declared.capabilities.clone();
    strict.precision = vkdecode::implementation::Precision::F32;
    let dir = tmp.0.join("strict");
    export(&dir, &cases, &strict, |_| {}).unwrap_or_else(|e| panic!("{e}"));
    run_runner("numpy_f16.py", &dir);
    let (_, failed, _, errors) = judge_all(&dir);
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        failed.len() > done.written.len() / 4,
        "only {} of {} fail the f32 profile",
        failed.len(),
        done.written.len()
    );
}

/// A runner that answers each case in a way chosen by the case folder's name (`MODE` below), in
/// path mode and in worker mode.
const BAD_RUNNER: &str = r#"
import json, os, sys, time
import numpy as np

def answer(d, mode):
    meta = json.load(open(os.path.join(d, "case.json")))
    r = os.path.join(d, "result")
    os.makedirs(r, exist_ok=True)
    s = meta["shape"]
    shape = (s["n_seqs"], s["n_queries"], s["n_q_heads"], s["head_dim"])
    if mode == "exit":
        sys.exit(3)
    if mode == "hang":
        time.sleep(3600)
    if mode == "chatter":
        print("hello", flush=True)
        return
    out = {"shape": np.zeros((1, 2, 3), np.float32), "dtype": np.zeros(shape, np.int32),
           "nan": np.full(shape, np.nan, np.float32)}.get(mode, np.zeros(shape, np.float32))
    if mode != "missing":
        np.save(os.path.join(r, "out.npy"), out)
    if mode == "tamper":
        np.save(os.path.join(d, "q.npy"), np.zeros(shape, np.float32))
    status = "{not json" if mode == "status" else json.dumps({"status": "ok"})
    open(os.path.join(r, "status.json"), "w").write(status)

mode = os.environ["MODE"]
if sys.argv[1:] == ["--worker"]:
    for line in sys.stdin:
        req = json.loads(line)
        for name in req["cases"]:
            answer(os.path.join(req["batch"], name), mode)
        if mode != "chatter":
            print(json.dumps({"done": req["batch"]}), flush=True)
else:
    for name in json.load(open(os.path.join(sys.argv[1], "index.json"))):
        answer(os.path.join(sys.argv[1], name), mode)
"#;

/// A small attention case from the corpus.
fn small_case() -> Case {
    corpus_and_grid()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| matches!(c, Case::Attention(a) if !a.fused && a.seq_lens.iter().sum::<usize>() > 0 && a.capacity <= 256))
        .expect("a small attention case")
}

#[test]
fn judge_names_every_way_a_result_can_be_wrong_and_leaves_the_folder_alone() {
    let tmp = TempDir::new("bad-judge");
    let script = tmp.0.join("bad.py");
    std::fs::write(&script, BAD_RUNNER).unwrap_or_else(|e| panic!("{e}"));
    let case = small_case();
    let expected = [
        ("missing", "out.npy: No such file"),
        ("shape", "shape [1, 2, 3], expected"),
        ("dtype", "dtype <i4, expected <f2 or <f4 or <f8"),
        ("status", "status.json: malformed"),
        ("tamper", "q.npy: modified after export"),
    ];
    for (mode, want) in expected {
        let dir = tmp.0.join(mode);
        export(&dir, &[(format!("bad/{mode}"), case.clone())], &Default::default(), |_| {})
            .unwrap_or_else(|e| panic!("{e}"));
        let out =
            Command::new(python()).arg(&script).arg(&dir).env("MODE", mode).output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let before = snapshot(&dir);
        let (_, failed, _, errors) = judge_all(&dir);
        assert!(failed.is_empty() && errors.len() == 1, "{mode}: {failed:?} {errors:?}");
        assert!(errors[0].contains(want), "{mode}: `{}` does not say `{want}`", errors[0]);
        assert!(before == snapshot(&dir), "{mode}: judge modified the folder");
    }
    // NaN where the reference is finite is a judged failure, not an error.
    let dir = tmp.0.join("nan");
    export(&dir, &[("bad/nan".into(), case.clone())], &Default::default(), |_| {}).unwrap_or_else(|e| panic!("{e}"));
    Command::new(python()).arg(&script).arg(&dir).env("MODE", "nan").status().unwrap_or_else(|e| panic!("{e}"));
    let (_, failed, _, errors) = judge_all(&dir);
    assert!(errors.is_empty() && failed.len() == 1 && failed[0].contains("NaN"), "{failed:?} {errors:?}");
    // The CLI: exit 1 on those verdicts, 2 when the folder is no export at all.
    let cli = |args: &[&Path]| {
        Command::new(env!("CARGO_BIN_EXE_vkdecode")).arg("judge").args(args).output().unwrap_or_else(|e| panic!("{e}"))
    };
    let out = cli(&[&tmp.0.join("nan"), &tmp.0.join("tamper")]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 passed, 2 failed"));
    let saved = tmp.0.join("saved");
    let out = Command::new(env!("CARGO_BIN_EXE_vkdecode"))
        .arg("judge")
        .arg(tmp.0.join("nan"))
        .arg("--save-failures")
        .arg(&saved)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(1));
    let back =
        vkdecode::cases::corpus::load_case(&saved.join("attention/bad.nan.json")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, case, "the saved failure is the exported case");
    let out = cli(&[&tmp.0]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("index.json"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_worker_that_fails_gets_a_verdict_that_says_how_and_is_restarted() {
    let tmp = TempDir::new("bad-worker");
    let script = tmp.0.join("bad.py");
    std::fs::write(&script, BAD_RUNNER).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Arc::new(Context::new(&ContextOptions::from_env()).unwrap_or_else(|e| panic!("{e}")));
    let case = small_case();
    let py = python();
    let expected = [
        ("exit", "worker exited"),
        ("hang", "worker hung"),
        ("chatter", "malformed worker output"),
        ("missing", "out.npy"),
        ("status", "malformed"),
        ("dtype", "dtype <i4"),
    ];
    for (mode, want) in expected {
        let caps = CapsFile::parse(Path::new("bad.toml"), "name = \"bad\"").unwrap_or_else(|e| panic!("{e}"));
        let command = format!("MODE={mode} {py} {} --worker", script.display());
        let external = External::new(caps, &command, 2, Duration::from_secs(3), &tmp.0.join(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        let verdicts = judge_batch(&ctx, &external, &[case.clone(), case.clone()]);
        assert!(start.elapsed() < Duration::from_secs(30), "{mode}: took {:?}", start.elapsed());
        for v in verdicts {
            let message = match v {
                Err(e) => e.to_string(),
                Ok(other) => panic!("{mode}: {other:?}"),
            };
            assert!(message.contains(want), "{mode}: `{message}` does not say `{want}`");
        }
    }
    // A worker that crashes once is replaced: the next call gets a fresh one that works.
    let marker = tmp.0.join("crashed-once");
    let flaky = format!(
        "if [ -e {m} ]; then MODE=ok {py} {s} --worker; else touch {m}; MODE=exit {py} {s} --worker; fi",
        m = marker.display(),
        s = script.display()
    );
    let caps = CapsFile::parse(Path::new("flaky.toml"), "name = \"flaky\"").unwrap_or_else(|e| panic!("{e}"));
    let external =
        External::new(caps, &flaky, 1, Duration::from_secs(10), &tmp.0.join("flaky")).unwrap_or_else(|e| panic!("{e}"));
    assert!(judge_case(&ctx, &external, &case, None).is_err());
    // MODE=ok answers zeros: a verdict (a mismatch), so the worker ran.
    match judge_case(&ctx, &external, &case, None) {
        Ok(Judged::Ran(o)) => assert!(!o.passed && o.checked > 0),
        other => panic!("the restarted worker gave {other:?}"),
    }
}

#[test]
fn export_draws_inside_the_capabilities_and_never_writes_over_a_folder() {
    let tmp = TempDir::new("draw");
    let dir = tmp.0.join("drawn");
    let export = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vkdecode"))
            .arg("export")
            .arg(&dir)
            .args(["--caps", &format!("{RUNNERS}/numpy_f16.toml"), "--draw", "12", "--seed", "5"])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let out = export(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dirs = case_dirs(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dirs.len(), 12);
    for d in &dirs {
        let (meta, case) = vkdecode::external::judge::read_meta(d).unwrap_or_else(|e| panic!("{e}"));
        let Case::Attention(c) = case else { panic!("numpy-f16 declares attention only: {}", meta.name) };
        assert!(!c.fused && c.split_chunk.is_none(), "{}: outside the declared options", meta.name);
        assert_eq!(meta.precision, vkdecode::implementation::Precision::F16_SOFTMAX);
    }
    let before = snapshot(&dir);
    let again = export(&[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(before == snapshot(&dir), "a second export changed the folder");
}
