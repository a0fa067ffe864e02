#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_control_flow_attributes : require
// variants: f32 f16 bf16
//
// Matrix-vector products of the decode step, y = W·x with f32 x and y and W [rows][cols] in its
// stored type (the variant), summed in f32. One dispatch serves up to three matrices that share
// x (q/k/v, or gate/up), with optional fusions, so a layer needs few dispatches and barriers:
//   FLAG_NORM        x is first RMS-normalised with weight nw ([cols], same type as W):
//                    W·(x·r·nw) = r·(W·(x·nw)), r = rsqrt(mean(x²) + eps). Every workgroup reads
//                    all of x anyway, so it also sums x² and applies r to its dot products.
//   FLAG_SWIGLU      W0 = gate, W1 = up (same shape): y0 = silu(W0·x)·(W1·x); each workgroup
//                    computes the same rows of both.
//   FLAG_ACCUMULATE  y += W·x (the residual stream).
//   XMERGE > 0       x is decode attention's output, merged here from its split-K partials
//                    (see XMERGE below), so attention needs no merge of its own.
// One workgroup per block of rows_per_wg rows of one matrix; its invocations stride over the
// columns (16-byte loads when rows are 16-byte aligned, FLAG_VEC), so each weight byte is read
// once. Per-row sums are reduced within each subgroup (reduce_scatter on the batched path, a
// subgroupAdd per row on the others), then across subgroups in shared memory; each output
// element is written by one invocation. The workgroup size is a specialization constant:
// narrow rows get narrow workgroups. Bindings and push constants mirror src/kernels/layers.rs.

#include "kv_types.glsl"   // KV_T / kv_load: the weight element type (same encodings as the cache)

layout(local_size_x_id = 1) in;
layout(constant_id = 1) const uint WG = 256;   // a power of two in 32..=256, picked by the host
// BATCHED: the vector path with its shape fixed at pipeline creation (ROWS_DOT_VEC), picked by
// the host for the LM head: rows per workgroup (= rows_per_wg), weight matrices per row block (2
// with SWIGLU), and the chunk columns an invocation covers, as BATCHES batches of PER_BATCH
// whose loads are issued together (ROWS·MATS·PER_BATCH <= MAX_LOADS).
layout(constant_id = 2) const uint ROWS = 1;
layout(constant_id = 3) const uint MATS = 1;
layout(constant_id = 4) const uint PER_BATCH = 1;
layout(constant_id = 5) const uint BATCHES = 1;
layout(constant_id = 6) const bool BATCHED = false;
const uint MAX_LOADS = 16;
// The one path a pipeline runs, and its matrix count (0: any): the host sets both, so the driver
// compiles only that code. H100, Qwen3-0.6B at ctx 4096 with the host's shapes: every path
// compiled in 2133 µs/token, specialized 1478 (binaries 67.6 → 12.8–30.8 KB). Not the fetch of
// the code itself: a straight block of 1024 FMAs in attention costs about its issue time.
layout(constant_id = 7) const uint PATH = 0;
layout(constant_id = 8) const uint NMATS = 0;
const uint PATH_ANY = 0u;
const uint PATH_ROW = 2u;       // vector loads, one row a workgroup
const uint PATH_SCALAR = 3u;    // rows not 16-byte aligned
const uint PATH_BATCHED = 4u;   // BATCHED

// XMERGE > 0: X holds the split-K partial outputs O [row][chunk][head_dim] of decode attention
// and XML their (m, l) [row][chunk], XMERGE chunks (src/kernels/attention.rs Partials); x
// element j of row r = j / head_dim is Σ_c O_c·exp(m_c − M) / Σ_c l_c·exp(m_c − M), M = max m_c,
// over the chunks with l_c > 0, and 0 where none has (attention_merge.comp without sinks). A
// 16-byte weight chunk's x elements lie in one row (head_dim is a multiple of PER_CHUNK), so
// each x chunk takes XMERGE (m, l) pairs and partial runs, loaded together. H100, Qwen3-0.6B at
// ctx 512 (5 chunks): attention's own merge (after a device-scope counter) cost 2.2 µs a layer,
// this one 1.4 (every workgroup merges all of x): 1196 → 1173 µs/token.
layout(constant_id = 9) const uint XMERGE = 0;
const uint XM = XMERGE > 0u ? XMERGE : 1u;   // array bound
const float NEG_FLOOR = -3.0e38;   // attention's (m) of a chunk with no visible position

