"""``edged models convert --to onnx`` (issue 22): the verified models as ONNX, checked on real
inputs against TFLite with onnxruntime on the CPU. The inputs are what each net gets in the
float pipeline on the public photos (P-Net at each pyramid level, R-Net and O-Net on the
candidate crops, the embedder on aligned faces), recorded as for int8 calibration."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

if sys.version_info < (3, 10):
    pytest.skip("tf2onnx and TensorFlow need Python >= 3.10 here", allow_module_level=True)

from edged.runtime import modelstore, open_runner  # noqa: E402
from edged.runtime import quantize  # noqa: E402
from edged.runtime.onnxexport import onnx_session, pnet_at, run_onnx, tflite_to_onnx  # noqa: E402

EDGED = [sys.executable, "-m", "edged"]
PHOTOS = ("obama.jpg", "biden.jpg", "zidane.jpg", "obama2.jpg", "bus.jpg")


@pytest.fixture(scope="module")
def inputs(public_photos, models_dir):
    imgs = [cv2.imread(str(public_photos / n)) for n in PHOTOS if (public_photos / n).exists()]
    return quantize.calibrate_on_images(imgs, imgs, models_dir).samples


@pytest.mark.parametrize("role", ["rnet", "onet"])
def test_rnet_and_onet_give_the_same_scores_boxes_and_landmarks(role, inputs, models_dir):
    data, sha, _ = modelstore.read_verified(role, models_dir)
    session = onnx_session(tflite_to_onnx(data, role))
    tfl = open_runner(data, "cpu", name=role)
    n = 0
    for x in inputs[role]:
        for a, b in zip(run_onnx(session, x), tfl.run(x)):
            assert a.shape == b.shape
            assert float(np.abs(a - b).max()) <= 1e-4  # probabilities, box offsets, landmarks
        n += len(x)
    assert n >= 20, n  # real candidate crops, several batches


def test_pnet_gives_the_same_maps_at_each_pyramid_level(inputs, models_dir):
    data, sha, _ = modelstore.read_verified("pnet", models_dir)
    levels = inputs["pnet"][:6]
    assert len({x.shape for x in levels}) >= 3
    for x in levels:
        session = onnx_session(pnet_at(data, x.shape))
        tfl = open_runner(data, "cpu", name="pnet", input_shape=x.shape)
        for a, b in zip(run_onnx(session, x), tfl.run(x)):
            assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-4, x.shape


def test_the_embedder_gives_the_same_embedding_for_every_face(inputs, models_dir):
    data, sha, _ = modelstore.read_verified("embedder", models_dir)
    session = onnx_session(tflite_to_onnx(data, "embedder"))
    tfl = open_runner(data, "cpu", name="embedder")
    cosines = []
    for x in inputs["embedder"]:
        a, b = run_onnx(session, x)[0], tfl.run(x)[0]
        cosines += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert len(cosines) >= 4 and min(cosines) >= 0.9999, cosines


def test_models_convert_writes_the_set_with_its_sha256s(tmp_path, models_dir):
    out = tmp_path / "onnx"
    r = subprocess.run(EDGED + ["models", "convert", "--to", "onnx", "--out", str(out),
                                "--models", str(models_dir)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "onnx.json").read_text())
    assert [m["role"] for m in doc["models"]] == ["pnet", "rnet", "onet", "embedder"]
    for m in doc["models"]:
        assert modelstore.sha256_bytes((out / m["file"]).read_bytes()) == m["sha256"]
        assert m["source_sha256"] == modelstore.read_verified(m["role"], models_dir)[1]
    assert doc["converter"].startswith("tf2onnx ")
