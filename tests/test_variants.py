"""The GRPO variants (issue 20): GSPO's sequence ratio, DAPO's dynamic sampling and overlong
handling, entropy."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vlm as g  # noqa: E402

import runs  # noqa: E402

GSPO = g.Args(beta=0.0, importance_sampling="sequence")  # eps 0.2 / 0.2, no KL

SMALL = [
    "--prompts-per-step",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "24",
    "--train-size",
    "16",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--sample-every",
    "0",
]


def metrics(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_gspo_at_mu_1_is_sequence_reinforce_with_length_normalised_logps():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (3, 5))
    logp = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    A = torch.tensor([1.0, -0.5, 0.2])
    tw = g.token_weights(mask, "grpo")
    loss, st = g.grpo_loss(logp, logp.detach(), None, A, tw, GSPO)
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    reinforce = (
        -(A * (logp * mask).sum(1) / mask.sum(1)).sum() / 3
    )  # mean over sequences of length-normalised
    assert torch.allclose(grad, torch.autograd.grad(reinforce, logits)[0], atol=1e-7)
    assert st["clip_sum"] == 0


def test_gspo_clips_whole_sequences():
    """Second pass (mu=2): sequence 0's ratio is 1.5 (outside 1 + 0.2 with A > 0): no gradient at
    any of its tokens; sequence 1's is 1.1: every token gets -A * s / (|o| * N), the derivative of s
    = exp(mean_t(logp - logp_old))."""
    logp = torch.zeros(2, 3, requires_grad=True)
    logp_old = torch.log(torch.tensor([[1 / 1.5] * 3, [1 / 1.1] * 3]))
    tw = g.token_weights(torch.ones(2, 3), "grpo")
    loss, st = g.grpo_loss(logp, logp_old, None, torch.tensor([1.0, 1.0]), tw, GSPO)
    grad = torch.autograd.grad(loss, logp)[0]
    assert torch.equal(grad[0], torch.zeros(3))
    assert torch.allclose(grad[1], torch.full((3,), -1.1 / (3 * 2)), atol=1e-7)
    assert st["clip_sum"] == 3  # the three tokens of the clipped sequence
    # the token ratio would clip each token on its own, and differently: here identical ratios, so
    # the same set
    _, st_token = g.grpo_loss(logp, logp_old, None, torch.tensor([1.0, 1.0]), tw, g.Args(beta=0.0))
    assert st_token["clip_sum"] == 3


def test_gspo_is_exact_under_accumulation_and_needs_per_sequence_aggregation():
    torch.manual_seed(0)
    x = torch.randn(8, 6, requires_grad=True)
    mask = (torch.rand(8, 6) > 0.3).float()
    mask[:, 0] = 1
    A, old = torch.randn(8), torch.randn(8, 6) * 0.1
    tw = g.token_weights(mask, "grpo")
    full = torch.autograd.grad(g.grpo_loss(x * 1, old, None, A, tw, GSPO)[0], x)[0]
    acc = torch.zeros_like(x)
    for s in (slice(0, 2), slice(2, 4), slice(4, 8)):
        acc += torch.autograd.grad(g.grpo_loss(x[s], old[s], None, A[s], tw[s], GSPO)[0], x)[0]
    assert torch.allclose(full, acc, atol=1e-7)
    with pytest.raises(SystemExit, match="--loss-agg grpo"):
        g.parse_args(["--importance-sampling", "sequence", "--loss-agg", "token"])


def test_gspo_trains_with_mu_2(tmp_path):
    g.train(
        g.parse_args(
            SMALL
            + [
                "--steps",
                "2",
                "--importance-sampling",
                "sequence",
                "--mu",
                "2",
                "--lr",
                "1e-3",
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(r["logp_gap"] < 1e-4 and r["entropy"] > 0 for r in rows)


def test_soft_overlong_punishment_at_its_boundaries():
    """DAPO: 0 up to L_max - L_cache tokens, then (L_max - L_cache - |o|) / L_cache, -1 at the cap
    and beyond."""
    lengths = torch.tensor([10.0, 12.0, 13.0, 15.0, 16.0, 20.0])
    r, comp = g.compute_rewards(["x"] * 6, [{}] * 6, {}, lengths, L_max=16, L_cache=4)
    assert comp["overlong"].tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert torch.equal(r, comp["overlong"])  # added to r with weight 1
    assert "overlong" not in g.compute_rewards(["x"], [{}], {}, torch.tensor([16.0]), 16, 0)[1]


def test_overlong_filtering_gives_truncated_completions_no_gradient(tmp_path, monkeypatch):
    """With EOS blocked, every completion is cut off at the cap: under filtering nothing moves (zero
    gradient, and AdamW's first step of a zero gradient is zero); without it the same run moves the
    weights."""
    monkeypatch.setitem(
        g.rewards.REWARDS, "chars", lambda t, gt: (sum(map(ord, t)) % 97) / 97
    )  # varies: A != 0
    flags = SMALL + [
        "--steps",
        "1",
        "--min-completion-length",
        "24",
        "--lr",
        "1e-3",
        "--reward-weights",
        "chars=1",
    ]
    base = load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
    for filt, moves in (("true", False), ("false", True)):
        out = tmp_path / filt
        g.train(g.parse_args(flags + ["--overlong-filter", filt, "--output-dir", str(out)]))
        after = load_file(os.path.join(out, "final", "model.safetensors"))
        assert any(not torch.equal(after[k], base[k]) for k in base) == moves
        row = metrics(out)[0]
        assert row["truncated_frac"] == 1.0 and (row["grad_norm"] == 0.0) != moves


def test_entropy_equals_a_direct_computation_at_temperature():
    """sample_group's H_t on a 5-token vocabulary: the entropy of softmax(logits / T) it drew from,
    per step."""
    steps = [
        torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]]),
        torch.tensor([[0.1, 0.2, 3.0, -2.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 1.0, -5.0]]),
    ]

    class Family:  # a stand-in family whose forward returns fixed logits
        eos_id, pad_id, suppress = 4, 4, []

        def prefill(self, model, prompt, G, extra):
            return steps[0].repeat(G, 1), None

        def decode(self, model, tokens, state, t):
            return steps[t + 1].repeat(len(tokens), 1)

    for T in (1.0, 0.7):
        o, logp, H = g.sample_group(
            torch.nn.Linear(1, 1), Family(), None, 2, g.Decoding(3, T), torch.tensor([1, 2])
        )
        direct = torch.stack(
            [-(torch.softmax(s / T, -1) * torch.log_softmax(s / T, -1)).sum() for s in steps]
        )
        assert torch.allclose(H[0], direct, atol=1e-6) and torch.allclose(H[1], direct, atol=1e-6)
        assert torch.allclose(
            logp[0], torch.log_softmax(torch.cat(steps) / T, -1)[torch.arange(3), o[0]]
        )


def test_dynamic_sampling_keeps_b_informative_groups_then_logs_the_shortfall(tmp_path, monkeypatch):
    """With the format reward alone, the shipped model's groups are mostly all-equal (every
    completion well formed). Dynamic sampling trains on informative groups only, B of them while the
    cap allows, and logs what it spent."""
    seen = []
    real = g.policy_update
    monkeypatch.setattr(
        g, "policy_update", lambda *a, **k: (seen.append(len(a[1].o)), real(*a, **k))[1]
    )
    flags = SMALL + ["--steps", "4", "--reward-weights", "iou=0,format=1"]
    g.train(g.parse_args(flags + ["--output-dir", str(tmp_path / "plain")]))
    plain = metrics(tmp_path / "plain")
    assert (
        sum(r["frac_reward_zero_std"] for r in plain) > 0
    )  # without it, groups with no signal are trained on
    seen.clear()
    g.train(
        g.parse_args(flags + ["--dynamic-sampling", "6", "--output-dir", str(tmp_path / "dyn")])
    )
    dyn = metrics(tmp_path / "dyn")
    assert all(
        r["frac_reward_zero_std"] == 0 for r in dyn if r["shortfall"] < 2
    )  # no zero-std group is trained
    assert [n for n, r in zip(seen, dyn) if r["shortfall"] == 0] == [8] * sum(
        r["shortfall"] == 0 for r in dyn
    )
    assert any(r["rollouts"] > 8 for r in dyn)  # refills happened
    # at the cap (no refill allowed here): the groups found are trained on, the shortfall logged,
    # the run goes on
    seen.clear()
    g.train(
        g.parse_args(
            flags
            + ["--dynamic-sampling", "1", "--steps", "6", "--output-dir", str(tmp_path / "cap")]
        )
    )
    cap = metrics(tmp_path / "cap")
    assert len(cap) == 6 and any(r["shortfall"] > 0 for r in cap)
    assert all(
        n == (2 - r["shortfall"]) * 4 or (r["shortfall"] == 2 and n == 8) for n, r in zip(seen, cap)
    )


def test_dynamic_sampling_builds_the_same_batch_for_one_and_two_processes(tmp_path):
    flags = SMALL + [
        "--steps",
        "2",
        "--micro-batch-size",
        "4",
        "--reward-weights",
        "iou=0,format=1",
        "--dynamic-sampling",
        "6",
        "--loss-agg",
        "token",
        "--lr",
        "1e-3",
    ]
    runs.one_and_two(flags, tmp_path)
    one, two_ = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert any(r["rollouts"] > 8 for r in one)  # the test exercises refills
    for a, b in zip(one, two_):
        assert (a["rollouts"], a["shortfall"]) == (b["rollouts"], b["shortfall"])
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["loss"] == pytest.approx(
            b["loss"], abs=1e-6
        )
    p1 = load_file(os.path.join(tmp_path / "one", "final", "model.safetensors"))
    p2 = load_file(os.path.join(tmp_path / "two", "final", "model.safetensors"))
    assert all(torch.allclose(p1[k], p2[k], rtol=0, atol=1e-6) for k in p1)
