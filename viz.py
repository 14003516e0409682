"""Pictures of predicted boxes: a grid of images, each with its true box(es) in white and each
model's predicted box(es) in that model's colour, the phrase above it and each model's IoU below it
(rec and det).

    python eval.py --task rec --model checkpoints/tiny-qwen2.5-vl-rec runs/rec/final --n 8
    --visualize 8

draws the grid of the models eval.py compares (eval.py); grpo_vlm.py draws one of the final model on
the held-out test split at the end of a run on the synthetic world (held_out_grid). Drawn from
eval's scored predictions (rewards.score): boxes already in original pixels.
"""

import math
import os

import data
import rewards

TASKS = ("rec", "det")  # the tasks with boxes to draw
# (box, text) colours: the true boxes black in a white halo (no shape is black); each model's in a
# black halo, its text a darker shade of the same hue (readable on white)
TRUE = ("black", "black")
COLOURS = [
    ("#ff1fce", "#c4009a"),
    ("#00e1ff", "#0089b3"),
    ("#ff9500", "#c26500"),
    ("#a6ff00", "#4d8a00"),
]
CELL_W, IMAGE_PX, TITLE_PX, LINE_PX, PAD_PX, HEADER_PX, DPI = 280, 240, 34, 17, 10, 34, 100


def grid_size(n, n_models):
    """(width, height) in pixels of the grid of n images and n_models models."""
    cols = min(n, 4)
    return cols * CELL_W, HEADER_PX + math.ceil(n / cols) * cell_height(n_models)


def cell_height(n_models):
    return TITLE_PX + IMAGE_PX + n_models * LINE_PX + PAD_PX


def phrase(row):
    """What the prompt asks for: the REC caption, else the first sentence of the problem."""
    if row.get("caption"):
        return row["caption"]
    head, _, tail = data.REC_QUESTION.partition("{caption}")
    p = row["problem"]
    if p.startswith(head) and p.endswith(tail):
        return p[len(head) : len(p) - len(tail)]
    return p.split(". ")[0].rstrip(".")


def det_iou(pred_boxes, true_boxes):
    """Visual-RFT's detection IoU (rewards.det_iou_reward on boxes in original pixels): the sum of
    the IoUs of greedy matches above 0.5 / max(#true, #pred), and the number matched; (0, 0) for an
    unparsed answer."""
    if not pred_boxes:
        return (1.0 if not true_boxes else 0.0), 0
    matches = rewards.match_detections(pred_boxes, true_boxes, 0.5)
    return sum(iou for *_, iou in matches) / max(len(true_boxes), len(pred_boxes)), len(matches)


def model_label(path):
    """A short name for a model path: its folder name, with its parent's for a run's
    final/checkpoint folder."""
    parts = os.path.normpath(str(path)).split(os.sep)
    generic = parts[-1] in ("final", "cold-start") or parts[-1].startswith("checkpoint-")
    return "/".join(parts[-2:]) if generic and len(parts) > 1 else parts[-1]


