"""Cameras: one named thread per camera, the newest frame wins, reconnection with backoff.

A :class:`Camera` reads its source in a thread called ``capture-<name>`` and hands frames to
a :class:`FrameHub`, which keeps *one* frame per camera: when the pipeline is slower than the
camera, older frames are overwritten (and counted as dropped) instead of queueing up, so the
pipeline always works on the newest image.  (A video file read with ``realtime: false`` is
the exception: its reader waits for the pipeline, so that every frame is processed as fast as
it can be decoded; that is the benchmark mode.)

Sources (``kind: auto`` guesses from ``source``):

- ``v4l2``: ``/dev/videoN`` or an index ``N``, with optional ``width``, ``height``, ``fourcc``
  (``MJPG``, ``YUYV``, ...);
- ``gstreamer``: a pipeline string ending in ``appsink`` (``libcamerasrc ! ... ! appsink`` on
  a Raspberry Pi, ``nvarguscamerasrc ! ... ! appsink`` on a Jetson); needs an OpenCV built with
  GStreamer, which :func:`gstreamer_available` checks;
- ``url``: ``rtsp://``, ``rtsps://``, ``http(s)://`` (MJPEG), ``tcp://``, ``udp://`` through
  OpenCV's FFmpeg backend, with open and read time-outs;
- ``file``: a video file, paced at its own frame rate (``realtime: true``) or read as fast as
  the pipeline takes frames (``realtime: false``), optionally looped.

When a source fails to open, ends (a live source), errors, or stalls (no frame for
``stall_timeout`` seconds) the camera logs it, releases the source, and tries again after a
backoff that doubles from ``reconnect_min`` up to ``reconnect_max`` seconds.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import cv2
import numpy as np

from edged.daemon.framehub import FrameHub
from edged.vision.imageio import to_bgr8
from edged.logs import fields
from edged.types import Frame

log = logging.getLogger("edged.capture")

KINDS = ["auto", "v4l2", "gstreamer", "url", "file"]
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "tcp://", "udp://",
               "rtp://", "srt://")
#: names that say "a video file" whatever the directory (a source that is clearly a file)
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".h264",
                    ".264", ".h265", ".265", ".hevc", ".y4m")
#: settings only a V4L2 device takes (the other kinds ignore them)
V4L2_ONLY = ("width", "height", "fourcc")


@dataclass
class CameraSettings:
    name: str = field(default="cam0", metadata={
        "help": "camera name, used in events, topics and logs (letters, digits, - and _)"})
    source: str = field(default="", metadata={
        "help": "required: /dev/videoN or an index (V4L2), a GStreamer pipeline ending in "
                "appsink, an rtsp:// http:// tcp:// URL, or a video file"})
    kind: str = field(default="auto", metadata={
        "choices": KINDS, "help": "source type; auto guesses it from source"})
    width: int = field(default=0, metadata={"min": 0, "max": 8192,
                                            "help": "requested width (V4L2); 0 = the device's"})
    height: int = field(default=0, metadata={"min": 0, "max": 8192,
                                             "help": "requested height (V4L2); 0 = the device's"})
    fourcc: str = field(default="", metadata={
        "help": "V4L2 pixel format, 4 characters (MJPG, YUYV, ...); empty = the device's"})
    detect_width: int = field(default=0, metadata={
        "min": 0, "max": 8192,
        "help": "this camera's processing width (see pipeline.detect_width); 0 = "
                "pipeline.detect_width; a width at least the frame's detects on the full "
                "frame (frames are never enlarged)"})
    fps_limit: float = field(default=0.0, metadata={
        "min": 0.0, "max": 1000.0, "help": "process at most this many frames per second; 0 = no limit"})
    loop: bool = field(default=False, metadata={"help": "video files: start again at the end"})
    realtime: bool = field(default=True, metadata={
        "help": "video files: pace at the file's frame rate (true) or read as fast as the "
                "pipeline takes frames, none skipped (false: benchmarks, batch runs)"})
    stall_timeout: float = field(default=5.0, metadata={
        "min": 0.5, "max": 600.0, "help": "seconds without a frame before the source is "
                                         "considered stalled and reopened"})
    reconnect_min: float = field(default=0.5, metadata={
        "min": 0.05, "max": 600.0, "help": "first delay before reopening a failed source (s)"})
    reconnect_max: float = field(default=30.0, metadata={
        "min": 0.05, "max": 3600.0, "help": "longest delay between reopening attempts (s)"})

    def resolved_kind(self) -> str:
        return guess_kind(self.source) if self.kind == "auto" else self.kind

    def config_errors(self):
        errs = []
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name or ""):
            errs.append(("name", f"expected letters, digits, '-' or '_' (it becomes an MQTT "
                                 f"topic level), got {self.name!r}"))
        if not self.source.strip():
            errs.append(("source", "must not be empty"))
        if self.fourcc and len(self.fourcc) != 4:
            errs.append(("fourcc", f"expected 4 characters such as MJPG or YUYV, got {self.fourcc!r}"))
        if self.reconnect_max < self.reconnect_min:
            errs.append(("reconnect_max", f"must be >= reconnect_min ({self.reconnect_min}), "
                                          f"got {self.reconnect_max}"))
        if self.kind == "v4l2" and not _v4l2_target(self.source):
            errs.append(("source", f"kind v4l2 needs /dev/videoN or an index, got {self.source!r}"))
        missing = self._missing_file()
        if missing:
            errs.append(("source", missing))
        return errs

    def config_warnings(self):
        """Valid settings this camera ignores: the V4L2 mode on a file, URL or pipeline."""
        kind = self.resolved_kind()
        if kind == "v4l2":
            return []
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [(key, f"applies to V4L2 devices only; this {kind} source ignores it")
                for key in V4L2_ONLY if getattr(self, key) != defaults[key]]

    def _missing_file(self) -> Optional[str]:
        """Why the source is a video file that does not exist, when it clearly is one (kind
        file, or a path with a directory or a video extension; never a device under /dev/, a
        URL, a pipeline or an index), else None."""
        if (self.resolved_kind() != "file" or not self.source.strip()
                or self.source.startswith("/dev/")):
            return None
        if not (self.kind == "file" or "/" in self.source
                or self.source.lower().endswith(VIDEO_EXTENSIONS)):
            return None
        if os.path.exists(self.source):
            return None
        rel = "" if os.path.isabs(self.source) else f" (relative to {os.getcwd()})"
        return f"video file {self.source!r} does not exist{rel}"


def guess_kind(source: str) -> str:
    s = source.strip()
    if s.isdigit() or s.startswith("/dev/video") or s.startswith("/dev/v4l/"):
        return "v4l2"
    if s.lower().startswith(URL_SCHEMES):
        return "url"
    if "!" in s and ("appsink" in s or "src" in s.split("!")[0]):
        return "gstreamer"
    return "file"


def _v4l2_target(source: str):
    s = source.strip()
    if s.isdigit():
        return int(s)
    if s.startswith("/dev/"):
        return s
    return None


def gstreamer_available() -> bool:
    """Whether this OpenCV was built with GStreamer (``cv2.getBuildInformation()``)."""
    info = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\S+)", info)
    return bool(m and m.group(1).upper() not in ("NO", "OFF"))


def quiet_opencv() -> None:
    """Keep OpenCV's and FFmpeg's own console messages (a refused connection, a read time-out)
    out of the daemon's log: edged logs those events itself, with their camera.  Setting
    ``$OPENCV_LOG_LEVEL`` or ``$OPENCV_FFMPEG_LOGLEVEL`` keeps them (for debugging)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # AV_LOG_FATAL
    if "OPENCV_LOG_LEVEL" not in os.environ:
        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except AttributeError:
            pass


