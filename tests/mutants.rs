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

/// Runs the grid and corpus cases of the mutant's kernel in order until one fails; returns its
/// name and how many cases ran. The clean kernel passes every one of these cases (the
/// conformance suite), so a failure here is the mutant's doing.
fn first_catch(mutant: Mutant) -> Option<(String, usize)> {
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
    for (ran, (name, case)) in cases.enumerate() {
        let case: Case = case;
        let outcome = run_case(&ctx, &case, Some(mutant)).expect("mutant runs without a device error");
        if !outcome.passed {
            return Some((name, ran + 1));
        }
    }
    None
}

#[track_caller]
fn assert_caught(mutant: Mutant) {
    match first_catch(mutant) {
        Some((name, ran)) => eprintln!("{} caught by {name} (case {ran} of the grid + corpus)", mutant.name()),
        None => panic!("mutant {} passed every grid and corpus case", mutant.name()),
    }
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

#[test]
fn attention_page_index_off_by_one_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::PageIndexOffByOne));
}

#[test]
fn attention_page_size_from_the_wrong_constant_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::PageSizeWrongConstant));
}

#[test]
fn append_page_off_by_one_is_caught() {
    assert_caught(Mutant::Append(AppendMutant::PageOffByOne));
}

#[test]
fn attention_q8_0_scale_of_the_next_block_is_caught() {
    assert_caught(Mutant::Attention(AttentionMutant::Q8NeighbourScale));
}

#[test]
fn append_q8_0_ties_rounded_to_even_are_caught() {
    assert_caught(Mutant::Append(AppendMutant::Q8RoundHalfEven));
}
