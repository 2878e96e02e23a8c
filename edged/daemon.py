"""The daemon: cameras in, tracked recognitions out, run by systemd.

Threads (all named, so that ``top -H`` and the journal's THREAD_NAME say what is what):

- ``capture-<camera>``: one per camera (:mod:`edged.capture`), newest frame wins;
- ``pipeline``: takes the newest frame of each camera in turn, detects (every frame or every
  Nth), tracks (:mod:`edged.track`), embeds and matches the faces the tracker asks for, and
  queues the resulting events;
- ``events``: hands events to the MQTT publisher (which spools them) and logs them with their
  journal fields;
- the main thread: signals, the systemd notifications (``READY``, ``STATUS``, ``WATCHDOG``,
  ``RELOADING``, ``STOPPING``), status and stats.

What is in service is one reference, :attr:`Daemon.service`, a :class:`ServiceSet` holding the
face pipeline (models) and the gallery together.  The pipeline thread reads it once per frame,
so replacing it (:meth:`Daemon.swap_service`, used by SIGHUP reloads and by over-the-air drops)
takes effect between two frames and a frame is never processed half with one set and half
with the other.

``WATCHDOG=1`` is sent only when the pipeline finished a frame since the previous ping: a
stalled camera or a stuck pipeline stops the pings and systemd restarts the service.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from edged import __version__, config as configmod, modelstore
from edged.capture import Camera, FrameHub, preflight, quiet_opencv
from edged.logs import fields
from edged.sdnotify import Notifier
from edged.track import Tracker
from edged.types import Event

log = logging.getLogger("edged.daemon")

STATUS_EVERY_S = 5.0
EVENT_QUEUE = 10000


class StartupError(RuntimeError):
    """The daemon cannot start as configured; the message says why."""


@dataclasses.dataclass
class ServiceSet:
    """The models and the gallery in service, swapped together as one reference."""

    pipelines: list  # edged.pipeline.FacePipeline, one per detection worker, one shared embedder
    gallery: object  # edged.gallery.GalleryHolder
    versions: dict
    accelerators: dict
    since: float = dataclasses.field(default_factory=time.time)
    # how this set fares in service (for a rollback decision after a swap)
    frames: int = 0  # frames it took through detection and tracking
    failures: int = 0  # frames on which one of its stages raised

    @property
    def pipeline(self):
        """The pipeline whose embedder the track thread uses (all share it)."""
        return self.pipelines[0]


class RollingStats:
    """Counts and timings over the last ``window`` seconds, for fps and latency figures."""

    def __init__(self, window: float = 10.0, keep: int = 5000):
        self.window = window
        self.samples = deque(maxlen=keep)
        self.lock = threading.Lock()

    def add(self, value: float = 0.0, t: Optional[float] = None) -> None:
        with self.lock:
            self.samples.append((t if t is not None else time.monotonic(), value))

    def _recent(self, now: float):
        with self.lock:
            return [v for t, v in self.samples if now - t <= self.window]

    def rate(self, now: Optional[float] = None) -> float:
        now = now or time.monotonic()
        with self.lock:
            ts = [t for t, _ in self.samples if now - t <= self.window]
        if len(ts) < 2:
            return 0.0
        span = max(now - ts[0], 1e-6)
        return len(ts) / span

    def summary(self, now: Optional[float] = None, scale: float = 1000.0) -> dict:
        vals = self._recent(now or time.monotonic())
        if not vals:
            return {"n": 0}
        a = np.asarray(vals) * scale
        return {"n": len(vals), "per_s": round(len(vals) / self.window, 2),
                "median": round(float(np.median(a)), 2),
                "p90": round(float(np.percentile(a, 90)), 2),
                "p99": round(float(np.percentile(a, 99)), 2),
                "max": round(float(a.max()), 2)}


class Daemon:
    def __init__(self, cfg, config_path=None, models_dir=None, notifier: Optional[Notifier] = None,
                 exit_when_done: bool = False, events_out=None):
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.models_arg = models_dir
        self.notifier = notifier or Notifier()
        self.exit_when_done = exit_when_done
        self.events_out = events_out
        self.device = cfg.device.resolved_name()
        self.hub = FrameHub()
        self.cameras: Dict[str, Camera] = {}
        self.trackers: Dict[str, Tracker] = {}
        self.service: Optional[ServiceSet] = None
        self.publisher = None
        self.event_hooks: List[Callable[[Event, float], None]] = []
        self._events: "queue.Queue" = queue.Queue(EVENT_QUEUE)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._threads: List[threading.Thread] = []
        self._swap_lock = threading.Lock()
        self._track_lock = threading.Lock()  # held by the track thread for each frame
        # frames between the detection workers and the track thread, put back in order
        self._order = threading.Condition()
        self._next_seq: Dict[str, int] = {}
        self._tracked_seq: Dict[str, int] = {}
        self._detected: Dict[tuple, tuple] = {}
        self._in_flight = 0
        self.last_done_monotonic: Optional[float] = None
        self.first_frame_monotonic: Optional[float] = None  # capture time of the first frame
        self.first_done_monotonic: Optional[float] = None
        self.progress = 0  # frames through the pipeline (the watchdog's measure)
        self.last_event: Optional[Event] = None
        self.last_event_time: Optional[float] = None
        self.errors = 0
        self.started = time.time()
        self.ready = False
        self.status_text = "starting"
        self._reconnects_seen: Dict[str, int] = {}
        self._last_swap: Optional[dict] = None
        # stats
        self._read_marks: Dict[str, tuple] = {}
        self._cpu_mark: Optional[tuple] = None
        self.started_mono = time.monotonic()
        self.fps_done: Dict[str, RollingStats] = {}
        self.stage = {k: RollingStats() for k in ("detect", "embed", "match", "track", "frame")}
        self.latency = RollingStats()  # capture -> event handed to the publisher
        self.latencies_all: List[float] = []  # every capture-to-event latency (benchmarks)
        self.faces_embedded = 0
        self.frames_done_total = 0

    # ------------------------------------------------------------------ building blocks

    def models_dir(self) -> Path:
        return modelstore.resolve_models_dir(self.models_arg or self.cfg.paths.models_dir or None)

    def build_service(self, cfg) -> ServiceSet:
        """Load models and the gallery off the hot path; raise StartupError when impossible."""
        from edged.detect import MtcnnDetector
        from edged.embed import Embedder
        from edged.gallery import GalleryHolder
        from edged.pipeline import FacePipeline, PipelineSettings

        settings = PipelineSettings(detection=cfg.detection, quality=cfg.quality,
                                    flip=cfg.pipeline.flip)
        md = self.models_dir()
        try:
            # One detector per detection worker (interpreters are not thread-safe), one
            # embedder: only the track thread embeds.
            embedder = Embedder.from_models(md, cfg.models.embedder)
            pipes = [FacePipeline(MtcnnDetector.from_models(md, settings.detection,
                                                            cfg.models.detector),
                                  embedder, settings)
                     for _ in range(cfg.pipeline.workers)]
            pipe = pipes[0]
        except modelstore.ModelError as exc:
            raise StartupError(f"models: {exc}") from exc
        except Exception as exc:
            raise StartupError(f"models: cannot load the face pipeline: {exc}") from exc
        gpath = Path(cfg.paths.gallery)
        holder = GalleryHolder(gpath, expect_embedder=pipe.embedder_sha256, settings=cfg.match,
                               on_event=self._on_gallery_event,
                               snapshot_dir=str(Path(cfg.paths.state_dir) / "gallery-snapshots"))
        if not gpath.exists():
            log.warning("gallery %s does not exist yet: every face is unknown until it arrives "
                        "(build one with 'edged gallery build DIR -o %s')", gpath, gpath)
        holder.start()
        return ServiceSet(pipelines=pipes, gallery=holder, versions=self._versions(pipe, holder),
                          accelerators=self._accelerators(pipe))

    @staticmethod
    def _versions(pipe, holder) -> dict:
        det = getattr(pipe.detector, "sha256s", None) or {}
        g = holder.current
        return {"embedder": pipe.embedder_sha256,
                "detector": dict(det) if isinstance(det, dict) else det,
                "gallery": g.checksum if g is not None else None}

    @staticmethod
    def _accelerators(pipe) -> dict:
        """What each model actually runs on (after any fallback to the CPU)."""
        det, emb = pipe.detector, pipe.embedder
        out = {"detector": getattr(det, "delegate", "unknown"),
               "embedder": getattr(emb, "delegate", "unknown")}
        for name, obj in (("detector", det), ("embedder", getattr(emb, "runner", None))):
            why = getattr(obj, "fallback_reason", None)
            if why:
                out[name + "_fallback"] = why
        return out

    def people(self, svc: Optional[ServiceSet] = None) -> List[str]:
        svc = svc or self.service
        g = svc.gallery.current if svc else None
        if g is None:
            return []
        try:
            ids = g.identities
            return sorted({name for _, name in (ids() if callable(ids) else ids)})
        except Exception:
            return []

    def _on_gallery_event(self, ev) -> None:
        """The gallery holder reports a swap or a rejection (from its watcher thread)."""
        d = ev.as_dict() if hasattr(ev, "as_dict") else {"event": str(ev)}
        ok = bool(d.get("accepted", True))
        # edged.hotswap logs the swap itself; this line adds the journal field
        log.debug("gallery swap event: %s", ev, extra=fields(event="gallery_swap"))
        self._last_swap = d
        svc = self.service
        if svc is not None:
            svc.versions = dict(svc.versions, gallery=svc.gallery.version())
            if self.publisher is not None:
                self.publisher.set_people(self.people(svc))
                parts = {"versions": svc.versions, "last_swap": d}
                if not ok:
                    parts["last_rejected"] = d
                self.publisher.update_status(**parts)

    def swap_service(self, new: ServiceSet) -> ServiceSet:
        """Put ``new`` in service between two frames; return the old set (to be closed)."""
        with self._swap_lock:
            old, self.service = self.service, new
        if self.publisher is not None:
            self.publisher.set_people(self.people(new))
            self.publisher.update_status(versions=new.versions, accelerators=new.accelerators)
        return old

    # ------------------------------------------------------------------ start

    def start(self, camera_wait: float = 20.0) -> None:
        cfg = self.cfg
        quiet_opencv()
        for cam in cfg.cameras:
            why = preflight(cam)
            if why:
                raise StartupError(why)
        state = Path(cfg.paths.state_dir)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"paths.state_dir: cannot create {state}: {exc}") from exc
        t0 = time.monotonic()
        self.service = self.build_service(cfg)
        log.info("models loaded in %.2f s: embedder %s, gallery %s (%d people)",
                 time.monotonic() - t0, self.service.versions["embedder"][:12],
                 (self.service.versions.get("gallery") or "none")[:12], len(self.people()))
        from edged.publish import Publisher

        try:
            self.publisher = Publisher(cfg.mqtt, self.device, state, people=self.people())
        except (ValueError, OSError) as exc:  # a setting that can never work (names the key)
            self.service.gallery.stop()
            raise StartupError(str(exc)) from exc
        self.publisher.update_status(versions=self.service.versions,
                                     accelerators=self.service.accelerators,
                                     cameras={c.name: {"connected": False} for c in cfg.cameras},
                                     config=str(self.config_path) if self.config_path else None)
        self.publisher.start()
        for cs in cfg.cameras:
            self._add_camera(cs)
        deadline = time.monotonic() + camera_wait
        for cam in self.cameras.values():
            left = deadline - time.monotonic()
            if not cam.first_frame.wait(max(left, 0.0)):
                log.warning("camera %s: no frame after %.0f s; starting anyway, it keeps "
                            "reconnecting (%s)", cam.name, camera_wait, cam.last_error,
                            extra=fields(camera=cam.name))
        self.warm_up(self.service)
        self._spawn("events", self._events_loop)
        self._spawn("track", self._track_loop)
        for i in range(len(self.service.pipelines)):
            self._spawn(f"detect-{i}", lambda i=i: self._detect_loop(i))
        self.ready = True
        self.status_text = self._status_line()
        self.notifier.ready(self.status_text)
        log.info("edged %s ready: device %s, %d camera(s)", __version__, self.device,
                 len(self.cameras))

    def warm_up(self, svc: ServiceSet) -> None:
        """Run every interpreter once at the cameras' frame sizes (before READY / a swap), so
        that the first real frames do not pay for building the P-Net pyramid interpreters."""
        t0 = time.monotonic()
        shapes = {tuple(c.resolution) for c in self.cameras.values() if c.resolution}
        for w, h in sorted(shapes):
            img = np.zeros((h, w, 3), np.uint8)
            for p in svc.pipelines:
                p.detect(img)
        svc.pipeline.embedder.embed([np.zeros((112, 112, 3), np.uint8)], flip=svc.pipeline.settings.flip)
        log.debug("warm-up in %.2f s for %s", time.monotonic() - t0, sorted(shapes))

    def _add_camera(self, cs) -> None:
        self.trackers[cs.name] = Tracker(cs.name, self.cfg.tracking, match_threshold=self.cfg.match.threshold)
        self.fps_done.setdefault(cs.name, RollingStats())
        cam = Camera(cs, self.hub)
        self.cameras[cs.name] = cam
        self._reconnects_seen[cs.name] = 0
        cam.start()

    def _spawn(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # ------------------------------------------------------------------ the pipeline thread

    def _detect_loop(self, worker: int) -> None:
        """A detection worker: newest frame -> faces (boxes, landmarks, aligned, quality)."""
        while not self._stop.is_set():
            frame = self.hub.take(timeout=0.2)
            if frame is None:
                continue
            with self._order:
                seq = self._next_seq.get(frame.camera, 0)
                self._next_seq[frame.camera] = seq + 1
                svc = self.service  # read once: the whole frame goes through one set
                self._in_flight += 1
            faces, dt = None, 0.0
            if seq % self.cfg.tracking.detect_every == 0:
                t0 = time.perf_counter()
                try:
                    pipes = svc.pipelines
                    faces = pipes[worker % len(pipes)].detect(frame.image)
                except Exception:
                    self.errors += 1
                    svc.failures += 1
                    log.exception("detect: frame %d of camera %s failed", frame.index,
                                  frame.camera, extra=fields(camera=frame.camera))
                    faces = []
                dt = time.perf_counter() - t0
                self.stage["detect"].add(dt)
            with self._order:
                self._detected[(frame.camera, seq)] = (frame, faces, svc)
                self._order.notify_all()

    def _track_loop(self) -> None:
        """Frames in capture order per camera: track, embed, match, make events."""
        while True:
            with self._order:
                item = None
                while item is None:
                    for cam, seq in self._tracked_seq.items():
                        item = self._detected.pop((cam, seq), None)
                        if item is not None:
                            self._tracked_seq[cam] = seq + 1
                            break
                    if item is None:
                        new = [cam for (cam, _) in self._detected if cam not in self._tracked_seq]
                        if new:
                            self._tracked_seq[new[0]] = 0  # sequence numbers start at 0
                            continue
                        if self._stop.is_set() and not self._in_flight:
                            return
                        self._order.wait(0.2)
            frame, faces, svc = item
            try:
                with self._track_lock:
                    self.process(frame, faces, svc)
                svc.frames += 1
            except Exception:
                self.errors += 1
                svc.failures += 1
                log.exception("track: frame %d of camera %s failed", frame.index, frame.camera,
                              extra=fields(camera=frame.camera))
            finally:
                with self._order:
                    self._in_flight -= 1

    def process(self, frame, faces, svc) -> List[Event]:
        """One detected frame through track -> embed -> match; returns its events.

        ``faces`` is None when detection did not run on this frame (``detect_every``).
        """
        tracker = self.trackers.get(frame.camera)
        if tracker is None:
            return []
        if self.first_frame_monotonic is None:
            self.first_frame_monotonic = frame.monotonic
        events: List[Event] = []
        cam = self.cameras.get(frame.camera)
        if cam is not None and cam.reconnects != self._reconnects_seen.get(frame.camera, 0):
            self._reconnects_seen[frame.camera] = cam.reconnects
            events += tracker.reset("source reconnected")
        t1 = time.perf_counter()
        evs, todo = tracker.update(frame, faces)
        events += evs
        t2 = time.perf_counter()
        if todo:
            svc.pipeline.embed_faces([f for _, f in todo], only_passing=False)
            t3 = time.perf_counter()
            self.stage["embed"].add(t3 - t2)
            self.faces_embedded += len(todo)
            todo = [(tr, f) for tr, f in todo if f.embedding is not None]
            if todo:
                matches = svc.gallery.match(np.stack([f.embedding for _, f in todo]))
                t4 = time.perf_counter()
                self.stage["match"].add(t4 - t3)
                events += tracker.observe(frame, todo, matches)
            else:
                t4 = t3
        else:
            t4 = t2
        t5 = time.perf_counter()
        self.stage["track"].add((t2 - t1) + (t5 - t4))
        now = time.monotonic()
        self.stage["frame"].add(now - frame.monotonic)
        self.fps_done[frame.camera].add(t=now)
        self.frames_done_total += 1
        self.last_done_monotonic = now
        if self.first_done_monotonic is None:
            self.first_done_monotonic = now
        self.progress += 1
        for ev in events:
            ev.versions = dict(svc.versions)
            if self.cfg.mqtt.snapshots and ev.type in ("recognized", "unknown"):
                ev.snapshot = _snapshot(frame.image, ev.box)
            self._events.put((ev, frame.monotonic, frame.index))
        return events

    # ------------------------------------------------------------------ the events thread

    def _events_loop(self) -> None:
        while True:
            try:
                item = self._events.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() and self._events_done:
                    return
                continue
            if item is None:
                return
            ev, captured, frame_index = item
            try:
                if self.publisher is not None:
                    self.publisher.publish_event(ev)
            except Exception:
                log.exception("publisher: event %s failed", ev.id)
            lat = time.monotonic() - captured
            self.latency.add(lat)
            self.latencies_all.append(lat)
            self.last_event, self.last_event_time = ev, time.time()
            self._log_event(ev)
            if self.events_out is not None:
                self._write_event(ev, lat, frame_index)
            for hook in list(self.event_hooks):
                try:
                    hook(ev, lat)
                except Exception:
                    log.exception("event hook failed")

    _events_done = False

    def _log_event(self, ev: Event) -> None:
        f = fields(camera=ev.camera, person=ev.name, event=ev.type, track=ev.track_id,
                   identity=ev.identity)
        if ev.type == "recognized":
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

    def _write_event(self, ev: Event, latency: float, frame_index=None) -> None:
        d = {k: v for k, v in dataclasses.asdict(ev).items() if k != "snapshot"}
        d["latency_s"] = round(latency, 4)
        d["frame_index"] = frame_index
        line = json.dumps(d, default=str) + "\n"
        with open(self.events_out, "a", encoding="utf-8") as f:
            f.write(line)

    # ------------------------------------------------------------------ main loop

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def run(self) -> int:
        """The main loop until SIGTERM (or, with exit_when_done, until every file ended)."""
        wd = self.notifier.watchdog_interval()
        ping_every = wd / 2.0 if wd else None
        last_ping = time.monotonic()
        last_progress = self.progress
        last_status = 0.0
        last_stats = time.monotonic()
        stats_every = float(getattr(self.cfg.mqtt, "stats_interval_s", 30.0))
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            for cam in self.cameras.values():
                cam.check()
            if ping_every and now - last_ping >= ping_every:
                if self.progress != last_progress:
                    self.notifier.watchdog()
                    last_progress = self.progress
                last_ping = now
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                self.status_text = self._status_line()
                self.notifier.status(self.status_text)
                if self.publisher is not None:
                    self.publisher.update_status(cameras=self.camera_status())
            if now - last_stats >= stats_every:
                last_stats = now
                if self.publisher is not None:
                    self.publisher.publish_stats(self.stats())
            if self.exit_when_done and self._all_done():
                log.info("every source has ended; stopping")
                break
        return self.stop()

    def _all_done(self) -> bool:
        if not all(c.finished for c in self.cameras.values()):
            return False
        # the last frames may still be in the hub or in the pipeline
        delivered = sum(c.frames_delivered for c in self.cameras.values())
        dropped = sum(self.hub.dropped.values())
        return self.hub.empty() and self.frames_done_total >= delivered - dropped

    def stop(self, timeout: float = 5.0) -> int:
        """Stop everything within a few seconds; flush the trackers' last events."""
        self.notifier.stopping("stopping")
        log.info("stopping")
        t0 = time.monotonic()
        self._stop.set()
        for cam in self.cameras.values():
            cam._stop.set()
        self.hub.close()
        for cam in self.cameras.values():
            if not cam.stop(timeout=2.0):
                log.warning("camera %s: capture thread did not stop in time (blocked in a read)",
                            cam.name, extra=fields(camera=cam.name))
        for t in self._threads:
            if t.name.startswith("detect-") or t.name == "track":
                t.join(timeout)
        for tr in self.trackers.values():
            for ev in tr.end_all(why="stop"):
                if self.service:
                    ev.versions = dict(self.service.versions)
                self._events.put((ev, time.monotonic(), None))
        self._events_done = True
        self._events.put(None)
        for t in self._threads:
            if t.name == "events":
                t.join(timeout)
        if self.publisher is not None:
            self.publisher.stop(clean=True)
        if self.service is not None:
            self.service.gallery.stop()
        alive = [t.name for t in threading.enumerate()
                 if t.name.startswith(("capture-", "detect-", "track", "events")) and t.is_alive()]
        log.info("stopped in %.2f s%s", time.monotonic() - t0,
                 f" (still running: {', '.join(alive)})" if alive else "")
        self.notifier.close()
        return 0

    # ------------------------------------------------------------------ reload (SIGHUP)

    def reload(self) -> bool:
        """Re-read the configuration, the gallery and the models; keep the old set on error."""
        self.notifier.reloading("reloading configuration, gallery and models")
        log.info("reloading (SIGHUP)")
        cfg = self.cfg
        try:
            if self.config_path is not None:
                cfg = configmod.load(self.config_path)
                configmod.resolve_paths(cfg)
            new = self.build_service(cfg)
            self.warm_up(new)
        except (configmod.ConfigError, StartupError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready(f"reload failed: {str(exc).splitlines()[0]}")
            return False
        old = self.swap_service(new)
        if old is not None and old.gallery is not new.gallery:
            old.gallery.stop()
        if cfg.tracking != self.cfg.tracking or cfg.match.threshold != self.cfg.match.threshold:
            with self._track_lock:
                for name in list(self.trackers):
                    events = self.trackers[name].end_all(why="reload")
                    self.trackers[name] = Tracker(name, cfg.tracking,
                                                  match_threshold=cfg.match.threshold)
                    for ev in events:
                        ev.versions = dict(new.versions)
                        self._events.put((ev, time.monotonic(), None))
        old_cams = {c.name: c for c in self.cfg.cameras}
        new_cams = {c.name: c for c in cfg.cameras}
        if cfg.mqtt != self.cfg.mqtt:
            log.warning("reload: MQTT settings changed; they take effect at the next restart")
        self.cfg = dataclasses.replace(cfg, mqtt=self.cfg.mqtt)
        for name, cs in old_cams.items():
            if new_cams.get(name) != cs:
                cam = self.cameras.pop(name)
                cam.stop()
                self.hub.discard(name)
                with self._track_lock:
                    tracker = self.trackers.pop(name)
                    for ev in tracker.end_all(why="camera removed"):
                        ev.versions = dict(new.versions)
                        self._events.put((ev, time.monotonic(), None))
        for name, cs in new_cams.items():
            if name not in self.cameras:
                why = preflight(cs)
                if why:
                    log.error("reload: %s", why)
                    continue
                self._add_camera(cs)
        self.status_text = self._status_line()
        self.notifier.ready(self.status_text)
        log.info("reloaded: embedder %s, gallery %s", new.versions["embedder"][:12],
                 (new.versions.get("gallery") or "none")[:12])
        return True

    # ------------------------------------------------------------------ status and stats

    def camera_status(self) -> dict:
        out = {}
        now = time.monotonic()
        for name, cam in self.cameras.items():
            st = cam.status()
            st["fps"] = round(self.fps_done[name].rate(now), 2)
            st["dropped"] = self.hub.dropped.get(name, 0)
            out[name] = st
        return out

    def _status_line(self) -> str:
        parts = []
        now = time.monotonic()
        for name, cam in self.cameras.items():
            if cam.connected:
                parts.append(f"{name} {self.fps_done[name].rate(now):.1f} fps")
            elif cam.finished:
                parts.append(f"{name} ended")
            else:
                parts.append(f"{name} down")
        if self.last_event is not None:
            ev = self.last_event
            age = time.time() - (self.last_event_time or time.time())
            who = f" {ev.name}" if ev.name else ""
            parts.append(f"last event {ev.type}{who} {age:.0f}s ago")
        else:
            parts.append("no event yet")
        if self.publisher is not None and self.publisher.enabled:
            parts.append("mqtt " + ("up" if self.publisher.connected else "down"))
        return "; ".join(parts)

    def _read_rate(self, name: str, now: float) -> float:
        """Frames per second read from the camera since the previous call."""
        n = self.cameras[name].frames_read
        t0, n0 = self._read_marks.get(name, (self.started_mono, 0))
        self._read_marks[name] = (now, n)
        return round((n - n0) / max(now - t0, 1e-6), 2)

    def _cpu_percent(self, now: float) -> float:
        """CPU used by the process since the previous call, in % of one core."""
        cpu = sum(os.times()[:2])
        t0, c0 = self._cpu_mark or (self.started_mono, 0.0)
        self._cpu_mark = (now, cpu)
        return round(100.0 * (cpu - c0) / max(now - t0, 1e-6), 1)

    def stats(self) -> dict:
        now = time.monotonic()
        return {
            "cameras": {name: {"fps_in": self._read_rate(name, now),
                               "fps": round(self.fps_done[name].rate(now), 2),
                               "frames": self.cameras[name].frames_read,
                               "dropped": self.hub.dropped.get(name, 0),
                               "connected": self.cameras[name].connected,
                               "reconnects": self.cameras[name].reconnects}
                        for name in self.cameras},
            "stages_ms": {k: v.summary(now) for k, v in self.stage.items()},
            "latency_ms": self.latency.summary(now),
            "queue_depth": self._events.qsize(),
            "faces_embedded": self.faces_embedded,
            "errors": self.errors,
            "cpu_s": round(sum(os.times()[:2]), 2),
            "cpu_percent": self._cpu_percent(now),
            "rss_mb": _rss_mb(),
        }


def _snapshot(image, box) -> Optional[bytes]:
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


def _rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
