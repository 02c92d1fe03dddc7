import contextlib
import io
import logging
import os
import runpy
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401 - its loggers exist (and get their levels) before a script changes them
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _run_script(script: str, *args: str) -> str:
    """Run ``experiments/<script>`` as ``__main__`` in this process and return its stdout.

    In process rather than in a subprocess: a fresh process spends 5-8 s importing torch, bdl and (at the
    first optimiser step) torch._dynamo on this machine, more than most tiny runs take.
    """
    threads, modules, environment = torch.get_num_threads(), set(sys.modules), dict(os.environ)
    loggers = {name: logger.level for name, logger in logging.root.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    stdout = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
            patch.setattr(sys, "argv", [script, *args])
            patch.syspath_prepend(str(EXPERIMENTS))
            runpy.run_path(str(EXPERIMENTS / script), run_name="__main__")
    except SystemExit as exit_info:  # `sys.exit(main())`: only a failure is an error
        if exit_info.code not in (None, 0):
            print(stdout.getvalue()[-3000:])  # pytest shows it with the failure
            raise
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)  # e.g. Lightning's PL_GLOBAL_SEED
        for name, level in loggers.items():  # uncertainty_table silences Lightning's loggers
            logging.getLogger(name).setLevel(level)
        for name in set(sys.modules) - modules:  # the sibling scripts it imported (benchmark_layers, ...)
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(EXPERIMENTS)):
                del sys.modules[name]
    return stdout.getvalue()


@pytest.fixture(scope="session")
def run_script():
    return _run_script
