//! Safetensors weights of a Qwen3 checkpoint directory, memory-mapped and validated.
//!
//! Files: `model.safetensors`, or the shards that `model.safetensors.index.json` names in its
//! `weight_map` (the single file wins when both exist, as in transformers). Every shard is
//! mapped once, its header parsed and checked by the `safetensors` crate (offsets inside the
//! file, sizes consistent with shape and type).
//!
//! Validation at [`Checkpoint::open`]: every tensor [`Qwen3Config::tensor_shapes`] lists must
//! exist, with exactly that shape, stored as F32, F16 or BF16; no tensor may appear twice; the
//! index must not point at a file that lacks the tensor; and no other tensor may be present
//! (an extra layer or an MoE expert means the config does not describe the file), except
//! `*.rotary_emb.inv_freq` buffers some older exports carry and `lm_head.weight` in a tied model
//! (transformers ignores both; so do we).
//!
//! Memory mapping: real checkpoints are gigabytes, so files are mapped, not read. The one
//! `unsafe` call is in `map_file`; its contract is that checkpoint files are not modified or
//! truncated while a [`Checkpoint`] is alive.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use vkdecode_reference::qwen3::{Qwen3LayerWeights, Qwen3Weights};

use super::ModelError;
use super::config::{Qwen3Config, WeightDtype};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor as stored: element type, shape and little-endian bytes (borrowed from the map).
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: WeightDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    /// The elements widened to f32 (exact for every supported type).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            WeightDtype::F32 => {
                self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            WeightDtype::F16 => {
                self.bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            WeightDtype::Bf16 => {
                self.bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
        }
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: WeightDtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// A mapped shard.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened, validated Qwen3 checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: Qwen3Config,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("files", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir` (config.json + safetensors) and validates every tensor; see the module docs.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let config = Qwen3Config::load(&dir.join("config.json"))?;
        let (files, index) = weight_files(&dir)?;

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, Entry> = BTreeMap::new();
        for (file, path) in files.into_iter().enumerate() {
            let map = map_file(&path)?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|source| ModelError::Safetensors { path: path.clone(), source })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => WeightDtype::F32,
                    Dtype::F16 => WeightDtype::F16,
                    Dtype::BF16 => WeightDtype::Bf16,
                    other => {
                        return Err(ModelError::TensorDtype { name, file: path.clone(), found: format!("{other:?}") });
                    }
                };
                let entry = Entry {
                    file,
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                if let Some(prev) = tensors.get(&name) {
                    let first = shards.get(prev.file).map_or_else(|| path.clone(), |s: &Shard| s.path.clone());
                    return Err(ModelError::DuplicateTensor { name, first, second: path.clone() });
                }
                tensors.insert(name, entry);
            }
            shards.push(Shard { path, map });
        }

        if let Some((index_path, weight_map)) = index {
            for (name, file) in weight_map {
                let in_file = tensors.get(&name).map(|e| &shards[e.file].path);
                if in_file != Some(&file) {
                    return Err(ModelError::IndexMismatch { index: index_path, name, file });
                }
            }
        }

        let checkpoint = Checkpoint { dir, config, shards, tensors };
        checkpoint.validate()?;
        Ok(checkpoint)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let expected = self.config.tensor_shapes();
        for (name, shape) in &expected {
            let Some(entry) = self.tensors.get(name) else {
                return Err(ModelError::MissingTensor { name: name.clone(), expected: shape.clone() });
            };
            if &entry.shape != shape {
                return Err(ModelError::TensorShape {
                    name: name.clone(),
                    file: self.shards[entry.file].path.clone(),
                    found: entry.shape.clone(),
                    expected: shape.clone(),
                });
            }
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, entry) in &self.tensors {
            let ignorable =
                name.ends_with(".rotary_emb.inv_freq") || (self.config.tie_word_embeddings && name == "lm_head.weight");
            if !known.contains(name.as_str()) && !ignorable {
                return Err(ModelError::UnexpectedTensor {
                    name: name.clone(),
                    file: self.shards[entry.file].path.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// The safetensors files, in the order they were mapped.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Names of all stored tensors (ignored ones included), sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A stored tensor by its HF name.
    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let (name, e) = self.tensors.get_key_value(name)?;
        Some(TensorRef { name, dtype: e.dtype, shape: &e.shape, bytes: &self.shards[e.file].map[e.start..e.end] })
    }

    /// A tensor that validation guaranteed, widened to f32.
    fn f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let expected = || self.config.tensor_shapes().into_iter().find(|(n, _)| n == name).map(|(_, s)| s);
        self.tensor(name)
            .map(|t| t.to_f32())
            .ok_or_else(|| ModelError::MissingTensor { name: name.into(), expected: expected().unwrap_or_default() })
    }

    /// An f32 copy of every weight, for the CPU reference (4 bytes per parameter).
    pub fn reference_weights(&self) -> Result<Qwen3Weights, ModelError> {
        let c = &self.config;
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let t = |name: &str| self.f32(&format!("model.layers.{l}.{name}.weight"));
                Ok(Qwen3LayerWeights {
                    input_norm: t("input_layernorm")?,
                    q_proj: t("self_attn.q_proj")?,
                    k_proj: t("self_attn.k_proj")?,
                    v_proj: t("self_attn.v_proj")?,
                    o_proj: t("self_attn.o_proj")?,
                    q_norm: t("self_attn.q_norm")?,
                    k_norm: t("self_attn.k_norm")?,
                    post_attention_norm: t("post_attention_layernorm")?,
                    gate_proj: t("mlp.gate_proj")?,
                    up_proj: t("mlp.up_proj")?,
                    down_proj: t("mlp.down_proj")?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Qwen3Weights {
            params: c.reference_params(),
            embed_tokens: self.f32("model.embed_tokens.weight")?,
            layers,
            norm: self.f32("model.norm.weight")?,
            lm_head: if c.tie_word_embeddings { None } else { Some(self.f32("lm_head.weight")?) },
        })
    }
}

/// The safetensors files of `dir`, and the index's `weight_map` (tensor → file path) if sharded.
#[allow(clippy::type_complexity, reason = "a private helper's one-off return type")]
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<(PathBuf, BTreeMap<String, PathBuf>)>), ModelError> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(ModelError::NoWeights { dir: dir.into() });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
    let value: Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index.clone(), source })?;
    let bad = |key: &str, found: &Value, expected: &str| ModelError::BadValue {
        path: index.clone(),
        key: key.into(),
        found: found.to_string(),
        expected: expected.into(),
    };
    let Some(map) = value.get("weight_map") else {
        return Err(ModelError::MissingKey {
            path: index.clone(),
            key: "weight_map".into(),
            expected: "an object mapping tensor names to shard file names".into(),
        });
    };
    let Value::Object(map) = map else {
        return Err(bad("weight_map", map, "an object mapping tensor names to shard file names"));
    };
    let mut files = BTreeSet::new();
    let mut weight_map = BTreeMap::new();
    for (name, file) in map {
        let key = format!("weight_map.{name}");
        let plain = file.as_str().filter(|f| {
            let mut parts = Path::new(f).components();
            matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None))
        });
        let Some(file) = plain else {
            return Err(bad(&key, file, "the file name of a shard in the same directory"));
        };
        let path = dir.join(file);
        files.insert(path.clone());
        weight_map.insert(name.clone(), path);
    }
    Ok((files.into_iter().collect(), Some((index, weight_map))))
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let io = |source| ModelError::Io { path: path.into(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and private; it is only undefined behaviour if the file is
    // modified or truncated while mapped, which the module contract (and every mmap-based
    // safetensors loader) forbids: checkpoint files are treated as immutable.
    unsafe { Mmap::map(&file) }.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("vkdecode-model-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(tied: bool) -> Qwen3Config {
        Qwen3Config {
            vocab_size: 10,
            hidden_size: 6,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tied,
            dtype: Some(WeightDtype::Bf16),
        }
    }

    fn config_json(c: &Qwen3Config) -> String {
        serde_json::json!({
            "model_type": "qwen3", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps, "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": c.tie_word_embeddings, "dtype": "bfloat16"
        })
        .to_string()
    }

    /// Tensors as (name, dtype, shape, bytes); element k of tensor t has value t + k/1000.
    type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

    fn tensors(c: &Qwen3Config, dtype: Dtype) -> Tensors {
        c.tensor_shapes()
            .into_iter()
            .enumerate()
            .map(|(t, (name, shape))| {
                let n: usize = shape.iter().product();
                let values = (0..n).map(|k| t as f32 + k as f32 / 1000.0);
                let bytes = match dtype {
                    Dtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
                    Dtype::F16 => values.flat_map(|x| half::f16::from_f32(x).to_le_bytes()).collect(),
                    Dtype::BF16 => values.flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                    _ => unreachable!("test helper"),
                };
                (name, dtype, shape, bytes)
            })
            .collect()
    }

    fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn write_checkpoint(dir: &Path, c: &Qwen3Config, tensors: &Tensors) {
        std::fs::write(dir.join("config.json"), config_json(c)).unwrap();
        write_safetensors(&dir.join(SINGLE_FILE), tensors);
    }

    /// Writes `config(tied)` with `edit` applied to its tensors; returns the open error's text.
    #[track_caller]
    fn open_error(name: &str, tied: bool, edit: impl FnOnce(&mut Tensors)) -> String {
        let dir = TempDir::new(name);
        let c = config(tied);
        let mut t = tensors(&c, Dtype::BF16);
        edit(&mut t);
        write_checkpoint(&dir.0, &c, &t);
        Checkpoint::open(&dir.0).expect_err("checkpoint must be rejected").to_string()
    }

    fn find<'a>(t: &'a mut Tensors, name: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
        t.iter_mut().find(|e| e.0 == name).unwrap()
    }

    #[test]
    fn loads_every_dtype_exactly_tied_and_untied() {
        for (i, dtype) in [Dtype::F32, Dtype::F16, Dtype::BF16].into_iter().enumerate() {
            for tied in [true, false] {
                let dir = TempDir::new(&format!("ok-{i}-{tied}"));
                let c = config(tied);
                let t = tensors(&c, dtype);
                write_checkpoint(&dir.0, &c, &t);
                let ck = Checkpoint::open(&dir.0).unwrap();
                assert_eq!(ck.config(), &c);
                let w = ck.reference_weights().unwrap();
                assert_eq!(w.lm_head.is_some(), !tied);
                let q = ck.tensor("model.layers.1.self_attn.q_proj.weight").unwrap();
                assert_eq!((q.shape, q.bytes.len()), (&[8usize, 6][..], 48 * dtype.bitsize() / 8));
                // Values survive exactly as the dtype rounded them.
                let want: Vec<f32> = (0..48)
                    .map(|k| {
                        let x = 13.0 + k as f32 / 1000.0; // tensor index 13 = layer 1's q_proj
                        match dtype {
                            Dtype::F32 => x,
                            Dtype::F16 => half::f16::from_f32(x).to_f32(),
                            _ => half::bf16::from_f32(x).to_f32(),
                        }
                    })
                    .collect();
                assert_eq!(w.layers[1].q_proj, want);
                vkdecode_reference::qwen3::Qwen3Reference::new(&w).forward_token(3, 0);
            }
        }
    }

    #[test]
    fn loads_a_sharded_checkpoint() {
        let dir = TempDir::new("sharded");
        let c = config(false);
        std::fs::write(dir.0.join("config.json"), config_json(&c)).unwrap();
        let t = tensors(&c, Dtype::F16);
        let (a, b) = t.split_at(10);
        write_safetensors(&dir.0.join("model-00001-of-00002.safetensors"), a);
        write_safetensors(&dir.0.join("model-00002-of-00002.safetensors"), b);
        let map: serde_json::Map<String, Value> = a
            .iter()
            .map(|e| (e.0.clone(), Value::from("model-00001-of-00002.safetensors")))
            .chain(b.iter().map(|e| (e.0.clone(), Value::from("model-00002-of-00002.safetensors"))))
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.0.join(INDEX_FILE), index.to_string()).unwrap();
        let ck = Checkpoint::open(&dir.0).unwrap();
        assert_eq!(ck.files().count(), 2);
        assert_eq!(ck.tensor_names().count(), t.len());
        ck.reference_weights().unwrap();

        // An index that points a tensor at the wrong shard is named.
        let mut wrong = index.clone();
        wrong["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
        std::fs::write(dir.0.join(INDEX_FILE), wrong.to_string()).unwrap();
        let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("maps tensor `lm_head.weight` to") && e.contains("which does not hold it"), "{e}");

        // Shard names must stay inside the directory.
        let mut escape = index;
        escape["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors".into();
        std::fs::write(dir.0.join(INDEX_FILE), escape.to_string()).unwrap();
        let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("`weight_map.lm_head.weight`") && e.contains("same directory"), "{e}");
    }

    #[test]
    fn missing_tensor_is_named_with_its_shape() {
        let e = open_error("missing", false, |t| t.retain(|e| e.0 != "model.layers.1.self_attn.k_norm.weight"));
        assert!(e.contains("tensor `model.layers.1.self_attn.k_norm.weight` is missing; expected shape [4]"), "{e}");
        let e = open_error("missing-head", false, |t| t.retain(|e| e.0 != "lm_head.weight"));
        assert!(e.contains("`lm_head.weight` is missing; expected shape [10, 6]"), "{e}");
    }

    #[test]
    fn misshapen_tensor_is_named_with_both_shapes() {
        let e = open_error("shape", false, |t| {
            let e = find(t, "model.layers.0.mlp.down_proj.weight");
            e.2 = vec![8, 6]; // transposed: same element count
        });
        assert!(e.contains("`model.layers.0.mlp.down_proj.weight`") && e.contains("[8, 6]; expected [6, 8]"), "{e}");
    }

    #[test]
    fn wrongly_typed_tensor_is_named() {
        let e = open_error("dtype", false, |t| {
            let e = find(t, "model.norm.weight");
            e.1 = Dtype::I16;
        });
        assert!(e.contains("`model.norm.weight`") && e.contains("element type I16; expected F32, F16 or BF16"), "{e}");
    }

    #[test]
    fn extra_tensors_are_rejected_except_the_ignorable_ones() {
        let extra = |name: &str| {
            let name = name.to_string();
            move |t: &mut Tensors| t.push((name, Dtype::BF16, vec![2], vec![0; 4]))
        };
        let e = open_error("extra", false, extra("model.layers.2.input_layernorm.weight"));
        assert!(e.contains("`model.layers.2.input_layernorm.weight`") && e.contains("not part of"), "{e}");

        let dir = TempDir::new("ignorable");
        let c = config(true);
        let mut t = tensors(&c, Dtype::BF16);
        extra("model.layers.0.self_attn.rotary_emb.inv_freq")(&mut t);
        t.push(("lm_head.weight".into(), Dtype::BF16, vec![10, 6], vec![0; 120]));
        write_checkpoint(&dir.0, &c, &t);
        let w = Checkpoint::open(&dir.0).unwrap().reference_weights().unwrap();
        assert!(w.lm_head.is_none(), "a tied model ignores a stored lm_head");
    }

    #[test]
    fn broken_files_give_errors_not_panics() {
        let dir = TempDir::new("broken");
        let c = config(true);
        let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("cannot read"), "{e}");
        std::fs::write(dir.0.join("config.json"), config_json(&c)).unwrap();
        let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("neither model.safetensors nor model.safetensors.index.json"), "{e}");
        for (i, bytes) in [&b""[..], b"\x10\0\0\0\0\0\0\0{}", b"\x02\0\0\0\0\0\0\0{}\x00"].into_iter().enumerate() {
            std::fs::write(dir.0.join(SINGLE_FILE), bytes).unwrap();
            let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
            assert!(e.contains("is not a valid safetensors file"), "case {i}: {e}");
        }
        std::fs::remove_file(dir.0.join(SINGLE_FILE)).unwrap();
        std::fs::write(dir.0.join(INDEX_FILE), "{\"metadata\": {}}").unwrap();
        let e = Checkpoint::open(&dir.0).unwrap_err().to_string();
        assert!(e.contains("`weight_map` is missing"), "{e}");
    }
}
