import copy
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdl
from bdl.wrappers.ensemble import ENSEMBLE_METHODS, DeepEnsemble


def member(out=3):
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out))


def gaussian_member():
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), bdl.GaussianHead(16, 2))


def ensemble_pair(factory=member, count=4):
    torch.manual_seed(0)
    members = [factory() for _ in range(count)]
    for m in members:  # non-trivial BatchNorm statistics so the buffers matter
        for module in m.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    loop = DeepEnsemble(members, method="loop").eval()
    vmap = DeepEnsemble(members, method="vmap").eval()
    return loop, vmap


def test_forward_stacks_every_member_output():
    ensemble, _ = ensemble_pair()
    x = torch.randn(5, 4)
    out = ensemble(x)
    assert out.shape == (4, 5, 3)
    for i, m in enumerate(ensemble.members):
        torch.testing.assert_close(out[i], m(x))


@pytest.mark.parametrize("factory", [member, gaussian_member], ids=["logits", "gaussian-head"])
def test_vmap_and_loop_give_identical_outputs(factory):
    loop, vmap = ensemble_pair(factory)
    x = torch.randn(7, 4)
    assert loop.resolve_method() == "loop" and vmap.resolve_method() == "vmap"
    expected, got = loop(x), vmap(x)
    if isinstance(expected, tuple):
        assert type(got) is type(expected)  # GaussianOutput survives both paths
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(expected, got, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(vmap(x) if not isinstance(got, tuple) else vmap(x)[0], got if not isinstance(got, tuple) else got[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_vmap_runs_bayesian_members_of_every_estimator_without_gradients(estimator, device):
    # the layers' no-graph shortcuts (cached stds, draws written in place) must stay out of torch.func's way
    torch.manual_seed(0)
    members = [nn.Sequential(bdl.BayesLinear(4, 8, estimator=estimator), nn.ReLU(), bdl.BayesLinear(8, 3, estimator=estimator)) for _ in range(3)]
    ensemble = DeepEnsemble(members, method="vmap").to(device).eval()
    x = torch.randn(5, 4, device=device)
    with warnings.catch_warnings():
        # nor fall back to functorch's slow per-member loop, which warns "There is a performance drop ..."
        warnings.filterwarnings("error", message=".*performance drop")
        with torch.no_grad():
            assert ensemble(x).shape == (3, 5, 3)
        pred = bdl.predict(ensemble, x, num_samples=6)
    assert pred.num_samples == 6 and pred.probs.device.type == device and bool(torch.isfinite(pred.probs).all())


def test_vmap_training_sends_each_members_own_gradient_to_it():
    torch.manual_seed(0)
    loop, vmap = ensemble_pair(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), count=3)
    loop.train(), vmap.train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    grads = {}
    for name, ensemble in (("loop", loop), ("vmap", vmap)):
        ensemble.zero_grad()
        ensemble.member_losses(ensemble(x), y, F.cross_entropy).sum().backward()
        grads[name] = [p.grad.clone() for p in ensemble.parameters()]
    # member 1 alone on its own loss
    only = copy.deepcopy(loop.members[1])
    F.cross_entropy(only(x), y).backward()
    for a, b in zip(grads["loop"], grads["vmap"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    own = [p.grad for p in only.parameters()]
    member_grads = grads["vmap"][len(own) : 2 * len(own)]
    for a, b in zip(own, member_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_vmap_cache_follows_in_place_updates():
    _, ensemble = ensemble_pair()
    x = torch.randn(3, 4)
    with torch.no_grad():
        before = ensemble(x)
        ensemble.members[2][3].bias.add_(1.0)
        after = ensemble(x)
    torch.testing.assert_close(after[2], before[2] + 1.0)
    torch.testing.assert_close(after[:2], before[:2])

    # an edit through .data (an EMA copy) moves no version counter: predict starts every call afresh
    with torch.no_grad():
        ensemble.members[2][3].bias.data.add_(1.0)
    prediction = bdl.predict(ensemble, x, task="regression", keep_samples=True)
    torch.testing.assert_close(prediction.sample_means[2], after[2] + 1.0)


def test_members_with_different_output_shapes_are_an_error():
    ensemble = DeepEnsemble([member(3), member(3), member(4)]).eval()
    with pytest.raises(ValueError, match=r"member 2: \(5, 4\)"):
        ensemble(torch.randn(5, 4))


def test_one_network_twice_is_refused():
    # a factory returning the same network (lambda: net) made an ensemble of one: mutual information exactly 0
    net = member(3)
    for build in (lambda: DeepEnsemble([net, member(3), net]), lambda: DeepEnsemble.from_factory(lambda: net, 3)):
        with pytest.raises(ValueError, match=r"members\[(1|2)\] is members\[0\], the same network"):
            build()


def test_different_architectures_fall_back_to_the_loop_or_refuse_vmap():
    members = [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))]
    assert not DeepEnsemble(members).shares_architecture()
    assert DeepEnsemble(members, method="auto").resolve_method() == "loop"
    with pytest.raises(ValueError, match="one architecture"):
        DeepEnsemble(members, method="vmap")(torch.randn(2, 4))


def test_vmap_refuses_members_in_training_mode_with_buffers_whatever_the_wrappers_mode():
    # the wrapper's flag was read: members switched to train() in an eval ensemble ran BatchNorm in training mode
    # under vmap, whose statistics' updates went to the stacked copy (the members' never moved); the reverse was
    # refused as "members of one architecture"
    _, vmap = ensemble_pair()
    x = torch.randn(6, 4)
    for member_ in vmap.members:
        member_.train()
    statistics = vmap.members[0][1].running_mean.clone()
    with pytest.raises(ValueError, match=r"cannot run members in training mode that hold buffers \(BatchNorm statistics\)"):
        vmap(x)
    assert torch.equal(vmap.members[0][1].running_mean, statistics)
    vmap.train()
    for member_ in vmap.members:
        member_.eval()
    assert vmap.resolve_method() == "vmap"  # nothing to update
    # InstanceNorm and an untracked BatchNorm register their statistics as None: nothing to update, vmap runs
    norms = DeepEnsemble([nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False)) for _ in range(2)], method="vmap")
    assert norms.train().resolve_method() == "vmap" and norms(x).shape == (2, 6, 6)


def test_members_that_differ_in_plain_attributes_or_mode_refuse_vmap():
    class Scaled(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.linear, self.factor = nn.Linear(4, 3), factor

        def forward(self, x):
            return self.linear(x) * self.factor

    x = torch.randn(2, 4)
    ensemble = DeepEnsemble([Scaled(1.0), Scaled(100.0)], method="vmap")  # vmap ran member 0's factor for both
    assert not ensemble.shares_architecture()
    with pytest.raises(ValueError, match="one architecture"):
        ensemble(x)
    same = DeepEnsemble([Scaled(2.0), Scaled(2.0)], method="vmap")
    torch.testing.assert_close(same(x), DeepEnsemble(same.members, method="loop")(x))
    mixed = DeepEnsemble([nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)) for _ in range(2)], method="vmap")
    mixed.eval().members[1].train()  # one member's dropout on: vmap would run both in member 0's mode
    assert not mixed.shares_architecture()
    # settings held in tensors, compared by value (several elements: == has no truth value)
    for factors in ([torch.tensor(1.0), torch.tensor(100.0)], [torch.ones(3), torch.tensor([1.0, 1.0, 2.0])]):
        assert not DeepEnsemble([Scaled(factor) for factor in factors], method="vmap").shares_architecture()
    assert DeepEnsemble([Scaled(torch.ones(3)), Scaled(torch.ones(3))], method="vmap").shares_architecture()


