"""Evaluate checkpoints with batched greedy decoding and one prompt for every model.

    python eval.py --task rec|cls|count|det --model PATH [PATH ...] [--data DATA --image-root DIR
    [--skip-bad-rows]] [--split test ood] [--n 512] --json OUT [--visualize N]

--data takes every format grpo_vlm.py's --train-data takes (data.load_data: problem/solution, VLM-R1
conversations and chat messages JSONL; parquet, Arrow, a save_to_disk folder, a hub id; several
joined by ':'), with the same key flags.

The decoding is evaluation.evaluate with grpo_vlm.greedy (the trainer's held-out eval); the metrics
by task are rewards.score/summarize:
  rec:   acc50 (IoU >= 0.5), miou, center_error, area_ratio, right_object, format_rate
  cls:   accuracy (normalized exact match), format_rate
  count: accuracy (exact numeric match), mae, parsed_rate, format_rate
  det:   map (COCO-style, IoU 0.50:0.95, 101-point), ap50, ap75, pred_per_gt (#pred / #gt),
         parsed_rate, format_rate
Writes JSON summaries and per-sample predictions as JSONL beside them (OUT with .jsonl), and prints
a markdown table of every model x split. --visualize N (rec, det) also draws the first N images of
each split with the true boxes and every model's boxes in its own colour, the phrase and the IoU
(viz.py), as OUT-SPLIT.png beside OUT. A bad row or image in --data stops it before any model loads,
with one line "error: FILE:LINE: what is wrong"; with --skip-bad-rows such rows are counted, listed
on stderr and recorded as `bad_rows` in the summaries.
"""

import argparse
import json
import os
import sys

import torch

import data
import evaluation
import grpo_vlm as g
import infra
import viz
import vlm

TABLE = {
    "rec": [
        ("Acc@0.5", "acc50"),
        ("mIoU", "miou"),
        ("centre err", "center_error"),
        ("area ratio", "area_ratio"),
        ("right object", "right_object"),
        ("format", "format_rate"),
    ],
    "cls": [("accuracy", "accuracy"), ("format", "format_rate")],
    "count": [
        ("accuracy", "accuracy"),
        ("MAE", "mae"),
        ("parsed", "parsed_rate"),
        ("format", "format_rate"),
    ],
    "det": [
        ("mAP", "map"),
        ("AP50", "ap50"),
        ("AP75", "ap75"),
        ("#pred/#gt", "pred_per_gt"),
        ("parsed", "parsed_rate"),
        ("format", "format_rate"),
    ],
}


def markdown_table(summaries, task="rec"):
    cols = TABLE[task]
    lines = [
        "| model | split | " + " | ".join(h for h, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for s in summaries:
        lines.append(
            f"| {s['model']} | {s['split']} | " + " | ".join(f"{s[k]:.3f}" for _, k in cols) + " |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=[],
        help="checkpoint paths or hub ids (default: the task's tiny base)",
    )
    p.add_argument("--task", default="rec", choices=data.TASKS, help="task to evaluate")
    p.add_argument(
        "--data",
        default="",
        help="rows in any --train-data format; empty: the synthetic world's --split",
    )
    p.add_argument(
        "--image-root",
        default="",
        help="folder the rows' image paths are relative to (':' one per source)",
    )
    for what, default in data.DEFAULT_KEYS.items():
        p.add_argument(
            f"--{what}-key", default="", help=f"key of the {what} (empty: {' or '.join(default)})"
        )
    p.add_argument(
        "--split",
        nargs="+",
        default=["test"],
        choices=["test", "ood", "train"],
        help="synthetic splits: test (in-domain), ood (colour-shape pairs never seen in training)",
    )
    p.add_argument("--n", type=int, default=512, help="number of samples (first n rows)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per greedy generate call")
    p.add_argument(
        "--max-new-tokens", type=int, default=0, help="completion length limit (0: 64, det 160)"
    )
    p.add_argument(
        "--json",
        default="eval.json",
        help="summaries output; predictions go to the same name .jsonl",
    )
    p.add_argument(
        "--skip-bad-rows",
        nargs="?",
        const=True,
        default=False,
        type=infra.boolean,
        metavar="BOOL",
        help="skip and count --data rows whose JSON, text, box or image is unusable, instead of "
        "stopping",
    )
    p.add_argument(
        "--visualize",
        type=int,
        default=0,
        metavar="N",
        help="rec, det: draw the first N images of each split with every model's boxes "
        "(OUT-SPLIT.png)",
    )
    a = p.parse_args()
    if a.visualize and a.task not in viz.TASKS:
        p.error(f"--visualize draws boxes: --task {' or '.join(viz.TASKS)}")
    a.model = a.model or [g.tiny_model(a.task)]
    try:
        run(a)
    except (
        data.BadInput
    ) as e:  # a bad row (checked before any model loads) or an image that fails to decode later
        sys.exit(f"error: {e}")


def run(a):
    splits = ["file"] if a.data else a.split
    bad = []
    if a.data:  # every row up to the first n good ones is checked before any model loads
        file_rows, bad = data.load_data(
            a.data, a.image_root, a.task, a.skip_bad_rows, a.n, data.keys_of(a)
        )
        if bad:
            more = [f"... and {len(bad) - 10} more"] if len(bad) > 10 else []
            print(
                f"skipped {len(bad)} bad rows:",
                *bad[:10],
                *more,
                sep="\n  ",
                file=sys.stderr,
                flush=True,
            )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summaries, all_preds = [], []
    rows_of = {
        split: file_rows if a.data else data.synthetic_split(split, a.n, a.task) for split in splits
    }
    for path in a.model:
        model, family = vlm.load(path, device)
        model.eval()
        for split in splits:
            rows = rows_of[split]
            summary, preds = evaluation.evaluate(
                g.greedy,
                model,
                family,
                rows,
                family.coord_space,
                a.task,
                a.batch_size,
                a.max_new_tokens,
            )
            summaries.append({"model": path, "split": split, **summary, "bad_rows": len(bad)})
            all_preds += [{"model": path, "split": split, **q} for q in preds]
            print(json.dumps(summaries[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summaries[0] if len(summaries) == 1 else summaries, f, indent=2)
    with open(os.path.splitext(a.json)[0] + ".jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in all_preds)
    print(markdown_table(summaries, a.task))
    for split in splits if a.visualize else []:
        labels = [viz.model_label(m) for m in a.model]
        labels = (
            labels if len(set(labels)) == len(labels) else a.model
        )  # never two models under one name
        preds = {
            label: [q for q in all_preds if q["model"] == m and q["split"] == split]
            for label, m in zip(labels, a.model)
        }
        path = viz.save_grid(
            f"{os.path.splitext(a.json)[0]}-{split}.png", a.task, rows_of[split], preds, a.visualize
        )
        print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
