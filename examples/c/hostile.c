/*
 * hostile: what real programs do to a preload library.
 *
 *   hostile sigbus FILE [HOW]   own SIGBUS handler: read past EOF
 *   hostile sigsegv FILE [HOW]  own SIGSEGV handler: store to a read-only mapping
 *                            HOW: sigaction (SA_SIGINFO|SA_ONSTACK, default),
 *                            resethand (SA_SIGINFO|SA_RESETHAND), signal (signal())
 *   hostile sigwrite FILE N  pwrite() to the file from a SIGALRM handler
 *                            while the main loop stores and msyncs
 *   hostile forksync FILE N  fork N times while another thread syncs
 *   hostile fuzz FILE SEED N mmap/msync/mremap/munmap/madvise with random
 *                            arguments; prints each result (for comparison
 *                            with the kernel's own answers)
 *
 * Prints "ok ..." lines; exits non-zero on any surprise.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static sigjmp_buf jb;
static volatile void *fault_addr;
static volatile int fault_code, fault_sig;

static void on_fault(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    fault_sig = sig;
    fault_addr = si->si_addr;
    fault_code = si->si_code;
    siglongjmp(jb, 1);
}

static void die(const char *w) {
    printf("FAIL %s: %s\n", w, strerror(errno));
    exit(2);
}

static int open_rw(const char *p) {
    int fd = open(p, O_RDWR);
    if (fd < 0) die("open");
    return fd;
}

static void on_fault_plain(int sig) {
    fault_sig = sig;
    siglongjmp(jb, 1);
}

static int sig_mode(const char *path, int sig, const char *how) {
    int plain = !strcmp(how, "signal");
    if (plain) {
        if (signal(sig, on_fault_plain) == SIG_ERR) die("signal");
    } else {
        struct sigaction sa = {0};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | (!strcmp(how, "resethand") ? SA_RESETHAND : SA_ONSTACK);
        sigemptyset(&sa.sa_mask);
        if (sigaction(sig, &sa, NULL)) die("sigaction");
    }
    int fd = open_rw(path);
    size_t len = 8192;
    char *m = mmap(NULL, len, sig == SIGBUS ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap");
    char *target = sig == SIGBUS ? m + 5000 : m + 100; /* the file is 4096 bytes */
    if (sigsetjmp(jb, 1) == 0) {
        if (sig == SIGBUS) {
            volatile char c = *target;
            (void)c;
        } else {
            *(volatile char *)target = 1;
        }
        printf("FAIL no signal\n");
        return 2;
    }
    if (plain) {
        printf("ok %s via signal()\n", sig == SIGBUS ? "sigbus" : "sigsegv");
        return fault_sig == sig ? 0 : 2;
    }
    if (!strcmp(how, "resethand")) {
        struct sigaction now;
        sigaction(sig, NULL, &now);
        if (now.sa_handler != SIG_DFL) {
            printf("FAIL SA_RESETHAND did not reset\n");
            return 2;
        }
    }
    if (fault_sig != sig || fault_addr != target) {
        printf("FAIL signal %d at %p, expected %d at %p\n", fault_sig, (void *)fault_addr, sig, target);
        return 2;
    }
    printf("ok %s at offset %ld code %d\n", sig == SIGBUS ? "sigbus" : "sigsegv", (long)((char *)fault_addr - m), fault_code);
    return 0;
}

static int sw_fd;
static volatile long handler_writes;

static volatile long bad_infos;

static void on_alarm(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    /* Deferred or not, the handler gets its own signal's information. */
    if (sig != SIGALRM || info == NULL || info->si_signo != SIGALRM) bad_infos++;
    char b[16];
    int n = snprintf(b, sizeof b, "H%07ld", handler_writes);
    /* Into the page the main loop dirties (its stores stay below 3000): a
       write that bypassed the shadow would be overwritten by the next
       writeback of that page. */
    if (pwrite(sw_fd, b, n, 3072 + 16 * (handler_writes % 64)) == n) handler_writes++;
}

