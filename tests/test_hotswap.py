"""Hot swap: the generic watcher and holder, the gallery holder, and a stress test."""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edged.gallery import Gallery, MatchSettings, write_gallery
from edged.ota.galleryholder import GalleryHolder
from edged.ota.hotswap import FileWatcher, SwapHolder
from conftest import wait_for

SHA = "ab" * 32
OTHER = "cd" * 32




# --------------------------------------------------------------------------- generic holder


class Obj:
    def __init__(self, text):
        self.text = text
        self.closed = False

    def close(self):
        self.closed = True


def text_loader(path: Path) -> Obj:
    text = path.read_text()
    if text.startswith("bad"):
        raise ValueError(f"{path}: refused: {text.strip()}")
    return Obj(text.strip())


def test_holder_lease_keeps_old_object_until_released(tmp_path):
    p = tmp_path / "thing.txt"
    p.write_text("one")
    events = []
    h = SwapHolder("thing", p, text_loader, version=lambda o: o.text, closer=Obj.close,
                   on_event=events.append, watch=False)
    ev = h.start()
    assert ev.accepted and ev.new_version == "one" and ev.old_version is None and ev.trigger == "start"
    with h.lease() as first:
        assert first.text == "one"
        p.write_text("two")
        ev = h.reload()
        assert ev.accepted and (ev.old_version, ev.new_version) == ("one", "two")
        assert h.current.text == "two"
        assert not first.closed  # a reader still uses it
    assert wait_for(lambda: first.closed)  # closed once its last lease ended
    p.write_text("bad stuff")
    ev = h.reload()
    assert not ev.accepted and "refused: bad stuff" in ev.reason
    assert ev.old_version == "two" and h.current.text == "two" and not h.current.closed
    assert ev.seconds >= 0 and ev.path == str(p)
    assert [e.accepted for e in events] == [True, True, False]
    h.stop()
    assert h.current is None


