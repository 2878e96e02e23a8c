"""Presence: who is in front of a camera, on the retained ``<prefix>/person/<name>`` topics.

A person is present from their first sighting (any event naming them but ``spoof_suspected``)
until all their tracks ended and ``mqtt.presence_timeout_s`` passed (monotonic time), or ten
times that (at least 600 s) without a ``track_ended``.  People removed from the gallery have
their retained presence cleared once they left the scene.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from edged.publish.mqtt import topic_segment
from edged.publish.payloads import _num, iso_utc
from edged.types import Event

log = logging.getLogger("edged.publish")


@dataclass
class _Person:
    name: str
    present: bool = False
    camera: Optional[str] = None
    last_seen: Optional[float] = None  # epoch (frame time)
    last_mono: float = 0.0  # monotonic time of the last sighting or track end
    tracks: Set[Tuple[str, int]] = field(default_factory=set)
    score: Optional[float] = None
    event_id: Optional[str] = None
    dirty: bool = True


class PresenceTopics:
    """The presence part of :class:`edged.publish.publisher.Publisher` (a mixin: it shares the
    publisher's ``_lock``, ``_wake``, ``settings`` and ``prefix``).  Its state, guarded by
    ``_lock``: ``_people`` (name -> :class:`_Person`), ``_enrolled`` (the gallery's names),
    ``_clear`` (names whose retained presence is to be cleared); it sets ``_hass_due`` when
    the enrolled people change."""

    def _init_presence(self) -> None:
        self._people: Dict[str, _Person] = {}
        self._clear: Set[str] = set()  # people removed from the gallery: clear their topic
        self._enrolled: List[str] = []

    def set_people(self, names: Sequence[str]) -> None:
        """The enrolled people: their presence topics and Home Assistant entities."""
        with self._lock:
            names = sorted({str(n) for n in names})
            for n in names:
                self._people.setdefault(n, _Person(n))
            self._clear -= set(names)  # removed, then back before its clearing was sent
            seen: Dict[str, str] = {}
            for n in names:
                other = seen.setdefault(topic_segment(n), n)
                if other != n:
                    log.warning("MQTT: %r and %r share the presence topic %s; rename one of "
                                "them in the gallery", other, n, self.person_topic(n))
            self._enrolled = names
            for n in [n for n in self._people if n not in names and not self._people[n].present]:
                del self._people[n]
                self._clear.add(n)  # its retained presence is cleared
            self._hass_due = True
        self._wake.set()

    def person_topic(self, name: str) -> str:
        return f"{self.prefix}/person/{topic_segment(name)}"

    def _presence_event(self, ev: Event) -> None:
        if not ev.name or ev.type == "spoof_suspected":  # (its name is the audit trail's)
            return
        p = self._people.get(ev.name)
        if p is None:
            p = self._people[ev.name] = _Person(ev.name)
        key = (ev.camera, int(ev.track_id))
        p.last_mono = time.monotonic()
        p.camera = ev.camera
        p.last_seen = ev.frame_time
        if ev.type == "track_ended":
            p.tracks.discard(key)
        else:
            p.tracks.add(key)
            if ev.type == "recognized":
                p.score, p.event_id = ev.score, ev.id
            if not p.present:
                p.present = True
                log.info("%s is present (camera %s)", ev.name, ev.camera)
        p.dirty = True

    def _presence_tick(self, now: float) -> None:
        timeout = self.settings.presence_timeout_s
        with self._lock:
            for p in self._people.values():
                if not p.present:
                    continue
                idle = now - p.last_mono
                if p.tracks and idle > max(600.0, 10 * timeout):
                    p.tracks.clear()  # a track_ended was never received
                if not p.tracks and idle > timeout:
                    p.present = False
                    p.dirty = True
                    log.info("%s has left (last seen on %s)", p.name, p.camera)
            for n in [n for n, p in self._people.items()
                      if not p.present and not p.dirty and n not in self._enrolled]:
                del self._people[n]  # left the gallery and the scene
                self._clear.add(n)
        # no wake-up here: the same round collects what changed, and while disconnected
        # nothing is collected, so a wake-up would only spin this thread until the broker is back

    def _person_doc(self, p: _Person) -> dict:
        return {"name": p.name, "present": p.present, "camera": p.camera,
                "last_seen": iso_utc(p.last_seen) if p.last_seen else None,
                "score": _num(p.score), "event_id": p.event_id}
