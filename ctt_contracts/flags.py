"""Command-line flags declared from a config dataclass: each field's default, type and help
live once, on the field, and the parser is read from the class.

The flag of field ``max_len`` is ``--max-len`` (every command spells its flags with dashes,
README "Configuration"); its type is the annotation (``Optional[...]`` unwrapped; a ``parse``
function in the field's metadata for anything that is not int / float / str / Path; a bool
that defaults to False is a switch); its default is the field's; its help is the field's
``help`` metadata with the default appended, so ``--help`` shows what a run without the flag
uses. A field without help is refused, so a new field cannot slip in undocumented. A main reads
the parsed flags back into the dataclass with :func:`from_args` and passes that on.

Every command's parser is a jsonargparse parser (:func:`dataclass_parser`), as ctt-train's
LightningCLI is: each takes ``--config FILE`` (YAML or JSON whose keys are the field names,
e.g. ``max_len: 50``; flags after it win) and ``--print_config`` prints the configuration a run
would use, so every command is configured the same two ways, a file or flags. The flags are
added from the fields here rather than by jsonargparse's ``add_class_arguments``, because that
names each flag after its field (``--max_len``), which would bring back the underscore
spelling the commands left, and cannot put some fields of a class in a mutually exclusive group.
The commands whose flags are plain jsonargparse flags (ctt-evaluate, ctt-train's top level
under LightningCLI) take the same declarations with ``typed=True``: the parser reads the
annotations itself.

Why in ``ctt_contracts``: every package's commands declare their flags this way (the Spark
jobs, the trainer and the evaluation, the resolver), and ``ctt_contracts`` is the one package
they may all import. The flags several commands share (``--lake``, ``--bundle``, ``--index``,
``--feature-repo``, ``--tracking-uri``) are declared once below, as field factories: the
commands differ in their defaults (``--lake`` is required by batch inference and defaults to
``./lake`` on the Spark jobs), not in what the flag means. The previous release's underscore
spellings of ctt-train and ctt-evaluate are derived from the same fields
(:func:`underscore_aliases`, rewritten with a warning by :func:`current_flags`).
"""
from __future__ import annotations

import argparse
import functools
import sys
import types
import typing
import warnings
from dataclasses import MISSING, Field, field, fields
from pathlib import Path, PurePath
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jsonargparse

HELP = "help"  # field metadata keys
PARSE = "parse"
CHOICES = "choices"
FLAG = "flag"
NARGS = "nargs"
ALIASES = "aliases"
METAVAR = "metavar"
SCALARS = (int, float, str, Path)


def described(help: str, parse: Optional[Callable[[str], Any]] = None,
              choices: Optional[Sequence[str]] = None, flag: Optional[str] = None,
              nargs: Optional[str] = None, aliases: Sequence[str] = (),
              metavar: Optional[str] = None) -> Dict[str, Any]:
    """The metadata of a field that is a flag: ``field(default=..., metadata=described(...))``;
    ``flag`` replaces the name derived from the field's (the destination stays the field);
    ``aliases`` are other spellings of the same flag; ``metavar`` names its value in the help;
    ``nargs`` (argparse's, e.g. ``"+"``) makes a tuple field take several values, each read by
    ``parse`` (default str)."""
    meta: Dict[str, Any] = {HELP: help}
    if flag is not None:
        meta[FLAG] = flag
    if aliases:
        meta[ALIASES] = tuple(aliases)
    if metavar is not None:
        meta[METAVAR] = metavar
    if nargs is not None:
        meta[NARGS] = nargs
    if parse is not None:
        meta[PARSE] = parse
    if choices is not None:
        meta[CHOICES] = tuple(choices)
    return meta


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def help_of(cls: type, field_name: str) -> str:
    """The help of a field of ``cls``: for a flag of another command that means the same."""
    return next(f for f in fields(cls) if f.name == field_name).metadata[HELP]


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


