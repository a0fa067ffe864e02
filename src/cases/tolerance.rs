//! Every tolerance of the suite, derived once, here. Never loosen one to make a test pass.
//!
//! # KV append: bit-exact
//! Conversion f32 → f16/bf16 is round-to-nearest-even with canonical NaNs, fully specified, and
//! done in integer arithmetic on the GPU. Every byte of both caches must equal the reference's,
//! which also proves that no byte outside the written slots changed.
//!
//! # Decode attention: a worst-case element bound plus an NMSE ceiling
//! The reference computes in f64 on the very values the GPU read, so the difference is the
//! kernel's f32 arithmetic alone. With u = 2⁻²⁴ (f32 unit roundoff), for one output row with
//! n visible positions, head dim D, S = scale·maxⱼ Σ_d |q_d·k_jd| and V = maxⱼ,d |v_jd|:
//!
//! 1. Scores: an f32 dot product of D terms, then ×scale: |δs_j| ≤ (D+2)·u·S (standard bound
//!    γ_D on Σ|q_d k_jd|, plus the scaling). The running max m carries the same error, so every
//!    exponent s_j − m is off by at most 2(D+2)·u·S.
//! 2. exp: Vulkan allows 3 + 2|x| ULP (≤ (6 + 4|x|)·u relative), and forming x = s_j − m adds
//!    u|x|. Weighted by the softmax weights w_j, Σ w_j|x_j| is the softmax entropy ≤ ln n, so
//!    this contributes at most (6 + 5 ln n)·u to the weighted relative error of the weights.
//! 3. A weighted relative error ε of the weights moves the normalised output by at most 2ε·V
//!    (numerator and denominator both move).
//! 4. Accumulation of Σ e_j v_jd and of l: n products and sequential sums plus one rescale per
//!    tile of 64 (at most n + n/64 + 8 roundings, each ≤ u relative to the partial sums, which
//!    are bounded by l·V), and the final division: ≤ (1.02·n + 10)·u·V, twice (numerator and l).
//! 5. Split-K merge (when the positions are split into chunks): each chunk's partial is rescaled
//!    by exp(m_c − M). As in 2., |m_c − M| ≤ |s_j − M| for every position j of chunk c, so the
//!    mass-weighted exp error is again ≤ (6 + 5 ln n)·u, moving the output ≤ 2(6 + 5 ln n)·u·V;
//!    summing the chunks adds ≤ (n_chunks + 2)·u·V twice, and n_chunks ≤ n/64 + 1 (already
//!    counted in the 1.02·n of 4. plus a constant).
//!
//! 6. Options. A softcap c replaces s by c·tanh(s/c): tanh is 1-Lipschitz, so 1. still bounds
//!    the propagated error, and evaluating it adds ≤ (14c + 8S)·u (Vulkan's tanh inherits exp's
//!    3 + 2|x| ULP with |x| ≤ S/c, scaled by c, plus the division and the product). A sink is
//!    one more softmax term with an exact logit and no value: count it in n. A sliding window
//!    only changes which positions are visible: n counts the visible ones.
//!
//! Total, with E = (D+2)·S (+ 14c + 8S with a softcap):
//! |o − o_ref| ≤ u·V·(4E + 24 + 20 ln n + 2.1·n + 30) + ABS_FLOOR, where ABS_FLOOR covers
//! devices that flush f32 denormals (each of the n + D terms may lose < 2⁻¹²⁶).
//! A row with no visible position must be exactly 0.
//!
//! # Precision profiles
//! An implementation under test may round some stages narrower than f32 (ggml-vulkan's default
//! build keeps the scaled q, the softmax weights and the output sums in f16). It declares a
//! [`Precision`]: the type of the scaled q, of the q·k accumulator, of the weights and of the
//! P·V accumulators. Each stage's unit roundoff (u_f32 = 2⁻²⁴, u_f16 = 2⁻¹¹, u_bf16 = 2⁻⁸) enters
//! the derivation above where that stage's roundings were counted, and the rest keeps f32's u:
//!
//! - q rounded to a narrower type: each q_d·k_jd moves by u_q relative, so scores gain u_q·S;
//!   the dot product's accumulator takes u_d in place of u in 1.: score error (D+2)·u_d·S + u_q·S
//!   (and the softcap's evaluation (14c + 8S)·u_d).
//! - K and V converted to a narrower type (an f32 cache read as f16): K adds u_kv·S to the scores
//!   like q, and V moves the output by u_kv·V.
//! - weights stored narrower: each relative u_w, so 3. adds 2u_w·V; weights that underflow lose
//!   up to half the smallest subnormal each, at most n of them against l ≥ 1: 2n·2⁻²⁵·V in f16.
//! - accumulators narrower: 4. takes u_a. Each of the n terms is rounded once when added
//!   (in any order: lanes' partial sums combined later still make n − 1 additions), and every
//!   rescale of a running sum by exp(m_old − m_new) rounds once more: with tiles of at least 16
//!   positions that is ≤ n/16 more, plus the combine across lanes and the product with a 1/l
//!   rounded to the narrow type (a few roundings each, ≤ 20 together): (1.1·n + 20)·u_a·V,
//!   twice (numerator and l), (2.2·n + 40)·u_a·V. Sums that fall into the
//!   subnormal range lose up to half the smallest subnormal per operation, (n + D)·2⁻²⁵ in f16,
//!   added to the floor.
//! - underflow of K and V: a value below the narrow type's range loses up to half its smallest
//!   subnormal (2⁻²⁵ in f16). The output is a convex combination of the V values, so V's loss
//!   moves it by at most that: added to the floor. Like flushed f32 denormals, the floor is
//!   error the NMSE does not count: an output made of values the declared types cannot hold
//!   has no relative accuracy to check (seen on the H100: ggml's f16 K/V and PyTorch's f16
//!   SDPA return 0 for V ~ 1e-20, whose reference is ~1e-20; docs/PEERS.md).
//!
//! With every stage f32 this is exactly the f32 bound above (a unit test checks it). The NMSE
//! ceiling is the same for every profile. A narrow profile's element bound is loose (f16 sums
//! over n terms allow n·2⁻¹¹ of V): there the NMSE ceiling does most of the judging.
//!
//! These are worst-case bounds; the NMSE ceiling is the one test-backend-ops uses for
//! FLASH_ATTN_EXT (5e-4), so anything passing here also passes there. The NMSE counts only the
//! error beyond what denormal flushing may lose (ABS_FLOOR): a device may flush f32 denormals
//! (NVIDIA's Vulkan driver does; seen on an H100 with outputs around 1e-39, where every element
//! flushed to 0 and a plain NMSE read 1.0), and an output made only of denormals has no relative
//! accuracy to check. Mutants are caught by cases
//! whose errors are orders of magnitude past the bound (see tests/mutants.rs), not by tuning it.

