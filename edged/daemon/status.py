"""What the daemon says about itself: the status document, status.json, the health checks,
the stats topic and the line systemd shows.

The status document (versions, accelerators, cameras, health, the last swap and the last
refused drop, see docs/mqtt.md) is published retained over MQTT and written atomically to
``<state_dir>/status.json``, which ``edged status`` reads. The health (edged.health) is
the one notion that the watchdog, the MQTT status, ``edged status`` and ``/healthz`` all read.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Dict, Optional

from edged import __version__
from edged.health import Health, camera_down, stuck_after
from edged.logs import Throttle, fields
from edged.ota.modelset import describe_change
from edged.publish.payloads import _merge, iso_utc
from edged.runtime import modelstore

log = logging.getLogger("edged.daemon")

STATUS_FILE = "status.json"
STATUS_SLACK = 1024  # room kept in status.json's blocks for a longer document (a full disk)
DROP_RESULTS = ("handled", "swapped", "held_back", "rejected", "rolled_back", "unchanged",
                "waiting")


class StatusBoard:
    """The status document and file, the drop outcomes and the health.

    ``daemon``: the service, read for ``cfg``, ``device``, ``publisher`` (each update goes to
    it too), ``service``, ``ota``, ``cameras``, ``hub`` and ``counters``."""

    def __init__(self, daemon):
        self.d = daemon
        self.health = Health()
        self.started = time.time()
        self.started_mono = time.monotonic()
        self._doc: dict = {}  # what the daemon put in the status (mirrors the publisher)
        self.dirty = False
        self._lock = threading.Lock()
        self._report_lock = threading.RLock()
        self._file_problem: Optional[str] = None
        self._file_log = Throttle(log)
        self.drop_counts = {k: 0 for k in DROP_RESULTS}
        self.drop_outcomes: Dict[tuple, int] = {}  # (kind, outcome) -> drops and swaps
        self.camera_since: Dict[str, float] = {}  # camera -> when it was started (monotonic)

    # ------------------------------------------------------------------ the document

    def update(self, *, _replace=(), **parts) -> None:
        """Merge ``parts`` into the status (None deletes a key): MQTT retained and status.json.

        The keys of ``parts`` named in ``_replace`` replace the old values whole, in one step.
        """
        with self._lock:
            _merge(self._doc, parts, _replace)
            self.dirty = True
        if self.d.publisher is not None:
            self.d.publisher.update_status(_replace=_replace, **parts)

    def parts(self) -> dict:
        """A copy of what was put in the status so far."""
        with self._lock:
            return dict(self._doc)

    def document(self) -> dict:
        """The status document as published (device, times, spool and mqtt included)."""
        with self._lock:
            doc = {"device": self.d.device, "edged_version": __version__,
                   "started": iso_utc(self.started), "pid": os.getpid()}
            doc.update(copy.deepcopy(self._doc))
        doc["time"] = iso_utc(time.time())
        pub = self.d.publisher
        if pub is not None and getattr(pub, "enabled", False):
            try:
                doc["spool"] = pub.spool.stats()
                doc["mqtt"] = pub.mqtt_stats()
            except Exception:  # the publisher is stopping
                pass
        return doc

    def write_file(self) -> None:
        """``<state_dir>/status.json``, written atomically (``edged status`` reads it).

        The file is padded with spaces to whole 4 KiB blocks, at least STATUS_SLACK bytes to
        spare: when the disk is full and the
        atomic replacement fails, the document is written over the old one in place, in the
        blocks the file already has (``edged status`` reads again a document caught half
        written).  Only when both fail is the status file out of date (and the health says
        so on MQTT)."""
        with self._lock:
            self.dirty = False
        path = Path(self.d.cfg.paths.state_dir) / STATUS_FILE
        data = (json.dumps(self.document(), indent=2, default=str) + "\n").encode()
        size = -(-(len(data) + STATUS_SLACK) // 4096) * 4096  # whole blocks, some to spare
        data = data[:-1] + b" " * (size - len(data)) + b"\n"
        why = None
        try:
            modelstore.atomic_write(path, data)
        except OSError as exc:
            why = f"cannot replace {path}: {exc}"
            try:
                _write_in_place(path, data)
                why += " (written in place)"
            except OSError as exc2:
                why += f"; nor write it in place: {exc2}"
        self._file_problem = why
        if why:
            self._file_log.problem(logging.WARNING, "status file: %s", why)
        else:
            self._file_log.resolved("status file: %s written again", path)

    # ------------------------------------------------------------------ drops and swaps

    def report(self, record: dict) -> None:
        """One outcome of a drop or a swap: to the journal and to the status (MQTT and file).
        Called from the drop watcher, the track thread (rollback) and the main loop."""
        with self._report_lock:
            result, what = record.get("result", ""), record.get("kind", "drop")
            record.setdefault("trigger", "drop")
            _log_outcome(record, result, what)
            parts = {"drops": self._count(record, result, what)}
            if result in ("swapped", "rolled_back", "confirmed"):
                parts["last_swap"] = record
            if result == "rejected":
                parts["last_rejected_drop"] = record
            svc = self.d.service
            if svc is not None:
                parts["versions"] = svc.versions
                parts["accelerators"] = svc.accelerators
            ota = self.d.ota
            parts["held_back"] = (ota.held_status() if ota is not None else None) or {}
            # a swap record replaces the previous one whole (update merges mappings), in the
            # same step: a status published in between never lacks them
            self.update(_replace=("last_swap", "last_rejected_drop", "held_back", "versions"),
                        **parts)

    def _count(self, record: dict, result: str, what) -> dict:
        counted = result in ("rolled_back", "waiting") or (
            record.get("trigger") in ("drop", "start") and result in self.drop_counts)
        if counted:
            key = (str(what), result)
            self.drop_outcomes[key] = self.drop_outcomes.get(key, 0) + 1
        if result in ("rolled_back", "waiting"):
            self.drop_counts[result] += 1
        elif counted:
            # (a gallery refused at start is a refused drop too: the file someone put there)
            self.drop_counts[result] += 1
            self.drop_counts["handled"] += 1  # one per drop: its final outcome
        return dict(self.drop_counts)

    # ------------------------------------------------------------------ health

    def check_health(self, force: bool = False) -> None:
        """Look at what can go wrong while running (the spool's disk, the status file) and
        publish the health when it changed (or ``force``); the spool tries its disk again (its
        back-off)."""
        pub = self.d.publisher
        spool = getattr(pub, "spool", None) if pub is not None else None
        changed = False
        if spool is not None:
            spool.retry()
            changed |= self.health.problem("spool", spool.problem)
        changed |= self.health.problem("status_file", self._file_problem)
        changed |= self._check_gallery_copy()
        changed |= self._check_frames()
        if changed or force:
            self.publish_health()

    def _check_gallery_copy(self) -> bool:
        """A gallery served from memory because its snapshot could not be written (a full
        state disk) is a health problem until a retry (each check: a statvfs when still
        full) gives it its snapshot."""
        svc = self.d.service
        holder = getattr(svc, "gallery", None) if svc is not None else None
        if holder is None or not getattr(holder, "snapshot_error", None):
            return self.health.problem("gallery_snapshot", None)
        holder.retry_snapshot()
        return self.health.problem("gallery_snapshot", holder.snapshot_error)

    def _check_frames(self) -> bool:
        """The cameras down and a stuck pipeline as health problems (edged.health)."""
        now = time.monotonic()
        cams = dict(self.d.cameras)
        down = {name: camera_down(cam.connected, cam.finished,
                                  now - (cam.last_frame_monotonic
                                         or self.camera_since.get(name, self.started_mono)),
                                  cam.settings.stall_timeout) for name, cam in cams.items()}
        changed = self.health.problems_under("camera:", down)
        fed = any(cam.connected for cam in cams.values())
        after = stuck_after(cam.settings.stall_timeout for cam in cams.values())
        return changed | self.health.problem(
            "pipeline", self.health.pipeline_stuck(self.d.counters.progress, fed, now, after))

    def publish_health(self) -> None:
        """The health into the status (MQTT and status.json), and one journal line."""
        self.update(_replace=("problems",), **self.health.document())
        if self.health.phase == "running":
            level = logging.WARNING if self.health.state == "degraded" else logging.INFO
            log.log(level, "health: %s", self.health.describe(), extra=fields(event="health"))

    # ------------------------------------------------------------------ cameras

    def cameras(self) -> dict:
        """Each camera's part of the status: its connection, fps, drops and events."""
        out = {}
        now = time.monotonic()
        for name, cam in self.d.cameras.items():
            st = cam.status()
            st["fps"] = round(self.d.counters.fps_done[name].rate(now), 2)
            st["dropped"] = self.d.hub.dropped.get(name, 0)
            st.update(self._camera_events(name, now))
            out[name] = st
        return out

    def _camera_events(self, name: str, now: float) -> dict:
        """``events_per_min`` (over the last 10 minutes) and ``last_event`` (ISO time or
        None) of one camera, for the status (Home Assistant's sensors)."""
        rate = self.d.counters.event_rates.get(name)
        at = self.d.counters.last_event_at.get(name)
        return {"events_per_min": round(rate.count(now) * 60.0 / rate.window, 2) if rate else 0.0,
                "last_event": iso_utc(at) if at else None}

    def stopped(self) -> dict:
        """The status parts that say the daemon stopped: no camera connected, no fps."""
        cams = {}
        for name, cam in self.d.cameras.items():
            st = {k: v for k, v in cam.status().items() if v is not None}
            cams[name] = dict(st, connected=False, stopped=True)
        return dict(self.health.document(), stopped=True, stopped_at=iso_utc(time.time()),
                    cameras=cams)

    def line(self) -> str:
        """The one line systemd shows (``STATUS=``): per camera fps, the last event, MQTT."""
        parts = []
        now = time.monotonic()
        counters = self.d.counters
        for name, cam in self.d.cameras.items():
            if cam.connected:
                parts.append(f"{name} {counters.fps_done[name].rate(now):.1f} fps")
            elif cam.finished:
                parts.append(f"{name} ended")
            else:
                parts.append(f"{name} down")
        if counters.last_event is not None:
            ev = counters.last_event
            age = time.time() - (counters.last_event_time or time.time())
            who = f" {ev.name}" if ev.name else ""
            parts.append(f"last event {ev.type}{who} {age:.0f}s ago")
        else:
            parts.append("no event yet")
        pub = self.d.publisher
        if pub is not None and pub.enabled:
            parts.append("mqtt " + ("up" if pub.connected else "down"))
        if self.health.state == "degraded":
            parts.insert(0, self.health.describe())
        return "; ".join(parts)


def _log_outcome(record: dict, result: str, what) -> None:
    """The journal line of one drop or swap outcome."""
    files = ", ".join(record.get("files") or [str(record.get("file"))])
    extra = fields(event="ota_" + result)
    if result == "swapped":
        old, new = record.get("old") or {}, record.get("new") or {}
        log.info("%s swap: %s in service in %.3f s (%s)", what, files, record.get("seconds", 0),
                 describe_change(old, new), extra=extra)
    elif result == "rejected":
        log.warning("%s drop refused: %s", what, record.get("why"), extra=extra)
    elif result == "rolled_back":
        log.error("%s rollback: %s", what, record.get("why"), extra=extra)
    elif result == "held_back":
        log.info("%s drop held back: %s: %s", what, files, record.get("why"), extra=extra)
    elif result == "confirmed":
        log.info("%s swap confirmed: %s (%s)", what, files, record.get("why"), extra=extra)
    else:
        log.info("%s drop %s: %s: %s", what, result.replace("_", " "), files,
                 record.get("why"), extra=extra)


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` in the blocks it already has (no new space needed):
    only when ``data`` is not longer than the file."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if len(data) > size:
            raise OSError(f"{len(data)} bytes do not fit in the {size} the file has")
        f.write(data + b" " * (size - len(data)))
        f.flush()
        os.fsync(f.fileno())
