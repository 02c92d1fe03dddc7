import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from bdl.infer import (
    LIKELIHOODS,
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    HeteroscedasticGaussianLikelihood,
    HomoscedasticGaussianLikelihood,
    make_likelihood,
)


def observed_log_prob(likelihood, output, target, num_data=None):
    trace = poutine.trace(likelihood).get_trace(output, target, num_data=num_data)
    trace.compute_log_prob()
    return trace.nodes["obs"]["log_prob_sum"], trace


def test_categorical_log_likelihood_is_minus_cross_entropy():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    log_prob, _ = observed_log_prob(CategoricalLikelihood(), logits, y)
    torch.testing.assert_close(log_prob, -F.cross_entropy(logits, y, reduction="sum"))
    # the labels the other modules take: [B, 1], whole-number floats (refused here alone)
    for labels in (y[:, None], y.float()):
        torch.testing.assert_close(observed_log_prob(CategoricalLikelihood(), logits, labels)[0], log_prob)


def test_bernoulli_log_likelihood_is_minus_binary_cross_entropy():
    logit, y = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    log_prob, _ = observed_log_prob(BernoulliLikelihood(), logit, y)
    torch.testing.assert_close(log_prob, -F.binary_cross_entropy_with_logits(logit[:, 0], y.float(), reduction="sum"))


def test_gaussian_log_likelihood_with_known_noise():
    mean, y = torch.randn(6, 2), torch.randn(6, 2)
    log_prob, _ = observed_log_prob(GaussianLikelihood(noise_std=0.3), mean, y)
    expected = torch.distributions.Normal(mean, 0.3).log_prob(y).sum()
    torch.testing.assert_close(log_prob, expected)


def test_learned_noise_is_a_latent_site_with_a_half_normal_prior():
    mean, y = torch.randn(6), torch.randn(6)
    log_prob, trace = observed_log_prob(HomoscedasticGaussianLikelihood(noise_prior_scale=2.0), mean, y)
    noise = trace.nodes["noise_std"]
    assert not noise["is_observed"] and isinstance(noise["fn"], pyro.distributions.HalfNormal)
    torch.testing.assert_close(noise["fn"].scale, torch.tensor(2.0))
    expected = torch.distributions.Normal(mean, noise["value"]).log_prob(y).sum()
    torch.testing.assert_close(log_prob, expected)


def test_heteroscedastic_noise_is_softplus_of_the_second_half_of_the_output():
    output, y = torch.randn(6, 4), torch.randn(6, 2)
    likelihood = HeteroscedasticGaussianLikelihood(min_std=1e-3)
    log_prob, _ = observed_log_prob(likelihood, output, y)
    expected = torch.distributions.Normal(output[:, :2], F.softplus(output[:, 2:]) + 1e-3).log_prob(y).sum()
    torch.testing.assert_close(log_prob, expected)
    with pytest.raises(ValueError, match="even last dimension"):
        observed_log_prob(likelihood, torch.randn(6, 3), torch.randn(6, 1))


def test_observations_are_scaled_to_the_training_set():
    logits, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    scaled, _ = observed_log_prob(CategoricalLikelihood(), logits, y, num_data=50)
    unscaled, _ = observed_log_prob(CategoricalLikelihood(), logits, y)
    torch.testing.assert_close(scaled, 10 * unscaled)


def test_targets_are_validated():
    with pytest.raises(ValueError, match="integer class indices"):
        observed_log_prob(CategoricalLikelihood(), torch.randn(5, 3), torch.rand(5))
    with pytest.raises(ValueError, match="0/1"):
        observed_log_prob(BernoulliLikelihood(), torch.randn(5), torch.full((5,), 2.0))
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        observed_log_prob(GaussianLikelihood(), torch.randn(5, 2), torch.randn(5, 3))


def test_registry_lists_the_names_on_an_unknown_one():
    assert set(LIKELIHOODS) == {"categorical", "bernoulli", "gaussian", "gaussian_homoscedastic", "gaussian_heteroscedastic"}
    assert make_likelihood("gaussian", noise_std=0.2).noise_std == 0.2
    with pytest.raises(ValueError, match="categorical"):
        make_likelihood("poisson")
    with pytest.raises(ValueError, match="noise_std"):
        make_likelihood("gaussian", noise_std=0.0)


def test_bernoulli_targets_other_than_0_1_are_named_by_value():
    # the message blamed the shape: "must be 0/1 of shape (4,), got shape (4,)"
    likelihood = BernoulliLikelihood()
    with pytest.raises(ValueError, match="targets must be 0/1, got 2 at index 2"):
        likelihood.check_target(torch.tensor([0, 1, 2, 1]), torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"got 0.5 at index 1 \(soft labels are not taken"):  # "values from 0.0 to 1.0"
        likelihood.check_target(torch.tensor([0.0, 0.5, 1.0, 1.0]), torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"of shape \(4,\), got shape \(3,\)"):
        likelihood.check_target(torch.tensor([0, 1, 1]), torch.randn(4, 1))


def test_unsigned_labels_and_empty_batches():
    # numpy's uint16 labels: "lt_cpu" not implemented for 'UInt16'
    labels = torch.tensor([0, 2, 1], dtype=torch.uint16)
    assert torch.equal(CategoricalLikelihood().check_target(labels, torch.randn(3, 3)), torch.tensor([0, 2, 1]))
    # an empty batch: pyro.plate's "size cannot be zero", or a failed reshape inside the Categorical
    for num_data in (None, 100):
        with pytest.raises(ValueError, match=r"the batch holds no example \(network output of shape \(0, 3\)\)"):
            CategoricalLikelihood()(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), num_data=num_data)


def test_bernoulli_predictive_logits_are_symmetric_as_predicts_reading_of_one_logit():
    # (0, l) made energy and max logit measure "how much class 0"; bdl.predict reads one logit as (-l/2, l/2)
    from bdl.predict import _two_class

    logit = torch.randn(4, 6, 1)
    outputs = BernoulliLikelihood().predictive_outputs(logit, {})
    assert torch.equal(outputs, _two_class(logit))
    torch.testing.assert_close(outputs.softmax(-1)[..., 1], torch.sigmoid(logit.squeeze(-1)))
    # a network giving [B]: S samples of one input are [S, 1], which was read as one [S] column ([S, 2] out)
    for samples in (torch.randn(4, 1), torch.randn(4, 1, 1), torch.randn(4, 6)):
        outputs = BernoulliLikelihood().predictive_outputs(samples, {})
        assert outputs.shape == (4, samples.shape[1], 2)
        torch.testing.assert_close(outputs.softmax(-1)[..., 1], torch.sigmoid(samples.reshape(4, -1)))
