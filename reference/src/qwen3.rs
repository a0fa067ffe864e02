//! Qwen3 (dense) decoder forward on the CPU: the oracle the Vulkan engine's tokens and logits are
//! checked against, itself checked against HF transformers' golden data (corpus/qwen3/).
//!
//! # The model (as HF transformers implements it; ANCHORS.md)
//!
//! `x = embed[token]` (not scaled). Per layer: `x += o_proj(attn(input_norm(x)))`, then
//! `x += down(silu(gate(h)) · up(h))` with `h = post_attention_norm(x)`. Then the final norm and
//! the LM head (`lm_head`, or `embed` when the embeddings are tied).
//! - RMSNorm: `x · (mean(x²) + eps)^−½ · w` (the weight itself, not `1 + w`).
//! - Attention: `q = q_proj(h)`, `k = k_proj(h)`, `v = v_proj(h)` reshaped to heads; q/k-norm is an
//!   RMSNorm over each head's `head_dim` elements (one weight shared by all heads), after the
//!   reshape and before RoPE. No biases.
//! - RoPE, "rotate_half" (element i pairs with i + D/2, not 2i with 2i+1) over the whole head,
//!   positions from 0: `inv_freq[i] = 1 / θ^(2i/D)` and the angle `pos · inv_freq[i]` are computed
//!   in f32 the way HF computes them (that f32 rounding shifts angles by up to ~1e-5 rad at a few
//!   hundred positions, too much to ignore). The one difference: the power is correctly rounded
//!   here, torch's f32 pow only to within 1 ulp, so an inv_freq may differ by 1 ulp (harmless:
//!   see [`rope_inv_freq`]).
//! - Causal attention over positions `0..=pos`, kv head of query head h = `h / (H / Hkv)`, scale
//!   `head_dim^−½`, two-pass softmax in f64 over the KV cache (the arithmetic of
//!   [`decode_attention`]).
//!
//! # Precision: f32 storage, f64 arithmetic
//!
//! Every tensor HF materialises in f32 (residual stream, normed activations, projections, q/k
//! after norm and RoPE, K/V cache, attention output, MLP product, logits) is held as f32 here
//! too; each operation computes in f64 from those f32 inputs and rounds its result once. The
//! difference from HF's f32 forward is then HF's own f32 accumulation error (and at most an ulp
//! per materialised tensor), not a different model: on the golden data the logits land within
//! about 1e-6 of their scale (`tests/qwen3_reference.rs` derives its bound, 1.5e-5 to 3.8e-5). Weights are f32 values (16-bit
//! checkpoints are widened exactly by the loader). The K/V cache can be rounded to f16/bf16
//! ([`Qwen3Options::kv_cache`]) to stand for an engine that stores it so.
//!
//! # Invariants
//!
//! - Pure CPU, deterministic, no dependency on the main crate; weights are plain row-major
//!   vectors (`[out][in]`, as `nn.Linear` stores them) that the main crate's loader fills.
//! - Panics only on violated preconditions: inconsistent weights ([`Qwen3Weights::check`]), a
//!   token id `>= vocab_size`, a position past the cached length.
//! - [`Qwen3Mutant`]s exist only so tests can prove the golden data catches typical bugs.

#[cfg(doc)]
use crate::attention::decode_attention;
use crate::dtype::{self, Dtype};

/// Hyperparameters of a Qwen3 dense model (the parts of config.json the forward needs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Qwen3Params {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    /// H: query heads.
    pub n_q_heads: usize,
    /// Hkv: key/value heads; divides H.
    pub n_kv_heads: usize,
    /// D: elements per head (even). `H·D` need not equal `hidden_size`.
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    /// θ of RoPE (rounded to f32 before use, as HF does).
    pub rope_theta: f64,
}

/// One decoder layer; every matrix is row-major `[out][in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3LayerWeights {
    /// `[hidden]`
    pub input_norm: Vec<f32>,
    /// `[H·D][hidden]`
    pub q_proj: Vec<f32>,
    /// `[Hkv·D][hidden]`
    pub k_proj: Vec<f32>,
    /// `[Hkv·D][hidden]`
    pub v_proj: Vec<f32>,
    /// `[hidden][H·D]`
    pub o_proj: Vec<f32>,
    /// `[D]`, shared by all query heads.
    pub q_norm: Vec<f32>,
    /// `[D]`, shared by all kv heads.
    pub k_norm: Vec<f32>,
    /// `[hidden]`
    pub post_attention_norm: Vec<f32>,
    /// `[intermediate][hidden]`
    pub gate_proj: Vec<f32>,
    /// `[intermediate][hidden]`
    pub up_proj: Vec<f32>,
    /// `[hidden][intermediate]`
    pub down_proj: Vec<f32>,
}

