"""bdl.sample_once: a layer called several times in one forward uses one draw of its weights."""

import pytest
import torch
from torch import nn

import bdl
from bdl.predict import resolve_method


class Siamese(nn.Module):
    def __init__(self, estimator: str = "reparam", once: bool = True) -> None:
        super().__init__()
        self.encoder = bdl.BayesLinear(4, 8, posterior_std_init=0.3, estimator=estimator)
        self.once = once

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the distance of x's encoding to itself: 0 for any weights
        if not self.once:
            return (self.encoder(x) - self.encoder(x)).square().sum(-1, keepdim=True)
        with bdl.sample_once(self):
            return (self.encoder(x) - self.encoder(x)).square().sum(-1, keepdim=True)


class Squared(nn.Module):
    """``y = w * (w * x)`` with one scalar weight ``w ~ N(1, 0.5^2)``: mean 1.25, variance 1.125 at x = 1."""

    def __init__(self, once: bool = True) -> None:
        super().__init__()
        self.w = bdl.BayesLinear(1, 1, bias=False, posterior_std_init=0.5)
        nn.init.ones_(self.w.weight_mu)
        self.once = once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.once:
            return self.w(self.w(x))
        with bdl.sample_once(self):
            return self.w(self.w(x))


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_every_call_in_the_block_uses_one_draw(estimator):
    x = torch.randn(3, 4)
    assert bool((Siamese(once=False)(x) > 0).all())  # a draw per call: x's encodings differ
    model = Siamese(estimator)
    assert torch.equal(model(x), torch.zeros(3, 1))  # training forward, gradients on
    with torch.no_grad():
        assert torch.equal(model(x), torch.zeros(3, 1))
    assert bool((bdl.predict(model, x, num_samples=8, task="regression").mean == 0).all())


def test_the_predictive_of_a_reused_weight_is_that_of_one_weight():
    x = torch.ones(1, 1)
    torch.manual_seed(1)
    once = bdl.predict(Squared(), x, num_samples=20000, task="regression")
    assert float(once.mean) == pytest.approx(1.25, abs=0.03)  # Monte Carlo standard error 0.0075
    assert float(once.epistemic_variance) == pytest.approx(1.125, rel=0.07)
    torch.manual_seed(1)
    apart = bdl.predict(Squared(once=False), x, num_samples=20000, task="regression")  # w1 * w2: mean 1, variance 0.5625
    assert float(apart.mean) == pytest.approx(1.0, abs=0.03)
    assert float(apart.epistemic_variance) == pytest.approx(0.5625, rel=0.07)


def test_training_counts_the_draw_and_its_kl_once():
    model = Squared()
    x = torch.ones(1, 1)
    torch.manual_seed(2)
    y = model(x)
    layer = model.w
    kl = bdl.kl_divergence(model)
    assert torch.allclose(kl, layer.weight_prior.posterior_kl(layer.weight_mu, layer.weight_rho, layer.std_transform))
    y.backward()
    # y = w^2 for the one draw w = mu + std * eps: dy/dmu = 2 w and dy/drho = 2 w * std * eps = 2 w (w - mu)
    w = y.detach().sqrt() * torch.sign(layer.weight_mu.grad)
    assert torch.allclose(layer.weight_mu.grad, 2 * w)
    assert torch.allclose(layer.weight_rho.grad, 2 * w * (w - layer.weight_mu.detach()), atol=1e-6)


def test_predict_takes_the_loop_and_refuses_a_block_around_it():
    model, x = Squared(), torch.ones(4, 1)
    assert resolve_method(model, 4) == "batched"  # what the model's layers alone would allow
    with pytest.raises(ValueError, match="draws its weights once per forward"):  # the probe sees the block
        bdl.predict(model, x, num_samples=4, task="regression", method="batched")
    with bdl.sample_once(model), pytest.raises(ValueError, match="inside a bdl.sample_once block"):
        bdl.predict(model, x, num_samples=4, task="regression")  # every sample would be the block's one draw



def test_a_block_inside_another_shares_the_outer_draw():
    # an encoder that opens its own block, called twice in a model that opens one: each call drew anew
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = bdl.BayesLinear(4, 8, posterior_std_init=0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with bdl.sample_once(self):
                return self.layer(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with bdl.sample_once(self):
                return (self.encoder(x) - self.encoder(x)).square().sum(-1)

    x = torch.randn(3, 4)
    assert torch.equal(Model()(x), torch.zeros(3))
    encoder = Encoder()
    assert not torch.equal(encoder(x), encoder(x))  # apart, each forward is its own draw


def test_a_call_without_gradients_first_shares_the_draw_and_the_later_calls_train():
    # a stop-gradient branch (SimSiam) called first: its draw, cached without a graph, gave the calls with gradients
    # no gradient to the posterior (backward failed, or the encoder silently never trained)
    model = Siamese()
    x = torch.randn(3, 4)
    with bdl.sample_once(model):
        with torch.no_grad():
            target = model.encoder(x)
        online = model.encoder(x)
    assert torch.equal(online.detach(), target)
    (online - target).square().sum().add(online.sum()).backward()
    assert model.encoder.weight_mu.grad is not None and bool(model.encoder.weight_rho.grad.abs().sum() > 0)


def test_a_draw_made_under_inference_mode_or_for_frozen_means_trains_the_rest():
    # noise drawn under inference_mode could not join a graph ("Inference tensors cannot be saved for backward"); and
    # with the means frozen the graph was judged by weight_mu alone: rho got no gradient, silently
    model, x = Siamese(), torch.randn(3, 4)
    with bdl.sample_once(model):
        with torch.inference_mode():
            target = model.encoder(x)
        online = model.encoder(x)
    assert torch.equal(online.detach(), target.clone())
    online.sum().backward()
    assert model.encoder.weight_rho.grad is not None
    frozen = Siamese()
    frozen.encoder.weight_mu.requires_grad_(False)
    frozen.encoder.bias_mu.requires_grad_(False)
    with bdl.sample_once(frozen):
        with torch.no_grad():
            frozen.encoder(x)
        out = frozen.encoder(x)
    out.sum().backward()
    assert frozen.encoder.weight_rho.grad is not None and bool(frozen.encoder.weight_rho.grad.abs().sum() > 0)
