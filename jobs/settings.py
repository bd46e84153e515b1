"""Typed settings: a job's configuration declared once as dataclasses, checked before it runs.

A section is a `@dataclass` whose fields are declared with `setting(default, "meaning")` (a
nested section: `setting(SectionClass, "meaning")`). `parse(cls, data)` checks a merged mapping
against it and returns a plain nested dict (defaults filled in) for the job body; every error is
collected and raised together as one `SettingsError`. `describe(cls)` renders one line per
setting for `--help`.

Types understood (and nothing else, so a schema cannot silently accept what it does not check):
  bool              true / false only (not 1, not "yes" typed as a string, not "ture")
  int               an integer (a bool is not an int)
  float             a number (an int is accepted and converted)
  str               a string
  X | None, X | Y   the first alternative that accepts the value
  Literal[...]      one of the listed values
  bool | Section    a switch that may also be given as its section (`paste_back=true`, or its keys)
  list[X]           a list, each item an X
  tuple[X, Y]       a list of exactly that many items (`tuple[int, int]`: [min, max]); given as a list
  dict[str, X]      a mapping of free names to X (e.g. attribute -> editor URI)
  a section         a nested dataclass
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import yaml


class SettingsError(ValueError):
    """One or more invalid settings; `errors` holds one readable message per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Mismatch(Exception):
    """A value that does not fit a type (caught per setting, or per alternative of a union)."""


def setting(default: Any, help: str) -> Any:
    """A field with its default and one-line meaning. A dataclass as default makes a nested
    section; lists and dicts are copied for each instance."""
    meta = {"help": help}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def section_of(tp: Any) -> type | None:
    """The section a field holds: its type, or the section alternative of a union such as
    `bool | PasteBackSection` (a switch that may also be given as a section)."""
    if is_section(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if is_section(a)), None)
    return None


def fields_of(cls: type) -> list[tuple[str, Any, dataclasses.Field]]:
    """(name, resolved type, field) of a section, in declaration order (base class first)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f) for f in dataclasses.fields(cls)]


def type_name(tp: Any) -> str:
    """How a type is named in error messages and in --help."""
    if tp is type(None):
        return "null"
    if tp is bool:
        return "bool (true or false)"
    if tp is int:
        return "int"
    if tp is float:
        return "number"
    if tp is str:
        return "string"
    if is_section(tp):
        return "a section (mapping)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _show(args[0]) if len(args) == 1 else "one of " + ", ".join(_show(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"mapping of name to {type_name(args[1])}"
    raise TypeError(f"settings: unsupported type {tp!r}")


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _convert(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """`value` checked against `tp` (converted where the type says so); raises _Mismatch."""
    if is_section(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _parse_section(tp, value, key, errors)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # type-exact: True must not pass for 1, nor 1 for True
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        inner = section_of(tp)
        if inner is not None and isinstance(value, Mapping):
            return _parse_section(inner, value, key, errors)  # its own errors, key by key
        for alt in args:
            sub: list[str] = []
            try:
                out = _convert(alt, value, key, sub)
            except _Mismatch:
                continue
            if not sub:
                return out
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return [_convert(a, v, f"{key}[{i}]", errors) for i, (a, v) in enumerate(zip(args, value))]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _convert(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
    raise TypeError(f"settings: unsupported type {tp!r} for {key}")


def _dotted(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def nearest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to a misspelt name, if one is close enough."""
    near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.7)
    if near:
        return near[0]
    longer = sorted(c for c in candidates if c.startswith(name + "_"))  # train -> train_encoder
    return longer[0] if len(longer) == 1 else None


def unknown_message(path: str, name: str, candidates: list[str]) -> str:
    near = nearest(name, candidates)
    hint = f" (did you mean {_dotted(path, near)}?)" if near else ""
    return f"{_dotted(path, name)}: unknown setting{hint}"


def _parse_section(cls: type, data: Mapping, path: str, errors: list[str]) -> dict:
    fields = fields_of(cls)
    names = [n for n, _, _ in fields]
    for k in data:
        if k not in names:
            errors.append(unknown_message(path, str(k), names))
    out: dict = {}
    for name, tp, f in fields:
        key = _dotted(path, name)
        if name in data:
            try:
                out[name] = _convert(tp, data[name], key, errors)
            except _Mismatch:
                errors.append(f"{key}: expected {type_name(tp)}, {_got(data[name])}")
        elif is_section(tp):
            out[name] = _parse_section(tp, {}, key, errors)
        else:
            d = copy.deepcopy(f.default) if f.default is not dataclasses.MISSING else f.default_factory()
            try:  # the same conversions as a given value (1 -> 1.0 for a float)
                out[name] = _convert(tp, d, key, errors)
            except _Mismatch:
                raise TypeError(f"settings: the default of {key}, {d!r}, is not {type_name(tp)}") from None
    return out


def parse(cls: type, data: Mapping | None, path: str = "") -> dict:
    """The settings of `cls` from `data` (missing keys take their defaults), as a plain nested
    dict; raises SettingsError naming every unknown key (with the nearest valid one) and every
    value of the wrong type (key, value, expected type)."""
    errors: list[str] = []
    if data is not None and not isinstance(data, Mapping):
        raise SettingsError([f"{path or 'settings'}: expected a section (mapping), {_got(data)}"])
    out = _parse_section(cls, data or {}, path, errors)
    if errors:
        raise SettingsError(errors)
    return out


def defaults(cls: type) -> dict:
    """Every setting of `cls` at its default, as a plain nested dict."""
    return parse(cls, {})


def known_keys(cls: type) -> dict:
    """The tree of setting names: {name: subtree} for a section, {name: None} for a value."""
    return {name: known_keys(section_of(tp)) if section_of(tp) else None for name, tp, _ in fields_of(cls)}


def _show(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def describe(cls: type, path: str = "") -> str:
    """One line per setting: `dotted.key = default  meaning [type]`, a section's meaning on the
    line before its keys."""
    rows: list[tuple[str, str]] = []

    def walk(c: type, p: str) -> None:
        for name, tp, f in fields_of(c):
            key = _dotted(p, name)
            meaning = f.metadata.get("help", "")
            if is_section(tp):
                rows.append((f"{key}:", meaning))
                walk(tp, key)
            else:
                d = copy.deepcopy(f.default) if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{key} = {_show(d)}", f"{meaning} [{type_name(tp)}]"))
                if section_of(tp) is not None:  # a switch that may also be given as this section
                    walk(section_of(tp), key)

    walk(cls, path)
    width = min(44, max(len(left) for left, _ in rows))
    return "\n".join(f"  {left:<{width}}  {right}".rstrip() for left, right in rows)
