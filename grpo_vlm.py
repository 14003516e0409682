"""GRPO for vision-language models, in the order the algorithm runs.

    python grpo_vlm.py --task rec                      # tiny offline model + synthetic world
    python grpo_vlm.py --task rec --model PATH --train-data rows.jsonl --image-root DIR
    torchrun --nproc_per_node 2 grpo_vlm.py ...        # DDP (--fsdp: FSDP2); --resume DIR continues a run

Equations (../shared/REFERENCE.md):
  (0) o_i ~ pi_old(. | q), i = 1..G, at temperature T           -> sample_group, draw (keys: infra.sample_keys)
  (1) r_i = sum_k w_k R_k(o_i, gt)                              -> compute_rewards
  (2) A_i = (r_i - mean(r_group)) / (std(r_group) + eps)        -> group_advantages
  (3) rho_t = exp(logp - logp_old); GSPO: s_i = exp(mean_t(...))  -> grpo_loss
  (4) L_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) -> grpo_loss
  (5) KL_t = exp(logp_ref - logp) - (logp_ref - logp) - 1  (k3) -> grpo_loss
  (6) aggregation: per-sequence / token-mean / Dr. GRPO         -> token_weights
  log pi(o_t | q, o_<t) / T over completion tokens only         -> vlm.packed_logps, vlm.chunked_logps
  Algorithm 1 (DeepSeekMath): batch, rollout, reward, advantage, mu passes   -> train, policy_update
  Vision-R1: cold start, staged length, progressive rule refinement          -> cold_start, stage_value
  DAPO: dynamic sampling -> rollout; overlong filtering and soft punishment -> train,
  compute_rewards
  entropy H_t = -sum_v p_v log p_v of softmax(logits / T), at each sampled token  -> sample_group

Where we depart from the paper's plain description, and why:
  - keyed sampling: each token is an exact inverse-CDF draw whose uniform is a hash of (seed, step,
    completion, position), so a completion depends only on the model and its index: one process or
    two, before or after a resume, the same completions are drawn;
  - shared-prefix packing: each prompt and image is computed once, in the rollout (one prefill, its
    KV cache repeated G times) and in every training forward (its G completions after it in one row,
    a block mask);
  - a step whose loss or gradient is not finite makes no update (--max-bad-steps in a row stop the
    run).
The model family's plumbing is in vlm.py; the runtime (flags, processes, checkpoints, logs, signals)
in infra.py.
"""

import contextlib
import copy
import functools
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import data
import infra
import plan
import rewards
import viz
import vlm

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "checkpoints", "tiny-qwen2.5-vl-rec")


def tiny_model(task):
    """The shipped tiny base of a task (make_tiny_model.py --task TASK rebuilds it)."""
    return os.path.join(HERE, "checkpoints", f"tiny-qwen2.5-vl-{task}")


