"""The gallery: a memory-mapped file of enrolled people, searched by cosine similarity.

The file format and writing a file are in :mod:`edged.gallery.format` (the layout below),
the match settings and the decision in :mod:`edged.gallery.match`.

File layout (all integers little-endian; see ``docs/gallery-format.md`` for the full table)::

    header        256 bytes: magic, version, sizes, dtype, embedder sha256, body sha256, crc32
    str_offsets   (2 * identities + 1) x uint64: string i is strings[off[i]:off[i+1]]
                  (identity j: id = string 2j, display name = string 2j+1, UTF-8)
    row_starts    (identities + 1) x uint64: identity j owns rows [start[j], start[j+1])
    row_identity  rows x uint32: the identity index of every row (non-decreasing)
    strings       UTF-8 bytes
    matrix        rows x dim, float32 or float16, L2-normalised rows, 64-byte aligned

Every section starts on a 64-byte boundary.  :meth:`Gallery.open` maps the file read-only;
opening costs the same for any size (the matrix is not read) unless ``verify=True``, which
also checks the body sha256 and every row (finite, unit norm) in one pass.

Search is a matrix product over the mapped matrix: float32 by numpy (one gemv for one query,
block-wise for several); float16 by the compiled scan ``edged.gallery._scan`` (groups of rows widened
in registers or in the L1 cache and multiplied there, see ``_scan_kernel.h``), or where it is
not built by widening blocks of rows to float32 first.  Then the best row of every identity
(rows are grouped by identity: in the compiled scan, else one ``np.maximum.reduceat``), then
``argpartition`` for the top k.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from edged.gallery.format import (DTYPE_CODES, DTYPES, FORMAT_VERSION, GALLERY_MODE,
                                  HEADER_SIZE, MAGIC, MAX_DIM, NORM_TOLERANCE, SUFFIX,
                                  GalleryError, _check_embedder, _checked_header,
                                  _open_regular, _read_head, _read_into, embedder_label,
                                  embedder_name, peek_embedder, write_gallery)
from edged.gallery.match import FALLBACK_THRESHOLD, MatchSettings, decide
from edged.runtime.modelstore import NoRoom, atomic_write, check_room, human_size
from edged.types import Match

log = logging.getLogger("edged.gallery")

#: the gallery in service, kept in the snapshot directory for the next start
LAST_GOOD = "last-good.edgal"
SNAPSHOT_PREFIX = "edged-gallery-"
#: rows per block of a float16 scan (each block is widened to float32, 768 KiB, in the
#: cache, then multiplied; 1024 to 2048 measured best, docs/benchmarks.md)
BLOCK_ROWS = 1024
#: rows per block of a float32 scan with several queries: small blocks (384 KiB) make the
#: skinny matrix products much faster than one big one (measured: docs/benchmarks.md)
F32_BLOCK_ROWS = 512
#: a search works through the gallery in chunks of about this many rows (whole identities),
#: each reduced to its identities' best rows and its own top k while its scores are cached
CHUNK_ROWS = 65536
#: a search is split over the thread pool only where each thread gets at least this many rows
#: (below it, handing work to threads costs more than it saves: docs/benchmarks.md)
MIN_THREAD_ROWS = 32768


#: the private snapshots of the daemon, read-only
SNAPSHOT_MODE = 0o440


# ---------------------------------------------------------------------------- fp16 widening


try:  # the compiled float16 scan (setup.py builds it when it can; edged/gallery/_scan_kernel.h)
    from edged.gallery import _scan as _scan_ext
except ImportError:  # pragma: no cover - depends on the install
    _scan_ext = None


def _fused(dim: Optional[int]) -> bool:
    """Whether float16 rows of ``dim`` values go to the compiled scan: only its vector kernels
    (its portable C loop is slower than widening blocks with OpenCV)."""
    return (_scan_ext is not None and _scan_ext.KERNEL in ("avx2", "neon")
            and (dim is None or dim <= _scan_ext.MAX_DIM))


def scan_kernel(dim: Optional[int] = None) -> str:
    """How float16 galleries of ``dim``-value rows (None: of any embedder's width, up to
    the compiled scan's ``MAX_DIM``) are scanned here: ``"avx2"`` or ``"neon"`` (the compiled
    scan, 2 bytes read per value), else ``"opencv"`` or ``"numpy"`` (blocks widened to
    float32 first, 3 to 4 times slower: docs/benchmarks.md)."""
    if _fused(dim):
        return _scan_ext.KERNEL
    return "opencv" if _cv_widen_ok() else "numpy"


_CV_WIDEN: Optional[bool] = None


def _cv_widen_ok() -> bool:
    """Whether OpenCV converts float16 arrays to float32 here, exactly (checked once on zeros
    of both signs, subnormals and the extremes).  OpenCV's conversion is about 4 times faster
    than numpy's ``astype`` and 1.5 times faster than :func:`_widen_f16`'s bit operations."""
    global _CV_WIDEN
    if _CV_WIDEN is None:
        try:
            import cv2
            v = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 6e-8, -6e-8, 1e-5, 1 / 3],
                         np.float16)
            src = np.tile(v, (8, 1))
            out = np.empty(src.shape, np.float32)
            cv2.subtract(src, 0.0, dst=out, dtype=cv2.CV_32F)
            _CV_WIDEN = bool(np.array_equal(out.view(np.uint32),
                                            src.astype(np.float32).view(np.uint32)))
        except Exception:  # an OpenCV without float16 arrays: the numpy bit operations
            _CV_WIDEN = False
    return _CV_WIDEN


def _widen_f16(block: np.ndarray, out: np.ndarray, tmp: Optional[np.ndarray]) -> np.ndarray:
    """float16 rows -> float32 into ``out``: by OpenCV when it can, else by bit operations
    (``tmp``, a uint32 array as large as ``out``, is their scratch space).

    Exact for zeros, subnormals and normal numbers; the file has no inf/NaN (checked on open).
    """
    k = block.shape[0]
    if _cv_widen_ok():
        import cv2
        cv2.subtract(block, 0.0, dst=out[:k], dtype=cv2.CV_32F)
        return out[:k]
    u = block.view(np.uint16)
    t, s = out[:k].view(np.uint32), tmp[:k]
    np.copyto(t, u)                      # uint16 -> uint32
    np.bitwise_and(t, 0x8000, out=s)
    np.left_shift(s, 16, out=s)          # the sign bit
    np.bitwise_and(t, 0x7FFF, out=t)
    np.left_shift(t, 13, out=t)          # exponent and mantissa in float32 position
    f = t.view(np.float32)
    np.multiply(f, np.float32(2.0 ** 112), out=f)  # re-bias the exponent (and scale subnormals)
    np.bitwise_or(t, s, out=t)
    return f


# ---------------------------------------------------------------------------- the file


class Gallery:
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
        g.threads = max(1, int(threads))
        if g.threads > 1:
            g._pool = ThreadPoolExecutor(g.threads, thread_name_prefix="gallery-scan")
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

    def _check_tables(self) -> None:
        """The offsets every search and name lookup use: string offsets and row starts never
        decreasing (so every string and row range lies inside its section).  Checked once, on
        first use in a gallery opened with ``verify=False``; by :meth:`verify` otherwise."""
        if self._mm is None:
            raise GalleryError(self.path, "gallery is closed")
        if self._tables_ok:
            return
        if np.any(self._str_off[1:] < self._str_off[:-1]):
            raise GalleryError(self.path, "string offsets are not increasing")
        if np.any(self._row_starts[1:] < self._row_starts[:-1]):
            raise GalleryError(self.path, "row starts are not increasing")
        self._tables_ok = True

    def verify(self, body_sha256: Optional[str] = None) -> None:
        """The full check: body sha256, identity table, every row finite and unit-norm.
        ``body_sha256``: the body's sha256 when the caller computed it while copying the file
        (then not computed again here)."""
        path, mm = self.path, self._mm
        self._check_tables()
        counts = np.diff(self._row_starts.astype(np.int64))
        if np.any(counts <= 0):
            j = int(np.argmax(counts <= 0))
            raise GalleryError(path, f"identity {j} has no rows (row starts must increase)")
        self._empty_list = np.empty(0, np.intp)
        if self.rows:
            want = np.repeat(np.arange(self.n_identities, dtype=np.uint32), counts)
            if not np.array_equal(want, self.row_identity):
                r = int(np.argmax(want != self.row_identity))
                raise GalleryError(path, f"row-to-identity index disagrees with the identity "
                                         f"table at row {r}")
        ids = set()
        for j in range(self.n_identities):
            ident, _ = self._decode(j)
            if not ident:
                raise GalleryError(path, f"identity {j} has an empty id")
            if ident in ids:
                raise GalleryError(path, f"identity id {ident!r} appears twice")
            ids.add(ident)
        h = hashlib.sha256() if body_sha256 is None else None
        if h is not None:
            h.update(memoryview(mm)[HEADER_SIZE:self._matrix_offset()])
        tol = NORM_TOLERANCE[1 if self.dtype.itemsize == 4 else 2]
        block_rows = min(BLOCK_ROWS, self.rows)
        buf = np.empty((block_rows, self.dim), np.float32)
        tmp = np.empty((block_rows, self.dim), np.uint32)
        for s in range(0, self.rows, BLOCK_ROWS):
            block = self.matrix[s:s + BLOCK_ROWS]
            if h is not None:
                h.update(block)
            x = block if self.dtype.itemsize == 4 else _widen_f16(block, buf, tmp)
            if self.dtype.itemsize == 2:
                bad = ~np.isfinite(block).all(axis=1)
            else:
                bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                r = s + int(np.argmax(bad))
                raise GalleryError(path, f"row {r} (identity {self._ident_of_row(r)!r}) "
                                         f"contains NaN or infinity")
            norms = np.sqrt(np.einsum("ij,ij->i", x, x))
            off = np.abs(norms - 1.0) > tol
            if off.any():
                r = s + int(np.argmax(off))
                n = float(norms[r - s])
                what = "has zero norm" if n == 0.0 else f"is not L2-normalised (norm {n:.4f})"
                raise GalleryError(path, f"row {r} (identity {self._ident_of_row(r)!r}) {what}")
        actual = h.hexdigest() if h is not None else body_sha256
        if actual != self.checksum:
            raise GalleryError(path, f"checksum mismatch: body sha256 is {actual}, header says "
                                     f"{self.checksum}")

    def _matrix_offset(self) -> int:
        return self.file_size - self.rows * self.dim * self.dtype.itemsize

    def _ident_of_row(self, r: int) -> str:
        try:
            return self._decode(int(self.row_identity[r]))[0]
        except Exception:
            return f"#{int(self.row_identity[r])}"

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

    def _compiled(self) -> bool:
        """Whether this gallery's rows go to the compiled scan (float16, :func:`_fused`)."""
        return self.dtype.itemsize == 2 and _fused(self.dim)

    @property
    def scan(self) -> str:
        """How this gallery is scanned: ``"blas"`` (float32: numpy's matrix product) or, for
        float16, :func:`scan_kernel`."""
        return "blas" if self.dtype.itemsize == 4 else scan_kernel(self.dim)

    # -- search --------------------------------------------------------------------------

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of every query with every row: ``(n_queries, rows)`` float32."""
        return self._row_scores(_as_queries(queries, self.dim)).T

    def _row_scores(self, q: np.ndarray) -> np.ndarray:
        """``(rows, n_queries)``: rows-major so that blocks and reduceat stay contiguous."""
        self._check_tables()
        starts = self._row_starts
        parts = self._each_chunk(lambda c: self._scan(q, int(starts[c[0]]), int(starts[c[1]])))
        if not parts:
            return np.empty((self.rows, q.shape[0]), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _scan(self, q: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Cosine scores of rows ``lo:hi`` with the (unit) queries: ``(hi - lo, n_queries)``.

        float32 and one query: one matrix-vector product streams the rows.  float16: the
        compiled fused scan when it is built (:func:`scan_kernel`).  Otherwise, several
        queries or float16: block by block (each float16 block widened to float32), cache-sized.
        """
        if self._mm is None:
            raise GalleryError(self.path, "gallery is closed")
        out = np.empty((hi - lo, q.shape[0]), np.float32)
        if hi <= lo:
            return out
        if self._compiled():  # widened group by group, the GIL released
            _scan_ext.scan_f16(self.matrix[lo:hi], np.ascontiguousarray(q, np.float32), out)
            return out
        f16 = self.dtype.itemsize == 2
        qt = np.ascontiguousarray(q.T)
        one = q.shape[0] == 1
        if not f16 and one:
            np.matmul(self.matrix[lo:hi], qt[:, 0], out=out[:, 0])
            return out
        block_rows = BLOCK_ROWS if f16 else F32_BLOCK_ROWS
        buf = tmp = None
        for s in range(lo, hi, block_rows):
            e = min(hi, s + block_rows)
            block = self.matrix[s:e]
            if f16:
                if buf is None:
                    buf = np.empty((block_rows, self.dim), np.float32)
                    if not _cv_widen_ok():  # the bit operations' scratch space
                        tmp = np.empty((block_rows, self.dim), np.uint32)
                block = _widen_f16(block, buf, tmp)
            if one:
                np.matmul(block, qt[:, 0], out=out[s - lo:e - lo, 0])
            else:
                np.matmul(block, qt, out=out[s - lo:e - lo])
        return out

    def _empty_ids(self) -> np.ndarray:
        """Identities without rows: none in a verified gallery (:meth:`verify` refuses them),
        found once on first use in one opened with ``verify=False``.  They score -inf."""
        got = self.__dict__.get("_empty_list")
        if got is None:
            got = np.flatnonzero(np.diff(self._row_starts.astype(np.int64)) == 0)
            self._empty_list = got
        return got

    def _best_rows(self, s: np.ndarray, j0: int, j1: int) -> np.ndarray:
        """Row scores ``s`` of identities ``j0:j1`` (their rows, in order) -> each identity's
        best row; -inf for an identity without rows."""
        empty = self._empty_ids()
        empty = empty[(empty >= j0) & (empty < j1)] - j0
        if not len(empty) and s.shape[0] == j1 - j0:  # one row each
            return s
        at = self._starts[j0:j1] - int(self._row_starts[j0])
        if not len(empty):
            return np.maximum.reduceat(s, at, axis=0)
        keep = np.ones(j1 - j0, bool)
        keep[empty] = False
        best = np.full((j1 - j0, s.shape[1]), -np.inf, np.float32)
        if keep.any():
            best[keep] = np.maximum.reduceat(s, at[keep], axis=0)
        return best

    def _identity_scores_t(self, q: np.ndarray) -> np.ndarray:
        return self._best_rows(self._row_scores(q), 0, self.n_identities)

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

    def _top_identities(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)``, each ``(n_queries, k)``, best first.

        The identities are cut into chunks of about equal rows at identity boundaries; each
        chunk is scanned, reduced to its identities' best rows and to its own top ``k`` while
        its scores are still in the cache, in the thread pool when there is one; then the
        chunks' candidates are merged.
        """
        self._check_tables()
        parts = self._each_chunk(lambda c: self._chunk_top(q, k, c))
        cols = np.arange(q.shape[0])
        if len(parts) == 1:
            idx, val = parts[0]                                # (candidates, nq)
        else:
            idx = np.concatenate([p[0] for p in parts], axis=0)
            val = np.concatenate([p[1] for p in parts], axis=0)
            if k < idx.shape[0]:
                sel = np.argpartition(-val, k - 1, axis=0)[:k]
                idx, val = idx[sel, cols], val[sel, cols]
        # best first; ties keep file order (the lower identity index first)
        order = np.lexsort((idx, -val), axis=0)
        return idx[order, cols].T, val[order, cols].T

    def _each_chunk(self, fn) -> list:
        """``fn(chunk)`` for each of :meth:`_chunks`, in order: in the thread pool when there is
        one and more than one chunk."""
        chunks = self._chunks()
        if self._pool is None or len(chunks) == 1:
            return [fn(c) for c in chunks]
        return list(self._pool.map(fn, chunks))

    def _chunks(self) -> List[Tuple[int, int]]:
        """Identity ranges ``(j0, j1)`` of about equal rows: one per thread (as long as each
        gets :data:`MIN_THREAD_ROWS`), or one per :data:`CHUNK_ROWS` rows when that gives more
        (scores stay in the cache)."""
        got = self.__dict__.get("_chunk_list")
        if got is not None:
            return got
        n_id, rows = self.n_identities, self.rows
        per_thread = min(self.threads, rows // max(MIN_THREAD_ROWS, 1))
        n = max(per_thread, -(-rows // CHUNK_ROWS), 1)
        n = min(n, max(n_id, 1))
        if n <= 1:
            got = [(0, n_id)]
        else:
            targets = np.arange(1, n, dtype=np.int64) * rows // n
            cuts = np.searchsorted(self._row_starts.astype(np.int64), targets, side="left")
            cuts = np.unique(np.clip(cuts, 1, n_id - 1))
            bounds = [0, *[int(c) for c in cuts], n_id]
            got = list(zip(bounds[:-1], bounds[1:]))
        self._chunk_list = got
        return got

    def _chunk_top(self, q: np.ndarray, k: int, chunk: Tuple[int, int]):
        j0, j1 = chunk
        r0, r1 = int(self._row_starts[j0]), int(self._row_starts[j1])
        if r1 - r0 != j1 - j0 and self._compiled():
            # best row per identity in the compiled scan: the row scores stay in the cache
            s = np.empty((j1 - j0, q.shape[0]), np.float32)
            _scan_ext.scan_f16_best(self.matrix[r0:r1], np.ascontiguousarray(q, np.float32),
                                    self._row_starts[j0:j1 + 1], s)
        else:
            s = self._best_rows(self._scan(q, r0, r1), j0, j1)
        m = j1 - j0
        if k < m:
            sel = np.argpartition(-s, k - 1, axis=0)[:k]   # (k, nq)
            return sel + j0, s[sel, np.arange(s.shape[1])]
        return np.repeat(np.arange(j0, j1)[:, None], s.shape[1], axis=1), s

    def match(self, queries: np.ndarray, settings: Optional[MatchSettings] = None) -> List[Match]:
        """One :class:`Match` per query under ``settings`` (threshold, margin, top k)."""
        settings = settings or MatchSettings()
        return [decide(c, settings) for c in self.search(queries, max(2, settings.top_k))]

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap.  Callers must not use arrays they took from this gallery afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.__dict__.pop("_chunk_list", None)
        self.__dict__.pop("_empty_list", None)
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


def _as_queries(queries, dim: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query embeddings must be (n, {dim}), got shape {np.shape(queries)}")
    norms = np.sqrt(np.einsum("ij,ij->i", q, q))
    if not (np.isfinite(norms).all() and norms.all()):
        raise ValueError("query embeddings must be finite and non-zero")
    return q / norms[:, None]


def read_entries(path) -> tuple:
    """``(identities, row_identity, embeddings float32, embedder_sha256, dtype)`` of a file."""
    with Gallery.open(path, expect_dim=None) as g:
        return (list(g.identities), np.array(g.row_identity, dtype=np.int64), g.embeddings(),
                g.embedder_sha256, g.dtype_name)


# ---------------------------------------------------------------------------- hot swap


class GalleryHolder:
    """The gallery the daemon matches against, hot-swapped when its file changes.

    Every candidate file is checked by its header first (size limit ``max_bytes``, magic,
    version, crc32, sections, dimension, embedder: nothing else of a file that is not a
    gallery is read), then copied to a private snapshot (so an in-place copy over the watched
    file can never change the pages of the gallery in service), hashed while it is copied,
    then checked fully off the hot path, then swapped in.  See :mod:`edged.ota.hotswap`.

    A snapshot is written only when it fits with a margin
    (:func:`edged.runtime.modelstore.check_room`).  When it cannot be written (a full or read-only
    state directory), the candidate is read into memory and checked and served from there:
    the gallery in service never depends on a copy that could not be written.  Then
    :attr:`snapshot_error` says why (one ERROR is logged) until :meth:`retry_snapshot`
    succeeds.

    With a ``snapshot_dir``, the gallery in service is also kept there as
    ``last-good.edgal`` (a hard link to its snapshot): when the file at ``path`` is refused at
    start (a bad drop that stayed on disk, then a reboot), that one is served instead.  Only a
    holder that serves the daemon does this: the daemon calls :meth:`keep_last_good` when the
    holder's set is (confirmed) in service, and from then on every gallery it swaps in is kept.
    A holder built for a candidate set (a drop on probation, a reload) keeps nothing until then.

    A symbolic link at ``path`` is refused, never followed (as every drop: docs/ota.md).
    A file refused for its content is remembered (by inode, size and times):
    :meth:`start` (what a ``SIGHUP`` does) does not read or report it again until it changes.
    """

    def __init__(self, path, expect_embedder: Optional[str], settings: Optional[MatchSettings] = None,
                 on_event: Optional[Callable] = None, expect_dim: Optional[int] = None,
                 snapshot_dir=None, debounce: float = 0.2, settle: float = 1.0,
                 watch: bool = True, threads: Optional[int] = None, keep_previous: bool = False,
                 lock: Optional[threading.Lock] = None, max_bytes: Optional[int] = None):
        from edged.ota.hotswap import SwapHolder

        self.path = Path(path)
        self.expect_embedder = expect_embedder
        self.expect_dim = expect_dim
        self.max_bytes = max_bytes
        self.settings = settings or MatchSettings()
        self.threads = threads if threads is not None else self.settings.threads
        self._snapshot_root = snapshot_dir
        self.last_good = Path(snapshot_dir) / LAST_GOOD if snapshot_dir else None
        self._snapdir = None
        self._snap_lockfile = None  # held (flock) while the snapshot directory is in use
        self._cleaned = False
        self.serving = False  # set by keep_last_good(): this holder serves the daemon
        self._snap_lock = threading.Lock()
        self._retry_lock = threading.Lock()
        self._snap_n = 0
        self.holder = SwapHolder("gallery", self.path, loader=self._load,
                                 version=lambda g: g.checksum, closer=self._close,
                                 on_event=on_event, debounce=debounce, settle=settle, watch=watch,
                                 keep_previous=keep_previous, lock=lock)
        if self.last_good is not None:
            self.holder.on_service = self._keep_last_good

    # -- loading ------------------------------------------------------------------------

    def _root(self) -> Path:
        return Path(self._snapshot_root or tempfile.gettempdir())

    def _clean_stale(self) -> None:
        """Once per holder: remove the snapshot directories of dead processes."""
        if not self._cleaned and self._root().is_dir():
            self._cleaned = True
            _remove_stale_snapshots(self._root())

    def _new_snapshot_path(self) -> Path:
        with self._snap_lock:
            if self._snapdir is None:
                root = self._root()
                os.makedirs(root, mode=0o750, exist_ok=True)
                self._clean_stale()
                self._snapdir, self._snap_lockfile = _new_snapshot_dir(root)
            self._snap_n += 1
            return self._snapdir / f"gallery-{self._snap_n}{SUFFIX}"

    def _write_snapshot(self, chunks, size: int) -> Path:
        """A new snapshot of ``size`` bytes from ``chunks``; OSError when it cannot be
        written (no room for it with the margin, a write failing), nothing left behind."""
        dest = self._new_snapshot_path()
        check_room(self._root(), size, "a gallery snapshot")
        _write_new(dest, chunks)
        return dest

    def _load(self, path: Path) -> Gallery:
        path = Path(path)
        key, ident = self._refusal_key(path), _identity(path)
        try:
            g = self._load_checked(path)
        except GalleryError as exc:
            if not exc.transient and ident is not None:
                _remember_refusal(key, ident, exc.reason)
            raise
        _remember_refusal(key, None, None)
        g.source = path
        return g

    def _load_checked(self, path: Path) -> Gallery:
        with _open_regular(path, confine=True) as f:
            size = os.fstat(f.fileno()).st_size
            if self.max_bytes is not None and size > self.max_bytes:
                raise GalleryError(path, f"{size} bytes, larger than the {self.max_bytes} "
                                         f"allowed (drops.max_gallery_bytes)")
            fields = _checked_header(_read_head(f, path, size), path, size, self.expect_dim)
            _check_embedder(path, fields[15].hex(), self.expect_embedder)
            body = hashlib.sha256()
            try:
                snap = self._write_snapshot(_file_chunks(f, size, path, body), size)
            except OSError as exc:
                return self._in_memory(f, size, path, self._no_snapshot(exc))
        return self._open_snapshot(snap, body.hexdigest(), path)

    def _open_snapshot(self, snap: Path, body_sha256: str, path: Path) -> Gallery:
        g = None
        try:
            g = Gallery.open(snap, expect_dim=self.expect_dim,
                             expect_embedder=self.expect_embedder, verify=False,
                             threads=self.threads)
            g.verify(body_sha256)  # (hashed while copied)
        except BaseException as exc:
            if g is not None:
                g.close()
            _unlink(snap)
            if isinstance(exc, GalleryError):
                raise GalleryError(path, exc.reason, exc.transient) from None
            raise
        g.snapshot = snap
        return g

    def _in_memory(self, f, size: int, path: Path, why: str) -> Gallery:
        g = Gallery.read_into_memory(f, size, path, self.expect_dim, self.expect_embedder,
                                     self.threads)
        g.snapshot_error = why
        log.error("gallery %s: %s; serving it from memory (%s) until the snapshot can be "
                  "written", path, why, human_size(size))
        return g

    def _no_snapshot(self, exc: Exception) -> str:
        """Why a snapshot could not be written, in words."""
        if isinstance(exc, NoRoom):
            return exc.strerror
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return f"cannot write its snapshot in {self._root()}: {why}"

    def retry_snapshot(self) -> bool:
        """When the gallery in service is held in memory only (:attr:`snapshot_error`), try
        again to write its snapshot (with the margin) and serve it from there, keeping it as
        the last good one.  True when the gallery in service has its snapshot (or there is no
        gallery); cheap when there is nothing to do.  Searches go on meanwhile."""
        with self._retry_lock, self.holder.lease() as g:
            if g is None or g.snapshot_error is None:
                return True
            snap = None
            try:
                with memoryview(g._mm) as mv:
                    snap = self._write_snapshot(
                        (mv[i:i + (1 << 20)] for i in range(0, len(mv), 1 << 20)), len(mv))
                g.remap(snap)  # (the view released: the memory is freed here)
            except (OSError, GalleryError) as exc:
                if snap is not None:
                    _unlink(snap)
                g.snapshot_error = self._no_snapshot(exc)
                return False
            g.snapshot, g.snapshot_error = snap, None
            log.info("gallery %s: its snapshot is written (%s); no longer held in memory",
                     g.source, snap)
            self._keep_last_good(g)
        return True

    @property
    def snapshot_error(self) -> Optional[str]:
        """Why the gallery in service has no snapshot and is served from memory (it could
        not be written: a full or read-only state directory); None when it has one or there
        is no gallery.  The daemon reports ``degraded`` while it is set, and calls
        :meth:`retry_snapshot` (with back-off) until that succeeds."""
        g = self.current
        return g.snapshot_error if g is not None else None

    def _refusal_key(self, path: Path) -> tuple:
        return (os.path.abspath(path), self.expect_embedder, self.expect_dim, self.max_bytes)

    def _keep_last_good(self, g: Gallery) -> None:
        """Hard-link the snapshot of ``g`` (now in service) to ``last-good.edgal``; where the
        filesystem has no hard links, copy it in a background thread (never on the frame
        path: a rollback runs on the track thread).  A gallery held in memory only is kept
        once its snapshot is written (:meth:`retry_snapshot`)."""
        if not self.serving or self.last_good is None or g.snapshot is None:
            return
        dest = self.last_good
        with _LG_LOCK:  # one sequence per destination: a newer gallery's copy always wins
            seq = _LG_SEQ[str(dest)] = _LG_SEQ.get(str(dest), 0) + 1
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{seq}.tmp")
            _unlink(tmp)
            try:
                os.link(g.snapshot, tmp)
                os.replace(tmp, dest)
                return
            except OSError as exc:
                _unlink(tmp)
                try:
                    src = open(g.snapshot, "rb")  # readable even once the snapshot is unlinked
                except OSError:
                    log.warning("gallery: cannot keep the gallery in service as %s: %s", dest,
                                exc.strerror or exc)
                    return
        threading.Thread(target=self._copy_last_good, args=(src, tmp, dest, seq, g.file_size),
                         name="gallery-last-good", daemon=True).start()

    def _copy_last_good(self, src, tmp: Path, dest: Path, seq: int, size: int) -> None:
        try:
            with src:
                atomic_write(tmp, iter(lambda: src.read(1 << 20), b""), mode=SNAPSHOT_MODE,
                             room_for=size)
            with _LG_LOCK:
                if seq == _LG_SEQ.get(str(dest)) and self.serving:  # else a newer one wins
                    os.replace(tmp, dest)
        except OSError as exc:
            log.warning("gallery: cannot keep the gallery in service as %s: %s", dest,
                        exc.strerror or exc)
        finally:
            _unlink(tmp)

    def keep_last_good(self) -> None:
        """This holder serves the daemon now (its set is in service, or confirmed after a
        drop): keep its gallery as the last good one, and every gallery it swaps in later."""
        self.serving = True
        with self.holder.lease() as g:
            if g is not None:
                self._keep_last_good(g)

    def _start_last_good(self, refused, again: bool = False) -> Optional[object]:
        """At start, the file at the gallery path was refused: serve the last good gallery.
        ``again``: refused before and unchanged since (said at INFO, not as an error)."""
        say = log.info if again else log.error
        lg = self.last_good
        if lg is None or not lg.is_file():
            say("gallery %s refused at start (%s) and no last good gallery is kept: "
                "every face is unknown until a good gallery arrives", self.path, refused.reason)
            return refused
        ev = self.holder.reload(lg, trigger="start: last good")
        if ev.accepted:
            say("gallery %s refused at start (%s); serving the last good gallery "
                "(checksum %s) from %s until a good file arrives there", self.path,
                refused.reason, str(ev.new_version)[:16], lg)
        return ev

    @staticmethod
    def _close(g: Gallery) -> None:
        g.close()
        if g.snapshot is not None:
            _unlink(g.snapshot)

    # -- the daemon's side --------------------------------------------------------------

    @property
    def current(self) -> Optional[Gallery]:
        return self.holder.current

    def match(self, queries) -> List[Match]:
        """Match on the gallery in service; every face is unknown when there is none."""
        q = np.asarray(queries, dtype=np.float32)
        n = 1 if q.ndim == 1 else q.shape[0]
        with self.holder.lease() as g:
            if g is None:
                return [Match(name=None, identity=None, score=0.0, margin=0.0) for _ in range(n)]
            return g.match(q, self.settings)

    def reload(self, trigger: str = "reload"):
        """Load the file now; returns the SwapEvent."""
        return self.holder.reload(trigger=trigger)

    def start(self):
        """Load the file if it is there, then watch it.  Returns the first SwapEvent or None.

        A file that is there but refused is replaced, in memory, by the last good gallery
        (see the class documentation); the file on disk is left as it is.  A file refused
        before and unchanged since is not read again: the event returned says so, and is not
        reported to ``on_event``.
        """
        from edged.ota.hotswap import SwapEvent

        self._clean_stale()
        known = _known_refusal(self._refusal_key(self.path), _identity(self.path))
        if known is None:
            ev = self.holder.start()
        else:
            log.info("gallery %s: unchanged since it was refused (%s); not read again until "
                     "it changes", self.path, known)
            ev = SwapEvent("gallery", False, str(self.path), known, None, None, 0.0,
                           "start: unchanged", time.time())
            if self.holder.watcher is not None:
                self.holder.watcher.start()
        if ev is not None and not ev.accepted and self.holder.current is None:
            ev = self._start_last_good(ev, again=known is not None)
        return ev

    def stop(self) -> None:
        self.serving = False
        self.holder.stop()
        d, self._snapdir = self._snapdir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        f, self._snap_lockfile = self._snap_lockfile, None
        if f is not None:
            f.close()

    def version(self) -> Optional[str]:
        g = self.current
        return g.checksum if g is not None else None


def _file_chunks(f, size: int, path: Path, body_hash):
    """The first ``size`` bytes of the open file ``f`` in chunks, the bytes after the header
    fed to ``body_hash`` on the way (one read of the file for the copy and its checksum)."""
    f.seek(0)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = _read_into(f, view[:min(len(buf), size - done)], path)
        if not n:
            raise GalleryError(path, f"truncated while being read: {done} of {size} bytes",
                               transient=True)
        body_hash.update(view[min(max(0, HEADER_SIZE - done), n):n])
        yield view[:n]
        done += n


def _write_new(dest: Path, chunks) -> None:
    """Write ``chunks`` to the new file ``dest``, created :data:`SNAPSHOT_MODE` less the
    umask; on any failure (a full disk) nothing of it is left."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 SNAPSHOT_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
    except BaseException:
        _unlink(dest)
        raise


