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
from edged.motion import MotionGate, MotionSettings

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
