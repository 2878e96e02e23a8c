/* Self-test of edged's float16 scan kernels without Python, for a kernel this machine cannot
 * run natively: cross-compile it and run it under emulation, e.g. the NEON kernel of the
 * AArch64 boards on an x86 machine (Debian: gcc-aarch64-linux-gnu, qemu-user):
 *
 *   aarch64-linux-gnu-gcc -O2 -static -o /tmp/selftest tools/scan_kernel_selftest.c -lm
 *   qemu-aarch64 /tmp/selftest
 *
 * or natively: gcc -O2 -o /tmp/selftest tools/scan_kernel_selftest.c -lm && /tmp/selftest
 *
 * It compares the kernel this machine dispatches to against a double-precision reference
 * over the shapes the gallery uses (and the edges: tails, remainders, the portable kernel)
 * and over special values, and prints the kernel's name.  Exit status 0: all agree.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../edged/gallery/_scan_kernel.h"

static uint32_t state = 12345u;

static float uniform(void)  /* in [-1, 1) */
{
    state = state * 1664525u + 1013904223u;
    return (float)((state >> 8) & 0xffffff) / 8388608.0f - 1.0f;
}

static uint16_t f2h(float f)  /* float32 -> binary16, round to nearest (normal range) */
{
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000u;
    int exp = (int)((v.u >> 23) & 0xff) - 127 + 15;
    uint32_t man = v.u & 0x7fffffu;
    if (exp <= 0)
        return (uint16_t)sign;  /* tiny: zero (subnormals are tested separately) */
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    if (man & 0x1000u)
        h++;
    return (uint16_t)h;
}

static int check(ptrdiff_t rows, ptrdiff_t dim, ptrdiff_t nq)
{
    uint16_t *m = malloc(sizeof(uint16_t) * rows * dim);
    float *q = malloc(sizeof(float) * nq * dim), *out = malloc(sizeof(float) * rows * nq);
    for (ptrdiff_t i = 0; i < rows * dim; i++)
        m[i] = f2h(uniform() / sqrtf((float)dim));
    for (ptrdiff_t i = 0; i < nq * dim; i++)
        q[i] = uniform() / sqrtf((float)dim);
    edged_scan_f16(m, rows, dim, q, nq, out);
    int bad = 0;
    for (ptrdiff_t r = 0; r < rows && !bad; r++) {
        for (ptrdiff_t j = 0; j < nq; j++) {
            double s = 0;
            for (ptrdiff_t d = 0; d < dim; d++)
                s += (double)edged_h2f(m[r * dim + d]) * q[j * dim + d];
            if (fabs(s - out[r * nq + j]) > 1e-5) {
                printf("FAIL rows %td dim %td nq %td: row %td query %td: %.8f, want %.8f\n",
                       rows, dim, nq, r, j, out[r * nq + j], s);
                bad = 1;
                break;
            }
        }
    }
    free(m);
    free(q);
    free(out);
    return bad;
}

/* each identity's best row (edged_scan_f16_best): 1 to 7 rows an identity, over more than
 * one 1024-row block, compared with the best of the per-row scores */
