"""RecTools SASRec side of the MovieLens benchmark; runs INSIDE the separate RecTools virtualenv.

Why a separate process: RecTools pins numpy<2 and pytorch-lightning<=2.5.2, which conflict with
the project's environment, so ``benchmarks/movielens.py`` builds a virtualenv from
``benchmarks/requirements-rectools.txt`` and runs this script there. The two sides exchange
plain files only, so both models see byte-identical splits:

inputs (in ``--workdir``, written by movielens.py)
  train.csv         user_id,item_id,ts_ms   every train interaction (all but each user's last two)
  test_history.csv  user_id,item_id,ts_ms   train + the validation item: the history at test time
  request.json      {"val_users": [...], "test_users": [...], "cpu_budget_seconds": s,
                     "max_epochs": E, "candidates": c, "k": 100, "seed": S, "threads": T,
                     "model": {SASRec parameters}}
output
  result.json       {"epoch_end_wall_seconds": [...], "epoch_end_cpu_seconds": [...],
                     "val_loss": [...],
                     "snapshots": [{"epoch": e, "val": [[item, ...], ...], "test": [...]}, ...]}

``ts_ms`` is strictly increasing within a user (movielens.py breaks timestamp ties), so the
order RecTools sorts by is exactly the order our model sees.

"Best epoch count within the budget": ONE training run on test_history.csv with RecTools' own
validation (``get_val_mask_func`` holds out each user's last interaction there, i.e. the
validation item, so the model trains on train.csv exactly), stopped at the CPU budget (see
``EpochSnapshots``). The weights after every epoch are kept in memory; the ``candidates`` epochs with the
lowest RecTools validation loss, plus the last finished epoch, are then ranked (validation
history = train, test history = train + validation item, ``filter_viewed=True`` removes the
user's own history). Only those few snapshots are ranked because a RecTools ``recommend`` pass
costs seconds. Metrics are NOT computed here: movielens.py computes HR/NDCG for both models
with one function and picks SASRec's epoch on validation NDCG@10.

This file imports only the RecTools environment's packages (never the project's).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import rectools
import torch
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import SASRecModel


VAL_LOSS = "val_loss"  # what RecTools logs for its validation split


class EpochSnapshots(pl.Callback):
    """Keeps an in-memory copy of the weights, the timings and RecTools' validation loss after
    every finished epoch, and stops training at the CPU budget.

    Budget rule (the same one movielens.py applies to our model): another epoch is started only
    if the process CPU seconds used so far plus the last epoch's CPU seconds stay within the
    budget. CPU seconds rather than wall seconds because the benchmark machine is shared: other
    processes stretch wall time unevenly between the two models, CPU time much less.
    """

    def __init__(self, cpu_budget_seconds: float) -> None:
        super().__init__()
        self.cpu_budget = cpu_budget_seconds
        self.states: List[Dict[str, torch.Tensor]] = []
        self.epoch_end_wall: List[float] = []
        self.epoch_end_cpu: List[float] = []
        self.val_loss: List[float] = []
        self.cpu_start = 0.0
        self.wall_start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the end-of-epoch validation loop before this hook.
        self.epoch_end_wall.append(time.perf_counter() - self.wall_start)
        self.epoch_end_cpu.append(time.process_time() - self.cpu_start)
        loss = trainer.callback_metrics.get(VAL_LOSS)
        self.val_loss.append(float(loss) if loss is not None else math.nan)
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        last_epoch_cpu = np.diff([0.0] + self.epoch_end_cpu)[-1]
        if self.epoch_end_cpu[-1] + last_epoch_cpu > self.cpu_budget:
            trainer.should_stop = True


def read_interactions(path: Path) -> pd.DataFrame:
    """CSV exchange file -> RecTools interactions frame (weight 1, datetime from ts_ms)."""
    df = pd.read_csv(path, dtype={"user_id": np.int64, "item_id": np.int64, "ts_ms": np.int64})
    return pd.DataFrame({
        Columns.User: df["user_id"], Columns.Item: df["item_id"], Columns.Weight: 1.0,
        Columns.Datetime: pd.to_datetime(df["ts_ms"], unit="ms"),
    })


def last_interaction_mask(interactions: pd.DataFrame) -> np.ndarray:
    """RecTools val-mask function: each user's newest interaction (the validation item)."""
    newest = interactions.groupby(Columns.User)[Columns.Datetime].transform("max")
    return (interactions[Columns.Datetime] == newest).to_numpy()


