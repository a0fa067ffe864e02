//! Paged KV caches through both kernels, on the device, against the reference: the pool's values
//! gathered into a contiguous cache (`PagedLayout::gather`) for `decode_attention_with`, and
//! `kv_append_paged` for the append (bit-exact, every other byte of the pool unchanged). Unused
//! pages and each sequence's unused slots hold NaN, so a read through a wrong page shows.
//!
//! Chunk boundaries fall inside pages (page sizes 24 and 128, a sliding window), and the fused
//! cases write new tokens across a page boundary, through the packed-row, multi-query and scalar
//! paths of the split pass. The `_qk` variant's paged test sits beside its contiguous one in
//! `attention.rs`.

use std::sync::Arc;

use super::attention::{self, AttentionBuffers, AttentionMutant, AttentionParams};
use super::kv_append::{self, AppendBuffers, AppendMutant, AppendParams};
use super::test_support::{read_f32, split_scratch, upload};
use super::{CacheLayout, Dtype, Paging, ParamError, words};
use crate::cases::rng::Rng;
use crate::cases::run::f32_bytes;
use crate::cases::tolerance::attention_element_bound;
use crate::gpu::{Buffer, Context, Location, Recorder};
use crate::reference::dtype::{decode, encode, load, store};
use crate::reference::{AttentionOptions, AttentionShape, PagedLayout, decode_attention_with, kv_append_paged};

/// Pages in every pool that no table lists (NaN in attention cases).
const SPARE_PAGES: usize = 2;

/// How page ids are laid along the block tables.
#[derive(Clone, Copy, Debug)]
enum Tables {
    /// A seeded permutation of the pool, as an allocator's free list leaves it.
    Shuffled,
    /// Page ids decrease along each table and from one table to the next.
    Reversed,
    /// Entry 0 of every table is one page shared by all sequences (a common prefix); the rest
    /// shuffled.
    SharedFirst,
}

/// A case's cache: `pages_per_seq` pages of `page_size` positions per sequence through block
/// tables, or (`paged` false) the contiguous cache of the same capacity.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    dtype: Dtype,
    n_kv_heads: usize,
    head_dim: usize,
    token_major: bool,
    pad: usize,
    page_size: usize,
    pages_per_seq: usize,
    tables: Tables,
    paged: bool,
}

impl Geometry {
    fn capacity(&self) -> usize {
        self.page_size * self.pages_per_seq
    }

    fn contiguous(self) -> Geometry {
        Geometry { paged: false, ..self }
    }
}

/// A built cache: the kernels' layout (the pool, or the contiguous cache) and, when paged, the
/// reference's layout and the tables as the kernels take them.
struct Cache {
    layout: CacheLayout,
    paging: Option<Paging>,
    paged: Option<PagedLayout>,
    tables: Vec<u32>,
    capacity: usize,
}

impl Cache {
    fn new(g: &Geometry, n_seqs: usize, rng: &mut Rng) -> Cache {
        let (hkv, d, ps, pps, capacity) = (g.n_kv_heads, g.head_dim, g.page_size, g.pages_per_seq, g.capacity());
        if !g.paged {
            let layout = if g.token_major {
                CacheLayout::token_major(n_seqs, hkv, capacity, d, g.pad)
            } else {
                CacheLayout::head_major(n_seqs, hkv, capacity, d, g.pad)
            };
            return Cache { layout, paging: None, paged: None, tables: Vec::new(), capacity };
        }
        let shared = usize::from(matches!(g.tables, Tables::SharedFirst));
        let own = pps - shared;
        let n_pages = shared + n_seqs * own + SPARE_PAGES;
        let mut ids: Vec<u32> = (0..n_pages as u32).collect();
        match g.tables {
            Tables::Reversed => ids.reverse(),
            Tables::Shuffled | Tables::SharedFirst => {
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
        }
        let tables: Vec<Vec<u32>> = (0..n_seqs)
            .map(|b| ids[..shared].iter().chain(&ids[shared + b * own..][..own]).copied().collect())
            .collect();
        let paged = if g.token_major {
            PagedLayout::token_major(hkv, d, g.pad, ps, n_pages, tables)
        } else {
            PagedLayout::head_major(hkv, d, g.pad, ps, n_pages, tables)
        };
        paged.validate().expect("a valid paged layout");
        let layout = CacheLayout {
            n_seqs: n_pages,
            n_kv_heads: hkv,
            capacity: ps,
            head_dim: d,
            stride_seq: paged.stride_page,
            stride_head: paged.stride_head,
            stride_pos: paged.stride_pos,
        };
        let tables = paged.block_tables.concat();
        Cache { layout, paging: Some(Paging { pages_per_seq: pps }), paged: Some(paged), tables, capacity }
    }

    fn place(&self, b: usize, h: usize, pos: usize, d: usize) -> usize {
        match &self.paged {
            Some(paged) => paged.offset(b, h, pos, d),
            None => self.layout.offset(b, h, pos, d),
        }
    }

    fn bytes(&self, dtype: Dtype) -> usize {
        self.layout.min_elements() * dtype.size()
    }

    /// The cache's values, contiguous, as the reference reads them (gathered through the tables).
    fn view(&self, dtype: Dtype, bytes: &[u8]) -> (Vec<f32>, CacheLayout) {
        let values: Vec<f32> = (0..bytes.len() / dtype.size()).map(|i| decode(dtype, load(dtype, bytes, i))).collect();
        match &self.paged {
            Some(paged) => paged.gather(&values, self.capacity),
            None => (values, self.layout),
        }
    }

    /// The reference append of `new` at `start[b]..start[b] + n_new`.
    fn append(&self, dtype: Dtype, bytes: &mut [u8], new: &[f32], n_new: usize, start: &[usize]) {
        match &self.paged {
            Some(paged) => kv_append_paged(dtype, bytes, paged, new, n_new, start),
            None => crate::reference::kv_append(dtype, bytes, &self.layout, new, n_new, start),
        }
    }

    fn tables_buffer(&self, ctx: &Arc<Context>, name: &str) -> Option<Buffer> {
        self.paging.map(|_| upload(ctx, name, &words(&self.tables), Location::Upload))
    }
}

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// The first element where two caches differ, as an error naming the case and the cache.
fn same_bytes(what: &str, which: &str, dtype: Dtype, got: &[u8], want: &[u8]) -> Result<(), String> {
    let n = want.len() / dtype.size();
    match (0..n).find(|&i| load(dtype, got, i) != load(dtype, want, i)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: {which} element {i} is {:#x}, expected {:#x}",
            load(dtype, got, i),
            load(dtype, want, i)
        )),
    }
}

