"""Command-line flags declared from a config dataclass: each field's default, type and help
live once, on the field, and the parser is read from the class.

The flag of field ``max_len`` is ``--max-len`` (every command spells its flags with dashes,
README "Configuration"); its type is the annotation (``Optional[...]`` unwrapped; a ``parse``
function in the field's metadata for anything that is not int / float / str; a bool that
defaults to False is a switch); its default is
the field's; its help is the field's ``help`` metadata with the default appended, so ``--help``
shows what a run without the flag uses. A field without help is refused, so a new field cannot
slip in undocumented.

Why not jsonargparse's ``add_class_arguments``: it names each flag after its field
(``--max_len``), which would bring back the underscore spelling the commands left, and the
Spark jobs' parsers are argparse parsers (``spark-submit`` passes their flags through) with
groups and shared flags that a jsonargparse parser would have to re-declare.
"""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

HELP = "help"  # field metadata keys
PARSE = "parse"
CHOICES = "choices"
FLAG = "flag"
SCALARS = (int, float, str)


def described(help: str, parse: Optional[Callable[[str], Any]] = None,
              choices: Optional[Sequence[str]] = None, flag: Optional[str] = None) -> Dict[str, Any]:
    """The metadata of a field that is a flag: ``field(default=..., metadata=described(...))``;
    ``flag`` replaces the name derived from the field's (the destination stays the field)."""
    meta: Dict[str, Any] = {HELP: help}
    if flag is not None:
        meta[FLAG] = flag
    if parse is not None:
        meta[PARSE] = parse
    if choices is not None:
        meta[CHOICES] = tuple(choices)
    return meta


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def flag_of(cls: type, field_name: str) -> str:
    """The flag of a field of ``cls`` (its ``flag`` metadata, else the field name with dashes)."""
    f = next(f for f in fields(cls) if f.name == field_name)
    return f.metadata.get(FLAG, flag_name(f.name))


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_of(cls: type, f: Field, hint: Any) -> Callable[[str], Any]:
    if PARSE in f.metadata:
        return f.metadata[PARSE]
    tp = _unwrap_optional(hint)
    if tp not in SCALARS:
        raise TypeError(f"{cls.__name__}.{f.name}: type {hint} needs a `parse` function in its "
                        f"metadata to be a flag")
    return tp


def field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def key_value_pairs(text: str) -> Dict[str, str]:
    """``'a=b,c=d'`` -> ``{'a': 'b', 'c': 'd'}`` (the parse of a mapping flag)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def comma_separated(text: str) -> Tuple[str, ...]:
    """``'a, b,c'`` -> ``('a', 'b', 'c')`` (the parse of a list flag)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(default: Any) -> bool:
    """Whether ``--help`` states the default (not for None or an empty collection)."""
    return default is not None and not (isinstance(default, (dict, list, tuple)) and not default)


def add_dataclass_flags(parser: Any, cls: type, overrides: bool = False,
                        overrides_default: Union[str, Callable[[str], str]] = "default: unchanged",
                        only: Optional[Sequence[str]] = None, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` on ``parser`` (a parser or one of its groups), in field
    order; ``only`` / ``skip`` select fields, e.g. to put two of them in a mutually exclusive
    group. ``overrides``: every flag defaults to None (= keep the value from elsewhere, which
    ``overrides_default`` names in the help, or returns for a field name) and none is
    required."""
    hints = typing.get_type_hints(cls)
    unknown = (set(only or ()) | set(skip)) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    for f in fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        if HELP not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with "
                            f"metadata=described(...)")
        default = field_default(f)
        kwargs: Dict[str, Any] = {"help": f.metadata[HELP].replace("%", "%%")}
        if hints[f.name] is bool:
            if default is not False or overrides:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool flag must default to False "
                                f"(it is a switch)")
            parser.add_argument(flag_of(cls, f.name), dest=f.name, action="store_true",
                                help=kwargs["help"])
            continue
        kwargs["type"] = _parse_of(cls, f, hints[f.name])
        if CHOICES in f.metadata:
            kwargs["choices"] = f.metadata[CHOICES]
        if overrides:
            kwargs["default"] = None
            said = overrides_default if isinstance(overrides_default, str) else \
                overrides_default(f.name)
            kwargs["help"] += f" ({said})"
        elif default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if _shown(default):
                kwargs["help"] += f" (default {default})"
        if FLAG in f.metadata:  # named after the flag the user types, not the field
            kwargs["metavar"] = f.metadata[FLAG].lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag_of(cls, f.name), dest=f.name, **kwargs)


def given_fields(cls: type, args: argparse.Namespace, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """The fields of ``cls`` given on the command line (None = not given), but ``skip``."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}