def _accepting_values(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse`` over every value a flag can receive: a jsonargparse parser runs a flag's type
    over the command line's text, over the values of a ``--config`` file (YAML gives numbers,
    mappings and lists) and over the field's default. A number is read as its text (an epoch
    timestamp in a file means what it means on the command line); anything else goes to
    ``parse`` as it is, so each parse function also takes its own result (a datetime, a
    mapping, a tuple) and the YAML form of it."""
    @functools.wraps(parse)
    def parse_value(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        return parse(value)

    return parse_value


def _parse_of(cls: type, f: Field, hint: Any) -> Callable[[str], Any]:
    if PARSE in f.metadata:
        return _accepting_values(f.metadata[PARSE])
    if NARGS in f.metadata:
        return str
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


def key_value_pairs(text: Union[str, Mapping[Any, Any]]) -> Dict[str, str]:
    """``'a=b,c=d'`` -> ``{'a': 'b', 'c': 'd'}`` (the parse of a mapping flag); a mapping (a
    config file's) gets text keys and values the same way."""
    if isinstance(text, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in text.items()}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def comma_separated(text: Union[str, Sequence[Any]]) -> Tuple[str, ...]:
    """``'a, b,c'`` -> ``('a', 'b', 'c')`` (the parse of a list flag); a list (a config
    file's) the same way."""
    parts = text.split(",") if isinstance(text, str) else [str(part) for part in text]
    return tuple(part.strip() for part in parts if part.strip())


def _shown(default: Any) -> bool:
    """Whether ``--help`` states the default (not for None or an empty collection)."""
    return default is not None and not (isinstance(default, (dict, list, tuple)) and not default)


def add_dataclass_flags(parser: Any, cls: type, overrides: bool = False,
                        overrides_default: Union[str, Callable[[str], str]] = "default: unchanged",
                        only: Optional[Sequence[str]] = None, skip: Sequence[str] = (),
                        typed: bool = False) -> None:
    """One flag per field of ``cls`` on ``parser`` (a parser or one of its groups), in field
    order; ``only`` / ``skip`` select fields, e.g. to put two of them in a mutually exclusive
    group. ``overrides``: every flag defaults to None (= keep the value from elsewhere, which
    ``overrides_default`` names in the help, or returns for a field name) and none is
    required. ``typed``: ``parser`` is a jsonargparse parser, which reads type hints and
    prints defaults itself: each flag's type is the field's annotation (so a bool takes
    ``true`` / ``false``, as jsonargparse's own flags do)."""
    if typed and overrides:
        raise ValueError("typed flags take their defaults from the fields: no overrides")
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
        if CHOICES in f.metadata:
            kwargs["choices"] = f.metadata[CHOICES]
        if FLAG in f.metadata:  # named after the flag the user types, not the field
            kwargs["metavar"] = f.metadata[FLAG].lstrip("-").replace("-", "_").upper()
        if METAVAR in f.metadata:
            kwargs["metavar"] = f.metadata[METAVAR]
        spellings = (flag_of(cls, f.name), *f.metadata.get(ALIASES, ()))
        if typed:
            kwargs["type"] = hints[f.name]
            kwargs.update({"required": True} if default is MISSING else {"default": default})
            parser.add_argument(*spellings, dest=f.name, **kwargs)
            continue
        if hints[f.name] is bool:
            if default is not False or overrides:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool flag must default to False "
                                f"(it is a switch)")
            parser.add_argument(*spellings, dest=f.name, action="store_true",
                                help=kwargs["help"])
            continue
        kwargs["type"] = _parse_of(cls, f, hints[f.name])
        if NARGS in f.metadata:
            kwargs["nargs"] = f.metadata[NARGS]
            if isinstance(default, tuple):  # jsonargparse parses a default list in place
                default = list(default)
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
                shown = " ".join(map(str, default)) if NARGS in f.metadata else default
                kwargs["help"] += f" (default {shown})"
        parser.add_argument(*spellings, dest=f.name, **kwargs)


Section = Union[type, Tuple[type, Sequence[str]]]


def add_sections(parser: Any, *sections: Section) -> Any:
    """The flags of ``sections`` on ``parser``, in order: a config dataclass stands for its
    fields not added yet, ``(dataclass, field names)`` for those fields alone (so one class's
    flags can sit around another's). Returns ``parser``."""
    added: Dict[type, set] = {}
    for section in sections:
        cls, names = section if isinstance(section, tuple) else (section, None)
        unknown = set(names or ()) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        done = added.setdefault(cls, set())
        chosen = [f.name for f in fields(cls)
                  if f.name not in done and (names is None or f.name in names)]
        add_dataclass_flags(parser, cls, only=chosen)
        done.update(chosen)
    return parser


CONFIG_HELP = ("YAML or JSON file of this command's settings, keyed by the flags' names with "
               "underscores (--feature-repo as feature_repo; a several-values flag takes a "
               "list); flags given after it win")