def test_members_refused_by_vmap_are_told_where_they_differ():
    # "needs members of one architecture" for members of one architecture, one of them in a bdl.deterministic block
    x = torch.randn(3, 4)
    ensemble = DeepEnsemble.from_factory(lambda: nn.Sequential(bdl.BayesLinear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3)), 3, method="vmap")
    with bdl.deterministic(ensemble.members[1]), pytest.raises(ValueError, match=r"member 1's attribute '0.deterministic' is True, member 0's False"):
        ensemble(x)
    ensemble.members[2][1].p = 0.5
    with pytest.raises(ValueError, match=r"member 2's module '1' is Dropout\(p=0.5, inplace=False\), member 0's Dropout\(p=0.1"):
        ensemble(x)
    with pytest.raises(ValueError, match=r"member 1's parameter 'weight' is float64 \[3, 4\] on cpu, member 0's float32 \[3, 4\] on cpu"):
        DeepEnsemble([nn.Linear(4, 3), nn.Linear(4, 3).double()], method="vmap")(x)
    with pytest.raises(ValueError, match=r"member 1 has 3 modules \(the network itself included\), member 0 2"):
        DeepEnsemble([nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3), nn.ReLU())], method="vmap")(x)
    tables = []
    for table in (torch.randn(4, 250), torch.randn(4, 250)):  # printed whole: a 25,000-character error
        tables.append(nn.Linear(4, 3))
        tables[-1].table = table
    with pytest.raises(ValueError, match=r"attribute 'table' is a float32 tensor \[4, 250\] \(other values\), member 0's a float32 tensor") as refused:
        DeepEnsemble(tables, method="vmap")(x)
    assert len(str(refused.value)) < 300
    arrays = [nn.Linear(4, 3), nn.Linear(4, 3)]
    for member_ in arrays:  # equal numpy arrays: one setting (== of arrays has no truth value: they were told apart)
        member_.table = np.array([1.0, 2.0])
    assert DeepEnsemble(arrays, method="vmap").shares_architecture()
    for member_ in arrays:  # arrays of arrays: no truth value of their items' == either
        member_.table = np.array([np.zeros(2), np.zeros(3)], dtype=object)
    assert not DeepEnsemble(arrays, method="vmap").shares_architecture()
    small, kinds = [nn.Linear(4, 3), nn.Linear(4, 3)], [nn.Linear(4, 3), nn.Linear(4, 3)]
    for member_, value, kind in zip(small, (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])), (np.float32, np.float64)):
        member_.setting, kinds[len(kinds) - 2 + (kind is np.float64)].kind = value, kind
    with pytest.raises(ValueError, match=r"attribute 'setting' is tensor\(\[1., 3.\]\), member 0's tensor\(\[1., 2.\]\)"):
        DeepEnsemble(small, method="vmap")(x)
    with pytest.raises(ValueError, match=r"attribute 'kind' is <class 'numpy.float64'>, member 0's <class 'numpy.float32'>"):
        DeepEnsemble(kinds, method="vmap")(x)


def test_members_with_weights_tied_in_some_only_refuse_vmap():
    # a tied weight is one parameter (named once): vmap's copy of the tied member 0 ran member 1 tied too
    def member(tied):
        net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        if tied:
            net[2].weight = net[0].weight
        return net

    assert not DeepEnsemble([member(True), member(False)], method="vmap").shares_architecture()
    assert not DeepEnsemble([member(False), member(True)], method="vmap").shares_architecture()
    with pytest.raises(ValueError, match=r"member 1 has parameter '2.bias' where member 0 has '2.weight' \(one tied to another"):
        DeepEnsemble([member(False), member(True)], method="vmap")(torch.randn(3, 4))
    tied = DeepEnsemble([member(True), member(True)], method="vmap")
    x = torch.randn(3, 4)
    torch.testing.assert_close(tied(x), DeepEnsemble(tied.members, method="loop")(x))


def test_vmap_with_batchnorm_in_training_mode_is_refused():
    ensemble = DeepEnsemble([member(), member()], method="vmap").train()
    with pytest.raises(ValueError, match="buffers"):
        ensemble(torch.randn(4, 4))


def test_from_factory_makes_independently_initialised_members():
    ensemble = DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 5)
    assert len(ensemble) == ensemble.num_members == 5
    weights = torch.stack([m.weight for m in ensemble.members])
    assert (weights[1:] != weights[:1]).any(dim=(1, 2)).all()


