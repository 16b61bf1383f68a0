/* What the kernels share: float16/bfloat16 conversions, and the few vector operations they are
   written in, for the instruction sets this library may be built for.

   The library is compiled for the machine it runs on (-march=native), so exactly one of these
   paths is built:
     - AVX-512 (F, BW, VL) with VNNI: 16 float lanes; vpdpbusd multiplies 4 pairs of bytes and adds
       them to an int32 lane in one instruction;
     - AVX2 (+ AVX-VNNI where present): 8 float lanes; without VNNI, maddubs + madd do the same
       byte products in two instructions (no pair can overflow int16 with our operands: one side
       is at most 63 or 127 in magnitude, the other at most 127, so a pair sums to < 32767);
     - plain C, for anything else.
   Every path computes an integer dot product exactly, so they differ only in how many float
   lanes they accumulate in.

   Batch invariance: whatever path is built, a row's result is computed by the same instructions
   in the same order whatever other rows are computed beside it (see matmul.c, attention.c). */

#ifndef ATTENDO_SIMD_H
#define ATTENDO_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ATTENDO_AVX512 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ATTENDO_VNNI 1 /* 256-bit vpdpbusd through AVX512-VL */
#elif defined(__AVXVNNI__)
#define ATTENDO_VNNI 2 /* the VEX-encoded AVX-VNNI form */
#endif

ALWAYS_INLINE uint16_t load_u16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

static inline float half_to_float(uint16_t h) {
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

ALWAYS_INLINE float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

ALWAYS_INLINE float load_half(const uint8_t *p) { return half_to_float(load_u16(p)); }

#ifdef __AVX2__
/* The eight lanes added in one fixed order. */
ALWAYS_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

ALWAYS_INLINE int hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* acc + Σ over groups of four of u·s: 32 unsigned bytes times 32 signed bytes into 8 int32 lanes. */
ALWAYS_INLINE __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) {
#if ATTENDO_VNNI == 1
    return _mm256_dpbusd_epi32(acc, u, s);
#elif ATTENDO_VNNI == 2
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

ALWAYS_INLINE __m256i bits_to_bytes(uint32_t bits, int8_t set) {
    /* bit i of bits → byte i: `set` where the bit is 1, else 0 */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0x0000000000000000));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(set));
}
/* Eight float16 or bfloat16 values from memory as float32. */
ALWAYS_INLINE __m256 load8_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
ALWAYS_INLINE __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* e^x for x <= 0 (what softmax needs after subtracting the maximum), to within 2 units in the last
   place: x = n·ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7, then times 2^n. Below
   -87.3 (where e^x is no longer a normal float) the result is 0. */
ALWAYS_INLINE __m256 exp8(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 in two parts, so that n·ln2_hi is exact */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
    return _mm256_and_ps(result, _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ));
}
#endif

/* ---- 16 lanes: the width of the packed products (packed.c) -------------------------------
   One output row per 32-bit lane, 16 rows at a time: a single zmm register with AVX-512, a pair
   of ymm registers (rows 0-7, rows 8-15) with AVX2. The operations below are the few that
   packed.c needs; each computes the same values on either path. */
/* Whether i16_dot is exact for unsigned bytes up to 255 (vpdpbusd), not only up to 127 (maddubs,
   whose pairs of products would overflow int16). */
#if (ATTENDO_AVX512 && defined(__AVX512VNNI__)) || (!ATTENDO_AVX512 && defined(ATTENDO_VNNI))
#define ATTENDO_FULL_BYTE_DOT 1
#else
#define ATTENDO_FULL_BYTE_DOT 0
#endif

