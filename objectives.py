"""Objective variants: other policy-gradient terms in place of GRPO's clipped surrogate (3)-(4),
the shaping of advantages and token weights, and the vision-specific objectives (issue 30).

Each policy loss is a plain function with grpo_vlm.clipped_surrogate's signature,

    surrogate(logp, logp_old, A, mask, eps_low, eps_high) -> (L, clipped)

with logp, logp_old and mask [N, L] (mask: 1 on each completion's tokens) and A [N, 1] or [N, L]
(a per-token advantage: A_i times a token weight >= 0, from the shaping below); L is the per-token
term, [N, L] or [N, 1] (one value per completion), and clipped [N, L] marks where the clip took
the gradient away (CISPO: where the weight was capped). grpo_vlm.grpo_loss picks one with
`surrogate(args)` and adds the KL (5) and the token weights (6) as for GRPO. Their own constants
come as keyword arguments (functools.partial) from the flags of ObjectiveFlags.

At mu = 1, rho = 1 exactly and CISPO, SAPO, GMPO and GSPO all give GRPO's gradient
(tests/test_objectives.py); they differ only from the second pass over a batch on (--mu 2).
"""

import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

import data


@dataclass
class ObjectiveFlags:
    """Objectives: policy losses, token and reward shaping, vision-specific objectives"""

    policy_loss: str = "grpo"
    """grpo (eq. 3-4), gspo (sequence ratio), cispo, sapo or gmpo (README: "Objectives");
    --importance-sampling sequence is another way to say gspo"""
    cispo_eps_max: float = 5.0
    """CISPO: the ratio's weight is capped at 1 + eps_max (TRL's recipe: 5.0)"""
    sapo_tau_pos: float = 1.0
    """SAPO: the soft gate's temperature for A > 0 (the paper's 1.0)"""
    sapo_tau_neg: float = 1.05
    """SAPO: the soft gate's temperature for A < 0 (the paper's 1.05)"""
    gmpo_eps: float = 0.4
    """GMPO: each token's log-ratio clipped to [-eps, eps] (the paper's 0.4: rho in (e^-0.4,
    e^0.4))"""
    entropy_top_share: float = 0.0
    """the policy gradient only on this share of the batch's tokens by entropy, the highest (0.2
    in arXiv 2506.01939; 0: all tokens)"""
    reward_norm: str = "sum"
    """sum: r = sum_k w_k R_k (1); gdpo: each R_k normalised within its group before the sum
    (arXiv 2601.05242)"""
    tis_cap: float = 0.0
    """truncated importance sampling: each token's advantage times min(pi_train / pi_rollout, C)
    (0: off)"""
    noisy_rollout_share: float = 0.0
    """NoisyRollout (arXiv 2504.13055): this share of each group sampled on a distorted image (the
    paper's 0.5; 0: off)"""
    noisy_rollout_step: int = 500
    """NoisyRollout: the Gaussian noise step at the start (of 1000), annealed to 0 (the paper's
    500)"""
    papo_gamma: float = 0.0
    """PAPO (arXiv 2507.06448): L - gamma * KL(pi(.|I) || pi(.|I_masked)) + the entropy terms (the
    paper's 0.01; 0: off)"""
    papo_eta: float = 0.03
    """PAPO's double entropy regulariser: eta * (H(.|I) + H(.|I_masked)) (the paper's 0.03)"""
    vppo_share: float = 0.0
    """VPPO (arXiv 2510.09285): the policy gradient only on this share of the batch's tokens by
    perception score (the paper's 0.4; 0: off)"""
    vppo_min_scale: float = 0.9
    """VPPO: a trajectory's advantage is scaled from min_scale up by its mean perception score,
    the scales averaging 1 (the official scripts' 0.9)"""


PATCH, BLACK_PROB = 14, 0.6  # PAPO's mask: each 14x14 patch blackened with probability 0.6


