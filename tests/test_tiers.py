"""The two tiers of test data: a missing full data set is skipped with one line, or fails
when EDGED_REQUIRE_FULL_DATA is set (as .ci/run does)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_TIER_TEST = "tests/test_detect.py::test_multi_face_counts"  # needs the dev photos


def run_pytest(tmp_path, **env):
    e = dict(os.environ, EDGED_TEST_DATA=str(tmp_path / "nothing-here"), **env)
    e.pop("EDGED_SHARED", None)
    e.pop("EDGED_REQUIRE_FULL_DATA", None)
    e.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           FULL_TIER_TEST], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def test_without_the_full_data_its_tests_are_skipped_in_one_line(tmp_path):
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if "full tier: test data not found" in line]
    assert len(lines) == 1 and lines[0].startswith("SKIPPED [1] "), r.stdout
    assert "EDGED_TEST_DATA" in lines[0] and str(tmp_path / "nothing-here") in lines[0]


def test_required_full_data_that_is_missing_fails(tmp_path):
    r = run_pytest(tmp_path, EDGED_REQUIRE_FULL_DATA="1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "EDGED_REQUIRE_FULL_DATA is set" in r.stdout


def test_ci_requires_the_full_data():
    assert "export EDGED_REQUIRE_FULL_DATA=1" in (ROOT / ".ci" / "run").read_text()
