/* Packed-ternary linear for the CPU: y = (L T^T) * step * scale, the quantisation of x fused in.
 *
 * Weights: 2-bit codes c = t + 1 in {0, 1, 2}, rows padded to a multiple of 128 weights. A row is
 * a run of 32-byte blocks; byte j of a block holds weights j, j+32, j+64 and j+96 in its bit pairs
 * 0-1, 2-3, 4-5 and 6-7, so one 32-byte load, three shifts and four masks give four vectors of 32
 * consecutive codes (the layout of bitnet.cpp's I2_S kernels).
 *
 * Activations, per row x of length k (the formulas of seedbed/model/bitlinear.py, in the same
 * float32 operations, so the levels are bit-identical to torch's):
 *     a = max(max|x|, 1e-12),  L = round_half_even(x * ((1 / a) * Q)),  step = a / Q  [/ rms(x) with the norm]
 * (torch evaluates the Python expression Q / a as reciprocal(a) * Q, so the kernel does too).
 * Then sum_i c_i L_i - sum_i L_i = sum_i t_i L_i exactly in int32 (|L| <= 127, k < 2^24), and
 *     y_j = (float)(sum_j) * (step * scale).
 * rms(x) = sqrt(sum(x^2) / k + 1e-6) is summed here in a fixed order (8 lanes, then pairwise), so it is
 * the same on every machine, but it is not torch's summation order: the scale may differ from
 * torch's in the last bit, the integer sums never.
 *
 * The products: AVX-512 VNNI's vpdpbusd multiplies unsigned codes by signed levels and adds groups
 * of four into int32 lanes; AVX2 does the same with vpmaddubsw (pairs into int16, at most 2*2*127)
 * and vpmaddwd. Four tokens share each unpacked block of codes. Plain C elsewhere.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 128  /* weights per 32-byte block of codes */
#if defined(__AVX512VL__)
#define TOKENS 4   /* tokens that share one unpacked block: 16 accumulators fit 32 vector registers */
#else
#define TOKENS 2   /* 8 accumulators, within AVX2's 16 registers */
#endif

int seedbed_kernel_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* Eight lane sums added pairwise: the one summation order of every row sum here. */
static inline float lane_total(const float *lanes) {
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* max(max|x|, 1e-12) and sum(x^2) of one row, the squares summed in 8 lanes (i mod 8), then pairwise. */
static inline void row_stats(const float *x, int64_t k, float *absmax, float *squares) {
    float top[8] = {0}, lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) {
            float v = x[i + j];
            top[j] = fabsf(v) > top[j] ? fabsf(v) : top[j];
            lanes[j] += v * v;
        }
    for (; i < k; i++) {
        top[i & 7] = fabsf(x[i]) > top[i & 7] ? fabsf(x[i]) : top[i & 7];
        lanes[i & 7] += x[i] * x[i];
    }
    float a = 0.0f;
    for (int j = 0; j < 8; j++) a = top[j] > a ? top[j] : a;
    *absmax = a < 1e-12f ? 1e-12f : a;
    *squares = lane_total(lanes);
}

/* The multiplier x -> level, (1 / a) Q (torch computes the number / tensor Q / a so), and the step a / Q,
 * divided by rms(x) with the norm, of one row. */
static inline void row_scales(const float *x, int64_t k, float levels_max, int norm, float *inverse, float *step) {
    float absmax, squares;
    row_stats(x, k, &absmax, &squares);
    *inverse = (1.0f / absmax) * levels_max;
    *step = absmax / levels_max;
    if (norm) *step = *step / sqrtf(squares / (float)k + 1e-6f);
}

/* Levels (int8, zero beyond k up to kp), their sum, and the step of one row of activations. */
static void quantise_row(const float *x, int64_t k, int64_t kp, float levels_max, int norm,
                         int8_t *levels, int32_t *level_sum, float *step) {
    float inverse;
    row_scales(x, k, levels_max, norm, &inverse, step);
    int32_t sum = 0;
    for (int64_t i = 0; i < k; i++) {
        float level = nearbyintf(x[i] * inverse);  /* round half to even, as torch.round */
        levels[i] = (int8_t)level;
        sum += (int32_t)level;
    }
    memset(levels + k, 0, (size_t)(kp - k));
    *level_sum = sum;
}

/* Training's straight-through forward values for x (m, k): out = L * step, the step divided by
 * rms(x) with the norm (bitlinear.quantised_values, two passes over x instead of torch's eight). */
void seedbed_quantised_values(const float *x, int64_t m, int64_t k, float levels_max, int norm, float *out) {
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        float inverse, step;
        row_scales(row, k, levels_max, norm, &inverse, &step);
        float *o = out + r * k;
        for (int64_t i = 0; i < k; i++) o[i] = nearbyintf(row[i] * inverse) * step;
    }
}

