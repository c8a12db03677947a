"""Parser limits: YAML and JSON readers for recipes and for the specs stored in checkpoints.

Real recipes are a few hundred bytes, a few levels deep, with small numbers. A document past a limit
was written to exhaust memory, the stack or the CPU, and is refused with one line naming the limit
and where it was reached: nesting, repeated keys (which plain loaders accept silently, the last
winning), integers of thousands of digits, YAML aliases that expand exponentially or contain
themselves, and the file size. :mod:`vitlab.recipes` reads every recipe through here (and re-exports
these names); a checkpoint's stored spec goes through :func:`load_json`.
"""
from __future__ import annotations

import json
import json.decoder
import json.scanner
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import SpecError

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_NESTING = 64  # levels of mappings and lists
MAX_VALUES = 100_000  # values once YAML aliases are expanded (the "billion laughs" document)
MAX_INT_DIGITS = 100  # Python refuses int() past 4300 digits; no size or rate needs more than a few
MAX_EXTENDS = 32  # recipes in one ``extends`` chain


class _Refused(Exception):
    """A parser limit, with its line: becomes a ``SpecError`` naming the file."""


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _short(value: str, size: int = 40) -> str:
    return value if len(value) <= size else value[:size] + "..."


def _nested_too_deep(line: int | None = None) -> _Refused:
    where = f" at line {line}" if line else ""
    return _Refused(f"nested deeper than {MAX_NESTING} levels{where}; that is the limit for a recipe")


def _int_too_long(digits: str, line: int) -> _Refused | None:
    n = len(digits.lstrip("+-").replace("_", ""))
    if n <= MAX_INT_DIGITS:
        return None
    return _Refused(f"integer of {n} digits at line {line}; at most {MAX_INT_DIGITS} digits")


class _JsonReader(json.JSONDecoder):
    """``json.loads`` with the limits above. It runs the pure-Python scanner: only that one calls
    back for every object and array, where depth, repeated keys and positions can be checked."""

    def __init__(self) -> None:
        super().__init__(parse_int=self._int)
        self.parse_object, self.parse_array = self._object, self._array
        self.scan_once = json.scanner.py_make_scanner(self)
        self.text, self.depth, self.pos = "", 0, 0  # pos: where the value being read starts

    def decode(self, s: str, *args: Any) -> Any:
        self.text = s
        return super().decode(s, *args)

    def _object(self, s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        starts: list[int] = []
        with self._level(s_and_end[1]):
            # pairs as a list: a dict would keep the last of two equal keys without a word
            pairs, end = json.decoder.JSONObject(s_and_end, strict, self._tracked(scan_once, starts), None, list, memo)
        # key -> position: lines are counted only for a refusal (for every key it is quadratic in the size)
        first: dict[str, int] = {}
        for (key, _), pos in zip(pairs, starts):
            if key in first:
                raise _Refused(f"duplicate key {_short(key)!r} at line {_line(self.text, pos)} "
                               f"(first at line {_line(self.text, first[key])}); a key may appear once in a mapping")
            first[key] = pos
        return dict(pairs), end

    def _array(self, s_and_end, scan_once):
        with self._level(s_and_end[1]):
            return json.decoder.JSONArray(s_and_end, self._tracked(scan_once, []))

    def _tracked(self, scan_once, starts: list[int]):
        def scan(s: str, idx: int):
            starts.append(idx)
            self.pos = idx
            return scan_once(s, idx)

        return scan

    @contextmanager
    def _level(self, pos: int) -> Iterator[None]:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise _nested_too_deep(_line(self.text, pos))
            yield
        finally:
            self.depth -= 1

    def _int(self, digits: str) -> int:
        if len(digits) > MAX_INT_DIGITS:  # the line only for a refusal: for every number it is quadratic
            refused = _int_too_long(digits, _line(self.text, self.pos))
            if refused:
                raise refused
        return int(digits)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects or run code) with the limits above, checked
    on the composed document before anything is constructed."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        # composing recurses once per level: stop before Python's stack runs out (+1: the scalar
        # inside the deepest mapping or list is not a level)
        self.depth += 1
        try:
            if self.depth > MAX_NESTING + 1:
                raise _nested_too_deep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_yaml_tree(node)
        return node


