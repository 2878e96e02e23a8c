"""End to end: ``edged run`` on the real Hamilton clip, a real mosquitto, a real NOTIFY_SOCKET.

The clip (275 frames, 640x360) has four shots: a wide stage shot (frames 0-19: Lin-Manuel
Miranda's face about 40 px wide, and a tiny blurred face of the pianist), a close shot of
another performer (20-81), a close shot of Miranda (82-210) and, after the cut at 211, the
audience.  The gallery is enrolled with ``edged gallery build`` from one still per person; the
identification threshold is the open-set default of docs/accuracy.md (0.58), pinned here so
that the expected counts do not move with it.  Expected, and why:

- exactly **1** ``recognized`` event, Lin-Manuel Miranda, early in the close shot (about frame
  89, once two embeddings of his track score >= 0.58).  However long the shot, a track is
  recognised once.  In the wide shot his 40 px face scores only 0.37-0.58 against his
  enrolment still: near misses, so that track is neither named nor called ``unknown`` (not
  enough evidence either way), and the cut at frame 20 ends it: a cut never passes a name on.
- nobody in the audience (frames >= 211) is ever named: the cut ends his track, and the
  audience's faces match nobody (best scores about 0.1): they are confirmed ``unknown``;
- Alex Lacamoire (the pianist of the wide shot, a 25 px face with a Laplacian variance of
  about 6-10) is never named: his face is mostly below the quality minimums, so it is tracked
  but rarely embedded, and the few embeddings of such a face are far from his enrolment
  photo (best scores about 0.4): not enough evidence for a name.
"""
from __future__ import annotations

import time

import pytest

from edged_daemon_helpers import (DaemonProcess, NotifyListener, Subscriber, build_gallery,
                                  fake_services, write_config)

CLIP = "videos/facerec_short_hamilton_clip.mp4"
LIN = "Lin-Manuel_Miranda"
ALEX = "Alex_Lacamoire"
CUT_TO_AUDIENCE = 211


@pytest.fixture(scope="module")
def hamilton_gallery(shared_dir, tmp_path_factory):
    return build_gallery(shared_dir / "videos" / "hamilton_enrol",
                         tmp_path_factory.mktemp("gallery") / "hamilton.edgal")