/// A whole model in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3Weights {
    pub params: Qwen3Params,
    /// `[vocab][hidden]`
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<Qwen3LayerWeights>,
    /// `[hidden]`: the final norm.
    pub norm: Vec<f32>,
    /// `[vocab][hidden]`, or `None` when tied to `embed_tokens`.
    pub lm_head: Option<Vec<f32>>,
}

impl Qwen3Weights {
    /// Panics, naming the tensor, if any size disagrees with `params` (or `params` itself is
    /// unusable: a zero size, `Hkv ∤ H`, an odd head_dim).
    pub fn check(&self) -> &Self {
        let p = &self.params;
        assert!(
            p.vocab_size > 0 && p.hidden_size > 0 && p.n_q_heads > 0 && p.intermediate_size > 0,
            "sizes must be positive: {p:?}"
        );
        assert!(
            p.n_kv_heads > 0 && p.n_q_heads.is_multiple_of(p.n_kv_heads),
            "n_q_heads ({}) must be a positive multiple of n_kv_heads ({})",
            p.n_q_heads,
            p.n_kv_heads
        );
        assert!(p.head_dim > 0 && p.head_dim.is_multiple_of(2), "head_dim ({}) must be even and positive", p.head_dim);
        assert_eq!(self.layers.len(), p.n_layers, "number of layers");
        let (hidden, q, kv, inter) =
            (p.hidden_size, p.n_q_heads * p.head_dim, p.n_kv_heads * p.head_dim, p.intermediate_size);
        let len =
            |name: &str, v: &[f32], want: usize| assert_eq!(v.len(), want, "{name} has the wrong number of elements");
        len("embed_tokens", &self.embed_tokens, p.vocab_size * hidden);
        len("norm", &self.norm, hidden);
        if let Some(head) = &self.lm_head {
            len("lm_head", head, p.vocab_size * hidden);
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, v, want) in [
                ("input_norm", &l.input_norm, hidden),
                ("q_proj", &l.q_proj, q * hidden),
                ("k_proj", &l.k_proj, kv * hidden),
                ("v_proj", &l.v_proj, kv * hidden),
                ("o_proj", &l.o_proj, hidden * q),
                ("q_norm", &l.q_norm, p.head_dim),
                ("k_norm", &l.k_norm, p.head_dim),
                ("post_attention_norm", &l.post_attention_norm, hidden),
                ("gate_proj", &l.gate_proj, inter * hidden),
                ("up_proj", &l.up_proj, inter * hidden),
                ("down_proj", &l.down_proj, hidden * inter),
            ] {
                len(&format!("layers[{i}].{name}"), v, want);
            }
        }
        self
    }

    /// The LM head matrix `[vocab][hidden]` (the embeddings when tied).
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed_tokens)
    }
}

/// A deliberate bug, for tests that prove the golden data catches it. Never use otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qwen3Mutant {
    /// RoPE rotates adjacent pairs (2i, 2i+1) instead of halves (i, i + D/2).
    InterleavedRope,
    /// q/k-norm left out.
    SkipQkNorm,
    /// Query head h reads kv head `h % Hkv` instead of `h / (H / Hkv)`.
    ModuloGqaMap,
    /// Every RMSNorm weight taken as 1.
    IgnoreNormWeights,
    /// Every RMSNorm scales by `1 + w` (Gemma's convention) instead of `w`.
    OnePlusNormWeights,
    /// RoPE θ = 10⁴ (Llama 2's) instead of the config's.
    RopeTheta10k,
    /// Attention scale `(hidden / H)^−½` instead of `head_dim^−½`.
    ScaleFromHidden,
    /// GELU (tanh approximation) instead of SiLU in the MLP.
    GeluForSilu,
}

