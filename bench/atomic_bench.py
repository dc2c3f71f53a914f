#!/usr/bin/env python3
"""Failure-atomic sync (DAXSHIM_ATOMIC) against the programs' own journaling.

Issue target: SQLite with journal_mode=OFF under the shim with
DAXSHIM_ATOMIC=1 (the candidate) at least 1.3x faster on the write-heavy
phases than the journaled page cache (journal_mode=DELETE and WAL, no shim);
Kyoto Cabinet with atomic sync against its own transactions.

SQLite (a child python3 process with the stdlib sqlite3 module does the
work, so LD_PRELOAD reaches it; synchronous=FULL everywhere). A table
t(id INTEGER PRIMARY KEY, k TEXT, v TEXT) with an index on k, prepopulated
with PREPOP rows in one transaction (not timed), then:

  insert   INSERTS single-row INSERT transactions (autocommit)
  update   UPDATES transactions of 10 UPDATEs of random rows each
  select   SELECTS point selects through the index (read phase, contrast)

Configurations (page cache = ordinary file, no shim; shim = the same ext4
file system as emulated pmem through libdaxshim.so):

  pc-delete           page cache, journal_mode=DELETE
  pc-wal              page cache, journal_mode=WAL
  shim-delete         shim, DELETE, no atomic
  shim-wal            shim, WAL, no atomic
  shim-off-atomic     shim, journal_mode=OFF, DAXSHIM_ATOMIC=1  (candidate)
  shim-off-atomic-mm  the candidate with PRAGMA mmap_size=268435456
  shim-off-UNSAFE     shim, journal_mode=OFF, no atomic (not crash-safe)

After each run the driver (never under the shim) checks PRAGMA
integrity_check and the row count.

Kyoto Cabinet (kchashtest order -set RNUM, keys 1..RNUM, the "setting" phase
timed by kchashtest itself):

  kc-pc-oat-oas       page cache, -oat -oas: KC's own auto transactions in
                      hard mode (undo WAL fsynced) + auto sync: durable and
                      atomic per record (the baseline)
  kc-pc-oas-UNSAFE    page cache, -oas only: durable, not atomic
  kc-shim-oat-oas     shim without atomic, -oat -oas
  kc-shim-oas-atomic  shim with DAXSHIM_ATOMIC=1, -oas only (candidate): each
                      auto sync (msync + ftruncate + fsync) commits the record

`kchashtest order -tran` was not used: it wraps each record in a *soft*
transaction (begin_transaction(false): the WAL is not fsynced), so it is not
crash-safe against power loss; -oat with -oas is KC's durable transaction.
Checked afterwards with kchashmgr check / inform (count must be RNUM).

Each configuration runs in a fresh directory; configurations alternate
within a round, the order rotated each round; ROUNDS rounds, median
reported; ratios are ratios of the medians of this run, with the range of
the per-round ratios. Shim counters come from DAXSHIM_STATS; "MB out" is
what reached the disk during the child's run: the sectors written to the
directory's block device (/proc/diskstats) between a sync(2) before the child
and one after it (so write-back the child left to the kernel counts too;
system-wide, so the machine should be otherwise idle). rusage's ru_oublock is
not used: it counts pages dirtied, not written (a page dirtied, flushed and
dirtied again counts twice).

    python3 bench/atomic_bench.py [--lib PATH] [--before PATH] [--quick]
                                  [--rounds N] [--dir DIR] [--no-kc]
                                  [--no-sqlite]

--before PATH adds the candidates again on another build of the library
(shim-off-atomic-before, kc-shim-oas-atomic-before), in the same rounds.

Exit status 0 when every run succeeded and every check passed, 1 otherwise.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.abspath(__file__)
CHILD_TIMEOUT = 900  # seconds: a child running longer is reported as hung

SQL_CONFIGS = [
    # name, shim, atomic, journal, mmap, safe
    ("pc-delete", False, False, "delete", 0, "yes"),
    ("pc-wal", False, False, "wal", 0, "yes"),
    ("shim-delete", True, False, "delete", 0, "yes"),
    ("shim-wal", True, False, "wal", 0, "yes"),
    ("shim-off-atomic", True, True, "off", 0, "yes (candidate)"),
    ("shim-off-atomic-mm", True, True, "off", 268435456, "yes (candidate)"),
    ("shim-off-UNSAFE", True, False, "off", 0, "NO"),
]
CANDIDATE = "shim-off-atomic"
PHASES = ["insert", "update", "select"]

KC_CONFIGS = [
    # name, shim, atomic, flags, safe
    ("kc-pc-oat-oas", False, False, ["-oat", "-oas"], "yes (baseline)"),
    ("kc-pc-oas-UNSAFE", False, False, ["-oas"], "NO (not atomic)"),
    ("kc-shim-oat-oas", True, False, ["-oat", "-oas"], "yes"),
    ("kc-shim-oas-atomic", True, True, ["-oas"], "yes (candidate)"),
]
KC_CANDIDATE = "kc-shim-oas-atomic"
KC_BASE = "kc-pc-oat-oas"


# --- child: the SQLite workload (runs under LD_PRELOAD) ---------------------

def sqlite_child(a):
    rng = random.Random(a.seed)
    con = sqlite3.connect(a.db, isolation_level=None)
    mode = con.execute("PRAGMA journal_mode=%s" % a.journal).fetchone()[0]
    if mode.lower() != a.journal:
        sys.exit("journal_mode %s refused (got %s)" % (a.journal, mode))
    con.execute("PRAGMA synchronous=FULL")
    if a.mmap:
        con.execute("PRAGMA mmap_size=%d" % a.mmap)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v TEXT NOT NULL)")
    con.execute("CREATE INDEX t_k ON t(k)")

    def key():
        return "%016x" % rng.getrandbits(64)

    def val():
        return rng.randbytes(50).hex()  # 100 characters

    keys = []
    con.execute("BEGIN")
    for _ in range(a.prepop):
        k = key()
        keys.append(k)
        con.execute("INSERT INTO t(k, v) VALUES(?, ?)", (k, val()))
    con.execute("COMMIT")

    res = {"journal": mode}
    ins = [(key(), val()) for _ in range(a.inserts)]
    t0 = time.perf_counter()
    for k, v in ins:
        con.execute("INSERT INTO t(k, v) VALUES(?, ?)", (k, v))
    res["insert"] = a.inserts / (time.perf_counter() - t0)
    keys.extend(k for k, _ in ins)
    n = len(keys)

    ups = [[(val(), rng.randrange(1, n + 1)) for _ in range(10)] for _ in range(a.updates)]
    t0 = time.perf_counter()
    for batch in ups:
        con.execute("BEGIN")
        for v, i in batch:
            con.execute("UPDATE t SET v=? WHERE id=?", (v, i))
        con.execute("COMMIT")
    res["update"] = a.updates / (time.perf_counter() - t0)

    sel = [keys[rng.randrange(n)] for _ in range(a.selects)]
    t0 = time.perf_counter()
    found = 0
    for k in sel:
        if con.execute("SELECT v FROM t WHERE k=?", (k,)).fetchone() is not None:
            found += 1
    res["select"] = a.selects / (time.perf_counter() - t0)
    if found != a.selects:
        sys.exit("select phase found %d of %d keys" % (found, a.selects))
    con.close()
    print("RESULT " + json.dumps(res), flush=True)


# --- driver ------------------------------------------------------------------

def run_child(cmd, env, log):
    """Runs cmd; returns (rc, output, rusage). rc < 0: killed by a signal;
    rc None: timed out (killed)."""
    with open(log, "w+b") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
                status = None
                break
            time.sleep(0.02)
        p.returncode = 0  # reaped ourselves
        out.seek(0)
        text = out.read().decode(errors="replace")
    rc = None if status is None else os.waitstatus_to_exitcode(status)
    return rc, text, ru


def child_env(base, shim, atomic, lib, pmem, shadow, stats_path):
    env = dict(base)
    for k in list(env):
        if k.startswith("DAXSHIM_") or k == "LD_PRELOAD":
            del env[k]
    if shim:
        env["LD_PRELOAD"] = lib
        env["DAXSHIM_PMEM"] = pmem
        env["DAXSHIM_SHADOW_DIR"] = shadow
        env["DAXSHIM_STATS"] = stats_path
        if atomic:
            env["DAXSHIM_ATOMIC"] = "1"
    return env


def read_stats(pattern):
    d, base = os.path.split(pattern)
    prefix = base.split("%p")[0]
    out = []
    for name in os.listdir(d):
        if name.startswith(prefix) and name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                out.append(json.load(f))
    return out


def sum_stats(stats):
    keys = ["syncs", "sync_ns", "atomic_syncs", "bytes_logged", "lines_written"]
    return {k: sum(s.get(k, 0) for s in stats) for k in keys} if stats else None


class Bench:
    def __init__(self, a):
        self.a = a
        self.failures = []
        self.tmp = tempfile.mkdtemp(prefix="atomic-bench-", dir=a.dir)
        self.shadow = "/dev/shm/daxshim-bench-%d" % os.getpid()
        self.n = 0

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.shadow, ignore_errors=True)

    def fresh(self, name, rnd):
        self.n += 1
        d = os.path.join(self.tmp, "%s-r%d-%d" % (name, rnd, self.n))
        os.mkdir(d)
        return d

    def fail(self, what, cmd, env, rc, out):
        shown = {k: v for k, v in env.items() if k.startswith("DAXSHIM_") or k == "LD_PRELOAD"}
        msg = "%s: rc=%s\n  cmd: %s\n  env: %s\n  output (tail):\n%s" % (
            what, "TIMEOUT" if rc is None else rc, " ".join(cmd), shown,
            "\n".join("    " + l for l in out.splitlines()[-25:]))
        self.failures.append(msg)
        print("FAILURE " + msg, file=sys.stderr, flush=True)

    def lib_for(self, name):
        return self.a.before if name.endswith("-before") else self.a.lib

    # SQLite -------------------------------------------------------------------
    def sqlite_run(self, cfg, rnd):
        name, shim, atomic, journal, mmap, _ = cfg
        d = self.fresh(name, rnd)
        db = os.path.join(d, "bench.db")
        stats = os.path.join(self.tmp, "stats-%s-r%d-%%p.json" % (name, rnd))
        env = child_env(os.environ, shim, atomic, self.lib_for(name), d, self.shadow, stats)
        q = self.a.counts
        cmd = [sys.executable, SELF, "--child-sqlite", "--db", db, "--journal", journal,
               "--mmap", str(mmap), "--prepop", str(q["prepop"]), "--inserts",
               str(q["inserts"]), "--updates", str(q["updates"]), "--selects",
               str(q["selects"]), "--seed", str(1234 + rnd)]
        os.sync()
        s0 = disk_sectors(d)
        rc, out, _ = run_child(cmd, env, os.path.join(self.tmp, "log-%s-r%d" % (name, rnd)))
        os.sync()
        s1 = disk_sectors(d)
        m = re.search(r"^RESULT (.*)$", out, re.M)
        if rc != 0 or not m:
            self.fail("sqlite %s round %d" % (name, rnd), cmd, env, rc, out)
            return None
        res = json.loads(m.group(1))
        # Check without the shim, after the process exited.
        try:
            con = sqlite3.connect(db)
            ic = con.execute("PRAGMA integrity_check").fetchall()
            cnt = con.execute("SELECT count(*) FROM t").fetchone()[0]
            con.close()
        except sqlite3.Error as e:
            ic, cnt = [("error: %s" % e,)], -1
        want = q["prepop"] + q["inserts"]
        if ic != [("ok",)] or cnt != want:
            self.fail("sqlite %s round %d check: integrity=%r rows=%d (want %d)"
                      % (name, rnd, ic[:5], cnt, want), cmd, env, rc, out)
            return None
        res["st"] = sum_stats(read_stats(stats)) if shim else None
        res["mb_out"] = None if s0 is None else (s1 - s0) * 512 / 1e6
        res["logs"] = sorted(f for f in os.listdir(d) if "daxshim-log" in f)
        shutil.rmtree(d, ignore_errors=True)
        return res

    # Kyoto Cabinet ------------------------------------------------------------
    def kc_run(self, cfg, rnd):
        name, shim, atomic, flags, _ = cfg
        d = self.fresh(name, rnd)
        path = os.path.join(d, "casket.kch")
        stats = os.path.join(self.tmp, "stats-%s-r%d-%%p.json" % (name, rnd))
        env = child_env(os.environ, shim, atomic, self.lib_for(name), d, self.shadow, stats)
        rnum = self.a.counts["kc"]
        cmd = ["kchashtest", "order", "-set"] + flags + [path, str(rnum)]
        os.sync()
        s0 = disk_sectors(d)
        rc, out, _ = run_child(cmd, env, os.path.join(self.tmp, "log-%s-r%d" % (name, rnd)))
        os.sync()
        s1 = disk_sectors(d)
        m = re.search(r"^setting records:.*?^time: ([0-9.]+)$", out, re.M | re.S)
        if rc != 0 or not m or not out.rstrip().endswith("ok"):
            self.fail("kc %s round %d" % (name, rnd), cmd, env, rc, out)
            return None
        secs = float(m.group(1))
        chk = subprocess.run(["kchashmgr", "check", path], capture_output=True, text=True)
        inf = subprocess.run(["kchashmgr", "inform", path], capture_output=True, text=True)
        cm = re.search(r"^count: (\d+)", inf.stdout, re.M)
        if chk.returncode != 0 or not cm or int(cm.group(1)) != rnum:
            self.fail("kc %s round %d check: check rc=%d %s; inform: %s"
                      % (name, rnd, chk.returncode, (chk.stdout + chk.stderr)[-300:],
                         inf.stdout[-300:]), cmd, env, rc, out)
            return None
        res = {"set": rnum / secs, "st": sum_stats(read_stats(stats)) if shim else None,
               "mb_out": None if s0 is None else (s1 - s0) * 512 / 1e6}
        shutil.rmtree(d, ignore_errors=True)
        return res


def disk_sectors(path):
    """Sectors written so far to the block device holding path (None when
    /proc/diskstats does not list it)."""
    dev = os.stat(path).st_dev
    want = (os.major(dev), os.minor(dev))
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                w = line.split()
                if (int(w[0]), int(w[1])) == want:
                    return int(w[9])
    except OSError:
        pass
    return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    if x is None:
        return "n/a"
    return "{:,.{}f}".format(x, nd)


def ratio_cell(results, rounds, num, den, key):
    mn = med(r[key] for r in results[num] if r)
    md = med(r[key] for r in results[den] if r)
    if not mn or not md:
        return "n/a"
    per = [results[num][i][key] / results[den][i][key] for i in range(rounds)
           if results[num][i] and results[den][i]]
    rng = " (%.2f–%.2f)" % (min(per), max(per)) if len(per) > 1 else ""
    return "**%.2f×**%s" % (mn / md, rng)


def stats_cells(rs):
    sts = [r["st"] for r in rs if r and r["st"]]
    if not sts:
        return ["–"] * 5
    syncs = med(s["syncs"] for s in sts)
    mean_us = med(s["sync_ns"] / s["syncs"] / 1e3 if s["syncs"] else 0 for s in sts)
    asyncs = med(s["atomic_syncs"] for s in sts)
    bps = med(s["bytes_logged"] / s["atomic_syncs"] if s["atomic_syncs"] else 0 for s in sts)
    lines = med(s["lines_written"] for s in sts)
    return [fmt(syncs), fmt(mean_us, 1), fmt(asyncs),
            fmt(bps) if asyncs else "–", fmt(lines)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "target/release/libdaxshim.so"))
    ap.add_argument("--before", default=None,
                    help="another build of the library: its candidates run too")
    ap.add_argument("--quick", action="store_true", help="small counts (smoke check)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dir", default=None,
                    help="parent of the temp directory (default: ROOT/target; must not be tmpfs)")
    ap.add_argument("--no-kc", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    # hidden child mode
    ap.add_argument("--child-sqlite", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    ap.add_argument("--mmap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prepop", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--inserts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--updates", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--selects", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_sqlite:
        sqlite_child(a)
        return 0

    if "LD_PRELOAD" in os.environ:
        print("atomic_bench: run the driver without LD_PRELOAD", file=sys.stderr)
        return 2
    a.lib = os.path.abspath(a.lib)
    if not os.path.isfile(a.lib):
        print("atomic_bench: no library at %s (cargo build --release --workspace)" % a.lib,
              file=sys.stderr)
        return 2
    if a.before is not None:
        a.before = os.path.abspath(a.before)
        if not os.path.isfile(a.before):
            print("atomic_bench: no library at %s (--before)" % a.before, file=sys.stderr)
            return 2
        for cfg in [c for c in SQL_CONFIGS if c[0] == CANDIDATE]:
            SQL_CONFIGS.append((cfg[0] + "-before",) + cfg[1:])
        for cfg in [c for c in KC_CONFIGS if c[0] == KC_CANDIDATE]:
            KC_CONFIGS.append((cfg[0] + "-before",) + cfg[1:])
    if a.dir is None:
        a.dir = os.path.join(ROOT, "target")
    os.makedirs(a.dir, exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", a.dir], capture_output=True,
                            text=True).stdout.strip()
    if fstype == "tmpfs":
        print("atomic_bench: %s is tmpfs; fsync would cost nothing" % a.dir, file=sys.stderr)
        return 2
    if a.quick:
        a.counts = dict(prepop=500, inserts=200, updates=100, selects=2000, kc=300)
    else:
        a.counts = dict(prepop=10000, inserts=2000, updates=1000, selects=20000, kc=4000)
    rounds = a.rounds or (1 if a.quick else 3)
    do_kc = not a.no_kc and shutil.which("kchashtest") is not None
    if not a.no_kc and not do_kc:
        print("atomic_bench: kchashtest missing (apt-get install -y kyotocabinet-utils);"
              " Kyoto Cabinet skipped", file=sys.stderr)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()

    b = Bench(a)
    sql = {c[0]: [None] * rounds for c in SQL_CONFIGS}
    kc = {c[0]: [None] * rounds for c in KC_CONFIGS}
    t_start = time.time()
    try:
        for rnd in range(rounds):
            if not a.no_sqlite:
                order = SQL_CONFIGS[rnd % len(SQL_CONFIGS):] + SQL_CONFIGS[:rnd % len(SQL_CONFIGS)]
                for cfg in order:
                    t0 = time.time()
                    sql[cfg[0]][rnd] = r = b.sqlite_run(cfg, rnd)
                    print("round %d %-20s %s  (%.1f s)" % (
                        rnd + 1, cfg[0], "FAILED" if not r else " ".join(
                            "%s=%.0f/s" % (p, r[p]) for p in PHASES), time.time() - t0),
                        file=sys.stderr, flush=True)
            if do_kc:
                order = KC_CONFIGS[rnd % len(KC_CONFIGS):] + KC_CONFIGS[:rnd % len(KC_CONFIGS)]
                for cfg in order:
                    t0 = time.time()
                    kc[cfg[0]][rnd] = r = b.kc_run(cfg, rnd)
                    print("round %d %-20s %s  (%.1f s)" % (
                        rnd + 1, cfg[0], "FAILED" if not r else "set=%.0f/s" % r["set"],
                        time.time() - t0), file=sys.stderr, flush=True)
    finally:
        b.cleanup()

    q = a.counts
    P = print
    P("# daxshim failure-atomic sync benchmark")
    P()
    if a.before:
        P("before = `%s`" % a.before)
        P()
    P("commit `%s`%s, lib `%s`, SQLite %s (python %s), %s, %d round(s), median; "
      "ratios: median / median (range of per-round ratios); %.0f s total"
      % (commit, " (+uncommitted changes)" if dirty else "", os.path.relpath(a.lib, ROOT)
         if a.lib.startswith(ROOT) else a.lib, sqlite3.sqlite_version,
         sys.version.split()[0], "QUICK counts" if a.quick else "full counts", rounds,
         time.time() - t_start))
    if not a.no_sqlite:
        P()
        P("## SQLite, synchronous=FULL (ops/s, higher is better)")
        P()
        P("%d prepopulated rows; insert = %d single-row INSERT txns (indexed text column); "
          "update = %d txns x 10 random-row UPDATEs; select = %d indexed point selects"
          % (q["prepop"], q["inserts"], q["updates"], q["selects"]))
        P()
        P("| configuration | crash-safe | insert txn/s | update txn/s | select/s | "
          "syncs | mean sync µs | atomic syncs | bytes logged/sync | lines written | MB out |")
        P("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for c in SQL_CONFIGS:
            rs = sql[c[0]]
            P("| %s | %s | %s | %s | %s | %s | %s |" % (
                c[0], c[5], *[fmt(med(r[p] for r in rs if r)) for p in PHASES],
                " | ".join(stats_cells(rs)), fmt(med(r["mb_out"] for r in rs if r), 1)))
        for base in ("pc-delete", "pc-wal"):
            for cand in (CANDIDATE, CANDIDATE + "-mm"):
                P("| **ratio %s / %s** | | %s |" % (cand, base, " | ".join(
                    ratio_cell(sql, rounds, cand, base, p) for p in PHASES)))
        if a.before:
            before = CANDIDATE + "-before"
            for base in ("pc-delete", "pc-wal"):
                P("| **ratio %s / %s** | | %s |" % (before, base, " | ".join(
                    ratio_cell(sql, rounds, before, base, p) for p in PHASES)))
    if do_kc:
        P()
        P("## Kyoto Cabinet, `kchashtest order -set FLAGS path %d` (setting phase)" % q["kc"])
        P()
        P("| configuration | flags | crash-safe | set ops/s | vs %s | syncs | mean sync µs | "
          "atomic syncs | bytes logged/sync | lines written | MB out |" % KC_BASE)
        P("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for c in KC_CONFIGS:
            rs = kc[c[0]]
            P("| %s | `%s` | %s | %s | %s | %s | %s |" % (
                c[0], " ".join(c[3]), c[4], fmt(med(r["set"] for r in rs if r)),
                ratio_cell(kc, rounds, c[0], KC_BASE, "set"),
                " | ".join(stats_cells(rs)), fmt(med(r["mb_out"] for r in rs if r), 1)))
    if b.failures:
        P()
        P("## FAILURES")
        for f in b.failures:
            P()
            P("```")
            P(f)
            P("```")
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main())
