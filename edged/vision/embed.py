"""Face embeddings: aligned 112 x 112 faces in, L2-normalised float32 vectors out.

The embedder is a model of the manifest's ``embedder`` role: MobileFaceNet (192 values, the
default; installed as its dynamic-batch copy) or SFace (128 values, ``edged models install
--embedder sface``).  What a model takes and gives (width, input size, default thresholds) is
its manifest entry's ``embedding`` block (:class:`EmbedderSpec`), checked against the model
itself when it is loaded.  Batches are split into power-of-two chunks, each with an
interpreter sized once (see :class:`edged.vision.detect.BatchRunner`).  :attr:`Embedder.sha256` is
the sha256 of the model file actually loaded: a gallery is only valid for the embedder that
made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from edged.vision.detect import BatchRunner

__all__ = ["Embedder", "EmbedderSpec", "DEFAULT_EMBEDDER"]

#: the embedder edged runs unless told otherwise (models.embedder_model, --embedder)
DEFAULT_EMBEDDER = "mobilefacenet"
MAX_BATCH = 8  # the largest batch (one interpreter per power of two up to it)
_SCALE = np.float32(1.0 / 128.0)
_SHIFT = np.float32(127.5)


@dataclass(frozen=True)
class EmbedderSpec:
    """What an embedder model takes and gives, from its manifest entry's ``embedding``."""

    name: str
    dim: int
    size: int = 112
    identification: Optional[float] = None  # default open-set threshold (match.threshold)
    verification: Optional[float] = None  # default pair threshold (edged compare)

    @classmethod
    def from_entry(cls, entry) -> "EmbedderSpec":
        """The spec of a :class:`edged.runtime.modelstore.ModelEntry`; a :class:`ValueError` naming
        the entry when its ``embedding`` block is missing or wrong."""
        emb = (entry.spec or {}).get("embedding")
        what = f"manifest entry {entry.role} {entry.name or entry.file}"
        if not isinstance(emb, dict):
            raise ValueError(f"{what}: no 'embedding' block (dim, input_size, thresholds)")
        thr = emb.get("thresholds") or {}
        try:
            spec = cls(name=entry.name or entry.file, dim=int(emb["dim"]),
                       size=int(emb.get("input_size", 112)),
                       identification=_opt_float(thr.get("identification")),
                       verification=_opt_float(thr.get("verification")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what}: bad 'embedding' block {emb!r}: {exc}") from None
        if not 1 <= spec.dim <= 4096 or spec.size != 112:
            raise ValueError(f"{what}: embedding dim {spec.dim} and input size {spec.size}: "
                             f"want 1..4096 values from 112 x 112 faces")
        return spec

    @classmethod
    def of_model(cls, sha256: str, manifest=None) -> Optional["EmbedderSpec"]:
        """The spec of the manifest's embedder whose (loaded) file has ``sha256``, if any."""
        from edged.runtime.modelstore import Manifest, ModelError

        try:
            entry = (manifest or Manifest.load()).by_sha256(sha256)
        except ModelError:
            return None
        if entry is None or entry.role != "embedder":
            return None
        return cls.from_entry(entry)


def _opt_float(v) -> Optional[float]:
    return None if v is None else float(v)


class Embedder:
    """An embedder model on faces aligned by :func:`edged.vision.align.align_face` (BGR uint8
    112 x 112).  ``spec`` says what the model gives; by default the manifest's entry for
    ``sha256``, else (a model the manifest does not name) what the model's output says."""

    def __init__(self, model: bytes, sha256: str, accel=None, max_batch: int = MAX_BATCH,
                 spec: Optional[EmbedderSpec] = None):
        self.sha256 = sha256
        self.runner = BatchRunner(model, accel, name="embedder", sha256=sha256, max_batch=max_batch)
        shape = self.runner.sample_shape
        self.size = 112
        if tuple(shape) != (self.size, self.size, 3):
            raise ValueError(f"embedder model input is {shape}, expected (112, 112, 3)")
        try:  # faces come one at a time too (the interpreter for 1 is kept for them)
            out = self.runner.runner(1).output_details()[0]["shape"]
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"embedder model cannot embed one face at a time "
                             f"({str(exc).splitlines()[0]}): a MobileFaceNet with its batch "
                             f"baked at 2 needs the dynamic-batch copy that 'edged models "
                             f"install' writes (docs/models.md)") from None
        width = int(out[-1])
        self.spec = spec or EmbedderSpec.of_model(sha256) or EmbedderSpec("unknown", width)
        if self.spec.dim != width:
            raise ValueError(f"embedder model gives {width} values per face, its manifest "
                             f"entry ({self.spec.name}) says {self.spec.dim}")
        self.delegate = self.runner.delegate

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_models(cls, models_dir=None, accel=None, name: Optional[str] = None) -> "Embedder":
        """The installed embedder ``name`` (``"sface"``; None: the manifest's default)."""
        from edged.runtime.modelstore import Manifest, read_verified

        manifest = Manifest.load()
        data, digest, _ = read_verified("embedder", models_dir, manifest, name=name)
        return cls(data, digest, accel, spec=EmbedderSpec.from_entry(manifest.model("embedder", name)))

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
        """``(N, dim)`` float32, each row of unit length.

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
