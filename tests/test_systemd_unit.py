"""systemd/edged.service: passes systemd-analyze verify without a warning, and is hardened."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edged.service"
INSTALLED_EXE = "/opt/edged/venv/bin/edged"


def analyze():
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    return exe


@pytest.fixture
def unit_copy(tmp_path):
    """The unit with ExecStart pointing at this checkout's edged (verify needs a real binary)."""
    exe = Path(sys.executable).parent / "edged"
    assert exe.exists(), exe
    text = UNIT.read_text()
    assert INSTALLED_EXE in text
    p = tmp_path / "edged.service"
    p.write_text(text.replace(INSTALLED_EXE, str(exe)))
    return p


def directives():
    out = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault((section, k), []).append(v)
    return out


def test_verify_has_no_warning(unit_copy):
    r = subprocess.run([analyze(), "verify", str(unit_copy)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_notify_watchdog_user_and_hardening():
    d = directives()
    s = lambda k: d.get(("Service", k), [None])[-1]  # noqa: E731
    assert s("Type") == "notify"
    assert s("NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s?", s("WatchdogSec"))
    assert s("User") == "edged" and "video" in s("SupplementaryGroups").split()
    assert s("NoNewPrivileges") == "yes"
    assert s("ProtectSystem") == "strict"
    assert s("StateDirectory") == "edged" and s("ReadWritePaths") == "/var/lib/edged"
    assert s("ProtectHome") == "yes" and s("PrivateTmp") == "yes"
    assert s("DevicePolicy") == "closed"
    allowed = d[("Service", "DeviceAllow")]
    assert "char-video4linux rw" in allowed
    assert s("Restart") == "on-failure"
    assert d.get(("Unit", "StartLimitBurst")) and d.get(("Unit", "StartLimitIntervalSec"))
    assert "EDGED_MODELS_DIR=/var/lib/edged/models" in d[("Service", "Environment")]
    assert s("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert s("ExecStart").startswith(INSTALLED_EXE + " run --config /etc/edged/config.yaml")


def test_security_exposure_matches_the_docs(unit_copy):
    r = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edged\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout[-500:] + r.stderr
    score = m.group(1)
    assert float(score) <= 2.0
    doc = (ROOT / "docs" / "systemd.md").read_text()
    assert f"exposure level {score}" in doc, f"docs/systemd.md should state the score {score}"


def test_a_bad_configuration_is_not_restarted():
    """edged exits 78 (EX_CONFIG) on every configuration error; the unit names that status in
    RestartPreventExitStatus, so systemd stops there instead of restarting five times."""
    from edged.commands.run import EX_CONFIG

    d = directives()
    assert EX_CONFIG == 78
    assert d.get(("Service", "RestartPreventExitStatus")) == [str(EX_CONFIG)]
    assert d[("Service", "Restart")] == ["on-failure"]  # (which would restart on 78 otherwise)
    from edged import config

    doc = (ROOT / "docs" / "systemd.md").read_text()
    exits = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert "`RestartPreventExitStatus=78`" in exits
    for bound in (f"over {config.MAX_BYTES >> 20} MiB", f"over {config.MAX_DEPTH} levels",
                  f"past {config.MAX_VALUES} values", f"longer than {config.MAX_INT_DIGITS} digits"):
        assert bound in exits, bound