def test_holder_prepare_commit_for_grouped_swaps(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("A1")
    h = SwapHolder("a", a, text_loader, version=lambda o: o.text, closer=Obj.close, watch=False)
    h.start()
    old = h.current
    obj = h.prepare()  # validated, not yet in service
    assert h.current is old
    ev = h.commit(obj, trigger="group")
    assert ev.accepted and h.current is obj and old.closed


def test_holder_missing_file_then_arrives(tmp_path):
    p = tmp_path / "late.txt"
    events = []
    h = SwapHolder("late", p, text_loader, version=lambda o: o.text, on_event=events.append,
                   debounce=0.02, settle=0.2)
    assert h.start() is None and h.current is None
    try:
        with h.lease() as o:
            assert o is None
        (tmp_path / ".late.txt.tmp").write_text("x")
        os.replace(tmp_path / ".late.txt.tmp", p)
        assert wait_for(lambda: h.current is not None)
        assert h.current.text == "x" and events[-1].trigger == "watch"
    finally:
        h.stop()


# --------------------------------------------------------------------------- watcher


def test_watcher_rename_create_and_inplace(tmp_path):
    seen = []
    w = FileWatcher(tmp_path, lambda p: seen.append((p.name, p.read_bytes())), debounce=0.05,
                    settle=5.0, name="t")
    w.start()
    try:
        # temp names are ignored; the rename into place is one arrival
        tmp = tmp_path / ".a.bin.tmp"
        tmp.write_bytes(b"A" * 1000)
        os.replace(tmp, tmp_path / "a.bin")
        assert wait_for(lambda: len(seen) == 1)
        assert seen[0] == ("a.bin", b"A" * 1000)
        # an in-place copy written slowly: taken only after it is closed, whole
        with open(tmp_path / "a.bin", "wb") as f:
            for _ in range(4):
                f.write(b"B" * 1000)
                f.flush()
                time.sleep(0.12)  # longer than the debounce: the file is still open
            assert len(seen) == 1
        assert wait_for(lambda: len(seen) == 2)
        assert seen[1] == ("a.bin", b"B" * 4000)
        # a new file
        (tmp_path / "c.bin").write_bytes(b"C")
        assert wait_for(lambda: len(seen) == 3)
        assert seen[2] == ("c.bin", b"C")
        time.sleep(0.3)
        assert len(seen) == 3  # one arrival each, no repeats
        assert {t.name for t in threading.enumerate()} >= {"watch-t", "swap-t"}
    finally:
        w.stop()


def test_watcher_modified_without_close_waits_for_settle(tmp_path):
    """Filesystems that report no close: the file is taken once quiet for ``settle``."""
    seen = []
    w = FileWatcher(tmp_path, seen.append, debounce=0.02, settle=0.4, name="s")
    w.start()
    try:
        p = tmp_path / "f.bin"
        p.write_bytes(b"x")
        seen.clear()
        time.sleep(0.2)
        seen.clear()
        t0 = time.monotonic()
        w._on_event(SimpleNamespace(is_directory=False, event_type="modified", src_path=str(p)))
        assert wait_for(lambda: seen, timeout=3)
        assert time.monotonic() - t0 >= 0.35
    finally:
        w.stop()


def test_watcher_needs_a_directory(tmp_path):
    w = FileWatcher(tmp_path / "nope", print)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        w.start()


# --------------------------------------------------------------------------- gallery holder


def gallery_file(path, tag: str, n_id=4, per=2, sha=SHA, seed=None):
    rng = np.random.default_rng(seed if seed is not None else abs(hash(tag)) % 2 ** 32)
    ids = [(f"{tag}-{j}", f"{tag} person {j}") for j in range(n_id)]
    ri = np.repeat(np.arange(n_id), per)
    emb = rng.standard_normal((len(ri), 192)).astype(np.float32)
    return write_gallery(path, ids, ri, emb, sha), emb


def test_gallery_holder_swaps_and_rejects(tmp_path):
    p = tmp_path / "gallery.edgal"
    c1, emb1 = gallery_file(p, "v1")
    events = []
    h = GalleryHolder(p, SHA, MatchSettings(threshold=0.5, threads=2), on_event=events.append,
                      snapshot_dir=tmp_path / "snap", debounce=0.02)
    try:
        ev = h.start()
        assert ev.accepted and ev.new_version == c1 and h.version() == c1
        assert not (tmp_path / "snap" / "last-good.edgal").exists()  # not serving yet
        h.keep_last_good()  # the daemon: this holder's set is in service
        assert h.current.threads == 2
        m = h.match(emb1[:1])[0]
        assert m.identity == "v1-0" and m.score > 0.99
        # the in-service gallery is a private snapshot, not the watched file
        assert h.current.path != p and h.current.source == p
        # a gallery for another embedder is refused; v1 stays
        other = tmp_path / ".other.tmp"
        gallery_file(other, "x", sha=OTHER)
        os.replace(other, p)
        assert wait_for(lambda: len(events) == 2)
        assert not events[-1].accepted and "made by embedder sha256" in events[-1].reason
        assert events[-1].old_version == c1 and h.version() == c1
        assert h.match(emb1[:1])[0].identity == "v1-0"
        # a good one by in-place copy
        tmp = tmp_path / "v2.edgal"
        c2, emb2 = gallery_file(tmp, "v2")
        with open(p, "wb") as f:
            f.write(tmp.read_bytes())
        assert wait_for(lambda: len(events) == 3)
        assert events[-1].accepted and h.version() == c2
        assert h.match(emb2[3:4])[0].identity == "v2-1"
        # SIGHUP-style reload of the same file
        ev = h.reload()
        assert ev.accepted and ev.trigger == "reload" and ev.old_version == c2
        snaps = list((tmp_path / "snap").glob("edged-gallery-*/*.edgal"))
        assert len(snaps) == 1  # old snapshots removed
        # the one in service is kept (linked) for the next start
        assert os.path.samefile(snaps[0], tmp_path / "snap" / "last-good.edgal")
    finally:
        h.stop()
    assert not list((tmp_path / "snap").glob("edged-gallery-*/*.edgal"))
    assert Gallery.open(tmp_path / "snap" / "last-good.edgal").checksum == c2


def test_a_gallery_refused_at_start_gives_way_to_the_last_good_one(tmp_path, caplog):
    # A bad drop stayed on disk at the gallery path, then the board rebooted.
    p = tmp_path / "gallery.edgal"
    c1, emb1 = gallery_file(p, "v1")
    h = GalleryHolder(p, SHA, watch=False, snapshot_dir=tmp_path / "snap")
    assert h.start().accepted
    h.keep_last_good()
    h.stop()
    p.write_bytes(p.read_bytes()[:-100])  # truncated
    h = GalleryHolder(p, SHA, watch=False, snapshot_dir=tmp_path / "snap")
    try:
        with caplog.at_level("ERROR", logger="edged.gallery"):
            ev = h.start()
        assert ev.accepted and ev.new_version == c1 and ev.trigger == "start: last good"
        assert h.match(emb1[:1])[0].identity == "v1-0"
        msg = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any(str(p) in m and "truncated" in m and "last good" in m for m in msg), msg
        assert p.stat().st_size > 0  # the refused file is left for inspection
    finally:
        h.stop()
    # a last good gallery of another embedder is refused too: no gallery, said so
    h = GalleryHolder(p, OTHER, watch=False, snapshot_dir=tmp_path / "snap")
    try:
        with caplog.at_level("ERROR", logger="edged.gallery"):
            ev = h.start()
        assert not ev.accepted and h.current is None
        assert h.match(emb1[:1])[0].identity is None
    finally:
        h.stop()


def test_snapshots_of_dead_processes_are_removed(tmp_path):
    """A snapshot directory is in use while its lock is held (by any process, whatever its
    PID); one whose holder died (SIGKILL) is removed at the next start."""
    import subprocess
    import sys
    import time as _time

    from edged.ota import galleryholder as G  # the module that reads the names patched here
    root = tmp_path / "snap"
    root.mkdir()
    old = _time.time() - 3600
    # a holder in another process that is killed: its lock goes with it
    dead = root / "edged-gallery-dead"
    dead.mkdir()
    (dead / "gallery-1.edgal").write_bytes(b"x")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; sys.path.insert(0, %r)\n"
                             "from edged.ota.galleryholder import _lock_snapshot_dir\n"
                             "from pathlib import Path\n"
                             "f = _lock_snapshot_dir(Path(%r)); print('locked', flush=True)\n"
                             "time.sleep(60)" % (str(Path(G.__file__).parents[2]), str(dead))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    alive = root / "edged-gallery-alive"
    alive.mkdir()
    f_alive = G._lock_snapshot_dir(alive)  # held by this (live) process
    legacy = root / "edged-gallery-1234-abc"  # an older edged's, no lock file
    legacy.mkdir()
    young = root / "edged-gallery-young"  # just made by someone, not locked yet
    young.mkdir()
    other = root / "something-else"
    other.mkdir()
    for d in (dead, alive, legacy, other):
        os.utime(d, (old, old))
    G._remove_stale_snapshots(root)
    assert dead.exists(), "locked by a live process: kept"
    proc.kill()
    proc.wait()
    os.utime(dead, (old, old))
    p = tmp_path / "gallery.edgal"
    gallery_file(p, "v1")
    h = GalleryHolder(p, SHA, watch=False, snapshot_dir=root)
    try:
        assert h.start().accepted
        assert not dead.exists() and not legacy.exists()
        assert alive.exists() and young.exists() and other.exists()
    finally:
        h.stop()
        f_alive.close()


def test_gallery_holder_without_gallery_says_unknown(tmp_path):
    h = GalleryHolder(tmp_path / "none.edgal", SHA, watch=False, snapshot_dir=tmp_path)
    assert h.start() is None
    ms = h.match(np.ones((2, 192), np.float32))
    assert [m.name for m in ms] == [None, None] and ms[0].score == 0.0
    ev = h.reload()
    assert not ev.accepted and ev.reason == "no such file"
    (tmp_path / "dir.edgal").mkdir()
    h2 = GalleryHolder(tmp_path / "dir.edgal", SHA, watch=False, snapshot_dir=tmp_path / "s")
    ev = h2.start()
    assert not ev.accepted and ev.reason == "is a directory, not a gallery file"
    h.stop()
    h2.stop()


def test_inplace_overwrite_does_not_touch_gallery_in_service(tmp_path):
    p = tmp_path / "gallery.edgal"
    _, emb = gallery_file(p, "v1")
    h = GalleryHolder(p, SHA, MatchSettings(threshold=0.5), watch=False,
                      snapshot_dir=tmp_path / "snap")
    h.start()
    try:
        with h.holder.lease() as g:
            with open(p, "r+b") as f:  # scribble over the watched file, and shorten it
                f.write(b"\0" * 4096)
                f.truncate(1000)
            assert g.search(emb[:1], 1)[0][0][0] == "v1-0"  # no SIGBUS, old content
    finally:
        h.stop()


# --------------------------------------------------------------------------- stress


CORRUPTIONS = {
    "truncated": ("truncated", lambda b: b[:len(b) - 700]),
    "checksum": ("checksum mismatch", lambda b: b[:-8] + b[-4:] + b[-8:-4]),
    "magic": ("wrong magic", lambda b: b"XXXXXXXX" + b[8:]),
    "empty": ("empty file", lambda b: b""),
    "embedder": ("made by embedder sha256", None),
    "half": ("truncated", lambda b: b[:len(b) // 2]),
}


def test_stress_hot_swap_under_search(tmp_path):
    """One thread searches without pause while another replaces the file ~250 times."""
    rng = random.Random(1234)
    p = tmp_path / "gallery.edgal"
    src = tmp_path / "src"
    src.mkdir()
    checksum0, _ = gallery_file(p, "g0", n_id=30, per=3)
    valid = {checksum0: "g0"}
    events = []
    ev_lock = threading.Lock()

    def on_event(ev):
        with ev_lock:
            events.append(ev)

    h = GalleryHolder(p, SHA, MatchSettings(threshold=-1.0, top_k=5), on_event=on_event,
                      snapshot_dir=tmp_path / "snap", debounce=0.01, settle=2.0)
    h.start()
    stop = threading.Event()
    errors, seen_tags, searches = [], set(), [0]
    query = np.random.default_rng(0).standard_normal((2, 192)).astype(np.float32)

    def searcher():
        while not stop.is_set():
            try:
                with h.holder.lease() as g:
                    res = g.search(query, 5)
                    assert not g.closed
                ms = h.match(query)
                for r in res:  # all candidates from one consistent file
                    tags = {ident.split("-")[0] for ident, _, _ in r}
                    assert len(tags) == 1, tags
                    seen_tags.update(tags)
                assert all(m.identity for m in ms), ms
                searches[0] += 1
            except Exception as exc:  # pragma: no cover - a failure is the test failing
                errors.append(repr(exc))

    t = threading.Thread(target=searcher, name="searcher")
    t.start()
    t0 = time.monotonic()
    expected = []  # (kind, checksum or reason fragment, method)
    try:
        for i in range(1, 251):
            method = rng.choice(["rename", "inplace"])
            corrupt = rng.random() < 0.4
            tag = f"g{i}"
            staged = src / f"{tag}.edgal"
            checksum, _ = gallery_file(staged, tag, n_id=rng.randint(1, 40), per=rng.randint(1, 3),
                                       sha=OTHER if corrupt else SHA)
            data = staged.read_bytes()
            if corrupt:
                kind = rng.choice(sorted(CORRUPTIONS))
                frag, fn = CORRUPTIONS[kind]
                if fn is not None:
                    gallery_file(staged, tag, n_id=3, per=1)
                    data = fn(staged.read_bytes())
            n_before = len(events)
            if method == "rename":
                tmp = tmp_path / f".gallery.edgal.{i}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, p)
            else:  # like cp over the file: truncate, write in pieces, close
                with open(p, "wb") as f:
                    step = max(1, len(data) // 3)
                    for k in range(0, len(data), step):
                        f.write(data[k:k + step])
                        f.flush()
                        if i % 25 == 0:
                            time.sleep(0.03)  # longer than the debounce, still open
            assert wait_for(lambda: len(events) > n_before, timeout=10), f"no event for drop {i}"
            ev = events[n_before]
            if corrupt:
                assert not ev.accepted, (i, kind, method, ev)
                assert frag in ev.reason, (i, kind, method, ev.reason)
                expected.append(("rejected", kind, method))
            else:
                assert ev.accepted, (i, method, ev)
                assert ev.new_version == checksum and h.version() == checksum
                valid[checksum] = tag
                expected.append(("accepted", tag, method))
            # the searcher ran on the new gallery before the next drop
            if not corrupt:
                n = searches[0]
                assert wait_for(lambda: searches[0] >= n + 2, timeout=5), errors[:3]
        time.sleep(0.1)
    finally:
        stop.set()
        t.join(10)
        h.stop()
    elapsed = time.monotonic() - t0
    assert not errors, errors[:5]
    assert len(events) == 251, "one event per drop (plus the start), no more"
    assert seen_tags <= set(valid.values())  # never a row of a corrupt file
    accepted = {e.new_version for e in events if e.accepted}
    assert accepted == set(valid)  # every valid file was in service
    kinds = {k for s, k, _ in expected if s == "rejected"}
    assert kinds == set(CORRUPTIONS) and {m for *_, m in expected} == {"rename", "inplace"}
    assert searches[0] > 250
    assert elapsed < 50, f"stress test took {elapsed:.1f} s"
    assert not list((tmp_path / "snap").glob("edged-gallery-*/*.edgal"))


# --------------------------------------------------------------------------- for model drops


def test_rollback_puts_previous_back(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("good")
    events = []
    h = SwapHolder("model", p, text_loader, version=lambda o: o.text, closer=Obj.close,
                   on_event=events.append, watch=False, keep_previous=True)
    h.start()
    good = h.current
    p.write_text("new")
    h.reload()
    assert h.current.text == "new" and not good.closed  # kept for a rollback
    new = h.current
    ev = h.rollback("non-finite outputs on the first frames")
    assert ev.accepted and ev.trigger == "rollback" and ev.reason.startswith("non-finite")
    assert (ev.old_version, ev.new_version) == ("new", "good")
    assert h.current is good and new.closed
    assert h.rollback() is None  # nothing further back
    p.write_text("newer")
    h.reload()
    h.release_previous()
    assert good.closed and h.current.text == "newer"
    h.stop()
    assert h.current.closed if h.current else True


def test_group_swaps_together(tmp_path):
    from edged.ota.hotswap import SwapGroup

    (tmp_path / "e.txt").write_text("e1")
    (tmp_path / "g.txt").write_text("g1")
    group = SwapGroup()
    emb = SwapHolder("embedder", tmp_path / "e.txt", text_loader, version=lambda o: o.text,
                     closer=Obj.close, watch=False, lock=group.lock)
    gal = SwapHolder("gallery", tmp_path / "g.txt", text_loader, version=lambda o: o.text,
                     closer=Obj.close, watch=False, lock=group.lock)
    emb.start()
    gal.start()
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            with group.lease(emb, gal) as (e, g):
                if e.text[1:] != g.text[1:] or e.closed or g.closed:
                    bad.append((e.text, g.text))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(2, 200):
        (tmp_path / "e.txt").write_text(f"e{i}")
        (tmp_path / "g.txt").write_text(f"g{i}")
        e_new, g_new = emb.prepare(), gal.prepare()
        evs = group.commit([(emb, e_new, None), (gal, g_new, None)])
        assert [ev.new_version for ev in evs] == [f"e{i}", f"g{i}"]
    stop.set()
    t.join()
    assert not bad


def test_without_flock_or_hard_links_the_gallery_is_still_served_and_kept(tmp_path, monkeypatch,
                                                                        caplog):
    """A state_dir on a filesystem without flock or hard links (vfat): galleries are served,
    and the last good one is copied in the background, the newest winning."""
    import errno

    from edged.ota import galleryholder as G  # the module that reads the names patched here

    def no_flock(d):
        raise OSError(errno.ENOLCK, "No locks available")

    def no_link(a, b):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(G, "_lock_snapshot_dir", no_flock)
    monkeypatch.setattr(G.os, "link", no_link)
    p = tmp_path / "gallery.edgal"
    c1, _ = gallery_file(p, "v1")
    events = []
    h = GalleryHolder(p, SHA, on_event=events.append, snapshot_dir=tmp_path / "snap",
                      debounce=0.02)
    lg = tmp_path / "snap" / "last-good.edgal"
    try:
        with caplog.at_level("WARNING", logger="edged.gallery"):
            assert h.start().accepted
        assert "cannot lock" in caplog.text
        h.keep_last_good()
        assert wait_for(lambda: lg.exists() and Gallery.open(lg).checksum == c1)
        checksums = [c1]
        for i in range(2, 6):  # quick successive swaps: the last one is what stays
            tmp = tmp_path / f".v{i}.tmp"
            checksums.append(gallery_file(tmp, f"v{i}")[0])
            os.replace(tmp, p)
            assert wait_for(lambda: h.version() == checksums[-1])
        assert wait_for(lambda: Gallery.open(lg).checksum == checksums[-1])
        time.sleep(0.3)
        assert Gallery.open(lg).checksum == checksums[-1]
    finally:
        h.stop()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc",
                    reason="malloc_trim, which gives freed heap pages back, is glibc's")
def test_a_replaced_object_gives_its_memory_back(tmp_path):
    """The object replaced was built before the new one, so its memory lies below it in the
    C heap, where glibc keeps it after free: the resident size grew by a model set (~70 MB)
    over the first SIGHUP reloads.  Now the pages go back to the system once it is freed."""
    path = tmp_path / "x"
    path.write_text("x")
    size = 80 << 20

    def load(_):  # 80 MB in 2 KiB pieces: malloc'd, not mapped one by one
        return [bytes(range(256)) * 8 for _ in range(size // 2048)]

    h = SwapHolder("blob", path, load, watch=False)
    try:
        h.reload()
        one = _rss()  # one object alive
        h.reload()  # the first object is replaced, and freed (no reader): without the trim
        # its pages stay resident below the new one (one + size); whenever the trim runs,
        # the resident size comes back near one object's
        assert wait_for(lambda: _rss() < one + size // 2, timeout=10), (one, _rss())
    finally:
        h.stop()