// Engine mutants (src/kernels/layers.rs LayerMutant): 0 none.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_NORM_WEIGHT_IGNORED = 4;
const uint M_MERGE_NO_RESCALE = 6;   // XMERGE: sums the chunks without the exp(m_c − M) rescale

const uint MAX_ROWS = 8;           // rows per workgroup (host picks 1..=8)
const uint MAX_SUBGROUPS = 64;     // 256 / the smallest subgroup size we accept (4)
const uint FLAG_ACCUMULATE = 1u;
const uint FLAG_VEC = 2u;
const uint FLAG_NORM = 4u;
const uint FLAG_SWIGLU = 8u;

layout(set = 0, binding = 0) readonly buffer W0 { KV_T w0[]; };
layout(set = 0, binding = 0) readonly buffer W0v { uvec4 w0v[]; };
layout(set = 0, binding = 1) readonly buffer W1 { KV_T w1[]; };
layout(set = 0, binding = 1) readonly buffer W1v { uvec4 w1v[]; };
layout(set = 0, binding = 2) readonly buffer W2 { KV_T w2[]; };
layout(set = 0, binding = 2) readonly buffer W2v { uvec4 w2v[]; };
layout(set = 0, binding = 3) readonly buffer X { float x[]; };
layout(set = 0, binding = 3) readonly buffer Xv { vec4 xv[]; };
layout(set = 0, binding = 4) buffer Y0 { float y0[]; };
layout(set = 0, binding = 5) buffer Y1 { float y1[]; };
layout(set = 0, binding = 6) buffer Y2 { float y2[]; };
layout(set = 0, binding = 7) readonly buffer NW { KV_T nw[]; };
layout(set = 0, binding = 7) readonly buffer NWv { uvec4 nwv[]; };
layout(set = 0, binding = 8) readonly buffer XML { vec2 xml[]; };   // XMERGE: (m, l) [row][chunk]

layout(push_constant) uniform Push {
    uint rows0;
    uint rows1;
    uint rows2;
    uint cols;
    uint rows_per_wg;
    uint flags;
    float eps;
    uint head_dim;   // XMERGE: elements of a partials row
};

shared float partial[2 * MAX_ROWS + 1][MAX_SUBGROUPS];

#if defined(VARIANT_F32)
const uint PER_CHUNK = 4u;
#else
const uint PER_CHUNK = 8u;
#endif

// The PER_CHUNK weights of a 16-byte chunk, widened.
void widen(uvec4 v, out vec4 a, out vec4 b) {
#if defined(VARIANT_F32)
    a = uintBitsToFloat(v);
    b = vec4(0.0);
#elif defined(VARIANT_F16)
    a = vec4(unpackHalf2x16(v.x), unpackHalf2x16(v.y));
    b = vec4(unpackHalf2x16(v.z), unpackHalf2x16(v.w));
#else
    a = vec4(uintBitsToFloat(v.x << 16), uintBitsToFloat(v.x & 0xffff0000u),
             uintBitsToFloat(v.y << 16), uintBitsToFloat(v.y & 0xffff0000u));
    b = vec4(uintBitsToFloat(v.z << 16), uintBitsToFloat(v.z & 0xffff0000u),
             uintBitsToFloat(v.w << 16), uintBitsToFloat(v.w & 0xffff0000u));
#endif
}

float dot_chunk(uvec4 wv, vec4 xa, vec4 xb) {
    vec4 a, b;
    widen(wv, a, b);
#if defined(VARIANT_F32)
    return dot(a, xa);
#else
    return dot(a, xa) + dot(b, xb);
#endif
}

float acc[2 * MAX_ROWS];   // rows of the block; with SWIGLU, [MAX_ROWS..] are the up rows
float ss = 0.0;            // Σ x² over this invocation's columns (FLAG_NORM)

