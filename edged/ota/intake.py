"""A dropped file: what kinds there are, how it is read safely and identified.

The model roles and the suffixes watched; :class:`DropRejected`, the refusal raised when a drop
is not taken; reading a dropped file without following links or reading past its size limit
(:func:`open_drop`), its sha256 and its *signature* (which version of the file it is), when it
arrived, and a drop manifest read through the same checks (:func:`load_manifest`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from edged import safefile

from edged.runtime import modelstore
from edged.safefile import SYMLINK_REASON  # noqa: F401 (the reason's wording, docs/ota.md)
from edged.runtime.tflitefile import FILE_IDENTIFIER

ROLES = modelstore.ROLES
#: roles a drop may also bring: in the set only while its stage is on (liveness.enabled)
OPTIONAL_ROLES = ("antispoof",)
DROP_ROLES = ROLES + OPTIONAL_ROLES
DETECTOR_ROLES = ("pnet", "rnet", "onet")
MODEL_SUFFIXES = (".tflite",)
MANIFEST_SUFFIX = ".json"
GALLERY_SUFFIX = ".edgal"


class DropRejected(Exception):
    """A drop is refused; ``reason`` says why (reported on MQTT status and in the journal)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def short(sha: Optional[str]) -> str:
    return (sha or "none")[:12]


def iso(t: float) -> str:
    from edged.publish.publisher import iso_utc
    return iso_utc(t)


def arrival_ns(st: os.stat_result) -> int:
    """When a file arrived, written or renamed into place: the later of its mtime and ctime (a
    rename, by mv or rsync, keeps the file's old mtime but sets its ctime)."""
    return max(st.st_mtime_ns, st.st_ctime_ns)


def arrived_before(a: Path, b: Path) -> bool:
    """Whether file ``a`` arrived before file ``b``."""
    try:
        return arrival_ns(os.lstat(a)) < arrival_ns(os.lstat(b))
    except OSError:
        return False


# ---------------------------------------------------------------------------- reading drops

#: a drop manifest names a few files: a bigger one is refused unread
MANIFEST_MAX_BYTES = 1 << 20
LIMIT_NAME = "drops.max_bytes"
GALLERY_LIMIT_NAME = "drops.max_gallery_bytes"
MANIFEST_LIMIT_NAME = "a drop manifest's limit"


def check_file(path: Path, st: os.stat_result, limit: int, limit_name: str = LIMIT_NAME) -> None:
    """Refuse, from its ``lstat`` (or ``fstat``) alone, what is never read as a drop: a
    symbolic link (its target may be any file of the system), anything but a regular file
    (reading a FIFO blocks until a writer comes), and a file over ``limit`` bytes."""
    try:
        safefile.check_plain(st)
    except safefile.NotPlain as exc:
        raise DropRejected(f"{path}: {exc.reason}") from None
    if st.st_size > limit:
        raise DropRejected(f"{path}: {st.st_size} bytes, more than {limit_name} ({limit}); "
                           f"refused unread")


def open_drop(path: Path, limit: int, limit_name: str = LIMIT_NAME):
    """The dropped file ``path`` open for reading (binary), after :func:`check_file` on its
    ``lstat`` (nothing is opened that is not a regular file) and again on the open file; the
    last path component is never followed (``O_NOFOLLOW``).  Raises DropRejected."""
    try:
        f = safefile.open_plain(path)
    except safefile.NotPlain as exc:
        raise DropRejected(f"{path}: {exc.reason}") from None
    except OSError as exc:
        raise DropRejected(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        check_file(path, os.fstat(f.fileno()), limit, limit_name)
    except BaseException:
        f.close()
        raise
    return f


def check_magic(where, head: bytes) -> None:
    """Refuse what does not begin as a TFLite model does; the reason never quotes the bytes
    (they may be anything, and reasons go onto MQTT)."""
    if len(head) < 8:
        raise DropRejected(f"{where}: {len(head)} bytes, too short for a TFLite model"
                           if head else f"{where}: empty file, not a TFLite model")
    if bytes(head[4:8]) != FILE_IDENTIFIER:
        raise DropRejected(f"{where}: not a TFLite model (wrong magic)")


def signature(st: os.stat_result) -> tuple:
    """Which version of a file this is (another write or rename changes it)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_model(path: Path, limit: int) -> tuple:
    """``(bytes, signature)`` of a dropped model: checked by :func:`open_drop`, its magic read
    before the rest, never more than ``limit`` bytes."""
    with open_drop(path, limit) as f:
        head = f.read(8)
        check_magic(path, head)
        data = head + f.read(limit + 1 - len(head))
        sig = signature(os.fstat(f.fileno()))
    if len(data) > limit:  # it grew while it was read
        raise DropRejected(f"{path}: more than {LIMIT_NAME} ({limit}) bytes; refused")
    return data, sig


def digest_model(path: Path, limit: int) -> tuple:
    """``(sha256, size, signature)`` of a dropped model, hashed as it is read (never held in
    memory whole), its magic checked first."""
    with open_drop(path, limit) as f:
        head = f.read(8)
        check_magic(path, head)
        h, n = hashlib.sha256(head), len(head)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n, signature(os.fstat(f.fileno()))


def digest_file(path: Path, limit: int = MANIFEST_MAX_BYTES) -> str:
    """sha256 of a dropped file (a manifest), read through :func:`open_drop`, streamed."""
    h = hashlib.sha256()
    with open_drop(path, limit) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: Path) -> modelstore.Manifest:
    """A drop manifest, read through :func:`open_drop` (at most MANIFEST_MAX_BYTES)."""
    with open_drop(path, MANIFEST_MAX_BYTES, MANIFEST_LIMIT_NAME) as f:
        raw = f.read(MANIFEST_MAX_BYTES + 1)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DropRejected(f"cannot read model manifest {path}: not UTF-8 text") from None
    except RecursionError:
        raise DropRejected(f"cannot read model manifest {path}: nested too deeply") from None
    except ValueError as exc:
        raise DropRejected(f"cannot read model manifest {path}: {exc}") from None
    try:
        return modelstore.Manifest(data, path)
    except modelstore.ModelError as exc:
        raise DropRejected(str(exc)) from None

