"""The daemon's configuration: a typed tree of dataclasses loaded from YAML.

This module is a *generic* loader.  Each stage owns its settings as a plain
``@dataclasses.dataclass`` in its own module (``DetectionSettings`` in :mod:`edged.vision.detect`,
``QualitySettings`` in :mod:`edged.vision.quality`, ``MatchSettings`` in :mod:`edged.gallery`,
``MqttSettings`` in :mod:`edged.publish.mqtt`, ``CameraSettings`` in :mod:`edged.daemon.capture`,
``TrackingSettings`` in :mod:`edged.daemon.track`, ``LoggingSettings`` in :mod:`edged.logs`), with
every default written once there and per-field metadata ``{"min", "max", "choices", "help"}``.
:func:`build` checks a mapping against those dataclasses: unknown keys, wrong types,
out-of-range values and missing required keys are all reported at once, each with the key's
full path (``cameras[1].fps_limit``), the bad value and what was expected, and with the line
of the YAML file when the mapping came from one.

A dataclass may add checks that involve several fields with a ``config_errors(self)`` method
returning ``[(subkey or "", message)]`` (``subkey`` relative to the dataclass), or else a
``check(self)`` method raising ``ValueError("section.key: message")``; ``config_warnings(self)``
(same shape) names valid settings that have no effect (:attr:`Document.warnings`).

The YAML is read by a bounded SafeLoader: a file over :data:`MAX_BYTES`, nested deeper than
:data:`MAX_DEPTH`, whose aliases expand past :data:`MAX_VALUES` values, or with an integer of
more than :data:`MAX_INT_DIGITS` digits is refused with one error (file, line, key) before
anything is built, in time and memory proportional to the file.

:func:`defaults_yaml` prints the full default configuration and :func:`reference_markdown` the
reference table kept in docs/configuration.md (``edged check-config --defaults``,
``--reference``, ``--update-doc``).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

log = logging.getLogger("edged.config")

__all__ = ["Config", "ConfigError", "Document", "load", "loads", "parse", "read", "build",
           "check_file", "default_notes", "defaults_yaml",
           "reference_markdown", "DeviceSettings", "ModelsSettings", "PathsSettings",
           "PipelineOptions",
           "to_dict"]


class ConfigError(ValueError):
    """A configuration cannot be used.  ``errors`` lists one line per problem."""

    def __init__(self, errors, source: str = "config"):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: {len(self.errors)} error{'s' if len(self.errors) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join("  " + e for e in self.errors))


# ---------------------------------------------------------------------------- own sections


@dataclass
class DeviceSettings:
    name: str = field(default="", metadata={
        "help": "device name used in MQTT topics, client id and events; empty = the host name"})

    def resolved_name(self) -> str:
        return self.name or socket.gethostname().split(".")[0] or "edged"

    def config_errors(self):
        bad = set(self.name) & set("/#+ \t\n")
        if bad:
            return [("name", f"must not contain {''.join(sorted(bad))!r} "
                             f"(it becomes an MQTT topic level), got {self.name!r}")]
        return []


@dataclass
class ModelsSettings:
    detector: Dict[str, Any] = field(default_factory=lambda: {"type": "cpu", "num_threads": 1},
                                     metadata={"help": "accelerator for P-Net, R-Net and O-Net "
                                                       "(see docs/models.md: type cpu, gpu, nnapi, "
                                                       "edgetpu, external and their keys)"})
    embedder: Dict[str, Any] = field(default_factory=lambda: {"type": "cpu", "num_threads": 1},
                                     metadata={"help": "accelerator for the embedder"})
    embedder_model: str = field(default="mobilefacenet", metadata={
        "help": "the embedder: mobilefacenet (192 values, the default) or sface (128 values, "
                "stronger, about 2.5x the cost per face; 'edged models install --embedder "
                "sface'); galleries must be built with the same one (docs/models.md)"})
    max_memory_mb: int = field(default=512, metadata={
        "min": 16, "max": 1048576,
        "help": "a dropped model needing more memory than this at an input size it runs at "
                "is refused (docs/models.md, memory check)"})

    def config_errors(self):
        from edged.runtime import SettingsError, parse_settings

        errs = self._embedder_model_errors()
        for key in ("detector", "embedder"):
            try:
                parse_settings(getattr(self, key), key)
            except SettingsError as exc:
                msg = str(exc)
                # parse_settings names the key as "<key>.sub: ..."; keep it relative.
                sub, _, rest = msg.partition(": ")
                errs.append((sub if sub.startswith(key) else key, rest or msg))
        return errs

    def _embedder_model_errors(self):
        from edged.runtime.modelstore import Manifest, ModelError

        try:
            names = Manifest.load().names("embedder")
        except ModelError:
            return []  # (no manifest here: loading the models says so)
        if self.embedder_model in names:
            return []
        return [("embedder_model", f"expected one of {', '.join(names)}; "
                                   f"got {self.embedder_model!r}")]

    def model_name(self, role: str) -> str:
        """The manifest name of the model run for ``role`` (empty: the role's default)."""
        return self.embedder_model if role == "embedder" else ""


@dataclass
class PipelineOptions:
    workers: int = field(default=1, metadata={
        "min": 1, "max": 16, "help": "detection threads, each with its own detector "
                                     "interpreters; frames are tracked in capture order after"})
    flip: bool = field(default=False, metadata={
        "help": "also embed the mirrored face and average the two (build the gallery "
                "with the same setting: edged gallery build --flip)"})
    detect_width: int = field(default=640, metadata={
        "min": 0, "max": 8192,
        "help": "detect faces on a copy of each frame scaled to this width (aspect kept, "
                "never enlarged); boxes are mapped back and faces are aligned and embedded "
                "from the full-resolution frame; 0 = detect on the frame itself; "
                "cameras[].detect_width overrides it"})



@dataclass
class PathsSettings:
    models_dir: str = field(default="", metadata={
        "help": "models directory; empty = $EDGED_MODELS_DIR, else /var/lib/edged/models for "
                "root, else ~/.local/share/edged/models"})
    gallery: str = field(default="/var/lib/edged/gallery.edgal", metadata={
        "help": "gallery file of enrolled people (edged gallery build); watched and hot-swapped"})
    state_dir: str = field(default="/var/lib/edged/state", metadata={
        "help": "writable directory for the event spool and runtime state"})
    drop_dir: str = field(default="", metadata={
        "help": "directory watched for over-the-air model drops (docs/ota.md); empty = the "
                "models directory"})


# ---------------------------------------------------------------------------- stage sections


from edged.daemon.capture import CameraSettings  # noqa: E402
from edged.vision.detect import DetectionSettings  # noqa: E402
from edged.gallery import MatchSettings  # noqa: E402
from edged.publish.http import HttpSettings  # noqa: E402
from edged.vision.liveness import LivenessSettings  # noqa: E402
from edged.logs import LoggingSettings  # noqa: E402
from edged.vision.motion import MotionSettings  # noqa: E402
from edged.publish.mqtt import MqttSettings  # noqa: E402
from edged.ota.drops import DropSettings  # noqa: E402
from edged.vision.quality import QualitySettings  # noqa: E402
from edged.daemon.track import TrackingSettings  # noqa: E402


def _example_cameras():
    return [CameraSettings(name="cam0", source="/dev/video0")]


@dataclass
class Config:
    """The whole configuration file."""

    device: DeviceSettings = field(default_factory=DeviceSettings,
                                   metadata={"help": "this device"})
    cameras: List[CameraSettings] = field(default_factory=_example_cameras, metadata={
        "help": "one entry per camera (at least one)", "min_items": 1})
    detection: DetectionSettings = field(default_factory=DetectionSettings,
                                         metadata={"help": "MTCNN face detection"})
    quality: QualitySettings = field(default_factory=QualitySettings, metadata={
        "help": "minimum face quality for recognition (faces below are still tracked)"})
    liveness: LivenessSettings = field(default_factory=LivenessSettings, metadata={
        "help": "anti-spoofing: is the face live or a photo / screen (docs/models.md)"})
    match: MatchSettings = field(default_factory=MatchSettings,
                                 metadata={"help": "gallery search (identification)"})
    tracking: TrackingSettings = field(default_factory=TrackingSettings,
                                       metadata={"help": "tracking and evidence accumulation"})
    motion: MotionSettings = field(default_factory=MotionSettings, metadata={
        "help": "motion gating: detect only where something moves or a face is tracked"})
    pipeline: PipelineOptions = field(default_factory=PipelineOptions, metadata={
        "help": "how frames go through the face pipeline"})
    models: ModelsSettings = field(default_factory=ModelsSettings,
                                   metadata={"help": "per-model accelerators"})
    paths: PathsSettings = field(default_factory=PathsSettings, metadata={"help": "files"})
    drops: DropSettings = field(default_factory=DropSettings, metadata={
        "help": "over-the-air model and gallery drops (docs/ota.md)"})
    mqtt: MqttSettings = field(default_factory=MqttSettings, metadata={"help": "MQTT"})
    http: HttpSettings = field(default_factory=HttpSettings, metadata={
        "help": "the /metrics and /healthz endpoint, off by default (docs/metrics.md)"})
    logging: LoggingSettings = field(default_factory=LoggingSettings,
                                     metadata={"help": "log output"})

    def config_errors(self):
        errs = []
        seen = {}
        for i, cam in enumerate(self.cameras or []):
            name = getattr(cam, "name", None)
            if name in seen:
                errs.append((f"cameras[{i}].name",
                             f"duplicate camera name {name!r} (also cameras[{seen[name]}])"))
            seen.setdefault(name, i)
        return errs

    def match_settings(self, embedder_sha256: Optional[str] = None) -> MatchSettings:
        """``match`` with its threshold decided: the file's; else (``match.threshold: null``)
        the manifest default of the embedder whose file has ``embedder_sha256`` (the one in
        service, which a drop may have changed), else of ``models.embedder_model``."""
        from edged.vision.embed import EmbedderSpec
        from edged.runtime.modelstore import Manifest, ModelError

        if self.match.threshold is not None:
            return self.match
        spec = EmbedderSpec.of_model(embedder_sha256) if embedder_sha256 else None
        if spec is None:
            try:
                spec = EmbedderSpec.from_entry(
                    Manifest.load().model("embedder", self.models.embedder_model))
            except (ModelError, ValueError):
                spec = None  # (no manifest, or no such name: loading the models says so)
        return self.match.for_embedder(spec)


# ---------------------------------------------------------------------------- loader


_NONE = type(None)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str or tp is Path:
        return "a string"
    if origin is typing.Union:
        non_none = [a for a in args if a is not _NONE]
        names = " or ".join(_type_name(a) for a in non_none)
        return names + (" or null" if _NONE in args else "")
    if origin in (list, tuple) or tp in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return f"a mapping of {_type_name(args[1])}" if len(args) == 2 else "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "mappings"
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        tp, _type_name(tp))


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward refs: fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


