//! `config.json` of a dense Qwen3 checkpoint.
//!
//! Accepted as both generations of transformers write it: real checkpoints carry a top-level
//! `rope_theta` and `torch_dtype`; transformers 5 writes `rope_parameters {rope_theta, rope_type}`
//! and `dtype`. Where both spellings are present they must agree.
//!
//! Required (positive integers unless noted): `vocab_size`, `hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`, `head_dim` (even; required because transformers'
//! fallback for a missing one has changed between versions), `max_position_embeddings`,
//! `rms_norm_eps` (positive number), the RoPE θ (positive number). Optional:
//! `num_key_value_heads` (default `num_attention_heads`; must divide it), `tie_word_embeddings`
//! (default false, as `Qwen3Config`), the dtype (`float32`, `float16` or `bfloat16`).
//!
//! Rejected because the forward does not implement them: a `model_type` other than `qwen3`
//! (`qwen3_moe` among others), a RoPE type other than `default` (YaRN etc.), `hidden_act` other
//! than `silu`, `attention_bias: true`, `use_sliding_window: true`. Other keys are ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use vkdecode_reference::qwen3::Qwen3Params;

use super::ModelError;

/// Element type of stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 | WeightDtype::Bf16 => 2,
        }
    }

    /// The name `config.json` uses (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::Bf16 => "bfloat16",
        }
    }

    fn from_torch_name(name: &str) -> Option<Self> {
        [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16].into_iter().find(|d| d.torch_name() == name)
    }
}

/// The hyperparameters of a dense Qwen3 model, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// The dtype the config declares, if it declares one (tensors carry their own).
    pub dtype: Option<WeightDtype>,
}

impl Qwen3Config {
    /// Reads and validates `path` (a `config.json`).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Validates the text of a `config.json`; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let value: Value =
            serde_json::from_str(text).map_err(|source| ModelError::Json { path: path.into(), source })?;
        let Value::Object(map) = value else {
            return Err(Keys { map: &Map::new(), path }.bad("(the whole file)", &value, "a JSON object"));
        };
        let keys = Keys { map: &map, path };

        if let Some(v) = keys.get("model_type")
            && v.as_str() != Some("qwen3")
        {
            return Err(keys.bad("model_type", v, "\"qwen3\" (dense Qwen3; MoE and other models are not supported)"));
        }
        keys.require_if_present("hidden_act", &Value::from("silu"), "\"silu\"")?;
        keys.require_if_present("attention_bias", &Value::Bool(false), "false (Qwen3 has no biases)")?;
        keys.require_if_present("use_sliding_window", &Value::Bool(false), "false (sliding window is not supported)")?;

