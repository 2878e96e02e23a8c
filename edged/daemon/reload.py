"""SIGHUP: the configuration, the gallery and the models read again and put in force
between two frames; on any error the running set and configuration stay (and the journal and
systemd's status say why)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Optional

from edged import config as configmod
from edged.daemon import drops
from edged.daemon.capture import preflight
from edged.enrolment.store import TrackStore
from edged.ota import modelset
from edged.ota.modelset import ServiceSet, StartupError

log = logging.getLogger("edged.daemon")


def reload(daemon) -> bool:
    """Re-read the configuration, the gallery and the models; keep the old set on error."""
    daemon.notifier.reloading("reloading configuration, gallery and models")
    log.info("reloading (SIGHUP)")
    old_threshold = modelset.threshold(daemon.cfg, daemon.service)
    new = None
    try:
        cfg = _read_config(daemon)
        new = daemon.sets.build(cfg)
        daemon.sets.warm_up(new)
        # one swap at a time: a drop (or its probation) in progress finishes first, and no
        # drop starts until this set is in service and the previous one released
        with (daemon.ota._lock if daemon.ota is not None else contextlib.nullcontext()):
            if daemon.ota is not None:
                daemon.ota.wait_probation()
            daemon.sets.swap(new)
            daemon.sets.holder.release_previous()  # closes the old set's gallery
            new.gallery.keep_last_good()
    except Exception as exc:
        _reload_failed(daemon, exc, new)
        return False
    if (cfg.tracking != daemon.cfg.tracking or cfg.liveness != daemon.cfg.liveness
            or modelset.threshold(cfg, new) != old_threshold):
        daemon.recognizer.restart_trackers(cfg, new, why="reload")
    _apply(daemon, cfg, new)
    daemon.status_text = daemon.status.line()
    daemon.notifier.ready(daemon.status_text)
    log.info("reloaded: embedder %s, gallery %s, identification at %s",
             new.versions["embedder"][:12], (new.versions.get("gallery") or "none")[:12],
             modelset.threshold_note(daemon.cfg, new))
    return True


def reload_with_pings(daemon, ping_every: Optional[float]) -> bool:
    """reload() on the main thread, while a helper thread feeds the systemd watchdog as the
    main loop does (only while frames go through): loading new models, warming them up on
    a slow accelerator or waiting for a drop's probation may take longer than the
    watchdog's interval."""
    if not ping_every:
        return daemon.reload()
    done = threading.Event()

    def ping():
        while not done.wait(ping_every):
            if daemon.health.progressed(daemon.counters.progress):
                daemon.notifier.watchdog()

    t = threading.Thread(target=ping, name="reload-watchdog", daemon=True)
    t.start()
    try:
        return daemon.reload()
    finally:
        done.set()


def _read_config(daemon):
    """The configuration file again (the one in force without one), checked."""
    cfg = daemon.cfg
    if daemon.config_path is not None:
        cfg = configmod.load(daemon.config_path)
        configmod.resolve_paths(cfg)
    if cfg.pipeline.workers != daemon.cfg.pipeline.workers:
        # one detector per detection thread, and the threads are started once
        log.warning("reload: pipeline.workers changed from %d to %d; it takes effect at "
                    "the next restart", daemon.cfg.pipeline.workers, cfg.pipeline.workers)
        cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(
            cfg.pipeline, workers=daemon.cfg.pipeline.workers))
    daemon.sets.check_paths(cfg)
    return cfg


def _reload_failed(daemon, exc: Exception, new: Optional[ServiceSet]) -> None:
    if isinstance(exc, (configmod.ConfigError, StartupError)):
        log.error("reload failed, keeping the running configuration: %s", exc)
    else:
        log.exception("reload failed, keeping the running configuration: %s", exc)
    if new is not None and daemon.service is not new:
        try:
            new.gallery.stop()  # the set that was not put in service
        except Exception:
            log.exception("reload: closing the unused gallery failed")
    daemon.notifier.ready(f"reload failed: {(str(exc) or type(exc).__name__).splitlines()[0]}")


def _apply(daemon, cfg, new: ServiceSet) -> None:
    """The reloaded configuration in force: drops moved, cameras changed, added, removed."""
    old_cams = {c.name: c for c in daemon.cfg.cameras}
    new_cams = {c.name: c for c in cfg.cameras}
    if cfg.mqtt != daemon.cfg.mqtt:
        log.warning("reload: MQTT settings changed; they take effect at the next restart")
    if cfg.http != daemon.cfg.http:
        log.warning("reload: http settings changed; they take effect at the next restart")
    old_cfg = daemon.cfg
    daemon.cfg = dataclasses.replace(cfg, mqtt=daemon.cfg.mqtt, http=daemon.cfg.http)
    if cfg.enrolment != old_cfg.enrolment or cfg.paths.state_dir != old_cfg.paths.state_dir:
        daemon.kept = TrackStore.for_daemon(daemon.cfg)
        if (cfg.enrolment.keep_faces, cfg.enrolment.mqtt_commands) != (
                old_cfg.enrolment.keep_faces, old_cfg.enrolment.mqtt_commands):
            log.warning("reload: enrolment.keep_faces and mqtt_commands take effect for MQTT and "
                        "Home Assistant at the next restart")
    if daemon.ota is not None and (cfg.paths.gallery != old_cfg.paths.gallery
                                 or drops.drop_dir(daemon, cfg) != drops.drop_dir(daemon, old_cfg)
                                 or cfg.drops != old_cfg.drops):
        try:
            drops.restart_drops(daemon)
        except Exception:
            log.exception("reload: moving the drop watches failed; the old ones stay")
    # the cameras running (a camera of the old file that failed its check at the last
    # reload is not: it is only tried again below)
    for name in list(daemon.cameras):
        if new_cams.get(name) != old_cams.get(name):
            daemon.cameras.pop(name).stop()
            daemon.hub.discard(name)
            daemon.recognizer.remove_camera(name, new.versions)
    for name, cs in new_cams.items():
        if name not in daemon.cameras:
            why = preflight(cs)
            if why:
                log.error("reload: %s", why)
                continue
            daemon.add_camera(cs)
