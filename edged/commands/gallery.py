"""``edged gallery build | add | remove | list | info``: make and inspect gallery files.

Every write goes to a temporary file in the gallery's directory, is fsynced, then renamed over
the gallery, so a daemon watching the file sees the old gallery or the whole new one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
EXIT_HELP = ("Exit status: 0 on success (images without a usable face are reported and "
             "skipped), 1 when the gallery cannot be read or written or nothing could be "
             "enrolled, 2 when nothing could run (models missing, bad options).")


class Fail(Exception):
    """A user-facing error: printed as ``edged <command>: <message>``; ``code`` is the status."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flip", action="store_true",
                   help="embed each face averaged with its mirror image (use the same setting "
                        "as the daemon's pipeline.flip)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for inference (default: the number of cores, at most 4)")
    p.add_argument("--accelerator", default="cpu", metavar="TYPE",
                   help="accelerator for both models (cpu, gpu, nnapi, edgetpu, tensorrt; default cpu)")
    p.add_argument("--embedder", metavar="NAME", default=None,
                   help="the embedder (mobilefacenet, sface; the daemon's models.embedder_model "
                        "must be the same): default the one that made FILE, else mobilefacenet")


def make_pipeline(args, embedder: Optional[str] = None):
    """The face pipeline with the embedder ``--embedder`` names, else ``embedder``, else the
    manifest's default."""
    from edged.vision.detect import MtcnnDetector
    from edged.vision.embed import Embedder
    from edged.runtime.modelstore import ModelError
    from edged.vision.pipeline import FacePipeline, PipelineSettings

    settings = PipelineSettings(flip=bool(getattr(args, "flip", False)))
    threads = args.threads if args.threads is not None else max(1, min(os.cpu_count() or 1, 4))
    if threads < 1:
        raise Fail(f"--threads must be at least 1, got {threads}", 2)
    accel = {"type": args.accelerator, "num_threads": threads}
    try:
        detector = MtcnnDetector.from_models(args.models, settings.detection, accel)
        emb = Embedder.from_models(args.models, accel, name=args.embedder or embedder)
    except (ModelError, ValueError) as exc:
        raise Fail(str(exc), 2) from None
    return FacePipeline(detector, emb, settings)


def register(sub, common):
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("gallery", help="build, edit and inspect gallery files",
                       description="Build, edit and inspect gallery files (docs/gallery-format.md).")
    gsub = p.add_subparsers(dest="gallery_command", metavar="ACTION")
    gsub.required = True
    _register_build(gsub, common, fmt)
    _register_add(gsub, common, fmt)
    _register_inspect(gsub, common)


def _register_build(gsub, common, fmt) -> None:
    b = gsub.add_parser(
        "build", parents=[common], formatter_class=fmt,
        help="enrol every person of a folder (one sub-folder per person) into a new gallery",
        description="Enrol DIR: one sub-folder per person (the folder name is the identity id; "
                    "underscores become spaces in the display name), several photos each. "
                    "Each photo contributes the face nearest its centre; photos with no face, "
                    "or a face below the quality minimums, are reported and skipped.\n\n"
                    + EXIT_HELP)
    b.add_argument("dir", metavar="DIR")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="gallery file to write")
    b.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage type of the embeddings (default float32; float16 halves "
                        "the file and, with edged.gallery._scan built, scans galleries of 100k rows "
                        "or more about twice as fast; docs/benchmarks.md)")
    b.add_argument("--keep-low-quality", action="store_true",
                   help="enrol faces below the quality minimums too")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pipeline_options(b)
    b.set_defaults(func=run(cmd_build))


def _register_add(gsub, common, fmt) -> None:
    a = gsub.add_parser(
        "add", parents=[common], formatter_class=fmt,
        help="add photos of a person (new or enrolled) to a gallery",
        description="Add the central face of each IMAGE to NAME's rows (NAME is an enrolled "
                    "identity's id or display name, or a new person). FILE is created when it "
                    "does not exist.\n\n" + EXIT_HELP)
    a.add_argument("file", metavar="FILE")
    a.add_argument("name", metavar="NAME")
    a.add_argument("images", nargs="+", metavar="IMAGE")
    a.add_argument("--id", dest="ident", metavar="ID",
                   help="identity id for a new person (default: NAME with spaces as underscores)")
    a.add_argument("--keep-low-quality", action="store_true",
                   help="enrol faces below the quality minimums too")
    a.add_argument("--dtype", choices=["float32", "float16"], default=None,
                   help="storage type for a new file (default: keep the file's; new: float32)")
    pipeline_options(a)
    a.set_defaults(func=run(cmd_add))


