"""bdl/metrics/functional/ood.py and bdl/metrics/ood.py."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from bdl.metrics import OOD_SCORES, OODAUPRIn, OODAUPROut, OODAUROC, OODFPRAtTPR, ood_score
from bdl.metrics import functional as M


def labelled(scores_in, scores_out):
    scores = torch.cat([scores_in, scores_out]).double().numpy()
    is_out = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).numpy()
    return is_out, scores


@pytest.mark.parametrize(
    "make_scores",
    [
        lambda: (torch.randn(300), torch.randn(200) + 1.0),  # continuous, overlapping
        lambda: (torch.randint(0, 5, (300,)).float(), torch.randint(2, 8, (120,)).float()),  # many ties
        lambda: (20 + torch.rand(100) * 10, 25 + torch.rand(50) * 10),  # large scores (sigmoid would tie them)
        lambda: (torch.randn(7), torch.randn(1)),  # tiny sets
    ],
)
def test_auroc_and_aupr_match_sklearn(make_scores):
    scores_in, scores_out = make_scores()
    is_out, scores = labelled(scores_in, scores_out)
    assert M.auroc(scores_in, scores_out).item() == pytest.approx(roc_auc_score(is_out, scores), abs=1e-12)
    assert M.aupr_out(scores_in, scores_out).item() == pytest.approx(average_precision_score(is_out, scores), abs=1e-12)
    assert M.aupr_in(scores_in, scores_out).item() == pytest.approx(
        average_precision_score(1 - is_out, -scores), abs=1e-12
    )


def test_perfect_reversed_and_constant_detectors():
    inside, outside = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 6.0])
    assert M.auroc(inside, outside) == 1 and M.aupr_in(inside, outside) == 1 and M.aupr_out(inside, outside) == 1
    assert M.fpr_at_tpr(inside, outside) == 0
    assert M.auroc(outside, inside) == 0 and M.fpr_at_tpr(outside, inside) == 1
    constant_in, constant_out = torch.zeros(4), torch.zeros(6)
    assert M.auroc(constant_in, constant_out) == 0.5
    assert M.aupr_out(constant_in, constant_out).item() == pytest.approx(0.6)  # chance = fraction of OOD


def test_fpr_at_95_tpr_on_a_hand_worked_example():
    # 20 in-distribution scores 1..20. Accepting 95% of them means accepting 19: threshold t = 19.
    # OOD scores: 0.5 and 19 (tied with t) are accepted, 19.5 and 25 are rejected: FPR = 2/4.
    scores_in = torch.arange(1.0, 21.0)
    scores_out = torch.tensor([0.5, 19.0, 19.5, 25.0])
    assert M.fpr_at_tpr(scores_in, scores_out).item() == 0.5
    # at 90% TPR the threshold is 18, so only 0.5 is accepted; at 100% it is 20, so three are
    assert M.fpr_at_tpr(scores_in, scores_out, tpr=0.9).item() == 0.25
    assert M.fpr_at_tpr(scores_in, scores_out, tpr=1.0).item() == 0.75
    # with 19 in-distribution inputs, 95% means ceil(18.05) = 19 of them: t = 19 again
    assert M.fpr_at_tpr(torch.arange(1.0, 20.0), scores_out).item() == 0.5
    # a tiny TPR accepts one input (t = 1): it rounded to none and took the last threshold (FPR at 100% TPR)
    assert M.fpr_at_tpr(scores_in, scores_out, tpr=1e-12).item() == 0.25


def test_fpr_at_tpr_matches_a_brute_force_threshold_search():
    scores_in, scores_out = torch.randn(137), torch.randn(91) + 1.5
    candidates = sorted(scores_in.tolist())
    threshold = next(t for t in candidates if (scores_in <= t).float().mean() >= 0.95)
    assert M.fpr_at_tpr(scores_in, scores_out).item() == pytest.approx((scores_out <= threshold).float().mean().item())


def test_roc_curve_runs_from_origin_to_one_and_integrates_to_auroc():
    scores_in, scores_out = torch.randn(50), torch.randn(40) + 0.5
    fpr, tpr = M.ood_roc_curve(scores_in, scores_out)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (torch.diff(fpr) >= 0).all() and (torch.diff(tpr) >= 0).all()
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(M.auroc(scores_in, scores_out).item())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_in=st.integers(1, 40), num_out=st.integers(1, 40))
def test_ood_metrics_are_invariant_to_permutations_and_monotone_transforms(seed, num_in, num_out):
    generator = torch.Generator().manual_seed(seed)
    scores_in = torch.randint(0, 6, (num_in,), generator=generator).double()
    scores_out = torch.randint(2, 8, (num_out,), generator=generator).double()
    reference = M.ood_metrics(scores_in, scores_out)
    shuffled = M.ood_metrics(scores_in[torch.randperm(num_in, generator=generator)],
                             scores_out[torch.randperm(num_out, generator=generator)])
    transformed = M.ood_metrics(torch.exp(scores_in / 3), torch.exp(scores_out / 3))
    for key in reference:
        assert shuffled[key] == pytest.approx(reference[key], abs=1e-12)
        assert transformed[key] == pytest.approx(reference[key], abs=1e-12)


def test_ood_metrics_names_the_fpr_key_after_the_tpr():
    assert set(M.ood_metrics(torch.randn(10), torch.randn(10), tpr=0.9)) == {
        "auroc", "aupr_in", "aupr_out", "fpr_at_90_tpr"
    }


@pytest.mark.parametrize(
    "scores_in, scores_out, message",
    [
        (torch.randn(5), torch.zeros(0), "0 OOD scores"),
        (torch.zeros(0), torch.randn(5), "0 in-distribution scores"),
        (torch.tensor([0.0, float("inf")]), torch.randn(3), "finite"),
        (torch.randn(3, 2), torch.randn(3), "1-D"),
    ],
)
def test_bad_scores_raise_clear_errors(scores_in, scores_out, message):
    for metric in (M.auroc, M.aupr_in, M.aupr_out, M.fpr_at_tpr):
        with pytest.raises(ValueError, match=message):
            metric(scores_in, scores_out)


@pytest.mark.parametrize("tpr", [0.0, 1.5, -0.1])
def test_tpr_must_be_a_fraction(tpr):
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr(torch.randn(5), torch.randn(5), tpr=tpr)


# --- OOD scores from a prediction ---


def fake_prediction(logits):
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * probs.log()).sum(-1)
    return SimpleNamespace(
        task="classification", logits=logits, max_probability=probs.max(-1).values,
        predictive_entropy=entropy, mutual_information=torch.zeros(len(logits)),
    )


def test_every_registered_score_rates_the_uncertain_input_as_more_ood():
    prediction = fake_prediction(torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.1, 0.0]]))
    for name in ("max_probability", "predictive_entropy", "energy", "max_logit"):
        scores = ood_score(prediction, name)
        assert scores[1] > scores[0], name
    logits = prediction.logits
    torch.testing.assert_close(ood_score(prediction, "energy"), -torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(ood_score(prediction, "max_logit"), -logits.max(dim=1).values)
    assert M.scores_for_task("classification") == [
        "max_probability", "predictive_entropy", "mutual_information", "energy", "max_logit"
    ]
    assert set(OOD_SCORES) == {*M.scores_for_task("classification"), *M.scores_for_task("regression")}


def test_unknown_score_and_missing_logits_raise_clear_errors():
    prediction = fake_prediction(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"unknown OOD score 'confidence'; choose one of \['energy', 'epistemic_variance', 'max_logit'"):
        ood_score(prediction, "confidence")
    prediction.logits = None
    with pytest.raises(ValueError, match="needs logits"):
        ood_score(prediction, "energy")
    with pytest.raises(ValueError, match="needs a classification Prediction"):
        ood_score(SimpleNamespace(task="regression"), "max_probability")
    with pytest.raises(ValueError, match="needs a regression Prediction"):
        ood_score(prediction, "total_variance")


def test_regression_scores_average_the_variances_over_outputs():
    variance = torch.tensor([[1.0, 3.0], [0.5, 0.5]])
    prediction = SimpleNamespace(task="regression", total_variance=variance, epistemic_variance=variance / 2)
    torch.testing.assert_close(ood_score(prediction, "total_variance"), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(ood_score(prediction, "epistemic_variance"), torch.tensor([1.0, 0.25]))


# --- streaming classes ---


def test_streaming_ood_metrics_equal_the_functional_ones_for_mixed_batches():
    scores_in, scores_out = torch.randn(300), torch.randn(200) + 1
    scores = torch.cat([scores_in, scores_out])
    is_ood = torch.cat([torch.zeros(300, dtype=torch.bool), torch.ones(200, dtype=torch.bool)])
    permutation = torch.randperm(500)
    scores, is_ood = scores[permutation], is_ood[permutation]
    pairs = [(OODAUROC(), M.auroc), (OODAUPRIn(), M.aupr_in), (OODAUPROut(), M.aupr_out),
             (OODFPRAtTPR(tpr=0.9), lambda a, b: M.fpr_at_tpr(a, b, tpr=0.9))]
    for metric, function in pairs:
        for batch in range(0, 500, 64):
            metric.update(scores[batch : batch + 64], is_ood[batch : batch + 64].long())
        assert metric.compute().item() == pytest.approx(function(scores_in, scores_out).item(), abs=1e-12)


def test_calling_a_streaming_ood_metric_on_one_sided_batches_gives_nan_batch_values_and_keeps_the_state():
    # torchmetrics' forward computes each batch's value; with one side only that raised, and the state then
    # held the failed batch alone
    scores_in, scores_out = torch.randn(30), torch.randn(20) + 1
    for metric, function in ((OODAUROC(), M.auroc), (OODFPRAtTPR(tpr=0.9), lambda a, b: M.fpr_at_tpr(a, b, tpr=0.9))):
        assert math.isnan(metric(scores_in, torch.zeros(30, dtype=torch.bool)).item())
        mixed = metric(torch.cat([scores_out[:10], scores_in[:5]]), torch.tensor([True] * 10 + [False] * 5))
        assert mixed.item() == pytest.approx(function(scores_in[:5], scores_out[:10]).item())
        metric(scores_out[10:], torch.ones(10, dtype=torch.bool))
        assert metric.update_count == 3
        expected = function(torch.cat([scores_in, scores_in[:5]]), scores_out)
        assert metric.compute().item() == pytest.approx(expected.item())
    # one side over all batches (Lightning's sanity check on a validation set with its OOD inputs last) says so
    one_sided = OODAUROC()
    one_sided.update(scores_in, torch.zeros(30, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"OODAUROC needs both sides: got 30 in-distribution scores and 0 OOD scores .*num_sanity_val_steps=0"):
        one_sided.compute()


def test_streaming_ood_metric_checks_its_labels():
    with pytest.raises(ValueError, match="only 0 and 1"):
        OODAUROC().update(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        OODAUROC().update(torch.randn(3), torch.tensor([0, 1]))
    metric = OODAUROC()
    metric.update(torch.randn(3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 OOD scores"):
        metric.compute()
    assert not math.isnan(OODFPRAtTPR().tpr)


def test_integer_scores_keep_their_order_above_float32s_integers():
    # integers were cast to float32, where 20000001 and 20000002 are one number: ties that sklearn does not see
    scores_in, scores_out = torch.tensor([20000001, 20000003]), torch.tensor([20000002, 20000004])
    labels = [0, 0, 1, 1]  # OOD inputs are the positives, scored higher
    expected = roc_auc_score(labels, torch.cat([scores_in, scores_out]).numpy())
    assert float(M.auroc(scores_in, scores_out)) == pytest.approx(expected) == 0.75


def test_a_scikit_learn_style_call_with_labels_first_is_warned_of():
    # auroc(is_out, scores), as roc_auc_score(y_true, y_score) is called, read the labels as in-distribution scores:
    # 0.5, without a word
    is_out, scores = torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    for metric in (M.auroc, M.aupr_out, M.fpr_at_tpr):
        with pytest.warns(UserWarning, match=r"take \(scores_in, scores_out\), two sets of scores .* not scikit-learn's \(labels, scores\)"):
            metric(is_out, scores)
        for labels, values in ((is_out.numpy(), scores.numpy()), (is_out.tolist(), scores.tolist())):
            with pytest.warns(UserWarning, match="pass"):
                metric(labels, values)
    assert float(M.auroc(scores[is_out == 0], scores[is_out == 1])) == 1.0  # the call the warning gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.auroc(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))  # integer scores on both sides: scores
        M.auroc(torch.tensor([0, 0, 0]), torch.tensor([0.1, 0.2, 0.3]))  # no two kinds of label
        M.auroc(torch.tensor([0.0, 1.0]), torch.tensor([0.3, 0.4]))
        # read off the dtypes first: a meta tensor kept its own error (numpy's "Cannot copy out of meta tensor"),
        # and a tensor with the negative bit its value
        assert float(M.auroc(torch.tensor([1 + 1j, 2j]).conj().imag, torch.tensor([0.3, 0.4]))) == 1.0
    with pytest.raises(ValueError, match="is on the 'meta' device"):
        M.auroc(torch.empty(4, device="meta"), scores)
    # a hint never raises: inputs it cannot read keep the metric's own answer or error (numpy's words before)
    needing_grad = [torch.tensor(0.5, requires_grad=True), torch.tensor(0.7, requires_grad=True)]
    assert float(M.auroc(needing_grad, [0.1, 0.2])) == 0.0
    with pytest.raises(TypeError, match="`scores_in` must be a tensor or array-like"):
        M.auroc([[1, 2], [3]], [0.1, 0.2])


def test_a_streaming_metric_given_its_arguments_swapped_says_so():
    # update(is_ood, scores) was told to call .bool() on the float scores
    metric = OODAUROC()
    with pytest.raises(ValueError, match=r"got dtype torch.float32 \(update takes \(scores, is_ood\): scores first\)"):
        metric.update(torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.7, 0.9]))
    with pytest.raises(ValueError, match=r"got dtype torch.float32 \(use .bool\(\)\)"):  # 0./1. labels: as before
        metric.update(torch.tensor([0.2, 0.7, 0.9]), torch.tensor([0.0, 1.0, 1.0]))
