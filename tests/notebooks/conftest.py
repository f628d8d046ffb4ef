"""Notebook fixtures: a Jupyter kernel bound to this interpreter (the demo output is the session
fixture ``tiny_demo_run`` of tests/conftest.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Tuple

import pytest

KERNEL_NAME = "ctt-test-venv"


@pytest.fixture(scope="session")
def venv_kernel(tmp_path_factory) -> Tuple[Path, str]:
    """(kernelspec folder, kernel name): a kernel that runs THIS interpreter (the venv's python).

    Explicit, so the test neither depends on nor touches the user's Jupyter set-up (a user-level
    "python3" kernelspec may point at another Python without the project installed).
    """
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ctt test venv", "language": "python"}))
    return root, KERNEL_NAME