static int sigwrite_mode(const char *path, int n) {
    sw_fd = open_rw(path);
    char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, sw_fd, 0);
    if (m == MAP_FAILED) die("mmap");
    struct sigaction sa, back;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    if (sigaction(SIGALRM, &sa, NULL)) die("sigaction");
    /* The program sees its own action, whatever the shim installed. */
    if (sigaction(SIGALRM, NULL, &back) || back.sa_sigaction != on_alarm ||
        !(back.sa_flags & SA_SIGINFO))
        die("sigaction does not report the program's own action");
    struct itimerval it = {{0, 200}, {0, 200}};
    setitimer(ITIMER_REAL, &it, NULL);
    for (int i = 0; i < n; i++) {
        m[i % 8192] = (char)i;
        if (msync(m, 8192, MS_SYNC) && errno != EINTR) die("msync");
        char b[8];
        if (pread(sw_fd, b, sizeof b, 0) < 0 && errno != EINTR) die("pread");
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    if (bad_infos) die("a handler got the wrong siginfo");
    printf("ok sigwrite %ld handler writes\n", handler_writes);
    return 0;
}

static char *fs_map;
static volatile int fs_stop;

static void *syncer(void *arg) {
    (void)arg;
    for (long i = 0; !fs_stop; i++) {
        memset(fs_map, (int)i, 1 << 20);
        msync(fs_map, 1 << 20, MS_SYNC);
    }
    return NULL;
}

static int forksync_mode(const char *path, int n) {
    int i;
    int fd = open_rw(path);
    fs_map = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fs_map == MAP_FAILED) die("mmap");
    pthread_t t;
    pthread_create(&t, NULL, syncer, NULL);
    for (i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) die("fork");
        if (p == 0) {
            alarm(20); /* a deadlock in the child becomes a failure */
            /* Beyond the syncer's first MiB: only the child writes here. */
            fs_map[(1 << 20) + 4096 * 3 + i] = 'c';
            if (msync(fs_map, 2 << 20, MS_SYNC)) _exit(3);
            if (fsync(fd)) _exit(4);
            _exit(0);
        }
        int st;
        if (waitpid(p, &st, 0) < 0) die("waitpid");
        if (!WIFEXITED(st) || WEXITSTATUS(st)) {
            printf("FAIL child %d status %d\n", i, st);
            return 2;
        }
    }
    fs_stop = 1;
    pthread_join(t, NULL);
    printf("ok forksync %d children\n", n);
    return 0;
}

static uint64_t rs;
static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

static long pick_len(void) {
    static const long lens[] = {0, 1, 4095, 4096, 4097, 8192, 12288, 65536, 1L << 30, -1, -4096};
    return lens[rnd() % (sizeof lens / sizeof *lens)];
}

static long pick_off(void) {
    static const long offs[] = {0, 1, 4096, 8192, 12288, 16384, 32768, 45056, 49152, 61440};
    return offs[rnd() % (sizeof offs / sizeof *offs)];
}

