//! The fuzzer's case mix: the shared strategies of [`crate::cases::strategy`] plus adversarial
//! generators aimed at the bugs of ANCHORS.md ("Bugs these kernels have had").
//!
//! # Design
//! - **Same rules as the shared strategies**: raw draws, then one deterministic `prop_map`; no
//!   filtering and no `prop_flat_map`, so every field shrinks on its own, shrinking never leaves
//!   the valid space, and the first alternative of every `prop_oneof!` is the simplest.
//! - **Adversarial attention** ([`adversarial_attention`]): lengths 1, 2, tile−1/tile/tile+1 (and
//!   twice and three times the tile) and primes; rows that see exactly one position while the
//!   cache around it is poisoned; every head dim 8..=256 in steps of 8; any GQA ratio 1..=32
//!   (not just the grid's); pads up to a full tile; huge q·k (logits in the thousands), one
//!   position far above the rest (gain up to 64), denormal and tiny values, values at an offset of
//!   1e4, uniform distributions, zero and odd softmax scales.
//! - **Cheap by default**: ordinary cases (shared and adversarial) do at most
//!   [`CAMPAIGN_MAX_WORK`] multiply-adds, a third of the shared strategy's default, which keeps
//!   throughput up on a CPU driver without losing a trigger.
//! - **Long caches** ([`long_attention`]): capacities of 2000..=40000, weighted at the powers of
//!   two and at the 32K index edge (32767/32768/32769). Rare in the mix (about 1 attention case
//!   in 46): each costs a few hundred milliseconds on a CPU driver, where an ordinary case costs
//!   tens. Every cache stays within 2^27 bytes, the smallest `maxStorageBufferRange` Vulkan
//!   allows, so the case sequence does not depend on the device.
//! - **Forced splits**: a quarter of the attention cases get a split-K chunk (`split_chunk`) of
//!   64..=256 positions, overriding any the strategy drew: many chunks, so every merge path and
//!   chunk boundary is exercised (and the case file carries the chunk).
//! - **Options**: adversarial cases also take the kernel's options (fused append + attend,
//!   sliding window, softcap, sinks), each now and then, so the adversarial shapes and values
//!   reach every shader variant.
//! - **Adversarial appends** ([`adversarial_append`]): up to 64 new tokens, up to 16 kv heads,
//!   every head dim, starts in the last slots and (1 in 8) long caches written across the 32K
//!   index edge.
//! - Cases are built from a template parsed from JSON ([`attention_template`]), then fields are
//!   set one by one, so an option added to the case model later takes its serde default here.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::select;

use crate::cases::model::{AppendCase, AppendValues, AttentionCase, Case, Dist, LayoutKind, Peak, Poison};
use crate::cases::strategy::{AttentionLimits, GQA_RATIOS, TILE, append_case, attention_case_within, paged};
use crate::kernels::Dtype;
use crate::kernels::attention::{CHUNK_TILE, MAX_GQA_RATIO, MAX_QUERIES};

/// One fuzz case: a corpus case and the generator that drew it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FuzzCase {
    /// Which generator drew it and its value regime, e.g. `adversarial: huge q·k`.
    pub origin: String,
    pub case: Case,
}

/// Largest capacity of a long-cache case: past the 32K index edge by a margin.
pub const LONG_CACHE_MAX: usize = 40_000;

/// The smallest `maxStorageBufferRange` Vulkan allows (2^27 bytes): long caches stay within it.
const PORTABLE_BUFFER_BYTES: usize = 1 << 27;

/// Largest attention work (Σ seq_len · n_queries · n_q_heads · head_dim) of an ordinary case.
/// Time per case grows with it (about 30-100 ns per unit on lavapipe with 2 cores); 1M keeps the
/// median case near 20 ms there while every trigger but long caches fits.
pub const CAMPAIGN_MAX_WORK: usize = 1_000_000;

/// The limits the shared strategy draws with in a campaign: its capacities a little past its
/// default (more split-K chunks), its work at [`CAMPAIGN_MAX_WORK`].
pub const SHARED_LIMITS: AttentionLimits = AttentionLimits { max_capacity: 512, max_work: CAMPAIGN_MAX_WORK };

/// Largest work of a long-cache case (40000 positions × a couple of heads of 64).
const LONG_MAX_WORK: usize = 6_000_000;

/// Largest number of elements of one cache of a long case (materializing costs per element).
const LONG_MAX_CACHE_ELEMENTS: usize = 6 << 20;

