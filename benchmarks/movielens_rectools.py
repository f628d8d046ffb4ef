"""RecTools SASRec side of the MovieLens benchmark; runs INSIDE the separate RecTools virtualenv.

Why a separate process: RecTools pins numpy<2 and pytorch-lightning<=2.5.2, which conflict with
the project's environment, so ``benchmarks/movielens.py`` builds a virtualenv from
``benchmarks/requirements-rectools.txt`` and runs this script there. The two sides exchange
plain files only, so both models see byte-identical splits:

inputs (in ``--workdir``, written by movielens.py)
  train.csv         user_id,item_id,ts_ms   every train interaction (all but each user's last two)
  test_history.csv  user_id,item_id,ts_ms   train + the validation item: the history at test time
  request.json      {"users": [...], "val_targets": [...], "k": 10, "top_n": 100, "seed": S,
                     "threads": T, "max_epochs": E, "patience": P, "model": {SASRec parameters}}
output
  result.json       {"epochs": [{"epoch", "val_hr", "val_ndcg", "train_wall_s", "train_cpu_s",
                                 "rank_wall_s", "rank_cpu_s", "loop_wall_s", "loop_cpu_s"}, ...],
                     "best_epoch": e, "stopped_early": bool,
                     "val": [[item, ...], ...], "test": [[item, ...], ...],   (best epoch, top_n)
                     "torch": ..., "rectools": ...}

``ts_ms`` is strictly increasing within a user (movielens.py breaks timestamp ties), so the
order RecTools sorts by is exactly the order our model sees.

Training and early stopping (the rule our side gets from Lightning's EarlyStopping): one epoch
at a time with ``fit_partial`` (RecTools keeps the model and its Adam state between calls), then
the validation users are ranked (history = train, ``filter_viewed`` drops it) and NDCG@10 of the
validation targets computed; training stops when it has not improved (strictly) for
``patience`` epochs or after ``max_epochs``. The best epoch's weights are kept in memory and
rank validation and test at the end. movielens.py recomputes HR/NDCG of the returned lists with
the one function it applies to every model and checks it agrees with the figure that drove the
stopping here.

Timing: ``train_*`` is Lightning's epoch (first batch to epoch end), ``rank_*`` the validation
ranking; ``loop_*`` is cumulative from the first call and also holds ``fit_partial``'s per-call
dataset preparation, a cost of stepping RecTools one epoch at a time rather than of SASRec, so
movielens.py reports time to the best epoch as the sum of train + rank (the lower figure).

This file imports only the RecTools environment's packages (never the project's).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch


def list_hr_ndcg(top_lists: Sequence[Sequence[int]], target_items: Sequence[int], k: int) -> Dict[str, float]:
    """HR@k / NDCG@k of ranked lists, one target per user (empty list = miss); the same
    definition as ``models.leave_one_out.hit_ndcg_at_k``, which movielens.py checks it against."""
    hits, gains = 0, 0.0
    for top, target in zip(top_lists, target_items):
        head = list(top[:k])
        if target in head:
            hits += 1
            gains += 1.0 / math.log2(head.index(target) + 2)
    n = len(target_items)
    return {"hr": hits / n, "ndcg": gains / n}


class Patience:
    """Early stopping on a metric to maximise: an epoch improves iff it beats the best so far
    strictly; stop once ``patience`` epochs in a row did not (Lightning's EarlyStopping with
    mode=max, min_delta=0)."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = 0
        self.epoch = 0

    def update(self, value: float) -> bool:
        """Record the next epoch's value; True if it is the new best."""
        self.epoch += 1
        if value > self.best:
            self.best, self.best_epoch = value, self.epoch
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.epoch - self.best_epoch >= self.patience


