/* attention.cu — causal attention over the paged KV cache (attention.h), and its self-test.
 *
 * Three paths, all reading the cache only:
 *  - decode rows (n_new == 1): flash-decoding. Each sequence's context is cut into n_splits
 *    splits of split_len positions (both from n_seqs and ctx_bound only, so that a captured
 *    graph replays). katt_decode_kernel runs one CTA per (sequence, kv head, split) over the
 *    sequence's own positions, computing the n_rep query heads of that kv head together (each
 *    K/V row read once for them), and one CTA per (group slot, kv head, split) over a group's
 *    shared prefix for all the group's decode queries at once (cascade: each shared K/V row is
 *    read from device memory once per group and step). Both write partials (running max m,
 *    running sum l, unnormalised output o, all f32) to the workspace; katt_merge_kernel
 *    combines a row's partials with the log-sum-exp rule and writes bf16.
 *  - prefill rows (n_new > 1): katt_prefill_kernel, flash-attention style with bf16 tensor
 *    cores (mma.sync m16n8k16, f32 accumulate): a CTA takes 64 (position, rep-head) rows of one
 *    sequence and one kv head and walks its K/V pages up to the causal limit with online
 *    softmax. The softmax probabilities are rounded to bf16 for the P·V product.
 *  - katt_simple_kernel: one CTA per (row, head), plain loops in f32; the reference on the
 *    device, and the whole path when ITS_CUDA_SIMPLE_ATTN=1 (or ITS_CUDA_SIMPLE=1) is set.
 *
 * Contracts beyond attention.h:
 *  - q, out, kv and workspace are 16-byte aligned (cudaMalloc gives 256); head_dim is 16, 32,
 *    64 or 128 (the simple path takes any head_dim <= 128 that is a multiple of 8).
 *  - Groups are disjoint. A cascaded group (n_seqs >= 2, n_shared_blocks > 0) gives its decode
 *    members the shared range [0, 16 * n_shared_blocks), read through its first member's
 *    table; its prefill members take the plain path. 16 * n_shared_blocks must not exceed any
 *    decode member's pos (the backend shares only blocks below every member's write position):
 *    past a member's own context only the scores are masked, not the values (below).
 *  - No position at or past pos + n_new and no table entry past the last needed one is read.
 *    A masked K never reaches the output; a masked V is multiplied by an exact 0, which a
 *    NaN/Inf V survives: a prefill tile reads the positions its later rows need, and a NaN V
 *    there (only a broken model makes one) spreads to the tile's earlier rows too.
 *  - Workspace (decode partials, per call): o (n_seqs, n_heads, 2 * n_splits, head_dim) f32,
 *    then ml (n_seqs, n_heads, 2 * n_splits) float2 {m, l}; m is in log2 units (scores are
 *    scaled by scale * log2(e) and exponentiated with exp2f). Slot k < n_splits holds split k
 *    of the sequence's own part, slot n_splits + k split k of its group's shared part.
 *
 * Owns no memory; never synchronises; every launch goes through the caller's stream.
 *
 * Resources (nvcc 13.0 --resource-usage; registers sm_90 / sm_80, static shared memory). No
 * kernel on the fast path has a stack frame or spills (simple: 16 B stack on sm_90, unused
 * on the fast path):
 *   decode <128, RB 4>  46 / 72 regs, 19.6 KB   <128, RB 8>  60 / 72, 22.1 KB
 *          <128, RB 16> 77 / 105, 27.2 KB       < 64, RB 4>  40 / 48, 10.6 KB
 *          < 16, RB 4>  43 / 48, 3.8 KB         (RB 16 serves the shared-prefix CTAs)
 *   prefill <128> 163 / 164, 17.0 KB   <64> 96 / 96, 9.0 KB   <32> 68 / 72   <16> 54 / 63
 *   merge 32 / 30, 4 B   simple 32 / 32, 1.5 KB
 * All under 48 KB, so no cudaFuncSetAttribute (nothing to do at graph-capture time).
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "attention.h"
#include "kcheck.h"
#include "kenv.h"
#include "kst.h"

#define KATT_THREADS 128     /* every kernel here runs 4 warps */
#define KATT_KC 32           /* K/V positions per shared-memory chunk */
#define KATT_MT 64           /* prefill rows per CTA: (position, rep head) pairs */
#define KATT_SPLIT_MIN 256   /* shortest decode split, positions */
#define KATT_SPLIT_CAP 32    /* most splits a sequence gets (1 sequence in the call) */
#define KATT_LOG2E 1.4426950408889634f
#define KATT_FULL 0xffffffffu

static_assert(KATT_KC == 32, "decode scores map one chunk position to one lane");
static_assert(KATT_BLOCK == 16, "page arithmetic below uses >> 4 and & 15");

/* ---- split plan: a function of (n_seqs, ctx_bound) only ------------------------------------ */

/* Most splits per sequence for a call of n_seqs sequences: enough CTAs to fill the device at
 * small batches, few partials at large ones (the workspace is sized from this). */
static int katt_split_cap(int n_seqs)
{
    int c = 128 / (n_seqs > 0 ? n_seqs : 1);
    return c < 4 ? 4 : c > KATT_SPLIT_CAP ? KATT_SPLIT_CAP : c;
}

static void katt_split_plan(int n_seqs, int ctx_bound, int *n_splits, int *split_len)
{
    if (ctx_bound < 1)
        ctx_bound = 1;
    int ns = (ctx_bound + KATT_SPLIT_MIN - 1) / KATT_SPLIT_MIN;
    int cap = katt_split_cap(n_seqs);
    if (ns > cap)
        ns = cap;
    int len = (ctx_bound + ns - 1) / ns;
    len = (len + KATT_BLOCK - 1) / KATT_BLOCK * KATT_BLOCK;
    *split_len = len;
    *n_splits = (ctx_bound + len - 1) / len;
}

size_t katt_workspace_bytes(int max_seqs, int max_tokens, int n_heads, int head_dim,
                                       int max_ctx)
{
    /* Sized from the split cap alone, not max_ctx, so a call whose ctx_bound overshoots
     * max_ctx still fits; prefill rows need no workspace. */
    (void)max_tokens;
    (void)max_ctx;
    size_t most = 0;
    for (int n = 1; n <= max_seqs; n++) {
        size_t slots = (size_t)n * 2 * (size_t)katt_split_cap(n);
        most = slots > most ? slots : most;
    }
    return most * (size_t)(n_heads > 0 ? n_heads : 0) *
           ((size_t)(head_dim > 0 ? head_dim : 0) + 2) * sizeof(float);
}

/* ---- device helpers ------------------------------------------------------------------------ */

__device__ __forceinline__ void katt_bf16x8(uint4 v, float *f)
{
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float katt_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(KATT_FULL, v, o));
    return v;
}

__device__ __forceinline__ float katt_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(KATT_FULL, v, o);
    return v;
}

/* Shared-prefix length (positions) of sequence s: 16 * n_shared_blocks of the cascaded group
 * holding s, else 0. Called by every thread of the block (it synchronises). */
static __device__ int katt_shared_len(const struct katt_args &a, int s)
{
    __shared__ int len_s;
    if (threadIdx.x == 0)
        len_s = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < a.n_seqs; i += blockDim.x) {
        const struct katt_group gr = a.groups[i];
        if (gr.n_seqs >= 2 && gr.n_shared_blocks > 0 && s >= gr.seq0 && s < gr.seq0 + gr.n_seqs)
            len_s = gr.n_shared_blocks * KATT_BLOCK;
    }
    __syncthreads();
    return len_s;
}

