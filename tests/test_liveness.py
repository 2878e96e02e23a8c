"""Liveness: the anti-spoofing stage on real photos, its evidence per track, events, CLI, config."""
from __future__ import annotations

import contextlib
import csv
import json
import logging

import cv2
import numpy as np
import pytest

from edged import config as configmod
from edged.cli import main
from edged.vision.imageio import load_image
from edged.vision.liveness import LivenessSettings, liveness_crop, verdict
from edged.logs import fields
from edged.vision.pipeline import FacePipeline, PipelineSettings, central_face
from edged.publish.publisher import event_payload
from edged.daemon.track import Tracker, TrackingSettings
from edged.types import Frame, Match
from edged_daemon_helpers import run_in_process


@pytest.fixture(scope="module")
def pipe(models_dir):
    settings = PipelineSettings(liveness=LivenessSettings(enabled=True))
    return FacePipeline.from_models(models_dir, settings, accel={"type": "cpu", "num_threads": 1})


@pytest.fixture(scope="module")
def obama(public_photos):
    return load_image(public_photos / "obama.jpg")


def test_score_is_in_0_1_for_every_face_of_real_photos(pipe, public_photos):
    seen = 0
    for name in ("obama.jpg", "biden.jpg", "zidane.jpg", "obama2.jpg"):
        image = load_image(public_photos / name)
        faces = pipe.detect(image)
        assert faces, name
        scores = pipe.liveness.score_faces(image, faces)
        for f, s in zip(faces, scores):
            assert f.liveness == s
            if s is not None:
                assert isinstance(s, float) and 0.0 <= s <= 1.0
                seen += 1
    assert seen >= 4


