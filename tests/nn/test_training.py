import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import bdl
from bdl.data import load_digits


@pytest.mark.slow
def test_bayesian_mlp_learns_digits():
    estimator = "reparam"
    splits = load_digits(seed=0)
    model = nn.Sequential(
        bdl.BayesLinear(64, 128, estimator=estimator), nn.ReLU(), bdl.BayesLinear(128, 10, estimator=estimator)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    num_data = len(splits.train)
    for _ in range(15):
        for x, y in loader:
            optimizer.zero_grad()
            out = bdl.elbo_loss(F.cross_entropy(model(x), y), bdl.kl_divergence(model), num_data)
            out.loss.backward()
            optimizer.step()
    x, y = splits.test.tensors
    with torch.no_grad():
        probs = torch.stack([model(x).softmax(-1) for _ in range(20)]).mean(0)
    accuracy = (probs.argmax(-1) == y).float().mean().item()
    assert accuracy >= 0.9, accuracy
    # the posterior did move away from its initial scale: the KL term is doing something
    assert not torch.allclose(model[0].weight_std, torch.full_like(model[0].weight_std, 1e-3))