# YAML 1.1 reads yes / no / on / off as booleans: ``norm: no`` would silently be False, and a plain
# ``bool`` is strict in vitlab. Only true / false (any case YAML allows) are booleans here; the
# other words stay strings, so a bool field refuses them with a message naming the field.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _check_yaml_tree(root: yaml.Node) -> None:
    """Refuse repeated keys, long integers, recursive aliases, and documents that aliases expand
    past the limits. Aliases make the document a graph: each node is measured once, so this is
    linear in the text even when the expansion is exponential."""
    measured: dict[int, tuple[int, int] | None] = {}  # id(node) -> (values, levels); None: in progress

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in measured:
            if measured[id(node)] is None:
                raise _Refused(f"a recursive alias at line {node.start_mark.line + 1}: a value that contains itself")
            return measured[id(node)]
        measured[id(node)] = None
        _check_yaml_node(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes = [measure(child) for child in children]
        values = 1 + sum(v for v, _ in sizes)
        levels = 0 if isinstance(node, yaml.ScalarNode) else 1 + max((lv for _, lv in sizes), default=0)
        if values > MAX_VALUES:
            raise _Refused(f"more than {MAX_VALUES:,} values (aliases expanded) at line {node.start_mark.line + 1}; "
                           "that is the limit for a recipe")
        if levels > MAX_NESTING:
            raise _nested_too_deep(node.start_mark.line + 1)
        measured[id(node)] = (values, levels)
        return values, levels

    measure(root)


def _check_yaml_node(node: yaml.Node) -> None:
    if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG:
        refused = _int_too_long(node.value, node.start_mark.line + 1)
        if refused:
            raise refused
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue  # '<<' merges may repeat and be overridden: that is what they are for
        line = key.start_mark.line + 1
        if (key.tag, key.value) in first:
            raise _Refused(f"duplicate key {_short(key.value)!r} at line {line} "
                           f"(first at line {first[key.tag, key.value]}); a key may appear once in a mapping")
        first[key.tag, key.value] = line


def _check_length(text: str) -> None:
    """Text that did not come from a file (``--set`` values, API callers) gets the file's size limit:
    the pure-Python readers take seconds per MiB, so a long enough value is a denial of service."""
    if len(text) > MAX_RECIPE_BYTES and len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise SpecError(f"text of {len(text):,} characters; a recipe or value is at most {MAX_RECIPE_BYTES:,} bytes")


def load_json(text: str) -> Any:
    """JSON text -> data, within the parser limits (nesting, repeated keys, integer digits).

    Raises:
        json.JSONDecodeError: bad syntax, with line and column.
        SpecError: a limit, naming the line (no source: the caller knows the file).
    """
    _check_length(text)
    if text.startswith("\ufeff"):
        # json.loads refuses it too; without this line the scanner says only "Expecting value"
        raise SpecError("invalid JSON at line 1, column 1: the text starts with a UTF-8 byte-order mark "
                        "(save the file as UTF-8 without BOM)")
    try:
        return _JsonReader().decode(text)
    except _Refused as exc:
        raise SpecError(str(exc)) from None
    except RecursionError:  # a deeper stack than ours already in use: the same limit, reached early
        raise SpecError(str(_nested_too_deep())) from None


def load_yaml(text: str) -> Any:
    """YAML text -> data with the safe loader, within the parser limits.

    Raises:
        yaml.YAMLError: bad syntax or a tag that is not plain data.
        SpecError: a limit, naming the line.
    """
    _check_length(text)
    loader = _YamlLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise SpecError(str(exc)) from None
    except RecursionError:
        raise SpecError(str(_nested_too_deep())) from None
    finally:
        loader.dispose()


def parse_text(text: str, source: str = "<recipe text>", json_syntax: bool = False) -> dict[str, Any]:
    """Recipe text (YAML, or JSON) -> raw mapping, with syntax errors naming line and column.
    YAML is read with the safe loader: no tags, no objects, no code. Both refuse what passes the
    limits above (nesting, repeated keys, huge integers, alias bombs)."""
    if not text.strip():
        raise SpecError("recipe file is empty", source=source)
    try:
        data = load_json(text) if json_syntax else load_yaml(text)
    except SpecError as exc:
        raise exc.with_source(source) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML{where}: {problem}", source=source) from None
    except ValueError as exc:  # a scalar that resolves to a type and then fails (2001-13-45 as a date)
        raise SpecError(f"invalid YAML value: {exc}", source=source) from None
    if data is None:
        raise SpecError("recipe file is empty (only comments)", source=source)
    if not isinstance(data, dict):
        raise SpecError(f"a recipe must be a mapping of fields, got {type(data).__name__}", source=source)
    return data


def read_text(path: Path) -> str:
    """A recipe file's text, never reading more than the size limit (``stat`` can be wrong: files
    grow, and special files report 0)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(MAX_RECIPE_BYTES + 1) if size <= MAX_RECIPE_BYTES else b""
    except OSError as exc:
        raise SpecError(f"cannot read recipe: {exc.strerror or exc}", source=str(path)) from None
    if size > MAX_RECIPE_BYTES or len(raw) > MAX_RECIPE_BYTES:
        got = f"{size:,} bytes" if size > MAX_RECIPE_BYTES else f"more than {MAX_RECIPE_BYTES:,} bytes"
        raise SpecError(f"recipe is {got}; a recipe is at most {MAX_RECIPE_BYTES:,} bytes", source=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("recipe is not UTF-8 text", source=str(path)) from None
