"""``edged identify --gallery FILE IMAGE... [--json]``: who is in these photos."""
from __future__ import annotations

import argparse
import json
import sys

from edged.commands import (EXIT_ERROR, EXIT_NO_FACE, EXIT_OK, exit_status_epilog,
                            image_exit_rows, margin)
from edged.commands.gallery import Fail, make_pipeline, pipeline_options


def register(sub, common):
    from edged.gallery import MatchSettings

    d = MatchSettings()
    p = sub.add_parser(
        "identify", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="name every face in images against a gallery",
        description="Detect every face in each IMAGE, embed it and search the gallery. A face is "
                    "named when its best identity scores at least the threshold (and beats the "
                    "second by at least the margin); otherwise it is unknown, with its best "
                    "score. An image that cannot be read is reported on stderr, or with --json "
                    "in the JSON document only; the others are still processed.",
        epilog=exit_status_epilog(*image_exit_rows("every image was processed and had a face")))
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--gallery", required=True, metavar="FILE", help="gallery file")
    p.add_argument("--json", action="store_true",
                   help='print [{"image", "faces": [{"box": [x1, y1, x2, y2], "name": name or '
                        'null, "id", "score", "margin", "quality", "quality_passed", '
                        '"candidates": [[name, score]]}]}]; an image that cannot be read is '
                        '{"image", "error"}')
    p.add_argument("--threshold", type=float, default=None,
                   help="identification threshold (default: the embedder's open-set default "
                        "from its manifest entry, 0.58 for MobileFaceNet; docs/accuracy.md)")
    p.add_argument("--min-margin", type=margin, default=d.min_margin,
                   help=f"minimum margin over the second identity (default {d.min_margin})")
    p.add_argument("--top-k", type=int, default=d.top_k, help="candidates to show")
    pipeline_options(p)
    p.set_defaults(func=cmd_identify)


def cmd_identify(args) -> int:
    try:
        return _identify(args)
    except Fail as exc:
        print(f"edged identify: {exc}", file=sys.stderr)
        return exc.code


def _identify(args) -> int:
    from edged.gallery import Gallery, GalleryError

    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        raise Fail(f"--threshold must be in [-1, 1], got {args.threshold}", EXIT_ERROR)
    if args.top_k < 1:
        raise Fail(f"--top-k must be at least 1, got {args.top_k}", EXIT_ERROR)
    pipe, settings = _pipeline_and_settings(args)
    try:
        gallery = Gallery.open(args.gallery, expect_dim=None,
                               expect_embedder=pipe.embedder_sha256)
    except GalleryError as exc:
        raise Fail(str(exc), EXIT_ERROR) from None
    with gallery:
        out, status = _identify_images(args, pipe, gallery, settings)
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_text(out)
    return status


def _pipeline_and_settings(args):
    """The pipeline with the embedder that made the gallery (unless ``--embedder`` says
    otherwise) and the match settings: ``--threshold``, else that embedder's own."""
    from edged.gallery import GalleryError, MatchSettings, embedder_name, peek_embedder

    try:  # the embedder that made the gallery, unless --embedder says otherwise
        made_by = embedder_name(peek_embedder(args.gallery, confine=False)) or None
    except GalleryError as exc:
        raise Fail(str(exc), EXIT_ERROR) from None
    pipe = make_pipeline(args, made_by)
    threshold = args.threshold
    if threshold is None:
        threshold = pipe.embedder.spec.identification
        if threshold is None:
            threshold = MatchSettings().threshold
    return pipe, MatchSettings(threshold=threshold, min_margin=args.min_margin, top_k=args.top_k)


def _identify_images(args, pipe, gallery, settings):
    """One document per image (its faces, or its error) and the exit status."""
    from edged.vision.imageio import ImageError, load_image

    out, status = [], EXIT_OK
    for path in args.images:
        try:
            img = load_image(path)
        except ImageError as exc:
            if not args.json:
                print(f"edged identify: {exc}", file=sys.stderr)
            out.append({"image": path, "error": str(exc)})
            status = EXIT_ERROR
            continue
        faces = pipe.detect(img)
        if not faces:
            status = max(status, EXIT_NO_FACE)
        out.append({"image": path, "faces": _face_rows(pipe, gallery, settings, faces)})
    return out, status


def _face_rows(pipe, gallery, settings, faces) -> list:
    import numpy as np

    pipe.embed_faces(faces, only_passing=False)
    with_emb = [f for f in faces if f.embedding is not None]
    matches = gallery.match(np.stack([f.embedding for f in with_emb]), settings) \
        if with_emb else []
    by_face = dict(zip(map(id, with_emb), matches))
    rows = []
    for f in faces:
        m = by_face.get(id(f))
        q = f.quality
        rows.append({
            "box": [round(float(v), 1) for v in f.box],
            "name": m.name if m else None,
            "id": m.identity if m else None,
            "score": round(float(m.score), 4) if m else None,
            "margin": round(float(m.margin), 4) if m else None,
            "quality": round(float(q.score), 3) if q is not None else None,
            "quality_passed": bool(q.passed) if q is not None else None,
            "candidates": [[n, round(float(s), 4)] for n, s in m.candidates] if m else [],
        })
    return rows


def _print_text(out) -> None:
    for item in (i for i in out if "error" not in i):  # (the errors went to stderr)
        if not item["faces"]:
            print(f"{item['image']}: no face")
            continue
        for k, f in enumerate(item["faces"], 1):
            box = ", ".join(f"{v:.0f}" for v in f["box"])
            low = "" if f["quality_passed"] in (True, None) else "  (below the quality minimums)"
            if f["name"] is not None:
                verdict = f"{f['name']}  score {f['score']:.3f}  margin {f['margin']:.3f}"
            elif f["candidates"]:
                best = f["candidates"][0]
                verdict = f"unknown  (best {best[0]} {best[1]:.3f}, margin {f['margin']:.3f})"
            else:
                verdict = "unknown  (empty gallery)" if f["score"] is not None else "no embedding"
            print(f"{item['image']}: face {k} [{box}]: {verdict}{low}")