/// Largest number of elements of one cache of an adversarial append (canaries cost per byte).
const APPEND_MAX_CACHE_ELEMENTS: usize = 2 << 20;

/// Lengths that have broken kernels: 1, 2, both sides of one, two and three tiles, and primes
/// (no tile divides them), the simplest first.
pub const ADVERSARIAL_LENGTHS: [usize; 24] = [
    1,
    2,
    TILE - 1,
    TILE,
    TILE + 1,
    2 * TILE - 1,
    2 * TILE,
    2 * TILE + 1,
    3 * TILE - 1,
    3 * TILE,
    3 * TILE + 1,
    3,
    5,
    7,
    13,
    31,
    61,
    67,
    97,
    101,
    131,
    251,
    257,
    521,
];

/// Capacities of long caches drawn besides uniform ones: powers of two and their neighbours, and
/// both sides of the 32K index edge.
pub const LONG_CAPACITIES: [usize; 12] = [2048, 4095, 4096, 4097, 8191, 8192, 16384, 32767, 32768, 32769, 33000, 40000];

/// The template every generated attention case starts from (parsed once from JSON, so fields
/// the model gains later take their defaults).
pub fn attention_template() -> AttentionCase {
    static TEMPLATE: OnceLock<AttentionCase> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let json = r#"{"dtype": "f32", "n_q_heads": 1, "n_kv_heads": 1, "head_dim": 64,
                "seq_lens": [1], "capacity": 1, "data": {"seed": 0}}"#;
            // A constant that a unit test parses: failing here is a bug in this line, not input.
            serde_json::from_str(json).unwrap_or_else(|e| unreachable!("the attention template parses: {e}"))
        })
        .clone()
}

/// The shape, batch, layout and data source of a generated attention case, the rest from
/// [`attention_template`].
struct AttentionShapeDraw {
    dtype: Dtype,
    head_dim: usize,
    n_kv_heads: usize,
    ratio: usize,
    n_queries: usize,
    seq_lens: Vec<usize>,
    capacity: usize,
    layout: LayoutKind,
    pad: usize,
    seed: u64,
    poison: Poison,
}

impl AttentionShapeDraw {
    fn into_case(self) -> AttentionCase {
        let mut case = attention_template();
        case.dtype = self.dtype;
        case.n_kv_heads = self.n_kv_heads;
        case.n_q_heads = self.n_kv_heads * self.ratio;
        case.head_dim = self.head_dim;
        case.n_queries = self.n_queries;
        case.seq_lens = self.seq_lens;
        case.capacity = self.capacity;
        case.layout = self.layout;
        case.pad = self.pad;
        case.data.seed = self.seed;
        case.data.poison = self.poison;
        case
    }
}

/// The template every generated append case starts from.
pub fn append_template() -> AppendCase {
    static TEMPLATE: OnceLock<AppendCase> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let json = r#"{"dtype": "f32", "n_kv_heads": 1, "head_dim": 64, "starts": [0], "capacity": 1,
                "data": {"seed": 0}}"#;
            serde_json::from_str(json).unwrap_or_else(|e| unreachable!("the append template parses: {e}"))
        })
        .clone()
}

/// Any cache dtype, q8_0 one draw in five (made valid by the case's `fit_q8_0`).
fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![4 => select(Dtype::ALL.to_vec()), 1 => Just(Dtype::Q8_0)]
}

/// Every head dim the kernels take (multiples of 8 up to 256), shrinking towards 64.
fn any_head_dim() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(64usize), 4 => (1..=32usize).prop_map(|n| 8 * n)]
}

/// Any GQA ratio up to 32: the grid's, or any integer (5, 7, 31 ...). Shrinks towards 1.
fn any_ratio() -> impl Strategy<Value = usize> {
    prop_oneof![2 => select(GQA_RATIOS.to_vec()), 1 => 1..=MAX_GQA_RATIO]
}

/// Layout and row padding: none, small, or up to a full tile.
fn layout() -> impl Strategy<Value = (LayoutKind, usize)> {
    let pad = prop_oneof![3 => Just(0usize), 2 => 1..=9usize, 1 => select(vec![8usize, 16, 56, 64])];
    (select(vec![LayoutKind::HeadMajor, LayoutKind::TokenMajor]), pad)
}

