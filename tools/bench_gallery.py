#!/usr/bin/env python3
"""Gallery benchmarks: open, one query, an 8-query batch, memory, for 1k to 1M rows.

Synthetic galleries of random unit vectors (192-d, 4 rows per identity) are written once into
``--dir`` (default: a temporary directory, removed afterwards), then each size and storage type
is measured in a fresh subprocess so that its resident memory is its own:

- open: ``Gallery.open(verify=False)`` (the header and section checks; the matrix is not
  read), median of 50; and the full validation (``verify=True``: body sha256 and every row),
  once, with the file in the page cache;
- one query / 8 queries: ``Gallery.search(q, k=5)`` (scan, best row per identity, top 5),
  median and best of repeated calls (2 s or at least 5) after one warm-up call; the load
  average is recorded with them, since other work on the machine inflates the median;
- RSS: the process's resident memory after the scans (VmRSS; RssFile is the mapped gallery).

Prints a markdown table (for docs/benchmarks.md) and optionally JSON.

    .venv/bin/python tools/bench_gallery.py [--sizes 1000,10000,100000,1000000]
        [--dtypes float32,float16] [--threads 2] [--blas-threads N] [--no-ext] [--dir DIR]
        [--json FILE]
    .venv/bin/python tools/bench_gallery.py --reference   # bare numpy X @ q, the machine's floor
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.gallery import Gallery, MatchSettings, scan_kernel, write_gallery  # noqa: E402

SHA = "0" * 64
DIM = 192
PER = 4


def rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def make(path: Path, rows: int, dtype: str) -> None:
    rng = np.random.default_rng(rows)
    emb = np.empty((rows, DIM), np.float32)
    for s in range(0, rows, 100_000):  # in pieces: keeps the peak memory down
        e = min(rows, s + 100_000)
        emb[s:e] = rng.standard_normal((e - s, DIM), dtype=np.float32)
    n_id = rows // PER
    ids = [(f"id{j}", f"person {j}") for j in range(n_id)]
    write_gallery(path, ids, np.arange(rows) // PER, emb, SHA, dtype=dtype)


def timings(fn, min_reps=5, budget=2.0) -> tuple:
    """(median, best) seconds of repeated calls after a warm-up call."""
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def reference(rows: int = 1_000_000, dims=(128, DIM), calls: int = 40) -> None:
    """The machine's own floor, no gallery code: a bare numpy ``X @ q`` over an in-memory
    ``rows x dim`` float32 array (the issue's reference is 1M x 128), median and best."""
    rng = np.random.default_rng(0)
    for dim in dims:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        q = rng.standard_normal(dim, dtype=np.float32)
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            x @ q
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"bare numpy X @ q, {rows:,} x {dim} float32: median {ts[len(ts) // 2] * 1e3:.1f} "
              f"ms (best {ts[0] * 1e3:.1f}), {calls} calls")
        del x


def measure(path: Path, threads: int) -> dict:
    before = rss()
    opens = []
    for _ in range(50):
        t = time.perf_counter()
        g = Gallery.open(path, verify=False, threads=threads)
        opens.append(time.perf_counter() - t)
        g.close()
    t = time.perf_counter()
    g = Gallery.open(path, verify=True, threads=threads)
    t_verify = time.perf_counter() - t
    g.close()
    g = Gallery.open(path, verify=False, threads=threads)
    rng = np.random.default_rng(7)
    q1 = rng.standard_normal((1, DIM)).astype(np.float32)
    q8 = rng.standard_normal((8, DIM)).astype(np.float32)
    load0 = os.getloadavg()[0]
    t1, b1 = timings(lambda: g.search(q1, 5))
    t8, b8 = timings(lambda: g.search(q8, 5))
    after = rss()
    res = {"rows": g.rows, "identities": g.n_identities, "dtype": g.dtype_name,
           "file_mib": round(path.stat().st_size / 2 ** 20, 1), "threads": threads,
           "open_ms": round(float(np.median(opens)) * 1e3, 4),
           "verify_ms": round(t_verify * 1e3, 1),
           "query1_ms": round(t1 * 1e3, 3), "query8_ms": round(t8 * 1e3, 3),
           "query1_best_ms": round(b1 * 1e3, 3), "query8_best_ms": round(b8 * 1e3, 3),
           "query8_per_query_ms": round(t8 * 1e3 / 8, 3),
           "load_avg": round(max(load0, os.getloadavg()[0]), 2),
           "rss_mib": round(after["VmRSS"], 1), "rss_file_mib": round(after.get("RssFile", 0), 1),
           "rss_before_mib": round(before["VmRSS"], 1)}
    g.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--threads", type=int, default=MatchSettings().threads,
                    help="Gallery threads option (default: match.threads' default)")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OPENBLAS_NUM_THREADS for the measuring processes (default: numpy's)")
    ap.add_argument("--dir", type=Path, default=None, help="keep the synthetic galleries here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-ext", action="store_true",
                    help="without edged.gallery._scan: float16 widened per block (the fallback path)")
    ap.add_argument("--reference", action="store_true",
                    help="only the bare numpy X @ q over 1M x 128 and 1M x 192 float32")
    ap.add_argument("--one", nargs=2, metavar=("FILE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.no_ext:
        import edged.gallery.search
        edged.gallery.search._scan_ext = None
    if args.reference:
        reference()
        return 0
    if args.one:
        print(json.dumps({**measure(Path(args.one[0]), int(args.one[1])),
                          "scan": scan_kernel()}))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    work = args.dir or Path(tempfile.mkdtemp(prefix="edged-bench-gallery-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sizes:
            for dt in dtypes:
                path = work / f"bench-{n}-{dt}.edgal"
                if not path.exists():
                    t = time.perf_counter()
                    make(path, n, dt)
                    print(f"wrote {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                env = dict(os.environ)
                if args.blas_threads:
                    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.blas_threads)
                out = subprocess.run([sys.executable, __file__, "--one", str(path),
                                      str(args.threads)] + (["--no-ext"] if args.no_ext else []),
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                r = json.loads(out.stdout)
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
                if args.dir is None:
                    path.unlink()
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(),
                                         "machine": platform.machine(), "cpus": os.cpu_count(),
                                         "numpy": np.__version__, "results": results}, indent=2))
    print(f"threads {args.threads}, OPENBLAS_NUM_THREADS {args.blas_threads or 'unset'}, "
          f"float16 scan: {results[0]['scan'] if results else '?'}")
    print("| rows | dtype | file MiB | open ms | full check ms | 1 query ms: median (best) | "
          "8 queries ms: median (best) | RSS MiB (mapped file) | load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['dtype']} | {r['file_mib']} | {r['open_ms']:.3f} | "
              f"{r['verify_ms']:.0f} | {r['query1_ms']:.2f} ({r['query1_best_ms']:.2f}) | "
              f"{r['query8_ms']:.2f} ({r['query8_best_ms']:.2f}) | {r['rss_mib']:.0f} "
              f"({r['rss_file_mib']:.0f}) | {r['load_avg']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
