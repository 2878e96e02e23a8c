"""The retained state topics: the latest document per topic, collected and sent in order.

Availability, presence (:mod:`edged.publish.presence`), the status document and the Home
Assistant discovery document are retained: only the latest document of each topic matters, so
they wait in one ordered queue (``_ctl_pending``, topic -> payload) where a newer document
replaces an older one, and go out ahead of the events, within the same in-flight window.
"""
from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from typing import List, Tuple

from edged import __version__
from edged.publish.payloads import _merge, iso_utc


class RetainedState:
    """The retained-state part of :class:`edged.publish.publisher.Publisher` (a mixin: it
    shares the publisher's lock, its in-flight window and the presence of
    :class:`edged.publish.presence.PresenceTopics`).  Its state, guarded by ``_lock``:
    ``_status`` (the status document), ``_status_due`` and ``_hass_due`` (to be republished),
    ``_cameras`` (the cameras Home Assistant is told of) and ``_ctl_pending``."""

    def _init_retained(self, device: str, started_at: float) -> None:
        self._ctl_pending: "OrderedDict[str, Tuple[bytes, bool]]" = OrderedDict()
        self._hass_due = False
        self._status_due = False
        self._cameras: List[str] = []
        self._status: dict = {
            "device": device,
            "edged_version": __version__,
            "started": iso_utc(started_at),
        }
        self._last_status_dropped = 0

    def update_status(self, *, _replace=(), **parts) -> None:
        """Merge ``parts`` into the retained status document (None deletes a key), republish.

        The keys of ``parts`` named in ``_replace`` replace the old values whole, in one step.
        """
        with self._lock:
            _merge(self._status, parts, _replace)
            cams = parts.get("cameras")
            if isinstance(cams, dict):
                self._note_cameras(self._status.get("cameras", {}).keys())
            self._status_due = True
        self._wake.set()

    def _retain_anew(self) -> None:
        """A new connection: availability ``online`` first, then every retained topic again."""
        with self._lock:
            self._ctl_pending[self.t_availability] = (b"online", True)
            self._ctl_pending.move_to_end(self.t_availability, last=False)
            if self.hass:
                self._hass_due = True
            self._status_due = True
            for p in self._people.values():
                p.dirty = True

    def _say_stopped(self) -> None:
        """What a clean stop leaves retained: nobody present, the status stopped."""
        with self._lock:
            for p in self._people.values():
                if p.present or p.tracks:
                    p.present = False
                    p.tracks.clear()
                    p.dirty = True
            parts: dict = {"state": "stopped"}
            if self._status.get("cameras"):
                parts["cameras"] = {c: {"connected": False, "fps": None}  # None: no fps
                                    for c in self._status["cameras"]}
            _merge(self._status, parts)
            self._status_due = True
        self._wake.set()

    def _send_ctl(self) -> None:
        """Retained state (availability, person, status, discovery): the latest per topic."""
        while self._room() > 0:
            with self._lock:
                if not self._ctl_pending:
                    return
                topic, (payload, retain) = self._ctl_pending.popitem(last=False)
            mid = self.client.publish(topic, payload, qos=1, retain=retain)
            if mid is not None:
                self._ctl_inflight[mid] = topic
                if self.hass and topic == self.hass.topic:
                    self.hass.published += 1

    def _collect_state(self) -> None:
        """Queue what changed (latest document per topic wins)."""
        with self._lock:
            pending = self._ctl_pending
            # the discovery change goes first: Home Assistant drops an entity before its
            # state topic is cleared (an empty payload on a live entity is a template error)
            if self.hass and self._hass_due:
                self._hass_due = False
                doc = self.hass.payload(self._enrolled, self._cameras)
                pending[self.hass.topic] = (json.dumps(doc).encode(), True)
            for p in self._people.values():
                if p.dirty:
                    p.dirty = False
                    pending[self.person_topic(p.name)] = (
                        json.dumps(self._person_doc(p)).encode(), True)
            if not self._discovery_unacked():
                for name in self._clear:
                    pending[self.person_topic(name)] = (b"", True)
                self._clear = set()
            if self.spool.dropped != self._last_status_dropped:
                self._status_due = True
            if self._status_due:
                self._status_due = False
                self._last_status_dropped = self.spool.dropped
                pending[self.t_status] = (json.dumps(self._status_doc(), default=str).encode(),
                                          True)

    def _discovery_unacked(self) -> bool:
        """Whether a discovery message is queued or not yet acknowledged by the broker."""
        return bool(self.hass) and (self.hass.topic in self._ctl_pending
                                    or self.hass.topic in self._ctl_inflight.values())

    def _status_doc(self) -> dict:
        doc = copy.deepcopy(self._status)
        doc["time"] = iso_utc(time.time())
        doc["spool"] = self.spool.stats()
        doc["mqtt"] = self.mqtt_stats()
        return doc

    def _note_cameras(self, names) -> None:
        names = sorted(set(self._cameras) | {str(n) for n in names})
        if names != self._cameras:
            self._cameras = names
            self._hass_due = True
