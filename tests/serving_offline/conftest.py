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




@pytest.fixture
def small_delta_snapshots(spark):
    """Rebuild Delta snapshots with 2 tasks instead of Delta's default 50 while a test runs.

    Every new table version read by Spark replays the log in `snapshotPartitions` tasks; on the
    tiny test tables 50 tasks cost ~30 s per version on a loaded 2-core machine, 2 tasks ~1 s.
    (pipelines.delta_io.tune_local_delta does the same for the jobs; this restores the value.)
    """
    from pipelines.delta_io import LOCAL_SNAPSHOT_PARTITIONS, SNAPSHOT_PARTITIONS_CONF
    from pipelines.spark import session_settings

    with session_settings(spark, {SNAPSHOT_PARTITIONS_CONF: LOCAL_SNAPSHOT_PARTITIONS}):
        yield
