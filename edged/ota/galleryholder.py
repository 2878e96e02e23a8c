"""The daemon's gallery (:class:`GalleryHolder`): hot-swapped when its file changes, each
candidate copied to a private snapshot (or held in memory when none can be written), the one
in service kept as the last good one; the snapshot directory, its lock and the removal of
dead processes' directories; the memory of files refused for their content."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from edged.gallery.format import (HEADER_SIZE, SUFFIX, GalleryError, _check_embedder,
                                  _checked_header, _open_regular, _read_head, _read_into)
from edged.gallery.gallery import Gallery
from edged.gallery.match import MatchSettings
from edged.ota.hotswap import SwapEvent, SwapHolder
from edged.runtime.modelstore import NoRoom, atomic_write, check_room, human_size
from edged.types import Match

log = logging.getLogger("edged.gallery")

#: the gallery in service, kept in the snapshot directory for the next start
LAST_GOOD = "last-good.edgal"
SNAPSHOT_PREFIX = "edged-gallery-"
#: the private snapshots of the daemon, read-only
SNAPSHOT_MODE = 0o440


class GalleryHolder:
    """The gallery the daemon matches against, hot-swapped when its file changes.

    Every candidate file is checked by its header first (size limit ``max_bytes``, magic,
    version, crc32, sections, dimension, embedder: nothing else of a file that is not a
    gallery is read), then copied to a private snapshot (so an in-place copy over the watched
    file can never change the pages of the gallery in service), hashed while it is copied,
    then checked fully off the hot path, then swapped in.  See :mod:`edged.ota.hotswap`.

    A snapshot is written only when it fits with a margin
    (:func:`edged.runtime.modelstore.check_room`).  When it cannot be written (a full or read-only
    state directory), the candidate is read into memory and checked and served from there:
    the gallery in service never depends on a copy that could not be written.  Then
    :attr:`snapshot_error` says why (one ERROR is logged) until :meth:`retry_snapshot`
    succeeds.

    With a ``snapshot_dir``, the gallery in service is also kept there as
    ``last-good.edgal`` (a hard link to its snapshot): when the file at ``path`` is refused at
    start (a bad drop that stayed on disk, then a reboot), that one is served instead.  Only a
    holder that serves the daemon does this: the daemon calls :meth:`keep_last_good` when the
    holder's set is (confirmed) in service, and from then on every gallery it swaps in is kept.
    A holder built for a candidate set (a drop on probation, a reload) keeps nothing until then.

    A symbolic link at ``path`` is refused, never followed (as every drop: docs/ota.md).
    A file refused for its content is remembered (by inode, size and times):
    :meth:`start` (what a ``SIGHUP`` does) does not read or report it again until it changes.

    (A little over 300 lines, on purpose: loading, the snapshot with its fallback to memory and
    keeping the last good gallery are one lifecycle on this holder's state and locks; split
    apart, they would hand that state to each other.)
    """

    def __init__(self, path, expect_embedder: Optional[str], settings: Optional[MatchSettings] = None,
                 on_event: Optional[Callable] = None, expect_dim: Optional[int] = None,
                 snapshot_dir=None, debounce: float = 0.2, settle: float = 1.0,
                 watch: bool = True, threads: Optional[int] = None, keep_previous: bool = False,
                 lock: Optional[threading.Lock] = None, max_bytes: Optional[int] = None):
        self.path = Path(path)
        self.expect_embedder = expect_embedder
        self.expect_dim = expect_dim
        self.max_bytes = max_bytes
        self.settings = settings or MatchSettings()
        self.threads = threads if threads is not None else self.settings.threads
        self._snapshot_root = snapshot_dir
        self.last_good = Path(snapshot_dir) / LAST_GOOD if snapshot_dir else None
        self._snapdir = None
        self._snap_lockfile = None  # held (flock) while the snapshot directory is in use
        self._cleaned = False
        self.serving = False  # set by keep_last_good(): this holder serves the daemon
        self._snap_lock = threading.Lock()
        self._retry_lock = threading.Lock()
        self._snap_n = 0
        self.holder = SwapHolder("gallery", self.path, loader=self._load,
                                 version=lambda g: g.checksum, closer=self._close,
                                 on_event=on_event, debounce=debounce, settle=settle, watch=watch,
                                 keep_previous=keep_previous, lock=lock)
        if self.last_good is not None:
            self.holder.on_service = self._keep_last_good

    # -- loading ------------------------------------------------------------------------

    def _root(self) -> Path:
        return Path(self._snapshot_root or tempfile.gettempdir())

    def _clean_stale(self) -> None:
        """Once per holder: remove the snapshot directories of dead processes."""
        if not self._cleaned and self._root().is_dir():
            self._cleaned = True
            _remove_stale_snapshots(self._root())

    def _new_snapshot_path(self) -> Path:
        with self._snap_lock:
            if self._snapdir is None:
                root = self._root()
                os.makedirs(root, mode=0o750, exist_ok=True)
                self._clean_stale()
                self._snapdir, self._snap_lockfile = _new_snapshot_dir(root)
            self._snap_n += 1
            return self._snapdir / f"gallery-{self._snap_n}{SUFFIX}"

    def _write_snapshot(self, chunks, size: int) -> Path:
        """A new snapshot of ``size`` bytes from ``chunks``; OSError when it cannot be
        written (no room for it with the margin, a write failing), nothing left behind."""
        dest = self._new_snapshot_path()
        check_room(self._root(), size, "a gallery snapshot")
        _write_new(dest, chunks)
        return dest

    def _load(self, path: Path) -> Gallery:
        path = Path(path)
        key, ident = self._refusal_key(path), _identity(path)
        try:
            g = self._load_checked(path)
        except GalleryError as exc:
            if not exc.transient and ident is not None:
                _remember_refusal(key, ident, exc.reason)
            raise
        _remember_refusal(key, None, None)
        g.source = path
        return g

    def _load_checked(self, path: Path) -> Gallery:
        with _open_regular(path, confine=True) as f:
            size = os.fstat(f.fileno()).st_size
            if self.max_bytes is not None and size > self.max_bytes:
                raise GalleryError(path, f"{size} bytes, larger than the {self.max_bytes} "
                                         f"allowed (drops.max_gallery_bytes)")
            fields = _checked_header(_read_head(f, path, size), path, size, self.expect_dim)
            _check_embedder(path, fields[15].hex(), self.expect_embedder)
            body = hashlib.sha256()
            try:
                snap = self._write_snapshot(_file_chunks(f, size, path, body), size)
            except OSError as exc:
                return self._in_memory(f, size, path, self._no_snapshot(exc))
        return self._open_snapshot(snap, body.hexdigest(), path)

    def _open_snapshot(self, snap: Path, body_sha256: str, path: Path) -> Gallery:
        g = None
        try:
            g = Gallery.open(snap, expect_dim=self.expect_dim,
                             expect_embedder=self.expect_embedder, verify=False,
                             threads=self.threads)
            g.verify(body_sha256)  # (hashed while copied)
        except BaseException as exc:
            if g is not None:
                g.close()
            _unlink(snap)
            if isinstance(exc, GalleryError):
                raise GalleryError(path, exc.reason, exc.transient) from None
            raise
        g.snapshot = snap
        return g

    def _in_memory(self, f, size: int, path: Path, why: str) -> Gallery:
        g = Gallery.read_into_memory(f, size, path, self.expect_dim, self.expect_embedder,
                                     self.threads)
        g.snapshot_error = why
        log.error("gallery %s: %s; serving it from memory (%s) until the snapshot can be "
                  "written", path, why, human_size(size))
        return g

    def _no_snapshot(self, exc: Exception) -> str:
        """Why a snapshot could not be written, in words."""
        if isinstance(exc, NoRoom):
            return exc.strerror
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return f"cannot write its snapshot in {self._root()}: {why}"

    def retry_snapshot(self) -> bool:
        """When the gallery in service is held in memory only (:attr:`snapshot_error`), try
        again to write its snapshot (with the margin) and serve it from there, keeping it as
        the last good one.  True when the gallery in service has its snapshot (or there is no
        gallery); cheap when there is nothing to do.  Searches go on meanwhile."""
        with self._retry_lock, self.holder.lease() as g:
            if g is None or g.snapshot_error is None:
                return True
            snap = None
            try:
                with memoryview(g._mm) as mv:
                    snap = self._write_snapshot(
                        (mv[i:i + (1 << 20)] for i in range(0, len(mv), 1 << 20)), len(mv))
                g.remap(snap)  # (the view released: the memory is freed here)
            except (OSError, GalleryError) as exc:
                if snap is not None:
                    _unlink(snap)
                g.snapshot_error = self._no_snapshot(exc)
                return False
            g.snapshot, g.snapshot_error = snap, None
            log.info("gallery %s: its snapshot is written (%s); no longer held in memory",
                     g.source, snap)
            self._keep_last_good(g)
        return True

    @property
    def snapshot_error(self) -> Optional[str]:
        """Why the gallery in service has no snapshot and is served from memory (it could
        not be written: a full or read-only state directory); None when it has one or there
        is no gallery.  The daemon reports ``degraded`` while it is set, and calls
        :meth:`retry_snapshot` (with back-off) until that succeeds."""
        g = self.current
        return g.snapshot_error if g is not None else None

    def _refusal_key(self, path: Path) -> tuple:
        return (os.path.abspath(path), self.expect_embedder, self.expect_dim, self.max_bytes)

    def _keep_last_good(self, g: Gallery) -> None:
        """Hard-link the snapshot of ``g`` (now in service) to ``last-good.edgal``; where the
        filesystem has no hard links, copy it in a background thread (never on the frame
        path: a rollback runs on the track thread).  A gallery held in memory only is kept
        once its snapshot is written (:meth:`retry_snapshot`)."""
        if not self.serving or self.last_good is None or g.snapshot is None:
            return
        dest = self.last_good
        with _LG_LOCK:  # one sequence per destination: a newer gallery's copy always wins
            seq = _LG_SEQ[str(dest)] = _LG_SEQ.get(str(dest), 0) + 1
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{seq}.tmp")
            _unlink(tmp)
            try:
                os.link(g.snapshot, tmp)
                os.replace(tmp, dest)
                return
            except OSError as exc:
                _unlink(tmp)
                try:
                    src = open(g.snapshot, "rb")  # readable even once the snapshot is unlinked
                except OSError:
                    log.warning("gallery: cannot keep the gallery in service as %s: %s", dest,
                                exc.strerror or exc)
                    return
        threading.Thread(target=self._copy_last_good, args=(src, tmp, dest, seq, g.file_size),
                         name="gallery-last-good", daemon=True).start()

    def _copy_last_good(self, src, tmp: Path, dest: Path, seq: int, size: int) -> None:
        try:
            with src:
                atomic_write(tmp, iter(lambda: src.read(1 << 20), b""), mode=SNAPSHOT_MODE,
                             room_for=size)
            with _LG_LOCK:
                if seq == _LG_SEQ.get(str(dest)) and self.serving:  # else a newer one wins
                    os.replace(tmp, dest)
        except OSError as exc:
            log.warning("gallery: cannot keep the gallery in service as %s: %s", dest,
                        exc.strerror or exc)
        finally:
            _unlink(tmp)

    def keep_last_good(self) -> None:
        """This holder serves the daemon now (its set is in service, or confirmed after a
        drop): keep its gallery as the last good one, and every gallery it swaps in later."""
        self.serving = True
        with self.holder.lease() as g:
            if g is not None:
                self._keep_last_good(g)

    def _start_last_good(self, refused, again: bool = False) -> Optional[object]:
        """At start, the file at the gallery path was refused: serve the last good gallery.
        ``again``: refused before and unchanged since (said at INFO, not as an error)."""
        say = log.info if again else log.error
        lg = self.last_good
        if lg is None or not lg.is_file():
            say("gallery %s refused at start (%s) and no last good gallery is kept: "
                "every face is unknown until a good gallery arrives", self.path, refused.reason)
            return refused
        ev = self.holder.reload(lg, trigger="start: last good")
        if ev.accepted:
            say("gallery %s refused at start (%s); serving the last good gallery "
                "(checksum %s) from %s until a good file arrives there", self.path,
                refused.reason, str(ev.new_version)[:16], lg)
        return ev

    @staticmethod
    def _close(g: Gallery) -> None:
        g.close()
        if g.snapshot is not None:
            _unlink(g.snapshot)

    # -- the daemon's side --------------------------------------------------------------

    @property
    def current(self) -> Optional[Gallery]:
        return self.holder.current

    def match(self, queries) -> List[Match]:
        """Match on the gallery in service; every face is unknown when there is none."""
        q = np.asarray(queries, dtype=np.float32)
        n = 1 if q.ndim == 1 else q.shape[0]
        with self.holder.lease() as g:
            if g is None:
                return [Match(name=None, identity=None, score=0.0, margin=0.0) for _ in range(n)]
            return g.match(q, self.settings)

    def reload(self, trigger: str = "reload"):
        """Load the file now; returns the SwapEvent."""
        return self.holder.reload(trigger=trigger)

    def start(self):
        """Load the file if it is there, then watch it.  Returns the first SwapEvent or None.

        A file that is there but refused is replaced, in memory, by the last good gallery
        (see the class documentation); the file on disk is left as it is.  A file refused
        before and unchanged since is not read again: the event returned says so, and is not
        reported to ``on_event``.
        """

        self._clean_stale()
        known = _known_refusal(self._refusal_key(self.path), _identity(self.path))
        if known is None:
            ev = self.holder.start()
        else:
            log.info("gallery %s: unchanged since it was refused (%s); not read again until "
                     "it changes", self.path, known)
            ev = SwapEvent("gallery", False, str(self.path), known, None, None, 0.0,
                           "start: unchanged", time.time())
            if self.holder.watcher is not None:
                self.holder.watcher.start()
        if ev is not None and not ev.accepted and self.holder.current is None:
            ev = self._start_last_good(ev, again=known is not None)
        return ev

    def stop(self) -> None:
        self.serving = False
        self.holder.stop()
        d, self._snapdir = self._snapdir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        f, self._snap_lockfile = self._snap_lockfile, None
        if f is not None:
            f.close()

    def version(self) -> Optional[str]:
        g = self.current
        return g.checksum if g is not None else None


def _file_chunks(f, size: int, path: Path, body_hash):
    """The first ``size`` bytes of the open file ``f`` in chunks, the bytes after the header
    fed to ``body_hash`` on the way (one read of the file for the copy and its checksum)."""
    f.seek(0)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = _read_into(f, view[:min(len(buf), size - done)], path)
        if not n:
            raise GalleryError(path, f"truncated while being read: {done} of {size} bytes",
                               transient=True)
        body_hash.update(view[min(max(0, HEADER_SIZE - done), n):n])
        yield view[:n]
        done += n


def _write_new(dest: Path, chunks) -> None:
    """Write ``chunks`` to the new file ``dest``, created :data:`SNAPSHOT_MODE` less the
    umask; on any failure (a full disk) nothing of it is left."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 SNAPSHOT_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
    except BaseException:
        _unlink(dest)
        raise


