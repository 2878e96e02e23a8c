"""Enrolment from the field end to end (issue 19): a real ``edged run`` on the Hamilton clip,
looped, with an empty gallery and ``enrolment.keep_faces``; the performer's kept track enrolled
with ``edged tracks enrol``, the gallery hot-swapped by the running daemon, the next pass of the
clip naming him once per visit and nobody else; an audience track under his name refused by
the guard."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import wait_for
from edged.enrolment.store import TrackStore
from edged.vision.imageio import load_image
from edged.vision.pipeline import FacePipeline, central_face
from edged_daemon_helpers import EDGED, DaemonProcess, clip_frames, write_config

LMM = "Lin-Manuel_Miranda"


@pytest.fixture(scope="module")
def hamilton(shared_dir):
    clip = shared_dir / "videos" / "facerec_short_hamilton_clip.mp4"
    still = next((shared_dir / "videos" / "hamilton_enrol" / LMM).iterdir())
    return clip, still


def _tracks(cfg, *args):
    r = subprocess.run([EDGED, "tracks", *args, "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    return r


def test_a_kept_track_enrolled_from_the_field_is_recognised_on_the_next_pass(
        hamilton, models_dir, tmp_path):
    clip, still = hamilton
    n = clip_frames(clip)
    pipe = FacePipeline.from_models(models_dir)
    img = load_image(still)
    face = central_face(pipe.process(img), img.shape)
    lmm = np.asarray(face.embedding, np.float32)

    gallery = tmp_path / "people.edgal"  # none yet: every face is unknown
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "edged.yaml", device={"name": "enrol"},
        cameras=[{"name": "stage", "source": str(clip), "realtime": False, "loop": True}],
        paths={"gallery": str(gallery), "state_dir": str(state), "models_dir": str(models_dir)},
        mqtt={"enabled": False}, enrolment={"keep_faces": True},
        logging={"target": "stderr", "level": "info"})
    store = TrackStore.of_state_dir(state)
    d = DaemonProcess(cfg, tmp_path)
    try:
        def similarity(track_id) -> float:
            t = store.load(track_id)
            return max(float(np.dot(f.embedding, lmm)) for f in t.faces)

        def kept_unknown():
            r = _tracks(cfg, "list", "--unknown", "--json")
            return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []

        # -- first pass: the performer is a stranger, his track is kept
        assert wait_for(lambda: any(similarity(t["id"]) >= 0.58 for t in kept_unknown()), 240,
                        step=0.5), d.log()[-3000:]
        his = max(kept_unknown(), key=lambda t: similarity(t["id"]))
        assert all(e["identity"] is None for e in d.events()), "named with an empty gallery"

        # -- enrol it: the running daemon hot-swaps the new gallery
        at = len(d.log())
        r = _tracks(cfg, "enrol", his["id"], LMM)
        assert r.returncode == 0, r.stdout + r.stderr
        d.wait_log("gallery swap:", 60, after=at)
        swapped_at = d.last_frame()

        # -- the next whole pass after the swap: him, once, and nobody else
        start = d.whole_pass_after(swapped_at, n, 240)
        one_pass = [e for e in d.events()
                    if e["debug"]["frame_index"] is not None
                    and start <= e["debug"]["frame_index"] < start + n]
        named = [e for e in one_pass if e["type"] == "recognized"]
        # him, once per visit: the close shot (frames 82-210, where his track was kept) names
        # him once; the opening wide shot (frames 0-19, his face 38 px wide, a cut before the
        # next shot) is another visit, where the enrolled crops may name him too
        assert named and all(e["identity"] == LMM for e in named), named
        close = [e for e in named if start + 82 <= e["debug"]["frame_index"] < start + 211]
        assert len(close) == 1, named
        assert all(e["debug"]["frame_index"] < start + 20 for e in named if e not in close), named
        assert len({e["track_id"] for e in named}) == len(named), named  # once per track
        assert not [e for e in one_pass if e["identity"] not in (None, LMM)]

        # -- an audience track under his name: refused by the guard, the gallery unchanged
        before = gallery.read_bytes()
        others = [t for t in json.loads(_tracks(cfg, "list", "--json").stdout)
                  if t["outcome"] != "recognized"]
        audience = min(others, key=lambda t: similarity(t["id"]))
        assert similarity(audience["id"]) < 0.4, [(t["id"], similarity(t["id"])) for t in others]
        r = _tracks(cfg, "enrol", audience["id"], LMM)
        assert r.returncode == 2 and "refused" in r.stderr and "do not match" in r.stderr, \
            r.stdout + r.stderr
        assert gallery.read_bytes() == before
        assert "Traceback" not in d.log()
    finally:
        d.kill()
