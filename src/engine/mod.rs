//! The Qwen3 decode engine: a whole decode step on the GPU, recorded once and replayed per token.
//!
//! One step is: the embedding row; then per layer, RMSNorm fused with the q/k/v projections (one
//! dispatch), q/k-norm with RoPE, decode attention with the new K/V appended in the same dispatch
//! (the fused hot-path kernel), the output projection added to the residual, RMSNorm fused with
//! gate/up and SwiGLU (one dispatch), and the down projection added to the residual; then the
//! final norm fused with the LM head, and the argmax. The step's position and input token live in
//! a small state buffer (`[seq_len, token, prompt_len, sampled]`) that the argmax kernel advances,
//! feeding the next prompt token while the prompt lasts and the sampled token after; so a token
//! costs one queue submit and one host wait, no copies, and the only host read is the sampled id.
//!
//! Weights stay in their stored type ([`weights`]); activations and sums are f32; the KV cache
//! is f32, f16 or bf16. [`Generation`] reports the per-token counters the tests assert.

pub mod trace;
pub mod weights;

use std::sync::Arc;
use std::time::Instant;

use crate::gpu::{Buffer, Context, GpuError, Location, Recorder};
use crate::kernels::attention::{self, AttentionBuffers, AttentionMutant, AttentionParams, QkNormRope};
use crate::kernels::layers::{self, LayerMutant, Matrix, MatvecCall, X};
use crate::kernels::{CacheLayout, Dtype, KernelError, Paging};
use crate::model::{Checkpoint, ModelError, Qwen3Config};
use crate::reference::qwen3::rope_inv_freq;

pub use trace::TraceEvent;
pub use weights::GpuWeights;

/// Why the engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{0}")]
    Input(String),
}

impl From<crate::kernels::ParamError> for EngineError {
    fn from(e: crate::kernels::ParamError) -> Self {
        EngineError::Kernel(e.into())
    }
}

/// A deliberate bug of the engine, for the token-match suite's mutants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineMutant {
    InterleavedRope,
    SkipQkNorm,
    NormWeightIgnored,
    /// K/V head of query head h is h mod n_kv_heads instead of h / ratio.
    GqaModulo,
}

impl EngineMutant {
    pub const ALL: [EngineMutant; 4] = [
        EngineMutant::InterleavedRope,
        EngineMutant::SkipQkNorm,
        EngineMutant::NormWeightIgnored,
        EngineMutant::GqaModulo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EngineMutant::InterleavedRope => "interleaved_rope",
            EngineMutant::SkipQkNorm => "skip_qk_norm",
            EngineMutant::NormWeightIgnored => "norm_weight_ignored",
            EngineMutant::GqaModulo => "gqa_modulo",
        }
    }

    fn layer(self) -> Option<LayerMutant> {
        match self {
            EngineMutant::NormWeightIgnored => Some(LayerMutant::NormWeightIgnored),
            _ => None,
        }
    }

    fn attention(self) -> Option<AttentionMutant> {
        match self {
            EngineMutant::InterleavedRope => Some(AttentionMutant::InterleavedRope),
            EngineMutant::SkipQkNorm => Some(AttentionMutant::SkipQkNorm),
            EngineMutant::GqaModulo => Some(AttentionMutant::GqaModulo),
            EngineMutant::NormWeightIgnored => None,
        }
    }
}

/// GPU timestamps a generation writes. Each timestamp waits for the work before it, so per-stage
/// timestamps cost time themselves (H200, Qwen3-8B: about 1.2 µs each, 4% of the step);
/// benchmarks take the step time from `Steps` and the split by stage from a separate `Stages` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Trace {
    #[default]
    Off,
    /// One event per step (`step`).
    Steps,
    /// One event per stage of every step.
    Stages,
}

/// How a generation runs.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Element type of the KV cache.
    pub kv_dtype: Dtype,
    /// A paged KV cache with pages of this many positions (a multiple of 8 in 8..=256), its block
    /// table in a shuffled order as a serving engine's allocator leaves it; `None`: contiguous.
    pub kv_page_size: Option<usize>,
    /// Read every step's logits back (tests; the hot path never reads them).
    pub keep_logits: bool,
    /// Which GPU timestamps to write (per stage for `--trace`).
    pub trace: Trace,
    pub mutant: Option<EngineMutant>,
    /// Benchmarks: start with this many cache positions already filled (with random values) and
    /// feed the prompt after them, to time long contexts without prefilling them.
    pub start_position: usize,
    /// Decode steps recorded back to back in one command buffer (at least 1): one submit and one
    /// host wait per this many tokens. The last submit may run past the requested tokens; what
    /// it computes beyond them is discarded. `keep_logits` needs 1.
    pub tokens_per_submit: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            kv_dtype: Dtype::F32,
            kv_page_size: None,
            keep_logits: false,
            trace: Trace::Off,
            mutant: None,
            start_position: 0,
            tokens_per_submit: 1,
        }
    }
}

