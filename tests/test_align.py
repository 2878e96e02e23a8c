"""5-point alignment: the least-squares similarity and the warp, on known landmarks."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edged.vision.align import ARCFACE_TEMPLATE, align_face, similarity_transform


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0, 1, 0, 0), (20, 2.5, 140, 60), (-35, 0.6, 10, 300),
                                               (90, 1.7, 400, -20), (179, 3.0, 500, 500)])
def test_known_similarity_is_recovered(angle, scale, tx, ty):
    m = _similarity(angle, scale, tx, ty)
    pts = _apply(m, ARCFACE_TEMPLATE.astype(np.float64))
    # From the mapped points back to the template: the inverse of m.
    back = similarity_transform(pts, ARCFACE_TEMPLATE)
    inv = cv2.invertAffineTransform(m)
    np.testing.assert_allclose(back, inv, atol=1e-9)
    np.testing.assert_allclose(_apply(back, pts), ARCFACE_TEMPLATE, atol=1e-6)


def test_least_squares_with_noise():
    rng = np.random.default_rng(1)
    m = _similarity(12, 1.8, 50, 70)
    pts = _apply(m, ARCFACE_TEMPLATE.astype(np.float64))
    noisy = pts + rng.normal(0, 0.5, pts.shape)
    est = similarity_transform(ARCFACE_TEMPLATE, noisy)
    # Least squares: the residual is no larger than that of the true transform.
    res_est = np.sum((_apply(est, ARCFACE_TEMPLATE.astype(np.float64)) - noisy) ** 2)
    res_true = np.sum((pts - noisy) ** 2)
    assert res_est <= res_true + 1e-9
    np.testing.assert_allclose(est[:, :2], m[:, :2], atol=0.05)
    np.testing.assert_allclose(est[:, 2], m[:, 2], atol=2.0)
    # No shear: the 2 x 2 part is a scaled rotation.
    a, b, c, d = est[0, 0], est[0, 1], est[1, 0], est[1, 1]
    assert a == pytest.approx(d) and b == pytest.approx(-c)


def test_mirrored_points_give_a_rotation_not_a_reflection():
    mirrored = ARCFACE_TEMPLATE.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    m = similarity_transform(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(m[:, :2]) > 0


def test_bad_points_raise():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="N x 2"):
        similarity_transform(np.ones((5, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="5 landmarks"):
        align_face(np.zeros((100, 100, 3), np.uint8), np.zeros((4, 2)))


def test_warp_puts_known_landmarks_on_the_template():
    """Dots drawn at the template mapped through a known similarity land on the template."""
    m = _similarity(25, 2.2, 180, 40)
    pts = _apply(m, ARCFACE_TEMPLATE.astype(np.float64))
    img = np.zeros((480, 640, 3), np.uint8)
    for k, (x, y) in enumerate(pts):
        cv2.circle(img, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1, cv2.LINE_AA)
    aligned = align_face(img, pts)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    gray = aligned[:, :, 0].astype(np.float64)
    for tx, ty in ARCFACE_TEMPLATE:
        x0, y0 = int(tx) - 5, int(ty) - 5
        patch = gray[y0:y0 + 11, x0:x0 + 11]
        assert patch.sum() > 0
        yy, xx = np.mgrid[y0:y0 + 11, x0:x0 + 11]
        cx, cy = (patch * xx).sum() / patch.sum(), (patch * yy).sum() / patch.sum()
        assert abs(cx - tx) < 0.75 and abs(cy - ty) < 0.75, (cx, cy, tx, ty)
    # A 224 output scales the template.
    big = align_face(img, pts, size=224)
    assert big.shape == (224, 224, 3)


def test_real_face_is_upright_and_centred(public_two_people, models_dir):
    """On a real tilted face, the aligned eyes are level and at the template's height."""
    from edged.vision.detect import MtcnnDetector

    det = MtcnnDetector.from_models(models_dir, accel={"type": "cpu", "num_threads": 1})
    img = public_two_people
    face = det.detect(img)[0]
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D(face.center, 30, 1.0)  # tilt the whole photo by 30 degrees
    tilted = cv2.warpAffine(img, rot, (w, h))
    faces = det.detect(tilted)
    near = min(faces, key=lambda f: np.hypot(*(np.array(f.center) - np.array(face.center))))
    aligned = align_face(tilted, near.landmarks)
    again = det.detect(cv2.copyMakeBorder(aligned, 56, 56, 56, 56, cv2.BORDER_CONSTANT))
    assert again, "no face found in the aligned crop"
    lm = again[0].landmarks - 56
    eye_dy = abs(float(lm[1, 1] - lm[0, 1]))
    assert eye_dy < 4, lm
    np.testing.assert_allclose(lm, ARCFACE_TEMPLATE, atol=6)
