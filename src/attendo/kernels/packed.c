/* Block weights rearranged ("packed") so that one vector instruction multiplies 16 output rows at
   once, and the product y = x·Wᵀ with them. Same bytes as the file, in another order.

   A file stores W row after row, each row a run of blocks. Multiplying one row at a time, each
   block's 32 products end up spread over vector lanes that must be added across at the end, and
   every block pays for loading and converting its own scale. Here 16 rows ("a panel") are
   interleaved by 4-byte groups: group g of a block (its codes for values 4g..4g+3) of rows 0..15
   fills one 64-byte vector, so one vpdpbusd with the activations' 4 bytes for those values
   broadcast adds 4 products to each of 16 lanes, one lane per output row, and the 16 scales of a
   block are loaded and converted together. The lanes never need adding across: each is one
   output. Up to TILE rows of x share every vector of codes.

   Layout, per panel, per block (the bytes of 16 rows' blocks, rearranged; nothing added):
     Q8_0        d[16] f16 | codes: 8 groups x 16 rows x 4 bytes, each code + 128 (so unsigned)
     Q4_0, Q4_1  d[16] (| m[16]) | words: 4 x 16 rows x 4 bytes; byte i of a row's block holds
                 value i (low nibble) and value i + 16 (high nibble), as in the file, so word g
                 gives groups g and g + 4
     Q5_0, Q5_1  d[16] (| m[16]) | fifth bits: 8 groups x a 64-bit mask (bit 4r + j: value 4g + j
                 of row r) | words as Q4_0
     Q4_K, Q5_K  d[16] | dmin[16] | the 12 scale bytes x 16 rows | (Q5_K: fifth bits, 8 sub-blocks
                 x 8 groups x 64-bit mask) | words: 32 x 16 rows x 4 bytes (the file's code bytes)
     Q6_K        d[16] | scales: 16 sub-blocks x 16 rows | low bits: 32 words x 16 rows | high
                 bits: 16 words x 16 rows x 4 bytes
   A matrix whose row count is not a multiple of 16 gets zero rows (scale 0) up to the next.

   Every code is multiplied as an unsigned byte with the activation's signed byte; an offset
   (Q8_0's +128, Q4_0's -8, Q6_K's -32...) comes back through the activations' sums, exactly, in
   integers. A row's float sums run over its blocks in order, whatever TILE rows share them:
   batch-invariant, like matmul.c. */

#include <stdlib.h>

#include <omp.h>

#include "formats.h"
#include "internal.h"

enum { PANEL = 16 };

int packed_format(int format) {
#if defined(__AVX2__)
    switch (format) {
    case Q8_0: case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q4_K: case Q5_K: case Q6_K: return 1;
    default: return 0;
    }
#else
    (void)format;
    return 0; /* plain C multiplies the file's layout (matmul.c) */
#endif
}

static int panels(int out) { return (out + PANEL - 1) / PANEL; }

/* ---- packing and unpacking: pure byte moves, each the other's inverse ---------------------- */

/* Where each part of a panel's block starts; the order of the parts is the layout above. */
typedef struct {
    int d, m, bits, scales, words, high, size;
} Parts;

static Parts parts_of(int format) {
    const int f16s = 2 * PANEL;
    switch (format) {
    case Q8_0: return (Parts){0, -1, -1, -1, f16s, -1, f16s + 32 * PANEL};
    case Q4_0: return (Parts){0, -1, -1, -1, f16s, -1, f16s + 16 * PANEL};
    case Q4_1: return (Parts){0, f16s, -1, -1, 2 * f16s, -1, 2 * f16s + 16 * PANEL};
    case Q5_0: return (Parts){0, -1, f16s, -1, f16s + 64, -1, f16s + 64 + 16 * PANEL};
    case Q5_1: return (Parts){0, f16s, 2 * f16s, -1, 2 * f16s + 64, -1, 2 * f16s + 64 + 16 * PANEL};
    case Q4_K: return (Parts){0, f16s, -1, 2 * f16s, 2 * f16s + 12 * PANEL, -1, 2 * f16s + 12 * PANEL + 128 * PANEL};
    case Q5_K: {
        const int bits = 2 * f16s + 12 * PANEL;
        return (Parts){0, f16s, bits, 2 * f16s, bits + 512, -1, bits + 512 + 128 * PANEL};
    }
    case Q6_K: return (Parts){0, -1, -1, f16s, f16s + 16 * PANEL, f16s + 16 * PANEL + 128 * PANEL, f16s + 16 * PANEL + 192 * PANEL};
    default: return (Parts){0};
    }
}

