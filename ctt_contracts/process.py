"""How a job's process ends: the exit code its main decided, never a SIGABRT at teardown.

Why: the jobs load native libraries that keep thread pools of their own (Arrow's C++ pools
behind pyarrow and deltalake, the JVM gateway of pyspark, torch, ScaNN). When CPython
finalizes, C++ static destructors can run while one of those pools still has a live worker;
``std::thread``'s destructor then calls ``std::terminate`` and the process dies with SIGABRT
("terminate called without an active exception", exit -6) after its work is done. It is rare
and load-dependent (seen once in many CI runs: a build refused by the lease, whose exit code
75 tells a scheduler "retry later", ended as -6 instead). A scheduler must see the code the job
chose, so a job's entry point ends through :func:`run_job`: it runs ``main``, joins the
non-daemon threads and runs the ``atexit`` handlers as a normal exit would (pyspark's handler
stops the JVM, logging flushes its handlers, deltalake stops its tracing), flushes stdio, and
then leaves with ``os._exit``, which skips only the C-level teardown where the abort happens.
Every write a job makes is committed before its main returns, so nothing is lost by skipping it.

The same holds for the console scripts (``ctt-build-sequences`` ...): setuptools' wrapper calls
``sys.exit(main())``, which turns a job's returned summary (a dict) into exit code 1 and prints
it to stderr, so each script points at an :func:`entry_point` of its main instead.
"""
from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
from typing import Callable, NoReturn

EXIT_ERROR = 1  # what CPython returns for an uncaught exception
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def exit_code(status: object) -> int:
    """The process exit code of ``SystemExit(status)``, as CPython computes it: None -> 0, an
    int as is, anything else is printed to stderr and gives 1."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    print(status, file=sys.stderr)
    return EXIT_ERROR


def run_job(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` and end the process with its exit code: an int it returns, the status of
    a ``SystemExit`` it raises, 1 with the traceback for any other exception, 130 on Ctrl-C;
    any other return value (a job's summary) is success."""
    try:
        result = main()
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    except SystemExit as err:
        code = exit_code(err.code)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BaseException:  # noqa: BLE001 - reported exactly as the interpreter would
        sys.excepthook(*sys.exc_info())
        code = EXIT_ERROR
    _end(code)


def _end(code: int) -> NoReturn:
    """CPython's exit sequence up to the C-level teardown, then ``os._exit``. The two private
    calls are the ones ``Py_FinalizeEx`` makes first, in its order: ``threading._shutdown``
    (stops idle ``concurrent.futures`` workers, then joins the non-daemon threads; joining them
    by hand would wait for ever on an executor nobody shut down) and the ``atexit`` handlers."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to deliver
            pass
    os._exit(code)


def entry_point(main: Callable[[], object]) -> Callable[[], NoReturn]:
    """A console-script target for ``main`` (``ctt-x = module:x_cli`` with
    ``x_cli = entry_point(x_main)``): ``run_job(main)``, ``__wrapped__`` is ``main``."""

    @functools.wraps(main)
    def script() -> NoReturn:
        run_job(main)

    return script
