import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdl


def test_elbo_scales_kl_by_training_set_size():
    nll = torch.tensor([0.5, 1.5, 1.0])
    out = bdl.elbo_loss(nll, torch.tensor(300.0), num_data=1000)
    torch.testing.assert_close(out.loss, torch.tensor(1.0 + 0.3))
    torch.testing.assert_close(out.nll, torch.tensor(1.0))
    torch.testing.assert_close(out.kl, torch.tensor(300.0))
    half = bdl.elbo_loss(nll.mean(), torch.tensor(300.0), num_data=1000, kl_weight=0.5)
    torch.testing.assert_close(half.loss, torch.tensor(1.0 + 0.15))


def test_sum_of_minibatch_losses_is_the_full_data_negative_elbo():
    """Over one epoch of equal batches, batch_size * sum of losses = -ELBO (sum NLL + KL) of the whole set."""
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(3, 2))
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    with bdl.deterministic(model):
        full = F.cross_entropy(model(x), y, reduction="sum") + bdl.kl_divergence(model)
        batches = [
            bdl.elbo_loss(F.cross_entropy(model(xb), yb), bdl.kl_divergence(model), num_data=12).loss
            for xb, yb in zip(x.split(4), y.split(4))
        ]
    torch.testing.assert_close(4 * torch.stack(batches).sum(), full)


def test_elbo_loss_module_uses_the_model_kl():
    model = nn.Sequential(bdl.BayesLinear(3, 2))
    criterion = bdl.ELBOLoss(model, num_data=50)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    out = criterion(model(x), y)
    torch.testing.assert_close(out.loss, out.nll + bdl.kl_divergence(model) / 50)
    out.loss.backward()
    assert model[0].weight_rho.grad is not None
    assert list(criterion.parameters()) == []  # the model is not a submodule of the loss


def test_elbo_loss_reads_one_logit_as_a_binary_classifiers_log_odds():
    # a cross-entropy over one class: 0 for a batch of labels 0 (nothing trained), an IndexError for a label 1
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(3, 1))
    criterion = bdl.ELBOLoss(model, num_data=50)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    with torch.no_grad():
        with bdl.deterministic(model):
            logits = model(x)
            for target in (y, y.float(), y.float().unsqueeze(1), torch.zeros(8, dtype=torch.long), y.to(torch.int32)):  # as BCEWithLogitsLoss takes them
                expected = F.binary_cross_entropy_with_logits(logits.squeeze(1), target.reshape(-1).float())
                torch.testing.assert_close(criterion(logits, target).nll, expected)
    # a given criterion is used as given
    given = bdl.ELBOLoss(model, 50, criterion=nn.BCEWithLogitsLoss())(logits, y.float().unsqueeze(1)).nll
    torch.testing.assert_close(given, F.binary_cross_entropy_with_logits(logits, y.float().unsqueeze(1)))


def test_elbo_loss_takes_a_multiclass_models_labels_in_the_forms_a_binary_ones_are_taken():
    # whole-number floats [B] and labels [B, 1] failed in torch ("expected target dtype to be Long", "0D or 1D target")
    model = nn.Sequential(bdl.BayesLinear(3, 4))
    criterion = bdl.ELBOLoss(model, num_data=50)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 3, 2, 1, 0, 0, 3])
    with torch.no_grad(), bdl.deterministic(model):
        logits = model(x)
        expected = F.cross_entropy(logits, y)
        for target in (y.float(), y.unsqueeze(1), y.double().unsqueeze(1), y.to(torch.int32)):
            torch.testing.assert_close(criterion(logits, target).nll, expected)
        with pytest.raises(ValueError, match=r"takes class labels \[B\] \(or class probabilities \[B, C\]\) for logits \(8, 4\), got float targets of shape \(8,\) such as 0.5"):
            criterion(logits, y + 0.5)


