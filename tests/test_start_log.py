"""What a person reads in journalctl when edged starts: a few lines, in their words."""
from __future__ import annotations

import subprocess

from edged.ota.hotswap import SwapEvent
from edged_daemon_helpers import EDGED, build_gallery, write_config


def test_a_start_logs_one_summary_per_model_set_and_no_none(public_clip, public_enrol, tmp_path):
    gallery = build_gallery(public_enrol, tmp_path / "people.edgal")
    cfg = write_config(tmp_path / "config.yaml",
                       cameras=[{"name": "door", "source": str(public_clip), "realtime": False}],
                       paths={"gallery": str(gallery), "state_dir": str(tmp_path / "state")},
                       models={"detector": {"type": "cpu", "num_threads": 2},
                               "embedder": {"type": "cpu", "num_threads": 1}},
                       mqtt={"enabled": False}, logging={"target": "stderr", "level": "info"})
    r = subprocess.run([EDGED, "run", "--config", str(cfg), "--exit-when-done"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    start = lines[:next(i for i, line in enumerate(lines) if " ready: " in line) + 1]
    assert not [line for line in lines if " runs on " in line], start  # detail is at debug
    summary = [line for line in start if "models loaded in" in line]
    assert len(summary) == 1, start
    assert "detector on cpu (XNNPACK, 2 threads), embedder on cpu (XNNPACK, 1 thread)" \
        in summary[0]
    assert not [line for line in lines if "None" in line], lines
    sets = [line for line in start if "models: set in service" in line]
    assert len(sets) == 1 and "the first one" in sets[0] and sets[0].endswith(", start)"), sets
    assert len(start) <= 10, start


def test_swap_messages_name_no_missing_version():
    first = SwapEvent("gallery", True, "/g.edgal", "", None, "abc", 0.01, "start", 0.0)
    assert str(first) == "gallery: /g.edgal in service (version abc, the first one; 0.010 s, start)"
    again = SwapEvent("gallery", True, "/g.edgal", "", "abc", "def", 0.01, "watch", 0.0)
    assert "replacing abc" in str(again)
    refused = SwapEvent("gallery", False, "/g.edgal", "bad crc", None, None, 0.0, "start", 0.0)
    assert str(refused) == "gallery: /g.edgal rejected: bad crc; nothing was in service yet (start)"
    kept = SwapEvent("gallery", False, "/g.edgal", "bad crc", "abc", None, 0.0, "watch", 0.0)
    assert str(kept).endswith("keeping version abc (watch)")
