"""The gallery: a memory-mapped file of enrolled people, searched by cosine similarity.

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
block-wise for several); float16 by the compiled scan ``edged._scan`` (groups of rows widened
in registers or in the L1 cache and multiplied there, see ``_scan_kernel.h``), or where it is
not built by widening blocks of rows to float32 first.  Then the best row of every identity
(rows are grouped by identity: in the compiled scan, else one ``np.maximum.reduceat``), then
``argpartition`` for the top k.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import stat as _stat
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from edged.modelstore import atomic_write
from edged.types import Match

log = logging.getLogger("edged.gallery")

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


class GalleryError(ValueError):
    """A gallery file cannot be used; the message names the file and the exact reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class MatchSettings:
    threshold: float = field(default=0.58, metadata={
        "min": -1.0, "max": 1.0,
        "help": "identification threshold: cosine similarity the best enrolled identity must reach "
                "to be named (open-set default, chosen on faces/dev so that about 1 % of strangers "
                "are accepted against a gallery of a few hundred people; see docs/accuracy.md); "
                "stricter than the pair-verification threshold"})
    min_margin: float = field(default=0.0, metadata={
        "min": 0.0, "max": 2.0,
        "help": "also require the best identity to beat the second best by this much (0 = off)"})
    top_k: int = field(default=5, metadata={
        "min": 1, "max": 100, "help": "candidates kept per face (Match.candidates)"})
    threads: int = field(default=2, metadata={
        "min": 1, "max": 64,
        "help": "threads splitting each gallery scan of 64k rows or more (smaller galleries "
                "are scanned by one); best with OPENBLAS_NUM_THREADS=1 (docs/benchmarks.md)"})


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


# ---------------------------------------------------------------------------- fp16 widening


try:  # the compiled float16 scan (setup.py builds it when it can; edged/_scan_kernel.h)
    from edged import _scan as _scan_ext
except ImportError:  # pragma: no cover - depends on the install
    _scan_ext = None


def _fused(dim: int) -> bool:
    """Whether float16 rows of ``dim`` values go to the compiled scan: only its vector kernels
    (its portable C loop is slower than widening blocks with OpenCV)."""
    return (_scan_ext is not None and _scan_ext.KERNEL in ("avx2", "neon")
            and dim <= _scan_ext.MAX_DIM)


