#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_control_flow_attributes : require
// variants: f32 f16 bf16 f32_fused f16_fused bf16_fused
//
// Decode attention, pass 1 of 2 (split-K flash-decoding). One workgroup per (chunk, kv head ×
// block of HPW query heads of its GQA group, query token × sequence): all query heads of the
// block share each K/V element it reads, so with HPW = the GQA ratio every K/V element of a
// chunk comes from memory once. Per tile of TILE positions:
//   A. scores S[r][j] = scale·q_r·k_j (each invocation one position, up to RPT heads);
//   B. online softmax per head row: running max m (finite floor), running sum l, rescale alpha;
//   C. O[r][d] = alpha·O[r][d] + Σ_j P[r][j]·v_j[d] (each invocation up to ACC (r, d) outputs).
// Each workgroup writes its partial (O, m, l) per head; attention_merge.comp combines chunks by
// log-sum-exp. With a single chunk it writes the normalised output directly, sinks included.
//
// Positions past the query are never read, so garbage there cannot leak; a chunk with no visible
// position writes (0, NEG_FLOOR, 0), and a row with none at all ends as 0. Options: sliding
// window, logit softcap, attention sinks. Fused variants append the step's new K/V (the last
// n_queries positions of each sequence) in the same dispatch: every workgroup takes those
// positions from the new_k/new_v inputs, rounded as the cache stores them, and never reads the
// slots being written, so no barrier is needed; one workgroup per (sequence, token, kv head)
// writes them. Loops are bounded by the chunk: lavapipe's shader compiler silently stops a loop
// after 65535 iterations. Bindings and push constants mirror src/kernels/attention.rs.

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

const uint WG = 128;
const uint TILE = 32;              // positions per tile
const uint ROW_GROUPS = WG / TILE; // invocations sharing one position in phase A
const uint MAX_HPW = 32;           // query heads per workgroup
const uint RPT = MAX_HPW / ROW_GROUPS;
const uint MAX_D = 256;
const uint Q_CAP = 1024;           // HPW · head_dim, checked on the host (small: acc[] stays in registers)
const uint ACC = Q_CAP / WG;       // (head, dim) outputs per invocation
const float NEG_FLOOR = -3.0e38;   // finite: -inf would make exp(m - m_new) NaN on the first tile

layout(local_size_x = 128) in;

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
    uint chunk;      // positions per chunk, a multiple of 64
    uint n_chunks;   // 1: write the output directly
    uint window;     // sliding window in positions; 0: none
    float softcap;   // 0: none
    uint flags;      // FLAG_SINKS
    uint hpw;        // query heads per workgroup: divides the GQA ratio, hpw · head_dim <= Q_CAP
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

shared float q_s[Q_CAP];            // [r][d]
shared float p_s[MAX_HPW * TILE];   // scores, then weights: [r][j]
shared float alpha_s[MAX_HPW];      // this tile's rescale per head row

#if defined(FUSED)
const bool FUSED_MODE = true;
#else
const bool FUSED_MODE = false;
#endif

// Start of position j's new K/V row in new_k/new_v (fused mode, j >= first_new), else ~0u.
uint new_row(uint b, uint kvh, uint j, uint first_new) {
    if (!FUSED_MODE || j < first_new || MUTANT == M_FUSED_READS_CACHE) return 0xffffffffu;
    return ((b * p.n_queries + (j - first_new)) * p.n_kv_heads + kvh) * p.head_dim;
}

float load_k(uint off, uint nrow, uint d) {
    if (nrow != 0xffffffffu) {
        uint idx = nrow + d;
        return idx < new_k.length() ? kv_load(kv_store(new_k[idx], false)) : 0.0;
    }
    uint idx = off + d;
    return idx < k_cache.length() ? kv_load(uint(k_cache[idx])) : 0.0;
}

float load_v(uint off, uint nrow, uint d) {
    if (nrow != 0xffffffffu) {
        uint idx = nrow + d;
        return idx < new_v.length() ? kv_load(kv_store(new_v[idx], false)) : 0.0;
    }
    uint idx = off + d;
    if (idx >= v_cache.length()) return 0.0;
    return MUTANT == M_V_MISREAD ? kv_load_misread(uint(v_cache[idx])) : kv_load(uint(v_cache[idx]));
}

