"""bdl.predict and bdl.evaluate over a DataLoader keep memory bounded: no per-sample outputs unless asked.

Each measurement runs in a fresh Python process (``sys.executable -c``) and reads the peak resident set
size (``resource.getrusage(...).ru_maxrss``) before and after predicting with ``S = 32`` Monte Carlo
samples on a 10-class model, for a small and a large number of inputs ``N``. The inputs are allocated
before the baseline is read, so the growth is what predicting allocates. Keeping the samples
``[S, N, C]`` in float32 would cost ``S * C * 4 = 1280`` bytes per input, over 100 MB more at the large
``N`` than at the small one; the summaries a :class:`bdl.Prediction` keeps (probabilities, mean logits,
entropies) and the metrics are ``O(N * C)``, a fraction of that whatever ``S``. With
``keep_samples=True`` the growth must exceed the kept samples' size: the control that shows the
measurement can fail.
"""

import json
import os
import subprocess
import sys

import pytest

NUM_SAMPLES, NUM_CLASSES, SMALL, LARGE = 32, 10, 1_000, 82_000
KEPT_BYTES = NUM_SAMPLES * (LARGE - SMALL) * NUM_CLASSES * 4  # what keeping [S, N, C] float32 adds from SMALL to LARGE

CHILD = f"""
import gc, json, resource, sys
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
import bdl

torch.set_num_threads(1)
torch.manual_seed(0)
function = sys.argv[1]
model = bdl.MCDropout(nn.Sequential(nn.Dropout(0.1), nn.Linear(8, {NUM_CLASSES})))
x, y = torch.randn({LARGE}, 8), torch.randint(0, {NUM_CLASSES}, ({LARGE},))  # allocated before the baseline


def loader(n):
    data = TensorDataset(x[:n], y[:n])  # views: no copy
    # batches of 500 rows fetched by slicing, not 500 single-row lookups (keeps the test fast)
    return DataLoader(data, batch_size=None, sampler=BatchSampler(SequentialSampler(data), 500, drop_last=False))


def run(n, keep):
    call = bdl.predict if function == "predict" else bdl.evaluate
    result = call(model, loader(n), num_samples={NUM_SAMPLES}, keep_samples=keep)
    del result
    gc.collect()


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def high_water_mark():  # this process's own peak (VmHWM), which exec does not carry over from a parent
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


run(500, False)  # warm-up: libraries, kernels and allocator pools count in the baseline
baseline = peak()
growth = {{"inherited": baseline - high_water_mark()}}
for name, n, keep in [("small", {SMALL}, False), ("large", {LARGE}, False)] + [("large_keep", {LARGE}, True)] * (sys.argv[2] == "control"):
    run(n, keep)
    growth[name] = peak() - baseline
print(json.dumps(growth))
"""


@pytest.fixture(scope="module")
def growth():
    """``{function: {"small": bytes, "large": bytes[, "large_keep": bytes], "inherited": bytes}}``; both run at once."""
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss is in kilobytes on Linux (bytes on macOS); measured on Linux only")
    # Linux carries a process's ru_maxrss over exec: a child started straight from pytest would report
    # pytest's own peak. Through a shell that forks (``; exit``: no exec of the last command) the child
    # inherits the small shell's peak instead. A fixed glibc mmap threshold returns every freed block over
    # 64 KB to the system, so the peak follows the live tensors, not the allocator's (timing-dependent) caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {
        function: subprocess.Popen(
            ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", CHILD, function, "control" if function == "predict" else "-"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for function in ("predict", "evaluate")
    }
    results = {}
    for function, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"the {function} measurement failed:\n{err[-3000:]}"
        results[function] = json.loads(out.strip().splitlines()[-1])
    return results


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def test_the_measuring_processes_start_from_their_own_peak(growth):
    for function, measured in growth.items():
        assert measured["inherited"] < 50e6, f"{function}: ru_maxrss started {_mb(measured['inherited'])} above the process's own peak"


def test_predict_over_a_dataloader_does_not_keep_the_samples(growth):
    measured = growth["predict"]
    extra = measured["large"] - measured["small"]
    assert extra < 0.25 * KEPT_BYTES, (
        f"predicting {LARGE} instead of {SMALL} inputs grew the peak memory by {_mb(extra)}, close to the "
        f"{_mb(KEPT_BYTES)} that keeping [S, N, C] would cost: {measured}"
    )


def test_keep_samples_does_grow_with_the_samples(growth):
    measured = growth["predict"]  # the control: the same measurement sees kept samples
    extra = measured["large_keep"] - measured["small"]
    assert extra > KEPT_BYTES, f"keep_samples=True grew the peak memory by only {_mb(extra)}, under {_mb(KEPT_BYTES)}: {measured}"


def test_evaluate_over_a_dataloader_does_not_keep_the_samples(growth):
    measured = growth["evaluate"]
    extra = measured["large"] - measured["small"]
    # evaluate adds the metrics' O(N * C) work (sorting, one-hot, float64 copies) to predict's summaries
    assert extra < 0.5 * KEPT_BYTES, (
        f"evaluating {LARGE} instead of {SMALL} inputs grew the peak memory by {_mb(extra)}, close to the "
        f"{_mb(KEPT_BYTES)} that keeping [S, N, C] would cost: {measured}"
    )


ONE_SAMPLE = """
import resource, torch
import bdl

torch.set_num_threads(1)
logits = torch.randn(1, 50_000, 1000)  # 191 MiB, allocated before the baseline
bdl.Prediction.from_logits(torch.randn(1, 100, 1000))  # warm-up
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
prediction = bdl.Prediction.from_logits(logits)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / (logits.numel() * 4))
"""


def test_one_sample_of_many_rows_is_summarised_into_its_result_without_a_second_copy():
    # blocks of rows were summarised apart and then concatenated: the blocks' results and their concatenation, 4.4x
    # the logits at its peak; the result alone (mean probabilities and mean logits) is 2x
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss is in kilobytes on Linux (bytes on macOS); measured on Linux only")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", ONE_SAMPLE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ratio = float(run.stdout.strip().splitlines()[-1])
    assert 2 <= ratio < 3.2, f"Prediction.from_logits of one [50000, 1000] sample peaked at {ratio:.2f}x its logits"
