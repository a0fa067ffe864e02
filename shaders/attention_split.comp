#version 450
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_arithmetic : require
// variants: f32 f16 bf16 q8_0 f32_fused f16_fused bf16_fused f32_fused_qk f16_fused_qk bf16_fused_qk
//
// Decode attention, split-K flash-decoding, the split pass. One workgroup per (chunk × block of up
// to HPW query heads of one GQA group, kv head, query token × sequence): the block's heads share
// every K/V element the workgroup reads, so with HPW ≥ the GQA ratio each K/V element of a chunk
// comes from memory once. Blocks of one chunk are adjacent in x, so with several blocks per kv
// head the later reads of a K/V element tend to hit L2.
//
// Layout: LANES invocations (a power of two dividing the subgroup, so a row never straddles a
// subgroup) share one K/V row, each holding CPL runs of 8 dims (lane l: dims (c·LANES + l)·8 ..
// +7), so a row is read with 16-byte loads, consecutive lanes on consecutive bytes. The workgroup
// has SLOTS = WG / LANES such row slots. Each slot walks its own positions of the chunk, NP per
// step; the loads of step i + 1 are issued before the arithmetic of step i (software pipelining,
// so a workgroup pays memory latency about once, not once per step), and loads carry no branch
// (positions past the range clamp to its last row and are zeroed). Each slot keeps its own online
// softmax per head:
//   scores: per-lane partial dots with q (held in registers), summed over the slot's lanes by a
//           shuffle-xor butterfly, so every lane has every score; no shared memory, no barrier;
//   softmax: running max m (finite floor), sum l, rescale alpha, per head, in every lane;
//   P·V:    acc[head][own dims] = alpha·acc + Σ p·v, with the V rows loaded beside the K rows.
// At the end the slots' (acc, m, l) are combined by log-sum-exp through shared memory (the only
// barriers), and the workgroup writes its partial (O, m, l) per head. With few chunks
// (FLAG_MERGE_HERE), the last workgroup of each group of chunks merges them (a device-scope
// counter: no second dispatch, no barrier); otherwise attention_merge.comp does, in parallel,
// or the consumer (the engine's o_proj: matvec.comp XMERGE).
// With a single chunk it writes the normalised output directly, sinks included.
// LANES, CPL, HPW, NP and WG are specialization constants (src/kernels/attention.rs picks them
// from the head dim, the GQA ratio and the device's subgroup size) so the loops unroll and the
// per-lane arrays stay in registers.
//
// Positions past the query are never read, so garbage there cannot leak; a chunk with no visible
// position writes (0, NEG_FLOOR, 0), and a row with none at all ends as 0. Options: sliding
// window, logit softcap, attention sinks. Fused variants append the step's new K/V (the last
// n_queries positions of each sequence) in the same dispatch: every workgroup takes those
// positions from the new_k/new_v inputs, rounded as the cache stores them, and never reads the
// slots being written, so no barrier is needed; one workgroup per (sequence, token, kv head)
// writes them. The *_fused_qk variants (one query per sequence: the Qwen3 engine) take q and
// the new K raw, and every workgroup first applies Qwen3's per-head RMSNorm (f32 weights
// q_norm/k_norm) and rotate_half RoPE (host cos/sin per position and pair) to its query heads and
// to the new K row, through shared memory, so no separate dispatch and barrier precede attention.
// Loops are bounded by the chunk: lavapipe's shader compiler silently stops a loop
// after 65535 iterations. Bindings and push constants mirror src/kernels/attention.rs.
//
// PAGED (a specialization constant, so contiguous pipelines fold it away): the caches are a page
// pool (stride_seq is the page stride, capacity a sequence's) and position pos of sequence b lives
// in page block_tables[b][pos / page_size], slot pos % page_size, looked up per row in the same
// loads (chunks may start and end anywhere in a page). The host validates the tables; an entry
// past the table or a page outside the pool reads as a row of zeros and is never written.
//
// Q8_0 (not fused): rows are ggml q8_0 blocks, 2-byte aligned, so every row takes the scalar
// path (VEC off): a lane's run of 8 dims is 4 16-bit words of int8 pairs plus its block's f16
// scale, dequantized qs·d in f32 (exact).

#if defined(VARIANT_F32_FUSED_QK)
#define VARIANT_F32
#define FUSED
#define QK_NORM_ROPE
#elif defined(VARIANT_F16_FUSED_QK)
#define VARIANT_F16
#define FUSED
#define QK_NORM_ROPE
#elif defined(VARIANT_BF16_FUSED_QK)
#define VARIANT_BF16
#define FUSED
#define QK_NORM_ROPE
#elif defined(VARIANT_F32_FUSED)
#define VARIANT_F32
#define FUSED
#elif defined(VARIANT_F16_FUSED)
#define VARIANT_F16
#define FUSED
#elif defined(VARIANT_BF16_FUSED)
#define VARIANT_BF16
#define FUSED
#endif
#include "kv_types.glsl"

const float NEG_FLOOR = -3.0e38;   // finite: -inf would make exp(m - m_new) NaN on the first step
const uint O_CAP = 4096;           // floats of the slot-combine buffer: SLOTS · DMAX ≤ this
const uint ML_CAP = 512;           // SLOTS · HPW ≤ this

// Mutants (src/kernels/attention.rs): 0 none.
layout(constant_id = 0) const uint MUTANT = 0;
const uint M_CAUSAL_OFF_BY_ONE = 1;
const uint M_GQA_MODULO = 2;
const uint M_NO_MAX_SUBTRACT = 3;
const uint M_F16_ACCUMULATE = 4;
const uint M_V_MISREAD = 5;
const uint M_FUSED_READS_CACHE = 7;   // reads the new tokens from the slots being written
const uint M_CHUNK_OVERLAP = 8;       // each chunk runs one position into the next
const uint M_INTERLEAVED_ROPE = 9;    // _qk variants: rotates neighbours (2i, 2i+1)
const uint M_SKIP_QK_NORM = 10;       // _qk variants: RoPE without the norm
const uint M_PAGE_INDEX_OFF_BY_ONE = 11;     // paged: reads rows from the next page of the table
const uint M_PAGE_SIZE_WRONG_CONSTANT = 12;  // paged: splits positions by 16, not the page size
const uint M_Q8_NEIGHBOUR_SCALE = 13;        // q8_0: the next block's scale

