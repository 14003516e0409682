"""Exercise 5: the completion mask from the first EOS, vlm.completion_mask."""

import torch

import vlm

E, P = 2, 0  # EOS and pad ids


def test_up_to_and_including_the_first_eos():
    ids = torch.tensor(
        [
            [5, 6, E, P, P],  # EOS at 2: 3 tokens
            [E, P, P, P, P],  # EOS first: 1 token (the EOS itself)
            [5, 6, 7, 8, E],  # EOS last: all 5
            [5, 6, 7, 8, 9],  # no EOS (cut at the cap): all 5
            [5, E, 7, E, P],  # a second EOS changes nothing
        ]
    )
    expected = torch.tensor(
        [
            [1.0, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
        ]
    )
    m = vlm.completion_mask(ids, E)
    assert m.dtype == torch.float32 and torch.equal(m, expected)


def test_pad_may_equal_eos():
    # Qwen's pad is its EOS: padding after the EOS must not extend the completion
    ids = torch.tensor([[5, E, E, E], [5, 6, 7, E], [E, E, E, E]])
    expected = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(vlm.completion_mask(ids, E), expected)


def test_one_token_completions():
    ids = torch.tensor([[E], [5]])
    assert torch.equal(vlm.completion_mask(ids, E), torch.ones(2, 1))


def test_lengths_on_random_rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (20, 9), generator=g)
    first = torch.randint(0, 12, (20,), generator=g)  # >= 9: no EOS
    for i, f in enumerate(first.tolist()):
        if f < 9:
            ids[i, f] = E
            ids[i, f + 1 :] = torch.where(torch.rand(8 - f, generator=g) < 0.5, E, P)
    m = vlm.completion_mask(ids, E)
    assert torch.equal(m.sum(1), (first + 1).clamp(max=9).float())
    assert (m[:, 1:] <= m[:, :-1]).all()  # ones, then zeros
