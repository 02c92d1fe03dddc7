import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdl
from bdl.nn.heads import GaussianHead, GaussianNLLLoss, GaussianOutput, gaussian_nll


@pytest.mark.parametrize(
    "variance, transform",
    [("softplus", lambda raw: F.softplus(raw) + 1e-3), ("exp", lambda raw: raw.exp() + 1e-3)],
)
def test_head_splits_mean_and_documented_variance_transform(variance, transform):
    head = GaussianHead(5, 2, variance=variance, min_variance=1e-3)
    x = torch.randn(7, 5)
    raw = head.linear(x)
    out = head(x)
    assert isinstance(out, GaussianOutput) and out.mean.shape == out.variance.shape == (7, 2)
    torch.testing.assert_close(out.mean, raw[:, :2])
    torch.testing.assert_close(out.variance, transform(raw[:, 2:]))


def test_min_variance_floors_the_variance():
    head = GaussianHead(1, 1, min_variance=0.25)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.fill_(-50.0)  # softplus(-50) ~ 2e-22
    assert torch.allclose(head(torch.randn(3, 1)).variance, torch.full((3, 1), 0.25))


def test_gaussian_nll_matches_torch_distributions_summed_over_outputs():
    mean, variance, target = torch.randn(6, 3), torch.rand(6, 3) + 0.1, torch.randn(6, 3)
    per_example = -torch.distributions.Normal(mean, variance.sqrt()).log_prob(target).sum(-1)
    torch.testing.assert_close(gaussian_nll(mean, variance, target, reduction="none"), per_example)
    torch.testing.assert_close(gaussian_nll(mean, variance, target), per_example.mean())
    torch.testing.assert_close(gaussian_nll(mean, variance, target, reduction="sum"), per_example.sum())
    # torch's loss averages over elements: ours is D times it
    torch_loss = F.gaussian_nll_loss(mean, target, variance, full=True, eps=0.0)
    torch.testing.assert_close(gaussian_nll(mean, variance, target), 3 * torch_loss)


def test_gaussian_nll_accepts_flat_targets_for_one_output():
    mean, variance, target = torch.randn(4, 1), torch.rand(4, 1) + 0.5, torch.randn(4)
    torch.testing.assert_close(gaussian_nll(mean, variance, target), gaussian_nll(mean, variance, target[:, None]))


def test_gaussian_nll_of_an_empty_batch():
    empty = torch.zeros(0, 2)
    assert gaussian_nll(empty, empty + 1, empty, reduction="none").shape == (0,)
    assert gaussian_nll(empty, empty + 1, empty, reduction="sum").item() == 0.0


def test_loss_module_takes_the_head_output_and_trains_through_elbo():
    model = nn.Sequential(bdl.BayesLinear(2, 8), nn.Tanh(), GaussianHead(8, 1, linear=bdl.BayesLinear))
    assert sum(isinstance(m, bdl.BayesianModule) for m in model.modules()) == 2
    criterion = bdl.ELBOLoss(model, num_data=100, criterion=GaussianNLLLoss())
    loss, nll, kl = criterion(model(torch.randn(16, 2)), torch.randn(16, 1))
    loss.backward()
    assert kl > 0 and model[2].linear.weight_rho.grad is not None


def test_head_learns_the_noise_level_of_homoscedastic_data(one_thread):
    torch.manual_seed(0)
    x = torch.rand(512, 1) * 4 - 2
    y = 1.5 * x + 0.5 * torch.randn_like(x)  # noise variance 0.25
    head = GaussianHead(1, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        GaussianNLLLoss()(head(x), y).backward()
        optimizer.step()
    out = head(x)
    assert abs(out.variance.mean().item() - 0.25) < 0.04
    assert abs(head.linear.weight[0, 0].item() - 1.5) < 0.1


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GaussianHead(4, 1, variance="log"), "variance must be one of"),
        (lambda: GaussianHead(4, 1, min_variance=-1.0), "min_variance"),
        (lambda: GaussianHead(0, 1), "in_features"),
        (lambda: GaussianNLLLoss(reduction="avg"), "reduction"),
        (lambda: gaussian_nll(torch.zeros(3, 2), torch.ones(3, 1), torch.zeros(3, 2)), "variance must have the shape"),
        (lambda: gaussian_nll(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3)), "target must have the shape"),
    ],
)
def test_bad_arguments_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_loss_module_rejects_a_plain_tensor_output():
    with pytest.raises(TypeError, match="GaussianHead"):
        GaussianNLLLoss()(torch.zeros(3, 2), torch.zeros(3, 1))


def test_nll_constant_is_half_log_two_pi():
    value = gaussian_nll(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1))
    assert math.isclose(value.item(), 0.5 * math.log(2 * math.pi), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_nll_is_computed_in_float32(dtype):
    # residual 300: its square overflowed float16 before the division by the variance (an NLL of 10 gave inf)
    mean = torch.zeros(2, 1, dtype=dtype, requires_grad=True)
    variance, target = torch.full((2, 1), 1e4, dtype=dtype), torch.full((2,), 300.0, dtype=dtype)
    value = gaussian_nll(mean, variance, target)
    exact = 0.5 * (math.log(2 * math.pi * 1e4) + 300.0**2 / 1e4)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(exact, rel=1e-3)
    value.backward()
    assert mean.grad.dtype == dtype and bool(torch.isfinite(mean.grad).all())
    assert GaussianNLLLoss()((mean, variance), target).item() == value.item()


def test_head_takes_numpy_integer_sizes_as_nn_linear_does():
    import numpy as np

    head = GaussianHead(np.prod((4, 4)), np.int64(2))
    assert (head.in_features, head.out_features) == (16, 2) and type(head.in_features) is int
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        GaussianHead(4.0, 2)
