//! Turns a case into the exact bytes the GPU sees, and the values the reference sees.
//!
//! Generation is a pure function of the case (seeded [`Rng`] streams), so the CLI, the tests, the
//! fuzzer and `replay --dump` all see identical inputs. Cache bytes start as poison everywhere;
//! only visible elements get real values, already rounded to the cache dtype.

use vkdecode_reference::PagedLayout;
use vkdecode_reference::dtype::{decode, encode, store};

use super::model::{AppendCase, AppendValues, AttentionCase, Dist, Poison};
use super::rng::Rng;
use crate::implementation::SlotContract;
use crate::kernels::attention::AttentionParams;
use crate::kernels::kv_append::AppendParams;
use crate::kernels::{CacheLayout, Dtype, ParamError, invalid};
use vkdecode_reference::q8_0::{self, Q8_0_BLOCK_BYTES, QK8_0};

/// Everything one attention call reads.
#[derive(Clone, Debug)]
pub struct AttentionInputs {
    pub params: AttentionParams,
    /// `[B][n_queries][H][D]`
    pub q: Vec<f32>,
    pub seq_lens: Vec<u32>,
    /// Raw cache bytes (poison included), as uploaded.
    pub k_bytes: Vec<u8>,
    pub v_bytes: Vec<u8>,
    /// The same caches decoded to f32 in the layout `view` (what the reference reads). In fused
    /// cases they hold the new tokens' rounded values, which the uploaded bytes do not.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The layout of `k` and `v`: the cache's own, or for a paged cache its values gathered into
    /// a contiguous head-major cache of the case's capacity.
    pub view: CacheLayout,
    /// The pool and block tables of a paged cache (the bytes above are the pool).
    pub paged: Option<PagedLayout>,
    /// Sink logits `[H]`, when the case has sinks.
    pub sinks: Option<Vec<f32>>,
    /// Fused cases: the step's new K/V as f32 `[B][n_queries][Hkv][D]`, and the cache bytes the
    /// kernel must leave behind (the uploaded bytes with the new slots written).
    pub fused: Option<FusedInputs>,
}

/// The extra inputs and expectations of a fused append + attend case.
#[derive(Clone, Debug)]
pub struct FusedInputs {
    pub new_k: Vec<f32>,
    pub new_v: Vec<f32>,
    pub k_after: Vec<u8>,
    pub v_after: Vec<u8>,
}

/// Everything one append reads, and the cache contents before it.
#[derive(Clone, Debug)]
pub struct AppendInputs {
    pub params: AppendParams,
    /// `[B][n_new][Hkv][D]`
    pub new_k: Vec<f32>,
    pub new_v: Vec<f32>,
    pub starts: Vec<u32>,
    /// Cache bytes before the append: random canary bytes, so any stray write shows.
    pub k_before: Vec<u8>,
    pub v_before: Vec<u8>,
    /// The pool and block tables of a paged cache (the bytes above are the pool).
    pub paged: Option<PagedLayout>,
}

/// A paged layout's block tables as the kernels take them: u32 `[B][pages_per_seq]`.
pub fn block_table_words(paged: &PagedLayout) -> Vec<u32> {
    paged.block_tables.concat()
}

fn draw(rng: &mut Rng, dist: Dist) -> f32 {
    match dist {
        Dist::Normal { mean, std } => (f64::from(mean) + f64::from(std) * rng.normal()) as f32,
        Dist::Uniform { lo, hi } => (f64::from(lo) + (f64::from(hi) - f64::from(lo)) * rng.unit()) as f32,
    }
}

fn poison_bits(dtype: Dtype, poison: Poison, rng: &mut Rng) -> u32 {
    match (poison, dtype) {
        (Poison::Nan, Dtype::F32) => 0x7fc0_0000,
        (Poison::Nan, Dtype::F16) => 0x7e00,
        (Poison::Nan, Dtype::Bf16) => 0x7fc0,
        (Poison::Inf, Dtype::F32) => 0x7f80_0000,
        (Poison::Inf, Dtype::F16) => 0x7c00,
        (Poison::Inf, Dtype::Bf16) => 0x7f80,
        (Poison::Garbage, Dtype::F32) => rng.next_u32(),
        (Poison::Garbage, _) => rng.next_u32() & 0xffff,
        (_, Dtype::Q8_0) => unreachable!("q8_0 cases are refused before their data is drawn"),
        (Poison::Zero, _) => 0,
        (Poison::Large, _) => {
            let magnitude = 32.0 + 64.0 * rng.unit();
            let x = if rng.below(2) == 0 { magnitude } else { -magnitude };
            encode(dtype, x as f32)
        }
    }
}

