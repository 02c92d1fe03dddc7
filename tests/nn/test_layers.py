import contextlib
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdl
from bdl.nn.functional import posterior_variance

LAYERS = {
    "linear": lambda **kw: bdl.BayesLinear(5, 3, **kw),
    "conv1d": lambda **kw: bdl.BayesConv1d(2, 3, 3, padding=1, **kw),
    "conv2d": lambda **kw: bdl.BayesConv2d(2, 3, (2, 3), padding=(1, 0), dilation=(1, 2), **kw),
    "conv3d": lambda **kw: bdl.BayesConv3d(2, 3, 2, **kw),
}
INPUTS = {
    "linear": (4, 5),
    "conv1d": (2, 2, 6),
    "conv2d": (2, 2, 5, 6),
    "conv3d": (2, 2, 3, 3, 3),
}


def analytic_moments(layer, x):
    """Mean and variance of every output element under the mean-field posterior."""
    mean = layer._op(x, layer.weight_mu, layer.bias_mu)
    bias_var = None if layer.bias_rho is None else posterior_variance(layer.bias_rho)
    var = layer._op(x.square(), posterior_variance(layer.weight_rho), bias_var)
    return mean, var


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_estimator_matches_analytic_moments(kind, estimator):
    layer = LAYERS[kind](estimator=estimator, posterior_std_init=0.4)
    x = torch.randn(INPUTS[kind])
    num_samples = 4000
    with torch.no_grad():
        if estimator != "local":  # weight (and, for flipout, bias) noise is shared within a call
            draws = torch.stack([layer(x) for _ in range(num_samples)])
        else:  # pre-activation noise is drawn per example: S copies of the batch in one call are S draws
            copies = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(-1, *x.shape[1:])
            draws = layer(copies).reshape(num_samples, x.shape[0], *layer(x).shape[1:])
        mean, var = analytic_moments(layer, x)
    # z-scores of the sample mean; relative error of the sample variance (sd ~ sqrt(2 / S) = 0.022 per element;
    # their mean over the outputs has sd ~0.007 across seeds, so 0.03 is > 4 sd)
    z = (draws.mean(0) - mean) / (var / num_samples).sqrt()
    assert z.abs().max() < 5
    ratio = draws.var(0) / var
    assert (ratio - 1).abs().max() < 0.16
    assert (ratio.mean() - 1).abs() < 0.03


def test_reparam_shares_one_weight_sample_across_the_batch_and_local_does_not():
    x = torch.randn(1, 5).expand(2, 5)
    reparam = bdl.BayesLinear(5, 3, posterior_std_init=0.5)
    out = reparam(x)
    assert torch.equal(out[0], out[1])
    local = bdl.BayesLinear(5, 3, posterior_std_init=0.5, estimator="local")
    out = local(x)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_every_call_draws_fresh_weights_in_train_and_eval(estimator):
    layer = bdl.BayesLinear(5, 3, estimator=estimator)
    x = torch.randn(4, 5)
    for mode in (layer.train, layer.eval):
        mode()
        assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("std_transform", ["exp", "softplus"])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_gradients_reach_posterior_parameters(estimator, std_transform):
    layer = bdl.BayesConv2d(2, 3, 3, estimator=estimator, std_transform=std_transform)
    loss = layer(torch.randn(2, 2, 5, 5)).square().mean() + layer.kl_divergence() / 100
    loss.backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("std_transform", ["exp", "softplus"])
def test_nll_gradient_of_scale_matches_autograd_reference(std_transform):
    """The hand-written backward of the fused sampler equals plain autograd on the same noise."""
    layer = bdl.BayesLinear(5, 3, std_transform=std_transform, posterior_std_init=0.3).double()
    x = torch.randn(4, 5, dtype=torch.double)
    torch.manual_seed(3)
    layer(x).sum().backward()
    torch.manual_seed(3)
    mu, rho = layer.weight_mu.detach().requires_grad_(), layer.weight_rho.detach().requires_grad_()
    std = rho.exp() if std_transform == "exp" else F.softplus(rho)
    eps_w = torch.randn_like(rho)
    b_mu, b_rho = layer.bias_mu.detach().requires_grad_(), layer.bias_rho.detach().requires_grad_()
    b_std = b_rho.exp() if std_transform == "exp" else F.softplus(b_rho)
    eps_b = torch.randn_like(b_rho)
    F.linear(x, mu + std * eps_w, b_mu + b_std * eps_b).sum().backward()
    torch.testing.assert_close(layer.weight_rho.grad, rho.grad)
    torch.testing.assert_close(layer.weight_mu.grad, mu.grad)
    torch.testing.assert_close(layer.bias_rho.grad, b_rho.grad)


