"""Capture: the newest frame wins, pacing, fps limit, loop, and clear errors with reconnects."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from edged.daemon.capture import (Camera, CameraSettings, FrameHub, gstreamer_available, guess_kind,
                           preflight)
from edged.types import Frame
import publicdata
from conftest import wait_for

# the core tier's public clip (conftest.public_clip): 100 frames, 640x360, 10 fps
CLIP_FRAMES, CLIP_FPS = publicdata.clip_frames(), 10


def frame(cam="c", i=0):
    return Frame(camera=cam, index=i, timestamp=time.time(), image=np.zeros((2, 2, 3), np.uint8),
                 monotonic=time.monotonic())




@pytest.mark.parametrize("source,kind", [
    ("/dev/video0", "v4l2"), ("2", "v4l2"), ("/dev/v4l/by-id/usb-cam-video-index0", "v4l2"),
    ("rtsp://u:p@10.0.0.2/s", "url"), ("http://cam/mjpg", "url"), ("tcp://127.0.0.1:5000", "url"),
    ("libcamerasrc ! video/x-raw,width=640 ! videoconvert ! appsink", "gstreamer"),
    ("/srv/clips/door.mp4", "file"),
])
def test_guess_kind(source, kind):
    assert guess_kind(source) == kind



@pytest.mark.parametrize("source,kind,missing", [
    ("/srv/none/door.mp4", "auto", True),  # an absolute path
    ("clips/door", "auto", True),  # a relative path (from the working directory)
    ("door.MKV", "auto", True),  # a video extension
    ("door", "file", True),  # kind file says so
    ("door", "auto", False),  # a bare word is not clearly a file (check-config warns)
    ("/dev/video7", "auto", False), ("/dev/v4l/by-id/usb-x-video-index0", "auto", False),
    ("/dev/video7", "file", False), ("3", "auto", False),
    ("rtsp://cam.lan/live.mp4", "auto", False), ("http://cam/video.mjpg", "auto", False),
    ("filesrc location=/srv/none/door.mp4 ! decodebin ! videoconvert ! appsink", "auto", False),
])
def test_a_video_file_that_does_not_exist_is_a_config_error(source, kind, missing):
    errs = CameraSettings(name="c", source=source, kind=kind).config_errors()
    found = [m for key, m in errs if key == "source" and "does not exist" in m]
    assert bool(found) == missing, errs
    if missing:
        assert found[0].startswith(f"video file {source!r} does not exist")
        assert ("relative to" in found[0]) == (not source.startswith("/"))


def test_an_existing_video_file_passes_the_check(tmp_path):
    clip = tmp_path / "door.mp4"
    clip.write_bytes(b"")
    assert CameraSettings(name="c", source=str(clip)).config_errors() == []


def test_v4l2_settings_on_other_sources_are_warnings():
    assert CameraSettings(source="/dev/video0", width=640, height=480,
                          fourcc="MJPG").config_warnings() == []
    assert CameraSettings(source="rtsp://h/s").config_warnings() == []
    assert CameraSettings(source="rtsp://h/s", height=480, fourcc="YUYV").config_warnings() == [
        ("height", "applies to V4L2 devices only; this url source ignores it"),
        ("fourcc", "applies to V4L2 devices only; this url source ignores it")]
    assert [k for k, _ in CameraSettings(source="videotestsrc ! appsink",
                                         width=640).config_warnings()] == ["width"]

def test_hub_newest_frame_wins_and_counts_drops():
    hub = FrameHub()
    for i in range(5):
        hub.put(frame("a", i))
    got = hub.take(timeout=0)
    assert got.index == 4
    assert hub.dropped["a"] == 4
    assert hub.take(timeout=0.05) is None


def test_hub_cameras_take_turns():
    hub = FrameHub()
    hub.put(frame("a", 0))
    hub.put(frame("b", 0))
    hub.put(frame("a", 1))  # overwrites a's older frame; b's frame is now the oldest
    assert hub.take(0).camera == "b"
    assert hub.take(0).camera == "a"


def test_hub_wait_mode_blocks_until_taken():
    hub = FrameHub()
    hub.put(frame("a", 0), wait=True)
    done = threading.Event()
    threading.Thread(target=lambda: (hub.put(frame("a", 1), wait=True), done.set()),
                     daemon=True).start()
    assert not done.wait(0.3)  # slot full: the reader waits, nothing is dropped
    assert hub.take(0).index == 0
    assert done.wait(2)
    assert hub.take(0).index == 1
    assert hub.dropped.get("a", 0) == 0


def collect(hub, n_max, timeout, delay=0.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n_max and time.monotonic() < deadline:
        f = hub.take(timeout=0.2)
        if f is not None:
            out.append(f)
            if delay:
                time.sleep(delay)
    return out


def test_file_as_fast_as_the_pipeline_takes_every_frame(public_clip):
    hub = FrameHub()
    cam = Camera(CameraSettings(name="f", source=str(public_clip), realtime=False), hub).start()
    frames = collect(hub, CLIP_FRAMES, 60, delay=0.001)
    assert cam.first_frame.is_set()
    assert [f.index for f in frames] == list(range(CLIP_FRAMES))  # none skipped, in order
    assert frames[0].image.shape == (360, 640, 3) and frames[0].image.dtype == np.uint8
    assert wait_for(lambda: cam.finished)
    assert cam.resolution == [640, 360]
    cam.stop()
    assert not cam.alive


def test_file_in_real_time_with_a_slow_consumer_skips_frames(public_clip):
    hub = FrameHub()
    cam = Camera(CameraSettings(name="rt", source=str(public_clip), realtime=True), hub).start()
    assert cam.first_frame.wait(10)
    t0 = time.monotonic()
    frames = collect(hub, 1000, 2.5, delay=0.5)  # a pipeline 5x slower than the camera
    elapsed = time.monotonic() - t0
    cam.stop()
    idx = [f.index for f in frames]
    assert idx == sorted(idx)
    assert max(np.diff(idx)) >= 3, idx  # the newest frame won; stale ones were dropped
    assert hub.dropped["rt"] > 0
    # paced at the file's 10 fps, not as fast as it decodes
    assert cam.frames_read < CLIP_FPS * elapsed + 15, (cam.frames_read, elapsed)


def test_fps_limit(public_clip):
    hub = FrameHub()
    cam = Camera(CameraSettings(name="lim", source=str(public_clip), fps_limit=5), hub).start()
    assert cam.first_frame.wait(10)
    t0 = time.monotonic()
    frames = collect(hub, 1000, 2.0)
    elapsed = time.monotonic() - t0
    cam.stop()
    assert 5 * elapsed - 3 <= len(frames) <= 5 * elapsed + 2, (len(frames), elapsed)


def test_loop(public_clip):
    hub = FrameHub()
    cam = Camera(CameraSettings(name="loop", source=str(public_clip), realtime=False,
                                loop=True), hub).start()
    frames = collect(hub, 400, 60)
    cam.stop()
    assert len(frames) == 400 and not cam.finished
    assert cam.frames_read >= 400


def test_missing_v4l2_device_clear_error_and_retries(caplog):
    caplog.set_level(logging.INFO, logger="edged.capture")
    hub = FrameHub()
    cam = Camera(CameraSettings(name="usb", source="/dev/video9", reconnect_min=0.05,
                                reconnect_max=0.2), hub).start()
    assert wait_for(lambda: cam.open_attempts >= 4, timeout=10)
    cam.stop()
    assert not cam.connected
    assert cam.last_error == "/dev/video9: no such device (is the camera plugged in? ls /dev/video*)"
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("camera usb: cannot open v4l2: /dev/video9: no such device") and
               "retrying in" in m for m in msgs), msgs
    assert hub.take(0) is None


def test_unreachable_stream_retries_with_backoff(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    hub = FrameHub()
    cam = Camera(CameraSettings(name="net", source=f"tcp://127.0.0.1:{port}", stall_timeout=1,
                                reconnect_min=0.1, reconnect_max=0.4), hub).start()
    assert wait_for(lambda: cam.open_attempts >= 3, timeout=20)
    cam.stop()
    assert cam.last_error == f"tcp://127.0.0.1:{port}: cannot open the stream"
    assert not cam.connected


def test_not_a_video_file(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    hub = FrameHub()
    cam = Camera(CameraSettings(name="bad", source=str(bad), reconnect_min=0.05,
                                reconnect_max=0.1), hub).start()
    assert wait_for(lambda: cam.open_attempts >= 2)
    cam.stop()
    assert cam.last_error == f"{bad}: not a video file OpenCV can decode"


def test_preflight():
    assert preflight(CameraSettings(name="x", source="/nope/clip.mp4")) == \
        "camera x: video file /nope/clip.mp4 does not exist"
    assert preflight(CameraSettings(name="x", source="/dev/video9")) is None  # may be plugged later
    gst = CameraSettings(name="csi", kind="gstreamer",
                         source="libcamerasrc ! video/x-raw,width=640,height=480 ! appsink")
    if gstreamer_available():
        assert preflight(gst) is None
    else:
        msg = preflight(gst)
        assert "was built without GStreamer" in msg and "cv2.getBuildInformation()" in msg


def test_password_is_masked_in_status():
    cam = Camera(CameraSettings(name="ip", source="rtsp://admin:hunter2@10.1.2.3/live"), FrameHub())
    assert cam.status()["source"] == "rtsp://admin:***@10.1.2.3/live"


class _HungDevice:
    """Stands in for a device whose driver blocks in read() (no such device on this machine):
    three frames, then a read that blocks until ``gate`` is set."""

    def __init__(self, gate: threading.Event, frames: int = 3):
        self.gate, self.frames, self.i = gate, frames, 0

    def get(self, prop):
        return 0.0

    def set(self, *args):
        return True

    def read(self):
        self.i += 1
        if self.i > self.frames:
            self.gate.wait()
        time.sleep(0.01)
        return True, np.zeros((12, 16, 3), np.uint8)

    def release(self):
        pass



def test_a_reader_stuck_in_read_is_replaced_and_counted():
    """check() abandons a reader blocked longer than the stall limit, counts the outage (the
    daemon ends the camera's tracks on a reconnect), and the stale reader's late return does
    not hide the new reader's own stall from the next check()."""
    first, second = threading.Event(), threading.Event()
    devices = iter([_HungDevice(first), _HungDevice(second)])
    cam = Camera(CameraSettings(name="c", source="rtsp://127.0.0.1:9/x", stall_timeout=0.5),
                 FrameHub())
    cam._open = lambda: next(devices)
    try:
        cam.start()
        deadline = time.monotonic() + 10
        while cam.frames_read < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.7)  # the first reader is now blocked longer than max(2 x 0.5, 0.5 + 2) s
        cam.check()
        assert (cam.reconnects, cam.outages) == (1, 1)
        gen = cam._generation
        time.sleep(0.5)  # the second reader reads its frames, then blocks too
        first.set()  # the abandoned reader's read returns late
        time.sleep(0.3)
        assert cam._read_started is not None and cam._read_started[0] == gen
        time.sleep(2.6)
        cam.check()
        assert cam._generation == gen + 1 and cam.reconnects == 2
    finally:
        first.set()
        second.set()
        cam.stop()


