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

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float total = 0.0f;
#if ATTENDO_AVX512
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        even = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), even);
        odd = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), odd);
    }
    const __m512 both = _mm512_add_ps(even, odd);
    total = hsum8(_mm256_add_ps(_mm512_castps512_ps256(both), _mm512_extractf32x8_ps(both, 1)));
#elif defined(__AVX2__)
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), even);
        odd = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + LANES), _mm256_loadu_ps(b + i + LANES), odd);
    }
    total = hsum8(_mm256_add_ps(even, odd));
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
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
        scores[j] = a->scale * dot(q, k + j * a->k_strides[2], a->dim) + added;
        top = fmaxf(top, scores[j]);
    }
    memset(out, 0, sizeof(float) * a->dim);
    if (top == -INFINITY) return; /* nothing to attend to (a padding query): zeros */
    weighted_values(scores, 0, a->keys, top, v, a->v_strides[2], a->dim, out);
}

void attend_range(const float *q, const float *k, long k_stride, const float *v, long v_stride, int first, int last,
                  int dim, float scale, float bias_slope, int position, float *scores, float *out) {
    const int from = first / LANES * LANES; /* lanes stay tied to key positions: see exponentiate */
    float top = -INFINITY;
    for (int j = from; j < first; j++) scores[j] = -INFINITY;
    for (int j = first; j <= last; j++) {
        scores[j] = scale * dot(q, k + j * k_stride, dim);
        if (bias_slope != 0.0f) scores[j] += -bias_slope * (float)(position - j);
        top = fmaxf(top, scores[j]);
    }
    weighted_values(scores, from, last + 1, top, v, v_stride, dim, out);
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