def test_edged_run_on_the_hamilton_clip(shared_dir, hamilton_gallery, broker, tmp_path):
    prefix = "edged/e2e"
    cfg = write_config(
        tmp_path / "config.yaml",
        device={"name": "e2e"},
        cameras=[{"name": "stage", "source": str(shared_dir / CLIP), "realtime": False}],
        paths={"gallery": str(hamilton_gallery), "state_dir": str(tmp_path / "state")},
        match={"threshold": 0.58},
        mqtt={"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 1},
        logging={"target": "stderr", "level": "info"},
    )
    notify = NotifyListener(tmp_path / "notify.sock")
    sub = Subscriber(broker.port, f"{prefix}/#")
    d = DaemonProcess(cfg, tmp_path, notify=notify.path, watchdog_usec=1_000_000)
    try:
        ready = notify.wait_for("READY=1", timeout=120)
        ended = d.wait_log("end of file", timeout=180)
        time.sleep(2.5)  # frames have stopped: so must the watchdog pings
        stop_took = d.terminate(timeout=20)
        assert d.proc.returncode == 0, d.log()[-3000:]
    finally:
        d.kill()
        notify.close()
    log = d.log()
    events = d.events()
    time.sleep(0.5)
    sub.close()

    # -- systemd: READY once up, WATCHDOG only while frames flow, STOPPING on SIGTERM
    pings = notify.times("WATCHDOG=1")
    playing = [t for t in pings if ready <= t <= ended]
    assert len(playing) >= max(3, int((ended - ready) / 0.5) - 4), (len(playing), ended - ready)
    late = [round(t - ended, 2) for t in pings if t > ended + 1.0]
    assert not late, f"watchdog pings {late} s after the video ended (no frames flow)"
    assert notify.first("STOPPING=1") is not None
    assert notify.first("STOPPING=1")[0] > ended
    assert stop_took < 10, f"SIGTERM to exit took {stop_took:.1f} s"
    status = notify.first("STATUS=")
    assert status and "stage" in status[1]

    # -- the events (written by --events-out, with the frame that caused each)
    rec = [e for e in events if e["type"] == "recognized"]
    assert [e["identity"] for e in rec] == [LIN], rec
    assert 82 <= rec[0]["debug"]["frame_index"] < 120, rec
    assert rec[0]["score"] >= 0.58 and rec[0]["name"] == "Lin-Manuel Miranda"
    # the wide shot: his near misses name nobody and do not make him "unknown" either
    wide = [e for e in events if e["type"] == "face_appeared" and e["debug"]["frame_index"] < 20]
    lin_wide = {e["track_id"] for e in wide if e["box"][2] - e["box"][0] > 35}
    assert len(lin_wide) == 1, wide
    assert not any(e["type"] in ("recognized", "unknown") and e["track_id"] in lin_wide
                   for e in events)
    audience = {e["track_id"] for e in events
                if e["type"] == "face_appeared" and e["debug"]["frame_index"] >= CUT_TO_AUDIENCE}
    assert len(audience) >= 3
    for e in events:
        assert e["identity"] != ALEX and e["name"] != "Alex Lacamoire", e
        if e["track_id"] in audience or e["type"] != "track_ended" and (
                e["debug"]["frame_index"] is None or e["debug"]["frame_index"] >= CUT_TO_AUDIENCE):
            assert e["identity"] is None, f"the audience reported as {e['name']}: {e}"
    # Miranda's tracks end at the cuts, with their duration and best score
    ended_lin = [e for e in events if e["type"] == "track_ended" and e["identity"] == LIN]
    assert {e["track_id"] for e in ended_lin} == {e["track_id"] for e in rec}
    assert all(e["duration"] > 0 and e["best_score"] >= 0.58 for e in ended_lin)
    assert [e["debug"]["frame_index"] for e in ended_lin] == [CUT_TO_AUDIENCE]
    # the audience is seen and confirmed unknown
    assert any(e["type"] == "unknown" and e["track_id"] in audience for e in events)
    # every track that appeared also ended
    appeared = {e["track_id"] for e in events if e["type"] == "face_appeared"}
    assert appeared == {e["track_id"] for e in events if e["type"] == "track_ended"}

    # -- every event reached the subscriber through mosquitto, once, with the model versions
    got = sub.events(prefix)
    assert sorted(e["id"] for e in got) == sorted(e["id"] for e in events)
    mrec = [e for e in got if e["type"] == "recognized"]
    assert [e["name"] for e in mrec] == ["Lin-Manuel Miranda"]
    assert all(e["versions"]["embedder"] and e["versions"]["gallery"] for e in mrec)
    assert all(e["camera"] == "stage" for e in got)
    topics = {t for t, _ in sub.messages}
    assert f"{prefix}/status" in topics and f"{prefix}/stats" in topics
    import json

    stats = [json.loads(p) for t, p in sub.messages if t == f"{prefix}/stats"]
    busy = [st for st in stats if st["cameras"]["stage"]["fps"] > 0]
    assert busy, stats[-1]
    st = busy[-1]
    assert {"detect", "embed", "match", "track", "frame"} <= set(st["stages_ms"])
    assert st["stages_ms"]["detect"]["median"] > 0 and "dropped" in st["cameras"]["stage"]
    assert st["rss_mb"] > 0 and "cpu_percent" in st and "queue_depth" in st
    statuses = [json.loads(p) for t, p in sub.messages if t == f"{prefix}/status"]
    # each status retained is whole: the first one too has every part the start sets (one
    # update), and the health; the last one (the clean stop) says stopped
    for doc in statuses:
        assert {"versions", "accelerators", "cameras", "drops", "drop_dir", "state"} <= set(doc), \
            doc
        assert doc["versions"]["embedder"] and doc["state"] in ("starting", "healthy",
                                                                  "stopped"), doc
    assert statuses[-1]["state"] == "stopped"
    status = [doc for doc in statuses if doc["state"] == "healthy"][-1]
    assert status["versions"]["embedder"] == mrec[0]["versions"]["embedder"]
    assert status["cameras"]["stage"]["resolution"] == [640, 360]
    assert set(status["accelerators"]) >= {"detector", "embedder"}

    # -- the log says what happened, journal-friendly
    assert "<6>edged.daemon: camera stage: recognized Lin-Manuel Miranda" in log
    assert "Traceback" not in log


def test_sighup_reloads_and_a_bad_file_is_refused(shared_dir, hamilton_gallery, tmp_path):
    import signal

    def cfg(**tracking):
        return write_config(
            tmp_path / "config.yaml",
            device={"name": "reload"},
            cameras=[{"name": "stage", "source": str(shared_dir / CLIP), "loop": True}],
            paths={"gallery": str(hamilton_gallery), "state_dir": str(tmp_path / "state")},
            tracking=tracking, mqtt={"enabled": False}, logging={"target": "stderr"})

    path = cfg()
    notify = NotifyListener(tmp_path / "notify.sock")
    d = DaemonProcess(path, tmp_path, notify=notify.path, watchdog_usec=1_000_000)
    try:
        notify.wait_for("READY=1", timeout=120)
        time.sleep(1)
        cfg(detect_every=2)
        mark = len(d.log())
        t_hup = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("reloaded: embedder", timeout=60, after=mark)
        reloading = [t for t in notify.times("RELOADING=1") if t >= t_hup]
        ready_again = [t for t in notify.times("READY=1") if t >= t_hup]
        assert reloading and ready_again and reloading[0] <= ready_again[0]
        # a bad file: refused with its error, the daemon goes on with the running set
        (tmp_path / "config.yaml").write_text("tracking: {detect_every: 0}\n")
        mark = len(d.log())
        t_bad = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("reload failed, keeping the running configuration", timeout=30, after=mark)
        assert "tracking.detect_every: expected an integer in [1, 100], got 0" in d.log()[mark:]
        time.sleep(2)
        assert [t for t in notify.times("WATCHDOG=1") if t > t_bad + 0.5], "frames stopped"
        assert any("STATUS=reload failed" in m for t, m in notify.messages if t >= t_bad)
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
        notify.close()
    assert "Traceback" not in d.log()


def test_camera_missing_at_start(tmp_path):
    """A camera that is not there: READY after --camera-wait with the camera shown down, no
    watchdog ping (nothing flows), retries in the log, a clean stop."""
    cfg = write_config(
        tmp_path / "config.yaml",
        cameras=[{"name": "usb", "source": "/dev/video9", "reconnect_max": 0.5}],
        paths={"gallery": str(tmp_path / "none.edgal"), "state_dir": str(tmp_path / "state")},
        mqtt={"enabled": False}, logging={"target": "stderr"})
    notify = NotifyListener(tmp_path / "notify.sock")
    d = DaemonProcess(cfg, tmp_path, notify=notify.path, watchdog_usec=1_000_000,
                      extra_args=["--camera-wait", "1"])
    try:
        notify.wait_for("READY=1", timeout=120)
        time.sleep(2)
        assert not notify.times("WATCHDOG=1")
        status = [m for _, m in notify.messages if "READY=1" in m][0]
        assert "STATUS=usb down" in status
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
        notify.close()
    log = d.log()
    assert "<4>edged.capture: camera usb: cannot open v4l2: /dev/video9: no such device" in log
    assert "<4>edged.daemon: camera usb: no frame after 1 s; starting anyway" in log


def test_startup_failure_is_clear(tmp_path):
    def run_to_exit(**sections) -> DaemonProcess:
        d = DaemonProcess(write_config(tmp_path / "config.yaml", **sections), tmp_path)
        try:
            d.proc.wait(60)
        finally:
            d.kill()
        return d

    d = run_to_exit(cameras=[{"name": "c", "source": str(tmp_path / "missing.mp4")}],
                    mqtt={"enabled": False}, logging={"target": "stderr"})
    assert d.proc.returncode == 78  # a configuration error (EX_CONFIG): not restarted
    assert (f"cameras[0].source: video file '{tmp_path / 'missing.mp4'}' does not exist"
            in d.log())
    d = run_to_exit(cameras=[{"name": "c", "source": "/dev/video9"}],
                    paths={"models_dir": str(tmp_path / "no-models"),
                           "state_dir": str(tmp_path / "state")},
                    mqtt={"enabled": False}, logging={"target": "stderr"})
    assert d.proc.returncode == 1
    assert "edged run: models: " in d.log() and "is missing; run 'edged models install'" in d.log()


def test_detection_workers_keep_capture_order(shared_dir, tmp_path):
    """With several detection threads finishing out of order, frames are still tracked in
    capture order, each exactly once, and the service set is read once per frame."""
    import random
    import threading

    from edged import config as configmod
    from edged.daemon.service import Daemon
    from edged.daemon.sdnotify import Notifier

    cfg = configmod.build(configmod.Config, {
        "cameras": [{"name": "c", "source": str(shared_dir / CLIP), "realtime": False}],
        "pipeline": {"workers": 3},
        "paths": {"state_dir": str(tmp_path / "state")},
        "mqtt": {"enabled": False}, "logging": {"target": "stderr"}})
    d = fake_services(Daemon(cfg, notifier=Notifier(address=""), exit_when_done=True),
                      delay=lambda: random.uniform(0, 0.004))  # workers overtake each other
    seen, threads = [], set()
    orig = d.recognizer.process

    def process(frame, faces, svc):
        seen.append(frame.index)
        threads.add(threading.current_thread().name)
        return orig(frame, faces, svc)

    d.recognizer.process = process
    d.start(camera_wait=30)
    assert d.run() == 0
    assert seen == list(range(275))
    assert threads == {"track"}
    assert d.counters.frames_done_total == 275


def test_unusable_mqtt_password_file_is_a_clear_startup_error(tmp_path):
    cfg = write_config(
        tmp_path / "config.yaml",
        cameras=[{"name": "c", "source": "/dev/video9"}],
        paths={"state_dir": str(tmp_path / "state")},
        mqtt={"username": "u", "password_file": str(tmp_path / "nope")},
        logging={"target": "stderr"})
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.proc.wait(60)
    finally:
        d.kill()
    assert d.proc.returncode == 78  # a setting that can never work (EX_CONFIG)
    assert f"edged run: mqtt.password_file: cannot read '{tmp_path / 'nope'}'" in d.log()
    assert "Traceback" not in d.log()