def test_elbo_loss_with_its_default_criterion_refuses_regression_outputs_and_targets():
    # a regression through the default cross-entropy: float targets read as soft labels (negative ones too) gave a
    # loss; one output, or a GaussianHead's pair, torch's errors of shapes and types
    torch.manual_seed(0)
    x = torch.randn(10, 2)
    two, one = nn.Sequential(bdl.BayesLinear(2, 2)), nn.Sequential(bdl.BayesLinear(2, 1))
    head = nn.Sequential(bdl.BayesLinear(2, 4), bdl.GaussianHead(4, 1))
    with pytest.raises(ValueError, match=r"as class probabilities \(soft labels\), got ones that are not.*criterion=bdl.GaussianNLLLoss\(\)"):
        bdl.ELBOLoss(two, 100)(two(x), torch.randn(10, 2))
    means = nn.Sequential(bdl.BayesLinear(2, 1), nn.Flatten(0))  # [B] means: not an IndexError
    with pytest.raises(ValueError, match=r"as class probabilities \(soft labels\), got ones that are not"):
        bdl.ELBOLoss(means, 100)(means(x), torch.randn(10))
    with pytest.raises(ValueError, match=r"binary classifier's log-odds, whose targets are labels 0 or 1, got float targets such as"):
        bdl.ELBOLoss(one, 100)(one(x), torch.randn(10, 1))
    with pytest.raises(TypeError, match="cross-entropy of logits, got a GaussianOutput output: for regression pass"):
        bdl.ELBOLoss(head, 100)(head(x), torch.randn(10, 1))
    ensemble = bdl.DeepEnsemble([nn.Sequential(bdl.BayesLinear(2, 3)) for _ in range(4)])
    for labels in (torch.randint(0, 3, (10,)), torch.randint(0, 2, (10,)).float()):
        with pytest.raises(ValueError, match=r"got \(4, 10, 3\) for 10 labels: for stacked outputs \[M, B, C\].*member_losses"):
            bdl.ELBOLoss(ensemble, 100)(ensemble(x), labels)
    square = bdl.DeepEnsemble([nn.Sequential(bdl.BayesLinear(2, 3)) for _ in range(10)])  # M == B
    with pytest.raises(ValueError, match=r"got \(10, 10, 3\) for 10 labels"):
        bdl.ELBOLoss(square, 100)(square(x), torch.randint(0, 3, (10,)))
    summed = bdl.ELBOLoss(ensemble, 100, criterion=lambda out, y: ensemble.member_losses(out, y, F.cross_entropy).sum())
    outputs, y = ensemble(x), torch.randint(0, 3, (10,))
    expected = sum(F.cross_entropy(outputs[m], y) for m in range(4)) + bdl.kl_divergence(ensemble) / 100
    torch.testing.assert_close(summed(outputs, y).loss, expected)
    labels = torch.rand(10) > 0.5  # a binary classifier's labels as bools
    torch.testing.assert_close(bdl.ELBOLoss(one, 100)(logit := one(x), labels).nll, F.binary_cross_entropy_with_logits(logit[:, 0], labels.float()))
    # soft labels in half precision (rows summing to 0.996 in bfloat16), of segmentation maps, of an unbatched row
    four = nn.Sequential(nn.Conv2d(2, 4, 1), bdl.BayesConv2d(4, 4, 1))
    images = torch.randn(8, 2, 5, 5)
    for dtype in (torch.bfloat16, torch.float16):
        soft_maps = torch.softmax(torch.randn(8, 4, 5, 5), 1).to(dtype)
        logits = four(images).to(dtype)
        torch.testing.assert_close(bdl.ELBOLoss(four, 100)(logits, soft_maps).nll, F.cross_entropy(logits, soft_maps))
    row = torch.softmax(torch.randn(2), 0)
    torch.testing.assert_close(bdl.ELBOLoss(two, 100)(logit_row := two(x[0]), row).nll, F.cross_entropy(logit_row, row))
    soft = torch.softmax(torch.randn(10, 2), -1)  # soft labels (mixup, label smoothing) are the criterion's own
    torch.testing.assert_close(bdl.ELBOLoss(two, 100)(logits := two(x), soft).nll, F.cross_entropy(logits, soft))
    assert torch.isfinite(bdl.ELBOLoss(head, 100, criterion=bdl.GaussianNLLLoss())(head(x), torch.randn(10, 1)).loss)


