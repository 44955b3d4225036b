/* The register tile the C kernels share (AVX2 + FMA, fp32): 6 rows x 16 columns of a product
 * in twelve 8-wide registers. For every k: two loads of a packed panel of B, six broadcasts of A,
 * twelve fused multiply-adds. Each row is summed over k in order from its start value, so a row's
 * result depends neither on the other rows nor on how rows are split over threads.
 *
 * B is packed first into panels of K x 16 (pack_panels); A is read in place, by row pointers
 * (tile) or, transposed, from a K x M matrix (tile_t).
 */
#ifndef ADAPTUNE_TILE_H
#define ADAPTUNE_TILE_H

#include <immintrin.h>
#include <string.h>

#define ADAPTUNE_INIT(r)                                                                     \
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

#define ADAPTUNE_FMA(r, value)                                                               \
    t = _mm256_broadcast_ss(value);                                                          \
    c##r##0 = _mm256_fmadd_ps(t, b0, c##r##0);                                               \
    c##r##1 = _mm256_fmadd_ps(t, b1, c##r##1);

#define ADAPTUNE_STORE(r)                                                                    \
    _mm256_storeu_ps(out + (r) * ldo, c##r##0);                                              \
    _mm256_storeu_ps(out + (r) * ldo + 8, c##r##1);

#define ADAPTUNE_TILE_BODY(A0, A1, A2, A3, A4, A5, STEP)                                     \
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, t, b0, b1;            \
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();                         \
    if (bias) {                                                                              \
        bias0 = _mm256_loadu_ps(bias);                                                       \
        bias1 = _mm256_loadu_ps(bias + 8);                                                   \
    }                                                                                        \
    ADAPTUNE_INIT(0) ADAPTUNE_INIT(1) ADAPTUNE_INIT(2) ADAPTUNE_INIT(3) ADAPTUNE_INIT(4)      \
    ADAPTUNE_INIT(5)                                                                         \
    for (long k = 0; k < K; k++) {                                                           \
        b0 = _mm256_loadu_ps(panel + 16 * k);                                                \
        b1 = _mm256_loadu_ps(panel + 16 * k + 8);                                            \
        ADAPTUNE_FMA(0, A0) ADAPTUNE_FMA(1, A1) ADAPTUNE_FMA(2, A2) ADAPTUNE_FMA(3, A3)        \
        ADAPTUNE_FMA(4, A4) ADAPTUNE_FMA(5, A5)                                              \
        STEP;                                                                                \
    }                                                                                        \
    ADAPTUNE_STORE(0) ADAPTUNE_STORE(1) ADAPTUNE_STORE(2) ADAPTUNE_STORE(3) ADAPTUNE_STORE(4) \
    ADAPTUNE_STORE(5)

/* out (6 x 16, row stride ldo) = init (6 x 16, row stride ldi; NULL: 0) + bias (16; NULL: 0)
 * + sum over k of a_r[k] * panel[k][0..15], for the six A rows a_r. */
static inline void tile(const float *const *a, const float *panel, long K, const float *init, long ldi,
                        const float *bias, float *out, long ldo) {
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
    ADAPTUNE_TILE_BODY(a0 + k, a1 + k, a2 + k, a3 + k, a4 + k, a5 + k, (void)0)
}

/* The same with A transposed: row r's k-th value is at[k * lda + r] (r = 0..5 are read even for
 * rows past the matrix, so at needs 5 readable floats past its last row's end). */
static inline void tile_t(const float *at, long lda, const float *panel, long K, const float *init, long ldi,
                          const float *bias, float *out, long ldo) {
    ADAPTUNE_TILE_BODY(at, at + 1, at + 2, at + 3, at + 4, at + 5, at += lda)
}

/* Rows i .. i + 5 (fewer at the end: rows) of C (N columns, row stride ldc) = H + bias + A @ B,
 * B packed in N/16 panels of K x 16. A is M x K with row stride lda, or (a_transposed) stored
 * K x M with row stride lda. H (row stride ldh) and bias may be NULL. */
static void row_block(long i, long M, long N, long K, const float *A, long lda, int a_transposed,
                      const float *Bp, float *C, long ldc, const float *H, long ldh, const float *bias) {
    float tail_in[96], tail_out[96];
    int rows = M - i < 6 ? (int)(M - i) : 6;
    const float *a[6];
    for (int r = 0; r < 6; r++) a[r] = A + (i + (r < rows ? r : 0)) * lda; /* past M: row i again, discarded */
    for (long j = 0; j < N; j += 16) {
        const float *panel = Bp + j * K, *b = bias ? bias + j : 0;
        const float *init = H ? H + i * ldh + j : 0;
        float *c = C + i * ldc + j;
        if (rows < 6 && init) {
            memset(tail_in, 0, sizeof tail_in);
            for (int r = 0; r < rows; r++) memcpy(tail_in + 16 * r, init + r * ldh, 16 * sizeof(float));
        }
        const float *in = rows < 6 && init ? tail_in : init;
        long ldi = rows < 6 ? 16 : ldh;
        float *out = rows < 6 ? tail_out : c;
        long ldo = rows < 6 ? 16 : ldc;
        if (a_transposed)
            tile_t(A + i, lda, panel, K, in, ldi, b, out, ldo);
        else
            tile(a, panel, K, in, ldi, b, out, ldo);
        if (rows < 6)
            for (int r = 0; r < rows; r++) memcpy(c + r * ldc, tail_out + 16 * r, 16 * sizeof(float));
    }
}

/* Packs scale * B (K x N) into ceil(N/16) panels of K x 16 at out, columns past N zero. B is W
 * itself (K x N, row stride ldw) or, with w_transposed, Wᵀ of a W stored N x K (row stride ldw). */
static void pack_panels(long K, long N, const float *W, long ldw, int w_transposed, float scale, float *out) {
    for (long j0 = 0; j0 < N; j0 += 16) {
        float *panel = out + j0 * K;
        long width = N - j0 < 16 ? N - j0 : 16;
        if (width < 16) memset(panel, 0, sizeof(float) * (size_t)(16 * K));
        if (w_transposed) {  /* 16 rows of W read side by side: their lines stay in L1, the panel is written in order */
            const float *w = W + j0 * ldw;
            for (long k = 0; k < K; k++)
                for (long j = 0; j < width; j++) panel[16 * k + j] = scale * w[j * ldw + k];
        } else {
            for (long k = 0; k < K; k++)
                for (long j = 0; j < width; j++) panel[16 * k + j] = scale * W[k * ldw + j0 + j];
        }
    }
}

#endif
