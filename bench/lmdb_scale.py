#!/usr/bin/env python3
"""LMDB at scale: page cache versus daxshim (issue "Scale").

A database of at least SIZE GiB (8-byte big-endian keys 0..N-1, 1000-byte
values) is built once without the shim, then a worker process runs for
SECONDS per configuration: 95 % read transactions getting one random key,
5 % write transactions rewriting 100 bytes of one random key's value and
committing durably (writemap=True, sync and metasync on: msync of the map at
each commit). Configurations, each in a fresh python3 process:

  page-cache    no LD_PRELOAD
  before        LD_PRELOAD=--before (only if given)
  shim          LD_PRELOAD=--lib
  page-cache-2  no LD_PRELOAD again (noise check)

The data file is in the kernel's page cache for every configuration (it was
just built and read); under the shim it is emulated pmem (DAXSHIM_PMEM = the
database directory) whose shadow (DAXSHIM_SHADOW_DIR under /dev/shm, fresh
for each configuration) fills lazily, so a shim run includes its warm-up:
the worker prints ops/s per interval to show it.

After each run the driver (without the shim) opens the database read-only and
checks the last value committed to each of the last 1000 keys the worker
wrote (`lost-commits`, must be 0), the entry count and a sample of values.

    python3 bench/lmdb_scale.py [--size-gib 4] [--seconds 20] [--dir /tmp]
                                [--lib PATH] [--before PATH] [--quick]

--quick: 1 GiB, 5 s. Exit status 0 on success; 1 if a worker fails or a
commit is lost or the database is damaged; 2 on a usage/setup error.
"""
import argparse
import collections
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

try:
    import lmdb
except ImportError:  # reported by main()/worker with a clear message
    lmdb = None

VAL = 1000          # value length
STAMP = 100         # bytes rewritten by each write transaction
POOL = 1 << 20      # random bytes the deterministic values are cut from
WRITE_FRACTION = 0.05
RECORDED = 1000     # last distinct keys written whose values are checked
BUILD_BATCH = 100_000
GIB = 1 << 30

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- deterministic values -------------------------------------------------

def make_pool():
    return random.Random(0x1DB5CA1E).randbytes(POOL + VAL)


def base_value(pool, k):
    off = (k * 2654435761) % POOL
    return pool[off:off + VAL]


def stamp_offset(k):
    """Where the write transactions rewrite STAMP bytes of key k's value."""
    return (k * 40503) % (VAL - STAMP + 1)


def key_bytes(k):
    return struct.pack(">Q", k)


def value_ok(pool, k, v):
    """v is key k's built value, possibly with its stamp region rewritten."""
    if v is None or len(v) != VAL:
        return False
    b = base_value(pool, k)
    p = stamp_offset(k)
    return v[:p] == b[:p] and v[p + STAMP:] == b[p + STAMP:]


# --- worker (hidden mode) -------------------------------------------------

def pct(sorted_list, q):
    if not sorted_list:
        return 0.0
    i = min(len(sorted_list) - 1, int(q * len(sorted_list)))
    return sorted_list[i]


