"""Shared model-test fixtures: a tiny pandas-built Delta lake (no Spark) and tiny configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthetic_lake import FixtureSpec, write_lake
from models.two_tower import ModelConfig


@pytest.fixture(scope="session")
def tiny_lake(tmp_path_factory) -> Path:
    """300 users, 200 items, ~1.6k examples with pseudo + real context rows."""
    root = tmp_path_factory.mktemp("lake")
    write_lake(root, FixtureSpec())
    return root


def _tiny_config(**overrides) -> ModelConfig:
    values = dict(dim=16, n_layers=2, n_heads=2, max_len=8, item_buckets=256, category_buckets=32,
                  country_buckets=8, max_ctx=3, max_item_categories=4, mlp_hidden=32)
    values.update(overrides)
    return ModelConfig(**values)


def _random_inputs(config: ModelConfig, batch: int = 6, seed: int = 0):
    """(item_ids, event_ts, ctx_ids, ctx_w, age, country, gender) with some padding."""
    g = torch.Generator().manual_seed(seed)
    L = config.max_len
    items = torch.randint(0, 10_000, (batch, L), generator=g)
    lengths = torch.randint(0, L + 1, (batch,), generator=g)
    lengths[0] = L  # one full row
    lengths[1] = 1  # one single-event row
    pad = torch.arange(L).unsqueeze(0) < (L - lengths).unsqueeze(1)
    items = items.masked_fill(pad, -1)
    ts = torch.cumsum(torch.randint(60, 10**6, (batch, L), generator=g), dim=1) + 1_700_000_000
    ts = ts.masked_fill(pad, 0)
    ctx = torch.randint(0, 50, (batch, config.max_ctx), generator=g)
    w = torch.rand(batch, config.max_ctx, generator=g)
    ctx[-1] = -1  # last row: no context
    w[-1] = 0
    w = w / w.sum(1, keepdim=True).clamp(min=1e-9)
    age = torch.randint(0, 8, (batch,), generator=g)
    country = torch.randint(0, config.country_buckets, (batch,), generator=g)
    gender = torch.randint(0, 4, (batch,), generator=g)
    return items, ts, ctx, w, age, country, gender


@pytest.fixture
def tiny_config():
    """Factory: a small ModelConfig, fields overridable by keyword."""
    return _tiny_config


@pytest.fixture
def random_inputs():
    """Factory: random user-tower inputs for a config (padding, a no-context row)."""
    return _random_inputs
