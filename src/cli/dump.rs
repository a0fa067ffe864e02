//! `replay --dump DIR`: every input and output of one case as `.npy` arrays plus a `case.json`
//! that says what each array is and the exact semantics, so the result can be recomputed with
//! NumPy alone (no vkdecode code).
//!
//! Attention: `k.npy`/`v.npy` hold the cache values the GPU read (rounded to the cache dtype,
//! decoded to f32) as `[B, Hkv, capacity, D]`; positions at or past `seq_lens[b]` hold the poison
//! as decoded (NaN, Inf, garbage) and are never read. The raw caches as uploaded (padding
//! included) are in `k_cache_raw.npy`/`v_cache_raw.npy`, flat, in memory order: `<u4` bit patterns
//! for f32, `<u2` for f16/bf16.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Map, Value, json};
use vkdecode::cases::model::{AppendCase, AttentionCase, Case};
use vkdecode::cases::npy::{NpyData, write_atomic, write_npy};
use vkdecode::cases::run::{AppendRun, AttentionRun};
use vkdecode::kernels::{CacheLayout, Dtype};
use vkdecode::reference::PagedLayout;
use vkdecode::reference::dtype::load;

use super::report::CaseResult;

pub const ATTENTION_SEMANTICS: &str = "query t of sequence b sits at position p = seq_lens[b] - n_queries + t \
     and attends to cache positions 0..=p (p < 0: output 0); query head h reads kv head h / (n_q_heads / n_kv_heads); \
     out = softmax(scale * q·k) · v over those positions (the reference computes in f64 on the f32 values of q.npy, \
     k.npy and v.npy). Options, when present in this file: window w keeps positions max(0, p+1-w)..=p; softcap c \
     maps each scaled logit s to c*tanh(s/c); sinks.npy [H] adds exp(sink[h] - M) to the softmax denominator \
     (M the row max over logits and sink) with no value, and a row with no visible position stays 0; fused: \
     the last n_queries positions of each sequence are new tokens given in new_k.npy/new_v.npy (f32 \
     [B, n_queries, Hkv, D]), which the kernel rounds to the cache dtype, writes into the cache and attends to \
     (k.npy/v.npy already hold them rounded; k_cache_raw.npy holds the poison the kernel overwrote)";

pub const APPEND_SEMANTICS: &str = "token t of sequence b is written to position starts[b]+t at element offset \
     b*stride_seq + h*stride_head + pos*stride_pos + d, rounded to nearest even; no other element changes \
     (new_k[b, t, h, d] goes to the K cache, new_v to the V cache; f32 caches store the f32 bits unchanged; for f16 \
     and bf16 NaN becomes the canonical quiet NaN 0x7e00 / 0x7fc0 with the input's sign and overflow becomes ±Inf)";

/// A raw cache as element bit patterns.
enum Raw {
    U32(Vec<u32>),
    U16(Vec<u16>),
}

impl Raw {
    fn new(dtype: Dtype, bytes: &[u8]) -> Raw {
        match dtype {
            Dtype::F32 => Raw::U32((0..bytes.len() / 4).map(|i| load(dtype, bytes, i)).collect()),
            Dtype::F16 | Dtype::Bf16 => Raw::U16((0..bytes.len() / 2).map(|i| load(dtype, bytes, i) as u16).collect()),
            // q8_0 blocks (34 bytes) as their little-endian 16-bit words.
            Dtype::Q8_0 => Raw::U16(bytes.chunks_exact(2).map(|w| u16::from_le_bytes([w[0], w[1]])).collect()),
        }
    }

    fn data(&self) -> NpyData<'_> {
        match self {
            Raw::U32(d) => NpyData::U32(d),
            Raw::U16(d) => NpyData::U16(d),
        }
    }

    fn len(&self) -> usize {
        match self {
            Raw::U32(d) => d.len(),
            Raw::U16(d) => d.len(),
        }
    }
}

/// Collects the arrays of one dump and their descriptions for `case.json`.
struct Writer<'a> {
    dir: &'a Path,
    files: Map<String, Value>,
}

impl Writer<'_> {
    fn array(&mut self, name: &str, shape: &[usize], data: NpyData<'_>, meaning: &str) -> anyhow::Result<()> {
        let file = format!("{name}.npy");
        write_npy(&self.dir.join(&file), shape, data)?;
        self.files.insert(file, json!({ "dtype": data.descr(), "shape": shape, "meaning": meaning }));
        Ok(())
    }

    fn finish(mut self, mut description: Map<String, Value>) -> anyhow::Result<()> {
        self.files.insert(
            "case.json".to_string(),
            json!({ "meaning": "this file: shapes, strides, scale, verdict and semantics" }),
        );
        description.insert("files".to_string(), Value::Object(self.files));
        let path = self.dir.join("case.json");
        let mut text = serde_json::to_string_pretty(&Value::Object(description))?;
        text.push('\n');
        write_atomic(&path, text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
    }
}