class FieldHelpFormatter(jsonargparse.DefaultHelpFormatter):
    """A flag's help as its field says it: the field's help already names the default where a
    run without the flag uses one (jsonargparse would add ``(type: str, default: null)`` to
    every flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._HelpAction):
            return super()._get_help_string(action)
        return (action.help or "").replace("%%", "%")  # jsonargparse expands no %% itself


class RawDescriptionFieldHelpFormatter(argparse.RawDescriptionHelpFormatter, FieldHelpFormatter):
    """:class:`FieldHelpFormatter` that keeps the description's own line breaks."""


REQUIRED_PREFIX = "the following arguments are required: "  # argparse's and jsonargparse's


class CommandParser(jsonargparse.ArgumentParser):
    """A command's jsonargparse parser that also checks its exclusive flags after a
    ``--config`` file is merged: argparse checks a mutually exclusive group on the command line
    alone, so a required group would refuse a value the file gives, and two values from the
    file would pass. The groups are added by :func:`add_exclusive_flags`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exclusive: List[Tuple[Tuple[Tuple[str, str], ...], bool]] = []

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None,
                   **kwargs: Any) -> Any:  # type: ignore[override]
        parsed = super().parse_args(args, namespace, **kwargs)
        if not self.exclusive or not kwargs.get("defaults", True):
            return parsed
        # the same arguments without defaults: exactly what the command line and files set
        explicit = super().parse_args(args, **{**kwargs, "defaults": False})
        typed = list(sys.argv[1:] if args is None else args)
        for members, required in self.exclusive:
            given = [flag for dest, flag in members if self._given(explicit, dest, typed)]
            names = ", ".join(flag for _, flag in members)
            if len(given) > 1:
                self.error(f"give at most one of {names} (given: {', '.join(given)})")
            if required and not given:
                self.error(f"one of {names} is required (as a flag or in --config)")
        return parsed

    def _given(self, explicit: Any, dest: str, typed: Sequence[str]) -> bool:
        """Whether ``dest`` was set on the command line, or by a file to other than its default
        (a file written by ``--print_config`` lists every default: those choose nothing)."""
        value = flag_value(explicit, dest)
        if value is None:
            return False
        options = next(a.option_strings for a in self._actions if a.dest == dest)
        on_line = any(t == o or t.startswith(o + "=") for t in typed for o in options)
        return on_line or value != self.get_default(dest)

    def error(self, message: str, ex: Optional[Exception] = None) -> Any:  # type: ignore[override]
        """jsonargparse names a missing required argument by its destination (``feature_repo``):
        say the flag the user types (``--feature-repo``), as argparse did."""
        if message.startswith(REQUIRED_PREFIX):
            flags = {a.dest: a.option_strings[0] for a in self._actions if a.option_strings}
            names = [name.strip() for name in message[len(REQUIRED_PREFIX):].split(",")]
            message = REQUIRED_PREFIX + ", ".join(flags.get(name, name) for name in names)
        return super().error(message, ex)

    def dump(self, namespace: Any, *args: Any, **kwargs: Any) -> str:
        """The configuration as text (``--print_config``) with paths as strings and tuples as
        lists: the flags read by argparse's own ``type`` (in an exclusive group, several values)
        hold values jsonargparse's YAML dump cannot represent; the check runs on the values as
        parsed."""
        if not kwargs.get("skip_validation"):
            self.validate(namespace.clone())
        plain = namespace.clone()
        for key, value in plain.items():
            plain[key] = _plain(value)
        return super().dump(plain, *args, **{**kwargs, "skip_validation": True})


def _plain(value: Any) -> Any:
    """``value`` with every path as a string and every tuple as a list (YAML-safe)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dataclass_parser(prog: str, description: str, *sections: Section,
                     **parser_kwargs: Any) -> CommandParser:
    """A command's jsonargparse parser: ``--config FILE`` (and jsonargparse's
    ``--print_config``) first, then the flags of ``sections`` (:func:`add_sections`)."""
    parser_kwargs.setdefault("formatter_class", FieldHelpFormatter)
    parser = CommandParser(prog=prog, description=description, **parser_kwargs)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help=CONFIG_HELP)
    return add_sections(parser, *sections)


def add_exclusive_flags(parser: CommandParser, *sections: Tuple[type, Sequence[str]],
                        container: Any = None, required: bool = False) -> None:
    """The flags of ``sections`` (``(dataclass, field names)``) as a mutually exclusive group
    of ``container`` (default ``parser``; or one of its argument groups); ``required``: exactly
    one of them must be given. ``parser`` checks the group again after merging ``--config``
    (:class:`CommandParser`)."""
    group = (container or parser).add_mutually_exclusive_group()
    members = []
    for cls, names in sections:
        add_dataclass_flags(group, cls, only=names)
        members += [(name, flag_of(cls, name)) for name in names]
    parser.exclusive.append((tuple(members), required))


