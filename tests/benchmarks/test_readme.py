"""The README's benchmark tables come from the results JSONs: the committed README must equal
what ``benchmarks/readme.py`` renders from the committed JSONs, and the renderers must show the
figures (and only those) that a hand-made report holds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchlib
import readme


def test_committed_readme_matches_committed_results():
    text = readme.README.read_text()
    blocks = readme.render_all(readme.RESULTS)
    assert readme.stale_blocks(text, blocks) == [], (
        "README benchmark blocks differ from benchmarks/results/*.json: run "
        "python benchmarks/readme.py")


def test_every_block_has_markers():
    text = readme.README.read_text()
    for block in readme.BLOCKS + (readme.Block(readme.BARS_BLOCK, (), lambda r: []),):
        assert text.count(readme.begin_marker(block.name)) == 1, block.name
        assert text.count(readme.end_marker(block.name)) == 1, block.name


def test_every_results_file_is_the_envelope_with_a_bars_list():
    paths = sorted(readme.RESULTS.glob("*.json"))
    assert paths
    for path in paths:
        report = json.loads(path.read_text())
        assert list(report) == list(benchlib.ENVELOPE_KEYS), path.name
        assert isinstance(report["result"], dict), path.name
        bars = report["bars"]
        assert isinstance(bars, list) and bars, f"{path.name} has no bars list"
        for bar in bars:
            assert isinstance(bar, dict) and {"name", "value", "target", "met"} <= set(bar), (path.name, bar)


def test_check_fails_on_a_hand_edited_figure(tmp_path: Path, capsys):
    text = readme.README.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| `real_ctx_vs_best_baseline_ndcg10`"))
    edited = tmp_path / "README.md"
    edited.write_text(text.replace(line, line.replace("| yes |", "| **no** |"), 1))
    assert readme.main(["--check", "--readme", str(edited)]) == 1
    assert "quality" in capsys.readouterr().out
    assert readme.main(["--readme", str(edited)]) == 0
    assert edited.read_text() == text


def test_bars_table_renders_values_targets_and_unmeasured():
    reports = {"a.json": {"bars": [{"name": "x_ratio", "value": 1.23456, "target": 1.2, "met": True},
                                   {"name": "y_s", "value": None, "target": 120, "met": False}]}}
    lines = readme.render_bars(reports)
    assert lines[2] == "| `x_ratio` | 1.235 | 1.2 | yes | a.json |"
    assert lines[3] == "| `y_s` | - | 120.0 | not measured | a.json |"


def test_movielens_table_from_seed_summaries():
    summary = {"lr": 0.002, "hr@10_mean": 0.2, "hr@10_std": 0.01, "ndcg@10_mean": 0.1,
               "ndcg@10_std": None, "wall_to_best_s_mean": 100.0, "cpu_to_best_s_mean": 190.0,
               "epochs_run_mean": 30.0, "best_epoch_mean": 25.0, "n_seeds": 3}
    stage = {"command": "movielens.py --stage grid", "date": "2026-12-01T00:00:00",
             "load_before": [0.5, 0, 0], "load_after": [1.5, 0, 0], "wall_s": 600.0}
    report = {"result": {"stages_run": [stage],
                         "datasets": {"ml-100k": {"models": {
                             "ours_ids": {"label": "ours", "summary": summary},
                             "sasrec": {"label": "SASRec"}}}}}}  # no summary yet: no row
    lines = readme.render_movielens({"movielens.json": report})
    assert lines[1] == ("- `movielens.py --stage grid` on 2026-12-01: load average 0.50 before, "
                        "1.50 after, 10 min wall.")
    rows = [ln for ln in lines if ln.startswith("| ml-100k")]
    assert rows == ["| ml-100k | ours | 0.002 | 0.2000 ± 0.0100 | 0.1000 | 100 | 190 | 30.0 (25.0) | 3 |"]


def test_missing_results_file_and_missing_markers_are_clear_errors(tmp_path: Path):
    with pytest.raises(readme.ReadmeError, match="missing"):
        readme.read_reports(tmp_path, ["nothing.json"])
    with pytest.raises(readme.ReadmeError, match="exactly one"):
        readme.replace_block("no markers here", "bars", "body")


def test_provenance_shows_the_cpu_probe_and_steal_when_recorded():
    report = {"date": "2026-12-04T02:00:00+00:00", "machine": {"cores": 2},
              "load_avg_before": [0.1, 0.0, 0.0], "load_avg_after": [2.0, 1.0, 0.5]}
    assert "probe" not in readme.provenance("x.json", report)
    line = readme.provenance("x.json", {**report, "cpu_probe_s_before": 0.61,
                                        "cpu_probe_s_after": 0.64, "cpu_steal_pct": 3.5})
    assert "CPU probe 0.61 s before, 0.64 s after, steal 3.5 %" in line