/// Poison for one q8_0 block: a NaN or Inf scale (with nonzero values, so every one decodes to
/// NaN or ±Inf), random bytes, zeros, or a scale of ½ with |values| of 32..63.5.
fn poison_block(block: &mut [u8], poison: Poison, rng: &mut Rng) {
    let scale: u16 = match poison {
        Poison::Nan => 0x7e00,
        Poison::Inf => 0x7c00,
        Poison::Large => 0x3800,
        Poison::Zero => return block.fill(0),
        Poison::Garbage => return block.iter_mut().for_each(|b| *b = rng.next_u32() as u8),
    };
    block[..2].copy_from_slice(&scale.to_le_bytes());
    for q in &mut block[2..] {
        let magnitude = 64 + rng.below(64) as i8;
        *q = (if rng.below(2) == 0 { magnitude } else { -magnitude }) as u8;
    }
}

/// Writes the element `bits` into every element of `bytes`.
fn fill(dtype: Dtype, bytes: &mut [u8], bits: u32) {
    let size = dtype.size();
    let pattern = &bits.to_le_bytes()[..size];
    bytes.chunks_exact_mut(size).for_each(|e| e.copy_from_slice(pattern));
}

/// Every element of a little-endian cache decoded to f32 (as `dtype::decode` does, in bulk).
fn decode_all(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::Bf16 => {
            bytes.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
        }
        Dtype::Q8_0 => vkdecode_reference::q8_0::dequantize_cache(bytes, bytes.len() / 34 * 32),
    }
}

/// Materializes an attention case for a kernel that never reads unused slots.
pub fn attention_inputs(case: &AttentionCase) -> Result<AttentionInputs, ParamError> {
    attention_inputs_for(case, SlotContract::Poison)
}

