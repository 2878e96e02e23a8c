#!/usr/bin/env python3
"""The open-set identification protocol of tools/eval_identification.py, through the CLI.

Each person folder of the dev set with at least 3 photos is enrolled with its first two photos
(file-name order) by ``edged gallery build --embedder E --keep-low-quality`` (the protocol
does not apply the quality minimums), and probed with the rest by ``edged identify --json
--threshold -1 --top-k 2`` (every face named by its best identity, with its score); the
strangers are ``unknown/`` and the people with fewer than 3 photos.  Of each image the face
whose box centre is nearest the image centre counts (eval_identification takes the landmarks'
centre: the same face but where two boxes nearly share a centre).  An enrolment photo without a
face leaves its person with one row (eval_identification takes the next photo instead).

Reported: rank-1, the threshold accepting 1 % (0.1 %) of the strangers and the correct
identification there, and both at the embedder's default threshold (its manifest entry).

    .venv/bin/python tools/eval_identification_cli.py [--dev ../shared/faces/dev]
        [--embedder sface] [--models DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from eval_identification import list_people, threshold_at_far  # noqa: E402

SHARED = Path(os.environ.get("EDGED_SHARED", ROOT.parent / "shared"))
CHUNK = 200  # images per edged identify call


def edged(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "edged", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode not in (0, 3):  # (3: an image without a face)
        raise SystemExit(f"edged {' '.join(map(str, args[:3]))} ...: exit {r.returncode}: "
                         f"{r.stderr.strip()[-2000:]}")
    return r.stdout


def central(item: dict):
    """``(identity, score)`` of the face of ``item`` nearest the image centre, or None."""
    import cv2

    if not item.get("faces"):
        return None
    h, w = cv2.imread(item["image"], cv2.IMREAD_UNCHANGED).shape[:2]

    def key(f):
        x1, y1, x2, y2 = f["box"]
        return (((x1 + x2) / 2 - w / 2) ** 2 + ((y1 + y2) / 2 - h / 2) ** 2,
                -(x2 - x1) * (y2 - y1))

    f = min(item["faces"], key=key)
    return (f["id"], f["score"]) if f["score"] is not None else None


def identify(gallery: Path, images, common) -> dict:
    out = {}
    for i in range(0, len(images), CHUNK):
        doc = json.loads(edged("identify", "--gallery", gallery, "--json", "--threshold", -1,
                               "--top-k", 2, *common, *images[i:i + CHUNK]))
        out.update({item["image"]: central(item) for item in doc})
        print(f"\ridentified {min(i + CHUNK, len(images))}/{len(images)}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def main(argv=None) -> int:
    from edged.vision.embed import EmbedderSpec
    from edged.runtime.modelstore import Manifest

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", type=Path, default=SHARED / "faces" / "dev")
    ap.add_argument("--embedder", default="", help="mobilefacenet or sface (default: the "
                                                   "manifest's default)")
    ap.add_argument("--models", default="", help="models directory (default: the installed one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    spec = EmbedderSpec.from_entry(Manifest.load().model("embedder", args.embedder or None))
    common = (["--embedder", args.embedder] if args.embedder else []) + \
        (["--models", args.models] if args.models else [])
    people = list_people(args.dev)
    strangers = [str(p) for p in people.pop("unknown", [])]
    probes = []  # (person, image)
    with tempfile.TemporaryDirectory(prefix="edged-eval-cli-") as tmp:
        enrol = Path(tmp) / "enrol"
        for person, imgs in people.items():
            if len(imgs) < 3:
                strangers += [str(p) for p in imgs]
                continue
            (enrol / person).mkdir(parents=True)
            for img in imgs[:2]:
                (enrol / person / img.name).symlink_to(img.resolve())
            probes += [(person, str(p)) for p in imgs[2:]]
        gallery = Path(tmp) / "dev.edgal"
        print(edged("gallery", "build", enrol, "-o", gallery, "--keep-low-quality", "-q",
                    *common).strip(), file=sys.stderr)
        found = identify(gallery, [p for _, p in probes] + strangers, common)
    pr = [(person, found[p]) for person, p in probes]
    correct = np.array([bool(f) and f[0] == person for person, f in pr])
    p_score = np.array([f[1] if f else -1.0 for _, f in pr])
    s_score = np.array([found[p][1] for p in strangers if found[p]])

    def at(t: float) -> dict:
        return {"threshold": round(float(t), 4),
                "strangers_accepted": float((s_score >= t).mean()),
                "correct_identification": float((correct & (p_score >= t)).mean())}

    out = {"embedder": spec.name, "probes": len(pr), "strangers": len(strangers),
           "strangers_with_face": int(len(s_score)), "probes_without_face": sum(not f for _, f in pr),
           "rank1": float(correct.mean()), "at_far_1pct": at(threshold_at_far(s_score, 0.01)),
           "at_far_0.1pct": at(threshold_at_far(s_score, 0.001)),
           "default": at(spec.identification if spec.identification is not None else 0.58)}
    for k in ("at_far_1pct", "at_far_0.1pct", "default"):
        r = out[k]
        print(f"{k:14s} threshold {r['threshold']:.4f}: strangers accepted "
              f"{100 * r['strangers_accepted']:.2f} %, correct identification "
              f"{100 * r['correct_identification']:.2f} %")
    print(f"rank-1 {100 * out['rank1']:.2f} % of {len(pr)} probes ({out['probes_without_face']} "
          f"without a face); {len(strangers)} strangers ({len(s_score)} with a face)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