class _Builder:
    def __init__(self, lines: Optional[dict] = None, source: str = ""):
        self.errors: List[Tuple[str, str]] = []
        self.warnings: List[Tuple[str, str]] = []
        self.lines = lines or {}
        self.source = source

    def error(self, path: str, msg: str) -> None:
        self.errors.append((path, msg))

    def messages(self, entries=None) -> List[str]:
        out = []
        for path, msg in self.errors if entries is None else entries:
            line = self._line_of(path)
            where = (f"{self.source}:{line}: " if line else f"{self.source}: ") if self.source else ""
            out.append(f"{where}{path or '(top level)'}: {msg}")
        return out

    def _line_of(self, path: str):
        p = path
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            # strip the last component: ".key" or "[i]"
            cut = max(p.rfind("."), p.rfind("["))
            p = p[:cut] if cut > 0 else ""

    # ---- conversion

    def convert(self, tp, value, path: str, meta: Optional[dict] = None):
        meta = meta or {}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return value
        if origin is typing.Union:
            if value is None:
                if _NONE in args:
                    return None
                self.error(path, f"expected {_type_name(tp)}, got null")
                return _BAD
            non_none = [a for a in args if a is not _NONE]
            if len(non_none) == 1:
                return self.convert(non_none[0], value, path, meta)
            for a in non_none:  # first type that accepts it, silently
                sub = _Builder(self.lines, self.source)
                v = sub.convert(a, value, path, meta)
                if not sub.errors:
                    return v
            self.error(path, f"expected {_type_name(tp)}, got {_short(value)}")
            return _BAD
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin in (list, tuple) or tp in (list, tuple):
            if not isinstance(value, list):
                self.error(path, f"expected {_type_name(tp)}, got {_short(value)}")
                return _BAD
            item_tp = args[0] if args else Any
            out = [self.convert(item_tp, v, f"{path}[{i}]", _item_meta(meta))
                   for i, v in enumerate(value)]
            if "min_items" in meta and len(out) < meta["min_items"]:
                self.error(path, f"expected at least {meta['min_items']} item(s), got {len(out)}")
            return out if origin is not tuple else tuple(out)
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                self.error(path, f"expected {_type_name(tp)}, got {_short(value)}")
                return _BAD
            val_tp = args[1] if len(args) == 2 else Any
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    self.error(f"{path}.{k}", f"keys must be strings, got {_short(k)}")
                    continue
                out[k] = self.convert(val_tp, v, f"{path}.{k}", _item_meta(meta))
            return out
        if tp is bool:
            if not isinstance(value, bool):
                self.error(path, f"expected true or false, got {_short(value)}")
                return _BAD
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    self.error(path, f"expected an integer{_range(meta)}, got {_short(value)}")
                    return _BAD
            return self.check_meta(value, path, meta)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(path, f"expected a number{_range(meta)}, got {_short(value)}")
                return _BAD
            return self.check_meta(float(value), path, meta)
        if tp is str or tp is Path:
            if not isinstance(value, str):
                hint = " (quote it in the YAML)" if isinstance(value, (int, float, bool)) else ""
                self.error(path, f"expected a string, got {_short(value)}{hint}")
                return _BAD
            return self.check_meta(value, path, meta)
        # Enum or other plain class: accept instances, else try the constructor.
        if isinstance(tp, type):
            if isinstance(value, tp):
                return value
            try:
                return tp(value)
            except Exception as exc:
                self.error(path, f"expected {_type_name(tp)}, got {_short(value)} ({exc})")
                return _BAD
        return value

    def check_meta(self, value, path, meta):
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            self.error(path, f"expected one of {', '.join(map(str, choices))}; got {_short(value)}")
            return _BAD
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):  # NaN, .inf
                self.error(path, f"expected a finite number{_range(meta)}, got {_short(value)}")
                return _BAD
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                self.error(path, f"expected {'a number' if isinstance(value, float) else 'an integer'}"
                                 f"{_range(meta)}, got {_short(value)}")
                return _BAD
        return value

    def build(self, cls, data, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(path, f"expected a mapping ({_type_name(cls)}), got {_short(data)}")
            return _BAD
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = _hints(cls)
        kwargs = {}
        ok = True
        for key, value in data.items():
            if not isinstance(key, str):  # `yes:`, `on:`, `~:`, `1:` are read as other types
                shown = {True: "true (yes, on)", False: "false (no, off)", None: "null (~)"}.get(
                    key, repr(key)) if isinstance(key, (bool, type(None))) else repr(key)
                self.error(path, f"a key that YAML reads as {shown}, not a name: quote it, or "
                                 f"expected one of: {', '.join(fields)}")
                ok = False
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in fields:
                near = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.error(sub, f"unknown key{hint}; expected one of: {', '.join(fields)}")
                ok = False
                continue
            f = fields[key]
            v = self.convert(hints.get(key, f.type), value, sub, dict(f.metadata))
            if v is _BAD or _contains_bad(v):
                ok = False
                continue
            kwargs[key] = v
        for name, f in fields.items():
            if (name not in data and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING):
                self.error(f"{path}.{name}" if path else name,
                           f"required key missing ({f.metadata.get('help', _type_name(hints.get(name)))})")
                ok = False
        if not ok:
            return _BAD
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            self.error(path, str(exc))
            return _BAD
        self._hook(obj, "config_errors", path, self.errors)
        self._hook(obj, "config_warnings", path, self.warnings)
        check = getattr(obj, "check", None)  # a stage module's own checks, when it has no
        if callable(check) and not callable(getattr(obj, "config_errors", None)):  # config_errors
            try:
                check()
            except (TypeError, ValueError) as exc:
                self._check_error(path, str(exc))
        return obj

    @staticmethod
    def _hook(obj, name: str, path: str, into: list) -> None:
        """Add what ``obj.<name>()`` returns, ``[(subkey, message)]``, to ``into``."""
        check = getattr(obj, name, None)
        if not callable(check):
            return
        try:
            found = check() or []
        except Exception as exc:  # a check that trips on an odd value still names the key
            found = [("", f"cannot be checked: {type(exc).__name__}: {exc}")]
        for sub, msg in found:
            into.append((".".join(p for p in (path, sub) if p).replace(".[", "["), msg))

    def _check_error(self, path: str, msg: str) -> None:
        """A ``check()`` message, which names its key from the section (``detection.x: ...``)."""
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            # re-root the key under this dataclass's full path (cameras[1].x, mqtt.tls.x ...)
            last = path.rsplit(".", 1)[-1] if path else ""
            base = head.split(".", 1)
            if last and base[0] == last:
                head = path + ("." + base[1] if len(base) > 1 else "")
            elif path and not head.startswith(path):
                head = f"{path}.{head}"
            self.error(head, rest)
        else:
            self.error(path, msg)


def _item_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k in ("min", "max", "choices")}


