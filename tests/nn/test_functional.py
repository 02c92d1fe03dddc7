import torch

from bdl.nn.functional import randn_like


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
