//! ggml's q8_0 block: the oracle for a q8_0 KV cache, bit-exact with ggml's reference quantizer.
//!
//! # Contract
//!
//! A block holds [`QK8_0`] = 32 values in [`Q8_0_BLOCK_BYTES`] = 34 bytes, as ggml stores
//! `block_q8_0`: the scale `d` as f16 (little endian), then 32 int8 values `qs`. Quantizing is
//! `quantize_row_q8_0_ref` (ggml-quants.c) step for step, all in f32:
//!
//! - `amax = max_j |x[j]|` (from 0), `d = amax / 127`, `id = d ≠ 0 ? 1 / d : 0`;
//! - stored scale: `d` rounded to f16 (nearest even);
//! - `qs[j] = roundf(x[j] · id)`: the multiply by the reciprocal, not `x[j] / d` (the two round
//!   differently for some inputs), and C's `roundf`, half away from zero ([`round_half_away`]).
//!
//! Dequantizing is `qs[j] · f16_to_f32(d)` in f32, which is exact (8 × 11 significant bits).
//!
//! # Inputs ggml leaves undefined
//!
//! Errors instead of values where the C has no defined or useful result: a non-finite input
//! (`fabsf(NaN)` makes `amax` depend on the order of the comparisons), a scale that overflows f16
//! (`amax / 127 ≥ 65520` is stored as +Inf, and every value dequantizes to ±Inf or NaN), and a
//! nonzero `d` so small that `1 / d` overflows f32 (`amax` below about `127 · 2^-128`): then
//! `x · id` is ±Inf or NaN and its conversion to int8 is undefined behaviour in C, so x86 and Arm
//! builds of ggml store different bytes.

/// Values per q8_0 block.
pub const QK8_0: usize = 32;

/// Bytes per q8_0 block: the f16 scale, then one int8 per value.
pub const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

/// C's `roundf`: the nearest integer, halfway cases away from zero, exact for every f32.
///
/// Rust's [`f32::round`] has exactly this contract (it is `llvm.round`, i.e. `roundf`), and the
/// result is exact: below 2^23 the nearest integer is representable, and from 2^23 up every f32
/// is already an integer. The naive `floor(x + 0.5)` is not: the addition rounds, so
/// 0.49999997 becomes 1 and 8388609 becomes 8388610.
pub fn round_half_away(x: f32) -> f32 {
    x.round()
}

/// Quantizes one block as `quantize_row_q8_0_ref` does; see the module documentation.
///
/// Errors on a non-finite input (naming the first), on a scale that overflows f16, and on a
/// scale whose reciprocal overflows f32 (where ggml's result is undefined).
pub fn quantize_block(x: &[f32; QK8_0]) -> Result<[u8; Q8_0_BLOCK_BYTES], String> {
    check_finite(x)?;
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d, id) = scale(amax)?;
    let mut block = [0u8; Q8_0_BLOCK_BYTES];
    block[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    for (q, &v) in block[2..].iter_mut().zip(x) {
        *q = quantize_value(v, id) as u8;
    }
    Ok(block)
}

/// Quantizes a row of whole blocks (`x.len()` a multiple of 32) into `x.len() / 32 · 34` bytes.
pub fn quantize_row(x: &[f32]) -> Result<Vec<u8>, String> {
    if !x.len().is_multiple_of(QK8_0) {
        return Err(format!("x has {} values, expected a multiple of {QK8_0} (whole q8_0 blocks)", x.len()));
    }
    check_finite(x)?;
    let mut bytes = Vec::with_capacity(x.len() / QK8_0 * Q8_0_BLOCK_BYTES);
    for (i, chunk) in x.chunks_exact(QK8_0).enumerate() {
        let block = quantize_block(chunk.try_into().expect("chunks_exact yields whole blocks"))
            .map_err(|e| format!("block {i} (x[{}..{}]): {e}", i * QK8_0, (i + 1) * QK8_0))?;
        bytes.extend_from_slice(&block);
    }
    Ok(bytes)
}

/// The 32 values of one block: `qs[j] · d` in f32 (exact). Any bytes decode; a stored Inf or NaN
/// scale gives non-finite values, as IEEE 754 says.
pub fn dequantize_block(b: &[u8; Q8_0_BLOCK_BYTES]) -> [f32; QK8_0] {
    let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    std::array::from_fn(|j| f32::from(b[2 + j] as i8) * d)
}

