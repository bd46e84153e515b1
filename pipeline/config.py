"""Typed settings: a job's configuration declared once as dataclasses, checked before it runs.

A section is a `@dataclass` deriving from `Section` whose fields are declared with
`setting(default, "meaning", ge=..., le=...)` (a nested section: `setting(SectionClass,
"meaning")`). `parse(cls, data)` checks a merged mapping against it and returns an instance of
`cls` (nested sections as instances, defaults filled in): the job body, its stages and its actors
read typed attributes, never a cast. Every error is collected and raised together as one
`SettingsError`: unknown keys (with the nearest valid one), wrong types, values out of their
range, and the rules between settings that a section states in `problems()`. `describe(cls)`
renders one line per setting for `--help`. Nothing here imports torch or Ray: a shared config
file is checked without them.

Types understood (and nothing else, so a schema cannot silently accept what it does not check):
  bool              true / false only (not 1, not "yes" typed as a string, not "ture")
  int               an integer (a bool is not an int)
  float             a number (an int is accepted and converted)
  str               a string
  X | None, X | Y   the first alternative that accepts the value
  Literal[...]      one of the listed values
  Section (switch)  `setting(Section, ..., switch=True)`: given as true / false (the section's
                    `enabled`, every other key at its default) or as the section's keys (on unless
                    `enabled: false`); not given: the section with `enabled` false
  list[X]           a list, each item an X
  tuple[X, Y]       a list of exactly that many items (`tuple[int, int]`: [min, max]); given as a list
  dict[str, X]      a mapping of free names to X (e.g. attribute -> editor URI)
  a section         a nested dataclass
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

S = TypeVar("S", bound="Section")


class SettingsError(ValueError):
    """One or more invalid settings; `errors` holds one readable message per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Section:
    """Base of every settings section (a dataclass). `problems()` states the rules between its
    settings (each message names its key relative to the section); parse reports them with the
    section's path, beside the type and range errors of its values."""

    def problems(self) -> list[str]:
        return []



class _Mismatch(Exception):
    """A value that does not fit a type (caught per setting, or per alternative of a union)."""


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, switch: bool = False) -> Any:
    """A field with its default and one-line meaning. `ge` / `gt` / `le` / `lt`: the range of a
    number (of every number of a list or tuple setting). A section class as default makes a
    nested section; `switch=True`: that section may be given as true / false (its `enabled`)
    and is off when not given. Lists and dicts are copied for each instance."""
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    meta = {"help": help, "bounds": bounds, "switch": switch}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        if switch:
            if "enabled" not in {f.name for f in dataclasses.fields(default)}:
                raise TypeError(f"settings: switch section {default.__name__} needs an `enabled` setting")
            section: Any = default  # a dataclass with `enabled`, checked above
            return dataclasses.field(default_factory=lambda: section(enabled=False), metadata=meta)
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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


def range_name(bounds: Mapping[str, float]) -> str:
    return ", ".join(f"{_BOUNDS[k][0]} {_show(v)}" for k, v in bounds.items())


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
        return tuple(_convert(a, v, f"{key}[{i}]", errors) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _convert(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
    raise TypeError(f"settings: unsupported type {tp!r} for {key}")


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def _range_errors(key: str, value: Any, bounds: Mapping[str, float]) -> list[str]:
    for x in _numbers(value):
        if isinstance(x, float) and math.isnan(x) or not all(_BOUNDS[k][1](x, b) for k, b in bounds.items()):
            return [f"{key}: must be {range_name(bounds)}, got {value!r}"]
    return []


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


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    factory: Any = f.default_factory  # every setting has one of the two (setting())
    return factory()


def _parse_section(cls: type, data: Mapping, path: str, errors: list[str]) -> Any:
    fields = fields_of(cls)
    names = [n for n, _, _ in fields]
    for k in data:
        if k not in names:
            errors.append(unknown_message(path, str(k), names))
    out: dict = {}
    before = len(errors)
    for name, tp, f in fields:
        key = _dotted(path, name)
        if name in data:
            value = data[name]
            if f.metadata.get("switch") and isinstance(value, bool):
                value = {"enabled": value}
            try:
                out[name] = _convert(tp, value, key, errors)
            except _Mismatch:
                shown = type_name(tp) + (" or bool (true or false)" if f.metadata.get("switch") else "")
                errors.append(f"{key}: expected {shown}, {_got(data[name])}")
                continue
            errors += _range_errors(key, out[name], f.metadata.get("bounds") or {})
        elif f.metadata.get("switch"):
            out[name] = _parse_section(tp, {"enabled": False}, key, errors)
        elif is_section(tp):
            out[name] = _parse_section(tp, {}, key, errors)
        else:
            d = _default(f)
            try:  # the same conversions as a given value (1 -> 1.0 for a float, a list -> a tuple)
                out[name] = _convert(tp, d, key, errors)
            except _Mismatch:
                raise TypeError(f"settings: the default of {key}, {d!r}, is not {type_name(tp)}") from None
            if _range_errors(key, out[name], f.metadata.get("bounds") or {}):
                raise TypeError(f"settings: the default of {key}, {d!r}, is out of its range")
    if len(errors) > before or len(out) < len(fields):
        return None  # a section with errors is not built; its rules would only repeat them
    obj = cls(**out)
    if isinstance(obj, Section):
        errors += [_dotted(path, m) for m in obj.problems()]
    return obj


def parse(cls: type[S], data: Mapping | None, path: str = "") -> S:
    """The settings of `cls` from `data` (missing keys take their defaults) as an instance of
    `cls`; raises SettingsError naming every unknown key (with the nearest valid one), every
    value of the wrong type (key, value, expected type) or out of its range, and every broken
    rule between settings."""
    errors: list[str] = []
    if data is not None and not isinstance(data, Mapping):
        raise SettingsError([f"{path or 'settings'}: expected a section (mapping), {_got(data)}"])
    out = _parse_section(cls, data or {}, path, errors)
    if errors:
        raise SettingsError(errors)
    return out


def defaults(cls: type[S]) -> S:
    """Every setting of `cls` at its default."""
    return parse(cls, {})


def as_dict(settings: Any) -> dict:
    """A settings object as plain nested data (the run record, commit metadata)."""
    return dataclasses.asdict(settings)


def known_keys(cls: type) -> dict:
    """The tree of setting names: {name: subtree} for a section, {name: None} for a value."""
    return {name: known_keys(tp) if is_section(tp) else None for name, tp, _ in fields_of(cls)}


def _show(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def describe(cls: type, path: str = "") -> str:
    """One line per setting: `dotted.key = default  meaning [type, range]`, a section's meaning
    on the line before its keys."""
    rows: list[tuple[str, str]] = []

    def walk(c: type, p: str) -> None:
        for name, tp, f in fields_of(c):
            key = _dotted(p, name)
            meaning = f.metadata.get("help", "")
            if f.metadata.get("switch"):
                rows.append((f"{key} = false", f"{meaning} [bool (true or false), or the section's keys]"))
                walk(tp, key)
            elif is_section(tp):
                rows.append((f"{key}:", meaning))
                walk(tp, key)
            else:
                bounds = f.metadata.get("bounds") or {}
                kind = type_name(tp) + (f", {range_name(bounds)}" if bounds else "")
                rows.append((f"{key} = {_show(_default(f))}", f"{meaning} [{kind}]"))

    walk(cls, path)
    width = min(44, max(len(left) for left, _ in rows))
    return "\n".join(f"  {left:<{width}}  {right}".rstrip() for left, right in rows)