/* Where a format keeps, within one block of the file: its scale d, its m or dmin, its fifth bits,
   its scale bytes, its code bytes and (Q6_K) its high bits; and how many code bytes it has. */
typedef struct {
    int d, m, bits, scales, codes, high, code_bytes;
} FileBlock;

static FileBlock file_block(int format) {
    switch (format) {
    case Q8_0: return (FileBlock){0, -1, -1, -1, 2, -1, 32};
    case Q4_0: return (FileBlock){0, -1, -1, -1, 2, -1, 16};
    case Q4_1: return (FileBlock){0, 2, -1, -1, 4, -1, 16};
    case Q5_0: return (FileBlock){0, -1, 2, -1, 6, -1, 16};
    case Q5_1: return (FileBlock){0, 2, 4, -1, 8, -1, 16};
    case Q4_K: return (FileBlock){0, 2, -1, 4, 16, -1, 128};
    case Q5_K: return (FileBlock){0, 2, 16, 4, 48, -1, 128};
    case Q6_K: return (FileBlock){208, -1, -1, 192, 0, 128, 128};
    default: return (FileBlock){0};
    }
}

/* Move one block of one row (lane r) between the file's layout and the packed one.
   to_packed: file → packed; else packed → file. */
static void move_block(int format, uint8_t *file, uint8_t *packed, int r, int to_packed) {
    const Parts p = parts_of(format);
    const FileBlock f = file_block(format);
#define MOVE(file_at, packed_at, n)                                       \
    do {                                                                  \
        if (to_packed) memcpy(packed + (packed_at), file + (file_at), n); \
        else memcpy(file + (file_at), packed + (packed_at), n);           \
    } while (0)
    MOVE(f.d, p.d + 2 * r, 2);
    if (f.m >= 0) MOVE(f.m, p.m + 2 * r, 2);
    if (format == Q6_K) {
        for (int s = 0; s < 16; s++) MOVE(f.scales + s, p.scales + PANEL * s + r, 1);
        for (int w = 0; w < 16; w++) MOVE(f.high + 4 * w, p.high + (PANEL * w + r) * 4, 4);
    } else if (f.scales >= 0) {
        for (int k = 0; k < 12; k++) MOVE(f.scales + k, p.scales + PANEL * k + r, 1);
    }
    for (int w = 0; w < f.code_bytes / 4; w++) {
        uint8_t *word_file = file + f.codes + 4 * w, *word_packed = packed + p.words + (PANEL * w + r) * 4;
        if (format == Q8_0) { /* signed codes stored as unsigned: + 128 */
            for (int j = 0; j < 4; j++) {
                if (to_packed) word_packed[j] = word_file[j] ^ 0x80;
                else word_file[j] = word_packed[j] ^ 0x80;
            }
        } else {
            MOVE(f.codes + 4 * w, p.words + (PANEL * w + r) * 4, 4);
        }
    }
#undef MOVE
    if (f.bits < 0) return;
    /* fifth bits: in the file 32 bits per block (Q5_0/Q5_1: bit i is value i) or 32 bytes
       (Q5_K: bit s of byte i is value 32s + i); packed, one 64-bit mask per group of 4 values */
    const int sub_blocks = format == Q5_K ? 8 : 1;
    for (int s = 0; s < sub_blocks; s++)
        for (int g = 0; g < 8; g++) {
            uint64_t mask;
            uint8_t *at = packed + p.bits + 8 * (8 * s + g);
            memcpy(&mask, at, 8);
            for (int j = 0; j < 4; j++) {
                const int value = 4 * g + j, bit = 4 * r + j;
                uint8_t *byte = format == Q5_K ? file + f.bits + value : file + f.bits + value / 8;
                const int file_bit = format == Q5_K ? s : value % 8;
                if (to_packed) {
                    mask = (mask & ~(1ULL << bit)) | ((uint64_t)((*byte >> file_bit) & 1) << bit);
                } else {
                    *byte = (uint8_t)((*byte & ~(1 << file_bit)) | (((mask >> bit) & 1) << file_bit));
                }
            }
            memcpy(at, &mask, 8);
        }
}

