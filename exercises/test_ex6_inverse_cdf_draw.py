"""Exercise 6: drawing a token at temperature T by the inverse CDF, grpo_vlm.inverse_cdf_draw."""

import torch

import grpo_vlm


def draw(p, T, u):
    """Tokens for each u [n] from the one distribution p (as logits log p)."""
    logits = torch.tensor(p, dtype=torch.float32).log()[None].expand(len(u), -1)
    return grpo_vlm.inverse_cdf_draw(logits, T, torch.tensor(u, dtype=torch.float64)).tolist()


def test_hand_computed_at_temperature_one():
    # cdf = [0.1, 0.3, 0.6, 1.0]: the first token whose cdf exceeds u
    assert draw([0.1, 0.2, 0.3, 0.4], 1.0, [0.05, 0.15, 0.29, 0.31, 0.59, 0.61, 0.999]) == [
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]


def test_u_on_a_cdf_step_takes_the_next_token():
    # cdf = [0.25, 0.5, 0.75, 1.0], exact in binary: u = 0.25 is past token 0 ("exceeds")
    assert draw([1.0, 1.0, 1.0, 1.0], 1.0, [0.25, 0.5, 0.2499, 0.75]) == [1, 2, 0, 3]


def test_temperature_flattens_and_sharpens():
    # T = 2: p ~ sqrt([0.1, 0.2, 0.3, 0.4]) -> cdf [0.163, 0.393, 0.675, 1]
    p = [0.1, 0.2, 0.3, 0.4]
    assert draw(p, 2.0, [0.15, 0.17, 0.38, 0.40, 0.66, 0.68]) == [0, 1, 1, 2, 2, 3]
    # T = 0.5: p ~ [0.01, 0.04, 0.09, 0.16] / 0.3 -> cdf [0.033, 0.167, 0.467, 1]
    assert draw(p, 0.5, [0.03, 0.04, 0.16, 0.17, 0.46, 0.47]) == [0, 1, 1, 2, 2, 3]


def test_frequencies_follow_the_tempered_softmax():
    # K evenly spaced u draw each token in proportion to softmax(logits / T), within 1 / K
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g) * 2
    K = 4000
    u = (torch.arange(K, dtype=torch.float64) + 0.5) / K
    for T in (0.7, 1.0, 1.6):
        for row in logits:
            tokens = grpo_vlm.inverse_cdf_draw(row[None].expand(K, -1), T, u)
            freq = torch.bincount(tokens, minlength=7).double() / K
            p = (row.double() / T).softmax(0)
            assert (freq - p).abs().max() <= 1.5 / K


def test_one_row_can_draw_any_token():
    logits = torch.zeros(1, 5)  # uniform: token k for u in [k / 5, (k + 1) / 5)
    for k in range(5):
        u = torch.tensor([(k + 0.5) / 5], dtype=torch.float64)
        assert grpo_vlm.inverse_cdf_draw(logits, 1.0, u).tolist() == [k]


def test_rows_are_independent_and_masked_tokens_never_drawn():
    logits = torch.tensor([[0.0, 0.0, -float("inf")], [-float("inf"), 0.0, 0.0]])
    u = torch.tensor([0.999999, 1e-9], dtype=torch.float64)
    assert grpo_vlm.inverse_cdf_draw(logits, 1.0, u).tolist() == [1, 1]


def test_a_masked_last_token_is_never_drawn_even_as_u_nears_one():
    # the cdf's last entry can round below 1: u = 1 - 2**-53 exceeds it, u * cdf[-1] does not
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[:, -1] = -float("inf")
    below = (logits.double().softmax(-1).cumsum(-1)[:, -1] < 1).sum()
    assert below > 0  # the case this test is about occurs in these rows
    u = torch.full((64,), 1 - 2**-53, dtype=torch.float64)
    assert (grpo_vlm.inverse_cdf_draw(logits, 1.0, u) < 49).all()


def test_the_largest_u_still_draws_a_token_in_the_vocabulary():
    # u is at most (2**32 - 0.5) / 2**32 (grpo_vlm.draw_token); the cdf's last entry may round
    # below 1, so the draw compares u * cdf[-1], and a token past the vocabulary is clamped
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(512, 1000, generator=g) * 3
    u = torch.full((512,), (2**32 - 0.5) / 2**32, dtype=torch.float64)
    tokens = grpo_vlm.inverse_cdf_draw(logits, 1.0, u)
    assert tokens.shape == (512,) and tokens.dtype == torch.long
    assert (tokens < 1000).all() and (tokens >= 0).all()
