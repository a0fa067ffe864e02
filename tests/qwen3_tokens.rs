//! The Vulkan decode engine against HF transformers' golden data (`corpus/qwen3/<fixture>/`,
//! written by `corpus/qwen3/make_golden.py`): the end-to-end proof that the decode hot path is
//! right in a real model. The CPU reference is held to the same data in tests/qwen3_reference.rs.
//!
//! Per fixture and KV-cache type:
//! - **f32 KV**: the engine's greedy tokens are HF's exactly, and its teacher-forced logits (over
//!   prompt + HF's tokens) are within `2 · B` of HF's, relative to each row's scale
//!   `max(1, max |logit|)`. B = `10 · n_layers · √K · u` is the reference suite's bound on one f32
//!   implementation's distance from exact arithmetic (K the longest reduction); the engine and HF
//!   both compute in f32, each within B of exact, so within 2·B of each other. The GPU's
//!   transcendental functions (exp, inversesqrt: a few ulp each in Vulkan's precision rules) fit
//!   inside the per-reduction budget of at least √K·u ≥ 8u.
//! - **f16 / bf16 KV**: rounding the cache moves logits by more than any f32 bound, so the error
//!   is measured: E = the largest |engine − HF| over the teacher-forced rows. A greedy token can
//!   only differ from HF's where some logit moved by half the top-1/top-2 margin, so a separate
//!   free-running greedy run must give HF's token at every step up to the first whose golden
//!   margin is at most 2·E (after a legitimate flip the contexts differ and nothing more follows).
//! - **Paged f32 KV** (pages of 16 through a shuffled block table): HF's greedy tokens exactly,
//!   as the contiguous cache gives them.
//! - **Mutants** of the engine (interleaved RoPE, q/k-norm skipped, norm weight ignored, wrong GQA
//!   map): each breaks the f32 logit bound or the greedy tokens on at least one fixture.
//! - **Counters**: one submit, one host wait, no copies and a 4-byte host read per token, and the
//!   dispatch and barrier counts of the recorded step.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::golden::{FIXTURES, Golden, f32_logit_bound};
use vkdecode::engine::{Engine, EngineMutant, GenerateOptions, Trace};
use vkdecode::gpu::Context;
use vkdecode::kernels::Dtype;
use vkdecode::model::Checkpoint;

fn ctx() -> Arc<Context> {
    Context::shared().unwrap_or_else(|e| panic!("no Vulkan device: {e}"))
}

/// A fixture's golden data and its engine, loaded once per test binary.
struct Fixture {
    golden: Golden,
    engine: Engine,
    /// Validation messages are per context; fixtures run their engines one at a time.
    lock: Mutex<()>,
}

fn fixture(name: &str) -> &'static Fixture {
    static CACHE: OnceLock<Vec<(&'static str, OnceLock<Fixture>)>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| FIXTURES.iter().map(|&n| (n, OnceLock::new())).collect());
    let (key, cell) = cache.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("unknown fixture {name}"));
    cell.get_or_init(|| {
        let golden = Golden::load(key);
        let checkpoint = Checkpoint::open(&golden.dir).unwrap_or_else(|e| panic!("{key}: {e}"));
        let engine = Engine::from_checkpoint(&ctx(), &checkpoint, |_, _| {}).unwrap_or_else(|e| panic!("{key}: {e}"));
        Fixture { golden, engine, lock: Mutex::new(()) }
    })
}

impl Fixture {
    /// The relative f32 bound B of the module docs.
    fn bound(&self) -> f64 {
        let c = self.engine.config();
        let k = [c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size, self.golden.logits.len()];
        f32_logit_bound(c.num_hidden_layers, &k)
    }

    fn options(kv: Dtype, mutant: Option<EngineMutant>) -> GenerateOptions {
        GenerateOptions { kv_dtype: kv, mutant, ..Default::default() }
    }

    fn greedy(&self, options: &GenerateOptions) -> Vec<u32> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let g = &self.golden;
        let out = self.engine.generate(&g.prompt, g.generated.len(), options, |_| {});
        let out = out.unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_no_validation_messages(g.name);
        out.generated_ids
    }

    fn teacher_forced(&self, options: &GenerateOptions) -> Vec<Vec<f32>> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let g = &self.golden;
        let logits = self.engine.teacher_forced_logits(&g.all_ids(), options);
        let logits = logits.unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_no_validation_messages(g.name);
        logits
    }
}

