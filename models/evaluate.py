"""The evaluation table: every variant ranked against the full catalog on the SAME examples.

Two groups of examples from one split (default: test):
- ``all``: every example, context = the PSEUDO context (the label's categories; an upper bound
  on what context can give, the setting the model was trained in);
- ``real``: the examples whose conversion has a subject item, context = the REAL context (the
  subject item's categories; what serving sees).

Variants in each group: the contextual model with that group's context, the same model with the
context removed (empty category list, exactly "no context" at serving), the sequence-only model
(use_context=False, use_demographics=False, trained with the same budget), and the baselines of
models/baselines.py with the group's context: popularity, top category popularity, weighted
category popularity and, on ``real`` (it needs the subject item), co-occurrence from the
subject item, counted on the training split. Models are scored from their exported bundles
(item embeddings as served), so the report also checks the serving artifact. Ties count at
their expected rank under random tie-breaking (models/metrics.py), for models and baselines
alike.

Quality checks (``quality_checks``, DESIGN.md section 5): each is a ratio of one metric between
two variants on the same examples, with a paired bootstrap 95 % interval (examples resampled
with replacement, both metrics recomputed on the same resample, the ratio of the means; seeded,
vectorised). A check with fewer than ``MIN_CHECK_EXAMPLES`` examples or a zero denominator is
"not enough data", never passed. The checks:
- real context vs the best of top category popularity and co-occurrence (the best picked again
  on every resample), on Recall@100 and on NDCG@10: ratio >= 1.2 and interval above 1.0;
- context removed vs sequence-only (``all``), Recall@100: >= 0.9 (within 10 %);
- real context vs sequence-only (``real``), Recall@100: >= 1.0 (context must not hurt, even
  when it is a poor guide to the label).

The report of this table (Markdown, plots, the measured serving latency) is models/report.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from models import baselines
from models.data import (HAS_REAL_CONTEXT, LABEL_ROW, SUBJECT_ROW, Catalog,
                         ContextualSequenceDataModule, take)
from models.export import Bundle
from models.metrics import (DEFAULT_KS, NDCG_K, Scorer, TiedRanks, embedding_scorer, evaluate_ranked,
                            metric_names, per_query_metrics)
from models.system import context_inputs, rows_or_zero
from models.two_tower import ContextualTwoTower, ModelConfig
import ctt_contracts as C

GROUP_ALL, GROUP_REAL = "all", "real"
CONTEXTUAL, NO_CONTEXT, SEQUENCE_ONLY = "contextual", "contextual_no_context", "sequence_only"
POPULARITY, CATEGORY_POPULARITY = "popularity", "category_popularity"
TOP_CATEGORY_POPULARITY, COOCCURRENCE = "top_category_popularity", "cooccurrence"
QUALITY_K = 100
MIN_CHECK_EXAMPLES = 100  # fewer examples than this: a ratio is "not enough data"
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 1000, 0, 0.95
STATUS_PASSED, STATUS_FAILED, STATUS_NOT_ENOUGH_DATA = "passed", "failed", "not enough data"
# How the subject item relates to the converted item, from the catalog's category order
# (strongest first: on a taxonomy the leaf, then its parent): where a model gains or loses
# against a category lookup is a question of these slices, not of the overall mean.
SUBJECT_IS_LABEL, SAME_LEAF, SAME_PARENT, OTHER = ("subject_is_label", "same_leaf", "same_parent",
                                                   "other")
RELATIONS = (SUBJECT_IS_LABEL, SAME_LEAF, SAME_PARENT, OTHER)
SLICE_METRICS = (f"recall@{QUALITY_K}", f"ndcg@{NDCG_K}")


@dataclass(frozen=True)
class CheckSpec:
    """One quality check: ``metric`` of ``numerator`` over the best of ``denominators`` (all
    variants of ``group``, so the bootstrap can pair examples). Passed when the ratio reaches
    ``target`` and, if ``ci_low_above`` is set, the interval's lower end exceeds it."""

    name: str
    group: str
    metric: str
    numerator: str
    denominators: Tuple[str, ...]
    target: float
    ci_low_above: Optional[float] = None


