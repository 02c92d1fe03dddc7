"""bdl/metrics/functional/classification.py and bdl/metrics/classification.py."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_accuracy,
    multiclass_calibration_error,
)

import bdl.metrics
from bdl.metrics import ECE, MCE, NLL, AdaptiveECE, BrierScore, ClasswiseECE
from bdl.metrics import functional as M


def random_probs(num_examples, num_classes, *, sharpness=3.0, generator=None, dtype=torch.float32):
    logits = sharpness * torch.randn(num_examples, num_classes, generator=generator, dtype=torch.float64)
    return torch.softmax(logits, dim=1).to(dtype)


def sample_labels(probs, generator=None):
    return torch.multinomial(probs.double(), 1, generator=generator).squeeze(1)


def overconfident(num_examples=4000, num_classes=5, factor=3.0):
    """Labels drawn from softmax(f), probabilities softmax(factor * f): an overconfident model."""
    logits = torch.randn(num_examples, num_classes)
    target = sample_labels(torch.softmax(logits, dim=1))
    return torch.softmax(factor * logits, dim=1), target


# --- agreement with reference implementations ---


@pytest.mark.parametrize("num_classes", [2, 3, 10])
@pytest.mark.parametrize("n_bins", [1, 5, 15, 30])
def test_ece_and_mce_match_torchmetrics(num_classes, n_bins):
    probs, target = overconfident(1000, num_classes, factor=1.7)
    for norm, function in (("l1", M.ece), ("max", M.mce)):
        expected = multiclass_calibration_error(probs, target, num_classes=num_classes, n_bins=n_bins, norm=norm)
        torch.testing.assert_close(function(probs, target, n_bins=n_bins), expected, atol=1e-6, rtol=0)


def test_ece_matches_torchmetrics_when_confidences_sit_on_bin_edges():
    n_bins = 10
    edges = torch.linspace(0, 1, n_bins + 1)
    confidence = edges[(edges >= 0.5) & (edges < 1)].repeat(7)  # 0.5, 0.6, ..., 0.9, each on an edge
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    target = (torch.arange(len(confidence)) % 3 == 0).long()
    expected = multiclass_calibration_error(probs, target, num_classes=2, n_bins=n_bins, norm="l1")
    torch.testing.assert_close(M.ece(probs, target, n_bins=n_bins), expected, atol=1e-6, rtol=0)
    bins = M.calibration_bins(probs, target, n_bins=n_bins)
    assert bins.count[5:].tolist() == [7.0] * 5  # an edge value belongs to the bin above it


def test_saturated_confidences_match_torchmetrics_when_the_top_bin_is_overconfident():
    probs, target = overconfident(3000, 4, factor=30.0)  # many rows round to exactly [1, 0, 0, 0]
    assert (probs.max(dim=1).values == 1).sum() > 500
    expected = multiclass_calibration_error(probs, target, num_classes=4, n_bins=15, norm="l1")
    torch.testing.assert_close(M.ece(probs, target, n_bins=15), expected, atol=1e-6, rtol=0)


def test_confidence_one_shares_the_top_bin_unlike_torchmetrics_extra_bin():
    # top bin: two underconfident examples (confidence 0.95, both right) and one at confidence 1 that is wrong
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [1.0, 0.0], [0.3, 0.7]])
    target = torch.tensor([0, 0, 1, 1])
    # one top bin: confidence (0.95 + 0.95 + 1) / 3, accuracy 2/3, weight 3/4; bin [0.6, 0.8): 0.7 vs 1
    expected = 0.75 * abs(2.9 / 3 - 2 / 3) + 0.25 * 0.3
    assert M.ece(probs, target, n_bins=5).item() == pytest.approx(expected, abs=1e-6)
    torchmetrics_value = multiclass_calibration_error(probs, target, num_classes=2, n_bins=5, norm="l1").item()
    assert torchmetrics_value == pytest.approx(0.5 * 0.05 + 0.25 * 1 + 0.25 * 0.3, abs=1e-6)


def test_classwise_ece_is_the_mean_of_torchmetrics_binary_calibration_errors():
    probs, target = overconfident(1500, 4, factor=2.0)
    per_class = [binary_calibration_error(probs[:, k].contiguous(), (target == k).long(), n_bins=10) for k in range(4)]
    torch.testing.assert_close(M.classwise_ece(probs, target, n_bins=10), torch.stack(per_class).mean(), atol=1e-6, rtol=0)


def test_certain_right_predictions_have_nll_plus_zero_and_classwise_ece_takes_numpy_class_counts():
    # -0.0 was printed "-0.0000" in the report; numpy's integers were "not an integer" for num_classes
    value = M.nll(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert value.item() == 0.0 and math.copysign(1.0, value.item()) == 1.0
    metric = ClasswiseECE(np.int64(3), n_bins=5)
    probs, target = overconfident(200, 3)
    metric.update(probs, target)
    assert metric.num_classes == 3 and type(metric.num_classes) is int
    torch.testing.assert_close(metric.compute(), M.classwise_ece(probs, target, n_bins=5).double())


def test_nll_matches_sklearn_log_loss_above_its_clipping_epsilon():
    probs = random_probs(300, 6, dtype=torch.float64)
    target = sample_labels(probs)
    expected = log_loss(target.numpy(), probs.numpy(), labels=list(range(6)))
    assert M.nll(probs, target).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_nll_counts_confident_mistakes_in_full_and_a_zero_probability_finitely(dtype):
    # p = 1e-20 costs 46.05 nats (sklearn's clip at eps would charge 15.9 in float32, 36.0 in float64); a
    # zero costs -log(tiny) of float32 or float64 (half types are read in float32), never inf
    probs = torch.tensor([[1e-20, 1.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    target = torch.tensor([0, 0, 0])
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    half_probs = dtype in (torch.float16, torch.bfloat16)
    first = -math.log(tiny) if dtype == torch.float16 else 46.0517  # float16 holds no 1e-20: it rounds to 0
    expected = (first - math.log(tiny) + math.log(2)) / 3
    value = M.nll(probs.to(dtype), target)
    assert value.dtype == (torch.float32 if half_probs else dtype)
    assert value.item() == pytest.approx(expected, rel=1e-2 if half_probs else 1e-5)


def test_brier_score_matches_sklearn_multiclass_and_twice_the_binary_score():
    probs = random_probs(400, 5, dtype=torch.float64)
    target = sample_labels(probs)
    expected = brier_score_loss(target.numpy(), probs.numpy(), labels=list(range(5)), scale_by_half=False)
    assert M.brier_score(probs, target).item() == pytest.approx(expected, rel=1e-10)
    binary = random_probs(400, 2, dtype=torch.float64)
    labels = sample_labels(binary)
    assert M.brier_score(binary, labels).item() == pytest.approx(2 * brier_score_loss(labels.numpy(), binary[:, 1].numpy()), rel=1e-10)


def test_accuracy_matches_torchmetrics_micro_accuracy():
    probs, target = overconfident(500, 7)
    expected = multiclass_accuracy(probs, target, num_classes=7, average="micro")
    torch.testing.assert_close(M.accuracy(probs, target), expected)


def test_adaptive_ece_matches_a_direct_numpy_equal_mass_binning():
    probs, target = overconfident(1003, 3, factor=2.5)  # 1003 examples: groups of 67 and 66
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == target).numpy().astype(float)
    order = np.argsort(confidence.numpy(), kind="stable")
    for n_bins in (15, 400, 1003, 5000):  # bins summed by a cumulative sum (a Python loop over them took 1.7 s for 1e5)
        expected = sum(
            len(group) * abs(confidence.numpy()[group].mean() - correct[group].mean())
            for group in np.array_split(order, min(n_bins, len(order)))
        ) / len(order)
        assert M.adaptive_ece(probs, target, n_bins=n_bins).item() == pytest.approx(expected, abs=1e-6)


def test_adaptive_ece_of_a_calibrated_tie_group_is_zero():
    # 1000 predictions at 0.9, 90% right: ties were broken wrong-first, cutting the group into an all-wrong and an
    # all-right bin (0.17); each tied example now counts with its group's accuracy
    probs = torch.tensor([[0.9, 0.1]]).repeat(1000, 1)
    target = (torch.arange(1000) % 10 == 0).long()  # 100 wrong
    assert M.adaptive_ece(probs, target, n_bins=15).item() < 1e-6
    streaming = AdaptiveECE(n_bins=15)
    streaming.update(probs[:300], target[:300])
    streaming.update(probs[300:], target[300:])
    assert streaming.compute().item() < 1e-6
    # a group of two ties across a boundary (bins of 2): its accuracy 1/2 on both sides
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.7, 0.3], [0.8, 0.2]])
    expected = (abs(1.3 - 1.5) + abs(1.5 - 1.5)) / 4  # bins {0.6 right, 0.7 half}, {0.7 half, 0.8 right}
    assert M.adaptive_ece(probs, torch.tensor([0, 0, 1, 0]), n_bins=2).item() == pytest.approx(expected)


def test_over_and_underconfidence_split_ece_and_give_the_direction():
    probs, target = overconfident(3000, 5, factor=3.0)
    over, under = M.overconfidence(probs, target), M.underconfidence(probs, target)
    torch.testing.assert_close(over + under, M.ece(probs, target))
    mean_confidence_minus_accuracy = probs.max(dim=1).values.mean() - M.accuracy(probs, target)
    torch.testing.assert_close(over - under, mean_confidence_minus_accuracy, atol=1e-6, rtol=0)
    assert over > 0.1 and under < 0.01  # sharpened logits: overconfident
    soft_probs, soft_target = overconfident(3000, 5, factor=0.3)
    assert M.underconfidence(soft_probs, soft_target) > 0.1 > M.overconfidence(soft_probs, soft_target)


# --- properties ---


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(2, 10),
    sharpness=st.floats(0.1, 5.0),
    n_bins=st.integers(5, 20),
)
def test_perfectly_calibrated_labels_have_ece_near_zero(seed, num_classes, sharpness, n_bins):
    # Labels drawn from the probabilities make every bin calibrated in expectation. Per bin the gap
    # |acc_b - conf_b| has standard deviation <= 1/(2 sqrt(n_b)), so by Cauchy-Schwarz
    # E[ECE] <= sum_b (n_b / N) / (2 sqrt(n_b)) <= sqrt(n_bins / N) / 2 <= 0.016 for N = 20000 and 20 bins.
    # A tolerance of 0.03 is about twice that bound; the overconfident control below sits near 0.2.
    generator = torch.Generator().manual_seed(seed)
    probs = random_probs(20000, num_classes, sharpness=sharpness, generator=generator)
    target = sample_labels(probs, generator)
    assert M.ece(probs, target, n_bins=n_bins) < 0.03
    assert M.adaptive_ece(probs, target, n_bins=n_bins) < 0.03
    assert M.classwise_ece(probs, target, n_bins=n_bins) < 0.03


def test_miscalibrated_control_fails_the_calibrated_tolerance():
    probs, target = overconfident(20000, 5, factor=3.0)
    assert M.ece(probs, target) > 0.15


METRICS = [M.accuracy, M.nll, M.brier_score, M.ece, M.mce, M.adaptive_ece, M.classwise_ece, M.overconfidence]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_examples=st.integers(1, 60), num_classes=st.integers(2, 5))
def test_metrics_are_invariant_to_permuting_examples(seed, num_examples, num_classes):
    generator = torch.Generator().manual_seed(seed)
    # round the probabilities so that ties in confidence are common
    probs = random_probs(num_examples, num_classes, generator=generator, dtype=torch.float64)
    probs = (probs * 4).round() + 0.01
    probs = probs / probs.sum(dim=1, keepdim=True)
    target = torch.randint(num_classes, (num_examples,), generator=generator)
    permutation = torch.randperm(num_examples, generator=generator)
    for metric in METRICS:
        torch.testing.assert_close(metric(probs[permutation], target[permutation]), metric(probs, target))


# --- bad input ---


@pytest.mark.parametrize(
    "probs, target, error, message",
    [
        (torch.tensor([[0.6, 0.6]]), torch.tensor([0]), ValueError, "sum to 1"),
        (torch.tensor([[1.2, -0.2]]), torch.tensor([0]), ValueError, r"in \[0, 1\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), ValueError, r"labels in \[0, 1\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([-1]), ValueError, r"labels in \[0, 1\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), ValueError, r"shape \[N\] = \[1\]"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), ValueError, r"shape \[N, C\]"),
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), ValueError, "finite"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), TypeError, "integer class labels"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "at least one example"),
    ],
)
def test_bad_input_raises_a_clear_error(probs, target, error, message):
    for metric in (M.ece, M.nll, M.brier_score, M.accuracy):
        with pytest.raises(error, match=message):
            metric(probs, target)


def test_probability_sum_tolerance_is_as_documented():
    ok = torch.tensor([[0.5004, 0.4995]])  # off by 1e-4 < 1e-3
    assert M.nll(ok, torch.tensor([0])) > 0
    with pytest.raises(ValueError, match=r"tolerance 0.001"):
        M.nll(torch.tensor([[0.502, 0.5]]), torch.tensor([0]))


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_n_bins_must_be_a_positive_integer(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), n_bins=n_bins)


# --- streaming classes ---


@pytest.mark.parametrize(
    "metric, function",
    [
        (NLL(), M.nll),
        (BrierScore(), M.brier_score),
        (ECE(n_bins=12), lambda p, t: M.ece(p, t, n_bins=12)),
        (MCE(n_bins=12), lambda p, t: M.mce(p, t, n_bins=12)),
        (ClasswiseECE(num_classes=4, n_bins=12), lambda p, t: M.classwise_ece(p, t, n_bins=12)),
        (AdaptiveECE(n_bins=12), lambda p, t: M.adaptive_ece(p, t, n_bins=12)),
    ],
)
def test_streaming_metric_over_batches_equals_the_functional_on_all_data(metric, function):
    probs, target = overconfident(1000, 4, factor=2.0)
    for batch in range(0, 1000, 128):
        metric.update(probs[batch : batch + 128], target[batch : batch + 128])
    assert metric.compute().item() == pytest.approx(function(probs, target).item(), abs=1e-6)
    metric.reset()
    metric.update(probs[:100], target[:100])
    assert metric.compute().item() == pytest.approx(function(probs[:100], target[:100]).item(), abs=1e-6)


def test_streaming_states_merge_like_a_multi_process_sync():
    probs, target = overconfident(600, 3)
    first, second = ECE(n_bins=10), ECE(n_bins=10)
    first.update(probs[:250], target[:250])
    second.update(probs[250:], target[250:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(M.ece(probs, target, n_bins=10).item(), abs=1e-6)


def test_streaming_metric_validates_its_batches():
    with pytest.raises(ValueError, match="sum to 1"):
        ECE().update(torch.tensor([[0.9, 0.9]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="4 columns"):
        ClasswiseECE(num_classes=4).update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    assert math.isclose(NLL().higher_is_better, False) and repr(ECE(n_bins=7)) == "ECE(n_bins=7)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibration_bin_counts_stay_exact_in_half_precision(dtype):
    probs = torch.softmax(0.01 * torch.randn(70_001, 2), dim=1)  # every confidence in one bin
    target = torch.randint(0, 2, (70_001,))
    count = M.calibration_bins(probs.to(dtype), target, n_bins=5).count
    assert count.dtype == torch.int64 and count.tolist() == M.calibration_bins(probs, target, n_bins=5).count.tolist()
    assert int(count.sum()) == 70_001  # float16 made it inf, bfloat16 rounded it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streaming_states_keep_their_dtype_when_the_module_holding_them_is_cast(dtype):
    # Lightning's "16-true" / "bf16-true" precision calls .to(dtype) on the LightningModule and its metrics: a float16
    # count reached inf after 65504 examples (the NLL read 0), a bfloat16 one stopped growing at 256 batches of 64
    def state_dtypes(metric):
        return {key: [t.dtype for t in value] if isinstance(value, list) else value.dtype for key, value in metric.metric_state.items()}

    for name in bdl.metrics._CLASSES:  # every streaming metric bdl has
        metric = getattr(bdl.metrics, name)(**({"num_classes": 2} if name == "ClasswiseECE" else {}))
        dtypes = state_dtypes(metric)
        assert state_dtypes(metric.to(dtype)) == dtypes, name
    probs = torch.softmax(torch.randn(70_000, 2), dim=1)
    target = torch.randint(0, 2, (70_000,))
    nll, ece = NLL().to(dtype), ECE(n_bins=10).to(dtype)
    for batch in range(0, 70_000, 7000):
        nll.update(probs[batch : batch + 7000], target[batch : batch + 7000])
        ece.update(probs[batch : batch + 7000], target[batch : batch + 7000])
    assert nll.compute().item() == pytest.approx(M.nll(probs, target).item(), abs=1e-6)
    assert ece.compute().item() == pytest.approx(M.ece(probs, target, n_bins=10).item(), abs=1e-6)
    assert NLL().set_dtype(torch.float32).nll_count.dtype == torch.float32  # torchmetrics' way to cast them, kept
    # cast after updates: the values as they were (a round trip through the dtype rounded them), .half() too
    for cast in (lambda m: m.to(dtype), lambda m: m.half() if dtype == torch.float16 else m.bfloat16()):
        holder = nn.ModuleDict({"nll": NLL()})
        holder["nll"].update(probs, target)
        total = holder["nll"].nll_total.item()
        assert cast(holder)["nll"].nll_total.item() == total and holder["nll"].nll_count.item() == 70_000


def test_streaming_nll_and_brier_take_what_the_functions_take():
    probs, target = [[0.7, 0.3], [0.2, 0.8]], [0, 1]
    for metric, function in ((NLL(), M.nll), (BrierScore(), M.brier_score)):
        metric.update(probs, target)
        metric.update(np.array(probs), np.array(target))
        assert metric.compute().item() == pytest.approx(function(probs, target).item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streaming_nll_and_brier_of_half_batches_add_unrounded_values(dtype):
    # each batch's value was rounded to the half dtype (NLL off by 6e-4 relative in bfloat16), and the Brier
    # score's squared errors were summed over classes in it
    generator = torch.Generator().manual_seed(0)
    probs = random_probs(1000, 10, generator=generator, dtype=dtype)
    target = sample_labels(probs.float(), generator=generator)
    wide_probs = probs.double()
    exact_nll = -wide_probs[torch.arange(1000), target].log().mean()
    exact_brier = (wide_probs - torch.nn.functional.one_hot(target, 10)).square().sum(1).mean()
    for metric, exact in ((NLL(), exact_nll), (BrierScore(), exact_brier)):
        for start in range(0, 1000, 100):
            metric.update(probs[start : start + 100], target[start : start + 100])
        assert metric.compute().item() == pytest.approx(exact.item(), rel=1e-6)
    brier = M.brier_score(probs, target)  # rounded once, at the end, to float32
    assert brier.dtype == torch.float32 and brier.item() == pytest.approx(exact_brier.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_probabilities_give_float32_values(dtype):
    # bfloat16 reported an accuracy of 506/5000 = 0.1012 as 0.1016, the ECEs and bins in 8 bits
    generator = torch.Generator().manual_seed(0)
    probs = random_probs(5000, 10, generator=generator, dtype=dtype)
    target = sample_labels(probs.float(), generator=generator)
    for name in ("accuracy", "nll", "brier_score", "ece", "mce", "adaptive_ece", "classwise_ece"):
        value = getattr(M, name)(probs, target)
        assert value.dtype == torch.float32, name
    bins = M.calibration_bins(probs, target)
    assert bins.confidence.dtype == bins.accuracy.dtype == torch.float32
    wide = probs.double()
    assert M.accuracy(probs, target).item() == pytest.approx((wide.argmax(1) == target).double().mean().item(), rel=1e-7)
    assert M.nll(probs, target).item() == pytest.approx(-wide[torch.arange(5000), target].log().mean().item(), rel=1e-6)
    confidence, predicted = wide.max(1)
    index = (torch.bucketize(confidence, torch.linspace(0, 1, 16, dtype=torch.float64), right=True) - 1).clamp(0, 14)
    gaps = torch.zeros(15, dtype=torch.float64).index_add_(0, index, confidence - (predicted == target).double())
    assert M.ece(probs, target).item() == pytest.approx(gaps.abs().sum().item() / 5000, rel=1e-5)


def test_a_metric_collection_keeps_nll_and_brier_apart_after_a_confidently_right_first_batch():
    # both running sums were 0 after it (saturated softmax): torchmetrics merged the two into one compute group
    from torchmetrics import MetricCollection

    collection = MetricCollection({"nll": NLL(), "brier": BrierScore()})
    first = torch.tensor([[20.0, 0.0], [0.0, 20.0]]).softmax(-1), torch.tensor([0, 1])
    second = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]]), torch.tensor([0, 0, 0])
    collection.update(*first)
    collection.update(*second)
    values = collection.compute()
    probs, target = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    torch.testing.assert_close(values["nll"], M.nll(probs, target).double())
    torch.testing.assert_close(values["brier"], M.brier_score(probs, target).double())


def test_half_precision_bins_are_equal_width():
    # the edges were built in bfloat16: widths 0.0625-0.0703 where 1/15 was meant
    probs = torch.softmax(2 * torch.randn(500, 4), -1)
    target = torch.randint(0, 4, (500,))
    bins = M.calibration_bins(probs.bfloat16(), target, n_bins=15)
    assert bins.edges.dtype == torch.float32
    torch.testing.assert_close(torch.diff(bins.edges), torch.full((15,), 1 / 15), atol=1e-6, rtol=0)
    confidence = probs.bfloat16().max(1).values.float()
    expected = torch.bincount((torch.bucketize(confidence, torch.linspace(0, 1, 16), right=True) - 1).clamp(0, 14), minlength=15)
    assert torch.equal(bins.count, expected)


def test_adaptive_ece_takes_a_half_precision_batch_before_float32_ones():
    # compute re-checked the concatenated probabilities at float32's tolerance, which bf16 rows miss
    logits = torch.randn(64, 10)
    target = torch.randint(0, 10, (64,))
    metric = AdaptiveECE(n_bins=5)
    low = logits[:32].softmax(-1).bfloat16()
    assert (low.float().sum(-1) - 1).abs().max() > 1e-3  # the bf16 rows are off by more than float32 allows
    metric.update(low, target[:32])
    metric.update(logits[32:].softmax(-1), target[32:])
    expected = M.adaptive_ece(torch.cat([low.float() / low.float().sum(-1, keepdim=True), logits[32:].softmax(-1)]), target, n_bins=5)
    torch.testing.assert_close(metric.compute(), expected, atol=2e-3, rtol=0)  # the bf16 confidences as given


def test_adaptive_ece_keeps_two_numbers_per_example_whatever_the_classes():
    # it kept every [B, C] batch: 782 MiB for 51,200 examples of 4,000 classes
    metric = AdaptiveECE()
    metric.update(torch.softmax(torch.randn(100, 1000), -1), torch.randint(0, 1000, (100,)))
    assert sum(t.numel() for name in ("confidence", "correct") for t in getattr(metric, name)) == 200


def test_streaming_metrics_computed_before_any_example_say_so():
    # a mean of nothing was NaN, an MCE of nothing 0.0 (a perfect score), a buffered metric failed in torchmetrics
    import warnings

    import bdl.metrics as BM

    metrics = [BM.MCE(), BM.ECE(), BM.NLL(), BM.BrierScore(), BM.ClasswiseECE(3), BM.AdaptiveECE(), BM.GaussianNLL(), BM.CRPS(),
               BM.IntervalCoverage(), BM.QuantileCalibrationError(), BM.OODAUROC(), BM.AURC()]  # fmt: skip
    for metric in metrics:
        with warnings.catch_warnings(), pytest.raises(ValueError, match=rf"{type(metric).__name__}.compute\(\) before any example"):
            warnings.simplefilter("ignore")  # torchmetrics' own "compute before update" warning
            metric.compute()


@pytest.mark.parametrize("metric", [NLL, BrierScore, ECE, MCE, AdaptiveECE, lambda: ClasswiseECE(num_classes=3)])
def test_an_empty_batch_adds_nothing(metric):
    # a masked batch (probs[mask]) can be empty: it raised "must hold at least one example", where torchmetrics'
    # own metrics take it
    probs, target = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]), torch.tensor([0, 2])
    with_empty, without = metric(), metric()
    with_empty.update(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with_empty.update(probs, target)
    without.update(probs, target)
    # called on an empty batch (torchmetrics' forward): NaN, and the state is kept (it raised, and lost the state)
    assert with_empty(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).isnan()
    assert torch.equal(with_empty.compute(), without.compute())
    with pytest.raises(ValueError, match="at least one example"):  # empty probs for one label: a mismatch
        metric().update(torch.empty(0, 3), torch.tensor([1]))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_labels_are_labels(dtype):
    # numpy's unsigned labels became torch.uint32 and were refused as "not integer class labels"
    probs, target = torch.tensor([[0.7, 0.3], [0.2, 0.8]]), np.array([0, 1])
    assert M.nll(probs, target.astype(dtype)) == M.nll(probs, torch.from_numpy(target))


def test_integer_one_hot_probabilities_score_as_their_float_form():
    # read in float64 since integer targets are, their log's floor (float64's tiny) gave an NLL of 236 for 29
    probs = torch.tensor([[1, 0], [0, 1], [1, 0]])
    labels = torch.tensor([0, 0, 0])
    assert bdl.metrics.functional.nll(probs, labels).item() == pytest.approx(bdl.metrics.functional.nll(probs.float(), labels).item())
