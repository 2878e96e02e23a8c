"""Helpers for the tests that run ``edged run`` as a real process (e2e, stream reconnect)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EDGED = str(Path(sys.executable).parent / "edged")


def build_gallery(enrol_dir: Path, out: Path) -> Path:
    """Enrol with the real CLI: ``edged gallery build DIR -o FILE``."""
    r = subprocess.run([EDGED, "gallery", "build", str(enrol_dir), "-o", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stdout + r.stderr
    return out


class NotifyListener:
    """A real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, text)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def times(self, line: str):
        return [t for t, m in self.messages if line in m.split("\n")]

    def first(self, prefix: str):
        for t, m in self.messages:
            for line in m.split("\n"):
                if line.startswith(prefix):
                    return t, line
        return None

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ts = self.times(line)
            if ts:
                return ts[0]
            time.sleep(0.05)
        raise AssertionError(f"no {line} on NOTIFY_SOCKET after {timeout}s; got "
                             f"{[m for _, m in self.messages]}")

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


class Subscriber:
    """A paho-mqtt 2 subscriber on the test broker."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.messages = []  # (topic, payload bytes)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscriber could not subscribe"

    def events(self, prefix: str):
        return [json.loads(p) for t, p in self.messages if t == f"{prefix}/events"]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class FakePipeline:
    """A detector stand-in for daemon tests where the models are not the point: no faces,
    after ``delay()`` seconds."""

    def __init__(self, delay=lambda: 0.0):
        self.delay = delay

    def detect(self, image, detect_width=None):
        time.sleep(self.delay())
        return []


class FakeGallery:
    """What the daemon asks of a gallery holder, with no gallery."""

    current = None

    def version(self):
        return None

    def keep_last_good(self):
        pass

    def stop(self):
        pass


def fake_services(daemon, delay=lambda: 0.0):
    """Make ``daemon`` build service sets of FakePipeline (one per worker) and FakeGallery, and
    skip the warm-up."""
    from edged.ota.modelset import ServiceSet

    daemon.sets.build = lambda cfg: ServiceSet(
        pipelines=[FakePipeline(delay) for _ in range(cfg.pipeline.workers)],
        gallery=FakeGallery(), versions={"embedder": "x"}, accelerators={})
    daemon.sets.warm_up = lambda svc, parts=None: None
    return daemon


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


class DaemonProcess:
    """``edged run`` as a child process, its stderr (the log) in a file."""

    def __init__(self, config: Path, workdir: Path, notify: str = None, watchdog_usec: int = None,
                 extra_args=()):
        self.log_path = workdir / "edged.log"
        self.events_path = workdir / "events.jsonl"
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        if notify:
            env["NOTIFY_SOCKET"] = notify
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([EDGED, "run", "--config", str(config), "--events-out",
                                      str(self.events_path), *extra_args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float, after: int = 0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log()[after:]:
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"edged exited ({self.proc.returncode}) before logging "
                                     f"{text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log after {timeout}s:\n{self.log()[-3000:]}")

    def events(self):
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    def last_frame(self) -> int:
        """The highest frame index of the events so far (``--events-out``'s ``debug``)."""
        return max([e["debug"]["frame_index"] or 0 for e in self.events()] + [0])

    def whole_pass_after(self, frame: int, n: int, timeout: float) -> int:
        """The first frame of the first whole pass of an ``n``-frame looped clip after
        ``frame``, once an event of the pass after it shows that pass is over."""
        start = (frame // n + 1) * n
        deadline = time.monotonic() + timeout
        while not any((e["debug"]["frame_index"] or 0) >= start + n for e in self.events()):
            if time.monotonic() >= deadline:
                raise AssertionError(f"no event past frame {start + n} after {timeout}s:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.5)
        return start

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM; return the seconds it took to exit."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - t0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def clip_frames(clip) -> int:
    """How many frames OpenCV reads from the video file ``clip``."""
    import cv2

    cap = cv2.VideoCapture(str(clip))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` (``mount -t tmpfs``) at ``path``, unmounted afterwards whatever
    happens; the test is skipped (with the reason) when it cannot be mounted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a full disk needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_up(path: Path) -> Path:
    """Write ``path`` (a file on a small file system) until the file system is full."""
    import errno

    block = b"\0" * 65536
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return path
                block = block[:len(block) // 16 or 1]
    finally:
        os.close(fd)


def run_in_process(doc: dict, models_dir) -> tuple:
    """A real Daemon in this process on the configuration mapping ``doc`` (its cameras video
    files), run until every source has ended: ``(its events, the daemon)``."""
    from edged import config as configmod
    from edged.daemon.service import Daemon
    from edged.daemon.sdnotify import Notifier

    cfg = configmod.build(configmod.Config, doc)
    d = Daemon(cfg, models_dir=str(models_dir), notifier=Notifier(address=""),
               exit_when_done=True)
    events = []
    d.events.hooks.append(lambda ev, lat: events.append(ev))
    d.start(camera_wait=30)
    assert d.run() == 0
    return events, d
