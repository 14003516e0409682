"""Recipes and flag checks: the task defaults, the presets, the flags' choices and the checks that
stop a bad combination with one line before anything loads. grpo_vlm.parse_args calls them.

Precedence: Args' defaults < the task's defaults < the preset < the flags given. The task defaults
are for the tiny offline models (README: "Other tasks"); a preset is a recipe for real models.
"""

import dataclasses
import os
import sys

import data
import infra
import rewards

TASK_DEFAULTS = {
    "cls": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "count": dict(steps=800, lr=5e-5, lr_schedule="linear"),
    "det": dict(steps=300, max_completion_length=128),
    # the cold-start trace with the tool: 38 + 6 tokens in its two turns (tests/test_zoom_task.py)
    "zoom": dict(max_completion_length=64, steps=300),  # README: "Thinking with images"
}
# Each paper's recipe: the hyperparameters here, the reward (its functions, weights, parsers and
# prompt) in rewards.RECIPES under the same name. Each value cites the official file and line (or
# the paper) it follows; a value not given there is ours, and the README ("Reproducing the papers'
# training") names each departure. Old TRL (0.14, which R1-V pins, src/r1-v/setup.py:65, and
# Visual-RFT and Vision-R1 fork) defaults to lr 1e-6, beta 0.04, G 8, 256 new tokens, one pass per
# batch, per-sequence mean: cited as "TRL 0.14" (its GRPOConfig, not re-read here).
TRL = dict(lr=1e-6, beta=0.04, mu=1, loss_agg="grpo", scale_rewards="group", eps_low=0.2)
PRESETS = {
    # VLM-R1 run_scripts/run_grpo_rec.sh:39-52: 8 GPUs x 8 x accumulation 2 / G=8 = 16 prompts a
    # step, G=8, beta 0.04; trainer/grpo_config.py:284-303: lr 1e-6, one pass, eps 0.2;
    # trainer/grpo_trainer.py:376: temperature 1 (the config's 0.9 is not read). The script's
    # max_completion_length 2048 is cut to 256 (README).
    "vlm-r1": dict(
        **TRL,
        eps_high=0.2,
        num_generations=8,
        temperature=1.0,
        max_completion_length=256,
        prompts_per_step=16,
        micro_batch_size=8,
        gradient_checkpointing=True,
        max_prompt_length=1024,
    ),
    # Visual-RFT src/scripts/2B_aircraft_4_shot.sh:19-32: max_prompt_length 1024, 8 GPUs x 1 x
    # accumulation 2 = 16 prompts, G=8; src/virft/src/open_r1/trainer/grpo_trainer.py:284: T 1;
    # the rest TRL 0.14's (max_completion_length 256).
    "visual-rft": dict(
        **TRL,
        eps_high=0.2,
        num_generations=8,
        temperature=1.0,
        max_completion_length=256,
        prompts_per_step=16,
        max_prompt_length=1024,
    ),
    # R1-V src/scripts/run_grpo_clevr.sh:13-15: 8 GPUs x 1 x accumulation 2 = 16 prompts,
    # max_prompt_length 1024; trainer/grpo_trainer.py:284: temperature 1; G=8 and L=256: TRL 0.14.
    "r1-v": dict(
        **TRL,
        eps_high=0.2,
        num_generations=8,
        temperature=1.0,
        max_completion_length=256,
        prompts_per_step=16,
        max_prompt_length=1024,
    ),
    # Vision-R1 (Zhan et al.), Griffon Vision-R1/run_qwen_vision_r1.sh:15-30: max_prompt_length
    # 1024, G=4, max_completion_length 512; its rewards' stage switch at step 1500
    # (visionr1_qwen.py:251, 322, 330) is rewards.RECIPES' schedule; lr, beta: TRL 0.14.
    "vision-r1-zhan": dict(
        **TRL,
        eps_high=0.2,
        num_generations=4,
        max_completion_length=512,
        max_prompt_length=1024,
        iou_threshold_schedule=rewards.RECIPES["vision-r1-zhan"].schedule,
    ),
    # Vision-R1 (Huang et al.), Osilly/Vision-R1 README.md:102: PTST's first stage, 4K tokens with
    # G=16 (then 8K with G=8: --length-schedule; G stays 16, README); the reward HFRRF. The cold
    # start (--sft-steps) is required (check).
    "vision-r1-huang": dict(num_generations=16, max_completion_length=4096),
    # GSPO (Zheng et al., arXiv 2507.18071, Sec. 5.1): the sequence ratio clipped at 3e-4 / 4e-4,
    # no KL term; per-sequence aggregation is its definition (Eq. 5).
    "gspo": dict(
        importance_sampling="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.0, loss_agg="grpo"
    ),
    # DAPO (Yu et al., arXiv 2503.14476): clip-higher 0.2 / 0.28 (Sec. 3.1), dynamic sampling
    # (Sec. 3.2; the paper samples until the batch is full: 10 more rounds at most is ours),
    # token-level loss (Sec. 3.3), no KL (Sec. 2.3). Its soft overlong punishment (Sec. 3.4, 4096
    # of 20480 tokens) depends on the cap: give --overlong-buffer.
    "dapo": dict(eps_low=0.2, eps_high=0.28, dynamic_sampling=10, loss_agg="token", beta=0.0),
    # Dr. GRPO (Liu et al., arXiv 2503.20783, Sec. 3.2): no std scaling of the advantage, the
    # loss summed over tokens / (G x the fixed max_completion_length), as TRL's "dr_grpo".
    "dr-grpo": dict(scale_rewards="none", loss_agg="drgrpo"),
}
PAPERS = ("vlm-r1", "visual-rft", "r1-v", "vision-r1-zhan", "vision-r1-huang")
ALGORITHMS = ("gspo", "dapo", "dr-grpo")
GSPO_EPS = (3e-4, 4e-4)  # GSPO's clip ranges (arXiv 2507.18071, Sec. 5.1)


