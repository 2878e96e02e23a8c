"""Hot swap: watch files, build and validate the new object off the hot path, swap one reference.

One mechanism for everything edged replaces while it runs (the gallery now, model files too):

:class:`FileWatcher`
    watches one directory with ``watchdog`` (an ``Observer`` thread and a worker thread, both
    named) and calls ``callback(path)`` once a matching file has *arrived*: renamed into place
    (``moved``), or created / modified and then closed after writing (``closed``), and in every
    case quiet for ``debounce`` seconds with the same size and mtime on two looks in a row.
    Where opens and closes are reported (inotify), a file some process opened is never taken
    while it is still open, however long the writer pauses.  A file that changed with no open
    or close reported (other observers; on inotify a hard link, or a writer that opened it
    before the watch began) is taken once it has been quiet for ``settle`` seconds.  Hidden
    files and ``*.tmp`` / ``*.part`` (the temporary names of atomic writers) are ignored by the
    default filter.

:class:`SwapHolder`
    holds the object in service.  ``reload()`` (the SIGHUP entry point, and what the watcher
    calls) runs ``loader(path)``, which must build *and fully validate* the new object and raise
    on any problem; only then is the reference swapped, under a lock, between two readers.
    Readers take a lease (``with holder.lease() as obj:``): the old object is closed (by
    ``closer``) only when its last lease ends, so a search or invoke in flight finishes on the
    object it started with (and the last reader hands the closing to a short-lived thread, so
    unmapping never costs a reader time).  A rejected file leaves the current object in
    service.  Every attempt yields a :class:`SwapEvent` (accepted or rejected, path, reason, old and new
    version, seconds taken) passed to ``on_event`` and logged.  ``prepare(path)`` and
    ``commit(obj, ...)`` split a reload in two, for callers that must validate several files
    before swapping them together (an embedder and the gallery made by it).  With
    ``keep_previous=True`` the object replaced is kept (not closed) so that ``rollback()`` can
    put it back if the new one fails at run time; ``release_previous()`` lets it go.

:class:`SwapGroup`
    several holders sharing one lock: ``group.lease(a, b)`` takes a consistent set of objects
    and ``group.commit([(a, obj_a, path_a), (b, obj_b, path_b)])`` swaps them at once.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Generic, Optional, TypeVar

log = logging.getLogger("edged.hotswap")

T = TypeVar("T")


def default_filter(path: str) -> bool:
    """Ignore hidden files and the temporary names of atomic writers."""
    name = os.path.basename(path)
    return not (name.startswith(".") or name.endswith((".tmp", ".part", "~", ".swp")))


# ---------------------------------------------------------------------------- watcher


class _Pending:
    __slots__ = ("last", "complete", "sig", "kinds", "opens", "changed")

    def __init__(self):
        self.last = 0.0
        self.complete = False
        self.sig = None
        self.kinds = []
        self.opens = 0  # opens reported and not closed yet (a writer may be pausing)
        self.changed = False  # written, created or renamed in (not only opened and read)


#: a file reported open and never reported closed (a close lost in an event queue overflow)
#: is taken after this long without change all the same
OPEN_QUIET_S = 600.0


class FileWatcher:
    """Call ``callback(path)`` when a file matching ``match`` has arrived in ``directory``."""

    def __init__(self, directory, callback: Callable[[Path], None],
                 match: Callable[[str], bool] = default_filter, debounce: float = 0.2,
                 settle: float = 1.0, name: str = "files"):
        self.directory = Path(os.path.abspath(directory))
        self.callback = callback
        self.match = match
        self.debounce = float(debounce)
        self.settle = max(float(settle), self.debounce)
        self.name = name
        self._pending: Dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._observer = None
        self._worker = None

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: directory to watch does not exist")
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                watcher._on_event(event)

        self._stopping = False
        self._observer = Observer()
        self._observer.name = f"watch-{self.name}"
        self._observer.daemon = True
        self._observer.schedule(Handler(), str(self.directory), recursive=False)
        self._observer.start()
        self._worker = threading.Thread(target=self._run, name=f"swap-{self.name}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(30)
        self._worker = None

    # -- events ---------------------------------------------------------------------------

    def _on_event(self, event) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind == "moved":
            path = os.fsdecode(event.dest_path)
        elif kind in ("created", "modified", "closed", "opened", "closed_no_write"):
            path = os.fsdecode(event.src_path)
        else:  # deleted, attrib: nothing arrived
            return
        path = os.path.abspath(path)
        if os.path.dirname(path) != str(self.directory) or not self.match(path):
            return
        with self._cond:
            p = self._pending.get(path)
            if p is None:
                if kind == "closed_no_write":
                    return  # a reader done with a file that is not changing
                p = self._pending[path] = _Pending()
            if kind == "opened":
                p.opens += 1
            elif kind in ("closed", "closed_no_write"):
                p.opens = max(0, p.opens - 1)
            elif kind == "moved":
                p.opens = 0  # another file (inode) under that name
            p.last = time.monotonic()
            if kind not in ("opened", "closed_no_write"):
                p.changed = True
                p.complete = kind in ("moved", "closed")
            p.sig = None
            p.kinds.append(kind)
            self._cond.notify_all()

    def _quiet_for(self, p: _Pending) -> Optional[float]:
        """How long ``p`` must stay unchanged before it is taken; None: drop it (only opened
        and read, never changed)."""
        if p.opens:
            return OPEN_QUIET_S  # still open: the close says when it is done
        if not p.changed:
            return None
        return self.debounce if p.complete else self.settle

    def _run(self) -> None:
        while True:
            ready = []
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                wait = None
                for path, p in list(self._pending.items()):
                    quiet = self._quiet_for(p)
                    if quiet is None:
                        del self._pending[path]
                        continue
                    due = p.last + quiet
                    if now < due:
                        wait = due - now if wait is None else min(wait, due - now)
                        continue
                    try:
                        st = os.stat(path)
                        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
                    except FileNotFoundError:
                        del self._pending[path]  # gone again (moved away, deleted)
                        continue
                    except OSError:
                        sig = ("error",)
                    if sig != p.sig:  # look again after another quiet period
                        p.sig = sig
                        p.last = now
                        wait = self.debounce if wait is None else min(wait, self.debounce)
                        continue
                    del self._pending[path]
                    if p.changed:
                        ready.append((path, p.kinds))
                if not ready:
                    self._cond.wait(wait if wait is not None else 1.0)
                    continue
            for path, kinds in ready:
                log.debug("%s: %s arrived (%s)", self.name, path, ",".join(kinds[-4:]))
                try:
                    self.callback(Path(path))
                except Exception:  # the callback reports its own failures; keep watching
                    log.exception("%s: handling %s failed", self.name, path)


# ---------------------------------------------------------------------------- holder


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim_when_freed(obj) -> None:
    """Once ``obj`` is freed, give the C heap's free pages back to the system.

    A new object is built while the old one serves, so the old one's native memory (model
    interpreters: about 70 MB a set) lies below the new one's in the heap, where glibc keeps
    it after free: the resident size grew by that much over the first SIGHUP reloads.  The
    trim runs on a short-lived thread :data:`TRIM_DELAY_S` later, not on the thread that
    drops the last reference (a frame thread, maybe)."""
    if _TRIM is None:
        return
    try:
        weakref.finalize(obj, _trim_soon).atexit = False
    except TypeError:  # no weak reference to it: trim now
        _trim_soon()


#: the trim waits this long after the object was freed: what it held (interpreters whose
#: Python ``__del__`` lets other threads run meanwhile) is freed after it
TRIM_DELAY_S = 1.0


def _trim_soon() -> None:
    timer = threading.Timer(TRIM_DELAY_S, _TRIM, args=(0,))
    timer.name, timer.daemon = "swap-trim", True
    timer.start()


@dataclass
class SwapEvent:
    """One attempt to put a file in service."""

    name: str  # what is swapped: "gallery", "embedder", ...
    accepted: bool
    path: str
    reason: str  # why it was rejected ("" when accepted)
    old_version: Optional[str]
    new_version: Optional[str]  # the candidate's version when known (accepted: the one now in service)
    seconds: float  # from the start of loading to the swap (or the rejection)
    trigger: str  # "start", "watch", "reload" (SIGHUP), or a caller's word
    time: float  # wall clock, epoch seconds

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self):
        if self.accepted:
            was = f"replacing {self.old_version}" if self.old_version else "the first one"
            return (f"{self.name}: {self.path} in service (version {self.new_version}, {was}; "
                    f"{self.seconds:.3f} s, {self.trigger})")
        kept = (f"keeping version {self.old_version}" if self.old_version
                else "nothing was in service yet")
        return f"{self.name}: {self.path} rejected: {self.reason}; {kept} ({self.trigger})"


class _Slot:
    __slots__ = ("obj", "version", "path", "refs", "retired", "closed")

    def __init__(self, obj, version, path):
        self.obj, self.version, self.path = obj, version, path
        self.refs = 0
        self.retired = False
        self.closed = False


class SwapHolder(Generic[T]):
    """The object in service, replaced atomically when its file changes (see module doc)."""

    def __init__(self, name: str, path, loader: Callable[[Path], T],
                 version: Callable[[T], str] = lambda obj: str(id(obj)),
                 closer: Optional[Callable[[T], None]] = None,
                 on_event: Optional[Callable[[SwapEvent], None]] = None,
                 debounce: float = 0.2, settle: float = 1.0, watch: bool = True,
                 keep_previous: bool = False, lock: Optional[threading.Lock] = None):
        self.name = name
        self.keep_previous = keep_previous
        self.path = Path(os.path.abspath(path)) if path is not None else None
        self.loader = loader
        self.version_of = version
        self.closer = closer
        self.on_event = on_event
        # called with each object put in service (a swap or a rollback), before its event
        self.on_service: Optional[Callable[[T], None]] = None
        self.watch = watch and self.path is not None
        # guards the slot and the lease counts (held for microseconds); a SwapGroup shares one
        # lock between its members so that leases and swaps of several holders are atomic
        self._lock = lock or threading.Lock()
        self._previous: Optional[_Slot] = None  # kept for rollback() when keep_previous
        self._load_lock = threading.Lock()  # one load at a time
        self._slot: Optional[_Slot] = None
        self.watcher: Optional[FileWatcher] = None
        if self.watch:
            target = str(self.path)
            self.watcher = FileWatcher(self.path.parent, self._on_file,
                                       match=lambda p: p == target, debounce=debounce,
                                       settle=settle, name=name)

    # -- readers --------------------------------------------------------------------------

    @property
    def current(self) -> Optional[T]:
        """The object in service (no lease: only for looking, not for using)."""
        slot = self._slot
        return slot.obj if slot is not None else None

    @property
    def version(self) -> Optional[str]:
        slot = self._slot
        return slot.version if slot is not None else None

    @contextmanager
    def lease(self):
        """``with holder.lease() as obj:`` obj (or None) stays open until the block ends."""
        slot = self.acquire()
        try:
            yield slot.obj if slot is not None else None
        finally:
            self.release(slot)

    def acquire(self):
        """A lease that may end in another thread: a token whose ``.obj`` is the object in
        service (None when there is none); hand it to :meth:`release` exactly once."""
        with self._lock:
            slot = self._slot
            if slot is not None:
                slot.refs += 1
        return slot

    def release(self, token) -> None:
        if token is not None:
            self._release(token)

    @staticmethod
    def _retire(slots) -> list:
        """Mark ``slots`` out of service (call under the lock); return those to close now,
        the ones no reader holds.  The others close when their last lease ends."""
        to_close = []
        for slot in slots:
            slot.retired = True
            if slot.refs == 0 and not slot.closed:
                slot.closed = True
                to_close.append(slot)
        return to_close

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.refs -= 1
            close = slot.retired and slot.refs == 0 and not slot.closed
            if close:
                slot.closed = True
        if close:  # the last reader of a replaced object: close it off the reader's thread
            threading.Thread(target=self._close, args=(slot,), name=f"swap-close-{self.name}",
                             daemon=True).start()

    def _close(self, slot: _Slot) -> None:
        obj, slot.obj = slot.obj, None  # the holder's last reference: freed once closed
        if self.closer is not None:
            try:
                self.closer(obj)
            except Exception:
                log.exception("%s: closing version %s failed", self.name, slot.version)
        trim_when_freed(obj)

    # -- writers --------------------------------------------------------------------------

    def prepare(self, path=None) -> T:
        """Build and validate the object for ``path`` (default: the holder's); raise if bad."""
        return self.loader(Path(path) if path is not None else self.path)

    def commit(self, obj: T, path=None, trigger: str = "reload", started: Optional[float] = None,
               version: Optional[str] = None) -> SwapEvent:
        """Put an already validated ``obj`` in service; the old one closes when unused."""
        t0 = started if started is not None else time.monotonic()
        new = self._new_slot(obj, path, version)
        with self._lock:
            old, to_close = self._swap_locked(new)
        self._close_all(to_close)
        return self._accepted(new, old, trigger, t0)

    def _new_slot(self, obj, path=None, version=None) -> _Slot:
        version = version if version is not None else self.version_of(obj)
        return _Slot(obj, version, str(path if path is not None else self.path))

    def _swap_locked(self, new: Optional[_Slot]) -> tuple:
        """Put ``new`` in service (lock held); return (old slot, slots to close now)."""
        old = self._slot
        self._slot = new
        retire = []
        if old is not None:
            if self.keep_previous and new is not None:
                if self._previous is not None:
                    retire.append(self._previous)
                self._previous = old
            else:
                retire.append(old)
        return old, self._retire(retire)

    def _close_all(self, slots) -> None:
        for slot in slots:
            self._close(slot)

    def _accepted(self, new: _Slot, old: Optional[_Slot], trigger: str, t0: float,
                  reason: str = "") -> SwapEvent:
        if self.on_service is not None:
            try:
                self.on_service(new.obj)
            except Exception:
                log.exception("%s: in-service callback failed", self.name)
        ev = SwapEvent(self.name, True, new.path, reason, old.version if old else None,
                       new.version, time.monotonic() - t0, trigger, time.time())
        self._emit(ev)
        return ev

    def rollback(self, reason: str = "") -> Optional[SwapEvent]:
        """Put the previous object back in service (``keep_previous`` holders); None if none."""
        t0 = time.monotonic()
        with self._lock:
            prev = self._previous
            if prev is None:
                return None
            self._previous = None
            keep, self.keep_previous = self.keep_previous, False
            try:
                failed, to_close = self._swap_locked(prev)
            finally:
                self.keep_previous = keep
        self._close_all(to_close)
        return self._accepted(prev, failed, "rollback", t0, reason)

    def release_previous(self) -> None:
        """The object in service is confirmed good: close the one kept for rollback."""
        with self._lock:
            prev, self._previous = self._previous, None
            close = False
            if prev is not None:
                prev.retired = True
                close = prev.refs == 0 and not prev.closed
                if close:
                    prev.closed = True
        if close:
            self._close(prev)

    def reject(self, path, reason: str, trigger: str = "reload", started: Optional[float] = None,
               new_version: Optional[str] = None) -> SwapEvent:
        """Report a refused file (the object in service stays)."""
        t0 = started if started is not None else time.monotonic()
        ev = SwapEvent(self.name, False, str(path), reason, self.version, new_version,
                       time.monotonic() - t0, trigger, time.time())
        self._emit(ev)
        return ev

    def reload(self, path=None, trigger: str = "reload") -> SwapEvent:
        """Load the file now and swap it in if it is good (the SIGHUP entry point)."""
        path = Path(path) if path is not None else self.path
        with self._load_lock:
            t0 = time.monotonic()
            try:
                obj = self.prepare(path)
            except Exception as exc:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                return self.reject(path, reason, trigger, t0)
            return self.commit(obj, path, trigger, t0)

    def _emit(self, ev: SwapEvent) -> None:
        (log.info if ev.accepted else log.warning)("%s", ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:
                log.exception("%s: event callback failed", self.name)

    def _on_file(self, path: Path) -> None:
        self.reload(path, trigger="watch")

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> Optional[SwapEvent]:
        """Load the file when it exists, then start watching.  Returns the load's event."""
        ev = None
        if self.path is not None and os.path.lexists(self.path):
            ev = self.reload(trigger="start")
        elif self.path is not None:
            log.warning("%s: %s does not exist yet; waiting for it", self.name, self.path)
        if self.watcher is not None:
            self.watcher.start()
        return ev

    def stop(self, close: bool = True) -> None:
        """Stop watching; with ``close``, retire the object in service (closed once unused)."""
        if self.watcher is not None:
            self.watcher.stop()
        if not close:
            return
        with self._lock:
            slots = [s for s in (self._slot, self._previous) if s is not None]
            self._slot = self._previous = None
            to_close = self._retire(slots)
        self._close_all(to_close)


class SwapGroup:
    """Holders whose objects must be used and swapped together (an embedder and its gallery).

    Members share one lock: :meth:`lease` takes a consistent set (no swap in between), and
    :meth:`commit` puts several validated objects in service at once, so no reader ever sees
    the new embedder with the old gallery.  Create the members with ``lock=group.lock``.
    """

    def __init__(self):
        self.lock = threading.Lock()

    @contextmanager
    def lease(self, *holders: SwapHolder):
        """``with group.lease(a, b) as (obj_a, obj_b):`` all taken under one lock."""
        with self.lock:
            slots = [h._slot for h in holders]
            for slot in slots:
                if slot is not None:
                    slot.refs += 1
        try:
            yield tuple(slot.obj if slot is not None else None for slot in slots)
        finally:
            for h, slot in zip(holders, slots):
                if slot is not None:
                    h._release(slot)

    def commit(self, items, trigger: str = "group") -> list:
        """``items``: ``[(holder, obj, path)]`` already validated; swap them all at once."""
        t0 = time.monotonic()
        news = [(h, h._new_slot(obj, path)) for h, obj, path in items]
        done = []
        with self.lock:
            for h, new in news:
                old, to_close = h._swap_locked(new)
                done.append((h, new, old, to_close))
        events = []
        for h, new, old, to_close in done:
            h._close_all(to_close)
            events.append(h._accepted(new, old, trigger, t0))
        return events
