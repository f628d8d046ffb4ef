"""The generator's planted signal, measured statistically on generated data (pure pandas, fast),
plus determinism and equality of the Spark path with the pure-Python path."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipelines import contracts as C
from pipelines.synthetic import (BOGUS_EVENT_TYPE, FUTURE_TS_SECONDS, SyntheticConfig,
                                 build_catalog, generate, preferred_age, preferred_country,
                                 profiles_frame, simulate_users, users_for_events)

CFG = SyntheticConfig(n_users=1500, seed=11)


@pytest.fixture(scope="module")
def world():
    cat = build_catalog(CFG)
    users, events = simulate_users(CFG, cat, np.arange(CFG.n_users))
    return cat, users, events


def _clean_conversions(cat, events):
    conv = events[(events[C.EVENT_TYPE] == C.EVENT_CONVERSION)
                  & (events[C.ITEM_ID] < cat.n_items)
                  & (events[C.EVENT_TS].astype("int64") // 10**9 < FUTURE_TS_SECONDS)]
    conv = conv.drop_duplicates().sort_values([C.USER_ID, C.EVENT_TS]).copy()
    conv["cat"] = cat.primary[conv[C.ITEM_ID].to_numpy()]
    conv["style"] = cat.style[conv[C.ITEM_ID].to_numpy()]
    conv["subject_cat"] = cat.primary[conv[C.SUBJECT_ITEM_ID].to_numpy()]
    return conv


def test_catalogue_contract_and_category_size(world):
    cat, _, _ = world
    assert np.bincount(cat.primary, minlength=CFG.n_categories).min() >= 250
    frame = cat.frame()
    for ids, ws in zip(frame[C.CATEGORY_IDS], frame[C.CATEGORY_WEIGHTS]):
        assert 1 <= len(ids) <= 5 and len(set(ids)) == len(ids) == len(ws)
        assert all(0 < w <= 1 for w in ws) and list(ws) == sorted(ws, reverse=True)
        assert ws[0] > ws[-1] or len(ws) == 1  # primary strictly highest
    assert (frame[C.CATEGORY_IDS].str[0].to_numpy() == cat.primary).all()


def test_session_intent_comes_from_context_not_history(world):
    cat, _, events = world
    conv = _clean_conversions(cat, events)
    chance = 1.0 / CFG.n_categories
    subject_hit = (conv["cat"] == conv["subject_cat"]).mean()
    hist_hit, style_hit, n = 0, 0, 0
    for _, g in conv.groupby(C.USER_ID):
        cats, styles = g["cat"].to_numpy(), g["style"].to_numpy()
        for i in range(1, len(cats)):
            hist_hit += np.bincount(cats[:i], minlength=CFG.n_categories).argmax() == cats[i]
            style_hit += np.bincount(styles[:i], minlength=CFG.n_styles).argmax() == styles[i]
            n += 1
    assert n > 3000
    assert subject_hit > 0.99  # the subject item reveals the intent category
    assert hist_hit / n < 0.25 < subject_hit - 0.7  # history's majority category mostly misses
    assert hist_hit / n > chance  # ... but long-term interests leave a trace
    assert style_hit / n > 0.6 > 2.5 * (1.0 / CFG.n_styles)  # history reveals the style


def test_history_plus_context_beats_category_popularity_at_recall_100(world):
    """The quality bar's premise: popularity inside the context category is not enough."""
    cat, _, events = world
    conv = _clean_conversions(cat, events)
    by_cat = {c: np.flatnonzero(cat.primary == c) for c in range(CFG.n_categories)}
    top100 = {c: set(ids[np.argsort(-cat.popularity[ids])][:100]) for c, ids in by_cat.items()}
    heur, oracle = [], []
    for _, g in conv.groupby(C.USER_ID):
        items, cats, styles = (g[C.ITEM_ID].to_numpy(), g["cat"].to_numpy(), g["style"].to_numpy())
        for i in range(1, len(items)):
            c = cats[i]
            heur.append(items[i] in top100[c])
            style = np.bincount(styles[:i], minlength=CFG.n_styles).argmax()
            ids = by_cat[c]
            key = np.lexsort((-cat.popularity[ids], cat.style[ids] != style))
            oracle.append(items[i] in set(ids[key][:100]))
    h, o = np.mean(heur), np.mean(oracle)
    assert h < 0.6
    assert o >= 1.2 * h, (h, o)