/// Dequantizes a row of whole blocks (`bytes.len()` a multiple of 34).
pub fn dequantize_row(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(Q8_0_BLOCK_BYTES) {
        return Err(format!(
            "bytes has {} bytes, expected a multiple of {Q8_0_BLOCK_BYTES} (whole q8_0 blocks)",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .flat_map(|b| dequantize_block(b.try_into().expect("chunks_exact yields whole blocks")))
        .collect())
}

/// Every element of a q8_0 cache of `elements` elements (whole blocks), dequantized to f32 in
/// element order (exact: `qs·d`), as the attention reference reads it.
pub fn dequantize_cache(bytes: &[u8], elements: usize) -> Vec<f32> {
    let n = elements.div_ceil(QK8_0) * Q8_0_BLOCK_BYTES;
    assert!(bytes.len() >= n, "q8_0 cache holds {} bytes, {elements} elements need {n}", bytes.len());
    let mut values = dequantize_row(&bytes[..n]).expect("whole blocks");
    values.truncate(elements);
    values
}

/// Names the first non-finite value: ggml's `amax` would depend on comparison order.
fn check_finite(x: &[f32]) -> Result<(), String> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("x[{i}] = {} is not finite", x[i])),
        None => Ok(()),
    }
}

/// `(d, id)` of a block with this `amax`, in f32 as ggml computes them, or why ggml's result
/// would be unusable (f16 scale overflow) or undefined (reciprocal overflow).
fn scale(amax: f32) -> Result<(f32, f32), String> {
    let d = amax / 127.0;
    if half::f16::from_f32(d).is_infinite() {
        return Err(format!("amax {amax:e} exceeds the f16 scale range (amax / 127 rounds to f16 Inf)"));
    }
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if id.is_infinite() {
        return Err(format!(
            "amax {amax:e} is too small: 1 / (amax / 127) overflows f32, where ggml's int8 conversion is undefined"
        ));
    }
    Ok((d, id))
}

