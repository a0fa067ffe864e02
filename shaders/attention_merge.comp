#version 450
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
//
// Decode attention, pass 2 of 2: merges the per-chunk partials (O_c, m_c, l_c) of one output row
// by log-sum-exp: M = max m_c, O = Σ O_c·exp(m_c − M) / Σ l_c·exp(m_c − M). Chunks with l_c = 0
// (no visible position) carry no weight; a row with no visible position at all gives 0. An
// attention sink (one logit per query head) joins the denominator as a chunk with l = 1, O = 0.
//
// One workgroup per row. M and L are reduced over the chunks by all invocations (subgroup
// reductions, then one value per subgroup through shared memory: correct for any subgroup
// size). For O, the workgroup is split into groups of head_dim/4 invocations, one 16-byte column
// each; group g sums chunks g, g + G, ... four at a time (their loads in flight together; the
// first four issued before the M and L reductions), and the groups' sums are added through
// shared memory. Bindings and push constants mirror
// src/kernels/attention.rs.

const uint WG = 128;
const float NEG_FLOOR = -3.0e38;

layout(local_size_x = 128) in;

// Mutants (src/kernels/attention.rs): 6 sums chunks without the exp(m_c − M) rescale.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_MERGE_NO_RESCALE = 6;

layout(push_constant) uniform Params {
    uint n_rows;
    uint head_dim;
    uint n_chunks;
    uint n_q_heads;
    uint has_sinks;
} p;

layout(std430, binding = 0) readonly buffer PartialO { vec4 part_o4[]; };   // [row][chunk][D / 4]
layout(std430, binding = 1) readonly buffer PartialML { vec2 part_ml[]; };
layout(std430, binding = 2) writeonly buffer Out { float o[]; };
layout(std430, binding = 3) readonly buffer Sinks { float sinks[]; };

shared vec2 red_s[WG];   // one value per subgroup (at most WG subgroups)
shared vec4 col_s[WG];   // [group][column]

// (max, any) over the workgroup of per-invocation (x, flag).
vec2 reduce_max(float x, float flag) {
    vec2 v = vec2(subgroupMax(x), subgroupMax(flag));
    if (subgroupElect()) red_s[gl_SubgroupID] = v;
    barrier();
    vec2 r = vec2(NEG_FLOOR, 0.0);
    for (uint i = 0; i < gl_NumSubgroups; ++i) r = max(r, red_s[i]);
    barrier();   // red_s is reused
    return r;
}

float reduce_sum(float x) {
    float v = subgroupAdd(x);
    if (subgroupElect()) red_s[gl_SubgroupID].x = v;
    barrier();
    float r = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; ++i) r += red_s[i].x;
    return r;
}

float weight(vec2 ml, float M) {
    return MUTANT == M_MERGE_NO_RESCALE ? 1.0 : exp(ml.x - M);
}

// Loads chunks c0 + u·groups (u < 4, clamped to the last chunk) of column col: (m, l) and O.
void batch(uint c0, uint groups, uint first, uint n, uint d4s, uint col, out vec2 ml[4], out vec4 ov[4]) {
    [[unroll]] for (uint u = 0; u < 4u; ++u) {
        uint c = min(c0 + u * groups, n - 1u);
        uint idx = (first + c) * d4s + col;
        ml[u] = part_ml[first + c];
        ov[u] = idx < part_o4.length() ? part_o4[idx] : vec4(0.0);
    }
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint row = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    uint n = p.n_chunks;
    uint first = row * n;
    uint d4s = p.head_dim / 4u;   // 16-byte columns (head dims are multiples of 8)
    // Uniform guards: the host guarantees these.
    if (row >= p.n_rows || n == 0u || first + n > part_ml.length() || d4s == 0u || d4s > WG) return;

    // Group grp sums chunks grp, grp + groups, ... of column col, four per batch. The first
    // batch's loads are issued before the reductions (they do not depend on M), so the
    // reductions' latency hides theirs.
    uint groups = WG / d4s;
    uint grp = tid / d4s;
    uint col = tid - grp * d4s;
    vec2 ml[4];
    vec4 ov[4];
    batch(grp, groups, first, n, d4s, col, ml, ov);

    float mx = NEG_FLOOR;
    float any = 0.0;
    for (uint c = tid; c < n; c += WG) {
        vec2 x = part_ml[first + c];
        if (x.y > 0.0) {
            mx = max(mx, x.x);
            any = 1.0;
        }
    }
    vec2 mr = reduce_max(mx, any);
    float M = mr.x;
    uint h = row % p.n_q_heads;
    bool sink = mr.y > 0.0 && p.has_sinks != 0u && h < sinks.length();
    if (sink) M = max(M, sinks[h]);

    float lsum = 0.0;
    for (uint c = tid; c < n; c += WG) {
        vec2 x = part_ml[first + c];
        lsum += x.y > 0.0 ? x.y * weight(x, M) : 0.0;
    }
    float L = reduce_sum(lsum) + (sink ? exp(sinks[h] - M) : 0.0);

    vec4 acc = vec4(0.0);
    if (grp < groups) {
        for (uint c0 = grp; c0 < n; c0 += 4u * groups) {
            if (c0 != grp) batch(c0, groups, first, n, d4s, col, ml, ov);
            [[unroll]] for (uint u = 0; u < 4u; ++u) {
                bool use = c0 + u * groups < n && ml[u].y > 0.0;
                acc += use ? ov[u] * weight(ml[u], M) : vec4(0.0);
            }
        }
    }
    col_s[tid] = acc;
    barrier();
    if (grp == 0u) {
        vec4 sum = vec4(0.0);
        for (uint g = 0; g < groups; ++g) sum += col_s[g * d4s + col];
        vec4 r = L > 0.0 ? sum / L : vec4(0.0);
        uint out_idx = row * p.head_dim + col * 4u;
        [[unroll]] for (uint u = 0; u < 4u; ++u) {
            if (out_idx + u < o.length()) o[out_idx + u] = r[u];
        }
    }
}
