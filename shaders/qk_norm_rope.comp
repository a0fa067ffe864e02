#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_shader_subgroup_arithmetic : require
// variants: f32 f16 bf16
//
// Qwen3's per-head q/k normalisation and rotary embedding, in place, for one decode step:
// each of the n_q_heads rows of q and n_kv_heads rows of k (head_dim f32 values) becomes
// rope(rmsnorm(row) · norm_weight) at the step's position (state[0] − 1). The norm weight
// ([head_dim], shared by the heads) is in its stored type (the variant). RoPE is HF's
// rotate_half form: element i pairs with i + head_dim/2, at angle pos·inv_freq[i]; the host
// supplies cos and sin per (position, i) in `rope` so the angle is HF's f32 product and no GPU
// range reduction enters. One workgroup per row, one invocation per rotated pair.
// Bindings and push constants mirror src/engine/kernels.rs.

#include "kv_types.glsl"   // KV_T / kv_load: the weight element type

const uint WG = 128;            // head_dim / 2 at most (head_dim <= 256, checked on the host)
const uint MAX_SUBGROUPS = 32;

layout(local_size_x = 128) in;

// Engine mutants (src/engine/mutant.rs): 0 none.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_INTERLEAVED_ROPE = 1;
const uint M_SKIP_QK_NORM = 2;

layout(set = 0, binding = 0) readonly buffer State { uint state[]; };
layout(set = 0, binding = 1) buffer Q { float q[]; };
layout(set = 0, binding = 2) buffer K { float k[]; };
layout(set = 0, binding = 3) readonly buffer QNorm { KV_T q_norm[]; };
layout(set = 0, binding = 4) readonly buffer KNorm { KV_T k_norm[]; };
layout(set = 0, binding = 5) readonly buffer Rope { vec2 rope[]; };   // [capacity][head_dim/2] (cos, sin)

layout(push_constant) uniform Push {
    uint n_q_heads;
    uint n_kv_heads;
    uint head_dim;
    uint capacity;
    float eps;
};

shared float partial[MAX_SUBGROUPS];

float load_row(bool is_q, uint i) { return is_q ? q[i] : k[i]; }

void store_row(bool is_q, uint i, float v) {
    if (is_q) q[i] = v; else k[i] = v;
}

float norm_weight(bool is_q, uint i) { return kv_load(uint(is_q ? q_norm[i] : k_norm[i])); }

void main() {
    uint row = gl_WorkGroupID.x;
    if (row >= n_q_heads + n_kv_heads) return;
    bool is_q = row < n_q_heads;
    uint base = (is_q ? row : row - n_q_heads) * head_dim;
    uint half_dim = head_dim / 2u;
    uint t = gl_LocalInvocationID.x;
    bool in_row = t < half_dim;
    // Pair (i0, i1) rotates together: halves for rotate_half, neighbours for the mutant.
    uint i0 = MUTANT == M_INTERLEAVED_ROPE ? 2u * t : t;
    uint i1 = MUTANT == M_INTERLEAVED_ROPE ? 2u * t + 1u : t + half_dim;
    float a = in_row ? load_row(is_q, base + i0) : 0.0;
    float b = in_row ? load_row(is_q, base + i1) : 0.0;

    float ss = subgroupAdd(a * a + b * b);
    if (gl_SubgroupInvocationID == 0u) partial[gl_SubgroupID] = ss;
    barrier();
    if (!in_row) return;
    if (MUTANT != M_SKIP_QK_NORM) {
        float total = 0.0;
        for (uint g = 0; g < gl_NumSubgroups; g++) total += partial[g];
        float r = inversesqrt(total / float(head_dim) + eps);
        a = a * r * norm_weight(is_q, i0);
        b = b * r * norm_weight(is_q, i1);
    }
    uint pos = min(max(state[0], 1u) - 1u, capacity - 1u);
    vec2 cs = rope[pos * half_dim + t];
    store_row(is_q, base + i0, a * cs.x - b * cs.y);
    store_row(is_q, base + i1, b * cs.x + a * cs.y);
}
