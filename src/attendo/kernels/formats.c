/* The activations' rounding and every block format's layout (see formats.h). */

#include "formats.h"

/* ---- rounding the activations ------------------------------------------------------------ */

#ifdef __AVX2__
/* 32 int32 codes (4 vectors) → 32 int8 in order (the packs work within 128-bit lanes). */
static inline void store_codes(__m256i q0, __m256i q1, __m256i q2, __m256i q3, int8_t *out) {
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

static inline float max_abs8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
#endif

/* The vector and scalar loops compute the same values: x·(1/d) rounded to nearest, ties to even. */
void quantize_row_32(const float *x, int blocks, XBlock *out) {
    for (int b = 0; b < blocks; b++, x += QK) {
#ifdef __AVX2__
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], top = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[k]));
        }
        const float d = max_abs8(top) / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4], total = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(inverse)));
            total = _mm256_add_epi32(total, q[k]);
        }
        store_codes(q[0], q[1], q[2], q[3], out[b].q);
        const int sum = hsum8_epi32(total);
#else
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float d = amax / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            out[b].q[i] = (int8_t)lrintf(x[i] * inverse);
            sum += out[b].q[i];
        }
#endif
        out[b].d = d;
        out[b].sum = d * (float)sum;
        out[b].qsum = sum;
    }
}

/* As llama.cpp's Q8_K: the value of largest magnitude becomes -127 or 127 exactly. */
void quantize_row_256(const float *x, int blocks, XSuper *out) {
    for (int b = 0; b < blocks; b++, x += QK_K) {
        float amax = 0.0f, extreme = 0.0f;
        for (int i = 0; i < QK_K; i++) {
            if (fabsf(x[i]) > amax) {
                amax = fabsf(x[i]);
                extreme = x[i];
            }
        }
        if (amax == 0.0f) {
            memset(&out[b], 0, sizeof out[b]);
            continue;
        }
        const float inverse = -127.0f / extreme;
#ifdef __AVX2__
        const __m256i high = _mm256_set1_epi32(127), low = _mm256_set1_epi32(-127);
        for (int i = 0; i < QK_K; i += 32) {
            __m256i q[4];
            for (int k = 0; k < 4; k++) {
                const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_set1_ps(inverse), _mm256_loadu_ps(x + i + 8 * k)));
                q[k] = _mm256_max_epi32(low, _mm256_min_epi32(high, v));
            }
            store_codes(q[0], q[1], q[2], q[3], out[b].q + i);
            for (int k = 0; k < 4; k += 2) /* the sums of each 16 codes */
                out[b].sums[i / 16 + k / 2] = (int16_t)hsum8_epi32(_mm256_add_epi32(q[k], q[k + 1]));
        }
#else
        for (int i = 0; i < QK_K; i++) {
            long v = lrintf(inverse * x[i]);
            out[b].q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
        for (int s = 0; s < QK_K / 16; s++) {
            int total = 0;
            for (int i = 0; i < 16; i++) total += out[b].q[16 * s + i];
            out[b].sums[s] = (int16_t)total;
        }
#endif
        out[b].d = 1.0f / inverse;
    }
}