def test_a_capture_thread_that_fails_is_started_again(public_clip, caplog, monkeypatch):
    """An unexpected error in the capture thread (a bug, an OpenCV surprise) is logged and the
    daemon's periodic check() starts a new thread after reconnect_max: the camera does not
    stay dead."""
    hub = FrameHub()
    cam = Camera(CameraSettings(name="bug", source=str(public_clip), realtime=False,
                                loop=True, reconnect_min=0.05, reconnect_max=0.3), hub)
    real = Camera._read_loop
    calls = []

    def read_loop(self, cap, gen):
        calls.append(gen)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self, cap, gen)

    monkeypatch.setattr(Camera, "_read_loop", read_loop)
    with caplog.at_level(logging.ERROR, logger="edged.capture"):
        cam.start()
        assert wait_for(lambda: not cam.alive, 10)
    try:
        assert "camera bug: capture thread failed; restarting it in 0.3 s" in caplog.text
        assert cam.last_error == "capture thread failed" and cam.frames_delivered == 0
        cam.check()  # too early: nothing yet
        assert not cam.alive
        time.sleep(0.35)
        cam.check()
        assert wait_for(lambda: hub.take(timeout=0.1) is not None, 10)
        assert cam.alive and cam.reconnects == 1 and len(calls) == 2
    finally:
        cam.stop()


