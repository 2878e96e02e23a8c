"""The set in service (the models and the gallery, as one reference) and its lifecycle.

A :class:`ServiceSet` is built and warmed up off the hot path (at start, by a SIGHUP reload, by
an over-the-air drop), put in service with one swap of the reference that the detection workers
read once per frame (:class:`edged.ota.hotswap.SwapHolder`), kept with the set it replaced while
it is on probation, then confirmed (its models written under ``<state_dir>/models`` for the next
start) or rolled back. :class:`ModelSets` does all of that; the drop manager (edged.ota.drops)
and the service (edged.daemon.service) only ask it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from edged.logs import fields
from edged.ota.hotswap import SwapHolder
from edged.runtime import modelstore

log = logging.getLogger("edged.daemon")

ROLES = modelstore.ROLES


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
    # role -> edged.ota.store.ModelBlob: the verified bytes of every model in this set
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


class ModelSets:
    """Builds sets, swaps them in, confirms or rolls them back, keeps their models on disk.

    ``daemon``: the service, read for ``cfg``, ``models_arg`` (``--models``), ``publisher``
    (told the people of the gallery in service), ``status`` (each swap is reported there),
    ``cameras`` and ``flow`` (the frame sizes and detection widths a set is warmed up at)."""

    def __init__(self, daemon):
        self.d = daemon
        # the set in service, swapped between two frames; the set it replaced is kept until
        # the new one is confirmed (edged.ota) or released (SIGHUP)
        self.holder: SwapHolder = SwapHolder(
            "models", None, loader=None, version=set_version, closer=self.close_set,
            watch=False, keep_previous=True)
        self._swap_lock = threading.Lock()
        self._keep_lock = threading.Lock()

    @property
    def current(self) -> Optional[ServiceSet]:
        return self.holder.current

    def models_dir(self, cfg=None) -> Path:
        cfg = cfg or self.d.cfg
        return modelstore.resolve_models_dir(self.d.models_arg or cfg.paths.models_dir or None)

    def check_paths(self, cfg) -> None:
        """Refuse a ``<state_dir>/models`` that is the models or the drop directory: the daemon
        keeps the models in service there and removes the ones it wrote before (edged.ota)."""
        from edged.ota.store import check_paths

        md = self.models_dir(cfg)
        why = check_paths(cfg.paths.state_dir, md, cfg.paths.drop_dir or md)
        if why:
            raise StartupError(why, config=True)

    # ------------------------------------------------------------------ building sets

    def build(self, cfg) -> ServiceSet:
        """Load models and the gallery off the hot path; raise StartupError when impossible."""
        from edged.vision.embed import Embedder
        from edged.vision.pipeline import FacePipeline, PipelineSettings

        settings = PipelineSettings(detection=cfg.detection, quality=cfg.quality,
                                    liveness=cfg.liveness, flip=cfg.pipeline.flip,
                                    detect_width=cfg.pipeline.detect_width)
        md = self.models_dir(cfg)
        try:
            models, installed = load_models(cfg, md)
            # One detector per detection worker (interpreters are not thread-safe), one
            # embedder: only the track thread embeds.
            emb = models["embedder"]
            embedder = Embedder(emb.data, emb.sha256, cfg.models.embedder)
            live = _liveness(cfg, md, models, installed)  # None when off
            pipes = [FacePipeline(detector(models, settings, cfg), embedder, settings, live)
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
        return ServiceSet(pipelines=pipes, gallery=holder, versions=versions_of(pipe, holder),
                          accelerators=accelerators_of(pipe), models=models,
                          installed=installed)

    def new_gallery_holder(self, embedder_sha256: str, cfg=None):
        """A gallery holder for sets made with ``embedder_sha256``; not watched by itself:
        the drop manager (edged.ota) watches the gallery path for every set."""
        from edged.ota.galleryholder import GalleryHolder
        from edged.vision.embed import EmbedderSpec

        cfg = cfg or self.d.cfg
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

        cfg, cur = self.d.cfg, self.current
        models = dict(cur.models, **changed)
        settings = cur.pipeline.settings
        if "embedder" in changed:
            emb = models["embedder"]
            embedder = Embedder(emb.data, emb.sha256, cfg.models.embedder)
        else:
            embedder = cur.pipeline.embedder
        if set(changed) & {"pnet", "rnet", "onet"}:
            detectors = [detector(models, settings, cfg) for _ in cur.pipelines]
        else:
            detectors = [p.detector for p in cur.pipelines]
        live = cur.pipeline.liveness
        if "antispoof" in changed:  # (a drop: only while liveness is on, edged.ota.modeldrops)
            from edged.vision.liveness import LivenessStage

            live = LivenessStage(models["antispoof"].data, models["antispoof"].sha256,
                                 live.settings)
        pipes = [FacePipeline(det, embedder, settings, live) for det in detectors]
        gallery = gallery_holder if gallery_holder is not None else cur.gallery
        return ServiceSet(pipelines=pipes, gallery=gallery,
                          versions=versions_of(pipes[0], gallery),
                          accelerators=accelerators_of(pipes[0]), models=models)

    def warm_up(self, svc: ServiceSet, parts=None) -> None:
        """Run every interpreter once at the cameras' frame sizes (before READY / a swap), so
        that the first real frames do not pay for building the P-Net pyramid interpreters.
        ``parts``: the roles that are new (a swap warms up only those)."""
        t0 = time.monotonic()
        parts = set(parts) if parts is not None else set(ROLES)
        shapes = {(*c.resolution, self.d.flow.detect_width(c.name))
                  for c in self.d.cameras.values() if c.resolution}
        if parts & {"pnet", "rnet", "onet"}:
            for w, h, width in sorted(shapes):
                img = np.zeros((h, w, 3), np.uint8)
                for p in svc.pipelines:
                    p.detect(img, width)
        if "embedder" in parts:
            svc.pipeline.embedder.embed([np.zeros((112, 112, 3), np.uint8)],
                                        flip=svc.pipeline.settings.flip)
        log.debug("warm-up in %.2f s for %s", time.monotonic() - t0, sorted(shapes))

    def people(self, svc: Optional[ServiceSet] = None) -> List[str]:
        svc = svc or self.current
        g = svc.gallery.current if svc else None
        if g is None:
            return []
        try:
            ids = g.identities
            return sorted({name for _, name in (ids() if callable(ids) else ids)})
        except Exception:
            return []

    def _tell_people(self, svc: ServiceSet) -> None:
        if self.d.publisher is not None:
            self.d.publisher.set_people(self.people(svc))

    # ------------------------------------------------------------------ swaps

    def gallery_event_handler(self, holder):
        """``on_event`` for a set's gallery holder: report its swaps and refusals."""
        return lambda ev: self._on_gallery_event(ev, holder)

    def _on_gallery_event(self, ev, holder=None) -> None:
        """A gallery holder reports a swap or a rejection (from the drop watcher's thread)."""
        from edged.publish.payloads import iso_utc

        d = ev.as_dict() if hasattr(ev, "as_dict") else {"accepted": True, "path": str(ev)}
        ok = bool(d.get("accepted", True))
        svc = self.current
        if svc is not None and ok and (holder is None or svc.gallery is holder):
            svc.versions = versions_of(svc.pipeline, svc.gallery)
            self._tell_people(svc)
        g = holder.current if (holder is not None and ok) else None
        record = {"kind": "gallery", "file": d.get("path"), "files": [d.get("path")],
                  "result": "swapped" if ok else "rejected", "confirmed": True,
                  "why": d.get("reason") or "",
                  "old": {"gallery": d.get("old_version") or ""},
                  "new": {"gallery": d.get("new_version") or "",
                          "gallery_rows": int(g.rows) if g is not None else 0},
                  "seconds": round(float(d.get("seconds") or 0.0), 3),
                  "trigger": d.get("trigger") or "", "time": iso_utc(d.get("time") or time.time())}
        if record["trigger"] == "start" and ok:
            return  # the gallery loaded with its set: not a swap
        self.d.status.report(record)

    def swap(self, new: ServiceSet, record: Optional[dict] = None,
             trigger: str = "reload") -> ServiceSet:
        """Put ``new`` in service between two frames; return the old set.

        The old set is kept (for a rollback) until :meth:`confirm` or the next swap;
        ``record`` (a drop's outcome) is reported once the swap is done."""
        with self._swap_lock:
            old = self.current
            t0 = time.monotonic()
            self.holder.commit(new, path=(record or {}).get("file") or "set",
                               trigger=(record or {}).get("trigger", trigger), started=t0)
        self._tell_people(new)
        if record is not None:
            self.d.status.report(record)
        else:
            self.d.status.update(_replace=("versions",), versions=new.versions,
                                 accelerators=new.accelerators)
        return old

    def rollback(self, good: ServiceSet, failed: ServiceSet, why: str, record: dict) -> None:
        """The set put in service by ``record`` failed: the previous one goes back."""
        from edged.publish.payloads import iso_utc

        with self._swap_lock:
            if self.current is not failed:
                return
            ev = self.holder.rollback(why)
        if ev is None:  # nothing kept (cannot happen after swap)
            log.error("rollback impossible: no previous set kept; %s", why)
            return
        if good.gallery is not failed.gallery:  # the next start falls back to this gallery
            good.gallery.keep_last_good()
        self._tell_people(good)
        self.d.status.report({"kind": record.get("kind", "models"), "file": record.get("file"),
                              "files": record.get("files"), "result": "rolled_back", "why": why,
                              "old": dict(failed.versions), "new": dict(good.versions),
                              "seconds": round(ev.seconds, 3), "trigger": "rollback",
                              "time": iso_utc(time.time())})

    def confirm(self, new: ServiceSet, old: ServiceSet) -> None:
        """The new set did well on its first frames: let the previous one go."""
        if self.current is not new:  # replaced meanwhile (a SIGHUP reload): nothing to confirm
            log.info("swap not confirmed: the set is no longer in service (%d frame(s))",
                     new.frames)
            return
        self.holder.release_previous()
        new.gallery.keep_last_good()  # only now: a set on probation may still be rolled back
        threading.Thread(target=self._keep_models, args=(new,), name="keep-models",
                         daemon=True).start()  # never on the frame path (fsync)
        self.d.status.update(last_swap={"confirmed": True, "confirmed_after_frames": new.frames})
        log.info("swap confirmed: %d good frame(s), %d embedding call(s)", new.frames,
                 new.embeds, extra=fields(event="ota_confirmed"))

    # ------------------------------------------------------------------ kept on disk

    def _keep_models(self, svc: ServiceSet) -> None:
        """Write the confirmed set under <state_dir>/models for the next start (edged.ota)."""
        from edged.ota.store import save_in_service

        state_dir = self.d.cfg.paths.state_dir
        with self._keep_lock:
            if self.current is not svc:
                return
            try:  # only when it fits with the margin the spool needs
                modelstore.check_room(state_dir, sum(len(b.data) for b in svc.models.values()),
                                      "the models in service")
                save_in_service(state_dir, svc.models)
            except OSError as exc:
                log.warning("cannot keep the models in service for the next start: %s", exc)

    def keep_installed(self, blobs) -> None:
        """Copy the installed models this start loaded to <state_dir>/installed-copy (edged.ota)."""
        from edged.ota.store import save_installed_copy

        state_dir = self.d.cfg.paths.state_dir
        with self._keep_lock:
            try:  # only when it fits with the margin the spool needs
                modelstore.check_room(state_dir, sum(len(b.data) for b in blobs),
                                      "a copy of the installed models")
                save_installed_copy(state_dir, blobs)
            except OSError as exc:
                log.warning("cannot keep a copy of the installed models: %s", exc)

    def close_set(self, svc: ServiceSet) -> None:
        """Close what a retired set does not share with the sets still kept."""
        kept = [self.holder.current]
        prev = getattr(self.holder, "_previous", None)
        if prev is not None:
            kept.append(prev.obj)
        if any(k is not None and k.gallery is svc.gallery for k in kept):
            return
        try:
            svc.gallery.stop()
        except Exception:
            log.exception("closing a retired gallery failed")


