#version 450
#extension GL_EXT_shader_16bit_storage : require
// variants: f32 f16 bf16
//
// The step's input row: x = embed_tokens[state[1]] widened to f32 (Qwen3 does not scale it).
// A token id outside the vocabulary (never produced by the engine; prompts are checked on the
// host) gives NaN, so it cannot pass for a real token. Bindings and push constants mirror
// src/engine/kernels.rs.

#include "kv_types.glsl"   // KV_T / kv_load: the weight element type

layout(local_size_x = 256) in;

layout(set = 0, binding = 0) readonly buffer State { uint state[]; };
layout(set = 0, binding = 1) readonly buffer Table { KV_T table[]; };
layout(set = 0, binding = 2) writeonly buffer X { float x[]; };

layout(push_constant) uniform Push {
    uint hidden;
    uint vocab;
};

void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i >= hidden) return;
    uint token = state[1];
    x[i] = token < vocab ? kv_load(uint(table[token * hidden + i])) : uintBitsToFloat(0x7fc00000u);
}
