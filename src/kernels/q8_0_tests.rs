//! q8_0 KV caches through both kernels, on the device, against the reference: the append
//! bit-exact with `kv_append` / `kv_append_paged` (ggml's quantizer; every other byte of the cache
//! unchanged), attention within the f32 bound of the reference over the dequantized cache
//! (`q8_0::dequantize_cache`, gathered through the tables when paged). Unused blocks hold a NaN
//! scale (0x7e00), so a read of one shows. The q8_0 mutants are caught here.

use std::sync::Arc;

use super::attention::{self, AttentionBuffers, AttentionMutant, AttentionParams};
use super::kv_append::{self, AppendBuffers, AppendMutant, AppendParams};
use super::test_support::{read_f32, split_scratch, upload};
use super::{CacheLayout, Dtype, Paging, ParamError, words};
use crate::cases::rng::Rng;
use crate::cases::run::f32_bytes;
use crate::cases::tolerance::attention_element_bound;
use crate::gpu::{Buffer, Context, Location, Recorder};
use crate::reference::q8_0::{self, Q8_0_BLOCK_BYTES, QK8_0};
use crate::reference::{AttentionOptions, AttentionShape, PagedLayout, decode_attention_with, kv_append_paged};

/// The scale bits of a poisoned block: f16 NaN.
const POISON_SCALE: [u8; 2] = [0x00, 0x7e];

/// A q8_0 cache: the kernels' layout (the pool when paged), the reference's paged layout and the
/// tables as the kernels take them.
struct Cache {
    layout: CacheLayout,
    paging: Option<Paging>,
    paged: Option<PagedLayout>,
    tables: Vec<u32>,
    capacity: usize,
}

impl Cache {
    /// `rows`: (token-major, pad); `pages`: (page size, pages per sequence), tables a shuffled
    /// pool with one spare page.
    fn new(
        n_seqs: usize,
        hkv: usize,
        d: usize,
        (token_major, pad): (bool, usize),
        pages: (usize, usize),
        paged: bool,
        rng: &mut Rng,
    ) -> Cache {
        let (ps, pps) = pages;
        let capacity = ps * pps;
        if !paged {
            let layout = if token_major {
                CacheLayout::token_major(n_seqs, hkv, capacity, d, pad)
            } else {
                CacheLayout::head_major(n_seqs, hkv, capacity, d, pad)
            };
            return Cache { layout, paging: None, paged: None, tables: Vec::new(), capacity };
        }
        let n_pages = n_seqs * pps + 1;
        let mut ids: Vec<u32> = (0..n_pages as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let tables: Vec<Vec<u32>> = (0..n_seqs).map(|b| ids[b * pps..][..pps].to_vec()).collect();
        let paged = if token_major {
            PagedLayout::token_major(hkv, d, pad, ps, n_pages, tables)
        } else {
            PagedLayout::head_major(hkv, d, pad, ps, n_pages, tables)
        };
        paged.validate().expect("a valid paged layout");
        let layout = paged.pool();
        let tables = paged.block_tables.concat();
        Cache { layout, paging: Some(Paging { pages_per_seq: pps }), paged: Some(paged), tables, capacity }
    }

    fn place(&self, b: usize, h: usize, pos: usize, d: usize) -> usize {
        match &self.paged {
            Some(paged) => paged.offset(b, h, pos, d),
            None => self.layout.offset(b, h, pos, d),
        }
    }

    fn bytes(&self) -> usize {
        Dtype::Q8_0.cache_bytes(self.layout.min_elements())
    }

    /// The cache dequantized, contiguous, as the reference reads it.
    fn view(&self, bytes: &[u8]) -> (Vec<f32>, CacheLayout) {
        let values = q8_0::dequantize_cache(bytes, self.layout.min_elements());
        match &self.paged {
            Some(paged) => paged.gather(&values, self.capacity),
            None => (values, self.layout),
        }
    }

    fn append(&self, bytes: &mut [u8], new: &[f32], n_new: usize, start: &[usize]) {
        match &self.paged {
            Some(paged) => kv_append_paged(Dtype::Q8_0, bytes, paged, new, n_new, start),
            None => crate::reference::kv_append(Dtype::Q8_0, bytes, &self.layout, new, n_new, start),
        }
    }

    fn tables_buffer(&self, ctx: &Arc<Context>) -> Option<Buffer> {
        self.paging.map(|_| upload(ctx, "block_tables", &words(&self.tables), Location::Upload))
    }
}

/// Blocks of random bytes whose scale is the NaN poison.
fn poisoned(rng: &mut Rng, bytes: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u32() as u8).collect();
    for block in out.chunks_exact_mut(Q8_0_BLOCK_BYTES) {
        block[..2].copy_from_slice(&POISON_SCALE);
    }
    out
}

