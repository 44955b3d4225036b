/* The adapter's skinny matrix products on the CPU (AVX2 + FMA, fp32; rows over OpenMP threads).
 *
 * C (M x N) = H (or 0) + scale * (bias (or 0) + A (M x K) @ B), B packed first into N/16 panels
 * of K x 16. An adapter's products have one small side (m = 8..256),
 * where BLAS libraries spend a large share of the time packing the large operand (4096 x 384 at
 * batch 32 x 128) for only m columns of output. Here only the small weight is packed (once per
 * call, a few KiB), the large operand is read in place, a row at a time, and H (the hidden state
 * an adapter adds onto) and the bias are loaded straight into the accumulators, so the sum costs
 * no separate pass.
 *
 * The tile (tile.h) sums each row of C over k in order from H + bias, so a row's result does not
 * depend on the other rows of the batch (mixed-task batches give the same rows as single-task ones).
 */
#include <stdlib.h>

#include "tile.h"

/* C = H + bias + A @ B with B packed: 6-row blocks split over threads. */
static void gemm_packed(long M, long N, long K, const float *A, long lda, const float *Bp, float *C,
                        long ldc, const float *H, long ldh, const float *bias, int threads) {
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long i = 0; i < M; i += 6) row_block(i, M, N, K, A, lda, 0, Bp, C, ldc, H, ldh, bias);
}

/* C (M x N, row stride ldc) = H (or nothing) + scale * (bias (or nothing) + A @ B).
 * A: M x K, row stride lda. B is K x N, given as W: W itself (K x N, row stride ldw) or, with
 * w_transposed, Wᵀ of a W stored N x K (row stride ldw), as a Linear's weight is. H: row stride
 * ldh; it may be C itself. N % 16 == 0. Packs scale * B into N/16 panels of K x 16 (and the
 * scaled bias) first. Rows are split over ``threads`` OpenMP threads when built with OpenMP (each row
 * is summed by one thread, in the same order whatever the count). Returns 0, or -1 when that
 * memory cannot be had (nothing written). */
int adaptune_gemm(long M, long N, long K, const float *A, long lda, const float *W, long ldw, int w_transposed,
                  float scale, float *C, long ldc, const float *H, long ldh, const float *bias, int threads) {
    float *Bp = malloc(sizeof(float) * (size_t)(K * N + N));
    if (!Bp) return -1;
    float *sbias = bias ? Bp + K * N : 0;
    pack_panels(K, N, W, ldw, w_transposed, scale, Bp);
    if (bias)
        for (long j = 0; j < N; j++) sbias[j] = scale * bias[j];
    gemm_packed(M, N, K, A, lda, Bp, C, ldc, H, ldh, sbias, threads);
    free(Bp);
    return 0;
}

/* 1 when built with OpenMP (rows split over threads), else 0 (one thread only). */
int adaptune_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
