//! Proptest strategies for kernel cases, shared by `tests/properties.rs` and the fuzzer.
//!
//! Every strategy yields values of the JSON case model ([`AttentionCase`], [`AppendCase`],
//! [`Case`]), so a failing draw can be written to `corpus/` as is and replayed with
//! `vkdecode replay FILE`. Every value they produce passes `params()`.
//!
//! # Design
//! - **Raw draws, then one deterministic mapping.** Each field is drawn independently (lengths
//!   and positions *relative* to the capacity: "full", "zero", "a fraction", "the last slot"), and
//!   a single `prop_map` turns the draws into a valid case. No `prop_flat_map` and no filtering, so
//!   every field shrinks on its own and shrinking never leaves the valid space.
//! - **Shrinking goes to simple values**: the first alternative of every `prop_oneof!` is the
//!   simplest (f32, head-major without padding, NaN poison, standard normal values, full-length
//!   sequences, the default scale), integers shrink towards their lower bound, seeds towards 0.
//! - **Edge triggers are weighted in**, not left to chance (see ANCHORS.md, "Bugs these kernels
//!   have had"): cache lengths around the kernel tile (63/64/65, 127/128/129) and primes, rows
//!   with no visible position (seq_len < n_queries) and empty sequences, GQA ratios up to 32
//!   (16 included), head dims off the power-of-two path (8, 24, 40, 72, 80, 96, 112), padded
//!   strides in both layouts, garbage poison in unused slots, logits far past exp's f32 range, one
//!   dominant position, values at a large offset and tiny values.
//! - **Cheap by construction**: an attention case's work ([`attention_work`]) is capped by its
//!   [`AttentionLimits`]; the mapping drops kv heads, then sequences, then query tokens, then the
//!   GQA ratio until it fits, so a default draw runs in milliseconds on lavapipe.
//! - **JSON-exact floats**: every drawn f32 is a short dyadic fraction (or a short decimal), so
//!   the case's JSON reads well and parses back to the identical case.

use proptest::prelude::*;
use proptest::sample::select;

use super::model::{
    AppendCase, AppendData, AppendValues, AttentionCase, AttentionData, Case, Dist, Expect, LayoutKind, PageOrder,
    Paged, Peak, Poison,
};
use crate::kernels::Dtype;

/// The attention kernel's tile: positions are processed in blocks of this many.
pub const TILE: usize = 64;

/// Head dims of the kernel contract (64..=256 in steps of 16, which includes 80, 96 and 112).
pub const CONTRACT_HEAD_DIMS: [usize; 13] = [64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256];

/// Smaller or odd multiples of 8 the kernels accept too (llama.cpp tests 40 and 72).
pub const ODD_HEAD_DIMS: [usize; 7] = [8, 16, 24, 32, 40, 48, 72];

/// GQA ratios (query heads per kv head) drawn: llama.cpp's grid plus 2, 3 and 6.
pub const GQA_RATIOS: [usize; 10] = [1, 2, 3, 4, 6, 8, 12, 16, 20, 32];

/// Cache lengths and capacities that have broken kernels: 1, both sides of one and two tiles, and
/// primes (no tile divides them).
pub const EDGE_LENGTHS: [usize; 13] = [1, 2, 63, 64, 65, 127, 128, 129, 97, 113, 131, 193, 257];

/// Bounds on the attention cases [`attention_case_within`] draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLimits {
    /// Largest capacity drawn uniformly (edge lengths from [`EDGE_LENGTHS`] are drawn besides,
    /// when they fit).
    pub max_capacity: usize,
    /// Largest [`attention_work`] of a case.
    pub max_work: usize,
}

impl Default for AttentionLimits {
    /// Cheap cases: a few million multiply-adds at most, capacities up to 300.
    fn default() -> Self {
        AttentionLimits { max_capacity: 300, max_work: 3_000_000 }
    }
}

/// Multiply-adds of the Q·K pass of a case: Σ_b seq_len_b · n_queries · n_q_heads · head_dim (the
/// P·V pass does as many again). What [`AttentionLimits::max_work`] bounds.
pub fn attention_work(case: &AttentionCase) -> usize {
    let positions: usize = case.seq_lens.iter().sum();
    positions * case.n_queries * case.n_q_heads * case.head_dim
}

