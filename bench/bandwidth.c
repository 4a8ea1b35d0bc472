/* Read-bandwidth reference for bench/bandwidth.py: OpenMP threads sum a 1 GiB array of uint64 that
 * each thread first touched itself (so its pages are local), best of 7 passes.
 * Built by the bench: gcc -O3 -march=native -fopenmp bench/bandwidth.c -o bench/out/bandwidth
 * Usage: bandwidth THREADS MEGABYTES   -> prints GB/s (1e9 bytes/s) */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS MEGABYTES\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    size_t n = (size_t)atol(argv[2]) * 1000000 / sizeof(uint64_t);
    if (threads < 1 || n < 1024) {
        fprintf(stderr, "bandwidth: THREADS >= 1 and MEGABYTES >= 1\n");
        return 2;
    }
    omp_set_num_threads(threads);
    uint64_t *a = aligned_alloc(4096, (n * sizeof(uint64_t) + 4095) / 4096 * 4096);
    if (!a) {
        fprintf(stderr, "bandwidth: out of memory\n");
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 1e30;
    uint64_t sink = 0;
    for (int pass = 0; pass < 7; pass++) {
        uint64_t s = 0;
        double t = omp_get_wtime();
#pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        t = omp_get_wtime() - t;
        sink += s;
        if (t < best) best = t;
    }
    printf("%.3f\n", n * sizeof(uint64_t) / best / 1e9);
    return sink == 42;  /* keeps the sums live */
}
