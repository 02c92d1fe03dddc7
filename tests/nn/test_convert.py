import copy
import warnings

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import bdl


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, (3, 1), padding=(1, 0), bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=4, dilation=2, padding=2, padding_mode="reflect"),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_converted_copy_reproduces_original_under_deterministic():
    net = SmallNet().eval()
    bnn = bdl.bayesianize(net)
    x = torch.randn(2, 3, 7, 6)
    with bdl.deterministic(bnn):
        torch.testing.assert_close(bnn(x), net(x), rtol=0, atol=0)
    assert not torch.equal(bnn(x), bnn(x))  # sampling again outside the block


def test_original_model_is_unchanged_and_options_are_preserved():
    net = SmallNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnn = bdl.bayesianize(net, estimator="flipout", posterior_std_init=0.02)
    assert isinstance(net.fc, nn.Linear) and isinstance(bnn.fc, bdl.BayesLinear)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    first, second = bnn.features[0], bnn.features[2]
    assert isinstance(first, bdl.BayesConv2d) and first.kernel_size == (3, 1) and first.bias_mu is None
    assert second.groups == 4 and second.dilation == (2, 2) and second.padding_mode == "reflect"
    assert first.estimator == "flipout"
    torch.testing.assert_close(second.weight_std, torch.full_like(second.weight_std, 0.02))


def test_include_by_name_or_type_and_exclude():
    net = SmallNet()
    last = bdl.bayesianize(net, include=["fc"])
    assert isinstance(last.fc, bdl.BayesLinear) and isinstance(last.features[0], nn.Conv2d)
    convs = bdl.bayesianize(net, include=[nn.Conv2d], exclude=["features.2"])
    assert isinstance(convs.features[0], bdl.BayesConv2d) and isinstance(convs.features[2], nn.Conv2d)
    assert isinstance(convs.fc, nn.Linear)
    with pytest.raises(ValueError, match="selects no"):
        bdl.bayesianize(net, include=["classifier"])


def test_a_single_pattern_or_type_is_one_pattern():
    net = SmallNet()
    # a bare string was read one character at a time: "features.*" converted everything (its "*" matches all)
    convs = bdl.bayesianize(net, include="features.*")
    assert isinstance(convs.features[0], bdl.BayesConv2d) and isinstance(convs.fc, nn.Linear)
    assert isinstance(bdl.bayesianize(net, exclude="features.*").features[0], nn.Conv2d)
    assert isinstance(bdl.bayesianize(net, include=nn.Linear).fc, bdl.BayesLinear)
    with pytest.raises(TypeError, match="include must be"):
        bdl.bayesianize(net, include=[3])


def test_a_module_used_under_two_names_becomes_one_bayesian_layer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.again = self.first

        def forward(self, x):
            return self.again(self.first(x))

    net = Tied()
    for include in (None, ["again"]):
        bnn = bdl.bayesianize(net, include=include)
        assert isinstance(bnn.first, bdl.BayesLinear) and bnn.again is bnn.first
        assert sum(p.numel() for p in bnn.parameters()) == 2 * sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match=r"exclude=\['again'\] leaves out every nn.Linear/nn.Conv layer of the model \('first'\)"):
        bdl.bayesianize(net, exclude=["again"])  # the one layer, by either name: nothing is left to convert


def test_converted_layers_keep_the_training_mode():
    bnn = bdl.bayesianize(SmallNet().eval())
    assert not any(module.training for module in bnn.modules())


@pytest.mark.parametrize("padding_mask", [False, True])
def test_a_converted_transformer_samples_in_eval_mode(padding_mask):
    # in eval mode torch's encoder fast path reads linear1.weight etc. and calls a fused kernel
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    bnn = bdl.bayesianize(encoder)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    kwargs = {"src_key_padding_mask": mask} if padding_mask else {}
    with torch.no_grad():
        assert not torch.equal(bnn(x, **kwargs), bnn(x, **kwargs))  # each call draws weights
        with bdl.deterministic(bnn):
            torch.testing.assert_close(bnn(x, **kwargs)[~mask], encoder(x, **kwargs)[~mask])
    single = bdl.bayesianize(layer).eval()
    with torch.no_grad():
        assert not torch.equal(single(x), single(x))


