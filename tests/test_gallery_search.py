"""Gallery search: top-k identities by best row, threshold and margin decisions."""
from __future__ import annotations

import numpy as np
import pytest

from edged.gallery import search as G  # the module that reads the names patched below
from edged.gallery import Gallery, MatchSettings, decide, write_gallery

SHA = "ab" * 32


def brute(emb, ri, n_id, q):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ e.T
    out = np.full((len(q), n_id), -np.inf)
    for r in range(len(e)):
        out[:, ri[r]] = np.maximum(out[:, ri[r]], s[:, r])
    return out


@pytest.fixture(params=["float32", "float16", "float16-opencv", "float16-numpy"])
def gal(tmp_path, request, monkeypatch):
    # small blocks so that several blocks and a partial last block are exercised
    monkeypatch.setattr(G, "BLOCK_ROWS", 64)
    monkeypatch.setattr(G, "F32_BLOCK_ROWS", 48)
    monkeypatch.setattr(G, "MIN_THREAD_ROWS", 1)  # threads split even these 420 rows
    rng = np.random.default_rng(3)
    n_id = 120
    ri = np.concatenate([np.arange(n_id), rng.integers(0, n_id, 300)])
    emb = rng.standard_normal((len(ri), 192)).astype(np.float32)
    p = tmp_path / "g.edgal"
    dtype = request.param.split("-")[0]
    if "-" in request.param:  # float16 widened per block, without the compiled scan
        monkeypatch.setattr(G, "_scan_ext", None)
    if request.param.endswith("-numpy"):  # float16 widened by numpy, not OpenCV
        monkeypatch.setattr(G, "_CV_WIDEN", False)
    write_gallery(p, [(f"id{j}", f"name{j}") for j in range(n_id)], ri, emb, SHA, dtype=dtype)
    return p, ri, emb, n_id, dtype


@pytest.mark.parametrize("chunk_rows", [65536, 100, 7])
@pytest.mark.parametrize("threads", [1, 2])
def test_search_matches_brute_force(gal, threads, chunk_rows, monkeypatch):
    # chunk_rows 100 cuts the 420 rows into 5 chunks, 7 into one identity per chunk or so:
    # each chunk's own top k is merged into the right overall top k
    monkeypatch.setattr(G, "CHUNK_ROWS", chunk_rows)
    p, ri, emb, n_id, dtype = gal
    rng = np.random.default_rng(4)
    q = np.concatenate([emb[[0, 5, 200]], rng.standard_normal((5, 192)).astype(np.float32)])
    want = brute(emb, ri, n_id, q)
    tol = 1e-5 if dtype == "float32" else 3e-3
    with Gallery.open(p, threads=threads) as g:
        got = g.identity_scores(q)
        assert np.allclose(got, want, atol=tol)
        for one in range(len(q)):  # a single query takes the gemv path
            assert np.allclose(g.identity_scores(q[one]), want[one], atol=tol)
        res = g.search(q, k=5)
        for i, r in enumerate(res):
            assert len(r) == 5
            assert [s for _, _, s in r] == sorted((s for _, _, s in r), reverse=True)
            assert r[0][0] == f"id{int(np.argmax(want[i]))}" or \
                abs(r[0][2] - want[i].max()) < tol
            assert abs(r[0][2] - want[i].max()) < tol
            assert np.allclose([s for _, _, s in r], np.sort(want[i])[::-1][:5], atol=tol)
            assert all(ident == f"id{int(ident[2:])}" and name == f"name{ident[2:]}"
                       for ident, name, _ in r)
        # queries that are enrolled rows find their identity with score ~1
        for i, row in enumerate([0, 5, 200]):
            assert res[i][0][0] == f"id{ri[row]}" and res[i][0][2] > 0.99


def test_k_larger_than_identities(gal):
    p, ri, emb, n_id, _ = gal
    with Gallery.open(p) as g:
        assert len(g.search(emb[:2], k=1000)[0]) == n_id


def test_bad_queries(gal):
    p, *_ = gal
    with Gallery.open(p) as g:
        with pytest.raises(ValueError, match=r"\(n, 192\)"):
            g.search(np.ones(128))
        with pytest.raises(ValueError, match="finite and non-zero"):
            g.search(np.zeros(192))
        with pytest.raises(ValueError, match="finite and non-zero"):
            g.search(np.full(192, np.nan))


def test_match_threshold_and_margin():
    cands = [("a", "Ann", 0.62), ("b", "Bob", 0.58), ("c", "Cy", 0.1)]
    m = decide(cands, MatchSettings(threshold=0.5))
    assert (m.name, m.identity) == ("Ann", "a")
    assert m.score == 0.62 and abs(m.margin - 0.04) < 1e-9
    assert m.candidates == [("Ann", 0.62), ("Bob", 0.58), ("Cy", 0.1)]
    m = decide(cands, MatchSettings(threshold=0.5, min_margin=0.05))
    assert m.name is None and m.identity is None and m.score == 0.62  # ambiguous: unknown
    m = decide(cands, MatchSettings(threshold=0.7))
    assert m.name is None and m.score == 0.62  # unknown keeps its best score
    m = decide(cands[:1], MatchSettings(threshold=0.5, min_margin=0.3))
    assert m.name == "Ann" and m.margin == 0.62  # no second identity: margin = score
    assert decide([], MatchSettings()).name is None
    m = decide([("a", "Ann", -0.2)], MatchSettings(threshold=-0.5))
    assert m.name == "Ann" and m.margin == -0.2  # min_margin 0: the margin is not checked


