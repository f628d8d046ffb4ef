"""The evaluation table: every variant ranked against the full catalog on the SAME examples.

Two groups of examples from one split (default: test):
- ``all``: every example, context = the PSEUDO context (the label's categories; an upper bound
  on what context can give, the setting the model was trained in);
- ``real``: the examples whose conversion logged a subject item, context = the REAL context
  (the subject item's categories; what serving sees).

Variants in each group: the contextual model with that group's context, the same model with the
context removed (empty category list, exactly "no context" at serving), the sequence-only model
(use_context=False, use_demographics=False, trained with the same budget), popularity, and
popularity within the context's categories. Models are scored from their exported bundles
(item embeddings as served), so the report also checks the serving artifact.

The quality bar of the synthetic data (checked by ``quality_checks`` and printed in the report):
real-context Recall@100 >= 3x the sequence-only model's; context removed >= 0.9x the sequence-
only model (within 10%); real context >= 1.2x the context-category-popularity heuristic.

The report (``write_report``) is one self-contained Markdown file with PNG plots beside it: the
table, the quality checks, Recall@K curves, catalog coverage and the latency of the serving path.
Latency is MEASURED, never estimated: ``time_requests`` calls a real resolver's ``recommend``
in-process and keeps the stage timings each answer carries (Feast read, head, index search) plus
the caller's own clock. This module only sees a ``recommend`` callable (models never imports
serving); the CLI builds the resolver. Without serving artifacts the report says latency was not
measured and how to measure it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from models import baselines
from models.data import HAS_REAL_CONTEXT, LABEL_ROW, Catalog, ContextualSequenceDataModule, take
from models.export import Bundle
from models.metrics import DEFAULT_KS, Scorer, embedding_scorer, evaluate_scorer, metric_names
from models.system import context_inputs
from models.two_tower import ContextualTwoTower, ModelConfig
from pipelines import contracts as C

GROUP_ALL, GROUP_REAL = "all", "real"
CONTEXTUAL, NO_CONTEXT, SEQUENCE_ONLY = "contextual", "contextual_no_context", "sequence_only"
POPULARITY, CATEGORY_POPULARITY = "popularity", "category_popularity"
QUALITY_K = 100
BAR_REAL_VS_SEQUENCE, BAR_NO_CONTEXT_VS_SEQUENCE, BAR_REAL_VS_CATEGORY_POP = 3.0, 0.9, 1.2


@dataclass
class EvalExamples:
    """One split's example tensors, the catalog and the training label counts."""

    tensors: Dict[str, torch.Tensor]
    catalog: Catalog
    item_counts: torch.Tensor  # (N,) training-split label counts per catalog row
    input_versions: Dict[str, int]


@dataclass
class EvaluationResult:
    rows: List[Dict[str, object]] = field(default_factory=list)  # one per (group, variant)
    checks: Dict[str, Dict[str, object]] = field(default_factory=dict)
    input_versions: Dict[str, int] = field(default_factory=dict)
    model_versions: Dict[str, str] = field(default_factory=dict)
    ks: Sequence[int] = DEFAULT_KS

    def metric(self, group: str, variant: str, name: str) -> float:
        for row in self.rows:
            if row["group"] == group and row["variant"] == variant:
                return float(row[name])
        raise KeyError(f"no row for ({group}, {variant})")

    def as_table(self) -> Dict[str, Dict[str, float]]:
        """{"<group>.<variant>": {metric: value}} (for MLflow metrics)."""
        names = metric_names(self.ks)
        return {f"{r['group']}.{r['variant']}": {n: float(r[n]) for n in names} for r in self.rows}


def load_examples(lake_root: str, config: ModelConfig, split: str = C.SPLIT_TEST) -> EvalExamples:
    """The split's examples shaped for ``config`` (history length, context slots, countries)."""
    dm = ContextualSequenceDataModule(lake_root, max_len=config.max_len, max_ctx=config.max_ctx,
                                      max_item_categories=config.max_item_categories,
                                      country_buckets=config.country_buckets, max_val_examples=None)
    dm.setup("test")
    if len(dm.splits[split][LABEL_ROW]) == 0:
        raise ValueError(f"the {split} split has no examples")
    return EvalExamples(dm.splits[split], dm.catalog, dm.item_counts, dict(dm.input_versions))


