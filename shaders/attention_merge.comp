#version 450
//
// Decode attention, pass 2 of 2: merges the per-chunk partials (O_c, m_c, l_c) of one output row
// by log-sum-exp: M = max m_c, O = Σ O_c·exp(m_c − M) / Σ l_c·exp(m_c − M). Chunks with l_c = 0
// (no visible position) carry no weight; a row with no visible position at all gives 0. An
// attention sink (one logit per query head) joins the denominator as a chunk with l = 1, O = 0.
// One workgroup per row; bindings and push constants mirror src/kernels/attention.rs.

const uint WG = 64;
const float NEG_FLOOR = -3.0e38;

layout(local_size_x = 64) in;

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

layout(std430, binding = 0) readonly buffer PartialO { float part_o[]; };
layout(std430, binding = 1) readonly buffer PartialML { vec2 part_ml[]; };
layout(std430, binding = 2) writeonly buffer Out { float o[]; };
layout(std430, binding = 3) readonly buffer Sinks { float sinks[]; };

void main() {
    uint row = gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x;
    if (row >= p.n_rows) return;
    uint first = row * p.n_chunks;
    if (first + p.n_chunks > part_ml.length()) return;
    float M = NEG_FLOOR;
    bool any = false;
    for (uint c = 0; c < p.n_chunks; ++c) {
        vec2 ml = part_ml[first + c];
        if (ml.y > 0.0) {
            M = max(M, ml.x);
            any = true;
        }
    }
    uint h = row % p.n_q_heads;
    bool sink = any && p.has_sinks != 0u && h < sinks.length();
    if (sink) M = max(M, sinks[h]);
    float L = sink ? exp(sinks[h] - M) : 0.0;
    for (uint c = 0; c < p.n_chunks; ++c) {
        vec2 ml = part_ml[first + c];
        float w = MUTANT == M_MERGE_NO_RESCALE ? 1.0 : exp(ml.x - M);
        L += ml.y > 0.0 ? ml.y * w : 0.0;
    }
    for (uint d = gl_LocalInvocationID.x; d < p.head_dim; d += WG) {
        float acc = 0.0;
        for (uint c = 0; c < p.n_chunks; ++c) {
            vec2 ml = part_ml[first + c];
            float w = MUTANT == M_MERGE_NO_RESCALE ? 1.0 : exp(ml.x - M);
            uint idx = (first + c) * p.head_dim + d;
            if (ml.y > 0.0 && idx < part_o.length()) acc += part_o[idx] * w;
        }
        uint out_idx = row * p.head_dim + d;
        if (out_idx < o.length()) o[out_idx] = L > 0.0 ? acc / L : 0.0;
    }
}
