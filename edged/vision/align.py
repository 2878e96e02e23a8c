"""5-point face alignment onto the ArcFace 112 x 112 template.

:func:`similarity_transform` fits rotation, uniform scale and translation (no shear) by least
squares (Umeyama's closed form), and :func:`align_face` warps the face with it.  The landmark
order is the detector's: left eye, right eye, nose, left mouth corner, right mouth corner, "left"
meaning the smaller x in the image.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ARCFACE_TEMPLATE", "similarity_transform", "align_face"]

# The usual ArcFace / InsightFace destination points for a 112 x 112 crop.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float32)


def similarity_transform(src_pts, dst_pts) -> np.ndarray:
    """The 2 x 3 similarity matrix ``M`` minimising sum |M [src; 1] - dst|^2 (Umeyama 1991).

    Raises ValueError for fewer than 2 points, mismatched shapes, non-finite values or
    coincident source points.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_transform: expected two N x 2 point sets (N >= 2), "
                         f"got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity_transform: points must be finite")
    n = len(src)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s * s).sum() / n
    if var_s < 1e-12:
        raise ValueError("similarity_transform: the source points coincide")
    cov = d.T @ s / n
    u, sig, vt = np.linalg.svd(cov)
    e = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1] = -1.0  # a reflection would fit better: take the best proper rotation instead
    rot = u @ np.diag(e) @ vt
    scale = float((sig * e).sum() / var_s)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image_bgr: np.ndarray, landmarks, size: int = 112) -> np.ndarray:
    """The face warped onto the ArcFace template: ``size`` x ``size`` x 3 uint8 (BGR in, BGR out).

    The template is defined for 112 x 112 and scaled for other sizes.  Pixels from outside the
    frame are black.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (5, 2):
        raise ValueError(f"align_face: expected 5 landmarks, got an array of shape {np.shape(landmarks)}")
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)
    m = similarity_transform(pts, dst)
    return cv2.warpAffine(image_bgr, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
