"""Hyperparameters declared once, as dataclass fields, and everything else derived from them.

A field made with `option(default, help, group=...)` becomes a `--flag` of `lstm-lm train` (its
type, default and help text taken from the field), and a run's record turns back into the
command line that reproduces it. Adding a hyperparameter is adding one field.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, field, fields
from typing import Any


def option(default: Any, help: str, *, group: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_fields(cls: type) -> Iterator[Field[Any]]:
    """The fields of a dataclass declared with option(), in declaration order."""
    return (f for f in fields(cls) if "help" in f.metadata)


def default_of(f: Field[Any]) -> Any:
    return f.default if f.default is not MISSING else None


def add_options(parser: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per option field, grouped by the field's group. Flags default to "not given"
    (argparse.SUPPRESS), so `given(args)` tells what the user set; the help shows the default."""
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in option_fields(cls):
        name = f.metadata["group"]
        target = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name or None))
        default = defaults.get(f.name, default_of(f))
        help_text = f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default_of(f), bool):
            target.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        target.add_argument(flag(f.name), type=_value_type(f), **kwargs)


def _value_type(f: Field[Any]) -> type:
    text = str(f.type)
    for kind in (bool, int, float):
        if kind.__name__ in text.split(" | "):
            return kind
    return str


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The option values the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}


def command_flags(values: Mapping[str, Any], cls: type) -> list[str]:
    """The flags that reproduce `values` (only those that differ from the defaults)."""
    parts: list[str] = []
    for f in option_fields(cls):
        if f.name not in values or values[f.name] == default_of(f):
            continue
        value = values[f.name]
        if isinstance(value, bool):
            parts.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            parts += [flag(f.name), str(value)]
    return parts
