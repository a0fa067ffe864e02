//! Property-based tests: random cases from `vkdecode::cases::strategy`, run on the device and
//! judged against the CPU reference with the tolerances of `vkdecode::cases::tolerance`.
//!
//! - Kernel properties: attention matches the reference; append is bit-exact and leaves every
//!   byte outside the written slots as it was.
//! - Metamorphic relations, each also checked against the reference (never GPU-vs-GPU alone):
//!   layouts, GQA vs MHA with repeated kv heads, poison kinds, multi-query rows vs single-query
//!   decode.
//! - The strategies themselves: every draw is a valid case that survives JSON, and the strategy
//!   reaches the triggers of the bugs listed in ANCHORS.md.
//!
//! Budget: the draws are fixed (each property its own, from seed [`SEED`]) unless
//! `PROPTEST_RNG_SEED` picks others, so a run takes the same time on the same machine. On
//! lavapipe most of it is compiling one pipeline per launch shape drawn (LLVM, 2–3 s each;
//! Mesa's on-disk shader cache keeps them for the next run), so random draws took one to twelve
//! minutes on two cores; there each property runs 3/5 of its cases. Two cores,
//! `VKDECODE_VALIDATION=1`, the Mesa cache empty: this file alone 587 s (750 with every case); in
//! `.ci/run` on a fresh clone, after the suites before it, 473 s of 1473 (with half the cases 482
//! of 1506: the time is in a few launch shapes, not in the count). `PROPTEST_CASES=N` runs N cases
//! per property instead; new draws (`PROPTEST_RNG_SEED=$RANDOM`) and long campaigns
//! (`vkdecode-fuzz`) explore beyond the fixed set. A failure prints the shrunk case as JSON: save it
//! as `corpus/<kernel>/<name>.json` and it becomes a conformance trial (`vkdecode replay FILE` runs
//! it alone). Failure persistence (proptest's regression files) is off: the corpus is the record,
//! it survives changes to the strategies, and CI never writes into the source tree.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use vkdecode::cases::data::{AttentionInputs, attention_inputs};
use vkdecode::cases::model::{AppendValues, Dist, PageOrder, Paged};
use vkdecode::cases::run::{
    AttentionRun, attention_reference, check_attention, run_append, run_append_then_attend, run_attention,
    run_attention_inputs,
};
use vkdecode::cases::strategy::{AttentionLimits, any_case, append_case, attention_case, attention_work, paged};
use vkdecode::cases::{AttentionCase, Case, LayoutKind, Outcome, Poison, run_case};
use vkdecode::gpu::{Context, ContextOptions};
use vkdecode::kernels::attention::{self, CHUNK_TILE};
use vkdecode::kernels::{CacheLayout, Dtype};
use vkdecode::reference::dtype::{decode, encode, load, store};

/// The draws' seed unless `PROPTEST_RNG_SEED` gives one.
const SEED: u64 = 1;

/// Proptest's defaults (which read `PROPTEST_*` variables), with `cases` lowered to
/// `default_cases` unless `PROPTEST_CASES` is set (on a CPU device 3/5 of them: there each drawn
/// launch shape costs seconds of compiling), the seed ([`SEED`] or `PROPTEST_RNG_SEED`) plus
/// `salt`, so each property draws its own cases, shrinking bounded (each step is a GPU run)
/// unless `PROPTEST_MAX_SHRINK_ITERS` is set, and no regression files.
fn config(default_cases: u32, salt: u64) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        let cpu = ctx().info().device_type == "cpu";
        config.cases = if cpu { default_cases * 3 / 5 } else { default_cases };
    }
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => SEED,
    };
    config.rng_seed = RngSeed::Fixed(seed.wrapping_add(salt));
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 2000;
    }
    config.failure_persistence = None;
    config
}

/// The shared device; with `VKDECODE_VALIDATION=1` it must really have the validation layer on
/// (else the run would silently check less than asked).
fn ctx() -> Arc<Context> {
    let ctx = Context::shared().unwrap_or_else(|e| panic!("no Vulkan device (lavapipe in CI): {e}"));
    assert!(
        !ContextOptions::from_env().validation || ctx.validation_enabled(),
        "VKDECODE_VALIDATION=1, but the context runs without the validation layer"
    );
    ctx
}