fn layout_json(layout: &CacheLayout, kind: &str, pad: usize) -> Value {
    json!({
        "kind": kind,
        "pad": pad,
        "stride_seq": layout.stride_seq,
        "stride_head": layout.stride_head,
        "stride_pos": layout.stride_pos,
        "stride_dim": 1,
        "elements": layout.min_elements(),
        "units": "elements of the raw cache arrays",
    })
}

/// A paged cache's raw arrays are the page pool.
const PAGED_RAW: &str = "raw cache elements of the page pool as uploaded (bit patterns), flat in memory order; \
    element (b, h, pos, d) at page*stride_page + h*stride_head + (pos % page_size)*stride_pos + d with page = \
    block_tables[b][pos // page_size]";

fn block_tables(w: &mut Writer, paged: &PagedLayout) -> anyhow::Result<()> {
    let shape = [paged.n_seqs, paged.block_tables[0].len()];
    let meaning = "page ids of each sequence's positions, in order [B, pages_per_seq]";
    w.array("block_tables", &shape, NpyData::U32(&paged.block_tables.concat()), meaning)
}

/// The cache layout, or for a paged cache the pool's geometry (its "sequences" are pages).
fn cache_json(layout: &CacheLayout, paged: Option<&PagedLayout>, order: &str, pad: usize) -> Value {
    let mut json = layout_json(layout, order, pad);
    if let (Some(paged), Value::Object(m)) = (paged, &mut json) {
        m.remove("stride_seq");
        m.insert("paged".into(), json!(true));
        m.insert("page_size".into(), json!(paged.page_size));
        m.insert("n_pages".into(), json!(paged.n_pages));
        m.insert("stride_page".into(), json!(paged.stride_page));
        m.insert("pages_per_seq".into(), json!(paged.block_tables[0].len()));
    }
    json
}

fn verdict_json(result: &CaseResult) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("expected".into(), json!(result.expected));
    m.insert("verdict".into(), json!(result.verdict().label()));
    m.insert("mutant".into(), json!(result.mutant.map(|m| m.name())));
    m.insert("outcome".into(), json!(result.outcome));
    m
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the dump directory", dir.display()))
}

/// Writes the dump of an attention run into `dir`.
pub fn attention(
    dir: &Path,
    source: &Path,
    case: &AttentionCase,
    run: &AttentionRun,
    result: &CaseResult,
) -> anyhow::Result<()> {
    create_dir(dir)?;
    let inputs = &run.inputs;
    let p = &inputs.params;
    // `k` and `v` are in the view's layout (a paged cache's values gathered, see `paged` below).
    let l = &inputs.view;
    let (b, nq, h, hkv, d, cap) = (p.n_seqs, p.n_queries, p.n_q_heads, p.n_kv_heads, p.head_dim, l.capacity);
    let gather = |values: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(b * hkv * cap * d);
        for s in 0..b {
            for kh in 0..hkv {
                for pos in 0..cap {
                    out.extend((0..d).map(|i| values[l.offset(s, kh, pos, i)]));
                }
            }
        }
        out
    };
    let (k_raw, v_raw) = (Raw::new(p.dtype, &inputs.k_bytes), Raw::new(p.dtype, &inputs.v_bytes));
    let mut w = Writer { dir, files: Map::new() };
    let out_shape = [b, nq, h, d];
    let cache_shape = [b, hkv, cap, d];
    w.array("q", &out_shape, NpyData::F32(&inputs.q), "queries [B, n_queries, H, D]")?;
    let cache_meaning = "cache values the GPU read, decoded to f32, [B, Hkv, capacity, D]; positions >= seq_lens[b] \
                         hold the poison (never read)";
    w.array("k", &cache_shape, NpyData::F32(&gather(&inputs.k)), cache_meaning)?;
    w.array("v", &cache_shape, NpyData::F32(&gather(&inputs.v)), cache_meaning)?;
    let raw_meaning = format!(
        "raw {} cache elements as uploaded (bit patterns), flat in memory order, padding included; element \
         (b, h, pos, d) at b*stride_seq + h*stride_head + pos*stride_pos + d",
        p.dtype
    );
    let raw_meaning = if inputs.paged.is_some() { PAGED_RAW.to_string() } else { raw_meaning };
    w.array("k_cache_raw", &[k_raw.len()], k_raw.data(), &raw_meaning)?;
    w.array("v_cache_raw", &[v_raw.len()], v_raw.data(), &raw_meaning)?;
    if let Some(paged) = &inputs.paged {
        block_tables(&mut w, paged)?;
    }
    w.array("seq_lens", &[b], NpyData::U32(&inputs.seq_lens), "valid cache positions per sequence [B]")?;
    w.array("out_gpu", &out_shape, NpyData::F32(&run.gpu), "GPU output [B, n_queries, H, D]")?;
    w.array("out_reference", &out_shape, NpyData::F64(&run.reference), "f64 reference output [B, n_queries, H, D]")?;
    if let Some(sinks) = &inputs.sinks {
        w.array("sinks", &[h], NpyData::F32(sinks), "one sink logit per query head [H]")?;
    }
    if let Some(fused) = &inputs.fused {
        let new_shape = [b, nq, hkv, d];
        let meaning =
            "the step's new tokens, f32 [B, n_queries, Hkv, D], appended at positions seq_lens[b]-n_queries+t";
        w.array("new_k", &new_shape, NpyData::F32(&fused.new_k), meaning)?;
        w.array("new_v", &new_shape, NpyData::F32(&fused.new_v), meaning)?;
    }

    let mut description = Map::new();
    description.insert("kernel".into(), json!("attention"));
    description.insert("source".into(), json!(source.display().to_string()));
    description.insert("dtype".into(), json!(p.dtype));
    description.insert("n_seqs".into(), json!(b));
    description.insert("n_queries".into(), json!(nq));
    description.insert("n_q_heads".into(), json!(h));
    description.insert("n_kv_heads".into(), json!(hkv));
    description.insert("head_dim".into(), json!(d));
    description.insert("capacity".into(), json!(cap));
    // The f32 value exactly, as an f64 number (reads back exactly in Python), and its bits.
    description.insert("scale".into(), json!(f64::from(p.scale)));
    description.insert("scale_f32_bits".into(), json!(format!("{:#010x}", p.scale.to_bits())));
    description.insert("seq_lens".into(), json!(inputs.seq_lens));
    description.insert("window".into(), json!(p.window));
    description.insert("softcap".into(), json!(p.softcap.map(f64::from)));
    description.insert("sinks".into(), json!(p.sinks));
    description.insert("fused".into(), json!(p.fused));
    description.insert("layout".into(), cache_json(&p.layout, inputs.paged.as_ref(), case.layout.name(), case.pad));
    description.extend(verdict_json(result));
    description.insert("semantics".into(), json!(ATTENTION_SEMANTICS));
    // The case itself, replayable (`vkdecode replay` takes this object as a file).
    description.insert("case".into(), json!(Case::Attention(case.clone())));
    w.finish(description)
}

