"""The ``.edgal`` file format: its layout, header and sections, the checks of a file's header
and sections, reading a file safely, and writing one (:func:`write_gallery`).

File layout (all integers little-endian; see ``docs/gallery-format.md`` for the full table)::

    header        256 bytes: magic, version, sizes, dtype, embedder sha256, body sha256, crc32
    str_offsets   (2 * identities + 1) x uint64: string i is strings[off[i]:off[i+1]]
                  (identity j: id = string 2j, display name = string 2j+1, UTF-8)
    row_starts    (identities + 1) x uint64: identity j owns rows [start[j], start[j+1])
    row_identity  rows x uint32: the identity index of every row (non-decreasing)
    strings       UTF-8 bytes
    matrix        rows x dim, float32 or float16, L2-normalised rows, 64-byte aligned

Every section starts on a 64-byte boundary.  The checks here need the header alone; those
of an open file's identity tables and rows are in :mod:`edged.gallery.checks`.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from edged import safefile
from edged.runtime.modelstore import atomic_write

MAGIC = b"EDGEDGAL"
FORMAT_VERSION = 1
HEADER_SIZE = 256
ALIGN = 64
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_CODES = {"float32": 1, "float16": 2}
NORM_TOLERANCE = {1: 1e-3, 2: 1e-2}  # |norm - 1| allowed per storage dtype
SUFFIX = ".edgal"

# magic, version, header_size, dtype, dim, rows, identities, created, file_size,
# str_offsets_off, row_starts_off, row_identity_off, strings_off, strings_size, matrix_off,
# embedder sha256, body sha256
_HEAD = struct.Struct("<8sHHHxxI Q Q d Q QQQQQQ 32s32s")
_CRC = struct.Struct("<I")
_CRC_AT = HEADER_SIZE - _CRC.size
assert _HEAD.size <= _CRC_AT

#: largest embedding dimension a gallery may declare (MobileFaceNet gives 192, SFace 128)
MAX_DIM = 4096
#: gallery files are biometric data: readable by their owner and group only (less the umask)
GALLERY_MODE = 0o640


class GalleryError(ValueError):
    """A gallery file cannot be used; the message names the file and the exact reason.

    ``transient`` is true when the file itself may be good (it could not be read, it changed
    while being read, memory ran out): such a refusal is not remembered."""

    def __init__(self, path, reason: str, transient: bool = False):
        self.path = str(path)
        self.reason = reason
        self.transient = transient
        super().__init__(f"{path}: {reason}")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _check_sha(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{what} must be 64 hex digits (a sha256), got {value!r}")
    return raw


# ---------------------------------------------------------------------------- writing


def write_gallery(path, identities: Sequence[Tuple[str, str]], row_identity, embeddings,
                  embedder_sha256: str, dtype: str = "float32",
                  created: Optional[float] = None) -> str:
    """Write a gallery file atomically (temp + fsync + rename); return its checksum (hex).

    ``identities`` is ``[(id, name)]``; ``row_identity[i]`` is the index into ``identities``
    of embedding row ``i``.  Rows are L2-normalised and grouped by identity here; every
    identity needs at least one row.  Bad input raises :class:`ValueError` saying which row
    or identity.
    """
    path = Path(path)
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    emb_raw = _check_sha(embedder_sha256, "embedder_sha256")
    idents, e, ri, counts = _grouped_rows(identities, row_identity, embeddings)
    rows, dim = e.shape
    starts = np.zeros(len(idents) + 1, np.uint64)
    np.cumsum(counts, out=starts[1:])

    blob = bytearray()
    str_off = [0]
    for ident, name in idents:
        for s in (ident, name):
            blob += s.encode("utf-8")
            str_off.append(len(blob))
    dt = DTYPES[DTYPE_CODES[dtype]]
    mat = e.astype(dt)
    if dt.itemsize == 2:  # re-normalise after rounding so the stored rows are unit vectors
        m32 = mat.astype(np.float32)
        mat = (m32 / np.linalg.norm(m32, axis=1, keepdims=True)).astype(dt)
    n_id = len(idents)
    so_off = HEADER_SIZE
    rs_off = _align(so_off + (2 * n_id + 1) * 8)
    ri_off = _align(rs_off + (n_id + 1) * 8)
    s_off = _align(ri_off + rows * 4)
    m_off = _align(s_off + len(blob))
    end = m_off + rows * dim * dt.itemsize

    sections = [(so_off, np.asarray(str_off, "<u8").tobytes()), (rs_off, starts.astype("<u8").tobytes()),
                (ri_off, ri.astype("<u4").tobytes()), (s_off, bytes(blob))]
    body = bytearray(m_off - HEADER_SIZE)
    for off, data in sections:
        body[off - HEADER_SIZE:off - HEADER_SIZE + len(data)] = data
    h = hashlib.sha256(body)
    mat = np.ascontiguousarray(mat.astype(dt.newbyteorder("<")))
    h.update(mat)
    head = bytearray(HEADER_SIZE)
    _HEAD.pack_into(head, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, DTYPE_CODES[dtype], dim, rows,
                    n_id, time.time() if created is None else float(created), end, so_off, rs_off,
                    ri_off, s_off, len(blob), m_off, emb_raw, h.digest())
    _CRC.pack_into(head, _CRC_AT, zlib.crc32(bytes(head[:_CRC_AT])))
    atomic_write(path, [bytes(head), bytes(body), memoryview(mat.reshape(-1).view(np.uint8))],
                 mode=GALLERY_MODE)
    return h.hexdigest()


def _grouped_rows(identities: Sequence[Tuple[str, str]], row_identity, embeddings) -> tuple:
    """The input of :func:`write_gallery` checked: ``(identities, rows, row_identity,
    counts)``, the rows float32, L2-normalised and grouped by identity (stable), each row's
    identity index uint32, and the rows per identity.  Bad input raises :class:`ValueError`
    saying which row or identity."""
    idents = [(str(i), str(n)) for i, n in identities]
    seen = set()
    for j, (ident, _) in enumerate(idents):
        if not ident:
            raise ValueError(f"identity {j} has an empty id")
        if ident in seen:
            raise ValueError(f"identity id {ident!r} appears twice")
        seen.add(ident)
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (rows x dim), got shape {e.shape}")
    rows, dim = e.shape
    if dim < 1:
        raise ValueError("embedding dimension must be at least 1")
    ri = np.asarray(row_identity, dtype=np.int64).reshape(-1)
    if ri.shape[0] != rows:
        raise ValueError(f"row_identity has {ri.shape[0]} entries for {rows} embedding rows")
    if rows and (ri.min() < 0 or ri.max() >= len(idents)):
        raise ValueError(f"row_identity values must be in [0, {len(idents)})")
    counts = np.bincount(ri, minlength=len(idents)) if len(idents) else np.zeros(0, np.int64)
    if np.any(counts == 0):
        j = int(np.argmax(counts == 0))
        raise ValueError(f"identity {idents[j][0]!r} has no embedding rows")
    norms = np.linalg.norm(e, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"embedding row {r} (identity {idents[ri[r]][0]!r}) is "
                         f"{'zero' if norms[r] == 0 else 'not finite'}")
    order = np.argsort(ri, kind="stable")
    e = e[order] / norms[order][:, None]
    ri = ri[order].astype(np.uint32)
    return idents, e, ri, counts


# ---------------------------------------------------------------------------- reading


def _header(buf, path: Path) -> tuple:
    """The header fields of ``buf`` (a gallery's bytes from the start, at least HEADER_SIZE
    of them once the magic is right), its magic, format version and checksum checked."""
    if bytes(buf[:len(MAGIC)]) != MAGIC:
        raise GalleryError(path, _WRONG_MAGIC)
    fields = _HEAD.unpack_from(buf, 0)
    version = fields[1]
    if version > FORMAT_VERSION:
        raise GalleryError(path, f"format version {version} is newer than this edged "
                                 f"supports ({FORMAT_VERSION}); upgrade edged")
    if version < 1:
        raise GalleryError(path, f"invalid format version {version}")
    (crc,) = _CRC.unpack_from(buf, _CRC_AT)
    actual_crc = zlib.crc32(buf[:_CRC_AT])
    if crc != actual_crc:
        raise GalleryError(path, f"header checksum mismatch (crc32 {actual_crc:08x}, "
                                 f"header says {crc:08x}): corrupt header")
    return fields


#: never any of the file's bytes in a message: it may be any file, and messages go to MQTT
_WRONG_MAGIC = "not an edged gallery (wrong magic)"


def _checked_header(buf, path: Path, size: int, expect_dim: Optional[int]) -> tuple:
    """:func:`_header`, and every header field checked against the file's ``size`` and the
    expected embedding dimension: the sections must be exactly the canonical ones."""
    fields = _header(buf, path)
    (_, _, header_size, dtype_code, dim, rows, idents, created, file_size,
     so_off, rs_off, ri_off, s_off, s_size, m_off, _, _) = fields
    if header_size != HEADER_SIZE:
        raise GalleryError(path, f"header size {header_size}, expected {HEADER_SIZE}")
    if dtype_code not in DTYPES:
        raise GalleryError(path, f"unknown storage dtype code {dtype_code} "
                                 f"(1 = float32, 2 = float16)")
    if file_size != size:
        what = "truncated" if size < file_size else "trailing bytes"
        raise GalleryError(path, f"{what}: file is {size} bytes, header says {file_size}")
    if not 1 <= dim <= MAX_DIM:
        raise GalleryError(path, f"invalid embedding dimension {dim} (1 to {MAX_DIM})")
    if not math.isfinite(created):
        raise GalleryError(path, f"invalid creation time {created}")
    # the section table must be exactly the canonical one for these counts
    want_so = HEADER_SIZE
    want_rs = _align(want_so + (2 * idents + 1) * 8)
    want_ri = _align(want_rs + (idents + 1) * 8)
    want_s = _align(want_ri + rows * 4)
    want_m = _align(want_s + s_size)
    want_end = want_m + rows * dim * DTYPES[dtype_code].itemsize
    if (so_off, rs_off, ri_off, s_off, m_off) != (want_so, want_rs, want_ri, want_s, want_m):
        raise GalleryError(path, "section offsets inconsistent with the row and identity "
                                 f"counts ({rows} rows, {idents} identities)")
    if want_end != file_size:
        raise GalleryError(path, f"sizes inconsistent: {rows} rows x {dim} x "
                                 f"{DTYPES[dtype_code].itemsize} bytes end at {want_end}, "
                                 f"file is {file_size}")
    if expect_dim is not None and dim != expect_dim:
        raise GalleryError(path, f"embedding dimension {dim}, the running embedder gives "
                                 f"{expect_dim}")
    return fields


def _check_embedder(path: Path, made_by: str, expect_embedder: Optional[str]) -> None:
    if expect_embedder is not None and made_by != expect_embedder.lower():
        raise GalleryError(path, f"made by embedder {embedder_label(made_by)}, the running "
                                 f"embedder is {embedder_label(expect_embedder.lower())}; "
                                 f"rebuild it with 'edged gallery build' and that embedder")


def embedder_name(sha256: str) -> str:
    """The manifest's name of the embedder whose loaded file has ``sha256`` (``"sface"``), or
    ``""`` for one the manifest does not name."""
    from edged.runtime.modelstore import Manifest, ModelError

    try:
        entry = Manifest.load().by_sha256(sha256)
    except ModelError:
        return ""
    return entry.name if entry is not None and entry.role == "embedder" else ""


def embedder_label(sha256: str) -> str:
    """``sface (sha256 8a01...)``: :func:`embedder_name` with the full sha256, or the sha256
    alone."""
    name = embedder_name(sha256)
    return f"{name} (sha256 {sha256})" if name else f"sha256 {sha256}"


def _read_head(f, path: Path, size: int) -> bytes:
    """The first :data:`HEADER_SIZE` bytes of the open file ``f`` of ``size`` bytes; raise
    :class:`GalleryError` for an empty file, a file of another kind, a truncated header."""
    if size == 0:
        raise GalleryError(path, "empty file (0 bytes)")
    try:
        f.seek(0)
        head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise GalleryError(path, f"cannot read: {exc.strerror or exc}", transient=True) from None
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        raise GalleryError(path, _WRONG_MAGIC)
    if len(head) < HEADER_SIZE:
        raise GalleryError(path, f"truncated header: {len(head)} bytes, a header is {HEADER_SIZE}")
    return head


def _read_into(f, view, path: Path) -> int:
    try:
        return f.readinto(view)
    except OSError as exc:
        raise GalleryError(path, f"cannot read: {exc.strerror or exc}", transient=True) from None


def _open_regular(path: Path, confine: bool = False):
    """``path`` opened for reading once it is known to be a regular file (checked before the
    open and again on the open file, which never blocks: :func:`edged.safefile.open_plain`).
    With ``confine`` (the daemon's reads), a symbolic link at ``path`` is refused, never
    followed, as no drop is (its target could be any file the daemon may read, and the
    refusal goes onto MQTT; docs/ota.md)."""
    try:
        return safefile.open_plain(path, follow_links=not confine)
    except safefile.NotPlain as exc:
        reason = exc.reason
        if reason.startswith("is a directory"):
            reason = "is a directory, not a gallery file"
        elif reason != safefile.SYMLINK_REASON:
            reason = "is not a regular file"
        raise GalleryError(path, reason) from None
    except FileNotFoundError:
        raise GalleryError(path, "no such file") from None
    except OSError as exc:
        raise GalleryError(path, f"cannot open: {exc.strerror or exc}", transient=True) from None


def peek_embedder(path, confine: bool = True) -> str:
    """The embedder sha256 a gallery file says it was made by, from its header alone, read
    with a plain read (no mapping: the file may be a live one another program is rewriting,
    and a mapped file cut short under a reader kills the process with SIGBUS).  Raises
    :class:`GalleryError` when the header is not a good one; ``confine``: as the daemon
    reads a gallery path (a symbolic link refused)."""
    path = Path(path)
    with _open_regular(path, confine) as f:
        head = _read_head(f, path, os.fstat(f.fileno()).st_size)
    return _header(head, path)[15].hex()  # (index 15: the embedder sha256)
