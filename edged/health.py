"""The daemon's health: one state that the watchdog, the status document and ``edged status``
all read.

States (``state`` in the status document, with ``problems``: docs/mqtt.md, docs/systemd.md):

- ``starting``: loading models, waiting for the cameras;
- ``healthy``: running, nothing wrong;
- ``degraded``: running, recognising and publishing, but something needs a person: each
  problem is named with why and since when (``state_dir`` full or read-only: the spool holds
  events in memory, the status file cannot be replaced...).  It ends by itself when the cause
  goes away;
- ``stopped``: the daemon stopped cleanly.

The systemd watchdog is fed while frames go through (:meth:`Health.progressed`); a degraded
daemon is still fed: a full disk is not a reason for systemd to restart it.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Optional, Tuple

STATES = ("starting", "healthy", "degraded", "stopped")


class Health:
    """Named problems plus the daemon's phase; thread-safe."""

    def __init__(self):
        self.phase = "starting"  # starting, running, stopped
        self._problems: Dict[str, Tuple[str, float]] = {}  # key -> (why, since epoch)
        self._lock = threading.Lock()
        self._progress_seen: Optional[int] = None

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

    @property
    def state(self) -> str:
        if self.phase != "running":
            return self.phase
        return "degraded" if self._problems else "healthy"

    def document(self) -> dict:
        """``state`` and ``problems`` (key -> why, since) in the status document."""
        from edged.publish import iso_utc

        with self._lock:
            problems = {k: {"why": why, "since": iso_utc(since)}
                        for k, (why, since) in sorted(self._problems.items())}
        return {"state": self.state, "problems": problems}

    def describe(self) -> str:
        """``degraded (spool: cannot write ...)``: for the journal and sd_notify's STATUS."""
        with self._lock:
            why = "; ".join(f"{k}: {w}" for k, (w, _) in sorted(self._problems.items()))
        return self.state + (f" ({why})" if why and self.phase == "running" else "")

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