/* Bytes the packed matrix takes: the file's, plus zero rows up to a multiple of 16. */
long attendo_packed_bytes(int format, int out, int in) {
    return (long)panels(out) * (in / block_values(format)) * parts_of(format).size;
}

/* packed ← W (out x in, the file's layout). Returns 0, or -1 for a format that is not packed. */
int attendo_pack(int format, const uint8_t *w, int out, int in, uint8_t *packed, int threads) {
    if (!packed_format(format) || in % block_values(format)) return -1;
    const int blocks = in / block_values(format), stride = block_bytes(format), size = parts_of(format).size;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int panel = 0; panel < panels(out); panel++)
        for (int b = 0; b < blocks; b++) {
            uint8_t *target = packed + ((size_t)panel * blocks + b) * size;
            memset(target, 0, size);
            for (int r = 0; r < PANEL && panel * PANEL + r < out; r++) {
                uint8_t *source = (uint8_t *)w + ((size_t)(panel * PANEL + r) * blocks + b) * stride;
                move_block(format, source, target, r, 1);
            }
        }
    return 0;
}

/* The file's layout of rows index[0..n) (n x bytes per row) from a packed matrix. */
int attendo_unpack_rows(int format, const uint8_t *packed, int in, const int64_t *index, int n, uint8_t *rows) {
    if (!packed_format(format) || in % block_values(format)) return -1;
    const int blocks = in / block_values(format), stride = block_bytes(format), size = parts_of(format).size;
    for (int i = 0; i < n; i++) {
        const int panel = (int)(index[i] / PANEL), r = (int)(index[i] % PANEL);
        for (int b = 0; b < blocks; b++) {
            uint8_t *target = rows + ((size_t)i * blocks + b) * stride;
            memset(target, 0, stride);
            move_block(format, target, (uint8_t *)packed + ((size_t)panel * blocks + b) * size, r, 0);
        }
    }
    return 0;
}

/* ---- the products ------------------------------------------------------------------------ */
#if defined(__AVX2__)

#if ATTENDO_AVX512
enum { TILE = 4 };
#else
enum { TILE = 2 }; /* pairs of registers: fewer rows at a time, or they spill */
#endif

ALWAYS_INLINE int32_t word_at(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return v;
}

/* Σ over the 8 groups of a block of 32 values: codes[g] · (the activations' 4 bytes of group g),
   in two chains (an integer sum: exact in any order), so that each dot waits on one two back. */
ALWAYS_INLINE Bytes64 dot_block(const Bytes64 *codes, const int8_t *q) {
    Bytes64 even = b64_zero(), odd = b64_zero();
    for (int g = 0; g < 8; g += 2) {
        even = i16_dot(even, codes[g], b64_set32(word_at(q + 4 * g)));
        odd = i16_dot(odd, codes[g + 1], b64_set32(word_at(q + 4 * g + 4)));
    }
    return i16_add(even, odd);
}

