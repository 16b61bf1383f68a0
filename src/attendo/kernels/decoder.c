/* The layers of a decoder-only transformer in one call: for every row (a token of some sequence),
   every layer's norm, q/k/v projection, rotary positions, key/value cache write, attention over
   the row's own sequence, output projection, and feed-forward network, with the residual adds.

   Why: run from Python, a layer is some 80 small torch operations, each a few microseconds of
   dispatch; a 30-layer model spent more time there than multiplying. Here the whole stack is one
   C call, and its threads (one OpenMP team) meet only at the barriers between the steps below.

   What it computes is what attendo.layers computes (attendo.fused builds the Layer descriptions
   from those modules and checks them against the Python forward), for pre-norm blocks:
       x += post_attn_norm?( attention(attn_norm(x)) )
       x += post_mlp_norm?( mlp(mlp_norm(x)) )
   with RMSNorm or LayerNorm; optional q/k RMSNorms per head; RoPE (rotate-half) by the cos/sin of
   each row's position (the call's, one pair for global and one for sliding-window layers), or
   none (positions added before the layers); ALiBi slopes; a sliding window; a gated
   or plain feed-forward network with SiLU, GELU, tanh-GELU or ReLU; biases anywhere; RMSNorm
   weights stored as differences from 1 (Gemma).

   Each row is computed from its own values alone, in a fixed order (matmul.c, packed.c and
   attention.c's products and attention, and per-row loops here): batch-invariant. */

#include <stdlib.h>

#include <omp.h>

#include "formats.h"
#include "internal.h"

enum { RMS = 0, LAYER = 1 };
enum { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };
enum { MAX_PARTS = 4 };

typedef struct {
    const float *weight, *bias; /* weight NULL: no such norm */
    float eps, offset;          /* RMSNorm scales by offset + weight (Gemma: 1 + weight) */
    int kind;                   /* RMS or LAYER */
} Norm;

/* One projection: output columns [offset, offset + rows) of each part come from its matrix. */
typedef struct {
    const uint8_t *data;
    int format, packed, rows;
} Part;

typedef struct {
    Part parts[MAX_PARTS];
    int n_parts, in, out;
    const float *bias;
} Matrix;

enum { NO_ROPE = 0, GLOBAL_ROPE = 1, SLIDING_ROPE = 2 };

typedef struct {
    int dim, heads, kv_heads, head_dim, ffn, gated, activation, rope_dims, window;
    int rope;           /* NO_ROPE, or which of the call's cos/sin rows this layer rotates by */
    float scale;
    Norm attn_norm, mlp_norm, post_attn_norm, post_mlp_norm, q_norm, k_norm;
    Matrix qkv, out, up, down;
    const float *alibi; /* per head, or NULL */
} Layer;

/* The rotations of this call's rows: cos and sin (rows x rope_dims) for the global layers and,
   where they differ (another RoPE base), for the sliding-window ones. */
typedef struct {
    const float *cos, *sin, *sliding_cos, *sliding_sin;
} Rotations;

/* ---- per-row pieces ---------------------------------------------------------------------- */

static float sum_squares(const float *x, int n) {
    int i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        even = _mm256_fmadd_ps(a, a, even);
        odd = _mm256_fmadd_ps(b, b, odd);
    }
    total = hsum8(_mm256_add_ps(even, odd));
#endif
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

static float sum(const float *x, int n) {
    float total = 0.0f;
    for (int i = 0; i < n; i++) total += x[i];
    return total;
}

