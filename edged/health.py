"""The daemon's health: one state that the watchdog, the status document and ``edged status``
all read.

States (``state`` in the status document, with ``problems``: docs/mqtt.md, docs/systemd.md):

- ``starting``: loading models, waiting for the cameras;
- ``healthy``: running, nothing wrong;
- ``degraded``: running, but something needs a person: each problem is named with why and
  since when (``state_dir`` full or read-only: still recognising and publishing, the spool
  holds events in memory, the status file cannot be replaced...; a camera down; the pipeline
  stuck).  It ends by itself when the cause goes away;
- ``stopped``: the daemon stopped cleanly.

Problems the daemon names (:meth:`Health.problem`): ``spool`` and ``status_file`` (the state
disk full or read-only), ``camera:<name>`` (:func:`camera_down`: no frame for longer than its
``stall_timeout``, and not connected) and ``pipeline`` (:meth:`Health.pipeline_stuck`: frames
come in and none went through the pipeline for :func:`stuck_after` seconds).  The retained
status, ``edged status``, sd_notify's STATUS and ``GET /healthz`` (:mod:`edged.publish.http`) all
read this one state: ``/healthz`` answers 200 only while it is ``healthy``.

The systemd watchdog is fed while frames go through (:meth:`Health.progressed`); a degraded
daemon is still fed: a full disk is not a reason for systemd to restart it, and a daemon whose
only camera is down or whose pipeline is stuck is not fed (no frame goes through).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Optional, Tuple

STATES = ("starting", "healthy", "degraded", "stopped")
PIPELINE_STUCK_S = 30.0  # at least this long without a frame through before "stuck"


def camera_down(connected: bool, finished: bool, quiet_s: float,
                stall_timeout: float) -> Optional[str]:
    """Why a camera counts as down (None when it does not): not connected, and no frame for
    longer than its stall timeout (``quiet_s``: seconds since its last frame, or since it was
    started when none came).  A file that ended is not down.  The reason does not change while
    the outage lasts (each change republishes the status)."""
    if finished or connected or quiet_s <= stall_timeout:
        return None
    return f"down: no frame for more than {stall_timeout:g} s"


def stuck_after(stall_timeouts) -> float:
    """Seconds without a frame through the pipeline, while a camera is connected, before the
    pipeline counts as stuck: long enough that a stalled camera is reported as down first."""
    return max([PIPELINE_STUCK_S] + [3.0 * t for t in stall_timeouts])


class Health:
    """Named problems plus the daemon's phase; thread-safe."""

    def __init__(self):
        self.phase = "starting"  # starting, running, stopped
        self._problems: Dict[str, Tuple[str, float]] = {}  # key -> (why, since epoch)
        self._lock = threading.Lock()
        self._progress_seen: Optional[int] = None
        self._stuck_mark: Optional[Tuple[int, float]] = None  # (progress, since when)

    def problem(self, key: str, why: Optional[str]) -> bool:
        """Set (``why``) or clear (None) the problem ``key``; whether the state document
        changed."""
        with self._lock:
            old = self._problems.get(key)
            if why is None:
                return self._problems.pop(key, None) is not None
            if old is not None and old[0] == why:
                return False
            self._problems[key] = (why, old[1] if old else time.time())
            return True

    def problems_under(self, prefix: str, whys: Dict[str, Optional[str]]) -> bool:
        """Set (or clear, None) the problem ``prefix + name`` for each of ``whys``, and clear
        the other problems under ``prefix`` (a camera removed); whether anything changed."""
        with self._lock:
            gone = [k for k in self._problems if k.startswith(prefix) and k[len(prefix):]
                    not in whys]
        changed = False
        for key in gone:
            changed |= self.problem(key, None)
        for name, why in whys.items():
            changed |= self.problem(prefix + name, why)
        return changed

    @property
    def state(self) -> str:
        if self.phase != "running":
            return self.phase
        return "degraded" if self._problems else "healthy"

    def document(self) -> dict:
        """``state`` and ``problems`` (key -> why, since) in the status document."""
        from edged.publish.publisher import iso_utc

        with self._lock:
            problems = {k: {"why": why, "since": iso_utc(since)}
                        for k, (why, since) in sorted(self._problems.items())}
        return {"state": self.state, "problems": problems}

    def describe(self) -> str:
        """``degraded (spool: cannot write ...)``: for the journal and sd_notify's STATUS."""
        with self._lock:
            why = "; ".join(f"{k}: {w}" for k, (w, _) in sorted(self._problems.items()))
        return self.state + (f" ({why})" if why and self.phase == "running" else "")

    def pipeline_stuck(self, progress: int, fed: bool, now: float,
                       after: float) -> Optional[str]:
        """Why the pipeline counts as stuck (None when it does not): frames come in (``fed``:
        a camera is connected) and ``progress`` (frames through, as for the watchdog) has not
        moved for more than ``after`` seconds (``now``: monotonic)."""
        mark = self._stuck_mark
        if not fed or mark is None or mark[0] != progress:
            self._stuck_mark = (progress, now)
            return None
        if now - mark[1] <= after:
            return None
        return f"stuck: no frame through the pipeline for more than {after:g} s"

    def progressed(self, progress: int) -> bool:
        """For the watchdog: did frames go through since the previous call?"""
        moved = self._progress_seen is not None and progress != self._progress_seen
        self._progress_seen = progress
        return moved and self.phase != "stopped"


def state_of(doc: dict, running: bool) -> str:
    """The health state a status document says, given whether its daemon still runs: a daemon
    that is not running is ``stopped`` whatever its last document says."""
    if doc.get("stopped") or not running:
        return "stopped"
    state = doc.get("state")
    return state if state in STATES else "unknown"
