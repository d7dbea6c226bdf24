/* Matrix products against GGUF block-quantised weights, without expanding them to float32.
 *
 * Weights W [N, K] are stored row-major in blocks of 32 consecutive inputs, as llama.cpp defines them:
 *   Q4_1: W[n, 32b + i] = d[n, b] * q + m[n, b], q in 0..15, packed two per byte: byte j of a block
 *         holds element j in its low nibble and element j + 16 in its high nibble.  (Q4_0 is Q4_1 with
 *         m = -8 d.)
 *   Q8:   W[n, 32b + i] = d[n, b] * q (+ m[n, b]), q int8: llama.cpp's Q8_0, and the 5-bit types
 *         (Q5_0 as q - 16; Q5_1 and Q5_K with offsets); or with one scale per 16 values and no
 *         offsets, d[n, 2b + i / 16] (Q6_K, whose values q - 32 fit int8).
 * Scales d, m are float32 [N, K / 32] ([N, K / 16] for 16-value groups); the caller widens llama.cpp's
 * float16 (and Q4_K's / Q6_K's products of two scales) to them exactly.
 *
 * The products y[M, N] = x[M, K] @ W^T accumulate in float32 with AVX2/FMA (the offsets as
 * m * sum(x block)), up to 8 input rows per
 * pass over a weight row, and split the output columns across OpenMP threads.  The dequantise
 * functions compute d * q + m with two roundings, exactly like the reference `gguf` package.
 * Built with -ffp-contract=off so that only the explicit FMAs below are fused.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define MAX_ROWS 8

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 nibbles of one Q4_1 block as four vectors of floats, elements 0-7, 8-15, 16-23, 24-31. */
static inline void unpack_q4(const uint8_t *q, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline void unpack_q8(const int8_t *q, __m256 w[4]) {
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}

static inline __m256 dot_block(const float *x, const __m256 w[4]) {
    __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x), w[0]);
    t = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w[1], t);
    t = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), w[2], t);
    return _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), w[3], t);
}

static inline __m256 dot_half(const float *x, __m256 w0, __m256 w1) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w1, _mm256_mul_ps(_mm256_loadu_ps(x), w0));
}

/* y[r * N] for `rows` input rows and one weight row (q, d, m).  m == NULL: no offset term.
 * `per` scales per 32-block: 1, or 2 for 16-value groups (d[per * b] for the first half of block b,
 * d[per * b + per - 1] for the second).  From 4 rows on, each block's values are scaled once and
 * shared by all rows (the same single rounding of d * q as the reference); fewer rows scale their
 * dot products instead.  xpart [rows, K / 32, 8] holds each block of x summed down to 8 lanes, which
 * the offsets m multiply. */
static inline __attribute__((always_inline)) void weight_row(
        int rows, int is_q8, int per, const float *x, const float *xpart, const void *q, const float *d,
        const float *m, float *y, int64_t N, int64_t K) {
    const int64_t nb = K / BLOCK;
    const int shared_scale = rows >= 4;
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        if (is_q8) unpack_q8((const int8_t *)q + BLOCK * b, w);
        else unpack_q4((const uint8_t *)q + BLOCK / 2 * b, w);
        const __m256 d_lo = _mm256_set1_ps(d[per * b]), d_hi = _mm256_set1_ps(d[per * b + per - 1]);
        if (shared_scale)
            for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(i < 2 ? d_lo : d_hi, w[i]);
        for (int r = 0; r < rows; r++) {
            const float *xb = x + r * K + BLOCK * b;
            if (shared_scale) {
                for (int i = 0; i < 4; i++) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), w[i], acc[r]);
            } else if (per == 1) {
                acc[r] = _mm256_fmadd_ps(d_lo, dot_block(xb, w), acc[r]);
            } else {
                acc[r] = _mm256_fmadd_ps(d_lo, dot_half(xb, w[0], w[1]), acc[r]);
                acc[r] = _mm256_fmadd_ps(d_hi, dot_half(xb + 16, w[2], w[3]), acc[r]);
            }
            if (m)
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(m[b]), _mm256_loadu_ps(xpart + (r * nb + b) * 8), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) y[r * N] = hsum(acc[r]);
}

#define ROWS_CASE(R) case R: weight_row(R, is_q8, per, xr, sr, qn, dn, mn, yr, N, K); break;

static void matmul(int is_q8, int per, const float *x, const void *qs, const float *d, const float *m, float *y,
                   int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / BLOCK;
    const int64_t row_bytes = is_q8 ? K : K / 2;
    float *xpart = NULL;
    if (m) {
        xpart = malloc(sizeof(float) * 8 * (M * nb > 0 ? M * nb : 1));
        for (int64_t i = 0; i < M * nb; i++) {
            const float *xb = x + i * BLOCK;
            __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
            _mm256_storeu_ps(xpart + 8 * i, s);
        }
    }
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const void *qn = (const uint8_t *)qs + n * row_bytes;
        const float *dn = d + n * nb * per, *mn = m ? m + n * nb : NULL;
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const float *xr = x + r0 * K;
            const float *sr = xpart ? xpart + r0 * nb * 8 : NULL;
            float *yr = y + r0 * N + n;
            int64_t rows = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            /* One constant row count per case, so that the accumulators stay in registers. */
            switch (rows) { ROWS_CASE(8) ROWS_CASE(7) ROWS_CASE(6) ROWS_CASE(5)
                            ROWS_CASE(4) ROWS_CASE(3) ROWS_CASE(2) ROWS_CASE(1) }
        }
    }
    free(xpart);
}

void ibl_q4_1_matmul(const float *x, const uint8_t *qs, const float *d, const float *m, float *y,
                     int64_t M, int64_t N, int64_t K) {
    matmul(0, 1, x, qs, d, m, y, M, N, K);
}

/* group: values per scale, 32 or 16 (16 only without offsets); m may be NULL. */
void ibl_q8_matmul(const float *x, const int8_t *qs, const float *d, const float *m, float *y, int64_t M, int64_t N,
                   int64_t K, int64_t group) {
    matmul(1, BLOCK / group, x, qs, d, m, y, M, N, K);
}

/* W [N, K] float32 from the blocks, rows split across threads. m == NULL: no offsets. */
static void dequantize(int is_q8, int per, const void *qs, const float *d, const float *m, float *w,
                       int64_t N, int64_t K) {
    const int64_t nb = K / BLOCK, row_bytes = is_q8 ? K : K / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            __m256 v[4];
            if (is_q8) unpack_q8((const int8_t *)qs + n * row_bytes + BLOCK * b, v);
            else unpack_q4((const uint8_t *)qs + n * row_bytes + BLOCK / 2 * b, v);
            const float *db = d + (n * nb + b) * per;
            const __m256 mb = _mm256_set1_ps(m ? m[n * nb + b] : 0.f);
            for (int i = 0; i < 4; i++) {
                __m256 out = _mm256_mul_ps(_mm256_set1_ps(db[i < 2 ? 0 : per - 1]), v[i]);
                if (m) out = _mm256_add_ps(out, mb);
                _mm256_storeu_ps(w + n * K + BLOCK * b + 8 * i, out);
            }
        }
    }
}

void ibl_q4_1_dequantize(const uint8_t *qs, const float *d, const float *m, float *w, int64_t N, int64_t K) {
    dequantize(0, 1, qs, d, m, w, N, K);
}

void ibl_q8_dequantize(const int8_t *qs, const float *d, const float *m, float *w, int64_t N, int64_t K,
                       int64_t group) {
    dequantize(1, BLOCK / group, qs, d, m, w, N, K);
}