layout(constant_id = 1) const uint LANES = 16;   // invocations per K/V row (power of two)
layout(constant_id = 2) const uint CPL = 1;      // runs of 8 dims per lane: head_dim ≤ 8·CPL·LANES
layout(constant_id = 3) const uint HPW = 4;      // query heads per workgroup (block)
layout(constant_id = 4) const uint NP = 2;       // positions per slot per step
layout(constant_id = 5) const bool VEC = true;   // rows start 16-byte aligned: vector loads
layout(local_size_x_id = 6) in;                  // WG = LANES · SLOTS
const uint WG = gl_WorkGroupSize.x;
const uint SLOTS = WG / LANES;
const uint Q4 = CPL * 2;                         // vec4s per lane per row
const uint DMAX = 8u * CPL * LANES;              // head_dim ≤ this: o_s's row stride
const uint HR = O_CAP / (SLOTS * DMAX) > 0u ? O_CAP / (SLOTS * DMAX) : 1u;   // heads per combine round
const uint RAW_MAX = ((HPW + 1u) * DMAX + WG - 1u) / WG;   // raw q/k values an invocation loads (_qk)
#if defined(VARIANT_F32)
const uint WPR = 2;                              // 16-byte words per run of 8 elements
#else
const uint WPR = 1;
#endif

const uint FLAG_SINKS = 1u;
const uint M_MERGE_NO_RESCALE = 6;   // merges chunks without the exp(m_c − M) rescale
const uint FLAG_MERGE_HERE = 2u;   // the last workgroup of each group merges (few chunks)
// Chunks the merge unrolls, ≥ the chunk count (the host's SplitLaunch::merge_unroll).
layout(constant_id = 7) const uint MERGE_MAX = 4;
layout(constant_id = 8) const bool PAGED = false;   // a page pool through block tables
const uint MAX_D = 256;            // head_dim ≤ this (checked on the host)
const uint CHUNK_TILE = 64;        // chunks are whole multiples of this (the host's CHUNK_TILE)
#if defined(QK_NORM_ROPE)
const uint KNEW = MAX_D;
#else
const uint KNEW = 8;
#endif

layout(push_constant) uniform Params {
    uint n_queries;
    uint n_q_heads;
    uint n_kv_heads;
    uint head_dim;
    uint stride_seq;
    uint stride_head;
    uint stride_pos;
    uint capacity;
    float scale;
    uint n_seqs;
    uint chunk;      // positions per chunk
    uint n_chunks;   // 1: write the output directly
    uint window;     // sliding window in positions; 0: none
    float softcap;   // 0: none
    uint flags;      // FLAG_SINKS
    float eps;       // the q/k RMSNorm epsilon (_qk variants)
    uint page_size;       // PAGED: positions per page,
    uint pages_per_seq;   // block table entries per sequence,
    uint n_pages;         // and pages in the pool
} p;

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer SeqLens { uint seq_lens[]; };
#if defined(FUSED)
layout(std430, binding = 2) buffer KCache { KV_T k_cache[]; };
layout(std430, binding = 3) buffer VCache { KV_T v_cache[]; };
#else
layout(std430, binding = 2) readonly buffer KCache { KV_T k_cache[]; };
layout(std430, binding = 3) readonly buffer VCache { KV_T v_cache[]; };
#endif
// The same caches seen as 16-byte words, for the wide loads.
layout(std430, binding = 2) readonly buffer KCache4 { uvec4 k4[]; };
layout(std430, binding = 3) readonly buffer VCache4 { uvec4 v4[]; };
layout(std430, binding = 4) writeonly buffer Out { float o[]; };
// Partials are coherent: one workgroup's writes are read by the group's last workgroup.
layout(std430, binding = 5) coherent buffer PartialO { float part_o[]; };   // [row][chunk][D]
layout(std430, binding = 6) coherent buffer PartialML { vec2 part_ml[]; }; // [row][chunk] (m, l)
layout(std430, binding = 7) readonly buffer Sinks { float sinks[]; };        // [n_q_heads]
layout(std430, binding = 8) readonly buffer NewK { uint new_k[]; };          // [B][n_queries][Hkv][D] f32
layout(std430, binding = 9) readonly buffer NewV { uint new_v[]; };
layout(std430, binding = 8) readonly buffer NewK4 { uvec4 new_k4[]; };
layout(std430, binding = 9) readonly buffer NewV4 { uvec4 new_v4[]; };
layout(std430, binding = 10) readonly buffer QNorm { float q_norm[]; };   // [D] (_qk variants)
layout(std430, binding = 11) readonly buffer KNorm { float k_norm[]; };   // [D]
layout(std430, binding = 12) readonly buffer Rope { vec2 rope[]; };       // [capacity][D/2] (cos, sin)
// Chunks counted per group of workgroups sharing output rows; zero between calls.
layout(std430, binding = 13) coherent buffer Counters { uint counters[]; };
layout(std430, binding = 14) readonly buffer BlockTables { uint block_tables[]; };   // [B][pages_per_seq]

shared float o_s[O_CAP];     // [head of the round][slot][DMAX]
shared float m_s[ML_CAP];    // [slot][head]
shared float l_s[ML_CAP];
shared float w_s[ML_CAP];    // [slot][head] exp(m_s − M)
shared float mm_s[HPW];      // the workgroup's max m per head
shared bool last_s;          // this workgroup counted its group's last chunk
shared float knew_s[KNEW];   // _qk variants: the new K row, normalised and rotated
#if defined(FUSED)
// Fused variants: up to NEW_ROWS new rows of this workgroup's range, rounded and packed as the
// cache stores them ([row][run of 8][word]), so the main loop's fetch takes them from here and
// one loop serves cache and new rows. (A separate pass over the new rows through the inputs
// added 6.6 µs to every call on the H100: a large block of code run once, cold in the
// instruction cache.) Ranges with more new rows (multi-query) take that pass instead.
const uint NEW_ROWS = 2;   // the host's NEW_ROWS_IN_SHARED
shared uvec4 knew_w[NEW_ROWS * (MAX_D / 8u) * WPR];
shared uvec4 vnew_w[NEW_ROWS * (MAX_D / 8u) * WPR];
uint new_from = 0xffffffffu;   // first row of the range taken from knew_w/vnew_w
#else
const uint new_from = 0xffffffffu;
#endif

