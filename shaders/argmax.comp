#version 450
// Greedy sampling on the GPU, in two dispatches. Pass 0 (one workgroup per BLOCK logits) writes
// each block's best (value, index); pass 1 (one workgroup) reduces those, then advances the
// decode state for the next step: state = [seq_len, token, prompt_len, sampled]. The next input
// token is the next prompt token while the prompt lasts, else the sampled one, which is also
// written to `ids` (the prompt buffer, which so becomes the input id of every position: the host
// reads the sampled ids there, several steps at a time). The order is
// torch.argmax's: the largest value, the lowest index among equals, NaN never wins (all NaN: 0).
// Bindings and push constants mirror src/engine/kernels.rs.

const uint WG = 256;
const uint PER_THREAD = 16;
const uint BLOCK = WG * PER_THREAD;
const uint NONE = 0xffffffffu;

layout(local_size_x = 256) in;

layout(set = 0, binding = 0) readonly buffer Logits { float logits[]; };
layout(set = 0, binding = 1) buffer Partial { uvec2 partial[]; };   // (value bits, index)
layout(set = 0, binding = 2) buffer State { uint state[]; };
layout(set = 0, binding = 3) buffer Ids { uint ids[]; };   // [capacity]: prompt, then sampled ids

layout(push_constant) uniform Push {
    uint n;        // logits (pass 0) or blocks (pass 1)
    uint pass_id;
    uint capacity; // ids entries
};

shared float best_v[WG];
shared uint best_i[WG];

// Whether candidate (v, i) beats (bv, bi).
bool better(float v, uint i, float bv, uint bi) {
    if (i == NONE) return false;
    if (bi == NONE) return true;
    if (isnan(v)) return isnan(bv) && i < bi;
    if (isnan(bv)) return true;
    return v > bv || (v == bv && i < bi);
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    float bv = 0.0;
    uint bi = NONE;
    if (pass_id == 0u) {
        uint start = gl_WorkGroupID.x * BLOCK;
        for (uint j = 0; j < PER_THREAD; j++) {
            uint i = start + j * WG + tid;
            if (i < n && better(logits[i], i, bv, bi)) { bv = logits[i]; bi = i; }
        }
    } else {
        for (uint j = tid; j < n; j += WG) {
            float v = uintBitsToFloat(partial[j].x);
            uint i = partial[j].y;
            if (better(v, i, bv, bi)) { bv = v; bi = i; }
        }
    }
    best_v[tid] = bv;
    best_i[tid] = bi;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s && better(best_v[tid + s], best_i[tid + s], best_v[tid], best_i[tid])) {
            best_v[tid] = best_v[tid + s];
            best_i[tid] = best_i[tid + s];
        }
        barrier();
    }
    if (tid != 0u) return;
    if (pass_id == 0u) {
        partial[gl_WorkGroupID.x] = uvec2(floatBitsToUint(best_v[0]), best_i[0]);
        return;
    }
    uint sampled = best_i[0] == NONE ? 0u : best_i[0];
    uint next = state[0];                    // position of the next step's token
    uint prompt_len = min(state[2], capacity);
    uint token = sampled;
    if (next < prompt_len) token = ids[next];
    else if (next < capacity) ids[next] = sampled;
    state[1] = token;
    state[3] = sampled;
    state[0] = next + 1u;
}
