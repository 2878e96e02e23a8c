"""The real daemon on a state partition that fills up, then frees: recognition goes on, the
health says ``degraded`` then ``healthy``, no event that was stored is lost, and the log says
it in a few lines, not one per event.

The state directory is a real tmpfs of a few MiB (mounted by the test; skipped when not root),
filled with a filler file until the kernel says ENOSPC.  The models, the video (the Hamilton
clip, looped) and the broker (mosquitto) are real; the broker is down while the disk fills,
comes back while it is still full (acknowledged events cannot be deleted then) and the
partition is freed after that.  Every wait is on an event (a status document, an event, a
message), never on a fixed sleep.
"""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time

import pytest

from conftest import wait_for
from edged.commands.status import read_status
from edged.publish.publisher import SPOOL_FILE
from edged_daemon_helpers import (EDGED, DaemonProcess, Subscriber, build_gallery, fill_up,
                                  small_tmpfs, write_config)

CLIP = "videos/facerec_short_hamilton_clip.mp4"
LIN = "Lin-Manuel_Miranda"
PREFIX = "edged/faults"
#: log lines about the full disk (the spool, the status file, the health)
ABOUT_IT = re.compile(r"edged\.spool:|status file:|health:")


@pytest.fixture
def state_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "state", "16m") as d:
        yield d


def _status(state) -> dict:
    try:
        return read_status(state / "status.json")
    except (FileNotFoundError, ValueError):
        return {}


def _lines_about_it(log: str) -> list:
    return [line for line in log.splitlines() if ABOUT_IT.search(line)]


def _spooled_ids(state) -> set:
    with sqlite3.connect(str(state / SPOOL_FILE)) as db:
        return {r[0] for r in db.execute("SELECT event_id FROM events")}


