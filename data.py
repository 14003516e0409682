"""Datasets, the synthetic shapes world, and prompt templates.

Every dataset here yields rows in VLM-R1's REC schema, so the synthetic world exercises the same
loading path as RefCOCO:

    {"image": "train/000001.png", "problem": "...", "solution": [x1, y1, x2, y2],
     "normalized_solution": [...0-1000...], "width": W, "height": H}

`image` is relative to an image root; `solution` is in original-image pixels.

The readers (`load_data`) take the public formats as they are and turn each row into that schema,
with the same upfront check and one-line "FILE:LINE: what is wrong" errors: problem/solution rows,
VLM-R1's `conversations` JSONL, chat `messages` rows, and HF datasets (a save_to_disk folder,
parquet, Arrow, or a hub id), several joined by `:`.
"""

import functools
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass

from PIL import Image, ImageDraw

import rewards

# ---------------------------------------------------------------------------------------------
# Prompt templates (VLM-R1's REC question and its think/answer suffix)
# ---------------------------------------------------------------------------------------------
REC_QUESTION = (
    "Please provide the bounding box coordinate of the region this sentence describes: {caption}."
)
THINK_SUFFIX = (
    " First output the thinking process in <think> </think> tags and then output the final answer"
    " in <answer> </answer> tags. Output the final answer in JSON format."
)


CLS_QUESTION = "What is the object in this image? Answer with its colour and shape."
COUNT_QUESTION = "How many shapes are in this image? Answer with a number."
DET_QUESTION = (
    "Detect every {shape} in this image. Answer with a list of boxes with confidences: "
    '[{{"box": [x1, y1, x2, y2], "confidence": c}}].'
)
ZOOM_QUESTION = (
    "What pattern fills the small grey square? Answer horizontal, vertical, checkered or solid."
)
TASKS = ("rec", "cls", "count", "det", "zoom")


def build_messages(problem, chat=None, images=1):
    """One user turn holding the row's `images` images, then the problem text plus the think/answer
    instruction (several images all come first, as VLM-R1's grpo_jsonl.py
    make_conversation_from_jsonl builds them). A benchmark's prompt (registry.chat) gives `chat` =
    {"text": the whole user text, "system": a system prompt or None (the chat template's default)}
    instead."""
    text, system = (chat["text"], chat.get("system")) if chat else (problem + THINK_SUFFIX, None)
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return turns + [{"role": "user", "content": parts}]


def row_images(row):
    """The image paths of a checked row, in prompt order: `image_paths` where it has several, else
    its one `image_path`. Boxes (rec, det) and `_size` refer to the first."""
    return row.get("image_paths") or [row["image_path"]]


def with_prompt(rows, prompt):
    """The rows, each with a paper recipe's prompt (rewards.prompt_template: {"text": its user turn,
    "{problem}" the question, "system": its system prompt or None}) as its `_chat`, which
    build_messages takes; unchanged when there is none."""
    if not prompt:
        return rows
    chat = lambda r: {**prompt, "text": prompt["text"].replace("{problem}", r["problem"])}  # noqa: E731
    return [dict(r, _chat=chat(r)) for r in rows]


# ---------------------------------------------------------------------------------------------
# Readers of the public formats. Every row becomes the schema above (plus `image_path`, `_where` =
# "FILE:LINE" and `_size` = the image's (w, h)) and is checked upfront; a bad row is one line
# "FILE:LINE: what is wrong", where LINE is the JSONL line, or for a table (parquet, Arrow, hub) the
# row number from 1.
# ---------------------------------------------------------------------------------------------
class BadInput(ValueError):
    """A row or image that cannot be used; the message is one line naming the file and the line."""


@dataclass
class DataFlags:
    """Data: the training and held-out rows, their formats and keys"""

    train_data: str = ""
    """rows: JSONL (problem/solution, conversations, messages), parquet, Arrow, hub id; a:b joins;
    empty: synthetic"""
    image_root: str = ""
    """folder that the image paths of the rows are relative to (one per --train-data source, joined
    by ':')"""
    train_size: int = 0
    """training rows: synthetic images to make (0: 2000) or the first N of --train-data (0: all);
    cls balances classes"""
    skip_bad_rows: bool = False
    """skip and count rows whose JSON, text, box or image is unusable, instead of stopping with an
    error"""
    eval_data: str = ""
    """held-out rows in any --train-data format, evaluated every --eval-every steps (its first
    --eval-n rows)"""
    max_prompt_length: int = 512
    """most prompt tokens, image tokens included; a longer row stops the run upfront or is skipped
    (0: no limit)"""
    problem_key: str = ""
    """key (column) of the question in problem/solution rows (empty: problem, else question)"""
    solution_key: str = ""
    """key of the answer (empty: solution, else answer; chat rows: else the last assistant
    message)"""
    image_key: str = ""
    """key of the images: a path, bytes, a {bytes, path} struct or a list of these (empty: image,
    else images)"""


DEFAULT_KEYS = {
    "image": ("image", "images"),
    "problem": ("problem", "question"),
    "solution": ("solution", "answer"),
}