@pytest.mark.parametrize("std_transform", ["exp", "softplus"])
def test_posterior_std_init_and_transform(std_transform):
    layer = bdl.BayesLinear(5, 3, posterior_std_init=0.05, std_transform=std_transform)
    torch.testing.assert_close(layer.weight_std, torch.full((3, 5), 0.05))
    torch.testing.assert_close(layer.bias_std, torch.full((3,), 0.05))
    precise = bdl.BayesLinear(5, 3, posterior_std_init=1e-3, std_transform=std_transform, dtype=torch.float64)
    torch.testing.assert_close(precise.weight_std, torch.full((3, 5), 1e-3, dtype=torch.float64), rtol=1e-12, atol=0)
    wide = bdl.BayesLinear(5, 3, posterior_std_init=200.0, std_transform=std_transform)  # exp(200) overflows float32
    torch.testing.assert_close(wide.weight_std, torch.full((3, 5), 200.0))


def test_predict_sees_an_edit_made_through_data():
    layer = bdl.BayesLinear(4, 3)
    x = torch.ones(1, 4)
    bdl.predict(layer, x, num_samples=2, task="regression")  # keeps the stds of std 1e-3
    layer.weight_rho.data.fill_(0.0)  # std 1: no version counter moves
    layer.bias_rho.data.fill_(0.0)
    spread = bdl.predict(layer, x, num_samples=400, task="regression").epistemic_variance.sqrt()
    assert (spread > 1.5).all() and (spread < 3).all()  # sqrt(4 + 1) = 2.24


def test_layers_build_under_a_meta_default_device_like_torch_nn():
    with torch.device("meta"):
        layer, conv = bdl.BayesLinear(3, 2), bdl.bayesianize(nn.Conv2d(2, 3, 3))
    assert layer.weight_rho.is_meta and conv.bias_rho.is_meta


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    layer = bdl.BayesLinear(3, 2, prior=np.float32(0.5), posterior_std_init=np.float32(0.01))
    assert layer.weight_prior.scale == pytest.approx(0.5) and layer.posterior_std_init == pytest.approx(0.01)
    assert bdl.GaussianPrior(0.0, np.float32(0.1)).scale == pytest.approx(0.1)
    # numpy integer sizes (np.prod of a shape), which torch.nn takes: refused, and bayesianize failed on such a model
    size = np.prod((1, 4, 2))
    assert type(bdl.BayesLinear(size, 3).in_features) is int
    assert bdl.BayesConv2d(np.int64(1), np.int64(4), 3).in_channels == 1
    converted = bdl.bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(size, 3)))
    assert converted[1].in_features == 8


def test_a_prior_shaped_for_the_weight_says_how_to_give_the_bias_its_own():
    pretrained = torch.randn(3, 5)
    with pytest.raises(ValueError, match="bias_prior"):
        bdl.BayesLinear(5, 3, prior=bdl.GaussianPrior(pretrained, 0.1))
    layer = bdl.BayesLinear(5, 3, prior=bdl.GaussianPrior(pretrained, 0.1), bias=False)
    assert torch.equal(layer.weight_prior.loc, pretrained)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_torch_func_transforms_over_inputs(estimator):
    torch.manual_seed(0)
    layer = bdl.BayesLinear(4, 2, estimator=estimator, posterior_std_init=0.5)
    with bdl.deterministic(layer):
        torch.testing.assert_close(torch.func.jacrev(layer)(torch.randn(4)), layer.weight_mu)
    assert torch.func.jacrev(layer)(torch.randn(4)).shape == (2, 4)
    x = torch.randn(1, 4)
    expected_std = (x.square() @ layer.weight_std.square().T + layer.bias_std.square()).sqrt().detach()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            draws = torch.func.vmap(layer, randomness="different")(x.expand(4000, 1, 4))  # 4000 draws at once
        torch.testing.assert_close(draws.std(0).detach(), expected_std, rtol=0.06, atol=0)


