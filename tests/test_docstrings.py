"""Every example in a bdl docstring runs and prints what it shows."""

import doctest
import importlib
import inspect
import math
import pkgutil
import re

import pytest
import torch
from torch import nn

import bdl

MODULES = sorted(info.name for info in pkgutil.walk_packages(bdl.__path__, prefix="bdl."))


def _globals():
    names = {name: getattr(bdl, name) for name in dir(bdl) if not name.startswith("_")}
    return {**names, "bdl": bdl, "torch": torch, "nn": nn, "math": math}


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, extraglobs=_globals()):
        torch.manual_seed(0)
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name} (output above)"


def test_every_public_name_has_a_docstring():
    missing = [
        name
        for name in dir(bdl)
        if not name.startswith("_") and callable(getattr(bdl, name)) and not (getattr(bdl, name).__doc__ or "").strip()
    ]
    assert not missing, missing


def test_subpackages_the_readme_names_load_on_first_use(monkeypatch):
    # bdl.data.load_digits and bdl.lightning.VariationalModule raised AttributeError after a plain `import bdl`
    import sys

    for name in ("data", "lightning"):
        module = importlib.import_module(f"bdl.{name}")
        monkeypatch.delattr(bdl, name)  # as in a fresh process, where nothing imported it yet
        assert getattr(bdl, name) is sys.modules[f"bdl.{name}"] is module
    assert callable(bdl.data.load_digits) and bdl.lightning.VariationalModule.__name__ == "VariationalModule"


def test_star_import_gives_the_public_names_and_no_subpackage():
    # `from bdl import *` bound bdl.nn over `from torch import nn` (and bdl.calibration, bdl.wrappers, ...)
    namespace: dict = {}
    exec("from torch import nn\nfrom bdl import *", namespace)
    assert namespace["nn"] is torch.nn
    public = {name for name in dir(bdl) if not name.startswith("_") and not inspect.ismodule(getattr(bdl, name))}
    assert set(bdl.__all__) == public - {"SVIModule", "svi"}  # those two import Lightning
    assert all(namespace[name] is getattr(bdl, name) for name in bdl.__all__)


@pytest.mark.parametrize(
    "package", ["bdl.nn", "bdl.metrics", "bdl.metrics.functional", "bdl.infer", "bdl.lightning", "bdl.data", "bdl.calibration", "bdl.wrappers"]
)
def test_a_subpackages_star_import_gives_its_public_names_and_no_submodule(package):
    # without __all__, `from bdl.nn import *` bound the submodule `loss` over a caller's variable (bdl.infer: `model`,
    # bdl.lightning: `data`), and `from bdl.metrics import *` gave typing's names but none of the Metric classes
    module = importlib.import_module(package)
    namespace: dict = {}
    exec(f"from {package} import *", namespace)
    bound = {name: value for name, value in namespace.items() if name != "__builtins__"}
    assert set(bound) == set(module.__all__) and not any(inspect.ismodule(value) for value in bound.values())
    assert all(bound[name] is getattr(module, name) for name in bound)
    public = {name for name in vars(module) if not name.startswith("_") and not inspect.ismodule(getattr(module, name))}
    lazy = {"OPTIMIZERS", "SVIModule", "exponential_decay", "svi"}  # bdl.infer's: import Lightning, by name only
    assert public - {"annotations", "TYPE_CHECKING", "Any", "importlib"} - lazy <= set(module.__all__)


def test_every_torch_class_a_docstring_names_exists():
    # the convolution layers' shared docstring said "Bayesian nn.BayesConv2d ... the arguments of nn.BayesConv2d"
    missing = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for test in doctest.DocTestFinder(exclude_empty=False).find(module, module_name):
            for name in re.findall(r"``nn\.(\w+)``", test.docstring or ""):
                if not hasattr(nn, name):
                    missing.append(f"{test.name}: nn.{name}")
    assert not missing
