/* Dropout on the CPU (AVX2, fp32): the mask drawn and applied in one pass, kept as bytes.
 *
 * torch's CPU dropout draws a float mask with bernoulli_ (about 10 ns an element) and multiplies;
 * here each 8 entries take two 64-bit draws (dropout.h) and one masked multiply. The n entries
 * are split into blocks of BLOCK, each with its own random stream from the seed and its index,
 * so the result depends neither on the thread count nor on the order blocks run.
 */
#include <math.h>
#include <stdint.h>

#include "dropout.h"

#define BLOCK 8192

/* out = keep ? x / (1 - p) : 0, keep = 1 with probability 1 - p (bytes); out may be x. */
void adaptune_dropout(long n, const float *x, float *out, uint8_t *keep, float p, uint64_t seed, int threads) {
    uint32_t threshold = (uint32_t)lrintf(p * 65536.0f);
    float keep_scale = 1.0f / (1.0f - p);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long start = 0; start < n; start += BLOCK) {
        uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(start / BLOCK + 1));
        long len = n - start < BLOCK ? n - start : BLOCK;
        dropout_row(out + start, x + start, keep + start, len, threshold, keep_scale, &state);
    }
}

/* grad_in = keep ? grad / (1 - p) : 0; grad_in may be grad. */
void adaptune_dropout_backward(long n, const float *grad, const uint8_t *keep, float p, float *grad_in,
                               int threads) {
    float keep_scale = 1.0f / (1.0f - p);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long start = 0; start < n; start += BLOCK) {
        long len = n - start < BLOCK ? n - start : BLOCK;
        dropped_row(grad_in + start, grad + start, keep + start, len, keep_scale);
    }
}