def _register_inspect(gsub, common) -> None:
    """remove, list and info."""
    r = gsub.add_parser("remove", parents=[common], help="remove a person from a gallery",
                        description="Remove the identity whose id or display name is NAME, with "
                                    "all its rows.")
    r.add_argument("file", metavar="FILE")
    r.add_argument("name", metavar="NAME")
    r.set_defaults(func=run(cmd_remove))

    ls = gsub.add_parser("list", parents=[common], help="list the enrolled people")
    ls.add_argument("file", metavar="FILE")
    ls.add_argument("--json", action="store_true",
                    help='print [{"id", "name", "rows"}]')
    ls.set_defaults(func=run(cmd_list))

    inf = gsub.add_parser("info", parents=[common],
                          help="header, counts, embedder sha256 and a full check of a gallery",
                          description="Print the header and counts of FILE and check it fully "
                                      "(checksum, rows). Exit status 1 when the check fails.")
    inf.add_argument("file", metavar="FILE")
    inf.add_argument("--json", action="store_true", help="print the fields as JSON")
    inf.set_defaults(func=run(cmd_info))


def run(fn):
    """The command ``fn`` with its failures as one line on stderr and an exit status: a
    :class:`Fail`, and any :class:`edged.gallery.GalleryError` (status 1) wherever it comes
    from, never a traceback for a bad file."""
    from edged.gallery import GalleryError

    def handler(args) -> int:
        try:
            return int(fn(args) or 0)
        except (Fail, GalleryError) as exc:
            print(f"edged gallery {args.gallery_command}: {exc}", file=sys.stderr)
            return exc.code if isinstance(exc, Fail) else 1
    return handler