def _range(meta: dict) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


class _BadType:
    def __repr__(self):
        return "<invalid>"


_BAD = _BadType()


def _contains_bad(v) -> bool:
    if v is _BAD:
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_bad(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_bad(x) for x in v.values())
    return False


def build(cls, data, source: str = "", lines: Optional[dict] = None):
    """Build ``cls`` from ``data``; raise :class:`ConfigError` listing every problem."""
    return _build(cls, data, source, lines)[0]


def _build(cls, data, source: str = "", lines: Optional[dict] = None):
    """``(obj, warnings)``: :func:`build` with the ``config_warnings`` of every section."""
    b = _Builder(lines, source)
    obj = b.build(cls, data, "")
    if b.errors or obj is _BAD:
        raise ConfigError(b.messages() or ["invalid configuration"], source or "config")
    return obj, b.messages(b.warnings)


# ---------------------------------------------------------------------------- YAML


#: Bounds on a configuration document, checked while PyYAML composes it (before anything is
#: built): a real file has a few hundred values, a handful of levels and a few KB.
MAX_BYTES = 1 << 20
MAX_VALUES = 20_000  # values once every alias is expanded (a "billion laughs" has 10**9)
MAX_DEPTH = 32  # nested mappings and lists, aliases expanded
MAX_INT_DIGITS = 20  # a 64-bit integer; longer ones are refused before Python converts them


