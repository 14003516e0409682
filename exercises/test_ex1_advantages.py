"""Exercise 1: the group-normalised advantage (2), grpo_vlm.group_advantages."""

import math

import pytest
import torch

import grpo_vlm


def test_hand_computed_group_of_four():
    # one group, r = [0, 0, 0, 1]: mean 1/4, unbiased std sqrt((3 * 1/16 + 9/16) / 3) = 1/2
    A = grpo_vlm.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 4)
    expected = torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (0.5 + 1e-4)
    assert torch.allclose(A, expected, atol=1e-6)


def test_groups_are_consecutive_rows_and_independent():
    # two groups of 3 (prompt-major: rows 0-2 are prompt 0's completions)
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 20.0])
    A = grpo_vlm.group_advantages(r, 3)
    s = 1 / (1.0 + 1e-4)  # group 0: mean 2, std 1
    t = 1 / (10.0 + 1e-4)  # group 1: mean 20, std 10
    assert torch.allclose(A, torch.tensor([-s, 0, s, -10 * t, 10 * t, 0]), atol=1e-6)


def test_higher_reward_higher_advantage_and_mean_zero():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 8, generator=g)
    A = grpo_vlm.group_advantages(r, 8)
    assert A.shape == r.shape
    assert torch.allclose(A.view(5, 8).sum(1), torch.zeros(5), atol=1e-5)
    for rg, ag in zip(r.view(5, 8), A.view(5, 8)):
        assert torch.equal(rg.argsort(), ag.argsort())  # the same order, the same sign as r - mean


def test_std_is_unbiased_and_eps_is_added():
    # r = [0, d]: unbiased std d / sqrt(2); A = +-(d / 2) / (d / sqrt(2) + eps)
    d = 1e-3
    A = grpo_vlm.group_advantages(torch.tensor([0.0, d], dtype=torch.float64), 2)
    a = (d / 2) / (d / math.sqrt(2) + 1e-4)
    assert torch.allclose(A, torch.tensor([-a, a], dtype=torch.float64), atol=1e-9)
    A = grpo_vlm.group_advantages(torch.tensor([0.0, d], dtype=torch.float64), 2, eps=0.0)
    assert torch.allclose(A, torch.tensor([-1, 1], dtype=torch.float64) / math.sqrt(2))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_gets_exactly_zero(scale):
    r = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.7, 0.7, 0.7, 0.7])
    A = grpo_vlm.group_advantages(r, 4, scale)
    assert torch.isfinite(A).all()
    assert (A[:4] == 0).all() and (A[8:] == 0).all()  # exactly 0, not rounding noise
    assert (A[4:8] != 0).all()
    # three 0.9s: their float32 mean is not exactly 0.9; the group still gets exactly 0
    A = grpo_vlm.group_advantages(torch.tensor([0.9, 0.9, 0.9, 0.0, 1.0, 0.25]), 3, scale)
    assert (A[:3] == 0).all() and (A[3:] != 0).all()


def test_batch_and_none_scaling():
    r = torch.tensor([0.0, 2.0, 1.0, 5.0])
    centered = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    assert torch.allclose(grpo_vlm.group_advantages(r, 2, "none"), centered)
    batch_std = r.std(unbiased=True)  # over all 4 rewards: the batch's, not a group's
    A = grpo_vlm.group_advantages(r, 2, "batch")
    assert torch.allclose(A, centered / (batch_std + 1e-4), atol=1e-6)


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError):
        grpo_vlm.group_advantages(torch.zeros(4), 2, "groups")