#[derive(Clone, Debug)]
struct AttentionCase {
    name: &'static str,
    geometry: Geometry,
    n_q_heads: usize,
    n_queries: usize,
    seq_lens: Vec<usize>,
    split_chunk: Option<usize>,
    window: Option<usize>,
    fused: bool,
}

impl AttentionCase {
    fn contiguous(&self) -> AttentionCase {
        AttentionCase { geometry: self.geometry.contiguous(), ..self.clone() }
    }
}

/// Runs one attention case on the device: the output within the f32 bound of the reference over
/// the gathered cache, and the pool bit-exact (fused: the new tokens written through the tables,
/// as `kv_append_paged` writes them; else untouched). The first failure, if any.
fn check_attention_case(
    ctx: &Arc<Context>,
    case: &AttentionCase,
    mutant: Option<AttentionMutant>,
) -> Result<(), String> {
    let g = &case.geometry;
    let (dtype, hkv, d, hq, nq) = (g.dtype, g.n_kv_heads, g.head_dim, case.n_q_heads, case.n_queries);
    let what = format!("{}{}", case.name, if g.paged { "" } else { " (contiguous)" });
    let n_seqs = case.seq_lens.len();
    let mut rng = Rng::stream(7, case.name);
    let cache = Cache::new(g, n_seqs, &mut rng);
    let params = AttentionParams {
        n_seqs,
        n_queries: nq,
        n_q_heads: hq,
        n_kv_heads: hkv,
        head_dim: d,
        dtype,
        layout: cache.layout,
        scale: (d as f32).powf(-0.5),
        split_chunk: case.split_chunk,
        window: case.window,
        softcap: None,
        sinks: false,
        fused: case.fused,
        qk_norm_rope: None,
        paging: cache.paging,
    };
    let lens: Vec<u32> = case.seq_lens.iter().map(|&l| l as u32).collect();
    params.validate(ctx).map_err(|e| format!("{what}: {e}"))?;
    params.validate_seq_lens(&lens).map_err(|e| format!("{what}: {e}"))?;
    params.validate_block_table_writes(&cache.tables, &lens).map_err(|e| format!("{what}: {e}"))?;

    // The pool: NaN everywhere (spare pages, unused slots, the slots a fused call writes), then
    // the visible positions' values.
    let mut pools = [vec![0u8; cache.bytes(dtype)], vec![0u8; cache.bytes(dtype)]];
    for pool in &mut pools {
        for i in 0..cache.layout.min_elements() {
            store(dtype, pool, i, encode(dtype, f32::NAN));
        }
    }
    for (b, &len) in case.seq_lens.iter().enumerate() {
        let cached = if case.fused { len - nq } else { len };
        for h in 0..hkv {
            for pos in 0..cached {
                for pool in &mut pools {
                    for x in 0..d {
                        store(dtype, pool, cache.place(b, h, pos, x), encode(dtype, rng.normal() as f32));
                    }
                }
            }
        }
    }
    let q = normal(&mut rng, n_seqs * nq * hq * d);
    let new: [Vec<f32>; 2] = [normal(&mut rng, n_seqs * nq * hkv * d), normal(&mut rng, n_seqs * nq * hkv * d)];
    let mut want = pools.clone();
    if case.fused {
        let starts: Vec<usize> = case.seq_lens.iter().map(|&l| l - nq).collect();
        for (pool, new) in want.iter_mut().zip(&new) {
            cache.append(dtype, pool, new, nq, &starts);
        }
    }

    let up = |name: &str, bytes: &[u8]| upload(ctx, name, bytes, Location::Upload);
    let (qb, lens_b) = (up("q", &f32_bytes(&q)), up("seq_lens", &words(&lens)));
    let (new_k, new_v) = (up("new_k", &f32_bytes(&new[0])), up("new_v", &f32_bytes(&new[1])));
    let k_cache = upload(ctx, "k_pool", &pools[0], Location::Readback);
    let v_cache = upload(ctx, "v_pool", &pools[1], Location::Readback);
    let out = upload(ctx, "out", &f32_bytes(&vec![f32::NAN; q.len()]), Location::Readback);
    let (po, pml, counters) = split_scratch(ctx, &params);
    let tables = cache.tables_buffer(ctx, "block_tables");
    let bufs = AttentionBuffers {
        q: &qb,
        seq_lens: &lens_b,
        k_cache: &k_cache,
        v_cache: &v_cache,
        out: &out,
        partial_o: &po,
        partial_ml: &pml,
        counters: &counters,
        sinks: None,
        new_k: case.fused.then_some(&new_k),
        new_v: case.fused.then_some(&new_v),
        qk_norm_rope: None,
        block_tables: tables.as_ref(),
    };
    let mut rec = Recorder::new(ctx).expect("recorder");
    attention::record(&mut rec, ctx, &params, bufs, mutant).map_err(|e| format!("{what}: {e}"))?;
    rec.submit().expect("submit");

    let (k_gpu, v_gpu) = (k_cache.read().expect("read"), v_cache.read().expect("read"));
    same_bytes(&what, "K pool", dtype, &k_gpu, &want[0])?;
    same_bytes(&what, "V pool", dtype, &v_gpu, &want[1])?;

    let ((k, view), (v, _)) = (cache.view(dtype, &want[0]), cache.view(dtype, &want[1]));
    let got = read_f32(&out);
    let shape = AttentionShape { n_seqs, n_queries: nq, n_q_heads: hq, n_kv_heads: hkv, head_dim: d };
    let reference = Reference { shape, q: &q, k: &k, v: &v, view: &view, seq_lens: &case.seq_lens };
    reference.compare(&what, &got, params.scale, case.window)
}

