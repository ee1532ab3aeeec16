"""Converters: TOML values to the types of the schema, driven by the annotations.

Each key is converted by a converter derived from the type annotation of the
schema field of the same name: bool, int, float, str, Path, Literal[...],
tuple[...] and Mapping[...]. What a type cannot say (addresses, networks,
minimums) is checked afterwards by `tlsfront.config.checks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from tlsfront.config.errors import Bad
from tlsfront.config.schema import ONE_OR_MANY, Profile, Settings
from tlsfront.tls.sni import DEFAULT, table_name


@dataclass(frozen=True)
class Ctx:
    base: Path  # relative paths are relative to this directory
    environ: Mapping[str, str]

    def path(self, text: str) -> Path:
        home = self.environ.get("HOME")
        if home and (text == "~" or text.startswith("~/")):
            p = Path(home) / text[2:]
        else:
            p = Path(text).expanduser()
        return p if p.is_absolute() else self.base / p


Conv = Callable[[Any, Ctx], Any]


def describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _to_bool(value: Any, ctx: Ctx) -> bool:
    if isinstance(value, bool):
        return value
    raise Bad(f"must be true or false, not {describe(value)}")


def _to_int(value: Any, ctx: Ctx) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Bad(f"must be a whole number, not {describe(value)}")
    if value < 0:
        raise Bad(f"must not be negative, not {value}")
    return value


def _to_float(value: Any, ctx: Ctx) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Bad(f"must be a number, not {describe(value)}")
    if not math.isfinite(value):
        raise Bad(f"must be a finite number, not {value}")
    if value < 0:
        raise Bad(f"must not be negative, not {value}")
    return float(value)


def _to_str(value: Any, ctx: Ctx) -> str:
    if not isinstance(value, str):
        raise Bad(f"must be a string, not {describe(value)}")
    if "\0" in value:
        raise Bad("must not contain a NUL character")
    return value


def _to_nonempty_str(value: Any, ctx: Ctx) -> str:
    text = _to_str(value, ctx)
    if not text:
        raise Bad("must not be empty (leave the key out instead)")
    return text


def _to_path(value: Any, ctx: Ctx) -> Path:
    if not isinstance(value, str):
        raise Bad(f"must be a path (a string), not {describe(value)}")
    if not value or "\0" in value:
        raise Bad("must be a non-empty path without NUL characters")
    return ctx.path(value)


def _to_literal(choices: tuple[str, ...]) -> Conv:
    def conv(value: Any, ctx: Ctx) -> str:
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join(repr(c) for c in choices)
        raise Bad(f"must be one of {listed}, not {describe(value)}")

    return conv


def _to_tuple(item: Conv, one_or_many: bool) -> Conv:
    def conv(value: Any, ctx: Ctx) -> tuple[Any, ...]:
        if one_or_many and isinstance(value, str):
            return (item(value, ctx),)
        if not isinstance(value, list):
            kind = "a string or a list" if one_or_many else "a list"
            raise Bad(f"must be {kind}, not {describe(value)}")
        out = []
        for n, element in enumerate(value, 1):
            try:
                out.append(item(element, ctx))
            except Bad as exc:
                raise Bad(f"item {n}: {exc.message}") from None
        return tuple(out)

    return conv


def _to_mapping(item: Conv) -> Conv:
    def conv(value: Any, ctx: Ctx) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise Bad(f'must be a table such as {{ NAME = "value" }}, not {describe(value)}')
        out = {}
        for name, element in value.items():
            try:
                out[name] = item(element, ctx)
            except Bad as exc:
                raise Bad(f"{name!r}: {exc.message}", (name,)) from None
        return MappingProxyType(out)

    return conv


def _to_files_or_table(files: Conv) -> Conv:
    """Files, or a table of files by server name with a "default" entry."""

    def conv(value: Any, ctx: Ctx) -> Any:
        if not isinstance(value, dict):
            if not isinstance(value, str | list):
                kind = "a string, a list or a table by server name"
                raise Bad(f"must be {kind}, not {describe(value)}")
            return files(value, ctx)
        out: dict[str, Any] = {}
        for key, element in value.items():
            name = table_name(key)
            if name is None:
                raise Bad(
                    f"{key!r}: not a server name (a host name, a wildcard such as"
                    f" '*.example.net', or 'default')",
                    (key,),
                )
            if name in out:
                raise Bad(f"{key!r}: that server name is given twice", (key,))
            try:
                out[name] = files(element, ctx)
            except Bad as exc:
                raise Bad(f"{key!r}: {exc.message}", (key,)) from None
        if DEFAULT not in out:
            raise Bad('a table by server name needs a "default" entry, for clients that send none')
        return MappingProxyType(out)

    return conv


_SIMPLE: dict[Any, Conv] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
}


def _converter(name: str, annotation: Any) -> Conv:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):  # X | None: TOML has no null, so just X
        members = [a for a in args if a is not type(None)]
        if [get_origin(a) for a in members] == [tuple, Mapping]:  # cert, key
            return _to_files_or_table(_converter(name, members[0]))
        (inner,) = members
        conv = _converter(name, inner)
        return _to_nonempty_str if conv is _to_str else conv
    if origin is Literal:
        return _to_literal(args)
    if origin is tuple:
        return _to_tuple(_converter(name, args[0]), name in ONE_OR_MANY)
    if origin is Mapping:
        return _to_mapping(_converter(name, args[1]))
    return _SIMPLE[annotation]


def _converters(cls: type, skip: frozenset[str] = frozenset()) -> dict[str, Conv]:
    hints = get_type_hints(cls)
    return {f.name: _converter(f.name, hints[f.name]) for f in fields(cls) if f.name not in skip}


SETTINGS_CONV = _converters(Settings)
PROFILE_CONV = _converters(Profile, frozenset({"name"}))
