"""Exercise 3: the clipped surrogate (3)-(4), grpo_vlm.clipped_surrogate."""

import math

import torch

import grpo_vlm

EPS_LOW, EPS_HIGH = 0.2, 0.28  # unequal, so that swapping them shows


def surrogate(rho, A):
    """L and clipped for ratios rho [N, 1] and advantages A [N, 1], logp_old = 0."""
    logp = torch.log(torch.tensor(rho, dtype=torch.float64))[:, None].requires_grad_(True)
    A = torch.tensor(A, dtype=torch.float64)[:, None]
    mask = torch.ones_like(logp)
    L, clipped = grpo_vlm.clipped_surrogate(
        logp, torch.zeros_like(logp), A, mask, EPS_LOW, EPS_HIGH
    )
    (grad,) = torch.autograd.grad(L.sum(), logp)
    return L.detach()[:, 0], clipped[:, 0], grad[:, 0]


def test_hand_computed_values():
    rho = [1.5, 1.5, 0.5, 0.5, 1.1, 1.25, 0.78, 1.0]
    A = [1.0, -1.0, 1.0, -1.0, 2.0, 1.0, -1.0, -3.0]
    L, clipped, _ = surrogate(rho, A)
    # -min(rho A, clip(rho, 0.8, 1.28) A)
    expected = [-1.28, 1.5, -0.5, 0.8, -2.2, -1.25, 0.8, 3.0]
    assert torch.allclose(L, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert clipped.tolist() == [True, False, False, True, False, False, True, False]


def test_gradient_is_zero_where_clipped_and_minus_rho_A_elsewhere():
    rho = [1.5, 1.5, 0.5, 0.5, 1.1, 0.9]
    A = [1.0, -1.0, 1.0, -1.0, 2.0, -0.5]
    L, clipped, grad = surrogate(rho, A)
    # d(-rho A) / d logp = -rho A where the unclipped term is the min, else 0
    expected = [0.0, 1.5, -0.5, 0.0, -2.2, 0.45]
    assert torch.allclose(grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert ((grad == 0) == clipped).all()


def test_at_rho_one_it_is_reinforce():
    # mu = 1: logp_old is logp, detached; L = -A and its gradient -A, whatever the clip range
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=g).requires_grad_(True)
    A = torch.randn(4, 1, generator=g)
    L, clipped = grpo_vlm.clipped_surrogate(
        logp, logp.detach(), A, torch.ones(4, 6), EPS_LOW, EPS_HIGH
    )
    assert L.shape == (4, 6) and not clipped.any()
    assert torch.allclose(L, -A.expand(4, 6))
    (grad,) = torch.autograd.grad(L.sum(), logp)
    assert torch.allclose(grad, -A.expand(4, 6))


def test_clipped_marks_only_where_the_clip_takes_the_gradient_away():
    # on the clip's edge (rho = 1 with eps 0) or at A = 0 the gradient is not taken away
    _, clipped = grpo_vlm.clipped_surrogate(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0], [-1.0]]), torch.ones(2, 2), 0, 0
    )
    assert not clipped.any()
    L, clipped, _ = surrogate([1.5, 0.5, 0.5, 1.5, 0.9, 1.1], [0.0, 0.0, 0.5, -0.5, -1.0, 1.0])
    assert clipped.tolist() == [False, False, False, False, False, False]
    assert torch.allclose(L, torch.tensor([0, 0, -0.25, 0.75, 0.9, -1.1], dtype=torch.float64))


def test_ratio_is_new_over_old():
    logp = torch.tensor([[math.log(0.3)]], dtype=torch.float64)
    logp_old = torch.tensor([[math.log(0.2)]], dtype=torch.float64)  # rho = 1.5
    A = torch.tensor([[-2.0]], dtype=torch.float64)
    L, clipped = grpo_vlm.clipped_surrogate(logp, logp_old, A, torch.ones(1, 1), 0.2, 0.2)
    assert torch.allclose(L, torch.tensor([[3.0]], dtype=torch.float64))  # -min(-3, -2.4)
    assert not clipped.any()
    L, clipped = grpo_vlm.clipped_surrogate(logp_old, logp, A, torch.ones(1, 1), 0.2, 0.2)
    assert torch.allclose(L, torch.tensor([[1.6]], dtype=torch.float64))  # rho = 2/3 -> 0.8
    assert clipped.all()
