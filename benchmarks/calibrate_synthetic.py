"""Calibration of the realistic synthetic world: the same statistics on a real log and on it.

What it measures, side by side, with ONE function per statistic applied to both logs:

* REES46 head (``../shared/data/rees46-2019oct-head``, 17 434 events of 2019-10-01 00:00-02:50):
  conversions are carts + purchases (one per distinct (user, time, item), as
  ``pipelines.sequences.conversions`` counts them); the log has no subject item, so it is derived
  as the user's last view of ANOTHER item in the same session within 60 min before the
  conversion (the last view of any item is the converted item itself 99 % of the time, because
  the shop logs a view of the product right before a cart or purchase).
* The realistic world of ``pipelines/synthetic.py`` at its defaults (``--users`` users, the
  pure-pandas generator ``simulate_users``, no malformed rows); its subject is the logged
  ``subject_item_id``; a "session" is the user's events in one hour slot (each session of the
  world has its own slot).
* Long-term interests need long histories, which neither of those has: they are measured on
  MovieLens 1M (``ml-1m-u2999``, genres as categories) and on a long-history variant of the
  world (the same knobs, ``p_repeat`` 0.98: ~50 conversions per user).

Bars (``bars`` in the JSON: name, value, target, met) say whether the world is where its
docstring says it is; ``result.stats`` lists every statistic with both values and what it means.
Scale-dependent statistics (items seen per category, unseen test items) depend on the number of
users: run with the size you mean to use.

Usage: python benchmarks/calibrate_synthetic.py [--users 100000] [--seed 0] [--data-root DIR]
Prints the table and writes benchmarks/results/calibration.json. Pandas only, no Spark.
Data: REES46 (Kaggle mkechinov/ecommerce-behavior-data-from-multi-category-store, rees46.com) and
GroupLens MovieLens (Harper and Konstan, ACM TiiS 2015), read in place, never copied.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
from benchlib import machine  # noqa: E402
import ctt_contracts as C  # noqa: E402
from pipelines.synthetic import (SESSION_SLOT_SECONDS, SyntheticConfig, build_catalog,  # noqa: E402
                                 simulate_users)

DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "calibration.json"
SUBJECT_WINDOW_S = 3600
VAL_Q, TEST_Q = 0.8, 0.9  # the build's default split: val_frac = test_frac = 0.1
INTEREST_K, INTEREST_MIN_LEN = 3, 40
LEAF, PARENT, SESSION = "leaf", "parent", "session"


# --------------------------------------------------------------------------------------
# Logs in one shape: events (user_id, item_id, event_type view|conversion, ts seconds, session,
# subject_item_id) and items (item_id, leaf, parent)
# --------------------------------------------------------------------------------------
def load_rees46(folder: Path) -> Tuple[pd.DataFrame, pd.DataFrame]:
    raw = pd.read_csv(folder / "events.csv")
    ts = pd.to_datetime(raw["event_time"], format="%Y-%m-%d %H:%M:%S UTC", utc=True)
    kind = raw["event_type"].map({"view": C.EVENT_VIEW, "cart": C.EVENT_CONVERSION,
                                  "purchase": C.EVENT_CONVERSION})
    if kind.isna().any():
        raise ValueError(f"unexpected REES46 event types: {set(raw['event_type'][kind.isna()])}")
    events = pd.DataFrame({
        C.USER_ID: raw["user_id"].astype(np.int64), C.ITEM_ID: raw["product_id"].astype(np.int64),
        C.EVENT_TYPE: kind, "ts": ts.astype("int64") // 10**9, SESSION: raw["user_session"],
        C.SUBJECT_ITEM_ID: pd.array([pd.NA] * len(raw), dtype="Int64"),
    })
    first = raw.drop_duplicates("product_id")
    mid = first["category_code"].str.split(".").str[:2].str.join(".")
    items = pd.DataFrame({C.ITEM_ID: first["product_id"].astype(np.int64).to_numpy(),
                          LEAF: first["category_id"].astype(np.int64).to_numpy(),
                          PARENT: mid.to_numpy()})
    return _dedupe_conversions(events), items


def generated_log(cfg: SyntheticConfig) -> Tuple[pd.DataFrame, pd.DataFrame, Any, float]:
    """(events, items, catalogue, generation seconds) of a clean world (no malformed rows)."""
    cfg = replace(cfg, malformed_frac=0.0)
    started = time.perf_counter()
    cat = build_catalog(cfg)
    _, ev = simulate_users(cfg, cat, np.arange(cfg.n_users))
    seconds = time.perf_counter() - started
    ts = ev[C.EVENT_TS].astype("int64") // 10**9
    events = pd.DataFrame({
        C.USER_ID: ev[C.USER_ID], C.ITEM_ID: ev[C.ITEM_ID], C.EVENT_TYPE: ev[C.EVENT_TYPE],
        "ts": ts, SESSION: ts // SESSION_SLOT_SECONDS,
        C.SUBJECT_ITEM_ID: pd.array(ev[C.SUBJECT_ITEM_ID], dtype="Int64"),
    })
    cats = cat.category_matrix()
    items = pd.DataFrame({C.ITEM_ID: np.arange(cat.n_items), LEAF: cats[:, 0],
                          PARENT: cats[:, 1] if cats.shape[1] > 1 else cats[:, 0]})
    return _dedupe_conversions(events), items, cat, seconds


def _dedupe_conversions(events: pd.DataFrame) -> pd.DataFrame:
    """One conversion per (user, time, item), as the build counts them; views untouched."""
    conv = events[C.EVENT_TYPE] == C.EVENT_CONVERSION
    dup = events[conv].duplicated([C.USER_ID, "ts", C.ITEM_ID])
    keep = ~conv.copy()
    keep[conv] = ~dup.to_numpy()
    out = events[keep].copy()
    out["row"] = np.arange(len(out))  # log order breaks timestamp ties
    return out.sort_values(["ts", "row"], kind="stable").reset_index(drop=True)


def conversions(events: pd.DataFrame) -> pd.DataFrame:
    return events[events[C.EVENT_TYPE] == C.EVENT_CONVERSION]


# --------------------------------------------------------------------------------------
# Statistics (each one function, used on both logs)
# --------------------------------------------------------------------------------------
def derive_subjects(events: pd.DataFrame, other: bool = True) -> pd.DataFrame:
    """Per conversion: the last view (of another item when `other`) in the same session within
    SUBJECT_WINDOW_S before it, or <NA>. Columns: item_id (converted), subject_item_id.

    One pass in (user, session, log order), keeping per session the last viewed item and the
    last view of an item different from it (the last view of "another item" is one of the two).
    """
    ev = events.sort_values([C.USER_ID, SESSION, "row"], kind="stable")
    users, sessions = ev[C.USER_ID].to_numpy(), ev[SESSION].to_numpy()
    kinds = (ev[C.EVENT_TYPE] == C.EVENT_CONVERSION).to_numpy()
    items, times = ev[C.ITEM_ID].to_numpy().tolist(), ev["ts"].to_numpy().tolist()
    new_session = np.ones(len(ev), dtype=bool)
    new_session[1:] = (users[1:] != users[:-1]) | (sessions[1:] != sessions[:-1])
    out_item, out_subject = [], []
    last = prev = None  # (item, ts)
    for i, (fresh, is_conv) in enumerate(zip(new_session.tolist(), kinds.tolist())):
        if fresh:
            last = prev = None
        item, ts = items[i], times[i]
        if not is_conv:
            if last is not None and last[0] != item:
                prev = last
            last = (item, ts)
            continue
        cand = last
        if other and cand is not None and cand[0] == item:
            cand = prev
        ok = cand is not None and cand[1] >= ts - SUBJECT_WINDOW_S
        out_item.append(item)
        out_subject.append(cand[0] if ok else None)
    return pd.DataFrame({C.ITEM_ID: np.asarray(out_item, dtype=np.int64),
                         C.SUBJECT_ITEM_ID: pd.array(out_subject, dtype="Int64")})


def alignment(pairs: pd.DataFrame, items: pd.DataFrame) -> Tuple[float, int]:
    """P(subject's leaf = converted item's leaf) over pairs with a subject, and their count."""
    leaf = items.set_index(C.ITEM_ID)[LEAF]
    p = pairs.dropna(subset=[C.SUBJECT_ITEM_ID])
    same = leaf.reindex(p[C.ITEM_ID]).to_numpy() == leaf.reindex(
        p[C.SUBJECT_ITEM_ID].astype("int64")).to_numpy()
    return float(same.mean()) if len(p) else float("nan"), int(len(p))


def category_sizes(events: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """Distinct items per leaf category among the items the log shows (REES46 shows no others)."""
    seen = items[items[C.ITEM_ID].isin(events[C.ITEM_ID].unique())]
    return seen.groupby(LEAF).size().to_numpy()


def conversions_per_user(events: pd.DataFrame) -> np.ndarray:
    return conversions(events).groupby(C.USER_ID).size().to_numpy()


def views_per_session_before_conversion(events: pd.DataFrame) -> float:
    """Mean views in a converting session before its first conversion."""
    conv = conversions(events).groupby([C.USER_ID, SESSION])["row"].min()
    views = events[events[C.EVENT_TYPE] == C.EVENT_VIEW].join(conv.rename("first_conv"),
                                                               on=[C.USER_ID, SESSION],
                                                               how="inner")
    counts = (views["row"] < views["first_conv"]).groupby([views[C.USER_ID], views[SESSION]]).sum()
    return float(counts.reindex(conv.index, fill_value=0).mean())


def unseen_test_share(events: pd.DataFrame) -> Dict[str, float]:
    """The build's time split on conversion times (train < q0.8 <= val < q0.9 <= test): share of
    test conversions, and of test examples (an earlier conversion of the user exists), whose item
    was never converted in train."""
    conv = conversions(events)
    q_val, q_test = np.quantile(conv["ts"], [VAL_Q, TEST_Q])
    train = set(conv.loc[conv["ts"] < q_val, C.ITEM_ID])
    test = conv[conv["ts"] >= q_test]
    has_history = conv.groupby(C.USER_ID).cumcount().reindex(test.index) > 0
    unseen = ~test[C.ITEM_ID].isin(train)
    return {"conversions": float(unseen.mean()), "n_conversions": int(len(test)),
            "examples": float(unseen[has_history].mean()) if has_history.any() else float("nan"),
            "n_examples": int(has_history.sum()), "n_train": int((conv["ts"] < q_val).sum())}


def popularity_slope(events: pd.DataFrame, n_views: Optional[int] = None,
                     top: int = 1000) -> float:
    """Log-log slope of item view counts against rank (ranks 1..top) over a contiguous block of
    `n_views` views in the middle of the log (the whole log when None): a time slice of the same
    size as the real head, so the sampling floor of rare items weighs the same on both sides."""
    views = events[events[C.EVENT_TYPE] == C.EVENT_VIEW].sort_values(["ts", "row"])
    if n_views is not None and n_views < len(views):
        mid = (len(views) - n_views) // 2
        views = views.iloc[mid:mid + n_views]
    counts = np.sort(views[C.ITEM_ID].value_counts().to_numpy())[::-1][:top]
    ranks = np.arange(1, len(counts) + 1)
    return float(np.polyfit(np.log(ranks), np.log(counts), 1)[0])


def repeat_leaf_share(events: pd.DataFrame, items: pd.DataFrame) -> Dict[str, float]:
    """Over a user's later conversions of an item not converted before: the share whose leaf is
    the leaf of an earlier conversion of theirs, split by whether an earlier conversion was in the
    same session (a basket) or only in earlier sessions (a return)."""
    leaf = items.set_index(C.ITEM_ID)[LEAF]
    conv = conversions(events).assign(leaf=lambda d: leaf.reindex(d[C.ITEM_ID]).to_numpy())
    same, cross = [], []
    for _, g in conv.groupby(C.USER_ID, sort=False):
        seen_items, seen_leaves, sessions = set(), set(), set()
        for item, lf, ses in zip(g[C.ITEM_ID].tolist(), g["leaf"].tolist(), g[SESSION].tolist()):
            if seen_items and item not in seen_items:
                (same if ses in sessions else cross).append(lf in seen_leaves)
            seen_items.add(item)
            seen_leaves.add(lf)
            sessions.add(ses)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"repeat_leaf_same_session": mean(same), "repeat_leaf_same_session_n": len(same),
            "repeat_leaf_later_session": mean(cross), "repeat_leaf_later_session_n": len(cross)}


def interest_kappa(user: np.ndarray, category: np.ndarray, k: int = INTEREST_K,
                   min_len: int = INTEREST_MIN_LEN) -> Tuple[float, int]:
    """Chance-corrected return to one's categories, for time-ordered (user, category) rows.

    Per user with >= min_len rows: S = the k categories with the largest excess share over the
    global one in the first half; hit = the second half's share in S, chance = S's global share.
    kappa = (mean hit - mean chance) / (1 - mean chance): 0 when users do not come back to their
    categories more than anyone else, 1 when they never leave them. In the generated world
    (users with 2-3 interest leaves, k = 3) it estimates p_longterm."""
    codes, cats = pd.factorize(category)
    glob = np.bincount(codes, minlength=len(cats)) / len(codes)
    hits, chances = [], []
    frame = pd.DataFrame({"u": user, "c": codes})
    for _, g in frame.groupby("u", sort=False):
        c = g["c"].to_numpy()
        if len(c) < min_len:
            continue
        a, b = c[:len(c) // 2], c[len(c) // 2:]
        q1 = np.bincount(a, minlength=len(cats)) / len(a)
        s = np.argsort(-(q1 - glob), kind="stable")[:k]
        hits.append(np.isin(b, s).mean())
        chances.append(glob[s].sum())
    h, ch = float(np.mean(hits)), float(np.mean(chances))
    return (h - ch) / (1.0 - ch), len(hits)


def movielens_genre_rows(folder: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(user, first listed genre) per rating, ordered by (user, time, item)."""
    r = pd.read_csv(folder / "ratings.dat", sep="::", engine="python",
                    names=["u", "i", "r", "t"])
    m = pd.read_csv(folder / "movies.dat", sep="::", engine="python", names=["i", "title", "g"],
                    encoding="latin-1")
    r = r.merge(m[["i", "g"]], on="i").sort_values(["u", "t", "i"], kind="stable")
    return r["u"].to_numpy(), r["g"].str.split("|").str[0].to_numpy()


