"""The daemon: cameras in, tracked recognitions out, run by systemd.

Threads (all named, so that ``top -H`` and the journal's THREAD_NAME say what is what):

- ``capture-<camera>``: one per camera (:mod:`edged.daemon.capture`), newest frame wins;
- ``pipeline``: takes the newest frame of each camera in turn, detects (every frame or every
  Nth), tracks (:mod:`edged.daemon.track`), embeds and matches the faces the tracker asks for, and
  queues the resulting events;
- ``events``: hands events to the MQTT publisher (which spools them) and logs them with their
  journal fields;
- ``http``: the /metrics and /healthz endpoint when ``http.listen`` is set
  (:mod:`edged.publish.http`), with one ``http-request`` thread per request; it only reads;
- the main thread: signals, the systemd notifications (``READY``, ``STATUS``, ``WATCHDOG``,
  ``RELOADING``, ``STOPPING``), status and stats.

What is in service is one reference, :attr:`Daemon.service`, a :class:`ServiceSet` holding the
face pipeline (models) and the gallery together, kept by a :class:`edged.ota.hotswap.SwapHolder`
(``keep_previous``: the set replaced is kept until the new one is confirmed, for a rollback).
The pipeline thread reads it once per frame, so replacing it (:meth:`Daemon.swap_service`, used
by SIGHUP reloads and by over-the-air drops, :mod:`edged.ota`) takes effect between two frames
and a frame is never processed half with one set and half with the other.

The status document (versions, accelerators, cameras, the last swap and the last refused
drop, see docs/mqtt.md) is published retained over MQTT and also written atomically to
``<state_dir>/status.json``, which ``edged status`` reads.

``WATCHDOG=1`` is sent only when the pipeline finished a frame since the previous ping: a
stalled camera or a stuck pipeline stops the pings and systemd restarts the service.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from edged import __version__, config as configmod

from edged.runtime import modelstore
from edged.ota.hotswap import SwapHolder
from edged.daemon.capture import Camera, FrameHub, preflight, quiet_opencv
from edged.daemon.health import Health, camera_down, stuck_after
from edged.logs import Throttle, fields
from edged.publish.metrics import LATENCY_BUCKETS, STAGE_BUCKETS, STAGES, Histogram
from edged.vision.motion import MotionGate
from edged.daemon.sdnotify import Notifier
from edged.daemon.track import Refined, Tracker
from edged.types import Event

log = logging.getLogger("edged.daemon")

STATUS_EVERY_S = 5.0
STATE_DIR_MODE = 0o750  # paths.state_dir when edged creates it (less a stricter umask)
HEALTH_EVERY_S = 1.0  # how often the main loop looks at the spool and the status file
EVENT_QUEUE = 10000
STATUS_FILE = "status.json"
STATUS_SLACK = 1024  # room kept in status.json's blocks for a longer document (a full disk)
#: test hook: append one line per frame tracked ("camera index monotonic") to this file
FRAME_LOG_ENV = "EDGED_FRAME_LOG"


#: what :meth:`Daemon._what_to_detect` answers for a full detection (the P-Net pyramid)
FULL = "full"


class StartupError(RuntimeError):
    """The daemon cannot start as configured; the message says why.  ``config``: a setting
    that can never work here, which restarting does not change (``edged run`` exits 78)."""

    def __init__(self, message: str, config: bool = False):
        super().__init__(message)
        self.config = config


@dataclasses.dataclass
class ServiceSet:
    """The models and the gallery in service, swapped together as one reference."""

    pipelines: list  # edged.vision.pipeline.FacePipeline, one per detection worker, one shared embedder
    gallery: object  # edged.gallery.GalleryHolder
    versions: dict
    accelerators: dict
    since: float = dataclasses.field(default_factory=time.time)
    # role -> edged.ota.drops.ModelBlob: the verified bytes of every model in this set
    models: dict = dataclasses.field(default_factory=dict)
    # the models of ``models`` read from the models directory (the installed ones)
    installed: list = dataclasses.field(default_factory=list)
    # how this set fares in service (for a rollback decision after a swap)
    frames: int = 0  # frames it took through detection and tracking
    failures: int = 0  # frames on which one of its stages raised or gave non-finite output
    embeds: int = 0  # embedder calls on its frames
    last_failure: str = ""

    @property
    def pipeline(self):
        """The pipeline whose embedder the track thread uses (all share it)."""
        return self.pipelines[0]


class RollingStats:
    """Counts and timings over the last ``window`` seconds, for fps and latency figures."""

    def __init__(self, window: float = 10.0, keep: int = 5000,
                 histogram: Optional[Histogram] = None):
        self.window = window
        self.samples = deque(maxlen=keep)
        self.lock = threading.Lock()
        self.histogram = histogram  # every value, cumulated since start (edged.publish.metrics)

    def add(self, value: float = 0.0, t: Optional[float] = None) -> None:
        with self.lock:
            self.samples.append((t if t is not None else time.monotonic(), value))
        if self.histogram is not None:
            self.histogram.observe(value)

    def count(self, now: Optional[float] = None) -> int:
        """Samples in the last ``window`` seconds."""
        return len(self._recent(now or time.monotonic()))

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
        self.motion: Dict[str, MotionGate] = {}  # per camera (edged.vision.motion)
        # the set in service (models and gallery), swapped between two frames; the set it
        # replaced is kept until the new one is confirmed (edged.ota) or released (SIGHUP)
        self.models_holder: SwapHolder = SwapHolder(
            "models", None, loader=None, version=_set_version, closer=self._close_set,
            watch=False, keep_previous=True)
        self.ota = None  # edged.ota.drops.DropManager once started
        self.publisher = None
        self._status_doc: dict = {}  # what the daemon put in the status (mirrors the publisher)
        self._status_dirty = False
        self._status_lock = threading.Lock()
        self.health = Health()
        self._status_file_problem: Optional[str] = None
        self._status_file_log = Throttle(log)
        self.drop_counts = {"handled": 0, "swapped": 0, "held_back": 0, "rejected": 0,
                            "rolled_back": 0, "unchanged": 0, "waiting": 0}
        self._frame_log = None
        if os.environ.get(FRAME_LOG_ENV):
            self._frame_log = open(os.environ[FRAME_LOG_ENV], "a", buffering=1)
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
        self._versions_seen: Dict[str, dict] = {}  # per camera, the set its last frame went through
        self._last_swap: Optional[dict] = None
        # stats
        self._read_marks: Dict[str, tuple] = {}
        self._cpu_mark: Optional[tuple] = None
        self.started_mono = time.monotonic()
        self.fps_done: Dict[str, RollingStats] = {}
        # (capture: from the camera to a detection worker; publish: an event to the publisher)
        self.stage = {k: RollingStats(histogram=Histogram(STAGE_BUCKETS)) for k in STAGES}
        self.stage["frame"] = RollingStats()
        # capture -> event handed to the publisher
        self.latency = RollingStats(histogram=Histogram(LATENCY_BUCKETS))
        # counters for the metrics (edged.publish.metrics), each written by one thread
        self.frames_by_camera: Dict[str, int] = {}  # frames tracked (track thread)
        self.faces_detected: Dict[str, int] = {}  # (track thread)
        self.event_counts: Dict[tuple, int] = {}  # (camera, type) -> events (events thread)
        self.last_event_at: Dict[str, float] = {}  # camera -> epoch of its last event
        self.event_rates: Dict[str, RollingStats] = {}  # camera -> events of the last 10 min
        self.drop_outcomes: Dict[tuple, int] = {}  # (kind, outcome) -> drops and swaps
        self._camera_since: Dict[str, float] = {}  # camera -> when it was started (monotonic)
        self.http = None  # edged.publish.http.HttpEndpoint while http.listen is set
        # the last capture-to-event latencies (tools/bench_daemon.py); bounded: the daemon
        # runs for months
        self.latencies_all: "deque[float]" = deque(maxlen=100_000)
        self.faces_embedded = 0
        self.frames_done_total = 0

    @property
    def service(self) -> Optional[ServiceSet]:
        return self.models_holder.current

    @service.setter
    def service(self, svc: Optional[ServiceSet]) -> None:
        if svc is None:
            self.models_holder.stop(close=False)
        else:
            first = self.models_holder.current is None
            self.swap_service(svc, trigger="start" if first else "reload")
            self.models_holder.release_previous()

    # ------------------------------------------------------------------ building blocks

    def models_dir(self) -> Path:
        return modelstore.resolve_models_dir(self.models_arg or self.cfg.paths.models_dir or None)

    def build_service(self, cfg) -> ServiceSet:
        """Load models and the gallery off the hot path; raise StartupError when impossible."""
        from edged.vision.embed import Embedder
        from edged.vision.liveness import LivenessStage
        from edged.vision.pipeline import FacePipeline, PipelineSettings

        from edged.ota.drops import ModelBlob

        settings = PipelineSettings(detection=cfg.detection, quality=cfg.quality,
                                    liveness=cfg.liveness, flip=cfg.pipeline.flip,
                                    detect_width=cfg.pipeline.detect_width)
        from edged.ota.drops import load_in_service, load_installed_copy

        md = self.models_dir()
        try:
            models = {}
            try:  # the models last in service (over-the-air drops), when kept
                models = load_in_service(cfg.paths.state_dir) or {}
                if models:
                    log.info("models: the set last in service, from %s/models (drops)",
                             cfg.paths.state_dir)
            except modelstore.ModelError as exc:
                log.warning("models: the set last in service cannot be used (%s); loading the "
                            "installed models", exc)
            installed = []
            for role in ("pnet", "rnet", "onet", "embedder"):
                if role not in models:
                    try:
                        data, digest, path = modelstore.read_verified(
                            role, md, name=cfg.models.model_name(role))
                    except modelstore.ModelError as exc:
                        # an installed file replaced by a drop that was not confirmed (the
                        # drop directory is the models directory by default): the copy kept
                        # at an earlier start, if it is the model the manifest names
                        copy = load_installed_copy(
                            cfg.paths.state_dir, role, modelstore.Manifest.load().model(
                                role, cfg.models.model_name(role)).load_sha256)
                        if copy is None:
                            raise
                        log.error("models: %s; loading the copy of the installed model kept at "
                                  "%s (run 'edged models install' to restore the file)", exc,
                                  copy.file)
                        models[role] = copy
                        installed.append(copy)  # (kept: the next start may need it again)
                        continue
                    models[role] = ModelBlob(role, data, digest, str(path))
                    installed.append(models[role])
            # One detector per detection worker (interpreters are not thread-safe), one
            # embedder: only the track thread embeds.
            emb = models["embedder"]
            embedder = Embedder(emb.data, emb.sha256, cfg.models.embedder)
            live = LivenessStage.for_settings(cfg.liveness, md)  # None when off
            pipes = [FacePipeline(self._detector(models, settings, cfg), embedder, settings, live)
                     for _ in range(cfg.pipeline.workers)]
            pipe = pipes[0]
        except modelstore.ModelError as exc:
            raise StartupError(f"models: {exc}") from exc
        except Exception as exc:
            raise StartupError(f"models: cannot load the face pipeline: {exc}") from exc
        gpath = Path(cfg.paths.gallery)
        holder = self.new_gallery_holder(pipe.embedder_sha256, cfg)
        holder.holder.on_event = self.gallery_event_handler(holder)
        if not gpath.exists():
            log.warning("gallery %s does not exist yet: every face is unknown until it arrives "
                        "(build one with 'edged gallery build DIR -o %s')", gpath, gpath)
        holder.start()
        return ServiceSet(pipelines=pipes, gallery=holder, versions=self._versions(pipe, holder),
                          accelerators=self._accelerators(pipe), models=models,
                          installed=installed)

    @staticmethod
    def _detector(models: dict, settings, cfg):
        from edged.vision.detect import MtcnnDetector

        return MtcnnDetector(models["pnet"].data, models["rnet"].data, models["onet"].data,
                             settings.detection, cfg.models.detector)

    def new_gallery_holder(self, embedder_sha256: str, cfg=None):
        """A gallery holder for sets made with ``embedder_sha256``; not watched by itself:
        the drop manager (edged.ota) watches the gallery path for every set."""
        from edged.vision.embed import EmbedderSpec
        from edged.gallery import GalleryHolder

        cfg = cfg or self.cfg
        spec = EmbedderSpec.of_model(embedder_sha256)  # (None: a model the manifest lacks)
        return GalleryHolder(Path(cfg.paths.gallery), expect_embedder=embedder_sha256,
                             settings=cfg.match_settings(embedder_sha256), on_event=None,
                             watch=False, expect_dim=spec.dim if spec else None,
                             snapshot_dir=str(Path(cfg.paths.state_dir) / "gallery-snapshots"),
                             max_bytes=cfg.drops.max_gallery_bytes)

    def make_set(self, changed: dict, gallery_holder=None) -> ServiceSet:
        """A new set: the set in service with the models in ``changed`` (role -> ModelBlob)
        replaced, and ``gallery_holder`` if given.  Unchanged interpreters are shared (each
        detector is used by one worker only, the embedder by the track thread only)."""
        from edged.vision.embed import Embedder
        from edged.vision.pipeline import FacePipeline

        cur = self.service
        models = dict(cur.models, **changed)
        settings = cur.pipeline.settings
        if "embedder" in changed:
            emb = models["embedder"]
            embedder = Embedder(emb.data, emb.sha256, self.cfg.models.embedder)
        else:
            embedder = cur.pipeline.embedder
        if set(changed) & {"pnet", "rnet", "onet"}:
            detectors = [self._detector(models, settings, self.cfg) for _ in cur.pipelines]
        else:
            detectors = [p.detector for p in cur.pipelines]
        pipes = [FacePipeline(det, embedder, settings, cur.pipeline.liveness) for det in detectors]
        gallery = gallery_holder if gallery_holder is not None else cur.gallery
        return ServiceSet(pipelines=pipes, gallery=gallery,
                          versions=self._versions(pipes[0], gallery),
                          accelerators=self._accelerators(pipes[0]), models=models)

    @staticmethod
    def _versions(pipe, holder) -> dict:
        det = getattr(pipe.detector, "sha256s", None) or {}
        g = holder.current
        return {"embedder": pipe.embedder_sha256,
                "detector": dict(det) if isinstance(det, dict) else det,
                "gallery": g.checksum if g is not None else None,
                "gallery_rows": int(g.rows) if g is not None else 0,
                **({"antispoof": pipe.liveness.sha256} if pipe.liveness is not None else {})}

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

    @staticmethod
    def _threshold(cfg, svc: Optional[ServiceSet]) -> float:
        """The identification threshold in force: ``match.threshold``, else (unset) that of
        the embedder in ``svc``, which a drop may have changed (``Config.match_settings``)."""
        return cfg.match_settings((svc.versions or {}).get("embedder") if svc else None).threshold

    @classmethod
    def _threshold_note(cls, cfg, svc: ServiceSet) -> str:
        """``"threshold 0.456 (embedder sface)"``, or ``(match.threshold)`` when set."""
        from edged.vision.embed import EmbedderSpec

        if cfg.match.threshold is not None:
            return f"threshold {cfg.match.threshold:g} (match.threshold)"
        spec = EmbedderSpec.of_model((svc.versions or {}).get("embedder") or "")
        name = spec.name if spec else cfg.models.embedder_model
        return f"threshold {cls._threshold(cfg, svc):g} (embedder {name})"

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

    # ------------------------------------------------------------------ swaps and drops

    def gallery_event_handler(self, holder):
        """``on_event`` for a set's gallery holder: report its swaps and refusals."""
        return lambda ev: self._on_gallery_event(ev, holder)

    def _on_gallery_event(self, ev, holder=None) -> None:
        """A gallery holder reports a swap or a rejection (from the drop watcher's thread)."""
        d = ev.as_dict() if hasattr(ev, "as_dict") else {"accepted": True, "path": str(ev)}
        ok = bool(d.get("accepted", True))
        svc = self.service
        if svc is not None and ok and (holder is None or svc.gallery is holder):
            svc.versions = self._versions(svc.pipeline, svc.gallery)
            if self.publisher is not None:
                self.publisher.set_people(self.people(svc))
        from edged.publish.publisher import iso_utc

        g = holder.current if (holder is not None and ok) else None
        record = {"kind": "gallery", "file": d.get("path"), "files": [d.get("path")],
                  "result": "swapped" if ok else "rejected", "confirmed": True, "why": d.get("reason") or "",
                  "old": {"gallery": d.get("old_version") or ""},
                  "new": {"gallery": d.get("new_version") or "",
                          "gallery_rows": int(g.rows) if g is not None else 0},
                  "seconds": round(float(d.get("seconds") or 0.0), 3),
                  "trigger": d.get("trigger") or "", "time": iso_utc(d.get("time") or time.time())}
        if record["trigger"] == "start" and ok:
            return  # the gallery loaded with its set: not a swap
        self.report(record)

    _report_lock = threading.RLock()

    def report(self, record: dict) -> None:
        """One outcome of a drop or a swap: to the journal and to the status (MQTT and file).
        Called from the drop watcher, the track thread (rollback) and the main loop."""
        with self._report_lock:
            self._report(record)

    def _report(self, record: dict) -> None:
        result = record.get("result", "")
        record.setdefault("trigger", "drop")
        what = record.get("kind", "drop")
        files = ", ".join(record.get("files") or [str(record.get("file"))])
        ev = "ota_" + result
        if result == "swapped":
            old, new = record.get("old") or {}, record.get("new") or {}
            log.info("%s swap: %s in service in %.3f s (%s)", what, files, record.get("seconds", 0),
                     _describe_change(old, new), extra=fields(event=ev))
        elif result == "rejected":
            log.warning("%s drop refused: %s", what, record.get("why"), extra=fields(event=ev))
        elif result == "rolled_back":
            log.error("%s rollback: %s", what, record.get("why"), extra=fields(event=ev))
        elif result == "held_back":
            log.info("%s drop held back: %s: %s", what, files, record.get("why"),
                     extra=fields(event=ev))
        elif result == "confirmed":
            log.info("%s swap confirmed: %s (%s)", what, files, record.get("why"),
                     extra=fields(event=ev))
        else:
            log.info("%s drop %s: %s: %s", what, result.replace("_", " "), files,
                     record.get("why"), extra=fields(event=ev))
        parts = {}
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
        parts["drops"] = dict(self.drop_counts)
        if result in ("swapped", "rolled_back", "confirmed"):
            parts["last_swap"] = record
        if result == "rejected":
            parts["last_rejected_drop"] = record
        svc = self.service
        if svc is not None:
            parts["versions"] = svc.versions
            parts["accelerators"] = svc.accelerators
        parts["held_back"] = (self.ota.held_status() if self.ota is not None else None) or {}
        # a swap record replaces the previous one whole (update_status merges mappings), in
        # the same step: a status published in between never lacks them
        self.update_status(_replace=("last_swap", "last_rejected_drop", "held_back", "versions"),
                           **parts)

    def update_status(self, *, _replace=(), **parts) -> None:
        """Merge ``parts`` into the status (None deletes a key): MQTT retained and status.json.

        The keys of ``parts`` named in ``_replace`` replace the old values whole, in one step.
        """
        from edged.publish.publisher import _merge

        with self._status_lock:
            _merge(self._status_doc, parts, _replace)
            self._status_dirty = True
        if self.publisher is not None:
            self.publisher.update_status(_replace=_replace, **parts)

    def status_document(self) -> dict:
        """The status document as published (device, times, spool and mqtt included)."""
        import copy

        from edged.publish.publisher import iso_utc

        with self._status_lock:
            doc = {"device": self.device, "edged_version": __version__,
                   "started": iso_utc(self.started), "pid": os.getpid()}
            doc.update(copy.deepcopy(self._status_doc))
        doc["time"] = iso_utc(time.time())
        pub = self.publisher
        if pub is not None and getattr(pub, "enabled", False):
            try:
                doc["spool"] = pub.spool.stats()
                doc["mqtt"] = pub.mqtt_stats()
            except Exception:  # the publisher is stopping
                pass
        return doc

    def write_status_file(self) -> None:
        """``<state_dir>/status.json``, written atomically (``edged status`` reads it).

        The file is padded with spaces to whole 4 KiB blocks, at least STATUS_SLACK bytes to
        spare: when the disk is full and the
        atomic replacement fails, the document is written over the old one in place, in the
        blocks the file already has (``edged status`` reads again a document caught half
        written).  Only when both fail is the status file out of date (and the health says
        so on MQTT)."""
        with self._status_lock:
            self._status_dirty = False
        path = Path(self.cfg.paths.state_dir) / STATUS_FILE
        data = (json.dumps(self.status_document(), indent=2, default=str) + "\n").encode()
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
        self._status_file_problem = why
        if why:
            self._status_file_log.problem(logging.WARNING, "status file: %s", why)
        else:
            self._status_file_log.resolved("status file: %s written again", path)

    def check_health(self, force: bool = False) -> None:
        """Look at what can go wrong while running (the spool's disk, the status file) and
        publish the health when it changed (or ``force``); the spool tries its disk again (its
        back-off)."""
        pub = self.publisher
        spool = getattr(pub, "spool", None) if pub is not None else None
        changed = False
        if spool is not None:
            spool.retry()
            changed |= self.health.problem("spool", spool.problem)
        changed |= self.health.problem("status_file", self._status_file_problem)
        changed |= self._check_gallery_copy()
        changed |= self._check_frames()
        if changed or force:
            self.publish_health()

    def _check_gallery_copy(self) -> bool:
        """A gallery served from memory because its snapshot could not be written (a full
        state disk) is a health problem until a retry (each check: a statvfs when still
        full) gives it its snapshot."""
        svc = self.service
        holder = getattr(svc, "gallery", None) if svc is not None else None
        if holder is None or not getattr(holder, "snapshot_error", None):
            return self.health.problem("gallery_snapshot", None)
        holder.retry_snapshot()
        return self.health.problem("gallery_snapshot", holder.snapshot_error)

    def _check_frames(self) -> bool:
        """The cameras down and a stuck pipeline as health problems (edged.daemon.health)."""
        now = time.monotonic()
        cams = dict(self.cameras)
        down = {name: camera_down(cam.connected, cam.finished,
                                  now - (cam.last_frame_monotonic
                                        or self._camera_since.get(name, self.started_mono)),
                                  cam.settings.stall_timeout) for name, cam in cams.items()}
        changed = self.health.problems_under("camera:", down)
        fed = any(cam.connected for cam in cams.values())
        after = stuck_after(cam.settings.stall_timeout for cam in cams.values())
        return changed | self.health.problem(
            "pipeline", self.health.pipeline_stuck(self.progress, fed, now, after))

    def publish_health(self) -> None:
        """The health into the status (MQTT and status.json), and one journal line."""
        self.update_status(_replace=("problems",), **self.health.document())
        if self.health.phase == "running":
            level = logging.WARNING if self.health.state == "degraded" else logging.INFO
            log.log(level, "health: %s", self.health.describe(), extra=fields(event="health"))

    def swap_service(self, new: ServiceSet, record: Optional[dict] = None,
                     trigger: str = "reload") -> ServiceSet:
        """Put ``new`` in service between two frames; return the old set.

        The old set is kept (for a rollback) until :meth:`confirm` or the next swap;
        ``record`` (a drop's outcome) is reported once the swap is done."""
        with self._swap_lock:
            old = self.service
            t0 = time.monotonic()
            self.models_holder.commit(new, path=(record or {}).get("file") or "set",
                                      trigger=(record or {}).get("trigger", trigger),
                                      started=t0)
        if self.publisher is not None:
            self.publisher.set_people(self.people(new))
        if record is not None:
            self.report(record)
        else:
            self.update_status(_replace=("versions",), versions=new.versions,
                               accelerators=new.accelerators)
        return old

    def rollback(self, good: ServiceSet, failed: ServiceSet, why: str, record: dict) -> None:
        """The set put in service by ``record`` failed: the previous one goes back."""
        from edged.publish.publisher import iso_utc

        with self._swap_lock:
            if self.service is not failed:
                return
            ev = self.models_holder.rollback(why)
        if ev is None:  # nothing kept (cannot happen after swap_service)
            log.error("rollback impossible: no previous set kept; %s", why)
            return
        if good.gallery is not failed.gallery:  # the next start falls back to this gallery
            good.gallery.keep_last_good()
        if self.publisher is not None:
            self.publisher.set_people(self.people(good))
        self.report({"kind": record.get("kind", "models"), "file": record.get("file"),
                     "files": record.get("files"), "result": "rolled_back", "why": why,
                     "old": dict(failed.versions), "new": dict(good.versions),
                     "seconds": round(ev.seconds, 3), "trigger": "rollback",
                     "time": iso_utc(time.time())})

    def confirm(self, new: ServiceSet, old: ServiceSet) -> None:
        """The new set did well on its first frames: let the previous one go."""
        if self.service is not new:  # replaced meanwhile (a SIGHUP reload): nothing to confirm
            log.info("swap not confirmed: the set is no longer in service (%d frame(s))",
                     new.frames)
            return
        self.models_holder.release_previous()
        new.gallery.keep_last_good()  # only now: a set on probation may still be rolled back
        threading.Thread(target=self._keep_models, args=(new,), name="keep-models",
                         daemon=True).start()  # never on the frame path (fsync)
        self.update_status(last_swap={"confirmed": True, "confirmed_after_frames": new.frames})
        log.info("swap confirmed: %d good frame(s), %d embedding call(s)", new.frames,
                 new.embeds, extra=fields(event="ota_confirmed"))

    _keep_lock = threading.Lock()

    def _keep_models(self, svc: ServiceSet) -> None:
        """Write the confirmed set under <state_dir>/models for the next start (edged.ota)."""
        from edged.ota.drops import save_in_service

        with self._keep_lock:
            if self.service is not svc:
                return
            try:  # only when it fits with the margin the spool needs
                modelstore.check_room(self.cfg.paths.state_dir,
                                      sum(len(b.data) for b in svc.models.values()),
                                      "the models in service")
                save_in_service(self.cfg.paths.state_dir, svc.models)
            except OSError as exc:
                log.warning("cannot keep the models in service for the next start: %s", exc)

    def _keep_installed(self, blobs) -> None:
        """Copy the installed models this start loaded to <state_dir>/installed-copy (edged.ota)."""
        from edged.ota.drops import save_installed_copy

        with self._keep_lock:
            try:  # only when it fits with the margin the spool needs
                modelstore.check_room(self.cfg.paths.state_dir, sum(len(b.data) for b in blobs),
                                      "a copy of the installed models")
                save_installed_copy(self.cfg.paths.state_dir, blobs)
            except OSError as exc:
                log.warning("cannot keep a copy of the installed models: %s", exc)

    def _close_set(self, svc: ServiceSet) -> None:
        """Close what a retired set does not share with the sets still kept."""
        kept = [self.models_holder.current]
        prev = getattr(self.models_holder, "_previous", None)
        if prev is not None:
            kept.append(prev.obj)
        if any(k is not None and k.gallery is svc.gallery for k in kept):
            return
        try:
            svc.gallery.stop()
        except Exception:
            log.exception("closing a retired gallery failed")

    # ------------------------------------------------------------------ start

    def check_paths(self, cfg) -> None:
        """Refuse a ``<state_dir>/models`` that is the models or the drop directory: the daemon
        keeps the models in service there and removes the ones it wrote before (edged.ota)."""
        from edged.ota.drops import check_paths

        md = modelstore.resolve_models_dir(self.models_arg or cfg.paths.models_dir or None)
        why = check_paths(cfg.paths.state_dir, md, cfg.paths.drop_dir or md)
        if why:
            raise StartupError(why, config=True)

    def start(self, camera_wait: float = 20.0) -> None:
        cfg = self.cfg
        self.check_paths(cfg)
        quiet_opencv()
        for cam in cfg.cameras:
            why = preflight(cam)
            if why:
                raise StartupError(why, config=True)
        state = Path(cfg.paths.state_dir)
        _warn_if_root()
        self._start_http(cfg)
        try:  # (galleries are biometric data: not for every user of the machine)
            state.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
        except OSError as exc:
            raise StartupError(f"paths.state_dir: cannot create {state}: {exc}") from exc
        try:  # the spool, the status file and the kept models and galleries go there
            with tempfile.TemporaryFile(dir=state):
                pass
        except OSError as exc:
            raise StartupError(f"paths.state_dir: cannot write in {state}: {exc}") from exc
        t0 = time.monotonic()
        self._loaded_since = time.time()  # drops that arrive from now on are taken (edged.ota)
        self.service = self.build_service(cfg)
        if self.service.installed:  # off the start's path: it writes (and fsyncs) a few MB
            threading.Thread(target=self._keep_installed, args=(list(self.service.installed),),
                             name="keep-installed", daemon=True).start()
        g = self.service.gallery.current
        acc = self.service.accelerators
        log.info("models loaded in %.2f s: embedder %s, gallery %s (%d people, %s); "
                 "detector on %s, embedder on %s",
                 time.monotonic() - t0, self.service.versions["embedder"][:12],
                 (self.service.versions.get("gallery") or "none")[:12], len(self.people()),
                 f"{getattr(g, 'rows', '?')} rows {getattr(g, 'dtype_name', '?')}, "
                 f"scan {getattr(g, 'scan', '?')}" if g is not None else "no gallery",
                 acc.get("detector", "?"), acc.get("embedder", "?"))
        log.info("identification at %s", self._threshold_note(cfg, self.service))
        from edged.publish.publisher import Publisher

        try:
            self.publisher = Publisher(cfg.mqtt, self.device, state, people=self.people())
        except (ValueError, OSError) as exc:  # a setting that can never work (names the key)
            self.service.gallery.stop()
            raise StartupError(str(exc), config=isinstance(exc, ValueError)) from exc
        # the whole first status in one update, with what the start reported so far (a
        # gallery refused): the first status retained has all its parts
        with self._status_lock:
            first = dict(self._status_doc)
        first.update(versions=self.service.versions, accelerators=self.service.accelerators,
                     cameras={c.name: {"connected": False} for c in cfg.cameras},
                     config=str(self.config_path) if self.config_path else None,
                     drops=dict(self.drop_counts), state_dir=str(state),
                     drop_dir=self._drop_dir(cfg), **self.health.document())
        self.update_status(_replace=tuple(first), **first)
        self.publisher.start()
        for cs in cfg.cameras:
            self._add_camera(cs)
        deadline = time.monotonic() + camera_wait
        for cam in self.cameras.values():
            # in short steps: a SIGTERM meanwhile ends the wait (run() then stops at once)
            while not cam.first_frame.is_set() and not self._stop.is_set() \
                    and time.monotonic() < deadline:
                cam.first_frame.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
            if self._stop.is_set():
                log.info("stop requested while waiting for the cameras")
                return
            if not cam.first_frame.is_set():
                log.warning("camera %s: no frame after %.0f s; starting anyway, it keeps "
                            "reconnecting (%s)", cam.name, camera_wait, cam.last_error,
                            extra=fields(camera=cam.name))
        self.warm_up(self.service)
        self.service.gallery.keep_last_good()  # the gallery the next start falls back to
        self._spawn("events", self._events_loop)
        self._spawn("track", self._track_loop)
        for i in range(len(self.service.pipelines)):
            self._spawn(f"detect-{i}", lambda i=i: self._detect_loop(i))
        self._start_drops(since=getattr(self, "_loaded_since", None), restore=True)
        self.ready = True
        self.health.phase = "running"
        self.check_health(force=True)
        self.status_text = self._status_line()
        self.notifier.ready(self.status_text)
        log.info("edged %s ready: device %s, %d camera(s)", __version__, self.device,
                 len(self.cameras))

    def _start_http(self, cfg) -> None:
        """The /metrics and /healthz endpoint (edged.publish.http), when ``http.listen`` is set:
        up before the models load, so that /healthz says ``starting`` meanwhile."""
        if not cfg.http.listen.strip():
            return
        from edged.publish.http import HttpEndpoint

        try:
            self.http = HttpEndpoint(cfg.http, self).start()
        except OSError as exc:
            raise StartupError(f"http.listen: cannot listen on {cfg.http.listen}: {exc}",
                               config=isinstance(exc, (socket.gaierror, PermissionError))) \
                from exc

    def _start_drops(self, since: Optional[float] = None, restore: bool = False) -> None:
        """Watch the drop directory and the gallery path (edged.ota); ``since``: take the
        files that arrived from then on, before the watchers started; ``restore``: hold back
        again the embedder held back before the restart."""
        kept = Path(self.cfg.paths.state_dir) / "models" / "in-service.json"
        drops = self.cfg.drops
        drop_dir = self._drop_dir(self.cfg)
        self.ota = self._new_drop_manager()
        if kept.is_file():
            try:
                self.ota.learn(modelstore.Manifest.load(kept))
            except modelstore.ModelError:
                pass
        gallery_waits, waiting = False, []
        if restore and drops.enabled:
            try:
                gallery_waits = self.ota.restore_held()
                waiting = self.ota.restore_pending()
            except Exception:
                log.exception("drops: restoring the drops in progress failed")
        todo = waiting + ([self.ota.gallery_path] if gallery_waits else [])
        self.ota.start(since=since, skip=todo)  # (those are handled once, below)
        self.update_status(_replace=("held_back",), drop_dir=drop_dir,
                           held_back=self.ota.held_status() or {})
        if todo:  # after the status: the drops' own reports come last
            ota = self.ota
            threading.Thread(target=lambda: [ota._on_file(p) for p in todo],
                             name="drops-restored", daemon=True).start()

    def _new_drop_manager(self):
        """A drop manager for the configuration in force, knowing the repository's manifest."""
        from edged.ota.drops import DropManager

        try:
            manifest = modelstore.Manifest.load()
        except modelstore.ModelError as exc:
            log.warning("drops: %s; only drops with their own manifest are taken", exc)
            manifest = None
        cfg = self.cfg
        return DropManager(self, self._drop_dir(cfg), cfg.paths.gallery, manifest, cfg.drops)

    def _drop_dir(self, cfg) -> Optional[str]:
        """The directory watched for model drops under ``cfg`` (None: model drops off)."""
        if not cfg.drops.enabled:
            return None
        if cfg.paths.drop_dir:
            return cfg.paths.drop_dir
        return str(modelstore.resolve_models_dir(self.models_arg or cfg.paths.models_dir or None))

    def _restart_drops(self) -> None:
        """A reload moved the gallery path or the drop directory: watch the new ones.  What the
        old drop manager learnt (the models it accepted, an embedder held back) carries over.

        All under the old manager's lock (which the new one shares): no drop is being handled
        and none is on probation while the new one takes over, so each file is handled by
        exactly one of them.  If the new places cannot be watched, the old ones stay watched,
        and the journal says so.  The old watchers are stopped in the background (their
        threads may wait for the lock a while)."""
        old = self.ota
        new = self._new_drop_manager()
        new._lock = old._lock
        new.known.update(old.known)
        with old._lock:  # no drop in progress, and none on probation
            old.wait_probation()
            new.held = old.held
            try:
                new.start()  # its watchers wait for this lock before handling anything
            except Exception as exc:
                new._stopping.set()
                threading.Thread(target=new.stop, name="drops-stop", daemon=True).start()
                log.error("reload: cannot watch the new drop places (%s); still watching %s",
                          exc, ", ".join(str(w.directory) for w in old.watchers) or "nothing")
                return
            old._stopping.set()
            self.ota = new
        threading.Thread(target=old.stop, name="drops-stop", daemon=True).start()
        self.update_status(_replace=("held_back",), drop_dir=new.drop_dir and str(new.drop_dir),
                           held_back=new.held_status() or {})
        log.info("reload: drops now watched at %s (gallery %s)",
                 new.drop_dir or "(model drops off)", new.gallery_path)
        if new.held_gallery_waiting():  # the moved path already holds the held one's gallery
            threading.Thread(target=new._on_file, args=(new.gallery_path,),
                             name="drops-held", daemon=True).start()

    def warm_up(self, svc: ServiceSet, parts=None) -> None:
        """Run every interpreter once at the cameras' frame sizes (before READY / a swap), so
        that the first real frames do not pay for building the P-Net pyramid interpreters.
        ``parts``: the roles that are new (a swap warms up only those)."""
        t0 = time.monotonic()
        parts = set(parts) if parts is not None else {"pnet", "rnet", "onet", "embedder"}
        shapes = {(*c.resolution, self._detect_width(c.name)) for c in self.cameras.values()
                  if c.resolution}
        if parts & {"pnet", "rnet", "onet"}:
            for w, h, width in sorted(shapes):
                img = np.zeros((h, w, 3), np.uint8)
                for p in svc.pipelines:
                    p.detect(img, width)
        if "embedder" in parts:
            svc.pipeline.embedder.embed([np.zeros((112, 112, 3), np.uint8)],
                                        flip=svc.pipeline.settings.flip)
        log.debug("warm-up in %.2f s for %s", time.monotonic() - t0, sorted(shapes))

    def _new_tracker(self, camera: str, cfg, svc: Optional[ServiceSet]) -> Tracker:
        return Tracker(camera, cfg.tracking, match_threshold=self._threshold(cfg, svc),
                       liveness=cfg.liveness)

    def _add_camera(self, cs) -> None:
        self.trackers[cs.name] = self._new_tracker(cs.name, self.cfg, self.service)
        self.motion[cs.name] = MotionGate(self.cfg.motion)
        self.fps_done.setdefault(cs.name, RollingStats())
        self._camera_since[cs.name] = time.monotonic()
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
            with self._order:  # at most max_in_flight() frames past the hub: the rest wait
                # there, where a newer frame replaces an older one (the newest frame wins)
                if self._in_flight >= self.max_in_flight():
                    self._order.wait(0.2)
                    continue
                self._in_flight += 1  # this worker's place, taken before the frame
            frame = self.hub.take(timeout=0.2)
            if frame is None:
                with self._order:
                    self._in_flight -= 1
                    self._order.notify_all()
                continue
            self.stage["capture"].add(time.monotonic() - frame.monotonic)
            with self._order:
                seq = self._next_seq.get(frame.camera, 0)
                self._next_seq[frame.camera] = seq + 1
                # read once: the whole frame goes through one set, leased until it is tracked
                # (a set replaced meanwhile is closed only when its last frame is done)
                lease = self.models_holder.acquire()  # ended by the track thread
                svc = lease.obj if lease is not None else None
            faces, dt = None, 0.0
            try:
                around = self._what_to_detect(frame, seq)
            except Exception:  # (never a dead worker: detect the frame instead)
                log.exception("detect: the motion and track check of frame %d of camera %s "
                              "failed; detecting the whole frame", frame.index, frame.camera,
                              extra=fields(camera=frame.camera))
                around = FULL
            if around is not None:
                t0 = time.perf_counter()
                try:
                    pipes = svc.pipelines
                    pipe, width = pipes[worker % len(pipes)], self._detect_width(frame.camera)
                    if around is FULL:
                        faces = pipe.detect(frame.image, width)
                    else:
                        faces = Refined(pipe.detect(frame.image, width, around=around))
                except Exception as exc:
                    self.errors += 1
                    svc.failures += 1
                    svc.last_failure = f"detect: {type(exc).__name__}: {exc}"
                    log.exception("detect: frame %d of camera %s failed", frame.index,
                                  frame.camera, extra=fields(camera=frame.camera))
                    faces = []
                dt = time.perf_counter() - t0
                self.stage["detect"].add(dt)
            with self._order:
                self._detected[(frame.camera, seq)] = (frame, faces, svc, lease)
                self._order.notify_all()

    def _what_to_detect(self, frame, seq: int):
        """How a frame goes through the detector: :data:`FULL` (the whole P-Net pyramid),
        boxes (the live tracks' predicted boxes, refined by R-Net and O-Net only), or None
        (not at all).  Every ``tracking.detect_every``-th frame of a camera is a full
        detection, unless the motion gate (``motion.enabled``, edged.vision.motion) finds no motion,
        no live track and less than ``motion.max_idle_s`` since the last one; the frames
        between refine the live tracks (None when there are none)."""
        tracker = self.trackers.get(frame.camera)
        tracking = tracker is not None and bool(tracker.tracks)
        if seq % self.cfg.tracking.detect_every:
            boxes = tracker.predicted_boxes(frame.monotonic) if tracking else ()
            return boxes if len(boxes) else None
        gate = self.motion.get(frame.camera)
        if gate is None or not self.cfg.motion.enabled:
            return FULL
        gate.s = self.cfg.motion  # (a reload may have changed them)
        return FULL if gate.decide(frame.image, frame.monotonic, tracking) else None

    def _detect_width(self, camera: str) -> int:
        """The width ``camera``'s frames are detected at: its own ``detect_width``, else
        ``pipeline.detect_width`` (0: the frame's own)."""
        cam = self.cameras.get(camera)
        return (cam.settings.detect_width if cam is not None else 0) or self.cfg.pipeline.detect_width

    def max_in_flight(self) -> int:
        """How many frames may be between the hub and the end of the track thread: one in
        detection and one waiting for the track thread per worker."""
        return 2 * max(1, self.cfg.pipeline.workers)

    def _expire_tracks(self) -> None:
        """End the tracks of cameras that have sent no frame for ``tracking.max_gap`` seconds.

        Called by the track thread about once a second.  A camera whose source still delivers
        (its frames only wait for detection) is left alone.
        """
        gap = self.cfg.tracking.max_gap
        if not gap:
            return
        now = time.monotonic()
        with self._track_lock:
            for name, tracker in list(self.trackers.items()):
                cam = self.cameras.get(name)
                if cam is not None and cam.last_frame_monotonic is not None \
                        and now - cam.last_frame_monotonic <= gap:
                    continue
                events = tracker.expire(now)
                if events:
                    log.info("camera %s: no frames for %.1f s; %d track(s) ended", name,
                             gap, len(events), extra=fields(camera=name))
                versions = self._versions_seen.get(name, {})
                for ev in events:
                    ev.versions = dict(versions)
                    self._events.put((ev, now, None))

    def _track_loop(self) -> None:
        """Frames in capture order per camera: track, embed, match, make events."""
        next_expiry = time.monotonic() + 1.0
        while True:
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + 1.0
                try:
                    self._expire_tracks()
                except Exception:
                    log.exception("track: ending the tracks of silent cameras failed")
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
                        if time.monotonic() >= next_expiry:
                            break
                        self._order.wait(0.2)
            if item is None:
                continue
            frame, faces, svc, lease = item
            try:
                with self._track_lock:
                    self.process(frame, faces, svc)
                svc.frames += 1
            except Exception as exc:
                self.errors += 1
                svc.failures += 1
                svc.last_failure = f"track: {type(exc).__name__}: {exc}"
                log.exception("track: frame %d of camera %s failed", frame.index, frame.camera,
                              extra=fields(camera=frame.camera))
            finally:
                self.models_holder.release(lease)
                with self._order:
                    self._in_flight -= 1
                    self._order.notify_all()  # a detection worker may take the next frame
            if self._frame_log is not None:
                self._frame_log.write(f"{frame.camera} {frame.index} {time.monotonic():.6f}\n")
            ota = self.ota
            if ota is not None:
                try:
                    ota.after_frame(svc)
                except Exception:
                    log.exception("drops: probation check failed")

    def process(self, frame, faces, svc) -> List[Event]:
        """One detected frame through track -> embed -> match; returns its events.

        ``faces`` is None when detection did not run on this frame (motion gating, or no
        live track between full detections), a :class:`Refined` list when only the live
        tracks were refined (``tracking.detect_every``).
        """
        tracker = self.trackers.get(frame.camera)
        if tracker is None:
            return []
        if self.first_frame_monotonic is None:
            self.first_frame_monotonic = frame.monotonic
        events: List[Event] = []
        # the first frame of a new connection ends the tracks of the old one (the frame says
        # which connection it came from: frames of the old one still in flight keep them)
        if frame.connection != self._reconnects_seen.get(frame.camera, 0):
            self._reconnects_seen[frame.camera] = frame.connection
            events += tracker.reset("source reconnected")
            if frame.camera in self.motion:  # (another scene, maybe: learn it again)
                self.motion[frame.camera].reset()
        seen = self._versions_seen.get(frame.camera)
        if seen is not None and seen.get("embedder") != svc.versions.get("embedder"):
            # a drop swapped the embedder (or a rollback put it back): the tracks hold the
            # other embedder's embeddings (of another width, perhaps), and its threshold differs
            events += tracker.end_all(why="embedder changed")
            tracker = self.trackers[frame.camera] = self._new_tracker(frame.camera, self.cfg, svc)
        self._versions_seen[frame.camera] = svc.versions
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
                self.errors += 1
                svc.failures += 1
                svc.last_failure = f"embed/match: {type(exc).__name__}: {exc}"
                log.exception("camera %s frame %d: embedding or matching failed", frame.camera,
                              frame.index, extra=fields(camera=frame.camera))
                t4 = time.perf_counter()
        t5 = time.perf_counter()
        self.stage["track"].add((t2 - t1) + (t5 - t4))
        now = time.monotonic()
        self.stage["frame"].add(now - frame.monotonic)
        self.fps_done[frame.camera].add(t=now)
        self.frames_done_total += 1
        cam = frame.camera
        self.frames_by_camera[cam] = self.frames_by_camera.get(cam, 0) + 1
        if faces:
            self.faces_detected[cam] = self.faces_detected.get(cam, 0) + len(faces)
        self.last_done_monotonic = now
        if self.first_done_monotonic is None:
            self.first_done_monotonic = now
        if not failed:  # (the watchdog's measure: a pipeline that fails every frame is stuck)
            self.progress += 1
        for ev in events:
            ev.versions = dict(svc.versions)
            if self.cfg.mqtt.snapshots and ev.type in ("recognized", "unknown", "spoof_suspected"):
                ev.snapshot = _snapshot(frame.image, ev.box)
            self._events.put((ev, frame.monotonic, frame.index))
        return events

    def _embed_and_match(self, frame, tracker, todo, svc, t2: float, events: list) -> float:
        """Embed the faces the tracker asked for, match them, add the tracker's events to
        ``events``; return the time it ended."""
        svc.pipeline.embed_faces([f for _, f in todo], only_passing=False, image=frame.image)
        t3 = time.perf_counter()
        self.stage["embed"].add(t3 - t2)
        self.faces_embedded += len(todo)
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
        self.stage["match"].add(t4 - t3)
        events += tracker.observe(frame, todo, matches)
        return t4

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
            t0 = time.monotonic()
            try:
                if self.publisher is not None:
                    self.publisher.publish_event(ev)
            except Exception:
                log.exception("publisher: event %s failed", ev.id)
            t1 = time.monotonic()
            self.stage["publish"].add(t1 - t0)
            lat = t1 - captured
            self.latency.add(lat)
            self.latencies_all.append(lat)
            self._count_event(ev)
            self._log_event(ev)
            if self.events_out is not None:
                self._write_event(ev, lat, frame_index)
            for hook in list(self.event_hooks):
                try:
                    hook(ev, lat)
                except Exception:
                    log.exception("event hook failed")

    _events_done = False

    def _count_event(self, ev: Event) -> None:
        """The last event, and the per-camera counts the metrics and the status show."""
        self.last_event, self.last_event_time = ev, time.time()
        key = (ev.camera, ev.type)
        self.event_counts[key] = self.event_counts.get(key, 0) + 1
        self.last_event_at[ev.camera] = self.last_event_time
        self.event_rates.setdefault(ev.camera, RollingStats(window=600.0)).add()

    def _log_event(self, ev: Event) -> None:
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

    def _write_event(self, ev: Event, latency: float, frame_index=None) -> None:
        """One line of ``--events-out``: the document MQTT subscribers get (one definition,
        :func:`edged.publish.publisher.event_payload`), with the debugging extras under ``debug``."""
        from edged.publish.publisher import event_payload

        d = event_payload(ev, self.device, time.time())
        d["debug"] = {"frame_index": frame_index, "latency_s": round(latency, 4)}
        line = json.dumps(d, default=str) + "\n"
        try:
            with open(self.events_out, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:  # a full disk must not end the events thread (and MQTT with it)
            now = time.monotonic()
            if now - getattr(self, "_events_out_warned", -1e9) >= 60:
                self._events_out_warned = now
                log.error("--events-out %s: cannot write event %s: %s (said once a minute)",
                          self.events_out, ev.id, exc)

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
        self.health.progressed(self.progress)
        try:
            self._main_loop(ping_every)
        except Exception:  # always end in stop(): the spool flushed, STOPPING sent
            log.exception("main loop failed; stopping")
            self.stop()
            return 1
        except BaseException:
            self.stop()
            raise
        return self.stop()

    def _main_loop(self, ping_every) -> None:
        last_ping = last_health = last_stats = time.monotonic()
        last_status = 0.0
        stats_every = float(getattr(self.cfg.mqtt, "stats_interval_s", 30.0))
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self._reload_with_pings(ping_every)
            for cam in self.cameras.values():
                cam.check()
            if ping_every and now - last_ping >= ping_every:
                if self.health.progressed(self.progress):
                    self.notifier.watchdog()
                # on a fixed grid (the loop's own steps do not stretch the interval), never
                # two pings in a row after a long step
                last_ping = max(last_ping + ping_every, now - ping_every / 2)
            if now - last_health >= HEALTH_EVERY_S:
                last_health = now
                self.check_health()
            if now - last_status >= STATUS_EVERY_S:
                last_status = now
                self.status_text = self._status_line()
                self.notifier.status(self.status_text)
                self.update_status(cameras=self.camera_status())
            if self.ota is not None:
                try:
                    self.ota.tick()
                except Exception:  # a drop problem never stops the daemon
                    log.exception("drops: periodic check failed")
            if self._status_dirty:
                self.write_status_file()
            if now - last_stats >= stats_every:
                last_stats = now
                if self.publisher is not None:
                    self.publisher.publish_stats(self.stats())
            if self.exit_when_done and self._all_done():
                log.info("every source has ended; stopping")
                break

    def _reload_with_pings(self, ping_every: Optional[float]) -> bool:
        """reload() on the main thread, while a helper thread feeds the systemd watchdog as the
        main loop does (only while frames go through): loading new models, warming them up on
        a slow accelerator or waiting for a drop's probation may take longer than the
        watchdog's interval."""
        if not ping_every:
            return self.reload()
        done = threading.Event()

        def ping():
            while not done.wait(ping_every):
                if self.health.progressed(self.progress):
                    self.notifier.watchdog()

        t = threading.Thread(target=ping, name="reload-watchdog", daemon=True)
        t.start()
        try:
            return self.reload()
        finally:
            done.set()

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
        if self.ota is not None:
            self.ota.stop()
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
        self.health.phase = "stopped"
        if self.service is not None:  # before the publisher's last (retained) status
            self.update_status(_replace=("cameras", "problems"), **self.stopped_status())
        if self.publisher is not None:
            self.publisher.stop(clean=True)
        if self.service is not None:
            self.write_status_file()
            self.models_holder.stop(close=True)
        if self.http is not None:  # last: a scrape until then sees the daemon stop
            self.http.stop()
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
        new = None
        old_threshold = self._threshold(cfg, self.service)
        try:
            if self.config_path is not None:
                cfg = configmod.load(self.config_path)
                configmod.resolve_paths(cfg)
            if cfg.pipeline.workers != self.cfg.pipeline.workers:
                # one detector per detection thread, and the threads are started once
                log.warning("reload: pipeline.workers changed from %d to %d; it takes effect at "
                            "the next restart", self.cfg.pipeline.workers, cfg.pipeline.workers)
                cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(
                    cfg.pipeline, workers=self.cfg.pipeline.workers))
            self.check_paths(cfg)
            new = self.build_service(cfg)
            self.warm_up(new)
            # one swap at a time: a drop (or its probation) in progress finishes first, and no
            # drop starts until this set is in service and the previous one released
            with (self.ota._lock if self.ota is not None else contextlib.nullcontext()):
                if self.ota is not None:
                    self.ota.wait_probation()
                self.swap_service(new)
                self.models_holder.release_previous()  # closes the old set's gallery
                new.gallery.keep_last_good()
        except Exception as exc:
            if isinstance(exc, (configmod.ConfigError, StartupError)):
                log.error("reload failed, keeping the running configuration: %s", exc)
            else:
                log.exception("reload failed, keeping the running configuration: %s", exc)
            if new is not None and self.service is not new:
                try:
                    new.gallery.stop()  # the set that was not put in service
                except Exception:
                    log.exception("reload: closing the unused gallery failed")
            self.notifier.ready(f"reload failed: {(str(exc) or type(exc).__name__).splitlines()[0]}")
            return False
        if (cfg.tracking != self.cfg.tracking or self._threshold(cfg, new) != old_threshold
                or cfg.liveness != self.cfg.liveness):
            with self._track_lock:
                for name in list(self.trackers):
                    events = self.trackers[name].end_all(why="reload")
                    self.trackers[name] = self._new_tracker(name, cfg, new)
                    for ev in events:
                        ev.versions = dict(new.versions)
                        self._events.put((ev, time.monotonic(), None))
        old_cams = {c.name: c for c in self.cfg.cameras}
        new_cams = {c.name: c for c in cfg.cameras}
        if cfg.mqtt != self.cfg.mqtt:
            log.warning("reload: MQTT settings changed; they take effect at the next restart")
        if cfg.http != self.cfg.http:
            log.warning("reload: http settings changed; they take effect at the next restart")
        old_cfg = self.cfg
        self.cfg = dataclasses.replace(cfg, mqtt=self.cfg.mqtt, http=self.cfg.http)
        if self.ota is not None and (cfg.paths.gallery != old_cfg.paths.gallery
                                     or self._drop_dir(cfg) != self._drop_dir(old_cfg)
                                     or cfg.drops != old_cfg.drops):
            try:
                self._restart_drops()
            except Exception:
                log.exception("reload: moving the drop watches failed; the old ones stay")
        # the cameras running (a camera of the old file that failed its check at the last
        # reload is not: it is only tried again below)
        for name in list(self.cameras):
            if new_cams.get(name) != old_cams.get(name):
                cam = self.cameras.pop(name)
                cam.stop()
                self.hub.discard(name)
                with self._track_lock:
                    tracker = self.trackers.pop(name, None)
                    for ev in (tracker.end_all(why="camera removed") if tracker else []):
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
        log.info("reloaded: embedder %s, gallery %s, identification at %s",
                 new.versions["embedder"][:12], (new.versions.get("gallery") or "none")[:12],
                 self._threshold_note(self.cfg, new))
        return True

    # ------------------------------------------------------------------ status and stats

    def camera_status(self) -> dict:
        out = {}
        now = time.monotonic()
        for name, cam in self.cameras.items():
            st = cam.status()
            st["fps"] = round(self.fps_done[name].rate(now), 2)
            st["dropped"] = self.hub.dropped.get(name, 0)
            st.update(self._camera_events(name, now))
            out[name] = st
        return out

    def _camera_events(self, name: str, now: float) -> dict:
        """``events_per_min`` (over the last 10 minutes) and ``last_event`` (ISO time or
        None) of one camera, for the status (Home Assistant's sensors)."""
        from edged.publish.publisher import iso_utc

        rate = self.event_rates.get(name)
        at = self.last_event_at.get(name)
        return {"events_per_min": round(rate.count(now) * 60.0 / rate.window, 2) if rate else 0.0,
                "last_event": iso_utc(at) if at else None}

    def stopped_status(self) -> dict:
        """The status parts that say the daemon stopped: no camera connected, no fps."""
        from edged.publish.publisher import iso_utc

        cams = {}
        for name, cam in self.cameras.items():
            st = {k: v for k, v in cam.status().items() if v is not None}
            cams[name] = dict(st, connected=False, stopped=True)
        return dict(self.health.document(), stopped=True, stopped_at=iso_utc(time.time()),
                    cameras=cams)

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
        if self.health.state == "degraded":
            parts.insert(0, self.health.describe())
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
            "motion": {name: gate.status() for name, gate in list(self.motion.items())
                       if name in self.cameras and self.cfg.motion.enabled},
            "stages_ms": {k: v.summary(now) for k, v in self.stage.items()},
            "latency_ms": self.latency.summary(now),
            "queue_depth": self._events.qsize(),
            "faces_embedded": self.faces_embedded,
            "errors": self.errors,
            "cpu_s": round(sum(os.times()[:2]), 2),
            "cpu_percent": self._cpu_percent(now),
            "rss_mb": _rss_mb(),
        }


