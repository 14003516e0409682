"""Objective variants: other policy-gradient terms in place of GRPO's clipped surrogate (3)-(4).

Each is a plain function with grpo_vlm.clipped_surrogate's signature,

    surrogate(logp, logp_old, A, mask, eps_low, eps_high) -> (L, clipped)

with logp, logp_old and mask [N, L] (mask: 1 on each completion's tokens) and A [N, 1]; L is the
per-token term, [N, L] or [N, 1] (one value per completion), and clipped [N, L] marks where the
clip took the gradient away. grpo_vlm.grpo_loss picks one from SURROGATES by the flag's value,
and adds the KL (5) and the token weights (6) as for GRPO.
"""

import torch


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


# --importance-sampling VALUE -> its surrogate ("token": GRPO's own, in grpo_vlm.py)
SURROGATES = {"sequence": gspo_surrogate}
