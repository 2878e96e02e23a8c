"""The public entry points: a configuration text or file to a checked :class:`Document`
(:func:`parse`, :func:`read`) or :class:`Config` (:func:`loads`, :func:`load`), what a file
leaves to the defaults (:func:`default_notes`) and its paths expanded (:func:`resolve_paths`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from edged.config.builder import ConfigError, _build
from edged.config.safeyaml import MAX_BYTES, _parse_yaml
from edged.config.schema import Config, _example_cameras
from edged.publish.mqtt import MqttSettings


@dataclass
class Document:
    """A configuration file read and checked: the configuration, the mapping the file holds
    (which keys it sets) and its warnings (valid settings that have no effect)."""

    config: Config
    data: dict
    warnings: List[str]


def parse(text: str, source: str = "<string>") -> Document:
    """Check a configuration text; raise :class:`ConfigError` when it is not usable."""
    data, lines = _parse_yaml(text, source)
    cfg, warnings = _build(Config, data, source, lines)
    return Document(cfg, data, warnings)


def loads(text: str, source: str = "<string>") -> Config:
    return parse(text, source).config


def read(path) -> Document:
    """Read and check a configuration file; raise :class:`ConfigError` when it is not usable
    (missing, unreadable, larger than :data:`MAX_BYTES`, or invalid)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"], str(path)) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a configuration file"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"], str(path)) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_BYTES} bytes; a configuration file has "
                           f"a few KB"], str(path))
    return parse(text, str(path))


def load(path) -> Config:
    """Read and check a configuration file; raise :class:`ConfigError` when it is not usable."""
    return read(path).config


def check_file(path) -> List[str]:
    """Errors of a configuration file, or ``[]`` when it is good."""
    try:
        load(path)
    except ConfigError as exc:
        return exc.errors
    return []


def default_notes(data: dict) -> List[str]:
    """What a file leaves to the defaults that reach outside the board: the cameras read and
    the MQTT broker published to (``edged check-config`` says it, for an empty file above all)."""
    notes = []
    if data.get("cameras") is None:
        cams = ", ".join(f"{c.name} on {c.source}" for c in _example_cameras())
        notes.append(f"cameras: not set; edged reads the default camera {cams}")
    mqtt = data.get("mqtt") or {}
    d = MqttSettings()
    if mqtt.get("enabled", d.enabled) and not {"host", "port"} & set(mqtt):
        notes.append(f"mqtt.host, mqtt.port: not set; edged publishes to the default broker "
                     f"{d.host}:{d.port}")
    return notes


def resolve_paths(cfg: Config, base: Optional[Path] = None) -> None:
    """Expand ``~`` and environment variables in the path settings (in place)."""
    for f in dataclasses.fields(cfg.paths):
        v = getattr(cfg.paths, f.name)
        if v:
            setattr(cfg.paths, f.name, os.path.expandvars(os.path.expanduser(v)))
