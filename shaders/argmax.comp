#version 450
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_control_flow_attributes : require
// Greedy sampling on the GPU in one dispatch. Each workgroup finds the best (value, index) of its
// BLOCK logits and publishes it; the last workgroup to finish (counted on a device-scope counter,
// as attention_split.comp's merge) reduces those and advances the decode state for the next
// step: state = [seq_len, token, prompt_len, sampled]. The next input token is the next prompt
// token while the prompt lasts, else the sampled one, which is also written to `ids` (the prompt
// buffer, which so becomes the input id of every position: the host reads the sampled ids there,
// several steps at a time). The order: the largest value, the lowest index among equals (as
// torch.argmax over finite values); NaN never wins (torch's would), all NaN gives 0. (Two
// dispatches with a barrier between, and shared-memory trees: 17 µs a token on the H100.)
// Bindings and push constants mirror src/kernels/layers.rs argmax_advance.

const uint WG = 256;
const uint PER_THREAD = 4;
const uint BLOCK = WG * PER_THREAD;   // the host's ARGMAX_BLOCK
const uint NONE = 0xffffffffu;

layout(local_size_x = 256) in;

layout(set = 0, binding = 0) readonly buffer Logits { float logits[]; };
// [blocks] (value bits, index) per workgroup, then the count of finished workgroups (word
// 2·blocks; zero between calls: the last workgroup resets it).
layout(set = 0, binding = 1) coherent buffer Partial { uvec2 partial[]; };
layout(set = 0, binding = 1) coherent buffer PartialWords { uint partial_words[]; };
layout(set = 0, binding = 2) buffer State { uint state[]; };
layout(set = 0, binding = 3) buffer Ids { uint ids[]; };   // [capacity]: prompt, then sampled ids

layout(push_constant) uniform Push {
    uint n;        // logits
    uint capacity; // ids entries
};

shared float group_v[WG];   // per subgroup
shared uint group_i[WG];
shared bool last_s;

// Whether candidate (v, i) beats (bv, bi).
bool better(float v, uint i, float bv, uint bi) {
    if (i == NONE) return false;
    if (bi == NONE) return true;
    if (isnan(v)) return isnan(bv) && i < bi;
    if (isnan(bv)) return true;
    return v > bv || (v == bv && i < bi);
}

// The workgroup's best of every invocation's (bv, bi), in invocation 0: a shuffle butterfly in
// each subgroup (a strict order, so every lane ends with the same pair), then the subgroups'.
void reduce(inout float bv, inout uint bi) {
    for (uint o = gl_SubgroupSize / 2u; o > 0u; o /= 2u) {
        float v = subgroupShuffleXor(bv, o);
        uint i = subgroupShuffleXor(bi, o);
        if (better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    if (gl_SubgroupInvocationID == 0u) {
        group_v[gl_SubgroupID] = bv;
        group_i[gl_SubgroupID] = bi;
    }
    barrier();
    if (gl_LocalInvocationID.x == 0u) {
        for (uint s = 1u; s < gl_NumSubgroups; s++) {
            if (better(group_v[s], group_i[s], bv, bi)) {
                bv = group_v[s];
                bi = group_i[s];
            }
        }
    }
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint blocks = (n + BLOCK - 1u) / BLOCK;
    uint counter = 2u * blocks;
    if (counter >= partial_words.length()) return;   // the host sizes it; never taken
    float bv = 0.0;
    uint bi = NONE;
    uint start = gl_WorkGroupID.x * BLOCK;
    [[unroll]] for (uint j = 0; j < PER_THREAD; j++) {
        uint i = start + j * WG + tid;
        float v = i < n ? logits[i] : 0.0;
        if (i < n && better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    reduce(bv, bi);
    if (tid == 0u) partial[gl_WorkGroupID.x] = uvec2(floatBitsToUint(bv), bi);
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) last_s = atomicAdd(partial_words[counter], 1u) + 1u == blocks;
    barrier();
    if (!last_s) return;   // uniform
    memoryBarrierBuffer();
    // The state and the next prompt id are loaded before the partials are reduced, so their
    // latency overlaps that (only this workgroup touches them in the dispatch).
    uint next = state[0];                    // position of the next step's token
    uint prompt_len = min(state[2], capacity);
    uint prompt_id = tid == 0u && next < prompt_len ? ids[next] : 0u;
    bv = 0.0;
    bi = NONE;
    for (uint j = tid; j < blocks; j += WG) {
        uvec2 e = partial[j];
        if (better(uintBitsToFloat(e.x), e.y, bv, bi)) {
            bv = uintBitsToFloat(e.x);
            bi = e.y;
        }
    }
    reduce(bv, bi);
    if (tid != 0u) return;
    partial_words[counter] = 0u;
    uint sampled = bi == NONE ? 0u : bi;
    uint token = sampled;
    if (next < prompt_len) token = prompt_id;
    else if (next < capacity) ids[next] = sampled;
    state[1] = token;
    state[3] = sampled;
    state[0] = next + 1u;
}