def keys_of(args):
    """{image, problem, solution: the key flag given, or ""} of a run's Args."""
    return {k: getattr(args, f"{k}_key", "") for k in DEFAULT_KEYS}


# px: one merged vision token of Qwen2/2.5-VL (patch 14 x merge 2); smaller images hold less than
# one
MIN_SIDE = 28
MAX_ASPECT = 200  # Qwen2-VL's image processor (smart_resize) raises above this aspect ratio
BOX_SLACK = 1.0  # px a box may stick out of the image (rounding in converted annotations)


def _short(v, n=60):
    s = json.dumps(v, ensure_ascii=False, default=lambda x: f"<{type(x).__name__}>")
    return s if len(s) <= n else s[: n - 3] + "..."


class Cell:
    """A cell of an Arrow table that holds bytes (an image): read when used, never copied into the
    row."""

    __slots__ = ("column", "i")

    def __init__(self, column, i):
        self.column, self.i = column, i

    def get(self):
        return self.column[self.i].as_py()


class Embedded:
    """An image stored in a dataset (bytes, or a PIL image), named "FILE:ROW"; load_image opens it
    like a file."""

    def __init__(self, name, fetch):
        self.name, self.fetch = name, fetch

    def __str__(self):
        return self.name

    __repr__ = __str__

    def open(self):
        v = self.fetch()
        return v.copy() if isinstance(v, Image.Image) else Image.open(io.BytesIO(v))


def _open_image(path, use):
    """use(PIL image) on the opened file (or Embedded image); any failure becomes a one-line
    BadInput naming it. PIL's DecompressionBombWarning (above 89 MP) is silenced: the image
    processor resizes such images down; above 179 MP PIL raises DecompressionBombError instead, and
    the image is rejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with path.open() if isinstance(path, Embedded) else Image.open(path) as im:
                return use(im)
    except (
        Exception
    ) as e:  # whatever PIL raises on a bad file: OSError, SyntaxError, ValueError, ...
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
    """(width, height), after decoding the whole file, so that a corrupt or truncated image fails
    here, before any training. JPEGs decode at 1/8 scale (draft mode): every byte is still read, at
    a fraction of the cost."""

    def decode(im):
        size = im.size
        im.draft("RGB", (size[0] // 8, size[1] // 8))
        im.load()
        return size

    return _open_image(path, decode)


def _to_rgb(im):
    if (
        im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    ):  # composite on white, as Qwen's loader does
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert(
            "RGB"
        )
    return im.convert("RGB")


def load_image(path):
    """Open an image (a file, or an Embedded one) as RGB (grayscale, palette and CMYK converted;
    transparency composited on white). Raises BadInput naming the file when it cannot be opened or
    decoded."""
    return _open_image(path, _to_rgb)


def _value(row, key):
    v = row[key]
    return v.get() if isinstance(v, Cell) else v


def _find(row, what, keys):
    """The key of `row` that holds `what` (image, problem, solution): the --WHAT-key flag's, else
    the first default present (one holding null only when none holds more); None if absent."""
    present = [k for k in ((keys[what],) if keys.get(what) else DEFAULT_KEYS[what]) if k in row]
    return next((k for k in present if row[k] is not None), present[0] if present else None)


def _missing(whats, keys):
    names = [
        repr(keys[w]) + f" (--{w}-key)"
        if keys.get(w)
        else " or ".join(map(repr, DEFAULT_KEYS[w])).replace(" or ", " (or ", 1) + ")"
        for w in whats
    ]
    return BadInput(f"missing key{'s' * (len(whats) > 1)} " + ", ".join(names))


def _from_conversations(turns):
    """(problem, solution, <image> placeholders) of VLM-R1's grpo_jsonl.py rows: the first human
    turn, its <image> placeholders removed, and the gpt turn after it (<answer> tags and JSON text
    are handled by check_solution)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
        raise BadInput(
            f'conversations must be a list of {{"from", "value"}} turns, got {_short(turns)}'
        )
    who = [t.get("from") for t in turns]
    human = next((i for i, w in enumerate(who) if w in ("human", "user")), None)
    gpt = next(
        (
            i
            for i, w in enumerate(who)
            if w in ("gpt", "assistant") and human is not None and i > human
        ),
        None,
    )
    if human is None or gpt is None:
        raise BadInput(
            f"conversations needs a human turn and a gpt turn after it, got turns from "
            f"{_short(who)}"
        )
    problem, solution = turns[human]["value"], turns[gpt]["value"]
    if not isinstance(problem, str):
        return problem, solution, 0
    return problem.replace("<image>", "").strip(), solution, problem.count("<image>")


def _content(content):
    """(text, images) of a chat message's content: a string (with <image> placeholders) or a list of
    parts."""
    if isinstance(content, str):
        return content.replace("<image>", "").strip(), content.count("<image>")
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") or "" for p in content if p.get("type", "text") == "text"]
        n = sum(p.get("type") in ("image", "image_url") for p in content) + sum(
            t.count("<image>") for t in texts
        )
        return " ".join(t.replace("<image>", "").strip() for t in texts if t.strip()), n
    raise BadInput(f"a message's content must be text or a list of parts, got {_short(content)}")


