"""A training forward computes each layer's KL in the node that draws its weights (one backward pass
per parameter); kl_divergence() returns that KL while it is valid and recomputes it otherwise."""

import copy
import io
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import bdl
from bdl.nn.layers import _BayesLayer

LAYERS = {
    "linear": (lambda **kw: bdl.BayesLinear(5, 3, **kw), (4, 5)),
    "conv2d": (lambda **kw: bdl.BayesConv2d(2, 3, 3, padding=1, **kw), (2, 2, 5, 5)),
}
PRIOR = bdl.nn.GaussianPrior(0.2, 0.6)


def elbo_gradients(layer, x, seed, kl_weight=0.37):
    torch.manual_seed(seed)
    out = layer(x)
    kl = layer.kl_divergence()
    loss = out.square().sum() + kl_weight * kl
    return out, kl, torch.autograd.grad(loss, list(layer.parameters()))


def penalty_gradients(layer, x, seed):
    """Second-order: the gradient of the squared norm of the ELBO's gradients (create_graph=True)."""
    params = list(layer.parameters())
    torch.manual_seed(seed)
    loss = layer(x).square().sum() + 0.37 * layer.kl_divergence()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), params)


def test_elbo_gradients_match_autograd_on_the_same_noise():
    """Known answer: w = mu + exp(rho) eps, KL from torch.distributions, gradients by plain autograd."""
    layer = bdl.BayesLinear(5, 3, prior=PRIOR, posterior_std_init=0.3).double()
    x = torch.randn(4, 5, dtype=torch.double)
    out, kl, grads = elbo_gradients(layer, x, seed=3)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    mu, rho, b_mu, b_rho = params
    torch.manual_seed(3)
    eps_w, eps_b = torch.randn_like(rho), torch.randn_like(b_rho)
    ref_out = F.linear(x, mu + rho.exp() * eps_w, b_mu + b_rho.exp() * eps_b)
    ref_kl = sum(kl_divergence(Normal(m, r.exp()), Normal(0.2, 0.6)).sum() for m, r in ((mu, rho), (b_mu, b_rho)))
    ref_grads = torch.autograd.grad(ref_out.square().sum() + 0.37 * ref_kl, params)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(kl, ref_kl)
    for name, got, want in zip(("weight_mu", "weight_rho", "bias_mu", "bias_rho"), grads, ref_grads):
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_gradients_equal_those_of_separate_sample_and_kl(kind, estimator, monkeypatch):
    make, shape = LAYERS[kind]
    layer = make(estimator=estimator, prior=PRIOR, posterior_std_init=0.2).double()
    x = torch.randn(shape, dtype=torch.double)
    fused = elbo_gradients(layer, x, seed=1)
    assert layer._kl_cache, "the training forward should have computed the KL"
    fused_second_order = penalty_gradients(layer, x, seed=1)  # create_graph: the backward's own graph
    # only the loss' data term, only its KL: each output's share of the one backward
    torch.manual_seed(1)
    out_only = torch.autograd.grad(layer(x).sum(), list(layer.parameters()), allow_unused=True)
    kl_only = torch.autograd.grad(layer.kl_divergence(), list(layer.parameters()))

    monkeypatch.setattr(_BayesLayer, "_fusable_prior", lambda self, prior, mu: None)
    separate = elbo_gradients(layer, x, seed=1)
    assert not layer._kl_cache
    torch.manual_seed(1)
    out_only_separate = torch.autograd.grad(layer(x).sum(), list(layer.parameters()), allow_unused=True)
    kl_only_separate = torch.autograd.grad(layer.kl_divergence(), list(layer.parameters()))
    separate_second_order = penalty_gradients(layer, x, seed=1)

    torch.testing.assert_close(fused[0], separate[0])
    torch.testing.assert_close(fused[1], separate[1])
    for pairs in (
        (fused[2], separate[2]),
        (out_only, out_only_separate),
        (kl_only, kl_only_separate),
        (fused_second_order, separate_second_order),
    ):
        for got, want in zip(*pairs):
            torch.testing.assert_close(got, want)