def test_from_checkpoints_loads_files_and_lightning_style_dicts(tmp_path):
    members = [member() for _ in range(3)]
    paths = []
    for i, m in enumerate(members):
        path = tmp_path / f"member{i}.pt"
        if i == 0:
            torch.save(m.state_dict(), path)
        else:  # Lightning: {"state_dict": {"model.<key>": ...}, ...}
            torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, path)
        paths.append(path)
    with pytest.raises(RuntimeError):  # the Lightning files need the prefix
        DeepEnsemble.from_checkpoints(member, paths)
    loaded = DeepEnsemble.from_checkpoints(member, [paths[0]], prefix="")
    torch.testing.assert_close(loaded.members[0][0].weight, members[0][0].weight)
    loaded = DeepEnsemble.from_checkpoints(member, paths[1:], prefix="model.")
    for a, b in zip(loaded.members, members[1:]):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="prefix"):
        DeepEnsemble.from_checkpoints(member, paths[1:], prefix="net.")
    with pytest.raises(TypeError, match="one checkpoint per member"):
        DeepEnsemble.from_checkpoints(member, paths[0])
    broken = tmp_path / "broken.pt"  # torch's KeyError: 101, or its advice to load with weights_only=False
    broken.write_bytes(paths[0].read_bytes()[:200])
    with pytest.raises(ValueError, match=r"checkpoints\[1\] \('.*broken.pt'\) cannot be loaded with weights_only=True, map_location='cpu': RuntimeError: PytorchStreamReader"):
        DeepEnsemble.from_checkpoints(member, [paths[0], broken])
    with pytest.raises(RuntimeError, match=r"checkpoints\[0\] does not fit the factory's model: Error\(s\) in loading"):
        DeepEnsemble.from_checkpoints(lambda: nn.Sequential(nn.Linear(4, 3)), [paths[0]])
    # a LightningModule's state dict, every key under its attribute: torch's missing and unexpected keys, no hint
    lightning_like = {f"model.{key}": value for key, value in nn.Linear(4, 3).state_dict().items()}
    with pytest.raises(RuntimeError, match=r"does not fit the factory's model \(every key of the checkpoint starts with 'model.': pass prefix='model.'\)"):
        DeepEnsemble.from_checkpoints(lambda: nn.Linear(4, 3), [lightning_like])
    assert DeepEnsemble.from_checkpoints(lambda: nn.Linear(4, 3), [lightning_like], prefix="model.").num_members == 1
    # a whole ensemble's state dict (an EnsembleModule's too, under model.members.<i>.): torch's key lists only
    factory = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    whole = DeepEnsemble.from_factory(factory, 3)
    lightning = {"state_dict": {f"model.{k}": v for k, v in whole.state_dict().items()}}
    for state, stem in ((whole.state_dict(), "members."), (lightning, "model.members.")):
        advice = rf"\(it holds a whole ensemble of 3 members, under '{stem}<i>.': pass it once per member with a prefix each, prefix=\[f'{stem}{{i}}.' for i in range\(3\)\]\)"
        with pytest.raises(RuntimeError, match=advice):
            DeepEnsemble.from_checkpoints(factory, [state])
        with pytest.raises(ValueError, match=r"has none of the factory model's keys \(strict=False loaded nothing\) " + advice):
            DeepEnsemble.from_checkpoints(factory, [state], strict=False)  # members of their initial weights before
        loaded = DeepEnsemble.from_checkpoints(factory, [state] * 3, prefix=[f"{stem}{i}." for i in range(3)])  # as advised
        for i in range(3):
            torch.testing.assert_close(loaded.members[i](torch.ones(2, 4)), whole.members[i](torch.ones(2, 4)))
    with pytest.raises(RuntimeError, match=r"under 'model.members.<i>.'"):  # the prefix Lightning's docs name: hinted too
        DeepEnsemble.from_checkpoints(factory, [lightning], prefix="model.")
    with pytest.raises(ValueError, match=r"prefix gives 1 prefixes for 3 checkpoints: give one per checkpoint"):
        DeepEnsemble.from_checkpoints(factory, [lightning] * 3, prefix=["model.members.0."])
    with pytest.raises(TypeError, match=r"prefix must be a str, or a sequence of one str per checkpoint"):
        DeepEnsemble.from_checkpoints(factory, [lightning] * 2, prefix={"model.members.0.", "model.members.1."})  # no order
    assert DeepEnsemble.from_checkpoints(factory, [whole.members[0].state_dict()], prefix=None).num_members == 1  # no prefix
    # a BatchNorm fills in its num_batches_tracked, so missing_keys never held every key: nothing loaded, silently
    normed = lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))  # noqa: E731
    for foreign in ({"foo.weight": torch.zeros(1)}, DeepEnsemble.from_factory(normed, 2).state_dict()):
        with pytest.raises(ValueError, match=r"has none of the factory model's keys \(strict=False loaded nothing\)"):
            DeepEnsemble.from_checkpoints(normed, [foreign], strict=False)


def test_from_checkpoints_with_a_prefix_keeps_each_layers_saved_std_transform(tmp_path):
    # the prefix was stripped into a plain dict, which lost the state's metadata: rho saved under softplus was
    # loaded unconverted into exp layers (posterior std 0.6487 for 0.5), without the warning load_state_dict gives
    class Wrapper(nn.Module):  # a LightningModule's keys: "model.<key>"
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    trained = nn.Sequential(bdl.BayesLinear(4, 3, std_transform="softplus", posterior_std_init=0.5))
    torch.save({"state_dict": Wrapper(trained).state_dict()}, tmp_path / "softplus.ckpt")
    with pytest.warns(UserWarning, match="std_transform"):
        ensemble = DeepEnsemble.from_checkpoints(
            lambda: nn.Sequential(bdl.BayesLinear(4, 3, std_transform="exp")), [tmp_path / "softplus.ckpt"], prefix="model."
        )
    torch.testing.assert_close(ensemble.members[0][0].weight_rho.exp(), torch.full((3, 4), 0.5))
    # a bare layer under a deeper prefix: torch's consume_prefix_in_state_dict_if_present misses its record
    nested = Wrapper(nn.ModuleDict({"net": bdl.BayesLinear(4, 3, std_transform="softplus", posterior_std_init=0.5)}))
    torch.save({"state_dict": nested.state_dict()}, tmp_path / "nested.ckpt")
    with pytest.warns(UserWarning, match="std_transform"):
        ensemble = DeepEnsemble.from_checkpoints(
            lambda: bdl.BayesLinear(4, 3, std_transform="exp"), [tmp_path / "nested.ckpt"], prefix="model.net."
        )
    torch.testing.assert_close(ensemble.members[0].weight_rho.exp(), torch.full((3, 4), 0.5))


