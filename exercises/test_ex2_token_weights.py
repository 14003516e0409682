"""Exercise 2: the token weights (6) of the three aggregations, grpo_vlm.token_weights."""

import pytest
import torch

import grpo_vlm

# two completions of lengths 2 and 4, L = 5
MASK = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 0]])


def test_grpo_mean_per_completion_then_over_completions():
    tw = grpo_vlm.token_weights(MASK, "grpo")
    expected = torch.tensor([[1 / 4, 1 / 4, 0, 0, 0], [1 / 8, 1 / 8, 1 / 8, 1 / 8, 0]])
    assert torch.allclose(tw, expected)


def test_token_mean_over_the_batch():
    tw = grpo_vlm.token_weights(MASK, "token")
    assert torch.allclose(tw, MASK / 6)


def test_drgrpo_divides_by_completions_times_cap():
    tw = grpo_vlm.token_weights(MASK, "drgrpo")
    assert torch.allclose(tw, MASK / 10)  # N * L = 2 * 5, whatever the lengths


def test_an_empty_completion_gets_no_weight_and_no_nan():
    mask = torch.tensor([[0.0, 0, 0], [1, 1, 0]])
    for mode in ("grpo", "token", "drgrpo"):
        tw = grpo_vlm.token_weights(mask, mode)
        assert torch.isfinite(tw).all() and (tw[0] == 0).all() and (tw[1, :2] > 0).all()
    assert torch.allclose(grpo_vlm.token_weights(mask, "grpo")[1], torch.tensor([0.25, 0.25, 0]))
    assert torch.allclose(grpo_vlm.token_weights(mask[1:], "grpo"), torch.tensor([[0.5, 0.5, 0]]))
    # one token in the whole batch takes all the weight; a batch of empty completions, none
    one = torch.tensor([[1.0, 0], [0, 0]])
    for mode in ("grpo", "token"):
        assert torch.equal(
            grpo_vlm.token_weights(one, mode),
            torch.tensor([[1.0, 0], [0, 0]]) / (2 if mode == "grpo" else 1),
        )
        assert torch.equal(grpo_vlm.token_weights(torch.zeros(2, 3), mode), torch.zeros(2, 3))


def random_batch(N=8, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    return mask, torch.randn(N, L, generator=g)


@pytest.mark.parametrize("mode", ["grpo", "token", "drgrpo"])
def test_gradient_accumulation_is_exact(mode):
    """Micro-batches of the whole batch's weights add up to the whole batch's objective, which is
    the aggregation written directly from its definition."""
    mask, loss = random_batch()
    N, L = mask.shape
    n = mask.sum(1)
    direct = {
        "grpo": ((loss * mask).sum(1) / n).mean(),
        "token": (loss * mask).sum() / mask.sum(),
        "drgrpo": (loss * mask).sum() / (N * L),
    }[mode]
    tw = grpo_vlm.token_weights(mask, mode)
    accumulated = sum((loss[s] * tw[s]).sum() for s in (slice(0, 3), slice(3, 5), slice(5, N)))
    assert torch.allclose(accumulated, direct, atol=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "token"])
def test_weights_are_over_the_whole_batch_not_a_micro_batch(mode):
    # normalising each half on its own gives each half the weight of a whole batch: 2 in all
    mask, _ = random_batch(seed=1)
    assert torch.allclose(grpo_vlm.token_weights(mask, mode).sum(), torch.tensor(1.0))
    halves = [grpo_vlm.token_weights(m, mode).sum() for m in (mask[:4], mask[4:])]
    assert torch.allclose(sum(halves), torch.tensor(2.0))


def test_unknown_aggregation_is_refused():
    with pytest.raises(ValueError):
        grpo_vlm.token_weights(MASK, "seq")