/// The first block where two caches differ, as an error.
fn same_blocks(what: &str, which: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    match got.chunks(Q8_0_BLOCK_BYTES).zip(want.chunks(Q8_0_BLOCK_BYTES)).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => {
            let at = i * Q8_0_BLOCK_BYTES;
            let end = (at + Q8_0_BLOCK_BYTES).min(want.len());
            Err(format!("{what}: {which} block {i} is {:02x?}, expected {:02x?}", &got[at..end], &want[at..end]))
        }
    }
}

/// Runs one append on the device into caches of `before` and returns the K and V caches.
fn gpu_append(
    ctx: &Arc<Context>,
    params: &AppendParams,
    tables: Option<&Buffer>,
    before: &[u8],
    new: [&[f32]; 2],
    start: &[u32],
    mutant: Option<AppendMutant>,
) -> Result<[Vec<u8>; 2], String> {
    let up = |name: &str, bytes: &[u8]| upload(ctx, name, bytes, Location::Upload);
    let (new_k, new_v, start_b) =
        (up("new_k", &f32_bytes(new[0])), up("new_v", &f32_bytes(new[1])), up("start", &words(start)));
    let k_cache = upload(ctx, "k_cache", before, Location::Readback);
    let v_cache = upload(ctx, "v_cache", before, Location::Readback);
    let bufs = AppendBuffers {
        new_k: &new_k,
        new_v: &new_v,
        start: &start_b,
        k_cache: &k_cache,
        v_cache: &v_cache,
        block_tables: tables,
    };
    let mut rec = Recorder::new(ctx).expect("recorder");
    kv_append::record(&mut rec, ctx, params, bufs, mutant).map_err(|e| e.to_string())?;
    rec.submit().expect("submit");
    Ok([k_cache.read().expect("read"), v_cache.read().expect("read")])
}

/// A block's values, filtered to those ggml defines (the reference's precondition).
fn defined(x: [f32; QK8_0]) -> Option<[f32; QK8_0]> {
    q8_0::quantize_block(&x).ok().map(|_| x)
}

