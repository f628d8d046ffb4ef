"""One flag spelling across the command lines (words joined by dashes, ``--lake`` for the lake
root), and the previous release's spellings of ctt-train / ctt-evaluate still accepted as
deprecated aliases that ``--help`` no longer shows; every command's flags read from its config
dataclasses, whose defaults are the parser's, the shared flags declared once. Parser level only:
no Spark, no training."""
from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import field, fields, make_dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import yaml
from jsonargparse import ArgumentParser as JsonArgumentParser

import ctt_contracts as C
from ctt_contracts import flags as F
from jobs.demo import DemoConfig, demo_parser
from models.cli import (DEPRECATED_EVALUATE_FLAGS, DEPRECATED_TRAIN_FLAGS, EvaluateConfig,
                        TrainRunConfig, current_flags, evaluate_main, evaluate_parser, train_main)
from models.tracking import TrackingConfig
from pipelines.build_config import BuildConfig
from pipelines.cli import (BuildRun, GenerateRun, IngestSources, SparkJob, build_parser,
                           generate_parser, ingest_main, ingest_parser)
from pipelines.feast_ops import ExportConfig, export_parser
from pipelines.ingest import EventMapping
from pipelines.inference import BatchInferenceConfig, EncodingConfig, inference_parser
from pipelines.lease import LeaseCommand, lease_parser
from pipelines.refresh import RefreshConfig, build_parser as refresh_parser
from serving import cli as serving_cli
from serving.cli import (IndexBuildConfig, ModelSource, ResolverFlags, ServeConfig,
                         build_index_main, build_index_parser, serve_main, serve_parser)
from serving.replay import ReplayConfig, parser as replay_parser

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.yaml"

# command -> (its parser, a minimal command line, the configs its main builds from it: every
# field not on that line has its dataclass default)
PARSERS: Dict[str, Tuple[Callable[[], argparse.ArgumentParser], List[str], Tuple[object, ...]]] = {
    "ingest": (ingest_parser, ["--events", "e.csv", "--user-col", "u", "--item-col", "i", "--ts-col",
                               "t", "--event-type", "conversion"],
               (SparkJob(), IngestSources(events="e.csv"),
                EventMapping(user_col="u", item_col="i", ts_col="t", event_type="conversion"))),
    "generate": (generate_parser, ["--events", "500"], (SparkJob(), GenerateRun(events=500))),
    "build": (build_parser, ["--full"], (SparkJob(), BuildConfig(), BuildRun(full=True))),
    "batch_inference": (inference_parser, ["--lake", "L", "--bundle", "B"],
                        (BatchInferenceConfig("L", "B"), EncodingConfig())),
    "export": (export_parser, ["--lake", "L"], (ExportConfig("L"),)),
    "refresh": (refresh_parser, ["--bundle", "B"],
                (SparkJob(), RefreshConfig("B"), EncodingConfig())),
    "build_index": (build_index_parser, ["--bundle", "B", "--out", "O"],
                    (IndexBuildConfig(Path("B"), Path("O")),)),
    "serve": (serve_parser, ["--bundle", "B", "--feature-repo", "R"],
              (ModelSource(Path("B")), ResolverFlags(feature_repo=Path("R")), ServeConfig())),
    "replay": (replay_parser, ["--log", "l", "--bundle", "B", "--feature-repo", "R"],
               (ReplayConfig((Path("l"),), Path("B")), ResolverFlags(feature_repo=Path("R")))),
    "demo": (demo_parser, [], (DemoConfig(),)),
    "evaluate": (evaluate_parser, ["--lake", "L", "--contextual-bundle", "B"],
                 (EvaluateConfig("L", "B"), TrackingConfig())),
    "lease": (lease_parser, ["--lake", "L", "--break", "raw"], (LeaseCommand("L", scope="raw"),)),
}
HELP_TEXTS: Dict[str, Callable[[], str]] = {
    command: (lambda make=make: make().format_help()) for command, (make, _, _) in PARSERS.items()}
