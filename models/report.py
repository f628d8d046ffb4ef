"""The evaluation report: the table of models/evaluate.py as one self-contained Markdown file
with PNG plots beside it (the table, the quality checks with their intervals, the results by
subject-label relation, Recall@K curves, catalog coverage) and the latency of the serving path.

Apart from the table because it only formats what the table computed: the table is the
measurement (ranking, baselines, bootstrap checks), this module its presentation. Latency is
MEASURED, never estimated, by serving/latency.py (the harness calls a real resolver's
``recommend`` in-process and keeps the stage timings each answer carries); this module only
receives its ``LatencyReport`` (models never imports serving). Without serving artifacts the
report says latency was not measured and how to measure it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from models.evaluate import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CATEGORY_POPULARITY, COOCCURRENCE,
                             GROUP_ALL, GROUP_REAL, MIN_CHECK_EXAMPLES, POPULARITY, RELATIONS,
                             SAME_LEAF, SAME_PARENT, SLICE_METRICS, STATUS_NOT_ENOUGH_DATA,
                             TOP_CATEGORY_POPULARITY, EvaluationResult)
from models.metrics import metric_names

# ---------------------------------------------------------------------- serving latency
LATENCY_STAGES = ("total", "feast", "head", "search")  # keys of the resolver's Response.timings (ms)
CALLER_WALL = "caller_wall"  # the caller's clock around recommend(): the resolver total + call overhead
DEFAULT_LATENCY_REQUESTS, DEFAULT_LATENCY_WARMUP, DEFAULT_LATENCY_K = 200, 20, 100


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
    "`--index <index dir> --feature-repo feature_repo` (with `CTT_LAKE` and `CTT_FEAST_DATA` "
    "exported); `make demo` does all of this.")


def format_markdown(result: EvaluationResult, latency: Optional[LatencyReport] = None) -> str:
    """The whole report as Markdown: table, checks, plots (PNG files beside it), latency."""
    names = metric_names(result.ks)
    lines = ["| examples | variant | n | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for r in result.rows:
        cells = " | ".join(f"{float(r[n]):.4f}" for n in names)
        lines.append(f"| {r['group']} | {r['variant']} | {r['n_examples']} | {cells} |")
    first = next(iter(result.checks.values()), {})
    how = checks_how(int(first.get("n_resamples", BOOTSTRAP_RESAMPLES)),
                     int(first.get("seed", BOOTSTRAP_SEED)))
    lines += ["", "## Quality checks", "", how, "",
              "| check | examples | metric | numerator / denominator | ratio | 95% interval | target "
              "| status |",
              "|---|---|---|---|---:|---|---|---|"]
    lines += [format_check(name, c) for name, c in result.checks.items()]
    meta = [f"- model versions: {json.dumps(result.model_versions, sort_keys=True)}",
            f"- Delta input versions: {json.dumps(result.input_versions, sort_keys=True)}",
            f"- examples `{GROUP_ALL}`: every example with the PSEUDO context (the label's categories); "
            f"`{GROUP_REAL}`: the examples with a subject item, with the REAL context (its categories)",
            "- ties count at their expected rank under random tie-breaking (mid-rank); every metric "
            "is its expectation over the tie-breaks",
            f"- baselines: `{POPULARITY}` (training label counts), `{TOP_CATEGORY_POPULARITY}` (the "
            f"context's strongest category's items by popularity, then its next categories', then "
            f"the rest), `{COOCCURRENCE}` (subject item -> converted item counts of the training "
            f"split, backed off to `{TOP_CATEGORY_POPULARITY}`), `{CATEGORY_POPULARITY}` "
            f"(popularity weighted by category affinity)"]
    lines += format_slices(result.slices)
    plots = ["", "## Recall@K", "", f"![Recall@K per variant]({REPORT_PNG})", "",
             "## Catalog coverage", "",
             "Fraction of the catalog that appears in at least one top-100 list over the examples "
             "(higher = less popularity collapse).", "",
             f"![Catalog coverage per variant]({REPORT_COVERAGE_PNG})"]
    head = ["# Retrieval evaluation (full corpus)", ""] + meta + ["", "## Comparison table", ""]
    return "\n".join(head + lines + plots + ["", format_latency_markdown(latency)]) + "\n"


def format_slices(slices: Sequence[Dict[str, object]]) -> List[str]:
    """The real group by subject-label relation: one row per relation, one column per variant."""
    if not slices:
        return []
    variants = list(dict.fromkeys(str(s["variant"]) for s in slices))
    cell = {(s["relation"], s["variant"]): s for s in slices}
    lines = ["", "## By subject-label relation", "",
             f"Examples with a subject item by how it relates to the converted item (`{SAME_LEAF}` "
             f"= same strongest category, `{SAME_PARENT}` = same second category only); each cell "
             f"{' / '.join(SLICE_METRICS)}.", "",
             "| relation | n | " + " | ".join(variants) + " |", "|---|---:|" + "---|" * len(variants)]
    for relation in RELATIONS:
        present = [cell[relation, v] for v in variants if (relation, v) in cell]
        if present:
            values = " | ".join(" / ".join(f"{float(cell[relation, v][m]):.3f}" for m in SLICE_METRICS)
                                if (relation, v) in cell else "" for v in variants)
            lines.append(f"| {relation} | {present[0]['n_examples']} | {values} |")
    return lines


def checks_how(n_resamples: int, seed: int) -> str:
    """How the checks' ratios and intervals are computed (the paragraph above the table)."""
    return (f"Each ratio compares one metric of two variants on the same examples. The interval is "
            f"a paired bootstrap: {n_resamples} resamples of the examples (seed {seed}), both "
            f"metrics recomputed on each, the best baseline picked again on each; its 2.5 and 97.5 "
            f"percentiles. Fewer than {MIN_CHECK_EXAMPLES} examples or a zero denominator: "
            f"**{STATUS_NOT_ENOUGH_DATA}**, never passed.")


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_check(name: str, c: Dict[str, object]) -> str:
    """One Markdown row of the checks table."""
    target = f">= {c['target']}"
    if c["ci_low_above"] is not None:
        target += f", interval above {c['ci_low_above']}"
    high = "unbounded" if c["ci_high"] is None else _number(c["ci_high"])
    interval = "-" if c["ratio"] is None else f"[{_number(c['ci_low'])}, {high}]"
    status = f"**{c['status']}**" if c["status"] == STATUS_NOT_ENOUGH_DATA else c["status"]
    return (f"| {name} | {c['group']} ({c['n_examples']}) | {c['metric']} | "
            f"{c['numerator_variant']} {c['numerator']:.4f} / {c['denominator_variant']} "
            f"{c['denominator']:.4f} | {_number(c['ratio'])} | {interval} | {target} | {status} |")


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
        "rows": result.rows, "checks": result.checks, "slices": result.slices, "ks": list(result.ks),
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
