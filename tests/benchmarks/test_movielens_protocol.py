"""benchmarks/movielens.py: both libraries get the identical split, RecTools' side stops by the
same rule and the same metric as ours, and the report (bars, README table) follows the runs."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

import benchlib
import movielens as bench
import movielens_rectools as rt
import readme
from models import leave_one_out as loo
import ctt_contracts as C


@pytest.fixture
def imported():
    """A tiny imported data set: ties within a second, one user with too few events."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(1, 13):
        for j, item in enumerate(rng.permutation(20)[: int(rng.integers(3, 9))]):
            rows.append((u, int(item), 1_000 + 60 * (j // 2)))  # pairs of events share a second
    rows += [(99, 1, 5), (99, 2, 6)]  # dropped: two events
    events = pd.DataFrame(rows, columns=[C.USER_ID, C.ITEM_ID, C.EVENT_TS])
    item_ids = np.sort(events[C.ITEM_ID].unique())
    items = pd.DataFrame({C.ITEM_ID: item_ids, C.CATEGORY_IDS: [[int(i) % 3] for i in item_ids],
                          C.CATEGORY_WEIGHTS: [[1.0]] * len(item_ids), C.ADVERTISER_ID: 0})
    users = pd.DataFrame({C.USER_ID: events[C.USER_ID].unique(), C.AGE_BUCKET: 1, C.COUNTRY: "unknown",
                          C.GENDER: "m"})
    return bench.Imported(events.sample(frac=1.0, random_state=0), items, users, {"events": len(events)})


def test_exchange_files_hold_the_split_our_data_module_trains_on(imported, tmp_path):
    inputs = bench.prepare("tiny", imported, tmp_path / "tiny")
    dm = loo.LeaveOneOutDataModule(str(inputs.events), str(inputs.items), str(inputs.users), max_len=50)
    dm.setup("fit")
    cols = [C.USER_ID, C.ITEM_ID, loo.TS_MS]
    train_csv = pd.read_csv(inputs.folder / "train.csv")
    test_csv = pd.read_csv(inputs.folder / "test_history.csv")
    assert list(train_csv.columns) == cols
    assert train_csv.values.tolist() == dm.split.train[cols].values.tolist()
    both = pd.concat([dm.split.train, dm.split.val])[cols].sort_values([C.USER_ID, loo.TS_MS])
    assert test_csv.values.tolist() == both.values.tolist()
    for frame in (train_csv, test_csv):  # RecTools sorts by time: the order must be strict
        assert (frame.groupby(C.USER_ID)[loo.TS_MS].diff().dropna() > 0).all()
    # what our model reads as the validation history is the train.csv sequence of each user
    val_hist = dm.splits[C.SPLIT_VAL][C.ITEM_IDS]
    for i, user in enumerate(dm.split.users):
        seq = train_csv.loc[train_csv[C.USER_ID] == user, C.ITEM_ID].tolist()
        assert val_hist[i][val_hist[i] >= 0].tolist() == seq
    request = bench.rectools_request(inputs.split, bench.MODELS["sasrec"], 1e-3, 0, 3)
    assert request["users"] == dm.split.users.tolist()
    assert request["val_targets"] == loo.targets(dm.split, C.SPLIT_VAL).tolist()
    assert request["model"]["session_max_len"] == bench.SEQ_CAP and request["model"]["lr"] == 1e-3
    assert loo.split_fingerprint(dm.split) == loo.split_fingerprint(inputs.split)
    assert 99 not in request["users"] and dm.split.users_dropped == 1
    ours = bench.ours_args(inputs, bench.MODELS["ours_ids"], 2e-3, 1, 7)
    assert ours[ours.index("--data.events_path") + 1] == str(inputs.events)
    assert ours[ours.index("--model.lr") + 1] == "0.002" and ours[ours.index("--seed_everything") + 1] == "1"


def test_rectools_side_metric_is_the_shared_metric():
    rng = np.random.default_rng(0)
    lists = [rng.permutation(40)[: int(rng.integers(0, 30))].tolist() for _ in range(50)]
    targets = rng.integers(0, 40, 50).tolist()
    want = loo.hit_ndcg_at_k(lists, targets)
    got = rt.list_hr_ndcg(lists, targets, loo.K)
    assert got["hr"] == pytest.approx(want[loo.HR]) and got["ndcg"] == pytest.approx(want[loo.NDCG])


def test_rectools_patience_rule_is_lightnings_early_stopping():
    from pytorch_lightning.callbacks import EarlyStopping

    curve = [0.1, 0.3, 0.3, 0.2, 0.25, 0.29, 0.3, 0.31]
    stop = rt.Patience(5)
    ours = EarlyStopping(monitor="m", mode="max", patience=5, min_delta=0.0)
    stopped_at = lightning_at = None
    for epoch, value in enumerate(curve, start=1):
        if stopped_at is None:
            stop.update(value)
            stopped_at = epoch if stop.should_stop else None
        should, _ = ours._evaluate_stopping_criteria(torch.tensor(value))
        if should and lightning_at is None:
            lightning_at = epoch
    assert stop.best_epoch == 2  # the later 0.3 is no strict improvement
    assert stopped_at == 7 == lightning_at


def sasrec_result(val_ndcg_at_best: float):
    """What movielens_rectools.py writes, for 2 users and 3 epochs (best: 2)."""
    epochs = [{"epoch": e, "val_hr": 0.5, "val_ndcg": v, "train_wall_s": 2.0, "train_cpu_s": 3.0,
               "rank_wall_s": 0.5, "rank_cpu_s": 0.25, "loop_wall_s": 3.0 * e, "loop_cpu_s": 4.0 * e}
              for e, v in ((1, 0.1), (2, val_ndcg_at_best), (3, 0.2))]
    return {"epochs": epochs, "best_epoch": 2, "stopped_early": False, "rectools": "x", "torch": "y",
            "val": [[5, 6], [7, 8, 9]], "test": [[1, 2], [4, 3]]}


def test_sasrec_record_scores_lists_and_checks_the_stopping_metric(imported):
    split = loo.leave_one_out(pd.DataFrame({C.USER_ID: [1, 1, 1, 2, 2, 2], C.ITEM_ID: [1, 5, 3, 2, 8, 4],
                                            C.EVENT_TS: [1, 2, 3, 1, 2, 3]}))
    # validation targets 5 (rank 0 for user 1) and 8 (rank 1 for user 2)
    ndcg = (1.0 + 1.0 / math.log2(3)) / 2
    request = {"model": {"lr": 1e-3}}
    record = bench.sasrec_record(split, request, sasrec_result(ndcg))
    assert record["val"] == {loo.HR: 1.0, loo.NDCG: pytest.approx(ndcg)}
    assert record[loo.HR] == 0.5  # test targets 3 and 4: user 1 misses, user 2 at rank 1
    assert record["wall_to_best_s"] == pytest.approx(5.0) and record["cpu_to_best_s"] == pytest.approx(6.5)
    assert record["loop_wall_to_best_s"] == 6.0 and record["epochs_run"] == 3
    with pytest.raises(RuntimeError, match="disagrees"):
        bench.sasrec_record(split, request, sasrec_result(ndcg + 0.01))


def run(lr, seed, hr, ndcg, val_ndcg, wall):
    return {"lr": lr, "seed": seed, loo.HR: hr, loo.NDCG: ndcg, "val": {loo.HR: 0.0, loo.NDCG: val_ndcg},
            "wall_to_best_s": wall, "cpu_to_best_s": 2 * wall, "train_wall_s": wall + 60.0,
            "epochs_run": 10, "best_epoch": 5, "history_violations": 0}


def test_lr_choice_summary_bars_and_readme_table():
    grid = {bench.lr_key(lr): run(lr, 0, 0.1, 0.05, v, 10.0)
            for lr, v in ((5e-4, 0.2), (1e-3, 0.3), (2e-3, 0.3))}
    assert bench.chosen_lr(grid) == 1e-3  # tie on validation: the smaller rate
    with pytest.raises(ValueError, match="grid"):
        bench.chosen_lr({})
    ours = bench.summarise([run(1e-3, s, hr, 0.1, 0.3, w)
                            for s, hr, w in ((0, 0.2, 10), (1, 0.3, 20), (2, 0.4, 30))])
    assert ours[loo.HR + "_mean"] == pytest.approx(0.3) and ours[loo.HR + "_std"] == pytest.approx(0.1)
    base = bench.summarise([run(2e-3, s, 0.25, 0.2, 0.3, 80.0) for s in range(3)])
    report = {"datasets": {"ml-1m-u2999": {"models": {
        "ours_ids": {"label": "ours", "summary": ours}, "sasrec": {"label": "SASRec", "summary": base}}}}}
    got = {b["name"]: b for b in bench.bars(report)}
    assert set(got) == {name for name, *_ in bench.BARS} | {bench.BUDGET_BAR}
    assert got[bench.BUDGET_BAR]["value"] is None and got[bench.BUDGET_BAR]["met"] is None  # no runs
    assert got["ml-1m-u2999_hr10_ours_vs_sasrec"]["value"] == pytest.approx(0.3 / 0.25)
    assert got["ml-1m-u2999_hr10_ours_vs_sasrec"]["met"] is True
    assert got["ml-1m-u2999_ndcg10_ours_vs_sasrec"]["met"] is False  # 0.1 / 0.2
    assert got["ml-1m-u2999_time_to_best_ours_vs_sasrec"]["value"] == pytest.approx(20 / 80)
    assert got["ml-1m-u2999_time_to_best_ours_vs_sasrec"]["met"] is True
    assert got["ml-100k_hr10_ours_vs_sasrec"]["value"] is None  # not run
    envelope = {"result": report, "bars": bench.bars(report)}
    table = "\n".join(readme.render_movielens({"movielens.json": envelope})
                      + readme.render_bars({"movielens.json": envelope}))
    assert "| ml-1m-u2999 | ours | 0.001 | 0.3000 ± 0.1000 |" in table
    assert "| `ml-100k_hr10_ours_vs_sasrec` | - | 1 | not measured | movielens.json |" in table
    assert "| `ml-1m-u2999_time_to_best_ours_vs_sasrec` | 0.25 | 0.5 | yes | movielens.json |" in table


def test_budget_bar_sums_every_runs_training_time_over_models_and_data_sets():
    grid = {bench.lr_key(lr): run(lr, 0, 0.1, 0.1, 0.1, 3000.0) for lr in (1e-3, 2e-3)}  # 3,060 s each
    seed1 = {"1": run(1e-3, 1, 0.1, 0.1, 0.1, 1140.0)}
    side_info = {"0.001": run(1e-3, 0, 0.1, 0.1, 0.1, 600.0)}
    report = {"datasets": {"ml-100k": {"models": {"sasrec": {"grid": grid, "seeds": seed1}}},
                           "ml-1m-u2999": {"models": {"ours_side_info": {"grid": side_info}}}}}
    bar = bench.budget_bar(report)
    assert bar["value"] == pytest.approx((2 * 3060 + 1200 + 660) / 60)  # 133 min
    assert bar["met"] is True
    report["datasets"]["ml-1m-u2999"]["models"]["ours_side_info"]["seeds"] = {
        "1": run(1e-3, 1, 0.1, 0.1, 0.1, 1020.0)}  # + 18 min: 151 > 150
    assert bench.budget_bar(report)["met"] is False


def test_report_merges_stages_and_quick_never_overwrites_the_results(tmp_path, measurement):
    path = tmp_path / "r.json"
    result = bench.load_result(path)
    grid = {"0.001": run(1e-3, 0, 0.1, 0.1, 0.1, 1)}
    result["datasets"]["ml-100k"] = {"models": {"ours_ids": {"grid": grid}}}
    written = bench.save_report(measurement, result, path)
    assert json.loads(path.read_text()) == written
    assert list(written) == list(benchlib.ENVELOPE_KEYS) and written["result"] == result
    again = bench.load_result(path)
    assert again["datasets"]["ml-100k"]["models"]["ours_ids"]["grid"]["0.001"][loo.HR] == 0.1
    assert len(written["bars"]) == len(bench.BARS) + 1
    assert written["bars"][-1] == {"name": bench.BUDGET_BAR, "value": 61 / 60, "target": 150.0, "met": True}
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(bench.DEFAULT_OUT)])


def test_source_commit_is_dirty_for_code_changes_not_for_the_results_it_writes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)
    results = tmp_path / bench.DEFAULT_OUT.relative_to(bench.ROOT)
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = bench.source_commit(tmp_path)
    assert head is not None and not head.endswith("+dirty")
    results.write_text('{"runs": 1}')  # the benchmark rewrote its own results
    assert bench.source_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bench.source_commit(tmp_path) == head + "+dirty"
    assert bench.source_commit(tmp_path / "not-a-repo") is None