use crate::kernels::Dtype;

/// f32 unit roundoff.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

/// NMSE ceiling for attention outputs (test-backend-ops' FLASH_ATTN_EXT threshold).
pub const ATTENTION_MAX_NMSE: f64 = 5e-4;

/// Smallest normal f32: what one flushed denormal can lose.
const F32_MIN_NORMAL: f64 = 1.175_494_350_822_287_5e-38;

/// What flushing f32 denormals may lose in one output element: each of the `n` + `head_dim`
/// terms may lose less than the smallest normal.
pub fn denormal_floor(n: usize, head_dim: usize) -> f64 {
    (n + head_dim) as f64 * F32_MIN_NORMAL
}

/// The absolute error a profile may add to one output element whatever the values' scale:
/// flushed f32 denormals, narrow sums in the subnormal range, V underflowing a narrow type
/// (module notes). The element bound includes it; the NMSE counts only error beyond it.
pub fn absolute_floor_for(precision: &Precision, n: usize, head_dim: usize) -> f64 {
    denormal_floor(n, head_dim) + (n + head_dim) as f64 * underflow(precision.accumulate) + underflow(precision.kv)
}

/// Unit roundoff of a storage or arithmetic type.
fn unit(t: Dtype) -> f64 {
    match t {
        Dtype::F32 => U,
        Dtype::F16 => 1.0 / 2048.0,
        Dtype::Bf16 => 1.0 / 256.0,
        // Dequantized q8_0 values are exact f32 (qs·d): the cache adds no rounding of its own.
        Dtype::Q8_0 => U,
    }
}

/// Half the smallest subnormal: the most a value rounded to `t` loses in absolute terms when it
/// underflows (f32's is covered by the denormal floor).
fn underflow(t: Dtype) -> f64 {
    match t {
        Dtype::F32 => 0.0,
        Dtype::F16 => 2f64.powi(-25),
        Dtype::Bf16 => 2f64.powi(-134),
        Dtype::Q8_0 => 0.0,
    }
}

