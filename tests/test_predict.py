import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl.predict import SAMPLING_METHODS, Prediction, draw_samples, resolve_method


def bayes_mlp(out=3, std=0.3):
    return nn.Sequential(
        bdl.BayesLinear(4, 16, posterior_std_init=std), nn.ReLU(), bdl.BayesLinear(16, out, posterior_std_init=std)
    )


class Wrapped(nn.Module):
    """The same network outside nn.Sequential: the batched path repeats the whole input."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- classification identities
@pytest.mark.parametrize("method", ["loop", "batched"])
def test_classification_identities_hold(method):
    pred = bdl.predict(bayes_mlp(), torch.randn(50, 4), num_samples=20, keep_samples=True, method=method)
    torch.testing.assert_close(pred.predictive_entropy, pred.expected_entropy + pred.mutual_information, atol=1e-6, rtol=0)
    assert (pred.mutual_information >= 0).all() and pred.mutual_information.max() > 1e-3
    p = pred.sample_probs
    assert p.shape == (20, 50, 3)
    torch.testing.assert_close(pred.probs, p.mean(0))
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(50))
    torch.testing.assert_close(pred.expected_entropy, -(p * p.log()).sum(-1).mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.predictive_entropy, -(p.mean(0) * p.mean(0).log()).sum(-1), atol=1e-5, rtol=1e-5)
    chosen = p[:, torch.arange(50), pred.predicted_class]
    torch.testing.assert_close(pred.predicted_class_variance, chosen.var(0, unbiased=False))
    torch.testing.assert_close(pred.max_probability, pred.probs.max(-1).values)
    assert torch.equal(pred.predicted_class, pred.probs.argmax(-1))


@pytest.mark.parametrize("classes", [1, 3, 10, 40])
@pytest.mark.parametrize("source", ["logits", "probs"])
def test_summary_layouts_agree(monkeypatch, classes, source):
    """Few classes are summarised as [S, C, N] on the CPU (ATen's softmax and reductions along a last dimension
    shorter than a SIMD register run scalar loops); both layouts give the same Prediction, chunked or not."""
    predict_module = sys.modules["bdl.predict"]
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(12, 9, classes, generator=generator)
    logits[:, :2] = logits[0, :2]  # two inputs the same in every sample: MI and variance exactly 0
    logits[:, 2, :] = logits[:, 2, :1]  # equal logits, varying: constant probabilities (with two classes or more)
    constant = 3 if classes > 1 else 2
    logits = predict_module._two_class(logits)  # as predict passes a binary classifier's one logit
    samples = logits if source == "logits" else logits.softmax(-1)

    def summarise(classes_first, chunks):
        monkeypatch.setattr(predict_module, "_classes_first", lambda t: classes_first)
        summary = predict_module._ClassificationSummary(keep_samples=True)
        for chunk in samples.split(chunks):
            summary.add_logits(chunk) if source == "logits" else summary.add_probs(chunk)
        return summary.result()

    reference = summarise(False, 12)
    p = logits.double().softmax(-1)
    torch.testing.assert_close(reference.probs, p.mean(0).float())
    torch.testing.assert_close(reference.expected_entropy, -torch.special.xlogy(p, p).sum(-1).mean(0).float(), atol=1e-6, rtol=1e-5)
    for classes_first, chunks in [(True, 12), (True, 5), (False, 5)]:
        pred = summarise(classes_first, chunks)
        for name in ("probs", "expected_entropy", "predicted_class_variance", "logits", "sample_probs"):
            value, expected = getattr(pred, name), getattr(reference, name)
            if expected is None:
                assert value is None, name
                continue
            assert value.shape == expected.shape and value.is_contiguous(), name
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(pred.mutual_information[:constant], torch.zeros(constant))
        assert torch.equal(pred.predicted_class_variance[:constant], torch.zeros(constant))
        assert (pred.mutual_information[constant:] > 1e-3).all()


def test_summary_layout_follows_the_register_length():
    classes_first = sys.modules["bdl.predict"]._classes_first
    register = {"AVX512": 64, "AVX2": 32, "SVE256": 32}.get(torch.backends.cpu.get_cpu_capability(), 16)
    assert classes_first(torch.zeros(2, 3, register // 4 - 1)) and not classes_first(torch.zeros(2, 3, register // 4))
    assert classes_first(torch.zeros(2, 3, register // 8 - 1, dtype=torch.float64))
    assert not classes_first(torch.zeros(2, 3, register // 8, dtype=torch.float64))
    assert not classes_first(torch.zeros(2, 3, 2, device="meta"))  # only the CPU's kernels fall back to scalar loops


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_deterministic_model_has_zero_mutual_information(method):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = 30 * torch.randn(20, 4)  # large logits: rounding in the averages would show
    pred = bdl.predict(model, x, num_samples=32, method=method, chunk_size=5)
    # exactly 0, not rounding noise: that noise grows with the outputs and would rank OOD inputs
    assert torch.equal(pred.mutual_information, torch.zeros(20))
    assert torch.equal(pred.predicted_class_variance, torch.zeros(20))
    with torch.no_grad():
        torch.testing.assert_close(pred.probs, model(x).softmax(-1))
    regression = bdl.predict(model, x, num_samples=32, task="regression", method=method, chunk_size=5)
    assert torch.equal(regression.epistemic_variance, torch.zeros(20, 3))
    with torch.no_grad():
        assert torch.equal(regression.mean, model(x))


def test_only_outputs_equal_in_every_sample_get_exactly_zero_epistemic_parts():
    sample_logits = torch.randn(1, 3, 4).repeat(6, 1, 1)
    sample_logits[5, 1, 2] += 1.0  # input 1 differs in the last sample only: its epistemic parts stay
    pred = Prediction.from_logits(sample_logits)
    assert pred.mutual_information[1] > 0 and pred.predicted_class_variance[1] > 0
    assert torch.equal(pred.mutual_information[[0, 2]], torch.zeros(2))
    merged = Prediction.cat([Prediction.from_logits(sample_logits[:, :2]), Prediction.from_logits(sample_logits[:, 2:])])
    torch.testing.assert_close(merged.mutual_information, pred.mutual_information, atol=0, rtol=0)
    means = sample_logits.clone()
    regression = Prediction.from_regression(means)
    assert regression.epistemic_variance[1, 2] > 0 and regression.epistemic_variance[1, :2].eq(0).all()
    assert torch.equal(regression.mean[0], means[0, 0])


def test_bayesian_model_under_deterministic_has_zero_mutual_information():
    model = bayes_mlp(std=0.5)
    with bdl.deterministic(model):
        pred = bdl.predict(model, torch.randn(10, 4), num_samples=4)
    torch.testing.assert_close(pred.mutual_information, torch.zeros(10), atol=1e-6, rtol=0)


def test_from_logits_known_answer():
    # two samples that disagree completely: p = (1/2, 1/2), MI = ln 2 - H[softmax(2, 0)]
    pred = Prediction.from_logits(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]))
    q = torch.tensor([2.0, 0.0]).softmax(-1)
    entropy = -(q * q.log()).sum()
    torch.testing.assert_close(pred.predictive_entropy, torch.tensor([math.log(2)]))
    torch.testing.assert_close(pred.expected_entropy, entropy[None])
    torch.testing.assert_close(pred.mutual_information, (math.log(2) - entropy)[None])
    torch.testing.assert_close(pred.predicted_class_variance, ((q[0] - q[1]) / 2).square()[None])
    torch.testing.assert_close(pred.logits, torch.tensor([[1.0, 1.0]]))


def test_from_probs_handles_zero_probabilities_and_has_no_logits():
    pred = Prediction.from_probs(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    torch.testing.assert_close(pred.expected_entropy, torch.zeros(1))
    torch.testing.assert_close(pred.mutual_information, torch.tensor([math.log(2)]))
    assert pred.logits is None and pred.sample_probs is None


@pytest.mark.parametrize("dtype, big", [(torch.float32, 3.4e38), (torch.float64, 1e308), (torch.bfloat16, 3e38)])
def test_logits_spread_past_the_dtypes_range_have_finite_entropies(dtype, big):
    # log_softmax gives -inf to the losing class, whose probability 0 times -inf was NaN: E[H] and MI NaN
    logits = torch.tensor([[[big, -big]], [[-big, big]]], dtype=dtype)
    pred = Prediction.from_logits(logits)
    reference = Prediction.from_probs(logits.double().softmax(-1))
    assert pred.expected_entropy.item() == 0 and pred.mutual_information.item() == pytest.approx(math.log(2))
    torch.testing.assert_close(pred.predictive_entropy.double(), reference.predictive_entropy)
    if dtype != torch.float64:  # samples that agree: their mean logits are theirs (the float32 sum was inf, as
        agree = Prediction.from_logits(logits[:1].expand(3, 1, 2))  # masking with finfo.min gives: energy -inf)
        assert agree.logits.dtype == agree.probs.dtype and torch.equal(agree.logits.to(dtype), logits[0])


def test_regression_moments_do_not_drift_with_the_number_of_chunks():
    # float32 running moments of outputs far from 0: 2000 samples one at a time put the epistemic variance 1e-3 off
    torch.manual_seed(0)
    model = lambda x: 1e4 + x + torch.randn_like(x)  # noqa: E731
    pred = bdl.predict(model, torch.randn(50, 1), num_samples=2000, task="regression", chunk_size=1, keep_samples=True)
    samples = pred.sample_means.double()
    torch.testing.assert_close(pred.epistemic_variance, samples.var(0, correction=0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(pred.mean, samples.mean(0).float(), rtol=1e-7, atol=0)
    assert pred.mean.dtype == pred.epistemic_variance.dtype == torch.float32
    # variances near float32's limit: their float32 sum overflowed, where their mean fits
    huge = Prediction.from_regression(torch.zeros(10, 2, 1), torch.full((10, 2, 1), 1e38))
    torch.testing.assert_close(huge.aleatoric_variance, torch.full((2, 1), 1e38))


def test_half_precision_logits_are_summarised_in_float32():
    logits = torch.randn(6, 5, 4)
    pred = Prediction.from_logits(logits.half())
    assert pred.probs.dtype == torch.float32
    torch.testing.assert_close(pred.probs, logits.half().float().softmax(-1).mean(0))


# ----------------------------------------------------------------------------- regression
def test_regression_decomposition_is_the_variance_of_the_mixture():
    sample_means = torch.randn(6, 10, 2)
    sample_variances = torch.rand(6, 10, 2)
    pred = Prediction.from_regression(sample_means, sample_variances)
    torch.testing.assert_close(pred.aleatoric_variance, sample_variances.mean(0))
    torch.testing.assert_close(pred.epistemic_variance, sample_means.var(0, unbiased=False))
    second_moment = (sample_variances + sample_means.square()).mean(0)  # E[y^2] of the equally weighted mixture
    torch.testing.assert_close(pred.total_variance, second_moment - pred.mean.square(), atol=1e-5, rtol=1e-5)


def test_regression_variances_must_match_the_means_and_be_finite():
    means, variances = torch.randn(3, 4, 2), torch.rand(3, 4, 2)
    with pytest.raises(ValueError, match=r"shape of sample_means \(3, 4, 2\)"):
        Prediction.from_regression(means, variances.transpose(1, 2).contiguous())  # as many elements, wrong layout
    with pytest.raises(ValueError, match="sample_variances must be finite"):
        Prediction.from_regression(means, torch.full_like(variances, float("nan")))
    flat = Prediction.from_regression(means[..., 0], variances[..., 0])  # [S, N] means and variances: D = 1
    torch.testing.assert_close(flat.aleatoric_variance, variances[..., :1].mean(0))


def test_interval_is_the_central_gaussian_interval():
    pred = Prediction.from_regression(torch.randn(5, 8, 1), torch.rand(5, 8, 1))
    lower, upper = pred.interval(0.9)
    normal = torch.distributions.Normal(pred.mean, pred.total_variance.sqrt())
    torch.testing.assert_close(normal.cdf(upper) - normal.cdf(lower), torch.full((8, 1), 0.9), atol=1e-5, rtol=0)
    torch.testing.assert_close(upper + lower, 2 * pred.mean)
    with pytest.raises(ValueError, match="level"):
        pred.interval(1.0)


def test_mean_only_regression_has_zero_aleatoric_variance():
    model = nn.Sequential(bdl.BayesLinear(2, 8, posterior_std_init=0.2), nn.Tanh(), bdl.BayesLinear(8, 1))
    pred = bdl.predict(model, torch.randn(30, 2), num_samples=16, task="regression", keep_samples=True)
    assert pred.mean.shape == (30, 1) and torch.equal(pred.aleatoric_variance, torch.zeros(30, 1))
    torch.testing.assert_close(pred.epistemic_variance, pred.sample_means.var(0, unbiased=False))
    assert pred.sample_variances is None


def test_flat_regression_outputs_are_one_target_per_input():
    model = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
    assert bdl.predict(model, torch.randn(7, 2), num_samples=1, task="regression").mean.shape == (7, 1)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_gaussian_head_model_gives_aleatoric_and_epistemic_parts(method):
    model = nn.Sequential(
        bdl.BayesLinear(1, 8, posterior_std_init=0.2), nn.Tanh(), bdl.GaussianHead(8, 1, linear=bdl.BayesLinear)
    )
    pred = bdl.predict(model, torch.randn(30, 1), num_samples=16, task="regression", keep_samples=True, method=method)
    assert pred.mean.shape == (30, 1) and (pred.aleatoric_variance > 0).all() and (pred.epistemic_variance > 0).all()
    torch.testing.assert_close(pred.aleatoric_variance, pred.sample_variances.mean(0))
    torch.testing.assert_close(pred.mean, pred.sample_means.mean(0))


# ----------------------------------------------------------------------------- sampling paths
def reference_samples(net, x, num_samples):
    """Ground truth by definition: S independent weight draws from the mean-field posterior, [S, N, out]."""
    h = x.expand(num_samples, *x.shape)
    for layer in net:
        if isinstance(layer, bdl.BayesLinear):
            weight = layer.weight_mu + layer.weight_std * torch.randn(num_samples, *layer.weight_mu.shape)
            bias = layer.bias_mu + layer.bias_std * torch.randn(num_samples, *layer.bias_mu.shape)
            h = torch.einsum("sni,soi->sno", h, weight) + bias[:, None]
        else:
            h = layer(h)
    return h


def kurtosis(samples):
    centred = samples - samples.mean(0)
    return centred.pow(4).mean(0) / centred.square().mean(0).square()


@pytest.mark.parametrize("wrap", [False, True], ids=["sequential", "any-module"])
def test_every_sampling_path_gives_the_posterior_predictive(wrap, one_thread):
    # a two-layer net with a nonlinearity, so the output is non-Gaussian and several layers must be right
    torch.manual_seed(1)
    net = nn.Sequential(
        bdl.BayesLinear(3, 16, posterior_std_init=0.4), nn.Tanh(), bdl.BayesLinear(16, 2, posterior_std_init=0.4)
    )
    model = Wrapped(net) if wrap else net
    x = torch.randn(4, 3)
    with torch.no_grad():
        reference = reference_samples(net, x, 20000)
    ref_mean, ref_var = reference.mean(0), reference.var(0)
    for method, num_samples, tolerance in (("batched", 20000, 0.06), ("loop", 1000, 0.2)):
        pred = bdl.predict(model, x, num_samples, task="regression", method=method, keep_samples=True)
        standard_error = (ref_var / num_samples + ref_var / 20000).sqrt()
        assert ((pred.mean - ref_mean).abs() < 4 * standard_error).all(), method
        ratio = pred.epistemic_variance / ref_var
        assert ((ratio > 1 - tolerance) & (ratio < 1 + tolerance)).all(), (method, ratio)
        if method == "batched":  # the shape of the distribution, and independent samples
            assert ((kurtosis(pred.sample_means) - kurtosis(reference)).abs() < 0.3).all()
            centred = pred.sample_means - pred.sample_means.mean(0)
            lag_one = (centred[1:] * centred[:-1]).mean(0) / centred.square().mean(0)
            assert (lag_one.abs() < 0.04).all()


def test_batched_path_gives_every_input_its_own_noise():
    # identical inputs must still get independent draws (a per-batch weight sample would make them equal)
    model = bayes_mlp(out=1)
    samples = draw_samples(model, torch.ones(2, 4), 500, method="batched")[..., 0]
    correlation = torch.corrcoef(samples.T)[0, 1]
    assert abs(correlation) < 0.15


def test_chunking_does_not_change_the_samples_of_the_loop():
    model = bayes_mlp()
    x = torch.randn(30, 4)
    torch.manual_seed(0)
    whole = bdl.predict(model, x, num_samples=12, chunk_size=12, keep_samples=True, method="loop")
    torch.manual_seed(0)
    chunked = bdl.predict(model, x, num_samples=12, chunk_size=5, keep_samples=True, method="loop")
    torch.testing.assert_close(whole.sample_probs, chunked.sample_probs)
    for name in ("probs", "expected_entropy", "predicted_class_variance", "logits"):
        torch.testing.assert_close(getattr(whole, name), getattr(chunked, name))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_streaming_summary_equals_summary_of_all_samples(task):
    # chunks of 3 + batches of 7: the merged moments must equal those of the kept [S, N, C] samples
    model = bayes_mlp(out=2)
    x = torch.randn(20, 4)
    pred = bdl.predict(model, x, num_samples=10, chunk_size=3, batch_size=7, task=task, keep_samples=True)
    if task == "classification":
        reference = Prediction.from_probs(pred.sample_probs)
        names = ("probs", "expected_entropy", "predicted_class_variance")
    else:
        reference = Prediction.from_regression(pred.sample_means)
        names = ("mean", "epistemic_variance", "aleatoric_variance")
    for name in names:
        torch.testing.assert_close(getattr(pred, name), getattr(reference, name), atol=1e-6, rtol=1e-5)


def test_samples_are_dropped_unless_asked():
    pred = bdl.predict(bayes_mlp(), torch.randn(9, 4), num_samples=6)
    assert pred.sample_probs is None and pred.num_samples == 6


def test_auto_picks_batched_only_where_it_is_exact():
    assert resolve_method(bayes_mlp(), 64) == "batched"
    assert resolve_method(nn.Linear(4, 2), 64) == "loop"  # no noise: nothing to batch
    conv = nn.Sequential(bdl.BayesConv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    assert resolve_method(conv, 64) == "loop"
    with pytest.raises(ValueError, match="BayesConv2d"):
        resolve_method(conv, 64, "batched")
    assert set(SAMPLING_METHODS) == {"auto", "loop", "batched"}


def test_batched_path_reports_models_that_mix_rows():
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(0, keepdim=True)

    model = nn.Sequential(bdl.BayesLinear(4, 3), Pool())
    with pytest.raises(ValueError, match="method='loop'"):
        bdl.predict(model, torch.randn(5, 4), num_samples=4, method="batched")


class FixedBatchRNN(nn.Module):
    """An MC-dropout RNN whose initial state is made for batches of ``batch_size`` rows (a tutorial pattern)."""

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x, torch.zeros(1, self.batch_size, 8))
        return self.fc(self.drop(out[:, -1]))


def test_inputs_x_with_none_for_targets_are_predicted_as_unlabelled():
    model, x = bayes_mlp(), torch.randn(6, 4)
    torch.manual_seed(0)
    paired = bdl.predict(model, (x, None), num_samples=4)
    torch.manual_seed(0)
    alone = bdl.predict(model, x, num_samples=4)
    assert paired.targets is None and torch.equal(paired.probs, alone.probs)


def test_auto_takes_the_loop_for_a_model_that_runs_on_batches_of_its_own_size_only():
    # the batched path runs the model on S x B rows: auto failed with the RNN's shape error where the loop works
    model = bdl.MCDropout(FixedBatchRNN(batch_size=6))
    x = torch.randn(6, 5, 4)
    with pytest.raises(RuntimeError) as error:
        bdl.predict(model, x, num_samples=8, method="batched")
    if sys.version_info >= (3, 11):
        assert "method='loop' runs it on the batch's rows" in "".join(error.value.__notes__)
    torch.manual_seed(0)
    auto = bdl.predict(model, x, num_samples=8)
    torch.manual_seed(0)
    loop = bdl.predict(model, x, num_samples=8, method="loop")
    assert auto.probs.shape == (6, 3) and auto.mutual_information.min() >= 0
    assert torch.equal(auto.probs, loop.probs)  # the failed batched draw drew no dropout mask first
    with pytest.raises(RuntimeError):  # asked for, it is tried again: the model's own error
        bdl.predict(model, x, num_samples=8, method="batched")
    with pytest.raises(RuntimeError):  # a batch of another size: the model's own error, from the loop too
        bdl.predict(model, x[:4], num_samples=8)
    rows = []
    model.model.fc.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    bdl.predict(model, x, num_samples=8)
    assert rows == [6] * 8  # remembered: the batched forward (48 rows) failed every call

    # an error of the inputs (the loop fails too) is not remembered: the model keeps its batched path
    class RefusesNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))

        def forward(self, x):
            if torch.isnan(x).any():
                raise ValueError("NaN input")
            return self.net(x)

    checked = bdl.MCDropout(RefusesNaN())
    with pytest.raises(ValueError, match="NaN input"):
        bdl.predict(checked, torch.full((6, 4), math.nan), num_samples=8)
    assert bdl.predict(checked, torch.randn(6, 4), num_samples=8, method="batched").mutual_information.min() >= 0


def test_calls_on_one_model_from_two_threads_run_one_after_the_other():
    # each call switches the model to eval mode, its layers' estimator and dropout on, and restores them: a call
    # overlapping another ran with the other's settings (BatchNorm statistics moved in train mode, 0 mutual
    # information) or failed
    import threading

    torch.manual_seed(0)
    model = bdl.MCDropout(nn.Sequential(bdl.BayesLinear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), bdl.BayesLinear(16, 3)))
    model.train()
    statistics = model.model[1].running_mean.clone()
    order, first_inside, second_called = [], threading.Event(), threading.Event()

    def hook(module, args):
        order.append(threading.current_thread().name)
        if threading.current_thread().name == "first" and not first_inside.is_set():
            first_inside.set()
            second_called.wait(timeout=0.5)  # without the lock the second call runs its forwards meanwhile
        elif threading.current_thread().name == "second":
            second_called.set()

    model.model[0].register_forward_pre_hook(hook)
    results = {}

    def call(name, rows):
        results[name] = bdl.predict(model, torch.randn(rows, 4), num_samples=8, method="loop")

    first = threading.Thread(target=call, args=("first", 5), name="first")
    second = threading.Thread(target=call, args=("second", 7), name="second")
    first.start()
    first_inside.wait(timeout=5)
    second.start()
    first.join(), second.join()
    assert order == ["first"] * 8 + ["second"] * 8
    assert model.training and model.model[1].training and torch.equal(model.model[1].running_mean, statistics)
    assert all(results[name].mutual_information.min() > 0 for name in ("first", "second"))


def test_a_process_forked_while_a_thread_predicts_predicts_on_its_own():
    # the child inherited the model's lock, held by a thread that does not exist in it: its own predict (a DataLoader
    # worker's) waited forever
    import multiprocessing
    import threading

    model, x = bayes_mlp(), torch.randn(2, 4)
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        release.wait(timeout=20)

    handle = model.register_forward_pre_hook(hold)
    serving = threading.Thread(target=lambda: bdl.predict(model, x, num_samples=1))
    serving.start()
    inside.wait(timeout=20)
    handle.remove()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    def work():
        torch.set_num_threads(1)  # as a DataLoader worker: the parent's OpenMP threads are not the child's
        queue.put(bdl.predict(model, x, num_samples=2).probs.shape)

    child = context.Process(target=work)
    child.start()
    child.join(timeout=20)
    hung = child.is_alive()
    if hung:
        child.kill()
    release.set()
    serving.join()
    assert not hung and queue.get(timeout=5) == (2, 3)


class Scaled(nn.Sequential):
    """A Sequential with a forward of its own: its children in turn do not make the model."""

    def forward(self, x):
        return super().forward(x) * 100.0


def _scaled_by_hook(model: nn.Module) -> nn.Module:
    model.register_forward_hook(lambda module, inputs, output: output * 100.0)
    return model


@pytest.mark.parametrize("build", ["subclass", "hook"])
@pytest.mark.parametrize("kind", ["mc_dropout", "bayes"])
def test_batched_path_calls_a_sequential_with_its_own_forward_or_hooks(build, kind):
    torch.manual_seed(0)
    if kind == "bayes":
        layers = [bdl.BayesLinear(4, 16), nn.ReLU(), bdl.BayesLinear(16, 2)]
    else:
        layers = [nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2)]
    core = Scaled(*layers) if build == "subclass" else _scaled_by_hook(nn.Sequential(*layers))
    model = bdl.MCDropout(core) if kind == "mc_dropout" else core
    x = torch.randn(6, 4)
    with torch.no_grad():
        scale = model(x).abs().mean()  # outputs of the scaled model: around 100x those of its children
    assert resolve_method(model, 6) == "batched"  # still batched, through the model's own call
    for method in ("loop", "batched"):
        pred = bdl.predict(model, x, num_samples=400, task="regression", method=method)
        assert pred.mean.abs().mean() > scale / 10  # 100x off when the children ran without the model's call


def test_a_hooked_mc_dropout_wrapper_is_sampled_by_the_loop():
    model = _scaled_by_hook(bdl.MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))))
    assert resolve_method(model, 8) == "loop"
    with pytest.raises(ValueError, match="hooks"):
        bdl.predict(model, torch.randn(8, 4), num_samples=4, method="batched")
    with torch.no_grad():
        ones = torch.ones(8, 2)
        model.model[2].weight.zero_(), model.model[2].bias.fill_(1.0)
        torch.testing.assert_close(bdl.predict(model, torch.randn(8, 4), num_samples=3, task="regression").mean, 100 * ones)


# ----------------------------------------------------------------------------- inputs, modes, devices
def test_dataloader_inputs_keep_targets_and_match_tensor_path():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = nn.Linear(4, 3)
    pred = bdl.predict(model, DataLoader(TensorDataset(x, y), batch_size=16), num_samples=2)
    assert torch.equal(pred.targets, y) and len(pred) == 40
    torch.testing.assert_close(pred.probs, bdl.predict(model, x, num_samples=2, batch_size=7).probs)
    assert torch.equal(bdl.predict(model, (x, y), num_samples=1, batch_size=9).targets, y)
    assert bdl.predict(model, x, num_samples=1).targets is None


def test_datasets_are_read_in_order_batch_size_examples_at_a_time():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = nn.Linear(4, 3)
    sizes = []
    model.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    pred = bdl.predict(model, TensorDataset(x, y), num_samples=1, batch_size=16)  # iterating it gave rows without a batch dimension
    assert torch.equal(pred.targets, y) and sizes == [16, 16, 8]
    torch.testing.assert_close(pred.probs, model(x).softmax(-1))

    class Inputs(torch.utils.data.IterableDataset):  # examples without targets, one at a time
        def __iter__(self):
            return iter(x)

    streamed = bdl.predict(model, Inputs(), num_samples=1, batch_size=32)
    assert streamed.targets is None and torch.equal(streamed.probs, pred.probs)


def test_a_list_of_tensors_is_refused_as_ambiguous():
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match="ambiguous"):  # it fed the labels to the network as a second batch
        bdl.predict(nn.Linear(4, 3), [x, y], num_samples=1)
    assert len(bdl.predict(nn.Linear(4, 3), iter([x, x]), num_samples=1)) == 12  # batches, said so


def test_predict_runs_in_eval_mode_and_restores_every_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), bdl.BayesLinear(8, 3)).train()
    model[1].eval()  # a mixed state must come back as it was
    before = model[1].running_mean.clone()
    bdl.predict(model, torch.randn(1, 4), num_samples=3)  # batch of 1: BatchNorm in training mode would fail
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, before)


def test_predict_calls_a_modules_own_train_override():
    class FrozenBatchNorm(nn.BatchNorm1d):
        """Stays in eval mode whatever train() is asked for (a common fine-tuning override)."""

        calls: list[bool] = []

        def train(self, mode: bool = True) -> "FrozenBatchNorm":
            self.calls.append(mode)
            return super().train(False)

    model = nn.Sequential(nn.Linear(4, 8), FrozenBatchNorm(8), bdl.BayesLinear(8, 3)).train()
    FrozenBatchNorm.calls.clear()
    bdl.predict(model, torch.randn(1, 4), num_samples=3)
    assert FrozenBatchNorm.calls == [False]  # predict switched through train(), not around it
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_predict_does_not_track_gradients():
    pred = bdl.predict(bayes_mlp(), torch.randn(3, 4), num_samples=2)
    assert not pred.probs.requires_grad


def test_prediction_indexing_concatenation_and_repr():
    pred = bdl.predict(bayes_mlp(), torch.randn(10, 4), num_samples=4, keep_samples=True)
    pred.targets = torch.arange(10) % 3
    subset = pred[pred.predicted_class == 0]
    assert len(subset) == int((pred.predicted_class == 0).sum()) and subset.sample_probs.shape[1] == len(subset)
    joined = Prediction.cat([pred[:4], pred[4:]])
    backwards = pred[::-1]  # torch's "step must be greater than zero"
    assert torch.equal(backwards.probs, pred.probs.flip(0)) and torch.equal(backwards.sample_probs, pred.sample_probs.flip(1))
    for name in ("probs", "expected_entropy", "sample_probs", "targets"):
        assert torch.equal(getattr(joined, name), getattr(pred, name))
    assert "num_samples=4" in repr(pred) and "probs=[10, 3]" in repr(pred)
    one = pred[3]  # an integer keeps the inputs' dimension: a prediction for one input
    assert len(one) == 1 and one.expected_entropy.shape == (1,) and one.sample_probs.shape == (4, 1, 3)
    assert torch.equal(one.probs[0], pred.probs[3]) and torch.equal(pred[-1].probs, pred.probs[-1:])
    assert torch.equal(pred[torch.tensor(3)].probs, one.probs)
    with pytest.raises(IndexError, match="10 inputs"):
        pred[10]
    with pytest.raises(AttributeError, match="regression"):
        pred.total_variance
    with pytest.raises(ValueError, match="num_samples"):
        Prediction.cat([pred, Prediction.from_logits(torch.randn(2, 3, 3))])


def test_half_precision_probabilities_and_numpy_indices_are_taken():
    probs = torch.randn(3, 5, 10).softmax(-1).bfloat16()  # rows off by up to 0.004: refused at float32's 1e-3
    pred = Prediction.from_probs(probs)
    torch.testing.assert_close(pred.probs, probs.float().mean(0), atol=1e-2, rtol=0)
    # renormalised in float32: bdl.evaluate refused the prediction ("row 171 sums to 1.00214", tolerance 1e-3)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(5), atol=1e-6, rtol=0)
    one_sample = torch.softmax(torch.randn(1, 200, 10, generator=torch.Generator().manual_seed(0)), -1).bfloat16()
    assert bdl.evaluate(Prediction.from_probs(one_sample), torch.arange(200) % 10).metrics["ece"] > 0
    with pytest.raises(ValueError, match="sum to 1"):
        Prediction.from_probs(probs.float() * 1.01)
    one = pred[np.argmax(pred.max_probability.numpy())]  # np.int64 dropped the inputs' dimension: probs [C]
    assert len(one) == 1 and one.probs.shape == (1, 10) and one.predictive_entropy.shape == (1,)
    with pytest.raises(IndexError, match="out of range"):
        pred[np.int64(5)]


@pytest.mark.cuda
def test_prediction_stays_on_the_model_device():
    model = bayes_mlp().cuda()
    pred = bdl.predict(model, (torch.randn(8, 4), torch.randint(0, 3, (8,))), num_samples=4)
    assert pred.probs.is_cuda and pred.targets.is_cuda


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, ValueError, "num_samples"),
        ({"task": "segmentation"}, ValueError, "task must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"batch_size": -1}, ValueError, "batch_size"),
        ({"method": "vmap"}, ValueError, "method must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        bdl.predict(nn.Linear(4, 3), torch.randn(3, 4), **kwargs)


def test_a_non_finite_output_names_the_inputs_and_the_likely_cause():
    # three causes gave one message, "the model returned non-finite logits (NaN or Inf)"
    torch.manual_seed(0)
    net = nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))
    x = torch.randn(100, 4)
    holes = x.clone()
    holes[[17, 42], 1] = math.nan
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN or Inf\) for 2 of the batch's 100 inputs \(rows \[17, 42\] of the inputs\); those inputs hold NaN or Inf$"):
        bdl.predict(net, holes, num_samples=4)
    loader = DataLoader(TensorDataset(holes[10:]), batch_size=30)  # rows of the whole input, across the batches
    with pytest.raises(ValueError, match=r"for 1 of the batch's 30 inputs \(rows \[7\] of the inputs\)"):
        bdl.predict(net, loader, num_samples=4)
    with torch.no_grad():
        net[2].weight_mu[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"for 100 of the batch's 100 inputs \(rows \[0, 1, 2, 3, 4, 5, 6, 7, ...\] .*; the model's parameters are not finite: 2.weight_mu \(1 of 24\)"):
        bdl.predict(net, x, num_samples=4)
    huge = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        huge[0].weight.fill_(1e30)
    with pytest.raises(ValueError, match=r"non-finite means or variances .* for 2 of the batch's 2 inputs .*; the inputs and the parameters are finite: a NaN or an overflow in the forward"):
        bdl.predict(huge, torch.full((2, 4), 1e10), task="regression")
    exploded = nn.Sequential(bdl.BayesLinear(4, 3))
    with torch.no_grad():
        exploded[0].weight_rho.fill_(50.0)  # a posterior std of e^50: every parameter finite, the draws not
    with pytest.raises(ValueError, match=r"the inputs and the parameters are finite, but the posterior of 0 \(BayesLinear\) is not \(its KL is infinite"):
        bdl.predict(exploded, torch.randn(8, 4), num_samples=2)

    class NoKL(bdl.BayesianModule):  # prediction only: its KL raises NotImplementedError, which replaced the message
        def forward(self, x):
            return x.log()

    with pytest.raises(ValueError, match=r"the inputs and the parameters are finite: a NaN or an overflow"):
        bdl.predict(NoKL(), -torch.ones(2, 3), num_samples=2)
    shuffled = DataLoader(TensorDataset(holes), batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"for [12] of the batch's \d+ inputs \(inputs \[[\d, ]+\] in the order the loader gave them\); those inputs hold NaN"):
        bdl.predict(nn.Sequential(nn.Linear(4, 3)), shuffled)

    class Reversed(torch.utils.data.Sampler):  # a batch sampler of its own: loader.sampler still says "in order"
        def __iter__(self):
            yield list(range(99, -1, -1))

        def __len__(self) -> int:
            return 1

    with pytest.raises(ValueError, match=r"\(inputs \[57, 82\] in the order the loader gave them\)"):
        bdl.predict(nn.Sequential(nn.Linear(4, 3)), DataLoader(TensorDataset(holes), batch_sampler=Reversed()))
    fine = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^ood_data: the model returned non-finite logits .* for 1 of the batch's 5 inputs \(rows \[2\]"):
        bdl.evaluate(fine, (x, torch.arange(100) % 3), ood_data=holes[15:20])


def test_empty_inputs_bad_outputs_and_bad_samples_are_reported():
    with pytest.raises(ValueError, match="empty"):
        bdl.predict(nn.Linear(4, 3), torch.randn(0, 4))
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        bdl.predict(model, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        bdl.predict(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"got GaussianOutput; a model that returns \(mean, variance\).*needs task='regression'"):
        bdl.predict(nn.Sequential(nn.Linear(4, 8), bdl.GaussianHead(8, 1)), torch.randn(3, 4))
    with pytest.raises(TypeError, match="inputs must be"):
        bdl.predict(nn.Linear(4, 3), 3.0)
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        Prediction.from_logits(torch.randn(4, 3))
    with pytest.raises(ValueError, match="sum to 1"):
        Prediction.from_probs(torch.full((2, 3, 4), 0.5))
    with pytest.raises(ValueError, match="from_logits"):
        Prediction.from_probs(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=">= 0"):
        Prediction.from_regression(torch.randn(2, 3, 1), -torch.ones(2, 3, 1))


def test_loop_path_predicts_local_and_flipout_models_with_the_same_per_input_distribution():
    # A forward of a "local" or "flipout" layer is, for each input, a draw from the same Gaussian-weight predictive
    # as "reparam"; predict's loop uses the cheaper reparam forward and restores the layer's estimator.
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(3, 16, estimator="flipout", posterior_std_init=0.3), nn.Tanh(),
                          bdl.BayesLinear(16, 1, estimator="local", posterior_std_init=0.3))  # fmt: skip
    x = torch.randn(6, 3)
    with torch.no_grad():
        reference = torch.stack([model(x) for _ in range(4000)])  # the layers' own estimators
    pred = bdl.predict(model, x, num_samples=4000, task="regression", method="loop")
    assert [model[0].estimator, model[2].estimator] == ["flipout", "local"]
    standard_error = (2 * reference.var(0) / 4000).sqrt()  # of the difference of two 4000-draw means
    assert ((pred.mean - reference.mean(0)).abs() < 4 * standard_error).all()
    assert torch.allclose(pred.epistemic_variance, reference.var(0, unbiased=False), rtol=0.1, atol=1e-3)


def test_mutual_information_of_one_sample_is_exactly_zero():
    pred = Prediction.from_logits(10 * torch.randn(1, 50, 7))
    assert torch.equal(pred.mutual_information, torch.zeros(50))


def test_default_chunks_halve_after_running_out_of_memory(monkeypatch):
    module = sys.modules["bdl.predict"]
    real, counts, limit = module.draw_samples, [], [4]

    def limited(model, x, count, method="loop"):
        counts.append(count)
        if count > limit[0]:
            raise torch.OutOfMemoryError(f"fake: {count} samples at once")
        return real(model, x, count, method=method)

    monkeypatch.setattr(module, "draw_samples", limited)
    model, x = bayes_mlp(), torch.randn(20, 4)
    pred = bdl.predict(model, x, num_samples=32, batch_size=10, method="batched")
    assert pred.num_samples == 32 and len(pred) == 20 and bool(torch.isfinite(pred.probs).all())
    assert counts == [32, 16, 8] + [4] * 8 + [4] * 8  # the second batch starts at the size that fitted
    counts.clear()
    with pytest.raises(torch.OutOfMemoryError):  # a chunk size the user gave is used as is
        bdl.predict(model, x, num_samples=32, chunk_size=8, method="batched")
    assert counts == [8]
    limit[0] = 0
    counts.clear()
    with pytest.raises(torch.OutOfMemoryError):  # not even one sample fits: the error reaches the user
        bdl.predict(model, x, num_samples=32, method="batched")
    assert counts == [32, 16, 8, 4, 2, 1]


def _default_counts(monkeypatch, model, x, **kwargs):
    """The sample counts ``predict`` draws per call of ``draw_samples`` without a ``chunk_size``."""
    module = sys.modules["bdl.predict"]
    real, counts = module.draw_samples, []

    def recording(model, x, count, method="loop"):
        counts.append(count)
        return real(model, x, count, method=method)

    monkeypatch.setattr(module, "draw_samples", recording)
    bdl.predict(model, x, num_samples=32, method="batched", **kwargs)
    return counts


def test_cpu_chunks_keep_the_largest_activation_within_the_byte_budget(monkeypatch):
    # 16 channels of 32x32 float32: 64 KiB per row and sample, so 12 MiB hold 192 rows: 3 samples of 64 rows
    conv = bdl.MCDropout(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
    ))  # fmt: skip
    assert _default_counts(monkeypatch, conv, torch.randn(64, 3, 32, 32)) == [3] * 10 + [2]
    # a narrow MLP's activations are small: the row limit alone decides (8192 rows, all 32 samples of 64)
    assert _default_counts(monkeypatch, bayes_mlp(), torch.randn(64, 4)) == [32]


def test_the_chunk_probe_leaves_the_random_stream_and_the_model_alone():
    model = bdl.MCDropout(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Dropout(0.3), nn.Flatten(), nn.Linear(16 * 8 * 8, 4)))
    x = torch.randn(64, 3, 8, 8)  # 4 KiB per row and sample: chunks of 32 samples, one draw
    torch.manual_seed(1)
    probed = bdl.predict(model, x, num_samples=32, method="batched", keep_samples=True)
    torch.manual_seed(1)
    given = bdl.predict(model, x, num_samples=32, method="batched", keep_samples=True, chunk_size=32)
    torch.testing.assert_close(probed.sample_probs, given.sample_probs, rtol=0, atol=0)
    assert not any(m._forward_hooks for m in model.modules())


def test_the_chunk_probe_runs_once_per_network_and_input_shape(monkeypatch):
    module = sys.modules["bdl.predict"]
    real, probes = module._activation_bytes_per_row, []

    def counting(model, x):
        probes.append(tuple(x.shape[1:]))
        return real(model, x)

    monkeypatch.setattr(module, "_activation_bytes_per_row", counting)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    for _ in range(3):  # a new MC-dropout wrapper per call, as users write it, around the same network
        bdl.predict(bdl.MCDropout(net), torch.randn(8, 4), num_samples=4)
    assert probes == [(4,)]
    bdl.predict(bdl.MCDropout(net), torch.randn(8, 4), num_samples=4, chunk_size=2)  # a given chunk: no probe
    assert probes == [(4,)]
    bdl.predict(bdl.MCDropout(net), torch.randn(8, 2, 2), num_samples=4)  # another row shape
    assert probes == [(4,), (2, 2)]


def test_global_module_hooks_run_in_the_batched_path():
    # register_module_forward_hook's hooks were skipped for the leading BayesLinear (its moments shared by samples)
    torch.manual_seed(0)
    model = nn.Sequential(bdl.BayesLinear(4, 16), nn.ReLU(), bdl.BayesLinear(16, 2))
    x = torch.randn(6, 4)
    calls = []

    def hook(module, inputs, output):
        calls.append(type(module).__name__)
        return output * 100.0 if module is model[0] else output

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        means = {method: bdl.predict(model, x, num_samples=64, task="regression", method=method).mean for method in ("loop", "batched")}
    finally:
        handle.remove()
    assert calls.count("BayesLinear") >= 2 * 64  # every sample of the loop path ran both layers' hooks
    torch.testing.assert_close(means["batched"], means["loop"], rtol=0.2, atol=1.0)
    assert means["batched"].abs().mean() > 10  # the first layer's outputs scaled 100x


def test_the_predictive_entropy_is_computed_once_and_follows_the_probabilities():
    pred = bdl.Prediction.from_logits(torch.randn(4, 6, 3))
    first = pred.predictive_entropy
    assert pred.predictive_entropy is first  # evaluate read it 7 times, each an [N, C] pass
    pred.probs = torch.full((6, 3), 1 / 3)
    torch.testing.assert_close(pred.predictive_entropy, torch.full((6,), math.log(3)))
    pred.probs.copy_(torch.tensor([1.0, 0.0, 0.0]).expand(6, 3))  # in place
    torch.testing.assert_close(pred.predictive_entropy, torch.zeros(6))
    # copies: their tensors' version counters restart, and the copied cache of the first version looked valid
    import copy
    import io
    import pickle

    pred = bdl.Prediction.from_logits(torch.randn(4, 6, 3))
    pred.probs.clamp_(min=1e-6)  # version 1, as a copy's tensors are
    pred.predictive_entropy  # kept for version 1
    pred.probs.copy_(torch.full((6, 3), 1 / 3))
    buffer = io.BytesIO()
    torch.save(pred, buffer)
    buffer.seek(0)
    # torch.load's default, weights_only, refused it ("Unsupported global: bdl.predict.Prediction")
    for twin in (copy.deepcopy(pred), pickle.loads(pickle.dumps(pred)), torch.load(buffer)):
        torch.testing.assert_close(twin.predictive_entropy, torch.full((6,), math.log(3)))


def test_one_input_without_its_batch_dimension_is_warned_of():
    # x [24] is 24 scalar inputs: a Linear(24, 24) model's one output of 24 came back as 24 predictions, silently
    model = bdl.MCDropout(nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 24)))
    with pytest.warns(UserWarning, match=r"inputs of shape \(24,\) are read as a batch of 24 scalar inputs, and the model's first layer \(Linear\) takes 24 features: if x is one input, pass x\[None\]"):
        bdl.predict(model, torch.randn(24), num_samples=2, task="regression")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bdl.predict(model, torch.randn(24)[None], num_samples=2, task="regression").mean.shape == (1, 24)
        codes = bdl.MCDropout(nn.Sequential(nn.Embedding(100, 32), nn.Dropout(0.2), nn.Linear(32, 3)))  # 32 category codes
        assert bdl.predict(codes, torch.randint(0, 100, (32,)), num_samples=2).probs.shape == (32, 3)
    with pytest.raises(ValueError, match=r"for a batch of 4 inputs; .* one input x as x\[None\]"):  # outputs of other sizes
        linear = nn.Linear(4, 3)
        bdl.predict(Lambda(lambda x: linear(x)), torch.randn(4), num_samples=1)  # its layer out of sight
    scalar = nn.Sequential(Lambda(lambda x: x[:, None]), nn.Linear(1, 2))  # a model of scalar inputs takes [N]
    assert bdl.predict(scalar, torch.randn(5), num_samples=1).probs.shape == (5, 2)


def test_a_model_that_returns_probabilities_is_refused():
    # they were read as logits and softmaxed again: probabilities flattened towards uniform, a tenth of the MI
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    x = torch.randn(4, 4)
    for model in (nn.Sequential(bdl.MCDropout(net), nn.Softmax(-1)), bdl.DeepEnsemble([nn.Sequential(nn.Linear(4, 3), nn.Softmax(-1)) for _ in range(2)])):
        with pytest.raises(ValueError, match=r"the model returns probabilities \(every row non-negative, summing to 1\), and predict reads logits"):
            bdl.predict(model, x, num_samples=4)
    log_probs = nn.Sequential(bdl.MCDropout(net), nn.LogSoftmax(-1))  # log-probabilities are logits
    assert bdl.predict(log_probs, x, num_samples=4).probs.shape == (4, 3)
    # one row of logits that happen to be non-negative and sum to 1 (one input, a trailing batch of one): no sign
    assert bdl.predict(Lambda(lambda x: torch.tensor([[0.3, 0.7]]).expand(len(x), 2)), x[:1], num_samples=1).probs.shape == (1, 2)


def test_probabilities_given_to_from_logits_and_elbo_loss_are_refused():
    # both took them silently: summarised as logits (softmaxed again), trained on by the cross-entropy
    probs = torch.rand(4, 5, 3).softmax(-1)
    with pytest.raises(ValueError, match="sample_logits look like probabilities .* pass them to Prediction.from_probs"):
        Prediction.from_logits(probs)
    assert Prediction.from_logits(probs.log()).probs.shape == (5, 3)  # log-probabilities are logits
    assert Prediction.from_logits(torch.tensor([[[0.3, 0.7]]])).probs.shape == (1, 2)  # one row: no sign
    bnn = nn.Sequential(bdl.BayesLinear(4, 3))
    criterion = bdl.ELBOLoss(bnn, num_data=100)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(2):  # refused again: the check is skipped only once outputs passed it
        with pytest.raises(ValueError, match="ELBOLoss's default criterion takes logits, and the model's outputs look like probabilities"):
            criterion(bnn(x).softmax(-1), y)
    assert torch.isfinite(criterion(bnn(x), y).loss)
    assert torch.isfinite(criterion(bnn(x).softmax(-1), y).loss)  # checked once: no sync at every step after
    # rows all alike (a zero-initialised head's, one row) tell nothing: the check waits for a batch that can tell
    waiting = bdl.ELBOLoss(bnn, num_data=100)
    waiting(torch.full((8, 3), 1 / 3), y)
    waiting(bnn(x[:1]).softmax(-1), y[:1])
    with pytest.raises(ValueError, match="look like probabilities"):
        waiting(bnn(x).softmax(-1), y)
    # the classes along dim 1, as the cross-entropy reads them: [B, C, T] sequences softmaxed over C passed
    sequence = torch.randn(8, 3, 5)
    with pytest.raises(ValueError, match="look like probabilities"):
        bdl.ELBOLoss(bnn, num_data=100)(sequence.softmax(1), torch.randint(0, 3, (8, 5)))
    assert torch.isfinite(bdl.ELBOLoss(bnn, num_data=100)(sequence.softmax(-1), torch.randint(0, 3, (8, 5))).loss)


def test_an_output_for_other_rows_than_the_inputs_is_refused():
    # a forward that drops or transposes the batch gave a prediction for other rows than its targets
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    linear = nn.Linear(4, 7)
    for forward in (lambda x: linear(x)[:3], lambda x: linear(x).T, lambda x: linear(x).sum()):
        for method in ("loop", "batched"):
            with pytest.raises(ValueError, match="batch"):
                bdl.predict(bdl.MCDropout(nn.Sequential(nn.Dropout(0.1), Lambda(forward))), (x, y), num_samples=2, method=method)
    with pytest.raises(ValueError, match="for a batch of 10 inputs"):
        bdl.predict(bdl.DeepEnsemble([Lambda(lambda x: linear(x)[:3]) for _ in range(2)]), x)
    ensemble = bdl.DeepEnsemble([nn.Linear(4, 7) for _ in range(3)])
    with pytest.raises(ValueError, match=r"shape \(3, 10, 7\) for a batch of 10 inputs \(the batch second, as a DeepEnsemble inside another module"):
        bdl.predict(nn.Sequential(ensemble), x)
    with pytest.raises(TypeError, match="returned torch.int64 outputs"):  # failed in a softmax kernel
        bdl.predict(Lambda(lambda x: linear(x).long()), x)
    # batches with and without targets: the labelled ones' were dropped silently
    with pytest.raises(ValueError, match="some batches of inputs came with targets and some without"):
        bdl.predict(linear, [(x[:5], y[:5]), x[5:]], num_samples=1)
    labelled, unlabelled = bdl.predict(linear, (x[:5], y[:5]), num_samples=1), bdl.predict(linear, x[5:], num_samples=1)
    with pytest.raises(ValueError, match="all have targets or all have none"):
        bdl.Prediction.cat([labelled, unlabelled])
    with pytest.raises(ValueError, match=r"outputs of one shape: got \(4,\) next to \(3,\)"):
        bdl.Prediction.cat(iter([bdl.Prediction.from_logits(torch.randn(1, 2, 3)), bdl.Prediction.from_logits(torch.randn(1, 2, 4))]))
    # regression targets [N, 1] beside [N] (evaluate takes either): torch's "same number of dimensions"
    column, flat = (bdl.Prediction.from_regression(torch.randn(1, 2, 1)) for _ in range(2))
    column.targets, flat.targets = torch.zeros(2, 1), torch.zeros(2)
    with pytest.raises(ValueError, match=r"targets must have one shape per input, got \[\(\), \(1,\)\]"):
        bdl.Prediction.cat([column, flat])
    # a sigmoid's one column: "rows must sum to 1", or all ones read as one class
    with pytest.raises(ValueError, match=r"sample_probs has one column: .* torch.cat\(\[1 - p, p\], -1\)"):
        bdl.Prediction.from_probs(torch.full((2, 3, 1), 0.3))


def test_prediction_to_a_dtype_casts_its_summaries_and_keeps_integer_targets():
    # every tensor was cast: labels became floats (cross_entropy refused them; float16 read 2049 as 2048), and
    # to(torch.long) made every probability 0
    prediction = bdl.Prediction.from_logits(torch.randn(4, 3, 5), keep_samples=True)
    prediction.targets = torch.tensor([0, 4, 2049])
    wide = prediction.to(torch.float64)
    assert wide.probs.dtype == wide.sample_probs.dtype == torch.float64 and torch.equal(wide.targets, prediction.targets)
    torch.testing.assert_close(wide.probs.float(), prediction.probs)
    with pytest.raises(TypeError, match="a dtype must be floating"):
        prediction.to(torch.long)
    assert prediction.to("cpu").targets.dtype == torch.int64
    # as Tensor.to takes them: dtype= and (device, dtype) were refused as unexpected arguments
    for moved in (prediction.to(dtype=torch.float64), prediction.to("cpu", torch.float64)):
        assert moved.probs.dtype == moved.sample_probs.dtype == torch.float64 and torch.equal(moved.targets, prediction.targets)
    with pytest.raises(TypeError, match="takes one dtype"):
        prediction.to(torch.float64, dtype=torch.float32)
    with pytest.raises(TypeError, match="takes a device and/or a dtype, not a tensor"):  # Tensor.to(other) cast the labels
        prediction.to(torch.zeros(1, dtype=torch.float64))
    floats = bdl.Prediction.from_logits(torch.randn(2, 3, 400))
    floats.targets = torch.tensor([290.0, 291.0, 399.0])  # float class labels stay too (bfloat16 read 291 as 292)
    assert torch.equal(floats.to(torch.bfloat16).targets, floats.targets)
    regression = bdl.Prediction.from_regression(torch.randn(2, 3, 1))
    regression.targets = torch.randn(3, 1)
    assert regression.to(torch.float64).targets.dtype == torch.float64  # a regression's targets are values
    # compared by identity, as Prediction (== compared its tensors: "ambiguous")
    report = bdl.evaluate(prediction, prediction.targets.clamp_max(4))
    assert report == report and report != bdl.evaluate(prediction, prediction.targets.clamp_max(4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_cast_prediction_keeps_the_zero_mutual_information_of_equal_samples(dtype):
    # the expected entropy was cast, the predictive entropy recomputed in the new dtype: a deterministic model's MI
    # came back as rounding noise (2e-7 in float64, 8e-3 in bfloat16) and evaluate ranked OOD inputs by it
    torch.manual_seed(0)
    logits = torch.cat([(torch.randn(1, 100, 10) * 3).expand(8, 100, 10), torch.randn(8, 20, 10)], dim=1)
    prediction = bdl.Prediction.from_logits(logits)
    cast = prediction.to(dtype)
    assert torch.equal(cast.mutual_information[:100], torch.zeros(100, dtype=dtype))
    torch.testing.assert_close(cast.mutual_information[100:].float(), prediction.mutual_information[100:], atol=1e-2, rtol=0.05)
    assert (cast.mutual_information[100:] > 0).all()
    torch.testing.assert_close(cast.expected_entropy[100:], prediction.expected_entropy[100:].to(dtype))
    assert prediction.to("meta").probs.is_meta  # no value read ("item() cannot be called on meta tensors")
    # entropies a caller set apart (an expected entropy above the predictive one: MI clipped to 0) are kept
    built = bdl.Prediction(task="classification", num_samples=5, probs=torch.tensor([[0.5, 0.5], [0.9, 0.1]]),
                           expected_entropy=torch.tensor([0.9, 0.2]))  # fmt: skip
    assert torch.equal(built.to("cpu").expected_entropy, built.expected_entropy)


def test_a_binary_classifier_with_one_logit_predicts_sigmoid_probabilities():
    # a one-column softmax gave every input probability 1: no entropy, no mutual information, nothing triaged
    torch.manual_seed(0)
    net = nn.Sequential(bdl.BayesLinear(4, 16, posterior_std_init=0.5), nn.ReLU(), bdl.BayesLinear(16, 1, posterior_std_init=0.5))
    x = torch.randn(10, 4)
    torch.manual_seed(1)
    pred = bdl.predict(net, x, num_samples=16, method="loop")
    torch.manual_seed(1)
    with torch.no_grad(), bdl.use_estimator(net, "reparam"):
        logits = torch.stack([net(x) for _ in range(16)])
    expected = bdl.Prediction.from_probs(torch.cat([1 - logits.sigmoid(), logits.sigmoid()], -1))
    torch.testing.assert_close(pred.probs, expected.probs)
    torch.testing.assert_close(pred.mutual_information, expected.mutual_information)
    assert bool((pred.mutual_information > 0).all())
    torch.testing.assert_close(bdl.Prediction.from_logits(logits).probs[:, 1], logits.sigmoid().mean(0)[:, 0])


def test_the_predictive_entropy_of_inference_tensors():
    # Lightning tests in inference mode, whose tensors have no version counter to key the kept entropy by
    with torch.inference_mode():
        pred = bdl.Prediction.from_logits(torch.randn(4, 6, 3))
    assert pred.probs.is_inference()
    torch.testing.assert_close(pred.predictive_entropy, -(pred.probs * pred.probs.log()).sum(-1))


def test_from_logits_summarises_large_inputs_in_chunks_of_samples(monkeypatch):
    # all S samples at once held ~3x the input in temporaries; chunks give the same summaries
    import sys

    logits = torch.randn(8, 50, 4)
    whole = bdl.Prediction.from_logits(logits)
    module = sys.modules["bdl.predict"]
    monkeypatch.setattr(module, "_SUMMARY_CHUNK_ELEMENTS", 3 * 50 * 4)  # chunks of 3 samples
    sizes = []
    add_logits = module._ClassificationSummary.add_logits
    monkeypatch.setattr(module._ClassificationSummary, "add_logits", lambda self, chunk: sizes.append(len(chunk)) or add_logits(self, chunk))
    chunked = bdl.Prediction.from_logits(logits)
    assert sizes == [3, 3, 2]
    probs = bdl.Prediction.from_probs(logits.softmax(-1))
    for name in ("probs", "expected_entropy", "mutual_information", "predicted_class_variance", "logits"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name))
    torch.testing.assert_close(probs.probs, whole.probs)
    assert chunked.num_samples == 8


def test_from_logits_and_from_probs_summarise_many_rows_in_blocks_of_rows(monkeypatch):
    # one sample of many rows was a chunk, whose summary held ~10 [N, C] temporaries: 7x the logits at S = 1 or 2
    import sys

    module = sys.modules["bdl.predict"]
    logits = torch.randn(2, 50, 4)
    logits[:, :5] = logits[:1, :5]  # rows alike in both samples: exactly 0 mutual information, block by block too
    whole = [bdl.Prediction.from_logits(logits, keep_samples=True), bdl.Prediction.from_probs(logits.softmax(-1), keep_samples=True)]
    monkeypatch.setattr(module, "_ROW_BLOCK_ELEMENTS", 7 * 4)  # blocks of 7 rows
    sizes = []
    add_logits = module._ClassificationSummary.add_logits
    monkeypatch.setattr(module._ClassificationSummary, "add_logits", lambda self, chunk: sizes.append(chunk.shape[1]) or add_logits(self, chunk))
    blocked = [bdl.Prediction.from_logits(logits, keep_samples=True), bdl.Prediction.from_probs(logits.softmax(-1), keep_samples=True)]
    assert sizes == [7] * 7 + [1]
    for a, b in zip(whole, blocked):
        for name in ("probs", "expected_entropy", "mutual_information", "predicted_class_variance", "logits", "sample_probs"):
            if getattr(a, name) is not None:
                torch.testing.assert_close(getattr(b, name), getattr(a, name))
        assert (b.mutual_information[:5] == 0).all() and b.num_samples == 2


def _same_prediction(model, x, **kwargs):
    torch.manual_seed(0)
    first = bdl.predict(model, x, num_samples=16, **kwargs)
    torch.manual_seed(0)
    loop = bdl.predict(model, x, num_samples=16, method="loop", **kwargs)
    return first, loop


class _Tokens(nn.Module):
    """A BayesLinear over every token of [B, T, F] inputs, then the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.layer = bdl.BayesLinear(4, 3, posterior_std_init=0.3)

    def forward(self, x):
        return self.layer(x).mean(1)


