#version 450
#extension GL_EXT_control_flow_attributes : require
//
// Read bandwidth probe (src/bench/bandwidth.rs): reads n 16-byte elements, so a call moves 16·n
// bytes. Blocks as in copy.comp; each invocation folds its PER_THREAD loads with XOR and the
// workgroup writes one element per block (1/4096 of the bytes read), so the loads cannot be
// optimised away and the writes do not count.

#extension GL_KHR_shader_subgroup_arithmetic : require

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
    uint block = gl_WorkGroupID.y * p.row_groups + gl_WorkGroupID.x;
    uint base = block * (WG * PER_THREAD) + gl_LocalInvocationID.x;
    uvec4 v = uvec4(0);
    [[unroll]] for (uint k = 0; k < PER_THREAD; ++k) {
        uint i = base + k * WG;
        if (i < p.n) v ^= src[i];
    }
    v = subgroupXor(v);
    if (gl_LocalInvocationID.x == 0u) dst[block] = v;
}