fn poison() -> impl Strategy<Value = Poison> {
    select(vec![Poison::Nan, Poison::Inf, Poison::Garbage])
}

/// The softmax scale: the default, a dyadic one in (0, 4], zero, or very small.
fn scale() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        6 => Just(None),
        2 => (1..=64u32).prop_map(|n| Some(n as f32 / 16.0)),
        1 => select(vec![0.0f32, 1.0 / 4096.0]).prop_map(Some),
    ]
}

fn normal(std: f32) -> Dist {
    Dist::Normal { mean: 0.0, std }
}

/// How the values of an adversarial attention case are drawn.
#[derive(Clone, Copy, Debug)]
enum Regime {
    Normal,
    /// q and k with large std: logits in the thousands, keys whose products overflow f16.
    HugeQk {
        q_std: f32,
        k_std: f32,
    },
    /// One visible position whose key is `gain` × the query: it takes almost all the weight.
    Peak {
        per_mille: u16,
        gain: f32,
    },
    /// Tiny q·k (flat attention) over tiny values, down to f32 denormals.
    Tiny {
        qk_std: f32,
        v_std: f32,
    },
    /// Values far from zero: the accumulator grows to n × the offset.
    Offset {
        v_mean: f32,
        q_std: f32,
    },
    /// Uniform rather than normal values.
    Uniform,
}

impl Regime {
    fn name(self) -> &'static str {
        match self {
            Regime::Normal => "normal values",
            Regime::HugeQk { .. } => "huge q·k",
            Regime::Peak { .. } => "one dominant position",
            Regime::Tiny { v_std, .. } if v_std < 1.2e-38 => "denormal values",
            Regime::Tiny { .. } => "tiny values",
            Regime::Offset { .. } => "values at an offset",
            Regime::Uniform => "uniform values",
        }
    }

    /// Sets the distributions (and the peak, inside the longest sequence) of `case`.
    fn apply(self, case: &mut AttentionCase) {
        let d = &mut case.data;
        match self {
            Regime::Normal => {}
            Regime::HugeQk { q_std, k_std } => (d.q, d.k) = (normal(q_std), normal(k_std)),
            Regime::Peak { per_mille, gain } => {
                let longest = case.seq_lens.iter().copied().max().unwrap_or(0);
                let span = if longest > 0 { longest } else { case.capacity };
                let position = (span * usize::from(per_mille) / 1000).min(span - 1);
                d.peak = Some(Peak { position, gain });
            }
            Regime::Tiny { qk_std, v_std } => (d.q, d.k, d.v) = (normal(qk_std), normal(qk_std), normal(v_std)),
            Regime::Offset { v_mean, q_std } => (d.q, d.v) = (normal(q_std), Dist::Normal { mean: v_mean, std: 1.0 }),
            Regime::Uniform => {
                d.q = Dist::Uniform { lo: -2.0, hi: 2.0 };
                d.k = Dist::Uniform { lo: -2.0, hi: 2.0 };
                d.v = Dist::Uniform { lo: 0.0, hi: 1.0 };
            }
        }
    }
}

fn regime() -> impl Strategy<Value = Regime> {
    // Every value is exact in f32 and prints back to itself in JSON. Keys stay below f16's range
    // (65504) even at 6σ, so the reference never sees an infinite key.
    prop_oneof![
        3 => Just(Regime::Normal),
        2 => (select(vec![4.0f32, 8.0, 16.0]), select(vec![4.0f32, 8.0, 64.0, 256.0, 1024.0]))
            .prop_map(|(q_std, k_std)| Regime::HugeQk { q_std, k_std }),
        2 => (0..=1000u16, select(vec![4.0f32, 8.0, 16.0, 32.0, 64.0]))
            .prop_map(|(per_mille, gain)| Regime::Peak { per_mille, gain }),
        1 => (select(vec![1.0f32, 1e-3, 1e-20]), select(vec![1e-3f32, 1e-20, 1e-30, 1e-38, 1e-40, 1e-44]))
            .prop_map(|(qk_std, v_std)| Regime::Tiny { qk_std, v_std }),
        1 => (select(vec![1000.0f32, -1000.0, 10000.0]), select(vec![1.0f32, 0.015625]))
            .prop_map(|(v_mean, q_std)| Regime::Offset { v_mean, q_std }),
        1 => Just(Regime::Uniform),
    ]
}

