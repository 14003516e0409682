"""Supervised fine-tuning on the same rows (the tiny model's warm start; an SFT baseline).

    python sft.py --model PATH --output-dir DIR --steps N --prompts-per-step B [--train-data JSONL --image-root DIR]

Same arguments as grpo_vlm.py (those that apply). With the same --steps, --prompts-per-step and --seed as a
GRPO run, it trains on the same images in the same order: the matched-budget SFT baseline.

Targets are a short chain of thought that first lists every object left to right, then picks the one
the phrase names, then answers with its box in the model's coordinate space:

    <think> red square top left , blue circle center right . the blue circle is at the center right </think>
    <answer> [71, 40, 104, 73] </answer>

The loss is the mean negative log-likelihood of target tokens. Listing every object teaches the tiny
model what each object looks like (dense supervision); with only the target named, the same model
stayed near chance at picking the right object for 3000 steps (see README).
"""

import random
import sys
import time

import torch

import data
import eval as evaluation
import grpo_vlm as g


def target_text(row, gt):
    scale = g.rewards.to_original_pixels([1, 1, 1, 1], gt)  # original pixels per model unit
    box = [round(v / f) for v, f in zip(row["solution"], scale)]
    where = data.box_words(row["solution"], gt["width"], gt["height"])
    caption = row.get("caption", "the object")
    objs = sorted(row.get("objects", []), key=lambda o: o["box"][0] + o["box"][2])
    seen = " , ".join(f"{o['label']} {data.box_words(o['box'], gt['width'], gt['height'])}" for o in objs)
    seen = f"{seen} . " if seen else ""
    return f"<think> {seen}{caption} is at the {where} </think> <answer> [{box[0]}, {box[1]}, {box[2]}, {box[3]}] </answer>"


def main(argv=None):
    args = g.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer, image_processor, config = g.load_policy(args.model or g.TINY_MODEL)
    coord_space = g.default_coord_space(config) if args.coord_space == "auto" else args.coord_space
    rows = g.load_rows(args)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    B = args.prompts_per_step  # one target per image: at equal --steps and -B, SFT sees the same images as GRPO
    t0 = time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(rows, B)
        prompt, sizes = g.encode_prompts(batch, tokenizer, image_processor)
        gts = g.ground_truths(batch, sizes, coord_space)
        texts = [target_text(r, gt) + tokenizer.eos_token for r, gt in zip(batch, gts)]
        tgt = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        mask = g.completion_mask(tgt["input_ids"], tokenizer.eos_token_id)
        logps = g.completion_logps(model, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                                   prompt["image_grid_thw"], torch.arange(B), tgt["input_ids"], mask, 1.0, args.logp_chunk)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"sft step {step}/{args.steps} loss={loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if args.eval_every and not args.train_data and (step % args.eval_every == 0 or step == args.steps):
            m = evaluation.held_out(model, tokenizer, image_processor, coord_space, args.eval_n)
            print(evaluation.eval_line(step, m), flush=True)
    # GRPO's default output folder is runs/rec; SFT's own default is runs/sft, so the two never mix
    g.save_checkpoint(model, tokenizer, image_processor,
                      "runs/sft" if args.output_dir == g.Args.output_dir else args.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