def test_constructor_mirrors_torch_nn():
    ref = nn.Linear(5, 3, False, None, torch.float64)
    layer = bdl.BayesLinear(5, 3, False, None, torch.float64)
    assert layer.bias_mu is None and layer.weight_mu.dtype == ref.weight.dtype == torch.float64
    conv = bdl.BayesConv2d(4, 6, (3, 1), 2, "valid", 1, 2, False, "zeros")
    ref = nn.Conv2d(4, 6, (3, 1), 2, "valid", 1, 2, False, "zeros")
    assert conv.weight_mu.shape == ref.weight.shape and conv.stride == ref.stride and conv.groups == 2
    x = torch.randn(2, 4, 9, 7)
    assert conv(x).shape == ref(x).shape
    with pytest.raises(ValueError, match="padding"):
        bdl.BayesConv2d(4, 6, 3, stride=2, padding="same")  # torch.nn's own check


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_matches_torch_conv_with_posterior_means(padding_mode):
    conv = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1), groups=2, padding_mode=padding_mode)
    bayes = bdl.BayesConv2d.from_module(conv)
    x = torch.randn(2, 4, 9, 8)
    with bdl.deterministic(bayes):
        torch.testing.assert_close(bayes(x), conv(x), rtol=0, atol=0)


def test_unbatched_conv_input_is_accepted_like_torch():
    conv = bdl.BayesConv1d(2, 3, 3, estimator="flipout")
    assert conv(torch.randn(2, 8)).shape == (3, 6)


def test_linear_accepts_extra_leading_dimensions():
    layer = bdl.BayesLinear(5, 3, estimator="flipout")
    assert layer(torch.randn(2, 7, 5)).shape == (2, 7, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: bdl.BayesLinear(5, 3, posterior_std_init=0.0), "posterior_std_init"),
        (lambda: bdl.BayesLinear(5, 3, posterior_std_init=-1.0), "posterior_std_init"),
        (lambda: bdl.BayesLinear(5, 3, estimator="bogus"), r"estimator must be one of \['flipout', 'local', 'reparam'\]"),
        (lambda: bdl.BayesLinear(5, 3, estimator=["local"]), r"estimator must be one of .*got \['local'\]"),  # "unhashable type"
        (lambda: bdl.BayesLinear(5, 3, std_transform="sigmoid"), "std_transform"),
        (lambda: bdl.BayesLinear(5, 3, prior=-1.0), "prior: a number is the scale s of the prior N\\(0, s\\^2\\) and must be positive"),
        (lambda: bdl.BayesLinear(5, 3, prior=bdl.GaussianPrior(torch.zeros(4, 4))), "does not broadcast"),
    ],
)
def test_bad_constructor_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_prior_must_be_prior_or_float():
    with pytest.raises(TypeError, match="prior must be"):
        bdl.BayesLinear(5, 3, prior="wide")


