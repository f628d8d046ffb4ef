"""The logQ-corrected sampled softmax against a hand computation (3 users x 4 candidates)."""
from __future__ import annotations

import math

import torch

from models.system import sampled_softmax_loss


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


def test_loss_gradient_flows_to_both_towers():
    user = torch.randn(4, 8, requires_grad=True)
    cand = torch.randn(6, 8, requires_grad=True)
    loss = sampled_softmax_loss(torch.nn.functional.normalize(user, dim=-1),
                                torch.nn.functional.normalize(cand, dim=-1), torch.arange(6),
                                torch.arange(4), torch.arange(4), torch.zeros(6), 0.1)
    loss.backward()
    assert user.grad.abs().sum() > 0 and cand.grad.abs().sum() > 0