/// The case as a corpus file, with instructions.
fn replayable(case: &Case) -> String {
    let json = serde_json::to_string(case).unwrap_or_else(|e| format!("<case does not serialize: {e}>"));
    format!("case JSON (save as corpus/{}/<name>.json; replay with `vkdecode replay FILE`):\n{json}\n", case.kernel())
}

fn fail(case: &Case, what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{what}\n{}", replayable(case)))
}

/// Passes if the outcome passed; else fails with the verdict and the case's JSON.
fn verdict(case: &Case, outcome: &Outcome) -> Result<(), TestCaseError> {
    if outcome.passed {
        return Ok(());
    }
    Err(fail(
        case,
        format_args!(
            "{} {} mismatching of {} checked ({}); max |error| {:e}, worst error/bound {:e}, NMSE {:e}\n{}",
            case.kernel(),
            outcome.mismatches,
            outcome.checked,
            outcome.tolerance,
            outcome.max_abs_err,
            outcome.worst_ratio,
            outcome.nmse,
            outcome.detail.as_deref().unwrap_or_default()
        ),
    ))
}

/// Fails with the validation messages raised since the last call, if any.
fn no_validation_messages(ctx: &Context, case: &Case) -> Result<(), TestCaseError> {
    let messages = ctx.take_validation_messages();
    if messages.is_empty() {
        return Ok(());
    }
    Err(fail(case, format_args!("{} validation message(s):\n{}", messages.len(), messages.join("\n"))))
}

/// Runs an attention case and requires it to match the reference; returns the run.
fn attend(ctx: &Arc<Context>, case: &AttentionCase) -> Result<AttentionRun, TestCaseError> {
    let wrapped = Case::Attention(case.clone());
    let (outcome, run) = run_attention(ctx, case, None).map_err(|e| fail(&wrapped, format_args!("run failed: {e}")))?;
    no_validation_messages(ctx, &wrapped)?;
    verdict(&wrapped, &outcome)?;
    Ok(run)
}

/// Runs materialized attention inputs (not described by a case) on the device.
fn gpu_attention(ctx: &Arc<Context>, inputs: &AttentionInputs) -> Result<Vec<f32>, String> {
    run_attention_inputs(ctx, inputs, None).map_err(|e| e.to_string())
}

/// Runs materialized inputs and requires the output to match their reference; returns it.
fn attend_inputs(
    ctx: &Arc<Context>,
    inputs: &AttentionInputs,
    case: &Case,
    what: &str,
) -> Result<Vec<f64>, TestCaseError> {
    let gpu = gpu_attention(ctx, inputs).map_err(|e| fail(case, format_args!("{what}: run failed: {e}")))?;
    no_validation_messages(ctx, case)?;
    let reference = attention_reference(inputs);
    let outcome = check_attention(inputs, &gpu, &reference);
    verdict(case, &outcome).map_err(|e| TestCaseError::fail(format!("{what} (derived from the case below): {e}")))?;
    Ok(reference)
}

/// Whether two reference outputs are the same bits.
fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The layout of `like`'s family with `n_kv_heads` heads and the same row padding.
fn relayout(like: &CacheLayout, kind: LayoutKind, n_kv_heads: usize) -> CacheLayout {
    let row = match kind {
        LayoutKind::HeadMajor => like.stride_pos,
        LayoutKind::TokenMajor => like.stride_head,
    };
    let pad = row - like.head_dim;
    match kind {
        LayoutKind::HeadMajor => CacheLayout::head_major(like.n_seqs, n_kv_heads, like.capacity, like.head_dim, pad),
        LayoutKind::TokenMajor => CacheLayout::token_major(like.n_seqs, n_kv_heads, like.capacity, like.head_dim, pad),
    }
}

