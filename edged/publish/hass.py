"""Home Assistant MQTT discovery (device-based) for one edged device.

One retained message on ``<discovery_prefix>/device/edged_<device>/config`` describes the
device and all its entities ("components"):

- one ``binary_sensor`` (device class ``presence``) per enrolled person, fed by the retained
  ``<prefix>/person/<name>`` topic;
- one ``event`` entity for the events on ``<prefix>/events`` (event types face_appeared,
  recognized, unknown, track_ended);
- one ``sensor`` per camera with its frames per second, and one with the spool depth, both fed
  by ``<prefix>/stats``;
- per camera, from the retained ``<prefix>/status``: a ``binary_sensor`` (device class
  ``connectivity``: on while the camera is connected, its status as attributes), its event rate
  (events per minute over the last 10 minutes) and the time of its last event (a ``timestamp``
  sensor).

Availability follows ``<prefix>/availability`` (``online``; ``offline`` and ``stopped`` both
mean unavailable).  A person removed from the gallery is removed from Home Assistant by
republishing the device with that component reduced to its ``platform`` key; what was
announced is kept in ``<state_dir>/hass-discovery.json``, so that this holds across restarts.
The publisher clears that person's retained topic only after the broker acknowledged the
removal (an empty payload on a live entity is a template error in Home Assistant).
Device-based discovery needs Home Assistant 2024.11 or newer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from edged import __version__
from edged.runtime.modelstore import atomic_write
from edged.publish.mqtt import ascii_id, topic_segment
from edged.types import EVENT_TYPES

log = logging.getLogger("edged.hass")

# keys every payload / component carries (checked by the tests, listed in docs/mqtt.md)
ROOT_KEYS = ("device", "origin", "availability", "components")
COMPONENT_KEYS = ("platform", "unique_id", "name")
#: what each platform needs besides (Home Assistant's MQTT schemas: an image reads its
#: image_topic, a text and a button publish on their command_topic)
PLATFORM_KEYS = {"binary_sensor": ("state_topic",), "sensor": ("state_topic",),
                 "event": ("state_topic",), "image": ("image_topic",),
                 "text": ("command_topic",), "button": ("command_topic",)}


def object_id(device: str) -> str:
    return "edged_" + ascii_id(device).replace(".", "_")


def discovery_topic(discovery_prefix: str, device: str) -> str:
    return f"{discovery_prefix}/device/{object_id(device)}/config"


def _jinja_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def build_discovery(device: str, topic_prefix: str, people: Iterable[str],
                    cameras: Iterable[str], removed: Iterable[Tuple[str, str]] = (),
                    enrolment: Optional[dict] = None) -> dict:
    """The device discovery payload; ``removed`` lists (component id, platform) to delete;
    ``enrolment``: ``{"image": bool, "commands": bool}``, the enrolment entities to announce
    (the last unknown face with mqtt.snapshots; the name and the button with
    enrolment.mqtt_commands)."""
    oid = object_id(device)
    comps: Dict[str, dict] = _person_components(oid, topic_prefix, people)
    comps.update(_device_components(oid, topic_prefix, cameras))
    comps.update(_enrolment_components(oid, topic_prefix, enrolment or {}))
    for cid, platform in removed:
        if cid not in comps:
            comps[cid] = {"platform": platform}
    return {
        "device": {
            "identifiers": [oid],
            "name": device,
            "manufacturer": "edged",
            "model": "edged face recognition",
            "sw_version": __version__,
        },
        "origin": {"name": "edged", "sw_version": __version__},
        "availability": [{
            "topic": f"{topic_prefix}/availability",
            "value_template": "{{ 'online' if value == 'online' else 'offline' }}",
        }],
        "qos": 1,
        "components": comps,
    }


def _person_components(oid: str, topic_prefix: str, people: Iterable[str]) -> Dict[str, dict]:
    """One presence binary sensor per enrolled person."""
    comps: Dict[str, dict] = {}
    for name in sorted(set(people)):
        cid = f"{oid}_person_{ascii_id(name)}"
        topic = f"{topic_prefix}/person/{topic_segment(name)}"
        comps[cid] = {
            "platform": "binary_sensor",
            "name": f"{name} present",
            "unique_id": cid,
            "device_class": "presence",
            "state_topic": topic,
            "value_template": "{{ 'ON' if value_json.present else 'OFF' }}",
            "json_attributes_topic": topic,
        }
    return comps


def _device_components(oid: str, topic_prefix: str, cameras: Iterable[str]) -> Dict[str, dict]:
    """The face event entity, each camera's health and fps, and the spool's depth."""
    comps: Dict[str, dict] = {}
    cid = f"{oid}_recognition"
    comps[cid] = {
        "platform": "event",
        "name": "Face event",
        "unique_id": cid,
        "state_topic": f"{topic_prefix}/events",
        "event_types": list(EVENT_TYPES),
        "value_template": ("{{ {'event_type': value_json.type, 'name': value_json.name, "
                           "'camera': value_json.camera, 'track_id': value_json.track_id, "
                           "'score': value_json.score, 'id': value_json.id} | to_json }}"),
    }
    for cam in sorted(set(cameras)):
        comps.update(_camera_components(oid, topic_prefix, cam))
        cid = f"{oid}_fps_{ascii_id(cam)}"
        comps[cid] = {
            "platform": "sensor",
            "name": f"{cam} fps",
            "unique_id": cid,
            "state_topic": f"{topic_prefix}/stats",
            "value_template": (f"{{{{ value_json.cameras['{_jinja_str(cam)}'].fps "
                               f"| default(0) | round(1) }}}}"),
            "unit_of_measurement": "fps",
            "state_class": "measurement",
        }
    cid = f"{oid}_spool_depth"
    comps[cid] = {
        "platform": "sensor",
        "name": "Spooled events",
        "unique_id": cid,
        "state_topic": f"{topic_prefix}/stats",
        "value_template": "{{ value_json.spool.depth }}",
        "state_class": "measurement",
        "entity_category": "diagnostic",
    }
    return comps


def _enrolment_components(oid: str, topic_prefix: str, which: dict) -> Dict[str, dict]:
    """Enrolment from Home Assistant (docs/enrolment.md): the last unknown face (an image), a
    name (a text) and the button that enrols the one under the other."""
    comps: Dict[str, dict] = {}
    if which.get("image"):
        cid = f"{oid}_last_unknown_face"
        comps[cid] = {"platform": "image", "name": "Last unknown face", "unique_id": cid,
                      "image_topic": f"{topic_prefix}/enrol/last_unknown",
                      "content_type": "image/jpeg"}
    if which.get("commands"):
        cid = f"{oid}_enrol_name"
        comps[cid] = {"platform": "text", "name": "Name to enrol", "unique_id": cid,
                      "command_topic": f"{topic_prefix}/command/enrol_name",
                      "state_topic": f"{topic_prefix}/enrol/name", "min": 0, "max": 64,
                      "entity_category": "config"}
        cid = f"{oid}_enrol_last_unknown"
        comps[cid] = {"platform": "button", "name": "Enrol last unknown face",
                      "unique_id": cid, "command_topic": f"{topic_prefix}/command/enrol",
                      "payload_press": json.dumps({"track": "last_unknown"}),
                      "entity_category": "config"}
    return comps


def _camera_components(oid: str, topic_prefix: str, cam: str) -> Dict[str, dict]:
    """A camera's health, read from the retained status (``cameras.<camera>``)."""
    status = f"{topic_prefix}/status"
    part = f"value_json.cameras['{_jinja_str(cam)}']"
    cid = ascii_id(cam)
    return {
        f"{oid}_camera_{cid}": {
            "platform": "binary_sensor",
            "name": f"{cam} camera",
            "unique_id": f"{oid}_camera_{cid}",
            "device_class": "connectivity",
            "state_topic": status,
            "value_template": f"{{{{ 'ON' if {part}.connected | default(false) else 'OFF' }}}}",
            "json_attributes_topic": status,
            "json_attributes_template": f"{{{{ {part} | default({{}}) | to_json }}}}",
        },
        f"{oid}_event_rate_{cid}": {
            "platform": "sensor",
            "name": f"{cam} events",
            "unique_id": f"{oid}_event_rate_{cid}",
            "state_topic": status,
            "value_template": f"{{{{ {part}.events_per_min | default(0) }}}}",
            "unit_of_measurement": "events/min",
            "state_class": "measurement",
        },
        f"{oid}_last_event_{cid}": {
            "platform": "sensor",
            "name": f"{cam} last event",
            "unique_id": f"{oid}_last_event_{cid}",
            "device_class": "timestamp",
            "state_topic": status,
            "value_template": f"{{{{ {part}.last_event | default(None) }}}}",
        },
    }