/// Materializes an attention case for a kernel with the slot contract `slots`: under
/// [`SlotContract::Finite`], NaN, Inf and garbage poison become [`Poison::Large`].
pub fn attention_inputs_for(case: &AttentionCase, slots: SlotContract) -> Result<AttentionInputs, ParamError> {
    let params = case.params()?;
    if params.dtype == Dtype::Q8_0 && params.fused {
        return Err(invalid("fused", "q8_0 caches cannot be fused yet (the kernel quantizes only in kv_append)"));
    }
    let paged = case.paged_layout()?;
    let poison = case.data.poison.under(slots);
    let p = &params;
    let layout = p.layout;
    // Element index of (seq, head, pos, d): through the block tables for a paged cache.
    let place = |b, h, pos, d| match &paged {
        Some(paged) => paged.offset(b, h, pos, d),
        None => layout.offset(b, h, pos, d),
    };
    let dtype = p.dtype;
    let seed = case.data.seed;

    let mut rng = Rng::stream(seed, "q");
    let q: Vec<f32> = (0..p.q_elements()).map(|_| draw(&mut rng, case.data.q)).collect();

    let n = layout.min_elements();
    let mut k_bytes = vec![0u8; dtype.cache_bytes(n)];
    let mut v_bytes = vec![0u8; dtype.cache_bytes(n)];
    let mut poison_rng = Rng::stream(seed, "poison");
    if dtype == Dtype::Q8_0 {
        for bytes in [&mut k_bytes, &mut v_bytes] {
            bytes.chunks_exact_mut(Q8_0_BLOCK_BYTES).for_each(|b| poison_block(b, poison, &mut poison_rng));
        }
    } else if matches!(poison, Poison::Garbage | Poison::Large) {
        for i in 0..n {
            store(dtype, &mut k_bytes, i, poison_bits(dtype, poison, &mut poison_rng));
            store(dtype, &mut v_bytes, i, poison_bits(dtype, poison, &mut poison_rng));
        }
    } else {
        // A constant pattern draws nothing from the stream: fill element-wise by copy.
        let bits = poison_bits(dtype, poison, &mut poison_rng);
        fill(dtype, &mut k_bytes, bits);
        fill(dtype, &mut v_bytes, bits);
    }
    let (mut krng, mut vrng) = (Rng::stream(seed, "k"), Rng::stream(seed, "v"));
    let group = p.n_q_heads / p.n_kv_heads;
    let nq = p.n_queries;
    let mut new_k = vec![0f32; if p.fused { p.new_kv_elements() } else { 0 }];
    let mut new_v = new_k.clone();
    // q8_0: a row's values, quantized block by block once drawn.
    let (mut k_row, mut v_row) = (vec![0f32; p.head_dim], vec![0f32; p.head_dim]);
    for (b, &len) in case.seq_lens.iter().enumerate() {
        for h in 0..p.n_kv_heads {
            for pos in 0..len {
                // Fused: the last n_queries positions are the step's new tokens.
                let new_index =
                    (p.fused && pos + nq >= len).then(|| ((b * nq + pos + nq - len) * p.n_kv_heads + h) * p.head_dim);
                for d in 0..p.head_dim {
                    let i = place(b, h, pos, d);
                    let mut kx = draw(&mut krng, case.data.k);
                    if let Some(peak) = case.data.peak
                        && peak.position == pos
                    {
                        // Align with the group's first head of the last query token.
                        let qi = ((b * p.n_queries + p.n_queries - 1) * p.n_q_heads + h * group) * p.head_dim + d;
                        kx = peak.gain * q[qi];
                    }
                    let vx = draw(&mut vrng, case.data.v);
                    if dtype == Dtype::Q8_0 {
                        (k_row[d], v_row[d]) = (kx, vx);
                    } else {
                        store(dtype, &mut k_bytes, i, encode(dtype, kx));
                        store(dtype, &mut v_bytes, i, encode(dtype, vx));
                    }
                    if let Some(base) = new_index {
                        (new_k[base + d], new_v[base + d]) = (kx, vx);
                    }
                }
                if dtype == Dtype::Q8_0 {
                    let at = place(b, h, pos, 0);
                    for (which, row, bytes) in [("k", &k_row, &mut k_bytes), ("v", &v_row, &mut v_bytes)] {
                        let blocks = q8_0::quantize_row(row).map_err(|e| {
                            invalid("data", format!("{which} of sequence {b}, kv head {h}, position {pos}: {e}"))
                        })?;
                        let start = at / QK8_0 * Q8_0_BLOCK_BYTES;
                        bytes[start..start + blocks.len()].copy_from_slice(&blocks);
                    }
                }
            }
        }
    }
    let (mut k, mut v) = (decode_all(dtype, &k_bytes), decode_all(dtype, &v_bytes));
    let mut view = layout;
    if let Some(paged) = &paged {
        (k, view) = paged.gather(&k, case.capacity);
        (v, _) = paged.gather(&v, case.capacity);
    }
    let fused = p.fused.then(|| {
        let (k_after, v_after) = (k_bytes.clone(), v_bytes.clone());
        // The slots the kernel writes start as poison, so a kernel that reads them shows.
        let mut rng = Rng::stream(seed, "fused-poison");
        for (b, &len) in case.seq_lens.iter().enumerate() {
            for h in 0..p.n_kv_heads {
                for pos in len - nq..len {
                    for d in 0..p.head_dim {
                        let i = place(b, h, pos, d);
                        let poison = if poison == Poison::Zero { Poison::Nan.under(slots) } else { poison };
                        store(dtype, &mut k_bytes, i, poison_bits(dtype, poison, &mut rng));
                        store(dtype, &mut v_bytes, i, poison_bits(dtype, poison, &mut rng));
                    }
                }
            }
        }
        FusedInputs { new_k, new_v, k_after, v_after }
    });
    let sinks = case.sinks.map(|dist| {
        let mut rng = Rng::stream(seed, "sinks");
        (0..p.n_q_heads).map(|_| draw(&mut rng, dist)).collect()
    });
    let seq_lens = case.seq_lens.iter().map(|&l| l as u32).collect();
    Ok(AttentionInputs { params, q, seq_lens, k_bytes, v_bytes, k, v, view, paged, sinks, fused })
}

/// One hostile f32 for conversion to `dtype`.
fn hostile(rng: &mut Rng, dtype: Dtype) -> f32 {
    let sign = if rng.below(2) == 0 { 0 } else { 0x8000_0000u32 };
    let bits = match rng.below(20) {
        0..=7 => return rng.normal() as f32,
        // Exactly halfway between two representable values of the cache type.
        8 | 9 => match dtype {
            Dtype::F16 => {
                let h = 0x0400 + rng.below(0x7800 - 0x0400) as u32; // a normal f16
                decode(Dtype::F16, h).to_bits() | 0x1000 | sign // + half an f16 ulp
            }
            _ => ((rng.next_u32() & 0x7f7f_0000) | 0x8000) | sign,
        },
        // f16 subnormal range, including ties at its bottom.
        10 => (((rng.below(0x0400) as u32) << 13) + 0x3300_0000 + (rng.next_u32() & 0x1fff)) | sign,
        11 => (rng.next_u32() & 0x007f_ffff) | sign, // f32 denormal
        12 => (0x4780_0000 + (rng.next_u32() & 0x07ff_ffff)) | sign, // past the f16 range
        13 => 0x7f80_0000 | (1 + rng.below(0x007f_ffff) as u32) | sign, // NaN with payload
        14 => 0x7f80_0000 | sign,
        15 => sign,
        _ => rng.next_u32(),
    };
    f32::from_bits(bits)
}

