"""The chunked catalog cross-entropy against torch's: same loss and gradients, whatever the
chunking, and only the gradients that are asked for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.softmax import linear_cross_entropy


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_loss_and_gradients_match_torch_cross_entropy(chunk_rows):
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(19, 5, generator=gen, requires_grad=True)  # 19 rows: a ragged last chunk
    items = torch.randn(11, 5, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (19,), generator=gen)
    upstream = 2.5  # the loss scaled after the call (a loss weight) scales both gradients

    (upstream * F.cross_entropy(query @ items.T, targets)).backward()
    want_loss = F.cross_entropy(query @ items.T, targets).item()
    want_q, want_i = query.grad.clone(), items.grad.clone()
    query.grad, items.grad = None, None

    loss = linear_cross_entropy(query, items, targets, chunk_rows=chunk_rows)
    (upstream * loss).backward()
    assert loss.item() == pytest.approx(want_loss, abs=1e-5)
    assert torch.allclose(query.grad, want_q, atol=1e-6)
    assert torch.allclose(items.grad, want_i, atol=1e-6)


def test_gradient_reaches_a_temperature_through_the_query_and_none_is_made_for_frozen_items():
    log_t = torch.tensor(-1.0, requires_grad=True)
    query = torch.randn(6, 4)
    items = torch.randn(9, 4)  # frozen: no gradient wanted
    targets = torch.tensor([0, 3, 8, 8, 1, 2])
    loss = linear_cross_entropy(query / log_t.exp(), items, targets)
    loss.backward()
    ref_t = torch.tensor(-1.0, requires_grad=True)
    F.cross_entropy(query / ref_t.exp() @ items.T, targets).backward()
    assert log_t.grad.item() == pytest.approx(ref_t.grad.item(), rel=1e-5)
    assert items.grad is None


def test_without_autograd_it_is_the_plain_loss():
    query, items = torch.randn(5, 3), torch.randn(4, 3)
    targets = torch.tensor([3, 0, 1, 1, 2])
    with torch.no_grad():
        loss = linear_cross_entropy(query, items, targets, chunk_rows=2)
    assert loss.item() == pytest.approx(F.cross_entropy(query @ items.T, targets).item(), abs=1e-6)


def test_a_target_outside_the_items_is_refused():
    with pytest.raises(ValueError, match="targets must be rows"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 4]))


def test_logits_spread_far_beyond_the_exp_floor_give_the_exact_loss_and_gradients():
    # A trained model's logits span hundreds (low temperature, large item norms): the floor on
    # the shifted logits must not move the loss or the gradients against a float64 reference.
    gen = torch.Generator().manual_seed(1)
    query64 = (torch.randn(9, 4, generator=gen, dtype=torch.float64) * 100).requires_grad_()
    items64 = torch.randn(13, 4, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 13, (9,), generator=gen)
    ref = F.cross_entropy(query64 @ items64.T, targets)
    ref.backward()
    spread = (query64 @ items64.T).detach()
    assert (spread.max(1).values - spread.min(1).values).min() > 150  # far past the floor of 80

    query = query64.detach().float().requires_grad_()
    items = items64.detach().float().requires_grad_()
    loss = linear_cross_entropy(query, items, targets, chunk_rows=4)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(query.grad.double(), query64.grad, atol=1e-5)
    assert torch.allclose(items.grad.double(), items64.grad, atol=1e-5)