/// What one submit of `tokens_per_submit` decode steps costs in API calls; the same every submit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepCounters {
    pub tokens_per_submit: u32,
    pub submits: u32,
    pub dispatches: u32,
    pub barriers: u32,
    pub copies: u32,
    pub host_waits: u32,
    /// Bytes the host reads back (the sampled ids; plus the logits with `keep_logits`).
    pub host_read_bytes: u64,
}

/// The result of [`Engine::generate`].
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// With `keep_logits`: the logits after each step (row t predicts the token after position t).
    pub logits: Vec<Vec<f32>>,
    pub counters: StepCounters,
    /// Wall time of each step (submit to sampled id on the host; a submit of several steps is
    /// shared equally among them), in seconds.
    pub step_seconds: Vec<f64>,
    /// With `trace`: one event per dispatch of every step.
    pub trace: Vec<TraceEvent>,
}

impl Generation {
    /// Decode rate over the steps that produced new tokens (the prompt steps excluded unless the
    /// prompt is a single token).
    pub fn tokens_per_second(&self) -> f64 {
        let skip = self.prompt_ids.len().saturating_sub(1).min(self.step_seconds.len().saturating_sub(1));
        let steps = &self.step_seconds[skip..];
        let seconds: f64 = steps.iter().sum();
        if seconds > 0.0 { steps.len() as f64 / seconds } else { 0.0 }
    }
}

/// A model on a device, ready to generate.
pub struct Engine {
    ctx: Arc<Context>,
    config: Qwen3Config,
    weights: GpuWeights,
    /// Each layer's q_norm and k_norm weights widened to f32 (the attention kernel's prologue
    /// takes them so; its variants are by cache type, not weight type).
    qk_norms: Vec<(Buffer, Buffer)>,
}

impl Engine {
    /// Uploads `checkpoint`'s weights; `progress(done, total)` reports bytes.
    pub fn from_checkpoint(
        ctx: &Arc<Context>,
        checkpoint: &Checkpoint,
        progress: impl FnMut(u64, u64),
    ) -> Result<Engine, EngineError> {
        let weights = GpuWeights::upload(ctx, checkpoint, progress)?;
        Engine::new(ctx, checkpoint.config().clone(), weights)
    }

    /// Random weights of `config`'s shapes, generated on the GPU (benchmarks).
    pub fn random(ctx: &Arc<Context>, config: Qwen3Config, dtype: Dtype, seed: u32) -> Result<Engine, EngineError> {
        let weights = GpuWeights::random(ctx, &config, dtype, seed)?;
        Engine::new(ctx, config, weights)
    }

    fn new(ctx: &Arc<Context>, config: Qwen3Config, weights: GpuWeights) -> Result<Engine, EngineError> {
        layers::check_device(ctx, weights.any_16bit())?;
        let zero_state = Buffer::with_bytes(ctx, "zero_state", &[0; 4 * layers::STATE_WORDS], Location::Upload)?;
        let f32_norm = |name: String| Buffer::new(ctx, &name, 4 * config.head_dim as u64, Location::Device);
        let qk_norms = (0..config.num_hidden_layers)
            .map(|l| Ok((f32_norm(format!("q_norm_f32.{l}"))?, f32_norm(format!("k_norm_f32.{l}"))?)))
            .collect::<Result<Vec<_>, GpuError>>()?;
        let mut rec = Recorder::new(ctx)?;
        for (layer, (q, k)) in weights.layers.iter().zip(&qk_norms) {
            layers::widen(&mut rec, ctx, &zero_state, layer.q_norm.vector(), q)?;
            layers::widen(&mut rec, ctx, &zero_state, layer.k_norm.vector(), k)?;
        }
        rec.submit()?;
        Ok(Engine { ctx: ctx.clone(), config, weights, qk_norms })
    }

