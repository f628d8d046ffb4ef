"""MovieLens benchmark: our sequence encoder, trained by the product, vs RecTools' SASRec.

Per data set (``../shared/data/ml-100k`` and ``../shared/data/ml-1m-u2999``):

1. Import through the real-log importer (``pipelines.ingest`` on a local[2] SparkSession): every
   rating is a ``conversion`` event; demographics (age, gender) from the users file; genres as
   item categories (0/1 flag columns for 100k, ``Action|Comedy`` names for 1M). Items and users
   go through ``pipelines.validate``; events are checked for parse failures and unknown items
   (see ``check_events`` for why not ``validate_events``). The frames go to Parquet in a work
   folder: the input of ``models.leave_one_out.LeaveOneOutDataModule``.
2. Protocol (``models/leave_one_out.py``): leave-one-out by time (ties broken by item id, carried
   to RecTools as strictly increasing ms timestamps in the exchange files), the full catalog
   (items with a train interaction) ranked with the user's own history excluded, HR@10 and
   NDCG@10 of both sides' top-100 lists from ONE function (``hit_ndcg_at_k``).
3. Ours: ``ContextualRetrievalSystem`` + ``LeaveOneOutDataModule`` + a Trainer configured from
   ``configs/movielens.yaml`` (objective all_positions: next-item softmax over the whole catalog
   at every position), the same code path as any other training of the product.
4. RecTools ``SASRecModel`` (n_factors 64, 2 blocks, 1 head, softmax loss) in its own virtualenv
   (its pins conflict with ours), built from ``benchmarks/requirements-rectools.txt``; see
   ``benchmarks/movielens_rectools.py``.
5. Converged on both sides: each run trains until validation NDCG@10 has not improved for 5
   epochs (at most 200), the best epoch's weights are tested; 2 torch threads; one run at a time,
   the load average recorded before and after each.
6. Both sides run under the same glibc malloc thresholds (``models.allocator``: the script
   re-executes itself with them, RecTools' child process inherits them); each run records them.

Models (``MODELS``): the head-to-head is ``ours_ids`` vs ``sasrec`` (item ids and positions only
on both sides, sequence cap 200); ``sasrec_cap100`` is SASRec at RecTools' default cap;
``ours_side_info`` adds genres, time gaps and demographics (not comparable with SASRec: more
information).

Stages (each merges into the JSON, which is rewritten after every run, so a stopped benchmark
keeps what it finished; a run already in the JSON is skipped unless ``--redo``):
- ``grid``: every model at every learning rate of ``LRS`` with seed 0; the rate with the best
  validation NDCG@10 is the model's rate;
- ``seeds``: seeds 1 and 2 at that rate (seed 0 is the grid's run); mean and standard deviation
  over the 3 seeds; the ``bars`` list. The rate is chosen among the grid runs of the ``--lrs``
  given (default ``LRS``), so ``--lrs R`` runs a model at one rate only.
``--stage all`` runs both. ``--quick``: a smoke run (ml-100k, 2 epochs, one rate, one seed),
always a fresh report, written to a temporary file, never to benchmarks/results/movielens.json.

Usage: python benchmarks/movielens.py [--stage grid|seeds|all] [--datasets ml-100k ml-1m-u2999]
           [--models ours_ids sasrec ...] [--quick] [--out PATH]
The README's table is rendered from the JSON by ``benchmarks/readme.py``.
Not part of the test suite (tests/benchmarks/test_movielens_protocol.py tests the protocol code).
Data: GroupLens MovieLens (Harper and Konstan, ACM TiiS 2015), read in place, never copied.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

import benchlib  # sibling modules: benchmarks/ is first on sys.path when run as a script
import readme

from models import allocator, leave_one_out as loo
from models.leave_one_out import HR, NDCG, TS_MS, Split
import ctt_contracts as C

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "movielens.json"
QUICK_OUT = Path(tempfile.gettempdir()) / "ctt-movielens-quick.json"
REQUIREMENTS = ROOT / "benchmarks" / "requirements-rectools.txt"
RECTOOLS_SCRIPT = ROOT / "benchmarks" / "movielens_rectools.py"
VENV_CACHE = Path.home() / ".cache" / "ctt"
CONFIG = ROOT / "configs" / "movielens.yaml"
SIDE_INFO_CONFIG = ROOT / "configs" / "movielens_side_info.yaml"

DATASETS = ("ml-100k", "ml-1m-u2999")
LRS = (5e-4, 1e-3, 2e-3, 5e-3)
SEEDS = (0, 1, 2)
MAX_EPOCHS = 200
PATIENCE = 5
SEQ_CAP = 200
RECTOOLS_DEFAULT_CAP = 100
THREADS = 2
QUICK = {"datasets": ("ml-100k",), "lrs": (1e-3,), "seeds": (0,), "max_epochs": 2}

STAGES = ("grid", "seeds", "all")
OURS, RECTOOLS = "ours", "rectools"


@dataclass(frozen=True)
class ModelSpec:
    """One row of the table: which library, and its configuration (config files for ours,
    SASRecModel parameters for RecTools)."""

    name: str
    label: str
    library: str
    configs: Tuple[Path, ...] = ()
    params: Dict[str, Any] = field(default_factory=dict)


SASREC_PARAMS = {"n_factors": 64, "n_blocks": 2, "n_heads": 1, "loss": "softmax"}
MODELS: Dict[str, ModelSpec] = {m.name: m for m in (
    ModelSpec("ours_ids", "ours: sequence encoder, item ids + positions", OURS, configs=(CONFIG,)),
    ModelSpec("sasrec", "RecTools SASRec, cap 200", RECTOOLS,
              params={**SASREC_PARAMS, "session_max_len": SEQ_CAP}),
    ModelSpec("sasrec_cap100", "RecTools SASRec, cap 100 (RecTools' default)", RECTOOLS,
              params={**SASREC_PARAMS, "session_max_len": RECTOOLS_DEFAULT_CAP}),
    ModelSpec("ours_side_info", "ours: + genres, time gaps, demographics (more information)", OURS,
              configs=(CONFIG, SIDE_INFO_CONFIG)),
)}
OURS_H2H, SASREC_H2H = "ours_ids", "sasrec"


# ======================================================================================
# RecTools virtualenv
# ======================================================================================
def venv_dir(requirements: Path = REQUIREMENTS) -> Path:
    """~/.cache/ctt/rectools-venv-<hash of the requirements file>: a changed pin, a new venv."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    return VENV_CACHE / f"rectools-venv-{digest}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def start_venv_build(venv: Path, requirements: Path = REQUIREMENTS) -> Optional[subprocess.Popen]:
    """Start `pip install` into the venv in the background (None when it is already built).

    Started first because it takes minutes on a cold cache; the data import runs meanwhile.
    A `.ready` marker is written only after a successful install, so a killed install is redone.
    """
    if (venv / ".ready").exists():
        return None
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True)
    log = open(venv / "install.log", "w")
    return subprocess.Popen([str(venv_python(venv)), "-m", "pip", "install", "-q", "-r",
                             str(requirements)], stdout=log, stderr=subprocess.STDOUT)


