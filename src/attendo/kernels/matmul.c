/* y = x·Wᵀ with W in float32/float16/bfloat16 or in one of ggml's block formats, computed so that
   each row of y depends on its own row of x only: batch-invariant.

   Why: a row computed alone, beside seven others, or as one of a prompt's 500 rows must come out
   bit for bit the same, or greedy decoding says different things alone and in a batch. A float
   matrix multiply library chooses its blocking (and so the order of each sum) by the number of
   rows; here the order of every sum is fixed by the weight format alone.

   Block formats (ggml's; see weights/ggml_blocks.py for the layouts). A row of W is a run of
   blocks; each block holds small integer codes q and one or two float16 scales:
       Q8_0                   w = d·q                (32 per block, q signed 8-bit)
       Q4_0, Q5_0             w = d·(q - 8 or 16)    (32 per block, 4 or 5 bits)
       Q4_1, Q5_1             w = d·q + m
       Q4_K, Q5_K, Q2_K       w = d·s·q - dmin·t     (256 per block; s, t per sub-block of 32 or 16)
       Q6_K, Q3_K             w = d·s·(q - 32 or 4)  (s per sub-block of 16)
   Each row of x is first rounded to int8 the way llama.cpp does for the format: per block of 32
   with one float scale dx (the "Q8_0" activations of the 32-wide formats), or per 256 with sums
   of every 16 codes (Q8_K, for the K-quants). A block's product is then an integer dot product
   Σ q·qx (exact, so its order does not matter) times the scales, added into float sums whose
   order is fixed: per row, block after block, in float lanes that depend only on the format.

   Float formats: lanes over the input dimension, two sets of sums (even and odd groups of lanes),
   added up in one fixed order at the end of the row.

   Threads: output columns are split across OpenMP threads (the library links the libgomp torch
   loaded, so torch's thread pool runs these loops); each output is computed by one thread alone. */

#include <stdlib.h>

#include <omp.h>

#include "formats.h"
#include "internal.h"

/* ---- the product of one row of W with a tile of rows of x ---------------------------------- */

/* Up to this many rows of x share each block of W as it is read. */
enum { TILE = 4 };

/* What a tile of rows needs: the rows of x as stored for the format (float, XBlock or XSuper). */
typedef struct {
    const void *x;
    size_t row_stride; /* bytes from one row of x to the next */
} Rows;

#ifdef __AVX2__
ALWAYS_INLINE __m256i nibbles_low_high(const uint8_t *packed) {
    /* 16 bytes → 32 codes: the low nibbles are values 0-15, the high nibbles 16-31 */
    __m128i low = _mm_loadu_si128((const __m128i *)packed);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(low, 4), low);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* The 32-wide formats: acc[r] += d·dx · (Σ over lanes of q·qx), offsets[r] += (constant term). */
ALWAYS_INLINE void block32_tile(int format, int rows, const uint8_t *w, const XBlock *const *x, int b, __m256 *acc,
                                float *offsets) {
    const float d = load_half(w);
    __m256i qw;
    float m = 0.0f;
    switch (format) {
    case Q8_0: qw = _mm256_loadu_si256((const __m256i *)(w + 2)); break;
    case Q4_0: qw = nibbles_low_high(w + 2); m = -8.0f * d; break;
    case Q4_1: qw = nibbles_low_high(w + 4); m = load_half(w + 2); break;
    case Q5_0: {
        uint32_t high;
        memcpy(&high, w + 2, 4);
        qw = _mm256_or_si256(nibbles_low_high(w + 6), bits_to_bytes(high, 0x10));
        m = -16.0f * d;
        break;
    }
    default: { /* Q5_1 */
        uint32_t high;
        memcpy(&high, w + 4, 4);
        qw = _mm256_or_si256(nibbles_low_high(w + 8), bits_to_bytes(high, 0x10));
        m = load_half(w + 2);
        break;
    }
    }
    /* vpdpbusd/maddubs want one unsigned side: for Q8_0 that is |q|, with q's sign moved to x */
    const __m256i uw = format == Q8_0 ? _mm256_sign_epi8(qw, qw) : qw;
    for (int r = 0; r < rows; r++) {
        const XBlock *xb = x[r] + b;
        __m256i qx = _mm256_loadu_si256((const __m256i *)xb->q);
        if (format == Q8_0) qx = _mm256_sign_epi8(qx, qw);
        const __m256 products = _mm256_cvtepi32_ps(dot_u8_s8(_mm256_setzero_si256(), uw, qx));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), products, acc[r]);
        if (format != Q8_0) offsets[r] += m * xb->sum;
    }
}

