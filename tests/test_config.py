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
from edged.daemon.capture import CameraSettings
from edged.config import Config, ConfigError
from edged.daemon.track import TrackingSettings

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
    assert cfg.tracking.detect_every == 3
    # the stage modules own their sections
    from edged.vision.detect import DetectionSettings
    from edged.gallery import MatchSettings
    from edged.publish.mqtt import MqttSettings
    from edged.vision.quality import QualitySettings

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
    assert errs == ["cfg.yaml:1:15: a YAML alias refers to the value that contains it (a "
                    "structure without end)"]
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
def test_example_configs_are_valid(name, tmp_path):
    """Valid as shipped, once the files it names under /etc/edged exist (as on the device)."""
    text = (ROOT / "configs" / name).read_text()
    etc = tmp_path / "etc-edged"
    etc.mkdir()
    for ref in sorted(set(re.findall(r"/etc/edged/([\w.-]+)", text))):
        (etc / ref).write_text("placeholder\n")
    path = tmp_path / name
    path.write_text(text.replace("/etc/edged/", f"{etc}/"))
    cfg = config.load(path)
    assert cfg.cameras


def test_check_config_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("cameras: [{name: a, source: /dev/video0}]\n")
    r = subprocess.run(EDGED + ["check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: OK"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras:\n  - {name: a, source: /dev/video0, fps_limit: -1}\n")
    r = subprocess.run(EDGED + ["check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 78  # EX_CONFIG, as edged run
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


# ---------------------------------------------------------------------------- hostile files

EDGED_EXE = str(Path(sys.executable).parent / "edged")  # the installed entry point


def _bounded():
    """The child's address space is capped at 1 GiB: a file that makes the loader expand
    without bound ends in MemoryError (a failed test), not in the machine swapping."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def edged(*args, timeout=60):
    """``edged ARGS`` in a child bounded in time (the test fails, never hangs) and memory."""
    return subprocess.run([EDGED_EXE, *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_bounded)


def _alias_bomb() -> str:
    """A "billion laughs": 9 levels of 9 aliases, 9**9 (387 million) strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HOSTILE = {
    # (text, what the one error says)
    "alias-bomb": (_alias_bomb(), "YAML aliases expand to more than 20000 values"),
    "deep-list": ("tracking: " + "[" * 2000 + "]" * 2000 + "\n",
                  "bad.yaml:1:42: YAML nested deeper than 32 levels"),
    "int-400": ("tracking:\n  detect_every: " + "9" * 400 + "\n",
                "bad.yaml:2: tracking.detect_every: an integer of 400 digits is too large for "
                "any setting (at most 20 digits)"),
    "int-5000": ("tracking:\n  detect_every: " + "9" * 5000 + "\n",
                 "bad.yaml:2: tracking.detect_every: an integer of 5000 digits is too large"),
    "int-400-in-a-float": ("cameras:\n  - {name: a, source: '0', fps_limit: " + "9" * 400 + "}\n",
                           "bad.yaml:2: cameras[0].fps_limit: an integer of 400 digits"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_one_clear_error_fast_exit_78(tmp_path, case):
    """An alias bomb (a few hundred bytes that took over 4 GB and 300 s), a 2000-level nested
    list (9 s, and named an alias that does not exist), integers of 400 and 5000 digits (a
    traceback): each one is refused at once, in bounded memory, with one error naming where,
    by ``check-config`` and by ``edged run``, both with exit status 78 (EX_CONFIG)."""
    text, expected = HOSTILE[case]
    assert len(text.encode()) < 12_000
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    for args in (["check-config", str(bad)], ["run", "--config", str(bad)]):
        r = edged(*args)
        assert r.returncode == 78, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "alias" not in r.stderr.replace(
            "YAML aliases", ""), r.stderr[-2000:]
        errors = [ln for ln in r.stderr.splitlines() if re.search(r"bad\.yaml:\d", ln)]
        assert len(errors) == 1 and expected in errors[0], r.stderr[-2000:]


def test_values_the_constructor_cannot_convert_name_their_key():
    assert errors_of("device:\n  name: 2001-13-45\n") == [
        "cfg.yaml:2: device.name: cannot read '2001-13-45': month must be in 1..12"]
    assert errors_of("models:\n  detector: {type: cpu, num_threads: -" + "1" * 30 + "}\n") == [
        "cfg.yaml:2: models.detector.num_threads: an integer of 30 digits is too large for any "
        "setting (at most 20 digits)"]
    # an alias that expands deeper than the bound, each level through another alias
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
    errs = errors_of(text)
    assert len(errs) == 1 and "YAML nested deeper than 32 levels once its aliases are expanded" \
        in errs[0], errs
    # what a real file does with anchors (a merge key shared by two cameras) still works
    cfg = config.loads("""
cameras:
  - &first {name: a, source: "rtsp://h/1", fps_limit: 5}
  - {<<: *first, name: b, source: "rtsp://h/2"}
""")
    assert [(c.name, c.fps_limit) for c in cfg.cameras] == [("a", 5.0), ("b", 5.0)]


def test_config_file_errors_exit_78(tmp_path):
    """No such file, a directory, an unreadable or oversized file, and a camera reading a
    video file that does not exist: ``edged run`` exits 78 and says what and where."""
    clip = tmp_path / "videos" / "door.mp4"
    missing_clip = tmp_path / "missing-clip.yaml"
    missing_clip.write_text(f"cameras:\n  - {{name: door, source: {clip}}}\n"
                            "mqtt: {enabled: false}\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (config.MAX_BYTES + 10) + "\n")
    cases = [
        (tmp_path / "nope.yaml", f"{tmp_path / 'nope.yaml'}: no such file"),
        (tmp_path, "is a directory, not a configuration file"),
        (huge, f"larger than {config.MAX_BYTES} bytes"),
        (missing_clip, f"{missing_clip}:2: cameras[0].source: video file '{clip}' does not exist"),
    ]
    for path, expected in cases:
        r = edged("run", "--config", str(path))
        assert r.returncode == 78, (path, r.stderr[-2000:])
        assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        r = edged("check-config", str(path))
        assert r.returncode == 78 and expected in r.stderr, (path, r.stderr[-2000:])
    clip.parent.mkdir()
    clip.write_bytes(b"")  # the file exists: the configuration is valid
    r = edged("check-config", str(missing_clip))
    assert r.returncode == 0 and r.stdout.strip() == f"{missing_clip}: OK", r.stderr


def test_unreadable_config_file_exits_78(tmp_path):
    import os

    p = tmp_path / "secret.yaml"
    p.write_text("device: {name: x}\n")
    p.chmod(0)
    # root reads any file: run the child as nobody
    drop = [] if os.geteuid() else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run(drop + [EDGED_EXE, "run", "--config", str(p)], capture_output=True,
                       text=True, timeout=60, preexec_fn=_bounded)
    assert r.returncode == 78, r.stderr[-2000:]
    assert f"{p}: cannot read: [Errno 13] Permission denied" in r.stderr, r.stderr[-2000:]


def test_empty_file_says_which_defaults_it_runs_on(tmp_path):
    """An empty file is valid (every key has its default), and check-config says what that
    means outside the board: the camera it reads and the broker it publishes to."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    r = edged("check-config", str(empty))
    assert r.returncode == 0 and r.stdout.strip() == f"{empty}: OK"
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: ")]
    assert notes == [
        f"note: {empty}: cameras: not set; edged reads the default camera cam0 on /dev/video0",
        f"note: {empty}: mqtt.host, mqtt.port: not set; edged publishes to the default broker "
        f"127.0.0.1:1883"], r.stderr
    set_ = tmp_path / "set.yaml"
    set_.write_text("cameras: [{name: a, source: '0'}]\nmqtt: {host: broker.lan}\n")
    r = edged("check-config", str(set_))
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    assert config.default_notes({"mqtt": {"enabled": False}, "cameras": [{}]}) == []


def test_v4l2_settings_on_another_kind_of_source_are_a_warning(tmp_path):
    """width, height and fourcc only reach a V4L2 device: set on an RTSP, file or GStreamer
    camera they do nothing, which check-config says (the file stays valid, exit 0)."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    p = tmp_path / "cams.yaml"
    p.write_text(f"""cameras:
  - {{name: ip, source: "rtsp://cam.lan/s", width: 1280, fourcc: MJPG}}
  - {{name: usb, source: /dev/video0, width: 1280, height: 720, fourcc: MJPG}}
  - {{name: clip, source: {clip}, height: 720, width: 0}}
""")
    r = edged("check-config", str(p))
    assert r.returncode == 0 and r.stdout.strip() == f"{p}: OK", r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "V4L2" in ln]
    assert warnings == [
        f"warning: {p}:2: cameras[0].width: applies to V4L2 devices only; this url source "
        f"ignores it",
        f"warning: {p}:2: cameras[0].fourcc: applies to V4L2 devices only; this url source "
        f"ignores it",
        f"warning: {p}:4: cameras[2].height: applies to V4L2 devices only; this file source "
        f"ignores it"], r.stderr
    assert config.parse(p.read_text(), "c.yaml").warnings == [
        w.replace(f"warning: {p}", "c.yaml") for w in warnings]


@pytest.mark.parametrize("embedder,want", [("sface", 0.456), ("mobilefacenet", 0.58)])
def test_match_threshold_follows_the_embedder_unless_set(embedder, want):
    """``match.threshold`` left unset is the configured embedder's manifest default (SFace's
    0.456, not MobileFaceNet's 0.58); a threshold in the file wins whichever embedder runs."""
    from edged.vision.embed import EmbedderSpec
    from edged.runtime.modelstore import Manifest

    entry = Manifest.load().model("embedder", embedder)
    assert EmbedderSpec.from_entry(entry).identification == want
    cfg = config.loads(f"models: {{embedder_model: {embedder}}}\n")
    assert cfg.match.threshold is None  # (what the file says: nothing)
    assert cfg.match_settings().threshold == want
    # the embedder in service decides when it is known (a drop may have changed it)
    other = Manifest.load().model("embedder", "mobilefacenet" if embedder == "sface" else "sface")
    assert cfg.match_settings(other.sha256).threshold == EmbedderSpec.from_entry(other).identification
    assert cfg.match_settings("00" * 32).threshold == want  # unknown file: the configured one's
    cfg = config.loads(f"models: {{embedder_model: {embedder}}}\nmatch: {{threshold: 0.5}}\n")
    assert cfg.match_settings().threshold == 0.5 and cfg.match_settings(other.sha256).threshold == 0.5


def test_the_threshold_reference_names_each_embedders_default():
    """``check-config --defaults`` and the reference say ``null`` = the embedder's, with each
    embedder's figure as its manifest entry gives it."""
    from edged.vision.embed import EmbedderSpec
    from edged.runtime.modelstore import Manifest

    m = Manifest.load()
    line = next(ln for ln in config.defaults_yaml().splitlines()
                if ln.startswith("  threshold: null  # identification threshold"))
    assert "null (the default) = the threshold of the embedder in service" in line
    for name in m.names("embedder"):
        thr = EmbedderSpec.from_entry(m.model("embedder", name)).identification
        assert f"{thr} for {name}" in line, (name, thr, line)
    row = next(ln for ln in config.reference_markdown().splitlines()
               if ln.startswith("| `match.threshold` |"))
    assert "| a number or null | `null` |" in row and "0.456 for sface" in row
