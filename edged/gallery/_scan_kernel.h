/* The float16 gallery scan: cosine scores of float16 rows with float32 queries, each group of
 * rows widened to float32 in registers or in a small buffer in the L1 cache and multiplied
 * there, so a scan reads 2 bytes per value from memory.
 *
 * Plain C99 with no Python: edged/_scan.c wraps it for Python, and it can be compiled alone
 * (with a small main) to check a cross-compiled kernel under emulation.
 *
 *   edged_scan_f16(m, rows, dim, q, nq, out)
 *     m    rows x dim float16 (IEEE binary16 bit patterns), row-major
 *     q    nq x dim float32, row-major
 *     out  rows x nq float32: out[r * nq + j] = sum_d m[r, d] * q[j, d]
 *
 *   edged_scan_f16_best(m, rows, dim, q, nq, starts, n_ids, out, tmp)
 *     each identity's best row (see there)
 *
 * Kernels: AVX2 + F16C + FMA on x86 (chosen at run time: the module is built for the
 * baseline), NEON on AArch64 (part of the baseline there), else portable C: a plain loop,
 * slower than widening blocks with OpenCV, which edged.gallery then uses instead.
 */
#ifndef EDGED_SCAN_KERNEL_H
#define EDGED_SCAN_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

/* rows taken together: four independent sums per query keep the FMA units busy.  On x86 a
 * group is widened into a small buffer when several queries share it (each value is widened
 * once), and widened in registers, straight into the products, for one query.  Every group
 * asks for the rows EDGED_PREFETCH bytes ahead first: without that, widening in registers was
 * 1.4 times slower than the buffer on a gallery that does not fit in the cache (AMD EPYC VM);
 * with it, it was faster at every size on an Intel Xeon VM and on an AMD EPYC VM
 * (docs/benchmarks.md). */
#define EDGED_GROUP 4
#define EDGED_PREFETCH 4096
/* 0 gives one query the buffer too: only tools/bench_scan_ab.py builds that, to compare */
#ifndef EDGED_ONE_QUERY_IN_REGISTERS
#define EDGED_ONE_QUERY_IN_REGISTERS 1
#endif
/* widest row the vector kernels take (the group's widened rows live on the stack) */
#define EDGED_MAX_DIM 1024

/* binary16 -> binary32, exact for zeros, subnormals and normal numbers (the gallery has no
 * inf or NaN: they are refused when it is opened) */
static inline float edged_h2f(uint16_t h)
{
    union { uint32_t u; float f; } v;
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    v.u = (uint32_t)(h & 0x7fffu) << 13;   /* exponent and mantissa in float32 place */
    v.f *= 5.192296858534828e+33f;         /* 2**112: re-bias (and normalise subnormals) */
    v.u |= sign;
    return v.f;
}

static void edged_scan_f16_c(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim,
                             const float *q, ptrdiff_t nq, float *out)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const uint16_t *a = m + r * dim;
        for (ptrdiff_t j = 0; j < nq; j++) {
            const float *qj = q + j * dim;
            float s = 0.0f;
            for (ptrdiff_t d = 0; d < dim; d++)
                s += edged_h2f(a[d]) * qj[d];
            out[r * nq + j] = s;
        }
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define EDGED_HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>

#define EDGED_AVX2 __attribute__((target("avx2,fma,f16c")))

EDGED_AVX2 static inline float edged_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* rows [r, r + n) widened into w (n x dim floats, rows dim apart) */
EDGED_AVX2 static inline void edged_widen_avx2(const uint16_t *a, ptrdiff_t n, ptrdiff_t dim,
                                               float *w)
{
    ptrdiff_t total = n * dim, i = 0;
    for (; i + 8 <= total; i += 8)
        _mm256_storeu_ps(w + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))));
    /* the tail, if any: the test lets the copies of fixed width drop the loop, which gcc 12
     * otherwise warns about (-Waggressive-loop-optimizations) where it is dead code */
    if (total & 7)
        for (; i < total; i++)
            w[i] = edged_h2f(a[i]);
}

/* ask for the cache lines of the group EDGED_PREFETCH bytes after row r, where the matrix
 * still has one (a hint: it never faults, and it changes no result) */