/* out = norm(x) over n values (out may be x) */
static void normalize(const Norm *norm, const float *x, int n, float *out) {
    if (norm->kind == RMS) {
        const float inverse = 1.0f / sqrtf(sum_squares(x, n) / (float)n + norm->eps);
        for (int i = 0; i < n; i++) out[i] = x[i] * inverse * (norm->weight[i] + norm->offset);
        return;
    }
    const float mean = sum(x, n) / (float)n;
    float variance = 0.0f;
    for (int i = 0; i < n; i++) variance += (x[i] - mean) * (x[i] - mean);
    const float inverse = 1.0f / sqrtf(variance / (float)n + norm->eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * inverse * norm->weight[i] + (norm->bias ? norm->bias[i] : 0.0f);
}

/* SiLU and tanh-GELU through e^-|u| (simd.h's exp, for arguments <= 0):
     sigmoid(u) = 1 / (1 + e^-u) for u >= 0, e^u / (1 + e^u) below;  tanh(u) = 2·sigmoid(2u) - 1. */
static float sigmoid1(float u) {
    const float t = exp1(-fabsf(u));
    return u >= 0.0f ? 1.0f / (1.0f + t) : t / (1.0f + t);
}

static float activate(int activation, float x) {
    switch (activation) {
    case SILU: return x * sigmoid1(x);
    case GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case GELU_TANH: return x * sigmoid1(2.0f * 0.79788456080286536f * (x + 0.044715f * x * x * x));
    default: return x > 0.0f ? x : 0.0f;
    }
}

#ifdef __AVX2__
static __m256 sigmoid8(__m256 u) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 t = exp8(_mm256_or_ps(u, sign)); /* e^-|u| */
    const __m256 positive = _mm256_div_ps(one, _mm256_add_ps(one, t)), negative = _mm256_div_ps(t, _mm256_add_ps(one, t));
    return _mm256_blendv_ps(positive, negative, u); /* u's sign bit picks */
}
#endif

/* hidden[i] = act(up[i]) (· up[ffn + i] when gated: the gate's rows come first), i < ffn */
static void activate_row(int activation, int gated, const float *up, int ffn, float *hidden) {
    int i = 0;
#ifdef __AVX2__
    if (activation == SILU || activation == GELU_TANH)
        for (; i + 8 <= ffn; i += 8) {
            const __m256 x = _mm256_loadu_ps(up + i);
            __m256 u = x;
            if (activation == GELU_TANH) {
                const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_mul_ps(x, _mm256_set1_ps(0.044715f)));
                u = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.79788456080286536f), _mm256_add_ps(x, cube));
            }
            __m256 y = _mm256_mul_ps(x, sigmoid8(u));
            if (gated) y = _mm256_mul_ps(y, _mm256_loadu_ps(up + ffn + i));
            _mm256_storeu_ps(hidden + i, y);
        }
#endif
    for (; i < ffn; i++) hidden[i] = gated ? activate(activation, up[i]) * up[ffn + i] : activate(activation, up[i]);
}

/* Rotate the first rope_dims values of one head (rotate-half pairs: i with i + rope_dims/2). */
static void rotate(float *head, const float *cos, const float *sin, int rope_dims) {
    const int half = rope_dims / 2;
    for (int i = 0; i < half; i++) {
        const float first = head[i], second = head[i + half];
        head[i] = first * cos[i] - second * sin[i];
        head[i + half] = second * cos[i + half] + first * sin[i + half];
    }
}

/* ---- a 16-bit key/value cache --------------------------------------------------------------
   The cache may hold float16 or bfloat16 (format F16 or BF16) instead of float32: half the bytes
   every decode step reads per cached token. A key or value is rounded once when it is written
   (to nearest, ties to even: what torch's .to() does) and widened, exactly, into a float32
   scratch copy when attention reads it, so attention.c computes on floats as before and a row's
   result still depends on its own keys only. */

/* float → float16 or bfloat16 bits, rounded to nearest even (no F16C: by hand) */
static uint16_t narrow1(int format, float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (format == BF16) {
        if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
        return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    }
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    const uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;                        /* NaN */
    if (magnitude >= 0x477ff000) return sign | 0x7c00;                       /* rounds past 65504: inf */
    if (magnitude < 0x38800000) {                                            /* a subnormal half, or 0 */
        const float scaled = fabsf(x) * 16777216.0f;                         /* in units of 2^-24: exact */
        return sign | (uint16_t)lrintf(scaled);                              /* lrintf: nearest even */
    }
    const uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);
    return sign | (uint16_t)((rounded - 0x38000000) >> 13);
#endif
}

static float widen1(int format, uint16_t h) { return format == BF16 ? bf16_to_float(h) : half_to_float(h); }

/* out[0..n) as `format` (n a multiple of 8 on the vector path) */
static void narrow(int format, const float *x, int n, uint16_t *out) {
    int i = 0;
#ifdef __AVX2__
    if (format == F16)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) out[i] = narrow1(format, x[i]);
}

static void widen(int format, const uint16_t *x, size_t n, float *out) {
    size_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, format == BF16 ? load8_bf16(x + i) : load8_half(x + i));
#endif
    for (; i < n; i++) out[i] = widen1(format, x[i]);
}

/* ---- the projections --------------------------------------------------------------------- */