def set_version(svc: ServiceSet) -> str:
    """``embedder 1893867f712f, onet 9465...``: a set as the journal names it."""
    v = svc.versions or {}
    det = v.get("detector") or {}
    parts = [f"embedder {str(v.get('embedder'))[:12]}"]
    if isinstance(det, dict):
        parts += [f"{k} {str(x)[:12]}" for k, x in sorted(det.items())]
    return ", ".join(parts)


def describe_change(old: dict, new: dict) -> str:
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


def load_models(cfg, md: Path):
    """role -> ModelBlob: the set last in service (drops) where kept, else the installed
    models (or the copy of one kept at an earlier start); and the installed ones read."""
    from edged.ota.store import load_in_service

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
    for role in ROLES:
        if role not in models:
            models[role] = read_installed(cfg, md, role)
            installed.append(models[role])  # (a copy too: the next start may need it again)
    return models, installed


def read_installed(cfg, md: Path, role: str):
    """The installed model of ``role`` (verified), or, when that file was replaced by a drop
    that was not confirmed (the drop directory is the models directory by default), the copy
    kept at an earlier start, if it is the model the manifest names."""
    from edged.ota.store import ModelBlob, load_installed_copy

    name = cfg.models.model_name(role)
    try:
        data, digest, path = modelstore.read_verified(role, md, name=name)
    except modelstore.ModelError as exc:
        copy = load_installed_copy(cfg.paths.state_dir, role,
                                   modelstore.Manifest.load().model(role, name).load_sha256)
        if copy is None:
            raise
        log.error("models: %s; loading the copy of the installed model kept at "
                  "%s (run 'edged models install' to restore the file)", exc, copy.file)
        return copy
    return ModelBlob(role, data, digest, str(path))


