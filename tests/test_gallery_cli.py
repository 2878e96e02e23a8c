"""``edged gallery ...`` and ``edged identify`` on real photos with the real models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edged.runtime import modelstore
from edged.cli import main
from edged.gallery import Gallery, write_gallery


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def embedder_sha(models_dir):
    return modelstore.read_verified("embedder", models_dir)[1]


@pytest.fixture(scope="module")
def enrol_dir(tmp_path_factory, shared_dir):
    dev = shared_dir / "faces" / "dev"
    d = tmp_path_factory.mktemp("people")
    files = {
        "Abdullah_Gul": ["Abdullah_Gul_0001.jpg", "Abdullah_Gul_0002.jpg"],
        "Adrien_Brody": ["Adrien_Brody_0001.jpg", "Adrien_Brody_0002.jpg"],  # 0002: two faces
        "Laura_Bush": ["Laura_Bush_0001.jpg"],
    }
    for person, names in files.items():
        (d / person).mkdir()
        for n in names:
            shutil.copy(dev / person / n, d / person / n)
    # a real photo blurred far below the sharpness minimum: found, but low quality
    import cv2
    img = cv2.imread(str(dev / "Laura_Bush" / "Laura_Bush_0002.jpg"))
    cv2.imwrite(str(d / "Laura_Bush" / "Laura_Bush_blurred.jpg"), cv2.GaussianBlur(img, (0, 0), 5))
    (d / "Nobody").mkdir()
    shutil.copy(shared_dir / "faces" / "multi_face" / "dlib_dogs.jpg", d / "Nobody" / "dogs.jpg")
    (d / "Abdullah_Gul" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (d / "notes.txt").write_text("not a person")
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, enrol_dir, models_dir):
    out = tmp_path_factory.mktemp("g") / "people.edgal"
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as so:
        code = main(["gallery", "build", str(enrol_dir), "-o", str(out), "--models", str(models_dir)])
    return code, out, so.getvalue(), err.getvalue()


def test_build_reports_each_skipped_image(built, embedder_sha):
    code, out, stdout, err = built
    assert code == 0, err
    assert "Adrien_Brody_0002.jpg: 2 faces; took the one nearest the centre" in err
    assert "Laura_Bush_blurred.jpg: low quality face" in err and "skipped" in err
    assert "dogs.jpg: no face found; skipped" in err
    assert "Nobody not enrolled" in err
    assert "broken.jpg: cannot read" in err
    assert "3 people, 5 photos enrolled, 3 skipped" in stdout
    with Gallery.open(out, expect_embedder=embedder_sha) as g:
        assert g.identities == [("Abdullah_Gul", "Abdullah Gul"), ("Adrien_Brody", "Adrien Brody"),
                                ("Laura_Bush", "Laura Bush")]
        assert g.rows == 5 and g.dtype_name == "float32"
    assert [p.name for p in out.parent.iterdir()] == ["people.edgal"]  # no temp file left


def test_list_and_info(built, capsys, embedder_sha):
    _, out, _, _ = built
    code, so, _ = run(capsys, "gallery", "list", out)
    assert code == 0
    assert so.split("\n")[0].split() == ["Abdullah_Gul", "2", "Abdullah", "Gul"]
    code, so, _ = run(capsys, "gallery", "list", out, "--json")
    assert json.loads(so)[2] == {"id": "Laura_Bush", "name": "Laura Bush", "rows": 1}
    code, so, _ = run(capsys, "gallery", "info", out)
    assert code == 0
    assert f"embedder sha256 {embedder_sha}" in so and " OK (" in so
    assert "5 rows x 192 float32" in so and "identities      3 (rows each: 1..2)" in so
    assert "search          float32 matrix product (numpy's BLAS)" in so
    code, so, _ = run(capsys, "gallery", "info", out, "--json")
    info = json.loads(so)
    assert info["check"] == "OK" and info["identities"] == 3 and info["embedder_sha256"] == embedder_sha
    assert info["scan"] == "blas"


def test_identify(built, capsys, shared_dir, models_dir):
    _, out, _, _ = built
    dev = shared_dir / "faces" / "dev"
    imgs = [dev / "Abdullah_Gul" / "Abdullah_Gul_0005.jpg",
            dev / "Adrien_Brody" / "Adrien_Brody_0003.jpg",
            dev / "unknown" / "AJ_Cook__AJ_Cook_0001.jpg",
            shared_dir / "faces" / "multi_face" / "deepface_couple.jpg"]
    code, so, err = run(capsys, "identify", "--gallery", out, *imgs, "--json", "--models", models_dir)
    assert code == 0, err
    res = json.loads(so)
    assert [r["image"] for r in res] == [str(p) for p in imgs]
    gul = res[0]["faces"]
    assert len(gul) == 1 and gul[0]["name"] == "Abdullah Gul" and gul[0]["score"] > 0.6
    assert set(gul[0]) >= {"box", "name", "score", "margin"} and len(gul[0]["box"]) == 4
    assert gul[0]["margin"] > 0.3
    brody = max(res[1]["faces"], key=lambda f: f["score"])
    assert brody["name"] == "Adrien Brody"
    stranger = res[2]["faces"]
    assert len(stranger) == 1 and stranger[0]["name"] is None and stranger[0]["score"] < 0.58
    assert len(res[3]["faces"]) == 2 and all(f["name"] is None for f in res[3]["faces"])
    # text output, and an unreadable image among good ones: reported, status 2
    code, so, err = run(capsys, "identify", "--gallery", out, imgs[0], "/nonexistent.jpg",
                        "--models", models_dir)
    assert code == 2
    assert "Abdullah_Gul_0005.jpg: face 1 [" in so and "Abdullah Gul  score 0." in so
    assert "/nonexistent.jpg: no such file" in err
    # a threshold above every score: unknown with the best candidate shown
    code, so, _ = run(capsys, "identify", "--gallery", out, imgs[0], "--threshold", "0.99",
                      "--models", models_dir)
    assert code == 0 and "unknown  (best Abdullah Gul 0." in so


def test_identify_refuses_gallery_of_another_embedder(tmp_path, capsys, models_dir, shared_dir):
    g = tmp_path / "other.edgal"
    write_gallery(g, [("a", "A")], [0], np.ones((1, 192), np.float32), "cd" * 32)
    code, _, err = run(capsys, "identify", "--gallery", g,
                       shared_dir / "faces" / "dev" / "Abdullah_Gul" / "Abdullah_Gul_0005.jpg",
                       "--models", models_dir)
    assert code == 2
    assert f"{g}: made by embedder sha256 {'cd' * 32}, the running embedder is" in err
    code, _, err = run(capsys, "identify", "--gallery", tmp_path / "missing.edgal", "x.jpg",
                       "--models", models_dir)
    assert code == 2 and "missing.edgal: no such file" in err


def test_add_and_remove(tmp_path, capsys, shared_dir, models_dir, embedder_sha):
    dev = shared_dir / "faces" / "dev"
    g = tmp_path / "g.edgal"
    code, so, err = run(capsys, "gallery", "add", g, "Al Sharpton",
                        dev / "Al_Sharpton" / "Al_Sharpton_0001.jpg", "--models", models_dir)
    assert code == 0, err
    assert "enrolled Al Sharpton (Al_Sharpton): 1 photo(s)" in so
    code, so, err = run(capsys, "gallery", "add", g, "Abdullah Gul",
                        dev / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg",
                        dev / "Abdullah_Gul" / "Abdullah_Gul_0002.jpg", "--models", models_dir)
    assert code == 0 and "now has 2 people, 3 rows" in so
    code, so, err = run(capsys, "gallery", "add", g, "Al_Sharpton",  # by id: adds rows
                        dev / "Al_Sharpton" / "Al_Sharpton_0002.jpg", "--models", models_dir)
    assert code == 0 and "added to Al Sharpton (Al_Sharpton): 1 photo(s)" in so
    with Gallery.open(g, expect_embedder=embedder_sha) as gal:
        assert gal.identities == [("Al_Sharpton", "Al Sharpton"), ("Abdullah_Gul", "Abdullah Gul")]
        assert gal.rows_of(0) == (0, 2)
        before = gal.checksum
    # nothing usable: the file is left as it was
    code, _, err = run(capsys, "gallery", "add", g, "Dogs",
                       shared_dir / "faces" / "multi_face" / "dlib_dogs.jpg", "--models", models_dir)
    assert code == 1 and "no face found" in err and "unchanged" in err
    with Gallery.open(g) as gal:
        assert gal.checksum == before
    code, so, err = run(capsys, "gallery", "remove", g, "Al Sharpton")
    assert code == 0 and "removed Al Sharpton (Al_Sharpton, 2 rows)" in so
    code, _, err = run(capsys, "gallery", "remove", g, "Abdulah Gul")
    assert code == 1 and "no identity with id or name 'Abdulah Gul'" in err
    assert "did you mean 'Abdullah Gul'" in err
    with Gallery.open(g) as gal:
        assert gal.identities == [("Abdullah_Gul", "Abdullah Gul")] and gal.rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.edgal"]


def test_errors_name_the_file(tmp_path, capsys, models_dir, shared_dir):
    bad = tmp_path / "bad.edgal"
    bad.write_bytes(b"")
    for argv in (["gallery", "info", bad], ["gallery", "list", bad],
                 ["gallery", "remove", bad, "x"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and f"{bad}: empty file (0 bytes)" in err
    d = tmp_path / "dir.edgal"
    d.mkdir()
    code, _, err = run(capsys, "gallery", "info", d)
    assert code == 1 and "is a directory, not a gallery file" in err
    # a checksum failure (a row replaced by another unit vector) is reported with status 1
    g = tmp_path / "g.edgal"
    write_gallery(g, [("a", "A")], [0], np.ones((1, 192), np.float32), "cd" * 32)
    v = np.zeros(192, np.float32)
    v[0] = 1.0
    raw = bytearray(g.read_bytes())
    raw[-192 * 4:] = v.astype("<f4").tobytes()
    g.write_bytes(bytes(raw))
    code, so, _ = run(capsys, "gallery", "info", g)
    assert code == 1 and "checksum        " in so and "FAILED: checksum mismatch" in so
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "gallery", "build", empty, "-o", tmp_path / "x.edgal",
                       "--models", models_dir)
    assert code == 1 and "no person folders with images" in err
    one = tmp_path / "one" / "Abdullah_Gul"
    one.mkdir(parents=True)
    shutil.copy(shared_dir / "faces" / "dev" / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg", one)
    code, _, err = run(capsys, "gallery", "build", one.parent, "-o",
                       tmp_path / "g.edgal" / "x.edgal", "--models", models_dir)
    assert code == 2 and f"g.edgal/x.edgal: {tmp_path / 'g.edgal'} is not a directory" in err
    code, _, err = run(capsys, "gallery", "build", tmp_path / "nope", "-o", tmp_path / "x.edgal")
    assert code == 2 and "not a directory" in err
    assert not (tmp_path / "x.edgal").exists()


def test_bad_options_and_foreign_gallery(tmp_path, capsys, models_dir, shared_dir):
    img = shared_dir / "faces" / "dev" / "Abdullah_Gul" / "Abdullah_Gul_0005.jpg"
    g = tmp_path / "g.edgal"
    write_gallery(g, [("a", "A")], [0], np.ones((1, 192), np.float32), "cd" * 32)
    code, _, err = run(capsys, "identify", "--gallery", g, img, "--threshold", "1.5")
    assert code == 2 and "--threshold must be in [-1, 1], got 1.5" in err
    code, _, err = run(capsys, "identify", "--gallery", g, img, "--top-k", "0")
    assert code == 2 and "--top-k must be at least 1" in err
    code, _, err = run(capsys, "identify", "--gallery", g, img, "--threads", "0")
    assert code == 2 and "--threads must be at least 1" in err
    before = g.read_bytes()
    code, _, err = run(capsys, "gallery", "add", g, "Abdullah Gul", img, "--models", models_dir)
    assert code == 1 and f"{g}: made by embedder sha256 {'cd' * 32}" in err and "rebuild" in err
    assert g.read_bytes() == before


def _crafted(tmp_path, name, edits, n_id=0):
    from gallery_craft import craft

    p = tmp_path / name
    write_gallery(p, [(f"p{j}", f"P {j}") for j in range(n_id)], np.arange(n_id),
                  np.eye(n_id, 192, dtype=np.float32), "cd" * 32)
    return craft(p, edits(p) if callable(edits) else edits)


def test_crafted_files_with_valid_checksums_give_one_line_and_no_traceback(tmp_path, capsys):
    """gallery info/list on crafted files: once MemoryError (no rows, a dimension of 4e9),
    OverflowError (created 1e308), IndexError (row starts out of order)."""
    import struct

    from gallery_craft import section

    huge = _crafted(tmp_path, "huge.edgal", [(16, struct.pack("<I", 2 ** 32 - 1))])
    nan = _crafted(tmp_path, "nan.edgal", [(36, struct.pack("<d", float("nan")))])
    starts = _crafted(tmp_path, "starts.edgal",
                      lambda p: [(section(p, "rs") + 8, struct.pack("<Q", 100))], n_id=3)
    utf8 = _crafted(tmp_path, "utf8.edgal", lambda p: [(section(p, "s"), b"\xff")], n_id=3)
    cases = [(huge, "invalid embedding dimension 4294967295"),
             (nan, "invalid creation time nan"), (starts, "row starts are not increasing"),
             (utf8, "identity 0: invalid UTF-8")]
    for path, why in cases:
        for action in ("info", "list"):
            code, out, err = run(capsys, "gallery", action, path)
            assert code == 1, (action, path, out, err)
            if action == "info" and path == utf8:  # the header is good: the check says it
                assert f"FAILED: {why}" in out and err == ""
                continue
            assert err.startswith(f"edged gallery {action}: {path}: {why}"), err
            assert err.count("\n") == 1 and out == ""
    far = _crafted(tmp_path, "far.edgal", [(36, struct.pack("<d", 1e308))])
    code, out, err = run(capsys, "gallery", "info", far)
    assert code == 0 and "created         1e+308 (not a valid date)" in out, (out, err)


def test_a_file_that_is_no_gallery_is_not_quoted(tmp_path, capsys):
    p = tmp_path / "passwd.edgal"
    p.write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, out, err = run(capsys, "gallery", "info", p)
    assert code == 1 and err == f"edged gallery info: {p}: not an edged gallery (wrong magic)\n"
