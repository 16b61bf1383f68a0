/* ggml's block formats as the kernels see them, and the activations rounded to multiply by them.
   formats.c holds the code: the rounding of activations, and each format's layout spelled out
   once as integers (unpack), which the scalar product and the dequantization are written on. */

#ifndef ATTENDO_FORMATS_H
#define ATTENDO_FORMATS_H

#include "simd.h"

/* ggml's type numbers */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
       Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };  // clang-format off
enum { QK = 32, QK_K = 256 };

/* Activations rounded for the 32-wide formats: x ≈ d·q. */
typedef struct {
    float d;
    float sum; /* d·Σq: what a block's constant term (m, or -8d / -16d) multiplies */
    int32_t qsum; /* Σq */
    int8_t q[QK];
} XBlock;

/* Activations rounded for the K-quants: one scale per 256, and the sum of every 16 codes. */
typedef struct {
    float d;
    int16_t sums[QK_K / 16];
    int8_t q[QK_K];
} XSuper;

static inline int is_k_quant(int format) { return format >= Q2_K && format <= Q6_K; }

static inline int block_values(int format) {
    if (format == F32 || format == F16 || format == BF16) return 1;
    return is_k_quant(format) ? QK_K : QK;
}

static inline int block_bytes(int format) {
    switch (format) {
    case F32: return 4;
    case F16: case BF16: return 2;
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q2_K: return 84;
    case Q3_K: return 110;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

/* ---- one block as integers: the reference layout of every format ---------------------------
   unpack() writes a block's codes q (already offset, so w = d·scale·q - dmin·min), the integer
   scale and minimum of each sub-block of 16, and d, dmin. The scalar product and the
   dequantization are written on it, so each format's layout is spelled out once (formats.c);
   the vector code (matmul.c, packed.c) reads the same bytes in registers and is tested against it. */

typedef struct {
    float d, dmin;
    int8_t q[QK_K];
    int scale[QK_K / 16], min[QK_K / 16];
} Unpacked;

void quantize_row_32(const float *x, int blocks, XBlock *out);
void quantize_row_256(const float *x, int blocks, XSuper *out);
void unpack_k_scales(const uint8_t *s, int *scale, int *min);
void unpack(int format, const uint8_t *w, Unpacked *u);
float float_value(int format, const uint8_t *w, int i);

#endif
