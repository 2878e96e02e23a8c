#!/usr/bin/env python3
"""Face verification accuracy of the edged pipeline on a pairs file (default: the dev pairs).

For every image named in ``pairs.csv`` (img_a,img_b,same; paths relative to the file's folder)
it runs the pipeline with its default settings, takes the face nearest the image centre,
embeds it (plain, and averaged with its mirror image: the ``flip`` option), and scores every
pair by cosine similarity.  A pair with an image where no face was found scores -1 (it counts
as "different").  Reported, for plain and flip embeddings:

- ROC AUC (the probability that a random same-person pair scores above a random
  different-person pair; ties count half),
- the best-accuracy threshold: among the thresholds that classify the most pairs correctly
  (score >= threshold means "same"), the midpoint of the widest such interval between two
  consecutive pair scores, chosen on the whole set,
- the accuracy there, TAR at FAR 0.1 % and 1 %, the images without a face, and the pairs the
  threshold gets wrong.

It prints markdown (for docs/accuracy.md) and draws the ROC curves to a PNG with OpenCV.

    .venv/bin/python tools/eval_verification.py [--pairs ../shared/faces/dev/pairs.csv]
        [--png docs/accuracy-roc.png] [--models DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.vision.imageio import ImageError, load_image  # noqa: E402
from edged.vision.pipeline import FacePipeline, PipelineSettings, central_face  # noqa: E402


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney estimate of the area under the ROC curve (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple:
    """(threshold, accuracy, (low, high)): midpoint of the widest best-accuracy interval."""
    u = np.unique(scores)
    # Candidate cut points: below all, between consecutive scores, above all.
    cuts = np.concatenate([[u[0] - 1e-3], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1e-3]])
    pos = labels == 1
    acc = np.array([((scores >= c) == pos).mean() for c in cuts])
    best = acc.max()
    best_i = np.nonzero(acc == best)[0]
    # Each best cut c_k lies in the open interval (u[k-1], u[k]) of thresholds giving the same
    # decisions; take the widest one and its midpoint.
    lows = np.concatenate([[u[0] - 1.0], u])
    highs = np.concatenate([u, [u[-1] + 1.0]])
    widths = highs[best_i] - lows[best_i]
    k = best_i[int(np.argmax(widths))]
    lo, hi = float(lows[k]), float(highs[k])
    return (lo + hi) / 2.0, float(best), (lo, hi)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple:
    order = np.argsort(-scores, kind="mergesort")
    lab = labels[order]
    tpr = np.concatenate([[0.0], np.cumsum(lab == 1) / max(1, (lab == 1).sum())])
    fpr = np.concatenate([[0.0], np.cumsum(lab == 0) / max(1, (lab == 0).sum())])
    return fpr, tpr


def tar_at_far(scores, labels, far) -> float:
    neg = np.sort(scores[labels == 0])[::-1]
    k = int(np.floor(far * len(neg)))
    thr = neg[k] if k < len(neg) else -np.inf  # strictly above the (k+1)-th best impostor
    return float((scores[labels == 1] > thr).mean())


def draw_roc(curves: dict, path: Path, title: str) -> None:
    """Two panels: the ROC on linear axes, and a zoom with FPR on a log axis."""
    W, H, M = 1100, 560, 70
    img = np.full((H, W, 3), 255, np.uint8)
    colours = [(200, 80, 0), (0, 0, 220)]
    panels = [("linear", 0), ("zoom", W // 2)]
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (M, 30), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for kind, ox in panels:
        x0, y0, x1, y1 = ox + M, 60, ox + W // 2 - 20, H - M
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        if kind == "linear":
            fx = lambda f: x0 + f * (x1 - x0)  # noqa: E731
            ylo = 0.0
            xt = [(v, f"{v:.1f}") for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
            xl = "false positive rate"
        else:
            lo = -3.0
            fx = lambda f: x0 + (np.log10(np.maximum(f, 10 ** lo)) - lo) / -lo * (x1 - x0)  # noqa: E731
            ylo = 0.9
            xt = [(10 ** e, f"1e{e}") for e in (-3, -2, -1, 0)]
            xl = "false positive rate (log)"
        fy = lambda t: y1 - (t - ylo) / (1.0 - ylo) * (y1 - y0)  # noqa: E731
        for v, label in xt:
            x = int(fx(v))
            cv2.line(img, (x, y1), (x, y1 + 5), (0, 0, 0), 1)
            cv2.line(img, (x, y0), (x, y1), (225, 225, 225), 1)
            cv2.putText(img, label, (x - 15, y1 + 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for i in range(6):
            t = ylo + (1.0 - ylo) * i / 5
            y = int(fy(t))
            cv2.line(img, (x0 - 5, y), (x0, y), (0, 0, 0), 1)
            cv2.line(img, (x0, y), (x1, y), (225, 225, 225), 1)
            cv2.putText(img, f"{t:.2f}", (x0 - 48, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, xl, ((x0 + x1) // 2 - 90, y1 + 45), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "true positive rate", (x0 + 5, y0 - 8), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        for ci, (name, (fpr, tpr)) in enumerate(curves.items()):
            # A staircase, clipped to the panel.
            xs = np.repeat(fpr, 2)[1:]
            ys = np.repeat(tpr, 2)[:-1]
            pts = np.stack([fx(xs), fy(np.maximum(ys, ylo))], axis=1)
            pts[:, 0] = np.clip(pts[:, 0], x0, x1)
            pts[:, 1] = np.clip(pts[:, 1], y0, y1)
            cv2.polylines(img, [np.round(pts).astype(np.int32)], False, colours[ci % 2], 2, cv2.LINE_AA)
            cv2.putText(img, name, (x0 + 15, y1 - 20 - 22 * ci), font, 0.5, colours[ci % 2], 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(ROOT.parent / "shared" / "faces" / "dev" / "pairs.csv"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "accuracy-roc.png"))
    ap.add_argument("--models", default=None, help="models directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--errors", type=int, default=20, help="list at most this many misclassified pairs")
    ap.add_argument("--centre", choices=("landmarks", "box"), default="landmarks",
                    help="which face is 'central': landmarks = edged.vision.pipeline.central_face (mean of "
                         "the 5 landmarks nearest the image centre), box = the box centre instead")
    args = ap.parse_args(argv)

    pairs_path = Path(args.pairs)
    base = pairs_path.parent
    with open(pairs_path, newline="") as f:
        rows = [(r["img_a"], r["img_b"], int(r["same"])) for r in csv.DictReader(f)]
    images = sorted({p for a, b, _ in rows for p in (a, b)})
    settings = PipelineSettings()
    accel = {"type": "cpu", "num_threads": args.threads}
    pipe = FacePipeline.from_models(args.models, settings, accel)

    plain, flipped, no_face, failed_quality, errors = {}, {}, [], [], []
    t0 = time.time()
    check_done = False
    for i, rel in enumerate(images):
        try:
            img = load_image(base / rel)
        except ImageError as exc:
            errors.append(str(exc))
            continue
        faces = pipe.detect(img)
        if args.centre == "box" and faces:
            h, w = img.shape[:2]
            face = min(faces, key=lambda f: (f.center[0] - w / 2) ** 2 + (f.center[1] - h / 2) ** 2)
        else:
            face = central_face(faces, img.shape)
        if face is None:
            no_face.append(rel)
            continue
        if not face.quality.passed:
            failed_quality.append((rel, face.quality))
        # The face and its mirror in one batch: the plain embedding and the flip average.
        e = pipe.embedder.embed([face.aligned, np.ascontiguousarray(face.aligned[:, ::-1])])
        plain[rel] = e[0]
        avg = e[0] + e[1]
        flipped[rel] = avg / np.linalg.norm(avg)
        if not check_done:  # the same as Embedder.embed(flip=True)
            ref = pipe.embedder.embed([face.aligned], flip=True)[0]
            assert np.allclose(ref, flipped[rel], atol=1e-5), "flip average mismatch"
            check_done = True
        if (i + 1) % 250 == 0:
            print(f"  {i + 1}/{len(images)} images, {time.time() - t0:.0f} s", file=sys.stderr)
    elapsed = time.time() - t0

    labels = np.array([s for _, _, s in rows])
    results, curves = {}, {}
    for name, emb in (("plain", plain), ("flip", flipped)):
        scores = np.array([float(emb[a] @ emb[b]) if a in emb and b in emb else -1.0
                           for a, b, _ in rows])
        thr, acc, (lo, hi) = best_threshold(scores, labels)
        results[name] = dict(
            scores=scores, auc=roc_auc(scores, labels), thr=thr, acc=acc, lo=lo, hi=hi,
            tar3=tar_at_far(scores, labels, 0.001), tar2=tar_at_far(scores, labels, 0.01),
            wrong=[(rows[k], float(scores[k])) for k in range(len(rows))
                   if (scores[k] >= thr) != (labels[k] == 1)])
        curves[f"{name}: AUC {results[name]['auc']:.5f}"] = roc_points(scores, labels)

    n_img = len(images)
    title = (f"edged verification ROC, {pairs_path.name}: {len(rows)} pairs "
             f"({int(labels.sum())} same, {int((labels == 0).sum())} different)")
    draw_roc(curves, Path(args.png), title)

    out = []
    out.append(f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
               f"({platform.node() and 'this machine'}), {args.threads} threads, "
               f"{elapsed:.0f} s for {n_img} images; central face by {args.centre}.\n")
    out.append(f"Pairs: {len(rows)} ({int(labels.sum())} same person, {int((labels == 0).sum())} "
               f"different) over {n_img} images; images without a detected face: {len(no_face)} "
               f"({100.0 * len(no_face) / n_img:.2f} %); unreadable: {len(errors)}; central faces "
               f"below the default quality minimums (embedded anyway): {len(failed_quality)}.\n")
    default = settings.match_threshold
    out.append(f"| embedding | ROC AUC | best-accuracy threshold (interval) | accuracy there | "
               f"accuracy at the default {default:.3f} | TAR @ FAR 0.1 % | TAR @ FAR 1 % | errors |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        at_default = float(((r["scores"] >= default) == (labels == 1)).mean())
        out.append(f"| {name} | {r['auc']:.5f} | {r['thr']:.4f} ({r['lo']:.4f} .. {r['hi']:.4f}) | "
                   f"{100 * r['acc']:.2f} % | {100 * at_default:.2f} % | {100 * r['tar3']:.2f} % | "
                   f"{100 * r['tar2']:.2f} % | {len(r['wrong'])} |")
    for name, r in results.items():
        out.append(f"\nMisclassified pairs at {r['thr']:.4f} ({name}):\n")
        for (a, b, s), sc in r["wrong"][:args.errors]:
            out.append(f"- {'same' if s else 'different'}: `{a}` vs `{b}`: {sc:.3f}")
        if len(r["wrong"]) > args.errors:
            out.append(f"- ... and {len(r['wrong']) - args.errors} more")
    if no_face:
        out.append("\nImages without a detected face: " + ", ".join(f"`{p}`" for p in no_face))
    if failed_quality:
        out.append("\nCentral faces below the quality minimums: " + ", ".join(
            f"`{p}` (size {q.size_px:.0f}, sharpness {q.sharpness:.0f}, frontal {q.frontal:.2f})"
            for p, q in failed_quality))
    for e in errors:
        out.append(f"\nUnreadable: {e}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