static inline void edged_prefetch_group(const uint16_t *m, ptrdiff_t r, ptrdiff_t rows,
                                        ptrdiff_t dim)
{
    if (dim <= 0)
        return;
    ptrdiff_t ahead = EDGED_PREFETCH / (ptrdiff_t)(2 * dim) + 1;  /* rows */
    if (r + ahead + EDGED_GROUP > rows)
        return;
    const char *p = (const char *)(m + (r + ahead) * dim);
    ptrdiff_t bytes = 2 * EDGED_GROUP * dim;
    for (ptrdiff_t b = 0; b < bytes; b += 64)
        __builtin_prefetch(p + b, 0, 3);
}

/* one query: each group's rows widened in registers, straight into the products */
EDGED_AVX2 static inline __attribute__((always_inline)) ptrdiff_t
edged_scan_f16_avx2_one(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim, const float *q,
                        float *out)
{
    ptrdiff_t d8 = dim & ~(ptrdiff_t)7;
    ptrdiff_t r = 0;
    for (; r + EDGED_GROUP <= rows; r += EDGED_GROUP) {
        edged_prefetch_group(m, r, rows, dim);
        const uint16_t *a0 = m + r * dim, *a1 = a0 + dim, *a2 = a1 + dim, *a3 = a2 + dim;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        ptrdiff_t d = 0;
        for (; d < d8; d += 8) {
            __m256 x = _mm256_loadu_ps(q + d);
            s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a0 + d))), x, s0);
            s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a1 + d))), x, s1);
            s2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a2 + d))), x, s2);
            s3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a3 + d))), x, s3);
        }
        float t0 = edged_hsum8(s0), t1 = edged_hsum8(s1);
        float t2 = edged_hsum8(s2), t3 = edged_hsum8(s3);
        for (; d < dim; d++) {
            t0 += edged_h2f(a0[d]) * q[d];
            t1 += edged_h2f(a1[d]) * q[d];
            t2 += edged_h2f(a2[d]) * q[d];
            t3 += edged_h2f(a3[d]) * q[d];
        }
        out[r] = t0;
        out[r + 1] = t1;
        out[r + 2] = t2;
        out[r + 3] = t3;
    }
    return r;  /* the rows after r (fewer than a group) are left to the caller */
}

EDGED_AVX2 static inline __attribute__((always_inline)) void
edged_scan_f16_avx2_dim(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim, const float *q,
                        ptrdiff_t nq, float *out)
{
    float w[EDGED_GROUP * EDGED_MAX_DIM];
    ptrdiff_t d8 = dim & ~(ptrdiff_t)7;
    ptrdiff_t r = EDGED_ONE_QUERY_IN_REGISTERS && nq == 1
        ? edged_scan_f16_avx2_one(m, rows, dim, q, out) : 0;
    for (; r + EDGED_GROUP <= rows; r += EDGED_GROUP) {
        edged_prefetch_group(m, r, rows, dim);
        edged_widen_avx2(m + r * dim, EDGED_GROUP, dim, w);
        const float *w0 = w, *w1 = w + dim, *w2 = w + 2 * dim, *w3 = w + 3 * dim;
        ptrdiff_t j = 0;
        for (; j + 2 <= nq; j += 2) {  /* two queries at a time: each row loaded once */
            const float *qa = q + j * dim, *qb = qa + dim;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            ptrdiff_t d = 0;
            for (; d < d8; d += 8) {
                __m256 x = _mm256_loadu_ps(qa + d), y = _mm256_loadu_ps(qb + d);
                __m256 v = _mm256_loadu_ps(w0 + d);
                a0 = _mm256_fmadd_ps(v, x, a0);
                b0 = _mm256_fmadd_ps(v, y, b0);
                v = _mm256_loadu_ps(w1 + d);
                a1 = _mm256_fmadd_ps(v, x, a1);
                b1 = _mm256_fmadd_ps(v, y, b1);
                v = _mm256_loadu_ps(w2 + d);
                a2 = _mm256_fmadd_ps(v, x, a2);
                b2 = _mm256_fmadd_ps(v, y, b2);
                v = _mm256_loadu_ps(w3 + d);
                a3 = _mm256_fmadd_ps(v, x, a3);
                b3 = _mm256_fmadd_ps(v, y, b3);
            }
            float t[8] = {edged_hsum8(a0), edged_hsum8(a1), edged_hsum8(a2), edged_hsum8(a3),
                          edged_hsum8(b0), edged_hsum8(b1), edged_hsum8(b2), edged_hsum8(b3)};
            for (; d < dim; d++) {
                for (int k = 0; k < 4; k++) {
                    t[k] += w[k * dim + d] * qa[d];
                    t[4 + k] += w[k * dim + d] * qb[d];
                }
            }
            for (int k = 0; k < 4; k++) {
                out[(r + k) * nq + j] = t[k];
                out[(r + k) * nq + j + 1] = t[4 + k];
            }
        }
        for (; j < nq; j++) {
            const float *qj = q + j * dim;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            ptrdiff_t d = 0;
            for (; d < d8; d += 8) {
                __m256 x = _mm256_loadu_ps(qj + d);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + d), x, s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + d), x, s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + d), x, s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + d), x, s3);
            }
            float t0 = edged_hsum8(s0), t1 = edged_hsum8(s1);
            float t2 = edged_hsum8(s2), t3 = edged_hsum8(s3);
            for (; d < dim; d++) {
                t0 += w0[d] * qj[d];
                t1 += w1[d] * qj[d];
                t2 += w2[d] * qj[d];
                t3 += w3[d] * qj[d];
            }
            float *o = out + r * nq + j;
            o[0] = t0;
            o[nq] = t1;
            o[2 * nq] = t2;
            o[3 * nq] = t3;
        }
    }
    for (; r < rows; r++) {
        edged_widen_avx2(m + r * dim, 1, dim, w);
        for (ptrdiff_t j = 0; j < nq; j++) {
            const float *qj = q + j * dim;
            __m256 s = _mm256_setzero_ps();
            ptrdiff_t d = 0;
            for (; d < d8; d += 8)
                s = _mm256_fmadd_ps(_mm256_loadu_ps(w + d), _mm256_loadu_ps(qj + d), s);
            float t = edged_hsum8(s);
            for (; d < dim; d++)
                t += w[d] * qj[d];
            out[r * nq + j] = t;
        }
    }
}

