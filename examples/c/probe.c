/*
 * probe: runs a script of file and mapping operations given as arguments, so
 * that tests can run the same steps with and without libdaxshim.so.
 *
 *   probe CMD [ARGS] [, CMD [ARGS]]...
 *
 * Commands (each prints at most one line):
 *   open PATH MODE          MODE: rw | ro | create | trunc | append
 *   usefd N                 use descriptor N (inherited from the parent)
 *   map LEN [FLAGS]         FLAGS: shared(default) private ro validate-sync dax
 *   store OFF TEXT          copy TEXT into the mapping at OFF
 *   fill OFF LEN CHAR       memset the mapping
 *   load OFF LEN            print "load: <bytes>"
 *   waitload OFF TEXT MS    poll the mapping until it holds TEXT at OFF:
 *                           print "waitload: ok" or "waitload: timeout"
 *   msync [sync|async|inval|0] [OFF LEN]
 *   fsync | fdatasync | syncfs | sync
 *   sfr OFF LEN [wait]      sync_file_range(WRITE [|WAIT_AFTER])
 *   pwrite OFF TEXT | write TEXT | pread OFF LEN | read LEN | seek OFF
 *   rawpwrite OFF TEXT      syscall(SYS_pwrite64, ...): no libc wrapper
 *   rawwrite TEXT | rawpwritev OFF TEXT1 TEXT2   syscall(SYS_write / SYS_pwritev)
 *   threadpwrite OFF TEXT   rawpwrite from a new thread (pthread_create), joined
 *   dprintf TEXT            dprintf(fd, ...): libc writes it with its internal write
 *   seccomp                 install a seccomp filter trapping getppid, with a SIGSYS
 *                           handler answering 4242: print "seccomp: getppid=N"
 *   sigwrite OFF TEXT       raise SIGUSR1 whose handler does rawpwrite OFF TEXT
 *   maskall                 sigprocmask(SIG_BLOCK, all): print "maskall: ok"
 *   writev TEXT1 TEXT2      | preadv OFF LEN1 LEN2
 *   ftruncate LEN | fallocate OFF LEN | punch OFF LEN | mremap NEWLEN | munmap | close | dup
 *   vmflags                 print "vmflags: ..." of the mapping (/proc/self/smaps)
 *   sleep MS | touch PATH | waitfor PATH
 *   exit | _exit | kill     end the process that way
 *   try_msync OFF LEN FLAGS         print "ret=R errno=E"
 *   try_mmap LEN PROT FLAGS OFF     (numbers) print "ret=ok|-1 errno=E"
 *   try_munmap OFF LEN | try_fsync FD|self | try_mremap NEWLEN FLAGS
 *   fork                    the rest of the script runs in a child; the
 *                           parent waits for it, prints "child: STATUS", exits
 * stdio (one stream, FP):
 *   fopen PATH MODE | fdopen MODE | freopen PATH|- MODE [stdout]
 *                           print "fopen: ok" or "fopen: errno=E"
 *   fwrite TEXT | fprintf TEXT | fputc C | fread N | fgetc | ungetc C
 *   fseek OFF set|cur|end | ftell | rewind | fflush | ffsync (fsync(fileno(FP)))
 *   setvbuf none|line|full | fileno (print whether it is the descriptor)
 *   usestream               the stream's descriptor becomes the probe's
 *   fclose                  print "fclose: R errno=E"
 *   puts TEXT | flushout    to stdout (a redirected stdout's file) | fflush it
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <ucontext.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_DAX
#define MAP_DAX 0x1000000
#endif
#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif

static int fd = -1;
static char *map;
static size_t maplen;
static FILE *fp;

struct rawpw { long off; const char *text; };

static void *thread_pwrite(void *p) {
    struct rawpw *w = p;
    long r = syscall(SYS_pwrite64, fd, w->text, strlen(w->text), w->off);
    return (void *)r;
}

static struct rawpw sig_write;

static void on_usr1(int sig) {
    (void)sig;
    syscall(SYS_pwrite64, fd, sig_write.text, strlen(sig_write.text), sig_write.off);
}

static void on_sigsys(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    ucontext_t *uc = ctx;
    if (si->si_code == 1 /* SYS_SECCOMP */ && si->si_syscall == SYS_getppid)
        uc->uc_mcontext.gregs[REG_RAX] = 4242;
}

