//! The built-in grid: a fixed, named set of cases every device must pass, run by `vkdecode check`
//! and by the conformance suite beside the corpus. It crosses dtypes, head dims, GQA ratios and
//! cache lengths around the tile size (64), with both layouts, padding, ragged batches and
//! multi-query rows, and adds the value regimes that known bugs need to show (huge logits, a
//! dominant position, large-offset values, garbage poison).

use super::model::{
    AppendCase, AppendData, AppendValues, AttentionCase, AttentionData, Case, Dist, Expect, LayoutKind, PageOrder,
    Paged, Peak, Poison,
};
use crate::kernels::Dtype;

/// One grid point.
#[derive(Clone, Debug)]
pub struct GridCase {
    /// `grid/<kernel>/<dtype>/...`
    pub name: String,
    pub case: Case,
}

/// (query heads, kv heads, head dim): MHA, GQA 4/6/16/32, and the odd head dims.
const ATTENTION_SHAPES: [(usize, usize, usize); 6] =
    [(4, 4, 64), (8, 2, 128), (6, 1, 96), (16, 1, 80), (32, 1, 64), (4, 2, 256)];
/// Cache lengths around the tile (63/64/65), 1, and a prime past two tiles.
const KV_LENGTHS: [usize; 5] = [1, 63, 64, 65, 131];

fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn attention(name: String, mut case: AttentionCase) -> GridCase {
    case.data.seed = seed_of(&name);
    GridCase { name, case: Case::Attention(case) }
}

/// A plain attention case: one query, head-major, no options, standard normal values, NaN poison,
/// seed 0.
pub(crate) fn base(
    dtype: Dtype,
    (h, hkv, d): (usize, usize, usize),
    seq_lens: Vec<usize>,
    capacity: usize,
) -> AttentionCase {
    AttentionCase {
        description: String::new(),
        dtype,
        n_q_heads: h,
        n_kv_heads: hkv,
        head_dim: d,
        n_queries: 1,
        seq_lens,
        capacity,
        layout: LayoutKind::HeadMajor,
        pad: 0,
        paged: None,
        scale: None,
        window: None,
        softcap: None,
        sinks: None,
        fused: false,
        split_chunk: None,
        data: AttentionData {
            seed: 0,
            q: Dist::default(),
            k: Dist::default(),
            v: Dist::default(),
            peak: None,
            poison: Poison::Nan,
        },
        expect: Expect::Pass,
    }
}

