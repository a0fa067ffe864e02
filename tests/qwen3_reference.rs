//! The CPU reference (`vkdecode_reference::qwen3`) against HF transformers' golden data in
//! `corpus/qwen3/<fixture>/` (written by `corpus/qwen3/make_golden.py`; no Python is needed here).
//!
//! Per fixture: the checkpoint loads through `vkdecode::model::Checkpoint`; the reference's greedy
//! tokens equal HF's exactly; its teacher-forced logits are within a derived bound of HF's; its
//! RoPE frequencies are HF's to within one ulp. Per mutant (a deliberate bug of the reference): it
//! changes the greedy tokens or breaks the logit bound on at least one fixture, so the golden
//! data can tell a faithful forward from a typical wrong one.
//!
//! # The logit bound
//!
//! Both sides hold the same tensors in f32; the reference accumulates in f64, HF in f32 (blocked
//! sums). So the difference is HF's rounding. An f32 reduction of length K carries a relative
//! error of about √K·u (u = 2⁻²⁴; random-walk growth of blocked sums) of its magnitude, and a
//! layer chains about ten reductions (norm, q/k/v, q/k-norm, scores, softmax, weighted sum, o,
//! norm, gate/up, down) whose errors add up in the residual stream. Per fixture the bound is
//! therefore `10 · n_layers · √K · u` of each row's scale `max(1, max |hf logit|)`, K the longest
//! reduction (hidden, H·D, intermediate or sequence length): 1.5e-5 to 3.8e-5 here. Measured
//! errors are 20–45 times smaller (untied-rmsnorm 6.8e-7, trained-bytes 1.5e-6,
//! gqa4-hd128-long 8.4e-7 with transformers 5.24 / torch 2.15 on x86-64; printed by
//! `logits_match_hf_within_the_bound`); every mutant moves logits by 0.1 or more of their scale.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use common::golden::{FIXTURES, Golden, LogitError, corpus, f32_logit_bound, logit_error};
use serde_json::Value;
use vkdecode::model::{Checkpoint, WeightDtype};
use vkdecode::reference::qwen3::{Qwen3Mutant, Qwen3Options, Qwen3Reference, Qwen3Weights};

/// One fixture: the loaded checkpoint, its f32 weights and HF's outputs.
struct Fixture {
    name: &'static str,
    checkpoint: Checkpoint,
    weights: Qwen3Weights,
    golden: Value,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// `[T][vocab]`, T = prompt + generated.
    logits: Vec<Vec<f32>>,
    /// The faithful reference's outputs, computed once.
    faithful: OnceLock<Run>,
}

/// What the reference produced on a fixture.
struct Run {
    /// `generate_greedy(prompt, n)`.
    greedy: Vec<u32>,
    /// `teacher_forced_logits(prompt + HF's generated ids)`.
    logits: Vec<Vec<f32>>,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let Golden { name, dir, golden, prompt, generated, logits } = Golden::load(name);
        let checkpoint = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let weights = checkpoint.reference_weights().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(weights.params.vocab_size, logits[0].len(), "{name}: logits width is the vocabulary");
        Fixture { name, checkpoint, weights, golden, prompt, generated, logits, faithful: OnceLock::new() }
    }

    /// Prompt followed by the greedy tokens: what the teacher-forced logits were computed on.
    fn all_ids(&self) -> Vec<u32> {
        [&self.prompt[..], &self.generated[..]].concat()
    }

    /// Greedy ids and teacher-forced logits under `options`, in one pass: teacher forcing over
    /// prompt + generated, then a rewind to the end of the prompt and greedy decoding from there
    /// (the prompt's rows are the same computation either way).
    fn run(&self, options: Qwen3Options) -> Run {
        let mut r = Qwen3Reference::with_options(&self.weights, options);
        let logits = r.teacher_forced_logits(&self.all_ids());
        r.rewind(self.prompt.len());
        let greedy = r.continue_greedy(logits[self.prompt.len() - 1].clone(), self.generated.len());
        Run { greedy, logits }
    }

    fn faithful(&self) -> &Run {
        self.faithful.get_or_init(|| {
            let mut r = Qwen3Reference::new(&self.weights);
            let greedy = r.generate_greedy(&self.prompt, self.generated.len());
            Run { greedy, logits: r.teacher_forced_logits(&self.all_ids()) }
        })
    }

    /// The relative logit bound derived in the module docs: `10 · n_layers · √K · u`.
    fn logit_bound(&self) -> f64 {
        let p = &self.weights.params;
        f32_logit_bound(p.n_layers, &[p.hidden_size, p.n_q_heads * p.head_dim, p.intermediate_size, self.logits.len()])
    }

    /// Largest per-row error of `logits` against HF's, as a fraction of the row's scale.
    fn logit_error(&self, logits: &[Vec<f32>]) -> LogitError {
        logit_error(&self.logits, logits)
    }
}