/* the usual embedding widths get a copy with the width fixed at compile time, its loops
 * unrolled (an interleaved A/B on the Intel VM, 1M rows, 2 threads: one query 25.1 against
 * 27.4 ms, 8 queries 35.0 against 47.5; docs/benchmarks.md) */
EDGED_AVX2 static void edged_scan_f16_avx2(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim,
                                           const float *q, ptrdiff_t nq, float *out)
{
    switch (dim) {
    case 128: edged_scan_f16_avx2_dim(m, rows, 128, q, nq, out); break;
    case 192: edged_scan_f16_avx2_dim(m, rows, 192, q, nq, out); break;
    case 256: edged_scan_f16_avx2_dim(m, rows, 256, q, nq, out); break;
    case 512: edged_scan_f16_avx2_dim(m, rows, 512, q, nq, out); break;
    default: edged_scan_f16_avx2_dim(m, rows, dim, q, nq, out); break;
    }
}

static int edged_cpu_avx2(void)
{
    unsigned int a, b, c, d;
    __builtin_cpu_init();
    /* F16C from CPUID leaf 1, ECX bit 29 (older compilers do not know the name "f16c");
     * "avx2" also checks that the OS saves the YMM registers */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif /* x86 */

#if defined(__aarch64__)
#define EDGED_HAVE_NEON 1
#include <arm_neon.h>

static void edged_scan_f16_neon(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim,
                                const float *q, ptrdiff_t nq, float *out)
{
    float w[EDGED_GROUP * EDGED_MAX_DIM];
    ptrdiff_t d4 = dim & ~(ptrdiff_t)3;
    ptrdiff_t r = 0;
    for (; r < rows; r += EDGED_GROUP) {
        ptrdiff_t n = rows - r < EDGED_GROUP ? rows - r : EDGED_GROUP;
        const uint16_t *a = m + r * dim;
        ptrdiff_t total = n * dim, i = 0;
        for (; i + 4 <= total; i += 4)
            vst1q_f32(w + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(a + i))));
        for (; i < total; i++)
            w[i] = edged_h2f(a[i]);
        for (ptrdiff_t j = 0; j < nq; j++) {
            const float *qj = q + j * dim;
            float32x4_t s[EDGED_GROUP];
            for (ptrdiff_t k = 0; k < EDGED_GROUP; k++)
                s[k] = vdupq_n_f32(0.0f);
            ptrdiff_t d = 0;
            for (; d < d4; d += 4) {
                float32x4_t x = vld1q_f32(qj + d);
                for (ptrdiff_t k = 0; k < n; k++)
                    s[k] = vfmaq_f32(s[k], vld1q_f32(w + k * dim + d), x);
            }
            for (ptrdiff_t k = 0; k < n; k++) {
                float t = vaddvq_f32(s[k]);
                for (ptrdiff_t e = d; e < dim; e++)
                    t += w[k * dim + e] * qj[e];
                out[(r + k) * nq + j] = t;
            }
        }
    }
}
#endif /* AArch64 */

