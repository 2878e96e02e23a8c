"""The events thread: each event to the publisher (which spools it), the journal, ``--events-out``
and the event hooks, in the order the track thread made them."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Callable, List, Optional

from edged.enrolment.store import kept_track_of
from edged.logs import Throttle, fields
from edged.publish.payloads import event_payload
from edged.types import Event

log = logging.getLogger("edged.daemon")

EVENT_QUEUE = 10000
PRUNE_EVERY_S = 600.0  # kept track faces past enrolment.keep_days are deleted this often


class EventSink:
    """A bounded queue of ``(event, capture time, frame index)`` and the thread that empties it.

    ``daemon``: the service, read for its ``publisher`` (None until it is started), ``device``
    and ``counters``; ``events_out``: a file to append every event to, one JSON line each."""

    def __init__(self, daemon, events_out=None):
        self.d = daemon
        self.events_out = events_out
        self.queue: "queue.Queue" = queue.Queue(EVENT_QUEUE)
        self.hooks: List[Callable[[Event, float], None]] = []
        self.done = threading.Event()  # set by stop(): nothing more comes
        self._warned_at = -1e9
        self._keep_log = Throttle(log)
        self._next_prune = time.monotonic() + PRUNE_EVERY_S

    def put(self, ev: Event, captured: float, frame_index: Optional[int] = None) -> None:
        self.queue.put((ev, captured, frame_index))

    def put_all(self, events, versions: Optional[dict]) -> None:
        """Events made outside a frame (tracks ended by a reload, a stop or a silent camera)."""
        now = time.monotonic()
        for ev in events:
            if versions is not None:
                ev.versions = dict(versions)
            self.put(ev, now)

    def close(self) -> None:
        """No more events: the thread ends once the queue is empty."""
        self.done.set()
        self.queue.put(None)

    def qsize(self) -> int:
        return self.queue.qsize()

    def run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.done.is_set():
                    return
                self._prune()
                continue
            if item is None:
                return
            self._handle(*item)

    def _handle(self, ev: Event, captured: float, frame_index) -> None:
        counters = self.d.counters
        t0 = time.monotonic()
        try:
            if self.d.publisher is not None:
                self.d.publisher.publish_event(ev)
        except Exception:
            log.exception("publisher: event %s failed", ev.id)
        t1 = time.monotonic()
        counters.stage["publish"].add(t1 - t0)
        lat = t1 - captured
        counters.latency.add(lat)
        counters.latencies_all.append(lat)
        counters.event_done(ev)
        log_event(ev)
        if ev.kept is not None:
            self._keep(ev)
        if self.events_out is not None:
            self.write(ev, lat, frame_index)
        for hook in list(self.hooks):
            try:
                hook(ev, lat)
            except Exception:
                log.exception("event hook failed")

    def _prune(self) -> None:
        """Kept tracks past their retention go, every PRUNE_EVERY_S even with no new track."""
        now = time.monotonic()
        store = self.d.kept
        if store is None or now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        try:
            store.prune()
        except OSError as exc:
            log.warning("kept track faces: cannot prune %s: %s", store.root, exc)

    def _keep(self, ev: Event) -> None:
        """An ended track's best crops to the kept tracks (enrolment.keep_faces), on this
        thread: a full disk costs the crops, never an event."""
        store, track = self.d.kept, kept_track_of(ev)
        ev.kept = None  # (the crops are not needed any more)
        if store is None or track is None:
            return
        try:
            store.keep(track)
            if self.d.commands is not None:
                self.d.commands.note_kept(track)
            self._keep_log.resolved("kept track faces: %s written again", store.root)
        except OSError as exc:
            self._keep_log.problem(logging.WARNING, "kept track faces: cannot keep track %d "
                                   "of camera %s under %s: %s", ev.track_id, ev.camera,
                                   store.root, exc)

    def write(self, ev: Event, latency: float, frame_index=None) -> None:
        """One line of ``--events-out``: the document MQTT subscribers get (one definition,
        :func:`edged.publish.payloads.event_payload`), with the debugging extras under ``debug``."""
        d = event_payload(ev, self.d.device, time.time())
        d["debug"] = {"frame_index": frame_index, "latency_s": round(latency, 4)}
        line = json.dumps(d, default=str) + "\n"
        try:
            with open(self.events_out, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:  # a full disk must not end the events thread (and MQTT with it)
            now = time.monotonic()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.error("--events-out %s: cannot write event %s: %s (said once a minute)",
                          self.events_out, ev.id, exc)


def log_event(ev: Event) -> None:
    """The journal line of one event, with its fields (camera, person, event, track...)."""
    f = fields(camera=ev.camera, person=ev.name, event=ev.type, track=ev.track_id,
               identity=ev.identity, live=ev.liveness)
    if ev.type == "spoof_suspected":
        log.warning("camera %s: spoof suspected, not recognized: %s (track %d, score %.3f, "
                    "liveness %s)", ev.camera, ev.name, ev.track_id, ev.score or 0,
                    (ev.liveness or {}).get("score"), extra=f)
    elif ev.type == "recognized":
        log.info("camera %s: recognized %s (track %d, score %.3f, margin %.3f)", ev.camera,
                 ev.name, ev.track_id, ev.score or 0, ev.margin or 0, extra=f)
    elif ev.type == "unknown":
        log.info("camera %s: unknown face (track %d, best score %.3f)", ev.camera,
                 ev.track_id, ev.score or 0, extra=f)
    elif ev.type == "track_ended":
        log.info("camera %s: track %d ended after %.1f s%s", ev.camera, ev.track_id,
                 ev.duration or 0, f" ({ev.name})" if ev.name else "", extra=f)
    else:
        log.debug("camera %s: face appeared (track %d)", ev.camera, ev.track_id, extra=f)