class HassDiscovery:
    """Remembers what was announced so that removed people are removed in Home Assistant."""

    def __init__(self, device: str, topic_prefix: str, discovery_prefix: str,
                 state_file: Optional[Path] = None, enrolment: Optional[dict] = None):
        self.device = device
        self.enrolment = enrolment or {}
        self.topic_prefix = topic_prefix
        self.topic = discovery_topic(discovery_prefix, device)
        self.birth_topic = f"{discovery_prefix}/status"
        self._announced: Dict[str, str] = {}  # component id -> platform
        self.published = 0
        # what was announced, kept across restarts: a person removed from the gallery while
        # edged was stopped is then removed in Home Assistant too (not left as an orphan)
        self.state_file = Path(state_file) if state_file else None
        if self.state_file is not None and self.state_file.exists():
            try:
                doc = json.loads(self.state_file.read_text(encoding="utf-8"))
                self._announced = {str(k): str(v) for k, v in doc["components"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("Home Assistant: cannot read %s (%s); entities of people removed "
                            "while edged was stopped may stay in Home Assistant",
                            self.state_file, exc)

    def payload(self, people: Iterable[str], cameras: Iterable[str]) -> dict:
        current = build_discovery(self.device, self.topic_prefix, people, cameras,
                                  enrolment=self.enrolment)
        removed = [(cid, p) for cid, p in self._announced.items()
                   if cid not in current["components"]]
        doc = build_discovery(self.device, self.topic_prefix, people, cameras, removed,
                              enrolment=self.enrolment)
        announced = {cid: c["platform"] for cid, c in current["components"].items()}
        if announced != self._announced and self.state_file is not None:
            try:
                atomic_write(self.state_file, (json.dumps({"components": announced}, indent=1,
                                                          ensure_ascii=False) + "\n").encode())
            except OSError as exc:
                log.warning("Home Assistant: cannot write %s: %s", self.state_file, exc)
        self._announced = announced
        return doc

    @staticmethod
    def validate(doc: dict) -> Optional[str]:
        """What is missing from a discovery payload (None when it is complete)."""
        for k in ROOT_KEYS:
            if k not in doc:
                return f"missing root key {k!r}"
        if not doc["device"].get("identifiers"):
            return "device.identifiers is empty"
        for cid, comp in doc["components"].items():
            if set(comp) == {"platform"}:
                continue  # a removal
            if comp["platform"] not in PLATFORM_KEYS:
                return f"component {cid}: unknown platform {comp['platform']!r}"
            for k in COMPONENT_KEYS + PLATFORM_KEYS[comp["platform"]]:
                if k not in comp:
                    return f"component {cid}: missing {k!r}"
        return None
