"""Recipes and flag checks: the task defaults, the presets, the flags' choices and the checks that
stop a bad combination with one line before anything loads. grpo_vlm.parse_args calls them.

Precedence: Args' defaults < the task's defaults < the preset < the flags given. The task defaults
are for the tiny offline models (README: "Other tasks"); a preset is a recipe for real models.
"""

import os
import sys

import data
import infra
import rewards

TASK_DEFAULTS = {
    "cls": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "count": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "det": dict(steps=300, max_completion_length=128),
}
# VLM-R1's REC recipe for Qwen2.5-VL, full fine-tune
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
    "policy_loss": ("grpo", "gspo", "cispo", "sapo", "gmpo"),  # objectives.surrogate
    "reward_norm": ("sum", "gdpo"),
    "coord_space": ("auto", "abs_resized", "norm1000", "abs_original"),
    "report_to": infra.REPORT_TO,
    **infra.ENGINE_CHOICES,
}


def check(args):
    """`args`, with the output folder's default; a combination that cannot run stops here."""
    args.output_dir = args.output_dir or os.path.join("runs", args.task)
    G = args.num_generations
    if args.rollout_batch_size % G:
        sys.exit(
            f"error: --rollout-batch-size {args.rollout_batch_size} must be a multiple of G={G}"
        )
    sequence_level = args.importance_sampling == "sequence" or args.policy_loss in ("gspo", "gmpo")
    if sequence_level and args.loss_agg != "grpo":  # GSPO's and GMPO's L is one per completion
        sys.exit(
            "error: --importance-sampling sequence (GSPO) and --policy-loss gspo, gmpo aggregate "
            "per sequence: use --loss-agg grpo"
        )
    check_objectives(args)
    for name, parse in (
        ("length_schedule", int),
        ("iou_threshold_schedule", rewards.refinement_stage),
    ):
        try:
            stage_value(getattr(args, name), 0, None, parse)
        except ValueError as e:
            flag, spec = name.replace("_", "-"), getattr(args, name)
            sys.exit(f"error: --{flag} {spec!r}: expected step:value,... ({e})")
    return args


def check_objectives(args):
    """The objectives' flags (objectives.ObjectiveFlags): shares in [0, 1], a NoisyRollout group
    with completions on both images, no combination that cannot run."""
    for name in ("entropy_top_share", "noisy_rollout_share", "vppo_share"):
        if not 0 <= getattr(args, name) <= 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be in [0, 1]")
    if args.tis_cap < 0 or args.papo_gamma < 0:
        sys.exit("error: --tis-cap and --papo-gamma must be >= 0")
    if args.importance_sampling == "sequence" and args.policy_loss not in ("grpo", "gspo"):
        sys.exit(
            f"error: --importance-sampling sequence is GSPO: it cannot go with --policy-loss "
            f"{args.policy_loss}"
        )
    if args.noisy_rollout_share:
        n, G = round(args.noisy_rollout_share * args.num_generations), args.num_generations
        if not 0 < n < G:
            sys.exit(
                f"error: --noisy-rollout-share {args.noisy_rollout_share} puts {n} of G={G} "
                "completions on the distorted image: it must be 1 to G-1"
            )
        if args.dynamic_sampling:
            sys.exit("error: --noisy-rollout-share does not go with --dynamic-sampling")


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