// x chunk c merged from the split-K partials (XMERGE > 0).
void merged_x(uint c, out vec4 xa, out vec4 xb) {
    uint e = c * PER_CHUNK;
    uint row = e / head_dim;
    uint d = e - row * head_dim;
    vec2 ml[XM];
    vec4 oa[XM];
    vec4 ob[XM];
    [[unroll]] for (uint k = 0; k < XMERGE; ++k) {
        uint part = row * XMERGE + k;
        uint at = (part * head_dim + d) / 4u;
        ml[k] = part < xml.length() ? xml[part] : vec2(NEG_FLOOR, 0.0);
        oa[k] = at < xv.length() ? xv[at] : vec4(0.0);
        ob[k] = PER_CHUNK == 8u && at + 1u < xv.length() ? xv[at + 1u] : vec4(0.0);
    }
    float M = NEG_FLOOR;
    [[unroll]] for (uint k = 0; k < XMERGE; ++k) {
        if (ml[k].y > 0.0) M = max(M, ml[k].x);
    }
    float L = 0.0;
    xa = vec4(0.0);
    xb = vec4(0.0);
    [[unroll]] for (uint k = 0; k < XMERGE; ++k) {
        float w = ml[k].y > 0.0 ? (MUTANT == M_MERGE_NO_RESCALE ? 1.0 : exp(ml[k].x - M)) : 0.0;
        L += ml[k].y * w;
        xa += oa[k] * w;
        xb += ob[k] * w;
    }
    float inv = L > 0.0 ? 1.0 / L : 0.0;
    xa *= inv;
    xb *= inv;
}

// x chunk c (and its square sum, and the norm weight), for the vector path.
void load_x(uint c, out vec4 xa, out vec4 xb, bool norm, bool count) {
    if (XMERGE > 0u) {
        merged_x(c, xa, xb);
    } else {
#if defined(VARIANT_F32)
        xa = xv[c];
        xb = vec4(0.0);
#else
        xa = xv[2u * c];
        xb = xv[2u * c + 1u];
#endif
    }
    if (norm) {
        if (count) ss += dot(xa, xa) + dot(xb, xb);
        if (MUTANT != M_NORM_WEIGHT_IGNORED) {
            vec4 na, nb;
            widen(nwv[c], na, nb);
            xa *= na;
            xb *= nb;
        }
    }
}

float load_x1(uint c, bool norm, bool count) {
    float v = x[c];
    if (norm) {
        if (count) ss += v * v;
        if (MUTANT != M_NORM_WEIGHT_IGNORED) v *= kv_load(uint(nw[c]));
    }
    return v;
}

// The per-row dot products of rows row0.. of one weight buffer, into acc[base..]. With vector
// loads, one row per workgroup (long rows; shorter ones take the batched path), four chunks per
// iteration, loads first, so each invocation keeps four weight loads in flight. Scalar loads
// (rows not 16-byte aligned) take any number of rows.
#define ROWS_DOT(WV, WS, base, count)                                                       \
    if ((PATH == PATH_ANY || PATH == PATH_ROW) && vec && n_rows == 1u) {                    \
        uint c = tid;                                                                       \
        uint row_base = row0 * chunks;                                                      \
        for (; c + 3u * WG < chunks; c += 4u * WG) {                                        \
            uvec4 q0 = WV[row_base + c], q1 = WV[row_base + c + WG];                        \
            uvec4 q2 = WV[row_base + c + 2u * WG], q3 = WV[row_base + c + 3u * WG];         \
            vec4 xa, xb;                                                                    \
            load_x(c, xa, xb, norm, count);                                                 \
            float s = dot_chunk(q0, xa, xb);                                                \
            load_x(c + WG, xa, xb, norm, count);                                            \
            s += dot_chunk(q1, xa, xb);                                                     \
            load_x(c + 2u * WG, xa, xb, norm, count);                                       \
            s += dot_chunk(q2, xa, xb);                                                     \
            load_x(c + 3u * WG, xa, xb, norm, count);                                       \
            acc[base] += s + dot_chunk(q3, xa, xb);                                         \
        }                                                                                   \
        for (; c < chunks; c += WG) {                                                       \
            vec4 xa, xb;                                                                    \
            load_x(c, xa, xb, norm, count);                                                 \
            acc[base] += dot_chunk(WV[row_base + c], xa, xb);                               \
        }                                                                                   \
    } else if (PATH == PATH_ANY || PATH == PATH_SCALAR) {                                   \
        for (uint c = tid; c < cols; c += WG) {                                             \
            float xc = load_x1(c, norm, count);                                             \
            [[unroll]] for (uint r = 0; r < MAX_ROWS; r++) {                                \
                if (r < n_rows) acc[base + r] += kv_load(uint(WS[(row0 + r) * cols + c])) * xc; \
            }                                                                               \
        }                                                                                   \
    }