def generated_interest_kappa(cfg: SyntheticConfig, n_users: int = 1000) -> Tuple[float, int]:
    """interest_kappa on the conversions' leaves of a long-history variant of `cfg`."""
    long_cfg = replace(cfg, n_users=n_users, p_repeat=0.98, malformed_frac=0.0)
    events, items, _, _ = generated_log(long_cfg)
    conv = conversions(events).sort_values([C.USER_ID, "ts", "row"], kind="stable")
    leaf = items.set_index(C.ITEM_ID)[LEAF].reindex(conv[C.ITEM_ID]).to_numpy()
    return interest_kappa(conv[C.USER_ID].to_numpy(), leaf)


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
def _bar(name: str, value: float, target: Any, met: bool, how: str) -> Dict[str, Any]:
    return {"name": name, "value": round(float(value), 4), "target": target, "met": bool(met),
            "how": how}


def _within(value: float, target: float, tol: float) -> bool:
    return bool(np.isfinite(value) and abs(value - target) <= tol)


def measure(events: pd.DataFrame, items: pd.DataFrame, logged_subjects: bool,
            slope_views: Optional[int] = None) -> Dict[str, Any]:
    """Every statistic of one log (see `run` for the meaning of each)."""
    conv = conversions(events)
    last_any = derive_subjects(events, other=False)
    last_other = derive_subjects(events, other=True)
    sizes = category_sizes(events, items)
    per_user = conversions_per_user(events)
    n_views = int((events[C.EVENT_TYPE] == C.EVENT_VIEW).sum())
    out: Dict[str, Any] = {
        "events": int(len(events)), "users": int(events[C.USER_ID].nunique()),
        "conversions": int(len(conv)), "items_in_log": int(events[C.ITEM_ID].nunique()),
        "leaf_categories_in_log": int(len(sizes)),
        "derived_last_view_is_converted_item": float(
            (last_any[C.SUBJECT_ITEM_ID] == last_any[C.ITEM_ID]).fillna(False).mean()),
        "derived_other_view_share": float(last_other[C.SUBJECT_ITEM_ID].notna().mean()),
        "derived_other_view_alignment": alignment(last_other, items)[0],
        "category_size_median": float(np.median(sizes)),
        "category_size_p90": float(np.quantile(sizes, 0.9)),
        "category_size_max": int(sizes.max()),
        "single_item_category_share": float((sizes == 1).mean()),
        "views_per_conversion": n_views / max(1, len(conv)),
        "views_before_conversion_in_session": views_per_session_before_conversion(events),
        "one_conversion_user_share": float((per_user == 1).mean()),
        "at_most_two_conversions_user_share": float((per_user <= 2).mean()),
        "conversions_per_converting_user": float(per_user.mean()),
        "popularity_slope_views": popularity_slope(events, slope_views),
        "converted_items_converted_once_share": float(
            (conv[C.ITEM_ID].value_counts() == 1).mean()),
    }
    out.update(repeat_leaf_share(events, items))
    unseen = unseen_test_share(events)
    out.update({f"unseen_test_{k}": v for k, v in unseen.items()})
    if logged_subjects:
        pairs = conv[[C.ITEM_ID, C.SUBJECT_ITEM_ID]]
        out["logged_alignment"], _ = alignment(pairs, items)
        out["logged_subject_is_converted_item"] = float(
            (pairs[C.SUBJECT_ITEM_ID] == pairs[C.ITEM_ID]).fillna(False).mean())
    return out