/* The rounded copies of x a projection's parts need (one per activation format). */
typedef struct {
    void *per_32, *per_256;
} Rounded;

static int needs(const Matrix *m, int values) {
    for (int p = 0; p < m->n_parts; p++)
        if (block_values(m->parts[p].format) == values) return 1;
    return 0;
}

/* y (rows x m->out) = x·Wᵀ (+ bias later, by the caller). Called by every thread of the team;
   ends with a barrier. */
static void project(const Matrix *m, const float *x, int rows, Rounded *rounded, float *y) {
    if (needs(m, 32)) round_rows(Q8_0, x, m->in, rows, rounded->per_32);
    if (needs(m, 256)) round_rows(Q4_K, x, m->in, rows, rounded->per_256);
    int offset = 0;
    for (int p = 0; p < m->n_parts; p++) {
        const Part *part = &m->parts[p];
        const int values = block_values(part->format);
        const void *r = values == 32 ? rounded->per_32 : values == 256 ? rounded->per_256 : NULL;
        matmul_in_team(part->format, part->packed, part->data, part->rows, m->in, x, r, rows, y + offset, m->out);
        offset += part->rows;
    }
#pragma omp barrier
}

/* ---- the layers -------------------------------------------------------------------------- */

typedef struct {
    float *normed, *qkv, *attended, *projected, *hidden;
    Rounded rounded;
    int n_tiles, *tile_start, *tile_rows; /* the rows grouped for attention (see attention_block) */
    int group_heads; /* whether a task also takes the heads that share a key/value head */
} Scratch;

/* The cache of one layer: keys and values (slots x kv_heads x max_len x head_dim) as `format`
   (F32, F16 or BF16); wide: room for one key/value head's max_len keys and values as float32,
   the thread's own (used when the cache is 16-bit). */
typedef struct {
    void *keys, *values;
    int format, max_len;
    float *wide_keys, *wide_values;
} Cache;

/* x += post_norm?(y + bias) row by row: how each sublayer's output joins the residual stream. */
static void add_to_residual(const Layer *L, const Matrix *projection, const Norm *post_norm, float *x, int rows, float *y_rows) {
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        float *y = y_rows + (size_t)r * L->dim, *xr = x + (size_t)r * L->dim;
        if (projection->bias)
            for (int i = 0; i < L->dim; i++) y[i] += projection->bias[i];
        if (post_norm->weight) normalize(post_norm, y, L->dim, y);
        for (int i = 0; i < L->dim; i++) xr[i] += y[i];
    }
}

static void attention_block(const Layer *L, float *x, int rows, const int64_t *positions, const int64_t *slots,
                            const Rotations *rotations, const Cache *c, Scratch *s, float *scores) {
    const int hd = L->head_dim, q_width = L->heads * hd, kv_width = L->kv_heads * hd, max_len = c->max_len;
    const size_t element = c->format == F32 ? sizeof(float) : sizeof(uint16_t);
    const size_t slot_stride = (size_t)L->kv_heads * max_len * hd, head_stride = (size_t)max_len * hd;
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) normalize(&L->attn_norm, x + (size_t)r * L->dim, L->dim, s->normed + (size_t)r * L->dim);
    project(&L->qkv, s->normed, rows, &s->rounded, s->qkv);

    /* bias, q/k norms and positions per head; keys and values into the cache */
