#version 450
#extension GL_EXT_shader_16bit_storage : require
// variants: f32 f16 bf16 f32_fused f16_fused bf16_fused
//
// Decode attention, pass 1 of 2 (split-K): one workgroup per (chunk, query head, query token ×
// sequence). Each walks the visible positions of its chunk in tiles of WG with an online softmax
// (running max m with a finite floor, running sum l, f32 accumulators rescaled per tile) and
// writes the partial (O, m, l); attention_merge.comp combines the chunks by log-sum-exp. With a
// single chunk it writes the normalised output directly and the merge is skipped.
// Positions past the query are never read, so garbage there cannot leak; a chunk with no visible
// position writes (0, NEG_FLOOR, 0), and a row with none at all ends as 0.
// Options: sliding window, logit softcap, attention sinks (one logit per query head, folded in
// here with one chunk, else by the merge). Fused mode appends the step's new K/V (the last
// n_queries positions of each sequence) into the cache in the same dispatch: every workgroup
// takes those positions from the new_k/new_v inputs, rounded as the cache would store them, and
// never reads the slots being written, so no barrier is needed; one workgroup per (sequence,
// token, kv head) writes them.
// Bounding each workgroup's loop by the chunk also keeps every loop short: lavapipe's shader
// compiler silently stops loops after 65535 iterations (seen as dropped positions past ~28K).
// Bindings and push constants mirror src/kernels/attention.rs.

#if defined(VARIANT_F32_FUSED)
#define VARIANT_F32
#define FUSED
#elif defined(VARIANT_F16_FUSED)
#define VARIANT_F16
#define FUSED
#elif defined(VARIANT_BF16_FUSED)
#define VARIANT_BF16
#define FUSED
#endif
#include "kv_types.glsl"

const uint WG = 64;
const uint MAX_D = 256;
const uint ACC = MAX_D / WG;     // output dims per invocation
const float NEG_FLOOR = -3.0e38; // finite: -inf would make exp(m - m_new) NaN on the first tile

layout(local_size_x = 64) in;

// Mutants (src/kernels/attention.rs): 0 none.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_CAUSAL_OFF_BY_ONE = 1;
const uint M_GQA_MODULO = 2;
const uint M_NO_MAX_SUBTRACT = 3;
const uint M_F16_ACCUMULATE = 4;
const uint M_V_MISREAD = 5;
const uint M_FUSED_READS_CACHE = 7;   // reads the new tokens from the slots being written
const uint M_CHUNK_OVERLAP = 8;       // each chunk runs one position into the next

const uint FLAG_SINKS = 1u;
#if defined(FUSED)
const bool FUSED_MODE = true;
#else
const bool FUSED_MODE = false;
#endif

layout(push_constant) uniform Params {
    uint n_queries;
    uint n_q_heads;
    uint n_kv_heads;
    uint head_dim;
    uint stride_seq;
    uint stride_head;
    uint stride_pos;
    uint capacity;
    float scale;
    uint n_seqs;
    uint chunk;      // positions per chunk, a multiple of WG
    uint n_chunks;   // 1: write the output directly
    uint window;     // sliding window in positions; 0: none
    float softcap;   // 0: none
    uint flags;      // FLAG_SINKS
} p;

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer SeqLens { uint seq_lens[]; };
#if defined(FUSED)
layout(std430, binding = 2) buffer KCache { KV_T k_cache[]; };
layout(std430, binding = 3) buffer VCache { KV_T v_cache[]; };
#else
layout(std430, binding = 2) readonly buffer KCache { KV_T k_cache[]; };
layout(std430, binding = 3) readonly buffer VCache { KV_T v_cache[]; };
#endif
layout(std430, binding = 4) writeonly buffer Out { float o[]; };
layout(std430, binding = 5) writeonly buffer PartialO { float part_o[]; };   // [row][chunk][D]
layout(std430, binding = 6) writeonly buffer PartialML { vec2 part_ml[]; }; // [row][chunk] (m, l)
layout(std430, binding = 7) readonly buffer Sinks { float sinks[]; };        // [n_q_heads]
layout(std430, binding = 8) readonly buffer NewK { uint new_k[]; };          // [B][n_queries][Hkv][D] f32
layout(std430, binding = 9) readonly buffer NewV { uint new_v[]; };

shared float q_s[MAX_D];
shared float p_s[WG];
shared float red[WG];

