"""The contracts: a leaf every package imports, the allowed import directions, and the one
context projection."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Set

import pytest

import ctt_contracts as C

REPO = Path(__file__).resolve().parents[2]
PROJECT = {"ctt_contracts", "pipelines", "models", "serving"}


def _project_imports(package: str) -> Set[str]:
    """Top-level project packages imported anywhere in ``package`` (lazy imports included)."""
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     and node.level == 0 else [])
            found |= {n.split(".")[0] for n in names} & PROJECT
    return found - {package}


@pytest.mark.parametrize("package, allowed", [
    ("ctt_contracts", set()),
    ("models", {"ctt_contracts"}),
    ("serving", {"ctt_contracts", "models"}),
    ("pipelines", {"ctt_contracts", "models"}),
])
def test_import_directions(package, allowed):
    assert _project_imports(package) <= allowed


def _private_imports(path: Path) -> Set[str]:
    """``from project.x import _y`` and ``x._y`` (x a project module bound by an import) in a file."""
    tree = ast.parse(path.read_text())
    modules, found = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PROJECT:
            for a in node.names:
                if a.name.startswith("_"):
                    found.add(f"{node.module}.{a.name}")
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            modules.update({a.asname or a.name.split(".")[0]: a.name for a in node.names
                            if a.name.split(".")[0] in PROJECT})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in modules and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            found.add(f"{modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    """A leading underscore marks a name its module may change alone; a caller elsewhere gets
    a public name (the seams between modules must stay visible)."""
    found = {f"{path.relative_to(REPO)}: {name}"
             for package in ("ctt_contracts", "pipelines", "models", "serving", "feature_repo",
                             "jobs", "benchmarks")
             for path in (REPO / package).rglob("*.py") for name in _private_imports(path)}
    assert found == set()


def test_projection_orders_by_weight_then_id_and_renormalises_as_float32():
    ids, w = C.project_context([9, 2, 5, 1], [0.25, 0.5, 0.25, 0.25], 3)
    assert ids == [2, 1, 5]  # weight desc, then the smaller id among the tied 0.25s
    assert w == [0.5, 0.25, 0.25]
    ids, w = C.project_context([4, 7], [0.3, 0.6], 5)  # k above the length keeps everything
    assert ids == [7, 4] and w[0] == pytest.approx(2 / 3) and sum(w) == pytest.approx(1, abs=1e-6)
    assert w[0] == float(__import__("numpy").float32(0.6 / 0.9))  # stored precision, as in the lake
    assert C.project_context([], [], 3) == ([], [])


@pytest.mark.parametrize("ids, w, k, message", [
    ([1], [0.5], 0, "top-k"),
    ([1, 2], [0.5], 2, "differ in length"),
    ([-1], [0.5], 1, "non-negative"),
    ([1], [float("nan")], 1, "finite"),
    ([1, 2], [0.0, 0.0], 1, "sum to 0"),
])
def test_projection_refuses_what_cannot_be_a_context(ids, w, k, message):
    with pytest.raises(ValueError, match=message):
        C.project_context(ids, w, k)


def test_as_utc_reads_naive_as_utc_and_keeps_an_offset():
    from datetime import datetime, timedelta, timezone

    naive = datetime(2024, 3, 1, 12, 0)
    assert C.as_utc(naive) == datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
    plus2 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert C.as_utc(plus2) is plus2 and C.as_utc(plus2).timestamp() == C.as_utc(naive).timestamp() - 7200
