"""`python jobs/serve.py` start-up errors: one clear line on stderr, no traceback, exit code 2.

Each case has one thing wrong and everything else valid (the session's bundle, ScaNN index and
applied Feast repo). One real `python jobs/serve.py` process per kind of failure (bundle, index,
Feast) proves the exit code and the absence of a traceback as an operator sees them; every case
also runs through the same `serve_main` in-process.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import ServingEnv, sqlite_store_yaml, write_repo_yaml

from serving.index import shard_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_STARTUP_ERROR = 2


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _missing_bundle(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    return {"--bundle": tmp / "no_such_bundle"}


def _missing_index(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    return {"--index": tmp / "no_such_index"}


def _index_of_another_model(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    from models.export import load_bundle
    from serving.index import build_index

    bundle = load_bundle(env.bundle_dir)
    build_index(bundle.item_ids, bundle.item_embeddings, "another-run-00000000", tmp / "other",
                backend="brute_force", n_queries=20)
    return {"--index": tmp / "other"}


def _repo_without_yaml(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    (tmp / "not_a_repo").mkdir()
    return {"--feature-repo": tmp / "not_a_repo"}


def _repo_with_garbage_yaml(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    (tmp / "garbage_repo").mkdir()
    (tmp / "garbage_repo" / "feature_store.yaml").write_text("project: [unclosed\n  : :\n")
    return {"--feature-repo": tmp / "garbage_repo"}


def _repo_never_applied(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    write_repo_yaml(tmp / "fresh_repo", tmp / "fresh_registry.db",
                    sqlite_store_yaml(tmp / "fresh_online.db"))
    return {"--feature-repo": tmp / "fresh_repo"}


def _pickle_in_index(env: ServingEnv, tmp: Path) -> Dict[str, Path]:
    index = Path(shutil.copytree(env.index_dir, tmp / "index"))
    (index / shard_dir(0) / "scann_docids.pkl").write_bytes(pickle.dumps(Payload(tmp / "pwned")))
    return {"--index": index}


CASES: List[Tuple[Callable[[ServingEnv, Path], Dict[str, Path]], str]] = [
    (_missing_bundle, r"no_such_bundle: no manifest\.json; not a bundle"),
    (_missing_index, r"no index_manifest\.json in .*no_such_index: not an index folder"),
    (_index_of_another_model, r"index does not belong to the loaded bundle \(model_version"),
    (_repo_without_yaml, r"feature repo .*not_a_repo does not load.*feature_store\.yaml"),
    (_repo_with_garbage_yaml, r"feature repo .*garbage_repo does not load.*ParserError"),
    (_repo_never_applied, r"FeatureService 'contextual_two_tower_v1'.*feast apply"),
    (_pickle_in_index, r"holds pickle files \['scann/0/scann_docids\.pkl'\]: refused"),
]
# ~30 s per process on a busy machine: one per kind of failure.
SUBPROCESS_CASES = [c for c in CASES
                    if c[0] in (_missing_bundle, _index_of_another_model, _repo_never_applied)]


def _args(env: ServingEnv, tmp: Path, break_one) -> Dict[str, Path]:
    args = {"--bundle": env.bundle_dir, "--index": env.index_dir, "--feature-repo": env.repo_dir}
    args.update(break_one(env, tmp))
    return args


def _one_error_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ctt-serve: error: ")]
    assert len(errors) == 1, stderr
    assert re.search(message, errors[0]), errors[0]


def _ids(cases) -> List[str]:
    return [c[0].__name__.strip("_") for c in cases]


@contextlib.contextmanager
def taken_port() -> Iterator[str]:
    """A port something already listens on: should a start-up wrongly succeed, it cannot bind
    (uvicorn exits 1) instead of serving until the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield str(s.getsockname()[1])


@pytest.mark.parametrize("break_one, message", SUBPROCESS_CASES, ids=_ids(SUBPROCESS_CASES))
def test_serve_py_startup_error_is_one_line_and_exit_code_2(serving_env, tmp_path, break_one,
                                                            message):
    args = _args(serving_env, tmp_path, break_one)
    with taken_port() as port:
        cmd = [sys.executable, str(REPO_ROOT / "jobs" / "serve.py"), "--port", port,
               "--log-level", "warning"]
        for flag, value in args.items():
            cmd += [flag, str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == EXIT_STARTUP_ERROR, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout
    _one_error_line(proc.stderr, message)


@pytest.mark.parametrize("break_one, message", CASES, ids=_ids(CASES))
def test_serve_main_startup_errors(serving_env, tmp_path, capsys, break_one, message):
    import torch

    from serving.cli import serve_main

    argv = ["--log-level", "warning",
            "--torch-threads", str(torch.get_num_threads())]  # leave this process' setting alone
    for flag, value in _args(serving_env, tmp_path, break_one).items():
        argv += [flag, str(value)]
    with taken_port() as port:
        assert serve_main(argv + ["--port", port]) == EXIT_STARTUP_ERROR
    _one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "pwned").exists(), "start-up unpickled the planted file"


def test_build_index_missing_bundle_is_one_line(tmp_path, capsys):
    from serving.cli import build_index_main

    code = build_index_main(["--bundle", str(tmp_path / "no_such_bundle"), "--out",
                             str(tmp_path / "index")])
    assert code == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("ctt-build-index: error: ")] == [
        f"ctt-build-index: error: {tmp_path / 'no_such_bundle'}: no manifest.json; not a bundle"]
    assert not (tmp_path / "index").exists()
