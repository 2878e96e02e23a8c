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

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from edged.publish.commands import CommandTopics
from edged.publish.hass import HassDiscovery
from edged.publish.mqtt import MqttClient, MqttSettings, topic_segment
from edged.publish.payloads import _merge  # noqa: F401  (imported from here by tools)
from edged.publish.payloads import event_payload, iso_utc, snapshot_payload
from edged.publish.presence import PresenceTopics
from edged.publish.retained import RetainedState
from edged.publish.spool import Spool
from edged.types import Event

log = logging.getLogger("edged.publish")

SPOOL_FILE = "mqtt-spool.db"
HASS_FILE = "hass-discovery.json"  # what Home Assistant was told (edged.publish.hass)


class Publisher(PresenceTopics, RetainedState, CommandTopics):
    """edged's MQTT side.  All public methods are thread-safe and never block on the network.

    This class delivers: start and stop, the spooled events, the sender thread and its in-flight
    window.  Its mixins, sharing its state, say what the retained topics hold: presence
    (:class:`~edged.publish.presence.PresenceTopics`) and status and discovery
    (:class:`~edged.publish.retained.RetainedState`)."""

    FLUSH_TIMEOUT_S = 3.0

    def __init__(self, settings: MqttSettings, device: str, state_dir,
                 people: Sequence[str] = (), on_command=None, enrolment: dict = None):
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
        self._budget = settings.max_inflight
        self._cursor = 0  # highest spool row id handed to paho
        self._conn_gen = 0  # bumped by each CONNACK (network thread)
        self._seen_gen = 0
        self._resync_since: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.loops = 0  # rounds of the sender thread (woken, or 0.5 s passed)
        self.started_at = time.time()
        self._init_retained(device, self.started_at)
        self._init_presence()
        self._init_commands(on_command)
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
                                      state_file=self.state_dir / HASS_FILE,
                                      enrolment=enrolment)
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

    # -- paho callbacks (network thread; no blocking, no locks held across paho calls) ------
    def _on_connected(self) -> None:
        self._conn_gen += 1
        self._wake.set()

    def _on_puback(self, mid: int, ok: bool, reason: str) -> None:
        self._acks.put((mid, ok, reason))
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._command_message(topic, payload):
            return
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
        self._retain_anew()
        if self.hass:
            c.subscribe(self.hass.birth_topic, qos=1)
        self._subscribe_commands()
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

    def mqtt_stats(self) -> dict:
        """The connection's counters, as in the status and stats documents."""
        c = self.client
        return {"connected": c.connected, "connects": c.connects, "sent": self.sent,
                "acked": self.acked, "rejected": self.rejected,
                "inflight": len(self._inflight), "last_error": c.last_error}

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot_topic(self, camera: str) -> str:
        return f"{self.prefix}/snapshot/{topic_segment(camera)}"

    def _publish_snapshot(self, ev: Event) -> None:
        if not self.client.connected:
            return
        payload = snapshot_payload(ev, self.settings.snapshot_encoding)
        self.client.publish(self.snapshot_topic(ev.camera), payload, qos=0)