void main() {
    uint c = gl_WorkGroupID.x;
    uint t = gl_WorkGroupID.z % p.n_queries;
    uint b = gl_WorkGroupID.z / p.n_queries;
    uint tid = gl_LocalInvocationID.x;
    uint D = min(p.head_dim, MAX_D);
    uint hpw = clamp(p.hpw, 1u, MAX_HPW);
    if (b >= p.n_seqs || b >= seq_lens.length() || hpw * D > Q_CAP) return;   // uniform

    uint ratio = max(p.n_q_heads / max(p.n_kv_heads, 1u), 1u);
    uint blocks = max(ratio / hpw, 1u);           // head blocks per kv head
    uint g = gl_WorkGroupID.y / blocks;           // kv head
    uint h0 = g * ratio + (gl_WorkGroupID.y % blocks) * hpw;   // first query head of the block
    uint kvh = MUTANT == M_GQA_MODULO ? h0 % p.n_kv_heads : g;

    uint len = min(seq_lens[b], p.capacity);
    int pos = int(len) - int(p.n_queries) + int(t);
    uint n_valid = pos < 0 ? 0u : uint(pos) + 1u;
    if (MUTANT == M_CAUSAL_OFF_BY_ONE) n_valid = min(n_valid + 1u, p.capacity);
    uint first = (p.window != 0u && n_valid > p.window) ? n_valid - p.window : 0u;
    uint begin = max(c * p.chunk, first);
    uint end = min(n_valid, c * p.chunk + p.chunk + (MUTANT == M_CHUNK_OVERLAP ? 1u : 0u));
    uint first_new = len >= p.n_queries ? len - p.n_queries : 0u;   // host checks len >= n_queries


    uint row0 = (b * p.n_queries + t) * p.n_q_heads + h0;   // output row of head r: row0 + r
    for (uint i = tid; i < hpw * D; i += WG) {
        uint idx = row0 * p.head_dim + i;   // rows of consecutive heads are contiguous
        q_s[i] = idx < q.length() ? q[idx] : 0.0;
    }
    // Phase B's running state lives with invocation r (< hpw) of the workgroup.
    float m = NEG_FLOOR;
    float l = 0.0;
    float acc[ACC];
    [[unroll]] for (uint i = 0; i < ACC; ++i) acc[i] = 0.0;
    barrier();

    uint kv_base = b * p.stride_seq + kvh * p.stride_head;
    uint jj = tid % TILE;       // phase A: this invocation's position in the tile
    uint rg = tid / TILE;       // phase A: its first head row; rows rg, rg + ROW_GROUPS, ...

    for (uint base = begin; base < end; base += TILE) {
        // A. scores for position base + jj against the block's heads.
        uint j = base + jj;
        float dots[RPT];
        [[unroll]] for (uint k = 0; k < RPT; ++k) dots[k] = 0.0;
        if (j < end) {
            uint off = kv_base + j * p.stride_pos;
            uint nrow = new_row(b, kvh, j, first_new);
            if (nrow == 0xffffffffu && off + D <= k_cache.length()) {
                // Fast path: a cache row in bounds; 8 independent loads in flight per step
                // (head dims are multiples of 8).
                for (uint d = 0; d < D; d += 8) {
                    float kd[8];
                    [[unroll]] for (uint u = 0; u < 8; ++u) kd[u] = kv_load(uint(k_cache[off + d + u]));
                    [[unroll]] for (uint k = 0; k < RPT; ++k) {
                        uint r = rg + k * ROW_GROUPS;
                        if (r < hpw) {
                            float acc_k = dots[k];
                            [[unroll]] for (uint u = 0; u < 8; ++u) acc_k += q_s[r * D + d + u] * kd[u];
                            dots[k] = acc_k;
                        }
                    }
                }
            } else {
                for (uint d = 0; d < D; ++d) {
                    float kd = load_k(off, nrow, d);
                    [[unroll]] for (uint k = 0; k < RPT; ++k) {
                        uint r = rg + k * ROW_GROUPS;
                        if (r < hpw) dots[k] += q_s[r * D + d] * kd;
                    }
                }
            }
        }
        [[unroll]] for (uint k = 0; k < RPT; ++k) {
            uint r = rg + k * ROW_GROUPS;
            if (r < hpw) {
                float s = NEG_FLOOR;
                if (j < end) {
                    s = dots[k] * p.scale;
                    if (p.softcap > 0.0) s = p.softcap * tanh(s / p.softcap);
                }
                p_s[r * TILE + jj] = s;
            }
        }
        barrier();

        // B. online softmax, one invocation per head row.
        uint n_tile = min(TILE, end - base);
        if (tid < hpw) {
            float tile_max = NEG_FLOOR;
            for (uint i = 0; i < n_tile; ++i) tile_max = max(tile_max, p_s[tid * TILE + i]);
            float m_new = max(m, tile_max);
            float alpha = MUTANT == M_NO_MAX_SUBTRACT ? 1.0 : exp(m - m_new);
            float sum = 0.0;
            for (uint i = 0; i < TILE; ++i) {
                float s = p_s[tid * TILE + i];
                float e = i < n_tile ? (MUTANT == M_NO_MAX_SUBTRACT ? exp(s) : exp(s - m_new)) : 0.0;
                p_s[tid * TILE + i] = e;
                sum += e;
            }
            l = l * alpha + sum;
            m = m_new;
            alpha_s[tid] = alpha;
        }
        barrier();

        // C. accumulate P·V; output i of this invocation is (head r, dim d) = divmod(tid + i·WG, D).
        [[unroll]] for (uint i = 0; i < ACC; ++i) {
            uint oi = tid + i * WG;
            if (oi < hpw * D) acc[i] *= alpha_s[oi / D];
        }
        for (uint jt = 0; jt < n_tile; ++jt) {
            uint jv = base + jt;
            uint off = kv_base + jv * p.stride_pos;
            uint nrow = new_row(b, kvh, jv, first_new);
            [[unroll]] for (uint i = 0; i < ACC; ++i) {
                uint oi = tid + i * WG;
                if (oi < hpw * D) {
                    uint r = oi / D;
                    acc[i] += p_s[r * TILE + jt] * load_v(off, nrow, oi - r * D);
                }
            }
        }
        if (MUTANT == M_F16_ACCUMULATE) {
            // Rounded in integer arithmetic: drivers may fold unpack(pack(x)) to x (NVIDIA does).
            [[unroll]] for (uint i = 0; i < ACC; ++i) acc[i] = unpackHalf2x16(f32_to_f16_rne(floatBitsToUint(acc[i]))).x;
        }
        barrier();   // p_s and alpha_s are rewritten by the next tile
    }

    // Publish each row's (m, l) to the whole workgroup through alpha_s/p_s.
    if (tid < hpw) {
        alpha_s[tid] = m;
        p_s[tid] = l;
    }
    barrier();

#if defined(FUSED)
    // Fused append, after this workgroup's reads: one workgroup per (sequence, token, kv head)
    // writes the token's K/V, the one whose chunk holds the token (so the mutant that reads the
    // slot instead of the input reads its own unwritten slot: poison, deterministically).
    uint own = min((first_new + t) / max(p.chunk, 1u), p.n_chunks - 1u);
    if (c == own && gl_WorkGroupID.y % blocks == 0u && len >= p.n_queries) {
        uint src = ((b * p.n_queries + t) * p.n_kv_heads + g) * p.head_dim;
        uint dst = b * p.stride_seq + g * p.stride_head + (first_new + t) * p.stride_pos;
        for (uint d = tid; d < D; d += WG) {
            if (src + d < new_k.length() && dst + d < k_cache.length()) k_cache[dst + d] = KV_T(kv_store(new_k[src + d], false));
            if (src + d < new_v.length() && dst + d < v_cache.length()) v_cache[dst + d] = KV_T(kv_store(new_v[src + d], false));
        }
    }
#endif

    if (p.n_chunks == 1u) {
        [[unroll]] for (uint i = 0; i < ACC; ++i) {
            uint oi = tid + i * WG;
            if (oi >= hpw * D) continue;
            uint r = oi / D;
            float mr = alpha_s[r];
            float lr = p_s[r];
            float scale_o = 1.0;
            uint h = h0 + r;
            // The sink joins the denominator: rescale both to M = max(m, sink).
            if ((p.flags & FLAG_SINKS) != 0u && lr > 0.0 && h < sinks.length()) {
                float M = max(mr, sinks[h]);
                scale_o = exp(mr - M);
                lr = lr * scale_o + exp(sinks[h] - M);
            }
            uint idx = row0 * p.head_dim + oi;
            if (idx < o.length()) o[idx] = lr > 0.0 ? acc[i] * scale_o / lr : 0.0;
        }
        return;
    }
    [[unroll]] for (uint i = 0; i < ACC; ++i) {
        uint oi = tid + i * WG;
        if (oi >= hpw * D) continue;
        uint r = oi / D;
        uint idx = ((row0 + r) * p.n_chunks + c) * p.head_dim + (oi - r * D);
        if (idx < part_o.length()) part_o[idx] = acc[i];
    }
    if (tid < hpw) {
        uint part = (row0 + tid) * p.n_chunks + c;
        if (part < part_ml.length()) part_ml[part] = vec2(m, l);
    }
}
