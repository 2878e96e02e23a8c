"""The figures the frame flow keeps while it runs, for the status, the stats topic and /metrics.

Each counter is written by one thread (the track thread or the events thread) and read by the
others without a lock: a reader may see a figure one frame old, never a torn one.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Dict, Optional

import numpy as np

from edged.publish.metrics import LATENCY_BUCKETS, STAGE_BUCKETS, STAGES, Histogram


class RollingStats:
    """Counts and timings over the last ``window`` seconds, for fps and latency figures."""

    def __init__(self, window: float = 10.0, keep: int = 5000,
                 histogram: Optional[Histogram] = None):
        self.window = window
        self.samples = deque(maxlen=keep)
        self.lock = threading.Lock()
        self.histogram = histogram  # every value, cumulated since start (edged.publish.metrics)

    def add(self, value: float = 0.0, t: Optional[float] = None) -> None:
        with self.lock:
            self.samples.append((t if t is not None else time.monotonic(), value))
        if self.histogram is not None:
            self.histogram.observe(value)

    def count(self, now: Optional[float] = None) -> int:
        """Samples in the last ``window`` seconds."""
        return len(self._recent(now or time.monotonic()))

    def _recent(self, now: float):
        with self.lock:
            return [v for t, v in self.samples if now - t <= self.window]

    def rate(self, now: Optional[float] = None) -> float:
        now = now or time.monotonic()
        with self.lock:
            ts = [t for t, _ in self.samples if now - t <= self.window]
        if len(ts) < 2:
            return 0.0
        span = max(now - ts[0], 1e-6)
        return len(ts) / span

    def summary(self, now: Optional[float] = None, scale: float = 1000.0) -> dict:
        vals = self._recent(now or time.monotonic())
        if not vals:
            return {"n": 0}
        a = np.asarray(vals) * scale
        return {"n": len(vals), "per_s": round(len(vals) / self.window, 2),
                "median": round(float(np.median(a)), 2),
                "p90": round(float(np.percentile(a, 90)), 2),
                "p99": round(float(np.percentile(a, 99)), 2),
                "max": round(float(a.max()), 2)}


class Counters:
    """What went through: frames, faces, events and their timings, since the start."""

    def __init__(self):
        self.fps_done: Dict[str, RollingStats] = {}  # camera -> frames tracked
        # per stage (capture: from the camera to a detection worker; publish: an event to the
        # publisher), and the whole frame
        self.stage = {k: RollingStats(histogram=Histogram(STAGE_BUCKETS)) for k in STAGES}
        self.stage["frame"] = RollingStats()
        # capture -> event handed to the publisher
        self.latency = RollingStats(histogram=Histogram(LATENCY_BUCKETS))
        # the last capture-to-event latencies (tools/bench_daemon.py); bounded: the daemon
        # runs for months
        self.latencies_all: "deque[float]" = deque(maxlen=100_000)
        self.frames_by_camera: Dict[str, int] = {}  # frames tracked (track thread)
        self.faces_detected: Dict[str, int] = {}  # (track thread)
        self.event_counts: Dict[tuple, int] = {}  # (camera, type) -> events (events thread)
        self.last_event_at: Dict[str, float] = {}  # camera -> epoch of its last event
        self.event_rates: Dict[str, RollingStats] = {}  # camera -> events of the last 10 min
        self.faces_embedded = 0
        self.frames_done_total = 0
        self.errors = 0
        self.progress = 0  # frames through the pipeline (the watchdog's measure)
        self.last_done_monotonic: Optional[float] = None
        self.first_frame_monotonic: Optional[float] = None  # capture time of the first frame
        self.first_done_monotonic: Optional[float] = None
        self.last_event = None  # edged.types.Event
        self.last_event_time: Optional[float] = None

    def frame_done(self, camera: str, faces, failed: bool) -> None:
        """One frame of ``camera`` through the track thread (``faces``: what was detected)."""
        now = time.monotonic()
        self.fps_done[camera].add(t=now)
        self.frames_done_total += 1
        self.frames_by_camera[camera] = self.frames_by_camera.get(camera, 0) + 1
        if faces:
            self.faces_detected[camera] = self.faces_detected.get(camera, 0) + len(faces)
        self.last_done_monotonic = now
        if self.first_done_monotonic is None:
            self.first_done_monotonic = now
        if not failed:  # (the watchdog's measure: a pipeline that fails every frame is stuck)
            self.progress += 1

    def event_done(self, ev) -> None:
        """The last event, and the per-camera counts the metrics and the status show."""
        self.last_event, self.last_event_time = ev, time.time()
        key = (ev.camera, ev.type)
        self.event_counts[key] = self.event_counts.get(key, 0) + 1
        self.last_event_at[ev.camera] = self.last_event_time
        self.event_rates.setdefault(ev.camera, RollingStats(window=600.0)).add()


class StatsReport:
    """The document of the ``stats`` topic (every ``mqtt.stats_interval_s``): per camera the
    frames read and tracked per second, the stages' timings, the latency, CPU and memory.

    ``daemon``: the service, read for ``cameras``, ``hub``, ``flow`` (the motion gates),
    ``cfg``, ``events`` and ``counters``."""

    def __init__(self, daemon):
        self.d = daemon
        self.started_mono = time.monotonic()
        self._read_marks: Dict[str, tuple] = {}
        self._cpu_mark: Optional[tuple] = None

    def document(self) -> dict:
        d, now = self.d, time.monotonic()
        c = d.counters
        return {
            "cameras": {name: {"fps_in": self._read_rate(name, now),
                               "fps": round(c.fps_done[name].rate(now), 2),
                               "frames": d.cameras[name].frames_read,
                               "dropped": d.hub.dropped.get(name, 0),
                               "connected": d.cameras[name].connected,
                               "reconnects": d.cameras[name].reconnects}
                        for name in d.cameras},
            "motion": {name: gate.status() for name, gate in list(d.flow.motion.items())
                       if name in d.cameras and d.cfg.motion.enabled},
            "stages_ms": {k: v.summary(now) for k, v in c.stage.items()},
            "latency_ms": c.latency.summary(now),
            "queue_depth": d.events.qsize(),
            "faces_embedded": c.faces_embedded,
            "errors": c.errors,
            "cpu_s": round(sum(os.times()[:2]), 2),
            "cpu_percent": self._cpu_percent(now),
            "rss_mb": rss_mb(),
        }

    def _read_rate(self, name: str, now: float) -> float:
        """Frames per second read from the camera since the previous call."""
        n = self.d.cameras[name].frames_read
        t0, n0 = self._read_marks.get(name, (self.started_mono, 0))
        self._read_marks[name] = (now, n)
        return round((n - n0) / max(now - t0, 1e-6), 2)

    def _cpu_percent(self, now: float) -> float:
        """CPU used by the process since the previous call, in % of one core."""
        cpu = sum(os.times()[:2])
        t0, c0 = self._cpu_mark or (self.started_mono, 0.0)
        self._cpu_mark = (now, cpu)
        return round(100.0 * (cpu - c0) / max(now - t0, 1e-6), 1)


def rss_mb() -> Optional[float]:
    """The process's resident memory in MiB (None where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
