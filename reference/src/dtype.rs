//! Cache element types and their exact conversions from f32.
//!
//! Rounding is round-to-nearest-even for every finite value (subnormals included, overflow to
//! ±Inf). NaN becomes the canonical quiet NaN of the target type with the input's sign, so the
//! bit pattern of every stored element is defined and the append kernel can be checked bit for bit.
//!
//! [`Dtype::Q8_0`] is a block type (ggml's q8_0, [`crate::q8_0`]): it has no per-element bits, so
//! [`encode`], [`decode`], [`load`], [`store`] and [`Dtype::size`] are for the float types only,
//! and buffer sizes come from [`Dtype::cache_bytes`].

use serde::{Deserialize, Serialize};

use crate::q8_0::{Q8_0_BLOCK_BYTES, QK8_0};

/// Element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    /// ggml's q8_0 blocks: 32 elements in 34 bytes (see [`crate::q8_0`]).
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl Dtype {
    /// The per-element float types (grids and strategies iterate these; q8_0 is opted into).
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element of a float type.
    ///
    /// # Panics
    ///
    /// On [`Dtype::Q8_0`], which has no per-element size: size its buffers with
    /// [`Dtype::cache_bytes`] and read them through blocks.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::Q8_0 => panic!("q8_0 has no per-element size; use Dtype::cache_bytes and q8_0 blocks"),
        }
    }

    /// Whether elements are stored one by one (f32, f16, bf16), not in blocks.
    pub fn is_float(self) -> bool {
        self != Dtype::Q8_0
    }

    /// Bytes of a buffer of `elements` elements: 4n, 2n, or for q8_0 34 bytes per started block
    /// of 32 (layouts of q8_0 caches hold whole blocks, so n/32·34).
    pub fn cache_bytes(self, elements: usize) -> usize {
        match self {
            Dtype::Q8_0 => elements.div_ceil(QK8_0) * Q8_0_BLOCK_BYTES,
            _ => elements * self.size(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Q8_0 => "q8_0",
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
        Dtype::Q8_0 => panic!("{}", NO_ELEMENTS),
    }
}

/// The f32 value of a stored bit pattern (exact: every f16/bf16 value is an f32 value).
pub fn decode(dtype: Dtype, bits: u32) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_bits(bits),
        Dtype::F16 => half::f16::from_bits(bits as u16).to_f32(),
        Dtype::Bf16 => f32::from_bits(bits << 16),
        Dtype::Q8_0 => panic!("{}", NO_ELEMENTS),
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

const NO_ELEMENTS: &str = "q8_0 elements live in blocks: use crate::q8_0, not per-element encode/decode";

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
    fn cache_bytes_and_names() {
        assert_eq!(Dtype::F32.cache_bytes(10), 40);
        assert_eq!(Dtype::Bf16.cache_bytes(10), 20);
        assert_eq!(Dtype::Q8_0.cache_bytes(96), 3 * 34);
        assert_eq!(Dtype::Q8_0.name(), "q8_0");
        assert_eq!(serde_json::to_string(&Dtype::Q8_0).unwrap(), "\"q8_0\"");
        assert_eq!(serde_json::from_str::<Dtype>("\"q8_0\"").unwrap(), Dtype::Q8_0);
        assert_eq!(serde_json::to_string(&Dtype::Bf16).unwrap(), "\"bf16\"");
    }

    #[test]
    #[should_panic(expected = "no per-element size")]
    fn q8_0_has_no_element_size() {
        Dtype::Q8_0.size();
    }

    #[test]
    fn store_and_load_round_trip() {
        let mut bytes = vec![0u8; 8];
        store(Dtype::F16, &mut bytes, 3, 0xabcd);
        assert_eq!(load(Dtype::F16, &bytes, 3), 0xabcd);
        assert_eq!(&bytes[..6], &[0; 6]);
    }
}
