/* fp32 FMA peak for bench/fma_peak.py: OpenMP threads each run 12 independent chains of vector
 * multiply-adds (enough to cover the FMA latency of every x86 and ARM core we run on), best of 5 passes.
 * Built by the bench per vector ISA: -mavx2 -mfma (VW=8), -mavx512f (VW=16), NEON on aarch64 (VW=4).
 * Usage: fma_peak THREADS MILLION_STEPS   -> prints GFLOP/s (1e9 fp32 FLOP/s) */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef VW
#define VW 8
#endif
#define CHAINS 12
#if defined(__aarch64__)
#define VREG "+w"
#else
#define VREG "+v"
#endif
typedef float vec __attribute__((vector_size(VW * 4)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS MILLION_STEPS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    long steps = atol(argv[2]) * 1000000L;
    if (threads < 1 || steps < 1) {
        fprintf(stderr, "fma_peak: THREADS >= 1 and MILLION_STEPS >= 1\n");
        return 2;
    }
    omp_set_num_threads(threads);
    double best = 0;
    float sink = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = now();
#pragma omp parallel reduction(+ : sink)
        {
            vec a[CHAINS], b, c;
            for (int j = 0; j < VW; j++) {
                b[j] = 1.0000001f;
                c[j] = 1e-7f;
            }
            for (int i = 0; i < CHAINS; i++) a[i] = c * (float)(i + omp_get_thread_num());
            for (long n = 0; n < steps; n++) {
#pragma GCC unroll 12
                for (int i = 0; i < CHAINS; i++) a[i] = a[i] * b + c; /* contracted to one FMA */
                __asm__ volatile("" : VREG(b));                      /* b stays a register operand */
            }
            for (int i = 0; i < CHAINS; i++)
                for (int j = 0; j < VW; j++) sink += a[i][j];
        }
        double gflops = (double)steps * threads * CHAINS * VW * 2 / (now() - t0) / 1e9;
        if (gflops > best) best = gflops;
    }
    printf("%.2f\n", best);
    return sink == 42.0f ? 1 : 0; /* keeps the sums live */
}
