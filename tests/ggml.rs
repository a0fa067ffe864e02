//! ggml-vulkan's flash attention under vkdecode's suite: the manifests of `targets/ggml/` drive
//! ggml's scalar `flash_attn.comp` (its f32_f16 and fp32 builds) and its split-K reduce, compiled
//! at test time from the llama.cpp sources the `llama-cpp-sys-2` crate ships (pinned in
//! `targets/ggml/fetch/`; `targets/ggml/build-spirv.sh` fetches and compiles them). Nothing of
//! ggml is in this repository. Offline or without glslc the target skips, saying why;
//! `VKDECODE_GGML_SPIRV=DIR` takes SPIR-V built beforehand (machines without cargo or glslc).
//!
//! Per build: the corpus, the grid, property draws inside the declared capabilities and the
//! harness mutants; verdicts known in advance live in `targets/ggml/expect-<build>.toml`.
//! docs/PEERS.md is the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use libtest_mimic::{Arguments, Trial};
use vkdecode::cases::Case;
use vkdecode::cases::corpus::default_corpus_dir;
use vkdecode::implementation::{Expectations, Judged, Suite, judge_case};
use vkdecode::manifest::Manifest;

/// The manifests and their expectation files, by build.
const BUILDS: [(&str, &str); 2] = [("f32-f16", "fa-f32-f16.toml"), ("fp32", "fa-fp32.toml")];

/// Largest attention work ([`vkdecode::cases::strategy::attention_work`]) run on a CPU device.
const CPU_CASE_WORK: usize = 4_000_000;

fn skip(reason: String) -> Vec<Trial> {
    eprintln!("ggml: skipped: {reason}");
    vec![Trial::test("ggml/skipped", move || Err(reason.into())).with_ignored_flag(true)]
}

fn trials() -> Vec<Trial> {
    // The manifests are read from the working directory's targets/ (a GPU machine runs the test
    // binary from a copy of the tree), else from the crate's sources.
    let local = Path::new("targets/ggml");
    let targets =
        if local.is_dir() { local.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("targets/ggml") };
    // VKDECODE_GGML_SPIRV: SPIR-V built beforehand (a GPU machine has no cargo or glslc).
    let spirv = match std::env::var_os("VKDECODE_GGML_SPIRV") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let spirv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ggml-spirv");
            let built = Command::new("bash").arg(targets.join("build-spirv.sh")).arg(&spirv).output();
            match built {
                Err(e) => return skip(format!("cannot run build-spirv.sh: {e}")),
                Ok(o) if !o.status.success() => {
                    return skip(format!("build-spirv.sh failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
                }
                Ok(_) => {}
            }
            spirv
        }
    };
    let vars = BTreeMap::from([("GGML_SPIRV".to_string(), spirv.display().to_string())]);
    // On a CPU device ggml's shader takes seconds on the corpus's long cases: they are listed as
    // over-budget (ignored; `--include-ignored` runs them), the rest runs.
    let cpu = vkdecode::gpu::Context::shared().is_ok_and(|c| c.info().device_type == "cpu");
    let cases: u32 = std::env::var("VKDECODE_GGML_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cpu { 4 } else { 16 });
    let budget = cpu.then_some(CPU_CASE_WORK);
    let mut trials = Vec::new();
    for (build, file) in BUILDS {
        let manifest = match Manifest::load_with(&targets.join(file), &vars) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let message = e.to_string();
                trials.push(Trial::test(format!("ggml-{build}/manifest"), move || Err(message.into())));
                continue;
            }
        };
        let expectations = match Expectations::load(&targets.join(format!("expect-{build}.toml"))) {
            Ok(e) => e,
            Err(message) => {
                trials.push(Trial::test(format!("ggml-{build}/expectations"), move || Err(message.clone().into())));
                continue;
            }
        };
        let kernel = manifest.kernel(None).expect("no variant pinned");
        // The fp32 build's own share of a CPU run is small: its pipelines compile as slowly.
        let cases = if cpu && build == "fp32" { cases.min(2) } else { cases };
        let mut suite = Suite::new(Arc::new(kernel))
            .corpus(default_corpus_dir())
            .property_cases(cases)
            .expectations(expectations)
            .prefix(format!("ggml-{build}"))
            .max_case_work(budget);
        if cpu {
            // On fp16 devices ggml runs the f32_f16 build for f16 caches and the fp32 build for
            // bf16 ones: on a CPU device each build's own cache type runs by default, the rest are
            // listed as over-budget (`--include-ignored` runs them; a GPU runs everything).
            // Pipelines of ggml's shader take about 13 s each to compile there, one per launch
            // shape: the fp32 build runs one grid shape and the option cases.
            let own = if build == "fp32" { vkdecode::kernels::Dtype::Bf16 } else { vkdecode::kernels::Dtype::F16 };
            let fp32 = build == "fp32";
            suite = suite.by_default(move |name, case| {
                case.dtype() == own && (!fp32 || name.contains("/h8-kv2-d128/") || !name.contains("/h"))
            });
        }
        trials.extend(suite.trials());
        if build == "fp32" {
            let (path, vars) = (targets.join(file), vars.clone());
            trials.push(
                Trial::test(format!("ggml-{build}/manifest_mutants/swapped_k_strides"), move || {
                    swapped_strides_are_caught(&path, &vars, cpu)
                })
                .with_kind("mutant"),
            );
        }
    }
    trials
}

/// The manifest with two push-constant fields swapped (K's head and sequence strides) must fail
/// some grid cases, named in the output: the judge sees a wrong binding of a foreign kernel.
fn swapped_strides_are_caught(
    path: &Path,
    vars: &BTreeMap<String, String>,
    cpu: bool,
) -> Result<(), libtest_mimic::Failed> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let (head, seq) = ("k_stride_head * dtype_size", "k_stride_seq * dtype_size");
    if !text.contains(head) || !text.contains(seq) {
        return Err("the manifest no longer spells the K strides as this test expects".into());
    }
    let swapped = text.replace(head, "@HEAD@").replace(seq, head).replace("@HEAD@", seq);
    let manifest = Arc::new(Manifest::parse(path, &swapped, vars).map_err(|e| e.to_string())?);
    let kernel = manifest.kernel(None).map_err(|e| e.to_string())?;
    let ctx = vkdecode::gpu::Context::shared()?;
    let mut failing = Vec::new();
    for g in vkdecode::cases::grid::grid() {
        let Case::Attention(c) = &g.case else { continue };
        // Cheap cases whose K has several heads (the swap cannot show with one head and one sequence).
        // On a CPU device, the bf16 cases whose pipelines the suite compiles anyway.
        let cheap = !cpu || (c.dtype == vkdecode::kernels::Dtype::Bf16 && g.name.contains("/h8-kv2-d128/"));
        if c.n_kv_heads < 2 || vkdecode::cases::strategy::attention_work(c) > 1_000_000 || !cheap {
            continue;
        }
        if let Judged::Ran(o) = judge_case(&ctx, &kernel, &g.case, None).map_err(|e| e.to_string())?
            && !o.passed
        {
            failing.push(g.name);
            if failing.len() == 3 {
                break;
            }
        }
    }
    if failing.is_empty() {
        return Err("no case failed with K's head and sequence strides swapped".into());
    }
    eprintln!("swapped K strides fail: {}", failing.join(", "));
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, trials()).exit();
}
