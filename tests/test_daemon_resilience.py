"""The daemon under awkward conditions: reloads that skip a camera or change the worker count,
a track thread slower than the camera, a stop request during the camera wait, a state
directory that cannot be written.  Detection is replaced by a stand-in where the models are not
the point (the frames are real: the Hamilton clip through OpenCV)."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import yaml

from conftest import wait_for
from edged import config as configmod
from edged.daemon.reload import reload_with_pings
from edged.daemon.service import Daemon, StartupError
from edged_daemon_helpers import fake_services
from edged.daemon.sdnotify import Notifier

CLIP = "videos/facerec_short_hamilton_clip.mp4"


def fake_daemon(cfg, config_path=None) -> Daemon:
    return fake_services(Daemon(cfg, config_path=config_path, notifier=Notifier(address="")))


def write(path, doc) -> None:
    path.write_text(yaml.safe_dump(doc))


def load(path):
    cfg = configmod.load(path)
    configmod.resolve_paths(cfg)
    return cfg


def base_doc(shared_dir, tmp_path, **over) -> dict:
    doc = {"cameras": [{"name": "cam", "source": str(shared_dir / CLIP), "loop": True}],
           "paths": {"state_dir": str(tmp_path / "state"), "gallery": str(tmp_path / "g.edgal")},
           "drops": {"enabled": False}, "mqtt": {"enabled": False},
           "logging": {"target": "stderr"}}
    doc.update(over)
    return doc


def test_reload_after_a_camera_was_skipped_by_its_check(shared_dir, tmp_path, caplog):
    """A camera added by a reload that fails its check is skipped; the next reload (fixed, or
    removed again) must neither fail nor stop the daemon."""
    path = tmp_path / "config.yaml"
    doc = base_doc(shared_dir, tmp_path)
    write(path, doc)
    d = fake_daemon(load(path), config_path=path)
    d.start(camera_wait=30)
    try:
        doc["cameras"].append({"name": "cam2", "source": "typo"})
        write(path, doc)
        with caplog.at_level(logging.ERROR, logger="edged.daemon"):
            assert d.reload()
        assert "reload: camera cam2: video file" in caplog.text
        assert sorted(d.cameras) == ["cam"]
        doc["cameras"][1]["source"] = str(shared_dir / CLIP)  # the typo fixed
        write(path, doc)
        assert d.reload() and sorted(d.cameras) == ["cam", "cam2"]
        assert wait_for(lambda: d.cameras["cam2"].first_frame.is_set(), 30)
        doc["cameras"] = doc["cameras"][:1]
        doc["cameras"].append({"name": "cam3", "source": "typo"})
        write(path, doc)
        assert d.reload() and sorted(d.cameras) == ["cam"]  # cam2 gone, cam3 skipped
        doc["cameras"] = doc["cameras"][:1]
        write(path, doc)
        assert d.reload() and sorted(d.cameras) == ["cam"] and sorted(d.recognizer.trackers) == ["cam"]
    finally:
        d.stop()


def test_reload_keeps_the_number_of_detection_workers(shared_dir, tmp_path, caplog):
    """The detection threads are started once, each with its own detector: a reload that
    changes pipeline.workers keeps the running count until the next restart, and says so."""
    path = tmp_path / "config.yaml"
    doc = base_doc(shared_dir, tmp_path, pipeline={"workers": 2})
    write(path, doc)
    d = fake_daemon(load(path), config_path=path)
    d.start(camera_wait=30)
    try:
        doc["pipeline"] = {"workers": 1}
        write(path, doc)
        with caplog.at_level(logging.WARNING, logger="edged.daemon"):
            assert d.reload()
        assert "pipeline.workers changed from 2 to 1; it takes effect at the next restart" \
            in caplog.text
        assert len(d.service.pipelines) == 2 and d.cfg.pipeline.workers == 2
        assert sorted(t.name for t in d._threads if t.name.startswith("detect-")) == \
            ["detect-0", "detect-1"]
    finally:
        d.stop()


def test_a_slow_track_thread_makes_the_newest_frame_win(shared_dir, tmp_path):
    """Tracking slower than the camera: frames wait in the hub, where newer ones replace them
    (counted as dropped), not in an ever longer line between detection and tracking; a stop
    then takes well under its timeout."""
    cfg = load_doc(tmp_path, base_doc(shared_dir, tmp_path, pipeline={"workers": 2}))
    d = fake_daemon(cfg)
    orig = d.recognizer.process

    def slow(frame, faces, svc):
        time.sleep(0.08)  # slower than the clip's 25-30 fps
        return orig(frame, faces, svc)

    d.recognizer.process = slow
    d.start(camera_wait=30)
    most = 0
    try:
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            with d.flow.order:
                most = max(most, d.flow.in_flight)
            time.sleep(0.01)
        assert d.hub.dropped.get("cam", 0) > 10
    finally:
        t0 = time.monotonic()
        d.stop()
        took = time.monotonic() - t0
    assert most <= d.flow.max_in_flight() == 4
    assert took < 3.0
    assert not [t for t in threading.enumerate() if t.name == "track" and t.is_alive()]


def test_a_stop_during_the_camera_wait_ends_it_at_once(tmp_path):
    """SIGTERM while start() waits for a camera that never comes: start() returns within a
    fraction of a second, without READY, instead of waiting out --camera-wait."""
    cfg = load_doc(tmp_path, {"cameras": [{"name": "usb", "source": "/dev/video9",
                                           "reconnect_max": 0.5}],
                              "paths": {"state_dir": str(tmp_path / "state"),
                                        "gallery": str(tmp_path / "g.edgal")},
                              "drops": {"enabled": False}, "mqtt": {"enabled": False},
                              "logging": {"target": "stderr"}})
    d = fake_daemon(cfg)
    threading.Timer(0.5, d.request_stop).start()
    t0 = time.monotonic()
    try:
        d.start(camera_wait=30)
        took = time.monotonic() - t0
        assert took < 3.0 and not d.ready
    finally:
        assert d.stop() == 0


def test_a_state_directory_that_cannot_be_written_is_a_startup_error(tmp_path):
    cfg = load_doc(tmp_path, {"cameras": [{"name": "usb", "source": "/dev/video9"}],
                              "paths": {"state_dir": "/proc/self"},
                              "mqtt": {"enabled": False}, "logging": {"target": "stderr"}})
    d = fake_daemon(cfg)
    with pytest.raises(StartupError, match=r"paths.state_dir: cannot write in /proc/self: "):
        d.start(camera_wait=0)
    d.stop()


def load_doc(tmp_path, doc):
    path = tmp_path / "config.yaml"
    write(path, doc)
    return load(path)


def test_an_events_file_that_cannot_be_written_does_not_end_the_events_thread(tmp_path,
                                                                              caplog):
    """--events-out on a full disk (here: a directory in its place): an error in the journal,
    once a minute, and the events keep flowing to MQTT and the hooks."""
    from edged.types import Event

    cfg = load_doc(tmp_path, {"cameras": [{"name": "usb", "source": "/dev/video9"}],
                              "paths": {"state_dir": str(tmp_path / "state")},
                              "mqtt": {"enabled": False}, "logging": {"target": "stderr"}})
    d = Daemon(cfg, notifier=Notifier(address=""), events_out=str(tmp_path))
    ev = Event(id="e1", type="unknown", camera="usb", track_id=1, frame_time=time.time())
    with caplog.at_level(logging.ERROR, logger="edged.daemon"):
        d.events.write(ev, 0.1, 7)
        d.events.write(ev, 0.1, 8)
    lines = [r for r in caplog.records if "--events-out" in r.getMessage()]
    assert len(lines) == 1 and f"--events-out {tmp_path}: cannot write event e1" in \
        lines[0].getMessage()


def test_the_watchdog_is_fed_during_a_slow_reload(shared_dir, tmp_path):
    """A reload that takes longer than the watchdog interval (models built for a slow
    accelerator, a drop's probation to wait for) while frames keep flowing: the pings go on,
    through a real NOTIFY_SOCKET, and stop with the reload."""
    from edged_daemon_helpers import NotifyListener

    listener = NotifyListener(tmp_path / "notify.sock")
    cfg = load_doc(tmp_path, base_doc(shared_dir, tmp_path))
    d = fake_services(Daemon(cfg, notifier=Notifier(address=listener.path)))
    d.start(camera_wait=30)
    try:
        d.reload = lambda: time.sleep(1.5) or True
        before = len(listener.times("WATCHDOG=1"))
        assert reload_with_pings(d, 0.2) is True
        during = len(listener.times("WATCHDOG=1")) - before
        assert during >= 4, listener.messages[-10:]
        time.sleep(0.5)
        assert len(listener.times("WATCHDOG=1")) - before == during  # (no pinger left)
        assert not [t for t in threading.enumerate() if t.name == "reload-watchdog"]
    finally:
        d.stop()
        listener.close()


def test_a_failing_embedder_or_gallery_loses_no_event_of_the_frame(tmp_path, caplog):
    """The tracker updates its tracks before the faces are embedded and matched: when that
    part fails (here a zero embedding, then a gallery that raises), the frame's events
    (face_appeared, track_ended) still go out, the failure is counted against the set, and the
    frame does not count as progress for the watchdog."""
    import numpy as np

    from edged.daemon.stats import RollingStats
    from edged.ota.modelset import ServiceSet
    from edged.daemon.track import Tracker
    from edged.types import Face, Frame, Quality

    cfg = load_doc(tmp_path, {"cameras": [{"name": "c", "source": "/dev/video9"}],
                              "paths": {"state_dir": str(tmp_path / "state")},
                              "mqtt": {"enabled": False}, "logging": {"target": "stderr"}})
    d = Daemon(cfg, notifier=Notifier(address=""))
    d.recognizer.trackers["c"] = Tracker("c", cfg.tracking, match_threshold=cfg.match.threshold)
    d.recognizer.reconnects_seen["c"] = 0
    d.counters.fps_done["c"] = RollingStats()

    class Pipe:
        zero = False

        def embed_faces(self, faces, only_passing=True, image=None):
            for f in faces:
                f.embedding = np.zeros(192, np.float32) if self.zero else \
                    np.full(192, 192 ** -0.5, np.float32)
            return faces

    class Broken:
        def match(self, q):
            raise RuntimeError("the gallery broke")

    def face(x):
        box = np.array([x, 10, x + 40, 50], np.float32)
        return Face(box=box, score=0.99, landmarks=np.zeros((5, 2), np.float32),
                    quality=Quality(size_px=40.0, sharpness=200.0, frontal=0.9, score=0.9,
                                    passed=True))

    pipe = Pipe()
    svc = ServiceSet(pipelines=[pipe], gallery=Broken(), versions={"embedder": "x"},
                     accelerators={})
    image = np.full((90, 160, 3), 120, np.uint8)
    types = []
    with caplog.at_level(logging.ERROR, logger="edged.daemon"):
        for i in range(3):
            evs = d.recognizer.process(Frame("c", i, 1000 + i / 25, image, monotonic=10 + i / 25),
                            [face(10)], svc)
            types += [e.type for e in evs]
        pipe.zero = True
        for i in range(3, 4 + cfg.tracking.max_missed):
            evs = d.recognizer.process(Frame("c", i, 1000 + i / 25, image, monotonic=10 + i / 25),
                            [face(100)], svc)
            types += [e.type for e in evs]
    assert types.count("face_appeared") == 2 and types.count("track_ended") == 1, types
    assert svc.failures >= 3 and "the gallery broke" in caplog.text
    assert "non-finite or zero embeddings" in caplog.text
    assert d.counters.progress < d.counters.frames_done_total


def _status_file(tmp_path) -> dict:
    from edged.commands.status import read_status

    try:
        return read_status(tmp_path / "state" / "status.json")
    except FileNotFoundError:
        return {}


def _edged_status(state_dir):
    import subprocess

    from edged_daemon_helpers import EDGED

    return subprocess.run([EDGED, "status", "--state-dir", str(state_dir)], capture_output=True,
                          text=True, timeout=60)


def test_a_clean_stop_says_stopped_everywhere(shared_dir, broker, tmp_path, caplog,
                                              monkeypatch):
    """After a clean stop the retained status and status.json say stopped (no camera
    connected) and ``edged status`` says the daemon is not running, with no fps of its last
    run; the state directory it created is 0750, and running as root is said once."""
    import json

    from edged.daemon import service as daemonmod
    from edged_daemon_helpers import Subscriber

    monkeypatch.setattr(daemonmod._warn_if_root, "said", False, raising=False)  # (once a process)
    doc = base_doc(shared_dir, tmp_path, mqtt={"host": "127.0.0.1", "port": broker.port,
                                               "reconnect_min_s": 0.2},
                   device={"name": "stopper"})
    d = fake_daemon(load_doc(tmp_path, doc))
    with caplog.at_level(logging.WARNING, logger="edged.daemon"):
        d.start(camera_wait=30)
    runner = threading.Thread(target=d.run, daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: _status_file(tmp_path).get("cameras", {}).get("cam", {}).get("fps"), 30)
        assert _status_file(tmp_path)["state"] == "healthy"
        r = _edged_status(tmp_path / "state")
        assert r.returncode == 0 and "running" in r.stdout and "health     healthy" in r.stdout
    finally:
        d.request_stop()
        runner.join(30)
    st = _status_file(tmp_path)
    assert st["stopped"] is True and st["state"] == "stopped", st
    assert st["cameras"]["cam"]["connected"] is False and "fps" not in st["cameras"]["cam"]
    r = _edged_status(tmp_path / "state")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not running (stopped at" in r.stdout and "fps" not in r.stdout, r.stdout
    assert "camera cam: not running" in r.stdout and "health     stopped" in r.stdout
    sub = Subscriber(broker.port, "edged/stopper/status")
    try:
        assert wait_for(lambda: sub.messages, 10)
        retained = json.loads(sub.messages[-1][1])
    finally:
        sub.close()
    assert retained["state"] == "stopped" and retained["stopped"] is True, retained
    assert retained["cameras"]["cam"]["connected"] is False and retained["versions"]
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o750
    root = [r for r in caplog.records if "running as root" in r.getMessage()]
    assert len(root) == (1 if os.geteuid() == 0 else 0)


def test_a_gallery_refused_at_start_is_in_the_status_and_counted(shared_dir, models_dir,
                                                                 tmp_path):
    """A file at the gallery path that is not a gallery: the start goes on with no gallery,
    and the refusal is what the status says (last refused drop, drops.rejected), not only a
    log line."""
    doc = base_doc(shared_dir, tmp_path)
    (tmp_path / "g.edgal").write_bytes(b"this is not a gallery at all\n" * 10)
    d = Daemon(load_doc(tmp_path, doc), models_dir=str(models_dir),
               notifier=Notifier(address=""))
    try:
        d.start(camera_wait=30)
        st = d.status.document()
        assert st["drops"]["rejected"] == 1 and st["drops"]["handled"] == 1, st["drops"]
        assert st["last_rejected_drop"]["file"] == str(tmp_path / "g.edgal")
        assert st["last_rejected_drop"]["why"]
        assert st["versions"]["gallery"] is None
    finally:
        d.stop()
    st = _status_file(tmp_path)
    assert st["drops"]["rejected"] == 1 and st["last_rejected_drop"]["why"]
