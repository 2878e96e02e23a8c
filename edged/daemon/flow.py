"""How frames move: the hub -> detection workers -> the track thread, in capture order.

Each camera's capture thread leaves its newest frame in the hub (edged.daemon.capture: a newer
frame replaces one not yet taken). ``detect-<i>`` threads take frames from it, at most
:meth:`FrameFlow.max_in_flight` past the hub at once, lease the set in service for the frame and
detect (the whole frame, the live tracks' boxes only, or not at all: motion gating and
``tracking.detect_every``). The ``track`` thread puts each camera's frames back in capture
order, tracks, embeds and matches the faces the tracker asks for, and hands the events to the
events thread (edged.daemon.events). A frame goes through one set from detection to its last
event: a set replaced meanwhile is closed only when its last leased frame is done.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict

from edged.daemon.stats import RollingStats
from edged.daemon.track import Refined
from edged.logs import fields
from edged.vision.motion import MotionGate

log = logging.getLogger("edged.daemon")

#: test hook: append one line per frame tracked ("camera index monotonic") to this file
FRAME_LOG_ENV = "EDGED_FRAME_LOG"

#: what :meth:`FrameFlow.what_to_detect` answers for a full detection (the P-Net pyramid)
FULL = "full"


class FrameFlow:
    """The detection workers and the ordered track thread, with the cameras' motion gates.

    ``daemon``: the service, read for ``cfg`` (a reload replaces it), ``hub``, ``cameras``,
    ``sets`` (the set in service), ``recognizer`` (what the track thread does with a frame),
    ``ota`` (a drop's probation watches each frame) and ``counters``."""

    def __init__(self, daemon, stop: threading.Event):
        self.d = daemon
        self.stop = stop
        self.motion: Dict[str, MotionGate] = {}  # per camera (edged.vision.motion)
        # frames between the detection workers and the track thread, put back in order
        self.order = threading.Condition()
        self._next_seq: Dict[str, int] = {}
        self._tracked_seq: Dict[str, int] = {}
        self._detected: Dict[tuple, tuple] = {}
        self.in_flight = 0
        self._frame_log = None
        if os.environ.get(FRAME_LOG_ENV):
            self._frame_log = open(os.environ[FRAME_LOG_ENV], "a", buffering=1)

    # ------------------------------------------------------------------ cameras

    def add_camera(self, name: str) -> None:
        self.motion[name] = MotionGate(self.d.cfg.motion)
        self.d.counters.fps_done.setdefault(name, RollingStats())

    def detect_width(self, camera: str) -> int:
        """The width ``camera``'s frames are detected at: its own ``detect_width``, else
        ``pipeline.detect_width`` (0: the frame's own)."""
        cam = self.d.cameras.get(camera)
        return (cam.settings.detect_width if cam is not None else 0) \
            or self.d.cfg.pipeline.detect_width

    def max_in_flight(self) -> int:
        """How many frames may be between the hub and the end of the track thread: one in
        detection and one waiting for the track thread per worker."""
        return 2 * max(1, self.d.cfg.pipeline.workers)

    # ------------------------------------------------------------------ detection workers

    def detect_loop(self, worker: int) -> None:
        """A detection worker: newest frame -> faces (boxes, landmarks, aligned, quality)."""
        while not self.stop.is_set():
            taken = self._take_frame()
            if taken is None:
                continue
            frame, seq, svc, lease = taken
            faces = self._detect(worker, frame, seq, svc)
            with self.order:
                self._detected[(frame.camera, seq)] = (frame, faces, svc, lease)
                self.order.notify_all()

    def _take_frame(self):
        """The newest frame, its sequence number and the set leased for it; None: none."""
        with self.order:  # at most max_in_flight() frames past the hub: the rest wait
            # there, where a newer frame replaces an older one (the newest frame wins)
            if self.in_flight >= self.max_in_flight():
                self.order.wait(0.2)
                return None
            self.in_flight += 1  # this worker's place, taken before the frame
        frame = self.d.hub.take(timeout=0.2)
        if frame is None:
            with self.order:
                self.in_flight -= 1
                self.order.notify_all()
            return None
        self.d.counters.stage["capture"].add(time.monotonic() - frame.monotonic)
        with self.order:
            seq = self._next_seq.get(frame.camera, 0)
            self._next_seq[frame.camera] = seq + 1
            # read once: the whole frame goes through one set, leased until it is tracked
            # (a set replaced meanwhile is closed only when its last frame is done)
            lease = self.d.sets.holder.acquire()  # ended by the track thread
            svc = lease.obj if lease is not None else None
        return frame, seq, svc, lease

    def _detect(self, worker: int, frame, seq: int, svc):
        """The faces of one frame (None: not detected; :class:`Refined`: tracks refined)."""
        try:
            around = self.what_to_detect(frame, seq)
        except Exception:  # (never a dead worker: detect the frame instead)
            log.exception("detect: the motion and track check of frame %d of camera %s "
                          "failed; detecting the whole frame", frame.index, frame.camera,
                          extra=fields(camera=frame.camera))
            around = FULL
        if around is None:
            return None
        t0 = time.perf_counter()
        try:
            pipes = svc.pipelines
            pipe, width = pipes[worker % len(pipes)], self.detect_width(frame.camera)
            if around is FULL:
                faces = pipe.detect(frame.image, width)
            else:
                faces = Refined(pipe.detect(frame.image, width, around=around))
        except Exception as exc:
            self.d.counters.errors += 1
            svc.failures += 1
            svc.last_failure = f"detect: {type(exc).__name__}: {exc}"
            log.exception("detect: frame %d of camera %s failed", frame.index,
                          frame.camera, extra=fields(camera=frame.camera))
            faces = []
        self.d.counters.stage["detect"].add(time.perf_counter() - t0)
        return faces

    def what_to_detect(self, frame, seq: int):
        """How a frame goes through the detector: :data:`FULL` (the whole P-Net pyramid),
        boxes (the live tracks' predicted boxes, refined by R-Net and O-Net only), or None
        (not at all).  Every ``tracking.detect_every``-th frame of a camera is a full
        detection, unless the motion gate (``motion.enabled``, edged.vision.motion) finds no motion,
        no live track and less than ``motion.max_idle_s`` since the last one; the frames
        between refine the live tracks (None when there are none)."""
        cfg = self.d.cfg
        tracker = self.d.recognizer.trackers.get(frame.camera)
        tracking = tracker is not None and bool(tracker.tracks)
        if seq % cfg.tracking.detect_every:
            boxes = tracker.predicted_boxes(frame.monotonic) if tracking else ()
            return boxes if len(boxes) else None
        gate = self.motion.get(frame.camera)
        if gate is None or not cfg.motion.enabled:
            return FULL
        gate.s = cfg.motion  # (a reload may have changed them)
        return FULL if gate.decide(frame.image, frame.monotonic, tracking) else None

    # ------------------------------------------------------------------ the track thread

    def track_loop(self) -> None:
        """Frames in capture order per camera: track, embed, match, make events."""
        next_expiry = time.monotonic() + 1.0
        while True:
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + 1.0
                try:
                    self.d.recognizer.expire_tracks()
                except Exception:
                    log.exception("track: ending the tracks of silent cameras failed")
            item = self._next_in_order(next_expiry)
            if item is False:
                return
            if item is not None:
                self._track(*item)

    def _next_in_order(self, until: float):
        """The next detected frame of some camera in its capture order; None: none before
        ``until``; False: stopping and nothing in flight."""
        with self.order:
            while True:
                for cam, seq in self._tracked_seq.items():
                    item = self._detected.pop((cam, seq), None)
                    if item is not None:
                        self._tracked_seq[cam] = seq + 1
                        return item
                new = [cam for (cam, _) in self._detected if cam not in self._tracked_seq]
                if new:
                    self._tracked_seq[new[0]] = 0  # sequence numbers start at 0
                    continue
                if self.stop.is_set() and not self.in_flight:
                    return False
                if time.monotonic() >= until:
                    return None
                self.order.wait(0.2)

    def _track(self, frame, faces, svc, lease) -> None:
        try:
            with self.d.recognizer.lock:
                self.d.recognizer.process(frame, faces, svc)
            svc.frames += 1
        except Exception as exc:
            self.d.counters.errors += 1
            svc.failures += 1
            svc.last_failure = f"track: {type(exc).__name__}: {exc}"
            log.exception("track: frame %d of camera %s failed", frame.index, frame.camera,
                          extra=fields(camera=frame.camera))
        finally:
            self.d.sets.holder.release(lease)
            with self.order:
                self.in_flight -= 1
                self.order.notify_all()  # a detection worker may take the next frame
        if self._frame_log is not None:
            self._frame_log.write(f"{frame.camera} {frame.index} {time.monotonic():.6f}\n")
        ota = self.d.ota
        if ota is not None:
            try:
                ota.after_frame(svc)
            except Exception:
                log.exception("drops: probation check failed")
