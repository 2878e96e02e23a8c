"""Enrolment from kept tracks: the guard, enrol_track, ``edged tracks`` and the retention.

Every kept track here is made of real photos (the public photos of ``tests/publicdata.py``:
Barack Obama three times, Joe Biden once) through the real face pipeline: detected, aligned,
scored for quality and embedded, then written with :meth:`TrackStore.keep` as the daemon
does.  A "track" of one person is several views of him (the photos, a mirror image, a
half-size copy); a track whose crops are all below the quality minimums is the photos shrunk
until the faces are under ``quality.min_size``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from edged.enrolment.enrol import EnrolmentRefused, enrol_track
from edged.enrolment.guard import check_track, identification_threshold
from edged.enrolment.store import (DIR_MODE, FILE_MODE, EnrolmentSettings, KeptFace, KeptTrack,
                                   TrackStore, file_mode)
from edged.gallery import Gallery, write_gallery
from edged.runtime.modelstore import Manifest
from edged.vision.imageio import load_image
from edged.vision.pipeline import FacePipeline, central_face

OBAMA = ("Barack_Obama", "Barack Obama")
ACCEL = {"type": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def pipe(models_dir):
    return FacePipeline.from_models(models_dir, accel=ACCEL)


def _views(img, which):
    out = {"photo": img, "mirror": np.ascontiguousarray(img[:, ::-1]),
           "half": cv2.resize(img, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
           # faces of about 20 px: under quality.min_size (24 px)
           "tiny": cv2.resize(img, None, fx=0.08, fy=0.08, interpolation=cv2.INTER_AREA)}
    return [out[w] for w in which]


def _face(pipe, img) -> KeptFace:
    f = central_face(pipe.detect(img), img.shape)
    assert f is not None, "no face in a public photo"
    emb = pipe.embed_faces([f], only_passing=False)[0].embedding
    return KeptFace(image=f.aligned, embedding=np.asarray(emb, np.float32),
                    quality=float(f.quality.score), passed=bool(f.quality.passed))


_SEQ = iter(range(1, 10 ** 6))


def _track(pipe, faces, sha, outcome="unknown", ended=None) -> KeptTrack:
    n = next(_SEQ)
    ended = time.time() - 60 + n if ended is None else ended
    # (a scrambled first half: the ids' prefixes differ, as the daemon's random ids do)
    return KeptTrack(id=f"{n * 2654435761 % 2 ** 32:08x}{n:08x}", camera="door", track_id=n, started=ended - 5,
                     ended=ended, outcome=outcome, embedder=sha, faces=list(faces),
                     best_score=0.21 if outcome == "unknown" else None)


@pytest.fixture(scope="module")
def faces(pipe, public_photos):
    """Real kept crops by person and view: {"obama": [...], "obama23": [...], "biden": [...],
    "tiny": [...], "biden_probe": face}."""
    def load(n):
        return load_image(public_photos / n)

    obama, o2, o3, biden = (load(n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg",
                                               "biden.jpg"))
    out = {"obama": [_face(pipe, v) for v in _views(obama, ("photo", "mirror", "half"))],
           "obama23": [_face(pipe, v) for v in (o2, o3)],
           "biden": [_face(pipe, v) for v in _views(biden, ("photo", "mirror", "half"))],
           "tiny": [_face(pipe, _views(v, ("tiny",))[0]) for v in (obama, o2)]}
    # Biden's face alone, zoomed in (another view than the track's: to be named by the gallery)
    h, w = biden.shape[:2]
    out["biden_probe"] = _face(pipe, cv2.resize(biden[: h // 2], None, fx=0.7, fy=0.7))
    return out


#: SFace's sha256 (its manifest entry): the gallery's or a track's embedder when it is not
#: the one in service (SFace itself is installed in the full tier only)
SFACE_SHA = Manifest.load().model("embedder", "sface").load_sha256


@pytest.fixture
def obama_gallery(pipe, faces, tmp_path):
    """A gallery of Barack Obama alone, from obama2.jpg and obama3.jpg (not the track's photo)."""
    path = tmp_path / "people.edgal"
    write_gallery(path, [OBAMA], [0, 0], np.stack([f.embedding for f in faces["obama23"]]),
                  pipe.embedder_sha256)
    return path


def _codes(reasons):
    return [r.code for r in reasons]


def test_the_public_crops_are_what_the_tests_assume(faces):
    assert all(f.passed for k in ("obama", "obama23", "biden") for f in faces[k])
    assert not any(f.passed for f in faces["tiny"])
    assert all(f.image.shape == (112, 112, 3) and f.image.dtype == np.uint8
               for f in faces["obama"])


def test_threshold_is_the_embedders_own_unless_given(pipe, faces):
    assert identification_threshold(pipe.embedder_sha256) == pytest.approx(0.58)
    assert identification_threshold(SFACE_SHA) == pytest.approx(0.456)
    assert identification_threshold("0" * 64) == pytest.approx(0.58)  # unknown: the fallback
    assert identification_threshold(pipe.embedder_sha256, 0.3) == 0.3


def test_guard_refuses_a_track_of_two_people(pipe, faces):
    mixed = _track(pipe, faces["obama"][:2] + faces["biden"][:1], pipe.embedder_sha256)
    reasons = check_track(mixed, None, "Someone")
    assert _codes(reasons) == ["mixed"], reasons
    assert "disagree" in reasons[0] and "more than one person" in reasons[0]
    assert "0.418" in reasons[0]  # the pair threshold it was held to (verification)
    # the crops are numbered as edged tracks show numbers them (a crop below the minimums
    # first, not enrolled, not compared)
    mixed = _track(pipe, faces["tiny"][:1] + faces["obama"][:1] + faces["biden"][:1],
                   pipe.embedder_sha256)
    reasons = check_track(mixed, None, "Someone")
    assert _codes(reasons) == ["mixed"] and "crops 2 and 3 score" in reasons[0], reasons


def test_guard_refuses_another_person_added_to_an_enrolled_one(pipe, faces, obama_gallery):
    biden = _track(pipe, faces["biden"], pipe.embedder_sha256)
    with Gallery.open(obama_gallery) as g:
        best = float(g.identity_scores(np.stack([f.embedding for f in biden.faces])).max())
        for name in ("Barack_Obama", "Barack Obama"):  # by id or by display name
            reasons = check_track(biden, g, name)
            assert _codes(reasons) == ["not_that_person"], reasons
            assert "do not match Barack Obama (Barack_Obama)" in reasons[0]
            assert f"{best:.3f}" in reasons[0]
    with pytest.raises(EnrolmentRefused) as exc:
        enrol_track(biden, obama_gallery, "Barack_Obama")
    assert "do not match Barack Obama" in str(exc.value)
    with Gallery.open(obama_gallery) as g:
        assert g.rows == 2  # unchanged


def test_guard_refuses_a_look_alike_under_a_new_name(pipe, faces, obama_gallery):
    obama = _track(pipe, faces["obama"], pipe.embedder_sha256)
    with Gallery.open(obama_gallery) as g:
        best = float(g.identity_scores(np.stack([f.embedding for f in obama.faces])).max())
        reasons = check_track(obama, g, "Barry")
        assert check_track(obama, g, "Barack_Obama") == []  # he himself, added to his rows
    assert best >= 0.58
    assert _codes(reasons) == ["look_alike"], reasons
    assert f"Barack Obama (Barack_Obama) at {best:.3f}" in reasons[0]
    assert "enrol the track under that name" in reasons[0]


def test_guard_refuses_a_track_below_the_quality_minimums(pipe, faces):
    low = _track(pipe, faces["tiny"], pipe.embedder_sha256)
    reasons = check_track(low, None, "Barack_Obama")
    assert _codes(reasons) == ["low_quality"], reasons
    assert "quality minimums" in reasons[0] and "large, sharp and frontal" in reasons[0]


def test_guard_refuses_another_embedder_even_with_force(pipe, faces, obama_gallery):
    # a track that says SFace made its embeddings, enrolled into a MobileFaceNet gallery
    other = _track(pipe, faces["obama"], SFACE_SHA)
    with Gallery.open(obama_gallery) as g:
        reasons = check_track(other, g, "Barack_Obama")
    assert _codes(reasons) == ["embedder"] and not reasons[0].forceable
    assert "sface" in reasons[0] and "mobilefacenet" in reasons[0]
    with pytest.raises(EnrolmentRefused, match="cannot be compared"):
        enrol_track(other, obama_gallery, "Barack_Obama", force=True)


def test_force_enrols_with_the_reasons_as_warnings(pipe, faces, obama_gallery):
    mixed = _track(pipe, faces["biden"][:2] + faces["obama"][:1], pipe.embedder_sha256)
    with pytest.raises(EnrolmentRefused) as exc:
        enrol_track(mixed, obama_gallery, "Joe Biden")
    assert exc.value.forceable
    res = enrol_track(mixed, obama_gallery, "Joe Biden", force=True)
    assert res["new"] and res["rows_added"] == 3 and res["rows"] == 5
    assert any("disagree" in w for w in res["warnings"])
    assert any("already match another enrolled person" in w for w in res["warnings"])
    # all crops with force, also those below the quality minimums; and what the forced mix
    # did: Obama's face now matches "Joe Biden" too (a poisoned gallery)
    low = _track(pipe, faces["tiny"], pipe.embedder_sha256)
    res = enrol_track(low, obama_gallery, "Barack_Obama", force=True)
    assert not res["new"] and res["rows_added"] == 2
    assert [w.split(" ")[:2] for w in res["warnings"]] == [["None", "of"], ["The", "crops"]]
    assert "already match another enrolled person: Joe Biden (Joe_Biden)" in res["warnings"][1]


def test_a_good_track_enrols_and_the_gallery_names_him(pipe, faces, obama_gallery, tmp_path):
    biden = _track(pipe, faces["biden"], pipe.embedder_sha256)
    res = enrol_track(biden, obama_gallery, "Joe Biden")
    assert res["warnings"] == [] and res["new"] and res["identity"] == "Joe_Biden"
    assert (res["rows_added"], res["rows"], res["people"]) == (3, 5, 2)
    probe = np.stack([faces["biden_probe"].embedding, faces["obama"][0].embedding])
    with Gallery.open(obama_gallery) as g:
        assert g.checksum == res["checksum"]
        assert [m.name for m in g.match(probe)] == ["Joe Biden", "Barack Obama"]
        assert g.rows_of(g.find("Joe_Biden")) == (2, 5)
    # more views of an enrolled person: added to his rows
    res = enrol_track(_track(pipe, faces["obama"], pipe.embedder_sha256), obama_gallery,
                      "Barack Obama")
    assert not res["new"] and res["rows_added"] == 3 and res["people"] == 2
    # a gallery that does not exist yet is created, float32; a float16 one stays float16
    new = tmp_path / "new.edgal"
    res = enrol_track(_track(pipe, faces["obama"], pipe.embedder_sha256), new, "Barack Obama")
    with Gallery.open(new) as g:
        assert g.dtype_name == "float32" and g.identities == [("Barack_Obama", "Barack Obama")]
        assert g.match(probe[1:])[0].name == "Barack Obama"
    half = tmp_path / "half.edgal"
    write_gallery(half, [OBAMA], [0, 0], np.stack([f.embedding for f in faces["obama23"]]),
                  pipe.embedder_sha256, dtype="float16")
    enrol_track(biden, half, "Joe Biden")
    with Gallery.open(half) as g:
        assert g.dtype_name == "float16" and g.match(probe[:1])[0].name == "Joe Biden"


# ---------------------------------------------------------------------------- the CLI


def edged(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "edged", "tracks", *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def kept(pipe, faces, tmp_path):
    """A state directory with three kept tracks, oldest first: Biden (unknown), Obama
    (recognized), a mix of both (unknown)."""
    store = TrackStore.of_state_dir(tmp_path / "state")
    now = time.time()
    biden = _track(pipe, faces["biden"], pipe.embedder_sha256, ended=now - 300)
    obama = _track(pipe, faces["obama"], pipe.embedder_sha256, outcome="recognized",
                   ended=now - 200)
    obama.name, obama.identity, obama.best_score = "Barack Obama", "Barack_Obama", 0.81
    mixed = _track(pipe, faces["obama"][:1] + faces["biden"][:2], pipe.embedder_sha256,
                   ended=now - 100)
    for t in (biden, obama, mixed):
        store.keep(t)
    return store, {"biden": biden, "obama": obama, "mixed": mixed}


def test_cli_list_newest_first_and_unknown_only(kept, tmp_path):
    store, t = kept
    state = tmp_path / "state"
    p = edged("list", "--state-dir", state, check_rc=0)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "CAMERA", "ENDED", "OUTCOME", "NAME", "QUALITY", "SCORE",
                                "CROPS"]
    assert [ln.split()[0] for ln in lines[1:]] == [t["mixed"].id, t["obama"].id, t["biden"].id]
    assert "Barack Obama" in lines[2] and "0.810" in lines[2] and "recognized" in lines[2]
    assert "3 kept track(s)" in p.stderr
    p = edged("list", "--unknown", "--json", "--state-dir", state, check_rc=0)
    doc = json.loads(p.stdout)
    assert [d["id"] for d in doc] == [t["mixed"].id, t["biden"].id]
    assert {d["outcome"] for d in doc} == {"unknown"} and doc[1]["n_faces"] == 3
    assert doc[1]["best_quality"] == pytest.approx(max(f.quality for f in t["biden"].faces),
                                                   abs=1e-4)
    assert "embedding" not in p.stdout and "image" not in p.stdout
    p = edged("list", "--state-dir", tmp_path / "elsewhere", check_rc=0)
    assert p.stdout == "" and "no kept tracks in" in p.stderr


def test_cli_show_writes_the_crops_0600(kept, tmp_path):
    store, t = kept
    out = tmp_path / "crops"
    p = edged("show", t["biden"].id[:8], "--out", out, "--state-dir", tmp_path / "state",
              check_rc=0)
    paths = p.stdout.split()
    assert paths == [str(out / f"{t['biden'].id}-{k}.png") for k in (1, 2, 3)]
    assert f"track {t['biden'].id}: camera door" in p.stderr
    for path, face in zip(paths, t["biden"].faces):
        assert file_mode(path) == 0o600
        assert np.array_equal(cv2.imread(path), face.image)  # lossless
    assert file_mode(out) == 0o700
    p = edged("show", "0123abcd", "--state-dir", tmp_path / "state", check_rc=1)
    assert "no kept track 0123abcd" in p.stderr
    p = edged("show", "not-hex", "--state-dir", tmp_path / "state", check_rc=1)
    assert "is not a kept track's id" in p.stderr


def test_cli_enrol_refused_forced_and_good(kept, obama_gallery, tmp_path):
    store, t = kept
    state = tmp_path / "state"
    # the mixed track: refused, one reason a line, the gallery unchanged
    before = obama_gallery.read_bytes()
    p = edged("enrol", t["mixed"].id, "Joe Biden", "--gallery", obama_gallery,
              "--state-dir", state, check_rc=2)
    refused = [ln for ln in p.stderr.splitlines() if ln.startswith("edged tracks enrol: refused:")]
    assert len(refused) == 2, p.stderr  # the two people disagree; one of them is Obama
    assert "disagree" in refused[0] and "Barack Obama (Barack_Obama)" in refused[1]
    assert "--force enrols it anyway" in p.stderr
    assert obama_gallery.read_bytes() == before
    # Biden's track under Obama's name: refused
    p = edged("enrol", t["biden"].id, "Barack_Obama", "--gallery", obama_gallery,
              "--state-dir", state, check_rc=2)
    assert "do not match Barack Obama" in p.stderr
    # Biden's track as a new person: enrolled, the gallery names him
    p = edged("enrol", t["biden"].id, "Joe Biden", "--gallery", obama_gallery,
              "--state-dir", state, check_rc=0)
    assert p.stdout.startswith("enrolled Joe Biden (Joe_Biden): 3 crop(s) of track")
    assert "now has 2 people, 5 rows" in p.stdout and p.stderr == ""
    with Gallery.open(obama_gallery) as g:
        assert g.match(t["biden"].faces[0].embedding[None])[0].name == "Joe Biden"
    # --force: enrolled with a warning
    p = edged("enrol", t["mixed"].id, "Someone", "--gallery", obama_gallery, "--force",
              "--state-dir", state, check_rc=0)
    assert "edged tracks enrol: warning: The crops of track" in p.stderr
    assert p.stdout.startswith("enrolled Someone (Someone): 3 crop(s)")
    # no gallery named: a usage error, not a guess
    p = edged("enrol", t["biden"].id, "Joe Biden", "--state-dir", state, check_rc=2)
    assert "which gallery?" in p.stderr


def test_cli_finds_the_state_and_gallery_in_the_config(kept, obama_gallery, tmp_path):
    store, t = kept
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"paths:\n  state_dir: {tmp_path / 'state'}\n  gallery: {obama_gallery}\n"
                   f"match:\n  threshold: 0.99\n")
    # the configuration's match.threshold holds: even his own views are too far apart
    p = edged("enrol", t["obama"].id, "Barack_Obama", "--config", cfg, check_rc=2)
    assert "below the identification threshold 0.990" in p.stderr
    p = edged("enrol", t["obama"].id, "Barack_Obama", "--config", cfg, "--threshold", "0.58",
              check_rc=0)
    assert p.stdout.startswith("added to Barack Obama (Barack_Obama): 3 crop(s)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: [1, 2]\n")
    p = edged("list", "--config", bad, check_rc=2)
    assert "bad.yaml" in p.stderr