class _FlatTokens(_Tokens):
    """The same with the tokens flattened into rows first (a tagger's head): 2-D inputs, T rows per input."""

    def forward(self, x):
        return self.layer(x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1], -1).mean(1)


class _Centre(nn.Module):
    """Subtracts the batch mean: the output of a row depends on the other rows."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


class _DropConnect(nn.Module):
    """MC DropConnect written with nn.Dropout on the weight: one mask per forward, shared by the batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return nn.functional.linear(x, self.drop(self.linear.weight), self.linear.bias)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _Tokens(), "one weight draw per call"),  # the batched samples would share one weight draw
        (lambda: _FlatTokens(), "rows per input row"),  # the same, flattened: taken batched, variance 10x too small
        (lambda: bdl.MCDropout(_DropConnect()), "without the batch rows"),  # one mask for all samples: variance 0
        (lambda: bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), _Centre(), nn.Linear(16, 3))),
         "depends on the other rows of the batch"),  # the batch mean of S x B rows: MI 0.0115 against 0.021  # fmt: skip
        (lambda: bdl.MCDropout(nn.Sequential(nn.Dropout(0.3), nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3))),
         "without running statistics"),  # batch statistics of S x B rows  # fmt: skip
    ],
)
def test_models_whose_noise_is_not_drawn_row_by_row_are_sampled_by_the_loop(build, message):
    torch.manual_seed(1)
    model = build()
    x = torch.randn(6, 5, 4) if isinstance(model, _Tokens) else torch.randn(6, 4)
    first, loop = _same_prediction(model, x, task="regression" if isinstance(model, _Tokens) else "classification")
    summary = (lambda p: p.epistemic_variance) if first.task == "regression" else (lambda p: p.mutual_information)
    assert torch.equal(summary(first), summary(loop)) and bool((summary(loop) > 0).all())
    with pytest.raises(ValueError, match=message):
        bdl.predict(model, x, num_samples=4, method="batched", task=first.task)


