"""The real daemon and a real broker that is not there: nothing is lost, availability is right.

tests/test_publish.py shows the publisher's guarantees with a small producer process; these
tests show the same through ``edged run`` itself, on the real Hamilton clip.
"""
from __future__ import annotations

import sqlite3
import time

from edged.publish.publisher import SPOOL_FILE
from edged_daemon_helpers import DaemonProcess, Subscriber, write_config

CLIP = "videos/facerec_short_hamilton_clip.mp4"


def _config(tmp_path, shared_dir, port, name="outage", **camera):
    return write_config(
        tmp_path / "config.yaml",
        device={"name": name},
        cameras=[dict({"name": "stage", "source": str(shared_dir / CLIP), "realtime": False},
                      **camera)],
        paths={"gallery": str(tmp_path / "no-gallery.edgal"), "state_dir": str(tmp_path / "state")},
        mqtt={"host": "127.0.0.1", "port": port, "keepalive": 5, "reconnect_min_s": 0.2,
              "reconnect_max_s": 1},
        logging={"target": "stderr", "level": "info"},
    )


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} after {timeout}s")


def test_sigkilled_with_spooled_events_and_broker_down_delivers_them_on_restart(
        shared_dir, broker, tmp_path):
    broker.stop()  # the broker is down for the whole first run
    cfg = _config(tmp_path, shared_dir, broker.port)
    first = tmp_path / "run1"
    first.mkdir()
    d = DaemonProcess(cfg, first)
    try:
        d.wait_log("end of file", timeout=180)
        _wait(lambda: len(d.events()) >= 3, 30, "fewer than 3 events")
        time.sleep(1.0)  # the last track_ended events reach the spool
    finally:
        d.kill()  # SIGKILL: no clean stop, no flush
    produced = [e["id"] for e in d.events()]
    assert len(produced) >= 3, d.log()[-2000:]
    with sqlite3.connect(str(tmp_path / "state" / SPOOL_FILE)) as db:
        spooled = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert spooled == len(produced), "every event must be in the spool, none acknowledged"

    broker.start()
    sub = Subscriber(broker.port, "edged/outage/events")
    second = tmp_path / "run2"
    second.mkdir()
    d2 = DaemonProcess(cfg, second)
    try:
        _wait(lambda: set(produced) <= {e["id"] for e in sub.events("edged/outage")}, 120,
              "spooled events of the killed run did not all arrive")
    finally:
        d2.kill()
        sub.close()
    got = sub.events("edged/outage")
    by_id = {e["id"]: e for e in got}
    first_run = [e for e in d.events()]
    for e in first_run:  # the original ids and timestamps, not new ones
        assert by_id[e["id"]]["frame_time"] == e["frame_time"]
        assert by_id[e["id"]]["type"] == e["type"]
        # --events-out and MQTT carry one document; only publish_time and debug differ
        mqtt_doc = {k: v for k, v in by_id[e["id"]].items() if k != "publish_time"}
        assert mqtt_doc == {k: v for k, v in e.items() if k not in ("publish_time", "debug")}
    order = [e["id"] for e in got if e["id"] in set(produced)]
    firsts = list(dict.fromkeys(order))
    assert firsts == produced, "the backlog did not arrive oldest first"
    assert "Traceback" not in d2.log()


def test_availability_offline_on_sigkill_and_stopped_on_sigterm(shared_dir, broker, tmp_path):
    cfg = _config(tmp_path, shared_dir, broker.port, name="avail", loop=True, realtime=True)
    sub = Subscriber(broker.port, "edged/avail/availability")

    def last():
        msgs = [p.decode() for t, p in sub.messages]
        return msgs[-1] if msgs else None

    try:
        d = DaemonProcess(cfg, tmp_path)
        _wait(lambda: last() == "online", 120, "no 'online'")
        d.proc.kill()  # SIGKILL: the broker publishes the last will
        d.proc.wait()
        _wait(lambda: last() == "offline", 30, "no 'offline' last will after SIGKILL")
        d.kill()
        d2 = DaemonProcess(cfg, tmp_path)
        _wait(lambda: last() == "online", 120, "no 'online' after restart")
        d2.terminate(timeout=20)
        assert d2.proc.returncode == 0
        _wait(lambda: last() == "stopped", 10, "no 'stopped' after SIGTERM")
        d2.kill()
    finally:
        sub.close()