def scan_kernel(dim: int = 192) -> str:
    """How float16 galleries of ``dim``-value rows are scanned here: ``"avx2"`` or ``"neon"``
    (the compiled scan, 2 bytes read per value), else ``"opencv"`` or ``"numpy"`` (blocks
    widened to float32 first, 3 to 4 times slower: docs/benchmarks.md)."""
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

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path, expect_dim: Optional[int] = 192, expect_embedder: Optional[str] = None,
             verify: bool = True, threads: int = 1) -> "Gallery":
        """Map and check ``path``; raise :class:`GalleryError` saying what is wrong.

        ``verify=True`` (the default, used for every hot swap) also checks the body sha256,
        the identity structure and every row (finite, non-zero, unit norm): one pass over the
        file.  ``verify=False`` checks only the header and section sizes, in constant time.
        ``threads`` > 1 splits each scan over that many threads (useful for float16).
        """
        path = Path(path)
        g = cls()
        g.path = path
        _check_regular(path)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise GalleryError(path, f"cannot open: {exc.strerror or exc}") from None
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GalleryError(path, "empty file (0 bytes)")
            if size < HEADER_SIZE:
                head = f.read(len(MAGIC))
                if head != MAGIC[:len(head)]:
                    raise GalleryError(path, f"wrong magic {head!r} (expected {MAGIC!r}): "
                                             f"not an edged gallery")
                raise GalleryError(path, f"truncated header: {size} bytes, a header is "
                                         f"{HEADER_SIZE}")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        g._file, g._mm = f, mm
        try:
            g._parse(size, expect_dim, expect_embedder)
            if verify:
                g.verify()
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
         so_off, rs_off, ri_off, s_off, s_size, m_off, emb_sha, body_sha) = _header(mm, path)
        if header_size != HEADER_SIZE:
            raise GalleryError(path, f"header size {header_size}, expected {HEADER_SIZE}")
        if dtype_code not in DTYPES:
            raise GalleryError(path, f"unknown storage dtype code {dtype_code} "
                                     f"(1 = float32, 2 = float16)")
        if file_size != size:
            what = "truncated" if size < file_size else "trailing bytes"
            raise GalleryError(path, f"{what}: file is {size} bytes, header says {file_size}")
        if dim < 1:
            raise GalleryError(path, f"invalid embedding dimension {dim}")
        dt = DTYPES[dtype_code]
        # the section table must be exactly the canonical one for these counts
        want_so = HEADER_SIZE
        want_rs = _align(want_so + (2 * idents + 1) * 8)
        want_ri = _align(want_rs + (idents + 1) * 8)
        want_s = _align(want_ri + rows * 4)
        want_m = _align(want_s + s_size)
        want_end = want_m + rows * dim * dt.itemsize
        if (so_off, rs_off, ri_off, s_off, m_off) != (want_so, want_rs, want_ri, want_s, want_m):
            raise GalleryError(path, "section offsets inconsistent with the row and identity "
                                     f"counts ({rows} rows, {idents} identities)")
        if want_end != file_size:
            raise GalleryError(path, f"sizes inconsistent: {rows} rows x {dim} x "
                                     f"{dt.itemsize} bytes end at {want_end}, file is {file_size}")
        if expect_dim is not None and dim != expect_dim:
            raise GalleryError(path, f"embedding dimension {dim}, the running embedder gives "
                                     f"{expect_dim}")
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
        if expect_embedder is not None and self.embedder_sha256 != expect_embedder.lower():
            raise GalleryError(path, f"made by embedder sha256 {self.embedder_sha256}, the "
                                     f"running embedder is {expect_embedder.lower()}")
        self._str_off = np.frombuffer(mm, "<u8", 2 * idents + 1, so_off)
        self._row_starts = np.frombuffer(mm, "<u8", idents + 1, rs_off)
        self.row_identity = np.frombuffer(mm, "<u4", rows, ri_off)
        self._strings = memoryview(mm)[s_off:s_off + s_size]
        self.matrix = np.frombuffer(mm, dt, rows * dim, m_off).reshape(rows, dim)
        # the structure that the search relies on, checked in constant time
        if (int(self._str_off[0]) != 0 or int(self._str_off[-1]) != s_size
                or int(self._row_starts[0]) != 0 or int(self._row_starts[-1]) != rows):
            raise GalleryError(path, "identity table does not cover the strings or the rows")
        self._starts = self._row_starts[:-1].astype(np.intp)

    def verify(self) -> None:
        """The full check: body sha256, identity table, every row finite and unit-norm."""
        path, mm = self.path, self._mm
        if np.any(np.diff(self._str_off.astype(np.int64)) < 0):
            raise GalleryError(path, "string offsets are not increasing")
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
            try:
                ident, _ = self._decode(j)
            except UnicodeDecodeError as exc:
                raise GalleryError(path, f"identity {j}: invalid UTF-8 ({exc.reason})") from None
            if not ident:
                raise GalleryError(path, f"identity {j} has an empty id")
            if ident in ids:
                raise GalleryError(path, f"identity id {ident!r} appears twice")
            ids.add(ident)
        h = hashlib.sha256()
        h.update(memoryview(mm)[HEADER_SIZE:self._matrix_offset()])
        tol = NORM_TOLERANCE[1 if self.dtype.itemsize == 4 else 2]
        buf = np.empty((BLOCK_ROWS, self.dim), np.float32)
        tmp = np.empty((BLOCK_ROWS, self.dim), np.uint32)
        for s in range(0, self.rows, BLOCK_ROWS):
            block = self.matrix[s:s + BLOCK_ROWS]
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
        actual = h.hexdigest()
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
            o = self._str_off
            a, b, c = int(o[2 * j]), int(o[2 * j + 1]), int(o[2 * j + 2])
            got = (bytes(self._strings[a:b]).decode("utf-8"),
                   bytes(self._strings[b:c]).decode("utf-8"))
            self._names[j] = got
        return got

    @property
    def identities(self) -> List[Tuple[str, str]]:
        """``[(id, name)]`` in file order (decoded on first use)."""
        if self._identities is None:
            self._identities = [self._decode(j) for j in range(self.n_identities)]
        return self._identities

    def rows_of(self, j: int) -> Tuple[int, int]:
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
        counts = np.diff(self._row_starts.astype(np.int64))
        return {"path": str(self.path), "format_version": self.version, "dim": self.dim,
                "dtype": self.dtype_name, "rows": self.rows, "identities": self.n_identities,
                "rows_per_identity": {"min": int(counts.min()) if len(counts) else 0,
                                      "max": int(counts.max()) if len(counts) else 0},
                "embedder_sha256": self.embedder_sha256, "checksum": self.checksum,
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
        if self._mm is None:
            raise GalleryError(self.path, "gallery is closed")
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
        if self._mm is None:
            raise GalleryError(self.path, "gallery is closed")
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
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view: the mapping goes with it
                log.debug("%s: mapping still referenced; left to the garbage collector", self.path)
        f, self._file = self._file, None
        if f is not None:
            f.close()

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


def decide(candidates: Sequence[tuple], settings: MatchSettings) -> Match:
    """Turn ``[(id, name, score)]`` (best first) into a :class:`Match` under ``settings``.

    The margin is the best score minus the second identity's; with a single enrolled
    identity there is no second and the margin equals the score.  The margin is checked only
    when ``min_margin`` > 0.
    """
    if not candidates:
        return Match(name=None, identity=None, score=0.0, margin=0.0, candidates=[])
    ident, name, score = candidates[0]
    second = candidates[1][2] if len(candidates) > 1 else 0.0
    margin = score - second
    cands = [(n, s) for _, n, s in candidates[:settings.top_k]]
    if score >= settings.threshold and (settings.min_margin <= 0 or margin >= settings.min_margin):
        return Match(name=name, identity=ident, score=score, margin=margin, candidates=cands)
    return Match(name=None, identity=None, score=score, margin=margin, candidates=cands)


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
    atomic_write(path, [bytes(head), bytes(body), memoryview(mat.reshape(-1).view(np.uint8))])
    return h.hexdigest()


def _header(buf, path: Path) -> tuple:
    """The header fields of ``buf`` (a gallery's bytes from the start, at least HEADER_SIZE
    of them once the magic is right), its magic, format version and checksum checked."""
    magic = bytes(buf[:len(MAGIC)])
    if magic != MAGIC:
        raise GalleryError(path, f"wrong magic {magic!r} (expected {MAGIC!r}): "
                                 f"not an edged gallery")
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


def _check_regular(path: Path) -> None:
    """Raise :class:`GalleryError` unless ``path`` is a regular file (opening a FIFO would
    block until a writer comes)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GalleryError(path, "no such file") from None
    except OSError as exc:
        raise GalleryError(path, f"cannot stat: {exc.strerror or exc}") from None
    if _stat.S_ISDIR(st.st_mode):
        raise GalleryError(path, "is a directory, not a gallery file")
    if not _stat.S_ISREG(st.st_mode):
        raise GalleryError(path, "is not a regular file")


def peek_embedder(path) -> str:
    """The embedder sha256 a gallery file says it was made by, from its header alone, read
    with a plain read (no mapping: the file may be a live one another program is rewriting,
    and a mapped file cut short under a reader kills the process with SIGBUS).  Raises
    :class:`GalleryError` when the header is not a good one."""
    path = Path(path)
    _check_regular(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise GalleryError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(head) < HEADER_SIZE and head.startswith(MAGIC):
        raise GalleryError(path, f"truncated header: {len(head)} bytes, a header is {HEADER_SIZE}")
    return _header(head, path)[15].hex()  # (index 15: the embedder sha256)


def read_entries(path) -> tuple:
    """``(identities, row_identity, embeddings float32, embedder_sha256, dtype)`` of a file."""
    with Gallery.open(path, expect_dim=None) as g:
        return (list(g.identities), np.array(g.row_identity, dtype=np.int64), g.embeddings(),
                g.embedder_sha256, g.dtype_name)


# ---------------------------------------------------------------------------- hot swap


class GalleryHolder:
    """The gallery the daemon matches against, hot-swapped when its file changes.

    Every candidate file is first copied to a private snapshot (so an in-place copy over the
    watched file can never change the pages of the gallery in service), then opened with full
    validation off the hot path, then swapped in.  See :mod:`edged.hotswap`.

    With a ``snapshot_dir``, the gallery in service is also kept there as
    ``last-good.edgal`` (a hard link to its snapshot): when the file at ``path`` is refused at
    start (a bad drop that stayed on disk, then a reboot), that one is served instead.  Only a
    holder that serves the daemon does this: the daemon calls :meth:`keep_last_good` when the
    holder's set is (confirmed) in service, and from then on every gallery it swaps in is kept.
    A holder built for a candidate set (a drop on probation, a reload) keeps nothing until then.
    """

    def __init__(self, path, expect_embedder: Optional[str], settings: Optional[MatchSettings] = None,
                 on_event: Optional[Callable] = None, expect_dim: int = 192,
                 snapshot_dir=None, debounce: float = 0.2, settle: float = 1.0,
                 watch: bool = True, threads: Optional[int] = None, keep_previous: bool = False,
                 lock: Optional[threading.Lock] = None):
        from edged.hotswap import SwapHolder

        self.path = Path(path)
        self.expect_embedder = expect_embedder
        self.expect_dim = expect_dim
        self.settings = settings or MatchSettings()
        self.threads = threads if threads is not None else self.settings.threads
        self._snapshot_root = snapshot_dir
        self.last_good = Path(snapshot_dir) / LAST_GOOD if snapshot_dir else None
        self._snapdir = None
        self._snap_lockfile = None  # held (flock) while the snapshot directory is in use
        self.serving = False  # set by keep_last_good(): this holder serves the daemon
        self._snap_lock = threading.Lock()
        self._snap_n = 0
        self.holder = SwapHolder("gallery", self.path, loader=self._load,
                                 version=lambda g: g.checksum, closer=self._close,
                                 on_event=on_event, debounce=debounce, settle=settle, watch=watch,
                                 keep_previous=keep_previous, lock=lock)
        if self.last_good is not None:
            self.holder.on_service = self._keep_last_good

    # -- loading ------------------------------------------------------------------------

    def _snapshot(self, src: Path) -> Path:
        with self._snap_lock:
            if self._snapdir is None:
                root = self._snapshot_root or tempfile.gettempdir()
                os.makedirs(root, exist_ok=True)
                _remove_stale_snapshots(Path(root))
                snapdir = Path(tempfile.mkdtemp(prefix=SNAPSHOT_PREFIX, dir=str(root)))
                try:
                    self._snap_lockfile = _lock_snapshot_dir(snapdir)
                except OSError as exc:  # a filesystem without flock: unlocked, said once
                    log.warning("gallery: cannot lock %s (%s); if this process is killed, "
                                "remove it by hand", snapdir, exc.strerror or exc)
                self._snapdir = snapdir
            self._snap_n += 1
            dest = self._snapdir / f"gallery-{self._snap_n}{SUFFIX}"
        _check_regular(src)  # a FIFO would block the open below
        try:
            fsrc = open(src, "rb")
        except FileNotFoundError:
            raise GalleryError(src, "no such file") from None
        except OSError as exc:
            raise GalleryError(src, f"cannot read: {exc.strerror or exc}") from None
        with fsrc:
            try:
                with open(dest, "wb") as fdst:
                    while True:
                        try:
                            chunk = fsrc.read(1 << 20)
                        except OSError as exc:
                            raise GalleryError(src, f"cannot read: {exc.strerror or exc}") from None
                        if not chunk:
                            break
                        fdst.write(chunk)
                os.chmod(dest, 0o444)
            except OSError as exc:  # writing (a full disk): nothing of the copy is left behind
                _unlink(dest)
                raise GalleryError(src, f"cannot copy it to {dest}: {exc.strerror or exc}") from None
            except BaseException:
                _unlink(dest)
                raise
        return dest

    def _load(self, path: Path) -> Gallery:
        snap = self._snapshot(Path(path))
        try:
            g = Gallery.open(snap, expect_dim=self.expect_dim,
                             expect_embedder=self.expect_embedder, threads=self.threads)
        except GalleryError as exc:
            _unlink(snap)
            raise GalleryError(path, exc.reason) from None
        except BaseException:
            _unlink(snap)
            raise
        g.source = Path(path)
        return g

    def _keep_last_good(self, g: Gallery) -> None:
        """Hard-link the snapshot of ``g`` (now in service) to ``last-good.edgal``; where the
        filesystem has no hard links, copy it in a background thread (never on the frame
        path: a rollback runs on the track thread)."""
        if not self.serving or self.last_good is None:
            return
        dest = self.last_good
        with _LG_LOCK:  # one sequence per destination: a newer gallery's copy always wins
            seq = _LG_SEQ[str(dest)] = _LG_SEQ.get(str(dest), 0) + 1
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{seq}.tmp")
            _unlink(tmp)
            try:
                os.link(g.path, tmp)
                os.replace(tmp, dest)
                return
            except OSError as exc:
                _unlink(tmp)
                try:
                    src = open(g.path, "rb")  # readable even once the snapshot is unlinked
                except OSError:
                    log.warning("gallery: cannot keep the gallery in service as %s: %s", dest,
                                exc.strerror or exc)
                    return
        threading.Thread(target=self._copy_last_good, args=(src, tmp, dest, seq),
                         name="gallery-last-good", daemon=True).start()

    def _copy_last_good(self, src, tmp: Path, dest: Path, seq: int) -> None:
        from edged.modelstore import atomic_write
        try:
            with src:
                atomic_write(tmp, iter(lambda: src.read(1 << 20), b""))
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

    def _start_last_good(self, refused) -> Optional[object]:
        """At start, the file at the gallery path was refused: serve the last good gallery."""
        lg = self.last_good
        if lg is None or not lg.is_file():
            log.error("gallery %s refused at start (%s) and no last good gallery is kept: "
                      "every face is unknown until a good gallery arrives", self.path,
                      refused.reason)
            return refused
        ev = self.holder.reload(lg, trigger="start: last good")
        if ev.accepted:
            log.error("gallery %s refused at start (%s); serving the last good gallery "
                      "(checksum %s) from %s until a good file arrives there", self.path,
                      refused.reason, str(ev.new_version)[:16], lg)
        return ev

    @staticmethod
    def _close(g: Gallery) -> None:
        snap = g.path
        g.close()
        _unlink(snap)

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
        """Load the file now (the daemon calls this on SIGHUP); returns the SwapEvent."""
        return self.holder.reload(trigger=trigger)

    def start(self):
        """Load the file if it is there, then watch it.  Returns the first SwapEvent or None.

        A file that is there but refused is replaced, in memory, by the last good gallery
        (see the class documentation); the file on disk is left as it is.
        """
        ev = self.holder.start()
        if ev is not None and not ev.accepted and self.holder.current is None:
            ev = self._start_last_good(ev)
        return ev

    def stop(self) -> None:
        self.serving = False
        self.holder.stop()
        d, self._snapdir = self._snapdir, None
        if d is not None:
            import shutil
            shutil.rmtree(d, ignore_errors=True)
        f, self._snap_lockfile = self._snap_lockfile, None
        if f is not None:
            f.close()

    def version(self) -> Optional[str]:
        g = self.current
        return g.checksum if g is not None else None


_SNAP_LOCK = ".lock"
# last-good.edgal is shared by every holder of a snapshot root: one sequence per destination
_LG_LOCK = threading.Lock()
_LG_SEQ: dict = {}


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

    A directory is in use while its ``.lock`` is flocked by a live holder.  Directories younger
    than ``min_age`` seconds are left alone (one being created has no lock yet), as are those
    whose lock is held; one with no lock file (made by an older edged) is removed."""
    import fcntl
    import shutil
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for d in entries:
        if not d.name.startswith(SNAPSHOT_PREFIX) or not d.is_dir():
            continue
        try:
            if time.time() - d.stat().st_mtime < min_age:
                continue
        except OSError:
            continue
        try:
            f = open(d / _SNAP_LOCK, "rb")
        except FileNotFoundError:
            f = None
        except OSError:
            continue
        if f is not None:
            with f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held (in use), or locks unsupported here: left alone
                log.info("gallery: removing %s, left by a process that is gone", d)
                shutil.rmtree(d, ignore_errors=True)
        else:
            log.info("gallery: removing %s, left by a process that is gone", d)
            shutil.rmtree(d, ignore_errors=True)


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