/// Hostile blocks for the quantizer: ties after the multiply, zero blocks, ±amax, amax at both
/// ends of the defined range, subnormal inputs, and random normal blocks of many magnitudes.
fn hostile_blocks(rng: &mut Rng) -> Vec<[f32; QK8_0]> {
    let mut blocks = Vec::new();
    let mut push = |x: [f32; QK8_0]| blocks.extend(defined(x));
    push([0.0; QK8_0]);
    push([-0.0; QK8_0]);
    // Ties: d a power of two (amax = 127·2^k), so x = (j + ½)·2^k gives x·id = j + ½ exactly.
    for k in [-100, -20, -3, 0, 1, 7, 15] {
        let s = 2f32.powi(k);
        push(std::array::from_fn(|j| {
            if j == 0 { 127.0 * s } else { ((j as f32 - 16.0) * 3.7).trunc().clamp(-126.0, 126.0) * s + 0.5 * s }
        }));
        push(std::array::from_fn(|j| if j == 31 { -127.0 * s } else { (j as f32 * 4.0 - 62.5) * s }));
    }
    // Near-ties for arbitrary amax: x a few ulps around (k + ½)·d, some of which round to the tie.
    for _ in 0..600 {
        let amax = (0.5 + rng.unit() as f32) * 2f32.powi(rng.below(40) as i32 - 20);
        let d = amax / 127.0;
        let mut x = [0.0f32; QK8_0];
        x[0] = if rng.below(2) == 0 { amax } else { -amax };
        for v in &mut x[1..] {
            let k = rng.below(127) as f32;
            let mid = (k + 0.5) * d;
            let ulps = rng.below(7) as i32 - 3;
            let y = f32::from_bits(mid.to_bits().wrapping_add_signed(ulps)).min(amax);
            *v = if rng.below(2) == 0 { y } else { -y };
        }
        push(x);
    }
    // ±amax exactly (qs ±127) with random fill.
    for _ in 0..100 {
        let amax = (0.5 + rng.unit() as f32) * 2f32.powi(rng.below(60) as i32 - 40);
        let mut x: [f32; QK8_0] = std::array::from_fn(|_| (rng.unit() as f32 * 2.0 - 1.0) * amax);
        x[rng.below(32) as usize] = amax;
        x[rng.below(32) as usize] = -amax;
        push(x);
    }
    // amax just above the 1/d overflow threshold (d subnormal in f32) and just below f16 overflow
    // of d: the first and last defined amax around each boundary, and their neighbours.
    let low = (127.0f32 * 2f32.powi(-128)).to_bits();
    let high = (65504.0f32 * 127.0).to_bits();
    for bits in (low - 200..low + 200).step_by(3).chain(high - 300..high + 300) {
        let amax = f32::from_bits(bits);
        let x: [f32; QK8_0] = std::array::from_fn(|j| match j {
            0 => amax,
            1 => -amax,
            _ => (rng.unit() as f32 * 2.0 - 1.0) * amax,
        });
        push(x);
    }
    // Subnormal inputs: beside a small normal amax (d subnormal or tiny, id huge), and alone.
    for _ in 0..300 {
        let amax = f32::from_bits(0x0080_0000 + rng.below(0x0200_0000) as u32);
        let x: [f32; QK8_0] = std::array::from_fn(|j| match j {
            0 => amax,
            _ if j % 3 == 0 => -f32::from_bits(rng.below(0x0080_0000) as u32),
            _ => f32::from_bits(rng.below(0x0080_0000) as u32),
        });
        push(x);
    }
    // Random normal blocks, amax from 2^-40 to 2^22.
    for n in 0..3000 {
        let magnitude = 2f64.powi((n % 63) - 40);
        push(std::array::from_fn(|_| (rng.normal() * magnitude) as f32));
    }
    blocks
}

/// Quantizes `blocks` on the device (rows of 8 blocks, one sequence and head) and returns the
/// cache, or why not.
fn gpu_quantize(ctx: &Arc<Context>, blocks: &[[f32; QK8_0]], mutant: Option<AppendMutant>) -> Result<Vec<u8>, String> {
    let per_row = 8;
    let rows = blocks.len().div_ceil(per_row);
    let mut values: Vec<f32> = blocks.concat();
    values.resize(rows * per_row * QK8_0, 0.0);
    let layout = CacheLayout::head_major(1, 1, rows, per_row * QK8_0, 0);
    let params = AppendParams {
        n_seqs: 1,
        n_new: rows,
        n_kv_heads: 1,
        head_dim: per_row * QK8_0,
        dtype: Dtype::Q8_0,
        layout,
        paging: None,
    };
    params.validate(ctx).map_err(|e| e.to_string())?;
    let before = vec![0xa5u8; Dtype::Q8_0.cache_bytes(layout.min_elements())];
    let [k, v] = gpu_append(ctx, &params, None, &before, [&values, &values], &[0], mutant)?;
    same_blocks("quantizer", "V against K", &v, &k)?;
    Ok(k)
}

