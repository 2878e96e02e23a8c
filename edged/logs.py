"""Log output for the daemon: journald with structured fields, or journal-friendly stderr.

Log calls pass the structured fields in ``extra``::

    log.info("recognized %s", name, extra=fields(camera="cam0", person=name, event="recognized",
                                                  track=7))

With journald (``target: auto`` when the journal socket exists, or ``target: journal``) every
record is sent with ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER=edged``, ``LOGGER``,
``THREAD_NAME`` and the ``EDGED_*`` fields, so that ``journalctl -u edged EDGED_PERSON=alice``
finds the recognitions of alice.  Events that carry a liveness verdict (the liveness stage on)
add ``EDGED_LIVE`` = ``true``, ``false`` or ``unknown`` (``journalctl -u edged EDGED_LIVE=false``
lists the suspected spoofs and the recognitions the stage doubted).  ``systemd.journal.send`` (systemd-python) is used when it is
importable; otherwise the same datagram is written to the journal socket with the standard
library (the native journal protocol).  On stderr a record is one line, with the syslog
priority prefix ``<N>`` that journald understands and no timestamp (journald adds its own):
``<6>edged.track: recognized Alice [camera=cam0 track=7 person=Alice event=recognized]``.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

JOURNAL_SOCKET = "/run/systemd/journal/socket"

FIELD_KEYS = ("camera", "person", "event", "track", "live")


@dataclass
class LoggingSettings:
    level: str = field(default="info", metadata={
        "choices": ["debug", "info", "warning", "error"], "help": "minimum level logged"})
    target: str = field(default="auto", metadata={
        "choices": ["auto", "journal", "stderr"],
        "help": "auto = journald when its socket exists, else stderr"})


def live_value(liveness: Optional[dict]) -> Optional[str]:
    """``EDGED_LIVE`` of an event's ``liveness`` (``{"score", "live"}``): ``true``, ``false``,
    ``unknown`` (not scored), or None (no liveness: the stage is off, or not this event)."""
    if liveness is None:
        return None
    verdict = liveness.get("live")
    return "unknown" if verdict is None else ("true" if verdict else "false")


def fields(camera=None, person=None, event=None, track=None, live=None, **more) -> dict:
    """``extra=`` for a log call: the structured journal fields that are not None (``live``:
    an event's liveness mapping, see :func:`live_value`)."""
    out = {}
    for key, value in (("camera", camera), ("person", person), ("event", event), ("track", track),
                       ("live", live_value(live))):
        if value is not None:
            out["EDGED_" + key.upper()] = str(value)
    for key, value in more.items():
        if value is not None:
            out["EDGED_" + key.upper()] = str(value)
    return out


class Throttle:
    """Log a lasting condition (a full disk, say) without a line per occurrence: one line when
    it starts, then at most one every ``every`` seconds while it lasts (saying how many were
    held back), and one when it ends."""

    def __init__(self, logger: logging.Logger, every: float = 60.0, clock=time.monotonic):
        self.logger = logger
        self.every = float(every)
        self.clock = clock
        self.since: Optional[float] = None  # when the condition started (None: it is not on)
        self._last = 0.0
        self._held = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.since is not None

    def problem(self, level: int, msg: str, *args) -> bool:
        """The condition is on: log ``msg`` if it just started or ``every`` s have passed;
        returns whether a line was written."""
        now = self.clock()
        with self._lock:
            first = self.since is None
            if not first and now - self._last < self.every:
                self._held += 1
                return False
            if first:
                self.since = now
            held, self._held, self._last = self._held, 0, now
        if held:
            msg += " (%d similar line(s) held back)"
            args += (held,)
        self.logger.log(level, msg, *args)
        return True

    def resolved(self, msg: str, *args) -> bool:
        """The condition is over: log ``msg`` (once) if it was on; returns whether it was."""
        with self._lock:
            if self.since is None:
                return False
            self.since, self._held = None, 0
        self.logger.info(msg, *args)
        return True


def _record_fields(record) -> dict:
    return {k: v for k, v in record.__dict__.items() if k.startswith("EDGED_")}


def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class StderrFormatter(logging.Formatter):
    """``<N>logger: message [key=value ...]``, no timestamp; every further line of a
    multi-line message or traceback gets the ``<N>`` prefix too, so journald (which takes
    each stderr line as an entry) keeps its priority."""

    def format(self, record) -> str:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        extra = _record_fields(record)
        if extra:
            msg += " [" + " ".join(f"{k[6:].lower()}={v}" for k, v in extra.items()) + "]"
        pri = syslog_priority(record.levelno)
        first, *rest = msg.split("\n")
        rest += (record.exc_text or "").splitlines()
        return f"<{pri}>{record.name}: {first}" + "".join(f"\n<{pri}>  {line}" for line in rest)


def _encode_native(fields_: dict) -> bytes:
    """The journal's native datagram: ``KEY=value\\n``, or the binary form for multi-line values."""
    out = bytearray()
    for key, value in fields_.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        k = key.encode("ascii")
        if b"\n" in data:
            out += k + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += k + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends records to journald with the ``EDGED_*`` fields.

    ``sender`` defaults to ``systemd.journal.send`` when systemd-python is importable, else to
    the native protocol on ``socket_path`` (the standard library only).
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, identifier: str = "edged",
                 use_systemd_python: Optional[bool] = None):
        super().__init__()
        self.socket_path = socket_path
        self.identifier = identifier
        self._send = None
        self._sock = None
        if use_systemd_python is None:
            use_systemd_python = socket_path == JOURNAL_SOCKET
        if use_systemd_python:
            try:
                from systemd import journal  # type: ignore

                self._send = journal.send
                self.backend = "systemd-python"
            except ImportError:
                pass
        if self._send is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.backend = "native"

    def emit(self, record) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            f = {
                "PRIORITY": str(syslog_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "THREAD_NAME": record.threadName,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            f.update(_record_fields(record))
            if self._send is not None:
                self._send(msg, **f)
            else:
                payload = _encode_native({"MESSAGE": msg, **f})
                self._sock.sendto(payload, self.socket_path)
        except OSError as exc:
            # journald is not listening (its socket file left behind, or it stopped): from now
            # on log to stderr, which systemd also collects, rather than lose every line
            self._fall_back(record, exc)
        except Exception:
            self.handleError(record)

    def _fall_back(self, record, exc) -> None:
        fallback = self.__dict__.get("_fallback")
        if fallback is None:
            fallback = self._fallback = logging.StreamHandler(sys.stderr)
            fallback.setFormatter(StderrFormatter())
            fallback.handle(logging.makeLogRecord({
                "name": "edged.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "cannot send to journald (%s): %s; logging to stderr instead",
                "args": (self.socket_path, exc)}))
        fallback.handle(record)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        super().close()


def journal_available(socket_path: str = JOURNAL_SOCKET) -> bool:
    return os.path.exists(socket_path)


def setup(settings: Optional[LoggingSettings] = None, verbose: int = 0,
          stream=None, journal_socket: str = JOURNAL_SOCKET) -> str:
    """Configure the root logger for the daemon; return ``"journal"`` or ``"stderr"``.

    ``verbose`` (``-v``) lowers the level to debug; ``$EDGED_LOG_LEVEL`` overrides both.
    """
    settings = settings or LoggingSettings()
    level = getattr(logging, settings.level.upper(), logging.INFO)
    if verbose:
        level = min(level, logging.DEBUG)
    env = os.environ.get("EDGED_LOG_LEVEL", "").upper()
    if env and isinstance(getattr(logging, env, None), int):
        level = getattr(logging, env)
    target = settings.target
    if target == "auto":
        target = "journal" if journal_available(journal_socket) else "stderr"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close() if isinstance(h, JournalHandler) else None
    if target == "journal":
        handler = JournalHandler(journal_socket)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return target
