/* What the kernel files call of each other (the entry points Python calls are in each file). */

#ifndef ATTENDO_INTERNAL_H
#define ATTENDO_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* packed.c */
int packed_format(int format);
void packed_matmul(int format, const uint8_t *packed, int out, int in, const void *x, size_t x_stride, int rows,
                   float *y, size_t ldy);
int attendo_unpack_rows(int format, const uint8_t *packed, int in, const int64_t *index, int n, uint8_t *rows);

/* matmul.c: inside an OpenMP parallel region, the work shared among its threads */
size_t rounded_row_bytes(int format, int in);
void round_rows(int format, const float *x, int in, int rows, void *rounded); /* ends with a barrier */
void matmul_in_team(int format, int packed, const uint8_t *w, int out, int in, const float *x, const void *rounded,
                    int rows, float *y, size_t ldy); /* no barrier at the end */

/* attention.c: up to TILE_QUERIES queries of one head against keys [first[i], last[i]] of the
   same cache rows (see attend_tile); bias_slope > 0 adds -bias_slope·(position - j) to the score
   of key j (ALiBi). scores: TILE_QUERIES rows scores_stride apart, each with room for last + 9. */
enum { TILE_QUERIES = 4 };
void attend_tile(int n, const float *const *q, const int *first, const int *last, const int *position,
                 const float *k, long k_stride, const float *v, long v_stride, int dim, float scale, float bias_slope,
                 float *scores, long scores_stride, float *const *out);

#endif