#if defined(FUSED)
const bool FUSED_MODE = true;
#else
const bool FUSED_MODE = false;
#endif
const uint NONE = 0xffffffffu;
// The *_fused_qk variants: q and the new K arrive raw (a separate variant, so the prologue's
// code and registers stay out of the others).
#if defined(QK_NORM_ROPE)
const bool qk_rope = true;
#else
const bool qk_rope = false;
#endif

// Start of position j's new K/V row in new_k/new_v (fused mode, j >= first_new), else NONE.
uint new_row(uint b, uint kvh, uint j, uint first_new) {
    if (!FUSED_MODE || j < first_new || MUTANT == M_FUSED_READS_CACHE) return NONE;
    return ((b * p.n_queries + (j - first_new)) * p.n_kv_heads + kvh) * p.head_dim;
}

// Element offset of sequence b's row `row`, kv_base being its kv head's offset within the
// sequence (or, PAGED, within a page); PAGED: NONE where the table entry is missing or names a page
// outside the pool. `reads` applies the paging mutants (the fused write stays correct).
uint row_offset(uint kv_base, uint b, uint row, bool reads) {
    if (!PAGED) return kv_base + row * p.stride_pos;
    uint ps = reads && MUTANT == M_PAGE_SIZE_WRONG_CONSTANT ? 16u : p.page_size;
    uint i = row / ps;
    uint slot = row - i * ps;
    if (reads && MUTANT == M_PAGE_INDEX_OFF_BY_ONE && i + 1u < p.pages_per_seq) i += 1u;
    uint e = b * p.pages_per_seq + i;
    uint page = i < p.pages_per_seq && e < block_tables.length() ? block_tables[e] : NONE;
    return page < p.n_pages ? page * p.stride_seq + kv_base + slot * p.stride_pos : NONE;
}

// The 16-byte word of element dc of a row at off; PAGED rows at NONE take an index past both
// caches, so their guarded loads give zeros.
uint word_index(uint off, uint dc) {
    return PAGED && off == NONE ? max(k4.length(), v4.length()) : (off + dc) / (8u / WPR);
}

// 8 f32 inputs (bits) rounded as the cache stores them, then widened.
vec4 round4(uvec4 w) {
    return vec4(kv_load(kv_store(w.x, false)), kv_load(kv_store(w.y, false)), kv_load(kv_store(w.z, false)),
                kv_load(kv_store(w.w, false)));
}

// 8 new-token elements from element e (a multiple of 4: head dims are multiples of 8).
// In the _qk variants K comes from knew_s (dc: the element's dim; one new token).
void load_new8(uint e, uint dc, out vec4 k0, out vec4 k1, out vec4 v0, out vec4 v1) {
    uint i = e / 4u;
    if (qk_rope) {
        uint j = min(dc, KNEW - 8u);
        k0 = round4(floatBitsToUint(vec4(knew_s[j], knew_s[j + 1u], knew_s[j + 2u], knew_s[j + 3u])));
        k1 = round4(floatBitsToUint(vec4(knew_s[j + 4u], knew_s[j + 5u], knew_s[j + 6u], knew_s[j + 7u])));
    } else {
        k0 = i < new_k4.length() ? round4(new_k4[i]) : vec4(0.0);
        k1 = i + 1u < new_k4.length() ? round4(new_k4[i + 1u]) : vec4(0.0);
    }
    v0 = i < new_v4.length() ? round4(new_v4[i]) : vec4(0.0);
    v1 = i + 1u < new_v4.length() ? round4(new_v4[i + 1u]) : vec4(0.0);
}

// The _qk prologue's pair j (of rows × D/2: row j / half_d, the query heads then the new K row):
// its two norm weights and its (cos, sin) at table offset at.
void pair_consts(uint j, uint nh, uint half_d, uint at, out float w0, out float w1, out vec2 cs) {
    uint r = j / half_d;
    uint i = j - r * half_d;
    uint i0 = MUTANT == M_INTERLEAVED_ROPE ? 2u * i : i;
    uint i1 = MUTANT == M_INTERLEAVED_ROPE ? 2u * i + 1u : i + half_d;
    bool is_q = r < nh;
    w0 = is_q ? (i0 < q_norm.length() ? q_norm[i0] : 0.0) : (i0 < k_norm.length() ? k_norm[i0] : 0.0);
    w1 = is_q ? (i1 < q_norm.length() ? q_norm[i1] : 0.0) : (i1 < k_norm.length() ? k_norm[i1] : 0.0);
    cs = at + i < rope.length() ? rope[at + i] : vec2(0.0);
}

float v_elem(uint x) {
    return MUTANT == M_V_MISREAD ? kv_load_misread(x) : kv_load(x);
}

#if defined(VARIANT_Q8_0)
// 16-bit word i of the K or V cache, 0 past its end.
uint q8_word(bool is_v, uint i) {
    if (is_v) return i < v_cache.length() ? uint(v_cache[i]) : 0u;
    return i < k_cache.length() ? uint(k_cache[i]) : 0u;
}

// f16 bits to f32 in integer arithmetic (subnormal scales too, whatever the driver's denormals).
float q8_f16_to_f32(uint h) {
    uint sign = (h & 0x8000u) << 16;
    uint e = (h >> 10) & 0x1fu;
    uint m = h & 0x3ffu;
    if (e == 0u) return uintBitsToFloat(sign) + (sign != 0u ? -1.0 : 1.0) * float(m) * uintBitsToFloat(0x33800000u);
    if (e == 31u) return uintBitsToFloat(sign | 0x7f800000u | (m << 13));
    return uintBitsToFloat(sign | ((e + 112u) << 23) | (m << 13));
}

