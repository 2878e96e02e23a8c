"""The defaults and the documented reference, generated from the settings dataclasses:
:func:`defaults_yaml` (``edged check-config --defaults``), :func:`reference_markdown`
(``--reference``) and :func:`update_reference_doc` (``--update-doc``, docs/configuration.md)."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from edged.config.builder import _hints, _range, _type_name
from edged.config.schema import Config


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
