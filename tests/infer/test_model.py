import pytest
import torch
from pyro import poutine
from torch import nn

import bdl
from bdl.infer import PyroModel, select_parameters


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def sample_sites(trace):
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"] and name not in ("data", "obs")}


def test_every_parameter_gets_a_gaussian_prior_named_after_it():
    net = mlp()
    model = PyroModel(net, "categorical", prior_scale=0.5)
    trace = poutine.trace(model).get_trace(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    sites = sample_sites(trace)
    assert list(sites) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, parameter in net.named_parameters():
        prior = sites[name]["fn"]
        assert prior.event_shape == parameter.shape and prior.batch_shape == ()
        torch.testing.assert_close(prior.base_dist.scale, torch.full_like(parameter, 0.5))
        torch.testing.assert_close(prior.base_dist.loc, torch.zeros_like(parameter))


def test_network_runs_with_the_sampled_weights():
    net = mlp()
    model = PyroModel(net, "categorical")
    x = torch.randn(5, 4)
    weights = {name: torch.randn_like(p) for name, p in net.named_parameters()}
    trace = poutine.trace(poutine.condition(model, data=weights)).get_trace(x)
    expected = torch.func.functional_call(net, weights, (x,))
    torch.testing.assert_close(trace.nodes["obs"]["fn"].logits, expected.log_softmax(-1))
    # The user's network is untouched: its own parameters are not the sampled ones.
    assert not any(torch.equal(p, weights[n]) for n, p in net.named_parameters())


def test_last_layer_only_keeps_the_body_as_point_estimates():
    net = mlp()
    model = PyroModel(net, "categorical", bayesian_parameters="last_layer")
    assert model.bayesian_names == ["2.weight", "2.bias"]
    x = torch.randn(5, 4)
    trace = poutine.trace(model).get_trace(x)
    assert list(sample_sites(trace)) == ["2.weight", "2.bias"]
    # the body's real parameters are used and receive gradients; the Bayesian ones are frozen (sampled instead)
    trace.nodes["obs"]["fn"].logits.sum().backward()
    assert net[0].weight.grad is not None and net[2].weight.grad is None
    assert net[0].weight.requires_grad and not net[2].weight.requires_grad


def test_parameter_selection_by_name_type_and_predicate():
    net = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    assert select_parameters(net, "0") == ["0.weight", "0.bias"]
    assert select_parameters(net, ["0.weight", "2"]) == ["0.weight", "2.weight", "2.bias"]
    assert select_parameters(net, nn.Linear) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert select_parameters(net, lambda name, p: name.endswith("bias")) == ["0.bias", "1.bias", "2.bias"]
    assert select_parameters(net, "last_layer") == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(net, "fc")
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(net, nn.Conv2d)


def test_prior_centred_on_pretrained_weights_is_saved_with_the_model():
    net = mlp()
    model = PyroModel(net, "categorical", prior_loc="pretrained", prior_scale=0.1)
    torch.testing.assert_close(model.prior("0.weight").base_dist.loc, net[0].weight.detach())
    with torch.no_grad():
        net[0].weight.add_(1.0)  # later training of the net does not move the prior
    assert not torch.equal(model.prior("0.weight").base_dist.loc, net[0].weight)
    assert any(key.startswith("_prior_loc") for key in model.state_dict())
    assert not any(key.startswith("_prior_loc") for key in PyroModel(mlp(), "categorical").state_dict())


def test_likelihood_is_scaled_by_global_num_data_over_the_batch():
    """The ELBO scale comes from num_data (the global training-set size), not from the local batch."""
    net = mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = PyroModel(net, "categorical", num_data=1000)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["obs"]["scale"] == pytest.approx(1000 / 8)
    trace.compute_log_prob()
    unscaled = trace.nodes["obs"]["fn"].log_prob(y).sum()
    torch.testing.assert_close(trace.nodes["obs"]["log_prob_sum"], 1000 / 8 * unscaled)
    # The same batch seen by one of 4 DDP processes: the scale must stay num_data / batch.
    model.num_data = 4000
    assert poutine.trace(model).get_trace(x, y).nodes["obs"]["scale"] == pytest.approx(4000 / 8)
    # Full-batch (MCMC): no scaling.
    model.num_data = None
    assert poutine.trace(model).get_trace(x, y).nodes["obs"]["scale"] == 1.0
    # Priors are never scaled.
    assert all(site["scale"] == 1.0 for site in sample_sites(trace).values())


def test_invalid_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_data"):
        PyroModel(mlp(), "categorical", num_data=0)
    with pytest.raises(ValueError, match="prior_scale"):
        PyroModel(mlp(), "categorical", prior_scale=-1.0)
    with pytest.raises(ValueError, match="prior_loc"):
        PyroModel(mlp(), "categorical", prior_loc="xavier")
    with pytest.raises(TypeError, match="net"):
        PyroModel(lambda x: x, "categorical")
    model = PyroModel(mlp(), "categorical", num_data=4)
    with pytest.raises(ValueError, match="num_data"):
        poutine.trace(model).get_trace(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    # parameters named as the observation site or the plate failed at the first trace ("Multiple sample sites")
    for name in ("obs", "data"):
        net = torch.nn.Module()
        net.register_parameter(name, torch.nn.Parameter(torch.zeros(3)))
        with pytest.raises(ValueError, match=rf"parameter names \['{name}'\] clash with the likelihood's sites"):
            PyroModel(net, "categorical")


def test_a_network_that_returns_a_tuple_is_told_how_to_model_a_noise_scale():
    model = PyroModel(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), bdl.GaussianHead(8, 1)), "gaussian_heteroscedastic", num_data=4)
    with pytest.raises(TypeError, match="gaussian_heteroscedastic"):
        model(torch.randn(4, 2), torch.randn(4))
