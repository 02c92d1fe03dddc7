"""bdl/metrics/functional/selective.py and bdl/metrics/selective.py."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdl.metrics import AURC
from bdl.metrics import functional as M


def brute_force_risks(confidence, loss):
    """Selective risk for n = 1..N in one sorted order (most confident first), by plain loops."""
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    return [sum(loss[i] for i in order[:n]) / n for n in range(1, len(order) + 1)]


def test_curve_and_aurc_match_brute_force_without_ties():
    confidence, loss = torch.rand(40).tolist(), (torch.rand(40) > 0.6).float().tolist()
    coverage, risk = M.risk_coverage_curve(torch.tensor(confidence), torch.tensor(loss))
    expected = brute_force_risks(confidence, loss)
    assert risk.tolist() == pytest.approx(expected, abs=1e-12)
    assert coverage.tolist() == pytest.approx([n / 40 for n in range(1, 41)])
    assert M.aurc(torch.tensor(confidence), torch.tensor(loss)).item() == pytest.approx(sum(expected) / 40)


def test_ties_give_the_average_over_every_order_within_tie_groups():
    confidence = [0.9, 0.5, 0.9, 0.5, 0.5, 0.2, 0.9]
    loss = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # brute force: every ordering of the inputs consistent with descending confidence, equally weighted
    groups = [[i for i, c in enumerate(confidence) if c == value] for value in sorted(set(confidence), reverse=True)]
    curves = []
    for orders in itertools.product(*(itertools.permutations(group) for group in groups)):
        ranked = [i for order in orders for i in order]
        curves.append([sum(loss[i] for i in ranked[:n]) / n for n in range(1, 8)])
    expected = [sum(column) / len(curves) for column in zip(*curves)]
    _, risk = M.risk_coverage_curve(torch.tensor(confidence), torch.tensor(loss))
    assert risk.tolist() == pytest.approx(expected, abs=1e-12)
    assert M.aurc(torch.tensor(confidence), torch.tensor(loss)).item() == pytest.approx(sum(expected) / 7, abs=1e-12)


def test_risk_at_coverage_and_coverage_at_risk_match_brute_force():
    confidence, loss = torch.rand(53), (torch.rand(53) > 0.7).float()
    risks = brute_force_risks(confidence.tolist(), loss.tolist())
    for coverage in (1e-12, 0.1, 0.5, 0.9, 1.0):  # 1e-12: one input (it rounded to none, the last risk)
        accepted = max(1, -(-round(coverage * 53 * 1e6) // 1_000_000))  # ceil without float noise
        assert M.risk_at_coverage(confidence, loss, coverage=coverage).item() == pytest.approx(risks[accepted - 1])
    for target_risk in (0.0, 0.1, 0.2, 0.5):
        feasible = [n / 53 for n, risk in enumerate(risks, start=1) if risk <= target_risk + 1e-12]
        expected = max(feasible) if feasible else 0.0
        assert M.coverage_at_risk(confidence, loss, risk=target_risk).item() == pytest.approx(expected)


def test_coverage_at_risk_is_zero_when_even_the_most_confident_input_fails():
    assert M.coverage_at_risk(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]), risk=0.2).item() == 0.0


def test_a_boolean_0_1_error_is_a_loss():
    # the docs' loss for classification, predicted_class != target, is a bool tensor: it was refused
    confidence, wrong = torch.tensor([0.9, 0.5, 0.7, 0.2]), torch.tensor([False, True, False, True])
    assert M.aurc(confidence, wrong).item() == pytest.approx(M.aurc(confidence, wrong.double()).item(), abs=0)
    assert M.excess_aurc(confidence, wrong).item() == pytest.approx(M.excess_aurc(confidence, wrong.double()).item(), abs=0)
    metric = AURC()
    metric.update(confidence, wrong)
    assert metric.compute().item() == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)


def test_risk_at_full_coverage_is_the_mean_loss_and_an_oracle_has_zero_excess_aurc():
    loss = (torch.rand(100) > 0.7).float()
    assert M.risk_at_coverage(torch.rand(100), loss, coverage=1.0).item() == pytest.approx(loss.mean().item())
    assert M.excess_aurc(-loss, loss).item() == pytest.approx(0.0, abs=1e-15)
    assert M.excess_aurc(loss, loss).item() > 0.1  # confident exactly when wrong


def test_informative_confidence_has_lower_aurc_than_random_confidence():
    difficulty = torch.rand(2000)
    loss = (torch.rand(2000) < difficulty).float()
    assert M.aurc(-difficulty, loss) < M.aurc(torch.rand(2000), loss) - 0.1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 50))
def test_selective_metrics_are_invariant_to_permuting_inputs(seed, size):
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.randint(0, 4, (size,), generator=generator).double()  # ties are common
    loss = torch.rand(size, generator=generator, dtype=torch.float64)
    permutation = torch.randperm(size, generator=generator)
    for function in (M.aurc, M.excess_aurc, lambda c, l: M.risk_at_coverage(c, l, coverage=0.5),
                     lambda c, l: M.coverage_at_risk(c, l, risk=0.4)):
        assert function(confidence[permutation], loss[permutation]).item() == pytest.approx(
            function(confidence, loss).item(), abs=1e-12
        )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: M.aurc(torch.rand(3), torch.rand(4)), "shape mismatch"),
        (lambda: M.aurc(torch.rand(3), -torch.ones(3)), "non-negative"),
        (lambda: M.aurc(torch.zeros(0), torch.zeros(0)), "must not be empty"),
        (lambda: M.aurc(torch.tensor([float("nan")]), torch.ones(1)), "finite"),
        (lambda: M.risk_at_coverage(torch.rand(3), torch.rand(3), coverage=0.0), "coverage"),
        (lambda: M.coverage_at_risk(torch.rand(3), torch.rand(3), risk=-0.1), "risk"),
        (lambda: M.coverage_at_risk(torch.rand(3), torch.rand(3), risk=math.nan), "risk"),
        # coverage 1, which evaluate's Report.save then failed to write as JSON
        (lambda: M.coverage_at_risk(torch.rand(3), torch.rand(3), risk=math.inf), "`risk` must be a finite non-negative number, got inf"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_tensor_risk_is_refused_as_a_type():
    with pytest.raises(TypeError, match="`risk` must be a number, got Tensor"):  # was "must be a non-negative number"
        M.coverage_at_risk(torch.rand(3), torch.rand(3), risk=torch.tensor(0.4))


def test_streaming_aurc_equals_the_functional():
    confidence, loss = torch.rand(300), (torch.rand(300) > 0.5).float()
    metric = AURC()
    for batch in range(0, 300, 70):
        metric.update(confidence[batch : batch + 70], loss[batch : batch + 70])
    assert metric.compute().item() == pytest.approx(M.aurc(confidence, loss).item(), abs=1e-12)


def test_integer_confidences_keep_their_order_above_float32s_integers():
    # float32 holds 33554433 and 33554434 as one number: a tie, AURC 0.5 instead of the 0.75 of their order
    assert float(M.aurc(torch.tensor([33554433, 33554434]), torch.tensor([0, 1]))) == pytest.approx(0.75)