#[test]
fn the_gpu_quantizer_matches_ggml_on_hostile_blocks() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let mut rng = Rng::stream(1, "q8_0-hostile");
    let blocks = hostile_blocks(&mut rng);
    assert!(blocks.len() > 4000, "{} blocks", blocks.len());
    // The boundaries are really there: d subnormal in f32 (id near overflow), d near the f16 max.
    let amax = |x: &[f32; QK8_0]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(blocks.iter().any(|x| amax(x) > 0.0 && amax(x) / 127.0 < f32::MIN_POSITIVE));
    assert!(blocks.iter().any(|x| amax(x) / 127.0 > 65000.0));
    let got = gpu_quantize(&ctx, &blocks, None).unwrap_or_else(|e| panic!("{e}"));
    for (i, (x, g)) in blocks.iter().zip(got.chunks_exact(Q8_0_BLOCK_BYTES)).enumerate() {
        let want = q8_0::quantize_block(x).unwrap();
        assert_eq!(g, &want[..], "block {i}: x = {x:?}");
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

#[test]
fn q8_round_half_even_fails_the_ties_and_spares_other_dtypes() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let mut rng = Rng::stream(1, "q8_0-hostile");
    let blocks = hostile_blocks(&mut rng);
    let got = gpu_quantize(&ctx, &blocks, Some(AppendMutant::Q8RoundHalfEven)).unwrap_or_else(|e| panic!("{e}"));
    let caught =
        blocks.iter().zip(got.chunks_exact(Q8_0_BLOCK_BYTES)).any(|(x, g)| g != q8_0::quantize_block(x).unwrap());
    assert!(caught, "q8_round_half_even survives the hostile blocks");
    // And the append cases: the near-ties of random rows catch it there too; f16 is unaffected.
    let case = &append_cases()[0];
    assert!(check_append_case(&ctx, case, Some(AppendMutant::Q8RoundHalfEven)).is_err());
    assert_eq!(check_f16_append(&ctx, Some(AppendMutant::Q8RoundHalfEven)), Ok(()));
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// A q8_0 append case: geometry, starts and the number of new tokens.
#[derive(Clone, Debug)]
struct AppendCase {
    name: &'static str,
    n_kv_heads: usize,
    head_dim: usize,
    token_major: bool,
    pad: usize,
    pages: (usize, usize),
    paged: bool,
    starts: Vec<usize>,
    n_new: usize,
}

fn append_cases() -> Vec<AppendCase> {
    let case = |name, n_kv_heads, head_dim, token_major, pad, pages, paged, starts: &[usize], n_new| AppendCase {
        name,
        n_kv_heads,
        head_dim,
        token_major,
        pad,
        pages,
        paged,
        starts: starts.to_vec(),
        n_new,
    };
    vec![
        case("append/q8_0/head-major/d64", 2, 64, false, 0, (16, 3), false, &[3, 40], 5),
        case("append/q8_0/token-major/d128/pad32", 3, 128, true, 32, (8, 4), false, &[31, 0, 17], 1),
        case("append/q8_0/head-major/d32/pad32", 1, 32, false, 32, (24, 2), false, &[20, 43], 4),
        case("append/q8_0/paged/head-major/d96/page16", 2, 96, false, 0, (16, 3), true, &[14, 0, 44], 4),
        case("append/q8_0/paged/token-major/d256/pad32/page8", 2, 256, true, 32, (8, 4), true, &[6, 29], 3),
    ]
}

/// One append case, K and V from different values, against the reference: bit-exact, every byte
/// outside the written blocks unchanged (the caches start as random bytes).
fn check_append_case(ctx: &Arc<Context>, case: &AppendCase, mutant: Option<AppendMutant>) -> Result<(), String> {
    let mut rng = Rng::stream(3, case.name);
    let n_seqs = case.starts.len();
    let cache = Cache::new(
        n_seqs,
        case.n_kv_heads,
        case.head_dim,
        (case.token_major, case.pad),
        case.pages,
        case.paged,
        &mut rng,
    );
    let params = AppendParams {
        n_seqs,
        n_new: case.n_new,
        n_kv_heads: case.n_kv_heads,
        head_dim: case.head_dim,
        dtype: Dtype::Q8_0,
        layout: cache.layout,
        paging: cache.paging,
    };
    let start: Vec<u32> = case.starts.iter().map(|&s| s as u32).collect();
    params.validate(ctx).map_err(|e| format!("{}: {e}", case.name))?;
    params.validate_starts(&start).map_err(|e| format!("{}: {e}", case.name))?;
    params.validate_block_table_writes(&cache.tables, &start).map_err(|e| format!("{}: {e}", case.name))?;
    let before: Vec<u8> = (0..cache.bytes()).map(|_| rng.next_u32() as u8).collect();
    let n = params.new_elements();
    // Normal values, with some exact ties after the multiply: amax 127 rows with halves.
    let mut new: [Vec<f32>; 2] =
        [(0..n).map(|_| rng.normal() as f32).collect(), (0..n).map(|_| rng.normal() as f32).collect()];
    for block in new[1].chunks_exact_mut(QK8_0).step_by(3) {
        for (j, v) in block.iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { (j as f32 * 7.0 - 100.0) + 0.5 };
        }
    }
    let mut want = [before.clone(), before.clone()];
    for (w, new) in want.iter_mut().zip(&new) {
        cache.append(w, new, case.n_new, &case.starts);
    }
    let tables = cache.tables_buffer(ctx);
    let [k, v] = gpu_append(ctx, &params, tables.as_ref(), &before, [&new[0], &new[1]], &start, mutant)?;
    same_blocks(case.name, "K", &k, &want[0])?;
    same_blocks(case.name, "V", &v, &want[1])?;
    if k.len() != want[0].len() {
        return Err(format!("{}: cache length changed", case.name));
    }
    Ok(())
}

