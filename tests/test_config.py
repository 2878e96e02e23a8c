"""The configuration loader: typed tree, defaults, every kind of error with its key's path."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edged import config
from edged.capture import CameraSettings
from edged.config import Config, ConfigError
from edged.track import TrackingSettings

ROOT = Path(__file__).resolve().parents[1]
EDGED = [sys.executable, "-m", "edged"]


def errors_of(text: str) -> list:
    with pytest.raises(ConfigError) as ei:
        config.loads(text, "cfg.yaml")
    return ei.value.errors


def test_empty_file_gives_every_default():
    cfg = config.loads("", "empty.yaml")
    assert cfg == Config()
    assert isinstance(cfg.cameras[0], CameraSettings)
    assert isinstance(cfg.tracking, TrackingSettings)
    assert cfg.tracking.detect_every == 1
    # the stage modules own their sections
    from edged.detect import DetectionSettings
    from edged.gallery import MatchSettings
    from edged.mqtt import MqttSettings
    from edged.quality import QualitySettings

    assert type(cfg.detection) is DetectionSettings
    assert type(cfg.quality) is QualitySettings
    assert type(cfg.match) is MatchSettings
    assert type(cfg.mqtt) is MqttSettings


def test_typed_tree_from_yaml():
    cfg = config.loads("""
device: {name: door}
cameras:
  - name: front
    source: rtsp://user:pw@10.0.0.5/stream
    fps_limit: 10
  - {name: back, source: "0", width: 1280, height: 720, fourcc: MJPG}
detection: {min_face: 60}
tracking: {detect_every: 3}
mqtt: {host: broker.lan, port: 8883, tls: {enabled: true}}
""", "cfg.yaml")
    assert cfg.device.name == "door"
    assert [c.name for c in cfg.cameras] == ["front", "back"]
    assert cfg.cameras[0].fps_limit == 10.0 and isinstance(cfg.cameras[0].fps_limit, float)
    assert cfg.cameras[0].resolved_kind() == "url"
    assert cfg.cameras[1].resolved_kind() == "v4l2"
    assert cfg.detection.min_face == 60
    assert cfg.tracking.detect_every == 3
    assert cfg.mqtt.tls.enabled is True and cfg.mqtt.port == 8883


def test_out_of_range_names_the_full_path_value_and_expectation():
    errs = errors_of("""
cameras:
  - {name: a, source: /dev/video0}
  - {name: b, source: /dev/video1, fps_limit: -3}
""")
    assert len(errs) == 1
    assert errs[0] == "cfg.yaml:4: cameras[1].fps_limit: expected a number in [0.0, 1000.0], got -3.0"


def test_unknown_key_with_suggestion_and_line():
    errs = errors_of("tracking:\n  detect_evry: 2\n")
    assert len(errs) == 1
    assert errs[0].startswith("cfg.yaml:2: tracking.detect_evry: unknown key (did you mean 'detect_every'?)")


def test_unknown_top_level_section():
    errs = errors_of("camera:\n  - {source: x}\n")
    assert "camera: unknown key (did you mean 'cameras'?)" in errs[0]


def test_wrong_types():
    errs = errors_of("""
device: {name: 12}
tracking: {detect_every: two, iou_threshold: true}
cameras: {name: a}
mqtt: {port: 1883.5}
""")
    text = "\n".join(errs)
    assert "device.name: expected a string, got 12 (quote it in the YAML)" in text
    assert "tracking.detect_every: expected an integer in [1, 100], got 'two'" in text
    assert "tracking.iou_threshold: expected a number in [0.01, 0.99], got True" in text
    assert "cameras: expected a list of mappings, got {'name': 'a'}" in text
    assert "mqtt.port: expected an integer in [1, 65535], got 1883.5" in text
    assert len(errs) == 5  # every error at once


def test_choices():
    errs = errors_of("cameras: [{name: a, source: x, kind: usb}]\nlogging: {level: loud}\n")
    assert any("cameras[0].kind: expected one of auto, v4l2, gstreamer, url, file; got 'usb'" in e
               for e in errs)
    assert any("logging.level: expected one of debug, info, warning, error; got 'loud'" in e
               for e in errs)


def test_nested_section_of_another_module():
    errs = errors_of("mqtt:\n  tls:\n    enabeld: true\n")
    assert errs[0].startswith("cfg.yaml:3: mqtt.tls.enabeld: unknown key (did you mean 'enabled'?)")


def test_stage_module_check_is_reported_with_its_path():
    errs = errors_of("detection:\n  thresholds: [0.6, 0.7]\n")
    assert errs == ["cfg.yaml:2: detection.thresholds: expected 3 numbers in [0, 1], got [0.6, 0.7]"]


def test_cross_field_checks():
    errs = errors_of("""
cameras:
  - {name: a, source: /dev/video0}
  - {name: a, source: /dev/video1, fourcc: MJPEG, reconnect_min: 5, reconnect_max: 1}
  - {name: "bad/name", source: "  "}