# ---------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr when it is a terminal; plain report lines otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._drawn = False

    def _bar(self, label: str) -> str:
        frac = self.done / self.total
        width = 30
        fill = int(round(frac * width))
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{rate:.1f} img/s {label[-40:]}")

    def step(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[K" + self._bar(label))
            sys.stderr.flush()
            self._drawn = True
        elif self.done == self.total or self.done % 25 == 0:
            sys.stderr.write(self._bar(label) + "\n")

    def say(self, line: str) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(line + "\n")
        if self._drawn:
            sys.stderr.write(self._bar(""))
        sys.stderr.flush()

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            self._drawn = False


# ---------------------------------------------------------------------------- enrolling


def enrol_image(pipe, path, keep_low_quality: bool, say) -> "np.ndarray | None":
    """The embedding of the face nearest the centre of ``path``, or None (reported)."""
    from edged.vision.imageio import ImageError, load_image
    from edged.vision.pipeline import central_face

    try:
        img = load_image(path)
    except ImageError as exc:
        say(f"{path}: cannot read: {exc}; skipped")
        return None
    faces = pipe.detect(img)
    if not faces:
        say(f"{path}: no face found; skipped")
        return None
    face = central_face(faces, img.shape)
    if len(faces) > 1:
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        say(f"{path}: {len(faces)} faces; took the one nearest the centre "
            f"[{x1}, {y1}, {x2}, {y2}]")
    q = face.quality
    if q is not None and not q.passed and not keep_low_quality:
        say(f"{path}: low quality face (score {q.score:.2f}, {q.size_px:.0f} px, sharpness "
            f"{q.sharpness:.0f}, frontal {q.frontal:.2f}); skipped")
        return None
    pipe.embed_faces([face], only_passing=False)
    if face.embedding is None:
        say(f"{path}: no embedding; skipped")
        return None
    return np.asarray(face.embedding, dtype=np.float32)


def display_name(folder: str) -> str:
    return folder.replace("_", " ").strip() or folder


def ident_from_name(name: str) -> str:
    return re.sub(r"\s+", "_", name.strip())


def _check_output(out: Path) -> None:
    """Refuse an output path that cannot become the gallery file, naming why."""
    if out.is_dir():
        raise Fail(f"-o {out}: is a directory; give the gallery file's name, e.g. "
                   f"{out / 'gallery.edgal'}", 2)
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise Fail(f"-o {out}: {parent} is not a directory", 2)
    if not parent.is_dir():
        raise Fail(f"-o {out}: the directory {parent} does not exist", 2)
    if not os.access(parent, os.W_OK):
        raise Fail(f"-o {out}: cannot write in {parent}", 2)


def cmd_build(args) -> int:
    from edged.gallery import write_gallery

    root = Path(args.dir)
    if not root.is_dir():
        raise Fail(f"{root}: not a directory", 2)
    people = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = sorted(p for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_EXT)
        if imgs:
            people.append((d.name, imgs))
        else:
            print(f"{d}: no images; skipped", file=sys.stderr)
    if not people:
        raise Fail(f"{root}: no person folders with images (expected DIR/<person>/<photo>.jpg)")
    _check_output(Path(args.output))  # before minutes of enrolment, not after
    pipe = make_pipeline(args)
    total = sum(len(imgs) for _, imgs in people)
    bar = Progress(total, enabled=not args.quiet)
    idents, rows, embs = [], [], []
    skipped = 0
    try:
        for folder, imgs in people:
            got = 0
            for path in imgs:
                e = enrol_image(pipe, path, args.keep_low_quality, bar.say)
                bar.step(f"{folder}/{path.name}")
                if e is None:
                    skipped += 1
                    continue
                rows.append(len(idents))
                embs.append(e)
                got += 1
            if got:
                idents.append((folder, display_name(folder)))
            else:
                bar.say(f"{root / folder}: no usable photo; {folder} not enrolled")
    finally:
        bar.close()
    if not idents:
        raise Fail(f"{root}: no face could be enrolled")
    checksum = _write(write_gallery, args.output, idents, rows, np.stack(embs),
                      pipe.embedder_sha256, dtype=args.dtype)
    print(f"wrote {args.output}: {len(idents)} people, {len(embs)} photos enrolled, {skipped} "
          f"skipped; embedder {pipe.embedder.name}; checksum {checksum}")
    return 0


def _write(write_gallery, path, *a, **kw) -> str:
    try:
        return write_gallery(path, *a, **kw)
    except OSError as exc:
        raise Fail(f"{path}: cannot write: {exc.strerror or exc}") from None


def _open_for_edit(path: Path):
    from edged.gallery import GalleryError, read_entries

    try:
        return read_entries(path)
    except GalleryError as exc:
        raise Fail(str(exc)) from None


def cmd_add(args) -> int:
    from edged.gallery import write_gallery

    path = Path(args.file)
    if path.exists():
        idents, ri, emb, sha, dtype = _open_for_edit(path)
        idents, ri, emb = list(idents), list(ri), list(emb)
    else:
        idents, ri, emb, sha, dtype = [], [], [], None, "float32"
    dtype = args.dtype or dtype
    from edged.gallery import embedder_label, embedder_name

    pipe = make_pipeline(args, embedder_name(sha) if sha is not None else None)
    if sha is not None and sha != pipe.embedder_sha256:
        raise Fail(f"{path}: made by embedder {embedder_label(sha)}, the embedder used now is "
                   f"{embedder_label(pipe.embedder_sha256)}; rebuild the gallery with "
                   f"'edged gallery build' and one embedder")
    j = next((k for k, (i, n) in enumerate(idents) if args.name == i), None)
    if j is None:
        j = next((k for k, (i, n) in enumerate(idents) if args.name == n), None)
    new = j is None
    if new:
        ident = args.ident or ident_from_name(args.name)
        if not ident:
            raise Fail("NAME must not be empty", 2)
        if any(i == ident for i, _ in idents):
            raise Fail(f"identity id {ident!r} already exists with another name; pass --id")
        j = len(idents)
    added = 0
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    for img in args.images:
        e = enrol_image(pipe, img, args.keep_low_quality, say)
        if e is not None:
            ri.append(j)
            emb.append(e)
            added += 1
    if not added:
        raise Fail(f"no usable face in {len(args.images)} image(s); {path} unchanged")
    if new:
        idents.append((ident, args.name))
    checksum = _write(write_gallery, path, idents, ri, np.stack(emb), pipe.embedder_sha256,
                      dtype=dtype)
    who = idents[j]
    print(f"{'enrolled' if new else 'added to'} {who[1]} ({who[0]}): {added} photo(s); "
          f"{path} now has {len(idents)} people, {len(emb)} rows; checksum {checksum}")
    return 0


def cmd_remove(args) -> int:
    from edged.gallery import write_gallery

    path = Path(args.file)
    idents, ri, emb, sha, dtype = _open_for_edit(path)
    j = next((k for k, (i, n) in enumerate(idents) if args.name == i), None)
    if j is None:
        j = next((k for k, (i, n) in enumerate(idents) if args.name == n), None)
    if j is None:
        import difflib
        near = difflib.get_close_matches(args.name, [n for _, n in idents] + [i for i, _ in idents],
                                         n=3)
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise Fail(f"{path}: no identity with id or name {args.name!r}{hint}")
    keep = ri != j
    new_ri = ri[keep]
    new_ri = np.where(new_ri > j, new_ri - 1, new_ri)
    gone = idents.pop(j)
    checksum = _write(write_gallery, path, idents, new_ri, emb[keep], sha, dtype=dtype)
    print(f"removed {gone[1]} ({gone[0]}, {int((~keep).sum())} rows); {path} now has "
          f"{len(idents)} people; checksum {checksum}")
    return 0


def cmd_list(args) -> int:
    from edged.gallery import Gallery, GalleryError

    try:
        with Gallery.open(args.file, expect_dim=None) as g:
            rows = [{"id": i, "name": n, "rows": g.rows_of(j)[1] - g.rows_of(j)[0]}
                    for j, (i, n) in enumerate(g.identities)]
    except GalleryError as exc:
        raise Fail(str(exc)) from None
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    w = max([len(r["id"]) for r in rows] + [2])
    for r in rows:
        print(f"{r['id']:<{w}}  {r['rows']:>3}  {r['name']}")
    print(f"{len(rows)} people, {sum(r['rows'] for r in rows)} rows", file=sys.stderr)
    return 0


def _date(t: float) -> str:
    """A creation time as an ISO date, or the number itself when it is no date."""
    try:
        d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{t!r} (not a valid date)"
    return d.isoformat(timespec="seconds")


_SCAN_WORDS = {
    "blas": "float32 matrix product (numpy's BLAS)",
    "avx2": "compiled float16 scan (AVX2, F16C)",
    "neon": "compiled float16 scan (NEON)",
    "opencv": "float16 widened per block by OpenCV (no compiled scan here: slower)",
    "numpy": "float16 widened per block by numpy (no compiled scan here: slower)",
}


def cmd_info(args) -> int:
    from edged.gallery import Gallery, GalleryError

    path = Path(args.file)
    try:
        with Gallery.open(path, expect_dim=None, verify=False) as g:
            info = g.info()
            t0 = time.monotonic()
            try:
                g.verify()
                info["check"] = "OK"
            except GalleryError as exc:
                info["check"] = exc.reason
            info["check_seconds"] = round(time.monotonic() - t0, 4)
    except GalleryError as exc:
        if args.json:
            print(json.dumps({"path": str(path), "check": exc.reason}))
        raise Fail(str(exc)) from None
    ok = info["check"] == "OK"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if ok else 1
    rpi = info["rows_per_identity"]
    print(f"file            {info['path']} ({info['file_size']} bytes)")
    print(f"format version  {info['format_version']}")
    print(f"created         {_date(info['created'])}")
    print(f"embeddings      {info['rows']} rows x {info['dim']} {info['dtype']}")
    print(f"identities      {info['identities']} (rows each: {rpi['min']}..{rpi['max']})")
    print(f"embedder        {info['embedder']} ({info['dim']} values)")
    print(f"embedder sha256 {info['embedder_sha256']}")
    print(f"search          {_SCAN_WORDS.get(info['scan'], info['scan'])}")
    print(f"checksum        {info['checksum']} "
          f"{'OK' if ok else 'FAILED: ' + info['check']} ({info['check_seconds']} s)")
    return 0 if ok else 1