def test_second_order_gradients_match_autograd_on_the_same_draws(monkeypatch):
    """Known answer for a gradient penalty through a Flipout layer: the forward's std, noise and variance
    have no graph of their own, so the fused backward must rebuild them from rho (it once did not: here the
    penalty's gradient for bias_rho was off by 8% of its largest entry, weight_rho's by 0.6%)."""
    layer = bdl.BayesLinear(5, 3, estimator="flipout", prior=PRIOR, posterior_std_init=0.3).double()
    x = torch.randn(4, 5, dtype=torch.double)
    generator = torch.Generator().manual_seed(5)
    eps = {shape: torch.randn(shape, generator=generator, dtype=torch.double) for shape in ((3, 5), (3,))}
    signs = {shape: torch.randint(0, 2, shape, generator=generator).double() * 2 - 1 for shape in ((4, 5), (4, 3))}
    monkeypatch.setattr(bdl.nn.functional, "randn_like", lambda t: eps[tuple(t.shape)].clone())
    monkeypatch.setattr(bdl.nn.functional, "_random_signs", lambda t, per_channel: signs[tuple(t.shape)].clone())
    got = penalty_gradients(layer, x, seed=0)
    mu, rho, b_mu, b_rho = params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    out = F.linear(x, mu, b_mu + b_rho.exp() * eps[3,]) + F.linear(x * signs[4, 5], rho.exp() * eps[3, 5]) * signs[4, 3]
    prior = Normal(torch.tensor(0.2, dtype=torch.double), torch.tensor(0.6, dtype=torch.double))  # not float32
    kl = sum(kl_divergence(Normal(m, r.exp()), prior).sum() for m, r in ((mu, rho), (b_mu, b_rho)))
    grads = torch.autograd.grad(out.square().sum() + 0.37 * kl, params, create_graph=True)
    want = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
    for name, a, b in zip(("weight_mu", "weight_rho", "bias_mu", "bias_rho"), got, want):
        torch.testing.assert_close(a, b, msg=name)


def test_kl_is_reused_until_parameters_change_or_a_backward_consumed_it():
    layer = bdl.BayesLinear(5, 3, prior=PRIOR)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 5)
    out = layer(x)
    kl = layer.kl_divergence()
    torch.testing.assert_close(layer.kl_divergence(), kl)
    fresh = PRIOR.posterior_kl(layer.weight_mu, layer.weight_rho) + PRIOR.posterior_kl(layer.bias_mu, layer.bias_rho)
    torch.testing.assert_close(kl, fresh)
    with torch.no_grad():
        assert layer.kl_divergence().grad_fn is None
    (out.sum() + kl).backward()
    # the graph behind the kept KL is spent: a second loss through kl_divergence() must still work
    layer.kl_divergence().backward()
    optimizer.step()
    after = PRIOR.posterior_kl(layer.weight_mu, layer.weight_rho) + PRIOR.posterior_kl(layer.bias_mu, layer.bias_rho)
    torch.testing.assert_close(layer.kl_divergence(), after)
    assert not torch.allclose(after, kl)


