#!/usr/bin/env python3
"""Float32 and int8 variants of edged's models side by side, in one run on this machine.

The int8 sets are those ``edged models quantize`` wrote (``--sets DIR``: every
``DIR/<recipe>/manifest.json``; each file is checked against its manifest's sha256).  For the
float models and each set it measures:

- **detection** (MTCNN of the set, float embedder): faces found on the group photos of
  ``faces/multi_face`` (faces.csv) and on frames of the shared clips that calibration did not
  use, and how many of the float detector's faces it finds again (box IoU >= 0.5);
- **embedding** (embedder of the set, on the float detector's aligned dev faces): cosine to
  the float embedding, median and 1st percentile;
- **end to end** (the set's four nets): pair AUC and best accuracy on ``faces/dev/pairs.csv``,
  rank-1 and correct identification at 1 % and 0.1 % strangers (the protocol of
  tools/eval_identification.py: 2 enrolment photos per person with >= 3, the rest probes,
  strangers = unknown/ and people with fewer than 3), also with the set's MTCNN and the float
  embedder;
- **time**: ms per 640x480 detection and per face embedded (the frame's faces in one batch, and
  one face alone), on 1 and 2 threads, median over letterboxed clip frames; with 1 thread also
  the CPU time of the calling thread (unaffected by other processes on the machine).

The dev-set people the calibration used (``quantization.calibration.dev_people`` in the
manifests) are left out of every accuracy figure, for float and int8 alike.

    .venv/bin/python tools/bench_int8.py [--sets int8-models] [--shared ../shared]
        [--threads 1 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_pipeline import letterbox  # noqa: E402
from eval_identification import list_people, threshold_at_far  # noqa: E402
from eval_verification import best_threshold, roc_auc  # noqa: E402

from edged.runtime import modelstore  # noqa: E402
from edged.vision.align import align_face  # noqa: E402
from edged.vision.detect import MtcnnDetector  # noqa: E402
from edged.vision.embed import Embedder  # noqa: E402
from edged.gallery import Gallery, write_gallery  # noqa: E402
from edged.vision.imageio import ImageError, load_image  # noqa: E402
from edged.vision.pipeline import central_face  # noqa: E402
from edged.runtime.quantize import ROLES, person_of  # noqa: E402


# ---------------------------------------------------------------------------- model sets


def load_sets(sets_dir: Path, models_dir) -> tuple:
    """``({name: {role: bytes}}, calibration descriptions)``: float first, then each set."""
    out = {"float32": {r: modelstore.read_verified(r, models_dir)[0] for r in ROLES}}
    cals = []
    for mpath in sorted(sets_dir.glob("*/manifest.json")):
        m = modelstore.Manifest.load(mpath)
        blobs = {}
        for role in ROLES:
            e = m[role]
            data = (mpath.parent / e.file).read_bytes()
            modelstore.check_blob(data, e.sha256, mpath.parent / e.file, e.size)
            blobs[role] = data
        out[mpath.parent.name] = blobs
        cals.append(m.data.get("quantization", {}).get("calibration", {}))
    return out, cals


def detector(blobs: dict, threads: int = 1) -> MtcnnDetector:
    return MtcnnDetector(blobs["pnet"], blobs["rnet"], blobs["onet"],
                         accel={"type": "cpu", "num_threads": threads})


def embedder(blobs: dict, threads: int = 1) -> Embedder:
    data = blobs["embedder"]
    return Embedder(data, modelstore.sha256_bytes(data), {"type": "cpu", "num_threads": threads})


# ---------------------------------------------------------------------------- detection


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched(ref: list, got: list) -> int:
    """Faces of ``ref`` with a face of ``got`` at IoU >= 0.5 (greedy, each used once)."""
    used, n = set(), 0
    for f in ref:
        best = max(((iou(f.box, g.box), j) for j, g in enumerate(got) if j not in used),
                   default=(0.0, -1))
        if best[0] >= 0.5:
            used.add(best[1])
            n += 1
    return n


def detection_images(shared: Path, cals: list) -> dict:
    """``{"group photos": [...], "clip frames": [...]}`` of BGR images (calibration frames out)."""
    group = []
    with open(shared / "faces" / "multi_face" / "faces.csv", newline="") as f:
        for row in csv.DictReader(f):
            try:
                group.append(load_image(shared / "faces" / "multi_face" / row["file"]))
            except ImageError:
                continue
    used = {}
    for c in cals:
        for clip, idx in c.get("clip_frames", {}).items():
            used.setdefault(clip, set()).update(idx)
    frames = []
    for clip in sorted((shared / "videos").glob("*.mp4")):
        cap, i = cv2.VideoCapture(str(clip)), 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % 15 == 7 and i not in used.get(clip.name, ()):
                frames.append(frame)
            i += 1
        cap.release()
    return {"group photos": group, "clip frames": frames}


def detection_agreement(images: dict, ref_faces: dict, det: MtcnnDetector) -> dict:
    out = {}
    for kind, imgs in images.items():
        got = [det.detect(img) for img in imgs]
        ref = ref_faces[kind]
        out[kind] = {"images": len(imgs), "faces": sum(map(len, got)),
                     "float_faces": sum(map(len, ref)),
                     "float_faces_found": sum(matched(r, g) for r, g in zip(ref, got)),
                     "same_count": sum(len(r) == len(g) for r, g in zip(ref, got))}
    return out


# ---------------------------------------------------------------------------- dev set


def dev_split(dev: Path, excluded: set) -> tuple:
    """``(people {name: [paths]}, strangers [paths])`` without the calibration people."""
    people = list_people(dev)
    unknown = [p for p in people.pop("unknown", []) if person_of(p) not in excluded]
    people = {k: v for k, v in people.items() if k not in excluded}
    return people, unknown


def central_crops(paths: list, det: MtcnnDetector) -> dict:
    """``{str(path): aligned 112x112 crop or None}``: the face nearest each image's centre."""
    out = {}
    for p in paths:
        try:
            img = load_image(p)
        except ImageError:
            out[str(p)] = None
            continue
        face = central_face(det.detect(img), img.shape)
        out[str(p)] = None if face is None else align_face(img, face.landmarks)
    return out


