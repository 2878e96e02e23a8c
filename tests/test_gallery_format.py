"""The gallery file format: round trip, and a clear GalleryError for every kind of damage."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from edged.gallery import format as G  # the file layout: header size, struct, crc offset
from edged.gallery import Gallery, GalleryError, write_gallery

SHA = "ab" * 32
OTHER = "cd" * 32


def make(path, n_id=5, per=3, dim=192, dtype="float32", seed=0, sha=SHA):
    rng = np.random.default_rng(seed)
    ids = [(f"id{j}", f"Person {j} é") for j in range(n_id)]
    ri = np.repeat(np.arange(n_id), per)
    rng.shuffle(ri)  # the writer groups rows by identity
    emb = rng.standard_normal((len(ri), dim)).astype(np.float32)
    write_gallery(path, ids, ri, emb, sha, dtype=dtype)
    return ids, ri, emb


def patch(path, offset, data: bytes, fix_crc=True):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    if fix_crc and offset < G.HEADER_SIZE:
        struct.pack_into("<I", b, G._CRC_AT, zlib.crc32(bytes(b[:G._CRC_AT])))
    path.write_bytes(bytes(b))


def reason(path, **kw) -> str:
    with pytest.raises(GalleryError) as ei:
        Gallery.open(path, **kw)
    assert str(path) in str(ei.value)
    return ei.value.reason


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    p = tmp_path / "g.edgal"
    ids, ri, emb = make(p, dtype=dtype)
    with Gallery.open(p, expect_embedder=SHA) as g:
        assert g.identities == ids
        assert (g.rows, g.n_identities, g.dim, g.dtype_name) == (15, 5, 192, dtype)
        assert g.embedder_sha256 == SHA and len(g.checksum) == 64
        assert g.matrix.ctypes.data % 64 == 0  # aligned, zero-copy
        assert np.all(np.diff(g.row_identity.astype(int)) >= 0)  # grouped by identity
        tol = 1e-6 if dtype == "float32" else 2e-3
        for j in range(5):
            a, b = g.rows_of(j)
            stored = np.array(g.matrix[a:b], dtype=np.float32)
            mine = emb[ri == j] / np.linalg.norm(emb[ri == j], axis=1, keepdims=True)
            assert np.allclose(stored, mine, atol=tol)
        info = g.info()
        assert info["rows"] == 15 and info["checksum"] == g.checksum


def test_file_size_and_open_is_lazy(tmp_path):
    p = tmp_path / "g.edgal"
    make(p, n_id=2, per=1)
    g = Gallery.open(p, verify=False)
    assert g.file_size == p.stat().st_size
    g.close()
    assert g.closed
    with pytest.raises(GalleryError, match="gallery is closed"):
        g.search(np.ones(192))


def test_checksum_is_stable_for_same_content(tmp_path):
    a, b = tmp_path / "a.edgal", tmp_path / "b.edgal"
    make(a)
    make(b)
    with Gallery.open(a) as ga, Gallery.open(b) as gb:
        assert ga.checksum == gb.checksum


def test_empty_gallery_is_valid(tmp_path):
    p = tmp_path / "g.edgal"
    write_gallery(p, [], np.zeros(0, int), np.zeros((0, 192), np.float32), SHA)
    with Gallery.open(p) as g:
        assert g.rows == 0 and g.search(np.ones(192), 5) == [[]]
        assert g.match(np.ones(192))[0].name is None


# --------------------------------------------------------------------------- corruption


def test_wrong_magic(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    patch(p, 0, b"NOTAGALL")
    assert "wrong magic" in reason(p)


def test_text_file_is_not_a_gallery(tmp_path):
    p = tmp_path / "g.edgal"
    p.write_text("hello\n")
    assert "wrong magic" in reason(p)


def test_newer_version(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    patch(p, 8, struct.pack("<H", G.FORMAT_VERSION + 1))
    r = reason(p)
    assert "version 2 is newer" in r and "upgrade" in r


def test_header_corruption_caught_by_crc(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    patch(p, 20, b"\x07", fix_crc=False)  # inside the row count
    assert "header checksum mismatch" in reason(p)


@pytest.mark.parametrize("cut", [1, 1000, "header"])
def test_truncated(tmp_path, cut):
    p = tmp_path / "g.edgal"
    make(p)
    data = p.read_bytes()
    p.write_bytes(data[:100] if cut == "header" else data[:-cut])
    r = reason(p)
    assert "truncated" in r
    if cut != "header":
        assert f"file is {len(data) - cut} bytes, header says {len(data)}" in r


def test_trailing_bytes(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    with open(p, "ab") as f:
        f.write(b"\0" * 10)
    assert "trailing bytes" in reason(p)


def test_checksum_mismatch(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    size = p.stat().st_size
    b = bytearray(p.read_bytes())
    # swap two float32 values of the last row: still finite, still unit norm, other bytes
    last = size - 192 * 4
    b[last:last + 4], b[last + 4:last + 8] = b[last + 4:last + 8], b[last:last + 4]
    p.write_bytes(bytes(b))
    r = reason(p)
    assert "checksum mismatch" in r
    # the cheap open does not read the body; the full one does
    Gallery.open(p, verify=False).close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_row(tmp_path, dtype):
    p = tmp_path / "g.edgal"
    make(p, dtype=dtype)
    size = p.stat().st_size
    item = 4 if dtype == "float32" else 2
    row = 7
    nan = np.array([np.nan], dtype=np.dtype(dtype)).tobytes()
    with Gallery.open(p, verify=False) as g:
        ident = g.identities[int(g.row_identity[row])][0]
        off = g._matrix_offset() + row * 192 * item + 5 * item
    patch(p, off, nan)
    r = reason(p)
    assert f"row {row} (identity {ident!r}) contains NaN" in r
    assert size == p.stat().st_size


def test_zero_norm_row(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    with Gallery.open(p, verify=False) as g:
        off = g._matrix_offset() + 3 * 192 * 4
    patch(p, off, b"\0" * 192 * 4)
    assert "row 3" in (r := reason(p)) and "zero norm" in r


def test_unnormalised_row(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    with Gallery.open(p, verify=False) as g:
        off = g._matrix_offset()
    patch(p, off, (np.ones(192, np.float32)).tobytes())
    assert "not L2-normalised" in reason(p)


def test_dimension_mismatch(tmp_path):
    p = tmp_path / "g.edgal"
    make(p, dim=128)
    r = reason(p, expect_dim=192)
    assert "embedding dimension 128" in r and "192" in r
    Gallery.open(p, expect_dim=128).close()


def test_embedder_mismatch(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    r = reason(p, expect_embedder=OTHER)
    assert f"made by embedder sha256 {SHA}" in r and OTHER in r


def test_empty_file(tmp_path):
    p = tmp_path / "g.edgal"
    p.write_bytes(b"")
    assert reason(p) == "empty file (0 bytes)"


def test_directory_instead_of_file(tmp_path):
    p = tmp_path / "g.edgal"
    p.mkdir()
    assert reason(p) == "is a directory, not a gallery file"


def test_missing_file(tmp_path):
    assert reason(tmp_path / "nope.edgal") == "no such file"


def test_bad_row_index(tmp_path):
    p = tmp_path / "g.edgal"
    make(p)
    with Gallery.open(p, verify=False):
        ri_off = G._HEAD.unpack_from(p.read_bytes(), 0)[11]
    patch(p, ri_off, struct.pack("<I", 3))  # row 0 claims identity 3
    assert "row-to-identity index disagrees" in reason(p)


def test_duplicate_identity_rejected_by_writer(tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        write_gallery(tmp_path / "g.edgal", [("a", "A"), ("a", "B")], [0, 1],
                      np.ones((2, 192), np.float32), SHA)
    with pytest.raises(ValueError, match="no embedding rows"):
        write_gallery(tmp_path / "g.edgal", [("a", "A"), ("b", "B")], [0, 0],
                      np.ones((2, 192), np.float32), SHA)
    with pytest.raises(ValueError, match="row 1 .* zero"):
        write_gallery(tmp_path / "g.edgal", [("a", "A")], [0, 0],
                      np.array([np.ones(192), np.zeros(192)], np.float32), SHA)
    with pytest.raises(ValueError, match="64 hex digits"):
        write_gallery(tmp_path / "g.edgal", [("a", "A")], [0], np.ones((1, 192)), "xyz")
    assert not any(tmp_path.iterdir())  # nothing half written


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    p = tmp_path / "g.edgal"
    make(p, seed=1)
    ino = os.stat(p).st_ino
    make(p, seed=2)
    assert os.stat(p).st_ino != ino  # replaced by rename, not rewritten in place
    assert [x.name for x in tmp_path.iterdir()] == ["g.edgal"]


def test_peek_embedder_reads_the_header_without_mapping_the_file(tmp_path):
    """What the drop manager reads of a live gallery file (which a copy may be cutting short
    under it: a mapped file would kill the process with SIGBUS)."""
    import numpy as np

    from edged.gallery import GalleryError, peek_embedder, write_gallery

    p = tmp_path / "g.edgal"
    write_gallery(p, [("a", "A")], [0], np.ones((1, 192)), "ab" * 32)
    assert peek_embedder(p) == "ab" * 32
    data = p.read_bytes()
    p.write_bytes(data[:100])
    with pytest.raises(GalleryError, match="truncated header: 100 bytes"):
        peek_embedder(p)
    p.write_bytes(b"NOTAGAL!" + data[8:])
    with pytest.raises(GalleryError, match="wrong magic"):
        peek_embedder(p)
    bad = bytearray(data)
    bad[40] ^= 0xFF
    p.write_bytes(bytes(bad))
    with pytest.raises(GalleryError, match="header checksum mismatch"):
        peek_embedder(p)
    with pytest.raises(GalleryError, match="no such file"):
        peek_embedder(tmp_path / "none.edgal")


# --------------------------------------------------------------------------- hardening


def test_gallery_files_are_not_world_readable(tmp_path):
    """Galleries are biometric data: 0640 less the umask (they were 0644 whatever it was)."""
    old = os.umask(0o022)
    try:
        make(tmp_path / "a.edgal")
        os.umask(0o077)
        make(tmp_path / "b.edgal")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.edgal").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "b.edgal").st_mode & 0o777 == 0o600


def test_a_refusal_never_quotes_the_file(tmp_path):
    """Refusals go to the retained MQTT status: none of the file's bytes in them."""
    from edged.gallery import peek_embedder

    p = tmp_path / "g.edgal"
    for data in (b"root:x:0:0:root:/root:/bin/bash\n" * 20, b"root:x"):
        p.write_bytes(data)
        assert reason(p) == "not an edged gallery (wrong magic)"
        with pytest.raises(GalleryError) as ei:
            peek_embedder(p)
        assert "root" not in str(ei.value).replace(str(tmp_path), "")


