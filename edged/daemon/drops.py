"""The drop manager's place in the service: started with what a restart left in progress,
moved when a reload changes the gallery path or the drop directory (edged.ota.drops)."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from edged.runtime import modelstore

log = logging.getLogger("edged.daemon")


def drop_dir(daemon, cfg) -> Optional[str]:
    """The directory watched for model drops under ``cfg`` (None: model drops off)."""
    if not cfg.drops.enabled:
        return None
    if cfg.paths.drop_dir:
        return cfg.paths.drop_dir
    return str(daemon.sets.models_dir(cfg))


def new_drop_manager(daemon):
    """A drop manager for the configuration in force, knowing the repository's manifest."""
    from edged.ota.drops import DropManager

    try:
        manifest = modelstore.Manifest.load()
    except modelstore.ModelError as exc:
        log.warning("drops: %s; only drops with their own manifest are taken", exc)
        manifest = None
    cfg = daemon.cfg
    return DropManager(daemon, drop_dir(daemon, cfg), cfg.paths.gallery, manifest, cfg.drops)


def start_drops(daemon, since: Optional[float] = None, restore: bool = False) -> None:
    """Watch the drop directory and the gallery path (edged.ota); ``since``: take the
    files that arrived from then on, before the watchers started; ``restore``: hold back
    again the embedder held back before the restart."""
    kept = Path(daemon.cfg.paths.state_dir) / "models" / "in-service.json"
    ota = daemon.ota = new_drop_manager(daemon)
    if kept.is_file():
        try:
            ota.learn(modelstore.Manifest.load(kept))
        except modelstore.ModelError:
            pass
    gallery_waits, waiting = False, []
    if restore and daemon.cfg.drops.enabled:
        try:
            gallery_waits = ota.restore_held()
            waiting = ota.restore_pending()
        except Exception:
            log.exception("drops: restoring the drops in progress failed")
    todo = waiting + ([ota.gallery_path] if gallery_waits else [])
    ota.start(since=since, skip=todo)  # (those are handled once, below)
    daemon.status.update(_replace=("held_back",), drop_dir=drop_dir(daemon, daemon.cfg),
                         held_back=ota.held_status() or {})
    if todo:  # after the status: the drops' own reports come last
        threading.Thread(target=lambda: [ota._on_file(p) for p in todo],
                         name="drops-restored", daemon=True).start()


def restart_drops(daemon) -> None:
    """A reload moved the gallery path or the drop directory: watch the new ones.  What the
    old drop manager learnt (the models it accepted, an embedder held back) carries over.

    All under the old manager's lock (which the new one shares): no drop is being handled
    and none is on probation while the new one takes over, so each file is handled by
    exactly one of them.  If the new places cannot be watched, the old ones stay watched,
    and the journal says so.  The old watchers are stopped in the background (their
    threads may wait for the lock a while)."""
    old = daemon.ota
    new = new_drop_manager(daemon)
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
        daemon.ota = new
    threading.Thread(target=old.stop, name="drops-stop", daemon=True).start()
    daemon.status.update(_replace=("held_back",), drop_dir=new.drop_dir and str(new.drop_dir),
                         held_back=new.held_status() or {})
    log.info("reload: drops now watched at %s (gallery %s)",
             new.drop_dir or "(model drops off)", new.gallery_path)
    if new.held_gallery_waiting():  # the moved path already holds the held one's gallery
        threading.Thread(target=new._on_file, args=(new.gallery_path,),
                         name="drops-held", daemon=True).start()
