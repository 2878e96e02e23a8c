"""Face quality: size, sharpness and frontal pose, combined into one score.

Each part is visible in :class:`edged.types.Quality`:

- ``size_px``: the shorter side of the detected box, in frame pixels.
- ``sharpness``: the variance of the Laplacian of the aligned 112 x 112 face in grayscale, over
  the inner face (eyebrows to chin), leaving out what lay outside the frame (raw value: about
  100 to 2500 on sharp photographs, about 10 when blurred enough to hurt recognition).
- ``frontal``: 1 for a frontal face, falling to 0 towards a profile, from the 5 landmarks: the
  nose's offset from the face's midline and the foreshortening of the eye distance (yaw), and
  the nose's height between eyes and mouth (pitch), each turned into a rough angle;
  ``frontal`` is about ``1 - angle / 90 degrees`` for the largest (0.5: turned about 45
  degrees).
- ``score``: the geometric mean of the three parts mapped to [0, 1]:
  ``min(size_px / 80, 1)``, ``min(sharpness / 100, 1)`` and ``frontal``.

A face is ``passed`` when every part meets its minimum in :class:`QualitySettings`; a face
that does not pass is still reported, but it is not embedded or matched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from edged.types import Face, Quality

__all__ = ["QualitySettings", "assess", "frontal_score", "sharpness"]

SIZE_FULL = 80.0  # px: faces this large or larger get the full size part
SHARP_FULL = 100.0  # Laplacian variance giving the full sharpness part
# Eye distance over the eyes-to-mouth distance on the ArcFace template (a frontal face).
_TEMPLATE_EYES_OVER_MOUTH = 0.866


@dataclass
class QualitySettings:
    """Minimums below which a face is reported but not embedded or matched (``quality:``)."""

    min_size: float = field(default=24.0, metadata={
        "min": 0.0, "help": "shortest side of the face box, in frame pixels"})
    min_sharpness: float = field(default=10.0, metadata={
        "min": 0.0, "help": "variance of the Laplacian of the aligned 112 x 112 gray face"})
    min_frontal: float = field(default=0.4, metadata={
        "min": 0.0, "max": 1.0, "help": "pose: 1 frontal, 0 profile (from the landmarks)"})
    min_score: float = field(default=0.0, metadata={
        "min": 0.0, "max": 1.0, "help": "combined quality score"})


def sharpness(aligned: np.ndarray) -> float:
    """Variance of the Laplacian over the inner face of an aligned 112 x 112 crop.

    Only the region from the eyebrows to the chin (rows 24-104, columns 20-92 of the template
    frame) counts, so that hair and background do not, and pixels that came from outside the
    frame (exactly black after the warp) and their neighbours are left out, so that the edge of
    the frame does not count as detail.
    """
    gray = cv2.cvtColor(aligned, cv2.COLOR_BGR2GRAY) if aligned.ndim == 3 else aligned
    h, w = gray.shape[:2]
    sy, sx = h / 112.0, w / 112.0
    r0, r1, c0, c1 = int(24 * sy), int(104 * sy), int(20 * sx), int(92 * sx)
    lap = cv2.Laplacian(gray, cv2.CV_64F)[r0:r1, c0:c1]
    inside = cv2.erode((gray > 0).astype(np.uint8), np.ones((5, 5), np.uint8))[r0:r1, c0:c1] > 0
    if inside.sum() >= 0.25 * inside.size:
        return float(lap[inside].var())
    return float(lap.var())


def frontal_score(landmarks: np.ndarray) -> float:
    """1 = frontal, 0 = profile (or landmarks too degenerate to tell), from 5 landmarks."""
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes = (p[0] + p[1]) / 2.0
    mouth = (p[3] + p[4]) / 2.0
    axis = mouth - eyes  # the face's vertical axis
    length = float(np.hypot(*axis))
    half_eyes = float(np.hypot(*(p[1] - p[0]))) / 2.0
    if length < 1e-6 or half_eyes < 1e-6:
        return 0.0
    down = axis / length
    right = np.array([down[1], -down[0]])  # perpendicular to the axis
    rel = p[2] - eyes
    # Yaw, two cues; the larger angle counts.  (1) The nose's sideways offset from the
    # eyes-mouth midline over half the eye distance grows about like tan(yaw) (nose depth ~
    # half the eye distance).  (2) Foreshortening: the eye distance over the eyes-mouth
    # distance is 0.87 on the frontal template and shrinks about like cos(yaw); MTCNN's nose
    # point stays inside the face outline on profiles, so (1) alone saturates there.
    yaw_nose = math.atan(abs(float(rel @ right)) / max(half_eyes, 0.25 * length))
    yaw_eyes = math.acos(min(1.0, (2.0 * half_eyes / length) / _TEMPLATE_EYES_OVER_MOUTH))
    # Pitch: where the nose sits between the eye line (0) and the mouth line (1): about 0.5
    # frontal; the offset from 0.5 (in units of half that span) taken the same way.
    pitch = math.atan(abs(float(rel @ down) / length - 0.5) * 2.0)
    # About 1 - (the largest angle) / 90 degrees.
    return float(np.clip(1.0 - max(yaw_nose, yaw_eyes, pitch) / (math.pi / 2.0), 0.0, 1.0))


def assess(face: Face, aligned: np.ndarray, settings: QualitySettings) -> Quality:
    size_px = float(min(face.box[2] - face.box[0], face.box[3] - face.box[1]))
    sharp = sharpness(aligned)
    frontal = frontal_score(face.landmarks)
    parts = (min(max(size_px, 0.0) / SIZE_FULL, 1.0), min(sharp / SHARP_FULL, 1.0), frontal)
    score = float(math.prod(parts) ** (1.0 / 3.0)) if min(parts) > 0 else 0.0
    passed = (size_px >= settings.min_size and sharp >= settings.min_sharpness
              and frontal >= settings.min_frontal and score >= settings.min_score)
    return Quality(size_px=size_px, sharpness=sharp, frontal=frontal, score=score, passed=passed)
