import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from bdl.infer import PosteriorSummary
from bdl.infer.diagnostics import ess_bulk, ess_mean, ess_tail, rank_normalize, rank_r_hat

REFERENCE = np.load(Path(__file__).with_name("reference") / "diagnostics_reference.npz")
CASES = sorted(name for name in REFERENCE.files if "/" not in name)


@pytest.mark.parametrize("case", CASES)
def test_rank_diagnostics_equal_arviz(case):
    """ArviZ 0.23's rhat(method="rank"), ess(method="bulk") and ess(method="tail") on the same draws
    (tests/infer/reference/make_diagnostics_reference.py): odd and short chains, ties, one chain, heavy tails."""
    draws = torch.from_numpy(REFERENCE[case])
    r_hat, bulk, tail = REFERENCE[case + "/reference"]
    if not math.isnan(r_hat):
        assert float(rank_r_hat(draws)) == pytest.approx(r_hat, rel=1e-10)
    assert float(ess_bulk(draws)) == pytest.approx(bulk, rel=1e-10)
    assert float(ess_tail(draws)) == pytest.approx(tail, rel=1e-10)


def test_rank_r_hat_folds_about_numpys_median_as_arviz_does():
    # quantile(0.5)'s a + (b - a) / 2 rounded away from numpy's (a + b) / 2: the two central draws' distances were
    # one rounding step apart, not tied, and 66 of 1348 short chain sets missed ArviZ (1.1736 here)
    draws = torch.tensor([
        [2.0427716074923303, 0.6467029962018469, 0.6630633723762617, -0.5140063716874629, -1.6480751708556527, 0.16746474422274113,
         0.10901408782154753, -1.2273520542445742, -0.6832266617805622, -0.07204367972722743, -0.9447516230607774],
        [-0.09826996785221727, 0.09548302746945433, 0.03558623705548571, -0.5062916583143148, 0.5937480717858228, 0.8911669542823284,
         0.3208483045665637, -0.818230227390307, 0.7316522837854408, -0.5014400184670523, 0.8791606182879853],
    ], dtype=torch.float64)  # fmt: skip
    assert float(rank_r_hat(draws)) == pytest.approx(1.15386039593017, rel=1e-10)  # ArviZ 0.23.4's rhat(method="rank")


@pytest.mark.parametrize("case", CASES)
def test_ess_mean_equals_arviz(case):
    """ArviZ 0.23's ess(method="mean") (split chains, Stan's ESS): the summary's n_eff."""
    draws = torch.from_numpy(REFERENCE[case])
    assert float(ess_mean(draws)) == pytest.approx(float(REFERENCE[case + "/ess_mean"]), rel=1e-10)


def test_ess_mean_is_at_most_s_log10_s_where_pyros_ess_exceeds_the_draws():
    draws = torch.randn(4, 10, generator=torch.Generator().manual_seed(292), dtype=torch.float64)  # 40 independent draws
    assert float(effective_sample_size(draws, chain_dim=0, sample_dim=1)) > 500  # Pyro's: 569 of 40
    # Stan's cap S log10(S); ArviZ gives 64.08239965311849 for these draws
    assert float(ess_mean(draws)) == pytest.approx(40 * math.log10(40), rel=1e-12)


def test_draws_with_nan_give_nan_diagnostics_for_that_element_alone():
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 200, 3, generator=generator, dtype=torch.float64)
    draws[0, 100:, 0] = math.nan  # half of one chain
    draws[:, :, 1] = math.nan  # every draw: the rank diagnostics called each an effective draw (ESS 800 of 800)
    for diagnostic in (ess_bulk, ess_tail, rank_r_hat, ess_mean):
        values = diagnostic(draws)
        assert torch.isnan(values[:2]).all(), diagnostic.__name__  # ArviZ and Pyro: NaN
        assert float(values[2]) == pytest.approx(float(diagnostic(draws[..., 2])), rel=1e-12)
        assert not math.isnan(float(values[2]))
    # an infinite draw has a rank (ArviZ's rank diagnostics stay finite) but no mean
    infinite = draws[..., 2].clone()
    infinite[1, 7] = math.inf
    assert math.isnan(float(ess_mean(infinite)))
    assert all(math.isfinite(float(diagnostic(infinite))) for diagnostic in (ess_bulk, ess_tail, rank_r_hat))


def test_rank_r_hat_catches_a_chain_of_another_spread_that_split_r_hat_misses():
    draws = torch.from_numpy(REFERENCE["one_wider_4x200"])  # same centre, one chain 3x wider
    assert float(split_gelman_rubin(draws, chain_dim=0, sample_dim=1)) < 1.01
    assert float(rank_r_hat(draws)) > 1.1
    iid = torch.from_numpy(REFERENCE["iid_4x200"])
    assert float(rank_r_hat(iid)) < 1.01


