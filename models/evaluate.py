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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
    ids = tensors[C.ITEM_IDS].numpy()
    cat_ids = catalog.item_ids.numpy()
    pos = np.minimum(np.searchsorted(cat_ids, ids), len(cat_ids) - 1)
    return torch.as_tensor(np.where((ids >= 0) & (cat_ids[pos] == ids), pos, -1))


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


def format_markdown(result: EvaluationResult) -> str:
    """The table (one line per group x variant) and the quality checks, as markdown."""
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
            f"- Delta input versions: {json.dumps(result.input_versions, sort_keys=True)}"]
    return "\n".join(["# Retrieval evaluation (full corpus)", ""] + meta + [""] + lines) + "\n"


def plot_recall_curves(result: EvaluationResult, path: Path) -> Path:
    """Recall@K vs K (log x), one line per variant, one panel per example group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


REPORT_MD, REPORT_JSON, REPORT_PNG = "evaluation.md", "evaluation.json", "recall_at_k.png"


def write_report(result: EvaluationResult, out_dir: Path | str) -> List[Path]:
    """evaluation.md + evaluation.json + recall_at_k.png into ``out_dir``; returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MD).write_text(format_markdown(result))
    (out / REPORT_JSON).write_text(json.dumps({
        "rows": result.rows, "checks": result.checks, "ks": list(result.ks),
        "model_versions": result.model_versions, "input_versions": result.input_versions,
    }, indent=2, sort_keys=True))
    plot_recall_curves(result, out / REPORT_PNG)
    return [out / REPORT_MD, out / REPORT_JSON, out / REPORT_PNG]
