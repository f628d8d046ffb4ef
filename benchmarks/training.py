"""Training-loop benchmark: the Lightning loop vs a plain torch loop doing the same steps.

Both sides train the SAME model definition (ContextualRetrievalSystem, freshly initialised with
the same seed), on the SAME batches (the data module's train loader, same shuffling seed), with
the SAME optimizer (``configure_optimizers``) and gradient clipping, calling the same
``training_loss``; the plain loop is ``loss.backward(); clip; opt.step()`` and nothing else. The
Lightning side is what ``ctt-train`` runs (loss logging, progress tracking, callbacks hooks),
minus validation and checkpointing, which are not per-step costs. Throughput = examples/s over
the timed steps (after warm-up steps); the two loops alternate ``--repeats`` times and the
median of each is reported, because the machine may be shared. Bar: Lightning/plain time ratio
<= 1.3.

Data: ``--lake`` (e.g. the demo lake) or, by default, the pandas synthetic fixture written to
benchmarks/work/lake (demo-like shapes: batch 512, histories capped at max_len 50).

Usage: python benchmarks/training.py [--lake LAKE] [--steps 60] [--warmup 5] [--repeats 3]
Writes benchmarks/results/training.json and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import pytorch_lightning as pl
import torch

import benchlib  # sibling module: benchmarks/ is first on sys.path when run as a script

from models.data import ContextualSequenceDataModule
from models.system import ContextualRetrievalSystem
from models.two_tower import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "training.json"
WORK = REPO_ROOT / "benchmarks" / "work"
CLIP = 1.0
SEED = 0
MAX_RATIO = 1.3
BENCHMARK = "training loop throughput (Lightning vs plain torch, same model/batches/optimizer)"
# The demo's catalogue shape (jobs/demo.py: 10k items, 20 categories, 5 styles); fewer users
# than the demo because only a few hundred steps are timed.
DEMO_LIKE = dict(n_users=10_000, n_items=10_000, n_categories=20, n_styles=5)


class _StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.examples = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.examples += int(next(iter(batch.values())).shape[0])
            self.end = time.perf_counter()


def fresh_system(dm: ContextualSequenceDataModule, config: ModelConfig) -> ContextualRetrievalSystem:
    pl.seed_everything(SEED, verbose=False)
    system = ContextualRetrievalSystem(config)
    system.attach_data(dm.catalog, dm.item_frequencies())
    return system


def run_lightning(dm, config: ModelConfig, steps: int, warmup: int) -> Dict[str, float]:
    system = fresh_system(dm, config)
    timer = _StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, limit_val_batches=0,
                         gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(system, train_dataloaders=dm.train_dataloader())
    seconds = timer.end - timer.start
    return {"seconds": seconds, "examples": timer.examples, "examples_per_s": timer.examples / seconds}


def run_plain(dm, config: ModelConfig, steps: int, warmup: int) -> Dict[str, float]:
    system = fresh_system(dm, config)
    system.train()
    optimizer = system.configure_optimizers()
    batches = iter(dm.train_dataloader())
    start, examples = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # same behaviour as an epoch boundary in Lightning
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        loss = system.training_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(system.parameters(), CLIP)
        optimizer.step()
        if start is not None:
            examples += int(batch[next(iter(batch))].shape[0])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": examples, "examples_per_s": examples / seconds}


def machine() -> Dict[str, Any]:
    return {**benchlib.machine(("torch", "pytorch-lightning")), "torch_threads": torch.get_num_threads()}


def report(measurement: benchlib.Measurement, runs: Dict[str, List[Dict[str, float]]],
           settings: Dict[str, Any]) -> Dict[str, Any]:
    """The results JSON: the time-ratio bar, and under ``result`` the settings, each loop's
    median examples/s with every run's figures, and the ratio against MAX_RATIO."""
    median = {k: statistics.median(r["examples_per_s"] for r in v) for k, v in runs.items()}
    ratio = median["plain_torch"] / median["lightning"]  # time ratio Lightning / plain
    result = {
        "settings": settings,
        "figures": {"lightning": {"median_examples_per_s": median["lightning"], "runs": runs["lightning"]}},
        "baseline": {"plain_torch": {"median_examples_per_s": median["plain_torch"],
                                     "runs": runs["plain_torch"]}},
        "ratio_time_lightning_over_plain": ratio,
        "max_ratio": MAX_RATIO,
        "passed": ratio <= MAX_RATIO,
    }
    return measurement.envelope(
        machine(), [benchlib.bar("training_time_lightning_vs_plain_torch", ratio, MAX_RATIO, at_most=True)],
        result)


def print_table(result: Dict[str, Any]) -> None:
    print(f"{'loop':<12} {'median examples/s':>18} {'runs (examples/s)':>40}")
    for name, fig in (("plain_torch", result["baseline"]["plain_torch"]),
                      ("lightning", result["figures"]["lightning"])):
        per_run = ", ".join(f"{r['examples_per_s']:.0f}" for r in fig["runs"])
        print(f"{name:<12} {fig['median_examples_per_s']:>18.0f} {per_run:>40}")
    print(f"time ratio Lightning / plain torch = {result['ratio_time_lightning_over_plain']:.3f} "
          f"(bar <= {result['max_ratio']})")


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", type=str, default=None, help="Delta lake root (default: fixture)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 = robust on a shared 2-core machine)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=512,
                        help="examples per step (--batch_size: the previous spelling, deprecated)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    lake = args.lake
    if lake is None:
        lake = str(WORK / "lake")
        if not (WORK / "lake").exists():
            write_lake, FixtureSpec = benchlib.synthetic_lake_writer()
            write_lake(lake, FixtureSpec(**DEMO_LIKE))
    config = ModelConfig()  # the contextual defaults: dim 64, 2 layers, max_len 50
    dm = ContextualSequenceDataModule(lake, batch_size=args.batch_size, max_len=config.max_len,
                                      max_ctx=config.max_ctx, country_buckets=config.country_buckets,
                                      max_item_categories=config.max_item_categories,
                                      max_val_examples=100)
    dm.setup("fit")
    measurement = benchlib.Measurement(BENCHMARK)

    runs: Dict[str, List[Dict[str, float]]] = {"lightning": [], "plain_torch": []}
    for _ in range(args.repeats):  # alternate so both see the same machine load
        runs["plain_torch"].append(run_plain(dm, config, args.steps, args.warmup))
        runs["lightning"].append(run_lightning(dm, config, args.steps, args.warmup))
    out = report(measurement, runs, {"lake": lake, "steps": args.steps, "warmup": args.warmup,
                                     "repeats": args.repeats, "batch_size": args.batch_size,
                                     "model_config": config.to_dict(), "gradient_clip_val": CLIP})
    print_table(out["result"])
    benchlib.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