def save_grid(path, task, rows, preds, n=None):
    """Draw the first n rows (all if None) with each model's predictions, preds = {label:
    [rewards.score dict per row]}, and save the PNG at `path` (size grid_size). Returns the path."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure  # the object API: no pyplot, no display
    from matplotlib.patches import Rectangle

    if task not in TASKS:
        raise ValueError(f"pictures of boxes are drawn for {TASKS}, not {task!r}")
    n = min(len(rows), n or len(rows))
    W, H = grid_size(n, len(preds))
    ch = cell_height(len(preds))
    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI)
    halo = {c: [patheffects.withStroke(linewidth=3.5, foreground=c)] for c in ("black", "white")}
    # the header: what each colour is
    keys = [("true box", TRUE)] + [
        (label, COLOURS[j % len(COLOURS)]) for j, label in enumerate(preds)
    ]
    x = 8
    for name, (_, text_colour) in keys:
        fig.text(
            x / W,
            1 - (HEADER_PX / 2) / H,
            f"\u25a1 {name}",
            color=text_colour,
            fontsize=10,
            va="center",
        )
        x += 28 + 7 * len(name)
    for i, row in enumerate(rows[:n]):
        x0, y0 = (
            (i % 4) * CELL_W,
            HEADER_PX + (i // 4) * ch,
        )  # the cell's top left, pixels from the top
        ax = fig.add_axes(
            [
                (x0 + (CELL_W - IMAGE_PX) / 2) / W,
                1 - (y0 + TITLE_PX + IMAGE_PX) / H,
                IMAGE_PX / W,
                IMAGE_PX / H,
            ]
        )
        im = data.load_image(row["image_path"])
        ax.imshow(im, extent=(0, im.width, im.height, 0), interpolation="nearest")
        ax.set_axis_off()
        ax.set_xlim(0, im.width)
        ax.set_ylim(im.height, 0)

        def box(b, colour, lw, ls="-"):
            edge = halo["white" if colour == "black" else "black"]
            w, h = b[2] - b[0], b[3] - b[1]
            kw = dict(fill=False, edgecolor=colour, lw=lw, ls=ls, path_effects=edge)
            ax.add_patch(Rectangle((b[0], b[1]), w, h, **kw))

        true_boxes = [row["solution"]] if task == "rec" else row["solution"]
        for b in true_boxes:
            box(b, TRUE[0], 2.2)
        text = phrase(row)
        fig.text(
            (x0 + CELL_W / 2) / W,
            1 - (y0 + TITLE_PX / 2) / H,
            text if len(text) <= 40 else text[:38] + "...",
            ha="center",
            va="center",
            fontsize=10,
        )
        for j, (label, model_preds) in enumerate(preds.items()):
            p, (colour, text_colour) = model_preds[i], COLOURS[j % len(COLOURS)]
            if task == "rec":
                if p["pred_box"]:
                    box(p["pred_box"], colour, 1.8, "--" if j % 2 else "-")
                line = f"IoU {p['iou']:.2f}" if p["pred_box"] else "no box"
            else:
                dets = [(b, c) for b, c in p["pred_boxes"] or []]
                for b, c in dets:
                    box(b, colour, 1.8, "--" if j % 2 else "-")
                    best = max((rewards.box_iou(b, t) for t in true_boxes), default=0.0)
                    ax.text(
                        b[0] + 1,
                        b[1] + 1,
                        f"{best:.2f}",
                        color=colour,
                        fontsize=7,
                        va="top",
                        path_effects=halo["black"],
                    )
                iou, matched = det_iou(dets, true_boxes)
                line = (
                    f"{len(dets)} box{'es' * (len(dets) != 1)}, {matched} of {len(true_boxes)} "
                    f"found, IoU {iou:.2f}"
                    if p["pred_boxes"] is not None
                    else "no parsable answer"
                )
            fig.text(
                (x0 + (CELL_W - IMAGE_PX) / 2) / W,
                1 - (y0 + TITLE_PX + IMAGE_PX + (j + 0.7) * LINE_PX) / H,
                f"\u25a1 {line}",
                color=text_colour,
                fontsize=9,
                va="center",
            )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def held_out_grid(args, predict, n=8):
    """At the end of a run on the synthetic world (rec, det): the final model's boxes on the first n
    images of the held-out test split, in OUTPUT/held_out.png. `predict(rows)` returns rewards.score
    dicts (grpo_vlm.evaluate)."""
    if args.task not in TASKS or args.train_data:
        return None
    rows = data.synthetic_split("test", n, args.task)
    path = save_grid(
        os.path.join(args.output_dir, "held_out.png"),
        args.task,
        rows,
        {"final model": predict(rows)},
    )
    print(f"saved {path}", flush=True)
    return path


def tool_pictures(path, rows, preds, n=8, side=224):
    """Thinking with images, drawn: for each of the first n rows, the image with the target's box
    (white) and the box the model called the zoom tool on (red), the crop it was shown, and its
    answer against the truth; preds: evaluation.evaluate's with `crops` (eval.py --max-tool-calls,
    --visualize). Saves the PNG at `path` and returns the path."""
    from PIL import Image, ImageDraw

    n = min(n, len(rows))
    sheet = Image.new("RGB", (2 * side, n * (side + 20)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, q) in enumerate(zip(rows[:n], preds)):
        image, y = data.load_image(data.row_images(row)[0]), i * (side + 20)
        sx, sy = side / image.width, side / image.height
        scaled = lambda b: [b[0] * sx, b[1] * sy + y, b[2] * sx, b[3] * sy + y]  # noqa: E731
        sheet.paste(image.resize((side, side)), (0, y))
        for obj in row.get("objects", [])[:1]:
            draw.rectangle(scaled(obj["box"]), outline="white", width=2)
        for box in q.get("crops", []):
            draw.rectangle(scaled(box), outline="red", width=2)
        if q.get("crops"):
            sheet.paste(image.crop(tuple(q["crops"][0])).resize((side, side)), (side, y))
        answer = rewards.last_answer(q["completion"])
        draw.text((4, y + side + 4), f"answer: {answer}   truth: {q['solution']}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path
