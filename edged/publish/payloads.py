"""The JSON documents edged publishes: an event's payload, the timestamps and numbers in them.

:func:`event_payload` is the document on ``<prefix>/events`` (see docs/mqtt.md),
:func:`snapshot_payload` the one on ``<prefix>/snapshot/<camera>``; :func:`iso_utc` writes
every time in the documents; :func:`_merge` merges a partial status into the retained status
document.
"""
from __future__ import annotations

import base64
import copy
import json
import math
from datetime import datetime, timezone

from edged.types import EVENT_TYPES, Event

SCHEMA_VERSION = 1


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


def snapshot_payload(ev: Event, encoding: str):
    """The message on ``<prefix>/snapshot/<camera>``: the event's JPEG as it is, or with
    ``encoding`` "base64" a JSON document carrying it."""
    if encoding == "base64":
        payload = json.dumps({"event_id": ev.id, "camera": ev.camera, "type": ev.type,
                              "name": ev.name, "time": iso_utc(ev.frame_time),
                              "content_type": "image/jpeg",
                              "jpeg": base64.b64encode(ev.snapshot).decode("ascii")})
    else:
        payload = bytes(ev.snapshot)
    return payload
