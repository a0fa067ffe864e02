//! The case folder of the export/judge exchange (docs/BYOK.md, "Kernels behind another
//! language"): `case.json` and `.npy` inputs written from materialized inputs, and the runner's
//! `result/` read back with every way it can be wrong named.
//!
//! Arrays are built in memory first ([`attention_arrays`], [`append_arrays`]), so `judge` can
//! hash what an export of the same case would hold without writing anything.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cases::model::{Case, LayoutKind};
use crate::cases::npy::{NpyArray, NpyData, encode_npy, read_npy, write_atomic};
use crate::implementation::{AppendInputs, AttentionInputs, Capabilities, Precision, SlotContract};
use crate::kernels::Dtype;

/// The `format` field of every `case.json`.
pub const FORMAT: &str = "vkdecode-case/1";

/// One array as `case.json` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArraySpec {
    pub file: String,
    pub descr: String,
    pub shape: Vec<usize>,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strides {
    pub seq: usize,
    pub head: usize,
    pub pos: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    pub kind: LayoutKind,
    pub pad: usize,
    pub strides: Strides,
}

/// `case.json`: everything a runner needs, in words and numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseMeta {
    pub format: String,
    pub name: String,
    pub kernel: String,
    pub semantics: String,
    /// The vkdecode case the inputs were generated from (absent in fuzz batches, whose inputs
    /// the fuzzer judges itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<Case>,
    pub precision: Precision,
    pub slots: SlotContract,
    pub dtype: Dtype,
    /// `n_seqs`, `n_queries`, `n_q_heads`, `n_kv_heads`, `head_dim`, `capacity` (appends:
    /// `n_new` in place of the query counts).
    pub shape: BTreeMap<String, usize>,
    pub layout: LayoutSpec,
    #[serde(default)]
    pub scale: Option<f32>,
    #[serde(default)]
    pub window: Option<usize>,
    #[serde(default)]
    pub softcap: Option<f32>,
    #[serde(default)]
    pub sinks: bool,
    #[serde(default)]
    pub fused: bool,
    pub arrays: BTreeMap<String, ArraySpec>,
    /// The files the runner writes (under `result/`), by name.
    pub result: BTreeMap<String, String>,
}

const ATTENTION_SEMANTICS: &str = "out[b,t,h,:] = softmax_j(s_j) . v[b,h/(H/Hkv),j,:] over the positions j that query t \
of sequence b sees: len_b - T + t + 1 - window <= j < len_b - T + t + 1 (no lower limit without a window). \
s_j = scale * q[b,t,h,:].k[b,h/(H/Hkv),j,:], then softcap*tanh(s_j/softcap) with a softcap. A sink adds \
exp(sinks[h]) to the softmax denominator only. A row that sees no position is 0. Fused: the step's new \
K/V (new_k, new_v) belong at positions len_b - T + t; write them into the raw caches (converted like an \
append) and return those too. Read only visible positions: the others hold poison (see slots).";

const APPEND_SEMANTICS: &str = "For every sequence b, token t < n_new, kv head h and dim d, write new_k[b,t,h,d] \
(and new_v) converted to the cache dtype at the element seq*strides.seq + h*strides.head + \
(starts[b]+t)*strides.pos + d of a copy of k_cache (v_cache): round to nearest even, overflow to +-Inf, \
NaN to the canonical quiet NaN of the type with the input's sign (f16 0x7e00, bf16 0x7fc0). Every other \
byte stays as it was. Return both caches.";

/// One array ready to write: its name, spec (hash included) and file bytes.
pub struct Array {
    pub name: &'static str,
    pub spec: ArraySpec,
    pub bytes: Vec<u8>,
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of some bytes, in lowercase hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn array(name: &'static str, shape: &[usize], data: NpyData<'_>) -> Array {
    let bytes = encode_npy(shape, data).expect("inputs are shaped by their params");
    finish(name, data.descr(), shape, bytes)
}

fn finish(name: &'static str, descr: &str, shape: &[usize], bytes: Vec<u8>) -> Array {
    let spec = ArraySpec {
        file: format!("{name}.npy"),
        descr: descr.to_string(),
        shape: shape.to_vec(),
        sha256: sha256(&bytes),
    };
    Array { name, spec, bytes }
}

/// A raw cache as a flat array of its element type (bf16 as `<u2` bit patterns).
fn raw_cache(name: &'static str, dtype: Dtype, bytes: &[u8]) -> Array {
    let descr = match dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
        Dtype::Bf16 => "<u2",
        Dtype::Q8_0 => "|u1",
    };
    // q8_0: the raw 34-byte blocks, as bytes.
    let shape = [if dtype.is_float() { bytes.len() / dtype.size() } else { bytes.len() }];
    let mut file = crate::cases::npy::header(descr, &shape).expect("a one-dimensional header fits");
    file.extend_from_slice(bytes);
    finish(name, descr, &shape, file)
}

