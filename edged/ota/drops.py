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
:class:`edged.daemon.service.ServiceSet` replaces the old one between two frames.

A new embedder is held back when the gallery in service was made by another one (its vectors
would mean nothing to it) until a gallery made by it arrives; then both go into service in
one swap.  After a model swap the new set is on *probation*: if one of its first frames raises,
or the embedder gives a non-finite vector, the previous set goes back into service
(rollback); after ``drops.probation_frames`` good frames (with at least one embedding when
the embedder changed) or ``drops.probation_s`` seconds without a failure, the previous set is
released.  Every outcome is reported through ``report(record)`` (journal and MQTT status).
"""
from __future__ import annotations

import json
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
from edged.runtime.limits import check_drop
from edged.ota.intake import (
    GALLERY_LIMIT_NAME, GALLERY_SUFFIX, LIMIT_NAME, MANIFEST_LIMIT_NAME, MANIFEST_MAX_BYTES,
    MANIFEST_SUFFIX, MODEL_SUFFIXES, ROLES, DropRejected, arrival_ns, arrived_before, check_file,
    digest_file, digest_model, iso, load_manifest, read_model, short, signature)
from edged.ota.modelcheck import prepare_model, self_test
from edged.ota.store import HELD_DIR, PENDING_DOC, HeldEmbedder, ModelBlob, load_held, save_held
# (the daemon imports these from here until it is re-pointed)
from edged.ota.store import (check_paths, load_in_service, load_installed_copy,  # noqa: F401
                             save_in_service, save_installed_copy)

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


@dataclass
class _Probation:
    new: object  # ServiceSet
    old: object
    record: dict
    embedder_changed: bool
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)


#: how long a manifest waits when the file of that name is older than itself and not the one it
#: names (a copy of the new file may not have begun yet), before it is refused
STALE_WAIT_S = 60.0


class DropManager:
    """Watches the drop directory and the gallery; puts good drops in service (module doc).

    ``daemon`` (:class:`edged.daemon.service.Daemon`) provides: ``service`` (the set in service, with
    ``models``, ``gallery``, ``versions``), ``make_set(changed, gallery_holder)``,
    ``new_gallery_holder(embedder_sha)``, ``gallery_event_handler(holder)``,
    ``warm_up(set, parts)``, ``swap_service(set, record)``, ``rollback(...)``, ``confirm(...)``,
    ``cfg`` and ``report(record)``.
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
        self.probation: Optional[_Probation] = None
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

    def _state_dir(self) -> Optional[str]:
        """``paths.state_dir`` of the daemon (None for a daemon without a configuration)."""
        return getattr(getattr(getattr(self.d, "cfg", None), "paths", None), "state_dir", None)

    def _keep_held(self) -> None:
        state = self._state_dir()
        if not state:
            return
        try:
            save_held(state, self.held)
        except OSError as exc:
            log.warning("drops: cannot keep the held-back embedder for the next start: %s", exc)

    def restore_held(self) -> bool:
        """At start: the embedder held back before the restart is held back again.  Returns
        True when the gallery at the gallery path was made by it meanwhile (then the caller
        hands that file to :meth:`handle`, once the status says what is held)."""
        state = self._state_dir()
        try:
            held = load_held(state)
        except DropRejected as exc:
            log.warning("drops: the embedder held back before the restart is lost: %s "
                        "(drop it again)", exc)
            save_held(state, None)
            return False
        if held is None:
            return False
        save_held(state, None)  # forgotten while it is checked: a crash is not retried at start
        if held.blob.sha256 == self.d.service.models["embedder"].sha256:
            return False
        try:
            self_test(held.blob, self._accel("embedder"))
        except DropRejected as exc:
            log.warning("drops: the embedder held back before the restart fails now, forgotten: "
                        "%s", exc)
            return False
        self.held = held
        self._keep_held()
        log.info("drops: embedder %s (%s) is held back again, waiting for a gallery made by it",
                 short(held.blob.sha256), held.file or held.blob.file)
        return self.held_gallery_waiting()

    def held_gallery_waiting(self) -> bool:
        """Whether the file at the gallery path was made by the embedder held back (it came
        while the watch was not on it: edged was down, or the path just moved)."""
        held = self.held
        if held is None:
            return False
        try:
            from edged.gallery import peek_embedder
            return peek_embedder(self.gallery_path) == held.blob.sha256
        except Exception:
            return False

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

    def _pending_doc(self) -> Optional[Path]:
        state = self._state_dir()
        return Path(state) / HELD_DIR / PENDING_DOC if state else None

    def _keep_pending(self) -> None:
        """Keep the list of manifests waiting for their files across restarts (written only
        when it changed)."""
        doc_path = self._pending_doc()
        want = sorted(str(p) for p in self.pending)
        if doc_path is None or want == getattr(self, "_pending_kept", None):
            return
        try:
            if want:
                doc_path.parent.mkdir(parents=True, exist_ok=True)
                entries = []
                for p in want:
                    try:
                        entries.append({"manifest": p, "sha256": digest_file(Path(p)),
                                        "since": self.waiting_since.get(Path(p), time.time())})
                    except DropRejected:
                        pass
                modelstore.atomic_write(doc_path, (json.dumps({"waiting": entries}, indent=2)
                                                   + "\n").encode())
            else:
                try:
                    os.unlink(doc_path)
                except FileNotFoundError:
                    pass
            self._pending_kept = want
        except OSError as exc:
            log.warning("drops: cannot keep the waiting manifests for the next start: %s", exc)

    def restore_pending(self) -> List[Path]:
        """At start: the manifests that were waiting for their files before the restart and
        are still there, unchanged (the caller hands them to :meth:`handle` again)."""
        doc_path = self._pending_doc()
        if doc_path is None or not doc_path.is_file():
            return []
        try:
            entries = json.loads(doc_path.read_text())["waiting"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("drops: %s is unusable (%s); waiting manifests are forgotten",
                        doc_path, exc)
            return []
        out = []
        for e in entries:
            try:
                p = Path(e["manifest"])
                if self._match(str(p)) and digest_file(p) == e["sha256"]:
                    out.append(p)
                    self.waiting_since[p] = float(e.get("since") or time.time())
            except (DropRejected, KeyError, TypeError, ValueError):
                continue
        if out:
            log.info("drops: %d manifest(s) were waiting for their files before the restart: "
                     "%s", len(out), ", ".join(str(p) for p in out))
        return out

    def _kind_of(self, path: Path) -> str:
        return "gallery" if path == self.gallery_path or path.suffix == GALLERY_SUFFIX else "models"

    # -- models -----------------------------------------------------------------------------

    def handle_manifest(self, path: Path, t0: float) -> None:
        # a manifest written over one that waits for its files replaces it, even a bad one
        if path in self.pending:
            self._forget(path)
            log.info("drop %s: replaces the manifest of that name that waited for its files",
                     path)
        since = self.waiting_since.pop(path, None)  # (restored: it waited before the restart)
        manifest = load_manifest(path)
        if not manifest.entries:
            raise DropRejected(f"{path}: the manifest lists no model")
        limit = self.settings.max_bytes
        for e in manifest.entries.values():
            if e.role not in ROLES:
                raise DropRejected(f"{path}: role {e.role!r} is not used by the daemon "
                                   f"(roles: {', '.join(ROLES)})")
            if os.path.basename(e.file) != e.file:
                raise DropRejected(f"{path}: file {e.file!r} must be a plain name next to "
                                   f"the manifest")
            if e.size > limit:
                raise DropRejected(f"{path}: {e.file} is {e.size} bytes, more than "
                                   f"{LIMIT_NAME} ({limit})")
        for e in manifest.entries.values():
            if self.orphans.pop(path.parent / e.file, None) is not None:
                self.fresh.add(path.parent / e.file)
        self.pending[path] = manifest
        if since is not None:
            self.waiting_since[path] = since
        self._try_manifest(path, t0)

    def _forget(self, path: Path) -> None:
        """The manifest ``path`` waits no more (handled, refused or replaced)."""
        manifest = self.pending.pop(path, None)
        self.stale.pop(path, None)
        self.waiting_since.pop(path, None)
        for e in (manifest.entries.values() if manifest is not None else ()):
            self.fresh.discard(path.parent / e.file)

    def _missing(self, path: Path, manifest) -> List[str]:
        """The files the manifest names that are not there yet, or not all there (a copy in
        progress: its size differs); refuses one that is no file to read (a link...)."""
        missing = []
        for e in manifest.entries.values():
            f = path.parent / e.file
            try:
                st = os.lstat(f)
            except OSError:
                missing.append(e.file)
                continue
            check_file(f, st, self.settings.max_bytes)
            if st.st_size != e.size:
                missing.append(f"{e.file} ({st.st_size} of {e.size} bytes)")
        return missing

    def _wait(self, path: Path, t0: float, why: str) -> bool:
        self.waiting_since.setdefault(path, time.time())
        self._keep_pending()  # on disk before it is reported waiting
        self._report("waiting", "models", path, t0, why=why)
        return False

    def _try_manifest(self, path: Path, t0: float) -> bool:
        try:
            return self._attempt(path, t0)
        except DropRejected:
            self._forget(path)
            raise

    def _attempt(self, path: Path, t0: float) -> bool:
        manifest = self.pending[path]
        missing = self._missing(path, manifest)
        if missing:
            return self._wait(path, t0, f"waiting for {', '.join(missing)} named by the "
                                        f"manifest")
        if self._handled_bare(path, manifest):
            return True
        blobs = {}
        for e in manifest.entries.values():
            f = path.parent / e.file
            data, sig = read_model(f, self.settings.max_bytes)
            if f not in self.fresh and arrived_before(f, path) \
                    and modelstore.sha256_bytes(data) != e.sha256:
                # the file of that name from before the manifest (a new version of a model
                # often has the same size): its replacement may still be coming
                since, _ = self.stale.setdefault(path, (time.monotonic(), t0))
                if time.monotonic() - since < STALE_WAIT_S:
                    return self._wait(path, t0, (
                        f"waiting for {e.file} named by the manifest (the one there is older "
                        f"than the manifest and is not the file it names)"))
            blobs[e.role] = (e, f, data, sig)
        self._forget(path)
        self._keep_pending()  # off the disk (if it was kept) before the swap is reported
        for e, f, _, sig in blobs.values():  # (their own events, if still to come, are not
            self._took(f, sig, e.sha256, str(path))  # another drop)
        blobs = {role: prepare_model(role, data, f, e.sha256, e.size, e.derived_sha256 or None)
                 for role, (e, f, data, _) in blobs.items()}
        self._install(blobs, path, t0)
        self.learn(manifest)
        return True

    def _handled_bare(self, path: Path, manifest) -> bool:
        """Whether every file the manifest names was handled already, as it is now and with
        the sha256 it names, as a model known without a manifest (dropped just before its
        manifest): then the drop has had its outcome, and the manifest only teaches its
        sha256s."""
        for e in manifest.entries.values():
            f = path.parent / e.file
            t = self.taken.get(f)
            try:
                if t is None or t[1:] != (e.sha256, "") or t[0] != signature(os.lstat(f)):
                    return False
            except OSError:
                return False
        self._forget(path)
        self.learn(manifest)
        log.info("drop %s: its files were handled already (%s): one drop, one outcome", path,
                 ", ".join(e.file for e in manifest.entries.values()))
        return True

    def _took(self, f: Path, sig: tuple, sha: str, by: str) -> None:
        """Remember that this version of ``f`` has had its outcome (``by``: the manifest, or
        "" for a bare model)."""
        if len(self.taken) >= 256:  # forget the files changed or gone since
            for p, (old, _, _) in list(self.taken.items()):
                try:
                    if signature(os.lstat(p)) != old:
                        del self.taken[p]
                except OSError:
                    del self.taken[p]
        self.taken[f] = (sig, sha, by)

    def handle_model(self, path: Path, t0: float) -> None:
        self.orphans.pop(path, None)
        t = self.taken.get(path)
        if t is not None:
            try:
                if signature(os.lstat(path)) == t[0]:  # this very file had its outcome
                    log.debug("drop %s: handled already (%s)", path, t[2] or "bare model")
                    return
            except OSError:
                pass
        for mpath, manifest in list(self.pending.items()):
            if any(mpath.parent / e.file == path for e in manifest.entries.values()):
                self.fresh.add(path)  # its arrival reported: the drop's own file
                self._try_manifest(mpath, t0)
                return
        limit = self.settings.max_bytes
        sha, size, sig = digest_model(path, limit)
        known = self.known.get(sha)
        if known is None:  # its manifest may follow: refused only if none comes in time
            self.orphans[path] = (time.monotonic(), t0, sha, size)
            log.debug("%s: unknown sha256 %s; waiting %.1f s for a manifest", path, sha,
                      self.settings.manifest_wait_s)
            return
        self._took(path, sig, sha, "")
        role, derived_sha = known
        if role not in ROLES:
            self._report("unchanged", "models", path, t0,
                         why=f"role {role!r} is not used by the daemon")
            return
        data, _ = read_model(path, limit)
        self._install({role: prepare_model(role, data, path, sha, 0, derived_sha or None)},
                      path, t0)

    def _install(self, blobs: Dict[str, ModelBlob], path: Path, t0: float) -> None:
        svc = self.d.service
        current = svc.models
        changed = {r: b for r, b in blobs.items() if current[r].sha256 != b.sha256}
        if not changed:  # (an embedder held back stays held)
            self._report("unchanged", "models", path, t0, why="already in service")
            return
        for blob in changed.values():
            check_drop(blob.role, blob.data, blob.file, self.d)  # memory, before any interpreter
            self_test(blob, self._accel(blob.role))
        new_emb = changed.pop("embedder", None)
        gallery = svc.gallery.current
        if new_emb is not None and gallery is not None and gallery.embedder_sha256 != new_emb.sha256:
            prev = self.held
            self.held = HeldEmbedder(new_emb, file=str(path))
            self._keep_held()
            why = (f"embedder {short(new_emb.sha256)} differs from the gallery's "
                   f"{short(gallery.embedder_sha256)}: held back until a gallery made by it arrives")
            if prev is not None:
                why += f" (replaces held-back {short(prev.blob.sha256)})"
            self._report("held_back", "models", path, t0, why=why,
                         new={"embedder": new_emb.sha256})
            if not changed:
                return
        elif new_emb is not None:
            changed["embedder"] = new_emb
        if not changed:
            return
        holder = None
        if "embedder" in changed:  # (no gallery in service) a holder for the new embedder's
            holder = self.d.new_gallery_holder(changed["embedder"].sha256)  # galleries
            holder.holder.on_event = self.d.gallery_event_handler(holder)
        try:
            self._swap(changed, holder, path, t0, kind="models")
        except BaseException:
            if holder is not None:
                holder.stop()
            raise

    def _accel(self, role: str):
        cfg = self.d.cfg.models
        return cfg.embedder if role == "embedder" else cfg.detector

    # -- galleries --------------------------------------------------------------------------

    def handle_gallery(self, path: Path, t0: float) -> None:
        from edged.gallery import GalleryError, peek_embedder

        svc = self.d.service
        try:
            made_by = peek_embedder(path)  # the live file: read, never mapped
        except GalleryError:
            svc.gallery.holder.reload(path, trigger="drop")  # refused with the exact reason
            return
        in_service = svc.models["embedder"].sha256
        held = self.held
        if made_by == in_service:
            svc.gallery.holder.reload(path, trigger="drop")
            return
        if held is None or made_by != held.blob.sha256:
            svc.gallery.holder.reject(
                path, f"made by embedder {short(made_by)}, which is neither in service "
                      f"({short(in_service)}) nor held back "
                      f"({short(held.blob.sha256) if held else 'none'})", trigger="drop",
                started=t0, new_version=None)
            return
        # the held-back embedder and its gallery: validate the gallery, then swap both at once
        holder = self.d.new_gallery_holder(held.blob.sha256)
        try:
            gal = holder.holder.prepare(path)
        except Exception as exc:
            holder.stop()
            reason = getattr(exc, "reason", None) or str(exc)
            svc.gallery.holder.reject(path, reason, trigger="drop", started=t0)
            return
        holder.holder.commit(gal, path, trigger="drop", started=t0)  # not in service yet
        holder.holder.on_event = self.d.gallery_event_handler(holder)
        # forgotten on disk before the attempt: an embedder that crashes the process when it
        # is built must not be tried again at every start
        self.held = None
        self._keep_held()
        try:
            self._swap({"embedder": held.blob}, holder, path, t0, kind="models+gallery",
                       files=[held.file, str(path)])
        except BaseException:
            self.held = held
            self._keep_held()
            holder.stop()
            raise

    # -- swapping and probation -------------------------------------------------------------

    def _swap(self, changed: Dict[str, ModelBlob], gallery_holder, path: Path, t0: float,
              kind: str, files=None) -> None:
        old = self.d.service
        try:
            new = self.d.make_set(changed, gallery_holder)
            self.d.warm_up(new, parts=set(changed))
        except DropRejected:
            raise
        except Exception as exc:
            raise DropRejected(f"{path}: cannot build the new interpreters: {exc}") from None
        record = self._record("swapped", kind, path, t0, old=old.versions, new=new.versions,
                              files=files)
        self.probation = _Probation(new, old, record, "embedder" in changed)
        self.d.swap_service(new, record=record)

    def after_frame(self, svc) -> None:
        """Called by the track thread after each frame: decide a probation early."""
        p = self.probation
        if p is None or svc is not p.new:
            return
        self._decide(p)

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
            self._expire_waiting()
            now = time.monotonic()
            for path, (seen, t0) in list(self.stale.items()):
                if self.probation is not None:
                    break  # (handled at a later tick: never a swap during a probation)
                if now - seen >= STALE_WAIT_S and path in self.pending:
                    # refused now with the file's own reason (its sha256 mismatch)
                    self._outcome(path, t0, lambda: self._try_manifest(path, t0))
                elif path not in self.pending:
                    del self.stale[path]
            for path, (seen, t0, sha, size) in list(self.orphans.items()):
                if now - seen < self.settings.manifest_wait_s:
                    continue
                del self.orphans[path]
                self._report("rejected", "models", path, t0, why=(
                    f"{path}: sha256 {sha} ({size} bytes) is not a model of the manifest in "
                    f"force and no drop manifest names it (half-copied or corrupt file? drop "
                    f"it with a manifest, or with 'edged drop')"))
        finally:
            self._lock.release()

    def _expire_waiting(self) -> None:
        """Refuse the manifests that waited for their files longer than
        drops.manifest_deadline_s (from when they began to wait, restarts included)."""
        limit = self.settings.manifest_deadline_s
        for path, since in list(self.waiting_since.items()):
            waited = time.time() - since
            if path in self.pending and waited >= limit:  # (not yet pending: restored)
                self._outcome(path, time.monotonic() - waited,
                              lambda: self._refuse_late(path, limit))

    def _refuse_late(self, path: Path, limit: float) -> None:
        try:
            missing = self._missing(path, self.pending[path]) or [
                "the files there are not the ones it names"]
        finally:
            self._forget(path)
        raise DropRejected(f"{path}: its files did not all arrive within "
                           f"drops.manifest_deadline_s ({limit:g} s): {', '.join(missing)}")

    def _decide(self, p: _Probation) -> None:
        s = p.new
        if s.failures > 0:
            verdict = "rollback"
        elif (s.frames >= self.settings.probation_frames
              and (not p.embedder_changed or s.embeds >= 1)) \
                or time.monotonic() - p.started >= self.settings.probation_s:
            verdict = "confirm"
        else:
            return
        with self._plock:
            if self.probation is not p:
                return
            self.probation = None
        if verdict == "rollback":
            why = (f"the new set failed on {s.failures} of its first {max(s.frames, s.failures)} "
                   f"frame(s): {s.last_failure or 'exception'}; the previous set is back")
            self.d.rollback(p.old, p.new, why, p.record)
        else:
            self.d.confirm(p.new, p.old)
        p.done.set()

    def wait_probation(self) -> None:
        p = self.probation
        while p is not None and not self._stopping.is_set():
            if p.done.wait(0.1):
                break
            self.tick()
            p = self.probation

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
        self.d.report(self._record(result, kind, path, t0, why=why, new=new))

    def held_status(self) -> Optional[dict]:
        h = self.held
        if h is None:
            return None
        return {"embedder": h.blob.sha256, "file": h.file, "since": iso(h.since),
                "waiting_for": f"a gallery made by embedder {h.blob.sha256}"}

