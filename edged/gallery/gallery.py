"""An open gallery file (:class:`Gallery`): mapping it (or reading it into memory), its
identities, and the public search API.  The checks of its contents are in
:mod:`edged.gallery.checks`, the search internals in :mod:`edged.gallery.search`.

:meth:`Gallery.open` maps the file read-only; opening costs the same for any size (the matrix
is not read) unless ``verify=True``, which also checks the body sha256 and every row (finite,
unit norm) in one pass.
"""
from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from edged.gallery.checks import GalleryChecks
from edged.gallery.format import (DTYPES, GalleryError, _check_embedder, _checked_header,
                                  _open_regular, _read_head, _read_into, embedder_name)
from edged.gallery.match import MatchSettings, decide
from edged.gallery.search import GallerySearch, _as_queries, scan_kernel
from edged.types import Match

log = logging.getLogger("edged.gallery")


class Gallery(GalleryChecks, GallerySearch):
    """An open, memory-mapped gallery.  Thread-safe for concurrent :meth:`search` calls."""

    def __init__(self):  # use Gallery.open
        self._mm = None
        self._file = None
        self._pool = None
        self.threads = 1
        self._names = {}
        self._identities = None
        self._tables_ok = False
        self.source = None  # (GalleryHolder) the file this gallery was taken from
        self.snapshot = None  # (GalleryHolder) its private snapshot, mapped here
        self.snapshot_error = None  # (GalleryHolder) why it is held in memory instead

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path, expect_dim: Optional[int] = None, expect_embedder: Optional[str] = None,
             verify: bool = True, threads: int = 1) -> "Gallery":
        """Map and check ``path``; raise :class:`GalleryError` saying what is wrong.

        ``verify=True`` (the default, used for every hot swap) also checks the body sha256,
        the identity structure and every row (finite, non-zero, unit norm): one pass over the
        file.  ``verify=False`` checks only the header and section sizes, in constant time.
        ``threads`` > 1 splits each scan over that many threads (useful for float16).
        ``expect_embedder`` (a sha256) refuses a gallery made by another embedder, naming
        both; ``expect_dim`` (None: any) refuses another embedding width.
        """
        path = Path(path)
        f = _open_regular(path)
        try:
            size = os.fstat(f.fileno()).st_size
            _read_head(f, path, size)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        return cls._from_map(path, f, mm, size, expect_dim, expect_embedder, verify, threads)

    @classmethod
    def read_into_memory(cls, f, size: int, path, expect_dim: Optional[int] = None,
                         expect_embedder: Optional[str] = None, threads: int = 1) -> "Gallery":
        """Read ``size`` bytes of the open gallery file ``f`` (from its start) into anonymous
        memory and check them fully, as :meth:`open` with ``verify=True``: for when no private
        copy of it can be written (a full disk).  The file may change afterwards: the gallery
        does not depend on it."""
        path = Path(path)
        try:
            mm = mmap.mmap(-1, size)
        except (OSError, ValueError, OverflowError) as exc:
            raise GalleryError(path, f"cannot hold {size} bytes in memory: "
                                     f"{getattr(exc, 'strerror', None) or exc}",
                               transient=True) from None
        try:
            f.seek(0)
            view, got = memoryview(mm), 0
            with view:
                while got < size:
                    n = _read_into(f, view[got:got + (1 << 20)], path)
                    if not n:
                        raise GalleryError(path, f"truncated while being read: {got} of "
                                                 f"{size} bytes", transient=True)
                    got += n
        except BaseException:
            mm.close()
            raise
        return cls._from_map(path, None, mm, size, expect_dim, expect_embedder, True, threads)

    @classmethod
    def _from_map(cls, path: Path, f, mm, size: int, expect_dim, expect_embedder,
                  verify: bool, threads: int, body_sha256: Optional[str] = None) -> "Gallery":
        g = cls()
        g.path = path
        g._file, g._mm = f, mm
        try:
            g._parse(size, expect_dim, expect_embedder)
            if verify:
                g.verify(body_sha256)
        except BaseException:
            g.close()
            raise
        g._start_pool(threads)
        return g

    def _parse(self, size: int, expect_dim, expect_embedder) -> None:
        mm, path = self._mm, self.path
        (_, version, header_size, dtype_code, dim, rows, idents, created, file_size,
         so_off, rs_off, ri_off, s_off, s_size, m_off, emb_sha, body_sha) = \
            _checked_header(mm, path, size, expect_dim)
        dt = DTYPES[dtype_code]
        self.version = version
        self.dim = int(dim)
        self.dtype = dt
        self.dtype_name = "float32" if dtype_code == 1 else "float16"
        self.rows = int(rows)
        self.n_identities = int(idents)
        self.created = float(created)
        self.file_size = int(file_size)
        self.embedder_sha256 = emb_sha.hex()
        self.checksum = body_sha.hex()
        _check_embedder(path, self.embedder_sha256, expect_embedder)
        self._layout = (so_off, rs_off, ri_off, s_off, s_size, m_off)
        self._bind(mm)
        # the structure that the search relies on, checked in constant time (the rest of the
        # tables once, on first use: _check_tables)
        if (int(self._str_off[0]) != 0 or int(self._str_off[-1]) != s_size
                or int(self._row_starts[0]) != 0 or int(self._row_starts[-1]) != rows):
            raise GalleryError(path, "identity table does not cover the strings or the rows")
        self._tables_ok = False

    def _bind(self, mm) -> None:
        """The arrays of the sections, read-only views of ``mm``."""
        so_off, rs_off, ri_off, s_off, s_size, m_off = self._layout
        n, rows, dim = self.n_identities, self.rows, self.dim
        arrays = dict(_str_off=np.frombuffer(mm, "<u8", 2 * n + 1, so_off),
                      _row_starts=np.frombuffer(mm, "<u8", n + 1, rs_off),
                      row_identity=np.frombuffer(mm, "<u4", rows, ri_off),
                      matrix=np.frombuffer(mm, self.dtype, rows * dim, m_off).reshape(rows, dim))
        for name, a in arrays.items():
            a.flags.writeable = False
            setattr(self, name, a)
        self._strings = memoryview(mm).toreadonly()[s_off:s_off + s_size]
        self._starts = self._row_starts[:-1].astype(np.intp)

    def remap(self, path) -> None:
        """Serve this gallery from ``path`` from now on: a byte-for-byte copy of it (checked),
        such as the snapshot of a gallery held in memory, written once there is room.
        Searches running meanwhile read the same values from either."""
        path = Path(path)
        f = _open_regular(path)
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        if not _same_bytes(mm, self._mm):
            _release_map(mm, f, path)
            raise GalleryError(path, "differs from the gallery it should be a copy of")
        old = (self._mm, self._file, self.path)
        self._bind(mm)
        self._mm, self._file, self.path = mm, f, path
        _release_map(*old)

    # -- identities ----------------------------------------------------------------------

    def _decode(self, j: int) -> Tuple[str, str]:
        got = self._names.get(j)
        if got is None:
            self._check_tables()
            o = self._str_off
            a, b, c = int(o[2 * j]), int(o[2 * j + 1]), int(o[2 * j + 2])
            try:
                got = (bytes(self._strings[a:b]).decode("utf-8"),
                       bytes(self._strings[b:c]).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise GalleryError(self.path, f"identity {j}: invalid UTF-8 "
                                              f"({exc.reason})") from None
            self._names[j] = got
        return got

    @property
    def identities(self) -> List[Tuple[str, str]]:
        """``[(id, name)]`` in file order (decoded on first use)."""
        if self._identities is None:
            self._identities = [self._decode(j) for j in range(self.n_identities)]
        return self._identities

    def rows_of(self, j: int) -> Tuple[int, int]:
        self._check_tables()
        return int(self._row_starts[j]), int(self._row_starts[j + 1])

    def find(self, key: str) -> Optional[int]:
        """The index of the identity whose id or display name is ``key``, else None."""
        for j, (ident, name) in enumerate(self.identities):
            if key == ident:
                return j
        for j, (ident, name) in enumerate(self.identities):
            if key == name:
                return j
        return None

    def embeddings(self) -> np.ndarray:
        """A float32 copy of the whole matrix (for editing tools, not for search)."""
        return np.array(self.matrix, dtype=np.float32)

    def info(self) -> dict:
        self._check_tables()
        counts = np.diff(self._row_starts.astype(np.int64))
        return {"path": str(self.path), "format_version": self.version, "dim": self.dim,
                "dtype": self.dtype_name, "rows": self.rows, "identities": self.n_identities,
                "rows_per_identity": {"min": int(counts.min()) if len(counts) else 0,
                                      "max": int(counts.max()) if len(counts) else 0},
                "embedder_sha256": self.embedder_sha256,
                "embedder": embedder_name(self.embedder_sha256) or "unknown",
                "checksum": self.checksum,
                "created": self.created, "file_size": self.file_size, "scan": self.scan}

    @property
    def scan(self) -> str:
        """How this gallery is scanned: ``"blas"`` (float32: numpy's matrix product) or, for
        float16, :func:`scan_kernel`."""
        return "blas" if self.dtype.itemsize == 4 else scan_kernel(self.dim)

    # -- search --------------------------------------------------------------------------

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of every query with every row: ``(n_queries, rows)`` float32."""
        return self._row_scores(_as_queries(queries, self.dim)).T

    def identity_scores(self, queries: np.ndarray) -> np.ndarray:
        """Every identity's score (its best row) per query: ``(n_queries, identities)``."""
        return self._identity_scores_t(_as_queries(queries, self.dim)).T

    def search(self, queries: np.ndarray, k: int = 5) -> list:
        """Per query, the top ``k`` identities ``[(identity_id, name, score)]``, best first."""
        q = _as_queries(queries, self.dim)
        n = self.n_identities
        k = max(1, min(int(k), n)) if n else 0
        if k == 0:
            return [[] for _ in range(q.shape[0])]
        idx, val = self._top_identities(q, k)
        # (-inf: an identity without rows, in a gallery opened unverified)
        return [[(*self._decode(j), s) for j, s in zip(idx[i].tolist(), val[i].tolist())
                 if s != -np.inf] for i in range(q.shape[0])]

    def match(self, queries: np.ndarray, settings: Optional[MatchSettings] = None) -> List[Match]:
        """One :class:`Match` per query under ``settings`` (threshold, margin, top k)."""
        settings = settings or MatchSettings()
        return [decide(c, settings) for c in self.search(queries, max(2, settings.top_k))]

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap.  Callers must not use arrays they took from this gallery afterwards."""
        self._stop_search()
        for name in ("_str_off", "_row_starts", "row_identity", "_strings", "matrix", "_starts"):
            v = self.__dict__.pop(name, None)
            if isinstance(v, memoryview):
                v.release()
        mm, self._mm = self._mm, None
        f, self._file = self._file, None
        _release_map(mm, f, self.path)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{self.rows} rows, {self.n_identities} identities"
        return f"<Gallery {self.path} {state}>"


def _release_map(mm, f, path) -> None:
    """Close a mapping (left to the garbage collector while views of it remain) and its file."""
    if mm is not None:
        try:
            mm.close()
        except BufferError:  # a caller still holds a view: the mapping goes with it
            log.debug("%s: mapping still referenced; left to the garbage collector", path)
    if f is not None:
        f.close()


def _same_bytes(a, b, step: int = 1 << 24) -> bool:
    return len(a) == len(b) and all(a[i:i + step] == b[i:i + step]
                                    for i in range(0, len(a), step))


def read_entries(path) -> tuple:
    """``(identities, row_identity, embeddings float32, embedder_sha256, dtype)`` of a file."""
    with Gallery.open(path, expect_dim=None) as g:
        return (list(g.identities), np.array(g.row_identity, dtype=np.int64), g.embeddings(),
                g.embedder_sha256, g.dtype_name)