        let num_attention_heads = keys.positive_int("num_attention_heads")?;
        let num_key_value_heads = match keys.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => keys.positive_int("num_key_value_heads")?,
        };
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(keys.bad(
                "num_key_value_heads",
                &Value::from(num_key_value_heads),
                &format!("a divisor of num_attention_heads ({num_attention_heads})"),
            ));
        }
        let head_dim = keys.positive_int("head_dim")?;
        if !head_dim.is_multiple_of(2) {
            return Err(keys.bad("head_dim", &Value::from(head_dim), "an even number (RoPE rotates halves)"));
        }

        let config = Qwen3Config {
            vocab_size: keys.positive_int("vocab_size")?,
            hidden_size: keys.positive_int("hidden_size")?,
            intermediate_size: keys.positive_int("intermediate_size")?,
            num_hidden_layers: keys.positive_int("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: keys.positive_int("max_position_embeddings")?,
            rms_norm_eps: keys.positive_number("rms_norm_eps")?,
            rope_theta: rope_theta(&keys)?,
            tie_word_embeddings: match keys.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(keys.bad("tie_word_embeddings", v, "true or false")),
            },
            dtype: dtype(&keys)?,
        };
        Ok(config)
    }

    /// Names of the [`preset`](Self::preset) shapes.
    pub const PRESETS: [&'static str; 6] =
        ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"];

    /// The published shapes of a dense Qwen3 model (`qwen3-0.6b` … `qwen3-32b`, see ANCHORS.md),
    /// for running real shapes with random weights.
    pub fn preset(name: &str) -> Option<Qwen3Config> {
        let (hidden, layers, heads, intermediate, tied) = match name.to_ascii_lowercase().as_str() {
            "qwen3-0.6b" => (1024, 28, 16, 3072, true),
            "qwen3-1.7b" => (2048, 28, 16, 6144, true),
            "qwen3-4b" => (2560, 36, 32, 9728, true),
            "qwen3-8b" => (4096, 36, 32, 12288, false),
            "qwen3-14b" => (5120, 40, 40, 17408, false),
            "qwen3-32b" => (5120, 64, 64, 25600, false),
            _ => return None,
        };
        Some(Qwen3Config {
            vocab_size: 151936,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: 8,
            head_dim: 128,
            max_position_embeddings: 40960,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tied,
            dtype: Some(WeightDtype::Bf16),
        })
    }

    /// What the CPU reference needs.
    pub fn reference_params(&self) -> Qwen3Params {
        Qwen3Params {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_q_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            intermediate_size: self.intermediate_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
        }
    }

    /// Every tensor a checkpoint of this config must hold, with its shape, in HF's names
    /// (`lm_head.weight` only when the embeddings are not tied).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, i, d) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
            self.head_dim,
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("self_attn.q_norm.weight", vec![d]),
                ("self_attn.k_norm.weight", vec![d]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("{p}{name}"), shape));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

/// θ from `rope_theta` or `rope_parameters.rope_theta` (equal if both), RoPE type `default`.
fn rope_theta(keys: &Keys<'_>) -> Result<f64, ModelError> {
    let top = match keys.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(_) => Some(keys.positive_number("rope_theta")?),
    };
    let mut nested = None;
    for outer in ["rope_parameters", "rope_scaling"] {
        match keys.get(outer) {
            None | Some(Value::Null) => {}
            Some(Value::Object(inner)) => {
                let inner_keys = Keys { map: inner, path: keys.path };
                let field = |k: &str| format!("{outer}.{k}");
                if let Some(t) = inner.get("rope_type").or_else(|| inner.get("type"))
                    && t.as_str() != Some("default")
                {
                    return Err(keys.bad(&field("rope_type"), t, "\"default\" (scaled RoPE is not supported)"));
                }
                if let Some(t) = inner.get("rope_theta") {
                    let theta = inner_keys
                        .positive_number("rope_theta")
                        .map_err(|_| keys.bad(&field("rope_theta"), t, "a positive number"))?;
                    nested = Some((field("rope_theta"), theta));
                }
            }
            Some(v) => return Err(keys.bad(outer, v, "an object or null")),
        }
    }
    match (top, nested) {
        (Some(a), Some((key, b))) if a != b => {
            Err(keys.bad(&key, &Value::from(b), &format!("the same θ as rope_theta ({a})")))
        }
        (Some(theta), _) | (None, Some((_, theta))) => Ok(theta),
        (None, None) => Err(ModelError::MissingKey {
            path: keys.path.into(),
            key: "rope_theta".into(),
            expected: "RoPE θ as `rope_theta` or `rope_parameters.rope_theta` (a positive number)".into(),
        }),
    }
}

/// The dtype from `torch_dtype` or `dtype` (equal if both); absent is allowed.
fn dtype(keys: &Keys<'_>) -> Result<Option<WeightDtype>, ModelError> {
    let mut found: Option<(&str, WeightDtype)> = None;
    for key in ["torch_dtype", "dtype"] {
        let Some(v) = keys.get(key).filter(|v| !v.is_null()) else { continue };
        let Some(d) = v.as_str().and_then(WeightDtype::from_torch_name) else {
            return Err(keys.bad(key, v, "\"float32\", \"float16\" or \"bfloat16\""));
        };
        if let Some((other, prev)) = found
            && prev != d
        {
            return Err(keys.bad(key, v, &format!("the same dtype as {other} ({:?})", prev.torch_name())));
        }
        found = Some((key, d));
    }
    Ok(found.map(|(_, d)| d))
}

