"""The same config and seed give the same metrics twice on CPU; another seed gives other metrics.

Each method's tiny digits config is fitted with ``bdl fit`` (in-process, ``bdl.lightning.cli.main``) with
``evaluate_after_fit: true``: twice with ``seed_everything: 0``, whose ``metrics.json`` files must be equal
to the last digit, and once with ``seed_everything: 1`` (the control: the seed reaches the weights, the
Monte Carlo noise and the data order, so the metrics move).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bdl.evaluate import Report
from bdl.lightning.cli import main

NETWORK = {"class_path": "bdl.lightning.MLP", "init_args": {"in_features": 64, "out_features": 8, "hidden": [32]}}
METHODS = {
    "variational": {
        "class_path": "bdl.lightning.VariationalModule",
        "init_args": {"model": NETWORK, "kl_warmup_epochs": 1, "lr": 0.003, "num_val_samples": 4, "num_eval_samples": 8},
    },
    "mc_dropout": {
        "class_path": "bdl.lightning.MCDropoutModule",
        "init_args": {
            "model": {**NETWORK, "init_args": {**NETWORK["init_args"], "dropout": 0.2}},
            "lr": 0.003, "num_val_samples": 4, "num_eval_samples": 8,
        },
    },
}  # fmt: skip


def _config(tmp_path: Path, method: str) -> Path:
    config = {
        "seed_everything": 0,
        "evaluate_after_fit": True,
        "model": METHODS[method],
        "data": {"class_path": "bdl.lightning.DigitsDataModule", "init_args": {"ood": "classes", "ood_classes": [8, 9], "batch_size": 32}},
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2, "accelerator": "cpu", "devices": 1,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
        },
    }  # fmt: skip
    path = tmp_path / f"digits_{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, root: Path, seed: int, monkeypatch) -> Path:
    """One ``bdl fit`` run into ``root``; its run folder."""
    monkeypatch.setattr(sys, "argv", ["bdl"])  # LightningCLI reads sys.argv when pytest's arguments are there
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them
        monkeypatch.delenv(name, raising=False)
    main(["fit", "--config", str(config), "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)])
    folder = root / config.stem / "version_0"
    assert (folder / "metrics.json").is_file(), sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    return folder


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_config_and_seed_give_the_same_metrics_and_another_seed_does_not(method, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(Report, "figures", lambda self: {})  # the PNGs are most of a run's time; metrics.json is compared
    config = _config(tmp_path, method)
    first = _fit(config, tmp_path / "first", 0, monkeypatch)
    second = _fit(config, tmp_path / "second", 0, monkeypatch)
    other_seed = _fit(config, tmp_path / "other_seed", 1, monkeypatch)

    assert _metrics(first) == _metrics(second)  # exactly: every float of metrics.json, the sizes and settings
    assert _metrics(first)["metrics"]["accuracy"] > 0.3  # it trained on real data (8 classes: chance is 0.125)
    first_weights, second_weights = _weights(first), _weights(second)
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)

    changed = [key for key, value in _metrics(first)["metrics"].items() if _metrics(other_seed)["metrics"][key] != value]
    assert len(changed) >= len(_metrics(first)["metrics"]) // 2, f"seed 1 changed only {changed}"
