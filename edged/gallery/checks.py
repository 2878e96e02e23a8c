"""The checks of an open gallery beyond its header: the identity tables that every search
and name lookup uses, and the full check (:meth:`GalleryChecks.verify`: body sha256, identity
table, ids, every row finite and unit-norm, one pass over the file)."""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from edged.gallery import search
from edged.gallery.format import HEADER_SIZE, NORM_TOLERANCE, GalleryError
from edged.gallery.search import _widen_f16


class GalleryChecks:
    """The checks of :class:`edged.gallery.gallery.Gallery` (a mixin: they read its mapped
    arrays and decode its identities).  The rows are checked in blocks of
    :data:`edged.gallery.search.BLOCK_ROWS`, read from that module at every check."""

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
        block_rows = min(search.BLOCK_ROWS, self.rows)
        buf = np.empty((block_rows, self.dim), np.float32)
        tmp = np.empty((block_rows, self.dim), np.uint32)
        for s in range(0, self.rows, search.BLOCK_ROWS):
            block = self.matrix[s:s + search.BLOCK_ROWS]
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