def finish_venv_build(venv: Path, proc: Optional[subprocess.Popen]) -> Path:
    """Wait for the background install; raise with the log's tail if it failed."""
    if proc is not None:
        if proc.wait() != 0:
            tail = (venv / "install.log").read_text()[-3000:]
            raise RuntimeError(f"pip install into {venv} failed:\n{tail}")
        (venv / ".ready").write_text(dt.datetime.now(dt.timezone.utc).isoformat())
    return venv_python(venv)


# ======================================================================================
# Import through the real-log importer (Spark)
# ======================================================================================
@dataclass(frozen=True)
class SourceFile:
    """One headerless MovieLens file: name, separator, column names (in file order)."""

    name: str
    sep: str
    columns: Tuple[str, ...]


@dataclass(frozen=True)
class MovieLensSpec:
    """Where a MovieLens variant keeps ratings, users and items, and how its genres look."""

    name: str
    ratings: SourceFile
    users: SourceFile
    items: SourceFile
    genre_flags: bool  # True: 0/1 genre columns (100k); False: one "A|B" genres column (1M)
    encoding: str = "ISO-8859-1"  # both variants are Latin-1 (titles); harmless for ASCII


def genre_names_100k(folder: Path) -> Tuple[str, ...]:
    """u.genre lists the 19 flag columns of u.item in order ("name|index" lines)."""
    lines = [ln for ln in folder.joinpath("u.genre").read_text(encoding="latin-1").splitlines() if ln]
    pairs = sorted((int(i), n) for n, i in (ln.rsplit("|", 1) for ln in lines))
    return tuple(n for _, n in pairs)


