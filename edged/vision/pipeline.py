"""The face pipeline: detect -> align -> quality -> embed (-> liveness), on one BGR image.

>>> pipe = FacePipeline.from_models()
>>> faces = pipe.process(image_bgr)        # boxes, landmarks, aligned, quality, embeddings
>>> face = central_face(faces, image_bgr.shape)

Faces below the quality minimums are returned with ``embedding = None``.  With a liveness
stage (``liveness.enabled``, :mod:`edged.vision.liveness`) the faces that are embedded also get
``Face.liveness`` (None below ``liveness.min_size``).  A pipeline is not thread-safe (its
interpreters are reused between calls): use one per thread.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from edged.vision.align import align_face
from edged.vision.detect import DetectionSettings, MtcnnDetector
from edged.vision.embed import Embedder
from edged.vision.imageio import to_bgr8
from edged.vision.liveness import LivenessSettings, LivenessStage
from edged.vision.quality import QualitySettings, assess
from edged.types import Face

__all__ = ["PipelineSettings", "FacePipeline", "central_face", "cosine", "DEFAULT_MATCH_THRESHOLD"]

# Chosen on ../shared/faces/dev/pairs.csv by tools/eval_verification.py (docs/accuracy.md):
# the midpoint of the interval of thresholds with the best pair accuracy, over all 1297 pairs.
DEFAULT_MATCH_THRESHOLD = 0.418


@dataclass
class PipelineSettings:
    """Settings of the face pipeline: the ``detection:`` and ``quality:`` sections,
    ``pipeline.flip`` and ``pipeline.detect_width`` in the configuration (``match_threshold`` is for ``edged compare``)."""

    detection: DetectionSettings = field(default_factory=DetectionSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    detect_width: int = field(default=0, metadata={
        "min": 0, "max": 8192,
        "help": "detect on a copy of the frame scaled to this width (aspect kept, never "
                "enlarged), align and embed from the full-resolution frame; 0 = on the frame "
                "itself (the daemon's pipeline.detect_width defaults to 640)"})
    flip: bool = field(default=False, metadata={
        "help": "also embed each face's mirror image and average the two (costs a second "
                "embedding per face; see docs/accuracy.md for what it gives)"})
    match_threshold: float = field(default=DEFAULT_MATCH_THRESHOLD, metadata={
        "min": -1.0, "max": 1.0,
        "help": "cosine similarity at or above which two faces are the same person "
                "(edged compare; chosen on the dev pairs, docs/accuracy.md)"})


def _split_accel(accel):
    """``{"detector": {...}, "embedder": {...}}`` or one setting for both."""
    if isinstance(accel, dict) and ("detector" in accel or "embedder" in accel) and "type" not in accel:
        unknown = set(accel) - {"detector", "embedder"}
        if unknown:
            raise ValueError(f"accelerator: unknown keys {sorted(unknown)}; expected 'detector' "
                             f"and/or 'embedder', or one accelerator setting with a 'type'")
        return accel.get("detector"), accel.get("embedder")
    return accel, accel


class FacePipeline:
    def __init__(self, detector: MtcnnDetector, embedder: Embedder,
                 settings: Optional[PipelineSettings] = None,
                 liveness: Optional[LivenessStage] = None):
        self.detector = detector
        self.embedder = embedder
        self.settings = settings or PipelineSettings()
        self.liveness = liveness  # None: the stage is off
        if liveness is not None:
            liveness.settings = self.settings.liveness
        self.detector.settings = self.settings.detection
        self.settings.detection.check()

    @classmethod
    def from_models(cls, models_dir=None, settings: Optional[PipelineSettings] = None,
                    accel: Optional[dict] = None) -> "FacePipeline":
        settings = settings or PipelineSettings()
        det_accel, emb_accel = _split_accel(accel)
        detector = MtcnnDetector.from_models(models_dir, settings.detection, det_accel)
        embedder = Embedder.from_models(models_dir, emb_accel)
        live = (LivenessStage.from_models(models_dir, settings.liveness, emb_accel)
                if settings.liveness.enabled else None)
        return cls(detector, embedder, settings, live)

    @property
    def embedder_sha256(self) -> str:
        return self.embedder.sha256

    def detect(self, image_bgr: np.ndarray, detect_width: Optional[int] = None,
               around: Optional[np.ndarray] = None) -> List[Face]:
        """Faces with box, score, landmarks, aligned crop and quality filled; best score first.

        Detection runs on a copy ``detect_width`` pixels wide (None: ``settings.detect_width``;
        0: the frame itself); boxes and landmarks are in the frame's pixels, and the aligned
        crops come from the full-resolution frame.  ``around``: only refine these boxes
        (:meth:`MtcnnDetector.detect`: tracks between full detections)."""
        image_bgr = _bgr8(image_bgr)
        if detect_width is None:
            detect_width = self.settings.detect_width
        faces = self.detector.detect(image_bgr, detect_width, around)
        q = self.settings.quality
        for f in faces:
            f.aligned = align_face(image_bgr, f.landmarks)
            f.quality = assess(f, f.aligned, q)
        return faces

    def embed_faces(self, faces: List[Face], only_passing: bool = True,
                    image: Optional[np.ndarray] = None) -> List[Face]:
        """Fill ``.embedding`` of the faces (those that passed quality, unless told otherwise),
        and their ``.liveness`` when the stage is on and ``image`` (their frame) is given."""
        todo = [f for f in faces if f.aligned is not None
                and (not only_passing or f.quality is None or f.quality.passed)]
        if todo:
            emb = self.embedder.embed([f.aligned for f in todo], flip=self.settings.flip)
            for f, e in zip(todo, emb):
                f.embedding = e
            if self.liveness is not None and image is not None:
                self.liveness.score_faces(image, todo)
        return faces

    def process(self, image_bgr: np.ndarray) -> List[Face]:
        """Detect and embed (and score liveness); faces below the quality minimums get no
        embedding."""
        image_bgr = _bgr8(image_bgr)
        return self.embed_faces(self.detect(image_bgr), image=image_bgr)


def _bgr8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        return to_bgr8(image)
    return image


def central_face(faces: List[Face], image_shape) -> Optional[Face]:
    """The face nearest the image centre, or None.

    A face's centre is the mean of its 5 landmarks (about the nose): the detector's box is
    looser (forehead, chin) and two overlapping boxes can share a centre.  Ties: the larger face.
    """
    if not faces:
        return None
    h, w = image_shape[:2]
    cx, cy = w / 2.0, h / 2.0

    def key(f: Face):
        if f.landmarks is not None and np.isfinite(f.landmarks).all():
            fx, fy = (float(v) for v in np.asarray(f.landmarks, dtype=np.float64).mean(axis=0))
        else:
            fx, fy = f.center
        return ((fx - cx) ** 2 + (fy - cy) ** 2, -f.width * f.height)

    return min(faces, key=key)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (both normalised: their dot product)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def settings_replace(settings: PipelineSettings, **changes) -> PipelineSettings:
    """A copy of ``settings`` with some top-level fields changed."""
    return dataclasses.replace(settings, **changes)
