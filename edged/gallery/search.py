"""Searching a gallery's matrix: the float16 widening, the scan, each identity's best row,
the top k, and the thread pool that splits a scan.

Search is a matrix product over the mapped matrix: float32 by numpy (one gemv for one query,
block-wise for several); float16 by the compiled scan ``edged.gallery._scan`` (groups of rows widened
in registers or in the L1 cache and multiplied there, see ``_scan_kernel.h``), or where it is
not built by widening blocks of rows to float32 first.  Then the best row of every identity
(rows are grouped by identity: in the compiled scan, else one ``np.maximum.reduceat``), then
``argpartition`` for the top k.

The tunables here (:data:`BLOCK_ROWS`, :data:`CHUNK_ROWS` ...) and ``_scan_ext`` are read from
this module at every search: a test or a benchmark that changes them sets them here.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np

from edged.gallery.format import GalleryError


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


class GallerySearch:
    """The search internals of :class:`edged.gallery.gallery.Gallery` (a mixin: they read its
    mapped arrays ``matrix``, ``_row_starts``, ``_starts`` and its identity counts); the
    public search API (:meth:`~edged.gallery.gallery.Gallery.search` ...) is the Gallery's."""

    def _start_pool(self, threads: int) -> None:
        """Split each scan over ``threads`` threads from now on (1: none)."""
        self.threads = max(1, int(threads))
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gallery-scan")

    def _stop_search(self) -> None:
        """Stop the thread pool and forget what the search cached (the gallery is closing)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.__dict__.pop("_chunk_list", None)
        self.__dict__.pop("_empty_list", None)

    def _compiled(self) -> bool:
        """Whether this gallery's rows go to the compiled scan (float16, :func:`_fused`)."""
        return self.dtype.itemsize == 2 and _fused(self.dim)

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