# files refused for their content: (path, expectations) -> (identity, reason); few entries
_REFUSED: dict = {}
_REFUSED_LOCK = threading.Lock()


def _identity(path) -> Optional[tuple]:
    """What tells that the file at ``path`` changed: for the path itself and where a link
    there leads, (device, inode, size, modification and change times); None if nothing
    is there."""
    out = []
    for stat_fn in (os.lstat, os.stat):
        try:
            st = stat_fn(path)
        except OSError:
            if not out:
                return None
            st = None
        out.append(st and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _remember_refusal(key: tuple, ident: Optional[tuple], reason: Optional[str]) -> None:
    """Remember why the file ``ident`` was refused (``reason`` None: forget the key)."""
    with _REFUSED_LOCK:
        _REFUSED.pop(key, None)
        if reason is not None:
            while len(_REFUSED) >= 64:
                _REFUSED.pop(next(iter(_REFUSED)))
            _REFUSED[key] = (ident, reason)


def _known_refusal(key: tuple, ident: Optional[tuple]) -> Optional[str]:
    """Why the file ``ident`` was refused, if it was and has not changed since."""
    with _REFUSED_LOCK:
        got = _REFUSED.get(key)
    return got[1] if got is not None and ident is not None and got[0] == ident else None


_SNAP_LOCK = ".lock"
#: a snapshot directory is made under this name and renamed to SNAPSHOT_PREFIX once locked
_NEW_PREFIX = ".edged-gallery-new-"
# last-good.edgal is shared by every holder of a snapshot root: one sequence per destination
_LG_LOCK = threading.Lock()
_LG_SEQ: dict = {}


def _new_snapshot_dir(root: Path) -> tuple:
    """A new snapshot directory under ``root``, locked before it gets its name, so that a
    directory named ``edged-gallery-*`` whose lock is free belongs to a dead process:
    ``(path, lock file or None)``."""
    tmp = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=str(root)))
    lockf = None
    try:
        try:
            lockf = _lock_snapshot_dir(tmp)
        except OSError as exc:  # a filesystem without flock: unlocked, said once
            log.warning("gallery: cannot lock a snapshot directory in %s (%s); if this "
                        "process is killed, remove it by hand", root, exc.strerror or exc)
        final = root / (SNAPSHOT_PREFIX + tmp.name[len(_NEW_PREFIX):])
        os.rename(tmp, final)
    except BaseException:
        if lockf is not None:
            lockf.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, lockf