def spec_for(name: str, data_root: Path) -> MovieLensSpec:
    """The file layout of a known variant (raises for an unknown name)."""
    if name == "ml-100k":
        genres = genre_names_100k(data_root / name)
        return MovieLensSpec(
            name, SourceFile("u.data", "\t", ("user", "item", "rating", "ts")),
            SourceFile("u.user", "|", ("user", "age", "gender", "occupation", "zip")),
            SourceFile("u.item", "|", ("item", "title", "release", "video_release", "url") + genres),
            genre_flags=True)
    if name == "ml-1m-u2999":
        return MovieLensSpec(
            name, SourceFile("ratings.dat", "::", ("user", "item", "rating", "ts")),
            SourceFile("users.dat", "::", ("user", "gender", "age", "occupation", "zip")),
            SourceFile("movies.dat", "::", ("item", "title", "genres")),
            genre_flags=False)
    raise ValueError(f"unknown data set {name!r}; known: ml-100k, ml-1m-u2999")


@dataclass
class Imported:
    """A data set as pandas frames with contract column names, plus import counts."""

    events: pd.DataFrame  # USER_ID, ITEM_ID, EVENT_TS (epoch seconds)
    items: pd.DataFrame  # ITEMS_COLUMNS (validated, categories sorted)
    users: pd.DataFrame  # USERS_COLUMNS (validated)
    counts: Dict[str, int] = field(default_factory=dict)


def read_headerless(spark, path: Path, source: SourceFile, encoding: str):  # -> DataFrame
    """A headerless delimited file with every column as a string, named by ``source.columns``.

    Not ``ingest.read_source``: that reader has no encoding option and expects a header line.
    """
    df = (spark.read.option("header", "false").option("sep", source.sep)
          .option("encoding", encoding).option("inferSchema", "false").option("mode", "PERMISSIVE")
          .csv(str(path)))
    if len(df.columns) != len(source.columns):
        raise ValueError(f"{path}: {len(df.columns)} columns, expected {len(source.columns)}")
    return df.toDF(*source.columns)


def check_events(events_pd: pd.DataFrame, n_unparsed: int, item_ids: np.ndarray) -> Dict[str, int]:
    """Fail on rows the importer could not parse; drop (and count) events of unknown items.

    Why not ``validate.validate_events``: it quarantines events before 2000-01-01 as
    ``timestamp_before_2000``, i.e. every MovieLens 100k rating (1997-98).
    """
    if n_unparsed:
        raise ValueError(f"{n_unparsed} rating rows failed to parse at import")
    known = np.isin(events_pd[C.ITEM_ID].to_numpy(), item_ids)
    return {"events_unknown_item": int((~known).sum())}


