// Cache element types. Each kernel that touches the KV cache is compiled once per variant
// (VARIANT_F32 / VARIANT_F16 / VARIANT_BF16, see build.rs); KV_T is the stored element type.
//
// f32 elements are moved as raw bits (uint) so NaN payloads and denormals survive bit-exactly.
// 16-bit elements use 16-bit storage (no shaderFloat16 needed): f16 is widened with
// unpackHalf2x16 (exact), bf16 by a shift (exact). Narrowing is done in integer arithmetic,
// round to nearest even, because GLSL leaves the rounding of packHalf2x16 to the driver and the
// append contract is bit-exact. NaN becomes the canonical quiet NaN with its sign.

//
// VARIANT_Q8_0: ggml's q8_0 blocks (34 bytes: f16 scale, 32 int8), seen as 16-bit words (blocks
// are only 2-byte aligned). The per-element helpers below compile for it but are never applied to
// its elements: q8_0 goes through the q8_* functions at the end.

#if defined(VARIANT_F32)
#define KV_T uint
#elif defined(VARIANT_F16) || defined(VARIANT_BF16) || defined(VARIANT_Q8_0)
#define KV_T uint16_t
#else
#error "compile with one of VARIANT_F32, VARIANT_F16, VARIANT_BF16, VARIANT_Q8_0"
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

#if defined(VARIANT_Q8_0)
const uint QK8_0 = 32u;
const uint Q8_WORDS = 17u;   // 16-bit words per block: the scale, then 16 pairs of int8

// The f32 bits of q·2^e rounded to nearest even (subnormals included), q ≥ 2^24, `sticky` when
// a nonzero tail lies below q's last bit. Integer arithmetic: GLSL's float division is not
// correctly rounded on Vulkan, and the quantizer must match ggml's f32 division bit for bit.
uint q8_round_to_f32(uint q, bool sticky, int e) {
    int msb = findMSB(q);
    int ex = msb + e;   // the value's unbiased exponent
    if (ex + 127 >= 255) return 0x7f800000u;
    int shift = ex >= -126 ? msb - 23 : -149 - e;
    if (shift >= 32) return 0u;
    uint s = q >> uint(shift);
    uint rem = q & ((1u << uint(shift)) - 1u);
    uint halfway = 1u << uint(shift - 1);
    if (rem > halfway || (rem == halfway && (sticky || (s & 1u) == 1u))) s += 1u;
    // Normal: (biased − 1)·2^23 + s carries a rounded-up 2^24 into the exponent; subnormal: s.
    uint biased = ex >= -126 ? uint(ex + 127) : 1u;
    return ((biased - 1u) << 23) + s;
}

// A positive finite f32 as m·2^e, m in [2^23, 2^24).
void q8_split(uint bits, out uint m, out int e) {
    uint ef = bits >> 23;
    m = ef == 0u ? (bits & 0x7fffffu) : ((bits & 0x7fffffu) | 0x800000u);
    e = ef == 0u ? -149 : int(ef) - 150;
    int up = 23 - findMSB(m);
    m <<= uint(up);
    e -= up;
}

// ggml's d = amax / 127 and id = 1 / d (0 when d is 0), as f32 bits, correctly rounded.
void q8_scale(uint amax_bits, out uint d_bits, out uint id_bits) {
    d_bits = 0u;
    id_bits = 0u;
    if (amax_bits == 0u) return;
    uint m;
    int e;
    q8_split(amax_bits, m, e);
    uint num = m << 8;   // < 2^32; the quotient ≥ 2^24
    d_bits = q8_round_to_f32(num / 127u, num % 127u != 0u, e - 8);
    if (d_bits == 0u) return;
    q8_split(d_bits, m, e);
    // 2^48 / m by long division (m < 2^24, so the remainder stays below 2^25).
    uint r = 1u, q = 0u;
    for (int i = 0; i < 48; ++i) {
        r <<= 1;
        q <<= 1;
        if (r >= m) {
            r -= m;
            q |= 1u;
        }
    }
    id_bits = q8_round_to_f32(q, r != 0u, -48 - e);
}

// roundf(x · id) (or ties to even: the mutant), x finite as bits, id normal. The product is one
// correctly rounded f32 multiply (`precise`: no contraction into the subtraction below); a
// subnormal x is scaled into the normal range first, as drivers may flush subnormal operands.
int q8_quantize(uint x_bits, float id, bool ties_even) {
    uint a = x_bits & 0x7fffffffu;
    precise float p;
    if (a < 0x00800000u) {
        precise float xs = float(a) * uintBitsToFloat(0x33800000u);   // x·2^125 (exact)
        precise float ps = xs * id;
        p = ps * uintBitsToFloat(0x01000000u);                      // ·2^-125: exact unless < 0.5
    } else {
        p = uintBitsToFloat(a) * id;
    }
    float t = trunc(p);
    precise float f = p - t;   // exact
    int qi = int(t);
    bool up = ties_even ? (f > 0.5 || (f == 0.5 && (qi & 1) == 1)) : f >= 0.5;
    qi += up ? 1 : 0;
    return (x_bits & 0x80000000u) != 0u ? -qi : qi;
}

// Dequantized: the two int8 values of a packed 16-bit word times the block's scale (exact).
vec2 q8_pair(uint w, float d) {
    return vec2(float(int(w << 24) >> 24), float(int(w << 16) >> 24)) * d;
}
#endif