QUALITY_CHECKS: Tuple[CheckSpec, ...] = (
    CheckSpec("real_context_vs_best_baseline_recall", GROUP_REAL, f"recall@{QUALITY_K}", CONTEXTUAL,
              (TOP_CATEGORY_POPULARITY, COOCCURRENCE), 1.2, 1.0),
    CheckSpec("real_context_vs_best_baseline_ndcg", GROUP_REAL, f"ndcg@{NDCG_K}", CONTEXTUAL,
              (TOP_CATEGORY_POPULARITY, COOCCURRENCE), 1.2, 1.0),
    CheckSpec("no_context_vs_sequence_only", GROUP_ALL, f"recall@{QUALITY_K}", NO_CONTEXT,
              (SEQUENCE_ONLY,), 0.9),
    CheckSpec("real_context_vs_sequence_only", GROUP_REAL, f"recall@{QUALITY_K}", CONTEXTUAL,
              (SEQUENCE_ONLY,), 1.0),
)


@dataclass
class EvalExamples:
    """One split's example tensors, the catalog and what the baselines learn from training."""

    tensors: Dict[str, torch.Tensor]
    catalog: Catalog
    item_counts: torch.Tensor  # (N,) training-split label counts per catalog row
    input_versions: Dict[str, int]
    train_pairs: baselines.SparseRows  # training (subject row -> label row) counts

    @classmethod
    def from_datamodule(cls, dm: ContextualSequenceDataModule, split: str) -> "EvalExamples":
        train = dm.splits[C.SPLIT_TRAIN]
        return cls(dm.splits[split], dm.catalog, dm.item_counts, dict(dm.input_versions),
                   baselines.cooccurrence_counts(train[SUBJECT_ROW], train[LABEL_ROW]))


@dataclass
class EvaluationResult:
    rows: List[Dict[str, object]] = field(default_factory=list)  # one per (group, variant)
    checks: Dict[str, Dict[str, object]] = field(default_factory=dict)
    input_versions: Dict[str, int] = field(default_factory=dict)
    model_versions: Dict[str, str] = field(default_factory=dict)
    ks: Sequence[int] = DEFAULT_KS
    ranks: Dict[Tuple[str, str], TiedRanks] = field(default_factory=dict)  # per example, same order
    slices: List[Dict[str, object]] = field(default_factory=list)  # real group by relation

    def metric(self, group: str, variant: str, name: str) -> float:
        for row in self.rows:
            if row["group"] == group and row["variant"] == variant:
                return float(row[name])
        raise KeyError(f"no row for ({group}, {variant})")

    def as_table(self) -> Dict[str, Dict[str, float]]:
        """{"<group>.<variant>": {metric: value}} (for MLflow metrics)."""
        names = metric_names(self.ks)
        return {f"{r['group']}.{r['variant']}": {n: float(r[n]) for n in names} for r in self.rows}

    def checks_table(self) -> Dict[str, Dict[str, float]]:
        """{"check.<name>": {ratio, ci_low, ci_high, passed}} for MLflow, defined values only."""
        out = {}
        for name, c in self.checks.items():
            values = {k: float(c[k]) for k in ("ratio", "ci_low", "ci_high") if c[k] is not None}
            out[f"check.{name}"] = {**values, "passed": float(c["passed"])}
        return out


def load_examples(lake_root: str, config: ModelConfig, split: str = C.SPLIT_TEST) -> EvalExamples:
    """The split's examples shaped for ``config`` (history length, context slots, countries)."""
    dm = ContextualSequenceDataModule(lake_root, max_len=config.max_len, max_ctx=config.max_ctx,
                                      max_item_categories=config.max_item_categories,
                                      country_buckets=config.country_buckets, max_val_examples=None)
    dm.setup("test")
    if len(dm.splits[split][LABEL_ROW]) == 0:
        raise ValueError(f"the {split} split has no examples")
    return EvalExamples.from_datamodule(dm, split)


@torch.no_grad()
def user_embeddings(model: ContextualTwoTower, tensors: Dict[str, torch.Tensor], context: str,
                    item_emb: Optional[torch.Tensor] = None, batch_size: int = 2048) -> torch.Tensor:
    """(B, D) user embeddings through the split path (state, then head), in eval mode.

    ``item_emb`` (N, D): the exported catalog embeddings, where a model that reads the subject
    item takes its embedding from under the "real" context (as the resolver does)."""
    model.eval()
    out = []
    n = tensors[LABEL_ROW].shape[0]
    for start in range(0, n, batch_size):
        batch = take(tensors, slice(start, start + batch_size))
        state = model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS])
        ctx_ids, ctx_w = context_inputs(batch, context)
        out.append(model.query_from_state(state, ctx_ids, ctx_w, batch[C.AGE_BUCKET],
                                          batch[C.COUNTRY], batch[C.GENDER],
                                          subject_embeddings(model, batch, context, item_emb)))
    return torch.cat(out)


