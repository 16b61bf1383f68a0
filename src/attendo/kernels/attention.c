/* softmax(scale·Q·Kᵀ + bias)·V over the keys a mask allows, one query row at a time, so that a
   row's result does not depend on what else is computed with it: batch-invariant.

   Why not torch's fused attention: it splits the keys into blocks and rescales partial sums as it
   goes, and how it does so depends on how many keys there are and on whether there is a mask. A
   sequence decoded alone reads its own keys with no mask; in a batch it reads as many keys as
   the longest sequence, the extra ones masked; the two come out a few units in the last place
   apart, and greedy decoding then picks a different word now and then.

   Here the result for a query depends only on the keys it may see, in the positions they hold:
     1. its score with every allowed key j: scale · (q · k_j) + bias_j, a dot product in a fixed
        order; keys the mask hides (or whose bias is -inf) get -inf;
     2. the largest score m; e^(s_j - m) for every key, in groups of 8 lanes by key position
        (hidden keys give exactly 0, so keys beyond a short sequence's end change no sum);
     3. Σ_j e^(s_j - m)·v_j over allowed keys in key order, divided by the sum of the weights.

   Tensors come as base pointers and element strides (batch, head, position) with the last
   dimension contiguous; a mask or bias may broadcast (stride 0) over any of its dimensions. */

#include <stdlib.h>

#include <omp.h>

#include "internal.h"
#include "simd.h"

enum { LANES = 8 };

/* The keys (and values) AHEAD_KEYS past the ones being read are asked for early (a hint: no
   arithmetic changes). A decode row's keys and values come from memory, and in a batch of 16
   rows at 500 tokens waiting for them was most of attention's time (the hardware prefetcher
   lagged behind). */
enum { AHEAD_KEYS = 32 };
ALWAYS_INLINE void prefetch_rows(const float *row, long stride, int n, int dim) {
    for (int r = 0; r < n; r++)
        for (int d = 0; d < dim; d += 16) __builtin_prefetch(row + r * stride + d);
}

/* fmaxf(top, s) inline (it is a library call unless NaN may be ignored): a NaN score never wins */
ALWAYS_INLINE float larger(float top, float s) { return s > top ? s : top; }

/* ---- scores -------------------------------------------------------------------------------
   A key's score is q·k summed as 8 lanes by dimension (16 with AVX-512, folded to 8: lane i plus
   lane i + 8), each lane's products added in dimension order, then the 8 lanes added by one fixed
   tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), and the dimensions past the last
   whole vector one by one after. score8 computes 8 keys at once, reducing the 8 keys' lanes
   together with horizontal adds (whose pairs make exactly that tree); score1 computes one key the
   same way. So a key's score is the same bits whichever of the two computes it. */

#if ATTENDO_AVX512
enum { DOT_STEP = 16 };
typedef __m512 DotLanes;
ALWAYS_INLINE DotLanes lanes_zero(void) { return _mm512_setzero_ps(); }
ALWAYS_INLINE DotLanes lanes_fma(const float *a, const float *b, DotLanes acc) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b), acc);
}
ALWAYS_INLINE __m256 lanes_fold(DotLanes v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
#elif defined(__AVX2__)
enum { DOT_STEP = 8 };
typedef __m256 DotLanes;
ALWAYS_INLINE DotLanes lanes_zero(void) { return _mm256_setzero_ps(); }
ALWAYS_INLINE DotLanes lanes_fma(const float *a, const float *b, DotLanes acc) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), acc);
}
ALWAYS_INLINE __m256 lanes_fold(DotLanes v) { return v; }
#endif

static float score1(const float *q, const float *k, int dim) {
    int i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    DotLanes acc = lanes_zero();
    for (; i + DOT_STEP <= dim; i += DOT_STEP) acc = lanes_fma(q + i, k + i, acc);
    float l[8];
    _mm256_storeu_ps(l, lanes_fold(acc));
    total = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
#endif
    for (; i < dim; i++) total += q[i] * k[i];
    return total;
}