/* Whether partial slot k of a decode row holds data: own split k covers
 * [max(S, kL), min(ctx, (k+1)L)), shared split k covers [kL, min(S, (k+1)L)) masked to ctx.
 * The writers use the same ranges (katt_decode_kernel). */
__host__ __device__ __forceinline__ bool katt_slot_used(int k, int n_splits, int L, int S, int ctx)
{
    if (k < n_splits)
        return max(S, k * L) < min(ctx, (k + 1) * L);
    k -= n_splits;
    return k * L < min(S, ctx);
}

/* ---- decode: partials over one split -------------------------------------------------------- */

/* grid (n_seqs, n_kv_heads, n_splits). shared_mode 0: blockIdx.x is a sequence, and the CTA
 * covers that decode sequence's own positions in split k. shared_mode 1: blockIdx.x is a group
 * slot, and the CTA covers split k of the group's shared prefix for all its decode members.
 * Query rows (member, rep head) go through in batches of RB; each batch walks the split in
 * chunks of 32 positions staged in shared memory. */
template <int HD, int RB>
__global__ void __launch_bounds__(KATT_THREADS)
    katt_decode_kernel(const struct katt_args a, int n_splits, int split_len, int shared_mode,
                       float *ws_o, float2 *ws_ml)
{
    constexpr int STR = HD + 8;              /* padded smem row (bf16): conflict-free uint4 */
    constexpr int RPT = RB / 4;              /* score rows per warp */
    constexpr int NRG = 256 / HD;            /* row groups in the P·V phase (2 dims/thread) */
    constexpr int APR = (RB + NRG - 1) / NRG; /* P·V rows per thread */
    static_assert(RB % 4 == 0, "RB rows are spread over 4 warps");
    __shared__ __align__(16) __nv_bfloat16 ks[KATT_KC * STR];
    __shared__ __align__(16) __nv_bfloat16 vs[KATT_KC * STR];
    __shared__ __align__(16) float qs[RB * HD];
    __shared__ float ps[RB * (KATT_KC + 1)];
    __shared__ float alpha_s[RB];
    __shared__ int ctx_s[RB];
    __shared__ int maxctx_s;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = blockIdx.y, k = blockIdx.z;
    const int n_rep = a.n_heads / a.n_kv_heads;
    int seq_first, n_members, table0, lo, hi;
    if (!shared_mode) {
        const int s = blockIdx.x;
        const struct katt_seq sq = a.seqs[s];
        if (sq.n_new != 1)
            return; /* uniform: prefill rows are katt_prefill_kernel's */
        const int S = katt_shared_len(a, s);
        lo = max(S, k * split_len);
        hi = min(sq.pos + 1, (k + 1) * split_len);
        seq_first = s;
        n_members = 1;
        table0 = sq.table0;
    } else {
        const struct katt_group gr = a.groups[blockIdx.x];
        if (gr.n_seqs < 2 || gr.n_shared_blocks <= 0)
            return;
        if (tid == 0)
            maxctx_s = 0;
        __syncthreads();
        for (int m = tid; m < gr.n_seqs; m += KATT_THREADS) {
            const struct katt_seq sq = a.seqs[gr.seq0 + m];
            if (sq.n_new == 1)
                atomicMax(&maxctx_s, sq.pos + 1);
        }
        __syncthreads();
        lo = k * split_len;
        hi = min(min(gr.n_shared_blocks * KATT_BLOCK, maxctx_s), (k + 1) * split_len);
        seq_first = gr.seq0;
        n_members = gr.n_seqs;
        table0 = a.seqs[gr.seq0].table0;
    }
    if (lo >= hi)
        return; /* uniform */

    const __nv_bfloat16 *kbase = a.kv + (size_t)a.layer * a.layer_stride + (size_t)g * a.head_stride;
    const __nv_bfloat16 *vbase = kbase + (size_t)a.n_kv_heads * a.head_stride;
    const int32_t *table = a.tables + table0;
    const float sl2 = a.scale * KATT_LOG2E;
    const int n_rows = n_members * n_rep;
    const int n_slots = 2 * n_splits;
    const int slot = (shared_mode ? n_splits : 0) + k;
    const int dcol = (tid % (HD / 2)) * 2, rg = tid / (HD / 2);

    for (int rb0 = 0; rb0 < n_rows; rb0 += RB) {
        __syncthreads(); /* the previous batch is done with qs, ctx_s, ps */
        if (tid < RB) {
            const int rr = rb0 + tid;
            int c = 0;
            if (rr < n_rows) {
                const struct katt_seq sq = a.seqs[seq_first + rr / n_rep];
                if (sq.n_new == 1)
                    c = sq.pos + 1;
            }
            ctx_s[tid] = c; /* 0: not a decode row, fully masked and never written */
        }
        for (int e = tid; e < RB * (HD / 8); e += KATT_THREADS) {
            const int i = e / (HD / 8), c = e % (HD / 8), rr = rb0 + i;
            float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (rr < n_rows) {
                const int tok = a.seqs[seq_first + rr / n_rep].tok0;
                const __nv_bfloat16 *src =
                    a.q + ((size_t)tok * a.n_heads + (size_t)g * n_rep + rr % n_rep) * HD + c * 8;
                katt_bf16x8(*(const uint4 *)src, f);
            }
            float4 *dst = (float4 *)(qs + i * HD + c * 8);
            dst[0] = make_float4(f[0], f[1], f[2], f[3]);
            dst[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
        float m_run[RPT], l_run[RPT], acc[APR][2];
#pragma unroll
        for (int kk = 0; kk < RPT; kk++) {
            m_run[kk] = -INFINITY;
            l_run[kk] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < APR; kk++)
            acc[kk][0] = acc[kk][1] = 0.0f;

        for (int c0 = lo; c0 < hi; c0 += KATT_KC) {
            __syncthreads(); /* rows staged; the previous chunk's readers are done */
            for (int e = tid; e < KATT_KC * (HD / 8); e += KATT_THREADS) {
                const int p = e / (HD / 8), c = e % (HD / 8), j = c0 + p;
                uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
                if (j < hi) {
                    const size_t off = (size_t)table[j >> 4] * a.block_stride +
                                       (size_t)(j & 15) * HD + c * 8;
                    kv4 = *(const uint4 *)(kbase + off);
                    vv4 = *(const uint4 *)(vbase + off);
                }
                *(uint4 *)(ks + p * STR + c * 8) = kv4;
                *(uint4 *)(vs + p * STR + c * 8) = vv4;
            }
            __syncthreads();

            /* scores: lane = chunk position, warp w takes rows w, w + 4, ... */
            {
                float dot[RPT];
#pragma unroll
                for (int kk = 0; kk < RPT; kk++)
                    dot[kk] = 0.0f;
                const __nv_bfloat16 *kr = ks + lane * STR;
#pragma unroll 4
                for (int c = 0; c < HD / 8; c++) {
                    float kf[8];
                    katt_bf16x8(*(const uint4 *)(kr + c * 8), kf);
#pragma unroll
                    for (int kk = 0; kk < RPT; kk++) {
                        const float4 q0 = *(const float4 *)(qs + (warp + 4 * kk) * HD + c * 8);
                        const float4 q1 = *(const float4 *)(qs + (warp + 4 * kk) * HD + c * 8 + 4);
                        dot[kk] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] +
                                   q1.x * kf[4] + q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
                    }
                }
                const int j = c0 + lane;
#pragma unroll
                for (int kk = 0; kk < RPT; kk++) {
                    const int r = warp + 4 * kk;
                    const float sc = (j < hi && j < ctx_s[r]) ? dot[kk] * sl2 : -INFINITY;
                    const float m_new = fmaxf(m_run[kk], katt_warp_max(sc));
                    const float mu = m_new == -INFINITY ? 0.0f : m_new;
                    const float p = exp2f(sc - mu);
                    const float al = exp2f(m_run[kk] - mu);
                    l_run[kk] = l_run[kk] * al + katt_warp_sum(p);
                    m_run[kk] = m_new;
                    ps[r * (KATT_KC + 1) + lane] = p;
                    if (lane == 0)
                        alpha_s[r] = al;
                }
            }
            __syncthreads();

            /* P·V: thread holds dims dcol, dcol + 1 of rows rg, rg + NRG, ... */
#pragma unroll
            for (int kk = 0; kk < APR; kk++) {
                const int r = rg + NRG * kk;
                if (r < RB) {
                    const float al = alpha_s[r];
                    acc[kk][0] *= al;
                    acc[kk][1] *= al;
                }
            }
            const int n_j = min(KATT_KC, hi - c0);
            for (int j = 0; j < n_j; j++) {
                const __nv_bfloat162 v2 = *(const __nv_bfloat162 *)(vs + j * STR + dcol);
                const float v0 = __low2float(v2), v1 = __high2float(v2);
#pragma unroll
                for (int kk = 0; kk < APR; kk++) {
                    const int r = rg + NRG * kk;
                    if (r < RB) {
                        const float p = ps[r * (KATT_KC + 1) + j];
                        acc[kk][0] += p * v0;
                        acc[kk][1] += p * v1;
                    }
                }
            }
        }

        /* partials of this batch's decode rows */
#pragma unroll
        for (int kk = 0; kk < RPT; kk++) {
            const int r = warp + 4 * kk, rr = rb0 + r;
            if (lane == 0 && rr < n_rows && ctx_s[r] > 0) {
                const size_t idx =
                    ((size_t)(seq_first + rr / n_rep) * a.n_heads + (size_t)g * n_rep + rr % n_rep) *
                        n_slots + slot;
                ws_ml[idx] = make_float2(m_run[kk], l_run[kk]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < APR; kk++) {
            const int r = rg + NRG * kk, rr = rb0 + r;
            if (r < RB && rr < n_rows && ctx_s[r] > 0) {
                const size_t idx =
                    ((size_t)(seq_first + rr / n_rep) * a.n_heads + (size_t)g * n_rep + rr % n_rep) *
                        n_slots + slot;
                *(float2 *)(ws_o + idx * HD + dcol) = make_float2(acc[kk][0], acc[kk][1]);
            }
        }
    }
}

/* grid (n_seqs, ceil(n_heads * HD / 128)): one thread per (head, dim) of a decode row. */
template <int HD>
__global__ void __launch_bounds__(KATT_THREADS)
    katt_merge_kernel(const struct katt_args a, int n_splits, int split_len, const float *ws_o,
                      const float2 *ws_ml)
{
    const int s = blockIdx.x;
    const struct katt_seq sq = a.seqs[s];
    if (sq.n_new != 1)
        return; /* uniform */
    const int S = katt_shared_len(a, s);
    const int e = blockIdx.y * KATT_THREADS + threadIdx.x;
    const int h = e / HD, d = e % HD;
    if (h >= a.n_heads)
        return;
    const int ctx = sq.pos + 1, n_slots = 2 * n_splits;
    const size_t base = ((size_t)s * a.n_heads + h) * n_slots;
    float mx = -INFINITY;
    for (int k = 0; k < n_slots; k++)
        if (katt_slot_used(k, n_splits, split_len, S, ctx))
            mx = fmaxf(mx, ws_ml[base + k].x);
    float l = 0.0f, o = 0.0f;
    for (int k = 0; k < n_slots; k++) {
        if (!katt_slot_used(k, n_splits, split_len, S, ctx))
            continue;
        const float2 ml = ws_ml[base + k];
        if (ml.x == -INFINITY)
            continue;
        const float w = exp2f(ml.x - mx);
        l += w * ml.y;
        o += w * ws_o[(base + k) * HD + d];
    }
    a.out[(size_t)sq.tok0 * a.n_heads * HD + (size_t)h * HD + d] = __float2bfloat16(o / l);
}

/* ---- prefill: tensor cores ------------------------------------------------------------------ */

/* D += A·B, m16n8k16, A row-major bf16 (4 regs), B column-major bf16 (2 regs), D f32. Fragment
 * layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
 *   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
 *   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
 *   D: d0,d1 = (g, 2t..2t+1), d2,d3 = (g+8, 2t..2t+1); the lower index in the low half. */
__device__ __forceinline__ void katt_mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t katt_pack(float lo, float hi)
{
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* .x = lo in the low half */
    return *(const uint32_t *)&v;
}

__device__ __forceinline__ uint32_t katt_ld32(const uint16_t *p)
{
    return *(const uint32_t *)p;
}

/* grid (ceil(n_tokens * n_rep / 64) + n_seqs, n_kv_heads): CTA x is tile number x in the
 * concatenation of every prefill sequence's tiles (ceil(n_new * n_rep / 64) each); CTAs past
 * the last tile exit. Flat row f = i * n_rep + r of a sequence is new token i, rep head r;
 * warp w holds tile rows 16w .. 16w + 15. */
template <int HD>
__global__ void __launch_bounds__(KATT_THREADS) katt_prefill_kernel(const struct katt_args a)
{
    constexpr int STR = HD + 8, KC = KATT_KC, MT = KATT_MT;
    constexpr int NT = KC / 8, DT = HD / 8, KK = HD / 16;
    static_assert(2 * KC == MT, "Q staging and the K|V chunk share one buffer");
    /* rows 0..63: the Q tile while fragments load, then K (rows 0..31) and V (rows 32..63) */
    __shared__ __align__(16) uint16_t sm[MT * STR];
    __shared__ int seq_s, tile_s;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = blockIdx.y;
    const int n_rep = a.n_heads / a.n_kv_heads;

    if (warp == 0) { /* which (sequence, tile) is blockIdx.x: warp prefix sums of tile counts */
        int base = 0, fs = -1, ft = 0;
        for (int s0 = 0; s0 < a.n_seqs; s0 += 32) {
            const int s = s0 + lane;
            int nt = 0;
            if (s < a.n_seqs) {
                const int nn = a.seqs[s].n_new;
                if (nn > 1)
                    nt = (nn * n_rep + MT - 1) / MT;
            }
            int inc = nt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(KATT_FULL, inc, o);
                if (lane >= o)
                    inc += y;
            }
            const int excl = inc - nt, tgt = (int)blockIdx.x - base;
            const unsigned hit = __ballot_sync(KATT_FULL, nt > 0 && tgt >= excl && tgt < inc);
            if (hit) {
                const int src = __ffs(hit) - 1;
                fs = s0 + src;
                ft = tgt - __shfl_sync(KATT_FULL, excl, src);
                break;
            }
            base += __shfl_sync(KATT_FULL, inc, 31);
        }
        if (lane == 0) {
            seq_s = fs;
            tile_s = ft;
        }
    }
    __syncthreads();
    if (seq_s < 0)
        return; /* uniform */
    const struct katt_seq sq = a.seqs[seq_s];
    const int nf = sq.n_new * n_rep, f0 = tile_s * MT;
    const int kv_end = sq.pos + min(sq.n_new - 1, (f0 + MT - 1) / n_rep) + 1;

    for (int e = tid; e < MT * (HD / 8); e += KATT_THREADS) {
        const int row = e / (HD / 8), c = e % (HD / 8), f = f0 + row;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (f < nf)
            v = *(const uint4 *)(a.q +
                                 ((size_t)(sq.tok0 + f / n_rep) * a.n_heads + (size_t)g * n_rep +
                                  f % n_rep) * HD + c * 8);
        *(uint4 *)(sm + row * STR + c * 8) = v;
    }
    __syncthreads();

    const int gq = lane >> 2, tq = lane & 3;
    const int ra = warp * 16 + gq; /* this thread's tile rows: ra and ra + 8 */
    uint32_t qf[KK][4];
#pragma unroll
    for (int kk = 0; kk < KK; kk++) {
        qf[kk][0] = katt_ld32(sm + ra * STR + kk * 16 + 2 * tq);
        qf[kk][1] = katt_ld32(sm + (ra + 8) * STR + kk * 16 + 2 * tq);
        qf[kk][2] = katt_ld32(sm + ra * STR + kk * 16 + 8 + 2 * tq);
        qf[kk][3] = katt_ld32(sm + (ra + 8) * STR + kk * 16 + 8 + 2 * tq);
    }
    const int fa = f0 + ra, fb = fa + 8;
    const int lim_a = fa < nf ? sq.pos + fa / n_rep : -1; /* last position row a may see */
    const int lim_b = fb < nf ? sq.pos + fb / n_rep : -1;
    const int fw = f0 + warp * 16;
    const int warp_lim = fw < nf ? sq.pos + min(nf - 1, fw + 15) / n_rep : -1;

    const __nv_bfloat16 *kbase = a.kv + (size_t)a.layer * a.layer_stride + (size_t)g * a.head_stride;
    const __nv_bfloat16 *vbase = kbase + (size_t)a.n_kv_heads * a.head_stride;
    const int32_t *table = a.tables + sq.table0;
    const float sl2 = a.scale * KATT_LOG2E;
    const uint16_t *ks = sm, *vs = sm + KC * STR;

    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++)
        o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

    for (int c0 = 0; c0 < kv_end; c0 += KC) {
        __syncthreads(); /* Q fragments loaded / the previous chunk consumed */
        for (int e = tid; e < KC * (HD / 8); e += KATT_THREADS) {
            const int p = e / (HD / 8), c = e % (HD / 8), j = c0 + p;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (j < kv_end) {
                const size_t off =
                    (size_t)table[j >> 4] * a.block_stride + (size_t)(j & 15) * HD + c * 8;
                kv4 = *(const uint4 *)(kbase + off);
                vv4 = *(const uint4 *)(vbase + off);
            }
            *(uint4 *)(sm + p * STR + c * 8) = kv4;
            *(uint4 *)(sm + (KC + p) * STR + c * 8) = vv4;
        }
        __syncthreads();
        if (c0 > warp_lim)
            continue; /* warp-uniform: every row of this warp is past its causal limit */

        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KK; kk++) {
                const uint16_t *kr = ks + (nt * 8 + gq) * STR + kk * 16 + 2 * tq;
                katt_mma(sc[nt], qf[kk], katt_ld32(kr), katt_ld32(kr + 8));
            }
        }
        float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = c0 + nt * 8 + 2 * tq + (e & 1);
                const int lim = e < 2 ? lim_a : lim_b;
                sc[nt][e] = j <= lim ? sc[nt][e] * sl2 : -INFINITY;
            }
            mxa = fmaxf(mxa, fmaxf(sc[nt][0], sc[nt][1]));
            mxb = fmaxf(mxb, fmaxf(sc[nt][2], sc[nt][3]));
        }
        mxa = fmaxf(mxa, __shfl_xor_sync(KATT_FULL, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(KATT_FULL, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(KATT_FULL, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(KATT_FULL, mxb, 2));
        const float mna = fmaxf(m_a, mxa), mnb = fmaxf(m_b, mxb);
        const float mua = mna == -INFINITY ? 0.0f : mna, mub = mnb == -INFINITY ? 0.0f : mnb;
        const float ala = exp2f(m_a - mua), alb = exp2f(m_b - mub);
        m_a = mna;
        m_b = mnb;
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            sc[nt][0] = exp2f(sc[nt][0] - mua);
            sc[nt][1] = exp2f(sc[nt][1] - mua);
            sc[nt][2] = exp2f(sc[nt][2] - mub);
            sc[nt][3] = exp2f(sc[nt][3] - mub);
            sa += sc[nt][0] + sc[nt][1];
            sb += sc[nt][2] + sc[nt][3];
        }
        l_a = l_a * ala + sa; /* this thread's columns; the quad is summed at the end */
        l_b = l_b * alb + sb;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            o[dt][0] *= ala;
            o[dt][1] *= ala;
            o[dt][2] *= alb;
            o[dt][3] *= alb;
        }
#pragma unroll
        for (int kc = 0; kc < KC / 16; kc++) {
            const uint32_t pa[4] = {katt_pack(sc[2 * kc][0], sc[2 * kc][1]),
                                    katt_pack(sc[2 * kc][2], sc[2 * kc][3]),
                                    katt_pack(sc[2 * kc + 1][0], sc[2 * kc + 1][1]),
                                    katt_pack(sc[2 * kc + 1][2], sc[2 * kc + 1][3])};
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const uint16_t *vr = vs + (kc * 16 + 2 * tq) * STR + dt * 8 + gq;
                const uint32_t b0 = (uint32_t)vr[0] | ((uint32_t)vr[STR] << 16);
                const uint32_t b1 = (uint32_t)vr[8 * STR] | ((uint32_t)vr[9 * STR] << 16);
                katt_mma(o[dt], pa, b0, b1);
            }
        }
    }

    l_a += __shfl_xor_sync(KATT_FULL, l_a, 1);
    l_a += __shfl_xor_sync(KATT_FULL, l_a, 2);
    l_b += __shfl_xor_sync(KATT_FULL, l_b, 1);
    l_b += __shfl_xor_sync(KATT_FULL, l_b, 2);
    if (fa < nf) {
        const float inv = 1.0f / l_a;
        __nv_bfloat16 *dst = a.out +
                             ((size_t)(sq.tok0 + fa / n_rep) * a.n_heads + (size_t)g * n_rep +
                              fa % n_rep) * HD + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *(__nv_bfloat162 *)(dst + dt * 8) = __floats2bfloat162_rn(o[dt][0] * inv, o[dt][1] * inv);
    }
    if (fb < nf) {
        const float inv = 1.0f / l_b;
        __nv_bfloat16 *dst = a.out +
                             ((size_t)(sq.tok0 + fb / n_rep) * a.n_heads + (size_t)g * n_rep +
                              fb % n_rep) * HD + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *(__nv_bfloat162 *)(dst + dt * 8) = __floats2bfloat162_rn(o[dt][2] * inv, o[dt][3] * inv);
    }
}

