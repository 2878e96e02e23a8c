"""Model drops: a drop manifest and the files it names (waited for while they are copied), a
bare model known by its sha256, checked and put in service (or its embedder held back)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, List

from edged.runtime import modelstore
from edged.ota.intake import (DROP_ROLES, LIMIT_NAME, DropRejected, arrived_before, check_file,
                              digest_model, load_manifest, read_model, short, signature)
from edged.ota.modelcheck import check_drop, prepare_model, self_test
from edged.ota.store import HeldEmbedder, ModelBlob

log = logging.getLogger("edged.ota")

#: how long a manifest waits when the file of that name is older than itself and not the one it
#: names (a copy of the new file may not have begun yet), before it is refused
STALE_WAIT_S = 60.0


class ModelDrops:
    """Manifests, the files they name and bare models;
    a mixin of :class:`edged.ota.drops.DropManager`: it works on the manager's state (set up
    in its ``__init__``) and calls its other parts.

    Uses ``d``, ``settings``, ``known`` (``learn``), ``pending``, ``orphans``, ``stale``,
    ``waiting_since``, ``fresh``, ``taken``, ``held``, ``probation``, and the other parts'
    ``_report``, ``_outcome``, ``_keep_held``, ``_keep_pending`` and ``_swap``.
    """

    def handle_manifest(self, path: Path, t0: float) -> None:
        # a manifest written over one that waits for its files replaces it, even a bad one
        if path in self.pending:
            self._forget(path)
            log.info("drop %s: replaces the manifest of that name that waited for its files",
                     path)
        since = self.waiting_since.pop(path, None)  # (restored: it waited before the restart)
        manifest = load_manifest(path)
        if not manifest.entries:
            raise DropRejected(f"{path}: the manifest lists no model")
        limit = self.settings.max_bytes
        for e in manifest.entries.values():
            if e.role not in DROP_ROLES:
                raise DropRejected(f"{path}: role {e.role!r} is not used by the daemon "
                                   f"(roles: {', '.join(DROP_ROLES)})")
            if os.path.basename(e.file) != e.file:
                raise DropRejected(f"{path}: file {e.file!r} must be a plain name next to "
                                   f"the manifest")
            if e.size > limit:
                raise DropRejected(f"{path}: {e.file} is {e.size} bytes, more than "
                                   f"{LIMIT_NAME} ({limit})")
        for e in manifest.entries.values():
            if self.orphans.pop(path.parent / e.file, None) is not None:
                self.fresh.add(path.parent / e.file)
        self.pending[path] = manifest
        if since is not None:
            self.waiting_since[path] = since
        self._try_manifest(path, t0)

    def _forget(self, path: Path) -> None:
        """The manifest ``path`` waits no more (handled, refused or replaced)."""
        manifest = self.pending.pop(path, None)
        self.stale.pop(path, None)
        self.waiting_since.pop(path, None)
        for e in (manifest.entries.values() if manifest is not None else ()):
            self.fresh.discard(path.parent / e.file)

    def _missing(self, path: Path, manifest) -> List[str]:
        """The files the manifest names that are not there yet, or not all there (a copy in
        progress: its size differs); refuses one that is no file to read (a link...)."""
        missing = []
        for e in manifest.entries.values():
            f = path.parent / e.file
            try:
                st = os.lstat(f)
            except OSError:
                missing.append(e.file)
                continue
            check_file(f, st, self.settings.max_bytes)
            if st.st_size != e.size:
                missing.append(f"{e.file} ({st.st_size} of {e.size} bytes)")
        return missing

    def _wait(self, path: Path, t0: float, why: str) -> bool:
        self.waiting_since.setdefault(path, time.time())
        self._keep_pending()  # on disk before it is reported waiting
        self._report("waiting", "models", path, t0, why=why)
        return False

    def _try_manifest(self, path: Path, t0: float) -> bool:
        try:
            return self._attempt(path, t0)
        except DropRejected:
            self._forget(path)
            raise

    def _attempt(self, path: Path, t0: float) -> bool:
        manifest = self.pending[path]
        missing = self._missing(path, manifest)
        if missing:
            return self._wait(path, t0, f"waiting for {', '.join(missing)} named by the "
                                        f"manifest")
        if self._handled_bare(path, manifest):
            return True
        blobs = {}
        for e in manifest.entries.values():
            f = path.parent / e.file
            data, sig = read_model(f, self.settings.max_bytes)
            if f not in self.fresh and arrived_before(f, path) \
                    and modelstore.sha256_bytes(data) != e.sha256:
                # the file of that name from before the manifest (a new version of a model
                # often has the same size): its replacement may still be coming
                since, _ = self.stale.setdefault(path, (time.monotonic(), t0))
                if time.monotonic() - since < STALE_WAIT_S:
                    return self._wait(path, t0, (
                        f"waiting for {e.file} named by the manifest (the one there is older "
                        f"than the manifest and is not the file it names)"))
            blobs[e.role] = (e, f, data, sig)
        self._forget(path)
        self._keep_pending()  # off the disk (if it was kept) before the swap is reported
        for e, f, _, sig in blobs.values():  # (their own events, if still to come, are not
            self._took(f, sig, e.sha256, str(path))  # another drop)
        blobs = {role: prepare_model(role, data, f, e.sha256, e.size, e.derived_sha256 or None)
                 for role, (e, f, data, _) in blobs.items()}
        self._install(blobs, path, t0)
        self.learn(manifest)
        return True

    def _handled_bare(self, path: Path, manifest) -> bool:
        """Whether every file the manifest names was handled already, as it is now and with
        the sha256 it names, as a model known without a manifest (dropped just before its
        manifest): then the drop has had its outcome, and the manifest only teaches its
        sha256s."""
        for e in manifest.entries.values():
            f = path.parent / e.file
            t = self.taken.get(f)
            try:
                if t is None or t[1:] != (e.sha256, "") or t[0] != signature(os.lstat(f)):
                    return False
            except OSError:
                return False
        self._forget(path)
        self.learn(manifest)
        log.info("drop %s: its files were handled already (%s): one drop, one outcome", path,
                 ", ".join(e.file for e in manifest.entries.values()))
        return True

    def _took(self, f: Path, sig: tuple, sha: str, by: str) -> None:
        """Remember that this version of ``f`` has had its outcome (``by``: the manifest, or
        "" for a bare model)."""
        if len(self.taken) >= 256:  # forget the files changed or gone since
            for p, (old, _, _) in list(self.taken.items()):
                try:
                    if signature(os.lstat(p)) != old:
                        del self.taken[p]
                except OSError:
                    del self.taken[p]
        self.taken[f] = (sig, sha, by)

    def handle_model(self, path: Path, t0: float) -> None:
        self.orphans.pop(path, None)
        t = self.taken.get(path)
        if t is not None:
            try:
                if signature(os.lstat(path)) == t[0]:  # this very file had its outcome
                    log.debug("drop %s: handled already (%s)", path, t[2] or "bare model")
                    return
            except OSError:
                pass
        for mpath, manifest in list(self.pending.items()):
            if any(mpath.parent / e.file == path for e in manifest.entries.values()):
                self.fresh.add(path)  # its arrival reported: the drop's own file
                self._try_manifest(mpath, t0)
                return
        limit = self.settings.max_bytes
        sha, size, sig = digest_model(path, limit)
        known = self.known.get(sha)
        if known is None:  # its manifest may follow: refused only if none comes in time
            self.orphans[path] = (time.monotonic(), t0, sha, size)
            log.debug("%s: unknown sha256 %s; waiting %.1f s for a manifest", path, sha,
                      self.settings.manifest_wait_s)
            return
        self._took(path, sig, sha, "")
        role, derived_sha = known
        if role not in DROP_ROLES:
            self._report("unchanged", "models", path, t0,
                         why=f"role {role!r} is not used by the daemon")
            return
        data, _ = read_model(path, limit)
        self._install({role: prepare_model(role, data, path, sha, 0, derived_sha or None)},
                      path, t0)

    def _install(self, blobs: Dict[str, ModelBlob], path: Path, t0: float) -> None:
        svc = self.d.service
        current = svc.models
        if "antispoof" in blobs and svc.pipeline.liveness is None:
            raise DropRejected(f"{path}: an antispoof model, but liveness.enabled is false: "
                               f"the daemon runs none (enable liveness, then drop it again)")
        changed = {r: b for r, b in blobs.items()
                   if r not in current or current[r].sha256 != b.sha256}
        if not changed:  # (an embedder held back stays held)
            self._report("unchanged", "models", path, t0, why="already in service")
            return
        for blob in changed.values():
            check_drop(blob.role, blob.data, blob.file, self.d)  # memory, before any interpreter
            self_test(blob, self._accel(blob.role))
        new_emb = changed.pop("embedder", None)
        gallery = svc.gallery.current
        if new_emb is not None and gallery is not None and gallery.embedder_sha256 != new_emb.sha256:
            prev = self.held
            self.held = HeldEmbedder(new_emb, file=str(path))
            self._keep_held()
            why = (f"embedder {short(new_emb.sha256)} differs from the gallery's "
                   f"{short(gallery.embedder_sha256)}: held back until a gallery made by it arrives")
            if prev is not None:
                why += f" (replaces held-back {short(prev.blob.sha256)})"
            self._report("held_back", "models", path, t0, why=why,
                         new={"embedder": new_emb.sha256})
            if not changed:
                return
        elif new_emb is not None:
            changed["embedder"] = new_emb
        if not changed:
            return
        holder = None
        if "embedder" in changed:  # (no gallery in service) a holder for the new embedder's
            holder = self.d.sets.new_gallery_holder(changed["embedder"].sha256)  # galleries
            holder.holder.on_event = self.d.sets.gallery_event_handler(holder)
        try:
            self._swap(changed, holder, path, t0, kind="models")
        except BaseException:
            if holder is not None:
                holder.stop()
            raise

    def _accel(self, role: str):
        cfg = self.d.cfg.models
        if role == "antispoof":
            return None  # (the liveness stage runs on the CPU: edged.vision.liveness)
        return cfg.embedder if role == "embedder" else cfg.detector

    # -- what waited too long (tick) ----------------------------------------------------------

    def _refuse_overdue(self) -> None:
        """(:meth:`tick`, under the lock) Refuse the manifests past their deadline, those whose
        older file of that name was not replaced within STALE_WAIT_S, and the model files that
        no manifest claimed within drops.manifest_wait_s."""
        self._expire_waiting()
        now = time.monotonic()
        for path, (seen, t0) in list(self.stale.items()):
            if self.probation is not None:
                break  # (handled at a later tick: never a swap during a probation)
            if now - seen >= STALE_WAIT_S and path in self.pending:
                # refused now with the file's own reason (its sha256 mismatch)
                self._outcome(path, t0, lambda: self._try_manifest(path, t0))
            elif path not in self.pending:
                del self.stale[path]
        for path, (seen, t0, sha, size) in list(self.orphans.items()):
            if now - seen < self.settings.manifest_wait_s:
                continue
            del self.orphans[path]
            self._report("rejected", "models", path, t0, why=(
                f"{path}: sha256 {sha} ({size} bytes) is not a model of the manifest in "
                f"force and no drop manifest names it (half-copied or corrupt file? drop "
                f"it with a manifest, or with 'edged drop')"))

    def _expire_waiting(self) -> None:
        """Refuse the manifests that waited for their files longer than
        drops.manifest_deadline_s (from when they began to wait, restarts included)."""
        limit = self.settings.manifest_deadline_s
        for path, since in list(self.waiting_since.items()):
            waited = time.time() - since
            if path in self.pending and waited >= limit:  # (not yet pending: restored)
                self._outcome(path, time.monotonic() - waited,
                              lambda: self._refuse_late(path, limit))

    def _refuse_late(self, path: Path, limit: float) -> None:
        try:
            missing = self._missing(path, self.pending[path]) or [
                "the files there are not the ones it names"]
        finally:
            self._forget(path)
        raise DropRejected(f"{path}: its files did not all arrive within "
                           f"drops.manifest_deadline_s ({limit:g} s): {', '.join(missing)}")