ALWAYS_INLINE Bytes64 flip_sign_bit(Bytes64 codes) {
#if ATTENDO_AVX512
    return _mm512_xor_si512(codes, _mm512_set1_epi8((char)0x80));
#else
    return (Bytes64){_mm256_xor_si256(codes.lo, _mm256_set1_epi8((char)0x80)), _mm256_xor_si256(codes.hi, _mm256_set1_epi8((char)0x80))};
#endif
}

/* Q8_0's block product. With vpdpbusd: the codes + 128 as unsigned bytes, the 128·Σx they add
   taken off later. Without it (maddubs sums byte products in pairs, which overflows int16 past
   127·127·2): |code| times x with the code's sign. */
ALWAYS_INLINE Bytes64 dot_q8(const Bytes64 *codes, const int8_t *q) {
    if (ATTENDO_FULL_BYTE_DOT) return dot_block(codes, q);
    Bytes64 even = b64_zero(), odd = b64_zero();
    for (int g = 0; g < 8; g += 2) {
        even = i16_dot_signed(even, codes[g], b64_set32(word_at(q + 4 * g)));
        odd = i16_dot_signed(odd, codes[g + 1], b64_set32(word_at(q + 4 * g + 4)));
    }
    return i16_add(even, odd);
}

/* The 32 codes of 16 rows' blocks as 8 vectors, unsigned (Q8_0 without vpdpbusd: signed). */
ALWAYS_INLINE void codes_32(int format, const uint8_t *block, const Parts *p, Bytes64 *codes) {
    if (format == Q8_0) {
        for (int g = 0; g < 8; g++) {
            codes[g] = b64_load(block + p->words + 64 * g);
            /* without vpdpbusd, multiply the signed codes instead (see dot_q8) */
            if (!ATTENDO_FULL_BYTE_DOT) codes[g] = flip_sign_bit(codes[g]);
        }
        return;
    }
    const Bytes64 low = b64_set8(0x0F);
    for (int g = 0; g < 4; g++) {
        const Bytes64 word = b64_load(block + p->words + 64 * g);
        codes[g] = b64_and(word, low);
        codes[g + 4] = b64_and(b64_shr16(word, 4), low);
    }
    if (p->bits >= 0)
        for (int g = 0; g < 8; g++) {
            uint64_t mask;
            memcpy(&mask, block + p->bits + 8 * g, 8);
            codes[g] = b64_add_where(codes[g], mask, 16);
        }
}

/* A hint: bring these bytes (the same block of the next panel) in while this one is multiplied.
   The weights stream from memory, and waiting for them was most of a batch's product time; a
   panel's first tile of rows asks ("ahead"), the tiles after it find the panel cached. */
ALWAYS_INLINE void ask_ahead(const uint8_t *bytes, int size) {
    for (int line = 0; line < size; line += 64) __builtin_prefetch(bytes + line);
}

/* acc[t] += row t of x · the panel's rows, for the 32-wide formats. */
ALWAYS_INLINE void panel_32(int format, int rows, const uint8_t *panel, int blocks, const XBlock *const *x,
                            Floats16 *acc, int ahead) {
    const Parts p = parts_of(format);
    /* the offset each format's codes carry: value = d·(code - offset) (+ m) */
    const int offset = format == Q8_0 ? 128 * ATTENDO_FULL_BYTE_DOT : format == Q4_0 ? 8 : format == Q5_0 ? 16 : 0;
    for (int b = 0; b < blocks; b++, panel += p.size) {
        if (ahead) ask_ahead(panel + (size_t)blocks * p.size, p.size);
        Bytes64 codes[8];
        codes_32(format, panel, &p, codes);
        const Floats16 d = f16_halves(panel + p.d);
        for (int t = 0; t < rows; t++) {
            const XBlock *xb = x[t] + b;
            Bytes64 total = format == Q8_0 ? dot_q8(codes, xb->q) : dot_block(codes, xb->q);
            if (offset) total = i16_sub(total, b64_set32(offset * xb->qsum));
            acc[t] = f16_fma(f16_from_i(total), f16_mul(d, f16_set(xb->d)), acc[t]);
            if (p.m >= 0) acc[t] = f16_fma(f16_halves(panel + p.m), f16_set(xb->sum), acc[t]);
        }
    }
}

