"""Processing resolution: detection on a scaled copy, alignment on the full-resolution frame.

A 1280x720 frame made by enlarging a 640x360 frame of the public clip twice must give, with
``detect_width: 640`` and ``min_face`` in its own pixels (twice the original's), the faces the
original gives, at twice the coordinates; ``detect_width: 0`` is detection on the frame itself.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edged.vision.align import align_face
from edged.vision.detect import DetectionSettings, MtcnnDetector, detection_size, pnet_levels
from edged.vision.pipeline import FacePipeline, PipelineSettings

ACCEL = {"type": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def frames(public_clip):
    """(the clip's frame 10, Barack Obama at 640x360; the same enlarged to 1280x720)."""
    cap = cv2.VideoCapture(str(public_clip))
    for _ in range(11):
        ok, frame = cap.read()
        assert ok
    cap.release()
    assert frame.shape[:2] == (360, 640)
    return frame, cv2.resize(frame, (1280, 720), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def pipes(models_dir):
    """(a pipeline at min_face 40 for the 640 px frame, one at min_face 80 for the 1280 px one,
    sharing nothing: each has its own P-Net cache)."""
    small = FacePipeline.from_models(models_dir, PipelineSettings(), accel=ACCEL)
    big = FacePipeline.from_models(models_dir, PipelineSettings(
        detection=DetectionSettings(min_face=80), detect_width=640), accel=ACCEL)
    return small, big


def test_detection_size_keeps_the_aspect_and_never_enlarges():
    assert detection_size(1920, 1080, 640) == (640, 360)
    assert detection_size(1280, 720, 640) == (640, 360)
    assert detection_size(640, 360, 640) == (640, 360)
    assert detection_size(640, 360, 1920) == (640, 360)
    assert detection_size(640, 360, 0) == (640, 360)
    assert detection_size(2592, 1944, 640) == (640, 480)


def test_a_scaled_copy_finds_the_same_faces_mapped_back(frames, pipes):
    orig, big = frames
    small_pipe, big_pipe = pipes
    want = small_pipe.detect(orig)
    got = big_pipe.detect(big)  # detect_width 640 from its settings
    assert len(want) == 1 and len(got) == 1, (want, got)
    np.testing.assert_allclose(got[0].box, 2.0 * want[0].box, atol=4.0)
    np.testing.assert_allclose(got[0].landmarks, 2.0 * want[0].landmarks, atol=4.0)
    assert abs(got[0].score - want[0].score) < 0.02


def test_aligned_crops_come_from_the_full_resolution_frame(frames, pipes):
    orig, big = frames
    face = pipes[1].detect(big)[0]
    assert np.array_equal(face.aligned, align_face(big, face.landmarks))
    # the landmarks are in the big frame's pixels: inside its box, not the copy's
    x1, y1, x2, y2 = face.box
    assert ((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2)).all()
    assert ((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2)).all()
    assert x1 > 640 * 0.25, "box in the copy's pixels"


def test_min_face_is_converted_to_the_copy(models_dir, frames):
    """min_face 80 px of a 1280 px frame detected at 640: P-Net runs the pyramid of the 640 px
    frame at min_face 40, level for level."""
    orig, big = frames
    det = MtcnnDetector.from_models(models_dir, DetectionSettings(min_face=80), accel=ACCEL)
    det.detect(big, 640)
    s = det.settings
    assert set(det._pnet_cache) == {shape for _, shape in pnet_levels(360, 640, 40, s.scale_factor)}


def test_min_face_below_the_copys_12_px_window_is_clamped(models_dir, frames):
    orig, big = frames
    det = MtcnnDetector.from_models(models_dir, DetectionSettings(min_face=12), accel=ACCEL)
    det.detect(big, 320)  # 12 px of the frame would be 3 px of the copy: 12 px of the copy
    levels = pnet_levels(180, 320, 12, det.settings.scale_factor)
    assert levels[0][1] == (1, 320, 180, 3)
    assert set(det._pnet_cache) == {shape for _, shape in levels}


def test_detect_width_0_is_detection_on_the_frame_itself(models_dir, frames):
    orig, big = frames
    det = MtcnnDetector.from_models(models_dir, DetectionSettings(min_face=80), accel=ACCEL)
    full = det.detect(big, 0)
    wider = det.detect(big, 4000)  # never enlarged: the frame itself too
    assert len(full) == len(wider) == 1
    assert np.array_equal(full[0].box, wider[0].box)
    assert np.array_equal(full[0].landmarks, wider[0].landmarks)
    assert {s[1] for s in det._pnet_cache} == {s[1] for _, s in
                                               pnet_levels(720, 1280, 80, det.settings.scale_factor)}
    scaled = det.detect(big, 640)
    assert not np.array_equal(full[0].box, scaled[0].box)  # another path
    pipe = FacePipeline(det, pipes_embedder(models_dir), PipelineSettings(
        detection=DetectionSettings(min_face=80)))
    assert pipe.settings.detect_width == 0  # the library's default: the frame itself
    assert np.array_equal(pipe.detect(big)[0].box, full[0].box)


def pipes_embedder(models_dir):
    from edged.vision.embed import Embedder

    return Embedder.from_models(models_dir, ACCEL)


def test_a_camera_s_detect_width_overrides_the_pipeline_s():
    from edged import config as configmod
    from edged.daemon.capture import Camera
    from edged.daemon.service import Daemon
    from edged.daemon.sdnotify import Notifier

    cfg = configmod.build(configmod.Config, {
        "cameras": [{"name": "a", "source": "/dev/video0"},
                    {"name": "b", "source": "/dev/video1", "detect_width": 1920}],
        "pipeline": {"detect_width": 480}, "mqtt": {"enabled": False}})
    d = Daemon(cfg, notifier=Notifier(address=""))
    for cs in cfg.cameras:
        d.cameras[cs.name] = Camera(cs, d.hub)  # (not started)
    assert d.flow.detect_width("a") == 480 and d.flow.detect_width("b") == 1920
    assert configmod.build(configmod.Config, {}).pipeline.detect_width == 640
    with pytest.raises(configmod.ConfigError, match=r"cameras\[0\]\.detect_width"):
        configmod.build(configmod.Config, {"cameras": [{"source": "/dev/video0",
                                                        "detect_width": -1}]})
