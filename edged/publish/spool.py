"""The store-and-forward spool: events on disk until the broker has acknowledged them.

paho keeps unacknowledged messages in memory only, so a crash, a power cut or a long broker
outage would lose them.  Every event is inserted (and committed) into an SQLite database in
WAL mode in the state dir *before* it is handed to MQTT, and its row is deleted only when the
broker's PUBACK for it arrives.  After a restart the rows still there are sent again, oldest
first, with the payload (id, timestamps) they were spooled with.

Durability (``SpoolSettings.fsync``, SQLite's ``synchronous`` in WAL mode):

- ``off``: no fsync; committed events survive a crash of edged, not a power cut.
- ``normal`` (default): WAL with ``synchronous=NORMAL``: fsync at checkpoints only.  A power cut
  may lose the events committed in the last moments before it, the database stays consistent.
- ``full``: WAL with ``synchronous=FULL``: fsync on every commit; an event is on disk before
  :meth:`Spool.put` returns (slower on SD cards).

Bounds: ``max_events``, ``max_bytes`` (of payloads) and ``max_age_s``.  When one is exceeded the
oldest rows are deleted and counted in :attr:`Spool.dropped` (kept across restarts).

Damage is never fatal: a row whose payload is not a JSON object carrying its event id (a torn
record) is deleted and skipped with a log line (:attr:`Spool.corrupt`); a database file SQLite
cannot read is moved aside (``spool.db.corrupt-<time>``) with a log line and a fresh spool is
started.

A disk that refuses writes (full, read-only, an I/O error) is not fatal either: the spool goes
*degraded* (:attr:`Spool.problem` says why).  New events are held in memory, in order, with the
row ids they will have on disk, and are handed out by :meth:`Spool.fetch` like the others;
acknowledged rows that cannot be deleted are hidden from :meth:`Spool.fetch` (never sent again)
and their deletion waits.  :meth:`Spool.retry` (called by every operation and by the daemon's
main loop, with a back-off from 1 s to a minute) deletes those, then writes the held events to
disk; the first success ends the degraded state.  Held events count in the bounds; those still
held at :meth:`Spool.close` are lost and the log says how many.  The log says when writes start
failing (one ERROR), at most once a minute while they do, and when they work again.

An empty spool whose file grew (a long outage) is vacuumed back to a few pages.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from edged.logs import Throttle

log = logging.getLogger("edged.spool")

SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    camera TEXT NOT NULL,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


#: a difference between the wall and the monotonic clocks taken as the wall clock being set
CLOCK_JUMP_S = 60.0
#: back-off between two tries of a disk that refused writes (seconds, doubling)
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
#: an empty spool is vacuumed when its free pages take at least this much
VACUUM_MIN_BYTES = 1 << 20
#: the WAL file is truncated to this size after a checkpoint (it never keeps its peak size)
WAL_LIMIT_BYTES = 4 << 20


def _rollback(db) -> None:
    """End a failed transaction; a rollback that fails too (no transaction open, a damaged
    file) is left to the caller's own error handling."""
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


@dataclass
class SpoolRecord:
    rowid: int
    event_id: str
    camera: str
    created: float
    payload: bytes