/* Sum of the 16-value sub-block minimum (or offset) terms: Σ min[s]·sums[s]. */
ALWAYS_INLINE int weighted_sums(const int *min, const int16_t *sums) {
    int total = 0;
    for (int s = 0; s < 16; s++) total += min[s] * sums[s];
    return total;
}

/* The K-quants with 32-value sub-blocks (Q4_K, Q5_K): codes 0-15 or 0-31, w = d·s·q - dmin·t. */
ALWAYS_INLINE void k4_tile(int format, int rows, const uint8_t *w, const XSuper *const *x, int b, __m256 *acc,
                           float *offsets) {
    const float d = load_half(w), dmin = load_half(w + 2);
    int scale[16], min[16];
    unpack_k_scales(w + 4, scale, min);
    const uint8_t *high = w + 16, *packed = w + 16 + (format == Q5_K ? 32 : 0);
    const __m256i high_bits = format == Q5_K ? _mm256_loadu_si256((const __m256i *)high) : _mm256_setzero_si256();
    __m256i codes[8];
    for (int chunk = 0; chunk < 4; chunk++) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)(packed + 32 * chunk));
        codes[2 * chunk] = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
        codes[2 * chunk + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0F));
        if (format == Q5_K) {
            const __m256i one = _mm256_set1_epi8(1);
            __m256i low_bit = _mm256_and_si256(_mm256_srli_epi16(high_bits, 2 * chunk), one);
            __m256i high_bit = _mm256_and_si256(_mm256_srli_epi16(high_bits, 2 * chunk + 1), one);
            codes[2 * chunk] = _mm256_or_si256(codes[2 * chunk], _mm256_slli_epi16(low_bit, 4));
            codes[2 * chunk + 1] = _mm256_or_si256(codes[2 * chunk + 1], _mm256_slli_epi16(high_bit, 4));
        }
    }
    for (int r = 0; r < rows; r++) {
        const XSuper *xs = x[r] + b;
        __m256i total = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            const __m256i part = dot_u8_s8(_mm256_setzero_si256(), codes[s], _mm256_loadu_si256((const __m256i *)(xs->q + 32 * s)));
            total = _mm256_add_epi32(total, _mm256_mullo_epi32(part, _mm256_set1_epi32(scale[2 * s])));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs->d), _mm256_cvtepi32_ps(total), acc[r]);
        offsets[r] -= dmin * xs->d * (float)weighted_sums(min, xs->sums);
    }
}

/* Q6_K: codes 0-63 with an offset of 32, an int8 scale per 16 values. */
ALWAYS_INLINE void k6_tile(int rows, const uint8_t *w, const XSuper *const *x, int b, __m256 *acc, float *offsets) {
    const float d = load_half(w + 208);
    const int8_t *scales = (const int8_t *)(w + 192);
    int scale[16];
    for (int s = 0; s < 16; s++) scale[s] = scales[s];
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
    __m256i codes[8];
    for (int half = 0; half < 2; half++) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(w + 64 * half));
        const __m256i c = _mm256_loadu_si256((const __m256i *)(w + 64 * half + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * half));
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h, two), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), two), 4);
        const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), two), 4);
        const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), two), 4);
        codes[4 * half + 0] = _mm256_or_si256(_mm256_and_si256(a, low4), h0);
        codes[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(c, low4), h1);
        codes[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), h2);
        codes[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4), h3);
    }
    for (int r = 0; r < rows; r++) {
        const XSuper *xs = x[r] + b;
        __m256i total = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            /* lanes 0-3 hold the first 16 values of the group, lanes 4-7 the next 16 */
            const __m256i part = dot_u8_s8(_mm256_setzero_si256(), codes[g], _mm256_loadu_si256((const __m256i *)(xs->q + 32 * g)));
            const __m256i s = _mm256_set_m128i(_mm_set1_epi32(scale[2 * g + 1]), _mm_set1_epi32(scale[2 * g]));
            total = _mm256_add_epi32(total, _mm256_mullo_epi32(part, s));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xs->d), _mm256_cvtepi32_ps(total), acc[r]);
        offsets[r] -= 32.0f * d * xs->d * (float)weighted_sums(scale, xs->sums);
    }
}

