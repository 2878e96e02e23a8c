"""Plain data types handed from stage to stage.

capture produces a :class:`Frame`; detect produces :class:`Face` objects (box, score,
landmarks); align fills ``Face.aligned``; quality fills ``Face.quality``; embed fills
``Face.embedding``; match produces a :class:`Match`.  Nothing here holds a reference
to a model, a thread or a socket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Frame:
    """One captured image.  ``image`` is BGR uint8, H x W x 3 (OpenCV's layout)."""

    camera: str
    index: int
    timestamp: float  # wall-clock time of capture, seconds since the epoch
    image: np.ndarray
    monotonic: float = 0.0  # time.monotonic() at capture, for latency figures


@dataclass
class Quality:
    """How usable a face is for recognition; each part in [0, 1] except ``size_px``."""

    size_px: float  # shorter side of the face box, in pixels
    sharpness: float  # variance of the Laplacian on the aligned face (raw value)
    frontal: float  # 1 = frontal, 0 = full profile, from the landmarks
    score: float  # the combined score in [0, 1]
    passed: bool = True  # whether it meets the configured minimums


@dataclass
class Face:
    """A detected face, in the coordinates of the frame it came from."""

    box: np.ndarray  # float32 [x1, y1, x2, y2]
    score: float
    landmarks: np.ndarray  # float32 5 x 2: left eye, right eye, nose, mouth left, mouth right
    quality: Optional[Quality] = None
    aligned: Optional[np.ndarray] = None  # 112 x 112 x 3 BGR uint8
    embedding: Optional[np.ndarray] = None  # 192-d float32, L2-normalised

    @property
    def center(self) -> tuple:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


@dataclass
class Match:
    """The gallery's answer for one embedding."""

    name: Optional[str]  # display name, or None when unknown
    identity: Optional[str]  # stable identity id, or None when unknown
    score: float  # cosine similarity of the best identity
    margin: float  # best score minus the second identity's best score
    candidates: list = field(default_factory=list)  # [(name, score)] top-k, best first