float reduce_max(float x) {
    uint tid = gl_LocalInvocationID.x;
    red[tid] = x;
    barrier();
    for (uint s = WG / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] = max(red[tid], red[tid + s]);
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

float reduce_sum(float x) {
    uint tid = gl_LocalInvocationID.x;
    red[tid] = x;
    barrier();
    for (uint s = WG / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

// Element d of position j's K (or V) row, where `off` is the row's cache offset. In fused mode
// the new positions (j >= first_new) come from the step's inputs, rounded like the cache stores.
float load_k(uint off, uint j, uint new_row, uint d) {
    if (new_row != 0xffffffffu && MUTANT != M_FUSED_READS_CACHE) {
        uint idx = new_row + d;
        return idx < new_k.length() ? kv_load(kv_store(new_k[idx], false)) : 0.0;
    }
    uint idx = off + d;
    return idx < k_cache.length() ? kv_load(uint(k_cache[idx])) : 0.0;
}

float load_v(uint off, uint j, uint new_row, uint d) {
    if (new_row != 0xffffffffu && MUTANT != M_FUSED_READS_CACHE) {
        uint idx = new_row + d;
        return idx < new_v.length() ? kv_load(kv_store(new_v[idx], false)) : 0.0;
    }
    uint idx = off + d;
    if (idx >= v_cache.length()) return 0.0;
    return MUTANT == M_V_MISREAD ? kv_load_misread(uint(v_cache[idx])) : kv_load(uint(v_cache[idx]));
}

void main() {
    uint c = gl_WorkGroupID.x;
    uint h = gl_WorkGroupID.y;
    uint t = gl_WorkGroupID.z % p.n_queries;
    uint b = gl_WorkGroupID.z / p.n_queries;
    uint tid = gl_LocalInvocationID.x;
    uint D = min(p.head_dim, MAX_D);
    if (b >= p.n_seqs || b >= seq_lens.length()) return;   // uniform per workgroup

    uint group = max(p.n_q_heads / max(p.n_kv_heads, 1u), 1u);
    uint kvh = MUTANT == M_GQA_MODULO ? h % p.n_kv_heads : h / group;
    uint len = min(seq_lens[b], p.capacity);
    int pos = int(len) - int(p.n_queries) + int(t);
    uint n_valid = pos < 0 ? 0u : uint(pos) + 1u;
    if (MUTANT == M_CAUSAL_OFF_BY_ONE) n_valid = min(n_valid + 1u, p.capacity);
    uint first = (p.window != 0u && n_valid > p.window) ? n_valid - p.window : 0u;
    uint begin = max(c * p.chunk, first);
    uint end = min(n_valid, c * p.chunk + p.chunk + (MUTANT == M_CHUNK_OVERLAP ? 1u : 0u));
    bool fused = FUSED_MODE;
    uint first_new = len >= p.n_queries ? len - p.n_queries : 0u;   // host checks len >= n_queries

    // Fused append: one workgroup per (sequence, token, kv head) writes the token's K/V.
#if defined(FUSED)
    if (c == 0u && h % group == 0u && len >= p.n_queries) {
        uint src = ((b * p.n_queries + t) * p.n_kv_heads + kvh) * p.head_dim;
        uint dst = b * p.stride_seq + kvh * p.stride_head + (first_new + t) * p.stride_pos;
        for (uint d = tid; d < D; d += WG) {
            if (src + d < new_k.length() && dst + d < k_cache.length()) k_cache[dst + d] = KV_T(kv_store(new_k[src + d], false));
            if (src + d < new_v.length() && dst + d < v_cache.length()) v_cache[dst + d] = KV_T(kv_store(new_v[src + d], false));
        }
    }
#endif

    uint row = (b * p.n_queries + t) * p.n_q_heads + h;
    uint q_base = row * p.head_dim;
    for (uint d = tid; d < D; d += WG) {
        uint idx = q_base + d;
        q_s[d] = idx < q.length() ? q[idx] : 0.0;
    }
    barrier();

    uint kv_base = b * p.stride_seq + kvh * p.stride_head;
    float m = NEG_FLOOR;
    float l = 0.0;
    float acc[ACC];
    for (uint i = 0; i < ACC; ++i) acc[i] = 0.0;

    for (uint base = begin; base < end; base += WG) {
        uint j = base + tid;
        float s = NEG_FLOOR;
        if (j < end) {
            uint off = kv_base + j * p.stride_pos;
            uint new_row = (fused && j >= first_new) ? ((b * p.n_queries + (j - first_new)) * p.n_kv_heads + kvh) * p.head_dim : 0xffffffffu;
            float dot = 0.0;
            for (uint d = 0; d < D; ++d) dot += q_s[d] * load_k(off, j, new_row, d);
            s = dot * p.scale;
            if (p.softcap > 0.0) s = p.softcap * tanh(s / p.softcap);
        }
        float m_new = max(m, reduce_max(s));
        float e;
        float alpha;
        if (MUTANT == M_NO_MAX_SUBTRACT) {
            e = j < end ? exp(s) : 0.0;
            alpha = 1.0;
        } else {
            e = j < end ? exp(s - m_new) : 0.0;
            alpha = exp(m - m_new);
        }
        p_s[tid] = e;
        l = l * alpha + reduce_sum(e);   // the reduction's barriers also publish p_s
        uint n_tile = min(WG, end - base);
        for (uint i = 0; i < ACC; ++i) {
            uint d = tid + i * WG;
            if (d < D) {
                float a = acc[i] * alpha;
                for (uint jj = 0; jj < n_tile; ++jj) {
                    uint jv = base + jj;
                    uint new_row = (fused && jv >= first_new) ? ((b * p.n_queries + (jv - first_new)) * p.n_kv_heads + kvh) * p.head_dim : 0xffffffffu;
                    a += p_s[jj] * load_v(kv_base + jv * p.stride_pos, jv, new_row, d);
                }
                acc[i] = MUTANT == M_F16_ACCUMULATE ? unpackHalf2x16(packHalf2x16(vec2(a, 0.0))).x : a;
            }
        }
        m = m_new;
        barrier();   // p_s is rewritten by the next tile
    }

    if (p.n_chunks == 1u) {
        // The sink joins the denominator: rescale both to M = max(m, sink).
        float scale_o = 1.0;
        if ((p.flags & FLAG_SINKS) != 0u && l > 0.0 && h < sinks.length()) {
            float sink = sinks[h];
            float M = max(m, sink);
            scale_o = exp(m - M);
            l = l * scale_o + exp(sink - M);
        }
        for (uint i = 0; i < ACC; ++i) {
            uint d = tid + i * WG;
            uint idx = q_base + d;
            if (d < D && idx < o.length()) o[idx] = l > 0.0 ? acc[i] * scale_o / l : 0.0;
        }
        return;
    }
    uint part = row * p.n_chunks + c;
    for (uint i = 0; i < ACC; ++i) {
        uint d = tid + i * WG;
        uint idx = part * p.head_dim + d;
        if (d < D && idx < part_o.length()) part_o[idx] = acc[i];
    }
    if (tid == 0u && part < part_ml.length()) part_ml[part] = vec2(m, l);
}