class _Refused(Exception):
    """A document the bounded loader will not build: at ``mark`` (composing) or ``node``."""

    def __init__(self, message: str, mark=None, node=None):
        super().__init__(message)
        self.mark = mark if node is None else node.start_mark
        self.node = node


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses, while composing, a document nested deeper than
    :data:`MAX_DEPTH`, an alias inside its own anchor, and one whose aliases expand to more
    than :data:`MAX_VALUES` values; constructing, an integer longer than
    :data:`MAX_INT_DIGITS` digits and a scalar its constructor cannot convert (a
    ``2001-13-45`` date) raise :class:`_Refused` with the node instead of a traceback."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values = 0  # values composed so far, an alias counting what it expands to
        self._done = {}  # id(node) -> (values, levels) of a finished node, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._done:  # its anchor is still open: `a: &x [*x]`
                raise _Refused("a YAML alias refers to the value that contains it (a structure "
                               "without end)", mark)
            self._count(*self._done[id(node)], mark)
            return node
        mark = self.peek_event().start_mark
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"YAML nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        values = 1 + sum(self._done[id(c)][0] for c in children)
        levels = 1 + max((self._done[id(c)][1] for c in children), default=0)
        self._done[id(node)] = (values, levels)
        self._count(1, levels, mark)
        return node

    def _count(self, values: int, levels: int, mark) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise _Refused(f"YAML aliases expand to more than {MAX_VALUES} values (a "
                           f"configuration has a few hundred)", mark)
        if self._depth + levels > MAX_DEPTH:
            raise _Refused(f"YAML nested deeper than {MAX_DEPTH} levels once its aliases are "
                           f"expanded", mark)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # a scalar its constructor cannot convert
            raise _Refused(f"cannot read {_short(node.value)}: {exc}", node=node) from None

    def construct_yaml_int(self, node):
        digits = len(node.value.lstrip("+-").replace("_", ""))
        if digits > MAX_INT_DIGITS:
            raise _Refused(f"an integer of {digits} digits is too large for any setting (at "
                           f"most {MAX_INT_DIGITS} digits)", node=node)
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _line_map(node, path: str = "", out: Optional[dict] = None,
              paths: Optional[dict] = None) -> dict:
    """``{key path: 1-based line}`` for every node of a composed YAML document; ``paths``
    gets ``{id(node): key path}`` (the first path of a node reached through aliases)."""
    out = {} if out is None else out
    if node is None:
        return out
    if paths is not None:
        paths.setdefault(id(node), path)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            sub = f"{path}.{key}" if path else key
            out[sub] = k.start_mark.line + 1
            if paths is not None:
                paths.setdefault(id(k), path)
            _line_map(v, sub, out, paths)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            sub = f"{path}[{i}]"
            out[sub] = v.start_mark.line + 1
            _line_map(v, sub, out, paths)
    return out