/// One hostile q8_0 block, always one ggml defines (finite, amax in 127·2^-128..127·65504):
/// exact ties after the multiply by 1/d, ±amax, a zero block, subnormal values beside a small
/// amax, or normal values; d = 2^-40..2^15.
fn hostile_block(rng: &mut Rng) -> [f32; QK8_0] {
    let scale = 2f32.powi(rng.below(56) as i32 - 40);
    let sign = |rng: &mut Rng, x: f32| if rng.below(2) == 0 { x } else { -x };
    let mut x: [f32; QK8_0] = match rng.below(6) {
        // d = 127·s/127 = s exactly, so (j + ½)·s multiplies to a tie.
        0 => std::array::from_fn(|_| {
            let x = (rng.below(127) as f32 + 0.5) * scale;
            sign(rng, x)
        }),
        1 => std::array::from_fn(|_| {
            let x = rng.unit() as f32 * 127.0 * scale;
            sign(rng, x)
        }),
        2 => return [0.0; QK8_0],
        3 => std::array::from_fn(|_| {
            let x = f32::from_bits(rng.below(0x0080_0000) as u32);
            sign(rng, x)
        }),
        _ => std::array::from_fn(|_| (rng.normal() * f64::from(scale)) as f32),
    };
    // Pin amax: ±127·s at a random place (the ties above need exactly this scale; subnormals need
    // a normal amax beside them).
    let at = rng.below(QK8_0 as u64) as usize;
    x[at] = sign(rng, 127.0 * scale);
    x
}

/// Materializes an append case.
pub fn append_inputs(case: &AppendCase) -> Result<AppendInputs, ParamError> {
    let params = case.params()?;
    let paged = case.paged_layout()?;
    let seed = case.data.seed;
    let n_new = params.new_elements();
    let value = |stream: &str| {
        let mut rng = Rng::stream(seed, stream);
        match (case.data.values, params.dtype) {
            // Rows are whole blocks (head_dim is a multiple of 32), so blocks never straddle rows.
            (AppendValues::Hostile, Dtype::Q8_0) => (0..n_new / QK8_0).flat_map(|_| hostile_block(&mut rng)).collect(),
            (AppendValues::Hostile, dtype) => (0..n_new).map(|_| hostile(&mut rng, dtype)).collect(),
            (AppendValues::Normal, _) => (0..n_new).map(|_| rng.normal() as f32).collect::<Vec<f32>>(),
        }
    };
    let (new_k, new_v) = (value("new_k"), value("new_v"));
    let bytes = params.dtype.cache_bytes(params.layout.min_elements());
    let mut canary = Rng::stream(seed, "canary");
    let k_before = (0..bytes).map(|_| canary.next_u32() as u8).collect();
    let v_before = (0..bytes).map(|_| canary.next_u32() as u8).collect();
    let starts = case.starts.iter().map(|&s| s as u32).collect();
    Ok(AppendInputs { params, new_k, new_v, starts, k_before, v_before, paged })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vkdecode_reference::dtype::load;

    #[test]
    fn bulk_decode_matches_the_reference_decode() {
        let mut rng = Rng::new(3);
        for dtype in Dtype::ALL {
            let bytes: Vec<u8> = (0..4096).map(|_| rng.next_u32() as u8).collect();
            let bulk = decode_all(dtype, &bytes);
            for (i, &x) in bulk.iter().enumerate() {
                assert_eq!(x.to_bits(), decode(dtype, load(dtype, &bytes, i)).to_bits(), "{dtype} element {i}");
            }
        }
    }

    #[test]
    fn fill_writes_every_element() {
        let mut bytes = vec![0u8; 10];
        fill(Dtype::F16, &mut bytes, 0x7e00);
        assert!((0..5).all(|i| load(Dtype::F16, &bytes, i) == 0x7e00));
    }
}
