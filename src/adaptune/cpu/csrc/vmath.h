/* Vector math the C kernels share (AVX2 + FMA, fp32, 8 lanes). */
#ifndef ADAPTUNE_VMATH_H
#define ADAPTUNE_VMATH_H

#include <immintrin.h>

/* exp(x) for x <= 0 (a softmax's shifted scores, a Gaussian's -x^2 / 2), 0 below -87 and for -inf. Cody-Waite range
 * reduction to |r| <= ln2 / 2 and a degree-6 polynomial (the Cephes expf coefficients); about
 * 1 ulp. */
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 valid = _mm256_cmp_ps(x, lo, _CMP_GT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), valid);
}

/* Exact (erf) GELU and its derivative at x: gelu = x * Phi(x), dgelu = Phi(x) + x * phi(x), with Phi
 * the standard normal CDF and phi its density. Phi comes from the complementary error function in the
 * form of Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), evaluated for |x| so that the
 * small tail is computed directly rather than as 1 minus something near 1; exp(-x^2 / 2) serves both
 * erfc and phi. Either output pointer may be NULL. */
static inline void gelu_and_slope(__m256 x, __m256 *gelu, __m256 *slope) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign_bit, x), _mm256_set1_ps(0.70710678118654752f)); /* |x| / sqrt 2 */
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 poly = _mm256_set1_ps(1.061405429f);
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
    __m256 gauss = exp_nonpositive(_mm256_mul_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(-1.0f))); /* exp(-x^2 / 2) */
    __m256 tail = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(poly, t), gauss), _mm256_set1_ps(0.5f)); /* Phi(-|x|) */
    __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 cdf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), tail), tail, negative);
    if (gelu) *gelu = _mm256_mul_ps(x, cdf);
    if (slope) *slope = _mm256_fmadd_ps(_mm256_mul_ps(x, gauss), _mm256_set1_ps(0.39894228040143268f), cdf);
}

#endif