def subject_embeddings(model: ContextualTwoTower, batch: Dict[str, torch.Tensor], context: str,
                       item_emb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, D) the subject items' exported embeddings (zero rows without one) under the "real"
    context of a model that reads them; None otherwise."""
    if context != "real" or not model.config.use_subject_item or item_emb is None:
        return None
    rows = batch[SUBJECT_ROW]  # (B,) -1 = none
    return rows_or_zero(item_emb[rows.clamp(min=0)], rows)  # (B, D)


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


def baseline_scorers(data: EvalExamples, sub: Dict[str, torch.Tensor], context: str) -> Dict[str, Scorer]:
    """The baselines for one group of examples ``sub`` with its context ("pseudo" / "real");
    co-occurrence only with the real context (it starts from the subject item)."""
    cat = data.catalog
    ctx_ids, ctx_w = context_inputs(sub, context)
    scorers: Dict[str, Scorer] = {
        POPULARITY: baselines.popularity_scorer(data.item_counts),
        TOP_CATEGORY_POPULARITY: baselines.top_category_popularity_scorer(
            data.item_counts, cat.cat_ids, cat.cat_weights, ctx_ids, ctx_w),
        CATEGORY_POPULARITY: baselines.category_popularity_scorer(
            data.item_counts, cat.cat_ids, cat.cat_weights, ctx_ids, ctx_w),
    }
    if context == "real":
        scorers[COOCCURRENCE] = baselines.cooccurrence_scorer(
            data.train_pairs, sub[SUBJECT_ROW], data.item_counts, cat.cat_ids, cat.cat_weights,
            ctx_ids, ctx_w)
    return scorers


def evaluate_bundles(contextual: Bundle, sequence_only: Optional[Bundle], data: EvalExamples,
                     seq_data: Optional[EvalExamples] = None, exclude_history: bool = False,
                     ks: Sequence[int] = DEFAULT_KS, n_resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> EvaluationResult:
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
        scorers: Dict[str, Scorer] = {
            CONTEXTUAL: embedding_scorer(user_embeddings(contextual.model, sub, context, ctx_items), ctx_items),
            NO_CONTEXT: embedding_scorer(user_embeddings(contextual.model, sub, "none"), ctx_items),
        }
        if sequence_only is not None:
            seq_sub = take(seq_data.tensors, idx)
            scorers[SEQUENCE_ONLY] = embedding_scorer(
                user_embeddings(sequence_only.model, seq_sub, "none"),
                _bundle_items(sequence_only, seq_data.catalog))
        scorers.update(baseline_scorers(data, sub, context))
        for variant, scorer in scorers.items():
            metrics, ranks = evaluate_ranked(scorer, target, n_items, exclude, ks)
            result.rows.append(_row(group, variant, int(idx.numel()), metrics))
            result.ranks[group, variant] = ranks
        if group == GROUP_REAL:
            result.slices = relation_slices(result, sub, data.catalog.cat_ids)
    result.checks = quality_checks(result, n_resamples=n_resamples, seed=seed)
    return result


def subject_relations(subject_rows: torch.Tensor, label_rows: torch.Tensor,
                      cat_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each example's relation of subject to label, one (B,) bool mask per ``RELATIONS`` entry.

    subject_rows, label_rows (B,) catalog rows (subject >= 0); cat_ids (N, C) each item's
    categories strongest first, -1 = none. The first category is the leaf, the second its
    parent; the masks are exclusive and cover every example, in the order listed.
    """
    def shared(col: int) -> torch.Tensor:
        if cat_ids.shape[1] <= col:
            return torch.zeros_like(label_rows, dtype=torch.bool)
        s, lab = cat_ids[subject_rows, col], cat_ids[label_rows, col]  # (B,), (B,)
        return (s == lab) & (lab >= 0)

    same_item = subject_rows == label_rows
    leaf = shared(0) & ~same_item
    parent = shared(1) & ~same_item & ~leaf
    return {SUBJECT_IS_LABEL: same_item, SAME_LEAF: leaf, SAME_PARENT: parent,
            OTHER: ~(same_item | leaf | parent)}