@torch.no_grad()
def user_embeddings(model: ContextualTwoTower, tensors: Dict[str, torch.Tensor], context: str,
                    batch_size: int = 2048) -> torch.Tensor:
    """(B, D) user embeddings through the split path (state, then head), in eval mode."""
    model.eval()
    out = []
    n = tensors[LABEL_ROW].shape[0]
    for start in range(0, n, batch_size):
        batch = take(tensors, slice(start, start + batch_size))
        state = model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS_SECONDS])
        ctx_ids, ctx_w = context_inputs(batch, context)
        out.append(model.query_from_state(state, ctx_ids, ctx_w, batch[C.AGE_BUCKET],
                                          batch[C.COUNTRY], batch[C.GENDER]))
    return torch.cat(out)


def history_rows(tensors: Dict[str, torch.Tensor], catalog: Catalog) -> torch.Tensor:
    """History item ids (B, L) -> catalog rows (B, L), -1 for padding / items not in the catalog."""
    return torch.as_tensor(catalog.find_rows(tensors[C.ITEM_IDS].numpy()))


def _bundle_items(bundle: Bundle, catalog: Catalog) -> torch.Tensor:
    """The bundle's item embeddings (N, D), checked to be in the catalog's row order."""
    if not np.array_equal(bundle.item_ids, catalog.item_ids.numpy()):
        raise ValueError(f"bundle {bundle.model_version} was exported for another catalog "
                         f"({len(bundle.item_ids)} items vs {len(catalog)}); re-export it")
    return torch.as_tensor(bundle.item_embeddings)


def _row(group: str, variant: str, n: int, metrics: Dict[str, float]) -> Dict[str, object]:
    return {"group": group, "variant": variant, "n_examples": n, **metrics}


def evaluate_from_lake(contextual: Bundle, sequence_only: Optional[Bundle], lake_root: str,
                       split: str = C.SPLIT_TEST, exclude_history: bool = False,
                       ks: Sequence[int] = DEFAULT_KS) -> EvaluationResult:
    """Read the split from the lake (shaped for each bundle's config) and evaluate."""
    data = load_examples(lake_root, contextual.config, split)
    seq_data = None
    if sequence_only is not None and _shape_key(sequence_only.config) != _shape_key(contextual.config):
        seq_data = load_examples(lake_root, sequence_only.config, split)
    return evaluate_bundles(contextual, sequence_only, data, seq_data, exclude_history, ks)


def evaluate_bundles(contextual: Bundle, sequence_only: Optional[Bundle], data: EvalExamples,
                     seq_data: Optional[EvalExamples] = None, exclude_history: bool = False,
                     ks: Sequence[int] = DEFAULT_KS) -> EvaluationResult:
    """The comparison table (see module docstring) on ``data``; the sequence-only bundle is
    optional and reads ``seq_data`` (same rows, shaped for its config) when given."""
    seq_data = seq_data or data
    result = EvaluationResult(input_versions=data.input_versions, ks=tuple(ks),
                              model_versions={CONTEXTUAL: contextual.model_version})
    if sequence_only is not None:
        result.model_versions[SEQUENCE_ONLY] = sequence_only.model_version
    has_real = data.tensors[HAS_REAL_CONTEXT]
    groups = {GROUP_ALL: (torch.arange(len(has_real)), "pseudo"),
              GROUP_REAL: (torch.nonzero(has_real).squeeze(1), "real")}
    ctx_items = _bundle_items(contextual, data.catalog)
    n_items = len(data.catalog)
    for group, (idx, context) in groups.items():
        if idx.numel() == 0:
            continue
        sub = take(data.tensors, idx)
        target = sub[LABEL_ROW]
        exclude = history_rows(sub, data.catalog) if exclude_history else None
        ctx_ids, ctx_w = context_inputs(sub, context)
        scorers: Dict[str, Scorer] = {
            CONTEXTUAL: embedding_scorer(user_embeddings(contextual.model, sub, context), ctx_items),
            NO_CONTEXT: embedding_scorer(user_embeddings(contextual.model, sub, "none"), ctx_items),
        }
        if sequence_only is not None:
            seq_sub = take(seq_data.tensors, idx)
            scorers[SEQUENCE_ONLY] = embedding_scorer(
                user_embeddings(sequence_only.model, seq_sub, "none"),
                _bundle_items(sequence_only, seq_data.catalog))
        scorers[POPULARITY] = baselines.popularity_scorer(data.item_counts)
        scorers[CATEGORY_POPULARITY] = baselines.category_popularity_scorer(
            data.item_counts, data.catalog.cat_ids, data.catalog.cat_weights, ctx_ids, ctx_w)
        for variant, scorer in scorers.items():
            metrics = evaluate_scorer(scorer, target, n_items, exclude, ks)
            result.rows.append(_row(group, variant, int(idx.numel()), metrics))
    result.checks = quality_checks(result)
    return result


