#version 450
#extension GL_EXT_shader_16bit_storage : require
// variants: f32 f16 bf16
//
// Fills a weight tensor with offset + scale·u, u uniform in [-1, 1) from a hash of (seed, index),
// rounded to the stored type: random weights of real model shapes without files, for benchmarks.
// Invocation (x, y) of a 2-D grid of WG-wide rows fills element y·(gx·WG) + x.
// Bindings and push constants mirror src/engine/kernels.rs.

#include "kv_types.glsl"   // KV_T / kv_store: the weight element type

layout(local_size_x = 256) in;

layout(set = 0, binding = 0) writeonly buffer W { KV_T w[]; };

layout(push_constant) uniform Push {
    uint n;
    uint seed;
    float scale;
    float offset;
};

// A 32-bit integer hash with full avalanche (lowbias32 by Chris Wellons).
uint hash(uint x) {
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

void main() {
    uint i = gl_GlobalInvocationID.y * (gl_NumWorkGroups.x * 256u) + gl_GlobalInvocationID.x;
    if (i >= n) return;
    float u = float(hash(i ^ hash(seed)) >> 8) * (1.0 / 8388608.0) - 1.0;
    w[i] = KV_T(kv_store(floatBitsToUint(offset + scale * u), false));
}