/* the vector kernel this machine runs (decided once: CPUID is slow in a VM): 0 none,
 * 1 AVX2, 2 NEON */
static int edged_vector = -1;

static int edged_scan_init(void)
{
    int v = 0;
#ifdef EDGED_HAVE_AVX2
    if (edged_cpu_avx2())
        v = 1;
#endif
#ifdef EDGED_HAVE_NEON
    v = 2;
#endif
    edged_vector = v;
    return v;
}

/* the kernel rows of up to EDGED_MAX_DIM values get here: "avx2", "neon" or "c" (wider rows
 * always get "c") */
static const char *edged_scan_kernel(void)
{
    static const char *names[] = {"c", "avx2", "neon"};
    return names[edged_vector < 0 ? edged_scan_init() : edged_vector];
}

static void edged_scan_f16(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim,
                           const float *q, ptrdiff_t nq, float *out)
{
    int v = edged_vector < 0 ? edged_scan_init() : edged_vector;
    if (dim <= EDGED_MAX_DIM) {
#ifdef EDGED_HAVE_AVX2
        if (v == 1) {
            edged_scan_f16_avx2(m, rows, dim, q, nq, out);
            return;
        }
#endif
#ifdef EDGED_HAVE_NEON
        if (v == 2) {
            edged_scan_f16_neon(m, rows, dim, q, nq, out);
            return;
        }
#endif
    }
    (void)v;
    edged_scan_f16_c(m, rows, dim, q, nq, out);
}

/* rows scanned into the scratch block of edged_scan_f16_best at a time */
#define EDGED_BEST_BLOCK 1024

/* An identity's score is its best row: out[j * nq + k] = max over rows r in
 * [starts[j] - starts[0], starts[j + 1] - starts[0]) of the score of row r with query k, for
 * j < n_ids (starts has n_ids + 1 entries, not decreasing, starts[n_ids] - starts[0] = rows;
 * an identity without rows gets -inf).  The rows are scanned EDGED_BEST_BLOCK at a time into
 * tmp (EDGED_BEST_BLOCK x nq floats), so the scores never go out to memory.  Returns 0, or -1
 * (nothing written) when starts breaks those rules. */
static int edged_scan_f16_best(const uint16_t *m, ptrdiff_t rows, ptrdiff_t dim,
                               const float *q, ptrdiff_t nq, const uint64_t *starts,
                               ptrdiff_t n_ids, float *out, float *tmp)
{
    if (n_ids < 0 || starts[n_ids] < starts[0] || starts[n_ids] - starts[0] != (uint64_t)rows)
        return -1;
    for (ptrdiff_t j = 0; j < n_ids; j++)
        if (starts[j + 1] < starts[j])
            return -1;
    for (ptrdiff_t i = 0; i < n_ids * nq; i++)
        out[i] = -HUGE_VALF;
    ptrdiff_t j = 0;
    for (ptrdiff_t b = 0; b < rows; b += EDGED_BEST_BLOCK) {
        ptrdiff_t n = rows - b < EDGED_BEST_BLOCK ? rows - b : EDGED_BEST_BLOCK;
        edged_scan_f16(m + b * dim, n, dim, q, nq, tmp);
        for (ptrdiff_t r = 0; r < n; r++) {
            /* the identity of row b + r (j stays below n_ids even if starts changed after the
             * check: another thread, or out overlapping it) */
            while (j + 1 < n_ids && (ptrdiff_t)(starts[j + 1] - starts[0]) <= b + r)
                j++;
            float *o = out + j * nq;
            const float *t = tmp + r * nq;
            for (ptrdiff_t k = 0; k < nq; k++)
                if (t[k] > o[k])
                    o[k] = t[k];
        }
    }
    return 0;
}

#endif /* EDGED_SCAN_KERNEL_H */
