"""Commits numbered LMDB transactions (writemap=True: pages are written
through a shared read-write mapping; sync=True: msync + fdatasync at each
commit) and acknowledges each on stdout once commit() returned.

    lmdb_writer.py DBDIR PREFIX [N]    write until killed, or N transactions
    lmdb_writer.py --check DBDIR PREFIX ACKED
"""
import sys

import lmdb


def payload(prefix, i):
    return (b"%s-%d|" % (prefix, i)) * (1 + i % 97)


def main():
    if sys.argv[1] == "--check":
        path, prefix, acked = sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
        env = lmdb.open(path, map_size=256 << 20, writemap=True, readonly=True, lock=False)
        with env.begin() as txn:
            counter = int(txn.get(prefix + b"-counter", b"0"))
            for i in range(1, counter + 1):
                v = txn.get(b"%s-%08d" % (prefix, i))
                if v != payload(prefix, i):
                    sys.exit("%s: row %d wrong or missing" % (prefix.decode(), i))
            if txn.get(b"%s-%08d" % (prefix, counter + 1)) is not None:
                sys.exit("torn transaction after %d" % counter)
        if counter < acked:
            sys.exit("lost acknowledged transactions: %d acknowledged, %d present" % (acked, counter))
        print("ok", counter)
        return
    path, prefix = sys.argv[1], sys.argv[2].encode()
    n = int(sys.argv[3]) if len(sys.argv) > 3 else None
    env = lmdb.open(path, map_size=256 << 20, writemap=True, sync=True, metasync=True)
    with env.begin() as txn:
        i = int(txn.get(prefix + b"-counter", b"0"))
    done = 0
    while n is None or done < n:
        i += 1
        with env.begin(write=True) as txn:
            txn.put(b"%s-%08d" % (prefix, i), payload(prefix, i))
            txn.put(prefix + b"-counter", b"%d" % i)
        print(i, flush=True)
        done += 1


main()
