"""A refresh rebuilds a lake with the configuration it was built with, not with defaults.

The lake is built with non-default flags (history cap, minimum history, context top-k, subject
derivation, explicit split cutoffs, quarantine threshold), a day of events is appended, and
``run_refresh`` runs WITHOUT any build flag (as the scheduler calls it). Its sequences and
context_rows must equal, row for row, a full build of the whole log with the same flags in a
fresh lake; and they must show the flags (a refresh with the defaults would keep 3 categories
per context and 100 events per history, which this log exceeds).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import refresh_lake as RL

import ctt_contracts as C
from models.lake_read import read_arrow
from pipelines.build import run_build_sequences
from pipelines.build_config import BuildConfig, load_build_config
from pipelines.refresh import run_refresh

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

N_USERS = 12


def _table(lake: str, table: str, key) -> pd.DataFrame:
    frame = read_arrow(C.LakePaths(lake).table(table))[0].to_pandas()
    for col in frame.columns:  # arrays -> lists so that rows compare by value
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return frame.sort_values(key).reset_index(drop=True)[list(frame.columns)]


def test_refresh_reuses_the_stored_build_config_and_equals_a_full_rebuild(spark, tmp_path, capsys):
    with RL.local_delta(spark):
        _scenario(spark, tmp_path, capsys)


def _scenario(spark, tmp_path, capsys) -> None:
    start = datetime.now(timezone.utc).replace(microsecond=0)
    users = [10 * u for u in range(1, N_USERS + 1)]
    profiles = RL.users_frame(users)
    base = RL.events(users, start - timedelta(days=30), start - timedelta(days=2), (4, 9), seed=1)
    day = RL.events(users[:5], start - timedelta(days=1), start - timedelta(hours=2), (1, 2),
                    seed=9)
    now = start - timedelta(hours=1)
    cfg = BuildConfig(max_len=3, min_history=2, context_top_k=2, derive_subject="last_view",
                      subject_window_minutes=5, max_quarantine_frac=0.9, val_frac=0.3,
                      val_start=start - timedelta(days=12), test_start=start - timedelta(days=6))

    lake = str(tmp_path / "lake")
    RL.write_raw(spark, lake, base, profiles)
    run_build_sequences(spark, lake, cfg, now)
    stored = load_build_config(spark, lake)
    assert stored is not None and stored.stored_fields() == cfg.stored_fields()

    RL.write_raw(spark, lake, day, mode="append")
    bundle = RL.export_bundle(tmp_path, "build-config-model", seed=0)
    capsys.readouterr()
    run_refresh(spark, lake, bundle, tmp_path / "feast", apply=True, now=now)
    assert "build config: the lake's stored build config" in capsys.readouterr().out

    full = str(tmp_path / "full")
    RL.write_raw(spark, full, pd.concat([base, day], ignore_index=True), profiles)
    run_build_sequences(spark, full, cfg, now)

    seq = _table(lake, C.T_SEQUENCES, C.SEQUENCES_KEY)
    ctx = _table(lake, C.T_CONTEXT_ROWS, C.CONTEXT_ROWS_KEY)
    pd.testing.assert_frame_equal(seq, _table(full, C.T_SEQUENCES, C.SEQUENCES_KEY))
    pd.testing.assert_frame_equal(ctx, _table(full, C.T_CONTEXT_ROWS, C.CONTEXT_ROWS_KEY))
    # the refreshed lake carries the flags, which the defaults would not give on this log
    assert ctx[C.CONTEXT_CATEGORY_IDS].map(len).max() == 2
    assert (RL.catalog()[C.CATEGORY_IDS].map(len) > 2).any()
    assert seq[C.ITEM_IDS].map(len).max() == 3 and seq[C.ITEM_IDS].map(len).min() >= 2
    assert set(seq[C.SPLIT]) == set(C.SPLITS)