def test_cli_forget(kept, tmp_path):
    store, t = kept
    state = tmp_path / "state"
    p = edged("forget", t["obama"].id, "--state-dir", state, check_rc=0)
    assert p.stdout.startswith(f"forgot track {t['obama'].id} (camera door")
    assert not store.path_of(t["obama"].id).exists()
    edged("forget", t["obama"].id, "--state-dir", state, check_rc=1)
    p = edged("list", "--json", "--state-dir", state, check_rc=0)
    assert [d["id"] for d in json.loads(p.stdout)] == [t["mixed"].id, t["biden"].id]


# ---------------------------------------------------------------------------- retention


def test_retention_by_age_and_count_and_the_modes(pipe, faces, tmp_path):
    store = TrackStore.of_state_dir(tmp_path / "state",
                                    EnrolmentSettings(keep_days=1.0, max_tracks=3))
    now = time.time()
    tracks = [_track(pipe, faces["biden"][:1], pipe.embedder_sha256, ended=now - 10 * k)
              for k in range(4)]
    paths = [store.keep(t) for t in tracks[:3]]
    assert file_mode(store.root) == DIR_MODE == 0o700
    assert all(file_mode(p) == FILE_MODE == 0o600 for p in paths)
    old = paths[2]
    os.utime(old, (now - 2 * 86400, now - 2 * 86400))  # two days old: past keep_days
    assert store.prune(now) == 1 and not old.exists()
    assert [t.id for t in store.list()] == [tracks[0].id, tracks[1].id]
    # beyond max_tracks: the oldest files go (by their time on disk)
    os.utime(paths[1], (now - 3600, now - 3600))
    for t in tracks[2:]:
        store.keep(t)
    kept = sorted(p.stem for p in store.root.iterdir())
    assert len(kept) == 3 and tracks[1].id not in kept, kept
    assert all(file_mode(store.root / f"{k}.npz") == 0o600 for k in kept)