/// Where an attention kernel rounds, stage by stage (see the module notes, "Precision
/// profiles"). Strict f32 is the default and vkdecode's own kernels keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "PrecisionDecl", into = "PrecisionDecl")]
pub struct Precision {
    /// The scaled query as the dot products read it.
    pub q: Dtype,
    /// K and V as the kernel computes with them (an f32 cache read into f16 is rounded).
    pub kv: Dtype,
    /// The accumulator of q·k.
    pub scores: Dtype,
    /// The softmax weights as P·V reads them.
    pub weights: Dtype,
    /// The accumulators of Σ w·v and Σ w, and their rescaling.
    pub accumulate: Dtype,
}

impl Default for Precision {
    fn default() -> Self {
        Precision::F32
    }
}

impl Precision {
    /// Everything in f32.
    pub const F32: Precision =
        Precision { q: Dtype::F32, kv: Dtype::F32, scores: Dtype::F32, weights: Dtype::F32, accumulate: Dtype::F32 };
    /// f32 dot products, but the scaled query, the softmax weights and the output sums in f16
    /// (ggml-vulkan's default flash-attention build on fp16 devices).
    pub const F16_SOFTMAX: Precision =
        Precision { q: Dtype::F16, kv: Dtype::F16, scores: Dtype::F32, weights: Dtype::F16, accumulate: Dtype::F16 };

    /// The named profiles, for manifests and reports.
    pub const NAMED: [(&'static str, Precision); 2] =
        [("f32", Precision::F32), ("f16_softmax", Precision::F16_SOFTMAX)];

    /// The profile's name, or `custom`.
    pub fn name(&self) -> &'static str {
        Precision::NAMED.iter().find(|(_, p)| p == self).map_or("custom", |(n, _)| n)
    }

    /// The tolerance applied, in words.
    pub fn describe(&self) -> &'static str {
        if *self == Precision::F32 {
            "worst-case f32 bound per element, NMSE <= 5e-4"
        } else {
            "worst-case bound of the declared precision profile per element, NMSE <= 5e-4"
        }
    }
}

/// A precision table as written: a named `profile` and per-stage overrides.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrecisionDecl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<Dtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kv: Option<Dtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scores: Option<Dtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights: Option<Dtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accumulate: Option<Dtype>,
}

impl TryFrom<PrecisionDecl> for Precision {
    type Error = String;
    fn try_from(d: PrecisionDecl) -> Result<Self, String> {
        let mut p = match d.profile.as_deref() {
            None => Precision::F32,
            Some(name) => Precision::NAMED.iter().find(|(n, _)| *n == name).map(|(_, p)| *p).ok_or_else(|| {
                let known: Vec<_> = Precision::NAMED.iter().map(|(n, _)| *n).collect();
                format!("unknown precision profile `{name}`; known: {}", known.join(", "))
            })?,
        };
        p.q = d.q.unwrap_or(p.q);
        p.kv = d.kv.unwrap_or(p.kv);
        p.scores = d.scores.unwrap_or(p.scores);
        p.weights = d.weights.unwrap_or(p.weights);
        p.accumulate = d.accumulate.unwrap_or(p.accumulate);
        Ok(p)
    }
}

impl From<Precision> for PrecisionDecl {
    fn from(p: Precision) -> Self {
        let named = Precision::NAMED.iter().find(|(_, n)| *n == p).map(|(name, _)| name.to_string());
        match named {
            Some(name) => {
                PrecisionDecl { profile: Some(name), q: None, kv: None, scores: None, weights: None, accumulate: None }
            }
            None => PrecisionDecl {
                profile: None,
                q: Some(p.q),
                kv: Some(p.kv),
                scores: Some(p.scores),
                weights: Some(p.weights),
                accumulate: Some(p.accumulate),
            },
        }
    }
}

/// Worst-case bound on |o − o_ref| for every element of one attention row, in strict f32.
///
/// `n` softmax terms (visible positions, plus one for a sink), `head_dim` D, `max_abs_qk` =
/// scale·maxⱼ Σ|q_d·k_jd| over the visible positions, `max_abs_v` = V, and the softcap if any.
/// A row with no visible position (pass `n` = 0) must be exact.
pub fn attention_element_bound(
    n: usize,
    head_dim: usize,
    max_abs_qk: f64,
    max_abs_v: f64,
    softcap: Option<f64>,
) -> f64 {
    attention_element_bound_for(&Precision::F32, n, head_dim, max_abs_qk, max_abs_v, softcap)
}