/// A sequence length of an adversarial case.
#[derive(Clone, Copy, Debug)]
enum Length {
    /// [`ADVERSARIAL_LENGTHS`] at this index.
    Edge(usize),
    /// `1 + j mod n_queries`: one query row sees exactly one position, the rows before it none.
    MaskedButOne(usize),
    /// Up to 300 positions.
    Any(usize),
    Zero,
}

impl Length {
    fn resolve(self, n_queries: usize) -> usize {
        match self {
            Length::Edge(i) => ADVERSARIAL_LENGTHS[i],
            Length::MaskedButOne(j) => 1 + j % n_queries,
            Length::Any(n) => n,
            Length::Zero => 0,
        }
    }
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        4 => (0..ADVERSARIAL_LENGTHS.len()).prop_map(Length::Edge),
        2 => (0..MAX_QUERIES).prop_map(Length::MaskedButOne),
        2 => (0..=300usize).prop_map(Length::Any),
        1 => Just(Length::Zero),
    ]
}

/// Free slots after the longest sequence (all poisoned).
fn slack() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(0usize), 2 => 1..=8usize, 1 => Just(TILE), 1 => 0..=300usize]
}

/// Shrinks a case until its work is at most `max_work`: kv heads, then sequences from the end,
/// then query tokens, then the GQA ratio (halved). One of each always fits the limits used here.
fn fit_work(case: &mut AttentionCase, max_work: usize) {
    while crate::cases::strategy::attention_work(case) > max_work {
        let ratio = case.n_q_heads / case.n_kv_heads;
        if case.n_kv_heads > 1 {
            case.n_kv_heads -= 1;
            case.n_q_heads = case.n_kv_heads * ratio;
        } else if case.seq_lens.len() > 1 {
            case.seq_lens.pop();
        } else if case.n_queries > 1 {
            case.n_queries -= 1;
        } else if ratio > 1 {
            case.n_q_heads = ratio / 2;
        } else {
            return;
        }
    }
}

/// Elements of one cache of an attention case.
fn cache_elements(case: &AttentionCase) -> usize {
    case.seq_lens.len() * case.n_kv_heads * case.capacity * (case.head_dim + case.pad)
}

/// The kernel options of an adversarial case, each off most of the time.
#[derive(Clone, Copy, Debug)]
struct Options {
    fused: bool,
    /// Sliding window as `per_mille` of the capacity (at least 1 position).
    window: Option<u16>,
    softcap: Option<f32>,
    /// Sink logits: normal with this std.
    sinks: Option<f32>,
}

fn options() -> impl Strategy<Value = Options> {
    let fused = prop_oneof![3 => Just(false), 1 => Just(true)];
    let window = prop_oneof![7 => Just(None), 1 => (0..=1000u16).prop_map(Some)];
    let softcap = prop_oneof![7 => Just(None), 1 => select(vec![1.0f32, 5.0, 30.0, 50.0]).prop_map(Some)];
    let sinks = prop_oneof![7 => Just(None), 1 => select(vec![1.0f32, 4.0, 16.0]).prop_map(Some)];
    (fused, window, softcap, sinks).prop_map(|(fused, window, softcap, sinks)| Options {
        fused,
        window,
        softcap,
        sinks,
    })
}

impl Options {
    fn apply(self, case: &mut AttentionCase) {
        case.window = self.window.map(|w| (case.capacity * usize::from(w) / 1000).max(1));
        case.softcap = self.softcap;
        case.sinks = self.sinks.map(normal);
        if self.fused {
            // A fused step appends n_queries tokens: every sequence holds at least that many.
            case.fused = true;
            case.n_queries = case.n_queries.min(case.capacity);
            let nq = case.n_queries;
            case.seq_lens.iter_mut().for_each(|l| *l = (*l).max(nq));
        }
    }
}

