"""The daemon's configuration: a typed tree of dataclasses loaded from YAML.

This package is a *generic* loader.  Each stage owns its settings as a plain
``@dataclasses.dataclass`` in its own module (``DetectionSettings`` in :mod:`edged.vision.detect`,
``QualitySettings`` in :mod:`edged.vision.quality`, ``MatchSettings`` in :mod:`edged.gallery`,
``MqttSettings`` in :mod:`edged.publish.mqtt`, ``CameraSettings`` in :mod:`edged.daemon.capture`,
``TrackingSettings`` in :mod:`edged.daemon.track`, ``LoggingSettings`` in :mod:`edged.logs`), with
every default written once there and per-field metadata ``{"min", "max", "choices", "help"}``;
:mod:`edged.config.schema` holds the sections edged owns itself and :class:`Config`, the whole
file. :func:`build` (:mod:`edged.config.builder`) checks a mapping against those dataclasses:
unknown keys, wrong types, out-of-range values and missing required keys are all reported at
once, each with the key's full path (``cameras[1].fps_limit``), the bad value and what was
expected, and with the line of the YAML file when the mapping came from one.

A dataclass may add checks that involve several fields with a ``config_errors(self)`` method
returning ``[(subkey or "", message)]`` (``subkey`` relative to the dataclass), or else a
``check(self)`` method raising ``ValueError("section.key: message")``; ``config_warnings(self)``
(same shape) names valid settings that have no effect (:attr:`Document.warnings`).

The YAML is read by a bounded SafeLoader (:mod:`edged.config.safeyaml`): a file over
:data:`MAX_BYTES`, nested deeper than :data:`MAX_DEPTH`, whose aliases expand past
:data:`MAX_VALUES` values, or with an integer of more than :data:`MAX_INT_DIGITS` digits is
refused with one error (file, line, key) before anything is built, in time and memory
proportional to the file. :mod:`edged.config.documents` has the entry points: :func:`parse`,
:func:`loads`, :func:`read`, :func:`load`, :func:`check_file`, :func:`default_notes` and
:func:`resolve_paths`.

:func:`defaults_yaml` prints the full default configuration and :func:`reference_markdown` the
reference table kept in docs/configuration.md (``edged check-config --defaults``,
``--reference``, ``--update-doc``; :mod:`edged.config.reference`).
"""
from __future__ import annotations

import logging

from edged.config.builder import ConfigError, build
from edged.config.schema import (Config, DeviceSettings, ModelsSettings, PathsSettings,
                                 PipelineOptions)
from edged.config.safeyaml import MAX_BYTES, MAX_DEPTH, MAX_INT_DIGITS, MAX_VALUES
from edged.config.documents import (Document, check_file, default_notes, load, loads, parse,
                                    read, resolve_paths)
from edged.config.reference import (REFERENCE_BEGIN, REFERENCE_END, defaults_yaml,
                                    reference_markdown, to_dict, update_reference_doc)

log = logging.getLogger("edged.config")

__all__ = ["Config", "ConfigError", "Document", "load", "loads", "parse", "read", "build",
           "check_file", "default_notes", "defaults_yaml",
           "reference_markdown", "DeviceSettings", "ModelsSettings", "PathsSettings",
           "PipelineOptions",
           "to_dict", "resolve_paths", "update_reference_doc", "REFERENCE_BEGIN", "REFERENCE_END",
           "MAX_BYTES", "MAX_VALUES", "MAX_DEPTH", "MAX_INT_DIGITS"]