# ---------------------------------------------------------------------------------------------
# Policy losses
def gspo_surrogate(logp, logp_old, A, mask, eps_low, eps_high):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, Eq. 5-7): one ratio per completion, the geometric
    mean of its token ratios,

        s_i = exp( (1 / |o_i|) sum_t (logp_t - logp_old_t) ),

    clipped as a whole: L_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), the same for
    each of its tokens: L is [N, 1] (so --loss-agg grpo averages it once per completion)."""
    length = mask.sum(1, keepdim=True).clamp(min=1)
    s = torch.exp(((logp - logp_old) * mask).sum(1, keepdim=True) / length)
    L = -torch.min(s * A, torch.clamp(s, 1 - eps_low, 1 + eps_high) * A)
    clipped = ((s < 1 - eps_low) & (A < 0)) | ((s > 1 + eps_high) & (A > 0))
    return L, clipped.expand_as(logp)


def cispo_surrogate(logp, logp_old, A, mask, eps_low, eps_high, eps_max=5.0):
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4): the ratio clipped as a stopped weight,

        L_t = -sg(min(rho_t, 1 + eps_max)) * A * logp_t,

    so every token keeps a gradient, -A * min(rho_t, 1 + eps_max), even one whose ratio is above
    the cap (where PPO's clip gives it none). At rho = 1 the gradient is GRPO's; the value is not
    (it is -A * logp, not -A * rho). eps_max: TRL's recipe 5.0 (trl/trainer/grpo_trainer.py,
    loss_type "cispo")."""
    rho = torch.exp(logp - logp_old)
    L = -torch.clamp(rho, max=1 + eps_max).detach() * A * logp
    return L, (rho > 1 + eps_max).expand_as(logp) & (A != 0)


def sapo_surrogate(logp, logp_old, A, mask, eps_low, eps_high, tau_pos=1.0, tau_neg=1.05):
    """SAPO (Qwen, arXiv 2511.20347, Eq. 6-7): a soft gate in place of the hard clip,

        L_t = -(4 / tau) * sigmoid(tau * (rho_t - 1)) * A,  tau = tau_pos (A > 0), tau_neg (A <= 0),

    whose gradient weight (dL/dlogp over -A) is 4 s (1 - s) rho, s = sigmoid(tau (rho - 1)):
    exactly 1 at rho = 1 (GRPO's gradient at mu = 1), decaying smoothly on both sides of it, faster
    for A < 0 as tau_neg > tau_pos, and tending to rho (the unclipped ratio) as tau -> 0. The
    paper's tau_pos = 1.0, tau_neg = 1.05. Nothing is clipped."""
    rho = torch.exp(logp - logp_old)
    tau = torch.full_like(A, tau_neg).masked_fill(A > 0, tau_pos)
    L = -(4 / tau) * torch.sigmoid(tau * (rho - 1)) * A
    return L, torch.zeros_like(logp, dtype=torch.bool)


def sapo_weight(rho, tau):
    """SAPO's gradient weight 4 s (1 - s) rho at ratio rho and temperature tau (for the tests and
    the README)."""
    s = torch.sigmoid(tau * (torch.as_tensor(rho, dtype=torch.float64) - 1))
    return 4 * s * (1 - s) * rho


def gmpo_surrogate(logp, logp_old, A, mask, eps_low, eps_high, eps=0.4):
    """GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673, Eq. 4): the geometric mean of
    the token ratios, each clipped in log space, pessimistically for the sign of A,

        l_t = sgn(A) * min(sgn(A) (logp_t - logp_old_t), clip(sgn(A) (logp_t - logp_old_t), -eps,
              eps))
        L_i = -A * exp( (1 / |o_i|) sum_t l_t ),

    one value per completion, [N, 1] with A [N, 1] (--loss-agg grpo); a token whose signed
    log-ratio is above eps is clipped (no gradient through it). The paper's eps = 0.4."""
    sign = torch.sign(A)
    signed = sign * (logp - logp_old)
    log_r = sign * torch.min(signed, signed.clamp(-eps, eps))
    length = mask.sum(1, keepdim=True).clamp(min=1)
    L = -A * torch.exp((log_r * mask).sum(1, keepdim=True) / length)
    return L, (signed > eps) & (mask > 0)