def test_a_single_layer_converts_to_a_bayesian_layer():
    layer = bdl.bayesianize(nn.Conv1d(2, 3, 5))
    assert isinstance(layer, bdl.BayesConv1d) and layer.kernel_size == (5,)


def test_prior_centred_on_pretrained_weights():
    net = nn.Sequential(nn.Linear(4, 3))
    bnn = bdl.bayesianize(net, prior=0.1, center_prior_on_weights=True)
    layer = bnn[0]
    assert torch.equal(layer.weight_prior.loc, net[0].weight.detach())
    assert torch.equal(layer.bias_prior.loc, net[0].bias.detach())
    assert layer.weight_prior.scale == 0.1
    # posterior means sit on the prior means: the KL is only the scale term, independent of the weights
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(0.0, layer.weight_std), torch.distributions.Normal(0.0, 0.1)
    ).sum() + torch.distributions.kl_divergence(
        torch.distributions.Normal(0.0, layer.bias_std), torch.distributions.Normal(0.0, 0.1)
    ).sum()
    torch.testing.assert_close(layer.kl_divergence(), expected)
    with pytest.raises(ValueError, match="GaussianPrior"):
        bdl.bayesianize(net, prior=bdl.ScaleMixturePrior(), center_prior_on_weights=True)


def test_modules_that_read_their_weights_directly_are_left_alone():
    attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass read by F.multi_head_attention_forward
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) deterministic, with 288 of the model's 288 parameters \(100%\): '0' \(MultiheadAttention\); nothing is converted"):
        converted = bdl.bayesianize(nn.Sequential(attention))
    assert type(converted[0].out_proj) is type(attention.out_proj)


def test_layers_left_deterministic_are_named_with_their_share_of_the_parameters():
    # a text classifier converted "whole" kept most of its parameters deterministic (75% in a QA repro: embedding,
    # attention) without a word, and so did layers with a torch.nn.utils.parametrizations.weight_norm (subclasses of
    # nn.Linear)
    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(50, 8)
            self.rnn = nn.GRU(8, 8)
            self.cell = nn.LSTMCell(8, 8)
            self.pair = nn.Bilinear(8, 8, 8)
            self.attention = nn.MultiheadAttention(8, 2)
            self.norm = nn.LayerNorm(8)  # normalisation layers staying deterministic is the usual recipe: not named
            self.head = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
            self.out = nn.Linear(8, 3)

    model = TextClassifier()
    left = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("norm", "out")))
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning) as record:
        converted = bdl.bayesianize(model)
    message = str(record[0].message)
    assert f"leaves 6 layer(s) deterministic, with {left:,} of the model's {total:,} parameters" in message
    assert "'embedding' (Embedding), 'rnn' (GRU), 'cell' (LSTMCell), 'pair' (Bilinear), 'attention' (MultiheadAttention), ..." in message
    assert "nothing is converted" not in message and len(record) == 1
    assert isinstance(converted.out, bdl.BayesLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bdl.bayesianize(model, exclude=[nn.Embedding, nn.RNNBase, "cell", "pair", "attention", "head"])  # named: no warning
        bdl.bayesianize(model, include=["out"])


def test_a_layer_whose_bias_a_hook_recomputes_is_left_deterministic_with_a_warning():
    # a pruned bias (or weight_norm(name="bias")) is no parameter of the layer: bayesianize raised a bare KeyError
    from torch.nn.utils import prune

    torch.manual_seed(0)
    pruned = prune.l1_unstructured(nn.Linear(4, 3), "bias", 0.5)
    model = nn.Sequential(nn.Linear(4, 4), pruned)
    with pytest.warns(UserWarning, match=r"leaves '1' deterministic: their weight or bias is recomputed"):
        converted = bdl.bayesianize(model)
    assert type(converted[1]) is nn.Linear and isinstance(converted[0], bdl.BayesLinear)
    x = torch.randn(5, 4)
    with torch.no_grad(), bdl.deterministic(converted):
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="recomputed"), pytest.raises(ValueError, match=r"'1': recomputed by a legacy hook"):
        bdl.bayesianize(model, include=["1"])


