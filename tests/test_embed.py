"""MobileFaceNet embeddings on real faces."""
from __future__ import annotations

import numpy as np
import pytest

from edged.vision.embed import Embedder
from edged.vision.imageio import load_image
from edged.vision.pipeline import FacePipeline, central_face

ACCEL = {"type": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def pipe(models_dir):
    return FacePipeline.from_models(models_dir, accel=ACCEL)


@pytest.fixture(scope="module")
def faces(pipe, shared_dir):
    """Aligned central faces: two photos each of two people, and two more people."""
    dev = shared_dir / "faces" / "dev"
    names = {"jeff1": "Jeff/deepface_img20.jpg", "jeff2": "Jeff/deepface_img21.jpg",
             "jack1": "Jack_Dorsey/deepface_img16.jpg", "jack2": "Jack_Dorsey/deepface_img17.jpg",
             "jen": "Jennifer/deepface_img3.jpg", "marissa": "Marissa/deepface_img22.jpg"}
    out = {}
    for key, rel in names.items():
        img = load_image(dev / rel)
        face = central_face(pipe.detect(img), img.shape)
        assert face is not None, rel
        out[key] = face.aligned
    return out


def test_shape_dtype_norm(pipe, faces):
    e = pipe.embedder.embed(list(faces.values()))
    assert e.shape == (len(faces), 192) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert pipe.embedder.dim == 192


def test_same_person_scores_above_different_people(pipe, faces):
    keys = list(faces)
    e = dict(zip(keys, pipe.embedder.embed([faces[k] for k in keys])))
    same = [float(e["jeff1"] @ e["jeff2"]), float(e["jack1"] @ e["jack2"])]
    diff = [float(e[a] @ e[b]) for a in keys for b in keys
            if a < b and a[:4] != b[:4]]
    thr = pipe.settings.match_threshold
    assert min(same) > thr > max(diff), (same, diff)
    assert min(same) - max(diff) > 0.2


def test_flip_consistency(pipe, faces):
    emb = pipe.embedder
    a = faces["jeff1"]
    mirror = np.ascontiguousarray(a[:, ::-1])
    plain, mirrored = emb.embed([a, mirror])
    assert float(plain @ mirrored) > 0.85  # a face and its mirror image are close
    f1 = emb.embed([a], flip=True)[0]
    f2 = emb.embed([mirror], flip=True)[0]
    np.testing.assert_allclose(f1, f2, atol=1e-5)  # the flip average is mirror-invariant
    avg = (plain + mirrored) / np.linalg.norm(plain + mirrored)
    np.testing.assert_allclose(f1, avg, atol=1e-5)
    assert np.linalg.norm(f1) == pytest.approx(1.0, abs=1e-5)


def test_batch_independence(pipe, faces):
    """An embedding does not depend on the rest of its batch, whatever the batch size."""
    emb = pipe.embedder
    items = list(faces.values())  # 6 faces: chunks of 4 and 2
    together = emb.embed(items)
    for i, a in enumerate(items):
        np.testing.assert_allclose(emb.embed([a])[0], together[i], atol=1e-5)
    np.testing.assert_allclose(emb.embed(items[::-1])[::-1], together, atol=1e-5)
    many = emb.embed(items * 3)  # 18: chunks of 8, 8, 2
    np.testing.assert_allclose(many[12:], together, atol=1e-5)


def test_identity_is_the_loaded_file(pipe, models_dir):
    from edged.runtime.modelstore import Manifest, read_verified

    data, digest, _ = read_verified("embedder", models_dir)
    assert pipe.embedder_sha256 == digest == Manifest.load()["embedder"].load_sha256
    other = Embedder(data, digest, ACCEL)
    assert other.sha256 == digest


def test_bad_input(pipe):
    emb = pipe.embedder
    assert emb.embed([]).shape == (0, 192)
    with pytest.raises(ValueError, match="112 x 112 x 3 uint8"):
        emb.embed([np.zeros((100, 100, 3), np.uint8)])
    with pytest.raises(ValueError, match="face 1"):
        emb.embed([np.zeros((112, 112, 3), np.uint8), np.zeros((112, 112, 3), np.float32)])


def test_pipeline_process_and_accelerator_split(models_dir, shared_dir):
    pipe = FacePipeline.from_models(models_dir, accel={"detector": ACCEL, "embedder": ACCEL})
    img = load_image(shared_dir / "faces" / "multi_face" / "facerec_two_people.jpg")
    faces = pipe.process(img)
    assert len(faces) == 2
    for f in faces:
        assert f.aligned.shape == (112, 112, 3) and f.quality is not None and f.quality.passed
        assert f.embedding.shape == (192,)
    assert float(faces[0].embedding @ faces[1].embedding) < pipe.settings.match_threshold
    with pytest.raises(ValueError, match="unknown keys"):
        FacePipeline.from_models(models_dir, accel={"detector": ACCEL, "embeder": ACCEL})


def test_central_face(pipe, shared_dir):
    img = load_image(shared_dir / "faces" / "multi_face" / "facerec_two_people.jpg")
    faces = pipe.detect(img)
    h, w = img.shape[:2]
    c = central_face(faces, img.shape)
    d = [np.hypot(*(f.landmarks.mean(axis=0) - [w / 2, h / 2])) for f in faces]
    assert c is faces[int(np.argmin(d))]
    assert central_face([], img.shape) is None


def test_the_published_batch_2_model_is_refused_with_the_fix(models_dir):
    """The MobileFaceNet as published has its batch baked at 2: it would embed pairs and fail
    on the first odd count of faces. The constructor says so and names the fix."""
    from edged.runtime import modelstore

    data, digest, _ = modelstore.read_verified("embedder", models_dir, original=True)
    with pytest.raises(ValueError, match=r"cannot embed one face at a time .*baked at 2 .*"
                                         r"'edged models install'"):
        Embedder(data, digest)
