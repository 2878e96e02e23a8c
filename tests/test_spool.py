"""The on-disk spool: order, bounds, persistence, torn records and damaged files."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

import pytest

from edged.publish.spool import Spool


def payload(i: int, event_id: str = None, pad: int = 0) -> bytes:
    return json.dumps({"id": event_id or f"e{i}", "n": i, "pad": "x" * pad}).encode()


def fill(sp: Spool, n: int, start: int = 0, pad: int = 0, created=None):
    return [sp.put(f"e{i}", "cam", created if created is not None else time.time(),
                   payload(i, pad=pad)) for i in range(start, start + n)]


def test_oldest_first_delete_and_persistence(tmp_path):
    sp = Spool(tmp_path / "s.db")
    rows = fill(sp, 10)
    assert rows == sorted(rows) and sp.depth == 10
    recs = sp.fetch(0, 4)
    assert [r.event_id for r in recs] == ["e0", "e1", "e2", "e3"]
    assert [r.event_id for r in sp.fetch(recs[-1].rowid, 100)] == [f"e{i}" for i in range(4, 10)]
    assert sp.delete([recs[0].rowid, recs[2].rowid]) == 2
    assert sp.delete([recs[0].rowid]) == 0  # already gone: a duplicate PUBACK
    assert sp.depth == 8
    sp.close()
    # a restart (or a crash: every put is committed) finds the rest, oldest first
    sp2 = Spool(tmp_path / "s.db")
    assert sp2.depth == 8
    assert [r.event_id for r in sp2.fetch(0, 3)] == ["e1", "e3", "e4"]
    assert json.loads(sp2.fetch(0, 1)[0].payload)["n"] == 1
    assert sp2.size_bytes == sum(len(r.payload) for r in sp2.fetch(0, 100))
    sp2.close()


def test_wal_mode_and_fsync_policy(tmp_path):
    for policy, level in (("off", 0), ("normal", 1), ("full", 2)):
        sp = Spool(tmp_path / f"{policy}.db", fsync=policy)
        assert sp._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sp._db.execute("PRAGMA synchronous").fetchone()[0] == level
        sp.close()
    with pytest.raises(ValueError, match=r"mqtt\.spool\.fsync: 'sometimes'"):
        Spool(tmp_path / "bad.db", fsync="sometimes")


def test_bounded_by_count_drops_oldest_and_counts(tmp_path, caplog):
    sp = Spool(tmp_path / "s.db", max_events=10)
    with caplog.at_level(logging.WARNING, "edged.spool"):
        fill(sp, 15)
    assert sp.depth == 10 and sp.dropped == 5
    assert [r.event_id for r in sp.fetch(0, 100)] == [f"e{i}" for i in range(5, 15)]
    assert "dropped the 1 oldest" in caplog.text
    sp.close()
    assert Spool(tmp_path / "s.db", max_events=10).dropped == 5  # the count survives restarts


def test_bounded_by_bytes(tmp_path):
    sp = Spool(tmp_path / "s.db", max_bytes=65536)
    fill(sp, 40, pad=4000)  # ~4 KB each
    assert sp.size_bytes <= 65536
    assert sp.dropped > 0 and sp.depth + sp.dropped == 40
    assert sp.fetch(0, 1)[0].event_id == f"e{sp.dropped}"


def test_bounded_by_age(tmp_path):
    sp = Spool(tmp_path / "s.db", max_age_s=60)
    fill(sp, 3, created=time.time() - 3600)
    fill(sp, 2, start=3)
    sp.close()
    sp = Spool(tmp_path / "s.db", max_age_s=60)  # expired on open (and every 10 s after)
    assert [r.event_id for r in sp.fetch(0, 10)] == ["e3", "e4"]
    assert sp.dropped == 3


def test_torn_record_is_skipped_with_a_log_line(tmp_path, caplog):
    sp = Spool(tmp_path / "s.db")
    fill(sp, 3)
    # what a torn write looks like: a cut payload, and one that is not this event's
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE events SET payload=? WHERE event_id='e1'", (payload(1)[:9],))
    db.execute("INSERT INTO events (event_id, camera, created, payload) VALUES "
               "('e3', 'cam', ?, ?)", (time.time(), b"\xff\xfe\x00garbage"))
    db.execute("INSERT INTO events (event_id, camera, created, payload) VALUES "
               "('e4', 'cam', ?, ?)", (time.time(), payload(5)))
    db.commit()
    db.close()
    sp.close()
    sp = Spool(tmp_path / "s.db")
    with caplog.at_level(logging.WARNING, "edged.spool"):
        recs = sp.fetch(0, 100)
    assert [r.event_id for r in recs] == ["e0", "e2"]
    assert sp.corrupt == 3 and sp.depth == 2
    assert "record 2 (event e1) is torn or corrupt (payload is not JSON" in caplog.text
    assert "(event e4) is torn or corrupt (payload does not carry the event id)" in caplog.text


def test_damaged_database_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "s.db"
    sp = Spool(path)
    fill(sp, 50, pad=500)
    sp.close()
    # a power cut that left garbage over the file's first pages
    data = bytearray(path.read_bytes())
    data[0:4096] = b"\x00garbage" * 512
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, "edged.spool"):
        sp = Spool(path)
    assert "is damaged" in caplog.text and "moved aside to" in caplog.text
    assert sp.depth == 0 and len(sp.moved_aside) == 1 and sp.moved_aside[0].exists()
    fill(sp, 2)
    assert [r.event_id for r in sp.fetch(0, 10)] == ["e0", "e1"]


def test_not_a_database_at_all(tmp_path, caplog):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite\n" * 100)
    with caplog.at_level(logging.ERROR, "edged.spool"):
        sp = Spool(path)
    assert "moved aside" in caplog.text
    assert sp.put("a", "cam", time.time(), payload(0, "a")) is not None


def test_row_ids_keep_increasing_after_recovery(tmp_path):
    sp = Spool(tmp_path / "s.db")
    rows = fill(sp, 5)
    sp._recover(sqlite3.DatabaseError("database disk image is malformed (test)"))
    new = sp.put("n", "cam", time.time(), payload(0, "n"))
    assert new > rows[-1]  # a reader's cursor (the last row id it sent) still sees it
    assert [r.event_id for r in sp.fetch(rows[-1], 10)] == ["n"]


def test_a_spool_file_that_cannot_be_opened_is_left_alone(tmp_path, caplog):
    """Not damage (here: a directory where the file should be; in life a lock held by another
    process, a full or read-only disk): nothing is moved aside or deleted, and the events are
    kept in memory until the next start."""
    path = tmp_path / "mqtt-spool.db"
    path.mkdir()
    (path / "keep").write_text("x")
    with caplog.at_level(logging.ERROR, logger="edged.spool"):
        sp = Spool(path)
    try:
        assert sp.in_memory and sp.stats()["in_memory"] is True
        assert "cannot open" in caplog.text and "kept in memory only" in caplog.text
        assert "damaged" not in caplog.text and not sp.moved_aside
        assert fill(sp, 3) == [1, 2, 3]
        assert [r.event_id for r in sp.fetch(0, 10)] == ["e0", "e1", "e2"]
    finally:
        sp.close()
    assert (path / "keep").read_text() == "x" and list(tmp_path.iterdir()) == [path]


def test_the_dropped_count_survives_a_recovery(tmp_path):
    sp = Spool(tmp_path / "s.db", max_events=2)
    try:
        fill(sp, 5)
        assert sp.dropped == 3
        sp._recover(sqlite3.DatabaseError("database disk image is malformed"))
        assert sp.dropped == 3
    finally:
        sp.close()
    again = Spool(tmp_path / "s.db", max_events=2)
    try:
        assert again.dropped == 3
    finally:
        again.close()


def test_a_wall_clock_set_forward_does_not_expire_the_new_events(tmp_path, monkeypatch, caplog):
    """A board without a real-time clock starts with an old time and NTP sets it days ahead:
    the events stored before that keep their age instead of all expiring at once. Events
    from before the start are aged by the wall clock as before."""
    import edged.publish.spool as S

    sp = Spool(tmp_path / "s.db", max_age_s=3600)
    try:
        fill(sp, 1, created=time.time() - 7200)  # (as if stored before a restart: too old)
        sp._first_new = None
        fill(sp, 2, start=1)
        real = time.time
        monkeypatch.setattr(S.time, "time", lambda: real() + 10 * 86400)  # NTP: 10 days on
        with caplog.at_level(logging.WARNING, logger="edged.spool"):
            sp._expire(S.time.time(), force=True)
        assert "the wall clock moved by +864000 s" in caplog.text
        assert [r.event_id for r in sp.fetch(0, 10)] == ["e1", "e2"]
        assert sp.dropped == 1
    finally:
        sp.close()


# -- a full disk (a real tmpfs, mounted when root) ---------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    from edged_daemon_helpers import small_tmpfs

    with small_tmpfs(tmp_path / "small", "2m") as d:
        yield d


def test_a_full_disk_holds_events_in_memory_then_stores_them_in_order(full_disk, caplog):
    from edged_daemon_helpers import fill_up

    sp = Spool(full_disk / "s.db", fsync="full")
    before = fill(sp, 5)
    filler = fill_up(full_disk / "filler")
    with caplog.at_level(logging.INFO, logger="edged.spool"):
        during = fill(sp, 200, start=5, pad=2000)
        assert sp.problem and "full" in sp.problem
        assert None not in during and during == sorted(during) and during[0] > before[-1]
        assert sp.depth == 205 and sp.stats()["held_in_memory"] == 200
        got = sp.fetch(0, 1000)
        assert [r.event_id for r in got] == [f"e{i}" for i in range(205)]
        # acknowledged while the disk is full: never handed out again, deleted later
        assert sp.delete(before[:3] + during[:2]) == 5
        assert [r.event_id for r in sp.fetch(0, 1000)][:2] == ["e3", "e4"]
        assert sp.depth == 200
        filler.unlink()
        assert sp.retry(force=True) and sp.problem is None
    lines = [r for r in caplog.records if r.name == "edged.spool"]
    assert len(lines) <= 3, [r.getMessage() for r in lines]  # not one line per event
    assert sum(r.levelno == logging.ERROR for r in lines) == 1
    assert "takes writes again" in lines[-1].getMessage()
    sp.close()
    sp = Spool(full_disk / "s.db")  # all on disk now: a restart loses nothing
    assert [r.event_id for r in sp.fetch(0, 1000)] == [f"e{i}" for i in range(3, 5)] + \
        [f"e{i}" for i in range(7, 205)]
    assert [r.rowid for r in sp.fetch(0, 1000)][2:] == during[2:]
    sp.close()


def test_a_disk_still_full_is_tried_again_with_a_back_off(full_disk, monkeypatch):
    from edged.publish import spool as spoolmod
    from edged_daemon_helpers import fill_up

    clock = [1000.0]
    monkeypatch.setattr(spoolmod.time, "monotonic", lambda: clock[0])
    sp = Spool(full_disk / "s.db")
    fill(sp, 2)
    filler = fill_up(full_disk / "filler")
    fill(sp, 20, start=2, pad=4000)
    assert sp.problem
    waits = []
    for _ in range(8):
        due = sp._retry_at
        assert not sp.retry()  # not due yet: not even tried
        clock[0] = due
        assert not sp.retry()
        waits.append(sp._retry_at - clock[0])
    assert waits == sorted(waits) and waits[0] >= 2 and waits[-1] == spoolmod.RETRY_MAX_S
    filler.unlink()
    clock[0] = sp._retry_at
    assert sp.retry() and sp.depth == 22
    sp.close()


def test_an_emptied_spool_gives_its_space_back(tmp_path):
    path = tmp_path / "s.db"
    sp = Spool(path, max_bytes=64 << 20)
    rows = fill(sp, 3000, pad=2000)
    big = path.stat().st_size
    assert big > 5 << 20
    sp.delete(rows[:2999])
    assert path.stat().st_size > big // 2  # not empty yet: no vacuum
    sp.delete(rows[2999:])
    assert path.stat().st_size < 64 << 10, path.stat().st_size
    wal = tmp_path / "s.db-wal"
    assert not wal.exists() or wal.stat().st_size <= 4 << 20
    assert fill(sp, 1)[0] > rows[-1]  # row ids go on increasing after the vacuum
    sp.close()
