"""Datasets, the synthetic shapes world, and prompt templates.

Every dataset here yields rows in VLM-R1's REC schema, so the synthetic world exercises the same
loading path as RefCOCO:

    {"image": "train/000001.png", "problem": "...", "solution": [x1, y1, x2, y2],
     "normalized_solution": [...0-1000...], "width": W, "height": H}

`image` is relative to an image root; `solution` is in original-image pixels.
"""

import json
import math
import os
import random
import warnings

from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Prompt templates (VLM-R1's REC question and its think/answer suffix)
# ---------------------------------------------------------------------------------------------
REC_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {caption}."
THINK_SUFFIX = (
    " First output the thinking process in <think> </think> tags and then output the final answer"
    " in <answer> </answer> tags. Output the final answer in JSON format."
)


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
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if task == "rec" and not (isinstance(box, list) and len(box) == 4 and all(map(is_num, box))
                              and box[0] < box[2] and box[1] < box[3]):
        raise BadInput(f"solution must be [x1, y1, x2, y2] with x1 < x2, y1 < y2, got {_short(box)}")
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
    if task == "rec" and (min(box[:2]) < -BOX_SLACK or box[2] > w + BOX_SLACK or box[3] > h + BOX_SLACK):
        raise BadInput(f"solution {_short(box)} lies outside the {w}x{h} image '{path}'")
    return {**row, "image_path": path}


def load_jsonl(path, image_root, task="rec", skip_bad_rows=False, limit=None):
    """Read VLM-R1-style JSONL rows, resolve `image` against `image_root`, and check every row upfront:
    a JSON object with `image`, `problem` (non-empty text) and `solution` ([x1, y1, x2, y2] inside the image for
    task rec), an image that PIL opens and verifies, at least MIN_SIDE px a side with an aspect ratio of at most
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


def synthetic_rows(split, n, seed=0, size=IMAGE_SIZE):
    """Yield (PIL image, row) pairs of the synthetic REC world; deterministic in (split, n, seed)."""
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


def make_synthetic(root, split, n, seed=0):
    """Write `n` synthetic images under `root/split/` and `root/split.jsonl`; reuse them if present."""
    path = os.path.join(root, f"{split}-{n}-{seed}-v{WORLD_VERSION}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(root, split), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for im, row in synthetic_rows(split, n, seed):
            row["image"] = f"{split}/v{WORLD_VERSION}-{seed}-{row['image'].split('/')[1]}"
            im.save(os.path.join(root, row["image"]))
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def synthetic_vocab():
    """Every word the synthetic world and the templates can produce (for the tiny tokenizer)."""
    words = set((REC_QUESTION + THINK_SUFFIX).replace(".", " ").replace(":", " ").split())
    words |= set(COLORS) | set(SHAPES) | {"the", "is", "at", "left", "right", "top", "bottom", "center"}
    return sorted(words)


def box_words(box, width, height):
    """A short description of where a box is ("top left"), used in the tiny model's think text."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "center"
    return f"{vert} {horiz}"
