//! HF transformers' golden data in `corpus/qwen3/<fixture>/` (written by
//! `corpus/qwen3/make_golden.py`), shared by the CPU-reference and the Vulkan-engine suites.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// f32 unit roundoff.
pub const U: f64 = f32::EPSILON as f64 / 2.0;

/// Every fixture directory the suites expect (a new one must be added here too).
pub const FIXTURES: [&str; 3] = ["untied-rmsnorm", "trained-bytes", "gqa4-hd128-long"];

pub fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/qwen3")
}

/// One fixture's golden outputs.
pub struct Golden {
    pub name: &'static str,
    pub dir: PathBuf,
    pub golden: Value,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// `[T][vocab]`, T = prompt + generated: row t holds the logits after ids[0..=t].
    pub logits: Vec<Vec<f32>>,
}

/// The largest per-row error of some logits against HF's, as a fraction of the row's scale
/// `max(1, max |hf logit|)`.
#[derive(Clone, Copy, Debug)]
pub struct LogitError {
    pub relative: f64,
    pub row: usize,
    pub abs: f64,
}

impl Golden {
    pub fn load(name: &'static str) -> Golden {
        let dir = corpus().join(name);
        let read = |file: &str| {
            std::fs::read(dir.join(file)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; regenerate with `python corpus/qwen3/make_golden.py --only {name}`",
                    dir.join(file).display()
                )
            })
        };
        let golden: Value = serde_json::from_slice(&read("golden.json")).expect("golden.json is JSON");
        let ids = |key: &str| -> Vec<u32> {
            golden[key]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: golden.json lacks {key}"))
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (prompt, generated) = (ids("prompt_ids"), ids("generated_ids"));

        let bytes = read(golden["logits"]["file"].as_str().expect("logits.file"));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("logits file is safetensors");
        let t = st.tensor(golden["logits"]["tensor"].as_str().expect("logits.tensor")).expect("logits tensor");
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}: logits must be f32");
        let &[rows, vocab] = t.shape() else { panic!("{name}: logits must be 2-D") };
        assert_eq!(rows, prompt.len() + generated.len(), "{name}: one logits row per id");
        let flat: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let logits = flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect();
        Golden { name, dir, golden, prompt, generated, logits }
    }

    /// Prompt followed by the greedy tokens: what the teacher-forced logits were computed on.
    pub fn all_ids(&self) -> Vec<u32> {
        [&self.prompt[..], &self.generated[..]].concat()
    }

    /// Largest per-row error of `logits` against HF's, as a fraction of the row's scale.
    pub fn logit_error(&self, logits: &[Vec<f32>]) -> LogitError {
        assert_eq!(logits.len(), self.logits.len(), "{}: one row per id", self.name);
        logit_error(&self.logits, logits)
    }

    /// HF's top-1 minus top-2 logit of row `t`.
    pub fn margin(&self, t: usize) -> f64 {
        let mut top = [f64::NEG_INFINITY; 2];
        for &x in &self.logits[t] {
            let x = f64::from(x);
            if x > top[0] {
                top = [x, top[0]];
            } else if x > top[1] {
                top[1] = x;
            }
        }
        top[0] - top[1]
    }
}

/// Largest per-row error of `ours` against `hf`, as a fraction of the row's scale.
pub fn logit_error(hf: &[Vec<f32>], ours: &[Vec<f32>]) -> LogitError {
    let mut worst = LogitError { relative: 0.0, row: 0, abs: 0.0 };
    for (row, (ours, hf)) in ours.iter().zip(hf).enumerate() {
        let scale = hf.iter().fold(1.0f64, |m, &x| m.max(f64::from(x).abs()));
        let abs = ours.iter().zip(hf).map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs()).fold(0.0, f64::max);
        // NaN compares false: make it the worst possible.
        let relative = if abs.is_nan() { f64::INFINITY } else { abs / scale };
        if relative > worst.relative {
            worst = LogitError { relative, row, abs };
        }
    }
    worst
}

/// The relative f32 logit bound of the reference suite: `10 · n_layers · √K · u`, K the longest
/// reduction (hidden, H·D, intermediate or sequence length); see tests/qwen3_reference.rs.
pub fn f32_logit_bound(n_layers: usize, reductions: &[usize]) -> f64 {
    let k = reductions.iter().copied().max().unwrap_or(1);
    10.0 * n_layers as f64 * (k as f64).sqrt() * U
}