#if ATTENDO_AVX512
typedef __m512i Bytes64; /* 64 bytes, or 16 int32 lanes */
typedef __m512 Floats16;
ALWAYS_INLINE Bytes64 b64_load(const void *p) { return _mm512_loadu_si512(p); }
ALWAYS_INLINE Bytes64 b64_and(Bytes64 a, Bytes64 b) { return _mm512_and_si512(a, b); }
ALWAYS_INLINE Bytes64 b64_or(Bytes64 a, Bytes64 b) { return _mm512_or_si512(a, b); }
ALWAYS_INLINE Bytes64 b64_set8(int8_t v) { return _mm512_set1_epi8(v); }
ALWAYS_INLINE Bytes64 b64_set32(int32_t v) { return _mm512_set1_epi32(v); }
ALWAYS_INLINE Bytes64 b64_zero(void) { return _mm512_setzero_si512(); }
ALWAYS_INLINE Bytes64 b64_shr16(Bytes64 a, int n) { return _mm512_srli_epi16(a, n); }
ALWAYS_INLINE Bytes64 b64_shl16(Bytes64 a, int n) { return _mm512_slli_epi16(a, n); }
/* byte i of a, plus `add` where bit i of mask is set */
ALWAYS_INLINE Bytes64 b64_add_where(Bytes64 a, uint64_t mask, int8_t add) {
    return _mm512_mask_add_epi8(a, mask, a, _mm512_set1_epi8(add));
}
/* acc + Σ over each lane's four byte pairs of u·s: u unsigned, s signed */
ALWAYS_INLINE Bytes64 i16_dot(Bytes64 acc, Bytes64 u, Bytes64 s) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
/* acc + Σ over each lane's four byte pairs of w·x, both signed: |w| times x with w's sign */
ALWAYS_INLINE Bytes64 i16_dot_signed(Bytes64 acc, Bytes64 w, Bytes64 x) {
    const __mmask64 negative = _mm512_movepi8_mask(w);
    return i16_dot(acc, _mm512_abs_epi8(w), _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x));
}
ALWAYS_INLINE Bytes64 i16_add(Bytes64 a, Bytes64 b) { return _mm512_add_epi32(a, b); }
ALWAYS_INLINE Bytes64 i16_sub(Bytes64 a, Bytes64 b) { return _mm512_sub_epi32(a, b); }
ALWAYS_INLINE Bytes64 i16_mul(Bytes64 a, Bytes64 b) { return _mm512_mullo_epi32(a, b); }
/* 16 bytes (one per row) widened to 16 int32 lanes */
ALWAYS_INLINE Bytes64 i16_from_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
ALWAYS_INLINE Bytes64 i16_from_s8(const int8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
ALWAYS_INLINE Bytes64 i16_from_bytes(__m128i v) { return _mm512_cvtepu8_epi32(v); }
ALWAYS_INLINE Floats16 f16_from_i(Bytes64 a) { return _mm512_cvtepi32_ps(a); }
ALWAYS_INLINE Floats16 f16_halves(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
ALWAYS_INLINE Floats16 f16_set(float v) { return _mm512_set1_ps(v); }
ALWAYS_INLINE Floats16 f16_zero(void) { return _mm512_setzero_ps(); }
ALWAYS_INLINE Floats16 f16_mul(Floats16 a, Floats16 b) { return _mm512_mul_ps(a, b); }
ALWAYS_INLINE Floats16 f16_fma(Floats16 a, Floats16 b, Floats16 c) { return _mm512_fmadd_ps(a, b, c); }
ALWAYS_INLINE Floats16 f16_fnma(Floats16 a, Floats16 b, Floats16 c) { return _mm512_fnmadd_ps(a, b, c); }
ALWAYS_INLINE void f16_store(float *p, Floats16 v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__)
typedef struct { __m256i lo, hi; } Bytes64;
typedef struct { __m256 lo, hi; } Floats16;
#define PAIR(a, b) ((Bytes64){a, b})
ALWAYS_INLINE Bytes64 b64_load(const void *p) {
    return PAIR(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1));
}
ALWAYS_INLINE Bytes64 b64_and(Bytes64 a, Bytes64 b) { return PAIR(_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)); }
ALWAYS_INLINE Bytes64 b64_or(Bytes64 a, Bytes64 b) { return PAIR(_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)); }
ALWAYS_INLINE Bytes64 b64_set8(int8_t v) { return PAIR(_mm256_set1_epi8(v), _mm256_set1_epi8(v)); }
ALWAYS_INLINE Bytes64 b64_set32(int32_t v) { return PAIR(_mm256_set1_epi32(v), _mm256_set1_epi32(v)); }
ALWAYS_INLINE Bytes64 b64_zero(void) { return PAIR(_mm256_setzero_si256(), _mm256_setzero_si256()); }
ALWAYS_INLINE Bytes64 b64_shr16(Bytes64 a, int n) { return PAIR(_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)); }
ALWAYS_INLINE Bytes64 b64_shl16(Bytes64 a, int n) { return PAIR(_mm256_slli_epi16(a.lo, n), _mm256_slli_epi16(a.hi, n)); }
ALWAYS_INLINE Bytes64 b64_add_where(Bytes64 a, uint64_t mask, int8_t add) {
    return PAIR(_mm256_add_epi8(a.lo, bits_to_bytes((uint32_t)mask, add)),
                _mm256_add_epi8(a.hi, bits_to_bytes((uint32_t)(mask >> 32), add)));
}
ALWAYS_INLINE Bytes64 i16_dot(Bytes64 acc, Bytes64 u, Bytes64 s) { return PAIR(dot_u8_s8(acc.lo, u.lo, s.lo), dot_u8_s8(acc.hi, u.hi, s.hi)); }
ALWAYS_INLINE Bytes64 i16_dot_signed(Bytes64 acc, Bytes64 w, Bytes64 x) {
    return PAIR(dot_u8_s8(acc.lo, _mm256_sign_epi8(w.lo, w.lo), _mm256_sign_epi8(x.lo, w.lo)),
                dot_u8_s8(acc.hi, _mm256_sign_epi8(w.hi, w.hi), _mm256_sign_epi8(x.hi, w.hi)));
}
ALWAYS_INLINE Bytes64 i16_add(Bytes64 a, Bytes64 b) { return PAIR(_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)); }
ALWAYS_INLINE Bytes64 i16_sub(Bytes64 a, Bytes64 b) { return PAIR(_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)); }
ALWAYS_INLINE Bytes64 i16_mul(Bytes64 a, Bytes64 b) { return PAIR(_mm256_mullo_epi32(a.lo, b.lo), _mm256_mullo_epi32(a.hi, b.hi)); }
ALWAYS_INLINE Bytes64 i16_from_bytes(__m128i v) { return PAIR(_mm256_cvtepu8_epi32(v), _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))); }
ALWAYS_INLINE Bytes64 i16_from_u8(const uint8_t *p) { return i16_from_bytes(_mm_loadu_si128((const __m128i *)p)); }
ALWAYS_INLINE Bytes64 i16_from_s8(const int8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return PAIR(_mm256_cvtepi8_epi32(v), _mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}
ALWAYS_INLINE Floats16 f16_from_i(Bytes64 a) { return (Floats16){_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
ALWAYS_INLINE Floats16 f16_halves(const uint8_t *p) {
    return (Floats16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1))};
}
ALWAYS_INLINE Floats16 f16_set(float v) { return (Floats16){_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
ALWAYS_INLINE Floats16 f16_zero(void) { return (Floats16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
ALWAYS_INLINE Floats16 f16_mul(Floats16 a, Floats16 b) { return (Floats16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
ALWAYS_INLINE Floats16 f16_fma(Floats16 a, Floats16 b, Floats16 c) {
    return (Floats16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
ALWAYS_INLINE Floats16 f16_fnma(Floats16 a, Floats16 b, Floats16 c) {
    return (Floats16){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
ALWAYS_INLINE void f16_store(float *p, Floats16 v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}
#undef PAIR
#endif

/* The scalar form of the same e^x (used where vectors are not built, and for tails). */
static inline float exp1(float x) {
    if (x < -87.3f) return 0.0f;
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return ldexpf(p, (int)n);
}

#endif
