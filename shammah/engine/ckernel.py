"""The fast path's small C kernels: the LoRA, and decode's int4 matmuls where torch's are slow.

**The LoRA** (:class:`Site`): one call per fused matmul and token, its weights in bf16. With a LoRA
r16 on every projection of the embedded model torch spent ~3.7 ms a token on it, in ~240 small
ops (x·A, the blocked B, the add), each a full aten call on a matrix of a few KB. Here a site
(q/k/v, o, gate/up or down of one layer) is one C call that reads x once, computes z = x·A and
adds z·B into the output in place (fp32 sums): ~1.2–1.6 ms a token. No library does this:
oneDNN's bf16 and torch's int8 kernels cost ~17 us a small matmul on a CPU and a call per
product, and the LoRA is not the weight of a ``torch.nn.Linear`` that a library could fuse.

**The int4 matmuls** (:class:`Q4`), for decode and prompts: torch's int4 kernel takes bf16
activations and, on CPUs without native bf16, emulates them (64% of a decode step and ~87% of a
prompt on an AVX2 EPYC, ~80 GFLOP/s). Here x is quantized to int8 with a scale per 16 values,
and what that rounding left to int8 again (two passes: finer than bf16), and multiplied in integer
SIMD as llama.cpp does, with the rows interleaved in blocks of 8 so one multiply serves 8 rows and
needs no horizontal sums (``q4_tile``): ~2-3x torch's on decode's one row, ~1.3x on prompts. One
int8 pass was twice as fast again, but its rounding tipped near ties in the first token (the
embedded model answered "What is the capital of France?" in French) and greedy answers followed
the float model's for 0-13 tokens on 3 of 5 prompts where two passes follow it for 32 on 4. The
row blocks are split over the threads of the OpenMP runtime torch itself loaded. Only this copy of
the weights is kept.

**Decode's whole step** (:class:`Step`), where those int4 matmuls are in C: one call a token runs
every layer (RMSNorm, q/k/v and its LoRA, Qwen3's head norms, RoPE, the KV cache, attention of
one query, o, gate/up, SiLU, down). Around the matmuls fast.py's forward spent ~30 small torch ops
a layer, 5.2–5.4 ms of a 13.7 ms token on the embedded model (more than llama.cpp's whole token
spends on anything but its matmuls); in C they are ~0.3 ms. Prompts go through fast.py's torch
ops around the same int4 matmuls.

The source is compiled once per machine with the system's C compiler (``cc``, ~0.3 s) into the
cache, and checked against torch before it is used. Without a compiler, or if a check fails, the
fast path runs in torch ops as before, and :func:`load` says why. ``SHAMMAH_LORA_KERNEL=off``
turns both off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# AVX2 intrinsics where the compiler targets them (-march=native), else plain loops the compiler
# vectorizes (the dot products' sums reordered by an OpenMP simd reduction, which needs no OpenMP
# runtime). The plain loops were ~2x slower on an AVX2 EPYC (one FMA chain per sum), hence both.
SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int k, r_total, r, n_parts;
    const uint16_t *A;  /* bf16 [r_total][k]: the parts' A matrices stacked */
    const uint16_t *B;  /* bf16, per part p: [r][n_p] (B^T, the LoRA scaling in it), one after another */
    int sizes[8];       /* n_p */
} Site;

typedef struct {       /* an int4 weight [n][k], n a multiple of 8: rows in blocks of 8, per block */
    const uint8_t *q;   /* and group of 32 128 bytes (see q4_tile) */
    const uint16_t *sm; /* per block and group 8 scales then 8 mins in fp16, as GGUF's Q4_1 */
    const float *bias;  /* [n] or NULL */
    int k, n;
} W4;

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(SHAMMAH_GENERIC)
#include <immintrin.h>
static inline __m256 load8(const uint16_t *p) {  /* eight bf16 as eight floats: a shift */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline float bf(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}
static float dot(const float *x, const uint16_t *a, int k) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {  /* two sums: an FMA's latency is four of its issue slots */
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(a + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(a + i + 8), s1);
    }
    float sum = hsum(_mm256_add_ps(s0, s1));
    for (; i < k; i++) sum += x[i] * bf(a[i]);
    return sum;
}
static void axpy(float *y, float z, const uint16_t *b, int n) {  /* y += z * b */
    const __m256 zv = _mm256_set1_ps(z);
    int o = 0;
    for (; o + 8 <= n; o += 8) _mm256_storeu_ps(y + o, _mm256_fmadd_ps(zv, load8(b + o), _mm256_loadu_ps(y + o)));
    for (; o < n; o++) y[o] += z * bf(b[o]);
}
/* The packed base: int4 weights in groups of 32 with a scale and a min each (fp16), times x
   quantized to int8 with a scale per 16 values (llama.cpp's Q8 blocks are 32 values: on the
   embedded model that cost 3.3% of perplexity, per 16 values 0.6%) in two passes (see quant16),
   in integer SIMD.
   The rows are interleaved in blocks of 8 so that one maddubs multiplies 4 values of x (one
   broadcast) by the same 4 columns of 8 rows: its sums land in one lane per row and need no
   horizontal add, and a group of 32 costs 8 maddubs and a few float ops per row block. Per block
   and group: 4 chunks of 32 bytes (byte j: row j/4, column 8c + j%4 in its low nibble and 8c + 4
   + j%4 in its high one), then the 8 rows' scales and their 8 mins. The same layout serves one
   row of x (decode) and many (prompts): there each unpacked group is used for 4 rows of x at a
   time. On an AVX2 EPYC ~2-3x torch's int4 kernel (bf16 activations emulated) for one row, ~1.3x
   for a prompt's. */
int shammah_has_q4(void) { return 1; }
/* x (k fp32 values) -> int8 with a scale per 16 values (dx), the sum of each group of 32 (xs),
   and what that rounding left, in int8 at 1/254 of the scale (qr, dr): x = dx qx + dr qr within
   1/64516 of each block's largest value, finer than bf16 (1/256 of each value) */
static void quant16(const float *x, int k, int8_t *qx, float *dx, float *xs, int8_t *qr, float *dr) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int h = 0; h < k / 16; h++) {  /* a scale per 16 values: one outlier coarsens fewer */
        const __m256 a = _mm256_loadu_ps(x + h * 16), b = _mm256_loadu_ps(x + h * 16 + 8);
        const __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b));
        __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        r = _mm_max_ps(r, _mm_movehl_ps(r, r));
        const float amax = _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
        const __m256 inv = _mm256_set1_ps(amax > 0 ? 127 / amax : 0);
        const __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(a, inv)), qb = _mm256_cvtps_epi32(_mm256_mul_ps(b, inv));
        /* 16 int32 -> 16 int8 in order: packs interleaves the 128-bit halves, the permute undoes it */
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xD8);
        _mm_storeu_si128((__m128i *)(qx + h * 16), _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
        dx[h] = amax / 127;
        {  /* |x - dx q| <= dx / 2: at dx / 254 it fits int8 */
            const __m256 d = _mm256_set1_ps(amax / 127), inv2 = _mm256_set1_ps(amax > 0 ? 254 * 127 / amax : 0);
            const __m256i ra = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_fnmadd_ps(_mm256_cvtepi32_ps(qa), d, a), inv2));
            const __m256i rb = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_fnmadd_ps(_mm256_cvtepi32_ps(qb), d, b), inv2));
            const __m256i pr = _mm256_permute4x64_epi64(_mm256_packs_epi32(ra, rb), 0xD8);
            _mm_storeu_si128((__m128i *)(qr + h * 16), _mm_packs_epi16(_mm256_castsi256_si128(pr), _mm256_extracti128_si256(pr, 1)));
            dr[h] = amax / (127 * 254);
        }
        const float half = hsum(_mm256_add_ps(a, b));
        if (h % 2) xs[h / 2] += half;
        else xs[h / 2] = half;
    }
}
/* the 8 rows of one block times one int8 row of x over group g, scaled by x's scales: 8 floats */
static inline __attribute__((always_inline)) __m256 q4_group(const __m256i *lo, const __m256i *hi, const int8_t *x,
                                                             const float *dxg) {
    const __m256i ones = _mm256_set1_epi16(1);
    int32_t xi[8];  /* the group's 32 values of x as 8 broadcastable fours */
    memcpy(xi, x, 32);
    /* x in [-127, 127] and w in [0, 15]: 8 maddubs sums reach 8 * 2 * 1905 < 2^15 */
    __m256i s0 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(xi[0]));
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(hi[0], _mm256_set1_epi32(xi[1])));
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(lo[1], _mm256_set1_epi32(xi[2])));
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(hi[1], _mm256_set1_epi32(xi[3])));
    __m256i s1 = _mm256_maddubs_epi16(lo[2], _mm256_set1_epi32(xi[4]));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(hi[2], _mm256_set1_epi32(xi[5])));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(lo[3], _mm256_set1_epi32(xi[6])));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(hi[3], _mm256_set1_epi32(xi[7])));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1, ones)), _mm256_set1_ps(dxg[1]),
                           _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0, ones)), _mm256_set1_ps(dxg[0])));
}
/* y[t][0..8) (+)= the 8 rows of one block times T rows of x, each in its two int8 passes (qx, dx:
   x rounded; qr, dr: what that left; row strides K and K/16) and its sums per group (xs, K/32) */
static inline __attribute__((always_inline)) void q4_tile(const int T, const int8_t *qx, const float *dx,
        const float *xs, const int8_t *qr, const float *dr, const W4 *w, int rb, float *y, long ys, int accumulate) {
    const int K = w->k, G = K / 32;
    const uint8_t *qb = w->q + (long)rb * G * 128;
    const uint16_t *smb = w->sm + (long)rb * G * 16;
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const uint8_t *wg = qb + g * 128;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(smb + g * 16)));
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(smb + g * 16 + 8)));
        __m256i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(wg + 32 * c));
            lo[c] = _mm256_and_si256(b, m4);
            hi[c] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
        }
        for (int t = 0; t < T; t++) {
            const __m256 f = _mm256_add_ps(q4_group(lo, hi, qx + (long)t * K + g * 32, dx + (long)t * (K / 16) + 2 * g),
                                           q4_group(lo, hi, qr + (long)t * K + g * 32, dr + (long)t * (K / 16) + 2 * g));
            acc[t] = _mm256_fmadd_ps(f, d, acc[t]);
            acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[(long)t * G + g]), acc[t]);
        }
    }
    const __m256 bias = w->bias ? _mm256_loadu_ps(w->bias + rb * 8) : _mm256_setzero_ps();
    for (int t = 0; t < T; t++) {
        __m256 o = _mm256_add_ps(acc[t], bias);
        if (accumulate) o = _mm256_add_ps(o, _mm256_loadu_ps(y + t * ys));
        _mm256_storeu_ps(y + t * ys, o);
    }
}
/* y (+)= W x for one row of x (decode) */
static void q4_vec(const float *x, const W4 *w, float *y, int accumulate) {
    int8_t qx[w->k], qr[w->k];
    float dx[w->k / 16], dr[w->k / 16], xs[w->k / 32];
    quant16(x, w->k, qx, dx, xs, qr, dr);
    /* row blocks over the threads of the OpenMP runtime torch itself loaded (libgomp: one pool) */
#pragma omp parallel for schedule(static) if (w->n >= 256)
    for (int rb = 0; rb < w->n / 8; rb++) q4_tile(1, qx, dx, xs, qr, dr, w, rb, y + rb * 8, 0, accumulate);
}
/* y (+)= x W^T for t rows of x (row strides in floats): x quantized once, then each row block's
   unpacked groups used for 4 rows of x at a time */
static void q4_mm(const float *x, long xst, int t, const W4 *w, float *y, long ys, int accumulate) {
    const int K = w->k, G = K / 32;
    int8_t *qx = malloc((size_t)2 * t * K);
    float *dx = malloc(sizeof(float) * t * (2 * (K / 16) + G));
    if (!qx || !dx) {  /* no memory for a prompt's int8 copy: row by row */
        free(qx), free(dx);
        for (int i = 0; i < t; i++) q4_vec(x + i * xst, w, y + i * ys, accumulate);
        return;
    }
    int8_t *qr = qx + (long)t * K;
    float *dr = dx + (long)t * (K / 16), *xs = dr + (long)t * (K / 16);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int i = 0; i < t; i++)
            quant16(x + i * xst, K, qx + (long)i * K, dx + (long)i * (K / 16), xs + (long)i * G, qr + (long)i * K,
                    dr + (long)i * (K / 16));
#pragma omp for schedule(static)
        for (int rb = 0; rb < w->n / 8; rb++) {
#define AT(i) qx + (long)(i) * K, dx + (long)(i) * (K / 16), xs + (long)(i) * G, qr + (long)(i) * K, dr + (long)(i) * (K / 16), w, rb, y + (i) * ys + rb * 8, ys, accumulate
            int i = 0;
            for (; i + 4 <= t; i += 4) q4_tile(4, AT(i));
            for (; i < t; i++) q4_tile(1, AT(i));
#undef AT
        }
    }
    free(qx), free(dx);
}
#else  /* any other CPU: loops the compiler vectorizes */
int shammah_has_q4(void) { return 0; }  /* the packed base stays with torch's int4 kernel */
static void q4_vec(const float *x, const W4 *w, float *y, int accumulate) {}
static void q4_mm(const float *x, long xst, int t, const W4 *w, float *y, long ys, int accumulate) {}
static inline float bf(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static float dot(const float *x, const uint16_t *a, int k) {
    float sum = 0;
#pragma omp simd reduction(+:sum)
    for (int i = 0; i < k; i++) sum += x[i] * bf(a[i]);
    return sum;
}
static void axpy(float *y, float z, const uint16_t *b, int n) {
#pragma omp simd
    for (int o = 0; o < n; o++) y[o] += z * bf(b[o]);
}
#endif

static void site_row(const float *x, const Site *s, float *y) {
    float z[s->r_total];
    for (int j = 0; j < s->r_total; j++) z[j] = dot(x, s->A + (long)j * s->k, s->k);
    const uint16_t *b = s->B;
    for (int p = 0; p < s->n_parts; p++) {
        const int n = s->sizes[p];
        for (int q = 0; q < s->r; q++, b += n) axpy(y, z[p * s->r + q], b, n);
        y += n;
    }
}

/* y[i] += LoRA(x[i]) for the t rows of x (row strides in floats) */
void shammah_lora(const float *x, long xs, int t, const Site *s, float *y, long ys) {
    for (int i = 0; i < t; i++) site_row(x + i * xs, s, y + i * ys);
}

/* y (+)= x W^T for the t rows of x (row strides in floats) */
void shammah_q4(const float *x, long xs, int t, int k, int n, const uint8_t *q, const uint16_t *sm,
                const float *bias, float *y, long ys, int accumulate) {
    const W4 w = {q, sm, bias, k, n};
    if (t == 1) q4_vec(x, &w, y, accumulate);
    else q4_mm(x, xs, t, &w, y, ys, accumulate);
}

/* --- one decode step through every layer -------------------------------------------------- */
typedef struct {
    W4 qkv, o, gate_up, down;
    const float *norm1, *norm2, *q_norm, *k_norm;  /* RMSNorm weights; q/k per head (Qwen3) or NULL */
} Layer;

typedef struct {
    int n_layers, hidden, inter, n_heads, n_kv, hd;
    long cap;                /* positions the KV cache holds */
    float eps;
    const Layer *layers;
    float *const *k, *const *v;  /* per layer [n_kv][cap][hd] */
    const Site *const *lora;     /* [n_layers][4] (qkv, o, gate_up, down), NULL where none */
    float *scores;               /* [n_heads][cap] */
} Model;

static void rms(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0;
#pragma omp simd reduction(+:ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static float dotf(const float *a, const float *b, int n) {
    float s = 0;
#pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* x (the residual stream, fp32 [hidden]) through every layer at position pos: RMSNorm, q/k/v with
   its LoRA, per-head norms, RoPE (q/k rows in pair order; rope: [hd/2] (cos, sin) for pos), the KV
   cache, attention of one query, o, RMSNorm, gate/up, SiLU, down: what fast.py's forward does in
   ~30 torch ops a layer, in one call a token */
void shammah_step(const Model *m, float *x, int pos, const float *rope) {
    const int H = m->hidden, I = m->inter, nh = m->n_heads, nkv = m->n_kv, hd = m->hd;
    const int qd = nh * hd, kd = nkv * hd, grp = nh / nkv;
    const long cap = m->cap;
    int wide = H > I ? H : I;
    if (qd > wide) wide = qd;
    float xn[wide], buf[qd + 2 * kd > 2 * I ? qd + 2 * kd : 2 * I];
    const float scale = 1.0f / sqrtf((float)hd);
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *ly = m->layers + l;
        const Site *const *lo = m->lora ? m->lora + 4 * l : 0;
        float *K = m->k[l], *V = m->v[l];
        rms(x, ly->norm1, H, m->eps, xn);
        q4_vec(xn, &ly->qkv, buf, 0);
        if (lo && lo[0]) site_row(xn, lo[0], buf);
        if (ly->q_norm) {
            for (int h = 0; h < nh; h++) rms(buf + h * hd, ly->q_norm, hd, m->eps, buf + h * hd);
            for (int h = 0; h < nkv; h++) rms(buf + qd + h * hd, ly->k_norm, hd, m->eps, buf + qd + h * hd);
        }
        for (int h = 0; h < nh + nkv; h++) {
            float *v = buf + h * hd;
            for (int i = 0; i < hd / 2; i++) {
                const float a = v[2 * i], b = v[2 * i + 1], c = rope[2 * i], s = rope[2 * i + 1];
                v[2 * i] = a * c - b * s;
                v[2 * i + 1] = a * s + b * c;
            }
        }
        for (int h = 0; h < nkv; h++) {
            memcpy(K + (h * cap + pos) * hd, buf + qd + h * hd, hd * sizeof(float));
            memcpy(V + (h * cap + pos) * hd, buf + qd + kd + h * hd, hd * sizeof(float));
        }
        const int n = pos + 1;
#pragma omp parallel for schedule(static) if (nh * n >= 8192)
        for (int h = 0; h < nh; h++) {
            const float *q = buf + h * hd, *Kh = K + (h / grp) * cap * hd, *Vh = V + (h / grp) * cap * hd;
            float *s = m->scores + h * cap, *out = xn + h * hd, mx = -INFINITY, sum = 0;
            for (int j = 0; j < n; j++) {
                s[j] = dotf(q, Kh + (long)j * hd, hd) * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (int j = 0; j < n; j++) sum += (s[j] = expf(s[j] - mx));
            for (int i = 0; i < hd; i++) out[i] = 0;
            for (int j = 0; j < n; j++) {
                const float p = s[j] / sum, *vj = Vh + (long)j * hd;
#pragma omp simd
                for (int i = 0; i < hd; i++) out[i] += p * vj[i];
            }
        }
        q4_vec(xn, &ly->o, x, 1);
        if (lo && lo[1]) site_row(xn, lo[1], x);
        rms(x, ly->norm2, H, m->eps, xn);
        q4_vec(xn, &ly->gate_up, buf, 0);
        if (lo && lo[2]) site_row(xn, lo[2], buf);
        for (int i = 0; i < I; i++) xn[i] = buf[i] / (1.0f + expf(-buf[i])) * buf[I + i];
        q4_vec(xn, &ly->down, x, 1);
        if (lo && lo[3]) site_row(xn, lo[3], x);
    }
}
"""

