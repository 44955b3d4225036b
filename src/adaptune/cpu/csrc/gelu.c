/* The exact (erf) GELU and its gradient on the CPU (AVX2 + FMA, fp32).
 *
 * torch's CPU GELU evaluates erf to full precision, and its gradient erf and exp apart; over the
 * feed-forward block's B*T x 4d values of a BERT-sized model they took about 8 % of the time of that
 * block's matrix products in an adapter training step. Here each is one pass over memory (vmath.h:
 * A&S erfc, absolute error below 1.5e-7, and one exp shared by the CDF and the density).
 *
 * Entries are split into blocks of BLOCK over OpenMP threads; every entry is computed on its own, so
 * the result does not depend on the thread count.
 */
#include "vmath.h"

#define BLOCK 8192

/* Lanes 0 .. n-1 on (n < 8), for the tail's masked loads and stores. */
static inline __m256i lanes(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The 8 (or, at the tail, n < 8) entries at x. */
static inline __m256 load(const float *x, long n) {
    return n < 8 ? _mm256_maskload_ps(x, lanes(n)) : _mm256_loadu_ps(x);
}

/* out = gelu(x) (grad NULL) or grad * gelu'(x) over n entries; out may be x or grad. */
static void gelu_pass(long n, const float *x, const float *grad, float *out, int threads) {
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long start = 0; start < n; start += BLOCK) {
        long end = n - start < BLOCK ? n : start + BLOCK;
        for (long i = start; i < end; i += 8) {
            __m256 value, slope;
            if (grad) {
                gelu_and_slope(load(x + i, end - i), 0, &slope);
                value = _mm256_mul_ps(load(grad + i, end - i), slope);
            } else {
                gelu_and_slope(load(x + i, end - i), &value, 0);
            }
            if (end - i < 8)
                _mm256_maskstore_ps(out + i, lanes(end - i), value);
            else
                _mm256_storeu_ps(out + i, value);
        }
    }
}

/* out = gelu(x) over n entries; out may be x. */
void adaptune_gelu(long n, const float *x, float *out, int threads) { gelu_pass(n, x, 0, out, threads); }

/* grad_in = grad * gelu'(x) over n entries; grad_in may be grad. */
void adaptune_gelu_backward(long n, const float *x, const float *grad, float *grad_in, int threads) {
    gelu_pass(n, x, grad, grad_in, threads);
}