void unpack_k_scales(const uint8_t *s, int *scale, int *min) {
    /* Q4_K/Q5_K: eight 6-bit scales and minimums in 12 bytes; each covers 32 values */
    for (int j = 0; j < 8; j++) {
        int sc, m;
        if (j < 4) {
            sc = s[j] & 63;
            m = s[j + 4] & 63;
        } else {
            sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
            m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
        scale[2 * j] = scale[2 * j + 1] = sc;
        min[2 * j] = min[2 * j + 1] = m;
    }
}

void unpack(int format, const uint8_t *w, Unpacked *u) {
    u->dmin = 0.0f;
    for (int s = 0; s < QK_K / 16; s++) {
        u->scale[s] = 1;
        u->min[s] = 0;
    }
    switch (format) {
    case Q8_0:
        u->d = load_half(w);
        memcpy(u->q, w + 2, QK);
        break;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
        const int has_min = format == Q4_1 || format == Q5_1, five = format == Q5_0 || format == Q5_1;
        const uint8_t *packed = w + 2 + 2 * has_min + 4 * five;
        uint32_t high = 0;
        if (five) memcpy(&high, w + 2 + 2 * has_min, 4);
        const int offset = has_min ? 0 : (five ? 16 : 8);
        for (int i = 0; i < QK / 2; i++) {
            u->q[i] = (int8_t)((packed[i] & 0x0F) + (five ? ((high >> i) & 1) << 4 : 0) - offset);
            u->q[i + 16] = (int8_t)((packed[i] >> 4) + (five ? ((high >> (i + 16)) & 1) << 4 : 0) - offset);
        }
        u->d = load_half(w);
        if (has_min) { /* w = d·q + m, as d·q - dmin·1 with dmin = -m */
            u->dmin = -load_half(w + 2);
            u->min[0] = u->min[1] = 1;
        }
        break;
    }
    case Q4_K: case Q5_K: {
        u->d = load_half(w);
        u->dmin = load_half(w + 2);
        unpack_k_scales(w + 4, u->scale, u->min);
        const uint8_t *high = w + 16, *packed = w + 16 + (format == Q5_K ? 32 : 0);
        for (int chunk = 0; chunk < 4; chunk++)
            for (int l = 0; l < 32; l++) {
                const uint8_t byte = packed[32 * chunk + l];
                int low = byte & 0x0F, upper = byte >> 4;
                if (format == Q5_K) {
                    low |= ((high[l] >> (2 * chunk)) & 1) << 4;
                    upper |= ((high[l] >> (2 * chunk + 1)) & 1) << 4;
                }
                u->q[64 * chunk + l] = (int8_t)low;
                u->q[64 * chunk + 32 + l] = (int8_t)upper;
            }
        break;
    }
    case Q6_K: {
        const uint8_t *low = w, *high = w + 128;
        const int8_t *scales = (const int8_t *)(w + 192);
        u->d = load_half(w + 208);
        for (int s = 0; s < 16; s++) u->scale[s] = scales[s];
        for (int half = 0; half < 2; half++)
            for (int l = 0; l < 32; l++) {
                const uint8_t h = high[32 * half + l], a = low[64 * half + l], b = low[64 * half + 32 + l];
                int8_t *q = u->q + 128 * half + l;
                q[0] = (int8_t)(((a & 0x0F) | ((h & 3) << 4)) - 32);
                q[32] = (int8_t)(((b & 0x0F) | (((h >> 2) & 3) << 4)) - 32);
                q[64] = (int8_t)(((a >> 4) | (((h >> 4) & 3) << 4)) - 32);
                q[96] = (int8_t)(((b >> 4) | (((h >> 6) & 3) << 4)) - 32);
            }
        break;
    }
    case Q2_K: {
        const uint8_t *scales = w, *packed = w + 16;
        u->d = load_half(w + 80);
        u->dmin = load_half(w + 82);
        for (int s = 0; s < 16; s++) {
            u->scale[s] = scales[s] & 0x0F;
            u->min[s] = scales[s] >> 4;
        }
        for (int half = 0; half < 2; half++)
            for (int shift = 0; shift < 4; shift++)
                for (int l = 0; l < 32; l++) u->q[128 * half + 32 * shift + l] = (int8_t)((packed[32 * half + l] >> (2 * shift)) & 3);
        break;
    }
    case Q3_K: {
        const uint8_t *mask = w, *packed = w + 32, *s = w + 96;
        u->d = load_half(w + 108);
        for (int i = 0; i < 16; i++) {
            const int low = (i < 8 ? s[i] : s[i - 8] >> 4) & 0x0F, high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
            u->scale[i] = (low | (high << 4)) - 32;
        }
        for (int half = 0; half < 2; half++)
            for (int shift = 0; shift < 4; shift++)
                for (int l = 0; l < 32; l++) {
                    const int code = (packed[32 * half + l] >> (2 * shift)) & 3;
                    const int set = (mask[l] >> (4 * half + shift)) & 1;
                    u->q[128 * half + 32 * shift + l] = (int8_t)(code - (set ? 0 : 4));
                }
        break;
    }
    }
}

float float_value(int format, const uint8_t *w, int i) {
    if (format == F32) {
        float v;
        memcpy(&v, w + 4 * (size_t)i, sizeof v);
        return v;
    }
    const uint16_t h = load_u16(w + 2 * (size_t)i);
    return format == F16 ? half_to_float(h) : bf16_to_float(h);
}