static void install_seccomp(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL)) { perror("sigaction"); exit(2); }
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) { perror("no_new_privs"); exit(2); }
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) { perror("seccomp"); exit(2); }
}

static void die(const char *what) {
    printf("FAIL %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static long num(const char *s) { return strtol(s, NULL, 0); }

static void report(long ret) {
    printf("ret=%ld errno=%d\n", ret, ret < 0 ? errno : 0);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *c = argv[i];
        if (!strcmp(c, ",")) continue;
        if (!strcmp(c, "open")) {
            const char *p = argv[++i], *m = argv[++i];
            int fl = !strcmp(m, "ro") ? O_RDONLY
                     : !strcmp(m, "create") ? O_RDWR | O_CREAT
                     : !strcmp(m, "trunc") ? O_RDWR | O_CREAT | O_TRUNC
                     : !strcmp(m, "append") ? O_RDWR | O_APPEND
                     : O_RDWR;
            fd = open(p, fl, 0644);
            if (fd < 0) die("open");
        } else if (!strcmp(c, "usefd")) {
            fd = num(argv[++i]);
        } else if (!strcmp(c, "punch")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len)) die("punch");
        } else if (!strcmp(c, "map")) {
            maplen = num(argv[++i]);
            int prot = PROT_READ | PROT_WRITE, flags = MAP_SHARED;
            while (i + 1 < argc && strcmp(argv[i + 1], ",")) {
                const char *f = argv[++i];
                if (!strcmp(f, "private")) flags = (flags & ~MAP_SHARED) | MAP_PRIVATE;
                else if (!strcmp(f, "ro")) prot = PROT_READ;
                else if (!strcmp(f, "validate-sync")) flags = MAP_SHARED_VALIDATE | MAP_SYNC;
                else if (!strcmp(f, "dax")) flags |= MAP_DAX;
            }
            map = mmap(NULL, maplen, prot, flags, fd, 0);
            if (map == MAP_FAILED) die("mmap");
        } else if (!strcmp(c, "store")) {
            long off = num(argv[++i]);
            const char *t = argv[++i];
            memcpy(map + off, t, strlen(t));
        } else if (!strcmp(c, "fill")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            memset(map + off, argv[++i][0], len);
        } else if (!strcmp(c, "load")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            printf("load: %.*s\n", (int)len, map + off);
        } else if (!strcmp(c, "msync")) {
            int flags = MS_SYNC;
            long off = 0, len = maplen;
            if (i + 1 < argc && strcmp(argv[i + 1], ",")) {
                const char *f = argv[++i];
                flags = !strcmp(f, "async") ? MS_ASYNC : !strcmp(f, "inval") ? MS_INVALIDATE
                        : !strcmp(f, "0") ? 0 : MS_SYNC;
                if (i + 2 < argc && strcmp(argv[i + 1], ",")) {
                    off = num(argv[++i]);
                    len = num(argv[++i]);
                }
            }
            if (msync(map + off, len, flags)) die("msync");
        } else if (!strcmp(c, "fsync")) {
            if (fsync(fd)) die("fsync");
        } else if (!strcmp(c, "fdatasync")) {
            if (fdatasync(fd)) die("fdatasync");
        } else if (!strcmp(c, "syncfs")) {
            if (syncfs(fd)) die("syncfs");
        } else if (!strcmp(c, "sync")) {
            sync();
        } else if (!strcmp(c, "sfr")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            unsigned fl = SYNC_FILE_RANGE_WRITE;
            if (i + 1 < argc && !strcmp(argv[i + 1], "wait")) {
                i++;
                fl |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
            }
            if (sync_file_range(fd, off, len, fl)) die("sync_file_range");
        } else if (!strcmp(c, "pwrite")) {
            long off = num(argv[++i]);
            const char *t = argv[++i];
            if (pwrite(fd, t, strlen(t), off) != (ssize_t)strlen(t)) die("pwrite");
        } else if (!strcmp(c, "write")) {
            const char *t = argv[++i];
            if (write(fd, t, strlen(t)) != (ssize_t)strlen(t)) die("write");
        } else if (!strcmp(c, "writev")) {
            struct iovec v[2] = {{argv[i + 1], strlen(argv[i + 1])}, {argv[i + 2], strlen(argv[i + 2])}};
            i += 2;
            if (writev(fd, v, 2) < 0) die("writev");
        } else if (!strcmp(c, "pread")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            char *b = calloc(1, len + 1);
            ssize_t n = pread(fd, b, len, off);
            if (n < 0) die("pread");
            printf("pread: %.*s\n", (int)n, b);
            free(b);
        } else if (!strcmp(c, "preadv")) {
            long off = num(argv[++i]), l1 = num(argv[++i]), l2 = num(argv[++i]);
            char *b1 = calloc(1, l1 + 1), *b2 = calloc(1, l2 + 1);
            struct iovec v[2] = {{b1, l1}, {b2, l2}};
            ssize_t n = preadv(fd, v, 2, off);
            if (n < 0) die("preadv");
            printf("preadv: %ld %s|%s\n", (long)n, b1, b2);
        } else if (!strcmp(c, "read")) {
            long len = num(argv[++i]);
            char *b = calloc(1, len + 1);
            ssize_t n = read(fd, b, len);
            if (n < 0) die("read");
            printf("read: %.*s\n", (int)n, b);
            free(b);
        } else if (!strcmp(c, "seek")) {
            if (lseek(fd, num(argv[++i]), SEEK_SET) < 0) die("lseek");
        } else if (!strcmp(c, "ftruncate")) {
            if (ftruncate(fd, num(argv[++i]))) die("ftruncate");
        } else if (!strcmp(c, "fallocate")) {
            long off = num(argv[++i]), len = num(argv[++i]);
            if (fallocate(fd, 0, off, len)) die("fallocate");
        } else if (!strcmp(c, "mremap")) {
            size_t n = num(argv[++i]);
            char *p = mremap(map, maplen, n, MREMAP_MAYMOVE);
            if (p == MAP_FAILED) die("mremap");
            map = p;
            maplen = n;
        } else if (!strcmp(c, "munmap")) {
            if (munmap(map, maplen)) die("munmap");
            map = NULL;
        } else if (!strcmp(c, "close")) {
            if (close(fd)) die("close");
        } else if (!strcmp(c, "dup")) {
            int n = dup(fd);
            if (n < 0) die("dup");
            close(fd);
            fd = n;
        } else if (!strcmp(c, "vmflags")) {
            FILE *sm = fopen("/proc/self/smaps", "r");
            char line[512], start[32];
            int in = 0;
            snprintf(start, sizeof start, "%lx-", (unsigned long)map);
            while (sm && fgets(line, sizeof line, sm)) {
                if (!strncmp(line, start, strlen(start))) in = 1;
                else if (in && !strncmp(line, "VmFlags:", 8)) { printf("vmflags:%s", line + 8); break; }
            }
            if (sm) fclose(sm);
        } else if (!strcmp(c, "sleep")) {
            usleep(num(argv[++i]) * 1000);
        } else if (!strcmp(c, "touch")) {
            int t = open(argv[++i], O_CREAT | O_WRONLY, 0644);
            if (t < 0) die("touch");
            close(t);
        } else if (!strcmp(c, "waitfor")) {
            const char *p = argv[++i];
            struct stat st;
            for (int k = 0; stat(p, &st) != 0; k++) {
                if (k > 20000) die("waitfor timeout");
                usleep(1000);
            }
        } else if (!strcmp(c, "exit")) {
            exit(0);
        } else if (!strcmp(c, "_exit")) {
            _exit(0);
        } else if (!strcmp(c, "kill")) {
            kill(getpid(), SIGKILL);
        } else if (!strcmp(c, "fork")) {
            pid_t p = fork();
            if (p < 0) die("fork");
            if (p > 0) {
                int st;
                waitpid(p, &st, 0);
                printf("child: %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
                return 0;
            }
        } else if (!strcmp(c, "try_msync")) {
            long off = num(argv[i + 1]), len = num(argv[i + 2]), fl = num(argv[i + 3]);
            i += 3;
            report(msync(map + off, len, fl));
        } else if (!strcmp(c, "try_mmap")) {
            long len = num(argv[i + 1]), prot = num(argv[i + 2]), fl = num(argv[i + 3]), off = num(argv[i + 4]);
            i += 4;
            void *p = mmap(NULL, len, prot, fl, fd, off);
            printf("ret=%s errno=%d\n", p == MAP_FAILED ? "-1" : "ok", p == MAP_FAILED ? errno : 0);
        } else if (!strcmp(c, "try_munmap")) {
            long off = num(argv[i + 1]), len = num(argv[i + 2]);
            i += 2;
            report(munmap(map + off, len));
        } else if (!strcmp(c, "try_fsync")) {
            const char *a = argv[++i];
            report(fsync(!strcmp(a, "self") ? fd : (int)num(a)));
        } else if (!strcmp(c, "waitload")) {
            long o = num(argv[i + 1]), ms = num(argv[i + 3]);
            const char *t = argv[i + 2];
            i += 3;
            int ok = 0;
            for (long k = 0; k <= ms && !ok; k++) {
                ok = !memcmp(map + o, t, strlen(t));
                if (!ok) usleep(1000);
            }
            printf("waitload: %s\n", ok ? "ok" : "timeout");
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            fprintf(stderr, "waitload-at: %ld.%09ld\n", (long)now.tv_sec, now.tv_nsec);
        } else if (!strcmp(c, "rawwrite")) {
            const char *t = argv[++i];
            if (syscall(SYS_write, fd, t, strlen(t)) < 0) die("rawwrite");
        } else if (!strcmp(c, "rawpwritev")) {
            long o = num(argv[i + 1]);
            struct iovec v[2] = {{(void *)argv[i + 2], strlen(argv[i + 2])},
                                 {(void *)argv[i + 3], strlen(argv[i + 3])}};
            i += 3;
            if (syscall(SYS_pwritev, fd, v, 2, o, 0) < 0) die("rawpwritev");
        } else if (!strcmp(c, "rawpwrite")) {
            long o = num(argv[i + 1]);
            const char *t = argv[i + 2];
            i += 2;
            long r = syscall(SYS_pwrite64, fd, t, strlen(t), o);
            if (r < 0) die("rawpwrite");
        } else if (!strcmp(c, "threadpwrite")) {
            struct rawpw w = {num(argv[i + 1]), argv[i + 2]};
            i += 2;
            pthread_t t;
            void *r;
            if (pthread_create(&t, NULL, thread_pwrite, &w)) die("pthread_create");
            pthread_join(t, &r);
            if ((long)r < 0) die("threadpwrite");
        } else if (!strcmp(c, "dprintf")) {
            if (dprintf(fd, "%s", argv[++i]) < 0) die("dprintf");
        } else if (!strcmp(c, "seccomp")) {
            install_seccomp();
            printf("seccomp: getppid=%ld\n", (long)getppid());
        } else if (!strcmp(c, "sigwrite")) {
            sig_write.off = num(argv[i + 1]);
            sig_write.text = argv[i + 2];
            i += 2;
            signal(SIGUSR1, on_usr1);
            raise(SIGUSR1);
        } else if (!strcmp(c, "maskall")) {
            sigset_t all;
            sigfillset(&all);
            if (sigprocmask(SIG_BLOCK, &all, NULL)) die("sigprocmask");
            printf("maskall: ok\n");
        } else if (!strcmp(c, "fopen")) {
            const char *p = argv[++i], *m = argv[++i];
            fp = fopen(p, m);
            if (fp) printf("fopen: ok\n"); else printf("fopen: errno=%d\n", errno);
        } else if (!strcmp(c, "usestream")) {
            fd = fileno(fp);
        } else if (!strcmp(c, "fdopen")) {
            const char *m = argv[++i];
            fp = fdopen(fd, m);
            if (fp) printf("fdopen: ok\n"); else printf("fdopen: errno=%d\n", errno);
        } else if (!strcmp(c, "freopen")) {
            const char *p = argv[++i], *m = argv[++i];
            int std = i + 1 < argc && !strcmp(argv[i + 1], "stdout");
            if (std) i++;
            FILE *r = freopen(strcmp(p, "-") ? p : NULL, m, std ? stdout : fp);
            if (!std) fp = r;
            if (r) printf("freopen: ok\n"); else printf("freopen: errno=%d\n", errno);
        } else if (!strcmp(c, "fwrite")) {
            const char *t = argv[++i];
            printf("fwrite: %zu\n", fwrite(t, 1, strlen(t), fp));
        } else if (!strcmp(c, "fprintf")) {
            printf("fprintf: %d\n", fprintf(fp, "%s", argv[++i]));
        } else if (!strcmp(c, "fputc")) {
            printf("fputc: %d\n", fputc(argv[++i][0], fp));
        } else if (!strcmp(c, "fread")) {
            long n = num(argv[++i]);
            char *b = calloc(1, n + 1);
            size_t k = fread(b, 1, n, fp);
            printf("fread: %zu %s\n", k, b);
            free(b);
        } else if (!strcmp(c, "fgetc")) {
            printf("fgetc: %d\n", fgetc(fp));
        } else if (!strcmp(c, "ungetc")) {
            printf("ungetc: %d\n", ungetc(argv[++i][0], fp));
        } else if (!strcmp(c, "fseek")) {
            long o = num(argv[i + 1]);
            const char *w = argv[i + 2];
            i += 2;
            int wh = !strcmp(w, "end") ? SEEK_END : !strcmp(w, "cur") ? SEEK_CUR : SEEK_SET;
            int r = fseek(fp, o, wh);
            printf("fseek: %d\n", r);
        } else if (!strcmp(c, "ftell")) {
            printf("ftell: %ld\n", ftell(fp));
        } else if (!strcmp(c, "rewind")) {
            rewind(fp);
        } else if (!strcmp(c, "fflush")) {
            printf("fflush: %d\n", fflush(fp));
        } else if (!strcmp(c, "ffsync")) {
            printf("ffsync: %d\n", fsync(fileno(fp)));
        } else if (!strcmp(c, "setvbuf")) {
            const char *m = argv[++i];
            int mode = !strcmp(m, "none") ? _IONBF : !strcmp(m, "line") ? _IOLBF : _IOFBF;
            printf("setvbuf: %d\n", setvbuf(fp, NULL, mode, 0));
        } else if (!strcmp(c, "fileno")) {
            int n = fileno(fp);
            struct stat a, b;
            int same = n >= 0 && fd >= 0 && !fstat(n, &a) && !fstat(fd, &b) && a.st_ino == b.st_ino;
            printf("fileno: %s\n", n < 0 ? "-1" : same ? "same file" : "other file");
        } else if (!strcmp(c, "fclose")) {
            int r = fclose(fp);
            fp = NULL;
            printf("fclose: %d errno=%d\n", r, r ? errno : 0);
        } else if (!strcmp(c, "puts")) {
            fputs(argv[++i], stdout);
        } else if (!strcmp(c, "flushout")) {
            fflush(stdout);
        } else if (!strcmp(c, "try_mremap")) {
            long n = num(argv[i + 1]), fl = num(argv[i + 2]);
            i += 2;
            void *p = mremap(map, maplen, n, fl);
            printf("ret=%s errno=%d\n", p == MAP_FAILED ? "-1" : "ok", p == MAP_FAILED ? errno : 0);
        } else {
            fprintf(stderr, "probe: unknown command %s\n", c);
            return 2;
        }
    }
    return 0;
}