/* Q2_K and Q3_K through their unpacked codes (rare formats: kept short rather than fast). */
ALWAYS_INLINE void unpacked_tile(int format, int rows, const uint8_t *w, const XSuper *const *x, int b, __m256 *acc,
                                 float *offsets) {
    Unpacked u;
    unpack(format, w, &u);
    for (int r = 0; r < rows; r++) {
        const XSuper *xs = x[r] + b;
        __m256i total = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            /* signed codes: |q| as the unsigned side, q's sign moved to x */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(u.q + 32 * g));
            const __m256i qx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xs->q + 32 * g)), q);
            const __m256i part = dot_u8_s8(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), qx);
            const __m256i s = _mm256_set_m128i(_mm_set1_epi32(u.scale[2 * g + 1]), _mm_set1_epi32(u.scale[2 * g]));
            total = _mm256_add_epi32(total, _mm256_mullo_epi32(part, s));
        }
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(u.d * xs->d), _mm256_cvtepi32_ps(total), acc[r]);
        offsets[r] -= u.dmin * xs->d * (float)weighted_sums(u.min, xs->sums);
    }
}

ALWAYS_INLINE __m256 load8_weights(int format, const uint8_t *w, int i) {
    if (format == F32) return _mm256_loadu_ps((const float *)w + i);
    if (format == F16) return load8_half((const uint16_t *)w + i);
    return load8_bf16((const uint16_t *)w + i);
}

/* y[r·y_stride] = row w of W · row r of x, for r < rows (a constant once inlined). */
ALWAYS_INLINE void dot_tile(int format, int rows, const uint8_t *w, int in, const Rows *x, float *y, size_t y_stride) {
    __m256 even[TILE], odd[TILE];
    float offsets[TILE];
    for (int r = 0; r < rows; r++) {
        even[r] = odd[r] = _mm256_setzero_ps();
        offsets[r] = 0.0f;
    }
    if (format == F32 || format == F16 || format == BF16) {
        const float *xr[TILE];
        for (int r = 0; r < rows; r++) xr[r] = (const float *)((const char *)x->x + r * x->row_stride);
        int i = 0;
        for (; i + 16 <= in; i += 16) {
            const __m256 w0 = load8_weights(format, w, i), w1 = load8_weights(format, w, i + 8);
            for (int r = 0; r < rows; r++) {
                even[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr[r] + i), even[r]);
                odd[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr[r] + i + 8), odd[r]);
            }
        }
        for (; i < in; i++) /* the tail, one value at a time after the lanes */
            for (int r = 0; r < rows; r++) offsets[r] += float_value(format, w, i) * xr[r][i];
    } else if (is_k_quant(format)) {
        const XSuper *xr[TILE];
        for (int r = 0; r < rows; r++) xr[r] = (const XSuper *)((const char *)x->x + r * x->row_stride);
        const int stride = block_bytes(format), blocks = in / QK_K;
        for (int b = 0; b < blocks; b++, w += stride) {
            __m256 *acc = b & 1 ? odd : even;
            if (format == Q4_K || format == Q5_K) k4_tile(format, rows, w, xr, b, acc, offsets);
            else if (format == Q6_K) k6_tile(rows, w, xr, b, acc, offsets);
            else unpacked_tile(format, rows, w, xr, b, acc, offsets);
        }
    } else {
        const XBlock *xr[TILE];
        for (int r = 0; r < rows; r++) xr[r] = (const XBlock *)((const char *)x->x + r * x->row_stride);
        const int stride = block_bytes(format), blocks = in / QK;
        for (int b = 0; b < blocks; b++, w += stride) block32_tile(format, rows, w, xr, b, b & 1 ? odd : even, offsets);
    }
    for (int r = 0; r < rows; r++) y[r * y_stride] = hsum8(_mm256_add_ps(even[r], odd[r])) + offsets[r];
}
#else
static float dot_unpacked(const Unpacked *u, int values, const int8_t *qx, const int16_t *sums16, float dx,
                          float xsum32) {
    /* Σ w·x for one block: integer sums per sub-block of 16, then the scales */
    int total = 0, mins = 0;
    for (int s = 0; s < values / 16; s++) {
        int part = 0;
        for (int i = 0; i < 16; i++) part += u->q[16 * s + i] * qx[16 * s + i];
        total += u->scale[s] * part;
        if (sums16) mins += u->min[s] * sums16[s];
    }
    if (values == QK) return u->d * dx * (float)total - u->dmin * xsum32 * (float)u->min[0];
    return u->d * dx * (float)total - u->dmin * dx * (float)mins;
}

