"""The probation of a new model set: swapped into service, then confirmed after its first good
frames or rolled back on a failure (the previous set back in service)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

from edged.ota.intake import DropRejected
from edged.ota.store import ModelBlob


@dataclass
class Probation:
    """A set swapped into service and the one it replaced, until one of them is released."""

    new: object  # ServiceSet
    old: object
    record: dict
    embedder_changed: bool
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)


class Probations:
    """Swapping a new set in and deciding its probation;
    a mixin of :class:`edged.ota.drops.DropManager`: it works on the manager's state (set up
    in its ``__init__``) and calls its other parts.

    Uses ``d``, ``settings``, ``probation``, ``_plock``, ``_stopping``, ``_record`` and ``tick``.
    """

    def _swap(self, changed: Dict[str, ModelBlob], gallery_holder, path: Path, t0: float,
              kind: str, files=None) -> None:
        old = self.d.service
        try:
            new = self.d.sets.make_set(changed, gallery_holder)
            self.d.sets.warm_up(new, parts=set(changed))
        except DropRejected:
            raise
        except Exception as exc:
            raise DropRejected(f"{path}: cannot build the new interpreters: {exc}") from None
        record = self._record("swapped", kind, path, t0, old=old.versions, new=new.versions,
                              files=files)
        self.probation = Probation(new, old, record, "embedder" in changed)
        self.d.sets.swap(new, record=record)

    def after_frame(self, svc) -> None:
        """Called by the track thread after each frame: decide a probation early."""
        p = self.probation
        if p is None or svc is not p.new:
            return
        self._decide(p)

    def _decide(self, p: Probation) -> None:
        s = p.new
        if s.failures > 0:
            verdict = "rollback"
        elif (s.frames >= self.settings.probation_frames
              and (not p.embedder_changed or s.embeds >= 1)) \
                or time.monotonic() - p.started >= self.settings.probation_s:
            verdict = "confirm"
        else:
            return
        with self._plock:
            if self.probation is not p:
                return
            self.probation = None
        if verdict == "rollback":
            why = (f"the new set failed on {s.failures} of its first {max(s.frames, s.failures)} "
                   f"frame(s): {s.last_failure or 'exception'}; the previous set is back")
            self.d.sets.rollback(p.old, p.new, why, p.record)
        else:
            self.d.sets.confirm(p.new, p.old)
        p.done.set()

    def wait_probation(self) -> None:
        p = self.probation
        while p is not None and not self._stopping.is_set():
            if p.done.wait(0.1):
                break
            self.tick()
            p = self.probation