def test_wrong_input_shapes_name_the_expected_form():
    with pytest.raises(ValueError, match="5 features"):
        bdl.BayesLinear(5, 3)(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\(N, 2, \*2 spatial dims\)"):
        bdl.BayesConv2d(2, 3, 3)(torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("saved, loaded", [("softplus", "exp"), ("exp", "softplus")])
def test_a_state_dict_of_the_other_std_transform_loads_as_the_same_posterior_stds(saved, loaded):
    torch.manual_seed(0)
    source = nn.Sequential(bdl.BayesLinear(3, 4, std_transform=saved), nn.ReLU(), bdl.BayesConv2d(1, 2, 3, std_transform=saved))
    with torch.no_grad():
        for layer in (source[0], source[2]):
            layer.weight_rho.uniform_(-4, 1)  # stds up to e and more: where the transforms differ most
            layer.bias_rho.uniform_(-4, 1)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target = nn.Sequential(bdl.BayesLinear(3, 4, std_transform=loaded), nn.ReLU(), bdl.BayesConv2d(1, 2, 3, std_transform=loaded))
    with pytest.warns(UserWarning, match=f"saved with std_transform='{saved}'.*std_transform='{loaded}'") as caught:
        target.load_state_dict(state)
    assert caught[0].filename == __file__  # the caller's line, not torch's module.py
    for a, b in [(source[0], target[0]), (source[2], target[2])]:
        assert b.std_transform == loaded
        torch.testing.assert_close(b.weight_std, a.weight_std, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.bias_std, a.bias_std, rtol=1e-6, atol=0)
        assert torch.equal(b.weight_mu, a.weight_mu)
    assert torch.equal(state["0.weight_rho"], source[0].weight_rho)  # the caller's state dict is not changed
    # a partial load converts what it loads and leaves the rest
    partial = bdl.BayesLinear(3, 4, std_transform=loaded)
    own = partial.bias_rho.detach().clone()
    sub = type(state)({"weight_mu": state["0.weight_mu"], "weight_rho": state["0.weight_rho"]})
    sub._metadata = {"": dict(state._metadata["0"])}
    with pytest.warns(UserWarning, match="converted"):
        partial.load_state_dict(sub, strict=False)
    torch.testing.assert_close(partial.weight_std, source[0].weight_std, rtol=1e-6, atol=0)
    assert torch.equal(partial.bias_rho, own)


def test_a_deterministic_layers_weights_loaded_into_a_bayesian_layer_say_what_to_do():
    # torch listed the missing weight_mu, weight_rho, ... and the unexpected weight, bias; with strict=False the
    # Bayesian layers silently kept their initialisation
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bayesian = bdl.bayesianize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.warns(UserWarning, match=r"a deterministic layer's weights .*were loaded into BayesLinear layers, which keep their own: load them into the plain network, then make it Bayesian with bdl.bayesianize") as caught:
        bayesian.load_state_dict(plain.state_dict(), strict=False)
    # one text for the two layers, at one place: Python shows it once (pytest.warns records every call)
    assert len({(str(w.message), w.filename, w.lineno) for w in caught}) == 1 and caught[0].filename == __file__
    with pytest.warns(UserWarning, match="BayesLinear.from_module"), pytest.raises(RuntimeError, match="Unexpected key"):
        bdl.BayesLinear(4, 3).load_state_dict(nn.Linear(4, 3).state_dict())


def test_the_same_std_transform_loads_without_a_warning(recwarn):
    model = bdl.BayesLinear(3, 4, std_transform="softplus")
    clone = bdl.BayesLinear(3, 4, std_transform="softplus")
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.weight_rho, model.weight_rho) and not recwarn.list


def test_state_dict_round_trip_and_dtype_device_moves():
    model = nn.Sequential(bdl.BayesLinear(5, 8), nn.ReLU(), bdl.BayesLinear(8, 2, bias=False, prior=bdl.GaussianPrior(torch.zeros(2, 8), 0.5)))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = nn.Sequential(bdl.BayesLinear(5, 8), nn.ReLU(), bdl.BayesLinear(8, 2, bias=False, prior=bdl.GaussianPrior(torch.ones(2, 8), 0.5)))
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name
    assert "2.weight_prior.loc" in model.state_dict()
    x = torch.randn(3, 5)
    with bdl.deterministic(model), bdl.deterministic(clone):
        assert torch.equal(model(x), clone(x))
    double = copy.deepcopy(model).double()
    assert double(x.double()).dtype == torch.float64
    assert double[2].weight_prior.loc.dtype == torch.float64
    assert bdl.kl_divergence(double).dtype == torch.float64
    # what the layers keep from their forwards (stds, a KL, sample buffers) is of the old dtype or device after a
    # move: it held its memory (a model moved off a GPU kept GPU memory), so a move forgets it
    big = nn.Sequential(bdl.BayesLinear(600, 300), nn.ReLU(), bdl.BayesLinear(300, 2))
    wide = torch.randn(4, 600)
    big(wide).sum().backward()
    with torch.no_grad():
        big(wide)
    assert big[0]._std_cache and big[0]._kl_cache
    big.double()
    assert not any(layer._std_cache or layer._kl_cache for layer in (big[0], big[2]))
    ensemble = bdl.DeepEnsemble.from_factory(lambda: nn.Linear(5, 2), 3, method="vmap")
    with torch.no_grad():
        ensemble(x)
    assert ensemble._stacked is not None
    assert ensemble.double()._stacked is None


def test_reading_a_bayesian_layers_weight_says_why_there_is_none():
    # torch's Transformer fast path and torchvision's Swin read .weight themselves: a bare AttributeError
    layer = bdl.BayesLinear(3, 2)
    assert not hasattr(layer, "weight") and not hasattr(layer, "bias")
    with pytest.raises(AttributeError, match=r"BayesLinear has no 'weight': its posterior is weight_mu and weight_rho.*exclude"):
        nn.functional.linear(torch.randn(1, 3), layer.weight)
    with pytest.raises(AttributeError, match="has no attribute 'other'"):
        layer.other


def test_repr_shows_bayesian_options():
    text = repr(bdl.BayesConv2d(2, 3, 3, bias=False, estimator="local", prior=0.1))
    assert "estimator='local'" in text and "bias=False" in text and "scale=0.1" in text


def test_torch_compile_traces_a_bayesian_model_in_one_graph():
    std = 0.3  # wide enough that the samples' spread is far above float32 rounding (at 1e-3 the MI is ~1e-7)
    model = nn.Sequential(
        bdl.BayesConv2d(1, 3, 3, estimator="flipout", posterior_std_init=std), nn.ReLU(), nn.Flatten(),
        bdl.BayesLinear(3 * 4 * 4, 8, posterior_std_init=std), nn.ReLU(),
        bdl.BayesLinear(8, 2, estimator="local", posterior_std_init=std),
    )  # fmt: skip
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 1, 0])

    # fullgraph: a graph break anywhere (e.g. a torch.* call returning a Python int) is an error
    @torch.compile(backend="aot_eager", fullgraph=True)
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bdl.elbo_loss(F.cross_entropy(model(x), y), bdl.kl_divergence(model), num_data=100).loss

    loss(x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    predict = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = predict(x)
        assert out.shape == (4, 2) and not torch.equal(out, predict(x))
    for method in ("loop", "auto"):  # bdl.predict on the compiled model (a BayesConv2d: batched is refused)
        prediction = bdl.predict(predict, x, num_samples=4, method=method)
        assert prediction.probs.shape == (4, 2) and bool((prediction.mutual_information > 1e-3).all())
    # an eager forward with gradients (logging, without a backward) left its KL cached, whose check by data_ptr
    # broke the compiled step ("Unsupported Data pointer comparison")
    model(x)
    loss(x, y).backward()
    kl = torch.compile(lambda: bdl.kl_divergence(model), backend="aot_eager", fullgraph=True)
    model(x)
    torch.testing.assert_close(kl(), bdl.kl_divergence(model))  # the eager one from the cache


@pytest.mark.cuda
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_runs_on_cuda(estimator):
    model = nn.Sequential(bdl.BayesConv2d(1, 4, 3, estimator=estimator), nn.Flatten(), bdl.BayesLinear(4 * 6 * 6, 2, estimator=estimator)).cuda()
    out = model(torch.randn(3, 1, 8, 8, device="cuda"))
    (out.sum() + bdl.kl_divergence(model)).backward()
    assert out.device.type == "cuda" and model[0].weight_rho.grad.device.type == "cuda"


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_channels_last_conv_trains_like_the_contiguous_layer(estimator):
    # reparam and flipout failed in every training forward ("view size is not compatible with input tensor's
    # size and stride"): the fused sample + KL node viewed a channels-last std as flat
    layer = bdl.BayesConv2d(3, 4, 3, estimator=estimator)
    channels_last = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    assert not channels_last.weight_rho.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    for module in (layer, channels_last):
        output = module(x)  # the noise is drawn in memory order: other numbers, the same distribution
        (output.square().mean() + module.kl_divergence()).backward()
        assert output.shape == (2, 4, 6, 6) and torch.isfinite(output).all()
        assert torch.isfinite(module.weight_rho.grad).all() and module.weight_rho.grad.abs().sum() > 0
    layer.zero_grad(), channels_last.zero_grad()
    for module in (layer, channels_last):  # the KL and its gradients do not depend on the layout
        module(x)
        module.kl_divergence().backward()
    torch.testing.assert_close(channels_last.kl_divergence(), layer.kl_divergence())
    torch.testing.assert_close(channels_last.weight_rho.grad, layer.weight_rho.grad)
    torch.testing.assert_close(channels_last.weight_mu.grad, layer.weight_mu.grad)
    with bdl.deterministic(layer), bdl.deterministic(channels_last):
        torch.testing.assert_close(channels_last(x), layer(x))


@pytest.mark.parametrize("estimator", ["reparam", "local"])
def test_no_grad_forwards_use_the_std_of_the_rho_they_are_given(estimator):
    # The kept std was keyed by (version, address): fresh tensors at one address (functional_call with new
    # parameter sets, here made to share a storage so the address repeats every time) got the first one's std.
    layer = bdl.BayesLinear(40, 30, bias=False, estimator=estimator)
    mu = layer.weight_mu.detach().clone()
    storage = torch.empty(30 * 40).untyped_storage()
    x = torch.randn(256, 40)
    mean = F.linear(x, mu)
    with torch.no_grad():
        for std in (0.001, 1.0, 0.001, 1.0):
            torch.empty(0).set_(storage, 0, (30, 40), (40, 1)).fill_(math.log(std))
            rho = torch.empty(0).set_(storage, 0, (30, 40), (40, 1))  # a new tensor, the same address and version
            out = torch.func.functional_call(layer, {"weight_mu": mu, "weight_rho": rho}, (x,))
            expected = std * x.square().sum(1).sqrt()  # the output's std per input
            assert ((out - mean).std(1) / expected).mean() == pytest.approx(1.0, abs=0.15), std


@pytest.mark.parametrize("precision", ["autocast", "half"])
def test_local_reparameterization_keeps_small_variances_in_float16(precision):
    # float16 variances below 6e-5 were raised to that floor (a noise std of 7.8e-3 for every pre-activation
    # here, whose true std is 8e-4) and the data term's gradient to rho was exactly 0
    torch.manual_seed(0)
    layer = bdl.BayesLinear(64, 32, posterior_std_init=1e-4, estimator="local")
    x = torch.randn(4000, 64)
    true_std = (x.square() @ layer.weight_std.square().T + layer.bias_std.square()).sqrt()
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    half = copy.deepcopy(layer).half() if precision == "half" else layer
    context = torch.autocast("cpu", dtype=torch.float16) if precision == "autocast" else contextlib.nullcontext()
    with context:
        out = half(x.half() if precision == "half" else x)
    assert out.dtype == torch.float16
    noise = (out.float() - mean) / true_std
    assert noise.std().item() == pytest.approx(1.0, abs=0.1)  # float16's rounding of the output adds ~1e-4
    target = torch.randn(4000, 32)
    grads = []
    for module, context in ((layer, contextlib.nullcontext()), (half, torch.autocast("cpu", dtype=torch.float16, enabled=precision == "autocast"))):
        module.zero_grad()
        torch.manual_seed(3)
        with context:
            loss = (module(x.half() if module is not layer and precision == "half" else x).float() - target).square().mean()
        loss.backward()
        grads.append(module.weight_rho.grad.float())
    assert grads[1].abs().sum() > 0.5 * grads[0].abs().sum()


def test_batched_predictions_keep_small_epistemic_variances_under_float16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(64, 32, posterior_std_init=1e-4), nn.ReLU(), bdl.BayesLinear(32, 1, posterior_std_init=1e-4))
    x = torch.randn(256, 64)
    reference = bdl.predict(model, x, num_samples=32, task="regression", method="loop").epistemic_variance.sqrt().mean()
    with torch.autocast("cpu", dtype=torch.float16):
        batched = bdl.predict(model, x, num_samples=32, task="regression", method="batched").epistemic_variance.sqrt().mean()
    assert batched.item() == pytest.approx(reference.item(), rel=0.15)  # was 8e-3 against 3.8e-4


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_the_kl_of_a_half_precision_model_is_computed_in_float32(estimator):
    # summed in float16 it was inf from ~10,000 weights on (float16's largest number is 65,504)
    layer = bdl.BayesLinear(200, 200, estimator=estimator)
    reference = layer.kl_divergence()
    half = layer.half()
    half(torch.randn(8, 200).half()).float().sum().backward()  # a training forward (the KL is fused there in float32)
    kl = half.kl_divergence()
    assert kl.dtype == torch.float32 and kl.item() == pytest.approx(reference.item(), rel=1e-3)
    kl.backward()
    assert half.weight_rho.grad.dtype == torch.float16 and torch.isfinite(half.weight_rho.grad).all()
    # bfloat16 summed it with 8 significant bits: its large terms cancel, 50% off for posterior stds of 1
    wide = bdl.BayesLinear(64, 128, posterior_std_init=1.0, estimator=estimator)
    brain = wide.bfloat16()
    brain(torch.randn(4, 64).bfloat16()).float().sum().backward()
    assert brain.kl_divergence().dtype == torch.float32
    assert brain.kl_divergence().item() == pytest.approx(bdl.BayesLinear.kl_divergence(copy.deepcopy(brain).double()).item(), rel=1e-4)


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_kept_stds_and_kl_follow_an_optimizer_step_that_moves_no_version_counter(optimizer):
    """torch's fused optimizers write the parameters without moving their version counters, by which the
    layers judged the stds kept for prediction and a forward's KL current."""
    torch.manual_seed(0)
    layer = bdl.BayesLinear(50, 40, posterior_std_init=0.01)
    step = torch.optim.Adam(layer.parameters(), lr=0.5, **{optimizer: True})
    x = torch.randn(8, 50)
    with torch.no_grad():
        layer(x)  # keeps the stds (0.01) for the draws below
    layer(x)  # a training forward, not backpropagated: keeps its KL
    kept_kl = layer.kl_divergence().detach()
    for parameter in layer.parameters():
        parameter.grad = -torch.ones_like(parameter)
    step.step()  # Adam's first step moves every parameter by lr: rho by +0.5, the stds 0.01 -> 0.0165
    expected_std = layer.weight_rho.detach().exp()
    torch.testing.assert_close(expected_std, torch.full_like(expected_std, 0.01 * math.exp(0.5)))
    fresh = bdl.GaussianPrior(0.0, 1.0).posterior_kl(layer.weight_mu, layer.weight_rho) + bdl.GaussianPrior(0.0, 1.0).posterior_kl(layer.bias_mu, layer.bias_rho)
    torch.testing.assert_close(layer.kl_divergence(), fresh)
    assert not torch.isclose(fresh, kept_kl)
    with torch.no_grad():
        draws = torch.stack([layer._prediction_sample("weight", layer.weight_mu, layer.weight_rho) for _ in range(200)])
    spread = (draws - layer.weight_mu).std() / expected_std.mean()
    assert 0.9 < float(spread) < 1.1