# files refused for their content: (path, expectations) -> (identity, reason); few entries
_REFUSED: dict = {}
_REFUSED_LOCK = threading.Lock()


def _identity(path) -> Optional[tuple]:
    """What tells that the file at ``path`` changed: for the path itself and where a link
    there leads, (device, inode, size, modification and change times); None if nothing
    is there."""
    out = []
    for stat_fn in (os.lstat, os.stat):
        try:
            st = stat_fn(path)
        except OSError:
            if not out:
                return None
            st = None
        out.append(st and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _remember_refusal(key: tuple, ident: Optional[tuple], reason: Optional[str]) -> None:
    """Remember why the file ``ident`` was refused (``reason`` None: forget the key)."""
    with _REFUSED_LOCK:
        _REFUSED.pop(key, None)
        if reason is not None:
            while len(_REFUSED) >= 64:
                _REFUSED.pop(next(iter(_REFUSED)))
            _REFUSED[key] = (ident, reason)


def _known_refusal(key: tuple, ident: Optional[tuple]) -> Optional[str]:
    """Why the file ``ident`` was refused, if it was and has not changed since."""
    with _REFUSED_LOCK:
        got = _REFUSED.get(key)
    return got[1] if got is not None and ident is not None and got[0] == ident else None


_SNAP_LOCK = ".lock"
#: a snapshot directory is made under this name and renamed to SNAPSHOT_PREFIX once locked
_NEW_PREFIX = ".edged-gallery-new-"
# last-good.edgal is shared by every holder of a snapshot root: one sequence per destination
_LG_LOCK = threading.Lock()
_LG_SEQ: dict = {}


def _new_snapshot_dir(root: Path) -> tuple:
    """A new snapshot directory under ``root``, locked before it gets its name, so that a
    directory named ``edged-gallery-*`` whose lock is free belongs to a dead process:
    ``(path, lock file or None)``."""
    tmp = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=str(root)))
    lockf = None
    try:
        try:
            lockf = _lock_snapshot_dir(tmp)
        except OSError as exc:  # a filesystem without flock: unlocked, said once
            log.warning("gallery: cannot lock a snapshot directory in %s (%s); if this "
                        "process is killed, remove it by hand", root, exc.strerror or exc)
        final = root / (SNAPSHOT_PREFIX + tmp.name[len(_NEW_PREFIX):])
        os.rename(tmp, final)
    except BaseException:
        if lockf is not None:
            lockf.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, lockf


