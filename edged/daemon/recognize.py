"""What the track thread does with each frame: track -> embed -> match -> events.

The tracker of the frame's camera (edged.daemon.track) follows its faces and says which of them
to embed; those are embedded and matched against the gallery of the set the frame was leased
(edged.ota.modelset), and the tracker's events go to the events thread (edged.daemon.events)
with the versions of that set.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional

import cv2
import numpy as np

from edged.daemon.track import Refined, Tracker
from edged.logs import fields
from edged.ota import modelset
from edged.types import Event

log = logging.getLogger("edged.daemon")


class Recognizer:
    """The cameras' trackers and what one frame does to them (on the track thread).

    ``daemon``: the service, read for ``cfg`` (a reload replaces it), ``cameras``, ``service``,
    ``flow`` (the motion gates), ``counters`` and ``events`` (the events thread's queue)."""

    def __init__(self, daemon):
        self.d = daemon
        self.trackers: Dict[str, Tracker] = {}
        self.lock = threading.Lock()  # held by the track thread for each frame
        self.reconnects_seen: Dict[str, int] = {}
        self.versions_seen: Dict[str, dict] = {}  # per camera, the set its last frame went through

    def new_tracker(self, camera: str, cfg, svc) -> Tracker:
        keep = cfg.enrolment.faces_per_track if cfg.enrolment.keep_faces else 0
        return Tracker(camera, cfg.tracking, match_threshold=modelset.threshold(cfg, svc),
                       liveness=cfg.liveness, keep_faces=keep)

    def add_camera(self, name: str) -> None:
        self.trackers[name] = self.new_tracker(name, self.d.cfg, self.d.service)
        self.reconnects_seen[name] = 0

    def remove_camera(self, name: str, versions: dict) -> None:
        """A camera gone (a reload): its tracks end."""
        with self.lock:
            tracker = self.trackers.pop(name, None)
            self.d.events.put_all(tracker.end_all(why="camera removed") if tracker else [],
                                  versions)

    def restart_trackers(self, cfg, svc, why: str) -> None:
        """New trackers under ``cfg`` (a reload changed tracking, liveness or the threshold)."""
        with self.lock:
            for name in list(self.trackers):
                events = self.trackers[name].end_all(why=why)
                self.trackers[name] = self.new_tracker(name, cfg, svc)
                self.d.events.put_all(events, svc.versions)

    def end_all(self, why: str, versions: dict) -> None:
        for tr in self.trackers.values():
            self.d.events.put_all(tr.end_all(why=why), versions)

    def expire_tracks(self) -> None:
        """End the tracks of cameras that have sent no frame for ``tracking.max_gap`` seconds.

        Called by the track thread about once a second.  A camera whose source still delivers
        (its frames only wait for detection) is left alone.
        """
        gap = self.d.cfg.tracking.max_gap
        if not gap:
            return
        now = time.monotonic()
        with self.lock:
            for name, tracker in list(self.trackers.items()):
                cam = self.d.cameras.get(name)
                if cam is not None and cam.last_frame_monotonic is not None \
                        and now - cam.last_frame_monotonic <= gap:
                    continue
                events = tracker.expire(now)
                if events:
                    log.info("camera %s: no frames for %.1f s; %d track(s) ended", name,
                             gap, len(events), extra=fields(camera=name))
                self.d.events.put_all(events, self.versions_seen.get(name, {}))

    def process(self, frame, faces, svc) -> List[Event]:
        """One detected frame through track -> embed -> match; returns its events.

        ``faces`` is None when detection did not run on this frame (motion gating, or no
        live track between full detections), a :class:`Refined` list when only the live
        tracks were refined (``tracking.detect_every``).
        """
        tracker = self.trackers.get(frame.camera)
        if tracker is None:
            return []
        counters = self.d.counters
        if counters.first_frame_monotonic is None:
            counters.first_frame_monotonic = frame.monotonic
        tracker, events = self._tracker_for(frame, tracker, svc)
        t1 = time.perf_counter()
        evs, todo = tracker.update(frame, faces, refined=isinstance(faces, Refined))
        events += evs
        t2 = time.perf_counter()
        t4, failed = t2, False
        if todo:
            try:  # (a failure here loses no event of the tracker's update above)
                t4 = self._embed_and_match(frame, tracker, todo, svc, t2, events)
            except Exception as exc:
                failed = True
                counters.errors += 1
                svc.failures += 1
                svc.last_failure = f"embed/match: {type(exc).__name__}: {exc}"
                log.exception("camera %s frame %d: embedding or matching failed", frame.camera,
                              frame.index, extra=fields(camera=frame.camera))
                t4 = time.perf_counter()
        t5 = time.perf_counter()
        counters.stage["track"].add((t2 - t1) + (t5 - t4))
        counters.stage["frame"].add(time.monotonic() - frame.monotonic)
        counters.frame_done(frame.camera, faces, failed)
        for ev in events:
            ev.versions = dict(svc.versions)
            if self.d.cfg.mqtt.snapshots and ev.type in ("recognized", "unknown",
                                                         "spoof_suspected"):
                ev.snapshot = _snapshot(frame.image, ev.box)
            self.d.events.put(ev, frame.monotonic, frame.index)
        return events

    def _tracker_for(self, frame, tracker: Tracker, svc):
        """The camera's tracker for this frame, and the events of the tracks it ended: the
        first frame of a new connection ends the tracks of the old one (the frame says which
        connection it came from: frames of the old one still in flight keep them), and a
        swapped embedder ends them all (they hold the other embedder's embeddings, of another
        width perhaps, and its threshold differs)."""
        events: List[Event] = []
        if frame.connection != self.reconnects_seen.get(frame.camera, 0):
            self.reconnects_seen[frame.camera] = frame.connection
            events += tracker.reset("source reconnected")
            if frame.camera in self.d.flow.motion:  # (another scene, maybe: learn it again)
                self.d.flow.motion[frame.camera].reset()
        seen = self.versions_seen.get(frame.camera)
        if seen is not None and seen.get("embedder") != svc.versions.get("embedder"):
            events += tracker.end_all(why="embedder changed")
            tracker = self.trackers[frame.camera] = self.new_tracker(frame.camera, self.d.cfg,
                                                                     svc)
        self.versions_seen[frame.camera] = svc.versions
        return tracker, events

    def _embed_and_match(self, frame, tracker, todo, svc, t2: float, events: list) -> float:
        """Embed the faces the tracker asked for, match them, add the tracker's events to
        ``events``; return the time it ended."""
        counters = self.d.counters
        svc.pipeline.embed_faces([f for _, f in todo], only_passing=False, image=frame.image)
        t3 = time.perf_counter()
        counters.stage["embed"].add(t3 - t2)
        counters.faces_embedded += len(todo)
        svc.embeds += 1
        bad = [f for _, f in todo if f.embedding is not None
               and not (np.isfinite(f.embedding).all() and np.any(f.embedding))]
        if bad:  # a broken embedder: these faces are not matched; the set is failing
            for f in bad:
                f.embedding = None
            svc.failures += 1
            svc.last_failure = (f"embedder {str(svc.versions.get('embedder'))[:12]} gave "
                                f"non-finite or zero embeddings for {len(bad)} face(s)")
            log.error("camera %s frame %d: %s", frame.camera, frame.index,
                      svc.last_failure, extra=fields(camera=frame.camera))
        todo = [(tr, f) for tr, f in todo if f.embedding is not None]
        if not todo:
            return t3
        matches = svc.gallery.match(np.stack([f.embedding for _, f in todo]))
        t4 = time.perf_counter()
        counters.stage["match"].add(t4 - t3)
        events += tracker.observe(frame, todo, matches)
        return t4


def _snapshot(image, box) -> Optional[bytes]:
    """The JPEG of the face in ``box`` with a quarter of margin (``mqtt.snapshots``)."""
    if box is None:
        return None
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = 0.25 * (x2 - x1), 0.25 * (y2 - y1)
    x1, y1 = max(int(x1 - mx), 0), max(int(y1 - my), 0)
    x2, y2 = min(int(x2 + mx), w), min(int(y2 + my), h)
    if x2 <= x1 or y2 <= y1:
        return None
    ok, buf = cv2.imencode(".jpg", image[y1:y2, x1:x2], [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None
