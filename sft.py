"""Supervised fine-tuning on the same rows (the tiny model's warm start; an SFT baseline).

    python sft.py --model PATH --output-dir DIR --steps N [--train-data JSONL --image-root DIR]

Targets are "<think> {caption} is at the {where} </think> <answer> [x1, y1, x2, y2] </answer>" with the
box in the model's coordinate space; the loss is the mean negative log-likelihood of target tokens.
"""

import random
import sys
import time

import torch

import data
import grpo_vlm as g


def target_text(row, gt):
    scale = g.rewards.to_original_pixels([1, 1, 1, 1], gt)  # original pixels per model unit
    box = [round(v / f) for v, f in zip(row["solution"], scale)]
    where = data.box_words(row["solution"], gt["width"], gt["height"])
    caption = row.get("caption", "the object")
    return f"<think> {caption} is at the {where} </think> <answer> [{box[0]}, {box[1]}, {box[2]}, {box[3]}] </answer>"


def main(argv=None):
    args = g.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer, image_processor, config = g.load_policy(args.model or g.TINY_MODEL)
    coord_space = g.default_coord_space(config) if args.coord_space == "auto" else args.coord_space
    rows = g.load_rows(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    B = args.prompts_per_step * args.num_generations
    t0 = time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(rows, B)
        prompt, sizes = g.encode_prompts(batch, tokenizer, image_processor)
        gts = g.ground_truths(batch, sizes, coord_space)
        texts = [target_text(r, gt) + tokenizer.eos_token for r, gt in zip(batch, gts)]
        tgt = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        mask = g.completion_mask(tgt["input_ids"], tokenizer.eos_token_id)
        logps = g.completion_logps(model, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                                   prompt["image_grid_thw"], tgt["input_ids"], mask, 1.0, args.logp_chunk)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"sft step {step}/{args.steps} loss={loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    g.save_checkpoint(model, tokenizer, image_processor, args.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