def test_elbo_loss_of_a_network_without_bayesian_layers_warns_once():
    # the network before bayesianize (which converts a copy): a KL of 0, the NLL alone, without a word
    plain = nn.Sequential(nn.Linear(2, 3))
    criterion = bdl.ELBOLoss(plain, 100)
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match=r"ELBOLoss: the model \(Sequential\) has no Bayesian layer, so its KL is 0"):
        criterion(plain(x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        criterion(plain(x), y)
        converted = bdl.bayesianize(plain)
        bdl.ELBOLoss(converted, 100)(converted(x), y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_data": 0}, "num_data"),
        ({"num_data": 10.5}, "num_data"),
        ({"num_data": 10, "kl_weight": -1.0}, "kl_weight"),
        ({"num_data": 10, "kl_weight": float("nan")}, "kl_weight must be a finite number"),  # NaN passed "< 0"
        ({"num_data": 10, "kl_weight": torch.tensor(-0.5)}, "kl_weight"),
    ],
)
def test_bad_elbo_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bdl.elbo_loss(torch.tensor(1.0), torch.tensor(2.0), **kwargs)
    assert bdl.elbo_loss(torch.tensor(1.0), torch.tensor(2.0), num_data=10, kl_weight=torch.tensor(0.5)).loss.item() == pytest.approx(1.1)


def test_elbo_rejects_non_scalar_kl():
    with pytest.raises(ValueError, match="kl must be a scalar"):
        bdl.elbo_loss(torch.tensor(1.0), torch.ones(3), num_data=10)


def test_elbo_loss_module_stops_a_diverging_plain_loop_and_says_where():
    # a plain loop at a learning rate that diverges got loss=nan, nll=nan, kl=inf back without a word
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(bdl.BayesLinear(4, 16), nn.ReLU(), bdl.BayesLinear(16, 2))
    criterion = bdl.ELBOLoss(model, num_data=len(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e6)
    with pytest.raises(FloatingPointError, match=r"ELBOLoss: NLL and KL are not finite \(nll=nan, kl=inf\); every parameter is finite, but the KL of 0 \(BayesLinear\), 2 \(BayesLinear\) is not"):
        for _ in range(5):
            out = criterion(model(x), y)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    fresh = nn.Sequential(bdl.BayesLinear(4, 2))
    with torch.no_grad():
        fresh[0].weight_rho.fill_(1e4)  # the std exp(1e4) overflows: finite parameters, an infinite KL
    with pytest.raises(FloatingPointError, match=r"ELBOLoss: NLL and KL are not finite .*the KL of 0 \(BayesLinear\) is not"):
        bdl.ELBOLoss(fresh, num_data=10)(fresh(x), y)
    with pytest.raises(FloatingPointError, match=r"ELBOLoss: NLL is not finite .*every parameter is finite \(a NaN/inf in this batch's inputs"):
        bdl.ELBOLoss(model := nn.Sequential(bdl.BayesLinear(4, 2)), num_data=10)(model(torch.full((3, 4), float("nan"))), y[:3])
    for criterion in (None, nn.CrossEntropyLoss()):  # an empty batch was blamed on NaN/inf inputs or an overflow
        with pytest.raises(ValueError, match=r"ELBOLoss: the batch is empty \(targets of shape \(0,\)\), whose mean NLL is NaN"):
            bdl.ELBOLoss(model, num_data=10, criterion=criterion)(model(x[:0]), y[:0])
    binary = nn.Sequential(bdl.BayesLinear(4, 1))  # one logit, float labels (torch's "expected target dtype to be Long")
    for labels in (torch.zeros(0), torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"ELBOLoss: the batch is empty"):
            bdl.ELBOLoss(binary, num_data=10)(binary(x[:0]), labels)
    unchecked = bdl.ELBOLoss(fresh, num_data=10, check_finite=False)(fresh(x), y)  # as before, for a user who checks
    assert not torch.isfinite(unchecked.loss)


def test_elbo_loss_module_traces_under_compile_and_torch_func():
    # its finiteness check read a value: vmap of per-example gradients failed, and fullgraph compile too
    model = nn.Sequential(bdl.BayesLinear(4, 3))
    criterion = bdl.ELBOLoss(model, num_data=100)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    params = dict(model.named_parameters())

    def loss_of(p, xi, yi):
        return criterion(torch.func.functional_call(model, p, (xi[None],)), yi[None]).loss

    grads = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    assert grads["0.weight_mu"].shape == (8, 3, 4)
    compiled = torch.compile(lambda a, b: criterion(model(a), b).loss, fullgraph=True)
    assert torch.isfinite(compiled(x, y))


def test_a_gaussian_nll_criterion_traces_under_compile_and_torch_func_too():
    # gaussian_nll's variance check read a value: ELBOLoss(criterion=GaussianNLLLoss()) failed under vmap of
    # per-example gradients and a fullgraph compile, where the default criterion traced
    model = nn.Sequential(bdl.BayesLinear(3, 8), nn.ReLU(), bdl.GaussianHead(8, 2, linear=bdl.BayesLinear))
    criterion = bdl.ELBOLoss(model, num_data=100, criterion=bdl.GaussianNLLLoss())
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    params = dict(model.named_parameters())

    def loss_of(p, xi, yi):
        return criterion(torch.func.functional_call(model, p, (xi[None],)), yi[None]).loss

    grads = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    assert grads["0.weight_mu"].shape == (5, 8, 3) and all(torch.isfinite(g).all() for g in grads.values())
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: criterion(model(a), b).loss, backend="eager", fullgraph=True)
    assert torch.isfinite(compiled(x, y))
    zero = torch.tensor([[1.0], [0.0]])
    with pytest.raises(ValueError, match="variance must be > 0 everywhere"):  # checked where values can be read
        bdl.nn.heads.gaussian_nll(torch.zeros(2, 1), zero, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="variance must be > 0 everywhere"):  # torch.func.grad alone reads them: a NaN gradient
        torch.func.grad(lambda v: bdl.nn.heads.gaussian_nll(torch.zeros(2, 1), v, torch.zeros(2, 1)))(zero)


def test_non_finite_parameters_leave_out_frozen_bounds_and_unbuilt_lazy_layers():
    # a frozen -inf mask was named as "an earlier step diverged" when a NaN input broke the loss; a lazy layer never
    # built made the check itself fail ("Attempted to use an uninitialized parameter")
    from bdl.nn.loss import non_finite_parameters

    model = nn.Module()
    model.layer, model.lazy = nn.Linear(2, 2), nn.LazyLinear(2)
    model.mask = nn.Parameter(torch.tensor([0.0, -math.inf]), requires_grad=False)
    assert non_finite_parameters(model) == []
    model.mask.data[0] = math.nan  # a frozen NaN is never a bound
    with torch.no_grad():
        model.layer.weight[0, 0] = math.inf
    assert sorted(non_finite_parameters(model)) == ["layer.weight (1 of 4)", "mask (1 of 2)"]


def test_an_elbo_backs_up_its_loss_as_a_criterions_tensor_does():
    # criterion(output, target).backward(), the torch idiom, was an AttributeError of the named tuple
    model = nn.Sequential(bdl.BayesLinear(3, 2))
    elbo = bdl.ELBOLoss(model, num_data=10)(model(torch.randn(4, 3)), torch.randint(0, 2, (4,)))
    elbo.backward(retain_graph=True)  # its arguments go to loss.backward
    gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    elbo.loss.backward()
    assert all(bool(g.abs().sum() > 0) and torch.equal(g, p.grad) for g, p in zip(gradients, model.parameters()))


def test_an_elbo_stands_in_for_its_loss_in_a_training_loops_arithmetic():
    # as a tuple, elbo * 2 repeated it and elbo + other concatenated them (then .backward() failed); .item() was missing
    model = nn.Sequential(bdl.BayesLinear(3, 2))
    criterion = bdl.ELBOLoss(model, num_data=10)
    first, second = (criterion(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))) for _ in range(2))
    loss = first.loss
    for value, expected in [
        (first * 2, loss * 2), (2 * first, loss * 2), (first / 4, loss / 4), (first + 1, loss + 1), (1 + first, loss + 1),
        (first - 1, loss - 1), (1 - first, 1 - loss), (-first, -loss), (first + second, loss + second.loss),
        (sum([first, second]), loss + second.loss), (first + torch.tensor(0.5), loss + 0.5),
    ]:
        assert isinstance(value, torch.Tensor) and torch.allclose(value, expected)
    assert first.item() == float(first) == loss.item()
    (first / 2).backward()  # gradient accumulation's idiom
    assert all(p.grad is not None for p in model.parameters())
    total, nll, kl = second  # still a tuple of its parts
    assert total is second.loss and nll is second.nll and kl is second.kl
    # a numpy number on the left read it as a sequence: every part scaled, an array without a graph
    import numpy as np  # noqa: PLC0415

    for value in (np.float64(0.5) * second, np.float64(0.5) + second, np.float64(1) - second):
        assert isinstance(value, torch.Tensor) and value.requires_grad
    assert f"{second:.3f}" == f"{second.loss:.3f}" and f"{second}" == str(second)  # a logging line's format
    assert (1,) + second == (1, *second)  # a plain tuple concatenates with it as before
    with pytest.raises(TypeError, match="unsupported operand type"):
        second + (1,)


def test_a_nan_or_infinite_variance_is_refused_by_the_loss_as_by_the_metric():
    # NaN <= 0 is false: the loss returned NaN (an exp head's overflow: inf) where the metric refused it
    mean, target = torch.zeros(4, 1), torch.zeros(4, 1)
    with pytest.raises(ValueError, match=r"variance must be finite, got 1 NaN and 0 infinite value\(s\)"):
        bdl.gaussian_nll(mean, torch.tensor([[1.0], [float("nan")], [1.0], [1.0]]), target, reduction="none")
    with pytest.raises(ValueError, match=r"got 0 NaN and 4 infinite value\(s\) \(an exp variance head overflows"):
        bdl.gaussian_nll(mean, torch.full((4, 1), 100.0).exp(), target)  # an exp head's raw output of 100