def _refusal(exc: _Refused, source: str, paths: dict) -> ConfigError:
    mark = exc.mark
    if exc.node is not None:  # constructing: the key is known
        where = f"{source}:{mark.line + 1}: {paths.get(id(exc.node)) or '(top level)'}"
    else:
        where = f"{source}:{mark.line + 1}:{mark.column + 1}"
    return ConfigError([f"{where}: {exc}"], source)


def _parse_yaml(text: str, source: str):
    """``(data, {key path: line})`` of a YAML document, within the bounds above."""
    loader = _BoundedLoader(text)
    paths: dict = {}
    try:
        node = loader.get_single_node()
        lines = _line_map(node, paths=paths)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as exc:
        raise _refusal(exc, source, paths) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{where}: YAML syntax error: {problem}"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"], source) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the file must be a mapping of sections "
                           f"(device, cameras, ...), got {type(data).__name__}"], source)
    return data, lines


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


def to_dict(obj):
    """A dataclass tree as plain data (for YAML and JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------- defaults & docs


def _walk(cls, prefix: str = ""):
    """``(path, field, type, default)`` for every leaf and section of ``cls``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        path = f"{prefix}.{f.name}" if prefix else f.name
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else dataclasses.MISSING)
        yield path, f, tp, default
        inner = _list_item_dataclass(tp)
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, path)
        elif inner is not None:
            yield from _walk(inner, path + "[]")