@dataclass
class Args(
    data.DataFlags, infra.EngineFlags
):  # + the readers' flags (--eval-data, ...) and the engine's
    task: str = "rec"
    """rec (referring expression -> box), cls (image -> label), count (image -> number), det (image
    -> boxes)"""
    preset: str = ""
    """vlm-r1: VLM-R1's recipe for real models (set first; explicit flags override); empty:
    tiny-model defaults"""
    model: str = ""
    """HF hub id or local path of a Qwen2-VL / Qwen2.5-VL model; empty: the task's shipped tiny
    model"""
    train_data: str = ""
    """rows: JSONL (problem/solution, conversations, messages), parquet, Arrow, hub id; a:b joins;
    empty: synthetic"""
    image_root: str = ""
    """folder that the image paths of the rows are relative to (one per --train-data source, joined
    by ':')"""
    output_dir: str = ""
    """where metrics.jsonl, checkpoints and the final model go (empty: runs/TASK)"""
    steps: int = 1000
    """optimizer steps (each on one rollout batch when mu=1)"""
    seed: int = 0
    """seed of prompt order, sampling and init"""
    prompts_per_step: int = 4
    """B: prompts per step; a step samples B * G completions"""
    num_generations: int = 8
    """G: completions sampled per prompt"""
    max_completion_length: int = 48
    """maximum new tokens per completion"""
    min_completion_length: int = 0
    """no EOS before this many new tokens (benchmarks force equal work with it; 0: off)"""
    temperature: float = 1.0
    """T: sampling temperature, also applied to every log-prob"""
    beta: float = 0.04
    """weight of the k3 KL to the frozen reference model (0: no reference model is loaded)"""
    eps_low: float = 0.2
    """lower clip range of the ratio"""
    eps_high: float = 0.2
    """upper clip range of the ratio (0.28 is DAPO's clip-higher)"""
    mu: int = 1
    """optimisation passes per rollout batch"""
    loss_agg: str = "grpo"
    """token aggregation: grpo (per-sequence mean), token (token mean), drgrpo (sum / (N *
    max_len))"""
    scale_rewards: str = "group"
    """advantage std scaling: group, batch or none (Dr. GRPO)"""
    importance_sampling: str = "token"
    """ratio: token (eq. 3) or sequence (GSPO, Zheng et al. 2025: s_i = exp(mean_t(logp - logp_old))
    clipped whole)"""
    dynamic_sampling: int = 0
    """DAPO (Yu et al. 2025): drop groups whose rewards are all equal, refill from up to N more
    rounds of B (0: off)"""
    overlong_filter: bool = False
    """DAPO's overlong filtering: a completion cut off at the length cap gets no loss"""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment over the last N tokens before the cap L: r +=
    clip((L-N-|o|)/N, -1, 0) (0: off)"""
    lr: float = 2e-4
    """AdamW learning rate"""
    lr_schedule: str = "constant"
    """constant, or linear decay to 0 at --steps (both after --warmup-steps)"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    micro_batch_size: int = 16
    """completions per forward/backward; gradients accumulate to the full B * G batch"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory"""
    reward_weights: str = ""
    """comma list name=w overriding the task's reward weights, e.g. iou=1,format=0.5; a name may be
    a plug-in, path/to/file.py:function, taking (completion, gt) -> float (README: "Reward
    plug-ins")"""
    coord_space: str = "auto"
    """box coordinates the model emits: auto, abs_resized (Qwen2.5-VL), norm1000 (Qwen2-VL),
    abs_original"""
    logp_chunk: int = 1024
    """tokens per chunk when computing log-probs (the [tokens, vocab] logits never exist at once)"""
    sample_every: int = 100
    """print a few sample completions every N steps"""
    report_to: str = "none"
    """also log metrics.jsonl's rows and the sample completions to tensorboard (events in
    --output-dir) or wandb"""
    train_size: int = 0
    """training rows: synthetic images to make (0: 2000) or the first N of --train-data (0: all);
    cls balances classes"""
    eval_every: int = 250
    """greedy eval of the synthetic test/ood splits (not with --train-data) and --eval-data every N
    steps (0: never)"""
    eval_n: int = 128
    """held-out images per split for --eval-every"""
    skip_bad_rows: bool = False
    """skip and count rows whose JSON, text, box or image is unusable, instead of stopping with an
    error"""
    save_every: int = 250
    """write an atomic checkpoint (model, optimizer, schedule, RNG, data position) every N steps (0:
    never)"""
    resume: str = ""
    """continue from this checkpoint, or from the latest checkpoint in this output folder"""
    freeze_vision: bool = False
    """freeze the whole vision tower, merger included (VLM-R1's --freeze_vision_modules)"""
    max_bad_steps: int = 3
    """stop, with a checkpoint, after this many steps in a row with a non-finite loss or gradient"""
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
    max_logp_gap: float = 0.0
    """stop at step 1 if rollout and training log-probs differ by more than this per token on
    average, or 50x this at any token (0: 1e-4 in fp32, 0.02 under bf16 autocast; negative:
    never)"""


# A preset is a recipe for real models (VLM-R1's REC recipe for Qwen2.5-VL, full fine-tune); the
# task defaults are for the tiny offline models (README: "Other tasks"). Precedence: Args < task
# defaults < preset < explicit flags.
TASK_DEFAULTS = {
    "cls": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "count": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "det": dict(steps=300, max_completion_length=128),
}
PRESETS = {
    "vlm-r1": dict(
        lr=1e-6,
        beta=0.04,
        num_generations=8,
        temperature=1.0,
        eps_low=0.2,
        eps_high=0.2,
        mu=1,
        max_completion_length=256,
        prompts_per_step=16,
        micro_batch_size=8,
        loss_agg="grpo",
        scale_rewards="group",
        gradient_checkpointing=True,
        max_prompt_length=1024,
    )
}
CHOICES = {
    "task": data.TASKS,
    "preset": ("", *PRESETS),
    "loss_agg": ("grpo", "token", "drgrpo"),
    "scale_rewards": ("group", "batch", "none"),
    "lr_schedule": ("constant", "linear"),
    "importance_sampling": ("token", "sequence"),
    "coord_space": ("auto", "abs_resized", "norm1000", "abs_original"),
    "report_to": infra.REPORT_TO,
    **infra.ENGINE_CHOICES,
}


