"""The one rule for reading files from outside (drops, the gallery path): edged.safefile."""
from __future__ import annotations

import os

import pytest

from edged import safefile


def test_a_regular_file_opens(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"data")
    with safefile.open_plain(p) as f:
        assert f.read() == b"data"


def test_a_link_is_refused_unless_links_are_followed(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(safefile.NotPlain) as exc:
        safefile.open_plain(link)
    assert exc.value.reason == safefile.SYMLINK_REASON and "secret" not in exc.value.reason
    with safefile.open_plain(link, follow_links=True) as f:
        assert f.read() == b"secret"


@pytest.mark.parametrize("kind,make", [
    ("a FIFO", lambda p: os.mkfifo(p)),
    ("a directory", lambda p: p.mkdir()),
])
def test_what_is_no_regular_file_is_refused_without_blocking(tmp_path, kind, make):
    p = tmp_path / "x"
    make(p)
    for follow in (False, True):
        with pytest.raises(safefile.NotPlain) as exc:
            safefile.open_plain(p, follow_links=follow)  # a FIFO opened would block here
        assert exc.value.reason == f"is {kind}, not a regular file"


def test_a_missing_file_is_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        safefile.open_plain(tmp_path / "missing")
