/* y = x·Wᵀ with W kept in one of ggml's block formats, the way llama.cpp multiplies on a CPU.

   A row of W is a run of blocks of 32 weights, each with its own float16 scale d (and for Q4_1
   a float16 minimum m):
       Q8_0: [d][32 x int8]            w = d·q
       Q4_0: [d][16 bytes of nibbles]  w = d·(q - 8)
       Q4_1: [d][m][16 bytes]          w = d·q + m
   (the low nibbles hold weights 0-15 of the block, the high nibbles 16-31).

   Each row of x is first quantized the same way, to int8 per block of 32 with one float scale
   dx. A block's product then is an integer dot product plus a float multiply:
       Σ w·x = d·dx·Σ q·qx              (Q8_0)
       Σ w·x = d·dx·Σ q·qx + m·dx·Σ qx  (Q4_1; Q4_0 is the case m = -8·d)
   With AVX2 one instruction (maddubs) does 32 of the byte products, so a weight costs about a
   fifth of what widening it to float32 costs, and decoding is bound by reading the weights.

   Threads: output rows are split across OpenMP threads. The library links the libgomp torch
   loaded, so torch's thread pool runs these loops too. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <omp.h>

enum { BLOCK = 32 };
enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type numbers */

typedef struct {
    float d;          /* x ≈ d·q */
    float sum;        /* d·Σq: what a minimum m multiplies */
    int8_t q[BLOCK];
} XBlock;

static float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float value;
    if (exponent == 0)
        value = ldexpf((float)mantissa, -24); /* zero and subnormals */
    else if (exponent == 31)
        value = mantissa ? NAN : INFINITY;
    else
        value = ldexpf((float)(mantissa | 0x400), (int)exponent - 25);
    return (h & 0x8000) ? -value : value;
#endif
}

static uint16_t load_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

static void quantize_x(const float *x, int blocks, XBlock *out) {
    for (int b = 0; b < blocks; b++, x += BLOCK) {
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
        int total = 0;
        for (int i = 0; i < BLOCK; i++) {
            out[b].q[i] = (int8_t)lrintf(x[i] * inverse);
            total += out[b].q[i];
        }
        out[b].d = d;
        out[b].sum = d * (float)total;
    }
}

static int block_bytes(int format) {
    return format == Q8_0 ? 2 + BLOCK : format == Q4_1 ? 4 + BLOCK / 2 : 2 + BLOCK / 2;
}

/* Up to this many rows of x share each block of W as it is unpacked. */
enum { TILE = 4 };

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#ifdef __AVX2__
static float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 unsigned bytes times 32 signed bytes, summed into 8 int32 lanes, as float. */
ALWAYS_INLINE __m256 dot_u8_s8(__m256i u, __m256i s) {
    __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

ALWAYS_INLINE __m256i nibbles(const uint8_t *packed) {
    __m128i low = _mm_loadu_si128((const __m128i *)packed);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(low, 4), low);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* acc[r] += block b of row w · block b of row r of x, for r < rows; returns what the minimum m
   adds for each row in offsets[r]. */
ALWAYS_INLINE void dot_block(int format, int rows, const uint8_t *w, const XBlock *x, int blocks, int b,
                             __m256 *acc, float *offsets) {
    const float d = half_to_float(load_half(w));
    if (format == Q8_0) {
        __m256i qw = _mm256_loadu_si256((const __m256i *)(w + 2));
        __m256i magnitude = _mm256_sign_epi8(qw, qw); /* maddubs wants one unsigned side */
        for (int r = 0; r < rows; r++) {
            const XBlock *xb = x + (size_t)r * blocks + b;
            __m256i qx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb->q), qw);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), dot_u8_s8(magnitude, qx), acc[r]);
        }
    } else {
        const float m = format == Q4_1 ? half_to_float(load_half(w + 2)) : -8.0f * d;
        __m256i qw = nibbles(w + (format == Q4_1 ? 4 : 2));
        for (int r = 0; r < rows; r++) {
            const XBlock *xb = x + (size_t)r * blocks + b;
            __m256i qx = _mm256_loadu_si256((const __m256i *)xb->q);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), dot_u8_s8(qw, qx), acc[r]);
            offsets[r] += m * xb->sum;
        }
    }
}

/* y[r·y_stride] = row w of W · row r of x, for r < rows (a constant once inlined). Blocks go in
   pairs into two sets of sums, so that each add waits on the one two blocks back. */