impl Qwen3Mutant {
    pub const ALL: [Qwen3Mutant; 8] = [
        Qwen3Mutant::InterleavedRope,
        Qwen3Mutant::SkipQkNorm,
        Qwen3Mutant::ModuloGqaMap,
        Qwen3Mutant::IgnoreNormWeights,
        Qwen3Mutant::OnePlusNormWeights,
        Qwen3Mutant::RopeTheta10k,
        Qwen3Mutant::ScaleFromHidden,
        Qwen3Mutant::GeluForSilu,
    ];
}

/// How to run the forward; `Default` is the faithful model with an f32 KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qwen3Options {
    /// K/V are rounded to this type when cached (what an engine with such a cache reads back).
    pub kv_cache: Dtype,
    /// A deliberate bug (tests only).
    pub mutant: Option<Qwen3Mutant>,
}

impl Default for Qwen3Options {
    fn default() -> Self {
        Qwen3Options { kv_cache: Dtype::F32, mutant: None }
    }
}

/// The forward with its KV cache: feed tokens one position at a time.
pub struct Qwen3Reference<'w> {
    weights: &'w Qwen3Weights,
    options: Qwen3Options,
    /// `inv_freq[i]`, i < D/2 ([`rope_inv_freq`]).
    inv_freq: Vec<f32>,
    /// Per layer, K and V token-major `[pos][Hkv][D]` (already rounded to `options.kv_cache`).
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    len: usize,
}

impl<'w> Qwen3Reference<'w> {
    pub fn new(weights: &'w Qwen3Weights) -> Self {
        Self::with_options(weights, Qwen3Options::default())
    }

    /// Panics if the weights are inconsistent ([`Qwen3Weights::check`]).
    pub fn with_options(weights: &'w Qwen3Weights, options: Qwen3Options) -> Self {
        let p = &weights.check().params;
        let theta = if options.mutant == Some(Qwen3Mutant::RopeTheta10k) { 1e4 } else { p.rope_theta };
        Qwen3Reference {
            weights,
            options,
            inv_freq: rope_inv_freq(theta, p.head_dim),
            k_cache: vec![Vec::new(); p.n_layers],
            v_cache: vec![Vec::new(); p.n_layers],
            len: 0,
        }
    }