def _warn_if_root() -> None:
    """Once per process: edged does not need root (the unit runs it as the edged user)."""
    if os.geteuid() == 0 and not getattr(_warn_if_root, "said", False):
        _warn_if_root.said = True
        log.warning("running as root: edged needs no privileges; run it as its own user "
                    "(the systemd unit does: User=edged), which keeps the galleries and the "
                    "state directory out of reach of other services")


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


def _set_version(svc: ServiceSet) -> str:
    v = svc.versions or {}
    det = v.get("detector") or {}
    parts = [f"embedder {str(v.get('embedder'))[:12]}"]
    if isinstance(det, dict):
        parts += [f"{k} {str(x)[:12]}" for k, x in sorted(det.items())]
    return ", ".join(parts)


def _describe_change(old: dict, new: dict) -> str:
    """``embedder 1893867f712f -> 5d41...`` for the versions that changed."""
    out = []

    def flat(d):
        f = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                f.update(v)
            else:
                f[k] = v
        return f

    o, n = flat(old), flat(new)
    for k in n:
        if k != "gallery_rows" and n.get(k) != o.get(k):
            out.append(f"{k} {str(o.get(k) or 'none')[:12]} -> {str(n.get(k) or 'none')[:12]}")
    return ", ".join(out) or "no version changed"


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
