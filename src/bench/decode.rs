//! Whole Qwen3 decode steps at real shapes: time per token on the GPU, split by kernel, and how
//! close it comes to the weight-bandwidth roofline.
//!
//! Method: an [`Engine`] with random weights (generated on the GPU) decodes `warmup + steps`
//! tokens starting at `context` cache positions (filled with random K/V, so long contexts need no
//! prefill), with a GPU timestamp at the start and end of every step (host gaps between submits
//! excluded); the figures are order statistics over the timed steps. A second run with a
//! timestamp after every stage gives the per-kernel split (medians summed over layers); those
//! timestamps cost time of their own, so its total is reported separately. Tokens/s on the host clock (submit to sampled
//! id) is reported beside it.
//!
//! Roofline: a decode step must read every weight once (the embeddings only one row unless they
//! are also the head), so `weight bytes / measured copy bandwidth` is the least time per token;
//! the roofline fraction is that over the measured time. Bytes moved also count the K/V read
//! (2 · layers · Hkv · D · element size · context).

use std::collections::BTreeMap;

use crate::engine::{Engine, EngineError, GenerateOptions, Trace};
use crate::kernels::Dtype;

use super::Stats;

/// One context length of one model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeMeasurement {
    pub context: usize,
    pub kv_dtype: Dtype,
    /// GPU time per token over the timed steps.
    pub per_token: Stats,
    /// GPU time per token of the run with a timestamp after every stage (the one `kernels_us`
    /// comes from): the difference to `per_token` is what those timestamps cost.
    pub staged_per_token: Stats,
    /// Host-clock tokens per second over the timed steps (includes submit and wait latency).
    pub host_tokens_per_second: f64,
    pub tokens_per_submit: usize,
    /// Median GPU µs per token of each stage kind (layers summed), largest first, from the run
    /// with per-stage timestamps.
    pub kernels_us: Vec<(String, f64)>,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// Dispatches and barriers of one step.
    pub dispatches: u32,
    pub barriers: u32,
}

impl DecodeMeasurement {
    pub fn tokens_per_second(&self) -> f64 {
        1e9 / self.per_token.median_ns
    }

    /// Bytes read per token (weights + K/V) per second, GB/s.
    pub fn achieved_gbps(&self) -> f64 {
        (self.weight_bytes + self.kv_bytes) as f64 / self.per_token.median_ns
    }

    /// Least time per token (weights read once at `copy_gbps`) over the measured time.
    pub fn roofline_fraction(&self, copy_gbps: f64) -> f64 {
        (self.weight_bytes as f64 / copy_gbps) / self.per_token.median_ns
    }
}

