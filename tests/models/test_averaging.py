"""models.averaging.WeightEMA against hand computations of the bias-corrected EMA."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from models.averaging import WeightEMA, ema_lerp_weight


class Line(pl.LightningModule):
    """loss = w: every SGD step with lr 1 lowers w by exactly 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(10.0))
        self.register_buffer("ids", torch.tensor([3, 1_000_000_007]))  # integer constant

    def training_step(self, batch, batch_idx):
        return self.w * 1.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_the_average_after_fit_is_the_hand_computed_ema(tmp_path):
    decay, steps = 0.9, 7
    model = Line()
    trainer = pl.Trainer(max_epochs=1, callbacks=[WeightEMA(decay)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(range(steps), batch_size=1))
    raw = [10.0 - t for t in range(1, steps + 1)]  # w after each step
    m = 0.0  # Adam-style EMA from zero, then its bias correction
    for w in raw:
        m = decay * m + (1 - decay) * w
    assert model.w.item() == pytest.approx(m / (1 - decay ** steps), abs=1e-5)  # fit ends on the average
    assert torch.equal(model.ids, torch.tensor([3, 1_000_000_007]))


def test_the_lerp_weight_makes_the_average_a_normalised_decayed_sum():
    decay, w = 0.9, [4.0, -2.0, 7.0, 1.0]
    avg = w[0]
    for n, x in enumerate(w[1:], start=1):
        avg += ema_lerp_weight(decay, n) * (x - avg)
    weights = [decay ** (len(w) - 1 - i) for i in range(len(w))]
    assert avg == pytest.approx(sum(a * b for a, b in zip(weights, w)) / sum(weights))
    assert ema_lerp_weight(decay, 1) == pytest.approx(1 / (1 + decay))
    assert ema_lerp_weight(decay, 10_000) == pytest.approx(1 - decay)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(decay)