/* Without AVX2: the same sums from the unpacked blocks, one value at a time. */
ALWAYS_INLINE void dot_tile(int format, int rows, const uint8_t *w, int in, const Rows *x, float *y, size_t y_stride) {
    for (int r = 0; r < rows; r++) {
        const char *xr = (const char *)x->x + r * x->row_stride;
        float total = 0.0f;
        if (format == F32 || format == F16 || format == BF16) {
            for (int i = 0; i < in; i++) total += float_value(format, w, i) * ((const float *)xr)[i];
        } else {
            const int values = block_values(format), stride = block_bytes(format);
            Unpacked u;
            for (int b = 0; b < in / values; b++) {
                unpack(format, w + (size_t)b * stride, &u);
                if (values == QK) {
                    const XBlock *xb = (const XBlock *)xr + b;
                    total += dot_unpacked(&u, QK, xb->q, NULL, xb->d, xb->sum);
                } else {
                    const XSuper *xs = (const XSuper *)xr + b;
                    total += dot_unpacked(&u, QK_K, xs->q, xs->sums, xs->d, 0.0f);
                }
            }
        }
        y[r * y_stride] = total;
    }
}
#endif

/* Output columns [first, last) for every row of x: columns in groups that stay in cache while
   every tile of rows passes over them. */
enum { COLUMN_GROUP = 16 };

ALWAYS_INLINE void matmul_columns(int format, const uint8_t *w, int first, int last, int ldy, int in, const Rows *x,
                                  int rows, float *y) {
    const size_t row_bytes = (size_t)in / block_values(format) * block_bytes(format);
    for (int group = first; group < last; group += COLUMN_GROUP) {
        const int end = group + COLUMN_GROUP < last ? group + COLUMN_GROUP : last;
        int r = 0;
        for (; r + TILE <= rows; r += TILE) {
            const Rows tile = {(const char *)x->x + r * x->row_stride, x->row_stride};
            for (int o = group; o < end; o++) dot_tile(format, TILE, w + o * row_bytes, in, &tile, y + (size_t)r * ldy + o, ldy);
        }
        for (; r < rows; r++) {
            const Rows one = {(const char *)x->x + r * x->row_stride, x->row_stride};
            for (int o = group; o < end; o++) dot_tile(format, 1, w + o * row_bytes, in, &one, y + (size_t)r * ldy + o, ldy);
        }
    }
}

/* One copy of the loops per format, so that none of them branches on it. */
#define FORMAT_LOOP(name, format)                                                                                     \
    static void name(const uint8_t *w, int first, int last, int ldy, int in, const Rows *x, int rows, float *y) {     \
        matmul_columns(format, w, first, last, ldy, in, x, rows, y);                                                 \
    }
FORMAT_LOOP(matmul_f32, F32)
FORMAT_LOOP(matmul_f16, F16)
FORMAT_LOOP(matmul_bf16, BF16)
FORMAT_LOOP(matmul_q8_0, Q8_0)
FORMAT_LOOP(matmul_q4_0, Q4_0)
FORMAT_LOOP(matmul_q4_1, Q4_1)
FORMAT_LOOP(matmul_q5_0, Q5_0)
FORMAT_LOOP(matmul_q5_1, Q5_1)
FORMAT_LOOP(matmul_q2_k, Q2_K)
FORMAT_LOOP(matmul_q3_k, Q3_K)
FORMAT_LOOP(matmul_q4_k, Q4_K)
FORMAT_LOOP(matmul_q5_k, Q5_K)
FORMAT_LOOP(matmul_q6_k, Q6_K)

typedef void (*MatmulLoop)(const uint8_t *, int, int, int, int, const Rows *, int, float *);

static MatmulLoop matmul_loop(int format) {
    switch (format) {
    case F32: return matmul_f32;
    case F16: return matmul_f16;
    case BF16: return matmul_bf16;
    case Q8_0: return matmul_q8_0;
    case Q4_0: return matmul_q4_0;
    case Q4_1: return matmul_q4_1;
    case Q5_0: return matmul_q5_0;
    case Q5_1: return matmul_q5_1;
    case Q2_K: return matmul_q2_k;
    case Q3_K: return matmul_q3_k;
    case Q4_K: return matmul_q4_k;
    case Q5_K: return matmul_q5_k;
    case Q6_K: return matmul_q6_k;
    default: return NULL;
    }
}

/* ---- entry points ------------------------------------------------------------------------ */

/* Whether this library multiplies by `format`, for rows of `in` values: 1 or 0. */
int attendo_supports(int format, int in) {
    return matmul_loop(format) != NULL && in > 0 && in % block_values(format) == 0;
}

