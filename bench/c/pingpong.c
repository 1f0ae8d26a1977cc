/*
 * Ping-pong through the C client library: one request in flight, N round trips of one request
 * kind, each timed with CLOCK_MONOTONIC around the library call (format, write, read, parse).
 * Prints one JSON line: {"kind":..., "n":..., "p50_us":..., "p99_us":..., "mean_us":...}.
 *
 *   pingpong KIND BACKEND N REPO [--echo] -- CHILD ARGV...
 *
 * KIND: tph-control | st-entry | vector-control | non-tph | msix-non-tph |
 * tph-control-read | vector-control-read. BACKEND: writes | host. With
 * --echo the child is the C echo (no handshake, no attach); otherwise it is tphtrap serve,
 * set up with both devices of policies/two-tenants.yaml in BACKEND.
 */
#define _POSIX_C_SOURCE 200809L

#include "tphtrap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define A "tenant-a", "0000:3b:00.0"
#define B "tenant-b", "0000:3b:00.1"

static struct tphtrap_client *c;

static void must(int got, const struct tphtrap_reply *r, const char *what) {
    if (got != 0 || !r->ok) {
        fprintf(stderr, "pingpong: %s: %s %s\n", what, tphtrap_error(c), r->error_message);
        exit(1);
    }
}

static int one(const char *kind, unsigned i, struct tphtrap_reply *r) {
    if (strcmp(kind, "tph-control") == 0)
        return tphtrap_cfg_write(c, A, 0x150, 4, i % 2 ? 0x001 : 0x101, r);
    if (strcmp(kind, "st-entry") == 0)
        return tphtrap_cfg_write(c, A, (uint16_t)(0x154 + 2 * (i % 8)), 2, 0x01, r);
    if (strcmp(kind, "vector-control") == 0)
        return tphtrap_msix_write(c, B, 2, 0x4000 + 16 * (i % 4) + 12, 4,
                                  0x02020000u | (i % 2), r);
    if (strcmp(kind, "msix-non-tph") == 0)
        return tphtrap_msix_write(c, B, 2, 0x4000 + 16 * (i % 4), 4,
                                  0xFEE00000u | (i % 2) << 12, r);
    if (strcmp(kind, "tph-control-read") == 0) return tphtrap_cfg_read(c, A, 0x150, 4, r);
    if (strcmp(kind, "vector-control-read") == 0)
        return tphtrap_msix_read(c, B, 2, 0x4000 + 16 * (i % 4) + 12, 4, r);
    return tphtrap_cfg_write(c, A, 0x04, 2, 0x0406, r);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: pingpong KIND BACKEND N REPO [--echo] -- CHILD ARGV...\n");
        return 2;
    }
    const char *kind = argv[1], *backend = argv[2], *repo = argv[4];
    unsigned n = (unsigned)atoi(argv[3]);
    int k = 5;
    int echo = 0;
    if (strcmp(argv[k], "--echo") == 0) {
        echo = 1;
        k++;
    }
    if (strcmp(argv[k], "--") != 0 || n == 0)
        return 2;
    char err[256];
    c = tphtrap_spawn((const char *const *)&argv[k + 1], err, sizeof err);
    if (!c) {
        fprintf(stderr, "pingpong: %s\n", err);
        return 1;
    }
    struct tphtrap_reply r;
    if (!echo) {
        enum tphtrap_backend be =
            strcmp(backend, "host") == 0 ? TPHTRAP_BACKEND_HOST : TPHTRAP_BACKEND_WRITES;
        char path[2][4096];
        snprintf(path[0], sizeof path[0], "%s/fixtures/devices/nic-st-in-cap.lspci", repo);
        snprintf(path[1], sizeof path[1], "%s/fixtures/devices/nic-st-in-msix.lspci", repo);
        must(tphtrap_hello(c, "pingpong", &r), &r, "hello");
        uint32_t power_on[32];
        for (unsigned i = 0; i < 32; i++)
            power_on[i] = 1;
        must(tphtrap_attach(c, A, path[0], be, 3, NULL, 0, &r), &r, "attach a");
        must(tphtrap_attach(c, B, path[1], be, 3, power_on, 32, &r), &r, "attach b");
        if (be == TPHTRAP_BACKEND_HOST) {
            uint16_t vectors[4] = {0, 1, 2, 3};
            must(tphtrap_vectors(c, B, vectors, 4, true, &r), &r, "vectors");
        }
        must(tphtrap_cfg_write(c, B, 0x150, 4, 0x301, &r), &r, "enable b");
    }
    unsigned warm = n / 10 + 20;
    for (unsigned i = 0; i < warm; i++)
        must(one(kind, i, &r), &r, "warm-up");
    double *us = malloc(sizeof *us * n), sum = 0;
    if (!us)
        return 1;
    for (unsigned i = 0; i < n; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int got = one(kind, i, &r);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        must(got, &r, kind);
        us[i] = (double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3;
        sum += us[i];
    }
    qsort(us, n, sizeof *us, cmp);
    printf("{\"kind\":\"%s\",\"backend\":\"%s\",\"echo\":%s,\"n\":%u,\"p50_us\":%.2f,"
           "\"p99_us\":%.2f,\"mean_us\":%.2f}\n",
           kind, backend, echo ? "true" : "false", n, us[n / 2], us[(size_t)(n * 0.99)],
           sum / n);
    free(us);
    tphtrap_close(c);
    return 0;
}
