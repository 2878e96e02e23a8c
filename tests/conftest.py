"""Shared fixtures: the real shared data, the installed models, a real mosquitto broker."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edged import modelstore

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGED_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"test data not found at {SHARED} (set EDGED_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The installed models; installed into a temporary directory if they are not there."""
    d = modelstore.default_models_dir()
    if all(ok for _, ok, _ in modelstore.verify(d)):
        return d
    d = tmp_path_factory.mktemp("models")
    modelstore.install(dest=d)
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 10.0, step: float = 0.005) -> bool:
    """Poll ``cond()`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class Broker:
    """A real mosquitto on a free loopback port; ``stop()``/``start()`` for outage tests."""

    def __init__(self, workdir: Path, extra_conf: str = ""):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.extra_conf = extra_conf
        self.proc = None
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            pytest.fail("mosquitto is not installed (tools/bootstrap installs it)")
        self.exe = exe

    def start(self) -> "Broker":
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        f"persistence false\n{self.extra_conf}\n")
        self.log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=self.log, stderr=self.log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(tmp_path):
    made = []

    def make(extra_conf: str = "") -> Broker:
        d = tmp_path / f"broker{len(made)}"
        d.mkdir()
        b = Broker(d, extra_conf)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()