def parse_args(argv=None):
    args = infra.parse_args(Args, argv, TASK_DEFAULTS, PRESETS, CHOICES, "grpo_vlm.py")
    args.output_dir = args.output_dir or os.path.join("runs", args.task)
    if args.rollout_batch_size % args.num_generations:
        sys.exit(
            f"error: --rollout-batch-size {args.rollout_batch_size} must be a multiple of G={args.num_generations}"
        )
    if args.importance_sampling == "sequence" and args.loss_agg != "grpo":
        sys.exit(
            "error: --importance-sampling sequence (GSPO) aggregates per sequence: use --loss-agg grpo"
        )
    for name, parse in (
        ("length_schedule", int),
        ("iou_threshold_schedule", rewards.refinement_stage),
    ):
        try:
            stage_value(getattr(args, name), 0, None, parse)
        except ValueError as e:
            sys.exit(
                f"error: --{name.replace('_', '-')} {getattr(args, name)!r}: expected step:value,... ({e})"
            )
    return args


def stage_value(spec, step, default, parse=None):
    """A stage schedule "step:value,..." at `step`: the value of the last stage begun by then (read
    by `parse`)."""
    value, parse = default, parse or type(default)
    stages = (
        (int(a), parse(b)) for a, _, b in (item.partition(":") for item in spec.split(",") if item)
    )
    for start, v in sorted(stages, key=lambda stage: stage[0]):
        if step >= start:
            value = v
    return value


# ---------------------------------------------------------------------------------------------
# (0) Group sampling: G completions per prompt from one prefill of each prompt, each token an exact
# inverse-CDF draw of softmax(logits / T) whose u is hashed from (seed, step, completion, position).
def draw(logits, keys, position):
    """Sample one token per row of softmax(logits) by inverse CDF, with u in (0, 1) hashed from
    (key, position)."""
    h = infra.hash32
    u = (h(h(keys + h(torch.tensor(position, device=keys.device)))).double() + 0.5) / 2**32
    cdf = logits.double().softmax(-1).cumsum(-1)
    token = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_group(
    model, family, prompt, G, max_new_tokens, temperature, keys=None, min_new_tokens=0, rows=0
):
    """(completions [B*G, max_new_tokens], their log-probs / T, the entropy H_t = -sum_v p_v log p_v
    of softmax(logits / T) at each of their tokens): G samples per prompt with `keys`, greedy if
    None.

    Rows are prompt-major (prompt 0's G samples first). Decoding stops when every completion has
    ended; after its EOS a completion is padded. No EOS is drawn before `min_new_tokens`. At most
    `rows` completions decode at once (0: all): a keyed draw depends on its key alone, so the chunks
    draw the same tokens."""
    n = len(prompt["input_ids"]) if rows else 0
    if (
        rows and rows < n * G
    ):  # --rollout-batch-size: the KV cache holds `rows` completions, not B * G
        k = rows // G
        return tuple(
            torch.cat(x)
            for x in zip(
                *(
                    sample_group(
                        model,
                        family,
                        family.select(prompt, i, min(i + k, n)),
                        G,
                        max_new_tokens,
                        temperature,
                        keys[i * G : (i + k) * G] if keys is not None else None,
                        min_new_tokens,
                    )
                    for i in range(0, n, k)
                )
            )
        )
    eos_id, pad_id = family.eos_id, family.pad_id
    was_training = model.training
    model.eval()
    logits, state = family.prefill(model, prompt, G, max_new_tokens)
    keys = keys.to(logits.device) if keys is not None else None
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens, logps, entropy = [], [], []
    for t in range(max_new_tokens):
        scaled = logits / temperature
        logp_all = scaled.log_softmax(
            -1
        )  # the policy's log-probs, as the training forward computes them
        entropy.append(
            -(logp_all.exp() * logp_all).sum(-1)
        )  # where the full distribution exists anyway
        scaled[:, family.suppress] = -float(
            "inf"
        )  # e.g. a sampled image placeholder would break the next forward
        if t < min_new_tokens:
            scaled[:, eos_id] = -float("inf")
        token = draw(scaled, keys, t) if keys is not None else scaled.argmax(-1)
        logps.append(logp_all.gather(1, token[:, None]).squeeze(1))
        tokens.append(torch.where(done, pad_id, token))
        done |= token == eos_id
        if t == max_new_tokens - 1 or done.all():
            break
        logits = family.decode(model, tokens[-1], state, t)
    model.train(was_training)
    pad = max_new_tokens - len(tokens)  # pad to a fixed width
    completion = torch.nn.functional.pad(torch.stack(tokens, 1), (0, pad), value=pad_id)
    return completion, *(
        torch.nn.functional.pad(torch.stack(x, 1), (0, pad)) for x in (logps, entropy)
    )


