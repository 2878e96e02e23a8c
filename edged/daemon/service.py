"""The daemon: cameras in, tracked recognitions out, run by systemd.

:class:`Daemon` wires the parts and owns their lifecycle (start, the main loop, SIGHUP reload,
stop, the systemd notifications); it holds no frame logic. The parts, one job each:

- :class:`edged.daemon.capture.Camera` per camera (thread ``capture-<camera>``), newest frame
  wins in the :class:`~edged.daemon.capture.FrameHub`;
- :class:`edged.daemon.flow.FrameFlow`: threads ``detect-<i>`` (detection workers) and
  ``track`` (frames back in capture order), where :class:`edged.daemon.recognize.Recognizer`
  tracks, embeds, matches and makes the events;
- :class:`edged.daemon.events.EventSink`: thread ``events`` (the publisher, the journal,
  ``--events-out``);
- :class:`edged.ota.modelset.ModelSets`: the set in service (models and gallery, one
  reference read once per frame), its swaps, probation, confirmation and rollback; the drop
  manager (:mod:`edged.ota.drops`, its watcher threads) brings new files to it;
- :class:`edged.daemon.status.StatusBoard`: the status document, status.json and the health
  (edged.health), which the watchdog, MQTT, ``edged status`` and ``/healthz`` read;
- :class:`edged.publish.publisher.Publisher` (thread ``mqtt``) and, when ``http.listen`` is
  set, :class:`edged.publish.http.HttpEndpoint` (thread ``http``; it only reads);
- the main thread: signals, ``READY``, ``STATUS``, ``WATCHDOG``, ``RELOADING``, ``STOPPING``.

``WATCHDOG=1`` is sent only when the pipeline finished a frame since the previous ping: a
stalled camera or a stuck pipeline stops the pings and systemd restarts the service.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from edged import __version__
from edged.daemon import drops, reload
from edged.daemon.capture import Camera, FrameHub, preflight, quiet_opencv
from edged.daemon.commands import EnrolCommands
from edged.daemon.events import EventSink
from edged.daemon.flow import FrameFlow
from edged.daemon.recognize import Recognizer
from edged.daemon.sdnotify import Notifier
from edged.daemon.stats import Counters, StatsReport
from edged.daemon.status import StatusBoard
from edged.enrolment.store import TrackStore
from edged.logs import fields
from edged.ota import modelset
from edged.ota.modelset import ModelSets, ServiceSet, StartupError  # noqa: F401 (edged run)

log = logging.getLogger("edged.daemon")

STATUS_EVERY_S = 5.0
STATE_DIR_MODE = 0o750  # paths.state_dir when edged creates it (less a stricter umask)
HEALTH_EVERY_S = 1.0  # how often the main loop looks at the spool and the status file


class Daemon:
    """The service: builds the parts, starts and stops them, reloads them on SIGHUP."""

    def __init__(self, cfg, config_path=None, models_dir=None, notifier: Optional[Notifier] = None,
                 exit_when_done: bool = False, events_out=None):
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.models_arg = models_dir
        self.notifier = notifier or Notifier()
        self.exit_when_done = exit_when_done
        self.device = cfg.device.resolved_name()
        self.hub = FrameHub()
        self.cameras: Dict[str, Camera] = {}
        self.ota = None  # edged.ota.drops.DropManager once started
        self.publisher = None
        self.http = None  # edged.publish.http.HttpEndpoint while http.listen is set
        self.kept = None  # edged.enrolment.store.TrackStore while enrolment.keep_faces is on
        self.commands: Optional[EnrolCommands] = None  # (the same): MQTT enrolment commands
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._threads: List[threading.Thread] = []
        self.ready = False
        self.status_text = "starting"
        self.counters = Counters()
        self.status = StatusBoard(self)
        self.health = self.status.health
        self.events = EventSink(self, events_out)
        self.sets = ModelSets(self)
        self.recognizer = Recognizer(self)
        self.flow = FrameFlow(self, self._stop)
        self.stats = StatsReport(self)

    @property
    def service(self) -> Optional[ServiceSet]:
        """The set in service (models and gallery)."""
        return self.sets.current

    @service.setter
    def service(self, svc: Optional[ServiceSet]) -> None:
        if svc is None:
            self.sets.holder.stop(close=False)
        else:
            first = self.sets.current is None
            self.sets.swap(svc, trigger="start" if first else "reload")
            self.sets.holder.release_previous()

    # ------------------------------------------------------------------ start

    def start(self, camera_wait: float = 20.0) -> None:
        cfg = self.cfg
        self.sets.check_paths(cfg)
        quiet_opencv()
        for cam in cfg.cameras:
            why = preflight(cam)
            if why:
                raise StartupError(why, config=True)
        _warn_if_root()
        self._start_http(cfg)
        state = state_dir(cfg)
        self.kept = TrackStore.for_daemon(cfg)
        self.commands = EnrolCommands(self) if cfg.enrolment.keep_faces else None
        loaded_since = time.time()  # drops that arrive from now on are taken (edged.ota)
        self._load(cfg)
        self._start_publisher(cfg, state)
        for cs in cfg.cameras:
            self.add_camera(cs)
        if not wait_for_cameras(self.cameras, self._stop, camera_wait):
            return
        self.sets.warm_up(self.service)
        self.service.gallery.keep_last_good()  # the gallery the next start falls back to
        self._spawn("events", self.events.run)
        self._spawn("track", self.flow.track_loop)
        for i in range(len(self.service.pipelines)):
            self._spawn(f"detect-{i}", lambda i=i: self.flow.detect_loop(i))
        drops.start_drops(self, since=loaded_since, restore=True)
        if self.publisher.on_command is not None:
            self.commands.start()
        self.ready = True
        self.health.phase = "running"
        self.status.check_health(force=True)
        self.status_text = self.status.line()
        self.notifier.ready(self.status_text)
        log.info("edged %s ready: device %s, %d camera(s)", __version__, self.device,
                 len(self.cameras))

    def _load(self, cfg) -> None:
        """The first set in service, and one journal line saying what it is."""
        t0 = time.monotonic()
        self.service = svc = self.sets.build(cfg)
        if svc.installed:  # off the start's path: it writes (and fsyncs) a few MB
            threading.Thread(target=self.sets.keep_installed, args=(list(svc.installed),),
                             name="keep-installed", daemon=True).start()
        g, acc = svc.gallery.current, svc.accelerators
        log.info("models loaded in %.2f s: embedder %s, gallery %s (%d people, %s); "
                 "detector on %s, embedder on %s",
                 time.monotonic() - t0, svc.versions["embedder"][:12],
                 (svc.versions.get("gallery") or "none")[:12], len(self.sets.people()),
                 f"{getattr(g, 'rows', '?')} rows {getattr(g, 'dtype_name', '?')}, "
                 f"scan {getattr(g, 'scan', '?')}" if g is not None else "no gallery",
                 acc.get("detector", "?"), acc.get("embedder", "?"))
        log.info("identification at %s", modelset.threshold_note(cfg, svc))

    def _start_publisher(self, cfg, state: Path) -> None:
        from edged.publish.publisher import Publisher

        try:
            commands = self.commands is not None and cfg.enrolment.mqtt_commands
            self.publisher = Publisher(
                cfg.mqtt, self.device, state, people=self.sets.people(),
                on_command=self.commands.submit if commands else None,
                enrolment={"image": self.kept is not None and cfg.mqtt.snapshots,
                           "commands": commands})
        except (ValueError, OSError) as exc:  # a setting that can never work (names the key)
            self.service.gallery.stop()
            raise StartupError(str(exc), config=isinstance(exc, ValueError)) from exc
        # the whole first status in one update, with what the start reported so far (a
        # gallery refused): the first status retained has all its parts
        first = self.status.parts()
        first.update(versions=self.service.versions, accelerators=self.service.accelerators,
                     cameras={c.name: {"connected": False} for c in cfg.cameras},
                     config=str(self.config_path) if self.config_path else None,
                     drops=dict(self.status.drop_counts), state_dir=str(state),
                     drop_dir=drops.drop_dir(self, cfg), **self.health.document())
        self.status.update(_replace=tuple(first), **first)
        self.publisher.start()

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

    def add_camera(self, cs) -> None:
        self.recognizer.add_camera(cs.name)
        self.flow.add_camera(cs.name)
        self.status.camera_since[cs.name] = time.monotonic()
        cam = Camera(cs, self.hub)
        self.cameras[cs.name] = cam
        cam.start()

    def _spawn(self, name: str, target) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

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
        self.health.progressed(self.counters.progress)
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
        last = dict.fromkeys(("ping", "health", "stats"), time.monotonic())
        last["status"] = 0.0
        while not self._stop.wait(0.1):
            if self._reload.is_set():
                self._reload.clear()
                reload.reload_with_pings(self, ping_every)
            self._tick(time.monotonic(), last, ping_every)
            if self.exit_when_done and self._all_done():
                log.info("every source has ended; stopping")
                break

    def _tick(self, now: float, last: dict, ping_every) -> None:
        """One step of the main loop: cameras, watchdog, health, status, drops, stats."""
        for cam in self.cameras.values():
            cam.check()
        if ping_every and now - last["ping"] >= ping_every:
            if self.health.progressed(self.counters.progress):
                self.notifier.watchdog()
            # on a fixed grid (the loop's own steps do not stretch the interval), never
            # two pings in a row after a long step
            last["ping"] = max(last["ping"] + ping_every, now - ping_every / 2)
        if now - last["health"] >= HEALTH_EVERY_S:
            last["health"] = now
            self.status.check_health()
        if now - last["status"] >= STATUS_EVERY_S:
            last["status"] = now
            self.status_text = self.status.line()
            self.notifier.status(self.status_text)
            self.status.update(cameras=self.status.cameras())
        if self.ota is not None:
            try:
                self.ota.tick()
            except Exception:  # a drop problem never stops the daemon
                log.exception("drops: periodic check failed")
        if self.status.dirty:
            self.status.write_file()
        if now - last["stats"] >= float(getattr(self.cfg.mqtt, "stats_interval_s", 30.0)):
            last["stats"] = now
            if self.publisher is not None:
                self.publisher.publish_stats(self.stats.document())

    def _all_done(self) -> bool:
        if not all(c.finished for c in self.cameras.values()):
            return False
        # the last frames may still be in the hub or in the pipeline
        delivered = sum(c.frames_delivered for c in self.cameras.values())
        dropped = sum(self.hub.dropped.values())
        return self.hub.empty() and self.counters.frames_done_total >= delivered - dropped

    # ------------------------------------------------------------------ stop

    def stop(self, timeout: float = 5.0) -> int:
        """Stop everything within a few seconds; flush the trackers' last events."""
        self.notifier.stopping("stopping")
        log.info("stopping")
        t0 = time.monotonic()
        self._stop.set()
        self._stop_inputs(timeout)
        self.recognizer.end_all("stop", self.service.versions if self.service else None)
        self.events.close()
        self._join(lambda name: name == "events", timeout)
        if self.commands is not None:
            self.commands.stop()
        self.health.phase = "stopped"
        if self.service is not None:  # before the publisher's last (retained) status
            self.status.update(_replace=("cameras", "problems"), **self.status.stopped())
        if self.publisher is not None:
            self.publisher.stop(clean=True)
        if self.service is not None:
            self.status.write_file()
            self.sets.holder.stop(close=True)
        if self.http is not None:  # last: a scrape until then sees the daemon stop
            self.http.stop()
        alive = [t.name for t in threading.enumerate()
                 if t.name.startswith(("capture-", "detect-", "track", "events")) and t.is_alive()]
        log.info("stopped in %.2f s%s", time.monotonic() - t0,
                 f" (still running: {', '.join(alive)})" if alive else "")
        self.notifier.close()
        return 0

    def _stop_inputs(self, timeout: float) -> None:
        """The drops, the cameras and the frame flow, in that order."""
        if self.ota is not None:
            self.ota.stop()
        for cam in self.cameras.values():
            cam._stop.set()
        self.hub.close()
        for cam in self.cameras.values():
            if not cam.stop(timeout=2.0):
                log.warning("camera %s: capture thread did not stop in time (blocked in a read)",
                            cam.name, extra=fields(camera=cam.name))
        self._join(lambda name: name.startswith("detect-") or name == "track", timeout)

    def _join(self, which, timeout: float) -> None:
        for t in self._threads:
            if which(t.name):
                t.join(timeout)

    # ------------------------------------------------------------------ reload (SIGHUP)

    def reload(self) -> bool:
        """Re-read the configuration, the gallery and the models; keep the old set on error
        (edged.daemon.reload)."""
        return reload.reload(self)