/// The dtype string a raw cache of `dtype` is written with.
pub fn raw_descr(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "<f4",
        Dtype::F16 => "<f2",
        Dtype::Bf16 => "<u2",
        Dtype::Q8_0 => "|u1",
    }
}

fn layout_spec(kind: LayoutKind, layout: &crate::kernels::CacheLayout) -> LayoutSpec {
    LayoutSpec {
        kind,
        pad: match kind {
            LayoutKind::HeadMajor => layout.stride_pos - layout.head_dim,
            LayoutKind::TokenMajor => layout.stride_head - layout.head_dim,
        },
        strides: Strides { seq: layout.stride_seq, head: layout.stride_head, pos: layout.stride_pos },
    }
}

/// Which family a layout's strides belong to.
fn layout_kind(layout: &crate::kernels::CacheLayout) -> LayoutKind {
    if layout.stride_pos < layout.stride_head { LayoutKind::HeadMajor } else { LayoutKind::TokenMajor }
}

/// The arrays of an attention call, in file order.
pub fn attention_arrays(inputs: &AttentionInputs) -> Vec<Array> {
    let p = &inputs.params;
    let view = &inputs.view;
    let (b, t, h, hkv, d, c) = (p.n_seqs, p.n_queries, p.n_q_heads, p.n_kv_heads, p.head_dim, view.capacity);
    let logical = |cache: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(b * hkv * c * d);
        for s in 0..b {
            for kh in 0..hkv {
                for pos in 0..c {
                    let base = view.offset(s, kh, pos, 0);
                    out.extend_from_slice(&cache[base..base + d]);
                }
            }
        }
        out
    };
    let mut visible = vec![false; b * t * c];
    for (s, &len) in inputs.seq_lens.iter().enumerate() {
        for q in 0..t {
            let end = (i64::from(len) - t as i64 + q as i64 + 1).max(0) as usize;
            let first = p.window.map_or(0, |w| end.saturating_sub(w));
            visible[(s * t + q) * c + first.min(c)..(s * t + q) * c + end.min(c)].fill(true);
        }
    }
    let additive: Vec<f32> = visible.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
    let lens: Vec<i32> = inputs.seq_lens.iter().map(|&l| l as i32).collect();
    let mut arrays = vec![
        array("q", &[b, t, h, d], NpyData::F32(&inputs.q)),
        array("k", &[b, hkv, c, d], NpyData::F32(&logical(&inputs.k))),
        array("v", &[b, hkv, c, d], NpyData::F32(&logical(&inputs.v))),
        raw_cache("k_cache", p.dtype, &inputs.k_bytes),
        raw_cache("v_cache", p.dtype, &inputs.v_bytes),
        array("seq_lens", &[b], NpyData::I32(&lens)),
        array("mask_bool", &[b, 1, t, c], NpyData::Bool(&visible)),
        array("mask_add", &[b, 1, t, c], NpyData::F32(&additive)),
    ];
    if let Some(sinks) = &inputs.sinks {
        arrays.push(array("sinks", &[h], NpyData::F32(sinks)));
    }
    if let Some(f) = &inputs.fused {
        arrays.push(array("new_k", &[b, t, hkv, d], NpyData::F32(&f.new_k)));
        arrays.push(array("new_v", &[b, t, hkv, d], NpyData::F32(&f.new_v)));
    }
    arrays
}

/// The arrays of an append, in file order.
pub fn append_arrays(inputs: &AppendInputs) -> Vec<Array> {
    let p = &inputs.params;
    let starts: Vec<i32> = inputs.starts.iter().map(|&s| s as i32).collect();
    let shape = [p.n_seqs, p.n_new, p.n_kv_heads, p.head_dim];
    vec![
        array("new_k", &shape, NpyData::F32(&inputs.new_k)),
        array("new_v", &shape, NpyData::F32(&inputs.new_v)),
        array("starts", &[p.n_seqs], NpyData::I32(&starts)),
        raw_cache("k_cache", p.dtype, &inputs.k_before),
        raw_cache("v_cache", p.dtype, &inputs.v_before),
    ]
}