def relation_slices(result: EvaluationResult, sub: Dict[str, torch.Tensor],
                    cat_ids: torch.Tensor) -> List[Dict[str, object]]:
    """The real group's metrics per subject-label relation and variant, from the ranks already
    computed (no scoring again): one row per (relation, variant) with at least one example."""
    masks = subject_relations(sub[SUBJECT_ROW], sub[LABEL_ROW], cat_ids)
    rows = []
    for relation, mask in masks.items():
        if not bool(mask.any()):
            continue
        for (group, variant), ranks in result.ranks.items():
            if group != GROUP_REAL:
                continue
            per = per_query_metrics(TiedRanks(ranks.greater[mask], ranks.ties[mask]), result.ks)
            rows.append({"group": GROUP_REAL, "relation": relation, "variant": variant,
                         "n_examples": int(mask.sum()),
                         **{m: float(per[m].mean()) for m in SLICE_METRICS}})
    return rows


def _shape_key(config: ModelConfig) -> tuple:
    return (config.max_len, config.max_ctx, config.max_item_categories, config.country_buckets)


def bootstrap_means(values: torch.Tensor, n_resamples: int, seed: int,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """values (V, n) per-example values of V paired variants -> (n_resamples, V) means over
    the same resamples of the n examples (drawn with replacement; seeded). Resamples are drawn
    in chunks (default: ~4M gathered values each) so memory stays ``V x chunk x n``."""
    v, n = values.shape
    chunk = chunk or max(1, min(n_resamples, 4_000_000 // max(1, v * n)))
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = torch.randint(0, n, (r, n), generator=g)  # (r, n)
        out.append(values[:, idx].mean(dim=2).T)  # (r, V)
    return torch.cat(out)


def ratio_check(spec: CheckSpec, num: torch.Tensor, dens: Sequence[torch.Tensor],
                den_names: Sequence[str], n_resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> Dict[str, object]:
    """One check from per-example values: num (n,) and each denominator (n,), same examples.

    The ratio is mean(num) / max_d mean(den_d); its interval is the percentile interval of the
    same ratio over paired bootstrap resamples (the best denominator picked per resample, so
    picking the best baseline is part of what the interval covers).
    """
    n = int(num.shape[0])
    means = [float(v.mean()) if n else 0.0 for v in (num, *dens)]
    best = int(np.argmax(means[1:]))
    numerator, denominator = means[0], means[1 + best]
    out: Dict[str, object] = {
        "metric": spec.metric, "group": spec.group, "numerator_variant": spec.numerator,
        "denominator_variant": den_names[best], "numerator": numerator, "denominator": denominator,
        "n_examples": n, "target": spec.target, "ci_low_above": spec.ci_low_above,
        "ratio": None, "ci_low": None, "ci_high": None, "confidence": CONFIDENCE,
        "n_resamples": n_resamples, "seed": seed,
    }
    if denominator > 0:
        out["ratio"] = numerator / denominator
        boot = bootstrap_means(torch.stack([num, *dens]), n_resamples, seed)  # (R, 1 + D)
        best_den = boot[:, 1:].max(dim=1).values
        ratios = torch.where(best_den > 0, boot[:, 0] / best_den, torch.full_like(best_den, float("inf")))
        tail = (1.0 - CONFIDENCE) / 2.0
        lo, hi = np.quantile(ratios.numpy(), [tail, 1.0 - tail], method="inverted_cdf")
        # an end is unbounded when many resamples drew only zero-denominator examples
        out["ci_low"], out["ci_high"] = (float(v) if np.isfinite(v) else None for v in (lo, hi))
    if n < MIN_CHECK_EXAMPLES or denominator <= 0:
        status = STATUS_NOT_ENOUGH_DATA
    else:
        low = out["ci_low"]
        met = out["ratio"] >= spec.target and (spec.ci_low_above is None
                                               or (low is not None and low > spec.ci_low_above))
        status = STATUS_PASSED if met else STATUS_FAILED
    out["status"], out["passed"] = status, status == STATUS_PASSED
    return out


def quality_checks(result: EvaluationResult, specs: Sequence[CheckSpec] = QUALITY_CHECKS,
                   n_resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> Dict[str, Dict[str, object]]:
    """Every check whose variants were evaluated (a check needing an absent variant, e.g. the
    sequence-only model, is left out), with paired bootstrap intervals (``ratio_check``)."""
    checks: Dict[str, Dict[str, object]] = {}
    for spec in specs:
        names = [spec.numerator, *spec.denominators]
        if any((spec.group, v) not in result.ranks for v in names):
            continue
        ks = sorted(set(result.ks) | {QUALITY_K})
        values = [per_query_metrics(result.ranks[spec.group, v], ks)[spec.metric] for v in names]
        checks[spec.name] = ratio_check(spec, values[0], values[1:], spec.denominators, n_resamples, seed)
    return checks