// Dims e .. e + 7 of a q8_0 cache (a run never straddles a block: 8 divides 32); NONE: zeros.
void q8_load8(bool is_v, uint e, out vec4 lo, out vec4 hi) {
    lo = vec4(0.0);
    hi = vec4(0.0);
    if (e == NONE) return;
    uint n = is_v ? v_cache.length() : k_cache.length();
    uint w0 = e / QK8_0 * Q8_WORDS;
    uint sw = MUTANT == M_Q8_NEIGHBOUR_SCALE && w0 + 2u * Q8_WORDS <= n ? w0 + Q8_WORDS : w0;
    uint wq = w0 + 1u + (e % QK8_0) / 2u;
    if (wq + 3u >= n) return;
    float d = q8_f16_to_f32(q8_word(is_v, sw));
    lo = vec4(q8_pair(q8_word(is_v, wq), d), q8_pair(q8_word(is_v, wq + 1u), d));
    hi = vec4(q8_pair(q8_word(is_v, wq + 2u), d), q8_pair(q8_word(is_v, wq + 3u), d));
}
#endif

// 8 cache elements of K and of V from element e, one at a time (rows not 16-byte aligned).
void load_scalar8(uint e, out vec4 k0, out vec4 k1, out vec4 v0, out vec4 v1) {
#if defined(VARIANT_Q8_0)
    q8_load8(false, e, k0, k1);
    q8_load8(true, e, v0, v1);
    return;
#endif
    float kf[8], vf[8];
    [[unroll]] for (uint u = 0; u < 8u; ++u) {
        uint idx = e + u;
        kf[u] = idx < k_cache.length() ? kv_load(uint(k_cache[idx])) : 0.0;
        vf[u] = idx < v_cache.length() ? v_elem(uint(v_cache[idx])) : 0.0;
    }
    k0 = vec4(kf[0], kf[1], kf[2], kf[3]);
    k1 = vec4(kf[4], kf[5], kf[6], kf[7]);
    v0 = vec4(vf[0], vf[1], vf[2], vf[3]);
    v1 = vec4(vf[4], vf[5], vf[6], vf[7]);
}

// The 8 elements of a run of K and of V, held in WPR 16-byte words each (ka, kb; va, vb), widened.
void widen8(uvec4 ka, uvec4 kb, uvec4 va, uvec4 vb, out vec4 k0, out vec4 k1, out vec4 v0, out vec4 v1) {
#if defined(VARIANT_F32)
    k0 = uintBitsToFloat(ka);
    k1 = uintBitsToFloat(kb);
    if (MUTANT == M_V_MISREAD) {
        va &= 0xffff0000u;
        vb &= 0xffff0000u;
    }
    v0 = uintBitsToFloat(va);
    v1 = uintBitsToFloat(vb);
#else
    uvec4 kw = ka, vw = va;
    k0 = vec4(kv_unpack2(kw.x), kv_unpack2(kw.y));
    k1 = vec4(kv_unpack2(kw.z), kv_unpack2(kw.w));
    if (MUTANT == M_V_MISREAD) {
        v0 = vec4(kv_unpack2_misread(vw.x), kv_unpack2_misread(vw.y));
        v1 = vec4(kv_unpack2_misread(vw.z), kv_unpack2_misread(vw.w));
    } else {
        v0 = vec4(kv_unpack2(vw.x), kv_unpack2(vw.y));
        v1 = vec4(kv_unpack2(vw.z), kv_unpack2(vw.w));
    }
#endif
}

// The running state of this invocation: its dims of each head's query and output accumulator,
// and its slot's softmax max and sum per head.
vec4 qv[HPW * Q4];   // [head][run][half]
vec4 acc[HPW * Q4];
float m_run[HPW];
float l_run[HPW];

// The 16-byte words of one step's K/V runs (the VEC cache path): those the step being computed
// uses, and those of the next step, fetched before the current one is computed so that memory
// latency overlaps the arithmetic.
const uint NR = NP * CPL * WPR;
uvec4 k_cur[NR];
uvec4 v_cur[NR];
uvec4 k_next[NR];
uvec4 v_next[NR];

// Every load reads a row in the attended range: invalid positions clamp to lim − 1 and idle
// lanes to the row's last run; their values are zeroed before use, so the loads need no branch.
uint clamped_row(uint base, uint n, uint lim, uint slot) {
    return min(base + n * SLOTS + slot, lim - 1u);
}

#if defined(FUSED)
// fetch for a step that holds new rows: those come from knew_w/vnew_w, never from their slots
// (their global loads are pushed out of range, so not issued), by select, so a step's loads
// stay together.
void fetch_new(uint base, uint lim, uint kv_base, uint b, uint lane, uint slot) {
    uint D = p.head_dim;
    [[unroll]] for (uint n = 0; n < NP; ++n) {
        uint row = clamped_row(base, n, lim, slot);
        bool is_new = row >= new_from;
        uint off = row_offset(kv_base, b, row, true);
        [[unroll]] for (uint cr = 0; cr < CPL; ++cr) {
            uint dc = min((cr * LANES + lane) * 8u, D - 8u);
            uint i = is_new ? max(k4.length(), v4.length()) : word_index(off, dc);
            uint at = min(((row - new_from) * (MAX_D / 8u) + dc / 8u) * WPR, (NEW_ROWS * (MAX_D / 8u) - 1u) * WPR);
            uint w = (n * CPL + cr) * WPR;
            [[unroll]] for (uint u = 0; u < WPR; ++u) {
                uvec4 kc = i + u < k4.length() ? k4[i + u] : uvec4(0u);
                uvec4 vc = i + u < v4.length() ? v4[i + u] : uvec4(0u);
                k_next[w + u] = is_new ? knew_w[at + u] : kc;
                v_next[w + u] = is_new ? vnew_w[at + u] : vc;
            }
        }
    }
}
#endif

// Issues the cache loads of the step at base into k_next/v_next.
void fetch_cache(uint base, uint lim, uint kv_base, uint b, uint lane, uint slot) {
    uint D = p.head_dim;
    [[unroll]] for (uint n = 0; n < NP; ++n) {
        uint off = row_offset(kv_base, b, clamped_row(base, n, lim, slot), true);
        [[unroll]] for (uint cr = 0; cr < CPL; ++cr) {
            uint dc = min((cr * LANES + lane) * 8u, D - 8u);
            uint i = word_index(off, dc);   // 16-byte word of the run's first element
            uint w = (n * CPL + cr) * WPR;
            [[unroll]] for (uint u = 0; u < WPR; ++u) {
                k_next[w + u] = i + u < k4.length() ? k4[i + u] : uvec4(0u);
                v_next[w + u] = i + u < v4.length() ? v4[i + u] : uvec4(0u);
            }
        }
    }
}