def test_predict_treats_members_as_samples():
    ensemble, _ = ensemble_pair(gaussian_member)
    x = torch.randn(6, 4)
    pred = bdl.predict(ensemble, x, task="regression")
    with torch.no_grad():
        means, variances = ensemble.eval()(x)
    assert pred.num_samples == 4
    torch.testing.assert_close(pred.mean, means.mean(0))
    torch.testing.assert_close(pred.aleatoric_variance, variances.mean(0))
    torch.testing.assert_close(pred.epistemic_variance, means.var(0, unbiased=False))


def test_stochastic_members_run_several_rounds():
    members = [bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))) for _ in range(3)]
    ensemble = DeepEnsemble(members)
    pred = bdl.predict(ensemble, torch.randn(5, 4), num_samples=12, keep_samples=True)
    assert pred.num_samples == 12 and pred.sample_probs.shape == (12, 5, 3)
    assert not torch.allclose(pred.sample_probs[0], pred.sample_probs[3])  # member 0, rounds 1 and 2
    with pytest.raises(ValueError, match="multiple"):
        bdl.predict(ensemble, torch.randn(5, 4), num_samples=10)


def test_deterministic_ensemble_of_identical_members_has_zero_mutual_information():
    net = member().eval()
    ensemble = DeepEnsemble([net, copy.deepcopy(net), copy.deepcopy(net)])
    pred = bdl.predict(ensemble, torch.randn(8, 4))
    torch.testing.assert_close(pred.mutual_information, torch.zeros(8), atol=1e-6, rtol=0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="empty"):
        DeepEnsemble([])
    with pytest.raises(TypeError, match=r"members\[1\]"):
        DeepEnsemble([nn.Linear(2, 2), "net"])
    with pytest.raises(TypeError, match=r"got a single Linear; use DeepEnsemble.from_factory"):
        DeepEnsemble(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"got a single Sequential"):  # its layers were taken for members
        DeepEnsemble(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    assert len(DeepEnsemble(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))) == 2
    with pytest.raises(ValueError, match="method must be one of"):
        DeepEnsemble([nn.Linear(2, 2)], method="parallel")
    with pytest.raises(ValueError, match="num_members"):
        DeepEnsemble.from_factory(lambda: nn.Linear(2, 2), 0)
    for make in (lambda: DeepEnsemble.from_factory(nn.Linear(2, 2), 3), lambda: DeepEnsemble.from_checkpoints(nn.Linear(2, 2), [{}])):
        with pytest.raises(TypeError, match="factory must be a callable that takes no arguments"):
            make()  # a module instead of a factory
    assert set(ENSEMBLE_METHODS) == {"auto", "vmap", "loop"}


def test_ensemble_copies_and_pickles_without_caches():
    _, ensemble = ensemble_pair()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = ensemble(x)  # builds the meta copy and the stacked cache
    for clone in (copy.deepcopy(ensemble), pickle.loads(pickle.dumps(ensemble))):
        assert not any(p.is_meta for p in clone.parameters())
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected)
    assert all(not name.startswith("_base") for name in ensemble.state_dict())


@pytest.mark.slow
def test_toy_with_a_gap_separates_aleatoric_from_epistemic_variance(one_thread):
    # 1-D regression on x in [-4, -1] and [1, 4] with noise std rising linearly from 0.1 to 0.9
    torch.manual_seed(0)
    x = torch.cat([torch.rand(128, 1) * 3 - 4, torch.rand(128, 1) * 3 + 1])
    noise_std = lambda x: 0.1 + 0.1 * (x + 4)  # noqa: E731
    y = torch.sin(x) + noise_std(x) * torch.randn_like(x)
    ensemble = DeepEnsemble.from_factory(
        lambda: nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), bdl.GaussianHead(32, 1)),
        5,
        method="vmap",  # joint training: one vectorised forward and one optimizer for all members
    )
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        ensemble.member_losses(ensemble(x), y, bdl.GaussianNLLLoss()).sum().backward()
        optimizer.step()
    grid = torch.linspace(-4, 4, 81)[:, None]
    pred = bdl.predict(ensemble, grid, task="regression")
    gap, seen = grid[:, 0].abs() < 0.5, grid[:, 0].abs() > 1.2
    assert pred.epistemic_variance[gap].mean() > 4 * pred.epistemic_variance[seen].mean()
    true_variance = noise_std(grid[seen]).square()
    ratio = pred.aleatoric_variance[seen] / true_variance
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio.flatten()
    log_pairs = torch.stack([pred.aleatoric_variance[seen].log().flatten(), true_variance.log().flatten()])
    assert torch.corrcoef(log_pairs)[0, 1] > 0.95
    torch.testing.assert_close(pred.total_variance, pred.aleatoric_variance + pred.epistemic_variance)


def bayesian_member():
    return nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))


def test_vmap_follows_the_members_settings_after_its_first_forward():
    # the first forward's copy of member 0 kept its plain attributes: inside bdl.deterministic the ensemble
    # still sampled, after a first forward inside it never sampled again, and a changed dropout rate was ignored
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    ensemble = DeepEnsemble([bayesian_member() for _ in range(2)], method="vmap")
    ensemble(x)
    with bdl.deterministic(ensemble):
        means = torch.stack([F.linear(F.linear(x, m[0].weight_mu, m[0].bias_mu).relu(), m[2].weight_mu, m[2].bias_mu) for m in ensemble.members])
        torch.testing.assert_close(ensemble(x), means)
    assert not torch.equal(ensemble(x), ensemble(x))  # sampling again outside the block
    dropout = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)) for _ in range(2)], method="vmap").train()
    dropout(x)
    for net in dropout.members:
        net[1].p = 0.0
    torch.testing.assert_close(dropout(x), dropout.eval()(x))


class _Keyed(nn.Module):  # a private setting, and a cache with its key (as a rotary embedding's _seq_len_cached)
    def __init__(self):
        super().__init__()
        self.linear, self._scale, self._seen, self._key, self._table = nn.Linear(4, 3), 1.0, [], None, None

    def forward(self, x, offset=0):
        self._seen.append(x.shape)
        if self._key != offset:
            self._key, self._table = offset, torch.arange(3.0) + offset
        return self.linear(x) * self._scale + self._table