/// Typed access to the keys of one JSON object, with errors that name the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn bad(&self, key: &str, found: &Value, expected: &str) -> ModelError {
        let mut shown = found.to_string();
        if shown.len() > 80 {
            shown.truncate(77);
            shown.push_str("...");
        }
        ModelError::BadValue { path: self.path.into(), key: key.into(), found: shown, expected: expected.into() }
    }

    fn missing(&self, key: &str, expected: &str) -> ModelError {
        ModelError::MissingKey { path: PathBuf::from(self.path), key: key.into(), expected: expected.into() }
    }

    fn positive_int(&self, key: &str) -> Result<usize, ModelError> {
        const EXPECTED: &str = "a positive integer";
        let v = self.get(key).ok_or_else(|| self.missing(key, EXPECTED))?;
        v.as_u64().filter(|&n| n > 0).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| self.bad(key, v, EXPECTED))
    }

    fn positive_number(&self, key: &str) -> Result<f64, ModelError> {
        const EXPECTED: &str = "a positive number";
        let v = self.get(key).ok_or_else(|| self.missing(key, EXPECTED))?;
        v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| self.bad(key, v, EXPECTED))
    }

    fn require_if_present(&self, key: &str, want: &Value, expected: &str) -> Result<(), ModelError> {
        match self.get(key) {
            Some(v) if v != want && !v.is_null() => Err(self.bad(key, v, expected)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "model_type": "qwen3",
            "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": true,
            "hidden_act": "silu", "attention_bias": false, "use_sliding_window": false
        })
    }

    fn parse(v: &Value) -> Result<Qwen3Config, ModelError> {
        Qwen3Config::parse(&v.to_string(), Path::new("config.json"))
    }

    /// `base()` with `edit` applied must fail with a message containing every needle.
    #[track_caller]
    fn rejects(edit: impl FnOnce(&mut Map<String, Value>), needles: &[&str]) {
        let mut v = base();
        edit(v.as_object_mut().unwrap());
        let err = parse(&v).expect_err("config must be rejected").to_string();
        for n in needles {
            assert!(err.contains(n), "error {err:?} lacks {n:?}");
        }
    }

    #[test]
    fn reads_the_published_qwen3_0_6b_config() {
        // config.json of Qwen/Qwen3-0.6B as published (transformers 4.51 era).
        let text = r#"{
            "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
            "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
            "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
        }"#;
        let c = Qwen3Config::parse(text, Path::new("config.json")).unwrap();
        assert_eq!(
            c,
            Qwen3Config {
                vocab_size: 151936,
                hidden_size: 1024,
                intermediate_size: 3072,
                num_hidden_layers: 28,
                num_attention_heads: 16,
                num_key_value_heads: 8,
                head_dim: 128,
                max_position_embeddings: 40960,
                rms_norm_eps: 1e-6,
                rope_theta: 1e6,
                tie_word_embeddings: true,
                dtype: Some(WeightDtype::Bf16),
            }
        );
        assert_eq!(c.tensor_shapes().len(), 1 + 28 * 11 + 1);
    }

    #[test]
    fn legacy_and_transformers_5_spellings_agree() {
        let legacy = parse(&base()).unwrap();
        let mut v5 = base();
        let m = v5.as_object_mut().unwrap();
        m.remove("rope_theta");
        m.remove("torch_dtype");
        m.insert("rope_parameters".into(), serde_json::json!({"rope_theta": 1e6, "rope_type": "default"}));
        m.insert("dtype".into(), "bfloat16".into());
        assert_eq!(parse(&v5).unwrap(), legacy);
        assert_eq!(legacy.dtype, Some(WeightDtype::Bf16));
        assert_eq!(legacy.rope_theta, 1e6);
        assert_eq!(legacy.reference_params().n_kv_heads, 2);
    }

    #[test]
    fn optional_keys_take_hf_defaults() {
        let mut v = base();
        let m = v.as_object_mut().unwrap();
        for k in ["num_key_value_heads", "tie_word_embeddings", "torch_dtype", "model_type"] {
            m.remove(k);
        }
        let c = parse(&v).unwrap();
        assert_eq!((c.num_key_value_heads, c.tie_word_embeddings, c.dtype), (4, false, None));
    }

    #[test]
    fn missing_keys_are_named() {
        for key in ["vocab_size", "hidden_size", "head_dim", "num_hidden_layers", "rms_norm_eps"] {
            rejects(|m| drop(m.remove(key)), &[&format!("`{key}` is missing"), "expected a positive"]);
        }
        rejects(|m| drop(m.remove("rope_theta")), &["`rope_theta` is missing", "rope_parameters.rope_theta"]);
    }

    #[test]
    fn bad_values_are_named_with_what_was_expected() {
        rejects(|m| drop(m.insert("hidden_size".into(), 0.into())), &["`hidden_size` is 0", "positive integer"]);
        rejects(|m| drop(m.insert("hidden_size".into(), "64".into())), &["`hidden_size` is \"64\""]);
        rejects(|m| drop(m.insert("rms_norm_eps".into(), (-1.0).into())), &["`rms_norm_eps` is -1.0"]);
        rejects(|m| drop(m.insert("num_key_value_heads".into(), 3.into())), &["a divisor of num_attention_heads (4)"]);
        rejects(|m| drop(m.insert("head_dim".into(), 7.into())), &["`head_dim` is 7", "even"]);
        rejects(|m| drop(m.insert("torch_dtype".into(), "int8".into())), &["`torch_dtype`", "\"bfloat16\""]);
        rejects(|m| drop(m.insert("dtype".into(), "float32".into())), &["`dtype`", "same dtype as torch_dtype"]);
        rejects(|m| drop(m.insert("tie_word_embeddings".into(), 1.into())), &["true or false"]);
        rejects(
            |m| {
                drop(m.insert("rope_parameters".into(), serde_json::json!({"rope_theta": 1e4, "rope_type": "default"})))
            },
            &["`rope_parameters.rope_theta` is 10000.0", "same θ as rope_theta"],
        );
    }

    #[test]
    fn unsupported_variants_are_rejected() {
        rejects(|m| drop(m.insert("model_type".into(), "qwen3_moe".into())), &["`model_type`", "dense Qwen3"]);
        rejects(
            |m| drop(m.insert("rope_scaling".into(), serde_json::json!({"rope_type": "yarn", "factor": 4.0}))),
            &["`rope_scaling.rope_type` is \"yarn\""],
        );
        rejects(|m| drop(m.insert("hidden_act".into(), "gelu".into())), &["`hidden_act`"]);
        rejects(|m| drop(m.insert("attention_bias".into(), true.into())), &["`attention_bias`"]);
        rejects(|m| drop(m.insert("use_sliding_window".into(), true.into())), &["`use_sliding_window`"]);
    }

    #[test]
    fn not_json_or_not_an_object_is_an_error() {
        let e = Qwen3Config::parse("{", Path::new("x/config.json")).unwrap_err().to_string();
        assert!(e.contains("x/config.json is not valid JSON"), "{e}");
        let e = Qwen3Config::parse("[1]", Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("a JSON object"), "{e}");
    }

    #[test]
    fn tensor_list_follows_tying() {
        let tied = parse(&base()).unwrap();
        let names: Vec<_> = tied.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 1 + 2 * 11 + 1);
        assert!(!names.iter().any(|n| n == "lm_head.weight"));
        let untied = Qwen3Config { tie_word_embeddings: false, ..tied };
        let shapes = untied.tensor_shapes();
        assert_eq!(shapes.last().unwrap(), &("lm_head.weight".to_string(), vec![32, 16]));
        assert!(shapes.contains(&("model.layers.1.self_attn.o_proj.weight".to_string(), vec![16, 32])));
    }
}
