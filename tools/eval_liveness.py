#!/usr/bin/env python3
"""Liveness (anti-spoofing) error rates of edged's liveness stage, ISO/IEC 30107-3 style.

- **Spoof set** (``../shared/faces/spoof``, its ``manifest.csv``): the labels are the sources'
  own (column ``label``: ``spoof`` / ``live``), the attack type is the source's
  (``attack_type``: ``screen`` or ``unknown``); the README's own visual reading
  (``attack_type_visual``) is not a label and is shown for information only.  Each image has
  one face: the largest one found is scored.  ``--clean-provenance`` leaves out the two live
  images whose provenance the README doubts (vmfas_true_001 and _002).
- **Dev photos** (``../shared/faces/dev``, every image, the face nearest the centre): real
  people, bona fide presentations for this purpose (they are press photographs, which is a
  stricter test than a door camera: see docs/accuracy.md).
- **Clips** (``../shared/videos/*.mp4``): every face of every ``--clip-step``-th frame, and
  per track: the clip runs through :class:`edged.daemon.track.Tracker` with every embedded face
  counted as a match of one enrolled person, so each track ends ``recognized`` or
  ``spoof_suspected`` by its quality-weighted liveness, as the daemon would decide it with
  ``liveness.require: true``.

APCER = share of attack presentations accepted as live (score >= threshold), per attack type;
BPCER = share of bona fide presentations refused (score < threshold); faces too small to score
(``min_size``) are counted apart, never as live.  The time per face is the crop plus the model,
median over the spoof-set faces, one thread.

    .venv/bin/python tools/eval_liveness.py [--data ../shared] [--threshold 0.8]
        [--thresholds 0.2,0.5,0.8,0.9,0.95] [--dev-limit N] [--clip-step 3] [--no-dev]
        [--no-clips] [--clean-provenance] [--png docs/liveness-det.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.vision.imageio import ImageError, load_image  # noqa: E402
from edged.vision.liveness import DEFAULT_THRESHOLD, LivenessSettings, liveness_crop  # noqa: E402
from edged.vision.pipeline import FacePipeline, PipelineSettings, central_face  # noqa: E402
from edged.daemon.track import Tracker, TrackingSettings  # noqa: E402
from edged.types import Frame, Match  # noqa: E402

DOUBTFUL = {"vmfas_true_001.jpg", "vmfas_true_002.jpg"}  # the README's provenance doubt


def rates(scores, live, threshold: float) -> dict:
    """APCER / BPCER at ``threshold`` over scored faces (None scores are left out)."""
    s = np.array([v for v in scores if v is not None], np.float64)
    lv = np.array([x for v, x in zip(scores, live) if v is not None], bool)
    attacks, bona = s[~lv], s[lv]
    return {"apcer": float(np.mean(attacks >= threshold)) if len(attacks) else None,
            "bpcer": float(np.mean(bona < threshold)) if len(bona) else None,
            "attacks": int(len(attacks)), "bona_fide": int(len(bona)),
            "unscored": int(sum(v is None for v in scores))}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def spoof_set(pipe: FacePipeline, folder: Path, clean: bool) -> list:
    rows = list(csv.DictReader(open(folder / "manifest.csv", encoding="utf-8")))
    out = []
    for row in rows:
        if clean and row["file"] in DOUBTFUL:
            continue
        if row["label"] not in ("live", "spoof"):
            raise SystemExit(f"{folder}/manifest.csv: {row['file']}: label {row['label']!r} is "
                             f"neither live nor spoof")
        image = load_image(folder / row["file"])
        faces = pipe.detect(image)
        face = max(faces, key=lambda f: f.width * f.height) if faces else None
        t = time.perf_counter()
        score = pipe.liveness.score(image, face) if face is not None else None
        dt = time.perf_counter() - t
        out.append({"file": row["file"], "live": row["label"] == "live",
                    "attack_type": row["attack_type"], "visual": row["attack_type_visual"],
                    "face_px": None if face is None else round(min(face.width, face.height)),
                    "score": score, "seconds": dt if score is not None else None})
    return out


def dev_photos(pipe: FacePipeline, folder: Path, limit: int) -> list:
    paths = sorted(p for p in glob.glob(str(folder / "*" / "*"))
                   if p.lower().endswith((".jpg", ".jpeg", ".png")))
    if limit:
        paths = paths[:: max(1, len(paths) // limit)][:limit]
    scores = []
    for p in paths:
        try:
            image = load_image(p)
        except ImageError:
            continue
        face = central_face(pipe.detect(image), image.shape)
        if face is not None:
            scores.append(pipe.liveness.score(image, face))
    return scores


def clip(pipe: FacePipeline, path: Path, step: int, live: LivenessSettings) -> dict:
    """Per-face scores and per-track verdicts (recognized / spoof_suspected) of one clip."""
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    tracker = Tracker("clip", TrackingSettings(), match_threshold=0.4,
                      liveness=LivenessSettings(enabled=True, threshold=live.threshold,
                                                min_size=live.min_size, require=True))
    scores, events, i = [], [], 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if i % step == 0:
            frame = Frame(camera="clip", index=i, timestamp=i / fps, image=image,
                          monotonic=1.0 + i / fps)
            faces = pipe.detect(image)
            evs, todo = tracker.update(frame, faces)
            faces_todo = [f for _, f in todo]
            pipe.embed_faces(faces_todo, only_passing=False, image=image)
            scores += [f.liveness for f in faces_todo]
            person = Match(name="person", identity="person", score=0.9, margin=0.5,
                           candidates=[("person", 0.9)])
            events += evs + tracker.observe(frame, todo, [person] * len(todo))
        i += 1
    events += tracker.end_all()
    decided = [e for e in events if e.type in ("recognized", "spoof_suspected")]
    return {"clip": path.name, "faces": scores,
            "tracks": {"recognized": sum(e.type == "recognized" for e in decided),
                       "refused": sum(e.type == "spoof_suspected" for e in decided),
                       "undecided": sum(e.type == "track_ended" for e in events) - len(decided),
                       "refused_scores": [e.liveness["score"] for e in decided
                                          if e.type == "spoof_suspected"]}}


def det_png(path: Path, scores, live, title: str, threshold: float) -> None:
    """A DET plot (APCER against BPCER over all thresholds), linear axes, drawn with OpenCV;
    the dot is ``threshold``."""
    s = [v for v in scores if v is not None]
    lv = [x for v, x in zip(scores, live) if v is not None]
    ths = sorted(set(s)) + [1.01]
    pts = [(rates(s, lv, t)["apcer"], rates(s, lv, t)["bpcer"]) for t in ths]
    W, H, M = 480, 480, 60
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (M, 20), (W - 20, H - M), (0, 0, 0), 1)

    def xy(a, b):
        return (int(M + a * (W - 20 - M)), int(H - M - b * (H - M - 20)))

    for k in range(1, 10):
        cv2.line(img, xy(k / 10, 0), xy(k / 10, 1), (225, 225, 225), 1)
        cv2.line(img, xy(0, k / 10), xy(1, k / 10), (225, 225, 225), 1)
    for p, q in zip(pts, pts[1:]):
        cv2.line(img, xy(*p), xy(*q), (200, 80, 0), 2, cv2.LINE_AA)
    put = lambda t, at: cv2.putText(img, t, at, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,  # noqa: E731
                                     cv2.LINE_AA)
    put("APCER (attacks accepted)", (M + 90, H - 20))
    put("BPCER", (5, H // 2))
    put(title, (M, 14))
    for v in (0.0, 0.5, 1.0):
        put(f"{v:g}", (xy(v, 0)[0] - 8, H - M + 16))
        put(f"{v:g}", (M - 28, xy(0, v)[1] + 5))
    op = rates(s, lv, threshold)
    cv2.circle(img, xy(op["apcer"], op["bpcer"]), 6, (0, 0, 220), -1, cv2.LINE_AA)
    put(f"threshold {threshold:g}", (xy(op["apcer"], op["bpcer"])[0] + 10,
                                     xy(op["apcer"], op["bpcer"])[1] - 8))
    cv2.imwrite(str(path), img)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared"), help="the shared data folder")
    ap.add_argument("--models", default=None)
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--thresholds", default="0.05,0.2,0.5,0.8,0.9")
    ap.add_argument("--min-size", type=float, default=LivenessSettings().min_size)
    ap.add_argument("--dev-limit", type=int, default=0, help="at most N dev photos (0: all)")
    ap.add_argument("--clip-step", type=int, default=3, help="every Nth frame of the clips")
    ap.add_argument("--no-dev", action="store_true")
    ap.add_argument("--no-clips", action="store_true")
    ap.add_argument("--clean-provenance", action="store_true")
    ap.add_argument("--png", default=None, help="draw the spoof set's DET curve here")
    ap.add_argument("--json", default=None, help="write every score here")
    args = ap.parse_args(argv)
    data = Path(args.data)
    live = LivenessSettings(enabled=True, threshold=args.threshold, min_size=args.min_size)
    pipe = FacePipeline.from_models(args.models, PipelineSettings(liveness=live),
                                    accel={"type": "cpu", "num_threads": 1})
    started = time.time()
    spoof = spoof_set(pipe, data / "faces" / "spoof", args.clean_provenance)
    dev = [] if args.no_dev else dev_photos(pipe, data / "faces" / "dev", args.dev_limit)
    clips = [] if args.no_clips else [clip(pipe, Path(p), args.clip_step, live)
                                      for p in sorted(glob.glob(str(data / "videos" / "*.mp4")))]
    report(args, spoof, dev, clips, time.time() - started)
    if args.png:
        det_png(Path(args.png), [r["score"] for r in spoof], [r["live"] for r in spoof],
                f"liveness DET, spoof set ({len(spoof)} images)", args.threshold)
    if args.json:
        Path(args.json).write_text(json.dumps({"spoof": spoof, "dev": dev, "clips": clips},
                                              indent=1))
    return 0


def report(args, spoof: list, dev: list, clips: list, elapsed: float) -> None:
    thr = args.threshold
    s_scores, s_live = [r["score"] for r in spoof], [r["live"] for r in spoof]
    ms = [1000 * r["seconds"] for r in spoof if r["seconds"] is not None]
    print(f"# Liveness: {datetime.date.today()}, {platform.machine()} "
          f"{platform.processor() or ''} python {platform.python_version()}, "
          f"one thread, {elapsed:.0f} s")
    print(f"command: tools/eval_liveness.py {' '.join(sys.argv[1:])}\n")
    print(f"threshold {thr} (live when score >= threshold), min_size {args.min_size:.0f} px; "
          f"{np.median(ms):.1f} ms per face (median, crop + model)\n")
    print("| set | attacks | bona fide | unscored | APCER | BPCER |\n|---|---|---|---|---|---|")
    r = rates(s_scores, s_live, thr)
    print(f"| spoof set, all | {r['attacks']} | {r['bona_fide']} | {r['unscored']} | "
          f"{_pct(r['apcer'])} | {_pct(r['bpcer'])} |")
    for kind in sorted({x["attack_type"] for x in spoof if not x["live"]}):
        sub = [x for x in spoof if x["live"] or x["attack_type"] == kind]
        r = rates([x["score"] for x in sub], [x["live"] for x in sub], thr)
        print(f"| attack type {kind} | {r['attacks']} | | | {_pct(r['apcer'])} | |")
    if dev:
        r = rates(dev, [True] * len(dev), thr)
        print(f"| dev photos | | {r['bona_fide']} | {r['unscored']} | | {_pct(r['bpcer'])} |")
    for c in clips:
        r = rates(c["faces"], [True] * len(c["faces"]), thr)
        tr = c["tracks"]
        print(f"| {c['clip']} faces | | {r['bona_fide']} | {r['unscored']} | | "
              f"{_pct(r['bpcer'])} |")
        print(f"| {c['clip']} tracks | | {tr['recognized'] + tr['refused']} | "
              f"{tr['undecided']} | | {_pct(tr['refused'] / max(1, tr['recognized'] + tr['refused']))} "
              f"({tr['refused']} refused) |")
    print("\n| threshold | APCER spoof set | BPCER spoof set | BPCER dev | BPCER clip faces |")
    print("|---|---|---|---|---|")
    clip_faces = [v for c in clips for v in c["faces"]]
    for t in sorted({float(x) for x in args.thresholds.split(",")} | {thr}):
        a = rates(s_scores, s_live, t)
        d = rates(dev, [True] * len(dev), t) if dev else {"bpcer": None}
        cf = rates(clip_faces, [True] * len(clip_faces), t) if clip_faces else {"bpcer": None}
        print(f"| {t:g} | {_pct(a['apcer'])} | {_pct(a['bpcer'])} | {_pct(d['bpcer'])} | "
              f"{_pct(cf['bpcer'])} |")
    print("\n| file | label | attack type (source) | visual note | face px | score |")
    print("|---|---|---|---|---|---|")
    for x in spoof:
        sc = "unknown" if x["score"] is None else f"{x['score']:.3f}"
        print(f"| {x['file']} | {'live' if x['live'] else 'spoof'} | {x['attack_type']} | "
              f"{x['visual'].split(':')[0] or '-'} | {x['face_px']} | {sc} |")


if __name__ == "__main__":
    sys.exit(main())