def test_context_managers_restore_state_even_on_error():
    model = nn.Sequential(bdl.BayesLinear(3, 2, estimator="flipout"))
    with pytest.raises(RuntimeError):
        with bdl.deterministic(model), bdl.use_estimator(model, "local"):
            assert model[0].deterministic and model[0].estimator == "local"
            raise RuntimeError
    assert not model[0].deterministic and model[0].estimator == "flipout"
    with pytest.raises(ValueError, match="estimator must be one of"):
        with bdl.use_estimator(model, "mc"):
            pass


def test_bayesianize_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        bdl.bayesianize(lambda x: x)


def test_copies_made_inside_the_context_managers_keep_the_layers_own_settings():
    # a deepcopy, AveragedModel or torch.save(model) taken inside bdl.deterministic never sampled again
    import copy
    import io

    model = nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 2, estimator="local"))
    x = torch.randn(3, 4)
    with bdl.deterministic(model), bdl.use_estimator(model, "flipout"):
        with bdl.deterministic(model):  # nested: the outermost block noted the layers' own values
            copies = [copy.deepcopy(model), torch.optim.swa_utils.AveragedModel(model).module]
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copies.append(torch.load(buffer, weights_only=False))
        assert all(layer.deterministic and layer.estimator == "flipout" for layer in (model[0], model[2]))
        torch.testing.assert_close(model(x), model(x))
    for copied in copies:
        assert [(m.deterministic, m.estimator) for m in (copied[0], copied[2])] == [(False, "reparam"), (False, "local")]
        assert not torch.equal(copied(x), copied(x))
    assert [(m.deterministic, m.estimator) for m in (model[0], model[2])] == [(False, "reparam"), (False, "local")]
    assert not any(m._bdl_context_overrides for m in (model[0], model[2]))


def test_blocks_that_close_out_of_order_leave_the_open_blocks_value_then_the_layers_own():
    # two threads' overlapping blocks (a server's bdl.predict calls): each restored what it found on entry, so the
    # block closed last restored the other block's value for good: a model that never sampled again
    model = nn.Sequential(bdl.BayesLinear(4, 8, estimator="flipout"), nn.ReLU(), bdl.BayesLinear(8, 2))
    x = torch.randn(3, 4)
    first, second = bdl.deterministic(model), bdl.deterministic(model)
    first.__enter__(), second.__enter__()
    first.__exit__(None, None, None)
    assert model[0].deterministic  # the second block is still open
    second.__exit__(None, None, None)
    assert not model[0].deterministic and not model[2].deterministic and not torch.equal(model(x), model(x))
    local, reparam = bdl.use_estimator(model, "local"), bdl.use_estimator(model, "reparam")
    local.__enter__(), reparam.__enter__()
    reparam_copy = copy.deepcopy(model)
    reparam.__exit__(None, None, None)  # in order: the first block's value again
    assert model[0].estimator == "local"
    local.__exit__(None, None, None)
    assert [m.estimator for m in (model[0], model[2], reparam_copy[0])] == ["flipout", "reparam", "flipout"]
    assert not any(m._bdl_context_overrides or any(m._bdl_context_blocks.values()) for m in (model[0], model[2]))


def test_a_block_opened_in_a_forward_compiles_into_one_graph():
    # the blocks' lock (for threads) broke the graph, and fullgraph=True failed: dynamo cannot enter a lock
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = bdl.BayesLinear(4, 8), bdl.BayesLinear(8, 2)

        def forward(self, x):
            with bdl.deterministic(self.a):
                hidden = self.a(x).relu()
            return self.b(hidden)

    net, x = Net(), torch.randn(3, 4)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    with torch.no_grad(), bdl.deterministic(net.b):
        torch.testing.assert_close(compiled(x), net(x))
    assert not net.a.deterministic and not any(net.a._bdl_context_blocks.values())


