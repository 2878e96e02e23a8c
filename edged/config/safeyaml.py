"""The bounded YAML parser: a configuration text to ``(data, {key path: line})``, a YAML bomb,
a file nested too deep or an over-long integer refused with one :class:`ConfigError`
(file, line, key) before anything is built."""
from __future__ import annotations

from typing import Optional

import yaml

from edged.config.builder import ConfigError, _short


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