/* out[0..8) = the scores of keys k, k + stride, ... k + 7·stride. */
static void score8(const float *q, const float *k, long stride, int dim, float *out) {
#ifdef __AVX2__
    DotLanes acc[8];
    for (int j = 0; j < 8; j++) acc[j] = lanes_zero();
    int i = 0;
    for (; i + DOT_STEP <= dim; i += DOT_STEP)
        for (int j = 0; j < 8; j++) acc[j] = lanes_fma(q + i, k + j * stride + i, acc[j]);
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = lanes_fold(acc[j]);
    /* hadd pairs lanes within each 128-bit half: two rounds give, per key, (l0+l1)+(l2+l3) in the
       low half and (l4+l5)+(l6+l7) in the high half; the halves are then added */
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* keys 0-3, keys 4-7 */
    const __m256 low = _mm256_permute2f128_ps(u0, u1, 0x20), high = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(low, high));
    for (; i < dim; i++)
        for (int j = 0; j < 8; j++) out[j] += q[i] * k[j * stride + i];
#else
    for (int j = 0; j < 8; j++) out[j] = score1(q, k + j * stride, dim);
#endif
}

/* out[0..dim) = Σ_j p[j]·v_j over keys j in [from, to) with p[j] != 0, each output value summed
   in key order; the sums stay in registers while the keys go by, a run of dimensions at a time. */
static void weighted_sum(const float *p, int from, int to, const float *v, long v_stride, int dim, float *out) {
    int d = 0;
#if ATTENDO_AVX512
    for (; d + 64 <= dim; d += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = from; j < to; j++) {
            if (p[j] == 0.0f) continue;
            const __m512 w = _mm512_set1_ps(p[j]);
            const float *row = v + j * v_stride + d;
            a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(row), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 32), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 48), a3);
        }
        _mm512_storeu_ps(out + d, a0);
        _mm512_storeu_ps(out + d + 16, a1);
        _mm512_storeu_ps(out + d + 32, a2);
        _mm512_storeu_ps(out + d + 48, a3);
    }
#endif
#ifdef __AVX2__
    for (; d + 32 <= dim; d += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = from; j < to; j++) {
            if (p[j] == 0.0f) continue;
            const __m256 w = _mm256_set1_ps(p[j]);
            const float *row = v + j * v_stride + d;
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 24), a3);
        }
        _mm256_storeu_ps(out + d, a0);
        _mm256_storeu_ps(out + d + 8, a1);
        _mm256_storeu_ps(out + d + 16, a2);
        _mm256_storeu_ps(out + d + 24, a3);
    }
    for (; d + LANES <= dim; d += LANES) {
        __m256 a = _mm256_setzero_ps();
        for (int j = from; j < to; j++)
            if (p[j] != 0.0f) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * v_stride + d), a);
        _mm256_storeu_ps(out + d, a);
    }
#endif
    for (; d < dim; d++) {
        float a = 0.0f;
        for (int j = from; j < to; j++)
            if (p[j] != 0.0f) a += p[j] * v[j * v_stride + d];
        out[d] = a;
    }
}

/* out[i][0..dim) = Σ_j p_i[j]·v_j over keys [from, to), for n <= TILE_QUERIES queries whose
   weights are rows of p, scores_stride apart: each output value summed in key order, exactly as
   weighted_sum sums it for one query (a weight of 0 adds nothing). */
