"""Writes diagnostics_reference.npz: MCMC-like draws and ArviZ's rank-normalised R-hat, bulk and tail ESS of them,
and ArviZ's ESS of the mean (``ess(method="mean")``, what bdl's ``n_eff`` column reports).

Run once with ArviZ installed (not a bdl dependency); the test reads the file. Made with arviz 0.23.4,
numpy 2.4.6, scipy 1.17.1: ``python make_diagnostics_reference.py``.
"""

from pathlib import Path

import arviz as az
import numpy as np

rng = np.random.default_rng(0)


def ar1(chains, draws, phi, scale=1.0):
    x = np.zeros((chains, draws))
    noise = rng.standard_normal((chains, draws))
    for t in range(draws):
        x[:, t] = (phi * x[:, t - 1] if t else 0.0) + noise[:, t]
    return scale * x


cases = {
    "iid_4x200": rng.standard_normal((4, 200)),
    "ar_0.9_4x150": ar1(4, 150, 0.9),
    "ar_0.99_2x101": ar1(2, 101, 0.99),  # odd: the split leaves out the middle draw
    "antithetic_3x60": ar1(3, 60, -0.6),  # negative autocorrelation: ESS above the number of draws
    "one_wider_4x200": rng.standard_normal((4, 200)) * np.array([[1.0], [1.0], [1.0], [3.0]]),
    "one_shifted_4x200": rng.standard_normal((4, 200)) + np.array([[0.0], [0.5], [0.0], [0.0]]),
    "cauchy_4x150": rng.standard_cauchy((4, 150)),
    "ties_3x50": rng.integers(0, 3, (3, 50)).astype(float),
    "one_chain_1x150": ar1(1, 150, 0.7),
    **{f"short_2x{n}": ar1(2, n, 0.5) for n in (4, 5, 6, 7, 9)},
}
arrays = {}
for name, draws in cases.items():
    rhat = float(az.rhat(draws, method="rank")) if draws.shape[0] > 1 else np.nan  # ArviZ wants 2 chains
    arrays[name] = draws
    arrays[name + "/reference"] = np.array([rhat, float(az.ess(draws, method="bulk")), float(az.ess(draws, method="tail"))])
    arrays[name + "/ess_mean"] = np.array(float(az.ess(draws, method="mean")))
np.savez_compressed(Path(__file__).with_name("diagnostics_reference.npz"), **arrays)
