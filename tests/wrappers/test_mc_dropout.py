import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import bdl
from bdl.wrappers.mc_dropout import DROPOUT_TYPES, MCDropout


def net_with_batchnorm(p=0.3):
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 3))


class AlwaysOnDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return bdl.nn.functional.dropout(x, self.p)


@pytest.mark.parametrize("helpers", [0, 1])
def test_fast_dropout_has_the_distribution_of_torch_dropout_and_its_gradient(monkeypatch, helpers):
    monkeypatch.setattr(bdl.nn.functional, "_fill_helpers", lambda: helpers)  # with and without noise threads
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5  # large enough for the threaded draw
    for p in (0.1, 0.5):
        got = bdl.nn.functional.dropout(x, p)
        kept = got != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 400k draws: std 0.0008
        torch.testing.assert_close(got[kept], x[kept] / (1 - p))
        assert abs(kept[:, :500].float().mean() - kept[:, 500:].float().mean()) < 0.005  # every chunk drawn
    torch.manual_seed(1)
    a = bdl.nn.functional.dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, bdl.nn.functional.dropout(x, 0.3))  # reproducible under the global seed
    leaf = x.clone().requires_grad_()
    out = bdl.nn.functional.dropout(leaf, 0.3)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, (out != 0).float() / 0.7)
    assert bdl.nn.functional.dropout(x, 0.0) is x and not bdl.nn.functional.dropout(x, 1.0).any()
    with pytest.raises(ValueError, match=r"p must be a dropout rate in \[0, 1\], got 1.5"):
        bdl.nn.functional.dropout(x, 1.5)
    # rates near 1 rounded to 2^-16 kept another fraction than 1 - p, scaled by 1 / (1 - p): 0.99999 kept 1/65536 (a mean
    # of 1.53), 0.999995 none; torch's Bernoulli there
    ones = torch.ones(10_000_000)
    for p in (0.99999, 0.999995):
        kept = int((bdl.nn.functional.dropout(ones, p) != 0).sum())
        assert abs(kept - 1e7 * (1 - p)) < 4 * (1e7 * (1 - p)) ** 0.5, (p, kept)  # 100 or 50 expected (153 and 0 were kept)


def test_fast_dropout_masks_are_independent_across_the_lanes_of_a_random_word():
    # each 64-bit generator word gives four elements' 16-bit lanes: every lane position must have the
    # drop rate, and neighbours (same word) and elements four apart (next word) must be independent
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    for p in (0.2, 0.5, 0.7):
        kept = (bdl.nn.functional.dropout(x, p) != 0).float()
        lanes = kept.view(-1, 4)
        torch.testing.assert_close(lanes.mean(0), torch.full((4,), 1 - p), atol=0.004, rtol=0)  # std 0.0009
        for a, b in ((kept[:-1], kept[1:]), (kept[:-4], kept[4:])):
            assert abs((a * b).mean().item() - (1 - p) ** 2) < 0.003
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = bdl.nn.functional.dropout(torch.ones(4000, dtype=dtype), 0.3)
        assert out.dtype == dtype
        assert set(out.tolist()) == {0.0, torch.tensor(1 / 0.7, dtype=dtype).item()}
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        bdl.nn.functional.dropout(torch.ones(3, dtype=torch.int64), 0.3)
    noncontiguous = torch.ones(300, 200).t()
    out = bdl.nn.functional.dropout(noncontiguous, 0.5)
    assert out.shape == (200, 300) and abs((out == 0).float().mean().item() - 0.5) < 0.02


def test_dropout_is_on_and_batchnorm_uses_running_statistics():
    net = net_with_batchnorm()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    model = MCDropout(net)
    x = torch.randn(6, 4)
    # reference: the whole network in eval mode except the dropout layer, with the same random masks
    # (nn.Dropout layers draw them through bdl.nn.functional.dropout)
    reference_net = copy.deepcopy(net).eval()
    reference_net[3] = AlwaysOnDropout(0.3)
    torch.manual_seed(5)
    expected = reference_net(x)
    torch.manual_seed(5)
    got = model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(model(x), got)  # fresh masks on every call
    assert not net[1].training and not net[3].training  # flags restored after the call


def test_predict_keeps_batchnorm_statistics_and_works_on_one_input():
    net = net_with_batchnorm()
    before = (net[1].running_mean.clone(), net[1].running_var.clone())
    pred = bdl.predict(MCDropout(net), torch.randn(1, 4), num_samples=20)  # training-mode BatchNorm fails on 1 row
    assert pred.mutual_information.item() > 0
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])