def flag_value(args: Any, name: str) -> Any:
    """The parsed value of the flag whose destination is ``name`` (None = not given). A
    jsonargparse namespace is read by key: a field named like one of its methods (``items``,
    ``values``) would read as the method."""
    if isinstance(args, jsonargparse.Namespace):
        return args.get(name)
    return getattr(args, name, None)


def given_fields(cls: type, args: Any, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """The fields of ``cls`` given on the command line or in a ``--config`` file, or set by
    the field's default (None = none of these), but ``skip``; the values of a several-values
    flag as a tuple."""
    return {f.name: tuple(v) if isinstance(v, list) else v
            for f in fields(cls) if f.name not in skip
            for v in (flag_value(args, f.name),) if v is not None}


def from_args(cls: type, args: Any, **fixed: Any) -> Any:
    """``cls`` built from the parsed flags of its fields (a field not given keeps its
    default), ``fixed`` fields set by the caller."""
    return cls(**given_fields(cls, args, skip=tuple(fixed)), **fixed)


# --------------------------------------------------------------------------------------
# The flags several commands share: one help each; the default is the command's
# --------------------------------------------------------------------------------------
LAKE_HELP = "lake root: local folder or Hadoop/object-store URI of the Delta tables"
BUNDLE_HELP = "model bundle folder (the trainer's export: weights, item embeddings, manifest)"
INDEX_HELP = "item index folder of the bundle, from ctt-build-index"
FEATURE_REPO_HELP = "Feast repo folder (feature_store.yaml, `feast apply` done)"
TRACKING_URI_HELP = "MLflow tracking URI"


def flag_field(help: str, default: Any = MISSING, default_factory: Any = MISSING,
               **meta: Any) -> Any:
    """The ``field(...)`` of a flag: its default, or a factory called when the parser is
    built (neither = a required flag), and ``described(help, **meta)``."""
    return field(default=default, default_factory=default_factory,
                 metadata=described(help, **meta))


def _with_note(help: str, note: str) -> str:
    return f"{help}; {note}" if note else help


def lake_field(default: Any = MISSING, default_factory: Any = MISSING, note: str = "") -> Any:
    """``--lake``."""
    return flag_field(_with_note(LAKE_HELP, note), default, default_factory)


def bundle_field(default: Any = MISSING, note: str = "") -> Any:
    """``--bundle``."""
    return flag_field(_with_note(BUNDLE_HELP, note), default)


def index_field(note: str) -> Any:
    """``--index`` (optional everywhere: ``note`` says what happens without it)."""
    return flag_field(_with_note(INDEX_HELP, note), None)


def feature_repo_field(default: Any = MISSING, default_factory: Any = MISSING,
                       note: str = "") -> Any:
    """``--feature-repo``."""
    return flag_field(_with_note(FEATURE_REPO_HELP, note), default, default_factory)


def tracking_uri_field(note: str) -> Any:
    """``--tracking-uri`` (optional everywhere: ``note`` says which URI is used without it)."""
    return flag_field(_with_note(TRACKING_URI_HELP, note), None)


# --------------------------------------------------------------------------------------
# The previous release's spellings (ctt-train, ctt-evaluate): accepted with a warning
# --------------------------------------------------------------------------------------
def underscore_aliases(*classes: type) -> Dict[str, str]:
    """``{"--out_dir": "--out-dir", ...}``: the underscore spelling of every flag of
    ``classes`` whose field name has one, mapped to the flag's current spelling."""
    return {"--" + f.name: flag_of(cls, f.name)
            for cls in classes for f in fields(cls) if "_" in f.name}


def current_flags(argv: Optional[Sequence[str]], renamed: Dict[str, str], prog: str) -> List[str]:
    """``argv`` (default: this process's) with each deprecated spelling, alone or as
    ``--flag=value``, replaced by its current one; one FutureWarning per replaced flag."""
    out = []
    for token in sys.argv[1:] if argv is None else argv:
        flag, eq, value = token.partition("=")
        new = renamed.get(flag)
        if new is None:
            out.append(token)
            continue
        warnings.warn(f"{prog}: {flag} is deprecated and will be removed in the next release; "
                      f"use {new}", FutureWarning, stacklevel=3)
        out.append(new + eq + value)
    return out
