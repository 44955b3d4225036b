/* Attention with dropout for training on the CPU (AVX2 + FMA, fp32), one (batch, head) pair at a time.
 *
 * The product of a head's queries and keys (T x T at head size dh = 32..128) is small enough to
 * stay in the core's cache while the scores are scaled, masked, put through the softmax and
 * dropout, and multiplied by the values: one pass over memory where torch's operators make five
 * or six over the B*H*T*T scores. Backward likewise makes the softmax's and dropout's gradients
 * between its four small products in cache. The products use the shared register tile (tile.h).
 *
 * Forward, per pair: S = scale * Q Kᵀ + bias; P = softmax(S) per row (0 where a row's bias is
 * -inf throughout); keep = random bytes, 1 with probability 1 - p; D = keep * P / (1 - p);
 * O = D V. P and keep are saved for backward (written to the caller's tensors).
 * Backward: G = dO Vᵀ; dV = Dᵀ dO; dS = D * G - P * rowsum(D * G); dQ = scale * dS K;
 * dK = scale * dSᵀ Q.
 *
 * Dropout draws come from dropout.h. Each pair has its own random stream, from the seed and its
 * index, so results depend neither on the thread count nor on the order pairs run.
 *
 * Tensors are given by a base pointer and strides (in floats) over batch, head and row; the last
 * dimension is contiguous. A bias stride of 0 broadcasts.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "dropout.h"
#include "tile.h"
#include "vmath.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dst[0..n) = src[0..n) + (add ? add[0..n) : 0), n any; returns the row's maximum. */
static float add_row(float *dst, const float *src, const float *add, long n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(src + j);
        if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(add + j));
        _mm256_storeu_ps(dst + j, v);
        m = _mm256_max_ps(m, v);
    }
    float mx = hmax(m);
    for (; j < n; j++) {
        dst[j] = src[j] + (add ? add[j] : 0.0f);
        if (dst[j] > mx) mx = dst[j];
    }
    return mx;
}

/* row[0..n) = exp(row - mx) in place (n a multiple of 8; entries past the row's end are -inf);
 * returns their sum. */
static float exp_row(float *row, float mx, long n) {
    __m256 s = _mm256_setzero_ps(), shift = _mm256_set1_ps(mx);
    for (long j = 0; j < n; j += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
        _mm256_storeu_ps(row + j, e);
        s = _mm256_add_ps(s, e);
    }
    return hsum(s);
}

#define STRIDES(t) long t##_b, long t##_h, long t##_t
#define AT(ptr, t, b, h) ((ptr) + (b) * t##_b + (h) * t##_h)

/* Scratch for one thread: two T x Tp score matrices and the packed panels, with slack for tile_t. */
typedef struct {
    float *s, *g, *panels;
} scratch;

static int scratch_get(scratch *w, long Tq, long Tp, long dh) {
    long n = Tq * Tp, panels = (Tp > Tq ? Tp : Tq) * (dh > 16 ? dh : 16) + Tp * dh;
    w->s = calloc((size_t)(2 * n + panels + 64), sizeof(float));
    w->g = w->s ? w->s + n + 32 : 0;
    w->panels = w->s ? w->g + n + 32 : 0;
    return w->s ? 0 : -1;
}

/* Forward over every (batch, head) pair. out: B x Tq x H x dh as strides; probs: B x H x Tq x Tk
 * contiguous; keep: bytes, the same shape. Returns 0, or -1 without memory (nothing valid written). */
int adaptune_attention_forward(long B, long H, long Tq, long Tk, long dh, const float *q, STRIDES(q),
                               const float *k, STRIDES(k), const float *v, STRIDES(v), const float *bias,
                               STRIDES(bias), float scale, float p, uint64_t seed, float *out, STRIDES(out),
                               float *probs, uint8_t *keep, int threads) {
    long Tp = (Tk + 15) / 16 * 16;
    uint32_t threshold = (uint32_t)lrintf(p * 65536.0f);
    float keep_scale = 1.0f / (1.0f - p);
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        scratch w;
        int no_memory = scratch_get(&w, Tq, Tp, dh);
        failed |= no_memory;
        /* every thread reaches the loop (a worksharing loop must be met by all); one without
         * scratch skips its pairs, and the call then reports the failure */
#pragma omp for schedule(static)
        for (long pair = 0; pair < B * H; pair++) {
            if (no_memory) continue;
            long b = pair / H, h = pair % H;
            const float *qp = AT(q, q, b, h), *kp = AT(k, k, b, h), *vp = AT(v, v, b, h);
            const float *bp = bias ? AT(bias, bias, b, h) : 0;
            float *P = probs + pair * Tq * Tk;
            uint8_t *K8 = keep + pair * Tq * Tk;
            uint64_t state = seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(pair + 1));
            /* S = scale Q Kᵀ (Tq x Tp; columns past Tk are 0 and ignored) */
            pack_panels(dh, Tk, kp, k_t, 1, scale, w.panels);
            for (long i = 0; i < Tq; i += 6) row_block(i, Tq, Tp, dh, qp, q_t, 0, w.panels, w.s, Tp, 0, 0, 0);
            for (long i = 0; i < Tq; i++) {
                float *row = w.s + i * Tp;
                float mx = add_row(row, row, bp ? bp + i * bias_t : 0, Tk);
                for (long j = Tk; j < Tp; j++) row[j] = -INFINITY;
                float *Pi = P + i * Tk;
                uint8_t *Ki = K8 + i * Tk;
                if (mx == -INFINITY) {  /* every key masked: the row attends to nothing */
                    memset(row, 0, sizeof(float) * (size_t)Tp);
                    memset(Pi, 0, sizeof(float) * (size_t)Tk);
                } else {
                    float inv = 1.0f / exp_row(row, mx, Tp);
                    for (long j = 0; j < Tk; j++) Pi[j] = row[j] * inv;
                }
                dropout_row(row, Pi, Ki, Tk, threshold, keep_scale, &state);
                for (long j = Tk; j < Tp; j++) row[j] = 0.0f;
            }
            /* O = D V */
            pack_panels(Tk, dh, vp, v_t, 0, 1.0f, w.panels);
            float *op = AT(out, out, b, h);
            for (long i = 0; i < Tq; i += 6) row_block(i, Tq, dh, Tk, w.s, Tp, 0, w.panels, op, out_t, 0, 0, 0);
        }
        free(w.s);
    }
    return failed ? -1 : 0;
}

