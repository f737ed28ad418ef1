"""Command-line flags generated from a config dataclass: each setting is declared once, on its field.

As in peft (``LoraConfig``'s fields carry ``metadata={"help": ...}``), a field of a settings dataclass says
everything the command line needs: its help, its flag name when that is not ``<prefix><field>``, how a word
is parsed, its choices and its valid range. From that one declaration this module

* registers the flags on an argparse parser (:func:`add_flags`; a flag the parser already has is left alone,
  so calling it twice, or on MACE's parser after a plugin did, registers each flag once),
* lists the flags' parser defaults (:func:`flag_defaults`),
* builds the dataclass back from a parsed Namespace (:func:`config_from_namespace`), and
* checks a value against its declared range or choices (:func:`check_settings`, called from the dataclass's
  ``__post_init__``), so the Python API and the command line refuse the same values with the same line.

Declare a field with :func:`setting` (or ``dataclasses.field(metadata=...)`` with the same keys). Fields without
``help`` are not settings and get no flag. Class attributes read here (both optional, as ``ClassVar``):
``flag_prefix`` (prepended to a field's name to make its flag; default ``""``) and ``flag_hyphens`` (``True``:
only the ``--a-b`` spelling, which messages use too; default ``False``: both ``--a-b`` and ``--a_b``, messages
use ``--a_b``; configargparse maps YAML ``--config`` keys onto either spelling).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

#: How a field's value is checked, for :func:`check_settings`: ``{flag}`` (as messages spell it),
#: ``{condition}`` (``be > 0``, ``lie in (0, 1)``, ``be one of a, b``, ``be True or False``), ``{interval}``
#: (``(0, 1)``), ``{why}`` (the field's ``why`` text, verbatim) and ``{value}``.
DEFAULT_TEMPLATE = "{flag} must {condition}{why}; got {value}"

_NO_VALUE = object()


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: Optional[str] = None,
    parse: Optional[Callable[[str], Any]] = None,
    choices: Optional[Sequence[Any]] = None,
    nargs: Optional[str] = None,
    switch: Optional[str] = None,
    above: Optional[float] = None,
    at_least: Optional[float] = None,
    below: Optional[float] = None,
    at_most: Optional[float] = None,
    why: str = "",
    message: Optional[str] = None,
    cli_default: Any = _NO_VALUE,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag.

    Args:
        help: the flag's help; ``{default}`` (with a format spec, e.g. ``{default:g}``) is the field's default.
        flag: the whole flag name (underscores, no ``--``, no prefix added) when it is not prefix + field name.
        parse: turns one command-line word into a value (default: from the field's type; ``bool`` takes
            ``True``/``False`` words, as MACE's own booleans do: :func:`parse_bool`).
        choices / nargs: as in argparse; choices are checked on the dataclass too.
        switch: ``"store_true"`` / ``"store_false"``: a flag without a value.
        above / at_least / below / at_most: the valid range (strict / inclusive bounds); the value must also be
            finite. ``None`` is accepted when the field's default is ``None``.
        why: text placed in the message after the condition (see :data:`DEFAULT_TEMPLATE`).
        message: a template for this field's message instead of the class's.
        cli_default: the parser's default when it differs from the field's (e.g. ``None`` for "not given",
            which :func:`config_from_namespace` reads as "use the field's default").
    """
    metadata: Dict[str, Any] = {"help": help}
    optional = dict(flag=flag, parse=parse, choices=tuple(choices) if choices is not None else None, nargs=nargs,
                    switch=switch, above=above, at_least=at_least, below=below, at_most=at_most, message=message)
    metadata.update({key: value for key, value in optional.items() if value is not None})
    if why:
        metadata["why"] = why
    if cli_default is not _NO_VALUE:
        metadata["cli_default"] = cli_default
    kwargs: Dict[str, Any] = {"metadata": metadata}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def parse_bool(text: Any) -> bool:
    """``True``/``False`` (any case, also yes/no, 1/0) for a flag that takes a value, as MACE's own booleans do."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ------------------------------------------------------------------------------------ what a class declares


def settings(cls: type, only: Optional[Iterable[str]] = None) -> List[dataclasses.Field]:
    """The fields of ``cls`` that are settings (have ``help``), in declaration order; ``only``: these names."""
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    if only is None:
        return fields
    wanted = list(only)
    unknown = sorted(set(wanted) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}")
    return [f for f in fields if f.name in wanted]


def flag_name(cls: type, field: dataclasses.Field, prefix: Optional[str] = None) -> str:
    """The flag's name with underscores, also the Namespace attribute (argparse ``dest``)."""
    if "flag" in field.metadata:
        return field.metadata["flag"]
    return (getattr(cls, "flag_prefix", "") if prefix is None else prefix) + field.name


def option_strings(name: str, hyphens_only: bool = False) -> List[str]:
    """``--a-b`` and ``--a_b`` for a flag named ``a_b`` (only ``--a-b`` with ``hyphens_only``)."""
    hyphenated = "--" + name.replace("_", "-")
    if hyphens_only:
        return [hyphenated]
    underscored = "--" + name
    return [hyphenated, underscored] if hyphenated != underscored else [underscored]


def spelled(cls: type, field: dataclasses.Field) -> str:
    """The flag as messages write it (``--sparse_budget``; ``--batch-size`` for a ``flag_hyphens`` class)."""
    return option_strings(flag_name(cls, field), getattr(cls, "flag_hyphens", False))[-1]


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _value_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's type with ``Optional`` removed (string annotations resolved)."""
    hint = _hints(cls).get(field.name, str)
    if typing.get_origin(hint) is typing.Union:
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), str)
    return hint