fn assert_no_validation_messages(what: &str) {
    let messages = ctx().take_validation_messages();
    assert!(messages.is_empty(), "{what}: validation messages:\n{}", messages.join("\n"));
}

/// f32 KV: HF's greedy tokens exactly, teacher-forced logits within 2·B.
fn f32_kv_matches(name: &str) {
    let f = fixture(name);
    let g = &f.golden;
    let options = Fixture::options(Dtype::F32, None);
    let greedy = f.greedy(&options);
    assert_eq!(greedy, g.generated, "{name}: greedy tokens differ from HF's");
    let err = g.logit_error(&f.teacher_forced(&options));
    println!(
        "{name}: {} tokens, {} logit rows; worst relative error {:.2e} (row {}, abs {:.2e}), bound 2·B = {:.2e}",
        greedy.len(),
        g.logits.len(),
        err.relative,
        err.row,
        err.abs,
        2.0 * f.bound()
    );
    assert!(
        err.relative <= 2.0 * f.bound(),
        "{name}: logit row {} is off by {:.3e} of its scale (abs {:.3e}); bound {:.3e}",
        err.row,
        err.relative,
        err.abs,
        2.0 * f.bound()
    );
}

/// f16/bf16 KV: greedy tokens match HF's up to the first step whose margin is at most 2·E.
fn narrow_kv_matches(name: &str, kv: Dtype) {
    let f = fixture(name);
    let g = &f.golden;
    let options = Fixture::options(kv, None);
    let logits = f.teacher_forced(&options);
    let e = g.logit_error(&logits).abs;
    assert!(e.is_finite(), "{name} {kv}: non-finite logits");
    let greedy = f.greedy(&options);
    let first_row = g.prompt.len() - 1; // the row whose arg-max is the first generated token
    let trusted = (0..g.generated.len()).take_while(|&i| g.margin(first_row + i) > 2.0 * e).count();
    println!(
        "{name} {kv} KV: measured E = {e:.3e}; {trusted} of {} greedy steps have margin > 2E and all must match",
        g.generated.len()
    );
    assert_eq!(greedy[..trusted], g.generated[..trusted], "{name} {kv}: a token differs where the margin exceeds 2E");
}

/// A paged f32 KV cache (pages of 16, shuffled table): HF's greedy tokens exactly, as the
/// contiguous cache gives them.
fn paged_kv_matches(name: &str) {
    let f = fixture(name);
    let options = GenerateOptions { kv_page_size: Some(16), ..Fixture::options(Dtype::F32, None) };
    assert_eq!(f.greedy(&options), f.golden.generated, "{name}: greedy tokens with --kv-pages 16 differ from HF's");
}