def _from_messages(row, key, keys):
    """(problem, solution, image parts) of a chat row (TRL, verl, ms-swift): `messages` (or
    `prompt`), a list of {"role", "content"}. The problem is the last user message's text (a system
    message is not used: our prompt template applies); the solution is the `solution` field, else
    `answer`, else the last message if it is the assistant's."""
    msgs = _value(row, key)
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise BadInput(
            f'{key} must be a list of {{"role", "content"}} messages, got {_short(msgs)}'
        )
    answered = bool(msgs) and msgs[-1]["role"] == "assistant"
    users = [m for m in (msgs[:-1] if answered else msgs) if m["role"] == "user"]
    if not users:
        raise BadInput(f"{key} has no user message")
    problem, n = _content(users[-1]["content"])
    k = _find(row, "solution", keys)
    if k is None and keys.get("solution"):
        raise BadInput(f"missing key {keys['solution']!r} (--solution-key)")
    if k is None and not answered:
        raise BadInput(
            "no solution: no 'solution' or 'answer' field, and the last message is not the "
            "assistant's"
        )
    return problem, _value(row, k) if k else _content(msgs[-1]["content"])[0], n


def _images(value, where):
    """[(file name, None) or (None, Embedded)] of a row's images: a path, bytes, a {bytes, path}
    struct (HF's Image feature in Arrow/parquet), a PIL image, or a list of these (several images:
    the k-th embedded one is named "FILE:ROW#k")."""
    get = value.get if isinstance(value, Cell) else (lambda: value)
    v = get()
    if not isinstance(v, (list, tuple)):
        return [_one_image(v, get, where)]
    if not v:
        raise BadInput("the row's image list is empty")
    named = lambda k: where if len(v) == 1 or not where else f"{where}#{k + 1}"  # noqa: E731
    return [_one_image(x, lambda g=get, k=k: g()[k], named(k)) for k, x in enumerate(v)]


def _one_image(v, get, where):
    """(file name, None) or (None, Embedded) of one image `v`, which `get` reads again."""
    if isinstance(v, dict) and ("bytes" in v or "path" in v):
        if v.get("bytes") is not None:
            return None, Embedded(where, lambda g=get: g()["bytes"])
        v = v.get("path")  # a struct that points to a file
    if isinstance(v, (bytes, bytearray, Image.Image)):
        return None, Embedded(where, get)
    if isinstance(v, str) and v.strip():
        return v, None
    raise BadInput(
        f"image must be a file name, image bytes or a {{bytes, path}} struct, got {_short(v)}"
    )


def _checked_size(path, sizes):
    """(w, h) of an image that the processor takes (cached in `sizes` by path, errors too)."""
    if path not in sizes:
        try:
            sizes[path] = image_size(path)
        except BadInput as e:
            sizes[path] = str(e)
    if isinstance(sizes[path], str):
        raise BadInput(sizes[path])
    w, h = sizes[path]
    if min(w, h) < MIN_SIDE:
        raise BadInput(
            f"image '{path}' is {w}x{h}; both sides must be at least {MIN_SIDE} px "
            f"(one vision token: patch 14 x merge 2)"
        )
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise BadInput(
            f"image '{path}' is {w}x{h}; its aspect ratio {max(w, h) / min(w, h):.0f} is above "
            f"{MAX_ASPECT}, which the image processor refuses"
        )
    return w, h


def check_row(line, image_root, task="rec", sizes=None, keys=None, where=""):
    """One row -> the checked row with `image_path` resolved (several images: also `image_paths`
    and `_sizes`, all of them in order), or BadInput saying in one line what is wrong. `line` is a
    JSONL line or a row dict of any format: problem/solution (keys: DEFAULT_KEYS or the --*-key
    flags), VLM-R1 `conversations`, or chat `messages`/`prompt`. `sizes` caches image sizes (or
    errors) by path, for the many rows that share an image; `where` names an embedded image."""
    if isinstance(line, (bytes, str)):
        try:
            line = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            at = f": column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise BadInput(f"not valid JSON ({getattr(e, 'msg', e)}{at})") from None
    row, keys = line, keys or {}
    if not isinstance(row, dict):
        raise BadInput(f"expected a JSON object, got {_short(row)}")
    chat = next((k for k in ("messages", "prompt") if isinstance(row.get(k), list)), None)
    image_key, n = _find(row, "image", keys), 0  # n: the image placeholders of a chat row
    if "conversations" in row or chat:
        if image_key is None:
            raise _missing(["image"], keys)
        problem, box, n = (
            _from_conversations(_value(row, "conversations"))
            if "conversations" in row
            else _from_messages(row, chat, keys)
        )
    else:
        found = {w: _find(row, w, keys) for w in DEFAULT_KEYS}
        if None in found.values():
            raise _missing([w for w, k in found.items() if k is None], keys)
        problem, box = _value(row, found["problem"]), _value(row, found["solution"])
    if not isinstance(problem, str) or not problem.strip():
        raise BadInput(f"problem must be a non-empty string, got {_short(problem)}")
    images = _images(row[image_key], where)
    if n and n != len(images):
        raise BadInput(f"{n} image placeholders but {len(images)} image(s) in the row")
    solution, labels = check_solution(box, task)
    paths = [e or (i if os.path.isabs(i) else os.path.join(image_root or "", i)) for i, e in images]
    sizes = {} if sizes is None else sizes
    all_sizes = [_checked_size(p, sizes) for p in paths]
    (w, h), path = all_sizes[0], paths[0]  # boxes refer to the first image (README)
    for b in [solution] if task == "rec" else solution if task == "det" else []:
        if min(b[:2]) < -BOX_SLACK or b[2] > w + BOX_SLACK or b[3] > h + BOX_SLACK:
            raise BadInput(
                f"{'box' if task == 'det' else 'solution'} {_short(b)} lies outside the {w}x{h} "
                f"image '{path}'"
            )
    kept = {k: v for k, v in row.items() if not isinstance(v, Cell)}
    several = {"image_paths": paths, "_sizes": all_sizes} if len(paths) > 1 else {}
    return {
        **kept,
        "image": images[0][0] or where,
        "problem": problem,
        "image_path": path,
        "solution": solution,
        "_where": where,
        "_size": (w, h),
        **several,
        **({"labels": labels} if task == "det" else {}),
    }