def test_diagnostics_are_elementwise_and_nan_where_an_element_never_moves():
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(3, 80, 2, 4, generator=generator, dtype=torch.float64)
    draws[..., 1, 2] = 0.25
    for diagnostic in (rank_r_hat, ess_bulk, ess_tail):
        values = diagnostic(draws)
        assert values.shape == (2, 4) and values.dtype == torch.float64
        assert torch.isnan(values[1, 2]) and not torch.isnan(values[0, 0])
        for index in [(0, 0), (1, 3)]:  # each element's value is its own chains' alone
            assert float(values[index]) == pytest.approx(float(diagnostic(draws[(..., *index)])), rel=1e-12)
    # for independent draws the bulk ESS is near the number of draws, and near Pyro's ESS
    bulk = ess_bulk(draws)[0]
    pyro_ess = effective_sample_size(draws[..., 0, :], chain_dim=0, sample_dim=1)
    assert ((bulk / pyro_ess - 1).abs() < 0.25).all() and ((bulk / 240 - 1).abs() < 0.35).all()


def test_rank_normalize_is_blom_scores_of_average_ranks():
    z = rank_normalize(torch.tensor([[3.0, 1.0, 2.0, 2.0]]))
    ranks = torch.tensor([4.0, 1.0, 2.5, 2.5], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).icdf((ranks - 0.375) / 4.25)
    torch.testing.assert_close(z[0], expected.double())


def test_diagnostics_refuse_too_few_draws_and_bad_levels():
    with pytest.raises(ValueError, match=r"num_draws >= 4"):
        rank_r_hat(torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_chains"):
        ess_bulk(torch.randn(10))
    with pytest.raises(TypeError, match="Tensor"):
        ess_bulk(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"probs must be levels in \(0, 1\)"):
        ess_tail(torch.randn(2, 10), probs=(0.0, 0.95))


def test_ess_does_not_depend_on_the_units_of_the_draws():
    # an absolute 1e-15 threshold (ArviZ's) read draws spanning less as constant: ESS = every draw (4000 for 12)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1000, generator=generator, dtype=torch.float64)
    chains = torch.zeros_like(noise)
    for t in range(1, 1000):
        chains[:, t] = 0.99 * chains[:, t - 1] + noise[:, t]
    scales = (1.0, 1e-12, 1e-17, 1e-200, 1e200)  # squares of 1e-200 underflowed: 0 / 0
    at_scale = [float(ess_mean(chains * scale)) for scale in scales]
    assert at_scale == pytest.approx([at_scale[0]] * len(scales), rel=1e-9) and at_scale[0] < 50


def test_a_site_of_no_elements_has_empty_diagnostics():
    # quantile() of nothing, an FFT of nothing and Pyro's R-hat reshape raised
    empty = torch.randn(2, 10, 0)
    for diagnostic in (rank_r_hat, ess_bulk, ess_tail, ess_mean):
        assert diagnostic(empty).shape == (0,)
    summary = PosteriorSummary({"b": empty, "w": torch.randn(2, 10)})
    assert summary["b"]["r_hat"].shape == (0,) and math.isfinite(summary.max_r_hat)
    # one tail level as a number, as PosteriorSummary takes one quantile ("'float' object is not iterable")
    torch.testing.assert_close(ess_tail(torch.randn(2, 10, generator=torch.Generator().manual_seed(1)), probs=0.1),
                               ess_tail(torch.randn(2, 10, generator=torch.Generator().manual_seed(1)), probs=(0.1,)))


def test_posterior_summary_reports_the_rank_diagnostics():
    draws = torch.from_numpy(REFERENCE["one_wider_4x200"]).float()
    summary = PosteriorSummary({"z": draws.unsqueeze(-1)})
    row = summary["z"]
    torch.testing.assert_close(row["rank_r_hat"], rank_r_hat(draws.unsqueeze(-1)))
    torch.testing.assert_close(row["ess_bulk"], ess_bulk(draws.unsqueeze(-1)))
    torch.testing.assert_close(row["ess_tail"], ess_tail(draws.unsqueeze(-1)))
    assert summary.max_r_hat < 1.01 < 1.1 < summary.max_rank_r_hat  # the classic R-hat misses the wide chain
    assert summary.min_ess_bulk == pytest.approx(float(row["ess_bulk"]))
    assert summary.min_ess_tail == pytest.approx(float(row["ess_tail"]))
    header = str(summary).splitlines()[0].split()
    assert header[-5:] == ["n_eff", "r_hat", "ess_bulk", "ess_tail", "rank_r_hat"]


def test_chains_stuck_at_different_values_have_infinite_rank_r_hat():
    stuck = torch.stack([torch.zeros(100), torch.ones(100)]).unsqueeze(-1)  # each chain constant, the two apart
    mixed = torch.randn(2, 100, 1, generator=torch.Generator().manual_seed(0))
    summary = PosteriorSummary({"a": stuck, "b": mixed})
    assert math.isinf(float(rank_r_hat(stuck))) and math.isinf(summary.max_rank_r_hat)  # was NaN, dropped from the max
