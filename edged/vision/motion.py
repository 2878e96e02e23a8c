"""Motion gating: run the face detector only when something moves or a face is tracked.

A :class:`MotionGate` (one per camera) keeps a running background of a small grey copy of
the camera's frames (``motion.width`` pixels wide: area averaging, then grey).  Each frame is
compared with it (``cv2.absdiff``): the share of pixels that changed by more than
``motion.threshold`` grey levels is the frame's *motion area*; then the frame is blended into
the background (``cv2.accumulateWeighted`` with ``motion.learning_rate``), so that slow light
changes and things that moved and stopped fade into it.

(The copy samples every k-th pixel of a large frame before averaging: :func:`thumbnail`.)

A frame needs a full detection when its motion area is at least ``motion.min_area``, when the
camera has a live track (a face that is being followed, moving or not), or when the last
detection is ``motion.max_idle_s`` old (a person who walked in while nothing else moved, and
stands still).  Otherwise the frame is only tracked: the tracker keeps its tracks' last boxes,
as between two ``tracking.detect_every`` detections.  The first frame of a camera is always
detected.  The check costs a resize of the frame to ``motion.width`` and a few operations on
about 15 000 pixels, a fraction of a millisecond.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

__all__ = ["MotionSettings", "MotionGate", "thumbnail"]


def thumbnail(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A small copy of ``image`` for whole-frame comparisons, cheap at any size: every k-th
    pixel (k such that at least 4 x 4 samples are left per pixel of the copy), then area
    averaging.  (Area averaging straight from 1920 x 1080 to 160 x 90 costs 5-10 ms; this,
    about 0.5.)"""
    h, w = image.shape[:2]
    k = min(w // (4 * width), h // (4 * height))
    if k > 1:
        image = cv2.resize(image, (w // k, h // k), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


@dataclass
class MotionSettings:
    enabled: bool = field(default=True, metadata={
        "help": "detect faces only on frames where something moves or a face is tracked "
                "(and every max_idle_s anyway); false = detect on every frame"})
    width: int = field(default=160, metadata={
        "min": 16, "max": 1920, "help": "width of the grey copy the motion check runs on "
                                        "(pixels, aspect kept)"})
    threshold: int = field(default=25, metadata={
        "min": 1, "max": 255, "help": "grey-level change (0-255) from the background that "
                                      "makes a pixel of the copy moving"})
    min_area: float = field(default=0.002, metadata={
        "min": 0.0, "max": 1.0, "help": "share of the copy's pixels that must be moving for "
                                        "a frame to count as motion (0.002 of 160 x 90: about "
                                        "29 pixels)"})
    learning_rate: float = field(default=0.05, metadata={
        "min": 0.001, "max": 1.0, "help": "weight of each frame in the running background "
                                          "(higher: what stopped moving fades in sooner)"})
    max_idle_s: float = field(default=2.0, metadata={
        "min": 0.0, "max": 3600.0, "help": "seconds without motion or track after which a "
                                           "full detection runs anyway (someone standing "
                                           "still); 0 = every frame"})


class MotionGate:
    """One camera's motion check and detection decision (see the module docstring).

    :meth:`decide` may be called from several detection workers; it is serialised.
    """

    def __init__(self, settings: Optional[MotionSettings] = None):
        self.s = settings or MotionSettings()
        self._lock = threading.Lock()
        self._background: Optional[np.ndarray] = None  # float32, the copy's size
        self._last_detection: Optional[float] = None  # monotonic time
        self._last_frame: Optional[float] = None
        self.moving = False
        self.area = 0.0  # motion area of the last frame
        self.detected = 0  # frames sent to detection
        self.skipped = 0  # frames not detected (calm, nothing tracked)

    def grey_copy(self, image: np.ndarray) -> np.ndarray:
        """The small grey copy of a BGR frame the check compares."""
        h, w = image.shape[:2]
        width = min(self.s.width, w)
        small = thumbnail(image, width, max(1, int(round(h * width / w))))
        return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small

    def _measure(self, grey: np.ndarray) -> float:
        """Motion area of ``grey`` against the background, which then learns it."""
        bg = self._background
        if bg is None or bg.shape != grey.shape:
            self._background = grey.astype(np.float32)
            return 1.0  # nothing to compare with: everything is new
        diff = cv2.absdiff(grey, cv2.convertScaleAbs(bg))
        moving = cv2.countNonZero(cv2.threshold(diff, self.s.threshold, 255,
                                                cv2.THRESH_BINARY)[1])
        cv2.accumulateWeighted(grey, bg, self.s.learning_rate)
        return moving / float(grey.size)

    def decide(self, image: np.ndarray, now: float, tracking: bool) -> bool:
        """Whether the frame ``image`` (captured at monotonic ``now``) needs a full detection;
        ``tracking``: the camera has a live track."""
        grey = self.grey_copy(image)
        with self._lock:
            self.area = self._measure(grey)
            self.moving = self.area >= self.s.min_area and self.area > 0.0
            last = self._last_detection
            due = last is None or now - last >= self.s.max_idle_s
            self._last_frame = now
            if self.moving or tracking or due:
                self._last_detection = now
                self.detected += 1
                return True
            self.skipped += 1
            return False

    def reset(self) -> None:
        """Forget the background (a reconnected source): the next frame is detected."""
        with self._lock:
            self._background = None
            self._last_detection = None

    def status(self) -> dict:
        """The motion state for the daemon's stats."""
        with self._lock:
            last, frame = self._last_detection, self._last_frame
            idle = None if last is None or frame is None else round(max(0.0, frame - last), 3)
            return {"moving": self.moving, "area": round(self.area, 4),
                    "frames_detected": self.detected, "frames_skipped": self.skipped,
                    "since_detection_s": idle}