/// Every grid point, in a stable order.
pub fn grid() -> Vec<GridCase> {
    let mut out = Vec::new();
    for dtype in Dtype::ALL {
        for (si, &shape) in ATTENTION_SHAPES.iter().enumerate() {
            let (h, hkv, d) = shape;
            for (ki, &kv) in KV_LENGTHS.iter().enumerate() {
                // Rotate layout, queries and batch shape across the grid so every combination of
                // neighbours differs in more than one way.
                let token_major = (si + ki) % 2 == 1;
                let n_queries = [1, 3, 8][(si + ki) % 3];
                let ragged = ki % 2 == 0 && kv > 1;
                let seq_lens = if ragged { vec![kv, kv / 2, 0] } else { vec![kv] };
                let layout = if token_major { "tm" } else { "hm" };
                let name = format!("grid/attention/{dtype}/h{h}-kv{hkv}-d{d}/len{kv}-q{n_queries}-{layout}");
                let mut c = base(dtype, shape, seq_lens, kv + 5);
                c.n_queries = n_queries;
                if token_major {
                    c.layout = LayoutKind::TokenMajor;
                    c.pad = 8;
                }
                c.data.poison = if ki % 2 == 1 { Poison::Garbage } else { Poison::Nan };
                out.push(attention(name, c));
            }
        }
        // Logits of several hundred: exp() overflows without the max subtraction.
        let mut c = base(dtype, (8, 2, 128), vec![100], 128);
        c.data.q = Dist::Normal { mean: 0.0, std: 6.0 };
        c.data.k = Dist::Normal { mean: 0.0, std: 6.0 };
        out.push(attention(format!("grid/attention/{dtype}/huge-logits"), c));
        // One position far above the rest.
        let mut c = base(dtype, (4, 1, 64), vec![200], 200);
        c.data.peak = Some(Peak { position: 37, gain: 4.0 });
        out.push(attention(format!("grid/attention/{dtype}/dominant-position"), c));
        // Options and the fused path, each on a multi-chunk case so the merge sees them too.
        let mut c = base(dtype, (8, 2, 64), vec![150, 40], 160);
        c.window = Some(50);
        out.push(attention(format!("grid/attention/{dtype}/sliding-window-50"), c));
        let mut c = base(dtype, (8, 2, 64), vec![150], 160);
        c.softcap = Some(5.0);
        c.data.q = Dist::Normal { mean: 0.0, std: 4.0 };
        out.push(attention(format!("grid/attention/{dtype}/softcap-5"), c));
        let mut c = base(dtype, (8, 2, 64), vec![150, 1, 0], 160);
        c.sinks = Some(Dist::Normal { mean: 2.0, std: 4.0 });
        out.push(attention(format!("grid/attention/{dtype}/sinks"), c));
        for (i, chunk) in [None, Some(64)].into_iter().enumerate() {
            let mut c = base(dtype, (8, 2, 128), vec![130, 3, 64], 140);
            c.fused = true;
            c.n_queries = 3;
            c.split_chunk = chunk;
            c.data.poison = if i == 0 { Poison::Nan } else { Poison::Garbage };
            let split = chunk.map_or("auto".to_string(), |k| k.to_string());
            out.push(attention(format!("grid/attention/{dtype}/fused-append-q3-split-{split}"), c));
        }
        // Paged caches: pages of 16 and 64 (shuffled tables, a spare page), chunks of 64 or the
        // kernel's choice, so chunk and page boundaries meet and cross; one fused.
        for (page_size, chunk, fused) in [(16, None, false), (64, Some(64), false), (16, Some(64), true)] {
            let mut c = base(dtype, (8, 2, 128), vec![150, 64, 3], 160);
            c.layout = LayoutKind::TokenMajor;
            c.paged = Some(Paged { page_size, order: PageOrder::Shuffled, shared_pages: 0, spare_pages: 1 });
            c.split_chunk = chunk;
            c.fused = fused;
            let split = chunk.map_or("auto".to_string(), |k| k.to_string());
            let fused = if fused { "-fused" } else { "" };
            out.push(attention(format!("grid/attention/{dtype}/paged-{page_size}-split-{split}{fused}"), c));
        }
        // Flat attention over values far from zero: the accumulator reaches ~n·1000.
        let mut c = base(dtype, (4, 2, 64), vec![300], 300);
        c.data.q = Dist::Normal { mean: 0.0, std: 0.01 };
        c.data.v = Dist::Normal { mean: 1000.0, std: 1.0 };
        out.push(attention(format!("grid/attention/{dtype}/flat-large-values"), c));
    }
    for dtype in Dtype::ALL {
        for (i, (hkv, d, n_new, starts, capacity)) in [
            (1, 64, 1, vec![0], 4),
            (2, 128, 1, vec![5, 0, 9], 10),
            (4, 80, 3, vec![7, 2], 10),
            (8, 256, 8, vec![0, 8], 16),
        ]
        .into_iter()
        .enumerate()
        {
            for layout in [LayoutKind::HeadMajor, LayoutKind::TokenMajor] {
                let name = format!("grid/kv_append/{dtype}/kv{hkv}-d{d}-new{n_new}-{}", layout.name());
                let case = AppendCase {
                    description: String::new(),
                    dtype,
                    n_kv_heads: hkv,
                    head_dim: d,
                    n_new,
                    starts: starts.clone(),
                    capacity,
                    layout,
                    pad: if i % 2 == 1 { 8 } else { 0 },
                    paged: None,
                    data: AppendData { seed: seed_of(&name), values: AppendValues::Hostile },
                    expect: Expect::Pass,
                };
                out.push(GridCase { name, case: Case::KvAppend(case) });
            }
        }
        // Through block tables of 8-position pages: writes cross a page boundary.
        let name = format!("grid/kv_append/{dtype}/paged-8-kv2-d64-new5");
        let case = AppendCase {
            description: String::new(),
            dtype,
            n_kv_heads: 2,
            head_dim: 64,
            n_new: 5,
            starts: vec![5, 11],
            capacity: 24,
            layout: LayoutKind::HeadMajor,
            pad: 0,
            paged: Some(Paged { page_size: 8, order: PageOrder::Shuffled, shared_pages: 0, spare_pages: 1 }),
            data: AppendData { seed: seed_of(&name), values: AppendValues::Hostile },
            expect: Expect::Pass,
        };
        out.push(GridCase { name, case: Case::KvAppend(case) });
    }
    q8_0_points(&mut out);
    out
}

