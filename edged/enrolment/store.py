"""Kept track faces: the best crops of each ended track, on the board only (docs/enrolment.md).

One file per track, ``<state_dir>/tracks/<id>.npz`` (mode 0600, directory 0700), written
atomically: the aligned 112x112 crops (BGR), their embeddings, quality scores and whether they
met the quality minimums, and a JSON document with the camera, the times, the outcome
(``recognized`` as whom, ``unknown`` or ``undecided``) and the embedder's sha256. Files older
than ``keep_days`` and beyond the newest ``max_tracks`` are deleted.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from edged.runtime.modelstore import atomic_write

log = logging.getLogger("edged.enrolment")

TRACKS_DIR = "tracks"
FILE_MODE = 0o600
DIR_MODE = 0o700
SUFFIX = ".npz"
ID_RE = re.compile(r"^[0-9a-f]{8,32}$")
OUTCOMES = ("recognized", "unknown", "undecided", "spoof")


@dataclass
class EnrolmentSettings:
    keep_faces: bool = field(default=False, metadata={
        "help": "keep the best aligned face crops of each ended track under "
                "<state_dir>/tracks (on the board only, files 0600) to enrol from them later "
                "(edged tracks, docs/enrolment.md)"})
    faces_per_track: int = field(default=3, metadata={
        "min": 1, "max": 10, "help": "crops kept per track, the best by quality"})
    keep_days: float = field(default=7.0, metadata={
        "min": 0.0001, "max": 3650.0, "help": "kept tracks older than this are deleted"})
    max_tracks: int = field(default=500, metadata={
        "min": 1, "max": 100000, "help": "at most this many kept tracks, the newest"})
    mqtt_commands: bool = field(default=False, metadata={
        "help": "act on <prefix>/command/enrol (protect the topic with broker ACLs: anyone "
                "who may publish there can enrol a face under any name)"})


class TrackNotFound(KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else "no such kept track"


@dataclass
class KeptFace:
    image: np.ndarray  # 112 x 112 x 3 BGR uint8 (aligned)
    embedding: np.ndarray  # float32, L2-normalised
    quality: float  # the combined score in [0, 1]
    passed: bool  # whether it met the quality minimums


@dataclass
class KeptTrack:
    id: str
    camera: str
    track_id: int
    started: float  # epoch seconds of the first and last sighting
    ended: float
    outcome: str  # one of OUTCOMES
    embedder: str  # sha256 of the embedder that made the embeddings
    name: Optional[str] = None  # recognized as (display name, identity id)
    identity: Optional[str] = None
    best_score: Optional[float] = None  # the best match score seen
    faces: List[KeptFace] = field(default_factory=list)  # (empty when listed without them)
    n_faces: int = 0  # how many crops the file holds
    best_quality: float = 0.0  # the best of their quality scores

    def summary(self) -> dict:
        """The JSON-able description (no crops, no embeddings)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "faces"}
        if self.faces:
            d["n_faces"] = len(self.faces)
            d["best_quality"] = round(max(f.quality for f in self.faces), 4)
        return d