def test_a_kl_backpropagated_alone_says_how_to_keep_the_forwards_graph():
    # the KL's own backward freed the node it shares with the weight draw: the data term's backward then failed with
    # torch's "backward through the graph a second time", naming neither the KL nor the way out
    torch.manual_seed(0)
    model = torch.nn.Sequential(bdl.BayesLinear(5, 4), torch.nn.ReLU(), bdl.BayesLinear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    out = model(x)
    torch.autograd.grad(bdl.kl_divergence(model), [model[0].weight_rho])
    with pytest.raises(RuntimeError, match=r"weight draw and its KL .* share one autograd node.*retain_graph=True"):
        F.cross_entropy(out, y).backward()
    torch.manual_seed(1)
    out = model(x)
    kl = bdl.kl_divergence(model)
    (kl_grad,) = torch.autograd.grad(kl, [model[0].weight_rho], retain_graph=True)  # as the message says
    (nll_grad,) = torch.autograd.grad(F.cross_entropy(out, y), [model[0].weight_rho])
    torch.manual_seed(1)
    out = model(x)
    (both,) = torch.autograd.grad(F.cross_entropy(out, y) + bdl.kl_divergence(model), [model[0].weight_rho])
    torch.testing.assert_close(kl_grad + nll_grad, both)
    out = model(x)  # torch's own error otherwise: a parameter changed in place before the backward
    with torch.no_grad():
        model[0].weight_mu.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (F.cross_entropy(out, y) + bdl.kl_divergence(model)).backward()


def test_kl_follows_prior_and_dtype_changes_after_a_forward():
    layer = bdl.BayesLinear(5, 3)
    layer(torch.randn(4, 5))
    layer.weight_prior = bdl.nn.GaussianPrior(0.0, 0.1)
    expected = layer.weight_prior.posterior_kl(layer.weight_mu, layer.weight_rho) + layer.bias_prior.posterior_kl(
        layer.bias_mu, layer.bias_rho
    )
    torch.testing.assert_close(layer.kl_divergence(), expected)
    layer(torch.randn(4, 5))
    layer.double()
    assert layer.kl_divergence().dtype == torch.float64


def test_layers_copy_and_pickle_after_a_training_forward():
    model = torch.nn.Sequential(bdl.BayesLinear(5, 3), torch.nn.ReLU(), bdl.BayesLinear(3, 2, estimator="flipout"))
    model(torch.randn(4, 5)).sum().backward()
    model(torch.randn(4, 5))  # a forward whose graph is still alive
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert not other[0]._kl_cache
        torch.testing.assert_close(bdl.kl_divergence(other), bdl.kl_divergence(model))


def test_non_gaussian_priors_and_softplus_keep_their_own_kl():
    mixture = bdl.BayesLinear(5, 3, prior=bdl.nn.ScaleMixturePrior())
    softplus = bdl.BayesLinear(5, 3, std_transform="softplus")
    moped = bdl.BayesLinear(5, 3, bias=False, prior=bdl.nn.GaussianPrior(torch.zeros(3, 5), 0.5))
    for layer in (mixture, softplus, moped):
        layer(torch.randn(4, 5))
        assert "weight" not in layer._kl_cache
        assert layer.kl_divergence().requires_grad


def test_prediction_reuses_the_std_while_rho_is_unchanged_and_draws_as_with_a_graph():
    layer = bdl.BayesLinear(5, 3, posterior_std_init=0.3)
    x = torch.randn(4, 5)
    torch.manual_seed(2)
    with torch.no_grad():
        first = layer(x)
    torch.manual_seed(2)
    with_graph = layer(x)  # the same noise, drawn through the training path
    torch.testing.assert_close(first, with_graph.detach())
    assert not layer._std_cache  # a training forward drops what prediction kept
    with torch.no_grad():
        layer(x)
        kept = layer._std_cache["weight", False][-1]
        layer(x)
        assert layer._std_cache["weight", False][-1] is kept
        layer.weight_rho.add_(1.0)  # an optimizer step changes rho in place
        layer(x)
        torch.testing.assert_close(layer._std_cache["weight", False][-1], layer.weight_rho.exp())
        # local reparameterisation (predict's batched path) keeps the variance the same way
        layer.estimator = "local"
        layer(x)
        kept = layer._std_cache["weight", True][-1]
        layer(x)
        assert layer._std_cache["weight", True][-1] is kept
        layer.weight_rho.sub_(0.5)
        layer(x)
        torch.testing.assert_close(layer._std_cache["weight", True][-1], (2 * layer.weight_rho).exp())


def test_large_cpu_prediction_samples_reuse_a_buffer_per_thread():
    # weights of 2^15 elements or more are drawn into a kept buffer when predicting on the CPU
    layer = bdl.BayesLinear(256, 200, posterior_std_init=0.3)
    x = torch.randn(6, 256)
    torch.manual_seed(4)
    with_graph = layer(x).detach()
    torch.manual_seed(4)
    with torch.no_grad():
        first = layer(x)
        kept = first.clone()
        buffer = layer._std_cache["sample", "weight", threading.get_ident()]
        second = layer(x)
    torch.testing.assert_close(first, with_graph)  # the training path's draw (to rounding: another op order)
    assert torch.equal(first, kept) and not torch.equal(first, second)  # outputs own their memory; fresh noise
    assert layer._std_cache["sample", "weight", threading.get_ident()] is buffer
    assert not any(key[0] == "sample" for key in layer._std_cache if key[1] == "bias")  # 200 numbers: no buffer
    with torch.inference_mode():
        in_inference = layer(x)
    with torch.no_grad():  # an inference-mode buffer cannot be written outside inference mode: replaced
        assert torch.isfinite(layer(x)).all() and in_inference.is_inference()
    outputs = {}

    def predict(name):
        with torch.no_grad():
            outputs[name] = layer(x)

    threads = [threading.Thread(target=predict, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([key for key in layer._std_cache if key[0] == "sample"]) >= 2 and len(outputs) == 2
    layer(x)  # a training forward drops the buffers with the stds
    assert not layer._std_cache
    layer.double()
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64
