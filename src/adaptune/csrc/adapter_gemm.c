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
 * The tile: 6 x 16 of C in twelve 8-wide registers; for every k, two loads of the B
 * panel, six broadcasts of A, twelve fused multiply-adds. Each row of C is summed over k in order
 * from H + bias, so a row's result does not depend on the other rows of the batch (mixed-task
 * batches give the same rows as single-task ones).
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define INIT(r)                                                                              \
    if (init) {                                                                              \
        c##r##0 = _mm256_loadu_ps(init + (r) * ldi);                                         \
        c##r##1 = _mm256_loadu_ps(init + (r) * ldi + 8);                                     \
    } else {                                                                                 \
        c##r##0 = _mm256_setzero_ps();                                                       \
        c##r##1 = _mm256_setzero_ps();                                                       \
    }                                                                                        \
    if (bias) {                                                                              \
        c##r##0 = _mm256_add_ps(c##r##0, bias0);                                             \
        c##r##1 = _mm256_add_ps(c##r##1, bias1);                                             \
    }

#define FMA_ROW(r)                                                                           \
    t = _mm256_broadcast_ss(a##r + k);                                                       \
    c##r##0 = _mm256_fmadd_ps(t, b0, c##r##0);                                               \
    c##r##1 = _mm256_fmadd_ps(t, b1, c##r##1);

#define STORE(r)                                                                             \
    _mm256_storeu_ps(out + (r) * ldo, c##r##0);                                              \
    _mm256_storeu_ps(out + (r) * ldo + 8, c##r##1);

/* out (6 x 16, row stride ldo) = init (6 x 16, row stride ldi; NULL: 0) + bias (16; NULL: 0)
 * + sum over k of a_r[k] * panel[k][0..15], for the six A rows a_r. */
static void tile(const float *const *a, const float *panel, long K, const float *init, long ldi,
                 const float *bias, float *out, long ldo) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, t, b0, b1;
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (bias) {
        bias0 = _mm256_loadu_ps(bias);
        bias1 = _mm256_loadu_ps(bias + 8);
    }
    INIT(0) INIT(1) INIT(2) INIT(3) INIT(4) INIT(5)
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    for (long k = 0; k < K; k++) {
        b0 = _mm256_loadu_ps(panel + 16 * k);
        b1 = _mm256_loadu_ps(panel + 16 * k + 8);
        FMA_ROW(0) FMA_ROW(1) FMA_ROW(2) FMA_ROW(3) FMA_ROW(4) FMA_ROW(5)
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

/* C = H + bias + A @ B with B packed: the loop over tiles. */
static void gemm_packed(long M, long N, long K, const float *A, long lda, const float *Bp, float *C,
                        long ldc, const float *H, long ldh, const float *bias, int threads) {
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long i = 0; i < M; i += 6) {
        float tail_in[96], tail_out[96];
        int rows = M - i < 6 ? (int)(M - i) : 6;
        const float *a[6];
        for (int r = 0; r < 6; r++) a[r] = A + (i + (r < rows ? r : 0)) * lda; /* past M: row i again, discarded */
        for (long j = 0; j < N; j += 16) {
            const float *panel = Bp + j * K, *b = bias ? bias + j : 0;
            const float *init = H ? H + i * ldh + j : 0;
            float *c = C + i * ldc + j;
            if (rows == 6) {
                tile(a, panel, K, init, ldh, b, c, ldc);
            } else {
                if (init) {
                    memset(tail_in, 0, sizeof tail_in);
                    for (int r = 0; r < rows; r++) memcpy(tail_in + 16 * r, init + r * ldh, 16 * sizeof(float));
                }
                tile(a, panel, K, init ? tail_in : 0, 16, b, tail_out, 16);
                for (int r = 0; r < rows; r++) memcpy(c + r * ldc, tail_out + 16 * r, 16 * sizeof(float));
            }
        }
    }
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
    for (long j0 = 0; j0 < N; j0 += 16) {
        float *panel = Bp + j0 * K;
        if (w_transposed) {  /* 16 rows of W read side by side: their lines stay in L1, the panel is written in order */
            const float *w = W + j0 * ldw;
            for (long k = 0; k < K; k++)
                for (long j = 0; j < 16; j++) panel[16 * k + j] = scale * w[j * ldw + k];
        } else {
            for (long k = 0; k < K; k++)
                for (long j = 0; j < 16; j++) panel[16 * k + j] = scale * W[k * ldw + j0 + j];
        }
    }
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