def _shape_key(config: ModelConfig) -> tuple:
    return (config.max_len, config.max_ctx, config.max_item_categories, config.country_buckets)


def quality_checks(result: EvaluationResult, k: int = QUALITY_K) -> Dict[str, Dict[str, object]]:
    """Ratios of the synthetic-data quality bar (skipped when a needed row is absent)."""
    name = f"recall@{k}"
    specs = {
        "real_context_vs_sequence_only": ((GROUP_REAL, CONTEXTUAL), (GROUP_REAL, SEQUENCE_ONLY),
                                          BAR_REAL_VS_SEQUENCE),
        "no_context_vs_sequence_only": ((GROUP_ALL, NO_CONTEXT), (GROUP_ALL, SEQUENCE_ONLY),
                                        BAR_NO_CONTEXT_VS_SEQUENCE),
        "real_context_vs_category_popularity": ((GROUP_REAL, CONTEXTUAL), (GROUP_REAL, CATEGORY_POPULARITY),
                                                BAR_REAL_VS_CATEGORY_POP),
    }
    checks: Dict[str, Dict[str, object]] = {}
    for check, (num, den, bar) in specs.items():
        try:
            a, b = result.metric(*num, name), result.metric(*den, name)
        except KeyError:
            continue
        ratio = a / b if b > 0 else float("inf")
        checks[check] = {"metric": name, "numerator": a, "denominator": b, "ratio": ratio,
                         "bar": bar, "passed": bool(ratio >= bar)}
    return checks


# ---------------------------------------------------------------------- serving latency
REQ_NO_CONTEXT, REQ_SUBJECT_ITEM = "no_context", "subject_item"
LATENCY_STAGES = ("total", "feast", "head", "search")  # keys of the resolver's Response.timings (ms)
CALLER_WALL = "caller_wall"  # the caller's clock around recommend(): the resolver total + call overhead
DEFAULT_LATENCY_REQUESTS, DEFAULT_LATENCY_WARMUP, DEFAULT_LATENCY_K = 200, 20, 100


@dataclass(frozen=True)
class LatencyRequest:
    """One timed request: a user, with or without a subject item (the real-time context)."""

    user_id: int
    subject_item_id: Optional[int] = None

    @property
    def kind(self) -> str:
        return REQ_NO_CONTEXT if self.subject_item_id is None else REQ_SUBJECT_ITEM


@dataclass
class LatencySample:
    """What one real answer reported about itself, plus the caller's own clock."""

    kind: str
    timings: Dict[str, float]  # ms, as the resolver measured them (LATENCY_STAGES)
    wall_ms: float
    cold_start: bool
    n_items: int
    index_backend: str
    model_version: str


@dataclass
class LatencyReport:
    """Percentiles of measured requests, per request kind and stage."""

    k: int
    warmup: int
    index_backend: str
    model_version: str
    n_requests: Dict[str, int]  # kind -> requests timed
    cold_starts: Dict[str, int]  # kind -> answers served without a cached state
    stats: Dict[str, Dict[str, Dict[str, float]]]  # kind -> stage -> {p50, p99, mean, max} in ms
    totals_ms: Dict[str, List[float]]  # kind -> every request's resolver total, in request order
    machine: Dict[str, Any] = field(default_factory=dict)


def split_users(lake_root: str, split: str = C.SPLIT_TEST) -> np.ndarray:
    """Distinct user ids (sorted) of one split of the sequences table: the users to time."""
    from deltalake import DeltaTable

    frame = DeltaTable(C.LakePaths(lake_root).table(C.T_SEQUENCES)).to_pandas(columns=[C.USER_ID, C.SPLIT])
    users = np.unique(frame.loc[frame[C.SPLIT] == split, C.USER_ID].to_numpy(np.int64))
    if users.size == 0:
        raise ValueError(f"the {split} split of {lake_root} has no users to time requests for")
    return users


