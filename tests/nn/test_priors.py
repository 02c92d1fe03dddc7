import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

import bdl
from bdl.nn.functional import kl_normal_normal, kl_normal_normal_exp, rho_value


@pytest.mark.parametrize("std_transform", ["exp", "softplus"])
@pytest.mark.parametrize("prior_loc, prior_scale", [(0.0, 1.0), (0.3, 0.2), ("tensor", "tensor")])
def test_gaussian_kl_matches_torch_distributions(std_transform, prior_loc, prior_scale):
    layer = bdl.BayesConv2d(3, 4, 3, posterior_std_init=0.1, std_transform=std_transform)
    with torch.no_grad():
        layer.weight_mu.normal_()
        layer.weight_rho.add_(torch.randn_like(layer.weight_rho))
        layer.bias_mu.normal_()
    if prior_loc == "tensor":
        layer.weight_prior = bdl.GaussianPrior(torch.randn(4, 3, 3, 3), torch.rand(4, 3, 3, 3) + 0.1)
        layer.bias_prior = bdl.GaussianPrior(torch.randn(4), 0.7)
    else:
        layer.weight_prior = layer.bias_prior = bdl.GaussianPrior(prior_loc, prior_scale)
    expected = sum(
        kl_divergence(Normal(mu, std), Normal(prior.loc, prior.scale)).sum()
        for mu, std, prior in [
            (layer.weight_mu, layer.weight_std, layer.weight_prior),
            (layer.bias_mu, layer.bias_std, layer.bias_prior),
        ]
    )
    torch.testing.assert_close(layer.kl_divergence(), expected, rtol=1e-5, atol=1e-4)


def test_fused_kl_gradients_match_autograd():
    mu = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    rho = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, r: kl_normal_normal_exp(m, r, 0.3, 0.7), (mu, rho))
    fused = torch.autograd.grad(kl_normal_normal_exp(mu, rho, 0.3, 0.7), (mu, rho))
    plain = torch.autograd.grad(kl_normal_normal(mu, rho.exp(), 0.3, 0.7), (mu, rho))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_a_large_layers_kl_is_float32_accurate_before_and_after_a_forward(estimator):
    # a million equal stds at the prior's scale: torch.dot's sequential float32 sum was 5e-4 off, which the KL's
    # cancelling terms made +240 nats of 5001 after a training forward (the fused node), and +0.08 before
    layer = bdl.BayesLinear(1000, 1000, bias=False, prior=bdl.GaussianPrior(0.0, 0.1), posterior_std_init=0.1, estimator=estimator)
    with torch.no_grad():
        layer.weight_mu.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    expected = layer.weight_mu.double().square().sum().item() / (2 * 0.1**2)  # the std terms cancel exactly
    before = layer.kl_divergence().item()
    layer(torch.randn(2, 1000))
    assert before == pytest.approx(expected, rel=2e-4) and layer.kl_divergence().item() == pytest.approx(expected, rel=2e-4)


