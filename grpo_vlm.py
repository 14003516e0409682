"""GRPO for vision-language models, in the order a step runs: sample (0), reward (1), advantages
(2), the objective (3)-(5) with its token weights (6), the update, and train(), Algorithm 1.

    python grpo_vlm.py --task rec                        # tiny offline model + synthetic world
    python grpo_vlm.py --task rec --model PATH --train-data rows.jsonl --image-root DIR
    torchrun --nproc_per_node 2 grpo_vlm.py ...          # DDP (--fsdp: FSDP2)
    python grpo_vlm.py ... --resume runs/rec             # continue a run from its last checkpoint

Equations (../shared/REFERENCE.md), and where each is:
  (0) o_i ~ pi_old(. | q), i = 1..G, at temperature T          sample_group, draw_token
  (1) r_i = sum_k w_k R_k(o_i, gt)                             compute_rewards (R_k: rewards.py)
  (2) A_i = (r_i - mean(r_group)) / (std(r_group) + eps)       group_advantages
  (3) rho_t = exp(logp_t - logp_old_t)                         clipped_surrogate
  (4) L_t = -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i)   clipped_surrogate
  (5) KL_t = exp(logp_ref - logp) - (logp_ref - logp) - 1 (k3) k3_kl
  (6) token weights tw: per sequence, token mean or Dr. GRPO   token_weights (Dr. GRPO: / the
      fixed --max-completion-length, as TRL, also under --length-schedule)
  the objective J = sum_t tw_t (L_t + beta KL_t)               grpo_loss
  log pi(o_t | q, o_<t) / T on completion tokens only          vlm.packed_logps
  Algorithm 1 (DeepSeekMath): mu passes over each batch        policy_update, train
  GSPO's sequence ratio in place of (3)-(4)                    objectives.gspo_surrogate
  CISPO, SAPO, GMPO in place of (3)-(4) (--policy-loss)        objectives.surrogate
  GDPO, top-entropy tokens, TIS, NoisyRollout, PAPO, VPPO      objectives.py (README: Objectives)
  Vision-R1: the cold start                                    coldstart.cold_start
  Vision-R1: staged length (PTST) and rule refinement          stage_at; the rule acts in rewards.py
  DAPO: dynamic sampling                                       dynamic_rollout
  DAPO: overlong filtering; soft overlong punishment           train; compute_rewards
  entropy H_t = -sum_v p_v log p_v of softmax(logits / T)      decode_group
  thinking with images: turns with the zoom tool, whose tool     tools.rollout; tools.pack
      turns are context with no loss (--max-tool-calls)

Where we depart from the paper's plain description, and why:
  - keyed sampling: each token is an exact inverse-CDF draw whose uniform is a hash of (seed, step,
    completion, position), so a completion depends only on the model and its index: one process or
    two, before or after a resume, the same completions are drawn;
  - shared-prefix packing: each prompt and image is computed once, in the rollout (one prefill, its
    KV cache repeated G times) and in every training forward (its G completions after it in one
    row, a block mask);
  - a step whose loss or gradient is not finite makes no update (--max-bad-steps in a row stop).
The model family's plumbing is in vlm.py; the runtime (flags, processes, checkpoints, logs) in
infra.py; presets and flag checks in recipes.py; the held-out eval in evaluation.py.
"""

import copy
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import coldstart
import data
import evaluation
import infra
import objectives
import plan
import recipes
import rewards
import tools
import vlm

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "checkpoints", "tiny-qwen2.5-vl-rec")


def tiny_model(task):
    """The shipped tiny base of a task (make_tiny_model.py --task TASK rebuilds it)."""
    return os.path.join(HERE, "checkpoints", f"tiny-qwen2.5-vl-{task}")


# ---------------------------------------------------------------------------------------------
# Flags: the algorithm's, then Vision-R1's and the variants'; data, engine, run and logging flags
# are mixins from data.py and infra.py. `--help` lists them in that order.
@dataclass
class VisionR1Flags:
    """Vision-R1: the cold start, staged length (PTST) and progressive rule refinement"""

    sft_steps: int = 0
    """Vision-R1's cold start: supervised steps on chain-of-thought targets before GRPO (0: none)"""
    sft_lr: float = 2e-4
    """learning rate of the cold start"""
    length_schedule: str = ""
    """Vision-R1's PTST: completion-length cap by stage, "step:cap,..." e.g. 0:16,300:32,600:48
    (empty: fixed)"""
    iou_threshold_schedule: str = ""
    """Vision-R1's rule refinement by stage, "step:t,..." (IoU counts from t; rec, det) or
    "step:t/lo/hi,..." (Eq. 8)"""