def _liveness(cfg, md: Path, models: dict, installed: list):
    """The liveness stage when ``liveness.enabled`` (else None), with the antispoof model last
    in service (a drop) or the installed one; its blob joins ``models`` (kept with the set)."""
    from edged.vision.liveness import LivenessStage

    if not cfg.liveness.enabled:
        return None
    blob = models.get("antispoof")
    if blob is None:
        blob = models["antispoof"] = read_installed(cfg, md, "antispoof")
        installed.append(blob)
    return LivenessStage(blob.data, blob.sha256, cfg.liveness)


def detector(models: dict, settings, cfg):
    from edged.vision.detect import MtcnnDetector

    return MtcnnDetector(models["pnet"].data, models["rnet"].data, models["onet"].data,
                         settings.detection, cfg.models.detector)


def versions_of(pipe, holder) -> dict:
    det = getattr(pipe.detector, "sha256s", None) or {}
    g = holder.current
    return {"embedder": pipe.embedder_sha256,
            "detector": dict(det) if isinstance(det, dict) else det,
            "gallery": g.checksum if g is not None else None,
            "gallery_rows": int(g.rows) if g is not None else 0,
            **({"antispoof": pipe.liveness.sha256} if pipe.liveness is not None else {})}


def accelerators_of(pipe) -> dict:
    """What each model actually runs on (after any fallback to the CPU)."""
    det, emb = pipe.detector, pipe.embedder
    out = {"detector": getattr(det, "delegate", "unknown"),
           "embedder": getattr(emb, "delegate", "unknown")}
    for name, obj in (("detector", det), ("embedder", getattr(emb, "runner", None))):
        why = getattr(obj, "fallback_reason", None)
        if why:
            out[name + "_fallback"] = why
    return out


def threshold(cfg, svc: Optional[ServiceSet]) -> float:
    """The identification threshold in force: ``match.threshold``, else (unset) that of
    the embedder in ``svc``, which a drop may have changed (``Config.match_settings``)."""
    return cfg.match_settings((svc.versions or {}).get("embedder") if svc else None).threshold


def threshold_note(cfg, svc: ServiceSet) -> str:
    """``"threshold 0.456 (embedder sface)"``, or ``(match.threshold)`` when set."""
    from edged.vision.embed import EmbedderSpec

    if cfg.match.threshold is not None:
        return f"threshold {cfg.match.threshold:g} (match.threshold)"
    spec = EmbedderSpec.of_model((svc.versions or {}).get("embedder") or "")
    name = spec.name if spec else cfg.models.embedder_model
    return f"threshold {threshold(cfg, svc):g} (embedder {name})"
