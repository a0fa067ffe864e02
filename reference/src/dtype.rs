//! Cache element types and their exact conversions from f32.
//!
//! Rounding is round-to-nearest-even for every finite value (subnormals included, overflow to
//! ±Inf). NaN becomes the canonical quiet NaN of the target type with the input's sign, so the
//! bit pattern of every stored element is defined and the append kernel can be checked bit for bit.

use serde::{Deserialize, Serialize};

/// Element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The stored bit pattern of `x` in `dtype` (16-bit types in the low half).
pub fn encode(dtype: Dtype, x: f32) -> u32 {
    match dtype {
        Dtype::F32 => x.to_bits(),
        Dtype::F16 if x.is_nan() => sign16(x) | 0x7e00,
        Dtype::F16 => u32::from(half::f16::from_f32(x).to_bits()),
        Dtype::Bf16 if x.is_nan() => sign16(x) | 0x7fc0,
        Dtype::Bf16 => u32::from(half::bf16::from_f32(x).to_bits()),
    }
}

/// The f32 value of a stored bit pattern (exact: every f16/bf16 value is an f32 value).
pub fn decode(dtype: Dtype, bits: u32) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_bits(bits),
        Dtype::F16 => half::f16::from_bits(bits as u16).to_f32(),
        Dtype::Bf16 => f32::from_bits(bits << 16),
    }
}

/// `x` rounded to `dtype` and back: the value a kernel reads after storing `x`.
pub fn round(dtype: Dtype, x: f32) -> f32 {
    decode(dtype, encode(dtype, x))
}

/// Writes element `index` of a little-endian buffer of `dtype` elements.
pub fn store(dtype: Dtype, bytes: &mut [u8], index: usize, bits: u32) {
    let n = dtype.size();
    bytes[index * n..(index + 1) * n].copy_from_slice(&bits.to_le_bytes()[..n]);
}

/// Reads element `index` of a little-endian buffer of `dtype` elements.
pub fn load(dtype: Dtype, bytes: &[u8], index: usize) -> u32 {
    let n = dtype.size();
    let mut word = [0u8; 4];
    word[..n].copy_from_slice(&bytes[index * n..(index + 1) * n]);
    u32::from_le_bytes(word)
}

fn sign16(x: f32) -> u32 {
    (x.to_bits() >> 16) & 0x8000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is exactly halfway between 1 and the next f16 (1 + 2^-10): ties go to even (1).
        assert_eq!(encode(Dtype::F16, 1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3·2^-11 is halfway between 1+2^-10 (odd mantissa) and 1+2^-9: goes up to even.
        assert_eq!(encode(Dtype::F16, 1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(encode(Dtype::F16, 65520.0), 0x7c00, "rounds up to +Inf past the f16 max");
        assert_eq!(encode(Dtype::F16, 2f32.powi(-25)), 0x0000, "half the smallest subnormal: tie to 0");
        assert_eq!(encode(Dtype::F16, -f32::NAN), 0xfe00);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(encode(Dtype::Bf16, f32::from_bits(0x3f80_8000)), 0x3f80, "tie to even (down)");
        assert_eq!(encode(Dtype::Bf16, f32::from_bits(0x3f81_8000)), 0x3f82, "tie to even (up)");
        assert_eq!(encode(Dtype::Bf16, f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(encode(Dtype::Bf16, f32::NAN), 0x7fc0);
        assert_eq!(decode(Dtype::Bf16, 0x3f80), 1.0);
    }

    #[test]
    fn store_and_load_round_trip() {
        let mut bytes = vec![0u8; 8];
        store(Dtype::F16, &mut bytes, 3, 0xabcd);
        assert_eq!(load(Dtype::F16, &bytes, 3), 0xabcd);
        assert_eq!(&bytes[..6], &[0; 6]);
    }
}