def _lock_snapshot_dir(d: Path):
    """Hold an exclusive flock on ``d/.lock`` for as long as the returned file stays open
    (the kernel drops it when the process dies, whatever its PID or PID namespace)."""
    import fcntl
    f = open(d / _SNAP_LOCK, "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise
    return f


def _remove_stale_snapshots(root: Path, min_age: float = 60.0) -> None:
    """Remove the snapshot directories nobody holds any more (left by a SIGKILL, a crash).

    A directory is in use while its ``.lock`` is flocked by a live holder; it is locked
    before it gets its ``edged-gallery-`` name (:func:`_new_snapshot_dir`), so one whose lock
    is free is removed at once, however young (a restart right after a SIGKILL).  Only one
    with no lock file (made by an older edged) or still being made (``.edged-gallery-new-``)
    is left alone while younger than ``min_age`` seconds."""
    import fcntl
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for d in entries:
        making = d.name.startswith(_NEW_PREFIX)
        if not (making or d.name.startswith(SNAPSHOT_PREFIX)) or d.is_symlink() or not d.is_dir():
            continue
        try:
            f = open(d / _SNAP_LOCK, "rb")
        except FileNotFoundError:
            f = None
        except OSError:
            continue
        with f if f is not None else contextlib.nullcontext():
            if f is None or making:
                try:
                    if time.time() - d.stat().st_mtime < min_age:
                        continue
                except OSError:
                    continue
            if f is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held (in use), or locks unsupported here: left alone
            log.info("gallery: removing %s, left by a process that is gone", d)
            shutil.rmtree(d, ignore_errors=True)


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