""")
    text = "\n".join(errs)
    assert "cameras[1].name: duplicate camera name 'a' (also cameras[0])" in text
    assert "cameras[1].fourcc: expected 4 characters such as MJPG or YUYV, got 'MJPEG'" in text
    assert "cameras[1].reconnect_max: must be >= reconnect_min (5.0), got 1.0" in text
    assert "cameras[2].name: expected letters, digits, '-' or '_'" in text
    assert "cameras[2].source: must not be empty" in text


def test_empty_camera_list():
    errs = errors_of("cameras: []\n")
    assert errs == ["cfg.yaml:1: cameras: expected at least 1 item(s), got 0"]


def test_accelerator_settings_checked_by_the_runtime():
    errs = errors_of("models:\n  detector: {type: tpu}\n  embedder: {type: cpu, num_threads: 0}\n")
    text = "\n".join(errs)
    assert "models.detector.type: unknown accelerator 'tpu'; expected one of" in text
    assert "models.embedder.num_threads: expected a positive integer, got 0" in text


def test_odd_values_are_config_errors_not_tracebacks():
    """Values of the wrong shape where a check looks them up, an alias inside its own anchor
    and a host name the socket layer cannot encode: each one a config error naming the key."""
    errs = errors_of("models:\n  detector: {type: [cpu]}\n")
    assert errs == ["cfg.yaml:2: models.detector.type: expected the name of an accelerator, "
                    "got ['cpu']"]
    errs = errors_of("tracking: &a [*a]\n")
    assert errs == ["cfg.yaml: a YAML alias refers to the value that contains it (a structure "
                    "without end)"]
    errs = errors_of("mqtt:\n  host: broker..lan\n")
    assert len(errs) == 1 and errs[0].startswith(
        "cfg.yaml:2: mqtt.host: 'broker..lan' is not a valid host name"), errs
    assert errors_of("mqtt:\n  host: ''\n") == ["cfg.yaml:2: mqtt.host: must not be empty"]
    assert errors_of("quality:\n  min_size: .inf\n") == [
        "cfg.yaml:2: quality.min_size: expected a finite number >= 0.0, got inf"]
    errs = errors_of("mqtt:\n  enabled: true\n  yes: 1\n")
    assert len(errs) == 1 and errs[0].startswith(
        "cfg.yaml:1: mqtt: a key that YAML reads as true (yes, on), not a name: quote it"), errs
    assert errors_of("~: 1\n")[0].startswith(
        "cfg.yaml: (top level): a key that YAML reads as null (~), not a name")
    config.loads("mqtt:\n  host: fe80::1\n")  # addresses are fine
    config.loads("mqtt:\n  host: broker.local\n")


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("device:\n  name: x\ncameras:\n  - name: a\n    source: [unclosed\n")
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    msg = ei.value.errors[0]
    assert re.match(rf"{re.escape(str(p))}:\d+:\d+: YAML syntax error", msg), msg


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        config.load(p)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_defaults_yaml_round_trips():
    text = config.defaults_yaml()
    assert config.loads(text, "defaults") == Config()
    # every key is there, with its help
    assert "stall_timeout: 5.0  # seconds without a frame" in text
    assert yaml.safe_load(text)["tracking"] == dataclasses.asdict(TrackingSettings())


def test_docs_reference_is_current():
    """docs/configuration.md holds the generated reference: regenerate it when a field changes
    (``edged check-config --reference``)."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = config.REFERENCE_BEGIN, config.REFERENCE_END
    assert begin in doc and end in doc
    inside = doc.split(begin, 1)[1].split(end, 1)[0].strip()
    assert inside == config.reference_markdown().strip(), \
        "docs/configuration.md is out of date: run 'edged check-config --update-doc docs/configuration.md'"


@pytest.mark.parametrize("name", ["example-rpi-usb.yaml", "example-jetson-csi.yaml", "example-rtsp.yaml"])
def test_example_configs_are_valid(name):
    cfg = config.load(ROOT / "configs" / name)
    assert cfg.cameras


def test_check_config_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("cameras: [{name: a, source: /dev/video0}]\n")
    r = subprocess.run(EDGED + ["check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: OK"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras:\n  - {name: a, source: /dev/video0, fps_limit: -1}\n")
    r = subprocess.run(EDGED + ["check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:2: cameras[0].fps_limit: expected a number in [0.0, 1000.0], got -1.0" in r.stderr
    r = subprocess.run(EDGED + ["check-config", "--defaults"], capture_output=True, text=True)
    assert r.returncode == 0 and config.loads(r.stdout) == Config()


def test_run_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracking: {detect_every: 0}\n")
    r = subprocess.run(EDGED + ["run", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 78
    assert "tracking.detect_every: expected an integer in [1, 100], got 0" in r.stderr


def test_update_doc(tmp_path):
    md = tmp_path / "c.md"
    md.write_text(f"# title\n{config.REFERENCE_BEGIN}\nOBSOLETE\n{config.REFERENCE_END}\ntail\n")
    r = subprocess.run(EDGED + ["check-config", "--update-doc", str(md)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"{md}: updated"
    text = md.read_text()
    assert text.startswith("# title\n") and text.endswith("tail\n")
    assert config.reference_markdown() in text and "OBSOLETE" not in text
    md.write_text("no markers\n")
    r = subprocess.run(EDGED + ["check-config", "--update-doc", str(md)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "markers" in r.stderr
