from typing import NamedTuple

import pytest
import torch

from bdl._outputs import draw_stacked


class Mine(tuple):
    pass


class Pair(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor


def test_draw_stacked_equals_torch_stack_for_tensors_and_tuples_with_and_without_grad():
    torch.manual_seed(0)
    draws = [torch.randn(3, 2) for _ in range(4)]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(draw_stacked(lambda i: draws[i], 4), torch.stack(draws))
            pairs = draw_stacked(lambda i: Pair(draws[i], draws[i].exp()), 4)
            assert isinstance(pairs, Pair) and torch.equal(pairs.variance, torch.stack(draws).exp())
            plain = draw_stacked(lambda i: (draws[i], draws[i] + 1), 4)
            assert isinstance(plain, tuple) and torch.equal(plain[1], torch.stack(draws) + 1)
            # a dict, e.g. {"logits": ...}: the loop refused what vmap gave
            named = draw_stacked(lambda i: {"logits": draws[i], "aux": -draws[i]}, 4)
            assert list(named) == ["logits", "aux"] and torch.equal(named["aux"], -torch.stack(draws))
            # nested, None in places (an LSTM's (output, (h, c)), a MultiheadAttention's (output, None)): the loop refused
            # what vmap gave
            nested = draw_stacked(lambda i: (draws[i], (Pair(draws[i], -draws[i]), None), [{"h": 2 * draws[i]}]), 4)
            assert isinstance(nested[1][0], Pair) and nested[1][1] is None
            assert torch.equal(nested[1][0].variance, -torch.stack(draws)) and torch.equal(nested[2][0]["h"], 2 * torch.stack(draws))
            # a tuple of a class of its own, which torch's pytree takes for a leaf: a plain tuple (the loop took it)
            mine = draw_stacked(lambda i: Mine((draws[i], -draws[i])), 4)
            assert type(mine) is tuple and torch.equal(mine[1], -torch.stack(draws))
    leaf = torch.ones(2, requires_grad=True)
    draw_stacked(lambda i: leaf * (i + 1), 3).sum().backward()  # stacked with autograd: gradients flow
    assert leaf.grad.tolist() == [6.0, 6.0]


def test_draw_stacked_rejects_outputs_that_differ_from_the_first():
    shapes = [(5, 3), (5, 3), (5, 4)]
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"member 0: \(5, 3\), member 2: \(5, 4\)"):
            draw_stacked(lambda i: torch.zeros(shapes[i]), 3, "ensemble members", "member")
    with torch.no_grad(), pytest.raises(ValueError, match=r"sample 0: \(2,\) torch.float32 on cpu, sample 1: \(2,\) torch.float64 on cpu"):
        draw_stacked(lambda i: torch.zeros(2, dtype=torch.float64 if i else torch.float32), 2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"sample 1: \(\(2,\), \(2,\)\)"):
        draw_stacked(lambda i: (torch.zeros(2), torch.zeros(2)) if i else torch.zeros(2), 2)
    with pytest.raises(TypeError, match=r"must return a tensor, or a tuple, list or dict of tensors \(nested too\), got str"):
        draw_stacked(lambda i: "logits", 2)
    with pytest.raises(TypeError, match="got a Mine holding str"):  # what it holds, not its own class of tuple
        draw_stacked(lambda i: Mine((torch.zeros(2), "x")), 2)
    with pytest.raises(TypeError, match="got a tuple holding int, str"):
        draw_stacked(lambda i: (torch.zeros(2), (3, "x")), 2)
    with pytest.raises(TypeError, match="got an empty dict"):
        draw_stacked(lambda i: {}, 2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"sample 0: \(\(2,\), \(\(2,\), \(2,\)\)\), sample 1: \(\(2,\), \(\(2,\), None\)\)"):
        draw_stacked(lambda i: (torch.zeros(2), (torch.zeros(2), None if i else torch.zeros(2))), 2)
    keys = [["logits"], ["logits"], ["scores"]]
    for grad in (False, True):  # without gradients: a NameError (the first draw's parts were released)
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=r"member 0: a dict of keys \['logits'\], member 2: a dict of keys \['scores'\]"):
            draw_stacked(lambda i: {key: torch.zeros(2) for key in keys[i]}, 3, "ensemble members", "member")
    with pytest.raises(ValueError, match=r"sample 0: 1 tensor\(s\), sample 1: a dict of keys \['logits'\]"):
        draw_stacked(lambda i: {"logits": torch.zeros(2)} if i else torch.zeros(2), 2)
    with pytest.raises(ValueError, match="count must be >= 1"):
        draw_stacked(lambda i: torch.zeros(1), 0)