MAX_PARTS = 8
FP16_MAX = 65504.0


class _Site(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_int),
        ("r_total", ctypes.c_int),
        ("r", ctypes.c_int),
        ("n_parts", ctypes.c_int),
        ("A", ctypes.c_void_p),
        ("B", ctypes.c_void_p),
        ("sizes", ctypes.c_int * MAX_PARTS),
    ]


ROWS_IN_C = 8  # LoRA inputs of up to this many rows (decode) go through C; a prompt through torch's matmuls


class Site:
    """One fused matmul's LoRA in the kernel's layout: :meth:`add` does y += x A^T B^T per part."""

    __slots__ = ("_fn", "_struct", "_addr", "_a", "_b", "_r", "_sizes", "_fp32")

    def __init__(self, fn, a: list[torch.Tensor], b: list[torch.Tensor]):
        """``a``: each part's A [r, k]; ``b``: each part's B [n_p, r] (scaling folded in), in the
        output order of the fused matmul. Every part has the same rank r."""
        r = a[0].shape[0]
        qa = torch.cat([t.float() for t in a]).to(torch.bfloat16).contiguous()
        qb = torch.cat([t.float().t().reshape(-1) for t in b]).to(torch.bfloat16).contiguous()  # [r, n_p] each
        self._sizes = [t.shape[0] for t in b]
        self._fn, self._r, self._a = fn, r, qa
        self._b = [q.view(r, n) for q, n in zip(qb.split([r * n for n in self._sizes]), self._sizes, strict=True)]
        sizes = (ctypes.c_int * MAX_PARTS)(*self._sizes)
        self._struct = _Site(qa.shape[1], qa.shape[0], r, len(self._sizes), qa.data_ptr(), qb.data_ptr(), sizes)
        self._addr = ctypes.addressof(self._struct)
        self._fp32 = None  # (A^T, [B^T per part]) in fp32 for prompts, made at the first one

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the LoRA of x, in place. x: fp32 [t, k], y: fp32 [t, n]; rows may be strided, each
        row contiguous."""
        t = x.shape[0]
        if t <= ROWS_IN_C:
            self._fn(x.data_ptr(), x.stride(0), t, self._addr, y.data_ptr(), y.stride(0))
            return
        # a prompt: the C loop would read x row by row (~0.5 ms a token on the embedded model).
        # fp32 copies kept (a few MB an adapter): converting at each prompt cost ~30 ms of a
        # Qwen3-0.6B first token
        if self._fp32 is None:
            self._fp32 = (self._a.t().float(), [b.float() for b in self._b])
        a, bs = self._fp32
        z = x @ a
        off = 0
        for p, (n, b) in enumerate(zip(self._sizes, bs, strict=True)):
            y[:, off : off + n].addmm_(z[:, p * self._r : (p + 1) * self._r], b)
            off += n


class Q4:
    """An int4 weight [n, k] laid out for ``shammah_q4``: y = x W^T (+ bias), for decode's row and
    for prompts. Rows in blocks of 8 interleaved as q4_tile reads them (``n`` a multiple of 8)."""

    __slots__ = ("_fn", "_q", "_sm", "_bias", "_bias_ptr", "k", "n")

    def __init__(self, fn, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bias: torch.Tensor | None):
        n, k = q.shape
        nb, G = n // 8, k // 32
        # [block, row, group, chunk c, nibble h, column j]: column 8c + 4h + j of the group
        g = q.to(torch.uint8).view(nb, 8, G, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # -> block, group, c, row, j, h
        self._q = (g[..., 0] | (g[..., 1] << 4)).contiguous()
        per_block = [t.float().reshape(nb, 8, G).transpose(1, 2) for t in (scale, lo)]  # [block, group, row]
        self._sm = torch.stack(per_block, 2).to(torch.float16).contiguous()  # GGUF's Q4_1 keeps fp16 too
        self._bias = bias.float().contiguous() if bias is not None else None
        self._bias_ptr = self._bias.data_ptr() if self._bias is not None else None
        self._fn, self.k, self.n = fn, k, n

    def w4(self) -> _W4:
        return _W4(self._q.data_ptr(), self._sm.data_ptr(), self._bias_ptr, self.k, self.n)

    @property
    def nbytes(self) -> int:
        return self._q.numel() + self._sm.numel() * 2 + (self._bias.numel() * 4 if self._bias is not None else 0)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ bias), fp32 [t, n]. x: fp32 [t, k], each row contiguous."""
        y = torch.empty(x.shape[0], self.n)
        self._fn(x.data_ptr(), x.stride(0), x.shape[0], self.k, self.n, self._q.data_ptr(), self._sm.data_ptr(),
                 self._bias_ptr, y.data_ptr(), self.n, 0)  # fmt: skip
        return y

    def add(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += x W^T (+ bias), in place."""
        self._fn(x.data_ptr(), x.stride(0), x.shape[0], self.k, self.n, self._q.data_ptr(), self._sm.data_ptr(),
                 self._bias_ptr, out.data_ptr(), out.stride(0), 1)  # fmt: skip


P_, I_ = ctypes.c_void_p, ctypes.c_int


class _W4(ctypes.Structure):
    _fields_ = [("q", P_), ("sm", P_), ("bias", P_), ("k", I_), ("n", I_)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _W4), ("o", _W4), ("gate_up", _W4), ("down", _W4)] + [
        (f, P_) for f in ("norm1", "norm2", "q_norm", "k_norm")
    ]


class _Model(ctypes.Structure):
    _fields_ = [(f, I_) for f in ("n_layers", "hidden", "inter", "n_heads", "n_kv", "hd")] + [
        ("cap", ctypes.c_long),
        ("eps", ctypes.c_float),
        ("layers", P_),
        ("k", P_),
        ("v", P_),
        ("lora", P_),
        ("scores", P_),
    ]


SITES = ("qkv", "o", "gate_up", "down")  # a layer's LoRA sites, in the order shammah_step takes them


class Step:
    """A whole decode step (one token through every layer) in one C call: ``shammah_step``.

    Built from the fast decoder's layers when decode's int4 matmuls run in C: the ~30 small torch
    ops a layer around them (norms, RoPE, the KV cache, attention, SiLU, adds) were ~5.3 ms of a
    13.7 ms token on the embedded model, more than llama.cpp's whole token's matmuls leave. The KV
    cache stays the decoder's fp32 tensors (prompts fill it through torch)."""

    def __init__(self, fn, layers: list, dims: dict, eps: float):
        """``layers``: per layer a dict of the four :class:`Q4` (``SITES``) and the fp32 norm
        weights norm1, norm2, q_norm, k_norm (None where the model has none)."""
        self._fn = fn
        self._keep = layers  # the tensors the structs point into
        arr = (_Layer * len(layers))()
        for s, ly in zip(arr, layers, strict=True):
            for site in SITES:
                setattr(s, site, ly[site].w4())
            for f in ("norm1", "norm2", "q_norm", "k_norm"):
                t = ly[f]
                setattr(s, f, t.data_ptr() if t is not None else None)
        self._layers = arr
        self.n = len(layers)
        self._model = _Model(self.n, *(dims[f] for f in ("hidden", "inter", "n_heads", "n_kv", "hd")), 0, eps)
        self._model.layers = ctypes.addressof(arr)
        self._lora = (P_ * (4 * self.n))()
        self._lora_keep = None
        self.ready = False  # a KV cache attached, and a LoRA (if any) all in C Sites

    def cache(self, k: list[torch.Tensor], v: list[torch.Tensor], scores: torch.Tensor) -> None:
        """The decoder's KV cache (per layer fp32 [n_kv, cap, hd], contiguous) and an fp32
        [n_heads, cap] scratch for the attention scores."""
        self._kv = ((P_ * self.n)(*(t.data_ptr() for t in k)), (P_ * self.n)(*(t.data_ptr() for t in v)))
        self._scores = scores
        m = self._model
        m.cap, m.scores = k[0].shape[1], scores.data_ptr()
        m.k, m.v = ctypes.addressof(self._kv[0]), ctypes.addressof(self._kv[1])

    def set_lora(self, layers: list[dict] | None) -> bool:
        """Point the step at a loaded LoRA (fast.load_lora's layers; None: none). False where some
        site is not a C :class:`Site` (the step then cannot run it)."""
        if layers is None:
            self._model.lora, self._lora_keep = None, None
            return True
        if any(type(s) is not Site for ly in layers for s in ly.values()):
            return False
        for i, ly in enumerate(layers):
            for j, site in enumerate(SITES):
                self._lora[4 * i + j] = ly[site]._addr if site in ly else None
        self._model.lora, self._lora_keep = ctypes.addressof(self._lora), layers
        return True

    def run(self, x: torch.Tensor, pos: int, rope: int) -> None:
        """x (fp32 [hidden], contiguous): the residual stream, updated in place through every layer
        at position ``pos``; ``rope``: the address of pos's [hd/2] (cos, sin) pairs."""
        self._fn(ctypes.addressof(self._model), x.data_ptr(), pos, rope)


class Kernel:
    def __init__(self, lib: ctypes.CDLL, path: Path):
        fn = lib.shammah_lora
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        self._fn, self.path = fn, path
        self.has_q4 = bool(lib.shammah_has_q4())
        q4 = lib.shammah_q4
        q4.restype = None
        P, L, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        q4.argtypes = [P, L, i, i, i, P, P, P, P, L, i]
        self._q4 = q4
        step = lib.shammah_step
        step.restype = None
        step.argtypes = [P, P, i, P]
        self._step = step

    def step(self, layers: list, dims: dict, eps: float) -> Step | None:
        """The whole decode step in C (None where the int4 matmuls are not in C): see :class:`Step`."""
        return Step(self._step, layers, dims, eps) if self.has_q4 else None

    def q4(self, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bias: torch.Tensor | None) -> Q4 | None:
        """The int4 matmul (None where the kernel has no integer SIMD for it, ``n`` is not a
        multiple of 8 or a scale is beyond fp16): ``q`` [n, k] in 0..15, w = q * scale + lo per group of 32 (``scale``,
        ``lo``: [n, k/32])."""
        if not self.has_q4 or q.shape[0] % 8 or float(torch.maximum(scale.abs().max(), lo.abs().max())) > FP16_MAX:
            return None
        return Q4(self._q4, q, scale, lo, bias)

    def site(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> Site:
        if len(a) > MAX_PARTS or len({t.shape[0] for t in a}) != 1:
            raise ValueError("the kernel takes up to 8 parts of one rank")
        return Site(self._fn, a, b)


def _cpu_id() -> str:
    """What the compiled code depends on (``-march=native``): the CPU's model and instruction sets."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(so: Path) -> bool:
    """Whether ``so`` is the file the compiler wrote, as its digest beside it says. A shared library
    cut short (a full disk, a copied cache) is not merely refused by dlopen: mapping it can kill
    the process with SIGBUS, so it is never opened."""
    try:
        return so.with_suffix(".sha256").read_text().strip() == _digest(so)
    except OSError:
        return False


def _compile(cc: str, out: Path, extra: tuple[str, ...] = ()) -> str | None:
    """Compile SOURCE to ``out`` (atomically, its digest beside it); None, or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "lora.c"
        src.write_text(SOURCE)
        err = ""
        for flags in (
            ["-O3", "-march=native", "-fopenmp"],
            ["-O3", "-march=native", "-fopenmp-simd"],
            ["-O3", "-fopenmp-simd"],
            ["-O3"],
        ):
            so = Path(tmp) / "lora.so"
            p = subprocess.run(
                [cc, *flags, *extra, "-std=c99", "-shared", "-fPIC", str(src), "-o", str(so), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if p.returncode == 0:
                digest = Path(tmp) / "lora.sha256"
                digest.write_text(_digest(so))
                os.replace(so, out)
                os.replace(digest, out.with_suffix(".sha256"))
                return None
            err = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
            err = err[0]
        return err


def _self_test(k: Kernel) -> str | None:
    """The kernel against torch on a random site with three parts and two strided rows."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(4, 37, generator=g) for _ in range(3)]
    b = [torch.randn(n, 4, generator=g) for n in (24, 8, 13)]
    x = torch.randn(2, 74, generator=g)[:, :37]  # rows strided like the fast path's RMSNorm output
    y0 = torch.randn(2, 45, generator=g)
    y = y0.clone()
    want = y0 + torch.cat([(x @ ai.t()) @ bi.t() for ai, bi in zip(a, b, strict=True)], -1)
    k.site(a, b).add(x, y)
    err = ((y - want).norm() / (want - y0).norm()).item()  # bf16 weights: ~0.3%
    return None if err < 2e-2 else f"the C LoRA kernel disagrees with torch (relative error {err:.3g})"


def _q4_test(k: Kernel) -> str | None:
    """shammah_q4 against the same int4 weights in fp32, with enough rows for its threads."""
    g = torch.Generator().manual_seed(0)
    n, d = 304, 64
    groups = torch.randn(n, d // 32, 32, generator=g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    w = (q * scale[..., None] + lo[..., None]).reshape(n, d)
    x = torch.randn(6, d, generator=g)  # a tile of 4 rows and single rows
    want = x @ w.t()
    err = ((k.q4(q.reshape(n, d), scale, lo, None).mm(x) - want).norm() / want.norm()).item()
    return None if err < 5e-3 else f"the C int4 matmul disagrees with torch (relative error {err:.3g})"  # ~0.05%


def load(cache: Path | None, extra: tuple[str, ...] = ()) -> tuple[Kernel | None, str]:
    """(the kernel, "") or (None, why not). Compiled into ``cache``/kernels once per source,
    compiler, CPU and ``extra`` compiler flags (the tests build the portable loops with
    ``-DSHAMMAH_GENERIC``)."""
    if os.environ.get("SHAMMAH_LORA_KERNEL", "").lower() in ("0", "off", "no", "false"):
        return None, "SHAMMAH_LORA_KERNEL=off"
    if cache is None:
        return None, "no cache directory to compile the LoRA kernel into"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc) to build the LoRA kernel"
    key = hashlib.sha256("\0".join([SOURCE, cc, platform.machine(), _cpu_id(), *extra]).encode()).hexdigest()[:16]
    so = Path(cache) / "kernels" / f"lora-{key}.so"
    try:
        if not _intact(so):
            err = _compile(cc, so, extra)
            if err is not None:
                return None, f"the LoRA kernel did not compile ({cc}: {err})"
        kernel = Kernel(ctypes.CDLL(str(so)), so)
        bad = _self_test(kernel)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return None, f"the LoRA kernel could not be built or loaded: {e}"
    if bad is not None:
        return None, bad
    if kernel.has_q4 and (bad := _q4_test(kernel)) is not None:
        log.warning("%s: decode keeps torch's int4 kernel", bad)
        kernel.has_q4 = False
    return kernel, ""
