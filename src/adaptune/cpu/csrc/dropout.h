/* Dropout's random draws and masks (AVX2), shared by the attention kernel and plain dropout.
 *
 * Draws are 64-bit splitmix64 numbers, four 16-bit lanes each; an entry is kept when its lane is
 * >= p * 65536 (p rounded to a multiple of 1/65536), with probability 1 - p.
 */
#ifndef ADAPTUNE_DROPOUT_H
#define ADAPTUNE_DROPOUT_H

#include <immintrin.h>
#include <stdint.h>

static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* row[j] = keep[j] ? probs[j] * keep_scale : 0 for j < n, keep[j] = 1 with probability
 * 1 - threshold / 65536: eight 16-bit lanes from two draws per eight entries. */
static inline void dropout_row(float *row, const float *probs, uint8_t *keep, long n, uint32_t threshold,
                        float keep_scale, uint64_t *state) {
    const __m128i thr = _mm_set1_epi16((short)(uint16_t)(threshold > 65535 ? 65535 : threshold));
    const __m256 ks = _mm256_set1_ps(keep_scale);
    const __m128i one = _mm_set1_epi8(1);
    for (long j = 0; j < n; j += 8) {
        uint64_t z0 = splitmix64(state), z1 = splitmix64(state);
        __m128i lanes = _mm_set_epi64x((long long)z1, (long long)z0);
        __m128i kept = _mm_cmpeq_epi16(_mm_max_epu16(lanes, thr), lanes); /* lane >= threshold */
        if (threshold > 65535) kept = _mm_setzero_si128();
        if (j + 8 <= n) {
            __m256 mask = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(kept));
            _mm256_storeu_ps(row + j, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(probs + j), ks), mask));
            _mm_storel_epi64((__m128i *)(keep + j), _mm_and_si128(_mm_packs_epi16(kept, kept), one));
        } else {
            uint16_t bits[8];
            _mm_storeu_si128((__m128i *)bits, kept);
            for (long l = 0; j + l < n; l++) {
                keep[j + l] = bits[l] != 0;
                row[j + l] = bits[l] ? probs[j + l] * keep_scale : 0.0f;
            }
        }
    }
}

/* row[j] = keep[j] ? probs[j] * keep_scale : 0 for j < n. */
static inline void dropped_row(float *row, const float *probs, const uint8_t *keep, long n, float keep_scale) {
    const __m256 ks = _mm256_set1_ps(keep_scale);
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i k8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(keep + j)));
        __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k8, _mm256_setzero_si256()));
        _mm256_storeu_ps(row + j, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(probs + j), ks), mask));
    }
    for (; j < n; j++) row[j] = keep[j] ? probs[j] * keep_scale : 0.0f;
}

#endif