def test_an_mc_dropout_block_inside_a_model_draws_noise_in_the_batched_path():
    # the block was taken for a deterministic prefix, run once and copied: epistemic variance exactly 0
    torch.manual_seed(0)
    model = nn.Sequential(bdl.MCDropout(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5))), nn.Linear(32, 3))
    x = torch.randn(5, 4)
    batched = bdl.predict(model, x, num_samples=64, method="batched")
    loop = bdl.predict(model, x, num_samples=64, method="loop")
    assert bool((batched.mutual_information > 0).all())
    torch.testing.assert_close(batched.mutual_information.mean(), loop.mutual_information.mean(), rtol=0.5, atol=0)


class _OwnBayesLinear(nn.Module):
    """A Bayesian layer bdl does not know of (another library's): one weight draw per forward, for every row."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.log_sigma = nn.Parameter(torch.full((n_out, n_in), -1.0))

    def forward(self, x):
        return x @ (self.mu + self.log_sigma.exp() * torch.randn_like(self.mu)).t()


class _AlwaysDropout(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)


def test_noise_bdl_does_not_know_of_takes_the_loop():
    # auto took the batched path beside a known source (MC dropout, a BayesLinear): its one forward shared the user's
    # layer's weight draw across the samples, and a Sequential ran the layers before the first known source once;
    # epistemic variance 6-20 times too small
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), _OwnBayesLinear(32, 1))
    sequential = nn.Sequential(nn.Linear(4, 32), _AlwaysDropout(), nn.ReLU(), bdl.BayesLinear(32, 1))
    x = torch.randn(4, 4)
    for model in (bdl.MCDropout(net), sequential):
        variances = {}
        for method in ("loop", "auto"):
            torch.manual_seed(0)
            variances[method] = bdl.predict(model, x, num_samples=64, task="regression", method=method).epistemic_variance
        torch.testing.assert_close(variances["auto"], variances["loop"])  # the same draws: the loop was taken
        with pytest.raises(ValueError, match=r"method='batched' would not sample this model exactly: it draws noise that bdl does not know of"):
            bdl.predict(model, x, num_samples=4, task="regression", method="batched")
    # with the known sources off: an MC dropout block inside the model is not taken for unknown noise
    inner = nn.Sequential(bdl.MCDropout(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5))), nn.Linear(32, 3))
    assert bdl.predict(inner, x, num_samples=4, method="batched").num_samples == 4


class _Shifts(nn.Module):
    """Writes into its input (x -= mu), as some models do: a probe that reused one batch saw another input twice."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        x.sub_(1.0)
        return self.body(x)


