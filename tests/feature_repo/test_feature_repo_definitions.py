"""feature_repo/definitions.py: the contracts and Feast only, no I/O at import, a clear error
without its environment. (The serving tests apply these same declarations.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ctt_contracts as C
from pipelines import feast_ops

DEFINITIONS = feast_ops.FEATURE_REPO / "definitions.py"


def test_imports_only_the_contracts_and_feast():
    tree = ast.parse(DEFINITIONS.read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"os", "datetime", "feast", "ctt_contracts"}, roots


def test_missing_lake_fails_with_what_to_export():
    with feast_ops.scoped_environ({C.ENV_LAKE: None}):
        with pytest.raises(RuntimeError, match=f"(?s){C.ENV_LAKE} is not set.*export {C.ENV_LAKE}="):
            feast_ops.repo_objects()


def test_sources_point_at_the_lakes_snapshots_without_touching_them(tmp_path):
    lake = tmp_path / "no_such_lake"
    with feast_ops.scoped_environ({C.ENV_LAKE: str(lake)}):
        objects = feast_ops.repo_objects()
    assert not lake.exists()  # declared, not read or created
    views = {o.name: o for o in objects if hasattr(o, "batch_source")}
    assert set(views) == {C.FV_USER_SEQUENCE_STATE, C.FV_USER_PROFILE, C.FV_ITEM_CATEGORIES}
    want = {C.FV_USER_SEQUENCE_STATE: C.T_USER_STATES, C.FV_USER_PROFILE: C.T_USER_PROFILE_FEATURES,
            C.FV_ITEM_CATEGORIES: C.T_ITEM_CATEGORY_FEATURES}
    for name, snapshot in want.items():
        assert Path(views[name].batch_source.path) == Path(C.feast_snapshot_path(str(lake), snapshot))
