"""Evaluate checkpoints with batched greedy decoding and one prompt for every model.

    python eval.py --task rec|cls|count|det --model PATH [PATH ...] [--data JSONL --image-root DIR [--skip-bad-rows]] [--split test ood] [--n 512] --json OUT

Metrics by task:
  rec:   acc50 (IoU >= 0.5), miou, center_error, area_ratio, right_object, format_rate
  cls:   accuracy (normalized exact match), format_rate
  count: accuracy (exact numeric match), mae, parsed_rate, format_rate
  det:   map (COCO-style, IoU 0.50:0.95, 101-point), ap50, ap75, pred_per_gt (#pred / #gt), parsed_rate, format_rate
Writes JSON summaries and per-sample predictions as JSONL beside them (OUT with .jsonl), and prints a markdown
table of every model x split.
A bad row or image in --data stops it before any model loads, with one line "error: FILE:LINE: what is wrong";
with --skip-bad-rows such rows are counted, listed on stderr and recorded as `bad_rows` in the summaries.
"""

import argparse
import json
import math
import os
import sys

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


MAX_NEW_TOKENS = {"rec": 64, "cls": 64, "count": 64, "det": 160}


def evaluate(model, tokenizer, image_processor, rows, coord_space, task="rec", batch_size=64, max_new_tokens=None):
    """Greedy-decode every row; return (summary, per-sample predictions)."""
    preds = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        prompt, sizes = g.encode_prompts(batch, tokenizer, image_processor, model.device.type)
        ids, _ = g.sample_group(model, prompt, 1, max_new_tokens or MAX_NEW_TOKENS[task], 1.0, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, g.vision_token_ids(tokenizer))
        mask = g.completion_mask(ids, tokenizer.eos_token_id)
        for row, gt, c, m in zip(batch, g.ground_truths(batch, sizes, coord_space), ids, mask):
            text = tokenizer.decode(c[: int(m.sum())], skip_special_tokens=True)
            if task != "rec":
                preds.append(score(task, row, gt, text))
                continue
            box = rewards.parse_box(text)
            pred = rewards.to_original_pixels(box, gt) if box else None
            iou, center, area = box_metrics(pred, gt["solution"], gt["width"], gt["height"]) if pred else (0.0, None, None)
            # which object the box overlaps most (0 = the target), when the rows list the objects
            ious = [rewards.box_iou(pred, o["box"]) for o in row.get("objects", [])] if pred else []
            chosen = max(range(len(ious)), key=ious.__getitem__) if ious and max(ious) > 0 else None
            preds.append({"image": row["image"], "problem": row["problem"], "completion": text, "pred_box": pred,
                          "solution": row["solution"], "iou": iou, "format": rewards.format_reward(text),
                          "center_error": center, "area_ratio": area, "chosen_object": chosen})
    if task != "rec":
        return summarize(task, preds), preds
    parsed = [p for p in preds if p["pred_box"] is not None]
    summary = {"n": len(preds), "acc50": mean([p["iou"] >= 0.5 for p in preds]),
               "miou": mean([p["iou"] for p in preds]), "format_rate": mean([p["format"] for p in preds]),
               "parsed_rate": len(parsed) / len(preds),
               "center_error": mean([p["center_error"] for p in parsed]),
               "area_ratio": mean([p["area_ratio"] for p in parsed]),
               # of the boxes that overlap some object, the share whose best-overlapping object is the target
               "right_object": mean([p["chosen_object"] == 0 for p in parsed if p["chosen_object"] is not None])}
    return summary, preds


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def score(task, row, gt, text):
    """One cls, count or det prediction, scored (rec is scored inline in evaluate)."""
    p = {"image": row["image"], "problem": row["problem"], "completion": text, "format": rewards.format_reward(text)}
    if task == "cls":
        return {**p, "solution": row["solution"], "correct": rewards.accuracy_reward(text, gt)}
    if task == "count":
        return {**p, "solution": row["solution"], "pred": rewards.parse_number(text),
                "correct": rewards.count_reward(text, gt)}
    dets = rewards.parse_detections(text)  # det: boxes back in original pixels, for mAP against the truth
    boxes = None if dets is None else [(rewards.to_original_pixels(b, gt), c) for b, c in dets]
    return {**p, "solution": row["solution"], "pred_boxes": boxes}


def summarize(task, preds):
    s = {"n": len(preds), "format_rate": mean(p["format"] for p in preds)}
    if task in ("cls", "count"):
        s["accuracy"] = mean(p["correct"] for p in preds)
    if task == "count":
        parsed = [p for p in preds if p["pred"] is not None]
        s.update(parsed_rate=len(parsed) / len(preds), mae=mean(abs(p["pred"] - p["solution"]) for p in parsed))
    if task == "det":  # an unparsable answer predicts no boxes
        s.update(rewards.mean_ap([(p["pred_boxes"] or [], p["solution"]) for p in preds]))
        s["parsed_rate"] = mean(p["pred_boxes"] is not None for p in preds)
        s["pred_per_gt"] = sum(len(p["pred_boxes"] or []) for p in preds) / max(1, sum(len(p["solution"]) for p in preds))
    return s


