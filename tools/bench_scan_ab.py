#!/usr/bin/env python3
"""Interleaved A/B of the float16 scan's two ways with one query (x86): each group of rows
widened in registers straight into the products (the kernel), against widened into the L1
buffer first (the way several queries take).

Builds ``edged/gallery/_scan.c`` twice in a temporary directory (the second with
``-DEDGED_ONE_QUERY_IN_REGISTERS=0``), loads both in this process, checks that they give the
same scores, then times ``scan_f16_best`` on random 192-d float16 rows, 4 per identity, the
rows split over the threads as ``Gallery.search`` splits them, alternating the two builds call
by call; median (best) of ``--calls`` each.

    .venv/bin/python tools/bench_scan_ab.py [--calls 30] [--cc cc]
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (rows, threads, queries)
CASES = [(1_000_000, 2, 1), (1_000_000, 1, 1), (100_000, 2, 1), (20_000, 1, 1),
         (1_000_000, 2, 8)]


def build(cc: str, out: Path, defines=()) -> object:
    out.mkdir(parents=True)
    so = out / ("_scan" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cc, "-O3", "-shared", "-fPIC", *defines,
                    "-I" + sysconfig.get_paths()["include"], "-o", str(so),
                    str(ROOT / "edged" / "gallery" / "_scan.c")], check=True)
    spec = importlib.util.spec_from_file_location("_scan", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--cc", default=shutil.which("cc") or shutil.which("gcc"))
    args = ap.parse_args(argv)
    if not args.cc:
        print("no C compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edged-scan-ab-") as tmp:
        a = build(args.cc, Path(tmp) / "registers")
        b = build(args.cc, Path(tmp) / "buffer", ["-DEDGED_ONE_QUERY_IN_REGISTERS=0"])
        print(f"kernel: {a.KERNEL}")
        print("| case | in registers (the kernel) ms | buffer ms |")
        print("|---|---:|---:|")
        rng = np.random.default_rng(0)
        for rows, threads, nq in CASES:
            m = rng.standard_normal((rows, 192), dtype=np.float32)
            m /= np.linalg.norm(m, axis=1, keepdims=True)
            m = m.astype(np.float16)
            q = rng.standard_normal((nq, 192), dtype=np.float32)
            starts = np.arange(0, rows + 1, 4, dtype=np.uint64)
            parts = np.array_split(np.arange(rows // 4), threads)
            pool = ThreadPoolExecutor(threads)

            def run(mod):
                outs, futs = [], []
                for p in parts:
                    o = np.empty((len(p), nq), np.float32)
                    futs.append(pool.submit(mod.scan_f16_best, m[int(p[0]) * 4:int(p[-1] + 1) * 4],
                                            q, starts[p[0]:p[-1] + 2].copy(), o))
                    outs.append(o)
                for f in futs:
                    f.result()
                return np.concatenate(outs)

            if not np.array_equal(run(a), run(b)):
                print(f"{rows} rows: the two builds disagree", file=sys.stderr)
            ta, tb = [], []
            for i in range(args.calls):
                for mod, t in ((a, ta), (b, tb)) if i % 2 else ((b, tb), (a, ta)):
                    t0 = time.perf_counter()
                    run(mod)
                    t.append((time.perf_counter() - t0) * 1e3)
            pool.shutdown()
            print(f"| {rows:,} rows, {nq} quer{'y' if nq == 1 else 'ies'}, {threads} "
                  f"thread{'s' if threads > 1 else ''} | {np.median(ta):.2f} ({min(ta):.2f}) "
                  f"| {np.median(tb):.2f} ({min(tb):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
