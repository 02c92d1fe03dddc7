import torch

from bdl.nn.functional import _random_signs, randn_like


def test_parallel_noise_is_standard_normal_and_works_under_inference_mode():
    # Lightning validates and tests under torch.inference_mode (thread-local); the noise threads must follow it.
    torch.set_num_threads(2)
    template = torch.empty(512, 1024)
    with torch.inference_mode():
        noise = randn_like(template)
    assert noise.is_inference()
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    torch.manual_seed(3)
    first = randn_like(template)
    torch.manual_seed(3)
    assert torch.equal(first, randn_like(template)) and not first.is_inference()


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
