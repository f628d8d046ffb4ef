"""Fixtures of the offline serving path: tiny real bundles exported with models.export.

The models are untrained (seeded init): batch-inference parity is a property of the code path,
not of the weights. Two bundles with different weights give two model_versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from offline_lake import tiny_catalog, tiny_config


@dataclass
class Bundles:
    first: Path
    second: Path  # same architecture, other weights -> other model_version


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> Bundles:
    from models.export import export_bundle
    from models.two_tower import ContextualTwoTower

    root = tmp_path_factory.mktemp("bundles")
    config, catalog = tiny_config(), tiny_catalog()
    paths = []
    for seed, name in ((0, "first"), (1, "second")):
        torch.manual_seed(seed)
        model = ContextualTwoTower(config).eval()
        paths.append(export_bundle(model, config, catalog, root / name, f"offline-test-{name}"))
    return Bundles(*paths)