/// Times `steps` decode steps (after `warmup`) at `context` cached positions.
pub fn measure_decode(
    engine: &Engine,
    context: usize,
    kv_dtype: Dtype,
    warmup: usize,
    steps: usize,
    tokens_per_submit: usize,
) -> Result<DecodeMeasurement, EngineError> {
    if steps == 0 {
        return Err(EngineError::Input("a decode benchmark needs at least one timed step".into()));
    }
    // The step time comes from a run with one timestamp per step; the split by stage from a
    // second run with a timestamp after every stage (which costs time of its own).
    // The staged run takes fewer steps a submit where its timestamps would not fit.
    let run = |trace| {
        let tokens_per_submit = tokens_per_submit.min(engine.max_tokens_per_submit(trace));
        let options =
            GenerateOptions { kv_dtype, trace, start_position: context, tokens_per_submit, ..Default::default() };
        engine.generate(&[1], warmup + steps, &options, |_| {})
    };
    let generation = run(Trace::Steps)?;
    let mut per_step = vec![0.0; warmup + steps];
    for e in generation.trace.iter().filter(|e| e.step < warmup + steps) {
        per_step[e.step] += e.dur_us * 1e3;
    }
    let staged = run(Trace::Stages)?;
    let mut staged_per_step = vec![0.0; steps];
    let mut kernels: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // The last submit may run past the requested steps: those events are left out.
    for e in staged.trace.iter().filter(|e| e.step >= warmup && e.step < warmup + steps) {
        staged_per_step[e.step - warmup] += e.dur_us * 1e3;
        let kind = e.name.split_once('.').map_or(e.name.as_str(), |(layer, rest)| {
            if layer.starts_with('L') && layer[1..].chars().all(|c| c.is_ascii_digit()) { rest } else { &e.name }
        });
        let samples = kernels.entry(kind.to_string()).or_insert_with(|| vec![0.0; steps]);
        samples[e.step - warmup] += e.dur_us;
    }
    let mut kernels_us: Vec<(String, f64)> =
        kernels.into_iter().map(|(k, v)| (k, Stats::from_samples(&v).median_ns)).collect();
    kernels_us.sort_by(|a, b| b.1.total_cmp(&a.1));
    let host: f64 = generation.step_seconds[warmup..].iter().sum();
    let c = engine.config();
    let kv_bytes =
        (2 * kv_dtype.cache_bytes(c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context)) as u64;
    Ok(DecodeMeasurement {
        context,
        kv_dtype,
        per_token: Stats::from_samples(&per_step[warmup..]),
        staged_per_token: Stats::from_samples(&staged_per_step),
        host_tokens_per_second: steps as f64 / host,
        tokens_per_submit,
        kernels_us,
        weight_bytes: engine.weights().bytes_per_token(),
        kv_bytes,
        dispatches: generation.counters.dispatches,
        barriers: generation.counters.barriers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Context;
    use crate::model::Qwen3Config;

    /// Qwen3-0.6B's heads with 2 layers, hidden 64, intermediate 128, vocabulary 512.
    fn tiny_engine() -> Engine {
        let ctx = Context::shared().expect("a Vulkan device");
        let mut config = Qwen3Config::preset("qwen3-0.6b").expect("preset");
        (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) = (512, 64, 128, 2);
        Engine::random(&ctx, config, Dtype::Bf16, 7).expect("random weights")
    }

    #[test]
    fn a_tiny_model_gives_consistent_figures() {
        let engine = tiny_engine();
        let m = measure_decode(&engine, 100, Dtype::F16, 1, 4, 3).expect("measure");
        assert_eq!(m.per_token.samples, 4);
        assert!(m.per_token.median_ns > 0.0 && m.tokens_per_second() > 0.0);
        assert_eq!(m.kv_bytes, 2 * 2 * 8 * 128 * 2 * 100);
        // Every stage kind appears once, layers summed: embed, 5 per layer, norm_lm_head, argmax.
        let kinds: Vec<&str> = m.kernels_us.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds.len(), 8, "{kinds:?}");
        assert!(kinds.contains(&"attention") && kinds.contains(&"norm_gate_up_swiglu"), "{kinds:?}");
        let sum: f64 = m.kernels_us.iter().map(|(_, v)| v).sum();
        assert!(sum > 0.0);
    }

    #[test]
    fn the_staged_run_fits_its_timestamps_in_each_command_buffer() {
        // max_tokens_per_submit counts a step's timestamps as recorded: 5 a layer and 3 more.
        let engine = tiny_engine();
        let staged = GenerateOptions { trace: Trace::Stages, ..Default::default() };
        let g = engine.generate(&[1], 1, &staged, |_| {}).expect("generate");
        assert_eq!(g.trace.iter().filter(|e| e.step == 0).count(), 13);
        assert_eq!(engine.max_tokens_per_submit(Trace::Stages), 4095 / 13);
        assert_eq!(engine.max_tokens_per_submit(Trace::Steps), 4095);
        // Past it generate says what is wrong (Qwen3-0.6B's 28 layers: 28 steps a buffer, under
        // the 64 that `bench decode --tokens-per-submit` takes; measure_decode's staged run
        // takes at most this many).
        let options = GenerateOptions { tokens_per_submit: 316, ..staged };
        let e = engine.generate(&[1], 1, &options, |_| {}).unwrap_err().to_string();
        assert!(e.contains("tokens_per_submit is 316") && e.contains("at most 315 steps"), "{e}");
    }
}
