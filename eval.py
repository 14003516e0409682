"""Evaluate a checkpoint on REC with batched greedy decoding and one prompt for every model.

    python eval.py --model PATH --task rec [--data JSONL --image-root DIR] [--split test] [--n 512] --json OUT

Writes a JSON summary (acc50, miou, format_rate, center_error, area_ratio) and per-sample
predictions as JSONL beside it (OUT with .jsonl).
"""

import argparse
import json
import math
import os

import torch

import data
import grpo_vlm as g
import rewards


def box_metrics(pred, gt_box, width, height):
    """IoU, centre distance / image diagonal, and predicted area / true area."""
    iou = rewards.box_iou(pred, gt_box)
    cx = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
    (px, py), (tx, ty) = cx(pred), cx(gt_box)
    center = math.hypot(px - tx, py - ty) / math.hypot(width, height)
    area = lambda b: max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])  # noqa: E731
    return iou, center, area(pred) / max(area(gt_box), 1e-9)


def evaluate(model_path, rows, batch_size=32, max_new_tokens=32, coord_space="auto"):
    model, tokenizer, image_processor, config = g.load_policy(model_path)
    space = g.default_coord_space(config) if coord_space == "auto" else coord_space
    preds = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        prompt, sizes = g.encode_prompts(batch, tokenizer, image_processor)
        ids = g.sample_group(model, prompt, 1, max_new_tokens, 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             g.vision_token_ids(tokenizer), greedy=True)
        mask = g.completion_mask(ids, tokenizer.eos_token_id)
        for row, gt, c, m in zip(batch, g.ground_truths(batch, sizes, space), ids, mask):
            text = tokenizer.decode(c[: int(m.sum())], skip_special_tokens=True)
            box = rewards.parse_box(text)
            pred = rewards.to_original_pixels(box, gt) if box else None
            iou, center, area = box_metrics(pred, gt["solution"], gt["width"], gt["height"]) if pred else (0.0, None, None)
            preds.append({"image": row["image"], "problem": row["problem"], "completion": text, "pred_box": pred,
                          "solution": row["solution"], "iou": iou, "format": rewards.format_reward(text),
                          "center_error": center, "area_ratio": area})
    parsed = [p for p in preds if p["pred_box"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    summary = {"model": model_path, "n": len(preds), "acc50": mean([p["iou"] >= 0.5 for p in preds]),
               "miou": mean([p["iou"] for p in preds]), "format_rate": mean([p["format"] for p in preds]),
               "parsed_rate": len(parsed) / len(preds),
               "center_error": mean([p["center_error"] for p in parsed]),
               "area_ratio": mean([p["area_ratio"] for p in parsed])}
    return summary, preds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=g.TINY_MODEL, help="checkpoint path or hub id")
    p.add_argument("--task", default="rec", choices=["rec"], help="task to evaluate")
    p.add_argument("--data", default="", help="VLM-R1 JSONL; empty: the synthetic world's --split")
    p.add_argument("--image-root", default="", help="folder the JSONL image paths are relative to")
    p.add_argument("--split", default="test", choices=["test", "ood", "train"], help="synthetic split")
    p.add_argument("--n", type=int, default=512, help="number of samples (first n rows)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per greedy generate call")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    p.add_argument("--json", default="eval.json", help="summary output; predictions go to the same name .jsonl")
    a = p.parse_args()
    if a.data:
        rows = data.load_jsonl(a.data, a.image_root)[: a.n]
    else:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic")
        rows = data.load_jsonl(data.make_synthetic(root, a.split, a.n), root)
    with torch.no_grad():
        summary, preds = evaluate(a.model, rows, a.batch_size, a.max_new_tokens)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.splitext(a.json)[0] + ".jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