/// Adversarial attention cases (see the module note).
pub fn adversarial_attention() -> impl Strategy<Value = AttentionCase> {
    let shape =
        (dtype(), any_head_dim(), 1..=4usize, any_ratio(), prop_oneof![1 => Just(1usize), 2 => 1..=MAX_QUERIES]);
    let lens = (proptest::collection::vec(length(), 1..=4), slack());
    let values = (poison(), regime(), scale(), options(), any::<u64>());
    (shape, lens, layout(), values).prop_map(
        |((dtype, head_dim, n_kv_heads, ratio, n_queries), (lens, slack), (layout, pad), values)| {
            let (poison, regime, scale, options, seed) = values;
            let seq_lens: Vec<usize> = lens.iter().map(|l| l.resolve(n_queries)).collect();
            let capacity = seq_lens.iter().copied().max().unwrap_or(0).max(1) + slack;
            let mut case = AttentionShapeDraw {
                dtype,
                head_dim,
                n_kv_heads,
                ratio,
                n_queries,
                seq_lens,
                capacity,
                layout,
                pad,
                seed,
                poison,
            }
            .into_case();
            case.fit_q8_0();
            case.scale = scale;
            fit_work(&mut case, CAMPAIGN_MAX_WORK);
            options.apply(&mut case);
            regime.apply(&mut case);
            case.fit_q8_0(); // again: the regime's distributions
            case.description = format!("vkdecode-fuzz adversarial: {}", regime.name());
            case
        },
    )
}

/// A sequence length of a long-cache case, relative to the capacity.
#[derive(Clone, Copy, Debug)]
enum LongLength {
    Full,
    /// This many positions short of the capacity.
    Short(usize),
    /// 32767, 32768 or 32769 (clamped to the capacity): the 32K index edge.
    Edge(usize),
    Fraction(u16),
}

/// Long-cache attention cases: capacities of 2000..=40000 (see the module note).
pub fn long_attention() -> impl Strategy<Value = AttentionCase> {
    let capacity = prop_oneof![1 => select(LONG_CAPACITIES.to_vec()), 1 => 2000..=LONG_CACHE_MAX];
    let length = prop_oneof![
        2 => Just(LongLength::Full),
        1 => (1..=TILE).prop_map(LongLength::Short),
        1 => (0..3usize).prop_map(LongLength::Edge),
        2 => (0..=1000u16).prop_map(LongLength::Fraction),
    ];
    let regime = prop_oneof![
        3 => Just(Regime::Normal),
        1 => Just(Regime::HugeQk { q_std: 8.0, k_std: 8.0 }),
        1 => (0..=1000u16, select(vec![4.0f32, 16.0])).prop_map(|(per_mille, gain)| Regime::Peak { per_mille, gain }),
        1 => Just(Regime::Offset { v_mean: 1000.0, q_std: 0.015625 }),
    ];
    let shape = (dtype(), any_head_dim(), 1..=2usize, select(GQA_RATIOS.to_vec()), 1..=MAX_QUERIES);
    let values = (poison(), regime, any::<u64>());
    (shape, capacity, proptest::collection::vec(length, 1..=2), layout(), values).prop_map(
        |((dtype, head_dim, n_kv_heads, ratio, n_queries), capacity, lens, (layout, pad), values)| {
            let (poison, regime, seed) = values;
            let seq_lens = lens
                .iter()
                .map(|l| match *l {
                    LongLength::Full => capacity,
                    LongLength::Short(n) => capacity - n,
                    LongLength::Edge(i) => (32767 + i).min(capacity),
                    LongLength::Fraction(per_mille) => capacity * usize::from(per_mille) / 1000,
                })
                .collect();
            let mut case = AttentionShapeDraw {
                dtype,
                head_dim,
                n_kv_heads,
                ratio,
                n_queries,
                seq_lens,
                capacity,
                layout,
                pad,
                seed,
                poison,
            }
            .into_case();
            case.fit_q8_0();
            fit_work(&mut case, LONG_MAX_WORK);
            // Bound the cache: sequences first, then halve the head dim (staying a multiple of 8,
            // or of a q8_0 block).
            let block = if case.dtype == Dtype::Q8_0 { 32 } else { 8 };
            while cache_elements(&case) > LONG_MAX_CACHE_ELEMENTS
                || dtype.cache_bytes(cache_elements(&case)) > PORTABLE_BUFFER_BYTES
            {
                if case.seq_lens.len() > 1 {
                    case.seq_lens.pop();
                } else if case.n_kv_heads > 1 {
                    let ratio = case.n_q_heads / case.n_kv_heads;
                    case.n_kv_heads -= 1;
                    case.n_q_heads = case.n_kv_heads * ratio;
                } else if case.pad > 0 {
                    case.pad = 0;
                } else if case.head_dim > block {
                    case.head_dim = (case.head_dim / 2).next_multiple_of(block);
                } else {
                    break;
                }
            }
            regime.apply(&mut case);
            case.fit_q8_0();
            case.description = format!("vkdecode-fuzz long cache: {}", regime.name());
            case
        },
    )
}