def test_include_naming_a_parametrized_layer_says_why_it_is_not_converted():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ValueError, match=r"selects no nn.Linear/nn.Conv layer of the model \('0' is a ParametrizedLinear: subclasses"):
        bdl.bayesianize(model, include=["0"])


def test_blocks_and_container_types_select_the_layers_inside_and_an_exclude_typo_is_an_error():
    net = SmallNet()
    # "features" (and nn.Sequential) matched only the container itself: exclude did nothing, include raised
    kept = bdl.bayesianize(net, exclude="features")
    assert isinstance(kept.features[0], nn.Conv2d) and isinstance(kept.features[2], nn.Conv2d) and isinstance(kept.fc, bdl.BayesLinear)
    assert isinstance(bdl.bayesianize(net, exclude=nn.Sequential).features[2], nn.Conv2d)
    inside = bdl.bayesianize(net, include="features")
    assert isinstance(inside.features[2], bdl.BayesConv2d) and isinstance(inside.fc, nn.Linear)
    with pytest.raises(ValueError, match="exclude pattern 'featurs' matches no module"):
        bdl.bayesianize(net, exclude=["featurs"])
    # exclude leaving out every layer include selects: it said include "selects no nn.Linear/nn.Conv layer"
    with pytest.raises(ValueError, match=r"include=\['features'\] selects 2 nn.Linear/nn.Conv layer\(s\) \('features.0', 'features.2'\) and exclude=\['features.\*'\] leaves out every one"):
        bdl.bayesianize(net, include="features", exclude="features.*")
    # exclude alone leaving out every layer gave a deterministic copy without a word
    for exclude in ("*", nn.Module):
        with pytest.raises(ValueError, match=r"exclude=\[.*\] leaves out every nn.Linear/nn.Conv layer of the model \('features.0', 'features.2', 'fc'\): nothing to convert"):
            bdl.bayesianize(net, exclude=exclude)


def test_legacy_weight_norm_spectral_norm_and_pruned_layers_stay_deterministic_with_a_warning():
    # their weight attribute is recomputed by a hook: it was copied stale (spectral_norm: the unnormalised weight)
    torch.manual_seed(0)
    for reparametrize in (torch.nn.utils.spectral_norm, torch.nn.utils.weight_norm,
                          lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", 0.5)):  # fmt: skip
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
        reparametrize(net[0])
        trained = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
        net.load_state_dict(trained)  # a loaded checkpoint: the cached weight is the old one
        with pytest.warns(UserWarning, match=r"leaves '0' deterministic: its weight is recomputed|leaves '0' deterministic"):
            bnn = bdl.bayesianize(net)
        assert type(bnn[0]) is nn.Linear and isinstance(bnn[2], bdl.BayesLinear)
        x = torch.randn(5, 4)
        with bdl.deterministic(bnn):
            torch.testing.assert_close(bnn(x), net(x), rtol=0, atol=0)


def test_models_holding_computed_tensors_in_layers_it_does_not_convert_are_converted():
    # deepcopy refused their non-leaf tensors ("Only Tensors created explicitly by the user ..."): a vocoder's
    # weight-normed ConvTranspose1d, a spectral-normed ConvTranspose2d after a training forward, a pruned
    # Embedding, a model that keeps its last activation (Grad-CAM style)
    class KeepsActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            self.activation = torch.relu(self.fc(x))
            self.kept = {"all": [self.activation, (self.activation * 2,)]}  # a hook's store of activations
            return self.out(self.activation)

    vocoder = nn.Sequential(torch.nn.utils.weight_norm(nn.ConvTranspose1d(4, 4, 4, 2, 1)), nn.Conv1d(4, 1, 3, padding=1))
    upsampler = nn.Sequential(torch.nn.utils.spectral_norm(nn.ConvTranspose2d(2, 2, 2, 2)), nn.Conv2d(2, 1, 3))
    upsampler(torch.randn(1, 2, 4, 4))  # a training forward: spectral_norm's weight now has a graph
    embedding = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    torch.nn.utils.prune.l1_unstructured(embedding[0], "weight", 0.5)
    keeps = KeepsActivation()
    keeps(torch.randn(3, 4))
    cases = [(vocoder, torch.randn(2, 4, 10), 1), (upsampler.eval(), torch.randn(1, 2, 4, 4), 1),
             (embedding, torch.tensor([[1, 2, 3]]), 1), (keeps, torch.randn(3, 4), 2)]  # fmt: skip
    for net, x, converted in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hooked layers stay deterministic, with a warning where convertible
            bnn = bdl.bayesianize(net)
        assert sum(isinstance(m, bdl.BayesianModule) for m in bnn.modules()) == converted
        with torch.no_grad(), bdl.deterministic(bnn):
            torch.testing.assert_close(bnn(x), net(x), rtol=0, atol=0)


def test_hooks_on_converted_layers_keep_running():
    net = SmallNet().eval()
    seen = []
    net.fc.register_forward_hook(lambda module, args, output: output * 2)  # dropped: outputs changed
    net.features[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    bnn = bdl.bayesianize(net)
    x = torch.randn(2, 3, 7, 6)
    with bdl.deterministic(bnn):
        torch.testing.assert_close(bnn(x), net(x), rtol=0, atol=0)
    assert len(seen) == 2  # once for the original, once for the converted copy


def test_tied_weights_are_reported_and_lazy_layers_must_be_built_first():
    embedding = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embedding.weight  # a language model's tied output layer
    with pytest.warns(UserWarning, match=r"'1' shares parameters with '0' \(tied weights\)"):
        bdl.bayesianize(nn.Sequential(embedding, head))
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))  # it stayed an nn.Linear after its first call
    with pytest.raises(ValueError, match=r"lazy layers not built yet \('0'\): run one forward pass"):
        bdl.bayesianize(lazy)
    lazy(torch.randn(3, 5))
    assert isinstance(bdl.bayesianize(lazy)[0], bdl.BayesLinear)
    with pytest.warns(UserWarning, match="no nn.Linear/nn.Conv layer to convert"):
        bdl.bayesianize(nn.Sequential(nn.ReLU()))


