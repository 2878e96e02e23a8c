"""Crafting gallery files for the tests: damage that keeps every checksum valid."""
from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import zlib
from pathlib import Path

from edged.gallery import format as G  # the file layout: header size, struct, crc offset


def reseal(data: bytes) -> bytes:
    """``data`` with its body sha256 and header crc32 made right again."""
    b = bytearray(data)
    b[132:164] = hashlib.sha256(bytes(b[G.HEADER_SIZE:])).digest()
    struct.pack_into("<I", b, G._CRC_AT, zlib.crc32(bytes(b[:G._CRC_AT])))
    return bytes(b)


def craft(path: Path, edits) -> Path:
    """Apply ``edits`` ``[(offset, bytes)]`` to the gallery file at ``path`` and reseal it."""
    b = bytearray(Path(path).read_bytes())
    for off, data in edits:
        b[off:off + len(data)] = data
    Path(path).write_bytes(reseal(bytes(b)))
    return Path(path)


def section(path: Path, name: str) -> int:
    """The offset of a section of the gallery at ``path``: ``so``, ``rs``, ``ri``, ``s``, ``m``."""
    f = G._HEAD.unpack_from(Path(path).read_bytes(), 0)
    return dict(so=f[9], rs=f[10], ri=f[11], s=f[12], m=f[14])[name]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` (``"8m"``) mounted at ``path`` for the block; the test is
    skipped, with the reason, where this process may not mount one (not root)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a small, real filesystem to fill) needs root")
    Path(path).mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield Path(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; returns the filler file."""
    p = Path(directory) / "filler"
    with open(p, "wb", buffering=0) as f:
        block = b"\0" * (1 << 16)
        while True:
            try:
                n = f.write(block)
            except OSError:
                break
            if not n:
                break
    for n in (4096, 512, 1):  # the last partial blocks
        with open(p, "ab", buffering=0) as f:
            try:
                while f.write(b"\0" * n):
                    pass
            except OSError:
                pass
    return p
