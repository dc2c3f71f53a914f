/*
 * atomic_writer: changes a file through every path a program has, syncs,
 * and before each sync writes the image the file must hold after it, so a
 * test that kills it anywhere can check the file is one of the images.
 *
 *   atomic_writer FILE IMGDIR SEED SYNCS [OPS]
 *
 * Between two syncs: OPS random changes (default 12) among pwrite, write at
 * the position, a store through a shared mapping, ftruncate (grow or
 * shrink), truncate(2) by path. Then IMGDIR/image-K (K = 1..SYNCS) gets
 * the expected content, "sync K" is printed and the file is synced (fsync,
 * fdatasync, msync or sync_file_range, in turn). IMGDIR/image-0 is the file
 * as found. Sizes stay below 192 KiB.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define CAP (192 * 1024)

static uint64_t rng;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static unsigned char model[CAP];
static size_t size;

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* Written aside and renamed: a kill while saving leaves the old image. */
static void save(const char *dir, int k) {
    char p[4096], tmp[4200];
    snprintf(p, sizeof p, "%s/image-%d", dir, k);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    FILE *f = fopen(tmp, "w");
    if (!f || fwrite(model, 1, size, f) != size || fclose(f) || rename(tmp, p)) die("image");
}

static void random_bytes(unsigned char *b, size_t n) {
    unsigned char c = 'a' + next() % 26;
    for (size_t i = 0; i < n; i++) b[i] = (next() % 8) ? c : (unsigned char)next();
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: atomic_writer FILE IMGDIR SEED SYNCS [OPS]\n");
        return 2;
    }
    const char *path = argv[1], *dir = argv[2];
    rng = strtoull(argv[3], 0, 0) * 0x9e3779b97f4a7c15ull + 1;
    int syncs = atoi(argv[4]);
    int ops = argc > 5 ? atoi(argv[5]) : 12;
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) die("open");
    struct stat st;
    if (fstat(fd, &st)) die("fstat");
    size = st.st_size > CAP ? CAP : (size_t)st.st_size;
    if (pread(fd, model, size, 0) != (ssize_t)size) die("pread");
    if ((size_t)st.st_size != size && ftruncate(fd, size)) die("ftruncate");
    save(dir, 0);
    unsigned char buf[CAP];
    for (int k = 1; k <= syncs; k++) {
        for (int o = 0; o < ops; o++) {
            int kind = next() % 10;
            size_t off = next() % (CAP - 8192), n = 1 + next() % 6000;
            if (kind < 4) { /* pwrite */
                random_bytes(buf, n);
                if (pwrite(fd, buf, n, off) != (ssize_t)n) die("pwrite");
            } else if (kind < 5) { /* write at the position */
                random_bytes(buf, n);
                if (lseek(fd, off, SEEK_SET) < 0 || write(fd, buf, n) != (ssize_t)n) die("write");
            } else if (kind < 8) { /* a store through a shared mapping */
                if (size < 64) continue;
                off %= size;
                if (off + n > size) n = size - off;
                random_bytes(buf, n);
                unsigned char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (m == MAP_FAILED) die("mmap");
                memcpy(m + off, buf, n);
                if (munmap(m, size)) die("munmap");
            } else { /* ftruncate or truncate(2): grow or shrink */
                size_t len = next() % CAP;
                if (kind == 8 ? ftruncate(fd, len) : truncate(path, len)) die("truncate");
                if (len > size) memset(model + size, 0, len - size);
                size = len;
                continue;
            }
            if (off + n > size) {
                memset(model + size, 0, off > size ? off - size : 0);
                size = off + n;
            }
            memcpy(model + off, buf, n);
        }
        save(dir, k);
        printf("sync %d\n", k);
        fflush(stdout);
        int r;
        switch (k % 4) {
        case 0: r = fsync(fd); break;
        case 1: r = fdatasync(fd); break;
        case 2: {
            if (size == 0) { r = fsync(fd); break; }
            void *m = mmap(0, size, PROT_READ, MAP_SHARED, fd, 0);
            if (m == MAP_FAILED) die("mmap");
            r = msync(m, size, MS_SYNC);
            munmap(m, size);
            break;
        }
        default: r = sync_file_range(fd, 0, 4096, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
        }
        if (r) die("sync");
        printf("synced %d\n", k);
        fflush(stdout);
    }
    return 0;
}