def test_load_state_dict_with_swapped_tensors_after_forwards():
    """torch's swap_tensors loading refused parameters that the kept stds (a weak reference) and KL (its graph) held."""
    layer, source = bdl.BayesLinear(4, 3), bdl.BayesLinear(4, 3)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.no_grad():
            layer(torch.randn(2, 4))
        layer.load_state_dict(source.state_dict())
        layer(torch.randn(2, 4))  # a training forward, not backpropagated
        layer.load_state_dict(source.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert torch.equal(layer.weight_mu, source.weight_mu) and torch.equal(layer.weight_rho, source.weight_rho)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("grad", [True, False])
def test_the_positions_of_an_input_share_one_weight_sample(estimator, grad):
    # flipout and local gave every position of [B, T, in] its own weights: the mean over T of a repeated token had
    # 1/T of its variance (0.062 against 1.0), in training (a different objective than the ELBO) and prediction
    torch.manual_seed(0)
    layer = bdl.BayesLinear(4, 3, posterior_std_init=0.5, estimator=estimator)
    token = torch.randn(2, 1, 4)
    for x, position_dim in ((token.expand(2, 5, 4), 1), (token.transpose(0, 1).expand(5, 2, 4), 0)):  # [B, T], [T, B]
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert torch.equal(y, y.narrow(position_dim, 0, 1).expand_as(y))  # one weight sample serves every position
        assert not torch.equal(y[:, 0] if position_dim == 0 else y[0], layer(x)[:, 0] if position_dim == 0 else layer(x)[0])
    assert layer.estimator == estimator


def test_a_prior_set_to_none_is_the_constructors_none():
    # kept as None, it made kl_divergence() raise "'NoneType' object has no attribute 'posterior_kl'"
    layer = bdl.BayesLinear(4, 3)
    expected = layer.kl_divergence()
    layer.weight_prior, layer.bias_prior = 2.0, 2.0
    assert not torch.allclose(layer.kl_divergence(), expected)
    layer.weight_prior = layer.bias_prior = None
    assert isinstance(layer.weight_prior, bdl.GaussianPrior) and isinstance(layer.bias_prior, bdl.GaussianPrior)
    torch.testing.assert_close(layer.kl_divergence(), expected)
    assert bdl.BayesLinear(4, 3, bias=False).bias_prior is None  # no bias, no bias prior


def test_a_traced_layer_draws_fresh_noise_and_runs_with_gradients_when_traced_without(monkeypatch):
    # traced with 2+ threads, a large layer's chunked noise recorded its chunks' seeds as constant generators; traced
    # under no_grad, the prediction path's addcmul(out=...) was recorded and refused by a replay with gradients
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the chunked path, whatever this machine has
    layer, x = bdl.BayesLinear(512, 512), torch.randn(2, 512)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        traced = torch.jit.trace(layer, x, check_trace=False)
    assert "Generator" not in str(traced.graph)
    torch.manual_seed(1)
    first = traced(x)
    torch.manual_seed(1)
    assert torch.equal(traced(x), first) and not torch.equal(traced(x), first)  # seeded, and fresh
    first.sum().backward()  # with gradients: the trace has no out= op
    # every estimator: flipout's signs (bits viewed as int32) had no op in a trace, local's draw an out= op
    for estimator in ("local", "flipout"):
        net = nn.Sequential(bdl.BayesLinear(4, 8, estimator=estimator), nn.ReLU(), bdl.BayesLinear(8, 3, estimator=estimator))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, x[:, :4], check_trace=False)
        outputs = traced(x[:, :4])
        assert not torch.equal(outputs, traced(x[:, :4]))
        outputs.sum().backward()