def completion_mask(completion_ids, eos_id):
    """Mask from lengths: tokens up to and including the first EOS (pad may equal EOS)."""
    is_eos = completion_ids == eos_id
    L = completion_ids.shape[1]
    first_eos = torch.where(
        is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], L, dtype=torch.long)
    )
    lengths = (first_eos + 1).clamp(max=L)
    return (torch.arange(L, device=completion_ids.device)[None] < lengths[:, None]).float()


def completion_texts(tokenizer, completion_ids, mask):
    return [
        tokenizer.decode(c[: int(m.sum())], skip_special_tokens=True)
        for c, m in zip(completion_ids, mask)
    ]


# ---------------------------------------------------------------------------------------------
# (1) Rewards: r_i = sum_k w_k R_k(o_i, gt); each component is also returned for logging.
def reward_weights(args):
    """w_k: the task's reward weights, with --reward-weights name=w,... (a built-in or
    file.py:function) overriding."""
    if args.task not in rewards.TASK_REWARDS:
        sys.exit(
            f"error: --task {args.task!r} is not supported; choose from {sorted(rewards.TASK_REWARDS)}"
        )
    try:
        return rewards.parse_weights(args.task, args.reward_weights)
    except ValueError as e:
        sys.exit(f"error: --reward-weights: {e}")


def compute_rewards(texts, gts, weights, lengths=None, L_max=0, L_cache=0):
    components = {
        k: torch.tensor([rewards.REWARDS[k](t, gt) for t, gt in zip(texts, gts)]) for k in weights
    }
    total = sum(w * components[k] for k, w in weights.items())
    # DAPO's soft overlong punishment: 0 up to L_max - L_cache tokens, then down to -1 at the cap
    # L_max
    if L_cache:
        components["overlong"] = ((L_max - L_cache - lengths) / L_cache).clamp(-1, 0)
        total = total + components["overlong"]
    return total, components


# ---------------------------------------------------------------------------------------------
# (2) Group-normalized advantages. ddof=1 (unbiased std) and eps=1e-4, as TRL.
def group_advantages(r, G, scale="group", eps=1e-4):
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
# (6) Aggregation as per-token weights over the *full* batch, so that k micro-batches of
# sum(L_t * tw_t) add up to exactly the full-batch loss (gradient accumulation is exact).
def token_weights(mask, mode):
    N, L = mask.shape
    if mode == "grpo":  # mean over each completion's tokens, then mean over completions
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / N
    if mode == "token":  # sum over all tokens / tokens in the batch
        return mask / mask.sum().clamp(min=1)
    if mode == "drgrpo":  # sum over all tokens / (num completions * max_completion_length)
        return mask / (N * L)
    raise ValueError(f"loss_agg must be grpo, token or drgrpo, not {mode!r}")