/// A start position of an adversarial append.
#[derive(Clone, Copy, Debug)]
enum Start {
    Zero,
    /// The last `n_new` slots.
    Last,
    /// Across the 32K index edge: 32768 − `n_new` + this (clamped to the free range).
    Edge(usize),
    Fraction(u16),
}

/// The capacity of an adversarial append.
#[derive(Clone, Copy, Debug)]
enum AppendCapacity {
    /// `n_new` plus this many slots.
    Slack(usize),
    /// A long cache of this capacity (past the 32K index edge).
    Long(usize),
}

/// Adversarial appends: many new tokens and kv heads, every head dim, long caches written at
/// their end and across the 32K index edge.
pub fn adversarial_append() -> impl Strategy<Value = AppendCase> {
    let n_new = prop_oneof![2 => 1..=8usize, 1 => select(vec![TILE - 1, TILE, TILE + 1]), 1 => 1..=64usize];
    let capacity = prop_oneof![
        7 => (0..=300usize).prop_map(AppendCapacity::Slack),
        1 => select(vec![32767usize, 32768, 32769, 33000, LONG_CACHE_MAX]).prop_map(AppendCapacity::Long),
    ];
    let start = prop_oneof![
        1 => Just(Start::Zero),
        2 => Just(Start::Last),
        1 => (0..=2usize).prop_map(Start::Edge),
        2 => (0..=1000u16).prop_map(Start::Fraction),
    ];
    let values = prop_oneof![1 => Just(AppendValues::Normal), 3 => Just(AppendValues::Hostile)];
    let shape = (dtype(), 1..=16usize, any_head_dim(), n_new, capacity);
    (shape, proptest::collection::vec(start, 1..=4), layout(), values, any::<u64>(), paged()).prop_map(
        |((dtype, n_kv_heads, head_dim, n_new, capacity), starts, (layout, pad), values, seed, paged)| {
            let short = matches!(capacity, AppendCapacity::Slack(_));
            let capacity = match capacity {
                AppendCapacity::Slack(slack) => n_new + slack,
                AppendCapacity::Long(c) => c,
            };
            let free = capacity - n_new;
            let mut case = append_template();
            case.dtype = dtype;
            case.n_kv_heads = n_kv_heads;
            case.head_dim = head_dim;
            case.n_new = n_new;
            case.capacity = capacity;
            case.layout = layout;
            case.pad = pad;
            case.data.seed = seed;
            case.data.values = values;
            case.starts = starts
                .into_iter()
                .map(|s| match s {
                    Start::Zero => 0,
                    Start::Last => free,
                    Start::Edge(i) => (32768 + i).saturating_sub(n_new).min(free),
                    Start::Fraction(per_mille) => free * usize::from(per_mille) / 1000,
                })
                .collect();
            let elements = |c: &AppendCase| c.starts.len() * c.n_kv_heads * c.capacity * (c.head_dim + c.pad);
            while elements(&case) > APPEND_MAX_CACHE_ELEMENTS {
                if case.n_kv_heads > 1 {
                    case.n_kv_heads = case.n_kv_heads.div_ceil(2);
                } else if case.starts.len() > 1 {
                    case.starts.pop();
                } else if case.head_dim > 8 || case.pad > 0 {
                    case.head_dim = (case.head_dim / 2).next_multiple_of(8);
                    case.pad = 0;
                } else {
                    break;
                }
            }
            case.fit_q8_0();
            // Paged pools only for short caches: a long one's pages would pass the portable size.
            if short && let Some(mut paged) = paged {
                paged.clamp_shared(case.capacity, case.starts.iter().copied().min());
                case.paged = Some(paged);
            }
            case.description = "vkdecode-fuzz adversarial append".into();
            case
        },
    )
}

/// Which kernels a campaign draws cases for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    pub attention: bool,
    pub kv_append: bool,
}

impl Kernels {
    pub const ALL: Kernels = Kernels { attention: true, kv_append: true };

