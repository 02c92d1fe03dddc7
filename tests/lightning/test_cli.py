"""The ``bdl`` command (bdl.lightning.cli): run folders, reports, subcommands, config errors and DDP on CPU."""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from cli_args import FEW_STEPS

from bdl.lightning.cli import BDLCLI, Checkpoint, main, summary_table

REPO = Path(__file__).parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _isolate(patch):
    patch.setattr(sys, "argv", ["bdl"])  # LightningCLI warns when pytest's own arguments are there too
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them; restored afterwards
        patch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    _isolate(monkeypatch)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One tiny ``bdl fit --config configs/quickstart.yaml`` (evaluate_after_fit is on there); its root folder."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch)
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.default_root_dir", str(root)])
    return root


def _copy_run(quickstart_run, tmp_path):
    """A private copy of the quickstart run folder (so later subcommands add versions next to it); its best.ckpt."""
    shutil.copytree(quickstart_run / "quickstart", tmp_path / "quickstart")
    return tmp_path / "quickstart" / "version_0" / "checkpoints" / "best.ckpt"


def _csv_columns(path):
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    columns = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                columns.setdefault(key, []).append(float(value))
    return columns


# ----------------------------------------------------------------------------------------------------- fit


def test_fit_writes_the_run_folder_with_config_checkpoints_and_metrics(quickstart_run):
    folders = sorted(path.name for path in (quickstart_run / "quickstart").iterdir())
    assert folders == ["version_0"]  # the folder is named after the config file
    folder = quickstart_run / "quickstart" / "version_0"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["class_path"] == "bdl.lightning.VariationalModule"
    assert config["model"]["init_args"]["lr"] == 0.003 and config["model"]["init_args"]["kl_weight"] == 1.0  # resolved
    assert config["data"]["class_path"] == "bdl.lightning.DigitsDataModule"
    assert config["trainer"]["max_epochs"] == 1 and config["trainer"]["default_root_dir"] == str(quickstart_run)
    assert config["evaluate_after_fit"] is True and config["checkpoint"]["monitor"] == "val/nll"
    assert (folder / "checkpoints" / "best.ckpt").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # limit_train_batches 2 of one epoch
    assert any(key.endswith("weight_rho") for key in checkpoint["state_dict"])  # Bayesian layers were trained

    columns = _csv_columns(folder / "metrics.csv")
    for name in ("train/nll_epoch", "train/kl_epoch", "val/accuracy", "val/nll", "val/ece"):
        assert name in columns, f"{name} missing from metrics.csv columns {sorted(columns)}"
    assert all(value > 0 for value in columns["train/kl_epoch"] + columns["train/nll_epoch"] + columns["val/nll"])
    assert all(0 <= value <= 1 for value in columns["val/accuracy"] + columns["val/ece"])
    assert list(folder.glob("events.out.tfevents.*"))  # TensorBoard (a dev dependency) logs into the same folder