/// Any cache dtype, q8_0 one draw in five, shrinking to f32. A q8_0 draw is made valid by the
/// case's `fit_q8_0`.
pub fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![4 => select(Dtype::ALL.to_vec()), 1 => Just(Dtype::Q8_0)]
}

/// A head dim the kernels take: mostly from the contract, sometimes a small or odd multiple of 8.
/// Shrinks towards 64.
pub fn head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => select(CONTRACT_HEAD_DIMS.to_vec()),
        1 => select(ODD_HEAD_DIMS.to_vec()),
    ]
}

/// A GQA ratio from [`GQA_RATIOS`], shrinking towards 1 (MHA).
pub fn gqa_ratio() -> impl Strategy<Value = usize> {
    select(GQA_RATIOS.to_vec())
}

/// A cache layout family and its row padding (0..=9 elements), shrinking to head-major, no pad.
pub fn layout() -> impl Strategy<Value = (LayoutKind, usize)> {
    (select(vec![LayoutKind::HeadMajor, LayoutKind::TokenMajor]), prop_oneof![2 => Just(0usize), 3 => 1..=9usize])
}

/// A paged cache (one draw in five): a page size (small ones and the kernel tile weighted in, so
/// pages and split-K chunks cut each other), the order of page ids, a wish for shared prefix
/// pages (clamped by [`Paged::clamp_shared`] to what the case allows) and 0..=2 spare pages.
/// Shrinks to a contiguous cache.
pub fn paged() -> impl Strategy<Value = Option<Paged>> {
    let page_size = prop_oneof![3 => select(vec![8usize, 16, 24, 32, 64]), 1 => (1..=32usize).prop_map(|k| 8 * k)];
    let order = select(vec![PageOrder::Shuffled, PageOrder::Ascending, PageOrder::Reverse]);
    let shared = prop_oneof![3 => Just(0usize), 1 => 1..=3usize];
    let draw = (page_size, order, shared, 0..=2usize).prop_map(|(page_size, order, shared_pages, spare_pages)| Paged {
        page_size,
        order,
        shared_pages,
        spare_pages,
    });
    prop_oneof![4 => Just(None), 1 => draw.prop_map(Some)]
}

/// What fills the slots the kernel must not read: NaN, Inf or random bit patterns.
pub fn poison() -> impl Strategy<Value = Poison> {
    select(vec![Poison::Nan, Poison::Inf, Poison::Garbage])
}

/// A capacity in `1..=max`, with weight on the lengths of [`EDGE_LENGTHS`] that fit.
pub fn capacity(max: usize) -> impl Strategy<Value = usize> {
    let max = max.max(1);
    let mut edges: Vec<usize> = EDGE_LENGTHS.iter().copied().filter(|&l| l <= max).collect();
    edges.push(max);
    prop_oneof![3 => 1..=max, 2 => select(edges)]
}

/// A sequence length relative to the capacity, so that it stays valid as the capacity shrinks.
#[derive(Clone, Copy, Debug)]
enum LenDraw {
    Full,
    /// `per_mille`/1000 of the capacity.
    Fraction(u16),
    /// The edge length of this index (clamped to the capacity).
    Edge(usize),
    /// A short length 0..=8 (below n_queries, some rows see nothing).
    Short(usize),
    Zero,
}

impl LenDraw {
    fn resolve(self, capacity: usize) -> usize {
        match self {
            LenDraw::Full => capacity,
            LenDraw::Fraction(per_mille) => capacity * usize::from(per_mille) / 1000,
            LenDraw::Edge(i) => EDGE_LENGTHS[i].min(capacity),
            LenDraw::Short(n) => n.min(capacity),
            LenDraw::Zero => 0,
        }
    }
}

fn len_draw() -> impl Strategy<Value = LenDraw> {
    prop_oneof![
        3 => Just(LenDraw::Full),
        3 => (0..=1000u16).prop_map(LenDraw::Fraction),
        2 => (0..EDGE_LENGTHS.len()).prop_map(LenDraw::Edge),
        1 => (0..=8usize).prop_map(LenDraw::Short),
        1 => Just(LenDraw::Zero),
    ]
}