// Issues the loads of the step at base into k_next/v_next.
void fetch(uint base, uint lim, uint kv_base, uint b, uint lane, uint slot) {
#if defined(FUSED)
    if (base + NP * SLOTS > new_from) {   // uniform: a step with new rows (the last)
        fetch_new(base, lim, kv_base, b, lane, slot);
        return;
    }
#endif
    fetch_cache(base, lim, kv_base, b, lane, slot);
}

const uint FROM_WORDS = 0u;    // k_cur/v_cur (VEC cache rows)
const uint FROM_SCALAR = 1u;   // cache rows one element at a time
const uint FROM_NEW = 2u;      // the new tokens' inputs (fused)

// One step of a slot: positions base + n·SLOTS + slot (n < NP), those below lim valid.
void step(uint base, uint lim, uint from, uint kv_base, uint lane, uint slot, uint b, uint kvh, uint first_new) {
    uint D = p.head_dim;
    vec4 kf[NP * Q4];
    vec4 vf[NP * Q4];
    bool ok[NP];
    [[unroll]] for (uint n = 0; n < NP; ++n) {
        ok[n] = base + n * SLOTS + slot < lim;
        uint jc = clamped_row(base, n, lim, slot);
        uint off = from == FROM_SCALAR ? row_offset(kv_base, b, jc, true) : 0u;
        [[unroll]] for (uint cr = 0; cr < CPL; ++cr) {
            uint dc = min((cr * LANES + lane) * 8u, D - 8u);
            uint ri = n * Q4 + 2u * cr;
            if (from == FROM_NEW) {   // uniform
                uint nrow = ((b * p.n_queries + (jc - first_new)) * p.n_kv_heads + kvh) * D;
                load_new8(nrow + dc, dc, kf[ri], kf[ri + 1u], vf[ri], vf[ri + 1u]);
            } else if (from == FROM_SCALAR) {
                // PAGED rows at NONE: an index past both caches, so the guarded loads give zeros.
#if defined(VARIANT_Q8_0)
                uint e = PAGED && off == NONE ? NONE : off + dc;
#else
                uint e = PAGED && off == NONE ? max(k_cache.length(), v_cache.length()) : off + dc;
#endif
                load_scalar8(e, kf[ri], kf[ri + 1u], vf[ri], vf[ri + 1u]);
            } else {
                uint w = (n * CPL + cr) * WPR;
                widen8(k_cur[w], k_cur[w + WPR - 1u], v_cur[w], v_cur[w + WPR - 1u], kf[ri], kf[ri + 1u], vf[ri],
                       vf[ri + 1u]);
            }
        }
    }
    [[unroll]] for (uint n = 0; n < NP; ++n) {
        [[unroll]] for (uint cr = 0; cr < CPL; ++cr) {
            uint ri = n * Q4 + 2u * cr;
            if (!ok[n] || (cr * LANES + lane) * 8u >= D) {
                kf[ri] = vec4(0.0);
                kf[ri + 1u] = vec4(0.0);
                vf[ri] = vec4(0.0);
                vf[ri + 1u] = vec4(0.0);
            }
        }
    }

    float s[NP * HPW];
    [[unroll]] for (uint n = 0; n < NP; ++n) {
        [[unroll]] for (uint r = 0; r < HPW; ++r) {
            float x = 0.0;
            [[unroll]] for (uint i = 0; i < Q4; ++i) x += dot(qv[r * Q4 + i], kf[n * Q4 + i]);
            s[n * HPW + r] = x;
        }
    }
    [[unroll]] for (uint o = LANES / 2u; o > 0u; o /= 2u) {
        [[unroll]] for (uint i = 0; i < NP * HPW; ++i) s[i] += subgroupShuffleXor(s[i], o);
    }
    [[unroll]] for (uint r = 0; r < HPW; ++r) {
        float m_new = m_run[r];
        [[unroll]] for (uint n = 0; n < NP; ++n) {
            float x = s[n * HPW + r] * p.scale;
            if (p.softcap > 0.0) x = p.softcap * tanh(x / p.softcap);
            s[n * HPW + r] = x;
            if (ok[n]) m_new = max(m_new, x);
        }
        float alpha = MUTANT == M_NO_MAX_SUBTRACT ? 1.0 : exp(m_run[r] - m_new);
        float sum = 0.0;
        [[unroll]] for (uint n = 0; n < NP; ++n) {
            float x = s[n * HPW + r];
            float e = ok[n] ? (MUTANT == M_NO_MAX_SUBTRACT ? exp(x) : exp(x - m_new)) : 0.0;
            s[n * HPW + r] = e;
            sum += e;
        }
        l_run[r] = l_run[r] * alpha + sum;
        m_run[r] = m_new;
        [[unroll]] for (uint i = 0; i < Q4; ++i) {
            vec4 a = acc[r * Q4 + i] * alpha;
            [[unroll]] for (uint n = 0; n < NP; ++n) a += s[n * HPW + r] * vf[n * Q4 + i];
            acc[r * Q4 + i] = a;
        }
    }
    if (MUTANT == M_F16_ACCUMULATE) {
        // Rounded in integer arithmetic: drivers may fold unpack(pack(x)) to x (NVIDIA does).
        [[unroll]] for (uint i = 0; i < HPW * Q4; ++i) {
            uvec4 w = floatBitsToUint(acc[i]);
            acc[i] = vec4(unpackHalf2x16(f32_to_f16_rne(w.x)).x, unpackHalf2x16(f32_to_f16_rne(w.y)).x,
                          unpackHalf2x16(f32_to_f16_rne(w.z)).x, unpackHalf2x16(f32_to_f16_rne(w.w)).x);
        }
    }
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint D = p.head_dim;
    uint ratio = max(p.n_q_heads / max(p.n_kv_heads, 1u), 1u);
    uint blocks = (ratio + HPW - 1u) / HPW;       // head blocks per kv head
    uint c = gl_WorkGroupID.x / blocks;
    uint blk = gl_WorkGroupID.x % blocks;
    uint g = gl_WorkGroupID.y;                    // kv head
    uint t = gl_WorkGroupID.z % p.n_queries;
    uint b = gl_WorkGroupID.z / p.n_queries;
    // Uniform: the host guarantees all of these; a violation writes nothing.
    if (b >= p.n_seqs || b >= seq_lens.length() || g >= p.n_kv_heads || c >= p.n_chunks || D > 8u * CPL * LANES
        || SLOTS * DMAX > O_CAP || SLOTS * HPW > ML_CAP || gl_SubgroupSize < LANES) return;

    uint nh = min(HPW, ratio - blk * HPW);         // heads of this block
    uint h0 = g * ratio + blk * HPW;               // its first query head
    uint kvh = MUTANT == M_GQA_MODULO ? h0 % p.n_kv_heads : g;

    uint len = min(seq_lens[b], p.capacity);
    int pos = int(len) - int(p.n_queries) + int(t);
    uint n_valid = pos < 0 ? 0u : uint(pos) + 1u;
    if (MUTANT == M_CAUSAL_OFF_BY_ONE) n_valid = min(n_valid + 1u, p.capacity);
    uint first = (p.window != 0u && n_valid > p.window) ? n_valid - p.window : 0u;
    // The visible range [first, n_valid) is shared evenly by the chunks, in whole tiles of
    // CHUNK_TILE positions and at most p.chunk each (the host sizes p.chunk for a full cache), so
    // a cache filled below its capacity still spreads over every chunk.
    uint per = (n_valid - first + p.n_chunks - 1u) / p.n_chunks;
    uint chunk = min(p.chunk, max((per + CHUNK_TILE - 1u) / CHUNK_TILE, 1u) * CHUNK_TILE);
    uint begin = first + c * chunk;
    uint end = min(n_valid, begin + chunk + (MUTANT == M_CHUNK_OVERLAP ? 1u : 0u));
    uint first_new = len >= p.n_queries ? len - p.n_queries : 0u;   // host checks len >= n_queries

    // Rows within a subgroup: lanes of one slot are LANES consecutive subgroup invocations.
    uint lane = gl_SubgroupInvocationID % LANES;
    uint slot = gl_SubgroupID * (gl_SubgroupSize / LANES) + gl_SubgroupInvocationID / LANES;

    uint row0 = (b * p.n_queries + t) * p.n_q_heads + h0;   // output row of head r: row0 + r
    // The first step's cache loads, issued before the sequence length arrives: they assume the
    // chunk starts at its first position and clamp to its last row within the capacity rather than
    // the last valid row (rows past the valid ones are masked in step()). Redone below where that
    // guess is wrong (a window moves the start, or the step holds new rows).
    uint kv_base = (PAGED ? 0u : b * p.stride_seq) + kvh * p.stride_head;
    uint spec_begin = c * p.chunk;
    if (VEC) fetch_cache(spec_begin, max(min(spec_begin + p.chunk, p.capacity), 1u), kv_base, b, lane, slot);
    if (qk_rope) {
        // Rows 0..nh − 1 of o_s: the block's query heads; row nh: the new K row of kv head kvh.
        // Raw values, then each row's Σx², then each pair normalised and rotated in place (pairs
        // are disjoint, so no invocation reads what another writes); the K row goes to knew_s.
        uint half_d = D / 2u;
        uint rows = nh + 1u;
        uint krow = ((b * p.n_queries + t) * p.n_kv_heads + kvh) * D;
        uint at = min(uint(pos < 0 ? 0 : pos), p.capacity - 1u) * half_d;
        // The norm weights and (cos, sin) of this invocation's first pair are loaded with the raw
        // rows, so their latency overlaps those loads rather than following two barriers.
        float w0_first, w1_first;
        vec2 cs_first;
        pair_consts(tid, nh, half_d, at, w0_first, w1_first, cs_first);
        // Every raw load is issued before the first store (a loop would wait for each in turn):
        // H100, Qwen3-0.6B step, 1174 → 1168 µs/token at ctx 512, 1383 → 1376 at 4096.
        float raw[RAW_MAX];
        [[unroll]] for (uint k = 0; k < RAW_MAX; ++k) {
            uint i = tid + k * WG;
            uint r = i / D;
            uint d = i - r * D;
            uint idx = r < nh ? (row0 + r) * D + d : krow + d;
            raw[k] = i >= rows * D ? 0.0
                   : r < nh        ? (idx < q.length() ? q[idx] : 0.0)
                                   : (idx < new_k.length() ? uintBitsToFloat(new_k[idx]) : 0.0);
        }
        [[unroll]] for (uint k = 0; k < RAW_MAX; ++k) {
            if (tid + k * WG < rows * D) o_s[tid + k * WG] = raw[k];
        }
        barrier();
        for (uint r = gl_SubgroupID; r < rows; r += gl_NumSubgroups) {
            float ss = 0.0;
            for (uint d = gl_SubgroupInvocationID; d < D; d += gl_SubgroupSize) ss += o_s[r * D + d] * o_s[r * D + d];
            ss = subgroupAdd(ss);
            if (subgroupElect()) m_s[r] = ss;
        }
        barrier();
        for (uint j = tid; j < rows * half_d; j += WG) {
            uint r = j / half_d;
            uint i = j - r * half_d;
            uint i0 = MUTANT == M_INTERLEAVED_ROPE ? 2u * i : i;
            uint i1 = MUTANT == M_INTERLEAVED_ROPE ? 2u * i + 1u : i + half_d;
            float x0 = o_s[r * D + i0];
            float x1 = o_s[r * D + i1];
            float w0 = w0_first, w1 = w1_first;
            vec2 cs = cs_first;
            if (j != tid) pair_consts(j, nh, half_d, at, w0, w1, cs);   // pairs past the first
            if (MUTANT != M_SKIP_QK_NORM) {
                float rs = inversesqrt(m_s[r] / float(D) + p.eps);
                x0 = x0 * rs * w0;
                x1 = x1 * rs * w1;
            }
            float y0 = x0 * cs.x - x1 * cs.y;
            float y1 = x1 * cs.x + x0 * cs.y;
            if (r < nh) {
                o_s[r * D + i0] = y0;
                o_s[r * D + i1] = y1;
            } else {
                knew_s[i0] = y0;
                knew_s[i1] = y1;
            }
        }
        barrier();
    }
    [[unroll]] for (uint r = 0; r < HPW; ++r) {
        m_run[r] = NEG_FLOOR;
        l_run[r] = 0.0;
        [[unroll]] for (uint i = 0; i < Q4; ++i) {
            uint d = ((i / 2u) * LANES + lane) * 8u + (i % 2u) * 4u;
            uint idx = (row0 + r) * D + d;
            bool in_q = r < nh && d < D && idx + 3u < q.length();
            uint at = r * D + d;   // the prologue's rows in o_s
            if (qk_rope) qv[r * Q4 + i] = r < nh && d < D ? vec4(o_s[at], o_s[at + 1u], o_s[at + 2u], o_s[at + 3u]) : vec4(0.0);
            else qv[r * Q4 + i] = in_q ? vec4(q[idx], q[idx + 1u], q[idx + 2u], q[idx + 3u]) : vec4(0.0);
            acc[r * Q4 + i] = vec4(0.0);
        }
    }

    // Cache rows first, then (fused) the new tokens' rows from the inputs; both loops uniform.
    uint mid = FUSED_MODE && MUTANT != M_FUSED_READS_CACHE ? min(max(first_new, begin), end) : end;
    if (VEC) {
#if defined(FUSED)
        // A few new rows in the range (uniform): packed into knew_w/vnew_w, then one loop.
        if (end > mid && end - mid <= NEW_ROWS) {
            // One 32-bit word of the packed rows per invocation (K words, then V words), so the
            // conversion code, run once and cold in the instruction cache, is one or two
            // elements long rather than eight. H100, fused − attention alone, h32:kv8:d128 at kv
            // 4096: +1.36 (eight elements an invocation) → +0.85 µs.
            const uint EPW = 2u / WPR;   // elements per 32-bit word: 1 (f32) or 2
            uint words = D / EPW;
            for (uint i = tid; i < (end - mid) * 2u * words; i += WG) {
                uint r = i / (2u * words);
                uint wi = i - r * 2u * words;
                bool is_v = wi >= words;
                uint wrd = is_v ? wi - words : wi;
                uint e = wrd * EPW;   // the word's first element in the row
                uint src = ((b * p.n_queries + (mid + r - first_new)) * p.n_kv_heads + kvh) * D + e;
                uint packed = 0u;
                [[unroll]] for (uint u = 0; u < EPW; ++u) {
                    uint raw;
                    if (is_v) raw = src + u < new_v.length() ? new_v[src + u] : 0u;
                    else if (qk_rope) raw = floatBitsToUint(knew_s[min(e + u, KNEW - 1u)]);
                    else raw = src + u < new_k.length() ? new_k[src + u] : 0u;
                    packed |= kv_store(raw, false) << (16u * u);
                }
                uint at = (r * (MAX_D / 8u)) * WPR + wrd / 4u;
                if (is_v) vnew_w[at][wrd % 4u] = packed;
                else knew_w[at][wrd % 4u] = packed;
            }
            barrier();
            new_from = mid;
            mid = end;
        }
#endif
        if (begin < mid && (begin != spec_begin || begin + NP * SLOTS > new_from)) fetch(begin, mid, kv_base, b, lane, slot);
        for (uint base = begin; base < mid; base += SLOTS * NP) {
            [[unroll]] for (uint i = 0; i < NR; ++i) {
                k_cur[i] = k_next[i];
                v_cur[i] = v_next[i];
            }
            fetch(base + SLOTS * NP, mid, kv_base, b, lane, slot);   // past the end: re-reads row mid − 1
            step(base, mid, FROM_WORDS, kv_base, lane, slot, b, kvh, first_new);
        }
    } else {
        for (uint base = begin; base < mid; base += SLOTS * NP) step(base, mid, FROM_SCALAR, kv_base, lane, slot, b, kvh, first_new);
    }
    // The new rows through the inputs (multi-query ranges, or rows not 16-byte aligned). The
    // _qk variants have one new row, packed above when VEC: their pipelines leave this loop out.
#if defined(QK_NORM_ROPE)
    if (!VEC)
#endif
    for (uint base = mid; base < end; base += SLOTS * NP) step(base, end, FROM_NEW, kv_base, lane, slot, b, kvh, first_new);

    // Combine the slots by log-sum-exp: every slot publishes its (m, l) per head and its
    // unweighted accumulators; after a barrier one invocation per (slot, head) takes the weight
    // exp(m_s − M), M the head's max (so the exponentials are per slot, not per element: a CPU
    // device pays for each); after another, each invocation sums one output element's
    // acc_s·w_s and l_s·w_s. (Weighting in the slots, after a barrier and before two more, with
    // a serial pass per head for L, was slower: H100, Qwen3-0.6B step with attention merging its
    // own chunks, ctx 512 1232 → 1196 µs/token, 4096 1465 → 1381. An exponential per element
    // instead of per slot measured the same there.)
    if (lane == 0u && slot < SLOTS) {
        [[unroll]] for (uint r = 0; r < HPW; ++r) {
            m_s[slot * HPW + r] = m_run[r];
            l_s[slot * HPW + r] = l_run[r];
        }
    }
    [[unroll]] for (uint r = 0; r < HPW; ++r) {
        uint rr = r % HR;
        if (slot < SLOTS) {
            [[unroll]] for (uint i = 0; i < Q4; ++i) {
                uint at = (rr * SLOTS + slot) * DMAX + ((i / 2u) * LANES + lane) * 8u + (i % 2u) * 4u;
                vec4 a = acc[r * Q4 + i];
                o_s[at] = a.x;
                o_s[at + 1u] = a.y;
                o_s[at + 2u] = a.z;
                o_s[at + 3u] = a.w;
            }
        }
        if (rr + 1u < HR && r + 1u < HPW) continue;   // compile-time
        barrier();
#if defined(FUSED)
        if (r < HR) {   // the first round: after every slot's reads (the barrier above)
            // Fused append: one workgroup per (sequence, token, kv head) writes the token's K/V,
            // the one whose chunk holds the token (so the mutant that reads the slot instead of
            // the input reads its own unwritten slot: poison, deterministically).
            uint own = min((first_new + t - min(first, first_new + t)) / max(chunk, 1u), p.n_chunks - 1u);
            uint dst = row_offset((PAGED ? 0u : b * p.stride_seq) + g * p.stride_head, b, first_new + t, false);
            if (c == own && blk == 0u && len >= p.n_queries && !(PAGED && dst == NONE)) {
                uint src = ((b * p.n_queries + t) * p.n_kv_heads + g) * p.head_dim;
                for (uint d = tid; d < D; d += WG) {
                    uint kb = qk_rope ? floatBitsToUint(knew_s[min(d, KNEW - 1u)]) : (src + d < new_k.length() ? new_k[src + d] : 0u);
                    if (src + d < new_k.length() && dst + d < k_cache.length()) k_cache[dst + d] = KV_T(kv_store(kb, false));
                    if (src + d < new_v.length() && dst + d < v_cache.length()) v_cache[dst + d] = KV_T(kv_store(new_v[src + d], false));
                }
            }
        }
#endif
        if (r < HR) {   // the first round: every slot's weight per head, and each head's M
            for (uint j = tid; j < SLOTS * HPW; j += WG) {
                uint hh = j % HPW;
                float M = NEG_FLOOR;
                for (uint sl = 0; sl < SLOTS; ++sl) M = max(M, m_s[sl * HPW + hh]);
                w_s[j] = exp(m_s[j] - M);
                if (j < HPW) mm_s[hh] = M;
            }
            barrier();
        }
        uint r_first = r - rr;
        for (uint oi = tid; oi < (rr + 1u) * D; oi += WG) {
            uint hr = oi / D;
            uint d = oi - hr * D;
            uint hh = r_first + hr;   // head within the block
            if (hh >= nh) continue;
            float M = mm_s[hh];
            float sum = 0.0;
            float L = 0.0;
            for (uint sl = 0; sl < SLOTS; ++sl) {
                float wgt = w_s[sl * HPW + hh];
                sum += o_s[(hr * SLOTS + sl) * DMAX + d] * wgt;
                L += l_s[sl * HPW + hh] * wgt;
            }
            if (p.n_chunks == 1u) {
                float scale_o = 1.0;
                uint h = h0 + hh;
                // The sink joins the denominator: rescale both to max(M, sink).
                if ((p.flags & FLAG_SINKS) != 0u && L > 0.0 && h < sinks.length()) {
                    float Ms = max(M, sinks[h]);
                    scale_o = exp(M - Ms);
                    L = L * scale_o + exp(sinks[h] - Ms);
                }
                uint idx = (row0 + hh) * D + d;
                if (idx < o.length()) o[idx] = L > 0.0 ? sum * scale_o / L : 0.0;
            } else {
                uint part = (row0 + hh) * p.n_chunks + c;
                if (part * D + d < part_o.length()) part_o[part * D + d] = sum;
                if (d == 0u && part < part_ml.length()) part_ml[part] = vec2(M, L);
            }
        }
        if (r + 1u < HPW) barrier();   // o_s is rewritten by the next round
    }
    // One chunk: written above; without FLAG_MERGE_HERE attention_merge.comp merges (uniform).
    if (p.n_chunks == 1u || (p.flags & FLAG_MERGE_HERE) == 0u) return;

    // Split-K merge in the same dispatch (FLAG_MERGE_HERE): every workgroup publishes its
    // partials, then counts its chunk; the one that counts the group's last chunk merges the rows by log-sum-exp,
    // M = max m_c, O = Σ O_c·exp(m_c − M) / Σ l_c·exp(m_c − M), and resets the counter for the
    // next call. Chunks with l_c = 0 carry no weight; a row with no visible position gives 0; a
    // sink joins the denominator as a chunk with l = 1 and O = 0.
    memoryBarrierBuffer();
    barrier();
    uint grp = (gl_WorkGroupID.z * p.n_kv_heads + g) * blocks + blk;
    if (tid == 0u) {
        uint done = grp < counters.length() ? atomicAdd(counters[grp], 1u) : 0u;
        last_s = done + 1u == p.n_chunks;
    }
    barrier();
    if (!last_s) return;   // uniform
    memoryBarrierBuffer();
    if (tid == 0u && grp < counters.length()) counters[grp] = 0u;
    if (p.n_chunks > MERGE_MAX) return;   // the host never asks that
    // Every (m, l) and partial of an element is loaded up front (MERGE_MAX, unrolled, each load
    // independent of the others), so the merge waits for memory once, not twice per chunk.
    for (uint oi = tid; oi < nh * D; oi += WG) {
        uint hh = oi / D;
        uint d = oi - hh * D;
        uint first = (row0 + hh) * p.n_chunks;
        vec2 ml[MERGE_MAX];
        float po[MERGE_MAX];
        [[unroll]] for (uint cc = 0; cc < MERGE_MAX; ++cc) {
            // Clamped, not branched, so the loads issue together (chunks past the count re-read
            // the last and are masked). H100, h8:kv8:d128 at kv 16384 (16 chunks): 30.0 → 29.4 µs.
            uint part = min(first + min(cc, p.n_chunks - 1u), part_ml.length() - 1u);
            ml[cc] = part_ml[part];
            po[cc] = part_o[min(part * D + d, part_o.length() - 1u)];
            if (cc >= p.n_chunks) ml[cc] = vec2(NEG_FLOOR, 0.0);
        }
        float M = NEG_FLOOR;
        bool any = false;
        [[unroll]] for (uint cc = 0; cc < MERGE_MAX; ++cc) {
            if (ml[cc].y > 0.0) {
                M = max(M, ml[cc].x);
                any = true;
            }
        }
        uint h = h0 + hh;
        bool sink = any && (p.flags & FLAG_SINKS) != 0u && h < sinks.length();
        if (sink) M = max(M, sinks[h]);
        float L = sink ? exp(sinks[h] - M) : 0.0;
        float sum = 0.0;
        [[unroll]] for (uint cc = 0; cc < MERGE_MAX; ++cc) {
            if (ml[cc].y > 0.0) {
                float w = MUTANT == M_MERGE_NO_RESCALE ? 1.0 : exp(ml[cc].x - M);
                L += ml[cc].y * w;
                sum += po[cc] * w;
            }
        }
        uint idx = (row0 + hh) * D + d;
        if (idx < o.length()) o[idx] = L > 0.0 ? sum / L : 0.0;
    }
}