def _close(name: str, value: float, target: float, tol: float, how: str, display: Any = None,
           relative: bool = False) -> Dict[str, Any]:
    """A bar met when `value` is within `tol` of `target` (``relative``: `tol` x `target`);
    `display`: the target as the JSON shows it (default `target`)."""
    met = _within(value, target, tol * target if relative else tol)
    return _bar(name, value, target if display is None else display, met, how)


def bars_for(cfg: SyntheticConfig, real: Dict[str, Any], gen: Dict[str, Any],
             kappa_real: float, kappa_gen: float) -> List[Dict[str, Any]]:
    def vs_rees46(key: str, tol: float, how: str, relative: bool = False) -> Dict[str, Any]:
        return _close(key, gen[key], real[key], tol, how, relative=relative)

    return [
        _close("alignment_vs_knob", gen["logged_alignment"], cfg.p_aligned, 0.05,
               "P(logged subject's leaf = converted item's leaf), within 0.05 of p_aligned"),
        _close("subject_is_converted_item_vs_knob", gen["logged_subject_is_converted_item"],
               cfg.p_subject_is_label, 0.05,
               "P(logged subject = converted item), within 0.05 of p_subject_is_label"),
        _bar("leaf_categories", gen["leaf_categories_in_log"], ">= 1000",
             gen["leaf_categories_in_log"] >= 1000, "leaf categories seen in the log: thousands"),
        vs_rees46("category_size_median", 0.3,
                  "items per leaf category (items in the log), within 30 % of REES46",
                  relative=True),
        vs_rees46("category_size_p90", 0.3, "p90 of items per leaf category, within 30 % of REES46",
                  relative=True),
        vs_rees46("one_conversion_user_share", 0.05,
                  "converting users with exactly one conversion, within 0.05 of REES46"),
        vs_rees46("at_most_two_conversions_user_share", 0.05,
                  "converting users with one or two conversions, within 0.05 of REES46"),
        _close("views_per_conversion", gen["views_per_conversion"], cfg.views_per_conversion, 0.1,
               "views per conversion within 10 % of the knob (REES46's ratio scaled down)",
               relative=True),
        vs_rees46("views_before_conversion_in_session", 0.5,
                  "views in a converting session before the conversion, within 0.5 of REES46"),
        _bar("unseen_test_conversions", gen["unseen_test_conversions"], ">= 0.5",
             gen["unseen_test_conversions"] >= 0.5,
             "test conversions on items never converted in train: most of them"),
        vs_rees46("popularity_slope_views", 0.15,
                  "log-log slope of item views over ranks 1-1000 in a time slice with REES46's "
                  "number of views, within 0.15 of REES46"),
        _close("interest_kappa", kappa_gen, kappa_real, 0.05,
               "chance-corrected return to one's top-3 categories (long histories), within 0.05 "
               "of MovieLens 1M genres", display=round(kappa_real, 4)),
    ]