def latency_requests(user_ids: Sequence[int], item_ids: Sequence[int], n_per_kind: int,
                     seed: int = 0) -> List[LatencyRequest]:
    """``n_per_kind`` requests without context and as many with a subject item, interleaved.

    Interleaved, not one block per kind, so a load change on a shared machine hits both kinds
    alike. Users cycle through a seeded permutation (each user once before any repeats);
    subject items are drawn from ``item_ids`` (the served catalog).
    """
    if n_per_kind < 1:
        raise ValueError(f"n_per_kind must be >= 1, got {n_per_kind}")
    users, items = np.unique(np.asarray(user_ids, np.int64)), np.unique(np.asarray(item_ids, np.int64))
    if users.size == 0 or items.size == 0:
        raise ValueError(f"need users and subject items to time requests ({users.size} users, "
                         f"{items.size} items)")
    rng = np.random.default_rng(seed)
    users, subjects = rng.permutation(users), rng.choice(items, size=n_per_kind)
    out: List[LatencyRequest] = []
    for i in range(n_per_kind):
        user = int(users[i % users.size])
        out += [LatencyRequest(user), LatencyRequest(user, int(subjects[i]))]
    return out


def time_requests(recommend: Callable[..., Any], requests: Sequence[LatencyRequest],
                  k: int = DEFAULT_LATENCY_K, warmup: int = DEFAULT_LATENCY_WARMUP) -> List[LatencySample]:
    """Call ``recommend(user_id=, subject_item_id=, k=)`` once per request, in this process.

    ``recommend`` is a resolver's method (serving.resolver.Resolver.recommend); each answer must
    carry ``timings`` (ms per stage), ``cold_start``, ``items``, ``index_backend`` and
    ``model_version``. The first ``warmup`` calls (cycling through ``requests``) are made and
    dropped: first calls pay one-off costs (SQLite connection, lazy imports, torch kernel
    selection) that are not the steady state. Errors propagate: a failing serving path must fail
    the report, not be timed.
    """
    if not requests:
        raise ValueError("no requests to time")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for i in range(warmup):
        req = requests[i % len(requests)]
        recommend(user_id=req.user_id, subject_item_id=req.subject_item_id, k=k)
    samples: List[LatencySample] = []
    for req in requests:
        start = time.perf_counter()
        answer = recommend(user_id=req.user_id, subject_item_id=req.subject_item_id, k=k)
        wall_ms = (time.perf_counter() - start) * 1000.0
        missing = [s for s in LATENCY_STAGES if s not in answer.timings]
        if missing:
            raise ValueError(f"the resolver's answer has no timings for {missing} (got "
                             f"{sorted(answer.timings)})")
        samples.append(LatencySample(req.kind, {s: float(answer.timings[s]) for s in LATENCY_STAGES},
                                     wall_ms, bool(answer.cold_start), len(answer.items),
                                     str(answer.index_backend), str(answer.model_version)))
    return samples