/// How the values of an attention case are drawn.
#[derive(Clone, Copy, Debug)]
enum Regime {
    /// q, k, v standard normal.
    Normal,
    /// Logits far past exp's f32 range (q and k with large std; sometimes keys large enough that
    /// an f16 Q·K dot would overflow).
    HugeLogits { q_std: f32, k_std: f32 },
    /// One dominant position (`per_mille` of the longest sequence) with key = gain × query.
    Peak { per_mille: u16, gain: f32 },
    /// Values far from zero (mean ±1000, std 1), with flat (tiny q) or normal attention.
    LargeOffset { v_mean: f32, q_std: f32 },
    /// Tiny values, down to near the f32 denormal range.
    Tiny { v_std: f32 },
}

/// A dyadic fraction `lo..=hi` in steps of 1/`den`: exact in f32 and in JSON.
fn dyadic(lo: f32, hi: f32, den: u32) -> impl Strategy<Value = f32> {
    let (a, b) = ((lo * den as f32) as u32, (hi * den as f32) as u32);
    (a..=b).prop_map(move |n| n as f32 / den as f32)
}

fn regime() -> impl Strategy<Value = Regime> {
    prop_oneof![
        4 => Just(Regime::Normal),
        2 => (dyadic(4.0, 8.0, 8), prop_oneof![3 => dyadic(4.0, 8.0, 8), 1 => dyadic(64.0, 256.0, 1)])
            .prop_map(|(q_std, k_std)| Regime::HugeLogits { q_std, k_std }),
        2 => (0..=1000u16, dyadic(2.0, 8.0, 8)).prop_map(|(per_mille, gain)| Regime::Peak { per_mille, gain }),
        1 => (select(vec![1000.0f32, -1000.0]), select(vec![1.0f32, 0.015625]))
            .prop_map(|(v_mean, q_std)| Regime::LargeOffset { v_mean, q_std }),
        1 => select(vec![1e-3f32, 1e-8, 1e-20, 1e-30]).prop_map(|v_std| Regime::Tiny { v_std }),
    ]
}

/// The softmax scale: mostly the default 1/sqrt(head_dim), else a positive scale in (0, 1.5].
fn scale() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![3 => Just(None), 1 => (1..=1536u32).prop_map(|n| Some(n as f32 / 1024.0))]
}

/// The options beyond the causal mask, each off most of the time so plain cases stay common.
#[derive(Clone, Copy, Debug)]
struct OptionsDraw {
    /// Sliding window, as `per_mille` of the capacity (at least 1 position).
    window: Option<u16>,
    softcap: Option<f32>,
    /// Sink logits: normal with this std (sometimes far above the scores).
    sinks: Option<f32>,
    fused: bool,
    /// Split-K chunk as a multiple of 64.
    split_chunk: Option<usize>,
}

fn options() -> impl Strategy<Value = OptionsDraw> {
    let window = prop_oneof![4 => Just(None), 1 => (0..=1000u16).prop_map(Some)];
    let softcap = prop_oneof![4 => Just(None), 1 => select(vec![1.0f32, 5.0, 30.0, 50.0]).prop_map(Some)];
    let sinks = prop_oneof![4 => Just(None), 1 => select(vec![1.0f32, 4.0, 16.0]).prop_map(Some)];
    let fused = prop_oneof![3 => Just(false), 1 => Just(true)];
    let split = prop_oneof![3 => Just(None), 1 => (1..=4usize).prop_map(|k| Some(64 * k))];
    (window, softcap, sinks, fused, split).prop_map(|(window, softcap, sinks, fused, split_chunk)| OptionsDraw {
        window,
        softcap,
        sinks,
        fused,
        split_chunk,
    })
}

fn normal(std: f32) -> Dist {
    Dist::Normal { mean: 0.0, std }
}

