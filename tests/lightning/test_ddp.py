"""DDP on two CPU processes (gloo) trains every method to the result of one process; metrics sync across processes."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bdl

SCRIPT = Path(__file__).with_name("ddp_methods.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder / "ddp.json"), "ddp"], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    # the one-process reference in this process (a fresh one spends ~8 s importing torch, Lightning, bdl)
    spec = importlib.util.spec_from_file_location("ddp_methods", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads, environment = torch.get_num_threads(), dict(os.environ)
    try:
        script.main(str(folder / "single.json"), "single")
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)  # Lightning's PL_GLOBAL_SEED
    return {mode: json.loads((folder / f"{mode}.json").read_text()) for mode in ("ddp", "single")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["deterministic", "variational", "mc_dropout", "ensemble", "svi"])
def test_two_processes_reach_the_metrics_of_one(results, method):
    ddp, single = results["ddp"][method], results["single"][method]
    # both processes' test predictions are gathered, in the data set's order, without the input the sampler
    # repeats to give both processes 145 of the 289 test images
    assert single["num_test"] == ddp["num_test"] == 289
    assert ddp["targets"] == single["targets"]
    # different data orders and noise draws: close, not equal
    tolerances = {"accuracy": 0.02, "nll": 0.015, "ece": 0.02, "ood/predictive_entropy/auroc": 0.015}
    for key, tolerance in tolerances.items():
        assert abs(ddp["test"][key] - single["test"][key]) <= tolerance, (key, ddp["test"][key], single["test"][key])


@pytest.mark.slow
def test_validation_metrics_are_synchronised_and_the_elbo_uses_the_global_data_size(results):
    ddp = results["ddp"]
    # each process validates half of the 216 validation images; the logged accuracy is over all of them
    assert ddp["deterministic"]["val_accuracy"] == pytest.approx(ddp["deterministic"]["val_accuracy_full_set"], abs=1e-6)
    assert ddp["variational"]["num_data"] == results["single"]["variational"]["num_data"] == 938


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_every_process_with_a_clear_error(results):
    # process 0 (the first process's error is the one a user reads) failed with gloo's "connection closed by peer";
    # then it said "on another process" only, the failing process's own words lost where a spawned run showed its
    message = results["ddp"]["nan_on_one_process"]
    assert message.startswith("non-finite training loss on process 1 at epoch 0, step 1 (this is process 0 of 2): non-finite training loss at epoch 0, step 1")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["deterministic", "variational", "svi"])
def test_epoch_level_training_means_are_over_every_process(results, method):
    # each process's own average before (Lightning logs rank 0's): the two processes' values differed
    first, second = results["ddp"][method]["train_epoch_means"]
    assert first.keys() >= {"train/loss_epoch" if method != "svi" else "train/elbo_epoch", "train/nll_epoch"}
    assert first == pytest.approx(second, rel=1e-6)


@pytest.mark.slow
def test_a_validation_set_smaller_than_the_processes_does_not_hang(results):
    # one row for two processes: the process holding only the sampler's repeat logged no metric, and the other
    # waited in the metric's synchronisation for ever; the logged accuracy is the one row's, in the second epoch
    # too, of a module whose own validation epoch hooks do not call bdl's
    row = results["ddp"]["one_validation_row"]
    assert row["logged"] == row["correct"]


@pytest.mark.slow
def test_a_metric_no_process_updates_is_left_out_on_every_process(results):
    # a regressor without variance updates no NLL; with 3 rows of one per batch, process 1's second batch holds only
    # the sampler's repeat: it logged val/nll, and process 0 waited in val/nll's synchronisation for ever
    assert results["ddp"]["no_variance_logged"] == ["val/rmse"]


@pytest.mark.slow
def test_a_buffered_metric_only_one_process_updates_syncs_in_any_dtype(results):
    from ddp_methods import BUFFERED_ON_ONE_PROCESS, metric_on_process_0  # noqa: PLC0415  (beside this file)

    expected = {name: float(metric_on_process_0(name, 0)) for name in BUFFERED_ON_ONE_PROCESS}
    assert results["ddp"]["buffered_on_one_process"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_metrics_synced_on_each_step_return_the_value_of_every_process_batch(results):
    from ddp_methods import SYNCED_ON_STEP  # noqa: PLC0415  (beside this file)

    scores, is_ood, probs, labels = SYNCED_ON_STEP
    own = slice(0, 3)  # process 0's rows, whose outcomes are written
    expected = {
        "auroc": float(bdl.metrics.functional.auroc(scores[~is_ood], scores[is_ood])),  # it was process 0's rows'
        "nll": float(bdl.metrics.functional.nll(probs, labels)),
        "auroc_not_distributed": float(bdl.metrics.functional.auroc(scores[own][~is_ood[own]], scores[own][is_ood[own]])),
        "nll_after": float(bdl.metrics.functional.nll(probs, labels)),
    }
    outcomes = dict(results["ddp"]["synced_on_step"])
    assert math.isnan(outcomes.pop("nll_all_empty")) and outcomes == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_a_random_sampler_of_the_loaders_own_must_draw_one_order_on_every_process(results):
    # unseeded, each process listed its own SubsetRandomSampler order: 12 of 40 rows counted twice, 12 dropped, silently
    outcomes = results["ddp"]["random_sampler"]
    for stage in ("test", "validate", "predict"):
        assert "SubsetRandomSampler gave the processes different orders" in outcomes[f"{stage}_unseeded"], outcomes
        assert outcomes[f"{stage}_seeded"] == "ok", outcomes
    assert outcomes["test_rows_seeded"] == list(range(21))  # every row once


@pytest.mark.slow
def test_processes_with_different_numbers_of_validation_batches_finish_and_stop_together(results):
    # a loader's own sampler gives process 0 three validation batches and process 1 one: bdl's collectives in every
    # validation batch (a prediction check, the metrics to log) paired with other calls and hung
    outcomes = results["ddp"]["uneven_batches"]
    correct = outcomes["fit"]["correct"]  # of rows 0-3: process 0's three and process 1's one differ
    assert outcomes["fit"]["logged"] == pytest.approx(sum(correct) / 4, abs=1e-6) != sum(correct[:3]) / 3
    # a NaN prediction in process 1's one batch stops process 0 after its third, with process 1's words
    # (a wrapped sampler of the loader's own: its order check is a collective; the training loader is split too)
    for name, step in (("nan", 2), ("nan_wrapped", 1)):
        assert outcomes[name].startswith(f"validation failed on process 1 at epoch 0, step {step} (this is process 0 of 2): "
                                         f"non-finite prediction in validation at epoch 0, step {step}, in batch 0 of the validation loader")
    # testing: a NaN in process 1's batch stops both at the test's end, not in a batch; the loader's rows cannot be put
    # back in order, refused on every process
    assert outcomes["nan_test"].startswith("FloatingPointError: test failed on process 1 at epoch 0, step 2 "
                                           "(this is process 0 of 2): non-finite prediction in test at epoch 0")
    assert outcomes["fit_test"].startswith("ValueError: test loader 0 has a RankRows, not Lightning's unshuffled DistributedSampler")


@pytest.mark.parametrize("module", ["bdl.lightning", "bdl.infer.svi_trainer"])  # bdl.SVIModule's imports no bdl.lightning
def test_a_process_that_imported_bdl_modules_destroys_its_gloo_group_at_exit(tmp_path, module):
    # ddp_spawn's workers exited with gloo's process group alive (Lightning destroys it at exit for NCCL only), and
    # gloo's threads, left to interpreter exit, once aborted a worker that had trained and tested
    script = f"""
import atexit
import torch.distributed as dist
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))  # runs after bdl's handler
import {module}
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialized at exit: False" in run.stdout