static int fuzz_mode(const char *path, uint64_t seed, int n) {
    rs = seed | 1;
    int fd = open_rw(path);
    /* A region we own with a fixed layout, restored after every call:
       [0, 32K) the file, [32K, 64K) PROT_NONE memory with a hole at
       [48K, 52K), and a hole at [64K, 68K) so that ranges running past the
       region meet a gap whatever lies beyond. */
    char *base = mmap(NULL, 69632, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) die("mmap base");
    static const int msflags[] = {MS_SYNC, MS_ASYNC, MS_INVALIDATE, 0, MS_SYNC | MS_ASYNC, 64, MS_SYNC | MS_INVALIDATE};
    static const int prots[] = {PROT_READ, PROT_READ | PROT_WRITE, PROT_NONE, PROT_EXEC | PROT_READ, 0x10};
    static const int mflags[] = {MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_SHARED | MAP_PRIVATE, 0,
                                 MAP_SHARED | MAP_ANONYMOUS, MAP_SHARED_VALIDATE | 0x4000000};
    for (int i = -1; i < n; i++) {
        if (i < 0) goto restore; /* set the layout up once before the first call */
        long off = pick_off(), len = pick_len();
        int op = rnd() % 5;
        /* msync only reads; the others must stay inside our 64 KiB region
           (anything else would remap the program's own memory). */
        if (op != 0) {
            if (off < 0 || off >= 65536) off = 61440;
            if (len > 65536 - off) len = 65536 - off;
        }
        long r;
        errno = 0;
        switch (op) {
        case 0:
            r = msync(base + off, len, msflags[rnd() % 7]);
            printf("%d msync off %ld len %ld -> %ld %d\n", i, off, len, r, r ? errno : 0);
            break;
        case 1: {
            int pr = prots[rnd() % 5], fl = mflags[rnd() % 7];
            long foff = pick_off();
            void *p = mmap(NULL, len, pr, fl, fd, foff);
            printf("%d mmap len %ld prot %d flags %#x off %ld -> %s %d\n", i, len, pr, fl, foff,
                   p == MAP_FAILED ? "-1" : "ok", p == MAP_FAILED ? errno : 0);
            if (p != MAP_FAILED) munmap(p, len);
            break;
        }
        case 2: {
            /* Non-moving remaps inside our region only. */
            long nl = 4096 * (1 + rnd() % 8);
            void *p = mremap(base + off, len, nl, 0);
            printf("%d mremap off %ld len %ld new %ld -> %s %d\n", i, off, len, nl, p == MAP_FAILED ? "-1" : "ok",
                   p == MAP_FAILED ? errno : 0);
            break;
        }
        case 3:
            if (off < 0 || off >= 65536) off = 61440;
            r = munmap(base + off, len > 0 && len <= 65536 - off ? len : 4096);
            printf("%d munmap off %ld -> %ld %d\n", i, off, r, r ? errno : 0);
            break;
        default:
            r = madvise(base + off, len < 0 ? 4096 : len, (int)(rnd() % 26));
            printf("%d madvise off %ld len %ld -> %ld %d\n", i, off, len, r, r ? errno : 0);
            break;
        }
    restore:
        /* Restore the layout (remaps and unmaps change it), then store
           through the file mapping to keep the shadow busy. */
        if (mmap(base, 32768, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) die("remap");
        if (mmap(base + 32768, 36864, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) die("remap2");
        munmap(base + 49152, 4096);
        munmap(base + 65536, 4096);
        base[rnd() % 32768] = (char)i;
    }
    printf("ok fuzz\n");
    return 0;
}

/* Lazy fills racing everything else (issue 13): a 64 MiB file whose page p
   starts with p (u64). A SIGALRM handler every 300 us reads a random page
   of the first half (a first touch inside the program's own signal
   handler); one thread reads random pages of the whole file; another keeps
   replacing a 4 MiB window of the second half with a fresh mapping of the
   same bytes (MAP_FIXED) and reads it (mapping changes racing fills, and
   the first thread's reads racing the replacement); the main thread forks
   children that read random pages of the first half of the inherited
   mapping. Every page read must hold its index. */
#define LR_LEN (64L << 20)
static char *lr_map;
static volatile long lr_bad, lr_handler_reads;
static volatile int lr_stop;
static int lr_fd;

static int lr_check(uint64_t p) {
    return *(volatile uint64_t *)(lr_map + p * 4096) == p;
}

static uint64_t lr_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

#define LR_HALF (LR_LEN / 4096 / 2)
#define LR_WIN (4L << 20)

static void lr_alarm(int sig) {
    (void)sig;
    static uint64_t s = 88172645463325252ULL;
    if (!lr_check(lr_next(&s) % LR_HALF)) lr_bad++;
    lr_handler_reads++;
}

static void *lr_reader(void *arg) {
    uint64_t s = (uintptr_t)arg | 1;
    while (!lr_stop)
        if (!lr_check(lr_next(&s) % (LR_LEN / 4096))) lr_bad++;
    return NULL;
}

static void *lr_remapper(void *arg) {
    uint64_t s = (uintptr_t)arg | 1;
    long at = LR_LEN / 2;
    while (!lr_stop) {
        void *q = mmap(lr_map + at, LR_WIN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, lr_fd, at);
        if (q != lr_map + at) lr_bad++;
        for (int i = 0; i < 64; i++)
            if (!lr_check((at + (long)(lr_next(&s) % LR_WIN)) / 4096)) lr_bad++;
        at += LR_WIN;
        if (at + LR_WIN > LR_LEN) at = LR_LEN / 2;
    }
    return NULL;
}

static int lazyrace_mode(const char *path, int ms) {
    lr_fd = open_rw(path);
    lr_map = mmap(NULL, LR_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, lr_fd, 0);
    if (lr_map == MAP_FAILED) die("mmap");
    signal(SIGALRM, lr_alarm);
    struct itimerval it = {{0, 300}, {0, 300}};
    setitimer(ITIMER_REAL, &it, NULL);
    pthread_t r, m;
    pthread_create(&r, NULL, lr_reader, (void *)7);
    pthread_create(&m, NULL, lr_remapper, (void *)11);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int forks = 0;
    long elapsed = 0;
    uint64_t s = 12345;
    do {
        pid_t c = fork();
        if (c < 0) die("fork");
        if (c == 0) {
            alarm(20);
            for (int i = 0; i < 200; i++)
                if (!lr_check(lr_next(&s) % LR_HALF)) _exit(3);
            _exit(0);
        }
        int st;
        while (waitpid(c, &st, 0) < 0 && errno == EINTR) {}
        if (!WIFEXITED(st) || WEXITSTATUS(st)) lr_bad++;
        forks++;
        /* ~50 ms between forks: every child takes a process slot of the
           shadow until a sync covers what it left (128 slots). */
        struct timespec d = {0, 50000000};
        while (nanosleep(&d, &d) && errno == EINTR) {}
        for (int i = 0; i < 20000; i++)
            if (!lr_check(lr_next(&s) % LR_HALF)) lr_bad++;
        clock_gettime(CLOCK_MONOTONIC, &t);
        elapsed = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
        /* At least `ms`, and (within 60 s: a slow emulated guest) until
           enough forks and handler reads happened. */
    } while (elapsed < ms || ((forks < 3 || lr_handler_reads < 10) && elapsed < 60000));
    lr_stop = 1;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    pthread_join(r, NULL);
    pthread_join(m, NULL);
    if (lr_bad) {
        printf("FAIL lazyrace %ld wrong pages\n", lr_bad);
        return 2;
    }
    printf("ok lazyrace %s\n", forks > 2 && lr_handler_reads > 10 ? "raced" : "too few rounds");
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3) return 2;
    const char *m = argv[1], *f = argv[2];
    const char *how = argc > 3 ? argv[3] : "sigaction";
    if (!strcmp(m, "sigbus")) return sig_mode(f, SIGBUS, how);
    if (!strcmp(m, "sigsegv")) return sig_mode(f, SIGSEGV, how);
    if (!strcmp(m, "sigwrite")) return sigwrite_mode(f, atoi(argv[3]));
    if (!strcmp(m, "forksync")) return forksync_mode(f, atoi(argv[3]));
    if (!strcmp(m, "fuzz")) return fuzz_mode(f, strtoull(argv[3], NULL, 0), atoi(argv[4]));
    if (!strcmp(m, "lazyrace")) return lazyrace_mode(f, atoi(argv[3]));
    return 2;
}