def surrogate(args):
    """The policy loss of --policy-loss (or --importance-sampling sequence: GSPO); None: GRPO's
    own clipped surrogate (grpo_vlm.clipped_surrogate)."""
    name = "gspo" if args.importance_sampling == "sequence" else args.policy_loss
    return {
        "gspo": gspo_surrogate,
        "cispo": functools.partial(cispo_surrogate, eps_max=args.cispo_eps_max),
        "sapo": functools.partial(
            sapo_surrogate, tau_pos=args.sapo_tau_pos, tau_neg=args.sapo_tau_neg
        ),
        "gmpo": functools.partial(gmpo_surrogate, eps=args.gmpo_eps),
    }.get(name)


# ---------------------------------------------------------------------------------------------
# Reward shaping: GDPO
def gdpo_rewards(components, weights, G, eps=1e-4):
    """GDPO (arXiv 2601.05242): each reward component normalised within its group, then summed
    with its weight, r_i = sum_k w_k (R_k,i - mean_g R_k) / (std_g R_k + eps) (ddof=1, as (2)); a
    component that is constant in a group contributes 0 there. (2) then normalises the sum as
    --scale-rewards says. components: {name: [N]} of every process's rows."""
    total = 0.0
    for k, R in components.items():
        Rg = R.double().view(-1, G)
        z = (Rg - Rg.mean(1, keepdim=True)) / (Rg.std(1, keepdim=True) + eps)
        z = z * (Rg.amax(1, keepdim=True) > Rg.amin(1, keepdim=True))
        total = total + weights.get(k, 1.0) * z.reshape(-1).float()
    return total


def rewards_for_advantages(every_r, batch, weights, procs, args):
    """The r that (2) normalises: every process's r (1), or under --reward-norm gdpo GDPO's sum."""
    if args.reward_norm != "gdpo":
        return every_r
    every = {k: procs.gather(v.float()) for k, v in batch.components.items()}
    return gdpo_rewards(every, weights, args.num_generations)


# ---------------------------------------------------------------------------------------------
# Token shaping: the top share of tokens by a score, over the global batch
def top_share(score, mask, share):
    """[N, L] 1 on the ceil(share * n) tokens (of the n with mask 1) of highest score, ties broken
    by position: computed on every process's rows, so one process and two select alike."""
    valid = mask.reshape(-1) > 0
    flat = torch.where(valid, score.reshape(-1).double(), -math.inf)
    k = math.ceil(share * int(valid.sum()))
    keep = torch.zeros_like(valid)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return (keep & valid).view_as(mask).float()