def test_vmap_follows_member_0s_private_settings_with_the_caches_they_key():
    x, members = torch.randn(2, 4), [_Keyed(), _Keyed()]
    ensemble = DeepEnsemble(members, method="vmap")
    ensemble(x)
    for net in members:
        net._scale = 10.0  # the copy kept member 0's first value: the old outputs, silently
    torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in members]))
    # vmap's copy fills a list of its own, not member 0's with vmap's batched shapes
    assert members[0]._seen == [x.shape] and members[1]._seen == [x.shape]
    for net in members:  # key and table of member 0 change together: copied together, not the key alone
        net(x, offset=3)
    torch.testing.assert_close(ensemble(x, offset=3), torch.stack([net(x, offset=3) for net in members]))
    members[0]._scale = members[1]._scale = 2.0  # the copy made again for it
    torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in members]))


def test_members_whose_private_settings_differ_run_by_the_loop_with_a_warning():
    x, members = torch.randn(2, 4), [_Keyed(), _Keyed()]
    members[1]._scale = 5.0  # a temperature each: vmap ran member 0's for both
    ensemble = DeepEnsemble(members, method="vmap")
    with pytest.warns(UserWarning, match=r"the members' private attribute '_scale' differs.*method='loop'"):
        assert ensemble.resolve_method() == "loop"
    torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in members]))
    # state, not a setting: None in one member and an object in another (a Lightning module's _trainer once fit)
    fit = [_Keyed(), _Keyed()]
    fit[0]._trainer, fit[1]._trainer = object(), None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeepEnsemble(fit, method="vmap").resolve_method() == "vmap"
    one_sided = [_Keyed(), _Keyed()]  # a setting that one member has: its value ran for both
    one_sided[0]._temperature = 2.0
    with pytest.warns(UserWarning, match="'_temperature' differs"):
        assert DeepEnsemble(one_sided, method="vmap").resolve_method() == "loop"


def test_members_that_keep_a_tensor_of_their_weights_run_by_the_loop_with_a_warning():
    class Tied(nn.Module):  # the copy of member 0 would read member 0's weight for every member
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(3, 5, bias=False)
            self._decoder = self.encoder.weight.view(5, 3)

        def forward(self, x):
            return self.encoder(x).relu() @ self._decoder

    members, x = [Tied(), Tied()], torch.randn(4, 3)
    ensemble = DeepEnsemble(members, method="vmap")
    with pytest.warns(UserWarning, match=r"member 0's Tied._decoder is a tensor of its weights .*method='loop'"):
        torch.testing.assert_close(ensemble(x), torch.stack([net(x) for net in members]))


def test_functional_call_runs_a_vmap_ensemble_before_its_first_forward():
    # the meta copy was made with .to("meta") while functional_call's plain tensors were in place: AssertionError
    ensemble = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)], method="vmap")
    x = torch.randn(5, 4)
    state = {name: value * 2 for name, value in ensemble.state_dict().items()}
    out = torch.func.functional_call(ensemble, state, (x,))
    expected = torch.stack([torch.func.functional_call(m, {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"members.{i}.")}, (x,))
                            for i, m in enumerate(ensemble.members)])  # fmt: skip
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_keyword_arguments_reach_every_member(method):
    # a transformer member's src_key_padding_mask could not be passed: forward took positional inputs only
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x, mask=None):
            out = self.linear(x)
            return out if mask is None else out.masked_fill(mask[..., None], 0.0)

    torch.manual_seed(0)
    ensemble = DeepEnsemble.from_factory(Masked, 3, method=method)
    x, mask = torch.randn(5, 4), torch.tensor([True, False, True, False, False])
    stacked = ensemble(x, mask=mask)
    expected = torch.stack([member(x, mask=mask) for member in ensemble.members])
    torch.testing.assert_close(stacked, expected)
    assert (stacked[:, mask] == 0).all() and (stacked[:, ~mask] != 0).all()


def test_members_with_a_parametrization_share_an_architecture():
    # torch gives every parametrized module a class of its own: vmap was refused ("members of one architecture")
    def member() -> nn.Module:
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 3))

    torch.manual_seed(0)
    ensemble = DeepEnsemble.from_factory(member, 3)
    assert ensemble.shares_architecture()
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # functorch: no batching rule for _weight_norm (a fallback)
        ensemble.method = "vmap"
        vmapped = bdl.predict(ensemble, x, keep_samples=True).sample_probs
    ensemble.method = "loop"
    assert torch.allclose(vmapped, bdl.predict(ensemble, x, keep_samples=True).sample_probs, atol=1e-6)


def test_numpy_integers_are_accepted_as_counts():
    ensemble = DeepEnsemble.from_factory(lambda: nn.Linear(2, 2), np.int64(3), chunk_size=np.int64(2))
    assert len(ensemble) == 3 and ensemble.chunk_size == 2 and type(ensemble.chunk_size) is int


class _ItemNet(nn.Linear):
    def forward(self, x):  # .item() runs alone, not under vmap
        return super().forward(x) * (2.0 if self.weight.sum().item() > 0 else 1.0)


class _InputGradientNet(nn.Linear):
    def forward(self, x):  # an input gradient (a physics-informed network): the loop runs it, vmap does not
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(super().forward(x).tanh().sum(), x, create_graph=True)[0]


def test_a_vmap_failure_suggests_the_loop_only_where_a_member_runs_alone():
    x = torch.randn(5, 4)
    ensemble = DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 3, method="vmap").double()
    with pytest.raises(RuntimeError, match="must have the same dtype") as caught:  # float32 inputs: the loop fails too
        ensemble(x)
    assert "method='loop'" not in str(caught.value)
    with pytest.raises(RuntimeError, match="method='vmap' failed: .*method='loop' runs the members one by one"):
        DeepEnsemble.from_factory(lambda: _ItemNet(4, 3), 3, method="vmap")(x)
    DeepEnsemble.from_factory(lambda: _ItemNet(4, 3), 3, method="loop")(x)
    with pytest.raises(RuntimeError, match="method='loop' runs the members one by one"):  # tried alone under no_grad
        DeepEnsemble.from_factory(lambda: _InputGradientNet(4, 1), 3, method="vmap")(x)
    assert DeepEnsemble.from_factory(lambda: _InputGradientNet(4, 1), 3, method="loop")(x).shape == (3, 5, 4)


