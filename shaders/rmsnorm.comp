#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_shader_subgroup_arithmetic : require
// variants: f32 f16 bf16
//
// RMSNorm of `rows` vectors of n f32 values, as HF's Qwen3RMSNorm in f32:
// out = x · rsqrt(mean(x²) + eps) · weight, the weight [n] in its stored type (the variant).
// One workgroup per row. Bindings and push constants mirror src/engine/kernels.rs.

#include "kv_types.glsl"   // KV_T / kv_load: the weight element type

const uint WG = 256;
const uint MAX_SUBGROUPS = 64;

layout(local_size_x = 256) in;

// Engine mutants (src/engine/mutant.rs): 0 none.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_NORM_WEIGHT_IGNORED = 4;

layout(set = 0, binding = 0) readonly buffer X { float x[]; };
layout(set = 0, binding = 1) readonly buffer W { KV_T w[]; };
layout(set = 0, binding = 2) writeonly buffer Out { float o[]; };

layout(push_constant) uniform Push {
    uint n;
    uint rows;
    float eps;
};

shared float partial[MAX_SUBGROUPS];

void main() {
    uint row = gl_WorkGroupID.x;
    if (row >= rows) return;
    uint tid = gl_LocalInvocationID.x;
    uint base = row * n;
    float ss = 0.0;
    for (uint i = tid; i < n; i += WG) ss += x[base + i] * x[base + i];
    ss = subgroupAdd(ss);
    if (gl_SubgroupInvocationID == 0u) partial[gl_SubgroupID] = ss;
    barrier();
    float total = 0.0;
    for (uint g = 0; g < gl_NumSubgroups; g++) total += partial[g];
    float r = inversesqrt(total / float(n) + eps);
    for (uint i = tid; i < n; i += WG) {
        float weight = MUTANT == M_NORM_WEIGHT_IGNORED ? 1.0 : kv_load(uint(w[i]));
        o[base + i] = x[base + i] * r * weight;
    }
}