def _is_box(b):
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return (
        isinstance(b, list) and len(b) == 4 and all(map(is_num, b)) and b[0] < b[2] and b[1] < b[3]
    )


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
JSON_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)


def solution_text(sol, task):
    """A solution given as text, as R1-V, Visual-RFT and VLM-R1 write it: the last
    <answer>...</answer> in it (if any), a ```json fence removed, and for rec and det the JSON
    inside parsed ("[10, 10, 100, 100]"). Other values as given."""
    if not isinstance(sol, str):
        return sol
    tagged = ANSWER_TAG.findall(sol)
    text = tagged[-1].strip() if tagged else sol
    fenced = JSON_FENCE.fullmatch(text.strip())
    text = fenced.group(1) if fenced else text
    if task in ("rec", "det"):
        try:
            return json.loads(text)
        except ValueError:
            return sol
    return text if tagged or fenced else sol


def check_solution(sol, task):
    """(solution in the form the rewards take, det labels) or BadInput. Text is read first
    (solution_text). rec: [x1, y1, x2, y2] in original pixels; det: a list (maybe empty) of boxes,
    each [x1, y1, x2, y2] or {"bbox_2d" (or "bbox", "box"): [...], "label": ...} -> the boxes; cls:
    a non-empty label (zoom too: the pattern word); count: a number (or numeric text)."""
    sol = solution_text(sol, task)
    if task == "rec":
        if not _is_box(sol):
            raise BadInput(
                f"solution must be [x1, y1, x2, y2] with x1 < x2, y1 < y2, got {_short(sol)}"
            )
        return sol, None
    if task == "det":
        if not isinstance(sol, list):
            raise BadInput(f"solution must be a list of boxes, got {_short(sol)}")
        boxes, labels = [], []
        for item in sol:
            key = next(
                (k for k in ("bbox_2d", "bbox", "box") if isinstance(item, dict) and k in item),
                None,
            )
            b = item[key] if key else item
            if not _is_box(b):
                raise BadInput(
                    f"solution: each box must be [x1, y1, x2, y2] with x1 < x2, y1 < y2 "
                    f"(or a dict with it under bbox_2d), got {_short(item)}"
                )
            boxes.append(b)
            labels.append(str(item.get("label", "")) if isinstance(item, dict) else "")
        return boxes, labels
    if task in ("cls", "zoom"):
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


# Where the rows come from: (where, row) pairs of one source, a row being a JSONL line or a dict.
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?")