def run(args: argparse.Namespace) -> Tuple[SyntheticConfig, Dict[str, Any], Dict[str, Any],
                                           Dict[str, Any]]:
    """(world config, REES46 statistics, generated statistics, interest kappas) of one run."""
    data = args.data_root
    cfg = SyntheticConfig(n_users=args.users, seed=args.seed)
    real_events, real_items = load_rees46(data / "rees46-2019oct-head")
    real = measure(real_events, real_items, logged_subjects=False)
    gen_events, gen_items, cat, gen_seconds = generated_log(cfg)
    real_views = int((real_events[C.EVENT_TYPE] == C.EVENT_VIEW).sum())
    gen = measure(gen_events, gen_items, logged_subjects=True, slope_views=real_views)
    gen["catalogue_items"] = int(cat.n_items)
    gen["catalogue_leaf_categories"] = int(cat.n_leaves)
    gen["category_ids_all_levels"] = int(cat.n_category_ids)
    gen["never_converted_item_share"] = float(
        1.0 - conversions(gen_events)[C.ITEM_ID].nunique() / cat.n_items)
    gen["generate_seconds_pandas"] = round(gen_seconds, 2)
    kappa_real, n_real = interest_kappa(*movielens_genre_rows(data / "ml-1m-u2999"))
    kappa_gen, n_gen = generated_interest_kappa(cfg)
    interest = {"movielens_1m_genres": kappa_real, "movielens_users": n_real,
                "generated_long_history": kappa_gen, "generated_users": n_gen}
    return cfg, real, gen, interest


