"""The publisher: edged's events, presence, status and stats over MQTT, with store-and-forward.

Topics (``<prefix>`` is ``mqtt.topic_prefix``, default ``edged/<device>``; see docs/mqtt.md):

==============================  ========  ======  ============================================
topic                           retained  QoS     payload
==============================  ========  ======  ============================================
<prefix>/availability           yes       1       ``online`` / ``offline`` (last will) /
                                                  ``stopped`` (clean shutdown)
<prefix>/events                 no        1       one JSON object per event (spooled)
<prefix>/person/<name>          yes       1       presence of one person
<prefix>/status                 yes       1       versions, cameras, accelerators, swaps...
<prefix>/stats                  no        0       fps, latencies, queues, spool depth...
<prefix>/snapshot/<camera>      no        0       JPEG (or JSON with base64), off by default
<discovery>/device/edged_<d>/config  yes  1       Home Assistant device discovery
==============================  ========  ======  ============================================

Delivery of events: :meth:`Publisher.publish_event` commits the event to the spool
(:mod:`edged.publish.spool`) and returns; a sender thread hands spooled events to paho oldest first,
at most ``max_inflight`` unacknowledged at a time, and deletes each row when its PUBACK
arrives.  paho itself resends the unacknowledged ones after a reconnect; new events wait until
those are acknowledged, so the order per camera holds.  Events still in the spool when edged
starts (after a crash or a power cut) are sent first.  A subscriber may see an event twice
(the PUBACK was lost): both copies carry the same ``id``.

A clean :meth:`Publisher.stop` leaves no stale retained state: everyone absent, the status
``state: stopped`` with its cameras not connected, then availability ``stopped``.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from edged import __version__
from edged.publish.hass import HassDiscovery
from edged.publish.mqtt import MqttClient, MqttSettings, topic_segment
from edged.publish.spool import Spool
from edged.types import EVENT_TYPES, Event

log = logging.getLogger("edged.publish")

SCHEMA_VERSION = 1
SPOOL_FILE = "mqtt-spool.db"
HASS_FILE = "hass-discovery.json"  # what Home Assistant was told (edged.publish.hass)


def iso_utc(t: float) -> str:
    """Epoch seconds as ISO 8601 UTC with milliseconds, e.g. 2026-11-21T12:00:00.123Z."""
    return datetime.fromtimestamp(float(t), timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _num(v):
    """A number for JSON (4 decimals), or None: never NaN or infinity, which are not JSON."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 4) if math.isfinite(f) else None


def _liveness(live: dict) -> dict:
    """``{"score": number or None, "live": True, False or None}``."""
    verdict = live.get("live")
    return {"score": _num(live.get("score")), "live": None if verdict is None else bool(verdict)}


def event_payload(event: Event, device: str, publish_time: float) -> dict:
    """The JSON document published on ``<prefix>/events`` (never embeddings or images);
    ``liveness`` only on events that carry it (the liveness stage on)."""
    if event.type not in EVENT_TYPES:
        raise ValueError(f"event {event.id}: type {event.type!r} is not one of {EVENT_TYPES}")
    doc = {
        "schema": SCHEMA_VERSION,
        "id": event.id,
        "type": event.type,
        "device": device,
        "camera": event.camera,
        "track_id": int(event.track_id),
        "name": event.name,
        "identity": event.identity,
        "score": _num(event.score),
        "margin": _num(event.margin),
        "box": ([round(float(v), 1) for v in event.box]
                if event.box is not None and all(math.isfinite(float(v)) for v in event.box)
                else None),
        "quality": _num(event.quality),
        "duration": _num(event.duration),
        "best_score": _num(event.best_score),
        "frame_time": iso_utc(event.frame_time),
        "publish_time": iso_utc(publish_time),
        "versions": dict(event.versions or {}),
    }
    if event.liveness is not None:
        doc["liveness"] = _liveness(event.liveness)
    return doc