def test_crop_is_the_square_box_with_level_eyes(pipe, obama):
    face = central_face(pipe.detect(obama), obama.shape)
    crop = liveness_crop(obama, face)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    # the same face turned by 20 degrees gives about the same crop (the eyes are levelled)
    h, w = obama.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
    turned = cv2.warpAffine(obama, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    face2 = central_face(pipe.detect(turned), turned.shape)
    crop2 = liveness_crop(turned, face2)
    unlevelled = cv2.resize(turned[int(face2.box[1]):int(face2.box[3]),
                                   int(face2.box[0]):int(face2.box[2])], (256, 256))
    diff = np.mean(np.abs(crop.astype(float) - crop2.astype(float)))
    assert diff < np.mean(np.abs(crop.astype(float) - unlevelled.astype(float)))


def test_below_min_size_the_liveness_is_unknown_never_live(pipe, obama):
    face = central_face(pipe.detect(obama), obama.shape)
    assert pipe.liveness.score(obama, face) is not None
    small = cv2.resize(obama, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    face_small = central_face(pipe.detect(small), small.shape)
    assert min(face_small.width, face_small.height) < pipe.settings.liveness.min_size
    assert pipe.liveness.score(small, face_small) is None
    assert verdict(None, 0.5) is None and verdict(0.5, 0.5) is True and verdict(0.49, 0.5) is False


def test_the_pipeline_scores_the_faces_it_embeds_only_when_on(models_dir, pipe, obama):
    faces = pipe.process(obama)
    assert faces[0].embedding is not None and faces[0].liveness is not None
    off = FacePipeline(pipe.detector, pipe.embedder, PipelineSettings())
    assert off.liveness is None
    faces = off.process(obama)
    assert faces[0].embedding is not None and faces[0].liveness is None


def test_cli_faces_liveness_text_and_json(capsys, models_dir, public_photos):
    img = str(public_photos / "obama.jpg")
    code = main(["faces", "--models", str(models_dir), "--threads", "1", "--liveness", img])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "liveness " in out and ("(live at" in out or "(suspected spoof at" in out)
    code = main(["faces", "--models", str(models_dir), "--threads", "1", "--liveness", "--json",
                 img])
    out, err = capsys.readouterr()
    assert code == 0, err
    face = json.loads(out)[0]["faces"][0]
    assert 0.0 <= face["liveness"] <= 1.0 and face["live"] in (True, False)
    code = main(["faces", "--models", str(models_dir), "--threads", "1", "--json", img])
    out, _ = capsys.readouterr()
    assert "liveness" not in json.loads(out)[0]["faces"][0]  # off unless asked


# ---------------------------------------------------------------------------- tracks and events


def _frames(image, n):
    for i in range(n):
        yield Frame(camera="door", index=i, timestamp=1000.0 + i / 10, image=image,
                    monotonic=1.0 + i / 10)


def _run(tracker, pipe, image, enrolled, n=6):
    """Drive the tracker over ``n`` copies of ``image`` with the real pipeline and a one-person
    gallery (``enrolled``: an embedding)."""
    events = []
    for frame in _frames(image, n):
        evs, todo = tracker.update(frame, pipe.detect(image))
        pipe.embed_faces([f for _, f in todo], only_passing=False, image=image)
        matches = []
        for _, f in todo:
            s = float(np.dot(f.embedding, enrolled))
            matches.append(Match(name="Barack Obama", identity="Barack_Obama", score=s,
                                 margin=s, candidates=[("Barack Obama", s)]))
        events += evs + tracker.observe(frame, todo, matches)
    return events + tracker.end_all()


def test_recognized_events_carry_the_tracks_liveness(pipe, obama, public_photos):
    enrolled = pipe.process(load_image(public_photos / "obama2.jpg"))[0].embedding
    live = LivenessSettings(enabled=True, threshold=0.5)
    events = _run(Tracker("door", TrackingSettings(), 0.4, liveness=live), pipe, obama, enrolled)
    rec = [e for e in events if e.type == "recognized"]
    assert len(rec) == 1 and rec[0].name == "Barack Obama"
    assert set(rec[0].liveness) == {"score", "live"} and 0 <= rec[0].liveness["score"] <= 1
    assert rec[0].liveness["live"] == (rec[0].liveness["score"] >= 0.5)
    doc = event_payload(rec[0], "dev", 0.0)
    assert doc["liveness"] == {"score": rec[0].liveness["score"], "live": rec[0].liveness["live"]}
    # off: no liveness in the event, none in the payload
    events = _run(Tracker("door", TrackingSettings(), 0.4), pipe, obama, enrolled)
    rec = [e for e in events if e.type == "recognized"]
    assert rec[0].liveness is None and "liveness" not in event_payload(rec[0], "dev", 0.0)


def test_require_turns_a_spoof_evidence_track_into_spoof_suspected(pipe, obama, public_photos):
    """A threshold above the real score makes the real track's evidence say "spoof"."""
    enrolled = pipe.process(load_image(public_photos / "obama2.jpg"))[0].embedding
    score = pipe.process(obama)[0].liveness
    strict = LivenessSettings(enabled=True, threshold=min(1.0, score + 0.01), require=True)
    events = _run(Tracker("door", TrackingSettings(), 0.4, liveness=strict), pipe, obama, enrolled)
    types = [e.type for e in events]
    assert "recognized" not in types and types.count("spoof_suspected") == 1
    sus = events[types.index("spoof_suspected")]
    assert sus.name == "Barack Obama" and sus.identity == "Barack_Obama" and sus.score > 0.4
    assert sus.liveness["live"] is False
    assert event_payload(sus, "dev", 0.0)["type"] == "spoof_suspected"
    ended = [e for e in events if e.type == "track_ended"]
    assert len(ended) == 1 and ended[0].name is None  # nobody was recognized
    # the same track with the threshold under its score is recognized
    easy = LivenessSettings(enabled=True, threshold=max(0.0, score - 0.01), require=True)
    events = _run(Tracker("door", TrackingSettings(), 0.4, liveness=easy), pipe, obama, enrolled)
    assert [e.type for e in events].count("recognized") == 1


@contextlib.contextmanager
def _sharing(pipe, live):
    """A pipeline with the settings ``live`` that shares ``pipe``'s interpreters."""
    try:
        yield FacePipeline(pipe.detector, pipe.embedder, PipelineSettings(liveness=live),
                           pipe.liveness)
    finally:
        pipe.liveness.settings = pipe.settings.liveness


def test_require_waits_while_the_liveness_is_unknown(pipe, obama, public_photos):
    enrolled = pipe.process(load_image(public_photos / "obama2.jpg"))[0].embedding
    huge = LivenessSettings(enabled=True, min_size=4000, require=True)
    with _sharing(pipe, huge) as p:
        events = _run(Tracker("door", TrackingSettings(), 0.4, liveness=huge), p, obama, enrolled)
    types = [e.type for e in events]
    assert "recognized" not in types and "spoof_suspected" not in types
    # without require the same track is recognized, its liveness unknown (null)
    loose = LivenessSettings(enabled=True, min_size=4000)
    with _sharing(pipe, loose) as p:
        events = _run(Tracker("door", TrackingSettings(), 0.4, liveness=loose), p, obama, enrolled)
    rec = [e for e in events if e.type == "recognized"]
    assert len(rec) == 1 and rec[0].liveness == {"score": None, "live": None}


def test_journal_field_edged_live(caplog):
    assert fields(live={"score": 0.9, "live": True})["EDGED_LIVE"] == "true"
    assert fields(live={"score": 0.1, "live": False})["EDGED_LIVE"] == "false"
    assert fields(live={"score": None, "live": None})["EDGED_LIVE"] == "unknown"
    assert "EDGED_LIVE" not in fields(camera="c", live=None)


# ---------------------------------------------------------------------------- configuration


def test_config_liveness_section_defaults_and_errors():
    cfg = configmod.loads("cameras: [{name: c, source: /dev/video0}]\n")
    assert cfg.liveness == LivenessSettings() and cfg.liveness.enabled is False
    cfg = configmod.loads("cameras: [{name: c, source: /dev/video0}]\n"
                          "liveness: {enabled: true, threshold: 0.6, min_size: 96, require: true}\n")
    assert (cfg.liveness.enabled, cfg.liveness.threshold, cfg.liveness.min_size,
            cfg.liveness.require) == (True, 0.6, 96.0, True)
    with pytest.raises(configmod.ConfigError, match=r"liveness\.threshold"):
        configmod.loads("cameras: [{name: c, source: /dev/video0}]\nliveness: {threshold: 1.5}\n")
    with pytest.raises(configmod.ConfigError, match=r"liveness\.sharp"):
        configmod.loads("cameras: [{name: c, source: /dev/video0}]\nliveness: {sharp: 1}\n")
    assert "liveness:" in configmod.defaults_yaml()


# ---------------------------------------------------------------------------- full tier: accuracy


def test_spoof_set_attacks_are_refused_at_the_default_threshold(shared_dir, pipe):
    """What docs/accuracy.md reports for the spoof set: every attack refused (APCER 0 of 10);
    the bona fide images are where the model fails (BPCER there, not asserted lower)."""
    folder = shared_dir / "faces" / "spoof"
    rows = list(csv.DictReader(open(folder / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 18
    thr = LivenessSettings().threshold
    accepted, refused_live = [], []
    for row in rows:
        image = load_image(folder / row["file"])
        face = max(pipe.detect(image), key=lambda f: f.width * f.height)
        s = pipe.liveness.score(image, face)
        logging.getLogger("test").info("%s %s %s", row["file"], row["label"], s)
        if row["label"] == "spoof" and s is not None and s >= thr:
            accepted.append(row["file"])
        if row["label"] == "live" and (s is None or s < thr):
            refused_live.append(row["file"])
    assert accepted == []
    assert len(refused_live) <= 6, refused_live  # measured 5 of 8 (docs/accuracy.md)


# ---------------------------------------------------------------------------- full tier: daemon


def _still_clip(image_path, out, frames=24):
    """A still "video" of one photo (MJPG, 10 fps): the photo held up to the camera."""
    image = load_image(image_path)
    k = 640.0 / max(image.shape[:2])
    image = cv2.resize(image, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert writer.isOpened()
    for _ in range(frames):
        writer.write(image)
    writer.release()
    return out


def _daemon_events(models_dir, clip, gallery, state, liveness):
    events, _ = run_in_process({
        "cameras": [{"name": "door", "source": str(clip), "realtime": False}],
        "liveness": liveness,
        "paths": {"state_dir": str(state), "gallery": str(gallery)},
        "mqtt": {"enabled": False}, "logging": {"target": "stderr"}}, models_dir)
    return events


def test_daemon_with_require_refuses_the_photo_and_recognizes_the_live_capture(
        shared_dir, models_dir, tmp_path):
    """vmfas_fake_003 (a recaptured photo) shows the man of vmfas_true_003 (cosine 0.97
    between the two): enrolled from the live capture, the photo held up as a still video is
    never recognized with liveness.require, while the live capture shown the same way is."""
    from edged_daemon_helpers import build_gallery

    spoof = shared_dir / "faces" / "spoof"
    enrol = tmp_path / "enrol" / "Vm_Man"
    enrol.mkdir(parents=True)
    (enrol / "a.png").write_bytes((spoof / "vmfas_true_003.png").read_bytes())
    gallery = build_gallery(tmp_path / "enrol", tmp_path / "g.edgal")
    live = {"enabled": True, "require": True}
    attack = _still_clip(spoof / "vmfas_fake_003.jpg", tmp_path / "attack.avi")
    events = _daemon_events(models_dir, attack, gallery, tmp_path / "s1", live)
    types = [e.type for e in events]
    assert "recognized" not in types and "spoof_suspected" in types, types
    sus = events[types.index("spoof_suspected")]
    assert sus.identity == "Vm_Man" and sus.liveness["live"] is False
    assert "antispoof" in sus.versions
    bona = _still_clip(spoof / "vmfas_true_003.png", tmp_path / "live.avi")
    events = _daemon_events(models_dir, bona, gallery, tmp_path / "s2", live)
    rec = [e for e in events if e.type == "recognized"]
    assert [e.identity for e in rec] == ["Vm_Man"] and rec[0].liveness["live"] is True
