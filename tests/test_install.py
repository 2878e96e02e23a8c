"""What pip installs on each board: the markers of setup.cfg, evaluated as each board would."""
from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_loader = SourceFileLoader("check_wheels", str(ROOT / "tools" / "check_wheels"))
check_wheels = importlib.util.module_from_spec(importlib.util.spec_from_loader("check_wheels", _loader))
_loader.exec_module(check_wheels)


def names(machine, python):
    return {r.name: str(r.specifier) for r in check_wheels.for_board(machine, python)}


@pytest.mark.parametrize("machine,python,runtime", [
    ("aarch64", "3.11", "ai-edge-litert"),   # Raspberry Pi OS Bookworm 64-bit
    ("armv7l", "3.11", "tflite-runtime"),    # Raspberry Pi OS 32-bit: no ai-edge-litert wheel
    ("aarch64", "3.13", "ai-edge-litert"),   # Raspberry Pi OS Trixie
    ("aarch64", "3.10", "ai-edge-litert"),   # JetPack 6
    ("aarch64", "3.8", "tflite-runtime"),    # JetPack 5
    ("x86_64", "3.12", "ai-edge-litert"),    # Ubuntu 24.04
])
def test_one_tflite_runtime_per_board(machine, python, runtime):
    got = names(machine, python)
    other = {"ai-edge-litert", "tflite-runtime"} - {runtime}
    assert runtime in got and not other & set(got), got
    assert {"opencv-python-headless", "paho-mqtt", "PyYAML", "watchdog", "numpy"} <= set(got)


def test_numpy_below_2_with_python_38():
    assert names("aarch64", "3.8")["numpy"] == "<2"
    assert names("aarch64", "3.11")["numpy"] == ""


def test_every_board_is_checked_with_its_own_platform_tags():
    for board, (machine, python, glibc) in check_wheels.BOARDS.items():
        tags = check_wheels.platforms(machine, glibc)
        assert tags[0] == f"manylinux_2_{glibc}_{machine}" and f"linux_{machine}" in tags, board
