"""sd_notify over real unix datagram sockets (path and abstract), and the log output."""
from __future__ import annotations

import io
import logging
import os
import socket
import struct

import pytest

from edged import logs
from edged.daemon.sdnotify import Notifier, socket_address, watchdog_interval


def bound(path_or_abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(socket_address(path_or_abstract))
    s.settimeout(2)
    return s


def test_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    rx = bound(path)
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("2 cameras up")
    assert rx.recv(4096) == b"READY=1\nSTATUS=2 cameras up"
    n.watchdog()
    assert rx.recv(4096) == b"WATCHDOG=1"
    n.status("cam0 29.9 fps;\nlast event recognized alice")  # one line, always
    assert rx.recv(4096) == b"STATUS=cam0 29.9 fps; last event recognized alice"
    n.reloading()
    msg = rx.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    n.stopping()
    assert rx.recv(4096).startswith(b"STOPPING=1")
    n.close()
    rx.close()


def test_abstract_socket():
    name = f"@edged-test-{os.getpid()}"
    rx = bound(name)
    n = Notifier(env={"NOTIFY_SOCKET": name})
    assert n.notify("READY=1")
    assert rx.recv(4096) == b"READY=1"
    rx.close()


def test_without_systemd_nothing_is_sent():
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False


def test_socket_gone_is_a_warning_not_a_crash(tmp_path, caplog):
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert n.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text


def test_bad_notify_socket_value(caplog):
    n = Notifier(env={"NOTIFY_SOCKET": "relative/path"})
    assert not n.enabled
    assert "neither a path nor an abstract @ socket" in caplog.text


def test_watchdog_interval():
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": pid}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}) is None  # not ours
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


# ---------------------------------------------------------------------------- logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_stderr_fallback_is_journal_friendly(restore_logging, tmp_path):
    buf = io.StringIO()
    target = logs.setup(logs.LoggingSettings(target="auto"), stream=buf,
                        journal_socket=str(tmp_path / "no-journal"))
    assert target == "stderr"  # no journald socket: stderr
    log = logging.getLogger("edged.track")
    log.info("recognized %s", "alice", extra=logs.fields(camera="cam0", person="alice",
                                                         event="recognized", track=7))
    log.warning("camera %s: source lost", "cam0", extra=logs.fields(camera="cam0"))
    log.debug("not shown at info")
    lines = buf.getvalue().splitlines()
    assert lines == [
        "<6>edged.track: recognized alice [camera=cam0 person=alice event=recognized track=7]",
        "<4>edged.track: camera cam0: source lost [camera=cam0]",
    ]


def test_stderr_traceback_lines_keep_the_priority(restore_logging, tmp_path):
    buf = io.StringIO()
    logs.setup(logs.LoggingSettings(target="stderr"), stream=buf)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("edged.daemon").exception("frame failed")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "<3>edged.daemon: frame failed"
    assert all(line.startswith("<3>") for line in lines)
    assert "ValueError: boom" in lines[-1]


def test_stderr_multi_line_messages_keep_the_priority(restore_logging):
    buf = io.StringIO()
    logs.setup(logs.LoggingSettings(target="stderr"), stream=buf)
    logging.getLogger("edged.daemon").error("reload failed:\nconfig.yaml:3: x: bad\nconfig.yaml: 1 error")
    assert buf.getvalue().splitlines() == [
        "<3>edged.daemon: reload failed:",
        "<3>  config.yaml:3: x: bad",
        "<3>  config.yaml: 1 error",
    ]


def test_journal_socket_without_a_listener_falls_back_to_stderr(restore_logging, tmp_path,
                                                                  capsys):
    """A journald socket file left behind with nobody listening: nothing is lost, the lines go
    to stderr (which systemd collects too), with one warning saying why."""
    sock_path = str(tmp_path / "journal.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(sock_path)
    rx.close()  # the file stays, nobody listens
    assert logs.setup(logs.LoggingSettings(target="auto"), journal_socket=sock_path) == "journal"
    log = logging.getLogger("edged.track")
    log.warning("first")
    log.warning("second", extra=logs.fields(camera="cam0"))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("<4>edged.logs: cannot send to journald") and sock_path in err[0]
    assert err[1:] == ["<4>edged.track: first", "<4>edged.track: second [camera=cam0]"]
    assert "Logging error" not in "\n".join(err)


def parse_native(data: bytes) -> dict:
    """Decode the journal's native datagram format."""
    out = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


def test_journal_fields_reach_the_journal_socket(restore_logging, tmp_path):
    """The journald path, against a socket standing in for /run/systemd/journal/socket: every
    record carries MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and the EDGED_* fields, so that
    ``journalctl -u edged EDGED_PERSON=alice`` finds it on a board."""
    sock_path = str(tmp_path / "journal.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(sock_path)
    rx.settimeout(2)
    target = logs.setup(logs.LoggingSettings(target="auto"), journal_socket=sock_path)
    assert target == "journal"
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logs.JournalHandler) and handler.backend == "native"
    logging.getLogger("edged.daemon").info(
        "camera %s: recognized %s", "cam0", "alice",
        extra=logs.fields(camera="cam0", person="alice", event="recognized", track=3))
    rec = parse_native(rx.recv(65536))
    assert rec["MESSAGE"] == "camera cam0: recognized alice"
    assert rec["PRIORITY"] == "6"
    assert rec["SYSLOG_IDENTIFIER"] == "edged"
    assert rec["LOGGER"] == "edged.daemon"
    assert (rec["EDGED_CAMERA"], rec["EDGED_PERSON"], rec["EDGED_EVENT"], rec["EDGED_TRACK"]) == \
        ("cam0", "alice", "recognized", "3")
    # a multi-line message uses the binary-safe form
    logging.getLogger("edged.daemon").error("two\nlines")
    assert parse_native(rx.recv(65536))["MESSAGE"] == "two\nlines"
    rx.close()


def test_systemd_python_backend_when_installed(restore_logging, monkeypatch):
    """With systemd-python, records go through systemd.journal.send with the same fields."""
    journal = pytest.importorskip("systemd.journal")
    sent = []
    monkeypatch.setattr(journal, "send", lambda msg, **kw: sent.append((msg, kw)))
    h = logs.JournalHandler(use_systemd_python=True)
    assert h.backend == "systemd-python"
    rec = logging.LogRecord("edged.x", logging.INFO, __file__, 1, "hello %s", ("bob",), None)
    rec.EDGED_PERSON = "bob"
    h.emit(rec)
    assert sent[0][0] == "hello bob" and sent[0][1]["EDGED_PERSON"] == "bob"


def test_a_lasting_condition_is_logged_once_then_once_a_minute(caplog):
    """logs.Throttle: one line when it starts, then one a minute saying how many were held
    back, one when it ends; a new occurrence after that is logged at once."""
    clock = [0.0]
    t = logs.Throttle(logging.getLogger("edged.test"), every=60, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="edged.test"):
        for i in range(300):  # one a second for five minutes
            clock[0] = float(i)
            t.problem(logging.ERROR if i == 0 else logging.WARNING, "disk full (%d)", i)
        assert t.active
        assert t.resolved("disk fine again") and not t.resolved("said once")
        t.problem(logging.ERROR, "disk full again")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "disk full (0)" and caplog.records[0].levelno == logging.ERROR
    assert msgs[1:5] == [f"disk full ({i}) (59 similar line(s) held back)"
                         for i in (60, 120, 180, 240)]
    assert msgs[5:] == ["disk fine again", "disk full again"]