/* The 8 six-bit scales and minimums of 16 rows' Q4_K/Q5_K blocks, one byte per row each. */
ALWAYS_INLINE void k_scales(const uint8_t *bytes, __m128i *scale, __m128i *min) {
    __m128i s[12];
    for (int k = 0; k < 12; k++) s[k] = _mm_loadu_si128((const __m128i *)(bytes + PANEL * k));
    const __m128i six = _mm_set1_epi8(63), four = _mm_set1_epi8(0x0F), top = _mm_set1_epi8(3);
    for (int j = 0; j < 4; j++) {
        scale[j] = _mm_and_si128(s[j], six);
        min[j] = _mm_and_si128(s[j + 4], six);
        /* (byte >> 6) << 4 on bytes: shift the 16-bit lanes, then keep each byte's own bits */
        const __m128i high_scale = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(s[j], 6), top), 4);
        const __m128i high_min = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(s[j + 4], 6), top), 4);
        scale[j + 4] = _mm_or_si128(_mm_and_si128(s[j + 8], four), high_scale);
        min[j + 4] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(s[j + 8], 4), four), high_min);
    }
}

/* acc[t] += row t of x · the panel's rows, for Q4_K and Q5_K. */
ALWAYS_INLINE void panel_k4(int format, int rows, const uint8_t *panel, int blocks, const XSuper *const *x,
                            Floats16 *acc, int ahead) {
    const Parts p = parts_of(format);
    const Bytes64 low = b64_set8(0x0F);
    for (int b = 0; b < blocks; b++, panel += p.size) {
        if (ahead) ask_ahead(panel + (size_t)blocks * p.size, p.size);
        __m128i scale[8], min[8];
        k_scales(panel + p.scales, scale, min);
        Bytes64 products[TILE], mins[TILE];
        for (int t = 0; t < rows; t++) products[t] = mins[t] = b64_zero();
        for (int chunk = 0; chunk < 4; chunk++) {
            Bytes64 words[8];
            for (int g = 0; g < 8; g++) words[g] = b64_load(panel + p.words + 64 * (8 * chunk + g));
            for (int half = 0; half < 2; half++) {
                const int s = 2 * chunk + half;
                Bytes64 codes[8];
                for (int g = 0; g < 8; g++) {
                    codes[g] = b64_and(half ? b64_shr16(words[g], 4) : words[g], low);
                    if (p.bits >= 0) {
                        uint64_t mask;
                        memcpy(&mask, panel + p.bits + 8 * (8 * s + g), 8);
                        codes[g] = b64_add_where(codes[g], mask, 16);
                    }
                }
                const Bytes64 sv = i16_from_bytes(scale[s]), mv = i16_from_bytes(min[s]);
                for (int t = 0; t < rows; t++) {
                    const XSuper *xs = x[t] + b;
                    products[t] = i16_add(products[t], i16_mul(dot_block(codes, xs->q + 32 * s), sv));
                    mins[t] = i16_add(mins[t], i16_mul(mv, b64_set32(xs->sums[2 * s] + xs->sums[2 * s + 1])));
                }
            }
        }
        const Floats16 d = f16_halves(panel + p.d), dmin = f16_halves(panel + p.m);
        for (int t = 0; t < rows; t++) {
            const Floats16 dx = f16_set(x[t][b].d);
            acc[t] = f16_fma(f16_from_i(products[t]), f16_mul(d, dx), acc[t]);
            acc[t] = f16_fnma(f16_from_i(mins[t]), f16_mul(dmin, dx), acc[t]);
        }
    }
}