def _cli_default(field: dataclasses.Field) -> Any:
    return field.metadata.get("cli_default", field_default(field))


# ----------------------------------------------------------------------------------------- the parser side


def argument_group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group of that title, created on first use (so a second call adds no empty one)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def has_flag(container: Any, name: str) -> bool:
    """Whether the parser (or one of its groups) already has ``--name`` in either spelling."""
    return any(opt in container._option_string_actions for opt in option_strings(name))


def add_flags(container: Any, cls: type, *, prefix: Optional[str] = None,
              only: Optional[Iterable[str]] = None) -> Any:
    """Register a flag for each setting of ``cls`` on a parser or argument group; returns ``container``.

    A flag the parser already has (either spelling) is skipped, so registration is idempotent.
    ``prefix`` replaces the class's ``flag_prefix`` for names (messages keep the class's).
    """
    hyphens_only = getattr(cls, "flag_hyphens", False)
    for field in settings(cls, only):
        name = flag_name(cls, field, prefix)
        if has_flag(container, name):
            continue
        meta = field.metadata
        default = field_default(field)
        help_text = meta["help"].format(default=default) if "{default" in meta["help"] else meta["help"]
        kwargs: Dict[str, Any] = {"dest": name, "default": _cli_default(field), "help": help_text}
        if "switch" in meta:
            kwargs["action"] = meta["switch"]
        elif "choices" in meta:
            kwargs["choices"] = meta["choices"]
        else:
            kind = _value_type(cls, field)
            kwargs["type"] = meta.get("parse") or (parse_bool if kind is bool else kind if kind in (int, float) else str)
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        container.add_argument(*option_strings(name, hyphens_only), **kwargs)
    return container


def flag_defaults(cls: type, *, prefix: Optional[str] = None, only: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """``{flag name: the parser's default}`` for each setting (what a Namespace holds when a flag is not given)."""
    return {flag_name(cls, f, prefix): _cli_default(f) for f in settings(cls, only)}


def namespace_values(cls: type, args: argparse.Namespace, *, prefix: Optional[str] = None,
                     only: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """``{field: value}`` from a parsed Namespace. A flag the Namespace lacks, or ``None`` for a field whose
    default is not ``None`` (a ``cli_default`` of "not given"), is left out: the field's default applies."""
    values: Dict[str, Any] = {}
    for field in settings(cls, only):
        value = getattr(args, flag_name(cls, field, prefix), _NO_VALUE)
        if value is _NO_VALUE or (value is None and field_default(field) is not None):
            continue
        values[field.name] = value
    return values


def config_from_namespace(cls: type, args: argparse.Namespace, *, prefix: Optional[str] = None,
                          only: Optional[Iterable[str]] = None, **overrides: Any) -> Any:
    """``cls`` built from a parsed Namespace (see :func:`namespace_values`), ``overrides`` winning."""
    return cls(**{**namespace_values(cls, args, prefix=prefix, only=only), **overrides})


# ---------------------------------------------------------------------------------------------- the checks


def _interval(meta: Dict[str, Any]) -> Tuple[str, str]:
    """(condition, interval) of a field's declared range, e.g. ``("lie in (0, 1)", "(0, 1)")``."""
    low = ("(", meta["above"]) if "above" in meta else ("[", meta["at_least"]) if "at_least" in meta else None
    high = (")", meta["below"]) if "below" in meta else ("]", meta["at_most"]) if "at_most" in meta else None
    if low and high:
        interval = f"{low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        return f"lie in {interval}", interval
    if low:
        text = f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
    else:
        text = f"{'<' if high[0] == ')' else '<='} {high[1]:g}"
    return f"be {text}", text


def _in_range(value: Any, meta: Dict[str, Any]) -> bool:
    x = float(value)
    return math.isfinite(x) and all((
        "above" not in meta or x > meta["above"], "at_least" not in meta or x >= meta["at_least"],
        "below" not in meta or x < meta["below"], "at_most" not in meta or x <= meta["at_most"],
    ))


def check_settings(config: Any, error: Callable[[str], Exception], template: str = DEFAULT_TEMPLATE) -> None:
    """Raise ``error(one line)`` for the first setting of ``config`` outside its declared choices or range, or a
    ``bool`` setting that is not ``True``/``False``."""
    cls = type(config)
    for field in settings(cls):
        meta, value = field.metadata, getattr(config, field.name)
        if "choices" in meta:
            if value in meta["choices"]:
                continue
            condition, interval, shown = "be one of " + ", ".join(map(str, meta["choices"])), "", repr(value)
        elif _value_type(cls, field) is bool:
            if isinstance(value, bool):
                continue
            condition, interval, shown = "be True or False", "", repr(value)
        elif any(key in meta for key in ("above", "at_least", "below", "at_most")):
            if (value is None and field_default(field) is None) or _in_range(value, meta):
                continue
            (condition, interval), shown = _interval(meta), str(value)
        else:
            continue
        raise error(meta.get("message", template).format(
            flag=spelled(cls, field), condition=condition, interval=interval, why=meta.get("why", ""), value=shown))


__all__ = [
    "DEFAULT_TEMPLATE", "add_flags", "argument_group", "check_settings", "config_from_namespace", "flag_defaults",
    "flag_name", "has_flag", "namespace_values", "option_strings", "parse_bool", "setting", "settings", "spelled",
]
