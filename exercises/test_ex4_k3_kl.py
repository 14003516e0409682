"""Exercise 4: the k3 estimator of the KL (5), grpo_vlm.k3_kl."""

import math

import torch

import grpo_vlm


def test_hand_computed_values():
    # delta = logp_ref - logp;  k3 = exp(delta) - delta - 1
    logp = torch.tensor([math.log(0.2), math.log(0.4), math.log(0.3)], dtype=torch.float64)
    logp_ref = torch.tensor([math.log(0.4), math.log(0.2), math.log(0.3)], dtype=torch.float64)
    kl = grpo_vlm.k3_kl(logp, logp_ref)
    l2 = math.log(2)
    expected = torch.tensor([1 - l2, 0.5 + l2 - 1, 0.0], dtype=torch.float64)
    assert torch.allclose(kl, expected, atol=1e-12)


def test_never_negative_and_zero_only_where_they_agree():
    g = torch.Generator().manual_seed(0)
    logp, logp_ref = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    kl = grpo_vlm.k3_kl(logp, logp_ref)
    assert kl.shape == (6, 9) and (kl > 0).all()  # k1 = logp - logp_ref is negative half the time
    assert (grpo_vlm.k3_kl(logp, logp) == 0).all()


def test_gradient_pulls_towards_the_reference():
    # d k3 / d logp = 1 - exp(logp_ref - logp): < 0 where pi_theta < pi_ref, > 0 where above
    logp = torch.tensor([math.log(0.2), math.log(0.4)], dtype=torch.float64, requires_grad=True)
    logp_ref = torch.tensor([math.log(0.4), math.log(0.2)], dtype=torch.float64)
    (grad,) = torch.autograd.grad(grpo_vlm.k3_kl(logp, logp_ref).sum(), logp)
    assert torch.allclose(grad, torch.tensor([-1.0, 0.5], dtype=torch.float64), atol=1e-12)


def test_its_mean_under_pi_theta_is_the_kl():
    # sum_x p(x) k3(log p(x), log q(x)) = KL(p || q) exactly: the estimator is unbiased
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(10, generator=g, dtype=torch.float64).log_softmax(0)
    logq = torch.randn(10, generator=g, dtype=torch.float64).log_softmax(0)
    kl = (logp.exp() * (logp - logq)).sum()
    assert torch.allclose((logp.exp() * grpo_vlm.k3_kl(logp, logq)).sum(), kl, atol=1e-12)