def report(measurement: benchlib.Measurement, cfg: SyntheticConfig, real: Dict[str, Any],
           gen: Dict[str, Any], interest: Dict[str, Any]) -> Dict[str, Any]:
    """The results JSON: the bars, and under ``result`` the world's config and every statistic
    with both values (interest kappa on MovieLens and on the long-history world)."""
    stats = [{"name": k, "rees46": real.get(k), "generated": gen.get(k)}
             for k in dict.fromkeys([*real, *gen])]
    stats.append({"name": "interest_kappa", **interest})
    bars = bars_for(cfg, real, gen, interest["movielens_1m_genres"], interest["generated_long_history"])
    return measurement.envelope(machine(["numpy", "pandas"]), bars,
                                {"config": cfg.to_dict(), "stats": stats})


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, np.floating):
        return float(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def print_table(report: Dict[str, Any]) -> None:
    print(f"{'statistic':45s} {'REES46 head':>14s} {'generated':>14s}")
    for s in report["result"]["stats"]:
        if "rees46" in s:
            print(f"{s['name']:45s} {_fmt(s['rees46']):>14s} {_fmt(s['generated']):>14s}")
        else:
            print(f"{s['name']:45s} {'ML-1M ' + _fmt(s['movielens_1m_genres']):>14s} "
                  f"{_fmt(s['generated_long_history']):>14s}")
    print(f"\n{'bar':40s} {'value':>10s} {'target':>10s}  met")
    for b in report["bars"]:
        print(f"{b['name']:40s} {_fmt(b['value']):>10s} {_fmt(b['target']):>10s}  {b['met']}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000, help="users of the generated world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    measurement = benchlib.Measurement("calibrate_synthetic")
    out = report(measurement, *run(args))
    print_table(out)
    benchlib.write_json(args.out, out, default=_json_default)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
