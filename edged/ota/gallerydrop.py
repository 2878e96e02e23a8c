"""Gallery drops: a gallery at the gallery path, taken when the embedder in service made it,
swapped together with the held-back embedder when that one made it, refused otherwise."""
from __future__ import annotations

from pathlib import Path

from edged.ota.intake import short


class GalleryDrops:
    """The file at the gallery path;
    a mixin of :class:`edged.ota.drops.DropManager`: it works on the manager's state (set up
    in its ``__init__``) and calls its other parts.

    Uses ``d``, ``held`` and the other parts' ``_keep_held`` and ``_swap``.
    """

    def handle_gallery(self, path: Path, t0: float) -> None:
        from edged.gallery import GalleryError, peek_embedder

        svc = self.d.service
        try:
            made_by = peek_embedder(path)  # the live file: read, never mapped
        except GalleryError:
            svc.gallery.holder.reload(path, trigger="drop")  # refused with the exact reason
            return
        in_service = svc.models["embedder"].sha256
        held = self.held
        if made_by == in_service:
            svc.gallery.holder.reload(path, trigger="drop")
            return
        if held is None or made_by != held.blob.sha256:
            svc.gallery.holder.reject(
                path, f"made by embedder {short(made_by)}, which is neither in service "
                      f"({short(in_service)}) nor held back "
                      f"({short(held.blob.sha256) if held else 'none'})", trigger="drop",
                started=t0, new_version=None)
            return
        # the held-back embedder and its gallery: validate the gallery, then swap both at once
        holder = self.d.sets.new_gallery_holder(held.blob.sha256)
        try:
            gal = holder.holder.prepare(path)
        except Exception as exc:
            holder.stop()
            reason = getattr(exc, "reason", None) or str(exc)
            svc.gallery.holder.reject(path, reason, trigger="drop", started=t0)
            return
        holder.holder.commit(gal, path, trigger="drop", started=t0)  # not in service yet
        holder.holder.on_event = self.d.sets.gallery_event_handler(holder)
        # forgotten on disk before the attempt: an embedder that crashes the process when it
        # is built must not be tried again at every start
        self.held = None
        self._keep_held()
        try:
            self._swap({"embedder": held.blob}, holder, path, t0, kind="models+gallery",
                       files=[held.file, str(path)])
        except BaseException:
            self.held = held
            self._keep_held()
            holder.stop()
            raise
