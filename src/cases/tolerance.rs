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
//! These are worst-case bounds; the NMSE ceiling is the one test-backend-ops uses for
//! FLASH_ATTN_EXT (5e-4), so anything passing here also passes there. The NMSE counts only the
//! error beyond what denormal flushing may lose (ABS_FLOOR): a device may flush f32 denormals
//! (NVIDIA's Vulkan driver does; seen on an H100 with outputs around 1e-39, where every element
//! flushed to 0 and a plain NMSE read 1.0), and an output made only of denormals has no relative
//! accuracy to check. Mutants are caught by cases
//! whose errors are orders of magnitude past the bound (see tests/mutants.rs), not by tuning it.

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

/// Worst-case bound on |o − o_ref| for every element of one attention row.
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
    if n == 0 {
        return 0.0;
    }
    let n_f = n as f64;
    let d = head_dim as f64;
    let score_error = (d + 2.0) * max_abs_qk + softcap.map_or(0.0, |c| 14.0 * c + 8.0 * max_abs_qk);
    U * max_abs_v * (4.0 * score_error + 24.0 + 20.0 * n_f.ln() + 2.1 * n_f + 30.0) + denormal_floor(n, head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;

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
