#!/usr/bin/env python3
"""Peak resident memory of the face pipeline on one large photo (what enrolling it costs).

A real photo of two people (``../shared/faces/multi_face/facerec_two_people.jpg``) is scaled
up to each size, then detected (all three MTCNN stages, pipeline defaults: minimum face 40 px)
in a fresh process, which reports its faces, the time and its peak resident memory
(``ru_maxrss``: interpreters, pyramid and the photo itself).

    .venv/bin/python tools/bench_photo_memory.py [--sizes 4000x3000,8160x6120] [--models DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "faces" / "multi_face" / "facerec_two_people.jpg"


def one(width: int, height: int, models) -> dict:
    sys.path.insert(0, str(ROOT))
    import cv2

    from edged.vision.imageio import load_image
    from edged.vision.pipeline import FacePipeline

    big = cv2.resize(load_image(PHOTO), (width, height), interpolation=cv2.INTER_CUBIC)
    pipe = FacePipeline.from_models(models)
    t = time.perf_counter()
    faces = pipe.detect(big)
    dt = time.perf_counter() - t
    return {"width": width, "height": height, "faces": len(faces), "seconds": round(dt, 2),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4000x3000,8160x6120")
    ap.add_argument("--models", default=None)
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.models)))
        return 0
    print("| photo | MP | faces | detect s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        cmd = [sys.executable, __file__, "--one", str(w), str(h)]
        if args.models:
            cmd += ["--models", args.models]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                      text=True).stdout.splitlines()[-1])
        print(f"| {w}x{h} | {w * h / 1e6:.0f} | {r['faces']} | {r['seconds']} | "
              f"{r['max_rss_mib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