def test_the_unknown_noise_probe_is_not_fooled_by_nans_or_models_that_write_their_input_and_runs_once():
    # a NaN row (NaN != NaN) and an input edited in place were taken for noise, cached: later clean calls were
    # refused the batched path; and single-row calls ran the probe's two forwards every time
    bnn = nn.Sequential(bdl.BayesLinear(4, 16), nn.ReLU(), bdl.BayesLinear(16, 3))
    x = torch.randn(6, 4)
    x[0, 1] = float("nan")
    with pytest.raises(ValueError, match="those inputs hold NaN or Inf"):
        bdl.predict(bnn, x, num_samples=8, method="batched")
    assert bdl.predict(bnn, torch.randn(6, 4), num_samples=8, method="batched").num_samples == 8
    assert bdl.predict(bdl.MCDropout(_Shifts()), torch.randn(6, 4), num_samples=8, method="batched").num_samples == 8
    calls = []
    model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)))
    model.model[0].register_forward_hook(lambda *args: calls.append(1))
    one = torch.randn(1, 4)
    bdl.predict(model, one, num_samples=8)
    first = len(calls)
    bdl.predict(model, one, num_samples=8)
    assert len(calls) - first == 1  # the draw alone


class _BatchStandardise(nn.Module):
    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) / (x.std(0, keepdim=True) + 1e-5)