class TrackStore:
    """The kept tracks under ``root`` (``<state_dir>/tracks``)."""

    def __init__(self, root, settings: Optional[EnrolmentSettings] = None):
        self.root = Path(root)
        self.s = settings or EnrolmentSettings()

    @classmethod
    def of_state_dir(cls, state_dir, settings: Optional[EnrolmentSettings] = None) -> "TrackStore":
        return cls(Path(state_dir) / TRACKS_DIR, settings)

    @classmethod
    def for_daemon(cls, cfg) -> Optional["TrackStore"]:
        """The daemon's store under ``cfg`` (None: ``enrolment.keep_faces`` is off), pruned
        of what expired meanwhile."""
        if not cfg.enrolment.keep_faces:
            return None
        store = cls.of_state_dir(cfg.paths.state_dir, cfg.enrolment)
        try:
            store.prune()
        except OSError as exc:
            log.warning("kept track faces: cannot prune %s: %s", store.root, exc)
        return store

    def path_of(self, track_id: str) -> Path:
        if not ID_RE.match(track_id or ""):
            raise TrackNotFound(f"{track_id!r} is not a kept track's id (8 or more hex digits)")
        return self.root / (track_id + SUFFIX)

    def keep(self, track: KeptTrack) -> Path:
        """Write ``track`` (atomically, 0600), then delete what is past the retention."""
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        buf = io.BytesIO()
        faces = track.faces
        np.savez(buf, meta=np.frombuffer(json.dumps(track.summary()).encode(), np.uint8),
                 images=np.stack([f.image for f in faces]).astype(np.uint8),
                 embeddings=np.stack([f.embedding for f in faces]).astype(np.float32),
                 quality=np.array([f.quality for f in faces], np.float32),
                 passed=np.array([f.passed for f in faces], bool))
        path = self.path_of(track.id)
        atomic_write(path, buf.getvalue(), mode=FILE_MODE)
        self.prune()
        return path

    def load(self, track_id: str) -> KeptTrack:
        path = self.path_of(track_id)
        if not path.is_file():
            raise TrackNotFound(f"no kept track {track_id} in {self.root}")
        return _read(path)

    def find(self, prefix: str) -> KeptTrack:
        """The kept track whose id starts with ``prefix`` (at least 4 hex digits)."""
        if not re.match(r"^[0-9a-f]{4,32}$", prefix or ""):
            raise TrackNotFound(f"{prefix!r} is not a kept track's id (hex digits)")
        hits = [p for p in self._files() if p.stem.startswith(prefix)]
        if not hits:
            raise TrackNotFound(f"no kept track {prefix} in {self.root}")
        if len(hits) > 1:
            raise TrackNotFound(f"{prefix} names {len(hits)} kept tracks; give more digits")
        return _read(hits[0])

    def list(self, unknown_only: bool = False) -> List[KeptTrack]:
        """The kept tracks, newest first (without the expired ones)."""
        cutoff = time.time() - self.s.keep_days * 86400.0
        out = []
        for p in self._files():
            try:
                t = _read(p, faces=False)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("kept track %s cannot be read (%s); skipped", p, exc)
                continue
            if t.ended >= cutoff and (not unknown_only or t.outcome == "unknown"):
                out.append(t)
        return sorted(out, key=lambda t: t.ended, reverse=True)

    def forget(self, track_id: str) -> KeptTrack:
        track = self.find(track_id)
        self.path_of(track.id).unlink()
        return track

    def prune(self, now: Optional[float] = None) -> int:
        """Delete the kept tracks older than ``keep_days`` and beyond ``max_tracks``."""
        now = time.time() if now is None else now
        files = sorted(self._files(), key=lambda p: p.stat().st_mtime, reverse=True)
        cutoff = now - self.s.keep_days * 86400.0
        gone = 0
        for i, p in enumerate(files):
            try:
                if i >= self.s.max_tracks or p.stat().st_mtime < cutoff:
                    p.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
        return gone

    def _files(self) -> List[Path]:
        try:
            return [p for p in self.root.iterdir()
                    if p.suffix == SUFFIX and ID_RE.match(p.stem) and p.is_file()]
        except FileNotFoundError:
            return []


def _read(path: Path, faces: bool = True) -> KeptTrack:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        kept = []
        if faces:
            kept = [KeptFace(image=z["images"][i], embedding=z["embeddings"][i],
                             quality=float(z["quality"][i]), passed=bool(z["passed"][i]))
                    for i in range(len(z["quality"]))]
    return KeptTrack(faces=kept, **meta)


def file_mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def kept_track_of(ev) -> Optional[KeptTrack]:
    """The kept track of a ``track_ended`` event that carries its crops (``Event.kept``)."""
    kept = getattr(ev, "kept", None)
    if not kept or not kept.get("crops"):
        return None
    if ev.identity:
        outcome = "recognized"
    else:
        outcome = {"unknown": "unknown", "spoof": "spoof"}.get(kept.get("state"), "undecided")
    faces = [KeptFace(image=img, embedding=emb, quality=float(q), passed=bool(ok))
             for q, img, emb, ok in kept["crops"]]
    return KeptTrack(id=ev.id[:12], camera=ev.camera, track_id=int(ev.track_id),
                     started=float(kept.get("started") or ev.frame_time),
                     ended=float(ev.frame_time), outcome=outcome,
                     embedder=str((ev.versions or {}).get("embedder") or ""), name=ev.name,
                     identity=ev.identity, best_score=ev.best_score, faces=faces,
                     n_faces=len(faces), best_quality=round(max(f.quality for f in faces), 4))
