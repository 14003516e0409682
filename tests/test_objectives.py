"""The objectives of issue 30 (objectives.py): CISPO, SAPO and GMPO on hand-built tensors against
hand-worked values and gradients; top-share token selection, GDPO and TIS; NoisyRollout, PAPO and
VPPO on the tiny model; and every option for 3 steps on one process and on two."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vlm as g  # noqa: E402
import objectives as ob  # noqa: E402

import runs  # noqa: E402

# B=2, G=4, 48 tokens: the tiny model's rewards vary within a group, so A != 0
TINY = "--prompts-per-step 2 --num-generations 4 --train-size 16 --eval-every 0 --save-every 0"
TINY = (TINY + " --sample-every 0 --micro-batch-size 4 --lr 1e-3").split()
OPTIONS = {  # every new option, as it trains in the 3-step runs (slow: each alone)
    "cispo": ["--policy-loss", "cispo", "--mu", "2"],
    "sapo": ["--policy-loss", "sapo", "--mu", "2"],
    "gmpo": ["--policy-loss", "gmpo", "--mu", "2"],
    "entropy": ["--entropy-top-share", "0.2"],
    "gdpo": ["--reward-norm", "gdpo"],
    "tis": ["--tis-cap", "2", "--mu", "2"],
    "noisy": ["--noisy-rollout-share", "0.5", "--noisy-rollout-step", "800"],
    "papo": ["--papo-gamma", "0.01"],
    "vppo": ["--vppo-share", "0.4"],
}
# the same options in three runs, for CI's time
COMBINED = {
    "cispo+entropy+gdpo+tis": OPTIONS["cispo"]
    + OPTIONS["entropy"]
    + OPTIONS["gdpo"]
    + ["--tis-cap", "2"],
    "sapo+noisy": OPTIONS["sapo"] + OPTIONS["noisy"],
    "gmpo+papo+vppo": OPTIONS["gmpo"] + OPTIONS["papo"] + OPTIONS["vppo"],
}


def log_probs(*p):
    return torch.log(torch.tensor(p, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Policy losses on hand-built tensors (logp != logp_old)
def test_cispo_keeps_a_gradient_above_the_clip():
    """rho = 1.5 (above 1 + eps_high = 1.2) and 7 (above the cap 1 + 5): CISPO's gradient is -A *
    min(rho, 6) at each, where the clipped surrogate gives the first none."""
    logp = log_probs(0.3, 0.35).view(1, 2).requires_grad_()
    old = logp.detach() - torch.log(torch.tensor([[1.5, 7.0]], dtype=torch.float64))
    A, mask = torch.tensor([[2.0]], dtype=torch.float64), torch.ones(1, 2)
    L, capped = ob.cispo_surrogate(logp, old, A, mask, 0.2, 0.2, eps_max=5.0)
    assert torch.allclose(L, -torch.tensor([[1.5, 6.0]]).double() * 2 * logp.detach())
    (grad,) = torch.autograd.grad(L.sum(), logp)
    assert torch.allclose(grad, torch.tensor([[-3.0, -12.0]], dtype=torch.float64))
    assert capped.tolist() == [[False, True]]
    L_clip, _ = g.clipped_surrogate(logp, old, A, mask, 0.2, 0.2)
    assert torch.autograd.grad(L_clip.sum(), logp)[0].tolist() == [[0.0, 0.0]]


def sapo_gradient_weight(rho, A, tau_pos=1.0, tau_neg=1.05):
    """dL/dlogp / (-A) of SAPO's surrogate at ratio rho, by autograd."""
    logp = torch.tensor([[math.log(0.4)]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - math.log(rho)
    At = torch.tensor([[A]], dtype=torch.float64)
    L, clipped = ob.sapo_surrogate(logp, old, At, None, 0.2, 0.2, tau_pos, tau_neg)
    assert not clipped.any()
    return (torch.autograd.grad(L.sum(), logp)[0] / -A).item()


def test_sapo_gate():
    # exactly 1 at rho = 1, for either sign of A and any tau
    for A, tau in ((1.0, 1.0), (-1.0, 1.05), (1.0, 10.0)):
        assert sapo_gradient_weight(1.0, A, tau, tau) == 1.0
    # 4 s (1 - s) rho, s = sigmoid(10 * 0.1) = 0.7310586: 0.7864477 * 1.1 = 0.8650925 (0.865)
    assert sapo_gradient_weight(1.1, 1.0, 10.0, 10.0) == pytest.approx(0.8650925, abs=1e-7)
    assert round(float(ob.sapo_weight(1.1, 10.0)), 3) == 0.865
    # it decays on both sides of 1, faster for A < 0 (tau_neg 1.05 > tau_pos 1.0)
    for far, near in ((3.0, 2.0), (0.2, 0.5)):
        for A in (1.0, -1.0):
            assert sapo_gradient_weight(far, A) / far < sapo_gradient_weight(near, A) / near < 1
        assert sapo_gradient_weight(far, -1.0) < sapo_gradient_weight(far, 1.0)
    # as tau -> 0 it tends to the unclipped ratio's weight, rho
    for rho in (0.5, 1.3, 2.0):
        assert sapo_gradient_weight(rho, 1.0, 1e-4, 1e-4) == pytest.approx(rho, rel=1e-6)


def test_gmpo_clips_a_token_in_log_space():
    """Log-ratios (0.6, -0.2), eps 0.4: the first is clipped to 0.4 (no gradient), and L = -A *
    exp((0.4 - 0.2) / 2); with A < 0 and log-ratios (-0.6, 0.2) the same token is clipped."""
    for A, d in ((1.0, (0.6, -0.2)), (-1.0, (-0.6, 0.2))):
        logp = log_probs(0.3, 0.2).view(1, 2).requires_grad_()
        old = logp.detach() - torch.tensor([d], dtype=torch.float64)
        At = torch.tensor([[A]], dtype=torch.float64)
        L, clipped = ob.gmpo_surrogate(logp, old, At, torch.ones(1, 2), 0.2, 0.2, eps=0.4)
        mean = A * 0.1  # sgn(A) * (0.4 - 0.2) / 2
        assert L.shape == (1, 1) and L.item() == pytest.approx(-A * math.exp(mean), abs=1e-12)
        (grad,) = torch.autograd.grad(L.sum(), logp)
        assert grad[0, 0] == 0 and grad[0, 1].item() == pytest.approx(-A * math.exp(mean) / 2)
        assert clipped.tolist() == [[True, False]]


@pytest.mark.parametrize("loss", ["gspo", "cispo", "sapo", "gmpo"])
def test_every_policy_loss_gives_grpos_gradient_at_mu_1(loss):
    """mu = 1: logp_old = logp, rho = 1, and each loss's gradient is GRPO's (per-sequence mean)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (4, 5))
    logp = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0], [1.0] + [0.0] * 4])
    A, tw = torch.tensor([1.0, -0.5, 0.2, -0.7]), g.token_weights(mask, "grpo")

    def grad(policy_loss):
        args = g.Args(beta=0.0, policy_loss=policy_loss)
        J, _ = g.grpo_loss(logp, logp.detach(), None, A, tw, args)
        return torch.autograd.grad(J, logits, retain_graph=True)[0]

    assert torch.allclose(grad(loss), grad("grpo"), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Token and reward shaping
class FakeProcesses:
    """Process `rank` of `world`, whose gather returns every process's rows of batch.H / .mask."""

    def __init__(self, full, rank, world):
        self.full, self.rank, self.world = full, rank, world

    def gather(self, x):
        return next(
            v
            for k, v in vars(self.full).items()
            if x.shape[1:] == v.shape[1:] and k in ("H", "mask") and torch.equal(x, self.mine(v))
        )

    def mine(self, rows):
        n = len(rows) // self.world
        return rows[self.rank * n : (self.rank + 1) * n]


def test_top_entropy_share_trains_exactly_the_share_the_same_on_one_and_two_processes():
    torch.manual_seed(0)
    H, mask = torch.rand(8, 10), (torch.rand(8, 10) > 0.3).float()
    H[3, 2] = H[5, 7]  # a tie, broken by position
    keep = ob.top_share(H, mask, 0.2)
    n = int(mask.sum())
    assert int(keep.sum()) == math.ceil(0.2 * n) and (keep <= mask).all()
    assert H[keep > 0].min() >= H[(mask > 0) & (keep == 0)].max()
    args = g.Args(entropy_top_share=0.2)
    A = torch.randn(8)
    full = types.SimpleNamespace(H=H, mask=mask)
    one = ob.shape_advantages(A, full, None, None, FakeProcesses(full, 0, 1), args)
    assert torch.equal(one, A[:, None] * keep)
    two = []
    for rank in (0, 1):
        p = FakeProcesses(full, rank, 2)
        mine = types.SimpleNamespace(H=p.mine(H), mask=p.mine(mask))
        two.append(ob.shape_advantages(p.mine(A), mine, None, None, p, args))
    assert torch.equal(torch.cat(two), one)


def test_gdpo_makes_every_component_zero_mean_unit_std_within_a_group():
    torch.manual_seed(0)
    G = 4
    comps = {"iou": torch.rand(12), "format": torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0])}
    for k, R in comps.items():
        z = ob.gdpo_rewards({k: R}, {k: 1.0}, G).view(-1, G)
        informative = R.view(-1, G).std(1) > 0
        assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-6)
        assert torch.allclose(z.std(1)[informative], torch.ones(int(informative.sum())), atol=1e-3)
        assert (z[~informative] == 0).all()  # format's constant group: 0, not NaN
    weighted = ob.gdpo_rewards(comps, {"iou": 1.0, "format": 0.5}, G)
    parts = [
        w * ob.gdpo_rewards({k: comps[k]}, {k: 1.0}, G) for k, w in (("iou", 1), ("format", 0.5))
    ]
    assert torch.allclose(weighted, parts[0] + parts[1])


