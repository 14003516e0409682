"""Exercise 7: the log-probs of the completion tokens at temperature T, vlm.token_logps."""

import math

import torch

import vlm


def test_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 1])
    # T = 1: softmax = [1/4, 3/4] and [3/4, 1/4]
    lp = vlm.token_logps(logits, targets, 1.0)
    assert torch.allclose(lp, torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64))
    # T = 2: softmax([0, log 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3)
    s = math.sqrt(3)
    lp = vlm.token_logps(logits, targets, 2.0)
    expected = torch.tensor([math.log(s / (1 + s)), math.log(1 / (1 + s))], dtype=torch.float64)
    assert torch.allclose(lp, expected)


def test_shapes_and_every_position():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 3), generator=g)
    for T in (0.5, 1.0, 1.7):
        lp = vlm.token_logps(logits, targets, T)
        assert lp.shape == (2, 3)
        for i in range(2):
            for t in range(3):
                p = torch.softmax(logits[i, t] / T, 0)[targets[i, t]]
                assert torch.allclose(lp[i, t], p.log())


def test_log_probs_of_all_tokens_normalise():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3
    for T in (0.6, 1.3):
        lps = torch.stack([vlm.token_logps(logits, torch.full((4,), v), T) for v in range(9)], 1)
        assert torch.allclose(lps.exp().sum(1), torch.ones(4, dtype=torch.float64))
        assert (lps < 0).all()


def test_gradient():
    # d log softmax(z / T)_y / dz = (onehot(y) - softmax(z / T)) / T
    z = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y, T = torch.tensor([0]), 1.5
    (grad,) = torch.autograd.grad(vlm.token_logps(z, y, T).sum(), z)
    expected = (torch.tensor([[1.0, 0, 0]], dtype=torch.float64) - (z / T).softmax(-1)) / T
    assert torch.allclose(grad, expected.detach())
