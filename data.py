"""Datasets, the synthetic shapes world, and prompt templates.

Every dataset here yields rows in VLM-R1's REC schema, so the synthetic world exercises the same
loading path as RefCOCO:

    {"image": "train/000001.png", "problem": "...", "solution": [x1, y1, x2, y2],
     "normalized_solution": [...0-1000...], "width": W, "height": H}

`image` is relative to an image root; `solution` is in original-image pixels.
"""

import functools
import json
import math
import os
import random
import re
import sys
import warnings

from PIL import Image, ImageDraw

import rewards

# ---------------------------------------------------------------------------------------------
# Prompt templates (VLM-R1's REC question and its think/answer suffix)
# ---------------------------------------------------------------------------------------------
REC_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {caption}."
THINK_SUFFIX = (
    " First output the thinking process in <think> </think> tags and then output the final answer"
    " in <answer> </answer> tags. Output the final answer in JSON format."
)


CLS_QUESTION = "What is the object in this image? Answer with its colour and shape."
COUNT_QUESTION = "How many shapes are in this image? Answer with a number."
DET_QUESTION = ('Detect every {shape} in this image. Answer with a list of boxes with confidences: '
                '[{{"box": [x1, y1, x2, y2], "confidence": c}}].')
TASKS = ("rec", "cls", "count", "det")


def build_messages(problem):
    """One user turn holding the image and the problem text plus the think/answer instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem + THINK_SUFFIX}]}]


# ---------------------------------------------------------------------------------------------
# Real-format reader: VLM-R1 REC JSONL rows with an image root
# ---------------------------------------------------------------------------------------------
class BadInput(ValueError):
    """A row or image that cannot be used; the message is one line naming the file and the line."""


MIN_SIDE = 28  # px: one merged vision token of Qwen2/2.5-VL (patch 14 x merge 2); smaller images hold less than one
MAX_ASPECT = 200  # Qwen2-VL's image processor (smart_resize) raises above this aspect ratio
BOX_SLACK = 1.0  # px a box may stick out of the image (rounding in converted annotations)


def _short(v, n=60):
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


def _open_image(path, use):
    """use(PIL image) on the opened file; any failure becomes a one-line BadInput naming the file.
    PIL's DecompressionBombWarning (above 89 MP) is silenced: the image processor resizes such images down;
    above 179 MP PIL raises DecompressionBombError instead, and the image is rejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return use(im)
    except Exception as e:  # whatever PIL raises on a bad file: OSError, SyntaxError, ValueError, ...
        if isinstance(e, MemoryError):
            raise
        if isinstance(e, FileNotFoundError):
            why = "not found"
        elif isinstance(e, Image.UnidentifiedImageError):
            why = "is not an image file PIL can read"
        elif isinstance(e, Image.DecompressionBombError):
            why = f"is too large ({e})"
        elif isinstance(e, OSError) and e.strerror:
            why = f"cannot be opened ({e.strerror})"
        else:
            why = f"is corrupt or truncated ({e})"
        raise BadInput(" ".join(f"image '{path}' {why}".split())) from None


