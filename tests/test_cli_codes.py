"""What a user sees of ``edged faces | compare | embed | identify`` on the public photos (core
tier): the same facts in text and JSON, each error said once and in one place, and exit
statuses that tell "no face in a photo" (1) from "could not read or run" (2); and ``edged
status`` on a video file that has ended."""
from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest

from conftest import wait_for
from edged.cli import main
from edged_daemon_helpers import DaemonProcess, build_gallery, write_config


def run(capsys, *argv):
    code = main([str(a) for a in argv] + ["--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(public_photos, tmp_path_factory):
    """The public photos, and two without a face: the lower left of zidane.jpg (grass and
    legs) and a blank grey image, both written by cv2; and a file that is no image."""
    d = tmp_path_factory.mktemp("noface")
    zidane = cv2.imread(str(public_photos / "zidane.jpg"))
    cv2.imwrite(str(d / "grass.jpg"), zidane[400:, :500])
    cv2.imwrite(str(d / "blank.png"), np.full((240, 320, 3), 128, np.uint8))
    (d / "notes.txt").write_text("not an image\n")
    p = {n: public_photos / f"{n}.jpg" for n in ("obama", "obama2", "biden", "zidane")}
    p.update(grass=d / "grass.jpg", blank=d / "blank.png", text=d / "notes.txt",
             missing=d / "missing.jpg")
    return p


@pytest.fixture(scope="module")
def gallery(public_enrol, tmp_path_factory):
    return build_gallery(public_enrol, tmp_path_factory.mktemp("codes") / "people.edgal")


# ---------------------------------------------------------------------------- item 4


def test_faces_json_has_the_quality_parts_the_text_shows(capsys, models_dir, photos):
    """zidane.jpg: two faces, one of them below the minimums (turned away)."""
    code, text, err = run(capsys, "faces", "--models", models_dir, photos["zidane"])
    assert code == 0, err
    code, out, err = run(capsys, "faces", "--models", models_dir, "--json", photos["zidane"])
    assert code == 0, err
    faces = json.loads(out)[0]["faces"]
    lines = re.findall(r"quality ([\d.]+) \(size (\d+) px, sharpness (\d+), frontal ([\d.]+)"
                       r"(, below the minimums)?\)", text)
    assert len(lines) == len(faces) == 2, text
    for f, (q, size, sharp, frontal, below) in zip(faces, lines):
        assert set(f) == {"box", "score", "landmarks", "quality", "quality_passed", "size_px",
                          "sharpness", "frontal"}
        assert f"{f['quality']:.2f}" == q and f"{f['size_px']:.0f}" == size
        assert f"{f['sharpness']:.0f}" == sharp and f"{f['frontal']:.2f}" == frontal
        assert f["quality_passed"] is (not below)
    assert [f["quality_passed"] for f in faces].count(False) == 1


def test_compare_json_faces_have_the_quality_parts(capsys, models_dir, photos):
    code, out, err = run(capsys, "compare", "--models", models_dir, "--json", photos["obama"],
                         photos["obama2"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["same"] is True
    for key in ("face_a", "face_b"):
        assert doc[key]["quality_passed"] is True and doc[key]["size_px"] > 100
        assert doc[key]["sharpness"] > 0 and 0 < doc[key]["frontal"] <= 1


# ---------------------------------------------------------------------------- item 6


def test_faces_exit_status_tells_no_face_from_unreadable(capsys, models_dir, photos):
    code, _, err = run(capsys, "faces", "--models", models_dir, photos["obama"])
    assert code == 0, err
    code, out, err = run(capsys, "faces", "--models", models_dir, photos["obama"],
                         photos["grass"], photos["blank"])
    assert code == 1, err
    assert "obama.jpg: 1 face" in out and f"{photos['grass']}: no face found" in err
    assert f"{photos['blank']}: no face found" in err
    code, out, err = run(capsys, "faces", "--models", models_dir, photos["grass"],
                         photos["text"], photos["obama"])
    assert code == 2  # an unreadable image outranks a face-less one
    assert "obama.jpg: 1 face" in out and f"{photos['text']}: not an image" in err


def test_embed_exit_status(capsys, models_dir, photos, tmp_path):
    npy = tmp_path / "e.npy"
    code, out, err = run(capsys, "embed", "--models", models_dir, photos["obama"],
                         photos["grass"], "--out", npy)
    assert code == 1 and "1 embedded, 1 without a face" in out, err
    arr = np.load(npy)
    assert np.isfinite(arr[0]).all() and np.isnan(arr[1]).all()
    code, out, err = run(capsys, "embed", "--models", models_dir, photos["obama"],
                         photos["missing"], "--out", npy)
    assert code == 2 and "no such file" in err and "(row 1 is NaN)" in err
    code, _, err = run(capsys, "embed", "--models", models_dir, photos["obama"], "--out", npy)
    assert code == 0, err


def test_compare_exit_status(capsys, models_dir, photos):
    code, out, err = run(capsys, "compare", "--models", models_dir, photos["obama"],
                         photos["biden"])
    assert code == 0 and "different people" in out, err  # 0 whatever the verdict
    code, out, err = run(capsys, "compare", "--models", models_dir, photos["obama"],
                         photos["grass"])
    assert code == 1 and out == "" and f"{photos['grass']}: no face found" in err
    code, out, err = run(capsys, "compare", "--models", models_dir, photos["grass"],
                         photos["text"])
    assert code == 2 and out == "" and "not an image" in err


def test_identify_exit_status(capsys, models_dir, photos, gallery):
    code, out, err = run(capsys, "identify", "--gallery", gallery, "--models", models_dir,
                         photos["obama"], photos["biden"])
    assert code == 0, err
    assert "obama.jpg: face 1 [" in out and "Barack Obama  score" in out
    code, out, err = run(capsys, "identify", "--gallery", gallery, "--models", models_dir,
                         photos["obama"], photos["blank"])
    assert code == 1 and f"{photos['blank']}: no face" in out, err
    code, out, err = run(capsys, "identify", "--gallery", gallery, "--models", models_dir,
                         photos["blank"], photos["missing"], photos["obama"])
    assert code == 2 and "Barack Obama" in out


@pytest.mark.parametrize("cmd", ["faces", "compare", "embed", "identify"])
def test_each_image_command_lists_its_exit_statuses(capsys, cmd):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    epilog = out[out.index("exit status:"):]
    assert re.search(r"^  0  ", epilog, re.M) and re.search(r"^  1  some images had no face",
                                                             epilog, re.M)
    assert re.search(r"^  2  bad usage, an image that cannot be read", epilog, re.M)


def test_edged_help_lists_the_common_exit_statuses(capsys):
    from edged.commands.run import EX_CONFIG

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    epilog = out[out.index("exit status:"):]
    for code in (0, 1, 2, EX_CONFIG, 130):
        assert re.search(rf"^  {code} +\S", epilog, re.M), (code, epilog)
    assert "78   run, check-config: the configuration is not valid" in epilog


# ---------------------------------------------------------------------------- item 3


def test_identify_says_each_error_once_on_stderr(capsys, models_dir, photos, gallery):
    code, out, err = run(capsys, "identify", "--gallery", gallery, "--models", models_dir,
                         photos["text"], photos["obama"], photos["missing"])
    assert code == 2
    assert "ERROR" not in out and str(photos["text"]) not in out and "missing" not in out
    assert out.count("\n") == 1 and "Barack Obama" in out
    assert err.count(f"{photos['text']}: not an image") == 1
    assert err.count(f"{photos['missing']}: no such file") == 1
    assert err.count("\n") == 2, err


def test_identify_json_errors_only_in_the_document(capsys, models_dir, photos, gallery):
    code, out, err = run(capsys, "identify", "--gallery", gallery, "--models", models_dir,
                         "--json", photos["text"], photos["obama"], photos["blank"])
    assert code == 2
    assert err == ""
    doc = json.loads(out)
    assert set(doc[0]) == {"image", "error"} and doc[0]["image"] == str(photos["text"])
    assert "not an image" in doc[0]["error"]
    assert [f["id"] for f in doc[1]["faces"]] == ["Barack_Obama"] and "error" not in doc[1]
    assert doc[2] == {"image": str(photos["blank"]), "faces": []}


# ---------------------------------------------------------------------------- item 7


@pytest.fixture(scope="module")
def finished_file_daemon(public_clip, tmp_path_factory):
    """``edged run`` on the public clip (as fast as it goes), without --exit-when-done, and
    its state directory once the daemon's status says the file has ended."""
    tmp = tmp_path_factory.mktemp("batch")
    state = tmp / "state"
    cfg = write_config(tmp / "config.yaml", device={"name": "batch"},
                       cameras=[{"name": "door", "source": str(public_clip), "realtime": False}],
                       paths={"state_dir": str(state), "gallery": str(tmp / "none.edgal")},
                       mqtt={"enabled": False}, logging={"target": "stderr", "level": "info"})
    d = DaemonProcess(cfg, tmp)

    def ended():
        try:
            doc = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return (doc.get("cameras") or {}).get("door", {}).get("finished") is True

    try:
        assert wait_for(lambda: ended() or d.proc.poll() is not None, 180), d.log()[-3000:]
        assert d.proc.poll() is None, d.log()[-3000:]  # still running: no --exit-when-done
        yield d, state
    finally:
        if d.proc.poll() is None:
            d.terminate()
        d.kill()


def test_status_of_an_ended_file_camera_says_it_finished(finished_file_daemon, capsys):
    d, state = finished_file_daemon
    assert "camera door: end of file" in d.log()
    code = main(["status", "--state-dir", str(state), "--json"])
    cam = json.loads(capsys.readouterr().out)["cameras"]["door"]
    assert code == 0
    assert cam["finished"] is True and cam["connected"] is False and cam["kind"] == "file"
    assert cam["frames_read"] == 100


def test_status_text_of_an_ended_file_camera_says_it_finished(finished_file_daemon, capsys):
    _, state = finished_file_daemon
    assert main(["status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  camera door: finished \(end of the file, 100 frames\)$", out, re.M), out


@pytest.mark.parametrize("where", ["dir", "missing-dir"])
def test_gallery_build_checks_its_output_before_enrolling(capsys, models_dir, public_enrol,
                                                          tmp_path, where):
    out = tmp_path if where == "dir" else tmp_path / "no" / "g.edgal"
    code, stdout, err = run(capsys, "gallery", "build", public_enrol, "-o", out,
                            "--models", models_dir)
    assert code == 2 and err.count("\n") == 1, err
    assert ("is a directory" if where == "dir" else "does not exist") in err
    assert "enrolled" not in stdout and "/" not in stdout  # no photo was enrolled


def test_identify_threshold_defaults_to_the_embedders(capsys, models_dir, photos, gallery):
    """0.58 for MobileFaceNet (its manifest entry); --threshold still overrides it."""
    args = ["identify", "--gallery", gallery, "--models", models_dir, "--json", photos["obama"]]
    code, out, _ = run(capsys, *args)
    assert code == 0 and json.loads(out)[0]["faces"][0]["id"] == "Barack_Obama"
    code, out, _ = run(capsys, *args, "--threshold", "0.99")
    assert code == 0 and json.loads(out)[0]["faces"][0]["id"] is None
