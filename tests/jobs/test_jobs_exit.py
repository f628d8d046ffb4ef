"""A job's process ends with the exit code its main chose (ctt_contracts.process).

Before: the console scripts ran ``sys.exit(main())``, so ``ctt-build-sequences`` and the other
jobs whose main returns a summary exited 1 after a successful run and printed the summary
dict on stderr; and a build refused by the lease (exit 75) once died of SIGABRT at interpreter
teardown (a native thread pool destroyed while a worker was alive). Each case below runs in a
real child process, because the exit code is the thing under test.
"""
from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctt_contracts.process import EXIT_ERROR, entry_point, exit_code, run_job

REPO = Path(__file__).resolve().parents[2]


def run_child(body: str) -> subprocess.CompletedProcess:
    """``body`` defines ``main``; the child ends through run_job(main)."""
    script = textwrap.dedent("""
        import atexit, sys, threading, time
        from ctt_contracts.process import run_job
        atexit.register(lambda: print("atexit ran", flush=True))
    """) + textwrap.dedent(body) + "\nrun_job(main)\nprint('not reached')\n"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("body, code", [
    ("def main():\n    return {'rows': 3}\n", 0),  # a job's summary is success
    ("def main():\n    return None\n", 0),
    ("def main():\n    return 3\n", 3),  # serve / build_index return their code
    ("def main():\n    return True\n", 0),  # a bool is not an exit code
    ("def main():\n    raise SystemExit(75)\n", 75),  # the lease refusal
    ("def main():\n    raise SystemExit(None)\n", 0),
    ("def main():\n    raise KeyboardInterrupt\n", 130),
])
def test_the_exit_code_is_the_one_main_chose(body, code):
    done = run_child(body)
    assert done.returncode == code, done.stderr
    assert "atexit ran" in done.stdout and "not reached" not in done.stdout
    assert "{'rows': 3}" not in done.stderr  # the summary is not printed as an error


def test_an_uncaught_exception_gives_1_and_its_traceback():
    done = run_child("def main():\n    raise ValueError('bad input file')\n")
    assert done.returncode == EXIT_ERROR
    assert "Traceback" in done.stderr and "ValueError: bad input file" in done.stderr
    assert "atexit ran" in done.stdout


def test_a_message_status_is_printed_and_gives_1():
    done = run_child("def main():\n    raise SystemExit('error: no lake')\n")
    assert (done.returncode, done.stderr.strip()) == (1, "error: no lake")


def test_unflushed_output_and_non_daemon_threads_finish_before_the_exit():
    done = run_child("""
        def main():
            def late():
                time.sleep(0.3)
                sys.stdout.write("thread done\\n")  # no flush: run_job flushes
            threading.Thread(target=late).start()
            sys.stdout.write("main done")
    """)
    assert done.returncode == 0
    assert done.stdout.index("main done") < done.stdout.index("thread done") < \
        done.stdout.index("atexit ran")


def test_an_executor_nobody_shut_down_does_not_hang_the_exit():
    done = run_child("""
        from concurrent.futures import ThreadPoolExecutor
        POOL = ThreadPoolExecutor(2)  # module-level: alive at exit, its workers idle
        def main():
            POOL.submit(time.sleep, 0.2)
            return {"submitted": 1}
    """)
    assert done.returncode == 0 and "atexit ran" in done.stdout


def test_exit_code_follows_cpython():
    assert [exit_code(None), exit_code(0), exit_code(75)] == [0, 0, 75]


def console_scripts() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def test_every_console_script_ends_through_run_job():
    scripts = console_scripts()
    assert {"ctt-build-sequences", "ctt-train", "ctt-serve", "ctt-refresh"} <= set(scripts)
    for name, target in scripts.items():
        module, attr = target.split(":")
        script = getattr(importlib.import_module(module), attr)
        assert script.__code__ is entry_point(print).__code__, name  # made by entry_point
        assert callable(script.__wrapped__) and script.__wrapped__.__name__.endswith("main"), name


def test_every_job_script_ends_through_run_job():
    for job in sorted((REPO / "jobs").glob("*.py")):
        tail = job.read_text().rstrip().splitlines()[-2:]
        assert tail[0] == 'if __name__ == "__main__":' and tail[1].strip().startswith("run_job("), job

