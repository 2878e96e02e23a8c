"""What a drop in progress leaves for later, kept across restarts: the embedder held back until
a gallery made by it arrives, and the drop manifests waiting for their files."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import List, Optional

from edged.runtime import modelstore
from edged.ota.intake import DropRejected, digest_file, iso, short
from edged.ota.modelcheck import self_test
from edged.ota.store import HELD_DIR, PENDING_DOC, load_held, save_held

log = logging.getLogger("edged.ota")


class DropsInProgress:
    """The embedder held back and the waiting manifests, on disk and back at start;
    a mixin of :class:`edged.ota.drops.DropManager`: it works on the manager's state (set up
    in its ``__init__``) and calls its other parts.

    Uses ``d``, ``held``, ``pending``, ``waiting_since``, ``gallery_path``, ``_match`` and
    ``_accel``.
    """

    def _state_dir(self) -> Optional[str]:
        """``paths.state_dir`` of the daemon (None for a daemon without a configuration)."""
        return getattr(getattr(getattr(self.d, "cfg", None), "paths", None), "state_dir", None)

    def _keep_held(self) -> None:
        state = self._state_dir()
        if not state:
            return
        try:
            save_held(state, self.held)
        except OSError as exc:
            log.warning("drops: cannot keep the held-back embedder for the next start: %s", exc)

    def restore_held(self) -> bool:
        """At start: the embedder held back before the restart is held back again.  Returns
        True when the gallery at the gallery path was made by it meanwhile (then the caller
        hands that file to :meth:`handle`, once the status says what is held)."""
        state = self._state_dir()
        try:
            held = load_held(state)
        except DropRejected as exc:
            log.warning("drops: the embedder held back before the restart is lost: %s "
                        "(drop it again)", exc)
            save_held(state, None)
            return False
        if held is None:
            return False
        save_held(state, None)  # forgotten while it is checked: a crash is not retried at start
        if held.blob.sha256 == self.d.service.models["embedder"].sha256:
            return False
        try:
            self_test(held.blob, self._accel("embedder"))
        except DropRejected as exc:
            log.warning("drops: the embedder held back before the restart fails now, forgotten: "
                        "%s", exc)
            return False
        self.held = held
        self._keep_held()
        log.info("drops: embedder %s (%s) is held back again, waiting for a gallery made by it",
                 short(held.blob.sha256), held.file or held.blob.file)
        return self.held_gallery_waiting()

    def held_gallery_waiting(self) -> bool:
        """Whether the file at the gallery path was made by the embedder held back (it came
        while the watch was not on it: edged was down, or the path just moved)."""
        held = self.held
        if held is None:
            return False
        try:
            from edged.gallery import peek_embedder
            return peek_embedder(self.gallery_path) == held.blob.sha256
        except Exception:
            return False

    def held_status(self) -> Optional[dict]:
        h = self.held
        if h is None:
            return None
        return {"embedder": h.blob.sha256, "file": h.file, "since": iso(h.since),
                "waiting_for": f"a gallery made by embedder {h.blob.sha256}"}

    def _pending_doc(self) -> Optional[Path]:
        state = self._state_dir()
        return Path(state) / HELD_DIR / PENDING_DOC if state else None

    def _keep_pending(self) -> None:
        """Keep the list of manifests waiting for their files across restarts (written only
        when it changed)."""
        doc_path = self._pending_doc()
        want = sorted(str(p) for p in self.pending)
        if doc_path is None or want == getattr(self, "_pending_kept", None):
            return
        try:
            if want:
                doc_path.parent.mkdir(parents=True, exist_ok=True)
                entries = []
                for p in want:
                    try:
                        entries.append({"manifest": p, "sha256": digest_file(Path(p)),
                                        "since": self.waiting_since.get(Path(p), time.time())})
                    except DropRejected:
                        pass
                modelstore.atomic_write(doc_path, (json.dumps({"waiting": entries}, indent=2)
                                                   + "\n").encode())
            else:
                try:
                    os.unlink(doc_path)
                except FileNotFoundError:
                    pass
            self._pending_kept = want
        except OSError as exc:
            log.warning("drops: cannot keep the waiting manifests for the next start: %s", exc)

    def restore_pending(self) -> List[Path]:
        """At start: the manifests that were waiting for their files before the restart and
        are still there, unchanged (the caller hands them to :meth:`handle` again)."""
        doc_path = self._pending_doc()
        if doc_path is None or not doc_path.is_file():
            return []
        try:
            entries = json.loads(doc_path.read_text())["waiting"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("drops: %s is unusable (%s); waiting manifests are forgotten",
                        doc_path, exc)
            return []
        out = []
        for e in entries:
            try:
                p = Path(e["manifest"])
                if self._match(str(p)) and digest_file(p) == e["sha256"]:
                    out.append(p)
                    self.waiting_since[p] = float(e.get("since") or time.time())
            except (DropRejected, KeyError, TypeError, ValueError):
                continue
        if out:
            log.info("drops: %d manifest(s) were waiting for their files before the restart: "
                     "%s", len(out), ", ".join(str(p) for p in out))
        return out