/// Fixtures are loaded once per test binary and shared by the tests.
fn fixture(name: &str) -> &'static Fixture {
    static CACHE: OnceLock<BTreeMap<&'static str, OnceLock<Fixture>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| FIXTURES.iter().map(|&n| (n, OnceLock::new())).collect());
    let (&key, cell) = cache.get_key_value(name).unwrap_or_else(|| panic!("unknown fixture {name}"));
    cell.get_or_init(|| Fixture::load(key))
}

fn all_fixtures() -> impl Iterator<Item = &'static Fixture> {
    FIXTURES.iter().map(|n| fixture(n))
}

#[test]
fn every_fixture_on_disk_is_tested() {
    let mut on_disk: Vec<String> = std::fs::read_dir(corpus())
        .expect("corpus/qwen3 exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("golden.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<&str> = FIXTURES.to_vec();
    listed.sort();
    assert_eq!(on_disk, listed, "corpus/qwen3 fixtures and FIXTURES differ");
}

#[test]
fn checkpoints_load_with_the_declared_dtypes_and_layouts() {
    for f in all_fixtures() {
        let c = f.checkpoint.config();
        let want = match f.golden["weights_dtype"].as_str() {
            Some("float32") => WeightDtype::F32,
            Some("float16") => WeightDtype::F16,
            Some("bfloat16") => WeightDtype::Bf16,
            other => panic!("{}: weights_dtype {other:?}", f.name),
        };
        assert_eq!(c.dtype, Some(want), "{}: config dtype", f.name);
        for name in f.checkpoint.tensor_names() {
            assert_eq!(f.checkpoint.tensor(name).unwrap().dtype, want, "{}: {name}", f.name);
        }
        assert_eq!(c.tie_word_embeddings, f.weights.lm_head.is_none(), "{}", f.name);
    }
    // The three fixtures cover: legacy config keys, sharding, tying, GQA 4, head_dim 128.
    let c = |n| fixture(n).checkpoint.config().clone();
    let legacy = std::fs::read_to_string(corpus().join("untied-rmsnorm/config.json")).unwrap();
    assert!(legacy.contains("\"rope_theta\"") && legacy.contains("\"torch_dtype\""));
    assert!(!c("untied-rmsnorm").tie_word_embeddings);
    assert_ne!(c("untied-rmsnorm").num_attention_heads * c("untied-rmsnorm").head_dim, c("untied-rmsnorm").hidden_size);
    assert!(c("trained-bytes").tie_word_embeddings);
    assert!(fixture("trained-bytes").checkpoint.files().count() > 1, "trained-bytes is sharded");
    let g = c("gqa4-hd128-long");
    assert_eq!((g.num_attention_heads / g.num_key_value_heads, g.head_dim), (4, 128));
    assert!(fixture("gqa4-hd128-long").prompt.len() >= 300);
}

/// Distance in units in the last place between two positive finite f32s.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

#[test]
fn rope_frequencies_are_hfs_within_one_ulp() {
    // The reference rounds θ^(2i/D) correctly to f32; torch's vectorised f32 pow is accurate to
    // 1 ulp, not correctly rounded (1e6^0.578125 = 2942.72718: torch gives 2942.72705, the
    // nearest f32 is 2942.72729). One ulp of inv_freq moves the angle at position 335 by < 1e-8
    // rad for the frequencies where it happened, far below the logit bound.
    for f in all_fixtures() {
        let r = Qwen3Reference::new(&f.weights);
        let hf: Vec<f32> =
            f.golden["rope_inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(r.inv_freq().len(), hf.len(), "{}", f.name);
        let off: Vec<usize> = (0..hf.len()).filter(|&i| r.inv_freq()[i] != hf[i]).collect();
        for &i in &off {
            assert!(ulps(r.inv_freq()[i], hf[i]) <= 1, "{}: inv_freq[{i}] {} vs HF {}", f.name, r.inv_freq()[i], hf[i]);
        }
        assert_eq!(r.inv_freq()[..4], hf[..4], "{}: the fastest frequencies (largest angles) are exact", f.name);
        println!("{}: inv_freq differs from HF by 1 ulp at {off:?}", f.name);
    }
}

#[test]
fn greedy_tokens_match_hf_exactly() {
    for f in all_fixtures() {
        assert_eq!(f.faithful().greedy, f.generated, "{}: greedy tokens differ from HF's", f.name);
    }
}

#[test]
fn one_pass_runs_agree_with_separate_generation() {
    // The mutant checks use `Fixture::run` (teacher forcing, rewind, continue); it must give what
    // `generate_greedy` and `teacher_forced_logits` give separately.
    for f in all_fixtures() {
        let run = f.run(Qwen3Options::default());
        assert_eq!(run.greedy, f.faithful().greedy, "{}", f.name);
        assert_eq!(run.logits, f.faithful().logits, "{}", f.name);
    }
}

#[test]
fn logits_match_hf_within_the_bound() {
    for f in all_fixtures() {
        let e = f.logit_error(&f.faithful().logits);
        let bound = f.logit_bound();
        println!(
            "{}: max relative logit error {:.2e} (row {}, abs {:.2e}); bound {bound:.2e}",
            f.name, e.relative, e.row, e.abs
        );
        assert!(
            e.relative <= bound,
            "{}: row {} differs from HF by {:.3e} ({:.3e} of its scale), bound {bound:.2e}",
            f.name,
            e.row,
            e.abs,
            e.relative
        );
    }
}

#[test]
fn trained_bytes_text_round_trips() {
    let f = fixture("trained-bytes");
    let text = &f.golden["text"];
    let prompt = text["prompt"].as_str().unwrap();
    assert_eq!(f.prompt, prompt.bytes().map(u32::from).collect::<Vec<_>>());
    let generated: Vec<u8> = f.generated.iter().map(|&id| u8::try_from(id).expect("byte ids")).collect();
    assert_eq!(String::from_utf8_lossy(&generated), text["generated"].as_str().unwrap());
    println!("{prompt}{}", String::from_utf8_lossy(&generated));
}

/// Whether `mutant` changes the greedy tokens or breaks the logit bound on `f`.
fn caught_on(f: &Fixture, mutant: Qwen3Mutant) -> (bool, bool, LogitError) {
    let run = f.run(Qwen3Options { mutant: Some(mutant), ..Default::default() });
    let e = f.logit_error(&run.logits);
    (run.greedy != f.generated, e.relative > f.logit_bound(), e)
}

fn assert_caught(mutant: Qwen3Mutant) {
    let mut caught = false;
    for f in all_fixtures() {
        let (tokens, logits, e) = caught_on(f, mutant);
        println!("{mutant:?} on {}: tokens changed {tokens}, logit error {:.2e} of scale", f.name, e.relative);
        caught |= tokens || logits;
    }
    assert!(caught, "{mutant:?} passes every fixture: the golden data cannot see it");
}

macro_rules! mutant_tests {
    ($($test:ident => $mutant:ident,)*) => {
        $(
            #[test]
            fn $test() {
                assert_caught(Qwen3Mutant::$mutant);
            }
        )*

        #[test]
        fn every_mutant_has_a_test() {
            assert_eq!([$(Qwen3Mutant::$mutant),*].len(), Qwen3Mutant::ALL.len());
        }
    };
}

mutant_tests! {
    mutant_interleaved_rope_is_caught => InterleavedRope,
    mutant_skipped_qk_norm_is_caught => SkipQkNorm,
    mutant_modulo_gqa_map_is_caught => ModuloGqaMap,
    mutant_ignored_norm_weights_is_caught => IgnoreNormWeights,
    mutant_one_plus_norm_weights_is_caught => OnePlusNormWeights,
    mutant_rope_theta_10k_is_caught => RopeTheta10k,
    mutant_scale_from_hidden_is_caught => ScaleFromHidden,
    mutant_gelu_for_silu_is_caught => GeluForSilu,
}

#[test]
fn untied_rmsnorm_greedy_tokens_change_under_every_mutant() {
    // ANCHORS.md: this fixture's design (untied, H·D ≠ hidden, norm weights 1 + 0.2·N(0,1)) is
    // the one whose greedy tokens, not only its logits, expose each typical bug.
    let f = fixture("untied-rmsnorm");
    for m in Qwen3Mutant::ALL {
        assert!(caught_on(f, m).0, "{m:?} leaves untied-rmsnorm's greedy tokens unchanged");
    }
}