def image_size(path):
    """(width, height), after decoding the whole file, so that a corrupt or truncated image fails here, before
    any training. JPEGs decode at 1/8 scale (draft mode): every byte is still read, at a fraction of the cost."""
    def decode(im):
        size = im.size
        im.draft("RGB", (size[0] // 8, size[1] // 8))
        im.load()
        return size

    return _open_image(path, decode)


def _to_rgb(im):
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:  # composite on white, as Qwen's loader does
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def load_image(path):
    """Open an image as RGB (grayscale, palette and CMYK converted; transparency composited on white).
    Raises BadInput naming the file when it cannot be opened or decoded."""
    return _open_image(path, _to_rgb)


def check_row(line, image_root, task="rec", sizes=None):
    """One JSONL line -> its row with `image_path` resolved, or BadInput saying in one line what is wrong.
    `sizes` caches image sizes (or errors) by path, for the many rows that share an image."""
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        where = f": column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise BadInput(f"not valid JSON ({getattr(e, 'msg', e)}{where})") from None
    if not isinstance(row, dict):
        raise BadInput(f"expected a JSON object, got {_short(row)}")
    missing = [k for k in ("image", "problem", "solution") if k not in row]
    if missing:
        raise BadInput(f"missing key{'s' * (len(missing) > 1)} " + ", ".join(map(repr, missing)))
    problem, box = row["problem"], row["solution"]
    if not isinstance(problem, str) or not problem.strip():
        raise BadInput(f"problem must be a non-empty string, got {_short(problem)}")
    image = row["image"][0] if isinstance(row["image"], list) and row["image"] else row["image"]
    if not isinstance(image, str) or not image.strip():
        raise BadInput(f"image must be a file name, got {_short(row['image'])}")
    solution, labels = check_solution(box, task)
    path = image if os.path.isabs(image) else os.path.join(image_root or "", image)
    sizes = {} if sizes is None else sizes
    if path not in sizes:
        try:
            sizes[path] = image_size(path)
        except BadInput as e:
            sizes[path] = str(e)
    if isinstance(sizes[path], str):
        raise BadInput(sizes[path])
    w, h = sizes[path]
    if min(w, h) < MIN_SIDE:
        raise BadInput(f"image '{path}' is {w}x{h}; both sides must be at least {MIN_SIDE} px "
                       f"(one vision token: patch 14 x merge 2)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadInput(f"image '{path}' is {w}x{h}; its aspect ratio {max(w, h) / min(w, h):.0f} is above "
                       f"{MAX_ASPECT}, which the image processor refuses")
    for b in [solution] if task == "rec" else solution if task == "det" else []:
        if min(b[:2]) < -BOX_SLACK or b[2] > w + BOX_SLACK or b[3] > h + BOX_SLACK:
            raise BadInput(f"{'box' if task == 'det' else 'solution'} {_short(b)} lies outside the {w}x{h} image '{path}'")
    return {**row, "image_path": path, "solution": solution, **({"labels": labels} if task == "det" else {})}


def _is_box(b):
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return isinstance(b, list) and len(b) == 4 and all(map(is_num, b)) and b[0] < b[2] and b[1] < b[3]


def check_solution(sol, task):
    """(solution in the form the rewards take, det labels) or BadInput. rec: [x1, y1, x2, y2] in original pixels;
    det: a list (maybe empty) of boxes, each [x1, y1, x2, y2] or {"bbox_2d" (or "bbox", "box"): [...],
    "label": ...} -> the boxes; cls: a non-empty label; count: a number (or a numeric string) -> float."""
    if task == "rec":
        if not _is_box(sol):
            raise BadInput(f"solution must be [x1, y1, x2, y2] with x1 < x2, y1 < y2, got {_short(sol)}")
        return sol, None
    if task == "det":
        if not isinstance(sol, list):
            raise BadInput(f"solution must be a list of boxes, got {_short(sol)}")
        boxes, labels = [], []
        for item in sol:
            key = next((k for k in ("bbox_2d", "bbox", "box") if isinstance(item, dict) and k in item), None)
            b = item[key] if key else item
            if not _is_box(b):
                raise BadInput(f"solution: each box must be [x1, y1, x2, y2] with x1 < x2, y1 < y2 "
                               f"(or a dict with it under bbox_2d), got {_short(item)}")
            boxes.append(b)
            labels.append(str(item.get("label", "")) if isinstance(item, dict) else "")
        return boxes, labels
    if task == "cls":
        if not isinstance(sol, str) or not sol.strip():
            raise BadInput(f"solution must be a non-empty label, got {_short(sol)}")
        return sol, None
    if task == "count":
        try:
            n = float(sol) if not isinstance(sol, bool) else math.nan
        except (TypeError, ValueError):
            n = math.nan
        if not math.isfinite(n):
            raise BadInput(f"solution must be a number, got {_short(sol)}")
        return n, None
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def load_jsonl(path, image_root, task="rec", skip_bad_rows=False, limit=None):
    """Read VLM-R1-style JSONL rows, resolve `image` against `image_root`, and check every row upfront:
    a JSON object with `image`, `problem` (non-empty text) and `solution` (see check_solution; boxes inside the
    image), an image that PIL opens and verifies, at least MIN_SIDE px a side with an aspect ratio of at most
    MAX_ASPECT. Stops after `limit` good rows.

    Returns (rows, bad): without skip_bad_rows the first bad row raises BadInput ("FILE:LINE: what is wrong");
    with it, `bad` holds that line for every skipped row. No usable row at all raises BadInput either way."""
    rows, bad, sizes = [], [], {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadInput(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(check_row(line.rstrip(b"\r\n"), image_root, task, sizes))
            except BadInput as e:
                if not skip_bad_rows:
                    raise BadInput(f"{path}:{lineno}: {e}") from None
                bad.append(f"{path}:{lineno}: {e}")
    if not rows:
        raise BadInput(f"{path}: no usable rows" + (f" ({len(bad)} bad, the first: {bad[0]})" if bad else ""))
    return rows, bad


# ---------------------------------------------------------------------------------------------
# The synthetic shapes world
# ---------------------------------------------------------------------------------------------
# Each image holds 2-3 objects, a quarter to two fifths of the image wide, with distinct (colour,
# shape) pairs on a background whose colour encodes position (red grows left to right, blue top to
# bottom). The gradient matters: a tiny vision tower learns where a patch is from its colour far
# faster than from positional encodings.
# A distractor always shares the target's colour or its shape, so the phrase decides the answer.
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")
# Colour-shape pairs that never appear in the train/test splits; the "ood" split asks only for these.
OOD_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
             ("purple", "square"), ("white", "circle")}
IMAGE_SIZE = 128
SPLIT_SEEDS = {"train": 0, "test": 1_000_003, "ood": 2_000_003}
WORLD_VERSION = 2  # part of the cache file names: bump it whenever the world changes


@functools.lru_cache(maxsize=4)
def _background(size):
    im = Image.new("RGB", (size, size))
    px = im.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (40 + 120 * x // size, 90, 40 + 120 * y // size)
    return im


def _draw(draw, shape, box, color):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def synthetic_rows(split, n, seed=0, size=IMAGE_SIZE, task="rec"):
    """Yield (PIL image, row) pairs of the synthetic world of `task`; deterministic in (split, n, seed)."""
    if task != "rec":
        yield from {"cls": _cls_rows, "count": _count_rows, "det": _det_rows}[task](split, n, seed, size)
        return
    rng = random.Random(SPLIT_SEEDS[split] + seed)
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    in_dist = [p for p in all_pairs if p not in OOD_PAIRS]
    bg = _background(size)
    for i in range(n):
        target = rng.choice(sorted(OOD_PAIRS) if split == "ood" else in_dist)
        # distractors: one sharing the colour or the shape when possible, then any other pair
        similar = [p for p in in_dist if p != target and (p[0] == target[0] or p[1] == target[1])]
        others = [rng.choice(similar)]
        if rng.random() < 0.5:
            others.append(rng.choice([p for p in in_dist if p not in (target, others[0])]))
        objects, boxes = [target] + others, []
        for _ in objects:
            for _try in range(50):  # rejection-sample a box that does not overlap the others
                w = rng.randint(size // 4, size * 2 // 5)
                x1, y1 = rng.randint(0, size - w - 1), rng.randint(0, size - w - 1)
                box = [x1, y1, x1 + w, y1 + w]
                if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                    break
            boxes.append(box)
        im = bg.copy()
        draw = ImageDraw.Draw(im)
        for (color, shape), box in zip(objects, boxes):
            _draw(draw, shape, box, COLORS[color])
        caption = f"the {target[0]} {target[1]}"
        box = boxes[0]
        yield im, {
            "image": f"{split}/{i:06d}.png",
            "problem": REC_QUESTION.format(caption=caption),
            "solution": box,
            "normalized_solution": [round(v * 1000 / size) for v in box],
            "width": size,
            "height": size,
            "caption": caption,
            # every object, target first: lets eval.py tell "wrong object" from "imprecise box"
            "objects": [{"label": f"{c} {s}", "box": b} for (c, s), b in zip(objects, boxes)],
        }


# The other tasks' worlds: the same background, colours and shapes.
def _place(rng, k, size, lo, hi):
    """k non-overlapping square boxes with sides in [size/lo, size/hi] (rejection sampling; after 50 tries a box
    may overlap)."""
    boxes = []
    for _ in range(k):
        for _try in range(50):
            w = rng.randint(size // lo, size // hi)
            x1, y1 = rng.randint(0, size - w - 1), rng.randint(0, size - w - 1)
            box = [x1, y1, x1 + w, y1 + w]
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        boxes.append(box)
    return boxes


def _render(objects, boxes, size):
    im = _background(size).copy()
    draw = ImageDraw.Draw(im)
    for (color, shape), box in zip(objects, boxes):
        _draw(draw, shape, box, COLORS[color])
    return im


def _pairs(split):
    """The colour-shape pairs a split draws from: in-distribution ones, or for ood the held-out ones."""
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    return sorted(OOD_PAIRS) if split == "ood" else [p for p in all_pairs if p not in OOD_PAIRS]


def _row(split, i, size, problem, solution, objects, boxes):
    return {"image": f"{split}/{i:06d}.png", "problem": problem, "solution": solution, "width": size, "height": size,
            "objects": [{"label": f"{c} {s}", "box": b} for (c, s), b in zip(objects, boxes)]}


def _cls_rows(split, n, seed, size):
    """Classification (Visual-RFT's fine-grained setting in miniature): one object, the label is its colour and
    shape. The classes come round-robin, so --train-size k x 12 is a k-shot training set."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 101)
    classes = _pairs(split)
    for i in range(n):
        obj = classes[i % len(classes)] if split == "train" else rng.choice(classes)
        box = _place(rng, 1, size, 4, 2)
        yield _render([obj], box, size), _row(split, i, size, CLS_QUESTION, f"{obj[0]} {obj[1]}", [obj], box)


def _count_rows(split, n, seed, size):
    """Counting: 1-5 smaller objects (any colour-shape pair, repeats allowed); the answer is how many."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 202)
    for i in range(n):
        k = rng.randint(1, 5)
        objects = [rng.choice(_pairs(split)) for _ in range(k)]
        boxes = _place(rng, k, size, 6, 4)
        yield _render(objects, boxes, size), _row(split, i, size, COUNT_QUESTION, k, objects, boxes)


def _det_rows(split, n, seed, size):
    """Detection: 2-4 objects, 1-3 of them of the asked shape; the answer lists every box of that shape.
    Rows take the real detection format: solution = [{"bbox_2d": [x1, y1, x2, y2], "label": shape}, ...]."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 303)
    for i in range(n):
        shape, k = rng.choice(SHAPES), rng.randint(2, 4)
        hits = rng.randint(1, min(3, k))
        pool = _pairs(split)
        objects = ([rng.choice([p for p in pool if p[1] == shape]) for _ in range(hits)] +
                   [rng.choice([p for p in pool if p[1] != shape]) for _ in range(k - hits)])
        rng.shuffle(objects)
        boxes = _place(rng, k, size, 5, 3)
        solution = [{"bbox_2d": b, "label": s} for (c, s), b in zip(objects, boxes) if s == shape]
        yield _render(objects, boxes, size), _row(split, i, size, DET_QUESTION.format(shape=shape), solution,
                                                   objects, boxes)


def make_synthetic(root, split, n, seed=0, task="rec"):
    """Write `n` synthetic images under `root/split/` and their rows to a JSONL in `root`; reuse them if present."""
    prefix = "" if task == "rec" else f"{task}-"
    path = os.path.join(root, f"{prefix}{split}-{n}-{seed}-v{WORLD_VERSION}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(root, split), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for im, row in synthetic_rows(split, n, seed, task=task):
            row["image"] = f"{split}/{prefix}v{WORLD_VERSION}-{seed}-{row['image'].split('/')[1]}"
            im.save(os.path.join(root, row["image"]))
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


SYNTHETIC_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic")


def synthetic_split(split, n, task="rec"):
    """The first n rows of a synthetic split (made on first use), checked like any other rows."""
    return load_jsonl(make_synthetic(SYNTHETIC_ROOT, split, n, task=task), SYNTHETIC_ROOT, task)[0]


def ground_truths(rows, sizes, coord_space, rule=None):
    """The `gt` dicts the rewards read (rewards.py), from rows and their (input w, input h, original w, h) sizes, with
    the rule refinement in force (rewards.refinement_stage's keys; default: IoU threshold 0, no stage)."""
    return [{"solution": r["solution"], "width": W, "height": H, "input_width": w, "input_height": h,
             "coord_space": coord_space, "iou_threshold": 0.0, **(rule or {})} for r, (w, h, W, H) in zip(rows, sizes)]


def load_rows(args):
    """(rows, bad): the training rows of a run's Args (--train-data, or the synthetic world), and one line per row
    skipped by --skip-bad-rows. Every row and image is checked here, before any model is loaded; a bad one stops
    the run with one line."""
    try:
        if not args.train_data:
            path = make_synthetic(SYNTHETIC_ROOT, "train", args.train_size or 2000, args.seed, args.task)
            return load_jsonl(path, SYNTHETIC_ROOT, args.task, args.skip_bad_rows)
        limit = args.train_size if args.train_size and args.task != "cls" else None
        rows, bad = load_jsonl(args.train_data, args.image_root, args.task, args.skip_bad_rows, limit)
    except BadInput as e:
        sys.exit(f"error: {e}")
    return (class_balanced(rows, args.train_size) if args.train_size and args.task == "cls" else rows), bad


def synthetic_vocab(tasks=("rec",)):
    """Every word the synthetic worlds, the templates and the SFT targets of `tasks` can produce (for the tiny
    tokenizer). The REC-only list is kept as it was, so the shipped REC model rebuilds bit-identically."""
    words = set((REC_QUESTION + THINK_SUFFIX).replace(".", " ").replace(":", " ").split())
    words |= set(COLORS) | set(SHAPES) | {"the", "is", "at", "left", "right", "top", "bottom", "center"}
    if set(tasks) - {"rec"}:
        words |= set(re.findall(r"[A-Za-z]+", CLS_QUESTION + COUNT_QUESTION + DET_QUESTION + THINK_SUFFIX))
        words |= {s + "s" for s in SHAPES} | {"shapes", "box", "confidence"}
    return sorted(words)


CONFIDENCE = 0.9  # the confidence the det SFT targets give every box (tiny model: one decimal is one token)


def sft_target(task, row, gt):
    """The supervised target of a synthetic row: a short chain of thought, then the answer, in the model's
    coordinate space. The thought lists every object left to right (dense supervision: with only the target
    named, the tiny model stayed at chance picking the right object; see README), then concludes."""
    scale = rewards.to_original_pixels([1, 1, 1, 1], gt)  # original pixels per model unit
    units = lambda b: [round(v / f) for v, f in zip(b, scale)]  # noqa: E731
    W, H = gt["width"], gt["height"]
    objs = sorted(row.get("objects", []), key=lambda o: o["box"][0] + o["box"][2])
    seen = " , ".join(f"{o['label']} {box_words(o['box'], W, H)}" for o in objs)
    seen = f"{seen} . " if seen else ""
    if task == "rec":
        where = box_words(row["solution"], W, H)
        answer = str(units(row["solution"]))
        think = f"{seen}{row.get('caption', 'the object')} is at the {where}"
    elif task == "cls":
        think, answer = seen.rstrip(". "), row["solution"]
    elif task == "count":
        k = int(row["solution"])
        think, answer = f"{' , '.join(o['label'] for o in objs)} . {k} shapes", str(k)
    elif task == "det":
        shape = row["problem"].split()[2]  # "Detect every SHAPE in ..."
        boxes = sorted(row["solution"], key=lambda b: b[0] + b[2])
        think = f"{seen}{len(boxes)} {shape}s"
        answer = json.dumps([{"box": units(b), "confidence": CONFIDENCE} for b in boxes])
    else:
        raise ValueError(f"unknown task {task!r}")
    return f"<think> {think} </think> <answer> {answer} </answer>"


def box_words(box, width, height):
    """A short description of where a box is ("top left"), used in the tiny model's think text."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "center"
    return f"{vert} {horiz}"


def class_balanced(rows, n):
    """n rows taken round-robin over the labels (file order within a label): n = k x classes is a k-shot set,
    Visual-RFT's few-shot classification setting."""
    by_label = {}
    for r in rows:
        by_label.setdefault(rewards.normalize_text(r["solution"]), []).append(r)
    queues, out = list(by_label.values()), []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out
