"""The tensorrt accelerator (issue 22) where TensorRT and a GPU are absent, as on this machine:
typed settings checked with the key named, one clear fallback line and the CPU (exit 0), a
clear failure with strict; the engine cache's names. The engine build itself needs a GPU."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from edged.runtime import DelegateError, SettingsError, open_runner, parse_settings, plugin_types
from edged.runtime import modelstore
from edged.runtime.plugins.tensorrt import TensorRtSettings, engine_key
from edged_daemon_helpers import write_config

EDGED = [sys.executable, "-m", "edged"]


@pytest.fixture(scope="module")
def onet(models_dir):
    return modelstore.read_verified("onet", models_dir)[:2]


def test_tensorrt_is_one_of_the_accelerators():
    assert "tensorrt" in plugin_types()
    _, s = parse_settings({"type": "tensorrt"}, "models.detector")
    assert isinstance(s, TensorRtSettings) and s.precision == "fp16" and not s.strict


@pytest.mark.parametrize("accel, pattern", [
    ({"type": "tensorrt", "precision": "fp8"}, r"models\.detector\.precision: expected one of fp16, fp32, int8"),
    ({"type": "tensorrt", "precision": "int8"}, r"models\.detector\.int8_calibration: precision int8 needs"),
    ({"type": "tensorrt", "workspace_mb": 1}, r"models\.detector\.workspace_mb: expected an integer"),
    ({"type": "tensorrt", "dla_core": -1}, r"models\.detector\.dla_core: expected a core number"),
    ({"type": "tensorrt", "device": "gpu0"}, r"models\.detector\.device: unknown key"),
])
def test_bad_tensorrt_settings_name_the_key(accel, pattern):
    with pytest.raises(SettingsError, match=pattern):
        parse_settings(accel, "models.detector")


def test_a_bad_tensorrt_setting_in_the_config_file_exits_78(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", cameras=[{"name": "a", "source": "/dev/video0"}],
                       models={"detector": {"type": "tensorrt", "precision": "fp8"}})
    r = subprocess.run(EDGED + ["check-config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "precision: expected one of fp16, fp32, int8" in r.stdout + r.stderr


def test_without_tensorrt_the_cpu_runs_the_model_after_one_warning(onet, caplog):
    data, sha = onet
    with caplog.at_level(logging.WARNING, logger="edged.runtime"):
        r = open_runner(data, {"type": "tensorrt"}, name="onet", sha256=sha)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cannot use accelerator 'tensorrt'" in warnings[0]
    assert "falling back to the CPU" in warnings[0]
    assert r.delegate.startswith("cpu (XNNPACK") and "TensorRT" in r.fallback_reason
    assert r.run(np.zeros((1, 48, 48, 3), np.float32))[0].shape == (1, 2)
    with pytest.raises(DelegateError, match=r"strict: true, not falling back"):
        open_runner(data, {"type": "tensorrt", "strict": True}, name="onet")


def test_models_info_says_the_fallback_and_strict_fails():
    r = subprocess.run(EDGED + ["models", "info", "--accelerator", "tensorrt"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cannot use accelerator 'tensorrt'" in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("delegate")]
    assert lines and all("cpu (XNNPACK" in ln and "fallback: TensorRT" in ln for ln in lines)
    r = subprocess.run(EDGED + ["models", "info", "--accelerator", "tensorrt", "--strict"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR" in r.stdout and "strict: true, not falling back" in r.stdout


def test_engine_cache_names_say_model_tensorrt_gpu_precision_and_shape():
    sha = "ab" * 32
    a = engine_key(sha, "10.3.0", "Orin (nvgpu)", "fp16")
    assert a == "abababababababab-trt10.3.0-orin-nvgpu-fp16.engine"
    assert engine_key(sha, "10.3.0", "Orin (nvgpu)", "fp32") != a
    assert engine_key(sha, "8.6.2", "Orin (nvgpu)", "fp16") != a
    assert engine_key(sha, "10.3.0", "Orin (nvgpu)", "fp16", (12, 16, 3)).endswith(
        "-fp16-12x16x3.engine")
