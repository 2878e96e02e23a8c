"""A mapping checked against a dataclass tree and built into it (:func:`build`): unknown keys,
wrong types, out-of-range values and missing required keys reported at once in one
:class:`ConfigError`, each with the key's full path and, from a file, its line; and the
type and range names those messages and the reference use."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, List, Optional, Tuple


class ConfigError(ValueError):
    """A configuration cannot be used.  ``errors`` lists one line per problem."""

    def __init__(self, errors, source: str = "config"):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: {len(self.errors)} error{'s' if len(self.errors) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join("  " + e for e in self.errors))


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
            return self._convert_union(tp, args, value, path, meta)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin in (list, tuple) or tp in (list, tuple):
            return self._convert_list(tp, origin, args, value, path, meta)
        if origin is dict or tp is dict:
            return self._convert_dict(tp, args, value, path, meta)
        if tp is bool:
            return self._convert_bool(value, path)
        if tp is int:
            return self._convert_int(value, path, meta)
        if tp is float:
            return self._convert_float(value, path, meta)
        if tp is str or tp is Path:
            return self._convert_str(value, path, meta)
        # Enum or other plain class: accept instances, else try the constructor.
        if isinstance(tp, type):
            return self._convert_class(tp, value, path)
        return value

    def _convert_union(self, tp, args, value, path: str, meta: dict):
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

    def _convert_list(self, tp, origin, args, value, path: str, meta: dict):
        if not isinstance(value, list):
            self.error(path, f"expected {_type_name(tp)}, got {_short(value)}")
            return _BAD
        item_tp = args[0] if args else Any
        out = [self.convert(item_tp, v, f"{path}[{i}]", _item_meta(meta))
               for i, v in enumerate(value)]
        if "min_items" in meta and len(out) < meta["min_items"]:
            self.error(path, f"expected at least {meta['min_items']} item(s), got {len(out)}")
        return out if origin is not tuple else tuple(out)

    def _convert_dict(self, tp, args, value, path: str, meta: dict):
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

    def _convert_bool(self, value, path: str):
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {_short(value)}")
            return _BAD
        return value

    def _convert_int(self, value, path: str, meta: dict):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                self.error(path, f"expected an integer{_range(meta)}, got {_short(value)}")
                return _BAD
        return self.check_meta(value, path, meta)

    def _convert_float(self, value, path: str, meta: dict):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(path, f"expected a number{_range(meta)}, got {_short(value)}")
            return _BAD
        return self.check_meta(float(value), path, meta)

    def _convert_str(self, value, path: str, meta: dict):
        if not isinstance(value, str):
            hint = " (quote it in the YAML)" if isinstance(value, (int, float, bool)) else ""
            self.error(path, f"expected a string, got {_short(value)}{hint}")
            return _BAD
        return self.check_meta(value, path, meta)

    def _convert_class(self, tp, value, path: str):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception as exc:
            self.error(path, f"expected {_type_name(tp)}, got {_short(value)} ({exc})")
            return _BAD

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
