"""The flags helper (ctt_contracts/flags.py): a parser read from a config dataclass, names,
types, defaults and help from the fields; typed flags for jsonargparse parsers; the previous
release's underscore spellings."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Tuple

import pytest
from jsonargparse import ArgumentParser

from ctt_contracts.flags import (add_dataclass_flags, current_flags, described, flag_field,
                                 from_args, given_fields, underscore_aliases)


def timestamp(text) -> datetime:
    """A parse function takes its own result too (jsonargparse checks parsed values again)."""
    parsed = text if isinstance(text, datetime) else datetime.fromisoformat(text)
    return parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Knobs:
    source_col: str = field(metadata=described("column to read"))
    top_k: int = field(default=3, metadata=described("rows kept"))
    share: Optional[float] = field(default=None, metadata=described("share of 100% kept"))
    mode: str = field(default="fast", metadata=described("how", choices=("fast", "slow")))
    since: Optional[datetime] = field(default=None, metadata=described("start", parse=timestamp))


def knobs_parser(overrides: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knobs")
    add_dataclass_flags(p, Knobs, overrides=overrides, overrides_default="default: kept")
    return p


def test_flags_take_the_field_name_with_dashes_its_type_default_and_choices():
    args = knobs_parser().parse_args(["--source-col", "c", "--share", "0.5",
                                      "--since", "2024-01-02"])
    assert Knobs(**given_fields(Knobs, args)) == Knobs(
        "c", 3, 0.5, "fast", datetime(2024, 1, 2, tzinfo=timezone.utc))
    assert knobs_parser().parse_args(["--source-col", "c", "--top-k", "5"]).top_k == 5
    with pytest.raises(SystemExit):
        knobs_parser().parse_args(["--source-col", "c", "--mode", "medium"])
    with pytest.raises(SystemExit):
        knobs_parser().parse_args([])  # a field without a default is a required flag
    with pytest.raises(SystemExit):
        knobs_parser().parse_args(["--source-col", "c", "--top-k", "many"])


def test_help_shows_the_field_help_and_its_default_or_the_override_source():
    text = " ".join(knobs_parser().format_help().split())
    assert "--top-k TOP_K rows kept (default 3)" in text
    assert "share of 100% kept" in text and "--share SHARE share of 100% kept (default" not in text
    overriding = knobs_parser(overrides=True)
    assert given_fields(Knobs, overriding.parse_args([])) == {}
    assert "rows kept (default: kept)" in " ".join(overriding.format_help().split())


def test_a_field_without_help_or_with_an_unknown_type_is_refused():
    @dataclass
    class Undocumented:
        n: int = 1

    @dataclass
    class Pair:
        both: Tuple[int, int] = field(default=(1, 2), metadata=described("two numbers"))

    with pytest.raises(TypeError, match="Undocumented.n has no help"):
        add_dataclass_flags(argparse.ArgumentParser(), Undocumented)
    with pytest.raises(TypeError, match="Pair.both: type .* needs a `parse` function"):
        add_dataclass_flags(argparse.ArgumentParser(), Pair)


def test_a_bool_field_is_a_switch_that_defaults_to_false():
    @dataclass
    class Switches:
        dry_run: bool = field(default=False, metadata=described("plan only"))

    @dataclass
    class OnByDefault:
        fast: bool = field(default=True, metadata=described("go fast"))

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Switches)
    assert p.parse_args([]).dry_run is False and p.parse_args(["--dry-run"]).dry_run is True
    with pytest.raises(TypeError, match="must default to False"):
        add_dataclass_flags(argparse.ArgumentParser(), OnByDefault)


@dataclass(frozen=True)
class Report:
    source: Path = flag_field("input folder")
    parts: Tuple[str, ...] = flag_field("parts kept", ("a", "b"), nargs="+", choices=("a", "b", "c"))
    strict: bool = flag_field("stop on the first problem", False)
    top_k: Optional[int] = flag_field("rows kept", None)


def test_several_values_flags_and_paths_build_the_dataclass():
    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Report)
    assert from_args(Report, p.parse_args(["--source", "in"])) == Report(Path("in"))
    args = p.parse_args(["--source", "in", "--parts", "c", "a", "--strict", "--top-k", "4"])
    assert from_args(Report, args) == Report(Path("in"), ("c", "a"), True, 4)
    assert from_args(Report, args, top_k=9).top_k == 9  # a field the caller fixes wins
    with pytest.raises(SystemExit):
        p.parse_args(["--source", "in", "--parts", "d"])
    assert "parts kept (default a b)" in " ".join(p.format_help().split())


def test_typed_flags_on_a_jsonargparse_parser_take_the_annotations_and_bools_take_values():
    @dataclass(frozen=True)
    class Run:
        out_dir: str = flag_field("run folder", "runs/x")
        resume: bool = flag_field("resume an unfinished run", True)
        name: Optional[str] = flag_field("run name", None)

    p = ArgumentParser(prog="run")
    add_dataclass_flags(p, Run, typed=True)
    assert from_args(Run, p.parse_args([])) == Run()
    assert from_args(Run, p.parse_args(["--resume", "false", "--out-dir", "o", "--name", "n"])) \
        == Run("o", False, "n")
    text = " ".join(p.format_help().split())
    assert "run folder (type: str, default: runs/x)" in text  # the parser states it, once
    with pytest.raises(ValueError, match="no overrides"):
        add_dataclass_flags(ArgumentParser(), Run, typed=True, overrides=True)


def test_underscore_aliases_name_every_flag_of_a_field_with_an_underscore_and_rewrite_with_a_warning():
    assert underscore_aliases(Report, Knobs) == {"--top_k": "--top-k", "--source_col": "--source-col"}
    with pytest.warns(FutureWarning, match="--top_k is deprecated .* use --top-k"):
        assert current_flags(["--top_k=3", "--source", "s"], underscore_aliases(Report), "r") == \
            ["--top-k=3", "--source", "s"]


def test_sections_place_some_fields_of_a_class_around_another_and_aliases_name_the_same_flag():
    from ctt_contracts.flags import add_sections, dataclass_parser

    @dataclass(frozen=True)
    class Output:
        out: Optional[str] = flag_field("write here", None, aliases=("--output-file",),
                                        metavar="FILE")

    p = dataclass_parser("report", "a report", (Report, ("source",)), Output, Report)
    text = " ".join(p.format_help().split())
    assert "usage: report [--config CONFIG] --source SOURCE [--out FILE] [--parts" in text
    assert "--out FILE, --output-file FILE write here" in text
    args = p.parse_args(["--source", "s", "--output-file", "o.json"])
    assert from_args(Output, args) == Output("o.json") and from_args(Report, args) == Report(Path("s"))
    with pytest.raises(ValueError, match=r"Report has no fields \['sauce'\]"):
        add_sections(argparse.ArgumentParser(), (Report, ("sauce",)))


def test_a_command_parser_reads_a_config_file_and_the_flags_after_it_win(tmp_path):
    from ctt_contracts.flags import dataclass_parser

    config = tmp_path / "knobs.yaml"
    config.write_text("source_col: c\ntop_k: 5\nsince: '2024-01-02'\nshare: 0.25\n")
    p = dataclass_parser("knobs", "knobs from a file", Knobs)
    args = p.parse_args(["--config", str(config), "--top-k", "7"])
    assert from_args(Knobs, args) == Knobs("c", 7, 0.25, "fast",
                                           datetime(2024, 1, 2, tzinfo=timezone.utc))
    config.write_text("source_col: c\nmode: medium\n")
    with pytest.raises(SystemExit):
        p.parse_args(["--config", str(config)])  # the file's values meet the flags' choices
    text = " ".join(p.format_help().split())
    assert "--top-k TOP_K rows kept (default 3)" in text  # the field's help, once
    assert "type: int" not in text and "share of 100% kept" in text


@dataclass(frozen=True)
class Source:
    items: Optional[str] = flag_field("items file", None)  # a name jsonargparse's namespace has
    url: Optional[str] = flag_field("items URL", None)
    limit: int = flag_field("rows read", 10)


def test_exclusive_flags_are_checked_after_the_config_file_is_merged(tmp_path):
    from ctt_contracts.flags import add_exclusive_flags, dataclass_parser

    def parsed(*argv):
        p = dataclass_parser("source", "one source", (Source, ("limit",)))
        add_exclusive_flags(p, (Source, ("items", "url")), required=True)
        return from_args(Source, p.parse_args(list(argv)))

    config = tmp_path / "source.yaml"
    config.write_text("url: u\n")
    assert parsed("--items", "a") == Source(items="a")
    assert parsed("--config", str(config), "--limit", "3") == Source(url="u", limit=3)
    for argv in ([], ["--config", str(config), "--items", "a"], ["--items", "a", "--url", "u"]):
        with pytest.raises(SystemExit):
            parsed(*argv)