def preset_names(spec):
    """The presets of --preset "paper,algorithm" in order; ValueError in one line for an unknown
    name, two papers, two algorithms, or an algorithm before its paper."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in PRESETS:
            raise ValueError(f"unknown --preset {n!r}; known: {sorted(PRESETS)}")
    papers, algorithms = [n for n in names if n in PAPERS], [n for n in names if n in ALGORITHMS]
    if len(papers) > 1 or len(algorithms) > 1:
        two = papers if len(papers) > 1 else algorithms
        raise ValueError(f"--preset {spec!r}: {two[0]} and {two[1]} are two recipes; choose one")
    if papers and algorithms and names.index(algorithms[0]) < names.index(papers[0]):
        raise ValueError(f"--preset {spec!r}: the paper's preset comes first, then the algorithm")
    return names


def preset_values(spec):
    """{flag: (value, preset)} of --preset "a,b": a later preset's keys win (the flags given win
    over both, infra.parse_args)."""
    return {k: (v, n) for n in preset_names(spec) for k, v in PRESETS[n].items()}


def paper(args):
    """The paper preset in --preset, whose reward recipe (rewards.RECIPES) the run uses, or ""."""
    return next((n for n in preset_names(args.preset) if n in PAPERS), "")


def uses_gspo(args):
    """Whether the run's objective is GSPO's sequence ratio (--policy-loss gspo, or
    --importance-sampling sequence)."""
    return args.importance_sampling == "sequence" or getattr(args, "policy_loss", "") == "gspo"


CHOICES = {
    "task": data.TASKS,
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
    if G < 2:
        sys.exit(f"error: --num-generations {G}: GRPO compares a group, G must be at least 2")
    caps = [args.max_completion_length] + [
        int(cap)
        for cap in (s.partition(":")[2] for s in args.length_schedule.split(",") if s)
        if cap.strip().lstrip("-").isdigit()
    ]
    if args.overlong_buffer and args.overlong_buffer >= min(caps):
        sys.exit(
            f"error: --overlong-buffer {args.overlong_buffer} is not below the length cap "
            f"{min(caps)} (--max-completion-length or a --length-schedule stage): it would "
            "punish every completion"
        )
    try:
        rewards.recipe_rewards(args.task, paper(args))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if paper(args) == "vision-r1-huang" and not args.sft_steps:
        sys.exit("error: --preset vision-r1-huang starts from its cold start: give --sft-steps N")
    metric, weights = args.dynamic_sampling_metric, rewards.recipe_rewards(args.task, paper(args))
    names = {i.rpartition("=")[0].rpartition(":")[2] for i in args.reward_weights.split(",")}
    if metric != "reward" and metric not in set(weights) | names:
        sys.exit(
            f"error: --dynamic-sampling-metric {metric!r} is not a reward of this run; give "
            f"reward or one of {sorted(weights)}"
        )
    gspo_defaults(args)
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
    check_tools(args)
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


stage_value = rewards.stage_value  # a stage schedule "step:value,..." at a step


def gspo_defaults(args):
    """GSPO's clip ranges where --eps-low / --eps-high are not given as flags (a token ratio's 0.2,
    also a paper preset's, would never clip a sequence ratio); an explicit eps of 0.01 or more
    under GSPO warns in one line."""
    if not uses_gspo(args):
        return
    sources = getattr(args, "sources", {})
    for name, eps in zip(("eps_low", "eps_high"), GSPO_EPS):
        if sources.get(name) not in ("flag", "preset gspo"):  # a paper's token eps: not GSPO's
            setattr(args, name, eps)
            sources[name] = "GSPO default"
    if any(sources.get(n) == "flag" and getattr(args, n) >= 0.01 for n in ("eps_low", "eps_high")):
        print(
            f"warning: GSPO with --eps-low {args.eps_low} --eps-high {args.eps_high}: its sequence "
            f"ratio stays near 1, the paper clips at {GSPO_EPS[0]} / {GSPO_EPS[1]}",
            file=sys.stderr,
        )


def show(args, weights, say):
    """The resolved recipe, printed at the start of a run: every flag's value and where it comes
    from (default, task, preset NAME, GSPO default or flag), then each reward's weight and
    function."""
    sources = getattr(args, "sources", {})
    say(f"recipe: --preset {args.preset or '(none)'}, --task {args.task}")
    mine = vars(type(args)).get("__annotations__", {})  # the algorithm's flags first
    for f in sorted(dataclasses.fields(args), key=lambda f: f.name not in mine):
        value = getattr(args, f.name)
        say(f"  --{f.name.replace('_', '-')} {value!r}  ({sources.get(f.name, 'default')})")
    recipe, given = paper(args), args.reward_weights.strip().removeprefix(rewards.EXACT)
    given = {item.rpartition("=")[0].rpartition(":")[2].strip() for item in given.split(",")}
    own = rewards.recipe_rewards(args.task, recipe) if recipe else {}
    for k, w in weights.items():
        fn = rewards.function(weights, k)
        where = "flag" if k in given else f"preset {recipe}" if k in own else "task"
        say(f"  reward {k} weight {w:g}: {getattr(fn, '__name__', fn)}  ({where})")


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


def check_tools(args):
    """The zoom tool's flags (tools.ToolFlags): counts >= 0, and none of the options whose extra
    forwards or refills do not carry tool turns (they would silently drop them)."""
    if min(args.max_tool_calls, args.max_context_length, args.tool_bonus) < 0:
        sys.exit("error: --max-tool-calls, --max-context-length and --tool-bonus must be >= 0")
    if not args.max_tool_calls:
        return
    others = dict(
        dynamic_sampling=args.dynamic_sampling,
        noisy_rollout_share=args.noisy_rollout_share,
        papo_gamma=args.papo_gamma,
        vppo_share=args.vppo_share,
    )
    for name, value in others.items():
        if value:
            flag = name.replace("_", "-")
            sys.exit(
                f"error: --max-tool-calls does not go with --{flag} (not built for tool turns)"
            )