TAKES_A_LAKE = ("generate", "ingest", "build", "refresh", "batch_inference", "export", "evaluate",
                "lease")
# Flags the libraries declare themselves (jsonargparse, LightningCLI), not ours to rename.
LIBRARY_FLAGS = {"--print_config", "--seed_everything", "--lr_scheduler"}
FLAG = re.compile(r"(?<![\w.-])--[A-Za-z][\w-]*(?![\w.])")  # top level: nested keys hold a dot


def flags_of(help_text: str) -> set:
    return set(FLAG.findall(help_text))


def squeezed(text: str) -> str:
    """``text`` without white space: help wraps lines anywhere, also after a dash."""
    return "".join(text.split())


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


# --------------------------------------------------------------------------------------
# Every command's flags come from its config dataclasses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_a_minimal_command_line_gives_each_config_its_field_defaults(command):
    make, argv, expected = PARSERS[command]
    args = make().parse_args(argv)
    for cfg in expected:
        assert F.from_args(type(cfg), args) == cfg


def as_settings(parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, object]:
    """A command line of ``--flag value`` pairs and switches as the settings of a --config
    file that say the same: ``{field name: value}``, a list for a several-values flag."""
    action_of = {s: a for a in parser._actions for s in a.option_strings}
    settings, rest = {}, list(argv)
    while rest:
        action = action_of[rest.pop(0)]
        value = True if action.nargs == 0 else rest.pop(0)
        settings[action.dest] = [value] if action.nargs in ("+", "*") else value
    return settings


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_command_reads_the_same_settings_from_a_config_file(command, tmp_path):
    make, argv, expected = PARSERS[command]
    config = tmp_path / f"{command}.yaml"
    config.write_text(yaml.safe_dump(as_settings(make(), argv)))
    args = make().parse_args(["--config", str(config)])
    for cfg in expected:
        assert F.from_args(type(cfg), args) == cfg
    assert "--config" in flags_of(HELP_TEXTS[command]())


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_the_printed_config_of_a_command_reads_back_as_its_config_file(command, tmp_path, capsys):
    make, argv, expected = PARSERS[command]
    config = tmp_path / f"{command}.yaml"
    config.write_text(yaml.safe_dump(printed_config(make().parse_args, argv, capsys)))
    args = make().parse_args(["--config", str(config)])
    for cfg in expected:
        assert F.from_args(type(cfg), args) == cfg