def test_traced_flipout_signs_of_half_layers_are_float32_coin_flips(monkeypatch):
    # a bfloat16 uniform is below 1/2 with probability 0.5009, not 1/2: the signs come from float32 uniforms
    from bdl.nn.functional import _random_signs

    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # the uniform path, as in a trace
    torch.manual_seed(0)
    expected = (torch.rand(1000) < 0.5).float() * 2 - 1
    torch.manual_seed(0)
    signs = _random_signs(torch.empty(1000, dtype=torch.bfloat16), per_channel=False)
    assert signs.dtype == torch.bfloat16 and torch.equal(signs.float(), expected)


def test_the_kl_handed_out_edited_in_place_does_not_change_the_next_one():
    # a bias-free layer's KL is the cached tensor itself: `kl /= num_data` (a logging line) edited every later KL
    torch.manual_seed(0)
    for layer, x in ((bdl.BayesLinear(20, 3, bias=False), torch.randn(4, 20)), (bdl.BayesConv2d(2, 3, 3, bias=False), torch.randn(2, 2, 6, 6))):
        layer(x)
        expected = layer.weight_prior.posterior_kl(layer.weight_mu, layer.weight_rho, layer.std_transform).item()
        kl = bdl.kl_divergence(layer)
        kl /= 1000
        with torch.no_grad():
            logged = bdl.kl_divergence(layer)
            logged /= 50_000
        assert bdl.kl_divergence(layer).item() == pytest.approx(expected, rel=1e-5)