#pragma omp for schedule(static)
    for (int t = 0; t < rows * (L->heads + L->kv_heads); t++) {
        const int r = t / (L->heads + L->kv_heads), h = t % (L->heads + L->kv_heads), is_key = h >= L->heads;
        float *row = s->qkv + (size_t)r * L->qkv.out;
        float *head = row + (is_key ? q_width + (h - L->heads) * hd : h * hd);
        const int64_t position = positions[r];
        if (L->qkv.bias) {
            const float *bias = L->qkv.bias + (head - row);
            for (int i = 0; i < hd; i++) head[i] += bias[i];
            if (is_key) {
                float *value = head + kv_width;
                for (int i = 0; i < hd; i++) value[i] += bias[kv_width + i];
            }
        }
        const Norm *norm = is_key ? &L->k_norm : &L->q_norm;
        if (norm->weight) normalize(norm, head, hd, head);
        if (L->rope != NO_ROPE) {
            const int sliding = L->rope == SLIDING_ROPE && rotations->sliding_cos;
            const float *cos = sliding ? rotations->sliding_cos : rotations->cos;
            const float *sin = sliding ? rotations->sliding_sin : rotations->sin;
            rotate(head, cos + (size_t)r * L->rope_dims, sin + (size_t)r * L->rope_dims, L->rope_dims);
        }
        if (is_key) {
            const size_t at = (slots[r] * slot_stride + (h - L->heads) * head_stride + position * hd) * element;
            if (c->format == F32) {
                memcpy((char *)c->keys + at, head, sizeof(float) * hd);
                memcpy((char *)c->values + at, head + kv_width, sizeof(float) * hd);
            } else {
                narrow(c->format, head, hd, (uint16_t *)((char *)c->keys + at));
                narrow(c->format, head + kv_width, hd, (uint16_t *)((char *)c->values + at));
            }
        }
    }
    /* the implicit barrier: every key of this step is in the cache before any query reads it */
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < s->n_tiles * L->heads; t++) {
        /* a task: the rows of a tile (up to TILE_QUERIES consecutive rows of one sequence) times
           `width` heads that read the same key/value head, all against one run of cached keys
           (see attend_tile); index t names the task's first head, others are skipped */
        const int start = s->tile_start[t / L->heads], n = s->tile_rows[t / L->heads], h = t % L->heads;
        const int group = L->heads / L->kv_heads, kv = h / group, in_group = h % group;
        int width = s->group_heads && !L->alibi ? TILE_QUERIES / n : 1; /* ALiBi: a slope per head */
        width = width < group ? width : group;
        if (in_group % width) continue;
        width = width < group - in_group ? width : group - in_group;
        const float *q[TILE_QUERIES];
        float *out[TILE_QUERIES];
        int first[TILE_QUERIES], last[TILE_QUERIES], position[TILE_QUERIES];
        for (int i = 0; i < n * width; i++) {
            const int r = start + i / width, head = h + i % width;
            position[i] = last[i] = (int)positions[r];
            first[i] = L->window > 0 && position[i] - L->window + 1 > 0 ? position[i] - L->window + 1 : 0;
            q[i] = s->qkv + (size_t)r * L->qkv.out + head * hd;
            out[i] = s->attended + (size_t)r * q_width + head * hd;
        }
        const size_t base = slots[start] * slot_stride + kv * head_stride;
        const float *keys = (const float *)c->keys + base, *values = (const float *)c->values + base;
        if (c->format != F32) {
            /* the keys attend_tile reads, [first key / 8 · 8, last key], widened */
            int lo = first[0], hi = last[0];
            for (int i = 1; i < n * width; i++) {
                lo = first[i] < lo ? first[i] : lo;
                hi = last[i] > hi ? last[i] : hi;
            }
            const size_t from = (size_t)(lo / 8 * 8) * hd, count = (size_t)(hi + 1) * hd - from;
            widen(c->format, (const uint16_t *)c->keys + base + from, count, c->wide_keys + from);
            widen(c->format, (const uint16_t *)c->values + base + from, count, c->wide_values + from);
            keys = c->wide_keys;
            values = c->wide_values;
        }
        attend_tile(n * width, q, first, last, position, keys, hd, values, hd, hd, L->scale,
                    L->alibi ? L->alibi[h] : 0.0f, scores, max_len + 16, out);
    }
    project(&L->out, s->attended, rows, &s->rounded, s->projected);
    add_to_residual(L, &L->out, &L->post_attn_norm, x, rows, s->projected);
}

static void mlp_block(const Layer *L, float *x, int rows, Scratch *s) {
    const int up_width = L->up.out;
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) normalize(&L->mlp_norm, x + (size_t)r * L->dim, L->dim, s->normed + (size_t)r * L->dim);
    project(&L->up, s->normed, rows, &s->rounded, s->qkv);
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        float *up = s->qkv + (size_t)r * up_width, *hidden = s->hidden + (size_t)r * L->ffn;
        if (L->up.bias)
            for (int i = 0; i < up_width; i++) up[i] += L->up.bias[i];
        activate_row(L->activation, L->gated, up, L->ffn, hidden);
    }
    project(&L->down, s->hidden, rows, &s->rounded, s->projected);
    add_to_residual(L, &L->down, &L->post_mlp_norm, x, rows, s->projected);
}