/// The raw draws of one attention case, before the mapping that makes them valid and cheap.
#[derive(Clone, Debug)]
struct AttentionDraw {
    dtype: Dtype,
    head_dim: usize,
    n_kv_heads: usize,
    ratio: usize,
    n_queries: usize,
    capacity: usize,
    lens: Vec<LenDraw>,
    layout: (LayoutKind, usize),
    paged: Option<Paged>,
    poison: Poison,
    regime: Regime,
    scale: Option<f32>,
    options: OptionsDraw,
    seed: u64,
}

impl AttentionDraw {
    fn into_case(self, limits: AttentionLimits) -> AttentionCase {
        let capacity = self.capacity;
        let mut case = AttentionCase {
            description: String::new(),
            dtype: self.dtype,
            n_q_heads: self.n_kv_heads * self.ratio,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            n_queries: self.n_queries,
            seq_lens: self.lens.iter().map(|l| l.resolve(capacity)).collect(),
            capacity,
            layout: self.layout.0,
            pad: self.layout.1,
            paged: self.paged,
            scale: self.scale,
            window: self.options.window.map(|w| (capacity * usize::from(w) / 1000).max(1)),
            softcap: self.options.softcap,
            sinks: self.options.sinks.map(normal),
            fused: self.options.fused,
            split_chunk: self.options.split_chunk,
            data: AttentionData {
                seed: self.seed,
                q: Dist::default(),
                k: Dist::default(),
                v: Dist::default(),
                peak: None,
                poison: self.poison,
            },
            expect: Expect::Pass,
        };
        // A fused step appends n_queries tokens, so every sequence holds at least that many.
        if case.fused {
            case.n_queries = case.n_queries.min(capacity);
            let nq = case.n_queries;
            case.seq_lens.iter_mut().for_each(|l| *l = (*l).max(nq));
        }
        case.fit_q8_0();
        fit_work(&mut case, limits.max_work);
        if let Some(paged) = &mut case.paged {
            // A fused step writes its new tokens; they must not land in shared pages.
            let writes = case.fused.then(|| case.seq_lens.iter().map(|&l| l - case.n_queries).min().unwrap_or(0));
            paged.clamp_shared(capacity, writes);
        }
        let d = &mut case.data;
        let regime = match self.regime {
            Regime::Normal => "normal values",
            Regime::HugeLogits { q_std, k_std } => {
                (d.q, d.k) = (normal(q_std), normal(k_std));
                "huge logits"
            }
            Regime::Peak { per_mille, gain } => {
                // Inside the longest sequence when there is one, so the peak is visible.
                let longest = case.seq_lens.iter().copied().max().unwrap_or(0);
                let span = if longest > 0 { longest } else { capacity };
                let position = (span * usize::from(per_mille) / 1000).min(span - 1);
                d.peak = Some(Peak { position, gain });
                "one dominant position"
            }
            Regime::LargeOffset { v_mean, q_std } => {
                (d.q, d.v) = (normal(q_std), Dist::Normal { mean: v_mean, std: 1.0 });
                "values at a large offset"
            }
            Regime::Tiny { v_std } => {
                (d.q, d.k, d.v) = (normal(1e-3), normal(1e-3), normal(v_std));
                "tiny values"
            }
        };
        case.description = format!("proptest: {regime}");
        case.fit_q8_0(); // again: the regime's distributions
        case
    }
}

/// Shrinks a case until [`attention_work`] ≤ `max_work`: first kv heads, then sequences from the
/// end, then query tokens, then the GQA ratio (the rarest draws go last). It stops at one of
/// each (at most capacity × 256 multiply-adds, far below the default limit).
fn fit_work(case: &mut AttentionCase, max_work: usize) {
    while attention_work(case) > max_work {
        let ratio = case.n_q_heads / case.n_kv_heads;
        if case.n_kv_heads > 1 {
            case.n_kv_heads -= 1;
        } else if case.seq_lens.len() > 1 {
            case.seq_lens.pop();
            continue;
        } else if case.n_queries > 1 {
            case.n_queries -= 1;
            continue;
        } else if let Some(&smaller) = GQA_RATIOS.iter().rev().find(|&&r| r < ratio) {
            case.n_q_heads = smaller;
            continue;
        } else {
            return;
        }
        case.n_q_heads = case.n_kv_heads * ratio;
    }
}