# ---------------------------------------------------------------------------------------------
# (3)-(5) Clipped surrogate with k3 KL, per token.
def grpo_loss(logp, logp_old, logp_ref, A, tw, eps_low, eps_high, beta, sequence=False):
    """sum_t tw_t * L_t, and the KL and clipped-token sums over the tokens with tw_t > 0."""
    mask = (tw > 0).float()
    rho = torch.exp(logp - logp_old)  # (3); exactly 1 when logp_old = logp.detach()
    # GSPO: one ratio per completion, s_i = exp(mean_t(logp - logp_old)), clipped as a whole by (4)
    if sequence:
        rho = torch.exp(
            ((logp - logp_old) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        )
    A = A[:, None]
    per_token = -torch.min(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)  # (4)
    kl = torch.zeros_like(logp)
    if beta > 0:
        delta = logp_ref - logp
        kl = torch.exp(delta) - delta - 1  # (5) k3 estimator, >= 0
        per_token = per_token + beta * kl
    loss = (per_token * tw).sum()
    clipped = (
        (((rho < 1 - eps_low) & (A < 0)) | ((rho > 1 + eps_high) & (A > 0))).float() * mask
    ).sum()
    return loss, {
        "kl_sum": (kl.detach() * mask).sum(),
        "clip_sum": clipped,
    }  # tensors: no host sync here


# ---------------------------------------------------------------------------------------------
# Algorithm 1's inner loop: mu passes over the rollout batch, in micro-batches whose gradients
# accumulate.
def policy_update(
    policy, opt, model, ref, family, prompt, o, mask, logp_rollout, A, tw, args, world
):
    """mu optimizer steps on the batch's loss. Returns its statistics, summed over this process's
    tokens: loss, kl, clipped tokens, logp_gap (|log-prob of the rollout - of the training forward|,
    a check that the sampler and the trainer agree on pi_old) and its maximum; and the last grad
    norm and the skipped updates."""
    N, G, mb = len(o), args.num_generations, args.micro_batch_size
    mbs = [slice(i, min(i + mb, N)) for i in range(0, N, mb)]
    with (
        torch.no_grad()
    ):  # one layout per micro-batch (with each of its prompts once), for every forward
        packed = [
            family.pack(
                model,
                family.select(prompt, s.start // G, (s.stop - 1) // G + 1),
                torch.arange(s.start, s.stop, device=o.device) // G - s.start // G,
                o[s],
                mask[s],
            )
            for s in mbs
        ]
        logp_old = [policy(p) for p in packed] if args.mu > 1 else None
        logp_ref = [ref(p) for p in packed] if ref else None
    stats = {
        k: torch.zeros((), device=A.device)
        for k in ("loss", "kl", "clipped", "logp_gap", "logp_gap_max")
    }
    skipped = 0
    for k in range(args.mu):
        pass_loss = torch.zeros((), device=A.device)
        for j, s in enumerate(mbs):
            sync = (
                world == 1 or j == len(mbs) - 1
            )  # DDP syncs gradients in the last micro-batch only; FSDP2 in each
            with policy.no_sync() if not sync else contextlib.nullcontext():
                logp = policy(packed[j])
                loss, st = grpo_loss(
                    logp,
                    logp_old[j] if logp_old else logp.detach(),
                    logp_ref[j] if logp_ref else None,
                    A[s],
                    tw[s],
                    args.eps_low,
                    args.eps_high,
                    args.beta,
                    args.importance_sampling == "sequence",
                )
                loss.backward()
            pass_loss += loss.detach() / world
            stats["loss"] += loss.detach() / world
            stats["kl"] += st["kl_sum"] / args.mu
            stats["clipped"] += st["clip_sum"] / args.mu
            if k == 0:
                gap = (logp.detach() - logp_rollout[s]).abs() * mask[s]
                stats["logp_gap"] += gap.sum()
                stats["logp_gap_max"] = torch.maximum(stats["logp_gap_max"], gap.max())
        grad_norm = infra.clip_grad_norm(
            model, args.max_grad_norm
        )  # of gradients synced by DDP or FSDP2
        finite = infra.all_sum(torch.isfinite(pass_loss).float(), world).item() == world
        if finite and torch.isfinite(grad_norm):
            opt.step()
        else:  # a NaN/inf loss or gradient: skip this update rather than poison the weights
            skipped += 1
        opt.zero_grad(
            set_to_none=world == 1 or args.fsdp
        )  # freed for the rollout; DDP's are views of its buckets
    return stats, grad_norm, skipped


# --------------------------------------------------------------------------------------------- A
# step's batch: B prompts drawn (data.draw), encoded by the family (infra.encode), G completions and
# rewards each.
def rollout(
    model, family, rows, rng, step, max_len, rule, weights, coord_space, args, rank, world, device
):
    """(0) and (1) of a step: B prompts, the same on every process (b = B / world are ours), G
    completions each from pi_old, and their rewards. DAPO's dynamic sampling drops the groups whose
    rewards are all equal and rolls out up to --dynamic-sampling more rounds of B prompts; the batch
    is the first B informative groups in draw order (at the cap, those found: the same number on
    every process), so one process or two train on the same batch."""
    B, G, b = args.prompts_per_step, args.num_generations, args.prompts_per_step // world
    rewarded = functools.partial(
        score,
        family,
        max_len=max_len,
        rule=rule,
        weights=weights,
        coord_space=coord_space,
        args=args,
    )
    pool, spent = [], 0
    for k in range(1 + args.dynamic_sampling):
        drawn = data.draw(rng, rows, B)  # B prompts, the same on every process (any number of rows)
        mine = drawn[rank * b : (rank + 1) * b]
        prompt, sizes = infra.encode(family, mine, step, args, device)
        first = (
            k * B + rank * b
        ) * G  # the global index of our first completion in the step: its sampling key
        keys = infra.sample_keys(args.seed, step, range(first, first + b * G))
        ro = rewarded(
            mine,
            prompt,
            sizes,
            *sample_group(
                model,
                family,
                prompt,
                G,
                max_len,
                args.temperature,
                keys,
                args.min_completion_length,
                args.rollout_batch_size,
            ),
        )
        if not args.dynamic_sampling:
            return ro
        every = {key: infra.gather(ro[key].to(device), world) for key in ("o", "logp", "H", "r")}
        spent, rg = spent + B, every["r"].view(B, G)
        pool += [
            (drawn[j], {key: v[j * G : (j + 1) * G] for key, v in every.items()})
            for j in range(B)
            if rg[j].max() > rg[j].min()
        ]
        if len(pool) >= B:
            break
    n = min(len(pool), B) // world  # informative groups per process
    dynamic = {"rollouts": spent * G, "shortfall": B - n * world}
    if n == 0:  # not one informative group: the last round, as plain GRPO would train it
        return {**ro, "dynamic": dynamic}
    batch = [row for row, _ in pool[rank * n : (rank + 1) * n]]
    prompt, sizes = infra.encode(family, batch, step, args, device)
    o, logp, H = (
        torch.cat([group[key] for _, group in pool[rank * n : (rank + 1) * n]])
        for key in ("o", "logp", "H")
    )
    return {**rewarded(batch, prompt, sizes, o, logp, H), "dynamic": dynamic}


def score(family, batch, prompt, sizes, o, logp, H, max_len, rule, weights, coord_space, args):
    """(1) for a batch's completions: their masks, texts, ground truths, rewards r and
    components."""
    mask = completion_mask(o, family.eos_id)
    texts = completion_texts(family.tokenizer, o, mask)
    gts = [
        gt
        for gt in data.ground_truths(batch, sizes, coord_space, rule)
        for _ in range(len(o) // len(batch))
    ]
    r, components = compute_rewards(texts, gts, weights, mask.sum(1), max_len, args.overlong_buffer)
    return dict(
        batch=batch,
        prompt=prompt,
        o=o,
        logp=logp,
        H=H,
        mask=mask,
        texts=texts,
        gts=gts,
        r=r,
        components=components,
        dynamic={},
    )


# ---------------------------------------------------------------------------------------------
# Vision-R1's cold start: supervised steps on chain-of-thought targets before RL: a row's `response`
# if it has one, else data.sft_target. sft.py runs the same steps alone (the SFT baseline; the tiny
# bases' warm start).
def sft_loss(model, family, rows, coord_space, task, chunk, device="cpu"):
    """Mean negative log-likelihood of the target tokens of `rows`, EOS included."""
    prompt, sizes = family.encode(rows, device)
    tok = family.tokenizer
    texts = [
        (r.get("response") or data.sft_target(task, r, gt))
        + tok.convert_ids_to_tokens(family.eos_id)
        for r, gt in zip(rows, data.ground_truths(rows, sizes, coord_space))
    ]
    ids = tok(
        texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )["input_ids"]
    ids = ids.to(device)
    mask = completion_mask(ids, family.eos_id)
    logp = vlm.completion_logps(
        model, family, prompt, torch.arange(len(rows), device=device), ids, mask, 1.0, chunk
    )
    return -(logp * mask).sum() / mask.sum()


def sft_steps(model, family, rows, coord_space, args, steps, lr, device="cpu"):
    """Yield (step, loss) over `steps` supervised steps of --prompts-per-step rows, drawn as GRPO
    draws its prompts (data.draw with random.Random(seed)), so an SFT run with GRPO's seed and B
    sees GRPO's images in order."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = sft_loss(
            model,
            family,
            data.draw(rng, rows, args.prompts_per_step),
            coord_space,
            args.task,
            args.logp_chunk,
            device,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step, loss.item()


def cold_start(model, family, rows, coord_space, args, log, device):
    """SFT, then save the cold-started model: GRPO's start and its KL reference."""
    for s, loss in sft_steps(
        model, family, rows, coord_space, args, args.sft_steps, args.sft_lr, device
    ):
        log.write(
            {"step": 0, "sft_step": s, "sft_loss": loss},
            f"cold start step {s}/{args.sft_steps} loss={loss:.4f}"
            if s % 50 == 0 or s in (1, args.sft_steps)
            else None,
        )
    if log.main:
        family.save(model, os.path.join(args.output_dir, "cold-start"))
        print(f"saved {os.path.join(args.output_dir, 'cold-start')}", flush=True)


def reference_model(args, model, family, resumed, base, device):
    """pi_ref of the KL term (5) as a forward (infra.Policy): the starting model (after any cold
    start), also after a resume; with LoRA that is the same model with its adapters off (no copy);
    None if beta=0."""
    if args.beta == 0:
        return None
    if args.lora_r:
        return infra.Policy(
            model,
            family,
            args.temperature,
            args.logp_chunk,
            functools.partial(vlm.adapters_off, model),
        )
    cold = os.path.join(args.output_dir, "cold-start")
    ref = vlm.load(cold if args.sft_steps else base, device)[0] if resumed else copy.deepcopy(model)
    if device.startswith("cuda"):
        ref.to(torch.bfloat16)  # never trained: bf16 weights suffice, at half the memory
    ref = infra.Policy(ref.eval().requires_grad_(False), family, args.temperature, args.logp_chunk)
    return infra.reference(args, ref, base, device)  # under --fsdp whole if it fits, else sharded


# ---------------------------------------------------------------------------------------------
# Held-out evaluation: greedy decoding, scored by rewards.score / rewards.summarize (eval.py's
# command line too).
EVAL_TOKENS = {"rec": 64, "cls": 64, "count": 64, "det": 160}
SPLITS = {
    "rec": ("test", "ood")
}  # the held-out splits evaluated during training; the other tasks: test only


@torch.no_grad()
def evaluate(model, family, rows, coord_space, task="rec", batch_size=64, max_new_tokens=None):
    """Greedy-decode every row; return (summary, per-sample predictions)."""
    preds = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        prompt, sizes = family.encode(batch, model.device.type)
        o = sample_group(model, family, prompt, 1, max_new_tokens or EVAL_TOKENS[task], 1.0)[0]
        texts = completion_texts(family.tokenizer, o, completion_mask(o, family.eos_id))
        preds += [
            rewards.score(task, *x)
            for x in zip(batch, data.ground_truths(batch, sizes, coord_space), texts)
        ]
    return rewards.summarize(task, preds), preds


def held_out(model, family, coord_space, splits, task="rec"):
    """Greedy metrics on each held-out split {name: rows} (infra.load_data), as flat {split_metric:
    v}."""
    out = {}
    for split, rows in splits.items():
        summary, _ = evaluate(model, family, rows, coord_space, task)
        out.update({f"{split}_{k}": v for k, v in summary.items() if k != "n"})
    return out


def held_out_eval(policy, model, family, coord_space, args, step, log, world, splits):
    """On the main process, log and print held_out(); the others wait (under FSDP2 after gathering
    the weights)."""
    with infra.gathered(policy):
        if log.main:
            ev = held_out(model, family, coord_space, splits, args.task)
            log.write({"step": step, **ev}, infra.eval_line(step, ev))
            if (
                step == args.steps
            ):  # the end of the run: a picture of the final model's boxes on held-out images
                viz.held_out_grid(
                    args, lambda rows: evaluate(model, family, rows, coord_space, args.task)[1]
                )
        infra.barrier(world)


# ---------------------------------------------------------------------------------------------
# Training: Algorithm 1 of the GRPO paper, one rollout batch per step.
def train(args):
    rank, world, device = infra.setup_distributed(args)  # infra: processes
    B, G, main = args.prompts_per_step, args.num_generations, rank == 0
    if B % world:
        sys.exit(f"error: --prompts-per-step {B} must be a multiple of the {world} processes")
    weights, base = reward_weights(args), args.model or tiny_model(args.task)
    rows, bad_rows, held = infra.load_data(
        args, base, SPLITS.get(args.task, ("test",))
    )  # infra: checked upfront
    rng = infra.prompt_sampler(
        args.seed
    )  # infra: seeds; the prompt sampler's state is the data position
    ckpt, state = infra.resume(args, Args, rng)  # infra: checked resume (None, None for a new run)
    start = state["step"] if state else 0
    model, family = vlm.load(ckpt or base, device)  # pi_theta in fp32, and its family's adapter
    coord_space = family.coord_space if args.coord_space == "auto" else args.coord_space
    if args.freeze_vision:
        family.vision(model).requires_grad_(False)
    log = infra.MetricsLog(
        args.output_dir, main, start if state else None, args
    )  # infra: metrics.jsonl, --report-to
    if args.sft_steps and not state:
        cold_start(model, family, rows, coord_space, args, log, device)
    if (
        args.lora_r and not state
    ):  # LoRA on the starting model: only its adapters train (a resumed run loaded its own)
        vlm.add_lora(
            model,
            family,
            args,
            os.path.join(args.output_dir, "cold-start") if args.sft_steps else base,
        )
    ref = reference_model(args, model, family, state, base, device)
    if args.gradient_checkpointing:
        vlm.enable_checkpointing(model)
    model.train()
    policy, opt = infra.engine(
        args, model, family, state, world, device
    )  # infra: DDP or FSDP2, the optimizer
    infra.start_banner(
        args,
        log,
        rows,
        bad_rows,
        weights,
        coord_space,
        device,
        world,
        start if state else None,
        base,
    )
    eval_every = (
        args.eval_every if held else 0
    )  # synthetic splits (no --train-data) and --eval-data
    if eval_every and not state:
        held_out_eval(
            policy, model, family, coord_space, args, 0, log, world, held
        )  # the curves' starting point
    bad_steps = state.get("bad_steps", 0) if state else 0
    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        lr = infra.set_lr(opt, infra.lr_at(args, step))
        # (0) G completions per prompt from pi_old and (1) their rewards, with Vision-R1's staged
        # length and rule refinement (functions of the step) and DAPO's dynamic sampling
        max_len = stage_value(args.length_schedule, step, args.max_completion_length)
        rule = stage_value(
            args.iou_threshold_schedule, step, {"iou_threshold": 0.0}, rewards.refinement_stage
        )
        with infra.gathered(
            policy
        ):  # under FSDP2 the weights are gathered once for the whole rollout
            ro = rollout(
                model,
                family,
                rows,
                rng,
                step,
                max_len,
                rule,
                weights,
                coord_space,
                args,
                rank,
                world,
                device,
            )
        o, mask, r, N = ro["o"], ro["mask"], ro["r"], len(ro["o"])
        # (2) advantages and (6) token weights over the global batch, then our rows. DDP and FSDP2
        # average gradients over the processes, so the weights are scaled by `world` to make the sum
        # of all processes' losses. DAPO's overlong filtering gives a completion cut off at the cap
        # (no EOS) no loss.
        truncated = (~(o == family.eos_id).any(1)).float()
        r_all, mask_all, cut_all = (infra.gather(x.to(device), world) for x in (r, mask, truncated))
        A = group_advantages(r_all, G, args.scale_rewards)[rank * N : (rank + 1) * N]
        tw = (
            token_weights(
                mask_all * (1 - cut_all[:, None]) if args.overlong_filter else mask_all,
                args.loss_agg,
            )[rank * N : (rank + 1) * N]
            * world
        )
        # (3)-(5) mu passes of the clipped objective with the KL to pi_ref
        stats, grad_norm, skipped = policy_update(
            policy, opt, model, ref, family, ro["prompt"], o, mask, ro["logp"], A, tw, args, world
        )
        stats["entropy"] = (ro["H"] * mask).sum()
        bad_steps = bad_steps + 1 if skipped else 0
        m = infra.step_row(
            step,
            r_all,
            ro["components"],
            stats,
            grad_norm,
            mask_all,
            args.mu,
            world,
            lr=lr,
            **infra.batch_stats(r_all, G, cut_all),
            **ro["dynamic"],
            **({"max_len": max_len} if args.length_schedule else {}),
            **(rule if args.iou_threshold_schedule else {}),
            **rewards.rollout_stats(args.task, ro["texts"], ro["gts"]),
            seconds=time.time() - t0,
            **({"skipped_updates": skipped} if skipped else {}),
        )
        log.step(
            m, args, ro["components"], bad_steps, ro["batch"], ro["texts"], r
        )  # infra: log, progress, samples
        if (
            step == start + 1
        ):  # the alarm for an adapter's silent failure: sampler and trainer disagree on pi_old
            infra.check_logp_gap(
                m, args.max_logp_gap or vlm.logp_gap_limit(model), model.config.model_type
            )
        if eval_every and (step % eval_every == 0 or step == args.steps):
            held_out_eval(policy, model, family, coord_space, args, step, log, world, held)
        infra.save_or_stop(
            args, step, bad_steps, model, family, opt, rng, rank, world, device
        )  # infra: checkpoints
    return infra.finish(
        args, model, family, log, bad_rows, rank, world
    )  # infra: curves, final model


if __name__ == "__main__":
    infra.catch_signals()  # infra: Ctrl-C / SIGTERM finish the step, save and exit
    args = parse_args()
    sys.exit(plan.show(args, args.model or tiny_model(args.task))) if args.plan else train(
        args
    )  # plan: memory