def machine_facts() -> Dict[str, Any]:
    """CPU count, 1-minute load average and torch threads: latency on a shared machine means
    little without them."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "load_avg_1m": load, "torch_threads": torch.get_num_threads()}


def _describe(values_ms: np.ndarray) -> Dict[str, float]:
    return {"p50": float(np.percentile(values_ms, 50)), "p99": float(np.percentile(values_ms, 99)),
            "mean": float(values_ms.mean()), "max": float(values_ms.max())}


def summarize_latency(samples: Sequence[LatencySample], k: int, warmup: int,
                      machine: Optional[Dict[str, Any]] = None) -> LatencyReport:
    """Per kind and stage: p50/p99/mean/max (linear-interpolated percentiles of the samples)."""
    if not samples:
        raise ValueError("no latency samples")
    for what in ("index_backend", "model_version"):
        seen = sorted({getattr(s, what) for s in samples})
        if len(seen) != 1:
            raise ValueError(f"answers came from several {what}s {seen}: one report, one serving set-up")
    kinds = [kd for kd in (REQ_NO_CONTEXT, REQ_SUBJECT_ITEM) if any(s.kind == kd for s in samples)]
    stats: Dict[str, Dict[str, Dict[str, float]]] = {}
    for kind in kinds:
        group = [s for s in samples if s.kind == kind]
        columns = {stage: np.array([s.timings[stage] for s in group]) for stage in LATENCY_STAGES}
        columns[CALLER_WALL] = np.array([s.wall_ms for s in group])
        stats[kind] = {stage: _describe(v) for stage, v in columns.items()}
    return LatencyReport(
        k=int(k), warmup=int(warmup), index_backend=samples[0].index_backend,
        model_version=samples[0].model_version,
        n_requests={kd: sum(s.kind == kd for s in samples) for kd in kinds},
        cold_starts={kd: sum(s.kind == kd and s.cold_start for s in samples) for kd in kinds},
        stats=stats, totals_ms={kd: [s.timings["total"] for s in samples if s.kind == kd] for kd in kinds},
        machine=dict(machine or {}))


def latency_table(report: LatencyReport) -> Dict[str, Dict[str, float]]:
    """{"latency.<kind>": {"<stage>_p50_ms": v, "<stage>_p99_ms": v}} (for MLflow metrics)."""
    return {f"latency.{kind}": {f"{stage}_{p}_ms": v[p] for stage, v in per_stage.items()
                                for p in ("p50", "p99")}
            for kind, per_stage in report.stats.items()}


# ---------------------------------------------------------------------- the report
REPORT_MD, REPORT_JSON, REPORT_PNG = "evaluation.md", "evaluation.json", "recall_at_k.png"
REPORT_COVERAGE_PNG, REPORT_LATENCY_PNG = "coverage.png", "latency.png"
LATENCY_HOW_TO = (
    "Latency was **not measured**: no serving artifacts were given (an ItemIndex folder and a Feast "
    "repository with materialized features). To measure it, run batch inference, `feast apply` + "
    "`feast materialize` and `jobs/build_index.py`, then rerun this evaluation with "
    "`--index <index dir> --feature_repo feature_repo` (with `CTT_LAKE` and `CTT_FEAST_DATA` "
    "exported); `make demo` does all of this.")


def format_markdown(result: EvaluationResult, latency: Optional[LatencyReport] = None) -> str:
    """The whole report as Markdown: table, checks, plots (PNG files beside it), latency."""
    names = metric_names(result.ks)
    lines = ["| examples | variant | n | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for r in result.rows:
        cells = " | ".join(f"{float(r[n]):.4f}" for n in names)
        lines.append(f"| {r['group']} | {r['variant']} | {r['n_examples']} | {cells} |")
    lines += ["", "| check | ratio | bar | passed |", "|---|---:|---:|---|"]
    for check, c in result.checks.items():
        lines.append(f"| {check} ({c['metric']}) | {c['ratio']:.2f} | {c['bar']} | {c['passed']} |")
    meta = [f"- model versions: {json.dumps(result.model_versions, sort_keys=True)}",
            f"- Delta input versions: {json.dumps(result.input_versions, sort_keys=True)}",
            f"- examples `{GROUP_ALL}`: every example with the PSEUDO context (the label's categories); "
            f"`{GROUP_REAL}`: the examples with a logged subject item, with the REAL context"]
    plots = ["", "## Recall@K", "", f"![Recall@K per variant]({REPORT_PNG})", "",
             "## Catalog coverage", "",
             "Fraction of the catalog that appears in at least one top-100 list over the examples "
             "(higher = less popularity collapse).", "",
             f"![Catalog coverage per variant]({REPORT_COVERAGE_PNG})"]
    head = ["# Retrieval evaluation (full corpus)", ""] + meta + ["", "## Comparison table", ""]
    return "\n".join(head + lines + plots + ["", format_latency_markdown(latency)]) + "\n"


def format_latency_markdown(report: Optional[LatencyReport]) -> str:
    """The latency section: measured percentiles per request kind and stage, or why it is absent."""
    title = "## Serving latency (in-process resolver)"
    if report is None:
        return "\n".join([title, "", LATENCY_HOW_TO])
    m = report.machine
    intro = (f"Measured on {sum(report.n_requests.values())} real requests ({report.n_requests}) after "
             f"{report.warmup} warm-up requests; k={report.k}, index backend `{report.index_backend}`, "
             f"model `{report.model_version}`; machine: {m.get('cpu_count')} CPUs, 1-min load average "
             f"{m.get('load_avg_1m')} at start, torch threads {m.get('torch_threads')}. Stages as each "
             f"answer reports them: feast = the one online-store read, head = context layer + MLP, "
             f"search = index top-k, total = the resolver's total; {CALLER_WALL} = the caller's clock "
             f"around `recommend()`. Percentiles interpolate linearly between samples (p99 of "
             f"{min(report.n_requests.values())} samples is close to the maximum).")
    lines = [title, "", intro, "",
             "| request | n | cold starts | stage | p50 ms | p99 ms | mean ms | max ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for kind, per_stage in report.stats.items():
        for stage, v in per_stage.items():
            lines.append(f"| {kind} | {report.n_requests[kind]} | {report.cold_starts[kind]} | {stage} | "
                         f"{v['p50']:.3f} | {v['p99']:.3f} | {v['mean']:.3f} | {v['max']:.3f} |")
    return "\n".join(lines + ["", f"![Serving latency]({REPORT_LATENCY_PNG})"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: Path) -> Path:
    """Every report plot is written the same way and closed (no figure kept per report)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_curves(result: EvaluationResult, path: Path) -> Path:
    """Recall@K vs K (log x), one line per variant, one panel per example group."""
    plt = _pyplot()
    groups = sorted({str(r["group"]) for r in result.rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in (r for r in result.rows if r["group"] == group):
            ax.plot(result.ks, [float(r[f"recall@{k}"]) for k in result.ks], marker="o",
                    label=str(r["variant"]))
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_title(f"examples: {group}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def plot_coverage(result: EvaluationResult, path: Path) -> Path:
    """Catalog coverage of every (examples, variant) row as horizontal bars."""
    plt = _pyplot()
    name = metric_names(result.ks)[-1]  # coverage@COVERAGE_K
    labels = [f"{r['group']} / {r['variant']}" for r in result.rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
    ax.barh(labels, [float(r[name]) for r in result.rows])
    ax.invert_yaxis()
    ax.set_xlabel(name)
    ax.set_xlim(0, 1)
    ax.grid(True, axis="x", alpha=0.3)
    return _save_figure(plt, fig, path)


def plot_latency(report: LatencyReport, path: Path) -> Path:
    """Left: p50/p99 per stage and request kind; right: distribution (ECDF) of the resolver total."""
    plt = _pyplot()
    fig, (bars, ecdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = list(LATENCY_STAGES) + [CALLER_WALL]
    width = 0.8 / (2 * len(report.stats))
    x = np.arange(len(stages))
    for i, (kind, per_stage) in enumerate(report.stats.items()):
        for j, p in enumerate(("p50", "p99")):
            bars.bar(x + (2 * i + j - len(report.stats) + 0.5) * width, [per_stage[s][p] for s in stages],
                     width, label=f"{kind} {p}")
        values = np.sort(np.asarray(report.totals_ms[kind]))
        ecdf.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=kind)
    bars.set_xticks(x, stages)
    bars.set_ylabel("ms")
    bars.set_title(f"stage latency (k={report.k}, {report.index_backend})")
    bars.legend(fontsize=8)
    ecdf.set_xlabel("resolver total, ms")
    ecdf.set_ylabel("fraction of requests")
    ecdf.set_title("total latency distribution")
    ecdf.grid(True, alpha=0.3)
    ecdf.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def write_report(result: EvaluationResult, out_dir: Path | str,
                 latency: Optional[LatencyReport] = None) -> List[Path]:
    """evaluation.md + evaluation.json + the PNG plots into ``out_dir``; returns the files.

    ``latency`` None = not measured: the Markdown says so and how to measure it; the JSON
    holds ``"latency": null``. No number is ever filled in for it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MD).write_text(format_markdown(result, latency))
    (out / REPORT_JSON).write_text(json.dumps({
        "rows": result.rows, "checks": result.checks, "ks": list(result.ks),
        "model_versions": result.model_versions, "input_versions": result.input_versions,
        "latency": None if latency is None else asdict(latency),
    }, indent=2, sort_keys=True))
    files = [out / REPORT_MD, out / REPORT_JSON, plot_recall_curves(result, out / REPORT_PNG),
             plot_coverage(result, out / REPORT_COVERAGE_PNG)]
    stale = out / REPORT_LATENCY_PNG
    if latency is not None:
        files.append(plot_latency(latency, stale))
    elif stale.exists():
        stale.unlink()  # a plot from an earlier run must not sit beside a report that measured nothing
    return files
