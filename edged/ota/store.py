"""What the over-the-air drops keep on disk across restarts, under ``paths.state_dir``.

The models in service (``models/``, :func:`save_in_service`), a copy of the installed models the
daemon started with (``installed-copy/``, :func:`save_installed_copy`) and the embedder held
back (``held/``, :func:`save_held`); each file written atomically, verified by sha256 when read.
:class:`ModelBlob` is a verified model ready to load.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from edged.runtime import modelstore
from edged.ota.intake import DROP_ROLES, ROLES, DropRejected


@dataclass
class ModelBlob:
    """A verified model ready to load: the bytes actually loaded and their sha256."""

    role: str
    data: bytes
    sha256: str  # of ``data`` (the derived dynamic-batch copy for a baked embedder)
    file: str  # where it came from
    dropped_sha256: str = ""  # of the file as dropped, when a copy was derived from it


IN_SERVICE_DIR = "models"  # under paths.state_dir
IN_SERVICE_MANIFEST = "in-service.json"
#: the names :func:`save_in_service` gives the models it keeps; nothing else there is removed
OWN_FILE = re.compile(r"(?:%s)-[0-9a-f]{16}\.tflite" % "|".join(DROP_ROLES))


def in_service_dir(state_dir) -> Path:
    return Path(state_dir) / IN_SERVICE_DIR


def check_paths(state_dir, models_dir, drop_dir) -> Optional[str]:
    """Why ``<state_dir>/models`` (where the models in service are kept, and old ones removed)
    cannot be used with these directories; None when it can."""
    kept = os.path.realpath(in_service_dir(state_dir))
    for key, d in (("paths.models_dir", models_dir), ("paths.drop_dir", drop_dir)):
        if d and os.path.realpath(d) == kept:
            return (f"paths.state_dir ({state_dir}) and {key} ({d}): {kept} would be both the "
                    f"{'models' if key == 'paths.models_dir' else 'drop'} directory and where "
                    f"the daemon keeps the models in service (<state_dir>/{IN_SERVICE_DIR}, "
                    f"whose old files it removes); use another paths.state_dir "
                    f"(default /var/lib/edged/state)")
    if drop_dir and os.path.realpath(drop_dir) == os.path.realpath(state_dir):
        return (f"paths.drop_dir ({drop_dir}) is paths.state_dir: the daemon's own files there "
                f"(status.json, the MQTT spool) would be taken as drops; use another directory")
    return None


def save_in_service(state_dir, models: Dict[str, ModelBlob]) -> Path:
    """Keep the models in service across restarts and SIGHUP reloads: their bytes (as loaded)
    under ``<state_dir>/models/`` and a manifest of them (the repository's format), each file
    written atomically, the manifest last; files no longer named are removed."""
    d = Path(state_dir) / IN_SERVICE_DIR
    roles = [role for role in DROP_ROLES if role in models]  # (antispoof: while it is on)
    blobs = [models[role] for role in roles]
    doc = {"format": "edged-model-manifest", "version": 1,
           "note": "the models edged had in service; written by the daemon (docs/ota.md)",
           "models": [{"role": role, "file": _own_name(b), "sha256": b.sha256,
                       "size": len(b.data), "dropped_as": b.file}
                      for role, b in zip(roles, blobs)]}
    _write_model_dir(d, blobs, IN_SERVICE_MANIFEST, doc)
    return d / IN_SERVICE_MANIFEST


def _own_name(b: "ModelBlob") -> str:
    return f"{b.role}-{b.sha256[:16]}.tflite"


def _write_model_dir(d: Path, blobs, doc_name: str, doc: Optional[dict]) -> None:
    """Keep ``blobs`` in ``d`` as ``ROLE-<16 hex>.tflite`` (each rewritten, atomically, only
    when it differs) and ``doc`` as ``doc_name`` (last); remove the model files of that form
    no longer named, and ``doc_name`` itself when ``doc`` is None.  Nothing else is touched."""
    keep = set()
    if doc is not None:
        d.mkdir(parents=True, exist_ok=True)
        for b in blobs:
            name = _own_name(b)
            if not (d / name).is_file() or modelstore.sha256_file(d / name) != b.sha256:
                modelstore.atomic_write(d / name, b.data)
            keep.add(name)
        modelstore.atomic_write(d / doc_name, (json.dumps(doc, indent=2) + "\n").encode())
        keep.add(doc_name)
    if not d.is_dir():
        return
    for f in os.listdir(d):
        if f not in keep and (f == doc_name or OWN_FILE.fullmatch(f)):
            try:
                os.unlink(d / f)
            except OSError:
                pass


def load_in_service(state_dir) -> Optional[Dict[str, ModelBlob]]:
    """The models kept by :func:`save_in_service`, verified by sha256; None when there are none.
    Raises ``modelstore.ModelError`` when they are there but unusable."""
    path = Path(state_dir) / IN_SERVICE_DIR / IN_SERVICE_MANIFEST
    if not path.is_file():
        return None
    manifest = modelstore.Manifest.load(path)
    out = {}
    for role in DROP_ROLES:
        if role in ROLES or role in manifest.entries:
            data, digest, p = modelstore.read_verified(role, path.parent, manifest)
            out[role] = ModelBlob(role, data, digest, str(p))
    return out


INSTALLED_COPY_DIR = "installed-copy"  # under paths.state_dir
INSTALLED_COPY_DOC = "installed-copy.json"


def save_installed_copy(state_dir, blobs: List[ModelBlob]) -> None:
    """Keep a copy of the installed models the daemon started with (``blobs``: those read from
    the models directory) under ``<state_dir>/installed-copy/``.  When the drop directory is the
    models directory (the default), a drop may overwrite an installed file and then not be
    confirmed (held back, refused, rolled back): the next start finds that file changed and
    loads this copy of the model the repository's manifest names (:func:`load_installed_copy`)."""
    doc = {"format": "edged-installed-copy", "version": 1,
           "note": "copies of the installed models, by sha256 (docs/ota.md)",
           "models": [{"role": b.role, "file": _own_name(b), "sha256": b.sha256,
                       "copied_from": b.file} for b in blobs]}
    _write_model_dir(Path(state_dir) / INSTALLED_COPY_DIR, blobs, INSTALLED_COPY_DOC,
                     doc if blobs else None)


def load_installed_copy(state_dir, role: str, sha256: str) -> Optional[ModelBlob]:
    """The copy of the installed model for ``role`` whose content is ``sha256`` (checked);
    None when there is none."""
    path = Path(state_dir) / INSTALLED_COPY_DIR / f"{role}-{sha256[:16]}.tflite"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if modelstore.sha256_bytes(data) != sha256:
        return None
    return ModelBlob(role, data, sha256, str(path))


@dataclass
class HeldEmbedder:
    """An embedder held back until a gallery made by it arrives: since when, dropped as."""

    blob: ModelBlob
    since: float = field(default_factory=time.time)
    file: str = ""


HELD_DIR = "held"  # under paths.state_dir: an embedder held back, kept across restarts
HELD_DOC = "held.json"
PENDING_DOC = "waiting-manifests.json"  # also there: manifests waiting for their files


def save_held(state_dir, held: Optional[HeldEmbedder]) -> None:
    """Keep the embedder held back (or, with None, forget it) across restarts:
    ``<state_dir>/held/embedder-<16 hex>.tflite`` and ``held.json``, written atomically."""
    doc = None
    if held is not None:
        b = held.blob
        doc = {"role": "embedder", "file": _own_name(b), "sha256": b.sha256, "size": len(b.data),
               "dropped_as": held.file, "dropped_sha256": b.dropped_sha256, "since": held.since}
    _write_model_dir(Path(state_dir) / HELD_DIR, [held.blob] if held else [], HELD_DOC, doc)


def load_held(state_dir) -> Optional[HeldEmbedder]:
    """The embedder kept by :func:`save_held`, verified by sha256; None when there is none.
    Raises DropRejected when it is there but unusable."""
    d = Path(state_dir) / HELD_DIR
    doc_path = d / HELD_DOC
    if not doc_path.is_file():
        return None
    try:
        doc = json.loads(doc_path.read_text())
        name, sha = doc["file"], doc["sha256"]
        if not OWN_FILE.fullmatch(name) or not name.startswith("embedder-"):
            raise ValueError(f"unexpected file name {name!r}")
        data = (d / name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DropRejected(f"{doc_path}: unusable: {exc}") from None
    got = modelstore.sha256_bytes(data)
    if got != sha:
        raise DropRejected(f"{d / name}: sha256 {got} is not the {sha} recorded in {doc_path}")
    blob = ModelBlob("embedder", data, sha, str(doc.get("dropped_as") or d / name),
                     str(doc.get("dropped_sha256") or ""))
    return HeldEmbedder(blob, since=float(doc.get("since") or time.time()),
                 file=str(doc.get("dropped_as") or ""))