def test_rows_that_mix_are_seen_beside_an_mc_dropout_block_and_after_a_layer_is_replaced():
    # an MC dropout block inside the model kept its noise on in the probe, which then told nothing (auto took the
    # batched path: up to 27% off the loop's variance); and a verdict cached for a network was kept after one of its
    # layers was replaced by one that mixes rows (30% off)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 8), _BatchStandardise(), nn.Linear(8, 1))
    inner = nn.Sequential(bdl.MCDropout(net), nn.Flatten(0))
    with pytest.raises(ValueError, match="depends on the other rows of the batch"):
        bdl.predict(inner, torch.randn(16, 4), num_samples=4, task="regression", method="batched")
    swapped = bdl.MCDropout(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 8), nn.Identity(), nn.Linear(8, 1)))
    assert bdl.predict(swapped, torch.randn(16, 4), num_samples=4, task="regression", method="batched").num_samples == 4
    swapped.model[4] = _BatchStandardise()
    with pytest.raises(ValueError, match="depends on the other rows of the batch"):
        bdl.predict(swapped, torch.randn(16, 4), num_samples=4, task="regression", method="batched")
    # ids are reused: a layer put where a freed one was got its verdict (by id); weak references tell them apart
    swapped.model[4] = nn.Identity()
    bdl.predict(swapped, torch.randn(16, 4), num_samples=4, task="regression", method="batched")
    for _ in range(4):
        swapped.model[4] = nn.Identity()  # the verdicts' Identity freed
        swapped.model[4] = _BatchStandardise()  # perhaps at its address
        with pytest.raises(ValueError, match="depends on the other rows of the batch"):
            bdl.predict(swapped, torch.randn(16, 4), num_samples=4, task="regression", method="batched")
        swapped.model[4] = nn.Identity()
        bdl.predict(swapped, torch.randn(16, 4), num_samples=4, task="regression", method="batched")


