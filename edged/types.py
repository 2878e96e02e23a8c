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
    monotonic: float = 0.0  # time.monotonic() at capture: latency, track gaps and durations
    connection: int = 0  # the source's reconnect count when read: a new value is a new connection


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
    liveness: Optional[float] = None  # [0, 1], 1 = live (edged.vision.liveness); None: not scored

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


EVENT_TYPES = ("face_appeared", "recognized", "unknown", "track_ended", "spoof_suspected")


@dataclass
class Event:
    """Something a subscriber hears about: made by the tracker, published over MQTT.

    ``id`` is unique and kept through the spool, so a redelivered event carries the same id.
    """

    id: str  # uuid4 hex
    type: str  # one of EVENT_TYPES
    camera: str
    track_id: int
    frame_time: float  # wall-clock time of the frame that caused it (epoch seconds)
    name: Optional[str] = None  # person's display name, None when unknown or not yet known
    identity: Optional[str] = None  # stable identity id from the gallery
    score: Optional[float] = None
    margin: Optional[float] = None
    box: Optional[list] = None  # [x1, y1, x2, y2] in frame pixels
    quality: Optional[float] = None
    duration: Optional[float] = None  # track_ended: seconds from first to last sighting
    best_score: Optional[float] = None  # track_ended: best match score seen
    liveness: Optional[dict] = None  # recognized / spoof_suspected: {"score", "live"} when on
    versions: dict = field(default_factory=dict)  # {"embedder": sha256, "detector": ..., "gallery": checksum}
    snapshot: Optional[bytes] = None  # JPEG, only when configured
    # track_ended with enrolment.keep_faces: {"state", "started", "crops": [(quality, aligned,
    # embedding, passed)]} for edged.enrolment.store (never published)
    kept: Optional[dict] = None