def import_movielens(spark, spec: MovieLensSpec, data_root: Path) -> Imported:
    """ratings/users/items files -> validated pandas frames through pipelines.ingest."""
    from pyspark.sql import functions as Fs

    from pipelines import ingest, validate
    from pipelines.delta_io import RAW_ROW_JSON

    folder = data_root / spec.name
    read = lambda src: read_headerless(spark, folder / src.name, src, spec.encoding)  # noqa: E731
    events = ingest.events_from_source(read(spec.ratings), ingest.EventMapping(
        user_col="user", item_col="item", ts_col="ts", ts_format=ingest.TS_EPOCH_SECONDS,
        event_type=C.EVENT_CONVERSION))
    if spec.genre_flags:
        item_map = ingest.ItemMapping(item_col="item", category_flag_cols=spec.items.columns[5:])
    else:
        item_map = ingest.ItemMapping(item_col="item", categories_col="genres", category_sep="|")
    raw_items, vocab = ingest.items_from_source(read(spec.items), item_map)
    raw_users = ingest.users_from_source(read(spec.users), ingest.UserMapping(
        user_col="user", age_col="age", gender_col="gender"))
    items, items_q = validate.validate_items(raw_items)
    users, users_q = validate.validate_users(raw_users)
    events = events.cache()
    unparsed = events.where(Fs.col(RAW_ROW_JSON).isNotNull() | Fs.col(C.USER_ID).isNull()
                            | Fs.col(C.ITEM_ID).isNull() | Fs.col(C.EVENT_TS).isNull()).count()
    events_pd = events.select(C.USER_ID, C.ITEM_ID, Fs.unix_seconds(C.EVENT_TS).alias(C.EVENT_TS)
                              ).toPandas()
    items_pd, users_pd = items.toPandas(), users.toPandas()
    counts = {"events": len(events_pd), "items": len(items_pd), "users": len(users_pd),
              "items_quarantined": items_q.count(), "users_quarantined": users_q.count(),
              "categories": len(vocab)}
    counts.update(check_events(events_pd, unparsed, items_pd[C.ITEM_ID].to_numpy()))
    events_pd = events_pd[np.isin(events_pd[C.ITEM_ID], items_pd[C.ITEM_ID])]
    return Imported(events_pd.astype({C.USER_ID: np.int64, C.ITEM_ID: np.int64,
                                      C.EVENT_TS: np.int64}), items_pd, users_pd, counts)


def import_all(names: Sequence[str], data_root: Path) -> Dict[str, Imported]:
    """Import every data set on one local[2] session, then stop it (frees the 2 cores' JVM)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pipelines.spark import get_spark

    spark = get_spark("ctt-movielens-benchmark", master="local[2]", shuffle_partitions=4)
    try:
        return {n: import_movielens(spark, spec_for(n, data_root), data_root) for n in names}
    finally:
        spark.stop()




# ======================================================================================
# Inputs of both sides
# ======================================================================================
@dataclass
class Inputs:
    """One data set ready for both sides: the Parquet inputs of our data module, the split the
    exchange files were written from, and the folder holding both."""

    name: str
    folder: Path
    split: Split
    counts: Dict[str, int]

    @property
    def events(self) -> Path:
        return self.folder / "events.parquet"

    @property
    def items(self) -> Path:
        return self.folder / "items.parquet"

    @property
    def users(self) -> Path:
        return self.folder / "users.parquet"


def write_exchange(split: Split, workdir: Path) -> None:
    """train.csv and test_history.csv for the RecTools side (ordered, ms ties broken)."""
    cols = [C.USER_ID, C.ITEM_ID, TS_MS]
    split.train[cols].to_csv(workdir / "train.csv", index=False)
    pd.concat([split.train, split.val])[cols].sort_values([C.USER_ID, TS_MS]).to_csv(
        workdir / "test_history.csv", index=False)


def prepare(name: str, imported: Imported, folder: Path) -> Inputs:
    """Parquet inputs for our data module and the exchange files for RecTools, from ONE split."""
    folder.mkdir(parents=True, exist_ok=True)
    imported.events.to_parquet(folder / "events.parquet", index=False)
    imported.items.to_parquet(folder / "items.parquet", index=False)
    imported.users.to_parquet(folder / "users.parquet", index=False)
    split = loo.leave_one_out(loo.read_events(str(folder / "events.parquet")))
    write_exchange(split, folder)
    return Inputs(name, folder, split, imported.counts)


def split_info(split: Split) -> Dict[str, Any]:
    return {"users": len(split.users), "users_dropped": split.users_dropped,
            "train_events": len(split.train), "catalog": len(split.catalog),
            "val_targets_outside_catalog": int((~np.isin(split.val[C.ITEM_ID], split.catalog)).sum()),
            "test_targets_outside_catalog": int((~np.isin(split.test[C.ITEM_ID], split.catalog)).sum()),
            "fingerprint": loo.split_fingerprint(split)}


# ======================================================================================
# One run of each side
# ======================================================================================
def ours_args(inputs: Inputs, spec: ModelSpec, lr: float, seed: int, max_epochs: int) -> List[str]:
    """The command line of ``models.leave_one_out`` for one run (configs + overrides)."""
    args = [a for path in spec.configs for a in ("--config", str(path))]
    return args + ["--data.events_path", str(inputs.events), "--data.items_path", str(inputs.items),
                   "--data.users_path", str(inputs.users), "--model.lr", repr(lr),
                   "--seed_everything", str(seed), "--trainer.max_epochs", str(max_epochs)]


def run_ours(inputs: Inputs, spec: ModelSpec, lr: float, seed: int, max_epochs: int) -> Dict[str, Any]:
    """Fit through the product (``loo.fit_and_test``) and check it saw the exchange's split."""
    torch.set_num_threads(THREADS)
    args = ours_args(inputs, spec, lr, seed, max_epochs)
    result = loo.fit_and_test(args)
    if result["split"]["fingerprint"] != loo.split_fingerprint(inputs.split):
        raise RuntimeError(f"{inputs.name}: our data module built another split than the exchange files")
    curve = [{"epoch": c["epoch"], "val_" + NDCG: c["val_" + NDCG], "wall_s": c["wall_s"],
              "cpu_s": c["cpu_s"]} for c in result["curve"]]
    keep = ("val", "best_epoch", "epochs_run", "stopped_early", "wall_to_best_s", "cpu_to_best_s",
            "train_wall_s", "train_cpu_s", "history_violations")
    return {HR: result[HR], NDCG: result[NDCG], **{k: result[k] for k in keep},
            "args": args, "curve": curve}