def embed_crops(crops: dict, emb: Embedder) -> dict:
    keys = [k for k, v in crops.items() if v is not None]
    out = {k: None for k in crops}
    for i in range(0, len(keys), 8):
        chunk = keys[i:i + 8]
        for k, e in zip(chunk, emb.embed([crops[k] for k in chunk])):
            out[k] = e
    return out


def pairs_metrics(pairs: list, emb: dict) -> dict:
    labels = np.array([s for _, _, s in pairs])
    scores = np.array([float(emb[a] @ emb[b]) if emb.get(a) is not None and emb.get(b) is not None
                       else -1.0 for a, b, _ in pairs])
    thr, acc, _ = best_threshold(scores, labels)
    return {"pairs": len(pairs), "auc": roc_auc(scores, labels), "accuracy": acc, "threshold": thr}


def identification(people: dict, unknown: list, emb: dict, sha: str) -> dict:
    """Rank-1 and correct identification at 1 % / 0.1 % strangers (eval_identification.py)."""
    enrolled, probes, strangers, names = [], [], [], []
    for person, imgs in people.items():
        if len(imgs) < 3:
            strangers += imgs
            continue
        enrol = [p for p in imgs if emb[str(p)] is not None][:2]
        if not enrol:
            continue
        names.append(person)
        enrolled += [(person, p) for p in enrol]
        probes += [(person, p) for p in imgs if p not in enrol]
    strangers += unknown
    index = {n: j for j, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.edgal"
        write_gallery(path, [(n, n) for n in names], [index[n] for n, _ in enrolled],
                      np.stack([emb[str(p)] for _, p in enrolled]), sha)
        with Gallery.open(path, expect_embedder=sha) as g:
            def best(paths):
                have = [p for p in paths if emb[str(p)] is not None]
                found = g.search(np.stack([emb[str(p)] for p in have]), k=1) if have else []
                top = {str(p): (f[0][0], f[0][2]) for p, f in zip(have, found)}
                return [top.get(str(p), (None, -1.0)) for p in paths]
            pr = best([p for _, p in probes])
            st = best(strangers)
    correct = np.array([t == person for (person, _), (t, _) in zip(probes, pr)])
    score = np.array([s for _, s in pr])
    s_score = np.array([s for t, s in st if t is not None])

    def at(far: float) -> float:
        t = threshold_at_far(s_score, far)
        return float((correct & (score >= t)).mean())

    return {"people": len(names), "probes": len(probes), "strangers": len(strangers),
            "rank1": float(correct.mean()), "at_1pct": at(0.01), "at_0.1pct": at(0.001)}


def cosine_to_float(ref: dict, got: dict) -> dict:
    c = np.array([float(ref[k] @ got[k]) for k in ref if ref[k] is not None and got.get(k) is not None])
    return {"faces": int(len(c)), "median": float(np.median(c)), "p1": float(np.percentile(c, 1)),
            "min": float(c.min())}


# ---------------------------------------------------------------------------- time


def timing(blobs: dict, frames: list, threads: int) -> dict:
    cv2.setNumThreads(threads)
    det, emb = detector(blobs, threads), embedder(blobs, threads)
    for f in frames[:3]:
        det.detect(f)
    t = {"detect": [], "detect_cpu": [], "embed": [], "embed1": [], "embed_cpu": []}
    for f in frames:
        w, c = time.perf_counter(), time.thread_time()
        faces = det.detect(f)
        t["detect"].append((time.perf_counter() - w) * 1e3)
        t["detect_cpu"].append((time.thread_time() - c) * 1e3)
        crops = [align_face(f, x.landmarks) for x in faces]
        if not crops:
            continue
        emb.embed(crops)  # the batch's interpreter, once
        w, c = time.perf_counter(), time.thread_time()
        emb.embed(crops)
        t["embed"].append((time.perf_counter() - w) * 1e3 / len(crops))
        t["embed_cpu"].append((time.thread_time() - c) * 1e3 / len(crops))
        w = time.perf_counter()
        emb.embed(crops[:1])
        t["embed1"].append((time.perf_counter() - w) * 1e3)
    return {k: float(np.median(v)) if v else float("nan") for k, v in t.items()}


# ---------------------------------------------------------------------------- main


def measure(sets: dict, cals: list, shared: Path, threads: list, timing_frames: list) -> dict:
    excluded = {p for c in cals for p in c.get("dev_people", [])}
    dev = shared / "faces" / "dev"
    people, unknown = dev_split(dev, excluded)
    paths = [p for v in people.values() for p in v] + unknown
    with open(dev / "pairs.csv", newline="") as f:
        pairs = [(str(dev / r["img_a"]), str(dev / r["img_b"]), int(r["same"]))
                 for r in csv.DictReader(f)]
    pairs = [(a, b, s) for a, b, s in pairs
             if person_of(Path(a)) not in excluded and person_of(Path(b)) not in excluded]
    pair_paths = sorted({p for a, b, _ in pairs for p in (a, b)} - {str(p) for p in paths})
    paths += [Path(p) for p in pair_paths]
    images = detection_images(shared, cals)
    float_det = detector(sets["float32"])
    ref_faces = {k: [float_det.detect(i) for i in v] for k, v in images.items()}
    float_crops = central_crops(paths, float_det)
    float_emb = embedder(sets["float32"])
    ref_emb = embed_crops(float_crops, float_emb)
    res = {}
    for name, blobs in sets.items():
        t0 = time.monotonic()
        det = float_det if name == "float32" else detector(blobs)
        emb = float_emb if name == "float32" else embedder(blobs)
        crops = float_crops if name == "float32" else central_crops(paths, det)
        own = embed_crops(crops, emb)
        det_only = embed_crops(crops, float_emb)
        r = {"detection": detection_agreement(images, ref_faces, det),
             "cosine": cosine_to_float(ref_emb, embed_crops(float_crops, emb)),
             "pairs": pairs_metrics(pairs, own), "pairs_det_only": pairs_metrics(pairs, det_only),
             "ident": identification(people, unknown, own, emb.sha256),
             "ident_det_only": identification(people, unknown, det_only, float_emb.sha256),
             "no_face": sum(v is None for v in crops.values()),
             "time": {n: timing(blobs, timing_frames, n) for n in threads},
             "sizes": {r_: len(b) for r_, b in blobs.items()}}
        res[name] = r
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return {"excluded_people": sorted(excluded), "images": len(paths), "pairs": len(pairs), "results": res}


def print_tables(out: dict, threads: list) -> None:
    res = out["results"]
    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    print(f"Dev set without the {len(out['excluded_people'])} calibration people: "
          f"{out['images']} images, {out['pairs']} pairs.\n")
    print("| variant | sizes P/R/O/emb (KB) | pair AUC | pair accuracy | rank-1 | ident. @ 1 % strangers "
          "| @ 0.1 % | same, float embedder: @ 1 % | cosine to float median / p1 | no face |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        s = r["sizes"]
        print(f"| {name} | {'/'.join(str(round(s[k] / 1024)) for k in ROLES)} | "
              f"{r['pairs']['auc']:.5f} | {pct(r['pairs']['accuracy'])} | {pct(r['ident']['rank1'])} | "
              f"{pct(r['ident']['at_1pct'])} | {pct(r['ident']['at_0.1pct'])} | "
              f"{pct(r['ident_det_only']['at_1pct'])} | {r['cosine']['median']:.4f} / "
              f"{r['cosine']['p1']:.4f} | {r['no_face']} |")
    print("\n| variant | group photos: faces (float's found again / float's) | same count | "
          "clip frames: faces (found again / float's) | same count |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        g, c = r["detection"]["group photos"], r["detection"]["clip frames"]
        print(f"| {name} | {g['faces']} ({g['float_faces_found']} / {g['float_faces']}) | "
              f"{g['same_count']} of {g['images']} | {c['faces']} ({c['float_faces_found']} / "
              f"{c['float_faces']}) | {c['same_count']} of {c['images']} |")
    head = " | ".join(f"{n} thr: detect | embed/face | embed 1 face" for n in threads)
    print(f"\n| variant (median ms) | {head} | 1 thr CPU ms: detect | embed/face |")
    print("|---|" + "---|---|---|" * len(threads) + "---|---|")
    for name, r in res.items():
        t = r["time"]
        cells = " | ".join(f"{t[n]['detect']:.2f} | {t[n]['embed']:.2f} | {t[n]['embed1']:.2f}"
                           for n in threads)
        t1 = t[threads[0]]
        print(f"| {name} | {cells} | {t1['detect_cpu']:.2f} | {t1['embed_cpu']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", type=Path, default=ROOT / "int8-models")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--models", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timing-step", type=int, default=10, help="every STEP-th clip frame is timed")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sets, cals = load_sets(args.sets, args.models)
    if len(sets) == 1:
        print(f"no int8 sets under {args.sets} (run 'edged models quantize --out {args.sets}')",
              file=sys.stderr)
        return 1
    from bench_pipeline import load_frames

    frames = [f for _, _, f in load_frames(args.shared / "videos", args.timing_step)]
    out = measure(sets, cals, args.shared, args.threads, frames)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"timing on {len(frames)} letterboxed 640x480 clip frames.\n")
    print_tables(out, args.threads)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