static int check_best(ptrdiff_t dim, ptrdiff_t nq)
{
    enum { IDS = 700 };
    uint64_t starts[IDS + 1];
    starts[0] = 11;  /* a slice of a gallery's starts: they need not begin at 0 */
    for (int j = 0; j < IDS; j++)
        starts[j + 1] = starts[j] + 1 + (uint64_t)((uniform() + 1.0f) * 3.5f) % 7;
    ptrdiff_t rows = (ptrdiff_t)(starts[IDS] - starts[0]);
    uint16_t *m = malloc(sizeof(uint16_t) * rows * dim);
    float *q = malloc(sizeof(float) * nq * dim), *all = malloc(sizeof(float) * rows * nq);
    float *out = malloc(sizeof(float) * IDS * nq);
    float *tmp = malloc(sizeof(float) * EDGED_BEST_BLOCK * nq);
    for (ptrdiff_t i = 0; i < rows * dim; i++)
        m[i] = f2h(uniform() / sqrtf((float)dim));
    for (ptrdiff_t i = 0; i < nq * dim; i++)
        q[i] = uniform() / sqrtf((float)dim);
    edged_scan_f16(m, rows, dim, q, nq, all);
    int bad = edged_scan_f16_best(m, rows, dim, q, nq, starts, IDS, out, tmp) != 0;
    for (ptrdiff_t j = 0; j < IDS && !bad; j++)
        for (ptrdiff_t k = 0; k < nq; k++) {
            float want = -HUGE_VALF;
            for (uint64_t r = starts[j] - starts[0]; r < starts[j + 1] - starts[0]; r++)
                want = all[r * nq + k] > want ? all[r * nq + k] : want;
            if (out[j * nq + k] != want) {
                printf("FAIL best row: dim %td nq %td identity %td query %td: %.8f, want %.8f\n",
                       dim, nq, j, k, out[j * nq + k], want);
                bad = 1;
                break;
            }
        }
    starts[5] = starts[4] - 1;  /* decreasing starts are refused */
    if (!bad && edged_scan_f16_best(m, rows, dim, q, nq, starts, IDS, out, tmp) != -1) {
        printf("FAIL best row: decreasing starts were taken\n");
        bad = 1;
    }
    free(m);
    free(q);
    free(all);
    free(out);
    free(tmp);
    return bad;
}

int main(void)
{
    static const ptrdiff_t dims[] = {192, 128, 256, 512, 130, 1, 1024, 1100};
    static const ptrdiff_t rows[] = {1, 3, 4, 9, 1000};
    static const ptrdiff_t nqs[] = {1, 2, 5};
    int bad = 0, n = 0;
    for (size_t a = 0; a < sizeof dims / sizeof *dims; a++)
        for (size_t b = 0; b < sizeof rows / sizeof *rows; b++)
            for (size_t c = 0; c < sizeof nqs / sizeof *nqs; c++, n++)
                bad |= check(rows[b], dims[a], nqs[c]);
    /* zeros, subnormals, the smallest normal, the largest finite value, read
     * back one by one through one-hot queries: the widening must be exact */
    static const uint16_t special[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x01f7, 0x83ff, 0x0400,
                                       0x3800, 0xbc00, 0x7bff, 0xfbff, 0x3555};
    static const float want[] = {0.0f, -0.0f, 5.9604645e-08f, -5.9604645e-08f,
                                 2.9981136e-05f, -6.0975552e-05f, 6.1035156e-05f, 0.5f, -1.0f,
                                 65504.0f, -65504.0f, 0.33325195f};
    enum { K = sizeof special / sizeof *special, R = 5 };
    uint16_t m[R * K];
    float q[K * K], out[R * K];
    for (int r = 0; r < R; r++)
        memcpy(m + r * K, special, sizeof special);
    for (int i = 0; i < K * K; i++)
        q[i] = (i / K == i % K) ? 1.0f : 0.0f;
    edged_scan_f16(m, R, K, q, K, out);
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++)
            if (out[r * K + k] != want[k]) {  /* (a sum of products loses the sign of -0) */
                printf("FAIL special value %#06x: %.9g, want %.9g\n", special[k],
                       out[r * K + k], want[k]);
                bad = 1;
            }
    int nb = 0;
    for (size_t a = 0; a < sizeof dims / sizeof *dims; a++)
        for (size_t c = 0; c < sizeof nqs / sizeof *nqs; c++, nb++)
            bad |= check_best(dims[a], nqs[c]);
    printf("%s kernel: %d shapes, %d special values and %d best-row shapes %s\n",
           edged_scan_kernel(), n, K, nb, bad ? "FAILED" : "agree with the reference");
    return bad;
}