def test_tis_caps_the_weights_at_c():
    rollout = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]]))
    seen = rollout + torch.log(torch.tensor([[3.0, 0.5, 1.0, 2.5]]))
    out = ob.tis(torch.tensor([2.0]), seen, rollout, g.Args(tis_cap=2.0))
    assert torch.allclose(out, 2 * torch.tensor([[2.0, 0.5, 1.0, 2.0]]))
    assert ob.tis(torch.tensor([2.0]), seen, rollout, g.Args()).tolist() == [2.0]  # off


def test_papo_loss_falls_as_the_kl_grows_and_vppo_scores_what_depends_on_the_image():
    masked = torch.log(torch.tensor([[0.5, 0.5]]))
    tw, v = torch.full((1, 2), 0.5), ob.Views([masked], None)
    args = g.Args(papo_gamma=0.01, papo_eta=0.0)
    terms = [ob.papo_term(masked + d, v, 0, tw, args).item() for d in (0.0, 0.2, 0.5, 1.0)]
    assert terms[0] == 0 and all(a > b for a, b in zip(terms, terms[1:]))  # KL 0, then falls
    # VPPO: a token whose log-prob is the same without the image scores 0; one that changes, > 0
    s = ob.perception_score(
        torch.log(torch.tensor([[0.5, 0.5]])), masked + torch.tensor([[0, 0.3]])
    )
    assert s[0, 0] == 0 and s[0, 1] > 0
    # trajectory scores 0, 1, 0.5: normalised 0, 1, 0.5 (mean 0.5), alpha = 0.9 + 0.1 * n / 0.5
    scale = ob.trajectory_scale(torch.tensor([[0.0], [1.0], [0.5]]), torch.ones(3, 1), 0.9)
    assert scale.tolist() == pytest.approx([0.9, 1.1, 1.0]) and scale.mean() == pytest.approx(1)