def test_predict_samples_mc_dropout_around_an_ensemble_as_an_ensemble_of_mc_dropout_members():
    # predict read the ensemble's stacked [M, B, C] as one output of M rows, and refused it
    def member():
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    torch.manual_seed(0)
    ensemble, x = DeepEnsemble([member() for _ in range(3)]), torch.randn(6, 4)
    torch.manual_seed(1)
    around = bdl.predict(bdl.MCDropout(ensemble), x, num_samples=6)
    torch.manual_seed(1)
    inside = bdl.predict(DeepEnsemble([bdl.MCDropout(m) for m in ensemble.members]), x, num_samples=6)
    torch.manual_seed(1)
    plain = bdl.predict(ensemble, x, num_samples=6)
    assert torch.equal(around.probs, inside.probs) and not torch.equal(around.probs, plain.probs)
    assert not hasattr(bdl.MCDropout(member()), "sample_outputs")  # other models: sampled call by call


def test_members_returning_nested_outputs_give_the_same_outputs_in_the_loop_and_under_vmap():
    class Encoder(nn.Module):  # an LSTM's (output, (h, c)), an attention's (output, None): the loop refused them
        def __init__(self):
            super().__init__()
            self.fc, self.state = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), (self.state(x), self.state(x).exp(), None)

    members, x = [Encoder() for _ in range(3)], torch.randn(5, 4)
    loop, vmap = (DeepEnsemble(members, method=method)(x) for method in ("loop", "vmap"))
    torch.testing.assert_close(loop, vmap)
    assert loop[1][2] is None
    torch.testing.assert_close(loop[1][1], torch.stack([member(x)[1][1] for member in members]))
    losses = DeepEnsemble(members).member_losses(loop, x[:, :2], lambda output, target: F.mse_loss(output[1][0], target))
    torch.testing.assert_close(losses, torch.stack([F.mse_loss(member(x)[1][0], x[:, :2]) for member in members]))


def test_a_vmap_ensemble_of_transformer_encoders_takes_a_padding_mask_in_eval_mode():
    # an eval-mode encoder turned the padded batch into a nested tensor, which vmap cannot batch: RuntimeError
    torch.manual_seed(0)
    members = [nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2) for _ in range(3)]
    x, mask = torch.randn(4, 5, 8), torch.zeros(4, 5, dtype=torch.bool)
    mask[:2, 3:] = True
    ensemble = DeepEnsemble(members, method="vmap").eval()
    with torch.no_grad():
        vmap, loop = ensemble(x, src_key_padding_mask=mask), DeepEnsemble(members, method="loop")(x, src_key_padding_mask=mask)
    torch.testing.assert_close(vmap[:, ~mask], loop[:, ~mask])  # the loop's fast path zeroed the padded positions
    assert all(member.use_nested_tensor for member in members)


def test_members_returning_dicts_give_the_same_outputs_in_the_loop_and_under_vmap():
    class DictNet(nn.Module):  # e.g. a Hugging Face-style {"logits": ...}
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x), "features": x * 2}

    members, x = [DictNet() for _ in range(3)], torch.randn(5, 4)
    loop, vmap = (DeepEnsemble(members, method=method)(x) for method in ("loop", "vmap"))
    assert list(loop) == ["logits", "features"] and loop["logits"].shape == (3, 5, 3)
    torch.testing.assert_close(loop, vmap)
    # joint training reads each member's dict (it recursed into the keys' characters)
    ensemble, y = DeepEnsemble(members), torch.randint(0, 3, (5,))
    losses = ensemble.member_losses(loop, y, lambda output, target: F.cross_entropy(output["logits"], target))
    expected = [F.cross_entropy(member(x)["logits"], y) for member in members]
    torch.testing.assert_close(losses, torch.stack(expected))
    # predict and the Lightning modules read logits: a dict is named as such (it was "a model that returns (mean,
    # variance) needs task='regression'", and an AttributeError there)
    for task in ("classification", "regression"):
        with pytest.raises(TypeError, match=r"the model returned a dict \(keys \['logits', 'features'\]\); predict reads logits"):
            bdl.predict(ensemble, x, task=task)
    module = bdl.lightning.EnsembleModule(DictNet(), num_members=2)
    with pytest.raises(TypeError, match=r"the network returned a dict \(keys \['logits', 'features'\]\)"):
        module.training_loss(x, y)


def test_mc_dropout_around_a_vmapped_ensemble_drops_only_inside_it():
    # vmap runs a copy of member 0 made at the first forward, without the hooks MCDropout puts on the members for a
    # call: it dropped nothing inside MCDropout, or, made inside one, dropped for good outside it
    def member():
        linear = nn.Linear(4, 4)
        nn.init.eye_(linear.weight), nn.init.zeros_(linear.bias)
        return nn.Sequential(linear, nn.Dropout(0.5))

    x = torch.ones(500, 4)
    for first_inside in (True, False):
        ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
        calls = [bdl.MCDropout(ensemble), ensemble] if first_inside else [ensemble, bdl.MCDropout(ensemble)]
        with torch.no_grad():
            dropped = {type(model).__name__: (model(x) == 0).float().mean().item() for model in calls}
        assert dropped["DeepEnsemble"] == 0 and abs(dropped["MCDropout"] - 0.5) < 0.03
    # dropout inserted before each member's layers (an MCDropout hook object per member) drops under vmap too
    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
    inserted = bdl.MCDropout(ensemble, p=0.5, insert_before=[nn.Linear])
    with torch.no_grad():
        assert not torch.equal(inserted(x), inserted(x))
    # a hook on member 0 alone (it zeroed every member) runs in the loop, on member 0 only
    ensemble.members[0][0].register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    with torch.no_grad(), pytest.warns(UserWarning, match="the members' forward hooks differ .* the members run one by one"):
        assert ensemble.resolve_method() == "loop"
    with torch.no_grad():
        outputs = ensemble(x)
    assert (outputs[0] == 0).all() and (outputs[1:] != 0).any()
    # a recording hook of the user's on every member ran once, inside vmap: what it kept failed when read ("escaped")
    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
    features = []

    def record(module, args, output):
        features.append(output)

    for each in ensemble.members:
        each[0].register_forward_hook(record)  # one function: the members' hooks are alike
    with torch.no_grad(), pytest.warns(UserWarning, match="forward hooks of your own .* the members run one by one"):
        outputs = ensemble(x)
    assert len(features) == 3 and all(torch.equal(f, m[0](x)) for f, m in zip(features, ensemble.members))
    # a global hook (register_module_forward_hook) too
    features.clear()
    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: features.append(output) if isinstance(module, nn.Linear) else None
    )
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match=r"global forward hooks \(register_module_forward_hook\) are set"):
            ensemble(x)
    finally:
        handle.remove()
    assert len(features) == 3 and torch.equal(features[0], ensemble.members[0][0](x))
    # torch's hooks that keep state, as quantization observers: on the copy they saw vmap's stacked outputs
    from torch.ao.quantization import MinMaxObserver
    from torch.ao.quantization.quantize import _observer_forward_hook

    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap")
    for each in ensemble.members:
        each[0].activation_post_process = MinMaxObserver()
        each[0].register_forward_hook(_observer_forward_hook)
    ensemble.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="forward hooks of your own"):
        outputs = ensemble(x)
    for each in ensemble.members:
        assert each[0].activation_post_process.max_val == each[0](x).max()  # it stayed -inf
    # torch's module tracker (FlopCounterMode's, Lightning's model summary's) runs on the copy
    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
    with warnings.catch_warnings(), torch.utils.flop_counter.FlopCounterMode(display=False):
        warnings.simplefilter("error")
        assert ensemble.resolve_method() == "vmap"