/* acc[t] += row t of x · the panel's rows, for Q6_K. */
ALWAYS_INLINE void panel_k6(int rows, const uint8_t *panel, int blocks, const XSuper *const *x, Floats16 *acc,
                            int ahead) {
    const Parts p = parts_of(Q6_K);
    const Bytes64 low = b64_set8(0x0F), two = b64_set8(3);
    for (int b = 0; b < blocks; b++, panel += p.size) {
        if (ahead) ask_ahead(panel + (size_t)blocks * p.size, p.size);
        Bytes64 products[TILE], offsets[TILE];
        for (int t = 0; t < rows; t++) products[t] = offsets[t] = b64_zero();
        for (int half = 0; half < 2; half++)
            for (int q = 0; q < 4; q++) {
                /* values 128·half + 32q .. + 31: sub-blocks of 16 s and s + 1 */
                const int s = 8 * half + 2 * q;
                Bytes64 codes[8];
                for (int g = 0; g < 8; g++) {
                    const Bytes64 word = b64_load(panel + p.words + 64 * (16 * half + 8 * (q & 1) + g));
                    const Bytes64 high = b64_load(panel + p.high + 64 * (8 * half + g));
                    const Bytes64 lo4 = b64_and(q >> 1 ? b64_shr16(word, 4) : word, low);
                    codes[g] = b64_or(lo4, b64_shl16(b64_and(b64_shr16(high, 2 * q), two), 4));
                }
                const Bytes64 first = i16_from_s8((const int8_t *)(panel + p.scales + PANEL * s));
                const Bytes64 second = i16_from_s8((const int8_t *)(panel + p.scales + PANEL * (s + 1)));
                for (int t = 0; t < rows; t++) {
                    const XSuper *xs = x[t] + b;
                    const int8_t *q8 = xs->q + 128 * half + 32 * q;
                    Bytes64 a = b64_zero(), c = b64_zero();
                    for (int g = 0; g < 4; g++) a = i16_dot(a, codes[g], b64_set32(word_at(q8 + 4 * g)));
                    for (int g = 4; g < 8; g++) c = i16_dot(c, codes[g], b64_set32(word_at(q8 + 4 * g)));
                    products[t] = i16_add(products[t], i16_add(i16_mul(a, first), i16_mul(c, second)));
                    offsets[t] = i16_add(offsets[t], i16_add(i16_mul(first, b64_set32(xs->sums[s])),
                                                             i16_mul(second, b64_set32(xs->sums[s + 1]))));
                }
            }
        const Floats16 d = f16_halves(panel + p.d);
        for (int t = 0; t < rows; t++) {
            /* Σ scale·(code - 32)·x = Σ scale·code·x - 32·Σ scale·(sum of the 16 x codes) */
            const Bytes64 total = i16_sub(products[t], i16_mul(offsets[t], b64_set32(32)));
            acc[t] = f16_fma(f16_from_i(total), f16_mul(d, f16_set(x[t][b].d)), acc[t]);
        }
    }
}

/* y[t·ldy + 16·panel ...] for the panel, for rows t < rows of x. */
ALWAYS_INLINE void panel_tile(int format, int rows, const uint8_t *panel, int blocks, const void *x, size_t x_stride,
                              float *y, size_t ldy, int valid, int ahead) {
    Floats16 acc[TILE];
    for (int t = 0; t < rows; t++) acc[t] = f16_zero();
    if (is_k_quant(format)) {
        const XSuper *xr[TILE];
        for (int t = 0; t < rows; t++) xr[t] = (const XSuper *)((const char *)x + t * x_stride);
        if (format == Q6_K) panel_k6(rows, panel, blocks, xr, acc, ahead);
        else panel_k4(format, rows, panel, blocks, xr, acc, ahead);
    } else {
        const XBlock *xr[TILE];
        for (int t = 0; t < rows; t++) xr[t] = (const XBlock *)((const char *)x + t * x_stride);
        panel_32(format, rows, panel, blocks, xr, acc, ahead);
    }
    for (int t = 0; t < rows; t++) {
        if (valid == PANEL) {
            f16_store(y + t * ldy, acc[t]);
        } else { /* the last panel of a matrix whose rows are not a multiple of 16 */
            float lanes[PANEL];
            f16_store(lanes, acc[t]);
            memcpy(y + t * ldy, lanes, sizeof(float) * valid);
        }
    }
}