def test_a_failure_of_an_abandoned_reader_does_not_restart_the_camera(monkeypatch):
    """check() replaced a reader stuck in an open; when that old reader fails later, the
    camera (whose new reader read the file to its end meanwhile) is not started again."""
    class Cap:  # a 3-frame source
        def __init__(self):
            self.n = 3

        def get(self, prop):
            return 0.0

        def read(self):
            if self.n <= 0:
                return False, None
            self.n -= 1
            return True, np.zeros((20, 20, 3), np.uint8)

        def release(self):
            pass

    gate, opens = threading.Event(), []
    hub = FrameHub()
    cam = Camera(CameraSettings(name="f", source="/tmp/x.mp4", kind="file", realtime=False,
                                stall_timeout=0.1, reconnect_min=0.1, reconnect_max=0.3), hub)

    def fake_open():
        opens.append(1)
        if len(opens) == 1:  # the first reader hangs in its open, then fails oddly
            gate.wait(10)
            raise RuntimeError("late failure of the abandoned reader")
        return Cap()

    cam._open = fake_open
    stop = threading.Event()
    threading.Thread(target=lambda: [hub.take(0.05) for _ in iter(stop.is_set, True)],
                     daemon=True).start()
    try:
        cam.start()
        assert wait_for(lambda: cam._read_started is not None, 5)
        cam._read_started = (cam._read_started[0], time.monotonic() - 60)  # stuck long enough
        cam.check()  # a new reader reads the whole file
        assert wait_for(lambda: cam.finished, 5) and cam.frames_delivered == 3
        gate.set()  # the abandoned one fails now
        time.sleep(0.5)
        cam.check()
        time.sleep(0.3)
        assert len(opens) == 2 and cam.frames_delivered == 3 and cam._failed_at is None
    finally:
        stop.set()
        gate.set()
        cam.stop()


def test_gray_frames_are_handed_on_as_bgr():
    """A GRAY8 source (a GStreamer or V4L2 mono camera): the pipeline after the hub (the scene
    cut detector of the tracker converts to HSV) wants 3-channel BGR, as the detector does."""
    class Cap:
        n = 2

        def get(self, prop):
            return 0.0

        def read(self):
            if self.n == 0:
                return False, None
            self.n -= 1
            return True, np.full((20, 30), 77, np.uint8)

        def release(self):
            pass

    hub = FrameHub()
    cam = Camera(CameraSettings(name="mono", source="/tmp/x.mp4", kind="file", realtime=False),
                 hub)
    cam._open = Cap
    cam.start()
    try:
        fr = hub.take(timeout=5)
        assert fr is not None and fr.image.shape == (20, 30, 3) and fr.image.dtype == np.uint8
        assert (fr.image == 77).all()
    finally:
        cam.stop()