class _OwnGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.generator)


def test_a_model_with_a_scripted_part_predicts_on_every_path():
    # the probes hooked every module: "register_forward_hook is not supported on ScriptModules" on auto and batched
    features = torch.jit.script(nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    model = nn.Sequential(features, bdl.MCDropout(nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 1))))
    for method in ("auto", "batched", "loop"):
        assert bdl.predict(model, torch.randn(8, 4), num_samples=4, task="regression", method=method).num_samples == 4


def test_noise_the_probes_seed_does_not_reach_is_the_users():
    # beside an MC dropout block, a generator of the model's own was taken for rows that mix, then (cached as "no
    # mixing") for nothing: the batched path shared a once-per-forward draw, 7-100x too little variance
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), _OwnGenerator(), nn.Linear(16, 1), nn.Flatten(0))
    for model in (nn.Sequential(bdl.MCDropout(net)), bdl.MCDropout(net)):  # one verdict, inside a model or around it
        with pytest.raises(ValueError, match="it draws noise that bdl does not know of"):
            bdl.predict(model, torch.randn(8, 4), num_samples=4, task="regression", method="batched")


class _RunningMean(nn.Module):
    """Each row averaged with the rows before it (row 0 alone): a mixing the rows after row 0 alone show."""

    def forward(self, x):
        return x.cumsum(0) / torch.arange(1, x.shape[0] + 1).unsqueeze(1)


class _KeywordTokens(_Tokens):
    def forward(self, x):
        return self.layer(input=x).mean(1)


class _KeywordDropConnect(_DropConnect):
    def forward(self, x):
        return nn.functional.linear(x, self.drop(input=self.linear.weight), self.linear.bias)


def _variances(model, batches, method, seed=0, num_samples=256):
    torch.manual_seed(seed)
    return bdl.predict(model, batches, num_samples=num_samples, task="regression", method=method).epistemic_variance


def _blank_first(x):
    return torch.cat([torch.zeros(1, x.shape[1]), x[1:]])


# each took the batched path, silently: a running mean over the batch (row 0 was the only row compared) had 100-300x
# too little variance; a first input of zeros hid a bias-free foreign layer's weight noise (half the variance); a
# layer called as layer(input=h) escaped the weight and token checks (half the variance)
@pytest.mark.parametrize(
    "build, inputs, message",
    [
        (lambda: bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), _RunningMean(), nn.Linear(16, 1))),
         lambda: torch.randn(8, 4), "depends on the other rows of the batch"),
        (lambda: bdl.MCDropout(nn.Sequential(_OwnBayesLinear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))),
         lambda: _blank_first(torch.randn(8, 4)), "it draws noise that bdl does not know of"),
        (lambda: _KeywordTokens(), lambda: torch.randn(6, 5, 4), "one weight draw per call"),
        (lambda: bdl.MCDropout(_KeywordDropConnect()), lambda: torch.randn(8, 4), "without the batch rows"),
    ],
    ids=["running mean", "zero first row", "keyword tokens", "keyword dropconnect"],
)  # fmt: skip
def test_the_probes_see_mixing_after_the_first_row_noise_behind_a_zero_first_row_and_keyword_calls(build, inputs, message):
    torch.manual_seed(0)
    model, x = build(), inputs()
    torch.testing.assert_close(_variances(model, x, "auto"), _variances(model, x, "loop"))  # the loop's draws
    with pytest.raises(ValueError, match=message):
        bdl.predict(model, x, num_samples=4, task="regression", method="batched")


class _SharedNoise(nn.Module):
    """One draw of the global generator per forward, shared by the rows (the seeded probes draw it alike)."""

    def forward(self, x):
        return x + torch.randn(1, x.shape[1])


def test_an_empty_batch_leaves_no_verdict_behind():
    # its probes of nothing were cached: "no unknown noise" took the batched path beside a noise of the user's (its
    # variance off by up to 5x), and a BayesLinear's "0 rows per input row" refused a Bayesian MLP the batched path
    x, empty = torch.randn(8, 4), torch.zeros(0, 4)
    torch.manual_seed(0)
    own = bdl.MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), _SharedNoise(), nn.Linear(8, 1), nn.Flatten(0)))
    with pytest.raises(ValueError, match="it draws noise that bdl does not know of"):
        bdl.predict(own, iter([empty, x]), num_samples=4, task="regression", method="batched")
    bnn = nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))
    prediction = bdl.predict(bnn, iter([empty, x]), num_samples=4, method="batched")
    assert prediction.num_samples == 4 and prediction.probs.shape == (8, 3)
    assert bdl.predict(bnn, x, num_samples=4, method="batched").num_samples == 4


class _NumpyNoise(nn.Module):
    def forward(self, x):
        return x + torch.from_numpy(np.random.standard_normal(x.shape)).to(x.dtype)


def test_the_probes_put_numpys_and_pythons_random_state_back():
    # with np.random.seed set before each call, the first call (its probes drew numpy's noise) gave other numbers
    model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), _NumpyNoise(), nn.Linear(8, 1), nn.Flatten(0)))
    x = torch.randn(6, 4)
    means = []
    for _ in range(3):
        np.random.seed(0)
        torch.manual_seed(0)
        means.append(bdl.predict(model, x, num_samples=8, task="regression").mean)
    assert torch.equal(means[0], means[1]) and torch.equal(means[1], means[2])


def test_ensembles_sample_their_bayesian_members_with_one_weight_draw_per_forward():
    # members kept their training estimator: a local-reparameterised convolution gave each position its own noise
    estimators = []
    members = [nn.Sequential(bdl.BayesConv2d(1, 2, 3, estimator="local"), nn.Flatten(), nn.Linear(8, 2)) for _ in range(2)]
    for member in members:
        member[0].register_forward_pre_hook(lambda module, args: estimators.append(module.estimator))
    bdl.predict(bdl.DeepEnsemble(members), torch.randn(3, 1, 4, 4), num_samples=4)
    assert estimators and set(estimators) == {"reparam"}
    assert members[0][0].estimator == "local"  # restored


def test_models_built_under_inference_mode_predict():
    # their parameters are inference tensors, without the version counter the std cache keys on
    with torch.inference_mode():
        bnn = nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))
        ensemble = bdl.DeepEnsemble([nn.Linear(4, 3), nn.Linear(4, 3)], method="vmap")
    x = torch.randn(5, 4)
    for method in ("loop", "batched"):
        assert bdl.predict(bnn, x, num_samples=4, method=method).mutual_information.shape == (5,)
    assert bdl.predict(ensemble, x).num_samples == 2


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _TokenHead(nn.Module):
    """A per-token linear layer, mean-pooled: one weight sample must serve all tokens of an input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 8] -> [B, 1]
        return self.fc(x).mean(1)


def test_a_compiled_model_is_probed_too():
    # the probe that refuses the batched path for a BayesLinear on tokens was skipped for compiled modules: 'auto'
    # took the batched path and gave every token its own noise, a third of the variance, without an error
    torch.manual_seed(0)
    bnn = bdl.bayesianize(_TokenHead(), posterior_std_init=0.5).eval()
    compiled = torch.compile(bnn, backend="eager")
    x = torch.randn(4, 16, 8)
    with pytest.raises(ValueError, match="one weight draw per call"):
        bdl.predict(compiled, x, num_samples=4, method="batched", task="regression")
    torch.manual_seed(1)
    auto = bdl.predict(compiled, x, num_samples=2000, task="regression").epistemic_variance
    # one weight sample per input: Var = 0.25 * (|mean_t x_t|^2 + 1) for std 0.5 on weights and bias
    expected = 0.25 * (x.mean(1).square().sum(-1, keepdim=True) + 1)
    assert torch.allclose(auto, expected, rtol=0.12), (auto.flatten(), expected.flatten())


class _SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.dropout, self.rnn, self.head = nn.Embedding(30, 8), nn.Dropout(0.3), nn.GRU(8, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T] -> dropout on [T, B, E], torch's RNN layout
        out, _ = self.rnn(self.dropout(self.embedding(x).transpose(0, 1)))
        return self.head(out[-1])


def test_dropout_on_sequence_first_activations_takes_the_batched_path():
    # refused before as "dropout applied to a tensor without the batch rows (e.g. a weight)": the rows were in the
    # second dimension; each row still gets its own masks, so the batched draw is the loop's distribution
    torch.manual_seed(0)
    model, x = bdl.MCDropout(_SequenceFirst()), torch.randint(0, 30, (5, 9))
    assert resolve_method(model, 5) == "batched"
    torch.manual_seed(1)
    batched = bdl.predict(model, x, num_samples=3000, method="batched", keep_samples=True).sample_probs[..., 0]
    torch.manual_seed(2)
    loop = bdl.predict(model, x, num_samples=3000, method="loop", keep_samples=True).sample_probs[..., 0]
    error = ((batched.var(0) + loop.var(0)) / 3000).sqrt()
    assert bool(((batched.mean(0) - loop.mean(0)).abs() < 4 * error).all())
    assert bool(((batched.var(0) / loop.var(0) - 1).abs() < 0.15).all())


class _WeightDropout(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear, self.dropout = nn.Linear(in_features, out_features), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # dropout on the weight: one mask per forward
        return nn.functional.linear(x, self.dropout(self.linear.weight), self.linear.bias)


@pytest.mark.parametrize("in_features", [6, 7])
@pytest.mark.parametrize("out_features", [16, 7])
def test_dropout_on_a_weight_keeps_the_loop_whatever_its_shape(in_features, out_features):
    # a weight [16, 7] has the probe's row count (7) in its second dimension, as sequence-first activations do:
    # it took the batched path, whose samples shared one mask (epistemic variance 0 against the loop's 0.035)
    model = bdl.MCDropout(nn.Sequential(_WeightDropout(in_features, out_features), nn.ReLU(), nn.Linear(out_features, 1)))
    x = torch.randn(32, in_features)
    with pytest.raises(ValueError, match="a dropout layer is applied to a tensor without the batch rows"):
        bdl.predict(model, x, num_samples=4, task="regression", method="batched")
    assert float(bdl.predict(model, x, num_samples=50, task="regression").epistemic_variance.min()) > 0


class _NormedWeightDropout(nn.Module):
    """DropConnect on a weight computed from parameters (weight_norm's): neither a Parameter nor a view of one."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer, self.dropout = nn.utils.parametrizations.weight_norm(layer), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dropout(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return nn.functional.conv2d(x, weight, self.layer.bias).flatten(1).sum(1, keepdim=True)
        return nn.functional.linear(x, weight, self.layer.bias).sum(1, keepdim=True)


@pytest.mark.parametrize(
    "layer, x_shape",
    [(lambda: nn.Linear(4, 7), (16, 4)), (lambda: nn.Linear(7, 3), (16, 7)), (lambda: nn.Conv2d(7, 4, 3), (16, 7, 3, 3))],
)
def test_dropout_on_a_computed_weight_with_the_probes_row_count_keeps_the_loop(layer, x_shape):
    # a weight_norm weight [7, 4], or a conv weight [4, 7, 3, 3], looked like the probe's 7 rows (first dimension,
    # or second of 3+): batched, every sample shared one mask, epistemic variance exactly 0
    torch.manual_seed(0)
    model, x = bdl.MCDropout(_NormedWeightDropout(layer())), torch.randn(*x_shape)
    with pytest.raises(ValueError, match="a dropout layer is applied to a tensor without the batch rows"):
        bdl.predict(model, x, num_samples=4, task="regression", method="batched")
    assert float(bdl.predict(model, x, num_samples=50, task="regression").epistemic_variance.min()) > 0


class _FlatTokenDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dropout, self.head = nn.Dropout(0.5), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 8]: dropout on the tokens flattened into rows
        return self.head(self.dropout(x.reshape(-1, x.shape[-1]))).view(x.shape[0], -1).mean(1, keepdim=True)