def perception_score(logp, logp_masked):
    """VPPO's token perception score (official huaixuheqing/VPPO-RL, verl/workers/actor/
    dp_actor.py lines 400-405, the k3 of aug_log_probs - old_log_probs clamped to [0, 10]; top
    share 0.4 in examples/configs/train_vppo_7b.sh line 21): how much a token's log-prob changes
    when the image is masked; 0 for a token that does not depend on the image."""
    d = (logp_masked - logp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(0, 10)


def trajectory_scale(score, mask, min_scale):
    """VPPO's advantage scale per trajectory (official dp_actor.py lines 497-520): its mean token
    score S_i min-max normalised over the batch to n_i in [0, 1], then alpha_i = min_scale + (1 -
    min_scale) n_i / mean(n), so the scales average 1 (the official code takes that mean over a
    micro-batch; here over the global batch); all 1 when every trajectory scores alike."""
    S = (score * mask).sum(1) / mask.sum(1).clamp(min=1)
    span = S.max() - S.min()
    if span <= 1e-6:
        return torch.ones_like(S)
    n = (S - S.min()) / span
    return min_scale + (1 - min_scale) * n / n.mean()


def shape_advantages(A, batch, logp_old, views, procs, args):
    """A [N] of this process's rows, or with --entropy-top-share / --vppo-share a per-token [N, L]
    advantage, 0 on the tokens not selected over the global batch:
        top entropy   A_i * 1[H_t among the top share S of the batch's tokens]   (2506.01939)
        VPPO          A_i * alpha_i * 1[s_t among the top share S]              (2510.09285)
    with s_t the perception score of pi_old (perception_score) and alpha_i its trajectory scale."""
    if not (args.entropy_top_share or args.vppo_share):
        return A
    keep = torch.ones_like(batch.mask)
    if args.entropy_top_share:
        H, mask = procs.gather(batch.H), procs.gather(batch.mask)
        keep = keep * procs.mine(top_share(H, mask, args.entropy_top_share))
    if args.vppo_share:
        s = perception_score(torch.cat(logp_old), torch.cat(views.masked))
        every_s, mask = procs.gather(s), procs.gather(batch.mask)
        keep = keep * procs.mine(top_share(every_s, mask, args.vppo_share))
        A = A * procs.mine(trajectory_scale(every_s, mask, args.vppo_min_scale))
    return A[:, None] * keep


def tis(A, logp_seen, logp_rollout, args):
    """Truncated importance sampling (TRL's vllm_importance_sampling_correction, verl's
    rollout_is): each token's advantage times min(pi_train / pi_rollout, C) at pi_old; [N, L]. On
    the CPU in fp32 the ratio is 1 to ~1e-6 and this changes nothing (a check, not a result)."""
    if not args.tis_cap:
        return A
    w = torch.exp(logp_seen - logp_rollout).clamp(max=args.tis_cap)
    return A.view(len(A), -1) * w


# ---------------------------------------------------------------------------------------------
# Vision-specific: other images of each prompt, encoded by the family's adapter (once per image)
def keyed_generator(*parts):
    """A torch.Generator seeded from `parts` (the seed, the step, the image, ...): the same on every
    process and after a resume."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def papo_mask(image, gen):
    """PAPO's masked image (official MikeWangWZHL/PAPO, verl/trainer/papo_utils.py line 17,
    random_patch_blackening; examples/config.yaml lines 41-42: patch_size 14, black_prob 0.6): each
    14x14 patch blackened with probability 0.6."""
    x = np.array(image)
    h, w = x.shape[:2]
    black = torch.rand(math.ceil(h / PATCH), math.ceil(w / PATCH), generator=gen) < BLACK_PROB
    full = black.numpy().repeat(PATCH, 0).repeat(PATCH, 1)[:h, :w]
    x[full] = 0
    return Image.fromarray(x)


def noise_step(step, args):
    """NoisyRollout's noise step at `step` (1..steps): t0 * (1 - sigmoid(30 * (x - 1/2))), x =
    (step - 1) / steps, the official sigmoid decay (NUS-TRAIL/NoisyRollout, verl/utils/
    image_aug.py, decay_mode sigmoid, decay_coef 30), its midpoint here half the run; rounded down:
    t0 at the start, 0 (the clean image) by the end."""
    decay = 1 - 1 / (1 + math.exp(-30 * ((step - 1) / args.steps - 0.5)))
    return int(args.noisy_rollout_step * decay)


def diffusion_noise(image, t, gen):
    """NoisyRollout's distortion (image_aug.py lines 61-75, _add_gaussian_noise): the forward
    diffusion q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, betas 1e-5..5e-3 over 1000
    steps on a sigmoid; t = 0 leaves the image as it is."""
    if t <= 0:
        return image
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[t]
    x = torch.from_numpy(np.array(image)).double() / 255
    x = abar.sqrt() * x + (1 - abar).sqrt() * torch.randn(x.shape, generator=gen).double()
    return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def encode_view(family, rows, change, device):
    """The family's encoding (adapter.encode) of `rows` with each image replaced by change(image,
    row): the same token layout as the clean prompt, as each image keeps its size."""
    images = [[change(data.load_image(p), r) for p in data.row_images(r)] for r in rows]
    return family.encode(rows, device, images=images)[0]


class Noisy(NamedTuple):
    """NoisyRollout's rollout: the distorted images and which completions were sampled on them."""

    prompt: dict  # the family's encoding of the b prompts with their distorted images
    on: torch.Tensor  # [N] True where a completion was sampled on the distorted image


