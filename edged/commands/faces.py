"""``edged faces | compare | embed``: the face pipeline on image files."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from edged.commands import (EXIT_ERROR, EXIT_NO_FACE, EXIT_OK, exit_status_epilog,
                            image_exit_rows, similarity)


def _wrap(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(t, 79) for t in paragraphs)


def _options(p: argparse.ArgumentParser, flip: bool = True) -> None:
    p.add_argument("--min-face", type=int, default=None, metavar="PX",
                   help="smallest face to find, in pixels (default 40)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for inference (default: the number of cores, at most 4)")
    p.add_argument("--accelerator", default="cpu", metavar="TYPE",
                   help="accelerator type for both models (cpu, gpu, nnapi, edgetpu, tensorrt; default cpu; "
                        "falls back to the CPU with a warning when unavailable)")
    if flip:
        p.add_argument("--flip", action="store_true",
                       help="also embed the mirrored face and average the two")


def register(sub, common):
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "faces", parents=[common], formatter_class=fmt,
        help="detect faces in images: boxes, landmarks, quality",
        description=_wrap("Detect faces in each image and print their boxes, scores, "
                          "landmarks and quality (the combined score and its parts: size, "
                          "sharpness, frontal pose, and whether it meets the minimums). An "
                          "image that cannot be read, or has no face, is reported on stderr "
                          "and the others are still processed."),
        epilog=exit_status_epilog(*image_exit_rows("every image was processed and had a face")))
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true",
                   help='print one JSON document: [{"image": path, "faces": [{"box": [x1, y1, x2, '
                        'y2], "score": s, "landmarks": [[x, y] x 5], "quality": q, '
                        '"quality_passed": bool, "size_px": px, "sharpness": s, "frontal": f}]}]; '
                        'an image that failed or has no face also has "error"')
    p.add_argument("--annotate", metavar="OUT_DIR",
                   help="write each image with its boxes and landmarks drawn into OUT_DIR")
    p.add_argument("--liveness", action="store_true",
                   help="also score each face's liveness with the anti-spoofing model: 0 = "
                        "photo or screen, 1 = live, and the verdict at the default threshold "
                        "(unknown for faces under 80 px; docs/accuracy.md says how far it can "
                        "be trusted); --json adds \"liveness\" and \"live\"")
    _options(p, flip=False)
    p.set_defaults(func=cmd_faces)

    c = sub.add_parser(
        "compare", parents=[common], formatter_class=fmt,
        help="cosine similarity of the most central face of two images, and the verdict",
        description=_wrap("Compare the most central face of IMAGE_A with that of IMAGE_B: "
                          "cosine similarity of their embeddings and the verdict at the match "
                          "threshold (exit status 0 whatever the verdict)."),
        epilog=exit_status_epilog(*image_exit_rows("both images had a face: compared")))
    c.add_argument("image_a", metavar="IMAGE_A")
    c.add_argument("image_b", metavar="IMAGE_B")
    c.add_argument("--json", action="store_true",
                   help='print {"image_a", "image_b", "similarity", "threshold", "same", '
                        '"face_a", "face_b"}')
    c.add_argument("--threshold", type=similarity, default=None,
                   help="match threshold (default: the pipeline's, chosen on the dev pairs; "
                        "see docs/accuracy.md)")
    _options(c)
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser(
        "embed", parents=[common], formatter_class=fmt,
        help="embeddings of the most central face of each image, to a .npy file",
        description=_wrap("Embed the most central face of each image and save an N x 192 "
                          "float32 array in input order; an image without a face (or "
                          "unreadable) gets a row of NaN."),
        epilog=exit_status_epilog(*image_exit_rows("every image had a face: no NaN row")))
    e.add_argument("images", nargs="+", metavar="IMAGE")
    e.add_argument("--out", required=True, metavar="FILE.npy", help="where to write the array")
    _options(e)
    e.set_defaults(func=cmd_embed)


# ---------------------------------------------------------------------------- helpers


class _Fail(Exception):
    """A per-image or set-up problem: the message, and the exit status it leads to."""

    def __init__(self, msg: str, code: int = EXIT_ERROR):
        super().__init__(msg)
        self.code = code


def _pipeline(args, name: str):
    from edged.runtime.modelstore import ModelError
    from edged.vision.pipeline import FacePipeline, PipelineSettings
    from edged.runtime import DelegateError, SettingsError

    settings = PipelineSettings()
    settings.liveness.enabled = bool(getattr(args, "liveness", False))
    if getattr(args, "min_face", None) is not None:
        if args.min_face < 12:
            raise _Fail(f"edged {name}: --min-face must be at least 12 pixels, got {args.min_face}")
        settings.detection.min_face = args.min_face
    if getattr(args, "flip", False):
        settings.flip = True
    threads = args.threads if args.threads is not None else max(1, min(os.cpu_count() or 1, 4))
    if threads < 1:
        raise _Fail(f"edged {name}: --threads must be at least 1, got {threads}")
    accel = {"type": args.accelerator, "num_threads": threads}
    try:
        return FacePipeline.from_models(args.models, settings, accel)
    except (ModelError, DelegateError, SettingsError, ValueError) as exc:
        raise _Fail(f"edged {name}: {exc}") from None


def _load(path: str):
    """(image, None) or (None, error message)."""
    from edged.vision.imageio import ImageError, load_image

    try:
        return load_image(path), None
    except ImageError as exc:
        return None, str(exc)


def _face_json(f) -> dict:
    """A face as JSON: what :func:`_face_text` says, with more digits."""
    q = f.quality
    doc = {"box": [round(float(v), 2) for v in f.box],
           "score": round(float(f.score), 5),
           "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in f.landmarks],
           "quality": round(float(q.score), 4) if q is not None else None}
    if q is not None:
        doc.update(quality_passed=bool(q.passed), size_px=round(float(q.size_px), 1),
                   sharpness=round(float(q.sharpness), 1), frontal=round(float(q.frontal), 3))
    return doc


def _live_json(f, live) -> dict:
    """``liveness`` and ``live`` of a face scored by the stage ``live``."""
    from edged.vision.liveness import verdict

    score = f.liveness
    return {"liveness": None if score is None else round(float(score), 4),
            "live": verdict(score, live.settings.threshold)}


def _live_text(f, live) -> str:
    if f.liveness is None:
        return f"liveness unknown (face under {live.settings.min_size:.0f} px)"
    ok = f.liveness >= live.settings.threshold
    return (f"liveness {f.liveness:.3f} ({'live' if ok else 'suspected spoof'} at "
            f"{live.settings.threshold:.2f})")


def _face_text(f) -> str:
    x1, y1, x2, y2 = (float(v) for v in f.box)
    q = f.quality
    s = f"box [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]  score {f.score:.3f}"
    if q is not None:
        s += (f"  quality {q.score:.2f} (size {q.size_px:.0f} px, sharpness {q.sharpness:.0f}, "
              f"frontal {q.frontal:.2f}{'' if q.passed else ', below the minimums'})")
    return s


def _annotate(image, faces, out_dir: Path, src: str, used: set) -> Path:
    import cv2

    vis = image.copy()
    thick = max(1, int(round(min(image.shape[:2]) / 300)))
    for f in faces:
        ok = f.quality is None or f.quality.passed
        colour = (0, 200, 0) if ok else (0, 140, 255)
        x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
        cv2.rectangle(vis, (x1, y1), (x2, y2), colour, thick)
        for (x, y), c in zip(f.landmarks, [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255)]):
            cv2.circle(vis, (int(round(float(x))), int(round(float(y)))), thick + 1, c, -1)
        cv2.putText(vis, f"{f.score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, colour, thick, cv2.LINE_AA)
    stem = Path(src).stem or "image"
    ext = Path(src).suffix.lower()
    if ext not in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"):
        ext = ".png"
    name = f"{stem}{ext}"
    k = 1
    while name in used:
        k += 1
        name = f"{stem}-{k}{ext}"
    used.add(name)
    out = out_dir / name
    if not cv2.imwrite(str(out), vis):
        raise OSError(f"cannot write {out}")
    return out


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------- commands


def cmd_faces(args) -> int:
    try:
        pipe = _pipeline(args, "faces")
    except _Fail as exc:
        _err(str(exc))
        return EXIT_ERROR
    out_dir = None
    if args.annotate:
        out_dir = Path(args.annotate)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _err(f"edged faces: --annotate {out_dir}: cannot create the directory: {exc}")
            return EXIT_ERROR
    used: set = set()
    docs, status = [], EXIT_OK
    live = pipe.liveness  # None unless --liveness
    for path in args.images:
        image, error = _load(path)
        faces = []
        if image is None:
            status = EXIT_ERROR
        else:
            faces = pipe.detect(image)
            if not faces:
                error = f"{path}: no face found"
                status = max(status, EXIT_NO_FACE)
            elif live is not None:
                live.score_faces(image, faces)
        if error:
            _err(f"edged faces: {error}")
        if args.json:
            doc = {"image": path, "faces": [dict(_face_json(f), **(_live_json(f, live) if live
                                                                   else {})) for f in faces]}
            if error:
                doc["error"] = error
            docs.append(doc)
        elif image is not None:
            print(f"{path}: {len(faces)} face{'s' if len(faces) != 1 else ''} ({image.shape[1]}x{image.shape[0]})")
            for i, f in enumerate(faces):
                print(f"  {i + 1}. {_face_text(f)}")
                if live is not None:
                    print(f"     {_live_text(f, live)}")
        if out_dir is not None and image is not None:
            try:
                written = _annotate(image, faces, out_dir, path, used)
                if not args.json:
                    print(f"  annotated: {written}")
            except OSError as exc:
                status = EXIT_ERROR
                _err(f"edged faces: {path}: {exc}")
    if args.json:
        print(json.dumps(docs, indent=2))
    return status


def _central(pipe, path: str, name: str):
    """(face, image) of the most central face, or raise _Fail with the per-image message."""
    from edged.vision.pipeline import central_face

    image, error = _load(path)
    if error:
        raise _Fail(f"edged {name}: {error}")
    face = central_face(pipe.detect(image), image.shape)
    if face is None:
        raise _Fail(f"edged {name}: {path}: no face found", EXIT_NO_FACE)
    return face


def cmd_compare(args) -> int:
    try:
        pipe = _pipeline(args, "compare")
    except _Fail as exc:
        _err(str(exc))
        return EXIT_ERROR
    faces, status = [], EXIT_OK
    for path in (args.image_a, args.image_b):
        try:
            face = _central(pipe, path, "compare")
            if not face.quality.passed:
                q = face.quality
                _err(f"edged compare: note: {path}: the face is below the quality minimums "
                     f"(size {q.size_px:.0f} px, sharpness {q.sharpness:.0f}, frontal "
                     f"{q.frontal:.2f}); the result may be unreliable")
            faces.append(face)
        except _Fail as exc:
            _err(str(exc))
            status = max(status, exc.code)
    if status != EXIT_OK:
        return status
    pipe.embed_faces(faces, only_passing=False)
    sim = float(np.dot(faces[0].embedding, faces[1].embedding))
    thr = args.threshold if args.threshold is not None else pipe.settings.match_threshold
    same = sim >= thr
    if args.json:
        print(json.dumps({"image_a": args.image_a, "image_b": args.image_b,
                          "similarity": round(sim, 5), "threshold": thr, "same": bool(same),
                          "face_a": _face_json(faces[0]), "face_b": _face_json(faces[1])}, indent=2))
    else:
        verdict = "same person" if same else "different people"
        print(f"similarity {sim:.3f}: {verdict} (threshold {thr:.3f})")
    return EXIT_OK


def cmd_embed(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        _err(f"edged embed: --out {out}: the file name must end in .npy")
        return EXIT_ERROR
    if not out.parent.is_dir():
        _err(f"edged embed: --out {out}: directory {out.parent} does not exist")
        return EXIT_ERROR
    try:
        pipe = _pipeline(args, "embed")
    except _Fail as exc:
        _err(str(exc))
        return EXIT_ERROR
    dim = pipe.embedder.dim
    result = np.full((len(args.images), dim), np.nan, dtype=np.float32)
    faces, rows, failed, status = [], [], 0, EXIT_OK
    for i, path in enumerate(args.images):
        try:
            faces.append(_central(pipe, path, "embed"))
            rows.append(i)
        except _Fail as exc:
            _err(f"{exc} (row {i} is NaN)")
            failed += 1
            status = max(status, exc.code)
        if len(faces) >= 16:  # embed in batches
            pipe.embed_faces(faces, only_passing=False)
            for r, f in zip(rows, faces):
                result[r] = f.embedding
            faces, rows = [], []
    pipe.embed_faces(faces, only_passing=False)
    for r, f in zip(rows, faces):
        result[r] = f.embedding
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npy", dir=str(out.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, result)
        os.replace(tmp, out)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _err(f"edged embed: cannot write {out}: {exc}")
        return EXIT_ERROR
    print(f"wrote {out}: {len(args.images)} x {dim} float32 ({len(args.images) - failed} embedded, "
          f"{failed} without a face; embedder sha256 {pipe.embedder_sha256[:12]})")
    return status