@pytest.mark.parametrize(
    "dropout, shape",
    [
        (nn.Dropout(0.5), (8, 6)),
        (nn.Dropout1d(0.5), (8, 6, 5)),
        (nn.Dropout2d(0.5), (8, 6, 3, 3)),
        (nn.Dropout3d(0.5), (8, 6, 2, 2, 2)),
        (nn.AlphaDropout(0.5), (8, 6)),
        (nn.FeatureAlphaDropout(0.5), (8, 6, 3, 3)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_every_dropout_type_stays_stochastic(dropout, shape):
    model = MCDropout(nn.Sequential(dropout))
    assert isinstance(dropout, DROPOUT_TYPES) and model.dropout_modules == [dropout]
    x = torch.ones(shape)
    assert not torch.equal(model(x), model(x))


def test_model_without_dropout_is_an_error_that_says_how_to_insert():
    with pytest.raises(ValueError, match="insert_before"):
        MCDropout(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_inserted_dropout_goes_before_the_chosen_modules_of_a_copy():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = MCDropout(net, p=0.5, insert_before=["2"])
    assert len(model.dropout_modules) == 1 and "inserted_before=['2']" in repr(model)
    x = torch.randn(5, 4)
    # p=0.5 on the 8 hidden units: the output is the last layer applied to masked, rescaled hidden units
    hidden = net[1](net[0](x))
    torch.manual_seed(3)
    expected = net[2](bdl.nn.functional.dropout(hidden, 0.5))  # hidden units masked and rescaled
    assert (expected != net[2](hidden)).any()
    torch.manual_seed(3)
    torch.testing.assert_close(model(x), expected)
    assert not net[2]._forward_pre_hooks  # the user's model is untouched
    assert list(model.state_dict()) == [f"model.{key}" for key in net.state_dict()]


def test_inserted_dropout_outside_the_wrapper_follows_the_mode_of_the_module_it_precedes():
    # it followed the wrapper's mode: after mc.train(), the bare network in eval mode (a deterministic baseline,
    # predict(mc.model, ...)) still dropped, and in the reverse order the bare network trained without its dropout
    torch.manual_seed(0)
    model = MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), p=0.5, insert_before=["2"])
    x = torch.randn(8, 4)
    model.train()
    model.model.eval()
    assert torch.equal(model.model(x), model.model(x))
    assert not torch.equal(model(x), model(x))  # the wrapper drops in either mode
    model.eval()
    model.model.train()
    hidden = model.model[1](model.model[0](x))
    torch.manual_seed(1)
    trained = model.model(x)
    torch.manual_seed(1)
    head = model.model[2]  # (called, it would drop again)
    expected = torch.nn.functional.linear(torch.nn.functional.dropout(hidden, 0.5), head.weight, head.bias)
    torch.testing.assert_close(trained, expected)  # as an nn.Dropout in the model
    # an MCDropout around the model itself (a bare layer): replacing `mc.model` kept the dropout on the old one
    itself = MCDropout(nn.Linear(4, 3), p=0.5, insert_before=[nn.Linear])
    itself.model = nn.Linear(4, 3)
    assert not torch.equal(itself(x), itself(x)) and itself.noise_modules == [itself.model]
    assert bdl.predict(itself, x, num_samples=16).mutual_information.min() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_through_the_wrapper_gets_the_gradient_of_its_masks_under_activation_checkpointing(reentrant):
    # the recomputation in the backward runs outside the wrapper's call: its own layers dropped there by F.dropout and
    # inserted dropout as a layer of the model, with other masks than bdl's dropout drew in the forward (wrong gradients)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 16))
            self.head, self.checkpointed = nn.Linear(16, 3), True

        def forward(self, x):
            if self.checkpointed:
                return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=reentrant))
            return self.head(self.block(x))

    torch.manual_seed(0)
    model = MCDropout(Net(), p=0.5, insert_before=["block.3"]).train()
    x = torch.randn(8, 4, requires_grad=True)
    gradients = []
    for checkpointed in (True, False):
        model.model.checkpointed = checkpointed
        torch.manual_seed(1)
        model(x).square().sum().backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for checkpointed, plain in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_a_network_taken_out_of_an_mc_dropout_is_wrapped_again_without_the_old_dropout():
    # its copy kept the first wrapper's inserted dropout hooks: in training it dropped twice (kept 0.25 at p = 0.5)
    first = MCDropout(nn.Sequential(nn.Linear(64, 64)), p=0.5, insert_before=[nn.Linear])
    again = MCDropout(first.model, p=0.5, insert_before=[nn.Linear]).train()
    assert len(again.model[0]._forward_pre_hooks) == 1
    x = torch.ones(200, 64)
    with torch.no_grad():
        again.model[0].weight.copy_(torch.eye(64))
        again.model[0].bias.zero_()
        kept = (again(x) != 0).float().mean()
    assert 0.45 < kept < 0.55
    nested = MCDropout(nn.Sequential(first, nn.Linear(64, 2)), p=0.5, insert_before=["1"])  # an MCDropout inside keeps its own
    assert len(nested.model[0].model[0]._forward_pre_hooks) == 1


