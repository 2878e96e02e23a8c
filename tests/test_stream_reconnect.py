"""A live stream over loopback (ffmpeg serving MPEG-TS over TCP from a clip of real photos).

- The server is killed and restarted: edged logs the outage, keeps reconnecting with backoff,
  and goes on with the new stream; no crash.
- The server is frozen (SIGSTOP: the connection stays open, no data): the watchdog pings stop
  while no frame flows, and the stalled source is reopened.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from edged_daemon_helpers import DaemonProcess, NotifyListener, write_config

# the public clips of conftest (core tier): two visitors with a cut, and one talking head
# throughout (no cut: someone is always being tracked)
CLIP = "public_clip"
HEAD = "public_head_clip"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamServer:
    """ffmpeg re-encoding a real clip (in a loop, at its frame rate) to MPEG-TS on a TCP port."""

    def __init__(self, clip, port: int, log_path):
        self.cmd = [shutil.which("ffmpeg") or pytest.fail("ffmpeg is not installed"),
                    "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
                    "-i", str(clip), "-an", "-c:v", "mpeg2video", "-q:v", "5", "-g", "15",
                    "-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"]
        self.log = open(log_path, "ab")
        self.proc = None

    def start(self) -> "StreamServer":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log)
        return self

    def signal(self, sig) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def stream(request, tmp_path):
    servers = []

    def make(port, clip=CLIP):
        s = StreamServer(request.getfixturevalue(clip), port, tmp_path / "ffmpeg.log").start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.kill()


def config(tmp_path, port, stall_timeout, max_gap=10.0):
    return write_config(
        tmp_path / "config.yaml",
        device={"name": "live"},
        cameras=[{"name": "net", "source": f"tcp://127.0.0.1:{port}",
                  "stall_timeout": stall_timeout, "reconnect_min": 0.2, "reconnect_max": 1.0}],
        paths={"gallery": str(tmp_path / "no-gallery-yet.edgal"), "state_dir": str(tmp_path / "state")},
        tracking={"max_gap": max_gap},
        mqtt={"enabled": False},
        logging={"target": "stderr"},
    )


def open_tracks(events):
    ended = {e["track_id"] for e in events if e["type"] == "track_ended"}
    return {e["track_id"] for e in events if e["type"] == "face_appeared"} - ended


def pings_between(notify, t0, t1):
    return [t for t in notify.times("WATCHDOG=1") if t0 <= t <= t1]


def test_server_killed_and_restarted(stream, tmp_path):
    port = free_port()
    server = stream(port, HEAD)
    notify = NotifyListener(tmp_path / "notify.sock")
    d = DaemonProcess(config(tmp_path, port, stall_timeout=3, max_gap=3.0), tmp_path,
                      notify=notify.path, watchdog_usec=1_000_000)
    try:
        notify.wait_for("READY=1", timeout=120)
        d.wait_log("camera net: url connected, 512x512", timeout=30)
        time.sleep(2)
        deadline = time.monotonic() + 20
        while not open_tracks(d.events()) and time.monotonic() < deadline:
            time.sleep(0.1)  # kill the stream while someone is being tracked
        t_kill = time.monotonic()
        mark = len(d.log())  # before the kill: edged may log the loss at once
        server.kill()  # the stream goes away
        time.sleep(0.5)
        tracked = open_tracks(d.events())
        assert tracked, "no track was open when the stream went away"
        d.wait_log("camera net: source lost", timeout=15, after=mark)
        d.wait_log("camera net: cannot open url", timeout=15, after=mark)  # retrying, backoff
        # while the camera sends nothing, its tracks end after tracking.max_gap (3 s)
        d.wait_log("camera net: no frames for", timeout=15, after=mark)
        time.sleep(0.5)
        assert not tracked & open_tracks(d.events()), "tracks must end while no frame comes"
        assert d.proc.poll() is None, "edged died with its camera"
        assert not pings_between(notify, t_kill + 1.5, time.monotonic())  # nothing flows
        mark = len(d.log())
        t_back = time.monotonic()
        stream(port, HEAD)  # the stream is back on the same address
        d.wait_log("camera net: url connected, 512x512", timeout=30, after=mark)
        time.sleep(3)
        assert len(pings_between(notify, t_back, time.monotonic())) >= 2, "frames flow again"
        events_before_stop = d.events()
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
        notify.close()
    log = d.log()
    assert "Traceback" not in log
    assert log.count("camera net: url connected") == 2
    lost = [l for l in log.splitlines() if "camera net: source lost" in l]
    assert lost and lost[0].startswith("<4>edged.capture:"), lost  # a warning, journal-friendly
    # the stream's faces were tracked before and after the outage; the outage ended the tracks
    assert {e["type"] for e in events_before_stop} >= {"face_appeared", "track_ended"}


def test_stalled_source_stops_the_watchdog(stream, tmp_path):
    port = free_port()
    server = stream(port)
    notify = NotifyListener(tmp_path / "notify.sock")
    d = DaemonProcess(config(tmp_path, port, stall_timeout=4), tmp_path, notify=notify.path,
                      watchdog_usec=1_000_000)
    try:
        notify.wait_for("READY=1", timeout=120)
        d.wait_log("camera net: url connected", timeout=30)
        time.sleep(2)
        t_stall = time.monotonic()
        assert len(pings_between(notify, t_stall - 2, t_stall)) >= 2  # pings while frames flow
        server.signal(signal.SIGSTOP)  # frozen: the connection stays open, nothing arrives
        mark = len(d.log())
        d.wait_log("camera net: source lost (stalled: no frame for", timeout=20, after=mark)
        t_detected = time.monotonic()
        # a few frames may still be buffered; after that no ping until frames flow again.
        # (FFmpeg may hand out a frame it had buffered when its read time-out fires, at about
        # stall_timeout = 4 s after the stall: the window ends before that, and a second one
        # starts once the loss is known.)
        quiet = pings_between(notify, t_stall + 1.5, t_stall + 3.5)
        assert not quiet, [round(t - t_stall, 2) for t in quiet]
        time.sleep(3)
        quiet = pings_between(notify, t_detected + 1.0, time.monotonic())
        assert not quiet, [round(t - t_detected, 2) for t in quiet]
        assert d.proc.poll() is None
        server.kill()
        mark = len(d.log())
        t_back = time.monotonic()
        stream(port)
        d.wait_log("camera net: url connected", timeout=30, after=mark)
        time.sleep(2.5)
        assert len(pings_between(notify, t_back, time.monotonic())) >= 2
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
        notify.close()
    assert "stalled" in d.log()
