#version 450
// SwiGLU of the MLP, in place: gate[i] = silu(gate[i]) · up[i], silu(g) = g / (1 + e^−g), f32.
// Bindings and push constants mirror src/engine/kernels.rs.

layout(local_size_x = 256) in;

layout(set = 0, binding = 0) buffer Gate { float gate[]; };
layout(set = 0, binding = 1) readonly buffer Up { float up[]; };

layout(push_constant) uniform Push {
    uint n;
};

void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = g / (1.0 + exp(-g)) * up[i];
}