def _lock_snapshot_dir(d: Path):
    """Hold an exclusive flock on ``d/.lock`` for as long as the returned file stays open
    (the kernel drops it when the process dies, whatever its PID or PID namespace)."""
    import fcntl
    f = open(d / _SNAP_LOCK, "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise
    return f


def _remove_stale_snapshots(root: Path, min_age: float = 60.0) -> None:
    """Remove the snapshot directories nobody holds any more (left by a SIGKILL, a crash).

    A directory is in use while its ``.lock`` is flocked by a live holder; it is locked
    before it gets its ``edged-gallery-`` name (:func:`_new_snapshot_dir`), so one whose lock
    is free is removed at once, however young (a restart right after a SIGKILL).  Only one
    with no lock file (made by an older edged) or still being made (``.edged-gallery-new-``)
    is left alone while younger than ``min_age`` seconds."""
    import fcntl
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for d in entries:
        making = d.name.startswith(_NEW_PREFIX)
        if not (making or d.name.startswith(SNAPSHOT_PREFIX)) or d.is_symlink() or not d.is_dir():
            continue
        try:
            f = open(d / _SNAP_LOCK, "rb")
        except FileNotFoundError:
            f = None
        except OSError:
            continue
        with f if f is not None else contextlib.nullcontext():
            if f is None or making:
                try:
                    if time.time() - d.stat().st_mtime < min_age:
                        continue
                except OSError:
                    continue
            if f is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held (in use), or locks unsupported here: left alone
            log.info("gallery: removing %s, left by a process that is gone", d)
            shutil.rmtree(d, ignore_errors=True)


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