// The vector path, into acc[0..] (and acc[MAX_ROWS..] for the second matrix WB when MATS = 2):
// each invocation issues all the weight loads of a batch of PER_BATCH chunk columns × ROWS rows
// × MATS matrices before it multiplies any of them, so it waits for memory once a batch rather
// than once a loop iteration. Indices past the rows or the chunks are clamped (their loads issue
// with the others) and their products dropped. Fully unrolled, this is large code, so its
// pipelines hold nothing else (PATH_BATCHED): the host picks it for the LM head and for rows that
// fit the workgroup (src/kernels/layers.rs matvec_shape).
#define ROWS_DOT_VEC(WA, WB)                                                                \
    for (uint b = 0u; b < BATCHES; b++) {                                                   \
        uvec4 w[MAX_LOADS];                                                                 \
        [[unroll]] for (uint i = 0u; i < PER_BATCH; i++) {                                  \
            uint c = min((b * PER_BATCH + i) * WG + tid, chunks - 1u);                      \
            [[unroll]] for (uint r = 0u; r < ROWS; r++) {                                   \
                uint at = min(row0 + r, rows - 1u) * chunks + c;                            \
                w[(i * ROWS + r) * MATS] = WA[at];                                          \
                if (MATS == 2u) w[(i * ROWS + r) * MATS + 1u] = WB[at];                     \
            }                                                                               \
        }                                                                                   \
        [[unroll]] for (uint i = 0u; i < PER_BATCH; i++) {                                  \
            uint c = (b * PER_BATCH + i) * WG + tid;                                        \
            if (c < chunks) {                                                               \
                vec4 xa, xb;                                                                \
                load_x(c, xa, xb, norm, true);                                              \
                [[unroll]] for (uint r = 0u; r < ROWS; r++) {                               \
                    [[unroll]] for (uint m = 0u; m < MATS; m++) {                           \
                        acc[m * MAX_ROWS + r] += dot_chunk(w[(i * ROWS + r) * MATS + m], xa, xb); \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

// The batched path's ROWS·MATS per-row sums, padded to a power of two SUMS (≤ 16).
const uint NSUMS = ROWS * MATS;
const uint SUMS = NSUMS <= 1u ? 1u : (NSUMS <= 2u ? 2u : (NSUMS <= 4u ? 4u : (NSUMS <= 8u ? 8u : 16u)));

// The batched path's subgroup sums of acc, into partial[row][subgroup], by reduce-scatter: at
// each step lanes l and l ^ h (h = SUMS/2 .. 1) swap halves of the sums they hold and add, so
// after log2(SUMS) steps lane l holds one sum, of index l mod SUMS, over the SUMS lanes that
// differ in those bits; the rest of the subgroup adds in log2(size/SUMS) more. For 8 sums on 32
// lanes that is 9 shuffles where a subgroupAdd per sum takes 40. H100, Qwen3-0.6B step at ctx
// 512: 1172 → 1097 µs/token (a build without any reduction, wrong but timed, took 1064; one
// that kept the subgroupAdds and left out the shared-memory stage, 1149). The steps are written
// out per literal h: written as a loop over h (v indexed by it, probably out of registers) the
// step took 1309.
void reduce_scatter() {
    float v[16];
    [[unroll]] for (uint i = 0u; i < 16u; i++) {
        v[i] = i < NSUMS ? acc[(i / ROWS) * MAX_ROWS + i % ROWS] : 0.0;
    }
    uint lane = gl_SubgroupInvocationID;
    // One step per literal h, so every index is a constant and v stays in registers.
#define SCATTER_STEP(h)                                                  \
    if (h < SUMS) {                                                      \
        bool upper = (lane & h) != 0u;                                   \
        [[unroll]] for (uint i = 0u; i < h; i++) {                       \
            float keep = upper ? v[i + h] : v[i];                        \
            float send = upper ? v[i] : v[i + h];                        \
            v[i] = keep + subgroupShuffleXor(send, h);                   \
        }                                                                \
    }
    SCATTER_STEP(8u)
    SCATTER_STEP(4u)
    SCATTER_STEP(2u)
    SCATTER_STEP(1u)
#undef SCATTER_STEP
    for (uint o = SUMS; o < gl_SubgroupSize; o *= 2u) v[0] += subgroupShuffleXor(v[0], o);
    if (lane < NSUMS) partial[(lane / ROWS) * MAX_ROWS + lane % ROWS][gl_SubgroupID] = v[0];
}

void main() {
    uint wg = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    bool swiglu = (flags & FLAG_SWIGLU) != 0u;
    bool vec = (flags & FLAG_VEC) != 0u;
    bool norm = (flags & FLAG_NORM) != 0u;
    uint blocks0 = (rows0 + rows_per_wg - 1u) / rows_per_wg;
    uint blocks1 = swiglu ? 0u : (rows1 + rows_per_wg - 1u) / rows_per_wg;
    uint blocks2 = swiglu ? 0u : (rows2 + rows_per_wg - 1u) / rows_per_wg;
    // Which matrix and rows this workgroup serves (uniform per workgroup, so no barrier is
    // skipped by part of it).
    uint m, rows;
    if (wg < blocks0) { m = 0u; rows = rows0; }
    else if (wg < blocks0 + blocks1) { m = 1u; rows = rows1; wg -= blocks0; }
    else if (wg < blocks0 + blocks1 + blocks2) { m = 2u; rows = rows2; wg -= blocks0 + blocks1; }
    else return;
    uint row0 = wg * rows_per_wg;
    uint n_rows = min(rows_per_wg, rows - row0);
    uint tid = gl_LocalInvocationID.x;
    uint chunks = cols / PER_CHUNK;

    // FLAG_ACCUMULATE: the old value is loaded now, so its latency overlaps the products rather
    // than following the reduction (only this invocation writes the element).
    bool add = (flags & FLAG_ACCUMULATE) != 0u;
    float y_old = 0.0;
    if (add && tid < n_rows) {
        uint row = row0 + tid;
        y_old = m == 0u ? y0[row] : (m == 1u ? y1[row] : y2[row]);
    }

    [[unroll]] for (uint r = 0; r < 2 * MAX_ROWS; r++) acc[r] = 0.0;
    if (BATCHED && vec) {
        if (m == 0u) {
            ROWS_DOT_VEC(w0v, w1v)   // with SWIGLU, MATS = 2: gate and up
        } else if (NMATS != 1u && MATS == 1u && m == 1u) {
            ROWS_DOT_VEC(w1v, w1v)
        } else if ((NMATS == 0u || NMATS == 3u) && MATS == 1u) {
            ROWS_DOT_VEC(w2v, w2v)
        }
    } else if (m == 0u) {
        ROWS_DOT(w0v, w0, 0, true)
        if ((NMATS == 0u || NMATS == 2u) && swiglu) {
            ROWS_DOT(w1v, w1, MAX_ROWS, false)   // x² was summed in the gate pass
        }
    } else if (NMATS != 1u && m == 1u) {
        ROWS_DOT(w1v, w1, 0, true)
    } else if (NMATS == 0u || NMATS == 3u) {
        ROWS_DOT(w2v, w2, 0, true)
    }

    if (BATCHED && vec && SUMS <= gl_SubgroupSize) {
        reduce_scatter();
    } else {
        [[unroll]] for (uint r = 0; r < 2 * MAX_ROWS; r++) {
            if (r % MAX_ROWS < n_rows && (r < MAX_ROWS || swiglu)) {
                float s = subgroupAdd(acc[r]);
                if (gl_SubgroupInvocationID == 0u) partial[r][gl_SubgroupID] = s;
            }
        }
    }
    if (norm) {
        float s2 = subgroupAdd(ss);
        if (gl_SubgroupInvocationID == 0u) partial[2 * MAX_ROWS][gl_SubgroupID] = s2;
    }
    barrier();
    if (tid >= n_rows) return;
    float dot0 = 0.0, dot1 = 0.0, total_ss = 0.0;
    for (uint g = 0; g < gl_NumSubgroups; g++) {
        dot0 += partial[tid][g];
        dot1 += partial[MAX_ROWS + tid][g];
        total_ss += partial[2 * MAX_ROWS][g];
    }
    if ((flags & FLAG_NORM) != 0u) {
        float r = inversesqrt(total_ss / float(cols) + eps);
        dot0 *= r;
        dot1 *= r;
    }
    uint row = row0 + tid;
    float result = swiglu ? dot0 / (1.0 + exp(-dot0)) * dot1 : dot0;
    result += y_old;
    if (m == 0u) y0[row] = result;
    else if (m == 1u) y1[row] = result;
    else y2[row] = result;
}