def test_a_config_file_names_the_bundle_source_of_serve_and_a_flag_cannot_add_another(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("mlflow_model: m\nmlflow_version: '3'\nfeature_repo: R\nport: 9000\n")
    args = serve_parser().parse_args(["--config", str(config), "--port", "9001"])
    assert F.from_args(ModelSource, args) == ModelSource(mlflow_model="m", mlflow_version="3")
    assert F.from_args(ServeConfig, args).port == 9001
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--config", str(config), "--bundle", "B"])


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_field_of_a_command_config_is_one_of_its_flags_with_its_help(command):
    make, _, expected = PARSERS[command]
    text = make().format_help()
    for cls in map(type, expected):
        for f in fields(cls):
            assert F.flag_of(cls, f.name) in flags_of(text), (cls.__name__, f.name)
            assert squeezed(f.metadata[F.HELP]) in squeezed(text), (cls.__name__, f.name)


JSONARGPARSE_CONFIGS = (EvaluateConfig, TrackingConfig, TrainRunConfig)  # ctt-evaluate, ctt-train


@pytest.mark.parametrize("cls", sorted({type(c) for _, _, cs in PARSERS.values() for c in cs}
                                       | {TrainRunConfig}, key=lambda c: c.__name__))
def test_a_command_config_field_without_help_is_refused(cls):
    undocumented = make_dataclass(f"Undocumented{cls.__name__}", [("extra", int, field(default=0))],
                                  bases=(cls,), frozen=True)
    typed = cls in JSONARGPARSE_CONFIGS
    parser = JsonArgumentParser() if typed else argparse.ArgumentParser()
    with pytest.raises(TypeError, match=f"Undocumented{cls.__name__}.extra has no help"):
        F.add_dataclass_flags(parser, undocumented, typed=typed)


SHARED = {  # flag -> its one help, and the commands that take it
    "--lake": (F.LAKE_HELP, TAKES_A_LAKE),
    "--bundle": (F.BUNDLE_HELP, ("refresh", "batch_inference", "build_index", "serve", "replay")),
    "--index": (F.INDEX_HELP, ("serve", "replay", "evaluate")),
    "--feature-repo": (F.FEATURE_REPO_HELP, ("refresh", "serve", "replay", "evaluate")),
    "--tracking-uri": (F.TRACKING_URI_HELP, ("serve", "evaluate")),
}


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_a_shared_flag_reads_the_same_in_every_command(flag):
    help_text, commands = SHARED[flag]
    for command in commands:
        text = squeezed(HELP_TEXTS[command]())
        assert squeezed(f"{flag} {flag.lstrip('-').replace('-', '_').upper()} {help_text}") in text, \
            command


def test_ctt_train_declares_its_top_level_flags_from_its_dataclasses(capsys):
    text = squeezed(train_help(capsys))
    for cls in (TrainRunConfig, TrackingConfig):
        for f in fields(cls):
            assert squeezed(f.metadata[F.HELP]) in text, f.name
    assert set(DEPRECATED_TRAIN_FLAGS) == {"--" + f.name for cls in (TrainRunConfig, TrackingConfig)
                                           for f in fields(cls)}


def test_serve_and_replay_read_the_same_resolver_flags():
    argv = ["--index", "I", "--feature-repo", "R", "--skew-policy", "cold_start"]
    serve = F.from_args(ResolverFlags, serve_parser().parse_args(["--bundle", "B", *argv]))
    replay = F.from_args(ResolverFlags, replay_parser().parse_args(["--log", "l", "--bundle", "B",
                                                                   *argv]))
    assert serve == replay == ResolverFlags(index=Path("I"), feature_repo=Path("R"),
                                            skew_policy="cold_start")


def test_serve_takes_exactly_one_bundle_source(capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--feature-repo", "R"])
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--bundle", "B", "--mlflow-run-id", "r", "--feature-repo", "R"])
    args = serve_parser().parse_args(["--mlflow-model", "m", "--mlflow-version", "3",
                                      "--feature-repo", "R"])
    assert F.from_args(ModelSource, args) == ModelSource(mlflow_model="m", mlflow_version="3")


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--search-threads", "0"], "--search-threads must be >= 1, got 0"),
    (["--max-body-bytes", "-1"], "--max-body-bytes must be >= 0, got -1"),
    (["--request-log-sample-rate", "1.5"], "--request-log-sample-rate must be in [0, 1]"),
    (["--request-log-sample-rate", "0.5"], "--request-log-sample-rate needs --request-log"),
])
def test_serve_refuses_a_bad_server_config_as_a_usage_error(extra, message, capsys):
    with pytest.raises(SystemExit) as done:
        serve_main(["--bundle", "B", "--feature-repo", "R", *extra])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_search_threads_default_to_the_cores_each_worker_has(monkeypatch):
    monkeypatch.setattr(serving_cli, "usable_cores", lambda: 8)
    assert ServeConfig(workers=1).threads_per_search() == 8
    assert ServeConfig(workers=3).threads_per_search() == 2
    assert ServeConfig(workers=16).threads_per_search() == 1
    assert ServeConfig(workers=16, search_threads=4).threads_per_search() == 4


def test_build_index_refuses_a_bad_shard_count_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        build_index_main(["--bundle", "B", "--out", "O", "--shards", "0"])
    assert done.value.code == 2 and "--shards must be >= 1, got 0" in capsys.readouterr().err


def test_batch_inference_and_refresh_read_the_same_encoding_flags():
    knobs = ["--batch-size", "64", "--partitions", "3"]
    job = inference_parser().parse_args(["--lake", "L", "--bundle", "B", *knobs])
    refresh = refresh_parser().parse_args(["--bundle", "B", *knobs])
    assert F.from_args(EncodingConfig, job) == F.from_args(EncodingConfig, refresh) == \
        EncodingConfig(batch_size=64, partitions=3)


