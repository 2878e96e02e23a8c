"""Opening a file that comes from outside (a drop, the gallery path) without being fooled by it.

One rule for every such read: a symbolic link is never followed (its target may be any file
the daemon can read, and a refusal goes onto MQTT), anything but a regular file is refused
before it is opened (opening a FIFO blocks until a writer comes; a device may do anything), and
the open file is checked again (it may have been replaced since the ``lstat``).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional

SYMLINK_REASON = ("is a symbolic link: drops are never followed (copy the file itself into "
                  "the directory)")


class NotPlain(Exception):
    """The path is not a plain regular file; ``reason`` says what it is, in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def what_it_is(st: os.stat_result) -> Optional[str]:
    """None for a regular file, else what it is: ``"a directory"``, ``"a FIFO"``, ..."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_plain(st: os.stat_result) -> None:
    """Raise :class:`NotPlain` unless ``st`` (an ``lstat`` or ``fstat``) is a regular file."""
    kind = what_it_is(st)
    if kind == "a symbolic link":
        raise NotPlain(SYMLINK_REASON)
    if kind is not None:
        raise NotPlain(f"is {kind}, not a regular file")


def open_plain(path, follow_links: bool = False):
    """``path`` open for reading (binary) once it is known to be a regular file: checked on
    its ``lstat`` (``stat`` with ``follow_links``), opened without blocking and, unless
    following links, with ``O_NOFOLLOW``, then checked again on the open file.  Raises
    :class:`NotPlain`, or the ``OSError`` of the stat or the open (FileNotFoundError, ...)."""
    check_plain(os.stat(path) if follow_links else os.lstat(path))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:  # replaced by a link since the lstat
            raise NotPlain(SYMLINK_REASON) from None
        raise
    try:
        check_plain(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