def rollout_stats(task, texts, gts):
    """Statistics of a step's sampled completions, logged beside the rewards: for det, #pred / #gt (VLM-R1's
    detection reward hacking shows as its climb)."""
    if task != "det":
        return {}
    n_pred = sum(len(rewards.parse_detections(t) or []) for t in texts)
    return {"pred_per_gt": n_pred / max(1, sum(len(gt["solution"]) for gt in gts))}


SPLITS = {"rec": ("test", "ood")}  # the held-out splits evaluated during training; the other tasks: test only


def held_out(model, tokenizer, image_processor, coord_space, n, task="rec"):
    """Greedy metrics on the first n rows of each synthetic held-out split, as flat {split_metric: v}."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for split in SPLITS.get(task, ("test",)):
            summary, _ = evaluate(model, tokenizer, image_processor, synthetic_split(split, n, task), coord_space, task)
            out.update({f"{split}_{k}": v for k, v in summary.items() if k != "n"})
    model.train(was_training)
    return out


EVAL_LINE = ("acc50", "center_error", "area_ratio", "right_object", "accuracy", "mae", "map", "ap50", "pred_per_gt")


def eval_line(step, ev):
    """One progress line of held_out()'s metrics, for the trainers' logs."""
    return f"eval step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in ev.items() if k.endswith(EVAL_LINE))


def synthetic_split(split, n, task="rec"):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic")
    return data.load_jsonl(data.make_synthetic(root, split, n, task=task), root, task)[0]


# ---------------------------------------------------------------------------------------------
# Training curves as a PNG, drawn with Pillow (no plotting dependency for four line charts)
# ---------------------------------------------------------------------------------------------
REWARD_PANEL = ("reward (moving average over 20 steps)", "reward")
PANELS = {"rec": [REWARD_PANEL, ("held-out Acc@0.5", "acc50"), ("held-out centre error (/ image diagonal)", "center_error"),
                  ("held-out area ratio (pred / true)", "area_ratio")],
          "cls": [REWARD_PANEL, ("held-out accuracy", "accuracy"), ("held-out format rate", "format_rate"),
                  ("completion length (tokens)", "completion_len")],
          "count": [REWARD_PANEL, ("held-out accuracy", "accuracy"), ("held-out mean absolute error", "mae"),
                    ("completion length (tokens)", "completion_len")],
          "det": [REWARD_PANEL, ("held-out mAP (IoU 0.50:0.95)", "map"),
                  ("#pred / #gt (sampled: pred_per_gt; greedy held-out: test_)", "pred_per_gt"),
                  ("held-out AP50", "ap50")]}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _series(rows, suffix):
    """{name: [(step, value)]} for the keys that are (or end with) `suffix`; rewards are smoothed."""
    out = {}
    for key in sorted({k for r in rows for k in r}):
        if suffix == "reward" and (key == "reward" or key.startswith("reward_")) and key != "reward_std":
            pts = [(r["step"], r[key]) for r in rows if key in r]
            out[key] = [(s, sum(v for _, v in pts[max(0, i - 19):i + 1]) / len(pts[max(0, i - 19):i + 1]))
                        for i, (s, _) in enumerate(pts)]
        elif suffix != "reward" and (key == suffix or key.endswith("_" + suffix)):
            out[key] = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]  # drop NaN
    return out


def plot_metrics(metrics_path, png_path, task="rec", width=1000, height=700):
    from PIL import Image, ImageDraw

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    pw, ph = width // 2, height // 2
    for p, (title, suffix) in enumerate(PANELS[task]):
        x0, y0 = (p % 2) * pw + 55, (p // 2) * ph + 25
        x1, y1 = (p % 2) * pw + pw - 15, (p // 2) * ph + ph - 45
        draw.text((x0, y0 - 18), title, fill="black")
        series = {k: v for k, v in _series(rows, suffix).items() if v}
        if not series:
            draw.text((x0 + 10, y0 + 10), "no data", fill="gray")
            draw.rectangle([x0, y0, x1, y1], outline="black")
            continue
        steps = [s for v in series.values() for s, _ in v]
        vals = [y for v in series.values() for _, y in v]
        smin, smax = min(steps), max(max(steps), min(steps) + 1)
        vmin, vmax = min(vals), max(vals)
        pad = (vmax - vmin) * 0.05 or 0.5
        vmin, vmax = vmin - pad, vmax + pad
        X = lambda s: x0 + (x1 - x0) * (s - smin) / (smax - smin)  # noqa: E731
        Y = lambda v: y1 - (y1 - y0) * (v - vmin) / (vmax - vmin)  # noqa: E731
        for i in range(5):  # y ticks and grid
            v = vmin + (vmax - vmin) * i / 4
            draw.line([x0, Y(v), x1, Y(v)], fill=(225, 225, 225))
            draw.text((x0 - 50, Y(v) - 6), f"{v:.3g}", fill="black")
        for i in range(5):  # x ticks
            s = smin + (smax - smin) * i / 4
            draw.text((X(s) - 10, y1 + 4), f"{s:.0f}", fill="black")
        draw.text(((x0 + x1) // 2 - 10, y1 + 18), "step", fill="black")
        for j, (name, pts) in enumerate(series.items()):
            colour = COLOURS[j % len(COLOURS)]
            xy = [(X(s), Y(v)) for s, v in pts]
            draw.line(xy, fill=colour, width=2) if len(xy) > 1 else None
            for x, y in xy if len(xy) < 40 else []:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            draw.text((x0 + 8, y0 + 6 + 13 * j), name, fill=colour)
        draw.rectangle([x0, y0, x1, y1], outline="black")
    im.save(png_path)
    print(f"saved {png_path}", flush=True)


TABLE = {"rec": [("Acc@0.5", "acc50"), ("mIoU", "miou"), ("centre err", "center_error"), ("area ratio", "area_ratio"),
                 ("right object", "right_object"), ("format", "format_rate")],
         "cls": [("accuracy", "accuracy"), ("format", "format_rate")],
         "count": [("accuracy", "accuracy"), ("MAE", "mae"), ("parsed", "parsed_rate"), ("format", "format_rate")],
         "det": [("mAP", "map"), ("AP50", "ap50"), ("AP75", "ap75"), ("#pred/#gt", "pred_per_gt"),
                 ("parsed", "parsed_rate"), ("format", "format_rate")]}


def markdown_table(summaries, task="rec"):
    cols = TABLE[task]
    lines = ["| model | split | " + " | ".join(h for h, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for s in summaries:
        lines.append(f"| {s['model']} | {s['split']} | " + " | ".join(f"{s[k]:.3f}" for _, k in cols) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[], help="checkpoint paths or hub ids (default: the task's tiny base)")
    p.add_argument("--task", default="rec", choices=data.TASKS, help="task to evaluate")
    p.add_argument("--data", default="", help="VLM-R1 JSONL; empty: the synthetic world's --split")
    p.add_argument("--image-root", default="", help="folder the JSONL image paths are relative to")
    p.add_argument("--split", nargs="+", default=["test"], choices=["test", "ood", "train"],
                   help="synthetic splits: test (in-domain), ood (colour-shape pairs never seen in training)")
    p.add_argument("--n", type=int, default=512, help="number of samples (first n rows)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per greedy generate call")
    p.add_argument("--max-new-tokens", type=int, default=0, help="completion length limit (0: 64, det 160)")
    p.add_argument("--json", default="eval.json", help="summaries output; predictions go to the same name .jsonl")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip and count --data rows whose JSON, text, box or image is unusable, instead of stopping")
    a = p.parse_args()
    a.model = a.model or [g.tiny_model(a.task)]
    try:
        run(a)
    except data.BadInput as e:  # a bad row (checked before any model loads) or an image that fails to decode later
        sys.exit(f"error: {e}")


def run(a):
    splits = ["file"] if a.data else a.split
    bad = []
    if a.data:  # every row up to the first n good ones is checked before any model loads
        file_rows, bad = data.load_jsonl(a.data, a.image_root, a.task, a.skip_bad_rows, limit=a.n)
        if bad:
            more = [f"... and {len(bad) - 10} more"] if len(bad) > 10 else []
            print(f"skipped {len(bad)} bad rows:", *bad[:10], *more, sep="\n  ", file=sys.stderr, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summaries, all_preds = [], []
    for path in a.model:
        model, tokenizer, image_processor, config = g.load_policy(path, device)
        model.eval()
        for split in splits:
            rows = file_rows if a.data else synthetic_split(split, a.n, a.task)
            with torch.no_grad():
                summary, preds = evaluate(model, tokenizer, image_processor, rows, g.default_coord_space(config),
                                          a.task, a.batch_size, a.max_new_tokens)
            summaries.append({"model": path, "split": split, **summary, "bad_rows": len(bad)})
            all_preds += [{"model": path, "split": split, **q} for q in preds]
            print(json.dumps(summaries[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summaries[0] if len(summaries) == 1 else summaries, f, indent=2)
    with open(os.path.splitext(a.json)[0] + ".jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in all_preds)
    print(markdown_table(summaries, a.task))


if __name__ == "__main__":
    main()
