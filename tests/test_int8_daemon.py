"""A quantised set in service (issue 21): int8 P-Net, R-Net, O-Net and MobileFaceNet made by
``edged.runtime.quantize`` (the dynamic recipe: int8 weights, no calibration set needed) are
dropped over the air into a running ``edged run`` on the looped Hamilton clip, held back until
a gallery made with the int8 embedder arrives, verified, swapped in, confirmed and kept; the
next whole pass of the clip names the same people as the float pass before it; a restart
loads the kept int8 set again, checked by sha256."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

if sys.version_info < (3, 10):
    pytest.skip("ai-edge-quantizer needs Python >= 3.10 (edged[quantize] is not installable here)",
                allow_module_level=True)

from edged.gallery import write_gallery  # noqa: E402
from edged.ota.modelcheck import prepare_model  # noqa: E402
from edged.runtime import quantize  # noqa: E402
from edged.vision.embed import Embedder  # noqa: E402
from edged.vision.imageio import load_image  # noqa: E402
from edged.vision.pipeline import FacePipeline, central_face  # noqa: E402
from edged_daemon_helpers import EDGED, DaemonProcess, clip_frames, write_config  # noqa: E402
from test_ota import StatusWatch  # noqa: E402

CLIP = "videos/facerec_short_hamilton_clip.mp4"
ENROL = "videos/hamilton_enrol"
CLOSE_SHOT = (82, 211)  # the performer's close shot (shared/videos/README.md)


def _int8_set(models_dir, out):
    """The four nets quantised with the dynamic recipe, written with their drop manifest."""
    src = quantize.source_models(models_dir)
    models = {role: quantize.quantize_model(role, quantize.prepare_float(data, name), "dynamic")
              for role, (data, _, name) in src.items()}
    manifest = quantize.write_set(out, "dynamic", models, src, quantize.Calibration(), {})
    return models, manifest


def _gallery(shared_dir, models_dir, embedder_blob, out) -> str:
    """The enrolment stills, embedded by the int8 embedder (as it will run in service)."""
    pipe = FacePipeline.from_models(models_dir)
    pipe.embedder = Embedder(embedder_blob.data, embedder_blob.sha256)
    ids, rows, embs = [], [], []
    for person in sorted((shared_dir / ENROL).iterdir()):
        for photo in sorted(person.iterdir()):
            img = load_image(photo)
            face = central_face(pipe.process(img), img.shape)
            rows.append(len(ids))
            embs.append(face.embedding)
        ids.append((person.name, person.name.replace("_", " ")))
    return write_gallery(out, ids, np.array(rows), np.stack(embs), embedder_blob.sha256)


def _outcome(events, start: int, n: int) -> list:
    """Who was named in the pass of frames ``start .. start + n``, and in which shot."""
    out = []
    for e in events:
        i = e["debug"]["frame_index"]
        if i is None or not start <= i < start + n or e["identity"] is None:
            continue
        if e["type"] == "recognized":
            shot = "close" if CLOSE_SHOT[0] <= i - start < CLOSE_SHOT[1] else "other"
            out.append((e["identity"], shot))
    return out


def test_an_int8_set_dropped_over_the_air_names_the_same_people(shared_dir, models_dir, broker,
                                                               tmp_path):
    clip = shared_dir / CLIP
    n = clip_frames(clip)
    models, manifest = _int8_set(models_dir, tmp_path / "int8")
    # the bytes and sha256 the daemon will run (its drop check prepares each model so)
    blobs = {role: prepare_model(role, data, role) for role, data in models.items()}

    mdir, gdir = tmp_path / "models", tmp_path / "gallery"
    mdir.mkdir(), gdir.mkdir()
    for f in models_dir.iterdir():
        if f.suffix == ".tflite":
            shutil.copyfile(f, mdir / f.name)
    gpath = gdir / "people.edgal"
    subprocess.run([EDGED, "gallery", "build", str(shared_dir / ENROL), "-o", str(gpath), "-q",
                    "--models", str(models_dir)], check=True, capture_output=True, timeout=120)
    cfg = write_config(
        tmp_path / "config.yaml", device={"name": "int8"},
        cameras=[{"name": "stage", "source": str(clip), "loop": True, "realtime": False}],
        paths={"models_dir": str(mdir), "gallery": str(gpath), "state_dir": str(tmp_path / "state")},
        mqtt={"host": "127.0.0.1", "port": broker.port},
        logging={"target": "stderr", "level": "info"})
    watch = StatusWatch(broker.port, "edged/int8")
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.wait_log("ready", 120)
        # -- the float set: one whole pass
        start = d.whole_pass_after(d.last_frame(), n, 300)
        float_outcome = _outcome(d.events(), start, n)
        assert ("Lin-Manuel_Miranda", "close") in float_outcome, float_outcome

        # -- the int8 set dropped: held back until its gallery arrives, then swapped together
        files = [tmp_path / "int8" / e["file"] for e in json.loads(manifest.read_text())["models"]]
        r = subprocess.run([EDGED, "drop", *map(str, files), str(manifest), "--to", str(mdir)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = watch.wait(lambda s: s["held_back"]["embedder"] == blobs["embedder"].sha256, 120,
                        "the int8 embedder held back")
        g8 = _gallery(shared_dir, models_dir, blobs["embedder"], tmp_path / "people.int8.edgal")
        r = subprocess.run([EDGED, "drop", str(tmp_path / "people.int8.edgal"), "--to",
                            str(gdir), "--as", gpath.name], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        st = watch.wait(lambda s: s["last_swap"]["confirmed"] is True
                        and s["versions"]["embedder"] == blobs["embedder"].sha256, 180,
                        "the int8 set confirmed")
        assert st["versions"]["gallery"] == g8
        assert st["versions"]["detector"] == {r: blobs[r].sha256 for r in ("pnet", "rnet", "onet")}

        # -- the int8 set: the next whole pass names the same people in the same shots
        start = d.whole_pass_after(d.last_frame(), n, 300)
        int8_outcome = _outcome(d.events(), start, n)
        print(f"\nfloat pass: {float_outcome}; int8 pass: {int8_outcome}")
        assert int8_outcome == float_outcome
        assert "Traceback" not in d.log()
        d.terminate()

        # -- kept for the next start, and loaded again there, checked by sha256
        kept = json.loads((tmp_path / "state" / "models" / "in-service.json").read_text())
        assert {m["sha256"] for m in kept["models"]} == {b.sha256 for b in blobs.values()}
        again = tmp_path / "again"
        again.mkdir()
        d2 = DaemonProcess(cfg, again)
        try:
            d2.wait_log("ready", 120)
            assert "the set last in service" in d2.log()
            r = subprocess.run([EDGED, "status", "--config", str(cfg)], capture_output=True,
                               text=True, timeout=30)
            assert f"embedder   {blobs['embedder'].sha256}" in r.stdout, r.stdout
        finally:
            d2.kill()
    finally:
        d.kill()
        watch.close()