def test_a_vmap_ensemble_runs_layers_replaced_in_its_members():
    # the copy of member 0 that vmap runs was made once: a layer replaced in every member still ran the old one
    ensemble = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)], method="vmap")
    x = torch.randn(5, 4)
    with torch.no_grad():
        ensemble(x)
        for each in ensemble.members:
            each[1] = nn.Tanh()
        torch.testing.assert_close(ensemble(x), torch.stack([each(x) for each in ensemble.members]))
        for each in ensemble.members:  # of the same type, other settings: "not on the expected device meta"
            each[2] = nn.Linear(8, 2, bias=False)
        torch.testing.assert_close(ensemble(x), torch.stack([each(x) for each in ensemble.members]))
    # twice between forwards: the second took the freed first one's id, which was all the check saw
    ensemble = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)], method="vmap")
    with torch.no_grad():
        ensemble(x)
        for each in ensemble.members:
            each[2] = nn.Identity()
            each[2] = nn.Linear(8, 2, bias=False)
        torch.testing.assert_close(ensemble(x), torch.stack([each(x) for each in ensemble.members]))
        replaced = weakref.ref(ensemble.members[0][2])
        for each in ensemble.members:
            each[2] = nn.Linear(8, 2)
        ensemble._drop_value_caches()
        assert replaced() is None  # not kept alive by the ensemble (nor written by torch.save)
    # MC dropout members whose dropout was inserted before a module replaced since: vmap dropped nothing
    members = [bdl.MCDropout(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), p=0.5, insert_before=["2"]) for _ in range(2)]
    ensemble = DeepEnsemble(members, method="vmap")
    for each in members:
        each.model[2] = nn.Linear(8, 2)
    with torch.no_grad():
        assert not torch.equal(ensemble(x), ensemble(x))


def test_the_stacked_weights_of_a_vmap_ensemble_follow_their_names():
    # kept by the tensors' storage and versions only: a layer inserted (the tensors renamed) failed with "not on the
    # expected device meta", and two same-shape layers registered again in the other order swapped silently (1.58 off
    # in the review's repro)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    x = torch.randn(5, 4)
    inserted = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)], method="vmap")
    swapped = DeepEnsemble([Net() for _ in range(3)], method="vmap")
    with torch.no_grad():
        inserted(x), swapped(x)
        for each in inserted.members:
            each.insert(1, nn.Tanh())
        for each in swapped.members:
            a, b = each.a, each.b
            del each.a, each.b
            each.b, each.a = a, b
        for ensemble in (inserted, swapped):
            torch.testing.assert_close(ensemble(x), torch.stack([each(x) for each in ensemble.members]))


def test_a_vmap_ensemble_runs_under_torch_func_and_inside_another():
    # its stacked-weights cache read data_ptr() of torch.func's wrapped tensors: "Cannot access data pointer of Tensor
    # that doesn't have storage" for a functional grad through it, and for an ensemble of vmapped ensembles
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    x = torch.randn(5, 4)
    nested = DeepEnsemble([DeepEnsemble([nn.Linear(4, 2) for _ in range(2)], method="vmap") for _ in range(3)], method="vmap")
    expected = torch.stack([torch.stack([m(x) for m in inner.members]) for inner in nested.members])
    with torch.no_grad():
        torch.testing.assert_close(nested(x), expected)
    torch.testing.assert_close(nested(x), expected)
    gradients = {}
    for method in ("loop", "vmap"):
        ensemble = DeepEnsemble([nn.Linear(4, 2) for _ in range(3)], method=method)
        torch.manual_seed(1)
        for layer in ensemble.members:
            layer.reset_parameters()
        params = {name: value.detach() for name, value in ensemble.named_parameters()}
        gradients[method] = grad(lambda p: functional_call(ensemble, p, (x,)).square().sum())(params)
    torch.testing.assert_close(gradients["vmap"], gradients["loop"])


def test_members_backward_hooks_run_with_gradients():
    # the vmapped copy of member 0 has no backward hooks: a backward through it ran none of the members'
    ensemble = DeepEnsemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 3)), 3, method="vmap")
    calls = []
    for member in ensemble.members:
        member[0].register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(module))
    x = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        assert ensemble.resolve_method() == "vmap"  # nothing to run backward: vmap as asked
    with pytest.warns(UserWarning, match=r"members have backward hooks \(with gradients\), which vmap cannot run"):
        ensemble(x).sum().backward()
    assert calls and {id(module) for module in calls} == {id(member[0]) for member in ensemble.members}
    # a global backward hook (every module's) too: under vmap it ran for the ensemble alone, not its members' layers
    fresh = DeepEnsemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 3)), 3, method="vmap")
    seen = []
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda module, grad_in, grad_out: seen.append(module))
    try:
        with pytest.warns(UserWarning, match="members have backward hooks"):
            fresh(x).sum().backward()
    finally:
        handle.remove()
    assert {id(member[0]) for member in fresh.members} <= {id(module) for module in seen}


