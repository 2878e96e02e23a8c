"""The daemon's gallery holder under hostile conditions: a full state directory, files that
are no galleries, symbolic links, refused files at every SIGHUP, processes killed."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edged.gallery import GalleryError, MatchSettings, peek_embedder, write_gallery
from edged.ota.galleryholder import GalleryHolder
from gallery_craft import fill, tmpfs

SHA = "ab" * 32
OTHER = "cd" * 32
ROOT = Path(__file__).resolve().parents[1]


def people(path, n=20, seed=0, sha=SHA):
    emb = np.random.default_rng(seed).standard_normal((n, 192)).astype(np.float32)
    write_gallery(path, [(f"p{j}", f"P {j}") for j in range(n)], np.arange(n), emb, sha)
    return emb


def holder(path, snaps, **kw):
    return GalleryHolder(path, kw.pop("sha", SHA), MatchSettings(threshold=0.5), watch=False,
                         snapshot_dir=snaps, **kw)


def errors(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "edged.gallery" and r.levelno >= logging.ERROR]


def test_a_full_state_dir_serves_the_gallery_from_memory_until_there_is_room(tmp_path, caplog):
    """Once: the snapshot failed (ENOSPC), the gallery was refused, every face unknown."""
    g = tmp_path / "gallery.edgal"
    emb = people(g)
    with tmpfs(tmp_path / "state", "80m") as state:
        filler = fill(state)
        h = holder(g, state / "gallery-snapshots")
        try:
            with caplog.at_level(logging.INFO):
                ev = h.start()
                h.keep_last_good()
            assert ev.accepted, ev
            assert h.match(emb[3:4])[0].identity == "p3"
            why = h.snapshot_error
            assert why.startswith(f"not enough free space in {state}/gallery-snapshots for a "
                                  f"gallery snapshot"), why
            (err,) = errors(caplog)
            assert err.startswith(f"gallery {g}: not enough free space") and "from memory" in err
            assert h.current.snapshot is None and not h.last_good.exists()
            assert [p.name for p in h._snapdir.iterdir()] == [".lock"]  # nothing partial
            with open(g, "r+b") as f:  # the file is not what is served: scribbled over, cut
                f.write(b"\0" * 4096)
                f.truncate(1000)
            assert h.match(emb[5:6])[0].identity == "p5"
            assert not h.retry_snapshot() and h.snapshot_error  # still full

            filler.unlink()  # room again: the snapshot is written, searches go on meanwhile
            stop, bad = threading.Event(), []

            def search():
                while not stop.is_set():
                    m = h.match(emb[7:9])
                    if [x.identity for x in m] != ["p7", "p8"]:
                        bad.append(m)
            t = threading.Thread(target=search)
            t.start()
            try:
                assert h.retry_snapshot()
            finally:
                stop.set()
                t.join()
            assert not bad
            assert h.snapshot_error is None and h.retry_snapshot()
            snap = h.current.snapshot
            assert snap.parent == h._snapdir and os.path.samefile(snap, h.last_good)
            assert h.current.path == snap and h.match(emb[9:10])[0].identity == "p9"
        finally:
            h.stop()
        assert not list(state.glob("gallery-snapshots/edged-gallery-*"))


def test_a_file_that_is_no_gallery_is_refused_by_its_header_before_any_copy(tmp_path):
    """Once: copied whole into the state directory, then found to be no gallery (1 GiB:
    49 s).  Now the header (and the size limit) is checked first: nothing is copied."""
    snaps = tmp_path / "snaps"
    junk = tmp_path / "junk.edgal"
    with open(junk, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    h = holder(junk, snaps)
    ev = h.start()
    assert not ev.accepted and ev.reason == "not an edged gallery (wrong magic)"
    good = tmp_path / "gallery.edgal"
    people(good)
    with open(good, "ab") as f:  # a good header, 64 MiB more than it says
        f.truncate(good.stat().st_size + (64 << 20))
    ev = holder(good, snaps).start()
    assert not ev.accepted and ev.reason.startswith("trailing bytes: file is ")
    people(good)
    size = good.stat().st_size
    ev = holder(good, snaps, max_bytes=size - 1).start()
    assert not ev.accepted
    assert ev.reason == f"{size} bytes, larger than the {size - 1} allowed (drops.max_gallery_bytes)"
    assert not list(snaps.glob("edged-gallery-*"))  # no snapshot was even begun
    assert holder(good, snaps, max_bytes=size).start().accepted


def test_a_symbolic_link_at_the_gallery_path_is_refused_never_followed(tmp_path):
    """Once: a link to /etc/passwd was followed, and its first bytes went onto MQTT.  Now a
    link there is refused as every drop that is a link is (docs/ota.md), whatever it names,
    and the refusal names no target and quotes no byte."""
    from edged.ota.intake import SYMLINK_REASON

    d, elsewhere = tmp_path / "lib", tmp_path / "etc"
    d.mkdir()
    elsewhere.mkdir()
    (elsewhere / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    people(elsewhere / "gallery.edgal")
    people(d / "gallery-v2.edgal")
    link = d / "gallery.edgal"
    for target in (elsewhere / "passwd", elsewhere / "gallery.edgal", Path("gallery-v2.edgal"),
                   tmp_path / "nowhere"):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        ev = holder(link, tmp_path / "snaps").start()
        assert not ev.accepted and ev.reason == SYMLINK_REASON, ev
        with pytest.raises(GalleryError) as ei:
            peek_embedder(link)
        assert ei.value.reason == SYMLINK_REASON
    assert not list((tmp_path / "snaps").glob("edged-gallery-*/*.edgal"))


def test_a_refused_file_is_not_read_again_until_it_changes(tmp_path, caplog):
    """SIGHUP builds a new holder and starts it: a file refused before and not changed
    since is not read, reported or logged as an error again (it was, at every SIGHUP)."""
    g, snaps = tmp_path / "gallery.edgal", tmp_path / "snaps"
    emb = people(g)
    h = holder(g, snaps)
    assert h.start().accepted
    h.keep_last_good()
    h.stop()
    g.write_bytes(g.read_bytes()[:-100])  # a bad drop stays at the gallery path
    seen = []
    with caplog.at_level(logging.INFO):
        h1 = holder(g, snaps, on_event=seen.append)
        ev1 = h1.start()
        first = errors(caplog)
        caplog.clear()
        h2 = holder(g, snaps, on_event=seen.append)
        ev2 = h2.start()
    try:
        assert [e.accepted for e in seen] == [False, True, True]  # refused, last good (twice)
        assert ev1.trigger == ev2.trigger == "start: last good" and ev2.accepted
        assert len(first) == 1 and "truncated" in first[0] and "last good" in first[0]
        assert errors(caplog) == []  # the second time: no error, one line at INFO
        assert any("unchanged since it was refused (truncated: " in r.getMessage()
                   for r in caplog.records)
        assert h2.match(emb[2:3])[0].identity == "p2"
    finally:
        h1.stop()
        h2.stop()
    h3 = holder(g, snaps, sha=OTHER)  # other expectations: read again
    assert not h3.start().accepted
    h3.stop()
    people(g, seed=1)  # changed: read again, and good
    seen.clear()
    h4 = holder(g, snaps, on_event=seen.append)
    try:
        assert h4.start().trigger == "start" and [e.accepted for e in seen] == [True]
    finally:
        h4.stop()


def test_the_snapshot_directory_of_a_killed_process_goes_at_the_next_start(tmp_path):
    """A SIGKILL, then a restart a moment later: the dead process's snapshot directory is
    removed at once (it was kept while younger than 60 s), with or without a gallery."""
    g, snaps = tmp_path / "gallery.edgal", tmp_path / "snaps"
    people(g)
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from edged.ota.galleryholder import GalleryHolder\n"
            f"h = GalleryHolder({str(g)!r}, {SHA!r}, watch=False, snapshot_dir={str(snaps)!r})\n"
            "assert h.start().accepted; print('up', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        (dead,) = snaps.glob("edged-gallery-*")
        h = holder(tmp_path / "none.edgal", snaps)
        h.start()
        assert dead.exists()  # alive: kept
        h.stop()
    finally:
        proc.kill()
        proc.wait()
    h = holder(tmp_path / "none.edgal", snaps)  # no gallery at all: cleaned all the same
    try:
        assert h.start() is None and not dead.exists()
    finally:
        h.stop()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o440), (0o077, 0o400)])
def test_snapshots_are_readable_by_owner_and_group_only(tmp_path, umask, mode):
    """Once 0444 whatever the umask: the faces of everyone enrolled, readable by all."""
    g = tmp_path / "gallery.edgal"
    people(g)
    old = os.umask(umask)
    try:
        h = holder(g, tmp_path / "snaps")
        h.start()
        h.keep_last_good()
    finally:
        os.umask(old)
    try:
        assert os.stat(h.current.snapshot).st_mode & 0o777 == mode
        assert os.stat(h.last_good).st_mode & 0o777 == mode
        assert os.stat(h._snapdir).st_mode & 0o777 == 0o700
    finally:
        h.stop()


def test_the_gallery_limit_is_its_own_and_fits_a_million_rows():
    """A 1M-row float32 gallery (about 750 MB) is no drop of a model: its limit is
    drops.max_gallery_bytes, not the 256 MiB of drops.max_bytes (review)."""
    from edged.config import loads

    drops = loads("").drops
    assert drops.max_bytes == 256 << 20
    assert drops.max_gallery_bytes >= 1_000_000 * (192 * 4 + 8)
