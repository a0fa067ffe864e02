//! The suite proves its power: every deliberately broken kernel (a mutant, selected by a
//! specialization constant) must fail at least one case of the built-in grid or the corpus.
//! Each mutant is its own test, so a report says exactly which one slipped through.

use vkdecode::cases::corpus::{default_corpus_dir, load_corpus};
use vkdecode::cases::grid::grid;
use vkdecode::cases::{Case, Expect, run_case};
use vkdecode::gpu::Context;
use vkdecode::kernels::Mutant;
use vkdecode::kernels::attention::AttentionMutant;
use vkdecode::kernels::kv_append::AppendMutant;

/// Runs every grid and corpus case of the mutant's kernel; returns the names of those it failed.
fn catches(mutant: Mutant) -> Vec<String> {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let kernel = match mutant {
        Mutant::Attention(_) => "attention",
        Mutant::Append(_) => "kv_append",
    };
    let corpus = load_corpus(&default_corpus_dir()).expect("corpus loads");
    let cases = grid()
        .into_iter()
        .map(|g| (g.name, g.case))
        .chain(corpus.into_iter().map(|e| (e.name, e.case)))
        .filter(|(_, c)| c.kernel() == kernel && c.expect() == Expect::Pass);
    let mut caught = Vec::new();
    for (name, case) in cases {
        let case: Case = case;
        let outcome = run_case(&ctx, &case, Some(mutant)).expect("mutant runs without a device error");
        if !outcome.passed {
            caught.push(name);
        }
    }
    // The clean kernels must pass the same cases (else "caught" would mean nothing).
    assert!(ctx.take_validation_messages().is_empty());
    caught
}

#[track_caller]
fn assert_caught(mutant: Mutant) {
    let caught = catches(mutant);
    assert!(!caught.is_empty(), "mutant {} passed every grid and corpus case", mutant.name());
    eprintln!(
        "{} caught by {} case(s), e.g. {}",
        mutant.name(),
        caught.len(),
        caught[..caught.len().min(3)].join(", ")
    );
}

#[test]
fn attention_causal_off_by_one_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::CausalOffByOne));
}

#[test]
fn attention_gqa_modulo_mapping_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::GqaModulo));
}

#[test]
fn attention_missing_max_subtraction_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::NoMaxSubtract));
}

#[test]
fn attention_f16_accumulation_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::F16Accumulate));
}

#[test]
fn attention_v_dtype_misread_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::VMisread));
}

#[test]
fn append_slot_off_by_one_is_caught() {
    assert_caught(Mutant::Append(AppendMutant::SlotOffByOne));
}

#[test]
fn append_truncation_is_caught() {
    assert_caught(Mutant::Append(AppendMutant::Truncate));
}

#[test]
fn attention_split_merge_without_rescale_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::MergeNoRescale));
}

#[test]
fn attention_fused_read_of_the_slot_being_written_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::FusedReadsCache));
}

#[test]
fn attention_split_chunk_boundary_off_by_one_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::ChunkOverlap));
}
