"""models.averaging.WeightEMA against a hand computation on a one-parameter model."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from models.averaging import WeightEMA


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
    ema = raw[0]  # the first update copies the weights
    for w in raw[1:]:
        ema = decay * ema + (1 - decay) * w
    assert model.w.item() == pytest.approx(ema, abs=1e-5)  # fit ends on the average
    assert torch.equal(model.ids, torch.tensor([3, 1_000_000_007]))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(decay)