    /// Number of cached positions (the position the next token takes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `inv_freq[i] = 1 / θ^(2i/D)` for i < D/2, in f32 ([`rope_inv_freq`]).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// K and V of `layer`, token-major `[pos][Hkv][D]` over the cached positions, as attention
    /// read them (rounded to the cache type).
    pub fn kv_cache(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k_cache[layer], &self.v_cache[layer])
    }

    /// Forgets every cached position.
    pub fn reset(&mut self) {
        self.rewind(0);
    }

    /// Keeps the first `len` cached positions (no-op if fewer are cached).
    pub fn rewind(&mut self, len: usize) {
        let len = len.min(self.len);
        let row = self.weights.params.n_kv_heads * self.weights.params.head_dim;
        for cache in self.k_cache.iter_mut().chain(&mut self.v_cache) {
            cache.truncate(len * row);
        }
        self.len = len;
    }

    /// Runs `token` at position `pos` and returns the `vocab_size` logits that predict the next
    /// token. `pos` is normally [`len`](Self::len); a smaller `pos` first drops the cached
    /// positions `pos..` (rewind). Panics if `pos > len()` or `token >= vocab_size`.
    pub fn forward_token(&mut self, token: u32, pos: usize) -> Vec<f32> {
        let w = self.weights;
        let p = &w.params;
        let token = token as usize;
        assert!(token < p.vocab_size, "token {token} is outside the vocabulary (size {})", p.vocab_size);
        assert!(pos <= self.len, "position {pos} skips past the {} cached positions", self.len);
        self.rewind(pos);
        let mutant = self.options.mutant;
        let (hidden, d) = (p.hidden_size, p.head_dim);

        let mut x = w.embed_tokens[token * hidden..][..hidden].to_vec();
        for (l, layer) in w.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, p.rms_norm_eps, mutant);
            let mut q = matvec(&layer.q_proj, &h);
            let mut k = matvec(&layer.k_proj, &h);
            let v = matvec(&layer.v_proj, &h);
            for (heads, norm) in [(&mut q, &layer.q_norm), (&mut k, &layer.k_norm)] {
                for head in heads.chunks_exact_mut(d) {
                    if mutant != Some(Qwen3Mutant::SkipQkNorm) {
                        let normed = rms_norm(head, norm, p.rms_norm_eps, mutant);
                        head.copy_from_slice(&normed);
                    }
                    rope(head, pos, &self.inv_freq, mutant == Some(Qwen3Mutant::InterleavedRope));
                }
            }
            let kv = self.options.kv_cache;
            self.k_cache[l].extend(k.iter().map(|&e| dtype::round(kv, e)));
            self.v_cache[l].extend(v.iter().map(|&e| dtype::round(kv, e)));

            let attn = self.attend(l, &q, pos + 1);
            let o = matvec(&layer.o_proj, &attn);
            add_in_place(&mut x, &o);

            let h = rms_norm(&x, &layer.post_attention_norm, p.rms_norm_eps, mutant);
            let gate = matvec(&layer.gate_proj, &h);
            let up = matvec(&layer.up_proj, &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| {
                    let g = f64::from(g);
                    let a =
                        if mutant == Some(Qwen3Mutant::GeluForSilu) { gelu_tanh(g) } else { g / (1.0 + (-g).exp()) };
                    (a * f64::from(u)) as f32
                })
                .collect();
            let down = matvec(&layer.down_proj, &act);
            add_in_place(&mut x, &down);
        }
        self.len = pos + 1;
        let x = rms_norm(&x, &w.norm, p.rms_norm_eps, mutant);
        matvec(w.lm_head(), &x)
    }

    /// Attention of the query heads `q` (`[H][D]`) over the first `len` cached positions of
    /// `layer`; returns `[H·D]`. The same arithmetic as [`decode_attention`] (f64 scores, two-pass
    /// softmax, weights normalised before the weighted sum; a unit test holds them equal) on the
    /// contiguous token-major cache, with the kv-head map explicit so a mutant can change it.
    fn attend(&self, layer: usize, q: &[f32], len: usize) -> Vec<f32> {
        let p = &self.weights.params;
        let (h, hkv, d) = (p.n_q_heads, p.n_kv_heads, p.head_dim);
        let group = h / hkv;
        let mutant = self.options.mutant;
        let scale = match mutant {
            Some(Qwen3Mutant::ScaleFromHidden) => (p.hidden_size as f64 / h as f64).powf(-0.5),
            _ => (d as f64).powf(-0.5),
        };
        let (k, v) = (&self.k_cache[layer], &self.v_cache[layer]);
        let mut out = Vec::with_capacity(h * d);
        let mut weights = Vec::with_capacity(len);
        let mut acc = vec![0.0f64; d];
        for head in 0..h {
            let kv_head = if mutant == Some(Qwen3Mutant::ModuloGqaMap) { head % hkv } else { head / group };
            let q_row = &q[head * d..][..d];
            weights.clear();
            weights.extend((0..len).map(|j| scale * dot(q_row, &k[(j * hkv + kv_head) * d..][..d])));
            let max = weights.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for w in &mut weights {
                *w = (*w - max).exp();
            }
            let sum: f64 = weights.iter().sum();
            acc.fill(0.0);
            for (j, &w) in weights.iter().enumerate() {
                let w = w / sum;
                for (a, &x) in acc.iter_mut().zip(&v[(j * hkv + kv_head) * d..][..d]) {
                    *a += w * f64::from(x);
                }
            }
            out.extend(acc.iter().map(|&a| a as f32));
        }
        out
    }

    /// Logits after each of `ids` (row t predicts token t + 1 from `ids[0..=t]`), starting from
    /// an empty cache.
    pub fn teacher_forced_logits(&mut self, ids: &[u32]) -> Vec<Vec<f32>> {
        self.reset();
        ids.iter().enumerate().map(|(pos, &id)| self.forward_token(id, pos)).collect()
    }

    /// Greedy decoding: runs `prompt` (non-empty) from an empty cache, then picks the arg-max
    /// token `n` times (ties go to the lowest id, as `torch.argmax`). Returns the `n` new ids.
    pub fn generate_greedy(&mut self, prompt: &[u32], n: usize) -> Vec<u32> {
        assert!(!prompt.is_empty(), "greedy generation needs a prompt of at least one token");
        let logits = self.teacher_forced_logits(prompt).pop().expect("prompt is not empty");
        self.continue_greedy(logits, n)
    }

    /// Greedy decoding from the current cache, given the logits of its last position (e.g. a
    /// row of [`teacher_forced_logits`](Self::teacher_forced_logits) after a
    /// [`rewind`](Self::rewind) to just past it). Returns the `n` new ids.
    pub fn continue_greedy(&mut self, mut logits: Vec<f32>, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let next = argmax(&logits) as u32;
            out.push(next);
            if i + 1 < n {
                logits = self.forward_token(next, self.len);
            }
        }
        out
    }
}

