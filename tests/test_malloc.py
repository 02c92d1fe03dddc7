"""bdl raises glibc's malloc thresholds on import (bdl/_malloc.py): the weight-sized tensors a training step makes
and drops (noise, samples, gradients, Adam's temporaries) then reuse the heap's pages instead of faulting fresh
ones in at every step.

Each measurement runs in a fresh process that imports numpy before torch (as most processes do), trains a
784-1200-1200-10 ``BayesLinear`` MLP for a few steps and counts its minor page faults (``ru_minflt``) per step
after the first three. With ``BDL_MALLOC_WARMUP=0`` the same steps take thousands each (5,200-10,300 on the
development VM, 0-86 with the warm-up, 563 once inside a full test run; the control 2,697 once in a full run of
session 26): the control that shows the count can fail. A third child imports bdl while torch's default device is "meta" (as a script that sets "cuda"
first would): the warm-up must still free its block through the CPU's malloc. The children run torch on one
thread: with two, and two children running at once, the warm-up's steps took 0-844 faults each (the OpenMP
workers' own malloc arenas, it seems), a noisier count.
"""

import os
import subprocess
import sys

import pytest

from bdl._malloc import _glibc

CHILD = """
import os
import resource
import numpy
import torch
import torch.nn.functional as F
from torch import nn

torch.set_default_device(os.environ.get("DEFAULT_DEVICE_AT_IMPORT", "cpu"))  # e.g. "cuda" in a user's script
import bdl

torch.set_default_device(None)

torch.manual_seed(0)
torch.set_num_threads(1)  # see the module docstring
model = nn.Sequential(bdl.BayesLinear(784, 1200), nn.ReLU(), bdl.BayesLinear(1200, 1200), nn.ReLU(), bdl.BayesLinear(1200, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))


def steps(count):
    for _ in range(count):
        optimizer.zero_grad()
        bdl.elbo_loss(F.cross_entropy(model(x), y), bdl.kl_divergence(model), 60_000).loss.backward()
        optimizer.step()


steps(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(5)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""

pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's malloc thresholds (Linux with glibc only)")


@pytest.fixture(scope="module")
def faults_per_step() -> dict[str, int]:
    """Page faults per training step with the warm-up ("1"), without ("0"), and with the warm-up while torch's
    default device was "meta" at import ("1 meta": the block must still come from the CPU's malloc), the
    processes run at once."""
    settings = {"0": ("0", "cpu"), "1": ("1", "cpu"), "1 meta": ("1", "meta")}
    children = {
        name: subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=dict(os.environ, BDL_MALLOC_WARMUP=warmup, DEFAULT_DEVICE_AT_IMPORT=device),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (warmup, device) in settings.items()
    }
    counts = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        counts[name] = int(out.split()[-1])
    return counts


def test_training_steps_reuse_their_pages_after_import(faults_per_step):
    # most of them: in a full test run on the development VM the warm child still took 563 per step
    assert faults_per_step["1"] < faults_per_step["0"] / 4


def test_the_warmup_works_whatever_torchs_default_device_at_import(faults_per_step):
    assert faults_per_step["1 meta"] < faults_per_step["0"] / 4


def test_without_the_warmup_every_step_faults_pages_in_again(faults_per_step):
    # a step's weight-sized tensors: 3.7-5.8 MB each, up to ~1,400 pages; 4,370-10,636 alone, 2,697 once in a full run
    assert faults_per_step["0"] > 2000


def test_the_warmup_runs_on_glibc_unless_switched_off(monkeypatch):
    from bdl._malloc import warm_up_malloc

    assert warm_up_malloc()
    monkeypatch.setenv("BDL_MALLOC_WARMUP", "0")
    assert not warm_up_malloc()