/// The MHA problem logically equal to a GQA one: kv head h of the result is kv head h / ratio of
/// the input, at every position (poison included); padding is NaN.
fn repeat_kv_heads(gqa: &AttentionInputs, kind: LayoutKind) -> AttentionInputs {
    let p = gqa.params;
    let group = p.n_q_heads / p.n_kv_heads;
    let layout = relayout(&p.layout, kind, p.n_q_heads);
    let n = layout.min_elements();
    let nan = encode(p.dtype, f32::NAN);
    let repeat = |src: &[u8]| {
        let mut out = vec![0u8; n * p.dtype.size()];
        for i in 0..n {
            store(p.dtype, &mut out, i, nan);
        }
        for b in 0..p.n_seqs {
            for h in 0..p.n_q_heads {
                for pos in 0..layout.capacity {
                    for d in 0..p.head_dim {
                        let bits = load(p.dtype, src, p.layout.offset(b, h / group, pos, d));
                        store(p.dtype, &mut out, layout.offset(b, h, pos, d), bits);
                    }
                }
            }
        }
        let values = (0..n).map(|i| decode(p.dtype, load(p.dtype, &out, i))).collect::<Vec<f32>>();
        (out, values)
    };
    let ((k_bytes, k), (v_bytes, v)) = (repeat(&gqa.k_bytes), repeat(&gqa.v_bytes));
    assert!(gqa.paged.is_none(), "repeat_kv_heads takes a contiguous cache");
    let params = attention::AttentionParams { n_kv_heads: p.n_q_heads, layout, ..p };
    AttentionInputs { params, k_bytes, v_bytes, k, v, view: layout, ..gqa.clone() }
}

/// Query token `t` of a multi-query problem as a single-query decode: the same cache, Q rows of
/// token t only, and each sequence cut to the positions that token sees.
fn single_query(multi: &AttentionInputs, t: usize) -> AttentionInputs {
    let p = multi.params;
    let row = p.n_q_heads * p.head_dim;
    let q = (0..p.n_seqs).flat_map(|b| multi.q[(b * p.n_queries + t) * row..][..row].iter().copied()).collect();
    let seq_lens = multi.seq_lens.iter().map(|&l| (l as usize + t + 1).saturating_sub(p.n_queries) as u32).collect();
    let params = attention::AttentionParams { n_queries: 1, ..p };
    AttentionInputs { params, q, seq_lens, ..multi.clone() }
}

proptest! {
    #![proptest_config(config(40, 0))]

    /// Decode attention on the device matches the f64 reference within the derived tolerance.
    #[test]
    fn attention_matches_reference(case in attention_case()) {
        let ctx = ctx();
        let wrapped = Case::Attention(case);
        let outcome = run_case(&ctx, &wrapped, None).map_err(|e| fail(&wrapped, format_args!("run failed: {e}")))?;
        verdict(&wrapped, &outcome)?;
    }
}