/// Attention cases within the default [`AttentionLimits`].
pub fn attention_case() -> impl Strategy<Value = AttentionCase> {
    attention_case_within(AttentionLimits::default())
}

/// Attention cases: any dtype, head dim ([`head_dim`]), 1..=4 kv heads, GQA ratio
/// ([`gqa_ratio`]), 1..=8 query tokens, 1..=4 sequences of ragged lengths in `0..=capacity`,
/// either layout with padding, NaN/Inf/garbage poison, one value regime (normal, huge logits, a
/// dominant position, large-offset values, tiny values) and the default or a random scale.
pub fn attention_case_within(limits: AttentionLimits) -> impl Strategy<Value = AttentionCase> {
    let shape = (head_dim(), 1..=4usize, gqa_ratio(), 1..=8usize, capacity(limits.max_capacity));
    let lens = proptest::collection::vec(len_draw(), 1..=4);
    let values = (poison(), regime(), scale(), options(), any::<u64>(), paged());
    (dtype(), shape, lens, layout(), values).prop_map(
        move |(dtype, (head_dim, n_kv_heads, ratio, n_queries, capacity), lens, layout, values)| {
            let (poison, regime, scale, options, seed, paged) = values;
            AttentionDraw {
                dtype,
                head_dim,
                n_kv_heads,
                ratio,
                n_queries,
                capacity,
                lens,
                layout,
                paged,
                poison,
                regime,
                scale,
                options,
                seed,
            }
            .into_case(limits)
        },
    )
}

/// A start position relative to the capacity.
#[derive(Clone, Copy, Debug)]
enum StartDraw {
    Zero,
    /// The last `n_new` slots: start = capacity − n_new.
    Last,
    /// `per_mille`/1000 of the free range.
    Fraction(u16),
}

/// Append cases: any dtype, 1..=8 kv heads, head dim ([`head_dim`]), 1..=8 new tokens, 1..=4
/// sequences whose starts include 0 and the last slot (capacity − n_new), either layout with
/// padding, hostile values (mostly) or normal ones, any seed.
pub fn append_case() -> impl Strategy<Value = AppendCase> {
    let start = prop_oneof![
        1 => Just(StartDraw::Zero),
        2 => Just(StartDraw::Last),
        3 => (0..=1000u16).prop_map(StartDraw::Fraction),
    ];
    let shape = (
        dtype(),
        1..=8usize,
        head_dim(),
        1..=8usize,
        prop_oneof![3 => 1..=40usize, 1 => select(EDGE_LENGTHS.to_vec())],
    );
    let values = prop_oneof![1 => Just(AppendValues::Normal), 3 => Just(AppendValues::Hostile)];
    (shape, proptest::collection::vec(start, 1..=4), layout(), values, any::<u64>(), paged()).prop_map(
        |((dtype, n_kv_heads, head_dim, n_new, capacity), starts, (layout, pad), values, seed, mut paged)| {
            let capacity = capacity.max(n_new);
            let free = capacity - n_new;
            let starts = starts
                .into_iter()
                .map(|s| match s {
                    StartDraw::Zero => 0,
                    StartDraw::Last => free,
                    StartDraw::Fraction(per_mille) => free * usize::from(per_mille) / 1000,
                })
                .collect::<Vec<usize>>();
            if let Some(paged) = &mut paged {
                paged.clamp_shared(capacity, starts.iter().copied().min());
            }
            let mut case = AppendCase {
                description: String::new(),
                dtype,
                n_kv_heads,
                head_dim,
                n_new,
                starts,
                capacity,
                layout,
                pad,
                paged,
                data: AppendData { seed, values },
                expect: Expect::Pass,
            };
            case.fit_q8_0();
            case
        },
    )
}

/// Any case of any kernel (attention three times as often: it has more to go wrong).
pub fn any_case() -> impl Strategy<Value = Case> {
    prop_oneof![
        3 => attention_case().prop_map(Case::Attention),
        1 => append_case().prop_map(Case::KvAppend),
    ]
}