class SourceError(Exception):
    """A source cannot be used as configured (a permanent problem, not an outage)."""


def preflight(settings: CameraSettings) -> Optional[str]:
    """A reason why ``settings`` can never work on this machine, or None."""
    kind = settings.resolved_kind()
    if kind == "gstreamer" and not gstreamer_available():
        return (f"camera {settings.name}: the source is a GStreamer pipeline but this OpenCV "
                f"({cv2.__version__}) was built without GStreamer (cv2.getBuildInformation() "
                f"says 'GStreamer: NO'); install an OpenCV with GStreamer (on Raspberry Pi OS "
                f"and JetPack: the distribution's python3-opencv, see docs/configuration.md), "
                f"or use a V4L2 device")
    if kind == "file" and not os.path.exists(settings.source):
        return f"camera {settings.name}: video file {settings.source} does not exist"
    return None


def open_source(s: CameraSettings, kind: str):
    """Open camera ``s`` as a source of ``kind`` (resolved): a ``cv2.VideoCapture``; OSError
    (or cv2.error) when it cannot be opened now, SourceError when it never can be here."""
    if kind == "v4l2":
        target = _v4l2_target(s.source)
        if isinstance(target, str) and not os.path.exists(target):
            raise OSError(f"{target}: no such device (is the camera plugged in? "
                          f"ls /dev/video*)")
        if isinstance(target, str) and not os.access(target, os.R_OK | os.W_OK):
            raise OSError(f"{target}: permission denied (the user needs the 'video' group)")
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise OSError(f"{s.source}: V4L2 could not open the device")
        if s.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*s.fourcc))
        if s.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, s.width)
        if s.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, s.height)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap
    if kind == "gstreamer":
        if not gstreamer_available():
            raise SourceError(preflight(s))
        cap = cv2.VideoCapture(s.source, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            cap.release()
            raise OSError("GStreamer could not start the pipeline (run it with gst-launch-1.0 "
                          "to see why)")
        return cap
    if kind == "url":
        ms = int(s.stall_timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, max(ms, 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        cap = cv2.VideoCapture(s.source, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise OSError(f"{_redact(s.source)}: cannot open the stream")
        return cap
    # file
    if not os.path.exists(s.source):
        raise OSError(f"{s.source}: no such file")
    cap = cv2.VideoCapture(s.source, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise OSError(f"{s.source}: not a video file OpenCV can decode")
    return cap


# ---------------------------------------------------------------------------- camera


class _Stopped(Exception):
    pass


class Camera:
    """One source read by one thread; see the module's documentation."""

    def __init__(self, settings: CameraSettings, hub: FrameHub):
        self.settings = settings
        self.name = settings.name
        self.kind = settings.resolved_kind()
        self.hub = hub
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._generation = 0
        self._lock = threading.Lock()
        # state, read by the daemon for status and stats
        self.connected = False
        self.finished = False  # a non-looping file reached its end
        self.frames_read = 0
        self.frames_delivered = 0
        self.reconnects = 0
        self.open_attempts = 0
        self.outages = 0
        self.last_error: Optional[str] = None
        self.last_frame_monotonic: Optional[float] = None
        self.first_frame = threading.Event()
        self.resolution = None
        self.source_fps = None
        # (generation, monotonic start) of the open or read in progress: check() replaces a
        # reader stuck in one; a stale reader's late return must not clear the new one's
        self._read_started: Optional[tuple] = None
        self._failed_at: Optional[float] = None  # when the thread ended on an unexpected error

    # -- life

    def start(self) -> "Camera":
        with self._lock:
            self._generation += 1
            gen = self._generation
            self._thread = threading.Thread(target=self._run, args=(gen,), name=f"capture-{self.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop the thread; True when it ended within ``timeout``."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            return not t.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Called periodically by the daemon: replace a reader stuck in a blocking read, and
        a capture thread that ended on an unexpected error (after ``reconnect_max``)."""
        failed = self._failed_at
        if failed is not None and not self._stop.is_set() and not self.alive \
                and time.monotonic() - failed >= self.settings.reconnect_max:
            self._failed_at = None
            self.outages += 1
            self.reconnects += 1
            self.start()
            return
        pending = self._read_started
        limit = max(2.0 * self.settings.stall_timeout, self.settings.stall_timeout + 2.0)
        if pending is not None and not self._stop.is_set() and time.monotonic() - pending[1] > limit:
            log.error("camera %s: an open or read has been blocked for %.0f s; abandoning that "
                      "reader and reopening the source", self.name, time.monotonic() - pending[1],
                      extra=fields(camera=self.name, event="stall"))
            self._read_started = None
            self.connected = False
            self.outages += 1
            self.reconnects += 1  # the daemon ends this camera's tracks on a reconnect
            self.start()  # a new generation; the old thread exits when its read returns

    def _begin_blocking(self, gen: int) -> float:
        t = time.monotonic()
        self._read_started = (gen, t)
        return t

    def _end_blocking(self, gen: int) -> None:
        pending = self._read_started
        if pending is not None and pending[0] == gen:
            self._read_started = None

    def status(self) -> dict:
        now = time.monotonic()
        age = None if self.last_frame_monotonic is None else now - self.last_frame_monotonic
        return {"name": self.name, "kind": self.kind, "source": _redact(self.settings.source),
                "connected": self.connected, "finished": self.finished,
                "frames_read": self.frames_read, "reconnects": self.reconnects,
                "outages": self.outages, "last_error": self.last_error,
                "last_frame_age_s": None if age is None else round(age, 3),
                "resolution": self.resolution}

    # -- opening

    def _open(self):
        """The opened source (a ``cv2.VideoCapture``); OSError or SourceError when it fails."""
        return open_source(self.settings, self.kind)

    # -- the thread

    def _sleep(self, seconds: float, gen: int) -> None:
        if self._stop.wait(seconds) or gen != self._generation:
            raise _Stopped()

    def _run(self, gen: int) -> None:
        try:
            self._connect_loop(gen)
        except _Stopped:
            pass
        except Exception:  # never let a capture bug kill the thread silently
            if gen == self._generation:  # (a reader check() already replaced: nothing to do)
                log.exception("camera %s: capture thread failed; restarting it in %.1f s",
                              self.name, self.settings.reconnect_max,
                              extra=fields(camera=self.name))
                self.last_error = "capture thread failed"
                self._failed_at = time.monotonic()  # check() starts a new one
            else:
                log.exception("camera %s: an abandoned capture thread failed", self.name,
                              extra=fields(camera=self.name))
        finally:
            if gen == self._generation:
                self.connected = False

    def _connect_loop(self, gen: int) -> None:
        """Open the source and read it, again after each failure, with the backoff."""
        backoff = self.settings.reconnect_min
        reported_down = False
        while not self._stop.is_set() and gen == self._generation:
            self.open_attempts += 1
            try:
                cap = self._open_watched(gen, backoff, reported_down)
            except SourceError:
                return
            if cap is None:
                reported_down = True
                self._sleep(backoff, gen)
                backoff = min(backoff * 2, self.settings.reconnect_max)
                continue
            opened = time.monotonic()
            try:
                got = self._read_loop(cap, gen)
            finally:
                self._end_blocking(gen)
                try:
                    cap.release()
                except cv2.error:
                    pass
            if self.finished or self._stop.is_set() or gen != self._generation:
                return
            if got and time.monotonic() - opened >= self.settings.stall_timeout:
                # a source that stayed up; one that flaps (a frame, then down) keeps
                # backing off instead of reconnecting twice a second
                backoff = self.settings.reconnect_min
            self.connected = False
            self.outages += 1
            self.reconnects += 1
            log.warning("camera %s: source lost (%s); reconnecting in %.1f s", self.name,
                        self.last_error, backoff, extra=fields(camera=self.name, event="camera_down"))
            reported_down = True
            self._sleep(backoff, gen)
            backoff = min(backoff * 2, self.settings.reconnect_max)

    def _open_watched(self, gen: int, backoff: float, reported_down: bool):
        """Open the source as a blocking call :meth:`check` watches (an open can hang too:
        GStreamer, RTSP).  None when it failed (logged: tried again after ``backoff``); a
        :class:`SourceError` (the source cannot work here) is logged and raised again."""
        self._begin_blocking(gen)
        try:
            cap = self._open()
        except SourceError as exc:
            self._end_blocking(gen)
            self.last_error = str(exc)
            log.error("camera %s: %s", self.name, exc, extra=fields(camera=self.name))
            raise
        except (OSError, cv2.error) as exc:
            self._end_blocking(gen)
            self.last_error = str(exc)
            self.connected = False
            level = logging.WARNING if not reported_down else logging.INFO
            log.log(level, "camera %s: cannot open %s: %s; retrying in %.1f s", self.name,
                    self.kind, exc, backoff, extra=fields(camera=self.name, event="camera_down"))
            return None
        self._end_blocking(gen)
        return cap

    def _read_loop(self, cap, gen: int) -> bool:
        """Read until the source fails; return whether at least one frame came."""
        r = self._start_reading(cap)
        while not self._stop.is_set() and gen == self._generation:
            if r.wait and not self.hub.wait_free(self.name, self._stop):
                return r.got_any  # read a file only when the pipeline is ready for the frame
            ok, image, now = self._read_watched(cap, gen, r)
            if gen != self._generation:
                return r.got_any
            if not ok or image is None:
                go_on, image = self._after_failed_read(cap, r, now)
                if not go_on:
                    return r.got_any
            if not r.got_any:
                r.got_any = True
                self._first_image(image)
            self.frames_read += 1
            if r.period:
                self._pace_file(r, gen)
            now = time.monotonic()
            self.last_frame_monotonic = now
            if r.min_gap and now - r.last_accepted < r.min_gap:
                continue
            r.last_accepted = now
            self._deliver(image, now, r.wait)
        return r.got_any

    def _start_reading(self, cap) -> "_Reading":
        """The pacing of a freshly opened source, from its settings and frame rate."""
        s = self.settings
        is_file = self.kind == "file"
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        self.source_fps = fps if 0 < fps < 1000 else None
        period = 1.0 / self.source_fps if (is_file and s.realtime and self.source_fps) else 0.0
        now = time.monotonic()
        return _Reading(is_file=is_file, wait=is_file and not s.realtime, period=period,
                        min_gap=1.0 / s.fps_limit if s.fps_limit > 0 else 0.0,
                        t_start=now, opened_at=now)

    def _read_watched(self, cap, gen: int, r: "_Reading") -> tuple:
        """One ``cap.read()`` as a blocking call :meth:`check` watches: ``(ok, image, now)``;
        a read that took most of ``stall_timeout`` is noted in ``r.slow_read``."""
        started = self._begin_blocking(gen)
        try:
            ok, image = cap.read()
        except cv2.error as exc:  # a backend error is a failed read, not a dead thread
            self.last_error = f"read failed: {exc}"
            ok, image = False, None
        self._end_blocking(gen)
        now = time.monotonic()
        if now - started >= 0.9 * self.settings.stall_timeout:
            # the source went quiet: FFmpeg's read time-out fired (a demuxer may still
            # hand out a few buffered frames before the read fails)
            r.slow_read = (now, now - started)
        return ok, image, now

    def _after_failed_read(self, cap, r: "_Reading", now: float) -> tuple:
        """A read gave no frame: ``(True, image)`` when a looping file was rewound, else
        ``(False, None)`` with ``last_error`` saying why (the end of a file: finished)."""
        s = self.settings
        if r.is_file:
            if s.loop and r.got_any:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok2, image = cap.read()
                if not ok2:
                    self.last_error = "cannot rewind the file"
                    return False, None
                r.t_start, r.n_file = time.monotonic(), 0
                return True, image
            self.finished = True
            self.connected = False
            log.info("camera %s: end of file %s (%d frames)", self.name, s.source,
                     self.frames_read, extra=fields(camera=self.name, event="end_of_file"))
            return False, None
        waited = now - (self.last_frame_monotonic or r.opened_at)
        if r.slow_read and now - r.slow_read[0] < s.stall_timeout:
            waited = max(waited, r.slow_read[1])
        self.last_error = ("stalled: no frame for %.1f s" % waited
                           if waited >= s.stall_timeout * 0.9 else "read failed")
        return False, None

    def _first_image(self, image: np.ndarray) -> None:
        """The first frame since the source was opened: connected."""
        self.connected = True
        self.resolution = [int(image.shape[1]), int(image.shape[0])]
        log.info("camera %s: %s connected, %dx%d%s", self.name, self.kind,
                 image.shape[1], image.shape[0],
                 f" at {self.source_fps:.2f} fps" if self.source_fps else "",
                 extra=fields(camera=self.name, event="camera_up"))

    def _pace_file(self, r: "_Reading", gen: int) -> None:
        """A file read in real time: wait for the frame's time at the file's frame rate."""
        r.n_file += 1
        delay = r.t_start + r.n_file * r.period - time.monotonic()
        if delay > 0:
            self._sleep(delay, gen)
        elif delay < -1.0:  # far behind (a slow machine): re-anchor rather than burst
            r.t_start, r.n_file = time.monotonic(), 0

    def _deliver(self, image: np.ndarray, now: float, wait: bool) -> None:
        """Hand the frame to the hub (a file not read in real time waits for room)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            image = to_bgr8(image, f"camera {self.name}")  # GRAY8, BGRA, 16-bit sources
        frame = Frame(camera=self.name, index=self.frames_read - 1, timestamp=time.time(),
                      image=image, monotonic=now, connection=self.reconnects)
        if self.hub.put(frame, wait=wait, stop=self._stop):
            self.frames_delivered += 1
            self.first_frame.set()


@dataclass
class _Reading:
    """The state of one :meth:`Camera._read_loop`: its pacing, and what it has seen."""

    is_file: bool
    wait: bool  # a file read only when the pipeline takes the frame (realtime: false)
    period: float  # a file read in real time: seconds between frames (else 0)
    min_gap: float  # fps_limit: least seconds between two frames handed on (else 0)
    t_start: float  # when the real-time pacing was anchored (monotonic) ...
    opened_at: float  # ... and when the source was opened
    n_file: int = 0  # frames paced since t_start
    got_any: bool = False
    last_accepted: float = -1e9
    slow_read: Optional[tuple] = None  # (when, seconds) of the last read near the time-out


def _redact(source: str) -> str:
    """A URL without its password, for logs and status."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", source)


def open_cameras(settings: List[CameraSettings], hub: FrameHub) -> List[Camera]:
    return [Camera(s, hub) for s in settings]