def test_dropout_on_tokens_flattened_into_rows_takes_the_batched_path():
    # each element still gets its own mask, as in the loop; it was refused as "a tensor without the batch rows"
    torch.manual_seed(0)
    model, x = bdl.MCDropout(_FlatTokenDropout()), torch.randn(5, 6, 8)
    assert resolve_method(model, 5) == "batched"
    torch.manual_seed(1)
    batched = bdl.predict(model, x, num_samples=3000, method="batched", task="regression", keep_samples=True)
    torch.manual_seed(2)
    loop = bdl.predict(model, x, num_samples=3000, method="loop", task="regression", keep_samples=True)
    error = ((batched.sample_means.var(0) + loop.sample_means.var(0)) / 3000).sqrt()
    assert bool(((batched.mean - loop.mean).abs() < 4 * error).all())
    assert bool(((batched.epistemic_variance / loop.epistemic_variance - 1).abs() < 0.15).all())


def test_a_binary_classifiers_logit_scores_do_not_depend_on_which_class_is_one():
    # read as (0, l), energy was -softplus(l) and max logit -max(0, l): how much an input looked like class 0, so
    # swapping the labels (l -> -l) changed their OOD AUROC (max logit 0.735 against 0.479)
    from bdl.metrics.functional import ood_score

    torch.manual_seed(0)
    logit = 4 * torch.randn(3, 50, 1)
    pred, swapped = Prediction.from_logits(logit), Prediction.from_logits(-logit)
    probs = torch.sigmoid(logit).squeeze(-1)
    torch.testing.assert_close(pred.probs, torch.stack([1 - probs, probs], -1).mean(0))  # P(y=1) = sigmoid(l)
    assert torch.equal(pred.probs, swapped.probs.flip(-1))
    for name in ("energy", "max_logit", "max_probability", "predictive_entropy", "mutual_information"):
        torch.testing.assert_close(ood_score(pred, name), ood_score(swapped, name))
    mean = logit.mean(0)  # the mean logit's two columns
    torch.testing.assert_close(ood_score(pred, "max_logit"), -mean.abs().squeeze(-1) / 2)
    torch.testing.assert_close(ood_score(pred, "energy"), -(mean.abs() / 2 + torch.log1p(torch.exp(-mean.abs()))).squeeze(-1))


def test_predictions_compare_by_identity_and_refuse_indices_of_two_dimensions():
    # == raised "Boolean value of Tensor with more than one value is ambiguous"; a [1, 2] index made probs [1, 2, C]
    pred = Prediction.from_logits(torch.randn(2, 3, 4))
    assert pred == pred and pred != Prediction.from_logits(torch.randn(2, 3, 4)) and len({pred}) == 1
    for index in (torch.tensor([[0, 1]]), np.array([[0, 1]])):
        with pytest.raises(IndexError, match="one-dimensional indices or a mask, got shape"):
            pred[index]
    assert len(pred[np.array([0, 2])]) == 2


def test_a_numpy_array_of_inputs_gets_an_error_that_says_so():
    with pytest.raises(TypeError, match="got ndarray: convert numpy arrays with torch.from_numpy"):
        bdl.predict(nn.Linear(3, 2), np.zeros((4, 3), np.float32), num_samples=1)


def test_a_network_with_dropout_and_no_wrapper_is_warned_about():
    # 30 identical forwards, mutual information exactly 0, and no word of why: MCDropout was forgotten
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    with pytest.warns(UserWarning, match="wrap it in bdl.MCDropout"):
        pred = bdl.predict(net, x, num_samples=30)
    assert float(pred.mutual_information.abs().max()) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bdl.predict(net, x, num_samples=1)  # one forward asked for
        bdl.predict(bdl.MCDropout(net), x, num_samples=4)
        bdl.predict(nn.Sequential(bdl.BayesLinear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3)), x, num_samples=4)
        bdl.predict(nn.Sequential(nn.Linear(4, 8), _AlwaysDropout(), nn.Linear(8, 3)), x, num_samples=4)  # noise of its own


class _RandomHead(nn.Module):
    """One of two heads per forward: noise of its own, of two outcomes."""

    def __init__(self):
        super().__init__()
        self.body, self.heads = nn.Linear(4, 8), nn.ModuleList([nn.Linear(8, 3) for _ in range(2)])

    def forward(self, x):
        return self.heads[int(torch.randint(0, 2, ()))](self.body(x).relu())


class _Streaming(nn.Module):
    """Keeps its recurrent state across calls, for batches of one size (a probe of 7 rows broke it)."""

    def __init__(self):
        super().__init__()
        self.cell, self.out, self.h = nn.GRUCell(4, 8), nn.Linear(8, 3), None

    def forward(self, x):
        self.h = self.cell(x, torch.zeros(x.shape[0], 8) if self.h is None else self.h)
        return self.out(self.h)


def test_a_deterministic_network_sampled_more_than_once_is_warned_about():
    # 32 identical forwards by default, the report's "Monte Carlo samples: 32", and no word of why
    x = torch.randn(5, 4)
    for net in (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 3))):
        with pytest.warns(UserWarning, match="no Bayesian layer nor MC dropout, and its samples agree: its 32 samples are one forward repeated") as caught:
            bdl.predict(net, x)
        assert caught[0].filename == __file__  # at the user's call
        with pytest.warns(UserWarning, match="its samples agree: its 4 samples"):  # drawn one at a time: told by the second
            bdl.predict(net, iter([torch.zeros(0, 4), x]), num_samples=4, chunk_size=1)  # (an empty batch tells nothing)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bdl.predict(net, x, num_samples=1)
    bnn = bdl.bayesianize(nn.Sequential(nn.Linear(4, 3)))
    with bdl.deterministic(bnn), pytest.warns(UserWarning, match=r"its Bayesian layers are held at their means \(bdl.deterministic\): its 4 samples"):
        bdl.predict(bnn, x, num_samples=4)
    # a model of a few outcomes (a random head): its first two samples agreed about half the time, drawn one at a time
    head = _RandomHead()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(10):
            torch.manual_seed(seed)
            bdl.predict(head, x, num_samples=32, chunk_size=1)
    # with dropout too: the Bayesian layers are held, not missing
    held = bdl.bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)))
    with bdl.deterministic(held), pytest.warns(UserWarning, match=r"and its Bayesian layers held at their means \(bdl.deterministic\)"):
        bdl.predict(held, x, num_samples=4)
    # read off the draws: no forward of other rows than the user's (a model keeping state across calls failed)
    streaming = _Streaming()
    rows = []
    streaming.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its state moves between calls: its samples differ, not warned
        prediction = bdl.predict(streaming, torch.randn(20, 4), num_samples=4, method="loop")
    assert prediction.probs.shape == (20, 3) and rows == [20] * 4


class _CentredTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.dropout, self.centre, self.head = nn.Embedding(50, 16), nn.Dropout(0.5), _Centre(), nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] token ids, the batch mean subtracted
        return self.head(self.centre(self.dropout(self.embedding(tokens))).mean(1))


def test_the_row_mixing_check_is_not_fooled_by_alike_rows_and_keeps_no_unknown_verdict():
    # decided from the first two rows of the first batch and cached: a constant batch first (an OOD set of zeros),
    # or one row of token ids, made it "does not mix" for good, and later calls mixed the samples' rows
    torch.manual_seed(0)
    model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), _Centre(), nn.Linear(16, 3)))
    bdl.predict(model, torch.zeros(32, 4), num_samples=2)
    with pytest.raises(ValueError, match="depends on the other rows of the batch"):
        bdl.predict(model, torch.randn(4, 4), num_samples=2, method="batched")
    tokens = bdl.MCDropout(_CentredTokens())
    bdl.predict(tokens, torch.randint(0, 50, (1, 6)), num_samples=2)  # one row of ids: nothing valid to put beside it
    with pytest.raises(ValueError, match="depends on the other rows of the batch"):
        bdl.predict(tokens, torch.randint(0, 50, (4, 6)), num_samples=2, method="batched")


def test_an_rnns_hidden_state_is_not_read_as_rows_by_the_row_mixing_check():
    # h_n [layers, B, H]: with 2 layers beside a batch of 2 its first dimension looked like the rows
    model = bdl.MCDropout(nn.GRU(8, 16, num_layers=2, dropout=0.2, batch_first=True))
    assert sys.modules["bdl.predict"]._rowwise_blocker(model, torch.randn(2, 5, 8)) is None


def test_no_dropout_warning_for_a_model_that_draws_its_own_samples():
    class Own(nn.Module):  # as an SVI module over a network with dropout: the posterior's draws, not dropout's
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.3))

        def sample_outputs(self, x, num_samples):
            return torch.stack([self.net(x) + torch.randn(x.shape[0], 3) for _ in range(num_samples)])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(bdl.predict(Own(), torch.randn(5, 4), num_samples=4).mutual_information.min()) > 0


def test_nested_list_indices_and_numpy_pairs_get_errors_that_name_them():
    pred = Prediction.from_logits(torch.randn(4, 3, 2), keep_samples=True)
    with pytest.raises(IndexError, match="one-dimensional indices or a mask, got shape"):
        pred[[[0, 1]]]  # probs [2, 2] beside sample_probs [4, 1, 2, 2]
    assert len(pred[[0, 2]]) == 2 and len(pred[[True, False, True]]) == 2 and len(pred[[]]) == 0
    with pytest.raises(TypeError, match="got tuple: convert numpy arrays with torch.from_numpy"):
        bdl.predict(nn.Linear(3, 2), (np.zeros((4, 3), np.float32), np.zeros(4, np.int64)), num_samples=1)