def worker(dbdir, seconds, seed, record_path, interval, tag):
    if lmdb is None:
        sys.exit("lmdb_scale worker: the python lmdb module is missing (run scripts/deps.sh)")
    # Defaults: sync=True, metasync=True (durable commits: msync of the map,
    # then of the meta page); readahead=True. The map size is the one stored
    # in the database.
    env = lmdb.open(dbdir, writemap=True, sync=True, metasync=True, subdir=True)
    n = env.stat()["entries"]
    if n == 0:
        sys.exit("lmdb_scale worker: empty database")
    rng = random.Random(seed)
    randrange = rng.randrange
    rand = rng.random
    perf = time.perf_counter
    ns = time.perf_counter_ns
    pack = struct.Struct(">Q").pack
    stamp_tail = random.Random(seed ^ 0x5A5A).randbytes(STAMP)
    # Every configuration runs the same operations (same seed); the values
    # it writes are its own, so a lost commit cannot hide behind an equal
    # value written by an earlier run.
    run_id = (zlib.crc32(tag.encode()) << 32) | os.getpid()
    recorded = collections.OrderedDict()
    write_lat = []
    reads = writes = 0
    iv_reads = iv_writes = 0
    intervals = []
    t0 = perf()
    t_end = t0 + seconds
    t_next = t0 + interval
    iv_start = t0
    while True:
        now = perf()
        if now >= t_next or now >= t_end:
            dt = now - iv_start
            intervals.append((round(iv_start - t0, 3), round(dt, 3), iv_reads, iv_writes))
            print("  %-12s t=%5.1f-%5.1fs  ops/s %9.0f  reads/s %9.0f  commits/s %7.0f"
                  % (tag, iv_start - t0, now - t0, (iv_reads + iv_writes) / dt,
                     iv_reads / dt, iv_writes / dt), flush=True)
            iv_reads = iv_writes = 0
            iv_start = now
            t_next = now + interval
            if now >= t_end:
                break
        k = randrange(n)
        key = pack(k)
        if rand() < WRITE_FRACTION:
            p = stamp_offset(k)
            # 16 bytes naming this write (this run, write number), then
            # fixed bytes: the value differs from every earlier one.
            stamp = struct.pack(">QQ", run_id, writes) + stamp_tail[16:]
            s = ns()
            txn = env.begin(write=True)
            try:
                old = txn.get(key)
                new = old[:p] + stamp + old[p + STAMP:]
                txn.put(key, new)
            except BaseException:
                txn.abort()
                raise
            txn.commit()
            write_lat.append(ns() - s)
            recorded[key] = new
            recorded.move_to_end(key)
            if len(recorded) > RECORDED:
                recorded.popitem(last=False)
            writes += 1
            iv_writes += 1
        else:
            # A fresh read transaction per read, as most programs do
            # (py-lmdb renews a cached MDB_txn inside begin()).
            with env.begin() as txn:
                v = txn.get(key)
            if v is None:
                sys.exit("lmdb_scale worker: key %d missing" % k)
            reads += 1
            iv_reads += 1
    elapsed = perf() - t0
    env.close()
    with open(record_path, "w") as f:
        json.dump({key.hex(): v.hex() for key, v in recorded.items()}, f)
    write_lat.sort()
    result = {
        "seconds": elapsed,
        "reads": reads,
        "writes": writes,
        "ops_s": (reads + writes) / elapsed,
        "reads_s": reads / elapsed,
        "writes_s": writes / elapsed,
        "w_p50_us": pct(write_lat, 0.50) / 1000.0,
        "w_p99_us": pct(write_lat, 0.99) / 1000.0,
        "intervals": intervals,
    }
    print("RESULT " + json.dumps(result), flush=True)


# --- driver ---------------------------------------------------------------