/* ---- the simple reference kernel ------------------------------------------------------------ */

__device__ __forceinline__ float katt_block_reduce(float v, float *red, bool is_max)
{
    red[threadIdx.x] = v;
    __syncthreads();
    for (int w = KATT_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w)
            red[threadIdx.x] = is_max ? fmaxf(red[threadIdx.x], red[threadIdx.x + w])
                                      : red[threadIdx.x] + red[threadIdx.x + w];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

/* grid (n_tokens, n_heads), 128 threads: row t, head h. Pass 1 finds the largest score, pass
 * 2 sums exp(score - max) and the weighted values 128 positions at a time. Scores are
 * recomputed in pass 2 rather than stored, so any context length works. */
__global__ void __launch_bounds__(KATT_THREADS) katt_simple_kernel(const struct katt_args a)
{
    __shared__ float qs[128], ps[KATT_THREADS], red[KATT_THREADS];
    __shared__ int seq_s;
    const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, hd = a.head_dim;
    if (tid == 0) {
        seq_s = -1;
        for (int s = 0; s < a.n_seqs; s++)
            if (t >= a.seqs[s].tok0 && t < a.seqs[s].tok0 + a.seqs[s].n_new) {
                seq_s = s;
                break;
            }
    }
    __syncthreads();
    if (seq_s < 0)
        return;
    const struct katt_seq sq = a.seqs[seq_s];
    const int n_ctx = sq.pos + (t - sq.tok0) + 1;
    const int g = h / (a.n_heads / a.n_kv_heads);
    const __nv_bfloat16 *kh = a.kv + (size_t)a.layer * a.layer_stride + (size_t)g * a.head_stride;
    const __nv_bfloat16 *vh = kh + (size_t)a.n_kv_heads * a.head_stride;
    const int32_t *table = a.tables + sq.table0;
    for (int d = tid; d < hd; d += KATT_THREADS)
        qs[d] = __bfloat162float(a.q[((size_t)t * a.n_heads + h) * hd + d]);
    __syncthreads();

    float mx = -INFINITY;
    for (int j = tid; j < n_ctx; j += KATT_THREADS) {
        const __nv_bfloat16 *kr = kh + (size_t)table[j / KATT_BLOCK] * a.block_stride +
                                  (size_t)(j % KATT_BLOCK) * hd;
        float s = 0.0f;
        for (int d = 0; d < hd; d++)
            s += qs[d] * __bfloat162float(kr[d]);
        mx = fmaxf(mx, s * a.scale);
    }
    mx = katt_block_reduce(mx, red, true);

    float o = 0.0f, l = 0.0f;
    for (int j0 = 0; j0 < n_ctx; j0 += KATT_THREADS) {
        const int j = j0 + tid;
        float p = 0.0f;
        if (j < n_ctx) {
            const __nv_bfloat16 *kr = kh + (size_t)table[j / KATT_BLOCK] * a.block_stride +
                                      (size_t)(j % KATT_BLOCK) * hd;
            float s = 0.0f;
            for (int d = 0; d < hd; d++)
                s += qs[d] * __bfloat162float(kr[d]);
            p = expf(s * a.scale - mx);
        }
        ps[tid] = p;
        l += p;
        __syncthreads();
        if (tid < hd) {
            const int n = min(KATT_THREADS, n_ctx - j0);
            for (int jj = 0; jj < n; jj++) {
                const int jp = j0 + jj;
                const __nv_bfloat16 *vr = vh + (size_t)table[jp / KATT_BLOCK] * a.block_stride +
                                          (size_t)(jp % KATT_BLOCK) * hd;
                o += ps[jj] * __bfloat162float(vr[tid]);
            }
        }
        __syncthreads();
    }
    l = katt_block_reduce(l, red, false);
    if (tid < hd)
        a.out[(size_t)t * a.n_heads * hd + (size_t)h * hd + tid] = __float2bfloat16(o / l);
}

/* ---- launchers ------------------------------------------------------------------------------ */

static cudaError_t katt_launch_simple(const struct katt_args *a, cudaStream_t st)
{
    if (a->head_dim < 8 || a->head_dim > 128 || a->head_dim % 8 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads)
        return cudaErrorInvalidValue;
    if (a->n_tokens < 1)
        return cudaSuccess;
    katt_simple_kernel<<<dim3(a->n_tokens, a->n_heads), KATT_THREADS, 0, st>>>(*a);
    return cudaGetLastError();
}

template <int HD, int RB>
static void katt_launch_decode(const struct katt_args *a, int ns, int len, int shared_mode,
                               cudaStream_t st)
{
    float *ws_o = (float *)a->workspace;
    float2 *ws_ml = (float2 *)(ws_o + (size_t)a->n_seqs * a->n_heads * 2 * ns * HD);
    katt_decode_kernel<HD, RB><<<dim3(a->n_seqs, a->n_kv_heads, ns), KATT_THREADS, 0, st>>>(
        *a, ns, len, shared_mode, ws_o, ws_ml);
}

template <int HD>
static cudaError_t katt_launch_hd(const struct katt_args *a, cudaStream_t st)
{
    const int n_rep = a->n_heads / a->n_kv_heads;
    int ns, len;
    katt_split_plan(a->n_seqs, a->ctx_bound, &ns, &len);
    /* decode rows: own parts, shared parts (a group needs two sequences), merge */
    if (n_rep <= 4)
        katt_launch_decode<HD, 4>(a, ns, len, 0, st);
    else if (n_rep <= 8)
        katt_launch_decode<HD, 8>(a, ns, len, 0, st);
    else
        katt_launch_decode<HD, 16>(a, ns, len, 0, st);
    cudaError_t rc = cudaGetLastError();
    if (rc != cudaSuccess)
        return rc;
    if (a->n_seqs >= 2) {
        katt_launch_decode<HD, 16>(a, ns, len, 1, st);
        if ((rc = cudaGetLastError()) != cudaSuccess)
            return rc;
    }
    const float *ws_o = (const float *)a->workspace;
    const float2 *ws_ml = (const float2 *)(ws_o + (size_t)a->n_seqs * a->n_heads * 2 * ns * HD);
    katt_merge_kernel<HD>
        <<<dim3(a->n_seqs, (a->n_heads * HD + KATT_THREADS - 1) / KATT_THREADS), KATT_THREADS, 0,
           st>>>(*a, ns, len, ws_o, ws_ml);
    if ((rc = cudaGetLastError()) != cudaSuccess)
        return rc;
    /* prefill rows exist only when some sequence has n_new > 1, i.e. n_tokens > n_seqs */
    if (a->n_tokens > a->n_seqs) {
        const long long tiles = ((long long)a->n_tokens * n_rep + KATT_MT - 1) / KATT_MT + a->n_seqs;
        katt_prefill_kernel<HD><<<dim3((unsigned)tiles, a->n_kv_heads), KATT_THREADS, 0, st>>>(*a);
        rc = cudaGetLastError();
    }
    return rc;
}

static cudaError_t katt_launch_fast(const struct katt_args *a, cudaStream_t st)
{
    if (a->n_seqs < 1 || a->n_kv_heads < 1 || a->n_heads % a->n_kv_heads)
        return cudaErrorInvalidValue;
    switch (a->head_dim) {
    case 16:
        return katt_launch_hd<16>(a, st);
    case 32:
        return katt_launch_hd<32>(a, st);
    case 64:
        return katt_launch_hd<64>(a, st);
    case 128:
        return katt_launch_hd<128>(a, st);
    default:
        return cudaErrorInvalidValue;
    }
}

static int katt_simple_wanted(void)
{
    static const int on = kenv_on("ITS_CUDA_SIMPLE_ATTN") || kenv_on("ITS_CUDA_SIMPLE");
    return on;
}

void katt_forward(const struct katt_args *a, cudaStream_t stream)
{
    if (katt_simple_wanted())
        KCUDA(katt_launch_simple(a, stream));
    else
        KCUDA(katt_launch_fast(a, stream));
}

/* ---- self-test ------------------------------------------------------------------------------ */

/* The documented semantics in float64 on the host: row tok0 + i of sequence s, head h, attends
 * over positions [0, pos + i] through the sequence's table; groups do not change the result.
 * q: (n_tokens, n_heads, hd) and kv: the pool, both as floats (the bf16 values); out:
 * (n_tokens, n_heads * hd). */
static void katt_host_ref(const float *q, const float *kv, size_t block_stride,
                          size_t layer_stride, size_t head_stride, int layer,
                          const int32_t *tables, const struct katt_seq *seqs, int n_seqs,
                          int n_heads, int n_kv_heads, int hd, double scale, double *out)
{
    const int n_rep = n_heads / n_kv_heads;
    std::vector<double> sc;
    for (int s = 0; s < n_seqs; s++) {
        const struct katt_seq *sq = &seqs[s];
        for (int i = 0; i < sq->n_new; i++) {
            const int t = sq->tok0 + i, n_ctx = sq->pos + i + 1;
            sc.assign((size_t)n_ctx, 0.0);
            for (int h = 0; h < n_heads; h++) {
                const int g = h / n_rep;
                const float *qr = q + ((size_t)t * n_heads + h) * hd;
                const size_t k_off = (size_t)layer * layer_stride + (size_t)g * head_stride;
                const size_t v_off = k_off + (size_t)n_kv_heads * head_stride;
                double mx = -INFINITY;
                for (int j = 0; j < n_ctx; j++) {
                    const float *kr = kv + (size_t)tables[sq->table0 + j / KATT_BLOCK] * block_stride +
                                      k_off + (size_t)(j % KATT_BLOCK) * hd;
                    double d = 0.0;
                    for (int x = 0; x < hd; x++)
                        d += (double)qr[x] * (double)kr[x];
                    sc[j] = d * scale;
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                double sum = 0.0;
                for (int j = 0; j < n_ctx; j++) {
                    sc[j] = exp(sc[j] - mx);
                    sum += sc[j];
                }
                double *o = out + (size_t)t * n_heads * hd + (size_t)h * hd;
                for (int x = 0; x < hd; x++)
                    o[x] = 0.0;
                for (int j = 0; j < n_ctx; j++) {
                    const float *vr = kv + (size_t)tables[sq->table0 + j / KATT_BLOCK] * block_stride +
                                      v_off + (size_t)(j % KATT_BLOCK) * hd;
                    for (int x = 0; x < hd; x++)
                        o[x] += sc[j] / sum * (double)vr[x];
                }
            }
        }
    }
}

/* splitmix64 for the test's shapes and shuffles (values come from kst_fill_uniform) */
static uint64_t katt_rng_next(uint64_t *st)
{
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int katt_rng_int(uint64_t *st, int lo, int hi) /* uniform in [lo, hi] */
{
    return lo + (int)(katt_rng_next(st) % (uint64_t)(hi - lo + 1));
}

/* One test call: shapes, sequences (with their group, -1 for none) and groups. */
struct katt_tcase {
    char name[96];
    int hd, n_heads, n_kv, n_layers, layer;
    int ctx_slack; /* added to ctx_bound, as the backend's bucketed bound of a decode graph */
    std::vector<struct katt_seq> seqs;
    std::vector<int> seq_group;
    std::vector<int> group_shared; /* n_shared_blocks per group */
    std::vector<int> group_first, group_count;
};

static void katt_tc_init(struct katt_tcase *c, const char *name, int hd, int n_heads, int n_kv,
                         int n_layers, int layer)
{
    snprintf(c->name, sizeof c->name, "%s hd%d %d/%d", name, hd, n_heads, n_kv);
    c->hd = hd;
    c->n_heads = n_heads;
    c->n_kv = n_kv;
    c->n_layers = n_layers;
    c->layer = layer;
    c->ctx_slack = 0;
}

static void katt_tc_seq(struct katt_tcase *c, int n_new, int pos, int group)
{
    struct katt_seq sq = {0, n_new, pos, 0};
    c->seqs.push_back(sq);
    c->seq_group.push_back(group);
}

/* A group of n members sharing n_shared blocks: decode members with 1..41 own positions past
 * the prefix, and n_prefill prefill members (n_new 2..40) after it. */
static void katt_tc_group(struct katt_tcase *c, uint64_t *rng, int n, int n_shared, int n_prefill)
{
    const int gi = (int)c->group_shared.size();
    c->group_shared.push_back(n_shared);
    c->group_first.push_back((int)c->seqs.size());
    c->group_count.push_back(n);
    for (int m = 0; m < n; m++) {
        const int base = n_shared * KATT_BLOCK;
        if (m < n - n_prefill)
            katt_tc_seq(c, 1, base + katt_rng_int(rng, 0, 40), gi);
        else
            katt_tc_seq(c, katt_rng_int(rng, 2, 40), base + katt_rng_int(rng, 0, 20), gi);
    }
}

#define KATT_POISON 0xffffu /* a bf16 NaN: never a real output */

/* Host side of one test call: block ids, tables, groups, inputs and the reference. */
struct katt_tdata {
    int n_tokens, ctx_bound, n_blocks;
    size_t head_stride, layer_stride, block_stride, n_q, n_kv;
    std::vector<int32_t> tables;
    std::vector<struct katt_group> groups; /* n_seqs slots */
    std::vector<__nv_bfloat16> qb, kvb;    /* what the device gets */
    std::vector<float> qf, kvf;            /* the same values as floats, NaN included */
    std::vector<double> ref;               /* (n_tokens, n_heads * hd) */
};

static void katt_build_case(struct kst *t, uint64_t *rng, struct katt_tcase *c,
                            struct katt_tdata *d)
{
    const int n_seqs = (int)c->seqs.size(), hd = c->hd, n_heads = c->n_heads;
    const int n_groups = (int)c->group_shared.size();
    /* rows, context bound, block ids: each group's shared blocks once, then each sequence's
     * own blocks, all shuffled; one more block of NaN stands for table entries past the end */
    int n_tokens = 0, ctx_bound = 1, n_logical = 0;
    std::vector<int> shared_base((size_t)n_groups);
    for (int gi = 0; gi < n_groups; gi++) {
        shared_base[gi] = n_logical;
        n_logical += c->group_shared[gi];
    }
    std::vector<int> own_base((size_t)n_seqs);
    for (int s = 0; s < n_seqs; s++) {
        struct katt_seq *sq = &c->seqs[s];
        sq->tok0 = n_tokens;
        n_tokens += sq->n_new;
        const int ctx = sq->pos + sq->n_new;
        ctx_bound = ctx > ctx_bound ? ctx : ctx_bound;
        const int gi = c->seq_group[s];
        const int n_sh = gi >= 0 ? c->group_shared[gi] : 0;
        own_base[s] = n_logical;
        n_logical += (ctx + KATT_BLOCK - 1) / KATT_BLOCK - n_sh;
    }
    std::vector<int32_t> perm((size_t)n_logical);
    for (int i = 0; i < n_logical; i++)
        perm[i] = i;
    for (int i = n_logical - 1; i > 0; i--)
        std::swap(perm[i], perm[katt_rng_int(rng, 0, i)]);
    const int32_t nan_block = n_logical, n_blocks = n_logical + 1;
    std::vector<int32_t> &tables = d->tables;
    for (int s = 0; s < n_seqs; s++) {
        struct katt_seq *sq = &c->seqs[s];
        const int gi = c->seq_group[s];
        const int n_sh = gi >= 0 ? c->group_shared[gi] : 0;
        const int nb = (sq->pos + sq->n_new + KATT_BLOCK - 1) / KATT_BLOCK;
        sq->table0 = (int32_t)tables.size();
        for (int b = 0; b < nb; b++)
            tables.push_back(b < n_sh ? perm[shared_base[gi] + b] : perm[own_base[s] + b - n_sh]);
        tables.push_back(nan_block);
        tables.push_back(nan_block);
    }
    /* group descriptors in random slots of the n_seqs-slot array */
    std::vector<struct katt_group> &groups = d->groups;
    groups.assign((size_t)n_seqs, katt_group{0, 0, 0});
    std::vector<int> slots((size_t)n_seqs);
    for (int i = 0; i < n_seqs; i++)
        slots[i] = i;
    for (int i = n_seqs - 1; i > 0; i--)
        std::swap(slots[i], slots[katt_rng_int(rng, 0, i)]);
    for (int gi = 0; gi < n_groups; gi++)
        groups[slots[gi]] = {c->group_first[gi], c->group_count[gi], c->group_shared[gi]};

    /* inputs: random bf16 q and pool; the unused tail of each sequence's last block and the
     * extra block hold NaN, which a correct kernel never lets into an output */
    const size_t head_stride = (size_t)KATT_BLOCK * hd;
    const size_t layer_stride = 2 * (size_t)c->n_kv * head_stride;
    const size_t block_stride = (size_t)c->n_layers * layer_stride;
    const size_t n_q = (size_t)n_tokens * n_heads * hd, n_kv = (size_t)n_blocks * block_stride;
    std::vector<float> &qf = d->qf, &kvf = d->kvf;
    qf.resize(n_q);
    kvf.resize(n_kv);
    kst_fill_uniform(t, qf.data(), n_q, -2.0f, 2.0f);
    kst_fill_uniform(t, kvf.data(), n_kv, -1.0f, 1.0f);
    std::vector<__nv_bfloat16> &qb = d->qb, &kvb = d->kvb;
    qb.resize(n_q);
    kvb.resize(n_kv);
    for (size_t i = 0; i < n_q; i++) {
        qb[i] = __float2bfloat16(qf[i]);
        qf[i] = __bfloat162float(qb[i]);
    }
    for (size_t i = 0; i < n_kv; i++) {
        kvb[i] = __float2bfloat16(kvf[i]);
        kvf[i] = __bfloat162float(kvb[i]);
    }
    {
        __nv_bfloat16_raw nr;
        nr.x = (unsigned short)KATT_POISON;
        const __nv_bfloat16 nan_bf = nr;
        for (size_t i = 0; i < block_stride; i++) {
            kvb[(size_t)nan_block * block_stride + i] = nan_bf;
            kvf[(size_t)nan_block * block_stride + i] = NAN;
        }
        for (int s = 0; s < n_seqs; s++) {
            const struct katt_seq *sq = &c->seqs[s];
            const int ctx = sq->pos + sq->n_new;
            if (ctx % KATT_BLOCK == 0)
                continue;
            const size_t blk = (size_t)tables[sq->table0 + ctx / KATT_BLOCK];
            for (size_t h2 = 0; h2 < block_stride / head_stride; h2++) /* layers x K|V x heads */
                for (int j = ctx % KATT_BLOCK; j < KATT_BLOCK; j++)
                    for (int x = 0; x < hd; x++) {
                        const size_t i = blk * block_stride + h2 * head_stride + (size_t)j * hd + x;
                        kvb[i] = nan_bf;
                        kvf[i] = NAN;
                    }
        }
    }
    /* the reference reads the poisoned pool too: a test whose poison sits in a used slot
     * shows up as a NaN reference (and a failed check), not as a kernel bug */
    std::vector<double> &ref = d->ref;
    ref.resize(n_q);
    katt_host_ref(qf.data(), kvf.data(), block_stride, layer_stride, head_stride, c->layer,
                  tables.data(), c->seqs.data(), n_seqs, n_heads, c->n_kv, hd,
                  1.0 / sqrt((double)hd), ref.data());

    d->n_tokens = n_tokens;
    d->ctx_bound = ctx_bound + c->ctx_slack;
    d->n_blocks = n_blocks;
    d->head_stride = head_stride;
    d->layer_stride = layer_stride;
    d->block_stride = block_stride;
    d->n_q = n_q;
    d->n_kv = n_kv;
}

/* Runs both device paths on one case and checks them against the host reference. */
static void katt_run_case(struct kst *t, uint64_t *rng, struct katt_tcase *c)
{
    const int n_seqs = (int)c->seqs.size(), hd = c->hd, n_heads = c->n_heads;
    char err[512];
    const size_t err_len = sizeof err;
    err[0] = 0;
    /* device buffers first: the fail path frees them */
    __nv_bfloat16 *d_q = nullptr, *d_out = nullptr, *d_kv = nullptr;
    int32_t *d_tables = nullptr;
    struct katt_seq *d_seqs = nullptr;
    struct katt_group *d_groups = nullptr;
    void *d_ws = nullptr;
    cudaStream_t st = nullptr;
    struct katt_tdata td;
    katt_build_case(t, rng, c, &td);
    const int n_tokens = td.n_tokens, ctx_bound = td.ctx_bound;
    const size_t n_q = td.n_q, n_kv = td.n_kv;
    const std::vector<int32_t> &tables = td.tables;
    const std::vector<struct katt_group> &groups = td.groups;
    const std::vector<double> &ref = td.ref;
    const size_t block_stride = td.block_stride, layer_stride = td.layer_stride,
                 head_stride = td.head_stride;

    {
        const size_t ws_bytes = katt_workspace_bytes(n_seqs, n_tokens, n_heads, hd, ctx_bound);
        KTRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        KTRY(cudaMalloc((void **)&d_q, n_q * sizeof *d_q));
        KTRY(cudaMalloc((void **)&d_out, n_q * sizeof *d_out));
        KTRY(cudaMalloc((void **)&d_kv, n_kv * sizeof *d_kv));
        KTRY(cudaMalloc((void **)&d_tables, tables.size() * sizeof *d_tables));
        KTRY(cudaMalloc((void **)&d_seqs, (size_t)n_seqs * sizeof *d_seqs));
        KTRY(cudaMalloc((void **)&d_groups, (size_t)n_seqs * sizeof *d_groups));
        KTRY(cudaMalloc(&d_ws, ws_bytes));
        KTRY(cudaMemcpy(d_q, td.qb.data(), n_q * sizeof *d_q, cudaMemcpyHostToDevice));
        KTRY(cudaMemcpy(d_kv, td.kvb.data(), n_kv * sizeof *d_kv, cudaMemcpyHostToDevice));
        KTRY(cudaMemcpy(d_tables, tables.data(), tables.size() * sizeof *d_tables,
                        cudaMemcpyHostToDevice));
        KTRY(cudaMemcpy(d_seqs, c->seqs.data(), (size_t)n_seqs * sizeof *d_seqs,
                        cudaMemcpyHostToDevice));
        KTRY(cudaMemcpy(d_groups, groups.data(), (size_t)n_seqs * sizeof *d_groups,
                        cudaMemcpyHostToDevice));
        /* poison the workspace too: a merge that reads an unwritten partial gives NaN */
        KTRY(cudaMemset(d_ws, 0xff, ws_bytes));
        /* The copies and the memset above went to the legacy stream, which the non-blocking
         * stream `st` does not wait for (a pageable cudaMemcpy may return before its DMA lands,
         * cudaMemset returns at once): without this the kernels could read unfinished inputs
         * or have their partials overwritten by the poison. */
        KTRY(cudaDeviceSynchronize());

        struct katt_args a;
        memset(&a, 0, sizeof a);
        a.q = d_q;
        a.out = d_out;
        a.kv = d_kv;
        a.block_stride = block_stride;
        a.layer_stride = layer_stride;
        a.head_stride = head_stride;
        a.layer = c->layer;
        a.tables = d_tables;
        a.seqs = d_seqs;
        a.n_seqs = n_seqs;
        a.n_tokens = n_tokens;
        a.groups = d_groups;
        a.ctx_bound = ctx_bound;
        a.n_heads = n_heads;
        a.n_kv_heads = c->n_kv;
        a.head_dim = hd;
        a.scale = (float)(1.0 / sqrt((double)hd));
        a.workspace = d_ws;

        std::vector<uint16_t> outb(n_q);
        std::vector<float> outf(n_q);
        const size_t row = (size_t)n_heads * hd;
        for (int variant = 0; variant < 2; variant++) {
            const char *vname = variant == 0 ? "fast" : "simple";
            KTRY(cudaMemsetAsync(d_out, 0xff, n_q * sizeof *d_out, st));
            KTRY(variant == 0 ? katt_launch_fast(&a, st) : katt_launch_simple(&a, st));
            KTRY(cudaMemcpyAsync(outb.data(), d_out, n_q * sizeof *d_out, cudaMemcpyDeviceToHost,
                                 st));
            KTRY(cudaStreamSynchronize(st));
            int unwritten = 0;
            for (int r = 0; r < n_tokens; r++)
                for (size_t x = 0; x < row; x++)
                    if (outb[(size_t)r * row + x] == KATT_POISON) {
                        unwritten++;
                        break;
                    }
            kst_check(t, unwritten == 0, "%s %s: %d of %d rows not written", c->name, vname,
                      unwritten, n_tokens);
            for (size_t i = 0; i < n_q; i++) {
                __nv_bfloat16_raw r;
                r.x = outb[i];
                outf[i] = __bfloat162float(__nv_bfloat16(r));
            }
            double worst = 0.0;
            int worst_s = 0;
            for (int s = 0; s < n_seqs; s++) {
                const size_t off = (size_t)c->seqs[s].tok0 * row;
                const double e = kst_rel_err(outf.data() + off, ref.data() + off,
                                             (size_t)c->seqs[s].n_new * row);
                if (!(e <= worst)) {
                    worst = e;
                    worst_s = s;
                }
            }
            const struct katt_seq *ws = &c->seqs[worst_s];
            kst_check(t, worst <= 1e-2,
                      "%s %s: rel err %.3g > 1e-2 (worst: seq %d of %d, n_new %d, pos %d, group %d)",
                      c->name, vname, worst, worst_s, n_seqs, ws->n_new, ws->pos,
                      c->seq_group[worst_s]);
        }
    }
    goto done;
fail:
    kst_check(t, 0, "%s: %s", c->name, err);
done:
    cudaFree(d_q);
    cudaFree(d_out);
    cudaFree(d_kv);
    cudaFree(d_tables);
    cudaFree(d_seqs);
    cudaFree(d_groups);
    cudaFree(d_ws);
    if (st)
        cudaStreamDestroy(st);
}

typedef void (*katt_case_fn)(struct kst *t, uint64_t *rng, struct katt_tcase *c);

/* Every case of the suite, each handed to run (the device runner, or a host-only check). */
static void katt_cases(struct kst *t, katt_case_fn run)
{
    uint64_t rng = t->seed ^ 0x6174746e5f6b7374ull;
    t->seed += 0x9e3779b97f4a7c15ull;
    struct katt_tcase c;

    /* decode only: 1..64 sequences, ragged contexts up to ~3000 */
    katt_tc_init(&c, "decode ctx 1", 128, 32, 8, 2, 1);
    katt_tc_seq(&c, 1, 0, -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "decode ctx 2999", 128, 32, 8, 1, 0);
    katt_tc_seq(&c, 1, 2998, -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "decode 13 ragged", 64, 8, 2, 2, 1);
    for (int s = 0; s < 13; s++)
        katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 700), -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "decode 64 ragged", 128, 8, 2, 1, 0);
    for (int s = 0; s < 64; s++)
        katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 3000), -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "decode 5 ragged", 128, 64, 8, 1, 0);
    for (int s = 0; s < 5; s++)
        katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 1200), -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "decode 3 short", 16, 4, 2, 2, 0);
    katt_tc_seq(&c, 1, 15, -1);
    katt_tc_seq(&c, 1, 16, -1);
    katt_tc_seq(&c, 1, 256, -1);
    run(t, &rng, &c);
    c = katt_tcase(); /* a graph's ctx_bound overshoots: more splits, idle CTAs */
    katt_tc_init(&c, "decode 6 + group, bound +1700", 64, 16, 4, 1, 0);
    c.ctx_slack = 1700;
    for (int s = 0; s < 6; s++)
        katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 250), -1);
    katt_tc_group(&c, &rng, 3, 15, 0);
    run(t, &rng, &c);

    /* shared prefixes */
    c = katt_tcase();
    katt_tc_init(&c, "group of 2, 1 block", 16, 4, 2, 2, 1);
    katt_tc_group(&c, &rng, 2, 1, 0);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "groups 16x100 + 3x5 + plain", 128, 8, 2, 1, 0);
    katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 500), -1);
    katt_tc_group(&c, &rng, 16, 100, 0);
    katt_tc_group(&c, &rng, 3, 5, 0);
    katt_tc_group(&c, &rng, 1, 4, 0); /* a group of one is plain paged attention */
    katt_tc_group(&c, &rng, 2, 0, 0); /* nothing shared */
    katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 500), -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "group with prefill members", 64, 16, 2, 2, 1);
    katt_tc_group(&c, &rng, 7, 37, 2);
    katt_tc_seq(&c, 30, 0, -1);
    run(t, &rng, &c);
    for (int it = 0; it < 3; it++) {
        static const int hds[3] = {32, 64, 128};
        c = katt_tcase();
        katt_tc_init(&c, "random groups", hds[it], 4 << it, 2, 1, 0);
        const int n_g = katt_rng_int(&rng, 1, 3);
        for (int gi = 0; gi < n_g; gi++)
            katt_tc_group(&c, &rng, katt_rng_int(&rng, 2, 16), katt_rng_int(&rng, 1, 100), 0);
        katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 300), -1);
        run(t, &rng, &c);
    }

    /* prefill, with and without cached positions */
    c = katt_tcase();
    katt_tc_init(&c, "prefill 300", 128, 32, 8, 1, 0);
    katt_tc_seq(&c, 300, 0, -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "prefill ragged", 64, 8, 4, 2, 1);
    katt_tc_seq(&c, 2, 0, -1);
    katt_tc_seq(&c, 17, 5, -1);
    katt_tc_seq(&c, 64, 100, -1);
    katt_tc_seq(&c, 65, 0, -1);
    katt_tc_seq(&c, 129, 333, -1);
    run(t, &rng, &c);
    c = katt_tcase();
    katt_tc_init(&c, "prefill random", 16, 4, 2, 2, 1);
    for (int s = 0; s < 3; s++)
        katt_tc_seq(&c, katt_rng_int(&rng, 2, 300), katt_rng_int(&rng, 0, 1) * katt_rng_int(&rng, 0, 400), -1);
    run(t, &rng, &c);

    /* mixed calls: every head_dim and GQA ratio */
    static const int mixed_hd[4] = {16, 32, 64, 128};
    for (int hi = 0; hi < 4; hi++) {
        for (int rep = 1; rep <= 8; rep *= 2) {
            c = katt_tcase();
            katt_tc_init(&c, "mixed", mixed_hd[hi], 2 * rep, 2, 2, 1);
            katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 200), -1);
            katt_tc_seq(&c, katt_rng_int(&rng, 2, 70), 0, -1);
            katt_tc_group(&c, &rng, 3, katt_rng_int(&rng, 1, 6), 1);
            katt_tc_seq(&c, katt_rng_int(&rng, 2, 40), katt_rng_int(&rng, 1, 90), -1);
            katt_tc_seq(&c, 1, katt_rng_int(&rng, 0, 40), -1);
            run(t, &rng, &c);
        }
    }
}

void kst_suite_attention(struct kst *t)
{
    katt_cases(t, katt_run_case);
}