def test_insert_before_accepts_module_types():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = MCDropout(net, p=0.1, insert_before=[nn.Linear])
    assert model.extra_repr().endswith("inserted_before=['0', '2']")
    # the model itself, by its type (a bare linear model's input dropout: "matched no module ... its modules: []")
    bare = MCDropout(nn.Linear(4, 3), p=0.5, insert_before=[nn.Linear])
    assert bare.extra_repr().endswith("inserted_before=['(the model)']")
    with torch.no_grad():
        assert not torch.equal(bare(torch.ones(100, 4)), bare(torch.ones(100, 4)))
    with pytest.raises(ValueError, match="matched no module"):  # a name glob does not name the model itself
        MCDropout(nn.Linear(4, 3), p=0.5, insert_before=["*"])


def test_insertion_skips_an_attentions_out_proj_and_drops_keyword_inputs():
    # an attention never calls its out_proj's forward: listed as a target, it got no dropout
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(input=self.attention(x, x, x)[0].mean(1))  # by keyword: an IndexError

    model = MCDropout(Net(), p=0.5, insert_before=[nn.Linear])
    assert model._target_names == ["fc"]
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p": 0.0, "insert_before": ["0"]}, "p must be a dropout rate"),
        ({"p": 1.0, "insert_before": ["0"]}, "p must be a dropout rate"),
        ({"insert_before": ["0"]}, "p must be a dropout rate"),
        ({"p": 0.2}, "insert_before"),
        ({"p": 0.2, "insert_before": ["decoder.*"]}, "matched no module"),
    ],
)
def test_bad_insertion_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), **kwargs)


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        MCDropout(lambda x: x)


def test_dropout_layers_replaced_after_wrapping_are_found_again():
    # the list made at wrapping kept the old head's dropout: the new one stayed off (0 mutual information)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 3)))
    model = bdl.MCDropout(net)
    net[2] = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    assert model.dropout_modules == [net[2][0]]
    assert bdl.predict(model, x, num_samples=20).mutual_information.min() > 0
    # a dropout added where there was none (the new head's; the body's own at rate 0): it stayed off, MI 0
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model = bdl.MCDropout(net)
    net[2].p = 0.0
    net[3] = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    assert bdl.predict(model, x, num_samples=20).mutual_information.min() > 0
    # an inserted dropout follows a module replaced under its name (its pre-hook stayed on the detached one)
    model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), p=0.3, insert_before=["2"])
    head = model.model[2]
    model.model[2] = nn.Linear(16, 3)
    assert bdl.predict(model, x, num_samples=20).mutual_information.min() > 0 and model.noise_modules == [model.model[2]]
    model.model[2] = head  # swapped back: it held its hook still, and dropped twice
    model(x)
    assert len(head._forward_pre_hooks) == 1 and model.model[2] is head
    # a deep copy of the target carries a copy of the hook: it dropped twice, and in the bare model too
    model.model[2] = copy.deepcopy(head).train()
    model(x)
    assert len(model.model[2]._forward_pre_hooks) == 1
    model.model.eval()
    assert torch.equal(model.model(x), model.model(x))  # the bare model drops nothing
    # two copies of one wrapper given one shared head: each removed the other's hook (their tags were equal)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    first.model[2] = second.model[2] = nn.Linear(16, 3)
    first(x), second(x)
    assert len(first.model[2]._forward_pre_hooks) == 2 and not torch.equal(first(x), first(x))


def test_train_mode_trains_batchnorm_and_predict_restores_it():
    net = net_with_batchnorm()
    model = MCDropout(net).train()
    assert net[1].training
    bdl.predict(model, torch.randn(4, 4), num_samples=2)
    assert net[1].training and model.training


