#!/usr/bin/env python3
"""Benchmark of the face pipeline on 640 x 480 frames made from real video clips.

Frames come from the clips in ../shared/videos (every ``--step``-th frame), letterboxed to
640 x 480 (scaled to fit, black bars; faces keep their shape).  For 1 and 2 threads (the
TFLite interpreters' ``num_threads`` and OpenCV's thread count), it times per frame:

- detection (MTCNN, all three stages, default settings: minimum face 40 px),
- alignment per face (similarity fit + warpAffine to 112 x 112),
- quality per face (Laplacian variance + pose),
- embedding per face (``--embedder``, MobileFaceNet by default; each frame's faces in one
  batch, time / faces),
- the whole frame (``FacePipeline.process``: all of the above),

and prints median and p90 as a markdown table.  When the ``face_recognition`` package is
importable, it times ``face_locations`` + ``face_encodings`` on the same frames too.

    .venv/bin/python tools/bench_pipeline.py [--step 3] [--threads 1 2] [--models DIR]
        [--embedder mobilefacenet|sface]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.vision.align import align_face  # noqa: E402
from edged.vision.detect import MtcnnDetector  # noqa: E402
from edged.vision.embed import Embedder  # noqa: E402
from edged.vision.pipeline import FacePipeline, PipelineSettings  # noqa: E402
from edged.vision.quality import assess  # noqa: E402


def letterbox(frame: np.ndarray, w: int = 640, h: int = 480) -> np.ndarray:
    fh, fw = frame.shape[:2]
    s = min(w / fw, h / fh)
    nw, nh = int(round(fw * s)), int(round(fh * s))
    out = np.zeros((h, w, 3), np.uint8)
    x0, y0 = (w - nw) // 2, (h - nh) // 2
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out[y0:y0 + nh, x0:x0 + nw] = cv2.resize(frame, (nw, nh), interpolation=interp)
    return out


def load_frames(video_dir: Path, step: int) -> list:
    frames = []
    for clip in sorted(video_dir.glob("*.mp4")):
        cap = cv2.VideoCapture(str(clip))
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                frames.append((clip.name, i, letterbox(frame)))
            i += 1
        cap.release()
    return frames


def stats(ms: list) -> str:
    if not ms:
        return "n/a | n/a"
    return f"{np.median(ms):.2f} | {np.percentile(ms, 90):.2f}"


def bench(frames, threads: int, models, embedder=None) -> dict:
    cv2.setNumThreads(threads)
    accel = {"type": "cpu", "num_threads": threads}
    settings = PipelineSettings()
    pipe = FacePipeline(MtcnnDetector.from_models(models, settings.detection, accel),
                        Embedder.from_models(models, accel, name=embedder), settings)
    det, emb, q = pipe.detector, pipe.embedder, pipe.settings.quality
    for _, _, f in frames[:5]:  # warm-up: interpreters for this frame size, batch sizes
        pipe.process(f)
    emb.embed([np.zeros((112, 112, 3), np.uint8)])
    keys = ("detect", "align", "quality", "embed", "embed1", "frame")
    t = {k: [] for k in keys}
    c = {k: [] for k in keys}  # CPU time of this thread (with 1 thread: the work itself)
    t["faces"] = []

    def clock():
        return time.perf_counter(), time.thread_time()

    def add(key, start, div=1):
        w, cpu = clock()
        t[key].append((w - start[0]) * 1e3 / div)
        c[key].append((cpu - start[1]) * 1e3 / div)

    for _, _, f in frames:
        s0 = clock()
        faces = det.detect(f)
        add("detect", s0)
        t["faces"].append(len(faces))
        aligned = []
        for face in faces:
            s0 = clock()
            a = align_face(f, face.landmarks)
            add("align", s0)
            s0 = clock()
            assess(face, a, q)
            add("quality", s0)
            aligned.append(a)
        if aligned:
            s0 = clock()
            emb.embed(aligned)
            add("embed", s0, len(aligned))
            s0 = clock()
            emb.embed(aligned[:1])
            add("embed1", s0)
        s0 = clock()
        pipe.process(f)
        add("frame", s0)
    one = [i for i, n in enumerate(t["faces"]) if n == 1]
    t["frame1"] = [t["frame"][i] for i in one]
    c["frame1"] = [c["frame"][i] for i in one]
    t["cpu"] = c
    return t


def bench_face_recognition(frames) -> dict:
    import face_recognition  # noqa: F401  (optional; dlib based)

    out = {"frame": []}
    for _, _, f in frames:
        rgb = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
        t0 = time.perf_counter()
        locs = face_recognition.face_locations(rgb)
        face_recognition.face_encodings(rgb, locs)
        out["frame"].append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", default=str(ROOT.parent / "shared" / "videos"))
    ap.add_argument("--step", type=int, default=3, help="use every STEP-th frame (default 3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", default=None)
    ap.add_argument("--embedder", default=None, metavar="NAME",
                    help="the embedder to time (mobilefacenet, sface; default the manifest's)")
    args = ap.parse_args(argv)

    frames = load_frames(Path(args.videos), args.step)
    if not frames:
        print(f"no frames read from {args.videos}", file=sys.stderr)
        return 1
    clips = sorted({c for c, _, _ in frames})
    results = {n: bench(frames, n, args.models, args.embedder) for n in args.threads}

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"Embedder: {args.embedder or 'the default (mobilefacenet)'}.")
    print(f"{len(frames)} frames of 640x480 (every {args.step}th frame of {', '.join(clips)}, "
          f"letterboxed); {datetime.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, "
          f"{os.cpu_count()} cores; load average before the run's end "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    first = results[args.threads[0]]
    n_faces = sum(first["faces"])
    print(f"Faces per frame: mean {np.mean(first['faces']):.2f}, {n_faces} in all; "
          f"frames without a face: {sum(1 for n in first['faces'] if n == 0)}\n")
    head = " | ".join(f"{n} thread{'s' if n > 1 else ''}: median | p90" for n in args.threads)
    print(f"| stage (ms) | {head} |")
    print("|---|" + "---|---|" * len(args.threads))
    rows = [("detection per frame (MTCNN)", "detect"), ("alignment per face", "align"),
            ("quality per face", "quality"), ("embedding per face (frame's faces in one batch)", "embed"),
            ("embedding of one face (batch 1)", "embed1"),
            ("whole frame: detect + align + quality + embed", "frame"),
            ("whole frame, frames with exactly one face", "frame1")]
    for label, key in rows:
        print(f"| {label} | " + " | ".join(stats(results[n][key]) for n in args.threads) + " |")
    print("\nCPU time of the calling thread for the same work (with 1 thread all inference runs in "
          "it, so this is the cost without waiting for a core shared with other processes; with "
          "2 threads the second thread's work is not counted):\n")
    print(f"| stage (CPU ms) | {head} |")
    print("|---|" + "---|---|" * len(args.threads))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(stats(results[n]["cpu"][key]) for n in args.threads) + " |")
    try:
        fr = bench_face_recognition(frames)
        print(f"| face_recognition (dlib HOG + encodings), whole frame | {stats(fr['frame'])} | |")
    except ImportError:
        print("\nface_recognition is not installed: not timed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