/// [`attention_element_bound`] under a precision profile (module notes, "Precision profiles").
pub fn attention_element_bound_for(
    precision: &Precision,
    n: usize,
    head_dim: usize,
    max_abs_qk: f64,
    max_abs_v: f64,
    softcap: Option<f64>,
) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let narrower = |t: Dtype| if t == Dtype::F32 { 0.0 } else { unit(t) };
    let (u_q, u_kv, u_d, u_w, u_a) = (
        narrower(precision.q),
        narrower(precision.kv),
        unit(precision.scores),
        narrower(precision.weights),
        unit(precision.accumulate),
    );
    let n_f = n as f64;
    let d = head_dim as f64;
    let score_error =
        ((d + 2.0) * u_d + u_q) * max_abs_qk + softcap.map_or(0.0, |c| (14.0 * c + 8.0 * max_abs_qk) * u_d);
    let weights = 2.0 * u_w + 2.0 * n_f * underflow(precision.weights);
    // Narrow accumulators: rescaled per tile of 16 or more positions, combined across lanes and
    // multiplied by a rounded 1/l, all in that type (module notes).
    let accumulate = if precision.accumulate == Dtype::F32 { 2.04 * n_f + 20.0 } else { 2.2 * n_f + 40.0 };
    let relative =
        4.0 * score_error + U * (24.0 + 20.0 * n_f.ln()) + weights + u_kv + u_a * accumulate + U * (0.06 * n_f + 10.0);
    max_abs_v * relative + absolute_floor_for(precision, n, head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f32_profile_is_the_f32_bound() {
        for (n, d, s, v, c) in
            [(1, 64, 3.0, 1.0, None), (4096, 128, 7.0, 2.0, Some(30.0)), (20000, 256, 50.0, 1e3, None)]
        {
            let general = attention_element_bound_for(&Precision::F32, n, d, s, v, c);
            let e = (d as f64 + 2.0) * s + c.map_or(0.0, |c| 14.0 * c + 8.0 * s);
            let written =
                U * v * (4.0 * e + 24.0 + 20.0 * (n as f64).ln() + 2.1 * n as f64 + 30.0) + denormal_floor(n, d);
            assert!((general - written).abs() <= 1e-12 * written, "{general} vs {written}");
        }
    }

    #[test]
    fn narrower_profiles_allow_more() {
        let f32 = attention_element_bound_for(&Precision::F32, 512, 128, 7.0, 1.0, None);
        let f16 = attention_element_bound_for(&Precision::F16_SOFTMAX, 512, 128, 7.0, 1.0, None);
        assert!(f16 > 10.0 * f32, "{f16} vs {f32}");
    }

    #[test]
    fn profiles_parse_by_name_and_by_stage() {
        let p: Precision = serde_json::from_str(r#"{"profile": "f16_softmax"}"#).unwrap();
        assert_eq!(p, Precision::F16_SOFTMAX);
        let p: Precision = serde_json::from_str(r#"{"profile": "f32", "weights": "bf16"}"#).unwrap();
        assert_eq!(p, Precision { weights: Dtype::Bf16, ..Precision::F32 });
        let e = serde_json::from_str::<Precision>(r#"{"profile": "fp8"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown precision profile `fp8`"), "{e}");
        assert_eq!(serde_json::to_string(&Precision::F16_SOFTMAX).unwrap(), r#"{"profile":"f16_softmax"}"#);
    }

    #[test]
    fn empty_rows_must_be_exact() {
        assert_eq!(attention_element_bound(0, 128, 10.0, 1.0, None), 0.0);
    }

    #[test]
    fn bound_grows_with_length_and_logit_size() {
        let a = attention_element_bound(64, 128, 5.0, 1.0, None);
        assert!(attention_element_bound(4096, 128, 5.0, 1.0, None) > a);
        assert!(attention_element_bound(64, 128, 500.0, 1.0, None) > a);
        // A typical row (D=128, |s| ~ 7, n = 4096) allows ~1e-3 of V: loose next to real f32
        // error, tight next to any real bug (an f16 accumulator is off by ~1e-3 per tile).
        assert!(attention_element_bound(4096, 128, 7.0, 1.0, None) < 2e-3);
    }
}
