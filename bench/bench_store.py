"""How the feature store scales: append cost as it grows, memory, random reads, a new run's lookup.

    python bench/bench_store.py [--rows 200000] [--dim 1280] [--batch 1000] [--dir DIR]

Appends `rows` synthetic float16 rows of `dim` numbers in batches of `batch` (each batch a new
shard, as a feature pass writes its pieces; compaction after every 10, as at the end of a pass),
then, as a new run would: opens the store and looks up the digests of a new run (half stored, half
new), verifies and memory-maps what it needs, and reads random training batches through
`FeatureSet`. Prints per tenth of the appends the time per row (flat: no rewrite of old rows),
the peak resident memory of each phase (anonymous memory bounded by a batch; mapped file pages
are the kernel's page cache, given back under pressure), and the read and lookup rates.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flower_classifier import shards  # noqa: E402
from flower_classifier.feature_store import Rows  # noqa: E402
from flower_classifier.features import FeatureSet  # noqa: E402


def memory() -> dict[str, float]:
    """Peak and current resident memory (MB) of this process, from /proc (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def digest(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--batch", type=int, default=1000, help="rows per append (one shard each)")
    p.add_argument("--read_batch", type=int, default=256)
    p.add_argument("--reads", type=int, default=2000, help="random batches read")
    p.add_argument("--dir", help="where the store goes (default: a temporary folder, removed after)")
    args = p.parse_args()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_store_"))
    folder = root / "store"
    rng = np.random.default_rng(0)
    base = memory()  # Python, numpy and torch loaded: what any run costs before the store
    try:
        # ---------------------------------------------------------------- appends
        store = shards.ShardStore(folder, args.dim, np.float16)
        reset_peak()
        tenths, done, tenth_rows, tenth_time, tenth_cpu, compact_time = [], 0, 0, 0.0, 0.0, 0.0
        appends = 0
        while done < args.rows:
            n = min(args.batch, args.rows - done)
            rows = rng.standard_normal((n, args.dim), dtype=np.float32).astype(np.float16)
            start, cpu = time.perf_counter(), time.process_time()
            store.append([digest(done + k) for k in range(n)], rows)
            appends += 1
            if appends % 10 == 0:
                t = time.perf_counter()
                store.compact()
                compact_time += time.perf_counter() - t
            tenth_time += time.perf_counter() - start
            tenth_cpu += time.process_time() - cpu
            done += n
            tenth_rows += n
            if tenth_rows >= args.rows // 10 or done == args.rows:
                tenths.append((done, tenth_time / tenth_rows * 1e6, tenth_cpu / tenth_rows * 1e6))
                tenth_rows, tenth_time, tenth_cpu = 0, 0.0, 0.0
        append_mem = memory()
        disk = sum(f.stat().st_size for f in folder.iterdir())
        shards_left = len(list(folder.glob("*.npy")))
        del store

        # ---------------------------------------------------------------- a new run: lookup
        reset_peak()
        new_run = [digest(i) for i in rng.choice(args.rows, 5000, replace=False)] + \
                  [digest(args.rows + i) for i in range(5000)]
        start = time.perf_counter()
        reader = shards.ShardStore(folder, args.dim, np.float16)
        reader._scan()
        index_time = time.perf_counter() - start
        start = time.perf_counter()
        arrays, source, row = reader.lookup(new_run)
        lookup_time = time.perf_counter() - start  # includes verifying every shard it needs (checksums)
        found = int((source >= 0).sum())
        start = time.perf_counter()
        reader.lookup(new_run)
        warm_lookup_time = time.perf_counter() - start  # the shards already verified: index and lookup only

        # ---------------------------------------------------------------- random training batches
        everything = [digest(i) for i in range(args.rows)]
        arrays, source, row = reader.lookup(everything)
        data = FeatureSet(Rows(arrays, source, row, args.dim), torch.zeros(args.rows, dtype=torch.int64))
        start = time.perf_counter()
        for _ in range(args.reads):
            x, _ = data.__getitems__(rng.integers(0, args.rows, args.read_batch).tolist())
        read_time = time.perf_counter() - start
        read_mem = memory()
        check = rng.integers(0, args.rows, 8)
        ok = all(np.array_equal(np.asarray(arrays[source[i]][row[i]]), data.rows.take([i])[0]) for i in check)

        print(f"Feature store: {args.rows:,} rows of {args.dim} float16 numbers appended in batches of "
              f"{args.batch:,} ({appends} shards written, {shards_left} after compaction; "
              f"{disk / 2**20:,.0f} MB on disk)")
        print("| rows stored | append wall time per row (us, this tenth) | CPU time per row (us) |")
        print("|---:|---:|---:|")
        for rows_so_far, us, cpu_us in tenths:
            print(f"| {rows_so_far:,} | {us:.1f} | {cpu_us:.1f} |")
        print(f"last tenth / first tenth: wall {tenths[-1][1] / tenths[0][1]:.2f}, CPU {tenths[-1][2] / tenths[0][2]:.2f} "
              f"(compaction included: {compact_time:.1f} s; wall time also holds fsync and other jobs' load)")
        print(f"resident memory before the store (Python, numpy, torch loaded): {base['VmRSS']:.0f} MB "
              f"({base['RssAnon']:.0f} MB anonymous + {base['RssFile']:.0f} MB mapped files, mostly torch's libraries)")
        print(f"peak resident memory while appending: {append_mem['VmHWM']:.0f} MB, "
              f"+{append_mem['VmHWM'] - base['VmRSS']:.0f} MB over that "
              f"(now {append_mem['RssAnon']:.0f} MB anonymous + {append_mem['RssFile']:.0f} MB mapped files)")
        print(f"a new run's lookup of 10,000 digests (5,000 stored): index of {args.rows:,} rows read in "
              f"{index_time * 1e3:.0f} ms, lookup and verification of the shards it needs {lookup_time:.2f} s "
              f"({found:,} found); the same lookup once verified: {warm_lookup_time * 1e3:.0f} ms")
        print(f"random batches of {args.read_batch} rows through FeatureSet: {args.reads * args.read_batch / read_time:,.0f} "
              f"rows/s ({args.reads / read_time:,.0f} batches/s); rows read back equal: {ok}")
        print(f"peak resident memory while looking up and reading: {read_mem['VmHWM']:.0f} MB, "
              f"+{read_mem['VmHWM'] - base['VmRSS']:.0f} MB over the start "
              f"({read_mem['RssAnon']:.0f} MB anonymous + {read_mem['RssFile']:.0f} MB mapped files: the "
              f"store pages read are the kernel's page cache, given back under memory pressure)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