/* Whether it multiplies by `format` in the packed layout (packed.c), which is faster: 1 or 0. */
int attendo_packs(int format) { return packed_format(format); }

/* Bytes of x rounded for `format`, per row of `in` values (0 for the float formats). */
size_t rounded_row_bytes(int format, int in) {
    if (block_values(format) == 1) return 0;
    return block_values(format) == QK ? sizeof(XBlock) * (in / QK) : sizeof(XSuper) * (in / QK_K);
}

static void round_row(int format, const float *x, int in, void *target) {
    if (block_values(format) == QK) quantize_row_32(x, in / QK, (XBlock *)target);
    else quantize_row_256(x, in / QK_K, (XSuper *)target);
}

void round_rows(int format, const float *x, int in, int rows, void *rounded) {
    const size_t row_bytes = rounded_row_bytes(format, in);
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) round_row(format, x + (size_t)r * in, in, (char *)rounded + r * row_bytes);
}

void matmul_in_team(int format, int packed, const uint8_t *w, int out, int in, const float *x, const void *rounded,
                    int rows, float *y, size_t ldy) {
    const size_t row_bytes = rounded_row_bytes(format, in);
    if (packed) {
        packed_matmul(format, w, out, in, rounded, row_bytes, rows, y, ldy);
        return;
    }
    const Rows xr = row_bytes ? (Rows){rounded, row_bytes} : (Rows){x, (size_t)in * sizeof(float)};
    /* each thread takes one run of output columns */
    const int team = omp_get_num_threads(), share = (out + team - 1) / team;
    const int first = omp_get_thread_num() * share, last = first + share < out ? first + share : out;
    if (first < last) matmul_loop(format)(w, first, last, (int)ldy, in, &xr, rows, y);
}

/* y (rows x out, rows ldy apart) = x (rows x in) · Wᵀ, W (out x in) stored in `format`, in the
   file's layout or (packed = 1) as attendo_pack made it. Returns 0, or -1 when the format is
   unknown or does not fit `in`, or memory runs out. */
int attendo_matmul(int format, const uint8_t *w, int packed, int out, int in, const float *x, int rows, float *y,
                   int ldy, int threads) {
    if (matmul_loop(format) == NULL || !attendo_supports(format, in) || (packed && !packed_format(format))) return -1;
    const size_t row_bytes = rounded_row_bytes(format, in);
    void *rounded = row_bytes ? malloc(row_bytes * rows) : NULL;
    if (row_bytes && rounded == NULL) return -1;
    /* A few rows (decoding) are rounded by one thread, so the threads meet only once, at the end. */
    if (row_bytes && rows <= TILE)
        for (int r = 0; r < rows; r++) round_row(format, x + (size_t)r * in, in, (char *)rounded + r * row_bytes);
#pragma omp parallel num_threads(threads)
    {
        if (row_bytes && rows > TILE) round_rows(format, x, in, rows, rounded);
        matmul_in_team(format, packed, w, out, in, x, rounded, rows, y, ldy);
    }
    free(rounded);
    return 0;
}

/* out (n x in) = rows index[0..n) of W as float32: a dequantized matrix, or an embedding lookup.
   Returns 0, or -1 when the format is unknown or memory runs out. */
int attendo_dequantize(int format, const uint8_t *w, int packed, int in, const int64_t *index, int n, float *out,
                       int threads) {
    if (!attendo_supports(format, in) || (packed && !packed_format(format))) return -1;
    const int values = block_values(format), stride = block_bytes(format);
    const size_t row_bytes = (size_t)in / values * stride;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (n > 16)
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w + index[i] * row_bytes;
        uint8_t *unpacked = NULL;
        if (packed) { /* back to the file's layout first */
            unpacked = malloc(row_bytes);
            if (unpacked == NULL) {
                failed = 1;
                continue;
            }
            attendo_unpack_rows(format, w, in, index + i, 1, unpacked);
            row = unpacked;
        }
        float *target = out + (size_t)i * in;
        if (values == 1) {
            for (int j = 0; j < in; j++) target[j] = float_value(format, row, j);
        } else {
            Unpacked u;
            for (int b = 0; b < in / values; b++, row += stride, target += values) {
                unpack(format, row, &u);
                for (int j = 0; j < values; j++)
                    target[j] = u.d * (float)u.scale[j / 16] * (float)u.q[j] - u.dmin * (float)u.min[j / 16];
            }
        }
        free(unpacked);
    }
    return failed ? -1 : 0;
}