/// Index of the largest logit; the lowest such index on ties; NaN never wins.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

/// HF's `1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))` in f32: the exponent is an f32
/// quotient, θ is rounded to f32, the power is rounded once to f32, the reciprocal is f32.
///
/// The power is correctly rounded; torch's vectorised f32 pow is accurate to 1 ulp but not
/// always correctly rounded, so an entry may be 1 ulp off HF's (1e6^0.578125, i = 37 of
/// head_dim 128, is one). Such an entry moves the angle by `pos · 1 ulp`, about 1e-8 rad at a
/// few hundred positions, far below every bound built on this reference.
pub fn rope_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    let base = f64::from(theta as f32);
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / base.powf(f64::from(exponent)) as f32
        })
        .collect()
}

/// Qwen3's per-head q/k step on one head in place: RMSNorm with `weight`, then rotate_half RoPE
/// at `pos` (what the decode attention kernel's q/k-norm + RoPE prologue must compute).
pub fn qk_norm_rope(head: &mut [f32], weight: &[f32], eps: f64, pos: usize, inv_freq: &[f32]) {
    let normed = rms_norm(head, weight, eps, None);
    head.copy_from_slice(&normed);
    rope(head, pos, inv_freq, false);
}

/// Rotates one head in place at `pos`. Angles as HF: `f32(pos) · inv_freq[i]` rounded to f32,
/// cos/sin of that f32 angle rounded to f32; the rotation itself in f64, rounded once.
fn rope(head: &mut [f32], pos: usize, inv_freq: &[f32], interleaved: bool) {
    let half = head.len() / 2;
    for (i, &f) in inv_freq.iter().enumerate() {
        let angle = f64::from(pos as f32 * f);
        let (sin, cos) = (f64::from(angle.sin() as f32), f64::from(angle.cos() as f32));
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x, y) = (f64::from(head[a]), f64::from(head[b]));
        head[a] = (x * cos - y * sin) as f32;
        head[b] = (y * cos + x * sin) as f32;
    }
}

