/*
 * fdlimits: what a program's descriptors look like under the shim.
 *
 *   fdlimits many DIR N [close]   create N 8 KiB files in DIR, open, map and
 *                                 store into each (close each descriptor after
 *                                 mapping with "close"), msync them all, check
 *                                 every mapping; print "many: files N fds F
 *                                 maps M synced S" (S: mappings after the
 *                                 syncs)"
 *   fdlimits lowfds FILE          close 0, 1 and 2, open and map FILE (the shim
 *                                 opens its own descriptors for it), open
 *                                 /dev/null twice: print the three numbers,
 *                                 "lowfds: A B C" (the kernel: 0 1 2)
 *   fdlimits closeall FILE range|from
 *                                 map FILE and store, then close_range(3, ~0U)
 *                                 or closefrom(3) like a daemon, then open FILE
 *                                 again, pwrite, store, msync: print
 *                                 "closeall: ok" (the bytes are checked by the
 *                                 caller in the file)
 *   fdlimits maxmaps DIR FREE     map, store into and msync 20 files m0..m19 of
 *                                 DIR; map single anonymous pages (alternating
 *                                 protections, so that none merge) until mmap
 *                                 fails; unmap FREE of them; store into m0 and
 *                                 msync it: print "maxmaps: errno=E msync=R"
 *                                 (the kernel: errno=12 msync=0)
 *   fdlimits rename DIR           map 20 files m0..m19 of DIR, close their
 *                                 descriptors, store into and msync each; rename
 *                                 m0 to r0, store into its mapping, msync it:
 *                                 print "rename: msync=R" (the kernel: 0)
 *   fdlimits layout FILE          map 64 MiB, then FILE (stores, msync, read it
 *                                 all), then 64 MiB again: print where each
 *                                 mapping landed relative to the one before
 *                                 ("layout: file -F second -S"; the kernel,
 *                                 top-down: F = the file's size, S = 64 MiB)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "FAIL %s: %s\n", what, strerror(errno));
    exit(2);
}

static int count_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) die("opendir");
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own */
}

static int count_maps(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) die("maps");
    int n = 0, c;
    while ((c = fgetc(f)) != EOF)
        if (c == '\n') n++;
    fclose(f);
    return n;
}