def test_forward_mode_derivatives_of_the_kl_match_reverse_mode():
    # the fused KL had no jvp: torch.func.jvp, jacfwd and hessian raised NotImplementedError (std_transform='exp')
    mu = torch.randn(2, 3, dtype=torch.double)
    rho = torch.randn(2, 3, dtype=torch.double) * 0.3

    def kl(mu, rho):
        return kl_normal_normal_exp(mu, rho, 0.3, 0.7)

    for argnums in (0, 1):
        torch.testing.assert_close(torch.func.jacfwd(kl, argnums)(mu, rho), torch.func.jacrev(kl, argnums)(mu, rho))
    torch.testing.assert_close(torch.func.hessian(kl, (0, 1))(mu, rho), torch.func.jacrev(torch.func.jacrev(kl, (0, 1)), (0, 1))(mu, rho))
    _, tangent = torch.func.jvp(kl, (mu, rho), (torch.ones_like(mu), torch.zeros_like(rho)))
    torch.testing.assert_close(tangent, ((mu - 0.3) / 0.49).sum())


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_forward_mode_derivatives_through_a_sampling_layer(estimator):
    # the fused weight-and-KL node, the scaled noise and the out= draws had no forward-mode rule: NotImplementedError
    # for a Hessian-vector product in weight_rho (jvp of grad), and for eager forward AD of dual parameters
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    layer = bdl.BayesLinear(3, 2, estimator=estimator, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = dict(layer.named_parameters())
    rho, tangent = params["weight_rho"].detach(), torch.randn(2, 3, dtype=torch.float64)

    def call(rho):
        return torch.func.functional_call(layer, {**params, "weight_rho": rho}, (x,))

    def loss(rho):  # the data term and the KL, both of this rho
        return call(rho).square().sum() + kl_normal_normal_exp(params["weight_mu"], rho, 0.0, 1.0)

    torch.manual_seed(1)
    _, hvp = torch.func.jvp(torch.func.grad(loss), (rho,), (tangent,))
    torch.manual_seed(1)
    hessian = torch.func.jacrev(torch.func.jacrev(loss))(rho)
    torch.testing.assert_close(hvp, (hessian * tangent).sum((2, 3)))
    # eager forward-over-reverse against eager reverse-over-reverse (flipout's signs are drawn otherwise under
    # torch.func): the KL's curvature in rho (2 exp(2 rho) t) was left out
    leaf = rho.clone().requires_grad_()
    torch.manual_seed(1)
    (gradient,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    (expected,) = torch.autograd.grad(gradient, leaf, tangent)
    with fwAD.dual_level():
        dual = fwAD.make_dual(rho.clone().requires_grad_(), tangent)
        torch.manual_seed(1)
        (gradient,) = torch.autograd.grad(loss(dual), dual)
        torch.testing.assert_close(fwAD.unpack_dual(gradient).tangent, expected)
    for gradients in (True, False):  # the training forward and the prediction path
        with torch.set_grad_enabled(gradients), fwAD.dual_level():
            torch.manual_seed(2)
            derivative = fwAD.unpack_dual(call(fwAD.make_dual(rho, tangent))).tangent
        differences = []
        for step in (1e-6, -1e-6):
            torch.manual_seed(2)
            with torch.set_grad_enabled(gradients):
                differences.append(call(rho + step * tangent))
        torch.testing.assert_close(derivative, (differences[0] - differences[1]) / 2e-6, atol=1e-6, rtol=1e-5)


def test_a_kl_computed_under_vmap_has_gradients():
    # the forward-mode class saved other tensors for forward than for backward: its generated vmap rule failed
    mu, rho = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    torch.vmap(lambda m, r: kl_normal_normal_exp(m, r, 0.0, 0.5))(mu, rho).sum().backward()
    torch.testing.assert_close(mu.grad, mu.detach() / 0.25)
    torch.testing.assert_close(rho.grad, (2 * rho.detach()).exp() / 0.25 - 1)


def test_model_kl_sums_layers():
    model = torch.nn.Sequential(bdl.BayesLinear(4, 8), torch.nn.ReLU(), bdl.BayesLinear(8, 2, prior=0.5))
    torch.testing.assert_close(bdl.kl_divergence(model), model[0].kl_divergence() + model[2].kl_divergence())
    assert bdl.kl_divergence(torch.nn.Linear(3, 2)).item() == 0.0


def test_kl_is_zero_when_posterior_equals_prior():
    layer = bdl.BayesLinear(4, 3, posterior_std_init=0.5, prior=bdl.GaussianPrior(0.0, 0.5))
    with torch.no_grad():
        layer.weight_mu.zero_()
        layer.bias_mu.zero_()
    torch.testing.assert_close(layer.kl_divergence(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_scale_mixture_log_prob_matches_torch_mixture():
    prior = bdl.ScaleMixturePrior(scale1=1.0, scale2=math.exp(-6), mixture_weight=0.3)
    reference = MixtureSameFamily(Categorical(torch.tensor([0.3, 0.7])), Normal(torch.zeros(2), torch.tensor([1.0, math.exp(-6)])))
    w = torch.randn(1000) * 0.5
    torch.testing.assert_close(prior.log_prob(w), reference.log_prob(w), rtol=1e-5, atol=1e-5)


def test_scale_mixture_monte_carlo_kl_is_unbiased():
    prior = bdl.ScaleMixturePrior(scale1=1.0, scale2=0.05, mixture_weight=0.5)
    loc, std = torch.randn(50) * 0.3, torch.rand(50) * 0.2 + 0.05
    # reference: a large Monte Carlo average of log q - log p with torch.distributions
    q = Normal(loc, std)
    reference_prior = MixtureSameFamily(Categorical(torch.tensor([0.5, 0.5])), Normal(torch.zeros(2), torch.tensor([1.0, 0.05])))
    w = q.sample((20000,))
    expected = (q.log_prob(w) - reference_prior.log_prob(w)).mean(0).sum()
    estimates = torch.stack([prior.kl_divergence(loc, std) for _ in range(4000)])
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - expected) < 4 * standard_error + 0.05
    # and a Gaussian prior with the same variance gives a clearly different KL: the test can tell them apart
    gaussian = kl_divergence(q, Normal(0.0, math.sqrt(0.5 * 1.0 + 0.5 * 0.05**2))).sum()
    assert abs(gaussian - expected) > 10 * standard_error


def test_mixture_prior_kl_has_gradients_in_a_layer():
    layer = bdl.BayesLinear(4, 3, prior=bdl.ScaleMixturePrior())
    layer.kl_divergence().backward()
    assert layer.weight_rho.grad.abs().sum() > 0 and layer.weight_mu.grad.abs().sum() > 0


def test_second_order_gradients_through_a_mixture_prior_kl_are_finite_and_right():
    # torch.logaddexp's double backward gave NaN once the log densities differed by 709 (|w| > 0.1 at scale2 = e^-6)
    prior = bdl.ScaleMixturePrior()
    w = torch.tensor([0.5, -2.0, 1e-3, 0.0], dtype=torch.float64, requires_grad=True)

    def penalty(w):
        (grad,) = torch.autograd.grad(prior.log_prob(w).sum(), w, create_graph=True)
        return grad.square().sum()

    assert torch.autograd.gradcheck(penalty, (w,))
    huge = torch.tensor([float("inf"), -float("inf"), 1e20])  # w^2 overflows: -inf, as logaddexp gave (not NaN)
    assert prior.log_prob(huge).tolist() == [-math.inf] * 3 and prior.log_prob(torch.tensor([300.0]).half()).item() == -math.inf
    torch.testing.assert_close(prior.log_prob(w.detach()), torch.logsumexp(torch.stack([
        Normal(0.0, 1.0).log_prob(w.detach()) + math.log(0.5), Normal(0.0, math.exp(-6)).log_prob(w.detach()) + math.log(0.5)]), 0))


def test_prior_arguments_of_other_forms():
    # a one-element tensor as the scales (it was "must be in (0, 1), got tensor(0.5000)"), meta scales as meta locs
    assert bdl.ScaleMixturePrior(mixture_weight=torch.tensor(0.25)).mixture_weight == 0.25
    with torch.device("meta"):
        layer = bdl.BayesLinear(3, 2, bias=False, prior=bdl.GaussianPrior(0.0, torch.full((2, 3), 0.1)))
    assert layer.weight_prior.scale.is_meta  # it raised: Tensor.item() cannot be called on meta tensors
    with pytest.raises(ValueError, match=r"std_transform must be one of \['exp', 'softplus'\], got 'Exp'"):
        bdl.GaussianPrior(0.0, 1.0).posterior_kl(torch.zeros(3), torch.zeros(3), "Exp")  # it took softplus's stds
    with pytest.raises(ValueError, match="got 'sigmoid'"):
        rho_value(1.0, "sigmoid")
    for name in ("scale1", "mixture_weight"):  # kept as floats: float() of a meta tensor named nothing
        with pytest.raises(ValueError, match=f"{name} must be a number .*got a meta tensor"):
            bdl.ScaleMixturePrior(**{name: torch.tensor(0.5, device="meta")})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: bdl.GaussianPrior(0.0, 0.0), "scale must be a positive"),
        (lambda: bdl.GaussianPrior(0.0, -2.0), "scale must be a positive"),
        (lambda: bdl.GaussianPrior(0.0, torch.tensor([1.0, -1.0])), "scale must be positive"),
        (lambda: bdl.GaussianPrior(float("nan"), 1.0), "loc must be a finite number"),  # every KL was NaN
        (lambda: bdl.GaussianPrior(torch.tensor([0.0, float("inf")]), 1.0), "loc must be a finite number"),
        (lambda: bdl.ScaleMixturePrior(scale1=-1.0), "scale1"),
        (lambda: bdl.ScaleMixturePrior(scale2=0.0), "scale2"),
        (lambda: bdl.ScaleMixturePrior(mixture_weight=0.0), "mixture_weight"),
        (lambda: bdl.ScaleMixturePrior(mixture_weight=1.5), "mixture_weight"),
    ],
)
def test_invalid_prior_parameters_raise_value_error_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()
