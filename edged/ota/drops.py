"""Over-the-air drops: new models and galleries taken by the running daemon.

Files arrive in the *drop directory* (``paths.drop_dir``, by default the models directory)
and at the gallery path, by any means (rename, new file, in-place copy): one
:class:`edged.ota.hotswap.FileWatcher` per directory reports each file once it has arrived, and
:class:`DropManager` handles the files one at a time, on the watcher's thread (at the process's
own priority: see :meth:`DropManager._on_file`), never on the frame path:

``*.json``
    a *drop manifest*, the same format as the repository's ``models/manifest.json``: for each
    model its ``role`` (pnet, rnet, onet, embedder), ``file`` (next to the manifest), ``sha256``
    and ``size`` (and optionally ``derived``: the dynamic-batch copy of an embedder and its
    sha256).  Files it names that are not there yet, or not whole yet (their size differs
    from the manifest's: a copy in progress), are waited for; a whole file whose sha256
    differs is refused.
``*.tflite``
    a model.  Named by a manifest that is waiting: handled with it.  Otherwise its sha256 must
    be that of a model known to the manifest in force (the installed manifest plus the drop
    manifests accepted since start), which also gives its role.
the gallery file (``paths.gallery``)
    a gallery: taken when it was made by the embedder in service, swapped together with the
    held-back embedder when it was made by that one, refused otherwise.

A model drop is checked (sha256, TFLite structure), a MobileFaceNet with its batch baked at 2
gets its dynamic-batch copy (as ``edged models install`` does), then every new model passes a
self-test (built with the configured accelerator, one invoke on a fixed input, outputs finite
and of the expected shapes), the new interpreters are built and warmed up, and the new
:class:`edged.ota.modelset.ServiceSet` replaces the old one between two frames.

A new embedder is held back when the gallery in service was made by another one (its vectors
would mean nothing to it) until a gallery made by it arrives; then both go into service in
one swap.  After a model swap the new set is on *probation*: if one of its first frames raises,
or the embedder gives a non-finite vector, the previous set goes back into service
(rollback); after ``drops.probation_frames`` good frames (with at least one embedding when
the embedder changed) or ``drops.probation_s`` seconds without a failure, the previous set is
released.  Every outcome is reported through ``report(record)`` (journal and MQTT status).
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from edged.runtime import modelstore
from edged.ota.hotswap import FileWatcher, default_filter
from edged.ota.gallerydrop import GalleryDrops
from edged.ota.inprogress import DropsInProgress
from edged.ota.intake import (GALLERY_LIMIT_NAME, GALLERY_SUFFIX, LIMIT_NAME, MANIFEST_LIMIT_NAME,
                              MANIFEST_MAX_BYTES, MANIFEST_SUFFIX, MODEL_SUFFIXES, DropRejected,
                              arrival_ns, check_file, iso)
from edged.ota.modeldrops import ModelDrops
from edged.ota.probation import Probation, Probations
from edged.ota.store import HeldEmbedder
log = logging.getLogger("edged.ota")


@dataclass
class DropSettings:
    """The ``drops:`` section: over-the-air model and gallery drops (docs/ota.md)."""

    enabled: bool = field(default=True, metadata={
        "help": "watch the drop directory (paths.drop_dir) for model drops; the gallery path is "
                "watched either way"})
    manifest_wait_s: float = field(default=2.0, metadata={
        "min": 0.0, "max": 3600.0,
        "help": "how long a model file that no manifest names waits for one (copied before "
                "its manifest) before it is refused as unknown (seconds)"})
    max_bytes: int = field(default=256 * 1024 * 1024, metadata={
        "min": 4096, "max": 1 << 40,
        "help": "largest model file taken as a drop, in bytes; a bigger one is refused by its "
                "size before it is read (the largest published model is about 39 MB)"})
    max_gallery_bytes: int = field(default=4 * 1024 * 1024 * 1024, metadata={
        "min": 4096, "max": 1 << 40,
        "help": "largest gallery file taken (at start, SIGHUP or as a drop), in bytes; a bigger "
                "one is refused by its size before it is read (1M people with 1 photo each in "
                "float32 is about 750 MB)"})
    manifest_deadline_s: float = field(default=3600.0, metadata={
        "min": 1.0, "max": 7 * 86400.0,
        "help": "how long a drop manifest waits for the files it names (not there, or not "
                "whole yet) before it is refused (seconds; counted across restarts)"})
    probation_frames: int = field(default=5, metadata={
        "min": 1, "max": 10000,
        "help": "a new model set is confirmed after this many good frames (and one embedding "
                "when the embedder changed); a failure before that rolls it back"})
    probation_s: float = field(default=8.0, metadata={
        "min": 0.1, "max": 3600.0,
        "help": "... or after this long without a failure (no frame: camera down, no face)"})


class DropManager(DropsInProgress, ModelDrops, GalleryDrops, Probations):
    """Watches the drop directory and the gallery; puts good drops in service (module doc).

    ``daemon`` (the service) provides: ``service`` (the set in service, with ``models``,
    ``gallery``, ``versions``), ``cfg``, ``cameras``, ``sets`` (:class:`edged.ota.modelset.ModelSets`:
    ``make_set``, ``new_gallery_holder``, ``gallery_event_handler``, ``warm_up``, ``swap``,
    ``rollback``, ``confirm``) and ``status`` (``report(record)``).

    This class is the entry point: the state of the drops (``__init__``), the watchers, one
    file at a time to its handler, its outcome reported, and the main loop's :meth:`tick`.
    Each other job is a part of its own, in its own module, working on this state:
    :class:`~edged.ota.modeldrops.ModelDrops` (manifests and models),
    :class:`~edged.ota.gallerydrop.GalleryDrops` (the gallery path),
    :class:`~edged.ota.probation.Probations` (the swap and its probation) and
    :class:`~edged.ota.inprogress.DropsInProgress` (the held-back embedder and the waiting
    manifests, kept across restarts).  They share the state (the drops wait on each other, all
    under one lock) rather than own parts of it; the daemon and the tests read and set it here.
    """

    def __init__(self, daemon, drop_dir, gallery_path, manifest: Optional[modelstore.Manifest],
                 settings: Optional[DropSettings] = None, debounce: float = 0.2,
                 settle: float = 10.0):
        self.d = daemon
        self.settings = settings or DropSettings()
        self.drop_dir = Path(os.path.abspath(drop_dir)) if drop_dir else None
        self.gallery_path = Path(os.path.abspath(gallery_path))
        self.known: Dict[str, tuple] = {}  # sha256 -> (role, derived sha256 or "")
        if manifest is not None:
            self.learn(manifest)
        self.pending: Dict[Path, modelstore.Manifest] = {}  # manifests waiting for files
        self.orphans: Dict[Path, tuple] = {}  # unknown model files waiting for a manifest
        # manifests whose file of that name is an older, other file: (since, t0)
        self.stale: Dict[Path, tuple] = {}
        # when each waiting manifest began to wait (epoch seconds: kept across restarts)
        self.waiting_since: Dict[Path, float] = {}
        # files named by a waiting manifest whose own arrival was reported: the drop's files,
        # not ones left by an earlier drop
        self.fresh: set = set()
        # file -> (signature, sha256, manifest or "" for a bare model): the version of each
        # file already handled, so that one drop is not handled (and counted) twice
        self.taken: Dict[Path, tuple] = {}
        self.held: Optional[HeldEmbedder] = None
        self.probation: Optional[Probation] = None
        self._lock = threading.RLock()  # one drop at a time (several watchers)
        self._plock = threading.Lock()  # one decision per probation (track and main threads)
        self._stopping = threading.Event()
        self.watchers: List[FileWatcher] = []
        self.debounce, self.settle = debounce, settle

    def learn(self, manifest: modelstore.Manifest) -> None:
        for e in manifest.entries.values():
            self.known[e.sha256] = (e.role, e.derived_sha256)
            if e.derived_sha256:
                self.known[e.derived_sha256] = (e.role, "")

    # -- life cycle -------------------------------------------------------------------------

    def start(self, since: Optional[float] = None, skip=()) -> None:
        """Watch the drop directory and the gallery's; then, with ``since`` (epoch seconds, when
        the daemon began loading what it runs), handle the files that arrived since then but
        before the watchers started (they would not be reported), but those in ``skip``."""
        watch_from = time.time()  # a file changed from now on is reported by the watchers
        dirs = {}
        if self.drop_dir is not None:
            dirs[self.drop_dir] = "drops"
        gdir = self.gallery_path.parent
        dirs.setdefault(gdir, "gallery")
        for d, name in dirs.items():
            if name == "drops" and not d.exists():
                try:  # (a directory of its own, as the docs advise, is not made by anything else)
                    d.mkdir(parents=True)
                    log.info("%s: created the drop directory", d)
                except OSError as exc:
                    log.warning("%s: cannot create the drop directory (%s)", d,
                                exc.strerror or exc)
            if not d.is_dir():
                log.warning("%s: directory does not exist: no drops are watched there", d)
                continue
            w = FileWatcher(d, self._on_file, match=self._match, debounce=self.debounce,
                            settle=self.settle, name=name)
            w.start()
            self.watchers.append(w)
        log.info("watching for drops in %s", ", ".join(str(w.directory) for w in self.watchers))
        if since is not None:
            skip = {Path(p) for p in skip}  # (the caller handles those itself)
            found = [p for p in self.arrived_since(since, watch_from) if p not in skip]
            if found:
                threading.Thread(target=lambda: [self._on_file(p) for p in found],
                                 name="drops-scan", daemon=True).start()

    def arrived_since(self, since: float, until: Optional[float] = None) -> List[Path]:
        """The watched files modified or renamed into place from ``since`` to ``until``
        (the later of mtime and ctime): models, then manifests,
        then the gallery (the order in which they are meant to arrive)."""
        found = []
        for w in self.watchers:
            try:
                names = os.listdir(w.directory)
            except OSError:
                continue
            for n in names:
                p = str(w.directory / n)
                if not self._match(p):
                    continue
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                arrived = arrival_ns(st) / 1e9
                if stat.S_ISREG(st.st_mode) and since <= arrived \
                        and (until is None or arrived < until):
                    found.append(Path(p))
        return sorted(found, key=lambda p: (p == self.gallery_path,
                                            p.suffix == MANIFEST_SUFFIX, p.name))

    def stop(self) -> None:
        self._stopping.set()
        p = self.probation
        if p is not None:
            p.done.set()
        for w in self.watchers:
            w.stop()
        self.watchers = []

    def _match(self, path: str) -> bool:
        if not default_filter(path):
            return False
        if path == str(self.gallery_path):
            return True
        if self.drop_dir is None or os.path.dirname(path) != str(self.drop_dir):
            return False
        return path.endswith(MODEL_SUFFIXES + (MANIFEST_SUFFIX, GALLERY_SUFFIX))

    # -- the watcher's thread ---------------------------------------------------------------
    def _on_file(self, path: Path) -> None:
        # The watcher's thread keeps the process's priority.  At nice 19 it held the GIL while
        # a busy machine gave it no CPU, and the frame threads waited for it: gaps of 2.5 s in
        # the soak with two other processes busy, against 0.8 s (and 0.7 s before any drop)
        # at the same priority as the frames; the drops took 4 s each instead of 0.2 s.
        self.handle(path)

    def handle(self, path: Path) -> None:
        """Handle one arrived file (after any probation in progress); report its outcome."""
        path = Path(path)
        with self._lock:  # (re-entrant) one drop at a time, and never during a probation
            self.wait_probation()
            if self._stopping.is_set():
                return
            t0 = time.monotonic()
            self._outcome(path, t0, lambda: self._dispatch(path, t0))

    def _dispatch(self, path: Path, t0: float) -> None:
        try:
            check_file(path, os.lstat(path), *self._limit(path))
        except FileNotFoundError:
            pass  # gone again: the handler says what that means
        if path == self.gallery_path:
            self.handle_gallery(path, t0)
        elif path.suffix == GALLERY_SUFFIX:
            raise DropRejected(f"{path}: a gallery is taken only at the gallery path "
                               f"{self.gallery_path}: drop it there under that name")
        elif path.suffix == MANIFEST_SUFFIX:
            self.handle_manifest(path, t0)
        else:
            self.handle_model(path, t0)

    def _limit(self, path: Path) -> tuple:
        """The size limit for the file ``path`` and its name."""
        if path == self.gallery_path:
            return self.settings.max_gallery_bytes, GALLERY_LIMIT_NAME
        if path.suffix == MANIFEST_SUFFIX:
            return MANIFEST_MAX_BYTES, MANIFEST_LIMIT_NAME
        return self.settings.max_bytes, LIMIT_NAME

    def _outcome(self, path: Path, t0: float, step) -> None:
        """Run ``step()`` for the drop ``path``: a refusal, or any other failure, is reported,
        never raised (a drop never takes a watcher or the main loop down); the list of
        waiting manifests is kept on disk whatever happened."""
        try:
            step()
        except DropRejected as exc:
            self._report("rejected", self._kind_of(path), path, t0, why=exc.reason)
        except Exception as exc:
            log.exception("drop %s: unexpected failure", path)
            self._report("rejected", self._kind_of(path), path, t0,
                         why=f"{path}: unexpected failure: {exc}")
        finally:
            self._keep_pending()

    def _kind_of(self, path: Path) -> str:
        return "gallery" if path == self.gallery_path or path.suffix == GALLERY_SUFFIX else "models"

    def tick(self) -> None:
        """Called by the main loop: ends probations that saw no frame for probation_s, and
        refuses model files that no manifest claimed in time and manifests whose files did
        not arrive by their deadline (never waits for a drop)."""
        p = self.probation
        if p is not None:
            self._decide(p)
        if not (self.orphans or self.stale or self.waiting_since) \
                or not self._lock.acquire(blocking=False):
            return
        try:
            self._refuse_overdue()
        finally:
            self._lock.release()

    # -- reporting --------------------------------------------------------------------------

    def _record(self, result: str, kind: str, path, t0: float, why: str = "", old=None,
                new=None, files=None) -> dict:
        svc = self.d.service
        return {"kind": kind, "file": str(path), "files": files or [str(path)], "result": result,
                "trigger": "drop",
                "confirmed": result != "swapped",
                "why": why, "old": dict(old if old is not None else svc.versions),
                "new": dict(new or {}), "seconds": round(time.monotonic() - t0, 3),
                "time": iso(time.time())}

    def _report(self, result: str, kind: str, path, t0: float, why: str = "", new=None) -> None:
        self.d.status.report(self._record(result, kind, path, t0, why=why, new=new))
