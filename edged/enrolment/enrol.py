"""Enrolling a kept track: its crops' embeddings become rows of a person in a gallery file.

:func:`enrol_track` checks the track with the guard (:mod:`edged.enrolment.guard`), adds the
embeddings of its passing crops (all of them with ``force``) to the named person, new or
enrolled, and writes the gallery atomically (:func:`edged.gallery.write_gallery`: temporary
file, fsync, rename), keeping the file's dtype.  The running daemon's watcher on the gallery
path sees the whole new file and hot-swaps it like any gallery drop.  Two enrolments at once
(the CLI and an MQTT command) are serialised by a lock on ``.<gallery name>.lock`` beside the
file (hidden: the drop watchers ignore it), so neither loses the other's rows.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from edged.enrolment.guard import check_track, enrolled_faces, identification_threshold, target_of
from edged.enrolment.store import KeptTrack

log = logging.getLogger("edged.enrolment")

LOCK_MODE = 0o600


class EnrolmentRefused(Exception):
    """The guard's reasons not to enrol a track (``reasons``: full sentences, each a
    :class:`edged.enrolment.guard.Reason` with ``code`` and ``forceable``)."""

    def __init__(self, reasons):
        self.reasons = list(reasons)
        super().__init__(" ".join(self.reasons))

    def __str__(self) -> str:
        return " ".join(self.reasons)

    @property
    def forceable(self) -> bool:
        """Whether ``force`` would have enrolled the track anyway."""
        return all(getattr(r, "forceable", True) for r in self.reasons)


@contextlib.contextmanager
def gallery_lock(path: Path):
    """Hold the lock of the gallery file ``path`` (blocking) for one read-modify-write."""
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def enrol_track(track: KeptTrack, gallery_path, name: str, ident: Optional[str] = None,
                force: bool = False, threshold: Optional[float] = None) -> dict:
    """Add ``track``'s crops to ``name`` (an enrolled identity's id or display name, or a new
    person with id ``ident``, default the name with spaces as ``_``) in the gallery file
    ``gallery_path`` (created float32 when missing).

    Raises :class:`EnrolmentRefused` with the guard's reasons unless ``force`` (then they are
    the result's warnings); what ``force`` cannot override (no crops, another embedder, an id
    taken by another name) is refused always.  :class:`edged.gallery.GalleryError` for a
    gallery that cannot be read, :class:`OSError` for one that cannot be written.  Returns
    ``{"track", "identity", "name", "new", "rows_added", "rows", "people", "gallery",
    "checksum", "threshold", "warnings"}``.
    """
    from edged.gallery import Gallery, write_gallery

    path = Path(gallery_path)
    with gallery_lock(path):
        gallery = Gallery.open(path, expect_dim=None) if os.path.lexists(path) else None
        try:
            reasons = check_track(track, gallery, name, ident, threshold)
            if gallery is None:
                idents, ri, emb, dtype = [], np.zeros(0, np.int64), None, "float32"
            else:  # (what edged.gallery.read_entries reads, from the file just checked)
                idents, ri, emb, dtype = (list(gallery.identities),
                                          np.array(gallery.row_identity, dtype=np.int64),
                                          gallery.embeddings(), gallery.dtype_name)
        finally:
            if gallery is not None:
                gallery.close()
        if reasons and (not force or not all(r.forceable for r in reasons)):
            raise EnrolmentRefused(reasons)
        j, ident, shown = target_of(idents, name, ident)
        new = j is None
        if new:
            j = len(idents)
            idents.append((ident, shown))
        faces = enrolled_faces(track, force)
        add = np.stack([np.asarray(f.embedding, np.float32) for f in faces])
        ri = np.concatenate([ri, np.full(len(add), j, np.int64)])
        emb = add if emb is None else np.concatenate([emb, add])
        checksum = write_gallery(path, idents, ri, emb, track.embedder, dtype=dtype)
    warnings: List[str] = [str(r) for r in reasons]
    log.info("enrolled track %s as %s (%s): %d row(s) added to %s%s", track.id, shown, ident,
             len(add), path, f", forced past: {' '.join(warnings)}" if warnings else "")
    return {"track": track.id, "identity": ident, "name": shown, "new": new,
            "rows_added": int(len(add)), "rows": int(len(emb)), "people": len(idents),
            "gallery": str(path), "checksum": checksum,
            "threshold": identification_threshold(track.embedder, threshold),
            "warnings": warnings}