/// Writes the dump of an append run into `dir`.
pub fn append(
    dir: &Path,
    source: &Path,
    case: &AppendCase,
    run: &AppendRun,
    result: &CaseResult,
) -> anyhow::Result<()> {
    create_dir(dir)?;
    let inputs = &run.inputs;
    let p = &inputs.params;
    let l = &p.layout;
    let mut w = Writer { dir, files: Map::new() };
    let new_shape = [p.n_seqs, p.n_new, p.n_kv_heads, p.head_dim];
    w.array("new_k", &new_shape, NpyData::F32(&inputs.new_k), "new keys (f32 in) [B, n_new, Hkv, D]")?;
    w.array("new_v", &new_shape, NpyData::F32(&inputs.new_v), "new values (f32 in) [B, n_new, Hkv, D]")?;
    w.array("starts", &[p.n_seqs], NpyData::U32(&inputs.starts), "first written position per sequence [B]")?;
    let caches: [(&str, &[u8], &str); 6] = [
        ("k_before", &inputs.k_before, "K cache before the append (random canary bits)"),
        ("v_before", &inputs.v_before, "V cache before the append (random canary bits)"),
        ("k_after_gpu", &run.gpu_k, "K cache after the GPU append"),
        ("v_after_gpu", &run.gpu_v, "V cache after the GPU append"),
        ("k_after_reference", &run.ref_k, "K cache after the reference append"),
        ("v_after_reference", &run.ref_v, "V cache after the reference append"),
    ];
    for (name, bytes, meaning) in caches {
        let raw = Raw::new(p.dtype, bytes);
        let meaning = format!("{meaning}: raw {} elements (bit patterns), flat in memory order", p.dtype);
        w.array(name, &[raw.len()], raw.data(), &meaning)?;
    }
    if let Some(paged) = &inputs.paged {
        block_tables(&mut w, paged)?;
    }

    let mut description = Map::new();
    description.insert("kernel".into(), json!("kv_append"));
    description.insert("source".into(), json!(source.display().to_string()));
    description.insert("dtype".into(), json!(p.dtype));
    description.insert("n_seqs".into(), json!(p.n_seqs));
    description.insert("n_new".into(), json!(p.n_new));
    description.insert("n_kv_heads".into(), json!(p.n_kv_heads));
    description.insert("head_dim".into(), json!(p.head_dim));
    description.insert("capacity".into(), json!(case.capacity));
    description.insert("starts".into(), json!(inputs.starts));
    description.insert("layout".into(), cache_json(l, inputs.paged.as_ref(), case.layout.name(), case.pad));
    description.extend(verdict_json(result));
    description.insert("semantics".into(), json!(APPEND_SEMANTICS));
    description.insert("case".into(), json!(Case::KvAppend(case.clone())));
    w.finish(description)
}
