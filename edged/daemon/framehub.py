"""The frame hub between the cameras and the pipeline: one slot per camera, the newest frame wins.

Each :class:`edged.daemon.capture.Camera` puts its frames here; the pipeline takes them one at
a time, the cameras taking turns.  A frame not taken before the next one arrives is
overwritten and counted in :attr:`FrameHub.dropped`.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Optional

from edged.types import Frame


class FrameHub:
    """One slot per camera; the newest frame overwrites an untaken one.

    ``take()`` hands out the waiting frame that was captured first, so that cameras take
    turns.  ``put(..., wait=True)`` (files read with ``realtime: false``) waits for the slot
    to be free instead of overwriting.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._slots: Dict[str, Frame] = {}
        self.dropped: Dict[str, int] = {}
        self._closed = False

    def put(self, frame: Frame, wait: bool = False, stop: Optional[threading.Event] = None) -> bool:
        with self._cond:
            if wait:
                while frame.camera in self._slots and not self._closed and not (stop and stop.is_set()):
                    self._cond.wait(0.1)
                if self._closed or (stop and stop.is_set()):
                    return False
            elif frame.camera in self._slots:
                self.dropped[frame.camera] = self.dropped.get(frame.camera, 0) + 1
            self._slots[frame.camera] = frame
            self._cond.notify_all()
            return True

    def wait_free(self, camera: str, stop: Optional[threading.Event] = None) -> bool:
        """Wait until ``camera``'s slot is empty (the pipeline took its frame); False if closed."""
        with self._cond:
            while camera in self._slots and not self._closed and not (stop and stop.is_set()):
                self._cond.wait(0.1)
            return not self._closed and not (stop and stop.is_set())

    def take(self, timeout: Optional[float] = None) -> Optional[Frame]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._slots and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            if not self._slots:
                return None
            cam = min(self._slots, key=lambda c: self._slots[c].monotonic)
            frame = self._slots.pop(cam)
            self._cond.notify_all()
            return frame

    def empty(self) -> bool:
        with self._cond:
            return not self._slots

    def discard(self, camera: str) -> None:
        with self._cond:
            self._slots.pop(camera, None)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