@pytest.mark.parametrize("insert", [False, True])
def test_an_ensemble_of_mc_dropout_members_drops_under_vmap(insert):
    # the vmap copy's hook dictionaries were plain dicts, to which the copy's own MCDropout could not register
    # ("cannot create weak reference to 'dict' object"); with inserted dropout the copy ran member 0's, left off
    def member():
        linear = nn.Linear(4, 4)
        nn.init.eye_(linear.weight), nn.init.zeros_(linear.bias)
        net = nn.Sequential(nn.Identity(), linear) if insert else nn.Sequential(linear, nn.Dropout(0.5))
        return bdl.MCDropout(net, p=0.5, insert_before=[nn.Linear]) if insert else bdl.MCDropout(net)

    x = torch.ones(500, 4)
    ensemble = DeepEnsemble([member() for _ in range(3)], method="vmap").eval()
    with torch.no_grad():
        outputs = ensemble(x)
    dropped = (outputs == 0).float().mean((1, 2))
    assert ensemble.resolve_method() == "vmap" and ((dropped - 0.5).abs() < 0.05).all() and not torch.equal(outputs[0], outputs[1])


def test_compiled_members_under_vmap_are_refused_with_what_to_do():
    # "needs members of one architecture" for members of one architecture: each compile wrapper has its own state
    members = [torch.compile(nn.Linear(4, 2)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"not their torch.compile wrappers: compile the ensemble instead"):
        DeepEnsemble(members, method="vmap")(torch.randn(5, 4))
    with pytest.raises(ValueError, match="needs members of one architecture"):
        DeepEnsemble([nn.Linear(4, 2), nn.Linear(4, 3)], method="vmap")(torch.randn(5, 4))


def test_a_vmap_ensemble_compiles_whole_graph_after_one_call():
    # (its first call makes the weightless copy of member 0 that vmap runs, which a fullgraph compile cannot)
    x = torch.randn(4, 8)
    ensemble = DeepEnsemble.from_factory(lambda: nn.Linear(8, 3), 3, method="vmap").eval()
    torch._dynamo.reset()
    with torch.no_grad():
        ensemble(x)
        torch.testing.assert_close(torch.compile(ensemble, backend="eager", fullgraph=True)(x), torch.stack([m(x) for m in ensemble.members]))


def test_bdl_blocks_on_bayesian_members_leave_a_vmap_ensemble_vmapped_and_compiled():
    # a deterministic / use_estimator block (so bdl.predict) left its bookkeeping on the layers, read as a private
    # setting of the members that had it: a fullgraph-compiled ensemble failed in Dynamo's words, and predicting one
    # member alone sent the ensemble to the loop with a warning on '0._context_blocks'
    x = torch.randn(5, 4)
    ensemble = DeepEnsemble.from_factory(lambda: nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 3, method="vmap")
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble(x)
        bdl.predict(ensemble.members[1], x, num_samples=2)
        compiled = torch.compile(ensemble, backend="eager", fullgraph=True)
        compiled(x)
        assert bdl.predict(compiled, x, num_samples=3).probs.shape == (5, 3)
        with bdl.deterministic(ensemble):
            torch.testing.assert_close(compiled(x), torch.stack([m(x) for m in ensemble.members]))


@pytest.mark.parametrize("num_samples", [3, 6])
def test_predict_runs_a_compiled_ensemble_compiled(num_samples):
    # the compile wrapper's sample_outputs was the ensemble's own, whose calls ran the members eagerly: nothing compiled
    from torch._dynamo.utils import counters

    x = torch.randn(4, 8)
    ensemble = DeepEnsemble.from_factory(lambda: nn.Linear(8, 3), 3).eval()
    torch._dynamo.reset()
    counters.clear()
    prediction = bdl.predict(torch.compile(ensemble, backend="eager"), x, num_samples=num_samples, keep_samples=True)
    assert counters["stats"]["unique_graphs"] >= 1
    expected = torch.stack([m(x) for m in ensemble.members] * (num_samples // 3)).softmax(-1)
    torch.testing.assert_close(prediction.sample_probs, expected)


def test_predict_runs_a_compiled_ensemble_subclass_with_its_own_sample_outputs():
    # (the compiled wrapper bound as its self, super() raised "obj must be an instance or subtype of type")
    class Halved(DeepEnsemble):
        def sample_outputs(self, x, num_samples):
            return super().sample_outputs(x, num_samples) / 2

    x = torch.randn(4, 8)
    ensemble = Halved.from_factory(lambda: nn.Linear(8, 3), 3).eval()
    prediction = bdl.predict(torch.compile(ensemble, backend="eager"), x, keep_samples=True)
    torch.testing.assert_close(prediction.sample_probs, (torch.stack([m(x) for m in ensemble.members]) / 2).softmax(-1))


def test_a_vmap_ensemble_sees_members_trained_by_a_fused_optimizer():
    # its stacked weights were kept by the members' version counters, which a fused optimizer does not move: after
    # training, no-grad calls returned the outputs of before (5.4 off the members' own)
    torch.manual_seed(0)
    ensemble = DeepEnsemble([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)], method="vmap")
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = ensemble(x)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=0.1, fused=True)
    for _ in range(3):
        optimizer.zero_grad()
        torch.stack([member(x) for member in ensemble.members]).square().sum().backward()
        optimizer.step()
    with torch.no_grad():
        after = ensemble(x)
        torch.testing.assert_close(after, torch.stack([member(x) for member in ensemble.members]))
    assert not torch.allclose(after, before)


def test_the_stacked_weights_of_a_vmap_ensemble_follow_the_tensors_themselves():
    # kept by address and version: a new tensor there at version 0 (a replaced Parameter over the same storage here;
    # a functional_call's parameters, or any tensor the allocator put at a freed one's address) got the old stack
    torch.manual_seed(0)
    ensemble = DeepEnsemble([nn.Linear(3, 3, bias=False) for _ in range(2)], method="vmap").eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        ensemble(x)
        ensemble.members[1].weight = nn.Parameter(ensemble.members[1].weight.detach().t())  # same address and version
        torch.testing.assert_close(ensemble(x)[1], ensemble.members[1](x))
        for value in (1.0, 2.0):
            parameters = {name: torch.full_like(p, value) for name, p in ensemble.named_parameters()}
            torch.testing.assert_close(torch.func.functional_call(ensemble, parameters, (x,)), value * x.sum(-1, keepdim=True).expand(2, 4, 3))