def make_trainer_factory(max_epochs: int, snapshots: EpochSnapshots):
    """RecTools calls this to build its Lightning trainer: our budget/snapshot callback added."""
    def get_trainer() -> pl.Trainer:
        return pl.Trainer(max_epochs=max_epochs, min_epochs=1, deterministic=False,
                          enable_progress_bar=False, enable_model_summary=False, logger=False,
                          enable_checkpointing=False, num_sanity_val_steps=0, devices=1,
                          accelerator="cpu", callbacks=[snapshots])
    return get_trainer


def candidate_epochs(val_loss: List[float], n: int) -> List[int]:
    """1-based epochs to rank: the n lowest validation losses plus the last epoch."""
    order = sorted(range(len(val_loss)), key=lambda i: (math.isnan(val_loss[i]), val_loss[i]))
    return sorted({i + 1 for i in order[:n]} | {len(val_loss)})


def top_k_lists(model: SASRecModel, dataset: Dataset, users: List[int], k: int) -> List[List[int]]:
    """Top-k item ids per user, in the order of ``users`` (empty list for an unsupported user)."""
    reco = model.recommend(users=users, dataset=dataset, k=k, filter_viewed=True,
                           on_unsupported_targets="warn")
    reco = reco.sort_values([Columns.User, Columns.Rank])
    grouped = reco.groupby(Columns.User)[Columns.Item].agg(list).to_dict()
    return [[int(i) for i in grouped.get(u, [])] for u in users]


def run(workdir: Path) -> Dict[str, Any]:
    request = json.loads((workdir / "request.json").read_text())
    torch.set_num_threads(int(request["threads"]))
    pl.seed_everything(int(request["seed"]), workers=True)
    train = Dataset.construct(read_interactions(workdir / "train.csv"))
    test_hist = Dataset.construct(read_interactions(workdir / "test_history.csv"))
    snapshots = EpochSnapshots(float(request["cpu_budget_seconds"]))
    # Model parameters come from movielens.py (n_factors 64, 2 blocks, 1 head, softmax, cap 200).
    model = SASRecModel(**request["model"], verbose=0, recommend_torch_device="cpu",
                        get_val_mask_func=last_interaction_mask,
                        get_trainer_func=make_trainer_factory(int(request["max_epochs"]), snapshots))
    model.fit(test_hist)  # the val mask holds the validation items out: trains on train.csv
    # deepcopy(trainer) inside RecTools copies the callback: read the copy that actually ran.
    ran = next(cb for cb in model.fit_trainer.callbacks if isinstance(cb, EpochSnapshots))
    k = int(request["k"])
    out = []
    for epoch in candidate_epochs(ran.val_loss, int(request["candidates"])):
        model.lightning_model.load_state_dict(ran.states[epoch - 1])
        model.lightning_model.eval()
        out.append({"epoch": epoch,
                    "val": top_k_lists(model, train, request["val_users"], k),
                    "test": top_k_lists(model, test_hist, request["test_users"], k)})
    return {"epoch_end_wall_seconds": ran.epoch_end_wall, "epoch_end_cpu_seconds": ran.epoch_end_cpu,
            "val_loss": ran.val_loss, "torch": torch.__version__,
            "rectools": rectools.__version__, "snapshots": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    result = run(args.workdir)
    (args.workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