def test_sample_buffers_of_threads_that_ended_are_freed_by_the_next_predict():
    # kept per thread id and never dropped: 16 server threads that predicted and ended held 16 weight-sized buffers
    import threading

    model = nn.Sequential(bdl.BayesLinear(256, 256), nn.ReLU(), bdl.BayesLinear(256, 4))  # a 65,536-weight buffer
    x = torch.randn(8, 256)

    def threads_holding():
        return {key[2] for key in model[0]._std_cache if key[0] == "sample"}

    bdl.predict(model, x, num_samples=2, method="loop")
    assert threads_holding() == {threading.get_ident()}
    workers = [threading.Thread(target=bdl.predict, args=(model, x), kwargs={"num_samples": 2, "method": "loop"}) for _ in range(3)]
    for worker in workers:
        worker.start()
        worker.join()  # one after another: a thread's id may be reused by the next, as the buffer may
    assert len(threads_holding()) >= 2  # held after they ended
    bdl.predict(model, x, num_samples=2, method="loop")
    assert threads_holding() == {threading.get_ident()}


def test_a_layer_made_in_inference_mode_and_cast_outside_it_predicts():
    # its parameters are no inference tensors but keep no version counter: the caches keyed by it raised "Inference
    # tensors do not track version counter" (predict, a vmap ensemble of such members). Training it fails in torch
    # itself, as for an nn.Linear made so: autograd cannot save such a tensor
    with torch.inference_mode():
        layer, members = bdl.BayesLinear(4, 2), [nn.Linear(4, 2) for _ in range(3)]
    layer, members = layer.double(), [member.double() for member in members]
    x = torch.randn(3, 4, dtype=torch.float64)
    assert bdl.predict(layer, x, num_samples=2, task="regression").mean.shape == (3, 2)
    with torch.no_grad():
        assert bool(torch.isfinite(bdl.kl_divergence(layer)))
    with torch.no_grad():  # (torch's own nn.Linear cannot run such weights at all: the sampled and stacked ones can)
        stacked = bdl.DeepEnsemble(members, method="vmap")(x)
    weights = torch.stack([member.weight.detach().clone() for member in members])
    biases = torch.stack([member.bias.detach().clone() for member in members])
    torch.testing.assert_close(stacked, x @ weights.transpose(1, 2) + biases[:, None])
