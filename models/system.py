"""LightningModule: the training recipe around ContextualTwoTower (the math lives in the model).

Loss: sampled softmax over in-batch + uniform negatives with logQ correction (seed 002; Yi et
al. 2019). In-batch negatives are the other examples' labels, so popular items are sampled as
negatives in proportion to their label frequency; without a correction the model learns to push
popular items DOWN. Mixing in ``n_uniform_negatives`` uniformly drawn catalog items gives the
tail negatives too. The candidate set therefore comes from the mixture proposal whose expected
count for item j in one step is ``Q_j = B * p_j + U / N`` (p_j = the item's label frequency in
the training split), and every candidate's logit is corrected by ``- logq_weight * log Q_j``.
Candidates that are the same item as a row's positive (accidental hits) are masked out. Under
DDP the positives of all ranks are gathered, so B above is the global batch.

Item id embeddings start either random or (``item_init="cooccurrence"``) from a truncated SVD of
the training split's user x item matrix (models/warm_start.py: without it, the history's signal
beyond popularity is found late or never on sparse logs).

Objective (``objective``): "last_item" = one example per sequences row, its label predicted from
its history (the product's training set: every conversion is a row); "all_positions" = next-item
prediction at EVERY position of each row's history + label in one causal pass (SASRec's
objective, what the MovieLens benchmark trains: a leave-one-out log has one row per user, so
predicting only its newest item would waste all the others). ``full_softmax`` makes every
catalog item a candidate (no sampling, no logQ); without it all_positions scores the positive
against ``n_uniform_negatives`` uniform items shared by the batch (a uniform proposal's logQ is
the same for every negative and cancels).

Training-only regularisers beside the context dropout of the model: a ``history_drop_prob``
share of examples get the learned cold-start state instead of their encoded history, so the
``state=None`` serving path is trained.

Validation: full-corpus Recall@K etc. on the validation split three times: with its pseudo
context (``val/...``, what a sequence-only run monitors), with the context removed
(``val_no_context/...``) and with the context serving sees, the logged or derived subject item
where there is one (``val_served/...``); ``val_both/...`` is the mean of the last two, what
configs/contextual.yaml selects the checkpoint and stops on (``both_modes``). A batch
with ``EXCLUDE_ROWS`` has the user's own history dropped from the ranking, and a label row of -1
(a target outside the catalog, possible in a leave-one-out split) counts as a miss: the
MovieLens protocol (models/leave_one_out.py).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from models import features
from models.data import (EXCLUDE_ROWS, HAS_REAL_CONTEXT, LABEL_ROW, REAL_CONTEXT_IDS, REAL_CONTEXT_WEIGHTS,
                         SUBJECT_ROW, Catalog)
from models.metrics import COVERAGE_K, DEFAULT_KS, TiedRanks, metric_key, rank_targets, retrieval_metrics
from models.softmax import linear_cross_entropy
from models.two_tower import ContextualTwoTower, ModelConfig, trim_left_padding
from models.warm_start import cooccurrence_vectors, user_item_matrix
import ctt_contracts as C

MONITOR = "val/recall_at_100"  # metric_key("val/recall@100")
NO_CONTEXT_PREFIX, SERVED_PREFIX, BOTH_MODES_PREFIX = "val_no_context/", "val_served/", "val_both/"
ITEM_INITS = ("random", "cooccurrence")
# The context a training example is scored with: "pseudo" = the label's own categories (seed
# 000: the log has no real context); "real" = the logged or derived subject item where the
# example has one, else none; "mixed" = real where there is one, else pseudo.
TRAIN_CONTEXTS = ("pseudo", "real", "mixed")
OBJECTIVES = ("last_item", "all_positions")


def id_gate(item_counts: torch.Tensor, k: float, floor: float = 0.0) -> torch.Tensor:
    """(N,) training label counts -> (N,) weight of each item's id embedding,
    floor + (1 - floor) * count / (count + k).

    Why: on a real log most items converted at serving time were never converted in training;
    their id vectors are noise (random rows or other items' rows through hash collisions), so an
    unseen item should be represented by its categories alone and an item with many conversions
    mostly by its own id. k = 0 disables the gate (every id at full weight).

    Why a floor: at 0 every unseen item of a leaf gets the same embedding, so the subject item
    itself ties with all its unseen siblings and, in a leaf of more than k items, the tie's
    expected rank falls outside the top k. A small share of its own id keeps the subject
    (whose embedding is part of the query) first among them and moves the others little.
    """
    if k < 0:
        raise ValueError(f"id_gate_k must be >= 0, got {k}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"id_gate_floor must be in [0, 1], got {floor}")
    counts = item_counts.to(torch.float32)
    return torch.ones_like(counts) if k == 0 else floor + (1.0 - floor) * counts / (counts + k)


def sampled_softmax_loss(user_emb: torch.Tensor, cand_emb: torch.Tensor, cand_rows: torch.Tensor,
                         pos_rows: torch.Tensor, pos_col: torch.Tensor, log_q: torch.Tensor,
                         temperature: torch.Tensor | float) -> torch.Tensor:
    """logQ-corrected sampled softmax.

    user_emb (B, D), cand_emb (M, D) candidate item embeddings, cand_rows (M,) catalog row of each
    candidate, pos_rows (B,) catalog row of each example's positive, pos_col (B,) column of the
    positive among the candidates, log_q (M,) log of the candidate's expected sampling count
    (already multiplied by any logQ weight; zeros = no correction). Returns the mean loss.
    """
    logits = user_emb @ cand_emb.T / temperature - log_q.unsqueeze(0)  # (B, M)
    hit = cand_rows.unsqueeze(0) == pos_rows.unsqueeze(1)  # (B, M): same item as the positive
    hit[torch.arange(hit.shape[0], device=hit.device), pos_col] = False  # but not the positive
    logits = logits.masked_fill(hit, -math.inf)
    return F.cross_entropy(logits, pos_col)


def full_softmax_loss(user_emb: torch.Tensor, item_emb: torch.Tensor, pos_rows: torch.Tensor,
                      temperature: torch.Tensor | float) -> torch.Tensor:
    """Softmax over the whole catalog: user_emb (P, D), item_emb (N, D), pos_rows (P,) -> mean loss.

    The temperature divides the (P, D) queries, not the (P, N) logits: the same scores, one pass
    over P x D numbers instead of two over P x N (forward and backward). With P in the tens of
    thousands (every position of a batch) and N in the thousands, the logits are the step's
    largest tensor and most of its memory traffic, so it is never stored whole
    (``models.softmax.linear_cross_entropy``).
    """
    return linear_cross_entropy(user_emb / temperature, item_emb, pos_rows)


def next_item_targets(history_rows: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
    """What each position of a history predicts: the next history event, the label at the last.

    history_rows (B, L) catalog rows of a left-padded history (-1 = padding or not in the
    catalog), label_rows (B,) -> (B, L) target rows; -1 (no example there) where the position's
    own row is -1 (padding, or an item outside the catalog) or its target has none.
    """
    nxt = torch.cat([history_rows[:, 1:], label_rows.unsqueeze(1)], dim=1)  # (B, L)
    return torch.where(history_rows >= 0, nxt, torch.full_like(nxt, -1))  # (B, L)


def uniform_negatives_loss(user_emb: torch.Tensor, pos_emb: torch.Tensor, pos_rows: torch.Tensor,
                           neg_emb: torch.Tensor, neg_rows: torch.Tensor,
                           temperature: torch.Tensor | float) -> torch.Tensor:
    """Softmax of each positive against negatives shared by the batch, drawn uniformly.

    user_emb (P, D), pos_emb (P, D) and pos_rows (P,) the positives, neg_emb (U, D) and
    neg_rows (U,) the negatives. A uniform proposal's logQ is the same for every negative and
    cancels, so none is applied; a negative that is the row's own positive is masked out.
    """
    pos_logit = (user_emb * pos_emb).sum(-1, keepdim=True) / temperature  # (P, 1)
    neg_logit = (user_emb @ neg_emb.T / temperature).masked_fill(
        neg_rows.unsqueeze(0) == pos_rows.unsqueeze(1), -math.inf)  # (P, U)
    logits = torch.cat([pos_logit, neg_logit], dim=1)  # (P, 1 + U)
    return F.cross_entropy(logits, torch.zeros(pos_rows.shape[0], dtype=torch.long,
                                               device=logits.device))


class ContextualRetrievalSystem(pl.LightningModule):
    """Trains ContextualTwoTower; expects ContextualSequenceDataModule as trainer.datamodule
    (catalog + item frequencies come from it in ``setup``)."""

    def __init__(self, model_config: ModelConfig = ModelConfig(), lr: float = 3e-3,
                 weight_decay: float = 1e-4, embedding_weight_decay: float = 0.0, temperature: float = 0.05,
                 learn_temperature: bool = True, n_uniform_negatives: int = 512,
                 logq_correction: bool = True, logq_weight: float = 1.0,
                 history_drop_prob: float = 0.05, item_init: str = "random",
                 id_gate_k: float = 0.0, id_gate_floor: float = 0.0, train_context: str = "pseudo",
                 eval_ks: Sequence[int] = DEFAULT_KS, eval_chunk_size: int = 1024,
                 objective: str = "last_item", full_softmax: bool = False) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if item_init not in ITEM_INITS:
            raise ValueError(f"item_init must be one of {ITEM_INITS}, got {item_init!r}")
        if train_context not in TRAIN_CONTEXTS:
            raise ValueError(f"train_context must be one of {TRAIN_CONTEXTS}, got {train_context!r}")
        if isinstance(model_config, dict):  # load_from_checkpoint passes the saved dict back
            model_config = ModelConfig.from_dict(model_config)
        self.config = model_config
        if objective == "all_positions" and (self.config.use_context or self.config.state_len != 1):
            raise ValueError("objective='all_positions' trains the sequence encoder's every position: "
                             "it needs use_context=False (a context belongs to one example) and "
                             f"state_len=1, got use_context={self.config.use_context}, "
                             f"state_len={self.config.state_len}")
        self.save_hyperparameters(ignore=["model_config"])
        self.hparams["model_config"] = self.config.to_dict()  # JSON-friendly, no pickled classes
        self.model = ContextualTwoTower(self.config)
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.catalog: Optional[Catalog] = None
        self.item_freq: Optional[torch.Tensor] = None
        self.id_gate: Optional[torch.Tensor] = None  # (N,) see id_gate(); None = every id at full weight
        self.eval_ks = tuple(eval_ks)
        self._catalog_emb: Optional[torch.Tensor] = None
        self.val_metrics: Optional[nn.Module] = None
        self.val_metrics_no_ctx: Optional[nn.Module] = None
        self.val_metrics_served: Optional[nn.Module] = None

    # ------------------------------------------------------------------ wiring
    def attach_data(self, catalog: Catalog, item_freq: torch.Tensor,
                    item_counts: Optional[torch.Tensor] = None) -> None:
        """Catalog tensors, training label frequencies (N,) used by loss and validation, and the
        raw training label counts (N,) the id gate is computed from (None = no gate)."""
        if item_freq.shape != (len(catalog),):
            raise ValueError(f"item_freq must be ({len(catalog)},), got {tuple(item_freq.shape)}")
        self.catalog, self.item_freq = catalog, item_freq.float()
        if item_counts is not None and self.hparams.id_gate_k > 0:
            self.id_gate = id_gate(item_counts, self.hparams.id_gate_k, self.hparams.id_gate_floor)
        self.val_metrics = retrieval_metrics(len(catalog), self.eval_ks).clone(prefix="val/")
        self.val_metrics_no_ctx = retrieval_metrics(len(catalog), self.eval_ks).clone(
            prefix=NO_CONTEXT_PREFIX)
        # What serving sees: the logged subject item's categories where there is one, else none.
        self.val_metrics_served = retrieval_metrics(len(catalog), self.eval_ks).clone(prefix=SERVED_PREFIX)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.catalog is None:
            if dm is None or not hasattr(dm, "item_frequencies"):
                raise RuntimeError("ContextualRetrievalSystem needs a ContextualSequenceDataModule "
                                   "(or call attach_data before fitting)")
            self.attach_data(dm.catalog, dm.item_frequencies(), dm.item_counts)
        if stage == "fit" and self.hparams.item_init == "cooccurrence" and dm is not None:
            # A resumed run's checkpoint overwrites these weights after setup, so this is harmless
            # there; the SVD itself is deterministic, so every DDP rank writes the same table.
            self.warm_start_item_embeddings(dm.splits[C.SPLIT_TRAIN])

    def warm_start_item_embeddings(self, train: Dict[str, torch.Tensor]) -> None:
        """Item id embeddings <- co-occurrence vectors of the training examples (see warm_start)."""
        matrix = user_item_matrix(train[C.USER_ID].numpy(), self.catalog.find_rows(train[C.ITEM_IDS].numpy()),
                                  train[LABEL_ROW].numpy(), len(self.catalog))
        vectors = cooccurrence_vectors(matrix, self.config.dim)  # (N, D)
        self.model.warm_start_item_embeddings(self.catalog.item_ids, vectors)

    def on_fit_start(self) -> None:
        """DDP: every rank must rank against the same catalog and apply the same logQ. Each rank
        reads the lake itself, so a commit landing between two ranks' reads would silently give
        them different item frequencies; compare a fingerprint and refuse to train if they differ."""
        if self.trainer.world_size < 2:
            return
        ids = self.catalog.item_ids.to(torch.float64)
        rows = torch.arange(len(self.catalog), dtype=torch.float64)
        freq = self.item_freq.to(torch.float64)
        mine = torch.stack([torch.tensor(float(len(self.catalog)), dtype=torch.float64), ids.sum(),
                            freq.sum(), (freq * rows).sum()]).to(self.device)  # (4,)
        every = self.all_gather(mine)  # (world, 4)
        if not torch.equal(every, mine.unsqueeze(0).expand_as(every)):
            raise RuntimeError(f"rank {self.global_rank}: catalog / item frequencies differ across DDP "
                               f"ranks ({every.tolist()}); the lake changed while the ranks read it")

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.01, 1.0)

    # ------------------------------------------------------------------ model calls
    def user_embeddings(self, batch: Dict[str, torch.Tensor], context: str = "pseudo",
                        state: Optional[torch.Tensor] = None,
                        item_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) user embeddings; context = "pseudo" | "real" | "none" (empty context) |
        "train" (what ``train_context`` selects). ``item_emb`` (N, D): catalog embeddings to take
        the subject item's from (computed for the subject rows if None)."""
        ctx_ids, ctx_w, subject_rows = self.context_for(batch, context)
        if state is None:
            state = self.model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS])
        subject = self.subject_embeddings(subject_rows, item_emb)
        return self.model.query_from_state(state, ctx_ids, ctx_w, batch[C.AGE_BUCKET],
                                           batch[C.COUNTRY], batch[C.GENDER], subject)

    def context_for(self, batch: Dict[str, torch.Tensor],
                    context: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(ctx_ids (B, C), ctx_weights (B, C), subject catalog rows (B,) with -1 = none, or None)."""
        if context == "train":
            context = self.hparams.train_context
            if context != "pseudo":
                return mixed_context(batch, fallback="pseudo" if context == "mixed" else "none")
        ids, w = context_inputs(batch, context)
        return ids, w, batch.get(SUBJECT_ROW) if context == "real" else None

    def subject_embeddings(self, subject_rows: Optional[torch.Tensor],
                           item_emb: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """subject rows (B,) (-1 = none) -> (B, D) item-tower embeddings, zero rows for none;
        None when the model does not use the subject item."""
        if subject_rows is None or not self.config.use_subject_item:
            return None
        if item_emb is None:
            return rows_or_zero(self.catalog_embeddings(subject_rows.clamp(min=0)), subject_rows)
        return rows_or_zero(item_emb[subject_rows.clamp(min=0)], subject_rows)

    def catalog_embeddings(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Item-tower embeddings of catalog rows (all rows if None): (N, D)."""
        cat = self.catalog
        rows = torch.arange(len(cat)) if rows is None else rows.cpu()
        gate = None if self.id_gate is None else self.id_gate[rows].to(self.device)
        return self.model.item_embeddings(cat.item_ids[rows].to(self.device),
                                          cat.cat_ids[rows].to(self.device),
                                          cat.cat_weights[rows].to(self.device), gate)

    def training_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole training objective of one batch (also used by the plain-torch benchmark)."""
        hp = self.hparams
        if hp.objective == "all_positions":
            return self.all_positions_loss(batch)
        b = batch[LABEL_ROW].shape[0]
        state = self.model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS])  # (B, S)
        if hp.history_drop_prob > 0:
            drop = torch.rand(b, 1, device=state.device) < hp.history_drop_prob  # (B, 1)
            state = torch.where(drop, self.model.cold_start_state(b), state)
        user = self.user_embeddings(batch, "train", state=state)  # (B, D)
        if hp.full_softmax:
            return full_softmax_loss(user, self.catalog_embeddings(), batch[LABEL_ROW], self.temperature)
        n_items = len(self.catalog)
        uniform = torch.randint(0, n_items, (hp.n_uniform_negatives,))  # (U,)
        cand_rows = torch.cat([batch[LABEL_ROW].cpu(), uniform])  # (M,) = (B + U,)
        cand = self.catalog_embeddings(cand_rows)  # (M, D)
        cand_rows, cand, first_pos = self._global_in_batch_negatives(cand_rows, cand, b)
        n_in_batch = cand_rows.shape[0] - hp.n_uniform_negatives  # B x world size
        if hp.logq_correction:
            expected = n_in_batch * self.item_freq[cand_rows] + hp.n_uniform_negatives / n_items  # (M,)
            log_q = hp.logq_weight * expected.log()
        else:
            log_q = torch.zeros(cand_rows.shape[0])
        pos_col = first_pos + torch.arange(b, device=self.device)
        return sampled_softmax_loss(user, cand, cand_rows.to(self.device), batch[LABEL_ROW], pos_col,
                                    log_q.to(self.device), self.temperature)

    def all_positions_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-item prediction at every position of each row's history + label.

        Input = the history (B, L); position t is scored against history[t + 1], the last position
        against the label (``next_item_targets``), so a row with n history events gives n
        examples, all from one causal pass. ``history_drop_prob`` replaces a position's state by
        the cold-start state; demographics are the row's. Mean over the P positions.
        """
        hp = self.hparams
        items, ts = trim_left_padding(batch[C.ITEM_IDS], batch[C.EVENT_TS])  # (B, L')
        hidden, _ = self.model.encode_positions(items, ts)  # (B, L', D)
        rows = torch.as_tensor(self.catalog.find_rows(items.cpu().numpy()),
                               device=items.device)  # (B, L') catalog rows, -1 pad
        target = next_item_targets(rows, batch[LABEL_ROW])  # (B, L')
        where = (target >= 0).nonzero(as_tuple=True)  # P positions
        if where[0].numel() == 0:  # only empty histories: no example in this batch
            return hidden.sum() * 0.0
        state = hidden[where]  # (P, D)
        if hp.history_drop_prob > 0:
            drop = torch.rand(state.shape[0], 1, device=state.device) < hp.history_drop_prob  # (P, 1)
            state = torch.where(drop, self.model.cold_start_state(state.shape[0]), state)
        row = where[0]  # (P,) the batch row of each position
        user = self.model.query_from_state(state, None, None, batch[C.AGE_BUCKET][row],
                                           batch[C.COUNTRY][row], batch[C.GENDER][row])  # (P, D)
        pos_rows = target[where]  # (P,)
        if hp.full_softmax:
            return full_softmax_loss(user, self.catalog_embeddings(), pos_rows, self.temperature)
        neg_rows = torch.randint(0, len(self.catalog), (hp.n_uniform_negatives,))  # (U,)
        cand = self.catalog_embeddings(torch.cat([pos_rows.cpu(), neg_rows]))  # (P + U, D)
        p = pos_rows.shape[0]
        return uniform_negatives_loss(user, cand[:p], pos_rows, cand[p:], neg_rows.to(self.device),
                                      self.temperature)

    def _global_in_batch_negatives(self, cand_rows: torch.Tensor, cand: torch.Tensor,
                                   b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """DDP: every rank's positives become in-batch negatives for every rank, so 2 ranks x 32
        train the same objective as one process with 64 (not two half-size softmaxes).

        cand_rows (B + U,) / cand (B + U, D): this rank's positives then the uniform negatives
        (the same U items on every rank: same seed, same draws). Returns (W*B + U,) rows,
        (W*B + U, D) embeddings (the gather passes gradients back to each owner rank) and the
        column of this rank's first positive. Outside DDP: unchanged, column 0.
        """
        if self._trainer is None or self.trainer.world_size < 2:
            return cand_rows, cand, 0
        pos_emb = self.all_gather(cand[:b], sync_grads=True).flatten(0, 1)  # (W*B, D)
        pos_rows = self.all_gather(cand_rows[:b].to(self.device)).flatten(0, 1).cpu()  # (W*B,)
        return (torch.cat([pos_rows, cand_rows[b:]]), torch.cat([pos_emb, cand[b:]]),
                self.global_rank * b)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch[LABEL_ROW].shape[0], sync_dist=True)  # DDP: mean over ranks
        self.log("train/temperature", self.temperature, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._catalog_emb = self.catalog_embeddings()  # (N, D), once per validation pass

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        state = self.model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS])
        exclude = batch.get(EXCLUDE_ROWS)  # (B, H) the user's history rows (-1 pad), or None
        outside = batch[LABEL_ROW] < 0  # (B,) target without a catalog row: a miss
        target = batch[LABEL_ROW].clamp(min=0)  # (B,) any column for those; their rank is replaced
        passes = (("pseudo", self.val_metrics), ("none", self.val_metrics_no_ctx),
                  ("real", self.val_metrics_served))
        ranked = None
        for context, metrics in passes:
            # Without a context layer every pass gives the same embedding: rank once.
            if ranked is None or self.config.use_context:
                user = self.user_embeddings(batch, context, state=state, item_emb=self._catalog_emb)  # (B, D)
                ranks, top = rank_targets(user, self._catalog_emb, target, exclude=exclude,
                                          top_k=COVERAGE_K, chunk_size=self.hparams.eval_chunk_size)
                missed = TiedRanks(ranks.greater.masked_fill(outside, len(self.catalog)),
                                   ranks.ties.masked_fill(outside, 0))  # a target outside the catalog: a miss
                ranked = (missed, top)  # (B,) ranks, (B, K)
            metrics.update(ranks=ranked[0], top_items=ranked[1])

    def on_validation_epoch_end(self) -> None:
        computed = []
        for metrics in (self.val_metrics, self.val_metrics_no_ctx, self.val_metrics_served):
            # compute() already summed the metric states over DDP ranks, so every rank holds the
            # global value; sync_dist only tells Lightning so (a mean of equal values).
            computed.append(metrics.compute())
            self.log_dict({metric_key(k): v for k, v in computed[-1].items()}, sync_dist=True)
            metrics.reset()
        self.log_dict(both_modes(computed[1], computed[2]), sync_dist=True)
        self._catalog_emb = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW: ``weight_decay`` on the dense layers, ``embedding_weight_decay`` on the id and
        category tables (the parameters that can memorise rare ids), none on norms, biases and
        the temperature."""
        groups: Dict[str, list] = {"dense": [], "embedding": [], "none": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None, nn.Embedding):
                groups["embedding"].append(p)
            elif p.ndim < 2:
                groups["none"].append(p)
            else:
                groups["dense"].append(p)
        hp = self.hparams
        return torch.optim.AdamW([{"params": groups["dense"], "weight_decay": hp.weight_decay},
                                  {"params": groups["embedding"], "weight_decay": hp.embedding_weight_decay},
                                  {"params": groups["none"], "weight_decay": 0.0}], lr=hp.lr)


def both_modes(no_context: Dict[str, torch.Tensor],
               served: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Computed validation metrics {"val_no_context/recall@100": v, ...} and {"val_served/...": v}
    -> their mean per metric, as logger keys {"val_both/recall_at_100": v, ...}.

    Why: one model serves requests with a subject item and requests without one, so the
    checkpoint is chosen on both. Chosen on the served metric alone, the realistic worlds kept
    the second epoch, which had lost a third of the first epoch's no-context recall for ~1 % of
    served recall (models peak after one or two epochs there and then overfit)."""
    out = {}
    for key, value in served.items():
        name = key.split("/", 1)[1]
        out[metric_key(f"{BOTH_MODES_PREFIX}{name}")] = (value + no_context[f"{NO_CONTEXT_PREFIX}{name}"]) / 2
    return out