/// Materialized inputs of either kernel.
#[derive(Clone, Copy)]
pub enum Inputs<'a> {
    Attention(&'a AttentionInputs),
    Append(&'a AppendInputs),
}

/// `case.json` for `inputs` and their arrays.
pub fn case_meta(
    name: &str,
    inputs: Inputs<'_>,
    case: Option<&Case>,
    caps: &Capabilities,
    arrays: &[Array],
) -> CaseMeta {
    let files = |names: &[&str]| names.iter().map(|n| (n.to_string(), format!("result/{n}.npy"))).collect();
    let shape = |dims: &[(&str, usize)]| dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    // The fields every kernel's case.json has; each kernel's arm fills in the rest.
    let common = |kernel: &str, semantics: &str, dtype, layout: &crate::kernels::CacheLayout| CaseMeta {
        format: FORMAT.into(),
        name: name.into(),
        kernel: kernel.into(),
        semantics: semantics.into(),
        case: case.cloned(),
        precision: caps.precision,
        slots: caps.unread_slots,
        dtype,
        shape: BTreeMap::new(),
        layout: layout_spec(layout_kind(layout), layout),
        scale: None,
        window: None,
        softcap: None,
        sinks: false,
        fused: false,
        arrays: arrays.iter().map(|a| (a.name.to_string(), a.spec.clone())).collect(),
        result: BTreeMap::new(),
    };
    match inputs {
        Inputs::Attention(i) => {
            let p = &i.params;
            CaseMeta {
                shape: shape(&[
                    ("n_seqs", p.n_seqs),
                    ("n_queries", p.n_queries),
                    ("n_q_heads", p.n_q_heads),
                    ("n_kv_heads", p.n_kv_heads),
                    ("head_dim", p.head_dim),
                    ("capacity", p.layout.capacity),
                ]),
                scale: Some(p.scale),
                window: p.window,
                softcap: p.softcap,
                sinks: i.sinks.is_some(),
                fused: p.fused,
                result: if p.fused { files(&["out", "k_cache", "v_cache"]) } else { files(&["out"]) },
                ..common("attention", ATTENTION_SEMANTICS, p.dtype, &p.layout)
            }
        }
        Inputs::Append(i) => {
            let p = &i.params;
            CaseMeta {
                shape: shape(&[
                    ("n_seqs", p.n_seqs),
                    ("n_new", p.n_new),
                    ("n_kv_heads", p.n_kv_heads),
                    ("head_dim", p.head_dim),
                    ("capacity", p.layout.capacity),
                ]),
                result: files(&["k_cache", "v_cache"]),
                ..common("kv_append", APPEND_SEMANTICS, p.dtype, &p.layout)
            }
        }
    }
}

/// Writes a case folder `dir` (created; must not hold a `case.json` yet): the arrays, then
/// `case.json` last, each atomically. Errors name the file.
pub fn write_case_dir(
    dir: &Path,
    name: &str,
    inputs: Inputs<'_>,
    case: Option<&Case>,
    caps: &Capabilities,
) -> Result<CaseMeta, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let arrays = match inputs {
        Inputs::Attention(i) => attention_arrays(i),
        Inputs::Append(i) => append_arrays(i),
    };
    let meta = case_meta(name, inputs, case, caps, &arrays);
    for a in &arrays {
        let path = dir.join(&a.spec.file);
        write_atomic(&path, &a.bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let path = dir.join("case.json");
    let mut text = serde_json::to_string_pretty(&meta).expect("case metadata serializes");
    text.push('\n');
    write_atomic(&path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(meta)
}

/// What the runner said in `result/status.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Skip(String),
    Error(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusFile {
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Reads `dir/result/status.json`; `Err` says what is missing or malformed.
pub fn read_status(dir: &Path) -> Result<Status, String> {
    let path = dir.join("result").join("status.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: StatusFile = serde_json::from_str(&text).map_err(|e| {
        format!("{}: malformed ({e}); expected {{\"status\": \"ok\" | \"skip\" | \"error\", ...}}", path.display())
    })?;
    match file.status.as_str() {
        "ok" => Ok(Status::Ok),
        "skip" => Ok(Status::Skip(file.reason.unwrap_or_else(|| "no reason given".into()))),
        "error" => Ok(Status::Error(file.message.unwrap_or_else(|| "no message given".into()))),
        other => Err(format!("{}: status `{other}`, expected ok, skip or error", path.display())),
    }
}

/// Reads `dir/result/<name>.npy` and checks its shape and (when `descrs` is not empty) its type.
fn read_result_array(dir: &Path, name: &str, shape: &[usize], descrs: &[&str]) -> Result<NpyArray, String> {
    let path = dir.join("result").join(format!("{name}.npy"));
    let a = read_npy(&path)?;
    if a.shape != shape {
        return Err(format!("{}: shape {:?}, expected {shape:?}", path.display(), a.shape));
    }
    if !descrs.is_empty() && !descrs.contains(&a.descr.as_str()) {
        return Err(format!("{}: dtype {}, expected {}", path.display(), a.descr, descrs.join(" or ")));
    }
    Ok(a)
}

/// The attention output a runner wrote, as f64 `[B][T][H][D]` (it may be `<f2`, `<f4` or `<f8`).
pub fn read_out(dir: &Path, params: &crate::kernels::attention::AttentionParams) -> Result<Vec<f64>, String> {
    let shape = [params.n_seqs, params.n_queries, params.n_q_heads, params.head_dim];
    let a = read_result_array(dir, "out", &shape, &["<f2", "<f4", "<f8"])?;
    a.to_f64()
}

/// The raw caches a runner wrote back (appends, fused attention): the inputs' type and size.
pub fn read_caches(dir: &Path, dtype: Dtype, bytes: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
    let shape = [if dtype.is_float() { bytes / dtype.size() } else { bytes }];
    let k = read_result_array(dir, "k_cache", &shape, &[raw_descr(dtype)])?;
    let v = read_result_array(dir, "v_cache", &shape, &[raw_descr(dtype)])?;
    Ok((k.data, v.data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::model::{AttentionCase, AttentionData};

    fn case() -> AttentionCase {
        AttentionCase {
            description: String::new(),
            dtype: Dtype::F16,
            n_q_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            n_queries: 2,
            seq_lens: vec![3, 0],
            capacity: 4,
            layout: LayoutKind::TokenMajor,
            pad: 2,
            paged: None,
            scale: None,
            window: Some(2),
            softcap: None,
            sinks: None,
            fused: false,
            split_chunk: None,
            data: AttentionData {
                seed: 5,
                q: Default::default(),
                k: Default::default(),
                v: Default::default(),
                peak: None,
                poison: Default::default(),
            },
            expect: Default::default(),
        }
    }

    #[test]
    fn masks_follow_causality_and_the_window() {
        let inputs = crate::cases::data::attention_inputs(&case()).unwrap();
        let arrays = attention_arrays(&inputs);
        let mask = arrays.iter().find(|a| a.name == "mask_bool").unwrap();
        let data = &mask.bytes[mask.bytes.len() - 2 * 2 * 4..];
        // seq 0 (len 3, T 2): query 0 sees 0..2 cut to the window [0, 2); query 1 sees [1, 3).
        assert_eq!(&data[..8], &[1, 1, 0, 0, 0, 1, 1, 0]);
        // seq 1 (len 0) sees nothing.
        assert!(data[8..].iter().all(|&x| x == 0));
        let meta = case_meta("x", Inputs::Attention(&inputs), None, &Capabilities::default(), &arrays);
        assert_eq!(meta.layout.pad, 2);
        assert_eq!(meta.layout.strides, Strides { seq: 4 * 2 * 10, head: 10, pos: 20 });
        assert_eq!(meta.arrays["k_cache"].descr, "<f2");
    }

    #[test]
    fn bad_status_files_are_named() {
        let dir = std::env::temp_dir().join(format!("vkdecode-status-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("result")).unwrap();
        assert!(read_status(&dir).unwrap_err().contains("status.json"));
        std::fs::write(dir.join("result/status.json"), "{\"status\": \"fine\"}").unwrap();
        assert!(read_status(&dir).unwrap_err().contains("status `fine`"));
        std::fs::write(dir.join("result/status.json"), "not json").unwrap();
        assert!(read_status(&dir).unwrap_err().contains("malformed"));
        std::fs::write(dir.join("result/status.json"), "{\"status\": \"skip\", \"reason\": \"no bf16\"}").unwrap();
        assert_eq!(read_status(&dir).unwrap(), Status::Skip("no bf16".into()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