proptest! {
    #![proptest_config(config(40, 1))]

    /// Append is bit-exact against the reference, and every element outside the written slots
    /// (other positions, other sequences, row padding) still holds its canary bytes.
    #[test]
    fn append_is_bit_exact_and_leaves_other_bytes_untouched(case in append_case()) {
        let ctx = ctx();
        let wrapped = Case::KvAppend(case.clone());
        let (outcome, run) = run_append(&ctx, &case, None).map_err(|e| fail(&wrapped, format_args!("run failed: {e}")))?;
        no_validation_messages(&ctx, &wrapped)?;
        verdict(&wrapped, &outcome)?;
        // Independent of the reference: the canary check from the layout alone.
        let p = run.inputs.params;
        // Units compared: an element, or a q8_0 block of 32 (rows are whole blocks).
        let (elements, size) = if p.dtype == Dtype::Q8_0 { (32, 34) } else { (1, p.dtype.size()) };
        let mut written = vec![false; p.layout.min_elements()];
        for (b, &start) in run.inputs.starts.iter().enumerate() {
            for pos in start as usize..start as usize + p.n_new {
                for h in 0..p.n_kv_heads {
                    let base = match &run.inputs.paged {
                        Some(paged) => paged.offset(b, h, pos, 0),
                        None => p.layout.offset(b, h, pos, 0),
                    };
                    written[base..base + p.head_dim].fill(true);
                }
            }
        }
        for (which, after, before) in [("K", &run.gpu_k, &run.inputs.k_before), ("V", &run.gpu_v, &run.inputs.v_before)] {
            prop_assert_eq!(after.len(), before.len());
            if let Some(i) = (0..written.len() / elements)
                .find(|&i| !written[i * elements] && after[i * size..][..size] != before[i * size..][..size])
            {
                return Err(fail(&wrapped, format_args!(
                    "{which} cache unit {i} (an element, or a q8_0 block), outside every written slot, changed: {:02x?} → {:02x?}",
                    &before[i * size..][..size], &after[i * size..][..size]
                )));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(40, 2))]

    /// Head-major and token-major layouts (each with any padding) of the same logical data give
    /// bit-identical reference outputs, and the kernel matches the reference on both.
    #[test]
    fn both_layouts_match_the_same_reference(case in attention_case(), pad in 0..=9usize) {
        let ctx = ctx();
        let mut other = case.clone();
        other.layout = match case.layout {
            LayoutKind::HeadMajor => LayoutKind::TokenMajor,
            LayoutKind::TokenMajor => LayoutKind::HeadMajor,
        };
        other.pad = pad;
        other.fit_q8_0(); // q8_0 rows are whole blocks
        let (a, b) = (attend(&ctx, &case)?, attend(&ctx, &other)?);
        if !same_bits(&a.reference, &b.reference) {
            let what = format!(
                "the reference output changed with the layout ({} → {}, pad {} → {pad}) of the same data",
                case.layout.name(), other.layout.name(), case.pad
            );
            return Err(fail(&Case::Attention(other), what));
        }
    }
}

proptest! {
    #![proptest_config(config(16, 9))]

    /// Paging moves elements, never values: a case on a paged cache (any page size, table order
    /// and spare pages) and its contiguous twin hold the same logical values, so their reference
    /// outputs are bit-identical, and the kernel matches the reference on both.
    #[test]
    fn paged_equals_contiguous(case in attention_case(), paged in paged()) {
        let contiguous = AttentionCase { paged: None, ..case };
        // Shared pages hold one sequence's values for all: the twin would differ.
        let paged = paged.or(Some(Paged { page_size: 16, order: PageOrder::Shuffled, shared_pages: 0, spare_pages: 1 }))
            .map(|p| Paged { shared_pages: 0, ..p });
        let paged_case = AttentionCase { paged, ..contiguous.clone() };
        let ctx = ctx();
        let (a, b) = (attend(&ctx, &contiguous)?, attend(&ctx, &paged_case)?);
        if !same_bits(&a.reference, &b.reference) {
            return Err(fail(&Case::Attention(paged_case), "the reference output changed with paging of the same data"));
        }
    }
}

proptest! {
    #![proptest_config(config(40, 3))]

    /// Poison kind (NaN, Inf, garbage, zeros) in the slots the kernel must not read changes
    /// neither the reference nor a single output bit, and every variant matches the reference.
    #[test]
    fn poison_kind_does_not_leak_into_the_output(case in attention_case()) {
        let ctx = ctx();
        let mut runs = Vec::new();
        for poison in [Poison::Zero, Poison::Nan, Poison::Inf, Poison::Garbage] {
            let mut variant = case.clone();
            variant.data.poison = poison;
            let run = attend(&ctx, &variant)?;
            runs.push((variant, run));
        }
        let (clean, first) = &runs[0];
        for (variant, run) in &runs[1..] {
            if !same_bits(&first.reference, &run.reference) {
                return Err(fail(&Case::Attention(variant.clone()), "the reference output depends on the poison"));
            }
            if let Some(i) = (0..first.gpu.len()).find(|&i| first.gpu[i].to_bits() != run.gpu[i].to_bits()) {
                return Err(fail(&Case::Attention(variant.clone()), format_args!(
                    "poison {:?} leaked: output element {i} is {:e}, {:e} with {:?}",
                    variant.data.poison, run.gpu[i], first.gpu[i], clean.data.poison
                )));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(24, 4))]

    /// Any case made fused: the fused kernel and append → barrier → attend both match the
    /// reference, and both leave exactly the expected caches.
    #[test]
    fn fused_equals_append_then_attend(case in attention_case()) {
        prop_assume!(case.dtype != Dtype::Q8_0, "q8_0 caches are not fused");
        let nq = case.n_queries.min(case.capacity);
        let seq_lens: Vec<usize> = case.seq_lens.iter().map(|&l| l.max(nq)).collect();
        let mut paged = case.paged;
        if let Some(paged) = &mut paged {
            // The new tokens must not land in shared pages.
            paged.clamp_shared(case.capacity, seq_lens.iter().map(|&l| l - nq).min());
        }
        let case = AttentionCase { fused: true, n_queries: nq, seq_lens, paged, ..case };
        let ctx = ctx();
        let wrapped = Case::Attention(case.clone());
        attend(&ctx, &case)?;
        let inputs = attention_inputs(&case).map_err(|e| fail(&wrapped, e))?;
        let unfused = run_append_then_attend(&ctx, &inputs).map_err(|e| fail(&wrapped, format_args!("append then attend: {e}")))?;
        no_validation_messages(&ctx, &wrapped)?;
        let outcome = check_attention(&inputs, &unfused.out, &attention_reference(&inputs));
        verdict(&wrapped, &outcome).map_err(|e| TestCaseError::fail(format!("append then attend: {e}")))?;
        let expected = inputs.fused.as_ref().map(|f| (f.k_after.clone(), f.v_after.clone()));
        prop_assert!(unfused.caches_after == expected, "append then attend left other caches\n{}", replayable(&wrapped));
    }
}

proptest! {
    #![proptest_config(config(24, 5))]

    /// GQA equals MHA with each kv head repeated for its query heads: the MHA problem built from
    /// the same values has a bit-identical reference output, and the kernel matches the
    /// reference on both.
    #[test]
    fn gqa_equals_mha_with_repeated_kv_heads(case in attention_case()) {
        // The relation rebuilds a contiguous float cache by hand; fused inputs live outside it.
        prop_assume!(case.dtype != Dtype::Q8_0);
        let case = AttentionCase { fused: false, paged: None, ..case };
        let ratio = case.n_q_heads / case.n_kv_heads;
        prop_assume!(ratio > 1);
        // The MHA cache has n_q_heads heads; keep it small.
        let elements = case.seq_lens.len() * case.n_q_heads * case.capacity * (case.head_dim + case.pad);
        prop_assume!(elements <= 4 << 20);
        let ctx = ctx();
        let wrapped = Case::Attention(case.clone());
        let gqa = attend(&ctx, &case)?;
        let mha = repeat_kv_heads(&gqa.inputs, case.layout);
        let mha_reference = attend_inputs(&ctx, &mha, &wrapped, "the MHA problem with repeated kv heads")?;
        if !same_bits(&gqa.reference, &mha_reference) {
            return Err(fail(&wrapped, format_args!(
                "the reference differs between GQA (ratio {ratio}) and MHA with repeated kv heads"
            )));
        }
    }
}

proptest! {
    #![proptest_config(config(24, 6))]

    /// The split-K chunk count does not change the result beyond the tolerance: the same inputs
    /// with the automatic split, the finest split (64 positions a chunk) and one chunk all match
    /// the reference.
    #[test]
    fn split_count_does_not_change_the_result(case in attention_case(), chunk in 1..=5usize) {
        let ctx = ctx();
        let wrapped = Case::Attention(case.clone());
        let inputs = attention_inputs(&case).map_err(|e| fail(&wrapped, e))?;
        let one_chunk = case.capacity.next_multiple_of(CHUNK_TILE);
        for split in [None, Some(CHUNK_TILE), Some(chunk * CHUNK_TILE), Some(one_chunk)] {
            let mut split_inputs = inputs.clone();
            split_inputs.params.split_chunk = split;
            let (size, chunks) = split_inputs.params.split(ctx.info());
            attend_inputs(&ctx, &split_inputs, &wrapped, &format!("split into {chunks} chunk(s) of {size}"))?;
        }
    }
}

proptest! {
    #![proptest_config(config(24, 7))]

    /// Query token t of a multi-query case equals a single-query decode at its position (the
    /// same cache, sequences cut to the positions it sees): the reference rows are bit-identical
    /// and the kernel matches the reference on both.
    #[test]
    fn multi_query_row_equals_single_query_decode(case in attention_case(), t in any::<Index>()) {
        // The relation cuts sequences by hand; fused inputs live outside the cache.
        let case = AttentionCase { fused: false, ..case };
        prop_assume!(case.n_queries > 1);
        let ctx = ctx();
        let wrapped = Case::Attention(case.clone());
        let multi = attend(&ctx, &case)?;
        let t = t.index(case.n_queries);
        let single = single_query(&multi.inputs, t);
        let single_reference = attend_inputs(&ctx, &single, &wrapped, &format!("query {t} alone"))?;
        let p = multi.inputs.params;
        let row = p.n_q_heads * p.head_dim;
        for b in 0..p.n_seqs {
            let want = &multi.reference[(b * p.n_queries + t) * row..][..row];
            if !same_bits(want, &single_reference[b * row..][..row]) {
                return Err(fail(&wrapped, format_args!(
                    "sequence {b}: the reference of query {t} differs from a single-query decode at its position"
                )));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(1000, 8))]

    /// Every generated case is valid (for `params()` and for the device), survives a JSON round
    /// trip unchanged (so it can go to the corpus as is), and attention cases stay within the
    /// default work limit.
    #[test]
    fn generated_cases_are_valid(case in any_case()) {
        let ctx = ctx();
        let json = serde_json::to_string(&case).map_err(|e| fail(&case, e))?;
        let back: Case = serde_json::from_str(&json).map_err(|e| fail(&case, e))?;
        prop_assert_eq!(&back, &case, "the JSON round trip changed the case");
        match &case {
            Case::Attention(c) => {
                let p = c.params().map_err(|e| fail(&case, e))?;
                p.validate(&ctx).map_err(|e| fail(&case, e))?;
                let lens: Vec<u32> = c.seq_lens.iter().map(|&l| l as u32).collect();
                p.validate_seq_lens(&lens).map_err(|e| fail(&case, e))?;
                prop_assert!(attention_work(c) <= AttentionLimits::default().max_work, "work {}", attention_work(c));
            }
            Case::KvAppend(c) => {
                let p = c.params().map_err(|e| fail(&case, e))?;
                p.validate(&ctx).map_err(|e| fail(&case, e))?;
                let starts: Vec<u32> = c.starts.iter().map(|&s| s as u32).collect();
                p.validate_starts(&starts).map_err(|e| fail(&case, e))?;
            }
        }
    }
}

fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n).map(|_| strategy.new_tree(&mut runner).expect("strategies never reject").current()).collect()
}

fn normal_std(dist: Dist) -> f32 {
    match dist {
        Dist::Normal { std, .. } => std,
        Dist::Uniform { lo, hi } => (hi - lo) / 12f32.sqrt(),
    }
}

/// The strategies reach the triggers of every bug in ANCHORS.md ("Bugs these kernels have had").
#[test]
fn strategies_reach_the_edge_triggers() {
    let cases = sample(attention_case(), 2000);
    let mut missing = Vec::new();
    let mut need = |what: &str, found: bool| {
        if !found {
            missing.push(what.to_string());
        }
    };
    let any = |f: &dyn Fn(&AttentionCase) -> bool| cases.iter().any(f);
    let dtypes: BTreeSet<&str> = cases.iter().map(|c| c.dtype.name()).collect();
    need("every dtype, q8_0 included", dtypes.len() == Dtype::ALL.len() + 1);
    for kind in [LayoutKind::HeadMajor, LayoutKind::TokenMajor] {
        need(&format!("{} with padding", kind.name()), any(&|c| c.layout == kind && c.pad > 0));
        need(&format!("{} without padding", kind.name()), any(&|c| c.layout == kind && c.pad == 0));
    }
    let ratio = |c: &AttentionCase| c.n_q_heads / c.n_kv_heads;
    need("MHA (GQA ratio 1)", any(&|c| ratio(c) == 1));
    need("GQA ratio 16", any(&|c| ratio(c) == 16));
    need("GQA ratio 32", any(&|c| ratio(c) == 32));
    need("GQA with several kv heads", any(&|c| ratio(c) > 1 && c.n_kv_heads > 1));
    for d in [256, 80, 96, 112, 64] {
        need(&format!("head_dim {d}"), any(&|c| c.head_dim == d));
    }
    need("a head_dim that is not a multiple of 16", any(&|c| !c.head_dim.is_multiple_of(16)));
    need("a fully masked row (seq_len < n_queries)", any(&|c| c.seq_lens.iter().any(|&l| l > 0 && l < c.n_queries)));
    need("an empty sequence", any(&|c| c.seq_lens.contains(&0)));
    need("8 query tokens", any(&|c| c.n_queries == 8));
    need("a ragged batch of 4", any(&|c| c.seq_lens.iter().collect::<BTreeSet<_>>().len() == 4));
    for lens in [[63, 64, 65], [127, 128, 129]] {
        need(&format!("a length in {lens:?}"), any(&|c| c.seq_lens.iter().any(|l| lens.contains(l))));
    }
    need("length 1", any(&|c| c.seq_lens.contains(&1)));
    need("a prime length past a tile", any(&|c| c.seq_lens.iter().any(|l| [97, 113, 131, 193, 257].contains(l))));
    need("a length past 256", any(&|c| c.seq_lens.iter().any(|&l| l > 256)));
    for poison in [Poison::Nan, Poison::Inf, Poison::Garbage] {
        need(&format!("{poison:?} poison"), any(&|c| c.data.poison == poison));
    }
    need("unused slots (capacity > seq_len)", any(&|c| c.seq_lens.iter().any(|&l| l < c.capacity)));
    // Logit std = scale·sqrt(D)·σq·σk; at 30 the largest logits pass exp's f32 range (~88).
    let logit_std = |c: &AttentionCase| {
        let scale = c.scale.unwrap_or(1.0 / (c.head_dim as f32).sqrt());
        scale * (c.head_dim as f32).sqrt() * normal_std(c.data.q) * normal_std(c.data.k)
    };
    need("huge logits", any(&|c| logit_std(c) >= 30.0 && c.seq_lens.iter().any(|&l| l >= 8)));
    need("keys past f16's range of products", any(&|c| normal_std(c.data.k) >= 64.0));
    need(
        "a visible dominant position",
        any(&|c| c.data.peak.is_some_and(|p| c.seq_lens.iter().any(|&l| p.position < l))),
    );
    need("large-offset values", any(&|c| matches!(c.data.v, Dist::Normal { mean, .. } if mean.abs() >= 1000.0)));
    need("tiny values", any(&|c| normal_std(c.data.v) <= 1e-20));
    need("a custom scale", any(&|c| c.scale.is_some()));
    let limit = AttentionLimits::default().max_work;
    need("every case within the work limit", cases.iter().all(|c| attention_work(c) <= limit));

    let appends = sample(append_case(), 1000);
    let any_append = |f: &dyn Fn(&vkdecode::cases::AppendCase) -> bool| appends.iter().any(f);
    for dtype in Dtype::ALL {
        need(&format!("{dtype} append"), any_append(&|c| c.dtype == dtype));
    }
    need("a sliding window", any(&|c| c.window.is_some()));
    need("a logit softcap", any(&|c| c.softcap.is_some()));
    need("attention sinks", any(&|c| c.sinks.is_some()));
    need("a fused append + attend", any(&|c| c.fused));
    need("a forced split-K chunk", any(&|c| c.split_chunk.is_some()));
    need("append into the last slots", any_append(&|c| c.starts.iter().any(|&s| s + c.n_new == c.capacity)));
    need("append at 0 with room after", any_append(&|c| c.starts.contains(&0) && c.capacity > c.n_new));
    need("append of 8 tokens", any_append(&|c| c.n_new == 8));
    need("append with 8 kv heads", any_append(&|c| c.n_kv_heads == 8));
    need("append with padding", any_append(&|c| c.pad > 0 && c.layout == LayoutKind::TokenMajor));
    need("hostile append values", any_append(&|c| c.data.values == AppendValues::Hostile));
    need("normal append values", any_append(&|c| c.data.values == AppendValues::Normal));
    need("append of several sequences", any_append(&|c| c.starts.len() == 4));
    let page = |c: &AttentionCase| c.paged.map_or(0, |p| p.page_size);
    need("a contiguous cache", any(&|c| c.paged.is_none()));
    need("pages of 8", any(&|c| page(c) == 8));
    need("pages of 64 (the kernel tile)", any(&|c| page(c) == 64));
    need("pages that do not divide the tile", any(&|c| page(c) > 0 && !64usize.is_multiple_of(page(c))));
    need(
        "a page shared by every sequence",
        any(&|c| c.paged.is_some_and(|p| p.shared_pages > 0) && c.seq_lens.len() > 1),
    );
    need("a reversed block table", any(&|c| c.paged.is_some_and(|p| p.order == PageOrder::Reverse)));
    need("a paged fused append + attend", any(&|c| c.fused && c.paged.is_some()));
    need("a paged forced split", any(&|c| c.split_chunk.is_some() && c.paged.is_some()));
    need("a paged append", any_append(&|c| c.paged.is_some()));
    need("a q8_0 cache", any(&|c| c.dtype == Dtype::Q8_0));
    need("a paged q8_0 cache", any(&|c| c.dtype == Dtype::Q8_0 && c.paged.is_some()));
    need("q8_0 with padded rows", any(&|c| c.dtype == Dtype::Q8_0 && c.pad > 0));
    need(
        "a q8_0 append of hostile blocks",
        any_append(&|c| c.dtype == Dtype::Q8_0 && c.data.values == AppendValues::Hostile),
    );
    need("a paged append beside shared pages", any_append(&|c| c.paged.is_some_and(|p| p.shared_pages > 0)));
    assert!(missing.is_empty(), "the strategies never produced: {}", missing.join("; "));
}
