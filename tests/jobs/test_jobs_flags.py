"""One flag spelling across the command lines (words joined by dashes, ``--lake`` for the lake
root), and the previous release's spellings of ctt-train / ctt-evaluate still accepted as
deprecated aliases that ``--help`` no longer shows. Parser level only: no Spark, no training."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import yaml

from jobs.demo import demo_parser
from models.cli import (DEPRECATED_EVALUATE_FLAGS, DEPRECATED_TRAIN_FLAGS, current_flags,
                        evaluate_main, evaluate_parser, train_main)
from pipelines.cli import build_parser, generate_parser, ingest_parser
from pipelines.feast_ops import export_parser
from pipelines.inference import inference_parser
from pipelines.refresh import build_parser as refresh_parser
from serving.cli import build_index_parser, serve_parser
from serving.replay import parser as replay_parser

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.yaml"

HELP_TEXTS: Dict[str, Callable[[], str]] = {
    "generate": lambda: generate_parser().format_help(),
    "ingest": lambda: ingest_parser().format_help(),
    "build": lambda: build_parser().format_help(),
    "refresh": lambda: refresh_parser().format_help(),
    "batch_inference": lambda: inference_parser().format_help(),
    "export": lambda: export_parser().format_help(),
    "build_index": lambda: build_index_parser().format_help(),
    "serve": lambda: serve_parser().format_help(),
    "replay": lambda: replay_parser().format_help(),
    "demo": lambda: demo_parser().format_help(),
    "evaluate": lambda: evaluate_parser().format_help(),
}
TAKES_A_LAKE = ("generate", "ingest", "build", "refresh", "batch_inference", "export", "evaluate")
# Flags the libraries declare themselves (jsonargparse, LightningCLI), not ours to rename.
LIBRARY_FLAGS = {"--print_config", "--seed_everything", "--lr_scheduler"}
FLAG = re.compile(r"(?<![\w.-])--[A-Za-z][\w-]*(?![\w.])")  # top level: nested keys hold a dot


def flags_of(help_text: str) -> set:
    return set(FLAG.findall(help_text))


def train_help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(HELP_TEXTS))
def test_every_command_spells_its_flags_with_dashes(command):
    flags = flags_of(HELP_TEXTS[command]()) - LIBRARY_FLAGS
    assert flags, f"{command}: no flags found in its help"
    assert sorted(f for f in flags if "_" in f) == []


def test_ctt_train_spells_its_own_flags_with_dashes(capsys):
    flags = flags_of(train_help(capsys)) - LIBRARY_FLAGS
    assert sorted(f for f in flags if "_" in f) == []
    assert set(DEPRECATED_TRAIN_FLAGS.values()) <= flags


@pytest.mark.parametrize("command", TAKES_A_LAKE)
def test_the_lake_root_is_spelled_lake_everywhere(command):
    flags = flags_of(HELP_TEXTS[command]())
    assert "--lake" in flags and "--lake-root" not in flags


def test_deprecated_spellings_are_hidden_and_each_names_a_declared_flag(capsys):
    evaluate_flags = flags_of(evaluate_parser().format_help())
    assert set(DEPRECATED_EVALUATE_FLAGS.values()) <= evaluate_flags
    assert not set(DEPRECATED_EVALUATE_FLAGS) & evaluate_flags
    train_flags = flags_of(train_help(capsys))
    assert set(DEPRECATED_TRAIN_FLAGS.values()) <= train_flags
    assert not set(DEPRECATED_TRAIN_FLAGS) & train_flags


def test_current_flags_rewrites_old_spellings_alone_or_with_a_value_and_warns_once_each():
    argv = ["--config", "c.yaml", "--data.lake_root", "lake", "--out_dir", "runs/x",
            "--auto_resume=false", "--trainer.max_epochs", "2", "runs/--out_dir"]
    with pytest.warns(FutureWarning) as caught:
        out = current_flags(argv, DEPRECATED_TRAIN_FLAGS, "ctt-train")
    assert out == ["--config", "c.yaml", "--data.lake_root", "lake", "--out-dir", "runs/x",
                   "--auto-resume=false", "--trainer.max_epochs", "2", "runs/--out_dir"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "--out_dir is deprecated" in messages[0] and "use --out-dir" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert current_flags(out, DEPRECATED_TRAIN_FLAGS, "ctt-train") == out  # current: silent


def printed_config(run: Callable[[List[str]], object], argv: List[str], capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        run([*argv, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_ctt_train_resolves_the_same_config_from_old_and_new_spellings(capsys, tmp_path):
    common = ["--config", str(TINY_CONFIG), "--data.lake_root", str(tmp_path / "lake")]
    new = printed_config(train_main, [*common, "--out-dir", str(tmp_path / "run"), "--run-name", "r",
                                      "--tracking-uri", "sqlite:///m.db", "--ckpt-path", "c.ckpt",
                                      "--auto-resume", "false", "--register-model", "m",
                                      "--experiment-name", "e"], capsys)
    with pytest.warns(FutureWarning):
        old = printed_config(train_main, [*common, "--out_dir", str(tmp_path / "run"), "--run_name", "r",
                                          "--tracking_uri", "sqlite:///m.db", "--ckpt_path", "c.ckpt",
                                          "--auto_resume=false", "--register_model", "m",
                                          "--experiment_name", "e"], capsys)
    assert old == new
    assert (new["out_dir"], new["run_name"], new["auto_resume"]) == (str(tmp_path / "run"), "r", False)


def test_ctt_evaluate_resolves_the_same_config_from_old_and_new_spellings(capsys):
    new = printed_config(evaluate_main, [
        "--lake", "lake", "--contextual-bundle", "a", "--sequence-only-bundle", "b",
        "--out-dir", "rep", "--exclude-history", "true", "--run-name", "r", "--experiment-name", "e",
        "--tracking-uri", "sqlite:///m.db", "--index", "idx", "--feature-repo", "fr",
        "--latency-requests", "5", "--latency-warmup", "1", "--latency-k", "7",
        "--latency-torch-threads", "2"], capsys)
    with pytest.warns(FutureWarning) as caught:
        old = printed_config(evaluate_main, [
            "--lake_root", "lake", "--contextual_bundle", "a", "--sequence_only_bundle", "b",
            "--out_dir", "rep", "--exclude_history", "true", "--run_name", "r",
            "--experiment_name", "e", "--tracking_uri", "sqlite:///m.db", "--index", "idx",
            "--feature_repo", "fr", "--latency_requests", "5", "--latency_warmup", "1",
            "--latency_k=7", "--latency_torch_threads", "2"], capsys)
    assert len(caught) == len(DEPRECATED_EVALUATE_FLAGS)
    assert old == new
    assert (new["lake"], new["latency_k"], new["exclude_history"]) == ("lake", 7, True)


def test_help_still_shows_the_defaults():
    assert "default: runs/report" in evaluate_parser().format_help()
