"""use_item_categories / use_time_gaps: switched off, the towers ignore that information (the
MovieLens head-to-head's "item ids and positions only"); switched on (the default), they read it."""
from __future__ import annotations

import torch


def item_inputs(n: int = 5):
    ids = torch.arange(10, 10 + n)
    cats = torch.tensor([[1, 2], [3, -1], [4, 5], [6, -1], [-1, -1]])[:n]
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3], [1.0, 0.0], [0.0, 0.0]])[:n]
    return ids, cats, weights


def test_item_tower_without_categories_ignores_them(tiny_config):
    from models.two_tower import ContextualTwoTower

    torch.manual_seed(0)
    ids, cats, w = item_inputs()
    other = torch.tensor([[7, 8], [9, -1], [11, 12], [13, -1], [14, -1]])
    other_w = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    off = ContextualTwoTower(tiny_config(use_item_categories=False)).eval()
    assert torch.equal(off.item_embeddings(ids, cats, w), off.item_embeddings(ids, other, other_w))
    on = ContextualTwoTower(tiny_config()).eval()
    assert not torch.allclose(on.item_embeddings(ids, cats, w), on.item_embeddings(ids, other, other_w))


def test_encoder_without_time_gaps_ignores_timestamps(tiny_config, random_inputs):
    from models.two_tower import ContextualTwoTower

    torch.manual_seed(0)
    config = tiny_config(use_time_gaps=False, use_context=False, use_demographics=False)
    items, ts, *_ = random_inputs(config)
    stretched = torch.where(items >= 0, ts * 3 + 12345, ts)  # other gaps, same order
    off = ContextualTwoTower(config).eval()
    assert off.encoder.time_gap is None
    assert torch.equal(off.encode_user_state(items, ts), off.encode_user_state(items, stretched))
    on = ContextualTwoTower(tiny_config(use_context=False, use_demographics=False)).eval()
    assert not torch.allclose(on.encode_user_state(items, ts), on.encode_user_state(items, stretched))


def test_switches_default_on_and_survive_the_config_round_trip(tiny_config):
    from models.two_tower import ModelConfig

    assert ModelConfig().use_item_categories and ModelConfig().use_time_gaps
    config = tiny_config(use_item_categories=False, use_time_gaps=False)
    assert ModelConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in config.to_dict().items() if k not in ("use_item_categories", "use_time_gaps")}
    assert ModelConfig.from_dict(old).use_time_gaps  # a bundle written before the switches