def test_channels_last_layers_keep_their_layout_and_outputs():
    net = SmallNet().eval().to(memory_format=torch.channels_last)
    bnn = bdl.bayesianize(net)
    assert bnn.features[2].weight_mu.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 7, 6).to(memory_format=torch.channels_last)
    with bdl.deterministic(bnn):
        assert torch.equal(bnn(x), net(x))  # the contiguous means ran another kernel: 1.5e-7 apart


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_a_cpu_model_samples_whatever_the_default_device(estimator):
    # flipout's sign unpacking made a tensor on the default device (cuda for some users; meta here, no GPU)
    bnn = bdl.bayesianize(nn.Sequential(nn.Linear(4, 2)), estimator=estimator, center_prior_on_weights=True)
    x = torch.randn(3, 4)
    with torch.device("meta"):
        assert bnn(x).device.type == "cpu"
        meta = bdl.bayesianize(nn.Linear(4, 2), center_prior_on_weights=True)  # the prior's finiteness check read values
    assert meta.weight_mu.is_meta


def test_frozen_layers_stay_frozen():
    # a frozen backbone's converted layers trained: their means and stds were new trainable parameters
    net = SmallNet()
    for parameter in net.features.parameters():
        parameter.requires_grad_(False)
    bnn = bdl.bayesianize(net)
    frozen = {name for name, p in bnn.named_parameters() if not p.requires_grad}
    assert {"features.0.weight_mu", "features.0.weight_rho", "features.2.bias_mu", "features.2.bias_rho"} <= frozen
    assert bnn.fc.weight_mu.requires_grad and bnn.fc.weight_rho.requires_grad


def test_full_backward_hooks_on_converted_layers_keep_running():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    calls = []
    net[2].register_full_backward_hook(lambda module, grad_input, grad_output: calls.append("full"))
    net[2].register_full_backward_pre_hook(lambda module, grad_output: calls.append("pre"))
    bnn = bdl.bayesianize(net)
    bnn(torch.randn(3, 4)).sum().backward()
    assert sorted(calls) == ["full", "pre"]  # the full backward hook was never called