def test_every_sampling_path_gives_the_dropout_predictive(one_thread):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    model = MCDropout(net, p=0.2, insert_before=["5"])
    x = torch.randn(3, 3)
    with torch.no_grad():  # ground truth by definition: independent Bernoulli masks, rescaled by 1 / (1 - p)
        hidden = net[1](net[0](x)).expand(20000, 3, 32)
        hidden = hidden * torch.empty_like(hidden).bernoulli_(0.7) / 0.7
        hidden = net[4](net[3](hidden))
        reference = net[5](hidden * torch.empty_like(hidden).bernoulli_(0.8) / 0.8)
    ref_mean, ref_var = reference.mean(0), reference.var(0)
    for method, num_samples, tolerance in (("batched", 20000, 0.06), ("loop", 1000, 0.2)):
        pred = bdl.predict(model, x, num_samples, task="regression", method=method)
        standard_error = (ref_var / num_samples + ref_var / 20000).sqrt()
        assert ((pred.mean - ref_mean).abs() < 4 * standard_error).all(), method
        ratio = pred.epistemic_variance / ref_var
        assert ((ratio > 1 - tolerance) & (ratio < 1 + tolerance)).all(), (method, ratio)


def test_copies_and_pickles_keep_working():
    model = MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), p=0.5, insert_before=["1"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.dropout_modules[0] is clone.inserted_dropout[0]
        x = torch.randn(3, 4)
        assert not torch.equal(clone(x), clone(x))
        with torch.no_grad():
            clone.model[1].weight.zero_()
        assert not torch.equal(model.model[1].weight, clone.model[1].weight)


def test_torch_compile_traces_mc_dropout_in_one_graph_and_keeps_it_stochastic():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 2))
    model = MCDropout(base, p=0.5, insert_before=["5"])  # the model's own nn.Dropout and an inserted one
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break is an error
    x = torch.randn(64, 8)
    with torch.no_grad():
        first, second, plain = compiled(x), compiled(x), base.eval()(x)
    assert not torch.equal(first, second) and not torch.equal(first, plain)
    assert not any(m.training for m in model.dropout_modules) and not model.training  # modes restored
    for method in ("loop", "batched"):  # bdl.predict on the compiled wrapper
        prediction = bdl.predict(compiled, x, num_samples=8, method=method)
        assert prediction.probs.shape == (64, 2) and float(prediction.mutual_information.mean()) > 0


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "submodule.compile"])
def test_a_compiled_model_inside_mc_dropout_stays_stochastic(how):
    # torch.compile does not guard on hooks: a graph traced in eval mode before MCDropout hooked its dropout
    # layers ran on without them (identical samples, zero epistemic uncertainty, no warning)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    if how == "torch.compile":
        compiled = torch.compile(net, backend="eager")
    else:
        (net if how == "module.compile" else net[3]).compile(backend="eager")
        compiled = net
    net.eval()
    x = torch.randn(10, 4)
    with torch.no_grad():
        compiled(x)  # traced once with dropout off, as in a validation pass
    model = MCDropout(compiled)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        assert torch.equal(compiled(x), compiled(x))  # off again outside the wrapper
    for method in ("loop", "batched"):
        assert float(bdl.predict(model, x, num_samples=8, method=method).mutual_information.min()) > 0


def test_attention_dropout_is_kept_stochastic():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)  # no nn.Dropout anywhere

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0].mean(1)

    torch.manual_seed(0)
    net = Attend().eval()
    x = torch.randn(4, 5, 8)
    model = MCDropout(net)  # it said "has no dropout layer"
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)) and torch.equal(net(x), net(x))
    assert not net.attention.training  # switched back
    encoder = MCDropout(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True))
    assert encoder.model.self_attn in encoder.dropout_modules


def test_a_padded_transformer_encoder_predicts_under_mc_dropout():
    # the eval-mode encoder built a nested tensor for the padding mask, which its layers failed on once MC dropout
    # had switched their dropout on (under no_grad: every bdl.predict)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(layer, num_layers=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            padding = torch.zeros(x.shape[:2], dtype=torch.bool)
            padding[:, -2:] = True
            return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))

    net = Classifier().eval()
    model = MCDropout(net)
    x = torch.randn(4, 6, 8)
    prediction = bdl.predict(model, x, num_samples=8)
    assert prediction.mutual_information.min() > 0  # the samples differ
    assert net.encoder.use_nested_tensor  # restored
    with torch.no_grad():
        net(x)  # and the plain model still takes its fast path


def test_an_encoder_layer_leaves_its_fast_path_even_where_no_hook_blocks_it(monkeypatch):
    # with a compiled model MC dropout switches flags and registers no hooks; the eval-mode encoder layer then took
    # torch's fused fast path, which applies no dropout: every sample equal, mutual information 0
    from bdl.wrappers import mc_dropout

    monkeypatch.setattr(mc_dropout, "_holds_compiled_module", lambda model: True)  # the compiled branch, eagerly
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).eval()
    model = MCDropout(layer)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    assert not layer.training  # restored