def test_match_on_gallery(gal):
    p, ri, emb, n_id, _ = gal
    with Gallery.open(p) as g:
        rng = np.random.default_rng(9)
        ms = g.match(np.concatenate([emb[:1], rng.standard_normal((1, 192))]),
                     MatchSettings(threshold=0.5, top_k=3))
        assert ms[0].identity == f"id{ri[0]}" and len(ms[0].candidates) == 3
        assert ms[1].name is None and ms[1].score < 0.5


def test_match_settings_metadata():
    import dataclasses
    for f in dataclasses.fields(MatchSettings):
        assert "help" in f.metadata
    s = MatchSettings()
    assert s.threshold is None and -1 <= s.cutoff <= 1 and s.min_margin == 0.0 and s.top_k == 5


@pytest.mark.parametrize("opencv", [True, False])
def test_f16_widening_is_exact(opencv, monkeypatch):
    if opencv:
        assert G._cv_widen_ok(), "OpenCV here converts float16 arrays (the fast path)"
    monkeypatch.setattr(G, "_CV_WIDEN", opencv)  # False: the numpy bit operations
    vals = np.array([0.0, -0.0, 1.0, -1.0, 6.0e-8, -6.1e-5, 3.0e-5, 0.5, 65504.0, -2.0 ** -14],
                    dtype=np.float16)
    block = np.tile(vals, (3, 1))
    out = np.empty((4, 10), np.float32)
    tmp = np.empty((4, 10), np.uint32)
    got = G._widen_f16(block, out, tmp)
    assert np.array_equal(got, block.astype(np.float32))
    assert np.array_equal(np.signbit(got), np.signbit(block))


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_topk_identities_equal_brute_force(gal, k):
    """The whole top-k list, not only the best: identities and scores of a brute force."""
    p, ri, emb, n_id, dtype = gal
    q = np.random.default_rng(9).standard_normal((6, 192)).astype(np.float32)
    want = brute(emb, ri, n_id, q)
    tol = 1e-5 if dtype == "float32" else 3e-3
    with Gallery.open(p) as g:
        for i, r in enumerate(g.search(q, k=k)):
            order = np.argsort(-want[i], kind="stable")[:k]
            assert np.allclose([s for _, _, s in r], want[i][order], atol=tol)
            assert {ident for ident, _, _ in r} == {f"id{j}" for j in order} or dtype == "float16"


def test_small_galleries_are_not_split_over_threads(tmp_path, monkeypatch):
    """``threads`` splits a scan only where each thread gets MIN_THREAD_ROWS rows: a small
    gallery is scanned in one piece (no hand-over to the pool), a large one in several."""
    monkeypatch.setattr(G, "MIN_THREAD_ROWS", 100)
    rng = np.random.default_rng(12)
    for rows, want in ((150, 1), (200, 2), (450, 2)):
        p = tmp_path / f"g{rows}.edgal"
        emb = rng.standard_normal((rows, 192)).astype(np.float32)
        write_gallery(p, [(f"i{j}", f"n{j}") for j in range(rows)], np.arange(rows), emb, SHA)
        with Gallery.open(p, threads=2) as g:
            assert len(g._chunks()) == want, rows
            assert g.search(emb[7])[0][0][0] == "i7"


@pytest.mark.parametrize("variant", ["float32", "float16", "float16-opencv"])
def test_an_identity_without_rows_scores_minus_inf_on_every_path(tmp_path, monkeypatch,
                                                                  variant):
    """Only a file opened unverified can have one (the full check refuses it): it is never a
    candidate, and no path lends it a neighbour's row."""
    from edged.gallery import GalleryError

    dtype = variant.split("-")[0]
    if "-" in variant:
        monkeypatch.setattr(G, "_scan_ext", None)
    e = np.eye(4, 192, dtype=np.float32)
    p = tmp_path / "g.edgal"
    write_gallery(p, [("a", "A"), ("b", "B"), ("c", "C")], [0, 0, 1, 2], e, SHA, dtype=dtype)
    raw = p.read_bytes()
    old = np.array([0, 2, 3, 4], "<u8").tobytes()
    assert raw.count(old) == 1
    p.write_bytes(raw.replace(old, np.array([0, 2, 2, 4], "<u8").tobytes()))  # b: no rows
    with pytest.raises(GalleryError):
        Gallery.open(p)
    with Gallery.open(p, verify=False) as g:
        s = g.identity_scores(e)
        assert np.isneginf(s[:, 1]).all()
        assert s[0, 0] == 1 and s[2, 2] == 1 and s[3, 2] == 1
        got = g.search(e[2:4], k=3)
        assert [[r[0] for r in hits] for hits in got] == [["c", "a"], ["c", "a"]]
        assert all(np.isfinite(r[2]) for hits in got for r in hits)
