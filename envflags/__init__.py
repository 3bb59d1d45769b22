"""Settings declared once, as a frozen dataclass: each field is a command-line flag, an environment
variable and a row of the README's settings table.

The server and the client share this machinery and declare their own fields. A field's ``metadata``
holds its ``help``, its ``choices``, and its ``env`` name, or none to take ``env_prefix`` plus the
field's name in capitals. A flag beats its variable, which beats the default. A variable is checked as its
flag is: its type, its choices, and a float's being finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar

Settings = TypeVar("Settings")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(settings_field: dataclasses.Field[Any], env_prefix: str = "") -> str:
    return settings_field.metadata.get("env") or env_prefix + settings_field.name.upper()


def parse_bool(text: str) -> bool:
    """``1``, ``true``, ``yes``, ``on`` and their opposites (an empty value is false), any case."""
    value = text.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"{text!r} is not a boolean")


def _finite_float(text: str) -> float:
    """A float that is a number: ``nan`` and ``inf`` parse as floats but fit no setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    settings_type: type[Any],
    environ: Mapping[str, str],
    *,
    env_prefix: str = "",
    exclude: Collection[str] = (),
) -> None:
    """A flag per field of ``settings_type`` (but those in ``exclude``), defaulting to its variable.

    A boolean field gets ``--name`` and ``--no-name``. A variable that does not parse as the field's
    type, or is not one of its choices, stops the parser with a message naming the variable: argparse
    checks a flag's value, never a default's.
    """
    for settings_field in dataclasses.fields(settings_type):
        if settings_field.name in exclude:
            continue
        env = env_name(settings_field, env_prefix)
        default = settings_field.default
        kind = type(default)
        choices = settings_field.metadata.get("choices")
        if env in environ:
            text = environ[env]
            try:
                default = parse_bool(text) if kind is bool else kind(text)
            except ValueError as exc:
                parser.error(f"{env}={text!r} is not a valid {kind.__name__}")
                raise AssertionError from exc  # parser.error exits
            if kind is float and not math.isfinite(default):
                parser.error(f"{env}={text!r} is not a finite number")
            if choices and default not in choices:
                parser.error(f"{env}={text!r} is not one of: {', '.join(choices)}")
        help_text = f"{settings_field.metadata['help']} [env {env}]"
        if kind is bool:
            parser.add_argument(
                flag_name(settings_field.name),
                dest=settings_field.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        if settings_field.metadata.get("repeatable"):
            parser.add_argument(
                flag_name(settings_field.name),
                dest=settings_field.name,
                action=_JoinedList,
                default=default,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag_name(settings_field.name),
            dest=settings_field.name,
            type=_finite_float if kind is float else kind,
            default=default,
            choices=choices,
            help=help_text,
        )


class _JoinedList(argparse.Action):
    """A flag that may be given more than once; its values join with commas, as its variable lists them.
    The first use replaces the default (or the variable's value)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given_to: set[int] = set()

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest) if id(namespace) in self._given_to else ""
        setattr(namespace, self.dest, f"{current},{values}" if current else values)
        self._given_to.add(id(namespace))


def settings_from(namespace: argparse.Namespace, settings_type: type[Settings]) -> Settings:
    """The ``settings_type`` fields parsed into ``namespace``; fields without a flag keep their default."""
    names = {settings_field.name for settings_field in dataclasses.fields(settings_type)}  # type: ignore[arg-type]
    return settings_type(**{name: value for name, value in vars(namespace).items() if name in names})


def require_positive(settings: object, names: Iterable[str]) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise ValueError(f"{flag_name(name)} must be positive, got {getattr(settings, name)}")


def require_non_negative(settings: object, names: Iterable[str]) -> None:
    for name in names:
        if getattr(settings, name) < 0:
            raise ValueError(f"{flag_name(name)} must be zero or more, got {getattr(settings, name)}")


def settings_table(settings_type: type[Any], env_prefix: str = "") -> str:
    """The README's table of the settings, generated from the fields so the two cannot drift."""
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for settings_field in dataclasses.fields(settings_type):
        choices = settings_field.metadata.get("choices")
        meaning = settings_field.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        default = f"`{settings_field.default}`" if settings_field.default != "" else "(empty)"
        names = f"`{flag_name(settings_field.name)}` | `{env_name(settings_field, env_prefix)}`"
        rows.append(f"| {names} | {default} | {meaning} |")
    return "\n".join(rows)