def _list_item_dataclass(tp):
    if typing.get_origin(tp) in (list, tuple):
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _yaml_scalar(v) -> str:
    s = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return (s[:-3] if s.endswith("...") else s).strip()  # (str.removesuffix: Python 3.9)


def defaults_yaml() -> str:
    """The full default configuration as commented YAML (``edged check-config --defaults``)."""
    lines = ["# edged configuration: every key with its default value.",
             "# Generated from the settings dataclasses (edged check-config --defaults).", ""]
    _emit_yaml(Config(), Config, 0, lines)
    return "\n".join(lines).rstrip() + "\n"


def _comment(f) -> str:
    meta = f.metadata
    parts = []
    if meta.get("help"):
        parts.append(meta["help"])
    rng = _range(meta).strip()
    if rng:
        parts.append(rng)
    if meta.get("choices"):
        parts.append("one of: " + ", ".join(map(str, meta["choices"])))
    return "; ".join(parts)


def _emit_yaml(obj, cls, indent: int, lines: list, first_prefix: str = "") -> None:
    pad = " " * indent
    hints = _hints(cls)
    first = True
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        value = getattr(obj, f.name)
        lead = (first_prefix if first else pad) if first_prefix else pad
        first = False
        comment = _comment(f)
        if dataclasses.is_dataclass(tp):
            if indent == 0:
                lines.append("")
            if comment:
                lines.append(f"{pad}# {comment}")
            lines.append(f"{lead}{f.name}:")
            _emit_yaml(value, tp, indent + 2, lines)
        elif _list_item_dataclass(tp) is not None and value:
            if indent == 0:
                lines.append("")
            if comment:
                lines.append(f"{pad}# {comment}")
            lines.append(f"{lead}{f.name}:")
            for item in value:
                _emit_yaml(item, _list_item_dataclass(tp), indent + 4, lines,
                           first_prefix=pad + "  - ")
        else:
            text = f"{lead}{f.name}: {_yaml_scalar(to_dict(value))}"
            if comment:
                text += f"  # {comment}"
            lines.append(text)