def test_refresh_config_from_its_flags():
    args = refresh_parser().parse_args([
        "--lake", "L", "--bundle", "B", "--feast-data", "F", "--fs-yaml", "r.yaml", "--apply",
        "--new-model", "--full-inference", "--now", "2024-05-01", "--full", "--master", "local[2]",
        "--driver-memory", "4g", "--max-len", "7"])
    cfg = F.from_args(RefreshConfig, args)
    assert (cfg.bundle, cfg.feast_data, cfg.fs_yaml, cfg.apply, cfg.new_model) == \
        ("B", "F", Path("r.yaml"), True, True)
    assert cfg.full_inference and cfg.now.isoformat() == "2024-05-01T00:00:00+00:00"
    assert F.from_args(BuildRun, args).full
    assert F.from_args(SparkJob, args) == SparkJob("L", "local[2]", None, "4g")


def test_export_defaults_to_the_lake_of_the_environment(monkeypatch):
    monkeypatch.setenv(C.ENV_LAKE, "/lakes/today")
    assert F.from_args(ExportConfig, export_parser().parse_args([])) == ExportConfig(
        lake="/lakes/today", only=tuple(C.FEAST_SNAPSHOT_SOURCES))
    args = export_parser().parse_args(["--lake", "L", "--only", C.T_USER_STATES])
    assert F.from_args(ExportConfig, args) == ExportConfig("L", (C.T_USER_STATES,))


def test_evaluate_refuses_half_of_the_latency_pair(capsys):
    with pytest.raises(SystemExit, match="give both --index and --feature-repo"):
        evaluate_main(["--lake", "L", "--contextual-bundle", "B", "--index", "I"])


INGEST_ARGV = PARSERS["ingest"][1]


def test_ingest_still_accepts_the_old_vocabulary_flag():
    old = ingest_parser().parse_args([*INGEST_ARGV, "--category-vocab-out", "v.json"])
    new = ingest_parser().parse_args([*INGEST_ARGV, "--vocabulary-out", "v.json"])
    assert F.from_args(IngestSources, old) == F.from_args(IngestSources, new) == \
        IngestSources(events="e.csv", vocabulary_out="v.json")


def test_ingest_refuses_a_quarantine_share_outside_zero_one_before_spark(capsys):
    with pytest.raises(SystemExit) as done:
        ingest_main([*INGEST_ARGV, "--max-quarantine-frac", "1.5"])
    assert done.value.code == 2
    assert "--max-quarantine-frac must be within [0, 1]" in capsys.readouterr().err


def test_config_file_values_go_through_the_flags_parse_functions(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("now: 1700000000\n")  # epoch seconds, as on the command line
    assert F.from_args(BuildRun, build_parser().parse_args(["--config", str(config)])).now == \
        build_parser().parse_args(["--now", "1700000000"]).get("now")
    config = tmp_path / "ingest.yaml"
    config.write_text("events: e.csv\nuser_col: u\nitem_col: i\nts_col: t\nevent_type: view\n"
                      "gender_map: {1: m, 2: f}\ncategory_flag_cols: [a, 2]\n")
    args = ingest_parser().parse_args(["--config", str(config)])
    assert F.from_args(IngestSources, args).gender_map == {"1": "m", "2": "f"}
    assert args.get("category_flag_cols") == ("a", "2")


def test_an_exclusive_flag_typed_on_the_command_line_counts_even_at_its_default(tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text("events: 5000\n")
    default_users = generate_parser().get_default("n_users")
    with pytest.raises(SystemExit):
        generate_parser().parse_args(["--users", str(default_users), "--config", str(config)])
    assert "give at most one of --users, --events" in capsys.readouterr().err
    assert generate_parser().parse_args(["--config", str(config)]).get("events") == 5000


def test_a_missing_required_flag_is_named_as_typed(capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--bundle", "B"])
    assert "the following arguments are required: --feature-repo" in capsys.readouterr().err
