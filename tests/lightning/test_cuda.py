"""GPU runs: the configs written for a GPU, every method on a GPU, and the Pyro engines on CUDA tensors.

Skipped without a CUDA device (see ``tests/conftest.py``).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_args import FEW_STEPS
from fake_datasets import write_cifar10, write_svhn
from torch import nn

import bdl
from bdl.infer import PyroModel, svi
from bdl.lightning.cli import main

pytestmark = pytest.mark.cuda
CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bdl"])


def run_on_gpu(config: Path, root: Path, *extra: str) -> dict:
    main(["fit", "--config", str(config), *FEW_STEPS, "--trainer.accelerator", "gpu",
          "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
    folder = root / config.stem / "version_0"
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = [t for t in checkpoint["state_dict"].values() if t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    return json.loads((folder / "metrics.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS.glob("cifar10_resnet18_*.yaml")), ids=lambda path: path.stem)
def test_cifar_resnet_configs_train_on_the_gpu_at_their_precision(config, tmp_path):
    write_cifar10(tmp_path / "data")
    write_svhn(tmp_path / "data" / "SVHN")
    metrics = run_on_gpu(
        config, tmp_path / "runs", "--data.init_args.data_dir", str(tmp_path / "data"),
        "--data.init_args.download", "false", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
    )  # fmt: skip
    assert 0 <= metrics["accuracy"] <= 1 and "ood/predictive_entropy/auroc" in metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", ["deterministic", "variational", "mc_dropout", "ensemble", "svi"])
def test_every_method_trains_and_reports_on_the_gpu(method, tmp_path):
    metrics = run_on_gpu(CONFIGS / f"digits_{method}.yaml", tmp_path)
    assert 0 <= metrics["accuracy"] <= 1 and all(value is None or value == value for value in metrics.values())


def test_ensemble_vmap_and_loop_agree_on_the_gpu():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).cuda() for _ in range(4)]
    x = torch.randn(10, 6, device="cuda")
    vmap = bdl.DeepEnsemble(members, method="vmap")(x)
    loop = bdl.DeepEnsemble(members, method="loop")(x)
    assert vmap.is_cuda and torch.allclose(vmap, loop, atol=1e-5)
    assert bdl.DeepEnsemble(members).resolve_method() == "loop"  # measured faster on GPUs too


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_batched_and_loop_predictions_agree_on_the_gpu(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(5, 32, estimator=estimator, posterior_std_init=0.3), nn.ReLU(),
                          bdl.BayesLinear(32, 3, estimator=estimator, posterior_std_init=0.3)).cuda()  # fmt: skip
    x = torch.randn(4, 5, device="cuda")
    batched = bdl.predict(model, x, num_samples=4000, method="batched", keep_samples=True)
    loop = bdl.predict(model, x, num_samples=4000, method="loop", keep_samples=True)
    assert batched.probs.is_cuda and batched.probs.shape == loop.probs.shape == (4, 3)
    # 4000 draws: the mean probabilities agree to a few standard errors; the samples are not all alike
    assert torch.allclose(batched.probs, loop.probs, atol=0.03)
    assert batched.sample_probs.std(0).min() > 1e-3


def test_svi_fits_a_network_on_the_gpu():
    torch.manual_seed(0)
    x = torch.randn(64, 3, device="cuda")
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).cuda()
    fitted = svi(PyroModel(net, likelihood="categorical", prior_scale=1.0), x, y, num_steps=200, lr=0.05)
    pred = fitted.predict(x, num_samples=50)
    assert pred.probs.is_cuda
    assert fitted.losses[-1] < fitted.losses[0] and (pred.predicted_class == y).float().mean() > 0.85