/* Panels [first, last) against every row of x (rounded for the format). */
ALWAYS_INLINE void packed_panels(int format, const uint8_t *packed, int out, int in, int first, int last, const void *x,
                                 size_t x_stride, int rows, float *y, size_t ldy) {
    const int blocks = in / block_values(format), size = parts_of(format).size;
    for (int panel = first; panel < last; panel++) {
        const uint8_t *data = packed + (size_t)panel * blocks * size;
        const int valid = out - panel * PANEL < PANEL ? out - panel * PANEL : PANEL;
        float *yp = y + panel * PANEL;
        int t = 0;
        for (; t + TILE <= rows; t += TILE)
            panel_tile(format, TILE, data, blocks, (const char *)x + t * x_stride, x_stride, yp + t * ldy, ldy, valid, t == 0);
        for (; t < rows; t++)
            panel_tile(format, 1, data, blocks, (const char *)x + t * x_stride, x_stride, yp + t * ldy, ldy, valid, t == 0);
    }
}

#define PACKED_LOOP(name, format)                                                                                     \
    static void name(const uint8_t *w, int out, int in, int first, int last, const void *x, size_t xs, int rows,     \
                     float *y, size_t ldy) {                                                                          \
        packed_panels(format, w, out, in, first, last, x, xs, rows, y, ldy);                                         \
    }
PACKED_LOOP(packed_q8_0, Q8_0)
PACKED_LOOP(packed_q4_0, Q4_0)
PACKED_LOOP(packed_q4_1, Q4_1)
PACKED_LOOP(packed_q5_0, Q5_0)
PACKED_LOOP(packed_q5_1, Q5_1)
PACKED_LOOP(packed_q4_k, Q4_K)
PACKED_LOOP(packed_q5_k, Q5_K)
PACKED_LOOP(packed_q6_k, Q6_K)

typedef void (*PackedLoop)(const uint8_t *, int, int, int, int, const void *, size_t, int, float *, size_t);

static PackedLoop packed_loop(int format) {
    switch (format) {
    case Q8_0: return packed_q8_0;
    case Q4_0: return packed_q4_0;
    case Q4_1: return packed_q4_1;
    case Q5_0: return packed_q5_0;
    case Q5_1: return packed_q5_1;
    case Q4_K: return packed_q4_k;
    case Q5_K: return packed_q5_k;
    case Q6_K: return packed_q6_k;
    default: return NULL;
    }
}

/* y (rows x ldy, columns [0, out)) = x·Wᵀ for packed W and x already rounded for the format.
   Called inside an OpenMP parallel region: the panels are shared out among its threads. */
void packed_matmul(int format, const uint8_t *packed, int out, int in, const void *x, size_t x_stride, int rows,
                   float *y, size_t ldy) {
    const PackedLoop loop = packed_loop(format);
    const int team = omp_get_num_threads(), count = panels(out), share = (count + team - 1) / team;
    const int first = omp_get_thread_num() * share, last = first + share < count ? first + share : count;
    if (first < last) loop(packed, out, in, first, last, x, x_stride, rows, y, ldy);
}
#else
void packed_matmul(int format, const uint8_t *packed, int out, int in, const void *x, size_t x_stride, int rows,
                   float *y, size_t ldy) {
    (void)format, (void)packed, (void)out, (void)in, (void)x, (void)x_stride, (void)rows, (void)y, (void)ldy;
}
#endif
