"""Exercise 9: the format reward, rewards.format_reward."""

import rewards


def test_the_whole_output_in_the_format_scores_one():
    for text in [
        "<think>red circle left</think><answer>[1, 2, 3, 4]</answer>",
        "<think> a </think> <answer> b </answer>",
        "  <think>\nline one\nline two\n</think>\n<answer>\n[1, 2, 3, 4]\n</answer>\n",
        "<think></think><answer></answer>",
    ]:
        assert rewards.format_reward(text, {}) == 1.0, text


def test_anything_else_scores_zero():
    for text in [
        "",
        "[1, 2, 3, 4]",
        "<answer>[1, 2, 3, 4]</answer>",  # no thinking
        "<think>a</think>",  # no answer
        "<answer>b</answer><think>a</think>",  # the wrong order
        "I think <think>a</think><answer>b</answer>",  # text before
        "<think>a</think><answer>b</answer> and more",  # text after
        "<think>a</think><answer>b",  # unclosed
        "<think>a<answer>b</answer>",
    ]:
        assert rewards.format_reward(text, {}) == 0.0, text


def test_total_on_any_input():
    for bad in (None, 3, b"<think>a</think><answer>b</answer>", ["<think>"]):
        assert rewards.format_reward(bad, {}) == 0.0


def test_returns_a_float():
    assert type(rewards.format_reward("<think>a</think><answer>b</answer>")) is float
    assert type(rewards.format_reward("nope")) is float
