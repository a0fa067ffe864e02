#version 450
#extension GL_EXT_control_flow_attributes : require
//
// Copy bandwidth probe (src/bench/bandwidth.rs): dst[i] = src[i] over n 16-byte elements, so a
// call moves 2·16·n bytes (read + written). Each workgroup copies one contiguous block of
// WG·PER_THREAD elements; each invocation loads its PER_THREAD elements (WG apart, so every load
// instruction of a subgroup is contiguous) before storing them, to keep several loads in flight.
// The grid is 2-D when the blocks exceed one axis: block = y·row_groups + x.
// Nothing but the loads and stores: this is the roofline the kernels are reported against.

const uint WG = 256;
const uint PER_THREAD = 4;   // src/bench/bandwidth.rs: ELEMENTS_PER_WORKGROUP = WG · PER_THREAD

layout(local_size_x = 256) in;

layout(push_constant) uniform Params {
    uint n;            // uvec4 elements
    uint row_groups;   // workgroups along x
} p;

layout(std430, binding = 0) readonly buffer Src { uvec4 src[]; };
layout(std430, binding = 1) writeonly buffer Dst { uvec4 dst[]; };

void main() {
    uint base = (gl_WorkGroupID.y * p.row_groups + gl_WorkGroupID.x) * (WG * PER_THREAD) + gl_LocalInvocationID.x;
    uvec4 v[PER_THREAD];
    [[unroll]] for (uint k = 0; k < PER_THREAD; ++k) {
        uint i = base + k * WG;
        if (i < p.n) v[k] = src[i];
    }
    [[unroll]] for (uint k = 0; k < PER_THREAD; ++k) {
        uint i = base + k * WG;
        if (i < p.n) dst[i] = v[k];
    }
}