def context_inputs(batch: Dict[str, torch.Tensor], context: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The context tensors of a batch: "pseudo", "real" or "none" (all padding = no context)."""
    ids, w = batch[C.CONTEXT_CATEGORY_IDS], batch[C.CONTEXT_WEIGHTS]
    if context == "pseudo":
        return ids, w
    if context == "real":
        return batch[REAL_CONTEXT_IDS], batch[REAL_CONTEXT_WEIGHTS]
    if context == "none":
        return torch.full_like(ids, features.PAD_CATEGORY), torch.zeros_like(w)
    raise ValueError(f"context must be pseudo, real or none; got {context!r}")


def rows_or_zero(emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """emb (B, D) looked up at ``rows.clamp(min=0)``, rows (B,) with -1 = none -> (B, D) with the
    rows of "none" zeroed (a zero subject embedding is "no subject item")."""
    return emb * (rows >= 0).unsqueeze(-1).to(emb.dtype)


def mixed_context(batch: Dict[str, torch.Tensor],
                  fallback: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Real context (and subject row) where the example has one, else ``fallback`` ("pseudo" or
    "none"): ids (B, C), weights (B, C), subject rows (B,) with -1 where there is none."""
    fb_ids, fb_w = context_inputs(batch, fallback)
    if HAS_REAL_CONTEXT not in batch:
        return fb_ids, fb_w, None
    has = batch[HAS_REAL_CONTEXT].bool()  # (B,)
    ids = torch.where(has.unsqueeze(1), batch[REAL_CONTEXT_IDS], fb_ids)  # (B, C)
    w = torch.where(has.unsqueeze(1), batch[REAL_CONTEXT_WEIGHTS], fb_w)  # (B, C)
    subject = batch.get(SUBJECT_ROW)
    if subject is not None:
        subject = torch.where(has, subject, torch.full_like(subject, -1))  # (B,)
    return ids, w, subject