    /// Parses a comma-separated list of `attention`, `kv_append` (or `all`).
    pub fn parse(list: &str) -> Result<Kernels, String> {
        let mut k = Kernels { attention: false, kv_append: false };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "attention" => k.attention = true,
                "kv_append" => k.kv_append = true,
                "all" => k = Kernels::ALL,
                other => return Err(format!("unknown kernel `{other}`; known: attention, kv_append, all")),
            }
        }
        if !k.attention && !k.kv_append {
            return Err("no kernel given; known: attention, kv_append, all".into());
        }
        Ok(k)
    }

    /// The kernel names, e.g. `["attention", "kv_append"]`.
    pub fn names(self) -> Vec<&'static str> {
        [("attention", self.attention), ("kv_append", self.kv_append)]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect()
    }

    /// Only the kernel a case of `kernel` runs (`"attention"` or `"kv_append"`).
    pub fn only(kernel: &str) -> Kernels {
        Kernels { attention: kernel == "attention", kv_append: kernel == "kv_append" }
    }
}

/// Labels attention cases with their generator and forces a small split-K chunk on a quarter;
/// adversarial cases get a paged cache as often as the shared strategy draws one.
fn labelled<S: Strategy<Value = AttentionCase>>(
    strategy: S,
    generator: &'static str,
) -> impl Strategy<Value = FuzzCase> {
    let split = prop_oneof![3 => Just(None), 1 => (1..=4usize).prop_map(|k| Some(k * CHUNK_TILE))];
    (strategy, split, paged()).prop_map(move |(mut case, forced, paged)| {
        let regime = case.description.rsplit(": ").next().unwrap_or_default().to_string();
        if forced.is_some() {
            case.split_chunk = forced;
        }
        if generator == "adversarial"
            && let Some(mut paged) = paged
        {
            let writes = case.fused.then(|| case.seq_lens.iter().map(|&l| l - case.n_queries).min().unwrap_or(0));
            paged.clamp_shared(case.capacity, writes);
            case.paged = Some(paged);
        }
        FuzzCase { origin: format!("{generator}: {regime}"), case: Case::Attention(case) }
    })
}

/// Attention cases of the mix: the shared strategy and the adversarial one about equally, long
/// caches rarely; a quarter of each with a forced split.
pub fn attention_mix() -> impl Strategy<Value = FuzzCase> {
    prop_oneof![
        45 => labelled(attention_case_within(SHARED_LIMITS), "shared"),
        45 => labelled(adversarial_attention(), "adversarial"),
        2 => labelled(long_attention(), "long"),
    ]
}

/// Append cases of the mix: the shared strategy and the adversarial one equally.
pub fn append_mix() -> impl Strategy<Value = FuzzCase> {
    prop_oneof![
        1 => append_case().prop_map(|c| FuzzCase { origin: "shared: append".into(), case: Case::KvAppend(c) }),
        1 => adversarial_append().prop_map(|c| FuzzCase { origin: "adversarial: append".into(), case: Case::KvAppend(c) }),
    ]
}

/// The campaign's strategy for `kernels`: attention three times as often as append (as
/// [`crate::cases::strategy::any_case`]) when both run.
pub fn fuzz_case(kernels: Kernels) -> BoxedStrategy<FuzzCase> {
    match (kernels.attention, kernels.kv_append) {
        (true, false) => attention_mix().boxed(),
        (false, true) => append_mix().boxed(),
        _ => prop_oneof![3 => attention_mix(), 1 => append_mix()].boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn templates_parse_and_are_valid() {
        assert!(attention_template().params().is_ok());
        assert!(append_template().params().is_ok());
    }

    #[test]
    fn kernel_lists_parse() {
        assert_eq!(Kernels::parse("attention,kv_append"), Ok(Kernels::ALL));
        assert_eq!(Kernels::parse("kv_append"), Ok(Kernels::only("kv_append")));
        assert!(Kernels::parse("attention,nope").is_err());
        assert!(Kernels::parse("").is_err());
    }

    #[test]
    fn every_generator_draws_valid_cases_that_survive_json() {
        let mut runner = TestRunner::deterministic();
        let strategy = fuzz_case(Kernels::ALL);
        for _ in 0..500 {
            let fc = strategy.new_tree(&mut runner).map(|t| t.current()).unwrap_or_else(|e| panic!("{e}"));
            let ok = match &fc.case {
                Case::Attention(c) => c.params().map(|_| ()),
                Case::KvAppend(c) => c.params().map(|_| ()),
            };
            assert!(ok.is_ok(), "{ok:?}: {fc:?}");
            let json = serde_json::to_string(&fc.case).unwrap_or_default();
            assert_eq!(crate::cases::corpus::parse_case(&json).as_ref(), Ok(&fc.case), "{json}");
        }
    }
}
