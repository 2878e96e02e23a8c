"""``edged faces | compare | embed`` on real photos and on files that are not usable images."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edged.cli import main


@pytest.fixture(scope="module")
def photos(shared_dir):
    dev = shared_dir / "faces" / "dev"
    multi = shared_dir / "faces" / "multi_face"
    return {"two": str(multi / "facerec_two_people.jpg"), "dogs": str(multi / "dlib_dogs.jpg"),
            "jeff1": str(dev / "Jeff" / "deepface_img20.jpg"),
            "jeff2": str(dev / "Jeff" / "deepface_img21.jpg"),
            "jack": str(dev / "Jack_Dorsey" / "deepface_img16.jpg")}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"\x00\x01 definitely not an image " * 10)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "folder.png").mkdir()
    return {"garbage": str(tmp_path / "garbage.jpg"), "text": str(tmp_path / "notes.txt"),
            "dir": str(tmp_path / "folder.png"), "missing": str(tmp_path / "missing.jpg")}


def run(capsys, *argv):
    code = main(list(argv) + ["--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_faces_json(capsys, models_dir, photos):
    code, out, err = run(capsys, "faces", "--models", str(models_dir), "--json", photos["two"], photos["jeff1"])
    assert code == 0, err
    docs = json.loads(out)
    assert [d["image"] for d in docs] == [photos["two"], photos["jeff1"]]
    assert len(docs[0]["faces"]) == 2 and len(docs[1]["faces"]) == 1
    for face in docs[0]["faces"]:
        assert set(face) == {"box", "score", "landmarks", "quality", "quality_passed",
                             "size_px", "sharpness", "frontal"}
        assert len(face["box"]) == 4 and all(isinstance(v, float) for v in face["box"])
        assert len(face["landmarks"]) == 5 and all(len(p) == 2 for p in face["landmarks"])
        assert 0.7 < face["score"] <= 1.0 and 0.0 <= face["quality"] <= 1.0
        x1, y1, x2, y2 = face["box"]
        assert x1 < x2 and y1 < y2


def test_faces_text_and_annotate(capsys, models_dir, photos, tmp_path):
    out_dir = tmp_path / "annotated"
    code, out, err = run(capsys, "faces", "--models", str(models_dir), photos["two"], "--annotate", str(out_dir))
    assert code == 0, err
    assert "2 faces" in out and "box [" in out and "quality" in out
    written = cv2.imread(str(out_dir / "facerec_two_people.jpg"))
    original = cv2.imread(photos["two"])
    assert written is not None and written.shape == original.shape
    assert np.abs(written.astype(int) - original.astype(int)).sum() > 0  # something drawn


def test_faces_bad_files_reported_per_image(capsys, models_dir, photos, bad_files):
    code, out, err = run(capsys, "faces", "--models", str(models_dir), "--json", bad_files["garbage"],
                         photos["two"], bad_files["text"], bad_files["dir"], bad_files["missing"],
                         photos["dogs"])
    assert code == 2  # unreadable images (the dogs have no face: that alone would be 1)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("edged faces:")]
    assert any(bad_files["garbage"] in ln and "not an image" in ln for ln in lines), err
    assert any(bad_files["text"] in ln and "not an image" in ln for ln in lines), err
    assert any(bad_files["dir"] in ln and "directory" in ln for ln in lines), err
    assert any(bad_files["missing"] in ln and "no such file" in ln for ln in lines), err
    assert any(photos["dogs"] in ln and "no face" in ln for ln in lines), err
    docs = json.loads(out)
    assert len(docs) == 6
    assert len(docs[1]["faces"]) == 2 and "error" not in docs[1]  # the good image still done
    assert all("error" in d for i, d in enumerate(docs) if i != 1)


def test_faces_text_mode_bad_and_good(capsys, models_dir, photos, bad_files):
    code, out, err = run(capsys, "faces", "--models", str(models_dir), bad_files["garbage"], photos["jeff1"])
    assert code == 2
    assert "1 face " in out and bad_files["garbage"] in err


def test_compare_same_and_different(capsys, models_dir, photos):
    code, out, err = run(capsys, "compare", "--models", str(models_dir), photos["jeff1"], photos["jeff2"])
    assert code == 0, err
    assert "same person" in out
    code, out, err = run(capsys, "compare", "--models", str(models_dir), "--json", photos["jeff1"], photos["jack"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["same"] is False and doc["similarity"] < doc["threshold"]
    assert doc["image_a"] == photos["jeff1"] and doc["image_b"] == photos["jack"]
    assert set(doc["face_a"]) >= {"box", "score", "landmarks", "quality", "size_px"}
    code, out, err = run(capsys, "compare", "--models", str(models_dir), "--json", "--flip",
                         "--threshold", "-1", photos["jeff1"], photos["jack"])
    assert code == 0 and json.loads(out)["same"] is True and json.loads(out)["threshold"] == -1


def test_compare_errors(capsys, models_dir, photos, bad_files):
    code, out, err = run(capsys, "compare", "--models", str(models_dir), photos["dogs"], bad_files["text"])
    assert code == 2 and out == ""
    assert "no face found" in err and "not an image" in err and "Traceback" not in err


def test_embed_with_nan_rows(capsys, models_dir, photos, bad_files, tmp_path):
    out_file = tmp_path / "emb.npy"
    images = [photos["jeff1"], photos["dogs"], bad_files["garbage"], photos["jeff2"], photos["two"]]
    code, out, err = run(capsys, "embed", "--models", str(models_dir), *images, "--out", str(out_file))
    assert code == 2  # the garbage file (a face-less image alone would be 1)
    arr = np.load(out_file)
    assert arr.shape == (5, 192) and arr.dtype == np.float32
    assert np.isnan(arr[1]).all() and np.isnan(arr[2]).all()
    for i in (0, 3, 4):
        assert np.isfinite(arr[i]).all() and np.linalg.norm(arr[i]) == pytest.approx(1.0, abs=1e-5)
    assert float(arr[0] @ arr[3]) > 0.42  # the two photos of Jeff
    assert "row 1 is NaN" in err and "row 2 is NaN" in err and "no face found" in err
    assert "wrote" in out


def test_embed_all_good_and_bad_out(capsys, models_dir, photos, tmp_path):
    out_file = tmp_path / "ok.npy"
    code, out, err = run(capsys, "embed", "--models", str(models_dir), photos["jeff1"], "--out", str(out_file))
    assert code == 0, err
    assert np.load(out_file).shape == (1, 192)
    code, out, err = run(capsys, "embed", "--models", str(models_dir), photos["jeff1"], "--out",
                         str(tmp_path / "no" / "dir" / "x.npy"))
    assert code == 2 and "does not exist" in err
    code, out, err = run(capsys, "embed", "--models", str(models_dir), photos["jeff1"], "--out", str(tmp_path / "x.txt"))
    assert code == 2 and ".npy" in err


def test_missing_models_is_a_clear_error(capsys, tmp_path, photos):
    code, out, err = run(capsys, "faces", "--models", str(tmp_path / "nomodels"), photos["two"])
    assert code == 2 and "missing" in err and "Traceback" not in err


def test_help_states_exit_status(capsys):
    for cmd in ("faces", "compare", "embed"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "exit status:\n  0  " in out and "  1  some images had no face" in out
        assert "  2  bad usage, an image that cannot be read" in out


@pytest.mark.parametrize("argv,message", [
    (["compare", "a.jpg", "b.jpg", "--threshold", "5"],
     "argument --threshold: must be a cosine similarity in [-1, 1], got 5"),
    (["compare", "a.jpg", "b.jpg", "--threshold", "nan"],
     "argument --threshold: must be a cosine similarity in [-1, 1], got nan"),
    (["identify", "--gallery", "g.edgal", "a.jpg", "--min-margin", "nan"],
     "argument --min-margin: must be in [0, 2], got nan"),
    (["compare", "a.jpg", "b.jpg", "--threshold", "x"], "argument --threshold: not a number: 'x'"),
])
def test_thresholds_out_of_range_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