def test_fit_with_evaluate_after_fit_writes_the_report_with_ood_aurocs(quickstart_run):
    folder = quickstart_run / "quickstart" / "version_0"
    report = json.loads((folder / "metrics.json").read_text())
    assert report["task"] == "classification"
    # limit_test_batches 1 means one batch (64 inputs), not 100% of the test set (289) and OOD set (354)
    assert report["num_examples"] == 64 and report["num_ood_examples"] == 64
    metrics = report["metrics"]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["nll"] > 0
    for score in ("predictive_entropy", "mutual_information", "max_probability"):
        assert 0 <= metrics[f"ood/{score}/auroc"] <= 1
    markdown = (folder / "report.md").read_text()
    figures = [line.split("(")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert {"reliability_diagram.png", "ood_roc.png"} <= set(figures)
    for figure in figures:
        assert (folder / figure).read_bytes().startswith(PNG_MAGIC)


def test_the_printed_table_keeps_its_value_column_for_values_of_10_and_more():
    # a value the report cannot give (an infinite NLL: null in metrics.json, read back as NaN) reads n/a, as in report.md
    lines = summary_table({"accuracy": 0.5, "nll": 12.34567, "ece": float("nan"), "brier_score": float("inf")}).splitlines()
    assert lines[2:] == ["| accuracy |  0.5000 |", "| NLL      | 12.3457 |", "| ECE      |     n/a |", "| Brier    |     n/a |"]
    assert len({len(line) for line in lines}) == 1 and lines[1].endswith(":|")
    # titles shorter than "metric" (a regression's RMSE, NLL, CRPS): its column as wide as the header
    assert summary_table({"rmse": 0.5}).splitlines() == ["| metric | value  |", "|--------|-------:|", "| RMSE   | 0.5000 |"]
    # values below 10: the table the README shows
    assert summary_table({"accuracy": 0.5}).splitlines() == ["| metric   | value  |", "|----------|-------:|", "| accuracy | 0.5000 |"]


def test_run_name_replaces_the_config_file_name_as_folder(tmp_path):
    main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null",
          "--evaluate_after_fit", "false", "--run_name", "other", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other"]
    folder = tmp_path / "other" / "version_0"
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((folder / "config.yaml").read_text())["run_name"] == "other"
    assert not (folder / "metrics.json").exists()  # evaluate_after_fit false: no report


def test_fit_from_another_runs_checkpoint_leaves_that_run_folder_alone(quickstart_run, tmp_path):
    last = _copy_run(quickstart_run, tmp_path).with_name("last.ckpt")
    before = {path.name: path.read_bytes() for path in last.parents[1].iterdir() if path.is_file()}
    # the checkpoint's version_0 was taken for this run's own: it logged into other/version_0 had that existed, and
    # rewrote that run's metrics.csv and config.yaml
    (tmp_path / "other" / "version_0").mkdir(parents=True)
    main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.max_epochs", "2", "--evaluate_after_fit", "false",
          "--run_name", "other", "--ckpt_path", str(last), "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert {path.name: path.read_bytes() for path in last.parents[1].iterdir() if path.is_file()} == before
    assert sorted(path.name for path in (last.parents[1] / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    resumed = tmp_path / "other" / "version_1"
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # it did resume
    assert not any((tmp_path / "other" / "version_0").iterdir())


def test_checkpointing_off_and_extra_checkpoint_callbacks(tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr("bdl.lightning.cli.Trainer.evaluate", lambda self, *args, ckpt_path=None, **kwargs: evaluated.append(ckpt_path))
    # enable_checkpointing false: Lightning refused it next to the checkpoint group's ModelCheckpoint
    main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert evaluated == [None] and not list(tmp_path.rglob("*.ckpt"))  # the weights as trained
    # a user's periodic checkpoint comes first in the callbacks: Lightning's "best" meant its latest file
    main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath",
          str(tmp_path / "periodic"), "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert evaluated[1] == str(tmp_path / "quickstart" / "version_1" / "checkpoints" / "best.ckpt")
    assert list((tmp_path / "periodic").glob("*.ckpt"))


def test_fast_dev_run_writes_no_files(quickstart_run, tmp_path, monkeypatch, capsys):
    # a smoke test: Lightning gives it no logger, and bdl wrote checkpoints/last.ckpt, metrics.json, report.md and
    # the plots into the working directory (and predictions.pt for predict)
    best = _copy_run(quickstart_run, tmp_path / "runs")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"])
    assert "fast_dev_run: no report files written" in capsys.readouterr().out
    main(["predict", "--config", QUICKSTART, "--ckpt_path", str(best), "--trainer.fast_dev_run", "true",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert not list(work.rglob("*"))


def test_resuming_a_run_without_a_config_file_finds_the_folder_named_after_the_module(tmp_path):
    arguments = ["--model", "bdl.lightning.DeterministicModule", "--model.model", "bdl.lightning.MLP", "--model.model.in_features", "64",
                 "--model.model.out_features", "8", "--data", "bdl.lightning.DigitsDataModule", *FEW_STEPS,
                 "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    main(["fit", *arguments])
    main(["fit", *arguments, "--trainer.max_epochs", "2", "--ckpt_path", "last"])  # AttributeError: no model yet
    assert sorted(path.name for path in (tmp_path / "DeterministicModule").iterdir()) == ["version_0"]
    assert torch.load(tmp_path / "DeterministicModule" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # best too (Lightning was handed "best" itself, and said no checkpoint callback saves the best model)
    main(["fit", *arguments, "--trainer.max_epochs", "3", "--ckpt_path", "best"])
    assert torch.load(tmp_path / "DeterministicModule" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 4


def test_limit_batches_of_one_is_one_batch_and_fractions_stay_fractions(tmp_path):
    cli = BDLCLI(args=["--config", QUICKSTART, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0.5",
                       "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    limit_train, limit_val = cli.config.trainer.limit_train_batches, cli.config.trainer.limit_val_batches
    assert (limit_train, type(limit_train)) == (1, int) and (limit_val, type(limit_val)) == (0.5, float)
    assert (cli.trainer.limit_train_batches, type(cli.trainer.limit_train_batches)) == (1, int)
    assert cli.trainer.limit_test_batches == 1.0  # unset: Lightning's default, all batches


# --------------------------------------------------------------------------------- evaluate / test / predict


def test_evaluate_takes_a_checkpoint_of_a_module_trained_from_python(tmp_path, capsys):
    # its hyperparameters name no class and hold no network: Lightning's merge into the config failed with
    # jsonargparse's "Parsing of ckpt_path hyperparameters failed!"; the config's model now takes its weights
    import lightning as L

    from bdl.lightning import MLP, DigitsDataModule, MCDropoutModule, VariationalModule

    module = VariationalModule(MLP(64, 8, hidden=[128]), lr=0.003)  # the network of configs/quickstart.yaml
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DigitsDataModule(ood="classes", ood_classes=[8, 9], batch_size=64))
    with torch.no_grad():
        module.model[-1].bias_mu[3] = 50.0  # every input "a 3": a report that shows these weights were loaded
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    main(["evaluate", "--config", QUICKSTART, "--ckpt_path", str(tmp_path / "python.ckpt"), *FEW_STEPS,
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "quickstart" / "version_0" / "metrics.json").read_text())["metrics"]
    assert report["nll"] > 20 and report["accuracy"] < 0.3  # an untrained network's NLL is about ln 8 = 2.1
    # what no weight holds (an inserted dropout rate) was the config's, silently: 0.2 evaluated for 0.5 trained
    module = MCDropoutModule(MLP(64, 8, hidden=[128], dropout=0.2), p=0.5, insert_before=["4"], lr=0.01)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DigitsDataModule(ood="classes", ood_classes=[8, 9], batch_size=64))
    trainer.save_checkpoint(tmp_path / "dropout.ckpt")
    with pytest.raises(ValueError, match=r"saved from Python \(not by the bdl command\) with p=0.5 \(the config: None\), "
                                         r"insert_before=\['4'\] \(the config: None\): the config must build"):  # fmt: skip
        main(["evaluate", "--config", str(REPO / "configs" / "digits_mc_dropout.yaml"), "--ckpt_path", str(tmp_path / "dropout.ckpt"),
              *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip


def test_a_bdl_checkpoints_arguments_that_this_command_overrides_in_vain_are_named():
    # Lightning builds the module from the checkpoint's arguments: a resume's --model.init_args.lr 0.5 was dropped silently
    from bdl.lightning.cli import _warn_of_overridden_arguments

    saved = {"lr": 0.003, "kl_weight": 1, "num_eval_samples": 32, "model": {"class_path": "bdl.lightning.MLP", "init_args": {"hidden": [128]}},
             "_instantiator": "x"}  # fmt: skip
    same = {"lr": 0.003, "kl_weight": 1.0, "num_eval_samples": 4, "model": {"class_path": "bdl.lightning.MLP", "init_args": {"hidden": (128,)}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_of_overridden_arguments(same, saved, "a.ckpt")  # evaluation options come from the command
    changed = {**same, "lr": 0.5, "model": {"class_path": "bdl.lightning.MLP", "init_args": {"hidden": [32]}}}
    with pytest.warns(UserWarning, match=r"--ckpt_path a.ckpt: the module is built from the checkpoint's arguments \(Lightning's rule\), "
                                         r"which differ from this command's: lr=0.003 \(this command: 0.5\), model \(its config\); only"):  # fmt: skip
        _warn_of_overridden_arguments(changed, saved, "a.ckpt")


def test_a_python_checkpoint_is_compared_with_the_config_in_the_forms_each_takes():
    # a bare pattern ("2") against the config's list (["2"]), and options that only shape the fit (the starting
    # stds, the KL weight), were refused as differences
    from bdl.lightning.cli import _check_python_checkpoint

    config = {"init_args": {"insert_before": ["2"], "include": ["1", "torch.nn.modules.linear.Linear"], "posterior_std_init": 1e-3,
                            "kl_weight": 1.0, "p": 0.1, "num_eval_samples": 32}}  # fmt: skip
    saved = {"insert_before": "2", "include": ("1", {"module": "torch.nn.modules.linear", "type": "Linear"}), "posterior_std_init": 0.05,
             "kl_weight": 0.1, "p": 0.1, "num_eval_samples": 8, "model": None, "_instantiator": "x"}  # fmt: skip
    _check_python_checkpoint(config, saved, "a.ckpt", training=False)
    with pytest.raises(ValueError, match=r"with posterior_std_init=0.05 \(the config: 0.001\), kl_weight=0.1 \(the config: 1.0\)"):
        _check_python_checkpoint(config, saved, "a.ckpt", training=True)  # a resumed fit goes on with them
    with pytest.raises(ValueError, match=r"with p=0.5 \(the config: 0.1\):"):
        _check_python_checkpoint(config, {**saved, "p": 0.5}, "a.ckpt", training=False)
    # noise_variance unset is 1.0, which modules saved before that default kept: every such checkpoint was refused
    _check_python_checkpoint({"init_args": {"noise_variance": None}}, {"noise_variance": 1.0}, "a.ckpt", training=False)
    _check_python_checkpoint({"init_args": {"noise_variance": 1.0}}, {"noise_variance": None}, "a.ckpt", training=False)
    with pytest.raises(ValueError, match=r"with noise_variance=0.5 \(the config: 1.0\)"):
        _check_python_checkpoint({"init_args": {"noise_variance": None}}, {"noise_variance": 0.5}, "a.ckpt", training=False)
    # a prior by either class path, as built; another prior only shapes the fit
    mixture = {"class_path": "bdl.nn.priors.ScaleMixturePrior", "init_args": {"scale1": 1.0, "scale2": 0.0025, "mixture_weight": 0.5}}
    given = {"init_args": {"prior": {"class_path": "bdl.ScaleMixturePrior", "init_args": {"scale2": 0.0025}}}}
    _check_python_checkpoint(given, {"prior": mixture}, "a.ckpt", training=True)
    with pytest.raises(ValueError, match=r"with prior=\{'class_path': 'bdl.nn.priors.ScaleMixturePrior', 'init_args': \{'scale1': 1.0, 'scale2': 0.0025, 'mixture_weight': 0.5\}\} \(the config: None\)"):
        _check_python_checkpoint({"init_args": {"prior": None}}, {"prior": mixture}, "a.ckpt", training=True)
    _check_python_checkpoint({"init_args": {"prior": None}}, {"prior": mixture}, "a.ckpt", training=False)
    # compared by every argument: the repr's :g rounding took 0.002500004 for 0.0025
    close = {"init_args": {"prior": {"class_path": "bdl.ScaleMixturePrior", "init_args": {"scale2": 0.002500004}}}}
    with pytest.raises(ValueError, match=r"with prior=.*'scale2': 0.0025.*\(the config: .*'scale2': 0.002500004"):
        _check_python_checkpoint(close, {"prior": mixture}, "a.ckpt", training=True)


def test_evaluate_prints_the_table_and_writes_the_report_in_a_new_version(quickstart_run, tmp_path, capsys):
    best = _copy_run(quickstart_run, tmp_path)
    fitted = json.loads((tmp_path / "quickstart" / "version_0" / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["evaluate", "--config", QUICKSTART, "--ckpt_path", str(best), *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    # Lightning's "The dirpath has changed ... won't be reloaded": an evaluation saves no checkpoint
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    folder = tmp_path / "quickstart" / "version_1"
    assert "VariationalModule on DigitsDataModule: 64 test inputs, 64 OOD inputs (digits 8, 9)" in out
    assert "| metric" in out and "| accuracy" in out and "| ECE" in out
    assert "OOD AUROC vs digits 8, 9 (mutual information)" in out
    assert f"Report (metrics.json, report.md, plots): {folder}" in out
    report = json.loads((folder / "metrics.json").read_text())
    assert report["num_examples"] == 64 and (folder / "report.md").is_file()
    accuracy_row = next(line for line in out.splitlines() if line.startswith("| accuracy"))
    assert float(accuracy_row.split("|")[2]) == pytest.approx(report["metrics"]["accuracy"], abs=1e-4)
    # the checkpoint's weights were loaded: same test batch, near-identical predictions (an untrained net scores ~1/8)
    assert report["metrics"]["accuracy"] == pytest.approx(fitted["accuracy"], abs=2 / 64)
    assert json.loads((tmp_path / "quickstart" / "version_0" / "metrics.json").read_text())["metrics"] == fitted


def test_evaluate_last_or_best_loads_the_runs_newest_checkpoint_with_this_commands_evaluation_options(quickstart_run, tmp_path):
    _copy_run(quickstart_run, tmp_path)
    fitted = json.loads((tmp_path / "quickstart" / "version_0" / "metrics.json").read_text())["metrics"]
    saved_config = tmp_path / "quickstart" / "version_0" / "config.yaml"
    assert yaml.safe_load(saved_config.read_text())["run_name"] == "quickstart"  # was null: the saved config found runs/config/
    # Lightning looked for "best" in the new, empty version folder and evaluated the untrained network; and the
    # checkpoint's hyperparameters replaced num_eval_samples 4 by the 32 it was trained with
    main(["evaluate", "--config", QUICKSTART, "--ckpt_path", "best", "--model.init_args.num_eval_samples", "4", *FEW_STEPS,
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "quickstart" / "version_1" / "metrics.json").read_text())
    assert report["num_samples"] == 4 and report["metrics"]["accuracy"] == pytest.approx(fitted["accuracy"], abs=6 / 64)
    # the saved config holds fit's weights_only, which evaluate refused
    main(["evaluate", "--config", str(saved_config), "--ckpt_path", "last", *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])
    report = json.loads((tmp_path / "quickstart" / "version_2" / "metrics.json").read_text())
    assert report["num_samples"] == 32 and report["metrics"]["accuracy"] == pytest.approx(fitted["accuracy"], abs=2 / 64)
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path best: no .*other/version_\*/checkpoints/best.ckpt to evaluate from"):
        main(["evaluate", "--config", QUICKSTART, "--run_name", "other", "--ckpt_path", "best", "--trainer.default_root_dir", str(tmp_path)])


def test_ckpt_path_best_is_the_best_checkpoint_the_run_recorded(quickstart_run, tmp_path):
    # with save_top_k > 1 Lightning names the kept files best, best-v1, ... and reuses freed names: best.ckpt held a
    # worse epoch than the run's best (best-v1.ckpt), and a templated filename ("ep{epoch}") named no file at all
    best = _copy_run(quickstart_run, tmp_path)
    folder = best.parent
    last = torch.load(folder / "last.ckpt", weights_only=True)
    (state,) = [value for key, value in last["callbacks"].items() if key.startswith("ModelCheckpoint")]
    # a metric's "/" in the filename makes a subfolder, which the file's name alone left out
    for recorded, extra in (("best-v1.ckpt", []), ("ep3.ckpt", ["--checkpoint.filename", "ep{epoch}"]),
                            ("epoch=3-val/nll=1.337.ckpt", ["--checkpoint.filename", "{epoch}-{val/nll:.3f}"])):  # fmt: skip
        (folder / recorded).parent.mkdir(exist_ok=True)
        shutil.copy(best, folder / recorded)
        state["best_model_path"] = str(quickstart_run / "quickstart" / "version_0" / "checkpoints" / recorded)  # before the copy
        torch.save(last, folder / "last.ckpt")
        main(["evaluate", "--config", QUICKSTART, "--ckpt_path", "best", *extra, *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])
        newest = max((tmp_path / "quickstart").glob("version_*"), key=lambda path: int(path.name[8:]))
        assert yaml.safe_load((newest / "config.yaml").read_text())["ckpt_path"] == str(folder / recorded)


def test_ckpt_path_last_or_best_looks_in_a_given_checkpoint_dirpath(quickstart_run, tmp_path, monkeypatch):
    # with --checkpoint.dirpath the run wrote its checkpoints there, not under version_<n>/checkpoints/: last and
    # best looked in the run folder only and said there were none
    folder = tmp_path / "ckpts"
    shutil.copytree(quickstart_run / "quickstart" / "version_0" / "checkpoints", folder)
    os.utime(folder / "last.ckpt", (1, 1))
    shutil.copy(folder / "last.ckpt", folder / "last-v1.ckpt")  # a later run's, in the same folder: the newest
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/ckpts", as ModelCheckpoint reads it: "no ~/ckpts/last.ckpt"
    for which, chosen in (("last", "last-v1.ckpt"), ("best", "best.ckpt")):
        main(["evaluate", "--config", QUICKSTART, "--ckpt_path", which, "--checkpoint.dirpath", "~/ckpts", *FEW_STEPS,
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
        newest = max((tmp_path / "quickstart").glob("version_*"), key=lambda path: int(path.name[8:]))
        assert yaml.safe_load((newest / "config.yaml").read_text())["ckpt_path"] == str(folder / chosen)
    # without save_last, a later run's best is best-v1.ckpt: the first run's best.ckpt was taken
    os.remove(folder / "last.ckpt")
    os.remove(folder / "last-v1.ckpt")
    os.utime(folder / "best.ckpt", (1, 1))
    shutil.copy(folder / "best.ckpt", folder / "best-v1.ckpt")
    main(["evaluate", "--config", QUICKSTART, "--ckpt_path", "best", "--checkpoint.dirpath", str(folder), *FEW_STEPS,
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    newest = max((tmp_path / "quickstart").glob("version_*"), key=lambda path: int(path.name[8:]))
    assert yaml.safe_load((newest / "config.yaml").read_text())["ckpt_path"] == str(folder / "best-v1.ckpt")
    # a filename with a folder ("sub/best") writes into it: "no ck/sub/best.ckpt" of the file that was there
    (folder / "sub").mkdir()
    shutil.copy(folder / "best.ckpt", folder / "sub" / "best.ckpt")
    main(["evaluate", "--config", QUICKSTART, "--ckpt_path", "best", "--checkpoint.dirpath", str(folder), "--checkpoint.filename", "sub/best",
          *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    newest = max((tmp_path / "quickstart").glob("version_*"), key=lambda path: int(path.name[8:]))
    assert yaml.safe_load((newest / "config.yaml").read_text())["ckpt_path"] == str(folder / "sub" / "best.ckpt")
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path best: no .*empty/best.ckpt \(the checkpoint.dirpath given\)"):
        main(["evaluate", "--config", QUICKSTART, "--ckpt_path", "best", "--checkpoint.dirpath", str(tmp_path / "empty"),
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip


def test_a_checkpoint_of_another_module_class_than_the_configs_is_refused(quickstart_run, tmp_path):
    # Lightning built the checkpoint's VariationalModule with DeterministicModule's num_eval_samples=1, in a run
    # folder named after the deterministic config
    best = _copy_run(quickstart_run, tmp_path)
    deterministic = str(REPO / "configs" / "digits_deterministic.yaml")
    for command in ("evaluate", "fit"):
        with pytest.raises(ValueError, match=r"holds a bdl.lightning.VariationalModule, but the config's model is a bdl.lightning.DeterministicModule"):
            main([command, "--config", deterministic, "--ckpt_path", str(best), "--trainer.default_root_dir", str(tmp_path)])
    assert not (tmp_path / "digits_deterministic").exists()


def test_a_checkpoint_brings_its_network_back_and_loads_without_the_network(quickstart_run, tmp_path):
    from bdl.lightning import VariationalModule

    best = _copy_run(quickstart_run, tmp_path)
    # the network's arguments came from this command's config (the module's own from the checkpoint): another
    # activation (or dropout rate), which keeps the weights' shapes, evaluated the trained weights silently
    main(["evaluate", "--config", QUICKSTART, "--ckpt_path", str(best), "--model.init_args.model.init_args.activation", "tanh",
          *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    used = yaml.safe_load((tmp_path / "quickstart" / "version_1" / "config.yaml").read_text())
    assert used["model"]["init_args"]["model"]["init_args"]["activation"] == "relu"
    # and load_from_checkpoint(path) builds the network from the checkpoint (jsonargparse: "required: model")
    module = VariationalModule.load_from_checkpoint(best)
    state = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[key], value) for key, value in state.items())


def test_evaluate_without_a_checkpoint_warns_that_the_weights_are_untrained(tmp_path):
    with pytest.warns(UserWarning, match="without --ckpt_path: the model has the weights the config initialises"):
        main(["evaluate", "--config", QUICKSTART, *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])


def test_test_subcommand_logs_test_metrics_and_writes_the_report(quickstart_run, tmp_path, capsys):
    best = _copy_run(quickstart_run, tmp_path)
    main(["test", "--config", QUICKSTART, "--ckpt_path", str(best), *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    # bdl's table: Lightning's repeated the test set's metrics under the OOD loader's column ("DataLoader 1")
    assert "| accuracy" in out and "OOD AUROC" in out and "DataLoader 1" not in out
    folder = tmp_path / "quickstart" / "version_1"
    report = json.loads((folder / "metrics.json").read_text())
    assert report["num_examples"] == 64 and "ood/predictive_entropy/auroc" in report["metrics"]
    columns = _csv_columns(folder / "metrics.csv")
    assert columns["test/accuracy"][0] == pytest.approx(report["metrics"]["accuracy"], abs=1e-6)


def test_predict_writes_predictions_with_normalised_probabilities(quickstart_run, tmp_path):
    best = _copy_run(quickstart_run, tmp_path)
    main(["predict", "--config", QUICKSTART, "--ckpt_path", str(best), *FEW_STEPS, "--trainer.limit_predict_batches", "1",
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    predictions = torch.load(tmp_path / "quickstart" / "version_1" / "predictions.pt", weights_only=True)
    probs = predictions["probs"]
    assert probs.shape == (64, 8)  # one predict batch of the 8 in-distribution digits
    assert torch.allclose(probs.sum(-1), torch.ones(64), atol=1e-5) and bool((probs >= 0).all())
    assert torch.equal(predictions["predicted_class"], probs.argmax(-1))
    mutual_information = predictions["mutual_information"]
    assert mutual_information.shape == (64,) and bool((mutual_information >= -1e-6).all())
    assert bool((mutual_information <= predictions["predictive_entropy"] + 1e-5).all())


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.init_args.not_a_key", "1"], ["not_a_key", "is not accepted"]),
        (["--model.init_args.lr", "abc"], ['"lr"', "abc"]),
        (["--trainer.max_epochs", "one"], ["max_epochs", "one"]),
        (["--not_a_key", "1"], ["--not_a_key"]),
        # argparse took a prefix for the whole key: it trained with max_epochs 1
        (["--trainer.max_epoch", "1"], ["unrecognized arguments: --trainer.max_epoch 1"]),
    ],
    ids=["unknown-model-key", "lr-not-a-float", "max-epochs-not-an-int", "unknown-top-level-key", "abbreviated-key"],
)
def test_bad_command_line_values_exit_with_a_message_naming_the_key(extra, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *extra, "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in the error message:\n{err}"
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize(
    "typo, expected",
    [
        ({"model": {"init_args": {"prior_sdt": 1.0}}}, ["prior_sdt", "is not accepted"]),
        ({"trainer": {"max_epoch": 1}}, ["trainer.max_epoch"]),
        ({"data": {"init_args": {"batch_size": "big"}}}, ["batch_size", "big"]),
    ],
    ids=["model-key-typo", "trainer-key-typo", "batch-size-not-an-int"],
)
def test_yaml_with_a_typo_or_wrong_type_is_rejected_naming_the_key(typo, expected, tmp_path, capsys):
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    for section, values in typo.items():
        if "init_args" in values:
            config[section]["init_args"].update(values["init_args"])
        else:
            config[section].update(values)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in the error message:\n{err}"
    assert not (tmp_path / "runs").exists()


def test_invalid_value_is_rejected_with_the_module_message(tmp_path):
    with pytest.raises(ValueError, match=r"lr must be a number > 0.0, got -1.0"):
        main(["fit", "--config", QUICKSTART, "--model.init_args.lr", "-1", "--trainer.default_root_dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_mode_against_its_metric_and_a_network_of_the_wrong_size_are_refused(tmp_path):
    # Lightning kept the worst epoch as "best"
    with pytest.raises(ValueError, match=r"checkpoint.monitor 'val/accuracy' is better when higher, but checkpoint.mode is 'min'.*--checkpoint.mode max"):
        main(["fit", "--config", QUICKSTART, "--checkpoint.monitor", "val/accuracy", "--trainer.default_root_dir", str(tmp_path)])
    # ten class scores for the eight digits left after holding out 8 and 9 trained without complaint
    with pytest.raises(ValueError, match=r"the network outputs 10 class scores but DigitsDataModule has 8 classes .*output size to 8"):
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--model.init_args.model.init_args.out_features", "10",
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    # a regression module on class labels failed deep in a reshape
    with pytest.raises(ValueError, match=r"the model's task is 'regression' but DigitsDataModule's is 'classification'"):
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--model.init_args.task", "regression", "--trainer.default_root_dir", str(tmp_path)])
    # a monitor the module never logs failed after the first training epoch, in Lightning's traceback (a warning
    # after the sanity check: a module may log a metric only outside it)
    with pytest.raises(ValueError, match=r"checkpoint.monitor 'val/accurracy' is not a metric the module logs in validation: \['val/accuracy', 'val/ece', 'val/nll'\]"):
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--checkpoint.monitor", "val/accurracy", "--checkpoint.mode", "max",
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- print_config


def test_print_config_prints_loadable_yaml_and_trains_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.init_args.lr", "0.1", "--trainer.limit_val_batches", "1",
              "--trainer.default_root_dir", str(tmp_path), "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "bdl.lightning.VariationalModule"
    assert config["model"]["init_args"]["model"]["class_path"] == "bdl.lightning.MLP"
    assert config["model"]["init_args"]["lr"] == 0.1 and config["model"]["init_args"]["estimator"] == "reparam"
    assert config["data"]["class_path"] == "bdl.lightning.DigitsDataModule"
    assert config["trainer"]["limit_val_batches"] == 1 and isinstance(config["trainer"]["limit_val_batches"], int)
    assert config["evaluate_after_fit"] is True and config["checkpoint"]["save_last"] is True
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing trained


# ------------------------------------------------------------------------------------- DDP on CPU (gloo)

# A data module whose training loader does not shuffle (Lightning still puts a shuffling DistributedSampler
# under DDP, which is why each process takes half of the training set in one full batch: the two halves
# together are the single process's batch, whatever the permutation), and a callback that reseeds torch before
# every training step: Lightning's DDP re-seeds every process after the model is built (reset_seed), a single
# process does not, so without it the weight noise of the two runs would differ for that reason alone.
DDP_MODULE = '''
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from bdl.data.offline import Splits
from bdl.lightning.data import UncertaintyDataModule


class OrderedData(UncertaintyDataModule):
    def __init__(self, num_train: int = 16, num_test: int = 21, batch_size: int = 16, seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        self.num_train_examples, self.num_test_examples = num_train, num_test

    def build(self):
        generator = torch.Generator().manual_seed(self.seed)

        def part(n):
            return TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator))

        return Splits(part(self.num_train_examples), part(self.num_test_examples), part(self.num_test_examples), num_classes=3)

    def train_dataloader(self):
        return DataLoader(self._built().train, batch_size=self.batch_size, shuffle=False)


class ReseedBeforeTrainingStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1234)
'''

DDP_CONFIG = {
    "seed_everything": 0,
    "evaluate_after_fit": True,
    "model": {
        "class_path": "bdl.lightning.VariationalModule",
        "init_args": {
            "model": {"class_path": "bdl.lightning.MLP", "init_args": {"in_features": 4, "out_features": 3, "hidden": [8]}},
            "optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "posterior_std_init": 0.001, "estimator": "reparam",
            "num_val_samples": 2, "num_eval_samples": 4,
        },  # fmt: skip
    },
    "data": {"class_path": "bdl_cli_ddp_data.OrderedData", "init_args": {"num_train": 16, "num_test": 21, "batch_size": 8}},
    "trainer": {
        "accelerator": "cpu", "strategy": "ddp", "devices": 2, "max_steps": 1, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [{"class_path": "bdl_cli_ddp_data.ReseedBeforeTrainingStep"}],
    },  # fmt: skip
}
NUM_TRAIN, NUM_TEST = 16, 21


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """``bdl fit`` with strategy ddp on 2 CPU processes (a subprocess: Lightning relaunches the script per rank)."""
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "bdl_cli_ddp_data.py").write_text(DDP_MODULE)
    config = folder / "ddp.yaml"
    config.write_text(yaml.safe_dump(DDP_CONFIG))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "bdl.lightning.cli", "fit", "--config", str(config),
               "--trainer.default_root_dir", str(folder / "runs")]  # fmt: skip
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=240)
        returncode, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:  # e.g. a collective that only some processes reach
        parts = [part.decode() if isinstance(part, bytes) else (part or "") for part in (error.stdout, error.stderr)]
        returncode, output = None, "timed out after 240 s\n" + "".join(parts)
    return folder, config, returncode, output


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_scales_the_elbo_like_one_process(ddp_run, monkeypatch):
    folder, config, _, output = ddp_run
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    ddp_last = folder / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt"
    assert ddp_last.is_file(), output[-3000:]
    ddp = _state(ddp_last)

    monkeypatch.syspath_prepend(str(folder))
    one_process = ["--trainer.strategy", "auto", "--trainer.devices", "1", "--data.init_args.batch_size", str(NUM_TRAIN),
                   "--evaluate_after_fit", "false"]  # fmt: skip
    main(["fit", "--config", str(config), *one_process, "--trainer.default_root_dir", str(folder / "single")])
    single = _state(folder / "single" / "ddp" / "version_0" / "checkpoints" / "last.ckpt")
    # what a per-process num_data (the 8 examples of a shard) would give: twice the KL weight
    main(["fit", "--config", str(config), *one_process, "--model.init_args.num_data", str(NUM_TRAIN // 2),
          "--trainer.default_root_dir", str(folder / "per_shard")])  # fmt: skip
    per_shard = _state(folder / "per_shard" / "ddp" / "version_0" / "checkpoints" / "last.ckpt")

    assert set(ddp) == set(single)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # the comparison can fail: the KL's share of the step (lr * dKL/drho / num_data ~ 0.5 / 16 on every rho)
    # is far above the tolerance, so a KL scaled by the shard size would be caught
    gap = max((per_shard[name] - single[name]).abs().max().item() for name in single if name.endswith("rho"))
    assert gap > 0.01


@pytest.mark.slow
def test_ddp_test_run_gathers_the_predictions_of_both_processes(ddp_run):
    folder, _, returncode, output = ddp_run
    assert returncode == 0, output[-5000:]
    assert [path.name for path in (folder / "runs" / "ddp").iterdir()] == ["version_0"]  # one folder for both processes
    report = json.loads((folder / "runs" / "ddp" / "version_0" / "metrics.json").read_text())
    # each process predicts ceil(21 / 2) = 11 inputs (the DistributedSampler pads with one repeat); both are
    # gathered and the repeat cut: the report counts each test input once
    assert report["num_examples"] == NUM_TEST
    assert f"OrderedData: {NUM_TEST} test inputs" in output
    # beside Lightning's advice to test on one device (its sampler's repeats), bdl says its metrics leave them out;
    # the headline metrics (the same in every process) are logged synced: no advice to sync them
    assert "test metrics leave out the rows Lightning's DistributedSampler repeats" in output
    assert "sync_dist=True" not in output


@pytest.mark.slow
def test_a_distributed_run_destroys_its_process_group_when_it_ends(ddp_run, monkeypatch):
    folder, config, _, _ = ddp_run
    monkeypatch.syspath_prepend(str(folder))
    one_rank = ["--trainer.strategy", "ddp", "--trainer.devices", "1", "--evaluate_after_fit", "false"]
    environment = dict(os.environ)
    try:
        main(["fit", "--config", str(config), *one_rank, "--trainer.default_root_dir", str(folder / "one_rank")])
    finally:  # Lightning's DDP sets MASTER_PORT, WORLD_SIZE, LOCAL_RANK, ...: later tests must not see them
        os.environ.clear()
        os.environ.update(environment)
    assert (folder / "one_rank" / "ddp" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not torch.distributed.is_initialized()  # left alive, gloo's threads can abort the process at exit


@pytest.mark.slow
def test_ddp_predict_writes_one_file_in_the_data_sets_order(ddp_run, monkeypatch):
    # each process predicted rows r, r + 2, ... (21 rows: 11 and 10), written as predictions.rank<r>.pt
    folder, config, returncode, output = ddp_run
    assert returncode == 0, output[-5000:]
    checkpoint = folder / "runs" / "ddp" / "version_0" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "bdl.lightning.cli", "predict", "--config", str(config), "--ckpt_path", str(checkpoint),
               "--trainer.default_root_dir", str(folder / "predict"), "--model.init_args.num_eval_samples", "1"]  # fmt: skip
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    written = folder / "predict" / "ddp" / "version_0"
    assert sorted(path.name for path in written.glob("predictions*")) == ["predictions.pt"]
    probs = torch.load(written / "predictions.pt", weights_only=True)["probs"]
    monkeypatch.syspath_prepend(str(folder))
    from bdl_cli_ddp_data import OrderedData

    from bdl.lightning import VariationalModule

    x, _ = OrderedData(num_train=NUM_TRAIN, num_test=NUM_TEST)._built().test.tensors
    module = VariationalModule.load_from_checkpoint(checkpoint, weights_only=False)
    import bdl

    with torch.no_grad(), bdl.deterministic(module.model):  # posterior stds of 1e-3: one draw is near the means
        expected = module.model(x).softmax(-1)
    assert probs.shape == expected.shape == (NUM_TEST, 3)
    torch.testing.assert_close(probs, expected, atol=3e-3, rtol=0)
    by_process = torch.cat([torch.arange(0, NUM_TEST, 2), torch.arange(1, NUM_TEST, 2)])  # the processes' rows, one after the other
    assert not torch.allclose(expected[by_process], expected, atol=3e-3)  # so the comparison can fail


@pytest.mark.slow
def test_ddp_spawn_keeps_the_training_curve_and_prints_the_report(tmp_path):
    # every fit or test under ddp_spawn runs in new processes: the test after the fit started metrics.csv afresh,
    # and the calling process, which holds no report, printed nothing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bdl.lightning.cli", "fit", "--config", QUICKSTART, *FEW_STEPS, "--trainer.accelerator", "cpu",
               "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    columns = _csv_columns(tmp_path / "quickstart" / "version_0" / "metrics.csv")
    assert {"train/loss_epoch", "val/nll", "test/nll"} <= columns.keys()
    assert "| accuracy" in result.stdout


def test_evaluate_prints_a_report_written_by_this_test_only(tmp_path, capsys):
    # under ddp_spawn the calling process has no report and prints the metrics.json the test wrote; an older one (a
    # previous run's, in a resumed folder) was printed as this run's
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from bdl.lightning.cli import Trainer

    report = {"task": "classification", "num_examples": 4, "num_ood_examples": None, "num_samples": 2,
              "metrics": {"accuracy": 0.25, "nll": 1.5}}  # fmt: skip

    class Plain(L.LightningModule):  # no bdl report
        def __init__(self, write):
            super().__init__()
            self.layer, self.write = torch.nn.Linear(2, 2), write

        def test_step(self, batch, batch_idx):
            return None

        def on_test_end(self):
            if self.write:
                (tmp_path / "metrics.json").write_text(json.dumps(report))

    (tmp_path / "metrics.json").write_text(json.dumps({**report, "metrics": {"accuracy": 0.99, "nll": 0.01}}))
    old = tmp_path / "metrics.json"
    os.utime(old, (old.stat().st_atime - 3600, old.stat().st_mtime - 3600))
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    capsys.readouterr()
    trainer.evaluate(Plain(write=False), loader)
    assert "| accuracy" not in capsys.readouterr().out
    trainer.evaluate(Plain(write=True), loader)
    out = capsys.readouterr().out
    assert "| accuracy" in out and "0.2500" in out


def test_evaluate_prints_the_headline_metrics_when_no_report_came_back(tmp_path, monkeypatch, capsys):
    # ddp_spawn without a logger (or with save_report off): the processes that tested kept the report, and `bdl test`
    # printed nothing at all; the logged headline metrics do come back
    from torch.utils.data import DataLoader, TensorDataset

    from bdl.lightning import MLP, VariationalModule
    from bdl.lightning.cli import Trainer

    module = VariationalModule(MLP(4, 3, hidden=[4]), num_data=10)
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    monkeypatch.setattr(Trainer, "test", lambda self, *args, **kwargs: [{"test/accuracy": 0.75, "test/nll": 0.5}])
    trainer.evaluate(module, DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))
    out = capsys.readouterr().out
    assert "no report came back to this process" in out and "| accuracy" in out and "0.7500" in out
    trainer.evaluate(torch.nn.Linear(4, 3), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))  # not bdl's
    assert capsys.readouterr().out == ""  # it printed an empty table


def test_a_first_run_that_fails_leaves_no_empty_root_folder(tmp_path, monkeypatch):
    # the run folders went, the runs/ the run had created stayed, empty
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="checkpoint.monitor 'val/accuracy' is better when higher"):
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--checkpoint.monitor", "val/accuracy", "--trainer.default_root_dir", "runs"])
    with pytest.raises(ValueError, match=r"the network outputs 10 class scores"):
        main(["fit", "--config", QUICKSTART, *FEW_STEPS, "--model.init_args.model.init_args.out_features", "10",
              "--trainer.default_root_dir", "runs"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.init_args.prior_std", "-1"], "model (bdl.lightning.VariationalModule): prior_std must be a number > 0.0, got -1.0"),
        (["--data.init_args.batch_size", "0"], "data (bdl.lightning.DigitsDataModule): batch_size must be a positive int, got 0"),
        (["--model.init_args.model.init_args.hidden", "[-3]"], "model (bdl.lightning.VariationalModule): MLP: hidden[0] must be a positive int, got -3"),
        # the network's own rate, not VariationalModule's
        (["--model.init_args.model.init_args.dropout", "-1"], "model (bdl.lightning.VariationalModule): MLP: dropout must be a rate in [0, 1), got -1.0"),
        # a nested class by its key, not "model (bdl.ScaleMixturePrior): (bdl.ScaleMixturePrior): ..."
        (["--model.init_args.prior", "bdl.ScaleMixturePrior", "--model.init_args.prior.init_args.scale1", "-1"],
         "model (bdl.lightning.VariationalModule): prior (bdl.ScaleMixturePrior): ScaleMixturePrior: scale1 must be a positive finite number, got -1.0"),
        # Lightning's MisconfigurationException was a traceback
        (["--trainer.accelerator", "mps"], "`MPSAccelerator` can not run on your system since the accelerator is not available. "),
    ],
)
def test_the_bdl_command_says_which_class_refused_a_value_in_one_line(override, expected, tmp_path, monkeypatch, capsys):
    # the class's own message came under jsonargparse's "Does not validate against any of the Union subtypes" and
    # the whole resolved config
    from bdl.lightning.cli import console

    argv = ["bdl", "fit", "--config", QUICKSTART, *override, "--trainer.default_root_dir", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        console()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"bdl: error: {expected}")  # (then the machine's accelerators)


def test_the_checkpoint_callback_keeps_the_best_path_of_another_folder_and_warns_of_a_foreign_folders_files(tmp_path):
    # skipping Lightning's "dirpath has changed" on a validate from another run's checkpoint dropped its best path:
    # test(ckpt_path="best") then failed; and a resume that writes into another non-empty folder is warned of
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    def trainer(folder, **options):
        callback = Checkpoint(dirpath=str(folder), monitor="val/nll", filename="best", **options)
        return L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path)), callback  # fmt: skip

    from bdl.lightning import DeterministicModule

    first, callback = trainer(tmp_path / "first")
    first.fit(DeterministicModule(torch.nn.Linear(4, 3)), loader, loader)
    best = callback.best_model_path
    second, _ = trainer(tmp_path / "second")
    module = DeterministicModule(torch.nn.Linear(4, 3), save_report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.validate(module, loader, ckpt_path=best, verbose=False)
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert second.checkpoint_callback.best_model_path == best
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second.test(module, [loader], ckpt_path="best", verbose=False)
    for resumed, warned in ((tmp_path / "first", False), (tmp_path / "elsewhere", True)):
        third, callback = trainer(tmp_path / "first")
        callback._resumed_folder = str(resumed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            third.fit(DeterministicModule(torch.nn.Linear(4, 3)), loader, loader)
        assert any("exists and is not empty" in str(w.message) for w in caught) == warned


def test_a_callers_parser_options_keep_abbreviations_refused(tmp_path, monkeypatch, capsys):
    # parser_kwargs of a caller replaced bdl's allow_abbrev=False as a whole
    monkeypatch.setattr(sys, "argv", ["bdl"])
    args = ["--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path)]
    assert BDLCLI(args=args, run=False, parser_kwargs={"default_env": False}).config["trainer"]["default_root_dir"] == str(tmp_path)
    with pytest.raises(SystemExit):
        BDLCLI(args=[*args, "--trainer.max_epoch", "1"], run=False, parser_kwargs={"default_env": False})
    assert "unrecognized arguments: --trainer.max_epoch 1" in capsys.readouterr().err


def test_the_bdl_commands_error_in_another_process_than_0_says_which(tmp_path, monkeypatch, capsys):
    # under DDP each process printed the same line: the second copy is labelled as its process's
    from lightning.pytorch.utilities import rank_zero_only

    from bdl.lightning.cli import console

    argv = ["bdl", "fit", "--config", QUICKSTART, "--data.init_args.batch_size", "0", "--trainer.default_root_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(SystemExit):
        console()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("bdl: error (process 1): data (bdl.lightning.DigitsDataModule)")


class _WorseEachEpoch(L.LightningModule):
    """Logs val/nll = the epoch: only epoch 0's checkpoint is the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/nll", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "limits, last_step",
    [
        ({}, 6),
        ({"max_steps": 5}, 4),
        ({"check_val_every_n_epoch": 2}, 6),
        ({"check_val_every_n_epoch": 2, "max_steps": 3}, 2),
        ({"max_steps": 1}, 1),
        ({"val_check_interval": 0.5, "max_steps": 3}, 2),
    ],
)
def test_last_ckpt_is_the_newest_state_when_the_best_is_older(tmp_path, limits, last_step):
    # Lightning 2.6 rewrote last.ckpt only with a new best: it stayed at epoch 0 (global step 2 of 6), and
    # --ckpt_path last trained the later epochs again; a run stopped partway through an epoch keeps the epoch end
    # before (Lightning resumes a checkpoint of step 5 as if its epoch were over), but for Lightning's own where it
    # saved none (stopped in the first epoch); one whose last epoch has no validation ends with the final step's
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    checkpoint = Checkpoint(dirpath=tmp_path, filename="best", monitor="val/nll", mode="min", save_last=True)
    trainer = L.Trainer(max_epochs=3, **limits, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)  # fmt: skip
    trainer.fit(_WorseEachEpoch(), data, data)
    if "max_steps" not in limits:
        assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == (2 if "check_val_every_n_epoch" not in limits else 4)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == last_step and trainer.global_step == limits.get("max_steps", 6)
    assert any(key.startswith("ModelCheckpoint{") for key in last["callbacks"])  # resumable by runs from before