def noisy_rollout(sample, run, rows, prompt, decoding, step, args):
    """NoisyRollout (arXiv 2504.13055, Sec. 3): of each group of G, the first G - n completions
    sampled on the image and the last n = round(share * G) on its distorted copy (keys as for G
    from one image, so one process and two draw alike). `sample`: grpo_vlm.sample_group;
    decoding: (G, Decoding, keys). Returns (Samples, prompt-major, and Noisy)."""
    G, dec, keys = decoding
    n = round(args.noisy_rollout_share * G)
    t, b = noise_step(step, args), len(rows)
    change = lambda im, r: diffusion_noise(im, t, keyed_generator(args.seed, step, r["image_path"]))  # noqa: E731
    distorted = encode_view(run.family, rows, change, prompt["input_ids"].device)
    k = keys.view(b, G)
    clean = sample(run.model, run.family, prompt, G - n, dec, k[:, : G - n].reshape(-1))
    noisy = sample(run.model, run.family, distorted, n, dec, k[:, G - n :].reshape(-1))
    merged = [
        torch.cat([x.view(b, G - n, -1), y.view(b, n, -1)], 1).view(b * G, -1)
        for x, y in zip(clean, noisy)
    ]
    on = (torch.arange(G) >= G - n).repeat(b).to(merged[0].device)
    return type(clean)(*merged), Noisy(distorted, on)


class Views(NamedTuple):
    """pi_old's log-probs [n, L] of each micro-batch on the other images (None where off)."""

    masked: list  # on PAPO's masked image (PAPO, VPPO)
    seen: list  # on the image each completion was sampled from, where distorted (NoisyRollout)


@torch.no_grad()
def views(pack, run, batch, mbs, args):
    """The forwards of pi_old on the other images of the batch's prompts: the masked image (its
    mask keyed by the seed, the image and its group's completions) and NoisyRollout's distorted
    one. `pack`: grpo_vlm.pack."""
    G, device = args.num_generations, batch.o.device

    def forward(prompt):
        other = dataclasses.replace(batch, prompt=prompt)
        return [run.policy(pack(run, other, s, G)) for s in mbs]

    masked = None
    if args.papo_gamma or args.vppo_share:
        group = {
            r["image_path"]: int(batch.o[i * G : (i + 1) * G].sum())
            for i, r in enumerate(batch.rows)
        }
        key = lambda r: keyed_generator(args.seed, r["image_path"], group[r["image_path"]])  # noqa: E731
        masked = forward(
            encode_view(run.family, batch.rows, lambda im, r: papo_mask(im, key(r)), device)
        )
    seen = forward(batch.noisy.prompt) if batch.noisy is not None else None
    return Views(masked, seen)


def seen(old, v, j, noisy, s):
    """pi_old's log-probs on the image each completion of micro-batch j (rows s) was sampled from:
    the training forward's, or for NoisyRollout's distorted completions that on the distorted
    image. logp_gap and TIS compare these with the rollout's."""
    if noisy is None:
        return old
    return torch.where(noisy.on[s][:, None], v.seen[j], old)


def papo_term(logp, v, j, tw, args):
    """PAPO's terms (arXiv 2507.06448; official MikeWangWZHL/PAPO, verl/workers/actor/dp_actor.py
    lines 324-377, the kl_prcp and entropy losses; gamma 0.01 in examples/config.yaml line 37),
    per token weighted by (6):

        J_PAPO = sum_t tw_t * ( -gamma * KL_prcp,t + eta * (H_t + H_masked,t) ),
        KL_prcp,t = k3(logp_t, logp_masked_t) clamped to 10 (verl's low_var_kl),

    so minimising J *maximises* the KL between pi(.|I) and pi(.|I_masked). As in the official
    default (dp_actor.py line 46, RECOMPUTE_AUG_LOG_PROBS=False), the masked log-probs are pi_old's
    (no gradient through them), and the entropies are
    estimated on the sampled tokens, H_t ~ -logp_t (the masked one is then a constant). 0 when
    --papo-gamma is 0."""
    if not args.papo_gamma:
        return 0.0
    masked = v.masked[j]
    delta = (masked - logp).clamp(-20, 20)
    kl = (torch.exp(delta) - delta - 1).clamp(max=10)
    return (tw * (-args.papo_gamma * kl + args.papo_eta * (-logp - masked))).sum()