CRAFTED = {  # header fields with every checksum right: (offset, value, reason)
    "a huge dimension and no rows": (16, struct.pack("<I", 2 ** 32 - 1),
                                     f"invalid embedding dimension 4294967295 (1 to {G.MAX_DIM})"),
    "a NaN creation time": (36, struct.pack("<d", float("nan")), "invalid creation time nan"),
    "an infinite creation time": (36, struct.pack("<d", float("inf")), "invalid creation time inf"),
}


@pytest.mark.parametrize("what", sorted(CRAFTED))
def test_crafted_headers_with_valid_checksums_are_refused(tmp_path, what):
    """Once a MemoryError (1024 x 4e9 floats of scratch space) or a crash of the date."""
    from gallery_craft import craft

    p = tmp_path / "g.edgal"
    write_gallery(p, [], np.zeros(0, int), np.zeros((0, 192), np.float32), SHA)
    off, value, why = CRAFTED[what]
    craft(p, [(off, value)])
    assert reason(p, expect_dim=None) == why
    assert reason(p, expect_dim=None, verify=False) == why


def _bad_tables(p):
    from gallery_craft import section

    return {"invalid UTF-8": (section(p, "s"), b"\xff", "identity 0: invalid UTF-8"),
            "row starts": (section(p, "rs") + 8, struct.pack("<Q", 100),
                           "row starts are not increasing"),
            "string offsets": (section(p, "so") + 8, struct.pack("<Q", 2 ** 63 + 5),
                               "string offsets are not increasing")}


@pytest.mark.parametrize("what", ["invalid UTF-8", "row starts", "string offsets"])
def test_an_unverified_gallery_with_bad_tables_raises_gallery_error(tmp_path, what):
    """Gallery.open(verify=False) is constant time; the tables it did not check are checked
    on first use, so a search or a name lookup raises GalleryError (once UnicodeDecodeError,
    IndexError, or names read out of bounds)."""
    from gallery_craft import craft

    p = tmp_path / "g.edgal"
    make(p, n_id=3, per=2)
    off, value, why = _bad_tables(p)[what]
    craft(p, [(off, value)])
    with Gallery.open(p, verify=False) as g:
        uses = [lambda: g.search(np.ones(192), 3), lambda: g.identities,
                lambda: g.match(np.ones((2, 192)))]
        if what != "invalid UTF-8":  # (scores need no names)
            uses.append(lambda: g.identity_scores(np.ones(192)))
        for use in uses:
            with pytest.raises(GalleryError) as ei:
                use()
            assert ei.value.reason.startswith(why) and str(p) in str(ei.value)
    assert reason(p).startswith(why)  # and the full check says the same
