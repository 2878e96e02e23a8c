"""The compiled float16 scan (``edged.gallery._scan``): the same scores as widening to float32 and a
float32 product, for every kernel, shape and value class; and what it does with bad input."""
from __future__ import annotations

import platform
import shutil
import threading

import numpy as np
import pytest

from edged.gallery import search as G  # the module that reads _scan_ext (patched below)
from edged.gallery import Gallery, write_gallery

try:
    from edged.gallery import _scan as scan
except ImportError:  # not built: the tests below need it, the first says why it is missing
    scan = None
needs_ext = pytest.mark.skipif(scan is None, reason="edged.gallery._scan is not built (no C compiler)")

SHA = "cd" * 32


def reference(m16: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float64 products of the exactly widened rows: what any float32 kernel approximates."""
    return m16.astype(np.float64) @ q.astype(np.float64).T


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def real_embeddings(shared_dir, models_dir):
    """Embeddings of real photos (6 people, 2 photos each) by the real embedder."""
    import cv2

    from edged.vision.pipeline import FacePipeline, central_face
    pipe = FacePipeline.from_models(models_dir)
    dev = shared_dir / "faces" / "dev"
    people = sorted(p for p in dev.iterdir() if p.is_dir() and p.name != "unknown"
                    and len(list(p.glob("*.jpg"))) >= 2)[:6]
    out = []
    for person in people:
        for f in sorted(person.glob("*.jpg"))[:2]:
            img = cv2.imread(str(f))
            face = central_face(pipe.process(img), img.shape)
            assert face is not None and face.embedding is not None, f
            out.append(face.embedding)
    return unit(np.array(out))


def test_the_fast_kernel_is_built_here():
    """Where there is a C compiler the install builds the extension (CI has one); on x86 with
    AVX2 the vector kernel runs, on AArch64 the NEON one."""
    if scan is None:
        assert not (shutil.which("cc") or shutil.which("gcc")), \
            "a C compiler is here but edged.gallery._scan was not built: see the pip install log"
        pytest.skip("no C compiler here: edged.gallery._scan cannot be built")
    assert G.scan_kernel() == G.scan_kernel(128) == G.scan_kernel(192) == scan.KERNEL
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    if platform.machine() in ("x86_64", "AMD64") and all(
            f" {f}" in flags for f in ("avx2", "fma", "f16c")):
        assert scan.KERNEL == "avx2"
    elif platform.machine() in ("aarch64", "arm64"):
        assert scan.KERNEL == "neon"


@needs_ext
def test_real_embeddings_score_as_widened_float32(real_embeddings):
    e = real_embeddings
    m16 = e.astype(np.float16)
    for nq in (1, 2, 3, 8):
        q = np.ascontiguousarray(e[:nq])
        out = np.empty((len(e), nq), np.float32)
        scan.scan_f16(m16, q, out)
        assert np.allclose(out, reference(m16, q), atol=2e-6, rtol=0)
        assert np.allclose(out, m16.astype(np.float32) @ q.T, atol=2e-6, rtol=0)
    # same person scores high, as with float32 storage (2 photos per person, in order)
    s = np.empty((len(e), len(e)), np.float32)
    scan.scan_f16(m16, np.ascontiguousarray(e), s)
    assert np.abs(s - e @ e.T).max() < 2e-3
    assert all(s[i, i + 1] > 0.4 for i in range(0, len(e), 2))


# dims: the usual widths (each has its own compiled copy), a tail, one value, the widest the
# vector kernels take, and past it (the portable C kernel); rows: groups of 4 and remainders;
# queries: pairs and one left
@needs_ext
@pytest.mark.parametrize("dim", [192, 128, 256, 512, 130, 1, 1024, 1100])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 1000])
@pytest.mark.parametrize("nq", [1, 2, 5])
def test_shapes(dim, rows, nq):
    rng = np.random.default_rng(dim * 1000 + rows * 10 + nq)
    m16 = unit(rng.standard_normal((rows, dim))).astype(np.float16)
    q = unit(rng.standard_normal((nq, dim)))
    out = np.full((rows, nq), np.nan, np.float32)
    scan.scan_f16(m16, q, out)
    assert np.allclose(out, reference(m16, q), atol=3e-6, rtol=0)


@needs_ext
def test_special_values_are_widened_exactly():
    """Zeros of both signs, subnormals, the smallest normal, the largest finite value."""
    vals = np.array([0.0, -0.0, 6.0e-8, -6.0e-8, 3.0e-5, -6.1e-5, 2.0 ** -14, 0.5, -1.0,
                     65504.0, -65504.0, 1 / 3], np.float16)
    dim = len(vals)
    m16 = np.tile(vals, (5, 1))
    # one-hot queries read back single values: the widening must be exact
    q = np.eye(dim, dtype=np.float32)
    out = np.empty((5, dim), np.float32)
    scan.scan_f16(m16, q, out)
    assert np.array_equal(out, np.tile(vals.astype(np.float32), (5, 1)))


@needs_ext
def test_views_into_a_mapped_file(tmp_path):
    """The gallery hands the kernel slices of its read-only mapping."""
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((50, 192)).astype(np.float32)
    p = tmp_path / "g.edgal"
    write_gallery(p, [(f"i{j}", f"n{j}") for j in range(50)], np.arange(50), emb, SHA,
                  dtype="float16")
    q = unit(rng.standard_normal((3, 192)))
    with Gallery.open(p) as g:
        assert not g.matrix.flags.writeable
        out = np.empty((20, 3), np.float32)
        scan.scan_f16(g.matrix[10:30], q, out)
        assert np.allclose(out, reference(g.matrix[10:30], q), atol=3e-6)


@needs_ext
def test_bad_arguments_say_what():
    m16 = np.zeros((4, 8), np.float16)
    q = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        scan.scan_f16(m16, np.zeros((1, 9), np.float32), np.empty((4, 1), np.float32))
    with pytest.raises(ValueError, match="shapes do not fit"):
        scan.scan_f16(m16, q, np.empty((3, 1), np.float32))
    with pytest.raises(ValueError, match="matrix: want a C-contiguous 2-D array of float16"):
        scan.scan_f16(m16.astype(np.float32), q, np.empty((4, 1), np.float32))
    with pytest.raises(ValueError, match="matrix: .* of float16, got 2-D of format 'h'"):
        scan.scan_f16(m16.view(np.int16), q, np.empty((4, 1), np.float32))  # same size, not float
    with pytest.raises(ValueError, match="matrix: .* of float16, got 2-D of format '>e'"):
        scan.scan_f16(m16.astype(">f2"), q, np.empty((4, 1), np.float32))  # byte order
    with pytest.raises(ValueError, match="out: .* of float32"):
        scan.scan_f16(m16, q, np.empty((4, 1), np.int32))
    with pytest.raises(ValueError, match="queries"):
        scan.scan_f16(m16, q[0], np.empty((4, 1), np.float32))
    with pytest.raises(ValueError, match="not C-contiguous"):
        scan.scan_f16(np.zeros((4, 16), np.float16)[:, ::2], q, np.empty((4, 1), np.float32))
    ro = np.empty((4, 1), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):  # out must be writable
        scan.scan_f16(m16, q, ro)


def best_reference(m16: np.ndarray, q: np.ndarray, starts: np.ndarray) -> np.ndarray:
    s = reference(m16, q)
    base = int(starts[0])
    return np.array([s[int(a) - base:int(b) - base].max(axis=0) if b > a
                     else np.full(q.shape[0], -np.inf)
                     for a, b in zip(starts[:-1], starts[1:])])


# rows per identity from 1 to 7, so that identities straddle the kernel's 1024-row blocks; a
# slice of a gallery's starts (not from 0); the portable kernel's width (1100)
@needs_ext
@pytest.mark.parametrize("dim", [192, 128, 130, 1100])
@pytest.mark.parametrize("nq", [1, 2, 5])
@pytest.mark.parametrize("base", [0, 37])
def test_best_row_per_identity(dim, nq, base):
    rng = np.random.default_rng(dim + nq + base)
    counts = rng.integers(1, 8, size=900)
    starts = (base + np.concatenate([[0], np.cumsum(counts)])).astype(np.uint64)
    rows = int(counts.sum())
    assert rows > 3 * 1024
    m16 = unit(rng.standard_normal((rows, dim))).astype(np.float16)
    q = unit(rng.standard_normal((nq, dim)))
    out = np.full((len(counts), nq), np.nan, np.float32)
    scan.scan_f16_best(m16, q, starts, out)
    assert np.allclose(out, best_reference(m16, q, starts), atol=3e-6, rtol=0)


@needs_ext
def test_best_row_of_real_faces_and_empty_identities(real_embeddings):
    """Real embeddings, 2 rows a person, with one identity of no rows: that one gets -inf."""
    m16 = real_embeddings.astype(np.float16)
    starts = np.array([0, 2, 4, 4, 6, 8, 10, 12], np.uint64)
    out = np.empty((7, len(real_embeddings)), np.float32)
    scan.scan_f16_best(m16, real_embeddings, starts, out)
    want = best_reference(m16, real_embeddings, starts)
    assert np.allclose(out, want, atol=3e-6, rtol=0) and np.isneginf(out[2]).all()
    # each photo's best identity is its own person
    assert list(np.delete(out, 2, axis=0).argmax(axis=0)) == [j // 2 for j in range(12)]


@needs_ext
def test_best_bad_arguments_say_what():
    m16 = np.zeros((6, 8), np.float16)
    q = np.zeros((1, 8), np.float32)
    out = np.empty((3, 1), np.float32)
    good = np.array([0, 2, 4, 6], np.uint64)
    scan.scan_f16_best(m16, q, good, out)
    with pytest.raises(ValueError, match="must not decrease and must span the 6 rows"):
        scan.scan_f16_best(m16, q, np.array([0, 4, 2, 6], np.uint64), out)
    with pytest.raises(ValueError, match="must span the 6 rows"):
        scan.scan_f16_best(m16, q, np.array([0, 2, 4, 5], np.uint64), out)
    with pytest.raises(ValueError, match="must span the 6 rows"):
        scan.scan_f16_best(m16, q, np.array([9, 2, 4, 6], np.uint64), out)
    with pytest.raises(ValueError, match="starts: want a C-contiguous 1-D array of uint64"):
        scan.scan_f16_best(m16, q, good.astype(np.int64), out)
    with pytest.raises(ValueError, match="starts: want .* got 2-D"):
        scan.scan_f16_best(m16, q, good.reshape(2, 2), out)
    with pytest.raises(ValueError, match="starts: want at least one entry"):
        scan.scan_f16_best(m16, q, np.zeros(0, np.uint64), np.empty((0, 1), np.float32))
    with pytest.raises(ValueError, match="shapes do not fit"):
        scan.scan_f16_best(m16, q, good, np.empty((4, 1), np.float32))
    with pytest.raises(ValueError, match="out: .* of float32"):
        scan.scan_f16_best(m16, q, good, np.empty((3, 1), np.float64))
    with pytest.raises(ValueError, match="matrix: .* of float16"):
        scan.scan_f16_best(m16.astype(np.float32), q, good, out)


@needs_ext
def test_rows_of_no_values_and_out_over_starts_are_safe():
    """Rows of 0 values score 0 (no division by the width); an ``out`` that overlaps
    ``starts`` (the -inf fill rewrites them during the scan) stays inside both arrays."""
    out = np.full((8, 1), np.nan, np.float32)
    scan.scan_f16(np.zeros((8, 0), np.float16), np.zeros((1, 0), np.float32), out)
    assert (out == 0).all()
    best = np.full((2, 1), np.nan, np.float32)
    scan.scan_f16_best(np.zeros((8, 0), np.float16), np.zeros((1, 0), np.float32),
                       np.array([0, 3, 8], np.uint64), best)
    assert (best == 0).all()
    m16 = np.ones((4, 8), np.float16)
    q = np.ones((4, 8), np.float32)
    starts = np.array([0, 4, 0, 0], np.uint64)  # 32 bytes: also out's (1, 4) float32 + slack
    scan.scan_f16_best(m16, q, starts[:2], starts.view(np.float32)[:4].reshape(1, 4))
    assert np.array_equal(starts.view(np.float32)[:4], np.full(4, 8.0, np.float32))


@needs_ext
def test_threads_scan_at_once():
    """The GIL is released: concurrent scans from several threads give the right scores."""
    rng = np.random.default_rng(8)
    m16 = unit(rng.standard_normal((20000, 192))).astype(np.float16)
    q = unit(rng.standard_normal((2, 192)))
    want = reference(m16, q)
    errors = []

    def work(part):
        lo, hi = part * 5000, (part + 1) * 5000
        for _ in range(20):
            out = np.empty((hi - lo, 2), np.float32)
            scan.scan_f16(m16[lo:hi], q, out)
            if not np.allclose(out, want[lo:hi], atol=3e-6):
                errors.append(part)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


@needs_ext
def test_info_and_search_use_the_compiled_scan(tmp_path, capsys, monkeypatch):
    """``edged gallery info`` says how a float16 gallery is searched; a search goes through
    the kernel and gives the scores of the per-block path it replaces."""
    from edged.cli import main
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((40, 192)).astype(np.float32)
    ri = np.repeat(np.arange(20), 2)
    p = tmp_path / "g.edgal"
    write_gallery(p, [(f"i{j}", f"n{j}") for j in range(20)], ri, emb, SHA, dtype="float16")
    assert main(["gallery", "info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "search          compiled float16 scan" in out, out
    q = unit(rng.standard_normal((3, 192)))
    calls = []
    real = scan.scan_f16

    class Spy:
        KERNEL = scan.KERNEL
        MAX_DIM = scan.MAX_DIM

        @staticmethod
        def scan_f16(*a):
            calls.append(a[0].shape)
            return real(*a)

    with Gallery.open(p) as g:
        assert g.info()["scan"] == scan.KERNEL
        monkeypatch.setattr(G, "_scan_ext", Spy)
        fast = g.identity_scores(q)
        assert calls == [(40, 192)]
        monkeypatch.setattr(G, "_scan_ext", None)
        slow = g.identity_scores(q)
    assert np.allclose(fast, slow, atol=1e-6)


def test_only_the_vector_kernels_serve_galleries(tmp_path, monkeypatch):
    """The portable C loop (no AVX2, 32-bit ARM, rows wider than MAX_DIM) is slower than
    widening blocks with OpenCV, so a gallery then takes the per-block path, and says so."""
    rng = np.random.default_rng(7)
    wide = scan.MAX_DIM + 8
    emb = rng.standard_normal((6, wide)).astype(np.float32)
    p = tmp_path / "wide.edgal"
    write_gallery(p, [(f"i{j}", f"n{j}") for j in range(6)], np.arange(6), emb, SHA,
                  dtype="float16")
    with Gallery.open(p, expect_dim=wide) as g:
        assert g.scan == "opencv"
        assert g.search(emb[3])[0][0][0] == "i3"
    assert G.scan_kernel(192) == scan.KERNEL

    class Portable:
        KERNEL = "c"
        MAX_DIM = scan.MAX_DIM

        @staticmethod
        def scan_f16(*a):
            raise AssertionError("the portable kernel must not serve a gallery")

    monkeypatch.setattr(G, "_scan_ext", Portable)
    assert G.scan_kernel(192) == "opencv"
    p2 = tmp_path / "g.edgal"
    write_gallery(p2, [(f"i{j}", f"n{j}") for j in range(6)], np.arange(6), emb[:, :192], SHA,
                  dtype="float16")
    with Gallery.open(p2) as g:
        assert g.scan == "opencv" and g.search(emb[2, :192])[0][0][0] == "i2"
