#version 450
#extension GL_EXT_shader_16bit_storage : require
// variants: f32 f16 bf16 q8_0
//
// KV-cache append: writes n_new tokens of K and V per sequence into the caches at positions
// start[b] + t, converting f32 to the cache type. One invocation per element; nothing outside
// the written slots is touched. Bindings and push constants mirror src/kernels/kv_append.rs.
// PAGED: the caches are a page pool (stride_seq is the page stride, capacity a sequence's) and
// position pos of sequence b lives in page block_tables[b][pos / page_size], slot pos % page_size;
// an entry past the table or a page outside the pool is skipped (the host validates tables).
// Q8_0: one invocation per 32-value block of a row (total counts blocks), quantized as ggml's
// quantize_row_q8_0_ref, bit for bit (kv_types.glsl), and written as its 17 16-bit words.

#include "kv_types.glsl"

layout(local_size_x = 64) in;

// Mutants (src/kernels/kv_append.rs): 0 none, 1 slot off by one, 2 truncate instead of RNE,
// 3 (paged) the next page of the table.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_SLOT_OFF_BY_ONE = 1;
const uint M_TRUNCATE = 2;
const uint M_PAGE_OFF_BY_ONE = 3;
const uint M_Q8_ROUND_HALF_EVEN = 4;   // q8_0: ties to even instead of away from zero
layout(constant_id = 1) const bool PAGED = false;

layout(push_constant) uniform Params {
    uint n_seqs;
    uint n_new;
    uint n_kv_heads;
    uint head_dim;
    uint stride_seq;
    uint stride_head;
    uint stride_pos;
    uint capacity;     // positions per sequence
    uint total;        // n_seqs * n_new * n_kv_heads * head_dim (Q8_0: / 32, blocks)
    uint row_groups;   // workgroups along x (the grid is 2-D when it exceeds the x limit)
    uint page_size;    // PAGED: positions per page,
    uint pages_per_seq;   // block table entries per sequence,
    uint n_pages;      // and pages in the pool
} p;

layout(std430, binding = 0) readonly buffer NewK { uint new_k[]; };
layout(std430, binding = 1) readonly buffer NewV { uint new_v[]; };
layout(std430, binding = 2) readonly buffer Start { uint start_pos[]; };
layout(std430, binding = 3) buffer KCache { KV_T k_cache[]; };
layout(std430, binding = 4) buffer VCache { KV_T v_cache[]; };
layout(std430, binding = 5) readonly buffer BlockTables { uint block_tables[]; };   // [B][pages_per_seq]

#if defined(VARIANT_Q8_0)
// Quantizes the block of new values at src (K or V) into the 17 words from w0.
void store_block(bool is_v, uint src, uint w0) {
    uint amax = 0u;
    for (uint j = 0; j < QK8_0; ++j) {
        uint x = is_v ? new_v[src + j] : new_k[src + j];
        amax = max(amax, x & 0x7fffffffu);   // |x| of finite values orders as its bits
    }
    uint d_bits, id_bits;
    q8_scale(amax, d_bits, id_bits);
    float id = uintBitsToFloat(id_bits);
    bool even = MUTANT == M_Q8_ROUND_HALF_EVEN;
    uint scale = f32_to_f16_rne(d_bits);
    if (is_v) v_cache[w0] = uint16_t(scale);
    else k_cache[w0] = uint16_t(scale);
    for (uint j = 0; j < QK8_0 / 2u; ++j) {
        uint x0 = is_v ? new_v[src + 2u * j] : new_k[src + 2u * j];
        uint x1 = is_v ? new_v[src + 2u * j + 1u] : new_k[src + 2u * j + 1u];
        uint w = (uint(q8_quantize(x0, id, even)) & 0xffu) | ((uint(q8_quantize(x1, id, even)) & 0xffu) << 8);
        if (is_v) v_cache[w0 + 1u + j] = uint16_t(w);
        else k_cache[w0 + 1u + j] = uint16_t(w);
    }
}
#endif

void main() {
    uint i = (gl_WorkGroupID.y * p.row_groups + gl_WorkGroupID.x) * 64u + gl_LocalInvocationID.x;
#if defined(VARIANT_Q8_0)
    // i counts blocks; its first value and, below, its first element stand for it.
    uint src = i * QK8_0;
    if (i >= p.total || src + QK8_0 > new_k.length() || src + QK8_0 > new_v.length()) return;
    uint d = src % p.head_dim;
    uint h = (src / p.head_dim) % p.n_kv_heads;
    uint t = (src / (p.head_dim * p.n_kv_heads)) % p.n_new;
    uint b = src / (p.head_dim * p.n_kv_heads * p.n_new);
#else
    if (i >= p.total || i >= new_k.length() || i >= new_v.length()) return;
    uint d = i % p.head_dim;
    uint h = (i / p.head_dim) % p.n_kv_heads;
    uint t = (i / (p.head_dim * p.n_kv_heads)) % p.n_new;
    uint b = i / (p.head_dim * p.n_kv_heads * p.n_new);
#endif
    if (b >= p.n_seqs || b >= start_pos.length()) return;
    uint pos = start_pos[b] + t + (MUTANT == M_SLOT_OFF_BY_ONE ? 1u : 0u);
    if (pos >= p.capacity) return;
    uint row = b * p.stride_seq + pos * p.stride_pos;
    if (PAGED) {
        uint e = pos / p.page_size;
        uint slot = pos - e * p.page_size;
        if (MUTANT == M_PAGE_OFF_BY_ONE && e + 1u < p.pages_per_seq) e += 1u;
        e += b * p.pages_per_seq;
        if (e >= block_tables.length()) return;
        uint page = block_tables[e];
        if (page >= p.n_pages) return;
        row = page * p.stride_seq + slot * p.stride_pos;
    }
    uint off = row + h * p.stride_head + d;
#if defined(VARIANT_Q8_0)
    uint w0 = off / QK8_0 * Q8_WORDS;
    if (w0 + Q8_WORDS <= k_cache.length()) store_block(false, src, w0);
    if (w0 + Q8_WORDS <= v_cache.length()) store_block(true, src, w0);
    return;
#endif
    bool truncate = MUTANT == M_TRUNCATE;
    if (off < k_cache.length()) k_cache[off] = KV_T(kv_store(new_k[i], truncate));
    if (off < v_cache.length()) v_cache[off] = KV_T(kv_store(new_v[i], truncate));
}