def _jsonl_records(path):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadInput(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", line.rstrip(b"\r\n")


def _holds_bytes(t):
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if pa.types.is_struct(t):
        return any(_holds_bytes(t.field(i).type) for i in range(t.num_fields))
    listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listed and _holds_bytes(t.value_type)


def _table_records(name, table):
    """Rows of a pyarrow Table as dicts; the columns that hold bytes (images) stay in the table, as
    Cells."""
    heavy = [f.name for f in table.schema if _holds_bytes(f.type)]
    light = table.select([c for c in table.column_names if c not in heavy])
    cols = {c: table.column(c) for c in heavy}
    rows = light.to_pylist() if light.num_columns else [{} for _ in range(table.num_rows)]
    for i, row in enumerate(rows):
        yield f"{name}:{i + 1}", {**row, **{c: Cell(col, i) for c, col in cols.items()}}


def _read_arrow(path):
    import pyarrow as pa

    source = pa.memory_map(
        path
    )  # the table's buffers point into the file: embedded images are read when used
    try:
        return pa.ipc.open_stream(source).read_all()  # what datasets' save_to_disk writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def read_table(path):
    """One pyarrow Table of a parquet or Arrow file, a folder of them, or a datasets save_to_disk
    folder (its Arrow files, listed in state.json). A DatasetDict folder is refused with its split
    names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [path]
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits") or ["train"]
            raise BadInput(
                f"{path}: a DatasetDict with splits {', '.join(splits)}; give one, e.g. "
                f"{os.path.join(path, splits[0])}"
            )
        if os.path.exists(os.path.join(path, "state.json")):
            with open(os.path.join(path, "state.json")) as f:
                files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
        else:
            found = [
                sorted(glob.glob(os.path.join(path, f"*.{ext}"))) for ext in ("parquet", "arrow")
            ]
            files = found[0] or found[1]
        if not files:
            raise BadInput(
                f"{path}: a folder with no parquet or Arrow file (nor a datasets save_to_disk "
                "folder)"
            )
    tables = []
    for f in files:
        kind = "parquet" if f.endswith(".parquet") else "Arrow"
        try:
            tables.append(pq.read_table(f) if kind == "parquet" else _read_arrow(f))
        except (OSError, pa.ArrowException) as e:
            raise BadInput(" ".join(f"{f}: cannot read as {kind} ({e})".split())) from None
    try:
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise BadInput(
            " ".join(f"{path}: its files have different columns ({e})".split())
        ) from None


def hub_table(spec):
    """The pyarrow Table of a hub dataset "owner/name" (split train) or "owner/name/split", with
    `datasets` (imported here only: local data never needs it)."""
    parts = spec.split("/")
    repo, split = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise BadInput(
            f"{spec}: no such file or folder; as a hub dataset id it needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, no such dataset or split, ...
        raise BadInput(
            " ".join(
                f"{spec}: no such file or folder, nor a hub dataset that loads "
                f"({type(e).__name__}: {str(e)[:200]})".split()
            )
        ) from None
    return ds.with_format("arrow")[:]


def _records(path):
    """(where, row) of one source: a JSONL file; a parquet or Arrow file, a folder of them or a
    save_to_disk folder; or a hub dataset id (a path that does not exist, looks like
    owner/name[/split] and has no data file extension)."""
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith((".parquet", ".arrow"))):
        return _table_records(path, read_table(path))
    if not os.path.exists(path) and HUB_ID.fullmatch(path) and not path.endswith(DATA_EXTENSIONS):
        return _table_records(path, hub_table(path))
    return _jsonl_records(path)


def _check_all(records, image_root, task, skip_bad_rows, limit, keys, rows, bad, sizes):
    for where, record in records:
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(check_row(record, image_root, task, sizes, keys, where))
        except BadInput as e:
            if not skip_bad_rows:
                raise BadInput(f"{where}: {e}") from None
            bad.append(f"{where}: {e}")


def load_jsonl(path, image_root, task="rec", skip_bad_rows=False, limit=None, keys=None):
    """Read JSONL rows (any row format check_row takes), resolve images against `image_root`, and
    check every row upfront: a JSON object with an image, a problem (non-empty text) and a solution
    (see check_solution; boxes inside the image), an image that PIL opens and verifies, at least
    MIN_SIDE px a side with an aspect ratio of at most MAX_ASPECT. Stops after `limit` good rows.

    Returns (rows, bad): without skip_bad_rows the first bad row raises BadInput ("FILE:LINE: what
    is wrong"); with it, `bad` holds that line for every skipped row. No usable row at all raises
    BadInput either way."""
    rows, bad = [], []
    _check_all(_jsonl_records(path), image_root, task, skip_bad_rows, limit, keys, rows, bad, {})
    if not rows:
        raise BadInput(
            f"{path}: no usable rows" + (f" ({len(bad)} bad, the first: {bad[0]})" if bad else "")
        )
    return rows, bad


def load_data(spec, image_root, task="rec", skip_bad_rows=False, limit=None, keys=None):
    """load_jsonl for every format: `spec` is one source (_records) or several joined by ':', with
    `image_root` one folder for all or one per source joined by ':' (VLM-R1's --data_file_paths and
    --image_folders). Rows in order, the first `limit` good ones; (rows, bad) as load_jsonl."""
    paths, roots = spec.split(":"), (image_root or "").split(":")
    if len(set(roots)) == 1:
        roots = roots[:1] * len(paths)
    if len(roots) != len(paths):
        raise BadInput(
            f"{spec}: {len(paths)} data sources but {len(roots)} image folders in {image_root!r}; "
            "give one "
            f"folder for all, or one per source joined by ':' (as VLM-R1's --image_folders)"
        )
    rows, bad, sizes = [], [], {}
    for path, root in zip(paths, roots):
        if limit is None or len(rows) < limit:
            _check_all(_records(path), root, task, skip_bad_rows, limit, keys, rows, bad, sizes)
    if not rows:
        raise BadInput(
            f"{spec}: no usable rows" + (f" ({len(bad)} bad, the first: {bad[0]})" if bad else "")
        )
    return rows, bad


def refuse_long(rows, lengths, limit, skip_bad_rows, bad):
    """The rows whose prompt fits in `limit` tokens; `lengths` holds (prompt tokens, image tokens)
    per row. A longer row raises BadInput "FILE:LINE: ...", or with skip_bad_rows is listed in `bad`
    and dropped."""
    kept = []
    for r, (n, image) in zip(rows, lengths):
        if n <= limit:
            kept.append(r)
            continue
        why = (
            f"{r['_where']}: the prompt is {n} tokens ({image} of them the image's), above "
            "--max-prompt-length "
            f"{limit}"
        )
        if not skip_bad_rows:
            raise BadInput(why)
        bad.append(why)
    if not kept:
        raise BadInput(
            f"no usable rows: all {len(rows)} prompts are longer than --max-prompt-length {limit}"
        )
    return kept


def draw(rng, rows, k):
    """k rows for one step. At least k rows: rng.sample(rows, k), the draw order of every earlier
    run. Fewer (a few-shot set): in epochs, every row once in a shuffled order, then again, the last
    pass a sample of the rest; so no row comes more than ceil(k / len(rows)) times. Either way the
    state of `rng` is the data position (resume is exact)."""
    if k <= len(rows):
        return rng.sample(rows, k)
    out = []
    while len(out) < k:
        out += rng.sample(rows, min(len(rows), k - len(out)))
    return out


# ---------------------------------------------------------------------------------------------
# The synthetic shapes world
# ---------------------------------------------------------------------------------------------
# Each image holds 2-3 objects, a quarter to two fifths of the image wide, with distinct (colour,
# shape) pairs on a background whose colour encodes position (red grows left to right, blue top to
# bottom). The gradient matters: a tiny vision tower learns where a patch is from its colour far
# faster than from positional encodings.
# A distractor always shares the target's colour or its shape, so the phrase decides the answer.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
# Colour-shape pairs that never appear in the train/test splits; the "ood" split asks only for
# these.
OOD_PAIRS = {
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "triangle"),
    ("purple", "square"),
    ("white", "circle"),
}
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


def synthetic_rows(split, n, seed=0, size=None, task="rec"):
    """Yield (PIL image, row) pairs of the synthetic world of `task`; deterministic in (split, n,
    seed). Images are `size` px square (default: ZOOM_SIZE for zoom, else IMAGE_SIZE)."""
    size = size or (ZOOM_SIZE if task == "zoom" else IMAGE_SIZE)
    if task != "rec":
        worlds = {"cls": _cls_rows, "count": _count_rows, "det": _det_rows, "zoom": _zoom_rows}
        yield from worlds[task](split, n, seed, size)
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
                if all(
                    box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes
                ):
                    break
            boxes.append(box)
        im = bg.copy()
        draw = ImageDraw.Draw(im)
        for (color, shape), box in zip(objects, boxes):
            _draw(draw, shape, box, COLORS[color])
        caption = f"the {target[0]} {target[1]}"
        box = boxes[0]
        yield (
            im,
            {
                "image": f"{split}/{i:06d}.png",
                "problem": REC_QUESTION.format(caption=caption),
                "solution": box,
                "normalized_solution": [round(v * 1000 / size) for v in box],
                "width": size,
                "height": size,
                "caption": caption,
                # every object, target first: lets eval.py tell "wrong object" from "imprecise box"
                "objects": [{"label": f"{c} {s}", "box": b} for (c, s), b in zip(objects, boxes)],
            },
        )


# The other tasks' worlds: the same background, colours and shapes.
def _place(rng, k, size, lo, hi):
    """k non-overlapping square boxes with sides in [size/lo, size/hi] (rejection sampling; after 50
    tries a box may overlap)."""
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
    """The colour-shape pairs a split draws from: in-distribution ones, or for ood the held-out
    ones."""
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    return sorted(OOD_PAIRS) if split == "ood" else [p for p in all_pairs if p not in OOD_PAIRS]


def _row(split, i, size, problem, solution, objects, boxes):
    return {
        "image": f"{split}/{i:06d}.png",
        "problem": problem,
        "solution": solution,
        "width": size,
        "height": size,
        "objects": [{"label": f"{c} {s}", "box": b} for (c, s), b in zip(objects, boxes)],
    }


def _cls_rows(split, n, seed, size):
    """Classification (Visual-RFT's fine-grained setting in miniature): one object, the label is its
    colour and shape. The classes come round-robin, so --train-size k x 12 is a k-shot training
    set."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 101)
    classes = _pairs(split)
    for i in range(n):
        obj = classes[i % len(classes)] if split == "train" else rng.choice(classes)
        box = _place(rng, 1, size, 4, 2)
        yield (
            _render([obj], box, size),
            _row(split, i, size, CLS_QUESTION, f"{obj[0]} {obj[1]}", [obj], box),
        )


def _count_rows(split, n, seed, size):
    """Counting: 1-5 smaller objects (any colour-shape pair, repeats allowed); the answer is how
    many."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 202)
    for i in range(n):
        k = rng.randint(1, 5)
        objects = [rng.choice(_pairs(split)) for _ in range(k)]
        boxes = _place(rng, k, size, 6, 4)
        yield _render(objects, boxes, size), _row(split, i, size, COUNT_QUESTION, k, objects, boxes)


def _det_rows(split, n, seed, size):
    """Detection: 2-4 objects, 1-3 of them of the asked shape; the answer lists every box of that
    shape. Rows take the real detection format: solution = [{"bbox_2d": [x1, y1, x2, y2], "label":
    shape}, ...]."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 303)
    for i in range(n):
        shape, k = rng.choice(SHAPES), rng.randint(2, 4)
        hits = rng.randint(1, min(3, k))
        pool = _pairs(split)
        objects = [rng.choice([p for p in pool if p[1] == shape]) for _ in range(hits)] + [
            rng.choice([p for p in pool if p[1] != shape]) for _ in range(k - hits)
        ]
        rng.shuffle(objects)
        boxes = _place(rng, k, size, 5, 3)
        solution = [{"bbox_2d": b, "label": s} for (c, s), b in zip(objects, boxes) if s == shape]
        yield (
            _render(objects, boxes, size),
            _row(split, i, size, DET_QUESTION.format(shape=shape), solution, objects, boxes),
        )


# The zoom world ("thinking with images", DeepEyes, arXiv 2505.14362): a large image holding one
# small square whose pattern only a zoom shows. The four patterns have the same mean grey, so at the
# model's input (ZOOM_SIZE / 4 = 112 px for the tiny processor: the square is 6-10 px, the 2 px
# stripes blur away) they look alike, while a crop of the square resized up to 112 px shows them.
ZOOM_SIZE = 448
PATTERNS = ("horizontal", "vertical", "checkered", "solid")
ZOOM_SIDES = (24, 40)  # px, the square's side: a multiple of 4 (whole stripe periods) in between
ZOOM_MARGIN = 8  # px around the square in the cold-start call's box (2 tiny-model units)
DARK, LIGHT = 1, 255  # the stripes' greys: their mean is exactly the solid's
GREY = (DARK + LIGHT) // 2


@functools.lru_cache(maxsize=64)
def _pattern(name, side):
    """The side x side RGB square filled with pattern `name`: stripes (or checkered cells) 2 px
    wide, period 4 px, or the solid GREY."""
    # phase dark, light, light, dark, dark, ...: symmetric about the centre, so that the 4x
    # reduction blurs the edges of every pattern alike; measured through the tiny processor, the
    # patterns then differ by at most 10 grey levels at the model's input (43 with phase dark,
    # dark, light, light; tests/test_zoom_task.py)
    dark = [(u + 1) % 4 < 2 for u in range(side)]
    if name == "solid":
        return Image.new("RGB", (side, side), (GREY,) * 3)
    is_dark = {
        "horizontal": lambda u, v: dark[v],
        "vertical": lambda u, v: dark[u],
        "checkered": lambda u, v: dark[u] != dark[v],
    }[name]
    im = Image.new("L", (side, side))
    im.putdata([DARK if is_dark(u, v) else LIGHT for v in range(side) for u in range(side)])
    return im.convert("RGB")


def _zoom_rows(split, n, seed, size):
    """Zoom: one small square (ZOOM_SIDES) on the background, at least ZOOM_MARGIN + 1 px from the
    border (so the cold-start crop is never clipped), filled with one of PATTERNS; the answer is
    the pattern's name. The patterns come round-robin in every split (chance is exactly 1/4)."""
    rng = random.Random(SPLIT_SEEDS[split] + seed + 404)
    for i in range(n):
        pattern = PATTERNS[i % len(PATTERNS)]
        side = rng.randrange(ZOOM_SIDES[0], ZOOM_SIDES[1] + 1, 4)
        lo, hi = ZOOM_MARGIN + 1, size - side - ZOOM_MARGIN - 1
        x1, y1 = rng.randint(lo, hi), rng.randint(lo, hi)
        box = [x1, y1, x1 + side, y1 + side]
        im = _background(size).copy()
        im.paste(_pattern(pattern, side), (x1, y1))
        row = _row(split, i, size, ZOOM_QUESTION, pattern, [], [])
        yield im, {**row, "objects": [{"label": pattern, "box": box}]}


def make_synthetic(root, split, n, seed=0, task="rec"):
    """Write `n` synthetic images under `root/split/` and their rows to a JSONL in `root`; reuse
    them if present."""
    prefix = "" if task == "rec" else f"{task}-"
    path = os.path.join(root, f"{prefix}{split}-{n}-{seed}-v{WORLD_VERSION}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(root, split), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for im, row in synthetic_rows(split, n, seed, task=task):
            row["image"] = f"{split}/{prefix}v{WORLD_VERSION}-{seed}-{row['image'].split('/')[1]}"
            # another process may be writing the same split: each image lands whole (a rename)
            target = os.path.join(root, row["image"])
            part = f"{target}.tmp{os.getpid()}.png"
            im.save(part)
            os.replace(part, target)
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


SYNTHETIC_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synthetic")


def synthetic_split(split, n, task="rec"):
    """The first n rows of a synthetic split (made on first use), checked like any other rows."""
    return load_jsonl(make_synthetic(SYNTHETIC_ROOT, split, n, task=task), SYNTHETIC_ROOT, task)[0]


def ground_truths(rows, sizes, coord_space, rule=None):
    """The `gt` dicts the rewards read (rewards.py), from rows and their (input w, input h, original
    w, h) sizes, with the rule refinement in force (rewards.refinement_stage's keys; default: IoU
    threshold 0, no stage)."""
    return [
        {
            "solution": r["solution"],
            "width": W,
            "height": H,
            "input_width": w,
            "input_height": h,
            "coord_space": coord_space,
            "iou_threshold": 0.0,
            **(rule or {}),
            "image": r["image"],
            "problem": r["problem"],
            **({"labels": r["labels"]} if "labels" in r else {}),  # det: what od_length reads
        }
        for r, (w, h, W, H) in zip(rows, sizes)
    ]


def load_rows(args):
    """(rows, bad): the training rows of a run's Args (--train-data in any format load_data reads,
    or the synthetic world), and one line per row skipped by --skip-bad-rows. Every row and image is
    checked here, before any model is loaded; a bad one stops the run with one line."""
    try:
        if not args.train_data:
            path = make_synthetic(
                SYNTHETIC_ROOT, "train", args.train_size or 2000, args.seed, args.task
            )
            return load_jsonl(path, SYNTHETIC_ROOT, args.task, args.skip_bad_rows)
        limit = args.train_size if args.train_size and args.task != "cls" else None
        rows, bad = load_data(
            args.train_data, args.image_root, args.task, args.skip_bad_rows, limit, keys_of(args)
        )
    except BadInput as e:
        sys.exit(f"error: {e}")
    return (
        class_balanced(rows, args.train_size) if args.train_size and args.task == "cls" else rows
    ), bad


def load_eval_rows(args):
    """(rows, bad) of --eval-data: its first --eval-n good rows (0: all), in any format, images
    under --image-root."""
    return load_data(
        args.eval_data,
        args.image_root,
        args.task,
        args.skip_bad_rows,
        args.eval_n or None,
        keys_of(args),
    )


def synthetic_vocab(tasks=("rec",)):
    """Every word the synthetic worlds, the templates and the SFT targets of `tasks` can produce
    (for the tiny tokenizer). The REC-only list is kept as it was, so the shipped REC model rebuilds
    bit-identically."""
    words = set((REC_QUESTION + THINK_SUFFIX).replace(".", " ").replace(":", " ").split())
    words |= (
        set(COLORS) | set(SHAPES) | {"the", "is", "at", "left", "right", "top", "bottom", "center"}
    )
    if set(tasks) & {"cls", "count", "det"}:
        words |= set(
            re.findall(r"[A-Za-z]+", CLS_QUESTION + COUNT_QUESTION + DET_QUESTION + THINK_SUFFIX)
        )
        words |= {s + "s" for s in SHAPES} | {"shapes", "box", "confidence"}
    if "zoom" in tasks:
        words |= set(re.findall(r"[A-Za-z]+", ZOOM_QUESTION))
    return sorted(words)


CONFIDENCE = (
    0.9  # the confidence the det SFT targets give every box (tiny model: one decimal is one token)
)


def sft_target(task, row, gt):
    """The supervised target of a synthetic row: a short chain of thought, then the answer, in the
    model's coordinate space. The thought lists every object left to right (dense supervision: with
    only the target named, the tiny model stayed at chance picking the right object; see README),
    then concludes. zoom: the direct (no tool) trace of zoom_turns, a single turn."""
    if task == "zoom":
        return zoom_turns(row, gt, use_tool=False)[0]
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


def zoom_turns(row, gt, use_tool=True):
    """The assistant turns of a zoom row's cold-start trace, in the model's coordinate space. With
    the tool, two turns: locate the square and call the zoom tool on it (its box widened by
    ZOOM_MARGIN px, clipped to the image), then name the pattern seen in the crop; without, one
    turn that locates the square and answers."""
    W, H = gt["width"], gt["height"]
    sx, sy = rewards.to_original_pixels([1, 1, 1, 1], gt)[:2]  # original pixels per model unit
    x1, y1, x2, y2 = row["objects"][0]["box"]
    m = ZOOM_MARGIN  # over half a model unit (4 px here): the rounded box holds the square
    box = [
        round(max(x1 - m, 0) / sx),
        round(max(y1 - m, 0) / sy),
        round(min(x2 + m, W) / sx),
        round(min(y2 + m, H) / sy),
    ]
    pattern, where = row["solution"], f"<think> the square is at {box} </think>"
    if not use_tool:
        return [f"{where} <answer> {pattern} </answer>"]
    # Qwen's tool-call format, as tools.find_call and tools.read_call read it (tools.TOOL_NAME)
    call = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box}})
    return [
        f"{where} <tool_call> {call} </tool_call>",
        f"<think> {pattern} </think> <answer> {pattern} </answer>",
    ]


def zoom_uses_tool(row):
    """Whether a zoom row's cold-start trace calls the tool: 3 rows in 4, by a hash of the image
    name (the patterns come round-robin, so a rule on the row index would give the direct trace to
    one pattern only; CRC32's low bits follow the last digits of the name). The others answer
    directly, so that RL starts from a model that knows both forms."""
    return hashlib.sha256(str(row["image"]).encode()).digest()[0] % 4 != 0


def box_words(box, width, height):
    """A short description of where a box is ("top left"), used in the tiny model's think text."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "center"
    return f"{vert} {horiz}"


def class_balanced(rows, n):
    """n rows taken round-robin over the labels (file order within a label): n = k x classes is a
    k-shot set, Visual-RFT's few-shot classification setting."""
    by_label = {}
    for r in rows:
        by_label.setdefault(rewards.normalize_text(r["solution"]), []).append(r)
    queues, out = list(by_label.values()), []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out