static size_t largest(const Layer *layers, int n, int (*size)(const Layer *)) {
    size_t most = 0;
    for (int l = 0; l < n; l++) most = (size_t)size(&layers[l]) > most ? (size_t)size(&layers[l]) : most;
    return most;
}
static int dim_of(const Layer *L) { return L->dim; }
static int wide_of(const Layer *L) { return L->qkv.out > L->up.out ? L->qkv.out : L->up.out; }
static int attended_of(const Layer *L) { return L->heads * L->head_dim; }
static int ffn_of(const Layer *L) { return L->ffn; }
static int head_dim_of(const Layer *L) { return L->head_dim; }
static int widest_input(const Layer *L) {
    int widest = L->dim > L->ffn ? L->dim : L->ffn;
    return widest > L->heads * L->head_dim ? widest : L->heads * L->head_dim;
}

/* x (rows x dim) through every layer, in place. Row r is the token at positions[r] of the
   sequence in cache slot slots[r]; layer l's keys and values go to k_caches[l], v_caches[l]
   (slots x kv_heads x max_len x head_dim, of cache_format: F32, F16 or BF16). Returns 0, or -1
   when memory runs out. */
int attendo_decoder_layers(const Layer *layers, int n_layers, float *x, int rows, const int64_t *positions,
                           const int64_t *slots, const Rotations *rotations, void *const *k_caches,
                           void *const *v_caches, int max_len, int cache_format, int threads) {
    const size_t dim = largest(layers, n_layers, dim_of), wide = largest(layers, n_layers, wide_of);
    const size_t attended = largest(layers, n_layers, attended_of), ffn = largest(layers, n_layers, ffn_of);
    const size_t input = largest(layers, n_layers, widest_input);
    Scratch s;
    float *floats = malloc(sizeof(float) * rows * (2 * dim + wide + attended + ffn));
    s.rounded.per_32 = malloc(rows * rounded_row_bytes(Q8_0, (int)(input + 31) / 32 * 32) + 64);
    s.rounded.per_256 = malloc(rows * rounded_row_bytes(Q4_K, (int)(input + 255) / 256 * 256) + 64);
    s.tile_start = malloc(sizeof(int) * rows);
    s.tile_rows = malloc(sizeof(int) * rows);
    int failed = floats == NULL || s.rounded.per_32 == NULL || s.rounded.per_256 == NULL || !s.tile_start || !s.tile_rows;
    if (!failed) {
        s.normed = floats;
        s.projected = s.normed + rows * dim;
        s.qkv = s.projected + rows * dim;
        s.attended = s.qkv + rows * wide;
        s.hidden = s.attended + rows * attended;
        /* runs of up to TILE_QUERIES rows of one sequence at consecutive positions (a prompt's) */
        s.n_tiles = 0;
        for (int r = 0; r < rows; r++) {
            const int t = s.n_tiles - 1;
            if (t >= 0 && s.tile_rows[t] < TILE_QUERIES && slots[r] == slots[r - 1] && positions[r] == positions[r - 1] + 1) {
                s.tile_rows[t]++;
            } else {
                s.tile_start[s.n_tiles] = r;
                s.tile_rows[s.n_tiles++] = 1;
            }
        }
        /* Heads that share keys share their loads too, when there are tiles enough to keep every
           thread busy without splitting a group (a query's result is the same either way) */
        s.group_heads = s.n_tiles * layers[0].kv_heads >= 4 * threads;
#pragma omp parallel num_threads(threads)
        {
            float *scores = malloc(sizeof(float) * (max_len + 16) * TILE_QUERIES);
            const size_t wide = cache_format == F32 ? 0 : (size_t)max_len * largest(layers, n_layers, head_dim_of);
            float *widened = wide ? malloc(sizeof(float) * 2 * wide) : NULL;
            if (scores == NULL || (wide && widened == NULL)) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp barrier
            if (!failed)
                for (int l = 0; l < n_layers; l++) {
                    const Cache cache = {k_caches[l], v_caches[l], cache_format, max_len, widened, widened ? widened + wide : NULL};
                    attention_block(&layers[l], x, rows, positions, slots, rotations, &cache, &s, scores);
                    mlp_block(&layers[l], x, rows, &s);
                }
            free(scores);
            free(widened);
        }
    }
    free(floats);
    free(s.rounded.per_32);
    free(s.rounded.per_256);
    free(s.tile_start);
    free(s.tile_rows);
    return failed ? -1 : 0;
}