static char *map_file(const char *path, int *fdp) {
    int fd = open(path, O_RDWR);
    if (fd < 0) die("open");
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap");
    *fdp = fd;
    return m;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    if (!strcmp(argv[1], "many") && argc >= 4) {
        int n = atoi(argv[3]), closing = argc > 4;
        char **maps = calloc(n, sizeof *maps);
        for (int i = 0; i < n; i++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/f%d", argv[2], i);
            int fd = open(p, O_RDWR | O_CREAT, 0644);
            if (fd < 0) { fprintf(stderr, "file %d: ", i); die("open"); }
            if (ftruncate(fd, 8192)) die("ftruncate");
            char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (m == MAP_FAILED) { fprintf(stderr, "file %d: ", i); die("mmap"); }
            snprintf(m + 100, 32, "file-%d", i);
            maps[i] = m;
            if (closing) close(fd);
        }
        int fds = count_fds(), nmaps = count_maps();
        for (int i = 0; i < n; i++) {
            if (msync(maps[i], 8192, MS_SYNC)) { fprintf(stderr, "file %d: ", i); die("msync"); }
            char want[32];
            snprintf(want, sizeof want, "file-%d", i);
            if (strcmp(maps[i] + 100, want)) { fprintf(stderr, "file %d: wrong bytes\n", i); return 1; }
        }
        printf("many: files %d fds %d maps %d synced %d\n", n, fds, nmaps, count_maps());
        return 0;
    }
    if (!strcmp(argv[1], "lowfds")) {
        int out = dup(1);
        close(0);
        close(1);
        close(2);
        /* The file takes 0; the shim opens its own descriptors for it now. */
        int fd;
        char *m = map_file(argv[2], &fd);
        m[0] = 'L';
        if (msync(m, 4096, MS_SYNC)) return 3;
        int b = open("/dev/null", O_WRONLY);
        int c = open("/dev/null", O_WRONLY);
        dprintf(out, "lowfds: %d %d %d\n", fd, b, c);
        return 0;
    }
    if (!strcmp(argv[1], "closeall") && argc >= 4) {
        int fd;
        char *m = map_file(argv[2], &fd);
        memcpy(m, "before", 6);
        if (!strcmp(argv[3], "range")) {
            if (close_range(3, ~0U, 0)) die("close_range");
        } else {
            closefrom(3);
        }
        fd = open(argv[2], O_RDWR);
        if (fd < 0) die("reopen");
        if (pwrite(fd, "written", 7, 100) != 7) die("pwrite");
        memcpy(m + 200, "stored", 6);
        if (msync(m, 4096, MS_SYNC)) die("msync");
        char buf[8] = {0};
        if (pread(fd, buf, 7, 100) != 7 || memcmp(buf, "written", 7)) die("pread");
        if (memcmp(m + 100, "written", 7)) { fprintf(stderr, "mapping stale\n"); return 1; }
        printf("closeall: ok\n");
        return 0;
    }
    if (!strcmp(argv[1], "maxmaps") && argc >= 4) {
        /* 20 files, each mapped, stored into and synced (the shim keeps the
         * views of the 16 most recent only). */
        char *maps[20];
        for (int i = 0; i < 20; i++) {
            char p[4096];
            snprintf(p, sizeof p, "%s/m%d", argv[2], i);
            int fd = open(p, O_RDWR | O_CREAT, 0644);
            if (fd < 0 || ftruncate(fd, 4096)) die("create");
            maps[i] = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (maps[i] == MAP_FAILED) die("mmap");
            memcpy(maps[i], "first", 5);
            if (msync(maps[i], 4096, MS_SYNC)) die("msync");
        }
        size_t cap = 1 << 20, n = 0;
        void **pages = malloc(cap * sizeof *pages);
        int err = 0;
        for (; n < cap; n++) {
            void *p = mmap(NULL, 4096, n % 2 ? PROT_READ : PROT_NONE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                err = errno;
                break;
            }
            pages[n] = p;
        }
        for (long k = atol(argv[3]); k > 0 && n > 0; k--) munmap(pages[--n], 4096);
        /* The least recently synced file. */
        memcpy(maps[0] + 100, "second", 6);
        int r = msync(maps[0], 4096, MS_SYNC);
        printf("maxmaps: errno=%d msync=%d\n", err, r);
        return 0;
    }
    if (!strcmp(argv[1], "rename")) {
        char *maps[20], p[4096], q[4096];
        for (int i = 0; i < 20; i++) {
            snprintf(p, sizeof p, "%s/m%d", argv[2], i);
            int fd = open(p, O_RDWR | O_CREAT, 0644);
            if (fd < 0 || ftruncate(fd, 4096)) die("create");
            maps[i] = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (maps[i] == MAP_FAILED) die("mmap");
            close(fd);
        }
        for (int i = 0; i < 20; i++) {
            memcpy(maps[i], "first", 5);
            if (msync(maps[i], 4096, MS_SYNC)) die("msync");
        }
        snprintf(p, sizeof p, "%s/m0", argv[2]);
        snprintf(q, sizeof q, "%s/r0", argv[2]);
        if (rename(p, q)) die("rename");
        memcpy(maps[0] + 100, "moved", 5);
        printf("rename: msync=%d\n", msync(maps[0], 4096, MS_SYNC));
        return 0;
    }
    if (!strcmp(argv[1], "layout")) {
        size_t big = 64 << 20;
        char *a = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int fd = open(argv[2], O_RDWR);
        if (a == MAP_FAILED || fd < 0) die("setup");
        size_t len = lseek(fd, 0, SEEK_END);
        char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) die("mmap");
        long sum = 0;
        for (size_t k = 0; k < len; k += 4096) sum += m[k];
        m[0] = 'x';
        m[len - 1] = 'y';
        if (msync(m, len, MS_SYNC)) die("msync");
        char *b = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b == MAP_FAILED) die("mmap");
        printf("layout: file %ld second %ld\n", (long)(m - a), (long)(b - m) + 0 * sum);
        return 0;
    }
    return 2;
}
