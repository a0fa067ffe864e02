#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_EXT_control_flow_attributes : require
// variants: f32 f16 bf16
//
// y = W·x (+ y with FLAG_ACCUMULATE): W is [rows][cols] in its stored type (the variant), x and y
// are f32, products are summed in f32. One workgroup per block of rows_per_wg rows; its
// invocations stride over the columns (16-byte loads when rows are 16-byte aligned, FLAG_VEC),
// so each weight byte is read once and x is read once per block. The workgroup size is a
// specialization constant: narrow rows get narrow workgroups, so few invocations idle. Per-row partial sums are
// reduced with subgroupAdd, then across subgroups in shared memory. Every output element is
// written by exactly one invocation, so accumulating into the residual stream needs no atomics.
// Bindings and push constants mirror src/engine/kernels.rs.

#include "kv_types.glsl"   // KV_T / kv_load: the weight element type (same encodings as the cache)

layout(local_size_x_id = 1) in;
layout(constant_id = 1) const uint WG = 256;   // a power of two in 32..=256, picked by the host
const uint MAX_ROWS = 8;           // rows per workgroup (host picks 1..=8)
const uint MAX_SUBGROUPS = 64;     // 256 / the smallest subgroup size we accept (4)
const uint FLAG_ACCUMULATE = 1u;
const uint FLAG_VEC = 2u;

layout(set = 0, binding = 0) readonly buffer Weights { KV_T w[]; };
layout(set = 0, binding = 0) readonly buffer Weights4 { uvec4 w4[]; };
layout(set = 0, binding = 1) readonly buffer X { float x[]; };
layout(set = 0, binding = 1) readonly buffer X4 { vec4 x4[]; };
layout(set = 0, binding = 2) buffer Y { float y[]; };

layout(push_constant) uniform Push {
    uint rows;
    uint cols;
    uint rows_per_wg;
    uint flags;
};

shared float partial[MAX_ROWS][MAX_SUBGROUPS];

// Dot product of one 16-byte weight chunk with the matching x values (chunk index c of the row).
float dot_chunk(uvec4 wv, uint c) {
#if defined(VARIANT_F32)
    return dot(uintBitsToFloat(wv), x4[c]);
#else
    vec4 xa = x4[2u * c];
    vec4 xb = x4[2u * c + 1u];
#if defined(VARIANT_F16)
    vec2 p0 = unpackHalf2x16(wv.x), p1 = unpackHalf2x16(wv.y), p2 = unpackHalf2x16(wv.z), p3 = unpackHalf2x16(wv.w);
#else
    vec2 p0 = vec2(uintBitsToFloat(wv.x << 16), uintBitsToFloat(wv.x & 0xffff0000u));
    vec2 p1 = vec2(uintBitsToFloat(wv.y << 16), uintBitsToFloat(wv.y & 0xffff0000u));
    vec2 p2 = vec2(uintBitsToFloat(wv.z << 16), uintBitsToFloat(wv.z & 0xffff0000u));
    vec2 p3 = vec2(uintBitsToFloat(wv.w << 16), uintBitsToFloat(wv.w & 0xffff0000u));
#endif
    return dot(vec4(p0, p1), xa) + dot(vec4(p2, p3), xb);
#endif
}

void main() {
    uint wg = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    uint row0 = wg * rows_per_wg;
    if (row0 >= rows) return;   // uniform per workgroup: no barrier is skipped by part of it
    uint n_rows = min(rows_per_wg, rows - row0);
    uint tid = gl_LocalInvocationID.x;

    float acc[MAX_ROWS];
    [[unroll]] for (uint r = 0; r < MAX_ROWS; r++) acc[r] = 0.0;

    if ((flags & FLAG_VEC) != 0u) {
#if defined(VARIANT_F32)
        uint chunks = cols / 4u;
#else
        uint chunks = cols / 8u;
#endif
        for (uint c = tid; c < chunks; c += WG) {
            [[unroll]] for (uint r = 0; r < MAX_ROWS; r++) {
                if (r < n_rows) acc[r] += dot_chunk(w4[(row0 + r) * chunks + c], c);
            }
        }
    } else {
        for (uint c = tid; c < cols; c += WG) {
            float xc = x[c];
            [[unroll]] for (uint r = 0; r < MAX_ROWS; r++) {
                if (r < n_rows) acc[r] += kv_load(uint(w[(row0 + r) * cols + c])) * xc;
            }
        }
    }

    [[unroll]] for (uint r = 0; r < MAX_ROWS; r++) {
        float s = subgroupAdd(acc[r]);
        if (gl_SubgroupInvocationID == 0u && r < n_rows) partial[r][gl_SubgroupID] = s;
    }
    barrier();
    if (tid < n_rows) {
        float s = 0.0;
        for (uint g = 0; g < gl_NumSubgroups; g++) s += partial[tid][g];
        uint row = row0 + tid;
        y[row] = ((flags & FLAG_ACCUMULATE) != 0u) ? y[row] + s : s;
    }
}
