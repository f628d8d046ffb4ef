"""The losses against hand computations: the logQ-corrected sampled softmax (3 users x 4
candidates) and the full-catalog softmax (2 positions x 3 items)."""
from __future__ import annotations

import math

import pytest
import torch

from models.system import full_softmax_loss, sampled_softmax_loss


def test_sampled_softmax_matches_hand_computation():
    # 3 examples; candidates = their 3 labels (in-batch) + 1 uniform negative.
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    cand_rows = torch.tensor([10, 11, 10, 12])  # examples 0 and 2 share the label item 10
    pos_rows = torch.tensor([10, 11, 10])
    pos_col = torch.tensor([0, 1, 2])
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.5, 0.1]))
    tau = 0.5

    dots = [[1.0, 0.0, 1.0, 0.8], [0.0, 1.0, 0.0, 0.6], [0.6, 0.8, 0.6, 0.96]]
    q = [0.5, 0.2, 0.5, 0.1]
    # accidental hits: the same item as the row's positive in another column is removed
    masked = {(0, 2), (2, 0)}
    expected = 0.0
    for i in range(3):
        logits = [dots[i][j] / tau - math.log(q[j]) for j in range(4)]
        denom = sum(math.exp(v) for j, v in enumerate(logits) if (i, j) not in masked)
        expected += -(logits[pos_col[i]] - math.log(denom))
    expected /= 3

    loss = sampled_softmax_loss(user, cand, cand_rows, pos_rows, pos_col, log_q, tau)
    assert abs(loss.item() - expected) < 1e-5

    # without the correction the popular candidates are not discounted: a different loss
    plain = sampled_softmax_loss(user, cand, cand_rows, pos_rows, pos_col, torch.zeros(4), tau)
    assert abs(plain.item() - expected) > 1e-2


def test_full_softmax_matches_hand_computation_and_trains_the_temperature():
    user = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    pos_rows = torch.tensor([2, 1])
    log_t = torch.tensor(math.log(0.5), requires_grad=True)
    dots = [[1.0, 0.0, 0.8], [0.6, 0.8, 0.96]]
    expected = sum(math.log(sum(math.exp(v / 0.5) for v in dots[i])) - dots[i][pos_rows[i]] / 0.5
                   for i in range(2)) / 2

    loss = full_softmax_loss(user, items, pos_rows, log_t.exp())
    assert abs(loss.item() - expected) < 1e-5
    loss.backward()
    assert log_t.grad is not None and log_t.grad.abs().item() > 1e-4


def test_loss_gradient_flows_to_both_towers():
    user = torch.randn(4, 8, requires_grad=True)
    cand = torch.randn(6, 8, requires_grad=True)
    loss = sampled_softmax_loss(torch.nn.functional.normalize(user, dim=-1),
                                torch.nn.functional.normalize(cand, dim=-1), torch.arange(6),
                                torch.arange(4), torch.arange(4), torch.zeros(6), 0.1)
    loss.backward()
    assert user.grad.abs().sum() > 0 and cand.grad.abs().sum() > 0


def test_id_gate_is_count_over_count_plus_k():
    from models.system import id_gate

    counts = torch.tensor([0.0, 1.0, 3.0, 9.0])
    assert torch.allclose(id_gate(counts, 1.0), torch.tensor([0.0, 0.5, 0.75, 0.9]))
    assert torch.equal(id_gate(counts, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match="id_gate_k"):
        id_gate(counts, -1.0)


def test_id_gate_floor_keeps_a_share_of_every_id():
    """floor + (1 - floor) * count / (count + k): an unseen item keeps the floor, a frequent one
    still tends to 1; without a gate (k = 0) the floor changes nothing."""
    from models.system import id_gate

    counts = torch.tensor([0.0, 1.0, 3.0, 9.0])
    assert torch.allclose(id_gate(counts, 1.0, 0.1), torch.tensor([0.1, 0.55, 0.775, 0.91]))
    assert torch.equal(id_gate(counts, 0.0, 0.1), torch.ones(4))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="id_gate_floor"):
            id_gate(counts, 1.0, bad)


def test_mixed_context_takes_real_context_and_subject_where_the_example_has_one():
    from models.data import HAS_REAL_CONTEXT, REAL_CONTEXT_IDS, REAL_CONTEXT_WEIGHTS, SUBJECT_ROW
    from models.system import mixed_context
    import ctt_contracts as C

    batch = {
        C.CONTEXT_CATEGORY_IDS: torch.tensor([[1, 2], [3, -1]]),
        C.CONTEXT_WEIGHTS: torch.tensor([[0.5, 0.5], [1.0, 0.0]]),
        REAL_CONTEXT_IDS: torch.tensor([[7, -1], [-1, -1]]),
        REAL_CONTEXT_WEIGHTS: torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        HAS_REAL_CONTEXT: torch.tensor([True, False]),
        SUBJECT_ROW: torch.tensor([4, 9]),
    }
    ids, w, subject = mixed_context(batch, fallback="pseudo")
    assert ids.tolist() == [[7, -1], [3, -1]] and w.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert subject.tolist() == [4, -1]
    ids, w, subject = mixed_context(batch, fallback="none")
    assert ids.tolist() == [[7, -1], [-1, -1]] and w[1].tolist() == [0.0, 0.0]


def test_both_modes_is_the_mean_of_the_served_and_no_context_passes():
    from models.system import both_modes

    no_context = {"val_no_context/recall@100": torch.tensor(0.06), "val_no_context/mrr": torch.tensor(0.02)}
    served = {"val_served/recall@100": torch.tensor(0.62), "val_served/mrr": torch.tensor(0.10)}
    both = both_modes(no_context, served)
    assert both.keys() == {"val_both/recall_at_100", "val_both/mrr"}
    assert both["val_both/recall_at_100"].item() == pytest.approx(0.34)
    assert both["val_both/mrr"].item() == pytest.approx(0.06)


def test_the_contextual_config_selects_on_both_serving_modes():
    """The checkpoint and the early stop of configs/contextual.yaml read the metric both_modes logs."""
    from pathlib import Path

    import yaml

    from models.metrics import metric_key
    from models.system import BOTH_MODES_PREFIX

    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "contextual.yaml").read_text())
    monitors = {cb["init_args"]["monitor"] for cb in config["trainer"]["callbacks"]}
    assert monitors == {metric_key(f"{BOTH_MODES_PREFIX}recall@100")}
