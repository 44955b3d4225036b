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
#include "vmath.h"

#define MAX_M 256 /* the widest bottleneck the fused adapter kernels take (a 6-row block on the stack) */

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

/* The whole adapter with the exact GELU, forward, six rows at a time: for each block of rows, the
 * down-projection z = x Wdᵀ + bd (kept for backward), a = gelu(z) in a stack buffer, and
 * out = h + scale * (a Wuᵀ + bu), its sums started from h. x and h of a block are read once and stay
 * in cache from the first product to the second, and a never goes to memory.
 * x: M x d (row stride ldx); h: M x d (ldh; it is x for a sequential adapter); w_down: m x d, w_up:
 * d x m (a Linear's layout, contiguous); z: M x m (contiguous); out: M x d (ldo). d and m multiples
 * of 16, m <= MAX_M. Returns 0, or -1 when memory for the packed weights cannot be had. */
int adaptune_adapter_forward(long M, long d, long m, const float *x, long ldx, const float *h, long ldh,
                             const float *w_down, const float *b_down, const float *w_up, const float *b_up,
                             float scale, float *z, float *out, long ldo, int threads) {
    if (m > MAX_M) return -1;
    float *Pd = malloc(sizeof(float) * (size_t)(2 * d * m + d));
    if (!Pd) return -1;
    float *Pu = Pd + d * m, *bias_up = Pu + d * m;
    pack_panels(d, m, w_down, d, 1, 1.0f, Pd); /* Wdᵀ: K = d, N = m */
    pack_panels(m, d, w_up, m, 1, scale, Pu);  /* scale Wuᵀ: K = m, N = d */
    for (long j = 0; j < d; j++) bias_up[j] = scale * b_up[j];
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long i = 0; i < M; i += 6) {
        float a[6 * MAX_M];
        long rows = M - i < 6 ? M - i : 6;
        row_block(i, M, m, d, x, ldx, 0, Pd, z, m, 0, 0, b_down);
        for (long e = 0; e < rows * m; e += 8) {
            __m256 act;
            gelu_and_slope(_mm256_loadu_ps(z + i * m + e), &act, 0);
            _mm256_storeu_ps(a + e, act);
        }
        row_block(0, rows, d, m, a, m, 0, Pu, out + i * ldo, ldo, h + i * ldh, ldh, bias_up);
    }
    free(Pd);
    return 0;
}

/* Its backward, six rows at a time, given g, the gradient at out: ga = g (scale Wu); gz = ga * gelu'(z)
 * (the gradient at z, kept for the down-projection's weight gradient) and sa = scale * gelu(z) (for
 * the up-projection's: scale Wu's gradient is gᵀ sa); then, unless grad_in is NULL, grad_in = gz Wd,
 * plus g itself when skip is set (a sequential adapter's input gets both). A block's rows of g stay
 * in cache from the first product to the last. g: M x d (ldg); z, gz, sa: M x m (contiguous);
 * grad_in: M x d (ldgi). Returns 0, or -1 when memory for the packed weights cannot be had. */
int adaptune_adapter_backward(long M, long d, long m, const float *g, long ldg, const float *z,
                              const float *w_down, const float *w_up, float scale, float *gz, float *sa,
                              float *grad_in, long ldgi, int skip, int threads) {
    if (m > MAX_M) return -1;
    float *Pu = malloc(sizeof(float) * (size_t)(2 * d * m));
    if (!Pu) return -1;
    float *Pd = Pu + d * m;
    pack_panels(d, m, w_up, m, 0, scale, Pu);  /* scale Wu: K = d, N = m */
    pack_panels(m, d, w_down, d, 0, 1.0f, Pd); /* Wd: K = m, N = d */
    const __m256 s = _mm256_set1_ps(scale);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long i = 0; i < M; i += 6) {
        long rows = M - i < 6 ? M - i : 6;
        row_block(i, M, m, d, g, ldg, 0, Pu, gz, m, 0, 0, 0);
        for (long e = i * m; e < (i + rows) * m; e += 8) {
            __m256 act, slope;
            gelu_and_slope(_mm256_loadu_ps(z + e), &act, &slope);
            _mm256_storeu_ps(sa + e, _mm256_mul_ps(act, s));
            _mm256_storeu_ps(gz + e, _mm256_mul_ps(_mm256_loadu_ps(gz + e), slope));
        }
        if (grad_in)
            row_block(0, rows, d, m, gz + i * m, m, 0, Pd, grad_in + i * ldgi, ldgi, skip ? g + i * ldg : 0, ldg, 0);
    }
    free(Pu);
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
