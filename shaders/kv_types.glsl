// Cache element types. Each kernel that touches the KV cache is compiled once per variant
// (VARIANT_F32 / VARIANT_F16 / VARIANT_BF16, see build.rs); KV_T is the stored element type.
//
// f32 elements are moved as raw bits (uint) so NaN payloads and denormals survive bit-exactly.
// 16-bit elements use 16-bit storage (no shaderFloat16 needed): f16 is widened with
// unpackHalf2x16 (exact), bf16 by a shift (exact). Narrowing is done in integer arithmetic,
// round to nearest even, because GLSL leaves the rounding of packHalf2x16 to the driver and the
// append contract is bit-exact. NaN becomes the canonical quiet NaN with its sign.

#if defined(VARIANT_F32)
#define KV_T uint
#elif defined(VARIANT_F16) || defined(VARIANT_BF16)
#define KV_T uint16_t
#else
#error "compile with one of VARIANT_F32, VARIANT_F16, VARIANT_BF16"
#endif

// f32 bits -> f16 bits, round to nearest even.
uint f32_to_f16_rne(uint x) {
    uint sign = (x >> 16) & 0x8000u;
    uint a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;           // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;          // >= 65520: rounds to Inf
    if (a >= 0x38800000u) {                               // normal f16 (>= 2^-14)
        uint r = a - 0x38000000u;                         // rebias 127 -> 15
        r += 0xfffu + ((r >> 13) & 1u);
        return sign | (r >> 13);
    }
    uint e = a >> 23;
    if (e < 102u) return sign;                            // < 2^-25: rounds to 0
    uint m = (a & 0x7fffffu) | 0x800000u;                 // value = m * 2^(e-150)
    uint shift = 126u - e;                                // 14..24; result unit is 2^-24
    uint q = m >> shift;
    uint rem = m & ((1u << shift) - 1u);
    uint halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u) == 1u)) q += 1u;
    return sign | q;
}

// f32 bits -> bf16 bits, round to nearest even.
uint f32_to_bf16_rne(uint x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return ((x >> 16) & 0x8000u) | 0x7fc0u;
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}

// The truncating conversions of a broken kernel (mutants only).
uint f32_to_f16_truncate(uint x) {
    uint sign = (x >> 16) & 0x8000u;
    uint a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    if (a >= 0x47800000u) return sign | 0x7c00u;
    if (a >= 0x38800000u) return sign | ((a - 0x38000000u) >> 13);
    uint e = a >> 23;
    if (e < 102u) return sign;
    return sign | (((a & 0x7fffffu) | 0x800000u) >> (126u - e));
}

uint f32_to_bf16_truncate(uint x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return ((x >> 16) & 0x8000u) | 0x7fc0u;
    return x >> 16;
}

// Loads take the element widened to uint (16-bit types may only live in buffers).
float kv_load(uint x) {
#if defined(VARIANT_F32)
    return uintBitsToFloat(x);
#elif defined(VARIANT_F16)
    return unpackHalf2x16(x).x;
#else
    return uintBitsToFloat(x << 16);
#endif
}

// A type confusion (mutants only): f16 read as bf16, bf16 as f16, f32 cut to its top 16 bits.
float kv_load_misread(uint x) {
#if defined(VARIANT_F32)
    return uintBitsToFloat(x & 0xffff0000u);
#elif defined(VARIANT_F16)
    return uintBitsToFloat(x << 16);
#else
    return unpackHalf2x16(x).x;
#endif
}

// The stored bits of an f32 (given as bits); the caller narrows with KV_T(...).
uint kv_store(uint f32_bits, bool truncate) {
#if defined(VARIANT_F32)
    return f32_bits;
#elif defined(VARIANT_F16)
    return truncate ? f32_to_f16_truncate(f32_bits) : f32_to_f16_rne(f32_bits);
#else
    return truncate ? f32_to_bf16_truncate(f32_bits) : f32_to_bf16_rne(f32_bits);
#endif
}

// Wide loads: two 16-bit elements packed in one 32-bit word (the first in the low half),
// widened exactly; and the mutant's type confusion of the same pair.
#if !defined(VARIANT_F32)
vec2 kv_unpack2(uint w) {
#if defined(VARIANT_F16)
    return unpackHalf2x16(w);
#else
    return vec2(uintBitsToFloat(w << 16), uintBitsToFloat(w & 0xffff0000u));
#endif
}

vec2 kv_unpack2_misread(uint w) {
#if defined(VARIANT_F16)
    return vec2(uintBitsToFloat(w << 16), uintBitsToFloat(w & 0xffff0000u));
#else
    return unpackHalf2x16(w);
#endif
}
#endif
