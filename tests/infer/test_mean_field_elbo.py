"""MeanFieldELBO: closed-form KL terms for AutoNormal's real-valued sites, Pyro's treatment elsewhere."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import kl_divergence

from bdl.infer import PyroModel
from bdl.infer.guides import MeanFieldELBO, _NormalKL, make_elbo
from bdl.infer.predictive import private_param_store


def pyro_bnn():
    torch.manual_seed(0)
    model = PyroModel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "categorical", num_data=50, prior_scale=0.7)
    guide = AutoNormal(model, init_scale=0.3)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    return model, guide, x, y


@pytest.mark.parametrize("validate", [False, True])
def test_loss_is_the_sampled_nll_plus_the_closed_form_kl(validate):
    """Known answer: -log p(y | w) at the guide's draw w (scaled to the data set) + sum_sites KL(q || prior)."""
    model, guide, x, y = pyro_bnn()
    with private_param_store(), pyro.validation_enabled(validate):
        guide(x, y)  # creates the guide's parameters
        for site in guide.prototype_trace.nodes.values():  # a posterior that is not the prior or the init
            if site["type"] == "sample" and not site["is_observed"]:
                loc, scale = guide._get_loc_and_scale(site["name"])
                with torch.no_grad():
                    loc.add_(0.2 * torch.randn_like(loc))
        pyro.set_rng_seed(1)
        loss = MeanFieldELBO().differentiable_loss(model, guide, x, y)
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y))
        model_trace.compute_log_prob()
        nll = -model_trace.nodes["obs"]["log_prob_sum"]
        kl = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                loc, scale = guide._get_loc_and_scale(name)
                kl = kl + kl_divergence(dist.Normal(loc, scale), site["fn"].base_dist).sum()
    torch.testing.assert_close(loss, nll + kl)


def test_fused_normal_kl_and_its_gradients_match_torch_distributions():
    loc = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    scale = torch.rand(5, 3, dtype=torch.double).add(0.1).requires_grad_()
    prior_loc, prior_scale = torch.full((5, 3), 0.3, dtype=torch.double), torch.full((5, 3), 0.7, dtype=torch.double)
    fused = _NormalKL.apply(loc, scale, prior_loc, prior_scale)
    reference = kl_divergence(dist.Normal(loc, scale), dist.Normal(prior_loc, prior_scale))
    torch.testing.assert_close(fused, reference)
    weights = torch.randn(5, 3, dtype=torch.double)
    got = torch.autograd.grad((fused * weights).sum(), (loc, scale))
    want = torch.autograd.grad((reference * weights).sum(), (loc, scale))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda m, s: _NormalKL.apply(m, s, prior_loc, prior_scale), (loc, scale))


def unknown_mean_and_scale(y):
    """The seed's ADVI model: mu is real-valued (closed-form KL), sigma positive (AutoNormal transforms it)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


def test_is_the_elbo_of_trace_elbo_in_expectation_and_exactly_on_transformed_sites():
    y = 5.0 + 2.0 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    guide = AutoNormal(unknown_mean_and_scale, init_scale=0.5)
    with private_param_store():
        guide(y)
        particles = 4000
        ours = MeanFieldELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        traced = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        pyro.set_rng_seed(0)
        ours_loss = ours.loss(unknown_mean_and_scale, guide, y)
        pyro.set_rng_seed(0)
        traced_loss = traced.loss(unknown_mean_and_scale, guide, y)
        # same draws, so the likelihood and sigma's terms cancel: what is left is Trace_ELBO's Monte Carlo
        # error on mu's KL (~0.7 / sqrt(4000) = 0.01); dropping mu's KL (~3 nats) or sigma's log-Jacobian
        # (its unconstrained loc, ~1.2) would show
        assert 0 < abs(ours_loss - traced_loss) < 0.1

        def only_sigma(y):
            sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
            with pyro.plate("data", len(y)):
                pyro.sample("obs", dist.Normal(5.0, sigma), obs=y)

        sigma_guide = AutoNormal(only_sigma, init_scale=0.5)
        sigma_guide(y)
        losses = {}
        for elbo in (MeanFieldELBO, Trace_ELBO, TraceMeanField_ELBO):
            pyro.set_rng_seed(3)
            losses[elbo] = elbo().differentiable_loss(only_sigma, sigma_guide, y)
        pyro.set_rng_seed(3)
        draw = poutine.trace(sigma_guide).get_trace(y).nodes["sigma_unconstrained"]["value"]  # u, the guide's draw
    torch.testing.assert_close(losses[MeanFieldELBO], losses[Trace_ELBO])
    # Pyro's TraceMeanField_ELBO takes KL(Delta || p) = -log p(sigma): it leaves out log |du/dsigma| = -u
    torch.testing.assert_close(losses[TraceMeanField_ELBO] - losses[Trace_ELBO], draw, rtol=1e-4, atol=1e-4)


def test_auto_picks_it_for_autonormal():
    model, guide, _, _ = pyro_bnn()
    assert type(make_elbo("auto", guide)) is MeanFieldELBO
    assert type(make_elbo("mean_field", guide)) is MeanFieldELBO