# ---------------------------------------------------------------------------------------------
# The vision-specific objectives on the tiny model
def train_spied(tmp_path, flags, monkeypatch):
    """One step of `flags`; returns the first log-probs grpo_loss saw, with the run and batch."""
    seen = {}
    real_update, real_loss = g.policy_update, g.grpo_loss

    def update(run, batch, A, tw, args):
        seen.update(run=run, batch=batch)
        return real_update(run, batch, A, tw, args)

    def loss(logp, *a):
        seen.setdefault("logp", logp.detach().clone())
        return real_loss(logp, *a)

    monkeypatch.setattr(g, "policy_update", update)
    monkeypatch.setattr(g, "grpo_loss", loss)
    g.train(
        g.parse_args(
            TINY
            + ["--steps", "1", "--micro-batch-size", "8", *flags, "--output-dir", str(tmp_path)]
        )
    )
    return seen


def test_noisy_rollout_updates_on_the_clean_image_and_keeps_the_alarm(tmp_path, monkeypatch):
    flags = ["--noisy-rollout-share", "0.5", "--noisy-rollout-step", "999", "--lr", "0"]
    got = train_spied(tmp_path / "a", flags, monkeypatch)
    run, batch = got["run"], got["batch"]
    assert batch.noisy.on.view(2, 4).tolist() == [[False, False, True, True]] * 2
    noisy_batch = dataclasses.replace(batch, prompt=batch.noisy.prompt)
    with torch.no_grad():  # lr 0: the weights are still pi_old
        clean = run.policy(g.pack(run, batch, slice(0, 8), 4))
        distorted = run.policy(g.pack(run, noisy_batch, slice(0, 8), 4))
    assert torch.equal(got["logp"], clean)  # the update's log-probs: the clean image's
    # the distorted image is another input: its forward differs from the clean one
    on = batch.noisy.on[:, None] & (batch.mask > 0)
    assert (distorted - clean).abs()[on].max() > 1e-3
    row = json.loads(open(tmp_path / "a" / "metrics.jsonl").readline())
    assert row["logp_gap"] < 1e-5 and row["logp_gap_max"] < 1e-4  # a distorted completion: no alarm
    # a real mismatch (the rollout's log-probs of the distorted completions off by 0.1) trips it
    real_score = g.score

    def off(*a):
        b = real_score(*a)
        b.logp = b.logp + 0.1 * torch.arange(len(b.logp)).remainder(4).ge(2).float()[:, None]
        return b

    monkeypatch.setattr(g, "score", off)
    with pytest.raises(SystemExit, match="disagree on pi_old"):
        g.train(g.parse_args(TINY + ["--steps", "1", *flags, "--output-dir", str(tmp_path / "b")]))