/// An f16 append with the q8_0 mutant: bit-exact against the reference (the mutant is a no-op).
fn check_f16_append(ctx: &Arc<Context>, mutant: Option<AppendMutant>) -> Result<(), String> {
    use crate::reference::dtype::{encode, load};
    let layout = CacheLayout::head_major(1, 2, 8, 64, 0);
    let params =
        AppendParams { n_seqs: 1, n_new: 3, n_kv_heads: 2, head_dim: 64, dtype: Dtype::F16, layout, paging: None };
    let mut rng = Rng::stream(4, "f16");
    let new: Vec<f32> = (0..params.new_elements()).map(|_| rng.normal() as f32 + 0.5).collect();
    let before = vec![0u8; layout.min_elements() * 2];
    let [k, _] = gpu_append(ctx, &params, None, &before, [&new, &new], &[2], mutant)?;
    let mut want = before.clone();
    crate::reference::kv_append(Dtype::F16, &mut want, &layout, &new, 3, &[2]);
    match (0..layout.min_elements()).find(|&i| load(Dtype::F16, &k, i) != load(Dtype::F16, &want, i)) {
        None => Ok(()),
        Some(i) => Err(format!(
            "f16 element {i}: {:#x} vs {:#x} ({:#x})",
            load(Dtype::F16, &k, i),
            load(Dtype::F16, &want, i),
            encode(Dtype::F16, 0.0)
        )),
    }
}