def rectools_request(split: Split, spec: ModelSpec, lr: float, seed: int, max_epochs: int) -> Dict[str, Any]:
    """What movielens_rectools.py reads: users and validation targets in the split's user order."""
    return {"users": [int(u) for u in split.users],
            "val_targets": [int(i) for i in loo.targets(split, C.SPLIT_VAL)],
            "k": loo.K, "top_n": loo.TOP_N, "seed": seed, "threads": THREADS,
            "max_epochs": max_epochs, "patience": PATIENCE, "model": {**spec.params, "lr": lr}}


def run_sasrec(inputs: Inputs, spec: ModelSpec, lr: float, seed: int, max_epochs: int,
               python: Path) -> Dict[str, Any]:
    """Exchange files + request -> movielens_rectools.py in the RecTools venv -> our metric."""
    split = inputs.split
    request = rectools_request(split, spec, lr, seed, max_epochs)
    with tempfile.TemporaryDirectory(prefix="ctt-movielens-") as tmp:
        workdir = Path(tmp)
        for name in ("train.csv", "test_history.csv"):
            (workdir / name).symlink_to(inputs.folder / name)
        (workdir / "request.json").write_text(json.dumps(request))
        proc = subprocess.run([str(python), str(RECTOOLS_SCRIPT), "--workdir", str(workdir)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"RecTools side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((workdir / "result.json").read_text())
    return sasrec_record(split, request, result)


def sasrec_record(split: Split, request: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    """The RecTools result as a run record: lists scored by ``hit_ndcg_at_k``, which must agree
    with the validation figure that drove RecTools' early stopping; time to the best epoch =
    its training epochs + validation rankings (``loop`` also counts fit_partial's set-up)."""
    epochs, best = result["epochs"], int(result["best_epoch"])
    val = loo.hit_ndcg_at_k(result["val"], loo.targets(split, C.SPLIT_VAL))
    test = loo.hit_ndcg_at_k(result["test"], loo.targets(split, C.SPLIT_TEST))
    stopping_ndcg = epochs[best - 1]["val_ndcg"]
    if not math.isclose(val[NDCG], stopping_ndcg, rel_tol=1e-9, abs_tol=1e-12):
        raise RuntimeError(f"RecTools' stopping metric {stopping_ndcg} disagrees with hit_ndcg_at_k "
                           f"{val[NDCG]} on the best epoch's validation lists")
    wall = np.cumsum([e["train_wall_s"] + e["rank_wall_s"] for e in epochs])
    cpu = np.cumsum([e["train_cpu_s"] + e["rank_cpu_s"] for e in epochs])
    test_hist = loo.grouped(loo.history_frame(split, C.SPLIT_TEST), split.users, C.ITEM_ID)
    return {
        HR: test[HR], NDCG: test[NDCG], "val": val, "best_epoch": best, "epochs_run": len(epochs),
        "stopped_early": bool(result["stopped_early"]),
        "wall_to_best_s": float(wall[best - 1]), "cpu_to_best_s": float(cpu[best - 1]),
        "train_wall_s": float(wall[-1]), "train_cpu_s": float(cpu[-1]),
        "loop_wall_to_best_s": epochs[best - 1]["loop_wall_s"],
        "loop_cpu_to_best_s": epochs[best - 1]["loop_cpu_s"],
        "history_violations": loo.history_violations(result["test"], test_hist),
        "params": request["model"], "versions": {"rectools": result["rectools"], "torch": result["torch"]},
        "curve": [{"epoch": e["epoch"], "val_" + NDCG: e["val_ndcg"], "wall_s": float(w), "cpu_s": float(c)}
                  for e, w, c in zip(epochs, wall, cpu)],
    }


def run_one(inputs: Inputs, spec: ModelSpec, lr: float, seed: int, max_epochs: int,
            python: Optional[Path]) -> Dict[str, Any]:
    """One training run of one model, with the load average around it and the CPU probe before
    it (runs of one JSON may come from different days and machines)."""
    before, probe, started = benchlib.load_avg(), benchlib.cpu_probe_s(), time.perf_counter()
    if spec.library == OURS:
        record = run_ours(inputs, spec, lr, seed, max_epochs)
    else:
        if python is None:
            raise RuntimeError("the RecTools venv was not built")
        record = run_sasrec(inputs, spec, lr, seed, max_epochs, python)
    return {"lr": lr, "seed": seed, **record, "process_wall_s": time.perf_counter() - started,
            "load_before": before, "load_after": benchlib.load_avg(), "cpu_probe_s": probe,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": source_commit(), "glibc_tunables": os.environ.get(allocator.ENV)}


def source_commit(root: Path = ROOT) -> Optional[str]:
    """The commit the run's code came from (``+dirty`` with uncommitted changes outside
    benchmarks/results, which this benchmark itself rewrites after every run), so runs merged into
    one JSON over several stages say which code produced them; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    f":(exclude){DEFAULT_OUT.parent.relative_to(ROOT)}")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# ======================================================================================
# Stages, summaries, bars
# ======================================================================================
def lr_key(lr: float) -> str:
    return repr(float(lr))


def chosen_lr(grid: Dict[str, Dict[str, Any]]) -> float:
    """The rate whose seed-0 run has the best validation NDCG@10 (ties: the smaller rate)."""
    if not grid:
        raise ValueError("no grid runs: run --stage grid first")
    return max((float(k) for k in grid), key=lambda lr: (grid[lr_key(lr)]["val"][NDCG], -lr))


def summarise(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and standard deviation (ddof 1; None for one run) over seeds."""
    out: Dict[str, Any] = {"n_seeds": len(runs), "seeds": [r["seed"] for r in runs], "lr": runs[0]["lr"]}
    for key in (HR, NDCG, "wall_to_best_s", "cpu_to_best_s", "epochs_run", "best_epoch"):
        values = np.array([float(r[key]) for r in runs])
        out[key + "_mean"] = float(values.mean())
        out[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    out["history_violations"] = int(sum(r["history_violations"] for r in runs))
    return out


# (name, data set, summary key, target, True = value must be >= target, False = <=)
BARS = (
    ("ml-100k_hr10_ours_vs_sasrec", "ml-100k", HR + "_mean", 1.0, True),
    ("ml-100k_ndcg10_ours_vs_sasrec", "ml-100k", NDCG + "_mean", 1.0, True),
    ("ml-1m-u2999_hr10_ours_vs_sasrec", "ml-1m-u2999", HR + "_mean", 1.0, True),
    ("ml-1m-u2999_ndcg10_ours_vs_sasrec", "ml-1m-u2999", NDCG + "_mean", 1.0, True),
    ("ml-1m-u2999_time_to_best_ours_vs_sasrec", "ml-1m-u2999", "wall_to_best_s_mean", 0.5, False),
)


BUDGET_BAR, BUDGET_MINUTES = "movielens_total_train_minutes", 150.0


def budget_bar(result: Dict[str, Any]) -> Dict[str, Any]:
    """Minutes of training wall time summed over every run in the JSON (grid and seeds, every
    model and data set): a lower bound on the whole benchmark's time, since imports, test
    scoring and process start-up are not in it. Value and met are None before any run."""
    runs = [run for ds in result.get("datasets", {}).values() for entry in ds["models"].values()
            for stage in ("grid", "seeds") for run in entry.get(stage, {}).values()]
    value = sum(float(run["train_wall_s"]) for run in runs) / 60.0 if runs else None
    return {"name": BUDGET_BAR, "value": value, "target": BUDGET_MINUTES,
            "met": None if value is None else value <= BUDGET_MINUTES}


def bars(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Ours (ids only) over SASRec (cap 200) per bar, from the seed summaries (value and met
    are None while either summary is missing), then the time budget of the whole benchmark."""
    out = []
    for name, dataset, key, target, at_least in BARS:
        models = result.get("datasets", {}).get(dataset, {}).get("models", {})
        ours = models.get(OURS_H2H, {}).get("summary")
        base = models.get(SASREC_H2H, {}).get("summary")
        value = met = None
        if ours and base and base[key]:
            value = ours[key] / base[key]
            met = value >= target if at_least else value <= target
        out.append({"name": name, "value": value, "target": target, "met": met})
    return out + [budget_bar(result)]


def load_result(path: Path) -> Dict[str, Any]:
    """What earlier stages wrote to ``path`` (its ``result``), for this stage to merge into."""
    if path.exists():
        return json.loads(path.read_text())["result"]
    return {"datasets": {}, "stages_run": []}


def save_report(measurement: benchlib.Measurement, result: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Write the envelope of this stage's run (its load and probe at the top, every run's own
    load inside ``result``) and return it."""
    report = measurement.envelope(machine_info(), bars(result), result)
    benchlib.write_json(path, report)
    return report


def model_entry(result: Dict[str, Any], inputs: Inputs, spec: ModelSpec) -> Dict[str, Any]:
    ds = result["datasets"].setdefault(inputs.name, {"models": {}})
    ds["import"], ds["split"] = inputs.counts, split_info(inputs.split)
    entry = ds["models"].setdefault(spec.name, {"grid": {}, "seeds": {}})
    entry["label"], entry["library"] = spec.label, spec.library
    return entry


def run_stage(stage: str, result: Dict[str, Any], inputs: Inputs, spec: ModelSpec, lrs: Sequence[float],
              seeds: Sequence[int], max_epochs: int, python: Optional[Path], redo: bool,
              save) -> None:
    """Run what ``stage`` needs for one (data set, model), saving after every run."""
    entry = model_entry(result, inputs, spec)
    if stage in ("grid", "all"):
        for lr in lrs:
            if lr_key(lr) in entry["grid"] and not redo:
                continue
            entry["grid"][lr_key(lr)] = run_one(inputs, spec, lr, seeds[0], max_epochs, python)
            print_run(inputs.name, spec.name, entry["grid"][lr_key(lr)])
            save()
    if stage in ("seeds", "all"):
        lr = chosen_lr({k: v for k, v in entry["grid"].items() if float(k) in lrs})
        entry["chosen_lr"] = lr
        runs = {str(seeds[0]): entry["grid"][lr_key(lr)]}  # seed 0 at that rate ran in the grid
        for seed in seeds[1:]:
            old = entry["seeds"].get(str(seed))
            if old is not None and old["lr"] == lr and not redo:
                runs[str(seed)] = old
                continue
            runs[str(seed)] = run_one(inputs, spec, lr, seed, max_epochs, python)
            entry["seeds"][str(seed)] = runs[str(seed)]
            print_run(inputs.name, spec.name, runs[str(seed)])
            save()
        entry["seeds"] = {k: v for k, v in runs.items() if k != str(seeds[0])}
        entry["summary"] = summarise([runs[str(s)] for s in seeds])
        save()


def print_run(dataset: str, model: str, r: Dict[str, Any]) -> None:
    print(f"{dataset} {model} lr={r['lr']:g} seed={r['seed']}: test {HR} {r[HR]:.4f} {NDCG} {r[NDCG]:.4f} "
          f"| val {NDCG} {r['val'][NDCG]:.4f} | best epoch {r['best_epoch']}/{r['epochs_run']} "
          f"| to best {r['wall_to_best_s']:.0f} s wall, {r['cpu_to_best_s']:.0f} s CPU "
          f"| load {r['load_before'][0]} -> {r['load_after'][0]}", flush=True)


# ======================================================================================
# Report rendering
# ======================================================================================
def machine_info() -> Dict[str, Any]:
    return {**benchlib.machine(("torch", "pytorch-lightning", "numpy")), "torch_threads": THREADS}


PROTOCOL = {
    "split": "leave-one-out by time (ties by item id): last = test, second-to-last = validation",
    "ranking": "full catalog (items with a train interaction), user's history excluded",
    "k": loo.K, "top_n": loo.TOP_N, "sequence_cap": SEQ_CAP,
    "stopping": f"validation NDCG@10 not improved for {PATIENCE} epochs, at most {MAX_EPOCHS}; "
                "best epoch's weights tested",
    "lr_grid": list(LRS), "seeds": list(SEEDS), "threads": THREADS,
    "time_to_best": "wall / CPU seconds from the first training step to the end of the best epoch, "
                    "its validation ranking included",
}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ml-100k, 2 epochs, one rate, one seed; written to --out "
                        f"(default {QUICK_OUT}), never to {DEFAULT_OUT.relative_to(ROOT)}")
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help=f"learning rates of the grid (default {' '.join(map(str, LRS))}); e.g. the "
                        "extra rows at the head-to-head's chosen rate only, to save time")
    parser.add_argument("--redo", action="store_true", help="rerun runs already in the JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.quick and out.resolve() == DEFAULT_OUT.resolve():
        parser.error(f"--quick is a smoke run: write it elsewhere than {DEFAULT_OUT}")
    datasets = args.datasets or list(QUICK["datasets"] if args.quick else DATASETS)
    lrs = tuple(args.lrs) if args.lrs else (QUICK["lrs"] if args.quick else LRS)
    seeds = QUICK["seeds"] if args.quick else SEEDS
    max_epochs = QUICK["max_epochs"] if args.quick else MAX_EPOCHS
    torch.set_num_threads(THREADS)

    measurement = benchlib.Measurement("movielens")
    started, load_before = time.perf_counter(), measurement.load_before
    needs_rectools = any(MODELS[m].library == RECTOOLS for m in args.models)
    venv = venv_dir()
    venv_proc = start_venv_build(venv) if needs_rectools else None
    imported = import_all(datasets, args.data_root)
    python = finish_venv_build(venv, venv_proc) if needs_rectools else None
    # A smoke run starts afresh; the real one merges into what earlier stages wrote.
    result = {"datasets": {}, "stages_run": []} if args.quick else load_result(out)
    result.update({"protocol": PROTOCOL, "quick": bool(args.quick),
                   "head_to_head": [OURS_H2H, SASREC_H2H]})
    result.setdefault("note", "one run at a time; load averages per run show how busy the machine was")
    save = lambda: save_report(measurement, result, out)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="ctt-movielens-inputs-") as tmp:
        for name in datasets:
            inputs = prepare(name, imported[name], Path(tmp) / name)
            for model in args.models:
                run_stage(args.stage, result, inputs, MODELS[model], lrs, seeds, max_epochs, python,
                          args.redo, save)
    result["stages_run"].append({
        "stage": args.stage, "datasets": datasets, "models": args.models, "quick": bool(args.quick),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started, "load_before": load_before,
        "load_after": benchlib.load_avg(),
        "command": " ".join(["movielens.py", *(argv if argv is not None else sys.argv[1:])])})
    report = save()
    print("\n".join(readme.render_movielens({out.name: report})))
    print(f"wrote {out} (python benchmarks/readme.py puts its table in the README)")
    return report


if __name__ == "__main__":
    # Both sides under the allocator settings of the leave-one-out trainer (models.allocator): our
    # run in this process, RecTools' in a child that inherits the environment.
    allocator.reexec_with_tunables()
    main()
