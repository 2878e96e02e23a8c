"""Liveness: is the face in front of the camera a live person, or a photo or a screen?

The ``antispoof`` model (``face_antispoofing.tflite``, a deep-tree anti-spoofing network from
the same Android app as the other models) sees a 256 x 256 RGB crop of the face scaled to
[0, 1].  It returns class scores and a one-hot leaf mask (``Identity``, ``Identity_1``, 8 each);
the spoof score is the sum of ``|class| * leaf`` (about 0 for a live face, about 1 for an
attack).  edged reports ``score = 1 - spoof``, clipped to [0, 1], so that 1 means live.

The crop is the detector's box made square on its longer side, around the box's centre,
rotated so that the eyes are level (as the upstream app does by rotating the image and
detecting again), moved inside the frame when it crosses the border and, for a face larger
than the crop, reduced by area averaging first.  These conventions were checked against the
alternatives on ``../shared/faces/spoof`` and the dev photos (docs/accuracy.md, Liveness).

A face whose box is shorter than ``min_size`` pixels is not scored: its liveness is unknown
(``None``), never "live".  A stage is not thread-safe (one interpreter): use one per thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import cv2
import numpy as np

from edged.types import Face

__all__ = ["LivenessSettings", "LivenessStage", "DEFAULT_THRESHOLD", "liveness_crop",
           "verdict"]

INPUT_SIZE = 256
# The upstream app calls a face an attack when its spoof score exceeds 0.2, i.e. live when
# 1 - spoof >= 0.8.  Kept as the default: see docs/accuracy.md for what it gives here.
DEFAULT_THRESHOLD = 0.8


@dataclass
class LivenessSettings:
    """The liveness stage (``liveness:``): off by default, see docs/accuracy.md."""

    enabled: bool = field(default=False, metadata={
        "help": "score the liveness of every face that is matched (anti-spoofing model; "
                "it refuses most live faces too, and costs about 80-160 ms per face on one "
                "x86 core: docs/accuracy.md, Liveness)"})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={
        "min": 0.0, "max": 1.0,
        "help": "a track's quality-weighted liveness at or above this is live, below it a "
                "suspected spoof"})
    min_size: float = field(default=80.0, metadata={
        "min": 0.0, "max": 4096.0,
        "help": "faces whose box is shorter than this (frame pixels) are not scored: their "
                "liveness is unknown, never live"})
    require: bool = field(default=False, metadata={
        "help": "never report a track as recognized unless its liveness says live: a "
                "suspected spoof gets a spoof_suspected event instead, an unknown one waits"})

    def config_warnings(self):
        if self.require and not self.enabled:
            return [("require", "has no effect while liveness.enabled is false")]
        return []


def verdict(score: Optional[float], threshold: float) -> Optional[bool]:
    """True (live), False (suspected spoof) or None (unknown) for a liveness score."""
    return None if score is None else bool(score >= threshold)


def liveness_crop(image_bgr: np.ndarray, face: Face, size: int = INPUT_SIZE) -> np.ndarray:
    """The model's view of ``face``: ``size`` x ``size`` BGR uint8 (see the module's text)."""
    x1, y1, x2, y2 = (float(v) for v in face.box)
    side = max(x2 - x1, y2 - y1, 1.0)
    h, w = image_bgr.shape[:2]
    # moved inside the frame (when it fits), as the upstream app's crop is
    cx, cy = _inside((x1 + x2) / 2.0, side, w), _inside((y1 + y2) / 2.0, side, h)
    lm = np.asarray(face.landmarks, np.float64)
    angle = 0.0
    if lm.shape == (5, 2) and np.isfinite(lm[:2]).all():
        angle = math.degrees(math.atan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    src, k = image_bgr, 1.0
    if side > size:  # reduce first: bilinear sampling alone would alias fine detail
        k = size / side
        x0, y0 = max(int(cx - side), 0), max(int(cy - side), 0)
        x9, y9 = min(int(cx + side) + 1, w), min(int(cy + side) + 1, h)
        src = cv2.resize(image_bgr[y0:y9, x0:x9], None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
        cx, cy = (cx - x0) * k, (cy - y0) * k
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / (side * k))
    m[0, 2] += size / 2.0 - cx
    m[1, 2] += size / 2.0 - cy
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _inside(centre: float, side: float, length: int) -> float:
    """``centre`` moved so that a span of ``side`` around it lies in ``[0, length]``; the
    middle when it cannot."""
    if side >= length:
        return length / 2.0
    return min(max(centre, side / 2.0), length - side / 2.0)


class LivenessStage:
    """The anti-spoofing model on faces of one frame; see the module's documentation."""

    def __init__(self, model: bytes, sha256: str = "", settings: Optional[LivenessSettings] = None,
                 accel=None):
        from edged.runtime import open_runner

        self.sha256 = sha256
        self.settings = settings or LivenessSettings()
        self.runner = open_runner(model, accel, name="antispoof", sha256=sha256,
                                  where="liveness.accelerator")
        shape = tuple(self.runner.input_details()[0]["shape"])
        if shape != (1, INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"antispoof model input is {shape}, expected (1, 256, 256, 3)")
        names = [d["name"] for d in self.runner.output_details()]
        if "Identity" not in names or "Identity_1" not in names:
            raise ValueError(f"antispoof model outputs are {names}, expected 'Identity' (class "
                             f"scores) and 'Identity_1' (leaf mask)")
        self._cls, self._leaf = names.index("Identity"), names.index("Identity_1")
        self.delegate = self.runner.delegate

    @classmethod
    def from_models(cls, models_dir=None, settings: Optional[LivenessSettings] = None,
                    accel=None) -> "LivenessStage":
        from edged.runtime.modelstore import read_verified

        data, digest, _ = read_verified("antispoof", models_dir)
        return cls(data, digest, settings, accel)

    @classmethod
    def for_settings(cls, settings: LivenessSettings, models_dir=None,
                     accel=None) -> Optional["LivenessStage"]:
        """The stage when ``settings.enabled``, else None (the stage off costs nothing)."""
        return cls.from_models(models_dir, settings, accel) if settings.enabled else None

    def score_crop(self, crop_bgr: np.ndarray) -> float:
        """Liveness in [0, 1] (1 = live) of one crop from :func:`liveness_crop`."""
        x = crop_bgr[None, :, :, ::-1].astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        outs = self.runner.run(x)
        spoof = float(np.sum(np.abs(outs[self._cls][0]) * outs[self._leaf][0]))
        if not math.isfinite(spoof):
            raise ValueError(f"antispoof model {self.sha256[:12]} gave a non-finite score")
        return float(min(max(1.0 - spoof, 0.0), 1.0))

    def score(self, image_bgr: np.ndarray, face: Face) -> Optional[float]:
        """Liveness of ``face`` in ``image_bgr``; None when it is below ``min_size``."""
        if min(face.width, face.height) < self.settings.min_size:
            return None
        return self.score_crop(liveness_crop(image_bgr, face))

    def score_faces(self, image_bgr: np.ndarray, faces: Sequence[Face]) -> List[Optional[float]]:
        """Fill ``Face.liveness`` of each face; returns the scores (None: unknown)."""
        for f in faces:
            f.liveness = self.score(image_bgr, f)
        return [f.liveness for f in faces]
