#version 450
// Naive decode attention: one workgroup per (query head h, query token t, sequence b), a plain
// two-pass softmax (the max, then the weights and the weighted sum of V) over the causally
// visible positions 0 ..= seq_lens[b] - T + t. No online rescaling, no split-K, f32 throughout.
//
// Q and the output are f32 [B][T][H][D]; the caches are f32 with element (b, kvh, pos, d) at
// b*stride_seq + kvh*stride_head + pos*stride_pos + d. The host checks every bound used here
// (src/lib.rs): head_dim <= MAX_HEAD_DIM, H % Hkv == 0, seq_lens[b] <= capacity, 32-bit indices.
//
// Why 64 invocations per row and not one: lavapipe silently ends every loop once an invocation
// has run 65535 loop iterations in all, and one invocation doing a whole row needs about
// 3 * positions * head_dim of them. Split 64 ways, rows of positions * head_dim up to about a
// million come out right on lavapipe (measured: 4000 x 256 passes, 8191 x 128 does not).

#define WG 64u
layout(local_size_x = WG) in;

// 1: the causal bound is off by one (each row attends one position past its query).
layout(constant_id = 0) const uint PLANTED_BUG = 0;

layout(std430, set = 0, binding = 0) readonly buffer Q { float q[]; };
layout(std430, set = 0, binding = 1) readonly buffer K { float k_cache[]; };
layout(std430, set = 0, binding = 2) readonly buffer V { float v_cache[]; };
layout(std430, set = 0, binding = 3) readonly buffer Lens { uint seq_lens[]; };
layout(std430, set = 0, binding = 4) writeonly buffer Out { float o[]; };

layout(push_constant) uniform Push {
    uint n_seqs;
    uint n_queries;
    uint n_q_heads;
    uint n_kv_heads;
    uint head_dim;
    uint capacity;
    uint stride_seq;
    uint stride_head;
    uint stride_pos;
    float scale;
} p;

const uint MAX_HEAD_DIM = 256;

shared float partial_max[WG];
shared float tile_weights[WG];

// scale * q[q_base ..] . k[pos], where `kv` is the cache offset of (b, kvh, 0, 0).
float logit(uint q_base, uint kv, uint pos) {
    float dot = 0.0;
    for (uint d = 0; d < p.head_dim; d++) {
        dot += q[q_base + d] * k_cache[kv + pos * p.stride_pos + d];
    }
    return p.scale * dot;
}

void main() {
    uint h = gl_WorkGroupID.x;
    uint t = gl_WorkGroupID.y;
    uint b = gl_WorkGroupID.z;
    uint lid = gl_LocalInvocationID.x;
    uint q_base = ((b * p.n_queries + t) * p.n_q_heads + h) * p.head_dim; // Q and out: [B][T][H][D]
    uint kvh = h / (p.n_q_heads / p.n_kv_heads);
    uint kv = b * p.stride_seq + kvh * p.stride_head;

    // Positions 0 .. n-1 are visible: n = seq_len - T + t + 1 (none if that is <= 0).
    int end = int(seq_lens[b]) - int(p.n_queries) + int(t) + 1;
    if (PLANTED_BUG != 0) {
        end += 1;
    }
    uint n = uint(clamp(end, 0, int(p.capacity))); // never read past the cache

    // Pass 1: the largest logit. Invocation lid takes positions lid, lid + WG, ...; then a tree
    // reduction in shared memory.
    float m = -3.0e38;
    for (uint pos = lid; pos < n; pos += WG) {
        m = max(m, logit(q_base, kv, pos));
    }
    partial_max[lid] = m;
    barrier();
    for (uint s = WG / 2; s > 0; s /= 2) {
        if (lid < s) {
            partial_max[lid] = max(partial_max[lid], partial_max[lid + s]);
        }
        barrier();
    }
    m = partial_max[0];

    // Pass 2, a tile of WG positions at a time: each invocation computes one weight exp(logit - m)
    // (<= 1, so nothing overflows) into shared memory; then every invocation adds the tile's
    // weights to the sum and the weighted V rows to its own dims lid, lid + WG, ...
    float acc[MAX_HEAD_DIM / WG];
    for (uint i = 0; i < MAX_HEAD_DIM / WG; i++) {
        acc[i] = 0.0;
    }
    float sum = 0.0;
    for (uint tile = 0; tile < n; tile += WG) {
        uint pos = tile + lid;
        float w = 0.0;
        if (pos < n) {
            w = exp(logit(q_base, kv, pos) - m);
        }
        tile_weights[lid] = w;
        barrier();
        for (uint j = 0; j < min(WG, n - tile); j++) {
            sum += tile_weights[j];
            uint v_row = kv + (tile + j) * p.stride_pos;
            for (uint d = lid; d < p.head_dim; d += WG) {
                acc[d / WG] += tile_weights[j] * v_cache[v_row + d];
            }
        }
        barrier(); // every invocation is done with this tile's weights
    }

    for (uint d = lid; d < p.head_dim; d += WG) {
        o[q_base + d] = n > 0 ? acc[d / WG] / sum : 0.0;
    }
}