def _merge(dst: dict, src: dict, replace=()) -> None:
    """Recursive dict merge; a None value deletes the key.  The top-level keys of ``src``
    named in ``replace`` replace their old values whole instead of merging into them."""
    for k in replace:
        if k in src:
            dst.pop(k, None)
    for k, v in src.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


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


class Publisher:
    """edged's MQTT side.  All public methods are thread-safe and never block on the network."""

    FLUSH_TIMEOUT_S = 3.0

    def __init__(self, settings: MqttSettings, device: str, state_dir,
                 people: Sequence[str] = ()):
        self.settings = settings
        self.device = device
        self.prefix = (settings.topic_prefix or f"edged/{topic_segment(device)}").rstrip("/")
        self.t_availability = f"{self.prefix}/availability"
        self.t_events = f"{self.prefix}/events"
        self.t_status = f"{self.prefix}/status"
        self.t_stats = f"{self.prefix}/stats"
        self.enabled = bool(settings.enabled)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._acks: "queue.SimpleQueue[Tuple[int, bool, str]]" = queue.SimpleQueue()
        self._inflight: Dict[int, int] = {}  # mid -> spool row id (sender thread only)
        self._ctl_inflight: Dict[int, str] = {}  # mid -> topic of a retained state message
        self._ctl_pending: "OrderedDict[str, Tuple[bytes, bool]]" = OrderedDict()
        self._budget = settings.max_inflight
        self._cursor = 0  # highest spool row id handed to paho
        self._conn_gen = 0  # bumped by each CONNACK (network thread)
        self._seen_gen = 0
        self._resync_since: Optional[float] = None
        self._hass_due = False
        self._status_due = False
        self._people: Dict[str, _Person] = {}
        self._clear: Set[str] = set()  # people removed from the gallery: clear their topic
        self._enrolled: List[str] = []
        self._cameras: List[str] = []
        self._thread: Optional[threading.Thread] = None
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.loops = 0  # rounds of the sender thread (woken, or 0.5 s passed)
        self.started_at = time.time()
        self._status: dict = {
            "device": device,
            "edged_version": __version__,
            "started": iso_utc(self.started_at),
        }
        self._last_status_dropped = 0
        self.spool: Optional[Spool] = None
        self.client: Optional[MqttClient] = None
        self.hass: Optional[HassDiscovery] = None
        if not self.enabled:
            return
        self.state_dir = Path(state_dir)
        self.spool = Spool.from_settings(self.state_dir / SPOOL_FILE, settings.spool)
        self.client = MqttClient(settings, device, self.t_availability,
                                 on_connected=self._on_connected,
                                 on_puback=self._on_puback,
                                 on_message=self._on_message)
        if settings.homeassistant.enabled:
            self.hass = HassDiscovery(device, self.prefix,
                                      settings.homeassistant.discovery_prefix.rstrip("/"),
                                      state_file=self.state_dir / HASS_FILE)
        self.set_people(people)

    # -- public API -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return bool(self.client and self.client.connected)

    @property
    def spool_depth(self) -> int:
        return self.spool.depth if self.spool else 0

    @property
    def dropped(self) -> int:
        return self.spool.dropped if self.spool else 0

    def start(self) -> None:
        """Start the network and sender threads; a broker that is down is not a failure."""
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="edged-mqtt-sender", daemon=True)
        self._thread.start()
        self.client.start()

    def stop(self, clean: bool = True) -> None:
        """Stop.  clean: every person absent, the status ``state: stopped`` with its cameras
        not connected, events and retained state flushed (best effort, a few seconds), then
        availability ``stopped`` and DISCONNECT.  Not clean: the broker publishes the
        ``offline`` last will (presence and status stay as they were)."""
        if not self.enabled or self._thread is None:
            if self.spool:
                self.spool.close()
            return
        if clean:
            self._say_stopped()
            self._flush(self.FLUSH_TIMEOUT_S)
        self._stopping.set()
        self._wake.set()
        self._thread.join(5)
        self._thread = None
        if clean:
            mid = self.client.publish(self.t_availability, "stopped", qos=1, retain=True)
            self._wait_ack(mid, 2.0)
            self.client.disconnect()
        elif self.client.v5:
            self.client.disconnect(with_will=True)  # the broker publishes the "offline" will
        else:  # MQTT 3.1.1 has no "disconnect with will": say it
            mid = self.client.publish(self.t_availability, "offline", qos=1, retain=True)
            self._wait_ack(mid, 2.0)
            self.client.disconnect()
        self.client.stop()
        left = self.spool.depth
        self.spool.close()
        log.info("MQTT publisher stopped (%s); %d event(s) left in the spool for next start",
                 "clean" if clean else "not clean", left)

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

    def _unsent(self) -> bool:
        """Whether events or retained state are still to be sent or acknowledged."""
        with self._lock:
            due = (self._status_due or self._hass_due or bool(self._clear)
                   or bool(self._ctl_pending) or any(p.dirty for p in self._people.values()))
        return due or bool(self.spool.depth or self._inflight or self._ctl_inflight)

    def _flush(self, timeout: float) -> None:
        """Let the sender send and see acknowledged what is due, while connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.client.connected and self._unsent():
            self._wake.set()
            time.sleep(0.02)

    def publish_event(self, event: Event) -> None:
        """Spool the event (committed before this returns) and queue it for sending."""
        if not self.enabled:
            return
        now = time.time()
        doc = event_payload(event, self.device, now)
        payload = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        rowid = self.spool.put(event.id, event.camera, now, payload)
        if rowid is None:  # the disk refused it: send from memory only
            self.client.publish(self.t_events, payload, qos=1)
        with self._lock:
            self._presence_event(event)
        if self.settings.snapshots and event.snapshot:
            self._publish_snapshot(event)
        self._wake.set()

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

    def publish_stats(self, stats: dict) -> None:
        """Publish one stats message (QoS 0, not retained); the spool and MQTT parts are added."""
        if not self.enabled:
            return
        doc = dict(stats)
        doc["time"] = iso_utc(time.time())
        doc["spool"] = self.spool.stats()
        doc["mqtt"] = self.mqtt_stats()
        cams = doc.get("cameras")
        if isinstance(cams, dict):
            with self._lock:
                self._note_cameras(cams.keys())
        if self.client.connected:
            self.client.publish(self.t_stats, json.dumps(doc, default=str), qos=0)
        self._wake.set()

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

    def snapshot_topic(self, camera: str) -> str:
        return f"{self.prefix}/snapshot/{topic_segment(camera)}"

    # -- paho callbacks (network thread; no blocking, no locks held across paho calls) ------
    def _on_connected(self) -> None:
        self._conn_gen += 1
        self._wake.set()

    def _on_puback(self, mid: int, ok: bool, reason: str) -> None:
        self._acks.put((mid, ok, reason))
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self.hass and topic == self.hass.birth_topic and payload.strip() == b"online":
            log.info("Home Assistant is online: republishing discovery")
            self._hass_due = True
            self._wake.set()

    # -- sender thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            self.loops += 1
            try:
                self._step()
            except Exception:  # never let the sender die
                log.exception("MQTT sender: unexpected error")
                time.sleep(0.5)
        try:
            self._drain_acks()
        except Exception:
            log.exception("MQTT sender: unexpected error at stop")

    def _step(self) -> None:
        self._drain_acks()
        now = time.monotonic()
        self._presence_tick(now)
        if not self.client.connected:
            return
        gen = self._conn_gen
        if gen != self._seen_gen:
            self._seen_gen = gen
            self._on_new_connection()
        self._collect_state()
        if self._resync_since is not None:
            if not self._inflight and not self._ctl_inflight:
                self._resync_since = None
            elif now - self._resync_since > max(10.0, 2.0 * self.settings.keepalive):
                log.warning("MQTT: %d event(s) resent after reconnect were not acknowledged; "
                            "sending them again from the spool", len(self._inflight))
                self._inflight.clear()
                self._ctl_inflight.clear()
                self._cursor = 0
                self._resync_since = None
            else:
                return  # paho is resending the unacknowledged ones: keep the order
        self._send_ctl()
        self._fill()

    def _on_new_connection(self) -> None:
        c = self.client
        rm = c.receive_maximum
        self._budget = max(1, min(self.settings.max_inflight, rm)) if rm else \
            self.settings.max_inflight
        with self._lock:
            self._ctl_pending[self.t_availability] = (b"online", True)
            self._ctl_pending.move_to_end(self.t_availability, last=False)
            if self.hass:
                self._hass_due = True
            self._status_due = True
            for p in self._people.values():
                p.dirty = True
        if self.hass:
            c.subscribe(self.hass.birth_topic, qos=1)
        if self._inflight or self._ctl_inflight:
            self._resync_since = time.monotonic()
            log.info("MQTT: %d unacknowledged event(s) being resent, %d in the spool",
                     len(self._inflight), self.spool.depth)

    def _drain_acks(self) -> None:
        done = []
        while True:
            try:
                mid, ok, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            rowid = self._inflight.pop(mid, None)
            if rowid is None:
                topic = self._ctl_inflight.pop(mid, None)
                if topic is not None and not ok:
                    log.error("MQTT: broker rejected the message on %s: %s", topic, reason)
                continue
            done.append(rowid)
            if ok:
                self.acked += 1
            else:
                self.rejected += 1
                log.error("MQTT: broker rejected event (spool row %d) on %s: %s; dropped",
                          rowid, self.t_events, reason)
        if done:
            self.spool.delete(done)

    def _room(self) -> int:
        """QoS 1 messages that may still be sent: never more in flight than the broker's
        Receive Maximum (MQTT 5) or mqtt.max_inflight."""
        return self._budget - len(self._inflight) - len(self._ctl_inflight)

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

    def _fill(self) -> None:
        room = self._room()
        if room <= 0:
            return
        for rec in self.spool.fetch(self._cursor, room):
            mid = self.client.publish(self.t_events, rec.payload, qos=1)
            if mid is None:
                break
            self._cursor = rec.rowid
            self._inflight[mid] = rec.rowid
            self.sent += 1

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

    def mqtt_stats(self) -> dict:
        """The connection's counters, as in the status and stats documents."""
        c = self.client
        return {"connected": c.connected, "connects": c.connects, "sent": self.sent,
                "acked": self.acked, "rejected": self.rejected,
                "inflight": len(self._inflight), "last_error": c.last_error}

    def _note_cameras(self, names) -> None:
        names = sorted(set(self._cameras) | {str(n) for n in names})
        if names != self._cameras:
            self._cameras = names
            self._hass_due = True

    # -- presence -----------------------------------------------------------------------------
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

    # -- snapshots ----------------------------------------------------------------------------
    def _publish_snapshot(self, ev: Event) -> None:
        if not self.client.connected:
            return
        if self.settings.snapshot_encoding == "base64":
            payload = json.dumps({"event_id": ev.id, "camera": ev.camera, "type": ev.type,
                                  "name": ev.name, "time": iso_utc(ev.frame_time),
                                  "content_type": "image/jpeg",
                                  "jpeg": base64.b64encode(ev.snapshot).decode("ascii")})
        else:
            payload = bytes(ev.snapshot)
        self.client.publish(self.snapshot_topic(ev.camera), payload, qos=0)

    def _wait_ack(self, mid: Optional[int], timeout: float) -> bool:
        if mid is None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.client.connected:
            try:
                m, ok, _ = self._acks.get(timeout=0.05)
            except queue.Empty:
                continue
            rowid = self._inflight.pop(m, None)
            if rowid is not None:  # an event acknowledged after the sender stopped
                self.spool.delete([rowid])
            if m == mid:
                return True
        return False
