"""MobileFaceNet embeddings: aligned 112 x 112 faces in, L2-normalised 192-d float32 vectors out.

The installed model is the dynamic-batch copy of MobileFaceNet (``embedder`` role in the
manifest), so any batch size works and batch 1 costs about half of batch 2.  Batches are split
into power-of-two chunks, each with an interpreter sized once (see
:class:`edged.detect.BatchRunner`).  :attr:`Embedder.sha256` is the sha256 of the model file
actually loaded: a gallery is only valid for the embedder that made it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edged.detect import BatchRunner

__all__ = ["Embedder", "EMBEDDING_DIM"]

EMBEDDING_DIM = 192
MAX_BATCH = 8  # the largest batch (one interpreter per power of two up to it)
_SCALE = np.float32(1.0 / 128.0)
_SHIFT = np.float32(127.5)


class Embedder:
    """MobileFaceNet on faces aligned by :func:`edged.align.align_face` (BGR uint8 112 x 112)."""

    dim: int = EMBEDDING_DIM
    size: int = 112

    def __init__(self, model: bytes, sha256: str, accel=None, max_batch: int = MAX_BATCH):
        self.sha256 = sha256
        self.runner = BatchRunner(model, accel, name="embedder", sha256=sha256, max_batch=max_batch)
        shape = self.runner.sample_shape
        if tuple(shape) != (self.size, self.size, 3):
            raise ValueError(f"embedder model input is {shape}, expected (112, 112, 3)")
        try:  # faces come one at a time too (the interpreter for 1 is kept for them)
            self.runner.runner(1)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"embedder model cannot embed one face at a time "
                             f"({str(exc).splitlines()[0]}): a MobileFaceNet with its batch "
                             f"baked at 2 needs the dynamic-batch copy that 'edged models "
                             f"install' writes (docs/models.md)") from None
        self.delegate = self.runner.delegate

    @classmethod
    def from_models(cls, models_dir=None, accel=None) -> "Embedder":
        from edged.modelstore import read_verified

        data, digest, _ = read_verified("embedder", models_dir)
        return cls(data, digest, accel)

    def _batch(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        for i, a in enumerate(aligned):
            if not isinstance(a, np.ndarray) or a.shape != (self.size, self.size, 3) or a.dtype != np.uint8:
                got = f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"embedder: face {i} must be a 112 x 112 x 3 uint8 BGR image "
                                 f"(from align_face), got {got}")
        x = np.stack(aligned)[..., ::-1].astype(np.float32)  # BGR -> RGB
        x -= _SHIFT
        x *= _SCALE
        return x

    def embed(self, aligned: Sequence[np.ndarray], flip: bool = False) -> np.ndarray:
        """``(N, 192)`` float32, each row of unit length.

        ``flip=True`` also embeds each face's mirror image and averages the two (then
        normalises again); both go through the model in the same batch.
        """
        n = len(aligned)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self._batch(aligned)
        if flip:
            x = np.concatenate([x, x[:, :, ::-1]], axis=0)
        emb = self.runner.run(x)[0].astype(np.float32)
        if flip:
            emb = emb[:n] / _norms(emb[:n]) + emb[n:] / _norms(emb[n:])
        emb /= _norms(emb)
        return emb


def _norms(v: np.ndarray) -> np.ndarray:
    return np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