class _ListedLayers(nn.Module):
    """Layers also kept in a plain list, which forward reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.layers = [self.fc1, self.fc2]
        self.by_name = {"out": self.fc2}
        self.pair = (self.fc1, self.fc2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x + self.by_name["out"](torch.zeros(1, 8)) + self.pair[1](torch.zeros(1, 8))


def test_layers_a_module_also_keeps_in_a_list_dict_or_tuple_are_the_converted_ones():
    model = _ListedLayers()
    bnn = bdl.bayesianize(model)
    assert bnn.layers == [bnn.fc1, bnn.fc2] and bnn.by_name["out"] is bnn.fc2 and bnn.pair == (bnn.fc1, bnn.fc2)
    assert isinstance(bnn.layers[0], bdl.BayesLinear) and isinstance(model.layers[0], nn.Linear)  # the original kept
    x = torch.randn(5, 4)
    assert not torch.equal(bnn(x), bnn(x))  # the forward ran the deterministic copies
    with bdl.deterministic(bnn):
        torch.testing.assert_close(bnn(x), model(x))


def test_a_compiled_layer_or_model_converts_to_a_sampling_trainable_layer():
    head = torch.compile(nn.Linear(4, 2), backend="eager")
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), head)
    for converted, x in ((bdl.bayesianize(net), torch.randn(5, 3)), (bdl.bayesianize(head), torch.randn(5, 4))):
        assert not torch.equal(converted(x), converted(x))  # the compiled wrapper called the replaced nn.Linear
        layer = next(m for m in converted.modules() if isinstance(m, bdl.BayesLinear) and m.in_features == 4)
        before = layer.weight_mu.detach().clone()
        optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
        converted(x).square().sum().backward()
        optimizer.step()
        assert not torch.equal(layer.weight_mu, before)  # its mean had become a frozen copy of the weight


def test_attributes_set_on_a_converted_layer_are_kept():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Conv1d(1, 2, 3))
    net[0].scale_output = 2.0  # read by a user's forward, say
    net[2].tag = "head"
    net[2].post = torch.tanh  # functions and classes too (not what replaces a method, such as a patched forward)
    bnn = bdl.bayesianize(net)
    assert bnn[0].scale_output == 2.0 and bnn[2].tag == "head" and isinstance(bnn[0], bdl.BayesLinear)
    assert bnn[2].post is torch.tanh
    compiled = nn.Sequential(nn.Linear(4, 2))
    compiled[0].compile(backend="eager")  # module.compile's wrapper calls the nn.Linear: not carried over
    converted = bdl.bayesianize(compiled)
    x = torch.randn(3, 4)
    assert not torch.equal(converted(x), converted(x))


def test_a_patched_forward_is_not_carried_over_and_nested_lists_are_rebound():
    net = nn.Sequential(nn.Linear(4, 2))
    original_forward = net[0].forward
    net[0].forward = lambda x: original_forward(x)  # an instance forward, as wrappers patch in: it calls the nn.Linear
    bnn = bdl.bayesianize(net)
    x = torch.randn(3, 4)
    assert not torch.equal(bnn(x), bnn(x))

    class Staged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)
            self.stages = [[self.fc1], ({"out": self.fc2},)]

        def forward(self, x):
            return self.stages[1][0]["out"](self.stages[0][0](x))

    staged = bdl.bayesianize(Staged())
    assert staged.stages[0][0] is staged.fc1 and staged.stages[1][0]["out"] is staged.fc2
    assert not torch.equal(staged(x), staged(x))


def test_a_model_that_is_already_bayesian_gets_a_warning_that_says_so():
    # it warned "the copy is deterministic" of a copy that samples, and the prior given was silently not applied
    model = nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))
    with pytest.warns(UserWarning, match=r"its Bayesian layers \('0', '2'\) are copied as they are, without this call's prior"):
        copy = bdl.bayesianize(model, prior=0.1)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert not torch.equal(copy(x), copy(x))