def reference_markdown() -> str:
    """The reference table of every key (kept in docs/configuration.md; a test compares)."""
    out = []
    hints = _hints(Config)
    for top in dataclasses.fields(Config):
        tp = hints[top.name]
        inner = _list_item_dataclass(tp) or tp
        out.append(f"### `{top.name}`")
        out.append("")
        if top.metadata.get("help"):
            out.append(top.metadata["help"][0].upper() + top.metadata["help"][1:] + ".")
            out.append("")
        out.append("| key | type | default | allowed | meaning |")
        out.append("|---|---|---|---|---|")
        prefix = top.name + ("[]" if _list_item_dataclass(tp) else "")
        for path, f, ftp, default in _walk(inner, prefix):
            if dataclasses.is_dataclass(ftp) or _list_item_dataclass(ftp) is not None:
                continue
            d = "(required)" if default is dataclasses.MISSING else f"`{_yaml_scalar(to_dict(default))}`"
            allowed = _range(f.metadata).strip()
            if f.metadata.get("choices"):
                allowed = ", ".join(f"`{c}`" for c in f.metadata["choices"])
            help_ = f.metadata.get("help", "").replace("|", "\\|")
            out.append(f"| `{path}` | {_type_name(ftp)} | {d.replace('|', chr(92) + '|')} | "
                       f"{allowed} | {help_} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def resolve_paths(cfg: Config, base: Optional[Path] = None) -> None:
    """Expand ``~`` and environment variables in the path settings (in place)."""
    for f in dataclasses.fields(cfg.paths):
        v = getattr(cfg.paths, f.name)
        if v:
            setattr(cfg.paths, f.name, os.path.expandvars(os.path.expanduser(v)))


REFERENCE_BEGIN = "<!-- BEGIN REFERENCE (edged check-config --reference) -->"
REFERENCE_END = "<!-- END REFERENCE -->"


def update_reference_doc(path) -> bool:
    """Replace the reference between the markers of ``path``; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if REFERENCE_BEGIN not in text or REFERENCE_END not in text:
        raise ValueError(f"{path}: the markers {REFERENCE_BEGIN} and {REFERENCE_END} are missing")
    head, rest = text.split(REFERENCE_BEGIN, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    new = head + REFERENCE_BEGIN + "\n" + reference_markdown() + REFERENCE_END + tail
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True