def test_a_full_state_partition_degrades_then_recovers_losing_nothing(
        shared_dir, broker, tmp_path, state_tmpfs):
    state = state_tmpfs
    gallery = build_gallery(shared_dir / "videos" / "hamilton_enrol", tmp_path / "g.edgal")
    broker.stop()  # down while the disk fills
    cfg = write_config(
        tmp_path / "config.yaml",
        device={"name": "faults"},
        cameras=[{"name": "stage", "source": str(shared_dir / CLIP), "realtime": False,
                  "loop": True}],
        paths={"gallery": str(gallery), "state_dir": str(state)},
        match={"threshold": 0.58},
        drops={"enabled": False},
        mqtt={"host": "127.0.0.1", "port": broker.port, "keepalive": 5, "reconnect_min_s": 0.2,
              "reconnect_max_s": 1, "spool": {"max_bytes": 1 << 20}},
        logging={"target": "stderr", "level": "info"},
    )
    run1 = tmp_path / "run1"
    run1.mkdir()
    d = DaemonProcess(cfg, run1)
    sub = None
    try:
        assert wait_for(lambda: _status(state).get("state") == "healthy", 180), d.log()[-3000:]
        assert wait_for(lambda: any(e["identity"] == LIN for e in d.events()), 180), d.log()[-3000:]

        # -- full: recognition goes on, the health says degraded (status file and command)
        fill_up(state / "filler")
        full_at, log_at, produced_before = time.monotonic(), len(d.log()), len(d.events())
        assert wait_for(lambda: _status(state).get("state") == "degraded", 60), d.log()[-3000:]
        assert wait_for(lambda: any(e["identity"] == LIN for e in d.events()[produced_before:]),
                        120), "no recognition while the disk is full: the gallery is gone"
        assert wait_for(lambda: "spool" in _status(state).get("problems", {}), 60), \
            _status(state)
        r = subprocess.run([EDGED, "status", "--state-dir", str(state)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "health     degraded: spool: cannot write" in r.stdout, \
            r.stdout + r.stderr

        # -- the broker back while the disk is still full: events go out (their rows cannot
        # be deleted yet), and the retained status says degraded
        broker.start()
        sub = Subscriber(broker.port, f"{PREFIX}/#")

        def retained():
            docs = [json.loads(p) for t, p in sub.messages if t == f"{PREFIX}/status"]
            return docs[-1] if docs else {}

        assert wait_for(lambda: retained().get("state") == "degraded", 60), retained()
        assert wait_for(lambda: len(sub.events(PREFIX)) >= produced_before + 3, 120)

        # -- space again: healthy by itself (no SIGHUP), in status.json and on MQTT
        (state / "filler").unlink()
        freed_at = time.monotonic()
        assert wait_for(lambda: _status(state).get("state") == "healthy", 120), d.log()[-3000:]
        assert wait_for(lambda: retained().get("state") == "healthy", 60), retained()
        recovered_at = time.monotonic()
        assert wait_for(lambda: len(d.events()) >= produced_before + 10, 120)
        minutes = (recovered_at - full_at) / 60.0
        lines = _lines_about_it(d.log()[log_at:])
        print(f"\n{len(lines)} line(s) about the full disk in {minutes:.1f} min:", *lines,
              sep="\n")
        assert len(lines) <= 8 + 3 * minutes, "\n".join(lines)  # not one line per event
        assert sum("<3>" in line for line in lines) <= 2, "\n".join(lines)
        assert "Traceback" not in d.log()
    finally:
        d.kill()  # SIGKILL: no flush; what was stored must be on disk
    produced = set(e["id"] for e in d.events())
    spooled = _spooled_ids(state)

    def missing():
        return produced - {e["id"] for e in sub.events(PREFIX)} - spooled

    # the broker acknowledged (and the spool deleted) some events just before the kill that the
    # subscriber may not have been handed yet: those arrive, what was lost never does
    wait_for(lambda: not missing(), 30)
    assert not missing(), f"{len(missing())} event(s) stored but neither sent nor on disk"

    # -- a restart delivers what the killed run left in the spool
    run2 = tmp_path / "run2"
    run2.mkdir()
    d2 = DaemonProcess(cfg, run2)
    try:
        # (everything may have arrived before the kill: wait for the start before SIGTERM)
        d2.wait_log(" ready: ", timeout=120)
        assert wait_for(lambda: set(produced) <= {e["id"] for e in sub.events(PREFIX)}, 180), \
            f"{len(set(produced) - {e['id'] for e in sub.events(PREFIX)})} event(s) lost"
        named = [e for e in sub.events(PREFIX) if e["id"] in set(produced) and e["identity"] == LIN]
        assert named, "no delivered event names the enrolled person"
        d2.terminate(timeout=30)
        assert d2.proc.returncode == 0, d2.log()[-3000:]
    finally:
        d2.kill()
        sub.close()
    assert _status(state)["state"] == "stopped"
    # the daemon's own kept files were written only with their margin (on this 16 MiB
    # partition the copy of the installed models fits before the filler comes), and never
    # left a partial one
    copy = state / "installed-copy"
    assert copy.is_dir() or re.search(
        r"cannot keep a copy of the installed models: .*not enough free space", d.log())
    assert not list(state.rglob("*.tmp")), list(state.rglob("*"))


def test_a_gallery_whose_snapshot_does_not_fit_is_served_and_degraded_until_it_does(
        public_clip, public_enrol, tmp_path, state_tmpfs):
    """The daemon starts on a state partition with room for its spool but not for the gallery
    snapshot and its margin: the gallery serves from memory (Obama is named), the health is
    degraded with the reason, and once room is made the snapshot is written and the health
    is healthy again, with no SIGHUP."""
    state = state_tmpfs
    gallery = build_gallery(public_enrol, tmp_path / "people.edgal")
    filler = state / "filler"
    with open(filler, "wb") as f:  # leave 3 MiB of the 16: less than the 4 MiB margin
        f.write(b"\0" * (13 << 20))
    cfg = write_config(tmp_path / "config.yaml", device={"name": "snapfull"},
                       cameras=[{"name": "door", "source": str(public_clip), "loop": True}],
                       paths={"gallery": str(gallery), "state_dir": str(state)},
                       mqtt={"enabled": False}, logging={"target": "stderr"})
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.wait_log("recognized Barack Obama", timeout=120)  # served from memory
        assert wait_for(lambda: "gallery_snapshot" in (_status(state).get("problems") or {}),
                        30), _status(state)
        doc = _status(state)
        assert doc["state"] == "degraded"
        assert "not enough free space" in json.dumps(doc["problems"]["gallery_snapshot"])
        assert not list((state / "gallery-snapshots").glob("*/*.edgal"))
        filler.unlink()
        assert wait_for(lambda: _status(state).get("state") == "healthy", 60), _status(state)
        assert list((state / "gallery-snapshots").glob("**/*.edgal"))
        d.terminate(timeout=20)
        assert d.proc.returncode == 0, d.log()[-3000:]
    finally:
        d.kill()
    log = d.log()
    assert "serving it from memory" in log and "its snapshot is written" in log
    assert "Traceback" not in log
