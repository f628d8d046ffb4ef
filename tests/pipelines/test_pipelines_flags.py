"""The data jobs' flags declared from their config dataclasses (ctt_contracts/flags.py): BuildConfig
on build and refresh, the ingest mappings, SyntheticConfig on generate."""
from __future__ import annotations

from dataclasses import fields

import pytest

from ctt_contracts.flags import flag_name, given_fields
from pipelines.build_config import BuildConfig


@pytest.mark.parametrize("overrides", [False, True])
def test_every_build_config_field_is_a_flag_of_build_and_refresh(overrides):
    from pipelines.cli import build_parser
    from pipelines.refresh import build_parser as refresh_parser

    parser = refresh_parser() if overrides else build_parser()
    text = " ".join(parser.format_help().split())
    defaults = BuildConfig()
    for f in fields(BuildConfig):
        assert flag_name(f.name) in text
        if overrides:
            assert f"{f.metadata['help'].split()[-1]} (default: the lake's stored value)" in text
        elif getattr(defaults, f.name) is not None:
            assert f"(default {getattr(defaults, f.name)})" in text
    argv = ["--bundle", "b"] if overrides else []
    assert given_fields(BuildConfig, parser.parse_args(argv)) == (
        {} if overrides else {k: v for k, v in vars(defaults).items() if v is not None})


INGEST_BASE = ["--events", "e.csv", "--user-col", "u", "--item-col", "i", "--ts-col", "t"]


def test_every_event_mapping_field_is_an_ingest_flag_and_builds_the_mapping():
    from pipelines import ingest as I
    from pipelines.cli import ingest_parser, mappings_from_args

    text = ingest_parser().format_help()
    assert all(flag_name(f.name) in text for f in fields(I.EventMapping))
    args = ingest_parser().parse_args([*INGEST_BASE, "--event-type-col", "kind", "--event-type-map",
                                       "cart=conversion, view=view", "--session-col", "s",
                                       "--gender-map", "F=f"])
    events, items, users = mappings_from_args(args)
    assert events == I.EventMapping(user_col="u", item_col="i", ts_col="t", event_type_col="kind",
                                    event_type_map={"cart": "conversion", "view": "view"},
                                    session_col="s")
    assert (items, users) == (None, None)
    constant = mappings_from_args(ingest_parser().parse_args([*INGEST_BASE, "--event-type",
                                                              "conversion"]))[0]
    assert constant.event_type == "conversion" and constant.event_type_map == {}


def test_items_and_users_flags_come_from_their_mappings_with_the_id_columns_falling_back():
    from pipelines import ingest as I
    from pipelines.cli import (ITEM_HAND_DECLARED, USER_HAND_DECLARED, ingest_parser,
                               mappings_from_args)

    text = ingest_parser().format_help()
    for cls, hand in ((I.ItemMapping, ITEM_HAND_DECLARED), (I.UserMapping, USER_HAND_DECLARED)):
        assert all(flag_name(f.name) in text for f in fields(cls) if f.name not in hand)
    argv = [*INGEST_BASE, "--event-type", "conversion", "--items", "it.csv",
            "--category-flag-cols", "Action, Comedy", "--users", "us.csv", "--age-col", "age",
            "--age-is-bucket", "--gender-map", "X=u"]
    _, items, users = mappings_from_args(ingest_parser().parse_args(argv))
    assert items == I.ItemMapping(item_col="i", category_flag_cols=("Action", "Comedy"))
    assert users == I.UserMapping(user_col="u", age_col="age", age_is_bucket=True,
                                  gender_map={**I.DEFAULT_GENDER_MAP, "x": "u"})
    argv = [*INGEST_BASE, "--event-type", "view", "--items", "it.csv", "--item-id-col", "id",
            "--categories-col", "cats", "--category-sep", ";", "--users", "us.csv",
            "--users-user-col", "uid"]
    _, items, users = mappings_from_args(ingest_parser().parse_args(argv))
    assert items == I.ItemMapping(item_col="id", categories_col="cats", category_sep=";")
    assert users == I.UserMapping(user_col="uid")


@pytest.mark.parametrize("extra, message", [
    (["--event-type-col", "k", "--event-type", "view"], "not allowed with argument"),
    ([], "one of --event-type-col, --event-type is required"),
    (["--event-type", "purchase"], "invalid choice"),
    (["--event-type-col", "k", "--event-type-map", "cart"], "expected key=value, got 'cart'"),
])
def test_ingest_refuses_a_bad_event_mapping_before_spark(extra, message, capsys):
    from pipelines.cli import ingest_parser

    with pytest.raises(SystemExit):
        ingest_parser().parse_args([*INGEST_BASE, *extra])
    assert message in capsys.readouterr().err


def test_every_synthetic_config_field_is_a_generate_flag_with_its_default_or_the_presets():
    from pipelines.cli import generate_parser
    from ctt_contracts.flags import flag_of
    from pipelines.synthetic import ALL_KNOBS, PLANTED, PRESET_DEFAULTS, SyntheticConfig

    text = " ".join(generate_parser().format_help().split())
    for f in fields(SyntheticConfig):
        assert flag_of(SyntheticConfig, f.name) in text
    assert "--users USERS users (default 1000)" in text and "--items ITEMS" in text
    assert "P(a session converts) (default: planted 0.7)" in text
    args = generate_parser().parse_args(["--users", "7", "--styles", "4"])
    assert given_fields(SyntheticConfig, args) == {
        "preset": "realistic", "n_users": 7, "malformed_frac": 0.005, "seed": 0,
        "start": "2024-01-01", "days": 180, "n_styles": 4}
    assert set(ALL_KNOBS) == {k for p in PRESET_DEFAULTS.values() for k in p}
    assert generate_parser().parse_args(["--preset", PLANTED]).preset == PLANTED
