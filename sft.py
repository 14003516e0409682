"""Supervised fine-tuning on the same rows (the tiny models' warm start; the SFT baseline).

    python sft.py --task TASK --model PATH --output-dir DIR --steps N --prompts-per-step B
    [--train-data DATA --image-root DIR]

Same arguments as grpo_vlm.py (those that apply: the data formats, --eval-data, --max-prompt-length
too). With the same --task, --steps, --prompts-per-step and --seed as a GRPO run, it trains on the
same images in the same order: the matched-budget SFT baseline. The steps are coldstart.sft_steps,
which is also Vision-R1's cold start (grpo_vlm.py --sft-steps N).

Targets (data.sft_target) are a short chain of thought that first lists every object left to right,
then concludes, then answers in the model's coordinate space, e.g. for rec:

    <think> red square top left , blue circle center right . the blue circle is at the center right
    </think> <answer> [71, 40, 104, 73] </answer>

A row with a `response` field is trained on that text instead. The loss is the mean negative
log-likelihood of the target tokens. Listing every object teaches the tiny model what each object
looks like (dense supervision); with only the target named, the same model stayed near chance at
picking the right object for 3000 steps (see README).
"""

import sys
import time

import torch

import coldstart
import evaluation
import grpo_vlm as g
import infra
import vlm


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = g.parse_args(argv)
    if args.lora_r or args.optim != "adamw":
        sys.exit(
            "error: sft.py is a full fine-tune with AdamW: --lora-r and --optim are grpo_vlm.py's "
            "flags"
        )
    if not any(a.split("=")[0] == "--output-dir" for a in argv):  # never GRPO's default folder
        args.output_dir = f"runs/sft-{args.task}"
    torch.manual_seed(args.seed)
    base = args.model or g.tiny_model(args.task)
    rows, bad, held = infra.load_data(
        args, base, evaluation.splits(args.task)
    )  # before the model loads
    if bad:
        print(f"skipped {len(bad)} bad rows (--skip-bad-rows):", *bad[:10], sep="\n  ", flush=True)
    model, family = vlm.load(base)
    coord_space = family.coord_space if args.coord_space == "auto" else args.coord_space
    t0 = time.time()
    for step, loss in coldstart.sft_steps(
        model, family, rows, coord_space, args, args.steps, args.lr
    ):
        if step % 50 == 0 or step == 1:
            print(
                f"sft step {step}/{args.steps} loss={loss:.4f} {time.time() - t0:.0f}s", flush=True
            )
        if held and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            m = evaluation.held_out(g.greedy, model, family, coord_space, held, args.task)
            print(infra.eval_line(step, m), flush=True)
    family.save(model, args.output_dir)
    print(f"saved {args.output_dir}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