/// q8_0 caches: attention over several head dims and GQA ratios, padded rows, split chunks and a
/// paged pool; appends of hostile blocks, contiguous and paged.
fn q8_0_points(out: &mut Vec<GridCase>) {
    let q8 = Dtype::Q8_0;
    for (shape, lens, capacity, split) in [
        ((8, 2, 128), vec![150, 64, 3], 160, None),
        ((4, 1, 64), vec![65, 1], 96, Some(64)),
        ((4, 2, 256), vec![131], 140, None),
        ((6, 6, 32), vec![63, 0, 128], 128, Some(64)),
    ] {
        let (h, hkv, d) = shape;
        let name = format!("grid/attention/q8_0/h{h}-kv{hkv}-d{d}/len{}", lens[0]);
        let mut c = base(q8, shape, lens, capacity);
        c.split_chunk = split;
        if d == 64 {
            c.layout = LayoutKind::TokenMajor;
            c.pad = 32;
            c.data.poison = Poison::Garbage;
        }
        out.push(attention(name, c));
    }
    let mut c = base(q8, (8, 2, 128), vec![150, 64, 3], 160);
    c.paged = Some(Paged { page_size: 16, order: PageOrder::Shuffled, shared_pages: 0, spare_pages: 1 });
    c.split_chunk = Some(64);
    out.push(attention("grid/attention/q8_0/paged-16-split-64".into(), c));
    for (paged, layout, pad) in [(None, LayoutKind::HeadMajor, 0), (Some(8), LayoutKind::TokenMajor, 32)] {
        let name =
            format!("grid/kv_append/q8_0/kv2-d64-new5{}", paged.map_or(String::new(), |p| format!("-paged-{p}")));
        let case = AppendCase {
            description: String::new(),
            dtype: q8,
            n_kv_heads: 2,
            head_dim: 64,
            n_new: 5,
            starts: vec![5, 11],
            capacity: 24,
            layout,
            pad,
            paged: paged.map(|page_size| Paged {
                page_size,
                order: PageOrder::Reverse,
                shared_pages: 0,
                spare_pages: 1,
            }),
            data: AppendData { seed: seed_of(&name), values: AppendValues::Hostile },
            expect: Expect::Pass,
        };
        out.push(GridCase { name, case: Case::KvAppend(case) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_names_are_unique_and_cases_valid() {
        let g = grid();
        let mut names: Vec<_> = g.iter().map(|c| c.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), g.len());
        for c in &g {
            let ok = match &c.case {
                Case::Attention(a) => a.params().map(|_| ()),
                Case::KvAppend(a) => a.params().map(|_| ()),
            };
            assert!(ok.is_ok(), "{}: {:?}", c.name, ok);
        }
    }
}