def test_papo_kl_is_zero_when_the_masked_image_is_the_image(tmp_path, monkeypatch):
    kls = []
    real = ob.papo_term

    def spy(logp, v, j, tw, args):
        kls.append((v.masked[j] - logp.detach()).abs().max().item())
        return real(logp, v, j, tw, args)

    monkeypatch.setattr(ob, "papo_term", spy)
    monkeypatch.setattr(ob, "papo_mask", lambda image, gen: image)
    g.train(
        g.parse_args(TINY + ["--steps", "1", "--papo-gamma", "0.01", "--output-dir", str(tmp_path)])
    )
    assert kls and max(kls) == 0.0
    # with the paper's mask the masked forward differs
    monkeypatch.undo()
    masked = ob.papo_mask(ob.Image.new("RGB", (56, 42), (200, 100, 50)), ob.keyed_generator(0))
    x = torch.from_numpy(ob.np.array(masked))
    black = (x == 0).all(-1)
    assert 0 < black.float().mean() < 1  # some patches blackened, not all
    assert black[:14, :14].all() or not black[:14, :14].any()  # whole 14x14 patches


# ---------------------------------------------------------------------------------------------
# Every option: 3 steps on one process and on two, equal batches, logp_gap in bounds
def train_all(out, which):
    """Each run of `which` for 3 steps in this process (or these torchrun processes)."""
    for name, flags in which.items():
        g.train(
            g.parse_args(TINY + ["--steps", "3", *flags, "--output-dir", os.path.join(out, name)])
        )


def one_and_two(tmp_path, which):
    """`which` on 2 gloo processes (one launch) and on this one: equal batches, logp_gap in
    bounds."""
    script = [os.path.join(ROOT, "tests", "test_objectives.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = runs.TWO + script + [str(tmp_path / "two"), " ".join(which)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes, so that both round alike
    try:
        train_all(str(tmp_path / "one"), which)
    finally:
        torch.set_num_threads(threads)
    for opt in which:
        one, two = (
            [json.loads(x) for x in open(tmp_path / n / opt / "metrics.jsonl")]
            for n in ("one", "two")
        )
        assert len(one) == len(two) == 3
        assert any(r["reward_std"] > 0 for r in one), opt  # A != 0 somewhere: the option acts
        for a, b in zip(one, two):
            assert a["logp_gap"] < 1e-5 and b["logp_gap"] < 1e-5, opt
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-6), opt
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), opt
            assert abs(a["train_rollout_ratio_mean"] - 1) < 1e-4, opt


def test_every_option_trains_on_one_process_and_on_two(tmp_path):
    """The options in three combined runs (CI)."""
    one_and_two(tmp_path, COMBINED)


@pytest.mark.slow
def test_each_option_alone_trains_on_one_process_and_on_two(tmp_path):
    one_and_two(tmp_path, OPTIONS)


if __name__ == "__main__":
    # one process group for the whole loop: each train() would set one up and tear it down, and
    # torchrun's store does not take a second one
    dist, init, destroy = torch.distributed, torch.distributed.init_process_group, None
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else init(*a, **k)
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    train_all(sys.argv[1], {k: {**OPTIONS, **COMBINED}[k] for k in sys.argv[2].split()})
    if dist.is_initialized():
        destroy()