/// `roundf(v · id)` as an int8. |v| ≤ amax makes |v · id| at most 127 plus a few ulps, so the
/// rounded value is in -127..=127.
fn quantize_value(v: f32, id: f32) -> i8 {
    let q = round_half_away(v * id);
    assert!((-127.0..=127.0).contains(&q), "q8_0 value {q} out of range (v = {v:e}, id = {id:e})");
    q as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: a tiny deterministic PRNG so the tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform f32 in [-1, 1).
        fn unit(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn scale_of(block: &[u8; Q8_0_BLOCK_BYTES]) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
    }

    fn qs_of(block: &[u8; Q8_0_BLOCK_BYTES]) -> [i8; QK8_0] {
        std::array::from_fn(|j| block[2 + j] as i8)
    }

    /// A block with the given leading values, the rest zero.
    fn block_with(values: &[f32]) -> [f32; QK8_0] {
        let mut x = [0.0f32; QK8_0];
        x[..values.len()].copy_from_slice(values);
        x
    }

    #[test]
    fn all_zero_block_has_zero_scale_and_values() {
        let b = quantize_block(&[0.0; QK8_0]).unwrap();
        assert_eq!(b, [0u8; Q8_0_BLOCK_BYTES]);
        assert_eq!(dequantize_block(&b), [0.0; QK8_0]);
        // -0.0 has |x| = 0 too; roundf(-0.0 · 0) = -0.0 converts to int8 0.
        assert_eq!(quantize_block(&[-0.0; QK8_0]).unwrap(), [0u8; Q8_0_BLOCK_BYTES]);
    }

    #[test]
    fn amax_127_gives_unit_scale_and_rounds_half_away() {
        let x = block_with(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 0.49999997, -0.49999997, 3.2, -126.6, -127.0]);
        let b = quantize_block(&x).unwrap();
        assert_eq!(&b[..2], &[0x00, 0x3c], "d = 1.0 in f16, little endian");
        let want = [127, 3, -3, 1, -1, 2, -2, 0, 0, 3, -127, -127];
        assert_eq!(&qs_of(&b)[..want.len()], &want);
        assert!(qs_of(&b)[want.len()..].iter().all(|&q| q == 0));
        assert_eq!(&dequantize_block(&b)[..want.len()], &want.map(f32::from));
    }

    #[test]
    fn plus_and_minus_amax_quantize_to_plus_and_minus_127() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for amax in [0.3f32, 1e-3, 7.77, 1.0, 3.0e-20, 8.0e6, 127.0 * 2f32.powi(-120)] {
            let x = block_with(&[amax, -amax, amax * rng.unit(), amax * rng.unit()]);
            let qs = qs_of(&quantize_block(&x).unwrap());
            assert_eq!((qs[0], qs[1]), (127, -127), "amax {amax:e}");
            let x = block_with(&[-amax, 0.5 * amax]);
            assert_eq!(qs_of(&quantize_block(&x).unwrap())[0], -127, "amax {amax:e} (negative)");
        }
    }

    /// (amax, x) where `round(x · (1 / d))` and `round(x / d)` differ, d = amax / 127 in f32:
    /// the first hit of [`find_multiply_vs_divide_case`], hard-coded so the test pins ggml's form.
    const MULTIPLY_VS_DIVIDE: (u32, u32) = (0x3f80_0001, 0x3c41_8307);

    /// Scans amax = 1 + i ulp and x a few ulps around (k + ½)·d for the first input where the
    /// two forms of the quantizer round to different integers.
    fn find_multiply_vs_divide_case() -> Option<(u32, u32)> {
        for i in 1..1000u32 {
            let amax = f32::from_bits(1.0f32.to_bits() + i);
            let d = amax / 127.0;
            let id = 1.0 / d;
            for k in 0..127u32 {
                let mid = (k as f32 + 0.5) * d;
                for delta in -3i32..=3 {
                    let x = f32::from_bits(mid.to_bits().wrapping_add_signed(delta));
                    if x <= amax && round_half_away(x * id) != round_half_away(x / d) {
                        return Some((amax.to_bits(), x.to_bits()));
                    }
                }
            }
        }
        None
    }

    #[test]
    fn quantizer_multiplies_by_the_reciprocal_like_ggml() {
        assert_eq!(find_multiply_vs_divide_case(), Some(MULTIPLY_VS_DIVIDE));
        let (amax, x) = (f32::from_bits(MULTIPLY_VS_DIVIDE.0), f32::from_bits(MULTIPLY_VS_DIVIDE.1));
        let d = amax / 127.0;
        let (by_mul, by_div) = (round_half_away(x * (1.0 / d)), round_half_away(x / d));
        assert_ne!(by_mul, by_div);
        let qs = qs_of(&quantize_block(&block_with(&[amax, x])).unwrap());
        assert_eq!(f32::from(qs[1]), by_mul, "amax {amax:e}, x {x:e}: ggml multiplies by 1/d");
    }

    #[test]
    fn random_blocks_dequantize_within_the_scale_error_bound() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for n in 0..2000 {
            // amax from 2^-40 (f16 scale 0 or subnormal) to 2^22 (near the f16 limit).
            let magnitude = 2f32.powi((n % 63) - 40);
            let x: [f32; QK8_0] = std::array::from_fn(|_| rng.unit() * magnitude);
            let b = quantize_block(&x).unwrap();
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (d, d16) = (f64::from(amax / 127.0), f64::from(scale_of(&b)));
            // Rounding to an integer costs d16/2; the f16 scale |d16 - d| per unit of |q| ≤ 127;
            // the f32 reciprocal and product a few ulps of 127·d.
            let bound = 127.0 * (d16 - d).abs() + d16 / 2.0 + 127.0 * 4.0 * f64::from(f32::EPSILON) * d;
            for (j, (&v, y)) in x.iter().zip(dequantize_block(&b)).enumerate() {
                let err = (f64::from(v) - f64::from(y)).abs();
                assert!(err <= bound, "block {n} j={j}: x={v:e} dequantized {y:e}, error {err:e} > {bound:e}");
            }
        }
    }

    #[test]
    fn rows_are_blocks_back_to_back() {
        let mut rng = Rng(7);
        let x: Vec<f32> = (0..3 * QK8_0).map(|i| rng.unit() * (i / QK8_0 + 1) as f32).collect();
        let bytes = quantize_row(&x).unwrap();
        assert_eq!(bytes.len(), 3 * Q8_0_BLOCK_BYTES);
        let mut values = Vec::new();
        for (chunk, block) in x.chunks_exact(QK8_0).zip(bytes.chunks_exact(Q8_0_BLOCK_BYTES)) {
            let want = quantize_block(chunk.try_into().unwrap()).unwrap();
            assert_eq!(block, want);
            values.extend(dequantize_block(&want));
        }
        assert_eq!(dequantize_row(&bytes).unwrap(), values);
        assert_eq!(quantize_row(&[]).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn dequantized_values_are_exact_products() {
        // Scale 0x3555 (0.333251953125) and every int8: the f32 product has no rounding.
        let mut b = [0u8; Q8_0_BLOCK_BYTES];
        b[..2].copy_from_slice(&0x3555u16.to_le_bytes());
        for q in -128i32..=127 {
            b[2] = q as i8 as u8;
            assert_eq!(f64::from(dequantize_block(&b)[0]), f64::from(q) * 0.333251953125);
        }
    }

    #[test]
    fn non_finite_inputs_are_errors_naming_the_index() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = [1.0f32; QK8_0];
            x[5] = bad;
            x[9] = f32::NAN;
            let err = quantize_block(&x).unwrap_err();
            assert!(err.starts_with("x[5] = ") && err.ends_with("is not finite"), "{err}");
            let mut row = vec![0.0f32; 2 * QK8_0];
            row[40] = bad;
            assert!(quantize_row(&row).unwrap_err().starts_with("x[40] = "));
        }
    }

    #[test]
    fn amax_outside_the_scale_range_is_an_error() {
        // 65504 · 127 still fits (d rounds to the f16 max); past 65520 · 127, d rounds to Inf.
        assert_eq!(scale_of(&quantize_block(&block_with(&[65504.0 * 127.0])).unwrap()), 65504.0);
        for amax in [65520.0f32 * 127.0, 1e30, f32::MAX] {
            let err = quantize_block(&block_with(&[0.5, -amax])).unwrap_err();
            assert!(err.starts_with(&format!("amax {amax:e} exceeds the f16 scale range")), "{err}");
        }
        let mut row = vec![0.0f32; 2 * QK8_0];
        row[33] = 1e10;
        assert!(quantize_row(&row).unwrap_err().starts_with("block 1 (x[32..64]): amax 1e10 exceeds"));
        // A nonzero d whose reciprocal overflows f32: ggml's int8 conversion is undefined.
        let err = quantize_block(&block_with(&[1e-37])).unwrap_err();
        assert!(err.contains("is too small"), "{err}");
        // A d that underflows to 0 is ggml's defined `id = 0` path: every value quantizes to 0.
        let b = quantize_block(&block_with(&[f32::from_bits(1), -f32::from_bits(1)])).unwrap();
        assert_eq!(b, [0u8; Q8_0_BLOCK_BYTES]);
    }

    #[test]
    fn row_lengths_must_be_whole_blocks() {
        let err = quantize_row(&[0.0; 33]).unwrap_err();
        assert_eq!(err, "x has 33 values, expected a multiple of 32 (whole q8_0 blocks)");
        let err = dequantize_row(&[0; 35]).unwrap_err();
        assert_eq!(err, "bytes has 35 bytes, expected a multiple of 34 (whole q8_0 blocks)");
    }

    #[test]
    fn round_half_away_on_hard_cases() {
        let two23 = 8_388_608.0f32;
        let cases = [
            (0.0f32, 0.0f32),
            (0.5, 1.0),
            (-0.5, -1.0),
            (1.5, 2.0),
            (2.5, 3.0),
            (-2.5, -3.0),
            (0.49999997, 0.0), // floor(x + 0.5) gives 1: the sum rounds up to 1.0
            (-0.49999997, -0.0),
            (1.4999999, 1.0),
            (two23 - 0.5, two23), // the largest f32 with a fraction of ½
            (two23 - 1.5, two23 - 1.0),
            (two23 + 1.0, two23 + 1.0), // x + 0.5 rounds to even: 8388610
            (16_777_215.0, 16_777_215.0),
            (1e30, 1e30),
            (f32::MAX, f32::MAX),
            (f32::from_bits(1), 0.0),
            (-f32::from_bits(1), -0.0),
            (f32::INFINITY, f32::INFINITY),
            (f32::NEG_INFINITY, f32::NEG_INFINITY),
        ];
        for (x, want) in cases {
            let got = round_half_away(x);
            assert_eq!(got.to_bits(), want.to_bits(), "round_half_away({x:e}) = {got:e}, want {want:e}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn round_half_away_matches_trunc_and_fraction_on_a_sweep_of_bit_patterns() {
        // An independent formulation: the fraction x - trunc(x) is exact, so comparing it with
        // ½ decides the direction without rounding. Every 251st bit pattern, plus ±(k + ½).
        let explicit = |x: f32| {
            let t = x.trunc();
            if (x - t).abs() >= 0.5 { t + x.signum() } else { t }
        };
        let halves = (0..1 << 16).flat_map(|k| [k as f32 + 0.5, -(k as f32) - 0.5]);
        for x in (0..=u32::MAX).step_by(251).map(f32::from_bits).filter(|x| !x.is_nan()).chain(halves) {
            assert_eq!(round_half_away(x).to_bits(), explicit(x).to_bits(), "x = {x:e} ({:#010x})", x.to_bits());
        }
    }
}
