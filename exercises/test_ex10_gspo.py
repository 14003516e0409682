"""Exercise 10: GSPO's sequence-level ratio, objectives.gspo_surrogate."""

import math

import torch

import objectives


def test_one_ratio_per_completion_the_geometric_mean_of_its_tokens():
    # completion 0: 2 tokens, log-ratios log 2 and 0 -> s = exp(log 2 / 2) = sqrt 2
    # completion 1: 3 tokens, log-ratios log 0.9 three times -> s = 0.9; the padding is ignored
    l2, l9 = math.log(2), math.log(0.9)
    logp = torch.tensor([[l2, 0.0, 5.0, 5.0], [l9, l9, l9, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    A = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    logp = logp.requires_grad_(True)
    L, clipped = objectives.gspo_surrogate(logp, torch.zeros_like(logp), A, mask, 0.2, 0.28)
    assert L.shape == (2, 1) and clipped.shape == (2, 4)
    # -min(s A, clip(s, 0.8, 1.28) A): sqrt 2 with A < 0 is not clipped; 0.9 is inside
    assert torch.allclose(L.detach(), torch.tensor([[math.sqrt(2)], [-0.9]], dtype=torch.float64))
    assert not clipped.any()
    (grad,) = torch.autograd.grad(L.sum(), logp)
    # dL/dlogp_t = -A s / |o_i| on the completion's tokens, 0 on its padding
    s2 = math.sqrt(2)
    expected = [[s2 / 2, s2 / 2, 0, 0], [-0.3, -0.3, -0.3, 0]]
    assert torch.allclose(grad, torch.tensor(expected, dtype=torch.float64))


def test_the_whole_completion_is_clipped_together():
    logp = torch.tensor([[math.log(1.5)] * 3, [math.log(0.5)] * 3], dtype=torch.float64)
    logp = logp.requires_grad_(True)
    A = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    L, clipped = objectives.gspo_surrogate(logp, torch.zeros_like(logp), A, mask, 0.2, 0.28)
    assert torch.allclose(L.detach(), torch.tensor([[-1.28], [0.8]], dtype=torch.float64))
    assert clipped.all()
    (grad,) = torch.autograd.grad(L.sum(), logp)
    assert (grad == 0).all()


def test_clipped_marks_only_where_the_clip_takes_the_gradient_away():
    # inside the range, on its edge (s = 1 with eps 0), or at A = 0: not clipped
    logp = torch.tensor([[math.log(0.9)], [math.log(1.1)], [0.0], [0.0], [1.0], [-1.0]])
    A = torch.tensor([[-1.0], [1.0], [1.0], [-1.0], [0.0], [0.0]])
    eps = torch.tensor([0.2, 0.2, 0.0, 0.0, 0.2, 0.2])[:, None]
    for i in range(6):
        one = slice(i, i + 1)
        _, clipped = objectives.gspo_surrogate(
            logp[one], torch.zeros(1, 1), A[one], torch.ones(1, 1), eps[i, 0], eps[i, 0]
        )
        assert not clipped.any(), i


def test_an_empty_completion_gets_no_nan():
    # --overlong-filter gives a cut completion an all-zero mask
    logp = torch.randn(2, 3).requires_grad_(True)
    mask = torch.tensor([[0.0, 0, 0], [1, 1, 0]])
    A = torch.tensor([[1.0], [1.0]])
    L, _ = objectives.gspo_surrogate(logp, logp.detach(), A, mask, 0.2, 0.2)
    assert torch.isfinite(L).all() and L[0, 0] == -1.0
    (grad,) = torch.autograd.grad(L.sum(), logp)
    assert torch.isfinite(grad).all() and (grad[0] == 0).all()


def test_at_equal_policies_it_is_reinforce_per_sequence():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g).requires_grad_(True)
    A = torch.randn(3, 1, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    L, clipped = objectives.gspo_surrogate(logp, logp.detach(), A, mask, 0.2, 0.2)
    assert torch.allclose(L, -A) and not clipped.any()
    (grad,) = torch.autograd.grad(L.sum(), logp)
    assert torch.allclose(grad, -A * mask / mask.sum(1, keepdim=True))