static void weighted_tile(int n, const float *p, long stride, int from, int to, const float *v, long v_stride, int dim,
                          float *const *out) {
    if (n == 1) {
        weighted_sum(p, from, to, v, v_stride, dim, out[0]);
        return;
    }
    int d = 0;
#if ATTENDO_AVX512
    for (; d + 64 <= dim; d += 64) {
        __m512 a[TILE_QUERIES][4];
        for (int i = 0; i < n; i++)
            for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();
        for (int j = from; j < to; j++) {
            const float *row = v + j * v_stride + d;
            if (j + AHEAD_KEYS < to) prefetch_rows(row + AHEAD_KEYS * v_stride, 0, 1, 64);
            const __m512 v0 = _mm512_loadu_ps(row), v1 = _mm512_loadu_ps(row + 16);
            const __m512 v2 = _mm512_loadu_ps(row + 32), v3 = _mm512_loadu_ps(row + 48);
            for (int i = 0; i < n; i++) {
                const __m512 w = _mm512_set1_ps(p[i * stride + j]);
                a[i][0] = _mm512_fmadd_ps(w, v0, a[i][0]);
                a[i][1] = _mm512_fmadd_ps(w, v1, a[i][1]);
                a[i][2] = _mm512_fmadd_ps(w, v2, a[i][2]);
                a[i][3] = _mm512_fmadd_ps(w, v3, a[i][3]);
            }
        }
        for (int i = 0; i < n; i++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(out[i] + d + 16 * c, a[i][c]);
    }
#endif
#ifdef __AVX2__
    for (; d + 16 <= dim; d += 16) {
        __m256 a[TILE_QUERIES][2];
        for (int i = 0; i < n; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int j = from; j < to; j++) {
            const __m256 v0 = _mm256_loadu_ps(v + j * v_stride + d), v1 = _mm256_loadu_ps(v + j * v_stride + d + 8);
            for (int i = 0; i < n; i++) {
                const __m256 w = _mm256_set1_ps(p[i * stride + j]);
                a[i][0] = _mm256_fmadd_ps(w, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(w, v1, a[i][1]);
            }
        }
        for (int i = 0; i < n; i++) {
            _mm256_storeu_ps(out[i] + d, a[i][0]);
            _mm256_storeu_ps(out[i] + d + 8, a[i][1]);
        }
    }
    for (; d + LANES <= dim; d += LANES)
        for (int i = 0; i < n; i++) {
            __m256 a = _mm256_setzero_ps();
            for (int j = from; j < to; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[i * stride + j]), _mm256_loadu_ps(v + j * v_stride + d), a);
            _mm256_storeu_ps(out[i] + d, a);
        }
#endif
    for (; d < dim; d++)
        for (int i = 0; i < n; i++) {
            float a = 0.0f;
            for (int j = from; j < to; j++) a += p[i * stride + j] * v[j * v_stride + d];
            out[i][d] = a;
        }
}

/* scores[0..padded) → e^(scores - top) in place; returns their sum. padded is a multiple of 8
   and scores past the last key are -inf. */
static float exponentiate(float *scores, int padded, float top) {
#ifdef __AVX2__
    __m256 sums = _mm256_setzero_ps();
    for (int j = 0; j < padded; j += LANES) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + j, p);
        sums = _mm256_add_ps(sums, p);
    }
    return hsum8(sums);
#else
    float lanes[LANES] = {0};
    for (int j = 0; j < padded; j++) {
        scores[j] = exp1(scores[j] - top);
        lanes[j % LANES] += scores[j];
    }
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
#endif
}

typedef struct {
    const float *q, *k, *v;
    const int64_t *q_strides, *k_strides, *v_strides; /* (batch, head, position) */
    const uint8_t *mask;
    const int64_t *mask_strides; /* (batch, head, query, key) */
    const float *bias;
    const int64_t *bias_strides;
    int heads, kv_heads, queries, keys, dim;
    float scale;
    float *out; /* (batch, heads, queries, dim), contiguous */
} Attention;

/* From scores[0, keys) (-inf for hidden keys, top their largest): out = Σ_j e^(s_j - top)·v_j / Σ_j
   e^(s_j - top). Keys before `from` (a multiple of 8) are hidden and not looked at. */
static void weighted_values(float *scores, int from, int keys, float top, const float *v, long v_stride, int dim,
                            float *out) {
    const int padded = (keys + LANES - 1) / LANES * LANES;
    for (int j = keys; j < padded; j++) scores[j] = -INFINITY;
    const float total = exponentiate(scores + from, padded - from, top);
    /* hidden keys have weight 0 (and so may hold anything, like a cache's stale positions) */
    weighted_sum(scores, from, keys, v, v_stride, dim, out);
    for (int d = 0; d < dim; d++) out[d] /= total;
}

static void attend_one(const Attention *a, int b, int h, int i, float *scores) {
    const int kv = h / (a->heads / a->kv_heads);
    const float *q = a->q + b * a->q_strides[0] + h * a->q_strides[1] + i * a->q_strides[2];
    const float *k = a->k + b * a->k_strides[0] + kv * a->k_strides[1];
    const float *v = a->v + b * a->v_strides[0] + kv * a->v_strides[1];
    const uint8_t *mask = a->mask ? a->mask + b * a->mask_strides[0] + h * a->mask_strides[1] + i * a->mask_strides[2] : NULL;
    const float *bias = a->bias ? a->bias + b * a->bias_strides[0] + h * a->bias_strides[1] + i * a->bias_strides[2] : NULL;
    float *out = a->out + (((size_t)b * a->heads + h) * a->queries + i) * a->dim;

    float top = -INFINITY;
    for (int j = 0; j < a->keys; j++) {
        const float added = bias ? bias[j * a->bias_strides[3]] : 0.0f;
        if ((mask && !mask[j * a->mask_strides[3]]) || added == -INFINITY) {
            scores[j] = -INFINITY;
            continue;
        }
        scores[j] = a->scale * score1(q, k + j * a->k_strides[2], a->dim) + added;
        top = larger(top, scores[j]);
    }
    memset(out, 0, sizeof(float) * a->dim);
    if (top == -INFINITY) return; /* nothing to attend to (a padding query): zeros */
    weighted_values(scores, 0, a->keys, top, v, a->v_strides[2], a->dim, out);
}

