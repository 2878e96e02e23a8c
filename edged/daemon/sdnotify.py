"""The systemd notify protocol (``sd_notify(3)``) with the standard library only.

``Notifier()`` reads ``$NOTIFY_SOCKET`` (a path, or an abstract socket written ``@name``) and
sends datagrams such as ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1``,
``STOPPING=1``.  Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a no-op.
``watchdog_interval()`` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, which must be ours).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Optional

log = logging.getLogger("edged.sdnotify")


def socket_address(value: str):
    """The address to send to: ``@name`` becomes the abstract socket ``\\0name``."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


class Notifier:
    def __init__(self, address: Optional[str] = None, env=None):
        env = os.environ if env is None else env
        self.raw = address if address is not None else env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(self.raw) if self.raw else None
        self._sock = None
        self._lock = threading.Lock()
        self._env = env
        self.sent = []  # the last few messages, for the status line and tests
        self._warned = False
        if self.address is not None and not (self.raw.startswith("/") or self.raw.startswith("@")):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract @ socket; "
                        "not notifying systemd", self.raw)
            self.address = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram with ``lines`` joined by newlines; False when not sent."""
        if self.address is None:
            return False
        msg = "\n".join(lines)
        data = msg.encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify systemd at %s: %s", self.raw, exc)
                    self._warned = True
                return False
        self.sent = (self.sent + [msg])[-20:]
        return True

    # -- the messages edged sends

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self, status: str = "reloading") -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match the reload with its end.
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between watchdog pings systemd expects, or None when it expects none."""
        return watchdog_interval(self._env)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(env=None) -> Optional[float]:
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; no watchdog pings", usec)
        return None
    return value / 1_000_000 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
