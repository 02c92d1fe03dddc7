import pytest
import torch

import bdl
import bdl.nn.functional as BF
from bdl.nn.functional import _random_signs, randn_like


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_parallel_noise_is_standard_normal_and_works_under_inference_mode(monkeypatch, four_threads, helpers):
    # Lightning validates and tests under torch.inference_mode (thread-local); the noise threads must follow it.
    # Whether threads fill depends on the machine's spare cores: every count is forced here.
    monkeypatch.setattr(BF, "_fill_helpers", lambda: helpers)
    template = torch.empty(512, 1024)
    with torch.inference_mode():
        noise = randn_like(template)
    assert noise.is_inference()
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    # every chunk is drawn (a helper that skipped its chunk would leave garbage or zeros)
    for chunk in noise.view(-1).chunk(4):
        assert abs(chunk.std().item() - 1) < 0.02
    torch.manual_seed(3)
    first = randn_like(template)
    torch.manual_seed(3)
    assert torch.equal(first, randn_like(template)) and not first.is_inference()
    torch.manual_seed(3)  # the in-place fill (prediction's kept sample buffers) draws the same values
    assert torch.equal(first, BF._normal_(torch.empty_like(template)))
    monkeypatch.setattr(BF, "_fill_helpers", lambda: 0)  # chunks per torch thread: helpers change no number
    torch.manual_seed(3)
    assert torch.equal(first, randn_like(template))


def test_noise_threads_use_only_the_cores_torch_leaves_spare(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    for cores, expected in ((threads, 0), (threads + 1, 1), (threads + 3, 3), (threads + 100, BF._MAX_FILL_THREADS - 1)):
        monkeypatch.setattr(BF, "_available_cores", lambda cores=cores: cores)
        assert BF._fill_helpers() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a multi-process launcher split the cores: no helpers
    assert BF._fill_helpers() == 0


def test_cpu_random_signs_are_fair_independent_coins():
    """Flipout's signs are unpacked 64 to a 64-bit draw: every bit position (sign bits included) must be
    a fair coin, independent of its neighbours, and the layout must follow the requested shape."""
    torch.manual_seed(0)
    signs = _random_signs(torch.empty(4000, 64 * 8), per_channel=False)
    assert signs.dtype == torch.float32 and set(signs.unique().tolist()) == {-1.0, 1.0}
    by_bit = signs.reshape(-1, 64)  # column j holds bit j of every draw
    n = by_bit.shape[0]
    assert by_bit.mean(0).abs().max() < 4.5 / n**0.5  # a stuck or biased bit is off by ~1
    assert (by_bit[:, :-1] * by_bit[:, 1:]).mean(0).abs().max() < 4.5 / n**0.5
    assert (by_bit[:-1] * by_bit[1:]).mean(0).abs().max() < 4.5 / n**0.5  # consecutive draws
    per_channel = _random_signs(torch.empty(6, 5, 4, 4, dtype=torch.float64), per_channel=True)
    assert per_channel.shape == (6, 5, 1, 1) and per_channel.dtype == torch.float64


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_local_reparameterisation_without_a_graph_draws_the_values_of_the_graph_path(device):
    # prediction writes the draw into its temporaries; with the same seed it must give the training path's values
    layer = bdl.BayesLinear(5, 7, estimator="local", posterior_std_init=0.2, device=device)
    conv = bdl.BayesConv2d(3, 4, 3, estimator="local", posterior_std_init=0.2, device=device)
    for module, x in ((layer, torch.randn(6, 5, device=device)), (conv, torch.randn(2, 3, 8, 8, device=device))):
        torch.manual_seed(1)
        with_graph = module(x)
        assert with_graph.requires_grad
        torch.manual_seed(1)
        with torch.no_grad():
            without = module(x)
        torch.testing.assert_close(without, with_graph.detach(), rtol=0, atol=0)
        torch.manual_seed(1)
        with torch.no_grad():
            assert not torch.equal(module(x), module(x))  # still fresh noise per call