ALWAYS_INLINE void dot_tile(int format, int rows, const uint8_t *w, const XBlock *x, int blocks, float *y,
                            size_t y_stride) {
    __m256 even[TILE], odd[TILE];
    float offsets_even[TILE], offsets_odd[TILE];
    for (int r = 0; r < rows; r++) {
        even[r] = odd[r] = _mm256_setzero_ps();
        offsets_even[r] = offsets_odd[r] = 0.0f;
    }
    const int stride = block_bytes(format);
    int b = 0;
    for (; b + 2 <= blocks; b += 2, w += 2 * stride) {
        dot_block(format, rows, w, x, blocks, b, even, offsets_even);
        dot_block(format, rows, w + stride, x, blocks, b + 1, odd, offsets_odd);
    }
    if (b < blocks) dot_block(format, rows, w, x, blocks, b, even, offsets_even);
    for (int r = 0; r < rows; r++)
        y[r * y_stride] = horizontal_sum(_mm256_add_ps(even[r], odd[r])) + offsets_even[r] + offsets_odd[r];
}
#else
ALWAYS_INLINE void dot_tile(int format, int rows, const uint8_t *w, const XBlock *x, int blocks, float *y,
                            size_t y_stride) {
    const int stride = block_bytes(format);
    for (int r = 0; r < rows; r++) {
        const XBlock *xr = x + (size_t)r * blocks;
        const uint8_t *wb = w;
        float total = 0.0f;
        for (int b = 0; b < blocks; b++, wb += stride) {
            const float d = half_to_float(load_half(wb));
            int sum = 0;
            if (format == Q8_0) {
                const int8_t *q = (const int8_t *)(wb + 2);
                for (int i = 0; i < BLOCK; i++) sum += q[i] * xr[b].q[i];
                total += d * xr[b].d * (float)sum;
            } else {
                const uint8_t *packed = wb + (format == Q4_1 ? 4 : 2);
                const float m = format == Q4_1 ? half_to_float(load_half(wb + 2)) : -8.0f * d;
                for (int i = 0; i < BLOCK / 2; i++)
                    sum += (packed[i] & 0x0F) * xr[b].q[i] + (packed[i] >> 4) * xr[b].q[i + BLOCK / 2];
                total += d * xr[b].d * (float)sum + m * xr[b].sum;
            }
        }
        y[r * y_stride] = total;
    }
}
#endif

/* Every row of x against output rows [first, last) of W, in tiles of TILE rows of x. */
ALWAYS_INLINE void matmul_rows(int format, const uint8_t *w, int first, int last, int out, int blocks,
                               const XBlock *x, int rows, float *y) {
    const size_t row_bytes = (size_t)blocks * block_bytes(format);
    for (int o = first; o < last; o++) {
        const uint8_t *wo = w + (size_t)o * row_bytes;
        int r = 0;
        for (; r + TILE <= rows; r += TILE) dot_tile(format, TILE, wo, x + (size_t)r * blocks, blocks, y + (size_t)r * out + o, out);
        for (; r < rows; r++) dot_tile(format, 1, wo, x + (size_t)r * blocks, blocks, y + (size_t)r * out + o, out);
    }
}

/* One copy of the loops per format, so that none of them branches on it. */
static void matmul_q8_0(const uint8_t *w, int first, int last, int out, int blocks, const XBlock *x, int rows, float *y) {
    matmul_rows(Q8_0, w, first, last, out, blocks, x, rows, y);
}
static void matmul_q4_0(const uint8_t *w, int first, int last, int out, int blocks, const XBlock *x, int rows, float *y) {
    matmul_rows(Q4_0, w, first, last, out, blocks, x, rows, y);
}
static void matmul_q4_1(const uint8_t *w, int first, int last, int out, int blocks, const XBlock *x, int rows, float *y) {
    matmul_rows(Q4_1, w, first, last, out, blocks, x, rows, y);
}

/* W (rows x in) as float32, for products with many rows of x, which a float32 matrix multiply
   does faster than block by block. Returns 0, or -1 when the format is unknown. */
int attendo_block_dequantize(int format, const uint8_t *w, int rows, int in, float *out, int threads) {
    if (format != Q8_0 && format != Q4_0 && format != Q4_1) return -1;
    const int blocks = in / BLOCK, stride = block_bytes(format);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t *block = w + (size_t)r * blocks * stride;
        float *values = out + (size_t)r * in;
        for (int b = 0; b < blocks; b++, block += stride, values += BLOCK) {
            const float d = half_to_float(load_half(block));
            if (format == Q8_0) {
                for (int i = 0; i < BLOCK; i++) values[i] = d * (float)((const int8_t *)(block + 2))[i];
            } else {
                const float m = format == Q4_1 ? half_to_float(load_half(block + 2)) : -8.0f * d;
                const uint8_t *packed = block + (format == Q4_1 ? 4 : 2);
                for (int i = 0; i < BLOCK / 2; i++) {
                    values[i] = d * (float)(packed[i] & 0x0F) + m;
                    values[i + BLOCK / 2] = d * (float)(packed[i] >> 4) + m;
                }
            }
        }
    }
    return 0;
}

/* y (rows x out) = x (rows x in) · Wᵀ, W (out x in) in `format`; in is a multiple of 32.
   Returns 0, or -1 when the format is unknown or memory runs out. */
int attendo_block_matmul(int format, const uint8_t *w, int out, int in, const float *x, int rows,
                         float *y, int threads) {
    void (*matmul)(const uint8_t *, int, int, int, int, const XBlock *, int, float *) =
        format == Q8_0 ? matmul_q8_0 : format == Q4_0 ? matmul_q4_0 : format == Q4_1 ? matmul_q4_1 : NULL;
    if (matmul == NULL) return -1;
    const int blocks = in / BLOCK;
    XBlock *xq = malloc(sizeof(XBlock) * (size_t)blocks * rows);
    if (xq == NULL) return -1;
    /* A few rows (decoding) are quantized here, so the threads meet only once, at the end. */
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > TILE)
    for (int r = 0; r < rows; r++) quantize_x(x + (size_t)r * in, blocks, xq + (size_t)r * blocks);
#pragma omp parallel num_threads(threads)
    {
        /* each thread takes one run of output rows */
        const int team = omp_get_num_threads(), share = (out + team - 1) / team;
        const int first = omp_get_thread_num() * share, last = first + share < out ? first + share : out;
        if (first < last) matmul(w, first, last, out, blocks, xq, rows, y);
    }
    free(xq);
    return 0;
}