/// What the reference attends over: the cache's values gathered into a contiguous `view`.
struct Reference<'a> {
    shape: AttentionShape,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    view: &'a CacheLayout,
    seq_lens: &'a [usize],
}

impl Reference<'_> {
    /// The first output element beyond the f32 bound of the reference, if any.
    fn compare(&self, what: &str, got: &[f32], scale: f32, window: Option<usize>) -> Result<(), String> {
        let AttentionShape { n_queries: nq, n_q_heads: hq, n_kv_heads: hkv, head_dim: d, .. } = self.shape;
        let (q, k, v, view) = (self.q, self.k, self.v, self.view);
        let scale = f64::from(scale);
        let options = AttentionOptions { window, ..AttentionOptions::default() };
        let reference = decode_attention_with(&self.shape, q, k, v, view, self.seq_lens, scale, &options);
        for (b, &len) in self.seq_lens.iter().enumerate() {
            for t in 0..nq {
                let end = (len + t + 1).saturating_sub(nq);
                let first = window.map_or(0, |w| end.saturating_sub(w));
                for h in 0..hq {
                    let (kvh, row) = (h / (hq / hkv), ((b * nq + t) * hq + h) * d);
                    let (mut s, mut v_max) = (0f64, 0f64);
                    for j in first..end {
                        let at = |x: usize| view.offset(b, kvh, j, x);
                        let dot: f64 = (0..d).map(|x| (f64::from(q[row + x]) * f64::from(k[at(x)])).abs()).sum();
                        s = s.max(scale * dot);
                        v_max = (0..d).map(|x| f64::from(v[at(x)]).abs()).fold(v_max, f64::max);
                    }
                    let bound = attention_element_bound(end - first, d, s, v_max, None);
                    for x in 0..d {
                        let (o, e) = (f64::from(got[row + x]), reference[[b, t, h, x]]);
                        let holds = (o - e).abs() <= bound; // false for NaN too
                        if !holds {
                            return Err(format!(
                                "{what}: out[seq {b}][query {t}][head {h}][dim {x}] = {o:e}, reference {e:e}, bound {bound:e}"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn geometry(dtype: Dtype, n_kv_heads: usize, head_dim: usize, token_major: bool, pad: usize) -> Geometry {
    Geometry {
        dtype,
        n_kv_heads,
        head_dim,
        token_major,
        pad,
        page_size: 16,
        pages_per_seq: 1,
        tables: Tables::Shuffled,
        paged: true,
    }
}

fn pages(g: Geometry, page_size: usize, pages_per_seq: usize, tables: Tables) -> Geometry {
    Geometry { page_size, pages_per_seq, tables, ..g }
}

/// Decode attention over paged caches. Chunks are 64 positions (the smallest), so: page size 16,
/// chunk boundaries on page boundaries; 24, 128 and a sliding window, boundaries inside pages;
/// 128 × 10 pages, 20 chunks merged by the merge dispatch rather than in the split pass.
fn attention_cases() -> Vec<AttentionCase> {
    let case = |name, geometry, n_q_heads, seq_lens: &[usize]| AttentionCase {
        name,
        geometry,
        n_q_heads,
        n_queries: 1,
        seq_lens: seq_lens.to_vec(),
        split_chunk: Some(64),
        window: None,
        fused: false,
    };
    let f16_hm = geometry(Dtype::F16, 2, 64, false, 0);
    let bf16_tm = geometry(Dtype::Bf16, 4, 32, true, 0);
    let f32_hm_padded = geometry(Dtype::F32, 1, 64, false, 4); // rows still 16-byte aligned
    let f16_tm_padded = geometry(Dtype::F16, 2, 128, true, 4); // rows 8-byte aligned: scalar loads
    vec![
        case("head-major/f16/page16/shuffled", pages(f16_hm, 16, 8, Tables::Shuffled), 8, &[128, 77, 1]),
        AttentionCase {
            n_queries: 2,
            ..case("token-major/bf16/page24/reversed", pages(bf16_tm, 24, 9, Tables::Reversed), 4, &[216, 150, 65])
        },
        case(
            "head-major/f32/page8/padded/shared-page",
            pages(f32_hm_padded, 8, 12, Tables::SharedFirst),
            8,
            &[96, 40, 9],
        ),
        AttentionCase {
            window: Some(100),
            ..case(
                "token-major/f16/page64/padded-scalar/window",
                pages(f16_tm_padded, 64, 4, Tables::Shuffled),
                4,
                &[256, 200],
            )
        },
        case(
            "head-major/f16/page128/merge-pass",
            pages(geometry(Dtype::F16, 1, 64, false, 0), 128, 10, Tables::Shuffled),
            2,
            &[1280, 1111],
        ),
    ]
}

/// The fused append + attend through the tables: one new row (packed into shared memory), four
/// (the separate pass over the inputs, writes crossing a page boundary), and rows that are not
/// 16-byte aligned (scalar loads, a write crossing a page boundary).
fn fused_cases() -> Vec<AttentionCase> {
    let fused = |name, geometry, n_q_heads, n_queries, seq_lens: &[usize]| AttentionCase {
        name,
        geometry,
        n_q_heads,
        n_queries,
        seq_lens: seq_lens.to_vec(),
        split_chunk: Some(64),
        window: None,
        fused: true,
    };
    let f16_tm = geometry(Dtype::F16, 2, 64, true, 0);
    let bf16_hm = geometry(Dtype::Bf16, 2, 32, false, 0);
    let f16_hm_padded = geometry(Dtype::F16, 4, 32, false, 2);
    vec![
        fused(
            "fused/token-major/f16/page16/shared-page",
            pages(f16_tm, 16, 6, Tables::SharedFirst),
            8,
            1,
            &[96, 17, 50],
        ),
        fused(
            "fused/head-major/bf16/page8/reversed/4-queries",
            pages(bf16_hm, 8, 10, Tables::Reversed),
            4,
            4,
            &[80, 10, 42],
        ),
        fused(
            "fused/head-major/f16/page24/padded-scalar",
            pages(f16_hm_padded, 24, 4, Tables::Shuffled),
            4,
            2,
            &[96, 49],
        ),
    ]
}

#[test]
fn paged_attention_matches_the_reference_through_block_tables() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    for case in attention_cases() {
        check_attention_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

#[test]
fn paged_fused_attention_appends_and_attends_through_block_tables() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    for case in fused_cases() {
        check_attention_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// The 16-byte loads stay for paged rows when the page, head and position strides all keep rows
/// 16-byte aligned, and give way to scalar loads when any one does not (the page stride too).
#[test]
fn paged_rows_keep_vector_loads_when_every_row_is_16_byte_aligned() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let params = |layout: CacheLayout| AttentionParams {
        n_seqs: 2,
        n_queries: 1,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        dtype: Dtype::F16,
        layout,
        scale: 0.125,
        split_chunk: None,
        window: None,
        softcap: None,
        sinks: false,
        fused: false,
        qk_norm_rope: None,
        paging: Some(Paging { pages_per_seq: 4 }),
    };
    let aligned = CacheLayout::head_major(9, 2, 16, 64, 8);
    let gap = |elements| CacheLayout { stride_seq: aligned.stride_seq + elements, ..aligned };
    for (layout, vector) in
        [(aligned, true), (gap(8), true), (gap(4), false), (CacheLayout::token_major(9, 2, 16, 64, 4), false)]
    {
        let p = params(layout);
        assert_eq!(p.validate(&ctx), Ok(()));
        assert_eq!(p.launch(ctx.info()).vector_loads, vector, "{layout:?}");
    }
}

#[derive(Clone, Debug)]
struct AppendCase {
    name: &'static str,
    geometry: Geometry,
    starts: Vec<usize>,
    n_new: usize,
}

/// Runs one append on the device: the pool after it must equal the reference's bit for bit, so
/// the new tokens land through the tables and no other byte changes (the pool starts as random
/// canary bytes, spare pages as NaN).
fn check_append_case(ctx: &Arc<Context>, case: &AppendCase, mutant: Option<AppendMutant>) -> Result<(), String> {
    let g = &case.geometry;
    let (dtype, hkv, d) = (g.dtype, g.n_kv_heads, g.head_dim);
    let what = format!("{}{}", case.name, if g.paged { "" } else { " (contiguous)" });
    let n_seqs = case.starts.len();
    let mut rng = Rng::stream(11, case.name);
    let cache = Cache::new(g, n_seqs, &mut rng);
    let params = AppendParams {
        n_seqs,
        n_new: case.n_new,
        n_kv_heads: hkv,
        head_dim: d,
        dtype,
        layout: cache.layout,
        paging: cache.paging,
    };
    let starts: Vec<u32> = case.starts.iter().map(|&s| s as u32).collect();
    params.validate(ctx).map_err(|e| format!("{what}: {e}"))?;
    params.validate_starts(&starts).map_err(|e| format!("{what}: {e}"))?;
    params.validate_block_table_writes(&cache.tables, &starts).map_err(|e| format!("{what}: {e}"))?;

    let mut before = [0, 1].map(|_| (0..cache.bytes(dtype)).map(|_| rng.next_u32() as u8).collect::<Vec<u8>>());
    let listed: std::collections::HashSet<u32> = cache.tables.iter().copied().collect();
    for page in (0..cache.layout.n_seqs as u32).filter(|p| cache.paging.is_some() && !listed.contains(p)) {
        for h in 0..hkv {
            for slot in 0..g.page_size {
                for x in 0..d {
                    for pool in &mut before {
                        store(dtype, pool, cache.layout.offset(page as usize, h, slot, x), encode(dtype, f32::NAN));
                    }
                }
            }
        }
    }
    // Large values too, so that f16 overflow and subnormals are exercised.
    let new: [Vec<f32>; 2] = [0, 1].map(|_| {
        (0..params.new_elements()).map(|_| (rng.normal() * 2f64.powi(rng.below(40) as i32 - 20)) as f32).collect()
    });
    let mut want = before.clone();
    for (pool, new) in want.iter_mut().zip(&new) {
        cache.append(dtype, pool, new, case.n_new, &case.starts);
    }

    let up = |name: &str, bytes: &[u8]| upload(ctx, name, bytes, Location::Upload);
    let (new_k, new_v, start) =
        (up("new_k", &f32_bytes(&new[0])), up("new_v", &f32_bytes(&new[1])), up("start", &words(&starts)));
    let k_cache = upload(ctx, "k_pool", &before[0], Location::Readback);
    let v_cache = upload(ctx, "v_pool", &before[1], Location::Readback);
    let tables = cache.tables_buffer(ctx, "block_tables");
    let bufs = AppendBuffers {
        new_k: &new_k,
        new_v: &new_v,
        start: &start,
        k_cache: &k_cache,
        v_cache: &v_cache,
        block_tables: tables.as_ref(),
    };
    let mut rec = Recorder::new(ctx).expect("recorder");
    kv_append::record(&mut rec, ctx, &params, bufs, mutant).map_err(|e| format!("{what}: {e}"))?;
    rec.submit().expect("submit");
    same_bytes(&what, "K pool", dtype, &k_cache.read().expect("read"), &want[0])?;
    same_bytes(&what, "V pool", dtype, &v_cache.read().expect("read"), &want[1])
}

/// Appends through tables: runs crossing page boundaries, ending exactly at a sequence's
/// capacity, a single token, beside a page every sequence shares (written by none).
fn append_cases() -> Vec<AppendCase> {
    let case = |name, geometry, starts: &[usize], n_new| AppendCase { name, geometry, starts: starts.to_vec(), n_new };
    vec![
        case(
            "append/head-major/f16/page16/shuffled",
            pages(geometry(Dtype::F16, 2, 64, false, 0), 16, 4, Tables::Shuffled),
            &[14, 0, 59],
            5,
        ),
        case(
            "append/token-major/bf16/page8/reversed",
            pages(geometry(Dtype::Bf16, 3, 32, true, 0), 8, 5, Tables::Reversed),
            &[6, 39, 20],
            1,
        ),
        case(
            "append/head-major/f32/page64/padded/shared-page",
            pages(geometry(Dtype::F32, 2, 40, false, 3), 64, 3, Tables::SharedFirst),
            &[64, 120, 190],
            2,
        ),
        case(
            "append/token-major/f16/page24/padded",
            pages(geometry(Dtype::F16, 1, 16, true, 2), 24, 3, Tables::Shuffled),
            &[20, 47],
            8,
        ),
    ]
}

#[test]
fn paged_append_is_bit_exact_and_leaves_every_other_byte_alone() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    for case in append_cases() {
        check_append_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// Each paging mutant fails paged cases and is a no-op on the same cases made contiguous.
#[test]
fn paging_mutants_fail_paged_cases_and_pass_contiguous_ones() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let (plain, fused) = (attention_cases(), fused_cases());
    // Page size 16 is the size the wrong constant assumes, so that mutant meets pages of 24 and 8.
    let attention_mutants: [(AttentionMutant, [&AttentionCase; 2]); 2] = [
        (AttentionMutant::PageIndexOffByOne, [&plain[0], &fused[0]]),
        (AttentionMutant::PageSizeWrongConstant, [&plain[1], &fused[1]]),
    ];
    for (m, cases) in attention_mutants {
        for case in cases {
            assert!(check_attention_case(&ctx, case, Some(m)).is_err(), "{} survives {}", m.name(), case.name);
            let contiguous = check_attention_case(&ctx, &case.contiguous(), Some(m));
            assert_eq!(contiguous, Ok(()), "{} changes the contiguous {}", m.name(), case.name);
        }
    }
    let m = AppendMutant::PageOffByOne;
    for case in &append_cases()[..2] {
        assert!(check_append_case(&ctx, case, Some(m)).is_err(), "{} survives {}", m.name(), case.name);
        let contiguous = AppendCase { geometry: case.geometry.contiguous(), ..case.clone() };
        assert_eq!(
            check_append_case(&ctx, &contiguous, Some(m)),
            Ok(()),
            "{} changes the contiguous {}",
            m.name(),
            case.name
        );
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// A host check of block tables.
type TableCheck<'a> = &'a dyn Fn(&[u32]) -> Result<(), ParamError>;

/// The parameter and the expectation of an error.
#[track_caller]
fn assert_param_error(result: Result<(), ParamError>, name: &str, says: &str) {
    match result {
        Err(e) => assert!(e.name == name && e.problem.contains(says), "expected `{name}`: …{says}…, got {e}"),
        Ok(()) => panic!("expected an error on `{name}` saying {says:?}, got Ok"),
    }
}

#[test]
fn bad_block_tables_and_page_geometry_are_param_errors() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    // Two sequences of 3 pages of 16 positions in a pool of 8 pages.
    let pool = CacheLayout::token_major(8, 2, 16, 64, 0);
    let paging = Some(Paging { pages_per_seq: 3 });
    let attention = AttentionParams {
        n_seqs: 2,
        n_queries: 1,
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        dtype: Dtype::F16,
        layout: pool,
        scale: 0.125,
        split_chunk: None,
        window: None,
        softcap: None,
        sinks: false,
        fused: true,
        qk_norm_rope: None,
        paging,
    };
    let append =
        AppendParams { n_seqs: 2, n_new: 4, n_kv_heads: 2, head_dim: 64, dtype: Dtype::F16, layout: pool, paging };
    assert_eq!(attention.validate(&ctx), Ok(()));
    assert_eq!(append.validate(&ctx), Ok(()));
    assert_eq!(attention.seq_capacity(), 48);

    let table = |f: &dyn Fn(&mut Vec<u32>)| {
        let mut t = vec![5, 1, 2, 6, 3, 4];
        f(&mut t);
        t
    };
    let checks: [TableCheck; 2] = [&|t| attention.validate_block_tables(t), &|t| append.validate_block_tables(t)];
    for check in checks {
        assert_eq!(check(&table(&|_| ())), Ok(()));
        assert_param_error(
            check(&table(&|t| t.truncate(5))),
            "block_tables",
            "5 entries, expected 2 sequences × 3 pages",
        );
        assert_param_error(
            check(&table(&|t| t[5] = 40)),
            "block_tables",
            "sequence 1, entry 2: page 40 is outside the pool of 8 pages",
        );
        assert_param_error(check(&table(&|t| t[2] = 5)), "block_tables", "sequence 0, entry 2: page 5 repeats entry 0");
    }

    // Page 5 is every sequence's first page: writing into it changes what the other reads.
    let shared = table(&|t| t[3] = 5);
    assert_eq!(attention.validate_block_table_writes(&shared, &[17, 48]), Ok(()));
    assert_param_error(
        attention.validate_block_table_writes(&shared, &[10, 48]),
        "block_tables",
        "sequence 0, entry 0: page 5 is written (positions 9..10), and sequence 1 also lists it (entry 0)",
    );
    assert_eq!(append.validate_block_table_writes(&shared, &[16, 44]), Ok(()));
    assert_param_error(
        append.validate_block_table_writes(&shared, &[16, 14]),
        "block_tables",
        "sequence 1, entry 0: page 5 is written (positions 14..16)",
    );
    // Unfused attention writes nothing, so sharing is fine whatever the lengths.
    let read_only = AttentionParams { fused: false, ..attention };
    assert_eq!(read_only.validate_block_table_writes(&shared, &[3, 48]), Ok(()));
    // Tables for a call that is not paged.
    let unpaged = AppendParams { paging: None, layout: CacheLayout::token_major(2, 2, 16, 64, 0), ..append };
    assert_param_error(unpaged.validate_block_tables(&[1]), "block_tables", "not paged");

    // Capacities are a sequence's pages, not the page size.
    assert_param_error(attention.validate_seq_lens(&[48, 49]), "seq_lens", "length 49 exceeds capacity 48");
    assert_param_error(append.validate_starts(&[44, 45]), "start", "start 45 + 4 new tokens exceeds capacity 48");
    // Page sizes and counts.
    let with_pool = |layout: CacheLayout, pages_per_seq| AttentionParams {
        layout,
        paging: Some(Paging { pages_per_seq }),
        ..attention
    };
    assert_param_error(
        with_pool(CacheLayout::token_major(8, 2, 12, 64, 0), 3).validate(&ctx),
        "layout.capacity",
        "page_size 12 is not a multiple of 8",
    );
    assert_param_error(
        with_pool(CacheLayout::token_major(8, 2, 264, 64, 0), 3).validate(&ctx),
        "layout.capacity",
        "page_size 264",
    );
    assert_param_error(with_pool(pool, 0).validate(&ctx), "pages_per_seq", "0 pages");
    assert_param_error(
        with_pool(CacheLayout::token_major(0, 2, 16, 64, 0), 3).validate(&ctx),
        "layout.n_seqs",
        "at least 1 page",
    );

    // A paged call without its tables is refused before anything is recorded.
    let b = Buffer::new(&ctx, "b", 1 << 16, Location::Device).expect("buffer");
    let small = Buffer::new(&ctx, "small", 20, Location::Device).expect("buffer");
    let bufs = AttentionBuffers {
        q: &b,
        seq_lens: &b,
        k_cache: &b,
        v_cache: &b,
        out: &b,
        partial_o: &b,
        partial_ml: &b,
        counters: &b,
        sinks: None,
        new_k: Some(&b),
        new_v: Some(&b),
        qk_norm_rope: None,
        block_tables: None,
    };
    let mut rec = Recorder::new(&ctx).expect("recorder");
    let e = attention::record(&mut rec, &ctx, &attention, bufs, None).expect_err("refused").to_string();
    assert!(e.contains("block_tables"), "{e}");
    let bufs = AppendBuffers { new_k: &b, new_v: &b, start: &b, k_cache: &b, v_cache: &b, block_tables: None };
    let e = kv_append::record(&mut rec, &ctx, &append, bufs, None).expect_err("refused").to_string();
    assert!(e.contains("block_tables"), "{e}");
    let bufs = AppendBuffers { new_k: &b, new_v: &b, start: &b, k_cache: &b, v_cache: &b, block_tables: Some(&small) };
    let e = kv_append::record(&mut rec, &ctx, &append, bufs, None).expect_err("refused").to_string();
    assert!(e.contains("block_tables") && e.contains("24 needed"), "{e}");
}

/// The shaders' own guard: a table entry naming a page outside the pool (the page just past it,
/// inside the buffer and NaN there, or one past the buffer) is never read or written. Attention
/// reads such rows as zeros (vector and scalar loads); the append skips their tokens. The host
/// checks refuse such tables, so this calls `record` without them.
#[test]
fn pages_outside_the_pool_are_never_read_or_written() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let (dtype, d, ps, n_pages) = (Dtype::F32, 32, 8, 3);
    let tables = [0u32, 3, 1000];
    for pad in [0, 1] {
        let what = format!("out-of-pool pages, pad {pad}");
        // The buffer holds one page more than the layout's pool, NaN.
        let slack = PagedLayout::head_major(1, d, pad, ps, n_pages + 1, vec![vec![0, 1, 2]]);
        let pool = CacheLayout {
            n_seqs: n_pages,
            n_kv_heads: 1,
            capacity: ps,
            head_dim: d,
            stride_seq: slack.stride_page,
            stride_head: slack.stride_head,
            stride_pos: slack.stride_pos,
        };
        let mut rng = Rng::stream(pad as u64, "out-of-pool");
        let mut values = normal(&mut rng, slack.min_elements());
        values[pool.min_elements()..].fill(f32::NAN);
        let up = |name: &str, bytes: &[u8]| upload(&ctx, name, bytes, Location::Upload);
        let table_b = up("block_tables", &words(&tables));
        let paging = Some(Paging { pages_per_seq: 3 });

        let (hq, len) = (2, 24);
        let params = AttentionParams {
            n_seqs: 1,
            n_queries: 1,
            n_q_heads: hq,
            n_kv_heads: 1,
            head_dim: d,
            dtype,
            layout: pool,
            scale: 0.2,
            split_chunk: None,
            window: None,
            softcap: None,
            sinks: false,
            fused: false,
            qk_norm_rope: None,
            paging,
        };
        let q = normal(&mut rng, hq * d);
        let (qb, lens) = (up("q", &f32_bytes(&q)), up("seq_lens", &words(&[len as u32])));
        let cache = up("pool", &f32_bytes(&values));
        let out = upload(&ctx, "out", &f32_bytes(&[f32::NAN; 64]), Location::Readback);
        let (po, pml, counters) = split_scratch(&ctx, &params);
        let bufs = AttentionBuffers {
            q: &qb,
            seq_lens: &lens,
            k_cache: &cache,
            v_cache: &cache,
            out: &out,
            partial_o: &po,
            partial_ml: &pml,
            counters: &counters,
            sinks: None,
            new_k: None,
            new_v: None,
            qk_norm_rope: None,
            block_tables: Some(&table_b),
        };
        let mut rec = Recorder::new(&ctx).expect("recorder");
        attention::record(&mut rec, &ctx, &params, bufs, None).expect(&what);
        rec.submit().expect("submit");
        let got = read_f32(&out);
        // The reference: entries 1 and 2 through two pages of zeros (ids 4 and 5 past the slack).
        let mut zeroed = values.clone();
        zeroed.resize(zeroed.len() + 2 * slack.stride_page, 0.0);
        let reader = PagedLayout::head_major(1, d, pad, ps, n_pages + 3, vec![vec![0, 4, 5]]);
        let (k, view) = reader.gather(&zeroed, len);
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: hq, n_kv_heads: 1, head_dim: d };
        let reference = Reference { shape, q: &q, k: &k, v: &k, view: &view, seq_lens: &[len] };
        reference.compare(&what, &got, params.scale, None).unwrap_or_else(|e| panic!("{e}"));

        // The append of positions 5..17: only 5..8 (entry 0) land; entries 1 and 2 are skipped.
        let append = AppendParams { n_seqs: 1, n_new: 12, n_kv_heads: 1, head_dim: d, dtype, layout: pool, paging };
        let before: Vec<u8> = (0..slack.min_elements() * 4).map(|_| rng.next_u32() as u8).collect();
        let new = normal(&mut rng, append.new_elements());
        let mut want = before.clone();
        kv_append_paged(dtype, &mut want, &slack, &new[..3 * d], 3, &[5]);
        let (new_b, start) = (up("new", &f32_bytes(&new)), up("start", &words(&[5])));
        let k_cache = upload(&ctx, "k_pool", &before, Location::Readback);
        let v_cache = upload(&ctx, "v_pool", &before, Location::Readback);
        let bufs = AppendBuffers {
            new_k: &new_b,
            new_v: &new_b,
            start: &start,
            k_cache: &k_cache,
            v_cache: &v_cache,
            block_tables: Some(&table_b),
        };
        let mut rec = Recorder::new(&ctx).expect("recorder");
        kv_append::record(&mut rec, &ctx, &append, bufs, None).expect(&what);
        rec.submit().expect("submit");
        for (which, pool) in [("K pool", &k_cache), ("V pool", &v_cache)] {
            same_bytes(&what, which, dtype, &pool.read().expect("read"), &want).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}