/// `x · (mean(x²) + eps)^−½ · w`, in f64, rounded once (mutants: w taken as 1, or 1 + w).
fn rms_norm(x: &[f32], w: &[f32], eps: f64, mutant: Option<Qwen3Mutant>) -> Vec<f32> {
    let mean_sq = x.iter().map(|&e| f64::from(e) * f64::from(e)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (mean_sq + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(&e, &w)| {
            let w = match mutant {
                Some(Qwen3Mutant::IgnoreNormWeights) => 1.0,
                Some(Qwen3Mutant::OnePlusNormWeights) => 1.0 + f64::from(w),
                _ => f64::from(w),
            };
            (f64::from(e) * r * w) as f32
        })
        .collect()
}

/// `m · x` for row-major `m` of `[m.len() / x.len()][x.len()]`, f64 accumulation, rounded once.
fn matvec(m: &[f32], x: &[f32]) -> Vec<f32> {
    m.chunks_exact(x.len()).map(|row| dot(row, x) as f32).collect()
}

/// `Σ a·b` in f64, in eight interleaved partial sums (so the loop vectorises; the order is
/// fixed, so the result is deterministic).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            acc[k] += f64::from(x[k]) * f64::from(y[k]);
        }
    }
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `x += y`, an f32 add as HF's residual connection.
fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// GELU, tanh approximation (the mutant's activation).
fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a tiny deterministic PRNG so the tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        /// Uniform f32 in [-scale, scale).
        fn f32(&mut self, scale: f32) -> f32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        }

        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.f32(scale)).collect()
        }

        /// Norm weights near 1.
        fn norm(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| 1.0 + self.f32(0.3)).collect()
        }
    }

    /// A small model (vocab 11, hidden 8, 2 layers, intermediate 12) with seeded weights.
    fn tiny(n_q_heads: usize, n_kv_heads: usize, head_dim: usize, tied: bool) -> Qwen3Weights {
        let params = Qwen3Params {
            vocab_size: 11,
            hidden_size: 8,
            n_layers: 2,
            n_q_heads,
            n_kv_heads,
            head_dim,
            intermediate_size: 12,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
        };
        let (hd, q, kv, i) = (8, n_q_heads * head_dim, n_kv_heads * head_dim, 12);
        let mut rng = Rng(7);
        let layers = (0..2)
            .map(|_| Qwen3LayerWeights {
                input_norm: rng.norm(hd),
                q_proj: rng.vec(q * hd, 0.5),
                k_proj: rng.vec(kv * hd, 0.5),
                v_proj: rng.vec(kv * hd, 0.5),
                o_proj: rng.vec(hd * q, 0.5),
                q_norm: rng.norm(head_dim),
                k_norm: rng.norm(head_dim),
                post_attention_norm: rng.norm(hd),
                gate_proj: rng.vec(i * hd, 0.5),
                up_proj: rng.vec(i * hd, 0.5),
                down_proj: rng.vec(hd * i, 0.5),
            })
            .collect();
        Qwen3Weights {
            params,
            embed_tokens: rng.vec(11 * hd, 1.0),
            layers,
            norm: rng.norm(hd),
            lm_head: (!tied).then(|| rng.vec(11 * hd, 0.5)),
        }
    }

    #[test]
    fn inv_freq_matches_the_closed_form() {
        let f = rope_inv_freq(1e6, 128);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        for (i, &x) in f.iter().enumerate() {
            let want = 1e6f64.powf(-(2.0 * i as f64) / 128.0);
            assert!((f64::from(x) - want).abs() <= want * 2.0 * f64::from(f32::EPSILON), "i={i}: {x} vs {want}");
        }
    }

    #[test]
    fn rope_at_position_zero_is_the_identity_and_preserves_norms_elsewhere() {
        let inv = rope_inv_freq(1e4, 8);
        let x = [0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 0.125, 3.0];
        let mut at0 = x;
        rope(&mut at0, 0, &inv, false);
        assert_eq!(at0, x);
        let mut at7 = x;
        rope(&mut at7, 7, &inv, false);
        let norm = |v: &[f32]| v.iter().map(|&e| f64::from(e).powi(2)).sum::<f64>();
        assert!((norm(&at7) - norm(&x)).abs() < 1e-5);
        // Element 0 pairs with element 4 (halves), rotated by angle 7·inv_freq[0] = 7.
        let (s, c) = (f64::from(7f32.sin()), f64::from(7f32.cos()));
        assert!((f64::from(at7[0]) - (0.5 * c - 1.5 * s)).abs() < 1e-6);
        assert!((f64::from(at7[4]) - (1.5 * c + 0.5 * s)).abs() < 1e-6);
    }

    #[test]
    fn teacher_forcing_equals_incremental_decoding_and_rewinds() {
        let w = tiny(4, 2, 4, false);
        let ids = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let mut r = Qwen3Reference::new(&w);
        let all = r.teacher_forced_logits(&ids);
        assert_eq!(r.len(), 8);
        // Rewind to position 5 and replay: same rows.
        for (pos, &id) in ids.iter().enumerate().skip(5) {
            assert_eq!(r.forward_token(id, pos), all[pos], "pos {pos}");
        }
        let generated = r.generate_greedy(&ids[..4], 4);
        let mut forced = ids[..4].to_vec();
        forced.extend(&generated);
        let rows = r.teacher_forced_logits(&forced);
        for (i, &g) in generated.iter().enumerate() {
            assert_eq!(argmax(&rows[3 + i]), g as usize);
        }
    }

    #[test]
    fn tied_model_uses_the_embeddings_as_head() {
        let mut w = tiny(2, 1, 4, true);
        let tied = Qwen3Reference::new(&w).forward_token(2, 0);
        w.lm_head = Some(w.embed_tokens.clone());
        assert_eq!(Qwen3Reference::new(&w).forward_token(2, 0), tied);
    }

    #[test]
    fn every_mutant_changes_the_logits() {
        let w = tiny(4, 2, 4, false);
        let ids = [3u32, 1, 4, 1, 5];
        let good = Qwen3Reference::new(&w).teacher_forced_logits(&ids);
        for m in Qwen3Mutant::ALL {
            let options = Qwen3Options { mutant: Some(m), ..Default::default() };
            let bad = Qwen3Reference::with_options(&w, options).teacher_forced_logits(&ids);
            assert_ne!(bad, good, "{m:?}");
        }
    }

    #[test]
    fn modulo_gqa_equals_correct_gqa_with_kv_heads_reordered() {
        // With H = 4, Hkv = 2, head h reads kv h % 2 under the mutant; swapping q heads 1 and 2
        // (rows of q_proj) turns the modulo map into the grouped one.
        let w = tiny(4, 2, 4, false);
        let mut swapped = w.clone();
        let d = 4 * 8; // one head's rows of q_proj: head_dim × hidden
        for l in &mut swapped.layers {
            let (a, b) = l.q_proj.split_at_mut(2 * d);
            a[d..].swap_with_slice(&mut b[..d]);
            // o_proj columns follow the heads.
            for row in l.o_proj.chunks_exact_mut(16) {
                let (a, b) = row.split_at_mut(8);
                a[4..].swap_with_slice(&mut b[..4]);
            }
        }
        let ids = [3u32, 1, 4, 1, 5];
        let options = Qwen3Options { mutant: Some(Qwen3Mutant::ModuloGqaMap), ..Default::default() };
        let mutant = Qwen3Reference::with_options(&w, options).teacher_forced_logits(&ids);
        let reordered = Qwen3Reference::new(&swapped).teacher_forced_logits(&ids);
        // Equal up to the order of o_proj's f64 sum (rounded to f32).
        for (a, b) in mutant.iter().flatten().zip(reordered.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
        }
        assert_ne!(mutant, Qwen3Reference::new(&w).teacher_forced_logits(&ids));
    }

    #[test]
    fn attention_equals_decode_attention() {
        use crate::attention::{AttentionShape, decode_attention};
        use crate::layout::CacheLayout;
        let w = tiny(6, 2, 4, false);
        let mut r = Qwen3Reference::new(&w);
        r.teacher_forced_logits(&[1, 2, 3, 4, 5, 6, 7]);
        let q = Rng(3).vec(6 * 4, 2.0);
        let shape = AttentionShape { n_seqs: 1, n_queries: 1, n_q_heads: 6, n_kv_heads: 2, head_dim: 4 };
        for (layer, len) in [(0, 7), (1, 3)] {
            let (k, v) = r.kv_cache(layer);
            let layout = CacheLayout::token_major(1, 2, 7, 4, 0);
            let want = decode_attention(&shape, &q, k, v, &layout, &[len], 0.5);
            let got = r.attend(layer, &q, len);
            for (i, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
                // Equal up to the order of the f64 dot products, then the rounding to f32.
                assert!((f64::from(g) - e).abs() <= 1e-6 * e.abs().max(1e-3), "layer {layer} i {i}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn a_rounded_kv_cache_holds_rounded_values() {
        let w = tiny(4, 2, 4, false);
        let options = Qwen3Options { kv_cache: Dtype::Bf16, ..Default::default() };
        let mut r = Qwen3Reference::with_options(&w, options);
        r.teacher_forced_logits(&[1, 2, 3]);
        let (k, v) = r.kv_cache(1);
        assert_eq!(k.len(), 3 * 2 * 4);
        assert!(k.iter().chain(v).all(|&e| dtype::round(Dtype::Bf16, e) == e));
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn panics_on_a_token_outside_the_vocabulary() {
        let w = tiny(2, 1, 4, true);
        Qwen3Reference::new(&w).forward_token(11, 0);
    }

    #[test]
    #[should_panic(expected = "skips past")]
    fn panics_on_a_position_past_the_cache() {
        let w = tiny(2, 1, 4, true);
        Qwen3Reference::new(&w).forward_token(1, 1);
    }

    #[test]
    #[should_panic(expected = "layers[1].k_norm has the wrong number of elements")]
    fn inconsistent_weights_are_named() {
        let mut w = tiny(2, 1, 4, true);
        w.layers[1].k_norm.pop();
        Qwen3Reference::new(&w);
    }
}