class Spool:
    """An SQLite (WAL) queue of event payloads.  Thread-safe.

    One class of about 500 lines, on purpose: the spool is one state machine under one lock.
    The rows on disk, the events held in memory while the disk refuses writes and the
    acknowledged rows waiting for deletion share one sequence of row ids (``_hi``), one set of
    bounds and one depth (``_depth - len(_acked) + len(_held)``), and every operation
    (:meth:`put`, :meth:`fetch`, :meth:`delete`, :meth:`close`) first tries :meth:`retry` to
    leave the degraded state, then chooses between the disk and memory.  Split into a storage
    class and a holding class, each would have to reach into the other's counters inside the
    other's transactions; read whole, each operation shows both of its paths.
    """

    def __init__(self, path, max_events: int = 100000, max_bytes: int = 64 * 1024 * 1024,
                 max_age_s: float = 7 * 86400.0, fsync: str = "normal"):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"mqtt.spool.fsync: {fsync!r} is not one of {sorted(SYNCHRONOUS)}")
        self.path = Path(path)
        self.max_events = int(max_events)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.fsync = fsync
        self.dropped = 0  # rows dropped to stay in bounds (persisted)
        self.corrupt = 0  # torn rows skipped (this run)
        self.moved_aside: List[Path] = []
        self.in_memory = False  # the file could not be opened: an in-memory database instead
        self._lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = None
        self._depth = 0
        self._bytes = 0
        self._last_expire = 0.0
        self._hi = 0  # highest row id handed out: a fresh database continues after it
        # the wall clock against the monotonic one, to notice a jump (a board without a
        # real-time clock sets its time from NTP after it started)
        self._wall_ref, self._mono_ref = time.time(), time.monotonic()
        self._first_new = None  # the first row id this process stored
        # degraded: the disk refuses writes (see the module's docstring)
        self.problem: Optional[str] = None
        self._held: "OrderedDict[int, SpoolRecord]" = OrderedDict()
        self._held_bytes = 0
        self._acked: set = set()  # acknowledged rows whose deletion the disk refused
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S
        self._throttle = Throttle(log)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    @classmethod
    def from_settings(cls, path, settings) -> "Spool":
        return cls(path, settings.max_events, settings.max_bytes, settings.max_age_s,
                   settings.fsync)

    # -- opening and recovery ---------------------------------------------------------------
    def _connect(self, target: Optional[str] = None) -> sqlite3.Connection:
        db = sqlite3.connect(target or str(self.path), timeout=10, isolation_level=None,
                             check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal" and target is None:
                log.warning("spool %s: SQLite refused WAL mode (journal_mode=%s)", self.path, mode)
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.fsync]}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            self._depth, self._bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            self.dropped = int(row[0]) if row else 0
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
            self._hi = max(self._hi, int(row[0]) if row else 0)
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> None:
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            if not self._is_damage(e):  # locked, read-only, full, cannot open: the file is fine
                log.error("spool %s: cannot open (%s); events are kept in memory only until the "
                          "next start (the file is left as it is)", self.path, e)
                self.in_memory = True
                self._db = self._connect(":memory:")
                return
            self._move_aside(e)
            self._db = self._connect()
        if self._depth:
            log.info("spool %s: %d event(s) waiting from before (%d bytes)",
                     self.path, self._depth, self._bytes)
        self._expire(time.time(), force=True)
        self._vacuum_if_empty()

    def _move_aside(self, err: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        log.error("spool %s is damaged (%s); moved aside to %s, starting an empty spool",
                  self.path, err, dest)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                try:
                    os.replace(src, Path(str(dest) + suffix))
                except OSError as e:
                    log.error("spool: cannot move %s aside (%s); deleting it", src, e)
                    try:
                        src.unlink()
                    except OSError:
                        pass
        self.moved_aside.append(dest)

    def _recover(self, err: Exception) -> None:
        """The database went bad while open: move it aside and start a fresh one."""
        try:
            if self._db is not None:
                self._db.close()
        except sqlite3.Error:
            pass
        self._db = None
        self._move_aside(err)
        self._depth = self._bytes = 0
        dropped = self.dropped
        self._db = self._connect()
        if dropped:  # the count goes on in the fresh file
            self.dropped = dropped
            self._save_dropped(self._db)
        # keep row ids increasing so that readers holding a cursor see the new rows
        self._db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)",
                         (self._hi,))

    @staticmethod
    def _is_damage(err: Exception) -> bool:
        msg = str(err).lower()
        return any(s in msg for s in ("malformed", "not a database", "quick_check",
                                      "file is encrypted", "corrupt"))

    # -- queue operations -------------------------------------------------------------------
    def put(self, event_id: str, camera: str, created: float, payload: bytes) -> Optional[int]:
        """Insert and commit one event; returns its row id, or None if the disk refused it."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        with self._lock:
            if self._db is None:
                log.error("spool %s is closed; event %s not stored", self.path, event_id)
                return None
            self.retry()
            if self.problem is None:
                for attempt in (0, 1):
                    try:
                        return self._put(event_id, camera, created, payload)
                    except sqlite3.DatabaseError as e:
                        if attempt == 0 and self._is_damage(e):
                            self._recover(e)
                            continue
                        self._refused(e)
                        break
            return self._hold(SpoolRecord(self._hi + 1, event_id, camera, float(created),
                                          payload))

    # -- degraded: the disk refuses writes ----------------------------------------------------
    def _refused(self, err: Exception) -> None:
        """A write failed (not damage): go degraded, try again after the back-off."""
        first = self.problem is None
        self.problem = f"cannot write {self.path}: {err}"
        now = time.monotonic()
        if first:
            self._backoff = RETRY_MIN_S
        else:
            self._backoff = min(self._backoff * 2, RETRY_MAX_S)
        self._retry_at = now + self._backoff
        if first:
            self._throttle.problem(logging.ERROR, "spool %s: the disk refuses writes (%s): new "
                                   "events are held in memory and acknowledged ones wait for "
                                   "deletion until it takes writes again (tried again with a "
                                   "back-off up to %.0f s)", self.path, err, RETRY_MAX_S)
        else:
            self._throttle.problem(logging.WARNING, "spool %s: still cannot write (%s): %d "
                                   "event(s) held in memory, %d acknowledged waiting for "
                                   "deletion", self.path, err, len(self._held), len(self._acked))

    def _hold(self, rec: SpoolRecord) -> int:
        """Keep ``rec`` in memory (in order, with the row id it gets on disk), in the bounds."""
        self._hi = rec.rowid
        if self._first_new is None:
            self._first_new = rec.rowid
        self._held[rec.rowid] = rec
        self._held_bytes += len(rec.payload)
        dropped = 0
        while self._held and (self.depth > self.max_events
                              or self._bytes + self._held_bytes > self.max_bytes):
            _, old = self._held.popitem(last=False)
            self._held_bytes -= len(old.payload)
            dropped += 1
        if dropped:
            self.dropped += dropped
            log.warning("spool %s full (max %d events, %d bytes) while the disk refuses writes: "
                        "dropped the %d oldest event(s) held in memory, %d dropped in all",
                        self.path, self.max_events, self.max_bytes, dropped, self.dropped)
        return rec.rowid

    def retry(self, force: bool = False) -> bool:
        """Degraded: when the back-off has passed (or ``force``), delete the acknowledged rows
        and write the held events; returns whether the spool takes writes again."""
        with self._lock:
            if self.problem is None:
                return True
            if self._db is None or (not force and time.monotonic() < self._retry_at):
                return False
            held, acked = len(self._held), len(self._acked)
            try:
                self._flush_degraded()
            except sqlite3.DatabaseError as e:
                _rollback(self._db)
                self._refused(e)
                return False
            took = time.monotonic() - (self._throttle.since or time.monotonic())
            self.problem = None
            self._throttle.resolved("spool %s: the disk takes writes again after %.0f s: %d "
                                    "event(s) held in memory stored, %d acknowledged deleted",
                                    self.path, took, held, acked)
            return True

    def _flush_degraded(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        acked = sorted(self._acked)
        for i in range(0, len(acked), 500):
            chunk = acked[i:i + 500]
            db.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        db.executemany("INSERT INTO events (id, event_id, camera, created, payload) "
                       "VALUES (?, ?, ?, ?, ?)",
                       [(r.rowid, r.event_id, r.camera, r.created, r.payload)
                        for r in self._held.values()])
        if self.dropped:
            self._save_dropped(db)
        db.execute("COMMIT")
        self._depth, self._bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events").fetchone()
        self._held.clear()
        self._held_bytes = 0
        self._acked.clear()

    def _put(self, event_id, camera, created, payload) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute("INSERT INTO events (event_id, camera, created, payload) "
                             "VALUES (?, ?, ?, ?)", (event_id, camera, float(created), payload))
            rowid = cur.lastrowid
            self._hi = max(self._hi, rowid)
            if self._first_new is None:
                self._first_new = rowid
            self._depth += 1
            self._bytes += len(payload)
            dropped = self._enforce_bounds(db, time.time())
            if dropped:
                self._save_dropped(db)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            # recount: the in-memory counters may be off after a failed transaction
            try:
                self._depth, self._bytes = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events").fetchone()
            except sqlite3.Error:
                pass
            raise
        return rowid

    def _save_dropped(self, db) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (self.dropped,))

    def _delete_oldest(self, db, n: int) -> int:
        rows = db.execute("SELECT id, LENGTH(payload) FROM events ORDER BY id LIMIT ?",
                          (n,)).fetchall()
        if not rows:
            return 0
        db.execute("DELETE FROM events WHERE id <= ?", (rows[-1][0],))
        self._depth -= len(rows)
        self._bytes -= sum(r[1] for r in rows)
        return len(rows)

    def _enforce_bounds(self, db, now: float) -> int:
        dropped = 0
        if self._depth > self.max_events:
            dropped += self._delete_oldest(db, self._depth - self.max_events)
        while self._bytes > self.max_bytes and self._depth > 0:
            excess = self._bytes - self.max_bytes
            n, freed = 0, 0
            for _, size in db.execute("SELECT id, LENGTH(payload) FROM events ORDER BY id "
                                      "LIMIT 1000").fetchall():
                n += 1
                freed += size
                if freed >= excess:
                    break
            k = self._delete_oldest(db, n)
            dropped += k
            if k == 0:  # the counters were off: nothing left to drop
                self._depth = self._bytes = 0
                break
        if now - self._last_expire >= 10.0:
            dropped += self._expire_rows(db, now)
        if dropped:
            self.dropped += dropped
            log.warning("spool %s full (max %d events, %d bytes, %.0f s): dropped the %d "
                        "oldest event(s), %d dropped in all", self.path, self.max_events,
                        self.max_bytes, self.max_age_s, dropped, self.dropped)
        return dropped

    def _follow_clock(self, db) -> None:
        """When the wall clock jumped (by more than CLOCK_JUMP_S against the monotonic one),
        move the times of the events this process stored by the same amount: their age is
        what it was, so a clock set forward by days at NTP sync does not expire them."""
        wall, mono = time.time(), time.monotonic()
        jump = (wall - self._wall_ref) - (mono - self._mono_ref)
        self._wall_ref, self._mono_ref = wall, mono
        if abs(jump) > CLOCK_JUMP_S and self._first_new is not None:
            n = db.execute("UPDATE events SET created = created + ? WHERE id >= ?",
                           (jump, self._first_new)).rowcount
            if n:
                log.warning("spool %s: the wall clock moved by %+.0f s; the times of %d "
                            "event(s) stored since start move with it (they keep their age)",
                            self.path, jump, n)

    def _expire_rows(self, db, now: float) -> int:
        self._follow_clock(db)
        self._last_expire = now
        row = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events "
                         "WHERE created < ?", (now - self.max_age_s,)).fetchone()
        if not row[0]:
            return 0
        db.execute("DELETE FROM events WHERE created < ?", (now - self.max_age_s,))
        self._depth -= row[0]
        self._bytes -= row[1]
        return row[0]

    def _expire(self, now: float, force: bool = False) -> int:
        """Drop rows older than max_age_s (at most every 10 s unless forced; not while the disk
        refuses writes)."""
        with self._lock:
            if self._db is None or self.problem is not None \
                    or (not force and now - self._last_expire < 10.0):
                return 0
            try:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                n = self._expire_rows(db, now)
                if n:
                    self.dropped += n
                    self._save_dropped(db)
                    log.warning("spool %s: dropped %d event(s) older than %.0f s",
                                self.path, n, self.max_age_s)
                db.execute("COMMIT")
                return n
            except sqlite3.DatabaseError as e:
                _rollback(self._db)
                self._refused(e)
                return 0

    def fetch(self, after: int = 0, limit: int = 100) -> List[SpoolRecord]:
        """Up to ``limit`` records with row id > ``after``, oldest first; torn rows skipped."""
        now = time.time()
        self._expire(now)
        out: List[SpoolRecord] = []
        with self._lock:
            if self._db is None:
                return out
            self.retry()
            try:
                rows = self._db.execute(
                    "SELECT id, event_id, camera, created, payload FROM events WHERE id > ? "
                    "ORDER BY id LIMIT ?", (int(after), int(limit) + len(self._acked))
                ).fetchall()
            except sqlite3.DatabaseError as e:
                if self._is_damage(e):
                    self._recover(e)
                    return []
                log.error("spool %s: cannot read: %s", self.path, e)
                return []
            torn = []
            for rowid, event_id, camera, created, payload in rows:
                self._hi = max(self._hi, rowid)
                if rowid in self._acked or len(out) >= limit:
                    continue
                rec = SpoolRecord(rowid, event_id, camera, created,
                                  bytes(payload) if payload is not None else b"")
                why = self._check(rec)
                if why:
                    torn.append(rowid)
                    log.warning("spool %s: record %d (event %s) is torn or corrupt (%s); "
                                "skipped", self.path, rowid, event_id, why)
                    continue
                out.append(rec)
            if torn:
                self.corrupt += len(torn)
                self.delete(torn)
            out += [r for r in self._held.values() if r.rowid > after][:limit - len(out)]
        return out

    @staticmethod
    def _check(rec: SpoolRecord) -> Optional[str]:
        try:
            doc = json.loads(rec.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"payload is not JSON: {e}"
        if not isinstance(doc, dict) or doc.get("id") != rec.event_id:
            return "payload does not carry the event id"
        return None

    def delete(self, rowids: Iterable[int]) -> int:
        """Delete acknowledged rows; returns how many were there."""
        ids = [int(r) for r in rowids]
        if not ids:
            return 0
        with self._lock:
            if self._db is None:
                return 0
            held = [i for i in ids if i in self._held]
            for i in held:
                self._held_bytes -= len(self._held.pop(i).payload)
            ids = [i for i in ids if i not in self._acked and i not in held]
            if self.problem is not None and not self.retry():
                self._acked.update(ids)  # deleted once the disk takes writes again
                return len(held) + len(ids)
            if not ids:
                return len(held)
            try:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                n, size = 0, 0
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    c, s = db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) "
                                      f"FROM events WHERE id IN ({marks})", chunk).fetchone()
                    db.execute(f"DELETE FROM events WHERE id IN ({marks})", chunk)
                    n += c
                    size += s
                db.execute("COMMIT")
                self._depth -= n
                self._bytes -= size
            except sqlite3.DatabaseError as e:
                _rollback(self._db)
                if self._is_damage(e):
                    self._recover(e)
                    return len(held)
                self._refused(e)
                self._acked.update(ids)
                return len(held) + len(ids)
            self._vacuum_if_empty()
            return len(held) + n

    def _vacuum_if_empty(self) -> None:
        """An empty spool whose file grew gives the space back (VACUUM, then the WAL truncated)."""
        if self._depth or self._held or self._db is None:
            return
        try:
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            if free * page < VACUUM_MIN_BYTES:
                return
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("spool %s: empty; vacuumed (%d free page(s) given back)", self.path, free)
        except sqlite3.DatabaseError as e:  # (no room for it: tried again when next empty)
            log.debug("spool %s: cannot vacuum: %s", self.path, e)

    # -- state ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Events waiting for their acknowledgement (on disk or held in memory)."""
        return self._depth - len(self._acked) + len(self._held)

    @property
    def size_bytes(self) -> int:
        return self._bytes + self._held_bytes

    def stats(self) -> dict:
        return {"depth": self.depth, "bytes": self.size_bytes, "dropped": self.dropped,
                "corrupt": self.corrupt, "in_memory": self.in_memory,
                "held_in_memory": len(self._held), "problem": self.problem,
                "max_events": self.max_events,
                "max_bytes": self.max_bytes, "fsync": self.fsync}

    def close(self) -> None:
        with self._lock:
            if not self.retry(force=True) and (self._held or self._acked):
                log.error("spool %s: the disk still refuses writes at close: %d event(s) held "
                          "in memory are lost, %d acknowledged one(s) will be sent again",
                          self.path, len(self._held), len(self._acked))
            if self._db is not None:
                try:
                    self._db.close()
                except sqlite3.Error:
                    pass
                self._db = None
