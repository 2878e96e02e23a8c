"""Motion gating: a calm scene with nobody tracked is not detected, except every max_idle_s;
motion or a live track is.

The frames are the public clip's: its empty scene (frames 80-99) held still, and Barack
Obama (frame 10) stepping into it.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edged import config as configmod
from edged.vision.motion import MotionGate, MotionSettings
from edged_daemon_helpers import run_in_process

FPS = 30.0


@pytest.fixture(scope="module")
def scene(public_clip):
    """(the empty scene, the scene with Obama), 640x360 BGR."""
    cap = cv2.VideoCapture(str(public_clip))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    assert len(frames) == 100
    return frames[90], frames[10]


def _run(gate, images, tracking=False, start=0.0):
    return [gate.decide(im, start + i / FPS, tracking) for i, im in enumerate(images)]


def test_a_still_scene_is_detected_once_then_every_max_idle_s(scene):
    empty, _ = scene
    gate = MotionGate(MotionSettings(max_idle_s=2.0))
    decided = _run(gate, [empty] * 150)  # 5 s at 30 fps
    assert [i for i, d in enumerate(decided) if d] == [0, 60, 120]
    st = gate.status()
    assert st["frames_detected"] == 3 and st["frames_skipped"] == 147
    assert st["moving"] is False and st["area"] == 0.0


def test_camera_noise_is_not_motion(scene):
    empty, _ = scene
    rng = np.random.default_rng(1)
    noisy = [np.clip(empty.astype(np.int16) + rng.integers(-8, 9, empty.shape), 0, 255)
             .astype(np.uint8) for _ in range(60)]
    gate = MotionGate(MotionSettings(max_idle_s=60.0))
    assert sum(_run(gate, noisy)) == 1


def test_a_person_stepping_in_is_detected(scene):
    empty, person = scene
    gate = MotionGate(MotionSettings(max_idle_s=60.0))
    decided = _run(gate, [empty] * 30 + [person] * 5)
    assert decided[0] and not any(decided[1:30])
    assert decided[30]


def test_motion_area_is_measured(scene):
    empty, person = scene
    gate = MotionGate(MotionSettings(max_idle_s=60.0))
    _run(gate, [empty] * 10)
    assert gate.decide(person, 1.0, False)
    assert gate.moving and gate.area > 0.01


def test_a_live_track_is_always_detected(scene):
    empty, _ = scene
    gate = MotionGate(MotionSettings(max_idle_s=60.0))
    assert all(_run(gate, [empty] * 20, tracking=True))


def test_what_stops_moving_fades_into_the_background(scene):
    empty, person = scene
    gate = MotionGate(MotionSettings(max_idle_s=600.0))
    _run(gate, [empty] * 5)
    decided = _run(gate, [person] * 200, start=1.0)
    assert decided[0] and not decided[-1]


def test_reset_detects_the_next_frame(scene):
    empty, _ = scene
    gate = MotionGate(MotionSettings(max_idle_s=60.0))
    _run(gate, [empty] * 3)
    gate.reset()
    assert gate.decide(empty, 1.0, False)


def test_max_idle_s_0_detects_every_frame(scene):
    empty, _ = scene
    assert all(_run(MotionGate(MotionSettings(max_idle_s=0.0)), [empty] * 10))


def test_the_motion_section_is_checked():
    cfg = configmod.build(configmod.Config, {"motion": {"enabled": False, "max_idle_s": 5}})
    assert cfg.motion == MotionSettings(enabled=False, max_idle_s=5.0)
    assert configmod.build(configmod.Config, {}).motion.enabled is True
    with pytest.raises(configmod.ConfigError, match=r"motion\.threshold"):
        configmod.build(configmod.Config, {"motion": {"threshold": 0}})
    with pytest.raises(configmod.ConfigError, match=r"motion\.min_area"):
        configmod.build(configmod.Config, {"motion": {"min_area": 2}})


# ---------------------------------------------------------------------------- in the daemon


def _clip(frames, path):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def _run_daemon(models_dir, clip, tmp_path, monkeypatch, motion, tracking=None):
    """The real daemon on ``clip`` (read as fast as it is processed); returns (its events, the
    frames the detector was given, its stats)."""
    from edged.vision.pipeline import FacePipeline

    detected = []
    real = FacePipeline.detect

    def counting(self, image, detect_width=None, around=None):
        if image.any():  # (not the warm-up's black frame)
            detected.append(image.shape)
        return real(self, image, detect_width, around)

    monkeypatch.setattr(FacePipeline, "detect", counting)
    events, d = run_in_process({
        "cameras": [{"name": "hall", "source": str(clip), "realtime": False}],
        "motion": motion, "tracking": tracking or {},
        "models": {"detector": {"type": "cpu", "num_threads": 1}},
        "paths": {"state_dir": str(tmp_path / "state"), "gallery": str(tmp_path / "none.edgal")},
        "mqtt": {"enabled": False}, "logging": {"target": "stderr"}}, models_dir)
    return events, detected, d.stats.document()


def test_the_daemon_detects_a_still_empty_scene_once(scene, models_dir, tmp_path, monkeypatch):
    empty, _ = scene
    clip = _clip([empty] * 60, tmp_path / "still.avi")
    events, detected, stats = _run_daemon(models_dir, clip, tmp_path, monkeypatch,
                                          {"max_idle_s": 3600})
    assert len(detected) == 1 and events == []
    # (a full detection is due on every 3rd frame, tracking.detect_every: the gate sees 20)
    assert stats["motion"]["hall"]["frames_detected"] == 1
    assert stats["motion"]["hall"]["frames_skipped"] == 19
    assert stats["motion"]["hall"]["moving"] is False


def test_the_daemon_detects_a_person_stepping_in(scene, models_dir, tmp_path, monkeypatch):
    empty, person = scene
    clip = _clip([empty] * 30 + [person] * 30, tmp_path / "visit.avi")
    events, detected, stats = _run_daemon(models_dir, clip, tmp_path, monkeypatch,
                                          {"max_idle_s": 3600})
    assert "face_appeared" in [e.type for e in events]
    # the first frame, then every frame from his: full detections on every 3rd frame, the
    # live track refined on the others (but the one or two frames already past the gate when
    # his track was made: max_in_flight)
    assert 29 <= len(detected) <= 31


def test_the_old_behaviour_detects_every_frame(scene, models_dir, tmp_path, monkeypatch):
    empty, _ = scene
    clip = _clip([empty] * 40, tmp_path / "still.avi")
    events, detected, stats = _run_daemon(models_dir, clip, tmp_path, monkeypatch,
                                          {"enabled": False}, {"detect_every": 1})
    assert len(detected) == 40 and "motion" in stats and stats["motion"] == {}


def test_a_failing_motion_check_detects_the_frame(scene, models_dir, tmp_path, monkeypatch):
    """A bug in the gate costs a full detection, not the detection worker."""
    empty, _ = scene
    clip = _clip([empty] * 10, tmp_path / "still.avi")

    def broken(self, image, now, tracking):
        raise RuntimeError("boom")

    monkeypatch.setattr(MotionGate, "decide", broken)
    events, detected, stats = _run_daemon(models_dir, clip, tmp_path, monkeypatch, {},
                                          {"detect_every": 1})
    assert len(detected) == 10