    /// Most decode steps one command buffer can hold with `trace`: each timestamp takes a query
    /// of its pool ([`crate::gpu::MAX_TIMESTAMPS`]); with [`Trace::Stages`] a step writes one after
    /// the embedding, five a layer, and after the LM head and argmax (see `record_step`).
    pub fn max_tokens_per_submit(&self, trace: Trace) -> usize {
        let per_step = match trace {
            Trace::Off => return usize::MAX,
            Trace::Steps => 1,
            Trace::Stages => 5 * self.config.num_hidden_layers + 3,
        };
        // One timestamp opens the buffer.
        (crate::gpu::MAX_TIMESTAMPS as usize - 1) / per_step
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    pub fn weights(&self) -> &GpuWeights {
        &self.weights
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Runs `prompt` then greedily generates `max_new_tokens` tokens (the prompt is fed one token
    /// per step). `on_token` sees each generated id as soon as the host has it; it must not record
    /// GPU work on the same context (with validation on, recorders are serialized and the
    /// generation's recorded step holds that lock until it returns).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        options: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation, EngineError> {
        let c = &self.config;
        if prompt.is_empty() {
            return Err(EngineError::Input("the prompt is empty; give at least one token".into()));
        }
        if let Some((i, &id)) = prompt.iter().enumerate().find(|&(_, &id)| id as usize >= c.vocab_size) {
            return Err(EngineError::Input(format!(
                "prompt token {i} is {id}, outside the vocabulary of {} ids",
                c.vocab_size
            )));
        }
        let steps = prompt.len() - 1 + max_new_tokens.max(1);
        let per_submit = options.tokens_per_submit;
        if per_submit == 0 || (options.keep_logits && per_submit != 1) {
            return Err(EngineError::Input(format!(
                "tokens_per_submit is {per_submit}; it must be at least 1 (exactly 1 when logits are kept)"
            )));
        }
        let most = self.max_tokens_per_submit(options.trace);
        if per_submit > most {
            return Err(EngineError::Input(format!(
                "tokens_per_submit is {per_submit}; with {:?} tracing a command buffer holds timestamps for at most {most} steps of this model",
                options.trace
            )));
        }
        let submits = steps.div_ceil(per_submit);
        // One spare position: the last sampled id is written to the ids buffer too.
        let capacity = options.start_position + submits * per_submit + 1;
        if capacity > c.max_position_embeddings {
            return Err(EngineError::Input(format!(
                "the start position ({}), the prompt ({} tokens) and max_new_tokens ({max_new_tokens}) \
                 exceed the model's max_position_embeddings ({})",
                options.start_position,
                prompt.len(),
                c.max_position_embeddings
            )));
        }
        let scratch = Scratch::new(self, prompt, capacity, options)?;
        let mut rec = Recorder::reusable(&self.ctx)?;
        let mut labels = Vec::new();
        for k in 0..per_submit {
            if k > 0 {
                rec.barrier(); // the next step's embedding reads the state this step's argmax wrote
            }
            let step_labels = record_step(&mut rec, self, &scratch, options, k == 0)?;
            labels.extend(step_labels.into_iter().map(|l| (k, l)));
        }
        let mut program = rec.finish()?;
        let recorded = program.counters();

        let mut out = Generation {
            prompt_ids: prompt.to_vec(),
            counters: StepCounters {
                tokens_per_submit: per_submit as u32,
                submits: 1,
                dispatches: recorded.dispatches,
                barriers: recorded.barriers,
                copies: recorded.copies,
                host_waits: 1,
                host_read_bytes: 4 * per_submit as u64 + if options.keep_logits { 4 * c.vocab_size as u64 } else { 0 },
            },
            ..Generation::default()
        };
        let mut gpu_clock = 0.0;
        let start_position = options.start_position;
        for submit in 0..submits {
            let start = Instant::now();
            let completed = program.run()?;
            // The id sampled at position p is the input id of position p + 1.
            let first = submit * per_submit;
            let sampled = scratch.ids(start_position + first + 1, per_submit)?;
            let seconds = start.elapsed().as_secs_f64() / per_submit as f64;
            if options.keep_logits {
                out.logits.push(scratch.logits()?);
            }
            if options.trace != Trace::Off {
                gpu_clock = trace::push_step(&mut out.trace, &labels, &completed.timestamps_ns, first, gpu_clock);
            }
            for (k, &id) in sampled.iter().enumerate().take(steps - first) {
                out.step_seconds.push(seconds);
                if first + k + 1 >= prompt.len() {
                    out.generated_ids.push(id);
                    on_token(id);
                }
            }
        }
        out.generated_ids.truncate(max_new_tokens);
        Ok(out)
    }

    /// Logits after each of `ids` (row t predicts token t + 1 from `ids[0..=t]`).
    pub fn teacher_forced_logits(&self, ids: &[u32], options: &GenerateOptions) -> Result<Vec<Vec<f32>>, EngineError> {
        let options = GenerateOptions { keep_logits: true, ..options.clone() };
        Ok(self.generate(ids, 1, &options, |_| {})?.logits)
    }
}

/// The per-generation buffers: decode state, ids (prompt, then sampled), RoPE table,
/// activations, KV cache.
struct Scratch {
    capacity: usize,
    state: Buffer,
    /// u32 [capacity]: the input id of every position (the prompt, then what the argmax writes).
    ids: Buffer,
    rope: Buffer,
    x: Buffer,
    h: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    attn: Buffer,
    /// The MLP's activation silu(gate)·up.
    act: Buffer,
    logits: Buffer,
    argmax_partial: Buffer,
    partial_o: Buffer,
    partial_ml: Buffer,
    counters: Buffer,
    k_cache: Vec<Buffer>,
    v_cache: Vec<Buffer>,
    /// The paged cache's block table (one sequence).
    block_table: Option<Buffer>,
    attention: AttentionParams,
    /// o_proj merges attention's split-K partials (see [`consumer_merges`]).
    consumer_merge: bool,
}

impl Scratch {
    fn new(
        engine: &Engine,
        prompt: &[u32],
        capacity: usize,
        options: &GenerateOptions,
    ) -> Result<Scratch, EngineError> {
        let ctx = &engine.ctx;
        let c = &engine.config;
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let f32_buffer = |name: &str, n: usize| Buffer::new(ctx, name, 4 * n as u64, Location::Device);

        let mut attention =
            AttentionParams::qwen3_decode(hq, hkv, d, options.kv_dtype, capacity, c.rms_norm_eps as f32);
        let mut block_table = None;
        if let Some(ps) = options.kv_page_size {
            let pages = capacity.div_ceil(ps);
            attention.layout = CacheLayout::token_major(pages, hkv, ps, d, 0);
            attention.paging = Some(Paging { pages_per_seq: pages });
            let mut ids: Vec<u32> = (0..pages as u32).collect();
            let mut rng = crate::cases::rng::Rng::stream(0, "engine-pages");
            for i in (1..pages).rev() {
                ids.swap(i, rng.below(i as u64 + 1) as usize);
            }
            attention.validate_block_tables(&ids)?;
            block_table = Some(Buffer::with_bytes(ctx, "block_table", &crate::kernels::words(&ids), Location::Upload)?);
        }
        attention.validate(ctx)?;
        let cache_bytes = options.kv_dtype.cache_bytes(attention.layout.min_elements()) as u64;
        let cache = |kind: &str| -> Result<Vec<Buffer>, GpuError> {
            (0..c.num_hidden_layers)
                .map(|l| Buffer::new(ctx, &format!("{kind}_cache.{l}"), cache_bytes, Location::Device))
                .collect()
        };

        // The prompt sits at absolute positions start.. of the prompt buffer.
        let start = options.start_position;
        let state_words = [start as u32 + 1, prompt[0], (start + prompt.len()) as u32, 0];
        let state = Buffer::with_bytes(ctx, "state", &crate::kernels::words(&state_words), Location::Upload)?;
        let mut prompt_words = vec![0; start];
        prompt_words.extend_from_slice(prompt);
        prompt_words.resize(capacity, 0);
        let prompt_buffer = Buffer::with_bytes(ctx, "ids", &crate::kernels::words(&prompt_words), Location::Upload)?;
        let rope =
            Buffer::with_bytes(ctx, "rope", &rope_table(c.rope_theta, d, attention.seq_capacity()), Location::Upload)?;
        let logits_location = if options.keep_logits { Location::Readback } else { Location::Device };
        let (k_cache, v_cache) = (cache("k")?, cache("v")?);
        if start > 0 {
            // Values like real keys and values: finite, unit scale.
            let mut rec = Recorder::new(ctx)?;
            let elements = attention.layout.min_elements();
            for (i, b) in k_cache.iter().chain(&v_cache).enumerate() {
                layers::fill(&mut rec, ctx, b, options.kv_dtype, elements, 0x5eed + i as u32, 1.0, 0.0)?;
            }
            rec.submit()?;
        }
        Ok(Scratch {
            capacity,
            state,
            ids: prompt_buffer,
            rope,
            x: f32_buffer("x", c.hidden_size)?,
            h: f32_buffer("h", c.hidden_size)?,
            q: f32_buffer("q", hq * d)?,
            k: f32_buffer("k", hkv * d)?,
            v: f32_buffer("v", hkv * d)?,
            attn: f32_buffer("attn", hq * d)?,
            act: f32_buffer("act", c.intermediate_size)?,
            logits: Buffer::new(ctx, "logits", 4 * c.vocab_size as u64, logits_location)?,
            argmax_partial: layers::zeroed_argmax_partial(ctx, c.vocab_size)?,
            partial_o: Buffer::new(
                ctx,
                "attention.partial_o",
                attention.partial_o_bytes(ctx.info()),
                Location::Device,
            )?,
            partial_ml: Buffer::new(
                ctx,
                "attention.partial_ml",
                attention.partial_ml_bytes(ctx.info()),
                Location::Device,
            )?,
            counters: attention::zeroed_counters(ctx, &attention)?,
            k_cache,
            v_cache,
            block_table,
            consumer_merge: consumer_merges(c, &attention, ctx.info()),
            attention,
        })
    }

    /// `n` input ids from position `first` (sampled ids, past the prompt).
    fn ids(&self, first: usize, n: usize) -> Result<Vec<u32>, GpuError> {
        let bytes = self.ids.read_range(4 * first as u64, 4 * n as u64)?;
        Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }

    fn logits(&self) -> Result<Vec<f32>, GpuError> {
        Ok(self.logits.read()?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }
}

/// HF's RoPE factors per (position, i < head_dim/2) as (cos, sin) f32 pairs: the angle is the
/// f32 product pos·inv_freq[i] (as HF computes it), its cosine and sine rounded once from f64.
pub(crate) fn rope_table(theta: f64, head_dim: usize, capacity: usize) -> Vec<u8> {
    let inv_freq = rope_inv_freq(theta, head_dim);
    let mut out = Vec::with_capacity(capacity * head_dim * 4);
    for pos in 0..capacity {
        for &f in &inv_freq {
            let angle = f64::from(pos as f32 * f);
            out.extend_from_slice(&(angle.cos() as f32).to_le_bytes());
            out.extend_from_slice(&(angle.sin() as f32).to_le_bytes());
        }
    }
    out
}

/// Most bytes of attention's split-K partials o_proj's workgroups may read in all to merge them
/// as they read x ([`layers::merged_x_reads`]); past that attention merges its own. H100, µs/token
/// with attention merging / o_proj merging: Qwen3-0.6B at ctx 512 (5 chunks, 21 MB) 1196 / 1173;
/// at ctx 4096 (13 chunks, 55 MB) 1468 / 1552.
const CONSUMER_MERGE_MAX_BYTES: u64 = 32 << 20;

/// Whether o_proj merges attention's split-K partials ([`CONSUMER_MERGE_MAX_BYTES`]).
fn consumer_merges(c: &Qwen3Config, attention: &AttentionParams, device: &crate::gpu::DeviceInfo) -> bool {
    let (_, chunks) = attention.split(device);
    let reads = layers::merged_x_reads(c.hidden_size, c.num_attention_heads, chunks, c.head_dim);
    (2..=layers::MATVEC_MAX_MERGE_CHUNKS).contains(&chunks) && reads <= CONSUMER_MERGE_MAX_BYTES
}

/// Records one decode step; returns the label of each timestamped interval (with `trace`).
fn record_step<'a>(
    rec: &mut Recorder<'a>,
    engine: &'a Engine,
    s: &'a Scratch,
    options: &GenerateOptions,
    first_in_buffer: bool,
) -> Result<Vec<String>, EngineError> {
    let ctx = &*engine.ctx;
    let c = &engine.config;
    let w = &engine.weights;
    let eps = c.rms_norm_eps as f32;
    let layer_mutant = options.mutant.and_then(EngineMutant::layer);
    let attention_mutant = options.mutant.and_then(EngineMutant::attention);
    let mut labels = Vec::new();
    // A timestamp after each stage (with `trace`), naming the interval it closes.
    let mut mark = |rec: &mut Recorder<'a>, label: String| -> Result<(), EngineError> {
        if options.trace == Trace::Stages {
            rec.timestamp()?;
            labels.push(label);
        }
        Ok(())
    };
    if options.trace != Trace::Off && first_in_buffer {
        rec.timestamp()?;
    }

    layers::embed(rec, ctx, &s.state, w.embed_tokens.matrix(), &s.x)?;
    mark(rec, "embed".into())?;
    rec.barrier();
    // RMSNorm of x fused into the projections that read it (when the norm weight has the
    // matrices' element type; else a separate norm into h first).
    let normed_matvec = |rec: &mut Recorder<'a>,
                         norm: &'a weights::GpuTensor,
                         outputs: Vec<(Matrix<'a>, &'a Buffer)>,
                         swiglu: bool,
                         label: &str|
     -> Result<(), EngineError> {
        let mut call =
            MatvecCall { x: X::Vector(&s.x), outputs, norm: None, accumulate: false, swiglu, mutant: layer_mutant };
        if norm.dtype == call.outputs[0].0.dtype {
            call.norm = Some((norm.vector(), eps));
        } else {
            layers::rmsnorm(rec, ctx, &s.x, norm.vector(), &s.h, eps, layer_mutant, "rmsnorm")?;
            rec.barrier();
            call.x = X::Vector(&s.h);
        }
        layers::matvec(rec, ctx, &call, label)?;
        Ok(())
    };
    let residual = |rec: &mut Recorder<'a>, w: &'a weights::GpuTensor, x: X<'a>, label: &str| {
        let call = MatvecCall {
            x,
            outputs: vec![(w.matrix(), &s.x)],
            norm: None,
            accumulate: true,
            swiglu: false,
            mutant: layer_mutant,
        };
        layers::matvec(rec, ctx, &call, label)
    };
    for (l, layer) in w.layers.iter().enumerate() {
        let qkv = vec![(layer.q_proj.matrix(), &s.q), (layer.k_proj.matrix(), &s.k), (layer.v_proj.matrix(), &s.v)];
        normed_matvec(rec, &layer.input_layernorm, qkv, false, "input_layernorm+qkv_proj")?;
        mark(rec, format!("L{l}.norm_qkv_proj"))?;
        rec.barrier();
        let bufs = AttentionBuffers {
            q: &s.q,
            seq_lens: &s.state,
            k_cache: &s.k_cache[l],
            v_cache: &s.v_cache[l],
            out: &s.attn,
            partial_o: &s.partial_o,
            partial_ml: &s.partial_ml,
            counters: &s.counters,
            sinks: None,
            new_k: Some(&s.k),
            new_v: Some(&s.v),
            qk_norm_rope: Some(QkNormRope {
                q_norm: &engine.qk_norms[l].0,
                k_norm: &engine.qk_norms[l].1,
                rope: &s.rope,
            }),
            block_tables: s.block_table.as_ref(),
        };
        // o_proj merges attention's split-K partials as it reads them (few chunks).
        let attn = if s.consumer_merge {
            attention::record_unmerged(rec, ctx, &s.attention, bufs, attention_mutant)?
                .map_or(X::Vector(&s.attn), X::Merged)
        } else {
            attention::record(rec, ctx, &s.attention, bufs, attention_mutant)?;
            X::Vector(&s.attn)
        };
        mark(rec, format!("L{l}.attention"))?;
        rec.barrier();
        residual(rec, &layer.o_proj, attn, "o_proj")?;
        mark(rec, format!("L{l}.o_proj"))?;
        rec.barrier();
        let gate_up = vec![(layer.gate_proj.matrix(), &s.act), (layer.up_proj.matrix(), &s.act)];
        normed_matvec(rec, &layer.post_attention_layernorm, gate_up, true, "post_attention_layernorm+gate_up+swiglu")?;
        mark(rec, format!("L{l}.norm_gate_up_swiglu"))?;
        rec.barrier();
        residual(rec, &layer.down_proj, X::Vector(&s.act), "down_proj")?;
        mark(rec, format!("L{l}.down_proj"))?;
        rec.barrier();
    }
    normed_matvec(rec, &w.norm, vec![(w.lm_head().matrix(), &s.logits)], false, "norm+lm_head")?;
    mark(rec, "norm_lm_head".into())?;
    rec.barrier();
    layers::argmax_advance(rec, ctx, &s.logits, c.vocab_size, &s.argmax_partial, &s.state, &s.ids, s.capacity)?;
    mark(rec, "argmax".into())?;
    if options.trace == Trace::Steps {
        rec.timestamp()?;
        labels.push("step".into());
    }
    Ok(labels)
}