macro_rules! fixture_tests {
    ($($test:ident: $name:literal,)*) => {
        mod f32_kv {
            $(#[test] fn $test() { super::f32_kv_matches($name) })*
        }
        mod f16_kv {
            $(#[test] fn $test() { super::narrow_kv_matches($name, vkdecode::kernels::Dtype::F16) })*
        }
        mod bf16_kv {
            $(#[test] fn $test() { super::narrow_kv_matches($name, vkdecode::kernels::Dtype::Bf16) })*
        }
        mod paged_f32_kv {
            $(#[test] fn $test() { super::paged_kv_matches($name) })*
        }
    };
}

fixture_tests! {
    untied_rmsnorm: "untied-rmsnorm",
    trained_bytes: "trained-bytes",
    gqa4_hd128_long: "gqa4-hd128-long",
}

#[test]
fn every_fixture_is_tested() {
    // The macro above lists each fixture once; FIXTURES is what is on disk (checked by the
    // reference suite's every_fixture_on_disk_is_tested).
    assert_eq!(FIXTURES, ["untied-rmsnorm", "trained-bytes", "gqa4-hd128-long"]);
}

#[test]
fn every_mutant_is_caught() {
    for mutant in EngineMutant::ALL {
        let caught_by = FIXTURES.iter().find(|&&name| {
            let f = fixture(name);
            let options = Fixture::options(Dtype::F32, Some(mutant));
            let err = f.golden.logit_error(&f.teacher_forced(&options));
            err.relative > 2.0 * f.bound() || f.greedy(&options) != f.golden.generated
        });
        println!("{}: caught by {caught_by:?}", mutant.name());
        assert!(caught_by.is_some(), "engine mutant {} survived every fixture", mutant.name());
    }
}

#[test]
fn a_token_costs_one_submit_one_wait_no_copies() {
    let f = fixture("trained-bytes");
    let c = f.engine.config();
    let g = &f.golden;
    let _guard = f.lock.lock().unwrap_or_else(|e| e.into_inner());
    let options = GenerateOptions { trace: Trace::Stages, ..Fixture::options(Dtype::F16, None) };
    let out = f.engine.generate(&g.prompt[..4], 3, &options, |_| {}).expect("generate");
    let n = out.counters;
    assert_eq!((n.tokens_per_submit, n.submits, n.host_waits, n.copies, n.host_read_bytes), (1, 1, 1, 0, 4), "{n:?}");
    // Per layer: norm+q/k/v, attention with q/k-norm+RoPE (split, and a merge dispatch when the
    // cache has many chunks), o, norm+gate/up+SwiGLU, down; around them: embed, final norm+LM
    // head, argmax (one dispatch). A barrier after every stage but the last (and before a merge).
    let layers = c.num_hidden_layers as u32;
    let attention = n.dispatches - (layers * 4 + 3);
    assert!(
        (1..=2).contains(&(attention / layers)) && attention.is_multiple_of(layers),
        "{n:?}: unexpected dispatch count"
    );
    let per_layer = 4 + attention / layers;
    assert_eq!(n.dispatches, 3 + layers * per_layer, "{n:?}");
    assert_eq!(n.barriers, 2 + layers * per_layer, "{n:?}");
    // The trace has one event per stage of every step, each of non-negative length.
    let steps = out.step_seconds.len();
    assert_eq!(steps, 4 - 1 + 3);
    let stages = 3 + layers as usize * 5; // embed, 5 per layer, final norm+LM head, argmax
    assert_eq!(out.trace.len(), steps * stages, "trace events");
    assert!(out.trace.iter().all(|e| e.dur_us >= 0.0 && e.start_us >= 0.0));
    // Step timestamps only: one event per step, the same tokens.
    let steps_only = GenerateOptions { trace: Trace::Steps, ..options };
    let coarse = f.engine.generate(&g.prompt[..4], 3, &steps_only, |_| {}).expect("generate");
    assert_eq!(coarse.trace.len(), steps, "one event per step");
    assert!(coarse.trace.iter().all(|e| e.name == "step" && e.dur_us > 0.0));
    assert_eq!(coarse.generated_ids, out.generated_ids);
    assert_no_validation_messages("counters");
}

#[test]
fn bad_prompts_are_refused_with_the_reason() {
    let f = fixture("untied-rmsnorm");
    let vocab = f.engine.config().vocab_size as u32;
    let options = GenerateOptions::default();
    let err = |prompt: &[u32], n: usize| match f.engine.generate(prompt, n, &options, |_| {}) {
        Ok(_) => panic!("prompt {prompt:?} with {n} new tokens was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(&[], 4).contains("prompt is empty"));
    let e = err(&[1, vocab], 4);
    assert!(e.contains("prompt token 1") && e.contains(&vocab.to_string()), "{e}");
    let e = err(&[1], 1 << 20);
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn several_tokens_per_submit_give_the_same_tokens() {
    let f = fixture("trained-bytes");
    let g = &f.golden;
    let _guard = f.lock.lock().unwrap_or_else(|e| e.into_inner());
    // 5 does not divide the 152 steps: the last submit runs past the end.
    let options = GenerateOptions { tokens_per_submit: 5, ..Fixture::options(Dtype::F32, None) };
    let out = f.engine.generate(&g.prompt, g.generated.len(), &options, |_| {}).expect("generate");
    assert_eq!(out.generated_ids, g.generated, "greedy tokens with 5 tokens per submit");
    let n = out.counters;
    assert_eq!((n.tokens_per_submit, n.submits, n.host_waits, n.copies, n.host_read_bytes), (5, 1, 1, 0, 20), "{n:?}");
    assert_eq!(out.step_seconds.len(), g.prompt.len() - 1 + g.generated.len());
    assert_no_validation_messages("tokens per submit");
}