def test_dropout_that_never_fires_is_not_counted_and_user_hooks_see_the_dropped_output():
    # zero-rate layers (torchvision's ViT) and a one-layer RNN's dropout drop nothing: mutual information 0, unflagged
    with pytest.raises(ValueError, match="no dropout layer .* p > 0"):
        MCDropout(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Linear(4, 2)))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no dropout layer"):
        MCDropout(nn.GRU(4, 8, num_layers=1, dropout=0.3))
    # next to one that fires, a rate-0 layer is still switched on: its rate may be set later (a sweep)
    later = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 64), nn.Dropout(0.0))
    model = MCDropout(later)
    later[2].p = 0.5
    with torch.no_grad():
        assert 0.4 < float((model(torch.randn(32, 4)) == 0).float().mean()) < 0.6
    # a forward hook on a dropout layer saw the undropped output, and what it returned was discarded
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    seen = []
    net[1].register_forward_hook(lambda module, args, output: seen.append(float((output == 0).float().mean())))
    MCDropout(net)(torch.randn(16, 4))
    assert 0.4 < seen[0] < 0.6
    net[1].register_forward_hook(lambda module, args, output: output * 0)
    with torch.no_grad():
        torch.testing.assert_close(MCDropout(net)(torch.randn(3, 4)), net[2].bias.expand(3, 2))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_the_dropout_between_recurrent_layers_is_kept_stochastic(rnn):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn(4, 8, num_layers=2, dropout=0.5, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    net = Recurrent().eval()
    model = MCDropout(net)  # "has no dropout layer"; and next to an nn.Dropout it stayed off
    x = torch.randn(5, 7, 4)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)) and torch.equal(net(x), net(x))
    assert model.dropout_modules == [net.rnn] and not net.rnn.training
    with pytest.raises(ValueError, match="no dropout layer"):
        MCDropout(rnn(4, 8, num_layers=2))  # dropout=0: nothing to keep on


def test_an_in_place_dropout_leaves_the_callers_input_alone():
    # switched on, an inplace=True dropout overwrote its input: the caller's tensor ended all zeros, and the loop's
    # samples compounded each other's masks (probabilities 0.4995 everywhere)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout2d(0.5, inplace=True), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)).eval()
    x = torch.randn(8, 3, 6, 6)
    before = x.clone()
    model = MCDropout(net)
    torch.manual_seed(1)
    loop = bdl.predict(model, x, num_samples=400, method="loop")
    assert torch.equal(x, before)
    torch.manual_seed(2)
    batched = bdl.predict(model, x, num_samples=400, method="batched")
    assert torch.allclose(loop.probs, batched.probs, atol=0.05)
    assert net[0].inplace  # restored


def test_an_mc_dropout_around_another_drops_each_layer_once():
    # each wrapper hooked the same nn.Dropout: p=0.5 dropped 75% and kept values were scaled by 4
    torch.manual_seed(0)
    x = torch.ones(1, 20_000)
    inner = MCDropout(nn.Sequential(nn.Identity(), nn.Dropout(0.5)))
    compiled = MCDropout(nn.Sequential(nn.Identity(), nn.Dropout(0.5)))
    compiled.forward = torch.compile(compiled.forward, backend="eager")  # switched the layer to training, hooked too
    for model in (MCDropout(inner), MCDropout(nn.Sequential(nn.Identity(), inner)), MCDropout(compiled)):
        with torch.no_grad():
            y = model(x)
        assert abs((y == 0).float().mean().item() - 0.5) < 0.02
        assert set(y.unique().tolist()) == {0.0, 2.0}
        assert not any(m.model[1]._forward_hooks or m.model[1].training for m in (inner, compiled))  # both contexts undone
    module = bdl.lightning.MCDropoutModule(inner)  # bdl.MCDropout(net) handed to the Lightning module
    assert abs((module.model(x) == 0).float().mean().item() - 0.5) < 0.02


def test_a_traced_mc_dropout_model_drops_anew_at_every_call():
    # the CPU dropout's bit-packed mask (random bits viewed as int16) has no op in a trace: "INTERNAL ASSERT FAILED"
    torch.manual_seed(0)
    mc = MCDropout(nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2)))
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        traced = torch.jit.trace(mc, x, check_trace=False)
    traced_draws, eager_draws = (torch.stack([call(x) for _ in range(1000)]) for call in (traced, mc))
    assert len({tuple(draw.flatten().tolist()) for draw in traced_draws}) == 1000
    # the spread of the eager model's draws (over 1000 draws, the std ratio of 6 outputs has a standard error of 1.3%)
    assert ((traced_draws.std(0) / eager_draws.std(0)).mean() - 1).abs() < 0.06