class EpochTimer(pl.Callback):
    """Wall and CPU seconds of every training epoch (first batch to epoch end)."""

    def __init__(self) -> None:
        self.wall: List[float] = []
        self.cpu: List[float] = []
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def read_interactions(path: Path) -> pd.DataFrame:
    """CSV exchange file -> RecTools interactions frame (weight 1, datetime from ts_ms)."""
    from rectools import Columns

    df = pd.read_csv(path, dtype={"user_id": np.int64, "item_id": np.int64, "ts_ms": np.int64})
    return pd.DataFrame({
        Columns.User: df["user_id"], Columns.Item: df["item_id"], Columns.Weight: 1.0,
        Columns.Datetime: pd.to_datetime(df["ts_ms"], unit="ms"),
    })


def make_trainer_factory(timer: EpochTimer):
    """RecTools calls this to build its Lightning trainer; one epoch per ``fit_partial``."""
    def get_trainer() -> pl.Trainer:
        return pl.Trainer(max_epochs=1, min_epochs=1, deterministic=False, enable_progress_bar=False,
                          enable_model_summary=False, logger=False, enable_checkpointing=False,
                          num_sanity_val_steps=0, devices=1, accelerator="cpu", callbacks=[timer])
    return get_trainer


def top_k_lists(model, dataset, users: List[int], k: int) -> List[List[int]]:
    """Top-k item ids per user, in the order of ``users`` (empty list for an unsupported user)."""
    from rectools import Columns

    reco = model.recommend(users=users, dataset=dataset, k=k, filter_viewed=True,
                           on_unsupported_targets="warn")
    reco = reco.sort_values([Columns.User, Columns.Rank])
    grouped = reco.groupby(Columns.User)[Columns.Item].agg(list).to_dict()
    return [[int(i) for i in grouped.get(u, [])] for u in users]


def run(workdir: Path) -> Dict[str, Any]:
    import rectools
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel

    request = json.loads((workdir / "request.json").read_text())
    torch.set_num_threads(int(request["threads"]))
    pl.seed_everything(int(request["seed"]), workers=True)
    users = [int(u) for u in request["users"]]
    val_targets = [int(i) for i in request["val_targets"]]
    k, top_n = int(request["k"]), int(request["top_n"])
    train = Dataset.construct(read_interactions(workdir / "train.csv"))
    test_hist = Dataset.construct(read_interactions(workdir / "test_history.csv"))
    timer = EpochTimer()
    model = SASRecModel(**request["model"], verbose=0, recommend_torch_device="cpu",
                        get_trainer_func=make_trainer_factory(timer))
    stop = Patience(int(request["patience"]))
    epochs: List[Dict[str, float]] = []
    best_state: Dict[str, torch.Tensor] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for epoch in range(1, int(request["max_epochs"]) + 1):
        model.fit_partial(train, min_epochs=1, max_epochs=1)
        ran = next(cb for cb in model.fit_trainer.callbacks if isinstance(cb, EpochTimer))
        rank_wall0, rank_cpu0 = time.perf_counter(), time.process_time()
        scores = list_hr_ndcg(top_k_lists(model, train, users, k), val_targets, k)
        epochs.append({"epoch": epoch, "val_hr": scores["hr"], "val_ndcg": scores["ndcg"],
                       "train_wall_s": ran.wall[-1], "train_cpu_s": ran.cpu[-1],
                       "rank_wall_s": time.perf_counter() - rank_wall0,
                       "rank_cpu_s": time.process_time() - rank_cpu0,
                       "loop_wall_s": time.perf_counter() - wall0,
                       "loop_cpu_s": time.process_time() - cpu0})
        if stop.update(scores["ndcg"]):
            best_state = copy.deepcopy(model.lightning_model.state_dict())
        if stop.should_stop:
            break
    model.lightning_model.load_state_dict(best_state)
    return {"epochs": epochs, "best_epoch": stop.best_epoch, "stopped_early": stop.should_stop,
            "val": top_k_lists(model, train, users, top_n),
            "test": top_k_lists(model, test_hist, users, top_n),
            "torch": torch.__version__, "rectools": rectools.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    result = run(args.workdir)
    (args.workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