/* The parameter-free RMSNorm's backward for x, g (m, k), in place on g:
 * g <- (g - x̂ mean(g x̂)) / rms(x), x̂ = x / rms(x); mean(g x̂) = sum(g x) / (k rms). */
void seedbed_norm_backward(const float *x, float *g, int64_t m, int64_t k) {
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        float *grad = g + r * k;
        float absmax, squares, lanes[8] = {0};
        row_stats(row, k, &absmax, &squares);
        int64_t i = 0;
        for (; i + 8 <= k; i += 8)
            for (int j = 0; j < 8; j++) lanes[j] += grad[i + j] * row[i + j];
        for (; i < k; i++) lanes[i & 7] += grad[i] * row[i];
        float dot = lane_total(lanes);
        float inverse = 1.0f / sqrtf(squares / (float)k + 1e-6f);
        float along = dot * inverse * inverse / (float)k;  /* mean(g x̂) / rms */
        for (i = 0; i < k; i++) grad[i] = (grad[i] - row[i] * along) * inverse;
    }
}

#if defined(__AVX2__)
static inline int32_t horizontal_sum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline __m256i multiply_add(__m256i acc, __m256i codes, __m256i levels) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, codes, levels);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, levels), _mm256_set1_epi16(1)));
#endif
}
#endif

/* sums[t] = sum_i c_i L_t,i over one row of codes, for `count` (<= TOKENS) tokens. Each token keeps
 * one accumulator per bit pair, so four independent chains hide the multiply-add's latency. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *codes, int64_t kp, const int8_t *const *levels, int count, int32_t *sums) {
#if defined(__AVX2__)
    __m256i acc[TOKENS][4];
    for (int t = 0; t < count; t++)
        for (int q = 0; q < 4; q++) acc[t][q] = _mm256_setzero_si256();
    const __m256i mask = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < kp / BLOCK; b++) {
        __m256i packed = _mm256_loadu_si256((const __m256i *)(codes + b * 32));
        __m256i c[4] = {_mm256_and_si256(packed, mask), _mm256_and_si256(_mm256_srli_epi16(packed, 2), mask),
                        _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
                        _mm256_and_si256(_mm256_srli_epi16(packed, 6), mask)};
        for (int t = 0; t < count; t++) {
            const int8_t *l = levels[t] + b * BLOCK;
            for (int q = 0; q < 4; q++)
                acc[t][q] = multiply_add(acc[t][q], c[q], _mm256_loadu_si256((const __m256i *)(l + 32 * q)));
        }
    }
    for (int t = 0; t < count; t++)
        sums[t] = horizontal_sum(_mm256_add_epi32(_mm256_add_epi32(acc[t][0], acc[t][1]),
                                                  _mm256_add_epi32(acc[t][2], acc[t][3])));
#else
    for (int t = 0; t < count; t++) {
        int32_t sum = 0;
        for (int64_t b = 0; b < kp / BLOCK; b++)
            for (int j = 0; j < 32; j++) {
                uint8_t byte = codes[b * 32 + j];
                const int8_t *l = levels[t] + b * BLOCK + j;
                sum += (byte & 3) * l[0] + ((byte >> 2) & 3) * l[32] + ((byte >> 4) & 3) * l[64] + (byte >> 6) * l[96];
            }
        sums[t] = sum;
    }
#endif
}

/* out (m, n) = the layer's output for x (m, k); codes (n, kp / 4); scratch: m * kp bytes. */
void seedbed_ternary_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, int64_t n, int64_t kp,
                            float scale, float levels_max, int norm, int8_t *scratch, float *out) {
    int32_t level_sums[TOKENS];
    float steps[TOKENS];
    for (int64_t first = 0; first < m; first += TOKENS) {
        int count = m - first < TOKENS ? (int)(m - first) : TOKENS;
        const int8_t *levels[TOKENS];
        for (int t = 0; t < count; t++) {
            int8_t *row = scratch + (first + t) * kp;
            quantise_row(x + (first + t) * k, k, kp, levels_max, norm, row, &level_sums[t], &steps[t]);
            levels[t] = row;
        }
        int32_t sums[TOKENS];
        for (int64_t j = 0; j < n; j++) {
            const uint8_t *row = codes + j * (kp / 4);
            if (count == 1)  /* constant counts let the compiler unroll the token loops */
                row_dot(row, kp, levels, 1, sums);
            else if (count == TOKENS)
                row_dot(row, kp, levels, TOKENS, sums);
            else
                row_dot(row, kp, levels, count, sums);
            for (int t = 0; t < count; t++)
                out[(first + t) * n + j] = (float)(sums[t] - level_sums[t]) * (steps[t] * scale);
        }
    }
}