/* Backward: grad_q, grad_k, grad_v (strides as forward's q, k, v) from grad_out (strides as out). */
int adaptune_attention_backward(long B, long H, long Tq, long Tk, long dh, const float *q, STRIDES(q),
                                const float *k, STRIDES(k), const float *v, STRIDES(v), const float *probs,
                                const uint8_t *keep, float scale, float p, const float *go, STRIDES(go),
                                float *gq, STRIDES(gq), float *gk, STRIDES(gk), float *gv, STRIDES(gv),
                                int threads) {
    long Tp = (Tk + 15) / 16 * 16;
    float keep_scale = 1.0f / (1.0f - p);
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        scratch w;
        int no_memory = scratch_get(&w, Tq, Tp, dh);
        failed |= no_memory;
        /* every thread reaches the loop (a worksharing loop must be met by all); one without
         * scratch skips its pairs, and the call then reports the failure */
#pragma omp for schedule(static)
        for (long pair = 0; pair < B * H; pair++) {
            if (no_memory) continue;
            long b = pair / H, h = pair % H;
            const float *qp = AT(q, q, b, h), *kp = AT(k, k, b, h), *vp = AT(v, v, b, h);
            const float *gop = AT(go, go, b, h);
            const float *P = probs + pair * Tq * Tk;
            const uint8_t *K8 = keep + pair * Tq * Tk;
            /* D (Tq x Tp, zero past Tk) */
            for (long i = 0; i < Tq; i++) {
                float *row = w.s + i * Tp;
                dropped_row(row, P + i * Tk, K8 + i * Tk, Tk, keep_scale);
                for (long j = Tk; j < Tp; j++) row[j] = 0.0f;
            }
            /* dV = Dᵀ dO */
            pack_panels(Tq, dh, gop, go_t, 0, 1.0f, w.panels);
            for (long j = 0; j < Tk; j += 6)
                row_block(j, Tk, dh, Tq, w.s, Tp, 1, w.panels, AT(gv, gv, b, h), gv_t, 0, 0, 0);
            /* G = dO Vᵀ, then dS = D * G - P * rowsum(D * G) in place */
            pack_panels(dh, Tk, vp, v_t, 1, 1.0f, w.panels);
            for (long i = 0; i < Tq; i += 6) row_block(i, Tq, Tp, dh, gop, go_t, 0, w.panels, w.g, Tp, 0, 0, 0);
            for (long i = 0; i < Tq; i++) {
                float *g = w.g + i * Tp, *d = w.s + i * Tp;
                const float *Pi = P + i * Tk;
                __m256 acc = _mm256_setzero_ps();
                long j = 0;
                for (; j + 8 <= Tk; j += 8) {
                    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(g + j), _mm256_loadu_ps(d + j));
                    _mm256_storeu_ps(g + j, x);
                    acc = _mm256_add_ps(acc, x);
                }
                float sum = hsum(acc);
                for (; j < Tk; j++) sum += (g[j] *= d[j]);
                __m256 s = _mm256_set1_ps(sum);
                for (j = 0; j + 8 <= Tk; j += 8)
                    _mm256_storeu_ps(g + j, _mm256_fnmadd_ps(_mm256_loadu_ps(Pi + j), s, _mm256_loadu_ps(g + j)));
                for (; j < Tk; j++) g[j] -= Pi[j] * sum;
                for (j = Tk; j < Tp; j++) g[j] = 0.0f;
            }
            /* dQ = scale dS K; dK = scale dSᵀ Q */
            pack_panels(Tk, dh, kp, k_t, 0, scale, w.panels);
            for (long i = 0; i < Tq; i += 6)
                row_block(i, Tq, dh, Tk, w.g, Tp, 0, w.panels, AT(gq, gq, b, h), gq_t, 0, 0, 0);
            pack_panels(Tq, dh, qp, q_t, 0, scale, w.panels);
            for (long j = 0; j < Tk; j += 6)
                row_block(j, Tk, dh, Tq, w.g, Tp, 1, w.panels, AT(gk, gk, b, h), gk_t, 0, 0, 0);
        }
        free(w.s);
    }
    return failed ? -1 : 0;
}