class _PackedLSTM(nn.Module):
    """Token ids [B, T] padded with 0, run packed: rows never interact, but the kernels are sized by their lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.dropout = nn.Embedding(20, 16, padding_idx=0), nn.Dropout(0.3)
        self.rnn, self.head = nn.LSTM(16, 24, num_layers=2, batch_first=True, dropout=0.3), nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.dropout(self.embedding(tokens)), lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0][-1])


def test_packed_sequences_are_not_taken_for_rows_that_mix():
    # row 0 beside rows of other lengths moved by 4e-9 (kernels sized by the lengths): compared bit for bit, the
    # probe refused the batched path ("depends on the other rows of the batch") and auto took the 2x slower loop
    torch.manual_seed(1)
    tokens = torch.randint(1, 20, (64, 10))
    for i, length in enumerate(torch.randint(3, 11, (64,))):
        tokens[i, length:] = 0
    model = bdl.MCDropout(_PackedLSTM())
    assert sys.modules["bdl.predict"]._mixes_rows(model.model.eval(), tokens) == (False, False)
    assert bdl.predict(model, tokens, num_samples=4, method="batched").num_samples == 4
    # an MC dropout block inside: its dropout (on, laid out by the lengths) made row 0 differ beside other rows
    assert bdl.predict(nn.Sequential(bdl.MCDropout(_PackedLSTM())), tokens, num_samples=4, method="batched").num_samples == 4


def test_a_verdict_for_a_network_alone_is_not_reused_when_other_layers_draw_noise():
    # predicted alone (its dropout off), the network's "batched is fine" was reused inside MCDropout, where dropout on
    # a weight draws one mask for every sample of a chunk (MI 0.0047 against the loop's 0.0266)
    torch.manual_seed(0)
    net, x = nn.Sequential(_WeightDropout(4, 8), nn.ReLU(), bdl.BayesLinear(8, 1)), torch.randn(16, 4)
    bdl.predict(net, x, num_samples=4, task="regression")
    with pytest.raises(ValueError, match="a dropout layer is applied to a tensor without the batch rows"):
        bdl.predict(bdl.MCDropout(net), x, num_samples=4, task="regression", method="batched")


def test_the_chunk_is_fitted_to_each_input_shape(monkeypatch):
    # fitted once per row count: a loader's long sequences after short ones of as many rows overran the 12 MiB bound
    predict_module, shapes = sys.modules["bdl.predict"], []
    default_chunk = predict_module._default_chunk
    monkeypatch.setattr(predict_module, "_default_chunk", lambda model, x, *args: shapes.append(tuple(x.shape)) or default_chunk(model, x, *args))
    model = bdl.MCDropout(nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), Lambda(lambda h: h.mean(1)), nn.Linear(16, 3)))
    bdl.predict(model, iter([torch.randn(4, 5, 8), torch.randn(4, 50, 8), torch.randn(4, 5, 8)]), num_samples=2)
    assert shapes == [(4, 5, 8), (4, 50, 8)]


def test_zero_dimensional_and_tuple_indices_are_read_or_refused():
    # pred[torch.tensor(True)] made probs [1, 5, 3]; pred[np.array(2)] made probs (3,); pred[([0, 1],)] probs [2, 3]
    pred = Prediction.from_logits(torch.randn(4, 5, 3), keep_samples=True)
    assert len(pred[np.array(2)]) == 1 and torch.equal(pred[np.array(2)].probs, pred[2].probs)
    assert torch.equal(pred[torch.tensor(-1)].probs, pred[4].probs)
    for index in (torch.tensor(True), np.array(True), np.bool_(True), torch.tensor(1.0), ([0, 1],), (0,)):
        with pytest.raises(TypeError, match="a Prediction is indexed over its inputs"):
            pred[index]


def test_a_pair_with_a_numpy_part_is_refused_before_any_forward():
    # (tensor X, numpy y) ran X as one batch, whatever batch_size, before "got ndarray"
    calls = []
    model = nn.Linear(3, 2)
    model.register_forward_hook(lambda *args: calls.append(1))
    for pair in ((torch.zeros(4, 3), np.zeros(4)), (np.zeros((4, 3), np.float32), torch.zeros(4))):
        with pytest.raises(TypeError, match="convert numpy arrays with torch.from_numpy"):
            bdl.predict(model, pair, num_samples=1)
    assert not calls


def test_running_out_of_memory_on_one_shape_shrinks_the_draws_of_the_next(monkeypatch):
    # the halving was learned per input shape: each new length of a loader paid the failed draws again (60 against 3)
    predict_module, failed = sys.modules["bdl.predict"], []
    real = predict_module.draw_samples

    def draw(model, x, count, method="loop"):
        if count * x.numel() > 4 * 8 * 12 * 4:  # 4 samples of the longest batch fit
            failed.append(count)
            raise torch.OutOfMemoryError("simulated")
        return real(model, x, count, method=method)

    monkeypatch.setattr(predict_module, "draw_samples", draw)
    model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), Lambda(lambda h: h.mean(1)), nn.Linear(8, 3)))
    bdl.predict(model, iter([torch.randn(8, length, 4) for length in range(6, 13)]), num_samples=32)
    assert len(failed) <= 4  # 32 -> 16 -> 8 -> 4 on the first shape, at most one more after


def test_masked_logits_do_not_hide_row_mixing_and_single_rows_are_not_made_up():
    # a logit masked at -1e9 made the tolerance (scaled by the largest output) about 480: the mixing was not seen,
    # and the batched path's MI came out 35% high; an x0 + 1 row beside one input row fed codes past an embedding
    class Masked(nn.Module):
        def __init__(self, fill):
            super().__init__()
            self.body, self.fill = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), _Centre(), nn.Linear(16, 4)), fill

        def forward(self, x):
            return self.body(x).masked_fill(torch.tensor([False, False, False, True]), self.fill)

    check = sys.modules["bdl.predict"]._mixes_rows
    x = torch.randn(8, 4)
    for fill in (-1e9, torch.finfo(torch.float32).min, -math.inf):
        assert check(Masked(fill).eval(), x) == (False, True)  # (unknown noise, mixes rows)
    assert check(Masked(-1e9).eval(), x[:1])[1] is None and check(Masked(-1e9).eval(), x[:1].expand(3, 4))[1] is None


def test_the_entropy_handed_out_edited_in_place_does_not_change_the_next_read():
    # kept while probs was unchanged, and handed out as it is: `h = pred.predictive_entropy; h /= math.log(C)` edited
    # every later read, and made the mutual information 0
    prediction = bdl.Prediction.from_logits(torch.randn(6, 3, 10))
    entropy, information = prediction.predictive_entropy.clone(), prediction.mutual_information.clone()
    normalised = prediction.predictive_entropy
    normalised /= math.log(10)
    torch.testing.assert_close(prediction.predictive_entropy, entropy)
    torch.testing.assert_close(prediction.mutual_information, information)
    assert prediction.predictive_entropy is prediction.predictive_entropy  # still kept between reads
    logits = torch.randn(6, 3, 10)
    fresh, entropy = bdl.Prediction.from_logits(logits), bdl.Prediction.from_logits(logits).predictive_entropy
    with torch.inference_mode():  # computed there, it has no version counter to see the edit by
        normalised = fresh.predictive_entropy
        normalised /= math.log(10)
    torch.testing.assert_close(fresh.predictive_entropy, entropy)


def test_a_regression_variance_past_the_dtypes_range_is_an_error_not_inf():
    # finite float32 means of +-2e19: the float64 moments (4e38) came back as an infinite variance and interval
    with pytest.raises(ValueError, match=r"the epistemic variance of the model's outputs overflows torch.float32 \(above 3.4e\+38\) for 1 of 1 outputs: use float64 \(model.double\(\)"):
        bdl.Prediction.from_regression(torch.tensor([[[2e19]], [[-2e19]]]))
    means, variances = torch.tensor([[[1.3e19]], [[-1.3e19]]]), torch.full((2, 1, 1), 2e38)  # each part finite, their sum not
    with pytest.raises(ValueError, match=r"the total variance of the model's outputs overflows torch.float32"):
        bdl.Prediction.from_regression(means, variances)
    wide = bdl.Prediction.from_regression(torch.tensor([[[2e19]], [[-2e19]]], dtype=torch.float64))
    assert wide.epistemic_variance.item() == pytest.approx(4e38)


def test_calls_in_a_common_random_numbers_block_draw_the_same_samples():
    torch.manual_seed(0)
    model, x = bayes_mlp(), torch.randn(40, 4)
    loader = DataLoader(TensorDataset(x), batch_size=16)  # its iterator takes a seed from the generator first
    with bdl.common_random_numbers():
        first = bdl.predict(model, x, num_samples=8, method="loop", batch_size=16)
        with bdl.common_random_numbers():  # joins the block it is in
            again = bdl.predict(model, loader, num_samples=8, method="loop")
        batched = bdl.predict(model, x[:16], num_samples=8, method="batched")
        batched_again = bdl.predict(model, x[:16], num_samples=8, method="batched")
    # every batch of both calls ran the same 8 weight samples: each input's prediction is the first call's
    assert torch.equal(again.probs, first.probs) and torch.equal(again.mutual_information, first.mutual_information)
    assert torch.equal(batched_again.probs, batched.probs)
    assert not torch.equal(batched.probs, first.probs[:16])  # another path draws otherwise from the same numbers
    fresh = bdl.predict(model, x, num_samples=8, method="loop", batch_size=16)
    assert not torch.equal(fresh.probs, first.probs)  # outside the block: draws of its own


def test_only_the_calls_draws_repeat_in_a_common_random_numbers_block():
    # the block rewound the generator for everything: a subset drawn between calls was the same every round
    torch.manual_seed(0)
    model, x = bayes_mlp(), torch.randn(100, 4)
    subsets, predictions = [], []
    torch.manual_seed(1)
    with bdl.common_random_numbers():
        for _ in range(3):
            subsets.append(torch.randperm(100)[:5])
            predictions.append(bdl.predict(model, x[:10], num_samples=4, method="loop"))
    assert len({tuple(subset.tolist()) for subset in subsets}) == 3
    assert torch.equal(predictions[1].probs, predictions[0].probs) and torch.equal(predictions[2].probs, predictions[0].probs)
    torch.manual_seed(1)  # the stream outside the calls is the one without the later calls' draws
    expected = [torch.randperm(100)[:5]]
    bdl.predict(model, x[:10], num_samples=4, method="loop")
    expected += [torch.randperm(100)[:5], torch.randperm(100)[:5]]
    assert all(torch.equal(a, b) for a, b in zip(subsets, expected))


def test_a_forward_failing_on_inputs_of_another_dtype_says_which_is_which():
    # torch's "mat1 and mat2 must have the same dtype, but got Double and Float" named neither (torch.from_numpy of
    # scikit-learn's data gives float64)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(RuntimeError) as failure:
        bdl.predict(model, torch.randn(4, 3, dtype=torch.float64), num_samples=1)
    assert failure.value.__notes__ == ["bdl.predict: the inputs are torch.float64 and the model's parameters torch.float32: pass inputs.to(torch.float32)"]
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(RuntimeError) as failure:
        bdl.predict(conv, torch.randn(2, 1, 5, 5, dtype=torch.float64), num_samples=1, task="regression")
    assert failure.value.__notes__[0].startswith("bdl.predict: the inputs are torch.float64 and the model's parameters torch.float32")
    for inputs in (torch.randn(4, 5), torch.randn(4, 5, dtype=torch.float64).numpy()):  # errors of shapes: no note
        with pytest.raises(RuntimeError) as failure:
            bdl.predict(nn.Sequential(Cast(), model), torch.as_tensor(inputs), num_samples=1)
        assert not getattr(failure.value, "__notes__", [])


class Cast(nn.Module):
    """A model that takes inputs of any floating dtype."""

    def forward(self, x):
        return x.float()


def test_fractional_targets_beside_class_probabilities_are_refused():
    # a mean-only regressor predicted without task=: its [B, 1] means were read as a binary classifier's logits,
    # without a word, until bdl.evaluate refused the targets
    net = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8)
    with pytest.raises(ValueError, match=r"task='classification' \(the default task; a \[B, 1\] output is then a binary classifier's logit\), but the targets hold fractional values such as .*pass task='regression'"):
        bdl.predict(net, (x, y), num_samples=1)
    with pytest.raises(ValueError, match=r"task='classification', but the targets hold fractional"):
        bdl.predict(net, DataLoader(TensorDataset(x, y), batch_size=4), num_samples=1, task="classification")
    assert bdl.predict(net, (x, y), num_samples=1, task="regression").mean.shape == (8, 1)
    labels = (y > 0).float()  # float labels 0. and 1.: read as labels, as before
    assert torch.equal(bdl.predict(net, (x, labels), num_samples=1).targets, labels)
    # soft labels, which ELBOLoss trains on: kept as before ([N, C] class probabilities, a binary model's [N] in [0, 1])
    soft = torch.softmax(torch.randn(8, 4), -1)
    assert torch.equal(bdl.predict(nn.Linear(3, 4), (x, soft), num_samples=1, task="classification").targets, soft)
    binary = torch.rand(8)
    assert torch.equal(bdl.predict(net, (x, binary), num_samples=1).targets, binary)
    # multi-output regression read as 4 classes: [N, D] means that are no rows of class probabilities
    with pytest.raises(ValueError, match=r"task='classification' \(the default task\), but the targets hold fractional values"):
        bdl.predict(nn.Linear(3, 4), (x, torch.randn(8, 4)), num_samples=1)
    with pytest.raises(ValueError, match="no class labels nor rows of class probabilities"):
        bdl.predict(nn.Linear(3, 4), (x, torch.rand(8, 4)), num_samples=1)  # in [0, 1], rows not summing to 1