def _warn_if_root() -> None:
    """Once per process: edged does not need root (the unit runs it as the edged user)."""
    if os.geteuid() == 0 and not getattr(_warn_if_root, "said", False):
        _warn_if_root.said = True
        log.warning("running as root: edged needs no privileges; run it as its own user "
                    "(the systemd unit does: User=edged), which keeps the galleries and the "
                    "state directory out of reach of other services")


def state_dir(cfg) -> Path:
    """``paths.state_dir``, made (0750: galleries are biometric data) and writable."""
    state = Path(cfg.paths.state_dir)
    try:  # (galleries are biometric data: not for every user of the machine)
        state.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    except OSError as exc:
        raise StartupError(f"paths.state_dir: cannot create {state}: {exc}") from exc
    try:  # the spool, the status file and the kept models and galleries go there
        with tempfile.TemporaryFile(dir=state):
            pass
    except OSError as exc:
        raise StartupError(f"paths.state_dir: cannot write in {state}: {exc}") from exc
    return state


def wait_for_cameras(cameras: dict, stop: threading.Event, camera_wait: float) -> bool:
    """Up to ``camera_wait`` s for each camera's first frame; False: a stop came meanwhile."""
    deadline = time.monotonic() + camera_wait
    for cam in cameras.values():
        # in short steps: a SIGTERM meanwhile ends the wait (run() then stops at once)
        while not cam.first_frame.is_set() and not stop.is_set() \
                and time.monotonic() < deadline:
            cam.first_frame.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
        if stop.is_set():
            log.info("stop requested while waiting for the cameras")
            return False
        if not cam.first_frame.is_set():
            log.warning("camera %s: no frame after %.0f s; starting anyway, it keeps "
                        "reconnecting (%s)", cam.name, camera_wait, cam.last_error,
                        extra=fields(camera=cam.name))
    return True
