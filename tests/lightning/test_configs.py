"""Every ready config loads; the offline ones train for a few steps and write their report."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from cli_args import FEW_STEPS

from bdl.lightning.cli import main

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
# Configs that need downloads (torchvision data sets) are only loaded, not run.
OFFLINE = [path for path in CONFIGS if not path.name.startswith(("cifar10_", "mnist_"))]


def test_there_is_a_config_per_method_and_offline_data_set():
    names = {path.stem for path in CONFIGS}
    for data in ("digits", "mnist1d", "regression_gap"):
        for method in ("deterministic", "variational", "mc_dropout", "ensemble", "svi"):
            assert f"{data}_{method}" in names
    assert {"quickstart", "cifar10_resnet18_deterministic"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_resolves_with_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("bdl.lightning.")
    assert resolved["data"]["class_path"].startswith("bdl.lightning.")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bdl"])  # LightningCLI warns when pytest's own arguments are there too


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d")


@pytest.mark.slow
@pytest.mark.parametrize("config", OFFLINE, ids=[path.stem for path in OFFLINE])
def test_offline_config_trains_a_few_steps_and_writes_the_report(config, tmp_path, mnist1d_cache, capsys):
    args = ["fit", "--config", str(config), *FEW_STEPS, "--trainer.default_root_dir", str(tmp_path)]
    if config.name.startswith("mnist1d"):
        args += ["--data.init_args.cache_dir", str(mnist1d_cache)]
    main(args)
    # an ensemble's samples are its members' predictions, not Monte Carlo draws
    said = "predictions per input from 5 members" if "ensemble" in config.stem else "Monte Carlo samples per input"
    assert said in capsys.readouterr().out
    folder = tmp_path / config.stem / "version_0"
    metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
    assert any(key.startswith("ood/") for key in metrics)
    assert (folder / "config.yaml").exists() and (folder / "checkpoints" / "last.ckpt").exists()
