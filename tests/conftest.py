import os
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    # every compiled module's call runs one shared code object, which dynamo recompiles for each new model up to its
    # recompile limit (8): without a reset, which test hit the limit (an error under fullgraph=True) depended on
    # the order the tests ran in
    yield
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing was compiled (importing it costs ~1.7 s)
    if dynamo is not None:
        dynamo.reset()


def _with_threads(count):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    # tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot
    yield from _with_threads(1)


@pytest.fixture
def four_threads():
    # four chunks per large CPU draw of bdl.nn.functional, whatever the machine
    yield from _with_threads(4)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