def test_demographics_follow_the_primary_interest(world):
    _, users, _ = world
    prof = profiles_frame(CFG, users[C.USER_ID].to_numpy())
    primary = prof["interests"].str[0]
    age_match = (prof[C.AGE_BUCKET] == primary.map(preferred_age)).mean()
    country_match = (prof[C.COUNTRY] == primary.map(preferred_country)).mean()
    assert age_match > 0.5 > 3 * (1 / 7)  # chance ~ 1/7
    assert country_match > 0.55 > 3 * 0.1
    assert set(prof[C.GENDER]) <= set(C.GENDERS)
    assert users.equals(prof[[C.USER_ID, C.AGE_BUCKET, C.COUNTRY, C.GENDER]]
                        .astype(users.dtypes.to_dict()))


def test_malformed_rows_rate_and_kinds(world):
    cat, _, events = world
    n = len(events)
    kinds = Counter({
        "type": int((events[C.EVENT_TYPE] == BOGUS_EVENT_TYPE).sum()),
        "future": int((events[C.EVENT_TS].astype("int64") // 10**9 >= FUTURE_TS_SECONDS).sum()),
        "item": int((events[C.ITEM_ID] >= cat.n_items).sum()),
        "dup": int(events.duplicated().sum()),
    })
    assert all(v > 0 for v in kinds.values()), kinds
    assert 0.5 * CFG.malformed_frac < sum(kinds.values()) / n < 2 * CFG.malformed_frac
    per_user = events.groupby(C.USER_ID).size().mean()
    assert abs(per_user - CFG.expected_events_per_user()) / per_user < 0.1
    assert users_for_events(int(per_user * 100), CFG) in range(95, 106)


def test_deterministic_per_user_and_seed_sensitive(world):
    cat, users, events = world
    _, again = simulate_users(CFG, cat, np.array([5, 6]))
    first = events[events[C.USER_ID].isin([5, 6])].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), first)
    other_cfg = SyntheticConfig(n_users=CFG.n_users, seed=12)
    _, other = simulate_users(other_cfg, build_catalog(other_cfg), np.array([5, 6]))
    assert not other.reset_index(drop=True).equals(first)


@pytest.mark.spark
def test_spark_generation_equals_pure_python(spark):
    cfg = SyntheticConfig(n_users=40, n_items=400, seed=3)
    tables = generate(spark, cfg, partitions=3)
    users, events = simulate_users(cfg, tables.catalog, np.arange(cfg.n_users))
    got = tables.events.toPandas().sort_values([C.USER_ID, C.EVENT_TS, C.ITEM_ID, C.EVENT_TYPE])
    want = events.sort_values([C.USER_ID, C.EVENT_TS, C.ITEM_ID, C.EVENT_TYPE])
    assert len(got) == len(want)
    for col in (C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.SURFACE, C.SUBJECT_ITEM_ID):
        assert got[col].tolist() == want[col].tolist(), col
    got_ts = pd.to_datetime(got[C.EVENT_TS]).dt.tz_localize(None).astype("int64").tolist()
    assert got_ts == want[C.EVENT_TS].dt.tz_localize(None).astype("int64").tolist()
    assert tables.users.toPandas().sort_values(C.USER_ID)[C.AGE_BUCKET].tolist() == \
        users[C.AGE_BUCKET].tolist()
    assert tables.items.count() == cfg.n_items
