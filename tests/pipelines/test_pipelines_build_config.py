"""The build configuration's flags and stored copy (pure parts; the Spark round trip through a
refresh is tests/reliability/test_reliability_build_config.py)."""
from __future__ import annotations

import pytest

from pipelines.build_config import BuildConfig, flag_values, from_stored


def test_stored_copy_round_trips_and_old_or_new_copies_are_handled():
    cfg = BuildConfig(max_len=9, context_top_k=4, derive_subject="last_other_view")
    assert from_stored(cfg.stored_fields()) == cfg
    assert "val_start" not in cfg.stored_fields()  # the cutoffs have their own table
    older = {k: v for k, v in cfg.stored_fields().items() if k != "context_top_k"}
    assert from_stored(older).context_top_k == BuildConfig().context_top_k
    with pytest.raises(ValueError, match="does not know"):
        from_stored({**cfg.stored_fields(), "new_knob": 1})
    with pytest.raises(ValueError, match="context_top_k"):
        BuildConfig(context_top_k=0)


def test_build_declares_defaults_and_refresh_declares_overrides_from_one_flag_set():
    from pipelines.cli import build_parser
    from pipelines.refresh import build_parser as refresh_parser

    assert BuildConfig(**flag_values(build_parser().parse_args([]))) == BuildConfig()
    given = build_parser().parse_args(["--context-top-k", "5", "--min-history", "0"])
    assert BuildConfig(**flag_values(given)) == BuildConfig(context_top_k=5, min_history=0)
    assert flag_values(refresh_parser().parse_args(["--bundle", "b"])) == {}
    args = refresh_parser().parse_args(["--bundle", "b", "--context-top-k", "5",
                                        "--derive-subject", "last_view", "--max-len", "20"])
    assert flag_values(args) == {"context_top_k": 5, "derive_subject": "last_view", "max_len": 20}


def test_refresh_flags_override_the_stored_config_and_say_so():
    from pipelines.build_config import with_overrides

    stored = BuildConfig(max_len=7, context_top_k=5, min_history=2)
    cfg, line = with_overrides(stored, {"context_top_k": 4})
    assert (cfg.max_len, cfg.context_top_k, cfg.min_history) == (7, 4, 2)
    assert line == ("build config: the lake's stored build config; overridden by flags: "
                    "context_top_k=4")
    cfg, line = with_overrides(None, {})
    assert cfg == BuildConfig() and "defaults" in line


def test_full_flag_on_build_and_refresh_is_not_a_config_field():
    from pipelines.cli import build_parser
    from pipelines.refresh import build_parser as refresh_parser

    assert not build_parser().parse_args([]).full
    assert build_parser().parse_args(["--full"]).full
    assert refresh_parser().parse_args(["--bundle", "b", "--full"]).full
    assert flag_values(refresh_parser().parse_args(["--bundle", "b", "--full"])) == {}


def test_progress_round_trips_and_only_output_fields_force_a_full_build():
    from datetime import datetime, timezone

    from pipelines.build_progress import BuildProgress, Mark, _config_change
    from pipelines.sequences import SplitCutoffs
    from pipelines.subjects import SubjectCoverage

    t = datetime(2024, 5, 1, tzinfo=timezone.utc)
    progress = BuildProgress(t, {"raw_events": Mark(3, 17)}, {"events": Mark(5, 19)},
                             SplitCutoffs(t, t, "quantiles"),
                             SubjectCoverage("none", 60, 10, 4, 0, 0, 0))
    assert BuildProgress.from_json(progress.to_json()) == progress
    stored = BuildConfig(max_len=9)
    assert _config_change(stored, BuildConfig(max_len=9, max_quarantine_frac=1.0)) is None
    assert _config_change(stored, BuildConfig(max_len=8)) == (
        "the build config differs from the last build's (max_len: 9 -> 8)")
    assert _config_change(None, stored) == "the lake stores no build config"