/* One tile: up to TILE_QUERIES queries of one head of one sequence (consecutive rows of a
   prompt, or one decoding row) against the keys each may see, [first[i], last[i]] of the same
   cache rows. Each query's result is what it would be alone: its scores by score8/score1 over
   groups of 8 keys anchored at key 0, its own softmax, and its weighted sum in key order (a key
   outside its range has weight exactly 0, and adding 0·v changes no bit). The tile only shares
   the loads: each group of keys and each value row is read once for all its queries. */
void attend_tile(int n, const float *const *q, const int *first, const int *last, const int *position,
                 const float *k, long k_stride, const float *v, long v_stride, int dim, float scale, float bias_slope,
                 float *scores, long scores_stride, float *const *out) {
    int lo = first[0], hi = last[0];
    for (int i = 1; i < n; i++) {
        lo = first[i] < lo ? first[i] : lo;
        hi = last[i] > hi ? last[i] : hi;
    }
    const int from = lo / LANES * LANES; /* lanes stay tied to key positions: see exponentiate */
    int j = from;
    for (; j + 8 <= hi + 1; j += 8) {
        if (j + AHEAD_KEYS + 8 <= hi + 1) prefetch_rows(k + (j + AHEAD_KEYS) * k_stride, k_stride, 8, dim);
        for (int i = 0; i < n; i++) score8(q[i], k + j * k_stride, k_stride, dim, scores + i * scores_stride + j);
    }
    for (; j <= hi; j++)
        for (int i = 0; i < n; i++) scores[i * scores_stride + j] = score1(q[i], k + j * k_stride, dim);
    const int padded = (hi + 1 + LANES - 1) / LANES * LANES;
    float totals[TILE_QUERIES];
    for (int i = 0; i < n; i++) {
        float *s = scores + i * scores_stride, top = -INFINITY;
        const int own_from = first[i] / LANES * LANES;
        for (j = from; j < first[i]; j++) s[j] = -INFINITY;
        for (j = first[i]; j <= last[i]; j++) {
            s[j] = scale * s[j];
            if (bias_slope != 0.0f) s[j] += -bias_slope * (float)(position[i] - j);
            top = larger(top, s[j]);
        }
        for (j = last[i] + 1; j < padded; j++) s[j] = -INFINITY;
        totals[i] = exponentiate(s + own_from, padded - own_from, top);
        for (j = from; j < own_from; j++) s[j] = 0.0f;
    }
    weighted_tile(n, scores, scores_stride, from, hi + 1, v, v_stride, dim, out);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < dim; d++) out[i][d] /= totals[i];
}

/* Returns 0, or -1 when memory runs out. */
int attendo_attention(const float *q, const int64_t *q_strides, const float *k, const int64_t *k_strides,
                      const float *v, const int64_t *v_strides, const uint8_t *mask, const int64_t *mask_strides,
                      const float *bias, const int64_t *bias_strides, int batch, int heads, int kv_heads,
                      int queries, int keys, int dim, float scale, float *out, int threads) {
    const Attention a = {q, k, v, q_strides, k_strides, v_strides, mask, mask_strides, bias, bias_strides,
                         heads, kv_heads, queries, keys, dim, scale, out};
    const long tasks = (long)batch * heads * queries;
    const size_t padded = (size_t)(keys + LANES - 1) / LANES * LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (tasks > 1)
    {
        float *scores = malloc(sizeof(float) * (padded ? padded : LANES));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long t = 0; t < tasks; t++)
            if (scores) attend_one(&a, (int)(t / ((long)heads * queries)), (int)(t / queries % heads), (int)(t % queries), scores);
        free(scores);
    }
    return failed ? -1 : 0;
}
