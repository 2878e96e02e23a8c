"""Enrolment commands over MQTT (``enrolment.mqtt_commands``, docs/enrolment.md).

The publisher hands each message of ``<prefix>/command/enrol`` and ``.../enrol_name`` here on
paho's network thread; an enrol command waits in a small bounded queue for the ``commands``
thread, which enrols the kept track (edged.enrolment.enrol: the guard, then the gallery file
written atomically, which the drop watcher hot-swaps) and reports the outcome on
``<prefix>/command/result`` and in the journal. A name alone (Home Assistant's text entity) is
kept for the next enrol command that has none (the button).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Optional

import cv2

from edged.logs import fields
from edged.publish.payloads import iso_utc

log = logging.getLogger("edged.daemon")

QUEUE = 16
MAX_NAME = 64
LAST_UNKNOWN = "last_unknown"


class EnrolCommands:
    """The commands thread, and what Home Assistant's entities show (the name, the last
    unknown face).  ``daemon``: the service, read for ``cfg``, ``kept`` (the kept tracks) and
    ``publisher``."""

    def __init__(self, daemon):
        self.d = daemon
        self.queue: "queue.Queue" = queue.Queue(QUEUE)
        self.pending_name: Optional[str] = None  # Home Assistant's text entity
        self.last_unknown: Optional[str] = None  # the newest kept unknown track's id
        self._thread: Optional[threading.Thread] = None

    # -- from the MQTT thread (never blocks)

    def submit(self, kind: str, payload: bytes) -> None:
        if kind == "enrol_name":
            name = payload.decode("utf-8", "replace").strip()[:MAX_NAME]
            self.pending_name = name or None
            if self.d.publisher is not None:
                self.d.publisher.publish_enrol_name(name)
            return
        try:
            self.queue.put_nowait(payload)
        except queue.Full:
            self._report({"command": "enrol", "ok": False,
                          "error": f"busy: {QUEUE} enrol commands are waiting; try again"})

    # -- the kept tracks (events thread)

    def note_kept(self, track) -> None:
        """A track was kept: the newest unknown one is what the button enrols (and its best
        crop what the image entity shows, with mqtt.snapshots)."""
        if track.outcome != "unknown":
            return
        self.last_unknown = track.id
        pub = self.d.publisher
        if pub is not None and pub.settings.snapshots and track.faces:
            best = max(track.faces, key=lambda f: f.quality)
            ok, buf = cv2.imencode(".jpg", best.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if ok:
                pub.publish_last_unknown(buf.tobytes())

    # -- the commands thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self.queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            payload = self.queue.get()
            if payload is None:
                return
            try:
                self._report(self.enrol(payload))
            except Exception as exc:  # a bad command never ends the thread
                log.exception("enrol command failed")
                self._report({"command": "enrol", "ok": False, "error": f"internal: {exc}"})

    def enrol(self, payload: bytes) -> dict:
        """One enrol command; its outcome (``ok``, and ``error`` or ``refused`` or the result)."""
        from edged.enrolment.enrol import EnrolmentRefused, enrol_track
        from edged.enrolment.store import TrackNotFound
        from edged.gallery import GalleryError

        try:
            doc = json.loads(payload.decode("utf-8") or "{}")
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            return _fail(None, None, 'the payload is not JSON {"track": ID, "name": NAME}')
        track_id, name = str(doc.get("track") or LAST_UNKNOWN), doc.get("name") or self.pending_name
        if track_id == LAST_UNKNOWN:
            track_id = self.last_unknown or self._newest_unknown()
            if track_id is None:
                return _fail(None, name, "no unknown face has been kept yet")
        if not name or not str(name).strip():
            return _fail(track_id, None, 'no name: set "Name to enrol" or send {"name": NAME}')
        store = self.d.kept
        if store is None:
            return _fail(track_id, name, "enrolment.keep_faces is off: no track is kept")
        cfg = self.d.cfg
        try:
            track = store.find(track_id)
            res = enrol_track(track, cfg.paths.gallery, str(name).strip(),
                              force=bool(doc.get("force")), threshold=cfg.match.threshold)
        except TrackNotFound as exc:
            return _fail(track_id, name, str(exc))
        except EnrolmentRefused as exc:
            out = _fail(track_id, name, "refused")
            out["refused"] = [{"code": r.code, "reason": str(r)} for r in exc.reasons]
            return out
        except (GalleryError, OSError) as exc:
            return _fail(track_id, name, f"{cfg.paths.gallery}: {exc}")
        if track_id == self.last_unknown:
            self.last_unknown = None
        return {"command": "enrol", "ok": True, "track": track.id, "name": res["name"],
                "identity": res["identity"], "new": res["new"], "rows_added": res["rows_added"],
                "warnings": [str(w) for w in res.get("warnings") or []],
                "checksum": res["checksum"]}

    def _newest_unknown(self) -> Optional[str]:
        store = self.d.kept
        unknown = store.list(unknown_only=True) if store is not None else []
        return unknown[0].id if unknown else None

    def _report(self, out: dict) -> None:
        out["time"] = iso_utc(time.time())
        if out.get("ok"):
            log.info("enrol command: %s enrolled as %s (%d row(s))", out["track"], out["name"],
                     out["rows_added"], extra=fields(event="enrol_command", person=out["name"]))
        else:
            why = out.get("error")
            if out.get("refused"):
                why = "refused: " + " ".join(r["reason"] for r in out["refused"])
            log.warning("enrol command refused for track %s: %s", out.get("track"), why,
                        extra=fields(event="enrol_command"))
        if self.d.publisher is not None:
            self.d.publisher.publish_result(out)


def _fail(track, name, error: str) -> dict:
    return {"command": "enrol", "ok": False, "track": track, "name": name, "error": error}
