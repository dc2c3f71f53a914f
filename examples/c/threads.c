/*
 * threads: many threads store to the same and to different pages of one
 * shared mapping and sync concurrently; others map and unmap the same file.
 *
 *   threads FILE NTHREADS ROUNDS [SEED]
 *
 * SEED varies how often each thread syncs and with which call.
 * Thread t owns page t (writes its round number into every line) and bumps
 * its own slot in the shared page 0 with an atomic add. After the run, page t
 * holds "t:ROUNDS" and slot t of page 0 holds ROUNDS. Exits via _exit after a
 * final msync, so the backing shows only what the syncs persisted.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char *map;
static size_t len;
static int fd, rounds;
static unsigned long seed = 1;
static const char *path;

static void *worker(void *arg) {
    long t = (long)arg;
    unsigned long r = seed * 2654435761UL + (unsigned long)t * 40503UL + 1;
    int msync_every = 2 + (int)(r % 11), fsync_every = 3 + (int)((r >> 8) % 13);
    char *page = map + 4096 * (t + 1);
    uint64_t *slot = (uint64_t *)map + t;
    for (int r = 1; r <= rounds; r++) {
        char line[64];
        snprintf(line, sizeof line, "%ld:%d", t, r);
        for (int l = 0; l < 64; l++) memcpy(page + 64 * l, line, sizeof line);
        __atomic_add_fetch(slot, 1, __ATOMIC_SEQ_CST);
        if (r % msync_every == 0 && msync(page, 4096, MS_SYNC)) { perror("msync"); exit(3); }
        if (r % fsync_every == 0 && fdatasync(fd)) { perror("fdatasync"); exit(3); }
    }
    return NULL;
}

static void *mapper(void *arg) {
    (void)arg;
    for (int r = 0; r < rounds; r++) {
        int f = open(path, O_RDWR);
        char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
        if (m == MAP_FAILED) { perror("mmap"); exit(3); }
        volatile char c = m[4096];
        (void)c;
        munmap(m, len);
        close(f);
    }
    return NULL;
}

int main(int argc, char **argv) {
    path = argv[1];
    int n = atoi(argv[2]);
    rounds = atoi(argv[3]);
    if (argc > 4) seed = strtoul(argv[4], NULL, 0);
    len = 4096 * (n + 1);
    fd = open(path, O_RDWR);
    if (fd < 0 || ftruncate(fd, len)) { perror("open"); return 3; }
    map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 3; }
    pthread_t th[64], mt[2];
    for (long t = 0; t < n; t++) pthread_create(&th[t], NULL, worker, (void *)t);
    for (long t = 0; t < 2; t++) pthread_create(&mt[t], NULL, mapper, NULL);
    for (int t = 0; t < n; t++) pthread_join(th[t], NULL);
    for (int t = 0; t < 2; t++) pthread_join(mt[t], NULL);
    if (msync(map, len, MS_SYNC)) { perror("msync"); return 3; }
    printf("done\n");
    fflush(stdout);
    _exit(0);
}
