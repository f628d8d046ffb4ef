"""Exponential moving average of the weights, as a Lightning callback.

Validation, the checkpoints (and so the tested "best epoch") and the end of fit use the average;
the optimizer keeps stepping the raw weights, which each checkpoint carries beside it so a resumed
run continues from them (Lightning's ``WeightAveraging``).

Why a subclass rather than Lightning's ``EMAWeightAveraging``:
- that one averages tensor by tensor through ``get_ema_avg_fn`` (three temporaries and four passes
  per tensor): 11.6 ms per optimizer step for a 32,768 x 64 item table on one thread. This one
  averages all tensors at once with torch's in-place foreach lerp: 0.9 ms;
- that one averages buffers by default, and averaging the integer hash coefficients of the item
  embeddings in floating point corrupts them. Buffers here are never averaged (they are constants);
- that one starts from the weights after the first step and weighs them by ``decay ** t``: with
  decay 0.99, after one MovieLens-1M epoch (47 steps) 62 % of the average is still the
  first step's nearly random weights, and validation lags the raw weights by several epochs.
  This one is bias-corrected (``ema_lerp_weight``): the weights of every step seen so far,
  weighted by ``decay ** age`` and normalised, so the first step weighs 2 % after 47 steps.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from pytorch_lightning.callbacks import WeightAveraging


def ema_lerp_weight(decay: float, n_averaged: int) -> float:
    """The step towards the current weights when ``n_averaged`` >= 1 updates are already in the
    average: (1 - decay) / (1 - decay ** (n + 1)).

    Why: this keeps the average equal to the bias-corrected EMA (Adam's correction, ``m_t / (1 -
    decay ** t)`` with ``m_0 = 0``), i.e. sum_i decay ** (t - i) w_i / sum_i decay ** (t - i). It is
    1 / 2 at the second update, then falls towards 1 - decay within a few horizons."""
    return (1.0 - decay) / (1.0 - decay ** (n_averaged + 1))


TensorList = List[torch.Tensor]


def bias_corrected_ema_fn(decay: float) -> Callable[[TensorList, TensorList, torch.Tensor], None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: lerps all averaged tensors
    at once by ``ema_lerp_weight`` (AveragedModel copies the weights on the first update and
    passes the number of earlier updates)."""

    @torch.no_grad()
    def update(averaged: TensorList, current: TensorList, n_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, ema_lerp_weight(decay, int(n_averaged)))

    return update


class WeightEMA(WeightAveraging):
    """Bias-corrected EMA of the trainable weights, updated after every optimizer step with
    ``decay`` per step: the average's horizon is about ``1 / (1 - decay)`` steps."""

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=False, multi_avg_fn=bias_corrected_ema_fn(decay))