#[test]
fn q8_0_append_is_bit_exact_and_leaves_every_other_byte_alone() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    for case in append_cases() {
        check_append_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

#[derive(Clone, Debug)]
struct AttentionCase {
    name: &'static str,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    token_major: bool,
    pad: usize,
    pages: (usize, usize),
    paged: bool,
    n_queries: usize,
    seq_lens: Vec<usize>,
    split_chunk: Option<usize>,
}

fn attention_cases() -> Vec<AttentionCase> {
    let case =
        |name, hq, hkv, d, token_major, pad, pages, paged, n_queries, lens: &[usize], split_chunk| AttentionCase {
            name,
            n_q_heads: hq,
            n_kv_heads: hkv,
            head_dim: d,
            token_major,
            pad,
            pages,
            paged,
            n_queries,
            seq_lens: lens.to_vec(),
            split_chunk,
        };
    vec![
        case("attention/q8_0/d32/gqa4", 8, 2, 32, false, 0, (64, 2), false, 1, &[100, 37], None),
        case(
            "attention/q8_0/d64/token-major/pad32/split64",
            4,
            4,
            64,
            true,
            32,
            (64, 3),
            false,
            2,
            &[150, 192],
            Some(64),
        ),
        case("attention/q8_0/d128/gqa2/split64", 8, 4, 128, false, 0, (64, 4), false, 1, &[230], Some(64)),
        case("attention/q8_0/d96/paged16/gqa3", 6, 2, 96, false, 0, (16, 8), true, 1, &[120, 77], Some(64)),
        case("attention/q8_0/d256/paged24/token-major/gqa8", 16, 2, 256, true, 32, (24, 6), true, 1, &[140], Some(64)),
        case("attention/q8_0/d160/gqa1", 2, 2, 160, false, 32, (128, 1), false, 1, &[128, 5], None),
    ]
}

/// One attention case on the device: the output within the f32 bound of the reference over the
/// dequantized (gathered) cache; visible positions quantized from normal values, every other block
/// NaN-scaled.
fn check_attention_case(
    ctx: &Arc<Context>,
    case: &AttentionCase,
    mutant: Option<AttentionMutant>,
) -> Result<(), String> {
    let (hq, hkv, d, nq) = (case.n_q_heads, case.n_kv_heads, case.head_dim, case.n_queries);
    let what = case.name;
    let n_seqs = case.seq_lens.len();
    let mut rng = Rng::stream(5, case.name);
    let cache = Cache::new(n_seqs, hkv, d, (case.token_major, case.pad), case.pages, case.paged, &mut rng);
    let params = AttentionParams {
        n_seqs,
        n_queries: nq,
        n_q_heads: hq,
        n_kv_heads: hkv,
        head_dim: d,
        dtype: Dtype::Q8_0,
        layout: cache.layout,
        scale: (d as f32).powf(-0.5),
        split_chunk: case.split_chunk,
        window: None,
        softcap: None,
        sinks: false,
        fused: false,
        qk_norm_rope: None,
        paging: cache.paging,
    };
    let lens: Vec<u32> = case.seq_lens.iter().map(|&l| l as u32).collect();
    params.validate(ctx).map_err(|e| format!("{what}: {e}"))?;
    params.validate_seq_lens(&lens).map_err(|e| format!("{what}: {e}"))?;
    params.validate_block_tables(&cache.tables).map_err(|e| format!("{what}: {e}"))?;

    let mut caches = [poisoned(&mut rng, cache.bytes()), poisoned(&mut rng, cache.bytes())];
    for (b, &len) in case.seq_lens.iter().enumerate() {
        for h in 0..hkv {
            for pos in 0..len {
                for c in &mut caches {
                    // Per-row magnitudes vary so the blocks' scales differ.
                    let m = 0.25 + 2.0 * rng.unit();
                    let row: Vec<f32> = (0..d).map(|_| (rng.normal() * m) as f32).collect();
                    for (j, x) in row.chunks_exact(QK8_0).enumerate() {
                        let at = cache.place(b, h, pos, j * QK8_0) / QK8_0 * Q8_0_BLOCK_BYTES;
                        c[at..at + Q8_0_BLOCK_BYTES]
                            .copy_from_slice(&q8_0::quantize_block(x.try_into().unwrap()).unwrap());
                    }
                }
            }
        }
    }
    let q: Vec<f32> = (0..params.q_elements()).map(|_| rng.normal() as f32).collect();
    let up = |name: &str, bytes: &[u8]| upload(ctx, name, bytes, Location::Upload);
    let (qb, lens_b) = (up("q", &f32_bytes(&q)), up("seq_lens", &words(&lens)));
    let (k_cache, v_cache) = (up("k_cache", &caches[0]), up("v_cache", &caches[1]));
    let out = upload(ctx, "out", &f32_bytes(&vec![f32::NAN; q.len()]), Location::Readback);
    let (po, pml, counters) = split_scratch(ctx, &params);
    let tables = cache.tables_buffer(ctx);
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
        new_k: None,
        new_v: None,
        qk_norm_rope: None,
        block_tables: tables.as_ref(),
    };
    let mut rec = Recorder::new(ctx).expect("recorder");
    attention::record(&mut rec, ctx, &params, bufs, mutant).map_err(|e| format!("{what}: {e}"))?;
    rec.submit().expect("submit");
    let got = read_f32(&out);

    let ((k, view), (v, _)) = (cache.view(&caches[0]), cache.view(&caches[1]));
    let shape = AttentionShape { n_seqs, n_queries: nq, n_q_heads: hq, n_kv_heads: hkv, head_dim: d };
    let scale = f64::from(params.scale);
    let reference =
        decode_attention_with(&shape, &q, &k, &v, &view, &case.seq_lens, scale, &AttentionOptions::default());
    for (b, &len) in case.seq_lens.iter().enumerate() {
        for t in 0..nq {
            let end = (len + t + 1).saturating_sub(nq);
            for h in 0..hq {
                let (kvh, row) = (h / (hq / hkv), ((b * nq + t) * hq + h) * d);
                let (mut s, mut v_max) = (0f64, 0f64);
                for j in 0..end {
                    let at = |x: usize| view.offset(b, kvh, j, x);
                    let dot: f64 = (0..d).map(|x| (f64::from(q[row + x]) * f64::from(k[at(x)])).abs()).sum();
                    s = s.max(scale * dot);
                    v_max = (0..d).map(|x| f64::from(v[at(x)]).abs()).fold(v_max, f64::max);
                }
                let bound = attention_element_bound(end, d, s, v_max, None);
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

#[test]
fn q8_0_attention_matches_the_reference_over_the_dequantized_cache() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    for case in attention_cases() {
        check_attention_case(&ctx, &case, None).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// The neighbour-scale mutant fails contiguous and paged q8_0 cases, and leaves an f16 call alone.
#[test]
fn q8_scale_of_next_block_is_caught_and_spares_other_dtypes() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let m = AttentionMutant::Q8NeighbourScale;
    let cases = attention_cases();
    for case in [&cases[0], &cases[3]] {
        assert!(check_attention_case(&ctx, case, Some(m)).is_err(), "{} survives {}", m.name(), case.name);
    }
    // f16: the same output with and without the mutant.
    let params = AttentionParams {
        fused: false,
        qk_norm_rope: None,
        ..AttentionParams::qwen3_decode(4, 2, 64, Dtype::F16, 128, 1e-6)
    };
    let run = |mutant| {
        let mut rng = Rng::stream(6, "f16");
        let n = params.layout.min_elements();
        let cache: Vec<u8> =
            (0..n).flat_map(|_| half::f16::from_f32(rng.normal() as f32).to_bits().to_le_bytes()).collect();
        let q: Vec<f32> = (0..params.q_elements()).map(|_| rng.normal() as f32).collect();
        let up = |name: &str, bytes: &[u8]| upload(&ctx, name, bytes, Location::Upload);
        let (qb, lens, kv) = (up("q", &f32_bytes(&q)), up("seq_lens", &words(&[100])), up("kv", &cache));
        let out = upload(&ctx, "out", &f32_bytes(&vec![0.0; q.len()]), Location::Readback);
        let (po, pml, counters) = split_scratch(&ctx, &params);
        let bufs = AttentionBuffers {
            q: &qb,
            seq_lens: &lens,
            k_cache: &kv,
            v_cache: &kv,
            out: &out,
            partial_o: &po,
            partial_ml: &pml,
            counters: &counters,
            sinks: None,
            new_k: None,
            new_v: None,
            qk_norm_rope: None,
            block_tables: None,
        };
        let mut rec = Recorder::new(&ctx).expect("recorder");
        attention::record(&mut rec, &ctx, &params, bufs, mutant).expect("record");
        rec.submit().expect("submit");
        read_f32(&out).iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
    };
    assert_eq!(run(Some(m)), run(None), "{} changes an f16 call", m.name());
    assert_eq!(ctx.take_validation_messages(), Vec::<String>::new());
}

/// The parameter and the expectation of an error.
#[track_caller]
fn assert_param_error(result: Result<(), ParamError>, name: &str, says: &str) {
    match result {
        Err(e) => assert!(e.name == name && e.problem.contains(says), "expected `{name}`: …{says}…, got {e}"),
        Ok(()) => panic!("expected an error on `{name}` saying {says:?}, got Ok"),
    }
}

#[test]
fn q8_0_geometry_and_fused_calls_are_param_errors() {
    let ctx = Context::shared().expect("a Vulkan device (lavapipe in CI)");
    let layout = CacheLayout::token_major(1, 2, 64, 64, 0);
    let append =
        AppendParams { n_seqs: 1, n_new: 1, n_kv_heads: 2, head_dim: 64, dtype: Dtype::Q8_0, layout, paging: None };
    assert_eq!(append.validate(&ctx), Ok(()));
    let attention = AttentionParams {
        fused: false,
        qk_norm_rope: None,
        layout,
        ..AttentionParams::qwen3_decode(4, 2, 64, Dtype::Q8_0, 64, 1e-6)
    };
    assert_eq!(attention.validate(&ctx), Ok(()));

    let d40 = CacheLayout::token_major(1, 2, 64, 40, 0);
    assert_param_error(
        AppendParams { head_dim: 40, layout: d40, ..append }.validate(&ctx),
        "head_dim",
        "40 is not a multiple of 32",
    );
    let pad8 = CacheLayout::token_major(1, 2, 64, 64, 8);
    assert_param_error(
        AppendParams { layout: pad8, ..append }.validate(&ctx),
        "layout.stride_pos",
        "144 is not a multiple of 32",
    );
    let head_pad = CacheLayout::head_major(1, 2, 64, 64, 16);
    assert_param_error(AttentionParams { layout: head_pad, ..attention }.validate(&ctx), "layout.stride_pos", "80");
    let mut odd_seq = CacheLayout::token_major(2, 2, 64, 64, 0);
    odd_seq.stride_seq += 16;
    assert_param_error(
        AppendParams { n_seqs: 2, layout: odd_seq, ..append }.validate(&ctx),
        "layout.stride_seq",
        "is not a multiple of 32",
    );
    // A page stride is a stride too.
    let mut pool = CacheLayout::token_major(4, 2, 16, 64, 0);
    pool.stride_seq += 48;
    let paged = AppendParams { layout: pool, paging: Some(Paging { pages_per_seq: 2 }), ..append };
    assert_param_error(paged.validate(&ctx), "layout.stride_seq", "is not a multiple of 32");

    let fused = AttentionParams::qwen3_decode(4, 2, 64, Dtype::Q8_0, 64, 1e-6);
    assert_param_error(fused.validate(&ctx), "fused", "fused with q8_0 is not supported yet");
    assert_param_error(AttentionParams { qk_norm_rope: None, ..fused }.validate(&ctx), "fused", "not supported yet");

    // A cache buffer sized per element, not per block, is refused.
    let small = Buffer::new(&ctx, "small", (layout.min_elements() + 1) as u64, Location::Device).expect("buffer");
    let b = Buffer::new(&ctx, "b", 1 << 16, Location::Device).expect("buffer");
    let bufs = AppendBuffers { new_k: &b, new_v: &b, start: &b, k_cache: &small, v_cache: &b, block_tables: None };
    let mut rec = Recorder::new(&ctx).expect("recorder");
    let e = kv_append::record(&mut rec, &ctx, &append, bufs, None).expect_err("refused").to_string();
    let need = Dtype::Q8_0.cache_bytes(layout.min_elements());
    assert!(e.contains("k_cache") && e.contains(&format!("{need} needed")), "{e}");
}