def build(dbdir, size_bytes):
    pool = make_pool()
    map_size = size_bytes + max(size_bytes // 8, 256 << 20)
    map_size = (map_size + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    t = time.perf_counter()
    env = lmdb.open(dbdir, map_size=map_size, writemap=True, sync=False,
                    metasync=False, subdir=True)
    psize = env.stat()["psize"]
    k = 0
    used = 0
    next_report = 0.25
    while used < size_bytes:
        # ~4 values of 1000 bytes fill a 4 KiB leaf page (append mode).
        remaining = (size_bytes - used) // (psize // 4) + 1024
        batch = min(BUILD_BATCH, remaining)
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            cur.putmulti(((key_bytes(i), base_value(pool, i)) for i in range(k, k + batch)),
                         append=True)
        k += batch
        used = (env.info()["last_pgno"] + 1) * psize
        if used >= next_report * size_bytes:
            print("  build: %5.1f%%  %d keys  %.2f GiB  %.1f s"
                  % (100.0 * used / size_bytes, k, used / GIB, time.perf_counter() - t), flush=True)
            next_report += 0.25
    t_fill = time.perf_counter() - t
    env.sync(True)
    t_total = time.perf_counter() - t
    entries = env.stat()["entries"]
    env.close()
    st = os.stat(os.path.join(dbdir, "data.mdb"))
    print("build: %d keys, %d-byte values, page %d B: %.3f GiB of pages in use; data.mdb "
          "%.3f GiB (size = map_size), %.3f GiB allocated" %
          (entries, VAL, psize, used / GIB, st.st_size / GIB, st.st_blocks * 512 / GIB))
    print("build: %.1f s (puts %.1f s, env.sync(True) %.1f s)" % (t_total, t_fill, t_total - t_fill),
          flush=True)
    return entries, used


def warm_page_cache(path):
    """Reads the data file once so it is in the page cache for every run."""
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            b = os.pread(fd, 8 << 20, off)
            if not b:
                break
            off += len(b)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def check(dbdir, record_path, pool, entries, samples, seed):
    """Opens the database without the shim; returns (lost, problems)."""
    problems = []
    with open(record_path) as f:
        recorded = json.load(f)
    env = lmdb.open(dbdir, readonly=True, lock=False, subdir=True)
    lost = 0
    try:
        got = env.stat()["entries"]
        if got != entries:
            problems.append("entries %d, expected %d" % (got, entries))
        with env.begin() as txn:
            for kh, vh in recorded.items():
                if txn.get(bytes.fromhex(kh)) != bytes.fromhex(vh):
                    lost += 1
            rng = random.Random(seed + 1)
            bad = 0
            for _ in range(samples):
                k = rng.randrange(entries)
                if not value_ok(pool, k, txn.get(key_bytes(k))):
                    bad += 1
            for k in (0, entries - 1):
                if not value_ok(pool, k, txn.get(key_bytes(k))):
                    bad += 1
            if bad:
                problems.append("%d of %d sampled values damaged" % (bad, samples + 2))
    finally:
        env.close()
    return lost, len(recorded), problems


def run_config(name, lib, args, dbdir, workdir, seed, interval, pool, entries, children):
    record_path = os.path.join(workdir, "record-%s.json" % name)
    err_path = os.path.join(workdir, "stderr-%s.txt" % name)
    env = dict(os.environ)
    for v in ("LD_PRELOAD", "DAXSHIM_PMEM", "DAXSHIM_SHADOW_DIR", "DAXSHIM_STATS"):
        env.pop(v, None)
    shadow = None
    stats_path = None
    if lib:
        shadow = "/dev/shm/daxshim-lmdb-shadow-%d-%s" % (os.getpid(), name)
        shutil.rmtree(shadow, ignore_errors=True)
        os.mkdir(shadow, 0o700)
        stats_path = os.path.join(workdir, "stats-%s.json" % name)
        env["LD_PRELOAD"] = lib
        env["DAXSHIM_PMEM"] = dbdir
        env["DAXSHIM_SHADOW_DIR"] = shadow
        env["DAXSHIM_STATS"] = stats_path
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", dbdir, str(args.seconds),
           str(seed), record_path, str(interval), name]
    print("== %s%s" % (name, " (LD_PRELOAD=%s)" % lib if lib else " (no LD_PRELOAD)"), flush=True)
    try:
        with open(err_path, "w") as err:
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            children.append(p)
            result = None
            for line in p.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[7:])
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = p.wait()
            children.remove(p)
        with open(err_path) as f:
            stderr = f.read()
        if stderr.strip():
            print("  stderr of %s:" % name)
            for line in stderr.rstrip("\n").split("\n"):
                print("    | " + line)
        if rc != 0 or result is None:
            raise RuntimeError("worker %s failed (exit status %s)%s" %
                               (name, rc, "" if stderr.strip() else ", no stderr"))
        result["stderr"] = stderr
        stats = None
        if stats_path and os.path.exists(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
        elif shadow:
            # %p not used: one process; a missing file is worth saying.
            print("  (no DAXSHIM_STATS file written)")
        result["stats"] = stats
        if stats:
            print("  shim stats: " + ", ".join(
                "%s %s" % (k, stats[k]) for k in
                ("tracker", "lazy_faults", "lazy_filled_bytes", "syncs", "sync_ns",
                 "pages_dirtied", "lines_written", "evicted_bytes", "foreign_writes", "conflicts")
                if k in stats))
    finally:
        if shadow:
            shutil.rmtree(shadow, ignore_errors=True)
    t = time.perf_counter()
    lost, nrec, problems = check(dbdir, record_path, pool, entries, 20000, seed)
    print("  check (without the shim, %.1f s): lost-commits %d of the last %d keys written%s"
          % (time.perf_counter() - t, lost, nrec,
             "" if not problems else "; " + "; ".join(problems)), flush=True)
    result["lost"] = lost
    result["problems"] = problems
    return result


def _interrupt(signum, frame):
    raise KeyboardInterrupt()


def main():
    ap = argparse.ArgumentParser(
        description="LMDB (writemap) at scale: 95 % random reads, 5 % durable one-key write "
                    "transactions; page cache versus daxshim.")
    ap.add_argument("--size-gib", type=float, default=None, help="database size (default 4)")
    ap.add_argument("--seconds", type=float, default=None, help="run time per configuration (default 20)")
    ap.add_argument("--dir", default="/tmp", help="where the database directory is made (default /tmp)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "target", "release", "libdaxshim.so"),
                    help="the shim library (default: target/release/libdaxshim.so of this checkout)")
    ap.add_argument("--before", default=None, help="an older library, run as column 'before'")
    ap.add_argument("--quick", action="store_true", help="1 GiB, 5 s")
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size_gib is None:
        args.size_gib = 1.0 if args.quick else 4.0
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 20.0
    if lmdb is None:
        print("lmdb_scale: the python lmdb module is missing: run scripts/deps.sh "
              "(or python3 -m pip install lmdb)", file=sys.stderr)
        return 2
    libs = []
    for label, path in (("before", args.before), ("shim", args.lib)):
        if path is None:
            continue
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            print("lmdb_scale: library %s not found (%s)%s" % (
                path, label, "; build it with cargo build --release" if label == "shim" else ""),
                file=sys.stderr)
            return 2
        libs.append((label, path))
    if not os.path.isdir(args.dir):
        print("lmdb_scale: --dir %s is not a directory" % args.dir, file=sys.stderr)
        return 2
    if args.seconds <= 0 or args.size_gib <= 0:
        print("lmdb_scale: --seconds and --size-gib must be positive", file=sys.stderr)
        return 2
    size_bytes = int(args.size_gib * GIB)
    interval = 5.0 if args.seconds >= 15 else 1.0
    workdir = os.path.join(os.path.abspath(args.dir), "daxshim-lmdb-%d" % os.getpid())
    dbdir = os.path.join(workdir, "db")
    children = []
    status = 0
    # SIGTERM as Ctrl-C: the finally below cleans up.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        os.mkdir(workdir, 0o700)
        os.mkdir(dbdir)
        print("# LMDB at scale: writemap=True, durable commits (sync, metasync); %g GiB database "
              "in %s; %g s per configuration" % (args.size_gib, dbdir, args.seconds))
        print("# ops: %d%% read txns (fresh env.begin(), one random get), %d%% write txns "
              "(one random key, %d of its %d bytes rewritten, commit)"
              % (100 - int(WRITE_FRACTION * 100), int(WRITE_FRACTION * 100), STAMP, VAL))
        print("# kernel %s, %d CPUs; python %s, py-lmdb %s, LMDB %s" % (
            os.uname().release, os.cpu_count(), sys.version.split()[0], lmdb.__version__,
            ".".join(map(str, lmdb.version()))), flush=True)
        entries, used = build(dbdir, size_bytes)
        pool = make_pool()
        dt = warm_page_cache(os.path.join(dbdir, "data.mdb"))
        print("page cache warmed: data.mdb read in %.1f s" % dt, flush=True)
        configs = [("page-cache", None)] + libs + [("page-cache-2", None)]
        results = collections.OrderedDict()
        for i, (name, lib) in enumerate(configs):
            results[name] = run_config(name, lib, args, dbdir, workdir, args.seed, interval,
                                       pool, entries, children)
        # --- report ---
        print()
        print("## results (%g GiB, %d keys, %g s each)" % (used / GIB, entries, args.seconds))
        print("%-13s %10s %10s %10s %12s %12s %8s %12s" % (
            "config", "ops/s", "reads/s", "commits/s", "commit p50", "commit p99", "lost",
            "last-iv ops/s"))
        for name, r in results.items():
            last = r["intervals"][-1] if r["intervals"] else None
            last_ops = (last[2] + last[3]) / last[1] if last and last[1] > 0 else 0.0
            r["last_ops_s"] = last_ops
            print("%-13s %10.0f %10.0f %10.1f %9.0f µs %9.0f µs %8d %12.0f" % (
                name, r["ops_s"], r["reads_s"], r["writes_s"], r["w_p50_us"], r["w_p99_us"],
                r["lost"], last_ops))
        pc = results["page-cache"]["ops_s"]
        pc2 = results["page-cache-2"]["ops_s"]
        print()
        print("page-cache noise: second run / first = %.3f" % (pc2 / pc))
        for label, _ in libs:
            r = results[label]
            print("ratio %s / page-cache = %.3f  (against page-cache-2: %.3f; last interval: %.3f)%s"
                  % (label, r["ops_s"] / pc, r["ops_s"] / pc2,
                     r["last_ops_s"] / results["page-cache"]["last_ops_s"]
                     if results["page-cache"]["last_ops_s"] else 0.0,
                     "   goal >= 0.8: %s" % ("met" if r["ops_s"] / pc >= 0.8 else "NOT met")
                     if label == "shim" else ""))
        total_lost = sum(r["lost"] for r in results.values())
        problems = ["%s: %s" % (n, p) for n, r in results.items() for p in r["problems"]]
        print("lost-commits %d" % total_lost)
        if total_lost or problems:
            for p in problems:
                print("DAMAGED: " + p, file=sys.stderr)
            if total_lost:
                print("LOST COMMITS: %d acknowledged write commits are not in the database"
                      % total_lost, file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        print("\nlmdb_scale: interrupted", file=sys.stderr)
        status = 130
    except RuntimeError as e:
        print("lmdb_scale: %s" % e, file=sys.stderr)
        status = 1
    finally:
        for p in children:
            try:
                p.kill()
                p.wait()
            except OSError:
                pass
        for name in os.listdir("/dev/shm"):
            if name.startswith("daxshim-lmdb-shadow-%d-" % os.getpid()):
                shutil.rmtree(os.path.join("/dev/shm", name), ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        if len(sys.argv) != 8:
            sys.exit("usage: lmdb_scale.py --worker DBDIR SECONDS SEED RECORD INTERVAL TAG")
        worker(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
               float(sys.argv[6]), sys.argv[7])
    else:
        sys.exit(main())