@dataclass
class VariantFlags:
    """Variants: GSPO's sequence ratio, DAPO's dynamic sampling and overlong handling"""

    importance_sampling: str = "token"
    """ratio: token (eq. 3) or sequence (GSPO, Zheng et al. 2025: s_i = exp(mean_t(logp -
    logp_old)) clipped whole; the same as --policy-loss gspo)"""
    dynamic_sampling: int = 0
    """DAPO (Yu et al. 2025): drop groups whose rewards are all equal, refill from up to N more
    rounds of B (0: off)"""
    dynamic_sampling_metric: str = "reward"
    """what must differ in a kept group: reward (the total) or one reward's name, e.g. iou (verl
    filters on the accuracy reward)"""
    overlong_filter: bool = False
    """DAPO's overlong filtering: a completion cut off at the length cap gets no loss"""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last N tokens before the cap L: r +=
    clip((L-N-|o|)/N, -1, 0) (0: off)"""


@dataclass
class Args(
    VisionR1Flags,
    VariantFlags,
    objectives.ObjectiveFlags,
    tools.ToolFlags,
    data.DataFlags,
    infra.EngineFlags,
    infra.RunFlags,
    infra.LogFlags,
):
    """GRPO: the algorithm"""

    task: str = "rec"
    """rec (referring expression -> box), cls (image -> label), count (image -> number), det
    (image -> boxes)"""
    preset: str = ""
    """a paper's recipe (prompt, rewards, loss), then an algorithm's: vlm-r1, visual-rft, r1-v,
    vision-r1-zhan, vision-r1-huang; gspo, dapo, dr-grpo; e.g. vlm-r1,gspo (README: "Reproducing
    the papers"); flags win; empty: tiny-model defaults"""
    steps: int = 1000
    """optimizer steps (each on one rollout batch when mu=1)"""
    prompts_per_step: int = 4
    """B: prompts per step; a step samples B * G completions"""
    num_generations: int = 8
    """G: completions sampled per prompt"""
    max_completion_length: int = 48
    """maximum new tokens per completion"""
    temperature: float = 1.0
    """T: sampling temperature, also applied to every log-prob"""
    reward_weights: str = ""
    """comma list name=w overriding the task's reward weights, e.g. iou=1,format=0.5, or after
    only: the whole reward, e.g. Vision-R1's Eq. 7: only:vr1_format=1,vr1_recall=1,vr1_precision=1;
    a name may be a plug-in, path/to/file.py:function (README: "Reward plug-ins")"""
    coord_space: str = "auto"
    """box coordinates the model emits: auto, abs_resized (Qwen2.5-VL), norm1000 (Qwen2-VL),
    abs_original"""
    scale_rewards: str = "group"
    """advantage std scaling: group, batch or none (Dr. GRPO)"""
    beta: float = 0.04
    """weight of the k3 KL to the frozen reference model (0: no reference model is loaded)"""
    eps_low: float = 0.2
    """lower clip range of the ratio"""
    eps_high: float = 0.2
    """upper clip range of the ratio (0.28 is DAPO's clip-higher)"""
    loss_agg: str = "grpo"
    """token aggregation: grpo (per-sequence mean), token (token mean), drgrpo (sum / (N *
    max_len))"""
    mu: int = 1
    """optimisation passes per rollout batch (1: rho = 1, the clip never fires)"""
    lr: float = 2e-4
    """AdamW learning rate"""
    lr_schedule: str = "constant"
    """constant, or linear decay to 0 at --steps (both after --warmup-steps)"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""


def parse_args(argv=None):
    """Args: defaults < the task's defaults < the preset < the flags given (recipes.py)."""
    presets, choices = recipes.preset_values, recipes.CHOICES
    args = infra.parse_args(Args, argv, recipes.TASK_DEFAULTS, presets, choices, "grpo_vlm.py")
    return recipes.check(args)


@dataclass
class Stage:
    """What Vision-R1's schedules set at a step."""

    max_len: int  # L: the completion-length cap (PTST, --length-schedule)
    rule: dict  # the IoU criterion of rule refinement (--iou-threshold-schedule)


def stage_at(args, step):
    """Vision-R1's staged length (Huang et al., PTST) and progressive rule refinement (Zhan et al.,
    Eq. 8) at `step`. The rule travels to the rewards inside the ground truths
    (data.ground_truths) and acts in rewards.py."""
    max_len = recipes.stage_value(args.length_schedule, step, args.max_completion_length)
    no_rule = {"iou_threshold": 0.0}
    rule = recipes.stage_value(args.iou_threshold_schedule, step, no_rule, rewards.refinement_stage)
    return Stage(max_len, rule)


# ---------------------------------------------------------------------------------------------
# (0) Group sampling: G completions per prompt from one prefill of each prompt, each token an exact
# inverse-CDF draw of softmax(logits / T) whose u is hashed from (seed, step, completion, position).
@dataclass
class Decoding:
    """How (0) decodes."""

    max_new_tokens: int  # L: tokens per completion at most
    T: float = 1.0  # the temperature
    min_new_tokens: int = 0  # no EOS before this many tokens
    chunk: int = 0  # completions decoding at once (--rollout-batch-size; 0: all)
    greedy: bool = False  # argmax instead of a keyed draw (the held-out eval)


class Samples(NamedTuple):
    """The completions of (0), prompt-major (prompt 0's G completions first); n*G rows."""

    o: torch.Tensor  # [n*G, L] tokens, padded after the first EOS
    logp: torch.Tensor  # [n*G, L] their log-probs / T under the sampler
    H: torch.Tensor  # [n*G, L] the entropy of softmax(logits / T) at each of them


def inverse_cdf_draw(logits, T, u):
    """[N] tokens, one per row of softmax(logits [N, V] / T): the first v whose CDF exceeds u [N],
    u in (0, 1) (exercise 6)."""
    cdf = (logits.double() / T).softmax(-1).cumsum(-1)
    token = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp(max=logits.shape[-1] - 1)  # u * cdf[-1] rounding up past the last entry


def draw_token(logits, keys, position):
    """One token per row of softmax(logits) (logits already / T), u hashed from (key, position)."""
    h = infra.hash32
    u = (h(h(keys + h(torch.tensor(position, device=keys.device)))).double() + 0.5) / 2**32
    return inverse_cdf_draw(logits, 1.0, u)


@torch.no_grad()
def sample_group(model, family, prompt, G, dec, keys=None):
    """(0): G completions of each prompt, drawn with `keys` (one per completion), or greedy. At most
    dec.chunk completions decode at once (--rollout-batch-size bounds the KV cache): a keyed draw
    depends on its key alone, so the chunks draw the same tokens as one batch would."""
    if not dec.chunk or dec.chunk >= len(prompt["input_ids"]) * G:
        return decode_group(model, family, prompt, G, dec, keys)
    n, k = len(prompt["input_ids"]), dec.chunk // G  # prompts, and prompts per chunk
    chunks = []
    for i in range(0, n, k):
        part = family.select(prompt, i, min(i + k, n))
        part_keys = None if keys is None else keys[i * G : (i + k) * G]
        chunks.append(decode_group(model, family, part, G, dec, part_keys))
    return Samples(*(torch.cat(x) for x in zip(*chunks)))


@torch.no_grad()
def decode_group(model, family, prompt, G, dec, keys):
    """G completions of each prompt from one prefill (its KV cache repeated G times), one token of
    every completion per step, until all have ended; after its EOS a completion is padded."""
    was_training = model.training
    model.eval()
    logits, state = family.prefill(model, prompt, G, dec.max_new_tokens)
    keys = None if keys is None else keys.to(logits.device)
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens, logps, entropy = [], [], []
    for t in range(dec.max_new_tokens):
        scaled = logits / dec.T
        logp_all = scaled.log_softmax(-1)  # the policy's log-probs, as the training forward's
        entropy.append(-(logp_all.exp() * logp_all).sum(-1))  # H_t, from the whole distribution
        scaled[:, family.suppress] = -float("inf")  # e.g. an image placeholder: never sampled
        if t < dec.min_new_tokens:
            scaled[:, family.eos_id] = -float("inf")
        token = scaled.argmax(-1) if dec.greedy else draw_token(scaled, keys, t)
        logps.append(logp_all.gather(1, token[:, None]).squeeze(1))
        tokens.append(torch.where(done, family.pad_id, token))
        done |= token == family.eos_id
        if t == dec.max_new_tokens - 1 or done.all():
            break
        logits = family.decode(model, tokens[-1], state, t)
    model.train(was_training)
    pad = dec.max_new_tokens - len(tokens)  # pad to a fixed width
    o = F.pad(torch.stack(tokens, 1), (0, pad), value=family.pad_id)
    return Samples(o, *(F.pad(torch.stack(x, 1), (0, pad)) for x in (logps, entropy)))


def greedy(model, family, prompt, max_new_tokens):
    """[n, L] greedy completions, one per prompt: the held-out eval's decoding (evaluation.py)."""
    return sample_group(model, family, prompt, 1, Decoding(max_new_tokens, greedy=True)).o


# ---------------------------------------------------------------------------------------------
# (1) Rewards: r_i = sum_k w_k R_k(o_i, gt); each component is also returned for logging.
def reward_weights(args):
    """w_k: the task's reward weights (a paper preset's: rewards.RECIPES), with --reward-weights
    name=w,... (a built-in or file.py:function) overriding."""
    if args.task not in rewards.TASK_REWARDS:
        known = sorted(rewards.TASK_REWARDS)
        sys.exit(f"error: --task {args.task!r} is not supported; choose from {known}")
    bonus = f",tool_bonus={args.tool_bonus}" if args.tool_bonus else ""  # DeepEyes' tool reward
    try:
        return rewards.parse_weights(args.task, args.reward_weights + bonus, recipes.paper(args))
    except ValueError as e:
        sys.exit(f"error: --reward-weights: {e}")


def compute_rewards(texts, truths, weights, lengths=None, L_max=0, L_cache=0):
    """(r [N], {name: R_k [N]}) of the completions `texts` against their ground truths."""
    components = {
        k: torch.tensor([rewards.function(weights, k)(t, gt) for t, gt in zip(texts, truths)])
        for k in weights
    }
    total = sum(w * components[k] for k, w in weights.items())
    if L_cache:  # DAPO's soft overlong punishment: 0 up to L_max - L_cache tokens, -1 at the cap
        components["overlong"] = ((L_max - L_cache - lengths) / L_cache).clamp(-1, 0)
        total = total + components["overlong"]
    return total, components


# ---------------------------------------------------------------------------------------------
# A step's batch: (0) and (1) for B prompts drawn by data.draw, the same on every process; each
# process samples and rewards its share of them.
@dataclass
class Batch:
    """This process's share of a step's rollout: b prompts, G completions each (N = b*G rows)."""

    rows: list  # [b] the prompts' data rows
    prompt: dict  # the family's encoding of the b prompts, images included
    o: torch.Tensor  # [N, L] completion tokens
    logp: torch.Tensor  # [N, L] log-probs / T under the sampler (only for the logp_gap alarm)
    H: torch.Tensor  # [N, L] entropy at each token
    mask: torch.Tensor  # [N, L] 1 up to and including the first EOS
    cut: torch.Tensor  # [N] 1 where a completion reached the cap without an EOS
    texts: list  # [N] the completions' text
    truths: list  # [N] ground truths, with image sizes, coordinate space and the IoU rule
    r: torch.Tensor  # [N] rewards (1)
    components: dict  # {name: [N]} each R_k, for the logs
    dynamic: dict  # DAPO's dynamic sampling: rollouts spent and shortfall ({}: off)
    noisy: objectives.Noisy = None  # NoisyRollout's distorted images, and who was sampled on them
    turns: tools.Turns = None  # multi-turn rollouts: the tool turns inside the completions


@dataclass
class Run:
    """The run's fixed objects."""

    model: torch.nn.Module  # pi_theta, fp32 weights
    family: vlm.Qwen2VL  # its family's adapter (vlm.ADAPTERS; each extends Qwen2VL)
    policy: torch.nn.Module  # log pi_theta / T of packed completions, under DDP or FSDP2
    ref: torch.nn.Module  # log pi_ref / T, the same forward on the frozen reference (beta=0: None)
    opt: torch.optim.Optimizer
    procs: infra.Processes  # every process's rows, this one's share, the loss scale
    weights: dict  # w_k of (1)
    coord_space: str  # the coordinates of the boxes the model emits


def rollout(run, rows, rng, step, stage, args):
    """(0) and (1) of a step: B prompts, G completions each from pi_old, and their rewards."""
    if args.dynamic_sampling:
        return dynamic_rollout(run, rows, rng, step, stage, args)
    return sample_and_reward(run, data.draw(rng, rows, args.prompts_per_step), 0, step, stage, args)


def sample_and_reward(run, drawn, k, step, stage, args):
    """Round k of a step's rollout: this process's share of the B prompts `drawn`, G completions
    of each, keyed by their index in the step's rounds, and their rewards."""
    B, G = args.prompts_per_step, args.num_generations
    mine = run.procs.mine(drawn)
    encoded = infra.encode(run.family, mine, step, args, run.procs.device)
    keys = infra.sample_keys(args.seed, step, run.procs.mine(range(k * B * G, (k + 1) * B * G)))
    L, T, chunk = stage.max_len, args.temperature, args.rollout_batch_size
    dec = Decoding(L, T, args.min_completion_length, chunk)
    noisy = None
    if args.noisy_rollout_share:  # NoisyRollout: a share of each group on a distorted image
        decoding = (G, dec, keys)
        samples, noisy = objectives.noisy_rollout(
            sample_group, run, mine, encoded[0], decoding, step, args
        )
    elif args.max_tool_calls:  # thinking with images: conversations with the zoom tool
        limits = (args.max_tool_calls, args.max_context_length)
        env = tools.environment(run.family, mine, encoded, run.coord_space, *limits)
        env.widest = run.procs.widest  # the conversations' width over every process
        decode = tools.keyed(sample_group, run.model, run.family, dec, keys)
        samples = tools.rollout(decode, env, encoded[0], G, L)  # tools.Conversations
    else:
        samples = sample_group(run.model, run.family, encoded[0], G, dec, keys)
    batch = score(run, mine, encoded, samples, stage, args)
    batch.noisy = noisy
    return batch


def score(run, rows, encoded, samples, stage, args):
    """(1) for the completions of `rows` (encoded: the family's (prompt, sizes)): a Batch.
    `samples`: Samples, or tools.Conversations (multi-turn, with their Turns)."""
    (prompt, sizes), eos_id, G = encoded, run.family.eos_id, len(samples.o) // len(rows)
    turns = getattr(samples, "turns", None)
    if turns:  # multi-turn: the loss's tokens are the generated ones; the texts hold tool turns
        mask, cut, texts = turns.gen, turns.cut, turns.texts
    else:
        mask = vlm.completion_mask(samples.o, eos_id)
        cut = (~(samples.o == eos_id).any(1)).float()
        texts = vlm.completion_texts(run.family.tokenizer, samples.o, mask)
    truths = data.ground_truths(rows, sizes, run.coord_space, stage.rule)
    truths = [t for t in truths for _ in range(G)]
    L_cache = args.overlong_buffer
    r, components = compute_rewards(texts, truths, run.weights, mask.sum(1), stage.max_len, L_cache)
    o, logp, H = samples[:3]
    return Batch(rows, prompt, o, logp, H, mask, cut, texts, truths, r, components, {}, None, turns)


def dynamic_rollout(run, rows, rng, step, stage, args):
    """DAPO's dynamic sampling (Yu et al. 2025): drop the groups whose rewards are all equal and
    roll out up to --dynamic-sampling more rounds of B prompts. The batch is the first B
    informative groups in draw order (at the cap, those found: the same number on every process),
    so one process or two train on the same batch."""
    B, G = args.prompts_per_step, args.num_generations
    pool, spent = [], 0  # the informative groups found: (row, its Samples)
    for k in range(1 + args.dynamic_sampling):
        drawn = data.draw(rng, rows, B)  # B prompts, the same on every process
        batch = sample_and_reward(run, drawn, k, step, stage, args)
        spent += B
        metric = batch.components.get(args.dynamic_sampling_metric, batch.r)  # what must differ
        o, logp, H, r = (run.procs.gather(x) for x in (batch.o, batch.logp, batch.H, metric))
        for j, g in enumerate(slice(j * G, (j + 1) * G) for j in range(B)):
            if r[g].max() > r[g].min():  # an informative group: its rewards differ
                pool.append((drawn[j], Samples(o[g], logp[g], H[g])))
        if len(pool) >= B:
            break
    kept = run.procs.round_down(min(len(pool), B))  # the same number on every process
    dynamic = {"rollouts": spent * G, "shortfall": B - kept}
    if kept == 0:  # not one informative group: the last round, as plain GRPO would train it
        batch.dynamic = dynamic
        return batch
    mine = run.procs.mine(pool[:kept])
    mine_rows = [row for row, _ in mine]
    encoded = infra.encode(run.family, mine_rows, step, args, run.procs.device)
    samples = Samples(*(torch.cat(x) for x in zip(*(s for _, s in mine))))
    batch = score(run, mine_rows, encoded, samples, stage, args)
    batch.dynamic = dynamic
    return batch


# ---------------------------------------------------------------------------------------------
# (2) Group-normalised advantages. ddof=1 (unbiased std) and eps=1e-4, as TRL.
def group_advantages(r, G, scale="group", eps=1e-4):
    """A [N] from the rewards r [N] of N/G groups of G completions (prompt-major)."""
    rg = r.view(-1, G)
    centered = rg - rg.mean(1, keepdim=True)
    if scale == "group":
        centered = centered / (rg.std(1, keepdim=True, unbiased=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std(unbiased=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale!r}")
    # a group whose rewards are all equal carries no signal: exactly 0, never NaN or rounding noise
    centered = centered * (rg.amax(1, keepdim=True) > rg.amin(1, keepdim=True))
    return centered.reshape(-1)


# ---------------------------------------------------------------------------------------------
# (3)-(5) The clipped surrogate and the k3 KL, per token; grpo_loss weighs them with (6).
def clipped_surrogate(logp, logp_old, A, mask, eps_low, eps_high):
    """(3)-(4) per token [N, L], and where the clip took the gradient away. A is [N, 1]; `mask`
    is unused here (objectives.py's variants share this signature)."""
    rho = torch.exp(logp - logp_old)  # (3)
    L = -torch.min(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)  # (4)
    clipped = ((rho < 1 - eps_low) & (A < 0)) | ((rho > 1 + eps_high) & (A > 0))
    return L, clipped


def k3_kl(logp, logp_ref):
    """(5) the k3 estimator of KL(pi_theta || pi_ref) per token: >= 0, and 0 where they agree."""
    delta = logp_ref - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(logp, logp_old, logp_ref, A, tw, args):
    """The objective minimised, on one micro-batch of completions ([N, L] log-probs, A [N]):

        J = sum_{i,t} tw_{i,t} * (L_{i,t} + beta * KL_{i,t})

    L is the clipped surrogate (3)-(4) (--policy-loss: GSPO's, CISPO's, ... objectives.py), A [N]
    or per token [N, L] (objectives.shape_advantages, tis),
    KL the k3 estimator (5), and tw the token weights (6) of --loss-agg, over the global batch of
    N_all completions, 0 on padding:
        grpo    tw = 1 / (N_all * |o_i|)   mean over each completion's tokens, then completions
        token   tw = 1 / sum_i |o_i|       mean over all the batch's tokens (DAPO)
        drgrpo  tw = 1 / (N_all * L)       Dr. GRPO, L the fixed --max-completion-length
    so the micro-batches' and the processes' J add up to the whole batch's.
    At mu = 1 (the default) logp_old is logp itself, detached: rho = 1 exactly, the clip never
    fires, and the gradient is REINFORCE's with group-normalised advantages, plus beta * the KL's.
    Returns J and the KL's and the clipped tokens' sums over the tokens with tw > 0."""
    mask = (tw > 0).float()
    surrogate = objectives.surrogate(args) or clipped_surrogate  # --policy-loss
    L, clipped = surrogate(logp, logp_old, A.view(len(A), -1), mask, args.eps_low, args.eps_high)
    kl = torch.zeros_like(logp)
    if args.beta > 0:
        kl = k3_kl(logp, logp_ref)
        L = L + args.beta * kl
    J = (L * tw).sum()
    return J, {"kl_sum": (kl.detach() * mask).sum(), "clip_sum": (clipped.float() * mask).sum()}


# ---------------------------------------------------------------------------------------------
# (6) Aggregation as per-token weights over the *whole* batch, so that k micro-batches of
# sum(L_t * tw_t) add up to exactly the whole batch's loss (gradient accumulation is exact).
def token_weights(mask, mode, L=None):
    """tw [N, L] from the completion masks of the whole batch (grpo_loss writes each); L: Dr.
    GRPO's fixed normaliser, --max-completion-length as TRL's (None: the masks' width)."""
    N, L = len(mask), L or mask.shape[1]
    if mode == "grpo":  # mean over each completion's tokens, then mean over completions
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / N
    if mode == "token":  # sum over all tokens / tokens in the batch
        return mask / mask.sum().clamp(min=1)
    if mode == "drgrpo":  # sum over all tokens / (num completions * max_completion_length)
        return mask / (N * L)
    raise ValueError(f"loss_agg must be grpo, token or drgrpo, not {mode!r}")


class Everyone(NamedTuple):
    """What (2), (6) and the logs need of every process's rows (N_all = B * G)."""

    r: torch.Tensor  # [N_all] rewards
    mask: torch.Tensor  # [N_all, L] completion masks
    cut: torch.Tensor  # [N_all] 1 where a completion reached the cap without an EOS


# ---------------------------------------------------------------------------------------------
# Algorithm 1's inner loop: mu passes over the batch, in micro-batches whose gradients accumulate.
def pack(run, batch, s, G):
    """Micro-batch s (a slice of completions) in the family's shared-prefix layout: each of its
    prompts once, with its completions after it."""
    first, last = s.start // G, (s.stop - 1) // G + 1  # the prompts of completions s
    copies = torch.arange(s.start, s.stop, device=batch.o.device) // G - first  # each one's prompt
    prompt = run.family.select(batch.prompt, first, last)
    if batch.turns:  # tool turns inside the completions: context with images, no loss
        return tools.pack(run.family, run.model, prompt, copies, batch.o[s], batch.turns[s])
    return run.family.pack(run.model, prompt, copies, batch.o[s], batch.mask[s])


def policy_update(run, batch, A, tw, args):
    """mu optimizer steps on the objective J of this process's rows. logp_old is the policy's own
    forward before the first pass (no gradient): as the batch was sampled from these weights, that
    equals storing the rollout's log-probs, computed the way every later pass computes logp. The
    rollout's log-probs only check it (logp_gap). Returns the step's statistics (infra.Stats)."""
    N, mb, G = len(batch.o), args.micro_batch_size, args.num_generations
    mbs = [slice(i, min(i + mb, N)) for i in range(0, N, mb)]
    with torch.no_grad():  # one layout per micro-batch, for every forward
        packed = [pack(run, batch, s, G) for s in mbs]
        logp_old = [run.policy(p) for p in packed] if args.mu > 1 or args.vppo_share else None
        logp_ref = [run.ref(p) for p in packed] if run.ref else None
    views = objectives.views(pack, run, batch, mbs, args)  # pi_old on masked, distorted images
    A = objectives.shape_advantages(A, batch, logp_old, views, run.procs, args)  # tokens: [N, L]
    stats = infra.Stats.zeros(A.device)
    for k in range(args.mu):
        J_pass = torch.zeros((), device=A.device)  # this pass's objective on this process
        for j, s in enumerate(mbs):
            with run.procs.no_sync(run.policy, last=j == len(mbs) - 1):
                logp = run.policy(packed[j])
                old = logp_old[j] if logp_old else logp.detach()  # mu = 1: rho = 1
                ref = logp_ref[j] if logp_ref else None
                seen = objectives.seen(old, views, j, batch.noisy, s)  # on the image sampled from
                A_s = objectives.tis(A[s], seen, batch.logp[s], args)  # TIS: A * min(ratio, C)
                J, st = grpo_loss(logp, old, ref, A_s, tw[s], args)
                J = J + objectives.papo_term(logp, views, j, tw[s], args)  # PAPO's; 0 when off
                # DDP and FSDP2 average the processes' gradients: scaled back to their sum
                (J * run.procs.scale).backward()
            J_pass += J.detach()
            stats.loss += J.detach()
            stats.kl += st["kl_sum"] / args.mu
            stats.clipped += st["clip_sum"] / args.mu
            if k == 0:  # the alarm: do the sampler and the trainer agree on pi_old?
                stats.add_gap(seen, batch.logp[s], batch.mask[s])
        stats.grad_norm, made = infra.optimizer_step(run.model, run.opt, J_pass, run.procs, args)
        stats.skipped += not made  # a non-finite loss or gradient: no update
    return stats


def reference_model(args, model, family, resumed, base, device):
    """pi_ref of the KL term (5) as a forward (infra.Policy): the starting model (after any cold
    start), also after a resume; with LoRA that is the same model with its adapters off (no copy);
    None if beta=0."""
    if args.beta == 0:
        return None
    T, chunk = args.temperature, args.logp_chunk
    if args.lora_r:
        return infra.Policy(model, family, T, chunk, functools.partial(vlm.adapters_off, model))
    cold = os.path.join(args.output_dir, "cold-start")
    ref = vlm.load(cold if args.sft_steps else base, device)[0] if resumed else copy.deepcopy(model)
    if device.startswith("cuda"):
        ref.to(torch.bfloat16)  # never trained: bf16 weights suffice, at half the memory
    ref = infra.Policy(ref.eval().requires_grad_(False), family, T, chunk)
    return infra.reference(args, ref, base, device)  # under --fsdp whole if it fits, else sharded


# ---------------------------------------------------------------------------------------------
# Training: Algorithm 1 of the GRPO paper, one rollout batch per step.
def train(args):
    procs = infra.processes(args)  # infra: torchrun's processes, or this one
    weights, base, G = (
        reward_weights(args),
        args.model or tiny_model(args.task),
        args.num_generations,
    )
    # infra: the rows, checked before any weight loads; the prompt sampler (the data position)
    rows, bad_rows, held = infra.load_data(args, base, evaluation.splits(args.task))
    rng = infra.prompt_sampler(args.seed)
    ckpt, state = infra.resume(args, Args, rng)  # infra: a checked resume (None, None: a new run)
    start = state["step"] if state else 0
    model, family = vlm.load(ckpt or base, procs.device)  # pi_theta in fp32, and its adapter
    tools.check_family(model.config.model_type, args.max_tool_calls)
    coord_space = family.coord_space if args.coord_space == "auto" else args.coord_space
    if args.freeze_vision:
        family.vision(model).requires_grad_(False)
    log = infra.MetricsLog(args.output_dir, procs.main, start if state else None, args)
    if args.sft_steps and not state:  # Vision-R1's cold start
        coldstart.cold_start(model, family, rows, coord_space, args, log, procs.device)
    if args.lora_r and not state:  # LoRA on the starting model (a resumed run loaded its own)
        start_from = os.path.join(args.output_dir, "cold-start") if args.sft_steps else base
        vlm.add_lora(model, family, args, start_from)
    ref = reference_model(args, model, family, state, base, procs.device)
    if args.gradient_checkpointing:
        vlm.enable_checkpointing(model)
    model.train()
    policy, opt = infra.engine(args, model, family, state, procs)  # infra: DDP or FSDP2, optimizer
    run = Run(model, family, policy, ref, opt, procs, weights, coord_space)
    recipes.show(args, weights, functools.partial(infra.say, procs.main))  # the resolved recipe
    infra.start_banner(args, run, log, rows, bad_rows, base)
    eval_every = args.eval_every if held else 0  # synthetic splits (no --train-data), --eval-data
    if eval_every and not state:  # the curves' starting point
        evaluation.held_out_eval(greedy, run, args, 0, log, held)
    bad_steps = state.get("bad_steps", 0) if state else 0
    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        lr = infra.set_lr(opt, infra.lr_at(args, step))
        stage = stage_at(args, step)  # Vision-R1's staged length and rule refinement
        # (0) G completions of each prompt from pi_old, and (1) their rewards
        with infra.gathered(policy):  # under FSDP2 the weights are gathered once for the rollout
            batch = rollout(run, rows, rng, step, stage, args)
        # (2) advantages and (6) token weights over every process's rows; then this process's
        every = Everyone(*(procs.gather(x) for x in (batch.r, batch.mask, batch.cut)))
        r = objectives.rewards_for_advantages(every.r, batch, weights, procs, args)  # GDPO
        A = procs.mine(group_advantages(r, G, args.scale_rewards))
        kept = every.mask * (1 - every.cut[:, None]) if args.overlong_filter else every.mask
        L = args.max_completion_length  # Dr. GRPO's fixed normaliser, also under PTST's stages
        tw = procs.mine(token_weights(kept, args.loss_agg, L))  # DAPO's overlong filter: kept
        # (3)-(5) mu passes of the clipped objective with the KL to pi_ref
        stats = policy_update(run, batch, A, tw, args)
        bad_steps = bad_steps + 1 if stats.skipped else 0
        logged = {"lr": lr, **step_stage(stage, args), "seconds": time.time() - t0}
        m = infra.step_row(args, procs, step, batch, every, stats, **logged)
        log.step(m, args, batch, bad_steps)  # infra: metrics.jsonl, progress line, samples
        if step == start + 1:  # the alarm for an adapter's silent failure: pi_old disagreement
            limit = args.max_logp_gap or vlm.logp_gap_limit(model)
            infra.check_logp_gap(m, limit, model.config.model_type)
        if eval_every and (step % eval_every == 0 or step == args.steps):
            evaluation.held_out_eval(greedy, run, args, step, log, held)
        infra.save_or_stop(args, step, bad_steps, run, rng)  # infra: checkpoints, signals
    return infra.finish(args, run, log, bad_rows)  # infra: curves, the final model


def step_stage(stage, args):
    """The stage's values, for the metrics row, where a schedule sets them."""
    return {
        **({"max_len": stage.max_len} if args.length_schedule else {}),
        **(stage.rule if args.iou_threshold_schedule else {}),
    }


if __name__ == "__main__":
    infra.catch_signals()  # infra: Ctrl-C / SIGTERM finish the step, save and exit
    args = parse_args()
    base = args.model or tiny_model(args.task)
    sys.exit(plan.show(args, base)) if args.plan else train(args)  # plan: the memory plan
